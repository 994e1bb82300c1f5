# SPDX-License-Identifier: GPL-2.0-or-later
"""Conntrack table pressure: when to act, which entries to evict, and what to say about it.

When ``nf_conntrack_count`` reaches ``nf_conntrack_max`` the kernel drops new
flows ("table full, dropping packet"). It early-drops non-assured entries by
itself, but an assured entry it cannot evict, so a table full of idle assured
UDP flows refuses every new connection. This module is the policy half of the
garbage collector the kernel does not have; ``topowatch.pressure`` is the I/O.

Theory of operation: the agent feeds a ``Sample`` (count, max, buckets, the
kernel's cumulative per-CPU ``drop`` and ``early_drop`` counters) to a
``PressureController`` at an interval it asks for. The controller applies the
policy's watermarks with hysteresis::

    NORMAL --(fill >= high)--> HIGH     lower the timeouts of unreplied and half-open states
    HIGH   --(fill <= low)---> NORMAL   restore the exact previous timeouts

While HIGH, each tick grants an eviction budget: enough to bring the count
down to the low mark, at most ``batch`` per tick and ``rate`` per second (a
token bucket, so a flood cannot make the agent the bottleneck). An
``EvictionPicker`` then streams the dump and keeps the best candidates:

1. UNREPLIED entries (any protocol: a TCP SYN_SENT is UNREPLIED too), the
   least recently refreshed first;
2. only while new flows are being refused (the kernel's ``drop`` counter rose
   since the previous sample: the last resort), replied entries of the
   protocols the policy lists (connectionless only), least recently refreshed
   first.

"Least recently refreshed" is the age ``class timeout - remaining timeout``:
every packet resets an entry's timer to its class's timeout, so the entry
whose timer ran down the furthest saw its last packet the longest ago.

Rules (each has a test):
- never pick a protected entry (zone, mark, source or destination prefix);
- never pick a replied entry of tcp, sctp or dccp (their state is not read
  here: an ESTABLISHED connection must never be evicted), and never a
  replied entry at all while no new flow is refused;
- a candidate waits in a queue (seconds): just before it is evicted the
  kernel is asked for it again (``still_evictable``), and it goes only if it
  is still what it was picked as: UNREPLIED for that class, still idle (its
  timer not refreshed since the scan) for the replied last resort, and never
  a TCP entry that is ESTABLISHED now;
- lowering only ever lowers: a configured value above the current one is
  left alone; restoring writes back what was read before, nothing else;
- no I/O and no clock: time arrives inside the samples.
"""

from __future__ import annotations

import heapq
import ipaddress
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from topowatch.core.conntrack import IPS_ASSURED, IPS_SEEN_REPLY, TCP_CONNTRACK_ESTABLISHED, Entry, Reread
from topowatch.core.decide import RawEntry
from topowatch.core.flow import (
    IPPROTO_GRE,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPPROTO_UDPLITE,
    proto_name,
)
from topowatch.core.model import AF_INET, IPNetwork

IPPROTO_DCCP = 33
# Replied entries of these protocols are never evicted: their state (ESTABLISHED or not) is not read.
STATEFUL = frozenset({IPPROTO_TCP, IPPROTO_SCTP, IPPROTO_DCCP})

# The per-namespace timeouts a pressure policy may lower (short name: sysctl
# ``nf_conntrack_<name>_timeout``; ``tcp_syn_sent`` is ``nf_conntrack_tcp_timeout_syn_sent``).
# Only unreplied and half-open states: lowering them never shortens a healthy flow's life.
LOWERABLE = ("udp", "tcp_syn_sent", "tcp_syn_recv", "icmp", "icmpv6", "gre", "generic")
# The ones read to compute an entry's age; ``udp_stream`` and ``gre_stream`` are never written.
TIMEOUT_NAMES = (*LOWERABLE, "udp_stream", "gre_stream")

# (name, seconds) pairs: a tuple keeps the policy hashable.
DEFAULT_LOWERED: tuple[tuple[str, int], ...] = (
    ("udp", 10), ("tcp_syn_sent", 20), ("tcp_syn_recv", 10), ("icmp", 10), ("icmpv6", 10), ("generic", 60),
)


