# SPDX-License-Identifier: GPL-2.0-or-later
"""core.pressure: the policy's bounds at their edges, and the census's words for an entry.

Issue 16's mutation run left the edges of ``PressurePolicy``'s checks and the census's
"replied" class unchecked. The bounds are those rules.d/README.md and the class docstring state:
``0 < low < high <= 1``, ``batch`` and ``rate`` above 0, ``0 < min_interval <= max_interval``.
"""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from topowatch.core.conntrack import IPS_ASSURED, IPS_SEEN_REPLY
from topowatch.core.flow import IPPROTO_TCP, IPPROTO_UDP
from topowatch.core.pressure import Census, PressurePolicy

ACCEPTED = [
    {"low": 0.5, "high": 1.0},
    {"low": 0.01, "high": 0.02},
    {"batch": 1, "rate": 1},
    {"min_interval": 5.0, "max_interval": 5.0},
    {"min_interval": 0.001, "max_interval": 5.0},
]
REFUSED = [
    ({"low": 0.0, "high": 0.5}, "pressure watermarks need 0 < low < high <= 1, got low 0.0 high 0.5"),
    ({"low": 0.5, "high": 0.5}, "pressure watermarks need 0 < low < high <= 1, got low 0.5 high 0.5"),
    ({"low": 0.5, "high": 1.5}, "pressure watermarks need 0 < low < high <= 1, got low 0.5 high 1.5"),
    ({"batch": 0}, "batch and rate must be > 0"),
    ({"rate": 0}, "batch and rate must be > 0"),
    ({"batch": 0, "rate": 0}, "batch and rate must be > 0"),
    ({"min_interval": 0.0}, "need 0 < min_interval <= max_interval"),
    ({"min_interval": 6.0, "max_interval": 5.0}, "need 0 < min_interval <= max_interval"),
    ({"evict_replied": frozenset({IPPROTO_TCP})}, "replied tcp, sctp or dccp entries are never evicted"),
    ({"lower_timeouts": (("udp", 5), ("udp_stream", 5), ("tcp_established", 9))},
     "timeouts that cannot be lowered: tcp_established, udp_stream"),
]  # fmt: skip


@pytest.mark.parametrize("values", ACCEPTED)
def test_a_policy_at_the_edge_of_its_bounds_is_accepted(values: dict[str, object]) -> None:
    PressurePolicy(enabled=True, **values)  # type: ignore[arg-type]


@pytest.mark.parametrize(("values", "message"), REFUSED)
def test_a_policy_past_its_bounds_is_refused_with_the_reason(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as raised:
        PressurePolicy(enabled=True, **values)  # type: ignore[arg-type]
    assert str(raised.value) == message


def test_the_census_names_each_state_and_caps_its_sources() -> None:
    census = Census(source_limit=2)
    one, two, three = (ip_address(f"192.0.2.{i}").packed for i in (1, 2, 3))
    census.add(IPPROTO_UDP, IPS_SEEN_REPLY, one)  # replied, not assured
    census.add(IPPROTO_UDP, IPS_SEEN_REPLY, one)
    census.add(IPPROTO_UDP, IPS_SEEN_REPLY, two)
    census.add(IPPROTO_UDP, IPS_SEEN_REPLY, three)  # a third source: past the cap, not kept
    census.add(IPPROTO_UDP, IPS_SEEN_REPLY, two)  # a source already kept: still counted
    census.add(IPPROTO_UDP, IPS_SEEN_REPLY | IPS_ASSURED, one)
    census.add(IPPROTO_TCP, 0, one)
    assert census.examined == 7
    assert dict(census.classes) == {("replied", "udp"): 5, ("assured", "udp"): 1, ("UNREPLIED", "tcp"): 1}
    assert dict(census.sources["replied udp"]) == {one: 2, two: 2}
    assert census.describe() == ("5 replied udp entries from at least 2 sources (192.0.2.1, 192.0.2.2), "
                                 "1 assured udp entries from 1 source (192.0.2.1), "
                                 "1 UNREPLIED tcp entries from 1 source (192.0.2.1)")  # fmt: skip


def test_the_census_says_the_three_largest_classes_and_how_many_others() -> None:
    census = Census()
    addr = [ip_address(f"192.0.2.{i}").packed for i in range(10)]
    for i in (1, 2, 3, 4):
        census.add(IPPROTO_UDP, 0, addr[i])  # 4 UNREPLIED udp from 4 sources: too many to name
    for i in (1, 2, 3):
        census.add(IPPROTO_UDP, IPS_SEEN_REPLY, addr[i])  # 3 replied udp from 3 sources: named
    census.add(IPPROTO_UDP, IPS_SEEN_REPLY | IPS_ASSURED, addr[9])
    census.add(IPPROTO_UDP, IPS_SEEN_REPLY | IPS_ASSURED, addr[9])
    census.add(IPPROTO_TCP, 0, addr[5])  # the fourth class: one of the others
    assert census.describe() == ("4 UNREPLIED udp entries from 4 sources, "
                                 "3 replied udp entries from 3 sources (192.0.2.1, 192.0.2.2, 192.0.2.3), "
                                 "2 assured udp entries from 1 source (192.0.2.9), 1 others")  # fmt: skip
    assert Census().describe() == "no entries"
