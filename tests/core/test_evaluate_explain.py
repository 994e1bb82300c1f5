# SPDX-License-Identifier: GPL-2.0-or-later
"""Whole predictions of the paths a flow may take: what the admin reads, the rules named, the alternatives.

The kernel behaviour each expectation is worked from:

- A mark chain whose priority lies between two nat chains of a hook runs
  between them: the marks the later NAT sees depend on it, the earlier's do
  not; the model does not split a hook so and says the flow is unknown.
- A drop in a filter chain at prerouting (-150) ends the packet before the
  nat chains (-100): no NAT, no route, and the rule that dropped is named.
- A DNAT to a range picks one address of it (``nf_nat_range``); a range of
  more than 64 addresses is not routed one by one: the SNAT side and the
  egress are unknown, the DNAT itself known.
- A forwarded packet meets forward's filter chains after routing and before
  postrouting: a drop there means no SNAT, named as dropped before
  postrouting's NAT; the egress (routed) stays.
- A multipath route: each path is its own alternative; a SNAT unknown on one
  path leaves the others known.

Chains are built by hand over the fake FIB of ``test_evaluate`` (lan is
10.0.0.0/8, 8.8.8.8 goes by up1, 192.0.2.0/24 by up1 or up2).
"""

from __future__ import annotations

from ipaddress import ip_address, ip_network

from test_evaluate import LAN_IN, UP1, UP2, FakeFib, b, udp
from test_evaluate_breadth import udp as gw_udp

from topowatch.core.evaluate import predict
from topowatch.core.fib import Fib
from topowatch.core.flow import NO_NAT, Flow, NatKind, Prediction, RuleRef, Unknown
from topowatch.core.model import AF_INET, Address, Link, Netconf, Nexthop, Route, Topology
from topowatch.core.nat import (
    Chain,
    Hook,
    IntervalSet,
    Key,
    MarkSet,
    Match,
    NameSet,
    NatRuleset,
    NatStatement,
    Op,
    Rule,
    Selector,
    UnknownMatch,
    Verdict,
    VerdictKind,
)

DPORT = Selector(Key.DPORT, "udp dport", proto=17)
OIFNAME = Selector(Key.OIFNAME, "oifname")
DNS = Match(DPORT, Op.EQ, IntervalSet(((53, 53),)), "udp dport 53")
MASQ = NatStatement(NatKind.MASQUERADE, "masquerade")
DROP = Verdict(VerdictKind.DROP)


def dnat(lo: str, hi: str | None = None) -> NatStatement:
    text = f"dnat to {lo}" + (f"-{hi}" if hi else "")
    return NatStatement(NatKind.DNAT, text, addr=(ip_address(lo), ip_address(hi or lo)))


def rs(*chains: Chain) -> NatRuleset:
    return NatRuleset(chains, marks_known=True)


def test_a_mark_chain_between_two_prerouting_nat_chains_leaves_the_flow_unknown() -> None:
    a = Chain("ip", "a", "pre", (Rule(5, (DNS, dnat("10.0.0.7"))),), Hook.PREROUTING, -100, "nat", "accept")
    z = Chain("ip", "z", "pre", (Rule(6, (dnat("10.0.0.8"),)),), Hook.PREROUTING, 0, "nat", "accept")
    m = Chain("ip", "f", "m", (Rule(7, (MarkSet(1, 0xFFFFFFFF, "meta mark set 1"),)),), Hook.PREROUTING, -50,
              "filter", "accept")
    unknown = Unknown("table ip f chain m: a mark chain between nat chains at prerouting")
    assert predict(rs(a, z, m), FakeFib(), udp()) == Prediction(unknown, unknown, unknown, LAN_IN)


def test_a_drop_in_a_prerouting_filter_chain_is_the_whole_prediction() -> None:
    m = Chain("ip", "f", "m", (Rule(7, (DNS, DROP)),), Hook.PREROUTING, -150, "filter", "accept")
    post = Chain("ip", "nat", "post", (Rule(8, (MASQ,)),), Hook.POSTROUTING, 100, "nat", "accept")
    p = predict(rs(m, post), FakeFib(), udp())
    assert p == Prediction(frozenset(), frozenset(), (), LAN_IN, ("dropped at prerouting: table ip f chain m handle 7: "
                                                                  "udp dport 53 drop",),
                           rules=(RuleRef("table ip f chain m", 7, "udp dport 53 drop"),))


