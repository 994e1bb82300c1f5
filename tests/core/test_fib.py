"""core.fib: table-driven cases per selector, route type and source choice; property tests.

The property tests compare the FIB with brute-force oracles written here
independently (sort every matching route, take the first usable one), and
check the three-valued discipline: an answer given with the mark or TOS
unknown must hold for every mark or TOS.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, ip_address, ip_network
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from topowatch.core.fib import Fib, Resolution
from topowatch.core.flow import Egress, EgressKind, Flow, Ingress, Unknown
from topowatch.core.livetopology import LiveTopology
from topowatch.core.model import (
    AF_INET,
    AF_INET6,
    IFA_F_DADFAILED,
    IFA_F_DEPRECATED,
    IFA_F_SECONDARY,
    IFA_F_TENTATIVE,
    SCOPE_HOST,
    SCOPE_LINK,
    TABLE_LOCAL,
    TABLE_MAIN,
    Address,
    IPAddress,
    Link,
    Netconf,
    Nexthop,
    PolicyRule,
    Route,
    RouteType,
    RuleAction,
    Topology,
)

LO, WAN, LAN, LTE, DEAD, NOCARRIER, VRF, VPN = 1, 2, 3, 4, 5, 6, 7, 8
LINKS = (
    Link(LO, "lo"),
    Link(WAN, "wan"),
    Link(LAN, "lan"),
    Link(LTE, "lte"),
    Link(DEAD, "dead", up=False, running=False),
    Link(NOCARRIER, "nocarrier", running=False),
    Link(VRF, "blue", kind="vrf"),
    Link(VPN, "vpn", master=VRF),
)


def A(ifindex: int, text: str, *, scope: int = 0, flags: int = 0, peer: str | None = None) -> Address:
    addr, plen = text.split("/")
    return Address(ifindex, ip_address(addr), int(plen), scope, flags, ip_address(peer) if peer else None)


ADDRESSES = (
    A(LO, "127.0.0.1/8", scope=SCOPE_HOST),
    A(WAN, "169.254.9.9/16", scope=SCOPE_LINK),
    A(WAN, "203.0.113.6/24", flags=IFA_F_SECONDARY),
    A(WAN, "203.0.113.5/24"),
    A(WAN, "198.51.100.7/24"),
    A(LAN, "192.168.1.1/24"),
    A(LTE, "100.64.0.2/32", peer="100.64.0.1"),
    A(VRF, "10.200.0.1/32"),
    A(LAN, "fd00:1::1/64"),
    A(LAN, "fe80::1/64", scope=SCOPE_LINK),
    A(WAN, "2001:db8::5/64", flags=IFA_F_TENTATIVE),
    A(WAN, "2001:db8:1::5/64", flags=IFA_F_DEPRECATED),
    A(WAN, "2001:db8:2::5/64"),
)


def R(
    dst: str,
    dev: int | None = None,
    via: str | None = None,
    *,
    table: int = TABLE_MAIN,
    type: RouteType = RouteType.UNICAST,
    metric: int = 0,
    tos: int = 0,
    nhs: tuple[tuple[int, str | None], ...] = (),
    prefsrc: str | None = None,
) -> Route:
    hops = nhs or (((dev, via),) if dev is not None else ())
    nexthops = tuple(Nexthop(d, ip_address(g) if g else None) for d, g in hops)
    return Route(
        ip_network(dst),
        table,
        type,
        nexthops,
        metric,
        ip_address(prefsrc) if prefsrc else None,
        tos=tos,
    )


def rule(priority: int, **kw: Any) -> PolicyRule:
    family = kw.pop("family", AF_INET)
    for key in ("src", "dst"):
        if key in kw:
            kw[key] = ip_network(kw[key])
    return PolicyRule(family, priority, **kw)


def rules_with(*extra: PolicyRule) -> tuple[PolicyRule, ...]:
    return (
        rule(0, table=TABLE_LOCAL),
        *extra,
        rule(32766, table=TABLE_MAIN),
    )


MAIN = (
    R("0.0.0.0/0", WAN, "203.0.113.1"),
    R("192.168.1.0/24", LAN),
    R("203.0.113.0/24", WAN),
    R("198.51.100.0/24", WAN),
)


def fib(routes: tuple[Route, ...] = MAIN, rules: tuple[PolicyRule, ...] = (), **kw: Any) -> Fib:
    return Fib(Topology(kw.get("links", LINKS), kw.get("addresses", ADDRESSES), routes, rules))


def summary(answer: tuple[Egress, ...] | Unknown) -> object:
    """("unicast", "wan", "203.0.113.1") per egress, or "unknown: <reason>"."""
    if isinstance(answer, Unknown):
        return f"unknown: {answer.reason}"
    out = []
    for e in answer:
        if e.kind is EgressKind.UNICAST:
            out.append((e.kind.value, e.oifname, str(e.gateway) if e.gateway else None))
        else:
            out.append((e.kind.value, e.oifname or None, None))
    return out[0] if len(out) == 1 else sorted(out)


def ip(text: str) -> IPAddress:
    return ip_address(text)


@dataclass(frozen=True)
class Case:
    name: str
    routes: tuple[Route, ...]
    rules: tuple[PolicyRule, ...]
    dst: str
    expect: object
    query: tuple[tuple[str, Any], ...] = ()

    def run(self) -> object:
        kw = dict(self.query)
        if "src" in kw:
            kw["src"] = ip(kw["src"])
        return summary(fib(self.routes, self.rules).lookup(ip(self.dst), **kw))


UNICAST_WAN = ("unicast", "wan", "203.0.113.1")
T100 = (R("0.0.0.0/0", LTE, "100.64.0.1", table=100),)

ROUTE_CASES = [
    Case(
        "longest prefix wins",
        (*MAIN, R("10.0.0.0/8", LAN, "192.168.1.9")),
        (),
        "10.1.2.3",
        ("unicast", "lan", "192.168.1.9"),
    ),
    Case(
        "shorter prefix when longer does not hold dst",
        (*MAIN, R("10.0.0.0/8", LAN, "192.168.1.9")),
        (),
        "11.1.2.3",
        UNICAST_WAN,
    ),
    Case(
        "lowest metric among equal prefixes",
        (R("10.0.0.0/8", LAN, "192.168.1.9", metric=10), R("10.0.0.0/8", WAN, "203.0.113.9", metric=5)),
        (),
        "10.0.0.1",
        ("unicast", "wan", "203.0.113.9"),
    ),
    Case(
        "equal metric: dump order",
        (R("10.0.0.0/8", LAN, "192.168.1.9"), R("10.0.0.0/8", WAN, "203.0.113.9")),
        (),
        "10.0.0.1",
        ("unicast", "lan", "192.168.1.9"),
    ),
    Case(
        "tos route applies to its tos",
        (R("10.0.0.0/8", LAN, metric=100, tos=0x10), R("10.0.0.0/8", WAN)),
        (),
        "10.0.0.1",
        ("unicast", "lan", None),
        (("tos", 0x10),),
    ),
    Case(
        "tos route ignores ecn bits",
        (R("10.0.0.0/8", LAN, metric=100, tos=0x10), R("10.0.0.0/8", WAN)),
        (),
        "10.0.0.1",
        ("unicast", "lan", None),
        (("tos", 0x12),),
    ),
    Case(
        "tos route skipped for other tos",
        (R("10.0.0.0/8", LAN, tos=0x10), R("10.0.0.0/8", WAN)),
        (),
        "10.0.0.1",
        ("unicast", "wan", None),
        (("tos", 0x14),),
    ),
    Case(
        "tos route with unknown tos",
        (R("10.0.0.0/8", LAN, tos=0x10), R("10.0.0.0/8", WAN)),
        (),
        "10.0.0.1",
        "unknown: route 10.0.0.0/8 dev lan table main selects tos 0x10; the packet's TOS is unknown",
        (("tos", None),),
    ),
    Case(
        "blackhole",
        (*MAIN, R("10.0.0.0/8", type=RouteType.BLACKHOLE)),
        (),
        "10.0.0.1",
        ("blackhole", None, None),
    ),
    Case(
        "unreachable",
        (*MAIN, R("10.0.0.0/8", type=RouteType.UNREACHABLE)),
        (),
        "10.0.0.1",
        ("unreachable", None, None),
    ),
    Case(
        "prohibit",
        (*MAIN, R("10.0.0.0/8", type=RouteType.PROHIBIT)),
        (),
        "10.0.0.1",
        ("prohibit", None, None),
    ),
    Case(
        "reject route beats a worse-metric unicast",
        (R("10.0.0.0/8", type=RouteType.BLACKHOLE, metric=1), R("10.0.0.0/8", LAN, metric=2)),
        (),
        "10.0.0.1",
        ("blackhole", None, None),
    ),
    Case("no route", (R("10.0.0.0/8", LAN),), (), "11.0.0.1", ("unreachable", None, None)),
    Case(
        "local route",
        (*MAIN, R("10.9.0.0/24", LO, table=TABLE_LOCAL, type=RouteType.LOCAL)),
        (),
        "10.9.0.7",
        ("local", "lo", None),
    ),
    Case("own address is local (implied local table)", MAIN, (), "192.168.1.1", ("local", "lo", None)),
    Case(
        "dead link skipped for the next metric",
        (R("10.0.0.0/8", DEAD, metric=1), R("10.0.0.0/8", LAN, metric=2)),
        (),
        "10.0.0.1",
        ("unicast", "lan", None),
    ),
    Case(
        "dead link: back to a shorter prefix",
        (*MAIN, R("10.1.0.0/16", DEAD), R("10.0.0.0/8", LAN)),
        (),
        "10.1.0.1",
        ("unicast", "lan", None),
    ),
    Case(
        "no carrier is still used (linkdown)",
        (*MAIN, R("10.0.0.0/8", NOCARRIER)),
        (),
        "10.0.0.1",
        ("unicast", "nocarrier", None),
    ),
    Case(
        "multipath answers every nexthop",
        (*MAIN, R("10.0.0.0/8", nhs=((WAN, "203.0.113.1"), (LAN, "192.168.1.9")))),
        (),
        "10.0.0.1",
        [("unicast", "lan", "192.168.1.9"), UNICAST_WAN],
    ),
    Case(
        "multipath without its dead nexthop",
        (*MAIN, R("10.0.0.0/8", nhs=((DEAD, None), (LAN, "192.168.1.9")))),
        (),
        "10.0.0.1",
        ("unicast", "lan", "192.168.1.9"),
    ),
    Case(
        "oif keeps only its nexthops",
        (*MAIN, R("10.0.0.0/8", nhs=((WAN, "203.0.113.1"), (LAN, "192.168.1.9")))),
        (),
        "10.0.0.1",
        ("unicast", "lan", "192.168.1.9"),
        (("oifname", "lan"),),
    ),
    Case(
        "oif with a failed lookup goes on link",
        (R("10.0.0.0/8", type=RouteType.UNREACHABLE),),
        (),
        "10.0.0.1",
        ("unicast", "lte", None),
        (("oifname", "lte"),),
    ),
    Case(
        "no on-link fallback for forwarded packets",
        (R("10.0.0.0/8", type=RouteType.UNREACHABLE),),
        (),
        "10.0.0.1",
        ("unreachable", None, None),
        (("oifname", "lte"), ("iifname", "lan")),
    ),
    Case(
        "broadcast route on output leaves its device",
        (*MAIN, R("192.168.1.255/32", LAN, table=TABLE_LOCAL, type=RouteType.BROADCAST)),
        (),
        "192.168.1.255",
        ("unicast", "lan", None),
    ),
    Case(
        "broadcast route on input is delivered locally",
        (*MAIN, R("192.168.1.255/32", LAN, table=TABLE_LOCAL, type=RouteType.BROADCAST)),
        (),
        "192.168.1.255",
        ("local", "lo", None),
        (("iifname", "lan"),),
    ),
    Case(
        "anycast route is unknown",
        (*MAIN, R("10.0.0.0/8", LAN, type=RouteType.ANYCAST)),
        (),
        "10.0.0.1",
        "unknown: route anycast 10.0.0.0/8 dev lan table main: type anycast is not modelled",
    ),
    Case(
        "multicast destination is unknown",
        MAIN,
        (),
        "224.0.0.5",
        "unknown: a multicast destination is not modelled",
    ),
    Case(
        "route without nexthop is unknown",
        (R("10.0.0.0/8"),),
        (),
        "10.0.0.1",
        "unknown: route 10.0.0.0/8 table main has no nexthop (nexthop objects are not modelled)",
    ),
    Case(
        "equal default routes: alternatives on output",
        (R("0.0.0.0/0", WAN, "203.0.113.1"), R("0.0.0.0/0", LAN, "192.168.1.9")),
        (),
        "8.8.8.8",
        [("unicast", "lan", "192.168.1.9"), UNICAST_WAN],
    ),
    Case(
        "equal default routes: the first when forwarding",
        (R("0.0.0.0/0", WAN, "203.0.113.1"), R("0.0.0.0/0", LAN, "192.168.1.9")),
        (),
        "8.8.8.8",
        UNICAST_WAN,
        (("iifname", "lan"),),
    ),
    Case(
        "default routes of different metric: no alternatives",
        (R("0.0.0.0/0", WAN, "203.0.113.1"), R("0.0.0.0/0", LAN, "192.168.1.9", metric=5)),
        (),
        "8.8.8.8",
        UNICAST_WAN,
    ),
]

RULE_CASES = [
    Case(
        "to table 100",
        MAIN + T100,
        rules_with(rule(100, table=100)),
        "8.8.8.8",
        ("unicast", "lte", "100.64.0.1"),
    ),
    Case(
        "rules by priority, not list order",
        MAIN + T100 + (R("0.0.0.0/0", LAN, "192.168.1.9", table=101),),
        rules_with(rule(200, table=101), rule(100, table=100)),
        "8.8.8.8",
        ("unicast", "lte", "100.64.0.1"),
    ),
    Case(
        "equal priority keeps dump order",
        MAIN + T100 + (R("0.0.0.0/0", LAN, "192.168.1.9", table=101),),
        rules_with(rule(100, table=101), rule(100, table=100)),
        "8.8.8.8",
        ("unicast", "lan", "192.168.1.9"),
    ),
    Case("empty table: next rule", MAIN, rules_with(rule(100, table=100)), "8.8.8.8", UNICAST_WAN),
    Case("table 0 is main", MAIN, (rule(5, table=0),), "8.8.8.8", UNICAST_WAN),
    Case(
        "from matches",
        MAIN + T100,
        rules_with(rule(100, src="192.168.1.0/24", table=100)),
        "8.8.8.8",
        ("unicast", "lte", "100.64.0.1"),
        (("src", "192.168.1.7"), ("iifname", "lan")),
    ),
    Case(
        "from does not match",
        MAIN + T100,
        rules_with(rule(100, src="192.168.1.0/24", table=100)),
        "8.8.8.8",
        UNICAST_WAN,
        (("src", "192.168.2.7"), ("iifname", "lan")),
    ),
    Case(
        "from with no source is 0.0.0.0",
        MAIN + T100,
        rules_with(rule(100, src="192.168.1.0/24", table=100)),
        "8.8.8.8",
        UNICAST_WAN,
    ),
    Case(
        "to matches",
        MAIN + T100,
        rules_with(rule(100, dst="8.8.0.0/16", table=100)),
        "8.8.8.8",
        ("unicast", "lte", "100.64.0.1"),
    ),
    Case(
        "to does not match",
        MAIN + T100,
        rules_with(rule(100, dst="8.8.0.0/16", table=100)),
        "9.9.9.9",
        UNICAST_WAN,
    ),
    Case(
        "not to",
        MAIN + T100,
        rules_with(rule(100, dst="8.8.0.0/16", table=100, invert=True)),
        "9.9.9.9",
        ("unicast", "lte", "100.64.0.1"),
    ),
    Case(
        "iif matches input",
        MAIN + T100,
        rules_with(rule(100, iifname="lan", table=100)),
        "8.8.8.8",
        ("unicast", "lte", "100.64.0.1"),
        (("iifname", "lan"),),
    ),
    Case(
        "iif: other input",
        MAIN + T100,
        rules_with(rule(100, iifname="lan", table=100)),
        "8.8.8.8",
        UNICAST_WAN,
        (("iifname", "wan"),),
    ),
    Case(
        "iif lo matches locally generated",
        MAIN + T100,
        rules_with(rule(100, iifname="lo", table=100)),
        "8.8.8.8",
        ("unicast", "lte", "100.64.0.1"),
    ),
    Case(
        "iif of a missing link never matches",
        MAIN + T100,
        rules_with(rule(100, iifname="gone0", table=100, invert=False)),
        "8.8.8.8",
        UNICAST_WAN,
        (("iifname", "gone0"),),
    ),
    Case(
        "oif matches a bound lookup",
        MAIN + T100,
        rules_with(rule(100, oifname="lte", table=100)),
        "8.8.8.8",
        ("unicast", "lte", "100.64.0.1"),
        (("oifname", "lte"),),
    ),
    Case(
        "oif never matches forwarding",
        MAIN + T100,
        rules_with(rule(100, oifname="lte", table=100)),
        "8.8.8.8",
        UNICAST_WAN,
        (("iifname", "lan"),),
    ),
    Case(
        "fwmark exact",
        MAIN + T100,
        rules_with(rule(100, fwmark=5, table=100)),
        "8.8.8.8",
        ("unicast", "lte", "100.64.0.1"),
        (("mark", 5),),
    ),
    Case(
        "fwmark exact, other mark",
        MAIN + T100,
        rules_with(rule(100, fwmark=5, table=100)),
        "8.8.8.8",
        UNICAST_WAN,
        (("mark", 0x105),),
    ),
    Case(
        "fwmark with mask",
        MAIN + T100,
        rules_with(rule(100, fwmark=5, fwmask=0xFF, table=100)),
        "8.8.8.8",
        ("unicast", "lte", "100.64.0.1"),
        (("mark", 0x105),),
    ),
    Case(
        "fwmark, unknown mark",
        MAIN + T100,
        rules_with(rule(100, fwmark=5, table=100)),
        "8.8.8.8",
        "unknown: rule 100: from all fwmark 0x5 lookup 100: selector fwmark needs the packet mark, which is unknown",
        (("mark", None),),
    ),
    Case(
        "fwmark 0 without mask matches any mark",
        MAIN + T100,
        rules_with(rule(100, fwmark=0, table=100)),
        "8.8.8.8",
        ("unicast", "lte", "100.64.0.1"),
        (("mark", None),),
    ),
    Case(
        "false selector beats unknown mark",
        MAIN + T100,
        rules_with(rule(100, fwmark=5, dst="1.0.0.0/8", table=100)),
        "8.8.8.8",
        UNICAST_WAN,
        (("mark", None),),
    ),
    Case(
        "tos rule",
        MAIN + T100,
        rules_with(rule(100, tos=0x10, table=100)),
        "8.8.8.8",
        ("unicast", "lte", "100.64.0.1"),
        (("tos", 0x10),),
    ),
    Case(
        "tos rule, other tos",
        MAIN + T100,
        rules_with(rule(100, tos=0x10, table=100)),
        "8.8.8.8",
        UNICAST_WAN,
        (("tos", 0x08),),
    ),
    Case(
        "not fwmark",
        MAIN + T100,
        rules_with(rule(100, fwmark=5, table=100, invert=True)),
        "8.8.8.8",
        ("unicast", "lte", "100.64.0.1"),
        (("mark", 6),),
    ),
    Case(
        "unmodelled selector",
        MAIN + T100,
        rules_with(rule(100, table=100, unmodelled=("ipproto",))),
        "8.8.8.8",
        "unknown: rule 100: from all lookup 100: selector ipproto is not modelled",
    ),
    Case(
        "unmodelled selector on a rule that cannot match",
        MAIN + T100,
        rules_with(rule(100, dst="1.0.0.0/8", table=100, unmodelled=("dport",))),
        "8.8.8.8",
        UNICAST_WAN,
    ),
    Case(
        "goto skips rules",
        MAIN + T100 + (R("0.0.0.0/0", LAN, "192.168.1.9", table=101),),
        rules_with(rule(100, action=RuleAction.GOTO, goto=300), rule(200, table=101), rule(300, table=100)),
        "8.8.8.8",
        ("unicast", "lte", "100.64.0.1"),
    ),
    Case(
        "goto target is tested, then the walk goes on",
        MAIN + T100 + (R("0.0.0.0/0", LAN, "192.168.1.9", table=101),),
        rules_with(
            rule(100, action=RuleAction.GOTO, goto=300), rule(200, table=101), rule(300, fwmark=9, table=100)
        ),
        "8.8.8.8",
        UNICAST_WAN,
    ),
    Case(
        "unresolved goto is a no-op",
        MAIN + T100,
        rules_with(rule(100, action=RuleAction.GOTO, goto=150), rule(200, table=100)),
        "8.8.8.8",
        ("unicast", "lte", "100.64.0.1"),
    ),
    Case(
        "nop continues",
        MAIN + T100,
        rules_with(rule(100, action=RuleAction.NOP), rule(200, table=100)),
        "8.8.8.8",
        ("unicast", "lte", "100.64.0.1"),
    ),
    Case(
        "rule blackhole",
        MAIN,
        rules_with(rule(100, action=RuleAction.BLACKHOLE)),
        "8.8.8.8",
        ("blackhole", None, None),
    ),
    Case(
        "rule unreachable",
        MAIN,
        rules_with(rule(100, action=RuleAction.UNREACHABLE)),
        "8.8.8.8",
        ("unreachable", None, None),
    ),
    Case(
        "rule prohibit",
        MAIN,
        rules_with(rule(100, action=RuleAction.PROHIBIT)),
        "8.8.8.8",
        ("prohibit", None, None),
    ),
    Case(
        "throw goes on with the next rule",
        (*MAIN, R("8.0.0.0/8", type=RouteType.THROW, table=100), *T100),
        rules_with(rule(100, table=100)),
        "8.8.8.8",
        UNICAST_WAN,
    ),
    Case(
        "throw does not fall back to a shorter prefix of its table",
        (*MAIN, R("8.8.0.0/16", type=RouteType.THROW, table=100), R("8.0.0.0/8", LAN, table=100)),
        rules_with(rule(100, table=100)),
        "8.8.8.8",
        UNICAST_WAN,
    ),
    Case(
        "suppress_prefixlength 0 refuses the default route",
        MAIN + T100,
        (rule(0, table=TABLE_LOCAL), rule(100, table=TABLE_MAIN, suppress_prefixlen=0), rule(200, table=100)),
        "8.8.8.8",
        ("unicast", "lte", "100.64.0.1"),
    ),
    Case(
        "suppress_prefixlength 0 keeps a specific route",
        MAIN + T100,
        (rule(0, table=TABLE_LOCAL), rule(100, table=TABLE_MAIN, suppress_prefixlen=0), rule(200, table=100)),
        "192.168.1.7",
        ("unicast", "lan", None),
    ),
    Case(
        "suppression does not apply to reject routes",
        (*MAIN, R("0.0.0.0/0", type=RouteType.BLACKHOLE, table=100)),
        (rule(0, table=TABLE_LOCAL), rule(100, table=100, suppress_prefixlen=0), rule(200, table=TABLE_MAIN)),
        "8.8.8.8",
        ("blackhole", None, None),
    ),
    Case(
        "suppress_ifgroup is unknown",
        MAIN,
        (rule(0, table=TABLE_LOCAL), rule(100, table=TABLE_MAIN, suppress_ifgroup=3)),
        "8.8.8.8",
        "unknown: rule 100: from all lookup main: selector suppress_ifgroup needs link groups, which are not modelled",
    ),
]


@pytest.mark.parametrize("case", ROUTE_CASES + RULE_CASES, ids=lambda c: c.name)
def test_lookup(case: Case) -> None:
    assert case.run() == case.expect


def test_default_rules_apply_per_family() -> None:
    # Only IPv4 rules in the topology: IPv6 still gets local and main.
    f = fib((*MAIN, R("::/0", LAN, "fd00:1::9"), *T100), (rule(100, table=100), rule(0, table=TABLE_LOCAL)))
    assert summary(f.lookup(ip("2001:db8::1"))) == ("unicast", "lan", "fd00:1::9")
    assert summary(f.lookup(ip("8.8.8.8"))) == ("unicast", "lte", "100.64.0.1")


def test_a_from_rule_needs_a_source_in_ipv6_and_compares_zero_in_ipv4() -> None:
    # fib6_rule_match: a rule with a source prefix is skipped by a lookup without a source (no
    # RT6_LOOKUP_F_HAS_SADDR), even a prefix holding ::. fib4_rule_match compares the source 0.
    # (The kernel agrees: tests/netns/test_fib6_rules_kernel.py.)
    t100 = (R("::/0", WAN, "fe80::7", table=100), *T100)
    rules = (
        rule(0, table=TABLE_LOCAL, family=AF_INET6),
        rule(100, src="::/1", table=100, family=AF_INET6),
        rule(32766, table=TABLE_MAIN, family=AF_INET6),
        *rules_with(rule(100, src="0.0.0.0/1", table=100)),
    )
    f = fib((*MAIN, R("::/0", LAN, "fd00:1::9"), *t100), rules)
    assert summary(f.lookup(ip("2001:db8::1"))) == ("unicast", "lan", "fd00:1::9")
    assert summary(f.lookup(ip("2001:db8::1"), src=ip("2001:db8:2::5"))) == ("unicast", "wan", "fe80::7")
    assert summary(f.lookup(ip("2001:db8::1"), src=ip("8000::1"))) == ("unicast", "lan", "fd00:1::9")
    assert summary(f.lookup(ip("8.8.8.8"))) == ("unicast", "lte", "100.64.0.1")


def test_ipv6_equal_metric_routes_are_alternatives() -> None:
    f = fib(
        (R("2001:db8:9::/48", LAN, "fd00:1::9", metric=256), R("2001:db8:9::/48", WAN, "fe80::7", metric=256))
    )
    assert summary(f.lookup(ip("2001:db8:9::1"))) == [
        ("unicast", "lan", "fd00:1::9"),
        ("unicast", "wan", "fe80::7"),
    ]


def test_resolution_names_rule_and_route() -> None:
    f = fib(MAIN + T100, rules_with(rule(100, fwmark=5, table=100)))
    res = f.resolve(ip("8.8.8.8"), mark=5)
    assert res.rule is not None and res.rule.priority == 100
    assert res.route == T100[0]
    (egress,) = res.egresses  # type: ignore[misc]
    assert egress.route == "default via 100.64.0.1 dev lte table 100"
    main = f.resolve(ip("8.8.8.8"))
    assert main.egresses[0].route == "default via 203.0.113.1 dev wan table main"  # type: ignore[index]


# -- own_route: a class's egress worded for another flow of the class -------------------------
#
# The main table below holds three routes via one gateway that differ only by their prefix, one
# via another gateway, and table 100 holds the same content as the main default under other
# prefixes. Expectations written from `ip route get` semantics: the longest prefix holding the
# address whose route is the egress's route but for its prefix.
OWN = (
    R("0.0.0.0/0", WAN, "203.0.113.1"),
    R("8.0.0.0/8", WAN, "203.0.113.1"),
    R("8.8.0.0/16", WAN, "203.0.113.1"),
    R("8.8.8.0/24", WAN, "198.51.100.1"),  # other gateway: never a way to word the default
    R("8.8.4.0/24", WAN, "203.0.113.1", metric=5),  # other metric: not the same route
    R("192.168.1.0/24", LAN),
    R("0.0.0.0/0", WAN, "203.0.113.1", table=100),
    R("9.0.0.0/8", WAN, "203.0.113.1", table=100),
)


def own_words(egress: Egress) -> tuple[str, str | None]:
    return egress.route, None if egress.prefix is None else str(egress.prefix)


@pytest.mark.parametrize(("named", "dst", "also", "expect"), [
    # The class's first flow went to 8.1.2.3 (8.0.0.0/8); this one goes to 192.0.2.70: the default.
    ("8.0.0.0/8", "192.0.2.70", (), ("default via 203.0.113.1 dev wan table main", "0.0.0.0/0")),
    ("0.0.0.0/0", "8.9.1.1", (), ("8.0.0.0/8 via 203.0.113.1 dev wan table main", "8.0.0.0/8")),
    ("0.0.0.0/0", "8.8.9.9", (), ("8.8.0.0/16 via 203.0.113.1 dev wan table main", "8.8.0.0/16")),
    # A longer prefix with another gateway or metric is passed over: 8.8.0.0/16 is the narrowest alike.
    ("0.0.0.0/0", "8.8.8.8", (), ("8.8.0.0/16 via 203.0.113.1 dev wan table main", "8.8.0.0/16")),
    ("0.0.0.0/0", "8.8.4.4", (), ("8.8.0.0/16 via 203.0.113.1 dev wan table main", "8.8.0.0/16")),
    # Already the flow's own route: kept.
    ("8.0.0.0/8", "8.200.0.1", (), ("8.0.0.0/8 via 203.0.113.1 dev wan table main", "8.0.0.0/8")),
    # Another destination the flow may be routed to (a fixed DNAT address) is carried by it: kept.
    ("8.0.0.0/8", "192.0.2.70", ("8.1.1.1",), ("8.0.0.0/8 via 203.0.113.1 dev wan table main", "8.0.0.0/8")),
    # Other destinations not carried by it do not keep it.
    ("8.0.0.0/8", "192.0.2.70", ("9.1.1.1",), ("default via 203.0.113.1 dev wan table main", "0.0.0.0/0")),
])  # fmt: skip
def test_own_route_names_the_route_that_carries_the_flow(named: str, dst: str, also: tuple[str, ...],
                                                         expect: tuple[str, str]) -> None:  # fmt: skip
    f = fib(OWN)
    (egress,) = f.lookup(ip("192.0.2.1" if named == "0.0.0.0/0" else named.partition("/")[0]))  # type: ignore[misc]
    assert str(egress.prefix) == named
    worded = f.own_route(egress, ip(dst), also=tuple(ip(a) for a in also))
    assert own_words(worded) == expect
    # Only words change.
    assert (worded.kind, worded.oif, worded.gateway, worded.masquerade_source, worded.xfrm) == (
        egress.kind, egress.oif, egress.gateway, egress.masquerade_source, egress.xfrm)


def test_own_route_stays_in_the_egress_routes_table() -> None:
    f = fib(OWN, rules_with(rule(100, fwmark=5, table=100)))
    (egress,) = f.lookup(ip("8.1.1.1"), mark=5)  # type: ignore[misc]
    assert own_words(egress) == ("default via 203.0.113.1 dev wan table 100", "0.0.0.0/0")
    # Main's 8.0.0.0/8 is alike but for its table: table 100's 9.0.0.0/8 is the one for 9.1.1.1.
    assert own_words(f.own_route(egress, ip("9.1.1.1"))) == ("9.0.0.0/8 via 203.0.113.1 dev wan table 100",
                                                             "9.0.0.0/8")  # fmt: skip
    assert f.own_route(egress, ip("8.8.8.8")) is egress


def test_own_route_leaves_what_it_cannot_place() -> None:
    f = fib(OWN)
    (egress,) = f.lookup(ip("8.1.1.1"))  # type: ignore[misc]
    assert f.own_route(egress, ip("2001:db8::1")) is egress  # another family
    unplaced = Egress(EgressKind.UNICAST, WAN, "wan", ip("203.0.113.1"), route="on link via wan (lookup failed)")
    assert f.own_route(unplaced, ip("192.0.2.70")) is unplaced  # no prefix: no route answered
    foreign = Egress(EgressKind.UNICAST, WAN, "wan", ip("203.0.113.1"), route="10.0.0.0/8 via 203.0.113.1 dev wan",
                     prefix=ip_network("10.0.0.0/8"))  # fmt: skip
    assert f.own_route(foreign, ip("192.0.2.70")) is foreign  # names no route of this FIB
    (lan,) = f.lookup(ip("192.168.1.9"))  # type: ignore[misc]
    assert f.own_route(lan, ip("8.8.8.8")) is lan  # no route alike holds it


def test_lookup_refuses_mixed_families() -> None:
    with pytest.raises(ValueError, match="mixes address families"):
        fib().lookup(ip("8.8.8.8"), src=ip("::1"))


# -- MASQUERADE source -------------------------------------------------------------------

MASQ_CASES = [
    (
        "gateway in the second primary's subnet",
        R("0.0.0.0/0", WAN, "198.51.100.1"),
        "8.8.8.8",
        "198.51.100.7",
    ),
    ("gateway in the first primary's subnet", R("0.0.0.0/0", WAN, "203.0.113.1"), "8.8.8.8", "203.0.113.5"),
    (
        "gateway in no subnet: first primary, not secondary or link scope",
        R("0.0.0.0/0", WAN, "192.0.2.1"),
        "8.8.8.8",
        "203.0.113.5",
    ),
    ("no gateway: the destination is the nexthop", R("198.51.100.0/24", WAN), "198.51.100.9", "198.51.100.7"),
    (
        "prefsrc is ignored",
        R("0.0.0.0/0", WAN, "198.51.100.1", prefsrc="203.0.113.5"),
        "8.8.8.8",
        "198.51.100.7",
    ),
    ("point-to-point peer", R("0.0.0.0/0", LTE, "100.64.0.1"), "8.8.8.8", "100.64.0.2"),
    (
        "no address on oif: another link's primary, lo's host scope skipped",
        R("0.0.0.0/0", NOCARRIER),
        "8.8.8.8",
        "203.0.113.5",
    ),
    ("vrf slave without address: the vrf's", R("0.0.0.0/0", VPN), "8.8.8.8", "10.200.0.1"),
    (
        "ipv6: global, non-tentative, non-deprecated",
        R("::/0", WAN, "fe80::1"),
        "2001:db8:77::1",
        "2001:db8:2::5",
    ),
    ("ipv6: link-local destination takes link-local", R("fe80::/64", LAN), "fe80::99", "fe80::1"),
]


@pytest.mark.parametrize(("name", "route", "dst", "expect"), MASQ_CASES, ids=[c[0] for c in MASQ_CASES])
def test_masquerade_source(name: str, route: Route, dst: str, expect: str) -> None:
    (egress,) = fib((route,)).lookup(ip(dst))  # type: ignore[misc]
    assert str(egress.masquerade_source) == expect, name


def test_masquerade_none_without_any_address() -> None:
    f = fib((R("0.0.0.0/0", WAN, "203.0.113.1"),), addresses=(A(LO, "127.0.0.1/8", scope=SCOPE_HOST),))
    (egress,) = f.lookup(ip("8.8.8.8"))  # type: ignore[misc]
    assert egress.masquerade_source is None


def test_masquerade_order_decides_between_primaries() -> None:
    first = (A(WAN, "198.51.100.7/24"), A(WAN, "203.0.113.5/24"))
    for addresses, expect in ((first, "198.51.100.7"), (first[::-1], "203.0.113.5")):
        f = fib((R("0.0.0.0/0", WAN, "192.0.2.1"),), addresses=addresses)
        assert str(f.lookup(ip("8.8.8.8"))[0].masquerade_source) == expect  # type: ignore[index]


# -- ingress, egress, is_local, REDIRECT ------------------------------------------------


def flow(src: str, dst: str, mark: int | None = 0) -> Flow:
    s, d = ip(src), ip(dst)
    return Flow(AF_INET if s.version == 4 else AF_INET6, 17, s, d, 1000, 53, packet_mark=mark)


def test_ingress_local_source() -> None:
    assert fib().ingress(flow("192.168.1.1", "8.8.8.8")) == Ingress(LO, "lo", local=True)


def test_ingress_reverse_path() -> None:
    assert fib().ingress(flow("192.168.1.50", "8.8.8.8")) == Ingress(LAN, "lan")
    assert fib().ingress(flow("8.8.8.8", "192.168.1.50")) == Ingress(WAN, "wan")


def test_ingress_reverse_path_follows_rules_as_locally_generated() -> None:
    f = fib(MAIN + T100, rules_with(rule(100, iifname="lo", dst="8.8.0.0/16", table=100)))
    assert f.ingress(flow("8.8.8.8", "192.168.1.50")) == Ingress(LTE, "lte")


@pytest.mark.parametrize(
    ("routes", "rules", "mark", "reason"),
    [
        (
            (*MAIN, R("10.0.0.0/8", nhs=((WAN, "203.0.113.1"), (LAN, "192.168.1.9")))),
            (),
            0,
            "the reverse path of the source is multipath (dev wan, dev lan)",
        ),
        ((R("10.0.0.0/8", type=RouteType.UNREACHABLE),), (), 0, "no reverse path to the source: unreachable"),
        (MAIN, rules_with(rule(100, fwmark=1, table=100)), None, "the reverse path of the source: rule 100"),
    ],
)
def test_ingress_unknown(
    routes: tuple[Route, ...], rules: tuple[PolicyRule, ...], mark: int | None, reason: str
) -> None:
    answer = fib(routes, rules).ingress(flow("10.1.1.1", "8.8.8.8", mark))
    assert isinstance(answer, Unknown)
    assert answer.reason.startswith(reason)


def test_ingress_multipath_on_one_link_is_known() -> None:
    f = fib((*MAIN, R("10.0.0.0/8", nhs=((LAN, "192.168.1.8"), (LAN, "192.168.1.9")))))
    assert f.ingress(flow("10.1.1.1", "8.8.8.8")) == Ingress(LAN, "lan")


def test_egress_forwarded_uses_input_interface() -> None:
    f = fib(MAIN + T100, rules_with(rule(100, iifname="lan", table=100)))
    forwarded = flow("192.168.1.50", "8.8.8.8")
    assert summary(f.egress(forwarded, Ingress(LAN, "lan"))) == ("unicast", "lte", "100.64.0.1")
    local = flow("192.168.1.1", "8.8.8.8")
    assert summary(f.egress(local, Ingress(LO, "lo", local=True))) == UNICAST_WAN


def test_egress_tos_is_unknown() -> None:
    f = fib(MAIN + T100, rules_with(rule(100, tos=0x10, table=100)))
    answer = f.egress(flow("192.168.1.50", "8.8.8.8"), Ingress(LAN, "lan"))
    assert isinstance(answer, Unknown) and "selector tos" in answer.reason


def test_is_local() -> None:
    anyip = R("10.99.0.0/24", LO, table=TABLE_LOCAL, type=RouteType.LOCAL)
    f = fib((*MAIN, anyip, R("10.98.0.0/24", LO, table=100, type=RouteType.LOCAL)))
    assert f.is_local(ip("192.168.1.1"))  # an address (the dump has no local route for it here)
    assert f.is_local(ip("10.99.0.42"))  # a local route, no address
    assert not f.is_local(ip("10.98.0.42"))  # a local route outside the local table
    assert not f.is_local(ip("192.168.1.2"))
    assert f.is_local(ip("fd00:1::1"))


def test_local_routes_of_a_down_link_still_answer() -> None:
    local = R("10.5.0.1/32", DEAD, table=TABLE_LOCAL, type=RouteType.LOCAL)
    assert summary(fib((*MAIN, local)).lookup(ip("10.5.0.1"))) == ("local", "lo", None)


@pytest.mark.parametrize(
    ("family", "ingress", "dst", "expect"),
    [
        (AF_INET, Ingress(WAN, "wan"), None, "169.254.9.9"),  # the head of the list, whatever its scope
        (AF_INET, Ingress(LAN, "lan"), None, "192.168.1.1"),
        (AF_INET, Ingress(DEAD, "dead"), None, None),
        (AF_INET, Ingress(LO, "lo", local=True), None, "127.0.0.1"),
        (AF_INET6, Ingress(LO, "lo", local=True), None, "::1"),
        (AF_INET6, Ingress(WAN, "wan"), None, "2001:db8:1::5"),  # the tentative one is skipped
        (AF_INET6, Ingress(LAN, "lan"), "fe80::9", "fe80::1"),  # same scope as the destination
        (AF_INET6, Ingress(LAN, "lan"), "2001:db8::9", "fd00:1::1"),
    ],
)
def test_redirect_address(family: int, ingress: Ingress, dst: str | None, expect: str | None) -> None:
    got = fib().redirect_address(family, ingress, ip(dst) if dst else None)
    assert (str(got) if got else None) == expect


# -- properties against independent oracles ----------------------------------------------

UP_LINKS = (WAN, LAN, LTE)
TYPES = (RouteType.UNICAST, RouteType.UNICAST, RouteType.UNICAST, RouteType.BLACKHOLE, RouteType.THROW)


@st.composite
def route_sets(draw: st.DrawFn) -> list[Route]:
    """Routes in one table over a small space, so prefixes nest and collide."""
    routes = []
    seen = set()
    for _ in range(draw(st.integers(1, 14))):
        plen = draw(st.integers(0, 8))
        base = draw(st.integers(0, 255)) << 24
        dst = IPv4Network((base, plen), strict=False)
        metric = draw(st.sampled_from([0, 1, 5]))
        if (dst, metric) in seen:
            continue
        seen.add((dst, metric))
        kind = draw(st.sampled_from(TYPES))
        nexthops = (Nexthop(draw(st.sampled_from((*UP_LINKS, DEAD)))),) if kind == RouteType.UNICAST else ()
        routes.append(Route(dst, 100, kind, nexthops, metric))
    return routes


def brute_force(routes: list[Route], dst: IPv4Address) -> Route | None:
    """The first usable route by (longest prefix, lowest metric, list order); None: no answer here."""
    ordered = sorted(
        (r for r in routes if dst in r.dst), key=lambda r: (-r.dst.prefixlen, r.metric, routes.index(r))
    )
    for r in ordered:
        if r.type != RouteType.UNICAST or any(nh.oif != DEAD for nh in r.nexthops):
            return r
    return None


@settings(max_examples=300, deadline=None)
@given(route_sets(), st.integers(0, 2**32 - 1))
def test_longest_prefix_matches_brute_force(routes: list[Route], dst_int: int) -> None:
    dst = IPv4Address(dst_int)
    assume(not dst.is_multicast and dst != IPv4Address("255.255.255.255"))  # unknown by design
    f = Fib(Topology(LINKS, (), tuple(routes), (rule(10, table=100), rule(20, table=TABLE_MAIN))))
    res = f.resolve(dst)
    expected = brute_force(routes, dst)
    if expected is None or expected.type == RouteType.THROW:
        # Nothing in table 100 decides; main is empty: no route.
        assert res.route is None
        assert summary(res.egresses) == ("unreachable", None, None)
    else:
        assert res.route == expected


@st.composite
def marked_rule_sets(draw: st.DrawFn) -> tuple[PolicyRule, ...]:
    rules = [rule(0, table=TABLE_LOCAL)]
    for prio in sorted(draw(st.sets(st.integers(1, 50), max_size=6))):
        kw: dict[str, Any] = {"table": draw(st.sampled_from([100, 101, TABLE_MAIN]))}
        if draw(st.booleans()):
            kw["fwmark"] = draw(st.sampled_from([0, 1, 5, 0x100]))
            kw["fwmask"] = draw(st.sampled_from([None, 0, 0xFF, 0x100]))
        if draw(st.booleans()):
            kw["dst"] = draw(st.sampled_from(["8.0.0.0/8", "9.0.0.0/8", "0.0.0.0/0"]))
        if draw(st.booleans()):
            kw["tos"] = 0x10
        kw["invert"] = draw(st.booleans())
        rules.append(rule(prio * 10, **kw))
    rules.append(rule(32766, table=TABLE_MAIN))
    return tuple(rules)


TABLES = (
    *MAIN,
    R("0.0.0.0/0", LTE, "100.64.0.1", table=100),
    R("8.0.0.0/8", type=RouteType.THROW, table=101),
    R("0.0.0.0/0", LAN, "192.168.1.9", table=101),
)


@settings(max_examples=300, deadline=None)
@given(marked_rule_sets(), st.sampled_from(["8.8.8.8", "9.9.9.9", "1.1.1.1"]))
def test_answers_with_unknown_mark_or_tos_hold_for_every_value(
    rules: tuple[PolicyRule, ...], dst: str
) -> None:
    f = fib(TABLES, rules)
    marks = (0, 1, 5, 0x105, 0x100)
    toses = (0, 0x10, 0x14)
    for mark_known, tos_known in ((False, True), (True, False), (False, False)):
        answer = f.lookup(ip(dst), mark=None if not mark_known else 5, tos=None if not tos_known else 0)
        if isinstance(answer, Unknown):
            continue
        for mark in marks if not mark_known else (5,):
            for tos in toses if not tos_known else (0,):
                assert f.lookup(ip(dst), mark=mark, tos=tos) == answer


@st.composite
def address_sets(draw: st.DrawFn) -> tuple[Address, ...]:
    out = []
    for _ in range(draw(st.integers(0, 5))):
        net = draw(st.sampled_from(["10.0.0.0", "10.0.1.0", "10.1.0.0"]))
        host = draw(st.integers(1, 200))
        plen = draw(st.sampled_from([16, 24]))
        addr = IPv4Address(int(IPv4Address(net)) + host)
        flags = draw(st.sampled_from([0, 0, IFA_F_SECONDARY]))
        scope = draw(st.sampled_from([0, 0, SCOPE_LINK, SCOPE_HOST]))
        out.append(Address(WAN, addr, plen, scope, flags))
    return tuple(out)


@settings(max_examples=300, deadline=None)
@given(address_sets(), st.integers(0, 2**16 - 1), st.booleans())
def test_masquerade_matches_brute_force(addresses: tuple[Address, ...], low: int, via: bool) -> None:
    nexthop = IPv4Address(int(IPv4Address("10.0.0.0")) + low)
    route = R("0.0.0.0/0", WAN, str(nexthop) if via else None)
    # LAN keeps one address: the fallback when WAN has no usable one.
    f = fib((route,), addresses=(*addresses, A(LAN, "192.168.1.1/24")))
    dst = IPv4Address("8.8.8.8")
    (egress,) = f.lookup(dst)  # type: ignore[misc]
    target = nexthop if via else dst
    usable = [a.address for a in addresses if not a.secondary and a.scope == 0]
    inside = [a.address for a in addresses if not a.secondary and a.scope == 0 and target in a.network]
    expected = (inside or usable or [IPv4Address("192.168.1.1")])[0]
    assert egress.masquerade_source == expected


def test_masquerade_source_public_helper() -> None:
    assert fib().masquerade_source(WAN, ip("198.51.100.1")) == ip("198.51.100.7")
    assert fib().masquerade_source(WAN, ip("2001:db8:2::1")) == IPv6Address("2001:db8:2::5")


# -- the seventh session's mutation run (issue 16): cases no test above read ------------------------
# Every expectation is written from the kernel's behaviour named in the docstring of each test.


def test_an_ipv4_lookup_without_a_source_is_from_0_0_0_0() -> None:
    """``ip route get`` without ``from``: the kernel's saddr is 0.0.0.0, which ``from 0.0.0.0/32`` holds."""
    f = fib(MAIN + T100, rules_with(rule(100, src="0.0.0.0/32", table=100)))
    assert summary(f.lookup(ip("8.8.8.8"))) == ("unicast", "lte", "100.64.0.1")
    assert summary(f.lookup(ip("8.8.8.8"), src=ip("192.168.1.1"))) == UNICAST_WAN


