# SPDX-License-Identifier: GPL-2.0-or-later
"""Which conntrack entries a policy lets topowatch judge at all.

An entry outside the eligible set is never deleted, whatever the prediction
says. The default (no policy configured) is the interface contract: UNREPLIED
entries of connectionless protocols (udp, udplite, icmp, icmpv6, gre and
those conntrack tracks generically) in every zone; never tcp, sctp or dccp,
which have state of their own. Several policies combine with ``any_of``: an
entry is eligible when at least one of them admits it. This module never
performs I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    # Alternatives: when not empty, at least one of them must admit the entry too.
    alternatives: tuple[Eligibility, ...] = ()

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
        if self.destinations is not None and not any(
            net.version == entry.orig.dst.version and entry.orig.dst in net for net in self.destinations
        ):
            return False
        return not self.alternatives or any(alt.admits(entry) for alt in self.alternatives)


ALL_PROTOS = frozenset(range(256))
CONNECTIONLESS_PROTOS = ALL_PROTOS - STATEFUL_PROTOS


def any_of(alternatives: Sequence[Eligibility]) -> Eligibility:
    """The eligibility that admits an entry when at least one alternative does.

    Its own selectors are the loosest common bound of the alternatives (union
    of families, protocols, zones...; ``unreplied_only`` only if all require
    it), so an edge may use them as a kernel-side dump filter; the
    alternatives then decide exactly. No alternative admits nothing.
    """
    alts = tuple(dict.fromkeys(alternatives))
    if not alts:
        return Eligibility(families=frozenset())
    if len(alts) == 1:
        return alts[0]
    protocols: frozenset[int] = frozenset().union(
        *(CONNECTIONLESS_PROTOS if a.protocols is None else a.protocols for a in alts)
    )
    zones = None if any(a.zones is None for a in alts) else frozenset().union(*(a.zones or () for a in alts))
    marks = None if any(a.marks is None for a in alts) else tuple(
        dict.fromkeys(m for a in alts for m in a.marks or ())
    )
    sources = None if any(a.sources is None for a in alts) else tuple(
        dict.fromkeys(n for a in alts for n in a.sources or ())
    )
    destinations = None if any(a.destinations is None for a in alts) else tuple(
        dict.fromkeys(n for a in alts for n in a.destinations or ())
    )
    return Eligibility(
        families=frozenset().union(*(a.families for a in alts)),
        protocols=None if protocols == CONNECTIONLESS_PROTOS else protocols,
        unreplied_only=all(a.unreplied_only for a in alts),
        zones=zones,
        marks=marks,
        sources=sources,
        destinations=destinations,
        alternatives=alts,
    )


DEFAULT_ELIGIBILITY = Eligibility()
