# SPDX-License-Identifier: GPL-2.0-or-later
"""Long chains (indexed, ``core.ruleindex``) predict as the kernel runs them: rule by rule.

A chain of 40 ``ip daddr 192.0.2.N dnat ip to 10.0.1.N`` rules (a list of
forwards by destination address): the kernel evaluates the rules in order,
so a flow to 192.0.2.7 meets the seventh rule's DNAT whatever its source,
and a flow to an address no rule lists meets none. The flows here come from
10.0.1.2, an address the rules list as destinations too.
"""

from __future__ import annotations

from test_evaluate_breadth import FIB, V6, B, m, payload, pre, ruleset, udp

from topowatch.core.evaluate import predict
from topowatch.core.flow import NO_NAT, NatKind

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
