# SPDX-License-Identifier: GPL-2.0-or-later
"""Decide which conntrack entries are stale: the heart of topowatch.

Theory of operation: an entry records the NAT its first packet got. For each
eligible entry we ask the evaluator which bindings the flow would get *now*
(topology T1, current ruleset) and compare them with the entry's actual
bindings, read from its tuples:

- prediction known, actual outside every predicted binding: **stale**;
- prediction known, actual admitted by one of them: healthy, left alone;
- prediction unknown (a rule or route we do not model): stale only if the
  flow's egress (route, oif, masquerade source) differs between T0 and T1,
  which needs the previous snapshot; otherwise **undecided**, never deleted;
- the flow would be dropped now: nothing to fix on that side.

A side whose NAT hook never ran (no ``*_NAT_DONE`` bit: the entry predates
every NAT chain of its family, and the kernel never NATs a confirmed entry
later) is a null binding, judged like any other (``Entry.actual_snat``).

Where the prediction has alternatives (the ways the flow may have come:
input interface, multipath path, chain order), the entry is stale only if
every way that lets the flow out refuses its bindings, and healthy only
where no way it may have come refuses them (the previous snapshot narrows
those ways; it never makes an entry stale): otherwise undecided (see
"several alternatives" below).

Entries sharing a flow are decided once. Every stale or undecided entry
carries a ``Reason`` (``core.reason``): a code and the fields it rests on,
rendered into the text a person reads. This module never performs I/O and never
deletes anything: it returns a ``FlushPlan``.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
import sys
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import TypeVar, overload

from topowatch.core.classify import Classifier
from topowatch.core.conntrack import ICMP_PROTOS, IPS_DST_NAT_DONE, IPS_SEEN_REPLY, IPS_SRC_NAT_DONE, Entry
from topowatch.core.eligibility import DEFAULT_ELIGIBILITY, Eligibility
from topowatch.core.evaluate import MAX_DNAT_ADDRESSES
from topowatch.core.fib import Fib
from topowatch.core.flow import NO_NAT, Binding, Egress, Flow, Ingress, NatKind, Prediction, Unknown
from topowatch.core.model import IPAddress
from topowatch.core.reason import EgressSet, Reason, ReasonCode, RuleLine, Way, rule_lines

__all__ = ["Decider", "Decision", "FlushPlan", "Reason", "ReasonCode", "decide"]

T = TypeVar("T")

Predictor = Callable[[Fib, Flow], Prediction]

# Prediction slots kept per flow key (no exact classifier) before they are all dropped: with
# a million distinct flows the memory stays bounded (classes need no such limit: their number
# follows the configuration, not the traffic).
FLOW_CACHE_LIMIT = 65_536


def unknown_code(prediction: Prediction, before: Prediction | None) -> ReasonCode | None:
    """The verdict on a side whose NAT cannot be predicted, the same for every entry of a flow:
    undecided without a previous snapshot or with an unknown egress, stale when the egress
    changed, else nothing (None: nothing says the entry went stale)."""
    if before is None:
        return ReasonCode.UNKNOWN_NAT
    if isinstance(before.egress, Unknown) or isinstance(prediction.egress, Unknown):
        return ReasonCode.UNKNOWN_NAT_UNKNOWN_EGRESS
    if _egress_key(before.egress) != _egress_key(prediction.egress):
        return ReasonCode.EGRESS_CHANGED_UNKNOWN_NAT
    return None


def _stale_code(side: str, actual: Binding, expected: Iterable[Binding]) -> ReasonCode:
    return _code_of(side, actual.kind is NatKind.NONE, _none_now(expected))


def _none_now(expected: Iterable[Binding]) -> bool:
    return all(b.kind is NatKind.NONE for b in expected)


def _code_of(side: str, null_binding: bool, none_now: bool) -> ReasonCode:
    """The code of a stale side: the entry carries no NAT there, or it would get none now, or other."""
    if null_binding:
        return ReasonCode.NULL_BINDING_NOW_NAT
    if none_now:
        return ReasonCode.NAT_NOW_NONE
    return ReasonCode.SNAT_CHANGED if side == "snat" else ReasonCode.DNAT_CHANGED


@dataclass(frozen=True, slots=True)
class Decision:
    """One entry's verdict and why (``Reason``): its side, bindings, code and text are the reason's."""

    entry: Entry
    why: Reason

    @property
    def side(self) -> str:
        return self.why.side

    @property
    def actual(self) -> Binding | None:
        return self.why.actual

    @property
    def expected(self) -> tuple[Binding, ...]:
        return self.why.expected

    @property
    def reason(self) -> str:
        """The text a person reads (``Reason.render``)."""
        return self.why.render()

    @property
    def code(self) -> str:
        return self.why.code.value


@dataclass(frozen=True, slots=True)
class FlushPlan:
    """What to delete and what could not be decided; a value, shown by plan, flush and logs alike."""

    examined: int
    eligible: int
    stale: Sequence[Decision] = ()  # a StaleDecisions when a compiled scan kept records
    undecided: Sequence[Decision] = ()
    distinct_flows: int = 0  # prediction slots: flow classes, or flow keys without classes
    notes: tuple[str, ...] = field(default=())
    predicted: int = 0  # predictions made (a class's, or a flow key's, each time its slot was empty)


@dataclass(frozen=True, slots=True)
class _Judgement:
    stale: bool
    undecided: bool
    why: Reason

    @property
    def side(self) -> str:
        return self.why.side


def _egress_key(egress: tuple[Egress, ...]) -> frozenset[tuple[object, ...]]:
    return frozenset((e.kind, e.oif, e.gateway, e.masquerade_source, e.xfrm) for e in egress)


def _reading(entry: Entry, side: str) -> tuple[Binding | None, IPAddress, IPAddress, int, int]:
    """One side of an entry: its actual binding, original and translated address and port.

    ICMP keeps its "port" (type and code, or the id) on both sides.
    """
    if side == "snat":
        actual = entry.actual_snat()
        original, translated = entry.orig.src, entry.reply.dst
        original_port, translated_port = entry.orig.sport, entry.reply.dport
    else:
        actual = entry.actual_dnat()
        original, translated = entry.orig.dst, entry.reply.src
        original_port, translated_port = entry.orig.dport, entry.reply.sport
    if entry.proto in ICMP_PROTOS:
        translated_port = original_port
    return actual, original, translated, original_port, translated_port


# What a stale side's reason takes from its prediction alone, by side (``_Compiled.texts``):
# the expected bindings, sorted, and the rule lines.
_Expected = tuple[tuple[Binding, ...], tuple[RuleLine, ...]]


def _side(
    entry: Entry,
    side: str,
    predicted: frozenset[Binding] | Unknown,
    prediction: Prediction,
    before: Prediction | None,
    *,
    texts: dict[str, _Expected] | None = None,
    ruleset_changed: bool = False,
) -> _Judgement | None:
    """Judge one side of an entry; ``texts`` caches what depends on the prediction alone.

    ``ruleset_changed``: the ruleset is not the one of the previous snapshot, so an
    unchanged egress does not say that an unpredictable NAT stayed the same.
    """
    actual, original, translated, original_port, translated_port = _reading(entry, side)
    if actual is None:
        return None  # no NAT hook ran, yet the tuples differ (made by hand): nothing to judge
    if isinstance(predicted, Unknown):
        code = unknown_code(prediction, before)
        if code is None and not ruleset_changed:
            return None  # egress unchanged, and the ruleset too: nothing says the entry went stale
        why = Reason(
            code or ReasonCode.UNKNOWN_NAT, side, actual, original, translated, egress=prediction.egress,
            egress_before=before.egress if before is not None else None, cause=predicted.reason,
            cause_rule=predicted.rule,
            ruleset_changed=code is None,
        )
        stale = code is ReasonCode.EGRESS_CHANGED_UNKNOWN_NAT
        return _Judgement(stale, not stale, why)
    if not predicted:
        return None  # the flow would be dropped now: nothing to re-NAT
    dnat_side = side == "dnat"
    if any(b.admits(original, translated, original_port, translated_port, dnat_side=dnat_side)
           for b in predicted):  # fmt: skip
        return None
    cached = texts.get(side) if texts is not None else None
    if cached is None:
        cached = (_sorted(predicted), rule_lines(prediction.explain, prediction.rules))
        if texts is not None:
            texts[side] = cached
    expected, rules = cached
    return _Judgement(True, False, Reason(
        _stale_code(side, actual, expected), side, actual, original, translated, expected,
        egress=prediction.egress, rules=rules,
    ))


def _own_routes(egress: EgressSet, dst: IPAddress, dnat: frozenset[Binding] | Unknown, fib: Fib) -> EgressSet:
    """A class's ``egress`` worded with the routes that carry one flow of it (``Fib.own_route``).

    The class's egress names the routes of its first flow; flows of the class meet
    routes that differ only by their prefix. Where the destination is kept by every
    DNAT binding the flow is routed to ``dst``; an address a binding sets is the same
    for the whole class, so an egress whose route carries one is kept as it is.
    """
    if isinstance(egress, Unknown) or not egress or isinstance(dnat, Unknown):
        return egress
    if all(b.addr_lo is not None for b in dnat):
        return egress  # routed to the bindings' addresses: the class's own
    fixed: list[IPAddress] = []
    for b in dnat:
        lo, hi = b.addr_lo, b.addr_hi
        if lo is not None and hi is not None and int(hi) - int(lo) < MAX_DNAT_ADDRESSES:  # routed one by one
            fixed.extend(type(lo)(v) for v in range(int(lo), int(hi) + 1))
    also = tuple(fixed)
    worded = tuple(dict.fromkeys(fib.own_route(e, dst, also=also) for e in egress))
    return egress if worded == egress else worded


def _own_words(why: Reason, dst: IPAddress, prediction: Prediction, before: Prediction | None, *,
               fib_now: Fib, fib_before: Fib | None) -> Reason:  # fmt: skip
    """``why`` of one flow of a class, its egresses worded with that flow's own routes (``_own_routes``)."""
    dnat = prediction.dnat
    egress = _own_routes(why.egress, dst, dnat, fib_now) if why.egress is not None else None
    egress_before = why.egress_before
    if egress_before is not None and before is not None and fib_before is not None:
        egress_before = _own_routes(egress_before, dst, before.dnat, fib_before)

    def way(w: Way) -> Way:
        worded = _own_routes(w.egress, dst, dnat, fib_now)
        return w if worded is w.egress else dataclasses.replace(w, egress=worded)

    keeps = tuple(way(w) for w in why.keeps)
    ways = tuple(way(w) for w in why.ways)
    if (egress, egress_before, keeps, ways) == (why.egress, why.egress_before, why.keeps, why.ways):
        return why
    return dataclasses.replace(why, egress=egress, egress_before=egress_before, keeps=keeps, ways=ways)


