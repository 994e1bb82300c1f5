"""The heap settling (topowatch/collector.py) and when the reactor asks for it.

``settle`` itself runs once here, in a child process (it freezes the whole heap of the
process it runs in; the test runner's must stay as it is). The reactor's schedule is
tested with a settle that only counts, on trio's mock clock.
"""

from __future__ import annotations

import json
import subprocess
import sys

import trio
import trio.testing

from topowatch import reactor as reactor_mod
from topowatch.collector import Settled
from topowatch.reactor import Reactor, ReactorConfig, Trigger

from test_reactor import B, FakeBackend, stale_when_up2  # isort: skip

SCRIPT = r"""
import gc, json
gc.disable()                        # only settle collects here
from topowatch.collector import settle
class Node:
    pass
a, b = Node(), Node()
a.other, b.other = b, a            # a cycle, garbage once dropped
del a, b
kept = [Node() for _ in range(1000)]
first = settle()
late = [Node() for _ in range(10)]  # made after: not frozen
x, y = Node(), Node()
x.other, y.other = y, x
del x, y
second = settle()                   # unfreezes first: the cycle made since is found
print(json.dumps({"first": [first.frozen, first.collected], "second": [second.frozen, second.collected],
                  "count_now": gc.get_freeze_count()}))
"""


def test_settle_collects_the_dead_then_freezes_the_living_and_finds_later_cycles() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout
    got = json.loads(out)
    assert got["first"][1] >= 2  # the two nodes of the first cycle (and their dicts)
    assert got["first"][0] >= 1000  # the kept nodes went to the permanent generation
    assert got["second"][1] >= 2  # the cycle made after the first settle was collected by the second
    assert got["second"][0] >= 1000 + 10  # the kept and the late ones are frozen
    assert got["count_now"] == got["second"][0]


class Counting:
    """A settle that records when it ran (trio's clock) and answers ``result``."""

    def __init__(self, result: Settled = Settled(0.0, 0, 0)) -> None:  # noqa: B008 (a frozen value)
        self.result = result
        self.at: list[float] = []

    def __call__(self) -> Settled:
        self.at.append(trio.current_time())
        return self.result


async def test_the_heap_settles_before_ready_and_once_quiet_after_reactions_at_most_once_an_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settle = Counting()
    backend = FakeBackend()
    backend.topo = B
    reactor = Reactor(backend, ReactorConfig(debounce=0.1, max_wait=0.1, settle=settle), predictor=stale_when_up2)
    async with trio.open_nursery() as nursery:
        started = trio.current_time()
        await nursery.start(reactor.run)
        assert len(settle.at) == 1 and reactor.reactions == []  # before "ready", before the sweep
        await trio.sleep(reactor_mod.SETTLE_INTERVAL / 2)
        assert len(settle.at) == 1  # after the sweep: not before an interval has passed
        # A storm of events every second, past the interval: no settle while it lasts.
        for _ in range(int(reactor_mod.SETTLE_INTERVAL)):
            await backend.send.send(Trigger("rtnl", "route added: x", kind="route"))
            await trio.sleep(1.0)
        assert len(settle.at) == 1
        last = reactor.reactions[-1]
        # Quiet now: it settles SETTLE_QUIET after the last reaction ended, once.
        await trio.sleep(reactor_mod.SETTLE_QUIET + 1)
        assert len(settle.at) == 2
        assert settle.at[1] - started > reactor_mod.SETTLE_INTERVAL
        assert reactor.reactions[-1] is last
        # Idle for hours: nothing more (no reaction woke it).
        await trio.sleep(10 * reactor_mod.SETTLE_INTERVAL)
        assert len(settle.at) == 2
        nursery.cancel_scope.cancel()


async def test_no_settle_without_one_configured(autojump_clock: trio.testing.MockClock) -> None:
    backend = FakeBackend()
    backend.topo = B
    reactor = Reactor(backend, ReactorConfig(), predictor=stale_when_up2)
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        await trio.sleep(2 * reactor_mod.SETTLE_INTERVAL)
        nursery.cancel_scope.cancel()
    assert reactor.settles == 0
