# SPDX-License-Identifier: GPL-2.0-or-later
"""Conntrack entries as values, and the NAT binding each one actually carries.

Theory of operation: the kernel records NAT in the reply tuple. For an entry
``orig = A:a -> B:b`` the reply is ``B':b' -> A':a'``: a source NAT shows as
``A' != A`` (or ``a' != a``), a destination NAT as ``B' != B``. The status
bits say whether each NAT hook has run (``IPS_SRC_NAT_DONE``,
``IPS_DST_NAT_DONE``) and whether a reply was seen (``IPS_SEEN_REPLY``).

Rules:
- an entry is UNREPLIED when ``IPS_SEEN_REPLY`` is clear;
- a dumped entry is confirmed (the kernel never shows an unconfirmed one), and
  the kernel never NATs a confirmed entry afterwards (``nf_nat_setup_info``
  returns early). So a side without its ``*_NAT_DONE`` bit is one whose NAT
  hook did not run when the entry was created (its family had no NAT chain
  then): its packets keep leaving untranslated, a null binding, judged like
  any other. Its tuples are then each other's inverse; where they are not
  (an entry made through ctnetlink by hand), the side has no actual binding
  (None) and is never judged;
- this module never performs I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from topowatch.core.flow import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    NO_NAT,
    Binding,
    Flow,
    NatKind,
    proto_name,
)
from topowatch.core.model import AF_INET, IPAddress

# Status bits (include/uapi/linux/netfilter/nf_conntrack_common.h).
IPS_EXPECTED = 1 << 0
IPS_SEEN_REPLY = 1 << 1
IPS_ASSURED = 1 << 2
IPS_CONFIRMED = 1 << 3
IPS_SRC_NAT = 1 << 4
IPS_DST_NAT = 1 << 5
IPS_SEQ_ADJUST = 1 << 6
IPS_SRC_NAT_DONE = 1 << 7
IPS_DST_NAT_DONE = 1 << 8
IPS_DYING = 1 << 9
IPS_FIXED_TIMEOUT = 1 << 10
IPS_TEMPLATE = 1 << 11
IPS_UNTRACKED = 1 << 12
IPS_HELPER = 1 << 13
IPS_OFFLOAD = 1 << 14
IPS_HW_OFFLOAD = 1 << 15

ICMP_PROTOS = frozenset({IPPROTO_ICMP, IPPROTO_ICMPV6})

# TCP states as ctnetlink reports them (CTA_PROTOINFO_TCP_STATE, enum tcp_conntrack).
TCP_CONNTRACK_ESTABLISHED = 3


@dataclass(frozen=True, slots=True)
class CtTuple:
    """One direction of an entry. For ICMP: ``sport`` is the id, ``dport`` is ``type << 8 | code``."""

    src: IPAddress
    dst: IPAddress
    sport: int = 0
    dport: int = 0

    @property
    def icmp_type(self) -> int:
        return self.dport >> 8

    @property
    def icmp_code(self) -> int:
        return self.dport & 0xFF

    @property
    def icmp_id(self) -> int:
        return self.sport


@dataclass(frozen=True, slots=True)
class Entry:
    """A conntrack entry as dumped: both tuples, zone, mark, status and the kernel's id."""

    family: int
    proto: int
    orig: CtTuple
    reply: CtTuple
    status: int = IPS_CONFIRMED | IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE
    zone: int = 0
    mark: int = 0
    id: int = 0
    timeout: int = 0

    def __post_init__(self) -> None:
        if (self.family == AF_INET) != (self.orig.src.version == 4):
            raise ValueError(f"Entry.family {self.family} does not match {self.orig.src}")

    @property
    def unreplied(self) -> bool:
        return not self.status & IPS_SEEN_REPLY

    @property
    def assured(self) -> bool:
        return bool(self.status & IPS_ASSURED)

    @property
    def flow(self) -> Flow:
        return Flow(
            family=self.family,
            proto=self.proto,
            src=self.orig.src,
            dst=self.orig.dst,
            sport=self.orig.sport,
            dport=self.orig.dport,
            zone=self.zone,
            ct_mark=self.mark,
        )

    def flow_key(self) -> tuple[int, int, int, IPAddress, IPAddress, int, int]:
        """Entries sharing this key get the same prediction (decided once)."""
        return (self.zone, self.mark, self.proto, self.orig.src, self.orig.dst, self.orig.dport, self.family)

    def actual_dnat(self) -> Binding | None:
        """The destination binding the entry carries (a null one if DNAT never ran; see the rules)."""
        # The reply's source is where the original destination was translated to.
        if self.reply.src == self.orig.dst and (
            self.proto in ICMP_PROTOS or self.reply.sport == self.orig.dport
        ):
            return NO_NAT
        if not self.status & IPS_DST_NAT_DONE:
            return None
        port = None if self.proto in ICMP_PROTOS else self.reply.sport
        return Binding(NatKind.DNAT, self.reply.src, self.reply.src, port, port)

    def actual_snat(self) -> Binding | None:
        """The source binding the entry carries (a null one if SNAT never ran; see the rules)."""
        if self.reply.dst == self.orig.src and (
            self.proto in ICMP_PROTOS or self.reply.dport == self.orig.sport
        ):
            return NO_NAT
        if not self.status & IPS_SRC_NAT_DONE:
            return None
        port = None if self.proto in ICMP_PROTOS else self.reply.dport
        return Binding(NatKind.SNAT, self.reply.dst, self.reply.dst, port, port)

    def describe(self) -> str:
        name = proto_name(self.proto)
        o, r = self.orig, self.reply
        if self.proto in ICMP_PROTOS:
            text = f"{name} {o.src} -> {o.dst} id={o.icmp_id}"
        else:
            text = f"{name} {o.src}:{o.sport} -> {o.dst}:{o.dport}"
        if self.proto in ICMP_PROTOS:
            text += f" reply {r.src} -> {r.dst}"
        else:
            text += f" reply {r.src}:{r.sport} -> {r.dst}:{r.dport}"
        if self.zone:
            text += f" zone {self.zone}"
        if self.mark:
            text += f" mark {self.mark:#x}"
        if self.unreplied:
            text += " [UNREPLIED]"
        return text


@dataclass(frozen=True, slots=True)
class Reread:
    """An entry as the kernel shows it again just before a delete: what may have changed since the dump.

    Read by orig tuple and zone (which cannot change); ``id`` tells whether
    it is still the entry that was judged. ``tcp_state`` is None for other
    protocols (and when the kernel did not say).
    """

    status: int
    id: int
    mark: int = 0
    timeout: int = 0
    tcp_state: int | None = None

    def replied_since(self, dumped: Entry) -> bool:
        """A reply arrived after ``dumped`` was read."""
        return dumped.unreplied and bool(self.status & IPS_SEEN_REPLY)

    def applied(self, dumped: Entry) -> Entry:
        """``dumped`` with what the kernel says now (same tuples and zone, by construction)."""
        return Entry(dumped.family, dumped.proto, dumped.orig, dumped.reply, self.status, dumped.zone,
                     self.mark, self.id, self.timeout)
