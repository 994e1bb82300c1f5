# SPDX-License-Identifier: GPL-2.0-or-later
"""The namespace lab: a gateway whose uplink changes, flows that get stuck, topowatch fixing them.

Topology (every namespace created here, removed at the end):

    client 10.0.1.2 --lan0-- router --up1 198.51.100.2 (transit, no NAT)-- wan
                                    --up2 203.0.113.2  (DSL, masquerade)--  wan
                                    --up3 100.64.0.2   (LTE, snat)--------  wan
    wan holds the servers 192.0.2.10 (SIP sink, echo on port 7) and 192.0.2.30.

Before: default via up1 (no NAT), 192.0.2.30 via up3 (snat to 100.64.0.2).
The flip (one burst): the DSL line takes the default route, the LTE route goes.
Flows that never get an answer keep their old NAT: the SIP server sees the
private source 10.0.1.2, the other server the LTE address on the DSL line.
A replied flow (echo) is healthy and must be left alone.

The kernel is the oracle: after the flip a fresh flow (new source port, same
addresses) shows the NAT today's topology gives. This module only builds and
observes the lab; it never touches the host's namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from topowatch.core.conntrack import Entry
from topowatch.errors import TopowatchError
from topowatch.netns import Namespace, veth

NETLINK_NETFILTER = 12

ROUTER_RULESET = """\
table inet labnat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "up2" masquerade
        oifname "up3" snat ip to 100.64.0.2
    }
}
"""

SIP_SERVER = "192.0.2.10"
OTHER_SERVER = "192.0.2.30"

# A UDP sink that reports each (source, sport, destination) it sees, and an echo on port 7.
# Bounded: it exits by itself after ``lifetime`` seconds.
SERVER_SCRIPT = r"""
import select, socket, sys, time
lifetime = float(sys.argv[1])
socks = []
# The echo socket is bound to the server address so its replies carry it as source.
for addr, port in (("0.0.0.0", 5060), ("192.0.2.10", 7)):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_IP, 8, 1)  # IP_PKTINFO: learn the destination
    s.bind((addr, port))
    socks.append(s)
print("listening", flush=True)
end = time.monotonic() + lifetime
last = {}
while time.monotonic() < end:
    ready, _, _ = select.select(socks, [], [], 0.5)
    for s in ready:
        data, anc, _, (src, sport) = s.recvmsg(2048, 256)
        dst = "?"
        for level, kind, raw in anc:
            if level == socket.SOL_IP and kind == 8:
                dst = socket.inet_ntoa(raw[8:12])
        port = s.getsockname()[1]
        if port == 7:
            s.sendto(data, (src, sport))
        key = (data.decode(errors="replace"),)
        if last.get(key) != src:
            last[key] = src
            print(f"{data.decode(errors='replace')} {src} {sport} {dst} {port}", flush=True)
"""

# Sends one datagram per flow every 100 ms from fixed source ports; bounded lifetime.
CLIENT_SCRIPT = r"""
import socket, sys, time
lifetime = float(sys.argv[1])
flows = [a.split(",") for a in sys.argv[2:]]
socks = []
for name, sport, dst, dport in flows:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(sport)))
    s.setblocking(False)
    socks.append((name, s, (dst, int(dport))))
end = time.monotonic() + lifetime
while time.monotonic() < end:
    for name, s, addr in socks:
        try:
            s.sendto(name.encode(), addr)
            s.recv(2048)
        except OSError:
            pass
    time.sleep(0.1)
"""


class LineReader:
    """Lines from a pipe with a timeout, unbuffered (a buffered reader hides lines from select)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""
        self.eof = False

    def readline(self, timeout: float) -> str:
        end = time.monotonic() + timeout
        while b"\n" not in self.buffer and not self.eof:
            remaining = end - time.monotonic()
            if remaining <= 0:
                return ""
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if not ready:
                return ""
            chunk = os.read(self.fd, 65536)
            if not chunk:
                self.eof = True
            self.buffer += chunk
        if b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
        else:
            line, self.buffer = self.buffer, b""
        return line.decode(errors="replace").strip()

    def rest(self) -> list[str]:
        """Everything left until EOF (the writer has exited)."""
        while not self.eof:
            chunk = os.read(self.fd, 65536)
            self.eof = not chunk
            self.buffer += chunk
        lines = [line.strip() for line in self.buffer.decode(errors="replace").splitlines() if line.strip()]
        self.buffer = b""
        return lines


