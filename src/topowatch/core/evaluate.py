"""Predict the NAT a flow would get now, in the kernel's order, in three-valued logic.

Theory of operation (``nf_nat_inet_fn``): a new flow meets two NAT hooks.

1. DNAT side. A forwarded flow meets the nat chains at prerouting (``iif`` is
   its ingress, no ``oif``); a locally generated flow meets those at output
   (no ``iif``; ``oif`` is the route chosen before DNAT).
2. The flow, with its destination translated, is routed (``Fib.egress``).
3. SNAT side, per egress: postrouting (``oif`` is the egress) for unicast and
   for locally generated flows; input (no ``oif``) for a forwarded flow
   delivered to this host. Flows routed to blackhole/unreachable/prohibit
   never get there.

At a hook the chains of the flow's family (ip or ip6, and inet) run by
priority. Within a chain the rules run in order, with nft's jump (returns
here), goto (does not), return, continue and accept (ends this chain only;
the next chain of the hook still runs). The first NAT statement that fires
decides the hook: later chains are not consulted. ``drop`` (a rule or a
chain's policy) drops the flow, as does a masquerade with no address on the
output interface or a redirect with none on the input interface. No binding
at all is the null binding ``NO_NAT``.

Three-valued logic: a match is true, false or ``Unknown`` (an unmodelled
expression, the packet mark we are not told, a port range only partly
inside). At an unknown match the evaluator follows both branches and keeps
the answer only if every branch gives the same outcome; otherwise the side is
``Unknown``, naming the first rule and expression that made it so. Reaching
an unmodelled statement makes the side unknown. Unknown propagates: an
unknown DNAT side makes egress and SNAT side unknown too.

The answer for a side is the set of bindings it could get (several with
multipath routes or DNAT ranges). **An empty set means the flow would be
dropped**; ``Prediction.explain`` says by what.

This module never performs I/O and never guesses: what it does not model is
``Unknown``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv6Address

from topowatch.core.fib import Fib
from topowatch.core.flow import (
    NO_NAT,
    PORT_PROTOS,
    Binding,
    Egress,
    EgressKind,
    Flow,
    Ingress,
    NatKind,
    Prediction,
    Unknown,
    proto_name,
)
from topowatch.core.model import IPAddress
from topowatch.core.nat import (
    Chain,
    Hook,
    Key,
    Match,
    NameSet,
    NatRuleset,
    NatStatement,
    Op,
    Passive,
    Rule,
    UnknownMatch,
    UnknownStatement,
    Verdict,
    VerdictKind,
)

# Branches followed per hook before giving up ("too many unknown matches").
MAX_BRANCHES = 256
# Addresses of a DNAT range routed one by one; a wider range leaves the egress unknown.
MAX_DNAT_ADDRESSES = 64
# nft's jump stack (NFT_JUMP_STACK_SIZE).
MAX_JUMP_DEPTH = 16

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
    ct_mark: int
    zone: int
    iif: Ingress | None | Unknown
    oif: Egress | None | Unknown


# Hook outcomes. ``value`` is what branches are compared by; ``reason`` says why.
@dataclass(frozen=True, slots=True)
class _Bound:
    binding: Binding
    reason: str

    @property
    def value(self) -> object:
        return self.binding


@dataclass(frozen=True, slots=True)
class _Dropped:
    reason: str

    @property
    def value(self) -> object:
        return "drop"


@dataclass(frozen=True, slots=True)
class _Null:
    reason: str = "no nat rule bound (null binding)"

    @property
    def value(self) -> object:
        return NO_NAT


_Outcome = _Bound | _Dropped | _Null


class _Choice(Exception):
    """A run reached an unknown match that its tape of choices does not cover."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Unmodelled(Exception):
    """A run reached something whose effect is not modelled: the hook's answer is unknown."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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
    runs = 0
    while pending:
        runs += 1
        if runs > MAX_BRANCHES:
            return Unknown(f"{first_unknown} (and too many unknown matches to follow)")
        choices = pending.pop()
        try:
            outcomes.append(run(_Tape(choices)))
        except _Choice as choice:
            first_unknown = first_unknown or choice.reason
            pending.extend([(*choices, False), (*choices, True)])
        except _Unmodelled as unmodelled:
            return Unknown(unmodelled.reason if first_unknown is None else first_unknown)
        if len({o.value for o in outcomes}) > 1:
            assert first_unknown is not None
            return Unknown(first_unknown)
    return outcomes[0]


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
    def __init__(self, ruleset: NatRuleset, fib: Fib) -> None:
        self.ruleset = ruleset
        self.fib = fib

    def hook(self, side: _Side) -> _Outcome | Unknown:
        return _explore(lambda tape: self._run_hook(side, tape))

    def _run_hook(self, side: _Side, tape: _Tape) -> _Outcome:
        for chain in side.chains:
            result = self._run_chain(chain, side, tape)
            if result is not None:
                return result
        return _Null()

    def _run_chain(self, base: Chain, side: _Side, tape: _Tape) -> _Bound | _Dropped | None:
        """Run one base chain: an outcome that ends the hook, or None (accepted: next chain)."""
        stack: list[tuple[Chain, int]] = []
        chain, index = base, 0
        while True:
            if index >= len(chain.rules):
                if stack:
                    chain, index = stack.pop()
                    continue
                return self._policy(base)
            rule = chain.rules[index]
            index += 1
            step = self._run_rule(chain, rule, side, tape)
            if step is None:
                continue
            if isinstance(step, _Bound | _Dropped):
                return step
            if step.kind is VerdictKind.ACCEPT:
                return None
            if step.kind is VerdictKind.RETURN:
                if stack:
                    chain, index = stack.pop()
                    continue
                return self._policy(base)
            if step.kind is VerdictKind.CONTINUE:
                continue
            target = self.ruleset.chain(chain.family, chain.table, step.target or "")
            if target is None or target.is_base:
                where = self.ruleset.describe_rule(chain, rule)
                raise _Unmodelled(f"{where}: {step.kind.value} to a chain not in the ruleset")
            if step.kind is VerdictKind.JUMP:
                stack.append((chain, index))
            if len(stack) >= MAX_JUMP_DEPTH:
                raise _Unmodelled(f"{self.ruleset.describe_rule(chain, rule)}: jumps nest too deep")
            chain, index = target, 0

    def _policy(self, base: Chain) -> _Dropped | None:
        if base.policy == "drop":
            return _Dropped(f"{base.describe()}: policy drop")
        return None

    def _run_rule(
        self, chain: Chain, rule: Rule, side: _Side, tape: _Tape
    ) -> Verdict | _Bound | _Dropped | None:
        """Run one rule's expressions in order; None when the rule does not end in a verdict."""
        where = self.ruleset.describe_rule(chain, rule)
        for expr in rule.exprs:
            if isinstance(expr, Match):
                value = _match(expr, side.packet)
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
            else:
                if expr.kind is VerdictKind.DROP:
                    return _Dropped(f"{where}")
                return expr
        return None

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


