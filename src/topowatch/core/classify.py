# SPDX-License-Identifier: GPL-2.0-or-later
"""Flow classes: cut the space of flows into classes that every snapshot treats alike.

Theory of operation. A prediction (``core.evaluate.predict``) reads a flow
through a fixed set of questions: is the source in this prefix, in that set,
which route of table T holds the destination (and which holds the source, for
the reverse path), is the port in this range, is the mark 0. The answers to
those questions, not the flow itself, decide the prediction. So the space of
flows falls into *classes* (the field calls them atoms, Delta-net, NSDI 2017;
atomic predicates, Yang and Lam): flows that answer every question alike get
the same prediction, and one representative per class is predicted.

Per field we keep the questions as intervals over the field's integer value:

- addresses (source and destination alike, per family): every address and
  prefix named anywhere in the ruleset, the policy rules, the interface
  addresses, the xfrm selectors and the eligibility, as a plain membership;
  the well-known prefixes the FIB and source selection look at (multicast,
  link-local, the RFC 6724 labels); for IPv6 every prefix of every interface
  address (source selection reads the common prefix length); and per routing
  table, *which route would answer* as a label: the route's content without
  its prefix (type, nexthops with their links' names and states, the
  interface addresses the masquerade source is chosen from, metric, ...),
  so ten thousand routes via one gateway are one label, not ten thousand;
- ports (source port only where some rule reads it): every port range and
  every small integer constant of the ruleset and the xfrm selectors;
- marks: whether the mark is 0 (a new flow's conntrack mark) and each
  (value, mask) the eligibility tests; zone, protocol, family and the
  SEEN_REPLY bit are taken as they are.

A field's value maps to the set of answers it gives (its *signature*), and
signatures are numbered: equal signatures are one class, wherever their
intervals lie. A classifier may be built over several snapshots at once
(the previous and the current one): its classes then answer alike in each.
An address signature is written the same way however the classifier came
about: (membership, the newest snapshot's route label per table, and for each
older snapshot the tables whose label differs from the newest's).

Updates. A reaction's snapshots differ from the last reaction's by a few
routes (``core.livetopology.route_changes`` names them without comparing the
tables), so ``build`` carries the last classifier over instead of starting
again (``Classifier.updated``), as Delta-net does: it re-reads the route
labels only inside the changed prefixes and inside the prefixes where the
previous classifier's snapshots differed, takes every other answer from the
signature of the class that held the value before, and splices the new
intervals into the old arrays. Signatures keep their numbers across updates
(the numbering only grows), so a class that did not change keeps its number.
The routes of the newest snapshot are kept indexed per table for this (the
index follows the snapshots forward). Anything but routes changing (links,
addresses, rules, xfrm policies, the ruleset, the eligibility) builds again.
An updated classifier equals one built from scratch (tests/core/test_classify_update.py).

Where a question cannot be cut into intervals (a netmap, an address or port
under a non-prefix mask), the classifier says it is not ``exact`` and the
caller keeps predicting per flow. This module is pure: it never performs
I/O and never decides staleness (``core.decide`` does).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import itertools
import operator
import struct
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from topowatch.core.eligibility import Eligibility
from topowatch.core.impact import Impact
from topowatch.core.livetopology import route_changes
from topowatch.core.model import AF_INET, AF_INET6, Address, Link, Route, RouteType, Topology

# Questions the FIB and source selection ask of any address, whatever the configuration.
_SPECIAL_V4 = ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "255.255.255.255/32")
_SPECIAL_V6 = (
    "::/128", "::1/128", "::ffff:0:0/96", "::/96", "2002::/16", "3ffe::/16", "2001::/32", "2001:10::/28",
    "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
)  # fmt: skip

_BITS = {AF_INET: 32, AF_INET6: 128}
_PORT_MAX = 0xFFFF
# The array type code of an unsigned 32-bit integer (what ``packed`` and the compiled scan read).
_U32 = "I" if array("I").itemsize == 4 else "L"

Span = tuple[int, int]  # an interval of a field's values, both ends included
# What ``Classifier.updated`` asks of two snapshots' routes: (only in the first, only in the second).
RouteChanges = Callable[
    [Sequence[Route], Sequence[Route]], "tuple[Collection[Route], Collection[Route]] | None"
]


class Inexact(Exception):
    """A question the classes cannot answer by intervals (raised while harvesting)."""


def _starts_of(bits: int, values: Iterable[int] = ()) -> Any:
    """A sequence of interval starts: packed u32 where they fit (copied and serialised at C speed)."""
    return array(_U32, values) if bits <= 32 else list(values)


def _u32(values: Sequence[int]) -> bytes | array[int]:
    """Values as native u32, for ``bytes.join`` (an array of u32 joins as it is, without a copy)."""
    if isinstance(values, array) and values.itemsize == 4:
        return values
    return struct.pack(f"={len(values)}I", *values)


@dataclass(frozen=True, slots=True)
class FieldMap:
    """One field's classes: ``starts`` sorted, ``classes[i]`` holds for [starts[i], starts[i+1]).

    ``starts`` is an ``array`` of u32 for fields of up to 32 bits and a list for IPv6, ``classes``
    an ``array`` of u32. Class numbers need not be dense: an updated map keeps the numbers of the
    map it came from and adds new ones.
    """

    starts: Sequence[int]
    classes: Sequence[int]
    _memo: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def lookup(self, value: int) -> int:
        return self.classes[bisect_right(self.starts, value) - 1]

    @property
    def count(self) -> int:
        """The distinct classes (counted when first asked: an update does not pay for it)."""
        count = self._memo.get("count")
        if count is None:
            count = self._memo["count"] = len(set(self.classes))
        return int(count)

    def wide_starts(self) -> bytes:
        """The starts as 16 big-endian bytes each (IPv6, for ``Classifier.packed``), made once."""
        out = self._memo.get("wide")
        if out is None:
            out = self._memo["wide"] = b"".join(s.to_bytes(16, "big") for s in self.starts)
        return bytes(out)


def _field_map(
    bits: int,
    intervals: Iterable[tuple[int, int]],
    labelled: Sequence[Sequence[tuple[int, int, object]]] = (),
) -> FieldMap:
    """Cut [0, 2**bits) by membership in ``intervals`` and by the labels of ``labelled``.

    ``labelled`` holds per table a list of (lo, hi, label) of nested intervals
    (prefixes): a value's label in a table is that of the narrowest interval
    holding it (longest prefix match), None outside all.
    """
    top = 1 << bits
    events = _membership_events(intervals, top)
    points: set[int] = set(events)
    points.add(0)
    tables: list[list[tuple[int, int, object]]] = []
    for routes in labelled:
        ordered = sorted(routes, key=lambda r: (r[0], -r[1]))
        tables.append(ordered)
        for lo, hi, _ in ordered:
            points.add(lo)
            if hi + 1 < top:
                points.add(hi + 1)
    active: set[int] = set()
    stacks: list[list[tuple[int, object]]] = [[] for _ in tables]
    cursors = [0] * len(tables)
    starts: list[int] = []
    classes: list[int] = []
    numbers: dict[tuple[object, ...], int] = {}
    members: frozenset[int] = frozenset()
    for point in sorted(points):
        changes = events.get(point)
        if changes:
            members = _moved(active, changes)
        labels = [_label_at(point, ordered, stacks[t], cursors, t) for t, ordered in enumerate(tables)]
        signature = (members, *labels)
        number = numbers.setdefault(signature, len(numbers))
        if classes and classes[-1] == number:
            continue
        starts.append(point)
        classes.append(number)
    return FieldMap(_starts_of(bits, starts), array(_U32, classes))


def _membership_events(intervals: Iterable[tuple[int, int]], top: int) -> dict[int, list[tuple[int, int]]]:
    """point -> [(kind, id)]: kind 1 an interval opens there, 0 one closes (ends just before)."""
    events: dict[int, list[tuple[int, int]]] = {}
    ids: dict[tuple[int, int], int] = {}
    for first, last in intervals:
        lo, hi = max(first, 0), min(last, top - 1)
        if lo > hi:
            continue
        key = (lo, hi)
        if key in ids:
            continue
        ident = ids[key] = len(ids)
        events.setdefault(lo, []).append((1, ident))
        if hi + 1 < top:
            events.setdefault(hi + 1, []).append((0, ident))
    return events


def _moved(active: set[int], changes: list[tuple[int, int]]) -> frozenset[int]:
    for kind, ident in changes:
        if kind == 0:
            active.discard(ident)
    for kind, ident in changes:
        if kind == 1:
            active.add(ident)
    return frozenset(active)


def _label_at(
    point: int, ordered: Sequence[tuple[int, int, Any]], stack: list[tuple[int, Any]], cursors: list[int],
    t: int,
) -> Any:  # fmt: skip
    """The label of the narrowest interval of ``ordered`` holding ``point`` (a sweep, points ascending)."""
    while stack and stack[-1][0] < point:
        stack.pop()
    while cursors[t] < len(ordered) and ordered[cursors[t]][0] <= point:
        _, hi, label = ordered[cursors[t]]
        cursors[t] += 1
        if hi >= point:
            stack.append((hi, label))  # prefixes nest: the narrowest is on top
    return stack[-1][1] if stack else None


# -- harvesting the questions ------------------------------------------------------------


@dataclass(slots=True)
class _Harvest:
    addresses: dict[int, set[tuple[int, int]]]
    ports: set[tuple[int, int]]
    inexact: list[str]

    @classmethod
    def empty(cls) -> _Harvest:
        return cls({AF_INET: set(), AF_INET6: set()}, set(), [])

    def merge(self, other: _Harvest) -> None:
        for family, intervals in other.addresses.items():
            self.addresses[family] |= intervals
        self.ports |= other.ports
        self.inexact.extend(other.inexact)

    def address(self, lo: int, hi: int, version: int) -> None:
        self.addresses[AF_INET if version == 4 else AF_INET6].add((lo, hi))

    def port(self, lo: int, hi: int) -> None:
        if 0 <= lo <= _PORT_MAX:
            self.ports.add((lo, min(hi, _PORT_MAX)))


def _harvested(fill: Callable[[_Harvest], None]) -> _Harvest:
    harvest = _Harvest.empty()
    fill(harvest)
    return harvest


# What was harvested from the last few rulesets and topologies, by identity: a reaction's
# snapshot is the next one's previous snapshot, and the ruleset is read again only when it
# changed. The value keeps its key alive, so an id is never reused while it is here.
_MEMO: dict[tuple[int, str], tuple[object, Any]] = {}
_MEMO_SIZE = 12


def _memo(value: object, what: str, make: Callable[[Any], Any]) -> Any:
    key = (id(value), what)
    hit = _MEMO.get(key)
    if hit is not None and hit[0] is value:
        return hit[1]
    result = make(value)
    if len(_MEMO) >= _MEMO_SIZE:
        del _MEMO[next(iter(_MEMO))]
    _MEMO[key] = (value, result)
    return result


def _masked_interval(value: int, mask: int, bits: int) -> tuple[int, int] | None:
    """The values v with v & mask == value & mask, when that is one interval (a prefix mask)."""
    full = (1 << bits) - 1
    inverse = ~mask & full
    if inverse & (inverse + 1):
        return None  # not a prefix mask: not an interval
    lo = value & mask
    return lo, lo | inverse


def _walk(value: object, harvest: _Harvest, depth: int = 0) -> None:
    """Every address, prefix, interval and port-sized integer in ``value``, recursively."""
    if depth > 200:
        harvest.inexact.append("a value nested too deeply to read")
        return
    if isinstance(value, bool) or value is None or isinstance(value, (str, bytes, float, enum.Enum)):
        return
    if isinstance(value, int):
        harvest.port(value, value)
        return
    if isinstance(value, (IPv4Address, IPv6Address)):
        harvest.address(int(value), int(value), value.version)
        return
    if isinstance(value, (IPv4Network, IPv6Network)):
        harvest.address(int(value.network_address), int(value.broadcast_address), value.version)
        return
    name = type(value).__name__
    if name == "IntervalSet":
        version = getattr(value, "version", None)
        for lo, hi in getattr(value, "intervals", ()):
            if version in (4, 6):
                harvest.address(lo, hi, version)
            else:
                harvest.port(lo, hi)
        return
    if name == "NetmapStatement" or (name == "NatMapStatement" and getattr(value, "netmap", False)):
        harvest.inexact.append(f"{getattr(value, 'text', name)} maps addresses bit by bit")
    if name == "Selector":
        key = getattr(getattr(value, "key", None), "value", "")
        if getattr(value, "mask", None) is not None and key in ("saddr", "daddr", "sport", "dport"):
            harvest.inexact.append(f"{getattr(value, 'text', key)} is read under a mask")
    if name == "XfrmSelector":
        for port, mask in (("sport", "sport_mask"), ("dport", "dport_mask")):
            p, m = getattr(value, port), getattr(value, mask)
            if m:
                span = _masked_interval(p, m, 16)
                if span is None:
                    harvest.inexact.append(f"xfrm selector {port} {p}/{m:#x} is not a range")
                else:
                    harvest.port(*span)
    if isinstance(value, dict):
        for k, v in value.items():
            _walk(k, harvest, depth + 1)
            _walk(v, harvest, depth + 1)
        return
    if isinstance(value, (tuple, list, frozenset, set)):
        for item in value:
            _walk(item, harvest, depth + 1)
        return
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _walk(getattr(value, f.name), harvest, depth + 1)
        return
    harvest.inexact.append(f"a {name} value cannot be read for classes")


def _route_label(
    route: Route, links: Mapping[int, Link], oif_addresses: Mapping[int, tuple[object, ...]]
) -> object:
    """What the FIB reads of a route besides its prefix (for plain unicast routes)."""
    if route.type != RouteType.UNICAST or not route.nexthops or route.tos:
        # Its text can reach a reason or an unknown: keep it apart by its prefix too.
        return ("route", route)
    hops = []
    for nh in route.nexthops:
        link = links.get(nh.oif)
        hops.append((nh, None if link is None else (link.name, link.up), oif_addresses.get(nh.oif, ())))
    return (route.type, tuple(hops), route.metric, route.prefsrc, route.scope, route.protocol)


# Route labels by id(route): (route, label number), and "context": the links and addresses they
# read. Labels are numbered once (``_LABEL_IDS``, which only grows: a number never changes its
# meaning while any remembered map uses it), so the sweep hashes small ints, not routes.
_LABELS: dict[object, Any] = {}
_LABEL_IDS: dict[object, int] = {}
_LABEL_IDS_LIMIT = 1 << 20
# Numbers are drawn from one counter and never reused, so two builds in two threads can never
# give one number to two labels (``setdefault`` keeps the first insertion of a label).
_NUMBERS = itertools.count()
# Bumped whenever ``_LABEL_IDS`` is forgotten: an index numbered before cannot be updated.
_GENERATION = [0]


def _forget_labels() -> None:
    """Drop every remembered label and map together (their numbers go with them)."""
    _LABELS.clear()
    _LABEL_IDS.clear()
    _MEMO.clear()
    _GENERATION[0] += 1


def _route_order(route: Route) -> tuple[int, int]:
    return (-route.tos, route.metric)


def _oif_addresses(addresses: Sequence[Address]) -> dict[int, tuple[object, ...]]:
    by_oif: dict[int, list[object]] = {}
    for a in addresses:
        by_oif.setdefault(a.ifindex, []).append(a)
    return {k: tuple(v) for k, v in by_oif.items()}


def _labeller(topology: Topology) -> Callable[[Route], int]:
    """The label number of a route of ``topology``, remembered per Route object.

    Labels are remembered while the links and addresses they read stay the same: a snapshot
    kept from events shares its unchanged routes with the one before.
    """
    links = {link.index: link for link in topology.links}
    oif_addresses = _oif_addresses(topology.addresses)
    context = (topology.links, topology.addresses)
    if _LABELS.get("context") != context or len(_LABELS) > 4 * len(topology.routes) + 16:
        _LABELS.clear()
        _LABELS["context"] = context

    def label(route: Route) -> int:
        hit = _LABELS.get(id(route))
        if hit is None or hit[0] is not route:
            number = _LABEL_IDS.setdefault(_route_label(route, links, oif_addresses), next(_NUMBERS))
            hit = _LABELS[id(route)] = (route, number)
        return int(hit[1])

    return label


def _group_label(labels: Sequence[int]) -> int:
    """The label of the routes of one prefix in one table, in the order the FIB tries them."""
    return labels[0] if len(labels) == 1 else _LABEL_IDS.setdefault(tuple(labels), next(_NUMBERS))


GroupKey = tuple[int, int, int, int]  # family, table, lo, hi


def _group_key(route: Route) -> GroupKey:
    dst = route.dst
    lo = int(dst.network_address)  # not ``broadcast_address``: a cached property, 200 bytes a route
    return (AF_INET if dst.version == 4 else AF_INET6, route.table, lo,
            lo | ((1 << (dst.max_prefixlen - dst.prefixlen)) - 1))  # fmt: skip


def _order_key(span: Span) -> int:
    """A prefix as one sortable integer: its low end, then its size (outer prefixes first)."""
    lo, hi = span
    bits = (hi - lo + 1).bit_length() - 1  # host bits: 0 for a host route
    return lo << 8 | (255 - bits)


def _order_span(key: int) -> Span:
    lo = key >> 8
    return lo, lo | ((1 << (255 - (key & 0xFF))) - 1)


@dataclass(slots=True)
class _Table:
    """One routing table of one family as the classes read it: each prefix's routes and label.

    ``order`` holds every prefix as ``_order_key``, sorted (an array of u64 for IPv4, so that a
    table of 100k routes costs a few megabytes and an insert a short move).
    """

    wide: bool  # IPv6: prefixes that do not fit in a u64 key
    groups: dict[Span, tuple[Route, ...]] = field(default_factory=dict)
    labels: dict[Span, int] = field(default_factory=dict)
    order: Any = None
    sizes: dict[int, int] = field(default_factory=dict)  # host bits -> how many prefixes have them

    def __post_init__(self) -> None:
        if self.order is None:
            self.order = [] if self.wide else array("Q")

    def containing(self, point: int) -> Iterator[Span]:
        """The prefixes holding ``point`` (one lookup per prefix length present)."""
        for bits in self.sizes:
            lo = point >> bits << bits
            span = (lo, lo | ((1 << bits) - 1))
            if span in self.labels:
                yield span

    def starting_in(self, first: int, last: int) -> Iterator[Span]:
        """The prefixes whose low end lies in (first, last]."""
        order = self.order
        i = bisect_right(order, first << 8 | 0xFF)
        while i < len(order) and order[i] >> 8 <= last:
            yield _order_span(order[i])
            i += 1

    def ordered(self) -> list[tuple[int, int, int]]:
        """(lo, hi, label) of every prefix, outer prefixes first."""
        labels = self.labels
        return [(lo, hi, labels[(lo, hi)]) for lo, hi in map(_order_span, self.order)]

    def put(self, span: Span, routes: tuple[Route, ...], label: int) -> None:
        if span not in self.labels:
            bits = (span[1] - span[0] + 1).bit_length() - 1
            self.sizes[bits] = self.sizes.get(bits, 0) + 1
            key = _order_key(span)
            self.order.insert(bisect_left(self.order, key), key)
        self.groups[span] = routes
        self.labels[span] = label

    def remove(self, span: Span) -> None:
        if span not in self.labels:
            return
        del self.groups[span], self.labels[span]
        bits = (span[1] - span[0] + 1).bit_length() - 1
        self.sizes[bits] -= 1
        if not self.sizes[bits]:
            del self.sizes[bits]
        del self.order[bisect_left(self.order, _order_key(span))]


@dataclass(slots=True)
class _Index:
    """The routes of one snapshot per family and table; updates move it to the next snapshot.

    ``routes`` is that snapshot's routes tuple: where the index stands in the lineage
    (``core.livetopology.route_changes``). ``links`` and ``oif_addresses`` are what labels read.
    """

    tables: dict[int, dict[int, _Table]]
    routes: Sequence[Route]
    links: dict[int, Link]
    oif_addresses: dict[int, tuple[object, ...]]
    generation: int

    @classmethod
    def of(cls, topology: Topology) -> _Index:
        label = _labeller(topology)
        groups: dict[GroupKey, list[Route]] = {}
        for route in topology.routes:
            groups.setdefault(_group_key(route), []).append(route)
        tables: dict[int, dict[int, _Table]] = {AF_INET: {}, AF_INET6: {}}
        for (family, table, lo, hi), routes in groups.items():
            if len(routes) > 1:
                routes.sort(key=_route_order)  # stable: dump order among equals, as the FIB keeps it
            t = tables[family].get(table)
            if t is None:
                t = tables[family][table] = _Table(family == AF_INET6)
            span = (lo, hi)
            t.groups[span] = tuple(routes)
            t.labels[span] = _group_label([label(r) for r in routes])
            bits = (hi - lo + 1).bit_length() - 1
            t.sizes[bits] = t.sizes.get(bits, 0) + 1
        for family_tables in tables.values():
            for t in family_tables.values():
                keys = sorted(map(_order_key, t.labels))
                t.order = keys if t.wide else array("Q", keys)
        links = {link.index: link for link in topology.links}
        return cls(tables, topology.routes, links, _oif_addresses(topology.addresses), _GENERATION[0])

    def group(self, key: GroupKey) -> tuple[Route, ...]:
        family, table, lo, hi = key
        t = self.tables[family].get(table)
        return () if t is None else t.groups.get((lo, hi), ())

    def label(self, routes: Sequence[Route]) -> int:
        links, addresses = self.links, self.oif_addresses
        labels = [_LABEL_IDS.setdefault(_route_label(r, links, addresses), next(_NUMBERS)) for r in routes]
        return _group_label(labels)


def _regrouped(
    current: Callable[[GroupKey], tuple[Route, ...]], remove: Iterable[Route], add: Iterable[Route]
) -> dict[GroupKey, tuple[Route, ...]] | None:
    """The routes of every prefix ``remove`` and ``add`` touch, after them; None where a change
    does not apply (a route to remove is missing, one to add is there) or where the order
    among a prefix's routes would depend on where the kernel put them (equal TOS and metric)."""
    changed: dict[GroupKey, list[Route]] = {}
    for route, adding in itertools.chain(((r, False) for r in remove), ((r, True) for r in add)):
        key = _group_key(route)
        routes = changed.get(key)
        if routes is None:
            routes = changed[key] = list(current(key))
        if adding == (route in routes):
            return None
        if adding:
            routes.append(route)
        else:
            routes.remove(route)
    out: dict[GroupKey, tuple[Route, ...]] = {}
    for key, routes in changed.items():
        routes.sort(key=_route_order)
        if any(_route_order(a) == _route_order(b) for a, b in itertools.pairwise(routes)):
            return None
        out[key] = tuple(routes)
    return out


