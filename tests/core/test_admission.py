"""The admission rule's table (core/admission.py) against each Python copy of the rule.

The compiled copy (``side_admits`` in edges/_ctscan.c) runs over the same
table in tests/edges/test_ctscan.py. Expectations come from the table, never
from another copy.
"""

from __future__ import annotations

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


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_binding_admits(case: AdmissionCase) -> None:
    got = any(b.admits(case.original, case.translated, 0, case.port) for b in case.bindings)
    assert got is case.admitted


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_admitted_over_integers(case: AdmissionCase) -> None:
    check = _compile(frozenset(case.bindings))
    assert _admitted(check, int(case.original), int(case.translated), case.port) is case.admitted


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_admitted_over_packed_addresses(case: AdmissionCase) -> None:
    check = _compile(frozenset(case.bindings))
    assert _admitted_raw(check, case.original.packed, case.translated.packed, case.port) is case.admitted


def test_a_case_of_mixed_families_is_refused() -> None:
    from ipaddress import ip_address

    with pytest.raises(ValueError, match="different families"):
        AdmissionCase("x", (), ip_address("10.0.0.1"), ip_address("::1"), 0, True)
    with pytest.raises(ValueError, match="port 70000"):
        AdmissionCase("x", (), ip_address("10.0.0.1"), ip_address("10.0.0.1"), 70000, True)
