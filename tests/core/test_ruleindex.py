"""The rule index (core/ruleindex.py): a chain run through it predicts what the chain run rule by rule does.

Two independent checks: at the index's own level, every rule it skips for a packet has a guard
that ``evaluate._match`` (the reference reading of a match) finds false; and at the evaluator's
level, generated large chains (NAT at prerouting and postrouting, a jumped-to chain, and a mark
chain whose statements change the packet mid-chain) give the same prediction, reasons included,
with the index and without it.
"""

from __future__ import annotations

from ipaddress import ip_address
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topowatch.core import evaluate, ruleindex
from topowatch.core.evaluate import _match, _order, _Packet, _point, _rule_plan, predict
from topowatch.core.flow import Egress, EgressKind, Flow, Ingress, Unknown
from topowatch.core.nat import (
    Chain,
    IntervalSet,
    Key,
    Match,
    NameSet,
    NatRuleset,
    Op,
    Rule,
    Selector,
    Verdict,
    VerdictKind,
)
from topowatch.edges.nft import parse_ruleset_json

from test_evaluate_breadth import FIB, MASQ, m, payload, pfx, rng, sset  # isort: skip

# --- the index alone: a skipped rule has a false guard ------------------------------------------


def sel(key: Key, family: int | None = None, proto: int | None = None, mask: int | None = None) -> Selector:
    return Selector(key, key.value, family, proto, mask)


def ints(*pairs: tuple[int, int], version: int | None = None) -> IntervalSet:
    return IntervalSet(pairs, version)


V4 = int(ip_address("10.0.1.0"))
V6 = int(ip_address("fd00:1::"))
GUARDS = [
    Match(sel(Key.IIFNAME), Op.EQ, NameSet(frozenset({"up2"})), 'iifname "up2"'),
    Match(sel(Key.IIFNAME), Op.EQ, NameSet(frozenset({"lan", "up1"})), 'iifname { "lan", "up1" }'),
    Match(sel(Key.IIFNAME), Op.EQ, NameSet(prefixes=frozenset({"up"})), 'iifname "up*"'),
    Match(sel(Key.IIFNAME), Op.NE, NameSet(frozenset({"up2"})), 'iifname != "up2"'),
    Match(sel(Key.OIFNAME), Op.EQ, NameSet(frozenset({"up1"})), 'oifname "up1"'),
    Match(sel(Key.SADDR, family=2), Op.EQ, ints((V4, V4 + 63), version=4), "ip saddr 10.0.1.0/26"),
    Match(sel(Key.SADDR, family=2), Op.EQ, ints((V4 + 2, V4 + 2), version=4), "ip saddr 10.0.1.2"),
    Match(sel(Key.SADDR, family=10), Op.EQ, ints((V6 + 2, V6 + 2), version=6), "ip6 saddr fd00:1::2"),
    Match(sel(Key.SADDR, family=2), Op.NE, ints((V4, V4 + 255), version=4), "ip saddr != 10.0.1.0/24"),
    Match(sel(Key.DADDR, family=2), Op.EQ, ints((0, 2**32 - 1), version=4), "ip daddr 0.0.0.0/0"),
    Match(sel(Key.DPORT, proto=17), Op.EQ, ints((53, 53)), "udp dport 53"),
    Match(sel(Key.DPORT, proto=17), Op.EQ, ints((5000, 5100)), "udp dport 5000-5100"),
    Match(sel(Key.DPORT, proto=6), Op.EQ, ints((53, 53), (80, 80)), "tcp dport { 53, 80 }"),
    Match(sel(Key.DPORT), Op.EQ, ints((53, 53)), "th dport 53"),
    Match(sel(Key.DPORT, proto=17), Op.NE, ints((53, 53)), "udp dport != 53"),
    Match(sel(Key.SPORT, proto=17), Op.EQ, ints((5060, 5060)), "udp sport 5060"),
    Match(sel(Key.MARK), Op.EQ, ints((1, 1)), "meta mark 0x1"),
    Match(sel(Key.MARK, mask=0xF0), Op.EQ, ints((0x10, 0x10)), "meta mark & 0xf0 == 0x10"),
    Match(sel(Key.CT_MARK), Op.EQ, ints((0, 0)), "ct mark 0"),
    Match(sel(Key.L4PROTO), Op.EQ, ints((17, 17)), "meta l4proto udp"),
    Match(sel(Key.NFPROTO), Op.EQ, ints((10, 10)), "meta nfproto ipv6"),
    Match(sel(Key.CT_ZONE), Op.EQ, ints((7, 7)), "ct zone 7"),
]
DEVICES: list[Any] = [Ingress(2, "lan"), Ingress(3, "up1"), Ingress(4, "up2"), None]


