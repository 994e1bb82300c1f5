"""A VPN gateway in namespaces, for the tunnel tests: real wireguard-go, OpenVPN and charon.

Topology (every namespace, link, process and file made here is removed by ``VpnLab.create``)::

    client 10.0.1.2 --lan0-- gw --wan0 203.0.113.2-- wan --peer0 198.51.100.254-- peer 198.51.100.1
                                                     servers 192.0.2.10/.20/.30    site server 172.16.0.10
                                                     (ISP 203.0.113.1)             tunnel ends 10.99.0.1,
                                                                                   10.98.0.1

The gateway masquerades out the WAN, except a fixed SNAT (192.0.2.20) and a
transit partner that takes the LAN's private source (192.0.2.30, no NAT).
Into a tunnel it masquerades too, except the site behind the peer
(172.16.0.0/24, no NAT) and the fixed-SNAT server (SNAT to the tunnel
address). The wan and peer namespaces NAT nothing, so a server sees the
address the gateway's conntrack entry gave the flow: the kernel's oracle (a
fresh flow's entry) can be compared with what a server saw.

Servers are UDP sinks that print every datagram they get (and an echo on
192.0.2.10:7, for a replied flow); the client sends one datagram per request
from a socket bound to the flow's source port, so a test decides exactly
when the first packet after a change leaves. The gateway runs
``topowatch run`` with the shipped policies, on a private system bus (the
shipped bus policy) that the contrib hooks reach it on.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from test_dbus import POLICY_FILE, SYSTEM_CONF, PrivateBus
from topowatch.core.conntrack import Entry
from topowatch.lab import NETLINK_NETFILTER, Daemon, LineReader, log_record
from topowatch.netns import Namespace, unique_name, veth

ROOT = Path(__file__).resolve().parents[2]
HOOK = ROOT / "contrib/vpn/topowatch-vpn"
RULES = ROOT / "rules.d"
PREFIX = "tv"

CLIENT = "10.0.1.2"
GW_LAN = "10.0.1.1"
GW_WAN = "203.0.113.2"
ISP = "203.0.113.1"
PEER_WAN = "198.51.100.1"
WAN_TO_PEER = "198.51.100.254"
MASQ_SERVER = "192.0.2.10"  # masqueraded out the WAN; also the echo (port 7)
SNAT_SERVER = "192.0.2.20"  # SNAT to a fixed address out the WAN and into a tunnel
TRANSIT_SERVER = "192.0.2.30"  # no NAT out the WAN (a partner routes the LAN back)
SITE_SERVER = "172.16.0.10"  # behind the peer; no NAT into a tunnel
SITE_NET = "172.16.0.0/24"
WG_GW, WG_PEER = "10.99.0.2", "10.99.0.1"
OVPN_GW, OVPN_PEER = "10.98.0.2", "10.98.0.1"
WG_PORT, OVPN_PORT, IKE_PORT = 51820, 1194, 500

# Every server and client process ends by itself after this many seconds (a bound, not a wait).
LIFETIME = 300.0

SINK_SCRIPT = r"""
import select, socket, sys, time
lifetime, echo = float(sys.argv[1]), sys.argv[2]
socks = []
for addr, port in [("0.0.0.0", 5060)] + ([(echo, 7)] if echo else []):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, port))
    socks.append(s)
print("listening", flush=True)
end = time.monotonic() + lifetime
while time.monotonic() < end:
    for s in select.select(socks, [], [], 0.5)[0]:
        data, (src, sport) = s.recvfrom(2048)
        if s.getsockname()[1] == 7:
            s.sendto(data, (src, sport))
        print(data.decode(errors="replace"), src, sport, flush=True)
"""

# Reads "payload sport dst dport" lines; sends each from a socket bound to sport (kept open, so
# every datagram of a flow has the same 5-tuple) and answers "sent" once it left.
SENDER_SCRIPT = r"""
import socket, sys
socks = {}
for line in sys.stdin:
    payload, sport, dst, dport = line.split()
    s = socks.get(sport)
    if s is None:
        s = socks[sport] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", int(sport)))
    try:
        s.sendto(payload.encode(), (dst, int(dport)))
        print("sent", flush=True)
    except OSError as exc:
        print("error", exc.errno, flush=True)
"""


def gateway_ruleset(tunnels: dict[str, str]) -> str:
    """The gateway's NAT: ``tunnels`` maps each tunnel device to the gateway's address in it."""
    names = ", ".join(f'"{name}"' for name in tunnels)
    snat = "\n".join(
        f'        oifname "{name}" ip daddr {SNAT_SERVER} snat ip to {addr}' for name, addr in tunnels.items()
    )
    return f"""\
