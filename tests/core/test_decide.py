"""decide(): table-driven cases and a property test against an independent judge."""

from __future__ import annotations

import dataclasses
import enum
import itertools
from dataclasses import dataclass
from ipaddress import IPv4Address, ip_address
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topowatch.core.conntrack import (
    IPS_ASSURED,
    IPS_CONFIRMED,
    IPS_DST_NAT_DONE,
    IPS_SEEN_REPLY,
    IPS_SRC_NAT,
    IPS_SRC_NAT_DONE,
    CtTuple,
    Entry,
)
from topowatch.core.decide import Decider, FlushPlan, decide
from topowatch.core.eligibility import Eligibility
from topowatch.core.fib import Fib
from topowatch.core.flow import (
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    NO_NAT,
    Binding,
    Egress,
    EgressKind,
    Flow,
    NatKind,
    Prediction,
    Unknown,
)
from topowatch.core.model import AF_INET, Topology
from topowatch.core.reason import Reason, ReasonCode

CLIENT = IPv4Address("10.0.1.2")
SERVER = IPv4Address("192.0.2.10")
UNREPLIED = IPS_CONFIRMED | IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE
REPLIED = UNREPLIED | IPS_SEEN_REPLY | IPS_ASSURED
FIB_NOW = Fib(Topology())
FIB_BEFORE = Fib(Topology(links=()))

UP1 = Egress(EgressKind.UNICAST, 2, "up1", IPv4Address("198.51.100.1"), IPv4Address("198.51.100.2"))
UP2 = Egress(EgressKind.UNICAST, 3, "up2", IPv4Address("203.0.113.1"), IPv4Address("203.0.113.2"))


def entry(
    snat_to: str | None = None,
    *,
    status: int = UNREPLIED,
    proto: int = IPPROTO_UDP,
    sport: int = 5060,
    nat_port: int | None = None,
    dnat_to: str | None = None,
) -> Entry:
    src_after = ip_address(snat_to) if snat_to else CLIENT
    dst_after = ip_address(dnat_to) if dnat_to else SERVER
    if snat_to:
        status |= IPS_SRC_NAT
    return Entry(
        family=AF_INET,
        proto=proto,
        orig=CtTuple(CLIENT, SERVER, sport, 5060),
        reply=CtTuple(dst_after, src_after, 5060, nat_port if nat_port is not None else sport),
        status=status,
    )


def masq(addr: str) -> Binding:
    return Binding(NatKind.MASQUERADE, ip_address(addr))


def fixed(pred_snat: frozenset[Binding] | Unknown, egress: tuple[Egress, ...] | Unknown = (UP2,)):
    def predictor(fib: Fib, flow: Flow) -> Prediction:
        return Prediction(dnat=frozenset({NO_NAT}), snat=pred_snat, egress=egress)

    return predictor


CASES = [
    # (name, entry, predicted snat, stale?, undecided?)
    ("null binding, now masquerade", entry(), frozenset({masq("203.0.113.2")}), True, False),
    ("snat fixed, now another", entry("100.64.0.2"), frozenset({masq("203.0.113.2")}), True, False),
    ("masquerade same address", entry("203.0.113.2"), frozenset({masq("203.0.113.2")}), False, False),
    ("snat equals masquerade", entry("203.0.113.2"), frozenset({Binding(NatKind.SNAT, ip_address("203.0.113.2"))}), False, False),
    ("null binding, still none", entry(), frozenset({NO_NAT}), False, False),
    ("masqueraded, now no NAT", entry("203.0.113.2"), frozenset({NO_NAT}), True, False),
    ("replied entry never judged", entry(status=REPLIED), frozenset({masq("203.0.113.2")}), False, False),
    ("tcp not eligible by default", entry(proto=IPPROTO_TCP), frozenset({masq("203.0.113.2")}), False, False),
    ("in range of alternatives (ECMP)", entry("198.51.100.2"),
     frozenset({masq("203.0.113.2"), masq("198.51.100.2")}), False, False),
    ("in address range", entry("192.0.2.77"),
     frozenset({Binding(NatKind.SNAT, ip_address("192.0.2.64"), ip_address("192.0.2.127"))}), False, False),
    ("outside address range", entry("192.0.2.200"),
     frozenset({Binding(NatKind.SNAT, ip_address("192.0.2.64"), ip_address("192.0.2.127"))}), True, False),
    ("port outside range", entry("203.0.113.2", nat_port=999),
     frozenset({Binding(NatKind.MASQUERADE, ip_address("203.0.113.2"), None, 1024, 2047)}), True, False),
    ("port inside range", entry("203.0.113.2", nat_port=1500),
     frozenset({Binding(NatKind.MASQUERADE, ip_address("203.0.113.2"), None, 1024, 2047)}), False, False),
    ("flow dropped now", entry(), frozenset(), False, False),
    ("unknown, no T0", entry(), Unknown("xt match policy"), False, True),
    # Late NAT: a side without its NAT_DONE bit never ran its NAT hook (no NAT chain then), and the
    # kernel never NATs a confirmed entry later: a null binding, judged like any other.
    ("no NAT hook ran, now masquerade", entry(status=IPS_CONFIRMED), frozenset({masq("203.0.113.2")}), True, False),
    ("no SNAT hook ran, now masquerade", entry(status=IPS_CONFIRMED | IPS_DST_NAT_DONE),
     frozenset({masq("203.0.113.2")}), True, False),
    ("no NAT hook ran, still none", entry(status=IPS_CONFIRMED), frozenset({NO_NAT}), False, False),
    ("no NAT hook ran, dropped now", entry(status=IPS_CONFIRMED), frozenset(), False, False),
    ("no NAT hook ran, unknown, no T0", entry(status=IPS_CONFIRMED), Unknown("xt match policy"), False, True),
    ("no NAT hook ran, tuples translated by hand", entry("100.64.0.2", status=IPS_CONFIRMED),
     frozenset({masq("203.0.113.2")}), False, False),
]


@pytest.mark.parametrize(("name", "e", "predicted", "stale", "undecided"), CASES, ids=[c[0] for c in CASES])
def test_table(name: str, e: Entry, predicted: frozenset[Binding] | Unknown, stale: bool, undecided: bool) -> None:
    plan = decide([e], predict=fixed(predicted), fib_now=FIB_NOW)
    assert (len(plan.stale) == 1) is stale, name
    assert (len(plan.undecided) == 1) is undecided, name
    for d in (*plan.stale, *plan.undecided):
        assert d.reason
    if stale:
        assert plan.stale[0].side == "snat"
        assert "now it would be" in plan.stale[0].reason


def test_unknown_prediction_uses_egress_change() -> None:
    def predictor(fib: Fib, flow: Flow) -> Prediction:
        egress = (UP2,) if fib is FIB_NOW else (UP1,)
        return Prediction(dnat=frozenset({NO_NAT}), snat=Unknown("meta secpath"), egress=egress)

    plan = decide([entry()], predict=predictor, fib_now=FIB_NOW, fib_before=FIB_BEFORE)
    assert len(plan.stale) == 1
    assert "egress changed from dev up1 via 198.51.100.1 to dev up2 via 203.0.113.1" in plan.stale[0].reason


