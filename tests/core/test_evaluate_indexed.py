# SPDX-License-Identifier: GPL-2.0-or-later
"""Long chains (indexed, ``core.ruleindex``) predict as the kernel runs them: rule by rule.

A chain of 40 ``ip daddr 192.0.2.N dnat ip to 10.0.1.N`` rules (a list of
forwards by destination address): the kernel evaluates the rules in order,
so a flow to 192.0.2.7 meets the seventh rule's DNAT whatever its source,
and a flow to an address no rule lists meets none. The flows here come from
10.0.1.2, an address the rules list as destinations too.
"""

from __future__ import annotations

from dataclasses import replace

from test_evaluate_breadth import FIB, TOPOLOGY, V6, B, m, payload, pre, ruleset, udp

from topowatch.core.evaluate import predict
from topowatch.core.fib import Fib
from topowatch.core.flow import NO_NAT, NatKind, Unknown
from topowatch.core.model import AF_INET, TABLE_LOCAL, TABLE_MAIN, PolicyRule

FORWARDS = ruleset(pre(*([m(payload("ip", "daddr"), f"192.0.2.{n}"), {"dnat": {"family": "ip", "addr": f"10.0.1.{n}"}}]
                         for n in range(1, 41))))


def test_a_forward_by_destination_address_is_found_in_a_long_chain() -> None:
    assert predict(FORWARDS, FIB, udp(src="10.0.1.2", dst="192.0.2.7")).dnat == frozenset({B(NatKind.DNAT, "10.0.1.7")})
    assert predict(FORWARDS, FIB, udp(src="10.0.1.2", dst="192.0.2.40")).dnat == frozenset(
        {B(NatKind.DNAT, "10.0.1.40")})
    assert predict(FORWARDS, FIB, udp(src="10.0.1.2", dst="192.0.2.41")).dnat == frozenset({NO_NAT})
    # The source is one the rules name as a destination (192.0.2.2): it does not select the rule.
    assert predict(FORWARDS, FIB, udp(src="192.0.2.2", dst="192.0.2.9")).dnat == frozenset(
        {B(NatKind.DNAT, "10.0.1.9")})


def nfproto_rule(n: int) -> list[dict[str, object]]:
    if n % 2:
        return [m({"meta": {"key": "nfproto"}}, "ipv6"), {"dnat": {"family": "ip6", "addr": f"fd00:1::{n}"}}]
    return [m({"meta": {"key": "nfproto"}}, "ipv4"), m(payload("udp", "dport"), 1000 + n),
            {"dnat": {"family": "ip", "addr": f"10.0.1.{n}"}}]


def test_a_long_chain_whose_rules_open_with_meta_nfproto_is_found_by_family() -> None:
    """40 rules opening with ``meta nfproto``: the odd ones ``ipv6`` (DNAT to fd00:1::N), the even ones
    ``ipv4 udp dport 100N`` (DNAT to 10.0.1.N). An IPv4 flow to port 1008 meets the eighth; an IPv6
    flow the first."""
    rs = ruleset(pre(*(nfproto_rule(n) for n in range(1, 41))))
    assert predict(rs, FIB, udp(dport=1008)).dnat == frozenset({B(NatKind.DNAT, "10.0.1.8")})
    assert predict(rs, FIB, udp(dport=999)).dnat == frozenset({NO_NAT})
    assert predict(rs, FIB, V6).dnat == frozenset({B(NatKind.DNAT, "fd00:1::1")})


def test_a_long_output_chain_by_oifname_is_unknown_where_the_route_before_dnat_is() -> None:
    """40 ``oifname "X" dnat`` rules at output, for a locally generated flow routed by ``ip rule uidrange
    1000-1000 lookup 100``: the kernel routes a local packet before output's nat (the route's device is
    the ``oifname`` the rules read), and that rule selects by the socket's owner, which the entry does
    not show. The device, so which rule matches, is unknown: the DNAT is unknown, not a crash and not
    "no rule matched" (``up1``'s rule, 40th, matches where the flow is routed by main)."""
    rules = (PolicyRule(AF_INET, 0, table=TABLE_LOCAL), PolicyRule(AF_INET, 100, table=100, unmodelled=("uidrange",)),
             PolicyRule(AF_INET, 32766, table=TABLE_MAIN))
    by_uid = Fib(replace(TOPOLOGY, rules=rules))
    out = [[m({"meta": {"key": "oifname"}}, f"ppp{n}"), {"dnat": {"family": "ip", "addr": f"10.0.1.{n + 1}"}}]
           for n in range(39)]
    out.append([m({"meta": {"key": "oifname"}}, "up1"), {"dnat": {"family": "ip", "addr": "10.0.1.40"}}])
    rs = ruleset(("out", "output", out))
    local = udp(src="203.0.113.2", dst="192.0.2.10")
    p = predict(rs, by_uid, local)
    assert isinstance(p.dnat, Unknown), p.dnat
    assert "route before DNAT unknown" in p.dnat.reason and "uidrange" in p.dnat.reason, p.dnat.reason
    # Without the rule, main routes it by up1: the 40th rule's DNAT.
    assert predict(rs, FIB, local).dnat == frozenset({B(NatKind.DNAT, "10.0.1.40")})