def test_a_dnat_to_more_addresses_than_are_routed_one_by_one() -> None:
    """``dnat to 10.0.0.0-10.0.0.255``: 256 addresses, more than 64."""
    pre = Chain("ip", "nat", "pre", (Rule(5, (dnat("10.0.0.0", "10.0.0.255"),)),), Hook.PREROUTING, -100, "nat",
                "accept")
    p = predict(rs(pre), FakeFib(), udp())
    unknown = Unknown("dnat to 10.0.0.0-10.0.0.255: too many addresses to route one by one")
    assert p == Prediction(frozenset({b(NatKind.DNAT, "10.0.0.0", "10.0.0.255")}), unknown, unknown, LAN_IN,
                           ("dnat: table ip nat chain pre handle 5: dnat to 10.0.0.0-10.0.0.255",),
                           rules=(RuleRef("table ip nat chain pre", 5, "dnat to 10.0.0.0-10.0.0.255"),))


def test_a_drop_in_forward_is_explained_before_postroutings_nat() -> None:
    fwd = Chain("ip", "f", "fwd", (Rule(7, (DNS, MarkSet(1, 0xFFFFFFFF, "meta mark set 1"), DROP)),), Hook.FORWARD, 0,
                "filter", "accept")
    post = Chain("ip", "nat", "post", (Rule(8, (MASQ,)),), Hook.POSTROUTING, 100, "nat", "accept")
    p = predict(rs(fwd, post), FakeFib(), udp())
    where = "table ip f chain fwd handle 7: udp dport 53 meta mark set 1 drop"
    assert p == Prediction(frozenset({NO_NAT}), frozenset(), (UP1,), LAN_IN,
                           ("dnat: no nat rule bound (null binding)", f"dropped before postrouting nat: {where}"),
                           rules=(RuleRef("table ip f chain fwd", 7, "udp dport 53 meta mark set 1 drop"),))


def test_a_drop_in_a_postrouting_nat_chain_is_named() -> None:
    post = Chain("ip", "nat", "post", (Rule(8, (DNS, DROP)), Rule(9, (MASQ,))), Hook.POSTROUTING, 100, "nat",
                 "accept")
    p = predict(rs(post), FakeFib(), udp())
    assert p == Prediction(frozenset({NO_NAT}), frozenset(), (UP1,), LAN_IN,
                           ("dnat: no nat rule bound (null binding)",
                            "dropped at postrouting: table ip nat chain post handle 8: udp dport 53 drop"),
                           rules=(RuleRef("table ip nat chain post", 8, "udp dport 53 drop"),))


def test_a_snat_unknown_on_one_path_of_a_multipath_route() -> None:
    """192.0.2.9 goes by up1 or up2; ``oifname "up1" <unmodelled> accept``, then ``masquerade``:
    via up1 accepted or masqueraded (unknown), via up2 masqueraded. Each path an alternative, the SNAT side unknown (the
    first unknown path's reason), the egresses both."""
    odd = UnknownMatch("xt match u32", "xt match u32")
    up1 = Match(OIFNAME, Op.EQ, NameSet(frozenset({"up1"})), 'oifname "up1"')
    post = Chain("ip", "nat", "post", (Rule(8, (up1, odd, Verdict(VerdictKind.ACCEPT))), Rule(9, (MASQ,))), Hook.POSTROUTING, 100, "nat",
                 "accept")
    p = predict(rs(post), FakeFib(), udp(dst="192.0.2.9"))
    where = 'table ip nat chain post handle 8: oifname "up1" xt match u32 accept'
    rule8 = RuleRef("table ip nat chain post", 8, 'oifname "up1" xt match u32 accept')
    via_up1 = Unknown(f"snat unknown via {UP1.describe()}: {where}: unmodelled expression: xt match u32", rule8)
    masq2 = b(NatKind.MASQUERADE, "198.51.100.7")
    explain = ("dnat: no nat rule bound (null binding)",
               f"snat via {UP2.describe()}: table ip nat chain post handle 9: masquerade (to 198.51.100.7 via "
               f"{UP2.describe()})")
    rule9 = RuleRef("table ip nat chain post", 9, "masquerade")
    assert p.snat == via_up1
    assert p.snat.rule == rule8  # type: ignore[union-attr]
    assert p.alternatives[0].snat.rule == rule8  # type: ignore[union-attr]
    assert p.egress == (UP1, UP2)
    assert p.explain == explain
    assert p.rules == (rule9,)
    assert p.alternatives == (
        Prediction(frozenset({NO_NAT}), via_up1, (UP1,), LAN_IN, explain, rules=(rule9,)),
        Prediction(frozenset({NO_NAT}), frozenset({masq2}), (UP2,), LAN_IN, explain, rules=(rule9,)),
    )


