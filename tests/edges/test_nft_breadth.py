"""nftables breadth in the reader, on the conformance corpus; and a broken nft keeps the old model.

Corpus rule lines come from nft's own tests (``*.t.json``: the expected JSON
after each ``# rule`` line) and its shell test dumps (``*.json-nft``).
"""

from __future__ import annotations

import json
import logging
import re
import stat
from collections.abc import Callable, Sequence
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest

from topowatch.core.conntrack import Entry
from topowatch.core.decide import Decider
from topowatch.core.eligibility import Eligibility
from topowatch.core.flow import NatKind
from topowatch.core.model import AF_INET, AF_INET6, Address, Link, Nexthop, Route, Topology
from topowatch.core.nat import (
    CtStateMatch,
    CtStatusMatch,
    IntervalSet,
    Key,
    MarkCopy,
    MarkSet,
    Match,
    NameSet,
    NatMapStatement,
    NatRuleset,
    NatStatement,
    NatTarget,
    UnknownStatement,
    VerdictMap,
)
from topowatch.corpus import default_corpus
from topowatch.edges.nft import parse_rule, parse_ruleset_json, read_ruleset
from topowatch.reactor import Burst, DeleteCounts, Reactor, ReactorConfig, StillStale, Trigger

CORPUS = default_corpus() / "nftables-tests"
needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason=f"corpus not found at {CORPUS}")
NAT_WORDS = ("snat", "dnat", "masquerade", "redirect")


def t_json(rel: str) -> dict[str, list[Any]]:
    parts = re.split(r"^# (.*)$", (CORPUS / rel).read_text(), flags=re.MULTILINE)
    return {parts[i]: json.loads(parts[i + 1]) for i in range(1, len(parts), 2)}


def rule_of(rel: str, line: str, family: str = "ip") -> Any:
    return parse_rule(t_json(rel)[line], family=family, table="t")


def A(text: str) -> Any:
    return ip_address(text)


# ---------------------------------------------------------------------------
# Whole corpus: every NAT statement modelled exactly or named, and >= 90% modelled.


def nat_statements() -> dict[str, tuple[int, list[str]]]:
    """Per file: how many NAT statements are modelled exactly, and the names of those that are not."""
    out: dict[str, tuple[int, list[str]]] = {}

    def tally(name: str, exprs: Sequence[Any]) -> None:
        ok, unknown = out.get(name, (0, []))
        for e in exprs:
            if isinstance(e, NatStatement | NatMapStatement):
                ok += 1
            elif isinstance(e, UnknownStatement) and e.expression.split()[0] in NAT_WORDS:
                unknown.append(e.expression)
        out[name] = (ok, unknown)

    for path in sorted(CORPUS.rglob("*.t.json")) + sorted(CORPUS.rglob("*.t.json.output")):
        family = path.parent.name if path.parent.name in ("ip", "ip6", "inet") else "inet"
        for exprs in t_json(str(path.relative_to(CORPUS))).values():
            tally(path.name, parse_rule(exprs, family=family, table="t").exprs)
    for path in sorted(CORPUS.rglob("*.json-nft")):
        rs = parse_ruleset_json(json.loads(path.read_text()))
        tally(path.name, [e for c in rs.chains for r in c.rules for e in r.exprs])
    return out


@needs_corpus
def test_corpus_nat_statements_modelled() -> None:
    per_file = nat_statements()
    ok = sum(n for n, _ in per_file.values())
    unknown = [name for _, names in per_file.values() for name in names]
    report = {f: (n, names) for f, (n, names) in per_file.items() if n or names}
    print("\nNAT statements per corpus file (modelled, unmodelled by name):")
    for f, (n, names) in sorted(report.items()):
        print(f"  {f}: {n} modelled" + (f"; not: {sorted(set(names))}" if names else ""))
    assert ok + len(unknown) > 150
    assert ok / (ok + len(unknown)) >= 0.9, (ok, unknown)
    assert set(unknown) <= {"redirect to port map"}, unknown


# ---------------------------------------------------------------------------
# Snippets modelled exactly.


