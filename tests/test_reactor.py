"""The reactor against a fake backend, on trio's virtual clock (autojump)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
import trio
import trio.testing

from topowatch.core.conntrack import (
    IPS_CONFIRMED,
    IPS_DST_NAT_DONE,
    IPS_SEEN_REPLY,
    IPS_SRC_NAT_DONE,
    CtTuple,
    Entry,
    Reread,
)
from topowatch.core.decide import Decider, Decision, FlushPlan
from topowatch.core.eligibility import Eligibility
from topowatch.core.fib import Fib
from topowatch.core.flow import NO_NAT, Binding, Flow, Ingress, NatKind, Prediction, Unknown
from topowatch.core.model import AF_INET, Link, Route, Topology, TopologyChange
from topowatch.core.nat import NatRuleset
from topowatch.core.reason import Reason, ReasonCode
from topowatch.edges.nft import parse_ruleset_json
from topowatch.errors import DumpInterrupted, RulesetError, TopowatchError
from topowatch.policy import Action, Policy, Selection
from topowatch.reactor import (
    HISTORY,
    Burst,
    DeleteCounts,
    Reaction,
    ReactionTotals,
    Reactor,
    ReactorConfig,
    StillStale,
    Trigger,
    _sum_counts,
    still_stale,
)

A = Topology(links=(Link(1, "lo"), Link(2, "up1")), routes=(Route(IPv4Network("0.0.0.0/0")),))
B = Topology(links=(Link(1, "lo"), Link(2, "up1"), Link(3, "up2")), routes=(Route(IPv4Network("0.0.0.0/0")),))


def udp_entry(sport: int) -> Entry:
    src, dst = IPv4Address("10.0.1.2"), IPv4Address("192.0.2.10")
    return Entry(AF_INET, 17, CtTuple(src, dst, sport, 5060), CtTuple(dst, src, 5060, sport),
                 status=IPS_CONFIRMED | IPS_SRC_NAT_DONE)


class FakeBackend:
    def __init__(self) -> None:
        self.topo = A
        self.table = [udp_entry(5060), udp_entry(5061)]
        self.deleted: list[Entry] = []
        self.send, self.recv = trio.open_memory_channel[Trigger](1000)
        self.ruleset_error = False
        self.rulesets_read = 0
        self.fail_source_once = False
        self.subscriptions = 0

    name = "fake"

    def sources(self) -> list[FakeBackend]:
        return [self]

    @contextlib.asynccontextmanager
    async def events(self) -> AsyncIterator[AsyncIterator[Trigger]]:
        self.subscriptions += 1
        if self.fail_source_once and self.subscriptions == 2:
            raise OSError(105, "No buffer space available")
        yield self.recv

    async def topology(self) -> Topology:
        await trio.sleep(0.001)
        return self.topo

    async def ruleset(self) -> NatRuleset:
        self.rulesets_read += 1
        if self.ruleset_error:
            raise RulesetError("nft: syntax error")
        return NatRuleset()

    async def entries(self, eligibility: Eligibility) -> list[Entry]:
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
        """Re-checks each entry against the table as it is now, as the kernel backend does."""
        current = {e.orig: e for e in self.table}
        victims, kept = [], 0
        for e in entries:
            now = current.get(e.orig)
            if now is not None and now.id == e.id and still(e, Reread(now.status, now.id, now.mark, now.timeout)):
                victims.append(now)
            elif now is not None and now.id == e.id:
                kept += 1
        self.deleted.extend(victims)
        self.table = [e for e in self.table if e not in victims]
        return DeleteCounts(deleted=len(victims), already_gone=len(entries) - len(victims) - kept,
                            kept_replied=kept)


def stale_when_up2(ruleset: Any, fib: Fib, flow: Flow) -> Prediction:
    """Masquerade to 203.0.113.2 once up2 exists; no NAT before."""
    if fib.topology.link_by_name("up2") is not None:
        snat = frozenset({Binding(NatKind.MASQUERADE, IPv4Address("203.0.113.2"))})
    else:
        snat = frozenset({NO_NAT})
    return Prediction(dnat=frozenset({NO_NAT}), snat=snat, egress=())


async def start(backend: FakeBackend, nursery: trio.Nursery, **config: Any) -> Reactor:
    cfg = ReactorConfig(startup_sweep=False, **config)
    reactor = Reactor(backend, cfg, predictor=stale_when_up2)
    await nursery.start(reactor.run)
    return reactor


async def test_burst_is_one_reaction(autojump_clock: trio.testing.MockClock) -> None:
    backend = FakeBackend()
    async with trio.open_nursery() as nursery:
        reactor = await start(backend, nursery, debounce=0.25, max_wait=3.0)
        backend.topo = B
        for i in range(50):
            await backend.send.send(Trigger("rtnl", f"route {i}"))
            await trio.sleep(0.1)  # gaps shorter than the debounce window: one burst
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    assert len(reactor.reactions) == 2  # 50 events over 5 s, never quiet: max_wait cuts it once
    assert sum(r.events for r in reactor.reactions) == 50
    assert len(backend.deleted) == 2
    assert "link up2 added" in reactor.reactions[0].summary()


async def test_a_request_after_many_events_is_named_by_its_reaction(autojump_clock: trio.testing.MockClock) -> None:
    """A hook's request that lands in a burst of kernel events is among the reaction's triggers
    (eight lines tell the events; a request is named after them): the log says who took it."""
    backend = FakeBackend()
    async with trio.open_nursery() as nursery:
        reactor = await start(backend, nursery, debounce=0.25, max_wait=3.0)
        for i in range(12):
            await backend.send.send(Trigger("rtnetlink", f"route removed: 10.{i}.0.0/16 dev tun0"))
        await backend.send.send(Trigger("dbus", "D-Bus dispatcher for tun0: openvpn-down", overrun=True))
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    assert len(reactor.reactions) == 1
    trigger = reactor.reactions[0].trigger
    assert "openvpn-down" in trigger and "10.7.0.0/16" in trigger and "10.8.0.0/16" not in trigger


async def test_a_reaction_is_stamped_on_the_hosts_monotonic_clock_after_its_last_delete(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``ended`` (the record's ``ended_monotonic``) is CLOCK_MONOTONIC after the last delete: a
    benchmark times the event to the last delete from outside with it, whatever trio's clock."""
    stamps: list[float] = []

    class Stamping(FakeBackend):
        async def delete(self, entries: Sequence[Entry], still: StillStale) -> DeleteCounts:
            counts = await super().delete(entries, still)
            stamps.append(time.monotonic())
            return counts

    backend = Stamping()
    async with trio.open_nursery() as nursery:
        reactor = await start(backend, nursery)
        backend.topo = B
        await backend.send.send(Trigger("rtnl", "link up2 added", kind="link"))
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    after = time.monotonic()
    (reaction,) = reactor.reactions
    assert reaction.deleted.deleted == 2 and stamps
    assert stamps[-1] <= reaction.ended <= after
    assert reaction.fields()["ended_monotonic"] == round(reaction.ended, 6)
    assert reaction.brief().ended == reaction.ended  # the history keeps it


async def test_quiet_gap_ends_burst(autojump_clock: trio.testing.MockClock) -> None:
    backend = FakeBackend()
    async with trio.open_nursery() as nursery:
        reactor = await start(backend, nursery, debounce=0.25, max_wait=5.0)
        await backend.send.send(Trigger("rtnl", "a"))
        await trio.sleep(0.5)
        await backend.send.send(Trigger("rtnl", "b"))
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    assert [r.events for r in reactor.reactions] == [1, 1]


