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

from test_evaluate import MASQ, XT_POLICY, C, FakeFib, goto, post, ruleset, snat, udp

from topowatch.core.evaluate import predict
from topowatch.core.flow import Unknown


def test_the_branch_where_two_unknown_matches_differ_is_followed() -> None:
    rs = ruleset(post([XT_POLICY, goto("c")], [MASQ]), C("c", [[XT_POLICY, MASQ], [snat("192.0.2.1")]]))
    p = predict(rs, FakeFib(), udp())
    assert isinstance(p.snat, Unknown), p.snat
    assert p.snat.reason.endswith("xt match policy goto c: unmodelled expression: xt match policy"), p.snat.reason