@needs_corpus
def test_nat_map_concat_to_addr_and_port_range() -> None:
    rule = rule_of("py/ip/dnat.t.json",
                   "dnat ip to ip saddr . tcp dport map { 192.168.1.2 . 80 : 10.141.10.2 . 8888 - 8999 }")
    (stmt,) = rule.exprs
    assert isinstance(stmt, NatMapStatement) and stmt.kind is NatKind.DNAT and stmt.family == AF_INET
    assert [s.key for s in stmt.selectors] == [Key.SADDR, Key.DPORT]
    ((key, target),) = stmt.elements
    assert key == (IntervalSet(((int(A("192.168.1.2")),) * 2,), 4), IntervalSet(((80, 80),)))
    assert target == NatTarget((A("10.141.10.2"), A("10.141.10.2")), (8888, 8999))


@needs_corpus
def test_nat_map_ifname_and_address_range() -> None:
    rule = rule_of("py/ip/dnat.t.json", 'dnat ip to iifname . ip saddr map { "enp2s0" . 10.1.1.136 : 1.1.2.69/32, '
                   '"enp2s0" . 10.1.1.1-10.1.1.135 : 1.1.2.66-1.84.236.78 }')
    (stmt,) = rule.exprs
    assert isinstance(stmt, NatMapStatement)
    (_, first), (key, second) = stmt.elements
    assert first.addr == (A("1.1.2.69"), A("1.1.2.69"))
    assert key[0] == NameSet(exact=frozenset({"enp2s0"}))
    assert second.addr == (A("1.1.2.66"), A("1.84.236.78")) and second.ports is None


@needs_corpus
def test_numgen_and_jhash() -> None:
    rules = t_json("py/ip/numgen.t.json")
    rule = parse_rule(rules["dnat to numgen inc mod 10 map { 0-5 : 192.168.10.100, 6-9 : 192.168.20.200}"],
                      family="ip", table="t")
    (stmt,) = rule.exprs
    assert isinstance(stmt, NatMapStatement)
    assert stmt.selectors[0].key is Key.NUMGEN and stmt.selectors[0].params == (10, 0)
    assert [k[0] for k, _ in stmt.elements] == [IntervalSet(((0, 5),)), IntervalSet(((6, 9),))]
    rule = parse_rule(rules["dnat to numgen inc mod 7 offset 167772161"], family="ip", table="t")
    (stmt,) = rule.exprs
    assert isinstance(stmt, NatStatement) and stmt.addr == (A("10.0.0.1"), A("10.0.0.7"))
    rule = rule_of("py/ip/hash.t.json",
                   "dnat to jhash ip saddr mod 2 seed 0xdeadbeef map { 0 : 192.168.20.100, 1 : 192.168.30.100 }")
    (stmt,) = rule.exprs
    assert isinstance(stmt, NatMapStatement) and stmt.selectors[0].key is Key.HASH


@needs_corpus
def test_snat_prefix_is_netmap() -> None:
    rule = rule_of("py/ip/snat.t.json", "snat ip prefix to ip saddr map { 10.141.11.0/24 : 192.168.2.0/24 }")
    (stmt,) = rule.exprs
    assert isinstance(stmt, NatMapStatement) and stmt.netmap and stmt.kind is NatKind.SNAT
    ((_, target),) = stmt.elements
    assert target.addr == (A("192.168.2.0"), A("192.168.2.255"))


