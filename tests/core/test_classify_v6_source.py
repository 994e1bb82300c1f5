# SPDX-License-Identifier: GPL-2.0-or-later
"""core.classify: IPv6 destinations that source selection tells apart are in different classes.

A masquerade picks the source address the kernel would (RFC 6724, rule 8: the longest common
prefix with the destination, counted up to the address's prefix length), so two destinations
whose common prefix lengths with the uplink's addresses differ may be masqueraded to different
sources. The classifier must keep them apart (``_topology_harvest`` cuts the address space at
every prefix of every interface address). The expectation is brute force: destinations with
every common prefix length with each address (the address with one bit flipped, at each bit),
grouped by class; every flow of a class must get the class's first flow's prediction from
``core.evaluate.predict``. Not a property test: the same destinations every run.
"""

from __future__ import annotations

from collections import defaultdict
from ipaddress import IPv6Address, ip_address, ip_network

from topowatch.core.classify import Classifier
from topowatch.core.evaluate import predict
from topowatch.core.fib import Fib
from topowatch.core.flow import IPPROTO_UDP, Flow
from topowatch.core.model import AF_INET6, Address, Link, Nexthop, Route, Topology
from topowatch.edges.nft import parse_ruleset_json

from test_classify import normal  # isort: skip

LAN, UP1 = 2, 3
LINKS = (Link(1, "lo"), Link(LAN, "lan"), Link(UP1, "up1"))
# Two /64s of one /62 (they differ in bit 62): a destination in either's /63 but not in its /64
# shares 63 bits with one and 62 with the other. And a /128.
UPLINK_ADDRESSES = ("2001:db8:1::2/64", "2001:db8:1:8000::2/49", "2001:db8:ff00::2/40", "2001:db9::5/16",
                    "2001:db8:5::2/64", "2001:db8:5:2::2/64", "2001:db8:7::7/128")
ADDRESSES = (
    Address(LAN, ip_address("fd00::1"), 64),
    *(Address(UP1, ip_address(text.split("/")[0]), int(text.split("/")[1])) for text in UPLINK_ADDRESSES),
)
ROUTES = (
    Route(ip_network("fd00::/64"), nexthops=(Nexthop(LAN),), metric=256),
    Route(ip_network("::/0"), nexthops=(Nexthop(UP1, ip_address("fe80::1")),), metric=1024),
)
RULESET = parse_ruleset_json({"nftables": [
    {"table": {"family": "ip6", "name": "nat", "handle": 1}},
    {"chain": {"family": "ip6", "table": "nat", "name": "post", "handle": 2, "type": "nat",
               "hook": "postrouting", "prio": 100, "policy": "accept"}},
    {"rule": {"family": "ip6", "table": "nat", "chain": "post", "handle": 3, "expr": [
        {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "up1"}}, {"masquerade": None}]}},
]})  # fmt: skip


def destinations() -> list[int]:
    """Per uplink address and bit k up to its prefix length: the address with bit k flipped (a
    common prefix of exactly k bits), the ends of its k-bit prefix and their outer neighbours,
    and the address itself."""
    out: set[int] = set()
    for a in ADDRESSES[1:]:
        value = int(a.address)
        out.add(value)
        for k in range(min(a.prefixlen + 2, 129)):
            if k < 128:
                out.add(value ^ (1 << (127 - k)))
            lo = value >> (128 - k) << (128 - k) if k else 0
            hi = lo | ((1 << (128 - k)) - 1)
            out |= {lo, hi, max(lo - 1, 0), min(hi + 1, (1 << 128) - 1)}
    return sorted(out)


def test_destinations_masqueraded_to_different_sources_are_in_different_classes() -> None:
    topology = Topology(LINKS, ADDRESSES, ROUTES)
    fib = Fib(topology)
    classifier = Classifier.build([topology], [RULESET], reuse=False)
    assert classifier.exact, classifier.reason
    src = ip_address("fd00::5")
    by_class: dict[tuple[int, ...], list[Flow]] = defaultdict(list)
    for value in destinations():
        flow = Flow(AF_INET6, IPPROTO_UDP, src, IPv6Address(value), 4000, 53, 0, 0)
        by_class[classifier.key(AF_INET6, IPPROTO_UDP, int(src), value, 4000, 53, 0, 0, 0)].append(flow)
    sources = set()
    for members in by_class.values():
        first = normal(predict(RULESET, fib, members[0]))
        sources.add(str(first["snat"]))
        for other in members[1:]:
            assert normal(predict(RULESET, fib, other)) == first, (members[0], other)
    assert len(sources) >= len(UPLINK_ADDRESSES)  # each address is chosen for some destination
