"""The idle daemon never wakes up: its threads' context switches (counted by the kernel) stay still.

No timing is asserted: over a few seconds with no event, the kernel's
per-thread counts of voluntary and involuntary context switches must not
move. Any timer in the daemon (a poll, a housekeeping tick) would move them.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from topowatch.lab import Daemon, thread_switches
from topowatch.netns import Namespace
from topowatch.snapshots import WRITE_QUIET

pytestmark = [pytest.mark.netns, pytest.mark.slow]

POLICY = '[policy.idle]\ntriggers = ["link", "address", "route", "rule", "ruleset"]\naction = "flush"\n'
RULESET = """\
table ip t {
    chain post {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "v0" masquerade
    }
}
"""


def rules_dir(tmp_path: Path) -> Path:
    rules = tmp_path / "rules.d"
    rules.mkdir(mode=0o755)
    policy = rules / "50-idle.toml"
    policy.write_text(POLICY)
    policy.chmod(0o644)
    return rules


def start(netns: Namespace, rules: Path) -> Daemon:
    # No IPv6: link-local addresses finishing DAD would be events, seconds after the link is up.
    for key in ("all", "default"):
        netns.run("sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1")
    netns.run("ip", "link", "add", "v0", "type", "veth", "peer", "name", "v0p")
    netns.run("ip", "addr", "add", "198.51.100.2/24", "dev", "v0")
    netns.run("ip", "link", "set", "v0", "up")
    netns.run("ip", "link", "set", "v0p", "up")
    netns.run("nft", "-f", "-", input=RULESET)
    return Daemon(netns, "--no-dbus", "--rules-dir", str(rules), "--debounce", "0.05")


@pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft")
def test_idle_daemon_threads_do_not_wake(netns: Namespace, tmp_path: Path) -> None:
    with start(netns, rules_dir(tmp_path)) as daemon:
        assert daemon.wait_for("ready") is not None, daemon.lines
        assert daemon.wait_for("reaction 1 (startup sweep") is not None, daemon.lines
        # Let the reaction's log write and thread hand-offs finish, and the snapshot file's one
        # write, WRITE_QUIET after the last new T0 (``snapshots.SnapshotWriter.run``).
        time.sleep(0.5 + WRITE_QUIET + 1.0)
        pid = daemon.proc.pid
        before = thread_switches(pid)
        time.sleep(3.0)
        after = thread_switches(pid)
        assert daemon.proc.poll() is None, daemon.lines
    # No thread started (nothing handed work to a worker), and none that stayed ran at all.
    # A worker thread may leave (trio's idle thread cache lets one go once); it is not a timer.
    assert set(after) <= set(before), (before, after)
    moved = {tid: after[tid] - before[tid] for tid in after if after[tid] != before[tid]}
    assert moved == {}, f"threads woke while idle (tid: switches): {moved}; {before} -> {after}"
    assert pid in after  # the event loop thread was watched


@pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft")
@pytest.mark.skipif(shutil.which("iptables-legacy") is None, reason="needs iptables-legacy")
def test_legacy_nat_table_is_polled_once_it_exists(netns: Namespace, tmp_path: Path) -> None:
    with start(netns, rules_dir(tmp_path)) as daemon:
        assert daemon.wait_for("reaction 1 (startup sweep") is not None, daemon.lines
        assert not any("legacy" in line for line in daemon.lines), daemon.lines
        netns.run("iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-o", "v0", "-j", "MASQUERADE")
        # No event of its own: the next event's snapshot looks, finds it and starts the poll.
        netns.run("ip", "route", "add", "192.0.2.0/24", "via", "198.51.100.1", "dev", "v0")
        line = daemon.wait_for("legacy iptables nat table appeared")
        assert line is not None, daemon.lines
