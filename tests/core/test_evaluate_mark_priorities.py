# SPDX-License-Identifier: GPL-2.0-or-later
"""Where mark chains run against the nat chains of a hook, and which hooks' mark chains a flow meets.

The kernel behaviour each expectation is worked from:

- ``nf_hook_entries``: the base chains of one hook run by priority, lowest
  first; a filter chain at priority 0 runs before a nat chain at 1, and one
  at 10 after a nat chain at 0. A mark chain and a nat chain of the *same*
  priority run in registration order, which no dump shows: the marks the
  NAT matches see are not known then (``_MarkPlan.between``), also where
  priority 0 is written as the default (0, not 1).
- A prerouting mark set after the nat chains (priority 10 after dstnat 0)
  still happens before routing and stays on the packet: postrouting's nat
  matches see it.
- Netfilter's hooks per path: a forwarded packet meets prerouting, forward,
  postrouting; one delivered to this host prerouting and input; a locally
  generated one output and postrouting. The forward hook's mark chains
  therefore change what postrouting's NAT sees for a forwarded flow only,
  never for one delivered here or sent from here.

Rulesets are built by hand (filter chains that set marks beside nat chains)
over the gateway of ``test_evaluate_breadth``: a flow from lan 10.0.1.2 to
192.0.2.10 leaves by up1 (masquerade source 203.0.113.2).
"""

from __future__ import annotations

from dataclasses import replace
from ipaddress import ip_address

from test_evaluate_breadth import FIB, MASQ_UP1, TOPOLOGY, udp

