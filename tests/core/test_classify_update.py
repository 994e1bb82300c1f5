"""core.classify: a classifier carried over a route change equals one built from scratch.

The property test seeds a kept topology (``core.livetopology``) with a random
gateway (nested prefixes in two IPv4 tables and an IPv6 one, several routes
per prefix by metric), applies random sequences of route adds, deletes and
replaces, and after each burst carries the last classifier over to the new
snapshots (``Classifier.updated``, told which routes changed by the kept
topology's lineage). The result must be the classifier ``build`` makes from
nothing: the same interval boundaries, one class for one class (numbers may
differ), so every flow falls in corresponding classes; checked on the
boundaries themselves, their neighbours and random addresses, and by judging
entries with the carried classifier against judging them one flow at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import ip_address, ip_network
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from topowatch.core.classify import Classifier, FieldMap
from topowatch.core.decide import decide
from topowatch.core.eligibility import Eligibility
from topowatch.core.evaluate import predict
from topowatch.core.fib import Fib
from topowatch.core.flow import IPPROTO_UDP, Flow, Prediction
from topowatch.core.livetopology import NLM_F_REPLACE, LiveTopology
from topowatch.core.model import (
    AF_INET,
    AF_INET6,
    Address,
    Link,
    Nexthop,
    PolicyRule,
    Route,
    RouteType,
    Topology,
    changed_routes,
)

from test_classify import ACTUALS, BASE_ADDRESSES, entry_for  # isort: skip
from test_evaluate import Spec, spec_ruleset, specs  # isort: skip

LO, LAN, UP1, UP2, PPP = 1, 2, 3, 4, 5
NLM_F_CREATE = 0x400
LINKS = (Link(LO, "lo"), Link(LAN, "lan"), Link(UP1, "up1"), Link(UP2, "up2"), Link(PPP, "ppp0"))
ADDRESSES = (*BASE_ADDRESSES, Address(UP1, ip_address("2001:db8:ff::2"), 64))
V4 = ["0.0.0.0/0", "8.0.0.0/8", "8.8.0.0/16", "8.8.8.0/24", "8.8.8.8/32", "8.8.9.0/24", "192.0.2.0/24",
      "192.0.2.0/25", "192.0.2.128/26", "192.0.2.66/32", "10.0.1.0/24", "198.51.100.0/25", "100.64.0.0/10"]  # fmt: skip
V6 = ["::/0", "2001:db8::/32", "2001:db8:1::/48", "2001:db8:1:2::/64", "2001:db8:1::5/128", "64:ff9b::/96"]
HOPS4 = [Nexthop(UP1, ip_address("203.0.113.1")), Nexthop(UP2, ip_address("198.51.100.1")), Nexthop(PPP),
         Nexthop(LAN)]  # fmt: skip
HOPS6 = [Nexthop(UP1, ip_address("2001:db8:ff::1")), Nexthop(UP2), Nexthop(PPP)]


@st.composite
def routes(draw: st.DrawFn) -> Route:
    """One route: IPv4 in main or table 100, IPv6 in main; a few kinds, hops and metrics."""
    v6 = draw(st.integers(0, 3)) == 0
    dst = ip_network(draw(st.sampled_from(V6 if v6 else V4)))
    table = 254 if v6 else draw(st.sampled_from([254, 254, 100]))
    kind = draw(st.sampled_from([RouteType.UNICAST] * 5 + [RouteType.BLACKHOLE, RouteType.UNREACHABLE]))
    hops: tuple[Nexthop, ...] = ()
    if kind == RouteType.UNICAST:
        pool = HOPS6 if v6 else HOPS4
        hops = tuple(draw(st.lists(st.sampled_from(pool), min_size=1, max_size=1 if v6 else 2, unique=True)))
    return Route(dst, table, kind, hops, metric=draw(st.sampled_from([0, 100] if not v6 else [1024, 256])))


@st.composite
def gateways(draw: st.DrawFn) -> Topology:
    base = [Route(ip_network("10.0.0.0/8"), nexthops=(Nexthop(LAN),)),
            Route(ip_network("203.0.113.0/24"), nexthops=(Nexthop(UP1),)),
            Route(ip_network("198.51.100.0/24"), nexthops=(Nexthop(UP2),))]  # fmt: skip
    rules: tuple[PolicyRule, ...] = ()
    if draw(st.booleans()):
        rules = (PolicyRule(AF_INET, 0, table=255), PolicyRule(AF_INET, 100, table=100,
                 src=ip_network(draw(st.sampled_from(["10.0.1.0/24", "10.0.0.0/9"])))),
                 PolicyRule(AF_INET, 32766, table=254), PolicyRule(AF_INET, 32767, table=253))  # fmt: skip
    return Topology(LINKS, ADDRESSES, (*base, *draw(st.lists(routes(), max_size=12))), rules)


@st.composite
def events(draw: st.DrawFn) -> tuple[str, Route]:
    return draw(st.sampled_from(["add", "add", "del", "replace"])), draw(routes())


def seeded(topology: Topology) -> LiveTopology:
    """The kept topology of a dump of ``topology`` (routes of one key: the first one wins)."""
    live = LiveTopology.seed(topology)
    if live is None:
        from topowatch.core.livetopology import route_key

        unique = {route_key(r): r for r in reversed(topology.routes)}
        live = LiveTopology.seed(Topology(topology.links, topology.addresses,
                                          tuple(r for r in topology.routes if unique[route_key(r)] is r),
                                          topology.rules))  # fmt: skip
    assert live is not None
    return live


def apply(live: LiveTopology, kind: str, route: Route) -> bool:
    """Apply an event as the kernel would announce it; False where the kept topology gives up."""
    if kind == "del":
        present = [r for r in live.routes.values() if (r.dst, r.table, r.metric) == (route.dst, route.table,
                                                                                     route.metric)]  # fmt: skip
        route = present[0] if present else route
        return live.apply("route", False, route)
    flags = NLM_F_CREATE | (NLM_F_REPLACE if kind == "replace" else 0x200)
    return live.apply("route", True, route, flags)


def correspond(a: FieldMap, b: FieldMap) -> None:
    """One class in ``a`` for one class in ``b`` on every interval: a bijection of class numbers."""
    assert list(a.starts) == list(b.starts)
    pairs = set(zip(a.classes, b.classes, strict=True))
    assert len({x for x, _ in pairs}) == len(pairs) == len({y for _, y in pairs})
    assert a.count == b.count


def values_to_check(fmap: FieldMap, bits: int, extra: Sequence[int]) -> list[int]:
    top = (1 << bits) - 1
    out = list(extra)
    for s in fmap.starts:
        out += [s, max(s - 1, 0), min(s + 1, top)]
    return out


def same_classifier(carried: Classifier, built: Classifier, extra: Sequence[int]) -> None:
    for family, bits in ((AF_INET, 32), (AF_INET6, 128)):
        correspond(carried.src[family], built.src[family])
        assert carried.dst[family] is carried.src[family]
        mapping: dict[int, int] = {}
        for v in values_to_check(built.src[family], bits, [x % (1 << bits) for x in extra]):
            got, want = carried.src[family].lookup(v), built.src[family].lookup(v)
            assert mapping.setdefault(got, want) == want, (family, v)
    assert list(carried.ports.starts) == list(built.ports.starts)
    assert (carried.exact, carried.reason, carried.marks) == (built.exact, built.reason, built.marks)
    assert carried.class_count == built.class_count
    one, other = carried.packed(), built.packed()
    assert (one is None) == (other is None) and len(one or b"") == len(other or b"")


def ties(topology: Topology) -> bool:
    """Two routes of one prefix, table, TOS and metric (IPv6 routes through different hops)."""
    keys = [(r.family, r.table, r.dst, r.tos, r.metric) for r in topology.routes]
    return len(keys) != len(set(keys))


STATS = {"carried": 0, "declined": 0, "events": 0}
ELIGIBILITY = Eligibility(protocols=frozenset({IPPROTO_UDP}))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gateways(), specs(), st.lists(st.lists(events(), min_size=1, max_size=3), min_size=1, max_size=5),
       st.lists(st.integers(0, (1 << 128) - 1), min_size=20, max_size=20), st.booleans())  # fmt: skip
def test_a_classifier_carried_over_route_changes_is_the_one_built_from_scratch(
    gateway: Topology, spec: Any, bursts: list[list[tuple[str, Route]]], extra: list[int], joint: bool
) -> None:
    rs = spec_ruleset(spec)
    live = seeded(gateway)
    before = live.snapshot()
    current = Classifier.build([before], [rs], ELIGIBILITY, reuse=False)
    for burst in bursts:
        for kind, route in burst:
            STATS["events"] += apply(live, kind, route)
        now = live.snapshot()
        shape = [before, now] if joint else [now]
        carried = current.updated(shape, [rs], ELIGIBILITY)
        built = Classifier.build(shape, [rs], ELIGIBILITY, reuse=False)
        if carried is None:  # IPv6 routes of one prefix and metric: their order is the kernel's
            STATS["declined"] += 1
            assert ties(before) or ties(now)
            current = built
        else:
            STATS["carried"] += 1
            same_classifier(carried, built, extra)
            current = carried
        before = now


def test_carried_classifiers_were_compared() -> None:
    """The property above carried classifiers over many times (guards a vacuous test)."""
    if STATS["events"] == 0:
        pytest.skip("run together with the property test")
    assert STATS["carried"] > 100 and STATS["carried"] > 3 * STATS["declined"], STATS


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gateways(), specs(), st.lists(events(), min_size=1, max_size=3),
       st.lists(st.tuples(st.sampled_from(["8.8.8.8", "8.8.9.1", "192.0.2.70", "192.0.2.130", "10.0.1.9",
                                            "100.64.3.3", "9.9.9.9"]),
                          st.sampled_from(["10.0.1.2", "10.0.2.2", "192.0.2.9"]),
                          st.sampled_from(ACTUALS), st.booleans()), min_size=5, max_size=20))  # fmt: skip
def test_a_carried_classifier_judges_as_the_per_flow_evaluator(
    gateway: Topology, spec: Any, burst: list[tuple[str, Route]], rows: list[tuple[str, str, str, bool]]
) -> None:
    rs = spec_ruleset(spec)
    live = seeded(gateway)
    before = live.snapshot()
    start = Classifier.build([before], [rs], ELIGIBILITY, reuse=False)
    for kind, route in burst:
        apply(live, kind, route)
    now = live.snapshot()
    carried = start.updated([before, now], [rs], ELIGIBILITY)
    if carried is None:
        return
    flows = [Flow(AF_INET, IPPROTO_UDP, ip_address(src), ip_address(dst), 4000 + i, 53, 0, 0)
             for i, (dst, src, _, _) in enumerate(rows)]  # fmt: skip
    entries = [entry_for(f, actual, seen, i) for i, (f, (_, _, actual, seen)) in enumerate(zip(flows, rows,
                                                                                              strict=True))]

    def bound(fib: Fib, flow: Flow) -> Prediction:
        return predict(rs, fib, flow)

    fib0, fib1 = Fib(before), Fib(now)
    plain = decide(entries, predict=bound, fib_now=fib1, fib_before=fib0, eligibility=ELIGIBILITY)
    classed = decide(entries, predict=bound, fib_now=fib1, fib_before=fib0, eligibility=ELIGIBILITY,
                     classifier=carried)  # fmt: skip
    # Each decision's Reason too: its code and every field (rule lines, egress with its route
    # words, ways), hence its text.
    assert ([(d.entry, d.why) for d in classed.stale]
            == [(d.entry, d.why) for d in plain.stale])
    assert ([(d.entry, d.why) for d in classed.undecided]
            == [(d.entry, d.why) for d in plain.undecided])


def test_a_reasons_route_is_the_flows_own_route() -> None:
    """Found by the property above (seed 24741): no NAT rule, the default route and 8.0.0.0/8 via
    one gateway, an entry to 192.0.2.70 masqueraded. It is stale either way; its reason must name
    the default route, which carries it, not 8.0.0.0/8, which carries the class's first flow."""
    base = (Route(ip_network("10.0.0.0/8"), nexthops=(Nexthop(LAN),)),
            Route(ip_network("203.0.113.0/24"), nexthops=(Nexthop(UP1),)),
            Route(ip_network("198.51.100.0/24"), nexthops=(Nexthop(UP2),)),
            Route(ip_network("0.0.0.0/0"), nexthops=(HOPS4[0],)))  # fmt: skip
    before = Topology(LINKS, ADDRESSES, base)
    now = Topology(LINKS, ADDRESSES, (*base, Route(ip_network("8.0.0.0/8"), nexthops=(HOPS4[0],))))
    rs = spec_ruleset(Spec(pre_chains=[], post_chains=[], regular={}))
    rows = [("8.8.8.8", "none"), ("192.0.2.70", "masq1")]
    entries = [entry_for(Flow(AF_INET, IPPROTO_UDP, ip_address("10.0.1.2"), ip_address(dst), 4000 + i, 53, 0, 0),
                         actual, False, i) for i, (dst, actual) in enumerate(rows)]  # fmt: skip

    def bound(fib: Fib, flow: Flow) -> Prediction:
        return predict(rs, fib, flow)

    classifier = Classifier.build([before, now], [rs], ELIGIBILITY, reuse=False)
    classed = decide(entries, predict=bound, fib_now=Fib(now), fib_before=Fib(before), eligibility=ELIGIBILITY,
                     classifier=classifier)  # fmt: skip
    (stale,) = classed.stale
    assert stale.entry.orig.dst == ip_address("192.0.2.70")
    assert stale.why.egress is not None
    assert [e.prefix for e in stale.why.egress] == [ip_network("0.0.0.0/0")]


