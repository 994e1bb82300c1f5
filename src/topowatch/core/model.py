# SPDX-License-Identifier: GPL-2.0-or-later
"""Topology values: links, addresses, routes, policy rules, as the kernel has them.

Theory of operation: an edge dumps the kernel's tables into these frozen values
and bundles them in a ``Topology`` snapshot. Everything downstream (FIB lookup,
NAT prediction, decisions) reads snapshots only; two snapshots compare with
``diff`` to say in words what changed.

Rules:
- values are frozen, slotted, built over ``ipaddress`` objects; constructors
  normalise (a route's ``dst`` is always a network, nexthops a tuple);
- list order is the kernel's dump order where it carries meaning (an
  interface's addresses: the first primary address is the kernel's choice);
- this module never performs I/O and never guesses a field it was not given.
"""

from __future__ import annotations

import bisect
import enum
import itertools
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_network,
)
from typing import TYPE_CHECKING, overload

if TYPE_CHECKING:  # core.xfrm imports this module at run time
    from topowatch.core.xfrm import XfrmPolicy, XfrmState

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

AF_INET = 2
AF_INET6 = 10

# Routing scopes (rtnetlink RT_SCOPE_*).
SCOPE_UNIVERSE = 0
SCOPE_SITE = 200
SCOPE_LINK = 253
SCOPE_HOST = 254
SCOPE_NOWHERE = 255

# Routing tables with well-known ids.
TABLE_UNSPEC = 0
TABLE_DEFAULT = 253
TABLE_MAIN = 254
TABLE_LOCAL = 255

# Address flags (IFA_F_*).
IFA_F_SECONDARY = 0x01
IFA_F_NODAD = 0x02
IFA_F_OPTIMISTIC = 0x04
IFA_F_DADFAILED = 0x08
IFA_F_HOMEADDRESS = 0x10
IFA_F_DEPRECATED = 0x20
IFA_F_TENTATIVE = 0x40
IFA_F_PERMANENT = 0x80


class RouteType(enum.IntEnum):
    """rtnetlink RTN_* route types."""

    UNSPEC = 0
    UNICAST = 1
    LOCAL = 2
    BROADCAST = 3
    ANYCAST = 4
    MULTICAST = 5
    BLACKHOLE = 6
    UNREACHABLE = 7
    PROHIBIT = 8
    THROW = 9
    NAT = 10
    XRESOLVE = 11


class RuleAction(enum.IntEnum):
    """FIB rule actions (FR_ACT_*)."""

    UNSPEC = 0
    TO_TBL = 1
    GOTO = 2
    NOP = 3
    BLACKHOLE = 6
    UNREACHABLE = 7
    PROHIBIT = 8


def family_of(addr: IPAddress | IPNetwork) -> int:
    """AF_INET or AF_INET6 for an address or network."""
    return AF_INET if addr.version == 4 else AF_INET6


@dataclass(frozen=True, slots=True)
class Link:
    """A network interface. ``up`` is IFF_UP; ``running`` is IFF_RUNNING (carrier)."""

    index: int
    name: str
    up: bool = True
    running: bool = True
    kind: str = ""
    master: int = 0

    def __post_init__(self) -> None:
        if self.index <= 0:
            raise ValueError(f"Link.index must be positive, got {self.index}")
        if not self.name:
            raise ValueError("Link.name must not be empty")


@dataclass(frozen=True, slots=True)
class Address:
    """An interface address with its prefix length (IFA_LOCAL / IFA_ADDRESS)."""

    ifindex: int
    address: IPAddress
    prefixlen: int
    scope: int = SCOPE_UNIVERSE
    flags: int = 0
    peer: IPAddress | None = None

    def __post_init__(self) -> None:
        limit = 32 if self.address.version == 4 else 128
        if not 0 <= self.prefixlen <= limit:
            raise ValueError(f"Address.prefixlen {self.prefixlen} out of range for {self.address}")

    @property
    def family(self) -> int:
        return family_of(self.address)

    @property
    def network(self) -> IPNetwork:
        base = self.peer if self.peer is not None else self.address
        return ip_network(f"{base}/{self.prefixlen}", strict=False)

    @property
    def secondary(self) -> bool:
        return bool(self.flags & IFA_F_SECONDARY)

    @property
    def usable(self) -> bool:
        """False for addresses the kernel will not pick as a source (v6 tentative, dad failed)."""
        return not self.flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED)


