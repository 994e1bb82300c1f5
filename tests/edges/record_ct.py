"""Record real ctnetlink dump bytes for tests/edges/test_ctcodec.py.

Run as root: ``.venv/bin/python tests/edges/record_ct.py``. It builds a
throwaway lab (client -- router -- server namespaces over veth, masquerade on
the router's uplink, a zone set by an nft raw rule), makes real UDP and ICMP
flows over IPv4 and IPv6 plus entries created through ctnetlink (zones, marks,
GRE, TCP), then writes for each scenario:

- ``data/ct_<name>.hex``: one netlink message per line, hex, exactly as the
  kernel sent it;
- ``data/ct_<name>.conntrack.txt``: ``conntrack -L -o extended,id`` of the
  same table, taken right after the dump: the independent oracle the tests
  compare the decoder against.

Everything happens in namespaces this script creates and removes.
"""

from __future__ import annotations

import socket
import struct
import sys
from ipaddress import ip_address
from pathlib import Path

from topowatch.core.conntrack import IPS_ASSURED, IPS_SEEN_REPLY, CtTuple, Entry
from topowatch.edges.ctcodec import _NLMSGHDR
from topowatch.edges.ctnetlink import Conntrack
from topowatch.netns import Namespace, namespaces, veth

DATA = Path(__file__).parent / "data"

NFT_ROUTER = """
table inet nat {
    chain post { type nat hook postrouting priority srcnat; oifname "up0" masquerade; }
}
table inet raw {
    chain pre { type filter hook prerouting priority raw; udp dport 5353 ct zone set 7; }
}
"""


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _echo_request(ident: int, seq: int, v6: bool) -> bytes:
    icmp_type = 128 if v6 else 8
    body = struct.pack("!BBHHH", icmp_type, 0, 0, ident, seq) + b"topowatch"
    if v6:
        return body  # the kernel fills in the ICMPv6 checksum on raw sockets
    return body[:2] + struct.pack("!H", _checksum(body)) + body[4:]


