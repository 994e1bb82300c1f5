# SPDX-License-Identifier: GPL-2.0-or-later
"""core.xfrm's texts, compared whole: values as ``ip xfrm`` words, the lookup's reasons, refusals.

A stale entry's reason quotes them (the policy that selects the flow, the
SA it lacks, why the answer is unknown), so each is read here as a person
would: every value built inside its test. The words follow ``ip xfrm
policy``/``ip xfrm state`` (protocol names esp/ah/comp, else the number;
mode in lower case; marks and if_ids in hex).
"""

from __future__ import annotations

from ipaddress import ip_address, ip_network

import pytest

from topowatch.core.flow import IPPROTO_UDP, Flow, Unknown
from topowatch.core.model import AF_INET, Address, Link, Nexthop, Route, Topology
from topowatch.core.xfrm import (
    AF_UNSPEC,
    Action,
    Direction,
    Mode,
    OutputDecision,
    PolicyType,
    XfrmFlow,
    XfrmPolicy,
    XfrmSelector,
    XfrmState,
    XfrmTemplate,
    lookup,
    nft_match,
    selector_match,
)
from topowatch.edges.nft import parse_rule

A = ip_address
N = ip_network
HERE, PEER = A("203.0.113.2"), A("198.51.100.1")
ANY4 = A("0.0.0.0")


def test_template_words() -> None:
    assert XfrmTemplate(AF_INET, PEER, HERE, proto=99, reqid=3, mode=Mode.TUNNEL).describe() == (
        "99 tunnel 203.0.113.2->198.51.100.1 reqid 3")
    assert XfrmTemplate(AF_INET, ANY4, ANY4, spi=0x1234, optional=True).describe() == (
        "esp transport spi 0x1234 reqid 0 level use")
    assert XfrmTemplate(AF_INET, PEER, ANY4, proto=51, reqid=1, mode=Mode.BEET).describe() == (
        "ah beet 0.0.0.0->198.51.100.1 reqid 1")
    assert XfrmTemplate(AF_INET, ANY4, HERE, proto=108, reqid=1).describe() == (
        "comp transport 203.0.113.2->0.0.0.0 reqid 1")


def test_state_words() -> None:
    assert XfrmState(AF_INET, PEER, HERE, 99, 0x200, reqid=2, mode=Mode.BEET).describe() == (
        "99 spi 0x200 203.0.113.2->198.51.100.1 reqid 2 mode beet")
    assert XfrmState(AF_INET, PEER, HERE, 51, 0x300, reqid=1, mode=Mode.TUNNEL).describe() == (
        "ah spi 0x300 203.0.113.2->198.51.100.1 reqid 1 mode tunnel")


def test_selector_and_policy_words() -> None:
    assert XfrmSelector(AF_UNSPEC).describe() == "any"
    assert XfrmSelector(AF_INET).describe() == "src 0.0.0.0/0 dst 0.0.0.0/0"
    sel = XfrmSelector(AF_INET, N("10.0.1.0/24"), N("192.0.2.0/24"), sport=5060, sport_mask=0xFFFF, dport=53,
                       dport_mask=0xFFFF, proto=IPPROTO_UDP, ifindex=3)
    assert sel.describe() == "src 10.0.1.0/24 dst 192.0.2.0/24 proto udp sport 5060 dport 53 dev if3"
    tmpl = XfrmTemplate(AF_INET, PEER, HERE, reqid=1, mode=Mode.TUNNEL)
    full = XfrmPolicy(sel, Direction.OUT, priority=5, index=9, action=Action.BLOCK, templates=(tmpl,), mark=5,
                      mark_mask=0xFF, if_id=7, type=PolicyType.SUB)
    assert full.describe() == (
        "src 10.0.1.0/24 dst 192.0.2.0/24 proto udp sport 5060 dport 53 dev if3 dir out action block "
        "priority 5 index 9 ptype sub mark 0x5/0xff if_id 0x7 tmpl esp tunnel 203.0.113.2->198.51.100.1 reqid 1")
    assert XfrmPolicy(XfrmSelector(AF_INET), Direction.FWD, mark_mask=0xF).describe() == (
        "src 0.0.0.0/0 dst 0.0.0.0/0 dir fwd priority 0 index 0 mark 0x0/0xf")
    assert XfrmPolicy(XfrmSelector(AF_INET), 0).describe() == "src 0.0.0.0/0 dst 0.0.0.0/0 dir in priority 0 index 0"


def test_refusals_by_name() -> None:
    with pytest.raises(ValueError) as got:
        XfrmTemplate(3, PEER, HERE)
    assert str(got.value) == "XfrmTemplate.family must be AF_INET or AF_INET6, got 3"
    with pytest.raises(ValueError) as got:
        XfrmState(7, PEER, HERE, 50, 1)
    assert str(got.value) == "XfrmState.family must be AF_INET or AF_INET6, got 7"
    with pytest.raises(ValueError) as got:
        XfrmState(AF_INET, A("2001:db8::1"), HERE, 50, 1)
    assert str(got.value) == "XfrmState mixes address families: 203.0.113.2 -> 2001:db8::1"


# -- the lookup's reasons ---------------------------------------------------------------------

