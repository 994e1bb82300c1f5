"""Smoke test of bench/classes.py on a small table: every route event carried the classifier over,
and the last one equals a classifier built from scratch. No timing is asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_small_route_event_bench(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "classes.py"), "--routes", "3000", "--rules", "100",
         "--events", "30", "--corpus", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "30 classifiers carried over" in proc.stdout, proc.stdout
    assert "the same classes" in proc.stdout, proc.stdout
    assert "route event to updated classifier < 1 ms on average" in proc.stdout
