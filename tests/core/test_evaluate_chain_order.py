# SPDX-License-Identifier: GPL-2.0-or-later
"""Mark chains that share a hook and a priority, and the rule an unmodelled jump names.

The kernel runs base chains of one hook by priority, and chains of equal
priority in registration order (the one registered last first), which no
ruleset dump shows (``nf_register_net_hook``). Two mangle chains at -150
that set the mark differently leave it unknown to the NAT after them; a
chain at another priority runs after (or before) them in any case, so
ties never reorder chains across priorities. Rulesets are built by hand over
the gateway of ``test_evaluate_breadth``.
"""

from __future__ import annotations

from ipaddress import ip_address

import pytest
from test_evaluate_breadth import FIB, MASQ_UP1, udp

from topowatch.core.evaluate import predict
from topowatch.core.flow import NO_NAT, Binding, NatKind, RuleRef, Unknown
from topowatch.core.nat import (
    Chain,
    Hook,
    IntervalSet,
    Key,
    MarkSet,
    Match,
    NatRuleset,
    NatStatement,
    Op,
    Rule,
    Selector,
    UnknownMatch,
    Verdict,
    VerdictKind,
)

FULL = 0xFFFFFFFF
MARK = Selector(Key.MARK, "meta mark")
MASQ = NatStatement(NatKind.MASQUERADE, "masquerade")


def mangle(table: str, prio: int, mark: int) -> Chain:
    rule = Rule(5, (MarkSet(mark, FULL, f"meta mark set {mark}"),))
    return Chain("ip", table, "pre", (rule,), Hook.PREROUTING, prio, "filter", "accept")


def masquerade_mark(mark: int) -> Chain:
    match = Match(MARK, Op.EQ, IntervalSet(((mark, mark),)), f"meta mark {mark}")
    return Chain("ip", "nat", "post", (Rule(9, (match, MASQ)),), Hook.POSTROUTING, 100, "nat", "accept")


def test_two_mark_chains_of_one_priority_setting_different_marks_leave_the_mark_unknown() -> None:
    rs = NatRuleset((mangle("a", -150, 1), mangle("b", -150, 2), masquerade_mark(1)), marks_known=True)
    p = predict(rs, FIB, udp())
    assert isinstance(p.snat, Unknown), p.snat
    assert any(line.startswith("marks at prerouting unknown: ") for line in p.explain), p.explain
    # Setting the same mark, their order does not matter.
    same = NatRuleset((mangle("a", -150, 1), mangle("b", -150, 1), masquerade_mark(1)), marks_known=True)
    assert predict(same, FIB, udp()).snat == frozenset({MASQ_UP1})


@pytest.mark.parametrize(("tie", "after"), [(-150, -140), (0, 1)])
def test_a_tie_does_not_reorder_chains_of_other_priorities(tie: int, after: int) -> None:
    """a and b (tied) set 1 in either order; c (one above) sets 2 after both: the mark is 2."""
    rs = NatRuleset((mangle("a", tie, 1), mangle("b", tie, 1), mangle("c", after, 2), masquerade_mark(2)),
                    marks_known=True)
    assert predict(rs, FIB, udp()).snat == frozenset({MASQ_UP1})
    rs = NatRuleset((mangle("a", tie, 1), mangle("b", tie, 1), mangle("c", after, 2), masquerade_mark(1)),
                    marks_known=True)
    assert predict(rs, FIB, udp()).snat == frozenset({NO_NAT})


def test_a_jump_to_a_chain_not_in_the_ruleset_names_its_rule() -> None:
    jump = Verdict(VerdictKind.JUMP, "nowhere")
    post = Chain("ip", "nat", "post", (Rule(12, (jump,)), Rule(13, (MASQ,))), Hook.POSTROUTING, 100, "nat",
                 "accept")
    p = predict(NatRuleset((post,), marks_known=True), FIB, udp())
    assert isinstance(p.snat, Unknown)
    assert p.snat.rule == RuleRef("table ip nat chain post", 12, "jump nowhere")
    assert p.snat.reason == ("snat unknown via dev up1 via 203.0.113.1: table ip nat chain post handle 12: "
                             "jump nowhere: jump to a chain not in the ruleset")


