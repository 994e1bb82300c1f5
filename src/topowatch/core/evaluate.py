# SPDX-License-Identifier: GPL-2.0-or-later
"""Predict the NAT a flow would get now, in the kernel's order, in three-valued logic.

Theory of operation (``nf_nat_inet_fn``): a new flow meets two NAT hooks.

1. DNAT side. A forwarded flow meets the nat chains at prerouting (``iif`` is
   its ingress, no ``oif``); a locally generated flow meets those at output
   (no ``iif``; ``oif`` is the route chosen before DNAT). A locally generated
   flow whose route is blackhole/unreachable/prohibit is never sent (the
   socket's route lookup fails): dropped, before any hook.
2. The flow, with its destination translated, is routed (``Fib.egress``).
3. SNAT side, per egress: postrouting (``oif`` is the egress) for unicast and
   for locally generated flows; input (no ``oif``) for a forwarded flow
   delivered to this host. Flows routed to blackhole/unreachable/prohibit
   never get there.

At a hook the chains of the flow's family (ip or ip6, and inet) run by
priority. Chains of equal priority run in the order they were registered
(the one registered last first), which no dump shows (an iptables-nft nat
table and an nft table at srcnat 100, say): ``predict`` follows each order
of the nat chains, and where the orders give the flow different predictions
each is an alternative (``Prediction.alternatives``); mark chains of equal
priority whose orders disagree leave the marks unknown. Within a
chain the rules run in order, with nft's jump (returns here), goto (does
not), return, continue and accept (ends this chain only; the next chain of
the hook still runs). The first NAT statement that fires decides the hook:
later chains are not consulted. ``drop`` (a rule or a
chain's policy) drops the flow, as does a masquerade with no address on the
output interface or a redirect with none on the input interface. No binding
at all is the null binding ``NO_NAT``.

nftables lookups: a set, concatenation or map hits the element holding the
packet's key (nft keeps elements disjoint); a miss ends the rule (NFT_BREAK)
without a verdict or NAT. ``fib ... type`` asks the FIB for the address type,
``fib saddr . iif oif`` is the inferred ingress (the same reverse path), a
first packet's ``ct state`` is new and its ``ct status`` has no bits but
DST_NAT (after a DNAT, at the SNAT side). ``numgen``/``jhash`` are any value
of their range: a NAT map keyed by one binds to any element it reaches (a
set of bindings, the kernel's pick unpredictable) and, if it can miss the
map, is unknown.

Three-valued logic: a match is true, false or ``Unknown`` (an unmodelled
expression, the packet mark we are not told, a port range only partly
inside). At an unknown match the evaluator follows both branches and keeps
the answer only if every branch gives the same outcome; otherwise the side is
``Unknown``, naming the first rule and expression that made it so. Reaching
an unmodelled statement makes the side unknown. Unknown propagates: an
unknown DNAT side makes egress and SNAT side unknown too.

The answer for a side is the set of bindings it could get (several with
multipath routes or DNAT ranges). **An empty set means the flow would be
dropped**; ``Prediction.explain`` says by what. What the entry does not say
and the answer depends on (the input interface where reverse-path filtering
does not pin it, the path of a multipath route, the order of equal-priority
nat chains, a locally generated flow's socket mark where only ``fwmark``
rules read it) is followed as alternatives, each a prediction of its own.

This module never performs I/O and never guesses: what it does not model is
``Unknown``.
"""

from __future__ import annotations

import enum
import itertools
import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Final, TypeVar

from topowatch.core import ruleindex
from topowatch.core.fib import Fib
from topowatch.core.flow import (
    NO_NAT,
    PORT_PROTOS,
    REFUSING,
    Binding,
    Egress,
    EgressKind,
    Flow,
    Ingress,
    NatKind,
    Prediction,
    RuleRef,
    Unknown,
    proto_name,
)
from topowatch.core.model import IPAddress
from topowatch.core.nat import (
    XFRM_KEYS,
    AddrTypeMatch,
    AnyOf,
    Chain,
    ConcatMatch,
    CtStateMatch,
    CtStatusMatch,
    CtTupleMatch,
    ElementKey,
    Hook,
    IntervalSet,
    Key,
    MarkCopy,
    MarkSet,
    Match,
    NameSet,
    NatMapStatement,
    NatRuleset,
    NatStatement,
    NatTarget,
    NetmapStatement,
    Op,
    Passive,
    PolicyMatch,
    Rule,
    Selector,
    UnknownMatch,
    UnknownStatement,
    Verdict,
    VerdictKind,
    VerdictMap,
    XtMatch,
    layout_twin,
)
from topowatch.core.xfrm import XfrmFlow, lookup, nft_match
from topowatch.core.xtmatch import xt_match

# Branches followed per hook before giving up ("too many unknown matches").
MAX_BRANCHES = 256
# Addresses of a DNAT range routed one by one; a wider range leaves the egress unknown.
MAX_DNAT_ADDRESSES = 64
# nft's jump stack (NFT_JUMP_STACK_SIZE).
MAX_JUMP_DEPTH = 16
# Orders of equal-priority chains followed per hook before giving up (4 chains at one priority).
MAX_CHAIN_ORDERS = 24

DNAT_KINDS = frozenset({NatKind.DNAT, NatKind.REDIRECT})
SNAT_KINDS = frozenset({NatKind.SNAT, NatKind.MASQUERADE})


@dataclass(frozen=True, slots=True)
class _Packet:
    """What matches read. ``dport`` is a range: a DNAT to a port range leaves it open."""

    family: int
    proto: int
    saddr: IPAddress
    daddr: IPAddress
    sport: int
    dport: tuple[int, int]
    mark: int | None
    # None: unknown. A new entry starts with ct mark 0; an entry whose mark is not 0 had it
    # set by some rule at some time, before its NAT or after it: which, the entry cannot say.
    ct_mark: int | None
    zone: int
    iif: Ingress | None | Unknown
    oif: Egress | None | Unknown
    # IPS_DST_NAT as the SNAT side sees it (None: the DNAT may have left the tuple unchanged).
    dst_nat: bool | None = False


# A packet is copied with a field or two changed several times per prediction: ``replace`` and the
# frozen class's own ``__init__`` (a call per field) cost several times what filling a plain slotted
# twin of the same layout and then handing it the class does (as ``core.nat``'s readers do). The
# class has no ``__post_init__``: the copy is the very value ``replace`` would build.
_PACKET_FIELDS = ("family", "proto", "saddr", "daddr", "sport", "dport", "mark", "ct_mark", "zone", "iif",
                  "oif", "dst_nat")  # fmt: skip
if hasattr(_Packet, "__post_init__"):
    raise ImportError("core.evaluate: _Packet has a __post_init__ its layout twin would skip")
_PacketTwin: Any = layout_twin(_Packet, _PACKET_FIELDS)  # fields changed: update _new_packet and _packet


class _Keep(enum.Enum):
    """A field ``_packet`` keeps (None is a value of some fields)."""

    KEEP = 0


_KEEP: Final = _Keep.KEEP
_new = object.__new__


def _new_packet(*, family: int, proto: int, saddr: IPAddress, daddr: IPAddress, sport: int,
                dport: tuple[int, int], mark: int | None, ct_mark: int | None, zone: int,
                iif: Ingress | None | Unknown, oif: Egress | None | Unknown, dst_nat: bool | None) -> _Packet:
    """``_Packet(...)`` (every field given)."""
    q = _new(_PacketTwin)
    q.family = family
    q.proto = proto
    q.saddr = saddr
    q.daddr = daddr
    q.sport = sport
    q.dport = dport
    q.mark = mark
    q.ct_mark = ct_mark
    q.zone = zone
    q.iif = iif
    q.oif = oif
    q.dst_nat = dst_nat
    q.__class__ = _Packet
    return q  # type: ignore[no-any-return]


def _packet(p: _Packet, *, daddr: IPAddress | None = None, dport: tuple[int, int] | None = None,
            mark: int | None | _Keep = _KEEP, ct_mark: int | None | _Keep = _KEEP,
            oif: Egress | None | Unknown | _Keep = _KEEP, dst_nat: bool | None | _Keep = _KEEP) -> _Packet:
    """``replace(p, ...)`` for the fields given (``daddr``/``dport`` None and ``_KEEP``: unchanged)."""
    q = _new(_PacketTwin)
    q.family = p.family
    q.proto = p.proto
    q.saddr = p.saddr
    q.daddr = p.daddr if daddr is None else daddr
    q.sport = p.sport
    q.dport = p.dport if dport is None else dport
    q.mark = p.mark if mark is _KEEP else mark
    q.ct_mark = p.ct_mark if ct_mark is _KEEP else ct_mark
    q.zone = p.zone
    q.iif = p.iif
    q.oif = p.oif if oif is _KEEP else oif
    q.dst_nat = p.dst_nat if dst_nat is _KEEP else dst_nat
    q.__class__ = _Packet
    return q  # type: ignore[no-any-return]


# Hook outcomes. ``value`` is what branches are compared by; ``reason`` says why.
@dataclass(frozen=True, slots=True)
class _Bound:
    binding: Binding
    reason: str
    rule: RuleRef | None = None  # the rule that bound (``_Evaluator.hook`` names it)

    @property
    def value(self) -> object:
        return self.binding


