"""Faults the daemon must outlive: EMFILE in a reaction, a flood of metrics clients, a read-only state dir."""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio
import trio.testing

from topowatch.core.model import Topology
from topowatch.metrics import Metrics, serve_http
from topowatch.reactor import Trigger

from test_reactor import B, FakeBackend, start  # isort: skip


class EmfileOnce(FakeBackend):
    """The first reaction's snapshot fails as a socket() would with every descriptor in use."""

    def __init__(self) -> None:
        super().__init__()
        self.snapshots = 0

    async def topology(self) -> Topology:
        self.snapshots += 1
        if self.snapshots == 2:  # the first is the start's
            raise OSError(errno.EMFILE, "Too many open files")
        return await super().topology()


async def test_a_reaction_failing_with_emfile_is_retried_and_the_loop_goes_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = EmfileOnce()
    async with trio.open_nursery() as nursery:
        reactor = await start(backend, nursery, restart_backoff=1.0)
        backend.topo = B
        await backend.send.send(Trigger("rtnl", "link up2 added", kind="link"))
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    assert reactor.errors == {"reaction": 1}
    (retried,) = reactor.reactions
    assert "retry after a failed reaction (" in retried.trigger
    assert len(backend.deleted) == 2  # the change the failed reaction missed is judged by the retry


async def test_metrics_serves_at_most_the_cap_and_times_out_idle_clients(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics = Metrics(sysctl_dir="/nonexistent")
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    served = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: serve_http(metrics, listeners, max_connections=3, timeout=5.0))
        idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(10)]
        await trio.sleep(1)
        # Only 3 were accepted: a 4th client's request waits in the backlog until an idle one times out.
        late = await trio.open_tcp_stream("127.0.0.1", port)
        await late.send_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        with trio.move_on_after(3):
            served.append(await late.receive_some(65536))
        assert served == [], "answered beyond the cap"
        with trio.fail_after(60):
            reply = b""
            while chunk := await late.receive_some(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.0 200 OK")
        for stream in idle:
            await stream.aclose()
        await late.aclose()
        nursery.cancel_scope.cancel()
    for listener in listeners:
        await listener.aclose()


async def test_metrics_accept_failing_with_emfile_is_retried(autojump_clock: trio.testing.MockClock) -> None:
    metrics = Metrics(sysctl_dir="/nonexistent")
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    real = listeners[0].accept
    failures = {"n": 0}

    async def accept() -> trio.SocketStream:
        if failures["n"] < 3:
            failures["n"] += 1
            raise OSError(errno.EMFILE, "Too many open files")
        return await real()

    listeners[0].accept = accept  # type: ignore[method-assign]
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_http, metrics, listeners)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        with trio.fail_after(30):
            assert (await stream.receive_some(65536)).startswith(b"HTTP/1.0 200 OK")
        await stream.aclose()
        nursery.cancel_scope.cancel()
    await listeners[0].aclose()
    assert failures["n"] == 3


