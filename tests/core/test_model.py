"""Topology values and the words ``diff`` uses for a change."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address

import pytest

from topowatch.core.model import (
    IFA_F_TENTATIVE,
    Address,
    Link,
    Nexthop,
    Route,
    Topology,
    diff,
)

LINKS = (Link(1, "lo"), Link(2, "up1"), Link(3, "up2"))


def test_diff_route_move() -> None:
    t0 = Topology(LINKS, routes=(Route(IPv4Network("0.0.0.0/0"), nexthops=(Nexthop(2, IPv4Address("198.51.100.1")),)),))
    t1 = Topology(LINKS, routes=(Route(IPv4Network("0.0.0.0/0"), nexthops=(Nexthop(3, IPv4Address("203.0.113.1")),)),))
    assert diff(t0, t1).lines == (
        "route default via 198.51.100.1 dev up1 removed",
        "route default via 203.0.113.1 dev up2 added",
    )
    assert not diff(t0, t0)


def test_diff_address_flags_are_one_line() -> None:
    a = Address(2, IPv6Address("fe80::1"), 64, flags=IFA_F_TENTATIVE)
    b = Address(2, IPv6Address("fe80::1"), 64, flags=0)
    change = diff(Topology(LINKS, addresses=(a,)), Topology(LINKS, addresses=(b,)))
    assert change.lines == ("address fe80::1/64 dev up1 flags 0x40 -> 0x0",)


def test_diff_link_state_and_summary() -> None:
    t1 = Topology((Link(1, "lo"), Link(2, "up1", up=False), Link(4, "ppp0")))
    change = diff(Topology(LINKS), t1)
    assert change.lines == ("link up2 removed", "link ppp0 added", "link up1 down")
    assert change.summary(limit=2) == "link up2 removed; link ppp0 added; and 1 more"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"index": 0, "name": "x"}, "index"),
        ({"index": 1, "name": ""}, "name"),
    ],
)
def test_link_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Link(**kwargs)  # type: ignore[arg-type]


def test_address_prefixlen_validated() -> None:
    with pytest.raises(ValueError, match="prefixlen"):
        Address(2, IPv4Address("10.0.0.1"), 33)
