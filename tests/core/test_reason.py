"""core.reason: the text of each code from its fields, written out by hand; and the fields that
``plan --json`` and the JSON logs emit are enough to render a decision's text again.

The expected texts below are typed from the wording decide used before reasons became
structured (and that README quotes), not computed by ``render``.
"""

from __future__ import annotations

import dataclasses
from ipaddress import ip_address, ip_network
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topowatch.core.decide import Decider, decide
from topowatch.core.flow import (
    NO_NAT,
    Binding,
    Egress,
    EgressKind,
    Flow,
    Ingress,
    NatKind,
    Prediction,
    RuleRef,
    Unknown,
)
from topowatch.core.nat import Chain, NatRuleset, Rule
from topowatch.core.reason import Reason, ReasonCode, RuleLine, Way, rule_lines
from topowatch.report import reason_json

from test_alternatives import ENTRIES, alternatives, predictor  # isort: skip
from test_alternatives import BEFORE as ALT_BEFORE  # isort: skip
from test_alternatives import NOW as ALT_NOW  # isort: skip
from test_decide import FIB_BEFORE, FIB_NOW, UP1, UP2, predictor_from, table_entries  # isort: skip

CLIENT, SERVER = ip_address("10.0.1.2"), ip_address("192.0.2.10")
MASQ = Binding(NatKind.MASQUERADE, ip_address("203.0.113.2"))
SNAT_PORT = Binding(NatKind.SNAT, ip_address("100.64.0.2"), ip_address("100.64.0.2"), 5060, 5060)
RANGE = Binding(NatKind.MASQUERADE, ip_address("203.0.113.2"), None, 1024, 2047)
DNAT_20 = Binding(NatKind.DNAT, ip_address("192.0.2.20"))
DNAT_9 = Binding(NatKind.DNAT, ip_address("10.0.9.10"))
REF = RuleRef("table inet nat chain postrouting", 7, 'oifname "up2" masquerade')
LINE = RuleLine(f"snat via dev up2: {REF} (to 203.0.113.2 via dev up2)", REF)
LAN0, LAN1, HOST = Ingress(4, "lan0"), Ingress(5, "lan1"), Ingress(0, "", local=True)
UP2_NEW = dataclasses.replace(UP2, masquerade_source=ip_address("203.0.113.9"))
DEFAULT = dataclasses.replace(UP2, prefix=ip_network("0.0.0.0/0"), route="default via 203.0.113.1 dev up2")

