# SPDX-License-Identifier: GPL-2.0-or-later
"""A locally generated flow's socket mark: when a few marks stand for all, and when they do not.

The gateway of ``test_marks`` routes marks with ``(mark & 0x3f00) == 0x200``
by table 100 (up2), others by main (up1). The entry does not show the
socket's mark (SO_MARK). Where only that policy rule reads it, the marks
0x200 and 0 stand for every mark: the prediction is both alternatives.
Where a rule also reads the packet mark (a match on it, a copy of it into
the ct mark, a set that keeps some of its bits), a mark such as 7 may be
treated by that rule as neither 0x200 nor 0 are: the two do not stand for
all, and what the rule decides is unknown.
"""

from __future__ import annotations

from dataclasses import replace
from ipaddress import ip_address, ip_network

from test_marks import CTMARK, FIB, MARK, MASQ_UP1, MASQ_UP2, TOPOLOGY, chain, match, ruleset, set_mark

from topowatch.core.evaluate import MAX_MARK_ALTERNATIVES, predict
from topowatch.core.fib import Fib
from topowatch.core.flow import Binding, Flow, NatKind, Unknown
from topowatch.core.model import AF_INET, TABLE_LOCAL, TABLE_MAIN, PolicyRule
from topowatch.core.nat import (
    AnyOf,
    Chain,
    Hook,
    IntervalSet,
    Key,
    Match,
    NatRuleset,
    NatStatement,
    Op,
    Rule,
    Selector,
)
from topowatch.core.xfrm import Action, Direction, XfrmPolicy, XfrmSelector

LOCAL = Flow(AF_INET, 17, ip_address("100.64.0.1"), ip_address("198.18.0.7"), 5000, 53)
SNAT_77 = {"snat": {"addr": "100.64.0.77"}}


def post(*first: list[dict[str, object]]) -> tuple[dict[str, object], list[list[dict[str, object]]]]:
    return chain("post", "postrouting", 100, [*first, [{"masquerade": None}]], kind="nat")


def test_only_the_policy_rule_reading_the_mark_gives_one_alternative_per_routing() -> None:
    p = predict(ruleset(post()), FIB, LOCAL)
    assert p.snat == frozenset({MASQ_UP1, MASQ_UP2})
    # A mark set only for port 123 flows: this flow (port 53) keeps its socket's mark.
    only_ntp = chain("out", "output", -150, [[match({"payload": {"protocol": "udp", "field": "dport"}}, 123),
                                              set_mark(MARK, 0x200)]])
    assert predict(ruleset(only_ntp, post()), FIB, LOCAL).snat == frozenset({MASQ_UP1, MASQ_UP2})


def test_a_copy_of_the_packet_mark_into_the_ct_mark_reads_it() -> None:
    """``ct mark set meta mark`` at output, ``ct mark 7 snat``: a socket mark 7 would be SNATed."""
    save = chain("out", "output", -150, [[set_mark(CTMARK, MARK)]])
    p = predict(ruleset(save, post([match(CTMARK, 7), SNAT_77])), FIB, LOCAL)
    assert isinstance(p.snat, Unknown), p.snat


def test_a_set_that_keeps_some_bits_of_the_packet_mark_reads_it() -> None:
    """``meta mark set meta mark | 0x10000`` keeps the socket's low bits: ``meta mark & 0xff 7`` may hold."""
    keep = chain("out", "output", -150, [[set_mark(MARK, {"|": [MARK, 0x10000]})]])
    masked = {"&": [MARK, 0xFF]}
    p = predict(ruleset(keep, post([match(masked, 7), SNAT_77])), FIB, LOCAL)
    assert isinstance(p.snat, Unknown), p.snat


def test_a_ct_mark_set_does_not_read_the_packet_mark() -> None:
    """``ct mark set ct mark | 0x10000`` reads the ct mark only: the socket marks still stand for all."""
    ct_only = chain("out", "output", -150, [[set_mark(CTMARK, {"|": [CTMARK, 0x10000]})]])
    p = predict(ruleset(ct_only, post()), FIB, LOCAL)
    assert p.snat == frozenset({MASQ_UP1, MASQ_UP2})
    assert Binding(NatKind.SNAT, ip_address("100.64.0.77")) not in p.snat