class State(StrEnum):
    NORMAL = "normal"
    HIGH = "high"


@dataclass(frozen=True, slots=True)
class Protection:
    """Entries the pressure policy must never evict: any one selector matching protects."""

    zones: frozenset[int] = frozenset()
    marks: tuple[tuple[int, int], ...] = ()  # (value, mask)
    prefixes: tuple[IPNetwork, ...] = ()  # original source or destination inside one protects

    def __post_init__(self) -> None:
        ranges: list[tuple[int, int, int]] = []
        for net in self.prefixes:
            ranges.append((net.version, int(net.network_address), int(net.broadcast_address)))
        object.__setattr__(self, "_ranges", tuple(ranges))

    _ranges: tuple[tuple[int, int, int], ...] = field(default=(), init=False, repr=False, compare=False)

    def covers_raw(self, family: int, zone: int, mark: int, src: bytes, dst: bytes) -> bool:
        if zone in self.zones:
            return True
        for value, mask in self.marks:
            if mark & mask == value:
                return True
        if self._ranges:
            version = 4 if family == AF_INET else 6
            s, d = int.from_bytes(src, "big"), int.from_bytes(dst, "big")
            for v, lo, hi in self._ranges:
                if v == version and (lo <= s <= hi or lo <= d <= hi):
                    return True
        return False

    def covers(self, entry: Entry) -> bool:
        o = entry.orig
        return self.covers_raw(entry.family, entry.zone, entry.mark, o.src.packed, o.dst.packed)


@dataclass(frozen=True, slots=True)
class PressurePolicy:
    """The ``[pressure]`` table of rules.d, resolved (see rules.d/README.md for each key)."""

    enabled: bool = False
    high: float = 0.90  # fill (count / max) that starts pressure handling
    low: float = 0.75  # fill at which it ends
    lower_timeouts: tuple[tuple[str, int], ...] = DEFAULT_LOWERED
    evict_unreplied: bool = True
    # Replied entries of these (connectionless) protocols may go, as a last resort.
    evict_replied: frozenset[int] = frozenset()
    protect: Protection = Protection()
    batch: int = 2000  # evictions per tick
    rate: int = 20000  # evictions per second (sustained)
    min_interval: float = 0.5  # sampling interval near the high mark
    max_interval: float = 30.0  # ... and in an empty table
    resize_buckets: bool = False  # raise nf_conntrack_buckets to nf_conntrack_max where allowed

    def __post_init__(self) -> None:
        if not 0 < self.low < self.high <= 1:
            raise ValueError(f"pressure watermarks need 0 < low < high <= 1, got low {self.low} "
                             f"high {self.high}")
        if self.evict_replied & STATEFUL:
            raise ValueError("replied tcp, sctp or dccp entries are never evicted")
        unknown = {name for name, _ in self.lower_timeouts} - set(LOWERABLE)
        if unknown:
            raise ValueError(f"timeouts that cannot be lowered: {', '.join(sorted(unknown))}")
        if self.batch <= 0 or self.rate <= 0:
            raise ValueError("batch and rate must be > 0")
        if not 0 < self.min_interval <= self.max_interval:
            raise ValueError("need 0 < min_interval <= max_interval")


@dataclass(frozen=True, slots=True)
class Sample:
    """One look at the table; the counters are the kernel's cumulative sums over CPUs."""

    time: float
    count: int
    max: int
    buckets: int = 0
    drop: int = 0  # new flows refused: table full and nothing could be early-dropped
    early_drop: int = 0  # non-assured entries the kernel evicted itself
    insert_failed: int = 0

    @property
    def fill(self) -> float:
        return self.count / self.max if self.max > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Step:
    """What one sample asks the agent to do."""

    state: State
    started: bool = False  # NORMAL -> HIGH on this sample
    ended: bool = False  # HIGH -> NORMAL on this sample
    budget: int = 0  # entries to evict now
    replied_allowed: bool = False  # the last resort is open: new flows are being refused
    refused: int = 0  # new flows the kernel refused since the previous sample
    early_dropped: int = 0  # entries the kernel early-dropped since the previous sample
    interval: float = 30.0  # seconds until the next sample