def test_nat_chains_of_one_priority_give_the_union_of_their_orders_egresses() -> None:
    """Two prerouting nat chains at -100: one DNATs to 10.0.0.7 (routed via lan), the other to
    10.0.0.66, whose route is unknown. Either runs first, so either DNAT may be the flow's: the egress
    is unknown, as the second order's is; with both routes known it is both (in order)."""
    from test_evaluate import LAN, UP1, FakeFib, dnat, pre
    from test_evaluate import ruleset as nft

    rs = nft(pre([dnat("10.0.0.7")], table="a"), pre([dnat("10.0.0.66")], table="b"))
    fib = FakeFib(routes={"0.0.0.0/0": (UP1,), "10.0.0.0/8": (LAN,), "10.0.0.66/32": Unknown("a rule with ipproto")})
    p = predict(rs, fib, udp(dst="8.8.8.8"))
    assert isinstance(p.egress, Unknown)
    assert p.egress.reason == "route after dnat unknown: a rule with ipproto"
    known = FakeFib(routes={"0.0.0.0/0": (UP1,), "10.0.0.0/8": (LAN,), "10.0.0.66/32": (UP1,)})
    p = predict(rs, known, udp(dst="8.8.8.8"))
    assert p.egress == (LAN, UP1)


def test_the_orders_prediction_names_every_rule_and_keeps_the_ingress() -> None:
    """Postrouting chains a and b at 100 SNAT differently: each order an alternative, the sides their
    union, the rules both, the ingress the flow's; an order whose DNAT is unknown makes the DNAT side
    unknown, said as one of them."""
    from test_evaluate import LAN_IN, XT_POLICY, FakeFib, dnat, post, pre, snat
    from test_evaluate import ruleset as nft

    rs = nft(post([snat("192.0.2.2")], table="a"), post([snat("192.0.2.1")], table="b"))
    p = predict(rs, FakeFib(), udp(dst="8.8.8.8"))
    assert p.ingress == LAN_IN
    assert [r.chain for r in p.rules] == ["table ip a chain postrouting", "table ip b chain postrouting"]
    rs = nft(pre([XT_POLICY, dnat("10.0.0.7")], table="a"), pre([dnat("10.0.0.8")], table="b"))
    p = predict(rs, FakeFib(), udp(dst="8.8.8.8"))
    assert isinstance(p.dnat, Unknown)
    handle = rs.chains[0].rules[0].handle
    assert p.dnat.reason == (f"arriving on one of them: dnat unknown: table ip a chain prerouting handle {handle}: "
                             "xt match policy dnat to 10.0.0.7: unmodelled expression: xt match policy")
    assert p.dnat.rule == RuleRef("table ip a chain prerouting", handle, "xt match policy dnat to 10.0.0.7")
    assert isinstance(p.snat, Unknown)
    assert p.snat.reason.startswith("arriving on one of them: dnat unknown: "), p.snat.reason


def test_chains_at_priorities_0_and_1_are_not_tied() -> None:
    """srcnat 0 SNATs, srcnat+1 masquerades: 0 runs first, always (no order to guess)."""
    from test_evaluate import MASQ, SNAT_X, FakeFib, post, snat
    from test_evaluate import ruleset as nft

    rs = nft(post([snat("192.0.2.1")], table="a", prio=0), post([MASQ], table="b", prio=1))
    p = predict(rs, FakeFib(), udp(dst="8.8.8.8"))
    assert p.snat == frozenset({SNAT_X})
    assert p.alternatives == ()


def test_tied_mark_chains_that_disagree_are_named_in_the_explanation() -> None:
    """Mangle chains a and b at prerouting -150 set marks 1 and 2: the mark the NAT sees depends on
    their registration order; the explanation names both, their hook and priority, and why."""
    rs = NatRuleset((mangle("a", -150, 1), mangle("b", -150, 2), masquerade_mark(1)), marks_known=True)
    p = predict(rs, FIB, udp())
    assert ("marks at prerouting unknown: table ip a chain pre and table ip b chain pre share hook prerouting "
            "priority -150; they run in registration order, which the ruleset dump does not show, and the orders "
            "give this flow different outcomes") in p.explain, p.explain


