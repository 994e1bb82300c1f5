# SPDX-License-Identifier: GPL-2.0-or-later
"""The reactor: from topology events to deleted entries, once per burst.

Theory of operation (trio, structured concurrency): one nursery holds one task
per event source and the reaction loop. Sources push ``Trigger`` values into
the current ``Burst``; the loop waits for the first one, then keeps collecting
until the sources have been quiet for the debounce window or the burst has
lasted ``max_wait``. Then it reacts once: snapshot T1, read the ruleset, dump
UNREPLIED entries, ``core.decide`` against T0, delete the stale ones in
batches, log one line, and T1 becomes T0.

Rules:
- a source that fails is restarted (with back-off) and says so; an overrun
  (lost events) is a trigger of its own: the reaction re-reads everything;
- a reaction that fails (a netlink error, EMFILE or any other OSError) is
  logged and tried again after a back-off (doubling up to ``RETRY_MAX``), as
  a resync: its events are not lost, and the loop goes on; a ruleset that
  fails to read keeps the previous one in force;
- until a ruleset has been read (the first read at startup failed, and every
  retry since), a reaction decides nothing and deletes nothing, and says so;
  each reaction retries the read, and T0 stays the last snapshot a decision
  was made against, so the changes meanwhile are judged once a ruleset is read;
- more stale entries than the cap: nothing is deleted, the refusal is logged;
- an entry is deleted only if, re-read just before its delete, it is still the
  entry judged and still eligible (``Backend.delete`` re-checks with the
  condition given): one replied to since the dump is kept, and counted;
- memory stays bounded: the last ``HISTORY`` reactions are kept, and only the
  latest with its per-entry lists; totals over the daemon's life are counters;
- a ruleset change that arrives during a reaction (a "ruleset" trigger after
  the read, or the backend's word that the kernel's ruleset generation moved,
  for a commit whose event is still in flight) means its decisions may rest
  on a ruleset no longer in force: it reads the ruleset again before
  deleting, deletes only if the NAT part read is the same, and otherwise
  deletes nothing (T0 stays; the change's own trigger brings the next
  reaction, which decides on the new ruleset);
- the loop never wakes up without an event (no polling).
This module never decides staleness itself (``core.decide`` does) and never
speaks netlink (the ``Backend`` does).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import re
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import trio

from topowatch.collector import Settled
from topowatch.core.classify import Classifier
from topowatch.core.conntrack import Entry, Reread
from topowatch.core.decide import (
    Decider,
    Decision,
    EntryBuilder,
    FlushPlan,
    StaleDecisions,
    StaleEntries,
    decide,
    mentions_sport,
)
from topowatch.core.eligibility import Eligibility
from topowatch.core.evaluate import index_rules, predict
from topowatch.core.fib import Fib
from topowatch.core.flow import Flow, Prediction, proto_name
from topowatch.core.impact import Impact, impact, prepare, prepared
from topowatch.core.model import Topology, TopologyChange, diff
from topowatch.core.nat import NatRuleset
from topowatch.errors import TopowatchError
from topowatch.logs import ENTRIES_LOGGER
from topowatch.policy import DEFAULT_EFFECTIVE, Action, EffectivePolicy, Selection
from topowatch.report import code_samples, count_codes, decision_json, group_by_code, group_line, transition
from topowatch.sources import DeleteCounts, EarlyDeletes, EventSource, StillStale, Trigger

__all__ = [  # the sources' values are re-exported: callers of the reactor name them here
    "BRIEF_LINES",
    "HISTORY",
    "LARGE_RULESET",
    "RETRY_MAX",
    "TOPOLOGY_KINDS",
    "Backend",
    "Burst",
    "DeleteCounts",
    "EventSource",
    "Reaction",
    "ReactionTotals",
    "Reactor",
    "ReactorConfig",
    "StillStale",
    "Trigger",
    "plan_once",
    "still_stale",
]

log = logging.getLogger("topowatch.reactor")
entry_log = logging.getLogger(ENTRIES_LOGGER)
# Trigger kinds that change the topology but never the NAT ruleset: a burst made
# only of these keeps the ruleset read before, if the backend reports ruleset
# changes as triggers (``ruleset_events``); anything else re-reads it.
TOPOLOGY_KINDS = frozenset({"link", "address", "route", "rule", "xfrm"})
# Reactions kept for status and tests; only the latest keeps its per-entry lists.
HISTORY = 64
BRIEF_LINES = 8
# Rules from which walking a ruleset is left to a worker thread (about 40 us a rule).
LARGE_RULESET = 2000
# The longest wait before a failed reaction is tried again.
RETRY_MAX = 60.0
# The heap is settled (``collector``) after this many quiet seconds following a reaction, and at
# most once per interval: a full collection blocks the loop for 0.1-0.3 s, so never in a storm.
SETTLE_QUIET = 5.0
SETTLE_INTERVAL = 600.0
# Timings measured inside others (``dump+decide`` holds the rest; ``window`` spans the delete):
# not added again where a reaction's phases are summed.
INNER_PHASES = frozenset({"window", "overlapped deletes", "kernel wait", "judge"})


class Backend(Protocol):
    """What the reactor needs from the kernel; ``edges.kernel`` and the tests' fake provide it."""

    def sources(self) -> Sequence[EventSource]: ...

    async def topology(self) -> Topology: ...

    async def ruleset(self) -> NatRuleset: ...

    async def entries(self, eligibility: Eligibility) -> list[Entry]: ...

    async def delete(self, entries: Sequence[Entry], still: StillStale) -> DeleteCounts:
        """Delete the entries that, re-read just before their delete, are the entries dumped
        (same id) and for which ``still(dumped, now)`` holds; count the others as kept."""
        ...

    async def judge(
        self, eligibility: Eligibility, decider: Callable[[EntryBuilder | None], Decider],
        early: EarlyDeletes | None = None,
    ) -> Decider:
        """Dump the entries and decide them in one pass: ``decider(build)`` makes a fresh
        ``core.decide.Decider`` per dump attempt (``build`` turns a raw entry into an ``Entry``,
        None for a backend that adds ``Entry`` values); the one that saw the whole dump is returned.
        ``early``: leave to delete stale entries while the dump goes on; a backend that does not
        leaves ``early.counts`` None (``sources.EarlyDeletes``)."""
        ...

    # Optional, looked up with getattr (fakes may leave them out):
    # - ``ruleset_events: bool``: ruleset changes arrive as "ruleset" triggers
    #   (or overruns), so a burst without one keeps the ruleset read before;
    # - ``async def ruleset_unchanged() -> bool``: False if the ruleset changed
    #   since the last ``ruleset()`` began, also when its event is still in flight.


