"""Issue #11: events that can re-NAT no flow cost no conntrack dump, on a large table.

Run as root from the repository: ``.venv/bin/python bench/nochange.py [--entries N] [--raise-limits]``.

In the namespaces of bench/flush.py (the router with 10,000 extra routes and 2,000 extra NAT
rules), the router's table is filled with N UNREPLIED entries, each its own flow key (real UDP
datagrams through the router's NAT). ``topowatch run`` starts there (its startup sweep is the
one full judgement), then ``--events`` changes that no rule-reached table or NAT family can
feel are made, one every ``--interval`` seconds so that each is its own reaction: a route added
and removed in a table no rule selects, an IPv6 link-local address added and removed (the
router NATs IPv4 only), and the carrier of an unrelated link going down and up. Printed: the
reactions, how many made a conntrack dump (the target is none), and the daemon's CPU time for
all of them, children included (target: under 1 s). ``--raise-limits`` raises
``nf_conntrack_max`` in the init namespace for tables above it, and restores it after.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from flush import CT_MAX, DEBOUNCE, Bench, Limits, Scenario, _terminate, rebuild, replied_entries, rules_dir
from flush import unreplied_flows as flows_of

from topowatch.lab import Daemon, log_record


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all threads) and of its waited-for children, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def event(bench: Bench, i: int) -> str:
    r = bench.router
    step, up = divmod(i, 2)
    kind = step % 3
    if kind == 0:
        verb = "add" if up == 0 else "del"
        r.run("ip", "route", verb, "198.18.0.0/15", "via", "203.0.113.1", "dev", "up2", "table", "200")
        return f"route {verb} in table 200"
    if kind == 1:
        verb = "add" if up == 0 else "del"
        extra = ("nodad",) if verb == "add" else ()
        r.run("ip", "-6", "addr", verb, "fe80::77/64", "dev", "quiet0", *extra)
        return f"link-local address {verb}"
    state = "down" if up == 0 else "up"
    bench.sink.run("ip", "link", "set", "quiet1", state)  # the peer is elsewhere: only the carrier moves
    return f"carrier of quiet0 {state}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=100)
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--raise-limits", action="store_true")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/nochange.py needs root", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    limits = Limits()
    try:
        if args.raise_limits:
            for note in limits.raise_to(args.entries + (args.entries >> 2) + 65536):
                print(note, flush=True)
        if args.entries + 1000 > Limits.read(CT_MAX):
            print(f"nf_conntrack_max is {Limits.read(CT_MAX)}: use --raise-limits or fewer --entries")
            return 2
        sc = Scenario("no-change events", args.entries, args.entries, 0, "distinct")
        with Bench.create() as bench:
            bench.furnish()
            r = bench.router
            r.run("ip", "link", "add", "quiet0", "type", "veth", "peer", "name", "quiet1", "netns", bench.sink.name)
            r.run("sysctl", "-qw", "net.ipv6.conf.quiet0.disable_ipv6=0")
            r.run("ip", "link", "set", "quiet0", "up")
            bench.sink.run("ip", "link", "set", "quiet1", "up")
            table = rebuild(bench, sc, replied_entries(sc), flows_of(sc))
            print(
                f"table: {len(table.healthy) + len(table.stale)} entries, each its own flow key "
                f"(filled in {table.fill_seconds:.1f} s)",
                flush=True,
            )
            with tempfile.TemporaryDirectory(prefix="twbnochg") as tmp:
                cap = 2 * args.entries
                with Daemon(r, "--no-dbus", "--rules-dir", rules_dir(tmp, cap), "--debounce", str(DEBOUNCE),
                            "--max-wait", "0.1", "--max-deletions", str(cap),
                            "--log-format", "json") as daemon:  # fmt: skip
                    if daemon.wait_for("ready", 120) is None:
                        raise SystemExit("topowatch did not become ready:\n" + "\n".join(daemon.lines))
                    sweep = daemon.wait_record(lambda rec: rec.get("event") == "reaction", 600)
                    print(f"startup sweep: {sweep['msg'] if sweep else None}", flush=True)
                    time.sleep(1.0)
                    pid = daemon.proc.pid
                    before = cpu_seconds(pid)
                    seen = len(daemon.lines)
                    kinds: dict[str, int] = {}
                    for i in range(args.events):
                        what = event(bench, i).rsplit(" ", 1)[0]
                        kinds[what] = kinds.get(what, 0) + 1
                        time.sleep(args.interval)
                    daemon.wait_for("\x00 nothing matches this", 2.0)  # reads what it logged meanwhile
                    used = cpu_seconds(pid) - before
                    tail = daemon.lines[seen:]
                    # The reactions' JSON records (the machine interface), not their text lines.
                    reactions = [rec for rec in map(log_record, tail)
                                 if rec is not None and rec.get("event") == "reaction"]
                    lines = [str(rec["msg"]) for rec in reactions]
                    if not lines:
                        print("no reaction logged; the daemon said:\n" + "\n".join(tail[-30:]))
        dumps = [str(rec["msg"]) for rec in reactions if rec.get("dumped", True)]
        print(
            f"events: {args.events} ({', '.join(f'{k} x{v}' for k, v in kinds.items())}), "
            f"one every {args.interval:.2f} s"
        )
        print(f"reactions: {len(lines)}; with a conntrack dump: {len(dumps)}")
        for line in dumps[:5]:
            print(f"  dumped: {line}")
        for line in lines[:6]:
            print(f"  {line}")
        print(f"daemon CPU for all of them (threads and children): {used:.3f} s")
        print(f"{'PASS' if not dumps else 'FAIL'}  zero conntrack dumps ({len(dumps)})")
        print(f"{'PASS' if used < 1.0 else 'FAIL'}  daemon CPU < 1 s ({used:.3f} s)")
        return 0 if not dumps and used < 1.0 else 1
    finally:
        for note in limits.restore_surely():
            print(note, flush=True)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, _terminate)
    sys.exit(main())
