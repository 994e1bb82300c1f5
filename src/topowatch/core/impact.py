# SPDX-License-Identifier: GPL-2.0-or-later
"""Which flows a topology change can re-NAT: none, those in some prefixes, or any.

Theory of operation: a prediction reads the topology through the FIB (rules,
the routes of the tables rules reach, links, addresses) and the xfrm state.
Comparing the previous and the current topology, per address family:

- a family without a NAT chain at any hook cannot be re-NATed by anything:
  its changes do not count (an entry that carries NAT from an earlier
  ruleset was judged by the full judgement that followed the ruleset
  change; one left undecided then stays so until the next full one);
- rules, addresses, links (other than their carrier, which the FIB does not
  read: a link without carrier keeps its routes), or any other field of the
  snapshot (xfrm policies and states, rp_filter settings) changed: any flow
  may be NATed differently; so
  when anything else a snapshot carries changed (xfrm, rp_filter: which
  interfaces a flow may have entered on, ``Fib.ingresses``);
- but an IPsec rekey is no change: SAs that differ only by their SPI (a new
  SA beside the old one, then the old one gone), or a larval SA (SPI 0, an
  acquire: never used), leave every prediction as it was, unless something
  reads an SA's SPI (nft ``ipsec ... spi``, ``-m policy --spi``, a policy
  template naming one): ``core.xfrm`` finds a bundle's SAs by the other
  fields, and a prediction names the policy, not the SA;
- otherwise only routes changed, and only those in a table some rule
  reaches (the default rules reach local, main and default): a flow can
  change only if its source or destination lies in the prefix of such a
  route (the forward lookup reads the destination, the reverse path the
  source), or its DNAT target does; a DNAT target in such a prefix makes it
  any flow.

The answer is an ``Impact``: nothing, prefixes, or everything. It is
conservative by construction: where in doubt, everything. The routes that
changed come from the kept topology's lineage where it joins the two
snapshots (``core.livetopology.route_changes``), so a reaction on a large
table does not compare the tables. This module is pure; it decides nothing
about entries (``core.decide`` judges them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from topowatch.core.livetopology import route_changes
from topowatch.core.model import (
    AF_INET,
    AF_INET6,
    TABLE_DEFAULT,
    TABLE_LOCAL,
    TABLE_MAIN,
    TABLE_UNSPEC,
    IPNetwork,
    RuleAction,
    Topology,
    changed_routes,
)
from topowatch.core.nat import Hook, NatRuleset


@dataclass(frozen=True, slots=True)
class Impact:
    """``everything`` (with why), or the prefixes in which a flow's source or destination may change."""

    everything: bool = False
    prefixes: tuple[IPNetwork, ...] = ()
    why: str = ""

    @property
    def none(self) -> bool:
        return not self.everything and not self.prefixes

    def describe(self) -> str:
        if self.everything:
            return f"any flow ({self.why})"
        if not self.prefixes:
            return "no flow"
        shown = ", ".join(map(str, self.prefixes[:4]))
        more = f" and {len(self.prefixes) - 4} more" if len(self.prefixes) > 4 else ""
        return f"flows to or from {shown}{more}"


NOTHING = Impact()


def _nat_families(ruleset: NatRuleset) -> set[int]:
    if not isinstance(ruleset, NatRuleset):
        return {AF_INET, AF_INET6}  # not a ruleset we can read: any family may NAT
    return {
        family
        for family in (AF_INET, AF_INET6)
        for hook in Hook
        if ruleset.base_chains(hook, family)
    }


def _reached_tables(topology: Topology, family: int) -> set[int]:
    rules = [r for r in topology.rules if r.family == family]
    if not rules:
        return {TABLE_LOCAL, TABLE_MAIN, TABLE_DEFAULT}
    return {
        (r.table if r.table != TABLE_UNSPEC else TABLE_MAIN)
        for r in rules
        if r.action == RuleAction.TO_TBL
    }


def _links(topology: Topology) -> set[object]:
    # Everything of a link but its carrier.
    return {dataclasses.replace(link, running=True) for link in topology.links}


