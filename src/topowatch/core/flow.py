# SPDX-License-Identifier: GPL-2.0-or-later
"""Flows, bindings and the three-valued answers the FIB and the NAT evaluator give.

Theory of operation: a conntrack entry's original direction is a ``Flow``.
The FIB answers where a flow enters (``Ingress``) and leaves (``Egress``);
the NAT evaluator answers which ``Binding`` each NAT hook would give it now.
Any question that depends on something not modelled answers ``Unknown`` with
a reason, never a guess.

A binding names the translated address range and port range; "masquerade to
X" and "snat to X" are the same translation and compare equal by
``admits``. ``NONE`` means the address is kept (a null binding).

This module never performs I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from topowatch.core.model import AF_INET, IPAddress, IPNetwork

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_GRE = 47
IPPROTO_ESP = 50
IPPROTO_ICMPV6 = 58
IPPROTO_SCTP = 132
IPPROTO_UDPLITE = 136

PROTO_NAMES: dict[int, str] = {
    IPPROTO_ICMP: "icmp",
    IPPROTO_TCP: "tcp",
    IPPROTO_UDP: "udp",
    IPPROTO_GRE: "gre",
    IPPROTO_ESP: "esp",
    IPPROTO_ICMPV6: "icmpv6",
    IPPROTO_SCTP: "sctp",
    IPPROTO_UDPLITE: "udplite",
    33: "dccp",
}
PROTO_NUMBERS: dict[str, int] = {name: num for num, name in PROTO_NAMES.items()}

# Protocols whose tuples carry ports.
PORT_PROTOS = frozenset({IPPROTO_TCP, IPPROTO_UDP, IPPROTO_UDPLITE, IPPROTO_SCTP, 33})


def proto_name(proto: int) -> str:
    return PROTO_NAMES.get(proto, str(proto))


@dataclass(frozen=True, slots=True)
class Unknown:
    """A three-valued "don't know", with the reason a person can read.

    ``rule``: the ruleset rule whose match or statement could not be evaluated,
    where one did (``Reason.cause_rule``); it does not take part in equality.
    """

    reason: str
    rule: RuleRef | None = field(default=None, compare=False)

    def __bool__(self) -> bool:
        # Guard against ``if result:`` treating unknown as true or false.
        raise TypeError("Unknown has no truth value; test with isinstance()")


@dataclass(frozen=True, slots=True)
class Flow:
    """The original direction of a connection, as its first packet showed it.

    For ICMP, ``sport`` is the echo id and ``dport`` is ``type << 8 | code``.
    ``packet_mark`` is the skb mark the first packet carried, or None where it
    is not known (only the conntrack mark is); selectors on it answer unknown.
    """

    family: int
    proto: int
    src: IPAddress
    dst: IPAddress
    sport: int = 0
    dport: int = 0
    zone: int = 0
    ct_mark: int = 0
    packet_mark: int | None = None

    def __post_init__(self) -> None:
        if self.src.version != self.dst.version:
            raise ValueError(f"Flow mixes address families: {self.src} -> {self.dst}")
        if (self.family == AF_INET) != (self.src.version == 4):
            raise ValueError(f"Flow.family {self.family} does not match {self.src}")

    def describe(self) -> str:
        name = proto_name(self.proto)
        if self.proto in PORT_PROTOS:
            return f"{name} {self.src}:{self.sport} -> {self.dst}:{self.dport}"
        return f"{name} {self.src} -> {self.dst}"


@dataclass(frozen=True, slots=True)
class Ingress:
    """Where a flow enters: the input interface, or ``local`` for locally generated."""

    ifindex: int
    ifname: str
    local: bool = False


class EgressKind(enum.Enum):
    UNICAST = "unicast"
    LOCAL = "local"  # delivered to this host: input hook, no postrouting
    BLACKHOLE = "blackhole"
    UNREACHABLE = "unreachable"
    PROHIBIT = "prohibit"


# The route types whose lookup answers an error (``fib_props[type].error``, RTF_REJECT): a packet
# routed there goes nowhere.
REFUSING = frozenset({EgressKind.BLACKHOLE, EgressKind.UNREACHABLE, EgressKind.PROHIBIT})


@dataclass(frozen=True, slots=True)
class Egress:
    """Where a flow leaves, per one FIB answer (one nexthop of a multipath route)."""

    kind: EgressKind
    oif: int = 0
    oifname: str = ""
    gateway: IPAddress | None = None
    # The address MASQUERADE would choose on oif for this nexthop, None if none.
    masquerade_source: IPAddress | None = None
    route: str = ""
    # The xfrm out policy that puts the flow in IPsec (or blocks it) on this egress, "" if none.
    xfrm: str = ""
    # The prefix of the route (``route`` words it), None where no route answered (a rule, no route).
    prefix: IPNetwork | None = None

    def describe(self) -> str:
        if self.kind is not EgressKind.UNICAST:
            return f"{self.kind.value} ({self.route})" if self.route else self.kind.value
        via = f" via {self.gateway}" if self.gateway is not None else ""
        ipsec = f" (xfrm policy {self.xfrm})" if self.xfrm else ""
        return f"dev {self.oifname}{via}{ipsec}"


class NatKind(enum.Enum):
    NONE = "none"
    SNAT = "snat"
    MASQUERADE = "masquerade"
    DNAT = "dnat"
    REDIRECT = "redirect"


@dataclass(frozen=True, slots=True)
class Binding:
    """One NAT translation of one side (source or destination) of a flow.

    ``addr_lo``..``addr_hi`` is the translated address range (both None for
    NONE: the address is kept); ``port_lo``..``port_hi`` the port range (None:
    the port is kept where possible).
    """

    kind: NatKind
    addr_lo: IPAddress | None = None
    addr_hi: IPAddress | None = None
    port_lo: int | None = None
    port_hi: int | None = None

    def __post_init__(self) -> None:
        if self.addr_lo is not None and self.addr_hi is None:
            object.__setattr__(self, "addr_hi", self.addr_lo)
        if self.port_lo is not None and self.port_hi is None:
            object.__setattr__(self, "port_hi", self.port_lo)
        if self.kind is NatKind.NONE and self.addr_lo is not None:
            raise ValueError("a NONE binding has no address")
        if (
            self.addr_lo is not None
            and self.addr_hi is not None
            and (self.addr_lo.version != self.addr_hi.version or int(self.addr_lo) > int(self.addr_hi))
        ):
            raise ValueError(f"bad address range {self.addr_lo}-{self.addr_hi}")
        if self.port_lo is not None and self.port_hi is not None and self.port_lo > self.port_hi:
            raise ValueError(f"bad port range {self.port_lo}-{self.port_hi}")

    def translated(self, original: IPAddress) -> tuple[IPAddress, IPAddress]:
        """The address range a packet with ``original`` would carry after this binding."""
        if self.addr_lo is None or self.addr_hi is None:
            return original, original
        return self.addr_lo, self.addr_hi

    def admits(
        self, original: IPAddress, addr: IPAddress, original_port: int, port: int, *, dnat_side: bool = False
    ) -> bool:
        """True if an entry translated ``original:original_port`` to ``addr:port`` under this binding.

        ``dnat_side``: the binding is the destination's. The rule, with its
        cases, is ``core.admission``'s; three faster copies follow it.
        """
        lo, hi = self.translated(original)
        if lo.version != addr.version or not int(lo) <= int(addr) <= int(hi):
            return False
        if self.port_lo is not None and self.port_hi is not None:
            return self.port_lo <= port <= self.port_hi
        # No port range: a source port is kept unless it clashes (any port is admitted); a
        # destination port is never changed (``nf_nat_l4proto_unique_tuple``).
        return not dnat_side or port == original_port

    @property
    def addr_text(self) -> str | None:
        if self.addr_lo is None:
            return None
        if self.addr_hi is None or self.addr_hi == self.addr_lo:
            return str(self.addr_lo)
        return f"{self.addr_lo}-{self.addr_hi}"

    @property
    def ports(self) -> tuple[int, int] | None:
        if self.port_lo is None or self.port_hi is None:
            return None
        return (self.port_lo, self.port_hi)

    def describe(self) -> str:
        if self.kind is NatKind.NONE:
            return "no NAT"
        text = f"{self.kind.value} to {self.addr_text or 'original address'}"
        if self.ports is not None:
            lo, hi = self.ports
            text += f":{lo}" if lo == hi else f":{lo}-{hi}"
        return text


NO_NAT = Binding(NatKind.NONE)


@dataclass(frozen=True, slots=True)
class RuleRef:
    """A ruleset rule that made a binding or a drop: its chain (``Chain.describe``), handle and text.

    ``handle`` is the nft rule handle; an iptables-save reader numbers a chain's rules
    from 1 instead (it shows no handles); 0 where the reader kept none.
    """

    chain: str
    handle: int
    text: str

    def __str__(self) -> str:
        """The words ``NatRuleset.describe_rule`` gives the rule (in reasons and ``explain``)."""
        return f"{self.chain} handle {self.handle}: {self.text}"


@dataclass(frozen=True, slots=True)
class Prediction:
    """What NAT a flow would get now.

    ``dnat``/``snat`` each hold the possible bindings of that side (several
    where multipath, ranges of maps or numgen make the choice not unique), or
    ``Unknown``. ``egress`` holds the possible egresses after DNAT.

    ``alternatives``: where the flow may have entered on several interfaces
    and the answer depends on which, the prediction per interface (each with
    its ``ingress``); ``dnat`` and ``snat`` are then their unions. An entry
    came in on one of them, so it is stale only if every alternative gives
    it other bindings, on one side or the other (``core.decide``).
    """

    dnat: frozenset[Binding] | Unknown
    snat: frozenset[Binding] | Unknown
    egress: tuple[Egress, ...] | Unknown
    ingress: Ingress | None | Unknown = None
    # Which rules made the bindings, one line each, for reasons ("chain postrouting: oifname up2 masquerade").
    explain: tuple[str, ...] = ()
    alternatives: tuple[Prediction, ...] = ()
    # The rules ``explain`` names (bindings and drops), each once, in the order first named.
    rules: tuple[RuleRef, ...] = ()
