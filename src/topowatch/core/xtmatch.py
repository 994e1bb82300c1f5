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
- addrtype reads the address type as ``inet_addr_type`` does: LOCAL from the
  FIB, MULTICAST and BROADCAST (0.0.0.0/8, 255.255.255.255, a local
  subnet's broadcast) by address, else UNICAST; ``--limit-iface-*`` answers
  unknown;
- ``-m policy`` asks ``core.xfrm.policy_match`` where that exists; without
  it the match is unknown.

This module never performs I/O and never guesses.
"""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from typing import Protocol

from topowatch.core.fib import Fib
from topowatch.core.flow import PORT_PROTOS, Flow, Unknown
from topowatch.core.model import IPAddress
from topowatch.core.nat import (
    AddrTypeMatch,
    CtStateMatch,
    CtStatusMatch,
    CtTupleMatch,
    Hook,
    PolicyMatch,
)


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
    def oif(self) -> object: ...


# The first packet at a nat hook: what each state and status is.
_STATE_OF_FIRST_PACKET: dict[str, bool | None] = {
    "NEW": True,
    "ESTABLISHED": False,
    "INVALID": False,
    "UNTRACKED": False,
    "RELATED": None,  # an expected connection is not told apart
    "SNAT": None,
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


def _addr_type(fib: Fib, addr: IPAddress) -> str:
    if addr.is_multicast:
        return "MULTICAST"
    limited = IPv4Address("255.255.255.255")
    if isinstance(addr, IPv4Address) and (addr in IPv4Network("0.0.0.0/8") or addr == limited):
        return "BROADCAST"
    if fib.is_local(addr):
        return "LOCAL"
    if isinstance(addr, IPv4Address):
        for a in fib.topology.addresses:
            net = a.network
            if isinstance(net, IPv4Network) and net.prefixlen < 31 and addr == net.broadcast_address:
                return "BROADCAST"
    return "UNICAST"


def _policy(
    m: PolicyMatch, packet: PacketView, fib: Fib, flow: Flow | None, *, hook: Hook, local: bool
) -> bool | Unknown:
    if m.direction == "in" and hook in (Hook.OUTPUT, Hook.POSTROUTING):
        return Unknown(f"{m.text}: --dir in is invalid at {hook.value}")
    if m.direction == "out" and hook in (Hook.PREROUTING, Hook.INPUT):
        return Unknown(f"{m.text}: --dir out is invalid at {hook.value}")
    from topowatch.core import xfrm

    policy_match = getattr(xfrm, "policy_match", None)
    element_type = getattr(xfrm, "PolicyElement", None)
    if policy_match is None or element_type is None or flow is None:
        return Unknown(f"{m.text}: the xfrm policy model is not available")
    dport = packet.dport[0] if packet.dport[0] == packet.dport[1] else flow.dport
    routed = replace(flow, dst=packet.daddr, dport=dport)
    oif = getattr(packet.oif, "oif", None)
    try:
        elements = [
            element_type(
                reqid=e.reqid, spi=e.spi, proto=e.proto,
                mode=None if e.mode is None else xfrm.Mode[e.mode.upper()],
                tunnel_src=e.tunnel_src, tunnel_dst=e.tunnel_dst,
                **{f"{name}_invert": True for name in e.negated},
            )
            for e in m.elements
        ]
        answer = policy_match(fib.topology, routed, m.direction, m.pol, elements, m.strict,
                              oif=oif if isinstance(oif, int) else None, local=local)
    except (TypeError, ValueError, AttributeError) as exc:
        return Unknown(f"{m.text}: the xfrm policy model cannot answer ({exc})")
    if isinstance(answer, bool | Unknown):
        return answer
    return Unknown(f"{m.text}: the xfrm policy model gave no answer")


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
        return _negate(_any_of(_STATE_OF_FIRST_PACKET, m.states, "ctstate"), m.negate)
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
        if m.limit_iface is not None:
            return Unknown(f"{m.text}: --limit-iface-{m.limit_iface} is not modelled")
        addr = packet.saddr if m.side == "src" else packet.daddr
        return (_addr_type(fib, addr) in m.types) != m.negate
    return _policy(m, packet, fib, flow, hook=hook, local=local)
