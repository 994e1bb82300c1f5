"""nftables breadth in the evaluator: maps, verdict maps, concatenations, fib, ct, numgen, marks, v6.

Rulesets are nft JSON (what ``nft -j list ruleset`` prints), read by the real
reader and evaluated against the real FIB over a small gateway topology:

    lan  (2) 10.0.1.1/24  fd00:1::1/64      clients
    up1  (3) 203.0.113.2/24  2001:db8:1::2/64   default routes
    up2  (4) 198.51.100.2/24
"""

from __future__ import annotations

from ipaddress import ip_address, ip_network
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topowatch.core.evaluate import predict
from topowatch.core.fib import Fib
from topowatch.core.flow import IPPROTO_UDP, NO_NAT, Binding, Flow, NatKind, Prediction, Unknown
from topowatch.core.model import AF_INET, AF_INET6, Address, Link, Nexthop, Route, Topology
from topowatch.core.nat import NatRuleset
from topowatch.edges.nft import parse_ruleset_json

LO, LAN, UP1, UP2 = 1, 2, 3, 4
TOPOLOGY = Topology(
    links=(Link(LO, "lo"), Link(LAN, "lan"), Link(UP1, "up1"), Link(UP2, "up2")),
    addresses=(
        Address(LO, ip_address("127.0.0.1"), 8, scope=254),
        Address(LAN, ip_address("10.0.1.1"), 24),
        Address(LAN, ip_address("fd00:1::1"), 64),
        Address(UP1, ip_address("203.0.113.2"), 24),
        Address(UP1, ip_address("2001:db8:1::2"), 64),
        Address(UP2, ip_address("198.51.100.2"), 24),
    ),
    routes=(
        Route(ip_network("10.0.1.0/24"), nexthops=(Nexthop(LAN),)),
        Route(ip_network("203.0.113.0/24"), nexthops=(Nexthop(UP1),)),
        Route(ip_network("198.51.100.0/24"), nexthops=(Nexthop(UP2),)),
        Route(ip_network("0.0.0.0/0"), nexthops=(Nexthop(UP1, ip_address("203.0.113.1")),)),
        Route(ip_network("fd00:1::/64"), nexthops=(Nexthop(LAN),)),
        Route(ip_network("2001:db8:1::/64"), nexthops=(Nexthop(UP1),)),
        Route(ip_network("::/0"), nexthops=(Nexthop(UP1, ip_address("2001:db8:1::1")),)),
    ),
)
FIB = Fib(TOPOLOGY)


def udp(src: str = "10.0.1.2", dst: str = "192.0.2.10", sport: int = 5060, dport: int = 5060,
        **kw: Any) -> Flow:
    s, d = ip_address(src), ip_address(dst)
    return Flow(AF_INET if s.version == 4 else AF_INET6, IPPROTO_UDP, s, d, sport, dport, **kw)


V6 = udp("fd00:1::2", "2001:db8:ffff::10")


# -- nft JSON builders ------------------------------------------------------------------

def payload(proto: str, field: str) -> dict[str, Any]:
    return {"payload": {"protocol": proto, "field": field}}


