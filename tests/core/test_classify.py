"""core.classify: flow classes against the per-flow evaluator, the reference they must agree with.

The property tests generate gateways (links, addresses, routes in two tables,
policy rules), rulesets (test_evaluate's generator: interface, address, port,
mark and unknown matches; masquerade, snat, dnat, jumps) and flows near every
boundary, and check that flows of one class get the same prediction from the
per-flow evaluator, field for field; and that ``decide`` with classes deletes
and leaves exactly what it does without them.
"""

from __future__ import annotations

from collections import defaultdict
from ipaddress import IPv4Network, ip_address, ip_network
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from topowatch.core.classify import Classifier, _field_map
from topowatch.core.conntrack import IPS_DST_NAT_DONE, IPS_SEEN_REPLY, IPS_SRC_NAT_DONE, CtTuple, Entry
from topowatch.core.decide import decide
from topowatch.core.eligibility import Eligibility
from topowatch.core.evaluate import predict
from topowatch.core.fib import Fib
from topowatch.core.flow import IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, EgressKind, Flow, Prediction, Unknown
from topowatch.core.model import (
    AF_INET,
    SCOPE_HOST,
    Address,
    Link,
    Netconf,
    Nexthop,
    PolicyRule,
    Route,
    RouteType,
    Topology,
)
from topowatch.core.nat import Hook, NatRuleset

from test_evaluate import spec_ruleset, specs  # isort: skip

LO, LAN, UP1, UP2, PPP = 1, 2, 3, 4, 5


def A(ifindex: int, text: str, peer: str | None = None, scope: int = 0) -> Address:
    addr, plen = text.split("/")
    return Address(ifindex, ip_address(addr), int(plen), scope, 0, ip_address(peer) if peer else None)


BASE_ADDRESSES = (
    A(LO, "127.0.0.1/8", scope=SCOPE_HOST),
    A(LAN, "10.0.0.1/8"),
    A(UP1, "203.0.113.5/24"),
    A(UP2, "198.51.100.7/24"),
    A(PPP, "100.64.0.2/32", peer="100.64.0.1"),
)
PREFIXES = ["192.0.2.0/24", "192.0.2.0/25", "192.0.2.128/26", "8.8.8.0/24", "8.8.0.0/16", "10.0.1.0/24",
            "198.51.100.0/25", "0.0.0.0/0", "192.0.2.66/32"]  # fmt: skip
HOPS = [Nexthop(UP1, ip_address("203.0.113.1")), Nexthop(UP2, ip_address("198.51.100.1")), Nexthop(PPP),
        Nexthop(LAN)]  # fmt: skip
SOURCES = ["10.0.0.5", "10.0.1.2", "10.0.1.255", "10.0.2.3", "10.255.255.254", "192.0.2.9", "8.8.8.8",
           "203.0.113.5", "127.0.0.1", "100.64.0.1", "192.0.2.200"]  # fmt: skip
DESTS = ["8.8.8.8", "8.8.4.4", "8.8.9.1", "8.9.0.1", "192.0.2.9", "192.0.2.130", "192.0.2.66", "192.0.2.127",
         "192.0.2.128", "198.51.100.4", "198.51.100.200", "10.0.0.5", "203.0.113.5", "10.0.1.7",
         "203.0.113.77", "100.64.0.1"]  # fmt: skip
PORTS = [53, 80, 1000, 1005, 1010, 5353, 6000, 6001]


@st.composite
def routes(draw: st.DrawFn, table: int) -> list[Route]:
    chosen = draw(st.lists(st.sampled_from(PREFIXES), max_size=5, unique=True))
    out = []
    for text in chosen:
        kind = draw(st.sampled_from([RouteType.UNICAST] * 4 + [RouteType.BLACKHOLE, RouteType.UNREACHABLE]))
        hops: tuple[Nexthop, ...] = ()
        if kind == RouteType.UNICAST:
            hops = tuple(draw(st.lists(st.sampled_from(HOPS), min_size=1, max_size=2, unique=True)))
        out.append(Route(ip_network(text), table, kind, hops, metric=draw(st.sampled_from([0, 100]))))
    return out