def test_eight_orders_are_followed_as_alternatives_and_named() -> None:
    """Ties of two nat chains (a, b) at prerouting, postrouting and input: 2**3 = 8 orders, all
    followed (at most 8 are). Only postrouting's tie matters (a SNATs to 192.0.2.2, b to
    192.0.2.1; the others only count): each order an alternative, the SNAT side their union,
    and the explanation names the three ties in hook order."""
    from test_evaluate import SNAT_X, SNAT_Y, C, post, snat
    from test_evaluate import ruleset as nft

    counter = [{"counter": {"packets": 0, "bytes": 0}}]
    chains = [C(name, [counter], hook=name, prio=prio, table=t)
              for t in ("a", "b") for name, prio in (("prerouting", -100), ("input", 100))]
    p = predict(nft(*chains, post([snat("192.0.2.2")], table="a"), post([snat("192.0.2.1")], table="b")),
                FakeFib(), udp())
    assert p.snat == frozenset({SNAT_X, SNAT_Y})
    assert len(p.alternatives) == 8
    ties = [f"table ip a chain {n} and table ip b chain {n} share hook {n} priority {prio}"
            for n, prio in (("prerouting", -100), ("postrouting", 100), ("input", 100))]
    assert p.explain[0] == f"{'; '.join(ties)}: their order is not known, each is followed"


def test_a_netfilter_reverse_path_drop_pins_the_input_interface() -> None:
    """rp_filter off everywhere, but the ruleset drops what fails ``fib saddr . iif oif missing``
    (``rpfilter`` for IPv4): a packet from 10.0.1.2 is kept only where it entered on lan, the
    reverse path. ``iifname "lan" masquerade`` then binds, for that one ingress."""
    from dataclasses import replace

    from test_evaluate_breadth import MASQ_UP1, TOPOLOGY
    from test_evaluate_breadth import udp as gw_udp

    from topowatch.core.fib import Fib
    from topowatch.core.flow import Ingress
    from topowatch.core.model import AF_INET, Netconf

    fib = Fib(replace(TOPOLOGY, netconf=(Netconf("all", 0),), netconf_known=True))
    lan = Match(Selector(Key.IIFNAME, "iifname"), Op.EQ, NameSet(frozenset({"lan"})), 'iifname "lan"')
    post = Chain("ip", "nat", "post", (Rule(8, (lan, MASQ)),), Hook.POSTROUTING, 100, "nat", "accept")
    rs = NatRuleset((post,), marks_known=True, rpfilter=frozenset({AF_INET}))
    p = predict(rs, fib, gw_udp())
    assert p.ingress == Ingress(2, "lan")
    assert p.snat == frozenset({MASQ_UP1})


def open_fib(n: int, multipath: bool = False) -> Fib:
    """n interfaces n0.. (10.<i>.0.1/24; default via n0, or via n0 and n1), rp_filter off: a packet
    from 10.0.0.2 may have entered on any of them (all up, none lo)."""
    links = (Link(1, "lo"), *(Link(2 + i, f"n{i}") for i in range(n)))
    addresses = (Address(1, ip_address("127.0.0.1"), 8, scope=254),
                 *(Address(2 + i, ip_address(f"10.{i}.0.1"), 24) for i in range(n)))
    routes = (*(Route(ip_network(f"10.{i}.0.0/24"), nexthops=(Nexthop(2 + i),)) for i in range(n)),
              Route(ip_network("0.0.0.0/0"), nexthops=(Nexthop(2, ip_address("10.0.0.254")),
                                                        *((Nexthop(3, ip_address("10.1.0.254")),) if multipath else ()))))
    return Fib(Topology(links, addresses, routes, netconf=(Netconf("all", 0),), netconf_known=True))


FROM_N0 = gw_udp(src="10.0.0.2", dst="192.0.2.10")


def test_the_candidate_input_interfaces_are_named_eight_at_most() -> None:
    """The prediction's ingress names the candidates: eight by name, more counted ("and 1 more")."""

    def named(n: int) -> str:
        p = predict(NatRuleset((), marks_known=True), open_fib(n), FROM_N0)
        assert isinstance(p.ingress, Unknown)
        return p.ingress.reason

    assert named(8) == "any of n0, n1, n2, n3, n4, n5, n6, n7 (rp_filter 0 (off))"
    assert named(9) == "any of n0, n1, n2, n3, n4, n5, n6, n7 and 1 more (rp_filter 0 (off))"


def test_64_candidate_input_interfaces_are_followed_and_65_are_too_many() -> None:
    """``iifname "n0" masquerade`` reads the input interface: each of 64 candidates is evaluated
    (masqueraded from n0, not from the others: both); 65 are more than are followed one by one:
    every side unknown, saying how many, the ingress naming them."""
    n0 = Match(Selector(Key.IIFNAME, "iifname"), Op.EQ, NameSet(frozenset({"n0"})), 'iifname "n0"')
    rs = NatRuleset((Chain("ip", "nat", "post", (Rule(8, (n0, MASQ)),), Hook.POSTROUTING, 100, "nat", "accept"),),
                    marks_known=True)
    p = predict(rs, open_fib(64), FROM_N0)
    assert p.snat == frozenset({NO_NAT, b(NatKind.MASQUERADE, "10.0.0.1")})
    assert len(p.alternatives) == 64
    assert [e.oifname for e in p.egress] == ["n0"]  # type: ignore[union-attr]
    assert p.dnat == frozenset({NO_NAT})
    assert p.rules == (RuleRef("table ip nat chain post", 8, 'iifname "n0" masquerade'),)
    p = predict(rs, open_fib(65), FROM_N0)
    ingress = Unknown("any of n0, n1, n2, n3, n4, n5, n6, n7 and 57 more (rp_filter 0 (off))")
    unknown = Unknown("the input interface matters and may be any of 65")
    assert p == Prediction(unknown, unknown, unknown, ingress)


