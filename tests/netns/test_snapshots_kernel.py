"""``plan`` beside a running daemon: its snapshot file decides what plan alone cannot (kernel as oracle).

The gateway of test_semantics_oracle (namespaces prefixed "h12s"), rp_filter
off, an SNAT for flows entering on lan above a masquerade: the old entry's
binding (the SNAT) is given by lan and refused by the uplinks (masquerade),
so without knowing the state it was made under, plan cannot tell whether it
came on lan (healthy) or on an uplink before the change (stale): undecided.
Then policy routes move the reverse path of the source to up2 (issue 12's
reproduction). The daemon runs throughout and keeps its snapshots in its
state directory; ``plan`` reads them: before the change the uplinks gave
masquerade too, so the entry cannot have come that way with its SNAT: it is
healthy, as the kernel's fresh flow (same SNAT) says.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from topowatch.lab import Daemon
from topowatch.snapshots import WRITE_QUIET

from test_semantics_oracle import (  # isort: skip
    IIF_SNAT, POLICY_ROUTES, SERVER4, Gateway, kernel_verdict, translated_source, verdict,
)

pytestmark = [pytest.mark.netns]


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    with Gateway.create("h12s") as gw:
        yield gw


def plan(gateway: Gateway, *args: str) -> dict[str, Any]:
    proc = subprocess.run(
        ["ip", "netns", "exec", gateway.gw.name, sys.executable, "-m", "topowatch", "plan", "--json", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def test_the_daemons_snapshot_decides_an_entry_whose_way_in_is_ambiguous(
    gateway: Gateway, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    tmp_path.chmod(0o755)
    gateway.rp_filter(0)
    gateway.nft(IIF_SNAT)
    old = gateway.fresh("10.77.0.3", 5060, SERVER4, 53)
    assert translated_source(old) == "100.64.0.99"
    with Daemon(gateway.gw, "--debounce", "0.1", "--max-wait", "0.5", "--no-dbus", "--log-format", "json",
                "--state-dir", str(state), "--dry-run") as daemon:
        sweep = daemon.wait_record(lambda r: r.get("event") == "reaction")
        assert sweep is not None, daemon.lines
        for cmd in POLICY_ROUTES:
            gateway.gw.run("ip", *cmd.split())
        moved = daemon.wait_record(lambda r: r.get("event") == "reaction" and "route" in r.get("change", ""))
        assert moved is not None, daemon.lines
        fresh = gateway.fresh("10.77.0.3", 41000, SERVER4, 53)
        assert translated_source(fresh) == "100.64.0.99"
        assert kernel_verdict(old, fresh) == "healthy"
        # Written once T0 has stayed put for WRITE_QUIET (``SnapshotWriter.run``).
        deadline = time.monotonic() + WRITE_QUIET + 10
        while not (state.is_dir() and any(state.iterdir())) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # the rename done
        files = list(state.iterdir())
        assert [f.name.startswith("snapshots-") for f in files] == [True], files
        assert files[0].stat().st_mode & 0o777 == 0o600

        bare = plan(gateway, "--state-dir", str(state), "--previous", "none")
        assert verdict(bare, "10.77.0.3", 5060) == "undecided", bare
        assert bare["previous"]["snapshot"] is None

        # The daemon reacted to every change: its last judgement is reproduced, with its previous T0.
        auto = plan(gateway, "--state-dir", str(state))
        assert auto["previous"]["source"] == "daemon" and auto["previous"]["snapshot"] == "previous", auto
        assert auto["previous"]["age_seconds"] >= 0
        assert verdict(auto, "10.77.0.3", 5060) == kernel_verdict(old, fresh) == "healthy", auto
        assert verdict(auto, "10.77.0.3", 41000) == "healthy", auto  # made under the current state
        # The same file named explicitly; and flush shows what plan shows.
        named = plan(gateway, "--previous", str(files[0]))
        assert named["previous"]["source"] == "file" and verdict(named, "10.77.0.3", 5060) == "healthy"
        assert daemon.stop() == 0, daemon.lines
    # The daemon is gone, and its file with it (it says nothing of what changes next).
    assert list(state.iterdir()) == []
    after = plan(gateway, "--state-dir", str(state))
    assert after["previous"]["snapshot"] is None and "does not exist" in after["previous"]["why"], after
    assert verdict(after, "10.77.0.3", 5060) == "undecided", after
