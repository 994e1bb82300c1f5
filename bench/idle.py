"""The idle cost of a running process, as the kernel counts it: context switches of all its threads.

``/proc/PID/task/TID/status`` gives each thread's voluntary and involuntary
context switches. A thread that ends takes its counts along, so a watch
compares thread by thread: threads seen at both ends, threads that started
(counted in full) and threads that ended (their last switches are not seen;
trio's worker threads leave once after an idle timeout, which is not a timer
of the daemon's).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from topowatch.lab import thread_switches


@dataclass(frozen=True, slots=True)
class IdleWatch:
    seconds: float
    switches: int  # all threads: those seen at both ends, plus the whole count of any that started
    woke: dict[int, int]  # thread id -> switches, for each thread that switched
    threads_before: int
    threads_after: int
    started: int  # threads that appeared during the watch
    ended: int  # threads that ended during the watch

    def describe(self) -> str:
        text = (
            f"{self.switches} context switches over all threads in {self.seconds:.0f} s "
            f"(threads {self.threads_before} -> {self.threads_after}"
        )
        if self.ended:
            text += f"; {self.ended} ended, e.g. an idle worker thread leaving"
        if self.started:
            text += f"; {self.started} started"
        text += ")"
        if self.woke:
            text += " woke: " + ", ".join(f"tid {tid}: {n}" for tid, n in sorted(self.woke.items()))
        return text


def watch_idle(pid: int, seconds: float) -> IdleWatch:
    before = thread_switches(pid)
    time.sleep(seconds)
    after = thread_switches(pid)
    woke = {tid: n - before.get(tid, 0) for tid, n in after.items() if n != before.get(tid, 0)}
    return IdleWatch(
        seconds=seconds,
        switches=sum(woke.values()),
        woke=woke,
        threads_before=len(before),
        threads_after=len(after),
        started=len(set(after) - set(before)),
        ended=len(set(before) - set(after)),
    )