def test_unknown_prediction_same_egress_is_left_alone() -> None:
    predictor = fixed(Unknown("meta secpath"), (UP1,))
    plan = decide([entry()], predict=predictor, fib_now=FIB_NOW, fib_before=FIB_BEFORE)
    assert plan.stale == () and plan.undecided == ()


def test_unknown_prediction_unknown_egress_is_undecided() -> None:
    predictor = fixed(Unknown("x"), Unknown("fwmark rule"))
    plan = decide([entry()], predict=predictor, fib_now=FIB_NOW, fib_before=FIB_BEFORE)
    assert plan.stale == () and len(plan.undecided) == 1


def test_dnat_side_judged() -> None:
    e = entry(dnat_to="10.0.9.9")
    dnat_now = frozenset({Binding(NatKind.DNAT, ip_address("10.0.9.10"))})

    def predictor(fib: Fib, flow: Flow) -> Prediction:
        return Prediction(dnat=dnat_now, snat=frozenset({NO_NAT}), egress=(UP1,))

    plan = decide([e], predict=predictor, fib_now=FIB_NOW)
    assert [d.side for d in plan.stale] == ["dnat"]


def test_flows_decided_once() -> None:
    calls = 0

    def predictor(fib: Fib, flow: Flow) -> Prediction:
        nonlocal calls
        calls += 1
        return Prediction(dnat=frozenset({NO_NAT}), snat=frozenset({masq("203.0.113.2")}), egress=(UP2,))

    entries = [entry(), entry(), entry(sport=5061)]
    plan = decide(entries, predict=predictor, fib_now=FIB_NOW)
    assert calls == 2
    assert plan.distinct_flows == 2
    assert len(plan.stale) == 3


def test_eligibility_filters() -> None:
    e_icmp = Entry(AF_INET, IPPROTO_ICMP, CtTuple(CLIENT, SERVER, 7, 8 << 8), CtTuple(SERVER, CLIENT, 7, 0))
    pred = fixed(frozenset({masq("203.0.113.2")}))
    assert len(decide([e_icmp], predict=pred, fib_now=FIB_NOW).stale) == 1
    only_udp = Eligibility(protocols=frozenset({IPPROTO_UDP}))
    assert decide([e_icmp], predict=pred, fib_now=FIB_NOW, eligibility=only_udp).stale == ()
    with_tcp = Eligibility(protocols=frozenset({IPPROTO_TCP}))
    assert len(decide([entry(proto=IPPROTO_TCP)], predict=pred, fib_now=FIB_NOW, eligibility=with_tcp).stale) == 1


# -- property: compare with an independent judge ------------------------------------------

ADDRS = [f"203.0.113.{i}" for i in range(1, 9)]


@dataclass(frozen=True)
class Case:
    translated: str | None  # None: no NAT
    nat_port: int
    predicted: tuple[tuple[str | None, int, int, tuple[int, int] | None], ...]  # (kind, lo, hi, ports)
    replied: bool


def independent_judge(case: Case) -> bool:
    """Stale iff UNREPLIED and no predicted binding covers the actual translated source/port."""
    if case.replied or not case.predicted:
        return False
    actual_addr = case.translated or str(CLIENT)
    for kind, lo, hi, ports in case.predicted:
        if kind is None:
            ok_addr = actual_addr == str(CLIENT)
        else:
            ok_addr = lo <= ADDRS.index(actual_addr) <= hi if actual_addr in ADDRS else False
        ok_port = ports is None or ports[0] <= case.nat_port <= ports[1]
        if ok_addr and ok_port:
            return False
    return True


binding_strategy = st.one_of(
    st.tuples(st.none(), st.just(0), st.just(0), st.none()),
    st.tuples(
        st.sampled_from(["snat", "masquerade"]),
        st.integers(0, 7),
        st.integers(0, 7),
        st.one_of(st.none(), st.tuples(st.integers(1000, 1100), st.integers(1100, 1200))),
    ).map(lambda t: (t[0], min(t[1], t[2]), max(t[1], t[2]), t[3])),
)


@given(
    st.builds(
        Case,
        translated=st.one_of(st.none(), st.sampled_from(ADDRS)),
        nat_port=st.integers(1000, 1200),
        predicted=st.lists(binding_strategy, max_size=3).map(tuple),
        replied=st.booleans(),
    )
)
@settings(max_examples=400, deadline=None)
def test_property_matches_independent_judge(case: Case) -> None:
    sport = 1100
    e = entry(case.translated, status=REPLIED if case.replied else UNREPLIED, sport=sport,
              nat_port=case.nat_port if case.translated else sport)
    if case.translated is None:
        case = Case(None, sport, case.predicted, case.replied)
    bindings = set()
    for kind, lo, hi, ports in case.predicted:
        if kind is None:
            bindings.add(NO_NAT)
        else:
            bindings.add(
                Binding(NatKind(kind), ip_address(ADDRS[lo]), ip_address(ADDRS[hi]),
                        ports[0] if ports else None, ports[1] if ports else None)
            )
    plan = decide([e], predict=fixed(frozenset(bindings)), fib_now=FIB_NOW)
    assert (len(plan.stale) == 1) == independent_judge(case)


def test_flows_sharing_a_key_decided_once_when_sport_does_not_matter() -> None:
    calls = 0

    def predictor(fib: Fib, flow: Flow) -> Prediction:
        nonlocal calls
        calls += 1
        return Prediction(dnat=frozenset({NO_NAT}), snat=frozenset({masq("203.0.113.2")}), egress=(UP2,))

    entries = [entry(sport=p) for p in range(1000, 1100)]
    plan = decide(entries, predict=predictor, fib_now=FIB_NOW, sport_matters=False)
    assert calls == 1 and plan.distinct_flows == 1
    assert len(plan.stale) == 100


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"rule": ["udp dport 53"]}, False),
        ({"rule": ["udp sport 53"]}, True),
        ("-A POSTROUTING -p udp --sport 53 -j MASQUERADE", True),
        (("-m multiport --sports 1:2",), True),
        (Binding(NatKind.SNAT, ip_address("192.0.2.1")), False),
        (CtTuple(CLIENT, SERVER, 5, 6), True),  # a field named sport with a value
        (object(), True),  # cannot look inside: assume the worst
    ],
)
def test_mentions_sport(value: object, expected: bool) -> None:
    from topowatch.core.decide import mentions_sport

    assert mentions_sport(value) is expected


def test_mentions_sport_sees_the_real_ruleset_ir() -> None:
    from topowatch.core.decide import mentions_sport
    from topowatch.edges.nft import parse_ruleset_json

    def ruleset(expr: list[dict[str, object]]) -> object:
        return parse_ruleset_json({"nftables": [
            {"table": {"family": "ip", "name": "t", "handle": 1}},
            {"chain": {"family": "ip", "table": "t", "name": "c", "handle": 1, "type": "nat",
                       "hook": "postrouting", "prio": 100, "policy": "accept"}},
            {"rule": {"family": "ip", "table": "t", "chain": "c", "handle": 2, "expr": expr}},
        ]})

    by_dport = ruleset([{"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}},
                                   "right": 53}}, {"masquerade": None}])
    by_sport = ruleset([{"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "sport"}},
                                   "right": 53}}, {"masquerade": None}])
    assert mentions_sport(by_dport) is False
    assert mentions_sport(by_sport) is True


