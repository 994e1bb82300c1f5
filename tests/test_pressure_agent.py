"""The pressure agent on a fake table and fake sysctls: what it lowers, evicts, restores and recovers."""

from __future__ import annotations

import logging
from dataclasses import replace
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from topowatch.core.conntrack import IPS_ASSURED, IPS_SEEN_REPLY, CtTuple, Entry
from topowatch.core.flow import IPPROTO_TCP, IPPROTO_UDP
from topowatch.core.model import AF_INET
from topowatch.core.pressure import Candidate, PressurePolicy, Protection, State
from topowatch.edges.ctfake import FakeConntrack
from topowatch.edges.sysctl import ConntrackSysctl, LedgerRecord, TableSize, TimeoutLedger, sysctl_name
from topowatch.pressure import PressureAgent, PressureEvent

MAX = 100
TIMEOUTS = {"udp": 30, "udp_stream": 120, "tcp_syn_sent": 120, "tcp_syn_recv": 60, "icmp": 30,
            "icmpv6": 30, "generic": 600}


class TableSysctl(ConntrackSysctl):
    """Timeouts in files under a temporary root; the count is the fake table's size."""

    def __init__(self, root: Path, ct: FakeConntrack) -> None:
        super().__init__(str(root))
        self.ct = ct
        for name, value in TIMEOUTS.items():
            (root / sysctl_name(name)).write_text(f"{value}\n")

    def table(self) -> TableSize:
        return TableSize(len(self.ct.table), MAX, MAX)

    def value(self, name: str) -> int:
        return self.read(sysctl_name(name))


def entry(n: int, *, status: int = 0, timeout: int = 30, proto: int = IPPROTO_UDP, zone: int = 0,
          src: str | None = None) -> Entry:
    s = ip_address(src or f"10.0.{n >> 8}.{n & 255}")
    d = ip_address("192.0.2.1")
    return Entry(AF_INET, proto, CtTuple(s, d, 1000 + n, 53), CtTuple(d, s, 53, 1000 + n),
                 status, zone, 0, 0, timeout)


POLICY = PressurePolicy(
    enabled=True, high=0.9, low=0.6, lower_timeouts=(("udp", 10), ("generic", 60)),
    evict_replied=frozenset({IPPROTO_UDP}), protect=Protection(zones=frozenset({9}),
                                                               prefixes=(ip_network("10.9.0.0/16"),)),
    batch=1000, rate=100_000,
)  # fmt: skip


def agent_for(tmp_path: Path, table: list[Entry], policy: PressurePolicy = POLICY
              ) -> tuple[PressureAgent, FakeConntrack, TableSysctl, list[PressureEvent]]:
    ct = FakeConntrack(table)
    root = tmp_path / "sys"
    root.mkdir(exist_ok=True)
    sysctl = TableSysctl(root, ct)
    current = {"policy": policy}
    agent = PressureAgent(lambda: current["policy"], sysctl=sysctl,
                          ledger=TimeoutLedger(str(tmp_path / "run" / "pressure-test.json")),
                          conntrack=lambda: ct)  # type: ignore[arg-type, return-value]
    events: list[PressureEvent] = []
    agent.hooks.append(events.append)
    return agent, ct, sysctl, events


def full_table() -> list[Entry]:
    """95 entries: 20 UNREPLIED udp of various ages, 5 protected, 40 assured udp, 30 established tcp."""
    table = [entry(i, timeout=1 + i) for i in range(20)]  # idle 29 .. 10 s
    table += [entry(100 + i, timeout=1, zone=9 if i < 3 else 0, src="10.9.0.1" if i >= 3 else None)
              for i in range(5)]  # oldest of all, but protected
    table += [entry(200 + i, status=IPS_SEEN_REPLY | IPS_ASSURED, timeout=20 + i) for i in range(40)]
    table += [entry(300 + i, proto=IPPROTO_TCP, status=IPS_SEEN_REPLY | IPS_ASSURED, timeout=1)
              for i in range(30)]
    return table


