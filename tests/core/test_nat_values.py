"""core.nat's values: interval sets, name sets, mark statements, NETMAP, and their texts.

Each expectation is worked out by hand from the kernel's rule the value
models (named in each test), not by calling the code under test.
"""

from __future__ import annotations

from ipaddress import ip_address, ip_network

import pytest

from topowatch.core.flow import NatKind
from topowatch.core.nat import (
    Chain,
    Hook,
    IntervalSet,
    MarkCopy,
    MarkSet,
    NameSet,
    NatRuleset,
    NatStatement,
    NatTarget,
    NetmapStatement,
    Rule,
    Verdict,
    VerdictKind,
)


@pytest.mark.parametrize(
    ("given", "merged"),
    [
        (((1, 5), (6, 9)), ((1, 9),)),  # adjacent: one interval
        (((1, 5), (5, 9)), ((1, 9),)),  # sharing an end
        (((1, 5), (3, 4)), ((1, 5),)),  # inside
        (((6, 9), (1, 5)), ((1, 9),)),  # unsorted
        (((1, 5), (7, 9)), ((1, 5), (7, 9))),  # a gap of one value (6) stays
        (((10, 10), (1, 2), (3, 3), (12, 20)), ((1, 3), (10, 10), (12, 20))),
    ],
)
def test_interval_sets_merge_what_touches(given: tuple[tuple[int, int], ...], merged: tuple[tuple[int, int], ...]) -> None:
    s = IntervalSet(given)
    assert s.intervals == merged
    assert s == IntervalSet(merged)


def test_one_interval_is_kept_and_anything_else_made_a_tuple_of_pairs() -> None:
    one = ((3, 3),)
    assert IntervalSet(one).intervals is one  # nothing to merge: not copied
    got = IntervalSet([[3, 4]]).intervals
    assert got == ((3, 4),) and type(got) is tuple and type(got[0]) is tuple


def test_nat_flags_are_sorted_once_each() -> None:
    given = ("random", "persistent", "random")
    assert NatStatement(NatKind.MASQUERADE, "masquerade", flags=given).flags == ("persistent", "random")
    assert NatStatement(NatKind.MASQUERADE, "masquerade", flags=[]).flags == ()


def test_a_reversed_interval_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"^IntervalSet: bad interval 9-5$"):
        IntervalSet(((9, 5),))


@pytest.mark.parametrize(
    ("given", "lo", "hi", "covered"),
    [
        (((1, 5), (5, 9)), 1, 9, True),  # the two halves cover all nine values once
        (((1, 5), (6, 9)), 2, 8, True),
        (((1, 5), (7, 9)), 1, 9, None),  # 6 is missing
        (((1, 5), (7, 9)), 6, 6, False),
        (((10, 20),), 21, 30, False),  # touching is not overlapping
        (((10, 20),), 20, 30, None),
        (((10, 20), (40, 50)), 15, 45, None),
        (((0, 65535),), 0, 65535, True),
    ],
)
def test_covers(given: tuple[tuple[int, int], ...], lo: int, hi: int, covered: bool | None) -> None:
    assert IntervalSet(given).covers(lo, hi) is covered


@pytest.mark.parametrize(
    ("given", "version", "text"),
    [
        (((53, 53),), None, "53"),
        (((1024, 2047),), None, "1024-2047"),
        (((53, 53), (1024, 2047)), None, "{ 53, 1024-2047 }"),
        (((int(ip_address("192.0.2.1")), int(ip_address("192.0.2.20"))),), 4, "192.0.2.1-192.0.2.20"),
        (((int(ip_address("192.0.2.1")),) * 2, (int(ip_address("10.0.0.0")), int(ip_address("10.255.255.255")))),
         4, "{ 10.0.0.0-10.255.255.255, 192.0.2.1 }"),
        (((int(ip_address("2001:db8::1")),) * 2,), 6, "2001:db8::1"),
    ],
)
def test_interval_set_text(given: tuple[tuple[int, int], ...], version: int | None, text: str) -> None:
    assert IntervalSet(given, version).describe() == text


