# SPDX-License-Identifier: GPL-2.0-or-later
"""NAT maps in the evaluator: which element binds, what a miss does, netmap, the statement's family.

The kernel's behaviour each expectation is worked from:

- ``nft_lookup_eval``: a key no element holds sets NFT_BREAK: the rule ends
  there, without NAT and without the rest of its expressions; the next rule
  runs (``dnat ... map { ... } accept`` with a miss does not accept).
- ``nft_nat_inet_eval``: in an inet chain a ``dnat ip``/``dnat ip6`` statement
  does nothing for a packet of the other family and the rule goes on.
- ``NF_NAT_RANGE_NETMAP`` (``dnat ip prefix to ... map``): the bits that vary
  across the target range come from the original address (the destination
  for DNAT, the source for SNAT), the others from the range; a port in the
  element's data is the binding's port.
- ``numgen inc mod N`` is any of 0..N-1: a map none of whose keys it reaches
  never binds, whichever value it takes.

Rulesets are nft JSON read by the real reader (or built by hand where nft
would refuse the statement), over the gateway of ``test_evaluate_breadth``.
"""

from __future__ import annotations

from ipaddress import ip_address

from test_evaluate_breadth import (
    ACCEPT,
    FIB,
    NUMGEN2,
    V6,
    B,
    cat,
    mapping,
    payload,
    pfx,
    pre,
    ruleset,
    sset,
    udp,
)

from topowatch.core.evaluate import predict
from topowatch.core.flow import NO_NAT, NatKind, Unknown
from topowatch.core.nat import (
    Chain,
    Hook,
    IntervalSet,
    Key,
    NatMapStatement,
    NatRuleset,
    NatTarget,
    Rule,
    Selector,
)


def dnat_map(key: object, *elements: list[object], family: str = "ip", **kw: object) -> dict[str, object]:
    return {"dnat": {"family": family, "addr": mapping(key, sset(*elements)), **kw}}


def netmap(*elements: list[object]) -> dict[str, object]:
    return dnat_map(payload("ip", "daddr"), *elements, flags="netmap", type_flags=["interval", "prefix"])


def test_a_prefix_dnat_map_keeps_the_destinations_host_bits() -> None:
    """192.0.2.0/24 -> 10.0.1.0/24: 192.0.2.10 becomes 10.0.1.10 (the destination's host byte, not the
    source's: the flow comes from 10.0.1.2)."""
    rs = ruleset(pre([netmap([pfx("192.0.2.0", 24), pfx("10.0.1.0", 24)])]))
    p = predict(rs, FIB, udp(dst="192.0.2.10"))
    assert p.dnat == frozenset({B(NatKind.DNAT, "10.0.1.10")})
    assert predict(rs, FIB, udp(dst="192.0.2.200")).dnat == frozenset({B(NatKind.DNAT, "10.0.1.200")})
    where = rs.describe_rule(rs.chains[0], rs.chains[0].rules[0])
    assert p.explain == (f"dnat: {where} (to 10.0.1.10)", "snat via dev lan: no nat rule bound (null binding)")


def test_a_prefix_dnat_map_with_a_port_binds_the_port_too() -> None:
    rs = ruleset(pre([netmap([pfx("192.0.2.0", 24), cat(pfx("10.0.1.0", 24), 8080)])]))
    p = predict(rs, FIB, udp(dst="192.0.2.10", dport=5060))
    assert p.dnat == frozenset({B(NatKind.DNAT, "10.0.1.10", ports=(8080, 8080))})
    rs = ruleset(pre([netmap([pfx("192.0.2.0", 24), cat(pfx("10.0.1.0", 24), {"range": [8000, 8099]})])]))
    p = predict(rs, FIB, udp(dst="192.0.2.10", dport=5060))
    assert p.dnat == frozenset({B(NatKind.DNAT, "10.0.1.10", ports=(8000, 8099))})


def test_a_nat_statement_of_the_other_family_is_skipped_and_the_rule_goes_on() -> None:
    """One rule, a dnat ip and a dnat ip6 map: each family is translated by its own statement."""
    rule = [dnat_map(payload("udp", "dport"), [5060, "10.0.1.50"]),
            dnat_map(payload("udp", "dport"), [5060, "fd00:1::50"], family="ip6")]
    rs = ruleset(pre(rule))
    assert predict(rs, FIB, udp()).dnat == frozenset({B(NatKind.DNAT, "10.0.1.50")})
    assert predict(rs, FIB, V6).dnat == frozenset({B(NatKind.DNAT, "fd00:1::50")})


def test_a_map_miss_ends_the_rule_and_the_next_rule_runs() -> None:
    """``dnat ... map { 53 : ... } accept`` for port 5060: the lookup breaks the rule before the accept."""
    rs = ruleset(pre([dnat_map(payload("udp", "dport"), [53, "10.0.1.50"]), ACCEPT],
                     [{"dnat": {"family": "ip", "addr": "10.0.1.60"}}]))
    assert predict(rs, FIB, udp(dport=5060)).dnat == frozenset({B(NatKind.DNAT, "10.0.1.60")})
    assert predict(rs, FIB, udp(dport=53)).dnat == frozenset({B(NatKind.DNAT, "10.0.1.50")})