def test_a_failed_lookup_with_an_oif_is_sent_on_link_whole() -> None:
    """A locally generated IPv4 lookup bound to lan finds no route there (the default leaves by wan): the
    kernel sends it on link through lan; MASQUERADE takes lan's primary, 8.8.8.8 being in no subnet."""
    on_link = Egress(EgressKind.UNICAST, LAN, "lan", None, ip("192.168.1.1"), "on link via lan (lookup failed)")
    assert fib().resolve(ip("8.8.8.8"), oifname="lan") == Resolution((on_link,))
    blackhole = rule(100, action=RuleAction.BLACKHOLE)
    assert fib(MAIN, rules_with(blackhole)).resolve(ip("8.8.8.8"), oifname="lan") == Resolution((on_link,), blackhole)
    assert summary(fib().lookup(ip("8.8.8.8"), oifname="nosuch")) == ("unreachable", None, None)  # no such link


V6_TYPES = (
    R("2001:db8:9::/48", LAN, "fe80::9"),
    R("2001:db8:a::/48", type=RouteType.BLACKHOLE),
    R("2001:db8:b::/48", type=RouteType.UNREACHABLE),
    R("2001:db8:c::/48", type=RouteType.PROHIBIT),
    R("2001:db8:d::/48", type=RouteType.MULTICAST),
)


