# SPDX-License-Identifier: GPL-2.0-or-later
"""Constant NAT statements' texts and addresses, the devices a hook has, and the rules a random map names.

The kernel behaviour each expectation is worked from:

- ``nf_nat_redirect_ipv4``: REDIRECT of a received packet goes to the first
  (primary) address of its input interface, of a locally generated one to
  127.0.0.1 (``::1`` for IPv6, ``nf_nat_redirect_ipv6``).
- ``nft_meta_get_eval`` (``nft_meta_store_ifindex``): ``meta iif`` of a
  packet with no input device (a locally generated one at output) is 0, so
  ``meta iif 1`` (lo) does not match it; a local route's device is lo, so
  ``oifname "lo"`` matches a locally generated flow routed to this host.
- ``nf_nat_inet_fn``: each NAT statement binds what it says; the explanation
  an admin reads names the rule (and the address the kernel picked) whole.
  A statement the hook cannot run (snat at prerouting, masquerade at input,
  an address of the other family) is not modelled: unknown, with its reason.
- ``numgen`` maps bind one of their elements: the rule is named among the
  prediction's rules as any other binding rule is.
- Empty nat chains with policy accept tied with one that has rules change
  nothing in either order: they add no orders to follow (a real tie beside
  three such groups still gives its two orders as alternatives).
"""

from __future__ import annotations

from ipaddress import ip_address

from test_evaluate import LAN, LOCAL_IN, SNAT_X, SNAT_Y, UP1, UP2, C, FakeFib, b, dnat, oifname, post, snat
from test_evaluate import ruleset as nft_ruleset
from test_evaluate import udp as fake_udp
from test_evaluate_breadth import FIB, NUMGEN2, V6, B, mapping, pre, ruleset, sset, udp

from topowatch.core.evaluate import predict
from topowatch.core.flow import NO_NAT, Binding, Egress, EgressKind, NatKind, RuleRef, Unknown
from topowatch.core.model import AF_INET, AF_INET6
from topowatch.core.nat import (
    Chain,
    Hook,
    IntervalSet,
    Key,
    Match,
    NameSet,
    NatRuleset,
    NatStatement,
    Op,
    Rule,
    Selector,
)


def where(rs: NatRuleset, chain: int = 0, rule: int = 0) -> str:
    return rs.describe_rule(rs.chains[chain], rs.chains[chain].rules[rule])


def test_redirect_of_a_received_flow_goes_to_its_input_interfaces_first_address() -> None:
    """Arriving on lan (10.0.1.1/24, fd00:1::1/64): REDIRECT binds 10.0.1.1 (fd00:1::1 for IPv6),
    explained with the address."""
    rs = ruleset(pre([{"redirect": None}]))
    p = predict(rs, FIB, udp())
    assert p.dnat == frozenset({B(NatKind.REDIRECT, "10.0.1.1")})
    assert p.explain[0] == f"dnat: {where(rs)} (to 10.0.1.1)"
    p6 = predict(rs, FIB, V6)
    assert p6.dnat == frozenset({B(NatKind.REDIRECT, "fd00:1::1")})
    assert p6.explain[0] == f"dnat: {where(rs)} (to fd00:1::1)"


def test_redirect_of_a_locally_generated_flow_goes_to_loopback() -> None:
    rs = ruleset(("out", "output", [[{"redirect": None}]]))
    p = predict(rs, FIB, udp(src="203.0.113.2", packet_mark=0))
    assert p.dnat == frozenset({B(NatKind.REDIRECT, "127.0.0.1")})
    assert p.explain[0] == f"dnat: {where(rs)} (to 127.0.0.1)"


def test_a_dnat_and_a_port_only_dnat_are_explained_by_their_rule() -> None:
    rs = ruleset(pre([{"dnat": {"family": "ip", "addr": "10.0.1.50"}}]))
    p = predict(rs, FIB, udp())
    assert p.explain[0] == f"dnat: {where(rs)}"
    rs = ruleset(pre([{"dnat": {"port": 5353}}]))
    p = predict(rs, FIB, udp())
    assert p.dnat == frozenset({Binding(NatKind.DNAT, None, None, 5353, 5353)})
    assert p.explain[0] == f"dnat: {where(rs)}"