def test_chain_orders_are_followed_whatever_the_input_interface() -> None:
    """rp_filter off (the flow may have entered on lan, up1 or up2; no rule reads which) and two
    postrouting nat chains at 100, a SNATing to 192.0.2.2 and b to 192.0.2.1: each order is an
    alternative, whichever interface the flow came in on: the SNAT side is both."""
    from dataclasses import replace

    from test_evaluate_breadth import TOPOLOGY, B
    from test_evaluate_breadth import udp as gw_udp

    from topowatch.core.fib import Fib
    from topowatch.core.model import Netconf

    fib = Fib(replace(TOPOLOGY, netconf=(Netconf("all", 0),), netconf_known=True))
    chains = tuple(Chain("ip", t, "post", (Rule(8, (NatStatement(NatKind.SNAT, f"snat to {a}", addr=(ip_address(a),
                                                                                                    ip_address(a))),)),),
                         Hook.POSTROUTING, 100, "nat", "accept") for t, a in (("a", "192.0.2.2"), ("b", "192.0.2.1")))
    p = predict(NatRuleset(chains, marks_known=True), fib, gw_udp())
    assert isinstance(p.ingress, Unknown)
    assert p.snat == frozenset({B(NatKind.SNAT, "192.0.2.1"), B(NatKind.SNAT, "192.0.2.2")})
    assert len(p.alternatives) == 2
    assert [a.ingress for a in p.alternatives] == [p.ingress, p.ingress]


def test_each_path_of_a_flow_from_any_interface_keeps_the_unknown_ingress() -> None:
    """rp_filter off (n0, n1 or n2), nothing reads the input interface, the default route multipath
    (n0, n1): one prediction, each path an alternative, and every alternative says the ingress is
    any of the three (not the first candidate's)."""
    p = predict(NatRuleset((), marks_known=True), open_fib(3, multipath=True), FROM_N0)
    assert p.ingress == Unknown("any of n0, n1, n2 (rp_filter 0 (off))")
    assert [(a.egress[0].oifname, a.ingress) for a in p.alternatives] == [  # type: ignore[index]
        ("n0", p.ingress), ("n1", p.ingress)]


def test_chain_orders_and_input_interfaces_together() -> None:
    """``iifname "n0" snat to 192.0.2.9`` in a postrouting chain at 50, then two chains at 100 SNATing
    to 192.0.2.2 (a) and 192.0.2.1 (b); rp_filter off (n0, n1, n2). From n0 192.0.2.9; from n1 or n2
    either of the others, by the chains' order: the SNAT side is all three, never unknown."""
    n0 = Match(Selector(Key.IIFNAME, "iifname"), Op.EQ, NameSet(frozenset({"n0"})), 'iifname "n0"')
    to9 = NatStatement(NatKind.SNAT, "snat to 192.0.2.9", addr=(ip_address("192.0.2.9"), ip_address("192.0.2.9")))
    first = Chain("ip", "f", "post", (Rule(7, (n0, to9)),), Hook.POSTROUTING, 50, "nat", "accept")
    ties = tuple(Chain("ip", t, "post", (Rule(8, (NatStatement(NatKind.SNAT, f"snat to {a}",
                                                               addr=(ip_address(a), ip_address(a))),)),),
                       Hook.POSTROUTING, 100, "nat", "accept") for t, a in (("a", "192.0.2.2"), ("b", "192.0.2.1")))
    p = predict(NatRuleset((first, *ties), marks_known=True), open_fib(3), FROM_N0)
    assert p.snat == frozenset({b(NatKind.SNAT, "192.0.2.9"), b(NatKind.SNAT, "192.0.2.1"), b(NatKind.SNAT, "192.0.2.2")})


