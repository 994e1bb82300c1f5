# SPDX-License-Identifier: GPL-2.0-or-later
"""Which SA resolves a template (``xfrm_state_find``), and when the snapshot cannot tell.

From ``net/xfrm/xfrm_state.c`` and ``xfrm_policy.c``:
- a candidate SA has the template's family, reqid, mode and protocol, and
  the template's SPI when the template names one
  (``tmpl->id.spi == x->id.spi || !tmpl->id.spi``);
- ``xfrm_state_look_at`` skips an SA whose selector has a family other than
  the flow's, or does not select the flow, and looks further: a later SA
  may still resolve the template;
- ``__xfrm4_state_addr_check``: the SA's source is the template's local
  end, or either is the wildcard. In tunnel mode a template without a local
  end gets one from routing (``xfrm_get_saddr``), always one of this host's
  addresses: an SA from another host's address never resolves it, one from
  a local address may (which one routing picks is not modelled: unknown).
Expectations follow from those rules, not from ``core.xfrm``.
"""

from __future__ import annotations

from ipaddress import ip_address, ip_network

from topowatch.core.flow import IPPROTO_UDP, Flow, Unknown
from topowatch.core.model import AF_INET, AF_INET6, Address, Link, Nexthop, Route, Topology
from topowatch.core.xfrm import (
    Direction,
    Mode,
    OutputDecision,
    PolicyElement,
    XfrmFlow,
    XfrmPolicy,
    XfrmSelector,
    XfrmState,
    XfrmTemplate,
    has_bundle,
    lookup,
    nft_match,
    policy_match,
)

from test_xfrm import RT, ipsec, nft  # isort: skip

A = ip_address
N = ip_network
HERE, LAN, PEER = A("203.0.113.2"), A("10.0.1.1"), A("198.51.100.1")
ANY4 = A("0.0.0.0")
POLICY_TEXT = "xfrm policy src 10.0.1.0/24 dst 192.0.2.0/24 dir out priority 100 index 1"


def topo(template: XfrmTemplate, *states: XfrmState) -> Topology:
    policy = XfrmPolicy(XfrmSelector(AF_INET, N("10.0.1.0/24"), N("192.0.2.0/24")), Direction.OUT, priority=100,
                        index=1, templates=(template,))
    return Topology(
        links=(Link(1, "lo"), Link(2, "lan0"), Link(3, "up1")),
        addresses=(Address(2, LAN, 24), Address(3, HERE, 24)),
        routes=(Route(N("0.0.0.0/0"), nexthops=(Nexthop(3, A("203.0.113.1")),)),
                Route(N("10.0.1.0/24"), nexthops=(Nexthop(2),))),
        xfrm_policies=(policy,),
        xfrm_states=states,
        xfrm_known=True,
    )


def tmpl(saddr: object = HERE, spi: int = 0) -> XfrmTemplate:
    return XfrmTemplate(AF_INET, PEER, saddr, spi=spi, reqid=1, mode=Mode.TUNNEL)  # type: ignore[arg-type]


def sa(spi: int = 0x100, saddr: object = HERE, selector: XfrmSelector | None = None) -> XfrmState:
    kw = {} if selector is None else {"selector": selector}
    return XfrmState(AF_INET, PEER, saddr, 50, spi, reqid=1, mode=Mode.TUNNEL, **kw)  # type: ignore[arg-type]


def udp() -> Flow:
    return Flow(AF_INET, IPPROTO_UDP, A("10.0.1.2"), A("192.0.2.10"), 5060, 5060, packet_mark=0)


def gre() -> Flow:
    return Flow(AF_INET, 47, A("10.0.1.2"), A("192.0.2.10"), packet_mark=0)


def resolved(t: Topology, flow: Flow) -> tuple[XfrmState, ...]:
    got = lookup(t, flow)
    assert not isinstance(got, Unknown), got
    assert got.bundle and not got.missing, got
    return got.states


def missing(t: Topology, flow: Flow) -> None:
    got = lookup(t, flow)
    assert not isinstance(got, Unknown), got
    assert got.missing == got.policy.templates and not got.states, got  # type: ignore[union-attr]


def test_a_template_naming_an_spi_takes_only_that_sa() -> None:
    assert resolved(topo(tmpl(spi=0x100), sa(0x100)), udp()) == (sa(0x100),)
    missing(topo(tmpl(spi=0x100), sa(0x200)), udp())
    assert resolved(topo(tmpl(spi=0x100), sa(0x200), sa(0x100)), udp()) == (sa(0x100),)