table inet gwnat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan0" ip daddr {TRANSIT_SERVER} accept
        oifname "wan0" ip daddr {SNAT_SERVER} snat ip to {GW_WAN}
        oifname "wan0" masquerade
        oifname {{ {names} }} ip daddr {SITE_NET} accept
{snat}
        oifname {{ {names} }} masquerade
    }}
}}
"""


@dataclass(frozen=True, slots=True)
class Flow:
    """A UDP flow from the client: its server sees ``name`` in each datagram."""

    name: str
    sport: int
    dst: str
    dport: int = 5060


def flows(base: int) -> tuple[Flow, ...]:
    """One flow of each kind, from source ports ``base`` and up (each scenario its own)."""
    return (
        Flow("masq", base, MASQ_SERVER),
        Flow("snat", base + 1, SNAT_SERVER),
        Flow("null", base + 2, TRANSIT_SERVER),
        Flow("site", base + 3, SITE_SERVER),
        Flow("isp", base + 4, ISP),  # the ISP's connected net stays on the WAN: unchanged
        Flow("echo", base + 5, MASQ_SERVER, 7),  # replied: healthy, never judged
    )


class Process:
    """A process this lab started (by its pid: it never looks processes up by name)."""

    def __init__(self, proc: subprocess.Popen[str], what: str) -> None:
        self.proc = proc
        self.what = what
        self.out = LineReader(proc.stdout.fileno()) if proc.stdout is not None else None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        return self.proc.returncode


@dataclass
class VpnLab:
    client: Namespace
    gw: Namespace
    wan: Namespace
    peer: Namespace
    tmp: Path
    bus: PrivateBus
    processes: list[Process] = field(default_factory=list)
    # Process ids written by programs that fork (wireguard-go through wg-quick's wrapper).
    pidfiles: list[Path] = field(default_factory=list)
    # Files the programs make outside ``tmp`` (wireguard-go's UAPI sockets): checked gone at the end.
    paths: list[Path] = field(default_factory=list)
    # What the sinks saw: payload -> source address.
    seen: dict[str, str] = field(default_factory=dict)
    daemon: Daemon | None = None
    sender: Process | None = None
    _sinks: list[Process] = field(default_factory=list)

    # -- building ---------------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def create(cls, tunnels: dict[str, str]) -> Iterator[VpnLab]:
        """The lab with the daemon running; afterwards, a check that nothing of it is left."""
        created: list[Namespace] = []
        tmp = Path(tempfile.mkdtemp(prefix=f"{PREFIX}vpn-", dir="/tmp"))
        bus = PrivateBus(SYSTEM_CONF, policy=str(POLICY_FILE))
        lab: VpnLab | None = None
        try:
            bus.start()
            for role in ("cli", "gw", "wan", "peer"):
                created.append(Namespace.create(f"{PREFIX}{role}"))
                # IPv4 only: no link-local addresses and their DAD trickling in as events later.
                for key in ("default", "all"):
                    created[-1].run("sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1")
            lab = cls(*created, tmp=tmp, bus=bus)
            lab.build(tunnels)
            yield lab
        finally:
            pids: list[int] = []
            paths = [tmp, Path(bus.dir)]
            if lab is not None:
                pids = lab.stop_all()
                paths += lab.paths
            for ns in created:
                ns.delete()
            bus.close()
            shutil.rmtree(tmp, ignore_errors=True)
            left = leftovers([ns.name for ns in created], pids, paths)
            assert not left, f"the VPN lab left these behind: {left}"

    def build(self, tunnels: dict[str, str]) -> None:
        c, g, w, p = self.client, self.gw, self.wan, self.peer
        veth(c, "lan0", g, "lan0")
        veth(g, "wan0", w, "isp0")
        veth(p, "wan0", w, "peer0")
        c.run("ip", "addr", "add", f"{CLIENT}/24", "dev", "lan0")
        c.run("ip", "route", "add", "default", "via", GW_LAN)
        g.run("ip", "addr", "add", f"{GW_LAN}/24", "dev", "lan0")
        g.run("ip", "addr", "add", f"{GW_WAN}/24", "dev", "wan0")
        g.run("ip", "route", "add", "default", "via", ISP)
        w.run("ip", "addr", "add", f"{ISP}/24", "dev", "isp0")
        w.run("ip", "addr", "add", f"{WAN_TO_PEER}/24", "dev", "peer0")
        for server in (MASQ_SERVER, SNAT_SERVER, TRANSIT_SERVER):
            w.run("ip", "addr", "add", f"{server}/32", "dev", "lo")
        # The Internet side knows the site and the tunnels' nets behind the peer.
        for net in (SITE_NET, "10.99.0.0/24", "10.98.0.0/24"):
            w.run("ip", "route", "add", net, "via", PEER_WAN)
        p.run("ip", "addr", "add", f"{PEER_WAN}/24", "dev", "wan0")
        p.run("ip", "addr", "add", f"{SITE_SERVER}/32", "dev", "lo")
        p.run("ip", "route", "add", "default", "via", WAN_TO_PEER)
        for ns in (g, w, p):
            ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        g.run("nft", "-f", "-", input=gateway_ruleset(tunnels))
        self._sinks = [self._sink(w, MASQ_SERVER), self._sink(p, "")]
        self.sender = self.start(c, [sys.executable, "-u", "-c", SENDER_SCRIPT], "sender",
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        (self.tmp / "state").mkdir()
        env = ["env", f"DBUS_SYSTEM_BUS_ADDRESS={self.bus.address}"]
        self.daemon = Daemon(g, "-vv", "--log-format", "json", "--no-startup-sweep", "--rules-dir", str(RULES),
                             "--state-dir", str(self.tmp / "state"), prefix=env)
        if self.daemon.wait_for("ready") is None:
            raise AssertionError(f"topowatch did not start: {self.daemon.lines}")

    def _sink(self, ns: Namespace, echo: str) -> Process:
        sink = self.start(ns, [sys.executable, "-u", "-c", SINK_SCRIPT, str(LIFETIME), echo], "sink",
                          stdout=subprocess.PIPE)
        assert sink.out is not None and sink.out.readline(10.0) == "listening"
        return sink

    def start(self, ns: Namespace, argv: list[str], what: str, **kwargs: Any) -> Process:
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.DEVNULL)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = Process(ns.popen(argv, **kwargs), what)
        self.processes.append(proc)
        return proc

    def stop_all(self) -> list[int]:
        """Stop every process this lab started; their pids (for the leftovers check)."""
        pids: list[int] = []
        if self.daemon is not None:
            pids.append(self.daemon.proc.pid)
            self.daemon.stop()
        for proc in reversed(self.processes):
            pids.append(proc.pid)
            proc.stop()
        for pidfile in self.pidfiles:
            with contextlib.suppress(FileNotFoundError, ValueError):
                pid = int(pidfile.read_text())
                pids.append(pid)
                stop_pid(pid)
        return pids

    def hook_env(self) -> dict[str, str]:
        """What a contrib hook needs to reach this lab's daemon (its private bus, this checkout)."""
        return {
            "DBUS_SYSTEM_BUS_ADDRESS": self.bus.address,
            "TOPOWATCH": str(Path(sys.executable).parent / "topowatch"),
            "TOPOWATCH_HOOK_CONFIG": "/nonexistent",
        }

    # -- traffic ----------------------------------------------------------------

    def send(self, flow: Flow, payload: str, sport: int | None = None) -> None:
        """One datagram of ``flow`` (from ``sport`` instead: a fresh flow to the same server)."""
        assert self.sender is not None and self.sender.proc.stdin is not None and self.sender.out is not None
        self.sender.proc.stdin.write(f"{payload} {sport or flow.sport} {flow.dst} {flow.dport}\n")
        self.sender.proc.stdin.flush()
        answer = self.sender.out.readline(10.0)
        assert answer == "sent", f"sending {payload}: {answer!r}"

    def wait_seen(self, payload: str, timeout: float = 10.0) -> str | None:
        """The source a server saw ``payload`` from (None: no server saw it within ``timeout``)."""
        end = time.monotonic() + timeout
        while payload not in self.seen:
            remaining = end - time.monotonic()
            if remaining <= 0:
                return None
            for sink in self._sinks:
                assert sink.out is not None
                line = sink.out.readline(min(remaining, 0.05))
                if line:
                    name, src, _sport = line.split()
                    self.seen[name] = src
        return self.seen[payload]

    # -- conntrack --------------------------------------------------------------

    def entries(self) -> list[Entry]:
        from topowatch.edges.ctnetlink import Conntrack

        ct = Conntrack(self.gw.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER))
        try:
            return ct.dump(unreplied_only=False)
        finally:
            ct.close()

    def entry(self, sport: int, dst: str, dport: int | None = None) -> Entry | None:
        for e in self.entries():
            if (e.orig.sport == sport and str(e.orig.dst) == dst
                    and (dport is None or e.orig.dport == dport)):
                return e
        return None

    def wait_entry(self, sport: int, dst: str, until: Callable[[Entry], bool] = lambda e: True,
                   timeout: float = 10.0, dport: int | None = None) -> Entry:
        end = time.monotonic() + timeout
        while True:
            e = self.entry(sport, dst, dport)
            if e is not None and until(e):
                return e
            if time.monotonic() >= end:
                raise AssertionError(f"no entry for :{sport} -> {dst} as wanted within {timeout} s: {e}")
            time.sleep(0.05)

    # -- the daemon ---------------------------------------------------------------

    def records(self) -> list[dict[str, Any]]:
        """The daemon's JSON log records so far (drains its pipe without waiting)."""
        assert self.daemon is not None
        while self.daemon.wait_for("", 0.01) is not None:
            pass
        return [r for r in map(log_record, self.daemon.lines) if r is not None]

    def wait_hook(self, needle: str, since: int, timeout: float = 30.0) -> dict[str, Any]:
        """The reaction that took a contrib hook's request, the line ``needle`` (``hook_line``),
        logged from line ``since`` on.

        The daemon logs each TriggerEvent it takes and pushes it into the next burst; the reaction
        that took it names it among its triggers (a reaction already under way when the hook
        called does not: it judged what it found before the hook's change was done).
        """
        assert self.daemon is not None
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.records()
            for line in self.daemon.lines[since:]:
                r = log_record(line)
                if r is not None and r.get("event") == "reaction" and needle in str(r.get("trigger")):
                    return r
            time.sleep(0.1)
        raise AssertionError(f"no reaction to {needle!r}: {self.daemon.lines[since:]}")

    def log_mark(self) -> tuple[int, int]:
        """(lines logged so far, the last reaction's number): where a change's records begin."""
        assert self.daemon is not None
        numbers = [r["reaction"] for r in self.records() if r.get("event") == "reaction"]
        return len(self.daemon.lines), max(numbers, default=0)


