# SPDX-License-Identifier: GPL-2.0-or-later
"""The NAT ruleset as the evaluator sees it: one intermediate form for nftables (and later iptables).

Theory of operation: a reader (``edges.nft``) turns a ruleset dump into a
``NatRuleset``: the base chains of type nat at the four NAT hooks, every
regular chain they can reach by jump or goto, and in each chain its rules in
order. A rule is its expressions in kernel order: matches (``Match`` over a
``Selector``, or ``UnknownMatch`` naming an expression that is not modelled)
and statements (verdicts, NAT statements, statements with no effect on NAT,
and ``UnknownStatement``). Named sets are resolved into the matches that use
them, so the ruleset is one value: two reads of the same ruleset compare
equal, and a changed set element makes the rulesets differ.

Rules:
- every value is frozen, slotted and hashable; constructors normalise (value
  sets are sorted, merged intervals);
- nothing volatile is kept (counter values, element expiry), so equality means
  "same NAT behaviour as written";
- an expression this module cannot represent exactly is kept as an
  ``UnknownMatch``/``UnknownStatement`` carrying its name, never approximated;
- this module never performs I/O and never evaluates a flow (``evaluate`` does).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from topowatch.core.flow import NatKind
from topowatch.core.model import AF_INET, AF_INET6, IPAddress


class Hook(enum.Enum):
    """The netfilter hooks a nat chain can sit at, and forward (mark chains only)."""

    PREROUTING = "prerouting"
    INPUT = "input"
    OUTPUT = "output"
    POSTROUTING = "postrouting"
    FORWARD = "forward"


# nftables table families that carry NAT, and the address families they see.
FAMILY_AFS: dict[str, frozenset[int]] = {
    "ip": frozenset({AF_INET}),
    "ip6": frozenset({AF_INET6}),
    "inet": frozenset({AF_INET, AF_INET6}),
}


class Key(enum.Enum):
    """What a selector reads from the packet, its route or its conntrack entry."""

    IIFNAME = "iifname"
    OIFNAME = "oifname"
    IIF = "iif"
    OIF = "oif"
    L4PROTO = "l4proto"  # meta l4proto, ip protocol, ip6 nexthdr
    NFPROTO = "nfproto"  # AF_INET / AF_INET6 (meta nfproto, meta protocol)
    SADDR = "saddr"
    DADDR = "daddr"
    SPORT = "sport"
    DPORT = "dport"
    MARK = "mark"  # packet (skb) mark
    CT_MARK = "ct mark"
    CT_ZONE = "ct zone"
    # IPsec (evaluated by ``core.xfrm``): values 1/0 for exists/missing, else the SA's field.
    RT_IPSEC = "rt ipsec"  # the route carries an xfrm bundle
    SECPATH = "meta secpath"  # the packet arrived through an SA
    IPSEC_REQID = "ipsec reqid"  # ``ipsec in|out [spnum N] KEY``: the N-th SA of the bundle/secpath
    IPSEC_SPI = "ipsec spi"
    IPSEC_SADDR = "ipsec saddr"
    IPSEC_DADDR = "ipsec daddr"
    # nftables: answered by the evaluator from the FIB or as "any value of a range".
    FIB_TYPE = "fib type"  # params: the fib flags ("daddr", "iif")
    FIB_OIF = "fib oif"  # params: the fib flags ("saddr", "iif"); values are ifindexes, 0 is "missing"
    FIB_OIFNAME = "fib oifname"
    NUMGEN = "numgen"  # params: (mod, offset); any value of offset..offset+mod-1
    HASH = "hash"  # jhash/symhash; params: (mod, offset); the seed makes the value unknowable


INTERFACE_KEYS = frozenset({Key.IIFNAME, Key.OIFNAME, Key.IIF, Key.OIF, Key.FIB_OIFNAME})
_INTERFACE_KEYS = tuple(INTERFACE_KEYS)  # ``in`` by identity (Enum's __hash__ is a Python call)
ADDRESS_KEYS = frozenset({Key.SADDR, Key.DADDR})
XFRM_KEYS = frozenset(
    {Key.RT_IPSEC, Key.SECPATH, Key.IPSEC_REQID, Key.IPSEC_SPI, Key.IPSEC_SADDR, Key.IPSEC_DADDR}
)


@dataclass(frozen=True, slots=True)
class Selector:
    """The left side of a match.

    ``family`` is the implicit dependency of ``ip``/``ip6`` payload selectors
    (an ``ip saddr`` match is false for an IPv6 packet, whatever its operator);
    ``proto`` that of ``tcp``/``udp``/... port selectors (None for ``th``,
    which has none); ``mask`` a constant ``&`` applied first (``meta mark & 0xff``).
    ``text`` is how nft writes it. For ``ipsec ... saddr|daddr``, ``family``
    is the SA's address family (the kernel breaks the rule for another);
    ``direction`` ("in"/"out") and ``spnum`` say which SA ``ipsec`` reads.
    """

    key: Key
    text: str
    family: int | None = None
    proto: int | None = None
    mask: int | None = None
    direction: str | None = None
    spnum: int = 0
    params: tuple[str | int, ...] = ()  # fib flags; numgen/hash (mod, offset)


@dataclass(frozen=True, slots=True)
class IntervalSet:
    """A set of integers (ports, protocols, marks, or addresses as integers) as closed intervals.

    ``version`` is 4 or 6 for address sets (their integers are addresses), None otherwise.
    """

    intervals: tuple[tuple[int, int], ...]
    version: int | None = None

    def __post_init__(self) -> None:
        given = self.intervals
        if type(given) is tuple and len(given) == 1 and type(given[0]) is tuple and len(given[0]) == 2:
            lo, hi = given[0]  # one interval (most sets): already what the loop below would make of it
            if lo > hi:
                raise ValueError(f"IntervalSet: bad interval {lo}-{hi}")
            return
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted(self.intervals):
            if lo > hi:
                raise ValueError(f"IntervalSet: bad interval {lo}-{hi}")
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        object.__setattr__(self, "intervals", tuple(merged))

    def covers(self, lo: int, hi: int) -> bool | None:
        """True if every value of ``lo..hi`` is in the set, False if none is, None if some are."""
        inside = 0
        for a, b in self.intervals:
            overlap = min(b, hi) - max(a, lo) + 1
            if overlap > 0:
                inside += overlap
        if inside == 0:
            return False
        if inside == hi - lo + 1:
            return True
        return None

    def describe(self) -> str:
        def one(v: int) -> str:
            if self.version == 4:
                return str(IPv4Address(v))
            if self.version == 6:
                return str(IPv6Address(v))
            return str(v)

        parts = [one(lo) if lo == hi else f"{one(lo)}-{one(hi)}" for lo, hi in self.intervals]
        return parts[0] if len(parts) == 1 else "{ " + ", ".join(parts) + " }"


@dataclass(frozen=True, slots=True)
class NameSet:
    """Interface names: exact names, name prefixes (nft ``"eth*"``) and, for iif/oif, indexes."""

    exact: frozenset[str] = frozenset()
    prefixes: frozenset[str] = frozenset()
    indexes: frozenset[int] = frozenset()

    def contains(self, name: str, index: int | None = None) -> bool:
        if name in self.exact or (self.prefixes and any(name.startswith(p) for p in self.prefixes)):
            return True
        return index is not None and index in self.indexes


class Op(enum.Enum):
    EQ = "=="
    NE = "!="


@dataclass(frozen=True, slots=True)
class Match:
    """``selector op values``: membership (``==``) or its negation (``!=``)."""

    selector: Selector
    op: Op
    values: IntervalSet | NameSet
    text: str

    def __post_init__(self) -> None:
        if (self.selector.key in _INTERFACE_KEYS) != isinstance(self.values, NameSet):
            raise ValueError(f"Match {self.text!r}: values do not fit {self.selector.key.value}")


@dataclass(frozen=True, slots=True)
class UnknownMatch:
    """A match whose expression is not modelled: it evaluates to unknown, never true or false."""

    expression: str
    text: str

    @property
    def reason(self) -> str:
        return f"unmodelled expression: {self.expression}"


class VerdictKind(enum.Enum):
    ACCEPT = "accept"
    DROP = "drop"
    RETURN = "return"
    CONTINUE = "continue"
    JUMP = "jump"
    GOTO = "goto"


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: VerdictKind
    target: str | None = None
    text: str = ""

    def __post_init__(self) -> None:
        if (self.kind in (VerdictKind.JUMP, VerdictKind.GOTO)) != (self.target is not None):
            raise ValueError(f"Verdict {self.kind.value}: a target is needed exactly for jump and goto")
        if not self.text:
            object.__setattr__(
                self, "text", f"{self.kind.value} {self.target}" if self.target else self.kind.value
            )


@dataclass(frozen=True, slots=True)
class NatStatement:
    """snat / dnat / masquerade / redirect with constant arguments.

    ``family`` is the statement's own family in an inet chain (``snat ip to``):
    for a packet of the other family the kernel skips the statement. ``addr``
    is the address range (None for masquerade and redirect, whose address the
    kernel picks); ``ports`` the port range, None to keep the port. ``flags``
    (random, persistent, fully-random) do not change the address set.
    """

    kind: NatKind
    text: str
    family: int | None = None
    addr: tuple[IPAddress, IPAddress] | None = None
    ports: tuple[int, int] | None = None
    flags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        kind = self.kind
        if kind is NatKind.NONE:
            raise ValueError("NatStatement.kind cannot be NONE")
        if self.addr is not None:
            lo, hi = self.addr
            if lo.version != hi.version or int(lo) > int(hi):
                raise ValueError(f"NatStatement {self.text!r}: bad address range {lo}-{hi}")
            if kind is NatKind.MASQUERADE or kind is NatKind.REDIRECT:
                raise ValueError(f"NatStatement {kind.value} takes no address")
        ports = self.ports
        if ports is not None and not 0 <= ports[0] <= ports[1] <= 0xFFFF:
            raise ValueError(f"NatStatement {self.text!r}: bad port range {ports}")
        if self.flags or type(self.flags) is not tuple:  # () stays as it is
            object.__setattr__(self, "flags", tuple(sorted(set(self.flags))))


@dataclass(frozen=True, slots=True)
class Passive:
    """A statement with no effect on NAT (counter, log)."""

    name: str
    text: str


@dataclass(frozen=True, slots=True)
class UnknownStatement:
    """A statement whose effect is not modelled (vmap, mangle, limit, xt target, NAT to a map ...)."""

    expression: str
    text: str

    @property
    def reason(self) -> str:
        return f"unmodelled expression: {self.expression}"


# -- iptables matches and statements (read by ``edges.iptables``) -------------
# Each is evaluated by ``core.xtmatch``: exactly where the flow decides it, else unknown.


@dataclass(frozen=True, slots=True)
class AnyOf:
    """A disjunction: true if any of its matches is (``-m multiport --ports``: source or destination)."""

    matches: tuple[Match, ...]
    text: str


@dataclass(frozen=True, slots=True)
class CtStateMatch:
    """``-m conntrack --ctstate`` / ``-m state --state``: the entry's state is one of ``states``."""

    states: frozenset[str]
    negate: bool
    text: str


