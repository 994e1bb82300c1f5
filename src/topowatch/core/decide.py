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

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from topowatch.core.conntrack import ICMP_PROTOS, Entry
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


def decide(
    entries: Iterable[Entry],
    *,
    predict: Predictor,
    fib_now: Fib,
    fib_before: Fib | None = None,
    eligibility: Eligibility = DEFAULT_ELIGIBILITY,
) -> FlushPlan:
    """Judge every eligible entry; ``predict`` is the evaluator bound to the current ruleset."""
    examined = 0
    eligible = 0
    stale: list[Decision] = []
    undecided: list[Decision] = []
    now_cache: dict[Flow, Prediction] = {}
    before_cache: dict[Flow, Prediction] = {}
    for entry in entries:
        examined += 1
        if not eligibility.admits(entry):
            continue
        eligible += 1
        flow = entry.flow
        prediction = now_cache.get(flow)
        if prediction is None:
            prediction = predict(fib_now, flow)
            now_cache[flow] = prediction
        before: Prediction | None = None
        if fib_before is not None and (
            isinstance(prediction.dnat, Unknown) or isinstance(prediction.snat, Unknown)
        ):
            before = before_cache.get(flow)
            if before is None:
                before = predict(fib_before, flow)
                before_cache[flow] = before
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