@given(
    translated=st.one_of(st.none(), st.sampled_from(ADDRS)),
    nat_port=st.integers(1000, 1200),
    predicted=st.one_of(st.just(Unknown("x")), st.lists(binding_strategy, max_size=3).map(tuple)),
)
@settings(max_examples=300, deadline=None)
def test_fast_path_agrees_with_the_slow_path(translated: str | None, nat_port: int,
                                             predicted: Unknown | tuple[Any, ...]) -> None:
    """``_healthy`` may skip an entry only where the reasoned path would find nothing to say."""
    from topowatch.core.decide import _Compiled, _healthy, _side

    e = entry(translated, sport=1100, nat_port=nat_port if translated else 1100)
    if isinstance(predicted, Unknown):
        snat: frozenset[Binding] | Unknown = predicted
    else:
        snat = frozenset(
            NO_NAT if kind is None else Binding(NatKind(kind), ip_address(ADDRS[lo]), ip_address(ADDRS[hi]),
                                                ports[0] if ports else None, ports[1] if ports else None)
            for kind, lo, hi, ports in predicted
        )
    prediction = Prediction(dnat=frozenset({NO_NAT}), snat=snat, egress=(UP2,))
    slow = [_side(e, side, getattr(prediction, side), prediction, None) for side in ("dnat", "snat")]
    healthy = _healthy(e, _Compiled.of(prediction))
    if healthy:
        assert slow == [None, None]
    elif not isinstance(snat, Unknown):
        assert any(j is not None and j.stale for j in slow)


# -- the streaming Decider and its raw path --------------------------------------------


def to_raw(e: Entry) -> tuple[int, int, bytes, bytes, int, int, bytes, bytes, int, int, int, int, int, int, int]:
    """An entry as a dump edge hands it over raw (``core.decide.RawEntry``)."""
    o, r = e.orig, e.reply
    return (e.family, e.proto, o.src.packed, o.dst.packed, o.sport, o.dport, r.src.packed, r.dst.packed,
            r.sport, r.dport, e.status, e.zone, e.mark, e.id, e.timeout)


def from_raw(raw: tuple[Any, ...]) -> Entry:
    family, proto, osrc, odst, osport, odport, rsrc, rdst, rsport, rdport, status, zone, mark, i, t = raw
    return Entry(family, proto, CtTuple(ip_address(osrc), ip_address(odst), osport, odport),
                 CtTuple(ip_address(rsrc), ip_address(rdst), rsport, rdport), status, zone, mark, i, t)


def reference_plan(entries: list[Entry], predict: Any, eligibility: Eligibility, fib_before: Fib | None
                   ) -> tuple[int, list[tuple[Entry, Reason]], list[tuple[Entry, Reason]]]:
    """The reasoned path alone, per entry: no flow-key cache, no fast path, no memo; each verdict's
    ``Reason`` (its code and every field, hence its text)."""
    from topowatch.core.decide import _side

    eligible = 0
    stale, undecided = [], []
    for e in entries:
        if not eligibility.admits(e):
            continue
        eligible += 1
        p = predict(FIB_NOW, e.flow)
        before = predict(fib_before, e.flow) if fib_before is not None else None
        judged = [j for j in (_side(e, "dnat", p.dnat, p, before), _side(e, "snat", p.snat, p, before)) if j]
        chosen = next((j for j in judged if j.stale), None)
        if chosen is not None:
            stale.append((e, chosen.why))
            continue
        chosen = next((j for j in judged if j.undecided), None)
        if chosen is not None:
            undecided.append((e, chosen.why))
    return eligible, stale, undecided


V6_CLIENT, V6_SERVER = ip_address("2001:db8:1::2"), ip_address("2001:db8:2::10")
SNAT_POOL = ["203.0.113.2", "203.0.113.3", "100.64.0.2"]


@st.composite
def table_entries(draw: st.DrawFn) -> Entry:
    v6 = draw(st.booleans())
    proto = draw(st.sampled_from([IPPROTO_UDP, IPPROTO_TCP, 1 if not v6 else 58, 47]))
    client = V6_CLIENT if v6 else draw(st.sampled_from([CLIENT, ip_address("10.0.1.3")]))
    server = V6_SERVER if v6 else draw(st.sampled_from([SERVER, ip_address("192.0.2.11")]))
    sport = draw(st.sampled_from([1000, 1100, 5060]))
    dport = draw(st.sampled_from([53, 5060]))
    translated = client if v6 else ip_address(draw(st.sampled_from([str(CLIENT), *SNAT_POOL])))
    nat_port = draw(st.sampled_from([sport, 999, 1500]))
    if translated == client and draw(st.booleans()):
        nat_port = sport  # most unNATed entries keep their port
    status = IPS_CONFIRMED | draw(st.sampled_from([0, IPS_SEEN_REPLY])) | draw(
        st.sampled_from([IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE, IPS_SRC_NAT_DONE, IPS_DST_NAT_DONE, 0]))
    return Entry(
        family=10 if v6 else AF_INET, proto=proto, orig=CtTuple(client, server, sport, dport),
        reply=CtTuple(server, translated, dport, nat_port), status=status,
        zone=draw(st.sampled_from([0, 7])), mark=draw(st.sampled_from([0, 0x10])),
        id=draw(st.integers(0, 3)),
    )


def predictor_from(choice: int) -> Any:
    """Predictions that depend on the flow's key fields (never the sport): known, port ranges, unknown."""
    options: list[frozenset[Binding] | Unknown] = [
        frozenset({masq("203.0.113.2")}),
        frozenset({NO_NAT}),
        frozenset({Binding(NatKind.MASQUERADE, ip_address("203.0.113.2"), None, 1024, 2047), NO_NAT}),
        Unknown("xt match"),
        frozenset(),
    ]

    def predict(fib: Fib, flow: Flow) -> Prediction:
        if flow.family != AF_INET:
            return Prediction(dnat=frozenset({NO_NAT}), snat=frozenset({NO_NAT}), egress=(UP1,))
        pick = (choice + int(flow.dst) + flow.dport + flow.zone + flow.ct_mark) % len(options)
        egress = (UP1,) if fib is FIB_BEFORE and flow.dport == 53 else (UP2,)
        return Prediction(dnat=frozenset({NO_NAT}), snat=options[pick], egress=egress)

    return predict