# Expressions of ``core.nat`` that hold no NAT statement (a Verdict names a chain, walked as a chain).
_NO_TARGETS = frozenset({
    "Match", "UnknownMatch", "Verdict", "Passive", "UnknownStatement", "AnyOf", "CtStateMatch",
    "CtStatusMatch", "CtTupleMatch", "AddrTypeMatch", "PolicyMatch", "MarkSet", "MarkCopy", "ConcatMatch",
    "VerdictMap", "Selector", "IntervalSet", "NameSet",
})


def _dnat_targets(value: object, depth: int = 0) -> Iterator[tuple[int, int, int]]:
    """(version, lo, hi) of every address a DNAT-like statement may translate to."""
    if depth > 200:
        yield (0, 0, 0)  # unreadable: taken as "anywhere"
        return
    name = type(value).__name__
    if name in _NO_TARGETS or isinstance(value, (str, int, bytes)) or value is None:
        return  # a match, a verdict or a value: no NAT statement inside (a rule's matches are most of it)
    if name in ("NatStatement", "NatMapStatement", "NetmapStatement"):
        kind = getattr(getattr(value, "kind", None), "value", "dnat")
        if name == "NetmapStatement" or kind in ("dnat", "redirect"):
            if kind == "redirect":
                return  # to a local address: addresses changing is "everything" already
            found = False
            for addr in _addresses_in(value):
                found = True
                yield addr
            if not found and name != "NatStatement":
                yield (0, 0, 0)
        return
    if isinstance(value, (tuple, list, frozenset, set)):
        for item in value:
            yield from _dnat_targets(item, depth + 1)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _dnat_targets(getattr(value, f.name), depth + 1)


_TARGETS: list[tuple[NatRuleset, tuple[tuple[int, int, int], ...]]] = []


def _targets_of(ruleset: NatRuleset) -> tuple[tuple[int, int, int], ...]:
    """``_dnat_targets``, remembered for the last rulesets (a ruleset is read again only on change)."""
    for seen, targets in _TARGETS:
        if seen is ruleset:
            return targets
    found = tuple(_dnat_targets(ruleset))
    _TARGETS.insert(0, (ruleset, found))
    del _TARGETS[4:]
    return found


def prepare(ruleset: NatRuleset) -> None:
    """Read a ruleset's DNAT targets ahead of the first change that needs them (between reactions)."""
    _targets_of(ruleset)


def prepared(ruleset: NatRuleset) -> bool:
    return any(seen is ruleset for seen, _ in _TARGETS)


def _addresses_in(value: object, depth: int = 0) -> Iterator[tuple[int, int, int]]:
    """(version, lo, hi) of the addresses, networks and address ranges in ``value``."""
    if depth > 50:
        return
    if isinstance(value, (IPv4Address, IPv6Address)):
        yield (value.version, int(value), int(value))
    elif hasattr(value, "network_address") and hasattr(value, "broadcast_address"):
        yield (value.version, int(value.network_address), int(value.broadcast_address))  # type: ignore[attr-defined]
    elif (isinstance(value, tuple) and len(value) == 2 and type(value[0]) is type(value[1])
          and isinstance(value[0], (IPv4Address, IPv6Address))):
        # An address range (``NatStatement.addr``, ``NatTarget.addr``; both refuse lo > hi): the
        # kernel may pick any address between its ends, so each is a target, not the ends only.
        # (A pair of single addresses read so covers more than they do: conservative; ordered, so
        # that it never covers less.)
        ends = sorted((int(value[0]), int(value[1])))
        yield (value[0].version, ends[0], ends[1])
    elif isinstance(value, (tuple, list, frozenset, set)):
        for item in value:
            yield from _addresses_in(item, depth + 1)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _addresses_in(getattr(value, f.name), depth + 1)


_FOLLOWED = frozenset({"links", "addresses", "routes", "rules"})


def _sa_keys(topology: Topology) -> frozenset[object]:
    """The usable SAs (``XfrmState.valid``) of a snapshot but their SPI: what a rekey keeps."""
    return frozenset(dataclasses.replace(st, spi=1) for st in topology.xfrm_states if st.valid)


