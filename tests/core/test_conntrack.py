"""core.conntrack: an entry as re-read before its delete, and an entry as a person reads it.

``Reread.applied`` is what the daemon's re-check asks the eligibility and the
policies about (``reactor.still_stale``): every field must be the dumped
entry's where it cannot change, the kernel's where it can. Expectations are
written out by hand.
"""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from topowatch.core.conntrack import (
    IPS_ASSURED,
    IPS_CONFIRMED,
    IPS_DST_NAT_DONE,
    IPS_SEEN_REPLY,
    IPS_SRC_NAT_DONE,
    CtTuple,
    Entry,
    Reread,
)
from topowatch.core.flow import IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, NO_NAT, Binding, NatKind
from topowatch.core.model import AF_INET, AF_INET6

A, B, C = ip_address("10.0.1.2"), ip_address("192.0.2.10"), ip_address("203.0.113.2")


def test_a_reread_applied_keeps_tuples_and_zone_and_takes_the_kernels_state() -> None:
    dumped = Entry(AF_INET, IPPROTO_TCP, CtTuple(A, B, 1000, 80), CtTuple(B, C, 80, 2000), status=IPS_CONFIRMED,
                   zone=7, mark=0x10, id=41, timeout=30)  # fmt: skip
    now = Reread(status=IPS_CONFIRMED | IPS_SEEN_REPLY, id=42, mark=0x20, timeout=120, tcp_state=3)
    assert now.applied(dumped) == Entry(
        family=AF_INET, proto=IPPROTO_TCP, orig=CtTuple(A, B, 1000, 80), reply=CtTuple(B, C, 80, 2000),
        status=IPS_CONFIRMED | IPS_SEEN_REPLY, zone=7, mark=0x20, id=42, timeout=120,
    )


@pytest.mark.parametrize(
    ("dumped_status", "now_status", "replied"),
    [
        (IPS_CONFIRMED, IPS_CONFIRMED, False),
        (IPS_CONFIRMED, IPS_CONFIRMED | IPS_SEEN_REPLY, True),
        (IPS_CONFIRMED | IPS_SEEN_REPLY, IPS_CONFIRMED | IPS_SEEN_REPLY | IPS_ASSURED, False),  # replied before
        (IPS_CONFIRMED, IPS_CONFIRMED | IPS_ASSURED, False),
    ],
)
def test_replied_since_the_dump(dumped_status: int, now_status: int, replied: bool) -> None:
    dumped = Entry(AF_INET, IPPROTO_UDP, CtTuple(A, B, 1000, 53), CtTuple(B, A, 53, 1000), status=dumped_status)
    assert Reread(status=now_status, id=0).replied_since(dumped) is replied


@pytest.mark.parametrize(
    ("entry", "text"),
    [
        (Entry(AF_INET, IPPROTO_UDP, CtTuple(A, B, 1000, 53), CtTuple(B, C, 53, 2000), status=IPS_CONFIRMED),
         "udp 10.0.1.2:1000 -> 192.0.2.10:53 reply 192.0.2.10:53 -> 203.0.113.2:2000 [UNREPLIED]"),
        (Entry(AF_INET, IPPROTO_TCP, CtTuple(A, B, 1000, 80), CtTuple(B, A, 80, 1000),
               status=IPS_CONFIRMED | IPS_SEEN_REPLY, zone=3, mark=0x1f),
         "tcp 10.0.1.2:1000 -> 192.0.2.10:80 reply 192.0.2.10:80 -> 10.0.1.2:1000 zone 3 mark 0x1f"),
        (Entry(AF_INET, IPPROTO_ICMP, CtTuple(A, B, 7, 8 << 8), CtTuple(B, C, 7, 0), status=IPS_CONFIRMED),
         "icmp 10.0.1.2 -> 192.0.2.10 id=7 reply 192.0.2.10 -> 203.0.113.2 [UNREPLIED]"),
        (Entry(AF_INET6, 58, CtTuple(ip_address("fd00::2"), ip_address("2001:db8::1"), 9, 128 << 8),
               CtTuple(ip_address("2001:db8::1"), ip_address("fd00::2"), 9, 129 << 8), status=IPS_CONFIRMED,
               zone=1),
         "icmpv6 fd00::2 -> 2001:db8::1 id=9 reply 2001:db8::1 -> fd00::2 zone 1 [UNREPLIED]"),
    ],
    ids=["udp masqueraded", "tcp replied, zone and mark", "icmp", "icmpv6 in a zone"],
)
def test_describe(entry: Entry, text: str) -> None:
    assert entry.describe() == text


