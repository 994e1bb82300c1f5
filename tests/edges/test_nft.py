"""The nftables reader against the conformance corpus (nft's own test expectations) and a fake nft."""

from __future__ import annotations

import json
import os
import re
import stat
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest

from topowatch.core.flow import NatKind
from topowatch.core.nat import (
    CtStateMatch,
    CtStatusMatch,
    Hook,
    IntervalSet,
    Key,
    Match,
    NameSet,
    NatMapStatement,
    NatStatement,
    Op,
    Passive,
    UnknownMatch,
    UnknownStatement,
    Verdict,
    VerdictKind,
)
from topowatch.corpus import default_corpus
from topowatch.edges.nft import parse_rule, parse_ruleset_json, read_ruleset
from topowatch.errors import MissingTool, PermissionDenied, RulesetError

CORPUS = default_corpus()
needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason=f"corpus not found at {CORPUS}")

NAT_WORDS = ("snat", "dnat", "masquerade", "redirect")


def corpus_files(*patterns: str) -> list[Path]:
    if not CORPUS.is_dir():
        return []
    return sorted(p for pattern in patterns for p in CORPUS.rglob(pattern))


def t_json_rules(path: Path) -> list[tuple[str, list[Any]]]:
    """The (rule line, expr list) pairs of an nft-test.py ``*.t.json`` file."""
    parts = re.split(r"^# (.*)$", path.read_text(), flags=re.MULTILINE)
    return [(parts[i], json.loads(parts[i + 1])) for i in range(1, len(parts), 2)]


def has_key(obj: Any, key: str) -> bool:
    if isinstance(obj, dict):
        return key in obj or any(has_key(v, key) for v in obj.values())
    if isinstance(obj, list):
        return any(has_key(v, key) for v in obj)
    return False


# ---------------------------------------------------------------------------
# Corpus: every file loads; every NAT rule is modelled exactly or named as unknown.


@needs_corpus
@pytest.mark.parametrize("path", corpus_files("*.json-nft"), ids=lambda p: p.name)
def test_corpus_rulesets_parse(path: Path) -> None:
    doc = json.loads(path.read_text())
    rs = parse_ruleset_json(doc)
    assert rs == parse_ruleset_json(doc)
    nat_chains = [
        c["chain"] for c in doc["nftables"]
        if "chain" in c and c["chain"].get("type") == "nat" and c["chain"].get("family") in ("ip", "ip6", "inet")
    ]
    assert len([c for c in rs.chains if c.is_base]) == len(nat_chains)
    for chain in rs.chains:
        for rule in chain.rules:
            text = rs.describe_rule(chain, rule)
            assert text.startswith(f"table {chain.family} {chain.table} chain {chain.name} handle")


@needs_corpus
@pytest.mark.parametrize("path", corpus_files("*.t.json", "*.t.json.output"), ids=lambda p: str(p.parent.name + "/" + p.name))
def test_corpus_rule_expectations_parse(path: Path) -> None:
    rules = t_json_rules(path)
    assert rules, f"no rules found in {path}"
    for line, exprs in rules:
        rule = parse_rule(exprs, family="inet", table="t")
        assert len(rule.exprs) == len(exprs), line
        for e, parsed in zip(exprs, rule.exprs, strict=True):
            ((word, body),) = e.items()
            if isinstance(parsed, UnknownMatch | UnknownStatement):
                assert parsed.expression, line
                assert parsed.reason.startswith("unmodelled expression: ")
            if word in NAT_WORDS:
                # A NAT statement is either modelled exactly or named as unknown, never dropped.
                assert isinstance(parsed, NatStatement | NatMapStatement | UnknownStatement), line
                if isinstance(parsed, NatMapStatement):
                    assert parsed.kind is NatKind(word)
                elif isinstance(parsed, UnknownStatement):
                    assert parsed.expression.startswith(word), (line, parsed)
                else:
                    assert parsed.kind is NatKind(word)
                    if parsed.addr is not None:
                        assert str(parsed.addr[0]) in line, (line, parsed)
                    if parsed.ports is not None:
                        assert str(parsed.ports[0]) in line, (line, parsed)
            if word == "match" and not has_key(body, "concat") and not has_key(body, "map"):
                assert isinstance(parsed, Match | UnknownMatch | CtStateMatch | CtStatusMatch), line


