"""Issue #11: the scale of flow classes: build time and class count, and a route event's cost.

Run from the repository: ``.venv/bin/python bench/classes.py [--routes 100000]`` (root only for
the corpus's nft text files, which load in a throwaway namespace; without root they are skipped).

For each corpus ruleset (../shared/corpus/rulesets) and for generated gateways (a large NAT
ruleset; a routing table of ``--routes`` /24 routes over a few uplinks), it prints the classifier's
build time, its address and port classes, and then, on the large table, what a reaction to one
route event costs before it can judge: applying the event to the kept topology, ``impact()``
(whether any flow can change, and which prefixes), and building the joint classifier of the two
snapshots. The classifier is rebuilt per reaction, not updated from the change: this bench says
how far that is from the issue's 1 ms per route event.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from ipaddress import IPv4Address, ip_address, ip_network
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


def table(routes: int) -> Topology:
    base = int(IPv4Address("100.64.0.0"))
    out = [
        Route(ip_network("0.0.0.0/0"), nexthops=(HOPS[0],)),
        Route(ip_network("10.0.0.0/8"), nexthops=(Nexthop(2),)),
    ]
    for i in range(routes):
        out.append(Route(ip_network(f"{IPv4Address(base + i * 256)}/24"), nexthops=(HOPS[i % 3],)))
    return Topology(LINKS, ADDRESSES, tuple(out))


def big_ruleset(rules: int) -> NatRuleset:
    items: list[dict[str, Any]] = [
        {"table": {"family": "ip", "name": "nat", "handle": 1}},
        {"chain": {"family": "ip", "table": "nat", "name": "pre", "handle": 2, "type": "nat",
                   "hook": "prerouting", "prio": -100, "policy": "accept"}},
        {"chain": {"family": "ip", "table": "nat", "name": "post", "handle": 3, "type": "nat",
                   "hook": "postrouting", "prio": 100, "policy": "accept"}},
    ]  # fmt: skip
    for i in range(rules // 2):
        items.append({"rule": {"family": "ip", "table": "nat", "chain": "pre", "handle": 10 + i, "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "up2"}},
            {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 20000 + i}},
            {"dnat": {"addr": f"10.3.{i // 250}.{i % 250 + 1}"}}]}})  # fmt: skip
        items.append({"rule": {"family": "ip", "table": "nat", "chain": "post", "handle": 100000 + i, "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                       "right": {"prefix": {"addr": f"10.2.{i // 4}.{(i % 4) * 64}", "len": 26}}}},
            {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "up2"}},
            {"snat": {"addr": "203.0.113.2"}}]}})  # fmt: skip
    items.append(
        {
            "rule": {
                "family": "ip",
                "table": "nat",
                "chain": "post",
                "handle": 999999,
                "expr": [
                    {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "up2"}},
                    {"masquerade": None},
                ],
            }
        }
    )
    return parse_ruleset_json({"nftables": items})


def timed(fn: Any, repeat: int = 3) -> tuple[float, Any]:
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


def corpus(root: Path) -> None:
    from topowatch.corpus import _NftLoader, corpus_files, format_of

    if os.geteuid() != 0:
        print("corpus: skipped (nft text files load in a namespace: run as root)")
        return
    loader = _NftLoader()
    try:
        for path in corpus_files(root):
            if format_of(path) != "nft" or "rulesets" not in path.parts:
                continue
            doc = loader.load(path)
            if isinstance(doc, str):
                continue
            rs = parse_ruleset_json(doc)
            seconds, c = timed(lambda rs=rs: Classifier.build([table(0)], [rs]))
            print(
                f"  {path.name:<50} {len(list(rs.chains)):>3} chains  {seconds * 1000:7.1f} ms  {describe(c)}"
            )
    finally:
        loader.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--routes", type=int, default=100_000)
    parser.add_argument("--rules", type=int, default=2_000)
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument(
        "--corpus", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "corpus"
    )
    args = parser.parse_args(argv)
    print("corpus rulesets (with a small routing table):")
    corpus(args.corpus)
    rs = big_ruleset(args.rules)
    print(f"generated: {args.rules} NAT rules, {args.routes} routes over 3 uplinks")
    topo = table(args.routes)
    seconds, c = timed(lambda: Classifier.build([topo], [rs]), repeat=1)
    print(f"  one snapshot, cold: {seconds:.3f} s; {describe(c)}")
    live = LiveTopology.seed(topo)
    assert live is not None
    applies, impacts, builds, kinds = [], [], [], []
    before = live.snapshot()
    for i in range(args.events):
        net = ip_network(f"{IPv4Address(int(IPv4Address('100.64.0.0')) + (i * 7919 % args.routes) * 256)}/24")
        route = Route(net, nexthops=(HOPS[(i + 1) % 3],))
        started = time.perf_counter()
        assert live.apply("route", True, route, NLM_F_REPLACE)
        now = live.snapshot()
        applies.append(time.perf_counter() - started)
        t, scope = timed(lambda now=now, before=before: impact(before, now, rs), repeat=1)
        impacts.append(t)
        kinds.append(scope.describe())
        t, _ = timed(lambda now=now, before=before: Classifier.build([before, now], [rs]), repeat=1)
        builds.append(t)
        before = now
    ms = lambda xs: f"mean {statistics.mean(xs) * 1000:.2f} ms, max {max(xs) * 1000:.2f} ms"  # noqa: E731
    print(f"a route event ({args.events} replaces of one /24 to another uplink), on {args.routes} routes:")
    print(f"  kept topology updated: {ms(applies)}")
    print(f"  impact (which flows can change): {ms(applies and impacts)}; e.g. {kinds[0]}")
    print(f"  joint classifier rebuilt (memoized per snapshot): {ms(builds)}")
    print(
        f"{'PASS' if statistics.mean(builds) < 0.001 else 'FAIL'}  route event to updated classifier < 1 ms "
        f"on average (rebuilt, not updated: {statistics.mean(builds) * 1000:.1f} ms)"
    )
    unused = replace(before, routes=(*before.routes, Route(ip_network("198.18.0.0/15"), table=100,
                                                           nexthops=(HOPS[1],))))  # fmt: skip
    t, scope = timed(lambda: impact(before, unused, rs))
    print(f"a route in a table no rule reaches: impact {t * 1000:.2f} ms -> {scope.describe()} (no dump)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
