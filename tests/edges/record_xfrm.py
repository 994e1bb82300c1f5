"""Record real XFRM netlink messages (dump and events) in a throwaway namespace.

Run as root: ``python tests/edges/record_xfrm.py``. Writes
``data/xfrm_dump.bin`` (the policy dump's datagrams), ``data/xfrm_events.bin``
(the event datagrams) and ``data/xfrm_ip.txt`` (``ip xfrm policy`` text, the
oracle). Each .bin file is a sequence of (u32 length, datagram) records.
This kernel has no ESP: SAs cannot be added, so SA messages are synthesised
in the tests instead.
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

from topowatch.netns import Namespace

DATA = Path(__file__).resolve().parent / "data"
NETLINK_XFRM = 6
POLICIES = [
    "src 10.0.1.0/24 dst 192.0.2.0/24 dir out priority 100 "
    "tmpl src 203.0.113.2 dst 198.51.100.1 proto esp reqid 1 mode tunnel",
    "src 10.0.1.0/24 dst 192.0.2.0/24 proto udp dport 5060 dir out mark 0x5 mask 0xff priority 50 "
    "tmpl proto esp reqid 2 mode transport level use",
    "src fd00::/64 dst fd01::/64 dir fwd action block if_id 7",
    "src 10.0.9.0/24 dst 0.0.0.0/0 proto icmp type 8 code 0 dir in priority 7",
]


def records(chunks: list[bytes]) -> bytes:
    return b"".join(struct.pack("=I", len(c)) + c for c in chunks)


def main() -> None:
    ns = Namespace.create("twrec")
    try:
        for p in POLICIES:
            ns.run("ip", "xfrm", "policy", "add", *p.split())
        sock = ns.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM)
        sock.send(struct.pack("=IHHII", 16, 0x15, 0x301, 1, 0))
        dump = []
        while True:
            data = sock.recv(65536)
            dump.append(data)
            if struct.unpack_from("=H", data, 4)[0] == 3:
                break
        (DATA / "xfrm_dump.bin").write_bytes(records(dump))
        (DATA / "xfrm_ip.txt").write_text(ns.run("ip", "xfrm", "policy"))
        ev = ns.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM)
        ev.bind((0, 0))
        for group in (2, 3, 4):
            ev.setsockopt(270, 1, group)
        ns.run("ip", "xfrm", "policy", "add", "src", "10.7.0.0/16", "dst", "0.0.0.0/0", "dir", "out",
               "limit", "time-hard", "1", "limit", "time-soft", "0")
        ns.run("ip", "xfrm", "policy", "update", *POLICIES[0].replace("reqid 1", "reqid 3").split())
        ns.run("ip", "xfrm", "policy", "del", "src", "10.0.1.0/24", "dst", "192.0.2.0/24", "dir", "out")
        time.sleep(2.5)  # the hard limit expires the 10.7.0.0/16 policy (POLEXPIRE, no delete message)
        ns.run("ip", "xfrm", "policy", "flush")
        events = []
        ev.settimeout(0.5)
        try:
            while True:
                events.append(ev.recv(65536))
        except TimeoutError:
            pass
        (DATA / "xfrm_events.bin").write_bytes(records(events))
        print(f"{len(dump)} dump datagrams, {len(events)} event datagrams")
    finally:
        ns.delete()


if __name__ == "__main__":
    main()