RECOVER = """
import json, logging, sys, trio
from topowatch.core.pressure import PressurePolicy
from topowatch.edges.sysctl import ConntrackSysctl, TimeoutLedger
from topowatch.pressure import PressureAgent

logging.basicConfig(level=logging.INFO)
sysctl_dir, ledger_path = sys.argv[1], sys.argv[2]
agent = PressureAgent(lambda: PressurePolicy(enabled=False), sysctl=ConntrackSysctl(sysctl_dir),
                      ledger=TimeoutLedger(ledger_path), conntrack=lambda: None)

async def main():
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        nursery.cancel_scope.cancel()

trio.run(main)
print(open(sysctl_dir + "/nf_conntrack_udp_timeout").read().strip())
"""


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare and root")
def test_read_only_state_dir_with_a_leftover_ledger_restores_and_starts(tmp_path: Path) -> None:
    sysctls = tmp_path / "sys"
    sysctls.mkdir()
    (sysctls / "nf_conntrack_udp_timeout").write_text("10\n")  # what a killed run left lowered
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    ledger = state / "pressure-x.json"
    ledger.write_text('{"saved": {"udp": 30}, "written": {"udp": 10}}')
    ledger.chmod(0o600)
    # A private mount namespace: the state dir is read-only there (EROFS), nowhere else.
    script = textwrap.dedent(f"""
        mount --bind {state} {state} && mount -o remount,bind,ro {state} &&
        exec {sys.executable} -c "$1" {sysctls} {ledger}
    """)
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", RECOVER],
                          capture_output=True, text=True, timeout=60, check=False)
    if "mount" in proc.stderr and proc.returncode != 0 and "Traceback" not in proc.stderr:
        pytest.skip(f"cannot make a read-only bind mount here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "30"  # restored
    assert "cannot remove the pressure ledger" in proc.stderr and "Read-only file system" in proc.stderr
    assert ledger.exists()  # (it was read-only)


class SlowPhases(FakeBackend):
    """Every phase of a reaction takes 3 s: a long reaction that keeps making progress."""

    async def topology(self) -> Topology:
        await trio.sleep(3)
        return await super().topology()

    async def ruleset(self):  # type: ignore[no-untyped-def]
        await trio.sleep(3)
        return await super().ruleset()

    async def entries(self, eligibility):  # type: ignore[no-untyped-def]
        await trio.sleep(3)
        return await super().entries(eligibility)


async def test_watchdog_is_fed_by_a_long_reaction_that_makes_progress(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    import socket

    from topowatch.reactor import Reactor, ReactorConfig
    from topowatch.sdnotify import Notifier, watchdog
    from test_reactor import stale_when_up2  # isort: skip

    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.setblocking(False)
        notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})  # stall limit 4 s
        backend = SlowPhases()
        reactor = Reactor(backend, ReactorConfig(startup_sweep=False), predictor=stale_when_up2)
        async with trio.open_nursery() as nursery:
            await nursery.start(reactor.run)
            nursery.start_soon(watchdog, reactor, notifier)
            await trio.sleep(0.5)
            while True:  # drain the idle pings
                try:
                    sock.recv(64)
                except BlockingIOError:
                    break
            backend.topo = B
            await backend.send.send(Trigger("rtnl", "link up2 added"))
            await trio.sleep(0.3)
            assert reactor.busy_since is not None
            while reactor.busy_since is not None:
                await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
        pings = 0
        while True:
            try:
                sock.recv(64)
                pings += 1
            except BlockingIOError:
                break
    (reaction,) = reactor.reactions
    assert reaction.latency > 8  # twice the watchdog's stall limit
    assert pings >= 4  # one every 2 s all along: each phase was progress


async def test_a_failing_reaction_observer_never_ends_the_loop(autojump_clock: trio.testing.MockClock) -> None:
    backend = FakeBackend()

    def broken(reaction: object) -> None:
        raise UnicodeEncodeError("utf-8", "d\udce9v", 1, 2, "surrogates not allowed")

    async with trio.open_nursery() as nursery:
        reactor = await start(backend, nursery)
        reactor.reaction_hooks.append(broken)
        for i in range(2):
            await backend.send.send(Trigger("rtnl", f"event {i}"))
            await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert len(reactor.reactions) == 2 and reactor.errors == {"hook": 2}


class Worker:
    """A reaction busy in a worker thread: no phase completes, but the thread counts its steps."""

    def __init__(self) -> None:
        self.busy_since: float | None = None
        self.work_done = 0


async def test_watchdog_sees_steps_counted_in_a_worker_thread(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    import socket

    from topowatch.sdnotify import Notifier, watchdog

    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.setblocking(False)

        def pings() -> int:
            n = 0
            while True:
                try:
                    sock.recv(64)
                except BlockingIOError:
                    return n
                n += 1

        beat = Worker()
        notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})  # pings every 1 s
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watchdog, beat, notifier)
            await trio.sleep(0.5)
            pings()
            beat.busy_since = trio.current_time()
            for _ in range(10):  # 10 s of work, a step every second
                await trio.sleep(1)
                beat.work_done += 1
            moving = pings()
            await trio.sleep(10)  # the thread is stuck: no more steps
            stuck = pings()
            nursery.cancel_scope.cancel()
    assert moving >= 9
    assert stuck <= 2