@needs_corpus
def test_fib_ct_and_mark() -> None:
    fib = t_json("py/inet/fib.t.json")
    (match,) = parse_rule(fib["fib daddr . iif type local"], family="inet", table="t").exprs
    assert isinstance(match, Match) and match.selector.key is Key.FIB_TYPE
    assert match.selector.params == ("daddr", "iif") and match.values == IntervalSet(((2, 2),))
    (match,) = parse_rule(fib["fib daddr oif exists"], family="inet", table="t").exprs
    assert match.__class__.__name__ == "UnknownMatch"  # daddr oif: not modelled, named
    vmap = parse_rule(fib["fib daddr . iif type vmap { blackhole : drop, prohibit : drop, unicast : accept }"],
                      family="inet", table="t").exprs[0]
    assert isinstance(vmap, VerdictMap) and len(vmap.elements) == 3
    ct = t_json("py/any/ct.t.json")
    (state,) = parse_rule(ct["ct state != related"], family="inet", table="t").exprs
    assert state == CtStateMatch(frozenset({"RELATED"}), True, state.text)
    (state,) = parse_rule(ct["ct state 8"], family="inet", table="t").exprs
    assert isinstance(state, CtStateMatch) and state.states == {"NEW"}
    (status,) = parse_rule(ct["ct status ! dnat"], family="inet", table="t").exprs
    assert status == CtStatusMatch(frozenset({"DST_NAT"}), True, status.text)
    (mark,) = parse_rule(ct["ct mark set 0x11"], family="inet", table="t").exprs
    assert isinstance(mark, MarkSet) and mark.ct and mark.value == 0x11
    (mark,) = parse_rule(ct["ct mark set mark"], family="inet", table="t").exprs
    assert isinstance(mark, MarkCopy) and mark.to_ct  # CONNMARK --save-mark
    (concat,) = parse_rule(t_json("py/ip/snat.t.json")["meta l4proto { 6, 17} snat ip to ip saddr . th dport map "
                                                        "{ 10.141.11.4 . 20 : 192.168.2.3 . 80}"],
                           family="ip", table="t").exprs[1:]
    assert isinstance(concat, NatMapStatement) and concat.selectors[1].proto is None  # th: no l4 dependency


@needs_corpus
def test_named_maps_resolve_in_shell_dumps() -> None:
    rs = parse_ruleset_json(json.loads((CORPUS / "shell/testcases/maps/dumps/nat_addr_port.json-nft").read_text()))
    z4 = [e for c in rs.chains if c.family == "inet" for r in c.rules for e in r.exprs
          if isinstance(e, NatMapStatement) and len(e.selectors) == 2]
    assert z4, rs.describe()
    ((_, target),) = z4[0].elements
    assert target == NatTarget((A("10.1.1.1"), A("10.1.1.1")), (4242, 4242))
    assert not rs.unknown_expressions()


@needs_corpus
def test_concat_set_with_intervals() -> None:
    doc = json.loads((CORPUS / "shell/testcases/optimizations/dumps/merge_nat_concat.json-nft").read_text())
    # The dump's chain has no hook: read its rules one by one.
    rules = [parse_rule(i["rule"]["expr"], family="ip", table="test3") for i in doc["nftables"] if "rule" in i]
    stmts = [e for r in rules for e in r.exprs if isinstance(e, NatMapStatement)]
    assert len(stmts) == 2 and not [n for r in rules for n in r.unknown_expressions()]
    (key, target), _ = stmts[0].elements
    assert key == (IntervalSet(((int(A("1.1.1.1")),) * 2,), 4), IntervalSet(((1024, 65535),)))
    assert target.addr == (A("3.3.3.3"), A("3.3.3.3"))


# ---------------------------------------------------------------------------
# A ruleset that fails to read keeps the previous model; the reactor goes on.

GOOD = {"nftables": [
    {"table": {"family": "ip", "name": "nat", "handle": 1}},
    {"chain": {"family": "ip", "table": "nat", "name": "post", "handle": 1, "type": "nat", "hook": "postrouting",
               "prio": 100, "policy": "accept"}},
    {"rule": {"family": "ip", "table": "nat", "chain": "post", "handle": 2,
              "expr": [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "up1"}},
                       {"masquerade": None}]}},
]}


class NftBackend:
    """A backend whose ruleset comes from a (fake) nft program, as ``KernelBackend`` reads it."""

    name = "fake"

    def __init__(self, nft: str) -> None:
        self.nft = nft
        self.topo = Topology(
            links=(Link(1, "lo"), Link(2, "up1")),
            addresses=(Address(2, A("203.0.113.2"), 24), Address(2, A("2001:db8::2"), 64)),
            routes=(Route(ip_network("0.0.0.0/0"), nexthops=(Nexthop(2, A("203.0.113.1")),)),),
        )

    def sources(self) -> list[Any]:
        return []

    async def topology(self) -> Topology:
        return self.topo

    async def ruleset(self) -> NatRuleset:
        return read_ruleset(self.nft)

    async def entries(self, eligibility: Eligibility) -> list[Entry]:
        return []

    async def judge(
        self, eligibility: Eligibility, decider: Callable[[Any], Decider], early: Any = None
    ) -> Decider:
        """Every listed entry, added to one decider (``reactor.Backend.judge``)."""
        judging = decider(None)
        for e in await self.entries(eligibility):
            judging.add(e)
        return judging

    async def delete(self, entries: Sequence[Entry], still: StillStale) -> DeleteCounts:
        return DeleteCounts()