@st.composite
def topologies(draw: st.DrawFn) -> Topology:
    links = (Link(LO, "lo"), Link(LAN, "lan"), Link(UP1, "up1"), Link(UP2, "up2", up=draw(st.booleans())),
             Link(PPP, "ppp0"))  # fmt: skip
    addresses = list(BASE_ADDRESSES)
    if draw(st.booleans()):
        addresses.append(A(UP1, "203.0.113.77/25"))
    base = [
        Route(ip_network("10.0.0.0/8"), nexthops=(Nexthop(LAN),)),
        Route(ip_network("203.0.113.0/24"), nexthops=(Nexthop(UP1),)),
        Route(ip_network("198.51.100.0/24"), nexthops=(Nexthop(UP2),)),
    ]
    main = draw(routes(254))
    side = draw(routes(100))
    rules = []
    if draw(st.booleans()):
        sel = draw(st.sampled_from(["src", "dst", "fwmark"]))
        rules = [PolicyRule(AF_INET, 0, table=255), PolicyRule(AF_INET, 32766, table=254),
                 PolicyRule(AF_INET, 32767, table=253)]  # fmt: skip
        kw: dict[str, Any] = {}
        if sel == "src":
            kw["src"] = ip_network(draw(st.sampled_from(["10.0.1.0/24", "10.0.0.0/9", "192.0.2.0/24"])))
        elif sel == "dst":
            kw["dst"] = ip_network(draw(st.sampled_from(["8.8.8.0/24", "192.0.2.128/25"])))
        else:
            kw["fwmark"] = 1
        rules.append(PolicyRule(AF_INET, 100, table=100, invert=draw(st.booleans()), **kw))
    # Reverse-path filtering read (off, strict or loose) or not (strict): unpinned, a flow may have
    # entered on several interfaces, each an alternative of the prediction.
    known = draw(st.booleans())
    netconf = (Netconf("all", draw(st.sampled_from([0, 1, 2]))),) if known else ()
    return Topology(links, tuple(addresses), (*base, *main, *side), tuple(rules), netconf=netconf,
                    netconf_known=known)


@st.composite
def flows(draw: st.DrawFn) -> Flow:
    proto = draw(st.sampled_from([IPPROTO_UDP, IPPROTO_UDP, IPPROTO_TCP, IPPROTO_ICMP]))
    return Flow(
        AF_INET, proto, ip_address(draw(st.sampled_from(SOURCES))), ip_address(draw(st.sampled_from(DESTS))),
        draw(st.sampled_from([4000, 5353])), draw(st.sampled_from(PORTS)), draw(st.sampled_from([0, 1])),
        draw(st.sampled_from([0, 0, 1, 7])),
    )


def normal(p: Prediction) -> dict[str, Any]:
    """A prediction as a comparable value: unknowns by kind, a unicast egress without its route's text."""

    def known(v: Any) -> Any:
        return "unknown" if isinstance(v, Unknown) else v

    egress: Any = "unknown"
    if not isinstance(p.egress, Unknown):
        egress = frozenset(
            (e.kind, e.oif, e.oifname, e.gateway, e.masquerade_source, e.xfrm,
             e.route if e.kind is not EgressKind.UNICAST else "")
            for e in p.egress
        )  # fmt: skip
    return {"dnat": known(p.dnat), "snat": known(p.snat), "egress": egress, "ingress": known(p.ingress),
            "explain": p.explain, "alternatives": [normal(a) for a in p.alternatives]}  # fmt: skip


def key_of(c: Classifier, f: Flow, seen: int = 0) -> tuple[int, ...]:
    return c.key(f.family, f.proto, int(f.src), int(f.dst), f.sport, f.dport, f.zone, f.ct_mark, seen)


STATS = {"classes": 0, "shared": 0, "alternatives": 0}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topologies(), specs(), st.lists(flows(), min_size=10, max_size=40))
def test_flows_of_one_class_get_one_prediction(topology: Topology, spec: Any, batch: list[Flow]) -> None:
    rs = spec_ruleset(spec)
    c = Classifier.build([topology], [rs], sport_matters=True)
    assert c.exact
    fib = Fib(topology)
    by_class: dict[tuple[int, ...], list[Flow]] = defaultdict(list)
    for f in batch:
        by_class[key_of(c, f)].append(f)
    for members in by_class.values():
        STATS["classes"] += 1
        first = normal(predict(rs, fib, members[0]))
        for other in members[1:]:
            STATS["shared"] += 1
            assert normal(predict(rs, fib, other)) == first, (members[0], other)


def test_classes_were_shared() -> None:
    """The property above met classes of several flows (guards a vacuous test)."""
    if STATS["classes"] == 0:
        import pytest

        pytest.skip("run together with the property test")
    assert STATS["shared"] > 100


ACTUALS = ["none", "masq1", "masq2", "snat", "dnat"]


def entry_for(f: Flow, actual: str, seen: bool, ident: int) -> Entry:
    status = IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE | (IPS_SEEN_REPLY if seen else 0)
    reply_src, reply_dst = f.dst, f.src
    if actual == "masq1":
        reply_dst = ip_address("203.0.113.5")
    elif actual == "masq2":
        reply_dst = ip_address("198.51.100.7")
    elif actual == "snat":
        reply_dst = ip_address("192.0.2.1")
    elif actual == "dnat":
        reply_src = ip_address("10.0.0.5")
    orig = CtTuple(f.src, f.dst, f.sport, f.dport)
    if f.proto == IPPROTO_ICMP:  # the reply of an echo request: same id, type and code 0
        reply = CtTuple(reply_src, reply_dst, f.sport, 0)
    else:
        reply = CtTuple(reply_src, reply_dst, f.dport, f.sport)
    return Entry(f.family, f.proto, orig, reply, status, f.zone, f.ct_mark, ident, 30)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topologies(), topologies(), specs(), st.one_of(st.none(), specs()),
       st.lists(st.tuples(flows(), st.sampled_from(ACTUALS), st.booleans()), min_size=5, max_size=30))
