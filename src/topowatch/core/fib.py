# SPDX-License-Identifier: GPL-2.0-or-later
"""A userspace FIB lookup that mirrors the kernel's.

What it decides: for a destination (and source, input interface, mark, TOS)
and one ``Topology`` snapshot, which policy rule and which route the kernel
would pick, and from that where a flow leaves (``Egress``: oif, gateway, the
address MASQUERADE would choose) and where it entered (``Ingress``, by a
reverse-path lookup of its source). It must never perform I/O, never read a
sysctl it was not given, and never guess: whatever depends on something not
modelled answers ``Unknown`` with a reason naming the rule or route.

Theory of operation (IPv4 follows ``net/core/fib_rules.c``,
``net/ipv4/fib_rules.c``, ``fib_trie.c``, ``route.c``, ``devinet.c``):

1. Rules (``fib_rules_lookup``). The topology's rules of the family, or
   ``default_rules`` if it has none, in priority order (ties keep dump
   order: the kernel inserts a rule after those of equal priority). A rule
   matches when all its selectors do (``fib_rule_match`` then
   ``fib4_rule_match``): iif, oif, fwmark/mask, from, to, tos; ``not``
   inverts the result. Matching is three-valued: a selector that is false
   makes the rule false whatever else is unknown; otherwise an ``unmodelled``
   selector, a fwmark with a nonzero mask and an unknown mark, or a tos
   selector with an unknown TOS make it unknown, and the lookup answers
   ``Unknown``. A lookup with no input interface is locally generated: the
   kernel sets ``flowi_iif = LOOPBACK_IFINDEX``, so ``iif lo`` matches it.
   ``oif`` rules match only lookups given an oif (bound sockets); a rule
   naming an interface the topology does not have is "detached" and never
   matches. ``goto`` jumps to the first rule with the target priority and
   tests it (an unresolved goto is a no-op); ``nop`` continues;
   ``blackhole``/``unreachable``/``prohibit`` answer at once.
2. Tables (``fib_table_lookup``). Longest prefix first. Among routes of one
   prefix: the kernel's alias order, TOS descending then metric ascending
   then dump order; a route with a TOS applies only to that TOS. The first
   route that applies decides: ``blackhole``/``unreachable``/``prohibit``
   answer at once, ``throw`` ends this table and the rule walk goes on (as
   the kernel's -EAGAIN does), a route whose nexthops are all dead is
   skipped (next route of the prefix, then shorter prefixes). A nexthop is
   dead when its link is administratively down (the kernel marks it
   RTNH_F_DEAD, and removes single-path routes of a down link), except in a
   host-scope route: the local routes of a down link's addresses stay and
   still answer (checked against the kernel). A nexthop
   whose link has no carrier (``running`` False) is RTNH_F_LINKDOWN and still
   used: ``ignore_routes_with_linkdown`` is 0 by default and is not in the
   topology. A link the topology does not list counts as alive.
3. Suppression (``fib4_rule_suppress``): after a successful (non-error)
   table answer, ``suppress_prefixlength N`` rejects a route of prefix
   length <= N and the walk goes on. ``suppress_ifgroup`` needs link groups,
   which the topology lacks: a suppressed-by-group candidate is unknown.
4. Answers. ``unicast``: one ``Egress`` per live nexthop; several mean
   multipath (the kernel hashes; callers treat them as alternatives). The
   same holds for a locally generated lookup that lands on one of several
   default routes of equal metric (``fib_select_default`` picks by neighbour
   state). ``local`` delivers to this host (oif ``lo``). ``broadcast``
   delivers locally on input and leaves its device on output. ``multicast``,
   ``anycast``, ``nat`` routes and multicast or limited-broadcast
   destinations are not modelled: unknown. No rule answering means "no
   route" (``unreachable``). A locally generated IPv4 lookup given an oif
   whose lookup fails is sent on link through that oif, as
   ``ip_route_output_key_hash_rcu`` does.
5. Source of MASQUERADE (IPv4, ``inet_select_addr(oif, nexthop,
   RT_SCOPE_UNIVERSE)``): the nexthop is the gateway, else the destination.
   Among the oif's primary addresses of universe scope, in dump order, the
   first whose subnet holds the nexthop, else the first. If the oif has
   none: the primary universe-scope addresses of every link in the same L3
   domain (same VRF master, or none), links in dump order. The route's
   ``prefsrc`` is ignored, as MASQUERADE ignores it.
   IPv6 (``ipv6_dev_get_saddr``, RFC 6724) is a SUBSET: candidates are the
   oif's addresses for a link-local or multicast destination, else every
   link's in the oif's L3 domain; never tentative (unless optimistic) or
   DAD-failed. Preferred in order: the destination itself, the smallest
   scope not narrower than the destination's, neither deprecated nor
   optimistic, on the oif, the same policy-table label, not temporary (the
   default ``use_tempaddr`` preference: the sysctl is not in the topology),
   the longest common prefix capped at the address's prefix length; ties
   keep the kernel's list (dump) order. Not modelled: home addresses,
   ``use_oif_addrs_only``, labels changed with ``ip addrlabel``.

Not modelled (the answer may differ from the kernel's): IPv4 martian and
source-validation checks on input (``ip route get`` fails on them; a
forwarded flow has passed them already), forwarding disabled on the input
interface, route scopes versus ``flowi_scope`` (always universe here),
nexthop objects (a route without nexthops answers unknown), VRF/l3mdev rules
(``unmodelled``), IPv6 source-specific routes, IPv6 neighbour-reachability
route selection (equal-metric IPv6 routes are answered as alternatives).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network

from topowatch.core.flow import Egress, EgressKind, Flow, Ingress, Unknown
from topowatch.core.livetopology import route_changes
from topowatch.core.model import (
    AF_INET,
    AF_INET6,
    IFA_F_DADFAILED,
    IFA_F_DEPRECATED,
    IFA_F_OPTIMISTIC,
    IFA_F_TENTATIVE,
    RP_FILTER_LOOSE,
    RP_FILTER_OFF,
    RP_FILTER_STRICT,
    SCOPE_HOST,
    SCOPE_LINK,
    SCOPE_UNIVERSE,
    TABLE_LOCAL,
    TABLE_MAIN,
    TABLE_UNSPEC,
    Address,
    IPAddress,
    IPNetwork,
    Link,
    Nexthop,
    PolicyRule,
    Route,
    RouteType,
    RuleAction,
    Topology,
    default_rules,
    family_of,
)

# IFA_F_TEMPORARY (an RFC 4941 privacy address) shares its bit with IFA_F_SECONDARY.
IFA_F_TEMPORARY = 0x01

# The kernel's loopback device always has this index (LOOPBACK_IFINDEX).
LOOPBACK_IFINDEX = 1
LOOPBACK_NAME = "lo"

# TOS bits the IPv4 FIB compares (IPTOS_RT_MASK / INET_DSCP_LEGACY_TOS_MASK);
# IPv6 rules compare the whole DSCP of the traffic class.
_TOS_MASK_V4 = 0x1C
_TOS_MASK_V6 = 0xFC

_REJECT_KINDS: dict[RouteType, EgressKind] = {
    RouteType.BLACKHOLE: EgressKind.BLACKHOLE,
    RouteType.UNREACHABLE: EgressKind.UNREACHABLE,
    RouteType.PROHIBIT: EgressKind.PROHIBIT,
}
_RULE_REJECT_KINDS: dict[RuleAction, EgressKind] = {
    RuleAction.BLACKHOLE: EgressKind.BLACKHOLE,
    RuleAction.UNREACHABLE: EgressKind.UNREACHABLE,
    RuleAction.PROHIBIT: EgressKind.PROHIBIT,
}
_UNMODELLED_TYPES = frozenset(
    {RouteType.MULTICAST, RouteType.ANYCAST, RouteType.NAT, RouteType.XRESOLVE, RouteType.UNSPEC}
)

NO_ROUTE = "no route"

_RP_FILTER_WORDS = {RP_FILTER_OFF: "rp_filter 0 (off)", RP_FILTER_STRICT: "rp_filter 1 (strict)",
                    RP_FILTER_LOOSE: "rp_filter 2 (loose)"}


@dataclass(frozen=True, slots=True)
class Resolution:
    """One lookup's whole answer: the egresses and the rule and route that decided them.

    ``rule`` is None where no rule decided (no route at all); ``route`` is
    None where a rule action, not a route, decided, or nothing matched.
    """

    egresses: tuple[Egress, ...] | Unknown
    rule: PolicyRule | None = None
    route: Route | None = None


_LIMITED_BROADCAST = IPv4Address("255.255.255.255")
# Memoised resolutions per Fib (one reaction's snapshot); cleared when this many are held.
_RESOLVED_LIMIT = 1 << 16
# The iifname of a forwarded lookup in a family whose policy rules read none (``Fib.resolve``).
_ANY_IIF = "*"


@dataclass(frozen=True, slots=True)
class _Query:
    dst: IPAddress
    src: IPAddress | None
    iifname: str | None  # None: locally generated (the kernel's iif is lo)
    oifname: str | None
    mark: int | None  # None: unknown
    tos: int | None  # None: unknown

    @property
    def output(self) -> bool:
        return self.iifname is None


@dataclass(frozen=True, slots=True)
class _Hit:
    route: Route
    nexthops: tuple[Nexthop, ...]
    # The route each nexthop is of: ``route`` for its own, another route of the prefix for an
    # equal-metric alternative (its words name that route).
    owners: tuple[Route, ...] = ()


@dataclass(frozen=True, slots=True)
class _Reject:
    route: Route


@dataclass(frozen=True, slots=True)
class _Throw:
    route: Route


_TableAnswer = _Hit | _Reject | _Throw | Unknown | None  # None: no route in this table


def _and3(parts: list[bool | Unknown]) -> bool | Unknown:
    """Three-valued AND: false wins over unknown, unknown over true."""
    unknown: Unknown | None = None
    for part in parts:
        if isinstance(part, Unknown):
            if unknown is None:
                unknown = part
        elif not part:
            return False
    return unknown if unknown is not None else True


def _zero(family: int) -> IPAddress:
    return IPv4Address(0) if family == AF_INET else IPv6Address(0)


def _v6_scope_width(addr: IPv6Address) -> int:
    """RFC 4291 scope as a width: larger is wider (host 1, link 2, site 5, global 14)."""
    if addr.is_loopback:
        return 1
    if addr.is_link_local:
        return 2
    if addr.is_site_local:
        return 5
    return 14


def _common_prefix(a: IPAddress, b: IPAddress) -> int:
    bits = a.max_prefixlen
    diff = int(a) ^ int(b)
    return bits - diff.bit_length()


class Fib:
    """Lookups over one ``Topology`` snapshot (indexes are built once)."""

    def __init__(self, topology: Topology, previous: Fib | None = None) -> None:
        """``previous``: the FIB of an earlier snapshot of the same kept topology; where only routes
        changed between them (``core.livetopology.route_changes`` names them), its route tables are
        carried over with those changes instead of being built again (the same tables either way)."""
        self.topology = topology
        self._names = topology.names()
        self._links: dict[int, Link] = {link.index: link for link in topology.links}
        self._link_names = frozenset(link.name for link in topology.links)
        lo = topology.link_by_name(LOOPBACK_NAME)
        self._lo_index = lo.index if lo is not None else LOOPBACK_IFINDEX
        self._rules: dict[int, tuple[PolicyRule, ...]] = {}
        for family in (AF_INET, AF_INET6):
            rules = [r for r in topology.rules if r.family == family] or list(default_rules(family))
            # sorted() is stable: equal priorities keep dump order, as the kernel lists them.
            self._rules[family] = tuple(sorted(rules, key=lambda r: r.priority))
        # Families where no policy rule reads the input interface: there every forwarded lookup that
        # differs only by its iifname answers alike (``resolve`` asks one of them).
        self._iif_blind = frozenset(
            f for f, rules in self._rules.items() if all(r.iifname is None for r in rules)
        )
        # (family, table) -> prefixlen -> network address as an int -> routes, ordered
        # by (-tos, metric) (sorted() is stable: dump order among equals).
        self._tables: dict[tuple[int, int], dict[int, dict[int, list[Route]]]] = {}
        self._prefixlens: dict[tuple[int, int], tuple[int, ...]] = {}
        if previous is None or not self._carry(previous):
            self._build_tables()
        # A Fib answers one snapshot: the same question always gets the same answer.
        self._resolved: dict[_Query, Resolution] = {}
        # By route identity (the route is kept), and by (oif, nexthop as an int: IPv4 only): an
        # ipaddress value hashes its hex text, a route its every field, on each lookup.
        self._route_texts: dict[int, tuple[Route, str]] = {}
        # (route text, IP version) -> its route (``own_route``): "default dev x" names one per family.
        self._named: dict[tuple[str, int], Route | None] = {}
        # ``own_route``'s answers by (egress, route) identity, the two kept; cleared at _WORDED_LIMIT.
        self._worded: dict[tuple[int, int], tuple[Egress, Route, Egress]] = {}
        self._masquerade: dict[tuple[int, int], IPAddress | None] = {}
        # The links that can receive a packet, with their reverse-path settings (``ingresses``).
        self._receivers: tuple[tuple[Link, tuple[int, bool]], ...] | None = None
        self._receiver_groups: dict[tuple[int, bool], tuple[Ingress, ...]] = {}
        self._all_receivers: tuple[Ingress, ...] = ()
        self._receiver_order: dict[int, int] = {}

    def _build_tables(self) -> None:
        routes = list(self.topology.routes)
        for family in (AF_INET, AF_INET6):
            if not any(r.family == family and r.table == TABLE_LOCAL for r in routes):
                routes.extend(self._implied_local_routes(family))
        for route in routes:
            by_len = self._tables.setdefault((route.family, route.table), {})
            same_len = by_len.setdefault(route.dst.prefixlen, {})
            same_len.setdefault(int(route.dst.network_address), []).append(route)
        for by_len in self._tables.values():
            for same_len in by_len.values():
                for net, listed in same_len.items():
                    same_len[net] = sorted(listed, key=lambda r: (-r.tos, r.metric))
        self._prefixlens = {key: tuple(sorted(by_len, reverse=True)) for key, by_len in self._tables.items()}

    def _carry(self, previous: Fib) -> bool:
        """The route tables of ``previous`` with the routes changed since (copied where they change);
        False where that is not known to give ``_build_tables``'s answer: more than routes changed,
        the lineage does not join the two snapshots, a local-table route changed (implied local
        routes), or a changed prefix holds two routes of one TOS and metric (their order is the
        dump's)."""
        before, now = previous.topology, self.topology
        if (before.links, before.addresses, before.rules) != (now.links, now.addresses, now.rules):
            return False
        changes = route_changes(before.routes, now.routes)
        if changes is None:
            return False
        gone, came = changes
        if any(r.table == TABLE_LOCAL for r in (*gone, *came)):
            return False
        tables = dict(previous._tables)
        copied: set[tuple[int, int, int]] = set()
        for route, add in [*((r, False) for r in gone), *((r, True) for r in came)]:
            key, length = (route.family, route.table), route.dst.prefixlen
            if (*key, length) not in copied:
                copied.add((*key, length))
                by_len = tables[key] = dict(tables.get(key, {}))
                by_len[length] = dict(by_len.get(length, {}))
            same_len = tables[key][length]
            net = int(route.dst.network_address)
            listed = [r for r in same_len.get(net, ()) if r != route]
            if add:
                listed.append(route)
            if listed:
                listed.sort(key=lambda r: (-r.tos, r.metric))
                if len({(r.tos, r.metric) for r in listed}) < len(listed):
                    return False
                same_len[net] = listed
            else:
                same_len.pop(net, None)
        prefixlens = dict(previous._prefixlens)
        for family, table, _ in copied:
            by_len = tables[family, table]
            for length in [n for n, same in by_len.items() if not same]:
                del by_len[length]
            if by_len:
                prefixlens[family, table] = tuple(sorted(by_len, reverse=True))
            else:
                del tables[family, table]
                prefixlens.pop((family, table), None)
        self._tables, self._prefixlens = tables, prefixlens
        return True

    # -- public API -----------------------------------------------------------------

    def lookup(
        self,
        dst: IPAddress,
        *,
        src: IPAddress | None = None,
        iifname: str | None = None,
        oifname: str | None = None,
        mark: int | None = 0,
        tos: int | None = 0,
    ) -> tuple[Egress, ...] | Unknown:
        """Route ``dst`` as the kernel would; several egresses for multipath.

        ``iifname`` None is a locally generated packet; ``mark`` or ``tos`` None
        is unknown (selectors on it answer unknown). ``src`` None is the
        kernel's 0.0.0.0 (``ip route get`` without ``from``).
        """
        return self.resolve(dst, src=src, iifname=iifname, oifname=oifname, mark=mark, tos=tos).egresses

    def resolve(
        self,
        dst: IPAddress,
        *,
        src: IPAddress | None = None,
        iifname: str | None = None,
        oifname: str | None = None,
        mark: int | None = 0,
        tos: int | None = 0,
    ) -> Resolution:
        """Like ``lookup``, and say which rule and route decided."""
        if src is not None and src.version != dst.version:
            raise ValueError(f"lookup mixes address families: {src} -> {dst}")
        if iifname is not None and family_of(dst) in self._iif_blind:
            # Only a rule's iif selector reads the name (``_rule_match``); none has one here.
            iifname = _ANY_IIF
        return self._resolve(_Query(dst, src, iifname, oifname, mark, tos))

    def own_route(self, egress: Egress, dst: IPAddress, *, also: tuple[IPAddress, ...] = ()) -> Egress:
        """``egress`` worded with the route of its table that carries ``dst``: the same route but
        for its prefix (kind, nexthops, metric, TOS, ...), the longest such prefix holding ``dst``.

        For the flow classes (``core.classify``): flows of one class meet routes that differ only
        by their prefix, so a class's egress, found for its first flow, names that flow's prefix;
        this names another flow's own. ``egress`` is returned as it is where its route already
        carries ``dst`` or one of ``also`` (other destinations the flow may be routed to: fixed
        DNAT addresses), where it names no route of this FIB, or where no such route holds
        ``dst``. Only words change: never the kind, device, gateway or source.
        """
        prefix = egress.prefix
        if prefix is None or prefix.version != dst.version:
            return egress
        try:
            route = self._named[egress.route, prefix.version]
        except KeyError:
            route = self._named[egress.route, prefix.version] = self._route_named(egress.route, prefix)
        if route is None:
            return egress
        own = self._same_route_for(route, dst)
        if own is None or own is route or any(self._same_route_for(route, a) is route for a in also):
            return egress
        key = (id(egress), id(own))
        hit = self._worded.get(key)
        if hit is not None and hit[0] is egress and hit[1] is own:
            return hit[2]
        if len(self._worded) >= _WORDED_LIMIT:
            self._worded.clear()
        worded = replace(egress, route=self._route_text(own), prefix=own.dst)
        self._worded[key] = (egress, own, worded)
        return worded

    def _route_named(self, text: str, prefix: IPNetwork) -> Route | None:
        """The route of this FIB whose text (``_route_text``) is ``text`` and whose prefix ``prefix``."""
        family = AF_INET if prefix.version == 4 else AF_INET6
        net = int(prefix.network_address)
        for (fam, _table), by_len in self._tables.items():
            if fam != family:
                continue
            for route in by_len.get(prefix.prefixlen, {}).get(net, ()):
                if self._route_text(route) == text:
                    return route
        return None

    def _same_route_for(self, route: Route, dst: IPAddress) -> Route | None:
        """The route of ``route``'s table under the longest prefix holding ``dst`` that is ``route``
        but for its prefix (None if none is)."""
        key = (route.family, route.table)
        by_len = self._tables.get(key)
        if not by_len:
            return None
        content = _but_prefix(route)
        value = int(dst)
        bits = 32 if dst.version == 4 else 128
        for plen in self._prefixlens[key]:
            shift = bits - plen
            for candidate in by_len[plen].get(value >> shift << shift, ()):
                if candidate is route or _but_prefix(candidate) == content:
                    return candidate
        return None

    def ingress(self, flow: Flow) -> Ingress | Unknown:
        """Where the flow's first packet entered: local if its source is ours, else reverse path.

        The reverse path is the lookup ``fib_validate_source`` and nft ``fib
        saddr . iif`` make: destination the flow's source, source the flow's
        destination, as if locally generated (iif lo). Its oif is the iif.
        """
        if self.is_local(flow.src):
            return self._local_ingress()
        answer = self.lookup(flow.src, src=flow.dst, mark=flow.packet_mark, tos=None)
        if isinstance(answer, Unknown):
            return Unknown(f"the reverse path of the source: {answer.reason}")
        if any(e.kind is EgressKind.LOCAL for e in answer):
            return self._local_ingress()
        rejects = [e for e in answer if e.kind is not EgressKind.UNICAST]
        if rejects:
            return Unknown(f"no reverse path to the source: {rejects[0].describe()}")
        oifs = sorted({(e.oif, e.oifname) for e in answer})
        if len(oifs) > 1:
            devs = ", ".join(f"dev {name}" for _, name in oifs)
            return Unknown(f"the reverse path of the source is multipath ({devs})")
        oif, name = oifs[0]
        return Ingress(oif, name)

    def ingresses(
        self, flow: Flow, *, netfilter_rpf: bool = False
    ) -> tuple[tuple[Ingress, ...], str] | Unknown:
        """Every interface the flow's first packet may have entered on, and why those.

        The input interface is not in a conntrack entry; the kernel pins it
        only by reverse-path filtering (``fib_validate_source``). Per
        interface, IPv4 ``rp_filter`` (``Topology.reverse_path``): strict (1)
        accepts the packet only where the reverse lookup (destination the
        flow's source, iif lo, the packet mark only with ``src_valid_mark``)
        leaves by that interface; loose (2) wherever that lookup finds a
        unicast route; off (0) anywhere. IPv6 has no such sysctl.
        ``netfilter_rpf`` is a netfilter reverse-path drop (``fib saddr .
        iif oif missing drop``, ``-m rpfilter --invert -j DROP``) on every
        packet of the family: strict, with mark 0, on top of the sysctl.
        Interfaces that are down, and lo, receive nothing. A flow from one of
        our own addresses is locally generated. Unknown where the reverse
        lookup a filter needs is.
        """
        topology = self.topology
        if not topology.netconf_known:
            # Strict everywhere: the reverse path's interface (``ingress``).
            single = self.ingress(flow)
            if isinstance(single, Unknown):
                return single
            return (single,), "locally generated" if single.local else "reverse path"
        if self.is_local(flow.src):
            return (self._local_ingress(),), "locally generated"
        answers: dict[int | None, tuple[Egress, ...] | Unknown] = {}

        def reverse(mark: int | None) -> tuple[Egress, ...] | Unknown:
            if mark not in answers:
                answers[mark] = self.lookup(flow.src, src=flow.dst, mark=mark, tos=None)
            return answers[mark]

        v4 = flow.family == AF_INET
        if self._receivers is None:
            self._receivers = self._receiving_links()
        # Links with the same settings answer alike but for strict's "leaves by this link": by group.
        groups = self._receiver_groups if v4 else {(RP_FILTER_OFF, False): self._all_receivers}
        accepted: list[Ingress] = []
        why: set[str] = set()
        for (rpf, svm), members in groups.items():
            checks: list[tuple[int | None, bool]] = []  # (the lookup's mark, strict)
            if rpf != RP_FILTER_OFF:
                checks.append((flow.packet_mark if svm else 0, rpf == RP_FILTER_STRICT))
            if netfilter_rpf:
                checks.append((0, True))
            allowed: set[str] | None = None  # None: every member
            for mark, strict in checks:
                answer = reverse(mark)
                if isinstance(answer, Unknown):
                    return Unknown(f"the reverse path of the source: {answer.reason}")
                if any(e.kind is EgressKind.LOCAL for e in answer):
                    return (self._local_ingress(),), "locally generated"
                if not answer or any(e.kind is not EgressKind.UNICAST for e in answer):
                    allowed = set()  # no unicast route back: every filter refuses
                elif strict:
                    names = {e.oifname for e in answer}
                    allowed = names if allowed is None else allowed & names
            chosen = members if allowed is None else tuple(i for i in members if i.ifname in allowed)
            if chosen:
                accepted.extend(chosen)
                why.add(_RP_FILTER_WORDS[rpf] if v4 else "IPv6 (no rp_filter)")
                if netfilter_rpf:
                    why.add("netfilter reverse-path drop")
        if not accepted:
            return Unknown("no interface accepts a packet from the source (reverse-path filtering)")
        if len(groups) > 1:
            accepted.sort(key=lambda i: self._receiver_order[i.ifindex])
        return tuple(accepted), ", ".join(sorted(why))

    def _receiving_links(self) -> tuple[tuple[Link, tuple[int, bool]], ...]:
        """The links that can receive (up, not lo), each with its IPv4 (rp_filter, src_valid_mark).

        Also fills the groups ``ingresses`` walks: the receivers as ``Ingress`` values by
        their settings, all of them, and their dump order.
        """
        topology = self.topology
        by_name = {n.name: n for n in topology.netconf}
        every = by_name.get("all")
        default = by_name.get("default")
        out: list[tuple[Link, tuple[int, bool]]] = []
        for link in topology.links:
            if not link.up or link.name == LOOPBACK_NAME:
                continue
            own = by_name.get(link.name) or default
            rpf = max(every.rp_filter if every else 0, own.rp_filter if own else 0)
            svm = bool((every and every.src_valid_mark) or (own and own.src_valid_mark))
            out.append((link, (rpf, svm)))
        groups: dict[tuple[int, bool], list[Ingress]] = {}
        for link, mode in out:
            groups.setdefault(mode, []).append(Ingress(link.index, link.name))
        self._receiver_groups = {mode: tuple(members) for mode, members in groups.items()}
        self._all_receivers = tuple(Ingress(link.index, link.name) for link, _ in out)
        self._receiver_order = {link.index: i for i, (link, _) in enumerate(out)}
        return tuple(out)

    def egress(self, flow: Flow, ingress: Ingress) -> tuple[Egress, ...] | Unknown:
        """Where the flow (after any DNAT, passed in ``flow``) leaves.

        The TOS is unknown (conntrack does not keep it): TOS selectors answer unknown.
        """
        iifname = None if ingress.local else ingress.ifname
        return self.lookup(flow.dst, src=flow.src, iifname=iifname, mark=flow.packet_mark, tos=None)

    def is_local(self, addr: IPAddress) -> bool:
        """True if ``addr`` is ours: a ``local`` route in the local table holds it, or an address is it."""
        if self.topology.is_local(addr):
            return True
        query = _Query(addr, None, None, None, 0, 0)
        answer = self._table_lookup(family_of(addr), TABLE_LOCAL, query)
        return isinstance(answer, _Hit) and answer.route.type == RouteType.LOCAL

    def address_type(self, addr: IPAddress, ifindex: int | None = None) -> RouteType | Unknown:
        """The address type nft ``fib daddr|saddr [. iif] type`` reads.

        IPv4 (``inet_dev_addr_type``): 0.0.0.0/8 and 255.255.255.255 are
        broadcast, multicast by address, else the type of the local-table
        route holding it (only if its device is ``ifindex``, when given), else
        unicast. IPv6 (``nft_fib6_eval_type``, a subset): local when an address
        (of ``ifindex``, when given) is it, multicast by address, else the
        kind of the route to it; anything less clear is unknown.
        """
        if addr.is_multicast:
            return RouteType.MULTICAST
        if isinstance(addr, IPv4Address):
            if addr in IPv4Network("0.0.0.0/8") or addr == IPv4Address("255.255.255.255"):
                return RouteType.BROADCAST
            answer = self._table_lookup(AF_INET, TABLE_LOCAL, _Query(addr, None, None, None, 0, 0))
            if isinstance(answer, Unknown):
                return answer
            if isinstance(answer, _Hit):
                hops = answer.route.nexthops
                if ifindex is None or (hops and hops[0].oif == ifindex):
                    return answer.route.type
            return RouteType.UNICAST
        mine = [a for a in self.topology.addresses if a.address == addr]
        if any(ifindex is None or a.ifindex == ifindex for a in mine):
            return RouteType.LOCAL
        egresses = self.lookup(addr)
        if isinstance(egresses, Unknown):
            return egresses
        kinds = {e.kind for e in egresses}
        by_kind = {
            EgressKind.UNICAST: RouteType.UNICAST,
            EgressKind.BLACKHOLE: RouteType.BLACKHOLE,
            EgressKind.UNREACHABLE: RouteType.UNREACHABLE,
            EgressKind.PROHIBIT: RouteType.PROHIBIT,
        }
        if len(kinds) == 1 and next(iter(kinds)) in by_kind:
            return by_kind[next(iter(kinds))]
        return Unknown(f"the address type of {addr} is not modelled here")

    def redirect_address(
        self, family: int, ingress: Ingress, dst: IPAddress | None = None
    ) -> IPAddress | None:
        """The address REDIRECT picks: the input interface's first primary address, loopback for local.

        IPv4 (``nf_nat_redirect_ipv4``): the head of the interface's address
        list, which is primary. IPv6 (``nf_nat_redirect_ipv6``): the first
        address that is not v4-mapped nor tentative (optimistic is fine) and,
        if ``dst`` is given, of the same scope as ``dst``. None: REDIRECT drops.
        """
        if ingress.local:
            return IPv4Address("127.0.0.1") if family == AF_INET else IPv6Address("::1")
        addrs = self.topology.addresses_of(ingress.ifindex, family)
        if family == AF_INET:
            return addrs[0].address if addrs else None
        for a in addrs:
            addr = a.address
            assert isinstance(addr, IPv6Address)
            if addr.ipv4_mapped is not None:
                continue
            if a.flags & IFA_F_TENTATIVE and not a.flags & IFA_F_OPTIMISTIC:
                continue
            if isinstance(dst, IPv6Address) and _v6_scope_width(addr) != _v6_scope_width(dst):
                continue
            return addr
        return None

    def masquerade_source(self, oif: int, nexthop: IPAddress) -> IPAddress | None:
        """The source MASQUERADE picks on ``oif`` for ``nexthop`` (gateway, else destination)."""
        if nexthop.version == 4:
            return self._inet_select_addr(oif, nexthop)
        return self._ipv6_select_addr(oif, nexthop)

    # -- rules ----------------------------------------------------------------------

    def _resolve(self, q: _Query) -> Resolution:
        answer = self._resolved.get(q)
        if answer is None:
            if len(self._resolved) >= _RESOLVED_LIMIT:
                self._resolved.clear()
            answer = self._resolved[q] = self._resolve_uncached(q)
        return answer

    def _resolve_uncached(self, q: _Query) -> Resolution:
        family = family_of(q.dst)
        if q.dst.is_multicast:
            return Resolution(Unknown("a multicast destination is not modelled"))
        if q.dst == _LIMITED_BROADCAST:
            return Resolution(Unknown("limited broadcast destination is not modelled"))
        rules = self._rules[family]
        i = 0
        while i < len(rules):
            rule = rules[i]
            matched = self._rule_match(rule, q)
            if isinstance(matched, Unknown):
                return Resolution(matched, rule)
            if not matched:
                i += 1
                continue
            action = rule.action
            if action == RuleAction.GOTO:
                target = self._goto_target(rules, i)
                if target is None:  # unresolved: the kernel goes on with the next rule
                    i += 1
                else:
                    i = target  # the target is then tested like any rule ("goto jumped")
                continue
            if action in (RuleAction.NOP, RuleAction.UNSPEC):
                i += 1
                continue
            if action in _RULE_REJECT_KINDS:
                reject = Egress(_RULE_REJECT_KINDS[action], route=f"rule {rule.describe()}")
                return self._fallback_oif(q, Resolution((reject,), rule))
            table = rule.table if rule.table != TABLE_UNSPEC else TABLE_MAIN
            answer = self._table_lookup(family, table, q)
            if answer is None or isinstance(answer, _Throw):
                i += 1
                continue
            if isinstance(answer, Unknown):
                return Resolution(answer, rule)
            if isinstance(answer, _Reject):
                kind = _REJECT_KINDS[answer.route.type]
                reject = Egress(kind, route=self._route_text(answer.route), prefix=answer.route.dst)
                return self._fallback_oif(q, Resolution((reject,), rule, answer.route))
            suppressed = self._suppressed(rule, answer)
            if isinstance(suppressed, Unknown):
                return Resolution(suppressed, rule, answer.route)
            if suppressed:
                i += 1
                continue
            return Resolution(self._answer(q, table, answer), rule, answer.route)
        nothing = Egress(EgressKind.UNREACHABLE, route=NO_ROUTE)
        return self._fallback_oif(q, Resolution((nothing,)))

    @staticmethod
    def _goto_target(rules: tuple[PolicyRule, ...], i: int) -> int | None:
        target = rules[i].goto
        for j, rule in enumerate(rules):
            if rule.priority == target:
                # The kernel refuses backward gotos; a snapshot that has one would loop.
                return j if j > i else None
        return None

    def _rule_match(self, rule: PolicyRule, q: _Query) -> bool | Unknown:
        """``fib_rule_match`` + ``fib4_rule_match``/``fib6_rule_match``, three-valued."""
        parts: list[bool | Unknown] = []
        if rule.iifname is not None:
            iif = q.iifname if q.iifname is not None else LOOPBACK_NAME
            parts.append(self._link_exists(rule.iifname) and rule.iifname == iif)
        if rule.oifname is not None:
            parts.append(self._link_exists(rule.oifname) and rule.oifname == q.oifname)
        if rule.fwmark is not None:
            mask = rule.fwmask if rule.fwmask is not None else (0xFFFFFFFF if rule.fwmark else 0)
            if mask == 0:
                parts.append(True)
            elif q.mark is None:
                parts.append(Unknown(f"rule {rule.describe()}: selector fwmark needs the packet mark, "
                                     "which is unknown"))
            else:
                parts.append(((rule.fwmark ^ q.mark) & mask) == 0)
        if rule.src is not None:
            if q.src is None and rule.family == AF_INET6 and rule.src.prefixlen:
                # fib6_rule_match: without RT6_LOOKUP_F_HAS_SADDR a `from` selector never matches
                # (IPv4 compares the source 0 instead: fib4_rule_match).
                parts.append(False)
            else:
                parts.append((q.src if q.src is not None else _zero(rule.family)) in rule.src)
        if rule.dst is not None:
            parts.append(q.dst in rule.dst)
        if rule.tos:
            if q.tos is None:
                parts.append(Unknown(f"rule {rule.describe()}: selector tos needs the packet's TOS, "
                                     "which is unknown"))
            else:
                mask = _TOS_MASK_V4 if rule.family == AF_INET else _TOS_MASK_V6
                parts.append(rule.tos == q.tos & mask)
        if rule.unmodelled:  # the rule's words only where a reason needs them
            what = f"rule {rule.describe()}"
            parts.extend(Unknown(f"{what}: selector {name} is not modelled") for name in rule.unmodelled)
        result = _and3(parts)
        if rule.invert and not isinstance(result, Unknown):
            return not result
        return result

    def _link_exists(self, name: str) -> bool:
        # A rule naming a missing interface is "detached" and never matches. A
        # topology without links (built by hand) cannot say: trust the name.
        return name == LOOPBACK_NAME or not self._link_names or name in self._link_names

    def _suppressed(self, rule: PolicyRule, hit: _Hit) -> bool | Unknown:
        # The kernel's "off" is -1; a route of prefix length <= N is refused.
        if rule.suppress_prefixlen is not None and hit.route.dst.prefixlen <= rule.suppress_prefixlen:
            return True
        if rule.suppress_ifgroup is not None and rule.suppress_ifgroup != -1 and hit.nexthops:
            return Unknown(
                f"rule {rule.describe()}: selector suppress_ifgroup needs link groups, which are not modelled"
            )
        return False

    # -- tables ---------------------------------------------------------------------

    def _table_lookup(self, family: int, table: int, q: _Query) -> _TableAnswer:
        by_len = self._tables.get((family, table))
        if not by_len:
            return None
        dst = int(q.dst)
        bits = 32 if family == AF_INET else 128
        for plen in self._prefixlens[(family, table)]:
            shift = bits - plen
            ordered = by_len[plen].get(dst >> shift << shift)
            if not ordered:
                continue
            for idx, route in enumerate(ordered):
                if route.tos:
                    if q.tos is None:
                        return Unknown(
                            f"route {self._route_text(route)} selects tos {route.tos:#x}; "
                            "the packet's TOS is unknown"
                        )
                    mask = _TOS_MASK_V4 if family == AF_INET else _TOS_MASK_V6
                    if route.tos != q.tos & mask:
                        continue
                if route.type == RouteType.THROW:
                    return _Throw(route)
                if route.type in _REJECT_KINDS:
                    return _Reject(route)
                live = tuple(
                    nh
                    for nh in route.nexthops
                    if self._alive(route, nh) and (q.oifname is None or self._names.get(nh.oif) == q.oifname)
                )
                if route.nexthops and not live:
                    continue
                extra: tuple[tuple[Nexthop, Route], ...] = ()
                if family == AF_INET6 and route.type == RouteType.UNICAST:
                    extra = self._v6_same_metric(ordered, idx, q)
                elif q.output and q.oifname is None and plen == 0 and route.type == RouteType.UNICAST:
                    extra = self._default_alternatives(ordered, idx, by_len[plen])
                if not extra:
                    return _Hit(route, live)
                return _Hit(route, live + tuple(nh for nh, _ in extra),
                            (route,) * len(live) + tuple(r for _, r in extra))
        return None

    def _alive(self, route: Route, nh: Nexthop) -> bool:
        # fib_sync_down_dev() marks nexthops of a down link dead, except those of
        # host-scope routes (the local routes of its addresses stay and answer).
        if route.scope == SCOPE_HOST or route.type == RouteType.LOCAL:
            return True
        link = self._links.get(nh.oif)
        return link is None or link.up

    def _v6_same_metric(self, ordered: list[Route], idx: int, q: _Query) -> tuple[tuple[Nexthop, Route], ...]:
        """IPv6 chooses among equal-metric routes by neighbour state (rt6_select): alternatives, each
        with its route."""
        first = ordered[idx]
        extra: list[tuple[Nexthop, Route]] = []
        for route in ordered[idx + 1 :]:
            if route.metric != first.metric or route.tos != first.tos or route.type != RouteType.UNICAST:
                break
            extra.extend(
                (nh, route)
                for nh in route.nexthops
                if self._alive(route, nh) and (q.oifname is None or self._names.get(nh.oif) == q.oifname)
            )
        return tuple(extra)

    def _default_alternatives(
        self, ordered: list[Route], idx: int, same_len: dict[int, list[Route]]
    ) -> tuple[tuple[Nexthop, Route], ...]:
        """``fib_select_default``: several equal-metric gateway default routes of one table.

        The kernel picks among them by neighbour state when it routes a locally
        generated packet; it only does so when the table has more than one
        default route and the chosen one is a single gateway nexthop.
        """
        first = ordered[idx]
        if sum(len(v) for v in same_len.values()) < 2 or not _single_gateway(first):
            return ()
        extra: list[tuple[Nexthop, Route]] = []
        for route in ordered[idx + 1 :]:
            if route.metric != first.metric or route.tos != first.tos:
                break
            if route.type != RouteType.UNICAST or not _single_gateway(route):
                continue
            if self._alive(route, route.nexthops[0]):
                extra.append((route.nexthops[0], route))
        return tuple(extra)

    def _implied_local_routes(self, family: int) -> list[Route]:
        """Local-table host routes the kernel makes for each address (a hand-built topology lacks them)."""
        routes: list[Route] = []
        for a in self.topology.addresses:
            if a.family != family or not a.usable:
                continue
            link = self._links.get(a.ifindex)
            host = ip_network(a.address)
            routes.append(
                Route(
                    host,
                    TABLE_LOCAL,
                    RouteType.LOCAL,
                    (Nexthop(a.ifindex),),
                    scope=SCOPE_HOST,
                    prefsrc=a.address,
                )
            )
            if link is not None and link.name == LOOPBACK_NAME and a.network != host:
                routes.append(
                    Route(a.network, TABLE_LOCAL, RouteType.LOCAL, (Nexthop(a.ifindex),), scope=SCOPE_HOST)
                )
        return routes

    # -- answers --------------------------------------------------------------------

    def _answer(self, q: _Query, table: int, hit: _Hit) -> tuple[Egress, ...] | Unknown:
        route = hit.route
        text = self._route_text(route)
        if route.type in _UNMODELLED_TYPES:
            return Unknown(f"route {text}: type {route.type.name.lower()} is not modelled")
        if route.type == RouteType.LOCAL or (route.type == RouteType.BROADCAST and not q.output):
            return (Egress(EgressKind.LOCAL, self._lo_index, LOOPBACK_NAME, route=text, prefix=route.dst),)
        if not hit.nexthops:
            return Unknown(f"route {text} has no nexthop (nexthop objects are not modelled)")
        gateway_ok = route.type == RouteType.UNICAST
        egresses: list[Egress] = []
        for i, nh in enumerate(hit.nexthops):
            gateway = nh.gateway if gateway_ok else None
            owner = hit.owners[i] if i < len(hit.owners) else route
            words = text if owner is route else self._route_text(owner)
            egresses.append(
                Egress(
                    EgressKind.UNICAST,
                    nh.oif,
                    self._names.get(nh.oif, f"if{nh.oif}"),
                    gateway,
                    self._masquerade_for(nh.oif, gateway, q.dst),
                    words,
                    prefix=route.dst,
                )
            )
        if len(egresses) == 1:
            return (egresses[0],)
        # Equal-metric alternatives can come from other routes of the prefix: keep each once.
        return tuple(dict.fromkeys(egresses))

    def _fallback_oif(self, q: _Query, failed: Resolution) -> Resolution:
        """A locally generated IPv4 lookup with an oif that fails is sent on link via the oif."""
        if not (q.output and q.oifname is not None and q.dst.version == 4):
            return failed
        link = self.topology.link_by_name(q.oifname)
        if link is None:
            return failed
        egress = Egress(
            EgressKind.UNICAST,
            link.index,
            link.name,
            None,
            self._masquerade_for(link.index, None, q.dst),
            f"on link via {link.name} (lookup failed)",
        )
        return Resolution((egress,), failed.rule, None)

    def _route_text(self, route: Route) -> str:
        found = self._route_texts.get(id(route))
        if found is not None and found[0] is route:
            return found[1]
        text = route.describe(self._names)
        if route.table == TABLE_MAIN:
            text += " table main"
        self._route_texts[id(route)] = (route, text)
        return text

    def _local_ingress(self) -> Ingress:
        return Ingress(self._lo_index, LOOPBACK_NAME, local=True)

    # -- source address selection ---------------------------------------------------

    def _masquerade_for(self, oif: int, gateway: IPAddress | None, dst: IPAddress) -> IPAddress | None:
        # rt_nexthop(): the IPv4 gateway if the route has one, else the destination.
        if dst.version == 4:
            nexthop = gateway if isinstance(gateway, IPv4Address) else dst
            key = (oif, int(nexthop))
            if key not in self._masquerade:
                self._masquerade[key] = self._inet_select_addr(oif, nexthop)
            return self._masquerade[key]
        # nf_nat_masquerade_ipv6 selects for the destination, not the nexthop.
        return self._ipv6_select_addr(oif, dst)

    def _inet_select_addr(self, oif: int, nexthop: IPAddress) -> IPv4Address | None:
        """``inet_select_addr(oif, nexthop, RT_SCOPE_UNIVERSE)``."""
        first: IPv4Address | None = None
        for a in self.topology.addresses_of(oif, AF_INET):
            if a.secondary or a.scope > SCOPE_UNIVERSE:
                continue
            assert isinstance(a.address, IPv4Address)
            if nexthop in a.network:
                return a.address
            first = first or a.address
        if first is not None:
            return first
        # The oif has none: the VRF device's own first, then every link of the same
        # L3 domain in dump order (lo first).
        domain = self._l3_master(oif)
        candidates = [domain] if domain else []
        candidates += [link.index for link in self.topology.links if self._l3_master(link.index) == domain]
        for ifindex in candidates:
            for a in self.topology.addresses_of(ifindex, AF_INET):
                if not a.secondary and a.scope != SCOPE_LINK and a.scope <= SCOPE_UNIVERSE:
                    assert isinstance(a.address, IPv4Address)
                    return a.address
        return None

    def _l3_master(self, ifindex: int) -> int:
        """``l3mdev_master_ifindex_rcu``: a VRF device is its own domain; its slaves are in it."""
        link = self._links.get(ifindex)
        if link is not None and link.kind == "vrf":
            return link.index
        if link is None or not link.master:
            return 0
        master = self._links.get(link.master)
        return master.index if master is not None and master.kind == "vrf" else 0

    def _ipv6_select_addr(self, oif: int, dst: IPAddress) -> IPAddress | None:
        """A subset of RFC 6724 source selection (``ipv6_dev_get_saddr``); see the module docstring.

        Candidates: the oif's addresses for a link-local or multicast
        destination, else every link's of the oif's L3 domain (dump order is
        the kernel's list order). Not tentative (unless optimistic), not
        multicast. Then, in order: the destination itself, appropriate scope,
        neither deprecated nor optimistic, on the oif, same policy label,
        not temporary (the default ``use_tempaddr`` preference), longest
        common prefix capped at the address's prefix length; ties keep the
        first.
        """
        assert isinstance(dst, IPv6Address)
        want = _v6_scope_width(dst)

        def usable(a: Address) -> bool:
            if a.family != AF_INET6 or a.flags & IFA_F_DADFAILED or a.address.is_multicast:
                return False
            return not (a.flags & IFA_F_TENTATIVE and not a.flags & IFA_F_OPTIMISTIC)

        if dst.is_multicast or want <= _v6_scope_width(IPv6Address("fe80::1")):
            candidates = [a for a in self.topology.addresses_of(oif, AF_INET6) if usable(a)]
        else:
            domain = self._l3_master(oif)
            candidates = [
                a for a in self.topology.addresses if usable(a) and self._l3_master(a.ifindex) == domain
            ]
        if not candidates:
            return None
        dst_label = _v6_label(dst)

        def preference(a: Address) -> tuple[bool, int, bool, bool, bool, bool, int]:
            addr = a.address
            assert isinstance(addr, IPv6Address)
            width = _v6_scope_width(addr)
            scope_rank = -width if width >= want else width - 128
            return (
                addr == dst,
                scope_rank,
                not a.flags & (IFA_F_DEPRECATED | IFA_F_OPTIMISTIC),
                a.ifindex == oif,
                _v6_label(addr) == dst_label,
                not a.flags & IFA_F_TEMPORARY,
                min(_common_prefix(addr, dst), a.prefixlen),
            )

        return max(candidates, key=preference).address


# RFC 6724 default policy table as the kernel has it (ip6addrlbl_init_table): prefix -> label.
_V6_LABELS: tuple[tuple[IPv6Network, int], ...] = tuple(
    sorted(
        (
            (IPv6Network(net), label)
            for net, label in (
                ("::/0", 1), ("fc00::/7", 5), ("fec0::/10", 11), ("2002::/16", 2), ("3ffe::/16", 12),
                ("2001::/32", 6), ("2001:10::/28", 7), ("::ffff:0:0/96", 4), ("::/96", 3), ("::1/128", 0),
            )
        ),
        key=lambda item: -item[0].prefixlen,
    )
)


# ``Fib.own_route``'s remembered answers at most (one per class egress and route met).
_WORDED_LIMIT = 65536


def _but_prefix(route: Route) -> tuple[object, ...]:
    """What makes two routes of one table the same route but for their prefix (``Fib.own_route``)."""
    return (route.type, route.nexthops, route.metric, route.prefsrc, route.scope, route.tos, route.protocol)


def _v6_label(addr: IPv6Address) -> int:
    return next(label for net, label in _V6_LABELS if addr in net)


def _single_gateway(route: Route) -> bool:
    return len(route.nexthops) == 1 and route.nexthops[0].gateway is not None