@dataclass(frozen=True, slots=True)
class Nexthop:
    """One nexthop of a route: output interface and optional gateway."""

    oif: int
    gateway: IPAddress | None = None
    weight: int = 1


@dataclass(frozen=True, slots=True)
class Route:
    """A route in one table. ``dst`` is a network (0.0.0.0/0 for default)."""

    dst: IPNetwork
    table: int = TABLE_MAIN
    type: RouteType = RouteType.UNICAST
    nexthops: tuple[Nexthop, ...] = ()
    metric: int = 0
    prefsrc: IPAddress | None = None
    scope: int = SCOPE_UNIVERSE
    tos: int = 0
    protocol: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.nexthops, tuple):
            object.__setattr__(self, "nexthops", tuple(self.nexthops))
        object.__setattr__(self, "type", RouteType(self.type))

    @property
    def family(self) -> int:
        return family_of(self.dst)

    def describe(self, names: dict[int, str] | None = None) -> str:
        """One line in `ip route` words: "default via 10.0.2.1 dev up1 table main"."""
        names = names or {}
        dst = "default" if self.dst.prefixlen == 0 else str(self.dst)
        parts: list[str] = []
        if self.type != RouteType.UNICAST:
            parts.append(self.type.name.lower())
        parts.append(dst)
        for nh in self.nexthops:
            if len(self.nexthops) > 1:
                parts.append("nexthop")
            if nh.gateway is not None:
                parts.append(f"via {nh.gateway}")
            parts.append(f"dev {names.get(nh.oif, f'if{nh.oif}')}")
        if self.table != TABLE_MAIN:
            parts.append(f"table {table_name(self.table)}")
        if self.metric:
            parts.append(f"metric {self.metric}")
        return " ".join(parts)


def table_name(table: int) -> str:
    return {TABLE_MAIN: "main", TABLE_LOCAL: "local", TABLE_DEFAULT: "default"}.get(table, str(table))


@dataclass(frozen=True, slots=True)
class PolicyRule:
    """An `ip rule`. Selectors left as None match anything.

    ``unmodelled`` names selectors present in the kernel's rule that the FIB
    does not evaluate (ipproto, sport, dport, uidrange, l3mdev, ...): a lookup
    that reaches such a rule answers "unknown".
    """

    family: int
    priority: int
    action: RuleAction = RuleAction.TO_TBL
    table: int = TABLE_UNSPEC
    src: IPNetwork | None = None
    dst: IPNetwork | None = None
    iifname: str | None = None
    oifname: str | None = None
    fwmark: int | None = None
    fwmask: int | None = None
    tos: int = 0
    goto: int | None = None
    suppress_prefixlen: int | None = None
    suppress_ifgroup: int | None = None
    invert: bool = False
    unmodelled: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.family not in (AF_INET, AF_INET6):
            raise ValueError(f"PolicyRule.family must be AF_INET or AF_INET6, got {self.family}")
        object.__setattr__(self, "action", RuleAction(self.action))

    def describe(self) -> str:
        parts = [f"{self.priority}:"]
        if self.invert:
            parts.append("not")
        parts.append(f"from {self.src}" if self.src is not None else "from all")
        if self.dst is not None:
            parts.append(f"to {self.dst}")
        if self.fwmark is not None:
            mask = f"/{self.fwmask:#x}" if self.fwmask not in (None, 0xFFFFFFFF) else ""
            parts.append(f"fwmark {self.fwmark:#x}{mask}")
        if self.iifname:
            parts.append(f"iif {self.iifname}")
        if self.oifname:
            parts.append(f"oif {self.oifname}")
        if self.action == RuleAction.TO_TBL:
            parts.append(f"lookup {table_name(self.table)}")
        elif self.action == RuleAction.GOTO:
            parts.append(f"goto {self.goto}")
        else:
            parts.append(self.action.name.lower())
        if self.suppress_prefixlen is not None:
            parts.append(f"suppress_prefixlength {self.suppress_prefixlen}")
        return " ".join(parts)