# --- several alternatives (``Prediction.alternatives``) ---------------------------------
#
# Where the flow may have entered on several interfaces (reverse-path filtering
# does not pin it) or may leave by several paths (a multipath route), and the
# answer depends on which, the prediction holds one alternative per input
# interface and path. The entry's flow took one of them, and which one is unknown:
#
# - every alternative gives it other bindings (on one side or the other), or drops
#   the flow (nothing to fix there): stale, wherever it came in and went out;
# - some alternative gives it its bindings now: it may be an entry made since the
#   change, that way, so it is never stale. It is healthy where every alternative
#   gives them, or where a previous snapshot says no old entry can have got them
#   then on an interface and path that refuses them now; otherwise undecided
#   (``UNKNOWN_INGRESS``). Without a previous snapshot nothing tells an old entry
#   from one made since: every refusing alternative is one it may have come (the
#   flow's real interface is not in the entry, and calling it healthy would be a
#   guess, wrong where it came the refusing way: a false negative). With one, the
#   consistent alternatives are those of the previous snapshot that gave it
#   its bindings (an unknown one counts as consistent). An old flow keeps its path
#   while its interface's paths stay the same (the multipath hash is the flow's);
#   where they changed it may take any of them now. An interface that did not
#   receive then, or drops the flow now, puts nothing at risk;
# - no alternative admits it and some are unknown: the union's per-side judgement.
#
# Narrowing by the previous snapshot never deletes: an entry made since the change
# cannot be told from an old one, so the entry's own binding can only keep an
# entry or leave it undecided.


def _side_admits(entry: Entry, side: str, predicted: frozenset[Binding] | Unknown) -> bool | None:
    """Does ``predicted`` leave the entry's ``side`` as it is? None: unknown.

    True where nothing is to be judged: no NAT hook ran yet the tuples
    differ, or the flow would be dropped (an empty set).
    """
    actual, original, translated, original_port, translated_port = _reading(entry, side)
    if actual is None:
        return True
    if isinstance(predicted, Unknown):
        return None
    if not predicted:
        return True
    dnat_side = side == "dnat"
    return any(b.admits(original, translated, original_port, translated_port, dnat_side=dnat_side)
               for b in predicted)  # fmt: skip


def _alternative(entry: Entry, alt: Prediction) -> bool | None:
    """Does ``alt`` give the entry its bindings on both sides? None: it may or may not."""
    dnat, snat = _side_admits(entry, "dnat", alt.dnat), _side_admits(entry, "snat", alt.snat)
    if dnat is False or snat is False:
        return False
    if dnat is None or snat is None:
        return None
    return True


def _dropped(alt: Prediction) -> bool:
    """True when ``alt`` never lets the flow out (no SNAT hook reached): nothing to fix there."""
    return not isinstance(alt.snat, Unknown) and not alt.snat


def _live(prediction: Prediction) -> list[Prediction]:
    """The alternatives that let the flow out (the ways with something to fix)."""
    return [a for a in prediction.alternatives if not _dropped(a)]


def _ingress_key(p: Prediction) -> str | None:
    """The alternative's input interface (None: any of the candidates)."""
    ingress = p.ingress
    if isinstance(ingress, Ingress):
        return "the host itself" if ingress.local else ingress.ifname
    return None


def _path(p: Prediction) -> str:
    egress = p.egress
    return "?" if isinstance(egress, Unknown) else " or ".join(e.describe() for e in egress)


# Per input interface (None: any) of the previous snapshot: the paths that gave the entry its
# bindings, and all its paths.
_Then = dict[str | None, tuple[frozenset[str], frozenset[str]]]


def _predates_nat(entry: Entry) -> bool:
    """A side untranslated and without its NAT_DONE bit: the entry was made before that hook had a
    nat chain (``Entry.actual_snat``), perhaps before the previous snapshot too, which then says
    nothing of the ways it may have come."""
    return any(
        not entry.status & done and _reading(entry, side)[0] == NO_NAT
        for side, done in (("dnat", IPS_DST_NAT_DONE), ("snat", IPS_SRC_NAT_DONE))
    )


def _consistent(entry: Entry, previous: Prediction) -> _Then:
    """What the previous snapshot says about the ways the entry may have got its bindings."""
    out: _Then = {}
    for alt in previous.alternatives or (previous,):
        key = _ingress_key(alt)
        gave, paths = out.get(key, (frozenset(), frozenset()))
        path = _path(alt)
        if not _dropped(alt) and _alternative(entry, alt) is not False:
            gave = gave | {path}
        out[key] = (gave, paths | {path})
    return out