RENDERED = [  # name, reason, text
    ("null binding, now masquerade, by a rule",
     Reason(ReasonCode.NULL_BINDING_NOW_NAT, "snat", NO_NAT, CLIENT, CLIENT, (MASQ,), egress=(DEFAULT,),
            rules=(LINE,)),
     "source is 10.0.1.2 (no NAT), but now it would be masquerade to 203.0.113.2 (egress dev up2 via "
     '203.0.113.1; by snat via dev up2: table inet nat chain postrouting handle 7: oifname "up2" masquerade '
     "(to 203.0.113.2 via dev up2))"),
    ("masqueraded, now none, leaving nowhere",
     Reason(ReasonCode.NAT_NOW_NONE, "snat", MASQ, CLIENT, ip_address("203.0.113.2"), (NO_NAT,), egress=()),
     "source is masquerade to 203.0.113.2 (10.0.1.2 -> 203.0.113.2), but now it would be no NAT (egress none)"),
    ("snat with a port, now one of two, two paths",
     Reason(ReasonCode.SNAT_CHANGED, "snat", SNAT_PORT, CLIENT, ip_address("100.64.0.2"), (MASQ, RANGE),
            egress=(UP1, UP2), rules=(RuleLine("marks at output unknown: x"), LINE)),
     "source is snat to 100.64.0.2:5060 (10.0.1.2 -> 100.64.0.2), but now it would be masquerade to "
     "203.0.113.2 or masquerade to 203.0.113.2:1024-2047 (egress dev up1 via 198.51.100.1 or dev up2 via "
     '203.0.113.1; by marks at output unknown: x; snat via dev up2: table inet nat chain postrouting handle 7: '
     'oifname "up2" masquerade (to 203.0.113.2 via dev up2))'),
    ("dnat elsewhere, egress unknown",
     Reason(ReasonCode.DNAT_CHANGED, "dnat", DNAT_20, SERVER, ip_address("192.0.2.20"), (DNAT_9,),
            egress=Unknown("fwmark rule")),
     "destination is dnat to 192.0.2.20 (192.0.2.10 -> 192.0.2.20), but now it would be dnat to 10.0.9.10 "
     "(egress unknown (fwmark rule))"),
    ("every way refuses it",
     Reason(ReasonCode.NULL_BINDING_NOW_NAT, "snat", NO_NAT, CLIENT, CLIENT, (MASQ,), ways=(
         Way(LAN0, (UP1,), "snat", (MASQ,)), Way(None, Unknown("u"), "dnat", Unknown("xt")),
         Way(HOST, (), "snat", ()))),
     "source is 10.0.1.2 (no NAT), and no way it may have come in and gone out gives it its bindings now: "
     "by lan0, dev up1 via 198.51.100.1 its source would be masquerade to 203.0.113.2; by any interface its "
     "destination would be unknown (xt); by the host itself its source would be dropped"),
    ("every way of five refuses it: four are named",
     Reason(ReasonCode.SNAT_CHANGED, "snat", SNAT_PORT, CLIENT, ip_address("100.64.0.2"), (MASQ,),
            ways=tuple(Way(Ingress(i, f"lan{i}"), (), "snat", (MASQ,)) for i in range(5))),
     "source is snat to 100.64.0.2:5060 (10.0.1.2 -> 100.64.0.2), and no way it may have come in and gone "
     "out gives it its bindings now: by lan0 its source would be masquerade to 203.0.113.2; by lan1 its source "
     "would be masquerade to 203.0.113.2; by lan2 its source would be masquerade to 203.0.113.2; by lan3 its "
     "source would be masquerade to 203.0.113.2; and 1 more"),
    ("unknown nat, egress moved",
     Reason(ReasonCode.EGRESS_CHANGED_UNKNOWN_NAT, "snat", NO_NAT, CLIENT, CLIENT, egress=(UP2,),
            egress_before=(UP1,), cause="xt match"),
     "source NAT cannot be predicted (xt match), but the flow's egress changed from dev up1 via 198.51.100.1 "
     "to dev up2 via 203.0.113.1"),
    ("unknown nat, same route, another address",
     Reason(ReasonCode.EGRESS_CHANGED_UNKNOWN_NAT, "snat", NO_NAT, CLIENT, CLIENT, egress=(UP2_NEW,),
            egress_before=(UP2,), cause="xt match"),
     "source NAT cannot be predicted (xt match), but the flow's egress changed from dev up2 via 203.0.113.1 "
     "(masquerade source 203.0.113.2) to dev up2 via 203.0.113.1 (masquerade source 203.0.113.9)"),
    ("unknown nat, no previous snapshot",
     Reason(ReasonCode.UNKNOWN_NAT, "dnat", NO_NAT, SERVER, SERVER, egress=(UP2,), cause="xt match"),
     "destination NAT cannot be predicted: xt match"),
    ("unknown nat, the rule that made it so as a field",
     Reason(ReasonCode.UNKNOWN_NAT, "dnat", NO_NAT, SERVER, SERVER, egress=(UP2,),
            cause="table ip nat chain prerouting handle 7: xt match policy dnat to 10.0.0.53: unmodelled "
                  "expression: xt match policy",
            cause_rule=RuleRef("table ip nat chain prerouting", 7, "xt match policy dnat to 10.0.0.53")),
     "destination NAT cannot be predicted: table ip nat chain prerouting handle 7: xt match policy dnat to "
     "10.0.0.53: unmodelled expression: xt match policy"),
    ("unknown nat, same egress, another ruleset",
     Reason(ReasonCode.UNKNOWN_NAT, "snat", NO_NAT, CLIENT, CLIENT, egress=(UP2,), egress_before=(UP2,),
            cause="xt match", ruleset_changed=True),
     "source NAT cannot be predicted (xt match); the egress is the same, but the ruleset changed"),
    ("unknown nat, unknown egress",
     Reason(ReasonCode.UNKNOWN_NAT_UNKNOWN_EGRESS, "snat", NO_NAT, CLIENT, CLIENT, egress=Unknown("fwmark rule"),
            egress_before=(UP1,), cause="xt match"),
     "source NAT cannot be predicted (xt match) and the egress is unknown"),
    ("unknown ingress, no previous snapshot",
     Reason(ReasonCode.UNKNOWN_INGRESS, "snat", MASQ, CLIENT, ip_address("203.0.113.2"),
            keeps=(Way(LAN0, (UP1,)), Way(LAN0, (UP1,))), ways=(Way(LAN1, (UP2,), "snat", (NO_NAT,)),),
            history="none"),
     "source is masquerade to 203.0.113.2 (10.0.1.2 -> 203.0.113.2): by lan0, dev up1 via 198.51.100.1 it "
     "keeps its bindings, but with no previous snapshot it may as well be older and have got them another way, "
     "and then by lan1, dev up2 via 203.0.113.1 its source would be no NAT; which way it came is not known"),
    ("unknown ingress, no binding to read, many that keep it",
     Reason(ReasonCode.UNKNOWN_INGRESS, "dnat", keeps=tuple(Way(Ingress(i, f"lan{i}"), ()) for i in range(6)),
            ways=(Way(None, (), "dnat", (DNAT_9,)),), history="older"),
     "destination is not translated: by lan0; lan1; lan2; lan3 and 2 more it keeps its bindings, but made "
     "before its NAT hook had a chain it may be older than the previous snapshot, and have got them another "
     "way, and then by any interface its destination would be dnat to 10.0.9.10; which way it came is not known"),
    ("unknown ingress, by the previous snapshot",
     Reason(ReasonCode.UNKNOWN_INGRESS, "snat", NO_NAT, CLIENT, CLIENT, keeps=(Way(HOST, Unknown("u")),),
            ways=(Way(LAN1, (), "snat", (MASQ,)),), history="snapshot"),
     "source is 10.0.1.2 (no NAT): by the host itself it keeps its bindings, but it may be older and have got "
     "them where the previous state gave them, and then by lan1 its source would be masquerade to 203.0.113.2; "
     "which way it came is not known"),
    # Edges (the mutation run of 2026-12-03 found each unread): exactly four ways and four labels name
    # all (no "and 0 more"); a way of two paths and two bindings; a history not given reads as the
    # snapshot's; no binding to read is not translated; an egress not known.
    ("every way of exactly four refuses it: all named, one of two paths and two bindings",
     Reason(ReasonCode.SNAT_CHANGED, "snat", SNAT_PORT, CLIENT, ip_address("100.64.0.2"), (MASQ,),
            ways=(Way(LAN0, (UP1, UP2), "snat", (MASQ, RANGE)),
                  *(Way(Ingress(i, f"lan{i}"), (), "snat", (MASQ,)) for i in range(1, 4)))),
     "source is snat to 100.64.0.2:5060 (10.0.1.2 -> 100.64.0.2), and no way it may have come in and gone "
     "out gives it its bindings now: by lan0, dev up1 via 198.51.100.1 or dev up2 via 203.0.113.1 its source "
     "would be masquerade to 203.0.113.2 or masquerade to 203.0.113.2:1024-2047; by lan1 its source would be "
     "masquerade to 203.0.113.2; by lan2 its source would be masquerade to 203.0.113.2; by lan3 its source "
     "would be masquerade to 203.0.113.2"),
    ("unknown ingress, exactly four that keep it, no history given",
     Reason(ReasonCode.UNKNOWN_INGRESS, "dnat", keeps=tuple(Way(Ingress(i, f"lan{i}"), ()) for i in range(4)),
            ways=(Way(None, (), "dnat", (DNAT_9,)),)),
     "destination is not translated: by lan0; lan1; lan2; lan3 it keeps its bindings, but it may be older and "
     "have got them where the previous state gave them, and then by any interface its destination would be "
     "dnat to 10.0.9.10; which way it came is not known"),
    ("no binding to read, its addresses known, the egress not known",
     Reason(ReasonCode.NAT_NOW_NONE, "snat", None, CLIENT, ip_address("203.0.113.2"), (NO_NAT,)),
     "source is not translated, but now it would be no NAT (egress not known)"),
    # Not a reason decide makes (an unknown egress is UNKNOWN_NAT_UNKNOWN_EGRESS): render is total.
    ("unknown nat, egress moved, unknown both times",
     Reason(ReasonCode.EGRESS_CHANGED_UNKNOWN_NAT, "snat", NO_NAT, CLIENT, CLIENT, egress=Unknown("fwmark rule"),
            egress_before=Unknown("fwmark rule"), cause="xt match"),
     "source NAT cannot be predicted (xt match), but the flow's egress changed from unknown (fwmark rule) to "
     "unknown (fwmark rule)"),
    ("the compiled scan disagrees",
     Reason(ReasonCode.INTERNAL_DISAGREEMENT, "snat", verdict="undecided"),
     "judged undecided by the compiled scan, but the reference judgement disagrees (a defect)"),
]


