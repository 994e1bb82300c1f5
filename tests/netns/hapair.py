"""An HA gateway pair in namespaces: keepalived (VRRP), conntrackd (FTFW), topowatch on both.

Topology (every namespace, link and file created here is removed by ``Pair.create``'s exit):

    client 10.0.1.10 (default via the LAN virtual address 10.0.1.1)
        |
    [LAN: a bridge in its own namespace]
        |                                   |
    lan0 10.0.1.2                       lan0 10.0.1.3
    gateway A  --sync0 192.168.100.1/30 -- 192.168.100.2/30--  gateway B
    wan0 203.0.113.2                    wan0 203.0.113.3     (WAN virtual address 203.0.113.1)
    up1  198.51.100.2 (transit, no NAT) up1  198.51.101.2 (transit, no NAT)
        |                                   |
    [WAN: bridge br0 203.0.113.254/24, transit ends 198.51.100.1 and 198.51.101.1,
     servers 192.0.2.10 (sink on 5060, echo on 7) and 192.0.2.30 on lo]

keepalived runs one VRRP instance on lan0 that owns both virtual addresses;
who is master follows a ``track_file`` weight that the test writes (an admin's
switchover: the backup preempts at the master's next advert). conntrackd
replicates the table over the dedicated sync0 link (FTFW, unicast UDP), each
node with its own config, socket and lock file in the pair's temporary
directory. keepalived's notify script is contrib's (behind ``NOTIFY_WRAPPER``),
so a new master commits conntrackd's external cache and only then asks
topowatch for a full judgement.

This module builds and observes; it decides nothing about staleness (the
kernel's fresh flows do, see ``Pair.oracle``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from topowatch.core.conntrack import Entry
from topowatch.lab import (
    CLIENT_SCRIPT,
    OTHER_SERVER,
    SERVER_SCRIPT,
    SIP_SERVER,
    Daemon,
    LabFlow,
    LineReader,
    entries_in,
)
from topowatch.netns import Namespace, veth

ROOT = Path(__file__).resolve().parents[2]
NOTIFY = ROOT / "contrib" / "keepalived" / "topowatch-notify"
HOOK_LIB = ROOT / "contrib" / "lib" / "hook-lib.sh"
PREFIX = "th"

# A long variant: marked slow, and run only when the run selects slow tests (CI runs everything).
LONG = [
    pytest.mark.slow,
    pytest.mark.skipif("'slow' not in config.option.markexpr",
                       reason="a long variant: runs only when asked for (pytest -m slow ...)"),
]

LAN_VIP = "10.0.1.1"
WAN_VIP = "203.0.113.1"
CLIENT = "10.0.1.10"
WAN_ROUTER = "203.0.113.254"


Key = tuple[str, int, str, int]  # an orig tuple: source, source port, destination, destination port
# A line of `conntrackd -e`: "udp 17 src=10.0.1.10 dst=192.0.2.10 sport=6000 dport=5060 [UNREPLIED] ..."
_CACHE_LINE = re.compile(r"src=(?P<src>\S+) dst=(?P<dst>\S+) sport=(?P<sport>\d+) dport=(?P<dport>\d+)")


def missing_tools() -> str | None:
    """Why the pair cannot be built here (a program that is not installed), or None."""
    for tool in ("keepalived", "conntrackd", "nft", "busctl", "dbus-daemon"):
        if shutil.which(tool) is None:
            return f"needs {tool} (scripts/setup installs it)"
    return None


@dataclass(frozen=True, slots=True)
class NodeAddresses:
    name: str
    lan: str
    wan: str
    transit: str
    transit_peer: str
    sync: str
    sync_peer: str


NODES = (
    NodeAddresses("a", "10.0.1.2", "203.0.113.2", "198.51.100.2", "198.51.100.1", "192.168.100.1", "192.168.100.2"),
    NodeAddresses("b", "10.0.1.3", "203.0.113.3", "198.51.101.2", "198.51.101.1", "192.168.100.2", "192.168.100.1"),
)

# keepalived: one VRRP instance on the LAN owning both virtual addresses. Both nodes start
# BACKUP at priority 100; the track file adds its value (weight 1), so the node whose file says
# 50 is master. contrib's notify script runs on every state change.
KEEPALIVED_CONF = """\
global_defs {{
    router_id gw-{name}
    enable_script_security
    script_user root
    vrrp_garp_master_delay 0
    vrrp_garp_master_repeat 1
}}

vrrp_track_file switchover {{
    file {dir}/priority
}}