@st.composite
def packets(draw: st.DrawFn) -> _Packet:
    v6 = draw(st.booleans())
    proto = draw(st.sampled_from([17, 6, 1]))
    src = ip_address(draw(st.sampled_from(["fd00:1::2", "fd00:1::9"] if v6 else ["10.0.1.2", "10.0.1.70"])))
    dst = ip_address("2001:db8::1" if v6 else "192.0.2.10")
    lo = draw(st.sampled_from([53, 80, 5000, 5050, 6000]))
    hi = draw(st.sampled_from([lo, lo, lo + 100]))
    iif = draw(st.sampled_from([*DEVICES, Unknown("any of lan, up1")]))
    oif = draw(st.sampled_from([Egress(EgressKind.UNICAST, 3, "up1"), Egress(EgressKind.UNICAST, 4, "up2"), None]))
    return _Packet(10 if v6 else 2, proto, src, dst, draw(st.sampled_from([5060, 40000])), (lo, hi),
                   draw(st.sampled_from([None, 0, 1, 0x13])), draw(st.sampled_from([None, 0, 5])),
                   draw(st.sampled_from([0, 7])), iif, oif)  # fmt: skip


@st.composite
def chains(draw: st.DrawFn) -> list[tuple[bool, tuple[Match, ...]]]:
    """32-60 rules, most of which open with a match on one key (so that the index is built)."""
    key = draw(st.sampled_from(sorted({g.selector.key for g in GUARDS}, key=lambda k: k.value)))
    main = [g for g in GUARDS if g.selector.key is key]
    rules = []
    for _ in range(draw(st.integers(32, 60))):
        guards = draw(st.lists(st.sampled_from(GUARDS), max_size=2))
        if draw(st.integers(0, 9)):
            guards.insert(draw(st.integers(0, len(guards))), draw(st.sampled_from(main)))
        rules.append((draw(st.integers(0, 9)) == 0, tuple(guards)))
    return rules


SKIPPED: list[int] = []  # rules skipped over the examples (a test below says the property was exercised)


@settings(max_examples=500, deadline=None)
@given(plans=chains(), packet=packets())
def test_a_rule_is_skipped_only_where_a_guard_is_false(plans: list[tuple[bool, tuple[Match, ...]]],
                                                        packet: _Packet) -> None:  # fmt: skip
    index = ruleindex.build(plans)
    if index is None:
        return
    value = _point(index.key, packet)
    if value is None:
        return
    reached = list(index.candidates(packet.family, packet.proto, value))
    SKIPPED.append(sum(1 for p, (passive, _) in enumerate(plans) if not passive and p not in reached))
    assert set(index.always) <= set(reached)
    assert reached == sorted(set(reached))
    for position, (passive, guards) in enumerate(plans):
        if position not in reached and not passive:
            assert any(_match(g, packet) is False for g in guards), (position, [g.text for g in guards])


def test_the_property_above_was_exercised() -> None:
    if not SKIPPED:  # run alone: nothing to say
        pytest.skip("run with test_a_rule_is_skipped_only_where_a_guard_is_false")
    assert sum(1 for n in SKIPPED if n) > len(SKIPPED) // 4


