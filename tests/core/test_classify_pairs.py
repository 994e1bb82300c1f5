# SPDX-License-Identifier: GPL-2.0-or-later
"""core.classify: classes over two snapshots, carried from a pair to the next pair, updates at the
edges of a region, and what a route's label keeps apart.

Issue 16's mutation run left alive mutants of the signature of a class over two snapshots (a
table only the older snapshot has; two prefixes the older snapshot routes differently), of the
spans where a pair's snapshots differ (which the next update must read again), of the splice of
a region into the old arrays (a region from address 0, one ending just before a host route, one
at the top of the IPv6 space, two touching regions) and of route labels (a TOS route, a local
route, several routes of one prefix, one of them on a link that is down).

Each check is independent of the classifier: flows to every address where a route begins or ends
(and its neighbours) are grouped by class, and every flow of a class must get one prediction from
``core.evaluate.predict`` in each snapshot (``test_classify_carried.check_against_the_evaluator``);
a carried classifier must also be the one built from nothing (``same_classifier``). Where labels
must merge, the expectation is hand-worked: routes of one content are one class.
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address

from topowatch.core.classify import Classifier
from topowatch.core.model import AF_INET, AF_INET6, Link, Nexthop, Route, RouteType, Topology

from test_classify_carried import (  # isort: skip
    ADDRESSES, BASE, LAN, LINKS, RULES, RULESET, UP1, UP2, VIA1, VIA1_6, VIA2, VIA2_6, R,
    check_against_the_evaluator,
)  # fmt: skip
from test_classify_update import same_classifier  # isort: skip

DEFAULTS = (R("0.0.0.0/0", VIA1), R("::/0", VIA1_6, metric=1024))


def snapshot(*routes: Route, links: tuple[Link, ...] = LINKS) -> Topology:
    return Topology(links, ADDRESSES, (*BASE, *DEFAULTS, *routes), RULES)


def _diff(before: Sequence[Route], now: Sequence[Route]) -> tuple[list[Route], list[Route]]:
    return [r for r in before if r not in now], [r for r in now if r not in before]


TOP6 = (1 << 128) - 1

# -- two snapshots ---------------------------------------------------------------------------


def test_a_pair_keeps_apart_what_only_the_older_snapshot_tells_apart() -> None:
    older = snapshot(
        R("192.0.2.0/24", VIA2),  # via up2 only in the older snapshot
        R("198.18.0.0/24", VIA1, metric=5),  # via up1 as the default, but another route
        R("8.8.8.0/24", VIA2, table=100),  # table 100 (sources in 10.0.1.0/24) only in the older one
    )
    newer = snapshot()
    c = Classifier.build([older, newer], [RULESET], reuse=False)
    check_against_the_evaluator(c, [older, newer])
    v4 = c.dst[AF_INET]
    assert v4.lookup(int(IPv4Address("192.0.2.5"))) != v4.lookup(int(IPv4Address("198.18.0.5")))
    assert v4.lookup(int(IPv4Address("8.8.8.8"))) != v4.lookup(int(IPv4Address("8.8.9.9")))


def test_a_pair_carried_to_the_next_pair_reads_again_where_the_first_pair_differed() -> None:
    a = snapshot(
        R("192.0.2.0/24", VIA2),
        R("198.18.5.5/32", VIA2),  # a host route: a span of one address
        R("ffff::/16", VIA2_6, metric=1024),  # up to the top of the IPv6 space
        R("fe00::/9", VIA2_6, metric=1024),
    )
    b = snapshot()
    c = snapshot(R("100.100.0.0/16", VIA2), R("2001:db8:9::/48", VIA2_6, metric=1024))
    first = Classifier.build([a, b], [RULESET], reuse=False)
    carried = first.updated([b, c], [RULESET], changes=_diff)
    assert carried is not None
    built = Classifier.build([b, c], [RULESET], reuse=False)
    same_classifier(carried, built, [int(IPv4Address("198.18.5.5")), TOP6, TOP6 - 1])
    check_against_the_evaluator(carried, [b, c])
    # Where only ``a`` differed, the pair (b, c) has one class: the default route's.
    v4, v6 = carried.dst[AF_INET], carried.dst[AF_INET6]
    assert v4.lookup(int(IPv4Address("192.0.2.5"))) == v4.lookup(int(IPv4Address("192.0.3.5")))
    assert v4.lookup(int(IPv4Address("198.18.5.5"))) == v4.lookup(int(IPv4Address("198.18.5.6")))
    assert v6.lookup(TOP6) == v6.lookup(int(IPv6Address("fff0::1")))


# -- a classifier carried over single snapshots ------------------------------------------------

STEPS: list[tuple[str, tuple[Route, ...], tuple[Route, ...]]] = [
    # (what, removed, added)
    ("a /25 replaces a host route just past it", (R("192.0.2.128/32", VIA2),), (R("192.0.2.0/25", VIA2),)),
    ("a region from address 0 takes the class numbered second", (), (R("0.0.0.0/9", VIA2),)),
    ("a region ends just before a host route", (), (R("192.0.3.0/25", VIA1, metric=7),)),
    (
        "a host route one before the top of IPv6",
        (),
        (R(f"{IPv6Address(TOP6 - 1)}/128", VIA2_6, metric=1024),),
    ),
    ("two touching regions", (R("192.0.2.0/25", VIA2),), (R("192.0.2.128/25", VIA1, metric=3),)),
    # Two connected /24s from the build, three more, one leaves: four /24s still to be found.
    ("three /24s arrive", (), (R("198.18.0.0/24", VIA2), R("198.19.0.0/24", VIA1, metric=5),
                               R("198.20.0.0/24", VIA2, metric=5))),
    ("one /24 leaves", (R("198.20.0.0/24", VIA2, metric=5),), ()),
    ("a /26 inside a connected /24", (), (R("198.51.100.64/26", VIA2, metric=9),)),
    ("the /26 leaves: the /24 answers again", (R("198.51.100.64/26", VIA2, metric=9),), ()),
]  # fmt: skip


def test_a_classifier_carried_step_by_step_is_the_one_built_and_agrees_with_the_evaluator() -> None:
    routes = [R("192.0.2.128/32", VIA2), R("0.128.0.0/9", VIA2), R("192.0.3.128/32", VIA2)]
    now = snapshot(*routes)
    c = Classifier.build([now], [RULESET], reuse=False)
    for what, removed, added in STEPS:
        routes = [r for r in routes if r not in removed] + list(added)
        now = snapshot(*routes)
        carried = c.updated([now], [RULESET], changes=_diff)
        assert carried is not None, what
        built = Classifier.build([now], [RULESET], reuse=False)
        same_classifier(carried, built, [0, TOP6 - 1, TOP6])
        check_against_the_evaluator(carried, [now])
        c = carried
    v4 = c.dst[AF_INET]
    assert v4.lookup(0) == v4.lookup(int(IPv4Address("0.200.0.0")))  # one content from 0.0.0.0/9 to /8
    assert v4.lookup(int(IPv4Address("192.0.3.128"))) != v4.lookup(int(IPv4Address("192.0.3.129")))
    v6 = c.dst[AF_INET6]
    assert v6.lookup(TOP6 - 1) != v6.lookup(TOP6)


# -- route labels ------------------------------------------------------------------------------


def test_routes_of_one_content_are_one_class_whatever_their_prefix_or_dump_order() -> None:
    now = snapshot(
        R("192.0.2.0/24", VIA2),
        R("198.18.0.0/24", VIA2),
        R("100.64.0.0/16", VIA1, metric=100), R("100.64.0.0/16", VIA2, metric=0),
        R("100.65.0.0/16", VIA2, metric=0), R("100.65.0.0/16", VIA1, metric=100),
    )  # fmt: skip
    c = Classifier.build([now], [RULESET], reuse=False)
    v4 = c.dst[AF_INET]
    assert v4.lookup(int(IPv4Address("192.0.2.5"))) == v4.lookup(int(IPv4Address("198.18.0.5")))
    assert v4.lookup(int(IPv4Address("100.64.0.5"))) == v4.lookup(int(IPv4Address("100.65.0.5")))
    assert v4.lookup(int(IPv4Address("100.64.0.5"))) != v4.lookup(int(IPv4Address("192.0.2.5")))


def test_a_tos_route_and_a_local_route_keep_their_prefix() -> None:
    now = snapshot(
        R("192.0.2.0/24", VIA2),
        Route(R("192.0.3.0/24", VIA2).dst, nexthops=(VIA2,), tos=0x10),
        R("10.9.0.1/32", Nexthop(LAN), table=255, kind=RouteType.LOCAL),
        R("10.9.0.2/32", Nexthop(LAN), table=255, kind=RouteType.LOCAL),
    )
    c = Classifier.build([now], [RULESET], reuse=False)
    check_against_the_evaluator(c, [now])
    v4 = c.dst[AF_INET]
    assert v4.lookup(int(IPv4Address("192.0.2.5"))) != v4.lookup(int(IPv4Address("192.0.3.5")))
    assert v4.lookup(int(IPv4Address("10.9.0.1"))) != v4.lookup(int(IPv4Address("10.9.0.2")))


def test_every_route_of_a_prefix_makes_its_label() -> None:
    """up2 is down: its routes are dead, and the FIB takes the prefix's next route."""
    links = tuple(Link(link.index, link.name, up=link.index != UP2) for link in LINKS)
    now = snapshot(
        R("192.0.2.0/24", VIA2, metric=0), R("192.0.2.0/24", VIA1, metric=100),
        R("198.18.0.0/24", VIA2, metric=0),
        R("198.19.0.0/24", VIA2, metric=0), R("198.19.0.0/24", Nexthop(LAN), metric=100),
        links=links,
    )  # fmt: skip
    assert UP1 != UP2
    c = Classifier.build([now], [RULESET], reuse=False)
    check_against_the_evaluator(c, [now])
    v4 = c.dst[AF_INET]
    classes = {v4.lookup(int(IPv4Address(a))) for a in ("192.0.2.5", "198.18.0.5", "198.19.0.5")}
    assert len(classes) == 3
