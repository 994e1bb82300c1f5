"""decide(): every field of what it returns, and the flow-class paths of the ``Decider``.

The mutation run (README "Mutation testing") found these unchecked: the
``Decision`` of an undecided entry (its side, binding and expectations), the
expected bindings of a stale one, the `` or `` between egresses in a reason,
the translated port (not the original) against a port range, the plan's
prediction count, and, with flow classes, which entries ``only`` leaves
alone and which program ``raw_program`` hands a compiled scan. Every
expectation below is written out by hand from the rules in decide's
docstring, not computed by the code under test.
"""

from __future__ import annotations

import dataclasses
import sys
from ipaddress import IPv4Address, ip_address, ip_network
from typing import Any

import pytest

from topowatch.core.classify import Classifier
from topowatch.core.conntrack import IPS_SEEN_REPLY, Entry
from topowatch.core.decide import PROGRAM_REFUSED, Decider, Decision, ReasonCode, decide
from topowatch.core.eligibility import Eligibility
from topowatch.core.fib import Fib
from topowatch.core.flow import IPPROTO_TCP, IPPROTO_UDP, NO_NAT, Binding, Flow, NatKind, Prediction, Unknown
from topowatch.core.model import Link, Nexthop, Route, Topology
from topowatch.core.nat import NatRuleset

from test_decide import (  # isort: skip
    FIB_BEFORE, FIB_NOW, UP1, UP2, entry, fixed, from_raw, masq, to_raw,
)

MASQ = masq("203.0.113.2")


def predicting(dnat: frozenset[Binding] | Unknown, snat: frozenset[Binding] | Unknown,
               egress: tuple = (UP2,), before_egress: tuple | Unknown | None = None,
               explain: tuple[str, ...] = ()):  # fmt: skip
    def predictor(fib: Fib, flow: Flow) -> Prediction:
        if fib is FIB_BEFORE and before_egress is not None:
            return Prediction(dnat=dnat, snat=snat, egress=before_egress, explain=explain)
        return Prediction(dnat=dnat, snat=snat, egress=egress, explain=explain)

    return predictor


# -- the Decision of each verdict, field by field ------------------------------------------------

TRANSLATED = entry("100.64.0.2")  # masqueraded to 100.64.0.2, port kept
ACTUAL_100 = Binding(NatKind.SNAT, ip_address("100.64.0.2"), ip_address("100.64.0.2"), 5060, 5060)
PORTS_1 = Binding(NatKind.MASQUERADE, ip_address("203.0.113.2"), None, 1, 1)
PORTS_1024 = Binding(NatKind.MASQUERADE, ip_address("203.0.113.2"), None, 1024, 2047)
PORTS_2048 = Binding(NatKind.MASQUERADE, ip_address("203.0.113.2"), None, 2048, 4095)
TO_10 = Binding(NatKind.DNAT, ip_address("10.0.9.10"))


