"""SIGHUP with hostile policy files: the running daemon keeps its policy and keeps reacting."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from topowatch.lab import Daemon
from topowatch.netns import Namespace

pytestmark = [pytest.mark.netns]


def test_deep_nesting_and_a_fifo_on_sighup_keep_the_policy(netns: Namespace, tmp_path: Path) -> None:
    rules = tmp_path / "rules.d"
    rules.mkdir(mode=0o755)
    policy = rules / "50-watch.toml"
    policy.write_text('[policy.watch]\naction = "log"\n')
    policy.chmod(0o644)
    with Daemon(netns, "--no-dbus", "--debounce", "0.05", "--rules-dir", str(rules)) as daemon:
        assert daemon.wait_for("reaction 1 (") is not None, daemon.lines
        policy.write_text("x = " + "[" * 50_000 + "]" * 50_000 + "\n")
        os.mkfifo(rules / "60-fifo.toml", 0o644)  # nobody ever writes to it
        daemon.proc.send_signal(signal.SIGHUP)
        assert daemon.wait_for("keeping the previous policy") is not None, daemon.lines
        assert any("50-watch.toml: nested too deeply" in line for line in daemon.lines), daemon.lines
        assert any("60-fifo.toml: not a regular file" in line for line in daemon.lines), daemon.lines
        netns.run("ip", "link", "add", "h2a", "type", "veth", "peer", "name", "h2b")
        line = daemon.wait_for("reaction 2 (")
        assert line is not None and "policy watch" in line, daemon.lines
        assert daemon.stop() == 0, daemon.lines