@needs_corpus
def test_corpus_unknown_expressions_are_named() -> None:
    names: set[str] = set()
    for path in corpus_files("*.t.json", "*.t.json.output"):
        for _, exprs in t_json_rules(path):
            names |= set(parse_rule(exprs, family="inet", table="t").unknown_expressions())
    for path in corpus_files("*.json-nft"):
        names |= parse_ruleset_json(json.loads(path.read_text())).unknown_expressions()
    # (rt ipsec, meta secpath and ipsec ... are modelled: core.xfrm answers them.)
    # (NAT maps, concatenations, verdict maps, fib type and numgen are modelled: see test_nft_breadth.)
    for expected in ("fib daddr oif", "vmap: ct state", "ct state", "mangle", "redirect to port map"):
        assert expected in names, (expected, sorted(names))


@needs_corpus
def test_corpus_snat_file_modelled_exactly() -> None:
    """Spot-check values against the rule lines nft's tests state (ip/snat.t.json)."""
    rules = dict(t_json_rules(CORPUS / "nftables-tests/py/ip/snat.t.json"))
    rule = parse_rule(rules['iifname "eth0" tcp dport != {80, 90, 23} snat to 192.168.3.2'], family="ip", table="t")
    iif, dport, nat = rule.exprs
    assert isinstance(iif, Match) and iif.selector.key is Key.IIFNAME
    assert iif.values == NameSet(exact=frozenset({"eth0"}))
    assert isinstance(dport, Match) and dport.op is Op.NE and dport.selector.proto == 6
    assert dport.values == IntervalSet(((23, 23), (80, 80), (90, 90)))
    assert isinstance(nat, NatStatement)
    assert nat == NatStatement(NatKind.SNAT, nat.text, None, (ip_address("192.168.3.2"),) * 2, None, ())
    rule = parse_rule(rules['iifname "eth0" tcp dport 80-90 snat to 192.168.3.15-192.168.3.240'],
                      family="ip", table="t")
    nat = rule.exprs[-1]
    assert isinstance(nat, NatStatement)
    assert nat.addr == (ip_address("192.168.3.15"), ip_address("192.168.3.240"))


# ---------------------------------------------------------------------------
# Parser details on hand-written documents.


def ruleset_doc(*items: dict[str, Any]) -> dict[str, Any]:
    return {"nftables": [{"metainfo": {"json_schema_version": 1}}, *items]}


def chain(name: str, table: str = "nat", family: str = "ip", **base: Any) -> dict[str, Any]:
    return {"chain": {"family": family, "table": table, "name": name, "handle": 1, **base}}


def rule(chain_name: str, *exprs: Any, table: str = "nat", family: str = "ip", handle: int = 5) -> dict[str, Any]:
    return {"rule": {"family": family, "table": table, "chain": chain_name, "handle": handle, "expr": list(exprs)}}


