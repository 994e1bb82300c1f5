"""sd_notify: the datagrams systemd gets, and a watchdog that stops when the reaction loop does.

The receiving end is a real AF_UNIX datagram socket (a path and an abstract
name), as systemd's. The daemon end-to-end test runs ``topowatch run`` in a
namespace with ``NOTIFY_SOCKET`` pointing at such a socket.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing

from test_reactor import FakeBackend, stale_when_up2
from topowatch.netns import Namespace
from topowatch.reactor import Reactor, ReactorConfig
from topowatch.sdnotify import Notifier, loop_alive, watchdog

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def drain(sock: socket.socket) -> list[str]:
    out: list[str] = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except BlockingIOError:
        pass
    finally:
        sock.setblocking(True)
    return out


def test_notify_to_a_path(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("ready, waiting")
    assert n.status("reaction 1: line one\nline two")
    assert n.stopping()
    assert drain(sock) == ["READY=1\nSTATUS=ready, waiting", "STATUS=reaction 1: line one line two",
                           "STOPPING=1"]


def test_notify_to_an_abstract_socket() -> None:
    name = f"topowatch-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.watchdog()
        assert sock.recv(100) == b"WATCHDOG=1"
    finally:
        sock.close()


def test_no_socket_is_a_silent_noop() -> None:
    n = Notifier({})
    assert not n.enabled
    assert not n.ready()
    assert n.sent == []
    # A relative path is not a notify socket; a vanished one is ignored, never raised.
    assert not Notifier({"NOTIFY_SOCKET": "relative"}).enabled
    assert not Notifier({"NOTIFY_SOCKET": "/nonexistent/notify"}).ready()


def test_watchdog_environment() -> None:
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_timeout == 30.0
    assert Notifier({}).watchdog_timeout is None
    assert Notifier({"WATCHDOG_USEC": "bogus"}).watchdog_timeout is None
    assert Notifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_timeout == 1.0
    # Meant for another process: not ours to honour.
    assert Notifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_timeout is None


@dataclass
class Beat:
    busy_since: float | None = None


def test_loop_alive() -> None:
    assert loop_alive(Beat(None), 100.0, 10.0)
    assert loop_alive(Beat(95.0), 100.0, 10.0)
    assert not loop_alive(Beat(85.0), 100.0, 10.0)


async def test_no_watchdog_means_no_task(autojump_clock: trio.testing.MockClock,
                                         receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    n = Notifier({"NOTIFY_SOCKET": path})
    start = trio.current_time()
    await watchdog(Beat(), n)  # returns at once: no periodic wakeup without WATCHDOG_USEC
    assert trio.current_time() == start
    assert drain(sock) == []


async def test_watchdog_pings_while_alive_and_stops_when_stuck(
    autojump_clock: trio.testing.MockClock, receiver: tuple[socket.socket, str]
) -> None:
    sock, path = receiver
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    beat = Beat()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watchdog, beat, n)
        await trio.sleep(10.5)  # idle: a ping every second
        idle_pings = len(drain(sock))
        beat.busy_since = trio.current_time()  # a reaction starts and never ends
        await trio.sleep(10)
        stuck_pings = len(drain(sock))
        beat.busy_since = None
        await trio.sleep(3)
        nursery.cancel_scope.cancel()
    assert idle_pings == 11
    assert stuck_pings == 2  # within the 2 s stall limit, then silence
    assert len(drain(sock)) == 3  # back to pinging once the loop moves again


class HangingBackend(FakeBackend):
    """Hangs in the dump of the second reaction: the reactor's loop is stuck in an await."""

    def __init__(self) -> None:
        super().__init__()
        self.dumps = 0

    async def entries(self, eligibility):  # type: ignore[no-untyped-def]
        self.dumps += 1
        if self.dumps == 2:
            await trio.sleep_forever()
        return await super().entries(eligibility)


async def test_real_reactor_stuck_in_a_reaction_stops_the_pings(
    autojump_clock: trio.testing.MockClock, receiver: tuple[socket.socket, str]
) -> None:
    sock, path = receiver
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})
    backend = HangingBackend()
    reactor = Reactor(backend, ReactorConfig(), predictor=stale_when_up2)
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        nursery.start_soon(watchdog, reactor, n)
        await trio.sleep(20)  # startup sweep done (dump 1), idle since
        assert len(reactor.reactions) == 1
        assert reactor.busy_since is None
        assert len(drain(sock)) >= 9  # every 2 s while idle
        from topowatch.reactor import Trigger

        await backend.send.send(Trigger("rtnl", "link up2 added"))
        await trio.sleep(30)  # dump 2 hangs for ever
        assert reactor.busy_since is not None
        nursery.cancel_scope.cancel()
    pings = drain(sock)
    assert 1 <= len(pings) <= 3  # only within the 4 s stall limit
    assert set(pings) == {"WATCHDOG=1"}


# -- the daemon, end to end --------------------------------------------------------------------


@pytest.mark.netns
def test_daemon_notifies_systemd(netns: Namespace, tmp_path: Path, receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    textfile = tmp_path / "topowatch.prom"
    # No D-Bus (not what this tests), and never the host's system bus should one be there.
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000",
           "DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent"}
    netns.run("nft", "add", "table", "ip", "t")  # an empty ruleset would do too; this one is readable
    (tmp_path / "none").mkdir()  # no policy files: the built-in policy (a missing --rules-dir is an error)
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns.name, sys.executable, "-m", "topowatch", "--log-format", "json",
         "run", "--no-dbus", "--state-dir", str(tmp_path / "state"), "--rules-dir", str(tmp_path / "none"),
         "--metrics-textfile", str(textfile), "--metrics-refresh", "0"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        messages: list[str] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any("reaction 1" in m for m in messages):
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                break
        while time.monotonic() < deadline and messages.count("WATCHDOG=1") < 3:
            messages.append(sock.recv(4096).decode())
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
        messages += drain(sock)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert messages[0].startswith("READY=1")
    assert any(m.startswith("STATUS=reaction 1 (startup sweep") for m in messages), messages
    assert messages.count("WATCHDOG=1") >= 3
    assert messages[-1].startswith("STOPPING=1")
    assert "topowatch_reactions_total" in textfile.read_text()