@pytest.mark.parametrize(("addr", "ifindex", "expected"), [
    ("fd00:1::1", None, RouteType.LOCAL),  # lan's own address
    ("fd00:1::1", LAN, RouteType.LOCAL),
    # Ours, but not wan's: the route to it is lo's local route, a kind nft's type does not name here.
    ("fd00:1::1", WAN, "the address type of fd00:1::1 is not modelled here"),
    ("2001:db8:9::1", None, RouteType.UNICAST),
    ("2001:db8:9::1", WAN, RouteType.UNICAST),
    ("2001:db8:a::1", None, RouteType.BLACKHOLE),
    ("2001:db8:b::1", None, RouteType.UNREACHABLE),
    ("2001:db8:c::1", None, RouteType.PROHIBIT),
    ("2001:db8:e::1", None, RouteType.UNREACHABLE),  # no route at all
    ("2001:db8:d::1", None, "route multicast 2001:db8:d::/48 table main: type multicast is not modelled"),
    ("ff02::1", None, RouteType.MULTICAST),  # by address
])  # fmt: skip
def test_ipv6_address_type(addr: str, ifindex: int | None, expected: RouteType | str) -> None:
    got = fib(V6_TYPES).address_type(ip(addr), ifindex)
    assert (got.reason if isinstance(got, Unknown) else got) == expected