VERDICTS = [  # name, entry, predictor, FIB before, stale (else undecided), (side, actual, expected, reason, code)
    ("unknown snat, no T0: undecided", TRANSLATED, predicting(frozenset({NO_NAT}), Unknown("xt match")),
     None, False,
     ("snat", ACTUAL_100, (), "source NAT cannot be predicted: xt match", ReasonCode.UNKNOWN_NAT)),
    ("unknown snat, unknown egress: undecided", entry(),
     predicting(frozenset({NO_NAT}), Unknown("xt match"), egress=Unknown("fwmark rule")), FIB_BEFORE, False,
     ("snat", NO_NAT, (), "source NAT cannot be predicted (xt match) and the egress is unknown",
      ReasonCode.UNKNOWN_NAT_UNKNOWN_EGRESS)),
    ("unknown snat, egress known before, unknown now: undecided", entry(),
     predicting(frozenset({NO_NAT}), Unknown("xt match"), egress=Unknown("fwmark rule"), before_egress=(UP1,)),
     FIB_BEFORE, False,
     ("snat", NO_NAT, (), "source NAT cannot be predicted (xt match) and the egress is unknown",
      ReasonCode.UNKNOWN_NAT_UNKNOWN_EGRESS)),
    ("unknown snat, egress unknown before, known now: undecided", entry(),
     predicting(frozenset({NO_NAT}), Unknown("xt match"), egress=(UP2,), before_egress=Unknown("fwmark rule")),
     FIB_BEFORE, False,
     ("snat", NO_NAT, (), "source NAT cannot be predicted (xt match) and the egress is unknown",
      ReasonCode.UNKNOWN_NAT_UNKNOWN_EGRESS)),
    ("unknown snat, egress moved: stale", TRANSLATED,
     predicting(frozenset({NO_NAT}), Unknown("xt match"), egress=(UP2,), before_egress=(UP1,)), FIB_BEFORE, True,
     ("snat", ACTUAL_100, (), "source NAT cannot be predicted (xt match), but the flow's egress changed from "
      "dev up1 via 198.51.100.1 to dev up2 via 203.0.113.1", ReasonCode.EGRESS_CHANGED_UNKNOWN_NAT)),
    ("unknown dnat, snat healthy: the dnat side is the undecided one", TRANSLATED,
     predicting(Unknown("xt match"), frozenset({masq("100.64.0.2")})), None, False,
     ("dnat", NO_NAT, (), "destination NAT cannot be predicted: xt match", ReasonCode.UNKNOWN_NAT)),
    ("stale snat: every expected binding, sorted by address", TRANSLATED,
     predicting(frozenset({NO_NAT}), frozenset({MASQ, masq("198.51.100.2")}), egress=(UP1, UP2)), None, True,
     ("snat", ACTUAL_100, (masq("198.51.100.2"), MASQ),
      "source is snat to 100.64.0.2:5060 (10.0.1.2 -> 100.64.0.2), but now it would be masquerade to "
      "198.51.100.2 or masquerade to 203.0.113.2 (egress dev up1 via 198.51.100.1 or dev up2 via 203.0.113.1)",
      ReasonCode.SNAT_CHANGED)),
    ("stale snat: bindings of one address, sorted by their first port", TRANSLATED,
     predicting(frozenset({NO_NAT}), frozenset({PORTS_2048, MASQ, PORTS_1, PORTS_1024})), None, True,
     ("snat", ACTUAL_100, (MASQ, PORTS_1, PORTS_1024, PORTS_2048),
      "source is snat to 100.64.0.2:5060 (10.0.1.2 -> 100.64.0.2), but now it would be masquerade to "
      "203.0.113.2 or masquerade to 203.0.113.2:1 or masquerade to 203.0.113.2:1024-2047 or masquerade to "
      "203.0.113.2:2048-4095 (egress dev up2 via 203.0.113.1)", ReasonCode.SNAT_CHANGED)),
    ("stale snat: the rules that NAT it now are named", TRANSLATED,
     predicting(frozenset({NO_NAT}), frozenset({MASQ}), explain=("ip nat post: oifname up2 masquerade",
                                                                 "ip nat pre: accept")), None, True,
     ("snat", ACTUAL_100, (MASQ,),
      "source is snat to 100.64.0.2:5060 (10.0.1.2 -> 100.64.0.2), but now it would be masquerade to "
      "203.0.113.2 (egress dev up2 via 203.0.113.1; by ip nat post: oifname up2 masquerade; ip nat pre: accept)",
      ReasonCode.SNAT_CHANGED)),
    ("stale dnat", entry(dnat_to="10.0.9.9"), predicting(frozenset({TO_10}), frozenset({NO_NAT})), None, True,
     ("dnat", Binding(NatKind.DNAT, ip_address("10.0.9.9"), ip_address("10.0.9.9"), 5060, 5060), (TO_10,),
      "destination is dnat to 10.0.9.9:5060 (192.0.2.10 -> 10.0.9.9), but now it would be dnat to 10.0.9.10 "
      "(egress dev up2 via 203.0.113.1)", ReasonCode.DNAT_CHANGED)),
    ("stale snat under an undecided dnat: the stale side wins", TRANSLATED,
     predicting(Unknown("xt match"), frozenset({MASQ})), None, True,
     ("snat", ACTUAL_100, (MASQ,),
      "source is snat to 100.64.0.2:5060 (10.0.1.2 -> 100.64.0.2), but now it would be masquerade to "
      "203.0.113.2 (egress dev up2 via 203.0.113.1)", ReasonCode.SNAT_CHANGED)),
]