def plan_once(
    topology: Topology,
    ruleset: NatRuleset,
    entries: Sequence[Entry],
    eligibility: Eligibility,
    predictor: Callable[[NatRuleset, Fib, Flow], Prediction] = predict,
    *,
    previous: tuple[Topology, NatRuleset] | None = None,
) -> FlushPlan:
    """The plan for one snapshot, outside any reaction (``topowatch plan``/``flush``, D-Bus ``Plan``).

    ``previous``: the snapshot before (topology and ruleset), as a reaction has it.
    """

    def bound(fib: Fib, flow: Flow) -> Prediction:
        return predictor(ruleset, fib, flow)

    sport_matters = mentions_sport(ruleset) or mentions_sport(topology.xfrm_policies)
    if previous is None:
        return decide(
            entries,
            predict=bound,
            fib_now=Fib(topology),
            eligibility=eligibility,
            sport_matters=sport_matters,
            classifier=Classifier.build([topology], [ruleset], eligibility, sport_matters=sport_matters),
        )
    t0, ruleset0 = previous
    # As a reaction judges: the previous ruleset is another only where it differs (a snapshot
    # file's is decoded, another value); the same one says nothing changed in the NAT.
    predict_before: Callable[[Fib, Flow], Prediction] | None = None
    rulesets = [ruleset]
    if ruleset0 is not ruleset and ruleset0 != ruleset:

        def predict_before(fib: Fib, flow: Flow) -> Prediction:
            return predictor(ruleset0, fib, flow)

        rulesets = [ruleset0, ruleset]
        sport_matters = sport_matters or mentions_sport(ruleset0)
    sport_matters = sport_matters or mentions_sport(t0.xfrm_policies)
    return decide(
        entries,
        predict=bound,
        fib_now=Fib(topology),
        fib_before=Fib(t0),
        eligibility=eligibility,
        sport_matters=sport_matters,
        classifier=Classifier.build([t0, topology], rulesets, eligibility, sport_matters=sport_matters),
        predict_before=predict_before,
    )


def _sum_counts(a: DeleteCounts, b: DeleteCounts) -> DeleteCounts:
    """Two deletes of one reaction counted as one (early deletes and the tail)."""
    if a == DeleteCounts():
        return b
    windows = [w for w in (a.window_p99, b.window_p99) if w is not None]
    return DeleteCounts(
        deleted=a.deleted + b.deleted,
        already_gone=a.already_gone + b.already_gone,
        failed=a.failed + b.failed,
        elapsed=a.elapsed + b.elapsed,
        errors=a.errors + b.errors,
        kept_replied=a.kept_replied + b.kept_replied,
        kept_changed=a.kept_changed + b.kept_changed,
        window_p99=max(windows) if windows else None,  # the union's p99 is at most the larger
    )


def still_stale(selection: Selection) -> StillStale:
    """The re-check before each delete: the entry as it is now is still eligible and flushed.

    Under the default eligibility (UNREPLIED only) a reply since the dump
    keeps the entry; under a policy that admits replied entries, the
    reply changes nothing the judgement read, and eligibility is asked again.
    """
    eligibility = selection.eligibility
    every_flushes = all(p.action is Action.FLUSH for p in selection.policies)

    def still(dumped: Entry, now: Reread) -> bool:
        entry = now.applied(dumped)
        return eligibility.admits(entry) and (every_flushes or selection.flushes(entry))

    return still


@dataclass(slots=True)
class ReactionTotals:
    """Sums over every reaction of the daemon's life (the history keeps only the last ``HISTORY``)."""

    reactions: int = 0
    deleted: int = 0
    already_gone: int = 0
    failed: int = 0
    refused: int = 0
    stale: int = 0
    undecided: int = 0
    kept_replied: int = 0

    def add(self, reaction: Reaction) -> None:
        d = reaction.deleted
        self.reactions += 1
        self.deleted += d.deleted
        self.already_gone += d.already_gone
        self.failed += d.failed
        self.refused += reaction.refused
        self.stale += reaction.stale_count
        self.undecided += reaction.undecided_count
        self.kept_replied += d.kept_replied


class _PhaseTimings(dict[str, float]):
    """A reaction's phase timings; recording one is the reaction's progress (``Reactor.progress_at``).

    The watchdog (``sdnotify``) pings during a long reaction as long as phases
    keep completing: a reaction of many phases may outlast ``WatchdogSec``, a
    single phase stuck in an await may not, and a blocked loop pings nothing.
    """

    def __init__(self, reactor: Reactor) -> None:
        super().__init__()
        self._reactor = reactor

    def __setitem__(self, key: str, value: float) -> None:
        super().__setitem__(key, value)
        self._reactor.progress_at = trio.current_time()


@dataclass(frozen=True, slots=True)
class ReactorConfig:
    """Daemon-wide settings; None for debounce/max_wait means "as the policies say"."""

    debounce: float | None = None
    max_wait: float | None = None
    dry_run: bool = False
    # A ceiling over every policy's own cap.
    max_deletions: int = 100_000
    startup_sweep: bool = True
    restart_backoff: float = 1.0
    # A reaction's group lines and per-entry records written by a thread of their own (the
    # daemon), so that the next reaction never waits for them; else in line (tests, one-shot use).
    background_details: bool = False
    # The daemon's heap settling (``collector.settle``): before "ready", and when quiet after
    # reactions at most once per ``SETTLE_INTERVAL``. None: never (tests, one-shot use).
    settle: Callable[[], Settled] | None = None


def _large(ruleset: NatRuleset) -> bool:
    """A ruleset whose full walk takes long enough to belong in a worker thread."""
    return sum(len(chain.rules) for chain in getattr(ruleset, "chains", ())) >= LARGE_RULESET


class DetailWriter:
    """Writes reactions' group lines and per-entry records in one thread of its own, in order.

    A reaction's own line is written by the reactor when its deletes are done; what follows
    it (one record per entry: 80,000 of them took 20 s) must not hold the next reaction back.
    At most ``PENDING`` reactions wait: beyond that a reaction's details are dropped, and a
    warning says so (the daemon's log is then the bottleneck, not the reactions).
    """

    PENDING = 16

    def __init__(self) -> None:
        self._queue: queue.Queue[Callable[[], None]] = queue.Queue(self.PENDING)
        self._thread: threading.Thread | None = None

    def submit(self, write: Callable[[], None], what: str) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="topowatch-details", daemon=True)
            self._thread.start()
        try:
            self._queue.put_nowait(write)
        except queue.Full:
            log.warning("%s: its per-entry records are not written: %d reactions' records are still "
                        "being written", what, self.PENDING)

    def _run(self) -> None:
        while True:
            write = self._queue.get()
            try:
                write()
            except Exception:  # a log handler's failure must not end the writer
                log.exception("writing a reaction's details failed")
            finally:
                self._queue.task_done()

    def drain(self, timeout: float) -> bool:
        """Wait until every submitted reaction's details are written (True), at most ``timeout`` s."""
        end = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > end:
                return False
            time.sleep(0.01)
        return True


