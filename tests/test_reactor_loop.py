# SPDX-License-Identifier: GPL-2.0-or-later
"""The reactor's loop and what it tells the admin: the change text of a reaction's line, the
detail writer's thread, the heap settling schedule, the restarts of sources and of failed
reactions, and their log lines (fake backend, trio's virtual clock).

Every expectation is worked out by hand from the documented behaviour (the docstrings and the
module's rules): none is read from the code under test.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
import trio
import trio.testing

from topowatch import reactor as reactor_mod
from topowatch.collector import Settled
from topowatch.core.model import AF_INET, Address, Link, PolicyRule, Route, Topology
from topowatch.core.nat import Chain, NatRuleset, Rule
from topowatch.reactor import (
    DetailWriter,
    Reactor,
    ReactorConfig,
    Trigger,
    _change_text,
    _large,
    _route_parts,
)

from test_collector import Counting  # isort: skip
from test_reactor import B, FakeBackend, stale_when_up2  # isort: skip

LOGGER = "topowatch.reactor"


def messages(caplog: pytest.LogCaptureFixture, level: int | None = None) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and (level is None or r.levelno == level)]


# -- the change text ------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "parts"), [
    ("default via 10.0.2.1 dev up1 table 5", ("default table 5", "via 10.0.2.1 dev up1")),
    ("10.0.0.0/8 dev up1 metric 100", ("10.0.0.0/8 metric 100", "dev up1")),
    ("10.0.0.0/8 proto static via 10.0.2.1", ("10.0.0.0/8 proto static", "via 10.0.2.1")),
    ("default nexthop via 10.0.2.1 dev up1 nexthop via 10.0.3.1 dev up2",
     ("default", "nexthop via 10.0.2.1 dev up1 nexthop via 10.0.3.1 dev up2")),
    ("default dev up1", ("default", "dev up1")),
    ("unreachable 10.9.0.0/16", ("unreachable 10.9.0.0/16", "")),
    # "table" with no value after it is a word of the path, not a key.
    ("default dev up1 table", ("default", "dev up1 table")),
    ("default dev up1 table 5 metric 7", ("default table 5 metric 7", "dev up1")),
    ("default table 5 dev up1", ("default table 5", "dev up1")),
])  # fmt: skip
def test_a_route_splits_into_its_key_and_its_path(text: str, parts: tuple[str, str]) -> None:
    assert _route_parts(text) == parts


def test_a_replaced_route_reads_as_one_change_and_the_rest_is_counted() -> None:
    lines = ("route default via 198.51.100.1 dev up1 removed", "route 192.0.2.30/32 via 100.64.0.1 dev up3 removed",
             "route default via 203.0.113.1 dev up2 added", "link up3 down")
    assert _change_text(lines) == ("route default: via 198.51.100.1 dev up1 -> via 203.0.113.1 dev up2; "
                                   "route 192.0.2.30/32 via 100.64.0.1 dev up3 removed; and 1 more")
    assert _change_text(lines, limit=3) == (
        "route default: via 198.51.100.1 dev up1 -> via 203.0.113.1 dev up2; "
        "route 192.0.2.30/32 via 100.64.0.1 dev up3 removed; link up3 down")
    # Two more than the limit.
    assert _change_text(("link a up", "link b up", "link c up", "link d up")) == "link a up; link b up; and 2 more"
    # Exactly the limit: nothing more to count.
    assert _change_text(("link a up", "link b up")) == "link a up; link b up"


def test_a_route_is_paired_only_with_one_of_the_same_key() -> None:
    # Another table is another route.
    assert _change_text(("route default dev a removed", "route default dev b table 5 added")) == (
        "route default dev a removed; route default dev b table 5 added")
    # The same table: one change, the table in its key.
    assert _change_text(("route default dev a table 5 removed", "route default dev b table 5 added")) == (
        "route default table 5: dev a -> dev b")
    # Two removed (or two added) of one key: which replaced which is not known, each is told.
    assert _change_text(("route default dev a removed", "route default dev c removed", "route default dev b added"),
                        limit=5) == "route default dev a removed; route default dev c removed; route default dev b added"
    assert _change_text(("route default dev a removed", "route default dev b added", "route default dev c added"),
                        limit=5) == "route default dev a removed; route default dev b added; route default dev c added"
    # Lines between them: the pair is told where the removed one is (``diff`` lists removed routes first).
    assert _change_text(("route 10.0.0.0/8 dev a removed", "link x up", "route 10.0.0.0/8 dev b added"), limit=5) == (
        "route 10.0.0.0/8: dev a -> dev b; link x up")


def test_a_replaced_route_with_no_path_says_none() -> None:
    assert _change_text(("route 10.0.0.0/8 removed", "route 10.0.0.0/8 dev b added")) == "route 10.0.0.0/8: none -> dev b"
    assert _change_text(("route 10.0.0.0/8 dev a removed", "route 10.0.0.0/8 added")) == "route 10.0.0.0/8: dev a -> none"
    # A route with no key words (only a path): its key is empty, and it pairs all the same.
    assert _change_text(("route dev a removed", "route dev b added")) == "route : dev a -> dev b"


def test_only_route_lines_are_paired() -> None:
    # Lines that are not routes are told as they are, even where their words look like a key.
    lines = ("route default dev a removed", "route default dev b added", "link1 default removed")
    assert _change_text(lines, limit=5) == "route default: dev a -> dev b; link1 default removed"
    lines = ("routes default dev a removed", "routes default dev b added")
    assert _change_text(lines) == "routes default dev a removed; routes default dev b added"


# -- the detail writer ----------------------------------------------------------------------------


def _writers() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "topowatch-details")


def test_the_detail_writer_writes_in_order_in_one_daemon_thread_of_its_own() -> None:
    writer = DetailWriter()
    seen: list[tuple[int, str, bool]] = []
    gate = threading.Event()

    def write(n: int) -> None:
        gate.wait(5)
        me = threading.current_thread()
        seen.append((n, me.name, me.daemon))

    before = _writers()
    for n in range(3):
        writer.submit(lambda n=n: write(n), f"reaction {n}")  # type: ignore[misc]
    assert _writers() == before + 1  # one thread, started by the first submit, for every reaction
    assert not writer.drain(0.05)  # still waiting at the gate
    threading.Timer(0.05, gate.set).start()  # opened while drain waits
    assert writer.drain(5.0)
    assert seen == [(0, "topowatch-details", True), (1, "topowatch-details", True), (2, "topowatch-details", True)]
    assert writer.drain(0.0)  # nothing pending: at once


def test_the_detail_writer_goes_on_after_a_failed_write(caplog: pytest.LogCaptureFixture) -> None:
    writer = DetailWriter()
    seen: list[str] = []

    def fail() -> None:
        raise OSError(28, "No space left on device")

    with caplog.at_level(logging.ERROR, logger=LOGGER):
        writer.submit(fail, "reaction 1")
        writer.submit(lambda: seen.append("second"), "reaction 2")
        assert writer.drain(5.0)
    assert seen == ["second"]
    (record,) = [r for r in caplog.records if r.name == LOGGER]
    assert record.getMessage() == "writing a reaction's details failed"
    assert record.exc_info is not None and isinstance(record.exc_info[1], OSError)


def test_the_detail_writer_drops_a_reactions_details_beyond_its_pending_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    writer = DetailWriter()
    taken, gate = threading.Event(), threading.Event()
    written: list[int] = []

    def first() -> None:
        taken.set()
        gate.wait(5)
        written.append(0)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        writer.submit(first, "reaction 1")
        assert taken.wait(5)  # the writer holds the first: the queue is empty again
        for n in range(1, 17):  # sixteen wait
            writer.submit(lambda n=n: written.append(n), f"reaction {n + 1}")  # type: ignore[misc]
        assert messages(caplog) == []
        writer.submit(lambda: written.append(99), "reaction 18")
        gate.set()
        assert writer.drain(5.0)
    assert messages(caplog, logging.WARNING) == [
        "reaction 18: its per-entry records are not written: 16 reactions' records are still being written"]
    assert written == list(range(17))


# -- the heap settling ----------------------------------------------------------------------------


async def _settling(nursery: trio.Nursery) -> tuple[Reactor, FakeBackend, Counting]:
    settle = Counting(Settled(1.0, 3, 2))
    backend = FakeBackend()
    backend.topo = B
    reactor = Reactor(backend, ReactorConfig(debounce=0.1, max_wait=0.1, startup_sweep=False, settle=settle),
                      predictor=stale_when_up2)
    await nursery.start(reactor.run)
    return reactor, backend, settle


async def test_the_heap_settles_before_ready_and_says_so(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        async with trio.open_nursery() as nursery:
            reactor, _, settle = await _settling(nursery)
            # Before ready: after the first snapshot (the fake's takes 1 ms).
            assert settle.at == [pytest.approx(0.001)] and reactor.settles == 1
            await trio.sleep(10 * reactor_mod.SETTLE_INTERVAL)  # idle: nothing wakes it
            nursery.cancel_scope.cancel()
    assert len(settle.at) == 1 and reactor.settles == 1
    assert "heap settled before ready in 1000 ms: 3 objects frozen, 2 collected" in messages(caplog, logging.DEBUG)


async def test_after_a_reaction_the_heap_settles_an_interval_after_the_last_settle(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Quiet 5 s after a reaction at 10 s, but the last settle (before ready, at 0) is not 600 s
    old: it settles at 600 s, once; a second reaction at 300 s changes nothing of that."""
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        async with trio.open_nursery() as nursery:
            reactor, backend, settle = await _settling(nursery)
            await trio.sleep(10)
            await backend.send.send(Trigger("rtnl", "route added: x", kind="route"))
            await trio.sleep(290)
            await backend.send.send(Trigger("rtnl", "route added: y", kind="route"))
            await trio.sleep(1000)
            nursery.cancel_scope.cancel()
    assert len(reactor.reactions) == 2
    assert settle.at == [pytest.approx(0.001), pytest.approx(600.001)] and reactor.settles == 2
    assert "heap settled while quiet in 1000 ms: 3 objects frozen, 2 collected" in messages(caplog, logging.DEBUG)