def test_an_egress_unknown_for_one_input_interface_names_it() -> None:
    """``ip rule iif n1 ipproto udp lookup 100`` (ipproto not modelled) and ``iifname "n0"
    masquerade``: arriving on n1 the route is unknown, so the egress is, saying where it arrived."""
    from topowatch.core.model import AF_INET, TABLE_LOCAL, TABLE_MAIN, PolicyRule

    base = open_fib(3).topology
    rules = (PolicyRule(AF_INET, 0, table=TABLE_LOCAL),
             PolicyRule(AF_INET, 100, table=100, iifname="n1", unmodelled=("ipproto",)),
             PolicyRule(AF_INET, 32766, table=TABLE_MAIN))
    n0 = Match(Selector(Key.IIFNAME, "iifname"), Op.EQ, NameSet(frozenset({"n0"})), 'iifname "n0"')
    rs = NatRuleset((Chain("ip", "nat", "post", (Rule(8, (n0, MASQ)),), Hook.POSTROUTING, 100, "nat", "accept"),),
                    marks_known=True)
    from dataclasses import replace

    p = predict(rs, Fib(replace(base, rules=rules)), FROM_N0)
    assert isinstance(p.egress, Unknown)
    assert p.egress.reason.startswith("arriving on n1: route after dnat unknown: "), p.egress.reason


def test_two_mark_chains_between_prerouting_nat_chains_are_both_named() -> None:
    a = Chain("ip", "a", "pre", (Rule(5, (DNS, dnat("10.0.0.7"))),), Hook.PREROUTING, -100, "nat", "accept")
    z = Chain("ip", "z", "pre", (Rule(6, (dnat("10.0.0.8"),)),), Hook.PREROUTING, 0, "nat", "accept")
    marks = tuple(Chain("ip", "f", name, (Rule(7, (MarkSet(1, 0xFFFFFFFF, "meta mark set 1"),)),), Hook.PREROUTING,
                        prio, "filter", "accept") for name, prio in (("m1", -60), ("m2", -50)))
    unknown = Unknown("table ip f chain m1, table ip f chain m2: a mark chain between nat chains at prerouting")
    assert predict(rs(a, z, *marks), FakeFib(), udp()) == Prediction(unknown, unknown, unknown, LAN_IN)


def test_a_socket_mark_not_known_is_followed_in_each_chain_order() -> None:
    """The gateway of ``test_marks`` (``fwmark 0x200`` routes by up2): a local flow's socket mark is
    not in the entry, so 0x200 and a mark of no rule are followed, and the explanation says so.
    With two postrouting nat chains at 100 (a SNATs to 100.64.0.2, b to 100.64.0.1) each order is
    followed for each mark: the SNAT side is both, not unknown."""
    from test_marks import FIB as MARK_FIB
    from test_marks import POST, chain
    from test_marks import ruleset as nft

    local = Flow(AF_INET, 17, ip_address("100.64.0.1"), ip_address("198.18.0.7"), 5000, 53)
    p = predict(nft(POST), MARK_FIB, local)
    assert p.explain[0] == "the socket's mark is not known: each mark the policy rules tell apart is followed"
    ties = [chain("post", "postrouting", 100, [[{"snat": {"addr": a}}]], kind="nat", table=t)
            for t, a in (("a", "100.64.0.2"), ("b", "100.64.0.1"))]
    p = predict(nft(*ties), MARK_FIB, local)
    assert p.snat == frozenset({b(NatKind.SNAT, "100.64.0.1"), b(NatKind.SNAT, "100.64.0.2")})


def test_a_ct_mark_not_zero_in_an_entry_of_a_partial_ruleset_is_unknown_at_nat() -> None:
    """Not every chain that may set a mark is read (``marks_known`` false): an entry whose ct mark
    is 5 may have had it set before its NAT or after, so ``ct mark 0 masquerade`` is unknown for it;
    an entry whose ct mark is 0 had 0 all along (a new entry starts at 0): masqueraded."""
    from test_evaluate_breadth import FIB as GW_FIB
    from test_evaluate_breadth import MASQ_UP1

    zero = Match(Selector(Key.CT_MARK, "ct mark"), Op.EQ, IntervalSet(((0, 0),)), "ct mark 0")
    post = Chain("ip", "nat", "post", (Rule(8, (zero, MASQ)),), Hook.POSTROUTING, 100, "nat", "accept")
    partial = NatRuleset((post,), marks_known=False)
    snat = predict(partial, GW_FIB, gw_udp(ct_mark=5)).snat
    assert isinstance(snat, Unknown)
    assert snat.reason == ("snat unknown via dev up1 via 203.0.113.1: table ip nat chain post handle 8: ct mark 0 "
                           "masquerade: the entry's conntrack mark may have been set after its NAT; the mark a new "
                           "flow has at this point is not known")
    assert predict(partial, GW_FIB, gw_udp(ct_mark=0)).snat == frozenset({MASQ_UP1})


