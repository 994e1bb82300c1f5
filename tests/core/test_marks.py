"""Marks before routing: mark chains around the nat chains, save and restore, and ``ip rule fwmark``.

A fresh flow's packet and conntrack marks start at 0 where the ruleset is
whole (``marks_known``); the mark chains (filter, route, mangle) run by hook
and priority: below the first nat chain their marks reach the NAT matches,
above it only routing and later hooks.
"""

from __future__ import annotations

from dataclasses import replace
from ipaddress import ip_address, ip_network
from typing import Any

import pytest

from topowatch.core.evaluate import predict
from topowatch.core.fib import Fib
from topowatch.core.flow import NO_NAT, Binding, Flow, NatKind, Unknown
from topowatch.core.model import (
    AF_INET,
    TABLE_LOCAL,
    TABLE_MAIN,
    Address,
    Link,
    Netconf,
    Nexthop,
    PolicyRule,
    Route,
    Topology,
)
from topowatch.core.nat import MarkCopy
from topowatch.edges.nft import parse_ruleset_json

LO, LAN, UP1, UP2 = 1, 2, 3, 4
TOPOLOGY = Topology(
    links=(Link(LO, "lo"), Link(LAN, "lan"), Link(UP1, "up1"), Link(UP2, "up2")),
    addresses=(Address(LO, ip_address("127.0.0.1"), 8), Address(LAN, ip_address("10.77.0.1"), 24),
               Address(UP1, ip_address("100.64.0.1"), 24), Address(UP2, ip_address("100.64.1.1"), 24)),
    routes=(
        Route(ip_network("10.77.0.0/24"), nexthops=(Nexthop(LAN),)),
        Route(ip_network("100.64.0.0/24"), nexthops=(Nexthop(UP1),)),
        Route(ip_network("100.64.1.0/24"), nexthops=(Nexthop(UP2),)),
        Route(ip_network("0.0.0.0/0"), nexthops=(Nexthop(UP1, ip_address("100.64.0.2")),)),
        Route(ip_network("0.0.0.0/0"), table=100, nexthops=(Nexthop(UP2, ip_address("100.64.1.2")),)),
    ),
    rules=(PolicyRule(AF_INET, 0, table=TABLE_LOCAL),
           PolicyRule(AF_INET, 100, table=100, fwmark=0x200, fwmask=0x3F00),
           PolicyRule(AF_INET, 32766, table=TABLE_MAIN)),
    netconf=(Netconf("all", 1),), netconf_known=True,
)
FIB = Fib(TOPOLOGY)
MASQ_UP1 = Binding(NatKind.MASQUERADE, ip_address("100.64.0.1"))
MASQ_UP2 = Binding(NatKind.MASQUERADE, ip_address("100.64.1.1"))
MARK = {"meta": {"key": "mark"}}
CTMARK = {"ct": {"key": "mark"}}


def udp(src: str = "10.77.0.3", dport: int = 53) -> Flow:
    return Flow(AF_INET, 17, ip_address(src), ip_address("198.18.0.7"), 5000, dport)


def set_mark(key: dict[str, Any], value: Any) -> dict[str, Any]:
    return {"mangle": {"key": key, "value": value}}


def match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


SADDR = {"payload": {"protocol": "ip", "field": "saddr"}}
MWAN = [  # restore; flows already marked keep it; mark 10.77.0.3's; save
    [set_mark(MARK, CTMARK)],
    [match({"&": [MARK, 0x3F00]}, 0, "!="), {"return": None}],
    [match(SADDR, "10.77.0.3"), set_mark(MARK, {"|": [{"&": [MARK, 0xFFFFC2FF]}, 0x200]})],
    [set_mark(CTMARK, MARK)],
]


def chain(name: str, hook: str, prio: int, rules: list[list[dict[str, Any]]], *, kind: str = "filter",
          table: str = "t") -> tuple[dict[str, Any], list[list[dict[str, Any]]]]:
    return ({"family": "ip", "table": table, "name": name, "type": kind, "hook": hook, "prio": prio,
             "policy": "accept"}, rules)


def ruleset(*chains: tuple[dict[str, Any], list[list[dict[str, Any]]]]) -> Any:
    items: list[dict[str, Any]] = [{"table": {"family": "ip", "name": t, "handle": 1}}
                                   for t in dict.fromkeys(c["table"] for c, _ in chains)]
    handle = 1
    for body, _ in chains:
        handle += 1
        items.append({"chain": {**body, "handle": handle}})
    for body, rules in chains:
        for exprs in rules:
            handle += 1
            items.append({"rule": {"family": "ip", "table": body["table"], "chain": body["name"],
                                   "handle": handle, "expr": exprs}})
    return parse_ruleset_json({"nftables": items})


POST = chain("post", "postrouting", 100, [[{"masquerade": None}]], kind="nat")


def test_mark_copy() -> None:
    restore = MarkCopy(False, "restore", src_mask=0x3F00, dst_mask=0x3F00)
    assert restore.apply(0xFF0001, 0x1234) == 0xFF0001 & ~0x3F00 | 0x1200
    assert restore.apply(None, 0x1234) is None  # the kept bits of an unknown mark
    assert MarkCopy(False, "restore").apply(None, 7) == 7  # every bit overwritten
    assert MarkCopy(True, "save").apply(5, None) is None


