# SPDX-License-Identifier: GPL-2.0-or-later
"""The iptables statements and matches in the evaluator: MARK and CONNMARK, NETMAP, multiport, policy.

Rulesets are built as the iptables reader builds them (``MarkSet``,
``MarkCopy``, ``NetmapStatement``, ``AnyOf``, ``PolicyMatch``) and evaluated
over the gateway of ``test_evaluate_breadth`` (lan 10.0.1.1/24, up1
203.0.113.2/24 with the default route). The kernel behaviour each
expectation is worked from:

- ``MARK --set-xmark v/m``: mark = (mark & ~m) ^ v; ``CONNMARK --save-mark
  --nfmask N --ctmask C``: ctmark = (ctmark & ~C) ^ (mark & N);
  ``--restore-mark``: mark = (mark & ~N) ^ (ctmark & C) (``xt_connmark``).
  A fresh flow's marks are 0 (a whole ruleset), the targets are not
  terminal: the rule goes on, later matches see the new marks.
- ``NETMAP --to P``: the address keeps its host bits under P (the
  destination at prerouting, the source at postrouting).
- ``-m multiport --ports``: true if the source or the destination port is
  listed; after a DNAT to a port range the destination port is any of it.
- ``-m policy --dir in`` is refused at output and postrouting, ``--dir out``
  at prerouting and input (``policy_mt_check``).
"""

from __future__ import annotations

from ipaddress import ip_address, ip_network

from test_evaluate_breadth import FIB, MASQ_UP1, V6, B, udp

from topowatch.core.evaluate import predict
from topowatch.core.flow import NatKind, Unknown
from topowatch.core.nat import (
    AnyOf,
    Chain,
    Expression,
    Hook,
    IntervalSet,
    Key,
    MarkCopy,
    MarkSet,
    Match,
    NatRuleset,
    NatStatement,
    NetmapStatement,
    Op,
    PolicyMatch,
    Rule,
    Selector,
    Verdict,
    VerdictKind,
)

FULL = 0xFFFFFFFF
MASQ = NatStatement(NatKind.MASQUERADE, "-j MASQUERADE")
ACCEPT = Verdict(VerdictKind.ACCEPT, text="-j ACCEPT")
MARK = Selector(Key.MARK, "-m mark --mark")
CTMARK = Selector(Key.CT_MARK, "-m connmark --mark")
SPORT = Selector(Key.SPORT, "--sport", proto=17)
DPORT = Selector(Key.DPORT, "--dport", proto=17)


def is_(sel: Selector, value: int) -> Match:
    return Match(sel, Op.EQ, IntervalSet(((value, value),)), f"{sel.text} {value:#x}")


def rules(*exprs: tuple[Expression, ...]) -> tuple[Rule, ...]:
    return tuple(Rule(10 + i, e) for i, e in enumerate(exprs))


def rs(*, mangle: tuple[tuple[Expression, ...], ...] = (), pre: tuple[tuple[Expression, ...], ...] = (),
       post: tuple[tuple[Expression, ...], ...] = (), family: str = "ip") -> NatRuleset:
    chains = [Chain(family, "mangle", "PREROUTING", rules(*mangle), Hook.PREROUTING, -150, "filter", "accept"),
              Chain(family, "nat", "PREROUTING", rules(*pre), Hook.PREROUTING, -100, "nat", "accept"),
              Chain(family, "nat", "POSTROUTING", rules(*post), Hook.POSTROUTING, 100, "nat", "accept")]
    return NatRuleset(tuple(c for c in chains if c.rules), marks_known=True)


def test_connmark_save_with_masks_reaches_the_snat_match() -> None:
    """mark 0x105, save with --nfmask 0xff --ctmask 0xff: ctmark = (0 & ~0xff) ^ (0x105 & 0xff) = 5."""
    ruleset = rs(mangle=((MarkSet(0x105, FULL, "-j MARK --set-mark 0x105"),),
                         (MarkCopy(True, "-j CONNMARK --save-mark --nfmask 0xff --ctmask 0xff", 0xFF, 0xFF),)),
                 post=((is_(CTMARK, 5), MASQ),))
    assert predict(ruleset, FIB, udp()).snat == frozenset({MASQ_UP1})
    whole = rs(mangle=((MarkSet(7, FULL, "-j MARK --set-mark 7"),), (MarkCopy(True, "-j CONNMARK --save-mark"),)),
               post=((is_(CTMARK, 7), MASQ),))
    assert predict(whole, FIB, udp()).snat == frozenset({MASQ_UP1})


def test_connmark_restore_with_masks_keeps_the_marks_other_bits() -> None:
    """ctmark 0x100, mark 7, restore with masks 0xf00: mark = (7 & ~0xf00) ^ (0x100 & 0xf00) = 0x107."""
    ruleset = rs(mangle=((MarkSet(0x100, FULL, "-j CONNMARK --set-mark 0x100", ct=True),),
                         (MarkSet(7, FULL, "-j MARK --set-mark 7"),),
                         (MarkCopy(False, "-j CONNMARK --restore-mark --mask 0xf00", 0xF00, 0xF00),)),
                 post=((is_(MARK, 0x107), MASQ),))
    assert predict(ruleset, FIB, udp()).snat == frozenset({MASQ_UP1})