@pytest.mark.parametrize(("name", "reason", "text"), RENDERED, ids=[r[0] for r in RENDERED])
def test_render_words_each_code_from_its_fields(name: str, reason: Reason, text: str) -> None:
    assert reason.render() == text


def test_a_translation_missing_either_address_is_not_translated() -> None:
    """A field left empty is not known: the text never fills it (the JSON carries the pair only
    whole, so these are not rows of the table above)."""
    for original, translated in ((None, ip_address("203.0.113.2")), (CLIENT, None)):
        reason = Reason(ReasonCode.NAT_NOW_NONE, "snat", MASQ, original, translated, (NO_NAT,), egress=())
        assert reason.render() == "source is not translated, but now it would be no NAT (egress none)"


def test_the_table_renders_every_code() -> None:
    assert {r.code for _, r, _ in RENDERED} == set(ReasonCode)


@pytest.mark.parametrize(("field", "value"), [("side", "both"), ("history", "lately")])
def test_a_reason_refuses_a_bad_field_by_name(field: str, value: str) -> None:
    with pytest.raises(ValueError, match=rf"Reason\.{field}"):
        dataclasses.replace(RENDERED[0][1], **{field: value})
    with pytest.raises(ValueError, match=r"Way\.side"):
        Way(None, (), "both")