def test_own_route_words_ipv6_routes_after_ipv4_tables() -> None:
    """The IPv6 main table comes after IPv4's in the FIB's tables: its routes are found all the same."""
    f = fib((*MAIN, R("::/0", WAN, "fe80::1"), R("2001:db8:100::/40", WAN, "fe80::1")))
    (egress,) = f.lookup(ip("2001:db8:100::1"))  # type: ignore[misc]
    assert own_words(egress) == ("2001:db8:100::/40 via fe80::1 dev wan table main", "2001:db8:100::/40")
    assert own_words(f.own_route(egress, ip("2001:db8:ff::1"))) == ("default via fe80::1 dev wan table main", "::/0")
    # 2001:db8:1ff:ffff:: is the /40's last /64 (2001:0db8:01|ff: the /40 ends at bit 40).
    (default,) = f.lookup(ip("2001:db8:ff::1"))  # type: ignore[misc]
    assert own_words(f.own_route(default, ip("2001:db8:1ff:ffff::1"))) == (
        "2001:db8:100::/40 via fe80::1 dev wan table main", "2001:db8:100::/40")
    assert f.own_route(default, ip("2001:db8:200::1")) is default  # just past it: the default already


EVERY_UP = ["wan", "lan", "lte", "nocarrier", "blue", "vpn"]  # up, but lo
OFF, STRICT = "rp_filter 0 (off)", "rp_filter 1 (strict)"


