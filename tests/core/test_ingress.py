"""Where a forwarded flow may have entered: reverse-path filtering per interface, and the evaluator over it.

``Fib.ingresses`` names the interfaces the kernel would accept the flow's
first packet on (rp_filter off: any; loose: any, if a unicast route leads
back to the source; strict: the reverse path's; a netfilter reverse-path
drop: strict on top); ``predict`` evaluates each where the answer may depend
on it and unites their bindings.
"""

from __future__ import annotations

from ipaddress import ip_address, ip_network

import pytest

from topowatch.core.evaluate import predict, reads_iif
from topowatch.core.fib import Fib
from topowatch.core.flow import NO_NAT, Binding, Flow, Ingress, NatKind, Unknown
from topowatch.core.model import (
    AF_INET,
    AF_INET6,
    TABLE_LOCAL,
    TABLE_MAIN,
    Address,
    Link,
    Netconf,
    Nexthop,
    PolicyRule,
    Route,
    RouteType,
    Topology,
    diff,
)
from topowatch.core.nat import Chain, Hook, Key, Match, NameSet, NatRuleset, NatStatement, Op, Rule, Selector

LO, WAN, LAN, LTE, DEAD = 1, 2, 3, 4, 5
LINKS = (Link(LO, "lo"), Link(WAN, "wan"), Link(LAN, "lan"), Link(LTE, "lte"),
         Link(DEAD, "dead", up=False, running=False))
ADDRESSES = (
    Address(LO, ip_address("127.0.0.1"), 8),
    Address(WAN, ip_address("203.0.113.5"), 24),
    Address(LAN, ip_address("192.168.1.1"), 24),
    Address(LTE, ip_address("100.64.0.2"), 24),
    Address(LAN, ip_address("fd00:1::1"), 64),
    Address(WAN, ip_address("2001:db8::5"), 64),
)
MAIN = (
    Route(ip_network("0.0.0.0/0"), nexthops=(Nexthop(WAN, ip_address("203.0.113.1")),)),
    Route(ip_network("192.168.1.0/24"), nexthops=(Nexthop(LAN),)),
    Route(ip_network("203.0.113.0/24"), nexthops=(Nexthop(WAN),)),
    Route(ip_network("100.64.0.0/24"), nexthops=(Nexthop(LTE),)),
    Route(ip_network("fd00:1::/64"), nexthops=(Nexthop(LAN),)),
    Route(ip_network("::/0"), nexthops=(Nexthop(WAN, ip_address("2001:db8::1")),)),
)
NO_DEFAULT = tuple(r for r in MAIN if r.dst.prefixlen)


def topo(netconf: tuple[Netconf, ...] | None, routes: tuple[Route, ...] = MAIN,
         rules: tuple[PolicyRule, ...] = ()) -> Topology:
    return Topology(LINKS, ADDRESSES, routes, rules, netconf=netconf or (), netconf_known=netconf is not None)


def conf(all_: int, **per: int) -> tuple[Netconf, ...]:
    return (Netconf("all", all_), Netconf("default", 0), *(Netconf(n, v) for n, v in per.items()))


def flow(src: str, dst: str = "8.8.8.8", mark: int | None = 0) -> Flow:
    s, d = ip_address(src), ip_address(dst)
    return Flow(AF_INET if s.version == 4 else AF_INET6, 17, s, d, 1000, 53, packet_mark=mark)


def names(answer: tuple[tuple[Ingress, ...], str] | Unknown) -> list[str] | str:
    if isinstance(answer, Unknown):
        return f"unknown: {answer.reason}"
    return [i.ifname for i in answer[0]]