@dataclass(slots=True)
class _View:
    """One family's tables of one snapshot: the index's, with the labels of some prefixes replaced."""

    tables: Mapping[int, _Table]
    over: dict[int, dict[Span, int | None]]  # table -> prefix -> label (None: no route there)

    def segments(self, table: int, first: int, last: int) -> list[tuple[int, int | None]]:
        """The label of ``table`` over [first, last]: (point, label) at ``first`` and wherever it changes."""
        found: dict[Span, int] = {}
        base = self.tables.get(table)
        if base is not None:
            for span in itertools.chain(base.containing(first), base.starting_in(first, last)):
                found[span] = base.labels[span]
        for span, label in self.over.get(table, {}).items():
            if span[0] <= last and span[1] >= first:
                if label is None:
                    found.pop(span, None)
                else:
                    found[span] = label
        ordered = sorted(((lo, hi, label) for (lo, hi), label in found.items()), key=lambda r: (r[0], -r[1]))
        points = {first}
        for lo, hi, _ in ordered:
            if lo > first:
                points.add(lo)
            if first < hi + 1 <= last:
                points.add(hi + 1)
        stack: list[tuple[int, Any]] = []
        cursors = [0]
        out: list[tuple[int, int | None]] = []
        for point in sorted(points):
            label = _label_at(point, ordered, stack, cursors, 0)
            if not out or out[-1][1] != label:
                out.append((point, label))
        return out


