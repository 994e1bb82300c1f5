"""While a large ruleset is read and parsed inside a reaction, the event loop goes on (issue 13, item 8).

A daemon (``Reactor`` on ``KernelBackend``) runs in a namespace holding a
5,000-rule NAT ruleset with its watchdog on. A rule is added, so the next
reaction reads the ruleset again. Every progress step of that read calls
into the trio loop from the worker thread (``trio.from_thread``): it only
returns once the loop ran it, so the loop was free during the parse. In the
middle of the parse a link is added: the loop takes its rtnetlink event into
the next burst, and the watchdog keeps pinging systemd's socket, while the
parse (still making steps) has not finished. A parse on the loop itself
would fail the first call from a "thread" that is the loop's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from topowatch.netns import Namespace

pytestmark = [pytest.mark.netns, pytest.mark.slow]

RULES = 5000

SCRIPT = r"""
import json, socket, subprocess, sys, time, trio
from topowatch.edges.kernel import KernelBackend
from topowatch.reactor import Reactor, ReactorConfig, Trigger
from topowatch.sdnotify import Notifier, watchdog

NOTIFY = sys.argv[1]
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind(NOTIFY)
sock.setblocking(False)


def pings():
    n = 0
    while True:
        try:
            sock.recv(64)
        except BlockingIOError:
            return n
        n += 1


async def main():
    token = trio.lowlevel.current_trio_token()
    backend = KernelBackend()
    reactor = Reactor(backend, ReactorConfig(startup_sweep=False, debounce=0.05, max_wait=0.2))
    out = {"steps": 0, "served": 0, "busy": None, "event_mid_parse": False, "pings_mid_parse": 0,
           "reads": 0, "rules": 0}
    watching = {"on": False}
    step = backend._step

    def on_loop(fn):
        return trio.from_thread.run_sync(fn, trio_token=token)

    def watched():
        step()
        if not watching["on"]:
            return
        out["steps"] += 1
        on_loop(lambda: None)  # returns only once the loop ran it
        out["served"] += 1
        if out["steps"] == 3:  # nft answered, 1,000 and 2,000 rules read: mid-parse
            out["busy"] = on_loop(lambda: reactor.busy_since is not None)
            subprocess.run(["ip", "link", "add", "trmid0", "type", "veth", "peer", "name", "trmid1"], check=True)
            pings()
            for _ in range(400):
                step()  # the parse is moving: a step, as it makes every thousand rules
                if not out["event_mid_parse"]:
                    out["event_mid_parse"] = on_loop(lambda: ("link", "trmid0") in reactor._burst.events)
                out["pings_mid_parse"] += pings()
                if out["event_mid_parse"] and out["pings_mid_parse"]:
                    break
                time.sleep(0.025)

    backend._step = watched
    notifier = Notifier({"NOTIFY_SOCKET": NOTIFY, "WATCHDOG_USEC": "400000"})
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        nursery.start_soon(watchdog, reactor, notifier)
        reads = backend.ruleset_reads
        watching["on"] = True
        subprocess.run(["nft", "add", "rule", "ip", "nat", "post", "oifname", "x9", "masquerade"], check=True)
        reactor.push(Trigger("test", "ruleset changed", kind="ruleset"))
        with trio.fail_after(300):
            while backend.ruleset_reads == reads or reactor.totals.reactions == 0:
                await trio.sleep(0.05)
        out["reads"] = backend.ruleset_reads - reads
        out["rules"] = sum(len(c.rules) for c in reactor.ruleset.chains)
        nursery.cancel_scope.cancel()
    print(json.dumps(out))


trio.run(main)
"""


def ruleset(rules: int) -> str:
    lines = ["table ip nat {", "  chain pre { type nat hook prerouting priority -100; policy accept; }",
             "  chain post { type nat hook postrouting priority 100; policy accept; }", "}"]
    for i in range(rules):
        a, b = divmod(i, 250)
        if i % 2:
            lines.append(f'add rule ip nat post ip saddr 10.2.{a}.{b} oifname "wan{i % 3}" counter '
                         f"snat to 203.0.113.{1 + i % 250}")
        else:
            lines.append(f'add rule ip nat pre iifname "wan0" tcp dport {1024 + i} counter dnat to 10.1.{a}.{b}:80')
    return "\n".join(lines) + "\n"


def test_the_loop_serves_events_and_the_watchdog_while_a_large_ruleset_is_parsed(netns: Namespace,
                                                                                 tmp_path: Path) -> None:
    netns.run("nft", "-f", "-", input=ruleset(RULES))
    proc = subprocess.run(["ip", "netns", "exec", netns.name, sys.executable, "-c", SCRIPT, str(tmp_path / "notify")],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["reads"] == 1 and out["rules"] == RULES + 1
    assert out["busy"] is True  # the read was a reaction's: the watchdog judged it by its progress
    # nft answered, every 1,000 rules, every item read, the read done: each step was run by the loop.
    assert out["steps"] >= RULES // 1000 + 3 and out["served"] == out["steps"]
    assert out["event_mid_parse"] and out["pings_mid_parse"] > 0
