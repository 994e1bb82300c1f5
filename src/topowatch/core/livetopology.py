# SPDX-License-Identifier: GPL-2.0-or-later
"""The topology kept up to date from rtnetlink events, so a reaction need not re-read it.

Theory of operation: a full dump seeds the state; every later event is
applied to it, as the kernel applied the change. Application is per key and
last-writer-wins (a route by table, prefix, TOS and metric; a rule by its
whole value; a link by index), so events that the dump already reflected can
be applied again without harm: the state after the last event equals the
kernel's whatever the dump saw of the ones before.

Where the kernel changes more than it announces, the state says it is no
longer trusted (``apply`` returns False) and the caller re-reads everything:

- a link removed or taken down (the kernel flushes its IPv4 routes without
  telling), an IPv4 address removed (routes through it go silently);
- a route that appends or prepends beside an existing one (NLM_F_APPEND,
  or a new route whose key is taken without NLM_F_REPLACE), any IPv6 route
  with several nexthops or whose key holds one (siblings are announced in
  ways a key cannot follow), a route that names a nexthop object;
- nexthop objects themselves.

An address added or changed, or an IPv6 address removed (whose routes go
with announcements), asks only for the cheap part to be read again
(``addresses_stale``: links, addresses and rules, not the routes): the order
of a device's addresses decides source selection, and only a dump shows it.

Every snapshot remembers which routes changed since the one before it
(``route_changes``), by the identity of its routes tuple (which a
``dataclasses.replace`` of the snapshot keeps): a reader of two snapshots of
one lineage learns the routes that differ without comparing the tables
(``core.classify`` updates its classes from them, ``core.impact`` its prefixes).

This module is pure: it never performs I/O. It never guesses: what it cannot
follow exactly it gives up on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from topowatch.core.model import AF_INET6, Address, Link, PolicyRule, Route, RouteList, Topology

NLM_F_REPLACE = 0x100
NLM_F_APPEND = 0x800

RouteKey = tuple[object, ...]


def route_key(route: Route) -> RouteKey:
    """The key the kernel's FIB keeps one route under.

    IPv4 (fib_alias): table, prefix, TOS and metric. IPv6 (fib6_info): table, prefix and metric,
    and routes through other devices or gateways live beside each other, so the nexthops and
    type are part of the key; ``base_key`` is the part a replace matches on.
    """
    if route.family == AF_INET6:
        hops = tuple((nh.oif, nh.gateway) for nh in route.nexthops)
        return (route.family, route.table, route.dst, route.metric, route.type, hops)
    return (route.family, route.table, route.dst, route.tos, route.metric)


def base_key(route: Route) -> RouteKey:
    return (route.family, route.table, route.dst, route.tos, route.metric)


# The lineage of the last snapshots handed out, by id() of their routes tuple: (that tuple, its
# parent's, {key: (route before, route after)}). Each entry holds its tuple, so an id is never
# reused while it is here; the oldest go first (a reaction reads the last two).
Changes = dict[RouteKey, tuple[Route | None, Route | None]]
# Routes per chunk of a snapshot's ``RouteList``: a route event rebuilds one chunk.
CHUNK = 512
_LINEAGE: dict[int, tuple[Sequence[Route], Sequence[Route], Changes]] = {}
_LINEAGE_SIZE = 6


def _descend(parent: Sequence[Route], child: Sequence[Route], changes: Changes) -> None:
    while len(_LINEAGE) >= _LINEAGE_SIZE:
        _LINEAGE.pop(next(iter(_LINEAGE)), None)
    _LINEAGE[id(child)] = (child, parent, changes)


def route_changes(
    before: Sequence[Route], now: Sequence[Route]
) -> tuple[tuple[Route, ...], tuple[Route, ...]] | None:
    """The routes only in ``before`` and only in ``now``, for the routes of two snapshots of one
    lineage (``now`` handed out after ``before``); None when the lineage does not join them.

    The answer equals ``model.changed_routes(before, now)`` and costs the changes, not the table.
    """
    if before is now:
        return (), ()
    steps: list[Changes] = []
    current: Sequence[Route] = now
    while current is not before:
        step = _LINEAGE.get(id(current))
        if step is None or step[0] is not current or len(steps) >= _LINEAGE_SIZE:
            return None
        steps.append(step[2])
        current = step[1]
    net: dict[RouteKey, list[Route | None]] = {}
    for changes in reversed(steps):
        for key, (old, new) in changes.items():
            net.setdefault(key, [old, None])[1] = new
    gone = tuple(old for old, new in net.values() if old is not None and old != new)
    came = tuple(new for old, new in net.values() if new is not None and new != old)
    return gone, came


@dataclass(slots=True)
class LiveTopology:
    """A mutable topology fed by events; ``snapshot()`` gives the immutable value the core reads."""

    links: dict[int, Link] = field(default_factory=dict)
    addresses: list[Address] = field(default_factory=list)
    routes: dict[RouteKey, Route] = field(default_factory=dict)
    rules: list[PolicyRule] = field(default_factory=list)
    applied: int = 0  # events applied since the seeding dump
    _base: Topology = field(default_factory=Topology)  # the last read: fields not kept from events
    # Links, addresses and rules must be read again (``refresh``) before the next snapshot.
    addresses_stale: bool = False
    _snapshot: Topology | None = None
    # The routes before their first change since the last snapshot, by key (None: absent then),
    # and the routes of that snapshot (the parent of the next one in ``route_changes``).
    _touched: dict[RouteKey, Route | None] = field(default_factory=dict)
    _handed: Sequence[Route] | None = None
    # The keys of the IPv6 routes per ``base_key`` (a replace looks them up: no table scan).
    _bases: dict[RouteKey, list[RouteKey]] = field(default_factory=dict)
    # The routes in ``routes``' order, as slots (None: a route removed) in chunks of ``CHUNK``:
    # a snapshot rebuilds only the chunks changed since the last one (``RouteList``).
    _slot: dict[RouteKey, int] = field(default_factory=dict)
    _slots: list[Route | None] = field(default_factory=list)
    _chunks: list[tuple[Route, ...]] = field(default_factory=list)
    _dirty: set[int] = field(default_factory=set)
    _holes: int = 0

    @classmethod
    def seed(cls, topology: Topology) -> LiveTopology | None:
        """The state of a dump; None when the dump holds what keys cannot follow (duplicate keys)."""
        routes: dict[RouteKey, Route] = {}
        for route in topology.routes:
            key = route_key(route)
            if key in routes:
                return None  # appended aliases: only a dump can follow them
            routes[key] = route
        state = cls({link.index: link for link in topology.links}, list(topology.addresses), routes,
                    list(topology.rules))  # fmt: skip
        state._base = topology
        state._lay_out()
        # The dump's routes as the chunks the next snapshots share (``RouteList``): their readers
        # (the snapshot file's encoder, by identity) then meet the same chunk objects again.
        state._snapshot = dataclasses.replace(topology, routes=RouteList(state._chunks))
        state._handed = state._snapshot.routes
        for key, route in routes.items():
            if route.family == AF_INET6:
                state._bases.setdefault(base_key(route), []).append(key)
        return state

    def snapshot(self) -> Topology:
        """The current topology: links, addresses, routes, rules kept here; any other field as last read."""
        if self._snapshot is None:
            self._snapshot = dataclasses.replace(
                self._base,
                links=tuple(self.links.values()),
                addresses=tuple(self.addresses),
                routes=self._route_list(),
                rules=tuple(self.rules),
            )
            routes = self.routes
            changes = {k: (old, routes.get(k)) for k, old in self._touched.items() if old != routes.get(k)}
            self._touched.clear()
            if self._handed is not None:
                _descend(self._handed, self._snapshot.routes, changes)
            self._handed = self._snapshot.routes
        return self._snapshot

    def _lay_out(self) -> None:
        """The slots and chunks afresh from ``routes`` (its order; no holes)."""
        routes = list(self.routes.values())
        self._slots = list(routes)
        self._slot = {key: i for i, key in enumerate(self.routes)}
        self._chunks = [tuple(routes[i : i + CHUNK]) for i in range(0, len(routes), CHUNK)]
        self._dirty.clear()
        self._holes = 0

    def _route_list(self) -> RouteList:
        """The routes as a ``RouteList``: the chunks changed since the last one rebuilt, the others shared."""
        if self._holes > CHUNK and self._holes * 2 > len(self._slots):
            self._lay_out()  # mostly holes: closed up (order kept)
        slots, chunks = self._slots, self._chunks
        for c in sorted(self._dirty):
            chunk = tuple(r for r in slots[c * CHUNK : (c + 1) * CHUNK] if r is not None)
            if c < len(chunks):
                chunks[c] = chunk
            else:
                chunks.extend(() for _ in range(c - len(chunks)))
                chunks.append(chunk)
        self._dirty.clear()
        return RouteList(chunks)

    def _put(self, key: RouteKey, route: Route) -> None:
        """Set the route of ``key``, remembering the one the last snapshot had (``route_changes``)."""
        old = self.routes.get(key)
        self._touched.setdefault(key, old)
        self.routes[key] = route
        slot = self._slot.get(key)
        if slot is None:  # a new key goes last, as in ``routes``
            slot = self._slot[key] = len(self._slots)
            self._slots.append(route)
        else:
            self._slots[slot] = route
        self._dirty.add(slot // CHUNK)
        if route.family == AF_INET6 and old is None:
            self._bases.setdefault(base_key(route), []).append(key)
        self._changed()

    def _drop(self, key: RouteKey) -> None:
        old = self.routes.pop(key)
        slot = self._slot.pop(key)
        self._slots[slot] = None
        self._holes += 1
        self._dirty.add(slot // CHUNK)
        self._touched.setdefault(key, old)
        if old.family == AF_INET6:
            keys = self._bases[base_key(old)]
            keys.remove(key)
            if not keys:
                del self._bases[base_key(old)]
        self._changed()

    def apply(
        self, kind: str, new: bool, value: object, flags: int = 0, nexthop_object: bool = False
    ) -> bool:
        """Apply one event (``kind`` link/address/route/rule/nexthop); False: re-read everything."""
        self.applied += 1
        if kind == "link" and isinstance(value, Link):
            return self._link(new, value)
        if kind == "route" and isinstance(value, Route):
            if nexthop_object:
                return False
            return self._route(new, value, flags)
        if kind == "rule" and isinstance(value, PolicyRule):
            return self._rule(new, value)
        if kind == "address" and isinstance(value, Address):
            if not new and value.family != AF_INET6:
                return False  # IPv4 routes through it are flushed unannounced
            self.addresses_stale = True
            return True
        return False  # nexthop objects, anything else: only a dump is exact

    def refresh(self, cheap: Topology) -> None:
        """Take links, addresses and rules from ``cheap`` (a dump without routes); routes stay."""
        self.links = {link.index: link for link in cheap.links}
        self.addresses = list(cheap.addresses)
        self.rules = list(cheap.rules)
        self._base = cheap
        self.addresses_stale = False
        self._changed()

    def _changed(self) -> None:
        self._snapshot = None

    def _link(self, new: bool, link: Link) -> bool:
        old = self.links.get(link.index)
        if not new or (old is not None and old.up and not link.up):
            return False
        if old != link:
            self.links[link.index] = link
            self._changed()
        return True

    def _route(self, new: bool, route: Route, flags: int) -> bool:
        key = route_key(route)
        old = self.routes.get(key)
        if route.family == AF_INET6:
            return self._route6(new, route, key, old, flags)
        if not new:
            if old is None:
                return True  # already gone (the dump saw it leave)
            if old.type != route.type or old.nexthops != route.nexthops:
                return False  # a delete naming another alias of the key: aliases we do not follow
            self._drop(key)
            return True
        if flags & NLM_F_APPEND:
            return False
        if old is not None and old != route and not flags & NLM_F_REPLACE:
            return False  # prepended beside the existing route
        if old != route:
            self._put(key, route)
        return True

    def _route6(self, new: bool, route: Route, key: RouteKey, old: Route | None, flags: int) -> bool:
        if len(route.nexthops) > 1:
            return False  # multipath: siblings come and go in ways a key cannot follow
        base = base_key(route)
        same_base = list(self._bases.get(base, ()))
        if not new:
            if old is None:
                return not same_base  # another route of the key may be the one deleted
            self._drop(key)
            return True
        if flags & NLM_F_APPEND:
            return False
        gateway = any(nh.gateway is not None for nh in route.nexthops)
        others = [k for k in same_base if k != key]
        if flags & NLM_F_REPLACE:
            if len(others) > 1 or (others and old is not None):
                return False
            for k in others:
                self._drop(k)
        elif gateway and any(any(nh.gateway is not None for nh in self.routes[k].nexthops) for k in others):
            return False  # becomes a sibling of a gateway route: the kernel merges them
        if old != route or others:
            self._put(key, route)
        return True

    def _rule(self, new: bool, rule: PolicyRule) -> bool:
        if new:
            if rule not in self.rules:
                self.rules.append(rule)  # the kernel adds after the rules of equal priority
                self._changed()
            return True
        if rule in self.rules:
            self.rules.remove(rule)
            self._changed()
            return True
        return True  # already gone
