"""Smoke test of bench/ha.py on a small table: it runs, and topowatch deleted every committed stale entry.

No timing is asserted: the benchmark prints the times; here only that its
lines are there and that the counts it reads back (stale left on the new
master, deleted, collateral) are exact.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "netns"))

from hapair import LONG, missing_tools

ROOT = Path(__file__).resolve().parents[2]
MISSING = missing_tools()

pytestmark = [*LONG, pytest.mark.netns, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]


def test_ha_bench_small() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "ha.py"), "--entries", "2000"],
                          capture_output=True, text=True, timeout=300, check=False, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout, proc.stderr[-2000:])
    out = proc.stdout
    assert "conntrackd's commit on B:" in out and "Committed 2000 new entries" in out, out
    assert re.search(r"failover -> last stale delete on B: +\d+\.\d+ s", out), out
    assert "stale left on B: 0; deleted 2,000, collateral 0" in out, out
