# SPDX-License-Identifier: GPL-2.0-or-later
"""The daemon's dump+decide against the kernel's undecoded dump, per pipelined burst size.

Run as root from the repository: ``.venv/bin/python bench/pipeline.py [--scenario TEXT]
[--rounds N] [--chunks 4194304,1048576,524288] [--firsts 1048576,131072] [--early] [--cold]``.

In the namespaces of bench/flush.py (10,000 extra routes, 2,000 extra NAT rules) the router's
table is filled as the named scenario fills it. A process inside the router's namespace then
reads topology and ruleset as the daemon does, builds the flow classes once (as the daemon's
warm-up does), and in each round measures the floor (``flush.kernel_dump_only``: the UNREPLIED
dump received, nothing decoded) followed by ``KernelBackend.judge`` with each burst size of
``Conntrack._pipelined`` (``ctnetlink.PIPELINE_CHUNK``) and first burst (``PIPELINE_FIRST``:
a small one lets the judging, whose first entries of each flow class cost a prediction each,
start while the kernel walks on). ``--cold`` gives each round a fresh snapshot's FIB, its
caches empty, as the startup sweep and each reaction have it. Printed per size: judge minus the
floor measured just before it, median and min over the rounds. This VM's speed varies between
runs, so only the paired differences are compared, never one run's time with another's.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import flush


def inside(chunks: list[int], firsts: list[int], rounds: int, early: bool, cold: bool) -> None:
    import trio

    from topowatch.core.classify import Classifier
    from topowatch.core.decide import Decider
    from topowatch.core.eligibility import Eligibility
    from topowatch.core.evaluate import index_rules, predict
    from topowatch.core.fib import Fib
    from topowatch.edges import ctnetlink
    from topowatch.edges.kernel import KernelBackend
    from topowatch.sources import EarlyDeletes

    async def main() -> None:
        backend = KernelBackend()
        topology, ruleset = await backend.topology(), await backend.ruleset()
        fib0 = fib = Fib(topology)
        index_rules(ruleset)
        eligibility = Eligibility(unreplied_only=True)
        classifier = Classifier.build([topology], [ruleset], eligibility, sport_matters=False)
        classifier.packed()
        print(f"flow classes: {classifier.class_count if classifier.exact else classifier.reason}", flush=True)

        def make(build: object) -> Decider:
            return Decider(predict=lambda f, flow: predict(ruleset, f, flow), fib_now=fib,
                           eligibility=eligibility, sport_matters=False, build=build,  # type: ignore[arg-type]
                           classifier=classifier)  # fmt: skip

        ct = backend._conntrack()
        runs = [(c, f, False) for c in chunks for f in firsts]
        runs += [(ctnetlink.PIPELINE_CHUNK, ctnetlink.PIPELINE_FIRST, True)] if early else []
        over: dict[tuple[int, int, bool], list[float]] = {run: [] for run in runs}
        floors: list[float] = []
        for _ in range(rounds):
            for chunk, first, overlap in runs:
                if cold:  # as a reaction: a fresh snapshot's FIB (carried over), its caches empty
                    fib = Fib(await backend.topology(), previous=fib0)
                floors.append(flush.kernel_dump_only(ct))
                ctnetlink.PIPELINE_CHUNK, ctnetlink.PIPELINE_FIRST = chunk, min(first, chunk)
                # With early deletes (as the daemon's sweep and reactions under a cap above the
                # table's size): the second socket and the gate run, nothing is stale here.
                leave = EarlyDeletes(lambda dumped, now: True, 1 << 62, lambda: True) if overlap else None
                started = time.perf_counter()
                await backend.judge(eligibility, make, early=leave)
                over[chunk, first, overlap].append(time.perf_counter() - started - floors[-1])
        print(f"floor (undecoded UNREPLIED dump): median {statistics.median(floors) * 1000:.1f} ms, "
              f"min {min(floors) * 1000:.1f} ms")  # fmt: skip
        for chunk, first, overlap in runs:
            ms = [x * 1000 for x in over[chunk, first, overlap]]
            early_text = " early deletes" if overlap else ""
            print(f"burst {chunk >> 10:5d} KiB, first {min(first, chunk) >> 10:5d} KiB{early_text}: "
                  f"judge minus its floor median "
                  f"{statistics.median(ms):6.1f} ms, min {min(ms):6.1f} ms; each {[round(x) for x in ms]}")

    trio.run(main)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenario", default="160k distinct keys, 10% unreplied, K=12.5",
                    help="a bench/flush.py scenario (its name's start)")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--chunks", default="4194304,1048576,524288", help="burst sizes in bytes")
    ap.add_argument("--firsts", default="1048576,131072", help="sizes of the first burst in bytes")
    ap.add_argument("--early", action="store_true", help="also judge with early deletes (edges.overlap)")
    ap.add_argument("--cold", action="store_true",
                    help="a fresh snapshot's FIB each round (its caches empty), as a reaction has it")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    chunks = [int(c) for c in args.chunks.split(",")]
    firsts = [int(c) for c in args.firsts.split(",")]
    if args.inside:
        inside(chunks, firsts, args.rounds, args.early, args.cold)
        return
    found = [s for s in flush.scenarios(False) if s.name.startswith(args.scenario)]
    if not found:
        raise SystemExit(f"no scenario starts with {args.scenario!r}")
    sc = found[0]
    with open(flush.CT_MAX) as f:
        limit = int(f.read())
    if sc.n > limit:
        raise SystemExit(f"{sc.name}: larger than nf_conntrack_max; bench/flush.py --raise-limits runs it")
    print(f"scenario {sc.name}: N={sc.n} UNREPLIED={sc.unreplied}", flush=True)
    with flush.Bench.create() as bench:
        if sc.keys != "shared":
            bench.furnish()
        flush.rebuild(bench, sc, flush.replied_entries(sc), flush.unreplied_flows(sc))
        subprocess.run(["ip", "netns", "exec", bench.router.name, sys.executable, __file__, "--inside",
                        "--rounds", str(args.rounds), "--chunks", args.chunks, "--firsts", args.firsts,
                        *(["--early"] if args.early else []), *(["--cold"] if args.cold else [])],
                       check=True)  # fmt: skip


if __name__ == "__main__":
    main()
