# SPDX-License-Identifier: GPL-2.0-or-later
"""core.classify: the questions read out of a ruleset (``_walk``), and where they cannot be.

Issue 16's mutation run left 96 mutants of ``_walk`` alive: no test put into a ruleset an address
set whose ends were not already boundaries, a lookup keyed by a dict, a selector read under a
mask, a NAT map that maps addresses bit by bit, or a value nested deeper than the walk reads.

Expectations are hand-worked or the evaluator's: the kernel's ``ip saddr 192.0.2.10-192.0.2.20``
changes its answer at 192.0.2.10 and 192.0.2.21, so flows from either side of each end must be in
different classes, and every flow of a class gets one prediction from ``core.evaluate.predict``.
Where a question cannot be cut into intervals the classes say they are not exact, with the reason
an administrator reads (the rule's text and what is wrong with it).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from typing import Any

import pytest

from topowatch.core.classify import Classifier
from topowatch.core.evaluate import predict
from topowatch.core.fib import Fib
from topowatch.core.flow import IPPROTO_TCP, Flow
from topowatch.core.model import AF_INET, AF_INET6, Address, Link, Nexthop, Route, Topology
from topowatch.core.nat import (
    IntervalSet,
    Key,
    NatKind,
    NatMapStatement,
    NatRuleset,
    NetmapStatement,
    Selector,
)
from topowatch.edges.nft import parse_ruleset_json

from test_classify import normal  # isort: skip

LINKS = (Link(1, "lo"), Link(2, "lan"), Link(3, "up1"))
ADDRESSES = (
    Address(2, ip_address("10.0.0.1"), 8),
    Address(3, ip_address("198.51.100.2"), 24),
    Address(2, ip_address("fd00::1"), 64),
    Address(3, ip_address("2001:db8:ff::2"), 64),
)
ROUTES = (
    Route(ip_network("0.0.0.0/0"), nexthops=(Nexthop(3, ip_address("198.51.100.1")),)),
    Route(ip_network("::/0"), nexthops=(Nexthop(3, ip_address("2001:db8:ff::1")),), metric=1024),
)
TOPOLOGY = Topology(LINKS, ADDRESSES, ROUTES)


def _rule(handle: int, *expr: object) -> dict[str, Any]:
    return {"rule": {"family": "inet", "table": "nat", "chain": "post", "handle": handle, "expr": list(expr)}}


def _match(protocol: str, field: str, right: object) -> dict[str, Any]:
    return {
        "match": {"op": "==", "left": {"payload": {"protocol": protocol, "field": field}}, "right": right}
    }


# Source NAT for one range of IPv4 sources, one IPv6 destination prefix, one TCP port range.
def _ruleset() -> NatRuleset:
    """A fresh object per test: harvests are remembered by identity (``classify._memo``), and a
    ruleset harvested before (by another test in the process) would not be walked again."""
    return parse_ruleset_json({"nftables": [
        {"table": {"family": "inet", "name": "nat", "handle": 1}},
        {"chain": {"family": "inet", "table": "nat", "name": "post", "handle": 2, "type": "nat",
                   "hook": "postrouting", "prio": 100, "policy": "accept"}},
        _rule(3, _match("ip", "saddr", {"range": ["192.0.2.10", "192.0.2.20"]}), {"snat": {"addr": "198.51.100.9"}}),
        _rule(4, _match("ip6", "daddr", {"prefix": {"addr": "2001:db8:5::", "len": 48}}), {"masquerade": None}),
        _rule(5, _match("tcp", "dport", {"range": [1000, 1010]}), {"masquerade": None}),
    ]})  # fmt: skip


def _flows_by_class(classifier: Classifier, flows: list[Flow]) -> dict[tuple[int, ...], list[Flow]]:
    by_class: dict[tuple[int, ...], list[Flow]] = defaultdict(list)
    for f in flows:
        key = classifier.key(f.family, f.proto, int(f.src), int(f.dst), f.sport, f.dport, 0, 0, 0)
        by_class[key].append(f)
    return by_class


def _one_prediction_per_class(classifier: Classifier, ruleset: NatRuleset, flows: list[Flow]) -> None:
    fib = Fib(TOPOLOGY)
    for members in _flows_by_class(classifier, flows).values():
        first = normal(predict(ruleset, fib, members[0]))
        for other in members[1:]:
            assert normal(predict(ruleset, fib, other)) == first, (members[0], other)


def test_an_address_range_of_the_ruleset_cuts_the_sources_where_the_match_changes() -> None:
    ruleset = _ruleset()
    c = Classifier.build([TOPOLOGY], [ruleset], reuse=False)
    assert c.exact, c.reason
    v4 = c.src[AF_INET]
    for edge in ("192.0.2.10", "192.0.2.21"):  # the first address in the range, the first after it
        assert v4.lookup(int(IPv4Address(edge)) - 1) != v4.lookup(int(IPv4Address(edge))), edge
    dst = ip_address("203.0.113.7")
    flows = [Flow(AF_INET, IPPROTO_TCP, IPv4Address(int(IPv4Address("192.0.2.0")) + i), dst, 4000, 80)
             for i in range(32)]  # fmt: skip
    _one_prediction_per_class(c, ruleset, flows)
    assert len({repr(normal(predict(ruleset, Fib(TOPOLOGY), f))) for f in flows}) == 2  # snat and not


def test_an_ipv6_prefix_of_a_fresh_ruleset_cuts_the_destinations_where_the_match_changes() -> None:
    ruleset = _ruleset()
    c = Classifier.build([TOPOLOGY], [ruleset], reuse=False)
    v6 = c.dst[AF_INET6]
    for edge in ("2001:db8:5::", "2001:db8:6::"):
        assert v6.lookup(int(IPv6Address(edge)) - 1) != v6.lookup(int(IPv6Address(edge))), edge
    src = ip_address("fd00::5")
    dsts = ["2001:db8:4:ffff:ffff:ffff:ffff:ffff", "2001:db8:5::", "2001:db8:5:ffff:ffff:ffff:ffff:ffff",
            "2001:db8:6::"]  # fmt: skip
    _one_prediction_per_class(
        c, ruleset, [Flow(AF_INET6, IPPROTO_TCP, src, IPv6Address(d), 4000, 80) for d in dsts]
    )


def test_a_port_range_of_the_ruleset_cuts_the_ports_where_the_match_changes() -> None:
    ruleset = _ruleset()
    c = Classifier.build([TOPOLOGY], [ruleset], reuse=False)
    for edge in (1000, 1011):
        assert c.ports.lookup(edge - 1) != c.ports.lookup(edge), edge
    assert c.ports.lookup(1000) == c.ports.lookup(1010)
    src, dst = ip_address("10.0.0.5"), ip_address("203.0.113.7")
    _one_prediction_per_class(
        c, ruleset, [Flow(AF_INET, IPPROTO_TCP, src, dst, 4000, p) for p in range(990, 1020)]
    )


def _cut_at(c: Classifier, family: int, value: int) -> bool:
    fmap = c.dst[family]
    return fmap.lookup(value - 1) != fmap.lookup(value) != fmap.lookup(value + 1)


def test_a_nat_address_of_the_ruleset_is_a_class_of_its_own() -> None:
    """Every address the ruleset names is a membership question (the module's theory)."""
    ruleset = _ruleset()
    c = Classifier.build([TOPOLOGY], [ruleset], reuse=False)
    assert _cut_at(c, AF_INET, int(IPv4Address("198.51.100.9")))


def test_the_keys_and_values_of_a_dict_are_read() -> None:
    c = Classifier.build(
        [TOPOLOGY], [{IPv4Address("192.0.2.77"): IPv6Address("2001:db8:77::7")}], reuse=False
    )
    assert c.exact, c.reason
    assert _cut_at(c, AF_INET, int(IPv4Address("192.0.2.77")))
    assert _cut_at(c, AF_INET6, int(IPv6Address("2001:db8:77::7")))


@dataclasses.dataclass(frozen=True)
class Box:
    inner: object


LEAF = IPv4Address("192.0.2.77")
# One step of nesting: the value ``inner`` is read one level deeper than the value made.
WRAPS: dict[str, Callable[[object], object]] = {
    "tuple": lambda inner: (inner,),
    "list": lambda inner: [inner],
    "frozenset": lambda inner: frozenset((inner,)),
    "dataclass": Box,
    "dict key": lambda inner: {inner: "x"},
    "dict value": lambda inner: {"x": inner},
}


def _nested(kind: str, depth: int) -> object:
    """``LEAF`` read at ``depth``, inside tuples and one step of ``kind``: next to the leaf, or for
    a dict the outermost step (its other side, "x", is then read at depth 1, never too deep)."""
    if kind.startswith("dict"):
        inner: object = LEAF
        for _ in range(depth - 1):
            inner = (inner,)
        return WRAPS[kind](inner)
    value: object = WRAPS[kind](LEAF)
    for _ in range(depth - 1):
        value = (value,)
    return value


@pytest.mark.parametrize("kind", sorted(WRAPS))
def test_a_value_200_levels_deep_is_read_and_one_deeper_is_not(kind: str) -> None:
    read = Classifier.build([TOPOLOGY], [_nested(kind, 200)], reuse=False)
    assert read.exact, read.reason
    assert _cut_at(read, AF_INET, int(LEAF))
    too_deep = Classifier.build([TOPOLOGY], [_nested(kind, 201)], reuse=False)
    assert not too_deep.exact
    assert too_deep.reason == "a value nested too deeply to read"


def test_a_value_of_unknown_type_makes_the_classes_inexact() -> None:
    c = Classifier.build([TOPOLOGY], [(object(),)], reuse=False)
    assert not c.exact
    assert c.reason == "a object value cannot be read for classes"
    c = Classifier.build([TOPOLOGY], [(Box,)], reuse=False)  # a dataclass's class, not an instance
    assert c.reason == "a type value cannot be read for classes"


PREFIX = ip_network("192.0.2.0/24")


def test_a_netmap_makes_the_classes_inexact() -> None:
    c = Classifier.build([TOPOLOGY], [(NetmapStatement(PREFIX, "NETMAP --to 192.0.2.0/24"),)], reuse=False)
    assert not c.exact
    assert c.reason == "NETMAP --to 192.0.2.0/24 maps addresses bit by bit"


def _natmap(netmap: bool) -> NatMapStatement:
    return NatMapStatement(
        NatKind.SNAT, "snat ip prefix to ip saddr map { ... }", AF_INET, (), (), netmap=netmap
    )


def test_a_nat_map_that_keeps_host_bits_makes_the_classes_inexact_and_one_that_does_not_stays_exact() -> None:
    c = Classifier.build([TOPOLOGY], [(_natmap(True),)], reuse=False)
    assert not c.exact
    assert c.reason == "snat ip prefix to ip saddr map { ... } maps addresses bit by bit"
    c = Classifier.build([TOPOLOGY], [(_natmap(False),)], reuse=False)
    assert c.exact, c.reason


@pytest.mark.parametrize("key", [Key.SADDR, Key.DADDR, Key.SPORT, Key.DPORT])
def test_an_address_or_port_under_a_mask_makes_the_classes_inexact(key: Key) -> None:
    text = f"ip {key.value} & 0x0f0f0f0f"
    c = Classifier.build([TOPOLOGY], [(Selector(key, text, family=AF_INET, mask=0x0F0F0F0F),)], reuse=False)
    assert not c.exact
    assert c.reason == f"{text} is read under a mask"


def test_a_mark_under_a_mask_and_an_address_without_one_stay_exact() -> None:
    selectors = (
        Selector(Key.MARK, "meta mark & 0xff", mask=0xFF),
        Selector(Key.SADDR, "ip saddr", family=AF_INET),
    )
    c = Classifier.build([TOPOLOGY], [selectors], reuse=False)
    assert c.exact, c.reason


# Values of these names from elsewhere (the walk knows them by name) may lack the fields the
# parser's always have: their text falls back to the name or the key.
FakeSelector = dataclasses.make_dataclass("Selector", [("key", Key), ("mask", int)])
BareSelector = dataclasses.make_dataclass("Selector", [])
FakeNetmap = dataclasses.make_dataclass("NetmapStatement", [("prefix", object)])
FakePorts = dataclasses.make_dataclass("IntervalSet", [("intervals", tuple)])
BareIntervals = dataclasses.make_dataclass("IntervalSet", [])
BareNatMap = dataclasses.make_dataclass("NatMapStatement", [])


def test_values_named_like_the_parsers_without_their_fields() -> None:
    c = Classifier.build([TOPOLOGY], [(FakeSelector(Key.SADDR, 0xFF),)], reuse=False)
    assert c.reason == "saddr is read under a mask"
    c = Classifier.build([TOPOLOGY], [(FakeNetmap(PREFIX),)], reuse=False)
    assert c.reason == "NetmapStatement maps addresses bit by bit"
    c = Classifier.build(
        [TOPOLOGY], [(BareSelector(), BareIntervals(), BareNatMap(), FakePorts(((1000, 1010),)))], reuse=False
    )
    assert c.exact, c.reason
    assert c.ports.lookup(999) != c.ports.lookup(1000) == c.ports.lookup(1010) != c.ports.lookup(1011)


def test_an_interval_set_of_ports_cuts_the_ports_not_the_addresses() -> None:
    c = Classifier.build([TOPOLOGY], [(IntervalSet(((1000, 1010),)),)], reuse=False)
    assert c.ports.lookup(999) != c.ports.lookup(1000) == c.ports.lookup(1010) != c.ports.lookup(1011)
