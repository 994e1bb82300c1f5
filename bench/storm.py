"""Issue #5: an event storm against the running daemon, and its idle cost.

Run as root: ``.venv/bin/python bench/storm.py [--routes 50000] [--idle 10]``.

In a namespace of its own (removed at the end) with ``topowatch run`` inside:

1. idle: the daemon's context switches (all threads, voluntary and not)
   over ``--idle`` seconds with nothing happening: it must not wake up;
2. storm: ``ip -batch`` adds ``--routes`` host routes and deletes them again
   (2 x routes events as fast as the kernel makes them); reported: how long
   the burst took, how many events the daemon's reactions accounted for,
   events/s absorbed, the reaction count (about one per burst is the goal),
   whether the event socket overran (events lost: the reactor re-dumps);
3. recovery: one more route change after the storm must still get a reaction.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from topowatch.lab import Daemon
from topowatch.netns import Namespace

REACTION_RE = re.compile(r"reaction (\d+) \(.*?(\d+) event\(s\)")
RULESET = """\
table ip t {
    chain p {
        type nat hook postrouting priority srcnat;
        oifname "up1" masquerade
    }
}
"""
RUN_ARGS = ("--debounce", "0.25", "--no-startup-sweep")


def switches(pid: int) -> int:
    """Context switches of the main thread, the trio loop (worker threads come and go)."""
    total = 0
    for task in (Path(f"/proc/{pid}/task/{pid}"),):
        try:
            text = (task / "status").read_text()
        except FileNotFoundError:
            continue
        for line in text.splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reactions_until_quiet(daemon: Daemon, quiet: float, limit: float) -> list[tuple[int, int, float]]:
    """Reaction lines (number, events, time seen) until none came for ``quiet`` seconds."""
    seen: list[tuple[int, int, float]] = []
    end = time.monotonic() + limit
    while time.monotonic() < end:
        line = daemon.wait_for("from first event to last delete", quiet)
        if line is None:
            break
        match = REACTION_RE.search(line)
        if match is not None:
            seen.append((int(match.group(1)), int(match.group(2)), time.perf_counter()))
    return seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="event storm and idle cost of topowatch run")
    parser.add_argument("--routes", type=int, default=50_000, help="routes added then deleted (2x events)")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds to watch the idle daemon")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/storm.py needs root", file=sys.stderr)
        return 2
    with Namespace.create("twstorm") as ns:
        for key in ("all", "default"):
            ns.run("sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1")
        ns.run("ip", "link", "add", "up1", "type", "veth", "peer", "name", "up1p")
        ns.run("ip", "link", "set", "up1p", "up")
        ns.run("ip", "addr", "add", "198.51.100.2/24", "dev", "up1")
        ns.run("ip", "link", "set", "up1", "up")
        ns.run("nft", "-f", "-", input=RULESET)
        with tempfile.TemporaryDirectory() as tmp:
            adds = Path(tmp, "adds")
            dels = Path(tmp, "dels")
            hosts = [f"10.{100 + i // 65536}.{i // 256 % 256}.{i % 256}/32" for i in range(args.routes)]
            adds.write_text("".join(f"route add {h} via 198.51.100.1 dev up1\n" for h in hosts))
            dels.write_text("".join(f"route del {h}\n" for h in hosts))
            with Daemon(ns, *RUN_ARGS) as daemon:
                if daemon.wait_for("ready", 60) is None:
                    print("\n".join(daemon.lines), file=sys.stderr)
                    return 1
                pid = daemon.proc.pid
                time.sleep(1.0)
                before, threads_before = switches(pid), len(list(Path(f"/proc/{pid}/task").iterdir()))
                time.sleep(args.idle)
                idle_switches = switches(pid) - before
                threads_after = len(list(Path(f"/proc/{pid}/task").iterdir()))
                cpu_before = cpu_seconds(pid)
                started = time.perf_counter()
                ns.run("ip", "-batch", str(adds))
                ns.run("ip", "-batch", str(dels))
                burst = time.perf_counter() - started
                storm = reactions_until_quiet(daemon, quiet=3.0, limit=300.0)
                cpu = cpu_seconds(pid) - cpu_before
                overruns = sum("overrun" in line for line in daemon.lines)
                # Recovery: one ordinary change still gets its reaction.
                mark = time.perf_counter()
                ns.run("ip", "route", "add", "192.0.2.0/24", "via", "198.51.100.1", "dev", "up1")
                after = reactions_until_quiet(daemon, quiet=2.0, limit=30.0)
                recovered = bool(after)
                recovery = (after[0][2] - mark) if after else float("nan")
                alive = daemon.proc.poll() is None
    events = 2 * args.routes
    absorbed = sum(e for _, e, _ in storm)
    last = (storm[-1][2] - started) if storm else float("nan")
    print(
        f"idle: {idle_switches} context switches in {args.idle:.0f} s, threads {threads_before} -> "
        f"{threads_after} (main thread, the event loop: 0 = it never woke up)"
    )
    print(f"storm: {events} route events (ip -batch: {args.routes} adds, then deletes) in {burst:.2f} s")
    print(
        f"  reactions: {len(storm)} (events they report: {absorbed}; the rest were lost to overruns "
        f"or merged)"
    )
    print(
        f"  last reaction {last:.2f} s after the burst began: {events / last:,.0f} events/s absorbed; "
        f"daemon CPU {cpu:.2f} s"
    )
    print(f"  overrun warnings in the log: {overruns} (an overrun is a trigger: the reaction re-dumps)")
    print(
        f"recovery: a route change after the storm got a reaction in {recovery:.2f} s: "
        + ("yes" if recovered and alive else "NO")
    )
    if not (recovered and alive):
        print("daemon log (last lines):", *daemon.lines[-15:], sep="\n  ")
    return 0 if recovered and alive else 1


if __name__ == "__main__":
    sys.exit(main())
