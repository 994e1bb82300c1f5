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
import struct
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from topowatch.core.eligibility import Eligibility
from topowatch.core.model import AF_INET, AF_INET6, Link, Route, RouteType, Topology

# Questions the FIB and source selection ask of any address, whatever the configuration.
_SPECIAL_V4 = ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "255.255.255.255/32")
_SPECIAL_V6 = (
    "::/128", "::1/128", "::ffff:0:0/96", "::/96", "2002::/16", "3ffe::/16", "2001::/32", "2001:10::/28",
    "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
)  # fmt: skip

_BITS = {AF_INET: 32, AF_INET6: 128}
_PORT_MAX = 0xFFFF


class Inexact(Exception):
    """A question the classes cannot answer by intervals (raised while harvesting)."""


@dataclass(frozen=True, slots=True)
class FieldMap:
    """One field's classes: ``starts`` sorted, ``classes[i]`` holds for [starts[i], starts[i+1])."""

    starts: tuple[int, ...]
    classes: tuple[int, ...]
    count: int  # distinct classes

    def lookup(self, value: int) -> int:
        return self.classes[bisect_right(self.starts, value) - 1]


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
    events: dict[int, list[tuple[int, int]]] = {}  # point -> [(kind, id)]: kind 1 open, 0 close
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
    # Per table: prefix intervals, sorted so that a sweep can keep a stack.
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
            for kind, ident in changes:
                if kind == 0:
                    active.discard(ident)
            for kind, ident in changes:
                if kind == 1:
                    active.add(ident)
            members = frozenset(active)
        labels: list[object] = []
        for t, ordered in enumerate(tables):
            stack = stacks[t]
            while stack and stack[-1][0] < point:
                stack.pop()
            while cursors[t] < len(ordered) and ordered[cursors[t]][0] <= point:
                lo, hi, label = ordered[cursors[t]]
                cursors[t] += 1
                if hi >= point:
                    stack.append((hi, label))  # prefixes nest: the narrowest is on top
            labels.append(stack[-1][1] if stack else None)
        signature = (members, *labels)
        number = numbers.setdefault(signature, len(numbers))
        if classes and classes[-1] == number:
            continue
        starts.append(point)
        classes.append(number)
    return FieldMap(tuple(starts), tuple(classes), len(numbers))


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
    route: Route, links: dict[int, Link], oif_addresses: dict[int, tuple[object, ...]]
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


def _table_routes(topology: Topology, family: int) -> list[list[tuple[int, int, object]]]:
    """Per (table), the labelled prefix intervals of ``family``'s routes (grouped per prefix)."""
    v4_by_oif: dict[int, list[object]] = {}
    for a in topology.addresses:
        v4_by_oif.setdefault(a.ifindex, []).append(a)
    oif_addresses = {k: tuple(v) for k, v in v4_by_oif.items()}
    groups: dict[tuple[int, int, int], list[Route]] = {}
    for route in topology.routes:
        if route.family != family:
            continue
        key = (route.table, int(route.dst.network_address), int(route.dst.broadcast_address))
        groups.setdefault(key, []).append(route)
    tables: dict[int, list[tuple[int, int, object]]] = {}
    links = {link.index: link for link in topology.links}
    # Labels are remembered per Route object while the links and addresses they read stay the
    # same: a snapshot kept from events shares its unchanged routes with the one before.
    context = (topology.links, topology.addresses)
    if _LABELS.get("context") != context or len(_LABELS) > 4 * len(topology.routes) + 16:
        _LABELS.clear()
        _LABELS["context"] = context
    for (table, lo, hi), routes in groups.items():
        if len(routes) > 1:
            routes.sort(key=_route_order)  # stable: dump order among equals, as the FIB keeps it
        labels = []
        for r in routes:
            hit = _LABELS.get(id(r))
            if hit is None or hit[0] is not r:
                label = _route_label(r, links, oif_addresses)
                hit = _LABELS[id(r)] = (r, _LABEL_IDS.setdefault(label, next(_NUMBERS)))
            labels.append(hit[1])
        group = labels[0] if len(labels) == 1 else _LABEL_IDS.setdefault(tuple(labels), next(_NUMBERS))
        tables.setdefault(table, []).append((lo, hi, group))
    return [tables[t] for t in sorted(tables)]


# Route labels by id(route): (route, label number), and "context": the links and addresses they
# read. Labels are numbered once (``_LABEL_IDS``, which only grows: a number never changes its
# meaning while any remembered map uses it), so the sweep hashes small ints, not routes.
_LABELS: dict[object, Any] = {}
_LABEL_IDS: dict[object, int] = {}
_LABEL_IDS_LIMIT = 1 << 20
# Numbers are drawn from one counter and never reused, so two builds in two threads can never
# give one number to two labels (``setdefault`` keeps the first insertion of a label).
_NUMBERS = itertools.count()


def _forget_labels() -> None:
    """Drop every remembered label and map together (their numbers go with them)."""
    _LABELS.clear()
    _LABEL_IDS.clear()
    _MEMO.clear()


def _route_order(route: Route) -> tuple[int, int]:
    return (-route.tos, route.metric)


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

    def packed(self) -> bytes | None:
        """The tables a compiled scan classifies by (``edges/_ctscan.c``), None where they do not fit.

        Native byte order: u32 counts (IPv4 starts, IPv6 starts, port starts, marks) and the
        sport flag; IPv4 starts and classes as u32; IPv6 starts as 16 big-endian bytes and
        classes as u32; port starts and classes as u32; (value, mask) u32 pairs of marks.
        The same source and destination map serves both (``build`` makes them one).
        """
        v4, v6 = self.src[AF_INET], self.src[AF_INET6]
        if self.dst[AF_INET] is not v4 or self.dst[AF_INET6] is not v6 or len(self.marks) > 63:
            return None
        if any(not 0 <= m < 1 << 32 for pair in self.marks for m in pair):
            return None
        n4, n6, n_ports = len(v4.starts), len(v6.starts), len(self.ports.starts)
        out = bytearray(struct.pack("=5I", n4, n6, n_ports, len(self.marks), int(self.sport_matters)))
        out += struct.pack(f"={n4}I", *v4.starts) + struct.pack(f"={n4}I", *v4.classes)
        out += b"".join(s.to_bytes(16, "big") for s in v6.starts) + struct.pack(f"={n6}I", *v6.classes)
        out += struct.pack(f"={n_ports}I", *self.ports.starts)
        out += struct.pack(f"={n_ports}I", *self.ports.classes)
        for value, mask in self.marks:
            out += struct.pack("=2I", value, mask)
        return bytes(out)

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
    ) -> Classifier:
        """The classes that every one of ``topologies`` with every one of ``rulesets`` treats alike."""
        return cls._build(topologies, rulesets, eligibility, sport_matters=sport_matters)

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
        src: dict[int, FieldMap] = {}
        dst: dict[int, FieldMap] = {}
        for family in (AF_INET, AF_INET6):
            labelled: list[list[tuple[int, int, object]]] = []
            for topology in topologies:
                routes = functools.partial(_table_routes, family=family)
                labelled += _memo(topology, f"routes{family}", routes)
            fmap = _field_map(_BITS[family], harvest.addresses[family], labelled)
            src[family] = dst[family] = fmap
        ports = _field_map(16, harvest.ports)
        return cls(
            src=src,
            dst=dst,
            ports=ports,
            sport_matters=sport_matters,
            marks=tuple(marks),
            exact=not harvest.inexact,
            reason="; ".join(dict.fromkeys(harvest.inexact)),
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
