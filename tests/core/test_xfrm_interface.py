# SPDX-License-Identifier: GPL-2.0-or-later
"""An output interface's kind, read from the topology, and the flow the lookup then compares.

``xfrm_policy_match`` refuses a policy whose if_id is not the lookup's: 0
for a packet routed through an ordinary interface, the interface's if_id
for one routed through an xfrm interface (``ip link add ... type xfrm
if_id N``). The snapshot does not hold that if_id, so a policy with an
if_id is unknown for a flow leaving through an xfrm interface and never
selects one leaving elsewhere. ``lookup`` learns the interface's kind from
the topology's links by the flow's ``oif``; the flow it then looks up is
the very flow it was given (every field compared by some selector).
Expectations follow from the kernel's rules, not from ``core.xfrm``.
"""

from __future__ import annotations

from ipaddress import ip_address, ip_network

import pytest

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
    in_ipsec,
    lookup,
)

A = ip_address
N = ip_network
HERE, PEER = A("203.0.113.2"), A("198.51.100.1")
XFRMI, UP1, WG = 5, 3, 6


def topo(*policies: XfrmPolicy) -> Topology:
    return Topology(
        links=(Link(1, "lo"), Link(UP1, "up1"), Link(XFRMI, "ipsec0", kind="xfrm"), Link(WG, "wg0", kind="wireguard")),
        addresses=(Address(UP1, HERE, 24),),
        routes=(Route(N("0.0.0.0/0"), nexthops=(Nexthop(UP1, A("203.0.113.1")),)),),
        xfrm_policies=policies,
        xfrm_states=(XfrmState(AF_INET, PEER, HERE, 50, 0x100, reqid=1, mode=Mode.TUNNEL),),
        xfrm_known=True,
    )


TMPL = (XfrmTemplate(AF_INET, PEER, HERE, reqid=1, mode=Mode.TUNNEL),)
IF_ID = XfrmPolicy(XfrmSelector(AF_INET), Direction.OUT, priority=0, index=1, if_id=7, templates=TMPL)
PLAIN = XfrmPolicy(XfrmSelector(AF_INET, N("10.0.1.0/24"), N("192.0.2.0/24")), Direction.OUT, priority=10, index=2,
                   templates=TMPL)


def flow() -> Flow:
    return Flow(AF_INET, IPPROTO_UDP, A("10.0.1.2"), A("192.0.2.10"), 5060, 5060, packet_mark=0)


def test_a_policy_with_an_if_id_is_unknown_through_an_xfrm_interface_only() -> None:
    t = topo(IF_ID, PLAIN)
    through = lookup(t, flow(), oif=XFRMI)
    assert isinstance(through, Unknown) and "if_id" in through.reason
    xf = lookup(t, XfrmFlow.of(flow(), oif=XFRMI))
    assert isinstance(xf, Unknown) and "if_id" in xf.reason
    # Elsewhere (an ordinary link, a link of another kind, no oif) the if_id policy is skipped.
    for oif in (UP1, WG, None):
        got = lookup(t, flow(), oif=oif)
        assert not isinstance(got, Unknown), (oif, got)
        assert got.policy == PLAIN and got.bundle
    # An oif the topology does not know: no kind, the if_id policy is skipped.
    got = lookup(t, flow(), oif=99)
    assert not isinstance(got, Unknown) and got.policy == PLAIN


def test_a_kind_given_with_the_flow_is_kept() -> None:
    t = topo(IF_ID, PLAIN)
    assert XfrmFlow.of(flow(), oif=UP1, oif_kind="xfrm").oif_kind == "xfrm"
    assert XfrmFlow.of(flow(), oif=UP1).oif_kind == ""
    assert isinstance(in_ipsec(t, XfrmFlow.of(flow(), oif=WG, oif_kind="xfrm")), Unknown)


@pytest.mark.parametrize("oif", [XFRMI, WG])
def test_the_flow_looked_up_after_the_kind_is_learnt_is_the_flow_given(oif: int) -> None:
    selected = XfrmPolicy(XfrmSelector(
        AF_INET, N("10.0.1.2/32"), N("192.0.2.10/32"), sport=5060, sport_mask=0xFFFF, dport=5060,
        dport_mask=0xFFFF, proto=IPPROTO_UDP, ifindex=oif), Direction.OUT, priority=5, index=3, mark=1,
        mark_mask=0xFF, templates=TMPL)
    t = topo(selected)
    f = XfrmFlow(AF_INET, IPPROTO_UDP, A("10.0.1.2"), A("192.0.2.10"), 5060, 5060, None, 0x101, oif)
    got = lookup(t, f)
    assert not isinstance(got, Unknown), got
    assert got.policy == selected and got.bundle
    # A destination port range only partly selected stays a range once the kind is learnt.
    ranged = XfrmFlow(AF_INET, IPPROTO_UDP, A("10.0.1.2"), A("192.0.2.10"), 5060, 5060, 5070, 0x101, oif)
    part = lookup(t, ranged)
    assert isinstance(part, Unknown) and "partly" in part.reason
    # An unknown mark stays unknown.
    unmarked = XfrmFlow(AF_INET, IPPROTO_UDP, A("10.0.1.2"), A("192.0.2.10"), 5060, 5060, None, None, oif)
    assert isinstance(lookup(t, unmarked), Unknown)