@dataclass(frozen=True, slots=True)
class CtStatusMatch:
    """``-m conntrack --ctstatus``: some of the status bits ``statuses`` are set."""

    statuses: frozenset[str]
    negate: bool
    text: str


@dataclass(frozen=True, slots=True)
class CtTupleMatch:
    """``-m conntrack --ctorigsrc/--ctorigdst/--ctorigsrcport/--ctorigdstport/--ctproto``.

    ``field`` is one of ``origsrc``, ``origdst``, ``origsrcport``, ``origdstport``, ``proto``:
    the original tuple, as the flow's first packet carried it (before any NAT).
    """

    field: str
    values: IntervalSet
    negate: bool
    text: str


@dataclass(frozen=True, slots=True)
class AddrTypeMatch:
    """``-m addrtype --src-type|--dst-type TYPES``; ``limit_iface`` "in"/"out" restricts the lookup."""

    side: str  # "src" or "dst"
    types: frozenset[str]
    negate: bool
    text: str
    limit_iface: str | None = None


@dataclass(frozen=True, slots=True)
class PolicyElement:
    """One ``--reqid/--spi/--proto/--mode/--tunnel-src/--tunnel-dst`` group of ``-m policy``.

    None is "any"; ``negated`` names the fields written with ``!``.
    """

    reqid: int | None = None
    spi: int | None = None
    proto: int | None = None
    mode: str | None = None  # "tunnel" or "transport"
    tunnel_src: IPv4Network | IPv6Network | None = None
    tunnel_dst: IPv4Network | IPv6Network | None = None
    negated: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class PolicyMatch:
    """``-m policy --dir in|out --pol ipsec|none [--strict] [elements]`` (xt_policy)."""

    direction: str  # "in" or "out"
    pol: str  # "ipsec" or "none"
    elements: tuple[PolicyElement, ...]
    strict: bool
    text: str