# An address signature: (membership id, ((table, label), ...) of the newest snapshot,
# ((age, table, label), ...) where the snapshot ``age`` steps older says otherwise).
Signature = tuple[int, tuple[tuple[int, int], ...], tuple[tuple[int, int, int | None], ...]]


def _signature(
    members: int, now: Mapping[int, int | None], before: Sequence[Mapping[int, int | None]]
) -> Signature:
    """The one way a signature is written, by a build and by an update alike."""
    labels = tuple(sorted((t, label) for t, label in now.items() if label is not None))
    diffs = []
    for age, old in enumerate(before, 1):
        for t in sorted(old.keys() | now.keys()):
            label = old.get(t)
            if label != now.get(t):
                diffs.append((age, t, label))
    return (members, labels, tuple(diffs))


@dataclass(slots=True)
class _Numbering:
    """The class numbers of one family's address signatures: a number never changes its meaning."""

    sigs: list[Signature] = field(default_factory=list)
    by_sig: dict[Signature, int] = field(default_factory=dict)
    built: int = 0  # numbered by the build; updates add beyond, up to ``_GROWTH`` times as many

    def number(self, sig: Signature) -> int:
        n = self.by_sig.get(sig)
        if n is None:
            n = self.by_sig[sig] = len(self.sigs)
            self.sigs.append(sig)
        return n


