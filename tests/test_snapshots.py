"""The daemon's snapshot file (topowatch.snapshots): round trip, trust, the choice of "previous", the writer.

The file is what ``plan``/``flush --previous auto`` judge an entry's past with:
a file it should not trust must be ignored (one log line, no traceback), and
one it uses must decode to values equal to the kernel's (else the choice of
"previous" goes wrong). The netns test with the kernel as oracle is
tests/netns/test_snapshots_kernel.py.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from topowatch import cli, nslock, snapshots
from topowatch.core.livetopology import LiveTopology
from topowatch.core.model import Link, Route, RouteList, Topology
from topowatch.core.nat import NatRuleset
from topowatch.corpus import default_corpus, json_rules
from topowatch.edges import rtnl
from topowatch.edges import xfrm as X
from topowatch.edges.nft import parse_ruleset_json
from topowatch.edges.sysctl import netns_key
from topowatch.reactor import Reactor, ReactorConfig, Trigger

DATA = Path(__file__).parent / "edges" / "data"
NETNS = "cookie-test"

RULESET = parse_ruleset_json({"nftables": [
    {"table": {"family": "inet", "name": "nat", "handle": 1}},
    {"chain": {"family": "inet", "table": "nat", "name": "post", "handle": 1, "type": "nat",
               "hook": "postrouting", "prio": 100, "policy": "accept"}},
    {"chain": {"family": "inet", "table": "nat", "name": "pre", "handle": 2, "type": "nat",
               "hook": "prerouting", "prio": -100, "policy": "accept"}},
    {"rule": {"family": "inet", "table": "nat", "chain": "post", "handle": 3, "expr": [
        {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "lan"}},
        {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                   "right": {"set": [{"prefix": {"addr": "10.0.0.0", "len": 8}},
                                     {"range": ["192.168.1.1", "192.168.1.9"]}]}}},
        {"snat": {"family": "ip", "addr": {"range": ["100.64.0.10", "100.64.0.12"]},
                  "port": {"range": [2000, 3000]}}}]}},
    {"rule": {"family": "inet", "table": "nat", "chain": "post", "handle": 4, "expr": [
        {"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": "lan"}},
        {"masquerade": None}]}},
    {"rule": {"family": "inet", "table": "nat", "chain": "pre", "handle": 5, "expr": [
        {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 5060}},
        {"dnat": {"family": "ip6", "addr": "2001:db8::5", "port": 5070}}]}},
]})  # fmt: skip


def recorded_topology() -> Topology:
    """The recorded rtnetlink dump (links, v4/v6 addresses and routes, rules) and xfrm policies."""
    stats = rtnl.DecodeStats()
    topology = rtnl.topology_from_messages(rtnl.decode_messages((DATA / "rtnl_dump.bin").read_bytes()), stats)
    data, chunks, offset = (DATA / "xfrm_dump.bin").read_bytes(), [], 0
    while offset < len(data):
        (length,) = struct.unpack_from("=I", data, offset)
        chunks.append(data[offset + 4 : offset + 4 + length])
        offset += 4 + length
    xstats = X.DecodeStats()
    policies = tuple(X.policy_from_msg(m) for c in chunks for m in X.decode_messages(c, xstats))
    return replace(topology, xfrm_policies=policies, xfrm_known=True)


TOPOLOGY = recorded_topology()
CHANGED = replace(TOPOLOGY, routes=(*TOPOLOGY.routes, Route(IPv4Network("198.18.0.0/15"))))


def roundtrip(value: object) -> Any:
    return snapshots._tuples(json.loads(snapshots._Encoder().encode(value), object_hook=snapshots._decode_object))


def snaps(previous: bool = True, netns: str = NETNS, pid: int = 4242) -> snapshots.Snapshots:
    before = snapshots.Snapshot(TOPOLOGY, RULESET, 3, 1000.0) if previous else None
    return snapshots.Snapshots(snapshots.Snapshot(CHANGED, RULESET, 4, 2000.0), before, 4, netns, pid, 2000.0)


# -- round trip -----------------------------------------------------------------------------


def test_the_recorded_topology_and_a_ruleset_survive_the_file() -> None:
    assert TOPOLOGY.routes and TOPOLOGY.rules and TOPOLOGY.xfrm_policies and TOPOLOGY.addresses
    got = snapshots.decode(snapshots.encode(snaps()))
    assert got.current.topology == CHANGED and got.current.ruleset == RULESET
    assert got.previous is not None and got.previous.topology == TOPOLOGY
    assert (got.current.reaction, got.previous.reaction, got.netns, got.pid) == (4, 3, NETNS, 4242)
    assert got.previous.topology != got.current.topology  # the test can tell them apart


def test_every_corpus_ruleset_survives_the_file() -> None:
    root = default_corpus()
    files = sorted(root.rglob("*.json-nft")) if root.exists() else []
    if not files:
        pytest.skip(f"no corpus at {root}")
    for path in files:
        rules = tuple(json_rules(json.loads(path.read_text())))
        assert roundtrip(rules) == rules, path


def test_the_writer_encodes_again_only_what_changed() -> None:
    enc = snapshots._Encoder()
    first = enc.encode(TOPOLOGY)
    enc.done()
    hits = dict(enc._old)
    assert enc.encode(CHANGED).startswith(first[:50])
    kept = [k for k in hits if k in enc._new and enc._new[k] is hits[k]]
    assert len(kept) >= len(TOPOLOGY.routes)  # every unchanged route's text was reused


def test_values_met_whole_are_kept_for_the_file_after_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's files: the whole table, then the same T0 again (met whole, nothing encoded),
    then a T0 with one more route in its last chunk: only that route, its chunk and the
    containers around it are encoded, never the table's other routes (before: all of them)."""
    live = LiveTopology.seed(TOPOLOGY)
    assert live is not None
    enc = snapshots._Encoder()
    t0 = live.snapshot()
    assert isinstance(t0.routes, RouteList) and len(t0.routes.chunks) >= 1
    enc.encode(t0)
    enc.done()
    encoded: list[object] = []
    real = snapshots._Encoder._encode

    def counting(self: snapshots._Encoder, value: object) -> str:
        encoded.append(value)
        return real(self, value)

    monkeypatch.setattr(snapshots._Encoder, "_encode", counting)
    enc.encode(replace(t0, netconf_known=not t0.netconf_known))  # a new Topology around the same values
    enc.done()
    assert [type(v) for v in encoded] == [Topology]
    encoded.clear()
    added = Route(IPv4Network("198.18.0.0/15"))
    assert live.apply("route", True, added)
    text = enc.encode(live.snapshot())
    routes = [v for v in encoded if isinstance(v, Route)]
    assert routes == [added]  # the other routes' texts were kept through the file that met them whole
    assert snapshots._tuples(json.loads(text, object_hook=snapshots._decode_object)) == live.snapshot()


