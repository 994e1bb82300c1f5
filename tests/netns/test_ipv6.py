"""IPv6 masquerade in real namespaces, with the kernel as oracle.

    client fd00:1::2 --lan0-- router --up1 2001:db8:1::2 (masquerade)-- wan 2001:db8:ffff::10

A UDP flow that never gets an answer is masqueraded to the uplink's address.
The uplink then gains a second global address whose prefix matches the
server's longer: the kernel's source selection (RFC 6724 rule 8) now picks
it for a fresh flow, but the old entry keeps the old source (the kernel
heals masquerade only on address removal and device down). topowatch
deletes it; the next packet leaves from the oracle's address.
DAD is off in every namespace (and addresses are ``nodad``): no tentative
addresses to wait for.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from topowatch.core.conntrack import Entry
from topowatch.edges.ctnetlink import Conntrack
from topowatch.lab import Daemon, LineReader
from topowatch.netns import Namespace, namespaces, veth

pytestmark = [pytest.mark.netns]

NETLINK_NETFILTER = 12
SERVER = "2001:db8:ffff::10"
RULESET = """\
table inet t {
    chain post {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "up1" masquerade
    }
}
"""
SINK = r"""
import select, socket, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind(("::", 5060))
print("listening", flush=True)
end = time.monotonic() + float(sys.argv[1])
last = {}
while time.monotonic() < end:
    if select.select([s], [], [], 0.5)[0]:
        data, addr = s.recvfrom(2048)
        name = data.decode()
        if last.get(name) != addr[0]:
            last[name] = addr[0]
            print(name, addr[0], flush=True)
"""
SENDER = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind(("::", int(sys.argv[3])))
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    s.sendto(sys.argv[2].encode(), (sys.argv[4], 5060))
    if sys.argv[5] == "once":
        break
    time.sleep(0.1)
"""


def no_dad(ns: Namespace) -> None:
    for conf in ("all", "default"):
        ns.run("sysctl", "-qw", f"net.ipv6.conf.{conf}.accept_dad=0")


@pytest.fixture
def lab() -> Iterator[tuple[Namespace, Namespace, Namespace]]:
    with namespaces("tw6c", "tw6r", "tw6w") as (client, router, wan):
        for ns in (client, router, wan):
            no_dad(ns)
        veth(client, "lan0", router, "lan0")
        veth(router, "up1", wan, "isp1")
        client.run("ip", "addr", "add", "fd00:1::2/64", "dev", "lan0", "nodad")
        client.run("ip", "-6", "route", "add", "default", "via", "fd00:1::1")
        router.run("ip", "addr", "add", "fd00:1::1/64", "dev", "lan0", "nodad")
        router.run("ip", "addr", "add", "2001:db8:1::2/64", "dev", "up1", "nodad")
        router.run("ip", "-6", "route", "add", "default", "via", "2001:db8:1::1", "dev", "up1")
        router.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        wan.run("ip", "addr", "add", "2001:db8:1::1/64", "dev", "isp1", "nodad")
        wan.run("ip", "addr", "add", f"{SERVER}/128", "dev", "lo")
        router.run("nft", "-f", "-", input=RULESET)
        yield client, router, wan


def entry_for(router: Namespace, sport: int) -> Entry | None:
    sock = router.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    ct = Conntrack(sock)
    try:
        entries = ct.dump(unreplied_only=False)
    finally:
        ct.close()
    for e in entries:
        if e.orig.sport == sport and str(e.orig.src) == "fd00:1::2" and str(e.orig.dst) == SERVER:
            return e
    return None


def wait_entry(router: Namespace, sport: int, timeout: float = 5.0) -> Entry:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        e = entry_for(router, sport)
        if e is not None:
            return e
        time.sleep(0.05)
    raise AssertionError(f"no entry for [fd00:1::2]:{sport}")


def test_v6_masquerade_second_address_fixed_by_daemon(lab: tuple[Namespace, Namespace, Namespace]) -> None:
    client, router, wan = lab
    sink = wan.popen([sys.executable, "-c", SINK, "60"], stdout=subprocess.PIPE)
    sender = client.popen([sys.executable, "-c", SENDER, "60", "sip", "5060", SERVER, "loop"])
    try:
        assert sink.stdout is not None
        out = LineReader(sink.stdout.fileno())
        assert out.readline(10) == "listening"
        before = wait_entry(router, 5060)
        assert str(before.reply.dst) == "2001:db8:1::2" and before.unreplied
        with Daemon(router, "--debounce", "0.2", "--no-startup-sweep") as daemon:
            assert daemon.wait_for("ready") is not None, daemon.lines
            wan.run("ip", "addr", "add", "2001:db8:fffe::1/64", "dev", "isp1", "nodad")
            router.run("ip", "addr", "add", "2001:db8:fffe::2/64", "dev", "up1", "nodad")
            line = daemon.wait_for("deleted udp")
            assert line is not None and "fd00:1::2" in line, "\n".join(daemon.lines)
            code = daemon.stop()
        assert code == 0, daemon.lines
        # The kernel as oracle: a fresh flow from a new port gets today's source.
        client.run(sys.executable, "-c", SENDER, "5", "oracle", "41000", SERVER, "once")
        oracle = wait_entry(router, 41000)
        assert str(oracle.reply.dst) == "2001:db8:fffe::2"
        after = wait_entry(router, 5060)
        assert after.reply.dst == oracle.reply.dst
        seen: dict[str, str] = {}
        end = time.monotonic() + 5
        while time.monotonic() < end and seen.get("sip") != str(oracle.reply.dst):
            parts = out.readline(0.5).split()
            if len(parts) == 2:
                seen[parts[0]] = parts[1]
        assert seen.get("sip") == str(oracle.reply.dst)
    finally:
        for proc in (sender, sink):
            proc.terminate()
            proc.wait(5)
        if sink.stdout is not None:
            sink.stdout.close()
