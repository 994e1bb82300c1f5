# SPDX-License-Identifier: GPL-2.0-or-later
"""core.xfrm's values: what their constructors refuse (by name) and how they normalise.

A selector's prefix is compared on its prefix bits only (``addr_match``
masks both sides by ``prefixlen``): a prefix written with host bits is that
network. Ports and masks are 16-bit numbers (``__be16`` in ``struct
xfrm_selector``); the family is 0 (an SA's unset selector), AF_INET or
AF_INET6. Each value is built inside its test.
"""

from __future__ import annotations

from ipaddress import ip_address, ip_network

import pytest

from topowatch.core.flow import IPPROTO_UDP
from topowatch.core.model import AF_INET
from topowatch.core.xfrm import (
    Direction,
    Mode,
    XfrmFlow,
    XfrmPolicy,
    XfrmSelector,
    XfrmTemplate,
    selector_match,
)

A = ip_address
N = ip_network


def test_a_prefix_with_host_bits_is_its_network() -> None:
    s = XfrmSelector(AF_INET, "10.0.1.5/24", "192.0.2.77/25")  # type: ignore[arg-type]
    assert s.src == N("10.0.1.0/24") and s.dst == N("192.0.2.0/25")
    assert selector_match(s, XfrmFlow(AF_INET, IPPROTO_UDP, A("10.0.1.200"), A("192.0.2.1"))) is True
    assert selector_match(s, XfrmFlow(AF_INET, IPPROTO_UDP, A("10.0.1.200"), A("192.0.2.200"))) is False


@pytest.mark.parametrize("name", ["sport", "sport_mask", "dport", "dport_mask"])
@pytest.mark.parametrize("value", [-1, 0x10000])
def test_ports_and_masks_are_16_bit(name: str, value: int) -> None:
    with pytest.raises(ValueError) as got:
        XfrmSelector(AF_INET, **{name: value})  # type: ignore[arg-type]
    assert str(got.value) == f"XfrmSelector.{name} out of range: {value}"
    assert getattr(XfrmSelector(AF_INET, **{name: 0xFFFF}), name) == 0xFFFF  # type: ignore[arg-type]


def test_refusals_by_name() -> None:
    with pytest.raises(ValueError) as got:
        XfrmSelector(5)
    assert str(got.value) == "XfrmSelector.family must be 0, AF_INET or AF_INET6, got 5"
    with pytest.raises(ValueError) as got:
        XfrmPolicy(XfrmSelector(0), Direction.OUT)
    assert str(got.value) == "XfrmPolicy.selector needs a family"


def test_a_policy_holds_its_templates_as_a_tuple() -> None:
    t = XfrmTemplate(AF_INET, A("198.51.100.1"), A("203.0.113.2"), reqid=1, mode=Mode.TUNNEL)
    given = [t]
    p = XfrmPolicy(XfrmSelector(AF_INET), Direction.OUT, templates=given)  # type: ignore[arg-type]
    assert type(p.templates) is tuple and p.templates == (t,)
    given.append(t)  # the caller's list is not the policy's
    assert p.templates == (t,)
    assert hash(p) == hash(XfrmPolicy(XfrmSelector(AF_INET), Direction.OUT, templates=(t,)))
    kept = (t,)
    assert XfrmPolicy(XfrmSelector(AF_INET), Direction.OUT, templates=kept).templates is kept