def _then_of(then: _Then, key: str | None) -> tuple[frozenset[str], frozenset[str]] | None:
    """The previous snapshot's (consistent paths, paths) for interface ``key`` (None: not receiving)."""
    if key is None:  # any interface now: whatever any interface did then
        if not then:
            return None
        gave = frozenset().union(*(g for g, _ in then.values()))
        return gave, frozenset().union(*(p for _, p in then.values()))
    found = then.get(key)
    return found if found is not None else then.get(None)


def _at_risk(alt: Prediction, then: _Then, paths_now: dict[str | None, frozenset[str]]) -> bool:
    """Could an old entry that got its bindings then have come this way now?"""
    key = _ingress_key(alt)
    found = _then_of(then, key)
    if found is None:
        return False  # the interface did not receive then
    gave, paths = found
    if not gave:
        return False
    return _path(alt) in gave or paths_now.get(key, frozenset()) != paths


def _refused(entry: Entry, alt: Prediction) -> str:
    """The first side ``alt`` does not give the entry ("dnat" first; "snat" if none is refused)."""
    return "dnat" if _side_admits(entry, "dnat", alt.dnat) is False else "snat"


def _sorted(bindings: Iterable[Binding]) -> tuple[Binding, ...]:
    return tuple(sorted(bindings, key=lambda b: (b.kind.value, str(b.addr_lo), b.port_lo or 0)))


def _way(alt: Prediction, entry: Entry | None = None) -> Way:
    """``alt`` as a reason names it; with ``entry``, the first side it refuses and what it gives there."""
    ingress = alt.ingress if isinstance(alt.ingress, Ingress) else None
    if entry is None:
        return Way(ingress, alt.egress)
    side = _refused(entry, alt)
    gives = alt.dnat if side == "dnat" else alt.snat
    return Way(ingress, alt.egress, side, gives if isinstance(gives, Unknown) else _sorted(gives))


def _joint_stale(entry: Entry, compiled: _Compiled, live: list[Prediction]) -> _Judgement:
    """The verdict on an entry that no alternative gives its bindings (see above)."""
    prediction = compiled.prediction
    for side in ("dnat", "snat"):
        union = prediction.dnat if side == "dnat" else prediction.snat
        if _side_admits(entry, side, union) is False:  # no alternative gives this side: the usual reason
            judged = _side(entry, side, union, prediction, None, texts=compiled.texts)
            assert judged is not None and judged.stale
            return judged
    refused = [_refused(entry, a) for a in live]
    side = "dnat" if refused.count("dnat") >= refused.count("snat") else "snat"
    actual, original, translated, _, _ = _reading(entry, side)
    assert actual is not None
    expected = _sorted(_live_bindings(live, side))
    return _Judgement(True, False, Reason(
        _stale_code(side, actual, expected), side, actual, original, translated, expected,
        ways=tuple(_way(a, entry) for a in live),
    ))


def _live_bindings(live: list[Prediction], side: str) -> frozenset[Binding]:
    """The bindings the live alternatives give ``side`` (unknown ones give none)."""
    known = [a.dnat if side == "dnat" else a.snat for a in live]
    return frozenset(b for k in known if not isinstance(k, Unknown) for b in k)


def _joint_expected(prediction: Prediction, side: int) -> frozenset[Binding]:
    """The expected bindings of a stale record of a prediction with alternatives, by its side byte."""
    name = "snat" if side & 1 else "dnat"
    if side & _JOINT:
        return _live_bindings(_live(prediction), name)
    union = prediction.snat if side & 1 else prediction.dnat
    assert not isinstance(union, Unknown)  # the union refused the side: it is known
    return union


def _undecided_alternatives(entry: Entry, keep: list[Prediction], risk: list[Prediction],
                            history: str = "snapshot") -> _Judgement:  # fmt: skip
    side = _refused(entry, risk[0])
    actual, original, translated, _, _ = _reading(entry, side)
    return _Judgement(False, True, Reason(
        ReasonCode.UNKNOWN_INGRESS, side, actual, original, translated,
        keeps=tuple(_way(a) for a in keep), ways=tuple(_way(a, entry) for a in risk), history=history,
    ))


_ADDRESS_TYPES = (IPv4Address, IPv6Address, IPv4Network, IPv6Network)


def mentions_sport(value: object, _depth: int = 0) -> bool:
    """True if a ruleset or policy value could read the source port anywhere.

    Conservative by construction: it walks every field of the value and
    answers True for any field, enum or text that names a source port
    (``sport``, ``--sport``, ``--sports``). When it is False, entries that
    differ only in their source port get the same prediction.
    """
    if _depth > 64:
        return True
    if isinstance(value, str):
        return "sport" in value
    if isinstance(value, enum.Enum):
        return "sport" in str(value.value).lower() or "sport" in value.name.lower()
    if isinstance(value, (int, float, bool, bytes, *_ADDRESS_TYPES)) or value is None:
        return False
    if isinstance(value, dict):
        return any(
            mentions_sport(k, _depth + 1) or mentions_sport(v, _depth + 1) for k, v in value.items()
        )
    if isinstance(value, (tuple, list, frozenset, set)):
        return any(mentions_sport(v, _depth + 1) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if "sport" in f.name and item not in (None, 0, (), frozenset()):
                return True
            if mentions_sport(item, _depth + 1):
                return True
        return False
    # An object we cannot look into: assume the worst.
    return True


# How one side of a prediction admits an entry, precompiled: None when the side
# is unknown; () when the flow would be dropped; else (lo, hi, port_lo, port_hi,
# kept) per binding, lo/hi None for "address kept", kept True where the port must
# be the original one (a destination binding without a port range).
_Range = tuple[int | None, int | None, int | None, int | None, bool]
_Check = tuple[_Range, ...] | None


def _compile(side: frozenset[Binding] | Unknown, *, dnat_side: bool = False) -> _Check:
    if isinstance(side, Unknown):
        return None
    return tuple(
        (
            None if b.addr_lo is None else int(b.addr_lo),
            None if b.addr_hi is None else int(b.addr_hi),
            b.port_lo,
            b.port_hi,
            dnat_side and b.ports is None,
        )
        for b in side
    )


def _admitted(check: _Check, original: int, translated: int, original_port: int, port: int) -> bool:
    # The rule is core/admission.py's; tests/core/test_admission.py runs this over its cases.
    assert check is not None
    for lo, hi, port_lo, port_hi, kept in check:
        if lo is None or hi is None:
            if translated != original:
                continue
        elif not lo <= translated <= hi:
            continue
        if port_lo is not None and port_hi is not None:
            if not port_lo <= port <= port_hi:
                continue
        elif kept and port != original_port:
            continue
        return True
    return False


@dataclass(slots=True)
class _Compiled:
    prediction: Prediction
    dnat: _Check
    snat: _Check
    # What a stale side's reason takes from the prediction alone, by side (filled by ``_side``).
    texts: dict[str, _Expected] = field(default_factory=dict)
    # The judgement of a side whose actual binding is "no NAT", by side, where
    # it is the same for every entry of the flow key (see ``Decider._side``).
    unnated: dict[str, _Judgement | None] = field(default_factory=dict)

    # Sides whose check is known and has no port range (see ``Decider._side``).
    portless: frozenset[str] = frozenset()

    @classmethod
    def of(cls, prediction: Prediction, flow: Flow | None = None, *,
           previous: Prediction | None = None) -> _Compiled:  # fmt: skip
        """The checks of ``prediction``; with alternatives, see ``_alternative_checks`` (needs ``flow``)."""
        dnat, snat = _compile(prediction.dnat, dnat_side=True), _compile(prediction.snat)
        portless = frozenset(
            side
            for side, check in (("dnat", dnat), ("snat", snat))
            if check is not None and all(port_lo is None for _, _, port_lo, _, _ in check)
        )
        if prediction.alternatives:
            assert flow is not None
            dnat, snat = _alternative_checks(prediction, flow, previous=previous)
        return cls(prediction, dnat, snat, portless=portless)


def _span(b: Binding, original: IPAddress, original_port: int, dnat_side: bool) -> tuple[int, int, int, int]:
    """The (address, port) box of what ``b`` admits on a side with this original address and port."""
    lo, hi = b.translated(original)
    if b.port_lo is not None and b.port_hi is not None:
        ports = (b.port_lo, b.port_hi)
    elif dnat_side:
        ports = (original_port, original_port)
    else:
        ports = (0, 0xFFFF)
    return int(lo), int(hi), ports[0], ports[1]


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1] and a[2] <= b[3] and b[2] <= a[3]