def test_statements_a_hook_cannot_run_are_unknown_with_their_reason() -> None:
    """snat in a prerouting chain; masquerade in an input chain (no output device there: nft only
    allows it at postrouting); a DNAT to an IPv6 address for an IPv4 flow."""
    rs = ruleset(pre([{"snat": {"addr": "192.0.2.1"}}]))
    p = predict(rs, FIB, udp())
    assert isinstance(p.dnat, Unknown)
    assert p.dnat.reason == f"dnat unknown: {where(rs)}: snat in a prerouting chain"

    masq = Chain("ip", "nat", "in", (Rule(7, (NatStatement(NatKind.MASQUERADE, "masquerade"),)),), Hook.INPUT,
                 100, "nat", "accept")
    rs = NatRuleset((masq,), marks_known=True)
    p = predict(rs, FIB, udp(dst="10.0.1.1"))
    assert isinstance(p.snat, Unknown)
    assert p.snat.reason.startswith("snat unknown via local ("), p.snat.reason
    assert p.snat.reason.endswith("): table ip nat chain in handle 7: masquerade: masquerade without a known "
                                  "output interface"), p.snat.reason

    v6 = (ip_address("fd00:1::5"), ip_address("fd00:1::5"))
    dnat6 = Chain("ip", "nat", "pre", (Rule(8, (NatStatement(NatKind.DNAT, "dnat to fd00:1::5", addr=v6),)),),
                  Hook.PREROUTING, -100, "nat", "accept")
    p = predict(NatRuleset((dnat6,), marks_known=True), FIB, udp())
    assert isinstance(p.dnat, Unknown)
    assert p.dnat.reason == ("dnat unknown: table ip nat chain pre handle 8: dnat to fd00:1::5: address family "
                             "does not match the flow")


def test_a_numgen_map_binding_names_its_rule() -> None:
    """``dnat to numgen inc mod 2 map { 0 : 10.0.1.51, 1 : 10.0.1.50 }`` binds (either element):
    its rule is the prediction's rule, as ``snat to numgen ...`` at postrouting is."""
    rs = ruleset(pre([{"dnat": {"family": "ip", "addr": mapping(NUMGEN2, sset([0, "10.0.1.51"],
                                                                             [1, "10.0.1.50"]))}}]))
    p = predict(rs, FIB, udp())
    chain = rs.chains[0]
    assert p.rules == (RuleRef(chain.describe(), chain.rules[0].handle, chain.rules[0].text),)
    rs = ruleset(("post", "postrouting", [[{"snat": {"family": "ip", "addr": mapping(NUMGEN2, sset(
        [0, "192.0.2.1"], [1, "192.0.2.2"]))}}]]))
    p = predict(rs, FIB, udp())
    chain = rs.chains[0]
    assert p.snat == frozenset({B(NatKind.SNAT, "192.0.2.1"), B(NatKind.SNAT, "192.0.2.2")})
    assert p.rules == (RuleRef(chain.describe(), chain.rules[0].handle, chain.rules[0].text),)


def test_meta_iif_of_a_locally_generated_packet_is_no_device() -> None:
    """At output a local packet has no input device: ``meta iif 1`` (lo's index) is false, the DNAT
    after it never binds."""
    iif_lo = Match(Selector(Key.IIF, "meta iif"), Op.EQ, NameSet(frozenset(), frozenset(), frozenset({1})),
                   "meta iif 1")
    to = (ip_address("10.0.1.50"), ip_address("10.0.1.50"))
    out = Chain("ip", "nat", "out", (Rule(7, (iif_lo, NatStatement(NatKind.DNAT, "dnat to 10.0.1.50", addr=to))),),
                Hook.OUTPUT, -100, "nat", "accept")
    p = predict(NatRuleset((out,), marks_known=True), FIB, udp(src="203.0.113.2", packet_mark=0))
    assert p.dnat == frozenset({NO_NAT})


def test_a_local_route_without_a_device_name_is_lo() -> None:
    """A FIB that answers a local route with no device name: its device is lo (a local route's
    device always is), ``oifname "lo"`` at output matches a flow to this host and its DNAT binds."""
    here = Egress(EgressKind.LOCAL, 1, route="local 10.0.0.1")
    fib = FakeFib(routes={"10.0.0.1/32": (here,), "10.0.0.0/8": (LAN,)}, ingress=LOCAL_IN)
    rs = nft_ruleset(C("output", [[oifname("lo"), dnat("10.0.0.7")]], hook="output", prio=-100))
    p = predict(rs, fib, fake_udp(src="10.0.0.1", dst="10.0.0.1", packet_mark=0))
    assert p.dnat == frozenset({b(NatKind.DNAT, "10.0.0.7")})
    assert p.egress == (LAN,)