async def test_no_change_deletes_nothing(autojump_clock: trio.testing.MockClock) -> None:
    backend = FakeBackend()
    async with trio.open_nursery() as nursery:
        reactor = await start(backend, nursery)
        await backend.send.send(Trigger("rtnl", "address added"))
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert len(reactor.reactions) == 1
    assert backend.deleted == []


async def test_overrun_triggers_resync_and_stream_goes_on(autojump_clock: trio.testing.MockClock) -> None:
    backend = FakeBackend()
    async with trio.open_nursery() as nursery:
        reactor = await start(backend, nursery)
        await backend.send.send(Trigger("rtnl", "ENOBUFS", overrun=True))
        await trio.sleep(1)
        backend.topo = B
        await backend.send.send(Trigger("rtnl", "link up2 added"))
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert len(reactor.reactions) == 2
    assert len(backend.deleted) == 2


async def test_failed_source_is_restarted(autojump_clock: trio.testing.MockClock) -> None:
    backend = FakeBackend()
    backend.fail_source_once = True
    async with trio.open_nursery() as nursery:
        reactor = await start(backend, nursery, restart_backoff=0.5)
        backend.send.close()  # the first subscription ends: the reactor must resubscribe
        await trio.sleep(3)
        nursery.cancel_scope.cancel()
    assert reactor.source_restarts >= 2
    assert backend.subscriptions >= 3
    # Each restart is treated as lost events: a reaction re-reads everything.
    assert reactor.reactions and all("restarted" in r.trigger for r in reactor.reactions)


