# SPDX-License-Identifier: GPL-2.0-or-later
"""core.impact's answer where policy rules pick the tables, a NETMAP gives the DNAT targets, and
its texts (issue 16's mutation run). Every expectation is written out by hand.

The router and ruleset are those of ``tests/test_reactor_incremental.py``: masquerade out of up2,
and a route to 192.0.2.0/24 that moves from up1 to up2 (``MOVED``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from ipaddress import ip_address, ip_network
from typing import NoReturn

import pytest

from topowatch.core import impact as impact_module
from topowatch.core.flow import NatKind
from topowatch.core.impact import Impact, impact, prepare, prepared
from topowatch.core.livetopology import NLM_F_REPLACE, LiveTopology
from topowatch.core.model import (
    AF_INET,
    AF_INET6,
    TABLE_UNSPEC,
    Address,
    Nexthop,
    PolicyRule,
    Route,
    RuleAction,
    Topology,
)
from topowatch.core.nat import (
    Chain,
    Hook,
    IntervalSet,
    NatMapStatement,
    NatRuleset,
    NatStatement,
    NatTarget,
    NetmapStatement,
    Rule,
)
from topowatch.edges.nft import parse_ruleset_json

from uplinks_gateway import (  # isort: skip
    ADDRESSES, BEFORE, MOVED, MOVING, RULESET, UP1, UP2, VIA2,
)

# Table 100 holds 198.18.0.0/15; 192.0.2.0/24 is in main.
IN_100 = Route(ip_network("198.18.0.0/15"), table=100, nexthops=(VIA2,))
TO_100 = PolicyRule(AF_INET, 100, table=100)
TO_MAIN_UNSPEC = PolicyRule(AF_INET, 200, table=TABLE_UNSPEC)  # a rule without a table reads main
BLACKHOLE_MAIN = PolicyRule(AF_INET, 300, action=RuleAction.BLACKHOLE, table=254)  # no lookup: no table
V6_TO_MAIN = PolicyRule(AF_INET6, 100, table=254)


def with_rules(topology: Topology, *rules: PolicyRule) -> Topology:
    return replace(topology, rules=rules)


@pytest.mark.parametrize(
    ("rules", "now_routes", "expected"),
    [
        # Only table 100 is reached: a route added there counts, main's move does not.
        ((TO_100,), (*BEFORE.routes, IN_100), "flows to or from 198.18.0.0/15"),
        ((TO_100,), MOVED.routes, "no flow"),
        # A rule without a table looks main up; the blackhole rule looks nothing up.
        ((TO_100, TO_MAIN_UNSPEC), MOVED.routes, "flows to or from 192.0.2.0/24"),
        ((TO_100, BLACKHOLE_MAIN), MOVED.routes, "no flow"),
        # IPv6 rules say nothing of IPv4's tables: IPv4 has none, so local, main and default.
        ((V6_TO_MAIN,), (*BEFORE.routes, IN_100), "no flow"),
        ((V6_TO_MAIN,), MOVED.routes, "flows to or from 192.0.2.0/24"),
    ],
)
def test_policy_rules_choose_the_tables_whose_routes_count(
    rules: tuple[PolicyRule, ...], now_routes: tuple[Route, ...], expected: str
) -> None:
    before = with_rules(BEFORE, *rules)
    now = with_rules(replace(BEFORE, routes=tuple(now_routes)), *rules)
    assert impact(before, now, RULESET).describe() == expected


def prerouting(statement: object) -> NatRuleset:
    rule = Rule(1, (statement,))  # type: ignore[arg-type]
    return NatRuleset((Chain("ip", "nat", "PREROUTING", (rule,), Hook.PREROUTING, -100, "nat", "accept"),))


def netmap(prefix: str) -> NatRuleset:
    return prerouting(NetmapStatement(ip_network(prefix), f"NETMAP --to {prefix}"))


def dnat(lo: str, hi: str) -> NatRuleset:
    return prerouting(NatStatement(NatKind.DNAT, f"dnat to {lo}-{hi}", addr=(ip_address(lo), ip_address(hi))))


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("10.9.0.0/16", Impact(prefixes=(MOVING,))),  # the targets lie outside the moved prefix
        ("192.0.2.128/25", Impact(everything=True, why="a DNAT target lies in 192.0.2.0/24")),
        ("192.0.0.0/16", Impact(everything=True, why="a DNAT target lies in 192.0.2.0/24")),
        ("192.0.3.0/24", Impact(prefixes=(MOVING,))),  # next to it: 192.0.3.0-192.0.3.255
    ],
)
def test_a_netmap_prefix_is_a_range_of_dnat_targets(prefix: str, expected: Impact) -> None:
    assert impact(BEFORE, MOVED, netmap(prefix)) == expected


@pytest.mark.parametrize(
    ("lo", "hi", "expected"),
    [
        ("192.0.2.255", "192.0.2.255", "any flow (a DNAT target lies in 192.0.2.0/24)"),  # its last address
        ("192.0.1.0", "192.0.2.0", "any flow (a DNAT target lies in 192.0.2.0/24)"),  # ends at its first
        # Both ends outside, the range across it: the kernel may pick 192.0.2.9 (a bug until the seventh
        # session: only the ends were read).
        ("192.0.1.0", "192.0.3.255", "any flow (a DNAT target lies in 192.0.2.0/24)"),
        ("192.0.1.0", "192.0.1.255", "flows to or from 192.0.2.0/24"),
        ("192.0.3.0", "192.0.3.0", "flows to or from 192.0.2.0/24"),
    ],
)
def test_a_dnat_range_meets_a_moved_prefix_at_either_end(lo: str, hi: str, expected: str) -> None:
    assert impact(BEFORE, MOVED, dnat(lo, hi)).describe() == expected


def test_a_dnat_map_without_a_readable_target_is_any_flow() -> None:
    empty = NatMapStatement(NatKind.DNAT, "dnat to ip saddr map { }", None, (), ())
    assert impact(BEFORE, MOVED, prerouting(empty)) == Impact(everything=True, why="a DNAT target cannot be read")
    assert impact(BEFORE, BEFORE, prerouting(empty)) == Impact()  # nothing moved: nothing to read


def test_a_dnat_map_target_range_across_a_moved_prefix_is_any_flow() -> None:
    """``dnat to ip saddr map { 10.0.0.0/8 : 192.0.1.0-192.0.3.255 }``: a target range holding 192.0.2.0/24."""
    every_source = (IntervalSet(((167772160, 184549375),), 4),)  # 10.0.0.0/8
    target = NatTarget((ip_address("192.0.1.0"), ip_address("192.0.3.255")))
    spanning = NatMapStatement(NatKind.DNAT, "dnat to ip saddr map { ... }", AF_INET, (), ((every_source, target),))
    assert impact(BEFORE, MOVED, prerouting(spanning)).describe() == "any flow (a DNAT target lies in 192.0.2.0/24)"
    beside = NatTarget((ip_address("192.0.3.0"), ip_address("192.0.3.255")))
    apart = replace(spanning, elements=((every_source, beside),))
    assert impact(BEFORE, MOVED, prerouting(apart)) == Impact(prefixes=(MOVING,))


def test_snat_addresses_are_not_dnat_targets() -> None:
    """A source NAT to an address in the moved prefix re-NATs no flow there more than the move does."""
    snat = NatStatement(NatKind.SNAT, "snat to 192.0.2.5", addr=(ip_address("192.0.2.5"), ip_address("192.0.2.5")))
    snat_map = NatMapStatement(NatKind.SNAT, "snat to ip saddr map { }", None, (), ())
    for statement in (snat, snat_map):
        assert impact(BEFORE, MOVED, prerouting(statement)) == Impact(prefixes=(MOVING,))


def test_a_port_only_dnat_and_a_redirect_keep_the_address() -> None:
    """iptables ``DNAT --to-destination :8080`` and a redirect name no address: no target to read."""
    ports = NatStatement(NatKind.DNAT, "DNAT --to-destination :8080", ports=(8080, 8080))
    redirect = NatStatement(NatKind.REDIRECT, "redirect to :8080", ports=(8080, 8080))
    for statement in (ports, redirect):
        assert impact(BEFORE, MOVED, prerouting(statement)) == Impact(prefixes=(MOVING,))


def test_a_change_of_another_snapshot_field_is_any_flow_named_by_it() -> None:
    assert impact(BEFORE, replace(BEFORE, xfrm_known=True), RULESET).describe() == "any flow (xfrm known changed)"
    assert impact(BEFORE, replace(BEFORE, netconf_known=True), RULESET).why == "netconf known changed"


def test_prefixes_are_listed_four_then_counted() -> None:
    nets = [ip_network(f"198.51.{i}.0/24") for i in range(6)]
    listed = "198.51.0.0/24, 198.51.1.0/24, 198.51.2.0/24, 198.51.3.0/24"
    assert Impact(prefixes=tuple(nets[:4])).describe() == f"flows to or from {listed}"
    assert Impact(prefixes=tuple(nets[:5])).describe() == f"flows to or from {listed} and 1 more"
    assert Impact(prefixes=tuple(nets)).describe() == f"flows to or from {listed} and 2 more"
    assert Impact(prefixes=tuple(nets[:1])).describe() == "flows to or from 198.51.0.0/24"


def test_prepared_names_only_the_rulesets_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(impact_module, "_TARGETS", [])
    first, second = netmap("10.9.0.0/16"), netmap("10.8.0.0/16")
    assert not prepared(first) and not prepared(second)
    prepare(first)
    assert prepared(first) and not prepared(second)



def test_the_same_addresses_in_another_order_are_a_change() -> None:
    """The order of a device's addresses chooses the source (masquerade's too): a reorder counts."""
    second = Address(UP2, ip_address("203.0.113.3"), 24)
    before = replace(BEFORE, addresses=(*ADDRESSES, second))
    now = replace(BEFORE, addresses=(*ADDRESSES[:2], second, ADDRESSES[2]))
    assert impact(before, now, RULESET).describe() == "any flow (addresses changed)"


def test_prefixes_of_both_families_are_listed_ipv4_first() -> None:
    inet = parse_ruleset_json({"nftables": [
        {"table": {"family": "inet", "name": "nat", "handle": 1}},
        {"chain": {"family": "inet", "table": "nat", "name": "post", "handle": 2, "type": "nat",
                   "hook": "postrouting", "prio": 100, "policy": "accept"}},
        {"rule": {"family": "inet", "table": "nat", "chain": "post", "handle": 3, "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "up2"}}, {"masquerade": None}]}},
    ]})  # fmt: skip
    v6 = ip_network("2001:db8:1::/48")
    before = replace(BEFORE, routes=(*BEFORE.routes, Route(v6, nexthops=(Nexthop(UP1),))))
    now = replace(MOVED, routes=(*MOVED.routes, Route(v6, nexthops=(Nexthop(UP2),))))
    assert impact(before, now, inet).describe() == "flows to or from 192.0.2.0/24, 2001:db8:1::/48"


# -- the walks' depth guards, the ruleset cache's bound, the lineage (the seventh session) -------------

# 192.0.2.7 = 192 * 2**24 + 2 * 2**8 + 7 = 3221225472 + 512 + 7.
SEVEN = (4, 3221225991, 3221225991)
TO_SEVEN = NatStatement(NatKind.DNAT, "dnat to 192.0.2.7", addr=(ip_address("192.0.2.7"), ip_address("192.0.2.7")))


@dataclass(frozen=True)
class Box:
    """A dataclass of one field: the walks enter every dataclass's fields."""

    inner: object