def test_empty_chains_tied_with_one_that_has_rules_add_no_orders() -> None:
    """Ties at prerouting, input and output, each between an empty chain (policy accept) and one with
    a counter rule, beside the postrouting tie of two SNATs: only the postrouting tie's two orders
    are followed, each an alternative (not 2**4 = 16 orders, more than are followed one by one)."""
    counter = [{"counter": {"packets": 0, "bytes": 0}}]
    chains = []
    for t in ("a", "b"):
        rules = [counter] if t == "a" else []
        chains += [C("prerouting", list(rules), hook="prerouting", prio=-100, table=t),
                   C("input", list(rules), hook="input", prio=100, table=t),
                   C("output", list(rules), hook="output", prio=-100, table=t)]
    rs = nft_ruleset(*chains, post([snat("192.0.2.2")], table="a"), post([snat("192.0.2.1")], table="b"))
    p = predict(rs, FakeFib(), fake_udp())
    assert p.snat == frozenset({SNAT_X, SNAT_Y})
    assert len(p.alternatives) == 2


def test_a_drop_and_a_vmap_drop_are_explained_by_their_rule() -> None:
    """``udp dport 5060 drop`` and ``udp dport vmap { 5060 : drop }`` at prerouting drop the flow
    (``NF_DROP``): no binding, no egress, and the one explanation names the rule."""
    dport = {"payload": {"protocol": "udp", "field": "dport"}}
    for exprs in ([{"match": {"op": "==", "left": dport, "right": 5060}}, {"drop": None}],
                  [{"vmap": {"key": dport, "data": sset([5060, {"drop": None}])}}]):
        rs = ruleset(pre(exprs))
        p = predict(rs, FIB, udp())
        assert (p.dnat, p.snat, p.egress) == (frozenset(), frozenset(), ())
        assert p.explain == (f"dropped at prerouting: {where(rs)}",)


def test_a_nat_statement_of_the_other_family_is_skipped_and_the_rule_goes_on() -> None:
    """``dnat ip to 10.0.1.50 dnat ip6 to fd00:1::50`` in an inet chain: ``nft_nat_inet_eval`` does
    nothing for a statement of the other family, so an IPv6 flow reaches the ip6 one and binds it,
    and an IPv4 flow binds the first."""
    v4 = (ip_address("10.0.1.50"), ip_address("10.0.1.50"))
    v6 = (ip_address("fd00:1::50"), ip_address("fd00:1::50"))
    rule = Rule(7, (NatStatement(NatKind.DNAT, "dnat ip to 10.0.1.50", family=AF_INET, addr=v4),
                    NatStatement(NatKind.DNAT, "dnat ip6 to fd00:1::50", family=AF_INET6, addr=v6)))
    rs = NatRuleset((Chain("inet", "t", "pre", (rule,), Hook.PREROUTING, -100, "nat", "accept"),), marks_known=True)
    assert predict(rs, FIB, V6).dnat == frozenset({B(NatKind.DNAT, "fd00:1::50")})
    assert predict(rs, FIB, udp()).dnat == frozenset({B(NatKind.DNAT, "10.0.1.50")})


def test_an_ipv6_dnat_range_routes_each_address() -> None:
    """``dnat ip6 to fd00:1::50-fd00:1::51``: the kernel picks one of the two; each is routed (both
    on lan), and the binding is the range."""
    rs = ruleset(pre([{"dnat": {"family": "ip6", "addr": {"range": ["fd00:1::50", "fd00:1::51"]}}}]))
    p = predict(rs, FIB, V6)
    assert p.dnat == frozenset({B(NatKind.DNAT, "fd00:1::50", "fd00:1::51")})
    assert not isinstance(p.egress, Unknown)
    assert [e.oifname for e in p.egress] == ["lan"]


