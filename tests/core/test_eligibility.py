"""Eligibility.admits and any_of: a table with expectations worked out by hand.

Each row is one entry against one eligibility; the expected answer comes from
the selector's meaning (a mark matches when ``mark & mask == value``, a prefix
matches only addresses of its own family, ...), never from ``admits`` itself.
"""

from __future__ import annotations

from ipaddress import ip_address, ip_network

import pytest

from topowatch.core.conntrack import IPS_CONFIRMED, IPS_SEEN_REPLY, CtTuple, Entry
from topowatch.core.eligibility import (
    CONNECTIONLESS_PROTOS,
    DEFAULT_ELIGIBILITY,
    Eligibility,
    any_of,
)
from topowatch.core.model import AF_INET, AF_INET6


def e(*, family: int = AF_INET, proto: int = 17, replied: bool = False, zone: int = 0, mark: int = 0,
      src: str | None = None, dst: str | None = None) -> Entry:  # fmt: skip
    s = ip_address(src or ("10.0.1.2" if family == AF_INET else "fd00:1::2"))
    d = ip_address(dst or ("192.0.2.10" if family == AF_INET else "2001:db8::10"))
    status = IPS_CONFIRMED | (IPS_SEEN_REPLY if replied else 0)
    return Entry(family, proto, CtTuple(s, d, 1000, 53), CtTuple(d, s, 53, 1000), status=status, zone=zone, mark=mark)


MARK_10_F0 = Eligibility(marks=((0x10, 0xF0),))
MARK_TWO = Eligibility(marks=((0x1, 0x1), (0x200, 0xF00)))
V4_NET = Eligibility(sources=(ip_network("10.0.1.0/24"),))
V6_NET = Eligibility(destinations=(ip_network("2001:db8::/32"),))

CASES: list[tuple[str, Eligibility, Entry, bool]] = [
    # the default: UNREPLIED entries of connectionless protocols, any zone, mark, address
    ("default udp", DEFAULT_ELIGIBILITY, e(), True),
    ("default icmp", DEFAULT_ELIGIBILITY, e(proto=1), True),
    ("default gre", DEFAULT_ELIGIBILITY, e(proto=47), True),
    ("default unknown protocol 253", DEFAULT_ELIGIBILITY, e(proto=253), True),
    ("default tcp", DEFAULT_ELIGIBILITY, e(proto=6), False),
    ("default sctp", DEFAULT_ELIGIBILITY, e(proto=132), False),
    ("default dccp", DEFAULT_ELIGIBILITY, e(proto=33), False),
    ("default replied", DEFAULT_ELIGIBILITY, e(replied=True), False),
    ("default v6", DEFAULT_ELIGIBILITY, e(family=AF_INET6), True),
    ("default zone 7 mark 0xff", DEFAULT_ELIGIBILITY, e(zone=7, mark=0xFF), True),
    # families
    ("v4 only, v6 entry", Eligibility(families=frozenset({AF_INET})), e(family=AF_INET6), False),
    ("v4 only, v4 entry", Eligibility(families=frozenset({AF_INET})), e(), True),
    # protocols listed: exactly those, stateful ones too
    ("tcp listed, tcp", Eligibility(protocols=frozenset({6})), e(proto=6), True),
    ("tcp listed, udp", Eligibility(protocols=frozenset({6})), e(proto=17), False),
    # replied entries when asked for
    ("replied too", Eligibility(unreplied_only=False), e(replied=True), True),
    # zones
    ("zone 7 of {7}", Eligibility(zones=frozenset({7})), e(zone=7), True),
    ("zone 0 of {7}", Eligibility(zones=frozenset({7})), e(zone=0), False),
    ("zone 0 of {0}", Eligibility(zones=frozenset({0})), e(zone=0), True),
    # marks: mark & mask == value
    ("mark 0x10 under 0x10/0xf0", MARK_10_F0, e(mark=0x10), True),
    ("mark 0x13 under 0x10/0xf0 (low bits masked off)", MARK_10_F0, e(mark=0x13), True),
    ("mark 0x1f under 0x10/0xf0", MARK_10_F0, e(mark=0x1F), True),
    ("mark 0x110 under 0x10/0xf0 (high bits masked off)", MARK_10_F0, e(mark=0x110), True),
    ("mark 0x20 under 0x10/0xf0", MARK_10_F0, e(mark=0x20), False),
    ("mark 0x30 under 0x10/0xf0", MARK_10_F0, e(mark=0x30), False),
    ("mark 0 under 0x10/0xf0", MARK_10_F0, e(mark=0), False),
    ("mark 0xf under 0x10/0xf0", MARK_10_F0, e(mark=0xF), False),
    ("mark 0x5 under 0x1/0x1 or 0x200/0xf00", MARK_TWO, e(mark=0x5), True),
    ("mark 0x2a4 under 0x1/0x1 or 0x200/0xf00", MARK_TWO, e(mark=0x2A4), True),
    ("mark 0x304 under 0x1/0x1 or 0x200/0xf00", MARK_TWO, e(mark=0x304), False),
    ("mark 0xffffffff under 0/0", Eligibility(marks=((0, 0),)), e(mark=0xFFFFFFFF), True),
    ("no marks at all admits nothing", Eligibility(marks=()), e(mark=0), False),
    # prefixes: orig addresses, own family only
    ("source in 10.0.1.0/24", V4_NET, e(src="10.0.1.200"), True),
    ("source outside 10.0.1.0/24", V4_NET, e(src="10.0.2.1"), False),
    ("v6 source against a v4 prefix", V4_NET, e(family=AF_INET6), False),
    ("destination in 2001:db8::/32", V6_NET, e(family=AF_INET6, dst="2001:db8:5::1"), True),
    ("destination outside 2001:db8::/32", V6_NET, e(family=AF_INET6, dst="2001:db9::1"), False),
    ("v4 destination against a v6 prefix", V6_NET, e(), False),
    ("destination prefix reads the destination, not the source",
     Eligibility(destinations=(ip_network("10.0.1.0/24"),)), e(src="10.0.1.2", dst="192.0.2.10"), False),
    ("source prefix reads the source, not the destination",
     Eligibility(sources=(ip_network("192.0.2.0/24"),)), e(src="10.0.1.2", dst="192.0.2.10"), False),
    # alternatives: at least one
    ("alternatives: the second admits", Eligibility(alternatives=(Eligibility(zones=frozenset({1})),
                                                                 Eligibility(zones=frozenset({2})))), e(zone=2), True),
    ("alternatives: none admits", Eligibility(alternatives=(Eligibility(zones=frozenset({1})),)), e(zone=2), False),
]


