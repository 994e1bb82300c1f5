"""Issue #5: topowatch vs conntrack-tools vs the kernel's own flush, on the same table.

Run as root from the repository: ``.venv/bin/python bench/flush.py [--quick] [--raise-limits]``.

Everything happens in namespaces this script creates (client, router, sink)
and removes. For each scenario and each method the router's table is rebuilt
identically: replied+assured entries inserted through ctnetlink ``create``,
UNREPLIED entries made by real UDP datagrams from the client through the
router's nftables NAT (a raw socket writing IPv4+UDP headers, one flow per
datagram). Then a route change leaves K UNREPLIED entries stale (192.0.2.0/24
moves from the transit uplink, no NAT, to the masqueraded uplink) and one
method removes stale entries:

- topowatch: the real daemon ``topowatch run --log-format json`` in the
  router namespace; its reaction record gives ``latency_ms`` (from first
  event to last delete) and the phases, one record per deleted entry
  follows, and the time from just before ``ip route replace`` to reading
  the reaction record is measured outside;
- conntrack-tools: ``conntrack -D -p udp -d 192.0.2.0/24``, plus a status
  filter that selects UNREPLIED entries if the installed version honours
  one in ``-D``: a canary probe in a throwaway namespace tries each spelling
  (``--status UNREPLIED``, ``--status UNSET``) and ``--status SEEN_REPLY``
  for comparison, and says what each did; without one it deletes a superset
  (the replied flows to that net too);
- the kernel: ``conntrack -F`` (everything), and where a canary probe in a
  throwaway namespace shows that the kernel honours it, a flush filtered by
  status (DELETE without a tuple, CTA_STATUS=0/CTA_STATUS_MASK=SEEN_REPLY:
  every UNREPLIED entry).

Afterwards the table is compared with what was built: entries deleted,
healthy ones deleted (collateral), stale ones left (missed). Each target of
the issue is printed with PASS or FAIL. The daemon runs with ``--no-dbus``
and reads policies only from a temporary rules directory whose policy caps
deletions well above the scenario's stale count (the host's /etc/topowatch
is never read).

The only host change it can make is raising ``nf_conntrack_max`` and the
hash size in the init namespace, and only with ``--raise-limits``; the old
values are written back on exit, also on failure or SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from types import FrameType
from typing import Any

from idle import watch_idle

from topowatch.core.conntrack import (
    IPS_ASSURED,
    IPS_DST_NAT_DONE,
    IPS_SEEN_REPLY,
    IPS_SRC_NAT_DONE,
    CtTuple,
    Entry,
)
from topowatch.edges import ctcodec
from topowatch.edges.ctnetlink import Conntrack
from topowatch.lab import Daemon
from topowatch.netns import Namespace, veth

CT_MAX = "/proc/sys/net/netfilter/nf_conntrack_max"
CT_BUCKETS = "/sys/module/nf_conntrack/parameters/hashsize"

STALE_NET = "192.0.2.0/24"  # moves from up1 (transit, no NAT) to up2 (masquerade)
STALE_BASE = int(IPv4Address("192.0.2.1"))
OTHER_BASE = int(IPv4Address("198.18.0.1"))  # stays on up1: healthy
UNREPLIED_SRC = int(IPv4Address("10.1.0.2"))
REPLIED_SRC = int(IPv4Address("10.128.0.2"))
MASQ_ADDR = IPv4Address("203.0.113.2")
FLOWS_PER_SOURCE = 50_000
DPORT = 5060
TIMEOUT = 1200

# Traffic like a real gateway's (issue #11): every entry its own flow key, or a Zipf mix (20k
# clients, 200k destinations, a few services). The more specific MOVE_NET moves from the
# transit uplink to the masqueraded one inside its covering WIDE_NET; the other destinations
# spread over EXTRA_ROUTES /24 routes in 100.64.0.0/10, alternately via each uplink, next to
# EXTRA_RULES NAT rules (port forwards and per-customer SNAT) that the traffic does not hit.
MOVE_NET = "198.18.0.0/16"
WIDE_NET = "198.18.0.0/15"
MOVE_BASE = int(IPv4Address("198.18.0.0"))
EXTRA_BASE = int(IPv4Address("100.64.0.0"))
EXTRA_ROUTES = 10_000
EXTRA_RULES = 2_000
CLIENTS = 20_000
DESTINATIONS = 200_000
SERVICES = (53, 123, 443, 500, 4500, 5060, 3478, 1194)

ROUTER_RULESET = """\
table ip twbench {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "up2" masquerade
    }
}
"""

SINK_RULESET = """\
table ip sink {
    chain pre {
        type filter hook prerouting priority raw; policy drop;
    }
}
"""

WINDOW_TARGET_MS = 10.0  # the remaining race window: re-read of a delete batch to its delete, p99


# --- host limits --------------------------------------------------------------


class Limits:
    """``nf_conntrack_max`` and the bucket count: raised for the run, restored after.

    ``restore`` writes each saved value back on its own: one failing write
    does not skip the other (a value not restored stays in ``saved`` and is
    said so). A signal that arrives meanwhile is held until both writes were
    tried; ``deferred`` then names it, for the caller to stop on.
    """

    HELD = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, max_path: str = CT_MAX, buckets_path: str = CT_BUCKETS) -> None:
        self.max_path = max_path
        self.buckets_path = buckets_path
        self.saved: dict[str, str] = {}
        self.deferred: int | None = None

    @staticmethod
    def read(path: str) -> int:
        return int(Path(path).read_text().strip())

    def write(self, path: str, value: str) -> None:
        Path(path).write_text(value)

    def raise_to(self, entries: int) -> list[str]:
        notes = []
        for path, want in ((self.max_path, entries), (self.buckets_path, entries)):
            old = self.read(path)
            if old >= want:
                continue
            self.saved.setdefault(path, str(old))
            self.write(path, str(want))
            notes.append(f"raised {path} from {old} to {want} (init namespace)")
        return notes

    def restore(self) -> list[str]:
        notes: list[str] = []
        held: dict[int, Any] = {}

        def hold(signum: int, frame: FrameType | None) -> None:
            if self.deferred is None:
                self.deferred = signum

        if threading.current_thread() is threading.main_thread():
            for number in self.HELD:
                held[number] = signal.signal(number, hold)
        try:
            # Buckets first: a max below the current count would make the kernel drop early.
            for path in (self.buckets_path, self.max_path):
                value = self.saved.get(path)
                if value is None:
                    continue
                try:
                    self.write(path, value)
                except OSError as exc:
                    notes.append(f"could NOT restore {path} to {value}: {exc}; write it back by hand")
                    continue
                del self.saved[path]
                notes.append(f"restored {path} to {value}")
        finally:
            for signum_held, handler in held.items():
                signal.signal(signum_held, handler)
        if self.deferred is not None:
            notes.append(f"{signal.Signals(self.deferred).name} arrived while restoring: held until done")
        return notes

    def restore_surely(self) -> list[str]:
        """``restore``, tried again if a signal ended the first try before it could hold signals."""
        signum: int
        try:
            return self.restore()
        except KeyboardInterrupt:
            signum = signal.SIGINT
        except SystemExit as exc:  # from _terminate: 128 + the signal
            signum = exc.code - 128 if isinstance(exc.code, int) and exc.code > 128 else signal.SIGTERM
        notes = self.restore()
        self.deferred = self.deferred or signum
        return notes


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


# --- the namespaces ---------------------------------------------------------------


@dataclass
class Bench:
    client: Namespace
    router: Namespace
    sink: Namespace
    ct: Conntrack

    @classmethod
    @contextlib.contextmanager
    def create(cls) -> Iterator[Bench]:
        made: list[Namespace] = []
        ct: Conntrack | None = None
        try:
            for prefix in ("twbcli", "twbrtr", "twbsnk"):
                made.append(Namespace.create(prefix))
                # No IPv6: link-local addresses finishing DAD would be topology events mid-run.
                for key in ("all", "default"):
                    made[-1].run("sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1")
            c, r, s = made
            veth(c, "lan0", r, "lan0")
            veth(r, "up1", s, "isp1")
            veth(r, "up2", s, "isp2")
            c.run("ip", "addr", "add", "10.0.0.254/8", "dev", "lan0")
            c.run("ip", "route", "add", "default", "via", "10.0.0.1")
            r.run("ip", "addr", "add", "10.0.0.1/8", "dev", "lan0")
            r.run("ip", "addr", "add", "198.51.100.2/24", "dev", "up1")
            r.run("ip", "addr", "add", "203.0.113.2/24", "dev", "up2")
            s.run("ip", "addr", "add", "198.51.100.1/24", "dev", "isp1")
            s.run("ip", "addr", "add", "203.0.113.1/24", "dev", "isp2")
            for key, value in (
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.lan0.rp_filter", "0"),
                ("net.netfilter.nf_conntrack_udp_timeout", str(TIMEOUT)),
                ("net.netfilter.nf_conntrack_udp_timeout_stream", str(TIMEOUT)),
            ):
                r.run("sysctl", "-qw", f"{key}={value}")
            r.run("nft", "-f", "-", input=ROUTER_RULESET)
            # The sink drops what it receives without answering (no ICMP).
            s.run("nft", "-f", "-", input=SINK_RULESET)
            for ns in (c, r):
                ns.run("ip", "neigh", "flush", "all")
            ct = Conntrack(r.socket(socket.AF_NETLINK, socket.SOCK_RAW, ctcodec.NETLINK_NETFILTER))
            yield cls(c, r, s, ct)
        finally:
            if ct is not None:
                ct.close()
            for ns in made:
                ns.delete()

    furnished: bool = False

    def route_before(self, net: str = STALE_NET) -> None:
        if net == MOVE_NET:
            self.router.run("ip", "route", "replace", WIDE_NET, "via", "198.51.100.1", "dev", "up1")
        self.router.run("ip", "route", "replace", net, "via", "198.51.100.1", "dev", "up1")
        self.router.run("ip", "route", "replace", "default", "via", "198.51.100.1", "dev", "up1")

    def route_change(self, net: str = STALE_NET) -> None:
        self.router.run("ip", "route", "replace", net, "via", "203.0.113.1", "dev", "up2")

    def furnish(self) -> None:
        """A large routing table and ruleset beside the scenario's (once; they stay for later scenarios)."""
        if self.furnished:
            return
        lines = []
        for i in range(EXTRA_ROUTES):
            net = IPv4Address(EXTRA_BASE + i * 256)
            via = "via 198.51.100.1 dev up1" if i % 2 else "via 203.0.113.1 dev up2"
            lines.append(f"route add {net}/24 {via}")
        self.router.run("ip", "-batch", "-", input="\n".join(lines) + "\n")
        rules = ["table ip twextra {", "  chain prerouting {",
                 "    type nat hook prerouting priority dstnat; policy accept;"]
        for i in range(EXTRA_RULES // 2):
            rules.append(f'    iifname "up2" udp dport {20000 + i} dnat to 10.3.{i // 250}.{i % 250 + 1}')
        rules += ["  }", "  chain postrouting {",
                  "    type nat hook postrouting priority srcnat - 1; policy accept;"]
        for i in range(EXTRA_RULES // 2):
            rules.append(f'    ip saddr 10.2.{i // 4}.{(i % 4) * 64}/26 oifname "up2" snat to 203.0.113.2')
        rules += ["  }", "}"]
        self.router.run("nft", "-f", "-", input="\n".join(rules) + "\n")
        self.furnished = True


# --- the table --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    n: int
    unreplied: int
    stale: int
    # "shared": 200 destinations, one port (few flow keys); "distinct": every entry its own flow
    # key; "zipf": a Zipf mix of 20k clients, 200k destinations and a few services.
    keys: str = "shared"

    @property
    def net(self) -> str:
        return STALE_NET if self.keys == "shared" else MOVE_NET


Flow4 = tuple[int, int, int, int]  # (src, sport, dst, dport) of one UNREPLIED flow


def unreplied_flows(sc: Scenario) -> list[Flow4]:
    """Each UNREPLIED flow: the first ``stale`` go to the net that moves."""
    if sc.keys != "shared":
        return keyed_flows(sc)
    out = []
    for i in range(sc.unreplied):
        base = STALE_BASE if i < sc.stale else OTHER_BASE
        src, sport = UNREPLIED_SRC + i // FLOWS_PER_SOURCE, 10000 + i % FLOWS_PER_SOURCE
        out.append((src, sport, base + i % 200, DPORT))
    return out


def _zipf(rng: Any, n: int, size: int) -> list[int]:
    """``size`` ranks in [0, n) drawn with weight 1/(rank+1) (s = 1), by inverting the cumulative sum."""
    import bisect
    import itertools

    cum = list(itertools.accumulate(1.0 / (k + 1) for k in range(n)))
    total = cum[-1]
    return [min(bisect.bisect_left(cum, rng.random() * total), n - 1) for _ in range(size)]


def keyed_flows(sc: Scenario) -> list[Flow4]:
    """Flows with a real gateway's key diversity; the first ``stale`` go into MOVE_NET, the rest elsewhere.

    Destinations outside MOVE_NET are spread over the EXTRA_ROUTES /24s (the gateway's big table).
    Every flow is its own conntrack entry (unique source port per client, destination and service).
    """
    import random

    rng = random.Random(11)
    n, k = sc.unreplied, sc.stale
    seen: set[Flow4] = set()
    out: list[Flow4] = []
    if sc.keys == "distinct":
        for i in range(n):
            client = UNREPLIED_SRC + i % CLIENTS
            if i < k:
                dst = MOVE_BASE + 1 + (i * 7919) % 65534
            else:
                j = i - k
                dst = EXTRA_BASE + ((j * 2654435761) % (EXTRA_ROUTES * 256))
            flow = (client, 10000 + (i // CLIENTS) % 50000, dst, SERVICES[i % len(SERVICES)])
            out.append(flow)
        return out
    clients = _zipf(rng, CLIENTS, n)
    dests = _zipf(rng, DESTINATIONS, n)
    services = _zipf(rng, len(SERVICES), n)
    # Destination ranks map to addresses: the stale ones in MOVE_NET, the rest over the extra routes.
    for i in range(n):
        rank = dests[i]
        if i < k:
            dst = MOVE_BASE + 1 + (rank * 7919) % 65534
        else:
            dst = EXTRA_BASE + (rank * 2654435761) % (EXTRA_ROUTES * 256)
        client = UNREPLIED_SRC + clients[i]
        sport = 1024 + rng.randrange(64000)
        flow = (client, sport, dst, SERVICES[services[i]])
        while flow in seen:
            sport = 1024 + rng.randrange(64000)
            flow = (client, sport, dst, SERVICES[services[i]])
        seen.add(flow)
        out.append(flow)
    return out


def replied_entries(sc: Scenario) -> list[Entry]:
    """Replied, assured entries; half of them to the net that moves (healthy: they are answered)."""
    out = []
    status = IPS_SEEN_REPLY | IPS_ASSURED | IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE
    for i in range(sc.n - sc.unreplied):
        src = IPv4Address(REPLIED_SRC + i // FLOWS_PER_SOURCE)
        sport = 10000 + i % FLOWS_PER_SOURCE
        if i % 2:
            dst = IPv4Address((STALE_BASE if sc.keys == "shared" else MOVE_BASE + 1) + i % 200)
            reply = CtTuple(dst, src, DPORT, sport)  # no NAT
        else:
            dst = IPv4Address(OTHER_BASE + i % 200)
            # Masqueraded; one address per source keeps the reply tuples unique.
            reply = CtTuple(dst, MASQ_ADDR + i // FLOWS_PER_SOURCE, DPORT, sport)
        out.append(Entry(2, 17, CtTuple(src, dst, sport, DPORT), reply, status=status, timeout=TIMEOUT))
    return out


def send_flows(bench: Bench, flows: list[Flow4]) -> float:
    """One UDP datagram per flow from the client, through the router; returns seconds."""
    sock = bench.client.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        ip_hdr = struct.Struct("!BBHHHBBHII")
        udp_hdr = struct.Struct("!HHHH")
        payload = b"topowatch-bench"
        total = 20 + 8 + len(payload)
        send = sock.sendto
        started = time.perf_counter()
        for src, sport, dst, dport in flows:
            # The kernel fills in the IP checksum and id; a UDP checksum of 0 means "none".
            packet = (
                ip_hdr.pack(0x45, 0, total, 0, 0, 64, 17, 0, src, dst)
                + udp_hdr.pack(sport, dport, 8 + len(payload), 0)
                + payload
            )
            while True:
                try:
                    send(packet, (str(IPv4Address(dst)), 0))
                    break
                except BlockingIOError:
                    time.sleep(0.001)
        return time.perf_counter() - started
    finally:
        sock.close()


def orig_keys(entries: list[Entry]) -> set[Flow4]:
    return {(int(e.orig.src), e.orig.sport, int(e.orig.dst), e.orig.dport) for e in entries}


@dataclass
class Table:
    stale: set[Flow4]
    healthy: set[Flow4]
    fill_seconds: float
    packets_seconds: float
    notes: list[str] = field(default_factory=list)


def rebuild(bench: Bench, sc: Scenario, replied: list[Entry], flows: list[Flow4]) -> Table:
    r = bench.router
    r.run("conntrack", "-F", check=False)
    bench.route_before(sc.net)
    started = time.perf_counter()
    bench.ct.create(replied)
    packets = send_flows(bench, flows)
    # Datagrams lost on the way (none expected) are sent again, once.
    present = orig_keys(bench.ct.dump(unreplied_only=False))
    missing = [f for f in flows if f not in present]
    if missing:
        packets += send_flows(bench, missing)
        present = orig_keys(bench.ct.dump(unreplied_only=False))
    fill = time.perf_counter() - started
    stale = {f for f in flows[: sc.stale] if f in present}
    healthy = present - stale
    table = Table(stale, healthy, fill, packets)
    if len(present) != sc.n:
        table.notes.append(f"table holds {len(present)} entries, not {sc.n}")
    return table


def outcome(bench: Bench, table: Table) -> dict[str, int]:
    left = orig_keys(bench.ct.dump(unreplied_only=False))
    before = table.stale | table.healthy
    return {
        "deleted": len(before - left),
        "collateral": len(table.healthy - left),
        "missed": len(table.stale & left),
    }


# --- the methods ----------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0])
    return out


DEBOUNCE = 0.01  # seconds; --debounce changes it (the time includes it: it runs from the event)
# The daemon's deletion cap: "table" twice the table (at least the kernel's table size, so its
# deletes may overlap the dump: ``edges.overlap``), "stale" twice K (above K, below the table's
# size: the deletes wait for the dump's end, as under the default cap of 100,000). --cap.
CAP = "table"
SWEEPS = 3  # --sweeps: daemon starts whose startup sweep is timed per keyed scenario
WRAP: tuple[str, ...] = ()  # --wrap: a command the daemon runs under (a profiler)

POLICY = """\
# bench/flush.py: every trigger, UNREPLIED entries only, a cap far above the scenario's stale count.
[policy.bench]
action = "flush"
unreplied_only = true
max_deletions = {cap}
"""


def rules_dir(tmp: str, cap: int) -> str:
    """A rules directory of its own: the daemon never reads the host's /etc/topowatch."""
    rules = Path(tmp, "rules.d")
    rules.mkdir(mode=0o755)
    policy = rules / "50-bench.toml"
    policy.write_text(POLICY.format(cap=cap))
    policy.chmod(0o644)
    return str(rules)


def _phases(record: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.0f} ms" for k, v in record["timings"].items())


def _startup_sweep(daemon: Daemon) -> dict[str, Any]:
    """The reaction record of a just started daemon's startup sweep."""
    if daemon.wait_for("ready", 60) is None:
        raise SystemExit("topowatch did not become ready:\n" + "\n".join(daemon.lines))
    first = daemon.wait_record(lambda r: r.get("event") == "reaction", 600)
    if first is None:
        raise SystemExit("no startup sweep:\n" + "\n".join(daemon.lines[-20:]))
    return dict(first)


def run_topowatch(bench: Bench, sc: Scenario, idle: float) -> dict[str, Any]:
    """The daemon's reactions, read from its JSON log records (``--log-format json``), never its text."""
    # Never the cap edge, whatever K is: twice the whole table, or twice the stale entries.
    cap = max(2 * sc.n, 1000) if CAP == "table" else max(2 * sc.stale, 1000)
    with tempfile.TemporaryDirectory(prefix="twbench") as tmp:
        sweep = sc.keys != "shared"  # the startup sweep is timed on the keyed scenarios
        args: tuple[str, ...] = ("--no-dbus", "--rules-dir", rules_dir(tmp, cap), "--debounce", str(DEBOUNCE),
                                 "--max-deletions", str(cap), "--log-format", "json")
        if not sweep:
            args += ("--no-startup-sweep",)
        result: dict[str, Any] = {"max_deletions": cap}
        sweeps: list[dict[str, Any]] = []
        # The kernel's walk of the same table varies by up to 2x from one dump to the next (here,
        # two modes near 47 and 70 ms at 160k/10%, quiet and at load 2). So the startup sweep is timed on
        # SWEEPS daemon starts, each right after one undecoded dump (the floor's sample), and
        # the two are compared as medians of the same count, taken in turn.
        for _ in range(SWEEPS - 1 if sweep else 0):
            result.setdefault("floor_samples", []).append(kernel_dump_only(bench.ct))
            with Daemon(bench.router, *args, prefix=WRAP) as daemon:
                sweeps.append(_startup_sweep(daemon))
        if sweep:
            result.setdefault("floor_samples", []).append(kernel_dump_only(bench.ct))
        with Daemon(bench.router, *args, prefix=WRAP) as daemon:
            pid = daemon.proc.pid
            if sweep:
                sweeps.append(_startup_sweep(daemon))
                result["sweeps"] = sweeps
                middle = sorted(sweeps, key=lambda r: r["latency_ms"])[(len(sweeps) - 1) // 2]
                result["sweep_seconds"] = middle["latency_ms"] / 1000  # the median (lower of two middles)
                result["sweep_phases"] = _phases(middle)
            elif daemon.wait_for("ready", 60) is None:
                raise SystemExit("topowatch did not become ready:\n" + "\n".join(daemon.lines))
            if idle:
                time.sleep(0.5)
                watch = watch_idle(pid, idle)
                result["idle_seconds"] = idle
                result["idle_wakeups"] = watch.switches
                result["idle_threads"] = (watch.threads_before, watch.threads_after)
                result["idle_text"] = watch.describe()
            started = time.perf_counter()
            started_monotonic = time.monotonic()
            bench.route_change(sc.net)

            def ours(r: dict[str, Any]) -> bool:  # a reaction to something else does not count
                return r.get("event") == "reaction" and sc.net in f"{r.get('change')} {r.get('trigger')}"

            record = daemon.wait_record(ours, 300)
            external = time.perf_counter() - started
            status = proc_status(pid)
            if record is None:
                raise SystemExit("topowatch did not react:\n" + "\n".join(daemon.lines[-20:]))
            # Its per-entry records follow it: one per stale entry.
            number = record["reaction"]
            entries: list[dict[str, Any]] = []
            while len(entries) < record["stale"]:
                entry = daemon.wait_record(
                    lambda r: r.get("event") == "entry" and r.get("reaction") == number, 30)
                if entry is None:
                    break
                entries.append(entry)
    result.update(
        seconds=record["latency_ms"] / 1000,
        external_seconds=external,
        # From just before `ip route replace` to the daemon's stamp at its last delete (CLOCK_MONOTONIC,
        # one clock for every process): the event to the last delete seen from outside, without the
        # logging that follows the deletes (the reaction's line reads every stale record's code).
        to_last_delete_seconds=record["ended_monotonic"] - started_monotonic,
        phases=_phases(record),
        timings=record["timings"],
        rss_peak_mb=status["VmHWM"] / 1024,
        log=record["msg"],
        record={k: v for k, v in record.items() if k != "msg"},
        examined=record["examined"], eligible=record["eligible"], stale=record["stale"],
        entry_records=len(entries),
        entry_codes=dict(Counter(r["code"] for r in entries)),
    )
    result["recheck_p99_ms"] = record.get("recheck_window_p99_ms")
    return result


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


@dataclass(frozen=True, slots=True)
class ConntrackTools:
    """The installed conntrack-tools: its version and what ``-D --status`` really does with canaries."""

    version: str
    status_delete: dict[str, str]  # --status value -> what -D did to an unreplied and a replied canary
    unreplied_status: str | None  # a --status value -D honours to select UNREPLIED entries, if any

    def delete_args(self, net: str = STALE_NET) -> list[str]:
        args = ["-D", "-p", "udp", "-d", net]
        if self.unreplied_status is not None:
            args += ["--status", self.unreplied_status]
        return args

    def describe(self) -> str:
        found = "; ".join(f"-D --status {k}: {v}" for k, v in self.status_delete.items())
        if self.unreplied_status is not None:
            verdict = f"it selects UNREPLIED entries with --status {self.unreplied_status}: an exact filter"
        else:
            verdict = ("no -D filter selects UNREPLIED entries: a SUPERSET of the stale entries is deleted "
                       "(the replied flows to that net are collateral)")
        probe = "canary probe in a throwaway namespace"
        return f"conntrack-tools {self.version} ({probe}): {found}. So {verdict}"


def conntrack_version() -> str:
    try:
        proc = subprocess.run(["conntrack", "--version"], capture_output=True, text=True, check=False)
    except OSError as exc:
        return f"unknown ({exc})"
    match = re.search(r"v(\d+(?:\.\d+)+)", proc.stdout + proc.stderr)
    return match.group(1) if match else f"unknown ({(proc.stdout + proc.stderr).strip()[:80]!r})"


# Spellings that could select UNREPLIED entries (none is documented for -D); SEEN_REPLY shows whether
# -D honours --status at all.
STATUS_SPELLINGS = (("UNREPLIED", "unreplied"), ("UNSET", "unreplied"), ("SEEN_REPLY", "replied"))


def probe_conntrack_tools() -> ConntrackTools:
    """Ask the installed conntrack with canaries in a namespace of its own: which -D --status works?"""
    found: dict[str, str] = {}
    unreplied_status = None
    a, b = IPv4Address("10.9.0.1"), IPv4Address("10.9.0.2")
    canaries = {
        "unreplied": Entry(2, 17, CtTuple(a, b, 1, 2), CtTuple(b, a, 2, 1), status=0, timeout=60),
        "replied": Entry(2, 17, CtTuple(a, b, 3, 2), CtTuple(b, a, 2, 3),
                         status=IPS_SEEN_REPLY | IPS_ASSURED, timeout=60),
    }
    with Namespace.create("twbctp") as ns:
        sock = ns.socket(socket.AF_NETLINK, socket.SOCK_RAW, ctcodec.NETLINK_NETFILTER)
        sock.bind((0, 0))
        with Conntrack(sock) as ct:
            for spelling, wanted in STATUS_SPELLINGS:
                ns.run("conntrack", "-F", check=False)
                ct.create(list(canaries.values()))
                proc = subprocess.run(
                    ["ip", "netns", "exec", ns.name, "conntrack", "-D", "-p", "udp", "--status", spelling],
                    capture_output=True, text=True, check=False,
                )
                left = orig_keys(ct.dump(unreplied_only=False))
                gone = sorted(name for name, e in canaries.items() if orig_keys([e]) - left)
                if proc.returncode != 0 and not gone:
                    text = proc.stderr.strip()
                    why = text.splitlines()[-1][:80] if text else f"exit {proc.returncode}"
                    found[spelling] = f"refused ({why})"
                elif gone == [wanted]:
                    found[spelling] = f"honoured (deleted only the {wanted} canary)"
                    if wanted == "unreplied" and unreplied_status is None:
                        unreplied_status = spelling
                elif len(gone) == len(canaries):
                    found[spelling] = "ignored (deleted both canaries)"
                else:
                    found[spelling] = f"deleted {', '.join(gone) or 'nothing'}"
    return ConntrackTools(conntrack_version(), found, unreplied_status)


def run_conntrack_tools(bench: Bench, tools: ConntrackTools, net: str) -> dict[str, Any]:
    bench.route_change(net)
    args = tools.delete_args(net)
    seconds = timed(lambda: bench.router.run("conntrack", *args, check=False))
    return {"seconds": seconds, "filter": "conntrack " + " ".join(args)}


def run_kernel_flush(bench: Bench, net: str) -> dict[str, Any]:
    bench.route_change(net)
    seconds = timed(lambda: bench.router.run("conntrack", "-F"))
    return {"seconds": seconds, "filter": "conntrack -F"}


def run_plain_deletes(bench: Bench, table: Table) -> dict[str, Any]:
    """The floor's deletes: exactly the stale entries, batched deletes by tuple and id, nothing re-checked.

    The entries are found by a dump and their requests encoded (as ``Conntrack.delete`` batches
    them) before the clock starts: timed is the kernel's part, sending the batches and reading
    their answers. The daemon's re-check before each delete is inside its time, not in this floor.
    """
    ct = bench.ct
    entries = [e for e in ct.dump(unreplied_only=True)
               if (int(e.orig.src), e.orig.sport, int(e.orig.dst), e.orig.dport) in table.stale]
    batches = list(ct._chunks(entries, lambda e, seq: ctcodec.encode_delete(e, seq, ack=False)))
    outcomes: list[Any] = []
    seconds = timed(lambda: outcomes.extend(ct._transact(encoded, first) for encoded, first in batches))
    errors: Counter[int] = Counter()
    for out in outcomes:
        errors.update(out.errors)
    text = f"{len(entries)} deletes by tuple and id in {len(batches)} batches, encoded before the clock"
    return {"seconds": seconds, "filter": text, "errors": dict(errors)}


def filtered_flush_message(seq: int) -> bytes:
    """DELETE without a tuple, filtered by status: every UNREPLIED entry. Only in throwaway namespaces."""
    body = ctcodec.nla(ctcodec.CTA_STATUS, ctcodec.be32(0)) + ctcodec.nla(
        ctcodec.CTA_STATUS_MASK, ctcodec.be32(IPS_SEEN_REPLY)
    )
    head = ctcodec._NLMSGHDR.pack(
        20 + len(body), ctcodec.IPCTNL_MSG_CT_DELETE, ctcodec.NLM_F_REQUEST | ctcodec.NLM_F_ACK, seq, 0
    )
    return bytes(head + ctcodec._NFGENMSG.pack(0, ctcodec.NFNETLINK_V0, 0) + body)


def filtered_flush(sock: socket.socket) -> int:
    seq = int.from_bytes(os.urandom(3), "big")
    sock.sendto(filtered_flush_message(seq), (0, 0))
    while True:
        data = sock.recv(1 << 16)
        for answer_seq, err in ctcodec.parse_answers(data):
            if answer_seq == seq:
                return int(err)


def probe_filtered_flush() -> bool:
    """Canaries in a namespace of their own: is the status filter honoured by a flush?"""
    with Namespace.create("twbprobe") as ns:
        sock = ns.socket(socket.AF_NETLINK, socket.SOCK_RAW, ctcodec.NETLINK_NETFILTER)
        sock.bind((0, 0))
        with Conntrack(sock) as ct:
            a, b = IPv4Address("10.9.0.1"), IPv4Address("10.9.0.2")
            unreplied = Entry(2, 17, CtTuple(a, b, 1, 2), CtTuple(b, a, 2, 1), status=0, timeout=60)
            replied = Entry(
                2,
                17,
                CtTuple(a, b, 3, 2),
                CtTuple(b, a, 2, 3),
                status=IPS_SEEN_REPLY | IPS_ASSURED,
                timeout=60,
            )
            ct.create([unreplied, replied])
            err = filtered_flush(ct.sock)
            left = orig_keys(ct.dump(unreplied_only=False))
            return err == 0 and left == orig_keys([replied])


def run_filtered_flush(bench: Bench, net: str) -> dict[str, Any]:
    bench.route_change(net)
    sock = bench.router.socket(socket.AF_NETLINK, socket.SOCK_RAW, ctcodec.NETLINK_NETFILTER)
    sock.bind((0, 0))
    try:
        started = time.perf_counter()
        err = filtered_flush(sock)
        seconds = time.perf_counter() - started
    finally:
        sock.close()
    if err:
        raise SystemExit(f"filtered flush failed: {os.strerror(err)}")
    return {"seconds": seconds, "filter": "kernel flush, CTA_STATUS=0 mask SEEN_REPLY"}


# --- decode rates -----------------------------------------------------------------------


class _Counter:
    """A ``Conntrack.scan`` consumer that only counts: the decode alone, every field decide reads."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, entry: Entry) -> None:
        self.count += 1

    def add_raw(self, raw: tuple[Any, ...]) -> None:
        self.count += 1


def decode_rates(bench: Bench) -> dict[str, Any]:
    """Our dump+decode vs ``conntrack -L`` on the same table, entries/s.

    Two of ours: ``dump`` returns ``Entry`` values (the list API); ``scan``
    streams the raw records the daemon's dump+decide reads (every field:
    family, both tuples, status, zone, mark, id, timeout), without building
    an object per entry.
    """
    out: dict[str, Any] = {}
    best = 0.0
    for _ in range(2):
        started = time.perf_counter()
        n = len(bench.ct.dump(unreplied_only=False))
        best = max(best, n / (time.perf_counter() - started))
    out["topowatch_dump_all"] = best
    best = 0.0
    for _ in range(2):
        started = time.perf_counter()
        n = bench.ct.scan(_Counter, unreplied_only=False).count
        best = max(best, n / (time.perf_counter() - started))
    out["topowatch_scan_all"] = best
    saved = ctcodec._ctscan
    ctcodec._ctscan = None  # the pure-Python path the compiled one replaces, on the same table
    try:
        started = time.perf_counter()
        n = bench.ct.scan(_Counter, unreplied_only=False).count
        out["topowatch_scan_pure"] = n / (time.perf_counter() - started)
    finally:
        ctcodec._ctscan = saved
    out["scan_path"] = ctcodec.FAST_PATH
    walks = [kernel_dump_only(bench.ct) for _ in range(2)]
    out["kernel_dump_unreplied_s"] = min(walks)
    out["kernel_dump_unreplied_samples"] = walks
    for label, stdout in (("conntrack_L_pipe", subprocess.PIPE), ("conntrack_L_devnull", subprocess.DEVNULL)):
        started = time.perf_counter()
        proc = subprocess.run(
            ["ip", "netns", "exec", bench.router.name, "conntrack", "-L"],
            stdout=stdout,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        dt = time.perf_counter() - started
        if stdout == subprocess.PIPE:
            n = proc.stdout.count(b"\n")
        out[label] = n / dt
    return out


def kernel_dump_only(ct: Conntrack) -> float:
    """Seconds the kernel takes for the daemon's dump (UNREPLIED entries, status filter), undecoded.

    Every datagram is received and dropped; only its last 20 bytes are looked at, for the
    NLMSG_DONE that ends the dump (always a datagram's last message). This is the floor
    of any tool that finds stale entries by dumping: the kernel has no prefix filter.
    """
    seq = ct._next_seq()
    started = time.perf_counter()
    ct._send(ctcodec.encode_dump_request(seq, status=(0, IPS_SEEN_REPLY)))
    while True:
        data = ct._recv(block=True)
        assert data is not None
        if len(data) >= 20:
            mlen, mtype, _flags, mseq, _pid = ctcodec._NLMSGHDR.unpack_from(data, len(data) - 20)
            if mseq == seq and mlen == 20 and mtype == ctcodec.NLMSG_DONE:
                return time.perf_counter() - started


PYROUTE2_SCRIPT = r"""
import sys, time
from pyroute2 import Conntrack
ct = Conntrack()
t = time.perf_counter()
n = sum(1 for _ in ct.dump_entries())
print(n, time.perf_counter() - t)
"""


def library_rates(entries: int) -> dict[str, float]:
    """pyroute2's conntrack dump vs ours on one small table (pyroute2 is slow)."""
    with (
        Namespace.create("twbpyr") as ns,
        Conntrack(ns.socket(socket.AF_NETLINK, socket.SOCK_RAW, ctcodec.NETLINK_NETFILTER)) as ct,
    ):
        sc = Scenario("pyroute2", entries, 0, 0)
        ct.create(replied_entries(sc))
        started = time.perf_counter()
        n = len(ct.dump(unreplied_only=False))
        ours = n / (time.perf_counter() - started)
        proc = ns.popen(
            [sys.executable, "-c", PYROUTE2_SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            return {"entries": entries, "topowatch": ours, "pyroute2": float("nan")}
        try:
            count, seconds = out.split()
            theirs = int(count) / float(seconds)
        except ValueError:
            print(f"pyroute2 failed: {err.strip()[-300:]}", file=sys.stderr)
            theirs = float("nan")
    return {"entries": entries, "topowatch": ours, "pyroute2": theirs}


# --- the run ------------------------------------------------------------------------------


METHODS = ("topowatch", "conntrack-tools", "kernel -F", "kernel filtered", "plain deletes")


def scenarios(quick: bool) -> list[Scenario]:
    sizes = [20_000] if quick else [100_000, 1_000_000]
    out = []
    for n in sizes:
        for k_percent in (1, 10):
            name = f"{n // 1000}k 10% unreplied, K={k_percent}%"
            out.append(Scenario(name, n, n // 10, n * k_percent // 100))
    flood = 20_000 if quick else 1_000_000
    out.append(Scenario(f"{flood // 1000}k all unreplied (flood), K=10%", flood, flood, flood // 10))
    # Issue #11: a real gateway's key diversity, beside a big routing table and ruleset.
    for n in [20_000] if quick else [160_000, 1_000_000]:
        for keys in ("distinct",) if quick else ("distinct", "zipf"):
            for share in (100,) if quick else (10, 100):
                for k_permille in (125,) if quick else (10, 125):
                    unreplied = n * share // 100
                    name = (f"{n // 1000}k {keys} keys, {share}% unreplied, "
                            f"K={k_permille / 10:g}% of unreplied")
                    out.append(Scenario(name, n, unreplied, unreplied * k_permille // 1000, keys))
    return out


def run_scenario(
    bench: Bench, sc: Scenario, filtered_ok: bool, tools: ConntrackTools, idle: float
) -> dict[str, Any]:
    if sc.keys != "shared":
        bench.furnish()
    replied = replied_entries(sc)
    flows = unreplied_flows(sc)
    result: dict[str, Any] = {"scenario": sc.name, "n": sc.n, "unreplied": sc.unreplied, "k": sc.stale}
    methods: dict[str, dict[str, Any]] = {}
    for method in METHODS:
        if method == "kernel filtered" and not filtered_ok:
            continue
        if method == "plain deletes" and sc.keys == "shared":
            continue  # the floor's deletes are measured for the keyed scenarios (issue #11)
        table = rebuild(bench, sc, replied, flows)
        result.setdefault(
            "built",
            {
                "entries": len(table.stale) + len(table.healthy),
                "stale": len(table.stale),
                "fill_s": table.fill_seconds,
                "packets_s": table.packets_seconds,
                "notes": table.notes,
            },
        )
        if method == "topowatch":
            result["decode"] = decode_rates(bench)
            got = run_topowatch(bench, sc, idle)
            idle = 0
        elif method == "conntrack-tools":
            got = run_conntrack_tools(bench, tools, sc.net)
        elif method == "kernel -F":
            got = run_kernel_flush(bench, sc.net)
        elif method == "plain deletes":
            got = run_plain_deletes(bench, table)
        else:
            got = run_filtered_flush(bench, sc.net)
        got.update(outcome(bench, table))
        methods[method] = got
        print(
            f"  {method:<16} {got['seconds']:8.3f} s  deleted {got['deleted']:>8}  collateral "
            f"{got['collateral']:>8}  missed {got['missed']:>6}",
            flush=True,
        )
    result["methods"] = methods
    return result


def fmt_table(results: list[dict[str, Any]]) -> str:
    head = [
        "scenario",
        "N",
        "K",
        "method",
        "time s",
        "topowatch/this",
        "deleted",
        "collateral",
        "missed",
        "peak RSS MB",
    ]
    rows = [head]
    for res in results:
        methods = res["methods"]
        assert isinstance(methods, dict)
        tw = methods["topowatch"]["seconds"]
        for name, m in methods.items():
            ratio = "1.00" if name == "topowatch" else f"{tw / m['seconds']:.2f}x"
            rss = f"{m['rss_peak_mb']:.0f}" if "rss_peak_mb" in m else ""
            time_text = f"{m['seconds']:.3f}"
            if "external_seconds" in m:
                ext, log_ext = m["to_last_delete_seconds"], m["external_seconds"]
                time_text += f" (ext {ext:.3f}, to its log {log_ext:.3f})"
            rows.append(
                [
                    str(res["scenario"]),
                    str(res["n"]),
                    str(res["k"]),
                    name,
                    time_text,
                    ratio,
                    str(m["deleted"]),
                    str(m["collateral"]),
                    str(m["missed"]),
                    rss,
                ]
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small tables (20k) for a smoke run")
    parser.add_argument(
        "--raise-limits",
        action="store_true",
        help="raise nf_conntrack_max and the hash size in the init namespace for the run "
        "(restored after); without it, larger scenarios are skipped",
    )
    parser.add_argument("--idle", type=float, default=10.0, help="seconds to watch the idle daemon (0: skip)")
    parser.add_argument("--only", help="run only scenarios whose name contains this text "
                        "(several texts separated by '|': any of them)")
    parser.add_argument(
        "--debounce",
        type=float,
        default=0.01,
        help="the daemon's debounce window in seconds (default 0.01); it is part of the timed path",
    )
    parser.add_argument(
        "--cap",
        choices=("table", "stale"),
        default="table",
        help="the daemon's deletion cap: twice the table (default; its deletes may overlap the dump where "
        "that is at least the kernel's table size) or twice the stale count (they wait for the dump's end)",
    )
    parser.add_argument("--sweeps", type=int, default=3, help="daemon starts whose startup sweep is timed "
                        "per keyed scenario, each after one undecoded dump (default 3; medians compared)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--wrap", default="", help="a command the daemon runs under, split at spaces "
                        "(a profiler that ends with the daemon; its times are then not the daemon's)")
    args = parser.parse_args(argv)
    global DEBOUNCE, CAP, WRAP, SWEEPS  # one setting for the whole run
    DEBOUNCE, CAP, WRAP, SWEEPS = args.debounce, args.cap, tuple(args.wrap.split()), max(1, args.sweeps)
    if os.geteuid() != 0:
        print("bench/flush.py needs root (namespaces, conntrack)", file=sys.stderr)
        return 2
    wanted = [part for part in (args.only or "").split("|") if part]
    chosen = [s for s in scenarios(args.quick) if not wanted or any(part in s.name for part in wanted)]
    limits = Limits()
    notes: list[str] = []
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    results: list[dict[str, Any]] = []
    try:
        biggest = max(s.n for s in chosen)
        if args.raise_limits:
            # Room for the largest table plus the host's own entries, in every namespace's count.
            for note in limits.raise_to(biggest + (biggest >> 2) + 65536):
                print(note, flush=True)
                notes.append(note)
        ct_max = Limits.read(CT_MAX)
        runnable = []
        for sc in chosen:
            if sc.n + 1000 > ct_max:
                note = f"skipped {sc.name}: nf_conntrack_max is {ct_max} (use --raise-limits)"
                print(note, flush=True)
                notes.append(note)
            else:
                runnable.append(sc)
        tools = probe_conntrack_tools()
        print(tools.describe(), flush=True)
        notes.append(tools.describe())
        filtered_ok = probe_filtered_flush()
        note = (
            "kernel honours a status-filtered flush (canary probe in a throwaway namespace)"
            if filtered_ok
            else "kernel ignores the flush status filter: filtered flush not run"
        )
        print(note, flush=True)
        notes.append(note)
        libs = library_rates(2000 if args.quick else 5000)
        idle = args.idle
        with Bench.create() as bench:
            for sc in runnable:
                print(f"scenario {sc.name}: N={sc.n} UNREPLIED={sc.unreplied} K={sc.stale}", flush=True)
                results.append(run_scenario(bench, sc, filtered_ok, tools, idle))
                idle = 0
    finally:
        for note in limits.restore_surely():
            print(note, flush=True)
            notes.append(note)
        if limits.deferred is not None:
            raise SystemExit(128 + limits.deferred)
    for res in results:
        res["targets"] = targets(res)
    report(results, libs, tools, notes)
    if args.json is not None:
        args.json.write_text(json.dumps({"results": results, "libraries": libs, "notes": notes}, indent=2))
    return 0


RSS_AT = 1_000_000  # the RSS target is stated for a table of a million entries


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets for one scenario: what was measured, and PASS, FAIL or n/a."""
    m = res["methods"]
    tw = m["topowatch"]
    # Judged on the time seen from outside: from just before `ip route replace` to the last delete.
    t = tw["to_last_delete_seconds"]
    out: list[dict[str, Any]] = []

    def add(target: str, measured: str, ok: bool | None) -> None:
        out.append({"target": target, "measured": measured,
                    "verdict": "n/a" if ok is None else "PASS" if ok else "FAIL"})

    ct = m["conntrack-tools"]["seconds"]
    d = res.get("decode")
    if "sweep_seconds" in tw and isinstance(d, dict):
        # Issue #11: the floor of a dumping tool is the kernel's undecoded UNREPLIED dump plus the
        # deletes: exactly the stale entries, batched by tuple and id, nothing re-checked ("plain
        # deletes", on a table of its own). The daemon's re-check is inside its time, not the floor.
        # The undecoded dump: the median of every walk of this table (two before the daemon, one
        # before each of its starts), the same statistic as the sweep's.
        walks = [*d["kernel_dump_unreplied_samples"], *tw.get("floor_samples", [])]
        dump = statistics.median_low(walks)  # one of the walks, never an average of two
        floor = dump + m["plain deletes"]["seconds"]
        bound = max(0.5 * ct, 1.3 * floor)
        add("event to last delete <= max(0.5 x conntrack-tools, 1.3 x floor)",
            f"{t:.3f} s vs max({0.5 * ct:.3f}, {1.3 * floor:.3f}) s (floor: dump {dump:.3f} s + deletes "
            f"{floor - dump:.3f} s); {t / floor:.2f}x the floor", t <= bound)
        sweep = tw["sweep_seconds"]
        each = ", ".join(f"{r['latency_ms'] / 1000:.3f}" for r in tw.get("sweeps", []))
        add("startup sweep <= 1.5 x floor (the undecoded UNREPLIED dump; medians)",
            f"{sweep:.3f} s vs {dump:.3f} s = {sweep / dump:.2f}x (sweeps {each} s; {len(walks)} walks "
            f"{min(walks):.3f}-{max(walks):.3f} s; the median sweep: {tw['sweep_phases']})",
            sweep <= 1.5 * dump)
    keyed = "sweep_seconds" in tw and isinstance(d, dict)  # judged by the target above, which holds this one
    add("topowatch <= 0.5 x conntrack-tools" + (" (part of the first target here)" if keyed else ""),
        f"{t:.3f} s vs {ct:.3f} s = {t / ct:.2f}x (by the log's time {tw['seconds'] / ct:.2f}x)",
        None if keyed else t / ct <= 0.5)
    d = res.get("decode")
    if isinstance(d, dict):
        floor = d["kernel_dump_unreplied_s"]
        add("(floor) the kernel's own dump of the UNREPLIED entries, nothing decoded, vs conntrack-tools",
            f"{floor:.3f} s vs {ct:.3f} s = {floor / ct:.2f}x: a dumping tool cannot go below it", None)
    if res["unreplied"] != res["n"]:
        full = m["kernel -F"]["seconds"]
        add("topowatch <= 3 x kernel full flush (10%-UNREPLIED table)",
            f"{t:.3f} s vs {full:.3f} s = {t / full:.2f}x", t / full <= 3)
    d = res.get("decode")
    if isinstance(d, dict):
        listing = max(d["conntrack_L_pipe"], d["conntrack_L_devnull"])
        scan = d["topowatch_scan_all"]
        add("decode rate >= conntrack -L",
            f"topowatch scan {scan:,.0f}/s vs conntrack -L {listing:,.0f}/s (its faster run)",
            scan >= listing)
    add("zero collateral, zero missed (topowatch)", f"collateral {tw['collateral']}, missed {tw['missed']}",
        tw["collateral"] == 0 and tw["missed"] == 0)
    p99 = tw.get("recheck_p99_ms")
    if p99 is None:
        add(f"re-check window p99 < {WINDOW_TARGET_MS:.0f} ms at 1M", "not in the reaction record", False)
    elif res["n"] >= RSS_AT:
        add(f"re-check window p99 < {WINDOW_TARGET_MS:.0f} ms at 1M", f"{p99:.2f} ms", p99 < WINDOW_TARGET_MS)
    else:
        add(f"re-check window p99 < {WINDOW_TARGET_MS:.0f} ms at 1M", f"{p99:.2f} ms at N={res['n']}: "
            "judged at 1M only", None)
    rss = tw["rss_peak_mb"]
    if res["n"] >= RSS_AT:
        add("peak RSS < 200 MB at 1M", f"{rss:.0f} MB", rss < 200)
    else:
        add("peak RSS < 200 MB at 1M", f"{rss:.0f} MB at N={res['n']}: judged at 1M only", None)
    return out


def report(results: list[dict[str, Any]], libs: dict[str, float], tools: ConntrackTools, notes: list[str]
           ) -> None:
    print()
    print(fmt_table(results))
    print()
    print(
        "time: topowatch = the reaction record's latency_ms, from first event to last delete (ext: from "
        "just before `ip route replace` to the last delete, by the record's CLOCK_MONOTONIC stamp of it; to "
        "its log: to reading that record, after the reaction's line is made); others = the command's wall "
        "time."
    )
    print(
        f"topowatch runs with --debounce {DEBOUNCE}: the quiet gap that ends a burst is inside its time."
    )
    for res in results:
        tw = res["methods"]["topowatch"]
        p99 = tw.get("recheck_p99_ms")
        window = "n/a" if p99 is None else f"{p99:.2f} ms"
        print(f"  topowatch phases, {res['scenario']}: {tw['phases']}; re-check window p99 {window}; "
              f"deletion cap {tw.get('max_deletions')} (--cap {CAP})")
    print(f"conntrack-tools filter: conntrack {' '.join(tools.delete_args())} "
          f"(keyed scenarios: -d {MOVE_NET})")
    print(f"  {tools.describe()}")
    print(
        "plain deletes: the floor's deletes (exactly the stale entries, by tuple and id, not re-checked); "
        "kernel filtered flush: every UNREPLIED entry (a superset: healthy UNREPLIED flows go too); "
        "kernel -F: every entry."
    )
    print(
        "UNREPLIED entries: real UDP datagrams through the router's nftables NAT; replied/assured "
        "entries: ctnetlink create()."
    )
    print()
    print("dump+decode rates on the same table (entries/s):")
    for res in results:
        d = res.get("decode")
        if isinstance(d, dict):
            print(
                f"  {res['scenario']:<36} topowatch scan {d['topowatch_scan_all']:>10,.0f}   "
                f"dump to Entry list {d['topowatch_dump_all']:>10,.0f}   "
                f"conntrack -L | pipe {d['conntrack_L_pipe']:>10,.0f}   "
                f"conntrack -L >/dev/null {d['conntrack_L_devnull']:>10,.0f}"
            )
            floor = d["kernel_dump_unreplied_s"]
            pure = d["topowatch_scan_pure"]
            print(
                f"  {'':<36} scan path: {d['scan_path']}; pure-Python scan {pure:>10,.0f}; the kernel "
                f"alone (UNREPLIED dump, undecoded) {res['unreplied'] / floor:>10,.0f} = {floor:.3f} s"
            )
    print(
        f"library vs fast path ({int(libs['entries'])} entries): pyroute2 {libs['pyroute2']:,.0f}/s, "
        f"topowatch codec {libs['topowatch']:,.0f}/s"
    )
    for res in results:
        tw = res["methods"]["topowatch"]
        if "idle_text" in tw:
            print(f"idle daemon: {tw['idle_text']}")
    print()
    print("targets (PASS/FAIL from this run; topowatch's time is the one seen from outside):")
    for res in results:
        print(f"  {res['scenario']}")
        for t in res["targets"]:
            print(f"    {t['verdict']:<4}  {t['target']}: {t['measured']}")
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    signal.signal(signal.SIGINT, _terminate)
    sys.exit(main())