def test_pressure_lowers_timeouts_evicts_unreplied_oldest_first_and_restores(tmp_path: Path) -> None:
    agent, ct, sysctl, events = agent_for(tmp_path, full_table())
    step = agent.tick()
    assert step.started and agent.state is State.HIGH
    assert (sysctl.value("udp"), sysctl.value("generic"), sysctl.value("icmp")) == (10, 60, 30)
    assert TimeoutLedger(agent.ledger.path).load() == LedgerRecord({"udp": 30, "generic": 600},
                                                                   {"udp": 10, "generic": 60})
    # Budget 95 - 60 = 35, but nothing is refused yet: only the 20 UNREPLIED unprotected entries go.
    remaining = {e.orig.sport - 1000 for e in ct.table}
    assert remaining.isdisjoint(range(20))
    assert set(range(100, 105)) <= remaining  # protected
    assert len(ct.table) == 75
    assert [e.kind for e in events] == ["start", "timeouts", "evict"]
    assert "20 UNREPLIED udp" in events[2].summary
    assert "95 % full" not in events[0].summary and "95% full (95/100)" in events[0].summary

    # The kernel starts refusing new flows: the last resort opens, oldest assured udp first.
    ct.counters["drop"] = 7
    step = agent.tick()
    assert step.refused == 7 and step.replied_allowed
    remaining = {e.orig.sport - 1000 for e in ct.table}
    assert len(ct.table) == 60  # down to the low mark: 15 more
    assert remaining.isdisjoint(range(200, 215))  # the 15 with the least time left went
    assert set(range(215, 240)) <= remaining
    assert set(range(300, 330)) <= remaining  # established tcp never
    assert set(range(100, 105)) <= remaining  # protected never

    step = agent.tick()  # at the low mark: pressure ends, timeouts back to exactly what they were
    assert step.ended and agent.state is State.NORMAL
    assert (sysctl.value("udp"), sysctl.value("generic")) == (30, 600)
    assert TimeoutLedger(agent.ledger.path).load() is None
    assert events[-1].kind == "end" and events[-2].kind == "timeouts"
    assert agent.status()["evicted"] == 35
    assert agent.status()["evicted_by_class"] == {"UNREPLIED udp": 20, "replied udp": 15}


def test_no_pressure_no_action(tmp_path: Path) -> None:
    agent, ct, sysctl, events = agent_for(tmp_path, full_table()[:80])
    step = agent.tick()
    assert step.state is State.NORMAL and step.budget == 0
    assert len(ct.table) == 80 and sysctl.value("udp") == 30 and events == []
    assert not Path(agent.ledger.path).exists()


def test_a_timeout_changed_by_an_admin_meanwhile_is_left_alone(tmp_path: Path) -> None:
    agent, ct, sysctl, _ = agent_for(tmp_path, full_table())
    agent.tick()
    sysctl.write(sysctl_name("udp"), 15)  # an admin's change while under pressure
    for e in list(ct.table)[:40]:
        ct.delete([e])
    agent.tick()
    assert agent.state is State.NORMAL
    assert (sysctl.value("udp"), sysctl.value("generic")) == (15, 600)


def test_crash_recovery_restores_what_a_previous_run_lowered(tmp_path: Path) -> None:
    agent, _, sysctl, _ = agent_for(tmp_path, full_table())
    agent.tick()
    assert sysctl.value("udp") == 10
    # The process dies here (SIGKILL): nothing restored. A new agent starts in the same namespace.
    again, _, sysctl2, _ = agent_for(tmp_path, [])
    assert sysctl2.value("udp") == 30  # (fresh fake files)
    sysctl2.set_timeouts({"udp": 10, "generic": 60})  # what the killed run left in the kernel
    again.recover()
    assert (sysctl2.value("udp"), sysctl2.value("generic")) == (30, 600)
    assert not Path(again.ledger.path).exists()


async def test_shutdown_restores_and_disabled_agent_never_wakes(tmp_path: Path,
                                                                autojump_clock: trio.testing.MockClock) -> None:
    agent, ct, sysctl, _ = agent_for(tmp_path, full_table())
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        while agent.counters.evicted == 0:  # the first tick lowers, then evicts
            await trio.sleep(0.01)
        assert sysctl.value("udp") == 10
        nursery.cancel_scope.cancel()
    assert sysctl.value("udp") == 30 and not Path(agent.ledger.path).exists()

    current: dict[str, Any] = {"policy": PressurePolicy(enabled=False)}
    idle = PressureAgent(lambda: current["policy"], sysctl=sysctl, ledger=agent.ledger,
                         conntrack=lambda: ct)  # type: ignore[arg-type, return-value]
    async with trio.open_nursery() as nursery:
        await nursery.start(idle.run)
        await trio.sleep(3600)
        assert idle.counters.ticks == 0  # an hour without a single look: the policy did not ask
        current["policy"] = POLICY
        idle.policy_changed()
        while idle.counters.ticks == 0:
            await trio.sleep(0.01)
        assert idle.counters.ticks == 1
        nursery.cancel_scope.cancel()