def test_the_route_before_output_dnat_is_looked_up_with_the_sockets_mark() -> None:
    """``fwmark 0x200`` routes by up2 (``test_marks``): a local flow whose socket mark is 0x200 is
    routed by up2 before output's NAT, so ``oifname "up2" dnat to 100.64.0.9`` binds."""
    from test_marks import FIB as MARK_FIB
    from test_marks import chain
    from test_marks import ruleset as nft

    out = chain("out", "output", -100, [[{"match": {"op": "==", "left": {"meta": {"key": "oifname"}},
                                                    "right": "up2"}},
                                         {"dnat": {"addr": "100.64.0.9"}}]], kind="nat")
    local = Flow(AF_INET, 17, ip_address("100.64.0.1"), ip_address("198.18.0.7"), 5000, 53, packet_mark=0x200)
    assert predict(nft(out), MARK_FIB, local).dnat == frozenset({b(NatKind.DNAT, "100.64.0.9")})


def test_an_unknown_dnat_side_is_the_whole_prediction() -> None:
    """``<unmodelled> accept`` then ``dnat to 10.0.0.7`` at prerouting: accepted (no DNAT) or DNATted,
    which the ruleset does not say: every side unknown, naming the rule, the ingress the flow's."""
    odd = UnknownMatch("xt match u32", "xt match u32")
    pre = Chain("ip", "nat", "pre", (Rule(5, (odd, Verdict(VerdictKind.ACCEPT))), Rule(6, (dnat("10.0.0.7"),))),
                Hook.PREROUTING, -100, "nat", "accept")
    rule = RuleRef("table ip nat chain pre", 5, "xt match u32 accept")
    unknown = Unknown("dnat unknown: table ip nat chain pre handle 5: xt match u32 accept: unmodelled expression: "
                      "xt match u32", rule)
    p = predict(rs(pre), FakeFib(), udp())
    assert p == Prediction(unknown, unknown, unknown, LAN_IN)
    assert (p.dnat.rule, p.snat.rule, p.egress.rule) == (rule, rule, rule)  # type: ignore[union-attr]


def test_a_local_flow_dropped_on_one_path_and_dnatted_on_the_other() -> None:
    """A local flow to 192.0.2.9 (multipath: up1 or up2); output's nat chain ``oifname "up1" drop``
    then ``dnat to 10.0.0.7``: by up1 it is dropped, by up2 DNATted (then routed to lan). Both are
    said; the DNAT side is the DNAT's."""
    from test_evaluate import LAN, LOCAL_IN

    up1 = Match(OIFNAME, Op.EQ, NameSet(frozenset({"up1"})), 'oifname "up1"')
    out = Chain("ip", "nat", "out", (Rule(5, (up1, DROP)), Rule(6, (dnat("10.0.0.7"),))), Hook.OUTPUT, -100, "nat",
                "accept")
    p = predict(rs(out), FakeFib(ingress=LOCAL_IN), udp(src="10.0.0.1", dst="192.0.2.9", packet_mark=0))
    assert p.dnat == frozenset({b(NatKind.DNAT, "10.0.0.7")})
    assert p.egress == (LAN,)
    assert p.explain == ('dropped at output: table ip nat chain out handle 5: oifname "up1" drop',
                         "dnat: table ip nat chain out handle 6: dnat to 10.0.0.7",
                         "snat via dev lan: no nat rule bound (null binding)")
    assert p.rules == (RuleRef("table ip nat chain out", 5, 'oifname "up1" drop'),
                       RuleRef("table ip nat chain out", 6, "dnat to 10.0.0.7"))


def test_a_dnat_to_64_addresses_is_routed_and_to_65_is_not() -> None:
    """``dnat to 10.0.0.100-10.0.0.163``: 64 addresses, each routed (all by lan): known. One more
    (10.0.0.164) is past the 64 routed one by one: unknown."""
    def pre(hi: str) -> NatRuleset:
        return rs(Chain("ip", "nat", "pre", (Rule(5, (dnat("10.0.0.100", hi),)),), Hook.PREROUTING, -100, "nat",
                        "accept"))

    from test_evaluate import LAN

    p = predict(pre("10.0.0.163"), FakeFib(), udp())
    assert (p.egress, p.snat) == ((LAN,), frozenset({NO_NAT}))
    p = predict(pre("10.0.0.164"), FakeFib(), udp())
    assert p.snat == Unknown("dnat to 10.0.0.100-10.0.0.164: too many addresses to route one by one")