def _covers(big: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return big[0] <= b[0] and b[1] <= big[1] and big[2] <= b[2] and b[3] <= big[3]


def _meets(bindings: frozenset[Binding], box: tuple[int, int, int, int], original: IPAddress, port: int,
           dnat_side: bool) -> bool:  # fmt: skip
    return any(_overlap(_span(c, original, port, dnat_side), box) for c in bindings)


def _alternative_checks(prediction: Prediction, flow: Flow, *,
                        previous: Prediction | None) -> tuple[_Check, _Check]:  # fmt: skip
    """Checks that settle an entry of a prediction with alternatives only where it is healthy.

    Entries they do not settle are judged one by one (``Decider._judge_alternatives``),
    so they may admit less than the verdict would, never more. Alternatives that drop
    the flow count for nothing. One side (the one whose alternatives agree, else the
    destination) is checked against the bindings every alternative gives it: an entry
    passing it has that side right whichever way it came. The other side is then
    healthy for bindings every alternative gives too (no previous snapshot) or, with
    one, either gives too or could not have given then (the previous snapshot's
    bindings for that interface do not meet them, or it did not receive): an old
    entry that came that way cannot carry them. Bindings are read
    against the flow's own original address and port: flows of one class agree on
    how these meet.
    """
    live = _live(prediction)
    if not live:
        return (), ()
    known: dict[str, list[frozenset[Binding]]] = {}
    for side in ("dnat", "snat"):
        values = [a.dnat if side == "dnat" else a.snat for a in live]
        sets = [v for v in values if not isinstance(v, Unknown)]
        if len(sets) < len(values):
            return None, None
        known[side] = sets
    agree = [side for side in ("dnat", "snat") if len({v for v in known[side] if v}) <= 1]
    fixed = agree[0] if agree else "dnat"
    free = "snat" if fixed == "dnat" else "dnat"
    nonempty = [v for v in known[fixed] if v]
    fixed_check: _Check
    if not nonempty:
        fixed_check = ()
    else:
        common = frozenset.intersection(*nonempty)
        fixed_check = _compile(common, dnat_side=fixed == "dnat") if common else None
    sets = known[free]
    dnat_side = free == "dnat"
    free_check: _Check
    # (A live alternative's sets are never empty: an empty DNAT side means no SNAT side either.)
    original, port = (flow.dst, flow.dport) if dnat_side else (flow.src, flow.sport)
    then: dict[str | None, list[frozenset[Binding] | Unknown]] = {}
    for p in (previous.alternatives or (previous,)) if previous is not None else ():
        if not _dropped(p):
            then.setdefault(_ingress_key(p), []).append(p.dnat if dnat_side else p.snat)
    certain = []
    for b in frozenset().union(*sets):
        box = _span(b, original, port, dnat_side)
        for alt, now in zip(live, sets, strict=True):
            if any(_covers(_span(c, original, port, dnat_side), box) for c in now):
                continue  # this way gives the entry its binding too
            if previous is None or b.kind is NatKind.NONE:
                # An old entry may have come this way: nothing says otherwise (no NAT: an entry
                # made before the hook had a chain may be older than the previous snapshot).
                break
            key = _ingress_key(alt)
            before = [v for k, vs in then.items() if key is None or k is None or k == key for v in vs]
            if any(isinstance(v, Unknown) or not v or _meets(v, box, original, port, dnat_side)
                   for v in before):  # fmt: skip
                break  # an old entry that came this way may carry this binding
        else:
            certain.append(b)
    free_check = _compile(frozenset(certain), dnat_side=dnat_side) if certain else None
    return (fixed_check, free_check) if fixed == "dnat" else (free_check, fixed_check)


def _healthy(entry: Entry, compiled: _Compiled) -> bool:
    """True when the entry is certainly left alone: every side known and admitted.

    A side whose NAT hook never ran is read from its tuples like any other
    (kept tuples: a null binding; see ``Entry.actual_snat``).
    """
    orig, reply = entry.orig, entry.reply
    check = compiled.dnat
    if check is None:
        return False
    if check:
        port = orig.dport if entry.proto in ICMP_PROTOS else reply.sport
        if reply.src.version != orig.dst.version or not _admitted(
            check, int(orig.dst), int(reply.src), orig.dport, port
        ):
            return False
    check = compiled.snat
    if check is None:
        return False
    if check:
        port = orig.sport if entry.proto in ICMP_PROTOS else reply.dport
        if reply.dst.version != orig.src.version or not _admitted(
            check, int(orig.src), int(reply.dst), orig.sport, port
        ):
            return False
    return True


# --- raw entries: the bulk path ------------------------------------------------------
#
# A dump edge may hand entries over as plain tuples instead of ``Entry``
# values (building a million frozen objects costs more than judging them).
# A raw entry is, in this order: family, proto, orig src, orig dst, orig
# sport, orig dport, reply src, reply dst, reply sport, reply dport, status,
# zone, mark, id, timeout; addresses are packed bytes (4 or 16, both tuples
# of the family), ports and ICMP fields follow ``CtTuple``'s convention.
# ``Decider.add_raw`` judges a raw entry from a cache keyed by its flow key
# (packed) and its SEEN_REPLY bit: the first entry of a key is built into an
# ``Entry`` and goes through eligibility and the predictor like any other;
# later ones of the same key are judged healthy on the raw values by the same
# precompiled checks as ``_healthy``, and anything not certainly healthy is
# built and judged by the reasoned path. Sound because ``Eligibility.admits``
# reads only family, proto, status SEEN_REPLY, zone, mark and the orig
# addresses (a test pins its fields), and a prediction only the flow's
# fields (its sport only when ``sport_matters``, then part of the key).

RawEntry = tuple[int, int, bytes, bytes, int, int, bytes, bytes, int, int, int, int, int, int, int]
EntryBuilder = Callable[[RawEntry], Entry]

# Raw-cache value of an entry that the eligibility refuses.
_REFUSED: tuple[_Check, _Check] = (None, None)
# Raw-cache value of a class left alone (outside ``Decider.only``): every side "no binding", healthy.
_LEFT: tuple[_Check, _Check] = ((), ())


def _admitted_raw(check: _Check, original: bytes, translated: bytes, original_port: int, port: int) -> bool:
    """``_admitted`` over packed addresses (converted only where a range needs it)."""
    assert check is not None
    value = -1
    for lo, hi, port_lo, port_hi, kept in check:
        if lo is None or hi is None:
            if translated != original:
                continue
        else:
            if value < 0:
                value = int.from_bytes(translated, "big")
            if not lo <= value <= hi:
                continue
        if port_lo is not None and port_hi is not None:
            if not port_lo <= port <= port_hi:
                continue
        elif kept and port != original_port:
            continue
        return True
    return False


# A raw key's checks as bytes, for a compiled scan (``edges/_ctscan.c``) to settle
# entries of known keys without calling back: b"R" for a key the eligibility refuses;
# else b"P", then the DNAT side, then the SNAT side, each a mode byte (0 unknown: always
# judged; 1 no binding: never judged; 2 bindings, whether the side's NAT ran or not), and for mode 2
# a count byte and per binding 37 bytes: flags (1 address range, 2 port range, 4 the
# port must be the original one), lo and
# hi as 16-byte big-endian integers, port lo and hi as 2-byte big-endian integers.
# Exactly the checks of ``Decider.add_raw``; None where a value does not fit (the key
# then always goes through ``add_raw``).
PROGRAM_REFUSED = b"R"
# Mode 3 (a class's side that cannot be predicted, with a slot only): one more byte, the side's
# verdict for every entry of the class whose binding can be read: 0 nothing, 1 stale (its
# egress changed), 2 undecided.
_OUTCOMES: dict[ReasonCode | None, int] = {
    None: 0, ReasonCode.EGRESS_CHANGED_UNKNOWN_NAT: 1, ReasonCode.UNKNOWN_NAT: 2,
    ReasonCode.UNKNOWN_NAT_UNKNOWN_EGRESS: 2,
}
PROGRAM_RANGE_BYTES = 37


def _program_side(check: _Check) -> bytes | None:
    if check is None:
        return b"\x00"
    if not check:
        return b"\x01"
    if len(check) > 255:
        return None
    out = bytearray(b"\x02")
    out.append(len(check))
    for lo, hi, port_lo, port_hi, kept in check:
        flags = 4 if kept else 0
        lo_b = hi_b = bytes(16)
        if lo is not None and hi is not None:
            if not (0 <= lo < 1 << 128 and 0 <= hi < 1 << 128):
                return None
            flags |= 1
            lo_b, hi_b = lo.to_bytes(16, "big"), hi.to_bytes(16, "big")
        ports = bytes(4)
        if port_lo is not None and port_hi is not None:
            if not (0 <= port_lo <= 0xFFFF and 0 <= port_hi <= 0xFFFF):
                return None
            flags |= 2
            ports = port_lo.to_bytes(2, "big") + port_hi.to_bytes(2, "big")
        out += bytes((flags,)) + lo_b + hi_b + ports
    return bytes(out)


def _alternatives_block(prediction: Prediction) -> bytes | None:
    """The block that settles an entry of a prediction with alternatives that every live way refuses.

    b"A", the union's DNAT and SNAT sides (``_joint_stale`` names the side they refuse), a count
    byte and each live alternative's DNAT and SNAT sides (modes 0-2; an unknown side refuses
    nothing). The compiled scan records the entry stale when each alternative refuses it a side
    whose binding can be read (``_alternative`` is False for all of them); a record's side is 0 or
    1 where the union refuses that side, else 2 or 3 (``_JOINT``) for the side most of them refuse
    first. None where a value does not fit: the entries go to Python.
    """
    live = _live(prediction)
    if len(live) > 255:
        return None
    out = bytearray(b"A")
    for i, p in enumerate((prediction, *live)):
        if i == 1:
            out.append(len(live))
        for side in (_program_side(_compile(p.dnat, dnat_side=True)), _program_side(_compile(p.snat))):
            if side is None:
                return None
            out += side
    return bytes(out)


# A stale record's side byte where no single side is refused by a prediction's union of
# alternatives (``_joint_stale``'s second case): side | _JOINT.
_JOINT = 2


def compile_program(dnat: _Check, snat: _Check) -> bytes | None:
    """The program of one raw key's checks (see above), or None when one does not fit."""
    d, s = _program_side(dnat), _program_side(snat)
    if d is None or s is None:
        return None
    return b"P" + d + s


# --- stale records: the bulk path's stale entries ----------------------------------
#
# A compiled scan that finds an entry stale by a class's program (both sides of the
# prediction known: see ``_ctscan.c`` ``verdict``) does not call back: it appends the
# entry to ``Decider.records`` as one record of this layout (native byte order; the C
# ``record_t``): family, proto, side (0 DNAT, 1 SNAT; or'ed with ``_JOINT``: see
# ``_alternatives_block``), zone, status, mark, id, timeout, the program's slot
# (``Decider`` keeps what the slot stands for), orig sport and dport, reply sport
# and dport, orig src and dst, reply src and dst (16 bytes each, an IPv4 address in
# the first 4). The Decision of a record is built only when someone reads it (logs,
# plan output), by the same ``_side`` as every other (``_joint_stale`` for a
# prediction with alternatives); a delete reads the record itself (``edges.ctnetlink``).
STALE_RECORD = struct.Struct("=BBBxHxxIIIIIHHHH16s16s16s16s")


def record_raw(record: bytes | bytearray | memoryview, index: int) -> tuple[RawEntry, int, int]:
    """(raw entry, side byte: 0 DNAT / 1 SNAT, | ``_JOINT``; slot) of the record at ``index``."""
    (family, proto, side, zone, status, mark, ct_id, timeout, slot, osport, odport, rsport, rdport,
     osrc, odst, rsrc, rdst) = STALE_RECORD.unpack_from(record, index * STALE_RECORD.size)  # fmt: skip
    n = 4 if family == 2 else 16
    raw: RawEntry = (family, proto, osrc[:n], odst[:n], osport, odport, rsrc[:n], rdst[:n], rsport, rdport,
                     status, zone, mark, ct_id, timeout)  # fmt: skip
    return raw, side, slot


def pack_record(entry: Entry, side: int = 1, slot: int = 0) -> bytes:
    """The record of ``entry`` (``record_raw``'s inverse; a compiled scan writes the same bytes)."""
    o, r = entry.orig, entry.reply
    return STALE_RECORD.pack(
        entry.family, entry.proto, side, entry.zone, entry.status, entry.mark, entry.id, entry.timeout, slot,
        o.sport, o.dport, r.sport, r.dport, o.src.packed, o.dst.packed, r.src.packed, r.dst.packed,
    )  # fmt: skip


class _Lazy(Sequence[T]):
    """Values of which a head is built and the rest are records built when first read."""

    __slots__ = ("_all", "_build", "head", "records")

    def __init__(self, head: Sequence[T], records: bytes, build: Callable[[int], T]) -> None:
        self.head = tuple(head)
        self.records = records  # STALE_RECORD after STALE_RECORD
        self._build = build
        self._all: tuple[T, ...] | None = None

    @property
    def record_count(self) -> int:
        return len(self.records) // STALE_RECORD.size

    def __len__(self) -> int:
        return len(self.head) + self.record_count

    def _values(self) -> tuple[T, ...]:
        if self._all is None:
            self._all = self.head + tuple(self._build(i) for i in range(self.record_count))
        return self._all

    @overload
    def __getitem__(self, index: int) -> T: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[T]: ...
    def __getitem__(self, index: int | slice) -> T | Sequence[T]:
        return self._values()[index]

    def __iter__(self) -> Iterator[T]:
        return iter(self._values())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return self._values() == tuple(other)

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.head)} built, {self.record_count} as records)"