@pytest.mark.parametrize(("netconf", "expected", "why"), [
    # ``default`` is what an interface not listed was created with: strict here, so lan only.
    ((Netconf("all", 0), Netconf("default", 1)), ["lan"], STRICT),
    # No ``all``: an interface's own (or default) value alone.
    ((Netconf("default", 0),), EVERY_UP, OFF),
    ((Netconf("default", 1),), ["lan"], STRICT),
    # Neither an interface's own nor ``default``: 0, the kernel's own default.
    ((Netconf("all", 0),), EVERY_UP, OFF),
    # wan and lte off by their own; lan and the rest strict by default: of those, lan only.
    ((Netconf("all", 0), Netconf("default", 1), Netconf("wan", 0), Netconf("lte", 0)), ["wan", "lan", "lte"],
     f"{OFF}, {STRICT}"),
])  # fmt: skip
def test_reverse_path_settings_of_interfaces_not_listed(
    netconf: tuple[Netconf, ...], expected: list[str], why: str
) -> None:
    """rp_filter from a 192.168.1.50 source (its reverse path is lan), per the netconf entries present."""
    topology = Topology(LINKS, ADDRESSES, MAIN, (), netconf=netconf, netconf_known=True)
    got = Fib(topology).ingresses(flow("192.168.1.50", "8.8.8.8"))
    assert not isinstance(got, Unknown)
    assert ([i.ifname for i in got[0]], got[1]) == (expected, why)


def test_ipv6_ingresses_are_every_receiving_link_whole() -> None:
    """IPv6 has no rp_filter: every link that is up, but lo, in dump order (vrf devices too)."""
    topology = Topology(LINKS, ADDRESSES, MAIN, (), netconf=(Netconf("all", 1),), netconf_known=True)
    got = Fib(topology).ingresses(flow("2001:db8:9::1", "fd00:1::5"))
    assert got == ((Ingress(WAN, "wan"), Ingress(LAN, "lan"), Ingress(LTE, "lte"), Ingress(NOCARRIER, "nocarrier"),
                    Ingress(VRF, "blue"), Ingress(VPN, "vpn")), "IPv6 (no rp_filter)")  # fmt: skip


def v6_source(addresses: tuple[Address, ...], oif: int, dst: str, links: tuple[Link, ...] = LINKS) -> str | None:
    got = Fib(Topology(links, addresses, (), ())).masquerade_source(oif, ip(dst))
    return None if got is None else str(got)


