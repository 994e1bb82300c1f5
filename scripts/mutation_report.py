# SPDX-License-Identifier: GPL-2.0-or-later
"""Counts per module from ``mutmut results --all true`` on stdin (scripts/mutation --report)."""

from __future__ import annotations

import re
import sys
from collections import Counter, defaultdict

counts: dict[str, Counter[str]] = defaultdict(Counter)
survivors: list[str] = []
for line in sys.stdin:
    name, sep, status = line.strip().rpartition(": ")
    if not sep or "__mutmut_" not in name:
        continue
    # mutmut names a function x_NAME and a method xǁCLASSǁNAME; a module may itself start with x.
    module = re.split(r"\.x(?:_|ǁ)", name, maxsplit=1)[0]
    counts[module][status] += 1
    if status in ("survived", "no tests", "timeout", "suspicious"):
        survivors.append(f"{name}: {status}")
total: Counter[str] = Counter()
print(f"{'module':32} {'mutants':>7} {'run':>5} {'killed':>6} {'survived':>8} {'no tests':>8} {'other':>5}"
      f" {'killed of run':>13}")
for module in sorted(counts):
    c = counts[module]
    run = sum(c.values()) - c["not checked"]
    if not run:
        continue
    other = run - c["killed"] - c["survived"] - c["no tests"]
    print(f"{module:32} {sum(c.values()):7} {run:5} {c['killed']:6} {c['survived']:8} {c['no tests']:8}",
          f"{other:5} {100 * c['killed'] / run:12.1f}%")
    total += c
run = sum(total.values()) - total["not checked"]
if run:
    every = sum(total.values())
    print(f"{'run so far':32} {every:7} {run:5} {total['killed']:6} {total['survived']:8}",
          f"{total['no tests']:8}  killed {100 * total['killed'] / run:.1f}% of run,",
          f"{100 * total['killed'] / every:.1f}% of all")
for line in survivors:
    print(line)
