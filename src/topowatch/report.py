# SPDX-License-Identifier: GPL-2.0-or-later
"""How a FlushPlan looks to people and programs: the JSON contract and the text table.

The JSON shape is a contract (schema in ``schema/plan.schema.json``): one
object with ``entries_examined``, ``stale``, ``undecided``, ``elapsed_ms``
(and ``deleted`` for flush). This module renders only; it never decides.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from topowatch.core.conntrack import ICMP_PROTOS, CtTuple, Entry
from topowatch.core.decide import Decision, FlushPlan, StaleDecisions
from topowatch.core.flow import Binding, Egress, Ingress, NatKind, RuleRef, Unknown, proto_name
from topowatch.core.model import AF_INET
from topowatch.core.reason import EgressSet, Reason, RuleLine, Way

JsonObject = dict[str, Any]


def tuple_json(entry: Entry, t: CtTuple) -> JsonObject:
    obj: JsonObject = {"src": str(t.src), "dst": str(t.dst)}
    if entry.proto in ICMP_PROTOS:
        obj.update(sport=None, dport=None, type=t.icmp_type, code=t.icmp_code, id=t.icmp_id)
    else:
        obj.update(sport=t.sport, dport=t.dport)
    return obj


def binding_json(binding: Binding | None) -> JsonObject | None:
    if binding is None:
        return None
    ports = binding.ports
    return {"kind": binding.kind.value, "addr": binding.addr_text, "ports": list(ports) if ports else None}


def egress_json(egress: EgressSet | None) -> list[JsonObject] | JsonObject | None:
    """A list of paths; ``{"unknown": why}`` where the egress cannot be predicted; None: not known."""
    if egress is None:
        return None
    if isinstance(egress, Unknown):
        return {"unknown": egress.reason}
    return [path_json(e) for e in egress]


def path_json(e: Egress) -> JsonObject:
    return {
        "kind": e.kind.value,
        "dev": e.oifname or None,
        "oif": e.oif,
        "gateway": str(e.gateway) if e.gateway is not None else None,
        "prefix": str(e.prefix) if e.prefix is not None else None,
        "route": e.route or None,
        "masquerade_source": str(e.masquerade_source) if e.masquerade_source is not None else None,
        "xfrm": e.xfrm or None,
    }


def rule_json(line: RuleLine) -> JsonObject:
    rule: RuleRef | None = line.rule
    obj: JsonObject = {"text": line.text}
    if rule is not None:
        obj.update(chain=rule.chain, handle=rule.handle or None, rule=rule.text)
    return obj


def _ingress_json(ingress: Ingress | None) -> str | None:
    if ingress is None:
        return None  # any of the candidate interfaces
    return "local" if ingress.local else ingress.ifname


def way_json(way: Way) -> JsonObject:
    obj: JsonObject = {"ingress": _ingress_json(way.ingress), "egress": egress_json(way.egress)}
    if way.side:
        gives = way.gives
        obj.update(side=way.side, gives={"unknown": gives.reason} if isinstance(gives, Unknown)
                   else [binding_json(b) for b in gives])
    return obj


def reason_json(reason: Reason) -> JsonObject:
    """The fields a reason's text is rendered from (``core.reason``): those its code fills."""
    obj: JsonObject = {"code": reason.code.value, "side": reason.side}
    if reason.actual is not None:
        obj["actual"] = binding_json(reason.actual)
    if reason.original is not None and reason.translated is not None:
        obj.update(original=str(reason.original), translated=str(reason.translated))
    if reason.expected:
        obj["expected"] = [binding_json(b) for b in reason.expected]
    if reason.egress is not None:
        obj["egress"] = egress_json(reason.egress)
    if reason.egress_before is not None:
        obj["egress_before"] = egress_json(reason.egress_before)
    if reason.rules:
        obj["rules"] = [rule_json(line) for line in reason.rules]
    if reason.cause:
        obj["cause"] = reason.cause
    if reason.cause_rule is not None:
        rule = reason.cause_rule
        obj["cause_rule"] = {"chain": rule.chain, "handle": rule.handle or None, "rule": rule.text}
    if reason.ruleset_changed:
        obj["ruleset_changed"] = True
    if reason.keeps:
        obj["keeps"] = [way_json(w) for w in reason.keeps]
    if reason.ways:
        obj["ways"] = [way_json(w) for w in reason.ways]
    if reason.history:
        obj["history"] = reason.history
    if reason.verdict:
        obj["verdict"] = reason.verdict
    return obj


