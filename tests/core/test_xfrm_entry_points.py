# SPDX-License-Identifier: GPL-2.0-or-later
"""core.xfrm's topology-level questions: the output interface they are given, and their defaults.

``__xfrm4_selector_match`` compares a selector's ifindex with the flow's
output interface (``flowi_oif``), 0 selecting any: ``in_ipsec``,
``has_bundle`` and ``policy_match`` must hand the ``oif`` they are given to
the lookup. ``policy_match``'s defaults are those of ``-m policy`` written
without ``--strict`` (any SA of the bundle may match an element) and of a
forwarded packet (``local`` False: it may carry a secpath). An IPv6
selector written without addresses selects every address (``::/0``).
Expectations follow from the kernel's rules, not from ``core.xfrm``.
"""

from __future__ import annotations

from ipaddress import ip_address, ip_network

from topowatch.core.flow import IPPROTO_UDP, Flow, Unknown
from topowatch.core.model import AF_INET, AF_INET6, Address, Link, Nexthop, Route, Topology
from topowatch.core.xfrm import (
    Direction,
    Mode,
    PolicyElement,
    XfrmPolicy,
    XfrmSelector,
    XfrmState,
    XfrmTemplate,
    has_bundle,
    in_ipsec,
    policy_match,
)

A = ip_address
N = ip_network
HERE, PEER = A("203.0.113.2"), A("198.51.100.1")


def topo(policies: tuple[XfrmPolicy, ...], states: tuple[XfrmState, ...]) -> Topology:
    return Topology(
        links=(Link(1, "lo"), Link(2, "lan0"), Link(3, "up1")),
        addresses=(Address(2, A("10.0.1.1"), 24), Address(3, HERE, 24)),
        routes=(Route(N("0.0.0.0/0"), nexthops=(Nexthop(3, A("203.0.113.1")),)),
                Route(N("10.0.1.0/24"), nexthops=(Nexthop(2),))),
        xfrm_policies=policies,
        xfrm_states=states,
        xfrm_known=True,
    )


def flow() -> Flow:
    return Flow(AF_INET, IPPROTO_UDP, A("10.0.1.2"), A("192.0.2.10"), 5060, 5060, packet_mark=0)


def tmpl(reqid: int, proto: int = 50) -> XfrmTemplate:
    return XfrmTemplate(AF_INET, PEER, HERE, proto=proto, reqid=reqid, mode=Mode.TUNNEL)


def sa(reqid: int, spi: int, proto: int = 50) -> XfrmState:
    return XfrmState(AF_INET, PEER, HERE, proto, spi, reqid=reqid, mode=Mode.TUNNEL)


def test_the_output_interface_reaches_the_selector() -> None:
    on_up1 = XfrmPolicy(XfrmSelector(AF_INET, N("10.0.1.0/24"), N("192.0.2.0/24"), ifindex=3), Direction.OUT,
                        index=1, templates=(tmpl(1),))
    t = topo((on_up1,), (sa(1, 0x100),))
    assert in_ipsec(t, flow(), oif=3) is True
    assert in_ipsec(t, flow(), oif=2) is False
    assert isinstance(in_ipsec(t, flow()), Unknown)  # no oif: the selector's interface cannot be compared
    assert has_bundle(t, flow(), oif=3) is True
    assert has_bundle(t, flow(), oif=2) is False
    assert isinstance(has_bundle(t, flow()), Unknown)
    assert policy_match(t, flow(), "out", "ipsec", oif=3) is True
    assert policy_match(t, flow(), "out", "none", oif=2) is True
    assert isinstance(policy_match(t, flow(), "out", "ipsec"), Unknown)


def test_policy_match_is_not_strict_and_forwarded_by_default() -> None:
    two = XfrmPolicy(XfrmSelector(AF_INET, N("10.0.1.0/24"), N("192.0.2.0/24")), Direction.OUT, index=1,
                     templates=(tmpl(1), tmpl(2, proto=51)))
    t = topo((two,), (sa(1, 0x100), sa(2, 0x200, proto=51)))
    # Not strict: the second SA of the bundle matches the one element.
    assert policy_match(t, flow(), "out", "ipsec", (PolicyElement(reqid=2),)) is True
    assert policy_match(t, flow(), "out", "ipsec", (PolicyElement(reqid=2),), True) is False
    # Forwarded: an SA ending at this host makes the secpath unknown; a local flow has none.
    inbound = XfrmState(AF_INET, HERE, PEER, 50, 0x300, reqid=9, mode=Mode.TUNNEL)
    t_in = topo((), (inbound,))
    assert isinstance(policy_match(t_in, flow(), "in", "ipsec"), Unknown)
    assert policy_match(t_in, flow(), "in", "ipsec", local=True) is False
    assert policy_match(t_in, flow(), "in", "none", local=True) is True


def test_an_ipv6_selector_without_addresses_selects_every_address() -> None:
    s = XfrmSelector(AF_INET6)
    assert s.src == N("::/0") and s.dst == N("::/0")
    s4 = XfrmSelector(AF_INET)
    assert s4.src == N("0.0.0.0/0") and s4.dst == N("0.0.0.0/0")


def test_a_mark_given_to_output_policy_replaces_only_the_flows_mark() -> None:
    """``output_policy(..., mark)``: the lookup's ``flowi_mark`` is that mark; every other field is the flow's."""
    from topowatch.core.xfrm import XfrmFlow, output_policy

    def xflow(dport_hi: int | None = None, kind: str = "") -> XfrmFlow:
        return XfrmFlow(AF_INET, IPPROTO_UDP, A("10.0.1.2"), A("192.0.2.10"), 4000, 5060, dport_hi, None, 3, kind)

    marked = XfrmPolicy(XfrmSelector(AF_INET, N("10.0.1.0/24"), N("192.0.2.0/24"), sport=4000, sport_mask=0xFFFF,
                                     dport=5060, dport_mask=0xFFFF, proto=IPPROTO_UDP, ifindex=3),
                        Direction.OUT, index=1, mark=5, mark_mask=0xFF)
    assert output_policy((marked,), xflow(), 0x105) == marked
    assert output_policy((marked,), xflow(), 0x106) is None
    assert isinstance(output_policy((marked,), xflow()), Unknown)  # the flow's own mark is unknown
    part = output_policy((marked,), xflow(dport_hi=5070), 0x105)
    assert isinstance(part, Unknown) and "partly" in part.reason
    if_id = XfrmPolicy(XfrmSelector(AF_INET), Direction.OUT, index=2, if_id=9)
    assert isinstance(output_policy((if_id,), xflow(kind="xfrm"), 0), Unknown)
    assert output_policy((if_id,), xflow(), 0) is None


def test_selector_match_of_an_empty_selector_and_of_another_family() -> None:
    """``xfrm_selector_match``: a selector of family 0 (an SA's, unset) selects every flow; one of another
    family selects none, whatever its prefixes (``::/0`` here)."""
    from topowatch.core.xfrm import AF_UNSPEC, XfrmFlow, selector_match

    v4 = XfrmFlow(AF_INET, IPPROTO_UDP, A("10.0.1.2"), A("192.0.2.10"), 1, 2)
    assert selector_match(XfrmSelector(AF_UNSPEC), v4) is True
    assert selector_match(XfrmSelector(AF_INET6), v4) is False
    assert selector_match(XfrmSelector(AF_INET), v4) is True
