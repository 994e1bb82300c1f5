"""The admission rule's table (core/admission.py) against each Python copy of the rule.

The compiled copy (``side_admits`` in edges/_ctscan.c) runs over the same
table in tests/edges/test_ctscan.py. Expectations come from the table, never
from another copy.
"""

from __future__ import annotations

import itertools

import pytest

from topowatch.core.admission import CASES, AdmissionCase
from topowatch.core.decide import _admitted, _admitted_raw, _compile

IDS = [c.name for c in CASES]


def test_the_table_covers_both_answers_both_families_and_port_ranges() -> None:
    assert {c.admitted for c in CASES} == {True, False}
    assert {c.original.version for c in CASES} == {4, 6}
    assert any(b.ports is not None for c in CASES for b in c.bindings)
    assert any(b.addr_lo is None and b.ports is not None for c in CASES for b in c.bindings)
    assert len(set(IDS)) == len(IDS)


def test_some_cases_need_a_later_binding() -> None:
    """Where only a later binding admits, a scan that stops at the first refusal fails some order."""
    assert any(c.admitted and sum(
        b.admits(c.original, c.translated, 0, c.port) for b in c.bindings) == 1 and len(c.bindings) > 1
        for c in CASES)  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_binding_admits(case: AdmissionCase) -> None:
    got = any(b.admits(case.original, case.translated, 0, case.port) for b in case.bindings)
    assert got is case.admitted


def orders(case: AdmissionCase) -> list[tuple[tuple[int | None, int | None, int | None, int | None], ...]]:
    """The case's checks in every order of its bindings (a set's order is the hash's: try them all)."""
    checks = _compile(frozenset(case.bindings))
    assert checks is not None
    return [tuple(p) for p in itertools.permutations(checks)]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_admitted_over_integers(case: AdmissionCase) -> None:
    for check in orders(case):
        assert _admitted(check, int(case.original), int(case.translated), case.port) is case.admitted, check


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_admitted_over_packed_addresses(case: AdmissionCase) -> None:
    for check in orders(case):
        assert _admitted_raw(check, case.original.packed, case.translated.packed, case.port) is case.admitted


def test_a_case_of_mixed_families_is_refused() -> None:
    from ipaddress import ip_address

    with pytest.raises(ValueError, match="different families"):
        AdmissionCase("x", (), ip_address("10.0.0.1"), ip_address("::1"), 0, True)
    with pytest.raises(ValueError, match="port 70000"):
        AdmissionCase("x", (), ip_address("10.0.0.1"), ip_address("10.0.0.1"), 70000, True)