@dataclass(slots=True)
class Burst:
    count: int = 0
    first: float = 0.0
    overrun: bool = False
    lines: list[str] = field(default_factory=list)
    events: set[tuple[str, str | None]] = field(default_factory=set)
    kinds: set[str] = field(default_factory=set)  # every trigger kind seen (events is capped)

    def add(self, trigger: Trigger, now: float) -> None:
        if self.count == 0:
            self.first = now
        self.count += 1
        self.overrun = self.overrun or trigger.overrun
        self.kinds.add(trigger.kind or trigger.source)
        if len(self.events) < 4096:
            self.events.add((trigger.kind or trigger.source, trigger.interface))
        # Eight lines tell a burst of kernel events; a request (a hook, an admin, an overrun) is
        # named even after them, up to sixteen lines: the log says which reaction took it.
        room = 16 if trigger.overrun or trigger.source == "dbus" else 8
        if len(self.lines) < room and trigger.description not in self.lines:
            self.lines.append(trigger.description)


# A trigger description of an rtnetlink or xfrm event ("route added: ...", "xfrm policy removed: ..."):
# what it says is in the reaction's change too.
_TOPOLOGY_EVENT = re.compile(r"(link|address|route|rule|xfrm policy|xfrm SA) \w+: ")


def _route_parts(text: str) -> tuple[str, str]:
    """``default via 10.0.2.1 dev up1 table 5`` -> (``default table 5``, ``via 10.0.2.1 dev up1``)."""
    words = text.split()
    head: list[str] = []
    path: list[str] = []
    i = 0
    while i < len(words) and words[i] not in ("via", "dev", "nexthop"):
        head.append(words[i])
        i += 1
    while i < len(words):
        if words[i] in ("table", "metric") and i + 1 < len(words):
            head += words[i:i + 2]
            i += 2
        else:
            path.append(words[i])
            i += 1
    return " ".join(head), " ".join(path)


def _change_text(lines: Sequence[str], limit: int = 2) -> str:
    """The change for the reaction's line: a route replaced reads ``route default: dev up1 -> dev up2``.

    Words only (the lines of ``core.model.diff``); the JSON record keeps the lines as they are.
    """
    removed: dict[str, list[int]] = {}
    added: dict[str, list[int]] = {}
    for i, line in enumerate(lines):
        for suffix, into in ((" removed", removed), (" added", added)):
            if line.startswith("route ") and line.endswith(suffix):
                into.setdefault(_route_parts(line[6:-len(suffix)])[0], []).append(i)
    out: list[str] = []
    skip: set[int] = set()
    for i, line in enumerate(lines):
        if i in skip:
            continue
        if line.startswith("route ") and line.endswith(" removed"):
            key, old = _route_parts(line[6:-8])
            if len(removed.get(key, ())) == 1 and len(added.get(key, ())) == 1:
                j = added[key][0]
                new = _route_parts(lines[j][6:-6])[1]
                skip.add(j)
                out.append(f"route {key}: {old or 'none'} -> {new or 'none'}")
                continue
        out.append(line)
    more = len(out) - limit
    return "; ".join(out[:limit]) + (f"; and {more} more" if more > 0 else "")