def sample_interval(policy: PressurePolicy, sample: Sample, previous: Sample | None) -> float:
    """When to look again: rare in an empty table, often near the high mark, sooner when it grows fast.

    Geometric between ``max_interval`` (empty) and ``min_interval`` (at the
    high mark); if the count grew since the previous sample, at most half the
    time the same growth would need to reach the high mark.
    """
    ratio = min(sample.fill / policy.high, 1.0)
    interval = policy.max_interval * (policy.min_interval / policy.max_interval) ** ratio
    if previous is not None and sample.time > previous.time and sample.count > previous.count:
        growth = (sample.count - previous.count) / (sample.time - previous.time)
        headroom = policy.high * sample.max - sample.count
        interval = min(interval, max(headroom, 0.0) / growth / 2)
    return float(min(max(interval, policy.min_interval), policy.max_interval))


class PressureController:
    """Watermarks with hysteresis and a token bucket of evictions; see the module docstring."""

    def __init__(self, policy: PressurePolicy) -> None:
        self.policy = policy
        self.state = State.NORMAL
        self.previous: Sample | None = None
        self.tokens = float(policy.batch)
        self._refill_at: float | None = None

    def observe(self, sample: Sample) -> Step:
        policy, previous = self.policy, self.previous
        refused = max(sample.drop - previous.drop, 0) if previous is not None else 0
        early = max(sample.early_drop - previous.early_drop, 0) if previous is not None else 0
        if self._refill_at is not None:
            elapsed = max(sample.time - self._refill_at, 0.0)
            self.tokens = min(float(policy.batch), self.tokens + policy.rate * elapsed)
        self._refill_at = sample.time
        started = ended = False
        if self.state is State.NORMAL and sample.fill >= policy.high:
            self.state, started = State.HIGH, True
        elif self.state is State.HIGH and sample.fill <= policy.low:
            self.state, ended = State.NORMAL, True
        budget = 0
        if self.state is State.HIGH:
            excess = sample.count - int(policy.low * sample.max)
            budget = max(min(excess, int(self.tokens)), 0)
        self.previous = sample
        return Step(
            state=self.state,
            started=started,
            ended=ended,
            budget=budget,
            replied_allowed=self.state is State.HIGH and refused > 0 and bool(policy.evict_replied),
            refused=refused,
            early_dropped=early,
            interval=sample_interval(policy, sample, previous),
        )

    def evicted(self, count: int) -> None:
        """The agent deleted ``count`` entries: they come out of the bucket."""
        self.tokens = max(self.tokens - count, 0.0)


def lowered_values(policy: PressurePolicy, current: Mapping[str, int]) -> dict[str, int]:
    """The timeouts to write when pressure starts: only those the policy sets below the current value."""
    return {name: value for name, value in policy.lower_timeouts
            if name in current and value < current[name]}  # fmt: skip


def restore_plan(
    saved: Mapping[str, int], written: Mapping[str, int], current: Mapping[str, int]
) -> tuple[dict[str, int], dict[str, int]]:
    """(to write back, changed by someone else meanwhile) when pressure ends.

    A timeout whose current value is no longer the one topowatch wrote was
    changed by someone else (an admin): it is left as they set it.
    """
    restore: dict[str, int] = {}
    foreign: dict[str, int] = {}
    for name, value in saved.items():
        now = current.get(name)
        if now is None:
            continue
        if name in written and now != written[name]:
            foreign[name] = now
        elif now != value:
            restore[name] = value
    return restore, foreign


def timeout_class(proto: int, status: int, family: int = AF_INET) -> str:
    """The timeout sysctl an entry's timer was last set from (its class)."""
    replied = bool(status & IPS_SEEN_REPLY)
    if proto in (IPPROTO_UDP, IPPROTO_UDPLITE):
        return "udp_stream" if status & IPS_ASSURED else "udp"
    if proto == IPPROTO_TCP:
        return "tcp_syn_recv" if replied else "tcp_syn_sent"
    if proto == IPPROTO_ICMP:
        return "icmp"
    if proto == IPPROTO_ICMPV6:
        return "icmpv6"
    if proto == IPPROTO_GRE:
        return "gre_stream" if status & IPS_ASSURED else "gre"
    return "generic"