class StaleEntries(_Lazy[Entry]):
    """The entries of stale decisions: what a delete reads (``records`` without building them)."""

    __slots__ = ()

    def skipping(self, count: int) -> StaleEntries:
        """These entries without the first ``count`` records (handled already: deletes that
        overlapped the dump); the head stays."""
        build, size = self._build, STALE_RECORD.size

        def shifted(index: int) -> Entry:
            return build(index + count)

        return StaleEntries(self.head, self.records[count * size:], shifted)


class StaleDecisions(_Lazy[Decision]):
    """``FlushPlan.stale`` when a compiled scan kept stale entries as records (see above)."""

    __slots__ = ("_codes", "_codes_read", "_entry")

    def __init__(self, head: Sequence[Decision], records: bytes, build: Callable[[int], Decision],
                 entry: Callable[[int], Entry], codes: Callable[[], list[str]]) -> None:  # fmt: skip
        super().__init__(head, records, build)
        self._entry = entry
        self._codes = codes
        self._codes_read: list[str] | None = None

    def codes(self) -> list[str]:
        """Each decision's ``code``, in order, read from the records without building them (once:
        the summary, the JSON record and the metrics each ask)."""
        if self._codes_read is None:
            if self._all is not None:
                self._codes_read = [d.code for d in self._all]
            else:
                self._codes_read = [d.code for d in self.head] + self._codes()
        return list(self._codes_read)

    def at(self, index: int) -> Decision:
        """One decision, built alone (the others stay records)."""
        if self._all is not None:
            return self._all[index]
        if index < len(self.head):
            return self.head[index]
        return self._build(index - len(self.head))

    def protos(self) -> set[int]:
        """The protocols of the decisions' entries (a record's second byte)."""
        size = STALE_RECORD.size
        return {d.entry.proto for d in self.head} | set(self.records[1::size])

    def first(self, count: int) -> StaleDecisions:
        """The decisions of the first ``count`` records alone (those deletes overlapping the dump
        handled: ``StaleEntries.skipping``'s other part)."""
        codes = self._codes
        return StaleDecisions((), self.records[: count * STALE_RECORD.size], self._build, self._entry,
                              lambda: codes()[:count])

    def entries(self) -> StaleEntries:
        """The decisions' entries; the records stay records until read (also once the decisions
        were built: the delete reads records in C, and ``StaleEntries.skipping`` counts them)."""
        return StaleEntries([d.entry for d in self.head], self.records, self._entry)


