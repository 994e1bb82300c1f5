# SPDX-License-Identifier: GPL-2.0-or-later
"""Several unknowns in one xfrm question: the answer is unknown, naming the first, never an error.

``Unknown`` refuses a truth value (``if unknown:`` raises); a question that
meets a second unknown after a first must still answer. Cases, each with
two unknowns in the kernel's order:
- two policies whose marks need the packet mark, which is unknown
  (``xfrm_policy_match``: ``(mark & m) != v``), before any that matches;
- one selector with two unanswerable parts: an output interface
  (``flowi_oif``, not given) and the ports of a GRE flow (its key halves);
- two SAs for one template whose selectors cannot be answered, or whose
  local ends routing picks (``xfrm_state_find`` looks at every SA).
Expectations follow from the kernel's order of evaluation, not from ``core.xfrm``.
"""

from __future__ import annotations

from ipaddress import ip_address, ip_network

from topowatch.core.flow import IPPROTO_UDP, Flow, Unknown
from topowatch.core.model import AF_INET, Address, Link, Nexthop, Route, Topology
from topowatch.core.xfrm import (
    Direction,
    Mode,
    XfrmFlow,
    XfrmPolicy,
    XfrmSelector,
    XfrmState,
    XfrmTemplate,
    lookup,
    output_policy,
    selector_match,
)

A = ip_address
N = ip_network
HERE, LAN, PEER = A("203.0.113.2"), A("10.0.1.1"), A("198.51.100.1")


def udp(mark: int | None) -> Flow:
    return Flow(AF_INET, IPPROTO_UDP, A("10.0.1.2"), A("192.0.2.10"), 5060, 5060, packet_mark=mark)


def test_two_policies_needing_an_unknown_mark() -> None:
    one = XfrmPolicy(XfrmSelector(AF_INET), Direction.OUT, priority=1, index=1, mark=1, mark_mask=0xFF)
    two = XfrmPolicy(XfrmSelector(AF_INET), Direction.OUT, priority=2, index=2, mark=2, mark_mask=0xFF)
    rest = XfrmPolicy(XfrmSelector(AF_INET), Direction.OUT, priority=3, index=3)
    got = output_policy((rest, two, one), udp(None))
    assert isinstance(got, Unknown)
    assert got.reason == ("xfrm policy src 0.0.0.0/0 dst 0.0.0.0/0 dir out priority 1 index 1 mark 0x1/0xff: "
                          "its mark needs the packet mark, which is unknown")
    assert output_policy((rest, two, one), udp(2)) == two
    assert output_policy((rest, two, one), udp(3)) == rest


def test_a_selector_with_two_unanswerable_parts() -> None:
    sel = XfrmSelector(AF_INET, N("10.0.1.0/24"), N("192.0.2.0/24"), dport=1, dport_mask=0xFFFF, proto=47,
                       ifindex=3)
    gre = XfrmFlow(AF_INET, 47, A("10.0.1.2"), A("192.0.2.10"), 0, 0, None, 0, None)
    got = selector_match(sel, gre)
    assert isinstance(got, Unknown)
    assert got.reason == "the selector names an output interface, which is unknown"
    # A part that is false answers, whatever the unknown ones.
    elsewhere = XfrmFlow(AF_INET, 47, A("10.0.2.2"), A("192.0.2.10"), 0, 0, None, 0, None)
    assert selector_match(sel, elsewhere) is False


def topo(template: XfrmTemplate, *states: XfrmState) -> Topology:
    policy = XfrmPolicy(XfrmSelector(AF_INET, N("10.0.1.0/24"), N("192.0.2.0/24")), Direction.OUT, priority=100,
                        index=1, templates=(template,))
    return Topology(
        links=(Link(1, "lo"), Link(2, "lan0"), Link(3, "up1")),
        addresses=(Address(2, LAN, 24), Address(3, HERE, 24)),
        routes=(Route(N("0.0.0.0/0"), nexthops=(Nexthop(3, A("203.0.113.1")),)),),
        xfrm_policies=(policy,),
        xfrm_states=states,
        xfrm_known=True,
    )


def test_two_sas_that_cannot_be_told() -> None:
    keyed = XfrmSelector(AF_INET, N("10.0.1.0/24"), N("192.0.2.0/24"), dport=1, dport_mask=0xFFFF, proto=47)
    t = topo(XfrmTemplate(AF_INET, PEER, HERE, reqid=1, mode=Mode.TUNNEL),
             XfrmState(AF_INET, PEER, HERE, 50, 0x100, reqid=1, mode=Mode.TUNNEL, selector=keyed),
             XfrmState(AF_INET, PEER, HERE, 50, 0x200, reqid=1, mode=Mode.TUNNEL, selector=keyed))
    got = lookup(t, Flow(AF_INET, 47, A("10.0.1.2"), A("192.0.2.10"), packet_mark=0))
    assert isinstance(got, Unknown) and "SA esp spi 0x100 " in got.reason and "0x200" not in got.reason
    # Rekeyed: two SAs from this host for a template whose local end routing picks.
    routed = topo(XfrmTemplate(AF_INET, PEER, A("0.0.0.0"), reqid=1, mode=Mode.TUNNEL),
                  XfrmState(AF_INET, PEER, HERE, 50, 0x100, reqid=1, mode=Mode.TUNNEL),
                  XfrmState(AF_INET, PEER, HERE, 50, 0x200, reqid=1, mode=Mode.TUNNEL))
    got = lookup(routed, udp(0))
    assert isinstance(got, Unknown) and "SA esp spi 0x100 " in got.reason and "0x200" not in got.reason