@pytest.mark.parametrize("case", VERDICTS, ids=[c[0] for c in VERDICTS])
@pytest.mark.parametrize("path", ["decide", "add_raw"])
def test_each_verdict_carries_its_side_bindings_reason_and_code(case: tuple[Any, ...], path: str) -> None:
    _name, e, predict, before, stale, decision = case
    if path == "decide":
        plan = decide([e], predict=predict, fib_now=FIB_NOW, fib_before=before)
    else:
        decider = Decider(predict=predict, fib_now=FIB_NOW, fib_before=before, build=from_raw)
        decider.add_raw(to_raw(e))
        decider.add_raw(to_raw(dataclasses.replace(e, id=2)))  # the key's second: through its cache
        plan = decider.plan()
    found, other = (plan.stale, plan.undecided) if stale else (plan.undecided, plan.stale)
    assert other == ()
    def fields(d: Decision) -> tuple[Any, ...]:
        return (d.entry, d.side, d.actual, d.expected, d.reason, d.code)

    side, actual, expected, reason, code = decision
    assert fields(found[0]) == (e, side, actual, expected, reason, code)
    assert found[0].why.code is code  # the enum member itself, not only its word
    if path == "add_raw":
        assert fields(found[1]) == (dataclasses.replace(e, id=2), side, actual, expected, reason, code)
        assert found[1].why == found[0].why  # the key's second entry: the same reason, through its cache


# -- an unpredictable side's reason: the side's addresses, and whether the ruleset changed -------
# (the mutation run of 2026-12-03: these fields of the unknown codes were never read)


@pytest.mark.parametrize(
    ("before_egress", "ruleset_changed", "code", "words"),
    [
        ((UP2,), True, ReasonCode.UNKNOWN_NAT, "the egress is the same, but the ruleset changed"),
        ((UP1,), True, ReasonCode.EGRESS_CHANGED_UNKNOWN_NAT, "but the flow's egress changed"),
        ((UP1,), False, ReasonCode.EGRESS_CHANGED_UNKNOWN_NAT, "but the flow's egress changed"),
        (Unknown("fwmark rule"), True, ReasonCode.UNKNOWN_NAT_UNKNOWN_EGRESS, "and the egress is unknown"),
    ],
    ids=["same egress, new ruleset", "egress moved, new ruleset", "egress moved", "egress unknown before"],
)
@pytest.mark.parametrize("side", ["snat", "dnat"])
def test_an_unpredictable_sides_reason_names_its_addresses_and_a_ruleset_change(
    before_egress: Any, ruleset_changed: bool, code: ReasonCode, words: str, side: str
) -> None:
    """``original`` and ``translated`` are the side's address before and after NAT, as for every code
    (``Reason``); ``ruleset_changed`` only where the egress alone said nothing (no verdict of its own)."""
    if side == "snat":
        e, predict = TRANSLATED, predicting(frozenset({NO_NAT}), Unknown("xt match"), before_egress=before_egress)
        addresses = (ip_address("10.0.1.2"), ip_address("100.64.0.2"))
    else:
        e = entry(dnat_to="10.0.9.9")
        predict = predicting(Unknown("xt match"), frozenset({NO_NAT}), before_egress=before_egress)
        addresses = (ip_address("192.0.2.10"), ip_address("10.0.9.9"))
    decider = Decider(predict=predict, fib_now=FIB_NOW, fib_before=FIB_BEFORE,
                      predict_before=predict if ruleset_changed else None)  # fmt: skip
    decider.add(e)
    plan = decider.plan()
    (d,) = (*plan.stale, *plan.undecided)
    assert (d.side, d.why.code) == (side, code)
    assert (d.why.original, d.why.translated) == addresses
    assert d.why.ruleset_changed is (code is ReasonCode.UNKNOWN_NAT)
    assert words in d.reason
    assert d.why.cause == "xt match"


# -- the port a port range is checked against: the translated one ------------------------------