@given(
    entries=st.lists(table_entries(), max_size=40),
    choice=st.integers(0, 4),
    sport_matters=st.booleans(),
    before=st.booleans(),
    eligibility=st.sampled_from([
        Eligibility(),
        Eligibility(unreplied_only=False, protocols=frozenset({IPPROTO_UDP, IPPROTO_TCP, 1})),
        Eligibility(zones=frozenset({7}), marks=((0x10, 0xF0),)),
    ]),
)
@settings(max_examples=300, deadline=None)
def test_decider_paths_agree_with_the_reasoned_path(
    entries: list[Entry], choice: int, sport_matters: bool, before: bool, eligibility: Eligibility
) -> None:
    """decide(), Decider.add and Decider.add_raw (mixed) find what the per-entry reasoned path finds."""
    from topowatch.core.decide import Decider

    predict = predictor_from(choice)
    fib_before = FIB_BEFORE if before else None
    eligible, stale, undecided = reference_plan(entries, predict, eligibility, fib_before)
    plans = [decide(entries, predict=predict, fib_now=FIB_NOW, fib_before=fib_before,
                    eligibility=eligibility, sport_matters=sport_matters)]
    for raw_every in (1, 2):
        decider = Decider(predict=predict, fib_now=FIB_NOW, fib_before=fib_before, eligibility=eligibility,
                          sport_matters=sport_matters, build=from_raw)
        for i, e in enumerate(entries):
            if i % raw_every == 0:
                decider.add_raw(to_raw(e))
            else:
                decider.add(e)
        plans.append(decider.plan())
    for plan in plans:
        assert plan.examined == len(entries)
        assert plan.eligible == eligible
        assert [(d.entry, d.why) for d in plan.stale] == stale
        assert [(d.entry, d.why) for d in plan.undecided] == undecided


def test_raw_path_builds_only_first_and_unhealthy_entries() -> None:
    from topowatch.core.decide import Decider

    built: list[tuple[Any, ...]] = []

    def build(raw: tuple[Any, ...]) -> Entry:
        built.append(raw)
        return from_raw(raw)

    healthy = [entry("203.0.113.2", sport=p, nat_port=p) for p in range(1000, 1100)]
    stale = [entry(sport=p) for p in range(2000, 2010)]
    decider = Decider(predict=fixed(frozenset({masq("203.0.113.2")})), fib_now=FIB_NOW,
                      sport_matters=False, build=build)
    for e in healthy + stale:
        decider.add_raw(to_raw(e))
    plan = decider.plan()
    assert plan.examined == 110 and plan.eligible == 110
    assert [d.entry for d in plan.stale] == stale
    assert len(built) == 1 + len(stale)  # the key's first entry, then each stale one


def test_raw_cache_rests_on_what_eligibility_reads() -> None:
    """Decider.add_raw caches admits() by flow key and SEEN_REPLY: a new selector must extend that key."""
    import dataclasses

    assert [f.name for f in dataclasses.fields(Eligibility)] == [
        "families", "protocols", "unreplied_only", "zones", "marks", "sources", "destinations", "alternatives",
    ]


def test_raw_path_needs_a_builder() -> None:
    from topowatch.core.decide import Decider

    decider = Decider(predict=fixed(frozenset({NO_NAT})), fib_now=FIB_NOW)
    with pytest.raises(ValueError, match=r"^Decider\.add_raw needs an entry builder$"):
        decider.add_raw(to_raw(entry()))


# -- counting: predictions scale with distinct flow keys, never with entries ------------------

# Seven flow keys that differ in one field each from the first: zone, mark, src, dst, proto, dport.
KEYS = [
    {},
    {"zone": 7},
    {"mark": 0x10},
    {"src": ip_address("10.0.1.3")},
    {"dst": ip_address("192.0.2.11")},
    {"proto": 136},  # UDP-Lite: connectionless, has ports
    {"dport": 53},
]


def keyed_entry(key: dict[str, Any], sport: int, snat_to: str | None = None) -> Entry:
    src, dst = key.get("src", CLIENT), key.get("dst", SERVER)
    dport = key.get("dport", 5060)
    translated = ip_address(snat_to) if snat_to else src
    return Entry(
        family=AF_INET, proto=key.get("proto", IPPROTO_UDP), orig=CtTuple(src, dst, sport, dport),
        reply=CtTuple(dst, translated, dport, sport), status=UNREPLIED | (IPS_SRC_NAT if snat_to else 0),
        zone=key.get("zone", 0), mark=key.get("mark", 0),
    )


def spread(n: int, keys: list[dict[str, Any]]) -> list[Entry]:
    """``n`` entries round-robin over ``keys``, each with its own source port; every 10th is stale."""
    return [keyed_entry(keys[i % len(keys)], 1024 + i % 60000, None if i % 10 == 0 else "203.0.113.2")
            for i in range(n)]


class CountingPredictor:
    """Predicts the same for every flow and records each call's FIB and flow key."""

    def __init__(self, snat: frozenset[Binding] | Unknown | None = None) -> None:
        self.snat = frozenset({masq("203.0.113.2")}) if snat is None else snat
        self.calls: list[tuple[Fib, tuple[Any, ...]]] = []

    def __call__(self, fib: Fib, flow: Flow) -> Prediction:
        self.calls.append((fib, (flow.zone, flow.ct_mark, flow.proto, flow.src, flow.dst, flow.dport)))
        return Prediction(dnat=frozenset({NO_NAT}), snat=self.snat, egress=(UP2,))


def run_paths(entries: list[Entry], predictor: CountingPredictor, fib_before: Fib | None = None
              ) -> dict[str, tuple[int, FlushPlan]]:
    """Predictor calls and plan of decide(), Decider.add and Decider.add_raw, each on its own."""
    from topowatch.core.decide import Decider

    out: dict[str, tuple[int, FlushPlan]] = {}
    predictor.calls.clear()
    plan = decide(entries, predict=predictor, fib_now=FIB_NOW, fib_before=fib_before, sport_matters=False)
    out["decide"] = (len(predictor.calls), plan)
    for path in ("add", "add_raw"):
        predictor.calls.clear()
        decider = Decider(predict=predictor, fib_now=FIB_NOW, fib_before=fib_before, sport_matters=False,
                          build=from_raw)
        for e in entries:
            if path == "add":
                decider.add(e)
            else:
                decider.add_raw(to_raw(e))
        out[path] = (len(predictor.calls), decider.plan())
    return out


def test_ten_thousand_entries_over_seven_flow_keys_are_seven_predictions() -> None:
    entries = spread(10_000, KEYS)
    predictor = CountingPredictor()
    for path, (calls, plan) in run_paths(entries, predictor).items():
        assert calls == 7, path
        assert plan.examined == plan.eligible == 10_000, path
        assert plan.distinct_flows == 7, path
        assert len(plan.stale) == 1000, path  # the unNATed tenth: the predictor says masquerade
    # On the raw path (the last run) too: each key predicted once, with the FIB of now.
    assert len({key for _, key in predictor.calls}) == 7
    assert all(fib is FIB_NOW for fib, _ in predictor.calls)