def test_a_thousand_port_forwards_reach_one_rule() -> None:
    """Not vacuous: in a chain of 1,000 port forwards, a flow reaches the one rule its port selects,
    and none where nothing selects it."""
    forwards = [Rule(i, (Match(sel(Key.IIFNAME), Op.EQ, NameSet(frozenset({"up2"})), 'iifname "up2"'),
                      Match(sel(Key.DPORT, proto=17), Op.EQ, ints((20000 + i, 20000 + i)), f"udp dport {20000 + i}"),
                          Verdict(VerdictKind.ACCEPT)))
                for i in range(1000)]  # fmt: skip
    chain = Chain("ip", "t", "pre", tuple(forwards))
    packet = _Packet(2, 17, ip_address("192.0.2.50"), ip_address("203.0.113.2"), 4000, (20007, 20007), 0, 0, 0,
                     Ingress(4, "up2"), None)  # fmt: skip
    assert list(_order(chain, packet)) == [7]
    elsewhere = _Packet(2, 17, ip_address("10.0.1.2"), ip_address("198.18.0.1"), 4000, (53, 53), 0, 0, 0,
                        Ingress(2, "lan"), None)  # fmt: skip
    assert list(_order(chain, elsewhere)) == []
    # A range of destination ports (a DNAT to a port range before it) has no one value: every rule.
    wide = _Packet(2, 17, ip_address("10.0.1.2"), ip_address("198.18.0.1"), 4000, (20000, 20010), 0, 0, 0,
                   Ingress(2, "lan"), None)  # fmt: skip
    assert list(_order(chain, wide)) == list(range(1000))
    assert all(_rule_plan(r)[1] for r in forwards)


def test_a_hundred_source_subnets_reach_one_rule() -> None:
    """As above, indexed by address: a flow from 10.0.7.5 reaches the rule of 10.0.7.0/24 alone, one
    from 10.1.0.1 none (the run of 2026-12-03, fifth session: ``address_value`` reading every
    address as 0, which made every address rule a candidate, survived)."""
    base = int(ip_address("10.0.0.0"))
    lan = Match(sel(Key.IIFNAME), Op.EQ, NameSet(frozenset({"lan"})), 'iifname "lan"')  # the same in every rule
    rules = [Rule(i, (lan, Match(sel(Key.SADDR, family=2), Op.EQ, ints((base + 256 * i, base + 256 * i + 255), version=4),
                                 f"ip saddr 10.0.{i}.0/24"), Verdict(VerdictKind.ACCEPT)))
             for i in range(100)]  # fmt: skip
    chain = Chain("ip", "t", "pre", tuple(rules))

    def source(address: str) -> _Packet:
        return _Packet(2, 17, ip_address(address), ip_address("198.18.0.1"), 4000, (53, 53), 0, 0, 0,
                       Ingress(2, "lan"), None)  # fmt: skip

    assert list(_order(chain, source("10.0.7.5"))) == [7]
    assert list(_order(chain, source("10.1.0.1"))) == []


def test_index_rules_builds_each_long_chains_index_before_the_first_prediction() -> None:
    """The daemon's warm-up builds them before "ready" (the startup sweep's first prediction
    would otherwise pay about 0.1 s per 2,000-rule chain); a short chain gets none."""
    forwards = tuple(Rule(i, (Match(sel(Key.IIFNAME), Op.EQ, NameSet(frozenset({"up2"})), 'iifname "up2"'),
                              Match(sel(Key.DPORT, proto=17), Op.EQ, ints((20000 + i, 20000 + i)),
                                    f"udp dport {20000 + i}"), Verdict(VerdictKind.ACCEPT)))
                     for i in range(2 * ruleindex.MIN_INDEXED))  # fmt: skip
    long = Chain("ip", "t", "pre", forwards)
    short = Chain("ip", "t", "post", forwards[:3])
    rs = NatRuleset((long, short))
    evaluate._INDEXES.clear()
    evaluate.index_rules(rs)
    assert set(evaluate._INDEXES) == {id(long), id(short)}
    assert evaluate._INDEXES[id(long)][1] is not None and evaluate._INDEXES[id(short)][1] is None
    built = evaluate._INDEXES[id(long)][1]
    evaluate.index_rules(rs)  # once: the same index is kept
    assert evaluate._INDEXES[id(long)][1] is built


# --- the evaluator with and without the index ------------------------------------------------

