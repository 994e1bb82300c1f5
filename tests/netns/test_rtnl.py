"""The rtnetlink edge against a real kernel in a namespace; `ip -j` is the oracle.

Every socket is made inside the test's namespace (``Namespace.socket``) and
every change runs there through ``ns.run``; the host's network is never read
or touched. Waits are bounded by ``trio.fail_after``, never by sleeps.
"""

from __future__ import annotations

import functools
import importlib.util
import socket
import sys
from collections.abc import Callable
from ipaddress import ip_address
from pathlib import Path
from types import ModuleType

import pytest
import trio

from topowatch.core import model
from topowatch.edges import rtnl
from topowatch.errors import DumpInterrupted
from topowatch.netns import Namespace

pytestmark = pytest.mark.netns


def _recorder() -> ModuleType:
    # The reference topology and the `ip -j` oracle live with the recorder, shared by both test sets.
    path = Path(__file__).resolve().parents[1] / "edges" / "record_rtnl.py"
    spec = importlib.util.spec_from_file_location("record_rtnl", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("record_rtnl", module)
    spec.loader.exec_module(module)
    return module


rec = _recorder()


def nl_socket(ns: Namespace) -> trio.socket.SocketType:
    return trio.socket.from_stdlib_socket(ns.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE))


async def ip(ns: Namespace, *argv: str, batch: str | None = None) -> str:
    run = functools.partial(ns.run, "ip", *argv, input=batch)
    result: str = await trio.to_thread.run_sync(run)
    return result


async def test_dump_matches_ip(netns: Namespace) -> None:
    rec.build(netns)
    stats = rtnl.DecodeStats()
    topo = await rtnl.dump_topology(lambda: nl_socket(netns), stats=stats)
    doc = rec.ip_json(netns)
    assert stats.undecodable == 0
    assert list(topo.links) == rec.expected_links(doc)
    assert rec.address_tuples(topo.addresses) == rec.expected_addresses(doc)
    assert sorted(map(rec.route_key, topo.routes)) == sorted(rec.expected_routes(doc))
    assert list(topo.rules) == rec.expected_rules(doc)
    assert len(topo.routes) > 60 and len(topo.rules) > 25  # the reference topology really is there


async def test_nexthop_ids_resolve_without_compat_mode(netns: Namespace) -> None:
    rec.build(netns)
    with_compat = await rtnl.dump_topology(lambda: nl_socket(netns))
    netns.run("sysctl", "-qw", "net.ipv4.nexthop_compat_mode=0")
    # the kernel now names only the id (`ip -j` shows no hops); our resolution must equal its own
    doc = rec.ip_json(netns)
    (by_id,) = [r for r in doc["route4"] if r.get("dst") == "10.80.0.0/16"]
    assert "nexthops" not in by_id and "dev" not in by_id
    without = await rtnl.dump_topology(lambda: nl_socket(netns))
    assert sorted(map(rec.route_key, without.routes)) == sorted(map(rec.route_key, with_compat.routes))


async def test_dump_works_in_the_socket_namespace_only(netns: Namespace) -> None:
    await ip(netns, "link", "add", "only0", "type", "veth", "peer", "name", "only1")
    with nl_socket(netns) as sock:
        topo = await rtnl.dump_topology(sock=sock)
    assert {link.name for link in topo.links} == {"lo", "only0", "only1"}


