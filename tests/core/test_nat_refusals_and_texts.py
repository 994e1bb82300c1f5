# SPDX-License-Identifier: GPL-2.0-or-later
"""core.nat: a verdict's default text and an interval set's refusal, each value built inside its test.

(Values built in a ``parametrize`` list are built at collection, before a
mutant is switched on: the mutation run never sees their constructors run.)
A verdict with no text of its own reads as nft writes it: the verdict's
word, then the chain for jump and goto; reasons quote it. An interval set
refuses a reversed interval wherever it stands among several.
"""

from __future__ import annotations

import pytest

from topowatch.core.nat import IntervalSet, Verdict, VerdictKind


@pytest.mark.parametrize(("kind", "target", "text"), [
    (VerdictKind.ACCEPT, None, "accept"),
    (VerdictKind.RETURN, None, "return"),
    (VerdictKind.JUMP, "vpn", "jump vpn"),
    (VerdictKind.GOTO, "masq_up1", "goto masq_up1"),
])
def test_a_verdict_without_text_reads_as_nft_writes_it(kind: VerdictKind, target: str | None, text: str) -> None:
    assert Verdict(kind, target).text == text
    assert Verdict(kind, target, "by hand").text == "by hand"


@pytest.mark.parametrize("given", [((1, 2), (9, 5)), ((9, 5), (1, 2)), ((1, 2), (3, 4), (9, 5))])
def test_a_reversed_interval_among_several_is_refused_by_name(given: tuple[tuple[int, int], ...]) -> None:
    with pytest.raises(ValueError) as got:
        IntervalSet(given)
    assert str(got.value) == "IntervalSet: bad interval 9-5"
