"""Issue #11: the scale of flow classes: build time and class count, and a route event's cost.

Run from the repository: ``nice -n 10 .venv/bin/python bench/classes.py [--routes 100000] [--events 300]``
(root for the corpus's nft text files, which load in a throwaway namespace named ``ti...``;
without root they are skipped).

For each corpus ruleset (../shared/corpus/rulesets: nft text and iptables-save files) and for a
generated gateway (a 2,000-rule NAT ruleset; a routing table of ``--routes`` /24 routes over three
uplinks), it prints the classifier's build time and its address and port classes. Then, on that
table, ``--events`` route events, each its own reaction as the daemon has them: a /24 moved to
another uplink, a more specific /26 added, one of those deleted, in turn. Per event it times:

- event: applying it to the kept topology and taking the snapshot (``core.livetopology``);
- impact: which flows it can re-NAT (``core.impact``);
- classifier: ``Classifier.build([before, now], ...)``, which carries the last reaction's
  classifier over to the change (``Classifier.updated``), and ``packed()``, the tables the
  compiled scan reads.

The garbage collector's young generations are collected right after each snapshot and counted
in its time: the snapshot's new tuple of every route is what they traverse, and the collection
would otherwise fall in whichever step allocates next. Times are wall clock (mean, median, 99th percentile) and CPU time of this thread (mean); on a
machine shared with others (the load average is printed) the CPU time is the steadier number, and
the verdict reads it. The classifier of the last event is compared with one built from scratch
(same boundaries, one class for one class). The target (issue #11): from a route event to an
updated classifier in under 1 ms on average. No number here is asserted by the test suite.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network, ip_address, ip_network
from pathlib import Path
from typing import Any

from topowatch.core.classify import Classifier
from topowatch.core.impact import impact
from topowatch.core.livetopology import NLM_F_REPLACE, LiveTopology
from topowatch.core.model import Address, Link, Nexthop, Route, Topology
from topowatch.core.nat import NatRuleset
from topowatch.edges.nft import parse_ruleset_json

LINKS = (Link(1, "lo"), Link(2, "lan"), Link(3, "up1"), Link(4, "up2"), Link(5, "up3"))
ADDRESSES = (Address(2, ip_address("10.0.0.1"), 8), Address(3, ip_address("198.51.100.2"), 24),
             Address(4, ip_address("203.0.113.2"), 24), Address(5, ip_address("192.0.2.2"), 24))  # fmt: skip
HOPS = (Nexthop(3, ip_address("198.51.100.1")), Nexthop(4, ip_address("203.0.113.1")),
        Nexthop(5, ip_address("192.0.2.1")))  # fmt: skip
BASE = int(IPv4Address("100.64.0.0"))
NLM_F_CREATE, NLM_F_EXCL = 0x400, 0x200


def slash24(i: int) -> IPv4Network:
    return IPv4Network((BASE + i * 256, 24))


def table(routes: int) -> Topology:
    out = [
        Route(ip_network("0.0.0.0/0"), nexthops=(HOPS[0],)),
        Route(ip_network("10.0.0.0/8"), nexthops=(Nexthop(2),)),
    ]
    out += [Route(slash24(i), nexthops=(HOPS[i % 3],)) for i in range(routes)]
    return Topology(LINKS, ADDRESSES, tuple(out))


def rule(chain: str, handle: int, *expr: dict[str, Any]) -> dict[str, Any]:
    return {"rule": {"family": "ip", "table": "nat", "chain": chain, "handle": handle, "expr": list(expr)}}


def match(left: dict[str, Any], right: object) -> dict[str, Any]:
    return {"match": {"op": "==", "left": left, "right": right}}


def big_ruleset(rules: int) -> NatRuleset:
    """DNATs by port from up2 into 10.3/16, SNATs of /26s of 10.2/16 out of up2, and a masquerade."""
    items: list[dict[str, Any]] = [{"table": {"family": "ip", "name": "nat", "handle": 1}}]
    for name, hook, prio, handle in (("pre", "prerouting", -100, 2), ("post", "postrouting", 100, 3)):
        items.append({"chain": {"family": "ip", "table": "nat", "name": name, "handle": handle, "type": "nat",
                                "hook": hook, "prio": prio, "policy": "accept"}})  # fmt: skip
    up2 = match({"meta": {"key": "oifname"}}, "up2")
    for i in range(rules // 2):
        items.append(rule("pre", 10 + i, match({"meta": {"key": "iifname"}}, "up2"),
                          match({"payload": {"protocol": "udp", "field": "dport"}}, 20000 + i),
                          {"dnat": {"addr": f"10.3.{i // 250}.{i % 250 + 1}"}}))  # fmt: skip
        source = {"prefix": {"addr": f"10.2.{i // 4}.{(i % 4) * 64}", "len": 26}}
        saddr = match({"payload": {"protocol": "ip", "field": "saddr"}}, source)
        items.append(rule("post", 100000 + i, saddr, up2, {"snat": {"addr": "203.0.113.2"}}))
    items.append(rule("post", 999999, up2, {"masquerade": None}))
    return parse_ruleset_json({"nftables": items})


def timed(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def describe(c: Classifier) -> str:
    return (
        f"IPv4 address classes {c.src[2].count} ({len(c.src[2].starts)} intervals), IPv6 {c.src[10].count}, "
        f"port classes {c.ports.count}, exact {c.exact}{'' if c.exact else ' (' + c.reason + ')'}"
    )


def corpus_rulesets(root: Path) -> list[tuple[str, NatRuleset | str]]:
    """Every ruleset file of the corpus, parsed, or why it was skipped."""
    from topowatch.corpus import _NftLoader, format_of, placeholders
    from topowatch.edges.iptables import parse_save
    from topowatch.netns import Namespace

    out: list[tuple[str, NatRuleset | str]] = []
    loader = _NftLoader()
    try:
        for path in sorted((root / "rulesets").iterdir()):
            fmt = format_of(path)
            if fmt == "iptables":
                text = path.read_text(errors="replace")
                for name, value in placeholders(root, text).items():
                    text = text.replace(name, value)
                family = "ip6" if "ip6" in path.name else "ip"
                out.append((path.name, parse_save(text, family=family, all_chains=True).ruleset))
            elif fmt == "nft":
                if os.geteuid() != 0:
                    out.append((path.name, "nft text loads in a namespace: run as root"))
                    continue
                if loader.ns is None and loader.error is None:
                    loader.ns = Namespace.create("ti")  # this bench's namespaces carry its prefix
                doc = loader.load(path)
                out.append((path.name, doc if isinstance(doc, str) else parse_ruleset_json(doc)))
            else:
                out.append((path.name, "not a ruleset format"))
    finally:
        loader.close()
    return out


def corpus(root: Path) -> None:
    if not (root / "rulesets").is_dir():
        print(f"corpus: skipped (no {root / 'rulesets'})")
        return
    print("corpus rulesets (with a two-route table):")
    for name, rs in corpus_rulesets(root):
        if isinstance(rs, str):
            print(f"  {name:<52} skipped: {rs}")
            continue
        seconds, c = timed(lambda rs=rs: Classifier.build([table(0)], [rs], reuse=False))
        rules = sum(len(chain.rules) for chain in rs.chains)
        print(f"  {name:<52} {rules:>4} rules {seconds * 1000:7.1f} ms  {describe(c)}")


def stats(xs: Sequence[float]) -> str:
    ordered = sorted(xs)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (f"mean {statistics.mean(xs) * 1e3:6.3f} ms  median {statistics.median(xs) * 1e3:6.3f} ms  "
            f"p99 {p99 * 1e3:6.3f} ms")  # fmt: skip


Event = tuple[str, bool, Route, int]  # what, new, the route, netlink flags


def events(live: LiveTopology, routes: int, count: int, rng: random.Random) -> list[Event]:
    """``count`` events in turn: a /24 moved to another uplink, a /26 added inside one, a /26 deleted."""
    out: list[Event] = []
    added: list[Route] = []
    for i in range(count):
        k = rng.randrange(routes)
        current = live.routes.get((2, 254, slash24(k), 0, 0))
        via = HOPS[(HOPS.index(current.nexthops[0]) + 1) % 3] if current is not None else HOPS[0]
        if i % 3 == 0:
            out.append(("moved", True, Route(slash24(k), nexthops=(via,)), NLM_F_CREATE | NLM_F_REPLACE))
        elif i % 3 == 1 or not added:
            more = Route(IPv4Network((BASE + k * 256 + 64 * rng.randrange(4), 26)), nexthops=(via,))
            added.append(more)
            out.append(("added", True, more, NLM_F_CREATE | NLM_F_EXCL))
        else:
            out.append(("deleted", False, added.pop(rng.randrange(len(added))), 0))
    return out


def route_events(topo: Topology, rs: NatRuleset, count: int) -> None:
    live = LiveTopology.seed(topo)
    assert live is not None
    before = live.snapshot()
    seconds, first = timed(lambda: Classifier.build([before], [rs]), repeat=1)
    print(f"  the daemon's first classifier (one snapshot, built): {seconds:.3f} s")
    first.packed()
    # The first reaction under a ruleset reads its DNAT targets once (core.impact); time it apart.
    probe = replace(before, routes=(*before.routes, Route(ip_network("198.18.0.0/16"), nexthops=(HOPS[1],))))
    seconds, _ = timed(lambda: impact(before, probe, rs), repeat=1)
    print(f"  impact, first time under this ruleset (reads its DNAT targets): {seconds * 1e3:.1f} ms")
    wall: dict[str, list[float]] = {"event": [], "impact": [], "classifier": [], "packed": []}
    cpu: dict[str, list[float]] = {k: [] for k in wall}
    carried = 0
    pair = [before]
    rng = random.Random(7)
    todo = events(live, sum(1 for r in topo.routes if r.dst.prefixlen == 24), count, rng)
    if gc.isenabled():
        gc.collect()
    classifier = first
    for _, new, route, flags in todo:
        w0, c0 = time.perf_counter(), time.thread_time()
        assert live.apply("route", new, route, flags)
        now = live.snapshot()
        if gc.isenabled():
            gc.collect(1)  # the snapshot's tuple of every route: collected here, not in the next step
        w1, c1 = time.perf_counter(), time.thread_time()
        impact(before, now, rs)
        w2, c2 = time.perf_counter(), time.thread_time()
        previous, classifier = classifier, Classifier.build([before, now], [rs])
        w3, c3 = time.perf_counter(), time.thread_time()
        classifier.packed()
        w4, c4 = time.perf_counter(), time.thread_time()
        carried += classifier._lineage is not None and previous._lineage is not None and (
            classifier._lineage.index is previous._lineage.index)
        for key, ws, cs in (("event", (w0, w1), (c0, c1)), ("impact", (w1, w2), (c1, c2)),
                            ("classifier", (w2, w3), (c2, c3)), ("packed", (w3, w4), (c3, c4))):  # fmt: skip
            wall[key].append(ws[1] - ws[0])
            cpu[key].append(cs[1] - cs[0])
        pair, before = [before, now], now
    kinds = ", ".join(f"{sum(1 for e in todo if e[0] == k)} {k}" for k in ("moved", "added", "deleted"))
    print(f"  {count} route events ({kinds}), each its own reaction; {carried} classifiers carried over:")
    names = {"event": "applied to the kept topology, snapshot", "impact": "impact (flows it can change)",
             "classifier": "classifier updated", "packed": "packed() for the compiled scan"}  # fmt: skip
    for key, what in names.items():
        print(f"    {what:<42} {stats(wall[key])}  cpu mean {statistics.mean(cpu[key]) * 1e3:6.3f} ms")
    total = [a + b for a, b in zip(wall["classifier"], wall["packed"], strict=True)]
    total_cpu = [a + b for a, b in zip(cpu["classifier"], cpu["packed"], strict=True)]
    whole = [a + b for a, b in zip(wall["event"], total, strict=True)]
    both = "classifier + packed"
    print(f"    {both:<42} {stats(total)}  cpu mean {statistics.mean(total_cpu) * 1e3:6.3f} ms")
    print(f"    {'route event to updated classifier':<42} {stats(whole)}")
    seconds, rebuilt = timed(lambda: Classifier.build(pair, [rs], reuse=False), repeat=1)
    same = list(rebuilt.src[2].starts) == list(classifier.src[2].starts) and len(
        set(zip(rebuilt.src[2].classes, classifier.src[2].classes, strict=True))) == rebuilt.src[2].count
    print(f"  the last classifier built from scratch instead: {seconds:.3f} s; "
          f"{'the same classes' if same else 'DIFFERENT CLASSES'}; {describe(rebuilt)}")
    # The whole path: the event applied to the kept topology and its snapshot, the classifier
    # carried over, its packed tables (``impact``, beside it in a reaction, is shown above).
    whole_cpu = [a + b for a, b in zip(cpu["event"], total_cpu, strict=True)]
    mean = statistics.mean(whole_cpu)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{'PASS' if mean < 0.001 else 'FAIL'}  route event to updated classifier < 1 ms on average: "
          f"{mean * 1e3:.3f} ms CPU, {statistics.mean(whole) * 1e3:.3f} ms wall (event and snapshot, "
          f"classifier and packed; load average {load}, {os.cpu_count()} CPUs)")
    unused = replace(before, routes=(*before.routes, Route(ip_network("198.18.0.0/15"), table=100,
                                                           nexthops=(HOPS[1],))))  # fmt: skip
    t, scope = timed(lambda: impact(before, unused, rs))
    print(f"a route in a table no rule reaches (not kept from events): impact {t * 1000:.2f} ms -> "
          f"{scope.describe()} (no dump)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--routes", type=int, default=100_000)
    parser.add_argument("--rules", type=int, default=2_000)
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--no-gc", action="store_true", help="time the events with the garbage collector off")
    parser.add_argument(
        "--corpus", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "corpus"
    )
    args = parser.parse_args(argv)
    corpus(args.corpus)
    rs = big_ruleset(args.rules)
    print(f"generated: {args.rules} NAT rules, {args.routes} routes over 3 uplinks")
    topo = table(args.routes)
    seconds, c = timed(lambda: Classifier.build([topo], [rs], reuse=False), repeat=1)
    print(f"  one snapshot, cold: {seconds:.3f} s; {describe(c)}")
    if args.no_gc:
        gc.disable()
    route_events(topo, rs, args.events)
    return 0


if __name__ == "__main__":
    sys.exit(main())