from topowatch.core.evaluate import predict
from topowatch.core.fib import Fib
from topowatch.core.flow import NO_NAT, Binding, NatKind, Unknown
from topowatch.core.nat import (
    Chain,
    CtStateMatch,
    CtStatusMatch,
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
VIA_UP1 = "dev up1 via 203.0.113.1"


def set_mark(name: str, hook: Hook, prio: int, mark: int, *before: object) -> Chain:
    """A filter chain ``name`` at ``hook``/``prio`` whose one rule sets the packet mark to ``mark``."""
    rule = Rule(5, (*before, MarkSet(mark, FULL, f"meta mark set {mark}")))  # type: ignore[arg-type]
    return Chain("ip", "f", name, (rule,), hook, prio, "filter", "accept")


def masquerade_mark(mark: int, hook: Hook = Hook.POSTROUTING, prio: int = 100) -> Chain:
    """A nat chain at ``hook``/``prio``: ``meta mark <mark> masquerade``."""
    match = Match(MARK, Op.EQ, IntervalSet(((mark, mark),)), f"meta mark {mark}")
    return Chain("ip", "nat", "post", (Rule(9, (match, MASQ)),), hook, prio, "nat", "accept")


def rs(*chains: Chain) -> NatRuleset:
    return NatRuleset(chains, marks_known=True)


def test_a_mark_chain_at_the_priority_of_the_only_nat_chain_leaves_the_snat_unknown() -> None:
    """Postrouting: a filter chain and the nat chain both at priority 0. Which runs first is the
    registration order: the masquerade's ``meta mark 1`` may see 1 or 0, so the SNAT side is
    unknown, named by the mark chain (priority 0 is 0 here, for both chains)."""
    p = predict(rs(set_mark("m", Hook.POSTROUTING, 0, 1), masquerade_mark(1, prio=0)), FIB, udp())
    assert isinstance(p.snat, Unknown)
    assert p.snat.reason == f"snat unknown via {VIA_UP1}: table ip f chain m: a mark chain between nat chains"
    assert p.dnat == frozenset({NO_NAT})


def test_a_mark_chain_below_the_nat_chain_is_seen_by_its_matches() -> None:
    """Postrouting: a filter chain at 0 sets mark 1, the nat chain at 1 masquerades mark 1: 0 runs
    first, the masquerade binds."""
    p = predict(rs(set_mark("m", Hook.POSTROUTING, 0, 1), masquerade_mark(1, prio=1)), FIB, udp())
    assert p.snat == frozenset({MASQ_UP1})


def test_a_prerouting_mark_set_after_dstnat_reaches_postrouting() -> None:
    """Prerouting: the nat chain (empty) at 0, a filter chain at 10 setting mark 1; postrouting
    masquerades mark 1. The filter chain runs after the DNAT, before routing: postrouting sees 1."""
    dstnat = Chain("ip", "nat", "pre", (), Hook.PREROUTING, 0, "nat", "accept")
    p = predict(rs(dstnat, set_mark("m", Hook.PREROUTING, 10, 1), masquerade_mark(1)), FIB, udp())
    assert p.snat == frozenset({MASQ_UP1})
    assert p.dnat == frozenset({NO_NAT})


def test_forward_mark_chains_reach_postrouting_for_a_forwarded_flow_only() -> None:
    """A forward filter chain sets mark 1; postrouting masquerades, and input SNATs, mark 1. A flow
    forwarded through lan -> up1 meets forward: masqueraded. One delivered to 10.0.1.1 (this host)
    meets prerouting and input, not forward: its mark stays 0, no SNAT. One sent from this host
    (203.0.113.2 -> 192.0.2.10) meets output and postrouting, not forward: no masquerade."""
    forward = set_mark("fwd", Hook.FORWARD, 0, 1)
    match = Match(MARK, Op.EQ, IntervalSet(((1, 1),)), "meta mark 1")
    to = NatStatement(NatKind.SNAT, "snat to 192.0.2.1", addr=(ip_address("192.0.2.1"), ip_address("192.0.2.1")))
    snat_in = Chain("ip", "nat", "in", (Rule(11, (match, to)),), Hook.INPUT, 100, "nat", "accept")
    ruleset = rs(forward, masquerade_mark(1), snat_in)
    assert predict(ruleset, FIB, udp()).snat == frozenset({MASQ_UP1})
    delivered = predict(ruleset, FIB, udp(dst="10.0.1.1"))
    assert delivered.snat == frozenset({NO_NAT}), delivered
    local = predict(ruleset, FIB, udp(src="203.0.113.2", packet_mark=0))
    assert local.snat == frozenset({NO_NAT}), local


def test_forward_marks_left_unknown_are_explained_at_forward() -> None:
    """A forward chain sets mark 1 after a match not modelled: whether the mark is 1 or 0 is unknown
    at postrouting, said "marks at forward unknown: <the rule and its match>", and the masquerade of
    mark 1 is unknown."""
    odd = UnknownMatch("xt match u32", "xt match u32")
    ruleset = rs(set_mark("fwd", Hook.FORWARD, 0, 1, odd), masquerade_mark(1))
    p = predict(ruleset, FIB, udp())
    assert isinstance(p.snat, Unknown)
    assert ("marks at forward unknown: table ip f chain fwd handle 5: xt match u32 meta mark set 1: "
            "unmodelled expression: xt match u32") in p.explain, p.explain


def test_an_iptables_match_in_a_forward_mark_chain_is_evaluated() -> None:
    """``-m conntrack --ctstate NEW -j MARK --set-mark 1`` in forward: a first packet is NEW, the mark
    is 1 at postrouting and the masquerade of mark 1 binds."""
    new = CtStateMatch(frozenset({"NEW"}), False, "-m conntrack --ctstate NEW")
    p = predict(rs(set_mark("fwd", Hook.FORWARD, 0, 1, new), masquerade_mark(1)), FIB, udp())
    assert p.snat == frozenset({MASQ_UP1})


def test_every_mark_chain_between_the_nat_chains_is_named() -> None:
    """Postrouting nat chains at 100 and 200, filter chains setting marks at 100 and 150: both may
    run before or between the NATs; the unknown names both, in priority order."""
    second = Chain("ip", "nat2", "post", (), Hook.POSTROUTING, 200, "nat", "accept")
    ruleset = rs(set_mark("m1", Hook.POSTROUTING, 100, 1), set_mark("m2", Hook.POSTROUTING, 150, 2),
                 masquerade_mark(1), second)
    p = predict(ruleset, FIB, udp())
    assert isinstance(p.snat, Unknown)
    assert p.snat.reason == (f"snat unknown via {VIA_UP1}: table ip f chain m1, table ip f chain m2: a mark "
                             "chain between nat chains")


def test_postrouting_marks_left_unknown_below_the_nat_chain_are_explained() -> None:
    """A postrouting filter chain at 0 sets mark 1 after a match not modelled; the nat chain at 100
    masquerades mark 1: unknown, and the explanation says the marks at postrouting are."""
    odd = UnknownMatch("xt match u32", "xt match u32")
    p = predict(rs(set_mark("m", Hook.POSTROUTING, 0, 1, odd), masquerade_mark(1)), FIB, udp())
    assert isinstance(p.snat, Unknown)
    assert ("marks at postrouting unknown: table ip f chain m handle 5: xt match u32 meta mark set 1: "
            "unmodelled expression: xt match u32") in p.explain, p.explain


def test_an_iptables_match_in_a_postrouting_mark_chain_is_evaluated() -> None:
    """``-m conntrack --ctstate NEW -j MARK --set-mark 1`` in postrouting mangle (-150): a first
    packet is NEW, the nat chain at 100 sees mark 1 and masquerades."""
    new = CtStateMatch(frozenset({"NEW"}), False, "-m conntrack --ctstate NEW")
    p = predict(rs(set_mark("m", Hook.POSTROUTING, -150, 1, new), masquerade_mark(1)), FIB, udp())
    assert p.snat == frozenset({MASQ_UP1})


def test_rt_ipsec_in_a_postrouting_mark_chain_is_evaluated() -> None:
    """``rt ipsec missing meta mark set 1`` in a postrouting filter chain at 0, xfrm read and no
    policy: the route has no bundle, the mark is 1 and the masquerade of mark 1 (nat at 100) binds."""
    clear = Match(Selector(Key.RT_IPSEC, "rt ipsec"), Op.EQ, IntervalSet(((0, 0),)), "rt ipsec missing")
    fib = Fib(replace(TOPOLOGY, xfrm_known=True))
    p = predict(rs(set_mark("m", Hook.POSTROUTING, 0, 1, clear), masquerade_mark(1)), fib, udp())
    assert p.snat == frozenset({MASQ_UP1})


def test_a_nat_statement_in_a_mark_chain_is_not_modelled() -> None:
    """``dnat to 10.0.1.50`` in a prerouting filter chain (nft refuses it: NAT needs a nat chain; a
    ruleset read otherwise): the marks it leaves are unknown, explained by the rule, and the flow's
    masquerade of mark 1 unknown."""
    to = (ip_address("10.0.1.50"), ip_address("10.0.1.50"))
    odd = Chain("ip", "f", "m", (Rule(5, (NatStatement(NatKind.DNAT, "dnat to 10.0.1.50", addr=to),)),),
                Hook.PREROUTING, -150, "filter", "accept")
    p = predict(rs(odd, masquerade_mark(1)), FIB, udp())
    assert isinstance(p.snat, Unknown)
    assert ("marks at prerouting unknown: table ip f chain m handle 5: dnat to 10.0.1.50: dnat in a prerouting "
            "chain") in p.explain, p.explain


def test_a_new_flow_at_prerouting_has_no_dst_nat_bit() -> None:
    """``ct status dnat accept`` then ``dnat to 10.0.1.50`` at prerouting: the DST_NAT bit is set by
    the NAT binding itself (``nf_nat_setup_info``), so a new flow's first packet does not have it
    before: the accept is not taken, the DNAT binds."""
    dnat_bit = CtStatusMatch(frozenset({"DST_NAT"}), False, "ct status dnat")
    to = (ip_address("10.0.1.50"), ip_address("10.0.1.50"))
    pre = Chain("ip", "nat", "pre", (Rule(5, (dnat_bit, Verdict(VerdictKind.ACCEPT))),
                                     Rule(6, (NatStatement(NatKind.DNAT, "dnat to 10.0.1.50", addr=to),))),
                Hook.PREROUTING, -100, "nat", "accept")
    p = predict(rs(pre), FIB, udp())
    assert p.dnat == frozenset({Binding(NatKind.DNAT, to[0], to[1])})


def test_marks_left_unknown_leave_the_conntrack_mark_unknown_too() -> None:
    """A prerouting filter chain sets the conntrack mark to 1 after a match not modelled; postrouting
    masquerades ``ct mark 1``: whether the entry's mark is 1 or still 0 is not known, so neither is
    the masquerade (not "no NAT", as a ct mark left at 0 would say)."""
    odd = UnknownMatch("xt match u32", "xt match u32")
    setter = Chain("ip", "f", "m", (Rule(5, (odd, MarkSet(1, FULL, "ct mark set 1", ct=True))),),
                   Hook.PREROUTING, -150, "filter", "accept")
    ctmark = Match(Selector(Key.CT_MARK, "ct mark"), Op.EQ, IntervalSet(((1, 1),)), "ct mark 1")
    post = Chain("ip", "nat", "post", (Rule(9, (ctmark, MASQ)),), Hook.POSTROUTING, 100, "nat", "accept")
    p = predict(rs(setter, post), FIB, udp())
    assert isinstance(p.snat, Unknown), p.snat


def test_an_iptables_match_in_a_prerouting_mark_chain_is_evaluated() -> None:
    """``-m conntrack --ctstate NEW -j MARK --set-mark 1`` in prerouting mangle (-150): a first
    packet is NEW, the mark is 1 and postrouting's masquerade of mark 1 binds."""
    new = CtStateMatch(frozenset({"NEW"}), False, "-m conntrack --ctstate NEW")
    p = predict(rs(set_mark("m", Hook.PREROUTING, -150, 1, new), masquerade_mark(1)), FIB, udp())
    assert p.snat == frozenset({MASQ_UP1})