async def test_broken_nft_keeps_previous_ruleset(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mode = tmp_path / "mode"
    (tmp_path / "good.json").write_text(json.dumps(GOOD))
    nft = tmp_path / "nft"
    nft.write_text(
        "#!/bin/sh\n"
        f'case "$(cat {mode})" in\n'
        f"  good) cat {tmp_path / 'good.json'} ;;\n"
        "  garbage) echo '{\"nftables\": [' ;;\n"
        "  mistyped) echo '{\"nftables\": [{\"chain\": {\"family\": \"ip\", \"table\": \"nat\", "
        "\"name\": [\"post\"]}}]}' ;;\n"
        "  *) echo 'Error: Could not process rule: No such file or directory' >&2; exit 1 ;;\n"
        "esac\n"
    )
    nft.chmod(nft.stat().st_mode | stat.S_IXUSR)
    mode.write_text("good")
    reactor = Reactor(NftBackend(str(nft)), ReactorConfig(startup_sweep=False))
    burst = Burst()
    burst.add(Trigger("nftables", "nftables ruleset changed (generation 2)"), 0.0)
    await reactor.react(burst)
    good = reactor.ruleset
    assert good is not None and len(good.chains) == 1
    for broken in ("broken", "garbage", "mistyped"):
        mode.write_text(broken)
        with caplog.at_level(logging.ERROR, logger="topowatch.reactor"):
            reaction = await reactor.react(burst)
        assert reactor.ruleset == good  # the previous model stays in force
        assert reaction.number == len(reactor.reactions)
        assert any("ruleset unreadable, keeping the previous one" in r.message for r in caplog.records)
        caplog.clear()
    mode.write_text("good")
    await reactor.react(burst)
    assert reactor.ruleset == good and len(reactor.reactions) == 5
    assert reactor.errors == {"ruleset": 3}  # each unreadable ruleset counted; no reaction failed
    # The topology's v6 address did not disturb the reactions: it is in the snapshot they kept.
    assert reactor.t0 is not None and [a.family for a in reactor.t0.addresses] == [AF_INET, AF_INET6]


# ---------------------------------------------------------------------------
# nft text dumps (``*.nft``): converted by this system's nft in a throwaway namespace.


def nat_text_dumps() -> list[Path]:
    if not CORPUS.is_dir():
        return []
    return sorted(p for p in CORPUS.rglob("*.nft") if re.search(r"\b(snat|dnat|masquerade|redirect)\b",
                                                                  p.read_text(errors="replace")))


@pytest.fixture(scope="module")
def scratch_ns() -> Any:
    from topowatch.netns import Namespace

    ns = Namespace.create("twnft")  # (the netns marker skips these tests where namespaces are not allowed)
    yield ns
    ns.delete()


@pytest.mark.netns
@pytest.mark.parametrize("path", nat_text_dumps(), ids=lambda p: p.name)
def test_nft_text_dump_through_this_nft(path: Path, scratch_ns: Any) -> None:
    import subprocess

    scratch_ns.run("nft", "flush", "ruleset")
    proc = subprocess.run(["ip", "netns", "exec", scratch_ns.name, "nft", "-f", str(path)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"this nft cannot load {path.name}: {proc.stderr.strip().splitlines()[0]}")
    doc = json.loads(scratch_ns.run("nft", "-j", "list", "ruleset"))
    rs = parse_ruleset_json(doc)
    assert rs == parse_ruleset_json(doc)
    nat = [e for c in rs.chains for r in c.rules for e in r.exprs
           if isinstance(e, NatStatement | NatMapStatement)
           or (isinstance(e, UnknownStatement) and e.expression.split()[0] in NAT_WORDS)]
    unknown = [e.expression for e in nat if isinstance(e, UnknownStatement)]
    assert set(unknown) <= {"redirect to port map"}, unknown