def in_tuples(value: object, levels: int) -> object:
    for _ in range(levels):
        value = (value,)
    return value


def in_boxes(value: object, levels: int) -> object:
    for _ in range(levels):
        value = Box(value)
    return value


@pytest.mark.parametrize("wrap", [in_tuples, in_boxes])
def test_a_statement_200_levels_down_is_read_and_201_cannot_be(wrap: Callable[[object, int], object]) -> None:
    """``_dnat_targets`` walks 200 levels of containers; a statement below them is taken as "anywhere"
    (version 0, the sentinel ``impact`` answers "cannot be read" to)."""
    assert list(impact_module._dnat_targets(wrap(TO_SEVEN, 200))) == [SEVEN]
    assert list(impact_module._dnat_targets(wrap(TO_SEVEN, 201))) == [(0, 0, 0)]
    assert list(impact_module._dnat_targets(wrap((TO_SEVEN, TO_SEVEN), 199))) == [SEVEN, SEVEN]


@pytest.mark.parametrize("wrap", [in_tuples, in_boxes])
def test_an_address_50_levels_down_is_read_and_51_is_not(wrap: Callable[[object, int], object]) -> None:
    """``_addresses_in`` stops 50 levels into a statement (a map or NETMAP with nothing read is then
    "cannot be read"; a ``NatStatement`` holds its addresses two levels down)."""
    seven = ip_address("192.0.2.7")
    assert list(impact_module._addresses_in(wrap(seven, 50))) == [SEVEN]
    assert list(impact_module._addresses_in(wrap(seven, 51))) == []
    net = ip_network("192.0.2.0/30")  # 3221225984 .. 3221225987
    assert list(impact_module._addresses_in(wrap(net, 50))) == [(4, 3221225984, 3221225987)]
    # A pair of addresses is a range: 192.0.2.0 .. 192.0.2.7.
    pair = (ip_address("192.0.2.0"), ip_address("192.0.2.7"))
    assert list(impact_module._addresses_in(wrap(pair, 50))) == [(4, 3221225984, 3221225991)]