def test_a_value_outside_the_registry_is_refused() -> None:
    with pytest.raises(snapshots.SnapshotError, match="cannot store a dict"):
        snapshots._Encoder().encode(replace(TOPOLOGY, links=({"index": 1},)))  # type: ignore[arg-type]
    bad = b'{"format":"topowatch-snapshots","version":1,"netns":"x","pid":1,"reaction":1,"written":1}\n' \
          b'{"reaction":1,"taken":1,"topology":{"@":"builtins.eval"},"ruleset":{}}\nnull'
    with pytest.raises(snapshots.SnapshotError, match="damaged"):
        snapshots.decode(bad)


# -- the file ---------------------------------------------------------------------------------


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    tmp_path.chmod(0o700)
    yield tmp_path


def test_the_writer_persists_what_the_reactor_tells_it(state: Path) -> None:
    path = str(state / "snapshots-x.json")
    writer = snapshots.SnapshotWriter(path, NETNS, pid=77)

    async def main() -> None:
        writer.t0_moved(TOPOLOGY, RULESET, 0, False)  # at start
        writer.t0_moved(CHANGED, RULESET, 1, True)  # latest wins: one write
        await writer.flush()

    trio.run(main)
    assert writer.writes == 1 and writer.failures == 0
    assert os.stat(path).st_mode & 0o777 == 0o600
    got = snapshots.load(path, NETNS).snapshots()
    assert got.current.topology == CHANGED and got.current.reaction == 1
    assert got.previous is not None and got.previous.topology == TOPOLOGY and got.previous.reaction == 0
    assert got.pid == 77
    assert [p.name for p in state.iterdir()] == ["snapshots-x.json"]  # no temporary file left


def test_a_write_that_fails_is_counted_and_said_once(state: Path, caplog: pytest.LogCaptureFixture) -> None:
    counted: list[int] = []

    def fail(path: str, snaps: snapshots.Snapshots) -> int:
        raise snapshots.SnapshotError(f"cannot write {path}: Read-only file system")

    writer = snapshots.SnapshotWriter(str(state / "s.json"), NETNS, count=lambda: counted.append(1),
                                      write_fn=fail)

    async def main() -> None:
        for n in range(3):
            writer.t0_moved(TOPOLOGY, RULESET, n, n > 0)
            await writer.flush()

    with caplog.at_level(logging.WARNING, logger="topowatch.snapshots"):
        trio.run(main)
    assert len(counted) == 3 and writer.failures == 3
    assert len([r for r in caplog.records if "Read-only" in r.getMessage()]) == 1