async def test_bad_ruleset_keeps_previous(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    backend = FakeBackend()
    async with trio.open_nursery() as nursery:
        reactor = await start(backend, nursery)
        backend.ruleset_error = True
        backend.topo = B
        with caplog.at_level(logging.ERROR, logger="topowatch.reactor"):
            await backend.send.send(Trigger("nft", "ruleset changed"))
            await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert "ruleset unreadable, keeping the previous one: nft: syntax error" in [r.getMessage() for r in caplog.records]
    assert len(reactor.reactions) == 1
    assert len(backend.deleted) == 2


async def test_failed_first_ruleset_read_keeps_running_and_decides_nothing_until_read(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    backend = FakeBackend()
    backend.ruleset_error = True
    async with trio.open_nursery() as nursery:
        with caplog.at_level(logging.ERROR, logger="topowatch.reactor"):
            reactor = await start(backend, nursery)  # the daemon starts without a ruleset
            assert reactor.ruleset is None and backend.rulesets_read == 1
            assert any("ruleset unreadable at startup: nft: syntax error" in r.message for r in caplog.records)
            backend.topo = B  # a change that makes both entries stale, once there is a ruleset to judge by
            await backend.send.send(Trigger("rtnl", "link up2 added", kind="link"))
            await trio.sleep(1)
        assert backend.rulesets_read == 2  # the reaction tried again
        (skipped,) = reactor.reactions
        assert skipped.skipped == "no ruleset has been read yet (nft: syntax error)"
        assert skipped.plan.examined == 0 and backend.deleted == []
        assert "NOTHING DECIDED: no ruleset has been read yet" in skipped.summary()
        assert any("NOTHING DECIDED" in r.message for r in caplog.records)
        assert reactor.t0 == A  # kept: the change is judged once a ruleset is read
        assert reactor.errors == {"ruleset": 2}
        backend.ruleset_error = False
        await backend.send.send(Trigger("rtnl", "address added", kind="address"))
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert backend.rulesets_read == 3 and reactor.ruleset is not None
    decided = reactor.reactions[1]
    assert decided.skipped is None and "link up2 added" in decided.summary()
    assert len(backend.deleted) == 2


async def test_startup_sweep_without_a_ruleset_deletes_nothing(autojump_clock: trio.testing.MockClock) -> None:
    backend = FakeBackend()
    backend.topo = B
    backend.ruleset_error = True
    reactor = Reactor(backend, ReactorConfig(), predictor=stale_when_up2)
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert [r.trigger for r in reactor.reactions] == ["startup sweep"]
    assert reactor.reactions[0].skipped is not None and backend.deleted == []


def nft_doc(chain_name: Any) -> dict[str, Any]:
    return {"nftables": [
        {"table": {"family": "ip", "name": "nat", "handle": 1}},
        {"chain": {"family": "ip", "table": "nat", "name": chain_name, "handle": 1, "type": "nat",
                   "hook": "postrouting", "prio": 100, "policy": "accept"}},
        {"rule": {"family": "ip", "table": "nat", "chain": chain_name, "handle": 2,
                  "expr": [{"masquerade": None}]}},
    ]}


class JsonRulesetBackend(FakeBackend):
    """The ruleset is read from nft JSON by the real parser."""

    def __init__(self) -> None:
        super().__init__()
        self.doc = nft_doc("post")

    async def ruleset(self) -> NatRuleset:
        self.rulesets_read += 1
        return parse_ruleset_json(self.doc)


async def test_mistyped_ruleset_keeps_previous_model_and_loop_goes_on(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    backend = JsonRulesetBackend()
    async with trio.open_nursery() as nursery:
        reactor = await start(backend, nursery)
        good = reactor.ruleset
        assert good == parse_ruleset_json(nft_doc("post"))
        backend.doc = nft_doc(["post"])  # a chain name that is a list: parses as JSON, wrong type
        backend.topo = B
        with caplog.at_level(logging.ERROR, logger="topowatch.reactor"):
            await backend.send.send(Trigger("nftables", "ruleset changed", kind="ruleset"))
            await trio.sleep(1)
        assert reactor.ruleset is good  # the previous model stays in force
        assert reactor.errors == {"ruleset": 1}
        assert any('"name" must be a string, got a list' in r.message for r in caplog.records)
        assert len(reactor.reactions) == 1 and len(backend.deleted) == 2  # decided with the previous model
        backend.doc = nft_doc("post2")  # the daemon loop is still running: the next change is read
        await backend.send.send(Trigger("nftables", "ruleset changed", kind="ruleset"))
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert len(reactor.reactions) == 2
    assert reactor.ruleset == parse_ruleset_json(nft_doc("post2"))


async def test_cap_refuses(autojump_clock: trio.testing.MockClock) -> None:
    backend = FakeBackend()
    async with trio.open_nursery() as nursery:
        reactor = await start(backend, nursery, max_deletions=1)
        backend.topo = B
        await backend.send.send(Trigger("rtnl", "x"))
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert reactor.reactions[0].refused
    assert backend.deleted == []
    assert "REFUSED" in reactor.reactions[0].summary()


async def test_dry_run_deletes_nothing(autojump_clock: trio.testing.MockClock) -> None:
    backend = FakeBackend()
    async with trio.open_nursery() as nursery:
        reactor = await start(backend, nursery, dry_run=True)
        backend.topo = B
        await backend.send.send(Trigger("rtnl", "x"))
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert len(reactor.reactions[0].plan.stale) == 2
    assert backend.deleted == []


async def test_startup_sweep(autojump_clock: trio.testing.MockClock) -> None:
    backend = FakeBackend()
    backend.topo = B
    reactor = Reactor(backend, ReactorConfig(), predictor=stale_when_up2)
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert [r.trigger for r in reactor.reactions] == ["startup sweep"]
    assert len(backend.deleted) == 2


async def test_the_startup_sweep_waits_for_no_debounce_but_a_startup_burst_with_events_does(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Alone, the startup trigger has nothing to coalesce with: its latency is its own work (none
    # here, on the mock clock), not the 5 s quiet gap that events wait for.
    backend = FakeBackend()
    backend.topo = B
    reactor = Reactor(backend, ReactorConfig(debounce=5.0, max_wait=5.0), predictor=stale_when_up2)
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        await trio.sleep(1)
        assert [r.trigger for r in reactor.reactions] == ["startup sweep"]
        assert reactor.reactions[0].latency < 1.0
        # An event after it waits for its quiet gap, as any.
        await backend.send.send(Trigger("rtnl", "route added: x", kind="route"))
        await trio.sleep(4)
        assert len(reactor.reactions) == 1
        await trio.sleep(2)
        assert len(reactor.reactions) == 2
        nursery.cancel_scope.cancel()


async def test_source_that_cannot_subscribe_fails_startup() -> None:
    backend = FakeBackend()

    @contextlib.asynccontextmanager
    async def broken() -> AsyncIterator[AsyncIterator[Trigger]]:
        raise TopowatchError("cannot bind netlink socket")
        yield backend.recv  # pragma: no cover

    backend.events = broken  # type: ignore[method-assign]
    reactor = Reactor(backend, ReactorConfig(startup_sweep=False), predictor=stale_when_up2)
    with pytest.raises(BaseException) as info:
        async with trio.open_nursery() as nursery:
            await nursery.start(reactor.run)
    assert "cannot bind netlink socket" in repr(info.value)


# -- policies ------------------------------------------------------------------------------


def write_policy(tmp_path: Any, text: str) -> Any:
    from topowatch.policy import load_policies

    (tmp_path / "50-test.toml").write_text(text)
    tmp_path.chmod(0o755)
    (tmp_path / "50-test.toml").chmod(0o644)
    return load_policies([str(tmp_path)])


async def react_to_up2_added(reactor: Reactor, backend: FakeBackend) -> None:
    """Run ``reactor`` until up2 has been added (topology B) and the reaction to it is over."""
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        backend.topo = B
        await backend.send.send(Trigger("rtnl", "link up2 added", kind="link", interface="up2"))
        await trio.sleep(1)
        nursery.cancel_scope.cancel()


async def test_log_only_policy_deletes_nothing(autojump_clock: trio.testing.MockClock, tmp_path: Any) -> None:
    policy = write_policy(tmp_path, '[policy.watch]\naction = "log"\n')
    backend = FakeBackend()
    reactor = Reactor(backend, ReactorConfig(startup_sweep=False), predictor=stale_when_up2,
                      policy=lambda: policy)
    await react_to_up2_added(reactor, backend)
    assert backend.deleted == []
    assert reactor.reactions[0].logged_only == 2
    assert "2 logged only" in reactor.reactions[0].summary()
    assert "policy watch" in reactor.reactions[0].summary()


async def test_policy_triggers_select(
    autojump_clock: trio.testing.MockClock, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    policy = write_policy(tmp_path, '[policy.routes]\ntriggers = ["route"]\n')
    backend = FakeBackend()
    reactor = Reactor(backend, ReactorConfig(startup_sweep=False), predictor=stale_when_up2,
                      policy=lambda: policy)
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        backend.topo = B
        with caplog.at_level(logging.DEBUG, logger="topowatch.reactor"):
            await backend.send.send(Trigger("rtnl", "address added", kind="address", interface="up2"))
            await backend.send.send(Trigger("rtnl", "address removed", kind="address"))
            await trio.sleep(1)
        assert backend.deleted == []  # no policy is triggered by an address event
        # Named in the order of their text (an interface and none do not compare).
        assert "no policy is triggered by [('address', 'up2'), ('address', None)]" in [
            r.getMessage() for r in caplog.records]
        await backend.send.send(Trigger("rtnl", "route added", kind="route"))
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert len(backend.deleted) == 2
    assert [r.policies for r in reactor.reactions] == ["none", "routes"]


async def test_policy_debounce_is_used(autojump_clock: trio.testing.MockClock, tmp_path: Any) -> None:
    policy = write_policy(tmp_path, "[policy.slow]\ndebounce = 2.0\nmax_wait = 10.0\n")
    backend = FakeBackend()
    reactor = Reactor(backend, ReactorConfig(startup_sweep=False), predictor=stale_when_up2,
                      policy=lambda: policy)
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        await backend.send.send(Trigger("rtnl", "a", kind="route"))
        await trio.sleep(1.5)
        await backend.send.send(Trigger("rtnl", "b", kind="route"))  # within 2 s: same burst
        await trio.sleep(3)
        nursery.cancel_scope.cancel()
    assert [r.events for r in reactor.reactions] == [2]


class EventedRulesetBackend(FakeBackend):
    """Reports ruleset changes as triggers; dumps and decides in one pass like the kernel backend."""

    ruleset_events = True

    def __init__(self) -> None:
        super().__init__()
        self.judged = 0

    async def judge(
        self, eligibility: Eligibility, decider: Callable[[Any], Decider], early: Any = None
    ) -> Decider:
        self.judged += 1
        judging = decider(None)
        for e in self.table:
            judging.add(e)
        judging.timings.update({"kernel wait": 0.25, "judge": 0.0})  # as the kernel's backend times them
        return judging


async def test_ruleset_is_reread_only_when_it_may_have_changed(autojump_clock: trio.testing.MockClock) -> None:
    backend = EventedRulesetBackend()
    async with trio.open_nursery() as nursery:
        reactor = await start(backend, nursery)
        read_at_start = backend.rulesets_read
        await backend.send.send(Trigger("rtnetlink", "route added", kind="route"))
        await trio.sleep(1)
        assert backend.rulesets_read == read_at_start  # a route change leaves the ruleset alone
        await backend.send.send(Trigger("nftables", "generation 5", kind="ruleset"))
        await trio.sleep(1)
        assert backend.rulesets_read == read_at_start + 1
        await backend.send.send(Trigger("rtnetlink", "ENOBUFS", overrun=True, kind="route"))
        await trio.sleep(1)
        assert backend.rulesets_read == read_at_start + 2  # lost events: everything is re-read
        await backend.send.send(Trigger("dbus", "flush requested"))
        await trio.sleep(1)
        assert backend.rulesets_read == read_at_start + 3  # not a topology kind: re-read
        nursery.cancel_scope.cancel()
    assert len(reactor.reactions) == 4
    assert "ruleset" not in reactor.reactions[0].timings and reactor.reactions[1].timings["ruleset"] == 0.0


async def test_backend_without_ruleset_events_rereads_every_time(autojump_clock: trio.testing.MockClock) -> None:
    backend = FakeBackend()
    async with trio.open_nursery() as nursery:
        await start(backend, nursery)
        read_at_start = backend.rulesets_read
        await backend.send.send(Trigger("rtnetlink", "route added", kind="route"))
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert backend.rulesets_read == read_at_start + 1


async def test_streamed_dump_and_decide_is_used_when_offered(autojump_clock: trio.testing.MockClock) -> None:
    backend = EventedRulesetBackend()
    async with trio.open_nursery() as nursery:
        reactor = await start(backend, nursery)
        backend.topo = B
        await backend.send.send(Trigger("rtnetlink", "link up2 added", kind="link"))
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert backend.judged == 1
    assert len(backend.deleted) == 2 and backend.table == []
    # Read once, at start: a link event leaves it, and a backend that cannot tell of a change
    # in flight (no ``ruleset_unchanged``) is not read again before the deletes.
    assert backend.rulesets_read == 1
    assert "dump+decide" in reactor.reactions[0].timings
    # The backend's own phases join the record's (those it measured as zero do not), and being
    # inside dump+decide they are not taken from the latency again: the debounce wait stays.
    first = reactor.reactions[0]
    assert first.timings["kernel wait"] == 0.25 and "judge" not in first.timings
    assert first.debounce_wait() > 0


@pytest.mark.parametrize(("cap", "refused"), [(1, True), (2, False), (3, False)])
async def test_cap_is_a_maximum_two_stale_entries_fit_a_cap_of_two(
    autojump_clock: trio.testing.MockClock, cap: int, refused: bool
) -> None:
    """The backend holds two stale entries: a cap of 2 deletes both, a cap of 1 refuses."""
    backend = FakeBackend()
    async with trio.open_nursery() as nursery:
        reactor = await start(backend, nursery, max_deletions=cap)
        backend.topo = B
        await backend.send.send(Trigger("rtnl", "x"))
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    (reaction,) = reactor.reactions
    assert len(reaction.plan.stale) == 2
    assert reaction.refused is refused
    assert len(backend.deleted) == (0 if refused else 2)


async def test_an_entry_replied_between_judging_and_deleting_is_kept(autojump_clock: trio.testing.MockClock
                                                                      ) -> None:
    backend = FakeBackend()
    answered = backend.table[1]

    async def reply_arrives(entries: Sequence[Entry]) -> None:
        assert answered in entries  # judged stale while UNREPLIED
        backend.table[1] = Entry(answered.family, answered.proto, answered.orig, answered.reply,
                                 answered.status | IPS_SEEN_REPLY)

    async with trio.open_nursery() as nursery:
        reactor = await start(backend, nursery)
        reactor.before_delete = reply_arrives
        backend.topo = B
        await backend.send.send(Trigger("rtnl", "link up2 added", kind="link"))
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    (reaction,) = reactor.reactions
    assert [e.orig for e in backend.deleted] == [udp_entry(5060).orig]
    assert [e.orig for e in backend.table] == [answered.orig]
    assert (reaction.deleted.deleted, reaction.deleted.kept_replied) == (1, 1)
    assert "1 kept: replied since the dump" in reaction.summary()
    assert reaction.fields()["kept_replied"] == 1


async def test_history_is_bounded_and_only_the_latest_keeps_its_entries(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = FakeBackend()
    backend.topo = B
    n = HISTORY + 10
    async with trio.open_nursery() as nursery:
        reactor = await start(backend, nursery)
        for i in range(n):
            backend.table = [udp_entry(5060), udp_entry(5061)]
            await backend.send.send(Trigger("rtnl", f"route {i}"))
            await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert len(reactor.reactions) == HISTORY
    assert [r.number for r in reactor.reactions] == list(range(n - HISTORY + 1, n + 1))
    *older, latest = reactor.reactions
    assert all(r.plan.stale == () and r.stale_count == 2 and " 2 of 2 examined " in r.summary() for r in older)
    assert len(latest.plan.stale) == 2 and latest.counts is None
    totals = reactor.totals
    assert (totals.reactions, totals.deleted, totals.stale) == (n, 2 * n, 2 * n)


async def test_an_interrupted_dump_deletes_nothing_and_the_change_is_judged_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = FakeBackend()
    real_entries = backend.entries
    interrupted = [True]

    async def entries(eligibility: Eligibility) -> list[Entry]:
        if interrupted.pop() if interrupted else False:
            raise DumpInterrupted("conntrack dump interrupted 4 times: results may be inconsistent", 4)
        return await real_entries(eligibility)

    backend.entries = entries  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        reactor = await start(backend, nursery)
        backend.topo = B
        await backend.send.send(Trigger("rtnl", "link up2 added", kind="link"))
        await trio.sleep(1)
        assert backend.deleted == [] and reactor.errors == {"reaction": 1} and not reactor.reactions
        assert reactor.t0 is A  # the change was not judged: the next reaction judges it
        await backend.send.send(Trigger("rtnl", "route changed", kind="route"))
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    (reaction,) = reactor.reactions
    assert len(backend.deleted) == 2 and "link up2 added" in reaction.change.summary()


@pytest.mark.parametrize(
    ("policies", "replied_since", "mark_since", "deleted"),
    [
        ((Policy("default"),), True, 0, False),  # UNREPLIED only: a reply keeps it
        ((Policy("default"),), False, 0, True),
        ((Policy("all", eligibility=Eligibility(unreplied_only=False)),), True, 0, True),  # still admitted
        ((Policy("marked", eligibility=Eligibility(unreplied_only=False, marks=((1, 1),))),), False, 2, False),
        ((Policy("flush"), Policy("watch", eligibility=Eligibility(unreplied_only=False),
                                  action=Action.LOG)), True, 0, False),  # now only the logging one admits it
        ((Policy("flush"), Policy("watch", eligibility=Eligibility(unreplied_only=False),
                                  action=Action.LOG)), False, 0, True),  # the flushing one still admits it
        ((Policy("watch", action=Action.LOG),), False, 0, False),  # a policy that logs only: never deleted
    ],
)
def test_the_recheck_asks_the_active_policies_again(
    policies: tuple[Policy, ...], replied_since: bool, mark_since: int, deleted: bool
) -> None:
    dumped = replace(udp_entry(5060), mark=1, id=7)
    now = Reread(dumped.status | (IPS_SEEN_REPLY if replied_since else 0), 7, mark_since or dumped.mark)
    assert still_stale(Selection(policies))(dumped, now) is deleted


# -- the reaction's accounting and its line, worked out by hand -----------------------------------
# (issue 16, the mutation run of reactor.py: each expectation is written out, not computed)


def test_two_deletes_of_one_reaction_add_up_field_by_field() -> None:
    early = DeleteCounts(deleted=3, already_gone=1, failed=2, elapsed=0.5, errors=("e1",), kept_replied=4,
                         kept_changed=5, window_p99=0.002)
    tail = DeleteCounts(deleted=10, already_gone=20, failed=30, elapsed=0.25, errors=("e2", "e3"),
                        kept_replied=40, kept_changed=50, window_p99=0.001)
    assert _sum_counts(early, tail) == DeleteCounts(
        deleted=13, already_gone=21, failed=32, elapsed=0.75, errors=("e1", "e2", "e3"), kept_replied=44,
        kept_changed=55, window_p99=0.002)
    # The larger p99 either way round; one side's alone when the other deleted nothing.
    assert _sum_counts(replace(early, window_p99=0.001), replace(tail, window_p99=0.004)).window_p99 == 0.004
    assert _sum_counts(replace(early, window_p99=None), tail).window_p99 == 0.001
    assert _sum_counts(early, replace(tail, window_p99=None)).window_p99 == 0.002
    assert _sum_counts(replace(early, window_p99=None), replace(tail, window_p99=None)).window_p99 is None
    # No early deletes: the tail's counts as they are.
    assert _sum_counts(DeleteCounts(), tail) == tail
    assert _sum_counts(DeleteCounts(deleted=1), DeleteCounts()) == DeleteCounts(deleted=1)


def test_a_burst_counts_its_triggers_and_keeps_the_first_time() -> None:
    burst = Burst()
    burst.add(Trigger("rtnetlink", "route added: 10.0.0.0/8 dev lan", kind="route", interface="lan"), 5.0)
    burst.add(Trigger("nftables", "ruleset changed"), 6.5)  # no kind: its source names it
    assert (burst.count, burst.first, burst.overrun) == (2, 5.0, False)
    assert burst.kinds == {"route", "nftables"}
    assert burst.events == {("route", "lan"), ("nftables", None)}
    burst.add(Trigger("rtnetlink", "ENOBUFS", overrun=True, kind="route"), 7.0)
    burst.add(Trigger("rtnetlink", "route added: 10.0.0.0/8 dev lan", kind="route", interface="lan"), 8.0)
    assert (burst.count, burst.first, burst.overrun) == (4, 5.0, True)  # an overrun is never forgotten
    assert burst.lines == ["route added: 10.0.0.0/8 dev lan", "ruleset changed", "ENOBUFS"]  # once each
    assert burst.events == {("route", "lan"), ("nftables", None), ("route", None)}


def test_a_burst_names_eight_events_and_up_to_sixteen_with_requests() -> None:
    burst = Burst()
    for i in range(10):
        burst.add(Trigger("rtnetlink", f"route {i}", kind="route"), float(i))
    assert burst.lines == [f"route {i}" for i in range(8)]
    burst.add(Trigger("dbus", "Trigger() called"), 10.0)  # a request: named after the eight
    burst.add(Trigger("rtnetlink", "ENOBUFS", overrun=True), 11.0)  # lost events: named too
    burst.add(Trigger("rtnetlink", "route 10", kind="route"), 12.0)  # an event: not
    assert burst.lines[8:] == ["Trigger() called", "ENOBUFS"]
    for i in range(10):
        burst.add(Trigger("dbus", f"request {i}"), 13.0 + i)
    assert len(burst.lines) == 16 and burst.lines[-1] == "request 5"
    assert burst.count == 23


def test_a_burst_keeps_at_most_4096_events_but_every_kind() -> None:
    burst = Burst()
    for i in range(4100):
        burst.add(Trigger("rtnetlink", "link changed", kind="link", interface=f"veth{i}"), 1.0)
    assert len(burst.events) == 4096 and ("link", "veth4095") in burst.events
    assert ("link", "veth4096") not in burst.events
    burst.add(Trigger("xfrm", "xfrm policy added: x", kind="xfrm"), 2.0)
    assert "xfrm" in burst.kinds and ("xfrm", None) not in burst.events


def _reaction(**changes: Any) -> Reaction:
    """A reaction of 2.5 s, 0.3 s of it work outside the debounce wait ("judge" is inside "dump+decide")."""
    base: dict[str, Any] = {
        "number": 7, "trigger": "nftables ruleset changed", "events": 3, "change": TopologyChange(()),
        "plan": FlushPlan(examined=10, eligible=6), "deleted": DeleteCounts(), "refused": False, "dry_run": False,
        "latency": 2.5, "timings": {"snapshot": 0.1, "dump+decide": 0.2, "judge": 0.15, "kernel wait": 0.1},
        "counts": (5, 0)}  # fmt: skip
    base.update(changes)
    return Reaction(**base)


TOOK = "2500 ms incl. 2200 ms debounce"


@pytest.mark.parametrize(
    ("changes", "action"),
    [
        ({}, "0 deleted"),
        ({"refused": True, "logged_only": 1}, "REFUSED: 4 exceed the cap, nothing deleted, 1 logged only"),
        ({"refused": True, "dry_run": True}, "REFUSED: 5 exceed the cap, nothing deleted"),
        ({"dry_run": True, "logged_only": 2}, "dry run, 3 would be deleted, 2 logged only"),
        ({"deleted": DeleteCounts(deleted=3, already_gone=1, failed=2, kept_replied=4, kept_changed=5,
                                  window_p99=0.0012345)},
         "3 deleted, 1 already gone, 4 kept: replied since the dump, 5 kept: changed since the dump, 2 FAILED, "
         "re-check window p99 1.23 ms"),
        ({"deleted": DeleteCounts(deleted=5, window_p99=0.0)}, "5 deleted, re-check window p99 0.00 ms"),
        ({"counts": (5, 2), "deleted": DeleteCounts(deleted=5)}, "5 deleted, 2 undecided"),
        ({"plan": FlushPlan(examined=10, eligible=6, notes=("judged only flows to or from 192.0.2.0/24",))},
         "0 deleted (judged only flows to or from 192.0.2.0/24)"),
        ({"plan": FlushPlan(examined=10, eligible=6, notes=("a", "b"))}, "0 deleted (a; b)"),
    ],
)
def test_the_reactions_line_says_what_was_done(changes: dict[str, Any], action: str) -> None:
    reaction = _reaction(**changes)
    assert reaction.summary() == f"reaction 7 (nftables ruleset changed): 5 of 10 examined entries stale, {action}, {TOOK}"


def test_the_reactions_line_names_its_policies_and_what_was_not_decided() -> None:
    assert _reaction(policies="a, b").summary().startswith("reaction 7 (nftables ruleset changed) [policy a, b]: 5 of")
    assert _reaction(skipped="no ruleset has been read yet").summary() == (
        "reaction 7 (nftables ruleset changed): NOTHING DECIDED: no ruleset has been read yet, nothing deleted")
    assert _reaction(skipped="the ruleset changed", policies="x", deleted=DeleteCounts(deleted=2)).summary() == (
        "reaction 7 (nftables ruleset changed) [policy x]: NOTHING MORE DECIDED: the ruleset changed, "
        "2 deleted while the dump ran")
    assert _reaction(dumped=False, plan=FlushPlan(examined=0, eligible=0, notes=("no dump: x", "y"))).summary() == (
        f"reaction 7 (nftables ruleset changed): no dump: x; y, nothing deleted, {TOOK}")


def test_the_reactions_line_tells_the_change_once_and_cuts_a_long_cause() -> None:
    change = TopologyChange(("link up2 added", "route 192.0.2.0/24 via 203.0.113.1 dev up2 added"))
    reaction = _reaction(trigger="link up2 added, nftables ruleset changed, route added: 192.0.2.0/24 dev up2, "
                                 "Trigger() called", change=change)
    # The events are in the change; the other causes are named before it.
    assert reaction.summary().startswith(
        "reaction 7 (nftables ruleset changed, Trigger() called; link up2 added; "
        "route 192.0.2.0/24 via 203.0.113.1 dev up2 added): ")
    only_events = _reaction(trigger="link up2 added", change=TopologyChange(("link up2 added",)))
    assert only_events.summary().startswith("reaction 7 (link up2 added): ")
    assert _reaction(trigger="x" * 160).summary().startswith(f"reaction 7 ({'x' * 160}): ")
    assert _reaction(trigger="x" * 161).summary().startswith(f"reaction 7 ({'x' * 157}...): ")
    reaction = _reaction()
    assert reaction.summary() is reaction.summary()  # made once


def _decision(sport: int, code: ReasonCode, expected: Binding) -> Decision:
    return Decision(udp_entry(sport), Reason(code, "snat", actual=NO_NAT, expected=(expected,)))


MASQ2 = Binding(NatKind.MASQUERADE, IPv4Address("203.0.113.2"))
MASQ3 = Binding(NatKind.MASQUERADE, IPv4Address("203.0.113.3"))


def test_the_reactions_line_names_the_codes_of_what_it_deleted() -> None:
    one = [_decision(5060, ReasonCode.NULL_BINDING_NOW_NAT, MASQ2), _decision(5061, ReasonCode.NULL_BINDING_NOW_NAT, MASQ2)]
    plan = FlushPlan(examined=4, eligible=3, stale=one)
    assert _reaction(plan=plan, counts=None, deleted=DeleteCounts(deleted=2)).summary() == (
        "reaction 7 (nftables ruleset changed): 2 of 4 examined udp entries stale, 2 deleted "
        f"(null_binding_now_nat: source no NAT -> masquerade to 203.0.113.2), {TOOK}")
    two_changes = [one[0], _decision(5062, ReasonCode.NULL_BINDING_NOW_NAT, MASQ3)]
    assert "2 deleted (null_binding_now_nat), " in _reaction(
        plan=replace(plan, stale=two_changes), counts=None, deleted=DeleteCounts(deleted=2)).summary()
    codes = [*one, _decision(5063, ReasonCode.NAT_NOW_NONE, NO_NAT)]
    assert "3 deleted (2 null_binding_now_nat, 1 nat_now_none), " in _reaction(
        plan=replace(plan, stale=codes), counts=None, deleted=DeleteCounts(deleted=3)).summary()
    tcp = Decision(replace(udp_entry(5064), proto=6), one[0].why)
    assert ": 3 of 4 examined tcp/udp entries stale, " in _reaction(
        plan=replace(plan, stale=[*one, tcp]), counts=None).summary()


def test_the_reactions_record_has_every_count() -> None:
    reaction = _reaction(
        trigger="t", events=3, change=TopologyChange(("link up2 added",)), policies="a",
        plan=FlushPlan(examined=10, eligible=6, distinct_flows=4, notes=("n",), predicted=9,
                       stale=[_decision(5060, ReasonCode.NULL_BINDING_NOW_NAT, MASQ2)],
                       undecided=[_decision(5061, ReasonCode.NAT_NOW_NONE, NO_NAT)] * 2),
        counts=None, deleted=DeleteCounts(deleted=1, already_gone=2, failed=3, kept_replied=4, kept_changed=5,
                                          window_p99=0.0012345),
        logged_only=6, refused=True, dry_run=True, skipped="s", dumped=False, ended=12.34567891,
        latency=0.5004567, timings={"snapshot": 0.0001234, "dump+decide": 0.2, "judge": 0.15, "kernel wait": 0.1})
    fields = reaction.fields()
    assert fields == {
        "event": "reaction", "reaction": 7, "trigger": "t", "events": 3, "change": "link up2 added",
        "policies": "a", "examined": 10, "eligible": 6, "stale": 1, "deleted": 1, "already_gone": 2,
        "failed": 3, "kept_replied": 4, "kept_changed": 5, "recheck_window_p99_ms": 1.234, "undecided": 2,
        "logged_only": 6, "refused": True, "dry_run": True, "latency_ms": 500.457, "ended_monotonic": 12.345679,
        "debounce_ms": 300.333, "timings": {"snapshot": 0.123, "dump+decide": 200.0, "judge": 150.0,
                                            "kernel wait": 100.0},
        "skipped": "s", "stale_by_code": {"null_binding_now_nat": 1}, "undecided_by_code": {"nat_now_none": 2},
        "dumped": False, "notes": ["n"], "predicted": 9, "distinct_flows": 4,
    }  # fmt: skip
    assert _reaction().fields()["recheck_window_p99_ms"] is None
    assert _reaction(latency=0.1).debounce_wait() == 0.0  # never negative


def test_the_totals_add_up_over_reactions() -> None:
    totals = ReactionTotals()
    totals.add(_reaction(counts=(5, 2), refused=True, deleted=DeleteCounts(deleted=1, already_gone=2, failed=3,
                                                                           kept_replied=4)))
    totals.add(_reaction(counts=(10, 20), deleted=DeleteCounts(deleted=10, already_gone=20, failed=30,
                                                               kept_replied=40)))
    totals.add(_reaction(counts=(0, 0)))
    assert totals == ReactionTotals(reactions=3, deleted=11, already_gone=22, failed=33, refused=1, stale=15,
                                    undecided=22, kept_replied=44)


class GenerationBackend(EventedRulesetBackend):
    """Tells whether the ruleset changed since it was read (the kernel's generation id, as
    ``edges.kernel``); ``reads`` are the rulesets (or errors) its reads return, in order."""

    def __init__(self, unchanged: bool, reads: list[NatRuleset | Exception]) -> None:
        super().__init__()
        self.unchanged, self.reads = unchanged, reads
        self.asked = 0

    async def ruleset_unchanged(self) -> bool:
        self.asked += 1
        return self.unchanged

    async def ruleset(self) -> NatRuleset:
        self.rulesets_read += 1
        value = self.reads[min(self.rulesets_read, len(self.reads)) - 1]
        if isinstance(value, Exception):
            raise value
        return value


POST = parse_ruleset_json(nft_doc("post"))


@pytest.mark.parametrize(
    ("unchanged", "again", "reads", "deleted", "skipped", "errors"),
    [
        (True, None, 1, 2, None, {}),
        (False, NatRuleset(), 2, 2, None, {}),  # read again: the same NAT, the decisions stand
        (False, POST, 2, 0, "the ruleset changed during the reaction; the next reaction decides on the new one", {}),
        (False, RulesetError("nft: syntax error"), 2, 0,
         "the ruleset changed during the reaction and cannot be read again (nft: syntax error)", {"ruleset": 1}),
    ],
    ids=["unchanged", "same again", "swapped", "unreadable"],
)
async def test_a_ruleset_generation_that_moved_is_read_again_before_the_deletes(  # noqa: PLR0917 - a parametrized table
    unchanged: bool, again: NatRuleset | Exception | None, reads: int, deleted: int, skipped: str | None,
    errors: dict[str, int], autojump_clock: trio.testing.MockClock,
) -> None:
    first = NatRuleset()
    backend = GenerationBackend(unchanged, [first] if again is None else [first, again])
    async with trio.open_nursery() as nursery:
        reactor = await start(backend, nursery)
        backend.topo = B
        await backend.send.send(Trigger("rtnetlink", "link up2 added", kind="link"))
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    (reaction,) = reactor.reactions
    assert (backend.asked, backend.rulesets_read, len(backend.deleted)) == (1, reads, deleted)
    assert reaction.skipped == skipped and reactor.errors == errors
    # The ruleset read again is the one in force; an unreadable one leaves the first.
    assert reactor.ruleset is (POST if again is POST else first)
    assert reactor.t0 is (B if skipped is None else A)  # T0 stays where nothing was decided
    if skipped is not None:
        assert reaction.summary() == f"reaction 1 (link up2 added): NOTHING DECIDED: {skipped}, nothing deleted"


async def test_a_reaction_called_without_a_trigger_times_itself_from_its_start(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``react`` called directly with an empty burst (no trigger, no first event): its latency is
    its own, from its start (the snapshot alone takes 1 ms here), and it is named a request."""
    backend = FakeBackend()
    backend.ruleset_error = True
    reactor = Reactor(backend, ReactorConfig(startup_sweep=False), predictor=stale_when_up2)
    await trio.sleep(5)  # the clock is far from 0: a latency from 0 would be 5 s
    reaction = await reactor.react(Burst())
    assert reaction.skipped == "no ruleset has been read yet (nft: syntax error)"
    assert (reaction.trigger, reaction.events) == ("request", 0) and reaction.latency == pytest.approx(0.001)
    assert reaction.change.lines == ("initial snapshot",)  # no T0 yet (``run`` takes one first)


def unknown_snat(ruleset: Any, fib: Fib, flow: Flow) -> Prediction:
    """A source NAT the evaluator cannot predict (a set it cannot read), the same egress always."""
    return Prediction(dnat=frozenset({NO_NAT}), snat=Unknown("a set that cannot be read"), egress=())


@pytest.mark.parametrize(
    ("again", "undecided"),
    [
        (parse_ruleset_json(nft_doc("post")), 2),  # another ruleset: an unchanged egress says nothing
        (NatRuleset(), 0),  # read again, equal (another value): the egress alone decides, unchanged
    ],
    ids=["changed", "read again"],
)
async def test_an_unpredictable_nat_is_undecided_only_where_the_ruleset_changed_since_t0(
    again: NatRuleset, undecided: int, autojump_clock: trio.testing.MockClock,
) -> None:
    first = NatRuleset()
    backend = GenerationBackend(True, [first, again])
    reactor = Reactor(backend, ReactorConfig(startup_sweep=False), predictor=unknown_snat)
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        assert reactor.ruleset_t0 is first
        await backend.send.send(Trigger("nftables", "ruleset changed", kind="ruleset"))
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    (reaction,) = reactor.reactions
    assert reactor.ruleset is again and reactor.ruleset_t0 is again
    assert reaction.plan.stale == () and backend.deleted == []
    assert [(d.code, d.why.ruleset_changed) for d in reaction.plan.undecided] == [("unknown_nat", True)] * undecided


async def test_a_reaction_called_without_a_trigger_and_stopped_by_a_ruleset_swap_times_itself(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """As above, for a reaction that decided, then found the ruleset swapped before its deletes."""
    backend = GenerationBackend(False, [NatRuleset(), POST])
    backend.topo = B
    reactor = Reactor(backend, ReactorConfig(startup_sweep=False), predictor=stale_when_up2)
    await trio.sleep(5)
    reaction = await reactor.react(Burst())
    assert reaction.skipped == "the ruleset changed during the reaction; the next reaction decides on the new one"
    assert (reaction.trigger, reaction.events) == ("request", 0) and reaction.latency == pytest.approx(0.001)
    assert backend.deleted == [] and reactor.ruleset is POST and reaction.change.lines == ("initial snapshot",)
    # Decided and deleted, the same way.
    backend = GenerationBackend(True, [NatRuleset()])
    backend.topo = B
    reactor = Reactor(backend, ReactorConfig(startup_sweep=False), predictor=stale_when_up2)
    reaction = await reactor.react(Burst())
    assert reaction.skipped is None and reaction.deleted.deleted == 2 and reaction.change.lines == ("initial snapshot",)
    assert reaction.latency == pytest.approx(0.001) and reactor.t0 is B and reaction.trigger == "request"
    # Each phase it went through, on the virtual clock: only the snapshot (1 ms) takes time, and
    # "kernel wait" is the backend's own (0.25 s, inside dump+decide). No T0: no impact phase.
    assert reaction.timings == {"snapshot": pytest.approx(0.001), "ruleset": 0.0, "fib": 0.0, "classes": 0.0,
                                "dump+decide": 0.0, "kernel wait": 0.25, "delete": 0.0, "window": 0.0}


OLD_RULES = parse_ruleset_json(nft_doc("old"))
MASQUERADE = frozenset({Binding(NatKind.MASQUERADE, IPv4Address("203.0.113.2"))})


def two_ways_in(ruleset: Any, fib: Fib, flow: Flow) -> Prediction:
    """The flow may enter on lan or on wan. On lan it gets no source NAT; on wan it is masqueraded,
    except under OLD_RULES (the ruleset of T0), where wan gave no NAT either."""
    assert fib.topology is not None and flow.dst == IPv4Address("192.0.2.10")
    lan = Prediction(dnat=frozenset({NO_NAT}), snat=frozenset({NO_NAT}), egress=(), ingress=Ingress(2, "lan"))
    wan_snat = frozenset({NO_NAT}) if ruleset is OLD_RULES else MASQUERADE
    wan = Prediction(dnat=frozenset({NO_NAT}), snat=wan_snat, egress=(), ingress=Ingress(3, "wan"))
    return Prediction(dnat=frozenset({NO_NAT}), snat=lan.snat | wan_snat, egress=(), alternatives=(lan, wan))


async def test_the_ways_an_entry_came_are_judged_by_the_ruleset_of_t0(autojump_clock: trio.testing.MockClock) -> None:
    """Two entries without source NAT; the ruleset now masquerades flows that enter on wan, and T0's
    (OLD_RULES) did not. Entering on lan they are healthy now; on wan they would be stale, and under
    T0's ruleset they could have come that way with their bindings: undecided (unknown ingress).
    Judged by the new ruleset as if it were T0's, no way would have given them their bindings then."""
    new = NatRuleset()
    backend = GenerationBackend(True, [OLD_RULES, new])
    # Both NAT hooks ran (an entry made before a hook had a chain says nothing of T0: "older").
    backend.table = [replace(e, status=e.status | IPS_DST_NAT_DONE) for e in backend.table]
    reactor = Reactor(backend, ReactorConfig(startup_sweep=False), predictor=two_ways_in)
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        await backend.send.send(Trigger("nftables", "ruleset changed", kind="ruleset"))
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    (reaction,) = reactor.reactions
    assert reaction.plan.stale == () and backend.deleted == []
    assert [(d.entry.orig.sport, d.code, d.why.history) for d in reaction.plan.undecided] == [
        (5060, "unknown_ingress", "snapshot"), (5061, "unknown_ingress", "snapshot")]


async def test_flows_are_predicted_one_by_one_where_the_classes_cannot_be_exact(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """NETMAP maps each address on its own: no flow classes, and the debug log says why."""
    from topowatch.core.nat import Chain, Hook, NetmapStatement, Rule

    rule = Rule(1, (NetmapStatement(IPv4Network("10.9.0.0/16"), "NETMAP --to 10.9.0.0/16"),))
    chain = Chain("ip", "nat", "PREROUTING", (rule,), Hook.PREROUTING, -100, "nat", "accept")
    backend = GenerationBackend(True, [NatRuleset((chain,))])
    backend.topo = B
    reactor = Reactor(backend, ReactorConfig(startup_sweep=False), predictor=stale_when_up2)
    with caplog.at_level(logging.DEBUG, logger="topowatch.reactor"):
        reaction = await reactor.react(Burst())
    assert reaction.deleted.deleted == 2
    messages = [r.getMessage() for r in caplog.records]
    assert "flows are predicted one by one: NETMAP --to 10.9.0.0/16 maps addresses bit by bit" in messages
    with caplog.at_level(logging.DEBUG, logger="topowatch.reactor"):
        caplog.clear()
        await _react_once_with_exact_classes()
    assert not any(m.startswith("flows are predicted one by one") for m in (r.getMessage() for r in caplog.records))


async def _react_once_with_exact_classes() -> None:
    backend = GenerationBackend(True, [NatRuleset()])
    await Reactor(backend, ReactorConfig(startup_sweep=False), predictor=stale_when_up2).react(Burst())


def port_rules(field: str) -> NatRuleset:
    """A nat chain whose rule reads ``udp <field> 1000``: the flow classes of T0's ruleset split there."""
    return parse_ruleset_json({"nftables": [
        {"table": {"family": "ip", "name": "nat", "handle": 1}},
        {"chain": {"family": "ip", "table": "nat", "name": "post", "handle": 2, "type": "nat",
                   "hook": "postrouting", "prio": 100, "policy": "accept"}},
        {"rule": {"family": "ip", "table": "nat", "chain": "post", "handle": 3, "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": field}}, "right": 1000}},
            {"masquerade": None}]}},
    ]})  # fmt: skip


def flow_entry(sport: int, dport: int) -> Entry:
    """An UNREPLIED udp flow from 10.0.1.2 to 192.0.2.10, no NAT on either side (both hooks ran)."""
    src, dst = IPv4Address("10.0.1.2"), IPv4Address("192.0.2.10")
    return Entry(AF_INET, 17, CtTuple(src, dst, sport, dport), CtTuple(dst, src, dport, sport),
                 status=IPS_CONFIRMED | IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE)  # fmt: skip


def wan_gave_no_nat_on_port_1000(field: str, old: NatRuleset) -> Callable[[Any, Fib, Flow], Prediction]:
    """``two_ways_in``, where under ``old`` wan gave no NAT to port 1000 (``field``) alone."""

    def predictor(ruleset: Any, fib: Fib, flow: Flow) -> Prediction:
        port = flow.sport if field == "sport" else flow.dport
        lan = Prediction(dnat=frozenset({NO_NAT}), snat=frozenset({NO_NAT}), egress=(), ingress=Ingress(2, "lan"))
        wan_snat = frozenset({NO_NAT}) if ruleset is old and port == 1000 else MASQUERADE
        wan = Prediction(dnat=frozenset({NO_NAT}), snat=wan_snat, egress=(), ingress=Ingress(3, "wan"))
        return Prediction(dnat=frozenset({NO_NAT}), snat=lan.snat | wan_snat, egress=(), alternatives=(lan, wan))

    return predictor


def on_port_1000_and_1001(field: str) -> tuple[Entry, Entry]:
    if field == "sport":
        return flow_entry(1000, 53), flow_entry(1001, 53)
    return flow_entry(40000, 1000), flow_entry(40000, 1001)


@pytest.mark.parametrize("field", ["sport", "dport"])
async def test_the_flow_classes_of_a_reaction_follow_the_ruleset_of_t0_too(
    field: str, autojump_clock: trio.testing.MockClock,
) -> None:
    """T0's ruleset gave flows entering on wan no source NAT on port 1000 (``field``) only; the new
    one masquerades every flow from wan and reads no port. The flow on port 1000 may have come in
    on wan with its bindings then: undecided. The one on port 1001 could not (wan masqueraded it
    then too): it came in on lan, healthy. Classes of the new ruleset alone would merge the two."""
    old = port_rules(field)
    predictor = wan_gave_no_nat_on_port_1000(field, old)
    backend = GenerationBackend(True, [old, NatRuleset()])
    on_1000, on_1001 = on_port_1000_and_1001(field)
    for table in ([on_1000, on_1001], [on_1001, on_1000]):  # whichever the dump gives first
        backend.table = table
        reactor = Reactor(backend, ReactorConfig(startup_sweep=False), predictor=predictor)
        backend.rulesets_read = 0
        async with trio.open_nursery() as nursery:
            await nursery.start(reactor.run)
            await backend.send.send(Trigger("nftables", "ruleset changed", kind="ruleset"))
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
        (reaction,) = reactor.reactions
        assert reaction.plan.stale == ()
        assert [(d.entry, d.code) for d in reaction.plan.undecided] == [(on_1000, "unknown_ingress")]


async def test_a_ruleset_first_read_after_start_stands_for_t0s(autojump_clock: trio.testing.MockClock) -> None:
    """The ruleset could not be read at start: T0 has none of its own. The first ruleset read is
    the best word on T0's, so an unpredictable NAT whose egress did not move is not undecided."""
    backend = GenerationBackend(True, [RulesetError("nft: syntax error"), NatRuleset()])
    reactor = Reactor(backend, ReactorConfig(startup_sweep=False), predictor=unknown_snat)
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        assert reactor.ruleset is None and reactor.ruleset_t0 is None
        await backend.send.send(Trigger("rtnetlink", "route added", kind="route"))
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    (reaction,) = reactor.reactions
    assert reaction.skipped is None and reaction.plan.examined == 2
    assert reaction.plan.stale == () and reaction.plan.undecided == ()
    assert reactor.ruleset_t0 is reactor.ruleset is backend.reads[1]


async def test_a_reaction_that_decided_nothing_is_recorded_whole(autojump_clock: trio.testing.MockClock) -> None:
    """No ruleset yet: the reaction examines nothing, and its record says so field by field."""
    backend = FakeBackend()
    backend.ruleset_error = True
    async with trio.open_nursery() as nursery:
        reactor = await start(backend, nursery, dry_run=True, debounce=0.25, max_wait=3.0)
        await backend.send.send(Trigger("rtnetlink", "route added: a", kind="route"))
        await backend.send.send(Trigger("rtnetlink", "route added: b", kind="route"))
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    (reaction,) = reactor.reactions
    why = "no ruleset has been read yet (nft: syntax error)"
    fields = reaction.fields()
    assert {k: fields[k] for k in ("trigger", "events", "policies", "examined", "eligible", "stale", "refused",
                                   "dry_run", "skipped", "dumped", "notes")} == {
        "trigger": "route added: a, route added: b", "events": 2, "policies": "default", "examined": 0,
        "eligible": 0, "stale": 0, "refused": False, "dry_run": True, "skipped": why, "dumped": True,
        "notes": [why]}  # fmt: skip
    # From the first event: the 0.25 s quiet gap, then the snapshot's 1 ms.
    assert reaction.latency == pytest.approx(0.251)


async def test_each_ruleset_trigger_is_counted(autojump_clock: trio.testing.MockClock) -> None:
    reactor = Reactor(FakeBackend(), ReactorConfig(startup_sweep=False))
    for _ in range(3):
        reactor.push(Trigger("nftables", "ruleset changed", kind="ruleset"))
    reactor.push(Trigger("rtnetlink", "route added", kind="route"))
    assert reactor._ruleset_changes == 3


def test_a_brief_reaction_keeps_counts_and_eight_change_lines() -> None:
    stale = [_decision(5060 + i, ReasonCode.NULL_BINDING_NOW_NAT, MASQ2) for i in range(3)]
    full = _reaction(counts=None, plan=FlushPlan(examined=9, eligible=9, stale=stale, undecided=stale[:1]),
                     change=TopologyChange(tuple(f"route {i} added" for i in range(10))))
    brief = full.brief()
    assert (brief.plan.stale, brief.plan.undecided, brief.counts) == ((), (), (3, 1))
    assert brief.change.lines == (*(f"route {i} added" for i in range(7)), "... 3 more changes")
    assert (brief.stale_count, brief.undecided_count, brief.brief()) == (3, 1, brief)
    eight = _reaction(change=TopologyChange(tuple(f"route {i} added" for i in range(8))), counts=None)
    assert eight.brief().change.lines == tuple(f"route {i} added" for i in range(8))


async def test_failing_observers_are_counted_and_logged_and_the_reactions_go_on(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """``t0_hook`` (the snapshot file) and a reaction observer that raise: each error is counted
    by kind and logged, ``on_reaction`` still gets the reaction, and the next one is made."""
    told: list[tuple[int, bool]] = []
    got: list[Any] = []

    def t0_hook(t0: Topology, ruleset: Any, number: int, judged: bool) -> None:
        told.append((number, judged))
        if number == 1:
            raise OSError(28, "No space left on device")

    def observer(reaction: Any) -> None:
        raise RuntimeError("observer down")

    backend = FakeBackend()
    reactor = Reactor(backend, ReactorConfig(startup_sweep=False), predictor=stale_when_up2, on_reaction=got.append)
    reactor.t0_hook = t0_hook
    reactor.reaction_hooks.append(observer)
    async with trio.open_nursery() as nursery:
        with caplog.at_level(logging.ERROR, logger="topowatch.reactor"):
            await nursery.start(reactor.run)
            backend.topo = B
            await backend.send.send(Trigger("rtnetlink", "link up2 added", kind="link"))
            await trio.sleep(1)
            await backend.send.send(Trigger("rtnetlink", "address added", kind="address"))
            await trio.sleep(1)
        nursery.cancel_scope.cancel()
    # At start (no reaction: judged with no previous snapshot), then each reaction's new T0
    # (the fake backend reads a new ruleset value each time): judged against the one before.
    assert told == [(0, False), (1, True), (2, True)]
    assert [r.number for r in got] == [1, 2] and got[-1] is reactor.reactions[-1]  # the first one whole, since made brief
    assert reactor.errors == {"snapshot": 1, "hook": 2}
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("telling the new T0 failed") == 1
    assert messages.count(f"reaction observer {observer!r} failed") == 2