class Decider:
    """``decide`` one entry at a time, so that a dump can be judged while it streams.

    ``add`` takes an ``Entry``; ``add_raw`` a raw entry (see above), which
    needs ``build``. Only stale and undecided entries are kept: ``plan()``
    returns the ``FlushPlan`` of everything added so far.
    """

    def __init__(
        self,
        *,
        predict: Predictor,
        fib_now: Fib,
        fib_before: Fib | None = None,
        eligibility: Eligibility = DEFAULT_ELIGIBILITY,
        sport_matters: bool = True,
        build: EntryBuilder | None = None,
        classifier: Classifier | None = None,
        only: frozenset[tuple[int, int]] | None = None,
        predict_before: Predictor | None = None,
    ) -> None:
        self.predict = predict
        # The evaluator bound to the previous snapshot's ruleset, which with ``fib_before`` says
        # which bindings a flow got then (``predict`` when None: the ruleset did not change).
        self.predict_before = predict_before
        # Flow classes (``core.classify``): predictions are kept per class, so the caches hold
        # one slot per class seen, whatever the traffic. Without an exact classifier they are
        # kept per flow key, and cleared when they pass ``FLOW_CACHE_LIMIT``.
        self.classifier = classifier if classifier is not None and classifier.exact else None
        # Judge only flows whose source or destination class is one of these (family, class);
        # the others are counted and left alone (their prediction cannot have changed).
        self.only = only if self.classifier is not None else None
        # The classifier's tables for a compiled scan, which then keys ``raw_cache`` by class.
        self.class_tables = self.classifier.packed() if self.classifier is not None else None
        self.fib_now = fib_now
        self.fib_before = fib_before
        self.eligibility = eligibility
        self.sport_matters = sport_matters
        self.build = build
        self.examined = 0
        self.eligible = 0
        self.predicted = 0
        # Phases its backend timed while feeding it (seconds by name: "kernel wait", "judge"),
        # for the reaction's record; empty where none were.
        self.timings: dict[str, float] = {}
        self.stale: list[Decision] = []
        self.undecided: list[Decision] = []
        self._now: dict[Hashable, _Compiled] = {}
        self._before: dict[Hashable, Prediction] = {}
        self._then: dict[Hashable, Prediction] = {}
        self._raw: dict[Hashable, tuple[_Check, _Check] | _Compiled] = {}
        # Programs by packed raw key, filled and read by a compiled scan (``raw_program``).
        self.raw_cache: dict[bytes, bytes | None] = {}
        # Stale entries a compiled scan settled as records (``STALE_RECORD``), with classes only:
        # a program then names its slot, and slots (one per class) stay for the records' lifetime.
        self.records: bytearray | None = bytearray() if self.classifier is not None else None
        self.undecided_records: bytearray | None = bytearray() if self.classifier is not None else None
        self._slots: list[Hashable] = []
        self._slot_of: dict[Hashable, int] = {}

    def _entry_key(self, entry: Entry) -> Hashable:
        classifier = self.classifier
        if classifier is not None:
            orig = entry.orig
            return classifier.key(
                entry.family, entry.proto, int(orig.src), int(orig.dst), orig.sport, orig.dport, entry.zone,
                entry.mark, entry.status & IPS_SEEN_REPLY,
            )
        return entry.flow_key() if not self.sport_matters else (entry.flow_key(), entry.orig.sport)

    def _compiled(self, entry: Entry) -> tuple[Hashable, _Compiled]:
        key = self._entry_key(entry)
        compiled = self._now.get(key)
        if compiled is None:
            if self.classifier is None and len(self._now) >= FLOW_CACHE_LIMIT:
                self._forget()
            prediction = self.predict(self.fib_now, entry.flow)
            previous = self._previous(key, entry) if prediction.alternatives else None
            compiled = _Compiled.of(prediction, entry.flow, previous=previous)
            self._now[key] = compiled
            self.predicted += 1
        return key, compiled

    def _forget(self) -> None:
        """Per-flow caches only: drop them all (they are rebuilt as flows come by)."""
        self._now.clear()
        self._before.clear()
        self._then.clear()
        self._raw.clear()
        self.raw_cache.clear()

    def _skipped(self, key: Hashable) -> bool:
        """True for a class outside ``only`` (``Classifier.key``: family at 0, src and dst at 5, 6)."""
        only = self.only
        if only is None:
            return False
        assert isinstance(key, tuple)
        family = key[0]
        return (family, key[5]) not in only and (family, key[6]) not in only

    def add(self, entry: Entry) -> None:
        self.examined += 1
        if not self.eligibility.admits(entry):
            return
        self.eligible += 1
        if self.only is not None and self._skipped(self._entry_key(entry)):
            return
        key, compiled = self._compiled(entry)
        if not _healthy(entry, compiled):
            self._judge(entry, key, compiled)

    def _raw_key(self, raw: RawEntry) -> Hashable:
        (family, proto, osrc, odst, osport, odport, _rsrc, _rdst, _rsport, _rdport,
         status, zone, mark, _id, _timeout) = raw  # fmt: skip
        classifier = self.classifier
        if classifier is not None:
            return classifier.key(
                family, proto, int.from_bytes(osrc, "big"), int.from_bytes(odst, "big"), osport, odport, zone,
                mark, status & IPS_SEEN_REPLY,
            )
        if self.sport_matters:
            return (zone, mark, proto, osrc, odst, odport, family, status & IPS_SEEN_REPLY, osport)
        return (zone, mark, proto, osrc, odst, odport, family, status & IPS_SEEN_REPLY)

    def raw_program(self, raw: RawEntry) -> bytes | None:
        """The program of the key of a raw entry already added (see ``compile_program``)."""
        key = self._raw_key(raw)
        slot = self._raw.get(key)
        if slot is None:
            return None
        if slot is _REFUSED:
            return PROGRAM_REFUSED
        if slot is _LEFT:
            return compile_program((), ())
        assert isinstance(slot, _Compiled)
        program = compile_program(slot.dnat, slot.snat)
        if program is None or self.records is None:
            return program
        if slot.prediction.alternatives:
            # The checks settle healthy entries only; the block settles entries that every way
            # refuses (``_alternatives_block``); the rest are judged one by one in Python.
            block = _alternatives_block(slot.prediction)
            if block is None:
                return program
            program += block
        elif slot.dnat is None or slot.snat is None:
            # A side that cannot be predicted has one verdict for the whole class (``unknown_code``):
            # mode 3 and that verdict, once the previous snapshot's prediction is known.
            if self.fib_before is not None and key not in self._before:
                return program
            code = unknown_code(slot.prediction, self._before.get(key))
            if code is None and self.predict_before is not None:
                code = ReasonCode.UNKNOWN_NAT  # the egress alone says nothing where the ruleset changed
            outcome = _OUTCOMES[code]
            dnat = _program_side(slot.dnat) if slot.dnat is not None else bytes((3, outcome))
            snat = _program_side(slot.snat) if slot.snat is not None else bytes((3, outcome))
            assert dnat is not None and snat is not None  # compile_program fitted them
            program = b"P" + dnat + snat
        index = self._slot_of.get(key)
        if index is None:
            index = self._slot_of[key] = len(self._slots)
            self._slots.append(key)
        return program + b"S" + index.to_bytes(4, sys.byteorder)

    def add_raw(self, raw: RawEntry) -> None:
        (family, proto, osrc, odst, osport, odport, rsrc, rdst, rsport, rdport,
         status, zone, mark, _id, _timeout) = raw  # fmt: skip
        classifier = self.classifier
        key: Hashable
        if classifier is not None:
            key = classifier.key(
                family, proto, int.from_bytes(osrc, "big"), int.from_bytes(odst, "big"), osport, odport, zone,
                mark, status & IPS_SEEN_REPLY,
            )
        elif self.sport_matters:
            key = (zone, mark, proto, osrc, odst, odport, family, status & IPS_SEEN_REPLY, osport)
        else:
            key = (zone, mark, proto, osrc, odst, odport, family, status & IPS_SEEN_REPLY)
        slot = self._raw.get(key)
        if slot is None:
            self._first_raw(raw, key)
            return
        self.examined += 1
        if slot is _REFUSED:
            return
        self.eligible += 1
        if slot is _LEFT:
            return
        assert isinstance(slot, _Compiled)
        check = slot.dnat
        if check is None or (
            check and not _admitted_raw(check, odst, rsrc, odport, odport if proto in ICMP_PROTOS else rsport)
        ):
            self._judge_raw(raw, key, slot)
            return
        check = slot.snat
        if check is None or (
            check and not _admitted_raw(check, osrc, rdst, osport, osport if proto in ICMP_PROTOS else rdport)
        ):
            self._judge_raw(raw, key, slot)

    def judge_raw(self, raw: RawEntry) -> None:
        """``add_raw`` for an entry of a known, admitted key whose checks already failed.

        A compiled scan calls it after running the key's program (the checks
        ``add_raw`` would run, see ``raw_program``); it goes straight to the
        reasoned judgement.
        """
        key = self._raw_key(raw)
        slot = self._raw[key]
        assert isinstance(slot, _Compiled)
        self.examined += 1
        self.eligible += 1
        self._judge_raw(raw, key, slot)

    def _first_raw(self, raw: RawEntry, raw_key: Hashable) -> None:
        if self.build is None:
            raise ValueError("Decider.add_raw needs an entry builder")
        entry = self.build(raw)
        self.examined += 1
        if not self.eligibility.admits(entry):
            self._raw[raw_key] = _REFUSED
            return
        self.eligible += 1
        if self.only is not None and self._skipped(raw_key):
            self._raw[raw_key] = _LEFT  # healthy by construction: its prediction did not change
            return
        key, compiled = self._compiled(entry)
        self._raw[raw_key] = compiled
        if not _healthy(entry, compiled):
            self._judge(entry, key, compiled)

    def _judge_raw(self, raw: RawEntry, key: Hashable, compiled: _Compiled) -> None:
        assert self.build is not None
        (_family, proto, osrc, odst, osport, odport, rsrc, rdst, rsport, rdport,
         _status, _zone, _mark, _id, _timeout) = raw  # fmt: skip
        # Whether each side kept address and port, read on the packed values (``_side``'s test).
        icmp = proto in ICMP_PROTOS
        kept = (rsrc == odst and (icmp or rsport == odport), rdst == osrc and (icmp or rdport == osport))
        # The raw key also keys ``before`` predictions: its shape (8 or 9 items) differs from
        # the flow key's (7, or 2 with the sport), so the two kinds never collide.
        self._judge(self.build(raw), key, compiled, kept)

    def _side(
        self,
        entry: Entry,
        side: str,
        compiled: _Compiled,
        before: Prediction | None,
        kept: bool | None = None,  # the side kept address and port (computed here when None)
    ) -> _Judgement | None:
        """``_side``, reused across the flow key where the entry's side carries no NAT.

        With no translation on that side (address and port kept; whether its NAT hook
        ran or not), the judgement reads the entry only through its original
        address, which is part of the flow key, and its port, which no
        binding without a port range looks at. So when the prediction is
        known and has no port range, one judgement serves every such entry.
        """
        prediction = compiled.prediction
        predicted = prediction.dnat if side == "dnat" else prediction.snat
        if side not in compiled.portless or self.classifier is not None:
            # With classes the entry's own address is not part of the key: no reuse across it.
            return _side(entry, side, predicted, prediction, before, texts=compiled.texts,
                         ruleset_changed=self.predict_before is not None)
        orig, reply = entry.orig, entry.reply
        if kept is None:
            if side == "dnat":
                kept = reply.src == orig.dst and (entry.proto in ICMP_PROTOS or reply.sport == orig.dport)
            else:
                kept = reply.dst == orig.src and (entry.proto in ICMP_PROTOS or reply.dport == orig.sport)
        if not kept:
            return _side(entry, side, predicted, prediction, before, texts=compiled.texts,
                         ruleset_changed=self.predict_before is not None)
        try:
            return compiled.unnated[side]
        except KeyError:
            judged = _side(entry, side, predicted, prediction, before, texts=compiled.texts,
                           ruleset_changed=self.predict_before is not None)
            compiled.unnated[side] = judged
            return judged

    def _before_now(self, key: Hashable, entry: Entry) -> Prediction:
        """The flow under the previous topology and the current ruleset (the egress comparison)."""
        assert self.fib_before is not None
        before = self._before.get(key)
        if before is None:
            before = self.predict(self.fib_before, entry.flow)
            self._before[key] = before
        return before

    def _previous(self, key: Hashable, entry: Entry) -> Prediction | None:
        """The flow under the previous snapshot, topology and ruleset (None: no previous snapshot)."""
        if self.fib_before is None:
            return None
        if self.predict_before is None:
            return self._before_now(key, entry)
        then = self._then.get(key)
        if then is None:
            then = self.predict_before(self.fib_before, entry.flow)
            self._then[key] = then
        return then

    def _judge_alternatives(self, entry: Entry, key: Hashable, compiled: _Compiled) -> bool:
        """Judge an entry that may have entered on several interfaces (see above ``_side_admits``).

        False when no alternative admits it and some are unknown: the caller judges the
        union, side by side.
        """
        live = _live(compiled.prediction)
        if not live:
            return True  # dropped whichever way it comes: nothing to fix
        verdicts = [_alternative(entry, a) for a in live]
        if all(v is False for v in verdicts):
            self._record(entry, _joint_stale(entry, compiled, live), compiled.prediction)
            return True
        if not any(v is True for v in verdicts):
            return False
        older = _predates_nat(entry)
        previous = None if older else self._previous(key, entry)
        if previous is None:
            # No previous snapshot (or one the entry may predate): an old entry cannot be told from
            # one made since, so every way that refuses its bindings now is one it may have come.
            risk = [a for a, v in zip(live, verdicts, strict=True) if v is not True]
        else:
            then = _consistent(entry, previous)
            paths_now: dict[str | None, frozenset[str]] = {}
            for a in compiled.prediction.alternatives:
                paths_now[_ingress_key(a)] = paths_now.get(_ingress_key(a), frozenset()) | {_path(a)}
            risk = [a for a, v in zip(live, verdicts, strict=True)
                    if v is not True and _at_risk(a, then, paths_now)]  # fmt: skip
        if risk:
            keep = [a for a, v in zip(live, verdicts, strict=True) if v is True]
            why = "none" if self.fib_before is None else "older" if older else "snapshot"
            self._record(entry, _undecided_alternatives(entry, keep, risk, why), compiled.prediction)
        return True

    def _record(self, entry: Entry, j: _Judgement, prediction: Prediction,
                before: Prediction | None = None) -> None:  # fmt: skip
        (self.stale if j.stale else self.undecided).append(self._decision(entry, j.why, prediction, before))

    def _decision(self, entry: Entry, why: Reason, prediction: Prediction,
                  before: Prediction | None) -> Decision:  # fmt: skip
        """The Decision of ``entry``; with classes, its reason names the entry's own routes."""
        if self.classifier is not None:
            why = _own_words(why, entry.orig.dst, prediction, before, fib_now=self.fib_now,
                             fib_before=self.fib_before)
        return Decision(entry, why)

    def _judge(
        self,
        entry: Entry,
        key: Hashable,
        compiled: _Compiled,
        kept: tuple[bool | None, bool | None] = (None, None),  # per side, as ``_side`` takes it
    ) -> None:
        prediction = compiled.prediction
        if prediction.alternatives and self._judge_alternatives(entry, key, compiled):
            return
        before: Prediction | None = None
        if self.fib_before is not None and (
            isinstance(prediction.dnat, Unknown) or isinstance(prediction.snat, Unknown)
        ):
            before = self._before_now(key, entry)
        # DNAT first: a stale destination already condemns the entry (SNAT is not looked at).
        dnat = self._side(entry, "dnat", compiled, before, kept[0])
        if dnat is not None and dnat.stale:
            self.stale.append(self._decision(entry, dnat.why, prediction, before))
            return
        snat = self._side(entry, "snat", compiled, before, kept[1])
        if snat is not None and snat.stale:
            self.stale.append(self._decision(entry, snat.why, prediction, before))
            return
        chosen = next((j for j in (dnat, snat) if j is not None and j.undecided), None)
        if chosen is not None:
            self.undecided.append(self._decision(entry, chosen.why, prediction, before))

    def _record_entry(self, records: bytes, index: int) -> Entry:
        assert self.build is not None
        return self.build(record_raw(records, index)[0])

    def _record_decision(self, records: bytes, index: int, *, stale: bool = True) -> Decision:
        """The Decision of a record: ``_side`` on its entry and its class's prediction, as any other."""
        assert self.build is not None
        raw, side, slot = record_raw(records, index)
        entry = self.build(raw)
        compiled = self._raw[self._slots[slot]]
        assert isinstance(compiled, _Compiled)
        name = "snat" if side & 1 else "dnat"
        prediction = compiled.prediction
        if prediction.alternatives:  # every way refuses it (``_alternatives_block``)
            live = _live(prediction)
            if stale and live and all(_alternative(entry, a) is False for a in live):
                joint = _joint_stale(entry, compiled, live)
                if joint.side == name:
                    return self._decision(entry, joint.why, prediction, None)
            return _disagreement(entry, name, stale)
        predicted = prediction.dnat if name == "dnat" else prediction.snat
        before = self._before.get(self._slots[slot]) if isinstance(predicted, Unknown) else None
        judged = _side(entry, name, predicted, prediction, before, texts=compiled.texts,
                       ruleset_changed=self.predict_before is not None)
        if judged is None or judged.stale != stale:  # never (test_ctscan compares both paths)
            return _disagreement(entry, name, stale)
        return self._decision(entry, judged.why, prediction, before)

    def _record_codes(self, records: bytes) -> list[str]:
        """The ``code`` of each record's Decision (``_stale_code``), without building it."""
        out: list[str] = []
        nat_now_none: dict[tuple[int, int], bool] = {}
        fixed_codes: dict[tuple[int, int], str | None] = {}  # "" absent; None: read from the binding
        for (_family, proto, side, _zone, _status, _mark, _id, _timeout, slot, osport, odport, rsport,
             rdport, osrc, odst, rsrc, rdst) in STALE_RECORD.iter_unpack(records):  # fmt: skip
            fixed = fixed_codes.get((slot, side), "")
            if fixed == "":
                compiled = self._raw[self._slots[slot]]
                assert isinstance(compiled, _Compiled)
                predicted = compiled.prediction.snat if side & 1 else compiled.prediction.dnat
                if compiled.prediction.alternatives:
                    fixed = None
                    nat_now_none[slot, side] = _none_now(_joint_expected(compiled.prediction, side))
                elif isinstance(predicted, Unknown):  # the class's verdict, whatever the binding
                    fixed = unknown_code(compiled.prediction, self._before.get(self._slots[slot]))
                    if fixed is None:  # recorded undecided: only where the ruleset changed (``raw_program``)
                        fixed = ReasonCode.UNKNOWN_NAT
                else:
                    fixed = None
                    nat_now_none[slot, side] = _none_now(predicted)
                fixed_codes[slot, side] = fixed
            if fixed is not None:
                out.append(fixed)
                continue
            # A side with address and port kept: a null binding (``Entry.actual_snat``; ICMP keeps
            # its "ports" by convention whatever the reply's type).
            icmp = proto in ICMP_PROTOS
            if side & 1:
                kept = rdst == osrc and (icmp or rdport == osport)
            else:
                kept = rsrc == odst and (icmp or rsport == odport)
            out.append(_code_of("snat" if side & 1 else "dnat", kept, nat_now_none[slot, side]))
        return out

    def plan(self) -> FlushPlan:
        stale: Sequence[Decision] = tuple(self.stale)
        if self.records:
            records = bytes(self.records)
            stale = StaleDecisions(self.stale, records, lambda i: self._record_decision(records, i),
                                   lambda i: self._record_entry(records, i),
                                   lambda: self._record_codes(records))
        undecided: Sequence[Decision] = tuple(self.undecided)
        if self.undecided_records:
            kept = bytes(self.undecided_records)
            undecided = StaleDecisions(self.undecided, kept,
                                       lambda i: self._record_decision(kept, i, stale=False),
                                       lambda i: self._record_entry(kept, i),
                                       lambda: self._record_codes(kept))
        return FlushPlan(
            examined=self.examined,
            eligible=self.eligible,
            stale=stale,
            undecided=undecided,
            distinct_flows=len(self._now),
            predicted=self.predicted,
        )