@pytest.mark.parametrize(
    ("names", "name", "index", "contained"),
    [
        (NameSet(frozenset({"eth0"})), "eth0", None, True),
        (NameSet(prefixes=frozenset({"ppp"})), "ppp7", None, True),
        (NameSet(indexes=frozenset({4})), "wg0", 4, True),  # by index (an interface renamed since)
        (NameSet(indexes=frozenset({4})), "wg0", 5, False),
        (NameSet(indexes=frozenset({4})), "wg0", None, False),  # no index known
        (NameSet(frozenset({"eth0"})), "eth1", 4, False),
    ],
)
def test_name_sets(names: NameSet, name: str, index: int | None, contained: bool) -> None:
    assert names.contains(name, index) is contained


@pytest.mark.parametrize(
    ("value", "mask", "old", "new"),
    [
        # MARK --set-xmark value/mask: new = (old & ~mask) ^ value
        (0x03, 0x0F, 0xAB, 0xA3),
        (0x10, 0x10, 0xFF, 0xFF),  # the bit cleared, then set again by xor
        (0x10, 0x00, 0x10, 0x00),  # --xor-mark 0x10: toggles
        (0x5, 0xFFFFFFFF, 0xABCD, 0x5),  # --set-mark 5
        (0x0, 0xF0, 0xFF, 0x0F),  # --and-mark 0x0f
        (0xF0, 0xF0, 0x0F, 0xFF),  # --or-mark 0xf0
        (0x5, 0xFFFFFFFF, None, 0x5),  # overwritten whole: known whatever it was
        (0x5, 0x0F, None, None),  # partly kept: unknown
    ],
)
def test_mark_set(value: int, mask: int, old: int | None, new: int | None) -> None:
    assert MarkSet(value, mask, "MARK").apply(old) == new


@pytest.mark.parametrize(
    ("src_mask", "dst_mask", "dst", "src", "new"),
    [
        # dst = (dst & ~dst_mask) ^ (src & src_mask)
        (0xFFFFFFFF, 0xFFFFFFFF, 0x12, 0x34, 0x34),  # a plain copy
        (0xFFFFFFFF, 0xFFFFFFFF, None, 0x34, 0x34),  # the old destination is overwritten whole
        (0x0F, 0xFFFFFFFF, 0x12, 0x34, 0x04),
        (0x01, 0xFFFFFFFF, 0x12, 0x33, 0x01),
        (0x00, 0xFFFFFFFF, 0x12, None, 0x00),  # nothing copied: the unknown source does not matter
        (0x00, 0x0F, 0x12, None, 0x10),
        (0xFF, 0x0F, 0x12, 0x34, 0x10 ^ 0x34),
        (0xFF, 0x0F, None, 0x34, None),  # part of an unknown destination kept
        (0xFF, 0xFFFFFFFF, 0x12, None, None),  # an unknown source copied
    ],
)
def test_mark_copy(src_mask: int, dst_mask: int, dst: int | None, src: int | None, new: int | None) -> None:
    assert MarkCopy(True, "CONNMARK", src_mask, dst_mask).apply(dst, src) == new


@pytest.mark.parametrize(
    ("prefix", "addr", "mapped"),
    [
        ("10.9.0.0/16", "192.168.7.8", "10.9.7.8"),
        ("10.9.8.0/24", "10.1.2.3", "10.9.8.3"),
        ("2001:db8:1::/48", "fd00:aaaa:bbbb:cccc::1", "2001:db8:1:cccc::1"),
    ],
)
def test_netmap_keeps_the_host_bits(prefix: str, addr: str, mapped: str) -> None:
    result = NetmapStatement(ip_network(prefix), "NETMAP").map(ip_address(addr))
    assert result == ip_address(mapped)
    assert result.version == ip_address(mapped).version