def hook_line(interface: str, detail: str, kind: str = "dispatcher") -> str:
    """What the daemon logs when a hook's TriggerEvent reaches it."""
    return f"D-Bus {kind}" + (f" for {interface}" if interface else "") + f": {detail}"


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM a process this lab started (by its recorded pid), then SIGKILL it if it stays."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < end:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def leftovers(namespaces: list[str], pids: list[int], paths: list[Path]) -> list[str]:
    """What is still there of a lab: its namespaces, live processes, files, wireguard sockets."""
    names = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                               check=False).stdout.split())
    left = [f"namespace {n}" for n in namespaces if n in names]
    left += [f"process {pid}" for pid in pids if pid_alive(pid)]
    left += [f"file {p}" for p in paths if p.exists()]
    return left


def tunnel_name(kind: str) -> str:
    """A device name unique on the machine (wireguard-go's socket path is global): tv<kind><hex>."""
    return unique_name(f"{PREFIX}{kind}")


# -- a scenario: flows stuck, a change, topowatch's reaction, the oracle, the first packets ---------

Key = tuple[int, str, int]  # a client flow: source port, server, server port


@dataclass
class Outcome:
    """What one change did to the client's entries (every one in the table, the earlier
    scenarios' too), and the counts the report gives. A scenario's own flows go by name."""

    flows: dict[str, Key]
    before: dict[Key, Entry]
    after: dict[Key, Entry | None]
    oracle: dict[tuple[str, int], str]  # the source a fresh flow to (server, port) gets now
    first: dict[str, str | None]  # the source the server saw each flow's first packet after from
    deleted: set[Key]  # client entries topowatch deleted
    reactions: list[dict[str, Any]]
    tunnel_before: Entry | None = None
    tunnel_after: Entry | None = None
    tunnel_deleted: bool = False
    deleted_others: list[dict[str, Any]] = field(default_factory=list)  # deleted entries of no client flow
    undecided: list[dict[str, Any]] = field(default_factory=list)  # the reactions' undecided records

    def expected(self, key: Key) -> str:
        return self.oracle[key[1], key[2]]

    @property
    def stale(self) -> set[Key]:
        """UNREPLIED entries whose binding differs from the one a fresh flow gets (the oracle)."""
        return {k for k, e in self.before.items() if e.unreplied and str(e.reply.dst) != self.expected(k)}

    @property
    def healed_by_kernel(self) -> set[Key]:
        """Entries gone after the change that topowatch did not delete (masquerade on device removal)."""
        return {k for k, e in self.after.items() if e is None} - self.deleted

    @property
    def collateral(self) -> set[Key]:
        return self.deleted - self.stale

    @property
    def missed(self) -> set[Key]:
        """Stale entries still there, the same entry, after topowatch's reaction."""
        return {k for k in self.stale if (a := self.after[k]) is not None and a.id == self.before[k].id}

    def names(self, keys: set[Key]) -> set[str]:
        """The scenario's flows among ``keys``."""
        return {name for name, key in self.flows.items() if key in keys}

    def table(self) -> str:
        """Per entry: its source before, state, fate; the oracle's; what the server saw first."""
        label = {key: name for name, key in self.flows.items()}
        rows = []
        for k, e in sorted(self.before.items()):
            a = self.after[k]
            fate = "deleted" if k in self.deleted else "gone" if a is None else "kept"
            first = self.first.get(label.get(k, ""), "-")
            rows.append(f"  {label.get(k, '-'):5} :{k[0]} -> {k[1]}:{k[2]:<5} {e.reply.dst!s:12} "
                        f"{'UNREPLIED' if e.unreplied else 'replied':9} {fate:8} oracle {self.expected(k):12} "
                        f"first {first}")
        # The reactions' own records: a failure shows what each judged (scope, counts, timings).
        keys = ("reaction", "trigger", "events", "change", "examined", "eligible", "stale", "deleted",
                "distinct_flows", "notes", "skipped", "dumped", "timings")
        rows += [f"  reaction {json.dumps({k: r.get(k) for k in keys}, default=str)}" for r in self.reactions]
        return "\n".join(rows)

    def counts(self) -> str:
        return (f"stale {len(self.stale)}, deleted {len(self.deleted)}, "
                f"collateral {len(self.collateral) + len(self.deleted_others)}, missed {len(self.missed)}, "
                f"healed by the kernel {len(self.healed_by_kernel)}, reactions {len(self.reactions)}")