def test_a_numgen_map_it_cannot_reach_never_binds_and_ends_the_rule() -> None:
    """numgen inc mod 2 is 0 or 1; the map holds 5 only: a miss either way, the accept is not reached."""
    rs = ruleset(pre([dnat_map(NUMGEN2, [5, "10.0.1.50"]), ACCEPT],
                     [{"dnat": {"family": "ip", "addr": "10.0.1.60"}}]))
    assert predict(rs, FIB, udp()).dnat == frozenset({B(NatKind.DNAT, "10.0.1.60")})


def test_a_numgen_map_names_every_address_it_may_bind() -> None:
    rs = ruleset(pre([dnat_map(NUMGEN2, [0, "10.0.1.51"], [1, "10.0.1.50"])]))
    p = predict(rs, FIB, udp())
    assert p.dnat == frozenset({B(NatKind.DNAT, "10.0.1.50"), B(NatKind.DNAT, "10.0.1.51")})
    where = rs.describe_rule(rs.chains[0], rs.chains[0].rules[0])
    assert p.explain[:2] == (f"dnat: {where} (any of 10.0.1.50, 10.0.1.51)",
                             "snat via dev lan: no nat rule bound (null binding)")


def test_an_snat_map_in_a_prerouting_chain_is_unknown_with_its_reason() -> None:
    """nft refuses it (``nft_nat_validate``); a ruleset read otherwise leaves the flow unknown."""
    rs = ruleset(pre([{"snat": {"family": "ip", "addr": mapping(payload("udp", "dport"), sset([5060, "10.0.1.50"]))}}]))
    p = predict(rs, FIB, udp())
    where = rs.describe_rule(rs.chains[0], rs.chains[0].rules[0])
    assert isinstance(p.dnat, Unknown)
    assert p.dnat.reason == f"dnat unknown: {where}: snat in a prerouting chain"


DPORT = Selector(Key.DPORT, "udp dport", proto=17)
NUMGEN = Selector(Key.NUMGEN, "numgen inc mod 2", params=(2, 0))
TO_V4 = NatTarget((ip_address("10.0.1.50"), ip_address("10.0.1.50")))


def inet_pre(stmt: NatMapStatement) -> NatRuleset:
    rule = Rule(7, (stmt,), text=stmt.text)
    return NatRuleset((Chain("inet", "t", "pre", (rule,), Hook.PREROUTING, -100, "nat", "accept"),))


def test_a_map_target_of_the_other_family_is_unknown_with_its_reason() -> None:
    """A map without a family of its own (built by hand: nft asks for ``dnat ip``/``ip6`` in inet)
    whose element holds an IPv4 address, met by an IPv6 flow: not modelled, said so."""
    plain = NatMapStatement(NatKind.DNAT, "dnat to udp dport map { 5060 : 10.0.1.50 }", None, (DPORT,),
                            (((IntervalSet(((5060, 5060),)),), TO_V4),))
    p = predict(inet_pre(plain), FIB, V6)
    assert isinstance(p.dnat, Unknown)
    assert p.dnat.reason == ("dnat unknown: table inet t chain pre handle 7: dnat to udp dport map "
                             "{ 5060 : 10.0.1.50 }: address family does not match the flow")
    random = NatMapStatement(NatKind.DNAT, "dnat to numgen inc mod 2 map { 0-1 : 10.0.1.50 }", None, (NUMGEN,),
                             (((IntervalSet(((0, 1),)),), TO_V4),))
    p = predict(inet_pre(random), FIB, V6)
    assert isinstance(p.dnat, Unknown)
    assert p.dnat.reason == ("dnat unknown: table inet t chain pre handle 7: dnat to numgen inc mod 2 map "
                             "{ 0-1 : 10.0.1.50 }: address family does not match the flow")
    assert predict(inet_pre(random), FIB, udp()).dnat == frozenset({B(NatKind.DNAT, "10.0.1.50")})
    assert predict(inet_pre(plain), FIB, udp(dport=53)).dnat == frozenset({NO_NAT})


def test_a_map_keyed_by_the_sockets_mark_is_unknown_and_says_so() -> None:
    """At output, ``dnat ip to meta mark map { 1 : 10.0.1.50 }``: the entry does not say the mark."""
    rs = ruleset(("out", "output", [[dnat_map({"meta": {"key": "mark"}}, [1, "10.0.1.50"])]]))
    p = predict(rs, FIB, udp(src="203.0.113.2"))
    assert isinstance(p.dnat, Unknown)
    where = rs.describe_rule(rs.chains[0], rs.chains[0].rules[0])
    assert p.dnat.reason == f"dnat unknown: {where}: the packet mark of the flow's first packet is not known"


def test_a_map_keyed_by_the_bundles_reqid_binds_a_flow_in_ipsec() -> None:
    """``snat ip to ipsec out reqid map { 1 : 198.51.100.2 }``: a flow the policy puts in the SA of
    reqid 1 (10.0.1.0/24 to 192.0.2.0/24) gets that source, another none."""
    from test_evaluate_breadth import post
    from test_xfrm import pol, sa, sel, tmpl, topo

    from topowatch.core.fib import Fib

    fib = Fib(topo((pol(sel(), templates=(tmpl(1),), priority=100, index=1),), (sa(1),)))
    key = {"ipsec": {"key": "reqid", "dir": "out"}}
    rs = ruleset(post([{"snat": {"family": "ip", "addr": mapping(key, sset([1, "198.51.100.2"]))}}]))
    assert predict(rs, fib, udp()).snat == frozenset({B(NatKind.SNAT, "198.51.100.2")})
    assert predict(rs, fib, udp(dst="198.51.100.9")).snat == frozenset({NO_NAT})