def test_an_sa_selecting_another_family_is_skipped() -> None:
    v6 = XfrmSelector(AF_INET6, N("2001:db8::/32"), N("::/0"))
    missing(topo(tmpl(), sa(selector=v6)), udp())


def test_an_sa_that_does_not_select_the_flow_is_skipped_for_a_later_one() -> None:
    other = sa(0x100, selector=XfrmSelector(AF_INET, N("10.9.0.0/16"), N("0.0.0.0/0")))
    assert resolved(topo(tmpl(), other, sa(0x200)), udp()) == (sa(0x200),)


def test_an_sa_whose_selector_cannot_be_answered() -> None:
    keyed = sa(0x100, selector=XfrmSelector(AF_INET, N("10.0.1.0/24"), N("192.0.2.0/24"), dport=1,
                                            dport_mask=0xFFFF, proto=47))
    got = lookup(topo(tmpl(), keyed), gre())
    assert isinstance(got, Unknown)
    assert got.reason == (f"{POLICY_TEXT} tmpl esp tunnel 203.0.113.2->198.51.100.1 reqid 1: SA esp spi 0x100 "
                          "203.0.113.2->198.51.100.1 reqid 1 mode tunnel: selector ports of a gre flow are not modelled")
    # A later SA that selects every flow resolves the template whatever the first one would do.
    assert has_bundle(topo(tmpl(), keyed, sa(0x200)), gre()) is True


def test_the_local_end_of_the_sa_must_be_the_templates() -> None:
    # Another local address is not the template's local end.
    missing(topo(tmpl(), sa(saddr=LAN)), udp())
    missing(topo(tmpl(), sa(saddr=A("192.0.2.99"))), udp())
    # An SA from any address resolves every local end.
    assert resolved(topo(tmpl(), sa(saddr=ANY4)), udp()) == (sa(saddr=ANY4),)


def test_a_template_leaving_its_local_end_to_routing() -> None:
    # From one of this host's addresses: routing may pick it, or another: unknown, naming the SA.
    for local in (HERE, LAN):
        got = lookup(topo(tmpl(saddr=ANY4), sa(saddr=local)), udp())
        assert isinstance(got, Unknown), got
        assert got.reason == (f"{POLICY_TEXT} tmpl esp tunnel 0.0.0.0->198.51.100.1 reqid 1: SA esp spi 0x100 "
                              f"{local}->198.51.100.1 reqid 1 mode tunnel: the template leaves the local tunnel end "
                              "to routing")
    # From another host's address: routing never picks it.
    missing(topo(tmpl(saddr=ANY4), sa(saddr=A("192.0.2.99"))), udp())
    # The first SA that cannot be told is named; a later resolving one gives the bundle, with the
    # SA routing may pick as its rival (below).
    got = lookup(topo(tmpl(saddr=ANY4), sa(0x100, saddr=HERE), sa(0x200, saddr=LAN)), udp())
    assert isinstance(got, Unknown) and "SA esp spi 0x100 " in got.reason
    assert resolved(topo(tmpl(saddr=ANY4), sa(0x100, saddr=HERE), sa(0x200, saddr=ANY4)), udp()) == (
        sa(0x200, saddr=ANY4),)


# -- a rekey: more than one SA the kernel may take -------------------------------------------
# ``xfrm_state_find`` looks up SAs with the template's source address first and falls back to
# wildcard-source SAs only where none is valid; among the valid ones it takes the best
# (``xfrm_state_look_at``: ``km.dying`` lower, then ``curlft.add_time`` newer). A dump shows
# neither ``km.dying`` nor which SA a cached bundle holds: with two SAs side by side (a rekey),
# what differs between them, their SPI, is unknown; reqid, protocol, mode, addresses agree.

XF = XfrmFlow(AF_INET, IPPROTO_UDP, A("10.0.1.2"), A("192.0.2.10"), 5060, 5060, None, 0, 3)


def rule_match(t: Topology, key: str, right: object, **kw: object) -> bool | Unknown:
    return nft_match(nft(ipsec(key, **kw), right), t, XF, "postrouting", local=False)


