"""Before deleting, the kernel backend tells whether nftables committed since its last ruleset read."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from topowatch.netns import Namespace

pytestmark = [pytest.mark.netns]

SCRIPT = """
import json, subprocess, trio
from topowatch.edges.kernel import KernelBackend

async def main():
    backend = KernelBackend()
    out = {"before_any_read": await backend.ruleset_unchanged()}
    await backend.ruleset()
    out["after_read"] = await backend.ruleset_unchanged()
    subprocess.run(["nft", "add", "rule", "ip", "t", "post", "oifname", "up9", "masquerade"], check=True)
    out["after_commit"] = await backend.ruleset_unchanged()  # no event read: the generation says so
    await backend.ruleset()
    out["after_reread"] = await backend.ruleset_unchanged()
    print(json.dumps(out))

trio.run(main)
"""


def test_a_commit_since_the_read_is_seen(netns: Namespace) -> None:
    netns.run("nft", "add table ip t; add chain ip t post { type nat hook postrouting priority 100; }")
    out = subprocess.run(["ip", "netns", "exec", netns.name, sys.executable, "-c", SCRIPT],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert json.loads(out) == {"before_any_read": True, "after_read": True, "after_commit": False,
                               "after_reread": True}