def key(e: Entry) -> Key:
    return (e.orig.sport, str(e.orig.dst), e.orig.dport)


def client_entries(lab: VpnLab) -> dict[Key, Entry]:
    return {key(e): e for e in lab.entries() if str(e.orig.src) == CLIENT}


def stick(lab: VpnLab, scenario: tuple[Flow, ...], tag: str) -> None:
    """One datagram per flow, seen by its server; the echo waits for its answer."""
    for flow in scenario:
        lab.send(flow, f"{flow.name}-{tag}")
    for flow in scenario:
        assert lab.wait_seen(f"{flow.name}-{tag}") is not None, f"{flow} does not get through ({tag})"
    for flow in scenario:
        replied = flow.dport == 7
        lab.wait_entry(flow.sport, flow.dst, lambda e, r=replied: e.unreplied != r, dport=flow.dport)


def react(lab: VpnLab, scenario: tuple[Flow, ...], tag: str, change: Callable[[], None],
          hook: str, *, tunnel: Key | None = None,
          ready: Callable[[], None] = lambda: None) -> Outcome:
    """``change`` with the flows stuck; the reactions up to the one that took ``hook`` (the line
    ``hook_line`` gives); the oracle; the first packet of each flow.

    ``tunnel`` is the tunnel's own flow (sport, peer address, dport), judged too. ``ready`` runs
    after the reaction and before the oracle and the first packets (lets the tunnel through).
    """
    stick(lab, scenario, tag)
    before = client_entries(lab)
    since, last = lab.log_mark()
    change()
    # The tunnel's own flow, as the reaction found it (its first packets leave as the tunnel comes up).
    tunnel_before = lab.wait_entry(*tunnel[:2], dport=tunnel[2]) if tunnel else None
    closing = lab.wait_hook(hook, since=since)
    records = [r for r in lab.records() if last < r.get("reaction", 0) <= closing["reaction"]]
    entries = client_entries(lab)
    after = {k: entries.get(k) for k in before}
    deleted: set[Key] = set()
    others = []
    for r in records:
        if r.get("event") == "entry" and r.get("action") == "deleted":
            if r["orig"]["src"] == CLIENT:
                deleted.add((r["orig"]["sport"], r["orig"]["dst"], r["orig"]["dport"]))
            else:
                others.append(r)
    undecided = [r for r in records if r.get("event") == "entry" and r.get("action") == "undecided"]
    tunnel_after = lab.entry(*tunnel[:2], dport=tunnel[2]) if tunnel else None
    tunnel_deleted = tunnel is not None and any(
        (r["orig"]["sport"], r["orig"]["dst"], r["orig"]["dport"]) == tunnel for r in others)
    ready()
    oracle = {}
    for f in scenario:
        lab.send(f, f"{f.name}-{tag}-oracle", sport=f.sport + 100)
        oracle[f.dst, f.dport] = str(lab.wait_entry(f.sport + 100, f.dst, dport=f.dport).reply.dst)
    first = {}
    for f in scenario:
        lab.send(f, f"{f.name}-{tag}-first")
    for f in scenario:
        first[f.name] = lab.wait_seen(f"{f.name}-{tag}-first")
    reactions = [r for r in records if r.get("event") == "reaction"]
    outcome = Outcome({f.name: (f.sport, f.dst, f.dport) for f in scenario}, before, after, oracle, first,
                      deleted, reactions, tunnel_before, tunnel_after, tunnel_deleted, others, undecided)
    print(f"{tag}: {outcome.counts()}\n{outcome.table()}")  # shown with -s, and with a failure
    return outcome



