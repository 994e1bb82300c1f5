"""Smoke test of bench/flush.py --quick: the table has its shape and every method's counts add up.

No timing is asserted: the benchmark reports times and prints a PASS/FAIL line
per target; here only that those lines are there, that topowatch deleted
exactly the stale entries (zero collateral, zero missed), and that the
benchmark read topowatch's JSON log records (the reaction's and one per
deleted entry), not its text line.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
METHODS = {"topowatch", "conntrack-tools", "kernel -F"}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.netns,
    pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft"),
    pytest.mark.skipif(shutil.which("conntrack") is None, reason="needs conntrack"),
]


def test_quick_benchmark_table(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "flush.py"), "--quick", "--idle", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "scenario" in proc.stdout and "collateral" in proc.stdout
    assert "conntrack-tools" in proc.stdout and "canary probe" in proc.stdout
    verdicts = re.findall(r"^\s+(PASS|FAIL|n/a)\s+(.+?):", proc.stdout, re.MULTILINE)
    report = json.loads(out.read_text())
    results = report["results"]
    # two 10%-UNREPLIED scenarios (K=1%, 10%), the flood, and distinct keys beside a big table
    assert len(results) == 4
    for res in results:
        assert res["built"]["entries"] == res["n"], res["built"]
        assert res["built"]["stale"] == res["k"]
        methods = res["methods"]
        assert set(methods) >= METHODS
        tw = methods["topowatch"]
        # topowatch deletes exactly the stale entries.
        assert (tw["deleted"], tw["collateral"], tw["missed"]) == (res["k"], 0, 0), tw["log"]
        assert tw["rss_peak_mb"] > 0 and tw["external_seconds"] > 0
        # The last delete, stamped by the daemon on the host's monotonic clock, comes after the
        # route change and before its record was read.
        assert 0 < tw["to_last_delete_seconds"] <= tw["external_seconds"], tw
        # Read from the daemon's JSON records: the reaction's, and one per deleted entry with its code.
        assert tw["record"]["event"] == "reaction" and tw["record"]["stale"] == res["k"], tw["record"]
        assert sum(tw["record"]["stale_by_code"].values()) == res["k"]
        assert tw["entry_records"] == res["k"] and sum(tw["entry_codes"].values()) == res["k"]
        # The full flush takes everything: it is the reference, not a selective method.
        full = methods["kernel -F"]
        assert full["deleted"] == res["n"] and full["missed"] == 0
        # conntrack -D by destination net deletes a superset: nothing stale left.
        assert methods["conntrack-tools"]["missed"] == 0
        for m in methods.values():
            assert m["deleted"] == res["k"] - m["missed"] + m["collateral"]
        # Each scenario's targets carry a verdict, and the printed PASS/FAIL lines show them all.
        targets = {t["target"]: t["verdict"] for t in res["targets"]}
        assert targets["zero collateral, zero missed (topowatch)"] == "PASS", res["targets"]
        assert any(name.startswith("topowatch <= 0.5 x conntrack-tools") for name in targets)
        assert all(v in ("PASS", "FAIL", "n/a") for v in targets.values())
    # The keyed scenario judges the floor and the startup sweep too; the floor's deletes are
    # measured on a table of their own: exactly the stale entries, nothing else.
    plain = results[3]["methods"]["plain deletes"]
    assert (plain["deleted"], plain["collateral"], plain["missed"]) == (results[3]["k"], 0, 0), plain
    assert all("plain deletes" not in res["methods"] for res in results[:3])
    keyed = {t["target"] for t in results[3]["targets"]}
    assert "event to last delete <= max(0.5 x conntrack-tools, 1.3 x floor)" in keyed
    assert "startup sweep <= 1.5 x floor (the undecoded UNREPLIED dump; medians)" in keyed
    # The sweep is timed on three daemon starts, each after one undecoded dump of the same table.
    tw = results[3]["methods"]["topowatch"]
    assert len(tw["sweeps"]) == 3 and len(tw["floor_samples"]) == 3, tw
    assert tw["sweep_seconds"] == sorted(r["latency_ms"] for r in tw["sweeps"])[1] / 1000
    assert all(r["event"] == "reaction" for r in tw["sweeps"])
    # The two 10%-UNREPLIED scenarios also judge the full-flush ratio.
    assert sum("kernel full flush" in t["target"] for res in results for t in res["targets"]) == 2
    printed = [v for v, _ in verdicts]
    assert printed.count("PASS") + printed.count("FAIL") >= 3 * len(results), proc.stdout[-3000:]
    assert len(printed) == sum(len(res["targets"]) for res in results)
    assert "idle_wakeups" in results[0]["methods"]["topowatch"]
    assert report["libraries"]["topowatch"] > 0