def build_lab(client: Namespace, router: Namespace, server: Namespace) -> None:
    veth(client, "c0", router, "down0")
    veth(router, "up0", server, "s0")
    client.run("ip", "addr", "add", "10.0.1.2/24", "dev", "c0")
    client.run("ip", "-6", "addr", "add", "fd00:1::2/64", "dev", "c0", "nodad")
    client.run("ip", "route", "add", "default", "via", "10.0.1.1")
    client.run("ip", "-6", "route", "add", "default", "via", "fd00:1::1")
    router.run("ip", "addr", "add", "10.0.1.1/24", "dev", "down0")
    router.run("ip", "-6", "addr", "add", "fd00:1::1/64", "dev", "down0", "nodad")
    router.run("ip", "addr", "add", "203.0.113.1/24", "dev", "up0")
    router.run("ip", "-6", "addr", "add", "2001:db8::1/64", "dev", "up0", "nodad")
    router.run("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
    server.run("ip", "addr", "add", "203.0.113.2/24", "dev", "s0")
    server.run("ip", "-6", "addr", "add", "2001:db8::2/64", "dev", "s0", "nodad")
    router.run("nft", "-f", "-", input=NFT_ROUTER)


def make_traffic(client: Namespace, server: Namespace) -> None:
    """UDP unreplied and replied, ICMP echo (replied), a zoned flow, one not NATed; v4 and v6."""
    for family, srv, cli_dst, router_local in (
        (socket.AF_INET, "203.0.113.2", "203.0.113.2", "10.0.1.1"),
        (socket.AF_INET6, "2001:db8::2", "2001:db8::2", "fd00:1::1"),
    ):
        local = client.socket(family, socket.SOCK_DGRAM)
        local.bind(("", 40005))
        local.sendto(b"to the router itself: no NAT", (router_local, 9))
        local.close()
        echo = server.socket(family, socket.SOCK_DGRAM)
        echo.bind((srv, 7))
        echo.settimeout(5)
        for port in (40001, 40002):
            s = client.socket(family, socket.SOCK_DGRAM)
            s.bind(("", port))
            s.sendto(b"unreplied", (cli_dst, 9))  # nobody listens: stays UNREPLIED
            s.close()
        s = client.socket(family, socket.SOCK_DGRAM)
        s.bind(("", 40003))
        s.settimeout(5)
        s.sendto(b"ping", (cli_dst, 7))
        data, peer = echo.recvfrom(100)
        echo.sendto(data, peer)
        s.recvfrom(100)  # replied: SEEN_REPLY
        s.close()
        z = client.socket(family, socket.SOCK_DGRAM)
        z.bind(("", 40004))
        z.sendto(b"zoned", (cli_dst, 5353))
        z.close()
        echo.close()
        v6 = family == socket.AF_INET6
        icmp = client.socket(family, socket.SOCK_RAW, socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
        icmp.settimeout(5)
        icmp.sendto(_echo_request(0x4242, 1, v6), (cli_dst, 0))
        icmp.recvfrom(200)
        icmp.close()


def created_entries() -> list[Entry]:
    a = ip_address
    return [
        Entry(2, 17, CtTuple(a("192.0.2.1"), a("198.51.100.1"), 1000, 53),
              CtTuple(a("198.51.100.1"), a("192.0.2.1"), 53, 1000), status=0, zone=7, mark=0x2A, timeout=3000),
        Entry(10, 17, CtTuple(a("2001:db8:1::1"), a("2001:db8:2::1"), 1000, 53),
              CtTuple(a("2001:db8:2::1"), a("2001:db8:9::9"), 53, 1000), status=0, zone=65535, timeout=3000),
        Entry(2, 1, CtTuple(a("192.0.2.1"), a("198.51.100.1"), 7, 8 << 8),
              CtTuple(a("198.51.100.1"), a("192.0.2.1"), 7, 0), status=0, mark=0xFFFFFFFF, timeout=3000),
        Entry(10, 58, CtTuple(a("2001:db8:1::1"), a("2001:db8:2::1"), 9, 128 << 8),
              CtTuple(a("2001:db8:2::1"), a("2001:db8:1::1"), 9, 129 << 8), status=0, timeout=3000),
        Entry(2, 47, CtTuple(a("192.0.2.1"), a("198.51.100.1"), 0, 0),
              CtTuple(a("198.51.100.1"), a("192.0.2.1"), 0, 0), status=IPS_SEEN_REPLY, timeout=3000),
        Entry(2, 6, CtTuple(a("192.0.2.1"), a("198.51.100.1"), 33333, 443),
              CtTuple(a("198.51.100.1"), a("203.0.113.77"), 443, 33333),
              status=IPS_SEEN_REPLY | IPS_ASSURED, timeout=3000),
    ]  # fmt: skip


def split_messages(datagrams: list[bytes]) -> list[bytes]:
    out = []
    for d in datagrams:
        pos = 0
        while pos + 16 <= len(d):
            length = _NLMSGHDR.unpack_from(d, pos)[0]
            out.append(d[pos : pos + length])
            pos += (length + 3) & ~3
    return out


def record(name: str, ns: Namespace) -> None:
    ct = ns.call(Conntrack)
    try:
        messages = split_messages(ct.dump_datagrams())
    finally:
        ct.close()
    listing = ns.run("conntrack", "-L", "-o", "extended,id")
    DATA.mkdir(exist_ok=True)
    (DATA / f"ct_{name}.hex").write_text("".join(m.hex() + "\n" for m in messages))
    (DATA / f"ct_{name}.conntrack.txt").write_text(listing)
    print(f"{name}: {len(messages)} messages, {listing.count(chr(10))} entries listed")


def main() -> int:
    with namespaces("twc", "twr", "tws", "twk") as (client, router, server, plain):
        build_lab(client, router, server)
        make_traffic(client, server)
        record("lab_nat", router)
        ct = plain.call(Conntrack)
        try:
            ct.create(created_entries())
        finally:
            ct.close()
        record("created", plain)
    return 0


if __name__ == "__main__":
    sys.exit(main())
