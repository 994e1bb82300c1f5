"""IPv6 MASQUERADE source selection (``ipv6_dev_get_saddr``, RFC 6724 subset), table-driven."""

from __future__ import annotations

from ipaddress import ip_address, ip_network

import pytest

from topowatch.core.fib import Fib
from topowatch.core.flow import Egress
from topowatch.core.model import (
    IFA_F_DEPRECATED,
    IFA_F_OPTIMISTIC,
    IFA_F_TENTATIVE,
    SCOPE_LINK,
    Address,
    Link,
    Nexthop,
    Route,
    Topology,
)

LAN, UP1, UP2 = 2, 3, 4
TEMPORARY = 0x01


def a(ifindex: int, addr: str, plen: int = 64, flags: int = 0) -> Address:
    ip = ip_address(addr)
    return Address(ifindex, ip, plen, scope=SCOPE_LINK if ip.is_link_local else 0, flags=flags)


def source(addresses: list[Address], dst: str = "2001:db8:ffff::10", oif: int = UP1) -> object:
    topo = Topology(
        links=(Link(1, "lo"), Link(LAN, "lan"), Link(UP1, "up1"), Link(UP2, "up2")),
        addresses=tuple(addresses),
        routes=(Route(ip_network("::/0"), nexthops=(Nexthop(oif, ip_address("fe80::1")),)),
                Route(ip_network("fe80::/64"), nexthops=(Nexthop(oif),))),
    )
    egress = Fib(topo).lookup(ip_address(dst))
    assert isinstance(egress, tuple) and len(egress) == 1 and isinstance(egress[0], Egress)
    src = egress[0].masquerade_source
    return None if src is None else str(src)


LL = a(UP1, "fe80::2")
CASES = [
    ("the oif's global address", [LL, a(UP1, "2001:db8:1::2")], "2001:db8:1::2"),
    ("scope beats the oif: a global address elsewhere over the oif's link-local",
     [LL, a(LAN, "2001:db8:aaaa::1")], "2001:db8:aaaa::1"),
    ("the oif beats another link at equal scope",
     [a(LAN, "2001:db8:ffff::1", 48), LL, a(UP1, "2001:db8:1::2")], "2001:db8:1::2"),
    ("deprecated is avoided", [a(UP1, "2001:db8:ffff::2", flags=IFA_F_DEPRECATED), a(UP1, "2001:db8:1::2")],
     "2001:db8:1::2"),
    ("tentative is never used", [a(UP1, "2001:db8:ffff::2", flags=IFA_F_TENTATIVE), a(UP1, "2001:db8:1::2")],
     "2001:db8:1::2"),
    ("optimistic is a candidate but avoided",
     [a(UP1, "2001:db8:ffff::2", flags=IFA_F_TENTATIVE | IFA_F_OPTIMISTIC), a(UP1, "2001:db8:1::2")],
     "2001:db8:1::2"),
    ("optimistic is used when it is the only one",
     [LL, a(UP1, "2001:db8:ffff::2", flags=IFA_F_TENTATIVE | IFA_F_OPTIMISTIC)], "2001:db8:ffff::2"),
    ("longest matching prefix", [a(UP1, "2001:db8:1::2"), a(UP1, "2001:db8:fffe::2")], "2001:db8:fffe::2"),
    ("matching prefix is capped at the address's prefix length (ties keep dump order)",
     [a(UP1, "2001:db8:1::2", 16), a(UP1, "2001:db8:fffe::2", 16)], "2001:db8:1::2"),
    ("same label (a global over a ULA for a global destination)",
     [a(UP1, "fd00:ffff::2"), a(UP1, "2001:db8:1::2")], "2001:db8:1::2"),
    ("public over temporary", [a(UP1, "2001:db8:ffff::99", flags=TEMPORARY), a(UP1, "2001:db8:1::2")],
     "2001:db8:1::2"),
    ("link-local destination: only the oif's addresses", [a(LAN, "fe80::9"), LL], "fe80::2"),
    ("no usable address", [a(UP1, "2001:db8:1::2", flags=IFA_F_TENTATIVE)], None),
]


@pytest.mark.parametrize(("addresses", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_v6_masquerade_source(addresses: list[Address], expected: str | None) -> None:
    dst = "fe80::77" if expected == "fe80::2" else "2001:db8:ffff::10"
    assert source(addresses, dst) == expected