def test_a_dnat_map_or_netmap_with_no_address_read_is_the_sentinel() -> None:
    empty = NatMapStatement(NatKind.DNAT, "dnat to ip saddr map { }", None, (), ())
    assert list(impact_module._dnat_targets(empty)) == [(0, 0, 0)]
    # A NETMAP whose prefix is not an address or network (not parsed so, but walked alike).
    odd = NetmapStatement(in_tuples(ip_network("10.0.0.0/8"), 51), "NETMAP --to ?")  # type: ignore[arg-type]
    assert list(impact_module._dnat_targets(odd)) == [(0, 0, 0)]
    # 10.0.0.0/8 = 10 * 2**24 = 167772160 .. 167772160 + 2**24 - 1 = 184549375.
    assert list(impact_module._dnat_targets(netmap("10.0.0.0/8"))) == [(4, 167772160, 184549375)]


def test_the_last_four_rulesets_read_are_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache keeps the four rulesets read last (the daemon's memory stays bounded)."""
    monkeypatch.setattr(impact_module, "_TARGETS", [])
    rulesets = [netmap(f"10.{i}.0.0/16") for i in range(5)]
    for ruleset in rulesets:
        prepare(ruleset)
    assert [prepared(r) for r in rulesets] == [False, True, True, True, True]
    prepare(rulesets[0])  # read again: the oldest of the others (the second) goes
    assert [prepared(r) for r in rulesets] == [True, False, True, True, True]


def test_snapshots_of_one_lineage_give_their_route_changes_without_comparing_tables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kept topology's lineage names the routes that changed; the tables are not compared."""
    live = LiveTopology.seed(BEFORE)
    assert live is not None
    first = live.snapshot()
    assert live.apply("route", True, Route(MOVING, nexthops=(VIA2,)), NLM_F_REPLACE)
    now = live.snapshot()

    def compared(*tables: object) -> NoReturn:
        raise AssertionError("the tables were compared")

    monkeypatch.setattr(impact_module, "changed_routes", compared)
    assert impact(first, now, RULESET) == Impact(prefixes=(MOVING,))
    assert impact(first, first, RULESET) == Impact()
    with pytest.raises(AssertionError, match="compared"):  # snapshots of no lineage: compared
        impact(BEFORE, MOVED, RULESET)


def test_a_pair_of_addresses_covers_what_lies_between_whichever_comes_first() -> None:
    """Two addresses of one family in a pair are read as the range between them, in either
    order: a pair that is not a range is covered more widely, never less."""
    lo, hi = ip_address("192.0.2.9"), ip_address("192.0.2.1")
    span = (4, int(hi), int(lo))  # 192.0.2.1-192.0.2.9
    assert list(impact_module._addresses_in((lo, hi))) == [span]
    assert list(impact_module._addresses_in((hi, lo))) == [span]
