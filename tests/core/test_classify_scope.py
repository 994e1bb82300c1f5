# SPDX-License-Identifier: GPL-2.0-or-later
"""core.classify: the classes a reaction judges hold every flow inside the changed prefixes.

``Classifier.classes_within`` turns a reaction's prefixes (``core.impact``) into the address
classes it judges; a class it leaves out is a flow whose prediction may have changed and that
is never judged (issue 16's mutation run: a host prefix, the top of the address space, an IPv6
prefix). The expectations are brute force over the addresses themselves: the class of every
address of a prefix (every address of a small prefix; of a large one its two ends and every
address where the map's class changes, between which the class cannot change), looked up one
address at a time.
"""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network

import pytest

from topowatch.core.classify import Classifier
from topowatch.core.impact import Impact
from topowatch.core.model import AF_INET, AF_INET6, Address, Link, Nexthop, Route, RouteType, Topology

LAN, UP1, UP2 = 2, 3, 4
LINKS = (Link(1, "lo"), Link(LAN, "lan"), Link(UP1, "up1"), Link(UP2, "up2"))
ADDRESSES = (
    Address(LAN, ip_address("10.0.0.1"), 8),
    Address(UP1, ip_address("203.0.113.5"), 24),
    Address(UP2, ip_address("198.51.100.7"), 24),
    Address(UP1, ip_address("2001:db8:ff::2"), 64),
)
VIA1 = Nexthop(UP1, ip_address("203.0.113.1"))
VIA2 = Nexthop(UP2, ip_address("198.51.100.1"))
ROUTES = (
    Route(ip_network("0.0.0.0/0"), nexthops=(VIA1,)),
    Route(ip_network("10.0.0.0/8"), nexthops=(Nexthop(LAN),)),
    Route(ip_network("192.0.2.0/24"), nexthops=(VIA2,)),
    Route(ip_network("192.0.2.66/32"), nexthops=(VIA1,)),  # a host route: a class one address wide
    Route(ip_network("192.0.2.128/26"), type=RouteType.BLACKHOLE),
    Route(ip_network("255.255.255.254/32"), nexthops=(VIA2,)),  # near the top of the space
    Route(ip_network("::/0"), nexthops=(Nexthop(UP1, ip_address("2001:db8:ff::1")),)),
    Route(ip_network("2001:db8:1::/48"), nexthops=(Nexthop(UP2),)),
    Route(ip_network("2001:db8:1::5/128"), type=RouteType.UNREACHABLE),
    Route(ip_network("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe/127"), nexthops=(Nexthop(UP2),)),
)
TOPOLOGY = Topology(LINKS, ADDRESSES, ROUTES)
PREFIXES = [
    "192.0.2.66/32", "192.0.2.67/32", "192.0.2.65/32", "192.0.2.0/24", "192.0.2.128/26", "192.0.2.64/30",
    "255.255.255.255/32", "255.255.255.254/31", "255.255.255.254/32", "0.0.0.0/32", "0.0.0.0/0", "10.0.0.0/8",
    "2001:db8:1::5/128", "2001:db8:1::4/128", "2001:db8:1::/48", "::/0", "::/128",
    "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe/127",
]  # fmt: skip


def addresses_of(classifier: Classifier, net: IPv4Network | IPv6Network) -> list[int]:
    """Every address of a small prefix; of a large one its ends and where the map changes class."""
    lo, hi = int(net.network_address), int(net.broadcast_address)
    if hi - lo < 4096:
        return list(range(lo, hi + 1))
    fmap = classifier.dst[AF_INET if net.version == 4 else AF_INET6]
    return [lo, hi, *(s for s in fmap.starts if lo <= s <= hi)]


def expected(classifier: Classifier, nets: list[IPv4Network | IPv6Network]) -> set[tuple[int, int]]:
    out = set()
    for net in nets:
        family = AF_INET if net.version == 4 else AF_INET6
        for value in addresses_of(classifier, net):
            out.add((family, classifier.dst[family].lookup(value)))
    return out


@pytest.mark.parametrize("text", PREFIXES)
def test_the_classes_within_a_prefix_hold_the_class_of_each_of_its_addresses(text: str) -> None:
    classifier = Classifier.build([TOPOLOGY], [], reuse=False)
    net = ip_network(text)
    got = classifier.classes_within([net])
    want = expected(classifier, [net])
    assert want <= got, (text, want - got)
    # And nothing of the other family: an IPv6 prefix names no IPv4 class (and the other way round).
    family = AF_INET if net.version == 4 else AF_INET6
    assert {f for f, _ in got} == {family}


def test_the_classes_within_several_prefixes_are_those_of_each() -> None:
    classifier = Classifier.build([TOPOLOGY], [], reuse=False)
    nets = [ip_network(t) for t in PREFIXES]
    got = classifier.classes_within(nets)
    assert expected(classifier, nets) <= got
    assert got == frozenset().union(*(classifier.classes_within([n]) for n in nets))


def test_a_host_prefix_that_is_a_class_of_its_own_is_judged() -> None:
    """The host route 192.0.2.66/32 is a class one address wide, unlike its neighbours."""
    classifier = Classifier.build([TOPOLOGY], [], reuse=False)
    v4 = classifier.dst[AF_INET]
    host = v4.lookup(int(ip_address("192.0.2.66")))
    assert host not in {v4.lookup(int(ip_address("192.0.2.65"))), v4.lookup(int(ip_address("192.0.2.67")))}
    assert (AF_INET, host) in classifier.classes_within([ip_network("192.0.2.66/32")])
    v6 = classifier.dst[AF_INET6]
    host6 = v6.lookup(int(ip_address("2001:db8:1::5")))
    assert host6 != v6.lookup(int(ip_address("2001:db8:1::4")))
    assert (AF_INET6, host6) in classifier.classes_within([ip_network("2001:db8:1::5/128")])


def test_the_scope_of_a_reaction_judges_its_prefixes_or_every_class() -> None:
    classifier = Classifier.build([TOPOLOGY], [], reuse=False)
    nets = (ip_network("192.0.2.66/32"), ip_network("2001:db8:1::/48"))
    assert classifier.classes_to_judge(None) is None  # a full judgement
    assert classifier.classes_to_judge(Impact(everything=True, why="a link went down")) is None
    assert classifier.classes_to_judge(Impact(everything=True, prefixes=nets, why="both")) is None
    assert classifier.classes_to_judge(Impact()) == frozenset()  # "no flow"
    assert classifier.classes_to_judge(Impact(prefixes=nets)) == classifier.classes_within(nets)
    assert expected(classifier, list(nets)) <= (classifier.classes_to_judge(Impact(prefixes=nets)) or set())
