"""Issue #6: how fast the pressure agent frees slots in a full table under a flood, and its CPU.

Run as root: ``.venv/bin/python bench/pressure.py [--rates 1000,10000,50000] [--duration 10]``.

For each flood rate, twice on the same table rebuilt each time (side by side,
in one run): once with the kernel alone, once with ``topowatch run`` and the
shipped ``90-pressure.toml`` policy. In a namespace of its own (removed at the
end; the host's table and sysctls are never touched):

1. the table is filled to ``nf_conntrack_max`` with idle assured UDP entries
   (ctnetlink; this namespace's ``nf_conntrack_udp_timeout_stream`` is raised
   to an hour so none expires during the run): the state in which the kernel
   refuses every new flow, because it can early-drop only non-assured entries;
2. a flood of new UDP flows (one datagram each, to loopback, each to a new
   port) at ``rate`` per second for ``duration`` seconds, counting those the
   kernel refused (``sendto`` fails with EPERM) and those it admitted;
3. reported per run: flows sent, admitted, refused, the time from the flood's
   start to the first admitted flow, the entries the agent evicted (by class,
   from its log), slots freed per second, and the daemon's CPU (user+system
   seconds over the flood, as a share of one core).

The flood's own entries are UNREPLIED: the kernel early-drops those itself
once flows are admitted again, and the agent evicts them first; the assured
entries go only while flows are being refused, a batch at a time.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from ipaddress import ip_address
from pathlib import Path

from topowatch.core.conntrack import IPS_ASSURED, IPS_SEEN_REPLY, CtTuple, Entry
from topowatch.core.model import AF_INET
from topowatch.edges.ctnetlink import Conntrack
from topowatch.errors import NetlinkError
from topowatch.lab import Daemon, log_record
from topowatch.netns import Namespace

REPO = Path(__file__).resolve().parents[1]
NETFILTER = "/proc/sys/net/netfilter"
RULESET = """\
table ip t {
    chain out {
        type filter hook output priority 0; policy accept;
        ct state new counter
    }
}
"""


@dataclass
class Run:
    rate: int
    agent: bool
    seconds: float
    sent: int = 0
    admitted: int = 0
    refused: int = 0
    first_admitted_s: float | None = None
    evicted: dict[str, int] = field(default_factory=dict)
    cpu_s: float = 0.0

    @property
    def freed_per_s(self) -> float:
        return sum(self.evicted.values()) / self.seconds if self.seconds else 0.0


def sysctl(ns: Namespace, name: str) -> int:
    return int(ns.run("cat", f"{NETFILTER}/{name}").split()[0])


def fill(ns: Namespace) -> int:
    """Fill the namespace's table with assured UDP entries until the kernel refuses (ENOMEM)."""
    limit = sysctl(ns, "nf_conntrack_max")

    def run() -> int:
        created = 0
        with Conntrack() as ct:
            n = 0
            while True:
                batch = []
                for _ in range(20000):
                    src = ip_address((10 << 24) + n)
                    sport = 1024 + n % 60000
                    batch.append(Entry(AF_INET, 17, CtTuple(src, ip_address("192.0.2.53"), sport, 53),
                                       CtTuple(ip_address("192.0.2.53"), src, 53, sport),
                                       IPS_SEEN_REPLY | IPS_ASSURED, 0, 0, 0, 3600 - n % 1800))
                    n += 1
                try:
                    created += ct.create(batch)
                except NetlinkError as exc:
                    if exc.errno != errno.ENOMEM:
                        raise
                    return created + len(batch) - int(str(exc).split("refused")[0].split()[-1].rstrip(";"))
                if created > limit * 2:
                    raise RuntimeError("the table never filled")

    ns.call(run)
    return sysctl(ns, "nf_conntrack_count")