@pytest.mark.parametrize(("eligibility", "entry", "admitted"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_admits(eligibility: Eligibility, entry: Entry, admitted: bool) -> None:
    assert eligibility.admits(entry) is admitted


def test_any_of_is_the_loosest_bound_and_decides_by_its_alternatives() -> None:
    a = Eligibility(protocols=frozenset({6}), zones=frozenset({1}), marks=((0x10, 0xF0),),
                    sources=(ip_network("10.0.1.0/24"),), families=frozenset({AF_INET}))
    b = Eligibility(protocols=frozenset({17}), zones=frozenset({2}), marks=((0x1, 0x1),), unreplied_only=False,
                    destinations=(ip_network("192.0.2.0/24"),), families=frozenset({AF_INET6}))
    both = any_of([a, b, a])
    assert both.alternatives == (a, b)
    assert both.families == frozenset({AF_INET, AF_INET6})
    assert both.protocols == frozenset({6, 17})
    assert both.zones == frozenset({1, 2})
    assert both.marks == ((0x10, 0xF0), (0x1, 0x1))
    assert both.sources is None and both.destinations is None  # b has no source selector: any source
    assert both.unreplied_only is False
    assert both.admits(e(proto=6, zone=1, mark=0x13, src="10.0.1.9"))
    assert not both.admits(e(proto=17, zone=1, mark=0x13, src="10.0.1.9"))  # a wants tcp; b wants v6
    assert any_of([a]) is a
    nothing = any_of([])
    assert not nothing.admits(e())
    loose = any_of([Eligibility(), Eligibility(protocols=frozenset({6}))])
    assert loose.protocols == CONNECTIONLESS_PROTOS | {6}  # tcp next to "any connectionless": listed
    assert loose.zones is None and loose.marks is None


def test_any_of_of_the_default_and_nothing_more_keeps_protocols_open() -> None:
    both = any_of([Eligibility(zones=frozenset({1})), Eligibility(zones=frozenset({2}))])
    assert both.protocols is None  # the union is CONNECTIONLESS_PROTOS: "any connectionless"
    assert len(CONNECTIONLESS_PROTOS) == 253


def test_any_of_bounds_prefixes_and_families_when_every_alternative_names_them() -> None:
    """The bound an edge may filter on: the union of what the alternatives name (hand-listed)."""
    net1, net2 = ip_network("10.0.1.0/24"), ip_network("10.0.2.0/24")
    dst1, dst2 = ip_network("192.0.2.0/24"), ip_network("198.51.100.0/24")
    a = Eligibility(families=frozenset({AF_INET}), sources=(net1,), destinations=(dst1,))
    b = Eligibility(families=frozenset({AF_INET}), sources=(net2, net1), destinations=(dst2,))
    both = any_of([a, b])
    assert both.families == frozenset({AF_INET})
    assert both.sources == (net1, net2)
    assert both.destinations == (dst1, dst2)
    assert both.admits(e(src="10.0.2.5", dst="198.51.100.1"))
    assert not both.admits(e(src="10.0.2.5", dst="192.0.2.1"))  # b's source, a's destination
    assert not both.admits(e(family=AF_INET6))