XtMatch = AnyOf | CtStateMatch | CtStatusMatch | CtTupleMatch | AddrTypeMatch | PolicyMatch


@dataclass(frozen=True, slots=True)
class MarkSet:
    """Set the packet mark (or with ``ct``, the conntrack mark): ``new = (old & ~mask) ^ value``.

    iptables ``MARK --set-xmark value/mask`` is exactly this; later matches in
    the same traversal see the new mark.
    """

    value: int
    mask: int
    text: str
    ct: bool = False

    def apply(self, old: int | None) -> int | None:
        """The new mark, or None where the old one is unknown and not fully overwritten."""
        if old is None:
            return self.value if self.mask == 0xFFFFFFFF else None
        return ((old & ~self.mask) ^ self.value) & 0xFFFFFFFF


_MARK_FULL = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class MarkCopy:
    """Copy between the packet mark and the conntrack mark: ``dst = (dst & ~dst_mask) ^ (src & src_mask)``.

    ``to_ct`` saves (the ct mark from the packet's: nft ``ct mark set meta
    mark``, ``CONNMARK --save-mark``); otherwise it restores (``meta mark set
    ct mark``, ``CONNMARK --restore-mark``). CONNMARK's ``--nfmask`` and
    ``--ctmask`` are the masks of the packet and the ct side.
    """

    to_ct: bool
    text: str
    src_mask: int = _MARK_FULL
    dst_mask: int = _MARK_FULL

    def apply(self, dst: int | None, src: int | None) -> int | None:
        """The new destination mark, None where it is not known."""
        kept = 0 if self.dst_mask == _MARK_FULL else (None if dst is None else dst & ~self.dst_mask)
        copied = 0 if self.src_mask == 0 else (None if src is None else src & self.src_mask)
        if kept is None or copied is None:
            return None
        return (kept ^ copied) & _MARK_FULL


