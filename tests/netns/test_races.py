"""Races and faults around the delete path, on the real kernel, in namespaces the tests create.

The fault-injection point ``Reactor.before_delete`` runs between judging and
deleting: there a real reply packet turns one judged entry into a replied
one, deterministically. The kernel is the oracle for what is left.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, cast

import pytest
import trio

from topowatch.core.conntrack import IPS_ASSURED, IPS_SEEN_REPLY, CtTuple, Entry
from topowatch.core.eligibility import Eligibility
from topowatch.core.fib import Fib
from topowatch.core.flow import IPPROTO_UDP, NO_NAT, Binding, Flow, NatKind, Prediction
from topowatch.core.model import Link, Route, Topology
from topowatch.core.nat import NatRuleset
from topowatch.core.pressure import Candidate, PressurePolicy, Sample
from topowatch.edges import ctcodec
from topowatch.edges.ctnetlink import Conntrack
from topowatch.edges.sysctl import ConntrackSysctl, TimeoutLedger, sysctl_name
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
        return cast(NatRuleset, object())

    async def entries(self, eligibility: Eligibility) -> list[Entry]:
        return [e for e in await trio.to_thread.run_sync(self.ct.dump) if eligibility.admits(e)]

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
