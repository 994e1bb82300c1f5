"""rules.d in the real daemon: a log-only policy deletes nothing; a bad reload keeps the old policy."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from topowatch.lab import OTHER_SERVER, SIP_SERVER, Daemon, Lab, LabFlow

pytestmark = [pytest.mark.netns, pytest.mark.slow]

RULESET = """\
table inet t {
    chain post {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "up2" masquerade
    }
}
"""


def test_log_only_then_bad_reload_keeps_policy(tmp_path: Path) -> None:
    rules = tmp_path / "rules.d"
    rules.mkdir(mode=0o755)
    policy = rules / "50-watch.toml"
    policy.write_text('[policy.watch]\naction = "log"\ntriggers = ["route"]\n')
    policy.chmod(0o644)
    with Lab.create(ruleset=RULESET) as lab:
        lab.router.run("ip", "route", "del", f"{OTHER_SERVER}/32")
        lab.start_traffic((LabFlow("sip", 5060, SIP_SERVER, 5060),))
        with Daemon(lab.router, "--debounce", "0.2", "--no-startup-sweep", "--rules-dir", str(rules)) as daemon:
            assert daemon.wait_for("ready") is not None, daemon.lines
            lab.router.run("ip", "route", "replace", "default", "via", "203.0.113.1", "dev", "up2")
            line = daemon.wait_for("reaction 1 (")
            assert line is not None, daemon.lines
            assert "policy watch" in line and "1 logged only" in line, line
            # The group lines follow the reaction's line (written by the daemon's detail thread).
            assert daemon.wait_for("stale (policy says log only) udp 10.0.1.2:5060") is not None, daemon.lines
            entry = lab.entry_for(5060, SIP_SERVER)
            assert entry is not None and str(entry.reply.dst) == "10.0.1.2"  # still stuck: log only

            policy.write_text('[policy.watch]\naction = "flush"\nbogus = 1\n')
            daemon.proc.send_signal(signal.SIGHUP)
            assert daemon.wait_for("keeping the previous policy") is not None, daemon.lines
            assert any("50-watch.toml:3" in x and "bogus" in x for x in daemon.lines), daemon.lines

            # The daemon still reacts, under the old (log-only) policy.
            lab.router.run("ip", "route", "add", "192.0.2.99/32", "via", "203.0.113.1", "dev", "up2")
            line = daemon.wait_for("reaction 2 (")
            assert line is not None and "policy watch" in line and "1 logged only" in line, daemon.lines
            code = daemon.stop()
        assert code == 0
        entry = lab.entry_for(5060, SIP_SERVER)
        assert entry is not None and str(entry.reply.dst) == "10.0.1.2"
