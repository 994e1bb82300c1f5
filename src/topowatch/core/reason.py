# SPDX-License-Identifier: GPL-2.0-or-later
"""Why an entry is stale or undecided, as data: a reason code and the fields it rests on.

Theory of operation: ``core.decide`` judges a side of an entry and says why in a
``Reason``: its ``ReasonCode`` (a word a program counts), the side, the entry's
actual binding with its original and translated address, the bindings
predicted now, the egress now and before (route, gateway, device), the rule
lines that made the prediction (with their chain and handle where a rule made
them), the cause of an unpredictable NAT, and the ways (input interface, path)
the flow may have come where the prediction has alternatives. ``render`` makes
the text a person reads from those fields alone, so the text of ``plan``, of the
logs and of the JSON field ``reason`` is the same, and a program reads the
fields instead of parsing it.

Decides only how a reason is worded; never whether an entry is stale (that is
``core.decide``'s), and never performs I/O. A field left empty is not known or
does not apply to the code: it is never filled with a guess.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from topowatch.core.flow import Binding, Egress, Ingress, RuleRef, Unknown
from topowatch.core.model import IPAddress


class ReasonCode(enum.StrEnum):
    """Why an entry is stale or undecided, as a word a program can count (``Decision.code``)."""

    NULL_BINDING_NOW_NAT = "null_binding_now_nat"  # no NAT on that side, now it would be NATed
    NAT_NOW_NONE = "nat_now_none"  # NATed, now that side would not be
    SNAT_CHANGED = "snat_changed"  # source NATed to another address or port range now
    DNAT_CHANGED = "dnat_changed"  # destination NATed elsewhere now
    EGRESS_CHANGED_UNKNOWN_NAT = "egress_changed_unknown_nat"  # NAT unpredictable, egress moved
    UNKNOWN_NAT = "unknown_nat"  # undecided: NAT unpredictable, no previous snapshot to compare
    UNKNOWN_NAT_UNKNOWN_EGRESS = "unknown_nat_unknown_egress"  # undecided: egress unpredictable too
    UNKNOWN_INGRESS = "unknown_ingress"  # undecided: healthy on one input interface, stale on another
    # The compiled scan and the reference judgement disagree on a record (a defect; tests pin it never).
    INTERNAL_DISAGREEMENT = "internal_disagreement"


# The codes of a side whose NAT cannot be predicted (``Reason.cause`` says why).
UNKNOWN_CODES = frozenset({
    ReasonCode.EGRESS_CHANGED_UNKNOWN_NAT, ReasonCode.UNKNOWN_NAT, ReasonCode.UNKNOWN_NAT_UNKNOWN_EGRESS,
})
# The codes of a stale side whose bindings are predicted (``Reason.expected``).
CHANGED_CODES = frozenset({
    ReasonCode.NULL_BINDING_NOW_NAT, ReasonCode.NAT_NOW_NONE, ReasonCode.SNAT_CHANGED,
    ReasonCode.DNAT_CHANGED,
})
SIDES = {"snat": "source", "dnat": "destination"}
# ``Reason.history`` of an UNKNOWN_INGRESS: why an old entry may have come a way that refuses it now.
HISTORIES = {
    "snapshot": "it may be older and have got them where the previous state gave them",
    "none": "with no previous snapshot it may as well be older and have got them another way",
    "older": "made before its NAT hook had a chain it may be older than the previous snapshot, and have "
             "got them another way",
}
# Ways named in a reason at most (the others are counted).
WAYS_SHOWN = 4

EgressSet = tuple[Egress, ...] | Unknown


@dataclass(frozen=True, slots=True)
class RuleLine:
    """One line of how the prediction was made; ``rule`` where a rule bound or dropped there."""

    text: str
    rule: RuleRef | None = None


@dataclass(frozen=True, slots=True)
class Way:
    """One way the flow may have come in and gone out (an alternative of the prediction).

    ``ingress`` None: any of the candidate interfaces. ``side`` is the first side
    this way refuses the entry ("" for a way that keeps its bindings) and
    ``gives`` what it would give that side instead (empty: it drops the flow).
    """

    ingress: Ingress | None
    egress: EgressSet
    side: str = ""
    gives: tuple[Binding, ...] | Unknown = ()

    def __post_init__(self) -> None:
        if self.side not in ("", *SIDES):
            raise ValueError(f"Way.side must be snat, dnat or empty, got {self.side!r}")

    def label(self) -> str:
        """``wan, dev up1 via 192.0.2.1``: the interface, and the path where it is known."""
        ingress = self.ingress
        where = "any interface" if ingress is None else "the host itself" if ingress.local else ingress.ifname
        if isinstance(self.egress, Unknown) or not self.egress:
            return where
        return f"{where}, {' or '.join(e.describe() for e in self.egress)}"

    def gives_text(self) -> str:
        gives = self.gives
        if isinstance(gives, Unknown):
            return f"unknown ({gives.reason})"
        if not gives:
            return "dropped"
        return " or ".join(b.describe() for b in gives)


@dataclass(frozen=True, slots=True)
class Reason:
    """Why one side of an entry is stale or undecided; ``render`` words it.

    Which fields a code fills: every code ``side``; all but
    INTERNAL_DISAGREEMENT ``actual`` (None where no binding can be read),
    ``original`` and ``translated`` (the side's address before and after
    NAT). The changed codes: ``expected`` (sorted), ``egress`` and ``rules``;
    or, where every way the flow may have come refuses it, ``ways`` (and
    ``expected`` the bindings they give). The unknown codes: ``cause``,
    ``cause_rule`` (where a rule made it unknown), ``egress`` and, with a
    previous snapshot, ``egress_before``;
    ``ruleset_changed`` where that snapshot had another ruleset.
    UNKNOWN_INGRESS: ``keeps`` (ways that keep the bindings), ``ways``
    (those an old entry may have come by) and ``history``.
    INTERNAL_DISAGREEMENT: ``verdict`` (the compiled scan's).
    """

    code: ReasonCode
    side: str
    actual: Binding | None = None
    original: IPAddress | None = None
    translated: IPAddress | None = None
    expected: tuple[Binding, ...] = ()
    egress: EgressSet | None = None
    egress_before: EgressSet | None = None
    rules: tuple[RuleLine, ...] = ()
    cause: str = ""
    # The rule whose match or statement made the NAT unpredictable, where one did.
    cause_rule: RuleRef | None = None
    ruleset_changed: bool = False
    keeps: tuple[Way, ...] = ()
    ways: tuple[Way, ...] = ()
    history: str = ""
    verdict: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.code, ReasonCode):
            object.__setattr__(self, "code", ReasonCode(self.code))
        if self.side not in SIDES:
            raise ValueError(f"Reason.side must be snat or dnat, got {self.side!r}")
        if self.history and self.history not in HISTORIES:
            raise ValueError(f"Reason.history must be one of {sorted(HISTORIES)}, got {self.history!r}")

    def render(self) -> str:
        """The text a person reads, from the fields alone."""
        return _RENDER[self.code](self)

    def _translation(self) -> str:
        actual, original, translated = self.actual, self.original, self.translated
        if actual is None or original is None or translated is None:
            return "not translated"
        if original == translated and actual.ports is None:
            return f"{original} (no NAT)"
        return f"{actual.describe()} ({original} -> {translated})"


def egress_text(egress: EgressSet | None) -> str:
    """``dev up1 via 192.0.2.1 or dev up2``; ``none`` where the flow leaves nowhere."""
    if egress is None:
        return "not known"
    if isinstance(egress, Unknown):
        return f"unknown ({egress.reason})"
    if not egress:
        return "none"
    return " or ".join(e.describe() for e in egress)


def _egress_sources(egress: EgressSet | None) -> str:
    if egress is None or isinstance(egress, Unknown):
        return egress_text(egress)
    return " or ".join(f"{e.describe()} (masquerade source {e.masquerade_source})" for e in egress)


def _ways_text(ways: tuple[Way, ...]) -> str:
    parts = [f"by {w.label()} its {SIDES[w.side]} would be {w.gives_text()}" for w in ways[:WAYS_SHOWN]]
    if len(ways) > WAYS_SHOWN:
        parts.append(f"and {len(ways) - WAYS_SHOWN} more")
    return "; ".join(parts)


def _labels(ways: tuple[Way, ...]) -> str:
    names = list(dict.fromkeys(w.label() for w in ways))
    text = "; ".join(names[:WAYS_SHOWN])
    return text + (f" and {len(names) - WAYS_SHOWN} more" if len(names) > WAYS_SHOWN else "")


def _changed(r: Reason) -> str:
    what = SIDES[r.side]
    if r.ways:
        return (f"{what} is {r._translation()}, and no way it may have come in and gone out gives it its "
                f"bindings now: {_ways_text(r.ways)}")
    rules = f"; by {'; '.join(line.text for line in r.rules)}" if r.rules else ""
    expected = " or ".join(b.describe() for b in r.expected)
    return (f"{what} is {r._translation()}, but now it would be {expected} "
            f"(egress {egress_text(r.egress)}{rules})")


def _unknown_nat(r: Reason) -> str:
    what = SIDES[r.side]
    if r.ruleset_changed:
        return f"{what} NAT cannot be predicted ({r.cause}); the egress is the same, but the ruleset changed"
    return f"{what} NAT cannot be predicted: {r.cause}"


def _unknown_egress(r: Reason) -> str:
    return f"{SIDES[r.side]} NAT cannot be predicted ({r.cause}) and the egress is unknown"


def _egress_changed(r: Reason) -> str:
    was, now = egress_text(r.egress_before), egress_text(r.egress)
    if was == now:  # the same route, another address on it (a PPP reconnect): name the addresses
        was, now = _egress_sources(r.egress_before), _egress_sources(r.egress)
    return (f"{SIDES[r.side]} NAT cannot be predicted ({r.cause}), but the flow's egress changed "
            f"from {was} to {now}")


def _unknown_ingress(r: Reason) -> str:
    return (f"{SIDES[r.side]} is {r._translation()}: by {_labels(r.keeps)} it keeps its bindings, but "
            f"{HISTORIES.get(r.history, HISTORIES['snapshot'])}, and then {_ways_text(r.ways)}; "
            "which way it came is not known")


def _disagreement(r: Reason) -> str:
    return f"judged {r.verdict} by the compiled scan, but the reference judgement disagrees (a defect)"


_RENDER = {
    ReasonCode.NULL_BINDING_NOW_NAT: _changed,
    ReasonCode.NAT_NOW_NONE: _changed,
    ReasonCode.SNAT_CHANGED: _changed,
    ReasonCode.DNAT_CHANGED: _changed,
    ReasonCode.EGRESS_CHANGED_UNKNOWN_NAT: _egress_changed,
    ReasonCode.UNKNOWN_NAT: _unknown_nat,
    ReasonCode.UNKNOWN_NAT_UNKNOWN_EGRESS: _unknown_egress,
    ReasonCode.UNKNOWN_INGRESS: _unknown_ingress,
    ReasonCode.INTERNAL_DISAGREEMENT: _disagreement,
}


def rule_lines(explain: tuple[str, ...], rules: tuple[RuleRef, ...]) -> tuple[RuleLine, ...]:
    """``Prediction.explain`` as lines, each with the first of ``rules`` whose words it quotes."""
    named = [(str(r), r) for r in rules]
    return tuple(RuleLine(line, next((r for text, r in named if text in line), None)) for line in explain)