@pytest.mark.parametrize(("field", "values"), [("zone", [0, 1, 2, 3]), ("mark", [0, 0x1, 0x2, 0x3, 0x4])])
def test_zone_or_mark_split_flow_keys(field: str, values: list[int]) -> None:
    """Entries otherwise alike that differ in zone (or mark): one prediction more per value."""
    keys = [{field: v} for v in values]
    entries = spread(5_000, keys)
    for path, (calls, plan) in run_paths(entries, CountingPredictor()).items():
        assert calls == len(values), path
        assert plan.distinct_flows == len(values), path
    # The same entries folded onto one zone and mark are one key again.
    flat = [dataclasses.replace(e, zone=0, mark=0) for e in entries]
    for path, (calls, _plan) in run_paths(flat, CountingPredictor()).items():
        assert calls == 1, path


def test_unknown_prediction_adds_before_predictions_per_key() -> None:
    """With an unknown prediction, T0 is asked too: still per key, never per entry."""
    predictor = CountingPredictor(Unknown("xt match"))
    small = run_paths(spread(10_000, KEYS), predictor, fib_before=FIB_BEFORE)
    assert sum(fib is FIB_BEFORE for fib, _ in predictor.calls) in (7, 14)  # the raw path's run
    large = run_paths(spread(20_000, KEYS), predictor, fib_before=FIB_BEFORE)
    for path in ("decide", "add", "add_raw"):
        assert small[path][0] == large[path][0], path  # twice the entries, the same predictions
    assert small["decide"][0] == small["add"][0] == 14  # 7 now + 7 before
    # The raw path judges a key's first entry under its flow key and later ones under the raw
    # key, so T0 may be asked once under each: at most 7 now + 14 before.
    assert 14 <= small["add_raw"][0] <= 21


def _dnat_changed(fib: Fib, flow: Flow) -> Prediction:
    return Prediction(dnat=frozenset({Binding(NatKind.DNAT, ip_address("10.0.9.10"))}),
                      snat=frozenset({NO_NAT}), egress=(UP1,))


def _egress_moved(fib: Fib, flow: Flow) -> Prediction:
    return Prediction(dnat=frozenset({NO_NAT}), snat=Unknown("meta secpath"),
                      egress=(UP2,) if fib is FIB_NOW else (UP1,))


@pytest.mark.parametrize(
    ("e", "predict", "before", "code"),
    [
        (entry(), fixed(frozenset({masq("203.0.113.2")})), None, "null_binding_now_nat"),
        (entry("100.64.0.2"), fixed(frozenset({masq("203.0.113.2")})), None, "snat_changed"),
        (entry("203.0.113.2"), fixed(frozenset({NO_NAT})), None, "nat_now_none"),
        (entry(dnat_to="10.0.9.9"), _dnat_changed, None, "dnat_changed"),
        (entry(), _egress_moved, FIB_BEFORE, "egress_changed_unknown_nat"),
        (entry(), fixed(Unknown("x")), None, "unknown_nat"),
        (entry(), fixed(Unknown("x"), Unknown("fwmark rule")), FIB_BEFORE, "unknown_nat_unknown_egress"),
    ],
)
def test_reason_code_names_the_kind_of_staleness(e: Entry, predict: Any, before: Fib | None, code: str) -> None:
    """Each decision carries a code a program can count, next to the text a person reads."""
    from topowatch.core.decide import ReasonCode

    plan = decide([e], predict=predict, fib_now=FIB_NOW, fib_before=before)
    decisions = [*plan.stale, *plan.undecided]
    assert len(decisions) == 1
    assert decisions[0].code == code
    assert code in {c.value for c in ReasonCode}


def test_a_known_prediction_never_asks_the_previous_topology() -> None:
    """With a previous snapshot but every side predicted (no unknown, no alternatives), the
    previous topology has nothing to say: only the FIB of now is asked, once per flow key. The
    eleventh mutation run found ``Decider._compiled`` 16 (the previous prediction asked for every
    key) untested: it doubles the predictions of a reaction."""
    predictor = CountingPredictor()
    for path, (calls, plan) in run_paths(spread(2_000, KEYS), predictor, fib_before=FIB_BEFORE).items():
        assert calls == 7, path
        assert len(plan.stale) == 200, path
    assert all(fib is FIB_NOW for fib, _ in predictor.calls)


def test_an_unpredictable_sides_reason_names_the_rule_that_made_it_unknown() -> None:
    """``Reason.cause_rule`` (``plan --json``'s "cause_rule") is the rule of the side's Unknown,
    as ``core.evaluate`` names it (``test_an_unknown_names_the_rule_that_made_it_as_a_field``).
    The eleventh mutation run found ``_side`` 25, 35 (the rule dropped) untested."""
    from topowatch.core.flow import RuleRef

    rule = RuleRef("table inet nat chain postrouting", 4, 'oifname "up1" xt match policy accept')
    plan = decide([entry()], predict=fixed(Unknown("unmodelled expression: xt match policy", rule)), fib_now=FIB_NOW)
    (undecided,) = plan.undecided
    assert (undecided.code, undecided.why.cause_rule) == ("unknown_nat", rule)


# -- survivors of the mutation run (README "Mutation testing"): each test fails on its mutant --


def test_unknown_prediction_uplink_address_change_alone_is_stale() -> None:
    """The DSL reconnect: same uplink, same gateway, a new address. The egress changed.

    With an unknown SNAT prediction only the egress can condemn the entry; the
    masquerade source is part of it (mutant: the comparison ignores it).
    """
    before = Egress(EgressKind.UNICAST, 2, "ppp0", IPv4Address("100.64.0.1"), IPv4Address("100.64.7.8"))
    now = Egress(EgressKind.UNICAST, 2, "ppp0", IPv4Address("100.64.0.1"), IPv4Address("100.64.9.10"))

    def predictor(fib: Fib, flow: Flow) -> Prediction:
        return Prediction(dnat=frozenset({NO_NAT}), snat=Unknown("xt match policy"),
                          egress=(now,) if fib is FIB_NOW else (before,))

    plan = decide([entry("100.64.7.8")], predict=predictor, fib_now=FIB_NOW, fib_before=FIB_BEFORE)
    assert [d.side for d in plan.stale] == ["snat"] and plan.undecided == ()
    assert plan.stale[0].reason.endswith(
        "the flow's egress changed from dev ppp0 via 100.64.0.1 (masquerade source 100.64.7.8) "
        "to dev ppp0 via 100.64.0.1 (masquerade source 100.64.9.10)")
    # The same egress with the same address: nothing says the entry went stale.
    same = decide([entry("100.64.7.8")], predict=fixed(Unknown("xt match policy"), (before,)),
                  fib_now=FIB_NOW, fib_before=FIB_BEFORE)
    assert same.stale == () and same.undecided == ()


@pytest.mark.parametrize("xfrm", ["", "out 0.0.0.0/0 -> 0.0.0.0/0 tmpl esp"])
@pytest.mark.parametrize("change", ["kind", "oif", "gateway", "xfrm"])
def test_unknown_prediction_every_egress_field_counts(change: str, xfrm: str) -> None:
    base = Egress(EgressKind.UNICAST, 2, "up1", IPv4Address("198.51.100.1"), IPv4Address("198.51.100.2"),
                  xfrm=xfrm)
    other = {
        "kind": dataclasses.replace(base, kind=EgressKind.BLACKHOLE),
        "oif": dataclasses.replace(base, oif=5),
        "gateway": dataclasses.replace(base, gateway=IPv4Address("198.51.100.9")),
        "xfrm": dataclasses.replace(base, xfrm="" if xfrm else "out any tmpl esp"),
    }[change]

    def predictor(fib: Fib, flow: Flow) -> Prediction:
        return Prediction(dnat=frozenset({NO_NAT}), snat=Unknown("xt"), egress=(other,) if fib is FIB_NOW else (base,))

    plan = decide([entry()], predict=predictor, fib_now=FIB_NOW, fib_before=FIB_BEFORE)
    assert len(plan.stale) == 1