@dataclass(frozen=True, slots=True)
class Reaction:
    """What one reaction did; logged as one line and kept (``brief`` once older) for status/tests."""

    number: int
    trigger: str
    events: int
    change: TopologyChange
    plan: FlushPlan
    deleted: DeleteCounts
    refused: bool
    dry_run: bool
    latency: float
    timings: dict[str, float]
    policies: str = "default"
    logged_only: int = 0
    # Why nothing was decided (no ruleset read yet), or None for a reaction that decided.
    skipped: str | None = None
    # (stale, undecided) of a ``brief`` whose plan lists were dropped; None: the plan has them.
    counts: tuple[int, int] | None = None
    # False for a reaction whose change could re-NAT no flow: it made no conntrack dump.
    dumped: bool = True
    # CLOCK_MONOTONIC (``time.monotonic``, the same clock in every process of the host) when the
    # reaction was made, right after its last delete: a benchmark or an admin's script times the
    # event to the last delete from outside with it, without the logging that follows.
    ended: float = field(default_factory=time.monotonic)
    # ``summary`` once made (the log, sd_notify and D-Bus read it; reading the codes of 100,000
    # stale records takes tens of ms). Not carried by ``replace``: ``brief`` starts empty.
    _memo: dict[str, str] = field(default_factory=dict, init=False, compare=False, repr=False)

    def debounce_wait(self) -> float:
        """The part of the latency spent waiting for the burst to end (before the first phase)."""
        work = sum(v for k, v in self.timings.items() if k not in INNER_PHASES)
        return max(0.0, self.latency - work)

    @property
    def stale_count(self) -> int:
        return self.counts[0] if self.counts is not None else len(self.plan.stale)

    @property
    def undecided_count(self) -> int:
        return self.counts[1] if self.counts is not None else len(self.plan.undecided)

    def brief(self) -> Reaction:
        """This reaction without its per-entry lists and with at most ``BRIEF_LINES`` change lines."""
        if self.counts is not None:
            return self
        lines = self.change.lines
        if len(lines) > BRIEF_LINES:
            lines = (*lines[: BRIEF_LINES - 1], f"... {len(lines) - BRIEF_LINES + 1} more changes")
        return replace(self, plan=replace(self.plan, stale=(), undecided=()), change=TopologyChange(lines),
                       counts=(len(self.plan.stale), len(self.plan.undecided)))

    def summary(self) -> str:
        """One line a person reads at a glance: what changed, what was found, what was done, how long."""
        text = self._memo.get("summary")
        if text is None:
            text = self._memo["summary"] = self._summary()
        return text

    def _summary(self) -> str:
        p = self.plan
        what = self.trigger
        if self.change:
            # The topology events are in the change already; other causes (a ruleset, a request) are not.
            others = ", ".join(part for part in self.trigger.split(", ")
                               if not _TOPOLOGY_EVENT.match(part) and part not in self.change.lines)
            what = "; ".join(text for text in (others, _change_text(self.change.lines)) if text)
        if len(what) > 160:  # a burst's first few triggers can be long; the JSON record has them all
            what = what[:157] + "..."
        policy = f" [policy {self.policies}]" if self.policies != "default" else ""
        if self.skipped is not None:
            done = self.deleted.deleted
            return (f"reaction {self.number} ({what}){policy}: NOTHING {'MORE ' if done else ''}DECIDED: "
                    f"{self.skipped}, {f'{done} deleted while the dump ran' if done else 'nothing deleted'}")
        took = f"{self.latency * 1000:.0f} ms incl. {self.debounce_wait() * 1000:.0f} ms debounce"
        if not self.dumped:
            return f"reaction {self.number} ({what}){policy}: {'; '.join(p.notes)}, nothing deleted, {took}"
        stale = self.stale_count
        listed = p.stale
        numbers = listed.protos() if isinstance(listed, StaleDecisions) else {d.entry.proto for d in listed}
        protos = sorted(proto_name(n) for n in numbers)
        kinds = "/".join(protos) + " " if protos else ""
        found = f"{stale} of {p.examined} examined {kinds}entries stale"
        if self.refused:
            action = f"REFUSED: {stale - self.logged_only} exceed the cap, nothing deleted"
        elif self.dry_run:
            action = f"dry run, {stale - self.logged_only} would be deleted"
        else:
            d = self.deleted
            action = f"{d.deleted} deleted"
            if d.already_gone:
                action += f", {d.already_gone} already gone"
            if d.kept_replied:
                action += f", {d.kept_replied} kept: replied since the dump"
            if d.kept_changed:
                action += f", {d.kept_changed} kept: changed since the dump"
            if d.failed:
                action += f", {d.failed} FAILED"
            if d.window_p99 is not None:
                action += f", re-check window p99 {d.window_p99 * 1000:.2f} ms"
        groups = code_samples(p.stale)
        if len(groups) == 1:
            code, _, samples = groups[0]
            changes = {transition(d) for d in samples}
            action += f" ({code}: {next(iter(changes))})" if len(changes) == 1 else f" ({code})"
        elif groups:
            action += " (" + ", ".join(f"{count} {code}" for code, count, _ in groups) + ")"
        if self.logged_only:
            action += f", {self.logged_only} logged only"
        if self.undecided_count:
            action += f", {self.undecided_count} undecided"
        if p.notes:  # e.g. "judged only flows to or from 192.0.2.0/24"
            action += f" ({'; '.join(p.notes)})"
        return f"reaction {self.number} ({what}){policy}: {found}, {action}, {took}"

    def fields(self) -> dict[str, object]:
        """The reaction as one structured log record (``--log-format json``)."""
        p = self.plan
        return {
            "event": "reaction", "reaction": self.number, "trigger": self.trigger, "events": self.events,
            "change": self.change.summary(), "policies": self.policies, "examined": p.examined,
            "eligible": p.eligible, "stale": self.stale_count, "deleted": self.deleted.deleted,
            "already_gone": self.deleted.already_gone, "failed": self.deleted.failed,
            "kept_replied": self.deleted.kept_replied, "kept_changed": self.deleted.kept_changed,
            "recheck_window_p99_ms": None if self.deleted.window_p99 is None
            else round(self.deleted.window_p99 * 1000, 3),
            "undecided": self.undecided_count, "logged_only": self.logged_only, "refused": self.refused,
            "dry_run": self.dry_run, "latency_ms": round(self.latency * 1000, 3),
            "ended_monotonic": round(self.ended, 6),
            "debounce_ms": round(self.debounce_wait() * 1000, 3),
            "timings": {k: round(v * 1000, 3) for k, v in self.timings.items()}, "skipped": self.skipped,
            "stale_by_code": count_codes(p.stale), "undecided_by_code": count_codes(p.undecided),
            "dumped": self.dumped, "notes": list(p.notes), "predicted": p.predicted,
            "distinct_flows": p.distinct_flows,
        }  # fmt: skip