def test_a_code_given_as_its_word_becomes_the_member() -> None:
    assert Reason("snat_changed", "snat").code is ReasonCode.SNAT_CHANGED  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Reason("stale", "snat")  # type: ignore[arg-type]


def test_rule_lines_name_the_rule_each_line_quotes() -> None:
    chain = Chain("inet", "nat", "postrouting")
    rule = Rule(7, (), text='oifname "up2" masquerade')
    ref = RuleRef(chain.describe(), rule.handle, rule.text)
    assert str(ref) == NatRuleset.describe_rule(chain, rule)  # the evaluator's words for it
    other = RuleRef("table ip nat chain prerouting", 3, "dnat to 10.0.9.10")
    lines = rule_lines((f"dnat: {other} (to 10.0.9.10)", "dropped by the route: blackhole", f"snat via x: {ref}"),
                       (ref, other))  # fmt: skip
    assert [line.rule for line in lines] == [other, None, ref]


# -- the fields a program reads are enough to word the text again --------------------------------


def _binding(obj: dict[str, Any] | None) -> Binding | None:
    if obj is None:
        return None
    addr = obj["addr"]
    lo, _, hi = (addr or "").partition("-")
    ports = obj["ports"] or (None, None)
    return Binding(NatKind(obj["kind"]), ip_address(lo) if lo else None, ip_address(hi or lo) if lo else None,
                   *ports)  # fmt: skip


def _egress(obj: Any) -> tuple[Egress, ...] | Unknown | None:
    if obj is None:
        return None
    if isinstance(obj, dict):
        return Unknown(obj["unknown"])
    return tuple(
        Egress(EgressKind(p["kind"]), p["oif"], p["dev"] or "", ip_address(p["gateway"]) if p["gateway"] else None,
               ip_address(p["masquerade_source"]) if p["masquerade_source"] else None, p["route"] or "",
               p["xfrm"] or "", ip_network(p["prefix"]) if p["prefix"] else None)
        for p in obj
    )  # fmt: skip