@pytest.mark.parametrize(
    ("sport", "nat_port", "stale"),
    [
        (1500, 999, True),  # the original port fits 1024-2047, the translated one does not
        (999, 1500, False),  # the other way round: the translated port fits
        (1500, 1500, False),
        (999, 999, True),
    ],
)
def test_a_port_range_is_checked_against_the_translated_port(sport: int, nat_port: int, stale: bool) -> None:
    ports = Binding(NatKind.MASQUERADE, ip_address("203.0.113.2"), None, 1024, 2047)
    e = entry("203.0.113.2", sport=sport, nat_port=nat_port)
    for predict in (fixed(frozenset({ports})), predicting(Unknown("xt"), frozenset({ports}))):
        plan = decide([e], predict=predict, fib_now=FIB_NOW)
        assert [d.side for d in plan.stale] == (["snat"] if stale else [])


# -- the plan's counts -----------------------------------------------------------------------------


def test_the_plan_counts_its_predictions() -> None:
    """Three flow keys, one of them seen twice: three predictions, three slots."""
    calls: list[Flow] = []

    def predictor(fib: Fib, flow: Flow) -> Prediction:
        calls.append(flow)
        return Prediction(dnat=frozenset({NO_NAT}), snat=frozenset({MASQ}), egress=(UP2,))

    entries = [entry(sport=1000), entry(sport=1001), entry(sport=1000), entry(dnat_to="10.0.9.9")]
    plan = decide(entries, predict=predictor, fib_now=FIB_NOW, sport_matters=True)
    assert (plan.predicted, plan.distinct_flows, len(calls)) == (3, 3, 3)
    assert (plan.examined, plan.eligible) == (4, 4)


def test_a_decider_predicts_per_source_port_unless_told_otherwise() -> None:
    """The default is the safe one: a ruleset may read the source port, so each port is its own flow."""
    by_port = {1000: frozenset({MASQ}), 1001: frozenset({masq("100.64.0.2")})}

    def predictor(fib: Fib, flow: Flow) -> Prediction:
        return Prediction(dnat=frozenset({NO_NAT}), snat=by_port[flow.sport], egress=(UP2,))

    decider = Decider(predict=predictor, fib_now=FIB_NOW)
    for e in (entry("203.0.113.2", sport=1000), entry("100.64.0.2", sport=1001)):
        decider.add(e)
    plan = decider.plan()
    assert (plan.stale, plan.predicted) == ((), 2)


@pytest.mark.parametrize(("limit", "left"), [(1, 1), (2, 2), (3, 1)])
def test_per_flow_caches_are_dropped_when_full(monkeypatch: pytest.MonkeyPatch, limit: int, left: int) -> None:
    """Without classes, the prediction slots are all dropped when a new flow finds ``limit`` of them.

    Four flows: with a limit of 1 each new flow drops the one slot (1 left); of 2, the third drops
    two and the fourth adds one (2 left); of 3, the fourth drops three (1 left).
    """
    from topowatch.core import decide as decide_module

    monkeypatch.setattr(decide_module, "FLOW_CACHE_LIMIT", limit)
    entries = [LAN_TO_REST, REST_TO_B, REST_TO_REST, flow_entry("10.0.1.2", "192.0.2.10")]
    plan = decide(entries, predict=fixed(frozenset({MASQ})), fib_now=FIB_NOW)
    assert (plan.distinct_flows, plan.predicted, len(plan.stale)) == (left, 4, 4)
    # With classes the slots follow the configuration, not the traffic: never dropped (four classes).
    plan = decide(entries, predict=fixed(frozenset({MASQ})), fib_now=FIB_NOW, classifier=classifier())
    assert (plan.distinct_flows, plan.predicted, len(plan.stale)) == (4, 4, 4)


# -- flow classes: ``only`` and the programs of class keys -----------------------------------------

LO, LAN, UPA, UPB = 1, 2, 3, 4
CLASSED = Topology(
    (Link(LO, "lo"), Link(LAN, "lan"), Link(UPA, "upa"), Link(UPB, "upb")),
    (),
    (
        Route(ip_network("10.0.0.0/8"), nexthops=(Nexthop(LAN),)),
        Route(ip_network("192.0.2.0/24"), nexthops=(Nexthop(UPB, ip_address("198.51.100.1")),)),
        Route(ip_network("0.0.0.0/0"), nexthops=(Nexthop(UPA, ip_address("203.0.113.1")),)),
    ),
)
# Three address classes: 10/8 (the LAN), 192.0.2.0/24 (via upb), the rest (via upa).
LAN_NET, B_NET = ip_network("10.0.0.0/8"), ip_network("192.0.2.0/24")