def assert_fixed(outcome: Outcome) -> None:
    """Every stale entry deleted, nothing else; each flow's first packet after the change shows
    the oracle's NAT at its server; the healthy entries are the same entries."""
    table = outcome.table()
    assert outcome.missed == set(), table
    assert outcome.collateral == set() and outcome.deleted_others == [], (table, outcome.deleted_others)
    assert outcome.stale - outcome.healed_by_kernel <= outcome.deleted, table
    for name, k in outcome.flows.items():
        if outcome.before[k].unreplied:
            assert outcome.first[name] == outcome.expected(k), (name, table)
    for k, e in outcome.before.items():
        if k not in outcome.stale | outcome.healed_by_kernel:
            after = outcome.after[k]
            assert after is not None and after.id == e.id, (k, table)


def assert_default_route_up(up: Outcome, tunnel_address: str) -> None:
    """A tunnel that took the default route came up: the flows that left by the WAN (masquerade,
    fixed SNAT, null binding, the site's masquerade) go into it; the ISP's net stays on the WAN
    (its connected route is more specific); each first packet shows the oracle's NAT."""
    assert up.names(up.stale) == {"masq", "snat", "null", "site"}, up.table()
    assert_fixed(up)
    assert up.first["site"] == CLIENT and up.first["null"] == tunnel_address, up.table()