async def test_a_failing_tick_is_counted_and_the_agent_goes_on(tmp_path: Path,
                                                               autojump_clock: trio.testing.MockClock) -> None:
    agent, _, sysctl, _ = agent_for(tmp_path, full_table())
    (Path(sysctl.root) / sysctl_name("udp")).unlink()
    broken = {"n": 0}
    real = agent.read_sample

    def flaky() -> Any:
        broken["n"] += 1
        if broken["n"] == 1:
            from topowatch.edges.sysctl import SysctlError

            raise SysctlError("cannot read nf_conntrack_count: gone")
        return real()

    agent.read_sample = flaky  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        while agent.counters.ticks < 2:
            await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    assert agent.counters.errors == 1 and agent.counters.episodes == 1


@pytest.mark.parametrize("fill", [0, 50, 89])
def test_below_the_high_mark_the_table_is_never_dumped(tmp_path: Path, fill: int) -> None:
    agent, ct, _, _ = agent_for(tmp_path, full_table()[:fill])
    agent.tick()
    assert ct.requests == 1  # the stats request only


class SmallHashSysctl(TableSysctl):
    """A table whose hash has fewer buckets than entries it may hold."""

    def table(self) -> TableSize:
        return TableSize(len(self.ct.table), MAX, int((Path(self.root) / "nf_conntrack_buckets").read_text()))


def test_resize_buckets_raises_the_hash_to_one_bucket_per_entry(tmp_path: Path) -> None:
    from dataclasses import replace

    agent, ct, _, _ = agent_for(tmp_path, full_table(), replace(POLICY, resize_buckets=True))
    root = tmp_path / "sys"
    (root / "nf_conntrack_buckets").write_text("16\n")
    agent.sysctl = SmallHashSysctl(root, ct)
    agent.tick()
    assert (root / "nf_conntrack_buckets").read_text() == f"{MAX}\n"


def test_resize_refused_is_said_once_and_pressure_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    from dataclasses import replace

    agent, ct, _, _ = agent_for(tmp_path, full_table(), replace(POLICY, resize_buckets=True))
    root = tmp_path / "sys"
    (root / "nf_conntrack_buckets").mkdir()  # unwritable as a file: the kernel's EACCES in a namespace
    agent.sysctl = type("S", (TableSysctl,), {"table": lambda self: TableSize(len(ct.table), MAX, 16)})(root, ct)
    agent.tick()  # pressure starts: the resize is refused
    for e in list(ct.table)[:40]:
        ct.delete([e])
    assert agent.tick().ended
    ct.create([entry(900 + i) for i in range(60)])
    assert agent.tick().started  # a second episode: not said again
    said = [r for r in caplog.records if "cannot raise the hash table" in r.getMessage()]
    assert len(said) == 1 and "sysctl net.netfilter.nf_conntrack_buckets=100" in said[0].getMessage()
    assert agent.counters.episodes == 2 and agent.counters.evicted == 20 + 35  # evictions went on regardless


def test_metrics_count_pressure_episodes_evictions_and_timeout_changes(tmp_path: Path) -> None:
    from topowatch.metrics import Metrics

    agent, ct, _, _ = agent_for(tmp_path, full_table())
    metrics = Metrics(sysctl_dir=str(tmp_path / "sys"))
    agent.hooks.append(metrics.observe_pressure)
    metrics.pressure_state = lambda: agent.state.value
    agent.tick()
    text = metrics.exposition().decode()
    assert "topowatch_pressure_episodes_total 1.0" in text
    assert 'topowatch_pressure_evicted_total{class="UNREPLIED udp"} 20.0' in text
    assert "topowatch_pressure_timeout_changes_total 2.0" in text  # udp and generic lowered
    assert "topowatch_pressure_high 1.0" in text
    for e in list(ct.table)[:40]:
        ct.delete([e])
    agent.tick()
    text = metrics.exposition().decode()
    assert "topowatch_pressure_timeout_changes_total 4.0" in text and "topowatch_pressure_high 0.0" in text