def test_decide_with_classes_deletes_what_decide_per_flow_deletes(
    before: Topology, now: Topology, spec: Any, spec_before: Any, rows: list[tuple[Flow, str, bool]]
) -> None:
    """Also with the previous snapshot's own ruleset (``predict_before``), which narrows the
    alternatives an entry may have come by (``core.decide``)."""
    rs = spec_ruleset(spec)
    rs_before = spec_ruleset(spec_before) if spec_before is not None else rs
    entries = [entry_for(f, actual, seen, i) for i, (f, actual, seen) in enumerate(rows)]
    eligibility = Eligibility(protocols=frozenset({IPPROTO_UDP, IPPROTO_ICMP}))

    def bound(fib: Fib, flow: Flow) -> Prediction:
        return predict(rs, fib, flow)

    def bound_before(fib: Fib, flow: Flow) -> Prediction:
        return predict(rs_before, fib, flow)

    then = bound_before if spec_before is not None else None
    c = Classifier.build([before, now], [rs_before, rs], eligibility, sport_matters=True)
    assert c.exact, c.reason
    plain = decide(entries, predict=bound, fib_now=Fib(now), fib_before=Fib(before), eligibility=eligibility,
                   predict_before=then)
    classed = decide(entries, predict=bound, fib_now=Fib(now), fib_before=Fib(before), eligibility=eligibility,
                     classifier=c, predict_before=then)
    STATS["alternatives"] += sum(bool(bound(Fib(now), e.flow).alternatives) for e in entries)
    # Each decision's Reason too: its code and every field (rule lines, egress with its route
    # words, ways), hence its text.
    assert ([(d.entry, d.why) for d in classed.stale]
            == [(d.entry, d.why) for d in plain.stale])
    assert ([(d.entry, d.why) for d in classed.undecided]
            == [(d.entry, d.why) for d in plain.undecided])
    assert (classed.examined, classed.eligible) == (plain.examined, plain.eligible)
    assert classed.distinct_flows <= plain.distinct_flows


# -- the field maps ---------------------------------------------------------------------------


def test_routes_via_one_gateway_are_one_class_wherever_they_lie() -> None:
    """Ten thousand /24 routes via one gateway: one label, so one class besides the rest."""
    routes = [(int(IPv4Network(f"10.{i // 256}.{i % 256}.0/24").network_address),
               int(IPv4Network(f"10.{i // 256}.{i % 256}.0/24").broadcast_address), "via gw1")
              for i in range(0, 20_000, 2)]  # fmt: skip
    routes.append((0, (1 << 32) - 1, "default via gw0"))
    fmap = _field_map(32, [], [routes])
    assert fmap.count == 2
    assert fmap.lookup(int(ip_address("10.0.0.7"))) == fmap.lookup(int(ip_address("10.0.4.1")))
    assert fmap.lookup(int(ip_address("10.0.1.7"))) == fmap.lookup(int(ip_address("8.8.8.8")))
    assert fmap.lookup(int(ip_address("10.0.0.7"))) != fmap.lookup(int(ip_address("10.0.1.7")))


def test_longest_prefix_label_wins_and_ends_with_its_prefix() -> None:
    net = lambda t: (int(ip_network(t).network_address), int(ip_network(t).broadcast_address))  # noqa: E731
    fmap = _field_map(32, [], [[(*net("0.0.0.0/0"), "a"), (*net("192.0.2.0/24"), "b"),
                                (*net("192.0.2.128/25"), "a")]])  # fmt: skip
    at = lambda t: fmap.lookup(int(ip_address(t)))  # noqa: E731
    assert at("192.0.2.1") != at("8.8.8.8")
    assert at("192.0.2.200") == at("8.8.8.8")  # the /25 answers like the default
    assert at("192.0.3.0") == at("8.8.8.8")
    assert at("192.0.1.255") == at("8.8.8.8")
    assert fmap.count == 2


def test_membership_intervals_split_and_merge() -> None:
    fmap = _field_map(16, [(53, 53), (1000, 2000), (1500, 1500)])
    at = fmap.lookup
    assert len({at(0), at(52), at(54), at(999), at(2001), at(65535)}) == 1
    assert len({at(53), at(1000), at(1500), at(0)}) == 4
    assert at(1499) == at(1000) == at(2000)