def assert_default_route_down(down: Outcome) -> None:
    """That tunnel went down: the kernel deletes the entries masqueraded to the tunnel's address
    (with its device; the replied echo too); the fixed SNAT into the tunnel and the site's null
    binding only topowatch heals."""
    assert down.names(down.healed_by_kernel) == {"masq", "null", "echo"}, down.table()
    assert down.names(down.deleted) == {"snat", "site"}, down.table()
    assert_fixed(down)
    assert down.first["site"] == GW_WAN and down.first["snat"] == GW_WAN, down.table()


# -- WireGuard: wg-quick with wireguard-go --------------------------------------------------------

# wg-quick's userspace implementation (WG_QUICK_USERSPACE_IMPLEMENTATION): wireguard-go in the
# foreground, in this script's background, its pid recorded for the lab's cleanup; it returns
# once the UAPI socket listens, as wireguard-go's own daemonizing does.
WG_WRAPPER = """#!/bin/sh
WG_PROCESS_FOREGROUND=1 wireguard-go "$1" </dev/null >"$TV_DIR/wireguard-go-$1.log" 2>&1 &
echo $! >"$TV_DIR/wireguard-go-$1.pid"
i=0
while [ ! -S "/var/run/wireguard/$1.sock" ] && [ "$i" -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
"""


def wg_key() -> tuple[str, str]:
    private = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout.strip()
    public = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True,
                            check=True).stdout.strip()
    return private, public


@dataclass
class WireGuard:
    """The gateway's and the peer's wg-quick configurations (default-route mode on the gateway)."""

    lab: VpnLab
    gw_name: str
    peer_name: str
    gw_conf: Path
    peer_conf: Path

    @classmethod
    def configure(cls, lab: VpnLab, gw_name: str) -> WireGuard:
        gw_key, gw_pub = wg_key()
        peer_key, peer_pub = wg_key()
        peer_name = tunnel_name("wgp")
        wrapper = lab.tmp / "wireguard-go-wrapper"
        wrapper.write_text(WG_WRAPPER)
        wrapper.chmod(0o755)
        gw_conf = lab.tmp / f"{gw_name}.conf"
        peer_conf = lab.tmp / f"{peer_name}.conf"
        for path, text in (
            (gw_conf, wg_gateway_conf(gw_key, peer_pub)),
            (peer_conf, f"[Interface]\nPrivateKey = {peer_key}\nAddress = {WG_PEER}/24\nListenPort = {WG_PORT}\n\n"
                        f"[Peer]\nPublicKey = {gw_pub}\nAllowedIPs = {WG_GW}/32, 10.0.1.0/24\n"),
        ):
            path.touch(mode=0o600)
            path.write_text(text)
        for name in (gw_name, peer_name):
            lab.pidfiles.append(lab.tmp / f"wireguard-go-{name}.pid")
            lab.paths.append(Path(f"/var/run/wireguard/{name}.sock"))
        return cls(lab, gw_name, peer_name, gw_conf, peer_conf)

    def wg_quick(self, ns: Namespace, verb: str, conf: Path) -> str:
        env = {**self.lab.hook_env(), "WG_QUICK_USERSPACE_IMPLEMENTATION": str(self.lab.tmp / "wireguard-go-wrapper"),
               "TV_DIR": str(self.lab.tmp)}
        argv = ["env", *(f"{k}={v}" for k, v in env.items()), "wg-quick", verb, str(conf)]
        return ns.run(*argv)

    def down(self, ns: Namespace, name: str, conf: Path) -> None:
        """wg-quick down, then wait for wireguard-go to exit (it notices its device is gone)."""
        self.wg_quick(ns, "down", conf)
        pid = int((self.lab.tmp / f"wireguard-go-{name}.pid").read_text())
        end = time.monotonic() + 10
        while pid_alive(pid) and time.monotonic() < end:
            time.sleep(0.05)
        assert not pid_alive(pid), f"wireguard-go {pid} still runs after wg-quick down"