D9 = ip_address("10.0.9.9")


@pytest.mark.parametrize(
    ("entry", "snat", "dnat"),
    [
        # orig A:1000 -> B:53; the reply names where each side went
        (Entry(AF_INET, IPPROTO_UDP, CtTuple(A, B, 1000, 53), CtTuple(B, A, 53, 1000)), NO_NAT, NO_NAT),
        (Entry(AF_INET, IPPROTO_UDP, CtTuple(A, B, 1000, 53), CtTuple(B, C, 53, 2000)),
         Binding(NatKind.SNAT, C, C, 2000, 2000), NO_NAT),
        (Entry(AF_INET, IPPROTO_UDP, CtTuple(A, B, 1000, 53), CtTuple(D9, A, 5353, 1000)),
         NO_NAT, Binding(NatKind.DNAT, D9, D9, 5353, 5353)),
        (Entry(AF_INET, IPPROTO_UDP, CtTuple(A, B, 1000, 53), CtTuple(B, A, 53, 1001)),  # the port alone
         Binding(NatKind.SNAT, A, A, 1001, 1001), NO_NAT),
        # ICMP: the id is not a port; a translated address is a binding without ports
        (Entry(AF_INET, IPPROTO_ICMP, CtTuple(A, B, 7, 8 << 8), CtTuple(D9, C, 9, 0)),
         Binding(NatKind.SNAT, C, C), Binding(NatKind.DNAT, D9, D9)),
        (Entry(AF_INET, IPPROTO_ICMP, CtTuple(A, B, 7, 8 << 8), CtTuple(B, A, 9, 0)), NO_NAT, NO_NAT),
        # a side whose NAT never ran: kept tuples are a null binding, translated ones (made by hand) none
        (Entry(AF_INET, IPPROTO_UDP, CtTuple(A, B, 1000, 53), CtTuple(B, A, 53, 1000), status=IPS_CONFIRMED),
         NO_NAT, NO_NAT),
        (Entry(AF_INET, IPPROTO_UDP, CtTuple(A, B, 1000, 53), CtTuple(D9, C, 53, 1000), status=IPS_CONFIRMED),
         None, None),
        (Entry(AF_INET, IPPROTO_UDP, CtTuple(A, B, 1000, 53), CtTuple(D9, C, 53, 1000),
               status=IPS_CONFIRMED | IPS_SRC_NAT_DONE),
         Binding(NatKind.SNAT, C, C, 1000, 1000), None),
        (Entry(AF_INET, IPPROTO_UDP, CtTuple(A, B, 1000, 53), CtTuple(D9, C, 53, 1000),
               status=IPS_CONFIRMED | IPS_DST_NAT_DONE),
         None, Binding(NatKind.DNAT, D9, D9, 53, 53)),
    ],
)  # fmt: skip
def test_actual_bindings(entry: Entry, snat: Binding | None, dnat: Binding | None) -> None:
    assert entry.actual_snat() == snat
    assert entry.actual_dnat() == dnat


def test_an_entry_of_the_wrong_family_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"^Entry\.family 10 does not match 10\.0\.1\.2$"):
        Entry(AF_INET6, IPPROTO_UDP, CtTuple(A, B, 1, 2), CtTuple(B, A, 2, 1))
