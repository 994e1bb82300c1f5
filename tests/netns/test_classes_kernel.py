"""Flow classes on the real kernel: every flow its own key, a change that moves only part of them.

Sixty UNREPLIED flows from the client, each to its own destination (thirty in 198.18.0.0/24,
thirty in 198.19.0.0/24), leave untranslated over the transit uplink. Then only 198.18.0.0/24
moves to the masqueraded uplink. The kernel is the oracle: a fresh flow to each net shows the
NAT it gets now. The daemon's reaction must judge only the moved prefix, delete exactly its
thirty entries (the others keep their ids), and a later route in a table no rule reaches must
cost no dump at all.
"""

from __future__ import annotations

import sys

import pytest

from topowatch.lab import Daemon, Lab

pytestmark = [pytest.mark.netns, pytest.mark.slow]

RULESET = """table ip t {
    chain post {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "up2" masquerade
    }
}
"""

SEND = (
    "import socket,sys\n"
    "for i in range(30):\n"
    "    for net, base in (('198.18.0.', 31000), ('198.19.0.', 32000)):\n"
    "        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "        s.bind(('0.0.0.0', base + i))\n"
    "        s.sendto(b'x', (net + str(i + 1), 53))\n"
    "        s.close()\n"
)


def test_distinct_keys_and_a_change_that_moves_part_of_them() -> None:
    with Lab.create(ruleset=RULESET) as lab:
        r = lab.router
        r.run("ip", "route", "add", "198.18.0.0/24", "via", "198.51.100.1", "dev", "up1")
        r.run("ip", "route", "add", "198.19.0.0/24", "via", "198.51.100.1", "dev", "up1")
        lab.client.run(sys.executable, "-c", SEND)
        before = {(e.orig.sport, str(e.orig.dst)): e for e in lab.router_entries() if e.orig.dport == 53}
        assert len(before) == 60 and all(e.unreplied and e.reply.dst == e.orig.src for e in before.values())
        with Daemon(r, "--debounce", "0.2") as daemon:
            assert daemon.wait_for("ready") is not None, daemon.lines
            assert daemon.wait_for("reaction 1 (") is not None, daemon.lines  # the startup sweep
            r.run("ip", "route", "replace", "198.18.0.0/24", "via", "203.0.113.1", "dev", "up2")
            moved = daemon.wait_for("reaction 2 (")
            assert moved is not None, daemon.lines
            r.run("ip", "route", "add", "198.20.0.0/16", "via", "203.0.113.1", "dev", "up2", "table", "100")
            quiet = daemon.wait_for("reaction 3 (")
            assert quiet is not None, daemon.lines
            assert daemon.stop() == 0
        assert "judged only flows to or from 198.18.0.0/24" in moved, moved
        assert "30 deleted" in moved, moved
        assert "no dump: the change can re-NAT no flow" in quiet, quiet
        # The oracle: what a fresh flow to each net gets now.
        moved_now = lab.oracle("198.18.0.200", 53, 41000)
        stayed_now = lab.oracle("198.19.0.200", 53, 41001)
        assert moved_now is not None and str(moved_now.reply.dst) == "203.0.113.2"
        assert stayed_now is not None and stayed_now.reply.dst == stayed_now.orig.src
        after = {(e.orig.sport, str(e.orig.dst)): e for e in lab.router_entries() if e.orig.dport == 53}
        for (sport, dst), old in before.items():
            if dst.startswith("198.18."):
                assert (sport, dst) not in after  # stale: deleted (no traffic recreated it)
            else:
                assert after[(sport, dst)].id == old.id  # healthy: untouched