@dataclass(frozen=True, slots=True)
class NetmapStatement:
    """iptables ``NETMAP --to PREFIX``: the address keeps its host bits under ``prefix``.

    At prerouting/output it maps the destination (a DNAT), at postrouting/input the source (an SNAT).
    """

    prefix: IPv4Network | IPv6Network
    text: str

    def map(self, addr: IPAddress) -> IPAddress:
        net = self.prefix
        host = int(addr) & int(net.hostmask)
        mapped = int(net.network_address) | host
        return IPv4Address(mapped) if net.version == 4 else IPv6Address(mapped)


# -- nftables lookups: concatenations, verdict maps, NAT maps -----------------
# An element's key holds one value set per key component; a lookup hits the element
# whose every component holds the packet's value (nft keeps the elements disjoint).

ElementKey = tuple["IntervalSet | NameSet", ...]


@dataclass(frozen=True, slots=True)
class ConcatMatch:
    """``a . b { x . y, ... }`` (or a one-component lookup): some element holds the packet's values.

    ``!=`` is true when no element does.
    """

    selectors: tuple[Selector, ...]
    op: Op
    elements: tuple[ElementKey, ...]
    text: str


@dataclass(frozen=True, slots=True)
class VerdictMap:
    """``KEY vmap { k : verdict, ... }``: the verdict of the element that holds the key; no element
    ends the rule (the kernel's NFT_BREAK), as a false match does."""

    selectors: tuple[Selector, ...]
    elements: tuple[tuple[ElementKey, Verdict], ...]
    text: str


@dataclass(frozen=True, slots=True)
class NatTarget:
    """A NAT map's data: an address range, and a port range (None keeps the port)."""

    addr: tuple[IPAddress, IPAddress]
    ports: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        lo, hi = self.addr
        if lo.version != hi.version or int(lo) > int(hi):
            raise ValueError(f"NatTarget: bad address range {lo}-{hi}")