@dataclass(frozen=True, slots=True)
class LabFlow:
    name: str
    sport: int
    dst: str
    dport: int
    replied: bool = False


FLOWS = (
    LabFlow("sip-phone", 5060, SIP_SERVER, 5060),
    LabFlow("monitoring", 5062, OTHER_SERVER, 5060),
    LabFlow("echo", 7000, SIP_SERVER, 7, replied=True),
)


@dataclass
class Lab:
    """Three namespaces and the processes that make traffic in them."""

    client: Namespace
    router: Namespace
    wan: Namespace
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    server: subprocess.Popen[str] | None = None
    seen: dict[str, str] = field(default_factory=dict)
    _server_out: LineReader | None = None

    # -- building -------------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def create(cls, keep: bool = False, ruleset: str = ROUTER_RULESET) -> Iterator[Lab]:
        created: list[Namespace] = []
        lab: Lab | None = None
        try:
            for prefix in ("twcli", "twrtr", "twwan"):
                created.append(Namespace.create(prefix))
            lab = cls(created[0], created[1], created[2])
            lab.build(ruleset)
            yield lab
        finally:
            if lab is not None:
                lab.stop_traffic()
            if not keep:
                for ns in created:
                    ns.delete()

    def build(self, ruleset: str = ROUTER_RULESET) -> None:
        c, r, w = self.client, self.router, self.wan
        veth(c, "lan0", r, "lan0")
        veth(r, "up1", w, "isp1")
        veth(r, "up2", w, "isp2")
        veth(r, "up3", w, "isp3")
        c.run("ip", "addr", "add", "10.0.1.2/24", "dev", "lan0")
        c.run("ip", "route", "add", "default", "via", "10.0.1.1")
        r.run("ip", "addr", "add", "10.0.1.1/24", "dev", "lan0")
        r.run("ip", "addr", "add", "198.51.100.2/24", "dev", "up1")
        r.run("ip", "addr", "add", "203.0.113.2/24", "dev", "up2")
        r.run("ip", "addr", "add", "100.64.0.2/24", "dev", "up3")
        r.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        w.run("ip", "addr", "add", "198.51.100.1/24", "dev", "isp1")
        w.run("ip", "addr", "add", "203.0.113.1/24", "dev", "isp2")
        w.run("ip", "addr", "add", "100.64.0.1/24", "dev", "isp3")
        w.run("ip", "addr", "add", f"{SIP_SERVER}/32", "dev", "lo")
        w.run("ip", "addr", "add", f"{OTHER_SERVER}/32", "dev", "lo")
        # Replies (echo) to the client's private net go back over the transit link.
        w.run("ip", "route", "add", "10.0.1.0/24", "via", "198.51.100.2")
        r.run("nft", "-f", "-", input=ruleset)
        self.topology_before()

    def topology_before(self) -> None:
        r = self.router
        r.run("ip", "route", "replace", "default", "via", "198.51.100.1", "dev", "up1")
        r.run("ip", "route", "replace", f"{OTHER_SERVER}/32", "via", "100.64.0.1", "dev", "up3")

    def flip(self) -> None:
        """The DSL line takes the default route; the LTE host route goes (one burst)."""
        r = self.router
        r.run("ip", "route", "replace", "default", "via", "203.0.113.1", "dev", "up2")
        r.run("ip", "route", "del", f"{OTHER_SERVER}/32")

    # -- traffic --------------------------------------------------------------

    def start_traffic(self, flows: tuple[LabFlow, ...] = (), lifetime: float = 120.0) -> None:
        flows = flows or FLOWS
        self.server = self.wan.popen(
            [sys.executable, "-c", SERVER_SCRIPT, str(lifetime)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert self.server.stdout is not None
        self._server_out = LineReader(self.server.stdout.fileno())
        line = self._server_out.readline(10.0)
        if line != "listening":
            raise TopowatchError(f"lab server did not start: {line!r}")
        args = [f"{f.name},{f.sport},{f.dst},{f.dport}" for f in flows]
        self.procs.append(
            self.client.popen(
                [sys.executable, "-c", CLIENT_SCRIPT, str(lifetime), *args],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    def send_once(self, name: str, sport: int, dst: str, dport: int) -> None:
        """One datagram from the client (a fresh flow for the oracle)."""
        script = (
            "import socket,sys;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
            "s.bind(('0.0.0.0',int(sys.argv[2])));s.sendto(sys.argv[1].encode(),(sys.argv[3],int(sys.argv[4])))"
        )
        self.client.run(sys.executable, "-c", script, name, str(sport), dst, str(dport))

    def server_seen(self, settle: float = 0.5) -> dict[str, str]:
        """The source address the servers last saw, per flow name (drains the sink's output)."""
        if self.server is None or self._server_out is None:
            return dict(self.seen)
        end = time.monotonic() + settle
        while (remaining := end - time.monotonic()) > 0:
            line = self._server_out.readline(remaining)
            if not line:
                continue
            parts = line.split()
            if len(parts) >= 2:
                self.seen[parts[0]] = parts[1]
        return dict(self.seen)

    def wait_seen(self, name: str, want: str, timeout: float = 5.0) -> str:
        """What the server last saw of flow ``name``, once it is ``want`` or ``timeout`` has passed."""
        end = time.monotonic() + timeout
        seen = ""
        while time.monotonic() < end:
            seen = self.server_seen(settle=0.3).get(name, "")
            if seen == want:
                break
        return seen

    def stop_traffic(self) -> None:
        for proc in [*self.procs, *([self.server] if self.server else [])]:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        self.procs.clear()
        self.server = None

    # -- observing --------------------------------------------------------------

    def oracle(self, dst: str, dport: int, sport: int) -> Entry | None:
        """Kernel as oracle: a fresh flow from a new source port; its entry shows today's NAT."""
        self.send_once(f"oracle{sport}", sport, dst, dport)
        return self.entry_for(sport, dst)

    def router_entries(self) -> list[Entry]:
        return entries_in(self.router)

    def entry_for(self, sport: int, dst: str, entries: list[Entry] | None = None) -> Entry | None:
        for e in entries if entries is not None else self.router_entries():
            if e.orig.sport == sport and str(e.orig.dst) == dst and str(e.orig.src).startswith("10.0.1."):
                return e
        return None

    def wait_entry(self, sport: int, dst: str, timeout: float = 5.0) -> Entry:
        """``entry_for``, waited for: the entry once it is there; TimeoutError after ``timeout``."""
        end = time.monotonic() + timeout
        while True:
            e = self.entry_for(sport, dst)
            if e is not None:
                return e
            if time.monotonic() >= end:
                raise TimeoutError(f"no entry for sport {sport} -> {dst} within {timeout} s")
            time.sleep(0.05)


def entries_in(ns: Namespace) -> list[Entry]:
    """Every conntrack entry of ``ns``, replied or not."""
    from topowatch.edges.ctnetlink import Conntrack

    ct = Conntrack(ns.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER))
    try:
        return ct.dump(unreplied_only=False)
    finally:
        ct.close()


def thread_switches(pid: int) -> dict[int, int]:
    """Voluntary + involuntary context switches of each thread of ``pid``, by thread id.

    What the idle checks (tests and benchmarks) compare: a thread that never
    woke has the same count before and after.
    """
    out: dict[int, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended while we looked
        out[int(task.name)] = sum(
            int(line.split()[1])
            for line in text.splitlines()
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"))
        )
    return out


def log_record(line: str) -> dict[str, Any] | None:
    """A ``--log-format json`` line as its object; None for any other line."""
    if not line.startswith("{"):
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


class Daemon:
    """``topowatch run`` in a namespace, its log read line by line."""

    def __init__(self, ns: Namespace, *args: str, prefix: Sequence[str] = ()) -> None:
        self.proc = ns.popen(
            [*prefix, sys.executable, "-m", "topowatch", "run", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stderr is not None
        self.reader = LineReader(self.proc.stderr.fileno())
        self.lines: list[str] = []

    def wait_for(self, needle: str, timeout: float = 20.0) -> str | None:
        end = time.monotonic() + timeout
        while (remaining := end - time.monotonic()) > 0:
            line = self.reader.readline(remaining)
            if line:
                self.lines.append(line)
                if needle in line:
                    return line
            elif self.proc.poll() is not None:
                return None
        return None

    def pump(self) -> None:
        """Read what the daemon has logged so far, without waiting for more.

        Call it while the daemon works unobserved: a pipe nobody reads fills up
        (64 KiB) and then blocks the daemon at its next log line.
        """
        while line := self.reader.readline(0.001):
            self.lines.append(line)

    def wait_record(
        self, match: Callable[[dict[str, Any]], bool], timeout: float = 20.0
    ) -> dict[str, Any] | None:
        """The next ``--log-format json`` record for which ``match`` is true (None: none in time)."""
        end = time.monotonic() + timeout
        while (remaining := end - time.monotonic()) > 0:
            line = self.wait_for("", remaining)
            if line is None:
                return None
            obj = log_record(line)
            if obj is not None and match(obj):
                return obj
        return None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.lines.extend(self.reader.rest())
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return self.proc.returncode

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, row in enumerate(rows):
        out.append("  " + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if n == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(out)


def _snapshot(lab: Lab, title: str, oracle: dict[str, str] | None = None) -> str:
    entries = lab.router_entries()
    seen = lab.server_seen()
    header = ["flow", "router entry (orig -> NATed source)", "state", "server sees"]
    if oracle is not None:
        header.append("fresh flow gets (oracle)")
    rows = [header]
    for flow in FLOWS:
        e = lab.entry_for(flow.sport, flow.dst, entries)
        if e is None:
            entry_text, state = "(no entry)", "-"
        else:
            entry_text = f"{e.orig.src}:{e.orig.sport} -> {e.orig.dst}:{e.orig.dport} as {e.reply.dst}"
            state = "UNREPLIED" if e.unreplied else "replied"
        row = [flow.name, entry_text, state, seen.get(flow.name, "-")]
        if oracle is not None:
            row.append(oracle.get(flow.name, "-"))
        rows.append(row)
    return f"\n{title}\n{_table(rows)}\n"


def _oracle(lab: Lab, base_port: int) -> dict[str, str]:
    """Fresh flows from new source ports: the NAT today's topology gives each destination."""
    result: dict[str, str] = {}
    for i, flow in enumerate(FLOWS):
        sport = base_port + i
        lab.send_once(f"oracle-{flow.name}", sport, flow.dst, 5060)
        e = lab.entry_for(sport, flow.dst)
        result[flow.name] = str(e.reply.dst) if e is not None else "-"
    return result


def run_lab(keep: bool = False) -> int:
    """The demo: stuck flows without topowatch, then the same flip with the daemon running."""
    print("topowatch lab: building namespaces (client, router, wan) ...")
    with Lab.create(keep=keep) as lab:
        lab.start_traffic()
        time.sleep(1.0)
        print(_snapshot(lab, "1. Before: default route via up1 (transit, no NAT), "
                        "192.0.2.30 via up3 (LTE, snat)"))

        lab.flip()
        time.sleep(1.5)
        oracle = _oracle(lab, 40000)
        print(_snapshot(lab, "2. The DSL line (up2, masquerade) took the route. Without topowatch the "
                        "old NAT sticks:", oracle))

        lab.topology_before()
        time.sleep(1.0)
        print("3. Back to the old topology; now with `topowatch run` in the router namespace.")
        with Daemon(lab.router, "--debounce", "0.2", "--no-startup-sweep") as daemon:
            if daemon.wait_for("ready") is None:
                print("\n".join(daemon.lines))
                raise TopowatchError("the daemon did not become ready")
            started = time.monotonic()
            lab.flip()
            if daemon.wait_for("reaction 1 (") is None:
                print("\n".join(daemon.lines))
                raise TopowatchError("the daemon did not react to the flip")
            reacted = time.monotonic() - started
            time.sleep(1.0)
            oracle = _oracle(lab, 41000)
            print("\n   topowatch log:")
            for line in daemon.lines:
                print(f"   | {line}")
            print(_snapshot(lab, f"4. After topowatch reacted ({reacted:.2f} s after the flip):", oracle))
        seen = lab.server_seen()
        ok = all(seen.get(f.name) == oracle.get(f.name) for f in FLOWS if not f.replied)
        echo = lab.entry_for(7000, SIP_SERVER)
        healthy_kept = echo is not None and not echo.unreplied
        print(
            "Result: every stuck flow now reaches its server from the address a fresh flow gets: "
            + ("yes" if ok else "NO")
        )
        print("        the replied (healthy) echo flow was left alone: " + ("yes" if healthy_kept else "NO"))
        if keep:
            print(f"namespaces kept: {lab.client.name} {lab.router.name} {lab.wan.name}")
        return 0 if ok and healthy_kept else 1