class Perturbing:
    """A socket that runs a change in the namespace after the first datagram of chosen dumps."""

    def __init__(self, ns: Namespace, sock: trio.socket.SocketType, times: int) -> None:
        self.ns, self.sock, self.times = ns, sock, times
        self.sent: list[int] = []
        self.received = 0
        self.counter = 0

    async def send(self, data: bytes, /) -> int:
        self.sent.append(int.from_bytes(data[4:6], sys.byteorder))
        self.received = 0
        return await self.sock.send(data)

    async def recv(self, bufsize: int, /) -> bytes:
        data = await self.sock.recv(bufsize)
        self.received += 1
        if self.sent[-1] == rtnl.RTM_GETADDR and self.received == 1 and self.times > 0:
            self.times -= 1
            self.counter += 1
            await ip(self.ns, "address", "add", f"10.254.{self.counter}.1/32", "dev", "lo")
        return data

    async def bind(self, address: tuple[int, int], /) -> None:
        await self.sock.bind(address)

    def setsockopt(self, level: int, optname: int, value: int, /) -> None:
        self.sock.setsockopt(level, optname, value)

    def close(self) -> None:
        self.sock.close()


async def _many_addresses(ns: Namespace) -> None:
    # enough addresses that the address dump spans several datagrams
    await ip(ns, "-batch", "-", batch="".join(f"address add 10.3.{i // 250}.{i % 250 + 1}/32 dev lo\n"
                                              for i in range(1500)))  # fmt: skip


async def test_interrupted_dump_is_retried(netns: Namespace) -> None:
    await _many_addresses(netns)
    with nl_socket(netns) as raw:
        sock = Perturbing(netns, raw, times=1)
        topo = await rtnl.dump_topology(sock=sock)
    assert sock.sent.count(rtnl.RTM_GETADDR) == 2  # interrupted once, dumped again
    assert model.Address(1, ip_address("10.254.1.1"), 32, model.SCOPE_UNIVERSE, 0x80) in topo.addresses


async def test_dump_interrupted_every_time_raises(netns: Namespace) -> None:
    await _many_addresses(netns)
    with nl_socket(netns) as raw, pytest.raises(DumpInterrupted):
        sock = Perturbing(netns, raw, times=99)
        await rtnl.dump_topology(sock=sock, attempts=2)
    assert sock.sent.count(rtnl.RTM_GETADDR) == 2


async def next_matching(
    events: rtnl.RtnlEvents, match: Callable[[rtnl.RtnlEvent], bool], seconds: float = 10
) -> rtnl.RtnlEvent:
    with trio.fail_after(seconds):
        async for event in events:
            if isinstance(event, rtnl.RtnlEvent) and match(event):
                return event
    raise AssertionError("the event stream ended")


def _is(kind: str, action: str, text: str) -> Callable[[rtnl.RtnlEvent], bool]:
    return lambda e: (e.kind, e.action) == (kind, action) and text in e.description


SETUP = """
link add e0 type veth peer name e0p
link set e0 up
link set e0p up
address add 10.9.0.1/24 dev e0
address add 2001:db8:9::1/64 dev e0 nodad
nexthop add id 7 via 10.9.0.254 dev e0
"""

CHANGES = [
    (("link", "set", "e0", "down"), "link", "new", "e0 (down)"),
    (("link", "add", "e1", "type", "veth", "peer", "name", "e1p"), "link", "new", "e1 "),
    (("link", "del", "e0p"), "link", "del", "e0p"),
    (("address", "add", "10.9.0.2/24", "dev", "e0"), "address", "new", "10.9.0.2/24 dev e0"),
    (("address", "del", "10.9.0.1/24", "dev", "e0"), "address", "del", "10.9.0.1/24 dev e0"),
    (("address", "add", "2001:db8:9::2/64", "dev", "e0", "nodad"), "address", "new", "2001:db8:9::2/64"),
    (("route", "add", "10.10.0.0/16", "via", "10.9.0.254", "table", "42"), "route", "new",
     "10.10.0.0/16 via 10.9.0.254 dev e0 table 42"),
    (("route", "add", "blackhole", "10.11.0.0/16"), "route", "new", "blackhole 10.11.0.0/16"),
    (("route", "add", "2001:db8:10::/48", "via", "2001:db8:9::fe"), "route", "new", "2001:db8:10::/48 via"),
    (("route", "add", "10.12.0.0/16", "nexthop", "via", "10.9.0.5", "nexthop", "via", "10.9.0.6"),
     "route", "new", "10.12.0.0/16 nexthop via 10.9.0.5"),
    (("route", "del", "10.9.0.0/24", "dev", "e0"), "route", "del", "10.9.0.0/24 dev e0"),
    (("rule", "add", "pref", "50", "fwmark", "0x5", "lookup", "42"), "rule", "new", "50: from all fwmark 0x5"),
    (("-6", "rule", "add", "pref", "50", "from", "2001:db8::/32", "lookup", "42"), "rule", "new",
     "-6 50: from 2001:db8::/32"),
    (("rule", "del", "pref", "32767"), "rule", "del", "32767:"),
    (("nexthop", "replace", "id", "7", "via", "10.9.0.253", "dev", "e0"), "nexthop", "new", "via 10.9.0.253"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "kind", "action", "text"), CHANGES, ids=[" ".join(c[0]) for c in CHANGES])