# A port-only DNAT (the address kept, the port changed): 192.0.2.10:5060 -> 192.0.2.10:5070.
PORT_ONLY_DNAT = Binding(NatKind.DNAT, IPv4Address("192.0.2.10"), IPv4Address("192.0.2.10"), 5070, 5070)
PORT_ONLY_SNAT = Binding(NatKind.SNAT, IPv4Address("10.0.1.2"), IPv4Address("10.0.1.2"), 40000, 40000)


@pytest.mark.parametrize("raw", [False, True])
@pytest.mark.parametrize("side", ["dnat", "snat"])
def test_port_only_nat_is_reported_as_nat_not_as_no_nat(side: str, raw: bool) -> None:
    """An entry whose side changed only the port carries that binding, not "no NAT".

    Another entry of the same flow key with no translation is judged first, so a
    judgement reused across the key (``Decider._side``) would hand over its "no NAT".
    """
    from topowatch.core.decide import Decider

    status = IPS_CONFIRMED | IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE
    plain = Entry(AF_INET, IPPROTO_UDP, CtTuple(CLIENT, SERVER, 5000, 5060), CtTuple(SERVER, CLIENT, 5060, 5000),
                  status=status)
    other = IPv4Address("192.0.2.30") if side == "dnat" else IPv4Address("100.64.0.9")
    if side == "dnat":
        odd = Entry(AF_INET, IPPROTO_UDP, CtTuple(CLIENT, SERVER, 5001, 5060),
                    CtTuple(SERVER, CLIENT, 5070, 5001), status=status)
        moved = Entry(AF_INET, IPPROTO_UDP, CtTuple(CLIENT, SERVER, 5002, 5060),
                      CtTuple(other, CLIENT, 5060, 5002), status=status)
    else:
        odd = Entry(AF_INET, IPPROTO_UDP, CtTuple(CLIENT, SERVER, 5001, 5060),
                    CtTuple(SERVER, CLIENT, 5060, 40000), status=status)
        moved = Entry(AF_INET, IPPROTO_UDP, CtTuple(CLIENT, SERVER, 5002, 5060),
                      CtTuple(SERVER, other, 5060, 5002), status=status)
    elsewhere = frozenset({Binding(NatKind.DNAT if side == "dnat" else NatKind.SNAT, IPv4Address("192.0.2.20"))})

    def predictor(fib: Fib, flow: Flow) -> Prediction:
        none = frozenset({NO_NAT})
        return Prediction(dnat=elsewhere if side == "dnat" else none, snat=elsewhere if side == "snat" else none,
                          egress=())

    for order in itertools.permutations((plain, odd, moved)):  # a judgement reused across the key shows in some order
        decider = Decider(predict=predictor, fib_now=FIB_NOW, sport_matters=False, build=from_raw)
        for e in order:
            if raw:
                decider.add_raw(to_raw(e))
            else:
                decider.add(e)
        check_port_only(side, sorted(decider.plan().stale, key=lambda d: d.entry.orig.sport), other)


def check_port_only(side: str, stale: list[Any], other: IPv4Address) -> None:
    assert [d.entry.orig.sport for d in stale] == [5000, 5001, 5002]
    first, second, third = stale
    # The address translated, the port kept: that translation, not the first entry's "no NAT".
    if side == "dnat":
        assert third.actual == Binding(NatKind.DNAT, other, other, 5060, 5060)
    else:
        assert third.actual == Binding(NatKind.SNAT, other, other, 5002, 5002)
    assert first.actual == NO_NAT
    if side == "dnat":
        assert first.reason == "destination is 192.0.2.10 (no NAT), but now it would be dnat to 192.0.2.20 (egress none)"
        assert second.actual == PORT_ONLY_DNAT
        assert second.reason == ("destination is dnat to 192.0.2.10:5070 (192.0.2.10 -> 192.0.2.10), "
                                 "but now it would be dnat to 192.0.2.20 (egress none)")
    else:
        assert first.reason == "source is 10.0.1.2 (no NAT), but now it would be snat to 192.0.2.20 (egress none)"
        assert second.actual == PORT_ONLY_SNAT
        assert second.reason == ("source is snat to 10.0.1.2:40000 (10.0.1.2 -> 10.0.1.2), "
                                 "but now it would be snat to 192.0.2.20 (egress none)")


def test_port_only_dnat_in_plan_json() -> None:
    from topowatch.core.decide import Decision
    from topowatch.report import decision_json

    e = Entry(AF_INET, IPPROTO_UDP, CtTuple(CLIENT, SERVER, 5001, 5060), CtTuple(SERVER, CLIENT, 5070, 5001))
    actual = e.actual_dnat()
    assert actual == PORT_ONLY_DNAT
    out = decision_json(Decision(e, Reason(ReasonCode.DNAT_CHANGED, "dnat", actual, SERVER, SERVER)))
    assert out["actual"] == {"kind": "dnat", "addr": "192.0.2.10", "ports": [5070, 5070]}


# -- mentions_sport, worked out by hand: what each kind of value says, and the depth limit ------


class Named(enum.Enum):
    PLAIN = "plain"
    BY_VALUE = "match SPORT"  # the value names a source port (any case)
    SPORT_BY_NAME = "x"  # the name does


@dataclass(frozen=True)
class Box:
    item: object


@dataclass(frozen=True)
class Ports:
    sport: object = None
    dport: int = 0


def nested(levels: int, wrap: Any, leaf: object = "leaf") -> object:
    for _ in range(levels):
        leaf = wrap(leaf)
    return leaf