def classifier(eligibility: Eligibility | None = None, *, sport_matters: bool = False) -> Classifier:
    c = Classifier.build([CLASSED], [NatRuleset(())], eligibility, sport_matters=sport_matters)
    assert c.exact, c.reason
    return c


def flow_entry(src: str, dst: str, sport: int = 1000, **kw: object) -> Entry:
    e = entry(sport=sport)
    s, d = IPv4Address(src), IPv4Address(dst)
    return dataclasses.replace(e, orig=dataclasses.replace(e.orig, src=s, dst=d),
                               reply=dataclasses.replace(e.reply, src=d, dst=s), **kw)  # fmt: skip


LAN_TO_REST = flow_entry("10.0.1.2", "198.51.100.7")  # source in the LAN class only
REST_TO_B = flow_entry("203.0.113.9", "192.0.2.10")  # destination in the upb class only
REST_TO_REST = flow_entry("203.0.113.9", "198.51.100.7")  # neither


@pytest.mark.parametrize(
    ("prefix", "judged"),
    [
        (LAN_NET, [LAN_TO_REST]),  # by its source
        (B_NET, [REST_TO_B]),  # by its destination
        (ip_network("10.0.1.0/24"), [LAN_TO_REST]),  # a prefix inside a class takes the whole class
    ],
    ids=["source class", "destination class", "inside a class"],
)
@pytest.mark.parametrize("path", ["decide", "add", "add_raw"])
def test_only_judges_flows_with_a_source_or_destination_in_the_classes(
    prefix: object, judged: list[Entry], path: str
) -> None:
    """Every entry is a null binding and the prediction says masquerade: each judged one is stale."""
    c = classifier()
    only = c.classes_within([prefix])  # type: ignore[list-item]
    entries = [LAN_TO_REST, REST_TO_B, REST_TO_REST]
    predict = fixed(frozenset({MASQ}))
    if path == "decide":
        plan = decide(entries, predict=predict, fib_now=FIB_NOW, classifier=c, only=only)
    else:
        decider = Decider(predict=predict, fib_now=FIB_NOW, classifier=c, only=only, build=from_raw,
                          sport_matters=False)  # fmt: skip
        for e in (*entries, *(dataclasses.replace(e, id=5) for e in entries)):  # each class twice
            if path == "add":
                decider.add(e)
            else:
                decider.add_raw(to_raw(e))
        plan = decider.plan()
        judged = [*judged, *(dataclasses.replace(e, id=5) for e in judged)]
    assert [d.entry for d in plan.stale] == judged
    assert plan.undecided == ()
    assert plan.examined == plan.eligible == (3 if path == "decide" else 6)
    # Without ``only`` every one of them is stale.
    assert len(decide(entries, predict=predict, fib_now=FIB_NOW, classifier=c).stale) == 3


def test_the_program_of_a_class_key_for_a_compiled_scan() -> None:
    """``raw_program`` of entries already added: their class's checks, refused, or left alone."""
    c = classifier()
    decider = Decider(predict=fixed(frozenset({MASQ})), fib_now=FIB_NOW, classifier=c,
                      only=c.classes_within([LAN_NET]), build=from_raw, sport_matters=False)  # fmt: skip
    judged, left = to_raw(LAN_TO_REST), to_raw(REST_TO_REST)
    replied = to_raw(dataclasses.replace(LAN_TO_REST, status=LAN_TO_REST.status | IPS_SEEN_REPLY))
    for raw in (judged, left, replied):
        assert decider.raw_program(raw) is None  # not seen yet
        decider.add_raw(raw)
    masq_value = int(IPv4Address("203.0.113.2")).to_bytes(16, "big")
    # With classes, a program whose sides are both known names its class's slot (b"S" + u32): the
    # compiled scan keeps the class's stale entries as records of that slot.
    assert decider.raw_program(judged) == (b"P" + b"\x02\x01" + b"\x04" + bytes(36)  # dnat: no NAT, port kept
                                           + b"\x02\x01" + b"\x01" + masq_value * 2 + bytes(4)
                                           + b"S" + (0).to_bytes(4, sys.byteorder))
    assert decider.raw_program(left) == b"P\x01\x01"  # outside ``only``: healthy, never judged
    assert decider.raw_program(replied) == PROGRAM_REFUSED  # the eligibility refuses replied entries
    # Another entry of each class (another source port, another address of the class) finds the same.
    assert decider.raw_program(to_raw(flow_entry("10.9.9.9", "8.8.8.8", sport=4000))) == decider.raw_program(judged)
    assert decider.raw_program(to_raw(flow_entry("8.8.4.4", "1.1.1.1", sport=4000))) == b"P\x01\x01"


