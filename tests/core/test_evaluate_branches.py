# SPDX-License-Identifier: GPL-2.0-or-later
"""Unknown matches in sequence: every combination of their truth values is followed.

``xt match policy`` (not modelled) is true or false for the flow, and two of
them independently. Here ``U goto c`` then ``masquerade`` in the base chain,
and in ``c``: ``U masquerade`` then ``snat to 192.0.2.1``. The flow is
masqueraded unless the first is true and the second false, when it is
SNATed to 192.0.2.1: which one, the ruleset does not say (the kernel's answer
depends on what the unmodelled matches see). Only the branch (true, false)
differs, so a run that follows the second match with the first's value
would call the flow masqueraded.
"""

from __future__ import annotations

from test_evaluate import MASQ, SNAT_X, XT_POLICY, C, FakeFib, goto, post, ruleset, snat, udp

from topowatch.core.evaluate import predict
from topowatch.core.flow import RuleRef, Unknown


def test_the_branch_where_two_unknown_matches_differ_is_followed() -> None:
    rs = ruleset(post([XT_POLICY, goto("c")], [MASQ]), C("c", [[XT_POLICY, MASQ], [snat("192.0.2.1")]]))
    p = predict(rs, FakeFib(), udp())
    assert isinstance(p.snat, Unknown), p.snat
    assert p.snat.reason.endswith("xt match policy goto c: unmodelled expression: xt match policy"), p.snat.reason


def test_seven_unknown_matches_that_change_nothing_leave_the_binding_known() -> None:
    """Seven rules ``xt match policy continue`` then ``snat to 192.0.2.1``: ``continue`` goes on to
    the next rule whatever the match says (``NFT_CONTINUE``), so every one of the 2**7 combinations
    of the unknown matches reaches the SNAT: the binding is known. Following all of them takes 255
    runs (each run stops at the first match its tape does not cover), within the 256 followed."""
    rules = [[XT_POLICY, {"continue": None}] for _ in range(7)]
    rs = ruleset(post(*rules, [snat("192.0.2.1")]))
    assert predict(rs, FakeFib(), udp()).snat == frozenset({SNAT_X})


def test_eight_unknown_matches_are_too_many_to_follow() -> None:
    """Eight such rules make 2**9 - 1 = 511 runs, more than the 256 followed: the SNAT is unknown,
    said so after the first unknown match's reason (the kernel's answer is the SNAT, but the model
    does not follow that many branches)."""
    rules = [[XT_POLICY, {"continue": None}] for _ in range(8)]
    rs = ruleset(post(*rules, [snat("192.0.2.1")]))
    p = predict(rs, FakeFib(), udp())
    assert isinstance(p.snat, Unknown), p.snat
    assert p.snat.reason == ("snat unknown via dev up1 via 203.0.113.1: table ip nat chain postrouting handle 3: "
                             "xt match policy continue: unmodelled expression: xt match policy (and too many "
                             "unknown matches to follow)")
    assert p.snat.rule == RuleRef("table ip nat chain postrouting", 3, "xt match policy continue")


def test_the_256th_run_is_followed() -> None:
    """``U goto t``, ``U snat to 192.0.2.2``, ``snat to 192.0.2.1``; chain t: 126 rules ``U snat to
    192.0.2.1`` then ``snat to 192.0.2.1``. The runs: the first (stops at the first U), 253 for the
    first U true (every way through t SNATs to 192.0.2.1), then the first U false: run 255 stops at
    the second U, run 256 (the second U true) SNATs to 192.0.2.2. Run 256 is within the 256 followed:
    the answer is unknown because the branches disagree, with the first unknown match's reason
    alone (not "too many unknown matches")."""
    t = C("t", [*([XT_POLICY, snat("192.0.2.1")] for _ in range(126)), [snat("192.0.2.1")]])
    rs = ruleset(post([XT_POLICY, goto("t")], [XT_POLICY, snat("192.0.2.2")], [snat("192.0.2.1")]), t)
    p = predict(rs, FakeFib(), udp())
    assert isinstance(p.snat, Unknown), p.snat
    assert p.snat.reason.endswith("xt match policy goto t: unmodelled expression: xt match policy"), p.snat.reason


def test_an_unmodelled_statement_after_an_unknown_match_names_the_match() -> None:
    """``U snat to 192.0.2.1`` then an xt MASQUERADE target (not modelled): where U is true the flow
    is SNATed, where it is false the unmodelled target decides: unknown, said by the unknown match
    met first (the question whose answer would decide), with its rule."""
    rs = ruleset(post([XT_POLICY, snat("192.0.2.1")], [{"xt": {"type": "target", "name": "MASQUERADE"}}]))
    p = predict(rs, FakeFib(), udp())
    assert isinstance(p.snat, Unknown), p.snat
    assert p.snat.reason == ("snat unknown via dev up1 via 203.0.113.1: table ip nat chain postrouting handle 3: "
                             "xt match policy snat to 192.0.2.1: unmodelled expression: xt match policy")
    assert p.snat.rule == RuleRef("table ip nat chain postrouting", 3, "xt match policy snat to 192.0.2.1")