def test_a_rekey_leaves_the_spi_unknown_and_everything_else_known() -> None:
    t = topo(tmpl(), sa(0x100), sa(0x200))
    got = lookup(t, udp())
    assert not isinstance(got, Unknown) and got.bundle and got.rivals is not None, got
    assert "reqid 1 has spi 0x100 or spi 0x200" in got.rivals.reason and not got.rival_sources
    for spi in (0x100, 0x200, 0x300):
        spi_match = rule_match(t, "spi", spi)
        assert isinstance(spi_match, Unknown) and "spi 0x100 or spi 0x200" in spi_match.reason, spi_match
    assert rule_match(t, "reqid", 1) is True
    assert rule_match(t, "daddr", str(PEER), family="ip") is True
    assert rule_match(t, "saddr", str(HERE), family="ip") is True
    assert nft_match(nft(RT, True), t, XF, "postrouting", local=False) is True
    by_spi = policy_match(t, udp(), "out", "ipsec", [PolicyElement(spi=0x100)], oif=3)
    assert isinstance(by_spi, Unknown), by_spi
    assert policy_match(t, udp(), "out", "ipsec", [PolicyElement(reqid=1)], oif=3) is True
    assert policy_match(t, udp(), "out", "ipsec", [PolicyElement(tunnel_src=N("203.0.113.0/24"))], oif=3) is True
    # One SA: its SPI is known.
    one = topo(tmpl(), sa(0x200))
    assert rule_match(one, "spi", 0x200) is True and rule_match(one, "spi", 0x100) is False
    assert policy_match(one, udp(), "out", "ipsec", [PolicyElement(spi=0x100)], oif=3) is False


def test_an_sa_from_the_templates_own_address_is_taken_before_one_from_any() -> None:
    for order in ((sa(0x100, saddr=ANY4), sa(0x200)), (sa(0x200), sa(0x100, saddr=ANY4))):
        t = topo(tmpl(), *order)
        assert resolved(t, udp()) == (sa(0x200),)
        got = lookup(t, udp())
        assert not isinstance(got, Unknown) and got.rivals is None, got
        assert rule_match(t, "spi", 0x200) is True


def test_an_sa_routing_may_pick_beside_one_that_resolves_leaves_its_spi_and_source_unknown() -> None:
    t = topo(tmpl(saddr=ANY4), sa(0x100, saddr=HERE), sa(0x200, saddr=ANY4))
    got = lookup(t, udp())
    assert not isinstance(got, Unknown) and got.rivals is not None and got.rival_sources, got
    assert "may use another SA than spi 0x200" in got.rivals.reason, got.rivals
    assert isinstance(rule_match(t, "spi", 0x200), Unknown)
    assert isinstance(rule_match(t, "saddr", "0.0.0.0", family="ip"), Unknown)
    assert rule_match(t, "daddr", str(PEER), family="ip") is True
    by_src = policy_match(t, udp(), "out", "ipsec", [PolicyElement(tunnel_src=N("203.0.113.0/24"))], oif=3)
    assert isinstance(by_src, Unknown), by_src


def test_the_decision_of_a_rekey_and_of_one_sa_whole() -> None:
    t = topo(tmpl(), sa(0x100), sa(0x200))
    (policy,) = t.xfrm_policies
    bundle = "esp spi 0x100 203.0.113.2->198.51.100.1 reqid 1 mode tunnel"
    what = f"{POLICY_TEXT} tmpl esp tunnel 203.0.113.2->198.51.100.1 reqid 1"
    assert lookup(t, udp()) == OutputDecision(
        policy, (sa(0x100),), (), f"{what} selects it; bundle {bundle}",
        Unknown(f"{what}: reqid 1 has spi 0x100 or spi 0x200: the kernel takes the newest SA not dying, "
                "which a dump does not show (a rekey)"),
        False)
    one = topo(tmpl(), sa(0x100))
    assert lookup(one, udp()) == OutputDecision(policy, (sa(0x100),), (), f"{what} selects it; bundle {bundle}",
                                                None, False)


def test_a_second_template_without_its_sa_keeps_the_first_ones_sa() -> None:
    inner = XfrmTemplate(AF_INET, PEER, HERE, proto=51, reqid=2, mode=Mode.TUNNEL)
    t = topo(tmpl(), sa(0x100))
    (one,) = t.xfrm_policies
    policy = XfrmPolicy(one.selector, Direction.OUT, priority=100, index=1, templates=(tmpl(), inner))
    got = lookup(Topology(links=t.links, addresses=t.addresses, routes=t.routes, xfrm_policies=(policy,),
                          xfrm_states=t.xfrm_states, xfrm_known=True), udp())
    assert not isinstance(got, Unknown), got
    assert got.states == (sa(0x100),) and got.missing == (inner,) and got.rivals is None and not got.bundle


def test_ipsec_out_at_input_reads_no_bundle() -> None:
    """An input route carries no bundle: ``ipsec out`` breaks there, whatever the operator."""
    t = topo(tmpl(), sa(0x100))
    for op in ("==", "!="):
        assert nft_match(nft(ipsec("reqid"), 1, op), t, XF, "input", local=False) is False
        assert nft_match(nft(ipsec("spi"), 0x100, op), t, XF, "input", local=False) is False