def _disagreement(entry: Entry, side: str, stale: bool) -> Decision:
    """A record the compiled scan judged (``stale`` or undecided) that the reference does not (a defect)."""
    verdict = "stale" if stale else "undecided"
    return Decision(entry, Reason(ReasonCode.INTERNAL_DISAGREEMENT, side, verdict=verdict))


def decide(
    entries: Iterable[Entry],
    *,
    predict: Predictor,
    fib_now: Fib,
    fib_before: Fib | None = None,
    eligibility: Eligibility = DEFAULT_ELIGIBILITY,
    sport_matters: bool = True,
    classifier: Classifier | None = None,
    only: frozenset[tuple[int, int]] | None = None,
    predict_before: Predictor | None = None,
) -> FlushPlan:
    """Judge every eligible entry; ``predict`` is the evaluator bound to the current ruleset.

    With ``sport_matters`` False (see ``mentions_sport``), entries sharing
    (zone, mark, proto, src, dst, dport) are predicted once. ``predict_before``
    is the evaluator bound to the previous snapshot's ruleset (see ``Decider``).
    """
    decider = Decider(
        predict=predict,
        fib_now=fib_now,
        fib_before=fib_before,
        eligibility=eligibility,
        sport_matters=sport_matters,
        classifier=classifier,
        only=only,
        predict_before=predict_before,
    )
    add = decider.add
    for entry in entries:
        add(entry)
    return decider.plan()