async def test_a_storm_of_new_t0s_is_written_when_quiet_or_at_the_latest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """One write per quiet period, not one per reaction (each costs tens of ms at 10k routes); under
    a storm that never quiets, one every ``latest`` seconds."""
    writes: list[tuple[float, int]] = []  # (virtual time, reaction) of each write begun
    writer = snapshots.SnapshotWriter("unused", NETNS, quiet=1.0, latest=10.0)

    async def timed_flush() -> None:  # no worker thread: the virtual clock would run on meanwhile
        assert writer._pending is not None and writer._pending[0] is not None
        writes.append((round(trio.current_time() - begin, 3), writer._pending[0].reaction))
        writer._pending = None

    writer.flush = timed_flush  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        begin = trio.current_time()
        for n in range(3):  # 0.5 s apart: one write, 1 s after the last
            writer.t0_moved(TOPOLOGY, RULESET, n, n > 0)
            await trio.sleep(0.5)
        await trio.sleep(2)
        for n in range(3, 40):  # a storm from 3.5 s to 14.3 s: written at 13.5 s (the latest), then 1 s after it
            writer.t0_moved(TOPOLOGY, RULESET, n, True)
            await trio.sleep(0.3)  # never on the 13.5 s deadline itself
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    assert writes == [(2.0, 2), (13.5, 36), (15.3, 39)]


class Backend:
    """A backend whose topology changes on demand (enough for ``Reactor.run``)."""

    name = "fake"

    def __init__(self) -> None:
        self.topo = Topology(links=(Link(1, "lo"),))
        self.send, self.recv = trio.open_memory_channel[Trigger](100)

    def sources(self) -> list[Backend]:
        return [self]

    def events(self) -> Any:
        import contextlib

        @contextlib.asynccontextmanager
        async def cm() -> Any:
            yield self.recv

        return cm()

    async def topology(self) -> Topology:
        return replace(self.topo)  # a new snapshot each time, as the kernel backend's

    async def ruleset(self) -> NatRuleset:
        return RULESET

    async def entries(self, eligibility: Any) -> list[Any]:
        return []

    async def judge(self, eligibility: Any, decider: Any, early: Any = None) -> Any:
        return decider(None)

    async def delete(self, entries: Any, still: Any) -> Any:
        raise AssertionError("nothing to delete")


@pytest.mark.parametrize("sweep", [True, False])
async def test_the_reactor_tells_each_t0_and_whether_it_judged_with_a_previous_one(
    sweep: bool, autojump_clock: trio.testing.MockClock
) -> None:
    told: list[tuple[int, bool, int]] = []
    backend = Backend()
    reactor = Reactor(backend, ReactorConfig(startup_sweep=sweep, debounce=0.1, max_wait=0.2))
    reactor.t0_hook = lambda t, r, n, judged: told.append((n, judged, len(t.links)))
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        await trio.sleep(1)
        backend.topo = Topology(links=(Link(1, "lo"), Link(2, "up1")))
        reactor.push(Trigger("link", "link added: up1", kind="link"))
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    if sweep:  # the sweep judged with none; the reaction after it with the sweep's T0
        assert told == [(0, False, 1), (1, False, 1), (2, True, 2)]
    else:
        assert told == [(0, False, 1), (1, True, 2)]


async def test_a_hook_that_fails_never_ends_the_daemon(autojump_clock: trio.testing.MockClock) -> None:
    backend = Backend()
    reactor = Reactor(backend, ReactorConfig(startup_sweep=True))

    def boom(*args: object) -> None:
        raise OSError(30, "Read-only file system")

    reactor.t0_hook = boom
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        await trio.sleep(2)
        nursery.cancel_scope.cancel()
    assert reactor.totals.reactions == 1 and reactor.errors.get("snapshot") == 2


# -- which previous, and files not to trust -----------------------------------------------------


def test_the_previous_snapshot_is_the_files_previous_when_the_daemon_reacted_to_everything() -> None:
    choice = snapshots.choose(snaps(), CHANGED, RULESET)
    assert choice.which == "previous" and choice.previous is not None and choice.previous.topology == TOPOLOGY
    first = snapshots.choose(snaps(previous=False), CHANGED, RULESET)
    assert first.previous is None and "first judgement" in first.why


def test_the_previous_snapshot_is_the_files_current_when_the_state_moved_on() -> None:
    moved = replace(CHANGED, links=(*CHANGED.links, Link(999, "new0")))
    choice = snapshots.choose(snaps(), moved, RULESET)
    assert choice.which == "current" and choice.previous is not None and choice.previous.topology == CHANGED
    other = parse_ruleset_json({"nftables": []})
    assert snapshots.choose(snaps(), CHANGED, other).which == "current"  # a ruleset change counts too
    doc = choice.json(now=2030.0)
    assert (doc["snapshot"], doc["reaction"], doc["age_seconds"]) == ("current", 4, 30.0)