def test_ipv6_source_prefers_the_destination_then_the_oif_then_the_label() -> None:
    """RFC 6724 rules 1, 5 and 6 before the longest prefix (rule 8), as ``ipv6_dev_get_saddr`` ranks them."""
    two = (A(LAN, "2001:db8:1::2/64"), A(LAN, "2001:db8:1::3/64"))
    assert v6_source(two, LAN, "2001:db8:1::3") == "2001:db8:1::3"  # rule 1: the destination itself
    assert v6_source(two, LAN, "2001:db8:1::9") == "2001:db8:1::2"  # equal: the first listed
    elsewhere = (A(WAN, "2001:db8:1::2/64"), A(LAN, "2001:db8:2::2/64"))
    assert v6_source(elsewhere, LAN, "2001:db8:1::9") == "2001:db8:2::2"  # rule 5 (oif) before the prefix
    # 2001:0:1::5 is in 2001::/32 (Teredo, label 6); 3fff::5 and the destination are under ::/0 (label 1).
    # The prefix alone would take 2001:0:1::5 (20 bits in common against 3): rule 6 takes 3fff::5.
    labelled = (A(LAN, "2001:0:1::5/64"), A(LAN, "3fff::5/64"))
    assert v6_source(labelled, LAN, "2001:db8:9::1") == "3fff::5"


def test_ipv6_source_candidates_by_destination_scope_and_l3_domain() -> None:
    """A link-local destination takes only the oif's addresses; any other, every link's of the oif's L3
    domain (a VRF's slaves, or the links in no VRF); a DAD-failed address never."""
    links = (Link(LO, "lo"), Link(WAN, "wan"), Link(LAN, "lan"), Link(VRF, "blue", kind="vrf"),
             Link(VPN, "vpn", master=VRF))  # fmt: skip
    addresses = (A(WAN, "2001:db8:1::2/64"), A(LAN, "fe80::9/64", scope=SCOPE_LINK), A(VPN, "2001:db8:2::1/64"))
    assert v6_source(addresses, WAN, "fe80::77", links) == "2001:db8:1::2"  # not lan's fe80::9
    assert v6_source(addresses, VPN, "2001:db8:9::1", links) == "2001:db8:2::1"  # the VRF's own
    # lan has no global address: wan's, not the VRF's, though the VRF's shares a longer prefix.
    assert v6_source(addresses, LAN, "2001:db8:2::9", links) == "2001:db8:1::2"
    failed = (A(LAN, "2001:db8:9::5/64", flags=IFA_F_DADFAILED), A(LAN, "2001:db8:1::2/64"))
    assert v6_source(failed, LAN, "2001:db8:9::10") == "2001:db8:1::2"


def test_ipv4_source_of_an_oif_without_address_outside_any_vrf() -> None:
    """``inet_select_addr`` on a link with no address: every link of its L3 domain; a bridge is no L3
    domain (only a VRF is), and a link the snapshot does not list is in none."""
    links = (*LINKS, Link(9, "br0", kind="bridge"), Link(10, "port", master=9))
    addresses = (*ADDRESSES, A(9, "192.168.9.1/24"))
    f = Fib(Topology(links, addresses, (), ()))
    assert f.masquerade_source(10, ip("8.8.8.8")) == ip("203.0.113.5")  # wan's first primary, before br0's
    assert f.masquerade_source(99, ip("8.8.8.8")) == ip("203.0.113.5")


def test_rules_naming_links_of_a_snapshot_without_them() -> None:
    """A topology without links (built by hand) cannot say a link is missing: the name is trusted; lo is
    always there, listed or not."""
    bare = Fib(Topology((), (), (*MAIN, *T100), rules_with(rule(100, iifname="eth0", table=100))))
    assert summary(bare.lookup(ip("8.8.8.8"), iifname="eth0")) == ("unicast", "if4", "100.64.0.1")
    no_lo = tuple(link for link in LINKS if link.name != "lo")
    f = fib((*MAIN, *T100), rules_with(rule(100, iifname="lo", table=100)), links=no_lo)
    assert summary(f.lookup(ip("8.8.8.8"))) == ("unicast", "lte", "100.64.0.1")  # locally generated: iif lo


def test_ipv6_equal_metric_alternatives_stop_at_another_metric_and_skip_dead_or_other_oifs() -> None:
    routes = (
        R("2001:db8:9::/48", LAN, "fe80::9", metric=256),
        R("2001:db8:9::/48", DEAD, "fe80::d", metric=256),  # its link is down
        R("2001:db8:9::/48", WAN, "fe80::7", metric=256),
        R("2001:db8:9::/48", LTE, "fe80::4", metric=512),  # another metric: not an alternative
        R("2001:db8:9::/48", WAN, "fe80::8", metric=512),
    )
    f = fib(routes)
    assert summary(f.lookup(ip("2001:db8:9::1"))) == [("unicast", "lan", "fe80::9"), ("unicast", "wan", "fe80::7")]
    wan = (R("2001:db8:9::/48", WAN, "fe80::7", metric=256), R("2001:db8:9::/48", LAN, "fe80::9", metric=256),
           R("2001:db8:9::/48", WAN, "fe80::8", metric=256))  # fmt: skip
    assert summary(fib(wan).lookup(ip("2001:db8:9::1"), oifname="wan")) == [
        ("unicast", "wan", "fe80::7"), ("unicast", "wan", "fe80::8")]  # fmt: skip


@pytest.mark.parametrize("goto", [50, 100])
def test_a_backward_goto_or_one_to_itself_is_unresolved(goto: int) -> None:
    """The kernel refuses a goto to its own priority or below; a snapshot holding one goes on with the next
    rule, as with an unresolved goto (never a loop)."""
    rules = rules_with(rule(50, fwmark=7, table=100), rule(100, action=RuleAction.GOTO, goto=goto))
    assert summary(fib((*MAIN, *T100), rules).lookup(ip("8.8.8.8"))) == UNICAST_WAN


def test_ipv4_address_type_reads_the_local_table_with_tos_0() -> None:
    """``inet_dev_addr_type`` looks the local table up with TOS 0: a local route with a TOS does not apply."""
    local_tos = R("192.0.2.0/24", LO, table=TABLE_LOCAL, type=RouteType.LOCAL, tos=0x10)
    assert fib((*MAIN, local_tos)).address_type(ip("192.0.2.5")) == RouteType.UNICAST
    local = R("192.0.2.0/24", LO, table=TABLE_LOCAL, type=RouteType.LOCAL)
    assert fib((*MAIN, local)).address_type(ip("192.0.2.5")) == RouteType.LOCAL


def test_a_redirect_skips_v4_mapped_addresses() -> None:
    """``nf_nat_redirect_ipv6``: a v4-mapped address is passed over, and the next usable one taken."""
    addresses = (A(LAN, "::ffff:192.0.2.1/96"), A(LAN, "fd00:1::1/64"))
    f = fib(addresses=addresses)
    assert f.redirect_address(AF_INET6, Ingress(LAN, "lan")) == ip("fd00:1::1")


def test_a_fib_over_a_route_change_is_carried_not_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where only main's routes changed along the kept topology's lineage, ``Fib(now, previous)`` carries
    the previous tables over (``_build_tables`` is not called), TOS routes first among a prefix's; a
    local-table route changed: built again (implied local routes go)."""
    live = LiveTopology.seed(Topology(LINKS, ADDRESSES, (*MAIN, R("10.0.0.0/8", LAN)), ()))
    assert live is not None
    first = Fib(live.snapshot())
    assert live.apply("route", True, R("192.0.2.1/32", LO, table=TABLE_LOCAL, type=RouteType.LOCAL), 0x400)
    local = Fib(live.snapshot(), first)
    assert summary(local.lookup(ip("8.8.8.8"))) == UNICAST_WAN
    assert summary(local.lookup(ip("192.0.2.1"))) == ("local", "lo", None)
    # A TOS route beside 10.0.0.0/8's (IPv4 keys a route by its TOS too).
    assert live.apply("route", True, R("10.0.0.0/8", WAN, tos=0x10), 0x400)
    now = live.snapshot()

    def built(self: Fib) -> None:
        raise AssertionError("the tables were built")

    monkeypatch.setattr(Fib, "_build_tables", built)
    carried = Fib(now, local)
    assert summary(carried.lookup(ip("10.1.1.1"), tos=0x10)) == ("unicast", "wan", None)
    assert summary(carried.lookup(ip("10.1.1.1"))) == ("unicast", "lan", None)


# Table 100 routes the LAN's 192.168.1.0/24 through lte: a rule that sends the reverse path there moves it.
LAN_VIA_LTE = (*MAIN, R("192.168.1.0/24", LTE, table=100), R("0.0.0.0/0", LTE, "100.64.0.1", table=100))


def test_the_reverse_path_reads_the_flows_destination_as_its_source_and_its_mark() -> None:
    """``fib_validate_source``: destination the flow's source, source the flow's destination, the mark
    as the packet has it, TOS unknown (conntrack does not keep it)."""
    back = flow("192.168.1.50", "8.8.8.8")
    by_src = fib(LAN_VIA_LTE, rules_with(rule(100, src="8.8.8.8/32", table=100)))
    assert by_src.ingress(back) == Ingress(LTE, "lte")
    known = Topology(LINKS, ADDRESSES, LAN_VIA_LTE, rules_with(rule(100, src="8.8.8.8/32", table=100)),
                     netconf=(Netconf("all", 1),), netconf_known=True)  # fmt: skip
    assert Fib(known).ingresses(back) == ((Ingress(LTE, "lte"),), STRICT)
    by_mark = fib(LAN_VIA_LTE, rules_with(rule(100, fwmark=5, table=100)))
    assert by_mark.ingress(flow("192.168.1.50", "8.8.8.8", mark=5)) == Ingress(LTE, "lte")
    assert by_mark.ingress(back) == Ingress(LAN, "lan")
    by_tos = rules_with(rule(100, tos=0x10, table=100))
    unknown = fib(LAN_VIA_LTE, by_tos).ingress(back)
    tos_unknown = "selector tos needs the packet's TOS, which is unknown"
    assert isinstance(unknown, Unknown) and unknown.reason.startswith("the reverse path of the source: rule ")
    assert unknown.reason.endswith(tos_unknown)
    known_tos = Fib(replace(known, rules=by_tos)).ingresses(back)
    assert isinstance(known_tos, Unknown) and known_tos.reason == unknown.reason


def test_the_forward_path_reads_the_flows_source() -> None:
    f = fib(LAN_VIA_LTE, rules_with(rule(100, src="192.168.1.50/32", table=100)))
    assert summary(f.egress(flow("192.168.1.50", "8.8.8.8"), Ingress(LAN, "lan"))) == ("unicast", "lte", "100.64.0.1")
    assert summary(f.egress(flow("192.168.1.51", "8.8.8.8"), Ingress(LAN, "lan"))) == UNICAST_WAN


def test_ingresses_say_why_without_netconf_or_from_our_own_address() -> None:
    assert fib().ingresses(flow("192.168.1.50", "8.8.8.8")) == ((Ingress(LAN, "lan"),), "reverse path")
    own = flow("192.168.1.1", "8.8.8.8")
    assert fib().ingresses(own) == ((Ingress(LO, "lo", local=True),), "locally generated")
    known = Fib(Topology(LINKS, ADDRESSES, MAIN, (), netconf=(Netconf("all", 1),), netconf_known=True))
    assert known.ingresses(own) == ((Ingress(LO, "lo", local=True),), "locally generated")


def test_a_family_whose_every_rule_reads_the_iif_keeps_the_name() -> None:
    """Rules with an iif each (no local or main rule left): the input interface picks the table."""
    rules = (rule(10, iifname="lan", table=100), rule(20, iifname="wan", table=TABLE_MAIN))
    f = fib((*MAIN, *T100), rules)
    assert summary(f.lookup(ip("8.8.8.8"), iifname="lan")) == ("unicast", "lte", "100.64.0.1")
    assert summary(f.lookup(ip("8.8.8.8"), iifname="wan")) == UNICAST_WAN
    assert summary(f.lookup(ip("8.8.8.8"), iifname="lte")) == ("unreachable", None, None)


def test_implied_local_routes_are_the_kernels_per_family() -> None:
    """Each usable address gets a host route in table local, scope host, src itself; lo's addresses their
    whole network too; IPv6 gets its own even where IPv4's local table is given; a tentative address none."""
    f = fib()
    assert f.resolve(ip("192.168.1.1")).route == Route(ip_network("192.168.1.1/32"), TABLE_LOCAL, RouteType.LOCAL,
                                                       (Nexthop(LAN),), scope=SCOPE_HOST, prefsrc=ip("192.168.1.1"))
    loopback = f.resolve(ip("127.0.0.5"))
    assert loopback.route == Route(ip_network("127.0.0.0/8"), TABLE_LOCAL, RouteType.LOCAL, (Nexthop(LO),),
                                   scope=SCOPE_HOST)  # fmt: skip
    assert loopback.egresses[0].route == "local 127.0.0.0/8 dev lo table local"  # type: ignore[index]
    assert summary(f.lookup(ip("fd00:1::1"))) == ("local", "lo", None)
    given_v4 = fib((*MAIN, R("::/0", WAN, "fe80::1"), R("192.0.2.1/32", LO, table=TABLE_LOCAL, type=RouteType.LOCAL)))
    assert summary(given_v4.lookup(ip("fd00:1::1"))) == ("local", "lo", None)
    # IPv4's local table is the one given: lan's address is routed as lan's subnet.
    assert summary(given_v4.lookup(ip("192.168.1.1"))) == ("unicast", "lan", None)
    assert summary(given_v4.lookup(ip("2001:db8::5"))) == ("unicast", "wan", "fe80::1")  # tentative: routed