def test_a_failed_lowering_undoes_what_it_wrote_and_blames_nobody(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    from topowatch.edges.sysctl import SysctlError

    agent, _, sysctl, _ = agent_for(tmp_path, full_table())
    real_write = sysctl.write

    def write(name: str, value: int) -> None:
        if name == sysctl_name("generic") and value == 60:
            raise SysctlError(f"cannot write {value} to {name}: Read-only file system")
        real_write(name, value)

    sysctl.write = write  # type: ignore[method-assign]
    with pytest.raises(SysctlError, match="cannot write 60"):
        agent.tick()
    assert sysctl.value("udp") == 30  # written, then undone
    assert not Path(agent.ledger.path).exists()
    assert not any("someone changed" in r.getMessage() for r in caplog.records)


def test_one_scan_serves_many_small_batches(tmp_path: Path) -> None:
    from dataclasses import replace

    table = [entry(i, timeout=1 + i % 29) for i in range(95)]  # all UNREPLIED
    agent, ct, _, _ = agent_for(tmp_path, table, replace(POLICY, batch=5, rate=1_000_000))
    agent.tick()  # starts: one full dump (census and candidates), then the first batch
    assert len(ct.table) == 90
    before = ct.requests
    for _ in range(5):
        agent.tick()
    assert len(ct.table) == 65  # 5 more batches of 5, oldest first
    assert ct.requests - before == 5 * 3  # per tick a stats request, a re-check and a delete: no dump
    left = {e.orig.sport for e in ct.table}
    gone = sorted(e.timeout for e in table if e.orig.sport not in left)
    assert gone == sorted(e.timeout for e in table)[:30]  # the 30 with the least time left


def test_an_eviction_batch_is_one_structured_record(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """bench/pressure.py reads these records (``--log-format json``), not the text line."""
    caplog.set_level(logging.INFO, logger="topowatch")
    agent, _ct, _sysctl, _events = agent_for(tmp_path, full_table())
    agent.tick()
    records = [getattr(r, "fields", None) for r in caplog.records]
    evictions = [f for f in records if isinstance(f, dict) and f.get("event") == "pressure_evict"]
    assert len(evictions) == 1
    assert evictions[0]["by_class"] == {"UNREPLIED udp": 20} and evictions[0]["evicted"] == 20


def test_candidates_that_changed_since_the_scan_are_kept(tmp_path: Path) -> None:
    agent, ct, _, events = agent_for(tmp_path, full_table())
    answered, refreshed = entry(5, timeout=6), entry(203, status=IPS_SEEN_REPLY | IPS_ASSURED, timeout=23)

    def traffic_meanwhile(chosen: list[Candidate]) -> None:
        """Packets after the scan: a reply for one UNREPLIED candidate, a refresh for one assured one."""
        picked = {c.entry.orig for c in chosen}
        if answered.orig in picked:
            ct.update(replace(answered, status=IPS_SEEN_REPLY))
        if refreshed.orig in picked:
            ct.update(replace(refreshed, timeout=TIMEOUTS["udp_stream"]))  # its timer was reset

    agent.before_evict = traffic_meanwhile
    agent.tick()  # pressure starts: the 20 UNREPLIED entries are chosen, one was answered meanwhile
    left = {e.orig.sport - 1000: e for e in ct.table}
    assert 5 in left and not left[5].unreplied
    assert set(range(20)) & set(left) == {5}
    assert "kept (replied since the dump) 1" in events[-1].summary
    ct.counters["drop"] = 7  # the last resort opens: the 16 oldest assured entries are chosen
    agent.tick()
    left = {e.orig.sport - 1000 for e in ct.table}
    assert set(range(200, 216)) & left == {203}  # refreshed since the scan: not idle any more
    assert 216 in left
    assert agent.status()["evicted_by_class"] == {"UNREPLIED udp": 19, "replied udp": 15}


def test_a_tcp_candidate_that_got_its_reply_is_never_evicted(tmp_path: Path) -> None:
    syn_sent = [entry(400 + i, proto=IPPROTO_TCP, timeout=5 + i) for i in range(3)]
    agent, ct, _, _ = agent_for(tmp_path, full_table()[:-5] + syn_sent)
    handshake = syn_sent[1]

    def established_meanwhile(chosen: list[Candidate]) -> None:
        assert handshake.orig in {c.entry.orig for c in chosen}
        ct.update(replace(handshake, status=IPS_SEEN_REPLY | IPS_ASSURED))

    agent.before_evict = established_meanwhile
    agent.tick()
    left = {e.orig.sport - 1000 for e in ct.table}
    assert {400, 401, 402} & left == {401}