async def test_a_change_produces_its_event(
    netns: Namespace, argv: tuple[str, ...], kind: str, action: str, text: str
) -> None:
    await ip(netns, "-batch", "-", batch=SETUP.lstrip())
    names = (await rtnl.dump_topology(lambda: nl_socket(netns))).names()
    with nl_socket(netns) as sock:
        async with rtnl.RtnlEvents(sock, names=names) as events:
            await ip(netns, *argv)
            event = await next_matching(events, _is(kind, action, text))
    assert event.value is not None
    assert events.stats.undecodable == 0


async def test_no_event_without_a_change(netns: Namespace) -> None:
    # the negative control for the test above: an unrelated namespace's change is not seen here
    with Namespace.create("twother") as other:
        async with rtnl.RtnlEvents(sock_factory=lambda: nl_socket(netns)) as events:
            await ip(other, "link", "add", "x0", "type", "veth", "peer", "name", "x1")
            await ip(netns, "link", "add", "marker0", "type", "veth", "peer", "name", "marker1")
            first = await next_matching(events, lambda e: e.kind == "link")
    assert isinstance(first.value, model.Link) and first.value.name.startswith("marker")


async def test_overrun_then_the_stream_keeps_working(netns: Namespace) -> None:
    await ip(netns, "link", "add", "b0", "type", "veth", "peer", "name", "b0p")
    await ip(netns, "link", "set", "b0", "up")
    await ip(netns, "link", "set", "b0p", "up")
    await ip(netns, "address", "add", "10.5.0.1/16", "dev", "b0")
    burst = "".join(f"route add 10.{100 + i // 250}.{i % 250}.0/24 via 10.5.0.2\n" for i in range(3000))
    sock = nl_socket(netns)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # tiny, and not forced
    with sock:
        await _overrun_then_change(netns, sock, burst)


async def _overrun_then_change(netns: Namespace, sock: trio.socket.SocketType, burst: str) -> None:
    async with rtnl.RtnlEvents(sock, rcvbuf=None) as events:
        await ip(netns, "-batch", "-", batch=burst)  # nobody reads meanwhile: the buffer overflows
        overruns = 0
        with trio.fail_after(10):
            async for event in events:
                if isinstance(event, rtnl.Overrun):
                    overruns += 1
                    break
        assert overruns == 1
        # The kernel keeps a socket "congested" (dropping every notification, with no
        # second ENOBUFS) until its queue is read empty; the edge must have handled
        # that, or this change, made right after the overrun, is lost without a trace.
        await ip(netns, "rule", "add", "pref", "777", "from", "10.77.0.0/16", "lookup", "77")
        with trio.fail_after(10):
            async for event in events:
                assert not isinstance(event, rtnl.Overrun), "the change after the overrun was dropped"
                assert event.kind == "rule", f"stale backlog delivered after the overrun: {event}"
                assert event.description == "rule added: 777: from 10.77.0.0/16 lookup 77"
                return
        raise AssertionError("the event stream ended")