def test_each_order_of_a_tie_runs_each_chain_once() -> None:
    """Postrouting nat chains a and b at 100, q at 200: a SNATs mark 7 only, b flips bit 0 of the mark
    (``meta mark set meta mark xor 1``), q SNATs mark 1 to 192.0.2.1. In either order of a and b
    (each runs once), a binds nothing and b leaves mark 1: q SNATs to 192.0.2.1."""
    flip = Rule(6, (MarkSet(1, 0, "meta mark set meta mark xor 1"),))
    seven = Match(MARK, Op.EQ, IntervalSet(((7, 7),)), "meta mark 7")
    to7 = NatStatement(NatKind.SNAT, "snat to 192.0.2.7", addr=(ip_address("192.0.2.7"), ip_address("192.0.2.7")))
    one = Match(MARK, Op.EQ, IntervalSet(((1, 1),)), "meta mark 1")
    to1 = NatStatement(NatKind.SNAT, "snat to 192.0.2.1", addr=(ip_address("192.0.2.1"), ip_address("192.0.2.1")))
    a = Chain("ip", "a", "post", (Rule(5, (seven, to7)),), Hook.POSTROUTING, 100, "nat", "accept")
    b = Chain("ip", "b", "post", (flip,), Hook.POSTROUTING, 100, "nat", "accept")
    q = Chain("ip", "q", "post", (Rule(7, (one, to1)),), Hook.POSTROUTING, 200, "nat", "accept")
    p = predict(NatRuleset((a, b, q), marks_known=True), FIB, udp())
    assert p.snat == frozenset({Binding(NatKind.SNAT, ip_address("192.0.2.1"), ip_address("192.0.2.1"))})


def test_two_ties_of_mark_chains_are_both_named() -> None:
    """Two ties at prerouting, a and b at -150 (marks 1, 2), c and d at -140 (marks 3, 4): the
    orders disagree, and the explanation names both ties."""
    rs = NatRuleset((mangle("a", -150, 1), mangle("b", -150, 2), mangle("c", -140, 3), mangle("d", -140, 4),
                     masquerade_mark(3)), marks_known=True)
    p = predict(rs, FIB, udp())
    assert isinstance(p.snat, Unknown)
    assert ("marks at prerouting unknown: table ip a chain pre and table ip b chain pre share hook prerouting "
            "priority -150; table ip c chain pre and table ip d chain pre share hook prerouting priority -140; "
            "they run in registration order, which the ruleset dump does not show, and the orders give this "
            "flow different outcomes") in p.explain, p.explain


def test_four_tied_mark_chains_are_followed_and_five_are_too_many() -> None:
    """Four mangle chains at -150 all setting mark 1: 24 orders, all followed, all leave 1: the
    masquerade of mark 1 binds. Five: 120 orders, more than the 24 followed: the marks are unknown,
    said so, and so is the SNAT."""
    four = NatRuleset((*(mangle(t, -150, 1) for t in "abcd"), masquerade_mark(1)), marks_known=True)
    assert predict(four, FIB, udp()).snat == frozenset({MASQ_UP1})
    five = NatRuleset((*(mangle(t, -150, 1) for t in "abcde"), masquerade_mark(1)), marks_known=True)
    p = predict(five, FIB, udp())
    assert isinstance(p.snat, Unknown)
    names = " and ".join(f"table ip {t} chain pre" for t in "abcde")
    assert (f"marks at prerouting unknown: {names} share hook prerouting priority -150: too many orders to "
            "follow") in p.explain, p.explain


def test_unknown_matches_in_tied_mark_chains_are_followed_in_each_order() -> None:
    """a (-150): ``xt match u32 meta mark set 1``; b (-150): ``meta mark set 1``. In either order and
    whatever the match says, the mark leaves as 1: the masquerade of mark 1 binds."""
    odd = UnknownMatch("xt match u32", "xt match u32")
    a = Chain("ip", "a", "pre", (Rule(5, (odd, MarkSet(1, FULL, "meta mark set 1"))),), Hook.PREROUTING, -150,
              "filter", "accept")
    rs = NatRuleset((a, mangle("b", -150, 1), masquerade_mark(1)), marks_known=True)
    assert predict(rs, FIB, udp()).snat == frozenset({MASQ_UP1})