# Rank classes: lower goes first.
_UNREPLIED, _REPLIED = 0, 1


@dataclass(frozen=True, slots=True)
class Candidate:
    """One entry the picker chose, with why."""

    entry: Entry
    age: int  # seconds since its last refresh (estimated from its timer)
    replied: bool

    def reason(self) -> str:
        what = "replied" if self.replied else "UNREPLIED"
        return f"{what} {proto_name(self.entry.proto)}, idle about {self.age} s"


@dataclass(slots=True)
class Census:
    """What fills the table, counted over one dump (for a log line a person can act on)."""

    examined: int = 0
    classes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (UNREPLIED|replied|assured, proto)
    sources: dict[str, Counter[bytes]] = field(default_factory=dict)  # per class label: source -> count
    protected: int = 0
    source_limit: int = 65536

    def add(self, proto: int, status: int, src: bytes) -> None:
        self.examined += 1
        state = "assured" if status & IPS_ASSURED else "replied" if status & IPS_SEEN_REPLY else "UNREPLIED"
        key = (state, proto_name(proto))
        self.classes[key] += 1
        label = f"{key[0]} {key[1]}"
        sources = self.sources.get(label)
        if sources is None:
            sources = self.sources[label] = Counter()
        if src in sources or len(sources) < self.source_limit:
            sources[src] += 1

    def describe(self, top: int = 3) -> str:
        parts = []
        for (state, proto), n in self.classes.most_common(top):
            label = f"{state} {proto}"
            sources = self.sources.get(label, Counter())
            many = len(sources) >= self.source_limit
            count = f"at least {len(sources)}" if many else str(len(sources))
            text = f"{n:,} {label} entries from {count} source{'s' if len(sources) != 1 else ''}"
            if sources and len(sources) <= 3:
                names = (str(ipaddress.ip_address(s)) for s, _ in sources.most_common(3))
                text += " (" + ", ".join(names) + ")"
            parts.append(text)
        rest = sum(self.classes.values()) - sum(n for _, n in self.classes.most_common(top))
        if rest:
            parts.append(f"{rest:,} others")
        return ", ".join(parts) or "no entries"


class EvictionPicker:
    """Consumes a dump (``add`` / ``add_raw``, as ``Conntrack.scan`` feeds) and keeps the best candidates.

    Up to ``keep`` UNREPLIED candidates (if the policy evicts them) and, with
    ``collect_replied``, up to ``keep`` replied ones of the policy's
    ``evict_replied`` protocols, each class oldest first; the caller decides
    when replied ones may go (only while new flows are refused). ``timeouts``
    are the current class timeouts (see ``timeout_class``); ``build`` turns a
    raw entry into an ``Entry`` (only kept ones are built). Memory: two heaps
    of at most ``keep`` candidates and the census.
    """

    def __init__(
        self,
        policy: PressurePolicy,
        keep: int,
        *,
        collect_replied: bool,
        timeouts: Mapping[str, int],
        build: Callable[[RawEntry], Entry] | None = None,
    ) -> None:
        self.policy = policy
        self.keep = keep
        self.collect_replied = collect_replied
        self.timeouts = dict(timeouts)
        self.build = build
        self.census = Census()
        # Min-heaps on age: the youngest kept candidate of a class is at the top.
        self._heaps: tuple[list[tuple[int, int, RawEntry | Entry]], ...] = ([], [])
        self._seq = 0

    def _rank(self, proto: int, status: int, timeout: int, family: int) -> tuple[int, int] | None:
        if status & IPS_SEEN_REPLY:
            if not self.collect_replied or proto in STATEFUL or proto not in self.policy.evict_replied:
                return None
            cls = _REPLIED
        else:
            if not self.policy.evict_unreplied:
                return None
            cls = _UNREPLIED
        full = self.timeouts.get(timeout_class(proto, status, family), 0)
        return cls, max(full - timeout, 0) if full else -timeout

    def _offer(self, rank: tuple[int, int], item: RawEntry | Entry) -> None:
        heap = self._heaps[rank[0]]
        self._seq += 1
        if len(heap) < self.keep:
            heapq.heappush(heap, (rank[1], self._seq, item))
        elif rank[1] > heap[0][0]:
            heapq.heapreplace(heap, (rank[1], self._seq, item))

    def add(self, entry: Entry) -> None:
        o = entry.orig
        src, dst = o.src.packed, o.dst.packed
        self.census.add(entry.proto, entry.status, src)
        if self.policy.protect.covers_raw(entry.family, entry.zone, entry.mark, src, dst):
            self.census.protected += 1
            return
        if self.keep <= 0:
            return
        rank = self._rank(entry.proto, entry.status, entry.timeout, entry.family)
        if rank is not None:
            self._offer(rank, entry)

    def add_raw(self, raw: RawEntry) -> None:
        family, proto, osrc, odst = raw[0], raw[1], raw[2], raw[3]
        status, zone, mark, timeout = raw[10], raw[11], raw[12], raw[14]
        self.census.add(proto, status, osrc)
        if self.policy.protect.covers_raw(family, zone, mark, osrc, odst):
            self.census.protected += 1
            return
        if self.keep <= 0:
            return
        rank = self._rank(proto, status, timeout, family)
        if rank is not None:
            self._offer(rank, raw)

    def chosen(self) -> list[Candidate]:
        """The candidates, best first: UNREPLIED oldest first, then replied oldest first."""
        out: list[Candidate] = []
        for cls, heap in enumerate(self._heaps):
            for age, _, item in sorted(heap, key=lambda k: k[0], reverse=True):
                entry = item if isinstance(item, Entry) else self._build(item)
                out.append(Candidate(entry, max(age, 0), replied=cls == _REPLIED))
        return out

    def _build(self, raw: RawEntry) -> Entry:
        if self.build is None:
            raise ValueError("EvictionPicker.add_raw needs an entry builder")
        return self.build(raw)


