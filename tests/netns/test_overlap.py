"""Deletes that overlap the dump (``edges.overlap``), through ``KernelBackend.judge`` on the real kernel.

A script in the test's namespace fills its table with UNREPLIED loopback flows (a third of them to
a port the prediction masquerades: their null bindings are stale), judges them with a compiled scan whose stale entries are
records, and lets the backend delete them while the dump runs; the reactor's tail deletes the rest.
The kernel's table afterwards is the oracle: exactly the stale entries are gone, each once.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from topowatch.edges import ctcodec
from topowatch.netns import Namespace

pytestmark = [pytest.mark.netns, pytest.mark.skipif(ctcodec._ctscan is None, reason="no compiled scan")]

SCRIPT = """
import json, socket, subprocess, sys, time, trio
from ipaddress import IPv4Address, ip_address
from topowatch.core.classify import Classifier
from topowatch.core.conntrack import IPS_SEEN_REPLY
from topowatch.core.decide import Decider, decide
from topowatch.core.eligibility import Eligibility
from topowatch.core.fib import Fib
from topowatch.core.flow import Binding, NatKind, Prediction
from topowatch.core.model import Address, Topology
from topowatch.edges import overlap
from topowatch.edges.ctnetlink import Conntrack
from topowatch.edges.kernel import KernelBackend
from topowatch.sources import EarlyDeletes

mode = sys.argv[1]
overlap.HAND_OVER = 16
GOOD = ip_address("203.0.113.1")
LO = IPv4Address("127.0.0.1")
# A ct rule makes the namespace track its loopback flows; the NAT chains mark both NAT sides done.
RULESET = '''table ip t {
    chain filt { type filter hook output priority 0; policy accept; ct state new counter; }
    chain out { type nat hook output priority -100; policy accept; }
    chain post { type nat hook postrouting priority srcnat; policy accept; }
}'''
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
subprocess.run(["nft", "-f", "-"], input=RULESET, text=True, check=True)
for i in range(3000):  # a third to port 53 (stale: predicted masquerade, never NATed), the rest to 54
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((str(LO), 20000 + i))  # each its own flow (an ephemeral port could repeat one)
        s.sendto(b"x", (str(LO), 53 if i % 3 == 0 else 54))
ct = Conntrack()

def predict(fib, flow):
    snat = Binding(NatKind.MASQUERADE, GOOD) if flow.dport == 53 else Binding(NatKind.NONE)
    return Prediction(frozenset({Binding(NatKind.NONE)}), frozenset({snat}), ())

topology = Topology(addresses=(Address(1, LO, 32), Address(1, GOOD, 32)))
fib = Fib(Topology())
classifier = Classifier.build([topology], [(53, 54)], Eligibility(), sport_matters=False)

def make(build):
    return Decider(predict=predict, fib_now=fib, sport_matters=False, build=build, classifier=classifier)

def unreplied_now(dumped, now):
    return not now.status & IPS_SEEN_REPLY

events = []
feed = overlap.Overlap.feed
def slow_feed(self, consumer):  # a slow judge: the deletes must run while the dump goes on
    feed(self, consumer)
    time.sleep(0.002)
overlap.Overlap.feed = slow_feed
delete_current = Conntrack.delete_current
def timed(self, entries, still=None):
    result = delete_current(self, entries, still)
    events.append(("delete", time.perf_counter(), result.deleted, result.not_found))
    return result
Conntrack.delete_current = timed

batches = []
def go():
    batches.append(1)
    return mode != "stop" or len(batches) <= 1

async def main():
    backend = KernelBackend()
    if mode == "stop":  # one datagram a burst: a hand-over each hundred entries or so, many batches
        backend._conntrack().pipelined = False
    dumped = [e for e in ct.dump()]
    expected = {(e.orig, e.id) for e in (d.entry for d in decide(dumped, predict=predict, fib_now=fib,
                                                                  sport_matters=False).stale)}
    early = EarlyDeletes(unreplied_now, 10**9 if mode != "capped" else 100, go)
    judged = await backend.judge(Eligibility(), make, early=early)
    events.append(("judged", time.perf_counter(), 0, 0))
    plan = judged.plan()
    rest = plan.stale.entries().skipping(early.taken)
    tail = await backend.delete(rest, unreplied_now)
    left = ct.dump(unreplied_only=False)
    gone = {(e.orig, e.id) for e in dumped} - {(e.orig, e.id) for e in left}
    judged_at = [t for kind, t, _, _ in events if kind == "judged"][0]
    early_before_end = sum(n for kind, t, n, _ in events if kind == "delete" and t < judged_at)
    print(json.dumps({
        "expected": len(expected), "stale": len(plan.stale), "taken": early.taken,
        "early": None if early.counts is None else [early.counts.deleted, early.counts.already_gone],
        "why_not": early.why_not, "tail": [tail.deleted, tail.already_gone],
        "gone_is_expected": gone == expected, "left": len(left), "early_before_end": early_before_end,
    }))

trio.run(main)
"""


def run(netns: Namespace, mode: str) -> dict[str, object]:
    out = subprocess.run(["ip", "netns", "exec", netns.name, sys.executable, "-c", SCRIPT, mode],
                         capture_output=True, text=True, timeout=300, check=True).stdout  # fmt: skip
    result: dict[str, object] = json.loads(out)
    return result


def test_stale_records_are_deleted_while_the_dump_runs_and_the_tail_deletes_the_rest(netns: Namespace) -> None:
    got = run(netns, "overlap")
    assert got["expected"] == got["stale"] == 1000 and got["gone_is_expected"] is True
    assert got["left"] == 3000 - 1000
    early, tail = got["early"], got["tail"]
    assert isinstance(early, list) and isinstance(tail, list)
    assert early[0] + tail[0] == 1000 and early[1] == tail[1] == 0  # each deleted once, none missed
    assert early[0] == got["taken"] and early[0] > 0 and got["why_not"] == ""
    assert isinstance(got["early_before_end"], int) and got["early_before_end"] > 0  # overlapped the dump


def test_a_stop_leaves_the_rest_to_the_tail(netns: Namespace) -> None:
    got = run(netns, "stop")  # go() says no from the second batch on: the ruleset moved
    assert got["gone_is_expected"] is True and got["stale"] == 1000
    early, tail = got["early"], got["tail"]
    assert isinstance(early, list) and isinstance(tail, list)
    assert early[0] == got["taken"] > 0 and tail[0] > 0  # the first batch only
    assert early[0] + tail[0] == 1000 and early[1] == tail[1] == 0
    assert got["why_not"] == "stopped: the ruleset moved during the dump"


def test_a_cap_below_the_tables_size_never_overlaps(netns: Namespace) -> None:
    got = run(netns, "capped")
    assert got["early"] is None and got["taken"] == 0
    assert isinstance(got["why_not"], str) and got["why_not"].startswith("the deletion cap 100 is below")
    assert got["tail"] == [1000, 0] and got["gone_is_expected"] is True
