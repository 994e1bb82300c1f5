"""Issue #5: an event storm against the running daemon, a forced overrun, and its idle cost.

Run as root: ``.venv/bin/python bench/storm.py [--routes 100000] [--idle 10] [--no-force-overrun]``.

In a namespace of its own (removed at the end) with ``topowatch run --no-dbus``
inside, reading policies only from a temporary rules directory:

1. idle: the daemon's context switches (all threads, voluntary and not)
   over ``--idle`` seconds with nothing happening: it must not wake up;
2. storm: ``ip -batch`` adds ``--routes`` host routes and deletes them again
   (2 x routes events as fast as the kernel makes them); reported: how long
   the burst took, the reactions and the events they accounted for, events/s
   absorbed, event-socket overruns; judged: one reaction per burst, that is
   reactions <= burst seconds / max_wait + 2;
3. forced overrun: the daemon is stopped (SIGSTOP) while ``ip -batch`` adds
   the routes again, far more events than its receive buffer holds, then
   continued (SIGCONT): its next receive fails with ENOBUFS, so it must log
   the overrun and rebuild its view from a full dump; then the routes go;
4. recovery: one more route change must still get a reaction, and the
   daemon's view must match the kernel's: the route count of the snapshot
   it logs (``-vv``: "snapshot: ... routes") equals ``ip route show table
   all`` (IPv4 and IPv6) in the namespace, after the overrun and at the end.

The daemon logs with ``--log-format json``: reactions are read from their
records (``event`` "reaction": number, events, change), never from the
text line.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from idle import thread_switches, watch_idle

from topowatch.lab import Daemon, LineReader, log_record
from topowatch.netns import Namespace

SNAPSHOT_RE = re.compile(r"snapshot: \d+ links, \d+ addresses, (\d+) routes")
OVERRUN = "rtnetlink: event overrun"
RULESET = """\
table ip t {
    chain p {
        type nat hook postrouting priority srcnat;
        oifname "up1" masquerade
    }
}
"""
POLICY = """\
[policy.storm]
triggers = ["link", "address", "route", "rule", "ruleset"]
action = "flush"
"""
DEBOUNCE = 0.25
MAX_WAIT = 2.0
RUN_ARGS = ("--no-dbus", "--debounce", str(DEBOUNCE), "--max-wait", str(MAX_WAIT), "--no-startup-sweep")


class VerboseDaemon(Daemon):
    """``topowatch -vv --log-format json run``: debug records too (the snapshot sizes)."""

    def __init__(self, ns: Namespace, *args: str) -> None:
        self.proc = ns.popen(
            [sys.executable, "-m", "topowatch", "-vv", "--log-format", "json", "run", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stderr is not None
        self.reader = LineReader(self.proc.stderr.fileno())
        self.lines: list[str] = []


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Settled:
    """What the daemon logged from a mark until it went idle: reactions and when each was read."""

    reactions: list[tuple[int, int, float]]  # (number, events, perf_counter when read)
    lines: list[str]
    idle_at: float | None  # perf_counter when it was seen idle; None: not within the limit


def settle(daemon: Daemon, limit: float = 600.0, quiet: float = 1.0) -> Settled:
    """Read the log until the daemon is idle: for ``quiet`` s no thread of it ran (the kernel's count).

    A quiet log alone says little: one reaction to a storm can spend many
    seconds on a dump without a line. Idle means no pending debounce, no dump,
    no reaction: it waits for events.
    """
    mark = len(daemon.lines)
    reactions: list[tuple[int, int, float]] = []
    end = time.monotonic() + limit
    seen = mark
    while time.monotonic() < end:
        before = thread_switches(daemon.proc.pid)
        daemon.wait_for("\0", quiet)  # never matches: reads what comes for ``quiet`` s
        for line in daemon.lines[seen:]:
            record = log_record(line)
            if record is not None and record.get("event") == "reaction":
                reactions.append((record["reaction"], record["events"], time.perf_counter()))
        seen = len(daemon.lines)
        if daemon.proc.poll() is not None:
            break
        if thread_switches(daemon.proc.pid) == before and seen == len(daemon.lines):
            return Settled(reactions, daemon.lines[mark:], time.perf_counter())
    return Settled(reactions, daemon.lines[mark:], None)


def kernel_routes(ns: Namespace) -> int:
    """Routes of every table, both families, as ``ip route`` lists them (a nexthop line is no route)."""
    total = 0
    for family in ("-4", "-6"):
        out = ns.run("ip", family, "route", "show", "table", "all")
        total += sum(1 for line in out.splitlines() if line and not line[0].isspace())
    return total


def message(line: str) -> str:
    """A JSON record's message (the line itself if it is not one)."""
    record = log_record(line)
    return str(record.get("msg", "")) if record is not None else line


def reacted_to(lines: list[str], what: str) -> bool:
    """Some reaction record names ``what`` in its change or trigger."""
    return any(
        (r := log_record(x)) is not None and r.get("event") == "reaction"
        and what in f"{r.get('change')} {r.get('trigger')}"
        for x in lines
    )


def last_snapshot(lines: list[str]) -> int | None:
    for line in reversed(lines):
        match = SNAPSHOT_RE.search(message(line))
        if match is not None:
            return int(match.group(1))
    return None


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="event storm, forced overrun and idle cost of topowatch run")
    parser.add_argument("--routes", type=int, default=100_000, help="routes added then deleted (2x events)")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds to watch the idle daemon")
    parser.add_argument("--no-force-overrun", action="store_true",
                        help="skip stopping the daemon during a burst to force an event-socket overrun")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/storm.py needs root", file=sys.stderr)
        return 2
    out: list[str] = []
    checks: list[tuple[str, bool]] = []
    with Namespace.create("twstorm") as ns, tempfile.TemporaryDirectory() as tmp:
        for key in ("all", "default"):
            ns.run("sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1")
        ns.run("ip", "link", "add", "up1", "type", "veth", "peer", "name", "up1p")
        ns.run("ip", "link", "set", "up1p", "up")
        ns.run("ip", "addr", "add", "198.51.100.2/24", "dev", "up1")
        ns.run("ip", "link", "set", "up1", "up")
        ns.run("nft", "-f", "-", input=RULESET)
        rules = Path(tmp, "rules.d")
        rules.mkdir(mode=0o755)
        Path(rules, "50-storm.toml").write_text(POLICY)
        adds = Path(tmp, "adds")
        dels = Path(tmp, "dels")
        hosts = [f"10.{100 + i // 65536}.{i // 256 % 256}.{i % 256}/32" for i in range(args.routes)]
        adds.write_text("".join(f"route add {h} via 198.51.100.1 dev up1\n" for h in hosts))
        dels.write_text("".join(f"route del {h}\n" for h in hosts))
        with VerboseDaemon(ns, *RUN_ARGS, "--rules-dir", str(rules)) as daemon:
            if daemon.wait_for("ready", 60) is None:
                print("\n".join(daemon.lines), file=sys.stderr)
                return 1
            pid = daemon.proc.pid
            time.sleep(1.0)
            idle = watch_idle(pid, args.idle)
            out.append(f"idle: {idle.describe()}")
            checks.append(("idle daemon never woke (0 context switches, all threads)", idle.switches == 0))

            # 2. the storm, at full speed
            cpu_before = cpu_seconds(pid)
            started = time.perf_counter()
            ns.run("ip", "-batch", str(adds))
            ns.run("ip", "-batch", str(dels))
            burst = time.perf_counter() - started
            storm = settle(daemon)
            cpu = cpu_seconds(pid) - cpu_before
            overruns = sum(OVERRUN in message(line) for line in storm.lines)
            events = 2 * args.routes
            absorbed = sum(e for _, e, _ in storm.reactions)
            done = (storm.reactions[-1][2] - started) if storm.reactions else float("nan")
            bound = burst / MAX_WAIT + 2
            seen, kernel = last_snapshot(storm.lines), kernel_routes(ns)
            out.append(f"storm: {events} route events (ip -batch: {args.routes} adds, then deletes) "
                       f"in {burst:.2f} s, {events / burst:,.0f} events/s made by the kernel")
            out.append(f"  reactions: {len(storm.reactions)} (events they report: {absorbed}; the rest were "
                       "dropped by the kernel in overruns, covered by the re-dump)")
            out.append(f"  absorbed: last reaction {done:.2f} s after the burst began: {events / done:,.0f} "
                       f"events/s; daemon CPU {cpu:.2f} s")
            out.append(f"  overruns (ENOBUFS) logged: {overruns}; each is a trigger: the reaction re-dumps")
            out.append(f"  settled: daemon's last snapshot {seen} routes, kernel {kernel}")
            checks.append((f"one reaction per burst: {len(storm.reactions)} reactions <= {burst:.2f} s / "
                           f"max_wait {MAX_WAIT:g} s + 2 = {bound:.1f}",
                           bool(storm.reactions) and len(storm.reactions) <= bound))
            checks.append((f"after the storm the daemon's view matches the kernel ({seen} == {kernel} "
                           "routes)", storm.idle_at is not None and seen == kernel))

            # 3. a forced overrun: the daemon does not read while the kernel makes the events
            forced = overruns
            if not args.no_force_overrun:
                os.kill(pid, signal.SIGSTOP)
                try:
                    ns.run("ip", "-batch", str(adds))
                finally:
                    os.kill(pid, signal.SIGCONT)
                stopped = settle(daemon)
                forced_now = sum(OVERRUN in message(line) for line in stopped.lines)
                forced += forced_now
                seen, kernel = last_snapshot(stopped.lines), kernel_routes(ns)
                out.append(f"forced overrun: daemon stopped (SIGSTOP) during {args.routes} route adds, "
                           f"then continued: {forced_now} overrun(s) logged, {len(stopped.reactions)} "
                           f"reaction(s); daemon's snapshot {seen} routes, kernel {kernel}")
                checks.append(("the forced overrun was logged", forced_now > 0))
                checks.append((f"after the overrun the daemon's view matches the kernel ({seen} == {kernel} "
                               "routes)", stopped.idle_at is not None and seen == kernel))
                ns.run("ip", "-batch", str(dels))
                settle(daemon)
            checks.append((f"at least one overrun in the run ({forced})", forced > 0))

            # 4. recovery: an ordinary change still gets its reaction, and the view is the kernel's
            mark = len(daemon.lines)
            changed = time.perf_counter()
            ns.run("ip", "route", "add", "192.0.2.0/24", "via", "198.51.100.1", "dev", "up1")
            line = daemon.wait_for("192.0.2.0/24", 30.0)
            recovery = time.perf_counter() - changed
            last = settle(daemon)
            lines = daemon.lines[mark:]
            reacted = reacted_to(lines, "192.0.2.0/24")
            seen, kernel = last_snapshot(lines), kernel_routes(ns)
            alive = daemon.proc.poll() is None
            out.append(f"recovery: a route change after the storm got a reaction in {recovery:.2f} s"
                       f"{'' if line else ' (none seen)'}; daemon's snapshot {seen} routes, kernel {kernel}")
            checks.append(("a later route change gets its reaction", reacted and alive))
            checks.append((f"the daemon's view matches the kernel ({seen} == {kernel} routes)",
                           last.idle_at is not None and seen == kernel))
            tail = daemon.lines[-15:]
    print("\n".join(out))
    for what, ok in checks:
        print(f"{verdict(ok)}  {what}")
    failed = [what for what, ok in checks if not ok]
    if failed:
        print("daemon log (last lines):", *tail, sep="\n  ")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