def m(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def cat(*parts: Any) -> dict[str, Any]:
    return {"concat": list(parts)}


def sset(*items: Any) -> dict[str, Any]:
    return {"set": list(items)}


def rng(lo: Any, hi: Any) -> dict[str, Any]:
    return {"range": [lo, hi]}


def pfx(addr: str, length: int) -> dict[str, Any]:
    return {"prefix": {"addr": addr, "len": length}}


def mapping(key: Any, data: Any) -> dict[str, Any]:
    return {"map": {"key": key, "data": data}}


FIB_DADDR_TYPE = {"fib": {"flags": ["daddr"], "result": "type"}}
FIB_DADDR_IIF_TYPE = {"fib": {"flags": ["daddr", "iif"], "result": "type"}}
FIB_RPF = {"fib": {"flags": ["saddr", "iif"], "result": "oif"}}
NUMGEN2 = {"numgen": {"mode": "inc", "mod": 2, "offset": 0}}
CT = {"ct": {"key": "state"}}
MASQ = {"masquerade": None}
ACCEPT = {"accept": None}
DROP = {"drop": None}


def ruleset(*chains: tuple[str, str, list[list[dict[str, Any]]]], family: str = "inet",
            sets: tuple[dict[str, Any], ...] = ()) -> NatRuleset:
    items: list[dict[str, Any]] = [{"table": {"family": family, "name": "t", "handle": 1}}]
    handle = 10
    for name, hook, rules in chains:
        body: dict[str, Any] = {"family": family, "table": "t", "name": name, "handle": 2}
        if hook:
            body.update(type="nat", hook=hook, prio=100 if hook == "postrouting" else -100, policy="accept")
        items.append({"chain": body})
        for exprs in rules:
            handle += 1
            items.append({"rule": {"family": family, "table": "t", "chain": name, "handle": handle,
                                   "expr": exprs}})
    for s in sets:
        items.append({"map" if "map" in s else "set": {"family": family, "table": "t", **s}})
    return parse_ruleset_json({"nftables": items})


def post(*rules: list[dict[str, Any]]) -> tuple[str, str, list[list[dict[str, Any]]]]:
    return ("post", "postrouting", list(rules))


def pre(*rules: list[dict[str, Any]]) -> tuple[str, str, list[list[dict[str, Any]]]]:
    return ("pre", "prerouting", list(rules))


def chain(name: str, *rules: list[dict[str, Any]]) -> tuple[str, str, list[list[dict[str, Any]]]]:
    return (name, "", list(rules))


def B(kind: NatKind, lo: str, hi: str | None = None, ports: tuple[int, int] | None = None) -> Binding:
    p = ports or (None, None)
    return Binding(kind, ip_address(lo), ip_address(hi or lo), *p)


MASQ_UP1 = B(NatKind.MASQUERADE, "203.0.113.2")

# -- table: (name, ruleset, flow, expected dnat, expected snat); a str expects Unknown with that text --

Expected = set[Binding] | str
CASES: list[tuple[str, NatRuleset, Flow, Expected, Expected]] = [
    # verdict maps
    ("vmap jumps to the chain that masquerades",
     ruleset(post([{"vmap": {"key": {"meta": {"key": "oifname"}}, "data": sset(["up1", {"jump": {"target": "m"}}])}}]),
             chain("m", [MASQ])),
     udp(), {NO_NAT}, {MASQ_UP1}),
    ("vmap miss ends the rule, the next one runs",
     ruleset(post([{"vmap": {"key": {"meta": {"key": "oifname"}}, "data": sset(["up2", ACCEPT])}}], [MASQ])),
     udp(), {NO_NAT}, {MASQ_UP1}),
    ("vmap drop drops the flow",
     ruleset(post([{"vmap": {"key": payload("udp", "dport"), "data": sset([rng(5000, 6000), DROP])}}], [MASQ])),
     udp(), {NO_NAT}, set()),
    ("vmap on numgen with one verdict either way is decided",
     ruleset(post([{"vmap": {"key": NUMGEN2, "data": sset([0, {"jump": {"target": "m"}}],
                                                           [1, {"jump": {"target": "m"}}])}}]),
             chain("m", [MASQ])),
     udp(), {NO_NAT}, {MASQ_UP1}),
    ("vmap on numgen with different verdicts is unknown",
     ruleset(post([{"vmap": {"key": NUMGEN2, "data": sset([0, ACCEPT], [1, {"jump": {"target": "m"}}])}}]),
             chain("m", [MASQ])),
     udp(), {NO_NAT}, "numgen inc mod 2 is any of 0-1"),
    # concatenations, anonymous and named, with intervals
    ("concat set hit",
     ruleset(post([m(cat(payload("ip", "saddr"), payload("udp", "dport")),
                     sset(cat(pfx("10.0.1.0", 24), rng(5000, 6000)))), MASQ])),
     udp(), {NO_NAT}, {MASQ_UP1}),
    ("concat set miss on one component",
     ruleset(post([m(cat(payload("ip", "saddr"), payload("udp", "dport")),
                     sset(cat(pfx("10.0.1.0", 24), 53))), MASQ])),
     udp(), {NO_NAT}, {NO_NAT}),
    ("concat set != ",
     ruleset(post([m(cat(payload("ip", "saddr"), payload("udp", "dport")),
                     sset(cat("10.0.1.9", 5060)), "!="), MASQ])),
     udp(), {NO_NAT}, {MASQ_UP1}),
    ("named concat interval set",
     ruleset(post([m(cat({"meta": {"key": "iifname"}}, payload("ip", "saddr")), "@lan"), MASQ]),
             sets=({"name": "lan", "type": ["ifname", "ipv4_addr"], "flags": ["interval"],
                    "elem": [cat("lan", rng("10.0.1.1", "10.0.1.99"))]},)),
     udp(), {NO_NAT}, {MASQ_UP1}),
    ("dynamic named set stays unknown",
     ruleset(post([m(payload("ip", "saddr"), "@dyn"), ACCEPT], [MASQ]),
             sets=({"name": "dyn", "type": "ipv4_addr", "flags": ["dynamic"], "elem": ["10.0.1.2"]},)),
     udp(), {NO_NAT}, "dynamic set @dyn"),
    # NAT maps
    ("dnat to ip daddr map",
     ruleset(pre([{"dnat": {"family": "ip", "addr": mapping(payload("ip", "daddr"), sset(["192.0.2.10", "10.0.1.50"]))}}])),
     udp(), {B(NatKind.DNAT, "10.0.1.50")}, {NO_NAT}),
    ("dnat map miss: no NAT from that rule",
     ruleset(pre([{"dnat": {"family": "ip", "addr": mapping(payload("ip", "daddr"), sset(["192.0.2.99", "10.0.1.50"]))}}])),
     udp(), {NO_NAT}, {NO_NAT}),
    ("snat ip to ip saddr map with an address range",
     ruleset(post([{"snat": {"family": "ip", "addr": mapping(payload("ip", "saddr"),
                                                            sset([pfx("10.0.1.0", 24), rng("198.51.100.2", "198.51.100.4")]))}}])),
     udp(), {NO_NAT}, {B(NatKind.SNAT, "198.51.100.2", "198.51.100.4")}),
    ("dnat ip to saddr . dport map to addr . port range",
     ruleset(pre([{"dnat": {"family": "ip", "addr": mapping(cat(payload("ip", "saddr"), payload("udp", "dport")),
                                                           sset([cat("10.0.1.2", 5060), cat("10.0.1.60", rng(8000, 8999))]))}}])),
     udp(), {B(NatKind.DNAT, "10.0.1.60", ports=(8000, 8999))}, {NO_NAT}),
    ("named nat map",
     ruleset(pre([{"dnat": {"family": "ip", "addr": mapping(payload("ip", "daddr"), "@x")}}]),
             sets=({"name": "x", "type": "ipv4_addr", "map": "ipv4_addr", "elem": [["192.0.2.10", "10.0.1.7"]]},)),
     udp(), {B(NatKind.DNAT, "10.0.1.7")}, {NO_NAT}),
    ("dnat to numgen map: every reachable address",
     ruleset(pre([{"dnat": {"family": "ip", "addr": mapping(NUMGEN2, sset([0, "10.0.1.50"], [1, "10.0.1.51"]))}}])),
     udp(), {B(NatKind.DNAT, "10.0.1.50"), B(NatKind.DNAT, "10.0.1.51")}, {NO_NAT}),
    ("dnat to jhash map: every reachable address",
     ruleset(pre([{"dnat": {"family": "ip", "addr": mapping(
         {"jhash": {"expr": payload("ip", "saddr"), "mod": 2, "seed": 3}},
         sset([0, "10.0.1.50"], [1, "10.0.1.51"]))}}])),
     udp(), {B(NatKind.DNAT, "10.0.1.50"), B(NatKind.DNAT, "10.0.1.51")}, {NO_NAT}),
    ("dnat to numgen map that may miss is unknown",
     ruleset(pre([{"dnat": {"family": "ip", "addr": mapping({"numgen": {"mode": "inc", "mod": 3}},
                                                           sset([0, "10.0.1.50"], [1, "10.0.1.51"]))}}])),
     udp(), "may miss the map", "may miss the map"),
    ("dnat to numgen offset: an address range",
     ruleset(pre([{"dnat": {"family": "ip", "addr": {"numgen": {"mode": "inc", "mod": 4, "offset": 167772466}}}}])),
     udp(), {B(NatKind.DNAT, "10.0.1.50", "10.0.1.53")}, {NO_NAT}),
    # fib
    ("fib daddr type local: a flow to our address is DNATed",
     ruleset(pre([m(FIB_DADDR_TYPE, "local"), {"dnat": {"family": "ip", "addr": "10.0.1.50"}}])),
     udp(dst="203.0.113.2"), {B(NatKind.DNAT, "10.0.1.50")}, {NO_NAT}),
    ("fib daddr type local: a flow to elsewhere is not",
     ruleset(pre([m(FIB_DADDR_TYPE, "local"), {"dnat": {"family": "ip", "addr": "10.0.1.50"}}])),
     udp(), {NO_NAT}, {NO_NAT}),
    ("fib daddr . iif type local: the address lives on another interface",
     ruleset(pre([m(FIB_DADDR_IIF_TYPE, "local"), {"dnat": {"family": "ip", "addr": "10.0.1.50"}}])),
     udp(dst="203.0.113.2"), {NO_NAT}, {NO_NAT}),
    ("fib daddr type in a set (v6 local)",
     ruleset(pre([m(FIB_DADDR_TYPE, sset("local", "broadcast")), {"dnat": {"family": "ip6", "addr": "fd00:1::50"}}])),
     udp("fd00:1::2", "2001:db8:1::2"), {B(NatKind.DNAT, "fd00:1::50")}, {NO_NAT}),
    ("fib saddr . iif oif missing drop: the reverse path exists",
     ruleset(post([m(FIB_RPF, False), DROP], [MASQ])), udp(), {NO_NAT}, {MASQ_UP1}),
    ("fib saddr . iif oifname",
     ruleset(pre([m({"fib": {"flags": ["saddr", "iif"], "result": "oifname"}}, "lan"),
                  {"dnat": {"family": "ip", "addr": "10.0.1.50"}}])),
     udp(), {B(NatKind.DNAT, "10.0.1.50")}, {NO_NAT}),
    # ct
    ("ct state new is true in nat chains", ruleset(post([m(CT, "new", "in"), MASQ])), udp(), {NO_NAT}, {MASQ_UP1}),
    ("ct state established is false", ruleset(post([m(CT, "established", "in"), DROP], [MASQ])),
     udp(), {NO_NAT}, {MASQ_UP1}),
    ("ct status dnat after a DNAT",
     ruleset(pre([{"dnat": {"family": "ip", "addr": "198.51.100.9"}}]),
             post([m({"ct": {"key": "status"}}, "dnat", "in"), MASQ])),
     udp(), {B(NatKind.DNAT, "198.51.100.9")}, {B(NatKind.MASQUERADE, "198.51.100.2")}),
    ("ct status dnat without a DNAT",
     ruleset(post([m({"ct": {"key": "status"}}, "dnat", "in"), MASQ])), udp(), {NO_NAT}, {NO_NAT}),
    # A DNAT whose range holds the destination may keep it (no DST_NAT bit): ct status dnat is unknown.
    *[(f"ct status dnat after a DNAT to a range holding {dst}",
       ruleset(pre([{"dnat": {"family": "ip", "addr": rng("192.0.2.1", "192.0.2.20")}}]),
               post([m({"ct": {"key": "status"}}, "dnat", "in"), MASQ])),
       udp(dst=dst), {B(NatKind.DNAT, "192.0.2.1", "192.0.2.20")}, "ct status dst_nat of the flow's first packet")
      for dst in ("192.0.2.1", "192.0.2.10", "192.0.2.20")],
    *[(f"ct status dnat after a DNAT to a range without {dst}",
       ruleset(pre([{"dnat": {"family": "ip", "addr": rng("192.0.2.1", "192.0.2.20")}}]),
               post([m({"ct": {"key": "status"}}, "dnat", "in"), MASQ])),
       udp(dst=dst), {B(NatKind.DNAT, "192.0.2.1", "192.0.2.20")}, {MASQ_UP1})
      for dst in ("192.0.2.0", "192.0.2.21")],
    *[(f"ct status dnat after a DNAT to the same address, ports holding {dport}",
       ruleset(pre([{"dnat": {"family": "ip", "addr": "192.0.2.10", "port": rng(5000, 5100)}}]),
               post([m({"ct": {"key": "status"}}, "dnat", "in"), MASQ])),
       udp(dport=dport), {B(NatKind.DNAT, "192.0.2.10", ports=(5000, 5100))},
       "ct status dst_nat of the flow's first packet") for dport in (5000, 5060, 5100)],
    *[(f"ct status dnat after a DNAT to the same address, ports without {dport}",
       ruleset(pre([{"dnat": {"family": "ip", "addr": "192.0.2.10", "port": rng(5000, 5100)}}]),
               post([m({"ct": {"key": "status"}}, "dnat", "in"), MASQ])),
       udp(dport=dport), {B(NatKind.DNAT, "192.0.2.10", ports=(5000, 5100))}, {MASQ_UP1})
      for dport in (4999, 5101)],
    ("ct status ! snat", ruleset(post([m({"ct": {"key": "status"}}, "snat", "!"), MASQ])), udp(), {NO_NAT},
     {MASQ_UP1}),
    ("ct status expected is unknown", ruleset(post([m({"ct": {"key": "status"}}, "expected", "in"), ACCEPT], [MASQ])),
     udp(), {NO_NAT}, "EXPECTED"),
    ("ct mark 0", ruleset(post([m({"ct": {"key": "mark"}}, 0), MASQ])), udp(ct_mark=0), {NO_NAT}, {MASQ_UP1}),
    # A whole ruleset: a fresh flow's ct mark is 0 at NAT time, whatever the entry's is now.
    ("ct mark of an entry, 0 for a fresh flow", ruleset(post([m({"ct": {"key": "mark"}}, 16), MASQ])),
     udp(ct_mark=16), {NO_NAT}, {NO_NAT}),
    ("ct zone", ruleset(post([m({"ct": {"key": "zone"}}, 3), MASQ])), udp(zone=2), {NO_NAT}, {NO_NAT}),
    # mark set: later matches see it
    ("meta mark set, then meta mark matches",
     ruleset(post([{"mangle": {"key": {"meta": {"key": "mark"}}, "value": 5}}],
                  [m({"meta": {"key": "mark"}}, 5), MASQ])),
     udp(), {NO_NAT}, {MASQ_UP1}),
    ("ct mark set, then ct mark matches",
     ruleset(post([{"mangle": {"key": {"ct": {"key": "mark"}}, "value": "0x7"}}],
                  [m({"ct": {"key": "mark"}}, 7), MASQ])),
     udp(), {NO_NAT}, {MASQ_UP1}),
    ("mark set to something not modelled is unknown",
     ruleset(post([{"mangle": {"key": {"ct": {"key": "mark"}}, "value": NUMGEN2}}], [MASQ])),
     udp(), {NO_NAT}, "mangle"),
    # flags and inet
    ("masquerade random,persistent,fully-random keeps the address set",
     ruleset(post([{"masquerade": {"flags": ["random", "persistent", "fully-random"]}}])),
     udp(), {NO_NAT}, {MASQ_UP1}),
    ("snat ip in inet skipped for v6; v6 masquerade picks the v6 source",
     ruleset(post([{"snat": {"family": "ip", "addr": "203.0.113.2"}}], [MASQ])),
     V6, {NO_NAT}, {B(NatKind.MASQUERADE, "2001:db8:1::2")}),
    ("snat ip6 to an address",
     ruleset(post([{"snat": {"family": "ip6", "addr": "2001:db8:1::99"}}])), V6, {NO_NAT},
     {B(NatKind.SNAT, "2001:db8:1::99")}),
    ("dnat ip6 to [addr]:port",
     ruleset(pre([{"dnat": {"family": "ip6", "addr": "fd00:1::50", "port": 8080}}])), V6,
     {B(NatKind.DNAT, "fd00:1::50", ports=(8080, 8080))}, {NO_NAT}),
    ("NPTv6: snat ip6 prefix to ip6 saddr map keeps the host bits",
     ruleset(post([{"snat": {"family": "ip6", "addr": mapping(payload("ip6", "saddr"),
                                                             sset([pfx("fd00:1::", 64), pfx("2001:db8:1::", 64)])),
                             "flags": "netmap", "type_flags": ["interval", "prefix"]}}])),
     V6, {NO_NAT}, {B(NatKind.SNAT, "2001:db8:1::2")}),
    ("snat prefix (v4 netmap)",
     ruleset(post([{"snat": {"family": "ip", "addr": mapping(payload("ip", "saddr"),
                                                            sset([pfx("10.0.1.0", 24), pfx("198.51.100.0", 24)])),
                             "flags": "netmap", "type_flags": ["interval", "prefix"]}}])),
     udp(src="10.0.1.77"), {NO_NAT}, {B(NatKind.SNAT, "198.51.100.77")}),
]


def check(side: frozenset[Binding] | Unknown, expected: Expected, p: Prediction) -> None:
    if isinstance(expected, str):
        assert isinstance(side, Unknown), p
        assert expected in side.reason, side.reason
    else:
        assert side == frozenset(expected), p


@pytest.mark.parametrize(("rs", "flow", "dnat", "snat"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_breadth(rs: NatRuleset, flow: Flow, dnat: Expected, snat: Expected) -> None:
    p = predict(rs, FIB, flow)
    check(p.dnat, dnat, p)
    check(p.snat, snat, p)


def test_no_unknown_expressions_in_the_modelled_cases() -> None:
    for name, rs, *_ in CASES:
        if "unknown" not in name and "not modelled" not in name:
            assert not rs.unknown_expressions(), (name, rs.unknown_expressions())


def test_vmap_targets_are_reachable_chains() -> None:
    rs = ruleset(post([{"vmap": {"key": {"meta": {"key": "oifname"}},
                                 "data": sset(["up1", {"goto": {"target": "g"}}])}}]),
                 chain("g", [MASQ]), chain("unused", [MASQ]))
    assert {c.name for c in rs.chains} == {"post", "g"}


# -- properties: lookups against a brute-force reference ---------------------------------

PORT_INTERVALS = st.lists(st.tuples(st.integers(1, 2000), st.integers(0, 50)), min_size=0, max_size=6)


def disjoint(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, width in sorted(intervals):
        hi = lo + width
        if not out or lo > out[-1][1]:
            out.append((lo, hi))
    return out


@settings(max_examples=150, deadline=None)
@given(PORT_INTERVALS, st.integers(1, 2100))
def test_dnat_port_map_matches_reference(raw: list[tuple[int, int]], dport: int) -> None:
    intervals = disjoint(raw)
    targets = [f"10.0.1.{100 + i}" for i in range(len(intervals))]
    data = sset(*([rng(lo, hi) if lo != hi else lo, t] for (lo, hi), t in zip(intervals, targets, strict=True)))
    rs = ruleset(pre([{"dnat": {"family": "ip", "addr": mapping(payload("udp", "dport"), data)}}]))
    p = predict(rs, FIB, udp(dport=dport))
    expected = {NO_NAT}
    for (lo, hi), t in zip(intervals, targets, strict=True):
        if lo <= dport <= hi:
            expected = {B(NatKind.DNAT, t)}
    assert p.dnat == frozenset(expected)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.integers(5050, 5070)), max_size=8),
       st.integers(0, 255), st.integers(5050, 5070), st.booleans())
def test_concat_match_matches_reference(elements: list[tuple[int, int]], host: int, port: int,
                                        negate: bool) -> None:
    rs = ruleset(post([m(cat(payload("ip", "saddr"), payload("udp", "sport")),
                         sset(*(cat(f"10.0.1.{h}", p) for h, p in elements)), "!=" if negate else "=="),
                       MASQ]))
    hit = (host, port) in elements
    p = predict(rs, FIB, udp(src=f"10.0.1.{host}", sport=port))
    assert p.snat == frozenset({MASQ_UP1 if hit != negate else NO_NAT})


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 6), st.lists(st.integers(0, 7), min_size=1, max_size=8, unique=True))
def test_numgen_map_bindings_are_the_reachable_targets(mod: int, keys: list[int]) -> None:
    data = sset(*([k, f"10.0.1.{50 + k}"] for k in keys))
    rs = ruleset(pre([{"dnat": {"family": "ip", "addr": mapping(
        {"numgen": {"mode": "random", "mod": mod}}, data)}}]))
    p = predict(rs, FIB, udp())
    reached = {k for k in keys if k < mod}
    if not reached:
        assert p.dnat == frozenset({NO_NAT})
    elif reached == set(range(mod)):
        assert p.dnat == frozenset(B(NatKind.DNAT, f"10.0.1.{50 + k}") for k in reached)
    else:
        assert isinstance(p.dnat, Unknown)


def test_a_rule_that_only_matches_and_counts_never_makes_a_prediction_unknown() -> None:
    """`meta cpu 0 counter` (an unmodelled match, no effect) in front of the masquerade rule."""
    from test_evaluate import COUNTER, MASQ1, FakeFib, post, ruleset, udp

    unmodelled = {"xt": {"type": "match", "name": "cpu"}}
    rs = ruleset(post([unmodelled, COUNTER], [{"masquerade": None}]))
    assert predict(rs, FakeFib(), udp()).snat == frozenset({MASQ1})
    # With an effect (a verdict), the same unknown match keeps the prediction unknown.
    rs = ruleset(post([unmodelled, COUNTER, {"accept": None}], [{"masquerade": None}]))
    assert isinstance(predict(rs, FakeFib(), udp()).snat, Unknown)
