"""Races and faults around the delete path, on the real kernel, in namespaces the tests create.

The fault-injection point ``Reactor.before_delete`` runs between judging and
deleting: there a real reply packet turns one judged entry into a replied
one, deterministically. The kernel is the oracle for what is left.
"""

from __future__ import annotations

import errno
import random
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
import trio

from topowatch.core.conntrack import (
    IPS_ASSURED,
    IPS_SEEN_REPLY,
    CtTuple,
    Entry,
)
from topowatch.core.decide import Decider
from topowatch.core.eligibility import Eligibility
from topowatch.core.fib import Fib
from topowatch.core.flow import IPPROTO_UDP, NO_NAT, Binding, Flow, NatKind, Prediction
from topowatch.core.model import Link, Route, Topology
from topowatch.core.nat import NatRuleset
from topowatch.core.pressure import Candidate, PressurePolicy, Sample
from topowatch.edges import ctcodec
from topowatch.edges.ctnetlink import Conntrack
from topowatch.edges.sysctl import ConntrackSysctl, TimeoutLedger, sysctl_name
from topowatch.lab import Daemon
from topowatch.netns import Namespace
from topowatch.pressure import PressureAgent
from topowatch.reactor import Burst, DeleteCounts, Reactor, ReactorConfig, StillStale, Trigger

pytestmark = [pytest.mark.netns]

# A ct rule makes the namespace track its loopback flows; the NAT chains mark both NAT sides done.
RULESET = """\
table ip t {
    chain filt { type filter hook output priority 0; policy accept; ct state new counter; }
    chain out { type nat hook output priority -100; policy accept; }
    chain post { type nat hook postrouting priority srcnat; policy accept; }
}
"""
LO = "127.0.0.1"
SERVER_PORT = 6000
CLIENT_PORTS = (5001, 5002, 5003, 5004)

BEFORE = Topology(links=(Link(1, "lo"), Link(2, "up1")), routes=(Route(IPv4Network("0.0.0.0/0")),))
AFTER = Topology(links=(Link(1, "lo"), Link(2, "up1"), Link(3, "up2")),
                 routes=(Route(IPv4Network("0.0.0.0/0")),))


def masquerade_once_up2_exists(ruleset: Any, fib: Fib, flow: Flow) -> Prediction:
    if fib.topology.link_by_name("up2") is not None:
        snat = frozenset({Binding(NatKind.MASQUERADE, IPv4Address("203.0.113.2"))})
    else:
        snat = frozenset({NO_NAT})
    return Prediction(dnat=frozenset({NO_NAT}), snat=snat, egress=())


class NamespaceBackend:
    """The reactor's backend on one namespace's conntrack table; the topology is given, not read."""

    def __init__(self, ct: Conntrack) -> None:
        self.ct = ct
        self.topo = BEFORE

    name = "test"

    def sources(self) -> list[Any]:
        return []

    async def topology(self) -> Topology:
        return self.topo

    async def ruleset(self) -> NatRuleset:
        return NatRuleset()

    async def entries(self, eligibility: Eligibility) -> list[Entry]:
        return [e for e in await trio.to_thread.run_sync(self.ct.dump) if eligibility.admits(e)]

    async def judge(
        self, eligibility: Eligibility, decider: Callable[[Any], Decider], early: Any = None
    ) -> Decider:
        """Every listed entry, added to one decider (``reactor.Backend.judge``)."""
        judging = decider(None)
        for e in await self.entries(eligibility):
            judging.add(e)
        return judging

    async def delete(self, entries: Sequence[Entry], still: StillStale) -> DeleteCounts:
        # What ``KernelBackend.delete`` does, on this namespace's socket.
        result = await trio.to_thread.run_sync(self.ct.delete_current, list(entries), still)
        return DeleteCounts(deleted=result.deleted, already_gone=result.not_found, failed=result.failed,
                            kept_replied=result.kept_replied, kept_changed=result.kept_changed,
                            window_p99=result.window_p99)


