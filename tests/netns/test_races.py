"""Races and faults around the delete path, on the real kernel, in namespaces the tests create.

The fault-injection point ``Reactor.before_delete`` runs between judging and
deleting: there a real reply packet turns one judged entry into a replied
one, deterministically. The kernel is the oracle for what is left.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import Any, cast

import pytest
import trio

from topowatch.core.conntrack import IPS_SEEN_REPLY, Entry
from topowatch.core.eligibility import Eligibility
from topowatch.core.fib import Fib
from topowatch.core.flow import NO_NAT, Binding, Flow, NatKind, Prediction
from topowatch.core.model import Link, Route, Topology
from topowatch.core.nat import NatRuleset
from topowatch.edges import ctcodec
from topowatch.edges.ctnetlink import Conntrack
from topowatch.netns import Namespace
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