async def test_the_heap_settles_quiet_seconds_after_a_reaction_near_the_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A reaction ending just before the interval is over: the settle waits 5 quiet seconds
    after it (598 s + 0.1 s debounce + its own few ms, then 5 s)."""
    async with trio.open_nursery() as nursery:
        _, backend, settle = await _settling(nursery)
        await trio.sleep(598)
        await backend.send.send(Trigger("rtnl", "route added: x", kind="route"))
        await trio.sleep(100)
        nursery.cancel_scope.cancel()
    assert len(settle.at) == 2 and 603.1 < settle.at[1] < 603.2


async def test_a_burst_gathering_at_the_settle_time_delays_the_settle_past_its_reaction(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """At 600 s a burst is gathering (its event came at 599.95 s, the debounce is 0.1 s): the
    settle waits for its reaction (600.05 s and a few ms), then 5 quiet seconds."""
    async with trio.open_nursery() as nursery:
        reactor, backend, settle = await _settling(nursery)
        await trio.sleep(10)
        await backend.send.send(Trigger("rtnl", "route added: x", kind="route"))
        await trio.sleep(589.95)
        await backend.send.send(Trigger("rtnl", "route added: y", kind="route"))
        await trio.sleep(100)
        nursery.cancel_scope.cancel()
    assert len(reactor.reactions) == 2
    assert len(settle.at) == 2 and 605.05 < settle.at[1] < 605.2


# -- startup, sources, failed reactions -----------------------------------------------------------

C = Topology(
    links=(Link(1, "lo"), Link(2, "up1"), Link(3, "up2")),
    addresses=(Address(2, IPv4Address("198.51.100.2"), 24), Address(3, IPv4Address("203.0.113.2"), 24)),
    routes=(Route(IPv4Network("0.0.0.0/0")), Route(IPv4Network("10.0.0.0/8")), Route(IPv4Network("10.1.0.0/16")),
            Route(IPv4Network("10.2.0.0/16"))),
    rules=(PolicyRule(AF_INET, 100),),
)


async def test_ready_says_what_was_read(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    backend = FakeBackend()
    backend.topo = C
    reactor = Reactor(backend, ReactorConfig(startup_sweep=False))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        async with trio.open_nursery() as nursery:
            await nursery.start(reactor.run)
            # Neither busy nor having made progress: no reaction began (the watchdog reads both).
            assert reactor.busy_since is None and reactor.progress_at is None
            nursery.cancel_scope.cancel()
    assert messages(caplog, logging.INFO) == ["ready: 3 links, 2 addresses, 4 routes, 1 rules; listening for events"]


async def test_ready_without_a_ruleset_says_so_and_why(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    backend = FakeBackend()
    backend.ruleset_error = True
    with caplog.at_level(logging.INFO, logger=LOGGER):
        async with trio.open_nursery() as nursery:
            await nursery.start(Reactor(backend, ReactorConfig(startup_sweep=False)).run)
            nursery.cancel_scope.cancel()
    assert messages(caplog) == [
        "ruleset unreadable at startup: nft: syntax error; nothing is deleted until a ruleset has been read "
        "(each reaction tries again)",
        "ready: 2 links, 0 addresses, 1 routes, 0 rules, no ruleset yet; listening for events",
    ]
    assert [r.levelno for r in caplog.records if r.name == LOGGER] == [logging.ERROR, logging.INFO]


class Scripted(FakeBackend):
    """A backend whose snapshots after the first fail as told: ``fails[i]`` for the i-th reaction."""

    def __init__(self, fails: list[bool]) -> None:
        super().__init__()
        self.fails = fails
        self.snapshots = 0
        self.reacting: list[float | None] = []
        self.reactor: Reactor | None = None

    async def topology(self) -> Topology:
        self.snapshots += 1
        if self.snapshots > 1:
            self.topo = B  # up2 came: both entries are stale
            assert self.reactor is not None
            self.reacting.append(self.reactor.busy_since)
            if self.fails[self.snapshots - 2]:
                raise OSError(5, "Input/output error")
        return await super().topology()


async def _failing(fails: list[bool], backoff: float, run_for: float, **config: float) -> tuple[Reactor, Scripted]:
    backend = Scripted(fails)
    reactor = Reactor(backend, ReactorConfig(startup_sweep=False, restart_backoff=backoff, **config),  # type: ignore[arg-type]
                      predictor=stale_when_up2)
    backend.reactor = reactor
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        await backend.send.send(Trigger("rtnl", "link up2 added", kind="link"))
        await trio.sleep(run_for)
        nursery.cancel_scope.cancel()
    return reactor, backend


async def test_a_failed_reaction_is_tried_again_after_a_doubling_back_off_reset_by_a_success(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Back-off 1 s: failures wait 1, 2, 4 s; a success resets it, the next failure waits 1 s."""
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        reactor, backend = await _failing([True, True, True, False], 1.0, 100, debounce=0.1, max_wait=0.1)
    assert messages(caplog, logging.ERROR) == [
        "reaction failed: [Errno 5] Input/output error; trying again in 1.0 s",
        "reaction failed: [Errno 5] Input/output error; trying again in 2.0 s",
        "reaction failed: [Errno 5] Input/output error; trying again in 4.0 s",
    ]
    assert reactor.errors == {"reaction": 3}
    (done,) = reactor.reactions
    # The retry's trigger is in the reaction's line, with the error that caused it.
    assert done.trigger == "retry after a failed reaction ([Errno 5] Input/output error)"
    assert done.deleted.deleted == 2
    assert reactor.busy_since is None
    assert all(at is not None for at in backend.reacting)  # busy while each reaction ran