def still_evictable(candidate: Candidate, now: Reread, elapsed: float, timeouts: Mapping[str, int]) -> bool:
    """May ``candidate``, re-read as ``now`` ``elapsed`` seconds after its scan ended, still be evicted?

    Every packet resets an entry's timer to its class timeout; without one
    the timer only runs down, by at least ``elapsed`` since it was read
    (during the scan). So a replied candidate was refreshed since the scan
    when its timer is now above what was left then minus ``elapsed`` (one
    second of slack: the kernel reports whole seconds). Where that cannot be
    told (the class timeout is not above what was left, e.g. lowered since),
    it is kept: a wrong eviction costs a healthy flow.
    """
    entry = candidate.entry
    if entry.proto == IPPROTO_TCP and now.tcp_state == TCP_CONNTRACK_ESTABLISHED:
        return False
    if not candidate.replied:
        return not now.status & IPS_SEEN_REPLY
    full = timeouts.get(timeout_class(entry.proto, now.status, entry.family), 0)
    if full < entry.timeout + 2:
        return False
    return now.timeout <= entry.timeout - elapsed + 1


def describe_pressure(sample: Sample, census: Census | None, step: Step) -> str:
    """One line that says what is true, instead of the kernel's "table full, dropping packet"."""
    text = f"conntrack table {sample.fill:.0%} full ({sample.count:,}/{sample.max:,})"
    if census is not None:
        text += f": {census.describe()}"
        if census.protected:
            text += f"; {census.protected:,} protected by policy"
    if step.refused:
        text += f"; the kernel refused {step.refused:,} new flow(s) since the last look"
    if step.early_dropped:
        text += f"; it early-dropped {step.early_dropped:,} unreplied entries itself"
    if sample.buckets and sample.max > sample.buckets * 4:
        text += (f"; only {sample.buckets:,} hash buckets for {sample.max:,} entries: "
                 f"every lookup walks long chains (raise nf_conntrack_buckets)")
    return text


def count_by(candidates: Iterable[Candidate]) -> dict[str, int]:
    """Chosen candidates by reason class, for the eviction log line."""
    out: Counter[str] = Counter()
    for c in candidates:
        out[f"{'replied' if c.replied else 'UNREPLIED'} {proto_name(c.entry.proto)}"] += 1
    return dict(out)