@dataclass(frozen=True, slots=True)
class _Dropped:
    reason: str
    rule: RuleRef | None = None  # the rule that dropped (None: a chain's policy)

    @property
    def value(self) -> object:
        return "drop"


@dataclass(frozen=True, slots=True)
class _Null:
    reason: str = "no nat rule bound (null binding)"

    @property
    def value(self) -> object:
        return NO_NAT


@dataclass(frozen=True, slots=True)
class _BoundAny:
    """Any one of several bindings (a numgen/jhash map): the kernel's pick is not predictable."""

    bindings: frozenset[Binding]
    reason: str
    rule: RuleRef | None = None

    @property
    def value(self) -> object:
        return self.bindings


@dataclass(frozen=True, slots=True)
class _Marks:
    """The packet and conntrack marks after a hook's mark chains (None: not known)."""

    mark: int | None
    ct_mark: int | None
    reason: str = "marks"

    @property
    def value(self) -> object:
        return (self.mark, self.ct_mark)


_Outcome = _Bound | _BoundAny | _Dropped | _Null | _Marks
_NULL = _Null()  # immutable: one serves every hook that bound nothing


def _with_rule(step: _Bound | _BoundAny | _Dropped, rule: RuleRef) -> _Bound | _BoundAny | _Dropped:
    """``replace(step, rule=rule)`` (none of these classes has a ``__post_init__``)."""
    if isinstance(step, _Bound):
        return _Bound(step.binding, step.reason, rule)
    if isinstance(step, _BoundAny):
        return _BoundAny(step.bindings, step.reason, rule)
    return _Dropped(step.reason, rule)


