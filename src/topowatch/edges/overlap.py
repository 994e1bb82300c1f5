# SPDX-License-Identifier: GPL-2.0-or-later
"""Deletes that overlap the dump: stale records handed to a second ctnetlink socket as they are judged.

What this module decides: when a reaction's stale records go to the kernel
before its dump has ended. A compiled scan appends the entries it settles
as stale to its decider's ``records``; after each burst of the dump,
``Overlap.feed`` (in the scanning thread) hands the records added since to
a deleting thread, which re-checks and deletes them in batches with
``Conntrack.delete_current`` on a socket of its own. The reaction then
costs about max(dump and judge, delete) plus the tail, not their sum.

It must never delete what the reactor's own delete would not have: every
record goes through the same re-check (same id, ``still``) just before its
delete; ``go()`` is asked before each batch and a False stops the early
deletes for good (what was not handled is left to the reactor, which
checks the ruleset again first); and an early delete is only ever started
where the deletion cap cannot be reached (``EarlyDeletes``: the reactor's
condition, and here the kernel's table size). A dump that is interrupted
and restarted gets a fresh decider: records of the abandoned one that were
handed over are still judged correctly (each stands on its own entry) and
their deletes count; ``taken`` counts only the returned decider's records.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from topowatch.core.decide import STALE_RECORD, StaleEntries
from topowatch.edges.ctnetlink import Conntrack, DeleteResult
from topowatch.errors import TopowatchError

__all__ = ["Overlap", "table_max"]

log = logging.getLogger(__name__)

# Records handed over at once, at least (the delete path re-checks them in batches of its own).
HAND_OVER = 256
CONNTRACK_MAX = Path("/proc/sys/net/netfilter/nf_conntrack_max")


def table_max(path: Path = CONNTRACK_MAX) -> int | None:
    """How many entries the kernel's conntrack table may hold (this namespace's view); None if unknown."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class Overlap:
    """One reaction's early deletes: ``feed`` from the scanning thread, ``finish`` once the scan ended."""

    def __init__(self, ct: Conntrack, still: Callable[..., bool], go: Callable[[], bool]) -> None:
        self.ct = ct
        self.still = still
        self.go = go
        self.results: list[DeleteResult] = []
        self.error: BaseException | None = None
        self.stopped = False
        self._queue: queue.SimpleQueue[tuple[object, int, bytes, Callable[[bytes, int], Any]] | None] = (
            queue.SimpleQueue())
        self._consumer: object | None = None
        self._handed = 0  # bytes of the current consumer's records handed over
        self._done: dict[int, int] = {}  # id(consumer) -> bytes of its records handled
        self._keep: list[object] = []  # the consumers handed from (their ids stay theirs)
        self.first_at: float | None = None
        self.busy = 0.0  # seconds spent in deletes (their own cost, not the waits between them)
        # The scanning thread holds ``_gate`` while it judges a burst (``enter`` to ``feed``), the
        # deleting thread while it re-checks and deletes a chunk: a batch's re-check and delete
        # never wait for the GIL behind a burst being judged, so the window between them stays
        # the kernel's; the deletes run while the scanning thread waits for the next burst. A
        # waiting delete goes before the next burst (``_want``, ``_granted``).
        self._gate = threading.Lock()
        self._holding = False  # the scanning thread holds the gate
        self._want = threading.Event()
        self._granted = threading.Event()
        self._thread = threading.Thread(target=self._run, name="topowatch-ct-overlap", daemon=True)
        self._thread.start()

    def enter(self) -> None:
        """A burst is about to be judged (the scanning thread): after a delete that waits, if any."""
        if self.stopped:
            return
        if self._want.is_set():
            self._granted.wait(1.0)
        self._gate.acquire()
        self._holding = True

    def feed(self, consumer: Any) -> None:
        """The records ``consumer`` settled as stale since the last call, handed over in one piece."""
        if self._holding:  # the burst is judged: the gate is free until the next one
            self._holding = False
            self._gate.release()
        records = getattr(consumer, "records", None)
        if records is None or self.stopped:
            return
        if consumer is not self._consumer:  # a restarted dump: a fresh decider
            self._consumer, self._handed = consumer, 0
            self._keep.append(consumer)
        end = len(records) - len(records) % STALE_RECORD.size
        if end - self._handed < HAND_OVER * STALE_RECORD.size:
            return
        chunk = bytes(records[self._handed:end])
        self._queue.put((consumer, self._handed + len(chunk), chunk, consumer._record_entry))
        self._handed = end

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            consumer, end, chunk, entry = item
            if self.stopped:
                continue
            try:
                if not self.go():
                    self.stopped = True
                    continue
                began = time.perf_counter()
                if self.first_at is None:
                    self.first_at = began
                pending = StaleEntries((), chunk, _builder(entry, chunk))
                self._granted.clear()
                self._want.set()
                self._gate.acquire()  # between bursts: the next one waits meanwhile
                self._want.clear()
                self._granted.set()
                try:
                    self.results.append(self.ct.delete_current(pending, self.still))
                finally:
                    self._gate.release()
                self.busy += time.perf_counter() - began
                self._done[id(consumer)] = end
            except (TopowatchError, OSError) as exc:
                self.error = exc
                self.stopped = True
                log.warning("deletes overlapping the dump stopped: %s; the rest waits for its end", exc)
            except Exception as exc:  # a defect: not the thread's silent end (the rest is the tail's)
                self.error = exc
                self.stopped = True
                log.exception("deletes overlapping the dump stopped by an unexpected error; the rest "
                              "waits for its end")

    def finish(self, consumer: object) -> tuple[int, list[DeleteResult]]:
        """Wait for the handed records to be handled: (records of ``consumer`` handled, results)."""
        self._queue.put(None)
        self._let_go()
        self._thread.join()
        return self._done.get(id(consumer), 0) // STALE_RECORD.size, self.results

    def abandon(self) -> None:
        """Stop at once (the scan failed): what is queued is not deleted."""
        self.stopped = True
        self._queue.put(None)
        self._let_go()
        self._thread.join()

    def _let_go(self) -> None:
        """The scan has ended (maybe inside a burst, by an error): the gate is the deleting thread's."""
        if self._holding:
            self._holding = False
            self._gate.release()


def _builder(entry: Callable[[bytes, int], Any], chunk: bytes) -> Callable[[int], Any]:
    """A record's ``Entry``, built only when the re-check asks for it (``Decider._record_entry``)."""

    def build(index: int) -> Any:
        return entry(chunk, index)

    return build
