# SPDX-License-Identifier: GPL-2.0-or-later
"""The values event sources and the kernel backend hand the reactor: triggers and delete counts.

What this module decides: nothing. It holds the small types that the edges
produce and the reactor consumes, so that the edges never import the reactor
(``Trigger``, ``EventSource``, ``DeleteCounts``, ``StillStale``). It must
never grow behaviour: it is the narrow interface between the two layers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from topowatch.core.conntrack import Entry, Reread

__all__ = ["DeleteCounts", "EventSource", "StillStale", "Trigger"]


@dataclass(frozen=True, slots=True)
class Trigger:
    """One event from a source: a topology change, an overrun, an explicit request.

    ``kind`` is the policy trigger kind (link, address, route, rule, xfrm,
    ruleset, networkmanager, dispatcher; anything else activates every
    enabled policy); ``interface`` names the interface concerned, if any.
    """

    source: str
    description: str
    overrun: bool = False
    kind: str = ""
    interface: str | None = None


@dataclass(frozen=True, slots=True)
class DeleteCounts:
    deleted: int = 0
    already_gone: int = 0
    failed: int = 0
    elapsed: float = 0.0
    errors: tuple[str, ...] = ()
    # Kept by the re-check before the delete: replied to since the dump, or otherwise no longer admitted.
    kept_replied: int = 0
    kept_changed: int = 0
    # The 99th percentile over delete batches of the time from re-reading a batch to its delete
    # being done (the window a reply can still slip through), None when nothing was deleted.
    window_p99: float | None = None


# What ``Backend.delete`` asks of each entry re-read just before its delete: (as dumped, as now).
StillStale = Callable[[Entry, Reread], bool]


class EventSource(Protocol):
    """One stream of triggers (rtnetlink, xfrm, nftables, D-Bus, ...); the reactor supervises each."""

    name: str

    def events(self) -> AbstractAsyncContextManager[AsyncIterator[Trigger]]: ...