def test_a_prerouting_filter_after_dstnat_drops_one_address_of_the_range() -> None:
    """``dnat to 10.0.0.100-10.0.0.101`` at -100, then at 0 a filter chain ``ip daddr 10.0.0.100
    drop``: it runs after the DNAT, on the translated destination. The kernel picks one address:
    .100 is dropped there, .101 routed by lan. Both said, both rules named."""
    daddr = Match(Selector(Key.DADDR, "ip daddr", family=2), Op.EQ,
                  IntervalSet(((int(ip_address("10.0.0.100")), int(ip_address("10.0.0.100"))),), version=4),
                  "ip daddr 10.0.0.100")
    pre = Chain("ip", "nat", "pre", (Rule(5, (dnat("10.0.0.100", "10.0.0.101"),)),), Hook.PREROUTING, -100, "nat",
                "accept")
    flt = Chain("ip", "f", "m", (Rule(7, (daddr, MarkSet(1, 0xFFFFFFFF, "meta mark set 1"), DROP)),),
                Hook.PREROUTING, 0, "filter", "accept")
    from test_evaluate import LAN

    p = predict(rs(pre, flt), FakeFib(), udp())
    assert p.dnat == frozenset({b(NatKind.DNAT, "10.0.0.100", "10.0.0.101")})
    assert p.egress == (LAN,)
    drop = "table ip f chain m handle 7: ip daddr 10.0.0.100 meta mark set 1 drop"
    assert p.explain == ("dnat: table ip nat chain pre handle 5: dnat to 10.0.0.100-10.0.0.101",
                         f"dropped at prerouting: {drop}", "snat via dev lan: no nat rule bound (null binding)")
    assert p.rules == (RuleRef("table ip nat chain pre", 5, "dnat to 10.0.0.100-10.0.0.101"),
                       RuleRef("table ip f chain m", 7, "ip daddr 10.0.0.100 meta mark set 1 drop"))


def test_marks_left_unknown_after_dstnat_are_explained() -> None:
    """A prerouting filter chain at 0 (after dstnat at -100) sets mark 1 after a match not modelled:
    the marks are unknown from there, said "marks at prerouting unknown: ..."."""
    odd = UnknownMatch("xt match u32", "xt match u32")
    pre = Chain("ip", "nat", "pre", (Rule(5, (DNS, dnat("10.0.0.100"))),), Hook.PREROUTING, -100, "nat", "accept")
    flt = Chain("ip", "f", "m", (Rule(7, (odd, MarkSet(1, 0xFFFFFFFF, "meta mark set 1"))),), Hook.PREROUTING, 0,
                "filter", "accept")
    p = predict(rs(pre, flt), FakeFib(), udp())
    assert ("marks at prerouting unknown: table ip f chain m handle 7: xt match u32 meta mark set 1: unmodelled "
            "expression: xt match u32") in p.explain, p.explain


def test_a_route_after_dnat_that_is_unknown_is_the_whole_prediction() -> None:
    """``dnat to 10.0.0.66``, whose route the FIB cannot answer: the DNAT known, the egress and SNAT
    side unknown with the FIB's reason, the DNAT explained and its rule named."""
    fib = FakeFib(routes={"0.0.0.0/0": (UP1,), "10.0.0.66/32": Unknown("a rule with ipproto")})
    pre = Chain("ip", "nat", "pre", (Rule(5, (dnat("10.0.0.66"),)),), Hook.PREROUTING, -100, "nat", "accept")
    unknown = Unknown("route after dnat unknown: a rule with ipproto")
    assert predict(rs(pre), fib, udp()) == Prediction(
        frozenset({b(NatKind.DNAT, "10.0.0.66")}), unknown, unknown, LAN_IN,
        ("dnat: table ip nat chain pre handle 5: dnat to 10.0.0.66",),
        rules=(RuleRef("table ip nat chain pre", 5, "dnat to 10.0.0.66"),))


def test_a_dnat_into_a_blackhole_is_explained_by_the_route() -> None:
    """``dnat to 192.0.2.66``, a blackhole route: the DNAT binds at prerouting, the route lookup
    after it drops the packet (``ip_route_input``: the route type's error); no SNAT hook."""
    from test_evaluate import BLACKHOLE

    pre = Chain("ip", "nat", "pre", (Rule(5, (dnat("192.0.2.66"),)),), Hook.PREROUTING, -100, "nat", "accept")
    assert predict(rs(pre), FakeFib(), udp()) == Prediction(
        frozenset({b(NatKind.DNAT, "192.0.2.66")}), frozenset(), (BLACKHOLE,), LAN_IN,
        ("dnat: table ip nat chain pre handle 5: dnat to 192.0.2.66",
         "dropped by the route: blackhole (blackhole 192.0.2.66)"),
        rules=(RuleRef("table ip nat chain pre", 5, "dnat to 192.0.2.66"),))