def test_a_netmap_makes_classes_inexact() -> None:
    from topowatch.core.nat import Chain, Hook, NetmapStatement, Rule

    rule = Rule(1, (NetmapStatement(IPv4Network("10.9.0.0/16"), "NETMAP --to 10.9.0.0/16"),))
    chain = Chain("ip", "nat", "PREROUTING", (rule,), Hook.PREROUTING, -100, "nat", "accept")
    c = Classifier.build([Topology()], [NatRuleset((chain,))])
    assert not c.exact
    assert "NETMAP" in c.reason


def test_mark_classes_follow_zero_and_the_eligibility_masks() -> None:
    c = Classifier.build([Topology()], [NatRuleset(())], Eligibility(marks=((0x10, 0xF0),)))
    assert c.mark_class(0) != c.mark_class(1)
    assert c.mark_class(1) == c.mark_class(2)
    assert c.mark_class(0x11) == c.mark_class(0x1F) != c.mark_class(0x21)


# -- impact: every flow whose prediction changes is in the judged classes ----------------------


@st.composite
def route_changes(draw: st.DrawFn, topology: Topology) -> Topology:
    """The same gateway with one to three routes added, removed or replaced; sometimes also a
    link's state or an uplink's address changed (a change any flow may feel); rules kept."""
    routes = list(topology.routes)
    links, addresses = topology.links, topology.addresses
    also = draw(st.sampled_from(["", "", "", "up2 state", "address"]))
    if also == "up2 state":
        links = tuple(Link(x.index, x.name, up=not x.up) if x.name == "up2" else x for x in links)
    elif also == "address":
        extra = A(UP1, "203.0.113.77/25")
        addresses = tuple(a for a in addresses if a != extra) if extra in addresses else (*addresses, extra)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["add", "del", "replace"]))
        if op == "add" or not routes:
            routes += draw(routes_strategy(draw(st.sampled_from([254, 100]))))
        elif op == "del":
            routes.pop(draw(st.integers(0, len(routes) - 1)))
        else:
            i = draw(st.integers(0, len(routes) - 1))
            old = routes[i]
            hops = tuple(draw(st.lists(st.sampled_from(HOPS), min_size=1, max_size=2, unique=True)))
            routes[i] = Route(old.dst, old.table, RouteType.UNICAST, hops, metric=old.metric)
    return Topology(links, addresses, tuple(dict.fromkeys(routes)), topology.rules,
                    netconf=topology.netconf, netconf_known=topology.netconf_known)


routes_strategy = routes


def relevant(p0: Prediction, p1: Prediction) -> bool:
    """Whether an entry judged under ``p0`` (healthy or undecided) may be stale under ``p1`` (decide's rules)."""
    n0, n1 = normal(p0), normal(p1)
    if "unknown" not in (n1["dnat"], n1["snat"]):
        return (n0["dnat"], n0["snat"]) != (n1["dnat"], n1["snat"])
    return "unknown" not in (n0["egress"], n1["egress"]) and n0["egress"] != n1["egress"]


IMPACT_STATS = {"changed": 0}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), topologies(), specs(), st.lists(flows(), min_size=10, max_size=40))
def test_every_flow_whose_prediction_changes_is_judged(
    data: st.DataObject, before: Topology, spec: Any, batch: list[Flow]
) -> None:
    from topowatch.core.impact import impact

    now = data.draw(route_changes(before))
    rs = spec_ruleset(spec)
    scope = impact(before, now, rs)
    c = Classifier.build([before, now], [rs], sport_matters=True)
    only = c.classes_to_judge(scope)  # what the reactor judges under this scope
    fib0, fib1 = Fib(before), Fib(now)
    if not rs.base_chains(Hook.PREROUTING, AF_INET) and not rs.base_chains(Hook.POSTROUTING, AF_INET):
        return  # no NAT in the family: impact() says "no flow" by design (see its docstring)
    for f in batch:
        if not relevant(predict(rs, fib0, f), predict(rs, fib1, f)):
            continue
        IMPACT_STATS["changed"] += 1
        assert not scope.none, f
        if only is None:  # every class is judged
            assert scope.everything or not c.exact, scope
            continue
        assert any(f.src in net or f.dst in net for net in scope.prefixes), (f, scope)
        key = key_of(c, f)
        assert (AF_INET, key[5]) in only or (AF_INET, key[6]) in only, (f, scope)


def test_impact_met_changed_predictions() -> None:
    if IMPACT_STATS["changed"] == 0:
        import pytest

        pytest.skip("run together with the property test")
    assert IMPACT_STATS["changed"] > 50


def test_alternatives_were_met() -> None:
    """The decide property met predictions with alternatives (guards a vacuous extension)."""
    if STATS["classes"] == 0:
        import pytest

        pytest.skip("run together with the property tests")
    assert STATS["alternatives"] > 50