def wg_gateway_conf(private: str, peer_public: str) -> str:
    """wg-quick's default-route mode: AllowedIPs 0.0.0.0/0 (fwmark, two rules, table 51820)."""
    return f"""\
[Interface]
PrivateKey = {private}
Address = {WG_GW}/24
ListenPort = {WG_PORT}
PostUp = {HOOK} up %i
PostDown = {HOOK} down %i

[Peer]
PublicKey = {peer_public}
Endpoint = {PEER_WAN}:{WG_PORT}
AllowedIPs = 0.0.0.0/0
PersistentKeepalive = 25
"""


# -- OpenVPN: a server on the peer pushing redirect-gateway, a client on the gateway -----------


def certificate(lab: VpnLab, cn: str) -> str:
    """A self-signed certificate and key as ``cn``.crt/.key in the lab's directory; its fingerprint."""
    crt, key = lab.tmp / f"{cn}.crt", lab.tmp / f"{cn}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(crt), "-subj", f"/CN={cn}", "-days", "2"],
                   capture_output=True, check=True)
    out = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(crt)],
                         capture_output=True, text=True, check=True).stdout
    return out.strip().split("=", 1)[1]


@dataclass
class OpenVpn:
    """OpenVPN 2.6 over UDP, TLS with pinned self-signed certificates (``peer-fingerprint``)."""

    lab: VpnLab
    gw_name: str
    server: Process | None = None
    client: Process | None = None

    def server_argv(self) -> list[str]:
        t = self.lab.tmp
        ccd = t / "ccd"
        ccd.mkdir(exist_ok=True)
        # The gateway's LAN behind it: the site sees the LAN's addresses (no NAT into the tunnel).
        (ccd / "gw").write_text(f"ifconfig-push {OVPN_GW} 255.255.255.0\niroute 10.0.1.0 255.255.255.0\n")
        return ["openvpn", "--dev", tunnel_name("tunp"), "--dev-type", "tun", "--proto", "udp",
                "--local", PEER_WAN, "--lport", str(OVPN_PORT), "--topology", "subnet",
                "--server", "10.98.0.0", "255.255.255.0", "--push", "redirect-gateway def1",
                "--client-config-dir", str(ccd), "--route", "10.0.1.0", "255.255.255.0",
                "--cert", str(t / "peer.crt"), "--key", str(t / "peer.key"), "--dh", "none",
                "--peer-fingerprint", self.gw_fp, "--verb", "3"]

    def client_argv(self) -> list[str]:
        t = self.lab.tmp
        argv = ["openvpn", "--client", "--dev", self.gw_name, "--dev-type", "tun", "--proto", "udp",
                "--remote", PEER_WAN, str(OVPN_PORT), "--lport", str(OVPN_PORT + 1),
                "--cert", str(t / "gw.crt"), "--key", str(t / "gw.key"), "--peer-fingerprint", self.peer_fp,
                "--script-security", "2", "--up", str(HOOK), "--route-up", str(HOOK), "--down", str(HOOK),
                "--verb", "3"]
        for name, value in self.lab.hook_env().items():
            argv += ["--setenv", name, value]
        return argv

    @classmethod
    def configure(cls, lab: VpnLab, gw_name: str) -> OpenVpn:
        vpn = cls(lab, gw_name)
        vpn.gw_fp = certificate(lab, "gw")
        vpn.peer_fp = certificate(lab, "peer")
        return vpn

    gw_fp: str = ""
    peer_fp: str = ""

    def start_server(self) -> None:
        log = open(self.lab.tmp / "openvpn-server.log", "w")  # noqa: SIM115
        self.server = self.lab.start(self.lab.peer, self.server_argv(), "openvpn server", stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()

    def start_client(self) -> None:
        log = open(self.lab.tmp / "openvpn-client.log", "w")  # noqa: SIM115
        self.client = self.lab.start(self.lab.gw, self.client_argv(), "openvpn client", stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()

    def stop_client(self) -> None:
        assert self.client is not None
        code = self.client.stop()
        assert code == 0, self.log("client")

    def log(self, which: str) -> str:
        return (self.lab.tmp / f"openvpn-{which}.log").read_text()


# -- strongSwan: charon with kernel-libipsec (ESP in userspace over TUN), swanctl, IKEv2 PSK ---

CHARON = "/usr/lib/ipsec/charon"
SWAN_PLUGINS = ("random nonce aes sha1 sha2 hmac gmp kdf pem pkcs1 x509 pubkey kernel-libipsec kernel-netlink "
                "socket-default updown vici")
SWAN_SECRET = "topowatch-lab-psk-0123456789"

# charon's environment for the updown script is PATH and PLUTO_* only: this wrapper adds what
# the contrib hook needs to reach the lab's daemon (its private bus, this checkout's topowatch).
SWAN_UPDOWN = """#!/bin/sh
export {env}
exec {hook} "$@"
"""


def charon_conf(vici: Path) -> str:
    return f"""\
charon {{
    load = {SWAN_PLUGINS}
    install_routes = yes
    filelog {{
        stderr {{
            path = /dev/stderr
            default = 1
        }}
    }}
    plugins {{
        vici {{
            socket = unix://{vici}
        }}
    }}
}}
"""


def swanctl_conf(local: str, remote: str, local_ts: str, remote_ts: str, me: str, *, them: str,
                 updown: Path | None) -> str:
    hook = f"\n                updown = {updown}" if updown else ""
    return f"""\
connections {{
    site {{
        version = 2
        local_addrs = {local}
        remote_addrs = {remote}
        encap = yes
        proposals = aes128-sha256-modp2048
        local {{
            auth = psk
            id = {me}
        }}
        remote {{
            auth = psk
            id = {them}
        }}
        children {{
            site {{
                local_ts = {local_ts}
                remote_ts = {remote_ts}
                esp_proposals = aes128-sha256{hook}
            }}
        }}
    }}
}}
secrets {{
    ike-site {{
        id-1 = {me}
        id-2 = {them}
        secret = "{SWAN_SECRET}"
    }}
}}
"""


@dataclass
class StrongSwan:
    """A charon per side, each in a private mount namespace (its pid file and sockets in /run)."""

    lab: VpnLab
    charons: dict[str, Process] = field(default_factory=dict)

    def dir(self, side: str) -> Path:
        return self.lab.tmp / f"swan-{side}"

    def vici(self, side: str) -> str:
        return f"unix://{self.dir(side) / 'charon.vici'}"

    def start(self, side: str, ns: Namespace, swanctl: str) -> None:
        d = self.dir(side)
        (d / "run").mkdir(parents=True)
        (d / "strongswan.conf").write_text(charon_conf(d / "charon.vici"))
        (d / "swanctl.conf").write_text(swanctl)
        log = open(d / "charon.log", "w")  # noqa: SIM115
        # /run/netns stays visible: the updown hook's `topowatch bus-name` names the namespace by it.
        script = (f"mkdir {d / 'run/netns'} && mount --rbind /run/netns {d / 'run/netns'} && "
                  f"mount --rbind {d / 'run'} /run && STRONGSWAN_CONF={d / 'strongswan.conf'} exec {CHARON}")
        self.charons[side] = self.lab.start(ns, ["unshare", "--mount", "--propagation", "private",
                                                 "sh", "-c", script], f"charon {side}",
                                            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        end = time.monotonic() + 20
        while not (d / "charon.vici").exists():
            if not self.charons[side].alive() or time.monotonic() > end:
                raise AssertionError(f"charon ({side}) did not start: {self.log(side)}")
            time.sleep(0.05)
        self.swanctl(side, ns, "--load-all", "--file", str(d / "swanctl.conf"))

    def swanctl(self, side: str, ns: Namespace, *args: str) -> str:
        return ns.run("swanctl", *args, "--uri", self.vici(side))

    def log(self, side: str) -> str:
        return (self.dir(side) / "charon.log").read_text()

    @classmethod
    def configure(cls, lab: VpnLab) -> StrongSwan:
        swan = cls(lab)
        updown = lab.tmp / "swan-updown"
        env = " ".join(f"{k}={v}" for k, v in lab.hook_env().items())
        updown.write_text(SWAN_UPDOWN.format(env=env, hook=ROOT / "contrib/strongswan/topowatch-updown"))
        updown.chmod(0o755)
        swan.start("peer", lab.peer, swanctl_conf(PEER_WAN, GW_WAN, SITE_NET, "10.0.1.0/24", "peer", them="gw",
                                                updown=None))
        swan.start("gw", lab.gw, swanctl_conf(GW_WAN, PEER_WAN, "10.0.1.0/24", SITE_NET, "gw", them="peer",
                                              updown=updown))
        return swan
