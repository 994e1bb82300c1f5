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

__all__ = ["DeleteCounts", "EarlyDeletes", "EventSource", "StillStale", "Trigger"]


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


@dataclass(slots=True)
class EarlyDeletes:
    """A reaction's leave to delete stale entries while its dump still runs (a second socket), so
    that it costs about max(dump, judge) plus the tail instead of their sum.

    The reactor gives it only where deleting before the dump ends cannot change the reaction's
    outcome: every selected policy flushes, no dry run, and the deletion cap ``cap`` is at least
    what the table can hold (the backend checks that against the kernel's table size, so the
    all-or-nothing cap can never be reached half-way). ``still`` is the re-check each entry
    passes just before its delete, as in ``delete``; ``go()`` is asked before each early batch
    and False stops them (the ruleset moved: the rest waits for the reactor's own checks).

    The backend fills in what it did: ``taken`` is how many of the returned decider's stale
    records (the first ones) it handled, with ``counts``; ``why_not`` says why it did not
    overlap (empty when it did)."""

    still: StillStale
    cap: int
    go: Callable[[], bool]
    taken: int = 0
    counts: DeleteCounts | None = None
    why_not: str = ""


class EventSource(Protocol):
    """One stream of triggers (rtnetlink, xfrm, nftables, D-Bus, ...); the reactor supervises each."""

    name: str

    def events(self) -> AbstractAsyncContextManager[AsyncIterator[Trigger]]: ...