@pytest.mark.parametrize(("netconf", "routes", "src", "expected"), [
    (None, MAIN, "192.168.1.50", ["lan"]),  # not read: strict, as before netconf was modelled
    (conf(0), MAIN, "192.168.1.50", ["wan", "lan", "lte"]),  # off: anywhere but lo and down links
    (conf(2), MAIN, "192.168.1.50", ["wan", "lan", "lte"]),  # loose: a route back exists
    (conf(2), NO_DEFAULT, "8.8.8.8", "unknown: no interface accepts"),  # loose: no route back at all
    (conf(0), NO_DEFAULT, "8.8.8.8", ["wan", "lan", "lte"]),  # off: no route back is fine
    (conf(1), MAIN, "192.168.1.50", ["lan"]),  # strict: the reverse path's interface
    (conf(0, lan=1), MAIN, "192.168.1.50", ["wan", "lan", "lte"]),  # strict on lan only: lan is its path
    (conf(0, wan=1), MAIN, "192.168.1.50", ["lan", "lte"]),  # strict on wan refuses it there
    (conf(2, wan=1), MAIN, "192.168.1.50", ["wan", "lan", "lte"]),  # the larger: loose 2 beats strict 1
    (conf(1, wan=0), MAIN, "192.168.1.50", ["lan"]),
    (conf(1), MAIN, "192.168.1.1", ["lo"]),  # our own address: locally generated
    (conf(0), MAIN, "fd00:1::50", ["wan", "lan", "lte"]),  # IPv6 has no rp_filter
])
def test_ingresses(netconf: tuple[Netconf, ...] | None, routes: tuple[Route, ...], src: str,
                   expected: list[str] | str) -> None:
    got = names(Fib(topo(netconf, routes)).ingresses(flow(src, "8.8.8.8" if "." in src else "2001:db8:9::9")))
    if isinstance(expected, str):
        assert isinstance(got, str) and got.startswith(expected)
    else:
        assert got == expected


def test_netfilter_reverse_path_drop_is_strict_on_top() -> None:
    f = Fib(topo(conf(0)))
    assert names(f.ingresses(flow("192.168.1.50"), netfilter_rpf=True)) == ["lan"]
    assert names(f.ingresses(flow("fd00:1::50", "2001:db8:9::9"), netfilter_rpf=True)) == ["lan"]


FWMARK_RULES = (
    PolicyRule(AF_INET, 0, table=TABLE_LOCAL),
    PolicyRule(AF_INET, 100, table=100, fwmark=1),
    PolicyRule(AF_INET, 32766, table=TABLE_MAIN),
)
T100 = (Route(ip_network("0.0.0.0/0"), table=100, nexthops=(Nexthop(LTE, ip_address("100.64.0.1")),)),)


def test_strict_reverse_lookup_uses_the_mark_only_with_src_valid_mark() -> None:
    without = Fib(topo(conf(1), MAIN + T100, FWMARK_RULES))
    assert names(without.ingresses(flow("8.8.8.8", "192.168.1.50", mark=None))) == ["wan"]
    with_mark = Fib(topo((Netconf("all", 1, src_valid_mark=True),), MAIN + T100, FWMARK_RULES))
    assert isinstance(with_mark.ingresses(flow("8.8.8.8", "192.168.1.50", mark=None)), Unknown)
    assert names(with_mark.ingresses(flow("8.8.8.8", "192.168.1.50", mark=1))) == ["lte"]


def test_reverse_path_settings() -> None:
    t = topo((*conf(1, lan=2), Netconf("wan", 0, src_valid_mark=True)))
    assert t.reverse_path("lan") == (2, False)
    assert t.reverse_path("wan") == (1, True)
    assert t.reverse_path("new0") == (1, False)  # not listed: the default's values
    assert topo(None).reverse_path("lan") == (1, False)
    with pytest.raises(ValueError, match="rp_filter"):
        Netconf("lan", 3)


def test_diff_names_rp_filter_changes() -> None:
    lines = diff(topo(conf(0)), topo(conf(2))).lines
    assert lines == ("rp_filter of all 0 -> 2",)


# -- predict over the candidates ---------------------------------------------------------

def iif_snat_ruleset() -> NatRuleset:
    iifname = Selector(Key.IIFNAME, "iifname")
    rules = (
        Rule(1, (Match(iifname, Op.EQ, NameSet(frozenset({"lan"})), 'iifname "lan"'),
                 NatStatement(NatKind.SNAT, "snat to 203.0.113.99", addr=(ip_address("203.0.113.99"),) * 2)),
             'iifname "lan" snat to 203.0.113.99'),
        Rule(2, (NatStatement(NatKind.MASQUERADE, "masquerade"),), "masquerade"),
    )
    chain = Chain("ip", "nat", "post", rules, hook=Hook.POSTROUTING, priority=100, type="nat", policy="accept")
    return NatRuleset((chain,))