def test_constructors_refuse_bad_values_by_name() -> None:
    with pytest.raises(ValueError, match=r"^NatTarget: bad address range 192\.0\.2\.9-192\.0\.2\.1$"):
        NatTarget((ip_address("192.0.2.9"), ip_address("192.0.2.1")))
    with pytest.raises(ValueError, match=r"^NatTarget: bad address range 192\.0\.2\.1-2001:db8::1$"):
        NatTarget((ip_address("192.0.2.1"), ip_address("2001:db8::1")))
    assert NatTarget((ip_address("192.0.2.1"), ip_address("192.0.2.1"))).ports is None
    with pytest.raises(ValueError, match=r"^NatStatement\.kind cannot be NONE$"):
        NatStatement(NatKind.NONE, "none")
    with pytest.raises(ValueError, match=r"^Verdict jump: a target is needed exactly for jump and goto$"):
        Verdict(VerdictKind.JUMP)
    with pytest.raises(ValueError, match=r"^Verdict accept: a target is needed exactly for jump and goto$"):
        Verdict(VerdictKind.ACCEPT, "x")


@pytest.mark.parametrize(
    ("verdict", "text"),
    [(Verdict(VerdictKind.ACCEPT), "accept"), (Verdict(VerdictKind.JUMP, "vpn"), "jump vpn"),
     (Verdict(VerdictKind.GOTO, "x", "goto x # by hand"), "goto x # by hand")],
)  # fmt: skip
def test_verdict_text(verdict: Verdict, text: str) -> None:
    assert verdict.text == text


def test_ruleset_text() -> None:
    post = Chain("inet", "nat", "post", (Rule(7, (NatStatement(NatKind.MASQUERADE, "masquerade"),),
                                              'oifname "up1" masquerade'),), Hook.POSTROUTING, 100, "nat", "accept")
    vpn = Chain("inet", "nat", "vpn", (Rule(9, (Verdict(VerdictKind.RETURN),)),))
    rs = NatRuleset((post, vpn))
    assert rs.describe() == (
        "table inet nat chain post { type nat hook postrouting priority 100; policy accept; }\n"
        '  oifname "up1" masquerade # handle 7\n'
        "table inet nat chain vpn\n"
        "  return # handle 9"
    )
    assert NatRuleset.describe_rule(post, post.rules[0]) == 'table inet nat chain post handle 7: oifname "up1" masquerade'


def test_constructors_refuse_bad_chains_and_matches_by_name() -> None:
    from topowatch.core.nat import Key, Match, Op, Selector

    with pytest.raises(ValueError, match=r"^Chain\.family must be one of \['inet', 'ip', 'ip6'\], got 'ipx'$"):
        Chain("ipx", "nat", "post")
    with pytest.raises(ValueError, match=r"^base chain post needs a priority$"):
        Chain("ip", "nat", "post", hook=Hook.POSTROUTING)
    with pytest.raises(ValueError, match=r"^Chain\.policy must be accept or drop, got 'reject'$"):
        Chain("ip", "nat", "post", policy="reject")
    with pytest.raises(ValueError, match=r"""^Match 'oifname 5': values do not fit oifname$"""):
        Match(Selector(Key.OIFNAME, "oifname"), Op.EQ, IntervalSet(((5, 5),)), "oifname 5")
    with pytest.raises(ValueError, match=r"""^Match 'udp dport "eth0"': values do not fit dport$"""):
        Match(Selector(Key.DPORT, "udp dport"), Op.EQ, NameSet(frozenset({"eth0"})), 'udp dport "eth0"')
    with pytest.raises(ValueError, match=r"^NatStatement 'snat to :1-65536': bad port range \(1, 65536\)$"):
        NatStatement(NatKind.SNAT, "snat to :1-65536", addr=(ip_address("192.0.2.1"),) * 2, ports=(1, 65536))
    assert NatStatement(NatKind.MASQUERADE, "masquerade to :0-65535", ports=(0, 65535)).ports == (0, 65535)
    assert NatStatement(NatKind.MASQUERADE, "masquerade to :65535", ports=(65535, 65535)).ports == (65535, 65535)


