"""Topology values and the words ``diff`` uses for a change."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address

import pytest

from topowatch.core.model import (
    AF_INET,
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


# -- every kind of change at once, two of each (written out by hand) ------------------------------
#
# ``diff`` is the admin's record of why a reaction ran: each line below is what `ip` would say.
# Two changes of each kind make the order matter (routes and rules by their text, policies and
# SAs by their description, netconf by name) and a new interface's netconf must not end the list.


def _everything() -> tuple[Topology, Topology]:
    from topowatch.core.model import Netconf, PolicyRule, RuleAction
    from topowatch.core.xfrm import Direction, Mode, XfrmPolicy, XfrmSelector, XfrmState

    def pol(src: str) -> XfrmPolicy:
        return XfrmPolicy(XfrmSelector(AF_INET, IPv4Network(src), IPv4Network("192.0.2.0/24")),
                          direction=Direction.OUT)

    def sa(spi: int) -> XfrmState:
        return XfrmState(AF_INET, IPv4Address("198.51.100.1"), IPv4Address("203.0.113.2"), 50, spi,
                         reqid=1, mode=Mode.TUNNEL)

    def route(dst: str, oif: int, **kw: object) -> Route:
        return Route(IPv4Network(dst), nexthops=(Nexthop(oif, kw.pop("via", None)),), **kw)  # type: ignore[arg-type]

    t0 = Topology(
        links=(Link(1, "lo"), Link(2, "wan"), Link(3, "lan", up=False), Link(4, "dmz")),
        addresses=(Address(2, IPv4Address("198.51.100.2"), 24), Address(9, IPv4Address("192.0.2.9"), 24)),
        routes=(route("10.2.0.0/16", 3), route("10.1.0.0/16", 2, via=IPv4Address("198.51.100.1"))),
        rules=(PolicyRule(AF_INET, 200, fwmark=1, table=200), PolicyRule(AF_INET, 100, src=IPv4Network("10.0.1.0/24"), table=100)),
        xfrm_policies=(pol("10.0.4.0/24"), pol("10.0.3.0/24")),
        xfrm_states=(sa(0x400), sa(0x300)),
        netconf=(Netconf("all"), Netconf("wan"), Netconf("lan")),
    )
    t1 = Topology(
        links=(Link(1, "lo"), Link(2, "wan", up=False), Link(3, "lan"), Link(4, "dmz0")),
        addresses=(Address(2, IPv4Address("198.51.100.3"), 24),),
        routes=(route("10.4.0.0/16", 2, metric=5), route("10.3.0.0/16", 3, table=100)),
        rules=(PolicyRule(AF_INET, 400, RuleAction.UNREACHABLE, oifname="wan"),
               PolicyRule(AF_INET, 300, iifname="lan", table=254)),
        xfrm_policies=(pol("10.0.2.0/24"), pol("10.0.1.0/24")),
        xfrm_states=(sa(0x200), sa(0x100)),
        netconf=(Netconf("all"), Netconf("wan", rp_filter=2), Netconf("tun0", rp_filter=1),
                 Netconf("lan", src_valid_mark=True)),
    )
    return t0, t1


def test_diff_says_every_kind_of_change_in_order() -> None:
    t0, t1 = _everything()
    sel = "dst 192.0.2.0/24 dir out priority 0 index 0"
    sa = "203.0.113.2->198.51.100.1 reqid 1 mode tunnel"
    assert diff(t0, t1).lines == (
        "link wan down",
        "link lan up",
        "link dmz renamed dmz0",
        "address 198.51.100.2/24 dev wan removed",
        "address 192.0.2.9/24 dev if9 removed",
        "address 198.51.100.3/24 dev wan added",
        "route 10.1.0.0/16 via 198.51.100.1 dev wan removed",
        "route 10.2.0.0/16 dev lan removed",
        "route 10.3.0.0/16 dev lan table 100 added",
        "route 10.4.0.0/16 dev wan metric 5 added",
        "rule 100: from 10.0.1.0/24 lookup 100 removed",
        "rule 200: from all fwmark 0x1 lookup 200 removed",
        "rule 300: from all iif lan lookup main added",
        "rule 400: from all oif wan unreachable added",
        f"xfrm policy src 10.0.3.0/24 {sel} removed",
        f"xfrm policy src 10.0.4.0/24 {sel} removed",
        f"xfrm policy src 10.0.1.0/24 {sel} added",
        f"xfrm policy src 10.0.2.0/24 {sel} added",
        "src_valid_mark of lan 0 -> 1",
        "rp_filter of wan 0 -> 2",
        f"xfrm SA esp spi 0x300 {sa} removed",
        f"xfrm SA esp spi 0x400 {sa} removed",
        f"xfrm SA esp spi 0x100 {sa} added",
        f"xfrm SA esp spi 0x200 {sa} added",
    )


def test_summary_counts_the_lines_past_four() -> None:
    from topowatch.core.model import TopologyChange

    assert TopologyChange(()).summary() == "no topology change"
    assert TopologyChange(("a", "b", "c", "d")).summary() == "a; b; c; d"
    assert TopologyChange(("a", "b", "c", "d", "e")).summary() == "a; b; c; d; and 1 more"


def test_route_and_rule_words() -> None:
    from topowatch.core.model import PolicyRule, RuleAction, table_name

    two = Route(IPv4Network("10.1.0.0/16"), nexthops=(Nexthop(2, IPv4Address("198.51.100.1")), Nexthop(3)))
    assert two.describe({2: "wan"}) == "10.1.0.0/16 nexthop via 198.51.100.1 dev wan nexthop dev if3"
    assert table_name(253) == "default" and table_name(255) == "local" and table_name(7) == "7"
    rule = PolicyRule(AF_INET, 100, RuleAction.GOTO, goto=200, invert=True, fwmark=1, fwmask=0xFF,
                      iifname="lan", oifname="wan", suppress_prefixlen=0)
    assert rule.describe() == "100: not from all fwmark 0x1/0xff iif lan oif wan goto 200 suppress_prefixlength 0"
    assert PolicyRule(AF_INET, 5, fwmark=1, fwmask=0xFFFFFFFF, table=9).describe() == "5: from all fwmark 0x1 lookup 9"


def test_default_rules_are_a_fresh_namespaces() -> None:
    """`ip -4 rule` in a fresh namespace: 0 local, 32766 main, 32767 default; `ip -6 rule`: no
    default-table rule (fib4_rules_init adds three, fib6_rules_net_init two)."""
    from topowatch.core.model import AF_INET6, PolicyRule, default_rules

    def rows(family: int) -> list[tuple[int, int, int]]:
        return [(r.family, r.priority, r.table) for r in default_rules(family)]

    assert rows(AF_INET) == [(AF_INET, 0, 255), (AF_INET, 32766, 254), (AF_INET, 32767, 253)]
    assert rows(AF_INET6) == [(AF_INET6, 0, 255), (AF_INET6, 32766, 254)]
    assert all(r == PolicyRule(r.family, r.priority, table=r.table) for r in default_rules(AF_INET))


def test_reverse_path_defaults() -> None:
    """``IN_DEV_RPFILTER`` is the larger of ``all`` and the device; a device the snapshot does not
    list was created with ``default``'s values; a setting nobody lists is 0 (off)."""
    from topowatch.core.model import Netconf

    def rp(*conf: Netconf, dev: str = "eth9") -> tuple[int, bool]:
        return Topology(netconf=conf, netconf_known=True).reverse_path(dev)

    assert rp() == (0, False)
    assert rp(Netconf("default", rp_filter=2, src_valid_mark=True)) == (2, True)
    assert rp(Netconf("all", rp_filter=1), Netconf("default", rp_filter=2)) == (2, False)
    assert rp(Netconf("all", src_valid_mark=True), Netconf("eth9", rp_filter=2), Netconf("default", rp_filter=1)) == (2, True)
    assert Topology().reverse_path("eth9") == (1, False)  # not read: strict