IIFNAME, OIFNAME, MARK = {"meta": {"key": "iifname"}}, {"meta": {"key": "oifname"}}, {"meta": {"key": "mark"}}
NFT_GUARDS = [
    m(IIFNAME, "up1"), m(IIFNAME, "lan"), m(IIFNAME, "lan", "!="), m(OIFNAME, "up1"), m(OIFNAME, "up2"),
    m(payload("ip", "saddr"), pfx("10.0.1.0", 26)), m(payload("ip", "saddr"), "10.0.1.2"),
    m(payload("ip", "saddr"), "10.0.1.70"), m(payload("ip6", "saddr"), "fd00:1::2"),
    m(payload("ip", "daddr"), "192.0.2.10"), m(payload("ip", "daddr"), pfx("192.0.2.0", 24), "!="),
    m(payload("udp", "dport"), 53), m(payload("udp", "dport"), 5060), m(payload("tcp", "dport"), 80),
    m(payload("udp", "dport"), rng(5000, 5100)), m(payload("th", "dport"), 53),
    m(payload("udp", "dport"), sset(53, 123)), m(MARK, 1), m(MARK, 2), m({"&": [MARK, 0xF0]}, 0x10),
    m({"meta": {"key": "l4proto"}}, "udp"),
]
NFT_KEYS = [  # guards by the key they read
    [m(IIFNAME, "up1"), m(IIFNAME, "lan"), m(IIFNAME, "up2")],
    [m(OIFNAME, "up1"), m(OIFNAME, "up2")],
    [m(payload("ip", "saddr"), pfx("10.0.1.0", 26)), m(payload("ip", "saddr"), "10.0.1.2"),
     m(payload("ip", "saddr"), "10.0.1.70"), m(payload("ip6", "saddr"), "fd00:1::2"),
     m(payload("ip", "saddr"), "192.0.2.50")],
    [m(payload("udp", "dport"), 53), m(payload("udp", "dport"), 5060), m(payload("tcp", "dport"), 80),
     m(payload("udp", "dport"), rng(5000, 5100)), m(payload("th", "dport"), 53), m(payload("udp", "dport"), 5050)],
    [m(MARK, 0), m(MARK, 1), m(MARK, 2), m(MARK, 0x12)],
]
NAT_ENDS = [
    [MASQ], [{"snat": {"family": "ip", "addr": "203.0.113.9"}}], [{"snat": {"family": "ip6", "addr": "2001:db8:1::9"}}],
    [{"dnat": {"family": "ip", "addr": "10.0.1.50", "port": 8000}}], [{"dnat": {"family": "ip", "addr": "10.0.1.51"}}],
    [{"accept": None}], [{"return": None}], [{"counter": None}], [{"jump": {"target": "sub"}}],
]
MARK_ENDS = [[{"mangle": {"key": MARK, "value": v}}] for v in (1, 2, 0x12)] + [[{"accept": None}], [{"counter": None}]]


def rules_of(draw: st.DrawFn, ends: list[list[dict[str, Any]]], *, jumps: bool = True) -> list[list[dict[str, Any]]]:
    """32-48 rules, most opening with a match on one key of the chain's (so that the index is built)."""
    count = draw(st.integers(32, 48))
    main = draw(st.sampled_from(NFT_KEYS))
    out = []
    for _ in range(count):
        guards = draw(st.lists(st.sampled_from(NFT_GUARDS), min_size=0, max_size=2))
        if draw(st.integers(0, 9)):
            guards.insert(0, draw(st.sampled_from(main)))
        end = draw(st.sampled_from(ends if jumps else [e for e in ends if "jump" not in e[0]]))
        out.append([*guards, *end])
    return out


@st.composite
def rulesets(draw: st.DrawFn) -> NatRuleset:
    items: list[dict[str, Any]] = [{"table": {"family": "inet", "name": "t", "handle": 1}}]
    chains = [("pre", {"type": "nat", "hook": "prerouting", "prio": -100}, rules_of(draw, NAT_ENDS)),
              ("post", {"type": "nat", "hook": "postrouting", "prio": 100}, rules_of(draw, NAT_ENDS)),
              ("sub", {}, rules_of(draw, NAT_ENDS, jumps=False))]  # fmt: skip
    if draw(st.booleans()):
        chains.append(("marks", {"type": "filter", "hook": "prerouting", "prio": -150}, rules_of(draw, MARK_ENDS)))
    handle = 10
    for name, base, rules in chains:
        body: dict[str, Any] = {"family": "inet", "table": "t", "name": name, "handle": 2}
        if base:
            body.update(base, policy="accept")
        items.append({"chain": body})
        for exprs in rules:
            handle += 1
            items.append({"rule": {"family": "inet", "table": "t", "chain": name, "handle": handle, "expr": exprs}})
    return parse_ruleset_json({"nftables": items})


