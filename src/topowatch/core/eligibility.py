"""Which conntrack entries a policy lets topowatch judge at all.

An entry outside the eligible set is never deleted, whatever the prediction
says. The default (no policy configured) is the interface contract: UNREPLIED
entries of connectionless protocols (udp, udplite, icmp, icmpv6, gre and
those conntrack tracks generically) in every zone; never tcp, sctp or dccp,
which have state of their own. This module never performs I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from topowatch.core.conntrack import Entry
from topowatch.core.flow import IPPROTO_SCTP, IPPROTO_TCP
from topowatch.core.model import AF_INET, AF_INET6, IPNetwork

IPPROTO_DCCP = 33
STATEFUL_PROTOS = frozenset({IPPROTO_TCP, IPPROTO_SCTP, IPPROTO_DCCP})


@dataclass(frozen=True, slots=True)
class Eligibility:
    """Entry selectors. ``None`` in a field means "any"."""

    families: frozenset[int] = frozenset({AF_INET, AF_INET6})
    # None: every connectionless protocol (anything but tcp, sctp, dccp).
    protocols: frozenset[int] | None = None
    # A TCP entry in SYN_SENT is UNREPLIED too: listing tcp in ``protocols`` covers it.
    unreplied_only: bool = True
    zones: frozenset[int] | None = None
    marks: tuple[tuple[int, int], ...] | None = None  # (value, mask) pairs
    sources: tuple[IPNetwork, ...] | None = None
    destinations: tuple[IPNetwork, ...] | None = None

    def admits(self, entry: Entry) -> bool:
        if entry.family not in self.families:
            return False
        if self.protocols is None:
            if entry.proto in STATEFUL_PROTOS:
                return False
        elif entry.proto not in self.protocols:
            return False
        if self.unreplied_only and not entry.unreplied:
            return False
        if self.zones is not None and entry.zone not in self.zones:
            return False
        if self.marks is not None and not any(entry.mark & mask == value for value, mask in self.marks):
            return False
        if self.sources is not None and not any(
            net.version == entry.orig.src.version and entry.orig.src in net for net in self.sources
        ):
            return False
        return self.destinations is None or any(
            net.version == entry.orig.dst.version and entry.orig.dst in net for net in self.destinations
        )


DEFAULT_ELIGIBILITY = Eligibility()