def decision_json(decision: Decision) -> JsonObject:
    e = decision.entry
    return {
        "family": "ipv4" if e.family == AF_INET else "ipv6",
        "proto": proto_name(e.proto),
        "zone": e.zone,
        "mark": e.mark,
        "id": e.id,
        "orig": tuple_json(e, e.orig),
        "reply": tuple_json(e, e.reply),
        "side": decision.side,
        "actual": binding_json(decision.actual),
        "expected": [binding_json(b) for b in decision.expected],
        "reason": decision.reason,
        "code": code_of(decision),
        "why": reason_json(decision.why),
    }


def plan_json(
    plan: FlushPlan, elapsed: float, deleted: int | None = None, limit: int | None = None
) -> JsonObject:
    """The one-object contract; with ``limit`` at most that many stale and undecided entries each.

    The counts are always of the whole plan, and ``truncated`` says whether
    entries were left out.
    """
    stale, undecided = plan.stale, plan.undecided
    if limit is not None:
        stale, undecided = stale[:limit], undecided[:limit]
    obj: JsonObject = {
        "entries_examined": plan.examined,
        "eligible": plan.eligible,
        "distinct_flows": plan.distinct_flows,
        "stale": [decision_json(d) for d in stale],
        "undecided": [decision_json(d) for d in undecided],
        "stale_count": len(plan.stale),
        "undecided_count": len(plan.undecided),
        "stale_by_code": count_codes(plan.stale),
        "undecided_by_code": count_codes(plan.undecided),
        "truncated": len(stale) < len(plan.stale) or len(undecided) < len(plan.undecided),
        "limit": limit,
        "elapsed_ms": round(elapsed * 1000, 3),
    }
    if deleted is not None:
        obj["deleted"] = deleted
    return obj


def plan_text(plan: FlushPlan, elapsed: float, *, verb: str = "stale", limit: int | None = None) -> str:
    lines = [
        f"examined {plan.examined} entries, {plan.eligible} eligible, "
        f"{len(plan.stale)} {verb}, {len(plan.undecided)} undecided ({elapsed * 1000:.1f} ms)"
    ]
    for label, decisions in ((verb.upper(), plan.stale), ("UNDECIDED", plan.undecided)):
        shown = decisions if limit is None else decisions[:limit]
        for d in shown:
            lines.append(f"  {label} {d.entry.describe()}")
            lines.append(f"      [{code_of(d)}] {d.reason}")
        if len(shown) < len(decisions):
            lines.append(f"  ... and {len(decisions) - len(shown)} more {label.lower()} (--limit {limit})")
    return "\n".join(lines)


def summary_text(plan: FlushPlan, elapsed: float, *, verb: str = "stale") -> str:
    """``--summary``: the counts by reason code, one line each, no entries."""
    lines = [
        f"examined {plan.examined} entries, {plan.eligible} eligible, "
        f"{len(plan.stale)} {verb}, {len(plan.undecided)} undecided ({elapsed * 1000:.1f} ms)"
    ]
    for label, decisions in ((verb, plan.stale), ("undecided", plan.undecided)):
        for code, count in count_codes(decisions).items():
            lines.append(f"  {count:>8} {label} {code}")
    return "\n".join(lines)


# -- short forms for logs and summaries ----------------------------------------------------

UNCLASSIFIED = "unclassified"  # a Decision made without a code


def code_of(decision: Decision) -> str:
    return decision.code or UNCLASSIFIED