def test_a_dnat_range_routes_its_addresses_and_no_other() -> None:
    """``dnat to 192.0.2.64-192.0.2.65`` picks one of the two (``nf_nat_range`` min..max, both
    ends included): each is routed (192.0.2.0/24 is multipath up1/up2), and 192.0.2.66 (a
    blackhole), one past the range, is not among the egresses."""
    rs = nft_ruleset(C("prerouting", [[dnat({"range": ["192.0.2.64", "192.0.2.65"]})]], hook="prerouting",
                       prio=-100))
    p = predict(rs, FakeFib(), fake_udp())
    assert p.dnat == frozenset({b(NatKind.DNAT, "192.0.2.64", "192.0.2.65")})
    assert not isinstance(p.egress, Unknown)
    assert set(p.egress) == {UP1, UP2}


def test_an_address_set_of_the_other_version_never_holds_the_address() -> None:
    """An IPv4 rule matching the destination against a set of IPv6 addresses (an ipset of family
    inet6 in an iptables IPv4 rule): ``ip_set_test`` answers "not in the set" for a packet of
    another family, so ``--match-set`` is false and ``! --match-set`` true."""
    v6 = IntervalSet(((int(ip_address("fd00::1")), int(ip_address("fd00::1"))),), version=6)
    sel = Selector(Key.DADDR, "-m set --match-set v6 dst", family=AF_INET)
    to = (ip_address("10.0.1.50"), ip_address("10.0.1.50"))
    for op, bound in ((Op.EQ, False), (Op.NE, True)):
        rule = Rule(7, (Match(sel, op, v6, "match-set"), NatStatement(NatKind.DNAT, "dnat to 10.0.1.50", addr=to)))
        pre = Chain("ip", "nat", "pre", (rule,), Hook.PREROUTING, -100, "nat", "accept")
        want = B(NatKind.DNAT, "10.0.1.50") if bound else NO_NAT
        assert predict(NatRuleset((pre,), marks_known=True), FIB, udp()).dnat == frozenset({want}), op


def test_a_port_match_without_a_protocol_on_an_icmp_flow_is_unknown_with_its_reason() -> None:
    """``th dport 53`` (no protocol dependency) on an ICMP packet reads bytes that are no port:
    not modelled, unknown, said so."""
    from topowatch.core.flow import Flow

    th = Match(Selector(Key.DPORT, "th dport"), Op.EQ, IntervalSet(((53, 53),)), "th dport 53")
    to = (ip_address("10.0.1.50"), ip_address("10.0.1.50"))
    pre = Chain("ip", "nat", "pre", (Rule(7, (th, NatStatement(NatKind.DNAT, "dnat to 10.0.1.50", addr=to))),),
                Hook.PREROUTING, -100, "nat", "accept")
    icmp = Flow(AF_INET, 1, ip_address("10.0.1.2"), ip_address("192.0.2.10"), 0, 0)
    p = predict(NatRuleset((pre,), marks_known=True), FIB, icmp)
    assert isinstance(p.dnat, Unknown)
    assert p.dnat.reason == ("dnat unknown: table ip nat chain pre handle 7: th dport 53 dnat to 10.0.1.50: th dport "
                             "of a icmp packet reads no port")


def test_a_masked_port_match_after_a_dnat_to_a_port_range_is_unknown_with_its_reason() -> None:
    """``dnat to :5000-5001`` leaves the port to the kernel's pick; postrouting's ``udp dport &
    0xff00 == 0x1300`` is read for each port of the range, which the model does not: unknown, said
    so (not answered for one port of the range)."""
    pre = Chain("ip", "nat", "pre", (Rule(5, (NatStatement(NatKind.DNAT, "dnat to :5000-5001", ports=(5000, 5001)),)),),
                Hook.PREROUTING, -100, "nat", "accept")
    masked = Match(Selector(Key.DPORT, "udp dport & 0xff00", proto=17, mask=0xFF00), Op.EQ,
                   IntervalSet(((0x1300, 0x1300),)), "udp dport & 0xff00 0x1300")
    post = Chain("ip", "nat", "post", (Rule(8, (masked, NatStatement(NatKind.MASQUERADE, "masquerade"))),),
                 Hook.POSTROUTING, 100, "nat", "accept")
    p = predict(NatRuleset((pre, post), marks_known=True), FIB, udp())
    assert isinstance(p.snat, Unknown)
    assert p.snat.reason.endswith("table ip nat chain post handle 8: udp dport & 0xff00 0x1300 masquerade: "
                                  "udp dport & 0xff00 of a range of values"), p.snat.reason