async def test_a_failure_after_a_success_waits_the_first_back_off_again(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    backend = Scripted([True, False, True, False])
    reactor = Reactor(backend, ReactorConfig(startup_sweep=False, restart_backoff=1.0, debounce=0.1, max_wait=0.1),
                      predictor=stale_when_up2)
    backend.reactor = reactor
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        async with trio.open_nursery() as nursery:
            await nursery.start(reactor.run)
            await backend.send.send(Trigger("rtnl", "link up2 added", kind="link"))
            await trio.sleep(10)
            await backend.send.send(Trigger("rtnl", "route added: x", kind="route"))
            await trio.sleep(10)
            nursery.cancel_scope.cancel()
    assert messages(caplog, logging.ERROR) == [
        "reaction failed: [Errno 5] Input/output error; trying again in 1.0 s",
        "reaction failed: [Errno 5] Input/output error; trying again in 1.0 s",
    ]
    assert len(reactor.reactions) == 2


async def test_a_retry_is_lost_events_and_judges_everything(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A reaction judged whole, then one that failed: its retry stands for events that may be lost."""
    backend = Scripted([False, True, False])
    reactor = Reactor(backend, ReactorConfig(startup_sweep=False, restart_backoff=1.0, debounce=0.1, max_wait=0.1),
                      predictor=stale_when_up2)
    backend.reactor = reactor
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        await backend.send.send(Trigger("rtnl", "link up2 added", kind="link"))
        await trio.sleep(10)
        assert reactor.judged_all
        with caplog.at_level(logging.DEBUG, logger=LOGGER):
            await backend.send.send(Trigger("rtnl", "route added: x", kind="route"))
            await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert len(reactor.reactions) == 2
    assert "full judgement: events were lost" in messages(caplog, logging.DEBUG)


async def test_the_back_off_stops_doubling_at_the_sixteenth_and_never_waits_past_a_minute(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Back-off 2**-16 s: the k-th failure waits 2**(min(k-1, 16) - 16) s: 2**-16 ... 1 s at the 17th,
    and 1 s at the 18th too. Back-off 1 s: the seventh failure would wait 64 s, RETRY_MAX is 60."""
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        await _failing([True] * 18 + [False], 2.0**-16, 100, debounce=0.0001, max_wait=0.0001)
    waits = [r.args[1] for r in caplog.records if r.name == LOGGER and isinstance(r.args, tuple)]
    assert waits == [2.0 ** (k - 17) for k in range(1, 18)] + [1.0]
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        await _failing([True] * 8 + [False], 1.0, 500, debounce=0.1, max_wait=0.1)
    waits = [r.args[1] for r in caplog.records if r.name == LOGGER and isinstance(r.args, tuple)]
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]


class Ending:
    """An event source that sends its triggers, then ends (a socket closed under it), or fails."""

    name = "rtnl"

    def __init__(self, *sessions: list[Trigger] | OSError) -> None:
        self.sessions = list(sessions)
        self.subscriptions = 0

    @contextlib.asynccontextmanager
    async def events(self) -> AsyncIterator[AsyncIterator[Trigger]]:
        self.subscriptions += 1
        session = self.sessions.pop(0) if self.sessions else []
        if isinstance(session, OSError):
            raise session

        async def gen() -> AsyncIterator[Trigger]:
            for trigger in session:
                yield trigger
            if not self.sessions:
                await trio.sleep_forever()

        yield gen()


class WithSource(FakeBackend):
    def __init__(self, source: Ending) -> None:
        super().__init__()
        self.source = source

    def sources(self) -> list[Ending]:  # type: ignore[override]
        return [self.source]


async def test_a_source_that_ends_or_fails_is_restarted_and_each_restart_is_lost_events(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    overrun = Trigger("rtnl", "netlink buffer overrun", overrun=True)
    source = Ending([overrun], OSError(105, "No buffer space available"), [])
    backend = WithSource(source)
    reactor = Reactor(backend, ReactorConfig(startup_sweep=False, restart_backoff=2.0, debounce=0.1, max_wait=0.1),
                      predictor=stale_when_up2)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        async with trio.open_nursery() as nursery:
            await nursery.start(reactor.run)
            await trio.sleep(30)
            nursery.cancel_scope.cancel()
    assert source.subscriptions == 3
    assert reactor.source_restarts == 2
    assert reactor.errors == {"source": 1}
    warned = messages(caplog, logging.WARNING)
    assert warned[:2] == ["event overrun (netlink buffer overrun): events were lost; resyncing by full dump",
                          "rtnl event source ended; restarting it"]
    assert messages(caplog, logging.ERROR) == [
        "rtnl event source failed: [Errno 105] No buffer space available; restarting in 2.0 s"]
    # The overrun and the first restart made one burst, the second restart (2 s later) another.
    assert [r.trigger for r in reactor.reactions] == ["netlink buffer overrun, rtnl event source restarted",
                                                      "rtnl event source restarted"]
    # Each is lost events: judged whole for that reason, whatever the previous judgement.
    assert messages(caplog, logging.DEBUG).count("full judgement: events were lost") == 1


async def test_a_source_failing_twice_is_counted_twice(autojump_clock: trio.testing.MockClock) -> None:
    source = Ending([], OSError(105, "No buffer space available"), OSError(105, "No buffer space available"), [])
    reactor = Reactor(WithSource(source), ReactorConfig(startup_sweep=False, restart_backoff=1.0),
                      predictor=stale_when_up2)
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        await trio.sleep(30)
        nursery.cancel_scope.cancel()
    assert reactor.errors == {"source": 2}
    assert reactor.source_restarts == 3


# -- a reaction's log lines -----------------------------------------------------------------------

GROUP = ("udp 10.0.1.2:5060 -> 192.0.2.10:5060, udp 10.0.1.2:5061 -> 192.0.2.10:5060 "
         "(2 null_binding_now_nat: source no NAT -> masquerade to 203.0.113.2)")


async def _react_logged(backend: FakeBackend, **config: object) -> Reactor:
    reactor = Reactor(backend, ReactorConfig(startup_sweep=False, **config), predictor=stale_when_up2)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        backend.topo = B
        await backend.send.send(Trigger("rtnl", "link up2 added", kind="link"))
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    return reactor


@pytest.mark.parametrize(("config", "level", "verb"), [
    ({}, logging.INFO, "deleted"),
    ({"dry_run": True}, logging.INFO, "would delete"),
    ({"max_deletions": 1}, logging.WARNING, "would delete"),  # refused: two stale, a cap of one
])  # fmt: skip
async def test_a_reactions_line_and_group_lines_say_what_was_done_at_their_level(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture, config: dict[str, object], level: int,
    verb: str,
) -> None:
    with caplog.at_level(logging.INFO, logger=LOGGER):
        reactor = await _react_logged(FakeBackend(), **config)
    records = [r for r in caplog.records if r.name == LOGGER and r.getMessage().startswith("reaction 1")]
    line, group = records
    assert line.levelno == level
    fields = line.fields  # type: ignore[attr-defined]
    assert (fields["event"], fields["reaction"], fields["stale"]) == ("reaction", 1, 2)
    assert group.getMessage() == f"reaction 1: {verb} {GROUP}"
    assert group.levelno == logging.INFO
    assert group.threadName == threading.current_thread().name  # written in line (no background details)
    assert len(reactor.reactions) == 1


async def test_failed_deletes_are_each_logged(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    from topowatch.reactor import DeleteCounts, StillStale

    class Failing(FakeBackend):
        async def delete(self, entries: object, still: StillStale) -> DeleteCounts:
            return DeleteCounts(failed=2, errors=("udp 10.0.1.2:5060: EPERM", "udp 10.0.1.2:5061: EPERM"))

    with caplog.at_level(logging.INFO, logger=LOGGER):
        await _react_logged(Failing())
    assert messages(caplog, logging.ERROR) == ["delete failed: udp 10.0.1.2:5060: EPERM",
                                               "delete failed: udp 10.0.1.2:5061: EPERM"]


async def test_background_details_are_written_by_the_detail_writer(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger=LOGGER):
        reactor = await _react_logged(FakeBackend(), background_details=True)
        assert reactor.details.drain(10)
    (group,) = [r for r in caplog.records if r.name == LOGGER and r.getMessage().startswith("reaction 1: ")]
    assert group.getMessage() == f"reaction 1: deleted {GROUP}"
    assert group.threadName == "topowatch-details"


async def test_background_details_beyond_the_pending_ones_are_dropped_and_said(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    backend = FakeBackend()
    reactor = Reactor(backend, ReactorConfig(startup_sweep=False, background_details=True), predictor=stale_when_up2)
    taken, gate = threading.Event(), threading.Event()

    def stuck() -> None:
        taken.set()
        gate.wait(10)

    reactor.details.submit(stuck, "earlier reaction")
    assert taken.wait(5)
    for _ in range(DetailWriter.PENDING):
        reactor.details.submit(lambda: None, "earlier reaction")
    try:
        with caplog.at_level(logging.INFO, logger=LOGGER):
            async with trio.open_nursery() as nursery:
                await nursery.start(reactor.run)
                backend.topo = B
                await backend.send.send(Trigger("rtnl", "link up2 added", kind="link"))
                await trio.sleep(5)
                nursery.cancel_scope.cancel()
    finally:
        gate.set()
    assert reactor.details.drain(10)
    assert messages(caplog, logging.WARNING) == [
        "reaction 1: its per-entry records are not written: 16 reactions' records are still being written"]
    assert not any(m.startswith("reaction 1: deleted") for m in messages(caplog))


# -- the work done ahead: the startup sweep's warm-up, the ruleset's preparation ------------------


def _chain(name: str, rules: int, first: int = 1) -> Chain:
    return Chain("ip", "nat", name, tuple(Rule(first + i, ()) for i in range(rules)))


def test_a_ruleset_of_two_thousand_rules_is_large() -> None:
    assert reactor_mod.LARGE_RULESET == 2000
    assert _large(NatRuleset((_chain("a", 1000), _chain("b", 1000, 1001))))
    assert not _large(NatRuleset((_chain("a", 1000), _chain("b", 999, 1001))))
    assert not _large(NatRuleset())


class Walks:
    """Records the walks the reactor asks for (prepare, mentions_sport): the value and the thread."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.prepared: list[tuple[object, str]] = []
        self.sport: list[tuple[object, str]] = []
        real_prepare, real_sport = reactor_mod.prepare, reactor_mod.mentions_sport

        def prepare(ruleset: NatRuleset) -> None:
            self.prepared.append((ruleset, threading.current_thread().name))
            real_prepare(ruleset)

        def sport(value: object) -> bool:
            self.sport.append((value, threading.current_thread().name))
            return real_sport(value)

        monkeypatch.setattr(reactor_mod, "prepare", prepare)
        monkeypatch.setattr(reactor_mod, "mentions_sport", sport)


class OneRuleset(FakeBackend):
    def __init__(self, ruleset: NatRuleset) -> None:
        super().__init__()
        self.value = ruleset

    async def ruleset(self) -> NatRuleset:
        self.rulesets_read += 1
        return self.value


@pytest.mark.parametrize("large", [False, True])
async def test_the_ruleset_is_prepared_once_after_its_first_reaction_in_a_worker_thread_if_large(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch, large: bool
) -> None:
    """A ruleset of 2,000 rules or more is walked in a worker thread (the loop goes on); a smaller
    one in line. Its source-port check is made once per ruleset read (the same object again: once)."""
    ruleset = NatRuleset((_chain("big", 2000 if large else 3), _chain("sport", 1, 9000)))
    object.__setattr__(ruleset.chains[1].rules[0], "text", "udp sport 5060 dnat to 10.0.0.1")
    walks = Walks(monkeypatch)
    backend = OneRuleset(ruleset)
    reactor = Reactor(backend, ReactorConfig(startup_sweep=False, debounce=0.1, max_wait=0.1),
                      predictor=stale_when_up2)
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        walks.prepared.clear()
        walks.sport.clear()
        # The second judges everything again (lost events), with the same ruleset object.
        for n, trigger in enumerate((Trigger("rtnl", "link up2 added", kind="link"),
                                     Trigger("rtnl", "netlink buffer overrun", overrun=True)), 1):
            await backend.send.send(trigger)
            # A worker thread takes real time, in which the virtual clock may jump: wait for the end.
            with trio.fail_after(600):
                while reactor.totals.reactions < n or reactor.busy_since is not None:
                    await trio.sleep(0.01)
            assert reactor.progress_at is not None
        nursery.cancel_scope.cancel()
    assert backend.rulesets_read == 3  # at start, then once per reaction: the same object each time
    main = threading.current_thread().name
    worker = [name for _, name in walks.prepared]
    assert [value is ruleset for value, _ in walks.prepared] == [True]  # prepared once, after the first
    assert (worker[0] != main) is large
    sport_walks = [name for value, name in walks.sport if value is ruleset]
    assert len(sport_walks) == 1 and (sport_walks[0] != main) is large
    assert reactor_mod.prepared(ruleset)
    assert await reactor._sport_matters(ruleset, B)  # "sport" in a rule: the source port matters


class SweepHeld(FakeBackend):
    """The startup sweep's snapshot never comes: what was made before "ready" can be looked at."""

    def __init__(self, ruleset: NatRuleset) -> None:
        super().__init__()
        self.value = ruleset
        self.snapshots = 0

    async def topology(self) -> Topology:
        self.snapshots += 1
        if self.snapshots > 1:
            await trio.sleep_forever()
        return await super().topology()

    async def ruleset(self) -> NatRuleset:
        return self.value


@pytest.mark.parametrize("netmap", [False, True])
async def test_the_startup_sweep_is_prepared_before_ready_and_says_so(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
    netmap: bool,
) -> None:
    import re

    from topowatch.core.nat import Hook, NetmapStatement

    if netmap:
        rule = Rule(1, (NetmapStatement(IPv4Network("10.9.0.0/16"), "NETMAP --to 10.9.0.0/16"),))
        ruleset = NatRuleset((Chain("ip", "nat", "PREROUTING", (rule,), Hook.PREROUTING, -100, "nat", "accept"),))
    else:
        ruleset = NatRuleset((_chain("a", 3),))
    walks = Walks(monkeypatch)
    reactor = Reactor(SweepHeld(ruleset), ReactorConfig(), predictor=stale_when_up2)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        async with trio.open_nursery() as nursery:
            await nursery.start(reactor.run)
            assert reactor_mod.prepared(ruleset)  # before "ready", not after the sweep
            assert reactor.progress_at is not None
            assert [value is ruleset for value, _ in walks.prepared] == [True]
            assert any(value is ruleset for value, _ in walks.sport)
            nursery.cancel_scope.cancel()
    (line,) = [m for m in messages(caplog, logging.DEBUG) if m.startswith("startup sweep prepared")]
    what = "NETMAP --to 10.9.0.0/16 maps addresses bit by bit" if netmap else r"\d+ classes"
    # The virtual clock stands still while the worker thread builds (no deadline is pending).
    assert re.fullmatch(rf"startup sweep prepared in 0 ms: {what}", line), line


def test_the_details_of_a_log_only_policy_and_the_undecided_entries(
    caplog: pytest.LogCaptureFixture, tmp_path: Any
) -> None:
    """A log-only policy's stale entries: a group line "stale (policy says log only)" and a record
    per entry "log only"; the undecided ones: a debug record each. The flushing ones are named by
    the verb given (a dry run's "would delete")."""
    from topowatch.core.decide import FlushPlan
    from topowatch.core.reason import ReasonCode
    from topowatch.policy import Selection

    from test_reactor import MASQ2, _decision, _reaction, write_policy  # isort: skip

    stale = [_decision(5060, ReasonCode.NULL_BINDING_NOW_NAT, MASQ2), _decision(5061, ReasonCode.NULL_BINDING_NOW_NAT, MASQ2)]
    undecided = _decision(5070, ReasonCode.NULL_BINDING_NOW_NAT, MASQ2)
    reaction = _reaction(plan=FlushPlan(examined=3, eligible=3, stale=stale, undecided=[undecided]), counts=None)
    logging_only = Selection(write_policy(tmp_path, '[policy.watch]\naction = "log"\n').policies)
    with caplog.at_level(logging.INFO, logger=LOGGER), caplog.at_level(logging.DEBUG, logger="topowatch.entries"):
        Reactor._log_details(reaction, logging_only, "would delete")
    lines = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert lines == [
        (LOGGER, logging.INFO, f"reaction 7: stale (policy says log only) {GROUP}"),
        ("topowatch.entries", logging.INFO, f"reaction 7: log only {stale[0].entry.describe()}: {stale[0].reason}"),
        ("topowatch.entries", logging.INFO, f"reaction 7: log only {stale[1].entry.describe()}: {stale[1].reason}"),
        ("topowatch.entries", logging.DEBUG, f"reaction 7: undecided {undecided.entry.describe()}: {undecided.reason}"),
    ]
    fields = [r.fields for r in caplog.records[1:]]  # type: ignore[attr-defined]
    assert [(f["event"], f["reaction"], f["action"], f["code"]) for f in fields] == [
        ("entry", 7, "log only", "null_binding_now_nat"), ("entry", 7, "log only", "null_binding_now_nat"),
        ("entry", 7, "undecided", "null_binding_now_nat")]
    assert [f["orig"]["sport"] for f in fields] == [5060, 5061, 5070]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="topowatch.entries"), caplog.at_level(logging.INFO, logger=LOGGER):
        Reactor._log_details(reaction, Selection(()), "would delete")  # no policy: none flushes
        flushing = Selection(write_policy(tmp_path, '[policy.watch]\naction = "flush"\n').policies)
        Reactor._log_details(reaction, flushing, "would delete")
    lines = [(r.name, r.getMessage()) for r in caplog.records if r.name == LOGGER]
    assert lines == [(LOGGER, f"reaction 7: stale (policy says log only) {GROUP}"),
                     (LOGGER, f"reaction 7: would delete {GROUP}")]
    assert [r.fields["action"] for r in caplog.records if r.name != LOGGER] == (  # type: ignore[attr-defined]
        ["log only", "log only", "would delete", "would delete"])  # undecided ones: only at debug


async def test_an_xfrm_selector_reading_the_source_port_makes_it_matter_to_the_reactor() -> None:
    from dataclasses import replace

    from topowatch.core.xfrm import Direction, XfrmPolicy, XfrmSelector

    selector = XfrmSelector(2, IPv4Network("10.99.0.0/16"), IPv4Network("10.98.0.0/16"), sport=5060,
                            sport_mask=0xFFFF, proto=17)
    reactor = Reactor(FakeBackend(), ReactorConfig())
    assert await reactor._sport_matters(NatRuleset(), replace(B, xfrm_policies=(XfrmPolicy(selector, Direction.OUT),)))
    assert not await reactor._sport_matters(NatRuleset(), B)


async def test_a_reaction_that_decided_nothing_names_its_policy(
    autojump_clock: trio.testing.MockClock, tmp_path: Any
) -> None:
    from test_reactor import react_to_up2_added, write_policy  # isort: skip

    policy = write_policy(tmp_path, '[policy.watch]\naction = "log"\n')
    backend = FakeBackend()
    backend.ruleset_error = True
    reactor = Reactor(backend, ReactorConfig(startup_sweep=False), predictor=stale_when_up2, policy=lambda: policy)
    await react_to_up2_added(reactor, backend)
    (reaction,) = reactor.reactions
    assert reaction.summary() == ("reaction 1 (link up2 added) [policy watch]: NOTHING DECIDED: no ruleset has been "
                                  "read yet (nft: syntax error), nothing deleted")


def test_an_observers_error_is_counted_by_its_kind() -> None:
    reactor = Reactor(FakeBackend(), ReactorConfig())
    reactor.count_error("snapshot")
    reactor.count_error("snapshot")
    reactor.count_error("hook")
    assert reactor.errors == {"snapshot": 2, "hook": 1}


async def test_a_reaction_called_directly_after_t0_judged_with_a_previous_snapshot(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Without ``run`` (a tool's one reaction): T0 set, no startup sweep pending. The reaction's new
    T0 is told as judged with a previous snapshot; "judged whole" set by hand with nothing judged
    under any ruleset yet: the ruleset read counts as changed, so everything is judged."""
    from topowatch.reactor import Burst

    told: list[tuple[int, bool]] = []
    reactor = Reactor(FakeBackend(), ReactorConfig(), predictor=stale_when_up2)
    reactor.t0 = B
    reactor.t0_hook = lambda t0, ruleset, number, previous: told.append((number, previous))
    reactor.judged_all = True
    burst = Burst()
    burst.add(Trigger("rtnl", "route added: x", kind="route"), trio.current_time())
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        await reactor.react(burst)
    assert told == [(1, True)]
    assert "full judgement: the ruleset changed" in messages(caplog, logging.DEBUG)