class Reactor:
    def __init__(
        self,
        backend: Backend,
        config: ReactorConfig | None = None,
        *,
        on_reaction: Callable[[Reaction], None] | None = None,
        predictor: Callable[[NatRuleset, Fib, Flow], Prediction] = predict,
        policy: Callable[[], EffectivePolicy] = lambda: DEFAULT_EFFECTIVE,
    ) -> None:
        self.backend = backend
        self.predictor = predictor
        self.policy = policy
        self.config = config or ReactorConfig()
        self.on_reaction = on_reaction
        # More observers of each reaction (D-Bus signal, metrics); each must return quickly, never raise.
        self.reaction_hooks: list[Callable[[Reaction], None]] = []
        # One kernel conversation at a time: a reaction and a D-Bus Plan() share the backend's sockets.
        self.lock = trio.Lock()
        self.t0: Topology | None = None
        self.ruleset: NatRuleset | None = None
        # The ruleset in force with ``t0``: with it, a reaction knows which bindings a flow got then.
        self.ruleset_t0: NatRuleset | None = None
        # The last HISTORY reactions, oldest first; all but the latest are ``brief``.
        self.reactions: list[Reaction] = []
        self.totals = ReactionTotals()
        # Fault injection for tests only: awaited between judging and deleting, with the entries to delete.
        self.before_delete: Callable[[Sequence[Entry]], Awaitable[None]] | None = None
        self.source_restarts = 0
        self.errors: dict[str, int] = {}  # by kind: reaction, source, ruleset (metrics read it)
        self.busy_since: float | None = None  # when the current reaction began (the watchdog reads it)
        # When a reaction last finished a phase (snapshot, ruleset, dump, decide, delete): its progress.
        self.progress_at: float | None = None
        self._burst = Burst()
        self._arrived = trio.Event()
        self._sport_memo: tuple[NatRuleset, bool] | None = None
        self._fibs: list[tuple[Topology, Fib]] = []
        self.details = DetailWriter()
        self._ruleset_changes = 0  # "ruleset" triggers pushed so far: a reaction compares before deleting
        # The policies' eligibilities whose every entry was judged against T0 and every stale one
        # deleted: a reaction whose policies' eligibilities are all here may judge just the flows
        # its change can re-NAT (or none, without a dump). Entries a change's reaction did not
        # admit may have turned stale unjudged: their eligibility leaves the set until a full
        # judgement. (The default policies share one eligibility: they stay in.)
        self._complete: frozenset[Eligibility] = frozenset()
        self._judged_under: tuple[NatRuleset | None, EffectivePolicy | None] = (None, None)
        # True until the startup sweep has decided: the entries it judges were made under states
        # before the daemon's first snapshot, which therefore says nothing about them (that
        # reaction judges with no previous snapshot, as ``plan`` does).
        self._sweep_pending = False
        self.dumps = 0  # conntrack dumps made by reactions (a reaction that can change no flow makes none)
        # Told each time T0 moves (the daemon's snapshot file, ``snapshots.SnapshotWriter.t0_moved``):
        # (T0, its ruleset, the reaction's number (0 at start), whether that reaction judged with a
        # previous snapshot). It must return at once and never raise (an error is counted, logged).
        self.t0_hook: Callable[[Topology, NatRuleset | None, int, bool], None] | None = None
        # Awaited once before "ready", after T0 was told: the snapshot file's first write (its
        # whole encoding, 0.2 s at 10k routes) is done there, not beside a reaction's deletes.
        self.before_ready: Callable[[], Awaitable[None]] | None = None
        self._t0_told: tuple[Topology | None, NatRuleset | None] = (None, None)
        self._sweep_told = False  # the startup sweep was pending when T0 was last told
        # Set when a reaction ends (``_settle_when_quiet`` waits for quiet after it).
        self._reacted = trio.Event()
        self._quiet_since = 0.0
        self._settled_at: float | None = None
        self.settles = 0

    @property
    def judged_all(self) -> bool:
        """Some policy's eligible entries were all judged against T0 (see ``_complete``)."""
        return bool(self._complete)

    @judged_all.setter
    def judged_all(self, value: bool) -> None:
        """True: as after a complete judgement of T0 under every policy in force (tests)."""
        self._complete = frozenset(p.eligibility for p in self.policy().policies) if value else frozenset()

    @property
    def work_done(self) -> int:
        """Steps of work done in the backend's worker threads (a count the watchdog sees move)."""
        steps = getattr(self.backend, "work_done", 0)
        return steps if isinstance(steps, int) else 0

    # -- sources -------------------------------------------------------------

    def push(self, trigger: Trigger) -> None:
        """Add a trigger to the current burst (callable from any task in this trio run)."""
        self._burst.add(trigger, trio.current_time())
        if trigger.kind == "ruleset":
            self._ruleset_changes += 1
        self._arrived.set()

    async def _source(
        self, source: EventSource, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        started = False
        while True:
            try:
                async with source.events() as events:
                    if not started:
                        started = True
                        task_status.started()
                    async for trigger in events:
                        if trigger.overrun:
                            log.warning("event overrun (%s): events were lost; resyncing by full dump",
                                        trigger.description)
                        self.push(trigger)
                log.warning("%s event source ended; restarting it", source.name)
            except (TopowatchError, OSError) as exc:
                if not started:
                    raise  # cannot subscribe at all: the daemon must not pretend to run
                self.errors["source"] = self.errors.get("source", 0) + 1
                log.error("%s event source failed: %s; restarting in %.1f s",
                          source.name, exc, self.config.restart_backoff)
            self.source_restarts += 1
            # A restart may have missed events: treat it as an overrun.
            self.push(Trigger(source.name, f"{source.name} event source restarted", overrun=True))
            await trio.sleep(self.config.restart_backoff)

    # -- the loop --------------------------------------------------------------

    async def _collect(self) -> Burst:
        await self._arrived.wait()
        # The startup sweep alone waits for no quiet gap: nothing is coming to coalesce with it
        # (events of the warm-up are in its burst already; a later one gets its own reaction).
        while self._burst.kinds != {"startup"}:
            self._arrived = trio.Event()
            policy = self.policy()
            debounce = self.config.debounce if self.config.debounce is not None else policy.debounce
            max_wait = self.config.max_wait if self.config.max_wait is not None else policy.max_wait
            deadline = self._burst.first + max(max_wait, debounce)
            with trio.move_on_at(min(trio.current_time() + debounce, deadline)):
                await self._arrived.wait()
            if not self._arrived.is_set() or trio.current_time() >= deadline:
                break
        burst, self._burst = self._burst, Burst()
        self._arrived = trio.Event()
        return burst

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for source in self.backend.sources():
                await nursery.start(self._source, source)
            self.t0 = await self.backend.topology()
            try:
                self.ruleset = self.ruleset_t0 = await self.backend.ruleset()
            except TopowatchError as exc:
                # Stay up: each reaction retries the read, and none deletes anything until one succeeds.
                self._count("ruleset")
                log.error("ruleset unreadable at startup: %s; nothing is deleted until a ruleset has been "
                          "read (each reaction tries again)", exc)
            log.info(
                "ready: %d links, %d addresses, %d routes, %d rules%s; listening for events",
                len(self.t0.links), len(self.t0.addresses), len(self.t0.routes), len(self.t0.rules),
                "" if self.ruleset is not None else ", no ruleset yet",
            )
            if self.config.startup_sweep:
                await self._warm()
            self._tell_t0(0)
            if self.before_ready is not None:
                await self.before_ready()
            if self.config.settle is not None:
                self._settle("before ready")
                nursery.start_soon(self._settle_when_quiet)
            task_status.started()
            if self.config.startup_sweep:
                self._sweep_pending = self._sweep_told = True
                self.push(Trigger("startup", "startup sweep"))
            failures = 0
            while True:
                burst = await self._collect()
                self.busy_since = trio.current_time()
                try:
                    async with self.lock:
                        await self.react(burst)
                        await self._prepare()
                    failures = 0
                except (TopowatchError, OSError) as exc:
                    self._count("reaction")
                    failures += 1
                    retry = min(self.config.restart_backoff * 2 ** min(failures - 1, 16), RETRY_MAX)
                    log.error("reaction failed: %s; trying again in %.1f s", exc, retry)
                    why = str(exc)
                else:
                    continue
                finally:
                    self.busy_since = None
                    self._quiet_since = trio.current_time()
                    self._reacted.set()
                # Events meanwhile join the retry's burst; T0 is still the last snapshot judged.
                await trio.sleep(retry)
                self.push(Trigger("retry", f"retry after a failed reaction ({why})", overrun=True))

    def _settle(self, when: str) -> None:
        assert self.config.settle is not None
        done = self.config.settle()
        self._settled_at = trio.current_time()
        self.settles += 1
        log.debug("heap settled %s in %.0f ms: %d objects frozen, %d collected", when, done.seconds * 1000,
                  done.frozen, done.collected)

    async def _settle_when_quiet(self) -> None:
        """Settle the heap once no reaction ran for ``SETTLE_QUIET`` seconds and the last settle is
        ``SETTLE_INTERVAL`` old; woken by reactions only (an idle daemon never wakes for it)."""
        while True:
            await self._reacted.wait()
            while True:
                self._reacted = trio.Event()
                last = self._settled_at if self._settled_at is not None else -SETTLE_INTERVAL
                with trio.move_on_at(max(self._quiet_since + SETTLE_QUIET, last + SETTLE_INTERVAL)):
                    await self._reacted.wait()
                if self._reacted.is_set():
                    continue  # another reaction: quiet from its end
                if self.busy_since is None and not self._burst.count:
                    break
                await self._reacted.wait()  # a burst is gathering: wait for its reaction
            self._settle("while quiet")

    async def _warm(self) -> None:
        """Before "ready": what the startup sweep reads first, made while nothing waits on it: T0's
        FIB and the flow classes of T0 under the ruleset and the policies a startup trigger selects.
        The sweep's snapshot descends from T0 (``LiveTopology``), so it carries both over at the cost
        of what changed meanwhile (nothing, or a few routes) instead of building them (about 0.5 s
        at 10k routes); a sweep whose inputs differ (the ruleset or a policy changed) builds its own."""
        t0, ruleset = self.t0, self.ruleset
        if t0 is None or ruleset is None:
            return
        mark = trio.current_time()
        eligibility = self.policy().select({("startup", None)}).eligibility
        sport_matters = await self._sport_matters(ruleset, t0)  # as the sweep will ask it

        def build() -> Classifier:
            self._fib(t0)
            index_rules(ruleset)  # the chains' rule indexes, which the sweep's predictions read
            # The DNAT targets the first reaction after the sweep reads: prepared after the sweep,
            # a walk of every rule (80 ms at 2,000 rules) delayed an event that came meanwhile.
            prepare(ruleset)
            classifier = Classifier.build([t0], [ruleset], eligibility, sport_matters=sport_matters)
            if classifier.exact:
                classifier.packed()  # the compiled scan's tables (kept by the classifier)
            return classifier

        # A worker thread: the event sources, started already, keep reading meanwhile.
        classifier = await trio.to_thread.run_sync(build)
        self.progress_at = trio.current_time()
        classes = classifier.reason if not classifier.exact else f"{classifier.class_count} classes"
        log.debug("startup sweep prepared in %.0f ms: %s", (trio.current_time() - mark) * 1000, classes)

    def _count(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def count_error(self, kind: str) -> None:
        """Count an error of an observer's own (the snapshot file): metrics show ``errors`` by kind."""
        self._count(kind)

    def _ruleset_may_have_changed(self, burst: Burst) -> bool:
        """False only when the backend reports ruleset changes as triggers and none came."""
        if self.ruleset is None or burst.overrun or not getattr(self.backend, "ruleset_events", False):
            return True
        return not burst.kinds or not burst.kinds <= TOPOLOGY_KINDS

    async def _sport_matters(self, ruleset: NatRuleset, topology: Topology) -> bool:
        """Whether a flow's source port can change its prediction (the ruleset or an xfrm selector)."""
        return await self._mentions_sport(ruleset) or mentions_sport(topology.xfrm_policies)

    async def _mentions_sport(self, ruleset: NatRuleset) -> bool:
        if self._sport_memo is None or self._sport_memo[0] is not ruleset:
            if not _large(ruleset):
                found = mentions_sport(ruleset)
            else:  # seconds for 50k rules: in a worker thread, so the loop (and the watchdog) goes on
                found = await trio.to_thread.run_sync(mentions_sport, ruleset)
                self.progress_at = trio.current_time()
            self._sport_memo = (ruleset, found)
        return self._sport_memo[1]

    def _fib(self, topology: Topology, previous: Fib | None = None) -> Fib:
        """The FIB of a snapshot, kept for the last two: T0's was T1's in the last reaction (its
        caches are bounded, and a snapshot never changes)."""
        for seen, fib in self._fibs:
            if seen is topology:
                return fib
        # Carried over from ``previous`` (T0's) where only routes changed (a route event on a
        # large table: the changes, not the table; ``Fib(previous=)``).
        fib = Fib(topology, previous=previous)
        self._fibs = [(topology, fib), *self._fibs[:1]]
        return fib

    async def _prepare(self) -> None:
        """Between reactions: what the next one reads from the ruleset, computed ahead in a worker
        thread (the DNAT targets ``core.impact`` checks a moved prefix against: a walk of every rule)."""
        ruleset = self.ruleset
        if ruleset is None or prepared(ruleset):
            return
        if not _large(ruleset):
            prepare(ruleset)
        else:  # a walk of every rule: in a worker thread, so the loop (and the watchdog) goes on
            await trio.to_thread.run_sync(prepare, ruleset)
            self.progress_at = trio.current_time()

    async def react(self, burst: Burst) -> Reaction:
        timings: dict[str, float] = _PhaseTimings(self)
        clock = trio.current_time
        start = clock()
        t1 = await self.backend.topology()
        timings["snapshot"] = clock() - start
        mark = clock()
        unread: TopowatchError | None = None
        changes = self._ruleset_changes  # those after this read are not in the ruleset decided with
        if self._ruleset_may_have_changed(burst):
            try:
                self.ruleset = await self.backend.ruleset()
            except TopowatchError as exc:
                self._count("ruleset")
                unread = exc
                if self.ruleset is not None:
                    log.error("ruleset unreadable, keeping the previous one: %s", exc)
            timings["ruleset"] = clock() - mark
        policy = self.policy()
        selection = policy.select(burst.events or {("request", None)})
        if self.ruleset is None:
            why = f"no ruleset has been read yet ({unread})" if unread else "no ruleset has been read yet"
            undecided = self._undecided(burst, t1, selection, why, start=start, timings=timings)
            return self._record(undecided, selection)
        ruleset = self.ruleset
        if not selection.policies:
            log.debug("no policy is triggered by %s", sorted(burst.events, key=str))
        eligibility = selection.eligibility
        predictor = self.predictor

        def bound(fib: Fib, flow: Flow) -> Prediction:
            return predictor(ruleset, fib, flow)

        # A full judgement, or only the flows this change can re-NAT (``core.impact``).
        why_full = self._why_full(burst, ruleset, policy, selection)
        scope: Impact | None = None
        if why_full is None and self.t0 is not None:
            mark = clock()
            scope = impact(self.t0, t1, ruleset)
            timings["impact"] = clock() - mark
        else:
            log.debug("full judgement: %s", why_full)
        complete_before, self._complete = self._complete, frozenset()  # until this reaction is done
        if scope is not None and scope.none:
            return self._record(self._unchanged(burst, t1, selection, scope, start=start, timings=timings,
                                                ruleset=ruleset, policy=policy, complete=complete_before),
                                selection)  # fmt: skip

        mark = clock()
        # The sweep judges with no previous snapshot (its entries predate every one); T0's FIB is
        # still where T1's is carried over from.
        fib_t0 = self._fib(self.t0) if self.t0 is not None else None
        fib_before = fib_t0 if not self._sweep_pending else None
        fib_now = self._fib(t1, fib_t0)
        sport_matters = await self._sport_matters(ruleset, t1)
        timings["fib"] = clock() - mark
        previous = self.ruleset_t0 if self.ruleset_t0 is not None and fib_before is not None else ruleset
        if previous is not ruleset and previous == ruleset:
            previous = ruleset  # read again, unchanged
        predict_before: Callable[[Fib, Flow], Prediction] | None = None
        if previous is not ruleset:
            sport_matters = sport_matters or await self._mentions_sport(previous)

            def predict_before(fib: Fib, flow: Flow) -> Prediction:
                return predictor(previous, fib, flow)

        mark = clock()
        rulesets = [ruleset] if previous is ruleset else [previous, ruleset]
        snapshots = [t1] if fib_before is None or self.t0 is None else [self.t0, t1]
        classifier = Classifier.build(snapshots, rulesets, eligibility, sport_matters=sport_matters)
        timings["classes"] = clock() - mark
        if not classifier.exact:
            log.debug("flows are predicted one by one: %s", classifier.reason)

        only = classifier.classes_to_judge(scope)  # None: every class
        if only is not None and scope is not None:
            log.debug("judging only %s (%d address classes)", scope.describe(), len(only))

        def decider(build: EntryBuilder | None = None) -> Decider:
            return Decider(predict=bound, fib_now=fib_now, fib_before=fib_before, eligibility=eligibility,
                           sport_matters=sport_matters, build=build, classifier=classifier, only=only,
                           predict_before=predict_before)

        mark = clock()
        cap = min(selection.max_deletions, self.config.max_deletions)
        flushes = all(p.action is Action.FLUSH for p in selection.policies)
        early: EarlyDeletes | None = None
        if selection.policies:
            self.dumps += 1
            if flushes and not self.config.dry_run and self.before_delete is None:
                # Deletes may overlap the dump where the cap cannot be reached (the backend checks
                # the table's size) and until a ruleset change arrives (``sources.EarlyDeletes``).
                early = EarlyDeletes(still_stale(selection), cap, go=lambda: self._ruleset_changes == changes)
            # Dump and decide in one pass in the backend: only stale/undecided entries are kept.
            judged = await self.backend.judge(eligibility, decider, early=early)
            plan = judged.plan()
            timings["dump+decide"] = clock() - mark
            # Inside "dump+decide", as the backend timed them: waiting for the kernel, judging.
            timings.update({name: seconds for name, seconds in judged.timings.items() if seconds})
        else:
            plan = decider().plan()  # no policy is triggered: nothing to dump
        dumped = clock()
        early_counts = early.counts if early is not None else None
        if early is not None and early.why_not:
            log.debug("deletes did not overlap the dump: %s", early.why_not)
        taken = early.taken if early is not None and early_counts is not None else 0
        to_delete: Sequence[Entry]
        if flushes:
            # Every stale entry was admitted by some active policy, and each flushes. Records of a
            # compiled scan stay records up to the delete (their Decisions are built for the logs).
            to_delete = plan.stale.entries() if isinstance(plan.stale, StaleDecisions) else [
                d.entry for d in plan.stale]
        else:
            to_delete = [d.entry for d in plan.stale if selection.flushes(d.entry)]
        refused = len(to_delete) > cap
        if refused and early_counts is not None and early_counts.deleted:
            # Cannot happen (the cap was at least the table's size); said loudly if it ever does.
            log.error("the deletion cap %d was reached after %d deletes overlapping the dump", cap,
                      early_counts.deleted)
        if taken:
            assert isinstance(to_delete, StaleEntries)
            to_delete = to_delete.skipping(taken)  # the early deletes handled the first records
        deleted = early_counts if early_counts is not None else DeleteCounts()
        if to_delete and not refused and not self.config.dry_run and (
                self._ruleset_changes != changes or not await self._ruleset_unchanged()):
            swapped = await self._ruleset_swapped(ruleset)
            if swapped is not None:
                # The entries its early deletes handled are listed (each logged as any deleted one).
                assert not taken or isinstance(plan.stale, StaleDecisions)
                handled = plan.stale.first(taken) if isinstance(plan.stale, StaleDecisions) and taken else ()
                undecided = self._undecided(burst, t1, selection, swapped, start=start, timings=timings,
                                            deleted=deleted, stale=handled)
                return self._record(undecided, selection)
        if to_delete and not refused and not self.config.dry_run:
            if self.before_delete is not None:
                await self.before_delete(to_delete)
            mark = clock()
            deleted = _sum_counts(deleted, await self.backend.delete(to_delete, still_stale(selection)))
            timings["delete"] = clock() - mark
            timings["window"] = clock() - dumped
        if early_counts is not None and early_counts.deleted:
            timings["overlapped deletes"] = early_counts.elapsed  # inside "dump+decide": their own time
        change = diff(self.t0, t1) if self.t0 is not None else TopologyChange(("initial snapshot",))
        self.t0, self.ruleset_t0 = t1, ruleset
        self._sweep_pending = False
        if (selection.policies and flushes and not refused and not self.config.dry_run
                and deleted.failed == 0 and taken + len(to_delete) == len(plan.stale)):
            # Judged whole: this reaction's eligibilities. Only the change's flows: those of them
            # whose other entries were already judged against the previous T0.
            admitted = frozenset(p.eligibility for p in selection.policies)
            self._complete = admitted if only is None else admitted & complete_before
        self._judged_under = (ruleset, policy)
        if scope is not None and not scope.everything:
            plan = dataclasses.replace(plan, notes=(*plan.notes, f"judged only {scope.describe()}"))
        reaction = Reaction(
            number=self.totals.reactions + 1,
            trigger=", ".join(burst.lines) or "request",
            events=burst.count,
            change=change,
            plan=plan,
            deleted=deleted,
            refused=refused,
            dry_run=self.config.dry_run,
            latency=clock() - (burst.first if burst.count else start),
            timings=timings,
            policies=selection.names(),
            logged_only=len(plan.stale) - taken - len(to_delete),  # the early deletes took `taken`
        )
        return self._record(reaction, selection)

    async def _ruleset_unchanged(self) -> bool:
        check = getattr(self.backend, "ruleset_unchanged", None)  # optional, see ``Backend``
        return check is None or bool(await check())

    async def _ruleset_swapped(self, decided_with: NatRuleset) -> str | None:
        """After a ruleset change during the reaction: why its decisions must not be carried out, or None."""
        try:
            now = await self.backend.ruleset()
        except TopowatchError as exc:
            self._count("ruleset")
            return f"the ruleset changed during the reaction and cannot be read again ({exc})"
        if now == decided_with:
            return None  # a change outside the NAT chains (a filter table, a set no NAT rule uses)
        self.ruleset = now
        return "the ruleset changed during the reaction; the next reaction decides on the new one"

    def _why_full(
        self, burst: Burst, ruleset: NatRuleset, policy: EffectivePolicy, selection: Selection
    ) -> str | None:
        """Why this reaction must judge every eligible entry, or None when the change alone may do."""
        if not self._complete:
            return "the previous judgement was not complete (start, refused, failed, dry run or log only)"
        unjudged = sorted(p.name for p in selection.policies if p.eligibility not in self._complete)
        if unjudged:
            return f"policy {', '.join(unjudged)} admits entries not judged against the previous state"
        if burst.overrun:
            return "events were lost"
        if not burst.kinds or not burst.kinds <= TOPOLOGY_KINDS:
            return f"trigger {', '.join(sorted(burst.kinds)) or 'request'}"
        under_ruleset, under_policy = self._judged_under
        if ruleset is not under_ruleset and ruleset != under_ruleset:
            return "the ruleset changed"
        if policy is not under_policy:
            return "the policy was reloaded"
        return None

    def _unchanged(
        self, burst: Burst, t1: Topology, selection: Selection, scope: Impact, *, start: float,
        timings: dict[str, float], ruleset: NatRuleset, policy: EffectivePolicy,
        complete: frozenset[Eligibility],
    ) -> Reaction:
        """A reaction whose change can re-NAT no flow: nothing to dump, nothing to delete (what was
        judged whole under T0 still is)."""
        note = f"no dump: the change can re-NAT {scope.describe()}"
        reaction = self._without_dump(burst, t1, selection, note, start=start, timings=timings, dumped=False)
        self.t0, self.ruleset_t0 = t1, ruleset
        self._complete = complete
        self._judged_under = (ruleset, policy)
        return reaction

    def _undecided(
        self, burst: Burst, t1: Topology, selection: Selection, why: str, *, start: float,
        timings: dict[str, float], deleted: DeleteCounts | None = None, stale: Sequence[Decision] = (),
    ) -> Reaction:
        """A reaction that decides nothing more (``why``); T0 stays, so these changes are judged
        later. ``deleted``: what deletes overlapping its dump did before it stopped, ``stale`` the
        entries they handled."""
        return self._without_dump(burst, t1, selection, why, start=start, timings=timings, skipped=why,
                                  deleted=deleted, stale=stale)

    def _without_dump(
        self, burst: Burst, t1: Topology, selection: Selection, note: str, *, start: float,
        timings: dict[str, float], dumped: bool = True, skipped: str | None = None,
        deleted: DeleteCounts | None = None, stale: Sequence[Decision] = (),
    ) -> Reaction:
        """A reaction that examined no entry: the change it saw, and ``note`` saying why."""
        change = diff(self.t0, t1) if self.t0 is not None else TopologyChange(("initial snapshot",))
        return Reaction(
            number=self.totals.reactions + 1,
            trigger=", ".join(burst.lines) or "request",
            events=burst.count,
            change=change,
            plan=FlushPlan(examined=0, eligible=0, stale=stale, notes=(note,)),
            deleted=deleted if deleted is not None else DeleteCounts(),
            refused=False,
            dry_run=self.config.dry_run,
            latency=trio.current_time() - (burst.first if burst.count else start),
            timings=timings,
            policies=selection.names(),
            skipped=skipped,
            dumped=dumped,
        )

    def _tell_t0(self, number: int) -> None:
        """Tell ``t0_hook`` of a T0 that is not the one told last (by identity: a reaction sets it)."""
        swept, self._sweep_told = self._sweep_told and not self._sweep_pending, self._sweep_pending
        if self.t0_hook is None or self.t0 is None:
            return
        if self._t0_told[0] is self.t0 and self._t0_told[1] is self.ruleset_t0:
            return
        self._t0_told = (self.t0, self.ruleset_t0)
        try:
            # The startup sweep judged with no previous snapshot; a reaction's T0 at start had none.
            self.t0_hook(self.t0, self.ruleset_t0, number, number > 0 and not swept)
        except Exception:  # the snapshot file must never end the daemon nor hold a reaction up
            self._count("snapshot")
            log.exception("telling the new T0 failed")

    def _record(self, reaction: Reaction, selection: Selection) -> Reaction:
        self._tell_t0(reaction.number)
        if self.reactions:
            self.reactions[-1] = self.reactions[-1].brief()  # only the latest keeps its entry lists
        self.reactions.append(reaction)
        del self.reactions[:-HISTORY]
        self.totals.add(reaction)
        self._log(reaction, selection)
        if self.on_reaction is not None:
            self.on_reaction(reaction)
        for hook in self.reaction_hooks:
            try:
                hook(reaction)
            except Exception:  # an observer (metrics, D-Bus, sd_notify) must never end the daemon
                self._count("hook")
                log.exception("reaction observer %r failed", hook)
        return reaction

    def _log(self, reaction: Reaction, selection: Selection) -> None:
        """The reaction's line, one line per group of stale entries, then a record per entry.

        The reaction's line comes first and builds only a few decisions (its
        counts are read from the records a compiled scan kept): it is written
        as soon as the deletes are done, whatever their number. The group
        lines and the per-entry records follow it on ``topowatch.entries``
        (every one in JSON, in text with -v).
        """
        verb = "would delete" if reaction.dry_run or reaction.refused else "deleted"
        for error in reaction.deleted.errors:
            log.error("delete failed: %s", error)
        level = logging.ERROR if reaction.skipped else logging.WARNING if reaction.refused else logging.INFO
        log.log(level, "%s", reaction.summary(), extra={"fields": reaction.fields()})
        if self.config.background_details and (reaction.plan.stale or reaction.plan.undecided):
            self.details.submit(lambda: self._log_details(reaction, selection, verb),
                                f"reaction {reaction.number}")
        else:
            self._log_details(reaction, selection, verb)

    @staticmethod
    def _log_details(reaction: Reaction, selection: Selection, verb: str) -> None:
        """A reaction's group lines and per-entry records (see ``_log``)."""
        flushed = [d for d in reaction.plan.stale if selection.flushes(d.entry)]
        logged = [d for d in reaction.plan.stale if not selection.flushes(d.entry)]
        for what, decisions in ((verb, flushed), ("stale (policy says log only)", logged)):
            for code, group in group_by_code(decisions):
                log.info("reaction %d: %s", reaction.number, group_line(what, code, group))
        if entry_log.isEnabledFor(logging.INFO):
            actions = ((verb, flushed), ("log only", logged))
            for what, decisions in actions:
                for decision in decisions:
                    fields = {"event": "entry", "reaction": reaction.number, "action": what,
                              **decision_json(decision)}
                    entry_log.info("reaction %d: %s %s: %s", reaction.number, what,
                                   decision.entry.describe(), decision.reason, extra={"fields": fields})
        if entry_log.isEnabledFor(logging.DEBUG):
            for decision in reaction.plan.undecided:
                fields = {"event": "entry", "reaction": reaction.number, "action": "undecided",
                          **decision_json(decision)}
                entry_log.debug("reaction %d: undecided %s: %s", reaction.number, decision.entry.describe(),
                                decision.reason, extra={"fields": fields})