_GROWTH = 4


def _address_map(
    bits: int, intervals: Iterable[Span], snapshots: Sequence[Mapping[int, _Table]], numbering: _Numbering
) -> tuple[FieldMap, tuple[Span, ...]]:
    """One family's address map over ``snapshots`` (oldest first), and the spans where they differ."""
    top = 1 << bits
    events = _membership_events(intervals, top)
    points: set[int] = set(events)
    points.add(0)
    tracks: list[tuple[int, int, list[tuple[int, int, int]]]] = []  # (age, table, prefixes)
    for j, tables in enumerate(snapshots):
        for t in sorted(tables):
            table = tables[t]
            ordered = table.ordered()
            tracks.append((len(snapshots) - 1 - j, t, ordered))
            for lo, hi, _ in ordered:
                points.add(lo)
                if hi + 1 < top:
                    points.add(hi + 1)
    newest = [(t, i) for i, (age, t, _) in enumerate(tracks) if age == 0]
    older = [[(t, i) for i, (age, t, _) in enumerate(tracks) if age == k] for k in range(1, len(snapshots))]
    active: set[int] = set()
    member_ids: dict[frozenset[int], int] = {frozenset(): 0}
    members = 0
    stacks: list[list[tuple[int, Any]]] = [[] for _ in tracks]
    cursors = [0] * len(tracks)
    starts: list[int] = []
    classes: list[int] = []
    spans: list[Span] = []
    differ_from: int | None = None
    for point in sorted(points):
        changes = events.get(point)
        if changes:
            members = member_ids.setdefault(_moved(active, changes), len(member_ids))
        labels = [_label_at(point, track[2], stacks[i], cursors, i) for i, track in enumerate(tracks)]
        if not older:
            sig: Signature = (members, tuple((t, labels[i]) for t, i in newest if labels[i] is not None), ())
        else:
            now = {t: labels[i] for t, i in newest}
            sig = _signature(members, now, [{t: labels[i] for t, i in snapshot} for snapshot in older])
            if sig[2] and differ_from is None:
                differ_from = point
            elif not sig[2] and differ_from is not None:
                spans.append((differ_from, point - 1))
                differ_from = None
        number = numbering.number(sig)
        if classes and classes[-1] == number:
            continue
        starts.append(point)
        classes.append(number)
    if differ_from is not None:
        spans.append((differ_from, top - 1))
    numbering.built = len(numbering.sigs)
    return FieldMap(_starts_of(bits, starts), array(_U32, classes)), tuple(spans)