def default_rules(family: int) -> tuple[PolicyRule, ...]:
    """The rules a fresh namespace has: local (0), main (32766), default (32767; v4 only)."""
    rules = [
        PolicyRule(family, 0, table=TABLE_LOCAL),
        PolicyRule(family, 32766, table=TABLE_MAIN),
    ]
    if family == AF_INET:
        rules.append(PolicyRule(family, 32767, table=TABLE_DEFAULT))
    return tuple(rules)


@dataclass(frozen=True, slots=True)
class Netconf:
    """The IPv4 reverse-path settings of one interface, or of ``all`` or ``default``.

    As ``/proc/sys/net/ipv4/conf/NAME/`` has them: ``rp_filter`` 0 off, 1
    strict, 2 loose; ``src_valid_mark`` lets the reverse-path lookup use the
    packet mark. The kernel applies the larger ``rp_filter`` of ``all`` and
    the interface, and ``src_valid_mark`` if either has it.
    """

    name: str
    rp_filter: int = 0
    src_valid_mark: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("Netconf.name must not be empty")
        if self.rp_filter not in (0, 1, 2):
            raise ValueError(f"Netconf.rp_filter of {self.name} must be 0, 1 or 2, got {self.rp_filter}")


# rp_filter values (net.ipv4.conf.*.rp_filter).
RP_FILTER_OFF = 0
RP_FILTER_STRICT = 1
RP_FILTER_LOOSE = 2


class RouteList(Sequence[Route]):
    """An immutable sequence of routes held in chunks: the routes of a kept topology's snapshot.

    A route event changes one chunk; the next snapshot shares every other chunk with this one, so
    it costs the chunk, not the table (a tuple of 100,000 routes costs 1-2 ms to build here). It
    reads, compares and hashes as the tuple of its routes."""

    __slots__ = ("_chunks", "_len", "_starts")

    def __init__(self, chunks: Sequence[tuple[Route, ...]]) -> None:
        self._chunks = tuple(chunks)
        self._len = sum(map(len, self._chunks))
        self._starts: list[int] | None = None

    @property
    def chunks(self) -> tuple[tuple[Route, ...], ...]:
        """The chunks, some empty: shared by identity with the snapshots before where unchanged."""
        return self._chunks

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Route]:
        return itertools.chain.from_iterable(self._chunks)

    def __reversed__(self) -> Iterator[Route]:
        return itertools.chain.from_iterable(map(reversed, reversed(self._chunks)))

    @overload
    def __getitem__(self, index: int) -> Route: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[Route, ...]: ...
    def __getitem__(self, index: int | slice) -> Route | tuple[Route, ...]:
        if isinstance(index, slice):
            return tuple(self)[index]
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError("RouteList index out of range")
        if self._starts is None:
            self._starts = list(itertools.accumulate((len(c) for c in self._chunks), initial=0))
        # The last chunk starting at or before ``index``: an empty chunk shares its start with the
        # next one, so bisect_right passes over it (the chunk found holds ``index``).
        at = bisect.bisect_right(self._starts, index) - 1
        return self._chunks[at][index - self._starts[at]]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RouteList):
            if self._len != other._len:
                return False
            if len(self._chunks) == len(other._chunks) and all(
                    map(operator.is_, self._chunks, other._chunks)):
                return True
            return all(map(operator.eq, self, other))
        if isinstance(other, tuple):
            return self._len == len(other) and all(map(operator.eq, self, other))
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __add__(self, other: Sequence[Route]) -> tuple[Route, ...]:
        return (*self, *other)

    def __repr__(self) -> str:
        return repr(tuple(self))

    def __reduce__(self) -> tuple[type[RouteList], tuple[tuple[tuple[Route, ...], ...]]]:
        return (RouteList, (self._chunks,))