class _Choice(Exception):
    """A run reached an unknown match that its tape of choices does not cover."""

    def __init__(self, reason: str, rule: RuleRef | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rule = rule  # the rule it was met in (``_Evaluator._run_chain`` names it)


class _Unmodelled(Exception):
    """A run reached something whose effect is not modelled: the hook's answer is unknown."""

    def __init__(self, reason: str, rule: RuleRef | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rule = rule


class _Tape:
    """The truth values assumed for the unknown matches met so far, in order."""

    def __init__(self, choices: tuple[bool, ...]) -> None:
        self.choices = choices
        self.pos = 0

    def decide(self, reason: str) -> bool:
        if self.pos < len(self.choices):
            self.pos += 1
            return self.choices[self.pos - 1]
        raise _Choice(reason)


def _explore(run: Callable[[_Tape], _Outcome]) -> _Outcome | Unknown:
    """Run every branch of the unknown matches; one outcome if all agree, else Unknown."""
    pending: list[tuple[bool, ...]] = [()]
    outcomes: list[_Outcome] = []
    first_unknown: str | None = None
    first_rule: RuleRef | None = None
    runs = 0
    while pending:
        runs += 1
        if runs > MAX_BRANCHES:
            return Unknown(f"{first_unknown} (and too many unknown matches to follow)", first_rule)
        choices = pending.pop()
        try:
            outcomes.append(run(_Tape(choices)))
        except _Choice as choice:
            if first_unknown is None:
                first_unknown, first_rule = choice.reason, choice.rule
            pending.extend([(*choices, False), (*choices, True)])
        except _Unmodelled as unmodelled:
            if first_unknown is None:
                return Unknown(unmodelled.reason, unmodelled.rule)
            return Unknown(first_unknown, first_rule)
        if len(outcomes) > 1 and len({o.value for o in outcomes}) > 1:
            assert first_unknown is not None
            return Unknown(first_unknown, first_rule)
    return outcomes[0]


# ``_ties`` of the chains of a hook (the same tuples every call, ``_nat_chains``), by identity.
_TIES: dict[int, tuple[tuple[Chain, ...], list[tuple[Chain, ...]]]] = {}


def _ties(chains: tuple[Chain, ...]) -> list[tuple[Chain, ...]]:
    """The groups of two or more chains that share a priority (``chains`` sorted by priority). Read only."""
    found = _TIES.get(id(chains))
    if found is not None and found[0] is chains:
        return found[1]
    if len(_TIES) >= 1024:
        _TIES.clear()
    ties = _TIES[id(chains)] = (chains, _tied(chains))
    return ties[1]


def _tied(chains: tuple[Chain, ...]) -> list[tuple[Chain, ...]]:
    groups = [tuple(group) for _, group in itertools.groupby(chains, key=lambda c: c.priority or 0)]
    return [group for group in groups if len(group) > 1]


def _orders(chains: tuple[Chain, ...]) -> Iterator[tuple[Chain, ...]]:
    """Every order of ``chains`` that keeps priority order (dump order first)."""
    groups = [tuple(group) for _, group in itertools.groupby(chains, key=lambda c: c.priority or 0)]
    for choice in itertools.product(*(itertools.permutations(group) for group in groups)):
        yield tuple(c for group in choice for c in group)


def _describe_tie(group: tuple[Chain, ...]) -> str:
    first = group[0]
    hook = first.hook.value if first.hook is not None else "?"
    return f"{' and '.join(c.describe() for c in group)} share hook {hook} priority {first.priority}"


def _addr_int(addr: IPAddress) -> int:
    return int(addr)


def _device(dev: Ingress | Egress | None) -> tuple[str, int]:
    if dev is None:
        return "", 0
    if isinstance(dev, Ingress):
        return dev.ifname, dev.ifindex
    if dev.kind is EgressKind.LOCAL and not dev.oifname:
        return "lo", dev.oif
    return dev.oifname, dev.oif


def _match(m: Match, p: _Packet) -> bool | Unknown:
    """Evaluate one match on a packet: True, False or Unknown with a reason."""
    sel = m.selector
    # Implicit dependencies (nfproto for ip/ip6 payload, l4proto for tcp/udp ports) are plain
    # conjuncts: a failed dependency makes the rule false whatever the operator.
    if sel.family is not None and sel.family != p.family:
        return False
    if sel.proto is not None and sel.proto != p.proto:
        return False
    key = sel.key
    hit: bool | None
    if isinstance(m.values, NameSet):
        dev = p.iif if key in (Key.IIFNAME, Key.IIF) else p.oif
        if isinstance(dev, Unknown):
            return Unknown(f"{sel.text} is unknown: {dev.reason}")
        name, index = _device(dev)
        if key in (Key.IIF, Key.OIF):
            hit = name in m.values.exact or index in m.values.indexes
        else:
            hit = m.values.contains(name)
    else:
        lo: int
        hi: int
        if key is Key.L4PROTO:
            lo = hi = p.proto
        elif key is Key.NFPROTO:
            lo = hi = p.family
        elif key in (Key.SADDR, Key.DADDR):
            addr = p.saddr if key is Key.SADDR else p.daddr
            if m.values.version != addr.version:
                hit = False
                return hit if m.op is Op.EQ else not hit
            lo = hi = _addr_int(addr)
        elif key in (Key.SPORT, Key.DPORT):
            if p.proto not in PORT_PROTOS:
                return Unknown(f"{sel.text} of a {proto_name(p.proto)} packet reads no port")
            lo, hi = (p.sport, p.sport) if key is Key.SPORT else p.dport
        elif key is Key.MARK:
            if p.mark is None:
                return Unknown("the packet mark of the flow's first packet is not known")
            lo = hi = p.mark
        elif key is Key.CT_MARK:
            if p.ct_mark is None:
                return Unknown("the entry's conntrack mark may have been set after its NAT; the mark a "
                               "new flow has at this point is not known")
            lo = hi = p.ct_mark
        elif key is Key.CT_ZONE:
            lo = hi = p.zone
        else:  # pragma: no cover - every Key is handled above
            return Unknown(f"selector {sel.text} not modelled")
        if sel.mask is not None:
            if lo != hi:
                return Unknown(f"{sel.text} of a range of values")
            lo = hi = lo & sel.mask
        hit = m.values.covers(lo, hi)
        if hit is None:
            return Unknown(f"{sel.text} {lo}-{hi} is only partly in {m.values.describe()}")
    return hit if m.op is Op.EQ else not hit


@dataclass(frozen=True, slots=True)
class _Side:
    """One NAT hook's question: which chains, which packet, which side, and what the kernel knows."""

    hook: Hook
    chains: tuple[Chain, ...]
    packet: _Packet
    kinds: frozenset[NatKind]
    ingress: Ingress


class _Evaluator:
    def __init__(self, ruleset: NatRuleset, fib: Fib, flow: Flow | None = None, order: _Order | None = None
                 ) -> None:  # fmt: skip
        self.ruleset = ruleset
        self.fib = fib
        self.flow = flow
        # The order of nat chains that share a hook and a priority (None: follow every order).
        self.order = order
        # The packet as mark statements changed it in this run of a hook (None: unchanged).
        self._marked: _Packet | None = None
        # The mark the packet's route was looked up with (``routed_with``; _KEEP: the packet's own).
        self.route_mark: int | None | _Keep = _KEEP
        self._route_flow: Flow | None = None  # ``flow`` with that mark, for ``-m policy`` (built once)

    def routed_with(self, mark: int | None) -> None:
        """The packet's route, from here on, was looked up with ``mark``.

        ``rt ipsec``, ``ipsec out`` and ``-m policy --dir out`` read the bundle of
        the packet's route (``skb_dst(skb)->xfrm``), which the xfrm lookup made
        with the mark the packet had then (``xfrm_decode_session``: forwarded, as
        it leaves prerouting; local, as output's mark chains re-route it), not
        the mark a later mark rule sets.
        """
        self.route_mark = mark
        self._route_flow = None

    def hook(self, side: _Side, marks: bool = False) -> _Outcome | Unknown:
        """The hook's outcome, the same in every order the kernel may run equal-priority chains in.

        With ``marks``, ``side.chains`` are mark chains and the outcome is the
        marks after them (``_Marks``) or a drop.
        """
        run = self._run_marks if marks else self._run_hook
        tied = _ties(side.chains)
        order = self.order
        if tied and order is not None and not marks:
            # The order chosen for each group that matters; the other groups (every chain but one
            # empty, ``_order_alternatives``) run alike in any order.
            chains = side.chains
            for group in tied:
                chosen = order.get(tuple(c.key for c in group))
                if chosen is not None:
                    start = next(i for i, c in enumerate(chains) if c is group[0])
                    chains = (*chains[:start], *chosen, *chains[start + len(group):])
            ordered = replace(side, chains=chains)
            return _explore(lambda tape: run(ordered, tape))
        if not tied:
            return _explore(lambda tape: run(side, tape))
        orders = math.prod(math.factorial(len(group)) for group in tied)
        names = "; ".join(_describe_tie(group) for group in tied)
        if orders > MAX_CHAIN_ORDERS:
            return Unknown(f"{names}: too many orders to follow")

        def explore(ordered: _Side) -> _Outcome | Unknown:
            return _explore(lambda tape: run(ordered, tape))

        first: _Outcome | None = None
        for chains in _orders(side.chains):
            outcome = explore(replace(side, chains=chains))
            if isinstance(outcome, Unknown):
                return outcome
            if first is None:
                first = outcome
            elif outcome.value != first.value:
                return Unknown(f"{names}; they run in registration order, which the ruleset dump does not "
                               f"show, and the orders give this flow different outcomes")
        assert first is not None
        return first

    def _run_marks(self, side: _Side, tape: _Tape) -> _Outcome:
        self._marked = None
        for chain in side.chains:
            result = self._run_chain(chain, side, tape)
            if isinstance(result, _Dropped):
                return result
        packet = self._marked or side.packet
        return _Marks(packet.mark, packet.ct_mark)

    def _run_hook(self, side: _Side, tape: _Tape) -> _Outcome:
        self._marked = None
        for chain in side.chains:
            result = self._run_chain(chain, side, tape)
            if result is not None:
                return result
        return _NULL

    def _run_chain(self, base: Chain, side: _Side, tape: _Tape) -> _Bound | _BoundAny | _Dropped | None:
        """Run one base chain: an outcome that ends the hook, or None (accepted: next chain).

        A chain runs only the rules its index says the packet may reach (``core.ruleindex``);
        ``index`` is the position of the next rule to consider, ``order`` the candidates read for
        ``seen`` (the packet: a mark statement replaces it, and the candidates are read again).
        """
        stack: list[tuple[Chain, int, Sequence[int], int, _Packet]] = []
        chain, index = base, 0
        seen = self._marked or side.packet
        order = _order(chain, seen)
        at = 0
        while True:
            packet = self._marked or side.packet
            if packet is not seen:  # a rule changed the packet: read the candidates again from here
                seen, order = packet, _order(chain, packet)
                at = bisect_left(order, index)
            if at >= len(order):
                if stack:
                    chain, index, order, at, seen = stack.pop()
                    continue
                return self._policy(base)
            position = order[at]
            rule = chain.rules[position]
            index, at = position + 1, at + 1
            try:
                step = self._run_rule(chain, rule, side, tape)
            except (_Choice, _Unmodelled) as unknown:
                if unknown.rule is None:
                    unknown.rule = RuleRef(chain.describe(), rule.handle, rule.text)
                raise
            if step is None:
                continue
            if isinstance(step, _Bound | _BoundAny | _Dropped):
                return _with_rule(step, RuleRef(chain.describe(), rule.handle, rule.text))
            if step.kind is VerdictKind.ACCEPT:
                return None
            if step.kind is VerdictKind.RETURN:
                if stack:
                    chain, index, order, at, seen = stack.pop()
                    continue
                return self._policy(base)
            if step.kind is VerdictKind.CONTINUE:
                continue
            target = self.ruleset.chain(chain.family, chain.table, step.target or "")
            if target is None or target.is_base:
                where = self.ruleset.describe_rule(chain, rule)
                raise _Unmodelled(f"{where}: {step.kind.value} to a chain not in the ruleset",
                                  RuleRef(chain.describe(), rule.handle, rule.text))
            if step.kind is VerdictKind.JUMP:
                stack.append((chain, index, order, at, seen))
            if len(stack) >= MAX_JUMP_DEPTH:
                raise _Unmodelled(f"{self.ruleset.describe_rule(chain, rule)}: jumps nest too deep",
                                  RuleRef(chain.describe(), rule.handle, rule.text))
            seen = self._marked or side.packet
            chain, index, order, at = target, 0, _order(target, seen), 0

    def _policy(self, base: Chain) -> _Dropped | None:
        if base.policy == "drop":
            return _Dropped(f"{base.describe()}: policy drop")
        return None

    def _run_rule(
        self, chain: Chain, rule: Rule, side: _Side, tape: _Tape
    ) -> Verdict | _Bound | _BoundAny | _Dropped | None:
        """Run one rule's expressions in order; None when the rule does not end in a verdict."""
        passive, guards = _rule_plan(rule)
        if passive:
            return None  # matches and counters only: whatever it matches, it changes nothing
        if guards:
            packet = self._marked or side.packet
            for guard in guards:
                if _match(guard, packet) is False:
                    return None  # as the loop below would, a step later
        where = self.ruleset.describe_rule(chain, rule)
        for expr in rule.exprs:
            if isinstance(expr, NftExpr) and _is_nft(expr):
                nft_step = self._nft(expr, side, tape, where)
                if nft_step is True:
                    continue
                if nft_step is False:
                    return None
                if isinstance(nft_step, Verdict) and nft_step.kind is VerdictKind.DROP:
                    return _Dropped(where)
                return nft_step
            if isinstance(expr, XtMatch | MarkSet | MarkCopy | NetmapStatement):
                step = self._xt(expr, side, tape, where)
                if step is False:
                    return None
                if isinstance(step, _Bound | _Dropped):
                    return step
                continue
            if isinstance(expr, Match):
                packet = self._marked or side.packet
                if expr.selector.key in XFRM_KEYS:
                    value = self._xfrm(expr, side, packet)
                else:
                    value = _match(expr, packet)
                if isinstance(value, Unknown):
                    value = tape.decide(f"{where}: {value.reason}")
                if not value:
                    return None
            elif isinstance(expr, UnknownMatch):
                if not tape.decide(f"{where}: {expr.reason}"):
                    return None
            elif isinstance(expr, Passive):
                continue
            elif isinstance(expr, UnknownStatement):
                raise _Unmodelled(f"{where}: {expr.reason}")
            elif isinstance(expr, NatStatement):
                if expr.family is not None and expr.family != side.packet.family:
                    continue  # nft_nat_inet_eval skips a statement of the other family
                return self._nat(expr, side, where)
            elif isinstance(expr, Verdict):
                if expr.kind is VerdictKind.DROP:
                    return _Dropped(f"{where}")
                return expr
            else:  # pragma: no cover - every expression kind is dispatched above
                raise _Unmodelled(f"{where}: {type(expr).__name__} is not evaluated")
        return None

    def _xfrm(self, m: Match, side: _Side, p: _Packet) -> bool | Unknown:
        """``rt ipsec``, ``meta secpath``, ``ipsec ...``: ``core.xfrm`` answers for the packet here."""
        if isinstance(p.oif, Unknown):
            return Unknown(f"{m.selector.text}: the output interface is unknown: {p.oif.reason}")
        return nft_match(m, self.fib.topology, _xfrm_flow(p, mark=self.route_mark), side.hook.value,
                         local=side.ingress.local)

    def _xt(
        self, expr: XtMatch | MarkSet | MarkCopy | NetmapStatement, side: _Side, tape: _Tape, where: str
    ) -> bool | _Bound | _Dropped:
        """The iptables matches and statements: False ends the rule, True goes on."""
        packet = self._marked or side.packet
        before_routing = side.hook in (Hook.PREROUTING, Hook.OUTPUT)
        if isinstance(expr, MarkSet | MarkCopy) and side.kinds and before_routing:
            raise _Unmodelled(f"{where}: a mark set in a nat chain before routing is not modelled")
        if isinstance(expr, MarkCopy):
            if expr.to_ct:
                self._marked = _packet(packet, ct_mark=expr.apply(packet.ct_mark, packet.mark))
            else:
                self._marked = _packet(packet, mark=expr.apply(packet.mark, packet.ct_mark))
            return True
        if isinstance(expr, MarkSet):
            if expr.ct:
                self._marked = _packet(packet, ct_mark=expr.apply(packet.ct_mark))
            else:
                self._marked = _packet(packet, mark=expr.apply(packet.mark))
            return True
        if isinstance(expr, NetmapStatement):
            kind = NatKind.DNAT if side.hook in (Hook.PREROUTING, Hook.OUTPUT) else NatKind.SNAT
            addr = packet.daddr if kind is NatKind.DNAT else packet.saddr
            if addr.version != expr.prefix.version:
                raise _Unmodelled(f"{where}: address family does not match the flow")
            mapped = expr.map(addr)
            return _Bound(Binding(kind, mapped, mapped), f"{where} (to {mapped})")
        value: bool | Unknown
        if isinstance(expr, AnyOf):
            parts = [_match(m, packet) for m in expr.matches]
            if any(p is True for p in parts):
                value = True
            else:
                unknown = [p for p in parts if isinstance(p, Unknown)]
                value = unknown[0] if unknown else False
        else:
            flow = self.flow
            mark = self.route_mark
            if flow is not None and mark is not _KEEP and mark != flow.packet_mark:
                if self._route_flow is None:
                    self._route_flow = replace(flow, packet_mark=mark)
                flow = self._route_flow
            value = xt_match(expr, packet, self.fib, flow, hook=side.hook, local=side.ingress.local)
        if isinstance(value, Unknown):
            return tape.decide(f"{where}: {value.reason}")
        return value

    # -- nftables breadth: fib, numgen/hash, ct status NAT bits, lookups, NAT maps -------------

    def _nft(
        self, expr: NftExpr, side: _Side, tape: _Tape, where: str
    ) -> bool | Verdict | _Bound | _BoundAny | _Dropped:
        """True goes on, False ends the rule; a verdict or an outcome as ``_run_rule`` returns."""
        packet = self._marked or side.packet
        if isinstance(expr, Match):
            value = self._component(expr.selector, expr.values, packet, side)
            return self._decided(value, tape, where, expr.op)
        if isinstance(expr, CtStatusMatch):
            flags = dict(_FIRST_PACKET_STATUS, DST_NAT=packet.dst_nat)
            status = _any_status(flags, expr.statuses)
            if not isinstance(status, Unknown):
                status = status != expr.negate
            return self._decided(status, tape, where)
        if isinstance(expr, ConcatMatch):
            found = self._lookup(expr.selectors, list(expr.elements), packet, side, tape=tape, where=where)
            return (found is not None) == (expr.op is Op.EQ)
        if isinstance(expr, VerdictMap):
            keys = [k for k, _ in expr.elements]
            found = self._lookup(expr.selectors, keys, packet, side, tape=tape, where=where)
            return False if found is None else expr.elements[found][1]
        return self._nat_map(expr, side, packet, tape, where)

    @staticmethod
    def _decided(value: bool | Unknown, tape: _Tape, where: str, op: Op = Op.EQ) -> bool:
        if isinstance(value, Unknown):
            return tape.decide(f"{where}: {value.reason}")
        return value if op is Op.EQ else not value

    def _component(
        self, sel: Selector, values: IntervalSet | NameSet, p: _Packet, side: _Side
    ) -> bool | Unknown:
        """Whether the packet's value of ``sel`` is in ``values`` (``==``), three-valued."""
        key = sel.key
        if key in (Key.NUMGEN, Key.HASH):
            assert isinstance(values, IntervalSet)
            lo, hi = _random_range(sel)
            hit = values.covers(lo, hi)
            if hit is None:
                return Unknown(f"{sel.text} is any of {lo}-{hi}, only some in {values.describe()}")
            return hit
        if key is Key.FIB_TYPE:
            assert isinstance(values, IntervalSet)
            addr = p.daddr if "daddr" in sel.params else p.saddr
            dev: int | None = None
            if "iif" in sel.params:
                if not isinstance(p.iif, Ingress):
                    return Unknown(f"{sel.text}: no known input interface here")
                dev = p.iif.ifindex
            rtype = self.fib.address_type(addr, dev)
            if isinstance(rtype, Unknown):
                return Unknown(f"{sel.text}: {rtype.reason}")
            return values.covers(int(rtype), int(rtype)) is True
        if key in (Key.FIB_OIF, Key.FIB_OIFNAME):
            # The reverse path of the source is how the flow's ingress was inferred: its oif is the iif.
            if not isinstance(p.iif, Ingress):
                return Unknown(f"{sel.text}: no known input interface here")
            if isinstance(values, NameSet):
                return values.contains(p.iif.ifname)
            return values.covers(p.iif.ifindex, p.iif.ifindex) is True
        m = Match(sel, Op.EQ, values, sel.text)
        return self._xfrm(m, side, p) if key in XFRM_KEYS else _match(m, p)

    def _lookup(
        self, selectors: tuple[Selector, ...], keys: list[ElementKey], p: _Packet, side: _Side, *,
        tape: _Tape, where: str,
    ) -> int | None:
        """The index of the element holding the packet's key, None if none (elements are disjoint).

        A numgen/hash key whose whole range the elements cover always hits one:
        the "no element" branch is not followed then.
        """
        candidates: list[tuple[int, Unknown | None]] = []
        for index, key in enumerate(keys):
            parts = [self._component(s, v, p, side) for s, v in zip(selectors, key, strict=True)]
            if any(part is False for part in parts):
                continue
            unknown = next((part for part in parts if isinstance(part, Unknown)), None)
            candidates.append((index, unknown))
        exhaustive = False
        if len(selectors) == 1 and selectors[0].key in (Key.NUMGEN, Key.HASH):
            lo, hi = _random_range(selectors[0])
            spans = tuple(iv for k in keys if isinstance(k[0], IntervalSet) for iv in k[0].intervals)
            exhaustive = IntervalSet(spans).covers(lo, hi) is True
        for position, (index, unknown) in enumerate(candidates):
            if unknown is None or (exhaustive and position == len(candidates) - 1):
                return index
            if tape.decide(f"{where}: {unknown.reason}"):
                return index
        return None

    def _nat_map(
        self, stmt: NatMapStatement, side: _Side, p: _Packet, tape: _Tape, where: str
    ) -> bool | _Bound | _BoundAny:
        if stmt.family is not None and stmt.family != p.family:
            return True  # nft_nat_inet_eval skips a statement of the other family
        if stmt.kind not in side.kinds:
            raise _Unmodelled(f"{where}: {stmt.kind.value} in a {side.hook.value} chain")
        if len(stmt.selectors) == 1 and stmt.selectors[0].key in (Key.NUMGEN, Key.HASH):
            lo, hi = _random_range(stmt.selectors[0])
            reached = [t for k, t in stmt.elements if k[0].covers(lo, hi) is not False]  # type: ignore[union-attr]
            spans = tuple(iv for k, _ in stmt.elements for iv in k[0].intervals)  # type: ignore[union-attr]
            whole = IntervalSet(spans).covers(lo, hi) is True
            if not whole and not tape.decide(f"{where}: {stmt.selectors[0].text} may miss the map"):
                return False
            if not reached:
                return False
            bindings = frozenset(self._target(stmt, t, p, where) for t in reached)
            text = ", ".join(sorted(b.addr_text or "" for b in bindings))
            return _BoundAny(bindings, f"{where} (any of {text})")
        found = self._lookup(stmt.selectors, [k for k, _ in stmt.elements], p, side, tape=tape, where=where)
        if found is None:
            return False  # no element: NFT_BREAK, the rule ends without NAT
        binding = self._target(stmt, stmt.elements[found][1], p, where)
        return _Bound(binding, f"{where} (to {binding.addr_text})")

    @staticmethod
    def _target(stmt: NatMapStatement, target: NatTarget, p: _Packet, where: str) -> Binding:
        lo, hi = target.addr
        if lo.version != p.saddr.version:
            raise _Unmodelled(f"{where}: address family does not match the flow")
        ports = target.ports or (None, None)
        if stmt.netmap:
            original = p.saddr if stmt.kind is NatKind.SNAT else p.daddr
            keep = int(lo) ^ int(hi)  # NF_NAT_RANGE_NETMAP: the bits that vary across the range are kept
            mapped_int = (int(original) & keep) | (int(lo) & ~keep)
            mapped = IPv4Address(mapped_int) if lo.version == 4 else IPv6Address(mapped_int)
            return Binding(stmt.kind, mapped, mapped, *ports)
        return Binding(stmt.kind, lo, hi, *ports)

    def _nat(self, stmt: NatStatement, side: _Side, where: str) -> _Bound | _Dropped:
        if stmt.kind not in side.kinds:
            raise _Unmodelled(f"{where}: {stmt.kind.value} in a {side.hook.value} chain")
        ports = stmt.ports or (None, None)
        if stmt.kind is NatKind.MASQUERADE:
            oif = side.packet.oif
            if not isinstance(oif, Egress):
                raise _Unmodelled(f"{where}: masquerade without a known output interface")
            if oif.masquerade_source is None:
                return _Dropped(f"{where}: masquerade finds no address on {oif.describe()}")
            src = oif.masquerade_source
            binding = Binding(NatKind.MASQUERADE, src, src, *ports)
            return _Bound(binding, f"{where} (to {src} via {oif.describe()})")
        if stmt.kind is NatKind.REDIRECT:
            addr = self.fib.redirect_address(side.packet.family, side.ingress, side.packet.daddr)
            if addr is None:
                return _Dropped(f"{where}: redirect finds no address on the input interface")
            return _Bound(Binding(NatKind.REDIRECT, addr, addr, *ports), f"{where} (to {addr})")
        if stmt.addr is None:  # "dnat to :80": the address is kept, only the port changes
            return _Bound(Binding(stmt.kind, None, None, *ports), where)
        lo, hi = stmt.addr
        if lo.version != side.packet.saddr.version:
            raise _Unmodelled(f"{where}: address family does not match the flow")
        return _Bound(Binding(stmt.kind, lo, hi, *ports), where)


def _xfrm_flow(p: _Packet, oif: int | None = None, mark: int | None | _Keep = _KEEP) -> XfrmFlow:
    """The flow as xfrm sees ``p`` (its ``oif``, or the given one: an egress's ``oif``; its mark, or
    the given one: the mark its route was looked up with)."""
    if oif is None and isinstance(p.oif, Egress):
        oif = p.oif.oif
    hi = p.dport[1] if p.dport[1] != p.dport[0] else None
    return XfrmFlow(p.family, p.proto, p.saddr, p.daddr, p.sport, p.dport[0], hi,
                    p.mark if mark is _KEEP else mark, oif)


def _xfrm_egress(fib: Fib, p: _Packet, out: Egress) -> tuple[Egress, str | None]:
    """The egress named with the xfrm out policy that puts the flow in IPsec; a reason if one blocks it."""
    if out.kind is not EgressKind.UNICAST or not fib.topology.xfrm_known:
        return out, None
    decision = lookup(fib.topology, _xfrm_flow(p, out.oif))
    if isinstance(decision, Unknown):
        return replace(out, xfrm=f"unknown ({decision.reason})"), None
    if decision.policy is None or not (decision.in_ipsec or decision.blocked):
        return out, None
    return replace(out, xfrm=decision.policy.describe()), decision.reason if decision.blocked else None


# -- nftables breadth helpers -----------------------------------------------------------

# Keys the evaluator answers itself (from the FIB, or as any value of a range).
_NFT_KEYS = frozenset({Key.FIB_TYPE, Key.FIB_OIF, Key.FIB_OIFNAME, Key.NUMGEN, Key.HASH})
# Status bits ``_Evaluator._nft`` answers for a first packet (DST_NAT comes from the DNAT side).
_NAT_STATUS = frozenset({"SRC_NAT", "DST_NAT", "DYING"})
_FIRST_PACKET_STATUS: dict[str, bool | None] = {
    "EXPECTED": None,  # an expected (related) connection is not told apart
    "SEEN_REPLY": False,
    "ASSURED": False,
    "CONFIRMED": False,
    "SRC_NAT": False,
    "DYING": False,
}
NftExpr = Match | CtStatusMatch | ConcatMatch | VerdictMap | NatMapStatement


# Expressions that only test the packet, and statements without effect (counter, log, comment).
_MATCH_ONLY = (Match, UnknownMatch, ConcatMatch, AnyOf, CtStateMatch, CtStatusMatch, CtTupleMatch,
               AddrTypeMatch, PolicyMatch, Passive)  # fmt: skip


# Per rule, computed once: whether it is passive, and its guards: the plain matches that open it
# (before any statement, nft-only or xfrm expression), which read nothing but the packet. A false
# guard ends the rule with no effect whatever comes before it (only other plain matches), so a rule
# whose guard is false is skipped without building its description (most rules of a large ruleset
# are skipped so). By rule identity; a rule is immutable and kept alive by the entry.
_PLANS: dict[int, tuple[Rule, bool, tuple[Match, ...]]] = {}
_PLANS_LIMIT = 1 << 18


def _rule_plan(rule: Rule) -> tuple[bool, tuple[Match, ...]]:
    found = _PLANS.get(id(rule))
    if found is not None and found[0] is rule:
        return found[1], found[2]
    guards: list[Match] = []
    for expr in rule.exprs:
        if not isinstance(expr, Match) or _is_nft(expr) or expr.selector.key in XFRM_KEYS:
            break
        guards.append(expr)
    if len(_PLANS) >= _PLANS_LIMIT:
        _PLANS.clear()
    plan = (rule, _passive(rule), tuple(guards))
    _PLANS[id(rule)] = plan
    return plan[1], plan[2]


# Per chain, computed once: its rule index (``core.ruleindex``), None where it does not pay. By chain
# identity, as ``_PLANS``.
_INDEXES: dict[int, tuple[Chain, ruleindex.ChainIndex | None]] = {}


def _chain_index(chain: Chain) -> ruleindex.ChainIndex | None:
    found = _INDEXES.get(id(chain))
    if found is not None and found[0] is chain:
        return found[1]
    index = None
    if len(chain.rules) >= ruleindex.MIN_INDEXED:
        index = ruleindex.build([_rule_plan(rule) for rule in chain.rules])
    if len(_INDEXES) >= _PLANS_LIMIT:
        _INDEXES.clear()
    _INDEXES[id(chain)] = (chain, index)
    return index


def index_rules(ruleset: NatRuleset) -> None:
    """Build the rule indexes of ``ruleset``'s chains now (``predict`` builds each on first use:
    about 0.1 s for a chain of 2,000 rules, on the clock of the first judgement that reaches it)."""
    for chain in ruleset.chains:
        _chain_index(chain)


def _order(chain: Chain, packet: _Packet) -> Sequence[int]:
    """The positions of the rules of ``chain`` that ``packet`` may reach, ascending (``core.ruleindex``)."""
    index = _chain_index(chain)
    if index is None:
        return range(len(chain.rules))
    value = _point(index.key, packet)
    if value is None:
        return range(len(chain.rules))
    return index.candidates(packet.family, packet.proto, value)


def _point(key: Key, p: _Packet) -> int | str | None:
    """The one exact value ``_match`` reads for ``key`` on ``p`` (None: it reads none, or a range).

    Mirrors ``_match``: where this returns a value, an indexable match (``ruleindex.indexable``)
    whose dependencies hold is true exactly when its values hold that value.
    """
    if key in (Key.IIFNAME, Key.OIFNAME):
        dev = p.iif if key is Key.IIFNAME else p.oif
        return None if isinstance(dev, Unknown) else _device(dev)[0]
    if key in (Key.SADDR, Key.DADDR):
        addr = p.saddr if key is Key.SADDR else p.daddr
        return ruleindex.address_value(addr.version, int(addr))
    if key in (Key.SPORT, Key.DPORT):
        if p.proto not in PORT_PROTOS:
            return None  # a port match without a protocol dependency is unknown here, not false
        if key is Key.SPORT:
            return p.sport
        return p.dport[0] if p.dport[0] == p.dport[1] else None
    if key is Key.MARK:
        return p.mark
    if key is Key.CT_MARK:
        return p.ct_mark
    if key is Key.CT_ZONE:
        return p.zone
    if key is Key.L4PROTO:
        return p.proto
    if key is Key.NFPROTO:
        return p.family
    return None


def _passive(rule: Rule) -> bool:
    """True for a rule that cannot change a NAT decision: it only matches and counts or logs.

    Such a rule never makes a prediction unknown, whatever it matches (an unmodelled match
    in it decides nothing). A verdict, a NAT or mark statement, a map, a set update or any
    statement not modelled keeps the rule's meaning.
    """
    return all(isinstance(expr, _MATCH_ONLY) for expr in rule.exprs)


def _is_nft(expr: object) -> bool:
    """True for what ``_Evaluator._nft`` answers (before the iptables and plain paths)."""
    if isinstance(expr, ConcatMatch | VerdictMap | NatMapStatement):
        return True
    if isinstance(expr, CtStatusMatch):
        return bool(expr.statuses & _NAT_STATUS)
    return isinstance(expr, Match) and expr.selector.key in _NFT_KEYS


def _any_status(flags: dict[str, bool | None], names: frozenset[str]) -> bool | Unknown:
    if any(flags.get(n) is True for n in names):
        return True
    unknown = sorted(n for n in names if flags.get(n) is None)
    if unknown:
        return Unknown(f"ct status {','.join(unknown).lower()} of the flow's first packet is not known")
    return False


def _random_range(sel: Selector) -> tuple[int, int]:
    mod, offset = (int(x) for x in sel.params)
    return offset, offset + mod - 1


def _dst_nat(binding: Binding, flow: Flow) -> bool | None:
    """IPS_DST_NAT after the DNAT side: set when the binding changes the tuple (None: it may not)."""
    if binding.kind is NatKind.NONE:
        return False
    lo, hi = binding.translated(flow.dst)
    if not int(lo) <= int(flow.dst) <= int(hi):
        return True
    ports = binding.ports
    if ports is not None and not ports[0] <= flow.dport <= ports[1]:
        return True
    if lo == hi and (ports is None or ports[0] == ports[1]):
        # The one address (and port) is the flow's own: get_unique_tuple keeps the tuple.
        return False
    return None


def _bindings(outcome: _Bound | _BoundAny | _Null) -> frozenset[Binding]:
    if isinstance(outcome, _Bound):
        return frozenset({outcome.binding})
    if isinstance(outcome, _BoundAny):
        return outcome.bindings
    return frozenset({NO_NAT})


def _addresses(lo: IPAddress, hi: IPAddress) -> Iterator[IPAddress]:
    if lo == hi:  # one address (most flows): itself, not a new value equal to it
        yield lo
        return
    make = IPv4Address if lo.version == 4 else IPv6Address
    for value in range(int(lo), int(hi) + 1):
        yield make(value)


def _rules_of(outcomes: Iterable[_Outcome]) -> tuple[RuleRef, ...]:
    """The rules that made ``outcomes`` (bindings and drops), each once, in order."""
    return tuple(dict.fromkeys(o.rule for o in outcomes
                               if isinstance(o, _Bound | _BoundAny | _Dropped) and o.rule is not None))


def _unknown_all(ingress: Ingress | None | Unknown, reason: str, explain: tuple[str, ...] = (),
                 rule: RuleRef | None = None) -> Prediction:  # fmt: skip
    unknown = Unknown(reason, rule)
    return Prediction(dnat=unknown, snat=unknown, egress=unknown, ingress=ingress, explain=explain)


# Candidate input interfaces evaluated one by one; more leave the prediction unknown.
MAX_INGRESSES = 64
# Whether a ruleset reads the input interface, by id (the ruleset is kept: ids are not reused).
_READS_IIF: dict[int, tuple[NatRuleset, bool]] = {}
_IIF_FREE = (CtStateMatch, CtStatusMatch, CtTupleMatch, PolicyMatch, MarkSet, NetmapStatement, Passive,
             Verdict, UnknownMatch, UnknownStatement)


def _expr_reads_iif(expr: object) -> bool:
    """True if evaluating ``expr`` may depend on the input interface (conservative)."""
    selectors: tuple[Selector, ...]
    if isinstance(expr, Match):
        selectors = (expr.selector,)
    elif isinstance(expr, ConcatMatch | VerdictMap):
        selectors = expr.selectors
    elif isinstance(expr, NatMapStatement):
        if expr.kind is NatKind.REDIRECT:
            return True
        selectors = expr.selectors
    elif isinstance(expr, AnyOf):
        selectors = tuple(m.selector for m in expr.matches)
    elif isinstance(expr, NatStatement):
        return expr.kind is NatKind.REDIRECT
    elif isinstance(expr, AddrTypeMatch):
        return expr.limit_iface is not None
    else:
        return not isinstance(expr, _IIF_FREE)
    return any(s.key in (Key.IIF, Key.IIFNAME) or "iif" in s.params for s in selectors)


def reads_iif(ruleset: NatRuleset, fib: Fib) -> bool:
    """True if a prediction may depend on which interface the flow entered on.

    Policy rules with ``iif`` (other than lo, which only locally generated
    packets match) and any ruleset expression that reads it (iif/iifname,
    ``fib ... iif``, redirect, ``addrtype --limit-iface-in``).
    """
    if any(r.iifname not in (None, "lo") for r in fib.topology.rules):
        return True
    cached = _READS_IIF.get(id(ruleset))
    if cached is not None and cached[0] is ruleset:
        return cached[1]
    answer = any(_expr_reads_iif(e) for c in ruleset.chains for r in c.rules for e in r.exprs)
    if len(_READS_IIF) > 64:
        _READS_IIF.clear()
    _READS_IIF[id(ruleset)] = (ruleset, answer)
    return answer


def _union_side(sides: list[tuple[str, frozenset[Binding] | Unknown]]) -> frozenset[Binding] | Unknown:
    found: set[Binding] = set()
    for name, side in sides:
        if isinstance(side, Unknown):
            return Unknown(f"arriving on {name}: {side.reason}", side.rule)
        found |= side
    return frozenset(found)


# Chain orders (of nat chains that share a hook and a priority) followed as alternatives at most.
MAX_ORDER_ALTERNATIVES = 8
_NAT_HOOKS = (Hook.PREROUTING, Hook.OUTPUT, Hook.POSTROUTING, Hook.INPUT)
# A tie group (its chains' keys, in dump order) -> the order its chains run in.
_Order = dict[tuple[tuple[str, str, str], ...], tuple[Chain, ...]]


def _order_alternatives(ruleset: NatRuleset, family: int) -> list[_Order]:
    """Every way the nat chains of ``family`` that share a hook and a priority may be ordered.

    The kernel runs such chains in registration order (the one registered last
    first), which the ruleset dump does not show; the order is the same for
    every flow and stays while the chains do. Empty where no chains share one.
    """
    # A chain without rules and with policy accept changes nothing wherever it runs.
    groups = [g for hook in _NAT_HOOKS for g in _ties(_nat_chains(ruleset, hook, family))
              if sum(bool(c.rules) or c.policy == "drop" for c in g) > 1]  # fmt: skip
    if not groups:
        return []
    keys = [tuple(c.key for c in g) for g in groups]
    return [dict(zip(keys, choice, strict=True))
            for choice in itertools.product(*(itertools.permutations(g) for g in groups))]  # fmt: skip


def predict(ruleset: NatRuleset, fib: Fib, flow: Flow) -> Prediction:
    """The NAT bindings ``flow`` would get now, with the egresses and the rules that decide them.

    Nat chains that share a hook and a priority run in an order no dump shows
    (``_order_alternatives``): where the orders give the flow different
    predictions, each order's prediction is an alternative (and the sides
    their unions); a hook whose orders disagree is otherwise unknown.
    """
    memo = _memo(ruleset).orders
    orders = memo.get(flow.family)
    if orders is None:
        orders = memo[flow.family] = _order_alternatives(ruleset, flow.family)
    if not orders or len(orders) > MAX_ORDER_ALTERNATIVES:
        return _predict_ordered(ruleset, fib, flow, None)
    preds = [_predict_ordered(ruleset, fib, flow, order) for order in orders]
    names = "; ".join(_describe_tie(g) for g in orders[0].values())
    return _either(preds, f"{names}: their order is not known, each is followed")


def _either(preds: list[Prediction], why: str) -> Prediction:
    """One of ``preds`` holds and which is not known: the first where all agree, else each an alternative."""
    first = preds[0]
    if all(_same(p, first) for p in preds[1:]):
        return first
    alternatives = tuple(a for p in preds for a in (p.alternatives or (p,)))
    egress: tuple[Egress, ...] | Unknown = ()
    for p in preds:
        if isinstance(p.egress, Unknown):
            egress = p.egress
            break
        assert not isinstance(egress, Unknown)
        egress = tuple(dict.fromkeys((*egress, *p.egress)))
    return Prediction(
        dnat=_union_side([("one of them", p.dnat) for p in preds]),
        snat=_union_side([("one of them", p.snat) for p in preds]),
        egress=egress,
        ingress=first.ingress,
        explain=(why, *dict.fromkeys(line for p in preds for line in p.explain)),
        alternatives=alternatives,
        rules=tuple(dict.fromkeys(r for p in preds for r in p.rules)),
    )


# Socket marks of a locally generated flow followed as alternatives at most.
MAX_MARK_ALTERNATIVES = 8


def _reads_packet_mark(ruleset: NatRuleset) -> bool:
    """True if a rule may read the packet mark (conservative): a match on it, a copy or a partial set."""
    for chain in ruleset.chains:
        for rule in chain.rules:
            for expr in rule.exprs:
                if isinstance(expr, MarkCopy | UnknownMatch | UnknownStatement):
                    return True
                if isinstance(expr, MarkSet) and not expr.ct and expr.mask != 0xFFFFFFFF:
                    return True
                selectors: tuple[Selector, ...] = ()
                if isinstance(expr, Match):
                    selectors = (expr.selector,)
                elif isinstance(expr, ConcatMatch | VerdictMap | NatMapStatement):
                    selectors = expr.selectors
                elif isinstance(expr, AnyOf):
                    selectors = tuple(m.selector for m in expr.matches)
                if any(sel.key is Key.MARK for sel in selectors):
                    return True
    return False


def _socket_marks(ruleset: NatRuleset, fib: Fib) -> tuple[int, ...] | None:
    """Marks that stand for every mark a locally generated flow's socket may give it (None: none do).

    The socket's mark (SO_MARK) is not in the entry. Where only the policy
    rules' ``fwmark`` read it (no rule of the ruleset, no xfrm policy), all
    under one mask, a mark matches the rules of its masked value or none:
    one mark per masked value, and one that matches none, stand for them all.
    """
    rules = [r for r in fib.topology.rules if r.fwmark is not None]
    if not rules or any(p.mark_mask for p in fib.topology.xfrm_policies) or _reads_packet_mark(ruleset):
        return None
    masks = {r.fwmask if r.fwmask is not None else (0xFFFFFFFF if r.fwmark else 0) for r in rules}
    if len(masks) != 1:
        return None
    (mask,) = masks
    values = sorted({(r.fwmark or 0) & mask for r in rules})
    low = mask & -mask
    other = next((k * low for k in range(64) if (k * low) & mask not in values), None)
    if other is None or len(values) + 1 > MAX_MARK_ALTERNATIVES:
        return None
    return (*values, other)


def _same(a: Prediction, b: Prediction) -> bool:
    """The same bindings, egresses and alternatives (the rules that made them may differ)."""
    return (a.dnat, a.snat, a.egress, [(x.dnat, x.snat, x.egress, x.ingress) for x in a.alternatives]) == (
        b.dnat, b.snat, b.egress, [(x.dnat, x.snat, x.egress, x.ingress) for x in b.alternatives])


def _predict_ordered(ruleset: NatRuleset, fib: Fib, flow: Flow, order: _Order | None) -> Prediction:
    """``predict`` with the chains that share a hook and priority run in ``order`` (None: every order).

    Where reverse-path filtering does not pin the input interface
    (``Fib.ingresses``), the flow is evaluated once per candidate interface
    (once in all when nothing reads it, ``reads_iif``) and each side is the
    union of the candidates' bindings, and ``alternatives`` holds each
    candidate's own prediction: an entry is stale only if no interface it
    may have entered on would give it its bindings now. A side unknown for
    one candidate is unknown in the union. ``ingress`` is then ``Unknown``,
    naming the candidates.
    """
    found = fib.ingresses(flow, netfilter_rpf=flow.family in ruleset.rpfilter)
    if isinstance(found, Unknown):
        return _unknown_all(found, f"ingress unknown: {found.reason}")
    candidates, why = found
    if len(candidates) == 1:
        return _predict_via(ruleset, fib, flow, candidates[0], order)
    names = ", ".join(c.ifname for c in candidates[:8])
    if len(candidates) > 8:
        names += f" and {len(candidates) - 8} more"
    ingress = Unknown(f"any of {names} ({why})")
    if not reads_iif(ruleset, fib):
        one = _predict_via(ruleset, fib, flow, candidates[0], order)
        paths = tuple(replace(a, ingress=ingress) for a in one.alternatives)
        return replace(one, ingress=ingress, alternatives=paths)
    if len(candidates) > MAX_INGRESSES:
        return _unknown_all(ingress, f"the input interface matters and may be any of {len(candidates)}")
    preds = [(c.ifname, _predict_via(ruleset, fib, flow, c, order)) for c in candidates]
    egress: tuple[Egress, ...] | Unknown = ()
    explain: list[str] = []
    for name, p in preds:
        if isinstance(p.egress, Unknown):
            egress = Unknown(f"arriving on {name}: {p.egress.reason}")
        elif not isinstance(egress, Unknown):
            egress = tuple(dict.fromkeys((*egress, *p.egress)))
        explain.extend(f"arriving on {name}: {line}" for line in p.explain)
    return Prediction(
        dnat=_union_side([(n, p.dnat) for n, p in preds]),
        snat=_union_side([(n, p.snat) for n, p in preds]),
        egress=egress,
        ingress=ingress,
        explain=tuple(dict.fromkeys(explain)),
        alternatives=tuple(a for _, p in preds for a in (p.alternatives or (p,))),
        rules=tuple(dict.fromkeys(r for _, p in preds for r in p.rules)),
    )


class _MarkPlan:
    """A hook's mark chains around its nat chains: those the NAT matches see, and those after."""

    before: tuple[Chain, ...]
    after: tuple[Chain, ...]
    between: tuple[Chain, ...]

    def __init__(self, ruleset: NatRuleset, hook: Hook, family: int) -> None:
        marks = _mark_chains(ruleset, hook, family)
        prios = [c.priority or 0 for c in _nat_chains(ruleset, hook, family)]
        if not prios:
            self.before, self.after, self.between = marks, (), ()
            return
        first, last = min(prios), max(prios)
        self.before = tuple(c for c in marks if (c.priority or 0) < first)
        self.after = tuple(c for c in marks if (c.priority or 0) > last)
        self.between = tuple(c for c in marks if first <= (c.priority or 0) <= last)


class _RulesetMemo:
    """What ``predict`` reads of a ruleset on every call, computed once: by (hook, family), its nat
    chains, mark chains and ``_MarkPlan``; by family, its ``_order_alternatives`` (read only)."""

    __slots__ = ("marks", "nat", "orders", "plans")

    def __init__(self) -> None:
        self.nat: dict[tuple[Hook, int], tuple[Chain, ...]] = {}
        self.marks: dict[tuple[Hook, int], tuple[Chain, ...]] = {}
        self.plans: dict[tuple[Hook, int], _MarkPlan] = {}
        self.orders: dict[int, list[_Order]] = {}


# By ruleset identity, as ``_READS_IIF`` (the ruleset is kept: ids are not reused while it is).
_MEMOS: dict[int, tuple[NatRuleset, _RulesetMemo]] = {}
_T = TypeVar("_T")


def _memo(ruleset: NatRuleset) -> _RulesetMemo:
    found = _MEMOS.get(id(ruleset))
    if found is not None and found[0] is ruleset:
        return found[1]
    if len(_MEMOS) > 64:
        _MEMOS.clear()
    memo = _RulesetMemo()
    _MEMOS[id(ruleset)] = (ruleset, memo)
    return memo


def _by_hook(memo: dict[tuple[Hook, int], _T], make: Callable[[NatRuleset, Hook, int], _T],
             ruleset: NatRuleset, hook: Hook, family: int) -> _T:  # fmt: skip
    """``make(ruleset, hook, family)``, kept in ``memo`` (one of ``ruleset``'s ``_RulesetMemo``)."""
    key = (hook, family)
    found = memo.get(key)
    if found is None:
        found = memo[key] = make(ruleset, hook, family)
    return found


def _nat_chains(ruleset: NatRuleset, hook: Hook, family: int) -> tuple[Chain, ...]:
    """``ruleset.base_chains(hook, family)``, once per ruleset."""
    return _by_hook(_memo(ruleset).nat, NatRuleset.base_chains, ruleset, hook, family)


def _mark_chains(ruleset: NatRuleset, hook: Hook, family: int) -> tuple[Chain, ...]:
    """``ruleset.mark_chains(hook, family)``, once per ruleset."""
    return _by_hook(_memo(ruleset).marks, NatRuleset.mark_chains, ruleset, hook, family)


def _mark_plan(ruleset: NatRuleset, hook: Hook, family: int) -> _MarkPlan:
    """``_MarkPlan(ruleset, hook, family)``, once per ruleset."""
    return _by_hook(_memo(ruleset).plans, _MarkPlan, ruleset, hook, family)


def _marks(ev: _Evaluator, hook: Hook, chains: tuple[Chain, ...], packet: _Packet, *, ingress: Ingress,
           explain: list[str]) -> _Packet | _Dropped:
    """The packet with the marks ``chains`` (mark chains at ``hook``) leave it, or their drop.

    Where the branches of unknown matches disagree, both marks are unknown
    from here on (the matches and lookups that read them answer unknown).
    """
    if not chains:
        return packet
    outcome = ev.hook(_Side(hook, chains, packet, frozenset(), ingress), marks=True)
    if isinstance(outcome, _Dropped):
        return outcome
    if isinstance(outcome, _Marks):
        return _packet(packet, mark=outcome.mark, ct_mark=outcome.ct_mark)
    reason = outcome.reason if isinstance(outcome, Unknown) else "no marks"
    explain.append(f"marks at {hook.value} unknown: {reason}")
    return _packet(packet, mark=None, ct_mark=None)


def _snat_marks(ev: _Evaluator, ruleset: NatRuleset, hook: Hook, packet: _Packet, *, ingress: Ingress,
                explain: list[str]) -> _Packet | _Dropped | Unknown:
    """The packet as the SNAT hook sees it: forward's mark chains, then those below its nat chains."""
    if hook is Hook.POSTROUTING and not ingress.local:
        chains = _mark_chains(ruleset, Hook.FORWARD, packet.family)
        forwarded = _marks(ev, Hook.FORWARD, chains, packet, ingress=ingress, explain=explain)
        if isinstance(forwarded, _Dropped):
            return forwarded
        packet = forwarded
    plan = _mark_plan(ruleset, hook, packet.family)
    if plan.between:
        return Unknown(f"{', '.join(c.describe() for c in plan.between)}: a mark chain between nat chains")
    return _marks(ev, hook, plan.before, packet, ingress=ingress, explain=explain)


def _refused(egress: tuple[Egress, ...] | Unknown) -> tuple[Egress, ...]:
    """The routes of ``egress`` that refuse the packet (a lookup's answer is one such route or none)."""
    if isinstance(egress, Unknown):
        return ()
    return tuple(e for e in egress if e.kind in REFUSING)


def _predict_via(ruleset: NatRuleset, fib: Fib, flow: Flow, ingress: Ingress, order: _Order | None = None
                 ) -> Prediction:  # fmt: skip
    """``predict`` for a flow that entered on ``ingress``.

    Marks: where the ruleset holds every chain that may set one
    (``NatRuleset.marks_known``), a fresh flow's conntrack mark starts at 0,
    and so does the mark of a packet received (tc is not modelled); a
    locally generated packet carries its socket's mark, ``flow.packet_mark``
    (None: unknown). Otherwise the packet mark is ``flow.packet_mark`` and the
    ct mark 0 only where the entry's is (an entry's mark not 0 may have been
    set after its NAT). The mark
    chains (filter, route: ``NatRuleset.mark_chains``) run at each hook in
    priority order around the nat chains: those below the first nat chain
    change what the NAT matches see, those above it only what routing and
    later hooks see. Routing uses the mark as it leaves prerouting (output).
    """
    if ingress.local and flow.packet_mark is None:
        marks = _socket_marks(ruleset, fib)
        if marks is not None:
            preds = [_predict_via(ruleset, fib, replace(flow, packet_mark=m), ingress, order) for m in marks]
            return _either(preds, "the socket's mark is not known: each mark the policy rules tell apart is "
                                  "followed")
    ev = _Evaluator(ruleset, fib, flow, order)
    known = ruleset.marks_known
    received = 0 if known and not ingress.local else None
    base = _new_packet(
        family=flow.family,
        proto=flow.proto,
        saddr=flow.src,
        daddr=flow.dst,
        sport=flow.sport,
        dport=(flow.dport, flow.dport),
        mark=flow.packet_mark if flow.packet_mark is not None else received,
        ct_mark=0 if known or flow.ct_mark == 0 else None,
        zone=flow.zone,
        iif=None if ingress.local else ingress,
        oif=None,
        dst_nat=False,
    )
    explain: list[str] = []
    hook = Hook.OUTPUT if ingress.local else Hook.PREROUTING
    plan = _mark_plan(ruleset, hook, flow.family)
    if plan.between:
        names = ", ".join(c.describe() for c in plan.between)
        return _unknown_all(ingress, f"{names}: a mark chain between nat chains at {hook.value}")
    if ingress.local:
        ev.routed_with(base.mark)  # the socket's route
    marked = _marks(ev, hook, plan.before, base, ingress=ingress, explain=explain)
    if isinstance(marked, _Dropped):
        dropped = (f"dropped at {hook.value}: {marked.reason}",)
        return Prediction(frozenset(), frozenset(), (), ingress, dropped, rules=_rules_of([marked]))
    base = marked

    # 1. DNAT side: prerouting, or output with the route chosen before DNAT as oif.
    oifs: tuple[Egress | Unknown | None, ...] = (None,)
    if ingress.local:
        # A blackhole/unreachable/prohibit route fails the socket's send (ip_route_output_flow answers
        # the route type's error), or drops the packet where output's mark chains re-route it
        # (ip_route_me_harder): output's nat chains never see it.
        refused: tuple[Egress, ...] = ()
        if flow.packet_mark is not None and base.mark != flow.packet_mark:
            refused = _refused(fib.egress(flow, ingress))  # the socket's own route, before the mark chains
        ev.routed_with(base.mark)  # re-routed as output's mark chains left the mark
        marked_flow = Flow(flow.family, flow.proto, flow.src, flow.dst, flow.sport, flow.dport, flow.zone,
                           flow.ct_mark, base.mark)  # replace(flow, packet_mark=base.mark), faster
        before = fib.egress(marked_flow, ingress)
        if isinstance(before, Unknown):
            oifs = (Unknown(f"route before DNAT unknown: {before.reason}"),)
        else:
            oifs = before
        refused = refused or _refused(before)
        if refused:
            explain.extend(f"dropped by the route: {e.describe()}" for e in refused)
            return Prediction(frozenset(), frozenset(), refused, ingress, tuple(dict.fromkeys(explain)))
    dnat_chains = _nat_chains(ruleset, hook, flow.family)
    dnat_outcomes: list[_Outcome] = []
    for oif in oifs:
        packet = _packet(base, oif=oif)
        side = _Side(hook, dnat_chains, packet, DNAT_KINDS, ingress)
        outcome = ev.hook(side)
        if isinstance(outcome, Unknown):
            return _unknown_all(ingress, f"dnat unknown: {outcome.reason}", rule=outcome.rule)
        dnat_outcomes.append(outcome)

    dnat: set[Binding] = set()
    named: list[_Outcome] = []  # the outcomes ``explain`` names, for their rules
    egresses: list[Egress] = []
    snat: set[Binding] = set()
    snat_unknown: Unknown | None = None
    # The SNAT side per path the flow may take (an unknown, or the bindings; none: dropped there).
    by_path: dict[Egress, set[Binding] | Unknown] = {}
    expanded = [
        _Bound(b, o.reason, o.rule) if isinstance(o, _BoundAny) else o
        for o in dnat_outcomes
        for b in (sorted(o.bindings, key=str) if isinstance(o, _BoundAny) else [NO_NAT])
    ]
    for outcome in dict.fromkeys(expanded):
        named.append(outcome)
        if isinstance(outcome, _Dropped):
            explain.append(f"dropped at {hook.value}: {outcome.reason}")
            continue
        binding = outcome.binding if isinstance(outcome, _Bound) else NO_NAT
        dnat.add(binding)
        explain.append(f"dnat: {outcome.reason}")

        # 2. Route the flow as DNAT left it, once per possible destination.
        lo, hi = binding.translated(flow.dst)
        if int(hi) - int(lo) + 1 > MAX_DNAT_ADDRESSES:
            unknown = Unknown(f"dnat to {binding.addr_text}: too many addresses to route one by one")
            return Prediction(frozenset(dnat), unknown, unknown, ingress, tuple(explain),
                              rules=_rules_of(named))
        dport = binding.ports or (flow.dport, flow.dport)
        for daddr in _addresses(lo, hi):
            packet = _packet(base, daddr=daddr, dport=dport, dst_nat=_dst_nat(binding, flow))
            if ingress.local:
                ev.routed_with(packet.mark)  # re-routed after output's DNAT (nf_nat_ipv4_local_fn)
            after = _marks(ev, hook, plan.after, packet, ingress=ingress, explain=explain)
            if isinstance(after, _Dropped):
                named.append(after)
                explain.append(f"dropped at {hook.value}: {after.reason}")
                continue
            packet = after
            routed = Flow(flow.family, flow.proto, flow.src, daddr, flow.sport, dport[0], flow.zone,
                          flow.ct_mark, packet.mark)  # replace(flow, dst=..., dport=..., packet_mark=...)
            egress = fib.egress(routed, ingress)
            if isinstance(egress, Unknown):
                unknown = Unknown(f"route after dnat unknown: {egress.reason}")
                return Prediction(frozenset(dnat), unknown, unknown, ingress, tuple(explain),
                                  rules=_rules_of(named))

            # 3. SNAT side, per egress.
            for routed_out in egress:
                out, blocked = _xfrm_egress(fib, packet, routed_out)
                if out not in egresses:
                    egresses.append(out)
                path = by_path.setdefault(out, set())
                if blocked is not None:
                    explain.append(f"dropped by xfrm: {blocked}")
                    continue
                if out.kind in REFUSING:
                    explain.append(f"dropped by the route: {out.describe()}")
                    continue
                delivered = out.kind is EgressKind.LOCAL and not ingress.local
                snat_hook = Hook.INPUT if delivered else Hook.POSTROUTING
                ev.routed_with(packet.mark)  # the route just looked up (forward's xfrm lookup too)
                at_snat = _snat_marks(ev, ruleset, snat_hook, _packet(packet, oif=None if delivered else out),
                                      ingress=ingress, explain=explain)
                if isinstance(at_snat, Unknown):
                    if snat_unknown is None:
                        snat_unknown = Unknown(f"snat unknown via {out.describe()}: {at_snat.reason}",
                                               at_snat.rule)
                    by_path[out] = Unknown(f"snat unknown via {out.describe()}: {at_snat.reason}",
                                           at_snat.rule)
                    continue
                if isinstance(at_snat, _Dropped):
                    named.append(at_snat)
                    explain.append(f"dropped before {snat_hook.value} nat: {at_snat.reason}")
                    continue
                nat_chains = _nat_chains(ruleset, snat_hook, flow.family)
                side = _Side(snat_hook, nat_chains, at_snat, SNAT_KINDS, ingress)
                result = ev.hook(side)
                if isinstance(result, Unknown):
                    # Keep going: the egress set stays known and complete.
                    if snat_unknown is None:
                        snat_unknown = Unknown(f"snat unknown via {out.describe()}: {result.reason}",
                                               result.rule)
                    by_path[out] = Unknown(f"snat unknown via {out.describe()}: {result.reason}", result.rule)
                    continue
                named.append(result)
                if isinstance(result, _Dropped):
                    explain.append(f"dropped at {side.hook.value}: {result.reason}")
                    continue
                assert not isinstance(result, _Marks)
                bound = _bindings(result)
                snat.update(bound)
                if isinstance(path, set):
                    path.update(bound)
                explain.append(f"snat via {out.describe()}: {result.reason}")
    explained = tuple(dict.fromkeys(explain))
    rules = _rules_of(named)
    paths: tuple[Prediction, ...] = ()
    if len(by_path) > 1:
        paths = tuple(
            Prediction(frozenset(dnat), found if isinstance(found, Unknown) else frozenset(found), (out,),
                       ingress, explained, rules=rules)
            for out, found in by_path.items()
        )
    return Prediction(
        dnat=frozenset(dnat),
        snat=frozenset(snat) if snat_unknown is None else snat_unknown,
        egress=tuple(egresses),
        ingress=ingress,
        explain=explained,
        alternatives=paths,
        rules=rules,
    )
