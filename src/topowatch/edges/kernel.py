# SPDX-License-Identifier: GPL-2.0-or-later
"""The reactor's backend on the real kernel: rtnetlink, ctnetlink, nftables (ruleset and events) together.

Decides nothing: it wires the edges to the ``reactor.Backend`` interface,
runs blocking work (ctnetlink, ``nft``) in worker threads so the trio loop
stays responsive, and logs how long the kernel work took. After every
topology snapshot and ruleset read (both only ever happen on events) it
asks the legacy-iptables poll to look whether a legacy nat table exists, so
that poll needs no timer of its own while there is none; after every ruleset
read it tells the ipset poll which sets the ruleset names (none: no timer).
Before deleting, the reactor may ask whether the nftables generation moved
since the last ruleset read began (``ruleset_unchanged``).
Everything happens in the network namespace the process was started in. It
never sends a conntrack request without a tuple (the ctnetlink edge refuses
to build one).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import replace

import trio

from topowatch.core.conntrack import Entry
from topowatch.core.decide import Decider, EntryBuilder, RawEntry, StaleEntries
from topowatch.core.eligibility import Eligibility
from topowatch.core.livetopology import LiveTopology
from topowatch.core.model import Address, Link, Route, Topology
from topowatch.core.nat import NatRuleset
from topowatch.edges import ctcodec
from topowatch.edges.ctcodec import entry_from_raw
from topowatch.edges.ctnetlink import Conntrack, DeleteResult, percentile
from topowatch.edges.iptables import RulesetRead, legacy_nat_exists, read_all_logged
from topowatch.edges.nft import read_ruleset
from topowatch.edges.nftevents import (
    IPSET_INTERVAL,
    LEGACY_INTERVAL,
    IpsetPoll,
    LegacyNatPoll,
    NftablesEvents,
    current_generation,
)
from topowatch.edges.overlap import Overlap, table_max
from topowatch.edges.rtnl import EventAction, EventKind, KernelRtnl, Overrun, RtnlEvent, RtnlEvents
from topowatch.edges.sysctl import read_netconf
from topowatch.edges.xfrm import XfrmSource
from topowatch.edges.xfrm import probe as probe_xfrm
from topowatch.errors import NetlinkError, PermissionDenied
from topowatch.sources import DeleteCounts, EarlyDeletes, EventSource, StillStale, Trigger

log = logging.getLogger("topowatch.kernel")

# rtnetlink event kinds as policy trigger kinds (a nexthop object change is a route change).
_KINDS = {
    EventKind.LINK: "link",
    EventKind.ADDRESS: "address",
    EventKind.ROUTE: "route",
    EventKind.RULE: "rule",
    EventKind.NEXTHOP: "route",
    EventKind.NETCONF: "link",  # an interface's rp_filter: which interface a flow may enter on
}


def _interface(event: RtnlEvent, names: Mapping[int, str]) -> str | None:
    value = event.value
    if isinstance(value, Link):
        return value.name
    if isinstance(value, Address):
        return names.get(value.ifindex)
    if isinstance(value, Route) and len(value.nexthops) == 1:
        return names.get(value.nexthops[0].oif)
    return None


class KernelBackend:
    def __init__(
        self,
        nft: str = "nft",
        legacy_interval: float = LEGACY_INTERVAL,
        ipset_interval: float = IPSET_INTERVAL,
    ) -> None:
        self.nft = nft
        # Ruleset changes are topology changes: nftables events, a poll of legacy nat tables that
        # runs only while one exists (see ``_recheck_legacy``), and a poll of the ipsets that
        # ``-m set`` rules name, only while some rule names one (see ``ruleset``).
        self.legacy = LegacyNatPoll(legacy_interval)
        self.ipsets = IpsetPoll(ipset_interval)
        self.ruleset_sources: tuple[EventSource, ...] = (NftablesEvents(), self.legacy, self.ipsets)
        self.rtnl = KernelRtnl()
        # The nftables generation the last ruleset read began at, that read, and its nft part.
        self._generation: Callable[[], int | None] = current_generation
        self._last_read: tuple[int, RulesetRead, NatRuleset] | None = None
        self.ruleset_reads = 0  # reads that ran nft (or iptables-save) again
        # Steps of blocking work done in worker threads (nft answered, JSON decoded, parsed):
        # the watchdog's evidence that a long ruleset read is moving (``sdnotify``).
        self.work_done = 0
        # The topology kept from events (core.livetopology): None until a dump seeds it, and again
        # whenever an event says the kernel changed more than it announced (then the next snapshot
        # dumps). While a dump runs, events are kept and replayed on its result.
        self.live: LiveTopology | None = None
        self._replay: list[RtnlEvent | Overrun] | None = None
        self.dumps = 0  # full topology dumps made (a reaction without one read the kept topology)
        self._ct: Conntrack | None = None
        self._ct_early: Conntrack | None = None  # the second socket of deletes overlapping a dump
        self._dumped_at = 0.0
        self._stream: RtnlEvents | None = None
        # Sources from outside the kernel (NetworkManager over D-Bus); the daemon adds them.
        self.extra_sources: list[EventSource] = []
        # IPsec policies and SAs: None when this kernel has no NETLINK_XFRM (said once, then run without).
        self.xfrm: XfrmSource | None = XfrmSource()
        missing = probe_xfrm()
        if missing is not None:
            log.warning("xfrm: cannot open NETLINK_XFRM (%s): IPsec policies are not followed", missing)
            self.xfrm = None

    # Ruleset changes come as triggers (nftables events, the legacy poll): see reactor.Backend.
    ruleset_events = True

    def _conntrack(self) -> Conntrack:
        if self._ct is None:
            try:
                self._ct = Conntrack()
            except PermissionError as exc:
                raise PermissionDenied(f"cannot open ctnetlink: {exc.strerror}") from exc
            except OSError as exc:
                raise NetlinkError(f"cannot open ctnetlink: {exc.strerror}", exc.errno or 0) from exc
        return self._ct

    def sources(self) -> Sequence[EventSource]:
        xfrm: tuple[EventSource, ...] = (self.xfrm,) if self.xfrm is not None else ()
        return (self, *xfrm, *self.ruleset_sources, *self.extra_sources)

    name = "rtnetlink"

    @contextlib.asynccontextmanager
    async def events(self) -> AsyncIterator[AsyncIterator[Trigger]]:
        async with RtnlEvents() as stream:
            self._stream = stream

            async def triggers() -> AsyncIterator[Trigger]:
                async for event in stream:
                    if isinstance(event, Overrun):
                        self.live = None
                        if self._replay is not None:
                            self._replay.append(event)
                        yield Trigger("rtnetlink", event.description, overrun=True)
                    else:
                        self._follow(event)
                        yield Trigger("rtnetlink", event.description, kind=_KINDS[event.kind],
                                      interface=_interface(event, stream.names))

            yield triggers()

    def _follow(self, event: RtnlEvent) -> None:
        """Apply an event to the kept topology (or keep it for the dump under way to replay)."""
        if self._replay is not None:
            self._replay.append(event)
        elif self.live is not None and not self._apply(self.live, event):
            log.debug("topology: %s cannot be followed by events; the next snapshot dumps", event.description)
            self.live = None

    @staticmethod
    def _apply(live: LiveTopology, event: RtnlEvent | Overrun) -> bool:
        if isinstance(event, Overrun):
            return False
        if event.kind is EventKind.NETCONF:
            return True  # rp_filter: every snapshot reads it from /proc, the kept topology has none
        return live.apply(str(event.kind), event.action == EventAction.NEW, event.value, event.flags,
                          event.nexthop_object)

    async def _links_routes_rules(self) -> Topology:
        """Links, addresses, routes and rules: kept from events where they can be, else dumped."""
        if self.live is not None and self.live.addresses_stale:
            # Links, addresses and rules only (cheap), events kept during it and replayed.
            self._replay = []
            try:
                cheap = await self.rtnl.dump(routes=False)
                replay, self._replay = self._replay, None
            finally:
                self._replay = None
            kept = self.live
            if kept is not None:
                kept.refresh(cheap)
                for event in replay:
                    if not self._apply(kept, event):
                        self.live = None
                        break
        if self.live is not None and not self.live.addresses_stale:
            return self.live.snapshot()
        self._replay = []
        try:
            topology = await self.rtnl.dump()
            self.dumps += 1
            replay, self._replay = self._replay, None
        finally:
            self._replay = None
        seeded = LiveTopology.seed(topology)
        for event in replay:
            if seeded is None or not self._apply(seeded, event):
                seeded = None
                break
        self.live = seeded
        return seeded.snapshot() if seeded is not None else topology

    async def topology(self) -> Topology:
        if self._ct is None:
            # Opened (and its status filter probed) with the first snapshot, before "ready":
            # a missing permission fails the start, and no reaction pays for the probe.
            await trio.to_thread.run_sync(self._conntrack)
        topology = await self._links_routes_rules()
        # rp_filter pins a forwarded flow's input interface (core.fib.Fib.ingresses); read each time
        # (a few small /proc files per interface), as src_valid_mark changes are not announced.
        topology = replace(topology, netconf=await trio.to_thread.run_sync(read_netconf), netconf_known=True)
        if self.xfrm is not None:
            policies, states = await self.xfrm.dump_xfrm()
            topology = replace(topology, xfrm_policies=policies, xfrm_states=states, xfrm_known=True)
        if self._stream is not None:
            # Event descriptions name interfaces as of the latest snapshot.
            self._stream.names.update(topology.names())
        log.debug("snapshot: %d links, %d addresses, %d routes, %d rules, %d xfrm policies",
                  len(topology.links), len(topology.addresses), len(topology.routes), len(topology.rules),
                  len(topology.xfrm_policies))
        self._recheck_legacy()
        return topology

    async def ruleset(self) -> NatRuleset:
        # nftables and the iptables nat tables (nft and legacy) together, in hook priority order.
        read = await trio.to_thread.run_sync(self._read_ruleset)
        self._recheck_legacy()
        self.ipsets.watch(read.set_contents())
        return read.ruleset

    def _read_ruleset(self) -> RulesetRead:
        """The ruleset, read again only where its generation says it may have changed (blocking).

        The nftables generation is asked first (one netlink round trip): when
        it is the one of the last read, ``nft -j list ruleset`` (seconds for a
        large ruleset) is not run again; when moreover no legacy nat table
        exists and no ipset is named (neither has a generation), the whole
        last read is the answer. The generation is taken before reading, so a
        commit during the read makes the next call read again.
        """
        generation = self._generation()
        last = self._last_read
        if generation is not None and last is not None and last[0] == generation:
            if not last[1].sets and not any(legacy_nat_exists(f) for f in ("ip", "ip6")):
                log.debug("ruleset: generation %d unchanged, not read again", generation)
                return last[1]
            nft_rules = last[2]
            read = read_all_logged(self.nft, read_nft=lambda _nft: nft_rules, progress=self._step)
        else:
            read_nft: dict[str, NatRuleset] = {}

            def read_and_keep(nft: str) -> NatRuleset:
                read_nft["rules"] = read_ruleset(nft, progress=self._step)
                self._step()
                return read_nft["rules"]

            read = read_all_logged(self.nft, read_nft=read_and_keep, progress=self._step)
            nft_rules = read_nft["rules"]
        self._last_read = (generation, read, nft_rules) if generation is not None else None
        self.ruleset_reads += 1
        return read

    def _step(self) -> None:
        self.work_done += 1

    async def ruleset_unchanged(self) -> bool:
        """False if nftables committed since the last ruleset read began (its generation id moved)."""
        last = self._last_read
        if last is None:
            return True
        return await trio.to_thread.run_sync(self._unmoved, last)

    def _unmoved(self, last: tuple[int, RulesetRead, NatRuleset] | None) -> bool:
        """No nftables commit since the read ``last`` began (its generation id; unknown: none)."""
        return last is None or self._generation() in (None, last[0])

    def _recheck_legacy(self) -> None:
        """Wake the legacy poll if a legacy nat table exists now (a /proc read; never instantiates one)."""
        self.legacy.recheck()

    async def entries(self, eligibility: Eligibility) -> list[Entry]:
        ct = self._conntrack()

        def dump() -> list[Entry]:
            return ct.dump(unreplied_only=eligibility.unreplied_only)

        entries = await trio.to_thread.run_sync(dump)
        self._dumped_at = time.monotonic()
        stats = ct.last_dump
        if stats is not None:
            log.debug("dump: %d entries in %.1f ms (%s)", len(entries), stats.seconds * 1000,
                      "kernel status filter" if stats.kernel_status_filter else "userspace filter")
            if stats.decode_errors:
                log.warning("dump: %d undecodable entries skipped", stats.decode_errors)
        return entries

    async def judge(
        self,
        eligibility: Eligibility,
        decider: Callable[[EntryBuilder], Decider],
        early: EarlyDeletes | None = None,
    ) -> Decider:
        """Dump and decide in one worker thread: only stale and undecided entries are ever built.
        With ``early``, stale records are deleted on a second socket while the dump goes on
        (``edges.overlap``), where the table cannot hold more entries than its cap."""
        ct = self._conntrack()

        def build(raw: RawEntry) -> Entry:
            return entry_from_raw(raw, ct.cache)

        def scan() -> Decider:
            return ct.scan(lambda: decider(build), unreplied_only=eligibility.unreplied_only)

        overlap = self._overlap(early) if early is not None else None
        if overlap is None:
            judged = await trio.to_thread.run_sync(scan)
        else:
            assert early is not None
            ct.before_burst, ct.after_burst = overlap.enter, overlap.feed
            try:
                judged = await trio.to_thread.run_sync(scan)
                # Cancelled while the scan's thread ran: stop here, before the queue is worked off.
                await trio.lowlevel.checkpoint_if_cancelled()
                early.taken, results = await trio.to_thread.run_sync(overlap.finish, judged)
            except BaseException:
                # Stopped before any checkpoint, then waited for (shielded): a cancelled reaction
                # (the scan's thread ends, the next checkpoint raises) must leave no queued record
                # to be deleted behind its back, nor a thread on the second socket.
                overlap.stopped = True
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(overlap.abandon)
                done = sum(r.deleted for r in overlap.results)
                if done:
                    log.warning("%d entries deleted while the dump ran, before the reaction failed "
                                "(each re-checked; no reaction counts them)", done)
                raise
            finally:
                ct.before_burst = ct.after_burst = None
            early.counts = _counts(results, overlap.busy)
            if overlap.stopped and overlap.error is None:
                early.why_not = "stopped: the ruleset moved during the dump"
        self._dumped_at = time.monotonic()
        stats = ct.last_dump
        if stats is not None:
            # Where the dump's time went: waiting for the kernel's walk, or reading and judging.
            judged.timings.update({"kernel wait": stats.wait_seconds, "judge": stats.judge_seconds})
            log.debug("dump+decide: %d entries in %.1f ms (%s; waited %.1f ms for the kernel, judged in "
                      "%.1f ms)", stats.entries, stats.seconds * 1000,
                      "kernel status filter" if stats.kernel_status_filter else "userspace filter",
                      stats.wait_seconds * 1000, stats.judge_seconds * 1000)
            if stats.decode_errors:
                log.warning("dump: %d undecodable entries skipped", stats.decode_errors)
        return judged

    def _overlap(self, early: EarlyDeletes) -> Overlap | None:
        """Early deletes for this dump, or None (``early.why_not`` says why)."""
        if ctcodec._ctscan is None:
            early.why_not = "no compiled scan (stale entries are not kept as records)"
            return None
        size = table_max()
        if size is None or early.cap < size:
            early.why_not = (f"the deletion cap {early.cap} is below the table's size "
                             f"{'unknown' if size is None else size}: the cap decides after the whole dump")
            return None
        if self._ct_early is None:
            try:
                # It never dumps: no probe (its walk of the whole table would be on the clock).
                self._ct_early = Conntrack(status_filter=self._conntrack().status_filter_supported)
            except OSError as exc:
                early.why_not = f"cannot open a second ctnetlink socket: {exc.strerror}"
                return None
        last = self._last_read

        def go() -> bool:
            # The ruleset as read for this reaction: no ruleset event the reactor has counted since
            # (``early.go``), and no nftables commit since its read began.
            return early.go() and self._unmoved(last)

        return Overlap(self._ct_early, early.still, go)

    async def delete(self, entries: Sequence[Entry], still: StillStale) -> DeleteCounts:
        """Re-read each batch just before deleting it (``Conntrack.delete_current``): ``reactor.Backend``."""
        ct = self._conntrack()
        start = time.monotonic()
        # Records of a compiled scan (``StaleEntries``) stay records: re-checked and deleted in C.
        batch = entries if isinstance(entries, StaleEntries) else list(entries)
        result = await trio.to_thread.run_sync(ct.delete_current, batch, still)
        end = time.monotonic()
        p99 = result.window_p99
        if self._dumped_at:
            log.info("dump-to-delete window %.1f ms, re-check-to-delete window p99 %s over %d batch(es) (%s)",
                     (end - self._dumped_at) * 1000, "-" if p99 is None else f"{p99 * 1000:.2f} ms",
                     len(result.windows), result.describe())
        if result.kept_replied:
            log.info("kept %d entries replied to since the dump (re-checked before the delete)",
                     result.kept_replied)
        return _counts([result], end - start)


def _counts(results: Sequence[DeleteResult], elapsed: float) -> DeleteCounts:
    """What ``delete_current`` calls did, as the reactor counts it (one or several: early deletes)."""
    errors: dict[int, int] = {}
    for result in results:
        for err, count in result.errors:
            errors[err] = errors.get(err, 0) + count
    unchecked = sum(r.unchecked for r in results)
    texts = tuple(f"{count} x {errno.errorcode.get(err, str(err))}" for err, count in sorted(errors.items()))
    return DeleteCounts(
        deleted=sum(r.deleted for r in results),
        already_gone=sum(r.not_found for r in results),
        failed=sum(r.failed for r in results) + unchecked,
        elapsed=elapsed,
        errors=texts + ((f"{unchecked} not re-checked (answers lost), kept",) if unchecked else ()),
        kept_replied=sum(r.kept_replied for r in results),
        kept_changed=sum(r.kept_changed for r in results),
        window_p99=percentile([w for r in results for w in r.windows], 0.99),
    )
