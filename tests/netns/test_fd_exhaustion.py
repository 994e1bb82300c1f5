"""A local user holding many metrics connections must not starve the daemon of file descriptors."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from topowatch.lab import Daemon
from topowatch.netns import Namespace

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit")]

# About 15 descriptors idle, some more during a reaction (netlink sockets, nft's pipes): 48 leaves
# room for those and the metrics cap, not for 150 held connections.
NOFILE = 48
HELD = 150


def test_held_metrics_connections_do_not_stop_reactions(netns: Namespace, tmp_path: Path) -> None:
    rules = tmp_path / "rules.d"
    rules.mkdir(mode=0o755)
    with Daemon(netns, "--no-dbus", "--debounce", "0.05", "--rules-dir", str(rules),
                "--metrics-listen", "127.0.0.1:9877", prefix=("prlimit", f"--nofile={NOFILE}:{NOFILE}")
                ) as daemon:
        assert daemon.wait_for("reaction 1 (") is not None, daemon.lines
        held = []
        try:
            for _ in range(HELD):
                s = netns.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.settimeout(10)
                s.connect(("127.0.0.1", 9877))
                held.append(s)
            for i in range(3):  # each a reaction that opens sockets and runs nft
                netns.run("ip", "link", "add", f"h2a{i}", "type", "veth", "peer", "name", f"h2b{i}")
                assert daemon.wait_for(f"reaction {i + 2} (") is not None, daemon.lines
            assert daemon.proc.poll() is None, daemon.lines
        finally:
            for s in held:
                s.close()
        with netns.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(("127.0.0.1", 9877))
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            assert s.recv(64).startswith(b"HTTP/1.0 200 OK")
        assert daemon.stop() == 0, daemon.lines
    assert not any("Too many open files" in line for line in daemon.lines), daemon.lines