@pytest.fixture
def lo_ns(netns: Namespace) -> Iterator[Namespace]:
    netns.run("nft", "-f", "-", input=RULESET)
    yield netns


def udp_socket(ns: Namespace, port: int) -> socket.socket:
    sock = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LO, port))
    return sock


async def test_an_entry_replied_to_between_judging_and_deleting_is_kept(lo_ns: Namespace) -> None:
    server = udp_socket(lo_ns, SERVER_PORT)
    clients = [udp_socket(lo_ns, port) for port in CLIENT_PORTS]
    ct = Conntrack(lo_ns.socket(socket.AF_NETLINK, socket.SOCK_RAW, ctcodec.NETLINK_NETFILTER))
    try:
        for client in clients:
            client.sendto(b"register", (LO, SERVER_PORT))  # never answered: UNREPLIED
        backend = NamespaceBackend(ct)
        reactor = Reactor(backend, ReactorConfig(startup_sweep=False), predictor=masquerade_once_up2_exists)
        reactor.t0 = BEFORE
        judged: list[Entry] = []

        async def reply_arrives(entries: Sequence[Entry]) -> None:
            judged.extend(entries)
            server.sendto(b"ok", (LO, CLIENT_PORTS[1]))  # the kernel marks that entry SEEN_REPLY now

        reactor.before_delete = reply_arrives
        backend.topo = AFTER
        burst = Burst()
        burst.add(Trigger("test", "link up2 added", kind="link"), trio.current_time())
        reaction = await reactor.react(burst)
        assert sorted(e.orig.sport for e in judged) == list(CLIENT_PORTS)  # all four judged stale
        left = ct.dump(unreplied_only=False)
        assert [(e.orig.sport, bool(e.status & IPS_SEEN_REPLY)) for e in left] == [(CLIENT_PORTS[1], True)]
        d = reaction.deleted
        assert (d.deleted, d.kept_replied, d.already_gone) == (3, 1, 0)
        assert d.window_p99 is not None
        assert "1 kept: replied since the dump" in reaction.summary()
    finally:
        ct.close()
        for sock in (server, *clients):
            sock.close()


# --- the pressure agent: a candidate is re-read just before it is evicted ----------------------------

GATE = """\
table ip gate {
    chain in { type filter hook input priority 0; policy accept; tcp dport 7777 tcp flags syn drop; }
}
"""
TIMEOUTS = {"udp": 30, "udp_stream": 120, "tcp_syn_sent": 120, "tcp_syn_recv": 60, "icmp": 30,
            "icmpv6": 30, "gre": 30, "gre_stream": 180, "generic": 600}


class RefusingTable(PressureAgent):
    """The agent with the table's fill and refusals given (95 % full, new flows refused every look)."""

    refused = 0

    def read_sample(self) -> Sample:
        self.refused += 1
        return Sample(time=time.monotonic(), count=95, max=100, buckets=100, drop=self.refused)


