"""`ip netns del` under a running daemon: it releases its D-Bus name and exits.

Before, the orphaned daemon kept io.github.topowatch.netns_<name>, and the
daemon of a namespace re-created under that name ran without D-Bus (the name
was taken) while every hook reached the orphan. A private system bus with the
shipped policy stands in for the system bus; the host's is never touched.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from test_dbus import POLICY_FILE, SYSTEM_CONF, PrivateBus
from topowatch import dbus as twdbus
from topowatch.lab import Daemon
from topowatch.netns import Namespace

pytestmark = [pytest.mark.netns]


@pytest.fixture
def system_bus(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    bus = PrivateBus(SYSTEM_CONF, policy=str(POLICY_FILE))
    bus.start()
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)  # the daemons inherit it
    try:
        yield bus.address
    finally:
        bus.stop()


def _daemon(ns: Namespace, tmp_path: Path, n: int) -> Daemon:
    rules = tmp_path / f"rules{n}.d"
    rules.mkdir(mode=0o755)
    return Daemon(ns, "--rules-dir", str(rules), "--state-dir", str(tmp_path / f"state{n}"),
                  "--no-startup-sweep")


def test_daemon_of_a_deleted_namespace_releases_its_name(system_bus: str, tmp_path: Path) -> None:
    ns = Namespace.create("twt-gone")
    name = twdbus.bus_name(twdbus.named_suffix(ns.name))
    try:
        with _daemon(ns, tmp_path, 1) as first:
            assert first.wait_for(f"D-Bus: serving {name}") is not None, first.lines
            ns.delete()
            ns = _recreate(ns.name)  # `ip netns add` again: the same name, another namespace
            # The daemon of the new namespace finds the name taken, calls the owner, which finds its
            # namespace gone, stops and releases the name: the new daemon's next attempt gets it.
            with _daemon(ns, tmp_path, 2) as second:
                assert second.wait_for(f"D-Bus: serving {name}") is not None, (first.lines, second.lines)
                try:
                    first.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    pytest.fail(f"the orphaned daemon kept running: {first.lines}")
                first.stop()
                assert first.proc.returncode == 0, first.lines
                assert any("is gone" in line for line in first.lines), first.lines
    finally:
        ns.delete()


def test_a_call_to_an_orphan_stops_it(system_bus: str, tmp_path: Path) -> None:
    # A hook (or `topowatch status`) calling the name of a deleted namespace's daemon: it answers
    # Gone, stops and releases the name.
    ns = Namespace.create("twt-gone")
    name = twdbus.bus_name(twdbus.named_suffix(ns.name))
    try:
        with _daemon(ns, tmp_path, 1) as first:
            assert first.wait_for(f"D-Bus: serving {name}") is not None, first.lines
            ns.delete()
            proc = subprocess.run(["busctl", "--system", "call", name, "/io/github/topowatch",
                                   "io.github.topowatch.Agent1", "Status"],
                                  capture_output=True, text=True, timeout=20, check=False)
            assert proc.returncode != 0 and "namespace is gone" in proc.stderr, (proc.stdout, proc.stderr)
            first.proc.wait(timeout=20)
            first.stop()
            assert first.proc.returncode == 0, first.lines
    finally:
        ns.delete()


def _recreate(name: str) -> Namespace:
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    return Namespace(name)