SPORT_CASES: list[tuple[str, object, bool]] = [
    ("text without", "udp dport 53", False),
    ("text with", "udp sport 53", True),
    ("text in upper case is another word", "SPORT", False),
    ("enum, neither", Named.PLAIN, False),
    ("enum, by its value in any case", Named.BY_VALUE, True),
    ("enum, by its name in any case", Named.SPORT_BY_NAME, True),
    ("number", 53, False),
    ("bytes", b"sport", False),
    ("None", None, False),
    ("address", ip_address("192.0.2.1"), False),
    ("dict key", {"sport": 1}, True),
    ("dict value", {"k": "sport"}, True),
    ("dict, neither", {"k": "dport"}, False),
    ("list", ["a", "sport"], True),
    ("frozenset", frozenset({"a"}), False),
    ("dataclass field named sport, set", Ports(sport=1), True),
    ("dataclass field named sport, 0", Ports(sport=0), False),
    ("dataclass field named sport, empty tuple", Ports(sport=()), False),
    ("dataclass field named sport, empty frozenset", Ports(sport=frozenset()), False),
    ("dataclass field named sport, None", Ports(sport=None), False),
    ("dataclass field named sport, 2", Ports(sport=2), True),
    ("dataclass field value names it", Box("sport 1"), True),
    ("a dataclass class itself is opaque", Ports, True),
    ("opaque object", object(), True),
    # Depth: a leaf under 64 containers is read; under 65 the walk gives up and answers True.
    ("64 tuples", nested(64, lambda v: (v,)), False),
    ("65 tuples", nested(65, lambda v: (v,)), True),
    ("64 lists", nested(64, lambda v: [v]), False),
    ("65 lists", nested(65, lambda v: [v]), True),
    ("64 dict values", nested(64, lambda v: {"k": v}), False),
    ("65 dict values", nested(65, lambda v: {"k": v}), True),
    ("64 dataclasses", nested(64, Box), False),
    ("65 dataclasses", nested(65, Box), True),
    # A dict's key is a level below it, as its value is.
    ("a dict key over 63 tuples", {nested(63, lambda v: (v,)): 0}, False),
    ("a dict key over 64 tuples", {nested(64, lambda v: (v,)): 0}, True),
]


@pytest.mark.parametrize(("value", "expected"), [c[1:] for c in SPORT_CASES], ids=[c[0] for c in SPORT_CASES])
def test_mentions_sport_by_kind_and_depth(value: object, expected: bool) -> None:
    from topowatch.core.decide import mentions_sport

    assert mentions_sport(value) is expected


# -- programs: the bounds compile_program accepts ----------------------------------------------


def test_programs_take_every_value_that_fits_and_refuse_the_rest() -> None:
    from topowatch.core.decide import compile_program

    top = (1 << 128) - 1
    assert compile_program(((0, 0, 0, 0, False),), ()) == (
        b"P\x02\x01" + b"\x03" + bytes(16) + bytes(16) + b"\x00\x00\x00\x00" + b"\x01")
    assert compile_program(((top, top, 0xFFFF, 0xFFFF, False),), ()) == (
        b"P\x02\x01" + b"\x03" + b"\xff" * 16 + b"\xff" * 16 + b"\xff\xff\xff\xff" + b"\x01")
    assert compile_program(((1 << 128, 1 << 128, None, None, False),), ()) is None
    assert compile_program(((0, 1 << 128, None, None, False),), ()) is None
    assert compile_program(((None, None, 0x10000, 0x10000, False),), ()) is None
    assert compile_program(((None, None, 0, 0x10000, False),), ()) is None
    assert compile_program(((None, None, -1, 5, False),), ()) is None
    assert compile_program(((None, None, 5, -1, False),), ()) is None
    assert compile_program(((0, -1, None, None, False),), ()) is None
    many = tuple((None, None, None, None, False) for _ in range(255))
    program = compile_program((), many)
    assert program == b"P\x01\x02\xff" + bytes(37) * 255
    kept = compile_program(((None, None, None, None, True),), ())
    assert kept == b"P\x02\x01" + b"\x04" + bytes(36) + b"\x01", "flag 4: the port must be the original one"


# -- the raw path's keys -------------------------------------------------------------------------


@pytest.mark.parametrize("sport_matters", [False, True])
def test_a_raw_entrys_program_is_found_by_its_key(sport_matters: bool) -> None:
    """After ``add_raw``, ``raw_program`` finds the key's checks for an UNREPLIED entry of it."""
    from topowatch.core.decide import Decider

    predicted = frozenset({masq("203.0.113.2")})
    decider = Decider(predict=fixed(predicted), fib_now=FIB_NOW, sport_matters=sport_matters, build=from_raw)
    raw = to_raw(entry("203.0.113.2"))
    assert decider.raw_program(raw) is None  # not seen yet
    decider.add_raw(raw)
    masq_value = int(IPv4Address("203.0.113.2"))
    assert decider.raw_program(raw) == (b"P" + b"\x02\x01" + b"\x04" + bytes(36)  # dnat: no NAT, port kept
                                        + b"\x02\x01" + b"\x01" + masq_value.to_bytes(16, "big") * 2 + bytes(4))


@pytest.mark.parametrize("unknown", ["snat", "dnat"])
@pytest.mark.parametrize("path", ["add", "add_raw", "judge_raw"])
def test_each_keys_before_prediction_is_its_own(path: str, unknown: str) -> None:
    """Every way in (``add``, ``add_raw``, the compiled scan's ``judge_raw``) keeps the egress before per key.

    Two keys, neither egress changed (A: up1 then up1; B: up2 then up2): nothing is stale.
    """
    from topowatch.core.decide import Decider

    server_b = IPv4Address("192.0.2.11")

    def predictor(fib: Fib, flow: Flow) -> Prediction:
        egress = (UP1,) if flow.dst == SERVER else (UP2,)
        if unknown == "dnat":
            return Prediction(dnat=Unknown("xt"), snat=frozenset({NO_NAT}), egress=egress)
        return Prediction(dnat=frozenset({NO_NAT}), snat=Unknown("xt"), egress=egress)

    decider = Decider(predict=predictor, fib_now=FIB_NOW, fib_before=FIB_BEFORE, sport_matters=False,
                      build=from_raw)
    a = entry()
    b = dataclasses.replace(a, orig=dataclasses.replace(a.orig, dst=server_b),
                            reply=dataclasses.replace(a.reply, src=server_b))
    for e in (a, b):
        decider.add_raw(to_raw(e))  # the key's first: through the builder
    for e in (a, b):
        later = dataclasses.replace(e, id=9)
        if path == "add":
            decider.add(later)
        elif path == "add_raw":
            decider.add_raw(to_raw(later))
        else:
            decider.judge_raw(to_raw(later))  # as the scan hands over
    plan = decider.plan()
    assert plan.stale == () and plan.undecided == ()
    assert plan.examined == plan.eligible == 4


def test_unknown_prediction_ecmp_address_change_names_every_nexthops_address() -> None:
    hop1 = Egress(EgressKind.UNICAST, 2, "ppp0", IPv4Address("100.64.0.1"), IPv4Address("100.64.7.8"))
    hop2 = Egress(EgressKind.UNICAST, 3, "ppp1", IPv4Address("100.65.0.1"), IPv4Address("100.65.7.8"))
    moved = dataclasses.replace(hop2, masquerade_source=IPv4Address("100.65.9.9"))

    def predictor(fib: Fib, flow: Flow) -> Prediction:
        return Prediction(dnat=frozenset({NO_NAT}), snat=Unknown("xt"),
                          egress=(hop1, moved) if fib is FIB_NOW else (hop1, hop2))

    plan = decide([entry()], predict=predictor, fib_now=FIB_NOW, fib_before=FIB_BEFORE)
    assert plan.stale[0].reason.endswith(
        "egress changed from dev ppp0 via 100.64.0.1 (masquerade source 100.64.7.8) or dev ppp1 via 100.65.0.1 "
        "(masquerade source 100.65.7.8) to dev ppp0 via 100.64.0.1 (masquerade source 100.64.7.8) or dev ppp1 "
        "via 100.65.0.1 (masquerade source 100.65.9.9)")


