"""core.nat's readers' constructors (``make_*``) build what the classes build, or fail as they do.

Each case is built twice, by the class and by its reader's constructor; the
two must be equal, of the same type, with every slot the same (``repr``
shows them all), and hash alike; where the class refuses the fields, the
constructor refuses them with the same error.
"""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from topowatch.core.flow import NatKind
from topowatch.core.model import AF_INET, AF_INET6
from topowatch.core.nat import (
    IntervalSet,
    Key,
    Match,
    NameSet,
    NatStatement,
    Op,
    Passive,
    Rule,
    Selector,
    Verdict,
    VerdictKind,
    make_interval,
    make_match,
    make_names,
    make_nat,
    make_rule,
    make_selector,
)


def same(by_class: Callable[[], Any], by_reader: Callable[[], Any]) -> None:
    try:
        want = by_class()
    except (ValueError, AttributeError, TypeError) as exc:
        with pytest.raises(type(exc)) as got:
            by_reader()
        assert str(got.value) == str(exc)
        return
    made = by_reader()
    assert type(made) is type(want)
    assert made == want
    assert repr(made) == repr(want)
    assert hash(made) == hash(want)


@given(st.integers(-5, 70000), st.integers(-5, 70000), st.sampled_from([None, 4, 6]))
def test_one_interval(lo: int, hi: int, version: int | None) -> None:
    same(lambda: IntervalSet(((lo, hi),), version), lambda: make_interval(lo, hi, version))


def test_a_reversed_interval_fails_as_the_class_says() -> None:
    with pytest.raises(ValueError, match="bad interval 5-4"):
        make_interval(5, 4)


NAMES = st.frozensets(st.sampled_from(["eth0", "wan", "up1", ""]))


@given(NAMES, NAMES, st.frozensets(st.integers(0, 5)))
def test_name_sets(exact: frozenset[str], prefixes: frozenset[str], indexes: frozenset[int]) -> None:
    same(lambda: NameSet(exact, prefixes, indexes), lambda: make_names(exact, prefixes, indexes))
    same(lambda: NameSet(exact), lambda: make_names(exact))
    same(NameSet, make_names)


@given(st.sampled_from(list(Key)), st.sampled_from([None, AF_INET, AF_INET6]), st.sampled_from([None, 6, 17]))
def test_selectors(key: Key, family: int | None, proto: int | None) -> None:
    same(lambda: Selector(key, "text", family, proto), lambda: make_selector(key, "text", family, proto))
    same(lambda: Selector(key, "text"), lambda: make_selector(key, "text"))


VALUES = [IntervalSet(((1, 2),)), NameSet(frozenset({"eth0"})), IntervalSet(((0, 5), (9, 9)), 4)]


@given(st.sampled_from(list(Key)), st.sampled_from(list(Op)), st.sampled_from(VALUES))
def test_matches_and_their_check_of_values_against_the_key(key: Key, op: Op, values: IntervalSet | NameSet) -> None:
    sel = Selector(key, key.value)
    same(lambda: Match(sel, op, values, "t"), lambda: make_match(sel, op, values, "t"))


def test_a_match_whose_values_do_not_fit_fails_as_the_class_says() -> None:
    with pytest.raises(ValueError, match="values do not fit iifname"):
        make_match(Selector(Key.IIFNAME, "iifname"), Op.EQ, IntervalSet(((1, 1),)), "iifname 1")


A4, B4 = IPv4Address("10.0.0.1"), IPv4Address("10.0.0.9")
A6 = IPv6Address("2001:db8::1")
ADDRS = [None, (A4, A4), (A4, B4), (B4, A4), (A4, A6), (A6, A6), (ip_address("10.0.0.1"), A4)]
PORTS = [None, (80, 80), (1, 65535), (0, 0), (90, 80), (-1, 5), (80, 65536)]


@given(st.sampled_from(list(NatKind)), st.sampled_from([None, AF_INET, AF_INET6]), st.sampled_from(ADDRS),
       st.sampled_from(PORTS))
def test_nat_statements(kind: NatKind, family: int | None, addr: Any, ports: Any) -> None:
    same(lambda: NatStatement(kind, "nat", family, addr, ports), lambda: make_nat(kind, "nat", family, addr, ports))


def test_nat_statements_the_class_refuses_are_refused() -> None:
    with pytest.raises(ValueError, match="bad port range"):
        make_nat(NatKind.DNAT, "dnat", None, (A4, A4), (90, 80))
    with pytest.raises(ValueError, match="takes no address"):
        make_nat(NatKind.MASQUERADE, "masquerade", None, (A4, A4), None)
    with pytest.raises(ValueError, match="cannot be NONE"):
        make_nat(NatKind.NONE, "x", None, (A4, A4), None)


EXPRS = [
    (),
    (Passive("counter", "counter"),),
    (Match(Selector(Key.DPORT, "tcp dport", proto=6), Op.EQ, IntervalSet(((80, 80),)), "tcp dport 80"),
     Verdict(VerdictKind.ACCEPT)),
]


@given(st.integers(0, 9), st.sampled_from(EXPRS), st.sampled_from(["", "a rule"]),
       st.sampled_from([None, "", "fwd 1"]), st.booleans())
def test_rules(handle: int, exprs: tuple[Any, ...], text: str, comment: str | None, as_list: bool) -> None:
    given_exprs: Any = list(exprs) if as_list else exprs
    same(lambda: Rule(handle, given_exprs, text, comment), lambda: make_rule(handle, given_exprs, text, comment))
