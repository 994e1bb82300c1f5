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
- the flow would be dropped now, or a NAT hook has not run on the entry:
  nothing to fix on that side.

Entries sharing a flow are decided once. Every stale or undecided entry
carries a reason a person can read. This module never performs I/O and never
deletes anything: it returns a ``FlushPlan``.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from topowatch.core.conntrack import ICMP_PROTOS, IPS_DST_NAT_DONE, IPS_SRC_NAT_DONE, Entry
from topowatch.core.eligibility import DEFAULT_ELIGIBILITY, Eligibility
from topowatch.core.fib import Fib
from topowatch.core.flow import Binding, Egress, Flow, Prediction, Unknown
from topowatch.core.model import IPAddress

Predictor = Callable[[Fib, Flow], Prediction]


@dataclass(frozen=True, slots=True)
class Decision:
    """One entry's verdict: which side (``snat``/``dnat``) and why."""

    entry: Entry
    side: str
    actual: Binding | None
    expected: tuple[Binding, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class FlushPlan:
    """What to delete and what could not be decided; a value, shown by plan, flush and logs alike."""

    examined: int
    eligible: int
    stale: tuple[Decision, ...] = ()
    undecided: tuple[Decision, ...] = ()
    distinct_flows: int = 0
    notes: tuple[str, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class _Judgement:
    side: str
    stale: bool
    undecided: bool
    actual: Binding | None
    expected: tuple[Binding, ...]
    reason: str


def _egress_text(egress: tuple[Egress, ...] | Unknown) -> str:
    if isinstance(egress, Unknown):
        return f"unknown ({egress.reason})"
    if not egress:
        return "none"
    return " or ".join(e.describe() for e in egress)


def _egress_key(egress: tuple[Egress, ...]) -> frozenset[tuple[object, ...]]:
    return frozenset((e.kind, e.oif, e.gateway, e.masquerade_source) for e in egress)


def _side(
    entry: Entry,
    side: str,
    predicted: frozenset[Binding] | Unknown,
    prediction: Prediction,
    before: Prediction | None,
) -> _Judgement | None:
    if side == "snat":
        actual = entry.actual_snat()
        original, translated = entry.orig.src, entry.reply.dst
        original_port, translated_port = entry.orig.sport, entry.reply.dport
        what = "source"
    else:
        actual = entry.actual_dnat()
        original, translated = entry.orig.dst, entry.reply.src
        original_port, translated_port = entry.orig.dport, entry.reply.sport
        what = "destination"
    if actual is None:
        return None  # that NAT hook has not run on this entry
    if entry.proto in ICMP_PROTOS:
        translated_port = original_port
    now = _egress_text(prediction.egress)
    if isinstance(predicted, Unknown):
        if before is None:
            return _Judgement(
                side, False, True, actual, (),
                f"{what} NAT cannot be predicted: {predicted.reason}",
            )
        if isinstance(before.egress, Unknown) or isinstance(prediction.egress, Unknown):
            return _Judgement(
                side, False, True, actual, (),
                f"{what} NAT cannot be predicted ({predicted.reason}) and the egress is unknown",
            )
        if _egress_key(before.egress) != _egress_key(prediction.egress):
            return _Judgement(
                side, True, False, actual, (),
                f"{what} NAT cannot be predicted ({predicted.reason}), but the flow's egress changed "
                f"from {_egress_text(before.egress)} to {now}",
            )
        return None  # egress unchanged: nothing says the entry went stale
    if not predicted:
        return None  # the flow would be dropped now: nothing to re-NAT
    if any(b.admits(original, translated, original_port, translated_port) for b in predicted):
        return None
    expected = tuple(sorted(predicted, key=lambda b: (b.kind.value, str(b.addr_lo), b.port_lo or 0)))
    rules = f"; by {'; '.join(prediction.explain)}" if prediction.explain else ""
    return _Judgement(
        side, True, False, actual, expected,
        f"{what} is {_translation(original, translated, actual)}, but now it would be "
        f"{' or '.join(b.describe() for b in expected)} (egress {now}{rules})",
    )


def _translation(original: IPAddress, translated: IPAddress, actual: Binding) -> str:
    if original == translated and actual.ports is None:
        return f"{original} (no NAT)"
    return f"{actual.describe()} ({original} -> {translated})"


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
# is unknown; () when the flow would be dropped; else (lo, hi, port_lo, port_hi)
# per binding, lo/hi None for "address kept".
_Check = tuple[tuple[int | None, int | None, int | None, int | None], ...] | None


def _compile(side: frozenset[Binding] | Unknown) -> _Check:
    if isinstance(side, Unknown):
        return None
    return tuple(
        (
            None if b.addr_lo is None else int(b.addr_lo),
            None if b.addr_hi is None else int(b.addr_hi),
            b.port_lo,
            b.port_hi,
        )
        for b in side
    )


def _admitted(check: _Check, original: int, translated: int, port: int) -> bool:
    assert check is not None
    for lo, hi, port_lo, port_hi in check:
        if lo is None or hi is None:
            if translated != original:
                continue
        elif not lo <= translated <= hi:
            continue
        if port_lo is not None and port_hi is not None and not port_lo <= port <= port_hi:
            continue
        return True
    return False


@dataclass(slots=True)
class _Compiled:
    prediction: Prediction
    dnat: _Check
    snat: _Check

    @classmethod
    def of(cls, prediction: Prediction) -> _Compiled:
        return cls(prediction, _compile(prediction.dnat), _compile(prediction.snat))


def _healthy(entry: Entry, compiled: _Compiled) -> bool:
    """True when the entry is certainly left alone: every side known, run, and admitted."""
    status = entry.status
    orig, reply = entry.orig, entry.reply
    if status & IPS_DST_NAT_DONE:
        check = compiled.dnat
        if check is None:
            return False
        if check:
            port = orig.dport if entry.proto in ICMP_PROTOS else reply.sport
            if reply.src.version != orig.dst.version or not _admitted(
                check, int(orig.dst), int(reply.src), port
            ):
                return False
    if status & IPS_SRC_NAT_DONE:
        check = compiled.snat
        if check is None:
            return False
        if check:
            port = orig.sport if entry.proto in ICMP_PROTOS else reply.dport
            if reply.dst.version != orig.src.version or not _admitted(
                check, int(orig.src), int(reply.dst), port
            ):
                return False
    return True


def decide(
    entries: Iterable[Entry],
    *,
    predict: Predictor,
    fib_now: Fib,
    fib_before: Fib | None = None,
    eligibility: Eligibility = DEFAULT_ELIGIBILITY,
    sport_matters: bool = True,
) -> FlushPlan:
    """Judge every eligible entry; ``predict`` is the evaluator bound to the current ruleset.

    With ``sport_matters`` False (see ``mentions_sport``), entries sharing
    (zone, mark, proto, src, dst, dport) are predicted once.
    """
    examined = 0
    eligible = 0
    stale: list[Decision] = []
    undecided: list[Decision] = []
    now_cache: dict[Hashable, _Compiled] = {}
    before_cache: dict[Hashable, Prediction] = {}
    admits = eligibility.admits
    for entry in entries:
        examined += 1
        if not admits(entry):
            continue
        eligible += 1
        key: Hashable = entry.flow_key() if not sport_matters else (entry.flow_key(), entry.orig.sport)
        compiled = now_cache.get(key)
        if compiled is None:
            compiled = _Compiled.of(predict(fib_now, entry.flow))
            now_cache[key] = compiled
        if _healthy(entry, compiled):
            continue
        prediction = compiled.prediction
        before: Prediction | None = None
        if fib_before is not None and (
            isinstance(prediction.dnat, Unknown) or isinstance(prediction.snat, Unknown)
        ):
            before = before_cache.get(key)
            if before is None:
                before = predict(fib_before, entry.flow)
                before_cache[key] = before
        judged = [
            j
            for j in (
                _side(entry, "dnat", prediction.dnat, prediction, before),
                # DNAT first: a stale destination already condemns the entry.
                _side(entry, "snat", prediction.snat, prediction, before),
            )
            if j is not None
        ]
        chosen = next((j for j in judged if j.stale), None)
        if chosen is not None:
            stale.append(Decision(entry, chosen.side, chosen.actual, chosen.expected, chosen.reason))
            continue
        chosen = next((j for j in judged if j.undecided), None)
        if chosen is not None:
            undecided.append(Decision(entry, chosen.side, chosen.actual, chosen.expected, chosen.reason))
    return FlushPlan(
        examined=examined,
        eligible=eligible,
        stale=tuple(stale),
        undecided=tuple(undecided),
        distinct_flows=len(now_cache),
    )