@pytest.mark.parametrize(
    ("first", "eligibility"),
    [
        ({"status": LAN_TO_REST.status | IPS_SEEN_REPLY}, Eligibility()),  # SEEN_REPLY is part of the key
        ({"zone": 0}, Eligibility(zones=frozenset({7}))),  # so is the zone
        ({"proto": IPPROTO_TCP}, Eligibility(protocols=frozenset({IPPROTO_UDP}))),  # and the protocol
    ],
    ids=["replied first", "other zone first", "tcp first"],
)
def test_a_refused_class_refuses_no_entry_of_another(first: dict[str, object], eligibility: Eligibility) -> None:
    """A refused entry first, then an eligible one of the same addresses: the eligible one is still judged."""
    c = classifier(eligibility)
    stale = dataclasses.replace(LAN_TO_REST, zone=7)
    refused = dataclasses.replace(stale, **first)  # type: ignore[arg-type]
    decider = Decider(predict=fixed(frozenset({MASQ})), fib_now=FIB_NOW, eligibility=eligibility, classifier=c,
                      build=from_raw, sport_matters=False)  # fmt: skip
    for e in (refused, stale):
        decider.add_raw(to_raw(e))
    plan = decider.plan()
    assert [d.entry for d in plan.stale] == [stale]
    assert (plan.examined, plan.eligible) == (2, 1)
    assert decider.raw_program(to_raw(refused)) == PROGRAM_REFUSED


def test_a_class_is_split_by_protocol_zone_and_reply_bit() -> None:
    """Classes take protocol, zone and SEEN_REPLY as they are: four classes, four predictions."""
    flows: list[tuple[int, int]] = []

    def predictor(fib: Fib, flow: Flow) -> Prediction:
        flows.append((flow.proto, flow.zone))
        return Prediction(dnat=frozenset({NO_NAT}), snat=frozenset({MASQ}), egress=(UP2,))

    everything = Eligibility(unreplied_only=False, protocols=frozenset({IPPROTO_UDP, IPPROTO_TCP}))
    base = LAN_TO_REST
    entries = [base, dataclasses.replace(base, proto=IPPROTO_TCP), dataclasses.replace(base, zone=7),
               dataclasses.replace(base, status=base.status | IPS_SEEN_REPLY),
               dataclasses.replace(base, id=9)]  # the last shares the first one's class  # fmt: skip
    for path in ("decide", "add_raw"):
        flows.clear()
        if path == "decide":
            plan = decide(entries, predict=predictor, fib_now=FIB_NOW, eligibility=everything,
                          classifier=classifier(everything))  # fmt: skip
        else:
            decider = Decider(predict=predictor, fib_now=FIB_NOW, eligibility=everything,
                              classifier=classifier(everything), build=from_raw, sport_matters=False)  # fmt: skip
            for e in entries:
                decider.add_raw(to_raw(e))
            plan = decider.plan()
        assert (plan.distinct_flows, plan.predicted) == (4, 4), path
        assert sorted(flows) == [(IPPROTO_TCP, 0), (IPPROTO_UDP, 0), (IPPROTO_UDP, 0), (IPPROTO_UDP, 7)], path
        assert len(plan.stale) == 5, path