vrrp_instance gateway {{
    state BACKUP
    interface lan0
    virtual_router_id 51
    priority 100
    advert_int 0.2
    version 3
    track_file {{
        switchover weight 1
    }}
    virtual_ipaddress {{
        {lan_vip}/24 dev lan0
        {wan_vip}/32 dev wan0
    }}
    notify "{notify}"
}}
"""

# conntrackd: FTFW over unicast UDP on the dedicated link; UDP, TCP and ICMP replicated; the
# nodes' own and virtual addresses ignored (only forwarded flows are worth replicating).
CONNTRACKD_CONF = """\
Sync {{
    Mode FTFW {{
        PurgeTimeout 5
    }}
    UDP {{
        IPv4_address {sync}
        IPv4_Destination_Address {sync_peer}
        Port 3780
        Interface sync0
        SndSocketBuffer 16777216
        RcvSocketBuffer 16777216
        Checksum on
    }}
}}

General {{
    Systemd off
    HashSize 65536
    HashLimit 524288
    LogFile {dir}/conntrackd.log
    Syslog off
    LockFile {dir}/conntrackd.lock
    UNIX {{
        Path {dir}/conntrackd.ctl
    }}
    NetlinkBufferSize 2097152
    NetlinkBufferSizeMaxGrowth 134217728
    NetlinkOverrunResync On
    Filter From Userspace {{
        Protocol Accept {{
            UDP
            TCP
            ICMP
        }}
        Address Ignore {{
            IPv4_address 127.0.0.1
            IPv4_address {lan_vip}
            IPv4_address {wan_vip}
            IPv4_address {lan}
            IPv4_address {wan}
            IPv4_address {transit}
            IPv4_address {sync}
        }}
    }}
}}
"""


def keepalived_conf(node: NodeAddresses, directory: str, notify: str) -> str:
    return KEEPALIVED_CONF.format(name=node.name, dir=directory, notify=notify, lan_vip=LAN_VIP, wan_vip=WAN_VIP)


def conntrackd_conf(node: NodeAddresses, directory: str) -> str:
    return CONNTRACKD_CONF.format(dir=directory, lan_vip=LAN_VIP, wan_vip=WAN_VIP, lan=node.lan, wan=node.wan,
                                  transit=node.transit, sync=node.sync, sync_peer=node.sync_peer)


@dataclass
class Node:
    """One gateway: its namespace, its private directory and its daemons."""

    addr: NodeAddresses
    ns: Namespace
    dir: Path
    procs: dict[str, subprocess.Popen[str]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.addr.name

    def conntrackd(self, *args: str, check: bool = True) -> str:
        """``conntrackd -C <this node's config> ARGS`` inside the node's namespace."""
        return self.ns.run("conntrackd", "-C", str(self.dir / "conntrackd.conf"), *args, check=check)

    def external_keys(self) -> set[Key]:
        """The orig tuples in conntrackd's external cache (the flows the peer replicated)."""
        keys = set()
        for line in self.conntrackd("-e").splitlines():
            m = _CACHE_LINE.search(line)
            if m is not None:
                keys.add((m["src"], int(m["sport"]), m["dst"], int(m["dport"])))
        return keys

    def external_count(self) -> int:
        """How many entries conntrackd's external cache holds (``conntrackd -s``)."""
        m = re.search(r"cache external:\s*current active connections:\s*(\d+)", self.conntrackd("-s"))
        return int(m[1]) if m else 0

    def entries(self) -> list[Entry]:
        return entries_in(self.ns)

    def state(self) -> str:
        """The VRRP state as the notify script last recorded it (MASTER, BACKUP, FAULT, or '')."""
        try:
            return (self.dir / "state").read_text().strip()
        except FileNotFoundError:
            return ""

    def has_vips(self) -> bool:
        out = self.ns.run("ip", "-4", "-o", "addr", "show")
        return f" {LAN_VIP}/" in out and f" {WAN_VIP}/" in out

    def set_priority(self, boost: int) -> None:
        path = self.dir / "priority"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{boost}\n")
        tmp.rename(path)  # keepalived watches the file with inotify: an atomic rename, never a torn write


