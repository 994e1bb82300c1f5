"""``edges.overlap`` and ``KernelBackend.judge`` with early deletes, without a kernel: how the deleting
thread ends when the scan fails, when the reaction is cancelled, or when a delete raises.

The conntrack sockets are fakes: the scan hands records over as the real one does (``after_burst``
after a burst), the deleting socket notes which records it was given. A record's bytes name it
(its first byte), so each test can say which ones were deleted.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest
import trio

from topowatch.core.decide import STALE_RECORD, StaleEntries
from topowatch.core.eligibility import Eligibility
from topowatch.edges import kernel as kernel_mod
from topowatch.edges import overlap as overlap_mod
from topowatch.edges.ctnetlink import DeleteResult
from topowatch.edges.overlap import Overlap
from topowatch.errors import NetlinkError
from topowatch.sources import EarlyDeletes


def record(name: int) -> bytes:
    return bytes((name,)) + bytes(STALE_RECORD.size - 1)


class Consumer:
    """What the scan judges into: stale records appended in order (a ``Decider``'s fields)."""

    def __init__(self) -> None:
        self.records = bytearray()

    def _record_entry(self, records: bytes, index: int) -> Any:
        raise AssertionError("a record's Entry is not built on the delete path")


class Deleting:
    """The second socket: ``delete_current`` notes the records (by name); ``hold`` blocks the first
    call until ``overlap`` is stopped (or 2 s pass); ``fail`` raises this on every call."""

    def __init__(self, *, hold: bool = False, fail: BaseException | None = None) -> None:
        self.deleted: list[int] = []
        self.started = threading.Event()
        self.overlap: Overlap | None = None
        self.hold = hold
        self.fail = fail

    def delete_current(self, pending: StaleEntries, still: Any) -> DeleteResult:
        self.started.set()
        if self.hold:
            self.hold = False
            deadline = time.monotonic() + 2.0
            while not (self.overlap is not None and self.overlap.stopped) and time.monotonic() < deadline:
                time.sleep(0.001)
        if self.fail is not None:
            raise self.fail
        names = list(pending.records[:: STALE_RECORD.size])
        self.deleted += names
        return DeleteResult(requested=len(names), deleted=len(names))


class Scanning:
    """The dumping socket: ``scan`` hands over one burst of records per name in ``bursts``, then
    waits for ``go_on`` (if given) and ends, or raises ``fail``."""

    def __init__(self, bursts: list[list[int]], *, go_on: threading.Event | None = None,
                 fail: BaseException | None = None) -> None:  # fmt: skip
        self.bursts = bursts
        self.go_on = go_on
        self.fail = fail
        self.after_burst: Any = None
        self.last_dump = None
        self.consumer: Consumer | None = None

    def scan(self, start: Any, *, unreplied_only: bool = True) -> Any:
        consumer = self.consumer = start()
        for burst in self.bursts:
            consumer.records += b"".join(map(record, burst))
            if self.after_burst is not None:
                self.after_burst(consumer)
        if self.go_on is not None:
            self.go_on.wait(2.0)
        if self.fail is not None:
            raise self.fail
        return consumer


@pytest.fixture
def one_record_hand_over(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(overlap_mod, "HAND_OVER", 1)


def backend_with(scanning: Scanning, deleting: Deleting, monkeypatch: pytest.MonkeyPatch) -> tuple[
        kernel_mod.KernelBackend, list[Overlap]]:  # fmt: skip
    monkeypatch.setattr(kernel_mod, "probe_xfrm", lambda: None)  # no NETLINK_XFRM socket here
    backend = kernel_mod.KernelBackend()
    made: list[Overlap] = []

    def overlap(early: EarlyDeletes) -> Overlap:
        made.append(Overlap(deleting, early.still, early.go))  # type: ignore[arg-type]
        deleting.overlap = made[-1]
        return made[-1]

    backend._conntrack = lambda: scanning  # type: ignore[assignment,method-assign,return-value]
    backend._overlap = overlap  # type: ignore[method-assign]
    return backend, made


def early() -> EarlyDeletes:
    return EarlyDeletes(lambda dumped, now: True, cap=1 << 30, go=lambda: True)


async def test_a_cancelled_reaction_leaves_no_queued_record_to_be_deleted_behind_its_back(
    monkeypatch: pytest.MonkeyPatch, one_record_hand_over: None,
) -> None:
    """SIGTERM while the dump runs: the scan's thread cannot be abandoned, so it ends; the records
    still queued then must not be deleted once the reaction is gone (nobody counts or logs them),
    and the deleting thread must end (the second socket is not left to a stray thread)."""
    go_on = threading.Event()
    deleting = Deleting(hold=True)
    scanning = Scanning([[1], [2], [3]], go_on=go_on)
    backend, made = backend_with(scanning, deleting, monkeypatch)

    async def cancel_once_deleting(scope: trio.CancelScope) -> None:
        while not deleting.started.is_set():
            await trio.sleep(0.001)
        scope.cancel()  # record 1's delete is under way, 2 and 3 are queued
        go_on.set()  # the scan ends; the judge sees the cancellation next

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_once_deleting, scope)
            await backend.judge(Eligibility(), lambda build: Consumer(), early=early())  # type: ignore[arg-type,return-value]
    assert scope.cancelled_caught
    (overlap,) = made
    overlap._thread.join(3.0)
    assert not overlap._thread.is_alive()
    assert deleting.deleted == [1]  # the batch under way when it was stopped, nothing after
    assert scanning.after_burst is None


async def test_a_failed_scan_stops_the_deletes_and_says_what_they_did(
    monkeypatch: pytest.MonkeyPatch, one_record_hand_over: None, caplog: pytest.LogCaptureFixture,
) -> None:
    """The scan raises (a dump that cannot end): the reaction fails and counts nothing, so the
    deletes that did run are said in the log; what was still queued is not deleted."""
    deleting = Deleting(hold=True)
    scanning = Scanning([[1], [2]], fail=NetlinkError("ctnetlink dump failed: Input/output error", 5))
    backend, made = backend_with(scanning, deleting, monkeypatch)
    scanning.go_on = threading.Event()

    async def fail_once_deleting() -> None:
        while not deleting.started.is_set():
            await trio.sleep(0.001)
        assert scanning.go_on is not None
        scanning.go_on.set()  # record 1's delete is under way, 2 is queued

    caught: list[NetlinkError] = []
    with caplog.at_level(logging.WARNING, logger="topowatch.kernel"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fail_once_deleting)
            try:
                await backend.judge(Eligibility(), lambda build: Consumer(), early=early())  # type: ignore[arg-type,return-value]
            except NetlinkError as exc:
                caught.append(exc)
    assert caught and caught[0] is scanning.fail
    assert deleting.deleted == [1]
    assert not made[0]._thread.is_alive()
    assert any("1 entries deleted while the dump ran" in r.getMessage() for r in caplog.records)


def test_an_unexpected_error_in_a_delete_stops_the_early_deletes_and_is_logged(
    one_record_hand_over: None, caplog: pytest.LogCaptureFixture,
) -> None:
    """A defect in the delete path (here a ValueError) must not end the deleting thread silently:
    it is logged, ``error`` says it, and what is left (from the failed batch on) is the tail's."""
    deleting = Deleting(fail=ValueError("a defect"))
    overlap = Overlap(deleting, lambda dumped, now: True, lambda: True)  # type: ignore[arg-type]
    consumer = Consumer()
    with caplog.at_level(logging.ERROR, logger="topowatch.edges.overlap"):
        for name in (1, 2):
            consumer.records += record(name)
            overlap.feed(consumer)
        taken, results = overlap.finish(consumer)
    assert isinstance(overlap.error, ValueError) and overlap.stopped
    assert (taken, results, deleting.deleted) == (0, [], [])
    assert any(r.exc_info and r.exc_info[1] is deleting.fail for r in caplog.records)


def test_a_delete_never_runs_while_a_burst_is_judged(one_record_hand_over: None) -> None:
    """The re-check and the delete of a batch are never held up by a burst being judged (the GIL would
    stretch the window between them): the deleting thread takes its turn between bursts."""
    judging: list[tuple[float, float]] = []
    deleting_at: list[tuple[float, float]] = []

    class Timed(Deleting):
        def delete_current(self, pending: StaleEntries, still: Any) -> DeleteResult:
            began = time.perf_counter()
            time.sleep(0.004)  # a batch's GETs, answers and DELETEs
            result = super().delete_current(pending, still)
            deleting_at.append((began, time.perf_counter()))
            return result

    deleting = Timed()
    overlap = Overlap(deleting, lambda dumped, now: True, lambda: True)  # type: ignore[arg-type]
    consumer = Consumer()
    for name in range(1, 31):
        overlap.enter()
        began = time.perf_counter()
        consumer.records += record(name)
        time.sleep(0.003)  # judging the burst (the GIL held, in C)
        judging.append((began, time.perf_counter()))
        overlap.feed(consumer)
        time.sleep(0.002)  # waiting for the kernel's next burst: deletes go now
    taken, _ = overlap.finish(consumer)
    assert taken == 30 and deleting.deleted == list(range(1, 31))
    assert len(deleting_at) >= 10  # most went between bursts, not after the scan
    for d0, d1 in deleting_at:
        assert all(d1 <= j0 or j1 <= d0 for j0, j1 in judging), "a delete overlapped a judged burst"