def test_a_match_on_the_packet_mark_reads_it() -> None:
    for left in (MARK, {"&": [MARK, 0xFF]}):
        p = predict(ruleset(post([match(left, 7), SNAT_77])), FIB, LOCAL)
        assert isinstance(p.snat, Unknown), (left, p.snat)


def rules_fib(fwmark: int, fwmask: int | None) -> Fib:
    rules = (PolicyRule(AF_INET, 0, table=TABLE_LOCAL), PolicyRule(AF_INET, 100, table=100, fwmark=fwmark, fwmask=fwmask),
             PolicyRule(AF_INET, 32766, table=TABLE_MAIN))
    return Fib(replace(TOPOLOGY, rules=rules))


def test_a_fwmark_without_a_mask_compares_every_bit() -> None:
    """``ip rule add fwmark 0x200 table 100``: the kernel sets the mask to 0xffffffff for a mark not 0;
    the socket's mark 0x200 routes by up2, any other by up1: both alternatives."""
    assert predict(ruleset(post()), rules_fib(0x200, None), LOCAL).snat == frozenset({MASQ_UP1, MASQ_UP2})


def test_a_fwmark_0_under_a_mask_selects_the_marks_without_those_bits() -> None:
    """``fwmark 0/0xf0``: marks whose bits 4-7 are clear (0, say) route by up2, others (0x10) by up1."""
    assert predict(ruleset(post()), rules_fib(0, 0xF0), LOCAL).snat == frozenset({MASQ_UP1, MASQ_UP2})


def test_a_multiport_rule_does_not_read_the_socket_mark() -> None:
    """``-m multiport --ports 53 -j SNAT`` (iptables) reads ports only: the socket marks still stand for all."""
    dport = Selector(Key.DPORT, "--dport", proto=17)
    sport = Selector(Key.SPORT, "--sport", proto=17)
    ports = AnyOf(tuple(Match(s, Op.EQ, IntervalSet(((53, 53),)), f"{s.text} 53") for s in (sport, dport)),
                  "-m multiport --ports 53")
    post_chain = Chain("ip", "nat", "POSTROUTING", (Rule(1, (ports, NatStatement(NatKind.MASQUERADE, "-j MASQUERADE"))),),
                       Hook.POSTROUTING, 100, "nat", "accept")
    p = predict(NatRuleset((post_chain,), marks_known=True), FIB, LOCAL)
    assert p.snat == frozenset({MASQ_UP1, MASQ_UP2})


def test_a_fwmark_0_without_a_mask_selects_every_mark() -> None:
    """``ip rule add fwmark 0 table 100``: a mark of 0 leaves the mask 0 (``fib_nl2rule``): every mark
    routes by table 100, whatever the socket's."""
    assert predict(ruleset(post()), rules_fib(0, None), LOCAL).snat == frozenset({MASQ_UP2})


def test_a_verdict_map_on_ports_does_not_read_the_socket_mark() -> None:
    vmap = {"vmap": {"key": {"payload": {"protocol": "udp", "field": "dport"}}, "data": {"set": [[123, {"accept": None}]]}}}
    assert predict(ruleset(post([vmap])), FIB, LOCAL).snat == frozenset({MASQ_UP1, MASQ_UP2})


def test_an_unknown_match_in_a_mark_chain_is_followed_both_ways() -> None:
    """``xt match policy meta mark set 0x200`` in a prerouting mangle chain: the mark is 0x200 or 0, so
    the route (and the masquerade) is up2's or up1's: unknown."""
    forwarded = Flow(AF_INET, 17, ip_address("10.77.0.3"), ip_address("198.18.0.7"), 5000, 53)
    unknown = chain("m", "prerouting", -150, [[{"xt": {"type": "match", "name": "policy"}}, set_mark(MARK, 0x200)]])
    p = predict(ruleset(unknown, post()), FIB, forwarded)
    assert isinstance(p.snat, Unknown), p.snat


