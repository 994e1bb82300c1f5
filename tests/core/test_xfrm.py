"""core.xfrm: policy lookup in kernel order, bundles, the nft and iptables IPsec matches."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import ip_address, ip_network
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topowatch.core.conntrack import (
    IPS_CONFIRMED,
    IPS_DST_NAT_DONE,
    IPS_SRC_NAT,
    IPS_SRC_NAT_DONE,
    CtTuple,
    Entry,
)
from topowatch.core.decide import decide
from topowatch.core.evaluate import predict
from topowatch.core.fib import Fib
from topowatch.core.flow import IPPROTO_ICMP, IPPROTO_UDP, Binding, Flow, NatKind, Unknown
from topowatch.core.model import (
    AF_INET,
    AF_INET6,
    Address,
    Link,
    Nexthop,
    Route,
    Topology,
    diff,
)
from topowatch.core.nat import IntervalSet, Key, Match, Op, Selector
from topowatch.core.xfrm import (
    Action,
    Direction,
    Mode,
    PolicyElement,
    PolicyType,
    XfrmFlow,
    XfrmPolicy,
    XfrmSelector,
    XfrmState,
    XfrmTemplate,
    has_bundle,
    in_ipsec,
    lookup,
    nft_match,
    output_policy,
    policy_match,
    secpath,
)
from topowatch.edges.nft import parse_rule, parse_ruleset_json

A = ip_address
N = ip_network
LOCAL_END, REMOTE_END = A("203.0.113.2"), A("198.51.100.1")


def sel(src: str = "10.0.1.0/24", dst: str = "192.0.2.0/24", **kw: Any) -> XfrmSelector:
    return XfrmSelector(AF_INET, N(src), N(dst), **kw)


def tmpl(reqid: int = 1, **kw: Any) -> XfrmTemplate:
    kw.setdefault("mode", Mode.TUNNEL)
    return XfrmTemplate(AF_INET, kw.pop("daddr", REMOTE_END), kw.pop("saddr", LOCAL_END), reqid=reqid, **kw)


def pol(s: XfrmSelector | None = None, *, templates: tuple[XfrmTemplate, ...] = (), **kw: Any) -> XfrmPolicy:
    kw.setdefault("direction", Direction.OUT)
    return XfrmPolicy(s or sel(), templates=templates, **kw)


def sa(reqid: int = 1, spi: int = 0x100, **kw: Any) -> XfrmState:
    kw.setdefault("mode", Mode.TUNNEL)
    return XfrmState(AF_INET, kw.pop("daddr", REMOTE_END), kw.pop("saddr", LOCAL_END), kw.pop("proto", 50), spi,
                     reqid=reqid, **kw)


def udp(src: str = "10.0.1.2", dst: str = "192.0.2.10", sport: int = 5060, dport: int = 5060, **kw: Any) -> Flow:
    return Flow(AF_INET, IPPROTO_UDP, A(src), A(dst), sport, dport, **kw)


# -- lookup order ---------------------------------------------------------------------------

P_LOW = pol(priority=10, index=9)
P_HIGH = pol(priority=100, index=1)
P_TIE_OLD = pol(sel("10.0.0.0/8", "0.0.0.0/0"), priority=10, index=1)
P_OTHER = pol(sel("10.0.2.0/24"), priority=0, index=17)
P_IN = pol(priority=0, index=2, direction=Direction.IN)
P_UDP_5060 = pol(sel(proto=IPPROTO_UDP, dport=5060, dport_mask=0xFFFF), priority=50, index=25)
P_TCP = pol(sel(proto=6), priority=0, index=33)
P_MARK5 = pol(priority=1, index=41, mark=5, mark_mask=0xFF)
P_IFID = pol(priority=0, index=49, if_id=7)
P_SUB = pol(priority=1000, index=57, type=PolicyType.SUB)
P_DEV = pol(sel(ifindex=3), priority=0, index=65)

LOOKUP_CASES: list[tuple[str, tuple[XfrmPolicy, ...], Flow, int | None, XfrmPolicy | None | str]] = [
    ("no policies", (), udp(), 0, None),
    ("lowest priority value wins", (P_HIGH, P_LOW), udp(), 0, P_LOW),
    ("equal priority: older (lower index) wins, whatever the dump order", (P_LOW, P_TIE_OLD), udp(), 0, P_TIE_OLD),
    ("other source prefix does not match", (P_OTHER,), udp(), 0, None),
    ("in policies are not output policies", (P_IN,), udp(), 0, None),
    ("ports under the mask", (P_UDP_5060, P_HIGH), udp(), 0, P_UDP_5060),
    ("ports under the mask, other port", (P_UDP_5060, P_HIGH), udp(dport=5061), 0, P_HIGH),
    ("protocol", (P_TCP, P_HIGH), udp(), 0, P_HIGH),
    ("mark matches", (P_MARK5, P_HIGH), udp(), 0x105, P_MARK5),
    ("mark does not match", (P_MARK5, P_HIGH), udp(), 0x6, P_HIGH),
    ("unknown mark before a match", (P_MARK5, P_HIGH), udp(), None, "packet mark"),
    ("unknown mark after the match does not matter", (P_LOW, replace(P_MARK5, priority=20)), udp(), None, P_LOW),
    ("if_id policies need an xfrm interface", (P_IFID, P_HIGH), udp(), 0, P_HIGH),
    ("sub policies come first", (P_LOW, P_SUB), udp(), 0, P_SUB),
    ("family", (pol(XfrmSelector(AF_INET6, N("::/0"), N("::/0"))),), udp(), 0, None),
    ("an ifindex selector without a known oif", (P_DEV,), udp(), 0, "output interface"),
]


@pytest.mark.parametrize(("policies", "flow", "mark", "expected"), [c[1:] for c in LOOKUP_CASES],
                         ids=[c[0] for c in LOOKUP_CASES])
def test_output_policy(policies: tuple[XfrmPolicy, ...], flow: Flow, mark: int | None,
                       expected: XfrmPolicy | None | str) -> None:
    got = output_policy(policies, replace(flow, packet_mark=mark))
    if isinstance(expected, str):
        assert isinstance(got, Unknown), got
        assert expected in got.reason
    else:
        assert got == expected


def test_ifindex_selector_with_oif() -> None:
    assert output_policy((P_DEV,), udp(), 0, oif=3) == P_DEV
    assert output_policy((P_DEV,), udp(), 0, oif=4) is None


def test_icmp_type_and_code_stand_in_the_ports() -> None:
    echo = pol(sel(proto=IPPROTO_ICMP, sport=8, sport_mask=0xFFFF, dport=0, dport_mask=0xFFFF))
    ping = Flow(AF_INET, IPPROTO_ICMP, A("10.0.1.2"), A("192.0.2.10"), 77, 8 << 8)
    reply = Flow(AF_INET, IPPROTO_ICMP, A("10.0.1.2"), A("192.0.2.10"), 77, 0)
    assert output_policy((echo,), ping, 0) == echo
    assert output_policy((echo,), reply, 0) is None


def test_gre_ports_are_unknown() -> None:
    keyed = pol(sel(proto=47, sport=1, sport_mask=0xFFFF))
    gre = Flow(AF_INET, 47, A("10.0.1.2"), A("192.0.2.10"))
    assert isinstance(output_policy((keyed,), gre, 0), Unknown)


def test_dport_range_partly_selected_is_unknown() -> None:
    f = XfrmFlow(AF_INET, IPPROTO_UDP, A("10.0.1.2"), A("192.0.2.10"), 1, 5060, 5070, 0)
    assert isinstance(output_policy((P_UDP_5060,), f), Unknown)
    inside = XfrmFlow(AF_INET, IPPROTO_UDP, A("10.0.1.2"), A("192.0.2.10"), 1, 5060, None, 0)
    assert output_policy((P_UDP_5060,), inside) == P_UDP_5060


# -- property: the lookup equals a brute force over every policy ---------------------------

PREFIXES = ["0.0.0.0/0", "10.0.0.0/8", "10.0.1.0/24", "10.0.1.2/32", "192.0.2.0/24", "192.0.2.10/32"]

policies_st = st.lists(
    st.builds(
        lambda s, d, proto, dport, mask, prio, idx, direction, mark: pol(
            sel(s, d, proto=proto, dport=dport, dport_mask=mask), priority=prio, index=idx, direction=direction,
            mark=mark & 0xF if mark else 0, mark_mask=0xF if mark else 0,
        ),
        st.sampled_from(PREFIXES), st.sampled_from(PREFIXES), st.sampled_from([0, 6, 17]),
        st.sampled_from([0, 53, 5060]), st.sampled_from([0, 0xFFFF, 0xFF00]), st.integers(0, 3),
        st.integers(0, 10_000), st.sampled_from(list(Direction)), st.one_of(st.none(), st.integers(1, 15)),
    ),
    max_size=8,
    unique_by=lambda p: p.index,
)
flows_st = st.builds(
    lambda s, d, proto, dport, mark: Flow(AF_INET, proto, A(s), A(d), 1000, dport, packet_mark=mark),
    st.sampled_from(["10.0.1.2", "10.0.2.7", "192.0.2.10"]), st.sampled_from(["192.0.2.10", "8.8.8.8", "10.0.1.2"]),
    st.sampled_from([6, 17, 1]), st.sampled_from([53, 5060, 5061, 0x3FF]), st.integers(0, 0xFF),
)


def brute_force(policies: list[XfrmPolicy], flow: Flow) -> XfrmPolicy | None:
    """Independent of the module: filter every condition by hand, then the minimum."""

    def ports_match(p: XfrmPolicy) -> bool:
        dport = flow.dport if flow.proto in (6, 17) else (flow.dport & 0xFF)
        sport = flow.sport if flow.proto in (6, 17) else (flow.dport >> 8)
        s = p.selector
        return ((dport ^ s.dport) & s.dport_mask) == 0 and ((sport ^ s.sport) & s.sport_mask) == 0

    candidates = [
        p for p in policies
        if p.direction == Direction.OUT
        and p.selector.src is not None and flow.src in p.selector.src
        and p.selector.dst is not None and flow.dst in p.selector.dst
        and p.selector.proto in (0, flow.proto)
        and ports_match(p)
        and ((flow.packet_mark or 0) & p.mark_mask) == p.mark
    ]
    if not candidates:
        return None
    return min(candidates, key=lambda p: (p.priority, p.index))


@settings(max_examples=300, deadline=None)
@given(policies_st, flows_st)
def test_lookup_equals_brute_force(policies: list[XfrmPolicy], flow: Flow) -> None:
    assert output_policy(policies, flow) == brute_force(policies, flow)


# -- bundles ------------------------------------------------------------------------------------


def topo(policies: tuple[XfrmPolicy, ...] = (), states: tuple[XfrmState, ...] = (), known: bool = True) -> Topology:
    return Topology(
        links=(Link(1, "lo"), Link(2, "lan0"), Link(3, "up1")),
        addresses=(Address(2, A("10.0.1.1"), 24), Address(3, LOCAL_END, 24)),
        routes=(Route(N("0.0.0.0/0"), nexthops=(Nexthop(3, A("203.0.113.1")),)),
                Route(N("10.0.1.0/24"), nexthops=(Nexthop(2),))),
        xfrm_policies=policies,
        xfrm_states=states,
        xfrm_known=known,
    )


TUNNEL = pol(templates=(tmpl(1),), priority=100, index=1)
TWO = pol(templates=(tmpl(1), tmpl(2, proto=51)), priority=100, index=1)
OPTIONAL = pol(templates=(tmpl(1, optional=True, mode=Mode.TRANSPORT, daddr=A("0.0.0.0"), saddr=A("0.0.0.0")),))
BLOCK = pol(action=Action.BLOCK, index=3)
BARE = pol(index=4)

BUNDLE_CASES: list[tuple[str, Topology, bool | str, bool | str]] = [
    # (name, topology, in_ipsec, has_bundle)
    ("no policy", topo(), False, False),
    ("policy, its SA", topo((TUNNEL,), (sa(1),)), True, True),
    ("policy, no SA", topo((TUNNEL,)), True, "no SA for reqid 1"),
    ("policy, SA of another reqid", topo((TUNNEL,), (sa(2),)), True, "no SA for reqid 1"),
    ("policy, SA to another remote", topo((TUNNEL,), (sa(1, daddr=A("198.51.100.9")),)), True, "no SA"),
    ("policy, larval SA (spi 0)", topo((TUNNEL,), (sa(1, spi=0),)), True, "no SA"),
    ("policy, SA of another mode", topo((TUNNEL,), (sa(1, mode=Mode.TRANSPORT),)), True, "no SA"),
    ("policy, SA with a selector for others", topo((TUNNEL,), (sa(1, selector=sel("10.9.0.0/16")),)), True,
     "no SA"),
    ("policy, SA with a selector for it", topo((TUNNEL,), (sa(1, selector=sel()),)), True, True),
    ("two templates, one SA", topo((TWO,), (sa(1),)), True, "reqid 2"),
    ("two templates, both SAs", topo((TWO,), (sa(1), sa(2, proto=51))), True, True),
    ("optional template without SA: clear", topo((OPTIONAL,)), True, False),
    ("block", topo((BLOCK,)), False, False),
    ("no templates", topo((BARE,)), False, False),
    ("xfrm not read", topo((TUNNEL,), known=False), "not read", "not read"),
]


@pytest.mark.parametrize(("t", "ipsec", "bundle"), [c[1:] for c in BUNDLE_CASES], ids=[c[0] for c in BUNDLE_CASES])
def test_in_ipsec_and_bundle(t: Topology, ipsec: bool | str, bundle: bool | str) -> None:
    for got, want in ((in_ipsec(t, udp(packet_mark=0)), ipsec), (has_bundle(t, udp(packet_mark=0)), bundle)):
        if isinstance(want, str):
            assert isinstance(got, Unknown), got
            assert want in got.reason
        else:
            assert got is want


def test_missing_sa_reason_names_policy_and_what_the_kernel_does() -> None:
    decision = lookup(topo((TUNNEL,)), udp(packet_mark=0))
    assert not isinstance(decision, Unknown)
    assert decision.in_ipsec and not decision.bundle and decision.missing == TUNNEL.templates
    assert "xfrm policy src 10.0.1.0/24 dst 192.0.2.0/24 dir out priority 100" in decision.reason
    assert "no SA for reqid 1" in decision.reason and "drops its packets" in decision.reason


def test_sa_mark_and_if_id() -> None:
    marked = replace(TUNNEL, mark=5, mark_mask=0xFF)
    assert has_bundle(topo((marked,), (sa(1, mark=5, mark_mask=0xFF),)), udp(packet_mark=5)) is True
    assert isinstance(has_bundle(topo((marked,), (sa(1, mark=6, mark_mask=0xFF),)), udp(packet_mark=5)), Unknown)


def test_tunnel_with_routed_local_end_is_unknown_unless_the_sa_is_wild() -> None:
    open_end = pol(templates=(tmpl(1, saddr=A("0.0.0.0")),))
    assert isinstance(has_bundle(topo((open_end,), (sa(1),)), udp(packet_mark=0)), Unknown)
    assert has_bundle(topo((open_end,), (sa(1, saddr=A("0.0.0.0")),)), udp(packet_mark=0)) is True


def test_secpath() -> None:
    assert secpath(topo(), local=True) is False
    assert secpath(topo(states=(sa(1),)), local=False) is False  # that SA leaves here, none arrives
    inbound = sa(9, daddr=LOCAL_END, saddr=REMOTE_END)
    assert isinstance(secpath(topo(states=(inbound,)), local=False), Unknown)
    assert isinstance(secpath(topo(known=False), local=False), Unknown)


# -- nft matches -----------------------------------------------------------------------------


def nft(expr: dict[str, Any], right: Any, op: str = "==") -> Match:
    rule = parse_rule([{"match": {"op": op, "left": expr, "right": right}}], family="inet", table="t")
    (m,) = rule.exprs
    assert isinstance(m, Match), m
    return m


RT = {"rt": {"key": "ipsec"}}
SECPATH = {"meta": {"key": "secpath"}}


def ipsec(key: str, direction: str = "out", **kw: Any) -> dict[str, Any]:
    return {"ipsec": {"key": key, "dir": direction, **kw}}


XF = XfrmFlow(AF_INET, IPPROTO_UDP, A("10.0.1.2"), A("192.0.2.10"), 5060, 5060, None, 0, 3)
BUNDLED = topo((TWO,), (sa(1, spi=0x100), sa(2, proto=51, spi=0x200)))

NFT_CASES: list[tuple[str, Match, Topology, str, bool, bool | str]] = [
    ("rt ipsec exists with a bundle", nft(RT, True), BUNDLED, "postrouting", False, True),
    ("rt ipsec missing with a bundle", nft(RT, False), BUNDLED, "postrouting", False, False),
    ("rt ipsec exists without policy", nft(RT, True), topo(), "postrouting", False, False),
    ("rt ipsec missing without policy", nft(RT, False), topo(), "postrouting", False, True),
    ("rt ipsec exists, SA absent", nft(RT, True), topo((TUNNEL,)), "postrouting", False, "no SA for reqid 1"),
    ("rt ipsec at prerouting breaks", nft(RT, False), BUNDLED, "prerouting", False, False),
    ("rt ipsec at input: no bundle", nft(RT, False), BUNDLED, "input", False, True),
    ("rt ipsec, xfrm not read", nft(RT, True), topo(known=False), "postrouting", False, "not read"),
    ("ipsec out reqid", nft(ipsec("reqid"), 1), BUNDLED, "postrouting", False, True),
    ("ipsec out reqid other", nft(ipsec("reqid"), 2), BUNDLED, "postrouting", False, False),
    ("ipsec out reqid !=", nft(ipsec("reqid"), 2, "!="), BUNDLED, "postrouting", False, True),
    ("ipsec out spnum 1 reqid", nft(ipsec("reqid", spnum=1), 2), BUNDLED, "postrouting", False, True),
    ("ipsec out spnum 2 breaks, even negated", nft(ipsec("reqid", spnum=2), 9, "!="), BUNDLED, "postrouting",
     False, False),
    ("ipsec out spi set", nft(ipsec("spi"), {"set": [0x100, 0x300]}), BUNDLED, "postrouting", False, True),
    ("ipsec out ip daddr", nft(ipsec("daddr", family="ip"), str(REMOTE_END)), BUNDLED, "postrouting", False, True),
    ("ipsec out ip saddr prefix", nft(ipsec("saddr", family="ip"), {"prefix": {"addr": "203.0.113.0", "len": 24}}),
     BUNDLED, "postrouting", False, True),
    ("ipsec out ip6 daddr of a v4 SA breaks", nft(ipsec("daddr", family="ip6"), "::1", "!="), BUNDLED,
     "postrouting", False, False),
    ("ipsec out reqid without bundle breaks", nft(ipsec("reqid"), 1, "!="), topo(), "postrouting", False, False),
    ("ipsec out reqid, SA absent", nft(ipsec("reqid"), 1), topo((TUNNEL,)), "postrouting", False, "no SA"),
    ("meta secpath missing, local flow", nft(SECPATH, False), BUNDLED, "output", True, True),
    ("meta secpath exists, forwarded, no inbound SA", nft(SECPATH, True), BUNDLED, "postrouting", False, False),
    ("meta secpath exists, forwarded, inbound SA", nft(SECPATH, True),
     topo(states=(sa(9, daddr=LOCAL_END, saddr=REMOTE_END),)), "postrouting", False, "not modelled"),
    ("ipsec in reqid, no secpath breaks", nft(ipsec("reqid", "in"), 1, "!="), BUNDLED, "prerouting", False, False),
]


@pytest.mark.parametrize(("m", "t", "hook", "local", "expected"), [c[1:] for c in NFT_CASES],
                         ids=[c[0] for c in NFT_CASES])
def test_nft_match(m: Match, t: Topology, hook: str, local: bool, expected: bool | str) -> None:
    got = nft_match(m, t, XF, hook, local=local)
    if isinstance(expected, str):
        assert isinstance(got, Unknown), got
        assert expected in got.reason
    else:
        assert got is expected


def test_parser_models_the_ipsec_expressions() -> None:
    m = nft(ipsec("reqid", spnum=1), 5)
    assert m.selector == Selector(Key.IPSEC_REQID, m.selector.text, direction="out", spnum=1)
    assert m.values == IntervalSet(((5, 5),))
    assert nft(RT, True).values == IntervalSet(((1, 1),))
    assert nft(SECPATH, False).selector.key is Key.SECPATH
    d = nft({"ipsec": {"key": "daddr", "family": "ip6"}}, "2001:db8::1")
    assert d.selector.direction == "in" and d.selector.family == AF_INET6 and d.values.version == 6  # type: ignore[union-attr]
    assert m.op is Op.EQ


# -- iptables -m policy ---------------------------------------------------------------------

PM_CASES: list[tuple[str, Topology, str, str, tuple[PolicyElement, ...], bool, bool | str]] = [
    ("out none, no policy", topo(), "out", "none", (), False, True),
    ("out ipsec, no policy", topo(), "out", "ipsec", (), False, False),
    ("out ipsec, bundle", BUNDLED, "out", "ipsec", (), False, True),
    ("out none, bundle", BUNDLED, "out", "none", (), False, False),
    ("out ipsec reqid 2 (second SA, not strict)", BUNDLED, "out", "ipsec", (PolicyElement(reqid=2),), False, True),
    ("out ipsec reqid 2 strict: first SA must match", BUNDLED, "out", "ipsec", (PolicyElement(reqid=2),), True,
     False),
    ("out ipsec strict, both in order", BUNDLED, "out", "ipsec",
     (PolicyElement(reqid=1, proto=50), PolicyElement(reqid=2, proto=51)), True, True),
    ("out ipsec strict, too few elements", BUNDLED, "out", "ipsec", (PolicyElement(reqid=1),), True, False),
    ("out ipsec ! reqid 1", BUNDLED, "out", "ipsec", (PolicyElement(reqid=1, reqid_invert=True),), False, True),
    ("out ipsec mode transport", BUNDLED, "out", "ipsec", (PolicyElement(mode=Mode.TRANSPORT),), False, False),
    ("out ipsec tunnel-dst", BUNDLED, "out", "ipsec", (PolicyElement(tunnel_dst=N("198.51.100.0/24")),), False,
     True),
    ("out ipsec tunnel-src other", BUNDLED, "out", "ipsec", (PolicyElement(tunnel_src=N("192.0.2.0/24")),), False,
     False),
    ("out ipsec spi", BUNDLED, "out", "ipsec", (PolicyElement(spi=0x200),), False, True),
    ("out ipsec, SA absent", topo((TUNNEL,)), "out", "ipsec", (), False, "no SA for reqid 1"),
    ("in none, local", BUNDLED, "in", "none", (), True, True),
    ("in ipsec, forwarded, no inbound SA", BUNDLED, "in", "ipsec", (), False, False),
    ("in ipsec, forwarded, inbound SA", topo(states=(sa(9, daddr=LOCAL_END, saddr=REMOTE_END),)), "in", "ipsec",
     (), False, "not modelled"),
]


@pytest.mark.parametrize(("t", "direction", "pol_", "elements", "strict_or_local", "expected"),
                         [c[1:] for c in PM_CASES], ids=[c[0] for c in PM_CASES])
def test_policy_match(  # noqa: PLR0917
    t: Topology, direction: str, pol_: str, elements: tuple[PolicyElement, ...],
                      strict_or_local: bool, expected: bool | str) -> None:
    strict = strict_or_local and direction == "out"
    local = strict_or_local and direction == "in"
    got = policy_match(t, udp(packet_mark=0), direction, pol_, elements, strict, oif=3, local=local)
    if isinstance(expected, str):
        assert isinstance(got, Unknown), got
        assert expected in got.reason
    else:
        assert got is expected


def test_policy_match_rejects_bad_words() -> None:
    with pytest.raises(ValueError, match="--pol"):
        policy_match(topo(), udp(), "out", "maybe")
    with pytest.raises(ValueError, match="--dir"):
        policy_match(topo(), udp(), "fwd", "none")


# -- values --------------------------------------------------------------------------------------


def test_values_validate_and_describe() -> None:
    with pytest.raises(ValueError, match="family"):
        XfrmSelector(AF_INET, N("::/0"), N("0.0.0.0/0"))
    with pytest.raises(ValueError, match="sport"):
        sel(sport=70000)
    with pytest.raises(ValueError, match="needs a family"):
        XfrmPolicy(XfrmSelector(0), Direction.OUT)
    assert sel().src == N("10.0.1.0/24") and XfrmSelector(AF_INET).dst == N("0.0.0.0/0")
    text = TWO.describe()
    assert "tmpl esp tunnel 203.0.113.2->198.51.100.1 reqid 1" in text and "tmpl ah" in text
    assert "spi 0x100" in sa(1).describe()


def test_diff_names_policies_and_sas() -> None:
    change = diff(topo(), topo((TUNNEL,), (sa(1),)))
    assert any(line.startswith("xfrm policy src 10.0.1.0/24") and line.endswith("added") for line in change.lines)
    assert any(line.startswith("xfrm SA esp spi 0x100") for line in change.lines)


# -- the evaluator and decide ------------------------------------------------------------------

RULESET = {
    "nftables": [
        {"table": {"family": "inet", "name": "t"}},
        {"chain": {"family": "inet", "table": "t", "name": "post", "type": "nat", "hook": "postrouting",
                   "prio": 100, "policy": "accept"}},
        {"rule": {"family": "inet", "table": "t", "chain": "post", "handle": 2,
                  "expr": [{"match": {"op": "==", "left": RT, "right": True}}, {"accept": None}]}},
        {"rule": {"family": "inet", "table": "t", "chain": "post", "handle": 3,
                  "expr": [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "up1"}},
                           {"masquerade": None}]}},
    ]
}
MASQ = Binding(NatKind.MASQUERADE, LOCAL_END, LOCAL_END)


def test_rt_ipsec_exemption_predicted() -> None:
    rs = parse_ruleset_json(RULESET)
    assert predict(rs, Fib(topo()), udp()).snat == frozenset({MASQ})
    bundled = predict(rs, Fib(topo((TUNNEL,), (sa(1),))), udp())
    assert bundled.snat == frozenset({Binding(NatKind.NONE)})
    assert not isinstance(bundled.egress, Unknown) and bundled.egress[0].xfrm.startswith("src 10.0.1.0/24")
    absent = predict(rs, Fib(topo((TUNNEL,))), udp())
    assert isinstance(absent.snat, Unknown) and "no SA for reqid 1" in absent.snat.reason


def test_iptables_policy_reads_the_packet_after_a_dnat_to_a_port_range() -> None:
    """``-m policy --dir out`` reads the bundle of the DNATed packet's route: DNATed from port 5060 to
    one of 8000-8010, the packet is not selected by a policy for port 5060, so it is masqueraded."""
    from topowatch.edges.iptables import parse_save

    exempt = ("-A POSTROUTING -m policy --dir out --pol ipsec -j ACCEPT\n"
              "-A POSTROUTING -o up1 -j MASQUERADE\n")
    dnat = "-A PREROUTING -p udp --dport 5060 -j DNAT --to-destination 192.0.2.10:8000-8010\n"
    port_5060 = pol(sel(proto=IPPROTO_UDP, dport=5060, dport_mask=0xFFFF), templates=(tmpl(1),), priority=100,
                    index=1)
    fib = Fib(topo((port_5060,), (sa(1),)))
    assert predict(parse_save(f"*nat\n{dnat}{exempt}COMMIT\n").ruleset, fib, udp()).snat == frozenset({MASQ})
    # Without the DNAT the policy selects the flow: exempt from the masquerade.
    assert predict(parse_save(f"*nat\n{exempt}COMMIT\n").ruleset, fib, udp()).snat == frozenset(
        {Binding(NatKind.NONE)})


def test_block_policy_drops() -> None:
    p = predict(parse_ruleset_json(RULESET), Fib(topo((BLOCK,))), udp())
    assert p.snat == frozenset()
    assert any("dropped by xfrm" in line and "blocks it" in line for line in p.explain)


def entry(flow: Flow, translated: str) -> Entry:
    orig = CtTuple(flow.src, flow.dst, flow.sport, flow.dport)
    reply = CtTuple(flow.dst, A(translated), flow.dport, flow.sport)
    status = IPS_CONFIRMED | IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE | (IPS_SRC_NAT if translated != str(flow.src) else 0)
    return Entry(AF_INET, flow.proto, orig, reply, status=status)


def test_policy_appears_masqueraded_entry_is_stale_with_the_policy_named() -> None:
    rs = parse_ruleset_json(RULESET)
    flow = udp()
    e = entry(flow, str(LOCAL_END))
    plan = decide([e], predict=lambda fib, f: predict(rs, fib, f), fib_now=Fib(topo((TUNNEL,))),
                  fib_before=Fib(topo()))
    assert len(plan.stale) == 1, plan
    assert "xfrm policy src 10.0.1.0/24 dst 192.0.2.0/24 dir out" in plan.stale[0].reason
    assert "no SA for reqid 1" in plan.stale[0].reason
    # Without a change of policy nothing says the entry went stale: it is left alone.
    plan = decide([e], predict=lambda fib, f: predict(rs, fib, f), fib_now=Fib(topo((TUNNEL,))),
                  fib_before=Fib(topo((TUNNEL,))))
    assert not plan.stale
    # The policy goes away: the prediction is known again (masquerade): an unNATed entry is stale.
    unnated = entry(flow, str(flow.src))
    plan = decide([unnated], predict=lambda fib, f: predict(rs, fib, f), fib_now=Fib(topo()),
                  fib_before=Fib(topo((TUNNEL,))))
    assert len(plan.stale) == 1 and "masquerade to 203.0.113.2" in plan.stale[0].reason