@dataclass(frozen=True, slots=True)
class Topology:
    """A snapshot of one namespace's routing state.

    ``routes`` is a tuple, or a ``RouteList`` (a kept topology's snapshot: the same routes in the
    same order, shared in chunks with the snapshot before it)."""

    links: tuple[Link, ...] = ()
    addresses: tuple[Address, ...] = ()
    routes: Sequence[Route] = ()
    rules: tuple[PolicyRule, ...] = ()
    # Filled by the xfrm edge; opaque to the FIB, read by ``core.xfrm``. ``xfrm_known``
    # says they were read: only then does an empty table mean "no IPsec".
    xfrm_policies: tuple[XfrmPolicy, ...] = field(default=())
    xfrm_states: tuple[XfrmState, ...] = field(default=())
    xfrm_known: bool = False
    # IPv4 reverse-path settings (``all``, ``default`` and per interface). ``netconf_known``
    # says they were read; a topology that does not know them (built by hand) is strict.
    netconf: tuple[Netconf, ...] = field(default=())
    netconf_known: bool = False

    def __post_init__(self) -> None:
        for name in ("links", "addresses", "routes", "rules", "xfrm_policies", "xfrm_states", "netconf"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, RouteList)):
                object.__setattr__(self, name, tuple(value))

    def link(self, index: int) -> Link | None:
        for link in self.links:
            if link.index == index:
                return link
        return None

    def link_by_name(self, name: str) -> Link | None:
        for link in self.links:
            if link.name == name:
                return link
        return None

    def names(self) -> dict[int, str]:
        return {link.index: link.name for link in self.links}

    def addresses_of(self, ifindex: int, family: int | None = None) -> tuple[Address, ...]:
        return tuple(
            a
            for a in self.addresses
            if a.ifindex == ifindex and (family is None or a.family == family)
        )

    def is_local(self, addr: IPAddress) -> bool:
        """True if ``addr`` is one of this namespace's own addresses."""
        return any(a.address == addr for a in self.addresses)

    def reverse_path(self, ifname: str) -> tuple[int, bool]:
        """IPv4 ``(rp_filter, src_valid_mark)`` in force on ``ifname``: strict when not known.

        The kernel's ``IN_DEV_RPFILTER`` (the larger of ``all`` and the
        interface) and ``IN_DEV_SRC_VMARK`` (either). An interface the
        snapshot does not list has the ``default`` values it was created with.
        """
        if not self.netconf_known:
            return RP_FILTER_STRICT, False
        by_name = {n.name: n for n in self.netconf}
        none = Netconf("none")
        every = by_name.get("all", none)
        own = by_name.get(ifname) or by_name.get("default", none)
        return max(every.rp_filter, own.rp_filter), every.src_valid_mark or own.src_valid_mark


@dataclass(frozen=True, slots=True)
class TopologyChange:
    """What differs between two snapshots, as human-readable lines."""

    lines: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.lines)

    def summary(self, limit: int = 4) -> str:
        if not self.lines:
            return "no topology change"
        head = "; ".join(self.lines[:limit])
        more = len(self.lines) - limit
        return f"{head}; and {more} more" if more > 0 else head


def changed_routes(before: Sequence[Route], now: Sequence[Route]) -> tuple[set[Route], set[Route]]:
    """The routes only in ``before`` and only in ``now`` (any others compare equal).

    Snapshots kept from events share their unchanged Route objects, in the same order: the
    common head and tail are found by identity at C speed, and only the middle is compared
    by value, so a change to one route of a large table hashes only a few. A snapshot's
    routes are distinct values (the kernel refuses an exact duplicate); were they not, a
    route could be reported changed that is not, never the other way round.
    """
    if before is now:
        return set(), set()
    if isinstance(before, RouteList) and isinstance(now, RouteList):
        # Two snapshots of one kept topology: a route keeps its chunk until the chunks are laid
        # out afresh, so the routes of chunks shared by identity cancel out; only the others
        # are compared (a route in a shared chunk cannot also be in another: no duplicates).
        only0: list[Route] = []
        only1: list[Route] = []
        chunks0, chunks1 = before.chunks, now.chunks
        for i in range(max(len(chunks0), len(chunks1))):
            c0 = chunks0[i] if i < len(chunks0) else ()
            c1 = chunks1[i] if i < len(chunks1) else ()
            if c0 is not c1:
                only0 += c0
                only1 += c1
        set0, set1 = set(only0), set(only1)
        return set0 - set1, set1 - set0
    head = next(itertools.compress(itertools.count(), map(operator.is_not, before, now)), None)
    if head is None and len(before) == len(now):
        return set(), set()
    if head is None:
        head = min(len(before), len(now))
    rest = min(len(before), len(now)) - head
    tail = next(itertools.compress(itertools.count(), map(operator.is_not, reversed(before), reversed(now))),
                rest)  # fmt: skip
    tail = min(tail, rest)
    middle0 = set(before[head : len(before) - tail])
    middle1 = set(now[head : len(now) - tail])
    return middle0 - middle1, middle1 - middle0