NAT_POST: dict[str, Any] = {"type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}


def test_keeps_nat_base_chains_and_reachable_chains_only() -> None:
    doc = ruleset_doc(
        {"table": {"family": "ip", "name": "nat", "handle": 1}},
        chain("post", **NAT_POST),
        chain("fwd", type="filter", hook="forward", prio=0, policy="accept"),
        chain("used"),
        chain("deeper"),
        chain("unused"),
        rule("post", {"jump": {"target": "used"}}),
        rule("used", {"goto": {"target": "deeper"}}),
        rule("fwd", {"jump": {"target": "unused"}}),
        {"chain": {"family": "bridge", "table": "b", "name": "x", "type": "filter", "hook": "prerouting", "prio": 0}},
        {"chain": {"family": "arp", "table": "a", "name": "x"}},
    )
    rs = parse_ruleset_json(doc)
    assert [c.name for c in rs.chains] == ["post", "used", "deeper"]
    post = rs.chain("ip", "nat", "post")
    assert post is not None
    assert (post.hook, post.priority, post.type, post.policy) == (Hook.POSTROUTING, 100, "nat", "accept")
    assert rs.base_chains(Hook.POSTROUTING, 2) == (post,)
    assert rs.base_chains(Hook.POSTROUTING, 10) == ()


def test_dormant_table_is_ignored() -> None:
    doc = ruleset_doc(
        {"table": {"family": "inet", "name": "nat", "handle": 1, "flags": "dormant"}},
        chain("post", family="inet", **NAT_POST),
        rule("post", {"masquerade": None}, family="inet"),
    )
    assert parse_ruleset_json(doc).chains == ()


def test_statements() -> None:
    r = parse_rule(
        [
            {"counter": {"packets": 1, "bytes": 2}},
            {"log": {"prefix": "nat "}},
            {"snat": {"family": "ip", "addr": "192.0.2.1", "port": {"range": [1024, 2048]}, "flags": "random"}},
        ],
        family="inet", table="t",
    )
    assert [type(e) for e in r.exprs] == [Passive, Passive, NatStatement]
    nat = r.exprs[2]
    assert isinstance(nat, NatStatement)
    assert (nat.family, nat.ports, nat.flags) == (2, (1024, 2048), ("random",))
    assert r.text == "counter log snat ip to 192.0.2.1:1024-2048 random"
    r = parse_rule([{"dnat": {"addr": "2001:db8::1"}}], family="inet", table="t")
    assert isinstance(r.exprs[0], NatStatement) and r.exprs[0].family == 10
    r = parse_rule([{"jump": {"target": "x"}}], family="ip", table="t")
    assert r.exprs == (Verdict(VerdictKind.JUMP, "x"),)
    r = parse_rule([{"xt": {"type": "target", "name": "MASQUERADE"}}], family="ip", table="t")
    assert r.exprs == (UnknownStatement("xt target MASQUERADE", "xt target MASQUERADE"),)
    r = parse_rule([{"xt": {"type": "match", "name": "policy"}}], family="ip", table="t")
    assert r.exprs == (UnknownMatch("xt match policy", "xt match policy"),)
    assert isinstance(r.exprs[0], UnknownMatch)
    assert r.exprs[0].reason == "unmodelled expression: xt match policy"


def test_never_raises_on_odd_expressions() -> None:
    odd: list[Any] = [
        {"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": {"weird": 1}}},
        {"match": {"op": "~=", "left": {"meta": {"key": "mark"}}, "right": 1}},
        {"match": {"left": {"payload": {"protocol": "ip", "field": "saddr"}}, "op": "==", "right": "not-an-ip"}},
        {"match": {"left": {"payload": {"base": "nh", "offset": 12, "len": 32}}, "op": "==", "right": 1}},
        {"newfangled": {"x": [1, 2]}},
        {"snat": {"addr": {"range": ["10.0.0.9", "10.0.0.1"]}}},
        {"masquerade": {"port": "http"}},
        "not even an object",
        {"a": 1, "b": 2},
    ]
    r = parse_rule(odd, family="ip", table="t")
    assert len(r.exprs) == len(odd)
    assert all(isinstance(e, UnknownMatch | UnknownStatement) for e in r.exprs), r.exprs
    assert "newfangled" in r.unknown_expressions()
    assert "raw payload" in r.unknown_expressions()


def test_malformed_document_is_a_ruleset_error() -> None:
    with pytest.raises(RulesetError, match="nftables"):
        parse_ruleset_json({"something": []})


# ---------------------------------------------------------------------------
# read_ruleset: runs a real program (a fake nft script), maps failures to one clear error.


def fake_nft(tmp_path: Path, script: str) -> str:
    path = tmp_path / "nft"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_read_ruleset_runs_nft_json(tmp_path: Path) -> None:
    doc = ruleset_doc(chain("post", **NAT_POST), rule("post", {"masquerade": None}))
    (tmp_path / "out.json").write_text(json.dumps(doc))
    nft = fake_nft(tmp_path, f'[ "$*" = "-j list ruleset" ] || exit 3\ncat {tmp_path / "out.json"}\n')
    rs = read_ruleset(nft)
    assert rs == parse_ruleset_json(doc)
    assert len(rs.chains) == 1


def test_read_ruleset_errors(tmp_path: Path) -> None:
    with pytest.raises(MissingTool, match="not found"):
        read_ruleset(str(tmp_path / "no-such-nft"))
    nft = fake_nft(tmp_path, 'echo "netlink: Error: cache initialization failed: Operation not permitted" >&2\nexit 1\n')
    with pytest.raises(PermissionDenied, match="CAP_NET_ADMIN"):
        read_ruleset(nft)
    nft = fake_nft(tmp_path, 'echo "Error: syntax error" >&2\necho "more" >&2\nexit 1\n')
    with pytest.raises(RulesetError, match=r"failed: Error: syntax error$"):
        read_ruleset(nft)
    nft = fake_nft(tmp_path, "echo '{\"nftables\": ['\n")
    with pytest.raises(RulesetError, match="not JSON"):
        read_ruleset(nft)
    if os.geteuid() != 0:  # root may execute anything
        path = tmp_path / "noexec"
        path.write_text("#!/bin/sh\n")
        with pytest.raises(PermissionDenied):
            read_ruleset(str(path))
