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

from topowatch.core.conntrack import IPS_CONFIRMED, IPS_SEEN_REPLY, IPS_SRC_NAT_DONE, CtTuple, Entry, Reread
from topowatch.core.decide import Decider
from topowatch.core.eligibility import Eligibility
from topowatch.core.fib import Fib
from topowatch.core.flow import NO_NAT, Binding, Flow, NatKind, Prediction
from topowatch.core.model import AF_INET, Link, Route, Topology
from topowatch.core.nat import NatRuleset
from topowatch.edges.nft import parse_ruleset_json
from topowatch.errors import DumpInterrupted, RulesetError, TopowatchError
from topowatch.policy import Action, Policy, Selection
from topowatch.reactor import HISTORY, DeleteCounts, Reactor, ReactorConfig, StillStale, Trigger, still_stale

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


async def test_bad_ruleset_keeps_previous(autojump_clock: trio.testing.MockClock) -> None:
    backend = FakeBackend()
    async with trio.open_nursery() as nursery:
        reactor = await start(backend, nursery)
        backend.ruleset_error = True
        backend.topo = B
        await backend.send.send(Trigger("nft", "ruleset changed"))
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
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


async def test_log_only_policy_deletes_nothing(autojump_clock: trio.testing.MockClock, tmp_path: Any) -> None:
    policy = write_policy(tmp_path, '[policy.watch]\naction = "log"\n')
    backend = FakeBackend()
    reactor = Reactor(backend, ReactorConfig(startup_sweep=False), predictor=stale_when_up2,
                      policy=lambda: policy)
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        backend.topo = B
        await backend.send.send(Trigger("rtnl", "link up2 added", kind="link", interface="up2"))
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert backend.deleted == []
    assert reactor.reactions[0].logged_only == 2
    assert "2 logged only" in reactor.reactions[0].summary()
    assert "policy watch" in reactor.reactions[0].summary()


async def test_policy_triggers_select(autojump_clock: trio.testing.MockClock, tmp_path: Any) -> None:
    policy = write_policy(tmp_path, '[policy.routes]\ntriggers = ["route"]\n')
    backend = FakeBackend()
    reactor = Reactor(backend, ReactorConfig(startup_sweep=False), predictor=stale_when_up2,
                      policy=lambda: policy)
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        backend.topo = B
        await backend.send.send(Trigger("rtnl", "address added", kind="address"))
        await trio.sleep(1)
        assert backend.deleted == []  # no policy is triggered by an address event
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
    assert "ruleset" not in reactor.reactions[0].timings and "ruleset" in reactor.reactions[1].timings


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
    ],
)
def test_the_recheck_asks_the_active_policies_again(
    policies: tuple[Policy, ...], replied_since: bool, mark_since: int, deleted: bool
) -> None:
    dumped = replace(udp_entry(5060), mark=1, id=7)
    now = Reread(dumped.status | (IPS_SEEN_REPLY if replied_since else 0), 7, mark_since or dumped.mark)
    assert still_stale(Selection(policies))(dumped, now) is deleted