def short_entry(entry: Entry) -> str:
    """The original direction only: ``udp 10.0.1.2:5060 -> 192.0.2.10:5060`` (zone, mark if set)."""
    text = entry.flow.describe()
    if entry.proto in ICMP_PROTOS:
        text += f" id={entry.orig.icmp_id}"
    if entry.zone:
        text += f" zone {entry.zone}"
    if entry.mark:
        text += f" mark {entry.mark:#x}"
    return text


def transition(decision: Decision) -> str:
    """``source no NAT -> masquerade to 203.0.113.2``; the reason text where no binding is predicted.

    The actual binding is named without its port, so that the entries of one
    change read the same.
    """
    actual = decision.actual
    if actual is None or not decision.expected:
        return decision.reason
    what = "source" if decision.side == "snat" else "destination"
    was = "no NAT" if actual.kind is NatKind.NONE else f"{actual.kind.value} to {actual.addr_text}"
    expected = " or ".join(b.describe() for b in decision.expected)
    return f"{what} {was} -> {expected}"


def count_codes(decisions: Iterable[Decision]) -> dict[str, int]:
    """Counts by reason code, most frequent first (records of a compiled scan stay records)."""
    if isinstance(decisions, StaleDecisions):
        counts = Counter(code or UNCLASSIFIED for code in decisions.codes())
    else:
        counts = Counter(code_of(d) for d in decisions)
    return dict(counts.most_common())


def code_samples(decisions: Sequence[Decision], sample: int = 64) -> list[tuple[str, int, list[Decision]]]:
    """(code, count, the group's first ``sample`` decisions) per reason code, the largest group first.

    For a ``StaleDecisions`` only the samples are built: a reaction's line is
    written as soon as its deletes are done, before the per-entry records.
    """
    if not isinstance(decisions, StaleDecisions):
        return [(code, len(group), group[:sample]) for code, group in group_by_code(decisions)]
    where: dict[str, list[int]] = {}
    counts: Counter[str] = Counter()
    for i, named in enumerate(decisions.codes()):
        code = named or UNCLASSIFIED
        counts[code] += 1
        if counts[code] <= sample:
            where.setdefault(code, []).append(i)
    return [(code, count, [decisions.at(i) for i in where[code]]) for code, count in counts.most_common()]


def group_by_code(decisions: Iterable[Decision]) -> list[tuple[str, list[Decision]]]:
    """Decisions grouped by reason code, the largest group first."""
    groups: dict[str, list[Decision]] = {}
    for d in decisions:
        groups.setdefault(code_of(d), []).append(d)
    return sorted(groups.items(), key=lambda item: -len(item[1]))


def group_line(verb: str, code: str, decisions: Sequence[Decision], examples: int = 3) -> str:
    """One line for a group: a few examples, the count, the code and what changed.

    ``deleted udp 10.0.1.2:5060 -> 192.0.2.10:5060, ..., and 2 more (5 null_binding_now_nat:
    source no NAT -> masquerade to 203.0.113.2)``
    """
    changes = {transition(d) for d in decisions[:64]}
    shown = decisions[:examples]
    if len(changes) == 1:
        items = [short_entry(d.entry) for d in shown]
        why = f"{len(decisions)} {code}: {next(iter(changes))}"
    else:
        items = [f"{short_entry(d.entry)} ({transition(d)})" for d in shown]
        why = f"{len(decisions)} {code}"
    more = len(decisions) - len(shown)
    return f"{verb} {', '.join(items)}{f', and {more} more' if more > 0 else ''} ({why})"


def summary_json(plan: FlushPlan, elapsed: float, deleted: int | None = None) -> JsonObject:
    """The counts of a plan without its entries: what ``--summary`` and ``--json-lines`` end with."""
    obj: JsonObject = {
        "entries_examined": plan.examined,
        "eligible": plan.eligible,
        "distinct_flows": plan.distinct_flows,
        "stale_count": len(plan.stale),
        "undecided_count": len(plan.undecided),
        "stale_by_code": count_codes(plan.stale),
        "undecided_by_code": count_codes(plan.undecided),
        "elapsed_ms": round(elapsed * 1000, 3),
    }
    if deleted is not None:
        obj["deleted"] = deleted
    return obj
