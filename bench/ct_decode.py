"""Benchmark the conntrack edge in a throwaway namespace: create, dump+decode, delete.

Run as root: ``.venv/bin/python bench/ct_decode.py [ENTRIES]``. Compares with
``conntrack -L`` on the same table. Never touches the host's table.
"""

from __future__ import annotations

import socket
import sys
import time
from ipaddress import IPv4Address, IPv6Address

from topowatch.core.conntrack import IPS_SEEN_REPLY, CtTuple, Entry
from topowatch.edges.ctcodec import NETLINK_NETFILTER
from topowatch.edges.ctnetlink import Conntrack
from topowatch.netns import Namespace


def table(n: int) -> list[Entry]:
    out = []
    for i in range(n):
        sport = 1024 + i % 60000
        if i % 5 == 4:
            src6, dst6 = IPv6Address(0xFD00 << 112 | i // 60000 + 1), IPv6Address("2001:db8::53")
            nat6 = IPv6Address(0x20010DB8FFFF << 80 | i // 60000 + 1)
            out.append(Entry(10, 17, CtTuple(src6, dst6, sport, 53), CtTuple(dst6, nat6, 53, sport),
                             status=0, timeout=600))  # fmt: skip
            continue
        src, dst = IPv4Address(0x0A000000 + i // 60000 + 1), IPv4Address(0xC6336400 + i % 7)
        nat = IPv4Address(0xCB007100 + i // 60000 + 1)
        status = IPS_SEEN_REPLY if i % 10 == 0 else 0
        out.append(Entry(2, 17, CtTuple(src, dst, sport, 53), CtTuple(dst, nat, 53, sport),
                         status=status, timeout=600))  # fmt: skip
    return out


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    with Namespace.create("twbench") as ns:
        ct = Conntrack(ns.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER))
        entries = table(n)
        t = time.perf_counter()
        created = ct.create(entries)
        t_create = time.perf_counter() - t
        print(f"create        {created:>8} entries {t_create:6.2f} s {created / t_create:>10,.0f}/s")
        for unreplied in (True, False):
            t = time.perf_counter()
            got = ct.dump(unreplied_only=unreplied)
            dt = time.perf_counter() - t
            stats = ct.last_dump
            assert stats is not None
            label = "dump unreplied" if unreplied else "dump all"
            detail = f"{stats.recvs} recvs, {stats.bytes / 1e6:.1f} MB, {stats.decode_errors} errors"
            print(f"{label:<14}{len(got):>8} entries {dt:6.2f} s {len(got) / dt:>10,.0f}/s ({detail})")
        t = time.perf_counter()
        listed = ns.run("conntrack", "-L").count("\n")
        dt = time.perf_counter() - t
        print(f"conntrack -L  {listed:>8} entries {dt:6.2f} s {listed / dt:>10,.0f}/s (text to a pipe)")
        stale = ct.dump()
        t = time.perf_counter()
        result = ct.delete(stale)
        dt = time.perf_counter() - t
        print(f"delete        {result.deleted:>8} entries {dt:6.2f} s {result.deleted / dt:>10,.0f}/s "
              f"({result.batches} batches: {result.describe()})")  # fmt: skip
        t = time.perf_counter()
        again = ct.delete(stale)
        dt = time.perf_counter() - t
        print(f"delete again  {again.not_found:>8} ENOENT  {dt:6.2f} s {again.not_found / dt:>10,.0f}/s")
        ct.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