def _merged(spans: Iterable[Span]) -> list[Span]:
    """Disjoint spans covering ``spans``, ascending; spans that touch are one."""
    out: list[list[int]] = []
    for lo, hi in sorted(spans):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def _patched(  # noqa: PLR0917 - one family's update, called once per family
    fmap: FieldMap, numbering: _Numbering, bits: int, regions: Sequence[Span],
    now: _View, before: _View | None, relabel: Sequence[int], compared: Sequence[int],
) -> FieldMap:  # fmt: skip
    """``fmap`` with its classes inside ``regions`` written again; the old arrays elsewhere.

    Inside a region, a value keeps the membership of the class that held it and the newest
    labels of the tables outside ``relabel``; the tables in ``relabel`` are read from ``now``,
    and where ``before`` is given (a classifier over two snapshots), the tables in ``compared``
    from it too (the labels the older snapshot gives otherwise).
    """
    top = 1 << bits
    starts, classes, sigs = fmap.starts, fmap.classes, numbering.sigs
    # Every region's replacement of old intervals [i, j), then all spliced into one copy of the
    # old arrays, the highest first (a copy and a few moves: no array is grown piece by piece).
    splices: list[tuple[int, int, list[int], list[int]]] = []
    for first, last in regions:
        i = bisect_left(starts, first)  # old intervals from i on start inside the region or after it
        k, end = bisect_right(starts, first) - 1, bisect_right(starts, last)
        held = [(first, classes[k]), *zip(starts[k + 1 : end], classes[k + 1 : end], strict=True)]
        read = [now.segments(t, first, last) for t in relabel]
        if before is not None:
            read += [before.segments(t, first, last) for t in compared]
        points = sorted({p for p, _ in held}.union(*({p for p, _ in source} for source in read)))
        new_starts: list[int] = []
        new_classes: list[int] = []
        running = classes[i - 1] if i else -1  # the class just before the region, once spliced
        h, at = 0, [0] * len(read)
        for point in points:
            while h + 1 < len(held) and held[h + 1][0] <= point:
                h += 1
            for s, source in enumerate(read):
                while at[s] + 1 < len(source) and source[at[s] + 1][0] <= point:
                    at[s] += 1
            members, newest, _ = sigs[held[h][1]]
            labels: dict[int, int | None] = dict(newest)
            for s, t in enumerate(relabel):
                labels[t] = read[s][at[s]][1]
            olds: list[dict[int, int | None]] = []
            if before is not None:
                old = dict(labels)
                for s, t in enumerate(compared, len(relabel)):
                    old[t] = read[s][at[s]][1]
                olds.append(old)
            number = numbering.number(_signature(members, labels, olds))
            if number != running:
                new_starts.append(point)
                new_classes.append(number)
                running = number
        j = bisect_right(starts, last + 1)  # the old interval holding last + 1 goes on past it
        if last + 1 < top and running != classes[j - 1]:
            new_starts.append(last + 1)
            new_classes.append(classes[j - 1])
        splices.append((i, j, new_starts, new_classes))
    out_starts, out_classes = _starts_of(bits, starts), array(_U32, classes)
    for i, j, new_starts, new_classes in reversed(splices):
        out_starts[i:j] = _starts_of(bits, new_starts)
        out_classes[i:j] = array(_U32, new_classes)
    return FieldMap(out_starts, out_classes)


