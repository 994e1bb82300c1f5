# SPDX-License-Identifier: GPL-2.0-or-later
"""What a parser of a large ruleset does to stay fast, lean and bounded in time.

What this module decides: when the cyclic garbage collector may run while a
ruleset is parsed (``gc_paused``), and what counts as a parse's progress and
its end of patience (``Budget``). It never parses anything itself and never
changes a value a parser builds.

Theory of operation:

- A parse of 50k rules builds millions of small objects (the decoded JSON,
  then the rules), none of them in a reference cycle. CPython's cyclic
  collector counts allocations and, every few thousand, walks the young
  objects; with millions alive its full collections are repeated walks of
  everything: more than half the CPU of such a parse went there.
  ``gc_paused`` disables the collector for the length of the parse and
  restores it after (reference counting still frees everything at once).
  It is process-wide, so it nests across threads: the collector comes back
  when the last parse ends, and only if it was enabled before the first.
  Before it comes back, everything allocated meanwhile moves straight to the
  oldest generation (``gc.freeze()`` then ``gc.unfreeze()``: two list
  splices): otherwise the first allocation after would walk all those young
  objects at once (0.3 s after 50k rules, on whichever thread, the event
  loop's too) only to promote them there. Nothing is left uncollected: a
  cycle among them goes with the next full collection.
- ``Budget`` is the parser's clock: ``tick()`` once per rule. Every
  ``STEP`` rules it calls ``progress`` (the watchdog's evidence that a worker
  thread is moving, see ``topowatch.sdnotify``) and checks the deadline;
  past it, ``ParseTooSlow`` (a ``RulesetError``) ends the parse, and the
  caller keeps the ruleset it had. A thread cannot be cancelled from
  outside; a parse that checks its own deadline can stop by itself.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections.abc import Callable, Iterator

from topowatch.errors import RulesetError

# Rules parsed between two progress calls and deadline checks (a few milliseconds of work).
STEP = 1000

class _Pause:
    """Who holds the collector paused, and whether it ran before the first of them."""

    lock = threading.Lock()
    holders = 0
    was_enabled = False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic collector off while the block runs (nests, also across threads)."""
    with _Pause.lock:
        if _Pause.holders == 0:
            _Pause.was_enabled = gc.isenabled()
            gc.disable()
        _Pause.holders += 1
    try:
        yield
    finally:
        with _Pause.lock:
            _Pause.holders -= 1
            if _Pause.holders == 0 and _Pause.was_enabled:
                gc.freeze()  # young objects to the permanent generation,
                gc.unfreeze()  # and from there to the oldest: no walk of them now
                gc.enable()


class ParseTooSlow(RulesetError):
    """A parse ran past its deadline: the ruleset is not read (the previous one stays)."""


class Budget:
    """Progress calls and a deadline for one parse, counted in rules (``tick``)."""

    __slots__ = ("_next", "count", "deadline", "limit", "progress", "what")

    def __init__(self, progress: Callable[[], None] | None = None, timeout: float | None = None,
                 what: str = "the ruleset") -> None:
        self.progress = progress
        self.limit = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.what = what
        self.count = 0
        self._next = STEP

    def tick(self, n: int = 1) -> None:
        self.count += n
        if self.count >= self._next:
            self._next = self.count + STEP
            self.check()

    def check(self) -> None:
        """A step: tell ``progress``, and end the parse if it is past its deadline."""
        if self.progress is not None:
            self.progress()
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise ParseTooSlow(f"parsing {self.what} took more than {self.limit:.0f} s "
                               f"({self.count} rules read); it is not used")
