"""The admission rule's table (core/admission.py) against each Python copy of the rule.

The compiled copy (``side_admits`` in edges/_ctscan.c) runs over the same
table in tests/edges/test_ctscan.py. Expectations come from the table, never
from another copy.
"""

from __future__ import annotations

import itertools
from ipaddress import ip_address
from typing import Any

import pytest

from topowatch.core.admission import CASES, AdmissionCase
from topowatch.core.conntrack import IPS_CONFIRMED, IPS_DST_NAT_DONE, IPS_SRC_NAT_DONE, CtTuple, Entry
from topowatch.core.decide import Decider, _admitted, _admitted_raw, _compile
from topowatch.core.fib import Fib
from topowatch.core.flow import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_UDP, Binding, Flow, NatKind, Prediction
from topowatch.core.model import AF_INET, AF_INET6, Topology

FIB = Fib(Topology())


def to_raw(e: Entry) -> tuple[Any, ...]:
    o, r = e.orig, e.reply
    return (e.family, e.proto, o.src.packed, o.dst.packed, o.sport, o.dport, r.src.packed, r.dst.packed,
            r.sport, r.dport, e.status, e.zone, e.mark, e.id, e.timeout)


def from_raw(raw: tuple[Any, ...]) -> Entry:
    family, proto, osrc, odst, osport, odport, rsrc, rdst, rsport, rdport, status, zone, mark, i, t = raw
    return Entry(family, proto, CtTuple(ip_address(osrc), ip_address(odst), osport, odport),
                 CtTuple(ip_address(rsrc), ip_address(rdst), rsport, rdport), status, zone, mark, i, t)

IDS = [c.name for c in CASES]


def test_the_table_covers_both_answers_both_families_and_port_ranges() -> None:
    assert {c.admitted for c in CASES} == {True, False}
    assert any(c.expected("dnat") is not c.admitted for c in CASES), "a case where the destination side differs"
    assert {c.original.version for c in CASES} == {4, 6}
    assert any(b.ports is not None for c in CASES for b in c.bindings)
    assert any(b.addr_lo is None and b.ports is not None for c in CASES for b in c.bindings)
    assert len(set(IDS)) == len(IDS)


def test_some_cases_need_a_later_binding() -> None:
    """Where only a later binding admits, a scan that stops at the first refusal fails some order."""
    assert any(c.admitted and sum(
        b.admits(c.original, c.translated, 0, c.port) for b in c.bindings) == 1 and len(c.bindings) > 1
        for c in CASES)  # fmt: skip


SIDES = ["snat", "dnat"]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_binding_admits(case: AdmissionCase, side: str) -> None:
    got = any(b.admits(case.original, case.translated, case.before, case.port, dnat_side=side == "dnat")
              for b in case.bindings)  # fmt: skip
    assert got is case.expected(side)


def orders(case: AdmissionCase, side: str) -> list[tuple[Any, ...]]:
    """The case's checks in every order of its bindings (a set's order is the hash's: try them all)."""
    checks = _compile(frozenset(case.bindings), dnat_side=side == "dnat")
    assert checks is not None
    return [tuple(p) for p in itertools.permutations(checks)]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_admitted_over_integers(case: AdmissionCase, side: str) -> None:
    for check in orders(case, side):
        got = _admitted(check, int(case.original), int(case.translated), case.before, case.port)
        assert got is case.expected(side), check


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_admitted_over_packed_addresses(case: AdmissionCase, side: str) -> None:
    for check in orders(case, side):
        got = _admitted_raw(check, case.original.packed, case.translated.packed, case.before, case.port)
        assert got is case.expected(side), check


def test_a_case_takes_every_port_and_no_other() -> None:
    for port in (0, 0xFFFF):
        assert AdmissionCase("x", (), ip_address("10.0.0.1"), ip_address("10.0.0.1"), port, True).before == port
        assert AdmissionCase("x", (), ip_address("10.0.0.1"), ip_address("10.0.0.1"), 1, True, port).before == port
    for port in (-1, 0x10000):
        with pytest.raises(ValueError, match=f"port {port} out of range"):
            AdmissionCase("x", (), ip_address("10.0.0.1"), ip_address("10.0.0.1"), port, True)
        with pytest.raises(ValueError, match=f"port {port} out of range"):
            AdmissionCase("x", (), ip_address("10.0.0.1"), ip_address("10.0.0.1"), 1, True, port)


def test_the_tables_helpers_build_what_they_are_given() -> None:
    """The table's rows are built by ``_b`` and ``_case``. The tests above read the table as the
    module built it on import, which a mutation run does once, before any mutant is active: the
    helpers are pinned here, on values written out by hand."""
    from topowatch.core.admission import _b, _case

    lo, hi, one = ip_address("192.0.2.64"), ip_address("192.0.2.127"), ip_address("203.0.113.2")
    assert _b(NatKind.NONE) == Binding(NatKind.NONE, None, None, None, None)
    assert _b(NatKind.MASQUERADE, "203.0.113.2") == Binding(NatKind.MASQUERADE, one, one, None, None)
    assert _b(NatKind.SNAT, "192.0.2.64", "192.0.2.127", (1024, 2047)) == Binding(NatKind.SNAT, lo, hi, 1024, 2047)
    assert _b(NatKind.REDIRECT, ports=(8000, 8099)) == Binding(NatKind.REDIRECT, None, None, 8000, 8099)
    binding = _b(NatKind.DNAT, "192.0.2.1")
    assert _case("n", (binding,), "10.0.1.2", "203.0.113.2", 80, True, 81, False) == AdmissionCase(
        "n", (binding,), ip_address("10.0.1.2"), one, 80, True, 81, False)
    assert _case("m", (binding,), "10.0.1.2", "10.0.1.3", 7, False) == AdmissionCase(
        "m", (binding,), ip_address("10.0.1.2"), ip_address("10.0.1.3"), 7, False, None, None)


