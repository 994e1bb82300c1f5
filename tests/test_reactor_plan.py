"""reactor.plan_once: the plan ``topowatch plan``/``flush`` and D-Bus ``Plan`` act on.

A real ruleset through the real evaluator on the gateway of
test_reactor_incremental (masquerade out of up2; 192.0.2.0/24 via up2 in
MOVED). Every expected verdict is worked out by hand from the ruleset and the
routes.
"""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

import pytest

from topowatch.core.conntrack import IPS_DST_NAT_DONE, IPS_SEEN_REPLY, Entry
from topowatch.core.decide import FlushPlan
from topowatch.core.eligibility import Eligibility
from topowatch.core.fib import Fib
from topowatch.core.flow import NO_NAT, Flow, Prediction
from topowatch.core.nat import NatRuleset
from topowatch.edges.nft import parse_ruleset_json
from topowatch.reactor import plan_once

from test_reactor import A, OLD_RULES, on_port_1000_and_1001, port_rules, two_ways_in, udp_entry, wan_gave_no_nat_on_port_1000  # isort: skip
from test_reactor_incremental import BEFORE, MOVED, RULESET, RULESET_DOC, entry, unpredictable_snat  # isort: skip


def _sport_ruleset() -> NatRuleset:
    """``oifname "up2" udp sport 1000 masquerade``: only flows from port 1000 are masqueraded."""
    return parse_ruleset_json({"nftables": [
        {"table": {"family": "ip", "name": "nat", "handle": 1}},
        {"chain": {"family": "ip", "table": "nat", "name": "post", "handle": 2, "type": "nat",
                   "hook": "postrouting", "prio": 100, "policy": "accept"}},
        {"rule": {"family": "ip", "table": "nat", "chain": "post", "handle": 3, "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "up2"}},
            {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "sport"}}, "right": 1000}},
            {"masquerade": None}]}},
    ]})  # fmt: skip


def test_the_plan_of_a_moved_route() -> None:
    """192.0.2.0/24 now leaves by up2, masqueraded: its null bindings are stale; 8.8.8.8 still leaves by up1."""
    entries = [entry("192.0.2.7", 1000), entry("192.0.2.8", 1001, translated="203.0.113.2"), entry("8.8.8.8", 1002)]
    plan = plan_once(MOVED, RULESET, entries, Eligibility())
    assert [d.entry for d in plan.stale] == [entries[0]]
    assert (plan.examined, plan.eligible, plan.undecided) == (3, 3, ())
    # Before the move nothing is stale but the one masqueraded out of up2, which now leaves by up1.
    assert [d.entry for d in plan_once(BEFORE, RULESET, entries, Eligibility()).stale] == [entries[1]]


def test_a_ruleset_that_reads_the_source_port_is_judged_per_port() -> None:
    """Two entries of one flow key, ports 1000 and 1001, neither NATed: only port 1000 would be now."""
    entries = [entry("192.0.2.7", 1000), entry("192.0.2.7", 1001), entry("192.0.2.7", 1002, translated="203.0.113.2")]
    for order in (entries, entries[::-1]):
        plan = plan_once(MOVED, _sport_ruleset(), order, Eligibility())
        assert sorted(d.entry.orig.sport for d in plan.stale) == [1000, 1002]


def test_the_plan_asks_the_given_eligibility_and_predictor() -> None:
    replied = [Entry(e.family, e.proto, e.orig, e.reply, e.status | IPS_SEEN_REPLY, id=e.id)
               for e in (entry("192.0.2.7", 1000), entry("8.8.8.8", 1002))]  # fmt: skip
    assert plan_once(MOVED, RULESET, replied, Eligibility()).eligible == 0
    plan = plan_once(MOVED, RULESET, replied, Eligibility(unreplied_only=False))
    assert plan.eligible == 2 and [d.entry for d in plan.stale] == [replied[0]]
    plan = plan_once(MOVED, RULESET, replied, Eligibility(unreplied_only=False), previous=(BEFORE, RULESET))
    assert plan.eligible == 2 and [d.entry for d in plan.stale] == [replied[0]]  # the same with a previous snapshot
    seen: list[tuple[NatRuleset, IPv4Address]] = []

    def nothing_changes(ruleset: NatRuleset, fib: Fib, flow: Flow) -> Prediction:
        seen.append((ruleset, flow.dst))  # type: ignore[arg-type]
        return Prediction(dnat=frozenset({NO_NAT}), snat=frozenset({NO_NAT}), egress=())

    plan = plan_once(MOVED, RULESET, replied, Eligibility(unreplied_only=False), predictor=nothing_changes)
    assert plan.stale == ()
    assert sorted(dst for _, dst in seen) == [IPv4Address("8.8.8.8"), IPv4Address("192.0.2.7")]
    assert all(rs is RULESET for rs, _ in seen)


