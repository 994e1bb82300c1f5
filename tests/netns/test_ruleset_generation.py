"""The ruleset is read again only when its nftables generation changed (a 50k-rule ruleset takes seconds)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from topowatch.netns import Namespace

pytestmark = [pytest.mark.netns]

SCRIPT = """
import json, subprocess, trio
from topowatch.edges import nft
from topowatch.edges.kernel import KernelBackend
from topowatch.edges.nftevents import current_generation

runs = []
real = nft._run_nft
nft._run_nft = lambda argv: runs.append(argv) or real(argv)

async def main():
    backend = KernelBackend()
    out = {"gen0": current_generation()}
    first = await backend.ruleset()
    out["steps"] = backend.work_done  # nft answered, JSON decoded, parsed: the watchdog's evidence
    second = await backend.ruleset()  # nothing committed meanwhile
    out["same_object"] = first is second
    out["nft_runs_unchanged"] = len(runs)
    subprocess.run(["nft", "add", "rule", "ip", "t", "post", "oifname", "up9", "masquerade"], check=True)
    out["gen1"] = current_generation()
    third = await backend.ruleset()
    out["nft_runs_changed"] = len(runs)
    out["rules"] = [len(c.rules) for c in third.chains]
    print(json.dumps(out))

trio.run(main)
"""


def test_unchanged_generation_is_not_read_again(netns: Namespace) -> None:
    netns.run("nft", "add table ip t; add chain ip t post { type nat hook postrouting priority 100; }; "
              "add rule ip t post oifname up1 masquerade")
    out = subprocess.run(["ip", "netns", "exec", netns.name, sys.executable, "-c", SCRIPT],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    doc = json.loads(out)
    assert isinstance(doc["gen0"], int) and doc["gen1"] == doc["gen0"] + 1
    assert doc["nft_runs_unchanged"] == 1 and doc["same_object"] and doc["steps"] == 3
    assert doc["nft_runs_changed"] == 2 and doc["rules"] == [2]