def test_chains_and_rules_hold_tuples_whatever_they_are_given() -> None:
    """A list given for rules or expressions is kept as a tuple: the values stay hashable and equal."""
    stmt = NatStatement(NatKind.MASQUERADE, "masquerade")
    rule = Rule(3, [stmt])  # type: ignore[arg-type]
    assert rule.exprs == (stmt,) and rule.text == "masquerade"
    chain = Chain("ip", "nat", "post", [rule], Hook.POSTROUTING, 100, "nat", "accept")  # type: ignore[arg-type]
    assert chain.rules == (rule,)
    assert chain == Chain("ip", "nat", "post", (Rule(3, (stmt,)),), Hook.POSTROUTING, 100, "nat", "accept")
    assert hash(chain) == hash(Chain("ip", "nat", "post", (Rule(3, (stmt,)),), Hook.POSTROUTING, 100, "nat",
                                     "accept"))  # fmt: skip


def _base(name: str, priority: int, kind: str = "nat", family: str = "ip") -> Chain:
    return Chain(family, "t", name, (), Hook.POSTROUTING, priority, kind, "accept")


@pytest.mark.parametrize(
    ("chains", "nat", "marks"),
    [
        # lower priority first; equal priorities in dump order; 0 is a priority like any other
        ([_base("a", 1), _base("b", 0), _base("c", -100)], ["c", "b", "a"], []),
        ([_base("a", 0), _base("b", -1), _base("c", 0)], ["b", "a", "c"], []),
        ([_base("a", 1, "filter"), _base("b", 0, "filter"), _base("n", 0)], ["n"], ["b", "a"]),
        ([_base("a", 10, "route"), _base("b", 10, "filter"), _base("c", -150, "filter")], [], ["c", "a", "b"]),
        ([_base("a", 0, "filter"), _base("b", 0, "filter"), _base("c", 5, "filter", "ip6")], [], ["a", "b"]),
    ],
)
def test_base_and_mark_chains_run_by_priority(chains: list[Chain], nat: list[str], marks: list[str]) -> None:
    rs = NatRuleset(tuple(chains))
    assert [c.name for c in rs.base_chains(Hook.POSTROUTING, 2)] == nat
    assert [c.name for c in rs.mark_chains(Hook.POSTROUTING, 2)] == marks


def test_nat_statements_and_rulesets_refuse_bad_values_by_name() -> None:
    two, one = ip_address("192.0.2.2"), ip_address("192.0.2.1")
    with pytest.raises(ValueError, match=r"^NatStatement 'snat to x': bad address range 192\.0\.2\.2-192\.0\.2\.1$"):
        NatStatement(NatKind.SNAT, "snat to x", addr=(two, one))
    with pytest.raises(ValueError, match=r"^NatStatement masquerade takes no address$"):
        NatStatement(NatKind.MASQUERADE, "masquerade", addr=(one, one))
    with pytest.raises(ValueError, match=r"^NatStatement 'snat': bad port range \(2000, 1000\)$"):
        NatStatement(NatKind.SNAT, "snat", addr=(one, one), ports=(2000, 1000))
    with pytest.raises(ValueError, match=r"^NatStatement 'snat': bad port range \(-1, 5\)$"):
        NatStatement(NatKind.SNAT, "snat", addr=(one, one), ports=(-1, 5))
    assert NatStatement(NatKind.SNAT, "snat", addr=(one, one), ports=(0, 0)).ports == (0, 0)
    assert NatStatement(NatKind.SNAT, "snat", addr=(one, one), ports=(0, 7)).ports == (0, 7)
    post = Chain("ip", "nat", "post", (), Hook.POSTROUTING, 100, "nat", "accept")
    with pytest.raises(ValueError, match=r"^NatRuleset: duplicate chain$"):
        NatRuleset((post, Chain("ip", "nat", "post")))
    rs = NatRuleset([post])  # type: ignore[arg-type]
    assert rs.chains == (post,) and rs == NatRuleset((post,)) and hash(rs) == hash(NatRuleset((post,)))
