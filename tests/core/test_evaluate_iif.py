"""evaluate.reads_iif: whether a prediction may depend on the interface a flow entered on.

When it says no, ``predict`` evaluates a flow with several candidate input
interfaces once, for the first candidate: a wrong "no" would judge a flow by
an interface it may not have come in on (issue 12, cause 1). Each expected
answer is written by hand from what the kernel expression reads.
"""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from topowatch.core.evaluate import reads_iif
from topowatch.core.fib import Fib
from topowatch.core.flow import NatKind
from topowatch.core.model import AF_INET, PolicyRule, Topology
from topowatch.core.nat import (
    AddrTypeMatch,
    AnyOf,
    Chain,
    ConcatMatch,
    CtStateMatch,
    CtStatusMatch,
    Hook,
    IntervalSet,
    Key,
    MarkSet,
    Match,
    NameSet,
    NatMapStatement,
    NatRuleset,
    NatStatement,
    NatTarget,
    Op,
    Passive,
    Rule,
    Selector,
    UnknownMatch,
    UnknownStatement,
    Verdict,
    VerdictKind,
    VerdictMap,
)

IIFNAME = Selector(Key.IIFNAME, "iifname")
IIF = Selector(Key.IIF, "iif")
OIFNAME = Selector(Key.OIFNAME, "oifname")
DPORT = Selector(Key.DPORT, "udp dport", proto=17)
SADDR = Selector(Key.SADDR, "ip saddr", family=AF_INET)
FIB_IIF = Selector(Key.FIB_OIF, "fib saddr . iif oif", params=("saddr", "iif"))
FIB_DADDR = Selector(Key.FIB_TYPE, "fib daddr type", params=("daddr",))
NAMES = NameSet(frozenset({"lan0"}))
PORTS = IntervalSet(((53, 53),))
TO = NatTarget((ip_address("192.0.2.1"), ip_address("192.0.2.1")))
ACCEPT = Verdict(VerdictKind.ACCEPT)

EXPRESSIONS = [
    ("iifname", Match(IIFNAME, Op.EQ, NAMES, 'iifname "lan0"'), True),
    ("iif", Match(IIF, Op.NE, NAMES, 'iif != "lan0"'), True),
    ("oifname", Match(OIFNAME, Op.EQ, NAMES, 'oifname "lan0"'), False),
    ("udp dport", Match(DPORT, Op.EQ, PORTS, "udp dport 53"), False),
    ("fib saddr . iif", Match(FIB_IIF, Op.EQ, IntervalSet(((0, 0),)), "fib saddr . iif oif missing"), True),
    ("fib daddr type", Match(FIB_DADDR, Op.EQ, IntervalSet(((2, 2),)), "fib daddr type local"), False),
    ("concat with iifname", ConcatMatch((IIFNAME, DPORT), Op.EQ, ((NAMES, PORTS),), "iifname . udp dport"), True),
    ("concat without", ConcatMatch((SADDR, DPORT), Op.EQ, (), "ip saddr . udp dport"), False),
    ("vmap on iifname", VerdictMap((IIFNAME,), (((NAMES,), ACCEPT),), "iifname vmap"), True),
    ("vmap on oifname", VerdictMap((OIFNAME,), (((NAMES,), ACCEPT),), "oifname vmap"), False),
    ("redirect map", NatMapStatement(NatKind.REDIRECT, "redirect to udp dport map", None, (DPORT,), ()), True),
    ("dnat map on iifname", NatMapStatement(NatKind.DNAT, "dnat to iifname map", None, (IIFNAME,),
                                            (((NAMES,), TO),)), True),
    ("dnat map on dport", NatMapStatement(NatKind.DNAT, "dnat to udp dport map", None, (DPORT,),
                                          (((PORTS,), TO),)), False),
    ("any of, one iifname", AnyOf((Match(DPORT, Op.EQ, PORTS, "x"), Match(IIFNAME, Op.EQ, NAMES, "y")), "any"),
     True),
    ("any of, none", AnyOf((Match(OIFNAME, Op.EQ, NAMES, "x"),), "any"), False),
    ("redirect", NatStatement(NatKind.REDIRECT, "redirect"), True),
    ("masquerade", NatStatement(NatKind.MASQUERADE, "masquerade"), False),
    ("dnat", NatStatement(NatKind.DNAT, "dnat", addr=(TO.addr)), False),
    ("addrtype --limit-iface-in", AddrTypeMatch("dst", frozenset({"LOCAL"}), False, "x", limit_iface="in"), True),
    ("addrtype", AddrTypeMatch("dst", frozenset({"LOCAL"}), False, "x"), False),
    ("ct state", CtStateMatch(frozenset({"new"}), False, "ct state new"), False),
    ("ct status", CtStatusMatch(frozenset({"dnat"}), False, "ct status dnat"), False),
    ("meta mark set", MarkSet(1, 0xFFFFFFFF, "meta mark set 1"), False),
    ("counter", Passive("counter", "counter"), False),
    ("verdict", ACCEPT, False),
    ("unknown match", UnknownMatch("osf", "osf name x"), False),
    ("unknown statement", UnknownStatement("queue", "queue"), False),
    ("an expression not known to be free of it", object(), True),  # conservative
]


def ruleset(*exprs: object) -> NatRuleset:
    rules = tuple(Rule(i, (e,), text=f"rule {i}") for i, e in enumerate(exprs, 1))  # type: ignore[arg-type]
    return NatRuleset((Chain("inet", "nat", "pre", rules, Hook.PREROUTING, -100, "nat", "accept"),))


NO_RULES = Fib(Topology())


@pytest.mark.parametrize(("name", "expr", "reads"), EXPRESSIONS, ids=[e[0] for e in EXPRESSIONS])
def test_an_expression_reads_the_input_interface(name: str, expr: object, reads: bool) -> None:
    assert reads_iif(ruleset(expr), NO_RULES) is reads, name
    # Among others that do not read it, the answer is the same; after one that does, always yes.
    assert reads_iif(ruleset(ACCEPT, expr, NatStatement(NatKind.MASQUERADE, "masquerade")), NO_RULES) is reads
    assert reads_iif(ruleset(NatStatement(NatKind.REDIRECT, "redirect"), expr), NO_RULES) is True


def test_policy_rules_on_an_input_interface_read_it_except_lo() -> None:
    plain = ruleset(NatStatement(NatKind.MASQUERADE, "masquerade"))
    assert not reads_iif(plain, Fib(Topology(rules=(PolicyRule(AF_INET, 100, table=100, iifname="lo"),))))
    assert reads_iif(plain, Fib(Topology(rules=(PolicyRule(AF_INET, 100, table=100, iifname="lan0"),))))
    assert not reads_iif(plain, Fib(Topology(rules=(PolicyRule(AF_INET, 100, table=100, oifname="lan0"),))))


def test_the_answer_is_per_ruleset() -> None:
    """Asked again and again, for many rulesets (past any cache), each keeps its own answer."""
    reading = [ruleset(Match(IIFNAME, Op.EQ, NameSet(frozenset({f"lan{i}"})), "x")) for i in range(70)]
    free = [ruleset(Match(OIFNAME, Op.EQ, NameSet(frozenset({f"up{i}"})), "x")) for i in range(70)]
    for _ in range(2):
        for a, b in zip(reading, free, strict=True):
            assert reads_iif(a, NO_RULES) and not reads_iif(b, NO_RULES)