def test_an_xfrm_block_policy_on_one_path_of_a_multipath_route() -> None:
    """Default route by up1 or up2; an xfrm out policy ``action block`` selecting output interface
    up1 (``xfrm_lookup`` answers -EPERM on that path). By up1 the flow is dropped, said so; by up2
    it is masqueraded."""
    from dataclasses import replace

    from test_evaluate_breadth import TOPOLOGY
    from test_evaluate_breadth import udp as gw_udp
    from test_xfrm import pol, sel

    from topowatch.core.xfrm import Action

    routes = (*(r for r in TOPOLOGY.routes if str(r.dst) != "0.0.0.0/0"),
              Route(ip_network("0.0.0.0/0"), nexthops=(Nexthop(3, ip_address("203.0.113.1")),
                                                       Nexthop(4, ip_address("198.51.100.1")))))
    block = pol(sel(ifindex=3), action=Action.BLOCK, index=3)
    fib = Fib(replace(TOPOLOGY, routes=routes, xfrm_policies=(block,), xfrm_known=True))
    post = Chain("ip", "nat", "post", (Rule(8, (MASQ,)),), Hook.POSTROUTING, 100, "nat", "accept")
    p = predict(rs(post), fib, gw_udp(src="10.0.1.2", dst="192.0.2.10"))
    assert p.snat == frozenset({b(NatKind.MASQUERADE, "198.51.100.2")})
    assert [e.oifname for e in p.egress] == ["up1", "up2"]  # type: ignore[union-attr]
    assert [line.split(":")[0] for line in p.explain] == ["dnat", "dropped by xfrm", "snat via dev up2 via 198.51.100.1"]


def test_a_flow_delivered_here_has_no_output_device_at_input() -> None:
    """A flow from lan to 10.0.1.1 (this host) meets input's nat chain, where the packet has no
    output device: ``oifname "lo" snat to 192.0.2.1`` does not match."""
    from test_evaluate_breadth import FIB as GW_FIB
    from test_evaluate_breadth import udp as gw_udp

    lo = Match(OIFNAME, Op.EQ, NameSet(frozenset({"lo"})), 'oifname "lo"')
    to = NatStatement(NatKind.SNAT, "snat to 192.0.2.1", addr=(ip_address("192.0.2.1"), ip_address("192.0.2.1")))
    inp = Chain("ip", "nat", "in", (Rule(8, (lo, to)),), Hook.INPUT, 100, "nat", "accept")
    assert predict(rs(inp), GW_FIB, gw_udp(dst="10.0.1.1")).snat == frozenset({NO_NAT})


def test_a_mark_chain_between_postrouting_nat_chains_on_each_path() -> None:
    """192.0.2.9 by up1 or up2; postrouting nat chains at 100 and 200 with a mark chain at 150: on
    each path the SNAT side is unknown, each path an alternative saying so, both egresses kept."""
    first = Chain("ip", "nat", "post", (Rule(8, (MASQ,)),), Hook.POSTROUTING, 100, "nat", "accept")
    second = Chain("ip", "nat2", "post", (), Hook.POSTROUTING, 200, "nat", "accept")
    m = Chain("ip", "f", "m", (Rule(7, (MarkSet(1, 0xFFFFFFFF, "meta mark set 1"),)),), Hook.POSTROUTING, 150,
              "filter", "accept")
    p = predict(rs(first, second, m), FakeFib(), udp(dst="192.0.2.9"))
    assert p.egress == (UP1, UP2)
    assert [a.snat for a in p.alternatives] == [
        Unknown(f"snat unknown via {out.describe()}: table ip f chain m: a mark chain between nat chains")
        for out in (UP1, UP2)]
    assert [a.egress for a in p.alternatives] == [(UP1,), (UP2,)]


def test_a_forward_drop_on_one_path_keeps_the_other() -> None:
    """192.0.2.9 by up1 or up2; forward's filter chain ``oifname "up1" meta mark set 1 drop``: by up1
    the flow is dropped before postrouting, by up2 it is masqueraded."""
    up1 = Match(OIFNAME, Op.EQ, NameSet(frozenset({"up1"})), 'oifname "up1"')
    fwd = Chain("ip", "f", "fwd", (Rule(7, (up1, MarkSet(1, 0xFFFFFFFF, "meta mark set 1"), DROP)),), Hook.FORWARD,
                0, "filter", "accept")
    post = Chain("ip", "nat", "post", (Rule(8, (MASQ,)),), Hook.POSTROUTING, 100, "nat", "accept")
    p = predict(rs(fwd, post), FakeFib(), udp(dst="192.0.2.9"))
    assert p.egress == (UP1, UP2)
    assert p.snat == frozenset({b(NatKind.MASQUERADE, "198.51.100.7")})


def test_a_postrouting_drop_on_one_path_keeps_the_other() -> None:
    """192.0.2.9 by up1 or up2; postrouting ``oifname "up1" drop`` then ``masquerade``: by up1 the
    flow is dropped at postrouting, by up2 masqueraded."""
    up1 = Match(OIFNAME, Op.EQ, NameSet(frozenset({"up1"})), 'oifname "up1"')
    post = Chain("ip", "nat", "post", (Rule(7, (up1, DROP)), Rule(8, (MASQ,))), Hook.POSTROUTING, 100, "nat",
                 "accept")
    p = predict(rs(post), FakeFib(), udp(dst="192.0.2.9"))
    assert p.egress == (UP1, UP2)
    assert p.snat == frozenset({b(NatKind.MASQUERADE, "198.51.100.7")})