def _topology_harvested(topology: Topology) -> _Harvest:
    return _harvested(functools.partial(_topology_harvest, topology))


def _topology_harvest(topology: Topology, harvest: _Harvest) -> None:
    for a in topology.addresses:
        harvest.address(int(a.address), int(a.address), a.address.version)
        net = a.network
        harvest.address(int(net.network_address), int(net.broadcast_address), net.version)
        if a.peer is not None:
            harvest.address(int(a.peer), int(a.peer), a.peer.version)
        if a.address.version == 6:
            # Source selection compares common prefix lengths, capped at the prefix length.
            value = int(a.address)
            for k in range(min(a.prefixlen, 128) + 1):
                shift = 128 - k
                lo = value >> shift << shift if shift < 128 else 0
                harvest.address(lo, lo | ((1 << shift) - 1), 6)
    _walk(topology.rules, harvest)
    _walk(topology.xfrm_policies, harvest)
    # Routes are not harvested: their prefixes are labels (``_table_routes``), and a gateway or
    # preferred source is compared with interface addresses, never with a flow's address.


def _context(topology: Topology) -> tuple[object, ...]:
    """What the classes read of a snapshot besides its routes (an update needs it unchanged)."""
    links = tuple((link.index, link.name, link.up) for link in topology.links)
    return (links, topology.addresses, topology.rules, topology.xfrm_policies)


@dataclass(frozen=True, slots=True)
class _Lineage:
    """What an update continues from. ``index`` and ``numbering`` are shared by every classifier
    carried over from one build (the index stands at the newest snapshot any of them was updated
    to); ``routes`` (each snapshot's routes, oldest first) and ``differ`` (per family, the spans
    where those snapshots' labels differ) are this classifier's own."""

    index: _Index
    numbering: dict[int, _Numbering]
    rulesets: tuple[object, ...]
    eligibility: Eligibility | None
    context: tuple[object, ...]
    routes: tuple[Sequence[Route], ...]
    differ: dict[int, tuple[Span, ...]]


# The indexes an update is moving, by id: an update claims its index here first (``setdefault``
# is one step for the interpreter), so that two threads never move one index; the second builds.
_MOVING: dict[int, object] = {}
# The last classifiers built or updated: a reaction's classifier is where the next one starts.
_RECENT: list[Classifier] = []
_RECENT_SIZE = 2


def _remember(classifier: Classifier) -> None:
    kept = [c for c in _RECENT if c is not classifier][-(_RECENT_SIZE - 1) :]
    _RECENT[:] = [*kept, classifier]