def test_a_locally_generated_lookup_meets_every_equal_metric_gateway_default() -> None:
    """``fib_select_default``: only for output, only among gateway routes of the chosen one's metric, and
    only when the chosen one is a single gateway."""
    routes = (
        R("0.0.0.0/0", WAN, "203.0.113.1", metric=10),
        R("0.0.0.0/0", LAN, metric=10),  # no gateway: passed over
        R("0.0.0.0/0", LTE, "100.64.0.1", metric=10),
        R("0.0.0.0/0", LAN, "192.168.1.9", metric=20),  # another metric: not among them
    )
    both = [("unicast", "lte", "100.64.0.1"), UNICAST_WAN]
    f = fib(routes)
    assert summary(f.lookup(ip("8.8.8.8"))) == both
    assert summary(f.egress(flow("192.168.1.1", "8.8.8.8"), Ingress(LO, "lo", local=True))) == both
    assert summary(f.egress(flow("192.168.1.50", "8.8.8.8"), Ingress(LAN, "lan"))) == UNICAST_WAN  # forwarded
    multipath = (R("0.0.0.0/0", nhs=((WAN, "203.0.113.1"), (LAN, "192.168.1.9")), metric=10),
                 R("0.0.0.0/0", LTE, "100.64.0.1", metric=10))  # fmt: skip
    assert summary(fib(multipath).lookup(ip("8.8.8.8"))) == [("unicast", "lan", "192.168.1.9"), UNICAST_WAN]


def test_a_netfilter_reverse_path_drop_looks_up_with_mark_0_and_both_filters_must_pass() -> None:
    """``fib saddr . iif oif missing drop`` (no ``mark``): the reverse lookup's mark is 0. With rp_filter
    strict and src_valid_mark the sysctl's lookup takes the packet's mark: each filter pins its own
    interface, and a packet must pass both."""
    rules = rules_with(rule(100, fwmark=5, table=100))
    off = Fib(Topology(LINKS, ADDRESSES, LAN_VIA_LTE, rules, netconf=(Netconf("all", 0),), netconf_known=True))
    marked = flow("192.168.1.50", "8.8.8.8", mark=5)
    assert off.ingresses(marked, netfilter_rpf=True) == (
        (Ingress(LAN, "lan"),), "netfilter reverse-path drop, rp_filter 0 (off)")  # fmt: skip
    one = replace(off.topology, rules=rules_with(rule(100, fwmark=1, table=100)))  # the packet's mark is 1
    assert Fib(one).ingresses(flow("192.168.1.50", "8.8.8.8", mark=1), netfilter_rpf=True) == (
        (Ingress(LAN, "lan"),), "netfilter reverse-path drop, rp_filter 0 (off)")  # fmt: skip
    strict = Fib(Topology(LINKS, ADDRESSES, LAN_VIA_LTE, rules, netconf=(Netconf("all", 1, src_valid_mark=True),),
                          netconf_known=True))  # fmt: skip
    assert strict.ingresses(marked) == ((Ingress(LTE, "lte"),), STRICT)
    both = strict.ingresses(marked, netfilter_rpf=True)
    assert both == Unknown("no interface accepts a packet from the source (reverse-path filtering)")


def test_a_source_the_reverse_path_delivers_locally_is_locally_generated() -> None:
    """Table 100 holds a ``local`` route for 10.9.0.0/16 (no address of ours is in it): the reverse
    lookup of 10.9.0.5 answers local, so the flow came from this host."""
    routes = (*MAIN, R("10.9.0.0/16", LO, table=100, type=RouteType.LOCAL))
    topology = Topology(LINKS, ADDRESSES, routes, rules_with(rule(100, table=100)), netconf=(Netconf("all", 1),),
                        netconf_known=True)  # fmt: skip
    assert Fib(topology).ingresses(flow("10.9.0.5", "8.8.8.8")) == ((Ingress(LO, "lo", local=True),),
                                                                     "locally generated")  # fmt: skip


def test_a_local_answer_is_los_whole() -> None:
    f = fib()
    assert f.lookup(ip("192.168.1.1")) == (Egress(EgressKind.LOCAL, LO, "lo", route="local 192.168.1.1/32 dev lan table local",
                                                  prefix=ip_network("192.168.1.1/32")),)  # fmt: skip


def test_ipv4_source_of_an_oif_without_address_leaves_vrf_slaves_and_ipv6_out() -> None:
    """Outside any VRF, ``inet_select_addr`` walks the links outside every VRF, IPv4 addresses only."""
    links = (Link(LO, "lo"), Link(WAN, "wan"), Link(VRF, "blue", kind="vrf"), Link(VPN, "vpn", master=VRF))
    addresses = (A(LO, "127.0.0.1/8", scope=SCOPE_HOST), A(WAN, "2001:db8::1/64"), A(VPN, "10.8.0.2/24"))
    assert Fib(Topology(links, addresses, (), ())).masquerade_source(WAN, ip("8.8.8.8")) is None
    assert Fib(Topology(links, addresses, (), ())).masquerade_source(VPN, ip("8.8.8.8")) == ip("10.8.0.2")


def test_a_vrf_device_is_its_own_l3_domain() -> None:
    """``l3mdev_master_ifindex_rcu`` of a VRF device is its own index: outside every VRF, the VRF
    device's address is no candidate (``inet_select_addr``, ``ipv6_dev_get_saddr`` walk the oif's
    domain); the VRF's slaves take it, their domain's master first."""
    links = (Link(LO, "lo"), Link(WAN, "wan"), Link(VRF, "blue", kind="vrf"), Link(VPN, "vpn", master=VRF))
    addresses = (A(LO, "127.0.0.1/8", scope=SCOPE_HOST), A(VRF, "10.200.0.1/32"), A(VRF, "2001:db8:200::1/64"))
    f = Fib(Topology(links, addresses, (), ()))
    assert f.masquerade_source(WAN, ip("8.8.8.8")) is None
    assert f.masquerade_source(VPN, ip("8.8.8.8")) == ip("10.200.0.1")
    assert f.masquerade_source(VRF, ip("8.8.8.8")) == ip("10.200.0.1")
    assert v6_source(addresses, WAN, "2001:db8:9::1", links) is None
    assert v6_source(addresses, VPN, "2001:db8:9::1", links) == "2001:db8:200::1"


def test_unknown_selectors_say_what_is_unknown() -> None:
    f = fib((*MAIN, *T100), rules_with(rule(100, fwmark=5, table=100)))
    unknown = f.lookup(ip("8.8.8.8"), mark=None)
    assert isinstance(unknown, Unknown)
    assert unknown.reason.endswith(": selector fwmark needs the packet mark, which is unknown")


def test_suppress_ifgroup_minus_1_is_off() -> None:
    """The kernel's "no suppress_ifgroup" is -1: the rule's table answers as if it had none."""
    f = fib((*MAIN, *T100), rules_with(rule(100, table=100, suppress_ifgroup=-1)))
    assert summary(f.lookup(ip("8.8.8.8"))) == ("unicast", "lte", "100.64.0.1")
    grouped = fib((*MAIN, *T100), rules_with(rule(100, table=100, suppress_ifgroup=5)))
    assert summary(grouped.lookup(ip("8.8.8.8"))).startswith("unknown: ")  # type: ignore[union-attr]


def test_limited_broadcast_and_an_unknown_selector_answer_whole() -> None:
    assert fib().resolve(ip("255.255.255.255")) == Resolution(Unknown("limited broadcast destination is not modelled"))
    marked = rule(100, fwmark=5, table=100)
    unknown = fib((*MAIN, *T100), rules_with(marked)).resolve(ip("8.8.8.8"), mark=None)
    assert isinstance(unknown.egresses, Unknown) and unknown.rule == marked and unknown.route is None


def test_a_tos_rule_compares_ipv4_tos_bits_2_to_4_and_the_ipv6_dscp_whole() -> None:
    """IPv4 masks the packet's TOS with 0x1C (IPTOS_RT_MASK): 0x30 is 0x10 there. IPv6 compares the traffic
    class's DSCP bits (0xFC): 0x30 is not 0x10."""
    v4 = fib((*MAIN, *T100), rules_with(rule(100, tos=0x10, table=100)))
    assert summary(v4.lookup(ip("8.8.8.8"), tos=0x30)) == ("unicast", "lte", "100.64.0.1")
    v6_rules = (rule(0, family=AF_INET6, table=TABLE_LOCAL), rule(100, family=AF_INET6, tos=0x10, table=100),
                rule(32766, family=AF_INET6, table=TABLE_MAIN))  # fmt: skip
    v6 = fib((R("::/0", WAN, "fe80::1"), R("::/0", LTE, "fe80::4", table=100)), v6_rules)
    assert summary(v6.lookup(ip("2001:db8::9"), tos=0x10)) == ("unicast", "lte", "fe80::4")
    assert summary(v6.lookup(ip("2001:db8::9"), tos=0x30)) == ("unicast", "wan", "fe80::1")


