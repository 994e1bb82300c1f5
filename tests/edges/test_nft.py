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
from hypothesis import given, settings
from hypothesis import strategies as st

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
    assert len([c for c in rs.chains if c.is_base and c.type == "nat"]) == len(nat_chains)
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
        {"mangle": {"key": {"meta": "mark"}, "value": 1}},  # a mistyped key: malformed, not a crash
    ]
    r = parse_rule(odd, family="ip", table="t")
    assert len(r.exprs) == len(odd)
    assert all(isinstance(e, UnknownMatch | UnknownStatement) for e in r.exprs), r.exprs
    assert "newfangled" in r.unknown_expressions()
    assert "raw payload" in r.unknown_expressions()


def test_malformed_document_is_a_ruleset_error() -> None:
    with pytest.raises(RulesetError, match="nftables"):
        parse_ruleset_json({"something": []})


# A document in which every table, chain, rule and set is read: the base chain reaches "used".
FULL: dict[str, Any] = ruleset_doc(
    {"table": {"family": "inet", "name": "nat", "handle": 1, "flags": []}},
    {"set": {"family": "inet", "table": "nat", "name": "ups", "type": "ifname", "handle": 2, "flags": ["constant"],
             "elem": ["up1"]}},
    chain("post", family="inet", **NAT_POST),
    chain("used", family="inet"),
    rule("post", {"jump": {"target": "used"}}, family="inet"),
    {"rule": {"family": "inet", "table": "nat", "chain": "used", "handle": 7, "comment": "uplinks", "expr": [
        {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "@ups"}}, {"masquerade": None}]}},
)

# (what is wrong, item index in FULL["nftables"], field, a value of the wrong type, words of the message)
MISTYPED: list[tuple[str, int, str, Any, str]] = [
    ("rule handle a word", 5, "handle", "x", 'item 5 (rule inet nat post): "handle" must be an integer, got a string'),
    ("chain name a list", 3, "name", ["post"], '"name" must be a string, got a list ["post"]'),
    ("chain handle a float", 3, "handle", 1.5, '"handle" must be an integer, got a number 1.5'),
    ("chain prio null", 3, "prio", None, '(chain inet nat post): "prio" must be an integer, got null'),
    ("chain prio a boolean", 3, "prio", True, '"prio" must be an integer, got a boolean true'),
    ("chain hook a number", 3, "hook", 4, '"hook" must be a string, got a number 4'),
    ("chain type an object", 3, "type", {"nat": 1}, '"type" must be a string'),
    ("chain policy a word nft does not have", 3, "policy", "reject", '"policy" must be accept or drop'),
    ("chain policy a list", 3, "policy", ["accept"], '"policy" must be a string, got a list'),
    ("chain family a list", 3, "family", ["inet"], '"family" must be a string, got a list'),
    ("chain table a number", 3, "table", 3, '"table" must be a string, got a number 3'),
    ("rule chain an object", 5, "chain", {}, '"chain" must be a string, got an object'),
    ("rule expr an object", 6, "expr", {"masquerade": None}, '"expr" must be a list, got an object'),
    ("rule comment a number", 6, "comment", 5, '"comment" must be a string, got a number 5'),
    ("table flags a number", 1, "flags", 1, '"flags" must be a string or a list of strings'),
    ("table flags a list of numbers", 1, "flags", [1], '"flags" must be a string or a list of strings'),
    ("table name missing", 1, "name", ..., '(table inet): "name" must be a string, got nothing'),
    ("set name a number", 2, "name", 9, '"name" must be a string, got a number 9'),
    ("set flags a number", 2, "flags", 1, 'item 2 (set inet nat ups): "flags" must be a string or a list of strings'),
    ("set flags an object", 2, "flags", {"dynamic": True}, '"flags" must be a string or a list of strings'),
    ("set type a number", 2, "type", 7, '"type" must be a string, a list of strings or a {"typeof": ...} object'),
    ("set type a list of objects", 2, "type", [{}], '"type" must be a string, a list of strings'),
]


def mistype(index: int, field: str, value: Any) -> dict[str, Any]:
    doc = json.loads(json.dumps(FULL))
    ((_, body),) = doc["nftables"][index].items()
    if value is ...:
        del body[field]
    else:
        body[field] = value
    return doc


def test_full_document_reads_every_item() -> None:
    rs = parse_ruleset_json(FULL)
    assert [c.name for c in rs.chains] == ["post", "used"] and rs.unknown_expressions() == frozenset()


@pytest.mark.parametrize(("index", "field", "value", "message"), [c[1:] for c in MISTYPED],
                         ids=[c[0] for c in MISTYPED])
def test_mistyped_document_is_a_ruleset_error_naming_the_field(index: int, field: str, value: Any,
                                                               message: str) -> None:
    with pytest.raises(RulesetError) as info:
        parse_ruleset_json(mistype(index, field, value))
    assert message in str(info.value)


