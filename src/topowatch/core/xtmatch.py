# SPDX-License-Identifier: GPL-2.0-or-later
"""The iptables matches that are not plain selectors: conntrack state and tuple, addrtype, policy.

What this module decides: the truth of one such match for the first packet
of a flow at a nat hook, in three-valued logic. The evaluator
(``core.evaluate``) calls ``xt_match`` for every ``XtMatch`` other than
``AnyOf``.

Rules (``net/netfilter/xt_conntrack.c``, ``xt_addrtype.c``, ``xt_policy.c``):
- nat chains see only a connection's first packet, before the entry is
  confirmed: its state is NEW, no reply was seen, it is not assured nor
  confirmed, and its original tuple is the flow itself. An expected
  (RELATED) connection is not told apart: topowatch's flows are entries,
  and ``--ctstate RELATED``/``--ctstatus EXPECTED`` answer unknown;
- the virtual states SNAT/DNAT and reply-tuple matches answer unknown;
- addrtype, IPv4 (``inet_addr_type``): the FIB's own classification
  (``Fib.address_type``): the type of the local-table route holding the
  address (local, broadcast, anycast, ...), MULTICAST and BROADCAST
  (0.0.0.0/8, 255.255.255.255) by address, else UNICAST. A blackhole,
  unreachable, prohibit or throw route is an error in the lookup, so the
  kernel answers UNICAST for its addresses (checked on kernel 6.18): those
  types never match an IPv4 address. Where the topology holds no local table
  (built by hand), the kernel's subnet broadcast routes are implied;
- addrtype, IPv6 (``match_type6``): MULTICAST, UNICAST and UNSPEC by
  address; LOCAL, ANYCAST and UNREACHABLE from the route to the address
  (an error route or no route is UNREACHABLE, a local route LOCAL, the
  subnet-router anycast address of an on-link prefix ANYCAST); the types the
  kernel refuses for IPv6 answer unknown;
- ``--limit-iface-in``/``-out`` (IPv4, ``inet_dev_addr_type``): the local-table
  route's type counts only if its device is the packet's input (output)
  interface, else the address is UNICAST; with an interface that is not
  known here (a local delivery's output, an unknown route) and for IPv6
  (``match_lookup_rt6`` with a device) the match is unknown;
- ``-m policy`` asks ``core.xfrm.policy_match`` for the packet as the match
  sees it (after a DNAT: a DNAT to a port range leaves its port a range).

This module never performs I/O and never guesses.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address
from typing import Protocol

from topowatch.core.fib import Fib
from topowatch.core.flow import PORT_PROTOS, REFUSING, Egress, EgressKind, Flow, Ingress, Unknown
from topowatch.core.model import AF_INET, TABLE_LOCAL, IPAddress, RouteType
from topowatch.core.nat import (
    AddrTypeMatch,
    CtStateMatch,
    CtStatusMatch,
    CtTupleMatch,
    Hook,
    PolicyMatch,
)
from topowatch.core.xfrm import Mode, XfrmFlow, policy_match
from topowatch.core.xfrm import PolicyElement as XfrmElement


class PacketView(Protocol):
    """What these matches read of the evaluator's packet."""

    @property
    def family(self) -> int: ...
    @property
    def proto(self) -> int: ...
    @property
    def saddr(self) -> IPAddress: ...
    @property
    def daddr(self) -> IPAddress: ...
    @property
    def sport(self) -> int: ...
    @property
    def dport(self) -> tuple[int, int]: ...
    @property
    def iif(self) -> object: ...
    @property
    def oif(self) -> object: ...
    @property
    def dst_nat(self) -> bool | None: ...


# The first packet at a nat hook: what each state and status is.
_STATE_OF_FIRST_PACKET: dict[str, bool | None] = {
    "NEW": True,
    "ESTABLISHED": False,
    "INVALID": False,
    "UNTRACKED": False,
    "RELATED": None,  # an expected connection is not told apart
    # IPS_SRC_NAT and IPS_DST_NAT (``conntrack_mt``): SNAT has not run yet where a match is
    # evaluated (it runs last); DNAT is the packet's (``xt_match`` reads it).
    "SNAT": False,
    "DNAT": None,
}
_STATUS_OF_FIRST_PACKET: dict[str, bool | None] = {
    "NONE": False,
    "SEEN_REPLY": False,
    "ASSURED": False,
    "CONFIRMED": False,
    "EXPECTED": None,
}