# -- examples ---------------------------------------------------------------------------------


def big_gateway(n: int) -> Topology:
    hops = HOPS4[:3]
    out = [Route(ip_network("0.0.0.0/0"), nexthops=(hops[0],))]
    out += [Route(ip_network(f"100.{64 + i // 256}.{i % 256}.0/24"), nexthops=(hops[i % 3],)) for i in range(n)]
    return Topology(LINKS, ADDRESSES, tuple(out))


def test_build_carries_the_last_classifier_over_a_route_event_and_keeps_untouched_class_numbers() -> None:
    live = LiveTopology.seed(big_gateway(2000))
    assert live is not None
    t0 = live.snapshot()
    first = Classifier.build([t0], [])
    moved = Route(ip_network("100.64.7.0/24"), nexthops=(HOPS4[0],))  # was via HOPS4[7 % 3]
    assert live.apply("route", True, moved, NLM_F_REPLACE)
    t1 = live.snapshot()
    second = Classifier.build([t0, t1], [])
    assert second._lineage is not None and first._lineage is not None
    assert second._lineage.index is first._lineage.index  # carried over, not built again
    same_classifier(second, Classifier.build([t0, t1], [], reuse=False), [])

    def at(c: Classifier, text: str) -> int:
        return c.src[AF_INET].lookup(int(ip_address(text)))

    assert at(second, "100.64.8.1") == at(first, "100.64.8.1")  # an untouched class keeps its number
    # The moved /24 answers otherwise in t0 than in t1: a class of its own.
    assert at(second, "100.64.7.1") not in {at(second, "100.64.4.1"), at(second, "100.64.6.1"), at(second, "8.8.8.8")}
    assert live.apply("route", False, moved)
    t2 = live.snapshot()
    third = Classifier.build([t2], [])  # the newest alone: the differences of the pair go
    assert third._lineage is not None and third._lineage.index is first._lineage.index
    same_classifier(third, Classifier.build([t2], [], reuse=False), [])
    assert at(third, "100.64.7.1") == at(third, "8.8.8.8") == at(first, "8.8.8.8")  # the default's class