def test_values_take_lists_and_check_their_ranges() -> None:
    from topowatch.core.model import Netconf, PolicyRule

    listed = Route(IPv4Network("10.0.0.0/8"), nexthops=[Nexthop(2)])  # type: ignore[arg-type]
    assert listed.nexthops == (Nexthop(2),) and hash(listed) == hash(Route(IPv4Network("10.0.0.0/8"), nexthops=(Nexthop(2),)))
    topo = Topology(links=[Link(1, "lo")])  # type: ignore[arg-type]
    assert topo.links == (Link(1, "lo"),) and hash(topo) == hash(Topology(links=(Link(1, "lo"),)))
    assert Address(2, IPv4Address("10.0.0.1"), 0).prefixlen == 0
    assert Address(2, IPv6Address("2001:db8::1"), 128).prefixlen == 128
    with pytest.raises(ValueError, match="prefixlen 129"):
        Address(2, IPv6Address("2001:db8::1"), 129)
    with pytest.raises(ValueError, match=r"^Link\.name must not be empty$"):
        Link(1, "")
    with pytest.raises(ValueError, match=r"^Netconf\.name must not be empty$"):
        Netconf("")
    with pytest.raises(ValueError, match="must be AF_INET or AF_INET6, got 7"):
        PolicyRule(7, 1)


def test_route_list_reads_and_compares_as_its_tuple() -> None:
    from topowatch.core.model import RouteList

    a, b, c = (Route(IPv4Network(f"10.{i}.0.0/16")) for i in range(3))
    chunks = ((a,), (), (b, c))
    one, same = RouteList(chunks), RouteList(chunks)
    assert one == same and one == (a, b, c)
    assert (one != same, one != (a, b, c)) == (False, False)  # __ne__ is __eq__'s negation
    assert RouteList(((a,), (b,), (c,))) == one and RouteList(((a, c), (b,))) != one
    assert [one[i] for i in range(-3, 3)] == [a, b, c, a, b, c]
    padded = RouteList(((), (), (a,), (), (), (b,), (c,), (), ()))
    assert [padded[i] for i in range(3)] == [a, b, c] and padded[1:] == (b, c)
    assert repr(padded) == repr((a, b, c))
    with pytest.raises(IndexError, match=r"^RouteList index out of range$"):
        one[3]


def test_a_route_list_is_unequal_to_what_is_not_a_sequence_of_routes() -> None:
    """``!=`` with another type falls back to identity (``NotImplemented`` both ways): True."""
    from topowatch.core.model import RouteList

    routes = RouteList(((Route(IPv4Network("10.0.0.0/16")),),))
    assert (routes != 5) is True
    assert (routes == 5) is False
