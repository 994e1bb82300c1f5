# SPDX-License-Identifier: GPL-2.0-or-later
"""core.classify: a classifier carried over route events, step by step, never merges two flows
that the per-flow evaluator tells apart.

Issue 16's mutation run found the update path (``Classifier.updated``: the route index it keeps
per table, the labels it reads again inside the changed prefixes) checked only by the property
test of ``test_classify_update.py``, whose twenty examples per mutant seldom met the cases below:
a prefix removed inside a wider one (the label must come from the wider prefix that starts
before the region), a prefix length that two prefixes share and one of them leaves, a host
route removed, a prefix removed and the region read again by a later event.

Each scenario is a kept topology (``core.livetopology``) fed route events one at a time. After
each event the last classifier is carried over (``updated``) to the newest snapshot alone and to
the pair (previous, newest), and checked two ways:

- independently: flows to and from every address where a route of either snapshot begins or
  ends (and its neighbours) are grouped by class, and every flow of a class must get the
  prediction of the class's first flow from ``core.evaluate.predict`` in each snapshot;
- against ``Classifier.build`` from nothing: the same boundaries, one class for one class.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any

import pytest

from topowatch.core.classify import Classifier
from topowatch.core.evaluate import predict
from topowatch.core.fib import Fib
from topowatch.core.flow import IPPROTO_UDP, Flow
from topowatch.core.livetopology import NLM_F_REPLACE, LiveTopology
from topowatch.core.model import (
    AF_INET,
    AF_INET6,
    Address,
    Link,
    Nexthop,
    PolicyRule,
    Route,
    RouteType,
    Topology,
)
from topowatch.edges.nft import parse_ruleset_json

from test_classify import normal  # isort: skip
from test_classify_update import same_classifier  # isort: skip

LO, LAN, UP1, UP2 = 1, 2, 3, 4
NLM_F_CREATE, NLM_F_EXCL = 0x400, 0x200
LINKS = (Link(LO, "lo"), Link(LAN, "lan"), Link(UP1, "up1"), Link(UP2, "up2"))
ADDRESSES = (
    Address(LAN, ip_address("10.0.0.1"), 8),
    Address(UP1, ip_address("198.51.100.2"), 24),
    Address(UP2, ip_address("203.0.113.2"), 24),
    Address(LAN, ip_address("fd00::1"), 64),
    Address(UP1, ip_address("2001:db8:ff::2"), 64),
    Address(UP2, ip_address("2001:db8:ee::2"), 64),
)
VIA1, VIA2 = Nexthop(UP1, ip_address("198.51.100.1")), Nexthop(UP2, ip_address("203.0.113.1"))
VIA1_6, VIA2_6 = Nexthop(UP1, ip_address("2001:db8:ff::1")), Nexthop(UP2, ip_address("2001:db8:ee::1"))
# Masquerade out of up2, both families: a flow's prediction tells its uplink (and gateway) apart.
RULESET = parse_ruleset_json({"nftables": [
    {"table": {"family": "inet", "name": "nat", "handle": 1}},
    {"chain": {"family": "inet", "table": "nat", "name": "post", "handle": 2, "type": "nat",
               "hook": "postrouting", "prio": 100, "policy": "accept"}},
    {"rule": {"family": "inet", "table": "nat", "chain": "post", "handle": 3, "expr": [
        {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "up2"}}, {"masquerade": None}]}},
]})  # fmt: skip
SOURCES = ["10.0.0.5", "10.0.1.5", "fd00::5"]  # 10.0.1.0/24 looks up table 100 first (RULES)
RULES = (
    PolicyRule(AF_INET, 0, table=255),
    PolicyRule(AF_INET, 100, table=100, src=ip_network("10.0.1.0/24")),
    PolicyRule(AF_INET, 32766, table=254),
    PolicyRule(AF_INET, 32767, table=253),
)


def R(text: str, *hops: Nexthop, table: int = 254, kind: RouteType = RouteType.UNICAST, metric: int = 0) -> Route:
    return Route(ip_network(text), table, kind, tuple(hops), metric=metric)


BASE = (
    R("10.0.0.0/8", Nexthop(LAN)),
    R("198.51.100.0/24", Nexthop(UP1)),
    R("203.0.113.0/24", Nexthop(UP2)),
    R("fd00::/64", Nexthop(LAN), metric=256),
    R("2001:db8:ff::/64", Nexthop(UP1), metric=256),
    R("2001:db8:ee::/64", Nexthop(UP2), metric=256),
)
GATEWAY = (
    R("0.0.0.0/0", VIA1),
    R("8.0.0.0/8", VIA2),
    R("8.8.0.0/16", VIA1),
    R("8.8.8.0/24", VIA2),
    R("8.8.9.0/24", VIA2),
    R("8.8.10.0/24", VIA1),
    R("8.8.8.8/32", VIA1),
    R("192.0.2.0/24", VIA2),
    R("192.0.2.128/25", VIA1, metric=100),
    R("192.0.2.128/25", VIA2, metric=0),
    R("0.0.0.0/0", VIA2, table=100),
    R("8.8.0.0/16", VIA2, table=100),
    R("8.8.8.0/24", VIA1, table=100),
    R("::/0", VIA1_6, metric=1024),
    R("2001:db8::/32", VIA2_6, metric=1024),
    R("2001:db8:1::/48", VIA1_6, metric=1024),
    R("2001:db8:1::5/128", VIA2_6, metric=1024),
)


@dataclass(frozen=True)
class Event:
    kind: str  # add, del, replace
    route: Route

    def apply(self, live: LiveTopology) -> None:
        if self.kind == "del":
            assert live.apply("route", False, self.route)
        else:
            flags = NLM_F_CREATE | (NLM_F_REPLACE if self.kind == "replace" else NLM_F_EXCL)
            assert live.apply("route", True, self.route, flags)


def add(*a: Any, **k: Any) -> Event:
    return Event("add", R(*a, **k))


def delete(*a: Any, **k: Any) -> Event:
    return Event("del", R(*a, **k))


def replace(*a: Any, **k: Any) -> Event:
    return Event("replace", R(*a, **k))


SCENARIOS = {
    # 8.8.8.0/24 leaves: its addresses now read 8.8.0.0/16 (via up1), which starts before them.
    "a prefix leaves from inside a wider one": [delete("8.8.8.0/24", VIA2)],
    # Three /24s in main: two leave; the third must still be found inside its /24 by a later event.
    "a prefix length two prefixes share loses one": [
        delete("8.8.8.0/24", VIA2), delete("8.8.10.0/24", VIA1), add("8.8.9.128/25", VIA1),
        delete("8.8.9.128/25", VIA1),
    ],
    # Two /20s in table 100 (no other prefix of that length): one leaves; the other must still
    # answer inside itself when a later event reads a region there.
    "the last but one prefix of a length leaves": [
        add("8.8.16.0/20", VIA1, table=100), add("8.8.32.0/20", VIA1, table=100),
        delete("8.8.16.0/20", VIA1, table=100), add("8.8.40.0/21", VIA2, table=100),
        delete("8.8.40.0/21", VIA2, table=100),
    ],
    # A host route at the last address of a prefix that leaves keeps its own label there.
    "a prefix leaves with a host route at its end": [
        add("8.8.8.255/32", VIA2), delete("8.8.8.0/24", VIA2), add("8.8.8.0/24", VIA1),
    ],
    "a host route leaves and comes back elsewhere": [
        delete("8.8.8.8/32", VIA1), add("8.8.8.9/32", VIA1), delete("8.8.8.0/24", VIA2),
        delete("8.8.8.9/32", VIA1),
    ],
    # A prefix removed from the index must not answer for its addresses when a later event
    # reads them again (the wider prefix does).
    "a removed prefix is read again by a later event": [
        delete("8.8.8.0/24", VIA2), delete("8.8.0.0/16", VIA1), add("8.8.8.0/23", VIA1),
        delete("8.8.8.0/23", VIA1), replace("8.0.0.0/8", VIA1),
    ],
    "a prefix moves between uplinks and tables": [
        replace("8.8.0.0/16", VIA2), replace("8.8.0.0/16", VIA2, table=100), add("8.8.8.128/25", VIA1, table=100),
        delete("8.8.8.0/24", VIA1, table=100), delete("8.8.0.0/16", VIA2, table=100),
    ],
    "one of two routes of a prefix leaves": [
        delete("192.0.2.128/25", VIA2), add("192.0.2.128/25", VIA2, metric=50), delete("192.0.2.128/25", VIA1,
                                                                                       metric=100),
    ],
    "the default route leaves and the top of the space changes": [
        add("255.255.255.0/24", kind=RouteType.BLACKHOLE), delete("0.0.0.0/0", VIA1),
        add("255.255.255.255/32", VIA1), add("0.0.0.0/1", VIA2), delete("255.255.255.0/24",
                                                                         kind=RouteType.BLACKHOLE),
    ],
    "IPv6 prefixes leave from inside wider ones": [
        delete("2001:db8:1::5/128", VIA2_6, metric=1024), delete("2001:db8:1::/48", VIA1_6, metric=1024),
        add("2001:db8:1:2::/64", VIA1_6, metric=1024), add("2001:db8:1:3::/64", VIA1_6, metric=1024),
        delete("2001:db8:1:2::/64", VIA1_6, metric=1024), add("2001:db8:1:3:8000::/65", VIA2_6, metric=1024),
        delete("2001:db8:1:3:8000::/65", VIA2_6, metric=1024), delete("::/0", VIA1_6, metric=1024),
    ],
}


def probes(topologies: Iterable[Topology]) -> dict[int, list[int]]:
    """Per family, every address where a route begins or ends, with its neighbours."""
    out: dict[int, set[int]] = {AF_INET: set(), AF_INET6: set()}
    for topology in topologies:
        for route in topology.routes:
            net: IPv4Network | IPv6Network = route.dst
            top = (1 << net.max_prefixlen) - 1
            for value in (int(net.network_address), int(net.broadcast_address)):
                out[route.family] |= {max(value - 1, 0), value, min(value + 1, top)}
            out[route.family].add(int(net.network_address) + (int(net.num_addresses) // 2))
    return {family: sorted(values) for family, values in out.items()}


# The snapshots of one scenario recur (a step's newest is the next step's previous): each is
# given one Fib, and each flow predicted once in it. Cleared per scenario.
_FIBS: dict[int, tuple[Topology, Fib]] = {}
_PREDICTED: dict[tuple[int, Flow], Any] = {}


def _fib(topology: Topology) -> Fib:
    hit = _FIBS.get(id(topology))
    if hit is None or hit[0] is not topology:
        hit = _FIBS[id(topology)] = (topology, Fib(topology))
    return hit[1]


def _predicted(fib: Fib, flow: Flow) -> Any:
    key = (id(fib), flow)
    if key not in _PREDICTED:
        _PREDICTED[key] = normal(predict(RULESET, fib, flow))
    return _PREDICTED[key]


def check_against_the_evaluator(classifier: Classifier, snapshots: list[Topology]) -> int:
    """Flows of one class get one prediction in every snapshot; the number of classes met."""
    fibs = [_fib(t) for t in snapshots]
    by_class: dict[tuple[int, ...], list[Flow]] = defaultdict(list)
    for family, values in probes(snapshots).items():
        version = 4 if family == AF_INET else 6
        for src in (ip_address(s) for s in SOURCES if ip_address(s).version == version):
            for value in values:
                dst = IPv4Address(value) if version == 4 else IPv6Address(value)
                flow = Flow(family, IPPROTO_UDP, src, dst, 4000, 53, 0, 0)
                key = classifier.key(family, IPPROTO_UDP, int(src), value, 4000, 53, 0, 0, 0)
                by_class[key].append(flow)
    for members in by_class.values():
        for fib in fibs:
            first = _predicted(fib, members[0])
            for other in members[1:]:
                assert _predicted(fib, other) == first, (members[0], other)
    return len(by_class)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_a_carried_classifier_keeps_apart_the_flows_the_evaluator_tells_apart(name: str) -> None:
    _FIBS.clear()
    _PREDICTED.clear()
    seed = Topology(LINKS, ADDRESSES, (*BASE, *GATEWAY), RULES)
    live = LiveTopology.seed(seed)
    assert live is not None
    before = live.snapshot()
    alone = Classifier.build([before], [RULESET], reuse=False)
    joint = alone
    for event in SCENARIOS[name]:
        event.apply(live)
        now = live.snapshot()
        for shape, last in (([now], alone), ([before, now], joint)):
            carried = last.updated(shape, [RULESET])
            assert carried is not None, (name, event)
            assert carried._lineage is not None and last._lineage is not None
            assert carried._lineage.index is last._lineage.index  # carried over, not built again
            assert check_against_the_evaluator(carried, shape) > 10
            same_classifier(carried, Classifier.build(shape, [RULESET], reuse=False), [])
            if len(shape) == 1:
                alone = carried
            else:
                joint = carried
        # The pair (previous, newest) of the next step carries on from this step's newest alone.
        joint = alone
        before = now