FLOWS = [
    Flow(2, 17, ip_address("10.0.1.2"), ip_address("192.0.2.10"), 5060, 53),
    Flow(2, 17, ip_address("10.0.1.70"), ip_address("198.51.100.9"), 5060, 5060),
    Flow(2, 6, ip_address("10.0.1.2"), ip_address("192.0.2.10"), 40000, 80),
    Flow(2, 17, ip_address("192.0.2.50"), ip_address("203.0.113.2"), 4000, 5050),
    Flow(2, 1, ip_address("10.0.1.2"), ip_address("192.0.2.10"), 7, 8 << 8),
    Flow(10, 17, ip_address("fd00:1::2"), ip_address("2001:db8:ffff::10"), 5060, 53),
]


@settings(max_examples=150, deadline=None)
@given(rs=rulesets(), flow=st.sampled_from(FLOWS))
def test_chains_run_through_the_index_predict_as_run_rule_by_rule(rs: NatRuleset, flow: Flow) -> None:
    with_index = predict(rs, FIB, flow)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate, "_chain_index", lambda chain: None)
        without = predict(rs, FIB, flow)
    assert with_index == without


def test_a_mark_set_mid_chain_reads_the_candidates_again() -> None:
    """A mark chain indexed by the mark: the first rule sets mark 1, the last turns mark 1 into 2, and
    a NAT rule reads mark 2. Candidates read for mark 0 alone would skip the last rule."""
    marks = [[m(MARK, 0), {"mangle": {"key": MARK, "value": 1}}]]
    marks += [[m(MARK, 100 + i), {"mangle": {"key": MARK, "value": 7}}] for i in range(40)]
    marks += [[m(MARK, 1), {"mangle": {"key": MARK, "value": 2}}]]
    items: list[dict[str, Any]] = [
        {"table": {"family": "inet", "name": "t", "handle": 1}},
        {"chain": {"family": "inet", "table": "t", "name": "marks", "handle": 2, "type": "filter",
                   "hook": "prerouting", "prio": -150, "policy": "accept"}},
        {"chain": {"family": "inet", "table": "t", "name": "post", "handle": 3, "type": "nat",
                   "hook": "postrouting", "prio": 100, "policy": "accept"}},
    ]  # fmt: skip
    for handle, exprs in enumerate(marks, start=10):
        items.append({"rule": {"family": "inet", "table": "t", "chain": "marks", "handle": handle, "expr": exprs}})
    items.append({"rule": {"family": "inet", "table": "t", "chain": "post", "handle": 99,
                           "expr": [m(MARK, 2), {"snat": {"family": "ip", "addr": "203.0.113.9"}}]}})  # fmt: skip
    rs = parse_ruleset_json({"nftables": items})
    assert evaluate._chain_index(next(c for c in rs.chains if c.name == "marks")) is not None
    p = predict(rs, FIB, FLOWS[0])
    assert not isinstance(p.snat, Unknown)
    assert {str(b.addr_lo) for b in p.snat} == {"203.0.113.9"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate, "_chain_index", lambda chain: None)
        assert predict(rs, FIB, FLOWS[0]) == p


# --- the index's own choices, worked out by hand -------------------------------------------------
# (the run of 2026-12-03, sixth session: under mutmut the property tests above try 20 examples, and
# no test read ``build``'s key, ``always``, ``indexed``, the span limit or a group's bounds directly)


def dport(lo: int, hi: int | None = None, proto: int | None = 17) -> Match:
    hi = lo if hi is None else hi
    return Match(sel(Key.DPORT, proto=proto), Op.EQ, ints((lo, hi)), f"dport {lo}-{hi}")


def iifname(*names: str, prefix: str | None = None) -> Match:
    values = NameSet(frozenset(names), frozenset({prefix}) if prefix else frozenset())
    return Match(sel(Key.IIFNAME), Op.EQ, values, f"iifname {names} {prefix}")


