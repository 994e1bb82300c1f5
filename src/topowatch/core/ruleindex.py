# SPDX-License-Identifier: GPL-2.0-or-later
"""Which rules of a chain a packet can reach: an index of the chain's rules by one key.

A large NAT chain is mostly rules that open with a plain match on one field: a
thousand port forwards (``iifname "up2" udp dport 20001 dnat to ...``), per-customer
SNAT (``ip saddr 10.2.0.0/26 oifname "up2" snat to ...``). ``core.evaluate`` runs a
chain rule by rule, and a rule whose opening match is false costs microseconds: a
flow through two such chains, once per input interface it may have come in on,
costs tens of milliseconds. The index picks, for one packet, the rules whose match
on the indexed key holds, and every rule it does not index, in one lookup.

What it decides: only which rules are *skipped*. A rule is skipped only where its
indexed match (one of its guards, ``evaluate._rule_plan``: the plain matches that
open it) is certainly false for the packet, exactly where ``evaluate._match`` answers
False: a membership ``==`` without a mask, read at one exact value (``evaluate._point``),
with its implicit family and protocol dependencies. A rule whose match may be true or
unknown stays, and so does every rule the index does not hold; the order of rules is
never changed. Rules that cannot change a NAT decision (passive) are never reached.
It never evaluates a match itself and never reads the packet.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

from topowatch.core.nat import ADDRESS_KEYS, IntervalSet, Key, Match, NameSet, Op

# Keys whose value ``evaluate._point`` reads as one exact value.
INDEXED_KEYS = frozenset({
    Key.IIFNAME, Key.OIFNAME, Key.SADDR, Key.DADDR, Key.SPORT, Key.DPORT, Key.L4PROTO, Key.NFPROTO,
    Key.MARK, Key.CT_MARK, Key.CT_ZONE,
})  # fmt: skip
# Chains with fewer indexed rules are run rule by rule (the lookup would cost more than it saves).
MIN_INDEXED = 32
# A rule whose intervals span more elementary segments than this is not indexed (no quadratic build).
MAX_SPAN = 16


def address_value(version: int, value: int) -> int:
    """An address as the index reads it: the version above the address, so v4 and v6 never meet."""
    return (version << 128) | value


@dataclass(frozen=True, slots=True)
class _Group:
    """The indexed rules whose match has one (family, protocol) dependency."""

    family: int | None
    proto: int | None
    starts: tuple[int, ...] = ()  # elementary segments of interval keys: start, end, rules
    ends: tuple[int, ...] = ()
    rules: tuple[tuple[int, ...], ...] = ()
    names: dict[str, tuple[int, ...]] | None = None  # interface names: rules by exact name

    def hits(self, value: int | str) -> tuple[int, ...]:
        if self.names is not None:
            return self.names.get(value, ()) if isinstance(value, str) else ()
        if isinstance(value, str):
            return ()
        at = bisect_right(self.starts, value) - 1
        if at < 0 or value > self.ends[at]:
            return ()
        return self.rules[at]


@dataclass(frozen=True, slots=True)
class ChainIndex:
    """A chain's rules by ``key``: ``candidates`` for a packet's value, ascending rule positions."""

    key: Key
    always: tuple[int, ...]  # positions of the rules not indexed, ascending (passive ones left out)
    groups: tuple[_Group, ...]
    indexed: int  # rules held by the groups

    def candidates(self, family: int, proto: int, value: int | str) -> Sequence[int]:
        """The positions of the rules a packet of this family and protocol may reach, ascending.

        ``value`` is the packet's one exact value for ``key`` (``evaluate._point``; where it has
        none, every rule is a candidate and the index is not asked).
        """
        found: list[int] = []
        for group in self.groups:
            if group.family is not None and group.family != family:
                continue  # its matches are false for this family: skipped
            if group.proto is not None and group.proto != proto:
                continue
            found.extend(group.hits(value))
        if not found:
            return self.always
        return sorted({*self.always, *found})


def indexable(match: Match) -> bool:
    """Is ``match`` certainly false, for a packet with one exact value, when that value is outside it?"""
    if match.op is not Op.EQ or match.selector.key not in INDEXED_KEYS or match.selector.mask is not None:
        return False
    values = match.values
    if isinstance(values, NameSet):
        return not values.prefixes and not values.indexes
    if match.selector.key in ADDRESS_KEYS:
        return values.version in (4, 6)
    return values.version is None


def _intervals(match: Match) -> tuple[tuple[int, int], ...]:
    values = match.values
    assert isinstance(values, IntervalSet)
    if match.selector.key in ADDRESS_KEYS:
        assert values.version is not None
        return tuple((address_value(values.version, lo), address_value(values.version, hi))
                     for lo, hi in values.intervals)  # fmt: skip
    return values.intervals


def build(plans: Sequence[tuple[bool, Sequence[Match]]]) -> ChainIndex | None:
    """The index of a chain whose rules have these (passive, guards) plans, or None where it would not pay.

    The key is the one most rules open with an indexable match on (ties: the one with more
    distinct value sets); a rule with two such matches on it is indexed by the first.
    """
    by_key: dict[Key, list[tuple[int, Match]]] = {}
    for position, (passive, guards) in enumerate(plans):
        if passive:
            continue
        seen: set[Key] = set()
        for guard in guards:
            key = guard.selector.key
            if key not in seen and indexable(guard):
                seen.add(key)
                by_key.setdefault(key, []).append((position, guard))
    if not by_key:
        return None
    key = max(by_key, key=lambda k: (len(by_key[k]), len({m.values for _, m in by_key[k]}), k.value))
    chosen = by_key[key]
    if len(chosen) < MIN_INDEXED:
        return None
    held: dict[tuple[int | None, int | None], list[tuple[int, Match]]] = {}
    for position, match in chosen:
        held.setdefault((match.selector.family, match.selector.proto), []).append((position, match))
    groups: list[_Group] = []
    spilled: set[int] = set()
    for (family, proto), rules in held.items():
        if key in (Key.IIFNAME, Key.OIFNAME):
            names: dict[str, list[int]] = {}
            for position, match in rules:
                assert isinstance(match.values, NameSet)
                for name in match.values.exact:
                    names.setdefault(name, []).append(position)
            groups.append(_Group(family, proto, names={n: tuple(sorted(p)) for n, p in names.items()}))
            continue
        bounds = sorted({b for _, m in rules for lo, hi in _intervals(m) for b in (lo, hi + 1)})
        segments: dict[int, list[int]] = {}
        for position, match in rules:
            spans = [(bisect_right(bounds, lo) - 1, bisect_right(bounds, hi + 1) - 1)
                     for lo, hi in _intervals(match)]  # fmt: skip
            if sum(b - a for a, b in spans) > MAX_SPAN:
                spilled.add(position)
                continue
            for a, b in spans:
                for segment in range(a, b):
                    segments.setdefault(segment, []).append(position)
        ordered = sorted(segments)
        starts, ends = tuple(bounds[s] for s in ordered), tuple(bounds[s + 1] - 1 for s in ordered)
        rules_at = tuple(tuple(sorted(segments[s])) for s in ordered)
        groups.append(_Group(family, proto, starts=starts, ends=ends, rules=rules_at))
    indexed = {p for p, _ in chosen} - spilled
    always = tuple(p for p, (passive, _) in enumerate(plans) if not passive and p not in indexed)
    return ChainIndex(key, always, tuple(groups), len(indexed))
