"""``-m addrtype`` in the evaluator: every type the kernel's match knows is answered as the kernel does.

IPv4 follows ``inet_addr_type`` (the local table's route type, else unicast;
an error route in the local table is an error lookup, so unicast, which
tests/netns/test_iptables_kernel.py checks against the kernel), IPv6
``match_type6`` (categories by address, then the route to it). The topology:

    lan (2) 10.0.1.1/24  fd00:1::1/64     up1 (3) 203.0.113.2/24  2001:db8:1::2/64
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, ip_address, ip_network

import pytest

from topowatch.core.evaluate import predict
from topowatch.core.fib import Fib
from topowatch.core.flow import IPPROTO_UDP, NO_NAT, Binding, Flow, NatKind, Unknown
from topowatch.core.model import (
    AF_INET,
    AF_INET6,
    SCOPE_HOST,
    SCOPE_LINK,
    TABLE_LOCAL,
    Address,
    IPAddress,
    Link,
    Nexthop,
    Route,
    RouteType,
    Topology,
)
from topowatch.core.nat import AddrTypeMatch, Chain, Hook, NatRuleset, NatStatement, Rule
from topowatch.core.xtmatch import xt_match

LO, LAN, UP1 = 1, 2, 3
ADDRESSES = (
    Address(LO, ip_address("127.0.0.1"), 8, scope=SCOPE_HOST),
    Address(LAN, ip_address("10.0.1.1"), 24),
    Address(LAN, ip_address("fd00:1::1"), 64),
    Address(UP1, ip_address("203.0.113.2"), 24),
    Address(UP1, ip_address("2001:db8:1::2"), 64),
)
MAIN = (
    Route(ip_network("10.0.1.0/24"), nexthops=(Nexthop(LAN),), scope=SCOPE_LINK),
    Route(ip_network("203.0.113.0/24"), nexthops=(Nexthop(UP1),), scope=SCOPE_LINK),
    Route(ip_network("0.0.0.0/0"), nexthops=(Nexthop(UP1, ip_address("203.0.113.1")),)),
    Route(ip_network("192.0.2.0/24"), type=RouteType.BLACKHOLE),  # main: not the local table
    Route(ip_network("fd00:1::/64"), nexthops=(Nexthop(LAN),)),
    Route(ip_network("2001:db8:1::/64"), nexthops=(Nexthop(UP1),)),
    Route(ip_network("2001:db8:dead::/48"), type=RouteType.BLACKHOLE),
    Route(ip_network("2001:db8:beef::/48"), type=RouteType.PROHIBIT),
    Route(ip_network("2001:db8:f00::/48"), nexthops=(Nexthop(UP1, ip_address("2001:db8:1::1")),)),
)


def local(dst: str, rtype: RouteType, oif: int | None = LAN) -> Route:
    hops = (Nexthop(oif),) if oif is not None else ()
    return Route(ip_network(dst), TABLE_LOCAL, rtype, hops, scope=SCOPE_HOST)


# As the kernel dumps it: the local table spelled out (address, broadcast and user routes).
LOCAL_TABLE = (
    local("127.0.0.0/8", RouteType.LOCAL, LO),
    local("127.0.0.1", RouteType.LOCAL, LO),
    local("10.0.1.1", RouteType.LOCAL),
    local("10.0.1.255", RouteType.BROADCAST),
    local("203.0.113.2", RouteType.LOCAL, UP1),
    local("203.0.113.255", RouteType.BROADCAST, UP1),
    local("100.65.0.1", RouteType.ANYCAST),
    local("100.66.0.0/24", RouteType.UNICAST),
    local("198.51.100.0/24", RouteType.BLACKHOLE, None),
    local("198.51.101.0/24", RouteType.UNREACHABLE, None),
    local("198.51.102.0/24", RouteType.PROHIBIT, None),
    local("198.51.103.0/24", RouteType.THROW, None),
    local("fd00:1::1", RouteType.LOCAL),
    local("2001:db8:1::2", RouteType.LOCAL, UP1),
)
LINKS = (Link(LO, "lo"), Link(LAN, "lan"), Link(UP1, "up1"))
FIB = Fib(Topology(links=LINKS, addresses=ADDRESSES, routes=MAIN + LOCAL_TABLE))
# Built by hand: no local table, the FIB implies the local routes of the addresses.
HAND_FIB = Fib(Topology(links=LINKS, addresses=ADDRESSES, routes=MAIN))

ALL_V4 = ("UNSPEC", "UNICAST", "LOCAL", "BROADCAST", "ANYCAST", "MULTICAST", "BLACKHOLE", "UNREACHABLE",
          "PROHIBIT", "THROW", "NAT", "XRESOLVE")


@dataclass(frozen=True)
class Packet:
    family: int
    proto: int
    saddr: IPAddress
    daddr: IPAddress
    sport: int = 40000
    dport: tuple[int, int] = (5060, 5060)
    iif: object = None
    oif: object = None


def dst_type(fib: Fib, daddr: str, types: str, *, negate: bool = False) -> bool | Unknown:
    d = ip_address(daddr)
    src = ip_address("10.0.1.2" if d.version == 4 else "fd00:1::2")
    m = AddrTypeMatch("dst", frozenset(types.split(",")), negate, f"-m addrtype --dst-type {types}")
    packet = Packet(AF_INET if d.version == 4 else AF_INET6, IPPROTO_UDP, src, d)
    return xt_match(m, packet, fib, None, hook=Hook.PREROUTING)


# (address, the one RTN_* type inet_addr_type gives it)
V4_TYPES: list[tuple[str, str]] = [
    ("10.0.1.1", "LOCAL"),
    ("127.0.0.9", "LOCAL"),
    ("10.0.1.255", "BROADCAST"),
    ("255.255.255.255", "BROADCAST"),
    ("0.0.0.0", "BROADCAST"),
    ("224.0.0.251", "MULTICAST"),
    ("100.65.0.1", "ANYCAST"),
    ("100.66.0.7", "UNICAST"),  # a unicast route in the local table
    ("8.8.8.8", "UNICAST"),
    ("192.0.2.1", "UNICAST"),  # a blackhole in main is not looked at
    ("198.51.100.1", "UNICAST"),  # an error route in the local table fails the lookup: unicast
    ("198.51.101.1", "UNICAST"),
    ("198.51.102.1", "UNICAST"),
    ("198.51.103.1", "UNICAST"),
]


@pytest.mark.parametrize(("addr", "rtype"), V4_TYPES, ids=[a for a, _ in V4_TYPES])
def test_ipv4_every_type_is_the_kernels(addr: str, rtype: str) -> None:
    for name in ALL_V4:
        assert dst_type(FIB, addr, name) is (name == rtype), (addr, name)
        assert dst_type(FIB, addr, name, negate=True) is (name != rtype), (addr, name)
    assert dst_type(FIB, addr, f"{rtype},BLACKHOLE") is True  # a list is any of its types


def test_ipv4_hand_built_topology_implies_the_subnet_broadcast() -> None:
    assert dst_type(HAND_FIB, "10.0.1.255", "BROADCAST") is True
    assert dst_type(HAND_FIB, "10.0.1.1", "LOCAL") is True
    assert dst_type(HAND_FIB, "10.0.1.7", "UNICAST") is True
    # A dumped local table is the truth: no broadcast route, no broadcast.
    no_brd = Fib(Topology(links=LINKS, addresses=ADDRESSES,
                          routes=MAIN + tuple(r for r in LOCAL_TABLE if r.dst != ip_network("10.0.1.255/32"))))
    assert dst_type(no_brd, "10.0.1.255", "BROADCAST") is False


# (address, types, the answer of match_type6)
V6_CASES: list[tuple[str, str, bool | None]] = [
    ("fd00:1::1", "LOCAL", True),
    ("2001:db8:1::2", "LOCAL", True),
    ("2001:db8:1::9", "LOCAL", False),
    ("2001:db8:1::9", "UNICAST", True),
    ("2001:db8:dead::1", "UNREACHABLE", True),  # blackhole: an error route
    ("2001:db8:beef::1", "UNREACHABLE", True),  # prohibit
    ("2001:db8:dead::1", "UNICAST,UNREACHABLE", True),  # categories are ANDed: unicast and unreachable
    ("2001:db8:1::9", "UNREACHABLE", False),
    ("2001:db8:1::", "ANYCAST", True),  # the subnet-router anycast address of an on-link prefix
    ("2001:db8:f00::", "ANYCAST", False),  # a prefix behind a gateway: not anycast
    ("2001:db8:1::9", "ANYCAST", False),
    ("ff02::1", "MULTICAST", True),
    ("ff02::1", "UNICAST", False),
    ("ff02::1", "MULTICAST,UNICAST", False),  # the kernel's AND: never both
    ("::", "UNSPEC", True),
    ("2001:db8:1::9", "UNSPEC", False),
    ("::ffff:10.0.1.1", "UNICAST", False),  # v4-mapped: not unicast for ipv6_addr_type()
    ("2001:db8:1::9", "BROADCAST", None),  # refused for IPv6 by the kernel: no such rule loads
    ("2001:db8:1::9", "BLACKHOLE", None),
]


@pytest.mark.parametrize(("addr", "types", "want"), V6_CASES, ids=[f"{a} {t}" for a, t, _ in V6_CASES])
def test_ipv6_match_type6(addr: str, types: str, want: bool | None) -> None:
    got = dst_type(FIB, addr, types)
    if want is None:
        assert isinstance(got, Unknown)
    else:
        assert got is want
        assert dst_type(FIB, addr, types, negate=True) is (not want)


def test_ipv6_no_route_is_unreachable() -> None:
    fib = Fib(Topology(links=LINKS, addresses=ADDRESSES, routes=tuple(r for r in MAIN if r.family == AF_INET)))
    assert dst_type(fib, "2001:db8:99::1", "UNREACHABLE") is True


def test_addrtype_anycast_dnat_is_predicted() -> None:
    """``-m addrtype --dst-type ANYCAST -j DNAT``: a flow to the anycast address is DNATed, others not."""
    dnat = Rule(1, (AddrTypeMatch("dst", frozenset({"ANYCAST"}), False, "-m addrtype --dst-type ANYCAST"),
                    NatStatement(NatKind.DNAT, "-j DNAT --to-destination 10.0.1.5", AF_INET,
                                 (IPv4Address("10.0.1.5"), IPv4Address("10.0.1.5")))))
    rs = NatRuleset((Chain("ip", "nat", "PREROUTING", (dnat,), Hook.PREROUTING, -100, "nat", "accept"),))
    to_anycast = Flow(AF_INET, IPPROTO_UDP, ip_address("198.18.0.1"), ip_address("100.65.0.1"), 40000, 53)
    assert predict(rs, FIB, to_anycast).dnat == {Binding(NatKind.DNAT, ip_address("10.0.1.5"))}
    to_unicast = Flow(AF_INET, IPPROTO_UDP, ip_address("198.18.0.1"), ip_address("100.66.0.7"), 40000, 53)
    assert predict(rs, FIB, to_unicast).dnat == {NO_NAT}


# --- --limit-iface-in/out: the local-table route's type counts only on that interface ----------------


def limited(addr: str, limit: str, *, iif: object = None, oif: object = None, side: str = "dst",
            types: str = "LOCAL") -> bool | Unknown:  # fmt: skip
    a = ip_address(addr)
    other = ip_address("10.0.1.2" if a.version == 4 else "fd00:1::2")
    src, dst = (a, other) if side == "src" else (other, a)
    m = AddrTypeMatch(side, frozenset(types.split(",")), False, f"--{side}-type {types} --limit-iface-{limit}",
                      limit_iface=limit)  # fmt: skip
    packet = Packet(AF_INET if a.version == 4 else AF_INET6, IPPROTO_UDP, src, dst, iif=iif, oif=oif)
    return xt_match(m, packet, FIB, None, hook=Hook.PREROUTING if limit == "in" else Hook.POSTROUTING)


def test_limit_iface_in_counts_the_type_on_the_input_interface_only() -> None:
    from topowatch.core.flow import Ingress

    assert limited("10.0.1.1", "in", iif=Ingress(LAN, "lan")) is True  # lan's own address, arriving on lan
    assert limited("203.0.113.2", "in", iif=Ingress(LAN, "lan")) is False  # up1's: unicast seen from lan
    assert limited("203.0.113.2", "in", iif=Ingress(LAN, "lan"), types="UNICAST") is True
    assert limited("203.0.113.2", "in", iif=Ingress(UP1, "up1")) is True


def test_limit_iface_out_counts_the_type_on_the_output_interface_only() -> None:
    from topowatch.core.flow import Egress, EgressKind

    up1 = Egress(EgressKind.UNICAST, UP1, "up1")
    assert limited("203.0.113.2", "out", oif=up1, side="src") is True
    assert limited("10.0.1.1", "out", oif=up1, side="src") is False


@pytest.mark.parametrize(
    ("addr", "limit", "iface", "why"),
    [
        ("10.0.1.1", "in", None, "input interface is not known"),
        ("10.0.1.1", "out", None, "output interface is not known"),
        ("10.0.1.1", "out", "local", "output interface is not known"),
        ("fd00:1::1", "in", "lan", "not modelled for IPv6"),
    ],
)
def test_limit_iface_unknown_where_the_interface_or_family_is(addr: str, limit: str, iface: str | None,
                                                              why: str) -> None:  # fmt: skip
    from topowatch.core.flow import Egress, EgressKind, Ingress

    iif = Ingress(LAN, "lan") if iface == "lan" else None
    oif = Egress(EgressKind.LOCAL, LO, "lo") if iface == "local" else None
    got = limited(addr, limit, iif=iif, oif=oif)
    assert isinstance(got, Unknown) and why in got.reason


# --- the subnet broadcast a hand-built topology implies, and the route types of IPv6 (mutation tests) ---


def test_only_an_ipv4_local_table_stands_for_the_kernels() -> None:
    """A dumped IPv4 local table is the truth (no broadcast route, no broadcast), an IPv6 one says
    nothing of IPv4: the subnet broadcast is implied where no IPv4 local route is given."""
    v4_local = tuple(r for r in LOCAL_TABLE if r.family == AF_INET and r.dst != ip_network("10.0.1.255/32"))
    no_brd = Fib(Topology(links=LINKS, addresses=ADDRESSES, routes=MAIN + v4_local))
    assert dst_type(no_brd, "10.0.1.255", "BROADCAST") is False
    assert dst_type(no_brd, "10.0.1.255", "UNICAST") is True
    v6_local = tuple(r for r in LOCAL_TABLE if r.family == AF_INET6)
    implied = Fib(Topology(links=LINKS, addresses=ADDRESSES, routes=MAIN + v6_local))
    assert dst_type(implied, "10.0.1.255", "BROADCAST") is True
    assert dst_type(implied, "10.0.1.255", "UNICAST") is False


def test_the_implied_broadcast_is_that_of_a_prefix_shorter_than_31() -> None:
    """``fib_add_ifaddr`` adds the subnet broadcast route for a prefix length below 31 only
    (a /31 has no broadcast address, RFC 3021)."""
    extra = (Address(UP1, ip_address("10.0.6.1"), 30), Address(UP1, ip_address("10.0.7.0"), 31))
    fib = Fib(Topology(links=LINKS, addresses=ADDRESSES + extra, routes=MAIN))
    assert dst_type(fib, "10.0.6.3", "BROADCAST") is True  # 10.0.6.0/30's last address
    assert dst_type(fib, "10.0.7.1", "BROADCAST") is False  # the /31's peer
    assert dst_type(fib, "10.0.7.1", "UNICAST") is True


def test_the_implied_broadcast_counts_on_its_own_device_with_limit_iface() -> None:
    from topowatch.core.flow import Ingress

    def limited_hand(iif: int, types: str) -> bool | Unknown:
        m = AddrTypeMatch("dst", frozenset({types}), False, f"--dst-type {types} --limit-iface-in",
                          limit_iface="in")  # fmt: skip
        packet = Packet(AF_INET, IPPROTO_UDP, ip_address("10.0.1.2"), ip_address("10.0.1.255"),
                        iif=Ingress(iif, "lan" if iif == LAN else "up1"))  # fmt: skip
        return xt_match(m, packet, HAND_FIB, None, hook=Hook.PREROUTING)

    assert limited_hand(LAN, "BROADCAST") is True  # lan holds 10.0.1.1/24
    assert limited_hand(UP1, "BROADCAST") is False  # seen from up1 the address is unicast
    assert limited_hand(UP1, "UNICAST") is True
    # A /32 has no broadcast address: one held by two devices is local (or, seen from the device
    # whose local route the lookup does not find first, unicast), never broadcast.
    twice = (Address(LAN, ip_address("10.0.8.8"), 32), Address(UP1, ip_address("10.0.8.8"), 32))
    fib = Fib(Topology(links=LINKS, addresses=ADDRESSES + twice, routes=MAIN))
    for iif in (LAN, UP1):
        m = AddrTypeMatch("dst", frozenset({"BROADCAST"}), False, "--dst-type BROADCAST --limit-iface-in",
                          limit_iface="in")  # fmt: skip
        packet = Packet(AF_INET, IPPROTO_UDP, ip_address("10.0.1.2"), ip_address("10.0.8.8"),
                        iif=Ingress(iif, "lan" if iif == LAN else "up1"))  # fmt: skip
        assert xt_match(m, packet, fib, None, hook=Hook.PREROUTING) is False, iif


def test_ipv6_anycast_needs_a_prefix_shorter_than_127() -> None:
    """``ipv6_anycast_destination``: ``plen < 127``, no gateway, the prefix's own address."""
    on_link = tuple(Route(ip_network(p), nexthops=(Nexthop(UP1),))
                    for p in ("2001:db8:6::/126", "2001:db8:7::/127", "2001:db8:8::5/128"))  # fmt: skip
    fib = Fib(Topology(links=LINKS, addresses=ADDRESSES, routes=MAIN + LOCAL_TABLE + on_link))
    assert dst_type(fib, "2001:db8:6::", "ANYCAST") is True
    assert dst_type(fib, "2001:db8:7::", "ANYCAST") is False
    assert dst_type(fib, "2001:db8:8::5", "ANYCAST") is False
    assert dst_type(fib, "2001:db8:8::5", "UNICAST") is True


def test_ipv6_multicast_and_refused_types_are_answered_whole() -> None:
    assert dst_type(FIB, "2001:db8:1::9", "MULTICAST") is False
    assert dst_type(FIB, "2001:db8:1::9", "MULTICAST", negate=True) is True
    assert dst_type(FIB, "2001:db8:1::9", "BROADCAST,BLACKHOLE") == Unknown(
        "-m addrtype --dst-type BROADCAST,BLACKHOLE: type BLACKHOLE,BROADCAST is not valid for IPv6")