def test_anything_but_routes_changing_builds_again() -> None:
    live = LiveTopology.seed(big_gateway(50))
    assert live is not None
    t0 = live.snapshot()
    first = Classifier.build([t0], [])
    assert live.apply("link", True, Link(UP2, "up2", up=True, kind="veth"))  # a field labels do not read
    assert first.updated([live.snapshot()], []) is not None
    assert live.apply("link", True, Link(6, "wg0"))
    assert first.updated([live.snapshot()], []) is None  # links changed: what a label reads may have
    assert first.updated([t0], [object()]) is None  # another ruleset
    assert first.updated([t0], [], Eligibility(marks=((1, 1),))) is None
    unrelated = Topology(LINKS, ADDRESSES, big_gateway(51).routes)
    assert first.updated([unrelated], []) is None  # no lineage joins them
    assert first.updated([unrelated], [], changes=changed_routes) is not None  # told what changed


FIB_STATS = {"carried": 0, "built": 0}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gateways(), st.lists(st.lists(events(), min_size=1, max_size=3), min_size=1, max_size=5),
       st.lists(st.integers(0, (1 << 128) - 1), min_size=10, max_size=10))  # fmt: skip
def test_a_fib_carried_over_route_changes_is_the_one_built_from_scratch(
    gateway: Topology, bursts: list[list[tuple[str, Route]]], extra: list[int]
) -> None:
    """``Fib(now, previous=)`` keeps the previous snapshot's tables with the changed routes: the same
    tables and the same lookups as ``Fib(now)``."""
    live = seeded(gateway)
    fib = Fib(live.snapshot())
    for burst in bursts:
        for kind, route in burst:
            apply(live, kind, route)
        now = live.snapshot()
        carried, built = Fib(now, previous=fib), Fib(now)
        FIB_STATS["carried" if Fib(now)._carry(fib) else "built"] += 1
        assert carried._tables == built._tables
        assert carried._prefixlens == built._prefixlens
        for value in [*extra, *(int(r.dst.network_address) for r in now.routes)]:
            for family, bits in ((AF_INET, 32), (AF_INET6, 128)):
                dst = ip_address(value % (1 << bits)) if family == AF_INET6 else ip_address(value % (1 << 32))
                if (dst.version == 6) != (family == AF_INET6):
                    continue
                assert carried.lookup(dst) == built.lookup(dst)
        fib = carried


def test_carried_fibs_were_compared() -> None:
    if not FIB_STATS["carried"]:
        pytest.skip("run together with the property test")
    assert FIB_STATS["carried"] > 100, FIB_STATS