MASQ_RULESET = NatRuleset((Chain("ip", "nat", "post", (Rule(1, (NatStatement(NatKind.MASQUERADE, "masquerade"),),
                                                               "masquerade"),),
                                 hook=Hook.POSTROUTING, priority=100, type="nat", policy="accept"),))


def test_predict_unites_the_bindings_of_every_candidate() -> None:
    rs = iif_snat_ruleset()
    strict = predict(rs, Fib(topo(conf(1))), flow("192.168.1.50"))
    assert strict.snat == frozenset({Binding(NatKind.SNAT, ip_address("203.0.113.99"))})
    assert strict.ingress == Ingress(LAN, "lan")
    loose = predict(rs, Fib(topo(conf(2))), flow("192.168.1.50"))
    assert loose.snat == frozenset({Binding(NatKind.SNAT, ip_address("203.0.113.99")),
                                    Binding(NatKind.MASQUERADE, ip_address("203.0.113.5"))})
    assert isinstance(loose.ingress, Unknown) and "lan" in loose.ingress.reason
    assert any(line.startswith("arriving on wan: ") for line in loose.explain)
    assert predict(rs, Fib(topo(conf(1), rules=())), flow("192.168.1.50")).dnat == frozenset({NO_NAT})


def test_predict_evaluates_once_when_nothing_reads_the_input_interface() -> None:
    fib = Fib(topo(conf(0)))
    assert not reads_iif(MASQ_RULESET, fib)
    assert reads_iif(iif_snat_ruleset(), fib)
    iif_rule = PolicyRule(AF_INET, 10, table=100, iifname="lan")
    assert reads_iif(MASQ_RULESET, Fib(topo(conf(0), rules=(iif_rule,))))
    assert not reads_iif(MASQ_RULESET, Fib(topo(conf(0), rules=(PolicyRule(AF_INET, 10, table=100, iifname="lo"),))))
    p = predict(MASQ_RULESET, fib, flow("192.168.1.50"))
    assert p.snat == frozenset({Binding(NatKind.MASQUERADE, ip_address("203.0.113.5"))})
    assert isinstance(p.ingress, Unknown)


def test_predict_is_unknown_where_one_candidate_is() -> None:
    # An iif policy rule over a route nobody knows how to answer for lte: multicast.
    rules = (PolicyRule(AF_INET, 0, table=TABLE_LOCAL), PolicyRule(AF_INET, 10, table=100, iifname="lte"),
             PolicyRule(AF_INET, 32766, table=TABLE_MAIN))
    routes = (*MAIN, Route(ip_network("8.8.8.0/24"), table=100, type=RouteType.MULTICAST))
    p = predict(MASQ_RULESET, Fib(topo(conf(0), routes, rules)), flow("192.168.1.50"))
    assert isinstance(p.snat, Unknown) and p.snat.reason.startswith("arriving on lte: ")


def test_receiving_links_read_the_settings_as_reverse_path_does() -> None:
    t = topo((*conf(1, lan=2), Netconf("wan", 0, src_valid_mark=True)))
    got = {link.name: mode for link, mode in Fib(t)._receiving_links()}
    assert got == {name: t.reverse_path(name) for name in ("wan", "lan", "lte")}  # lo and down links left out


def test_an_rp_filter_change_can_renat_any_ipv4_flow() -> None:
    from topowatch.core.impact import impact

    rs = iif_snat_ruleset()
    assert impact(topo(conf(0)), topo(conf(0)), rs).none
    changed = impact(topo(conf(0)), topo(conf(1)), rs)
    assert changed.everything and "netconf" in changed.why
    assert impact(topo(conf(0)), topo(conf(1)), NatRuleset()).none  # no NAT: nothing to re-NAT