def _negate(value: bool | Unknown, negate: bool) -> bool | Unknown:
    if isinstance(value, Unknown):
        return value
    return value != negate


def _any_of(flags: dict[str, bool | None], names: frozenset[str], what: str) -> bool | Unknown:
    unknown = sorted(n for n in names if flags.get(n) is None)
    if any(flags.get(n) is True for n in names):
        return True
    if unknown:
        return Unknown(f"{what} {','.join(unknown)} of the flow's first packet is not modelled")
    return False


# The types ``addrtype_mt_checkentry_v1`` accepts for IPv6 (it refuses the others at load time).
_V6_ADDR_TYPES = frozenset({"UNSPEC", "UNICAST", "LOCAL", "ANYCAST", "MULTICAST", "UNREACHABLE"})
_V6_ROUTED_TYPES = frozenset({"LOCAL", "ANYCAST", "UNREACHABLE"})


def _addr_type4(fib: Fib, addr: IPv4Address, dev: int | None = None) -> str | Unknown:
    """The one type ``inet_dev_addr_type`` gives an IPv4 address (an ``RTN_*`` name); ``dev``: ifindex."""
    rtype = fib.address_type(addr, dev)
    if isinstance(rtype, Unknown):
        return rtype
    if rtype is RouteType.UNICAST and not any(
        r.family == AF_INET and r.table == TABLE_LOCAL for r in fib.topology.routes
    ):
        # A topology without its local table: the FIB implies the local routes of the
        # addresses but not the broadcast routes the kernel adds beside them (on their device).
        for a in fib.topology.addresses:
            net = a.network
            if (isinstance(net, IPv4Network) and net.prefixlen < 31 and addr == net.broadcast_address
                    and (dev is None or a.ifindex == dev)):  # fmt: skip
                return RouteType.BROADCAST.name
    return rtype.name


def _route_types6(fib: Fib, addr: IPv6Address) -> frozenset[str] | Unknown:
    """``match_lookup_rt6`` without a device: the types the output route to ``addr`` gives."""
    resolution = fib.resolve(addr)
    egresses = resolution.egresses
    if isinstance(egresses, Unknown):
        return egresses
    kinds = {e.kind for e in egresses}
    if not kinds or kinds <= REFUSING:
        return frozenset({"UNREACHABLE"})  # no route, or an error route (RTF_REJECT)
    if kinds == {EgressKind.LOCAL}:
        return frozenset({"LOCAL"})
    route = resolution.route
    if kinds == {EgressKind.UNICAST} and route is not None:
        # ipv6_anycast_destination(): the address of an on-link prefix (no gateway) is anycast.
        on_link = all(nh.gateway is None for nh in route.nexthops)
        if route.dst.prefixlen < 127 and on_link and addr == route.dst.network_address:
            return frozenset({"ANYCAST"})
        return frozenset()
    return Unknown(f"the route to {addr} is not classified here")


def _match_type6(fib: Fib, addr: IPv6Address, types: frozenset[str]) -> bool | Unknown:
    """``match_type6``: every category named must hold (the kernel ANDs them)."""
    refused = types - _V6_ADDR_TYPES
    if refused:
        return Unknown(f"type {','.join(sorted(refused))} is not valid for IPv6")
    any_addr = int(addr) == 0
    unicast = not (addr.is_multicast or any_addr or addr.ipv4_mapped is not None)  # ipv6_addr_type()
    if "MULTICAST" in types and not addr.is_multicast:
        return False
    if "UNICAST" in types and not unicast:
        return False
    if "UNSPEC" in types and not any_addr:
        return False
    routed = types & _V6_ROUTED_TYPES
    if not routed:
        return True
    found = _route_types6(fib, addr)
    if isinstance(found, Unknown):
        return found
    return bool(found & routed)


def _limit_device(m: AddrTypeMatch, packet: PacketView) -> int | None | Unknown:
    """The ifindex ``--limit-iface-in|out`` restricts the lookup to; None without the option."""
    if m.limit_iface is None:
        return None
    if packet.family != AF_INET:
        return Unknown(f"{m.text}: --limit-iface-{m.limit_iface} is not modelled for IPv6")
    if m.limit_iface == "in":
        iif = packet.iif
        if isinstance(iif, Ingress) and not iif.local:
            return iif.ifindex
        return Unknown(f"{m.text}: the input interface is not known here")
    oif = packet.oif
    if isinstance(oif, Egress) and oif.kind is EgressKind.UNICAST and oif.oif:
        return oif.oif
    return Unknown(f"{m.text}: the output interface is not known here")