def test_which_matches_are_indexable() -> None:
    cases = [
        (dport(53), True),
        (Match(sel(Key.DPORT, proto=17), Op.NE, ints((53, 53)), "udp dport != 53"), False),
        (Match(sel(Key.MARK, mask=0xF0), Op.EQ, ints((0x10, 0x10)), "meta mark & 0xf0 == 0x10"), False),
        (Match(sel(Key.MARK), Op.EQ, ints((1, 1)), "meta mark 1"), True),
        (Match(sel(Key.MARK), Op.EQ, ints((1, 1), version=4), "a mark set read as v4"), False),
        (Match(sel(Key.NUMGEN), Op.EQ, ints((0, 0)), "numgen inc mod 2 0"), False),
        (Match(sel(Key.IIF), Op.EQ, NameSet(frozenset({"up2"})), 'iif "up2"'), False),
        (iifname("up2"), True),
        (iifname("up2", prefix="eth"), False),
        (Match(sel(Key.IIFNAME), Op.EQ, NameSet(frozenset({"up2"}), indexes=frozenset({4})), "with an index"), False),
        (Match(sel(Key.SADDR, family=2), Op.EQ, ints((V4, V4), version=4), "ip saddr 10.0.1.0"), True),
        (Match(sel(Key.SADDR, family=10), Op.EQ, ints((V6, V6), version=6), "ip6 saddr fd00:1::"), True),
        (Match(sel(Key.DADDR), Op.EQ, ints((V4, V4)), "an address set without a version"), False),
    ]
    assert [ruleindex.indexable(match) for match, _ in cases] == [want for _, want in cases]


def test_a_chain_needs_thirty_two_indexed_rules_and_passive_ones_do_not_count() -> None:
    assert ruleindex.build([(False, (dport(1000 + i),)) for i in range(31)]) is None
    assert ruleindex.build([(True, (dport(999),))] + [(False, (dport(1000 + i),)) for i in range(31)]) is None
    assert ruleindex.build([(False, ())] * 40) is None  # nothing indexable
    index = ruleindex.build([(True, (dport(999),))] + [(False, (dport(1000 + i),)) for i in range(32)])
    assert index is not None
    assert (index.key, index.always, index.indexed) == (Key.DPORT, (), 32)
    assert list(index.candidates(2, 17, 1000)) == [1]
    assert list(index.candidates(2, 17, 1031)) == [32]
    assert list(index.candidates(2, 17, 999)) == []  # the passive rule is never reached


def test_the_key_is_the_one_most_rules_open_with_then_the_one_with_more_value_sets_then_by_name() -> None:
    more = ruleindex.build([(False, (dport(1000 + i),)) for i in range(32)]
                           + [(False, (Match(sel(Key.MARK), Op.EQ, ints((i, i)), f"mark {i}"),)) for i in range(33)])  # fmt: skip
    assert more is not None and more.key is Key.MARK and more.always == tuple(range(32)) and more.indexed == 33
    distinct = ruleindex.build([(False, (iifname("up2"), dport(1000 + i))) for i in range(32)])
    assert distinct is not None and distinct.key is Key.DPORT
    sport = [Match(sel(Key.SPORT, proto=17), Op.EQ, ints((2000 + i, 2000 + i)), f"sport {i}") for i in range(32)]
    tie = ruleindex.build([(False, (dport(1000 + i), sport[i])) for i in range(32)])
    assert tie is not None and tie.key is Key.SPORT  # "sport" > "dport"
    assert list(tie.candidates(2, 17, 2005)) == [5]
    # Two matches on the key in one rule: indexed by the first (the rule is reached where it holds).
    twice = ruleindex.build([(False, (dport(1000 + i), dport(3000 + i))) for i in range(32)])
    assert twice is not None and twice.indexed == 32
    assert list(twice.candidates(2, 17, 1004)) == [4]
    assert list(twice.candidates(2, 17, 3004)) == []


