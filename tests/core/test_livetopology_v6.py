# SPDX-License-Identifier: GPL-2.0-or-later
"""core.livetopology: the IPv6 route events a key cannot follow make it give up.

Issue 16's mutation run found these unchecked: an IPv6 multipath route of two nexthops, an
IPv6 route appended (NLM_F_APPEND: the kernel adds it as an ECMP sibling), and a replace whose
table, prefix and metric hold more than one route (``ip6_route_add`` with NLM_F_REPLACE replaces
one fib6_info of several, which one is the kernel's). Following any of them would leave the kept
topology unlike the kernel's, and a reaction would judge entries by routes that are not there.
Also: deleting a rule that is already gone is followed (the dump saw it go).
"""

from __future__ import annotations

from ipaddress import ip_address, ip_network

import pytest

from topowatch.core.livetopology import NLM_F_APPEND, NLM_F_REPLACE, LiveTopology
from topowatch.core.model import AF_INET6, Link, Nexthop, PolicyRule, Route, Topology

NLM_F_CREATE = 0x400
LINKS = (Link(1, "lo"), Link(2, "up1"), Link(3, "up2"), Link(4, "up3"))
NET = ip_network("2001:db8::/64")
DEV2 = Route(NET, nexthops=(Nexthop(2),), metric=256)
DEV3 = Route(NET, nexthops=(Nexthop(3),), metric=256)
DEV4 = Route(NET, nexthops=(Nexthop(4),), metric=256)
OTHER = Route(ip_network("2001:db8:9::/64"), nexthops=(Nexthop(2),), metric=256)


def seeded(*routes: Route) -> LiveTopology:
    live = LiveTopology.seed(Topology(LINKS, (), routes, ()))
    assert live is not None
    return live


@pytest.mark.parametrize("hops", [2, 3])
def test_an_ipv6_multipath_route_is_not_followed(hops: int) -> None:
    multipath = Route(NET, nexthops=tuple(Nexthop(2 + i, ip_address(f"fe80::{i + 1}")) for i in range(hops)),
                      metric=1024)  # fmt: skip
    assert not seeded(OTHER).apply("route", True, multipath, NLM_F_CREATE)
    assert not seeded(OTHER).apply("route", False, multipath)


def test_an_appended_ipv6_route_is_not_followed() -> None:
    assert not seeded(DEV2).apply("route", True, DEV3, NLM_F_CREATE | NLM_F_APPEND)
    assert not seeded(OTHER).apply("route", True, DEV3, NLM_F_CREATE | NLM_F_APPEND)


def test_a_replace_among_several_routes_of_one_prefix_and_metric_is_not_followed() -> None:
    # Two routes of 2001:db8::/64 metric 256 (through up1 and up2): which one a replace takes
    # is the kernel's choice.
    assert not seeded(DEV2, DEV3).apply("route", True, DEV4, NLM_F_CREATE | NLM_F_REPLACE)
    # The replacing route is one of them: the other may or may not go.
    assert not seeded(DEV2, DEV3).apply("route", True, DEV2, NLM_F_CREATE | NLM_F_REPLACE)


def test_a_replace_of_the_one_route_of_a_prefix_and_metric_is_followed() -> None:
    live = seeded(DEV2, OTHER)
    assert live.apply("route", True, DEV4, NLM_F_CREATE | NLM_F_REPLACE)
    assert set(live.snapshot().routes) == {DEV4, OTHER}


def test_deleting_a_rule_that_is_gone_is_followed() -> None:
    rule = PolicyRule(AF_INET6, 100, table=100)
    live = seeded(OTHER)
    assert live.apply("rule", False, rule)
    assert live.snapshot().rules == ()
    assert live.apply("rule", True, rule)
    assert live.apply("rule", False, rule)
    assert live.apply("rule", False, rule)
    assert live.snapshot().rules == ()


def test_a_route_changed_in_place_then_deleted_leaves_no_sibling_behind() -> None:
    """An IPv6 gateway route changed in place (same key: a new protocol), then deleted: a gateway
    route added to its prefix and metric afterwards has no sibling to merge with, and is followed."""
    via1 = Route(NET, nexthops=(Nexthop(2, ip_address("fe80::1")),), metric=1024)
    via1_static = Route(NET, nexthops=(Nexthop(2, ip_address("fe80::1")),), metric=1024, protocol=4)
    via2 = Route(NET, nexthops=(Nexthop(3, ip_address("fe80::2")),), metric=1024)
    live = seeded(OTHER)
    assert live.apply("route", True, via1, NLM_F_CREATE)
    assert live.apply("route", True, via1_static, NLM_F_CREATE | NLM_F_REPLACE)
    assert live.apply("route", False, via1_static)
    assert live.apply("route", True, via2, NLM_F_CREATE)
    assert set(live.snapshot().routes) == {OTHER, via2}


def test_a_replace_after_one_of_two_routes_left_replaces_the_other() -> None:
    """Two routes of one prefix and metric; one is deleted; a replace then replaces the one left
    (the kernel's only route of that prefix and metric), and the kept topology follows it."""
    live = seeded(DEV2, DEV3, OTHER)
    assert live.apply("route", False, DEV3)
    assert live.apply("route", True, DEV4, NLM_F_CREATE | NLM_F_REPLACE)
    assert set(live.snapshot().routes) == {DEV4, OTHER}