def unknown_dnat(snat: frozenset[Binding]) -> Any:
    """The DNAT side unknown (no T0: undecided), so every entry reaches the reasoned judgement of its SNAT side."""
    def predictor(fib: Fib, flow: Flow) -> Prediction:
        return Prediction(dnat=Unknown("xt match"), snat=snat, egress=(UP2,))

    return predictor


@pytest.mark.parametrize("raw", [False, True])
@pytest.mark.parametrize("side", ["snat", "dnat"])
def test_a_side_whose_nat_has_not_run_lends_no_judgement_to_one_that_has(side: str, raw: bool) -> None:
    """Two untranslated entries of one key: the side's NAT not run on the first, run on the second.

    Since late NAT is judged (issue 12: the kernel never NATs a confirmed entry afterwards), the
    first is a null binding too: both are stale against the prediction, each by its own judgement.
    The other side is unknown, so both entries reach the reasoned judgement.
    """
    from topowatch.core.decide import Decider

    other_done = IPS_DST_NAT_DONE if side == "snat" else IPS_SRC_NAT_DONE
    not_run = entry(status=IPS_CONFIRMED | other_done, sport=1000)
    run = entry(sport=1001)
    elsewhere = frozenset({Binding(NatKind.DNAT, ip_address("10.0.9.9"))})

    def predictor(fib: Fib, flow: Flow) -> Prediction:
        if side == "snat":
            return Prediction(dnat=Unknown("xt"), snat=frozenset({masq("203.0.113.2")}), egress=(UP2,))
        return Prediction(dnat=elsewhere, snat=Unknown("xt"), egress=(UP2,))

    decider = Decider(predict=predictor, fib_now=FIB_NOW, sport_matters=False, build=from_raw)
    for e in (not_run, run):
        if raw:
            decider.add_raw(to_raw(e))
        else:
            decider.add(e)
    assert [(d.entry.orig.sport, d.side, d.actual) for d in decider.plan().stale] == [
        (1000, side, NO_NAT), (1001, side, NO_NAT)
    ]


def test_a_port_range_prediction_judges_each_untranslated_entry_by_its_port() -> None:
    """Masquerade to the client's own address with ports 1024-2047: sport 1500 fits, 5000 does not."""
    from topowatch.core.decide import Decider

    keep = frozenset({Binding(NatKind.MASQUERADE, CLIENT, CLIENT, 1024, 2047)})
    for order in ((1500, 5000), (5000, 1500)):
        decider = Decider(predict=unknown_dnat(keep), fib_now=FIB_NOW, sport_matters=False, build=from_raw)
        for sport in order:
            decider.add(entry(sport=sport))
        assert [d.entry.orig.sport for d in decider.plan().stale] == [5000]


@pytest.mark.parametrize("raw", [False, True])
def test_unknown_dnat_prediction_uses_egress_change(raw: bool) -> None:
    from topowatch.core.decide import Decider

    def predictor(fib: Fib, flow: Flow) -> Prediction:
        egress = (UP2,) if fib is FIB_NOW else (UP1,)
        return Prediction(dnat=Unknown("xt match"), snat=frozenset({NO_NAT}), egress=egress)

    decider = Decider(predict=predictor, fib_now=FIB_NOW, fib_before=FIB_BEFORE, build=from_raw)
    for e in (entry(), dataclasses.replace(entry(), id=2)):  # the second through the key's cache
        if raw:
            decider.add_raw(to_raw(e))
        else:
            decider.add(e)
    plan = decider.plan()
    assert [d.side for d in plan.stale] == ["dnat", "dnat"]
    assert plan.stale[0].reason == (
        "destination NAT cannot be predicted (xt match), but the flow's egress changed "
        "from dev up1 via 198.51.100.1 to dev up2 via 203.0.113.1")


def test_a_dnat_that_changed_the_port_is_stale_once_no_rule_names_a_port() -> None:
    """``dnat to 192.0.2.10:5070`` replaced by ``dnat to 192.0.2.10``: a fresh flow keeps port 5060.

    The kernel never changes a destination port it was given no range for
    (``nf_nat_l4proto_unique_tuple``), so the binding admits only the original port.
    """
    e = Entry(AF_INET, IPPROTO_UDP, CtTuple(CLIENT, SERVER, 5001, 5060), CtTuple(SERVER, CLIENT, 5070, 5001))
    kept = Entry(AF_INET, IPPROTO_UDP, CtTuple(CLIENT, SERVER, 5002, 5060), CtTuple(SERVER, CLIENT, 5060, 5002))

    def predictor(fib: Fib, flow: Flow) -> Prediction:
        return Prediction(dnat=frozenset({Binding(NatKind.DNAT, SERVER)}), snat=frozenset({NO_NAT}), egress=())

    plan = decide([e, kept], predict=predictor, fib_now=FIB_NOW)
    assert [(d.entry, d.side) for d in plan.stale] == [(e, "dnat")]
    assert plan.stale[0].reason.endswith("but now it would be dnat to 192.0.2.10 (egress none)")


@pytest.mark.parametrize("raw", [False, True], ids=["entries", "raw"])
def test_a_port_only_dnat_is_stale_once_no_rule_binds_the_destination(raw: bool) -> None:
    """``dnat to :5070`` removed: a fresh flow keeps port 5060, so the entry with 5070 is stale,
    and one that kept its port (the same flow key) is not."""
    moved = Entry(AF_INET, IPPROTO_UDP, CtTuple(CLIENT, SERVER, 5001, 5060), CtTuple(SERVER, CLIENT, 5070, 5001))
    kept = Entry(AF_INET, IPPROTO_UDP, CtTuple(CLIENT, SERVER, 5002, 5060), CtTuple(SERVER, CLIENT, 5060, 5002))
    decider = Decider(predict=fixed(frozenset({NO_NAT})), fib_now=FIB_NOW, build=from_raw,
                      sport_matters=False)
    for e in (kept, moved):
        if raw:
            decider.add_raw(to_raw(e))
        else:
            decider.add(e)
    plan = decider.plan()
    assert [(d.entry, d.side, d.code) for d in plan.stale] == [(moved, "dnat", "nat_now_none")]


def test_the_codes_of_stale_records_are_read_once_and_handed_out_as_copies() -> None:
    """The summary, the JSON record and the metrics each ask for the codes of a compiled scan's
    stale records (a Python loop over every record): the records are read once."""
    from topowatch.core.decide import STALE_RECORD, StaleDecisions

    reads: list[int] = []

    def codes() -> list[str]:
        reads.append(1)
        return ["snat_changed", "snat_changed"]

    records = bytes(2 * STALE_RECORD.size)
    stale = StaleDecisions((), records, lambda i: NotImplemented, lambda i: NotImplemented, codes)
    first = stale.codes()
    first.append("mutated by a caller")
    assert stale.codes() == ["snat_changed", "snat_changed"]
    assert reads == [1]