def diff(t0: Topology, t1: Topology) -> TopologyChange:
    """Say in words what changed from ``t0`` to ``t1`` (links, addresses, routes, rules)."""
    lines: list[str] = []
    names0, names1 = t0.names(), t1.names()
    links0 = {link.index: link for link in t0.links}
    links1 = {link.index: link for link in t1.links}
    for index in sorted(links0.keys() - links1.keys()):
        lines.append(f"link {links0[index].name} removed")
    for index in sorted(links1.keys() - links0.keys()):
        lines.append(f"link {links1[index].name} added")
    for index in sorted(links0.keys() & links1.keys()):
        a, b = links0[index], links1[index]
        if a.up != b.up or a.running != b.running:
            state = "up" if b.up and b.running else "down"
            lines.append(f"link {b.name} {state}")
        elif a.name != b.name:
            lines.append(f"link {a.name} renamed {b.name}")

    def addr_line(a: Address, names: dict[int, str]) -> str:
        return f"{a.address}/{a.prefixlen} dev {names.get(a.ifindex, f'if{a.ifindex}')}"

    def addr_key(a: Address) -> tuple[int, str, int]:
        return (a.ifindex, str(a.address), a.prefixlen)

    addrs0 = {addr_key(a): a for a in t0.addresses}
    addrs1 = {addr_key(a): a for a in t1.addresses}
    for key in sorted(addrs0.keys() - addrs1.keys()):
        lines.append(f"address {addr_line(addrs0[key], names0)} removed")
    for key in sorted(addrs1.keys() - addrs0.keys()):
        lines.append(f"address {addr_line(addrs1[key], names1)} added")
    for key in sorted(addrs0.keys() & addrs1.keys()):
        before, after = addrs0[key], addrs1[key]
        if before != after:
            lines.append(f"address {addr_line(after, names1)} flags {before.flags:#x} -> {after.flags:#x}")
    routes0, routes1 = changed_routes(t0.routes, t1.routes)
    for r in sorted(routes0 - routes1, key=str):
        lines.append(f"route {r.describe(names0)} removed")
    for r in sorted(routes1 - routes0, key=str):
        lines.append(f"route {r.describe(names1)} added")
    rules0, rules1 = set(t0.rules), set(t1.rules)
    for rule in sorted(rules0 - rules1, key=str):
        lines.append(f"rule {rule.describe()} removed")
    for rule in sorted(rules1 - rules0, key=str):
        lines.append(f"rule {rule.describe()} added")
    pol0, pol1 = set(t0.xfrm_policies), set(t1.xfrm_policies)
    for pol in sorted(pol0 - pol1, key=lambda p: p.describe()):
        lines.append(f"xfrm policy {pol.describe()} removed")
    for pol in sorted(pol1 - pol0, key=lambda p: p.describe()):
        lines.append(f"xfrm policy {pol.describe()} added")
    conf0 = {n.name: n for n in t0.netconf}
    for n in sorted(set(t1.netconf) - set(t0.netconf), key=lambda n: n.name):
        old = conf0.get(n.name)
        if old is None:
            continue  # a new interface: its link line says it
        if old.rp_filter != n.rp_filter:
            lines.append(f"rp_filter of {n.name} {old.rp_filter} -> {n.rp_filter}")
        if old.src_valid_mark != n.src_valid_mark:
            lines.append(f"src_valid_mark of {n.name} {int(old.src_valid_mark)} -> {int(n.src_valid_mark)}")
    sa0, sa1 = set(t0.xfrm_states), set(t1.xfrm_states)
    for sa in sorted(sa0 - sa1, key=lambda s: s.describe()):
        lines.append(f"xfrm SA {sa.describe()} removed")
    for sa in sorted(sa1 - sa0, key=lambda s: s.describe()):
        lines.append(f"xfrm SA {sa.describe()} added")
    return TopologyChange(tuple(lines))
