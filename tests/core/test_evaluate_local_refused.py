# SPDX-License-Identifier: GPL-2.0-or-later
"""A locally generated flow whose destination has a blackhole, unreachable or prohibit route is never sent.

Kernel behaviour: a socket's packet is routed before any netfilter hook
(``ip_route_output_flow`` from ``udp_sendmsg``/``ip_route_connect``/
``tcp_v4_connect``; ``ip6_dst_lookup_flow`` for IPv6). ``fib_table_lookup``
answers a blackhole, unreachable or prohibit route (or an ``ip rule`` with
that action) with the route type's error (-EINVAL, -EHOSTUNREACH, -EACCES):
the send fails, no packet exists, output's nat chains never see it, so no
DNAT at output can send it elsewhere. Where output's mark chains change the
mark and the re-route (``ip_route_me_harder``) meets such a route, the
packet is dropped there, before output's NAT, too. A forwarded flow, by
contrast, is routed after prerouting's DNAT: its DNAT decides the route.

The prediction of such a local flow is "dropped": no binding on either side
(nothing to re-NAT), the refusing route as its egress, and an explanation
naming it. Over the gateway of ``test_evaluate_breadth`` with
``blackhole 192.0.2.0/24`` (``unreachable``, ``prohibit``) added.
"""

from __future__ import annotations

from dataclasses import replace
from ipaddress import ip_address, ip_network

import pytest
from test_evaluate_breadth import TOPOLOGY, UP2, B, ruleset, udp

from topowatch.core.evaluate import predict
from topowatch.core.fib import Fib
from topowatch.core.flow import EgressKind, NatKind
from topowatch.core.model import AF_INET, TABLE_LOCAL, TABLE_MAIN, Nexthop, PolicyRule, Route, RouteType
from topowatch.core.nat import Chain, Hook, MarkSet, NatRuleset, Rule

OUT_DNAT = ruleset(("out", "output", [[{"dnat": {"family": "ip", "addr": "10.0.1.9"}}]]),
                   ("pre", "prerouting", [[{"dnat": {"family": "ip", "addr": "10.0.1.9"}}]]))


def fib_with(kind: RouteType) -> Fib:
    return Fib(replace(TOPOLOGY, routes=(*TOPOLOGY.routes, Route(ip_network("192.0.2.0/24"), type=kind))))


@pytest.mark.parametrize("kind", [RouteType.BLACKHOLE, RouteType.UNREACHABLE, RouteType.PROHIBIT])
def test_a_local_flow_to_a_refused_destination_is_dropped_before_output_nat(kind: RouteType) -> None:
    fib = fib_with(kind)
    p = predict(OUT_DNAT, fib, udp(src="203.0.113.2", dst="192.0.2.10", packet_mark=0))
    assert p.dnat == frozenset()
    assert p.snat == frozenset()
    assert len(p.egress) == 1 and p.egress[0].kind is EgressKind(kind.name.lower()), p.egress  # type: ignore[union-attr]
    assert len(p.explain) == 1 and p.explain[0].startswith(f"dropped by the route: {kind.name.lower()} ("), p.explain
    assert p.alternatives == () and p.rules == ()
    assert p.ingress is not None and p.ingress.local, p.ingress  # sent by the gateway itself


def test_a_forwarded_flow_to_a_refused_destination_is_dnatted_first() -> None:
    """The same destination arriving on lan: prerouting's DNAT to 10.0.1.9 runs before the route
    lookup, which then goes to lan."""
    p = predict(OUT_DNAT, fib_with(RouteType.BLACKHOLE), udp(dst="192.0.2.10"))
    assert p.dnat == frozenset({B(NatKind.DNAT, "10.0.1.9")})
    assert [e.oifname for e in p.egress] == ["lan"]  # type: ignore[union-attr]


def test_the_sockets_own_route_decides_before_outputs_mark_chains_re_route() -> None:
    """``ip rule fwmark 0x1 lookup 100`` (table 100: default via up2), main's 192.0.2.0/24 a
    blackhole; output's route chain sets mark 1, output's nat chain DNATs to 10.0.1.9. A socket
    with mark 0 is refused at its own route lookup (the blackhole), before any hook: dropped, though
    the re-route with mark 1 would have gone by up2. A socket with mark 1 whose mark the chain
    sets to 0 is re-routed into the blackhole: dropped at output. A socket with mark 1 kept 1 is
    sent, and DNATted."""
    rules = (PolicyRule(AF_INET, 0, table=TABLE_LOCAL), PolicyRule(AF_INET, 100, table=100, fwmark=1, fwmask=0xFF),
             PolicyRule(AF_INET, 32766, table=TABLE_MAIN))
    table100 = Route(ip_network("0.0.0.0/0"), table=100, nexthops=(Nexthop(UP2, ip_address("198.51.100.1")),))
    blackhole = Route(ip_network("192.0.2.0/24"), type=RouteType.BLACKHOLE)
    fib = Fib(replace(TOPOLOGY, rules=rules, routes=(*TOPOLOGY.routes, blackhole, table100)))

    def with_mark_chain(mark: int) -> NatRuleset:
        chain = Chain("ip", "f", "route_out", (Rule(5, (MarkSet(mark, 0xFFFFFFFF, f"meta mark set {mark}"),)),),
                      Hook.OUTPUT, -150, "route", "accept")
        return NatRuleset((*OUT_DNAT.chains, chain), marks_known=True)

    for socket_mark, set_to in ((0, 1), (1, 0)):
        p = predict(with_mark_chain(set_to), fib, udp(src="203.0.113.2", dst="192.0.2.10", packet_mark=socket_mark))
        assert (p.dnat, p.snat) == (frozenset(), frozenset()), (socket_mark, p)
        assert [e.kind for e in p.egress] == [EgressKind.BLACKHOLE], (socket_mark, p.egress)  # type: ignore[union-attr]
    p = predict(with_mark_chain(1), fib, udp(src="203.0.113.2", dst="192.0.2.10", packet_mark=1))
    assert p.dnat == frozenset({B(NatKind.DNAT, "10.0.1.9")})