def test_a_case_of_mixed_families_is_refused() -> None:
    from ipaddress import ip_address

    with pytest.raises(ValueError, match="different families"):
        AdmissionCase("x", (), ip_address("10.0.0.1"), ip_address("::1"), 0, True)
    with pytest.raises(ValueError, match="port 70000"):
        AdmissionCase("x", (), ip_address("10.0.0.1"), ip_address("10.0.0.1"), 70000, True)


# --- the Decider's own fast checks (``_healthy`` on entries, ``add_raw`` on raw tuples) -------------


def judged(case: AdmissionCase, side: str, order: tuple[Binding, ...], *, raw: bool, icmp: bool) -> bool:
    """Does the Decider send the case's entry (the second of its key) to the reasoned judgement?

    The first entry of the key carries no translation; the second carries the case's on
    ``side``. A healthy verdict of the fast check never reaches ``_judge``.
    """
    v4 = case.original.version == 4
    peer = ip_address("10.9.9.9") if v4 else ip_address("fd09::9")
    family = AF_INET if v4 else AF_INET6
    proto = (IPPROTO_ICMP if v4 else IPPROTO_ICMPV6) if icmp else IPPROTO_UDP
    none = frozenset({Binding(NatKind.NONE)})
    bindings: Any = order  # a tuple where a set goes: the checks keep this order

    def predict(fib: Fib, flow: Flow) -> Prediction:
        return Prediction(dnat=bindings if side == "dnat" else none, snat=bindings if side == "snat" else none,
                          egress=())  # fmt: skip

    status = IPS_CONFIRMED | IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE
    # ICMP reads the port of the original direction (dnat: type/code, snat: id); UDP the reply's.
    # The other field holds a port far away, so reading the wrong one changes some answers.
    far = (case.port + 30000) % 65536
    if side == "snat":
        if icmp:
            orig1, orig2 = CtTuple(case.original, peer, case.port, 8 << 8), CtTuple(case.original, peer, case.port, 8 << 8)
            first = Entry(family, proto, orig1, CtTuple(peer, case.original, case.port, 0), status=status, id=1)
            entry = Entry(family, proto, orig2, CtTuple(peer, case.translated, far, 0), status=status, id=2)
        else:
            orig1, orig2 = CtTuple(case.original, peer, 1, 53), CtTuple(case.original, peer, far, 53)
            first = Entry(family, proto, orig1, CtTuple(peer, case.original, 53, 1), status=status, id=1)
            entry = Entry(family, proto, orig2, CtTuple(peer, case.translated, 53, case.port), status=status, id=2)
    elif icmp:
        orig1, orig2 = CtTuple(peer, case.original, 7, case.port), CtTuple(peer, case.original, 8, case.port)
        first = Entry(family, proto, orig1, CtTuple(case.original, peer, 7, 0), status=status, id=1)
        entry = Entry(family, proto, orig2, CtTuple(case.translated, peer, far, 0), status=status, id=2)
    else:
        # The original port is the case's (the destination port of the key); the reply's, translated.
        orig1, orig2 = CtTuple(peer, case.original, 1, case.before), CtTuple(peer, case.original, 2, case.before)
        first = Entry(family, proto, orig1, CtTuple(case.original, peer, case.before, 1), status=status, id=1)
        entry = Entry(family, proto, orig2, CtTuple(case.translated, peer, case.port, 2), status=status, id=2)
    decider = Decider(predict=predict, fib_now=FIB, sport_matters=False, build=from_raw)
    seen: list[int] = []
    judge = decider._judge

    def spy(e: Entry, *args: Any) -> None:
        seen.append(e.id)
        judge(e, *args)

    decider._judge = spy  # type: ignore[method-assign]
    for e in (first, entry):
        if raw:
            decider.add_raw(to_raw(e))
        else:
            decider.add(e)
    assert decider.examined == 2 and len(decider._now) == 1, "both entries of one key"
    return 2 in seen


@pytest.mark.parametrize("icmp", [False, True], ids=["udp", "icmp"])
@pytest.mark.parametrize("raw", [False, True], ids=["entries", "raw"])
@pytest.mark.parametrize("side", ["snat", "dnat"])
def test_the_deciders_fast_checks_follow_the_table(side: str, raw: bool, icmp: bool) -> None:
    for case in CASES:
        if icmp and case.original_port is not None:
            continue  # ICMP reads one port for both (type and code, or the id): it never changes
        for order in itertools.permutations(case.bindings):
            assert judged(case, side, order, raw=raw, icmp=icmp) is not case.expected(side), (case.name, order)
