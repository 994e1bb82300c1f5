# SPDX-License-Identifier: GPL-2.0-or-later
"""When the cyclic garbage collector walks the daemon's long-lived state.

The daemon holds a large heap that lives long (the kept topology and its
routes, the flow classes, the ruleset and its indexes, the FIBs) and makes
short-lived objects in every reaction. CPython collects its oldest generation
whenever enough objects survived into it, and such a collection walks every
tracked object: 100-250 ms at 10,000 routes and 2,000 NAT rules here, on
whichever thread allocates at that moment, a reaction's included (measured
inside startup sweeps and route reactions, and as most of the CPU that a
storm of no-change events costs besides the snapshots).

``settle`` collects once and then freezes what is alive (``gc.freeze``):
later automatic collections walk only what was made after it. Nothing is
lost to it: a frozen object is still freed by its reference count, and the
next ``settle`` unfreezes everything first, so a cycle that died meanwhile
is found then. The reactor settles where nothing waits: before "ready", and
after reactions once the daemon has been quiet for a while, at most once an
interval (``Reactor._settle_when_quiet``).

This module never collects on its own schedule and never freezes without a
full collection first (that would keep garbage cycles until the next
settle). ``edges.bulkparse.gc_paused`` unfreezes the heap after a large parse
(its young objects go to the oldest generation that way); the next settle
freezes it again.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Settled:
    """What one ``settle`` did: its time and how many objects the collector walks no more."""

    seconds: float
    frozen: int
    collected: int


def settle() -> Settled:
    """Unfreeze, collect every generation, freeze what is alive (blocks for the collection)."""
    started = time.perf_counter()
    gc.unfreeze()
    collected = gc.collect()
    gc.freeze()
    return Settled(time.perf_counter() - started, gc.get_freeze_count(), collected)