def test_port_rules_by_protocol_span_and_gap() -> None:
    plans = [(False, (dport(1000 + i),)) for i in range(30)]  # 0-29: udp dport 1000..1029
    plans += [
        (False, (dport(1000, proto=6),)),  # 30: tcp dport 1000
        (False, (dport(1000, proto=None),)),  # 31: th dport 1000
        (False, (dport(1000, 1016),)),  # 32: 17 of the udp group's segments: not indexed
        (False, (dport(1000, 1015),)),  # 33: 16 segments: indexed
        (True, (dport(1000),)),  # 34: passive
        (False, (Match(sel(Key.DPORT, proto=17), Op.NE, ints((1000, 1000)), "udp dport != 1000"),)),  # 35
        (False, (dport(2000),)),  # 36: after a gap 1030..1999
    ]
    index = ruleindex.build(plans)
    assert index is not None
    assert (index.key, index.always, index.indexed) == (Key.DPORT, (32, 35), 34)
    expected = {
        (17, 1000): [0, 31, 32, 33, 35],
        (6, 1000): [30, 31, 32, 35],
        (1, 1000): [31, 32, 35],  # neither the udp nor the tcp group: the th rule
        (17, 1015): [15, 32, 33, 35],
        (17, 1016): [16, 32, 35],
        (17, 1029): [29, 32, 35],
        (17, 1030): [32, 35],
        (17, 1500): [32, 35],
        (17, 1999): [32, 35],
        (17, 2000): [32, 35, 36],
        (17, 2001): [32, 35],
        (17, 999): [32, 35],
        (6, 1001): [32, 35],
    }
    assert {k: list(index.candidates(2, *k)) for k in expected} == expected
    assert list(index.candidates(2, 17, "up2")) == [32, 35]  # a name is no port


def test_interface_names_and_addresses_by_family() -> None:
    plans = [(False, (iifname(f"if{i}"),)) for i in range(32)]
    plans += [(False, (iifname("if0", "lan"),)), (False, (iifname(prefix="up"),)), (False, (dport(53),))]
    index = ruleindex.build(plans)
    assert index is not None
    assert (index.key, index.always, index.indexed) == (Key.IIFNAME, (33, 34), 33)
    assert list(index.candidates(2, 17, "if0")) == [0, 32, 33, 34]
    assert list(index.candidates(10, 6, "if7")) == [7, 33, 34]
    assert list(index.candidates(2, 17, "lan")) == [32, 33, 34]
    assert list(index.candidates(2, 17, "eth9")) == [33, 34]
    assert list(index.candidates(2, 17, 7)) == [33, 34]  # a number is no name

    base = int(ip_address("10.0.0.0"))
    v4 = [(False, (Match(sel(Key.SADDR, family=2), Op.EQ, ints((base + 256 * i, base + 256 * i + 255), version=4),
                         f"ip saddr 10.0.{i}.0/24"),)) for i in range(32)]  # fmt: skip
    v6 = (False, (Match(sel(Key.SADDR, family=10), Op.EQ, ints((0, 2**64 - 1), version=6), "ip6 saddr ::/64"),))
    index = ruleindex.build([*v4, v6])
    assert index is not None and index.key is Key.SADDR and index.indexed == 33
    # 10.0.3.9 is 0x0a000309; the version sits above the 128 address bits.
    assert list(index.candidates(2, 6, (4 << 128) | 0x0A000309)) == [3]
    assert list(index.candidates(2, 6, 0x0A000309)) == []  # without its version: no v4 rule holds it
    assert list(index.candidates(10, 6, (6 << 128) | 0x0A000309)) == [32]  # ::10.0.3.9 is in ::/64
    assert list(index.candidates(10, 6, (6 << 128) | (1 << 64))) == []  # 0:0:0:1:: is not


def test_a_protocol_rule_of_one_family_is_no_candidate_for_the_other() -> None:
    """``ip protocol`` and ``ip6 nexthdr`` carry their family: an IPv6 UDP packet does not reach the
    ``ip protocol udp`` rules (the sixth run: every interval group built for any family survived)."""

    def proto(family: int, number: int) -> Match:
        return Match(sel(Key.L4PROTO, family=family), Op.EQ, ints((number, number)), f"{family} proto {number}")

    plans = [(False, (proto(2, 17 if i % 2 else 6),)) for i in range(16)]  # 0-15: v4, odd ones udp
    plans += [(False, (proto(10, 17 if i % 2 else 6),)) for i in range(16)]  # 16-31: v6, odd ones udp
    index = ruleindex.build(plans)
    assert index is not None and index.key is Key.L4PROTO and index.always == ()
    assert list(index.candidates(10, 17, 17)) == [17, 19, 21, 23, 25, 27, 29, 31]
    assert list(index.candidates(2, 6, 6)) == [0, 2, 4, 6, 8, 10, 12, 14]