def flood(ns: Namespace, rate: int, seconds: float, result: Run) -> None:
    """One datagram per new flow (a new destination port each), paced to ``rate`` per second."""

    def run() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        start = time.monotonic()
        port = 1
        try:
            while (now := time.monotonic()) - start < seconds:
                due = int((now - start) * rate) + 1
                while result.sent < due:
                    port = port % 65000 + 1
                    result.sent += 1
                    try:
                        sock.sendto(b"x", ("127.0.0.1", 1024 + (result.sent * 7919) % 64000))
                        result.admitted += 1
                        if result.first_admitted_s is None:
                            result.first_admitted_s = time.monotonic() - start
                    except PermissionError:
                        result.refused += 1
                time.sleep(0.001)
        finally:
            sock.close()

    ns.call(run)


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def daemon_pid(daemon: Daemon) -> int:
    """``ip netns exec`` execs the command: the Popen pid is the daemon's."""
    return daemon.proc.pid


def one_run(rate: int, seconds: float, agent: bool, rules: Path) -> Run:
    result = Run(rate, agent, seconds)
    ns = Namespace.create("twpb")
    try:
        ns.run("nft", "-f", "-", input=RULESET)
        ns.run("sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout_stream=3600")
        count = fill(ns)
        print(f"  table filled: {count:,} assured udp entries", flush=True)
        if not agent:
            flood(ns, rate, seconds, result)
            return result
        state = Path(tempfile.mkdtemp(prefix="twpb-state-"))
        try:
            with Daemon(ns, "--no-dbus", "--no-startup-sweep", "--rules-dir", str(rules),
                        "--state-dir", str(state), "--log-format", "json") as daemon:
                if daemon.wait_for("ready", 60) is None:
                    raise RuntimeError("daemon did not start: " + "\n".join(daemon.lines))
                if daemon.wait_for("pressure starts", 60) is None:
                    raise RuntimeError("no pressure seen: " + "\n".join(daemon.lines))
                pid = daemon_pid(daemon)
                cpu0 = cpu_seconds(pid)
                flood(ns, rate, seconds, result)
                result.cpu_s = cpu_seconds(pid) - cpu0
                daemon.stop()
            for line in daemon.lines:
                record = log_record(line)
                if record is not None and record.get("event") == "pressure_evict":
                    for what, n in record["by_class"].items():
                        result.evicted[what] = result.evicted.get(what, 0) + int(n)
        finally:
            shutil.rmtree(state, ignore_errors=True)
        return result
    finally:
        ns.delete()


def table(runs: list[Run]) -> str:
    head = ["rate/s", "who", "sent", "admitted", "refused", "first in (s)", "evicted", "freed/s", "CPU"]
    rows = [head]
    for r in runs:
        rows.append([
            f"{r.rate:,}", "topowatch" if r.agent else "kernel alone", f"{r.sent:,}", f"{r.admitted:,}",
            f"{r.refused:,}", "-" if r.first_admitted_s is None else f"{r.first_admitted_s:.2f}",
            ", ".join(f"{n:,} {k}" for k, n in r.evicted.items()) or "-",
            f"{r.freed_per_s:,.0f}" if r.agent else "-",
            f"{r.cpu_s / r.seconds:.0%} of a core" if r.agent else "-",
        ])  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="1000,10000,50000", help="flood rates, new flows per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of flood per run")
    parser.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/pressure.py: needs root (namespaces, ctnetlink)", file=sys.stderr)
        return 1
    rules = Path(tempfile.mkdtemp(prefix="twpb-rules-"))
    rules.chmod(0o755)
    shutil.copy(REPO / "rules.d" / "90-pressure.toml", rules / "90-pressure.toml")
    (rules / "90-pressure.toml").chmod(0o644)
    runs: list[Run] = []
    try:
        for rate in (int(r) for r in args.rates.split(",")):
            for agent in (False, True):
                print(f"rate {rate:,}/s, {'topowatch' if agent else 'kernel alone'}:", flush=True)
                runs.append(one_run(rate, args.duration, agent, rules))
    finally:
        shutil.rmtree(rules, ignore_errors=True)
    print()
    print(f"full table of idle assured udp, flood of new udp flows for {args.duration:g} s each "
          f"(policy: rules.d/90-pressure.toml)")
    print(table(runs))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) | {"freed_per_s": r.freed_per_s} for r in runs],
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