def test_a_protocol_judged_by_its_own_prediction_within_classes() -> None:
    """UDP and TCP of one address pair: masqueraded only for UDP now; each is judged by its own."""

    def predictor(fib: Fib, flow: Flow) -> Prediction:
        snat = frozenset({MASQ}) if flow.proto == IPPROTO_UDP else frozenset({NO_NAT})
        return Prediction(dnat=frozenset({NO_NAT}), snat=snat, egress=(UP2,))

    both = Eligibility(protocols=frozenset({IPPROTO_UDP, IPPROTO_TCP}))
    tcp = dataclasses.replace(LAN_TO_REST, proto=IPPROTO_TCP)
    zoned = dataclasses.replace(LAN_TO_REST, zone=3)
    for order in ((tcp, LAN_TO_REST, zoned), (LAN_TO_REST, zoned, tcp)):
        plan = decide(order, predict=predictor, fib_now=FIB_NOW, eligibility=both, classifier=classifier(both))
        assert {d.entry for d in plan.stale} == {LAN_TO_REST, zoned}


def test_an_inexact_classifier_is_not_used() -> None:
    """NETMAP maps each address on its own: flows of one class get their own predictions."""
    from topowatch.core.nat import Chain, Hook, NetmapStatement, Rule

    rule = Rule(1, (NetmapStatement(ip_network("10.9.0.0/16"), "NETMAP --to 10.9.0.0/16"),))
    chain = Chain("ip", "nat", "PREROUTING", (rule,), Hook.PREROUTING, -100, "nat", "accept")
    c = Classifier.build([CLASSED], [NatRuleset((chain,))], sport_matters=False)
    assert not c.exact

    def predictor(fib: Fib, flow: Flow) -> Prediction:  # the host byte kept under 10.9.0.0/16
        mapped = ip_address(f"10.9.0.{int(flow.dst) & 0xFF}")
        return Prediction(dnat=frozenset({Binding(NatKind.DNAT, mapped)}), snat=frozenset({NO_NAT}), egress=(UP2,))

    entries = []
    for host in (1, 2):
        e = flow_entry("203.0.113.9", f"198.51.100.{host}")
        entries.append(dataclasses.replace(e, reply=dataclasses.replace(e.reply, src=ip_address(f"10.9.0.{host}"))))
    assert c.key(2, 17, 0, int(entries[0].orig.dst), 0, 5060, 0, 0, 0) == c.key(
        2, 17, 0, int(entries[1].orig.dst), 0, 5060, 0, 0, 0)  # one class by the maps
    plan = decide(entries, predict=predictor, fib_now=FIB_NOW, classifier=c, only=frozenset())
    assert (plan.stale, plan.predicted) == ((), 2)


@pytest.mark.parametrize("classes", ["none", "inexact"])
def test_only_needs_exact_classes(classes: str) -> None:
    """``only`` names classes: without exact ones it cannot be applied, and every entry is judged."""
    from topowatch.core.nat import Chain, Hook, NetmapStatement, Rule

    c = None
    if classes == "inexact":
        rule = Rule(1, (NetmapStatement(ip_network("10.9.0.0/16"), "NETMAP --to 10.9.0.0/16"),))
        chain = Chain("ip", "nat", "PREROUTING", (rule,), Hook.PREROUTING, -100, "nat", "accept")
        c = Classifier.build([CLASSED], [NatRuleset((chain,))])
    entries = [LAN_TO_REST, REST_TO_B, REST_TO_REST]
    for sport_matters in (False, True):
        plan = decide(entries, predict=fixed(frozenset({MASQ})), fib_now=FIB_NOW, classifier=c,
                      only=frozenset(), sport_matters=sport_matters)  # fmt: skip
        assert [d.entry for d in plan.stale] == entries


@pytest.mark.parametrize("path", ["add", "add_raw"])
def test_within_a_class_each_entry_is_judged_with_its_own_addresses(path: str) -> None:
    """Two clients of one class, neither NATed, masquerade predicted: each stale decision names its
    own source (with classes the key holds no address, so no judgement is reused across it)."""
    first, second = flow_entry("10.0.1.2", "198.51.100.7"), flow_entry("10.0.1.3", "198.51.100.7")
    decider = Decider(predict=fixed(frozenset({MASQ})), fib_now=FIB_NOW, classifier=classifier(),
                      build=from_raw, sport_matters=False)  # fmt: skip
    for e in (first, second):
        decider.add(e) if path == "add" else decider.add_raw(to_raw(e))
    plan = decider.plan()
    assert [(d.entry, d.code, d.why.original, d.why.translated) for d in plan.stale] == [
        (e, "null_binding_now_nat", e.orig.src, e.orig.src) for e in (first, second)]
    assert plan.distinct_flows == 1  # one class