# -- with the previous snapshot (``topowatch plan --previous``), a source NAT the evaluator cannot
# predict: what says an entry went stale is its egress, before and now, and the ruleset then.
# 192.0.2.7 (masqueraded to 203.0.113.2 out of up2 in MOVED) left by up1 in BEFORE; 8.8.8.8 leaves
# by up1 in both.

UNPREDICTABLE = [entry("192.0.2.7", 1000, translated="203.0.113.2"), entry("8.8.8.8", 1002)]
SAME_EGRESS = "source NAT cannot be predicted (a set that cannot be read); the egress is the same, but the ruleset changed"


def _verdicts(plan: FlushPlan) -> tuple[list[tuple[str, str]], list[tuple[str, str, bool]]]:
    return ([(str(d.entry.orig.dst), d.code) for d in plan.stale],
            [(str(d.entry.orig.dst), d.code, d.why.ruleset_changed) for d in plan.undecided])  # fmt: skip


def test_without_a_previous_snapshot_an_unpredictable_nat_is_undecided() -> None:
    plan = plan_once(MOVED, RULESET, UNPREDICTABLE, Eligibility(), unpredictable_snat)
    assert _verdicts(plan) == ([], [("192.0.2.7", "unknown_nat", False), ("8.8.8.8", "unknown_nat", False)])


def test_with_the_previous_snapshot_a_moved_egress_is_stale_and_an_unchanged_one_says_nothing() -> None:
    plan = plan_once(MOVED, RULESET, UNPREDICTABLE, Eligibility(), unpredictable_snat, previous=(BEFORE, RULESET))
    assert _verdicts(plan) == ([("192.0.2.7", "egress_changed_unknown_nat")], [])


def test_the_same_ruleset_read_again_as_previous_is_no_ruleset_change() -> None:
    """As a reaction has it (``Reactor.react``: "read again, unchanged"): a previous snapshot whose
    ruleset equals the current one (a snapshot file's is decoded: another value) changed nothing."""
    again = parse_ruleset_json({"nftables": RULESET_DOC})
    assert again == RULESET and again is not RULESET
    for ruleset0 in (RULESET, again):
        plan = plan_once(MOVED, RULESET, UNPREDICTABLE, Eligibility(), unpredictable_snat, previous=(MOVED, ruleset0))
        assert _verdicts(plan) == ([], [])


def test_another_ruleset_as_previous_leaves_an_unchanged_egress_undecided() -> None:
    plan = plan_once(MOVED, RULESET, UNPREDICTABLE, Eligibility(), unpredictable_snat,
                     previous=(MOVED, NatRuleset()))  # fmt: skip
    assert _verdicts(plan) == ([], [("192.0.2.7", "unknown_nat", True), ("8.8.8.8", "unknown_nat", True)])
    assert [d.reason for d in plan.undecided] == [SAME_EGRESS] * 2



# -- the ways an entry may have come in, judged by the previous snapshot's ruleset (as a reaction:
# ``test_reactor.py::test_the_ways_an_entry_came_are_judged_by_the_ruleset_of_t0`` and the next).