SEL = XfrmSelector(AF_INET, N("10.0.1.0/24"), N("192.0.2.0/24"))
WHAT = "xfrm policy src 10.0.1.0/24 dst 192.0.2.0/24 dir out priority 100 index 1"
ESP = XfrmTemplate(AF_INET, PEER, HERE, reqid=1, mode=Mode.TUNNEL)
AH = XfrmTemplate(AF_INET, PEER, HERE, proto=51, reqid=2, mode=Mode.TUNNEL)
ESP_TEXT = "esp tunnel 203.0.113.2->198.51.100.1 reqid 1"
AH_TEXT = "ah tunnel 203.0.113.2->198.51.100.1 reqid 2"


def topo(templates: tuple[XfrmTemplate, ...], states: tuple[XfrmState, ...] = (), **kw: object) -> Topology:
    policy = XfrmPolicy(SEL, Direction.OUT, priority=100, index=1, templates=templates, **kw)  # type: ignore[arg-type]
    return Topology(
        links=(Link(1, "lo"), Link(3, "up1")),
        addresses=(Address(3, HERE, 24),),
        routes=(Route(N("0.0.0.0/0"), nexthops=(Nexthop(3, A("203.0.113.1")),)),),
        xfrm_policies=(policy,),
        xfrm_states=states,
        xfrm_known=True,
    )


def udp() -> Flow:
    return Flow(AF_INET, IPPROTO_UDP, A("10.0.1.2"), A("192.0.2.10"), 5060, 5060, packet_mark=0)


def decided(t: Topology) -> OutputDecision:
    got = lookup(t, udp())
    assert not isinstance(got, Unknown), got
    return got


def test_reasons_of_each_outcome() -> None:
    none = decided(Topology(xfrm_known=True))
    assert none.policy is None and none.reason == "no xfrm policy selects it"
    bare = decided(topo(()))
    assert bare.policy is not None and bare.policy.index == 1 and not bare.in_ipsec
    assert bare.reason == f"{WHAT} selects it without templates: it leaves in the clear"
    blocked = decided(topo((ESP,), action=Action.BLOCK))
    assert blocked.blocked and blocked.reason == (
        "xfrm policy src 10.0.1.0/24 dst 192.0.2.0/24 dir out action block priority 100 index 1 "
        f"tmpl {ESP_TEXT} blocks it: the kernel drops its packets")
    absent = decided(topo((ESP, AH)))
    assert absent.reason == (
        f"{WHAT} tmpl {ESP_TEXT} tmpl {AH_TEXT} selects it but no SA for reqid 1 ({ESP_TEXT}), reqid 2 ({AH_TEXT}): "
        "the kernel drops its packets (asking the key manager for one) until an SA is installed")
    optional = XfrmTemplate(AF_INET, ANY4, ANY4, reqid=4, optional=True)
    clear = decided(topo((optional,)))
    assert not clear.bundle and clear.reason == (
        f"{WHAT} tmpl esp transport reqid 4 level use selects it but only optional templates without SAs: "
        "it leaves in the clear")
    both = decided(topo((ESP, AH), (XfrmState(AF_INET, PEER, HERE, 50, 0x100, reqid=1, mode=Mode.TUNNEL),
                                    XfrmState(AF_INET, PEER, HERE, 51, 0x200, reqid=2, mode=Mode.TUNNEL))))
    assert both.bundle and both.reason == (
        f"{WHAT} tmpl {ESP_TEXT} tmpl {AH_TEXT} selects it; bundle "
        "esp spi 0x100 203.0.113.2->198.51.100.1 reqid 1 mode tunnel, "
        "ah spi 0x200 203.0.113.2->198.51.100.1 reqid 2 mode tunnel")
    # An optional template without its SA beside a resolved one: the bundle is the resolved SA.
    one = decided(topo((optional, ESP), (XfrmState(AF_INET, PEER, HERE, 50, 0x100, reqid=1, mode=Mode.TUNNEL),)))
    assert one.bundle and one.reason.endswith(
        "selects it; bundle esp spi 0x100 203.0.113.2->198.51.100.1 reqid 1 mode tunnel")


def test_unknown_reasons_of_a_selector_and_of_a_match_at_prerouting() -> None:
    sel = XfrmSelector(AF_INET, N("10.0.1.0/24"), N("192.0.2.0/24"), dport=5060, dport_mask=0xFFFF)
    ranged = XfrmFlow(AF_INET, IPPROTO_UDP, A("10.0.1.2"), A("192.0.2.10"), 1, 5060, 5070, 0)
    got = selector_match(sel, ranged)
    assert isinstance(got, Unknown) and got.reason == "a port range only partly selected"
    on_dev = XfrmSelector(AF_INET, ifindex=3)
    got = selector_match(on_dev, XfrmFlow(AF_INET, IPPROTO_UDP, A("10.0.1.2"), A("192.0.2.10")))
    assert isinstance(got, Unknown) and got.reason == "the selector names an output interface, which is unknown"
    rule = parse_rule([{"match": {"op": "==", "left": {"ipsec": {"key": "reqid", "dir": "out"}}, "right": 1}}],
                      family="inet", table="t")
    m = rule.exprs[0]
    got = nft_match(m, topo((ESP,)), ranged, "prerouting", local=False)  # type: ignore[arg-type]
    assert isinstance(got, Unknown) and got.reason == "ipsec out reqid is not valid at prerouting"
