"""Incremental reactions: no dump when no flow can be re-NATed, only the changed prefixes otherwise,
and a full judgement wherever entries may not have been judged under the previous state.

A fake backend with a real ruleset (masquerade out of up2) and the real evaluator, on trio's
virtual clock. The backend counts its dumps; the expectations are written out by hand.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from ipaddress import IPv4Address, ip_address, ip_network
from typing import Any

import pytest
import trio
import trio.testing

from topowatch.core.classify import Classifier
from topowatch.core.conntrack import (
    IPS_CONFIRMED,
    IPS_DST_NAT_DONE,
    IPS_SEEN_REPLY,
    IPS_SRC_NAT_DONE,
    CtTuple,
    Entry,
    Reread,
)
from topowatch.core.decide import Decider
from topowatch.core.eligibility import Eligibility
from topowatch.core.evaluate import predict
from topowatch.core.fib import Fib
from topowatch.core.flow import Flow, Prediction, Unknown
from topowatch.core.impact import impact, prepared
from topowatch.core.livetopology import NLM_F_REPLACE, LiveTopology
from topowatch.core.model import AF_INET, Address, Link, PolicyRule, Route, Topology
from topowatch.core.nat import NatRuleset
from topowatch.edges.nft import parse_ruleset_json
from topowatch.policy import Action, EffectivePolicy, Policy, Selection
from topowatch.reactor import Burst, DeleteCounts, Reactor, ReactorConfig, StillStale, Trigger

from uplinks_gateway import (  # isort: skip
    ADDRESSES, BASE_ROUTES, BEFORE, LAN, LINKS, MOVED, MOVING, RULESET, RULESET_DOC, UNUSED, UP1, UP2, VIA1, VIA2,
)


def entry(dst: str, sport: int, translated: str | None = None) -> Entry:
    """An UNREPLIED udp flow from the LAN; ``translated`` is the source it was NATed to (None: none)."""
    src, d = IPv4Address("10.0.1.2"), IPv4Address(dst)
    reply_dst = IPv4Address(translated) if translated else src
    return Entry(AF_INET, 17, CtTuple(src, d, sport, 53), CtTuple(d, reply_dst, 53, sport),
                 status=IPS_CONFIRMED | IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE, id=sport)  # fmt: skip


class Backend:
    def __init__(self) -> None:
        self.topo = BEFORE
        self.ruleset_value: NatRuleset = RULESET
        # Null bindings to the moving net (stale once it moves to up2), one to elsewhere.
        self.table = [entry("192.0.2.7", 1000), entry("192.0.2.8", 1001), entry("8.8.8.8", 1002)]
        self.dumps = 0
        self.deleted: list[Entry] = []
        self.fail_delete = False
        self.send, self.recv = trio.open_memory_channel[Trigger](100)

    name = "fake"
    ruleset_events = True

    def sources(self) -> list[Backend]:
        return [self]

    @contextlib.asynccontextmanager
    async def events(self) -> AsyncIterator[AsyncIterator[Trigger]]:
        yield self.recv

    async def topology(self) -> Topology:
        await trio.sleep(0.001)
        return self.topo

    async def ruleset(self) -> NatRuleset:
        return self.ruleset_value

    async def entries(self, eligibility: Eligibility) -> list[Entry]:
        self.dumps += 1
        return [e for e in self.table if eligibility.admits(e)]

    async def judge(
        self, eligibility: Eligibility, decider: Callable[[Any], Decider], early: Any = None
    ) -> Decider:
        """Every listed entry, added to one decider (``reactor.Backend.judge``)."""
        judging = decider(None)
        for e in await self.entries(eligibility):
            judging.add(e)
        return judging

    async def delete(self, entries: Sequence[Entry], still: StillStale) -> DeleteCounts:
        if self.fail_delete:
            return DeleteCounts(failed=len(entries))
        self.deleted.extend(entries)
        self.table = [e for e in self.table if e not in entries]
        return DeleteCounts(deleted=len(entries))


async def settle() -> None:
    await trio.sleep(1)


async def started(backend: Backend, nursery: trio.Nursery, **config: Any) -> Reactor:
    policy = config.pop("policy", None)
    reactor = Reactor(backend, ReactorConfig(debounce=0.05, max_wait=0.2, **config),
                      **({"policy": policy} if policy else {}))  # fmt: skip
    await nursery.start(reactor.run)
    await settle()  # the startup sweep: a full judgement
    return reactor


async def route_event(backend: Backend, topo: Topology, text: str = "route changed") -> None:
    backend.topo = topo
    await backend.send.send(Trigger("rtnetlink", text, kind="route"))
    await settle()


async def test_a_route_in_a_table_no_rule_reaches_needs_no_dump(autojump_clock: trio.testing.MockClock) -> None:
    backend = Backend()
    async with trio.open_nursery() as nursery:
        reactor = await started(backend, nursery)
        assert backend.dumps == 1 and reactor.judged_all
        await route_event(backend, UNUSED)
        await route_event(backend, BEFORE)
        nursery.cancel_scope.cancel()
    assert backend.dumps == 1  # the startup sweep's only
    assert [r.plan.notes for r in reactor.reactions[1:]] == [("no dump: the change can re-NAT no flow",)] * 2


async def test_a_moved_route_judges_only_its_prefix(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    backend = Backend()
    # An entry outside the moving prefix that a full judgement would call stale (it was NATed to
    # an address the ruleset never gives): a judgement of the prefix alone leaves it.
    backend.table.append(entry("8.8.4.4", 1003, translated="100.64.0.9"))
    async with trio.open_nursery() as nursery:
        reactor = await started(backend, nursery, startup_sweep=False)
        backend.judged = None
        reactor.judged_all = True  # as after a complete judgement of T0 (the sweep is off here)
        reactor._judged_under = (RULESET, reactor.policy())
        reactor.t0 = BEFORE
        with caplog.at_level(logging.DEBUG, logger="topowatch.reactor"):
            await route_event(backend, MOVED)
        nursery.cancel_scope.cancel()
    judging = [m for r in caplog.records if (m := r.getMessage()).startswith("judging only ")]
    assert len(judging) == 1 and re.fullmatch(r"judging only flows to or from 192\.0\.2\.0/24 \(\d+ address classes\)",
                                              judging[0]), judging
    assert sorted(e.orig.dst for e in backend.deleted) == [IPv4Address("192.0.2.7"), IPv4Address("192.0.2.8")]
    assert backend.dumps == 1
    assert any("judged only flows to or from 192.0.2.0/24" in n for n in reactor.reactions[-1].plan.notes)


@pytest.mark.parametrize(
    "case", ["overrun", "refused", "dry run", "log only", "failed delete", "reload", "request", "ruleset"]
)
async def test_a_full_judgement_follows_whatever_left_entries_unjudged(
    case: str, autojump_clock: trio.testing.MockClock
) -> None:
    """Each case, then a change that alone would need no dump: a dump (a full judgement) happens."""
    backend = Backend()
    policies = {"current": EffectivePolicy((Policy("all", max_deletions=100),))}
    config: dict[str, Any] = {"policy": lambda: policies["current"]}
    if case == "refused":
        config["max_deletions"] = 1
    if case == "dry run":
        config["dry_run"] = True
    if case == "log only":
        policies["current"] = EffectivePolicy((Policy("all", action=Action.LOG),))
    backend.fail_delete = case == "failed delete"
    no_change = replace(BEFORE, routes=(*BEFORE.routes, Route(ip_network("198.18.0.0/15"), table=100,
                                                                nexthops=(VIA2,))))  # fmt: skip
    async with trio.open_nursery() as nursery:
        reactor = await started(backend, nursery, **config)
        if case in ("refused", "dry run", "log only", "failed delete"):
            await route_event(backend, MOVED)  # stale entries that this reaction does not delete
            assert not reactor.judged_all
            no_change = replace(MOVED, routes=(*MOVED.routes, *no_change.routes[-1:]))
        dumps = backend.dumps
        backend.topo = no_change
        if case == "overrun":
            await backend.send.send(Trigger("rtnetlink", "ENOBUFS", overrun=True))
        elif case == "request":
            await backend.send.send(Trigger("dbus", "Trigger() called", kind="request"))
        elif case == "ruleset":
            backend.ruleset_value = parse_ruleset_json({"nftables": []})
            await backend.send.send(Trigger("nftables", "ruleset changed", kind="ruleset"))
        else:
            if case == "reload":
                policies["current"] = EffectivePolicy((Policy("all", max_deletions=100),))
            await backend.send.send(Trigger("rtnetlink", "route added", kind="route"))
        await settle()
        nursery.cancel_scope.cancel()
    assert backend.dumps > dumps, case


async def test_route_events_kept_from_events_carry_the_classifier_over(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the first reaction, a route change the kept topology followed builds no classifier:
    the last one is carried over to it (``Classifier.updated``), and judges as before."""
    live = LiveTopology.seed(replace(BEFORE, routes=(*BEFORE.routes,)))  # a table no classifier has seen
    assert live is not None
    backend = Backend()
    backend.topo = live.snapshot()
    builds: list[object] = []
    real = Classifier._build.__func__  # type: ignore[attr-defined]

    def counted(cls: type[Classifier], *args: Any, **kwargs: Any) -> Classifier:
        builds.append(args)
        return real(cls, *args, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(Classifier, "_build", classmethod(counted))
    async with trio.open_nursery() as nursery:
        reactor = await started(backend, nursery)
        assert builds  # the startup sweep built the first one
        first = len(builds)
        for via in (VIA2, VIA1, VIA2):
            assert live.apply("route", True, Route(MOVING, nexthops=(via,)), NLM_F_REPLACE)
            await route_event(backend, live.snapshot())
        nursery.cancel_scope.cancel()
    assert len(builds) == first
    assert len(reactor.reactions) == 4 and backend.dumps == 4
    assert sorted(e.orig.dst for e in backend.deleted) == [IPv4Address("192.0.2.7"), IPv4Address("192.0.2.8")]


DEFAULT_VIA2 = (*BASE_ROUTES[:3], Route(ip_network("0.0.0.0/0"), nexthops=(VIA2,)), BEFORE.routes[-1])


@pytest.mark.parametrize(
    ("now", "stale"),
    [
        # The default route moves to up2 with a change any flow may feel: an address (a DSL
        # reconnect), a link (a tunnel's device going away), a link's state (up1 down: its
        # routes carry nothing, so 192.0.2.0/24 leaves by the default route too).
        (replace(BEFORE, addresses=(*ADDRESSES, Address(LAN, ip_address("10.0.0.2"), 8)), routes=DEFAULT_VIA2),
         ["8.8.8.8"]),
        (replace(BEFORE, links=(*LINKS, Link(5, "tun0")), routes=DEFAULT_VIA2), ["8.8.8.8"]),
        (replace(BEFORE, links=(*LINKS[:2], Link(UP1, "up1", up=False), LINKS[3]), routes=DEFAULT_VIA2),
         ["192.0.2.7", "192.0.2.8", "8.8.8.8"]),
    ],
    ids=["address", "link", "link down"],
)
async def test_a_change_any_flow_may_feel_judges_every_flow(
    now: Topology, stale: list[str], autojump_clock: trio.testing.MockClock
) -> None:
    """After a complete judgement, an "any flow" impact judges every entry, not none of them:
    the flow to 8.8.8.8 (null binding, now out of up2's masquerade) is deleted."""
    backend = Backend()
    assert impact(BEFORE, now, RULESET).everything
    async with trio.open_nursery() as nursery:
        reactor = await started(backend, nursery)
        assert reactor.judged_all and backend.dumps == 1 and not backend.deleted
        await route_event(backend, now, "address added")
        nursery.cancel_scope.cancel()
    assert sorted(str(e.orig.dst) for e in backend.deleted) == stale
    last = reactor.reactions[-1]
    assert backend.dumps == 2 and last.plan.distinct_flows > 0
    assert not any("judged only" in n for n in last.plan.notes), last.plan.notes


async def test_a_policy_the_last_change_did_not_trigger_is_judged_whole(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Policy "far" (address events, flows to 8.0.0.0/8) and "all" (route events, every flow).
    A change moves 192.0.2.0/24 to the masqueraded uplink under an address event: only "far"
    reacts, and its flows are not in the prefix. The flows to 192.0.2.7 and .8 are stale now,
    judged by no policy that admits them. The next route change (another prefix) triggers
    "all": it judges every flow, not only the new prefix's, and deletes them."""
    backend = Backend()
    far = Policy("far", triggers=frozenset({"address"}),
                 eligibility=Eligibility(destinations=(ip_network("8.0.0.0/8"),)))  # fmt: skip
    everything = Policy("all", triggers=frozenset({"route"}))
    policy = EffectivePolicy((far, everything))
    elsewhere = replace(MOVED, routes=(*MOVED.routes, Route(ip_network("198.18.0.0/15"), nexthops=(VIA1,))))
    async with trio.open_nursery() as nursery:
        reactor = await started(backend, nursery, policy=lambda: policy)
        assert reactor._complete == {far.eligibility, everything.eligibility}
        backend.topo = MOVED
        await backend.send.send(Trigger("rtnetlink", "address added", kind="address"))
        await settle()
        assert not backend.deleted and reactor._complete == {far.eligibility}
        await route_event(backend, elsewhere)
        nursery.cancel_scope.cancel()
    assert sorted(str(e.orig.dst) for e in backend.deleted) == ["192.0.2.7", "192.0.2.8"]
    assert not any("judged only" in n for n in reactor.reactions[-1].plan.notes)


async def test_policies_that_admit_the_same_entries_stay_incremental(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """As rules.d's defaults: "address" and "route" admit the same entries. The address event's
    reaction judged them (the moved prefix's deleted), so the route event's judges its prefix only."""
    backend = Backend()
    policy = EffectivePolicy((Policy("address", triggers=frozenset({"address"})),
                              Policy("route", triggers=frozenset({"route"}))))  # fmt: skip
    elsewhere = replace(MOVED, routes=(*MOVED.routes, Route(ip_network("198.18.0.0/15"), nexthops=(VIA1,))))
    async with trio.open_nursery() as nursery:
        reactor = await started(backend, nursery, policy=lambda: policy)
        backend.topo = MOVED
        await backend.send.send(Trigger("rtnetlink", "address added", kind="address"))
        await settle()
        assert sorted(str(e.orig.dst) for e in backend.deleted) == ["192.0.2.7", "192.0.2.8"]
        await route_event(backend, elsewhere)
        nursery.cancel_scope.cancel()
    assert reactor.reactions[-1].plan.notes == ("judged only flows to or from 198.18.0.0/15",)


async def test_the_first_reaction_after_start_is_full(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    backend = Backend()
    async with trio.open_nursery() as nursery:
        reactor = await started(backend, nursery, startup_sweep=False)
        assert not reactor.judged_all
        with caplog.at_level(logging.DEBUG, logger="topowatch.reactor"):
            await route_event(backend, UNUSED)
        nursery.cancel_scope.cancel()
    assert backend.dumps == 1
    assert "full judgement: the previous judgement was not complete (start, refused, failed, dry run or log only)" in [
        r.getMessage() for r in caplog.records]


# -- core.impact, table-driven ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (BEFORE, "no flow"),
        (UNUSED, "no flow"),
        (MOVED, "flows to or from 192.0.2.0/24"),
        (replace(BEFORE, links=(*LINKS[:3], Link(UP2, "up2", running=False))), "no flow"),  # carrier only
        (replace(BEFORE, links=(*LINKS[:3], Link(UP2, "up2", up=False))), "any flow (links changed)"),
        (replace(BEFORE, addresses=ADDRESSES[:2]), "any flow (addresses changed)"),
        (replace(BEFORE, addresses=(*ADDRESSES, Address(LAN, ip_address("fe80::1"), 64))), "no flow"),  # no v6 NAT
        (replace(BEFORE, rules=(PolicyRule(AF_INET, 100, table=100),)), "any flow (policy rules changed)"),
    ],
)
def test_impact(now: Topology, expected: str) -> None:
    assert impact(BEFORE, now, RULESET).describe() == expected


def test_a_dnat_target_in_a_moved_prefix_is_any_flow() -> None:
    ruleset = parse_ruleset_json({"nftables": [
        {"table": {"family": "ip", "name": "nat", "handle": 1}},
        {"chain": {"family": "ip", "table": "nat", "name": "pre", "handle": 2, "type": "nat",
                   "hook": "prerouting", "prio": -100, "policy": "accept"}},
        {"rule": {"family": "ip", "table": "nat", "chain": "pre", "handle": 3, "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 5060}},
            {"dnat": {"addr": "192.0.2.50"}}]}},
    ]})  # fmt: skip
    assert impact(BEFORE, MOVED, ruleset).everything


async def test_the_startup_sweep_judges_without_a_previous_snapshot(autojump_clock: trio.testing.MockClock) -> None:
    """The entries the sweep judges were made before the daemon's first snapshot, which says nothing
    about them: no previous snapshot narrows or compares them (as ``plan``). Later reactions have one."""
    backend = Backend()
    seen: list[bool] = []
    judge = backend.judge

    async def recording(eligibility: Eligibility, decider: Callable[[Any], Decider], early: Any = None) -> Decider:
        judging = await judge(eligibility, decider, early)
        seen.append(judging.fib_before is not None)
        return judging

    backend.judge = recording  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await started(backend, nursery)
        await route_event(backend, MOVED)
        nursery.cancel_scope.cancel()
    assert seen == [False, True]


async def test_the_startup_sweep_reads_the_classes_and_fib_made_before_ready(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """T0's FIB and flow classes are built before "ready" (``Reactor._warm``); the sweep's snapshot,
    a new value with the same routes (as the kernel backend hands out), carries both over: nothing
    is built again on the sweep's clock."""
    from topowatch.core.fib import Fib

    builds = {"classes": 0, "tables": 0}
    build, tables = Classifier._build.__func__, Fib._build_tables  # type: ignore[attr-defined]

    def counted_build(cls: type[Classifier], *args: Any, **kwargs: Any) -> Classifier:
        builds["classes"] += 1
        return build(cls, *args, **kwargs)  # type: ignore[no-any-return]

    def counted_tables(self: Fib) -> None:
        builds["tables"] += 1
        tables(self)

    monkeypatch.setattr(Classifier, "_build", classmethod(counted_build))
    monkeypatch.setattr(Fib, "_build_tables", counted_tables)
    backend = Backend()
    backend.topo = replace(BEFORE, routes=(*BEFORE.routes, Route(ip_network("198.18.7.0/24"), nexthops=(VIA2,))))
    snapshot = backend.topology

    async def fresh_value() -> Topology:
        return replace(await snapshot())  # equal, not identical; its routes are the same tuple

    backend.topology = fresh_value  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        reactor = Reactor(backend, ReactorConfig(debounce=0.05, max_wait=0.2))
        await nursery.start(reactor.run)
        assert builds == {"classes": 1, "tables": 1} and reactor.totals.reactions == 0  # at ready
        # The DNAT targets the first reaction after the sweep reads (``core.impact.prepare``, a
        # walk of every rule) are read before "ready" too: not after the sweep, under its lock.
        assert reactor.ruleset is not None and prepared(reactor.ruleset)
        await settle()
        assert reactor.totals.reactions == 1  # the sweep
        nursery.cancel_scope.cancel()
    assert builds == {"classes": 1, "tables": 1}


def dump_message(e: Entry, seq: int) -> bytes:
    """A message shaped like the kernel's dump output for ``e`` (as ``tests/edges/test_ctcodec.py``)."""
    from topowatch.edges import ctcodec as c

    attrs = [(1, c.encode_tuple(c.CTA_TUPLE_ORIG, e.family, e.proto, e.orig)),
             (2, c.encode_tuple(c.CTA_TUPLE_REPLY, e.family, e.proto, e.reply)),
             (3, c.nla(c.CTA_STATUS, c.be32(e.status))), (7, c.nla(c.CTA_TIMEOUT, c.be32(600))),
             (8, c.nla(c.CTA_MARK, c.be32(e.mark))), (12, c.nla(c.CTA_ID, c.be32(e.id)))]  # fmt: skip
    return c.encode_message(c.IPCTNL_MSG_CT_NEW, c.NLM_F_MULTI, seq, e.family, attrs)


class EarlyBackend(Backend):
    """A compiled scan of the table (stale entries become records), whose "early deletes" take the
    first stale record while the dump runs, as ``KernelBackend`` with ``edges.overlap`` does."""

    def __init__(self) -> None:
        super().__init__()
        self.table += [entry("192.0.2.9", 1003), entry("192.0.2.10", 1004)]
        self.early_deleted: list[Entry] = []
        self.offered: list[Any] = []
        self.why_not = ""  # set: it declines to overlap, and says why (``EarlyDeletes.why_not``)

    async def judge(self, eligibility: Eligibility, decider: Callable[[Any], Decider], early: Any = None) -> Decider:
        from topowatch.edges import ctcodec as c

        self.dumps += 1
        self.offered.append(early)
        judging = decider(c.entry_from_raw)
        parser = c.DumpParser(seq=9, skip_replied=True, sink=judging.add_raw)
        parser.settle = judging
        parser.feed(b"".join(dump_message(e, 9) for e in self.table))
        for e in parser.entries:
            judging.add(e)
        if early is not None and self.why_not:
            early.why_not = self.why_not
            return judging
        # As the kernel's backend: ``go()`` before the early batch, ``still`` on each entry re-read.
        if early is not None and judging.records and early.go():
            first = judging._record_entry(bytes(judging.records), 0)
            assert early.still(first, Reread(first.status, first.id, first.mark, 600))
            self.early_deleted.append(first)
            self.table = [e for e in self.table if e != first]
            early.taken, early.counts = 1, DeleteCounts(deleted=1, elapsed=0.002, window_p99=0.004)
        return judging


@pytest.mark.skipif(__import__("topowatch.edges.ctcodec").edges.ctcodec._ctscan is None, reason="no compiled scan")
async def test_the_tail_deletes_what_the_early_deletes_left_and_the_counts_add_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = EarlyBackend()
    async with trio.open_nursery() as nursery:
        reactor = await started(backend, nursery, max_deletions=100)
        assert backend.offered[-1] is not None and backend.offered[-1].cap == 100  # all flush, no dry run
        await route_event(backend, MOVED)
        nursery.cancel_scope.cancel()
    moved = {IPv4Address(f"192.0.2.{n}") for n in (7, 8, 9, 10)}
    assert len(backend.early_deleted) == 1 and backend.early_deleted[0].orig.dst in moved
    # The tail got the other three, never the one deleted early.
    assert {e.orig.dst for e in backend.deleted} == moved - {backend.early_deleted[0].orig.dst}
    last = reactor.reactions[-1]
    assert last.deleted.deleted == 4 and last.deleted.window_p99 == 0.004 and reactor.judged_all
    assert last.deleted.elapsed == 0.002 and last.timings["overlapped deletes"] == 0.002  # the tail took no time
    # Every stale entry flushes: none is "logged only" (the early deletes' are not either).
    assert last.logged_only == 0 and "logged only" not in last.summary()


async def test_no_early_deletes_under_a_dry_run(autojump_clock: trio.testing.MockClock) -> None:
    backend = EarlyBackend()
    async with trio.open_nursery() as nursery:
        await started(backend, nursery, dry_run=True)
        await route_event(backend, MOVED)
        nursery.cancel_scope.cancel()
    assert backend.offered and all(o is None for o in backend.offered) and backend.early_deleted == []


class MovingRulesetBackend(EarlyBackend):
    """Early deletes take the first stale record, then a NAT ruleset commit arrives before the dump
    ends: the reaction decides nothing more (the tail must not run on the old ruleset)."""

    async def judge(self, eligibility: Eligibility, decider: Callable[[Any], Decider], early: Any = None) -> Decider:
        before = len(self.early_deleted)
        judging = await super().judge(eligibility, decider, early)
        if len(self.early_deleted) > before:
            self.ruleset_value = parse_ruleset_json({"nftables": [
                {"table": {"family": "ip", "name": "nat", "handle": 1}},
            ]})  # fmt: skip
            await self.send.send(Trigger("nftables", "ruleset changed", kind="ruleset"))
            for _ in range(5):
                await trio.sleep(0)  # the source task pushes it: the reactor counts a ruleset change
        return judging


@pytest.mark.skipif(__import__("topowatch.edges.ctcodec").edges.ctcodec._ctscan is None, reason="no compiled scan")
async def test_a_reaction_stopped_by_a_ruleset_change_says_and_lists_what_its_early_deletes_did(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Its line must not say "nothing deleted", and each entry deleted early has its record (verb
    "deleted") like any other deleted entry: the audit trail has no hole."""
    backend = MovingRulesetBackend()
    async with trio.open_nursery() as nursery:
        reactor = await started(backend, nursery, max_deletions=100)
        seen: list[Any] = []
        reactor.reaction_hooks.append(seen.append)  # whole (the history keeps the last one whole)
        await route_event(backend, MOVED)
        skipped = next(r for r in seen if r.skipped is not None)
        nursery.cancel_scope.cancel()
    assert backend.deleted == [] and len(backend.early_deleted) == 1  # the tail did not run
    assert skipped.deleted.deleted == 1 and "nothing deleted" not in skipped.summary()
    assert "1 deleted while the dump ran" in skipped.summary()
    assert [d.entry for d in skipped.plan.stale] == backend.early_deleted
    assert sum(skipped.fields()["stale_by_code"].values()) == 1  # the codes of those records alone


async def test_before_ready_runs_after_t0_is_told_and_before_ready(autojump_clock: trio.testing.MockClock) -> None:
    """The snapshot file's first (whole) write is made before "ready", with T0 told already."""
    backend = Backend()
    seen: list[tuple[str, int]] = []
    async with trio.open_nursery() as nursery:
        reactor = Reactor(backend, ReactorConfig(debounce=0.05, max_wait=0.2))
        reactor.t0_hook = lambda t, r, n, judged: seen.append(("t0", n))

        async def before_ready() -> None:
            seen.append(("before ready", reactor.totals.reactions))

        reactor.before_ready = before_ready
        await nursery.start(reactor.run)
        assert seen == [("t0", 0), ("before ready", 0)]
        nursery.cancel_scope.cancel()


# -- why a reaction judges whole (``Reactor._why_full``), case by case ------------------------------

ALL = Policy("all")
FAR = Policy("far", eligibility=Eligibility(destinations=(ip_network("8.0.0.0/8"),)))
NEAR = Policy("near", eligibility=Eligibility(destinations=(ip_network("192.0.2.0/24"),)))


def burst_of(*triggers: Trigger) -> Burst:
    burst = Burst()
    for trigger in triggers:
        burst.add(trigger, 1.0)
    return burst


ROUTE = Trigger("rtnetlink", "route added", kind="route")


def judged(complete: frozenset[Eligibility], policy: EffectivePolicy) -> Reactor:
    """A reactor whose last reaction judged ``complete`` whole under RULESET and ``policy``."""
    reactor = Reactor(Backend(), policy=lambda: policy)
    reactor._complete = complete
    reactor._judged_under = (RULESET, policy)
    return reactor


@pytest.mark.parametrize(
    ("burst", "why"),
    [
        (burst_of(ROUTE), None),
        (burst_of(*(Trigger("rtnetlink", k, kind=k) for k in ("link", "address", "route", "rule", "xfrm"))), None),
        (burst_of(ROUTE, Trigger("rtnetlink", "ENOBUFS", overrun=True, kind="route")), "events were lost"),
        (burst_of(), "trigger request"),
        (burst_of(ROUTE, Trigger("nftables", "ruleset changed", kind="ruleset")), "trigger route, ruleset"),
        (burst_of(Trigger("dbus", "Trigger() called")), "trigger dbus"),
    ],
)
def test_why_full_by_the_bursts_triggers(burst: Burst, why: str | None) -> None:
    policy = EffectivePolicy((ALL,))
    reactor = judged(frozenset({ALL.eligibility}), policy)
    assert reactor._why_full(burst, RULESET, policy, Selection((ALL,))) == why


def test_why_full_by_what_was_judged_whole_before() -> None:
    policy = EffectivePolicy((ALL, FAR, NEAR))
    burst = burst_of(ROUTE)
    assert judged(frozenset(), policy)._why_full(burst, RULESET, policy, Selection((ALL,))) == (
        "the previous judgement was not complete (start, refused, failed, dry run or log only)")
    reactor = judged(frozenset({FAR.eligibility}), policy)
    assert reactor._why_full(burst, RULESET, policy, Selection((FAR,))) is None
    # Named in order, whichever order the selection has them in.
    assert reactor._why_full(burst, RULESET, policy, Selection((NEAR, FAR, ALL))) == (
        "policy all, near admits entries not judged against the previous state")
    # A policy the reaction does not select does not matter.
    reactor = judged(frozenset({ALL.eligibility, FAR.eligibility}), policy)
    assert reactor._why_full(burst, RULESET, policy, Selection((FAR, ALL))) is None


def test_why_full_by_the_ruleset_and_the_policy_judged_under() -> None:
    policy = EffectivePolicy((ALL,))
    reactor = judged(frozenset({ALL.eligibility}), policy)
    burst, selection = burst_of(ROUTE), Selection((ALL,))
    again = parse_ruleset_json({"nftables": [
        {"table": {"family": "ip", "name": "nat", "handle": 1}},
        {"chain": {"family": "ip", "table": "nat", "name": "post", "handle": 2, "type": "nat",
                   "hook": "postrouting", "prio": 100, "policy": "accept"}},
        {"rule": {"family": "ip", "table": "nat", "chain": "post", "handle": 3, "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "up2"}}, {"masquerade": None}]}},
    ]})  # fmt: skip
    assert again == RULESET and again is not RULESET
    assert reactor._why_full(burst, again, policy, selection) is None  # read again, the same
    assert reactor._why_full(burst, NatRuleset(), policy, selection) == "the ruleset changed"
    reloaded = EffectivePolicy((ALL,))  # equal, but a reload: its policies may be other objects
    assert reloaded == policy
    assert reactor._why_full(burst, RULESET, reloaded, selection) == "the policy was reloaded"
    reactor._judged_under = (None, policy)  # never judged
    assert reactor._why_full(burst, RULESET, policy, selection) == "the ruleset changed"


async def test_a_reaction_without_a_dump_moves_t0_and_keeps_what_was_judged_whole(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """After the sweep judged every entry under BEFORE, a route no rule reaches (UNUSED) needs no
    dump: T0 becomes UNUSED with the ruleset read, and the entries stay judged whole, so its
    removal (back to BEFORE) needs none either and its change is told against UNUSED."""
    backend = Backend()
    async with trio.open_nursery() as nursery:
        reactor = await started(backend, nursery)
        policy = reactor.policy()
        whole = frozenset({policy.policies[0].eligibility})
        assert reactor._complete == whole and reactor.t0 is BEFORE
        await route_event(backend, UNUSED)
        assert reactor.t0 is UNUSED and reactor.ruleset_t0 is RULESET
        assert reactor._complete == whole
        assert reactor._judged_under[0] is RULESET and reactor._judged_under[1] is policy
        assert reactor.reactions[-1].timings["impact"] == 0.0  # measured on the virtual clock: no time passes
        await route_event(backend, BEFORE)
        nursery.cancel_scope.cancel()
    assert backend.dumps == 1 and reactor.t0 is BEFORE
    first, second = (r.change.lines for r in reactor.reactions[1:])
    assert [(r.dumped, r.fields()["dumped"]) for r in reactor.reactions] == [(True, True), (False, False), (False, False)]
    assert reactor.reactions[2].summary().startswith(
        "reaction 3 (route changed; route 198.18.0.0/15 via 203.0.113.1 dev up2 table 100 removed): "
        "no dump: the change can re-NAT no flow, nothing deleted, ")  # "route changed" is no event's wording
    assert first == ("route 198.18.0.0/15 via 203.0.113.1 dev up2 table 100 added",)
    assert second == ("route 198.18.0.0/15 via 203.0.113.1 dev up2 table 100 removed",)


# -- what a reaction deletes, refuses, logs only; and what it leaves judged whole --------------------
# After the sweep (nothing stale under BEFORE), 192.0.2.0/24 moves to up2: the flows to 192.0.2.7
# and 192.0.2.8 (null bindings) are stale, the one to 8.8.8.8 is not.

SEVEN = Policy("seven", eligibility=Eligibility(destinations=(ip_network("192.0.2.7/32"),)))
WATCH = Policy("watch", action=Action.LOG)


@pytest.mark.parametrize(
    ("policies", "config", "deleted", "refused", "logged_only", "action"),
    [
        ((ALL,), {}, ["192.0.2.7", "192.0.2.8"], False, 0, "2 deleted"),
        # The cap is the smaller of the policy's and the daemon's, whichever it is.
        ((replace(ALL, max_deletions=1),), {}, [], True, 0, "REFUSED: 2 exceed the cap, nothing deleted"),
        ((ALL,), {"max_deletions": 1}, [], True, 0, "REFUSED: 2 exceed the cap, nothing deleted"),
        ((replace(ALL, max_deletions=2),), {"max_deletions": 3}, ["192.0.2.7", "192.0.2.8"], False, 0, "2 deleted"),
        ((ALL,), {"dry_run": True}, [], False, 0, "dry run, 2 would be deleted"),
        # Only the entries a flushing policy admits are deleted; the others are logged.
        ((SEVEN, WATCH), {}, ["192.0.2.7"], False, 1, "1 deleted"),
        ((SEVEN, WATCH), {"dry_run": True}, [], False, 1, "dry run, 1 would be deleted"),
        ((WATCH,), {}, [], False, 2, "0 deleted"),
        # A log-only policy caps nothing: the flushing one's cap of 1 holds the one it flushes.
        ((replace(SEVEN, max_deletions=1), replace(WATCH, max_deletions=0)), {}, ["192.0.2.7"], False, 1, "1 deleted"),
    ],
    ids=["flush", "policy cap", "daemon cap", "caps fit", "dry run", "mixed", "mixed dry run", "log only",
         "log caps nothing"],
)
async def test_what_a_reaction_deletes_refuses_and_logs_only(  # noqa: PLR0917 - a parametrized table
    policies: tuple[Policy, ...], config: dict[str, Any], deleted: list[str], refused: bool, logged_only: int,
    action: str, autojump_clock: trio.testing.MockClock,
) -> None:
    backend = Backend()
    policy = EffectivePolicy(policies)
    async with trio.open_nursery() as nursery:
        reactor = await started(backend, nursery, policy=lambda: policy, **config)
        await route_event(backend, MOVED)
        nursery.cancel_scope.cancel()
    last = reactor.reactions[-1]
    assert sorted(str(e.orig.dst) for e in backend.deleted) == deleted
    assert (last.refused, last.logged_only, last.deleted.deleted) == (refused, logged_only, len(deleted))
    # The delete phase is timed where it ran (no time passes on the virtual clock).
    assert (last.timings.get("delete"), last.timings.get("window")) == ((0.0, 0.0) if deleted else (None, None))
    summary = last.summary()
    assert f"2 of 3 examined udp entries stale, {action} (null_binding_now_nat: " in summary, summary
    assert summary.count("logged only") == (1 if logged_only else 0)
    if logged_only:
        assert f"), {logged_only} logged only, " in summary
    # Judged whole only where every stale entry is gone: T0 is MOVED either way.
    assert reactor.judged_all is (deleted == ["192.0.2.7", "192.0.2.8"]) and reactor.t0 is MOVED


async def test_a_moved_route_holding_a_dnat_target_judges_every_flow(autojump_clock: trio.testing.MockClock) -> None:
    """``udp dport 53 dnat to 192.0.2.50``: moving 192.0.2.0/24 moves where a DNATed flow to any
    address goes, so the reaction judges every flow, not only the prefix's (``core.impact``)."""
    backend = Backend()
    backend.ruleset_value = parse_ruleset_json({"nftables": [
        *RULESET_DOC,
        {"chain": {"family": "ip", "table": "nat", "name": "pre", "handle": 4, "type": "nat",
                   "hook": "prerouting", "prio": -100, "policy": "accept"}},
        {"rule": {"family": "ip", "table": "nat", "chain": "pre", "handle": 5, "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 53}},
            {"dnat": {"addr": "192.0.2.50"}}]}},
    ]})  # fmt: skip
    async with trio.open_nursery() as nursery:
        reactor = await started(backend, nursery)
        assert reactor.judged_all
        await route_event(backend, MOVED)
        nursery.cancel_scope.cancel()
    last = reactor.reactions[-1]
    assert backend.dumps == reactor.dumps == 2 and last.dumped and "impact" in last.timings
    assert not any("judged only" in n for n in last.plan.notes), last.plan.notes


SPORT_DOC: list[dict[str, Any]] = [  # ``oifname "up2" udp sport 1000 masquerade``
    *RULESET_DOC[:2],
    {"rule": {"family": "ip", "table": "nat", "chain": "post", "handle": 3, "expr": [
        {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "up2"}},
        {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "sport"}}, "right": 1000}},
        {"masquerade": None}]}},
]  # fmt: skip


@pytest.mark.parametrize("with_the_move", [False, True], ids=["read at start", "changed with the move"])
async def test_a_ruleset_that_reads_the_source_port_judges_each_port(
    with_the_move: bool, autojump_clock: trio.testing.MockClock,
) -> None:
    """Two flows to 192.0.2.7 from ports 1000 and 1001, neither NATed; 192.0.2.0/24 moves to up2,
    where only port 1000 is masqueraded: that entry alone is stale. The same when the ruleset that
    reads the port comes with the move (the one of T0 reads none)."""
    backend = Backend()
    backend.table = [entry("192.0.2.7", 1000), entry("192.0.2.7", 1001)]
    sport = parse_ruleset_json({"nftables": SPORT_DOC})
    if not with_the_move:
        backend.ruleset_value = sport
    async with trio.open_nursery() as nursery:
        reactor = await started(backend, nursery)
        backend.ruleset_value = sport
        backend.topo = MOVED
        await backend.send.send(Trigger("rtnetlink", "route changed", kind="route"))
        if with_the_move:
            await backend.send.send(Trigger("nftables", "ruleset changed", kind="ruleset"))
        await settle()
        nursery.cancel_scope.cancel()
    assert [e.orig.sport for e in backend.deleted] == [1000]
    assert reactor.reactions[-1].trigger == ("route changed, ruleset changed" if with_the_move else "route changed")


def unpredictable_snat(ruleset: NatRuleset, fib: Fib, flow: Flow) -> Prediction:
    """The evaluator's prediction with its source NAT unknown (as behind a set it cannot read)."""
    return replace(predict(ruleset, fib, flow), snat=Unknown("a set that cannot be read"))


async def test_an_unpredictable_nat_compares_each_flows_own_egress_before_and_now(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """T0 sends 192.0.2.0/24 out of up2 (its route), T1 has no such route: everything leaves by
    the default route out of up1, so T1 alone puts 192.0.2.7 and 8.8.8.8 in one class. With the
    source NAT unpredictable, what changed is the egress: 192.0.2.7's moved (up2 -> up1), stale;
    8.8.8.8's did not (up1 both times), nothing says it went stale."""
    backend = Backend()
    backend.topo = MOVED
    backend.table = [entry("192.0.2.7", 1000, translated="203.0.113.2"), entry("8.8.8.8", 1002)]
    reactor = Reactor(backend, ReactorConfig(debounce=0.05, max_wait=0.2, startup_sweep=False),
                      predictor=unpredictable_snat)  # fmt: skip
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        await route_event(backend, replace(MOVED, routes=BASE_ROUTES))
        nursery.cancel_scope.cancel()
    (reaction,) = reactor.reactions
    assert [(str(d.entry.orig.dst), d.code) for d in reaction.plan.stale] == [
        ("192.0.2.7", "egress_changed_unknown_nat")]
    assert reaction.plan.undecided == () and [str(e.orig.dst) for e in backend.deleted] == ["192.0.2.7"]


async def test_a_policy_that_admits_replied_entries_judges_them(autojump_clock: trio.testing.MockClock) -> None:
    """Under ``unreplied_only = false`` a replied flow to the moved prefix is judged (and stale) as an
    unreplied one is: the decider asks the policy's eligibility, not the default's."""
    backend = Backend()
    replied = entry("192.0.2.7", 1000)
    backend.table = [Entry(replied.family, replied.proto, replied.orig, replied.reply,
                           replied.status | IPS_SEEN_REPLY, id=replied.id)]  # fmt: skip
    policy = EffectivePolicy((Policy("all", eligibility=Eligibility(unreplied_only=False)),))
    async with trio.open_nursery() as nursery:
        reactor = await started(backend, nursery, policy=lambda: policy)
        await route_event(backend, MOVED)
        nursery.cancel_scope.cancel()
    last = reactor.reactions[-1]
    assert (last.plan.examined, last.plan.eligible, len(last.plan.stale)) == (1, 1, 1)
    assert [e.orig.dst for e in backend.deleted] == [IPv4Address("192.0.2.7")]


@pytest.mark.skipif(__import__("topowatch.edges.ctcodec").edges.ctcodec._ctscan is None, reason="no compiled scan")
async def test_early_deletes_beyond_the_cap_are_said_loudly_and_a_declined_overlap_quietly(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture,
) -> None:
    """A backend must not delete early where the cap could be reached; one that did anyway (here: 1
    of 4 stale, under a cap of 2) is named in an error. One that declines says why, at debug."""
    backend = EarlyBackend()
    async with trio.open_nursery() as nursery:
        reactor = await started(backend, nursery, max_deletions=2)
        with caplog.at_level(logging.DEBUG, logger="topowatch.reactor"):
            await route_event(backend, MOVED)
            backend.why_not = "the deletion cap 2 is below the table's size 262144"
            backend.topo = BEFORE
            await backend.send.send(Trigger("rtnetlink", "route changed", kind="route"))
            await settle()
        nursery.cancel_scope.cancel()
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert (logging.ERROR, "the deletion cap 2 was reached after 1 deletes overlapping the dump") in messages
    assert (logging.DEBUG, "deletes did not overlap the dump: the deletion cap 2 is below the table's size 262144"
            ) in messages
    refused = reactor.reactions[1]
    assert refused.refused and refused.deleted.deleted == 1 and backend.deleted == []


async def test_t0_is_told_once_each_time_it_moves(autojump_clock: trio.testing.MockClock) -> None:
    """``t0_hook`` hears of each new T0 (by identity: topology or ruleset), with the reaction's
    number and whether it judged with a previous snapshot (the startup sweep did not)."""
    backend = Backend()
    calls = {"n": 0}
    real = backend.topology

    async def topology() -> Topology:
        calls["n"] += 1
        value = await real()
        return replace(value) if calls["n"] == 2 else value  # the sweep's snapshot: a new value

    backend.topology = topology  # type: ignore[method-assign]
    names = {id(BEFORE): "BEFORE", id(MOVED): "MOVED", id(RULESET): "RULESET"}
    seen: list[tuple[str, str, int, bool]] = []
    reactor = Reactor(backend, ReactorConfig(debounce=0.05, max_wait=0.2))
    reactor.t0_hook = lambda t, r, n, judged: seen.append((names.get(id(t), "copy"), names.get(id(r), "R2"), n, judged))
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        await settle()  # the sweep
        await route_event(backend, MOVED)
        await route_event(backend, MOVED)  # nothing moved: T0 is the same value
        backend.ruleset_value = parse_ruleset_json({"nftables": RULESET_DOC[:1]})
        await backend.send.send(Trigger("nftables", "ruleset changed", kind="ruleset"))
        await settle()
        nursery.cancel_scope.cancel()
    assert reactor.totals.reactions == 4 and reactor.errors == {}
    assert seen == [("BEFORE", "RULESET", 0, False), ("copy", "RULESET", 1, False), ("MOVED", "RULESET", 2, True),
                    ("MOVED", "R2", 4, True)]  # fmt: skip


async def test_a_burst_of_every_topology_kind_keeps_the_ruleset(autojump_clock: trio.testing.MockClock) -> None:
    """Links, addresses, routes, rules and xfrm state all at once: still no ruleset change."""
    backend = Backend()
    read: list[int] = []
    real = backend.ruleset

    async def ruleset() -> NatRuleset:
        read.append(1)
        return await real()

    backend.ruleset = ruleset  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        reactor = await started(backend, nursery)
        before = len(read)
        for kind in ("link", "address", "route", "rule", "xfrm"):
            await backend.send.send(Trigger("rtnetlink", f"{kind} changed", kind=kind))
        await settle()
        nursery.cancel_scope.cancel()
    assert len(read) == before and reactor.totals.reactions == 2
    # Ruleset triggers are counted one by one: a reaction compares the count before its deletes.
    assert reactor._ruleset_changes == 0


async def test_an_ipsec_rekey_needs_no_dump_and_a_lost_sa_judges_every_flow(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A rekey (a new SA beside the old one, then the old one gone) re-NATs no flow (``core.impact``):
    no dump. The tunnel's last SA going is "any flow": a full judgement."""
    from topowatch.core.xfrm import Mode, XfrmState

    def sa(spi: int) -> XfrmState:
        return XfrmState(AF_INET, ip_address("198.51.100.1"), ip_address("203.0.113.2"), 50, spi, reqid=1,
                         mode=Mode.TUNNEL)

    old = replace(BEFORE, xfrm_states=(sa(0x100),), xfrm_known=True)
    backend = Backend()
    backend.topo = old
    async with trio.open_nursery() as nursery:
        reactor = await started(backend, nursery)
        assert backend.dumps == 1 and reactor.judged_all
        for states in ((sa(0x100), sa(0x200)), (sa(0x200),), ()):
            backend.topo = replace(old, xfrm_states=states)
            await backend.send.send(Trigger("xfrm", "SA changed", kind="xfrm"))
            await settle()
        nursery.cancel_scope.cancel()
    notes = [r.plan.notes for r in reactor.reactions[1:]]
    assert notes[:2] == [("no dump: the change can re-NAT no flow",)] * 2, notes
    assert backend.dumps == 2 and reactor.reactions[-1].plan.examined > 0, notes
