# SPDX-License-Identifier: GPL-2.0-or-later
"""core.classify: the tables a compiled scan reads, the cut of one field, and what is remembered.

Issue 16's mutation run left alive mutants of ``Classifier.packed`` (the layout ``edges/_ctscan.c``
reads, and when it declines), ``FieldMap.wide_starts``, the cut of a field at its ends (port 0,
port 65535, an interval ending one before the top), the memories (harvests by identity, route
labels per route object, the last two classifiers) and the guards of ``Classifier.updated``.

Expectations are hand-worked: the packed layout is the one ``_ctscan.c`` documents (native u32
counts, then the arrays); a membership interval changes a value's class exactly at its first value
and one past its last; what a memory keeps is counted by calling through it.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from typing import Any

import pytest

from topowatch.core import classify
from topowatch.core.classify import Classifier, FieldMap, _field_map, _memo, _u32
from topowatch.core.eligibility import Eligibility
from topowatch.core.model import AF_INET, AF_INET6, Address, Link, Nexthop, Route, Topology
from topowatch.core.nat import IntervalSet

LINKS = (Link(1, "lo"), Link(2, "lan"), Link(3, "up1"))
ADDRESSES = (Address(2, ip_address("10.0.0.1"), 8), Address(3, ip_address("198.51.100.2"), 24))
GW = Nexthop(3, ip_address("198.51.100.1"))
ROUTES = (Route(ip_network("0.0.0.0/0"), nexthops=(GW,)),)
TOPOLOGY = Topology(LINKS, ADDRESSES, ROUTES)


def _eligibility(marks: Sequence[tuple[int, int]]) -> Eligibility:
    return Eligibility(marks=tuple(marks))


# -- packed --------------------------------------------------------------------------------


def test_packed_lays_out_counts_arrays_and_marks_as_the_compiled_scan_reads_them() -> None:
    c = Classifier.build([TOPOLOGY], [], _eligibility([(0, 0xFF), (0xFFFFFFFF, 0xFFFFFFFF)]), reuse=False)
    out = c.packed()
    assert out is not None
    v4, v6, ports = c.src[AF_INET], c.src[AF_INET6], c.ports
    n4, n6, n_ports = len(v4.starts), len(v6.starts), len(ports.starts)
    assert struct.unpack_from("=5I", out) == (n4, n6, n_ports, 2, 1)
    at = 20
    assert list(struct.unpack_from(f"={n4}I", out, at)) == list(v4.starts)
    at += 4 * n4
    assert list(struct.unpack_from(f"={n4}I", out, at)) == list(v4.classes)
    at += 4 * n4
    assert [int.from_bytes(out[at + 16 * i : at + 16 * i + 16], "big") for i in range(n6)] == list(v6.starts)
    at += 16 * n6
    assert list(struct.unpack_from(f"={n6}I", out, at)) == list(v6.classes)
    at += 4 * n6
    assert list(struct.unpack_from(f"={n_ports}I", out, at)) == list(ports.starts)
    at += 4 * n_ports
    assert list(struct.unpack_from(f"={n_ports}I", out, at)) == list(ports.classes)
    at += 4 * n_ports
    assert struct.unpack_from("=4I", out, at) == (0, 0xFF, 0xFFFFFFFF, 0xFFFFFFFF)
    assert len(out) == at + 16
    assert c.packed() is out  # made once per classifier


@pytest.mark.parametrize(("count", "fits"), [(63, True), (64, False)])
def test_packed_holds_at_most_63_marks(count: int, fits: bool) -> None:
    c = Classifier.build([TOPOLOGY], [], _eligibility([(i, 0xFF) for i in range(count)]), reuse=False)
    assert (c.packed() is not None) == fits
    assert c.packed() is c.packed()


def test_packed_declines_a_mark_wider_than_32_bits() -> None:
    c = Classifier.build([TOPOLOGY], [], _eligibility([(1 << 32, 1 << 32)]), reuse=False)
    assert c.packed() is None
    c = Classifier.build([TOPOLOGY], [], _eligibility([(0, (1 << 32) - 1)]), reuse=False)
    assert c.packed() is not None


def test_wide_starts_are_16_big_endian_bytes_each_made_once() -> None:
    fmap = FieldMap([0, 1, (1 << 128) - 1], array("I", [0, 1, 2]))
    wide = fmap.wide_starts()
    assert wide == bytes(16) + (1).to_bytes(16, "big") + b"\xff" * 16
    assert fmap.wide_starts() is wide


def test_u32_passes_an_array_of_u32_as_it_is_and_packs_anything_else() -> None:
    values = array(classify._U32, [1, 2, 0xFFFFFFFF])
    assert _u32(values) is values
    assert _u32([1, 2, 0xFFFFFFFF]) == struct.pack("=3I", 1, 2, 0xFFFFFFFF)
    assert _u32([]) == b""


def test_starts_are_u32_arrays_up_to_32_bits_and_a_list_for_ipv6() -> None:
    c = Classifier.build([TOPOLOGY], [], reuse=False)
    assert isinstance(c.src[AF_INET].starts, array) and c.src[AF_INET].starts.itemsize == 4
    assert isinstance(c.ports.starts, array)
    assert isinstance(c.src[AF_INET6].starts, list)


# -- marks -----------------------------------------------------------------------------------


def test_a_zero_mark_is_a_class_apart_from_a_mark_that_only_matches_a_pair() -> None:
    c = Classifier.build([TOPOLOGY], [], _eligibility([(0, 0xFF)]), reuse=False)
    assert c.mark_class(0) != c.mark_class(0x100)  # both match (0, 0xff); only one is 0
    assert c.mark_class(0x100) == c.mark_class(0x200) != c.mark_class(0x1)


# -- one field's cut -------------------------------------------------------------------------


def _ports(*intervals: tuple[int, int]) -> FieldMap:
    return Classifier.build([TOPOLOGY], [(IntervalSet(tuple(intervals)),)], reuse=False).ports


def test_a_port_range_from_0_cuts_only_past_its_end() -> None:
    ports = _ports((0, 10))
    assert ports.lookup(0) == ports.lookup(1) == ports.lookup(10) != ports.lookup(11)


def test_port_65535_alone_is_a_class() -> None:
    ports = _ports((65535, 65535))
    assert ports.lookup(0) == ports.lookup(1) == ports.lookup(65534) != ports.lookup(65535)


def test_a_port_range_ending_at_65534_leaves_65535_out() -> None:
    ports = _ports((100, 65534))
    assert ports.lookup(65533) == ports.lookup(65534) != ports.lookup(65535)
    assert ports.lookup(65535) == ports.lookup(99)


def test_the_port_map_holds_no_start_past_the_last_port() -> None:
    ports = _ports((1025, 65535))
    assert max(ports.starts) == 1025


def test_field_map_skips_empty_and_repeated_intervals_but_reads_the_rest() -> None:
    fmap = _field_map(8, [(20, 10), (30, 40), (30, 40), (50, 60)])
    assert fmap.lookup(29) != fmap.lookup(30) == fmap.lookup(40) != fmap.lookup(41)
    assert fmap.lookup(49) != fmap.lookup(50) == fmap.lookup(60) != fmap.lookup(61)
    assert fmap.lookup(10) == fmap.lookup(20) == fmap.lookup(0)


def test_field_map_labels_by_the_narrowest_interval() -> None:
    # Table 0: (10, 99) labelled a, inside it (10, 19) labelled b: the same low end, inner one wins.
    fmap = _field_map(8, [], [[(10, 99, "a"), (10, 19, "b")]])
    assert fmap.lookup(9) != fmap.lookup(10) == fmap.lookup(19) != fmap.lookup(20) == fmap.lookup(99)
    assert fmap.lookup(100) == fmap.lookup(9) != fmap.lookup(99)
    fmap = _field_map(8, [], [[(10, 19, "b"), (10, 99, "a")]])  # given inner first
    assert fmap.lookup(10) != fmap.lookup(20)


def test_field_map_a_label_up_to_one_before_the_top() -> None:
    fmap = _field_map(8, [], [[(0, 254, "x")]])
    assert fmap.lookup(0) == fmap.lookup(254) != fmap.lookup(255)


def test_field_map_a_nested_interval_of_the_same_label_is_one_class() -> None:
    fmap = _field_map(8, [], [[(0, 99, "a"), (10, 19, "a")]])
    assert fmap.lookup(0) == fmap.lookup(10) == fmap.lookup(50) == fmap.lookup(99) != fmap.lookup(100)
    assert list(fmap.starts) == [0, 100]


def test_field_map_value_0_has_the_class_of_value_1_when_nothing_starts_at_0() -> None:
    fmap = _field_map(16, [(65535, 65535)])
    assert fmap.lookup(0) == fmap.lookup(1) != fmap.lookup(65535)


# -- addresses harvested from the topology and the eligibility ---------------------------------


def _alone(fmap: FieldMap, value: int) -> bool:
    return fmap.lookup(value - 1) != fmap.lookup(value) != fmap.lookup(value + 1)


def _edges(fmap: FieldMap, lo: int, hi: int) -> bool:
    return fmap.lookup(lo - 1) != fmap.lookup(lo) and fmap.lookup(hi) != fmap.lookup(hi + 1)


def test_an_interface_prefix_and_a_peer_are_ipv4_questions() -> None:
    addresses = (
        *ADDRESSES,
        Address(2, ip_address("192.0.2.1"), 24),
        Address(3, ip_address("100.64.0.2"), 24, peer=ip_address("100.64.9.1")),  # the peer's /24
    )
    c = Classifier.build([Topology(LINKS, addresses, ROUTES)], [], reuse=False)
    v4 = c.dst[AF_INET]
    assert _edges(v4, int(IPv4Address("192.0.2.0")), int(IPv4Address("192.0.2.255")))
    assert _edges(v4, int(IPv4Address("100.64.9.0")), int(IPv4Address("100.64.9.255")))
    assert _alone(v4, int(IPv4Address("100.64.9.1")))


def test_every_prefix_of_an_ipv6_interface_address_is_a_question() -> None:
    """Source selection reads the common prefix length with each address (RFC 6724 rule 8)."""
    address = ip_address("2001:db8:aaaa:5555::1")
    c = Classifier.build([Topology(LINKS, (*ADDRESSES, Address(3, address, 64)), ROUTES)], [], reuse=False)
    v6, value = c.dst[AF_INET6], int(address)
    for k in range(1, 65):
        shift = 128 - k
        lo = value >> shift << shift
        end = lo + (1 << shift)  # the first address past the /k prefix holding the address
        assert v6.lookup(end - 1) != v6.lookup(end), k
        assert v6.lookup(lo - 1) != v6.lookup(lo), k


def test_addresses_with_one_common_prefix_length_with_an_interface_address_are_one_class() -> None:
    """4000::1/2: bfff:ffff:... and c000:: both share no leading bit with it, and sit in the same
    prefixes of it and of every other question: one class. 8000:: starts the other half (::/1)."""
    address = ip_address("4000::1")
    c = Classifier.build([Topology(LINKS, (*ADDRESSES, Address(3, address, 2)), ROUTES)], [], reuse=False)
    v6 = c.dst[AF_INET6]
    assert v6.lookup(int(IPv6Address("c000::")) - 1) == v6.lookup(int(IPv6Address("c000::")))
    assert v6.lookup(int(IPv6Address("8000::")) - 1) != v6.lookup(int(IPv6Address("8000::")))


def test_eligibility_prefixes_are_questions() -> None:
    eligibility = Eligibility(
        sources=(ip_network("192.0.2.16/28"),), destinations=(ip_network("2001:db8:7::/48"),)
    )
    c = Classifier.build([TOPOLOGY], [], eligibility, reuse=False)
    assert _edges(c.src[AF_INET], int(IPv4Address("192.0.2.16")), int(IPv4Address("192.0.2.31")))
    assert _edges(
        c.dst[AF_INET6],
        int(IPv6Address("2001:db8:7::")),
        int(IPv6Address("2001:db8:7:ffff:ffff:ffff:ffff:ffff")),
    )


def test_an_address_in_0_0_0_0_8_is_not_classed_with_one_in_no_question() -> None:
    c = Classifier.build([TOPOLOGY], [], reuse=False)
    v4 = c.dst[AF_INET]
    assert v4.lookup(int(IPv4Address("0.1.2.3"))) != v4.lookup(int(IPv4Address("1.2.3.4")))


def test_an_ipv6_host_route_one_before_the_top_is_a_class_of_its_own() -> None:
    top = (1 << 128) - 1
    route = Route(ip_network(f"{IPv6Address(top - 1)}/128"), nexthops=(Nexthop(3),), metric=1024)
    c = Classifier.build([Topology(LINKS, ADDRESSES, (*ROUTES, route))], [], reuse=False)
    v6 = c.dst[AF_INET6]
    assert v6.lookup(top - 2) != v6.lookup(top - 1) != v6.lookup(top)


def test_reasons_are_joined_with_a_semicolon() -> None:
    c = Classifier.build([TOPOLOGY], [(object(), 1.5j)], reuse=False)
    assert c.reason == "a object value cannot be read for classes; a complex value cannot be read for classes"


# -- memories ------------------------------------------------------------------------------


def test_memo_keeps_the_last_12_values_by_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(classify, "_MEMO", {})
    made: list[object] = []

    def make(value: object) -> str:
        made.append(value)
        return f"made {len(made)}"

    a, b = object(), object()
    assert _memo(a, "w", make) == "made 1"
    assert _memo(b, "w", make) == "made 2"
    assert _memo(a, "w", make) == "made 1"
    assert _memo(b, "w", make) == "made 2"
    assert made == [a, b]
    others = [object() for _ in range(20)]
    for value in others:
        _memo(value, "w", make)
        assert len(classify._MEMO) <= 12
    assert len(classify._MEMO) == 12


def _count_route_labels(monkeypatch: pytest.MonkeyPatch) -> list[Route]:
    """An empty label memory, and the routes ``_route_label`` is called for, in order."""
    calls: list[Route] = []
    real = classify._route_label

    def counting(route: Route, *args: Any) -> object:
        calls.append(route)
        return real(route, *args)

    monkeypatch.setattr(classify, "_LABELS", {})
    monkeypatch.setattr(classify, "_route_label", counting)
    return calls


def test_route_labels_are_remembered_per_route(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_route_labels(monkeypatch)
    routes = tuple(Route(ip_network(f"10.{i}.0.0/16"), nexthops=(GW,)) for i in range(3))
    Classifier.build([Topology(LINKS, ADDRESSES, routes)], [], reuse=False)
    assert len(calls) == 3
    Classifier.build([Topology(LINKS, ADDRESSES, routes[:2])], [], reuse=False)
    assert len(calls) == 3  # the same links and addresses: the labels of the same routes are kept
    Classifier.build([Topology((*LINKS, Link(4, "up2")), ADDRESSES, routes[:2])], [], reuse=False)
    assert len(calls) == 5  # other links: read again


@pytest.mark.parametrize(("many", "read_again"), [(23, 0), (24, 2)])
def test_route_labels_are_forgotten_past_four_per_route_and_16(
    monkeypatch: pytest.MonkeyPatch, many: int, read_again: int
) -> None:
    """After a snapshot of ``many`` routes, one of 2 (kept: at most 4 * 2 + 16 entries, the links
    and addresses being one) of the same route objects reads them again only past that bound."""
    calls = _count_route_labels(monkeypatch)
    routes = tuple(Route(ip_network(f"10.{i}.0.0/16"), nexthops=(GW,)) for i in range(many))
    Classifier.build([Topology(LINKS, ADDRESSES, routes)], [], reuse=False)
    assert len(classify._LABELS) == many + 1
    calls.clear()
    Classifier.build([Topology(LINKS, ADDRESSES, routes[:2])], [], reuse=False)
    assert len(calls) == read_again


def test_the_last_two_classifiers_are_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(classify, "_RECENT", [])
    built = []
    for name in ("a", "b", "c"):
        topology = Topology((*LINKS, Link(9, name)), ADDRESSES, ROUTES)  # other links: no carrying over
        built.append(Classifier.build([topology], []))
        assert classify._RECENT[-1] is built[-1]
    assert [id(c) for c in classify._RECENT] == [id(built[1]), id(built[2])]
    classify._remember(built[1])
    assert [id(c) for c in classify._RECENT] == [id(built[2]), id(built[1])]


def test_labels_are_forgotten_only_past_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    Classifier.build([TOPOLOGY], [], reuse=False)
    monkeypatch.setattr(classify, "_LABEL_IDS_LIMIT", len(classify._LABEL_IDS))
    generation = classify._GENERATION[0]
    Classifier.build([TOPOLOGY], [], reuse=False)
    assert classify._GENERATION[0] == generation


# -- what ``updated`` declines -----------------------------------------------------------------


def _diff(before: Sequence[Route], now: Sequence[Route]) -> tuple[list[Route], list[Route]]:
    return [r for r in before if r not in now], [r for r in now if r not in before]


NEXT = Topology(LINKS, ADDRESSES, (*ROUTES, Route(ip_network("192.0.2.0/24"), nexthops=(GW,))))


def test_updated_declines_another_sport_choice_or_more_than_two_snapshots() -> None:
    c = Classifier.build([TOPOLOGY], [], reuse=False)
    assert c.updated([NEXT], [], sport_matters=False, changes=_diff) is None
    assert c.updated([TOPOLOGY, TOPOLOGY, NEXT], [], changes=_diff) is None
    assert c.updated([NEXT], [], changes=_diff) is not None


def test_updated_declines_where_the_index_cannot_be_moved() -> None:
    c = Classifier.build([TOPOLOGY], [], reuse=False)
    calls: list[int] = []

    def changes(before: Sequence[Route], now: Sequence[Route]) -> tuple[list[Route], list[Route]] | None:
        calls.append(len(calls))
        return None if len(calls) == 1 else _diff(before, now)  # the index's move is unknown

    assert c.updated([NEXT], [], changes=changes) is None


def test_an_index_being_moved_is_not_moved_by_a_second_update() -> None:
    c = Classifier.build([TOPOLOGY], [], reuse=False)
    inner: list[object] = []

    def changes(before: Sequence[Route], now: Sequence[Route]) -> tuple[list[Route], list[Route]]:
        if not inner:  # another update while this one holds the index (as a second thread would)
            inner.append(c.updated([NEXT], [], changes=_diff))
        return _diff(before, now)

    assert c.updated([NEXT], [], changes=changes) is not None
    assert inner == [None]


@pytest.mark.parametrize(("extra", "carried"), [(0, True), (1, False)])
def test_updates_stop_past_four_times_the_built_classes_and_4096(extra: int, carried: bool) -> None:
    c = Classifier.build([TOPOLOGY], [], reuse=False)
    assert c._lineage is not None
    for numbering in c._lineage.numbering.values():
        filler = numbering.sigs[0]
        numbering.sigs.extend([filler] * (4 * numbering.built + 4096 + extra - len(numbering.sigs)))
    assert (c.updated([NEXT], [], changes=_diff) is not None) == carried


def test_a_classifier_over_snapshots_of_other_links_is_not_carried_over() -> None:
    other = Topology((*LINKS, Link(9, "new")), ADDRESSES, ROUTES)
    c = Classifier.build([other, TOPOLOGY], [], reuse=False)
    assert c.updated([TOPOLOGY, NEXT], [], changes=_diff) is None
    c = Classifier.build([TOPOLOGY, TOPOLOGY], [], reuse=False)
    assert c.updated([TOPOLOGY, NEXT], [], changes=_diff) is not None
    c = Classifier.build([TOPOLOGY, other, TOPOLOGY], [], reuse=False)
    assert c._lineage is None
