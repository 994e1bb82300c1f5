# SPDX-License-Identifier: GPL-2.0-or-later
"""IPsec (xfrm) policies and SAs, and the questions NAT exemptions ask about them.

What this module decides, for one topology snapshot and one flow:
- which output policy the kernel's ``xfrm_lookup`` selects (``output_policy``);
- whether an SA exists for each of that policy's templates, that is whether
  the route carries a *bundle* (``output_lookup``); where a required SA is
  absent it says so, with the policy and the template that need it;
- the answers nftables' ``rt ipsec``, ``ipsec out|in ...``, ``meta secpath``
  and iptables' ``-m policy`` (``policy_match``) would give.

It must never perform I/O and never guess: what depends on something the
snapshot does not hold (the packet mark, an xfrm interface's if_id, whether
a forwarded packet arrived through an SA) answers ``Unknown`` with a reason.

Theory of operation (``net/xfrm/xfrm_policy.c``, ``xfrm_state.c``,
``net/netfilter/xt_policy.c``, ``nft_xfrm.c``, ``nft_rt.c``):

1. Policy lookup (``xfrm_policy_lookup_bytype``). Policies of the direction
   (``out`` for every packet leaving, forwarded or locally generated) and of
   the packet's family; ``sub`` policies first, then ``main``. Among those
   whose selector, mark and if_id match, the lowest priority value wins;
   ties go to the older policy (the kernel inserts a policy after those of
   equal priority). The snapshot's dump order is newest first, so age is
   read from the index, which the kernel allocates increasingly (an index
   given by hand can break this: then the answer may differ).
   A selector matches when the addresses are in its prefixes, the ports
   agree under their masks (ICMP: type and code stand in the port fields),
   the protocol is its own or any, and its ifindex is the output interface
   or 0. A policy mark matches when ``packet mark & mask == value``.
   A policy with an if_id matches only packets routed through an xfrm
   interface (not modelled: unknown there, never elsewhere).
2. Bundle (``xfrm_tmpl_resolve_one``). Each template needs a valid SA with
   the same reqid, mode and protocol, the template's SPI (if any), the
   remote address (the template's in tunnel/beet mode, the flow's in
   transport mode), a matching local address, a mark admitting the
   policy's, the same if_id, and a selector (if it has a family) selecting
   the flow. An SA with SPI 0 is a larval (acquire) entry, not valid.
   A template marked optional (``level use``) is skipped without an SA.
   - every required template has its SA: a bundle, the flow leaves through
     IPsec; ``rt ipsec exists`` is true and ``ipsec out`` reads its SAs;
   - a required template has none: the kernel drops the flow's packets
     (and asks the key manager for an SA) until one is installed. The NAT
     those packets will get then depends on the SA not yet known: answers
     that read the bundle are ``Unknown``, naming policy and template;
   - no templates, or only optional ones without SAs: no bundle, the flow
     leaves in the clear (``rt ipsec missing``);
   - ``action block``: the kernel drops the flow (``blocked``).
3. Secpath. Only a packet decrypted here carries one. A locally generated
   flow never does; a forwarded one can only if some SA ends at one of this
   host's addresses: without such an SA it has none, otherwise whether its
   packets came through a tunnel is unknown.

Not modelled: per-socket policies, the default policy (``ip xfrm policy
setdefault``), security contexts, the inbound/forward policy checks that
drop unprotected packets, ``nf_xfrm_me_harder``'s second lookup after NAT.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_network

from topowatch.core.flow import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPPROTO_UDPLITE,
    Flow,
    Unknown,
    proto_name,
)
from topowatch.core.model import AF_INET, AF_INET6, IPAddress, IPNetwork, Topology
from topowatch.core.nat import Key, Match, Op

AF_UNSPEC = 0
IPPROTO_AH = 51
IPPROTO_COMP = 108
IPPROTO_GRE = 47
IPPROTO_MH = 135

XFRM_PROTO_NAMES = {50: "esp", IPPROTO_AH: "ah", IPPROTO_COMP: "comp", 43: "route2", 60: "hao"}
# ``xfrm_flowi_sport``/``dport`` read the ports of these only: a DCCP flow's are 0 to a selector.
_SELECTOR_PORT_PROTOS = frozenset({IPPROTO_TCP, IPPROTO_UDP, IPPROTO_UDPLITE, IPPROTO_SCTP})


class Direction(enum.IntEnum):
    """XFRM_POLICY_IN / OUT / FWD."""

    IN = 0
    OUT = 1
    FWD = 2


class Action(enum.IntEnum):
    ALLOW = 0
    BLOCK = 1


class Mode(enum.IntEnum):
    TRANSPORT = 0
    TUNNEL = 1
    ROUTEOPTIMIZATION = 2
    IN_TRIGGER = 3
    BEET = 4


class PolicyType(enum.IntEnum):
    MAIN = 0
    SUB = 1


def _any(family: int) -> IPAddress:
    return IPv6Address(0) if family == AF_INET6 else IPv4Address(0)


def _is_any(addr: IPAddress) -> bool:
    return int(addr) == 0


@dataclass(frozen=True, slots=True)
class XfrmSelector:
    """struct xfrm_selector. ``family`` 0 (an SA's empty selector) selects everything.

    ``src``/``dst`` are prefixes (None only for family 0); ports and masks are
    host-order numbers; ``proto`` 0 and ``ifindex`` 0 mean any.
    """

    family: int
    src: IPNetwork | None = None
    dst: IPNetwork | None = None
    sport: int = 0
    sport_mask: int = 0
    dport: int = 0
    dport_mask: int = 0
    proto: int = 0
    ifindex: int = 0

    def __post_init__(self) -> None:
        if self.family not in (AF_UNSPEC, AF_INET, AF_INET6):
            raise ValueError(f"XfrmSelector.family must be 0, AF_INET or AF_INET6, got {self.family}")
        if self.family != AF_UNSPEC:
            version = 4 if self.family == AF_INET else 6
            for name in ("src", "dst"):
                net = getattr(self, name)
                if net is None:
                    net = ip_network((_any(self.family), 0))
                else:
                    net = ip_network(net, strict=False)
                if net.version != version:
                    raise ValueError(f"XfrmSelector.{name} {net} does not fit family {self.family}")
                object.__setattr__(self, name, net)
        for name in ("sport", "sport_mask", "dport", "dport_mask"):
            if not 0 <= getattr(self, name) <= 0xFFFF:
                raise ValueError(f"XfrmSelector.{name} out of range: {getattr(self, name)}")

    def describe(self) -> str:
        if self.family == AF_UNSPEC:
            return "any"
        parts = [f"src {self.src} dst {self.dst}"]
        if self.proto:
            parts.append(f"proto {proto_name(self.proto)}")
        if self.sport_mask:
            parts.append(f"sport {self.sport}")
        if self.dport_mask:
            parts.append(f"dport {self.dport}")
        if self.ifindex:
            parts.append(f"dev if{self.ifindex}")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class XfrmTemplate:
    """struct xfrm_user_tmpl: the SA a policy asks for.

    ``daddr``/``saddr`` are the tunnel endpoints (unspecified in transport
    mode); ``spi`` 0 means any; ``optional`` is ``level use``.
    """

    family: int
    daddr: IPAddress
    saddr: IPAddress
    proto: int = 50
    spi: int = 0
    reqid: int = 0
    mode: Mode = Mode.TRANSPORT
    share: int = 0
    optional: bool = False
    aalgos: int = 0xFFFFFFFF
    ealgos: int = 0xFFFFFFFF
    calgos: int = 0xFFFFFFFF

    def __post_init__(self) -> None:
        if self.family not in (AF_INET, AF_INET6):
            raise ValueError(f"XfrmTemplate.family must be AF_INET or AF_INET6, got {self.family}")
        object.__setattr__(self, "mode", Mode(self.mode))

    def describe(self) -> str:
        proto = XFRM_PROTO_NAMES.get(self.proto, str(self.proto))
        text = f"{proto} {self.mode.name.lower()}"
        if not (_is_any(self.saddr) and _is_any(self.daddr)):
            text += f" {self.saddr}->{self.daddr}"
        if self.spi:
            text += f" spi {self.spi:#x}"
        text += f" reqid {self.reqid}"
        return text + (" level use" if self.optional else "")


@dataclass(frozen=True, slots=True)
class XfrmPolicy:
    """struct xfrm_userpolicy_info with its templates, mark, if_id and type."""

    selector: XfrmSelector
    direction: Direction
    priority: int = 0
    index: int = 0
    action: Action = Action.ALLOW
    templates: tuple[XfrmTemplate, ...] = ()
    mark: int = 0
    mark_mask: int = 0
    if_id: int = 0
    type: PolicyType = PolicyType.MAIN
    flags: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "direction", Direction(self.direction))
        object.__setattr__(self, "action", Action(self.action))
        object.__setattr__(self, "type", PolicyType(self.type))
        if not isinstance(self.templates, tuple):
            object.__setattr__(self, "templates", tuple(self.templates))
        if self.selector.family == AF_UNSPEC:
            raise ValueError("XfrmPolicy.selector needs a family")

    @property
    def family(self) -> int:
        return self.selector.family

    def describe(self) -> str:
        """`ip xfrm policy` words: "src 10.0.1.0/24 dst 192.0.2.0/24 dir out priority 100 ..."."""
        parts = [self.selector.describe(), f"dir {self.direction.name.lower()}"]
        if self.action is Action.BLOCK:
            parts.append("action block")
        parts.append(f"priority {self.priority} index {self.index}")
        if self.type is PolicyType.SUB:
            parts.append("ptype sub")
        if self.mark or self.mark_mask:
            parts.append(f"mark {self.mark:#x}/{self.mark_mask:#x}")
        if self.if_id:
            parts.append(f"if_id {self.if_id:#x}")
        parts.extend(f"tmpl {t.describe()}" for t in self.templates)
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class XfrmState:
    """An SA (struct xfrm_usersa_info with its mark and if_id)."""

    family: int
    daddr: IPAddress
    saddr: IPAddress
    proto: int
    spi: int
    reqid: int = 0
    mode: Mode = Mode.TRANSPORT
    selector: XfrmSelector = field(default_factory=lambda: XfrmSelector(AF_UNSPEC))
    mark: int = 0
    mark_mask: int = 0
    if_id: int = 0

    def __post_init__(self) -> None:
        if self.family not in (AF_INET, AF_INET6):
            raise ValueError(f"XfrmState.family must be AF_INET or AF_INET6, got {self.family}")
        if self.daddr.version != self.saddr.version:
            raise ValueError(f"XfrmState mixes address families: {self.saddr} -> {self.daddr}")
        object.__setattr__(self, "mode", Mode(self.mode))

    @property
    def valid(self) -> bool:
        # A larval (acquire) entry has no SPI yet; every usable SA has one.
        return self.spi != 0

    def describe(self) -> str:
        proto = XFRM_PROTO_NAMES.get(self.proto, str(self.proto))
        return (
            f"{proto} spi {self.spi:#x} {self.saddr}->{self.daddr} reqid {self.reqid} "
            f"mode {self.mode.name.lower()}"
        )


# -- the flow as xfrm sees it -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class XfrmFlow:
    """What ``xfrm_decode_session`` reads from a packet: addresses, ports, protocol, mark, oif.

    ``dport_hi`` > ``dport`` is a range of destination ports (a DNAT to a port
    range); ``mark`` None is an unknown packet mark; ``oif`` None an unknown
    output interface; ``oif_kind`` its link kind ("xfrm" for an xfrm interface).
    """

    family: int
    proto: int
    src: IPAddress
    dst: IPAddress
    sport: int = 0
    dport: int = 0
    dport_hi: int | None = None
    mark: int | None = 0
    oif: int | None = None
    oif_kind: str = ""

    @classmethod
    def of(cls, flow: Flow, *, oif: int | None = None, oif_kind: str = "") -> XfrmFlow:
        return cls(flow.family, flow.proto, flow.src, flow.dst, flow.sport, flow.dport, None,
                   flow.packet_mark, oif, oif_kind)

    def ports(self) -> tuple[int, tuple[int, int]] | None:
        """(sport, dport range) as the selector compares them; None where they are not modelled."""
        hi = self.dport if self.dport_hi is None else self.dport_hi
        if self.proto in _SELECTOR_PORT_PROTOS:
            return self.sport, (self.dport, hi)
        if self.proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
            # xfrm_flowi_sport/dport: the ICMP type and code (the flow keeps type << 8 | code).
            return self.dport >> 8, (self.dport & 0xFF, hi & 0xFF)
        if self.proto in (IPPROTO_GRE, IPPROTO_MH):
            return None
        return 0, (0, 0)  # the kernel's default: DCCP's ports too


def _and3(parts: Iterable[bool | Unknown]) -> bool | Unknown:
    unknown: Unknown | None = None
    for p in parts:
        if isinstance(p, Unknown):
            if unknown is None:  # the first; ``unknown or p`` would ask an Unknown for its truth
                unknown = p
        elif not p:
            return False
    return unknown if unknown is not None else True


def selector_match(sel: XfrmSelector, f: XfrmFlow) -> bool | Unknown:
    """``xfrm_selector_match``, three-valued (ports of GRE keys, a port range, an unknown oif)."""
    if sel.family == AF_UNSPEC:
        return True
    if sel.family != f.family:
        return False
    assert sel.src is not None and sel.dst is not None
    parts: list[bool | Unknown] = [f.src in sel.src, f.dst in sel.dst, not sel.proto or sel.proto == f.proto]
    if sel.ifindex:
        parts.append(Unknown("the selector names an output interface, which is unknown")
                     if f.oif is None else sel.ifindex == f.oif)
    if sel.sport_mask or sel.dport_mask:
        ports = f.ports()
        if ports is None:
            parts.append(Unknown(f"selector ports of a {proto_name(f.proto)} flow are not modelled"))
        else:
            sport, (lo, hi) = ports
            parts.append((sport ^ sel.sport) & sel.sport_mask == 0)
            hits = {(p ^ sel.dport) & sel.dport_mask == 0 for p in range(lo, min(hi, lo + 0xFFFF) + 1)}
            parts.append(hits.pop() if len(hits) == 1 else Unknown("a port range only partly selected"))
    return _and3(parts)


def _policy_match(pol: XfrmPolicy, f: XfrmFlow) -> bool | Unknown:
    """``xfrm_policy_match``: family, if_id, mark, then the selector."""
    if pol.family != f.family:
        return False
    what = f"xfrm policy {pol.describe()}"
    if pol.if_id:
        if f.oif_kind != "xfrm":
            return False
        return Unknown(f"{what}: if_id of an xfrm interface is not modelled")
    if pol.mark_mask == 0:
        mark_ok: bool | Unknown = pol.mark == 0
    elif f.mark is None:
        mark_ok = Unknown(f"{what}: its mark needs the packet mark, which is unknown")
    else:
        mark_ok = (f.mark & pol.mark_mask) == pol.mark
    if mark_ok is False:
        return False
    sel = selector_match(pol.selector, f)
    if isinstance(sel, Unknown):
        sel = Unknown(f"{what}: {sel.reason}")
    return _and3((mark_ok, sel))


def _lookup_order(policies: Iterable[XfrmPolicy], direction: Direction) -> list[XfrmPolicy]:
    found = [p for p in policies if p.direction is direction]
    return sorted(found, key=lambda p: (p.type is not PolicyType.SUB, p.priority, p.index))


def output_policy(
    policies: Iterable[XfrmPolicy],
    flow: Flow | XfrmFlow,
    mark: int | None = None,
    *,
    direction: Direction = Direction.OUT,
    oif: int | None = None,
) -> XfrmPolicy | None | Unknown:
    """The policy the kernel selects for ``flow`` in ``direction`` (None: none does).

    ``mark`` is the packet mark (None: the flow's ``packet_mark``); an
    ``XfrmFlow`` carries its own. Unknown when an earlier policy in lookup
    order may or may not match.
    """
    f = flow if isinstance(flow, XfrmFlow) else XfrmFlow.of(flow, oif=oif)
    if mark is not None:
        f = XfrmFlow(f.family, f.proto, f.src, f.dst, f.sport, f.dport, f.dport_hi, mark, f.oif, f.oif_kind)
    first_unknown: Unknown | None = None
    for pol in _lookup_order(policies, direction):
        hit = _policy_match(pol, f)
        if isinstance(hit, Unknown):
            if first_unknown is None:
                first_unknown = hit
        elif hit:
            return first_unknown if first_unknown is not None else pol
    return first_unknown


# -- bundles ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutputDecision:
    """The output policy selecting a flow and the SAs its templates resolve to.

    ``states`` is the bundle in template order (outermost transform first);
    ``missing`` the required templates that have no SA. ``reason`` says it in words.
    ``rivals`` is set where a template has several SAs to choose from: which
    one the kernel takes (``xfrm_state_look_at``: not dying, then the newest)
    is not in a dump, so ``states`` holds one of them and its SPI is unknown
    (the source address too with ``rival_sources``); reqid, protocol, mode and
    destination agree among them.
    """

    policy: XfrmPolicy | None
    states: tuple[XfrmState, ...] = ()
    missing: tuple[XfrmTemplate, ...] = ()
    reason: str = "no xfrm policy selects it"
    # Where some template has more than one SA the kernel may take (a rekey: the old and the new
    # SA side by side), which SA it takes is not in a dump: its SPI is unknown, and its source
    # address too where the local end of one of them is left to routing (``rival_sources``).
    rivals: Unknown | None = None
    rival_sources: bool = False

    @property
    def blocked(self) -> bool:
        return self.policy is not None and self.policy.action is Action.BLOCK

    @property
    def in_ipsec(self) -> bool:
        """An out policy with templates selects it (whether or not its SAs exist)."""
        return self.policy is not None and not self.blocked and bool(self.policy.templates)

    @property
    def bundle(self) -> bool:
        """The route carries transforms: every required SA exists and at least one SA is used."""
        return self.in_ipsec and not self.missing and bool(self.states)


def _state_candidates(
    tmpl: XfrmTemplate, pol: XfrmPolicy, f: XfrmFlow, states: Sequence[XfrmState], local: set[IPAddress]
) -> tuple[tuple[XfrmState, ...], Unknown | None]:
    """``xfrm_state_find`` for one template: the valid SAs it may take, and Unknown where it cannot be told.

    The kernel looks for SAs with the template's source address first, and
    only where none is valid for SAs with a wildcard source; among them it
    takes the best (``xfrm_state_look_at``: not dying, then the newest
    ``add_time``), which a dump does not show: all of that group are returned,
    in snapshot order. The Unknown says an SA may qualify that cannot be told.
    """
    if tmpl.mode in (Mode.TUNNEL, Mode.BEET):
        remote, here = tmpl.daddr, tmpl.saddr
    else:
        remote, here = f.dst, f.src
    mark = pol.mark & pol.mark_mask
    unsure: Unknown | None = None
    exact: list[XfrmState] = []
    wildcard: list[XfrmState] = []
    for st in states:
        if not (
            st.valid
            and st.family == tmpl.family
            and st.reqid == tmpl.reqid
            and st.mode == tmpl.mode
            and st.proto == tmpl.proto
            and (not tmpl.spi or tmpl.spi == st.spi)
            and (mark & st.mark_mask) == st.mark
            and st.if_id == pol.if_id
            and st.daddr == remote
        ):
            continue
        if st.selector.family != AF_UNSPEC:
            sel = selector_match(st.selector, f) if st.selector.family == f.family else False
            if sel is False:
                continue
            if isinstance(sel, Unknown):
                if unsure is None:
                    unsure = Unknown(f"SA {st.describe()}: {sel.reason}")
                continue
        if st.saddr == here:
            exact.append(st)
        elif _is_any(st.saddr):
            wildcard.append(st)
        # The kernel picks the local end by routing to the remote: not modelled here.
        elif unsure is None and _is_any(here) and tmpl.mode in (Mode.TUNNEL, Mode.BEET) and st.saddr in local:
            unsure = Unknown(f"SA {st.describe()}: the template leaves the local tunnel end to routing")
    return tuple(exact or wildcard), unsure


def output_lookup(
    policies: Iterable[XfrmPolicy],
    states: Sequence[XfrmState],
    flow: XfrmFlow,
    local: Iterable[IPAddress] = (),
) -> OutputDecision | Unknown:
    """``xfrm_lookup`` for a packet leaving: the policy and the bundle its templates resolve to."""
    pol = output_policy(policies, flow)
    if isinstance(pol, Unknown):
        return pol
    if pol is None:
        return OutputDecision(None)
    what = f"xfrm policy {pol.describe()}"
    if pol.action is Action.BLOCK:
        return OutputDecision(pol, reason=f"{what} blocks it: the kernel drops its packets")
    if not pol.templates:
        return OutputDecision(pol, reason=f"{what} selects it without templates: it leaves in the clear")
    local_set = set(local)
    found: list[XfrmState] = []
    missing: list[XfrmTemplate] = []
    rivals: Unknown | None = None
    rival_sources = False
    for tmpl in pol.templates:
        candidates, unsure = _state_candidates(tmpl, pol, flow, states, local_set)
        if candidates:
            found.append(candidates[0])
            if rivals is None and len(candidates) > 1:
                spis = " or ".join(f"spi {st.spi:#x}" for st in candidates)
                rivals = Unknown(f"{what}: reqid {tmpl.reqid} has {spis}: the kernel takes the newest SA "
                                 "not dying, which a dump does not show (a rekey)")
            if unsure is not None:
                rival_sources = True
                if rivals is None:
                    rivals = Unknown(f"{what}: reqid {tmpl.reqid} may use another SA than "
                                     f"spi {candidates[0].spi:#x}: {unsure.reason}")
        elif unsure is not None:
            return Unknown(f"{what}: {unsure.reason}")
        elif not tmpl.optional:
            missing.append(tmpl)
    if missing:
        names = ", ".join(f"reqid {t.reqid} ({t.describe()})" for t in missing)
        reason = (
            f"{what} selects it but no SA for {names}: the kernel drops its packets "
            "(asking the key manager for one) until an SA is installed"
        )
    elif not found:
        reason = f"{what} selects it but only optional templates without SAs: it leaves in the clear"
    else:
        reason = f"{what} selects it; bundle " + ", ".join(s.describe() for s in found)
    if missing:
        return OutputDecision(pol, tuple(found), tuple(missing), reason)
    return OutputDecision(pol, tuple(found), (), reason, rivals, rival_sources)


# -- topology-level questions ------------------------------------------------------------


def _unread(topology: Topology) -> Unknown | None:
    if not topology.xfrm_known:
        return Unknown("the xfrm policies and SAs were not read")
    return None


def _local_addresses(topology: Topology) -> list[IPAddress]:
    return [a.address for a in topology.addresses]


def lookup(topology: Topology, flow: Flow | XfrmFlow, *, oif: int | None = None) -> OutputDecision | Unknown:
    """``output_lookup`` over a ``Topology`` snapshot's xfrm policies and SAs."""
    unread = _unread(topology)
    if unread is not None:
        return unread
    f = flow if isinstance(flow, XfrmFlow) else XfrmFlow.of(flow, oif=oif)
    if f.oif is not None and not f.oif_kind:
        link = topology.link(f.oif)
        if link is not None and link.kind:
            # ``replace(f, oif_kind=link.kind)``, for a fraction of its cost (no ``__post_init__``).
            f = XfrmFlow(f.family, f.proto, f.src, f.dst, f.sport, f.dport, f.dport_hi, f.mark, f.oif,
                         link.kind)
    # The local addresses are read only where a policy with templates selects the flow.
    return output_lookup(topology.xfrm_policies, topology.xfrm_states, f,
                         (a.address for a in topology.addresses))


def in_ipsec(topology: Topology, flow: Flow | XfrmFlow, *, oif: int | None = None) -> bool | Unknown:
    """An output flow is in IPsec when an out policy with templates selects it (SAs or not)."""
    decision = lookup(topology, flow, oif=oif)
    return decision if isinstance(decision, Unknown) else decision.in_ipsec


def has_bundle(topology: Topology, flow: Flow | XfrmFlow, *, oif: int | None = None) -> bool | Unknown:
    """``rt ipsec exists``: the route carries a bundle. Unknown where a required SA is absent."""
    decision = lookup(topology, flow, oif=oif)
    if isinstance(decision, Unknown):
        return decision
    if decision.missing:
        return Unknown(decision.reason)
    return decision.bundle


def secpath(topology: Topology, *, local: bool) -> bool | Unknown:
    """Whether the flow's packets carry a secpath (arrived decrypted): False or Unknown.

    A locally generated flow has none. A forwarded flow can only if some SA
    ends at one of this host's addresses.
    """
    if local:
        return False
    unread = _unread(topology)
    if unread is not None:
        return unread
    mine = set(_local_addresses(topology))
    inbound = [s for s in topology.xfrm_states if s.valid and s.daddr in mine]
    if not inbound:
        return False
    return Unknown(
        f"whether the flow's packets arrive through an SA (such as {inbound[0].describe()}) is not modelled"
    )


# -- nftables ------------------------------------------------------------------------------


def nft_match(m: Match, topology: Topology, flow: XfrmFlow, hook: str, *, local: bool) -> bool | Unknown:
    """nft's ``rt ipsec``, ``meta secpath`` and ``ipsec in|out [spnum N] KEY`` at ``hook``.

    ``flow`` is the packet as it is at the hook (after DNAT at postrouting;
    ``oif`` the output interface); ``local`` is True for a locally generated
    flow. Where the kernel's expression breaks (no route yet, no bundle, no
    SA number ``spnum``, an address of an SA of the other family or of a
    transport-mode SA) the rule does not match, whatever the operator.
    """
    sel = m.selector
    values = m.values

    def member(value: int, version: int | None = None) -> bool:
        if version is not None and getattr(values, "version", None) != version:
            return m.op is Op.NE
        hit = values.covers(value, value)  # type: ignore[union-attr]
        return bool(hit) if m.op is Op.EQ else not hit

    if sel.key is Key.SECPATH or sel.direction == "in":
        sp = secpath(topology, local=local)
        if isinstance(sp, Unknown):
            return Unknown(f"{sel.text}: {sp.reason}")
        return member(0) if sel.key is Key.SECPATH else False  # no secpath: ``ipsec in`` breaks
    if hook == "prerouting":
        if sel.key is Key.RT_IPSEC:
            return False  # no route yet: nft_rt breaks
        return Unknown(f"{sel.text} is not valid at prerouting")
    rivals: Unknown | None = None
    rival_sources = False
    if hook == "input":
        states: tuple[XfrmState, ...] = ()  # an input route carries no bundle
    else:
        decision = lookup(topology, flow)
        if isinstance(decision, Unknown):
            return Unknown(f"{sel.text}: {decision.reason}")
        if decision.missing:
            return Unknown(f"{sel.text}: {decision.reason}")
        states = decision.states if decision.bundle else ()
        rivals, rival_sources = decision.rivals, decision.rival_sources
    if sel.key is Key.RT_IPSEC:
        return member(1 if states else 0)
    if sel.spnum >= len(states):
        return False
    st = states[sel.spnum]
    if sel.key is Key.IPSEC_REQID:
        return member(st.reqid)
    if rivals is not None and (sel.key is Key.IPSEC_SPI or (sel.key is Key.IPSEC_SADDR and rival_sources)):
        return Unknown(f"{sel.text}: {rivals.reason}")
    if sel.key is Key.IPSEC_SPI:
        return member(st.spi)
    if sel.family is not None and sel.family != st.family:
        return False
    if st.mode is not Mode.TUNNEL and st.mode is not Mode.BEET:
        return False  # xfrm_state_addr_ok: a transport SA has no addresses of its own to read
    addr = st.saddr if sel.key is Key.IPSEC_SADDR else st.daddr
    return member(int(addr), addr.version)


# -- iptables -m policy ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PolicyElement:
    """One ``-m policy`` element: each selector None when not given; ``*_invert`` is its ``!``."""

    reqid: int | None = None
    spi: int | None = None
    proto: int | None = None
    mode: Mode | None = None
    tunnel_src: IPNetwork | None = None
    tunnel_dst: IPNetwork | None = None
    reqid_invert: bool = False
    spi_invert: bool = False
    proto_invert: bool = False
    mode_invert: bool = False
    tunnel_src_invert: bool = False
    tunnel_dst_invert: bool = False

    def matches(self, st: XfrmState) -> bool:
        """``match_xfrm_state``: every given selector agrees (each negated by its ``!``)."""

        def check(given: object, ok: bool, invert: bool) -> bool:
            return given is None or (ok != invert)

        return (
            check(self.tunnel_src, self.tunnel_src is not None and st.saddr in self.tunnel_src,
                  self.tunnel_src_invert)
            and check(self.tunnel_dst, self.tunnel_dst is not None and st.daddr in self.tunnel_dst,
                      self.tunnel_dst_invert)
            and check(self.proto, st.proto == self.proto, self.proto_invert)
            and check(self.mode, st.mode == self.mode, self.mode_invert)
            and check(self.spi, st.spi == self.spi, self.spi_invert)
            and check(self.reqid, st.reqid == self.reqid, self.reqid_invert)
        )


def _xt_policy_chain(states: Sequence[XfrmState], elements: Sequence[PolicyElement], strict: bool) -> bool:
    """``match_policy_out``'s walk of the bundle, given that there is one."""
    elems = list(elements) or [PolicyElement()]
    for i, st in enumerate(states):
        pos = i if strict else 0
        if pos >= len(elems):
            return False
        if elems[pos].matches(st):
            if not strict:
                return True
        elif strict:
            return False
    return len(states) == len(elems) if strict else False


def policy_match(  # noqa: PLR0917 - the iptables reader calls it positionally
    topology: Topology,
    flow: Flow | XfrmFlow,
    direction: str,
    pol: str,
    elements: Sequence[PolicyElement] = (),
    strict: bool = False,
    *,
    oif: int | None = None,
    local: bool = False,
) -> bool | Unknown:
    """iptables ``-m policy --dir in|out --pol ipsec|none [--strict] [elements]`` for a flow.

    For the iptables reader: call it where the match is evaluated, with the
    flow as the packet then is (after DNAT at postrouting), ``oif`` the output
    interface index (postrouting, output) and ``local`` True for a locally
    generated flow. ``--dir out`` reads the route's bundle (``has_bundle``
    semantics: Unknown while a required SA is absent); ``--dir in`` the
    packet's secpath (``secpath``: Unknown for a forwarded flow that may have
    arrived through an SA). ``--pol none`` is true exactly when there is no
    bundle (no secpath); ``--pol ipsec`` when there is one and its SAs satisfy
    the elements (one element with no selectors when none are given; with
    ``strict`` the i-th SA must match the i-th element and their counts agree).
    """
    if pol not in ("ipsec", "none"):
        raise ValueError(f"policy_match: --pol must be ipsec or none, got {pol!r}")
    if direction == "in":
        sp = secpath(topology, local=local)
        if isinstance(sp, Unknown):
            return sp
        return pol == "none"  # secpath is False here: the ``in`` elements are never reached
    if direction != "out":
        raise ValueError(f"policy_match: --dir must be in or out, got {direction!r}")
    decision = lookup(topology, flow, oif=oif)
    if isinstance(decision, Unknown):
        return decision
    if decision.missing:
        return Unknown(decision.reason)
    if not decision.bundle:
        return pol == "none"
    if pol == "none":
        return False
    if decision.rivals is not None and any(
        e.spi is not None or (e.tunnel_src is not None and decision.rival_sources) for e in elements
    ):
        return decision.rivals
    return _xt_policy_chain(decision.states, elements, strict)