def _addr_type_match(m: AddrTypeMatch, fib: Fib, addr: IPAddress, dev: int | None = None) -> bool | Unknown:
    if isinstance(addr, IPv4Address):
        found = _addr_type4(fib, addr, dev)
        if isinstance(found, Unknown):
            return Unknown(f"{m.text}: {found.reason}")
        return (found in m.types) != m.negate
    answer = _match_type6(fib, addr, m.types)
    if isinstance(answer, Unknown):
        return Unknown(f"{m.text}: {answer.reason}")
    return answer != m.negate


def _policy(
    m: PolicyMatch, packet: PacketView, fib: Fib, flow: Flow | None, *, hook: Hook, local: bool
) -> bool | Unknown:
    if m.direction == "in" and hook in (Hook.OUTPUT, Hook.POSTROUTING):
        return Unknown(f"{m.text}: --dir in is invalid at {hook.value}")
    if m.direction == "out" and hook in (Hook.PREROUTING, Hook.INPUT):
        return Unknown(f"{m.text}: --dir out is invalid at {hook.value}")
    if flow is None:
        return Unknown(f"{m.text}: the flow is not known")
    # The packet as the match sees it (after a DNAT): where a DNAT to a port range left its port
    # open, the policy lookup is three-valued over the range, as nft's ``rt ipsec`` is.
    # (A range of one port, ``dport_hi == dport``, is that port.)
    oif = packet.oif.oif if isinstance(packet.oif, Egress) else None
    routed = XfrmFlow(flow.family, flow.proto, flow.src, packet.daddr, flow.sport, *packet.dport,
                      flow.packet_mark, oif)
    try:
        elements = [
            XfrmElement(
                reqid=e.reqid, spi=e.spi, proto=e.proto,
                mode=None if e.mode is None else Mode[e.mode.upper()],
                tunnel_src=e.tunnel_src, tunnel_dst=e.tunnel_dst,
                **{f"{name}_invert": True for name in e.negated},
            )
            for e in m.elements
        ]
        return policy_match(fib.topology, routed, m.direction, m.pol, elements, m.strict, local=local)
    except (KeyError, TypeError, ValueError) as exc:
        return Unknown(f"{m.text}: the xfrm policy model cannot answer ({exc})")


def xt_match(
    m: CtStateMatch | CtStatusMatch | CtTupleMatch | AddrTypeMatch | PolicyMatch,
    packet: PacketView,
    fib: Fib,
    flow: Flow | None,
    *,
    hook: Hook,
    local: bool = False,
) -> bool | Unknown:
    """The truth of ``m`` for the flow's first packet at ``hook`` (``local``: locally generated)."""
    if isinstance(m, CtStateMatch):
        states = dict(_STATE_OF_FIRST_PACKET, DNAT=packet.dst_nat)
        return _negate(_any_of(states, m.states, "ctstate"), m.negate)
    if isinstance(m, CtStatusMatch):
        return _negate(_any_of(_STATUS_OF_FIRST_PACKET, m.statuses, "ctstatus"), m.negate)
    if isinstance(m, CtTupleMatch):
        if flow is None:
            return Unknown(f"{m.text}: the original tuple is not known")
        if m.field in ("origsrc", "origdst"):
            addr = flow.src if m.field == "origsrc" else flow.dst
            if m.values.version != addr.version:
                return m.negate
            value = int(addr)
        elif m.field in ("origsrcport", "origdstport"):
            if flow.proto not in PORT_PROTOS:
                return Unknown(f"{m.text}: the flow has no ports")
            value = flow.sport if m.field == "origsrcport" else flow.dport
        elif m.field == "proto":
            value = flow.proto
        else:
            return Unknown(f"{m.text}: not modelled")
        hit = m.values.covers(value, value)
        return bool(hit) != m.negate
    if isinstance(m, AddrTypeMatch):
        dev = _limit_device(m, packet)
        if isinstance(dev, Unknown):
            return dev
        return _addr_type_match(m, fib, packet.saddr if m.side == "src" else packet.daddr, dev)
    return _policy(m, packet, fib, flow, hook=hook, local=local)