def test_a_partial_connmark_set_keeps_the_other_bits() -> None:
    """--set-xmark 0x10/0x10 on a fresh ct mark 0: 0x10."""
    ruleset = rs(mangle=((MarkSet(0x10, 0x10, "-j CONNMARK --set-xmark 0x10/0x10", ct=True),),),
                 post=((is_(CTMARK, 0x10), MASQ),))
    assert predict(ruleset, FIB, udp()).snat == frozenset({MASQ_UP1})


def test_mark_statements_do_not_end_the_rule() -> None:
    for stmt in (MarkSet(1, FULL, "-j MARK --set-mark 1"), MarkCopy(True, "-j CONNMARK --save-mark")):
        ruleset = rs(post=((stmt, MASQ),))
        assert predict(ruleset, FIB, udp()).snat == frozenset({MASQ_UP1}), stmt


def test_a_mark_set_in_a_nat_chain_before_routing_is_unknown_and_says_so() -> None:
    ruleset = rs(pre=((MarkSet(1, FULL, "-j MARK --set-mark 1"),),))
    p = predict(ruleset, FIB, udp())
    assert isinstance(p.dnat, Unknown)
    assert p.dnat.reason == ("dnat unknown: table ip nat chain PREROUTING handle 10: -j MARK --set-mark 1: a mark "
                             "set in a nat chain before routing is not modelled")


def test_netmap_keeps_the_host_bits_of_the_destination_and_of_the_source() -> None:
    ruleset = rs(pre=((NetmapStatement(ip_network("10.0.1.0/24"), "-j NETMAP --to 10.0.1.0/24"),),),
                 post=((NetmapStatement(ip_network("198.51.100.0/24"), "-j NETMAP --to 198.51.100.0/24"),),))
    p = predict(ruleset, FIB, udp(src="10.0.1.2", dst="192.0.2.77"))
    assert p.dnat == frozenset({B(NatKind.DNAT, "10.0.1.77")})
    assert p.snat == frozenset({B(NatKind.SNAT, "198.51.100.2")})
    assert p.explain == (
        "dnat: table ip nat chain PREROUTING handle 10: -j NETMAP --to 10.0.1.0/24 (to 10.0.1.77)",
        "snat via dev lan: table ip nat chain POSTROUTING handle 10: -j NETMAP --to 198.51.100.0/24 "
        "(to 198.51.100.2)")


def test_netmap_of_the_other_family_is_unknown_and_says_so() -> None:
    ruleset = rs(pre=((NetmapStatement(ip_network("10.0.1.0/24"), "-j NETMAP --to 10.0.1.0/24"),),),
                 family="inet")
    p = predict(ruleset, FIB, V6)
    assert isinstance(p.dnat, Unknown)
    assert p.dnat.reason == ("dnat unknown: table inet nat chain PREROUTING handle 10: -j NETMAP --to 10.0.1.0/24: "
                             "address family does not match the flow")


def test_multiport_with_a_destination_port_range_partly_listed_is_unknown() -> None:
    """DNAT to 10.0.1.50:5000-5100; ``-m multiport --ports 5050``: the source port 5060 is not listed,
    the destination port may be 5050 or not."""
    dnat = NatStatement(NatKind.DNAT, "-j DNAT --to 10.0.1.50:5000-5100", addr=(ip_address("10.0.1.50"),) * 2,
                        ports=(5000, 5100))
    ports = AnyOf((is_(SPORT, 5050), is_(DPORT, 5050)), "-m multiport --ports 5050")
    ruleset = rs(pre=((dnat,),), post=((ports, MASQ),))
    p = predict(ruleset, FIB, udp(sport=5060))
    assert p.dnat == frozenset({B(NatKind.DNAT, "10.0.1.50", ports=(5000, 5100))})
    assert isinstance(p.snat, Unknown)
    assert p.snat.reason.endswith("--dport 5000-5100 is only partly in 5050"), p.snat.reason
    # The source port listed: true whatever the destination port.
    assert predict(ruleset, FIB, udp(sport=5050)).snat == frozenset({B(NatKind.MASQUERADE, "10.0.1.1")})


def test_policy_directions_refused_at_a_hook_are_unknown_and_say_so() -> None:
    into = PolicyMatch("in", "none", (), False, "-m policy --dir in --pol none")
    p = predict(rs(post=((into, ACCEPT), (MASQ,))), FIB, udp())
    assert isinstance(p.snat, Unknown)
    assert p.snat.reason == ("snat unknown via dev up1 via 203.0.113.1: table ip nat chain POSTROUTING handle 10: "
                             "-m policy --dir in --pol none -j ACCEPT: -m policy --dir in --pol none: --dir in is "
                             "invalid at postrouting")
    out = PolicyMatch("out", "none", (), False, "-m policy --dir out --pol none")
    p = predict(rs(pre=((out, ACCEPT), (NatStatement(NatKind.DNAT, "x", addr=(ip_address("10.0.1.50"),) * 2),))),
                FIB, udp())
    assert isinstance(p.dnat, Unknown)
    assert p.dnat.reason.endswith("-m policy --dir out --pol none: --dir out is invalid at prerouting")