def test_mwan_marks_route_a_fresh_flow() -> None:
    rs = ruleset(chain("pre", "prerouting", -150, MWAN), POST)
    assert rs.marks_known
    assert predict(rs, FIB, udp("10.77.0.3")).snat == frozenset({MASQ_UP2})
    assert predict(rs, FIB, udp("10.77.0.2")).snat == frozenset({MASQ_UP1})
    # The entry's own ct mark does not matter: the prediction is for a fresh flow.
    assert predict(rs, FIB, replace(udp("10.77.0.2"), ct_mark=0x200)).snat == frozenset({MASQ_UP1})


def test_marks_below_the_nat_chain_reach_its_matches_those_above_only_routing() -> None:
    dnat_marked = chain("dnat", "prerouting", -100, [[match(MARK, 0x200), {"dnat": {"addr": "100.64.1.9"}}]],
                        kind="nat", table="n")
    marker = [[set_mark(MARK, 0x200)]]
    below = predict(ruleset(chain("m", "prerouting", -150, marker), dnat_marked, POST), FIB, udp())
    assert below.dnat == frozenset({Binding(NatKind.DNAT, ip_address("100.64.1.9"))})
    above = predict(ruleset(chain("m", "prerouting", 0, marker), dnat_marked, POST), FIB, udp())
    assert above.dnat == frozenset({NO_NAT})
    assert above.snat == frozenset({MASQ_UP2})  # but routing sees it


def test_forward_marks_reach_the_snat_matches() -> None:
    post = chain("post", "postrouting", 100, [[match(MARK, 7), {"snat": {"addr": "100.64.0.77"}}],
                                              [{"masquerade": None}]], kind="nat")
    rs = ruleset(chain("f", "forward", 0, [[set_mark(MARK, 7)]]), post)
    assert predict(rs, FIB, udp()).snat == frozenset({Binding(NatKind.SNAT, ip_address("100.64.0.77"))})


def test_a_mark_chain_that_drops_drops_the_flow() -> None:
    rs = ruleset(chain("m", "prerouting", -150, [[set_mark(MARK, 1)], [{"drop": None}]]), POST)
    p = predict(rs, FIB, udp())
    assert p.dnat == frozenset() and p.snat == frozenset()


@pytest.mark.parametrize(("rules", "unknown"), [
    ([[{"xt": {"type": "target", "name": "MARK"}}]], True),  # an xt target: it may set any mark
    ([[match({"meta": {"key": "iifname"}}, "lan"), set_mark(MARK, 0x200)]], False),  # strict: lan
])
def test_unknown_marks_make_routing_by_mark_unknown(rules: list[list[dict[str, Any]]], unknown: bool) -> None:
    p = predict(ruleset(chain("m", "prerouting", -150, rules), POST), FIB, udp())
    assert isinstance(p.snat, Unknown) is unknown
    if unknown:
        assert "fwmark" in p.snat.reason  # type: ignore[union-attr]


def test_a_mark_chain_between_nat_chains_is_unknown() -> None:
    early = chain("n1", "prerouting", -200, [[{"counter": None}]], kind="nat", table="n")
    p = predict(ruleset(early, chain("m", "prerouting", -150, [[set_mark(MARK, 1)]]),
                        chain("n2", "prerouting", -100, [[{"counter": None}]], kind="nat", table="n2"), POST),
                FIB, udp())
    assert isinstance(p.dnat, Unknown) and "between nat chains" in p.dnat.reason


def test_a_partial_ruleset_keeps_marks_unknown() -> None:
    """Not every mark chain read: the mark a packet arrives with is unknown (a restore would overwrite it)."""
    rules = [[match(SADDR, "10.77.0.3"), set_mark(MARK, {"|": [{"&": [MARK, 0xFFFFC2FF]}, 0x200]})]]
    rs = ruleset(chain("pre", "prerouting", -150, rules), POST)
    assert predict(rs, FIB, udp()).snat == frozenset({MASQ_UP2})
    assert isinstance(predict(replace(rs, marks_known=False), FIB, udp()).snat, Unknown)
    whole = replace(ruleset(chain("pre", "prerouting", -150, MWAN), POST), marks_known=False)
    assert predict(whole, FIB, udp()).snat == frozenset({MASQ_UP2})  # restored from the ct mark, 0 here


def test_a_local_flows_unknown_socket_mark_is_followed_as_alternatives() -> None:
    """The gateway's own flow: its socket's mark is not in the entry. Only the fwmark rule reads it,
    so a mark of the rule's masked value (0x200) and one of none stand for every mark."""
    local = Flow(AF_INET, 17, ip_address("100.64.0.1"), ip_address("198.18.0.7"), 5000, 53)
    p = predict(ruleset(POST), FIB, local)
    assert p.snat == frozenset({MASQ_UP1, MASQ_UP2})
    assert sorted((a.egress[0].oifname, a.snat) for a in p.alternatives) == [  # type: ignore[index]
        ("up1", frozenset({MASQ_UP1})), ("up2", frozenset({MASQ_UP2}))]
    assert p.explain[0].startswith("the socket's mark is not known")
    # A known socket mark is routed as it is.
    assert predict(ruleset(POST), FIB, replace(local, packet_mark=0x200)).snat == frozenset({MASQ_UP2})
    # A rule that reads the packet mark: the marks the policy rules tell apart do not stand for all.
    reads = chain("post", "postrouting", 100, [[match(MARK, 0x7), {"snat": {"addr": "100.64.0.77"}}],
                                               [{"masquerade": None}]], kind="nat")
    assert isinstance(predict(ruleset(reads), FIB, local).snat, Unknown)