def test_the_ways_an_entry_came_are_judged_by_the_previous_ruleset() -> None:
    entries = [replace(udp_entry(port), status=udp_entry(port).status | IPS_DST_NAT_DONE) for port in (5060, 5061)]
    plan = plan_once(A, NatRuleset(), entries, Eligibility(), two_ways_in, previous=(A, OLD_RULES))
    assert plan.stale == ()
    assert [(d.entry, d.code) for d in plan.undecided] == [(entries[0], "unknown_ingress"), (entries[1], "unknown_ingress")]
    # The same ruleset then: no way gave them their bindings, they came in on lan.
    assert plan_once(A, NatRuleset(), entries, Eligibility(), two_ways_in, previous=(A, NatRuleset())).undecided == ()


@pytest.mark.parametrize("field", ["sport", "dport"])
def test_the_flow_classes_of_a_plan_follow_the_previous_ruleset_too(field: str) -> None:
    old = port_rules(field)
    on_1000, on_1001 = on_port_1000_and_1001(field)
    for entries in ([on_1000, on_1001], [on_1001, on_1000]):
        plan = plan_once(A, NatRuleset(), entries, Eligibility(), wan_gave_no_nat_on_port_1000(field, old),
                         previous=(A, old))  # fmt: skip
        assert plan.stale == () and [(d.entry, d.code) for d in plan.undecided] == [(on_1000, "unknown_ingress")]


def test_the_plan_predicts_once_per_flow_class() -> None:
    """Three entries to 192.0.2.0/24 (two destinations, two source ports): one route, a ruleset that
    names neither address nor port there, so one flow class and one prediction, with or without the
    previous snapshot. Without classes it would be two flow keys (the source port is not in a key
    when the ruleset reads no port); with classes by port, two classes."""
    entries = [entry("192.0.2.7", 1000), entry("192.0.2.7", 1001), entry("192.0.2.8", 1000)]
    for previous in (None, (BEFORE, RULESET)):
        plan = plan_once(MOVED, RULESET, entries, Eligibility(), previous=previous)
        assert (plan.distinct_flows, plan.predicted) == (1, 1)
        assert len(plan.stale) == 3  # each now leaves by up2, masqueraded


def test_an_xfrm_selector_reading_the_source_port_judges_each_port_now_or_before() -> None:
    """An xfrm policy whose selector names source port 5060 (for other nets): the source port can
    change a prediction, so ports 5060 and 1000 of one flow are two classes, two predictions;
    whether the policy is in the snapshot judged or only in the previous one."""
    from topowatch.core.xfrm import Direction, XfrmPolicy, XfrmSelector

    selector = XfrmSelector(2, IPv4Network("10.99.0.0/16"), IPv4Network("10.98.0.0/16"), sport=5060,
                            sport_mask=0xFFFF, proto=17)
    ipsec = (XfrmPolicy(selector, Direction.OUT),)
    entries = [entry("192.0.2.7", 5060), entry("192.0.2.7", 1000)]
    now = plan_once(replace(MOVED, xfrm_policies=ipsec), RULESET, entries, Eligibility())
    before = plan_once(MOVED, RULESET, entries, Eligibility(), previous=(replace(BEFORE, xfrm_policies=ipsec), RULESET))
    without = plan_once(MOVED, RULESET, entries, Eligibility(), previous=(BEFORE, RULESET))
    assert [(p.distinct_flows, p.predicted, len(p.stale)) for p in (now, before, without)] == [(2, 2, 2), (2, 2, 2),
                                                                                              (1, 1, 2)]


def test_the_plans_flow_classes_follow_the_eligibility_too() -> None:
    """An eligibility naming 192.0.2.0/25 and 192.0.2.128/25 (every destination of the moved net):
    its networks bound the classes as the routes' do (``core.classify``: the eligibility is a plain
    membership of a class), so .7 and .200 are two classes, two predictions; both stale."""
    eligibility = Eligibility(destinations=(IPv4Network("192.0.2.0/25"), IPv4Network("192.0.2.128/25")))
    entries = [entry("192.0.2.7", 1000), entry("192.0.2.200", 1001)]
    for previous in (None, (BEFORE, RULESET)):
        plan = plan_once(MOVED, RULESET, entries, eligibility, previous=previous)
        assert (plan.eligible, len(plan.stale), plan.distinct_flows, plan.predicted) == (2, 2, 2, 2)