@dataclass
class Pair:
    lan: Namespace
    wan: Namespace
    client: Namespace
    a: Node
    b: Node
    dir: Path
    env: dict[str, str]
    inodes: set[int] = field(default_factory=set)  # of the namespaces: what processes in them show
    server: subprocess.Popen[str] | None = None
    server_out: LineReader | None = None
    seen: dict[str, str] = field(default_factory=dict)

    @property
    def nodes(self) -> tuple[Node, Node]:
        return (self.a, self.b)

    # -- building ---------------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def create(cls, env: dict[str, str]) -> Iterator[Pair]:
        """The pair, its daemons (keepalived, conntrackd) and the WAN's servers; all removed on exit."""
        created: list[Namespace] = []
        base = Path(tempfile.mkdtemp(prefix="thha-", dir="/tmp"))  # short: sun_path holds 108 bytes
        pair: Pair | None = None
        try:
            for prefix in ("lan", "wan", "cli", "gwa", "gwb"):
                ns = Namespace.create(PREFIX + prefix)
                created.append(ns)
                # No IPv6: its link-local addresses finishing DAD would be events of their own.
                for key in ("all", "default"):
                    ns.run("sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1")
            lan, wan, client, gwa, gwb = created
            nodes = []
            for addr, ns in zip(NODES, (gwa, gwb), strict=True):
                directory = base / addr.name
                directory.mkdir()
                nodes.append(Node(addr, ns, directory))
            pair = cls(lan, wan, client, nodes[0], nodes[1], base, env)
            pair.inodes = {os.stat(ns.path).st_ino for ns in created}
            pair.build()
            pair.start()
            yield pair
        finally:
            if pair is not None:
                pair.stop()
            for ns in created:
                ns.delete()
            shutil.rmtree(base, ignore_errors=True)

    def build(self) -> None:
        lan, wan, client = self.lan, self.wan, self.client
        lan.run("ip", "link", "add", "br0", "type", "bridge")
        lan.run("ip", "link", "set", "br0", "up")
        wan.run("ip", "link", "add", "br0", "type", "bridge")
        wan.run("ip", "link", "set", "br0", "up")
        wan.run("ip", "addr", "add", f"{WAN_ROUTER}/24", "dev", "br0")
        veth(client, "lan0", lan, "pc")
        lan.run("ip", "link", "set", "pc", "master", "br0")
        client.run("ip", "addr", "add", f"{CLIENT}/24", "dev", "lan0")
        client.run("ip", "route", "add", "default", "via", LAN_VIP)
        for node in self.nodes:
            ns, a = node.ns, node.addr
            veth(ns, "lan0", lan, f"p{a.name}")
            lan.run("ip", "link", "set", f"p{a.name}", "master", "br0")
            veth(ns, "wan0", wan, f"w{a.name}")
            wan.run("ip", "link", "set", f"w{a.name}", "master", "br0")
            veth(ns, "up1", wan, f"t{a.name}")
            wan.run("ip", "addr", "add", f"{a.transit_peer}/24", "dev", f"t{a.name}")
            ns.run("ip", "addr", "add", f"{a.lan}/24", "dev", "lan0")
            ns.run("ip", "addr", "add", f"{a.wan}/24", "dev", "wan0")
            ns.run("ip", "addr", "add", f"{a.transit}/24", "dev", "up1")
            ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
            ns.run("ip", "route", "add", "default", "via", WAN_ROUTER, "dev", "wan0")
        veth(self.a.ns, "sync0", self.b.ns, "sync0")
        for node in self.nodes:
            node.ns.run("ip", "addr", "add", f"{node.addr.sync}/30", "dev", "sync0")
        wan.run("ip", "addr", "add", f"{SIP_SERVER}/32", "dev", "lo")
        wan.run("ip", "addr", "add", f"{OTHER_SERVER}/32", "dev", "lo")

    def start(self) -> None:
        """conntrackd and keepalived on both nodes (A master), and the WAN's servers."""
        for node in self.nodes:
            (node.dir / "conntrackd.conf").write_text(conntrackd_conf(node.addr, str(node.dir)))
            node.procs["conntrackd"] = node.ns.popen(
                ["conntrackd", "-C", str(node.dir / "conntrackd.conf")],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        for node in self.nodes:
            wait(lambda node=node: node.conntrackd("-s", check=False) != "", 10, f"conntrackd on {node.name}")
        notify = self.dir / "notify.sh"
        notify.write_text(NOTIFY_WRAPPER.format(notify=NOTIFY, lib=HOOK_LIB, python=Path(sys.executable).parent))
        notify.chmod(0o755)
        for node in self.nodes:
            node.set_priority(50 if node is self.a else 0)
            conf = node.dir / "keepalived.conf"
            conf.write_text(keepalived_conf(node.addr, str(node.dir), str(notify)))
            node.procs["keepalived"] = node.ns.popen(
                ["keepalived", "-n", "-P", "-G", "-f", str(conf), "-p", str(node.dir / "keepalived.pid"),
                 "-r", str(node.dir / "vrrp.pid"), "-c", str(node.dir / "checkers.pid"),
                 "-b", str(node.dir / "bfd.pid")],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env={**os.environ, **self.env, "HA_STATE_DIR": str(node.dir)},
            )
        wait(lambda: self.a.state() == "MASTER" and self.a.has_vips(), 20, "A master")
        self.server = self.wan.popen([sys.executable, "-c", SERVER_SCRIPT, "3600"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.server.stdout is not None
        self.server_out = LineReader(self.server.stdout.fileno())
        assert self.server_out.readline(10.0) == "listening"

    def stop(self) -> None:
        procs = [p for node in self.nodes for p in node.procs.values()]
        if self.server is not None:
            procs.append(self.server)
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        # A notify script keepalived started may still be asking the daemon (bounded by its
        # timeouts): let it finish, then end whatever still runs in the pair's namespaces.
        end = time.monotonic() + 10
        while self.processes() and time.monotonic() < end:
            time.sleep(0.1)
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def processes(self) -> dict[int, str]:
        """The processes still running in the pair's namespaces (pid: command line)."""
        found = {}
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and (proc / "ns" / "net").stat().st_ino in self.inodes:
                    found[int(proc.name)] = b" ".join((proc / "cmdline").read_bytes().split(b"\0")).decode(
                        errors="replace")
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
        return found

    def leftovers(self) -> list[str]:
        """What is still there of the pair after ``create`` has exited: namespaces, processes, files."""
        names = {ns.name for ns in (self.lan, self.wan, self.client, self.a.ns, self.b.ns)}
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        left = [f"namespace {name}" for name in names if name in listed.split()]
        left += [f"process {pid}: {argv}" for pid, argv in self.processes().items()]
        if self.dir.exists():
            left.append(f"directory {self.dir}")
        return left

    def master(self) -> Node:
        masters = [node for node in self.nodes if node.state() == "MASTER"]
        assert len(masters) == 1, [(node.name, node.state()) for node in self.nodes]
        return masters[0]

    def switch_to(self, node: Node, timeout: float = 20.0) -> None:
        """Make ``node`` master (the other one's track file drops it to base priority)."""
        other = self.b if node is self.a else self.a
        node.set_priority(50)
        other.set_priority(0)
        wait(lambda: node.state() == "MASTER" and other.state() == "BACKUP", timeout, f"{node.name} master")

    # -- topowatch ----------------------------------------------------------------

    def watch(self, node: Node, rules: Path, *args: str) -> Daemon:
        """``topowatch run`` on ``node``, on the pair's bus (the notify script's request reaches it)."""
        env = [f"{k}={v}" for k, v in self.env.items()]
        return Daemon(node.ns, "--log-format", "json", "--rules-dir", str(rules), *args, prefix=("env", *env))

    # -- traffic ------------------------------------------------------------------

    def send(self, flows: Iterable[LabFlow], tag: str = "") -> None:
        """One datagram per flow from the client (replied flows get their echo); ``tag`` names them anew."""
        args = [f"{f.name}{tag},{f.sport},{f.dst},{f.dport}" for f in flows]
        self.client.run(sys.executable, "-c", CLIENT_SCRIPT, "0.01", *args)

    @contextlib.contextmanager
    def traffic(self, flows: Iterable[LabFlow], lifetime: float = 300.0) -> Iterator[None]:
        """Every flow sends a datagram every 100 ms while the block runs (bounded by ``lifetime``)."""
        args = [f"{f.name},{f.sport},{f.dst},{f.dport}" for f in flows]
        proc = self.client.popen([sys.executable, "-c", CLIENT_SCRIPT, str(lifetime), *args],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            yield
        finally:
            proc.terminate()
            proc.wait(10)

    def server_seen(self, names: Iterable[str], timeout: float = 5.0) -> dict[str, str]:
        """The source each of ``names`` (payloads) reached the servers from; waits until all are in."""
        assert self.server_out is not None
        want = set(names)
        end = time.monotonic() + timeout
        while not want <= self.seen.keys() and (remaining := end - time.monotonic()) > 0:
            line = self.server_out.readline(remaining)
            parts = line.split()
            if len(parts) >= 2:
                self.seen[parts[0]] = parts[1]
        return {name: self.seen.get(name, "-") for name in want}

    def oracle(self, node: Node, dst: str, dport: int, sport: int) -> str:
        """Kernel as oracle: the source a fresh flow from the client gets on ``node`` now."""
        self.send([LabFlow(f"oracle{sport}", sport, dst, dport)])
        end = time.monotonic() + 5
        while time.monotonic() < end:
            for e in node.entries():
                if e.orig.sport == sport and str(e.orig.dst) == dst and str(e.orig.src) == CLIENT:
                    return str(e.reply.dst)
            time.sleep(0.05)
        raise TimeoutError(f"no entry on {node.name} for the oracle's flow {sport} -> {dst}")


# keepalived hands its notify script its own environment (the pair's bus address, HA_STATE_DIR);
# this wrapper (written per pair) adds the node's conntrackd config, the hook library and this
# tree's topowatch, records the state for the test, and runs contrib's script.
NOTIFY_WRAPPER = """\
#!/bin/sh
echo "$3" > "$HA_STATE_DIR/state"
# A test holds a new master's commit back while the file "hold" exists (at most 30 s).
if [ "$3" = MASTER ]; then
    i=0
    while [ -e "$HA_STATE_DIR/hold" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
fi
export CONNTRACKD_CONFIG="$HA_STATE_DIR/conntrackd.conf"
export TOPOWATCH_HOOK_LIB={lib}
export PATH={python}:$PATH
exec {notify} "$@" 2>>"$HA_STATE_DIR/notify.log"
"""


def wait(predicate: object, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > end:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


# -- the flows and what became of them -----------------------------------------------------

# Through the WAN uplink (NATed on either node), to the monitoring server (over A's transit
# uplink, so never NATed on A: a null binding), and replied ones (the echo answers).
SIP = tuple(LabFlow(f"sip{i}", 6000 + i, SIP_SERVER, 5060) for i in range(8))
MONITORING = tuple(LabFlow(f"mon{i}", 6100 + i, OTHER_SERVER, 5060) for i in range(4))
ECHO = tuple(LabFlow(f"echo{i}", 7000 + i, SIP_SERVER, 7, replied=True) for i in range(2))
FLOWS = SIP + MONITORING + ECHO
DESTINATIONS = sorted({(f.dst, f.dport) for f in FLOWS})

def key(e: Entry) -> Key:
    return (str(e.orig.src), e.orig.sport, str(e.orig.dst), e.orig.dport)


def record_key(record: dict[str, Any]) -> Key:
    orig = record["orig"]
    return (orig["src"], orig["sport"], orig["dst"], orig["dport"])


def client_flows(entries: Iterable[Entry]) -> dict[Key, Entry]:
    """The entries of the test's flows (from the client, not the oracle's), by orig tuple."""
    sports = {f.sport for f in FLOWS}
    return {key(e): e for e in entries if str(e.orig.src) == CLIENT and e.orig.sport in sports}


@dataclass(frozen=True, slots=True)
class Counts:
    """One scenario's outcome: judged against the kernel's fresh flows, not against expectations."""

    stale: int  # UNREPLIED entries whose source differs from a fresh flow's
    deleted: int
    collateral: int  # deleted but not stale
    missed: int  # stale but not deleted
    reported: int  # replied entries that are stale: out of the default policy's scope, logged only
    replied_stale: int

    def table(self, title: str) -> str:
        names = ("stale", "deleted", "collateral", "missed", "replied stale", "reported")
        values = (self.stale, self.deleted, self.collateral, self.missed, self.replied_stale, self.reported)
        widths = [max(len(n), len(str(v))) for n, v in zip(names, values, strict=True)]
        head = "  ".join(n.rjust(w) for n, w in zip(names, widths, strict=True))
        row = "  ".join(str(v).rjust(w) for v, w in zip(values, widths, strict=True))
        return f"\n{title}\n  {head}\n  {row}\n"


def judge(before: dict[Key, Entry], oracle: dict[tuple[str, int], str], records: Sequence[dict[str, Any]]) -> tuple[Counts, set[Key]]:
    """Counts for ``before`` (the entries the node held) against the oracle and the daemon's records."""
    stale = {k for k, e in before.items() if str(e.reply.dst) != oracle[(k[2], k[3])]}
    unreplied = {k for k in stale if before[k].unreplied}
    deleted = {record_key(r) for r in records if r.get("event") == "entry" and r["action"] == "deleted"}
    reported = {record_key(r) for r in records if r.get("event") == "entry" and r["action"] == "log only"}
    counts = Counts(stale=len(unreplied), deleted=len(deleted), collateral=len(deleted - unreplied),
                    missed=len(unreplied - deleted), reported=len(reported & (stale - unreplied)),
                    replied_stale=len(stale - unreplied))
    return counts, unreplied
