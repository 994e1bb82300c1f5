# SPDX-License-Identifier: GPL-2.0-or-later
"""A fake rtnetlink source for tests: a topology in memory, events you emit, dumps it counts.

``FakeRtnl`` provides the same narrow interface as ``rtnl.KernelRtnl``
(``dump()`` and ``events()``). ``apply(t1)`` replaces the topology and emits
the events the kernel would announce for the difference (one per link,
address, route, rule added, changed or removed); ``apply(t1, announce=False)``
followed by ``overrun()`` models lost events. ``interrupt_next_dumps(n)`` makes
the next ``n`` dumps raise ``DumpInterrupted``, as a kernel that kept
interrupting would after the real edge's retries.

It never touches a kernel and never invents a change it was not given.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace

import trio

from topowatch.core.model import Topology
from topowatch.edges.rtnl import (
    Event,
    EventAction,
    EventKind,
    EventValue,
    Overrun,
    RtnlEvent,
    describe,
)
from topowatch.errors import DumpInterrupted


def change_events(t0: Topology, t1: Topology) -> list[RtnlEvent]:
    """The events the kernel would announce going from ``t0`` to ``t1``, removals first."""
    names0, names1 = t0.names(), t1.names()
    removed: list[RtnlEvent] = []
    added: list[RtnlEvent] = []

    def one(kind: EventKind, action: EventAction, value: EventValue) -> RtnlEvent:
        names = names1 if action == EventAction.NEW else names0
        return RtnlEvent(kind, action, describe(kind, action, value, names), value)

    links1 = {link.index: link for link in t1.links}
    for link in t0.links:
        if link.index not in links1:
            removed.append(one(EventKind.LINK, EventAction.DEL, link))
    links0 = set(t0.links)
    for link in t1.links:
        if link not in links0:
            added.append(one(EventKind.LINK, EventAction.NEW, link))
    groups: tuple[tuple[EventKind, Sequence[EventValue], Sequence[EventValue]], ...] = (
        (EventKind.ADDRESS, t0.addresses, t1.addresses),
        (EventKind.ROUTE, t0.routes, t1.routes),
        (EventKind.RULE, t0.rules, t1.rules),
    )
    for kind, before, after in groups:
        after_set, before_set = set(after), set(before)
        removed.extend(one(kind, EventAction.DEL, v) for v in before if v not in after_set)
        added.extend(one(kind, EventAction.NEW, v) for v in after if v not in before_set)
    return removed + added


class FakeRtnl:
    """An in-memory rtnetlink: ``dump()`` answers the current topology, ``events()`` what you emit."""

    def __init__(self, topology: Topology | None = None) -> None:
        self.topology = topology if topology is not None else Topology()
        self.dumps = 0  # dump() calls, interrupted ones included
        self._interrupts = 0
        self._subscribers: list[trio.MemorySendChannel[Event]] = []

    async def dump(self, routes: bool = True) -> Topology:
        self.dumps += 1
        await trio.lowlevel.checkpoint()
        if self._interrupts:
            self._interrupts -= 1
            raise DumpInterrupted("fake dump interrupted: results may be inconsistent")
        return self.topology if routes else replace(self.topology, routes=())

    def events(self) -> AbstractAsyncContextManager[AsyncIterator[Event]]:
        return self._subscribe()

    @asynccontextmanager
    async def _subscribe(self) -> AsyncIterator[AsyncIterator[Event]]:
        send, receive = trio.open_memory_channel[Event](float("inf"))
        self._subscribers.append(send)
        try:
            async with receive:
                yield receive
        finally:
            self._subscribers.remove(send)
            send.close()

    @property
    def subscribers(self) -> int:
        """How many event streams are open (a test can wait for its consumer to subscribe)."""
        return len(self._subscribers)

    def emit(self, event: Event) -> None:
        for send in self._subscribers:
            send.send_nowait(event)

    def apply(self, topology: Topology, *, announce: bool = True) -> list[RtnlEvent]:
        """Make ``topology`` current; emit its change events unless ``announce`` is False."""
        events = change_events(self.topology, topology)
        self.topology = topology
        if announce:
            for event in events:
                self.emit(event)
        return events

    def overrun(self) -> None:
        """Tell every subscriber that events were lost."""
        self.emit(Overrun())

    def interrupt_next_dumps(self, count: int = 1) -> None:
        self._interrupts = count