def fwmark_fib(*rules: PolicyRule) -> Fib:
    """The gateway with ``rules`` between local and main (in place of its ``fwmark 0x200/0x3f00``)."""
    return Fib(replace(TOPOLOGY, rules=(PolicyRule(AF_INET, 0, table=TABLE_LOCAL), *rules,
                                        PolicyRule(AF_INET, 32766, table=TABLE_MAIN))))


def to_up2_by_mark(*values: int, mask: int) -> Fib:
    """``ip rule add fwmark V/mask lookup 100`` (up2) for each value, priorities 100, 101, ..."""
    return fwmark_fib(*(PolicyRule(AF_INET, 100 + n, table=100, fwmark=v, fwmask=mask) for n, v in enumerate(values)))


def test_seven_fwmark_values_are_followed_and_eight_leave_the_mark_unknown() -> None:
    """``fwmark 0x100/0xf00 lookup 100`` ... ``fwmark 0x700/0xf00 lookup 100``: a socket mark whose bits
    8-11 are 1 to 7 routes by up2, any other (0, 0x800, ...) by main (up1). Seven values and one that
    matches none are eight marks, the most followed (``MAX_MARK_ALTERNATIVES``): both masquerades, one
    alternative per mark. An eighth rule (0x800) makes nine: the mark is left unknown, and so is the
    route after it, rather than followed past the bound."""
    assert MAX_MARK_ALTERNATIVES == 8
    seven = predict(ruleset(post()), to_up2_by_mark(*(k << 8 for k in range(1, 8)), mask=0xF00), LOCAL)
    assert seven.snat == frozenset({MASQ_UP1, MASQ_UP2})
    assert sorted(a.snat == frozenset({MASQ_UP2}) for a in seven.alternatives) == [False] + [True] * 7
    eight = predict(ruleset(post()), to_up2_by_mark(*(k << 8 for k in range(1, 9)), mask=0xF00), LOCAL)
    assert isinstance(eight.snat, Unknown), eight.snat
    assert "fwmark" in eight.snat.reason and "packet mark" in eight.snat.reason, eight.snat.reason


def test_a_fwmark_0_under_a_mask_is_its_own_class_beside_fwmark_1() -> None:
    """``fwmark 0/0x3 lookup 100`` and ``fwmark 1/0x3 lookup 100``: marks whose two low bits are 0 or 1
    route by up2 (``(mark ^ 0) & 3 == 0``, ``(mark ^ 1) & 3 == 0``), those with 2 or 3 by main (up1).
    The socket's mark may be either: both masquerades. (Read as the mark 1, the rule ``fwmark 0/0x3``
    would fall into ``fwmark 1``'s class and the marks with low bits 2 or 3 would not be followed.)"""
    p = predict(ruleset(post()), to_up2_by_mark(0, 1, mask=0x3), LOCAL)
    assert p.snat == frozenset({MASQ_UP1, MASQ_UP2})
    assert sorted(a.snat == frozenset({MASQ_UP2}) for a in p.alternatives) == [False, True, True]


def test_an_xfrm_policy_selecting_a_mark_leaves_the_socket_mark_unknown() -> None:
    """An xfrm out policy ``mark 7/0xff action block`` towards 198.18.0.0/24 beside ``fwmark 0x200/0x3f00
    lookup 100``: ``xfrm_policy_match`` reads the flow's mark (``(mark & 0xff) == 7``), so a socket mark
    7 is blocked (no NAT, the flow dropped) though the policy rule routes it as it routes 0 (up1). The
    marks 0x200 and 0 do not stand for it: the mark, and the SNAT, are unknown, not the two
    masquerades."""
    block = XfrmPolicy(XfrmSelector(AF_INET, ip_network("0.0.0.0/0"), ip_network("198.18.0.0/24")),
                       direction=Direction.OUT, action=Action.BLOCK, mark=7, mark_mask=0xFF, priority=1, index=1)
    fib = Fib(replace(TOPOLOGY, xfrm_policies=(block,), xfrm_known=True))
    assert predict(ruleset(post()), fib, replace(LOCAL, packet_mark=7)).snat == frozenset()
    p = predict(ruleset(post()), fib, LOCAL)
    assert isinstance(p.snat, Unknown), p.snat