@dataclass(frozen=True, slots=True)
class NatMapStatement:
    """``snat|dnat [ip|ip6] [prefix] to KEY map { k : addr[ . port], ... }``.

    The element that holds the key gives the binding; no element ends the rule
    unNATed (NFT_BREAK). With a NUMGEN or HASH key every element the key's
    range reaches is a possible binding. ``netmap`` (``prefix``, NPTv6-style)
    keeps the original address's bits that differ across the target range.
    """

    kind: NatKind
    text: str
    family: int | None
    selectors: tuple[Selector, ...]
    elements: tuple[tuple[ElementKey, NatTarget], ...]
    flags: tuple[str, ...] = ()
    netmap: bool = False


NftStatement = VerdictMap | NatMapStatement
Statement = (Verdict | NatStatement | Passive | UnknownStatement | MarkSet | MarkCopy | NetmapStatement
             | NftStatement)
Expression = Match | UnknownMatch | XtMatch | ConcatMatch | Statement


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule: its expressions in kernel order, its handle, comment and nft text."""

    handle: int
    exprs: tuple[Expression, ...]
    text: str = ""
    comment: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.exprs, tuple):
            object.__setattr__(self, "exprs", tuple(self.exprs))
        if not self.text:
            object.__setattr__(self, "text", " ".join(e.text for e in self.exprs))

    @property
    def matches(self) -> tuple[Match | UnknownMatch, ...]:
        return tuple(e for e in self.exprs if isinstance(e, Match | UnknownMatch))

    @property
    def statements(self) -> tuple[Statement, ...]:
        return tuple(e for e in self.exprs if not isinstance(e, Match | UnknownMatch | XtMatch | ConcatMatch))

    @property
    def verdict(self) -> Verdict | None:
        for e in self.exprs:
            if isinstance(e, Verdict):
                return e
        return None

    def unknown_expressions(self) -> tuple[str, ...]:
        return tuple(e.expression for e in self.exprs if isinstance(e, UnknownMatch | UnknownStatement))


@dataclass(frozen=True, slots=True)
class Chain:
    """A chain. Base chains have ``hook``, ``priority``, ``type`` and ``policy``; regular ones None."""

    family: str
    table: str
    name: str
    rules: tuple[Rule, ...] = ()
    hook: Hook | None = None
    priority: int | None = None
    type: str | None = None
    policy: str | None = None
    handle: int = 0

    def __post_init__(self) -> None:
        if self.family not in FAMILY_AFS:
            raise ValueError(f"Chain.family must be one of {sorted(FAMILY_AFS)}, got {self.family!r}")
        if not isinstance(self.rules, tuple):
            object.__setattr__(self, "rules", tuple(self.rules))
        if self.hook is not None and self.priority is None:
            raise ValueError(f"base chain {self.name} needs a priority")
        if self.policy not in (None, "accept", "drop"):
            raise ValueError(f"Chain.policy must be accept or drop, got {self.policy!r}")

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.family, self.table, self.name)

    @property
    def is_base(self) -> bool:
        return self.hook is not None

    def applies_to(self, family: int) -> bool:
        return family in FAMILY_AFS[self.family]

    def describe(self) -> str:
        return f"table {self.family} {self.table} chain {self.name}"


@dataclass(frozen=True, slots=True)
class NatRuleset:
    """The nat base chains (in dump order) and the regular chains they reach.

    Equal rulesets behave the same; ``describe_rule`` names a rule for reasons.
    ``rpfilter`` holds the address families (AF_INET, AF_INET6) where a
    netfilter reverse-path drop (``fib saddr . iif oif missing drop``,
    ``-m rpfilter --invert -j DROP``) sees every packet at prerouting: it
    pins a forwarded flow's input interface as strict ``rp_filter`` does.
    """

    chains: tuple[Chain, ...] = ()
    rpfilter: frozenset[int] = frozenset()
    # True when ``chains`` hold every base chain that may set a packet or conntrack mark (a reader
    # that saw the whole ruleset): a fresh flow's marks are then 0 until those chains set them.
    # False (built by hand, or a table was not read): a mark the entry does not show is unknown.
    marks_known: bool = False
    # Families whose prerouting drops on an iptables ``rpfilter`` match whose options (--invert,
    # --loose, --validmark) the nft dump does not show: the iptables reader confirms them into
    # ``rpfilter`` from iptables-save, or leaves them out.
    xt_rpfilter: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if not isinstance(self.chains, tuple):
            object.__setattr__(self, "chains", tuple(self.chains))
        keys = [c.key for c in self.chains]
        if len(set(keys)) != len(keys):
            raise ValueError("NatRuleset: duplicate chain")

    def chain(self, family: str, table: str, name: str) -> Chain | None:
        for c in self.chains:
            if c.key == (family, table, name):
                return c
        return None

    def base_chains(self, hook: Hook, family: int) -> tuple[Chain, ...]:
        """The nat chains at ``hook`` that see packets of ``family``, lower priority first.

        Equal priorities keep dump order, which need not be the order the
        kernel runs them in (registration order, which no dump shows): the
        evaluator follows every order of such chains.
        """
        found = [
            (c.priority or 0, i, c)
            for i, c in enumerate(self.chains)
            if c.hook is hook and c.type == "nat" and c.applies_to(family)
        ]
        return tuple(c for _, _, c in sorted(found, key=lambda t: (t[0], t[1])))

    def mark_chains(self, hook: Hook, family: int) -> tuple[Chain, ...]:
        """The other base chains (filter, route) at ``hook`` for ``family`` that may set a mark, by priority.

        A reader keeps only base chains that reach a mark statement; their
        priority against the nat chains says which marks the NAT matches and
        the routing decision see.
        """
        found = [
            (c.priority or 0, i, c)
            for i, c in enumerate(self.chains)
            if c.hook is hook and c.type != "nat" and c.applies_to(family)
        ]
        return tuple(c for _, _, c in sorted(found, key=lambda t: (t[0], t[1])))

    @staticmethod
    def describe_rule(chain: Chain, rule: Rule) -> str:
        """'table inet nat chain postrouting handle 7: oifname "up1" masquerade'."""
        return f"{chain.describe()} handle {rule.handle}: {rule.text}"

    def unknown_expressions(self) -> frozenset[str]:
        """The names of every unmodelled expression in the ruleset."""
        return frozenset(name for c in self.chains for r in c.rules for name in r.unknown_expressions())

    def describe(self) -> str:
        """The ruleset in (approximately) nft syntax, for logs and debugging."""
        lines: list[str] = []
        for c in self.chains:
            head = c.describe()
            if c.hook is not None:
                head += f" {{ type {c.type} hook {c.hook.value} priority {c.priority}; policy {c.policy}; }}"
            lines.append(head)
            lines.extend(f"  {r.text} # handle {r.handle}" for r in c.rules)
        return "\n".join(lines)


# -- The readers' constructors ---------------------------------------------------
# The dataclass constructors above check and normalise: a few microseconds each, paid several
# times per rule of a 50k-rule read (``bench/parse.py``). These build the very same values
# without them, for the shapes that need neither: each checks what its class's
# ``__post_init__`` would (cheaply, for those shapes) and hands anything else to the class, so
# what it returns is always what the class would have built, or the class's own error.
#
# How: a frozen class refuses attribute assignment, and its slot descriptors' ``__set__`` is a
# call each. Each class has a layout twin here, a plain class with the very same slots: its
# instance is filled by ordinary (fast) slot stores and then becomes an instance of the frozen
# class by ``__class__`` assignment, which Python allows exactly between classes of the same
# layout (checked once, at import). A reader on a hot path may do the same inline
# (``edges.iptables``), under the same rule: only shapes the class would take unchanged.


def layout_twin(cls: type, names: tuple[str, ...]) -> type:
    """A plain slotted class laid out as ``cls``, whose fields must be exactly ``names`` (else ImportError).

    Fill every slot of ``object.__new__(twin)``, then set its ``__class__`` to ``cls``: the value
    ``cls`` would build, without a descriptor call per field. ``cls`` must be a frozen slots
    dataclass without ``__post_init__`` where the twin builds its values (the readers here only
    for shapes that need none; ``core.evaluate``'s packets).
    """
    where = f"{cls.__module__}.{cls.__name__}"
    actual = tuple(f.name for f in fields(cls))
    if actual != names:
        raise ImportError(f"{where}: fields {actual} != {names} (its layout twin's)")
    made = type(f"{cls.__name__}Twin", (), {"__slots__": names, "__module__": cls.__module__})
    probe: Any = object.__new__(made)
    try:
        probe.__class__ = cls
    except TypeError as exc:  # another layout (a base class, a __weakref__ slot, another order)
        raise ImportError(f"{where}: not laid out as its twin: {exc}") from exc
    return made



_new = object.__new__
RuleTwin: Any = layout_twin(Rule, ("handle", "exprs", "text", "comment"))
MatchTwin: Any = layout_twin(Match, ("selector", "op", "values", "text"))
SelectorTwin: Any = layout_twin(
    Selector, ("key", "text", "family", "proto", "mask", "direction", "spnum", "params")
)
IntervalsTwin: Any = layout_twin(IntervalSet, ("intervals", "version"))
_NamesTwin: Any = layout_twin(NameSet, ("exact", "prefixes", "indexes"))
NatTwin: Any = layout_twin(NatStatement, ("kind", "text", "family", "addr", "ports", "flags"))
_SNAT, _DNAT = NatKind.SNAT, NatKind.DNAT  # an Enum member read through its class is a lookup each time


def make_rule(handle: int, exprs: tuple[Expression, ...], text: str = "", comment: str | None = None) -> Rule:
    """``Rule(handle, exprs, text, comment)``; an empty ``text`` is the expressions' texts, as there."""
    if type(exprs) is not tuple:
        return Rule(handle, exprs, text, comment)
    if not text:
        text = " ".join([e.text for e in exprs])
    rule = _new(RuleTwin)
    rule.handle = handle
    rule.exprs = exprs
    rule.text = text
    rule.comment = comment
    rule.__class__ = Rule
    return rule  # type: ignore[no-any-return]


def make_match(selector: Selector, op: Op, values: IntervalSet | NameSet, text: str) -> Match:
    """``Match(selector, op, values, text)``."""
    if (selector.key in _INTERFACE_KEYS) != (type(values) is NameSet):
        return Match(selector, op, values, text)  # the class says why not
    match = _new(MatchTwin)
    match.selector = selector
    match.op = op
    match.values = values
    match.text = text
    match.__class__ = Match
    return match  # type: ignore[no-any-return]


def make_selector(key: Key, text: str, family: int | None = None, proto: int | None = None) -> Selector:
    """``Selector(key, text, family, proto)`` (no mask, direction, spnum or params)."""
    selector = _new(SelectorTwin)
    selector.key = key
    selector.text = text
    selector.family = family
    selector.proto = proto
    selector.mask = None
    selector.direction = None
    selector.spnum = 0
    selector.params = ()
    selector.__class__ = Selector
    return selector  # type: ignore[no-any-return]


def make_interval(lo: int, hi: int, version: int | None = None) -> IntervalSet:
    """``IntervalSet(((lo, hi),), version)``: one interval."""
    if lo > hi:
        return IntervalSet(((lo, hi),), version)  # the class says why not
    values = _new(IntervalsTwin)
    values.intervals = ((lo, hi),)
    values.version = version
    values.__class__ = IntervalSet
    return values  # type: ignore[no-any-return]


_NO_NAMES: frozenset[str] = frozenset()
_NO_INDEXES: frozenset[int] = frozenset()


def make_names(exact: frozenset[str] = _NO_NAMES, prefixes: frozenset[str] = _NO_NAMES,
               indexes: frozenset[int] = _NO_INDEXES) -> NameSet:
    """``NameSet(exact, prefixes, indexes)``."""
    names = _new(_NamesTwin)
    names.exact = exact
    names.prefixes = prefixes
    names.indexes = indexes
    names.__class__ = NameSet
    return names  # type: ignore[no-any-return]


def make_nat(kind: NatKind, text: str, family: int | None, addr: tuple[IPAddress, IPAddress] | None,
             ports: tuple[int, int] | None) -> NatStatement:
    """``NatStatement(kind, text, family, addr, ports)`` (no flags).

    Taken here: SNAT/DNAT to one address (``lo is hi``), with or without a port range
    inside 0-65535; anything else goes through the class.
    """
    if (
        (kind is not _SNAT and kind is not _DNAT)
        or addr is None or addr[0] is not addr[1]
        or (ports is not None and not 0 <= ports[0] <= ports[1] <= 0xFFFF)
    ):
        return NatStatement(kind, text, family, addr, ports)
    nat = _new(NatTwin)
    nat.kind = kind
    nat.text = text
    nat.family = family
    nat.addr = addr
    nat.ports = ports
    nat.flags = ()
    nat.__class__ = NatStatement
    return nat  # type: ignore[no-any-return]
