# SPDX-License-Identifier: GPL-2.0-or-later
"""The pressure agent: watches the conntrack table fill, and under pressure lowers timeouts and evicts.

Theory of operation: one trio task (``PressureAgent.run``) in the daemon's
nursery. Each tick it reads ``nf_conntrack_count``/``_max``/``_buckets``
(sysctls) and the kernel's per-CPU counters (ctnetlink), hands the
``core.pressure.Sample`` to the ``PressureController`` and carries out the
``Step`` it returns:

- pressure starts: a census dump and one log line that says what fills the
  table; the unreplied and half-open timeouts are lowered, the previous
  values saved in the namespace's ``TimeoutLedger`` *before* the first write;
- an eviction budget: one dump (UNREPLIED only, filtered in the kernel, unless
  the last resort is open) through an ``EvictionPicker``; its candidates wait
  in queues (up to ``QUEUE_TTL``), and the ones taken are re-read just before
  they are deleted by orig tuple and id (``Conntrack.delete_current`` with
  ``core.pressure.still_evictable``): one replied to, refreshed or
  ESTABLISHED since the scan is kept, and said so; the log says how many of
  which kind went;
- pressure ends: the saved timeouts are written back (those someone else
  changed meanwhile are left as they are, and said so) and the ledger removed.

Then it sleeps for the interval the controller asks for (rare in an empty
table, frequent near the high mark), and at least as long as the tick's own
work took, so the agent never takes more than half a core however hard the
table is flooded. At start a ledger left by a run that did not stop cleanly
(SIGKILL, crash) is restored first; on shutdown lowered timeouts are restored.

It never evicts what ``core.pressure`` does not choose, never writes a timeout
it has not saved first, and never lets a kernel error end the daemon: a
failed tick is logged and counted, and the next one tries again.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from topowatch.core.conntrack import Entry, Reread
from topowatch.core.decide import RawEntry
from topowatch.core.pressure import (
    LOWERABLE,
    TIMEOUT_NAMES,
    Candidate,
    Census,
    EvictionPicker,
    PressureController,
    PressurePolicy,
    Sample,
    State,
    Step,
    count_by,
    describe_pressure,
    lowered_values,
    restore_plan,
    still_evictable,
)
from topowatch.edges.ctcodec import entry_from_raw
from topowatch.edges.ctnetlink import Conntrack, DeleteResult
from topowatch.edges.sysctl import ConntrackSysctl, LedgerRecord, SysctlError, TimeoutLedger
from topowatch.errors import TopowatchError

log = logging.getLogger("topowatch.pressure")

# A scan keeps this many batches of candidates per class, used for this long: the
# dump (seconds for a full table) is paid once for many small batches of deletes.
QUEUE_BATCHES = 20
QUEUE_TTL = 10.0


@dataclass(frozen=True, slots=True)
class PressureEvent:
    """What observers (metrics, D-Bus) hear: ``kind`` is start, end, evict or timeouts."""

    kind: str
    summary: str
    fill: float
    evicted: int = 0
    by_class: dict[str, int] = field(default_factory=dict)
    timeouts_changed: int = 0


@dataclass(slots=True)
class PressureCounters:
    ticks: int = 0
    episodes: int = 0
    evicted: int = 0
    evicted_by_class: dict[str, int] = field(default_factory=dict)
    timeout_changes: int = 0
    errors: int = 0
    last_fill: float = 0.0
    last_summary: str = ""


class PressureAgent:
    def __init__(
        self,
        policy: Callable[[], PressurePolicy],
        *,
        sysctl: ConntrackSysctl | None = None,
        ledger: TimeoutLedger | None = None,
        conntrack: Callable[[], Conntrack] = Conntrack,
    ) -> None:
        self.policy = policy
        self.sysctl = sysctl or ConntrackSysctl()
        self.ledger = ledger or TimeoutLedger.for_namespace()
        self._make_conntrack = conntrack
        self._ct: Conntrack | None = None
        self.controller = PressureController(policy())
        self.counters = PressureCounters()
        self.hooks: list[Callable[[PressureEvent], None]] = []
        self._lowered: LedgerRecord | None = None
        self._wake = trio.Event()
        self._resize_refused = False
        self._pending: list[PressureEvent] = []
        # Candidates of the last scan, best first, and what that scan saw.
        self._unreplied: deque[Candidate] = deque()
        self._replied: deque[Candidate] = deque()
        self._more = {False: True, True: True}
        self._scanned_at = -math.inf
        self._census: Census | None = None
        # Fault injection for tests only: called (in the worker thread) between taking candidates and
        # evicting them.
        self.before_evict: Callable[[list[Candidate]], None] | None = None

    @property
    def state(self) -> State:
        return self.controller.state

    def status(self) -> dict[str, Any]:
        c = self.counters
        return {
            "state": self.state.value, "fill": round(c.last_fill, 4), "episodes": c.episodes,
            "evicted": c.evicted, "evicted_by_class": dict(c.evicted_by_class),
            "timeouts_lowered": dict(self._lowered.written) if self._lowered else {},
            "errors": c.errors, "summary": c.last_summary,
        }  # fmt: skip

    def _emit(self, event: PressureEvent) -> None:
        # Kept until ``deliver``: the blocking half runs in a worker thread, observers in trio's.
        self._pending.append(event)

    def deliver(self) -> None:
        """Hand the events of the last blocking step to the observers (call from the trio thread)."""
        pending, self._pending = self._pending, []
        for event in pending:
            for hook in self.hooks:
                try:
                    hook(event)
                except Exception:  # an observer must never stop the agent
                    log.exception("pressure observer failed")

    # -- timeouts ---------------------------------------------------------------------

    def recover(self) -> None:
        """Restore what a previous run in this namespace lowered and never restored."""
        record = self.ledger.load()
        if record is None:
            return
        log.warning("restoring conntrack timeouts a previous run lowered and did not restore (%s)",
                    self.ledger.path)
        self._restore(record)

    def _lower(self, policy: PressurePolicy) -> None:
        current = self.sysctl.timeouts(LOWERABLE)
        lowered = lowered_values(policy, current)
        if not lowered:
            return
        record = LedgerRecord({name: current[name] for name in lowered}, lowered)
        self.ledger.save(record)  # before any write: a crash after it is recoverable
        self._lowered = record
        written: dict[str, int] = {}
        try:
            for name, value in lowered.items():
                self.sysctl.set_timeouts({name: value})
                written[name] = value
        except SysctlError:
            # Undo what was written; the rest still holds its saved value.
            self._restore(LedgerRecord({n: record.saved[n] for n in written}, written))
            raise
        self.counters.timeout_changes += len(lowered)
        text = ", ".join(f"{name} {record.saved[name]} -> {value} s" for name, value in lowered.items())
        log.warning("pressure: lowered conntrack timeouts: %s", text)
        self._emit(PressureEvent("timeouts", f"lowered {text}", self.counters.last_fill,
                                 timeouts_changed=len(lowered)))

    def _restore(self, record: LedgerRecord) -> None:
        current = self.sysctl.timeouts(record.saved)
        restore, foreign = restore_plan(record.saved, record.written, current)
        for name, value in foreign.items():
            log.warning("pressure: %s timeout is %d s, not the %d s topowatch set: someone changed "
                        "it; leaving it (it was %d s before)",
                        name, value, record.written[name], record.saved[name])
        if restore:
            self.sysctl.set_timeouts(restore)
        self.ledger.clear()
        self._lowered = None
        if restore:
            self.counters.timeout_changes += len(restore)
            text = ", ".join(f"{n} {v} s" for n, v in restore.items())
            log.warning("pressure: restored conntrack timeouts: %s", text)
            self._emit(PressureEvent("timeouts", f"restored {text}", self.counters.last_fill,
                                     timeouts_changed=len(restore)))

    def _resize(self, sample: Sample) -> None:
        """Give the hash table one bucket per entry the table may hold (init namespace only)."""
        if sample.buckets >= sample.max or self._resize_refused:
            return
        try:
            self.sysctl.write("nf_conntrack_buckets", sample.max)
        except SysctlError as exc:
            self._resize_refused = True  # said once: the kernel allows it only in the init namespace
            log.warning("pressure: cannot raise the hash table to %d buckets (%s); only the init "
                        "namespace may, with sysctl net.netfilter.nf_conntrack_buckets=%d",
                        sample.max, exc, sample.max)
            return
        log.warning("pressure: raised nf_conntrack_buckets from %d to %d (one bucket per entry)",
                    sample.buckets, sample.max)

    # -- one tick ---------------------------------------------------------------------

    def _conntrack(self) -> Conntrack:
        if self._ct is None:
            self._ct = self._make_conntrack()
        return self._ct

    def read_sample(self) -> Sample:
        size = self.sysctl.table()
        stats = self._conntrack().stats()
        return Sample(time=time.monotonic(), count=size.count, max=size.max, buckets=size.buckets,
                      drop=stats["drop"], early_drop=stats["early_drop"],
                      insert_failed=stats["insert_failed"])

    def _scan(self, policy: PressurePolicy, *, full: bool) -> Census:
        """One dump; refills the candidate queues. Only UNREPLIED entries cross the socket unless ``full``.

        A full dump also collects replied candidates (for the last resort)
        and counts the whole table for the census.
        """
        ct = self._conntrack()
        timeouts = self.sysctl.timeouts(TIMEOUT_NAMES)
        keep = policy.batch * QUEUE_BATCHES

        def build(raw: RawEntry) -> Entry:
            return entry_from_raw(raw, ct.cache)

        def picker() -> EvictionPicker:
            return EvictionPicker(policy, keep, collect_replied=full, timeouts=timeouts, build=build)

        picked = ct.scan(picker, unreplied_only=not full)
        chosen = picked.chosen()
        self._unreplied = deque(c for c in chosen if not c.replied)
        self._replied = deque(c for c in chosen if c.replied)
        # A class that did not fill its heap was captured whole: rescanning finds nothing more.
        self._more = {False: len(self._unreplied) >= keep, True: len(self._replied) >= keep or not full}
        self._scanned_at = time.monotonic()
        self._census = picked.census
        return picked.census

    def _take(self, policy: PressurePolicy, step: Step) -> list[Candidate]:
        """Up to ``step.budget`` candidates from the queues, rescanning only when that can find more."""
        expired = time.monotonic() - self._scanned_at > QUEUE_TTL
        empty = not self._unreplied and not (step.replied_allowed and self._replied)
        wanted_more = self._more[False] or (step.replied_allowed and self._more[True])
        if expired or (empty and wanted_more):
            self._scan(policy, full=step.replied_allowed)
        taken: list[Candidate] = []
        while self._unreplied and len(taken) < step.budget:
            taken.append(self._unreplied.popleft())
        while step.replied_allowed and self._replied and len(taken) < step.budget:
            taken.append(self._replied.popleft())
        return taken

    def tick(self) -> Step:
        """``observe`` and ``deliver`` in one call (blocking; for callers without a trio loop)."""
        step = self.observe()
        self.deliver()
        return step

    def observe(self) -> Step:
        """One sample and what it asks for (blocking: call from a worker thread, then ``deliver``)."""
        policy = self.policy()
        if policy != self.controller.policy:
            self.controller.policy = policy
        sample = self.read_sample()
        step = self.controller.observe(sample)
        c = self.counters
        c.ticks += 1
        c.last_fill = sample.fill
        if step.started:
            c.episodes += 1
            census = self._scan(policy, full=True)  # the census, and the first candidates, in one dump
            c.last_summary = describe_pressure(sample, census, step)
            log.warning("pressure starts: %s", c.last_summary)
            self._emit(PressureEvent("start", c.last_summary, sample.fill))
            self._lower(policy)
            if policy.resize_buckets:
                self._resize(sample)
            # The census dump took a while (seconds for a full table): look again, so that
            # flows refused meanwhile open the last resort now rather than a tick later.
            sample = self.read_sample()
            step = dataclasses.replace(self.controller.observe(sample), started=True)
            c.last_fill = sample.fill
        if step.budget > 0:
            started = time.monotonic()
            chosen = self._take(policy, step)
            if chosen and self.before_evict is not None:
                self.before_evict(chosen)
            if chosen:
                result, kept = self._evict(chosen)
                self.controller.evicted(result.deleted)
                gone = [cand for cand in chosen if id(cand) not in kept]
                by_class = count_by(gone)
                c.evicted += result.deleted
                for name, n in by_class.items():
                    c.evicted_by_class[name] = c.evicted_by_class.get(name, 0) + n
                oldest = max(cand.age for cand in chosen)
                summary = (f"evicted {result.deleted} of {len(chosen)} chosen "
                           f"({', '.join(f'{n} {k}' for k, n in by_class.items())}; idle up to {oldest} s) "
                           f"in {(time.monotonic() - started) * 1000:.0f} ms; {result.describe()}")
                log.warning("pressure: %s; %s", summary, describe_pressure(sample, self._census, step),
                            extra={"fields": {"event": "pressure_evict", "evicted": result.deleted,
                                              "chosen": len(chosen), "by_class": by_class,
                                              "idle_max_s": oldest, "fill": round(sample.fill, 4)}})
                for cand in chosen:
                    if id(cand) in kept:
                        log.info("kept %s: %s at the scan, %s since", cand.entry.describe(), cand.reason(),
                                 kept[id(cand)])
                for cand in gone[:5]:
                    log.info("evicted %s: %s", cand.entry.describe(), cand.reason())
                self._emit(PressureEvent("evict", summary, sample.fill, result.deleted, by_class))
            elif step.refused:
                log.warning("pressure: nothing may be evicted (%s)",
                            describe_pressure(sample, self._census, step))
        if step.ended:
            summary = (f"conntrack table {sample.fill:.0%} full ({sample.count:,}/{sample.max:,}): "
                       f"pressure ends")
            log.warning("%s", summary)
            if self._lowered is not None:
                self._restore(self._lowered)
            c.last_summary = summary
            self._emit(PressureEvent("end", summary, sample.fill))
        return step

    def _evict(self, chosen: list[Candidate]) -> tuple[DeleteResult, dict[int, str]]:
        """Delete the candidates still evictable when re-read now: (the result, kept: id -> why)."""
        timeouts = self.sysctl.timeouts(TIMEOUT_NAMES)
        # Since the scan ended: each candidate was read before that, so a timer not refreshed since
        # has run down at least this much (see still_evictable).
        elapsed = time.monotonic() - self._scanned_at
        by_entry = {id(cand.entry): cand for cand in chosen}
        kept: dict[int, str] = {}

        def still(dumped: Entry, now: Reread) -> bool:
            cand = by_entry[id(dumped)]
            if still_evictable(cand, now, elapsed, timeouts):
                return True
            kept[id(cand)] = ("replied to" if now.replied_since(dumped)
                              else "ESTABLISHED" if now.tcp_state is not None and not cand.replied
                              else "refreshed or not known to be idle")
            return False

        return self._conntrack().delete_current([cand.entry for cand in chosen], still), kept

    # -- the task -----------------------------------------------------------------------

    def policy_changed(self) -> None:
        """Policies were reloaded: look now (a disabled agent sleeps until this is called)."""
        self._wake.set()

    async def _pause(self, seconds: float | None) -> None:
        """Sleep ``seconds`` (None: until ``policy_changed``); a reload cuts it short."""
        with trio.move_on_after(seconds if seconds is not None else math.inf):
            await self._wake.wait()
        self._wake = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await trio.to_thread.run_sync(self.recover)
            self.deliver()
        except (TopowatchError, OSError) as exc:
            log.error("pressure: cannot restore timeouts from %s: %s", self.ledger.path, exc)
        task_status.started()
        try:
            while True:
                if not self.policy().enabled:
                    if self._lowered is not None:
                        log.warning("pressure handling disabled by policy: restoring timeouts")
                        await trio.to_thread.run_sync(self._restore, self._lowered)
                        self.deliver()
                    self.controller.state = State.NORMAL
                    await self._pause(None)  # no periodic wake-up the policy did not ask for
                    continue
                began = trio.current_time()
                interval = self.controller.policy.max_interval
                try:
                    step = await trio.to_thread.run_sync(self.observe)
                    interval = step.interval
                except (TopowatchError, OSError) as exc:
                    self.counters.errors += 1
                    log.error("pressure: tick failed: %s", exc)
                self.deliver()
                worked = trio.current_time() - began
                await self._pause(max(interval, worked))
        finally:
            if self._ct is not None:
                self._ct.close()
                self._ct = None
            if self._lowered is not None:
                with trio.CancelScope(shield=True):
                    try:
                        await trio.to_thread.run_sync(self._restore, self._lowered)
                        self.deliver()
                    except TopowatchError as exc:
                        log.error("pressure: could not restore timeouts on shutdown (%s); the next "
                                  "start restores them from %s", exc, self.ledger.path)
