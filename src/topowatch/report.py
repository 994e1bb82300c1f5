# SPDX-License-Identifier: GPL-2.0-or-later
"""How a FlushPlan looks to people and programs: the JSON contract and the text table.

The JSON shape is a contract (schema in ``schema/plan.schema.json``): one
object with ``entries_examined``, ``stale``, ``undecided``, ``elapsed_ms``
(and ``deleted`` for flush). This module renders only; it never decides.
"""

from __future__ import annotations

from typing import Any

from topowatch.core.conntrack import ICMP_PROTOS, CtTuple, Entry
from topowatch.core.decide import Decision, FlushPlan
from topowatch.core.flow import Binding, proto_name
from topowatch.core.model import AF_INET

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
    }


def plan_json(plan: FlushPlan, elapsed: float, deleted: int | None = None) -> JsonObject:
    obj: JsonObject = {
        "entries_examined": plan.examined,
        "eligible": plan.eligible,
        "distinct_flows": plan.distinct_flows,
        "stale": [decision_json(d) for d in plan.stale],
        "undecided": [decision_json(d) for d in plan.undecided],
        "elapsed_ms": round(elapsed * 1000, 3),
    }
    if deleted is not None:
        obj["deleted"] = deleted
    return obj


def plan_text(plan: FlushPlan, elapsed: float, *, verb: str = "stale") -> str:
    lines = [
        f"examined {plan.examined} entries, {plan.eligible} eligible, "
        f"{len(plan.stale)} {verb}, {len(plan.undecided)} undecided ({elapsed * 1000:.1f} ms)"
    ]
    for d in plan.stale:
        lines.append(f"  {verb.upper()} {d.entry.describe()}")
        lines.append(f"      {d.reason}")
    for d in plan.undecided:
        lines.append(f"  UNDECIDED {d.entry.describe()}")
        lines.append(f"      {d.reason}")
    return "\n".join(lines)