def _reads_spi(value: object, depth: int = 0) -> bool:
    """Does anything in ``value`` (a ruleset) read an SA's SPI? Unreadable: True."""
    if depth > 200:
        return True
    name = type(value).__name__
    if name == "Selector":
        return getattr(getattr(value, "key", None), "name", "") == "IPSEC_SPI"
    if name == "PolicyElement":
        return getattr(value, "spi", None) is not None
    if name in ("IntervalSet", "NameSet") or isinstance(value, (str, int, bytes)) or value is None:
        return False
    if isinstance(value, (tuple, list, frozenset, set)):
        return any(_reads_spi(item, depth + 1) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(_reads_spi(getattr(value, f.name), depth + 1) for f in dataclasses.fields(value))
    return False


_SPI_READERS: list[tuple[NatRuleset, bool]] = []


def _ruleset_reads_spi(ruleset: NatRuleset) -> bool:
    """``_reads_spi``, remembered for the last rulesets."""
    for seen, reads in _SPI_READERS:
        if seen is ruleset:
            return reads
    reads = _reads_spi(ruleset)
    _SPI_READERS.insert(0, (ruleset, reads))
    del _SPI_READERS[4:]
    return reads


def _rekeyed(before: Topology, now: Topology, ruleset: NatRuleset) -> bool:
    """The SAs changed only as a rekey does (see the module docstring), and nothing reads an SPI."""
    if _sa_keys(before) != _sa_keys(now):
        return False
    if any(t.spi for p in (*before.xfrm_policies, *now.xfrm_policies) for t in p.templates):
        return False
    return not _ruleset_reads_spi(ruleset)


def impact(before: Topology, now: Topology, ruleset: NatRuleset) -> Impact:
    """What the change from ``before`` to ``now`` can re-NAT, under ``ruleset`` (the same for both)."""
    families = _nat_families(ruleset)
    if not families:
        return NOTHING
    for f in dataclasses.fields(Topology):
        # xfrm state and whatever else a snapshot carries beside links, addresses, routes, rules.
        if f.name not in _FOLLOWED and getattr(before, f.name) != getattr(now, f.name):
            if f.name == "xfrm_states" and _rekeyed(before, now, ruleset):
                continue
            return Impact(everything=True, why=f"{f.name.replace('_', ' ')} changed")
    if _links(before) != _links(now):
        return Impact(everything=True, why="links changed")
    prefixes: list[IPNetwork] = []
    # Snapshots kept from events know which routes changed between them (at the cost of the
    # change); any others are compared.
    known = route_changes(before.routes, now.routes)
    gone, came = known if known is not None else changed_routes(before.routes, now.routes)
    for family in sorted(families):
        rules0 = [r for r in before.rules if r.family == family]
        rules1 = [r for r in now.rules if r.family == family]
        if sorted(map(repr, rules0)) != sorted(map(repr, rules1)):
            return Impact(everything=True, why="policy rules changed")
        addrs0 = {a for a in before.addresses if a.family == family}
        addrs1 = {a for a in now.addresses if a.family == family}
        if addrs0 != addrs1 or [a for a in before.addresses if a.family == family] != [
            a for a in now.addresses if a.family == family
        ]:
            return Impact(everything=True, why="addresses changed")
        tables = _reached_tables(now, family)
        prefixes.extend(r.dst for r in (*gone, *came) if r.family == family and r.table in tables)
    if not prefixes:
        return NOTHING
    unique = tuple(sorted(set(prefixes), key=lambda n: (n.version, int(n.network_address), n.prefixlen)))
    spans = [(net.version, int(net.network_address), int(net.broadcast_address), net) for net in unique]
    for version, lo, hi in _targets_of(ruleset):
        if version == 0:
            return Impact(everything=True, why="a DNAT target cannot be read")
        for net_version, first, last, net in spans:
            if net_version == version and lo <= last and first <= hi:
                return Impact(everything=True, why=f"a DNAT target lies in {net}")
    return Impact(prefixes=unique)