def test_a_dump_in_another_order_is_the_same_state() -> None:
    """The daemon's T0 is kept from events; a dump of the same tables lists routes in another order."""
    shuffled = replace(CHANGED, routes=tuple(reversed(CHANGED.routes)))
    assert shuffled != CHANGED and snapshots.choose(snaps(), shuffled, RULESET).which == "previous"
    fewer = replace(CHANGED, routes=CHANGED.routes[1:])
    assert snapshots.choose(snaps(), fewer, RULESET).which == "current"
    tied = [r for r in CHANGED.rules if r.priority == CHANGED.rules[-1].priority]
    if len(tied) > 1:  # rules of equal priority are tried in their order: another order is another state
        swapped = replace(CHANGED, rules=tuple(r for r in CHANGED.rules if r not in tied) + tuple(reversed(tied)))
        assert snapshots.choose(snaps(), swapped, RULESET).which == "current"


@pytest.fixture
def daemon_file(state: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The file a running daemon (this process, as far as ``nslock.holder`` says) wrote here."""
    netns = netns_key()
    path = Path(snapshots.snapshot_path(str(state), netns))
    snapshots.write(str(path), snaps(netns=netns, pid=os.getpid()))
    monkeypatch.setattr(nslock, "holder", lambda name=nslock.LOCK_NAME: os.getpid())
    return path


def previous(state: Path, option: str = "auto") -> snapshots.Choice:
    return cli._previous_snapshot(option, str(state), CHANGED, RULESET)


def test_a_trusted_file_of_the_running_daemon_is_used(state: Path, daemon_file: Path) -> None:
    choice = previous(state)
    assert (choice.source, choice.which) == ("daemon", "previous"), choice
    assert previous(state, "none").previous is None
    assert previous(state, str(daemon_file)).source == "file"


def _group_writable(path: Path) -> None:
    path.chmod(0o620)


def _other_owner(path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    os.chown(path, 4321, -1)


def _other_netns(path: Path) -> None:
    snapshots.write(str(path), snaps(netns="cookie-1", pid=os.getpid()))


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x80\x00not json at all")


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-200])


def _other_version(path: Path) -> None:
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join([lines[0].replace(b'"version":1', b'"version":2'), *lines[1:]]))


def _symlink(path: Path) -> None:
    target = path.with_name("elsewhere.json")
    path.rename(target)
    path.symlink_to(target)


def _stopped_daemon(path: Path) -> None:
    nslock.holder = lambda name=nslock.LOCK_NAME: None  # type: ignore[assignment] (undone by monkeypatch)


def _another_daemon(path: Path) -> None:
    nslock.holder = lambda name=nslock.LOCK_NAME: os.getpid() + 1  # type: ignore[assignment]


@pytest.mark.parametrize(("spoil", "said"), [
    (_group_writable, "writable by group or others"),
    (_other_owner, "owned by uid 4321"),
    (_other_netns, "another network namespace"),
    (_garbage, "damaged"),
    (_truncated, "damaged or truncated"),
    (_other_version, "version 2"),
    (_symlink, "symlink"),
    (_stopped_daemon, "no daemon runs"),
    (_another_daemon, "not by the daemon that runs"),
])  # fmt: skip
def test_a_file_not_to_trust_is_ignored_with_one_line(
    state: Path, daemon_file: Path, caplog: pytest.LogCaptureFixture, spoil: Any, said: str
) -> None:
    assert previous(state).previous is not None  # usable before it is spoilt
    spoil(daemon_file)
    with caplog.at_level(logging.WARNING):
        choice = previous(state)
    assert choice.previous is None and choice.source == "none"
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and said in lines[0], lines
    assert not any(r.exc_info for r in caplog.records)


def test_no_file_is_no_previous_snapshot_quietly(state: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        choice = previous(state)
    assert choice.previous is None and "does not exist" in choice.why
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    with pytest.raises(cli.UsageError, match="no such file"):
        previous(state, str(state / "missing.json"))


async def test_no_write_while_the_daemon_reacts(autojump_clock: trio.testing.MockClock) -> None:
    """A write waits for the reaction under way to end (its encoding would hold the GIL beside the
    reaction's re-check and delete)."""
    writes: list[float] = []
    busy_until = [3.0]
    writer = snapshots.SnapshotWriter("unused", NETNS, quiet=1.0, latest=10.0)
    writer.busy = lambda: trio.current_time() - begin < busy_until[0]

    async def timed_flush() -> None:  # no worker thread: the virtual clock would run on meanwhile
        writes.append(round(trio.current_time() - begin, 2))
        writer._pending = None

    writer.flush = timed_flush  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        begin = trio.current_time()
        writer.t0_moved(TOPOLOGY, RULESET, 0, False)
        await trio.sleep(6)
        nursery.cancel_scope.cancel()
    assert len(writes) == 1 and 3.0 <= writes[0] <= 3.0 + snapshots.BUSY_POLL  # not at 1 s: after it
