# SPDX-License-Identifier: GPL-2.0-or-later
"""``core.xtmatch`` called directly: the conntrack state, status and tuple matches, ``-m policy``.

Every expectation is worked by hand from ``net/netfilter/xt_conntrack.c`` and
``xt_policy.c`` (see each test), for one flow whose first packet is, at the
nat hook, as ``Packet`` says (after a DNAT where one is given). Reasons are
compared whole: a reason is what a person reads in a plan.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from typing import Any

import pytest

from topowatch.core.fib import Fib
from topowatch.core.flow import IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Egress, EgressKind, Flow, Unknown
from topowatch.core.model import AF_INET, Address, IPAddress, Link, Nexthop, Route, Topology
from topowatch.core.nat import (
    CtStateMatch,
    CtStatusMatch,
    CtTupleMatch,
    Hook,
    IntervalSet,
    PolicyElement,
    PolicyMatch,
)
from topowatch.core.xfrm import Direction, Mode, XfrmPolicy, XfrmSelector, XfrmState, XfrmTemplate
from topowatch.core.xtmatch import xt_match

A = ip_address
LO, LAN, UP1 = 1, 2, 3
# UDP 10.0.1.2:40000 -> 192.0.2.10:5060, arriving on lan, leaving on up1.
FLOW = Flow(AF_INET, IPPROTO_UDP, A("10.0.1.2"), A("192.0.2.10"), 40000, 5060)
UP1_EGRESS = Egress(EgressKind.UNICAST, UP1, "up1", A("203.0.113.1"))


@dataclass(frozen=True)
class Packet:
    family: int
    proto: int
    saddr: IPAddress
    daddr: IPAddress
    sport: int
    dport: tuple[int, int]
    iif: object = None
    oif: object = UP1_EGRESS
    dst_nat: bool | None = False


def packet_of(flow: Flow, **kw: Any) -> Packet:
    """The flow's first packet, unchanged unless ``kw`` says (a DNAT's address or port, ...)."""
    fields: dict[str, Any] = {"family": flow.family, "proto": flow.proto, "saddr": flow.src,
                              "daddr": flow.dst, "sport": flow.sport, "dport": (flow.dport, flow.dport)}
    fields.update(kw)
    return Packet(**fields)


EMPTY_FIB = Fib(Topology())


# --- --ctstate / --ctstatus: the first packet is NEW, nothing seen or set yet ---------------------


def test_ctstate_and_ctstatus_unknown_name_each_unmodelled_word_in_order() -> None:
    # RELATED is never told apart; DNAT is the packet's dst_nat bit (None: not known).
    m = CtStateMatch(frozenset({"RELATED", "DNAT"}), False, "-m conntrack --ctstate RELATED,DNAT")
    want = Unknown("ctstate DNAT,RELATED of the flow's first packet is not modelled")
    assert xt_match(m, packet_of(FLOW, dst_nat=None), EMPTY_FIB, FLOW, hook=Hook.POSTROUTING) == want
    negated = CtStateMatch(m.states, True, "-m conntrack ! --ctstate RELATED,DNAT")
    assert xt_match(negated, packet_of(FLOW, dst_nat=None), EMPTY_FIB, FLOW, hook=Hook.POSTROUTING) == want
    # Known once the DNAT bit is: only RELATED is left.
    assert xt_match(m, packet_of(FLOW, dst_nat=False), EMPTY_FIB, FLOW, hook=Hook.POSTROUTING) == Unknown(
        "ctstate RELATED of the flow's first packet is not modelled")
    # A true state settles the list whatever else it names.
    new = CtStateMatch(frozenset({"NEW", "RELATED"}), False, "-m conntrack --ctstate NEW,RELATED")
    assert xt_match(new, packet_of(FLOW), EMPTY_FIB, FLOW, hook=Hook.POSTROUTING) is True
    s = CtStatusMatch(frozenset({"EXPECTED", "ASSURED"}), False, "-m conntrack --ctstatus EXPECTED,ASSURED")
    assert xt_match(s, packet_of(FLOW), EMPTY_FIB, FLOW, hook=Hook.POSTROUTING) == Unknown(
        "ctstatus EXPECTED of the flow's first packet is not modelled")
    seen = CtStatusMatch(frozenset({"SEEN_REPLY", "ASSURED"}), False, "-m conntrack --ctstatus SEEN_REPLY,ASSURED")
    assert xt_match(seen, packet_of(FLOW), EMPTY_FIB, FLOW, hook=Hook.POSTROUTING) is False
    not_seen = CtStatusMatch(seen.statuses, True, "-m conntrack ! --ctstatus SEEN_REPLY,ASSURED")
    assert xt_match(not_seen, packet_of(FLOW), EMPTY_FIB, FLOW, hook=Hook.POSTROUTING) is True


# --- --ctorigsrc/--ctorigdst/--ctorigsrcport/--ctorigdstport/--ctproto: the original tuple --------


def addrs(prefix: str) -> IntervalSet:
    net = ip_network(prefix)
    return IntervalSet(((int(net.network_address), int(net.broadcast_address)),), net.version)


def ports(lo: int, hi: int | None = None) -> IntervalSet:
    return IntervalSet(((lo, lo if hi is None else hi),))


# After a DNAT to 10.0.9.9:5353: the conntrack tuple matches read the original tuple, not the packet.
DNATED = packet_of(FLOW, daddr=A("10.0.9.9"), dport=(5353, 5353), dst_nat=True)

# (field, values, negate, the answer for FLOW)
TUPLE_CASES: list[tuple[str, IntervalSet, bool, bool]] = [
    ("origsrc", addrs("10.0.1.0/24"), False, True),
    ("origsrc", addrs("10.0.1.0/24"), True, False),
    ("origsrc", addrs("192.0.2.0/24"), False, False),  # the destination's prefix
    ("origsrc", addrs("192.0.2.0/24"), True, True),
    ("origdst", addrs("192.0.2.0/24"), False, True),
    ("origdst", addrs("10.0.1.0/24"), False, False),  # the source's prefix
    ("origdst", addrs("10.0.9.9/32"), False, False),  # where the DNAT sent it: not the original tuple
    ("origdst", addrs("192.0.2.10/32"), True, False),
    # An address of the other family is never in the tuple: false, negated true.
    ("origsrc", addrs("::/0"), False, False),
    ("origdst", addrs("::/0"), True, True),
    ("origsrcport", ports(40000), False, True),
    ("origsrcport", ports(5060), False, False),  # the destination port
    ("origsrcport", ports(5060), True, True),
    ("origdstport", ports(5060), False, True),
    ("origdstport", ports(40000), False, False),  # the source port
    ("origdstport", ports(5353), False, False),  # the DNAT's port
    ("origdstport", ports(5000, 5100), False, True),
    ("origdstport", ports(5061, 65535), True, True),
    ("proto", ports(IPPROTO_UDP), False, True),
    ("proto", ports(IPPROTO_TCP), False, False),
    ("proto", ports(IPPROTO_TCP), True, True),
    ("proto", ports(0, 0xFF), False, True),  # --ctproto all
]


@pytest.mark.parametrize(("field", "values", "negate", "want"), TUPLE_CASES,
                         ids=[f"{'! ' if n else ''}{f} {v.describe()}" for f, v, n, _ in TUPLE_CASES])
def test_ct_tuple_matches_read_the_original_tuple(field: str, values: IntervalSet, negate: bool, want: bool) -> None:
    m = CtTupleMatch(field, values, negate, f"-m conntrack --ct{field}")
    assert xt_match(m, DNATED, EMPTY_FIB, FLOW, hook=Hook.POSTROUTING) is want
    assert xt_match(m, packet_of(FLOW), EMPTY_FIB, FLOW, hook=Hook.POSTROUTING) is want


def test_ct_tuple_unknown_without_a_flow_ports_or_a_modelled_field() -> None:
    src = CtTupleMatch("origsrc", addrs("10.0.1.0/24"), False, "-m conntrack --ctorigsrc 10.0.1.0/24")
    assert xt_match(src, packet_of(FLOW), EMPTY_FIB, None, hook=Hook.POSTROUTING) == Unknown(
        "-m conntrack --ctorigsrc 10.0.1.0/24: the original tuple is not known")
    ping = Flow(AF_INET, IPPROTO_ICMP, A("10.0.1.2"), A("192.0.2.10"), 77, 8 << 8)
    sport = CtTupleMatch("origsrcport", ports(77), False, "-m conntrack --ctorigsrcport 77")
    assert xt_match(sport, packet_of(ping), EMPTY_FIB, ping, hook=Hook.POSTROUTING) == Unknown(
        "-m conntrack --ctorigsrcport 77: the flow has no ports")
    dport = CtTupleMatch("origdstport", ports(0, 65535), True, "-m conntrack ! --ctorigdstport 0:65535")
    assert xt_match(dport, packet_of(ping), EMPTY_FIB, ping, hook=Hook.POSTROUTING) == Unknown(
        "-m conntrack ! --ctorigdstport 0:65535: the flow has no ports")
    # The ICMP flow's protocol is read all the same.
    proto = CtTupleMatch("proto", ports(IPPROTO_ICMP), False, "-m conntrack --ctproto icmp")
    assert xt_match(proto, packet_of(ping), EMPTY_FIB, ping, hook=Hook.POSTROUTING) is True
    repl = CtTupleMatch("replsrc", addrs("10.0.1.0/24"), False, "-m conntrack --ctreplsrc 10.0.1.0/24")
    assert xt_match(repl, packet_of(FLOW), EMPTY_FIB, FLOW, hook=Hook.POSTROUTING) == Unknown(
        "-m conntrack --ctreplsrc 10.0.1.0/24: not modelled")


# --- -m policy (xt_policy): the bundle the packet's route carries, as the match sees the packet --------

LOCAL_END, REMOTE_END = A("203.0.113.2"), A("198.51.100.1")


def sel(dst: str = "192.0.2.0/24", **kw: Any) -> XfrmSelector:
    return XfrmSelector(AF_INET, IPv4Network("10.0.1.0/24"), IPv4Network(dst), **kw)


def tunnel(s: XfrmSelector, *reqids: int) -> XfrmPolicy:
    """An out policy: ESP for reqid 1, AH for reqid 2, tunnel mode 203.0.113.2 -> 198.51.100.1."""
    templates = tuple(XfrmTemplate(AF_INET, REMOTE_END, LOCAL_END, proto=50 if r == 1 else 51, reqid=r,
                                   mode=Mode.TUNNEL) for r in reqids)  # fmt: skip
    return XfrmPolicy(s, Direction.OUT, priority=100, index=1, templates=templates)


SA1 = XfrmState(AF_INET, REMOTE_END, LOCAL_END, 50, 0x100, reqid=1, mode=Mode.TUNNEL)
SA2 = XfrmState(AF_INET, REMOTE_END, LOCAL_END, 51, 0x200, reqid=2, mode=Mode.TUNNEL)
# An SA ending here: a forwarded packet may have arrived through it (decrypted).
INBOUND = XfrmState(AF_INET, LOCAL_END, REMOTE_END, 50, 0x300, reqid=9, mode=Mode.TUNNEL)


def topo(policies: tuple[XfrmPolicy, ...] = (), states: tuple[XfrmState, ...] = ()) -> Fib:
    return Fib(Topology(
        links=(Link(LO, "lo"), Link(LAN, "lan"), Link(UP1, "up1")),
        addresses=(Address(LAN, A("10.0.1.1"), 24), Address(UP1, LOCAL_END, 24)),
        routes=(Route(ip_network("0.0.0.0/0"), nexthops=(Nexthop(UP1, A("203.0.113.1")),)),
                Route(ip_network("10.0.1.0/24"), nexthops=(Nexthop(LAN),))),
        xfrm_policies=policies, xfrm_states=states, xfrm_known=True,
    ))  # fmt: skip


ESP = topo((tunnel(sel(), 1),), (SA1,))  # one SA: esp, reqid 1, spi 0x100
ESP_AH = topo((tunnel(sel(), 1, 2),), (SA1, SA2))  # two: esp reqid 1, then ah reqid 2


def policy(direction: str = "out", pol: str = "ipsec", *elements: PolicyElement, strict: bool = False) -> PolicyMatch:
    return PolicyMatch(direction, pol, elements, strict, f"-m policy --dir {direction} --pol {pol}")


def out(m: PolicyMatch, fib: Fib, pkt: Packet | None = None, flow: Flow | None = FLOW) -> bool | Unknown:
    return xt_match(m, pkt or packet_of(FLOW), fib, flow, hook=Hook.POSTROUTING)


def test_policy_out_is_the_bundle() -> None:
    # No policy selects the flow: no bundle, so --pol none holds and --pol ipsec does not.
    assert out(policy("out", "none"), topo()) is True
    assert out(policy("out", "ipsec"), topo()) is False
    # The policy and its SA: a bundle.
    assert out(policy("out", "ipsec"), ESP) is True
    assert out(policy("out", "none"), ESP) is False


# One element against the bundle of one SA (esp, reqid 1, spi 0x100, tunnel 203.0.113.2 -> 198.51.100.1):
# match_xfrm_state: every selector given agrees, each ``!`` inverts its own.
ELEMENT_CASES: list[tuple[str, PolicyElement, bool]] = [
    ("--reqid 1", PolicyElement(reqid=1), True),
    ("--reqid 2", PolicyElement(reqid=2), False),
    ("! --reqid 1", PolicyElement(reqid=1, negated=frozenset({"reqid"})), False),
    ("! --reqid 2", PolicyElement(reqid=2, negated=frozenset({"reqid"})), True),
    ("--spi 0x100", PolicyElement(spi=0x100), True),
    ("--spi 0x101", PolicyElement(spi=0x101), False),
    ("--proto esp", PolicyElement(proto=50), True),
    ("--proto ah", PolicyElement(proto=51), False),
    ("--mode tunnel", PolicyElement(mode="tunnel"), True),
    ("--mode transport", PolicyElement(mode="transport"), False),
    ("! --mode transport", PolicyElement(mode="transport", negated=frozenset({"mode"})), True),
    ("--tunnel-src 203.0.113.0/24", PolicyElement(tunnel_src=IPv4Network("203.0.113.0/24")), True),
    ("--tunnel-src 198.51.100.0/24", PolicyElement(tunnel_src=IPv4Network("198.51.100.0/24")), False),
    ("--tunnel-dst 198.51.100.0/24", PolicyElement(tunnel_dst=IPv4Network("198.51.100.0/24")), True),
    ("--tunnel-dst 203.0.113.0/24", PolicyElement(tunnel_dst=IPv4Network("203.0.113.0/24")), False),
    ("--reqid 1 --proto ah", PolicyElement(reqid=1, proto=51), False),
]


@pytest.mark.parametrize(("element", "want"), [c[1:] for c in ELEMENT_CASES], ids=[c[0] for c in ELEMENT_CASES])
def test_policy_element_selectors(element: PolicyElement, want: bool) -> None:
    assert out(policy("out", "ipsec", element), ESP) is want
    # No bundle: --pol ipsec is false whatever the element says.
    assert out(policy("out", "ipsec", element), topo()) is False


def test_policy_strict_reads_the_bundle_in_order() -> None:
    # Not strict: some SA of the bundle (the second, AH reqid 2) matches the element.
    assert out(policy("out", "ipsec", PolicyElement(reqid=2)), ESP_AH) is True
    # --strict: the first SA must match the first element, and there are two SAs for one element.
    assert out(policy("out", "ipsec", PolicyElement(reqid=2), strict=True), ESP_AH) is False
    assert out(policy("out", "ipsec", PolicyElement(reqid=1), PolicyElement(reqid=2), strict=True), ESP_AH) is True


def test_policy_reads_the_packet_after_dnat() -> None:
    """At postrouting the route (and its bundle) is the DNATed packet's, not the original tuple's."""
    to_198 = topo((tunnel(sel("198.18.0.0/24"), 1),), (SA1,))
    dnated = packet_of(FLOW, daddr=A("198.18.0.7"), dst_nat=True)
    assert out(policy("out", "ipsec"), to_198, dnated) is True
    assert out(policy("out", "ipsec"), to_198) is False  # not DNATed: 192.0.2.10 is not selected
    assert out(policy("out", "ipsec"), ESP, dnated) is False  # DNATed away from 192.0.2.0/24
    # The destination port: a policy for udp port 8080; the flow's is 5060.
    port_8080 = topo((tunnel(sel(proto=IPPROTO_UDP, dport=8080, dport_mask=0xFFFF), 1),), (SA1,))
    assert out(policy("out", "ipsec"), port_8080, packet_of(FLOW, dport=(8080, 8080))) is True
    assert out(policy("out", "ipsec"), port_8080) is False


def test_policy_after_a_dnat_to_a_port_range_reads_the_range() -> None:
    """A DNAT to ports 8000-8010 sends the packet to one of them, never to its original 5060."""
    ranged = packet_of(FLOW, dport=(8000, 8010), dst_nat=True)
    port_5060 = topo((tunnel(sel(proto=IPPROTO_UDP, dport=5060, dport_mask=0xFFFF), 1),), (SA1,))
    assert out(policy("out", "ipsec"), port_5060, ranged) is False
    assert out(policy("out", "none"), port_5060, ranged) is True
    # 8000 is 0x1f40: under the mask 0xfff0 the selector takes 8000-8015, the whole range.
    block = topo((tunnel(sel(proto=IPPROTO_UDP, dport=8000, dport_mask=0xFFF0), 1),), (SA1,))
    assert out(policy("out", "ipsec"), block, ranged) is True
    # Port 8008 alone: the packet may or may not be selected.
    one = topo((tunnel(sel(proto=IPPROTO_UDP, dport=8008, dport_mask=0xFFFF), 1),), (SA1,))
    assert isinstance(out(policy("out", "ipsec"), one, ranged), Unknown)


def test_policy_reads_the_output_interface() -> None:
    """A policy selecting ``dev up1`` (ifindex 3) selects the packet routed out of up1 only."""
    on_up1 = topo((tunnel(sel(ifindex=UP1), 1),), (SA1,))
    assert out(policy("out", "ipsec"), on_up1) is True
    lan = Egress(EgressKind.UNICAST, LAN, "lan")
    assert out(policy("out", "ipsec"), on_up1, packet_of(FLOW, oif=lan)) is False
    got = out(policy("out", "ipsec"), on_up1, packet_of(FLOW, oif=None))
    assert isinstance(got, Unknown) and "output interface" in got.reason


def test_policy_reads_the_packet_mark() -> None:
    """A policy for mark 5/0xff selects a packet of mark 0x105, not one of mark 6; an unknown mark
    leaves the lookup (and the match) unknown."""
    marked = topo((XfrmPolicy(sel(), Direction.OUT, priority=100, index=1, mark=5, mark_mask=0xFF,
                              templates=tunnel(sel(), 1).templates),), (SA1,))  # fmt: skip
    assert out(policy("out", "ipsec"), marked, flow=replace(FLOW, packet_mark=0x105)) is True
    assert out(policy("out", "ipsec"), marked, flow=replace(FLOW, packet_mark=6)) is False
    got = out(policy("out", "ipsec"), marked, flow=replace(FLOW, packet_mark=None))
    assert isinstance(got, Unknown) and "packet mark" in got.reason


@pytest.mark.parametrize(("direction", "hook"), [("in", Hook.OUTPUT), ("in", Hook.POSTROUTING),
                                                 ("out", Hook.PREROUTING), ("out", Hook.INPUT)])
def test_policy_direction_invalid_at_the_hook_is_unknown(direction: str, hook: Hook) -> None:
    """``policy_mt_check`` refuses --dir in at output/postrouting and --dir out at prerouting/input."""
    m = policy(direction, "none")
    want = Unknown(f"-m policy --dir {direction} --pol none: --dir {direction} is invalid at {hook.value}")
    assert xt_match(m, packet_of(FLOW), ESP, FLOW, hook=hook) == want


def test_policy_in_is_the_secpath() -> None:
    """--dir in reads the packet's secpath: none unless an SA ends here; unknown for a forwarded one if so."""
    for hook in (Hook.PREROUTING, Hook.INPUT):
        assert xt_match(policy("in", "none"), packet_of(FLOW, oif=None), ESP, FLOW, hook=hook) is True
        assert xt_match(policy("in", "ipsec"), packet_of(FLOW, oif=None), ESP, FLOW, hook=hook) is False
    inbound = topo(states=(INBOUND,))
    got = xt_match(policy("in", "none"), packet_of(FLOW, oif=None), inbound, FLOW, hook=Hook.PREROUTING)
    assert isinstance(got, Unknown) and "arrive through an SA" in got.reason  # local defaults to False
    # A locally generated packet carries no secpath.
    local = xt_match(policy("in", "none"), packet_of(FLOW, oif=None), inbound, FLOW, hook=Hook.INPUT, local=True)
    assert local is True


def test_policy_unknown_without_a_flow_or_an_answer() -> None:
    assert out(policy("out", "ipsec"), ESP, flow=None) == Unknown(
        "-m policy --dir out --pol ipsec: the flow is not known")
    # A --pol the kernel's match does not have (the reader refuses it; built by hand here).
    assert out(policy("out", "maybe"), ESP) == Unknown(
        "-m policy --dir out --pol maybe: the xfrm policy model cannot answer "
        "(policy_match: --pol must be ipsec or none, got 'maybe')")


def test_ipv6_networks_are_accepted_as_tunnel_ends() -> None:
    """An element's tunnel end of the other family selects no SA of this one."""
    e = PolicyElement(tunnel_dst=IPv6Network("2001:db8::/32"))
    assert out(policy("out", "ipsec", e), ESP) is False