def wait_for(what: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while not what():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def test_the_pressure_agent_keeps_candidates_answered_established_or_refreshed_since_the_scan(
    lo_ns: Namespace, tmp_path: Path
) -> None:
    ns = lo_ns
    ns.run("nft", "-f", "-", input=GATE)
    listener = ns.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LO, 7777))
    listener.listen()
    client = ns.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.setblocking(False)
    assert client.connect_ex((LO, 7777)) == errno.EINPROGRESS  # SYN_SENT: its SYN is dropped at input
    refreshed_sock = udp_socket(ns, 5100)
    a = IPv4Address(LO)
    idle, refreshed = (Entry(2, IPPROTO_UDP, CtTuple(a, a, sport, 6100), CtTuple(a, a, 6100, sport),
                             status=IPS_SEEN_REPLY | IPS_ASSURED, timeout=30) for sport in (5099, 5100))
    root = tmp_path / "sys"
    root.mkdir()
    for name, value in TIMEOUTS.items():
        (root / sysctl_name(name)).write_text(f"{value}\n")
    policy = PressurePolicy(enabled=True, high=0.9, low=0.6, evict_replied=frozenset({IPPROTO_UDP}))

    def conntrack() -> Conntrack:
        return Conntrack(ns.socket(socket.AF_NETLINK, socket.SOCK_RAW, ctcodec.NETLINK_NETFILTER))

    ct = conntrack()
    agent = RefusingTable(lambda: policy, sysctl=ConntrackSysctl(str(root)),
                          ledger=TimeoutLedger(str(tmp_path / "ledger.json")), conntrack=conntrack)
    try:
        ct.create([idle, refreshed])

        def table() -> dict[int, Entry]:
            return {e.orig.sport: e for e in ct.dump(unreplied_only=False)}

        syn = client.getsockname()[1]
        assert table()[syn].unreplied

        def traffic_meanwhile(chosen: list[Candidate]) -> None:
            assert {syn, 5099, 5100} <= {c.entry.orig.sport for c in chosen}
            ns.run("nft", "delete", "table", "ip", "gate")  # the retransmitted SYN gets through
            assert wait_for(lambda: not table()[syn].unreplied), "no handshake"
            refreshed_sock.sendto(b"keepalive", (LO, 6100))  # resets that entry's timer

        agent.before_evict = traffic_meanwhile
        agent.tick()
        left = table()
        assert syn in left and 5100 in left, left  # ESTABLISHED and refreshed since the scan: kept
        assert 5099 not in left  # still idle: evicted
        assert agent.counters.evicted == 1
    finally:
        agent.deliver()
        if agent._ct is not None:
            agent._ct.close()
        ct.close()
        for sock in (listener, client, refreshed_sock):
            sock.close()


# --- SIGKILL at a seeded random point of a reaction, then a restart -----------------------------------

ROUTER_RULESET = """\
table ip t {
    chain post { type nat hook postrouting priority srcnat; policy accept; oifname "up2" masquerade; }
}
"""
POLICY = """\
[policy.kill]
action = "flush"
unreplied_only = true
max_deletions = 1000000
"""
STALE, HEALTHY, REPLIED = 20_000, 2_000, 2_000
UP1 = "198.51.100.2"


def send_udp(ns: Namespace, flows: Sequence[tuple[int, str]]) -> None:
    """One datagram per (source port, destination) from the namespace's up1 address: each makes an
    UNREPLIED entry with a null binding (locally generated, NATed by nobody; nothing answers)."""
    sock = ns.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        for sport, dst in flows:
            udp = struct.pack("!HHHH", sport, 5060, 8, 0)
            header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, IPPROTO_UDP, 0,
                                 IPv4Address(UP1).packed, IPv4Address(dst).packed)
            while True:
                try:
                    sock.sendto(header + udp, (dst, 0))
                    break
                except BlockingIOError:
                    time.sleep(0.001)
    finally:
        sock.close()


def mark_replied(ct: Conntrack, entries: Sequence[Entry]) -> None:
    """A reply for each (status SEEN_REPLY|ASSURED, set through ctnetlink: the bits can only be set)."""
    for start in range(0, len(entries), 500):
        chunk = entries[start : start + 500]
        first = ct._next_seq(len(chunk))
        msgs = [ctcodec.encode_message(ctcodec.IPCTNL_MSG_CT_NEW, ctcodec.NLM_F_REQUEST, first + i, 2, [
            (ctcodec.CTA_TUPLE_ORIG, ctcodec.encode_tuple(ctcodec.CTA_TUPLE_ORIG, 2, e.proto, e.orig)),
            (ctcodec.CTA_STATUS, ctcodec.nla(ctcodec.CTA_STATUS,
                                             ctcodec.be32(e.status | IPS_SEEN_REPLY | IPS_ASSURED))),
        ]) for i, e in enumerate(chunk)]  # fmt: skip
        assert ct._transact(msgs, first).errors == {}