def test_a_rule_action_answers_with_the_rules_words() -> None:
    f = fib(MAIN, rules_with(rule(100, action=RuleAction.BLACKHOLE)))
    assert f.lookup(ip("8.8.8.8")) == (Egress(EgressKind.BLACKHOLE, route="rule 100: from all blackhole"),)


# -- the tenth session: whole resolutions, the memos and their bounds, the lookup's defaults ----------

MAIN_RULE = rule(32766, table=TABLE_MAIN)


def test_a_reject_route_a_route_tos_unknown_a_suppressor_unknown_and_no_route_name_their_rule_and_route() -> None:
    """``Resolution`` whole where a route rejects (its type, text and prefix, the rule and the route),
    where a route's TOS cannot be read or a rule's suppressor not be judged (the rule, and the route
    for the suppressor), and where nothing matched (no rule, no route, "no route") (the ninth run:
    ``_resolve_uncached`` 81, 83, 87, 88, 90, 91, 98, 109, 110, 112, 113, 132, 134 survived)."""
    hole = R("10.0.0.0/8", type=RouteType.BLACKHOLE)
    f = fib((*MAIN, hole), rules_with())
    blackhole = Egress(EgressKind.BLACKHOLE, route="blackhole 10.0.0.0/8 table main", prefix=ip_network("10.0.0.0/8"))
    assert f.resolve(ip("10.0.0.1")) == Resolution((blackhole,), MAIN_RULE, hole)
    tos = R("10.0.0.0/8", LAN, tos=0x10)
    unknown = fib((*MAIN, tos), rules_with()).resolve(ip("10.0.0.1"), tos=None)
    assert (isinstance(unknown.egresses, Unknown), unknown.rule, unknown.route) == (True, MAIN_RULE, None)
    suppressor = rule(100, table=TABLE_MAIN, suppress_ifgroup=3)
    assert fib(MAIN, rules_with(suppressor)).resolve(ip("8.8.8.8")) == Resolution(
        Unknown("rule 100: from all lookup main: selector suppress_ifgroup needs link groups, which are not modelled"),
        suppressor, MAIN[0])  # fmt: skip
    assert fib((R("192.168.1.0/24", LAN),), rules_with()).resolve(ip("8.8.8.8")) == Resolution(
        (Egress(EgressKind.UNREACHABLE, route="no route"),))


def test_an_ipv4_route_tos_is_compared_under_the_ipv4_mask() -> None:
    """An IPv4 route's TOS selector compares the packet's TOS under IPTOS_RT_MASK (0x1C): the
    precedence bits (0xE0) are not compared, so TOS 0x24 takes a ``tos 0x04`` route (the ninth run:
    ``_table_lookup`` 28, 30, IPv6's mask 0xFC used for IPv4, survived)."""
    f = fib((R("10.0.0.0/8", LAN, tos=0x04), R("10.0.0.0/8", WAN, "203.0.113.1")), rules_with())
    assert summary(f.lookup(ip("10.0.0.1"), tos=0x24)) == ("unicast", "lan", None)
    assert summary(f.lookup(ip("10.0.0.1"), tos=0x08)) == UNICAST_WAN


def test_a_lookup_without_a_mark_is_of_mark_0() -> None:
    """``lookup`` and ``resolve`` without ``mark`` look up with the mark 0 (a packet not marked), which
    a ``fwmark 1`` rule does not match (the ninth run: ``lookup`` 1, ``resolve`` 1, a default of 1,
    survived)."""
    f = fib(MAIN + T100, rules_with(rule(100, fwmark=1, table=100)))
    assert summary(f.lookup(ip("8.8.8.8"))) == UNICAST_WAN
    assert summary(f.resolve(ip("8.8.8.8")).egresses) == UNICAST_WAN
    assert summary(f.lookup(ip("8.8.8.8"), mark=1)) == ("unicast", "lte", "100.64.0.1")


def test_an_ipv6_rule_from_the_whole_space_matches_a_sourceless_lookup() -> None:
    """``from ::/0`` (a prefix of length 0, as a hand-built snapshot may hold it) matches any source,
    and a lookup without one (``ip -6 route get`` without ``from``) too (the ninth run: ``_zero`` 2, 6,
    IPv6's zero address replaced, survived)."""
    v6 = (R("::/0", WAN, "fe80::1"), R("::/0", LTE, "fe80::2", table=100))
    rules = (rule(0, family=AF_INET6, table=TABLE_LOCAL), rule(100, family=AF_INET6, src="::/0", table=100),
             rule(32766, family=AF_INET6, table=TABLE_MAIN))  # fmt: skip
    assert summary(fib(v6, rules).lookup(ip("2001:db8::1"))) == ("unicast", "lte", "fe80::2")


def test_a_resolution_and_a_worded_egress_are_each_built_once_and_their_memos_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same lookup gives the same ``Resolution`` object, the same egress worded for the same route
    the same ``Egress`` object (one reaction reads a class's words per flow); each memo is cleared
    when it holds its limit (the ninth run: ``_resolve`` 1, 2, 4, ``own_route`` 27-31, 35-40, 49
    survived)."""
    import topowatch.core.fib as fib_module

    f = fib(OWN)
    assert f.resolve(ip("8.8.8.8")) is f.resolve(ip("8.8.8.8"))
    (egress,) = f.lookup(ip("8.1.1.1"))  # type: ignore[misc]
    worded = f.own_route(egress, ip("192.0.2.70"))
    assert own_words(worded) == ("default via 203.0.113.1 dev wan table main", "0.0.0.0/0")
    assert f.own_route(egress, ip("192.0.2.70")) is worded
    assert f.own_route(egress, ip("192.0.2.71")) is worded  # the same route carries it: the same words
    # Words for another route, or of another egress for the same route, are remembered beside them.
    (other,) = f.lookup(ip("8.8.9.9"))  # type: ignore[misc]
    assert own_words(other) == ("8.8.0.0/16 via 203.0.113.1 dev wan table main", "8.8.0.0/16")
    narrower = f.own_route(egress, ip("8.8.9.9"))
    assert own_words(narrower) == own_words(other)
    of_other = f.own_route(other, ip("192.0.2.70"))
    assert own_words(of_other) == own_words(worded)
    assert f.own_route(egress, ip("192.0.2.70")) is worded
    assert f.own_route(egress, ip("8.8.9.9")) is narrower
    assert f.own_route(other, ip("192.0.2.70")) is of_other
    monkeypatch.setattr(fib_module, "_RESOLVED_LIMIT", 2)
    monkeypatch.setattr(fib_module, "_WORDED_LIMIT", 2)
    g = fib(OWN)
    for dst in ("8.8.8.8", "8.1.1.1", "192.0.2.70"):
        g.resolve(ip(dst))
        assert len(g._resolved) <= 2
    (default,) = g.lookup(ip("192.0.2.70"))  # type: ignore[misc]
    (eight,) = g.lookup(ip("8.1.1.1"))  # type: ignore[misc]
    for e, dst in ((eight, "192.0.2.70"), (eight, "8.8.9.9"), (default, "8.9.1.1")):
        assert g.own_route(e, ip(dst)) is not e
        assert len(g._worded) <= 2


def test_a_local_route_under_a_longer_local_route_with_a_tos_is_local() -> None:
    """``is_local`` reads the local table for a packet of TOS 0: a local /24 that selects TOS 0x10
    does not apply, the local /16 under it holds the address (the seventh session's plan for
    ``is_local`` 6, the TOS read as unknown: the /24 then answered "unknown", read as not local)."""
    local = (R("10.9.0.0/16", LO, type=RouteType.LOCAL, table=TABLE_LOCAL),
             R("10.9.1.0/24", LO, type=RouteType.LOCAL, table=TABLE_LOCAL, tos=0x10))  # fmt: skip
    assert fib((*MAIN, *local)).is_local(ip("10.9.1.5")) is True
    assert fib((*MAIN, local[1])).is_local(ip("10.9.1.5")) is False


def test_a_route_beside_another_of_its_prefix_and_metric_is_not_carried() -> None:
    """IPv6 keeps a second route of a prefix and metric on another device beside the first (an
    NLM_F_CREATE|NLM_F_EXCL add); which the lookup meets first is the dump's order, so ``Fib(now,
    previous)`` builds its tables rather than carry them: wan's route first, lan's beside it as an
    equal-metric alternative (the seventh session's plan for ``_carry`` 49, carrying anyway)."""
    live = LiveTopology.seed(Topology(LINKS, ADDRESSES, (*MAIN, R("2001:db8::/64", WAN, metric=256)), ()))
    assert live is not None
    first = Fib(live.snapshot())
    assert live.apply("route", True, R("2001:db8::/64", LAN, metric=256), 0x600)
    answer = Fib(live.snapshot(), first).lookup(ip("2001:db8::1"))
    assert not isinstance(answer, Unknown)
    assert [(e.kind, e.oifname) for e in answer] == [(EgressKind.UNICAST, "wan"), (EgressKind.UNICAST, "lan")]


def test_an_equal_metric_alternative_from_another_route_names_its_own_route() -> None:
    """The egresses of IPv6's equal-metric routes of one prefix (``rt6_select``) and of IPv4's
    equal-metric default routes of a locally generated lookup (``fib_select_default``) each name
    the route of their own nexthop: a reason for a flow leaving by lan names lan's route."""
    topology = Topology(
        links=(Link(1, "lo"), Link(2, "wan"), Link(3, "lan")),
        addresses=(Address(2, ip_address("2001:db8:1::1"), 64), Address(3, ip_address("2001:db8:2::1"), 64)),
        routes=(Route(ip_network("2001:db8::/64"), nexthops=(Nexthop(2),), metric=256),
                Route(ip_network("2001:db8::/64"), nexthops=(Nexthop(3),), metric=256),
                Route(ip_network("0.0.0.0/0"), nexthops=(Nexthop(2, ip_address("192.0.2.1")),)),
                Route(ip_network("0.0.0.0/0"), nexthops=(Nexthop(3, ip_address("198.51.100.1")),))),
    )
    fib = Fib(topology)
    v6 = fib.resolve(ip_address("2001:db8::5"))
    assert [(e.oifname, e.route) for e in v6.egresses] == [  # type: ignore[union-attr]
        ("wan", "2001:db8::/64 dev wan metric 256 table main"),
        ("lan", "2001:db8::/64 dev lan metric 256 table main"),
    ]
    v4 = fib.resolve(ip_address("203.0.113.9"))
    assert [(e.oifname, e.route) for e in v4.egresses] == [  # type: ignore[union-attr]
        ("wan", "default via 192.0.2.1 dev wan table main"),
        ("lan", "default via 198.51.100.1 dev lan table main"),
    ]