@dataclass(frozen=True, slots=True)
class Classifier:
    """Maps a flow's fields to its class key; built by ``build``.

    ``key`` returns a hashable value equal for flows of one class. Where
    ``exact`` is False the classes are not trusted (``reason`` says why) and
    callers predict per flow.
    """

    src: dict[int, FieldMap]
    dst: dict[int, FieldMap]
    ports: FieldMap
    sport_matters: bool
    marks: tuple[tuple[int, int], ...]
    exact: bool = True
    reason: str = ""
    _lineage: _Lineage | None = field(default=None, compare=False, repr=False)
    _memo: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def packed(self) -> bytes | None:
        """The tables a compiled scan classifies by (``edges/_ctscan.c``), None where they do not fit.

        Native byte order: u32 counts (IPv4 starts, IPv6 starts, port starts, marks) and the
        sport flag; IPv4 starts and classes as u32; IPv6 starts as 16 big-endian bytes and
        classes as u32; port starts and classes as u32; (value, mask) u32 pairs of marks.
        The same source and destination map serves both (``build`` makes them one). Made once
        per classifier, mostly by copying arrays.
        """
        if "packed" in self._memo:
            return self._memo["packed"]  # type: ignore[no-any-return]
        v4, v6 = self.src[AF_INET], self.src[AF_INET6]
        out: bytes | None = None
        fits = all(0 <= m < 1 << 32 for pair in self.marks for m in pair)
        if self.dst[AF_INET] is v4 and self.dst[AF_INET6] is v6 and len(self.marks) <= 63 and fits:
            n4, n6, n_ports = len(v4.starts), len(v6.starts), len(self.ports.starts)
            out = b"".join((
                struct.pack("=5I", n4, n6, n_ports, len(self.marks), int(self.sport_matters)),
                _u32(v4.starts), _u32(v4.classes), v6.wide_starts(), _u32(v6.classes),
                _u32(self.ports.starts), _u32(self.ports.classes),
                *(struct.pack("=2I", value, mask) for value, mask in self.marks),
            ))  # fmt: skip
        self._memo["packed"] = out
        return out

    @property
    def class_count(self) -> int:
        """An upper bound on the classes of addresses and ports (not their product)."""
        fields = (*self.src.values(), *self.dst.values(), self.ports)
        return sum(m.count for m in fields)

    def classes_within(self, prefixes: Iterable[IPv4Network | IPv6Network]) -> frozenset[tuple[int, int]]:
        """(family, class) of every address class with an interval inside one of ``prefixes``.

        Prefixes whose bounds are not boundaries of the map (not harvested) count for every
        class that overlaps them, so the answer never leaves out a class that meets them.
        """
        out: set[tuple[int, int]] = set()
        for net in prefixes:
            family = AF_INET if net.version == 4 else AF_INET6
            fmap = self.dst[family]
            lo, hi = int(net.network_address), int(net.broadcast_address)
            i = bisect_right(fmap.starts, lo) - 1
            while i < len(fmap.starts) and fmap.starts[i] <= hi:
                out.add((family, fmap.classes[i]))
                i += 1
        return frozenset(out)

    def classes_to_judge(self, scope: Impact | None) -> frozenset[tuple[int, int]] | None:
        """The address classes a reaction judges under ``scope`` (``core.impact``): None for every
        class (a full judgement, a change any flow may feel, or a classifier that is not exact),
        else the classes within its prefixes (none for "no flow")."""
        if scope is None or scope.everything or not self.exact:
            return None
        return self.classes_within(scope.prefixes)

    def mark_class(self, mark: int) -> int:
        bits = 1 if mark == 0 else 0
        for i, (value, mask) in enumerate(self.marks, 1):
            if mark & mask == value:
                bits |= 1 << i
        return bits

    def key(  # noqa: PLR0917 - the hot path: positional, in RawEntry's order
        self, family: int, proto: int, src: int, dst: int, sport: int, dport: int, zone: int, mark: int,
        seen_reply: int,
    ) -> tuple[int, ...]:
        ports = self.ports
        return (
            family,
            proto,
            zone,
            seen_reply,
            self.mark_class(mark),
            self.src[family].lookup(src),
            self.dst[family].lookup(dst),
            ports.lookup(dport),
            ports.lookup(sport) if self.sport_matters else -1,
        )

    @classmethod
    def build(
        cls,
        topologies: Sequence[Topology],
        rulesets: Sequence[object],
        eligibility: Eligibility | None = None,
        *,
        sport_matters: bool = True,
        reuse: bool = True,
    ) -> Classifier:
        """The classes that every one of ``topologies`` with every one of ``rulesets`` treats alike.

        With ``reuse``, one of the last classifiers whose snapshots these descend from by route
        changes alone is carried over to them (``updated``): the same classes, at the cost of
        the change instead of the tables. Without, the classifier is built from nothing and not
        remembered (a reference, for tests and benchmarks).
        """
        if reuse:
            for previous in reversed(_RECENT):
                carried = previous.updated(topologies, rulesets, eligibility, sport_matters=sport_matters)
                if carried is not None:
                    _remember(carried)
                    return carried
        built = cls._build(topologies, rulesets, eligibility, sport_matters=sport_matters)
        if reuse:
            _remember(built)
        return built

    def updated(
        self,
        topologies: Sequence[Topology],
        rulesets: Sequence[object],
        eligibility: Eligibility | None = None,
        *,
        sport_matters: bool = True,
        changes: RouteChanges = route_changes,
    ) -> Classifier | None:
        """This classifier carried over to ``topologies`` (the current snapshot, or the previous and
        the current one), equal to ``build(topologies, ...)``; None where it cannot be.

        ``changes(before, now)`` names the routes only in ``before`` and only in ``now`` for two
        snapshots' routes (None: it cannot say). None is returned where anything but routes
        changed, where ``changes`` cannot say what did, or where updates numbered many more
        classes than the build did (a build numbers them afresh).
        """
        lineage = self._lineage
        if (
            lineage is None
            or not 1 <= len(topologies) <= 2
            or sport_matters != self.sport_matters
            or len(rulesets) != len(lineage.rulesets)
            or any(a is not b for a, b in zip(rulesets, lineage.rulesets, strict=True))
            or eligibility != lineage.eligibility
            or lineage.index.generation != _GENERATION[0]
            or any(_context(t) != lineage.context for t in topologies)
        ):
            return None
        routes = tuple(t.routes for t in topologies)
        if len(routes) == len(lineage.routes) and all(map(operator.is_, routes, lineage.routes)):
            return self
        claim = object()
        if _MOVING.setdefault(id(lineage.index), claim) is not claim:
            return None
        try:
            return self._carried(lineage, routes, changes)
        finally:
            del _MOVING[id(lineage.index)]

    def _carried(
        self, lineage: _Lineage, routes: tuple[Sequence[Route], ...], changes: RouteChanges
    ) -> Classifier | None:
        index, newest = lineage.index, routes[-1]
        to_index = changes(index.routes, newest)  # moves the index to the newest snapshot
        to_newest = changes(lineage.routes[-1], newest)  # where this classifier's newest labels change
        to_prev = changes(routes[0], newest) if len(routes) == 2 else ((), ())  # where the two differ
        if to_index is None or to_newest is None or to_prev is None:
            return None
        now_groups = _regrouped(index.group, *to_index)
        if now_groups is None:
            return None

        def now_group(key: GroupKey) -> tuple[Route, ...]:
            found = now_groups.get(key)
            return index.group(key) if found is None else found

        prev_groups = _regrouped(now_group, to_prev[1], to_prev[0])  # the newest, with to_prev undone
        if prev_groups is None:
            return None
        label = {key: index.label(group) if group else None for key, group in now_groups.items()}
        over_now: dict[int, dict[int, dict[Span, int | None]]] = {AF_INET: {}, AF_INET6: {}}
        for (family, table, lo, hi), number in label.items():
            over_now[family].setdefault(table, {})[(lo, hi)] = number
        over_prev = {f: {t: dict(spans) for t, spans in tables.items()} for f, tables in over_now.items()}
        for (family, table, lo, hi), group in prev_groups.items():
            over_prev[family].setdefault(table, {})[(lo, hi)] = index.label(group) if group else None
        keys_new = {_group_key(r) for r in itertools.chain(*to_newest)}
        keys_prev = set(prev_groups)
        src, dst = dict(self.src), dict(self.dst)
        differ: dict[int, tuple[Span, ...]] = {}
        for family in (AF_INET, AF_INET6):
            numbering = lineage.numbering[family]
            if len(numbering.sigs) > _GROWTH * numbering.built + 4096:
                return None
            new = [k for k in keys_new if k[0] == family]
            prev = [k for k in keys_prev if k[0] == family]
            differ[family] = tuple(_merged((k[2], k[3]) for k in prev))
            regions = _merged([*lineage.differ.get(family, ()), *((k[2], k[3]) for k in (*new, *prev))])
            if not regions:
                continue
            tables = index.tables[family]
            before = _View(tables, over_prev[family]) if len(routes) == 2 else None
            fmap = _patched(
                self.src[family], numbering, _BITS[family], regions, _View(tables, over_now[family]), before,
                sorted({k[1] for k in (*new, *prev)}), sorted({k[1] for k in prev}),
            )  # fmt: skip
            src[family] = dst[family] = fmap
        for key, group in now_groups.items():
            family, table, lo, hi = key
            t = index.tables[family].setdefault(table, _Table(family == AF_INET6))
            number = label[key]
            if number is None:
                t.remove((lo, hi))
                if not t.labels:
                    del index.tables[family][table]
            else:
                t.put((lo, hi), group, number)
        index.routes = newest
        carried = dataclasses.replace(lineage, routes=routes, differ=differ)
        return Classifier(src, dst, self.ports, self.sport_matters, self.marks, self.exact, self.reason,
                          carried)  # fmt: skip

    @classmethod
    def _build(
        cls,
        topologies: Sequence[Topology],
        rulesets: Sequence[object],
        eligibility: Eligibility | None,
        *,
        sport_matters: bool,
    ) -> Classifier:
        if len(_LABEL_IDS) > _LABEL_IDS_LIMIT:
            _forget_labels()
        harvest = _Harvest.empty()
        for family, specials in ((AF_INET, _SPECIAL_V4), (AF_INET6, _SPECIAL_V6)):
            for text in specials:
                net: IPv4Network | IPv6Network = (
                    IPv4Network(text) if family == AF_INET else IPv6Network(text)
                )
                harvest.address(int(net.network_address), int(net.broadcast_address), net.version)
        for ruleset in rulesets:
            harvest.merge(_memo(ruleset, "ruleset", lambda r: _harvested(lambda h: _walk(r, h))))
        for topology in topologies:
            harvest.merge(_memo(topology, "topology", _topology_harvested))
        marks: list[tuple[int, int]] = []
        if eligibility is not None:
            _walk(tuple(_eligibility_addresses(eligibility)), harvest)
            marks = list(dict.fromkeys(_eligibility_marks(eligibility)))
        indexes = [_Index.of(t) for t in topologies]
        numbering = {AF_INET: _Numbering(), AF_INET6: _Numbering()}
        src: dict[int, FieldMap] = {}
        dst: dict[int, FieldMap] = {}
        differ: dict[int, tuple[Span, ...]] = {}
        for family in (AF_INET, AF_INET6):
            snapshots = [index.tables[family] for index in indexes]
            fmap, differ[family] = _address_map(_BITS[family], harvest.addresses[family], snapshots,
                                                numbering[family])  # fmt: skip
            src[family] = dst[family] = fmap
        ports = _field_map(16, harvest.ports)
        lineage = None
        if topologies:
            context = _context(topologies[-1])
            if all(_context(t) == context for t in topologies[:-1]):
                lineage = _Lineage(indexes[-1], numbering, tuple(rulesets), eligibility, context,
                                   tuple(t.routes for t in topologies), differ)  # fmt: skip
        return cls(
            src=src,
            dst=dst,
            ports=ports,
            sport_matters=sport_matters,
            marks=tuple(marks),
            exact=not harvest.inexact,
            reason="; ".join(dict.fromkeys(harvest.inexact)),
            _lineage=lineage,
        )


def _eligibility_addresses(eligibility: Eligibility) -> Iterator[object]:
    yield eligibility.sources
    yield eligibility.destinations
    for alt in eligibility.alternatives:
        yield from _eligibility_addresses(alt)


def _eligibility_marks(eligibility: Eligibility) -> Iterator[tuple[int, int]]:
    yield from eligibility.marks or ()
    for alt in eligibility.alternatives:
        yield from _eligibility_marks(alt)
