# SPDX-License-Identifier: GPL-2.0-or-later
"""core.classify: the questions harvested from xfrm selectors' port masks, and the label memory.

Issue 16's mutation run found no test reaching ``_masked_interval`` (an xfrm selector's port
under a mask) nor ``_forget_labels`` (the label numbers dropped when they grow past their limit).
Expectations are the kernel's: ``xfrm_selector_match`` reads a port as
``!((port ^ sel->sport) & sel->sport_mask)``, so a prefix mask selects one range of ports, and
any other mask a set of ports no interval holds (the classes then say they are not exact).
"""

from __future__ import annotations

from ipaddress import ip_address, ip_network

import pytest

from topowatch.core import classify
from topowatch.core.classify import Classifier, _masked_interval
from topowatch.core.model import AF_INET, Address, Link, Nexthop, Route, Topology
from topowatch.core.xfrm import Direction, XfrmPolicy, XfrmSelector

LINKS = (Link(1, "lo"), Link(2, "lan"), Link(3, "up1"))
ADDRESSES = (Address(2, ip_address("10.0.0.1"), 8), Address(3, ip_address("198.51.100.2"), 24))
ROUTES = (Route(ip_network("0.0.0.0/0"), nexthops=(Nexthop(3, ip_address("198.51.100.1")),)),)


def kernel_matches(port: int, sel_port: int, mask: int) -> bool:
    return not ((port ^ sel_port) & mask)


def with_selector(**ports: int) -> Topology:
    selector = XfrmSelector(AF_INET, ip_network("10.0.0.0/8"), ip_network("192.0.2.0/24"), proto=17, **ports)
    return Topology(LINKS, ADDRESSES, ROUTES, xfrm_policies=(XfrmPolicy(selector, Direction.OUT),), xfrm_known=True)


@pytest.mark.parametrize(("value", "mask", "bits"), [
    (0x1234, 0xFF00, 16), (0x1234, 0xFFFF, 16), (0x1234, 0xFFF0, 16), (0x1234, 0x8000, 16), (0x1234, 0, 16),
    (0xFFFF, 0xFFFE, 16), (5, 0xFF, 8), (0xC0A80201, 0xFFFFFF00, 32),
])  # fmt: skip
def test_a_prefix_mask_selects_one_interval(value: int, mask: int, bits: int) -> None:
    selected = [v for v in range(1 << min(bits, 16)) if kernel_matches(v, value, mask)] if bits <= 16 else None
    span = _masked_interval(value, mask, bits)
    assert span is not None
    if selected is not None:
        assert span == (selected[0], selected[-1])
        assert len(selected) == selected[-1] - selected[0] + 1
    else:  # 192.168.2.1 under /24
        assert span == (0xC0A80200, 0xC0A802FF)


@pytest.mark.parametrize(("value", "mask"), [(0x1234, 0x0F0F), (0x1234, 0x00FF), (0x1234, 0xFF01), (1, 1)])
def test_any_other_mask_selects_no_interval(value: int, mask: int) -> None:
    selected = [v for v in range(1 << 16) if kernel_matches(v, value, mask)]
    assert len(selected) != selected[-1] - selected[0] + 1  # the kernel's set has holes
    assert _masked_interval(value, mask, 16) is None


@pytest.mark.parametrize(("field", "value", "mask"), [("sport", 0x1234, 0xFF00), ("dport", 0x1234, 0xFF00),
                                                       ("dport", 53, 0xFFFF), ("sport", 0x8001, 0x8000)])
def test_the_ports_a_selector_masks_are_cut_where_the_kernel_match_changes(field: str, value: int, mask: int) -> None:
    c = Classifier.build([with_selector(**{field: value, f"{field}_mask": mask})], [], reuse=False)
    assert c.exact, c.reason
    for port in range(1, 1 << 16):
        if kernel_matches(port - 1, value, mask) != kernel_matches(port, value, mask):
            assert c.ports.lookup(port - 1) != c.ports.lookup(port), (field, port)


@pytest.mark.parametrize(("field", "mask"), [("sport", 0x0F0F), ("dport", 0x00FF)])
def test_a_selector_port_under_another_mask_makes_the_classes_inexact(field: str, mask: int) -> None:
    c = Classifier.build([with_selector(**{field: 0x1234, f"{field}_mask": mask})], [], reuse=False)
    assert not c.exact
    assert c.reason == f"xfrm selector {field} 4660/{mask:#x} is not a range"


def test_a_selector_without_port_masks_stays_exact() -> None:
    c = Classifier.build([with_selector(sport=0x1234, dport=0x0F0F)], [], reuse=False)
    assert c.exact and c.reason == ""


def test_label_numbers_are_forgotten_past_their_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past ``_LABEL_IDS_LIMIT`` labels, a build forgets every label, route label and memo; a
    classifier numbered before can no longer be carried over (its numbers meant other labels)."""
    topology = Topology(LINKS, ADDRESSES, ROUTES)
    first = Classifier.build([topology], [])
    generations = [classify._GENERATION[0]]
    monkeypatch.setattr(classify, "_LABEL_IDS_LIMIT", 0)  # every build below forgets first
    second = Classifier.build([Topology(LINKS, ADDRESSES, ROUTES)], [], reuse=False)
    generations.append(classify._GENERATION[0])
    # What the build just numbered and remembered, and nothing from before.
    assert len(classify._LABEL_IDS) == 1  # the default route's label
    assert set(classify._LABELS) == {"context", id(ROUTES[0])}
    assert all(value is not topology for value, _ in classify._MEMO.values())
    assert first.updated([topology], []) is None
    Classifier.build([Topology(LINKS, ADDRESSES, ROUTES)], [], reuse=False)
    generations.append(classify._GENERATION[0])
    assert len(set(generations)) == 3  # each forgetting is a generation of its own
    assert second.updated([topology], []) is None
