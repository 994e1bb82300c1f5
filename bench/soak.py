"""Issue #13, item 7: does the daemon's memory stay flat over many reactions?

Run from the repository: ``.venv/bin/python bench/soak.py [--reactions 1000] [--entries 20000]``.

The real ``Reactor`` runs reaction after reaction (``Reactor.react``, as the
daemon's loop calls it) against an in-memory conntrack table
(``edges.ctfake.FakeConntrack``: no kernel table, no root needed): before each
reaction the table is refilled with ``--entries`` UNREPLIED entries that the
predictor calls stale, and the reaction judges and deletes them all (re-check
included). Its resident set size (VmRSS) is read after every reaction; the
report gives it after the first ``--warmup`` reactions (allocator pools and
caches are filled by then) and at the end, and the growth in between. The
issue's target: growth under 10 MB over 1,000 reactions of 20,000 deletions.
A report, not a timed test.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, cast

import trio

from topowatch.core.conntrack import IPS_CONFIRMED, IPS_DST_NAT_DONE, IPS_SRC_NAT_DONE, CtTuple, Entry
from topowatch.core.decide import Decider
from topowatch.core.eligibility import Eligibility
from topowatch.core.fib import Fib
from topowatch.core.flow import NO_NAT, Binding, Flow, NatKind, Prediction
from topowatch.core.model import Link, Route, Topology
from topowatch.core.nat import NatRuleset
from topowatch.edges.ctfake import FakeConntrack
from topowatch.reactor import Burst, DeleteCounts, Reactor, ReactorConfig, StillStale, Trigger

TOPOLOGY = Topology(links=(Link(1, "lo"), Link(2, "up2")), routes=(Route(IPv4Network("0.0.0.0/0")),))
MASQ = frozenset({Binding(NatKind.MASQUERADE, IPv4Address("203.0.113.2"))})
TARGET_MB = 10.0


def masquerade(ruleset: Any, fib: Fib, flow: Flow) -> Prediction:
    """Every flow would be masqueraded now; the table's entries carry no NAT: all are stale."""
    return Prediction(dnat=frozenset({NO_NAT}), snat=MASQ, egress=())


def table(n: int) -> list[Entry]:
    src, dst = IPv4Address("10.0.1.2"), IPv4Address("192.0.2.10")
    out = []
    for i in range(n):
        s = IPv4Address(int(src) + i // 60000)
        sport = 1024 + i % 60000
        out.append(Entry(2, 17, CtTuple(s, dst, sport, 5060), CtTuple(dst, s, 5060, sport),
                         status=IPS_CONFIRMED | IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE, timeout=600))
    return out


class FakeTableBackend:
    """``reactor.Backend`` over a ``FakeConntrack``: the table is refilled before each reaction."""

    name = "soak"

    def __init__(self, entries: int) -> None:
        self.ct = FakeConntrack()
        self.template = table(entries)

    def refill(self) -> None:
        self.ct.create(self.template)

    def sources(self) -> list[Any]:
        return []

    async def topology(self) -> Topology:
        return TOPOLOGY

    async def ruleset(self) -> NatRuleset:
        return cast(NatRuleset, object())

    async def entries(self, eligibility: Eligibility) -> list[Entry]:
        return [e for e in self.ct.dump(unreplied_only=eligibility.unreplied_only) if eligibility.admits(e)]

    async def judge(self, eligibility: Eligibility, decider: Callable[[Any], Decider]) -> Decider:
        """Every listed entry, added to one decider (``reactor.Backend.judge``)."""
        judging = decider(None)
        for e in await self.entries(eligibility):
            judging.add(e)
        return judging

    async def delete(self, entries: Sequence[Entry], still: StillStale) -> DeleteCounts:
        result = self.ct.delete_current(entries, still)
        return DeleteCounts(deleted=result.deleted, already_gone=result.not_found,
                            kept_replied=result.kept_replied)


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


async def soak(reactions: int, entries: int, warmup: int) -> dict[str, float]:
    backend = FakeTableBackend(entries)
    reactor = Reactor(backend, ReactorConfig(startup_sweep=False, max_deletions=10 * entries),
                      predictor=masquerade)
    reactor.t0 = TOPOLOGY
    samples: list[int] = []
    started = time.perf_counter()
    for i in range(reactions):
        backend.refill()
        burst = Burst()
        burst.add(Trigger("soak", f"route {i}", kind="route"), trio.current_time())
        reaction = await reactor.react(burst)
        if reaction.deleted.deleted != entries:
            raise SystemExit(f"reaction {i + 1} deleted {reaction.deleted.deleted}, not {entries}")
        samples.append(rss_kb())
        if (i + 1) % 100 == 0:
            print(f"  {i + 1} reactions, RSS {samples[-1] / 1024:.1f} MB", flush=True)
    seconds = time.perf_counter() - started
    gc.collect()
    at_warmup = samples[min(warmup, len(samples)) - 1]
    return {
        "reactions": reactions, "entries": entries, "seconds": seconds,
        "rss_first_mb": samples[0] / 1024, "rss_warmup_mb": at_warmup / 1024,
        "rss_end_mb": samples[-1] / 1024, "rss_max_mb": max(samples) / 1024,
        "rss_after_gc_mb": rss_kb() / 1024, "growth_mb": (samples[-1] - at_warmup) / 1024,
        "history": len(reactor.reactions), "deleted_total": reactor.totals.deleted,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--reactions", type=int, default=1000)
    parser.add_argument("--entries", type=int, default=20_000, help="stale entries deleted per reaction")
    parser.add_argument("--warmup", type=int, default=50, help="reactions before the RSS baseline")
    args = parser.parse_args(argv)
    if args.reactions <= args.warmup:
        parser.error("--reactions must exceed --warmup")
    logging.basicConfig(level=logging.WARNING)  # no per-entry lines: the reactor's INFO log is quiet
    print(f"soak: {args.reactions} reactions of {args.entries} deletions (fake table), "
          f"RSS baseline after {args.warmup}", flush=True)
    r = trio.run(soak, args.reactions, args.entries, args.warmup)
    growth = r["growth_mb"]
    print(f"RSS after reaction 1 {r['rss_first_mb']:.1f} MB, after {args.warmup} "
          f"{r['rss_warmup_mb']:.1f} MB, at the end {r['rss_end_mb']:.1f} MB "
          f"(max {r['rss_max_mb']:.1f}, after gc {r['rss_after_gc_mb']:.1f})")
    print(f"{r['reactions']:.0f} reactions, {r['deleted_total']:.0f} entries deleted in "
          f"{r['seconds']:.1f} s; history holds {r['history']:.0f} reactions")
    verdict = "PASS" if growth < TARGET_MB else "FAIL"
    print(f"{verdict}  RSS growth after the first {args.warmup} reactions: {growth:+.1f} MB "
          f"(target < {TARGET_MB:.0f} MB over 1,000 reactions of 20,000 deletions)")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