def _way(obj: dict[str, Any]) -> Way:
    name = obj["ingress"]
    ingress = None if name is None else Ingress(0, "", local=True) if name == "local" else Ingress(0, name)
    gives: Any = ()
    if "gives" in obj:
        found = obj["gives"]
        gives = Unknown(found["unknown"]) if isinstance(found, dict) else tuple(_binding(b) for b in found)
    egress = _egress(obj["egress"])
    assert egress is not None
    return Way(ingress, egress, obj.get("side", ""), gives)


def from_json(obj: dict[str, Any]) -> Reason:
    """A Reason read back from ``reason_json`` alone (what a program that reads the logs has)."""
    rules = tuple(
        RuleLine(r["text"], RuleRef(r["chain"], r["handle"] or 0, r["rule"]) if "chain" in r else None)
        for r in obj.get("rules", ())
    )
    return Reason(
        ReasonCode(obj["code"]), obj["side"], _binding(obj.get("actual")),
        ip_address(obj["original"]) if "original" in obj else None,
        ip_address(obj["translated"]) if "translated" in obj else None,
        tuple(b for b in map(_binding, obj.get("expected", ())) if b is not None),
        _egress(obj.get("egress")), _egress(obj.get("egress_before")), rules, obj.get("cause", ""),
        RuleRef(obj["cause_rule"]["chain"], obj["cause_rule"]["handle"] or 0, obj["cause_rule"]["rule"])
        if "cause_rule" in obj else None,
        obj.get("ruleset_changed", False), tuple(map(_way, obj.get("keeps", ()))),
        tuple(map(_way, obj.get("ways", ()))), obj.get("history", ""), obj.get("verdict", ""),
    )  # fmt: skip


@pytest.mark.parametrize(("name", "reason", "text"), RENDERED, ids=[r[0] for r in RENDERED])
def test_the_json_fields_word_the_same_text(name: str, reason: Reason, text: str) -> None:
    again = from_json(reason_json(reason))
    assert again.render() == text
    # Every field but the ways' input interfaces (named, not numbered): the same value.
    assert dataclasses.replace(again, keeps=(), ways=()) == dataclasses.replace(reason, keeps=(), ways=())
    assert [(w.egress, w.side, w.gives) for w in again.ways] == [(w.egress, w.side, w.gives) for w in reason.ways]


def with_rules(predict: Any) -> Any:
    """``predict`` whose predictions name a rule per binding, as the evaluator's do."""

    def named(fib: Any, flow: Flow) -> Prediction:
        p = predict(fib, flow)
        ref = RuleRef("table ip nat chain postrouting", 3 + flow.dport % 5, "masquerade")
        return dataclasses.replace(p, explain=(f"snat via dev up2: {ref} (to 203.0.113.2)", "no rule here"),
                                   rules=(ref,))

    return named


@settings(max_examples=200, deadline=None)
@given(entries=st.lists(table_entries(), min_size=1, max_size=30), choice=st.integers(0, 4),
       before=st.booleans())
def test_generated_decisions_read_back_from_their_fields(entries: list[Any], choice: int, before: bool) -> None:
    """Every decision decide makes: its text is ``render`` of its fields, and the JSON fields give
    that text again (a program loses nothing by reading them instead of the text)."""
    plan = decide(entries, predict=with_rules(predictor_from(choice)), fib_now=FIB_NOW,
                  fib_before=FIB_BEFORE if before else None)  # fmt: skip
    for d in (*plan.stale, *plan.undecided):
        assert d.reason == d.why.render() and d.code == d.why.code.value
        assert (d.side, d.actual, d.expected) == (d.why.side, d.why.actual, d.why.expected)
        again = from_json(reason_json(d.why))
        assert again.render() == d.reason and again == d.why


@settings(max_examples=200, deadline=None)
@given(alternatives(), st.one_of(st.none(), alternatives()))
def test_decisions_of_alternatives_read_back_from_their_fields(now: Prediction, then: Prediction | None) -> None:
    """The ways (input interface, path, what each gives) of a prediction with alternatives too."""
    decider = Decider(predict=predictor(now, then), fib_now=ALT_NOW,
                      fib_before=ALT_BEFORE if then is not None else None)
    for e in ENTRIES:
        decider.add(e)
    for d in (*decider.plan().stale, *decider.plan().undecided):
        again = from_json(reason_json(d.why))
        assert again.render() == d.reason
        assert [w.side for w in again.ways] == [w.side for w in d.why.ways]