def _addresses(lo: IPAddress, hi: IPAddress) -> Iterator[IPAddress]:
    make = IPv4Address if lo.version == 4 else IPv6Address
    for value in range(int(lo), int(hi) + 1):
        yield make(value)


def _unknown_all(ingress: Ingress | None | Unknown, reason: str, explain: tuple[str, ...] = ()) -> Prediction:
    unknown = Unknown(reason)
    return Prediction(dnat=unknown, snat=unknown, egress=unknown, ingress=ingress, explain=explain)


def predict(ruleset: NatRuleset, fib: Fib, flow: Flow) -> Prediction:
    """The NAT bindings ``flow`` would get now, with the egresses and the rules that decide them."""
    ingress = fib.ingress(flow)
    if isinstance(ingress, Unknown):
        return _unknown_all(ingress, f"ingress unknown: {ingress.reason}")
    ev = _Evaluator(ruleset, fib)
    base = _Packet(
        family=flow.family,
        proto=flow.proto,
        saddr=flow.src,
        daddr=flow.dst,
        sport=flow.sport,
        dport=(flow.dport, flow.dport),
        mark=flow.packet_mark,
        ct_mark=flow.ct_mark,
        zone=flow.zone,
        iif=None if ingress.local else ingress,
        oif=None,
    )
    explain: list[str] = []

    # 1. DNAT side: prerouting, or output with the route chosen before DNAT as oif.
    oifs: tuple[Egress | Unknown | None, ...] = (None,)
    if ingress.local:
        hook = Hook.OUTPUT
        before = fib.egress(flow, ingress)
        if isinstance(before, Unknown):
            oifs = (Unknown(f"route before DNAT unknown: {before.reason}"),)
        else:
            oifs = before
    else:
        hook = Hook.PREROUTING
    dnat_chains = ruleset.base_chains(hook, flow.family)
    dnat_outcomes: list[_Outcome] = []
    for oif in oifs:
        packet = replace(base, oif=oif)
        side = _Side(hook, dnat_chains, packet, DNAT_KINDS, ingress)
        outcome = ev.hook(side)
        if isinstance(outcome, Unknown):
            return _unknown_all(ingress, f"dnat unknown: {outcome.reason}")
        dnat_outcomes.append(outcome)

    dnat: set[Binding] = set()
    egresses: list[Egress] = []
    snat: set[Binding] = set()
    snat_unknown: Unknown | None = None
    for outcome in dict.fromkeys(dnat_outcomes):
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
            return Prediction(frozenset(dnat), unknown, unknown, ingress, tuple(explain))
        dport = binding.ports or (flow.dport, flow.dport)
        for daddr in _addresses(lo, hi):
            routed = replace(flow, dst=daddr, dport=dport[0])
            egress = fib.egress(routed, ingress)
            if isinstance(egress, Unknown):
                unknown = Unknown(f"route after dnat unknown: {egress.reason}")
                return Prediction(frozenset(dnat), unknown, unknown, ingress, tuple(explain))
            packet = replace(base, daddr=daddr, dport=dport)

            # 3. SNAT side, per egress.
            for out in egress:
                if out not in egresses:
                    egresses.append(out)
                if out.kind in (EgressKind.BLACKHOLE, EgressKind.UNREACHABLE, EgressKind.PROHIBIT):
                    explain.append(f"dropped by the route: {out.describe()}")
                    continue
                if out.kind is EgressKind.LOCAL and not ingress.local:
                    side = _Side(Hook.INPUT, ruleset.base_chains(Hook.INPUT, flow.family),
                                 replace(packet, oif=None), SNAT_KINDS, ingress)
                else:
                    side = _Side(Hook.POSTROUTING, ruleset.base_chains(Hook.POSTROUTING, flow.family),
                                 replace(packet, oif=out), SNAT_KINDS, ingress)
                result = ev.hook(side)
                if isinstance(result, Unknown):
                    # Keep going: the egress set stays known and complete.
                    if snat_unknown is None:
                        snat_unknown = Unknown(f"snat unknown via {out.describe()}: {result.reason}")
                    continue
                if isinstance(result, _Dropped):
                    explain.append(f"dropped at {side.hook.value}: {result.reason}")
                    continue
                snat.add(result.binding if isinstance(result, _Bound) else NO_NAT)
                explain.append(f"snat via {out.describe()}: {result.reason}")
    return Prediction(
        dnat=frozenset(dnat),
        snat=frozenset(snat) if snat_unknown is None else snat_unknown,
        egress=tuple(egresses),
        ingress=ingress,
        explain=tuple(dict.fromkeys(explain)),
    )