def keys(entries: Sequence[Entry]) -> set[tuple[object, ...]]:
    return {(e.orig, e.id) for e in entries}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [13, 1313])
def test_sigkill_mid_reaction_then_restart_deletes_nothing_wrong_and_reacts(
    netns: Namespace, tmp_path: Path, seed: int
) -> None:
    ns = netns
    for name, address in (("up1", f"{UP1}/24"), ("up2", "203.0.113.2/24")):
        ns.run("ip", "link", "add", name, "type", "veth", "peer", "name", f"{name}p")  # no dummy module here
        ns.run("ip", "addr", "add", address, "dev", name)
        ns.run("ip", "link", "set", f"{name}p", "up")
        ns.run("ip", "link", "set", name, "up")
    for net in ("192.0.2.0/24", "198.18.0.0/24"):
        ns.run("ip", "route", "add", net, "dev", "up1")
    ns.run("nft", "-f", "-", input=ROUTER_RULESET)
    tmp_path.chmod(0o755)
    rules = tmp_path / "rules.d"
    rules.mkdir(mode=0o755)
    (rules / "50-kill.toml").write_text(POLICY)
    (rules / "50-kill.toml").chmod(0o644)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    ct = Conntrack(ns.socket(socket.AF_NETLINK, socket.SOCK_RAW, ctcodec.NETLINK_NETFILTER))
    args = ("--no-dbus", "--rules-dir", str(rules), "--state-dir", str(state), "--debounce", "0.01")
    try:
        # UNREPLIED flows to 192.0.2.0/24 (stale once that net moves to the masqueraded up2), UNREPLIED
        # flows to 198.18.0.0/24 (stay on up1: healthy), and answered flows to 192.0.2.0/24 (healthy).
        send_udp(ns, [(1024 + i, f"192.0.2.{1 + i % 200}") for i in range(STALE + REPLIED)])
        send_udp(ns, [(1024 + i, f"198.18.0.{1 + i % 200}") for i in range(HEALTHY)])
        answered = {1024 + STALE + i for i in range(REPLIED)}
        mark_replied(ct, [e for e in ct.dump() if e.orig.sport in answered and e.orig.dst.packed[0] == 192])
        table = ct.dump(unreplied_only=False)
        assert len(table) == STALE + HEALTHY + REPLIED
        must_stay = keys([e for e in table if e.orig.dst in IPv4Network("198.18.0.0/24") or not e.unreplied])
        assert len(must_stay) == HEALTHY + REPLIED
        with Daemon(ns, *args, "--no-startup-sweep") as daemon:
            assert daemon.wait_for("ready") is not None, daemon.lines
            kill_after = random.Random(seed).uniform(0.0, 1.0)  # reactions here take about a second
            ns.run("ip", "route", "replace", "192.0.2.0/24", "dev", "up2")
            time.sleep(kill_after)
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait()
        after_kill = keys(ct.dump(unreplied_only=False))
        print(f"SIGKILL {kill_after * 1000:.0f} ms after the change: {len(after_kill - must_stay)} of {STALE} "
              f"stale entries left; log: {daemon.lines[1:]}")
        assert must_stay <= after_kill, f"wrong deletes after SIGKILL at +{kill_after:.3f} s"
        with Daemon(ns, *args) as daemon:  # the startup sweep judges what the killed one left
            assert daemon.wait_for("reaction 1 (") is not None, daemon.lines
            assert keys(ct.dump(unreplied_only=False)) == must_stay, daemon.lines
            ns.run("ip", "route", "replace", "198.18.0.0/24", "dev", "up2")  # and it reacts again
            line = daemon.wait_for("reaction 2 (")
            assert line is not None and f"{HEALTHY} deleted" in line, daemon.lines[-5:]
        left = ct.dump(unreplied_only=False)
        assert keys(left) == keys([e for e in table if not e.unreplied])
    finally:
        ct.close()
