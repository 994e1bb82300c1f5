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
from topowatch.core.flow import Unknown


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