def test_mistyped_items_are_ruleset_errors() -> None:
    for items in ([["chain"]], ["chain"], [{"chain": {}, "rule": {}}], [{"chain": "post"}], [{"rule": None}]):
        with pytest.raises(RulesetError, match="item 0"):
            parse_ruleset_json({"nftables": items})
    # Items topowatch does not read stay skipped, whatever their shape.
    assert parse_ruleset_json({"nftables": [{"metainfo": 1}, {"element": [1]}]}).chains == ()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
# The structural fields the parser reads, per item kind (a table's handle, a set's elem are not checked).
READ = {"table": ("family", "name"), "set": ("family", "table", "name", "flags", "type"),
        "chain": ("family", "table", "name", "handle", "type", "hook", "prio", "policy"),
        "rule": ("family", "table", "chain", "handle")}
FIELDS = [(i, f) for i, item in enumerate(FULL["nftables"]) if i > 0
          for kind, body in item.items() for f in READ[kind] if f in body]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(FIELDS), json_values)
def test_any_mistyped_field_is_a_ruleset_error(where: tuple[int, str], value: Any) -> None:
    """A structural field of the wrong type: RulesetError, never a ValueError/TypeError/KeyError."""
    index, field = where
    original = next(iter(FULL["nftables"][index].values()))[field]
    integer_field = field in ("handle", "prio")
    strings = value is None or isinstance(value, str) or (isinstance(value, list)
                                                          and all(isinstance(x, str) for x in value))
    if field == "flags":
        fits = strings
    elif field == "type" and next(iter(FULL["nftables"][index])) == "set":
        fits = strings or (isinstance(value, dict) and "typeof" in value)
    else:
        fits = (type(value) is int or (isinstance(value, str) and value.strip().lstrip("+-").isdigit())
                if integer_field else isinstance(value, str))
    if fits or value == original:
        return  # a value of the right type: another valid document
    if field == "policy" and value in ("accept", "drop"):
        return
    with pytest.raises(RulesetError):
        parse_ruleset_json(mistype(index, field, value))


def paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        out += [p for k, v in obj.items() for p in paths(v, (*prefix, k))]
    elif isinstance(obj, list):
        out += [p for i, v in enumerate(obj) for p in paths(v, (*prefix, i))]
    return out


FULL_PATHS = paths(FULL)[1:]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(FULL_PATHS), json_values)
def test_any_replaced_value_parses_or_is_a_ruleset_error(path: tuple[Any, ...], value: Any) -> None:
    """Anything anywhere (an expression too): a ruleset, or RulesetError; no other exception escapes."""
    doc = json.loads(json.dumps(FULL))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    try:
        rs = parse_ruleset_json(doc)
    except RulesetError:
        return
    assert rs == parse_ruleset_json(doc)  # a value: the same document reads the same


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


# Comparison operators as the intervals they admit, worked out by hand (ports 0-65535,
# marks 0-2**32-1, IPv4 addresses as integers). ``udp dport < 1024`` is 0-1023, not 0-1024.
COMPARISONS: list[tuple[dict[str, Any], str, Any, tuple[tuple[int, int], ...]]] = [
    ({"payload": {"protocol": "udp", "field": "dport"}}, "<", 1024, ((0, 1023),)),
    ({"payload": {"protocol": "udp", "field": "dport"}}, "<=", 1024, ((0, 1024),)),
    ({"payload": {"protocol": "udp", "field": "dport"}}, ">", 1024, ((1025, 65535),)),
    ({"payload": {"protocol": "udp", "field": "dport"}}, ">=", 1024, ((1024, 65535),)),
    ({"payload": {"protocol": "udp", "field": "dport"}}, "<", 0, ()),
    ({"payload": {"protocol": "udp", "field": "dport"}}, "<=", 0, ((0, 0),)),
    ({"payload": {"protocol": "udp", "field": "dport"}}, ">", 65535, ()),
    ({"payload": {"protocol": "udp", "field": "dport"}}, ">=", 65535, ((65535, 65535),)),
    ({"payload": {"protocol": "tcp", "field": "sport"}}, ">", 0, ((1, 65535),)),
    ({"meta": {"key": "mark"}}, ">=", 16, ((16, 0xFFFFFFFF),)),
    ({"meta": {"key": "mark"}}, "<", 16, ((0, 15),)),
    ({"payload": {"protocol": "ip", "field": "daddr"}}, "<", "10.0.0.0", ((0, 0x09FFFFFF),)),
    ({"payload": {"protocol": "ip", "field": "saddr"}}, ">", "10.0.0.0", ((0x0A000001, 0xFFFFFFFF),)),
]


@pytest.mark.parametrize(("left", "op", "right", "intervals"), COMPARISONS,
                         ids=[f"{next(iter(c[0].values()))} {c[1]} {c[2]}" for c in COMPARISONS])
def test_comparison_operators_admit_exactly_their_interval(
    left: dict[str, Any], op: str, right: Any, intervals: tuple[tuple[int, int], ...]
) -> None:
    r = parse_rule([{"match": {"op": op, "left": left, "right": right}}], family="ip", table="t")
    (match,) = r.exprs
    assert isinstance(match, Match), match
    assert match.op is Op.EQ
    assert isinstance(match.values, IntervalSet)
    assert match.values.intervals == intervals
