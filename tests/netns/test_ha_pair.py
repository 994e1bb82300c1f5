"""An HA gateway pair (keepalived + conntrackd) with topowatch on both nodes, kernel as oracle.

The pair is built once for the module (``hapair``); each test loads one of two
NAT setups on both nodes, starts topowatch on both, and judges what topowatch
did against fresh flows (the oracle): counts of stale, deleted, collateral and
missed entries, printed and asserted.

- SNAT to the WAN virtual address: replicated entries stay valid on the new
  master; only a flow whose binding really changed (a null binding over A's
  transit uplink, SNATed on B) is stale.
- Per-node masquerade: replicated UNREPLIED entries carry the old master's
  address and are stale on the new master; replied ones are stale too but out
  of the default policy's scope (a log-only policy reports them).
"""

from __future__ import annotations

import os
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from hapair import (
    CLIENT,
    DESTINATIONS,
    ECHO,
    FLOWS,
    LONG,
    MONITORING,
    NODES,
    SIP,
    Key,
    Node,
    Pair,
    client_flows,
    conntrackd_conf,
    judge,
    keepalived_conf,
    missing_tools,
    wait,
)

from test_dbus import POLICY_FILE, SYSTEM_CONF, PrivateBus
from topowatch.core.conntrack import Entry
from topowatch.lab import OTHER_SERVER, Daemon, log_record

MISSING = missing_tools()
needs_pair = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

# The daemons' policies: the built-in default (every event, UNREPLIED entries of connectionless
# protocols, flush) with a cap above the test's entry count, and a log-only policy for replied ones.
POLICIES = """\
[policy.default]
max_deletions = 1000

[policy.replied]
unreplied_only = false
action = "log"
"""

RULESETS = {
    "snat-vip": 'oifname "wan0" snat ip to 203.0.113.1',
    "masquerade": 'oifname "wan0" masquerade',
}


def ruleset(rule: str) -> str:
    return (
        "table inet ha {\n    chain postrouting {\n"
        "        type nat hook postrouting priority srcnat; policy accept;\n"
        f"        {rule}\n    }}\n}}\n"
    )


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    bus = PrivateBus(SYSTEM_CONF, policy=str(POLICY_FILE))
    bus.start()
    try:
        with Pair.create({"DBUS_SYSTEM_BUS_ADDRESS": bus.address}) as built:
            yield built
        assert built.leftovers() == []  # no namespace, process or file of the pair is left
    finally:
        bus.close()


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ha-rules")
    directory.chmod(0o755)
    (directory / "50-ha.toml").write_text(POLICIES)
    return directory


@dataclass
class Setup:
    name: str
    pair: Pair
    a: Daemon
    b: Daemon

    def daemon(self, node: Node) -> Daemon:
        return self.a if node is self.pair.a else self.b


def transit_route(pair: Pair) -> None:
    """A reaches the monitoring server over its transit uplink (no NAT there): a null binding."""
    a = pair.a.ns
    a.run("ip", "link", "set", "up1", "up")
    a.run("ip", "route", "replace", f"{OTHER_SERVER}/32", "via", "198.51.100.1", "dev", "up1")


def reset(pair: Pair, rule: str) -> None:
    """A master, the ruleset loaded, empty kernel tables and conntrackd caches on both nodes."""
    if pair.a.state() != "MASTER":
        pair.switch_to(pair.a)
    transit_route(pair)
    for node in pair.nodes:
        node.ns.run("nft", "-f", "-", input="flush ruleset\n" + ruleset(rule))
        node.ns.run("conntrack", "-F", check=False)
        node.conntrackd("-f")
        (node.dir / "hold").unlink(missing_ok=True)
    pair.seen.clear()


@pytest.fixture(params=sorted(RULESETS))
def setup(request: pytest.FixtureRequest, pair: Pair, rules: Path) -> Iterator[Setup]:
    reset(pair, RULESETS[request.param])
    daemons = [pair.watch(node, rules, "--no-startup-sweep") for node in pair.nodes]
    try:
        for daemon in daemons:
            assert daemon.wait_for("D-Bus: serving") is not None, daemon.lines
        yield Setup(request.param, pair, daemons[0], daemons[1])
    finally:
        codes = [daemon.stop() for daemon in daemons]
    assert codes == [0, 0], [d.lines[-5:] for d in daemons]


def reaction(daemon: Daemon, want: str, timeout: float = 20.0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The next reaction whose trigger mentions ``want``, and its per-entry records."""
    record = daemon.wait_record(lambda r: r.get("event") == "reaction" and want in r["trigger"], timeout)
    assert record is not None, daemon.lines[-20:]
    number = record["reaction"]

    def entries() -> list[dict[str, Any]]:
        found = [log_record(line) for line in daemon.lines]
        return [r for r in found if r is not None and r.get("event") == "entry" and r["reaction"] == number]

    end = time.monotonic() + 5
    while len(entries()) < record["stale"] and time.monotonic() < end:
        daemon.wait_for('"event": "entry"', 0.5)
    return record, entries()


def deleted_by(daemon: Daemon) -> int:
    found = [log_record(line) for line in daemon.lines]
    return sum(r["deleted"] for r in found if r is not None and r.get("event") == "reaction")


def oracle(pair: Pair, node: Node, base: int) -> dict[tuple[str, int], str]:
    return {dst: pair.oracle(node, dst[0], dst[1], base + i) for i, dst in enumerate(DESTINATIONS)}


def through_a(pair: Pair) -> dict[Key, Entry]:
    """Every flow once through A (master), and its entries once conntrackd has replicated them to B."""
    pair.send(FLOWS)
    before = client_flows(pair.a.entries())
    assert len(before) == len(FLOWS), before
    wait(lambda: set(before) <= pair.b.external_keys(), 10, "replication to B")
    return before


def first_packets(pair: Pair, expected: dict[tuple[str, int], str], tag: str) -> None:
    """The first packet of each UNREPLIED flow after the change reaches its server as a fresh flow would."""
    flows = [f for f in FLOWS if not f.replied]
    pair.send(flows, tag)
    seen = pair.server_seen([f"{f.name}{tag}" for f in flows])
    wrong = {f.name: seen[f"{f.name}{tag}"] for f in flows if seen[f"{f.name}{tag}"] != expected[(f.dst, f.dport)]}
    assert wrong == {}, (wrong, expected)


@pytest.mark.netns
@needs_pair
def test_master_uplink_change_deletions_leave_the_backups_cache(setup: Setup) -> None:
    # A's transit uplink goes down: the monitoring flows (null bindings) now leave through the NAT
    # uplink. topowatch on A deletes exactly those; conntrackd replicates the deletions, so B's
    # external cache no longer holds them (a failover now would not bring them back).
    pair = setup.pair
    before = through_a(pair)
    try:
        pair.a.ns.run("ip", "link", "set", "up1", "down")
        record, records = reaction(setup.a, "up1")
        expected = oracle(pair, pair.a, 41000)
        counts, stale = judge(before, expected, records)
        print(counts.table(f"{setup.name}: A's transit uplink goes down (on A)"))
        assert stale == {k for k in before if k[1] in {f.sport for f in MONITORING}}
        assert (counts.stale, counts.deleted, counts.collateral, counts.missed) == (len(MONITORING), len(MONITORING), 0, 0)
        assert record["deleted"] == len(MONITORING)
        # The deletions leave B's external cache; the healthy entries stay in it.
        wait(lambda: not stale & pair.b.external_keys(), 10, "deletions replicated to B")
        assert set(before) - stale <= pair.b.external_keys()
        assert set(before) - stale <= set(client_flows(pair.a.entries()))
        first_packets(pair, expected, "+1")
        assert deleted_by(setup.b) == 0
    finally:
        transit_route(pair)


@pytest.mark.netns
@needs_pair
def test_failover_commits_then_judges(setup: Setup) -> None:
    # B becomes master. Its daemon reacts to the virtual addresses arriving before conntrackd has
    # committed (the test holds the notify script back until then): that reaction cannot see the
    # replicated entries. The notify script then commits and asks for a full judgement: one
    # reaction deletes exactly the stale entries.
    pair = setup.pair
    before = through_a(pair)
    hold = pair.b.dir / "hold"
    hold.touch()
    pair.switch_to(pair.b)
    early, _ = reaction(setup.b, "address")
    assert not client_flows(pair.b.entries()), "committed before the hold was released?"
    hold.unlink()
    record, records = reaction(setup.b, "keepalived MASTER")
    committed = client_flows(pair.b.entries())
    expected = oracle(pair, pair.b, 42000)
    counts, stale = judge(before, expected, records)
    print(counts.table(f"{setup.name}: failover A -> B (on B, after the commit)"))
    if setup.name == "snat-vip":
        # Every replicated entry is SNATed to the virtual address, valid on B; only the null
        # bindings over A's transit uplink are SNATed on B now.
        assert {k[1] for k in stale} == {f.sport for f in MONITORING}
        assert counts.replied_stale == 0
    else:
        # Everything carries A's address; the replied ones are out of scope: reported, kept.
        assert {k[1] for k in stale} == {f.sport for f in SIP + MONITORING}
        assert counts.replied_stale == counts.reported == len(ECHO)
        for flow in ECHO:
            kept = [e for k, e in committed.items() if k[1] == flow.sport]
            assert kept and str(kept[0].reply.dst) == "203.0.113.2"
    assert (counts.collateral, counts.missed) == (0, 0)
    assert record["deleted"] == counts.stale  # within one reaction of the commit
    assert early["deleted"] == 0
    for k, e in before.items():
        if k not in stale:
            assert k in committed and committed[k].reply == e.reply, k
    first_packets(pair, expected, "+2")
    assert deleted_by(setup.a) == 0
    assert all(str(e.orig.src) == CLIENT for e in committed.values())


def cpu_seconds(daemon: Daemon) -> float:
    """User plus system time of the daemon so far, all its threads (/proc/PID/stat)."""
    fields = Path(f"/proc/{daemon.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def records(daemon: Daemon, event: str) -> list[dict[str, Any]]:
    found = [log_record(line) for line in daemon.lines]
    return [r for r in found if r is not None and r.get("event") == event]


def when(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(record["ts"]).timestamp()


def drain(daemon: Daemon) -> None:
    """Read what the daemon has logged so far (until it is quiet for half a second)."""
    while daemon.wait_for("", 0.5) is not None:
        pass


def stale_left(pair: Pair, node: Node, expected: dict[tuple[str, int], str]) -> dict[Key, str]:
    """The UNREPLIED entries of the test's flows on ``node`` whose source a fresh flow would not get."""
    return {k: str(e.reply.dst) for k, e in client_flows(node.entries()).items()
            if e.unreplied and str(e.reply.dst) != expected[(k[2], k[3])]}


@pytest.mark.netns
@needs_pair
@pytest.mark.parametrize(
    ("flaps", "judged"),
    [pytest.param(10, True, id="10-judged"), pytest.param(21, False, id="21-storm", marks=LONG)],
)
def test_flapping(setup: Setup, flaps: int, judged: bool) -> None:
    # Failovers back and forth under steady traffic: each as soon as the new master's daemon has
    # judged after its commit (judged), or as soon as VRRP has moved, whatever the daemons and
    # conntrackd are still doing (storm). Each node reacts at most twice per failover (the
    # addresses moving, the notify script's request), its daemon spends less CPU on ten failovers
    # than on its own start (a ratio on one machine: CI's machines differ in speed, not in
    # work; 0.3-0.6 here), and deletes nothing whose source is what a fresh flow gets; after each judgement (judged),
    # or after the last one (storm, ending on B, whose first entries came by commit: A keeps its
    # own), the master's table is what fresh flows show: every flow has its entry, none
    # UNREPLIED with a stale source.
    pair = setup.pair
    expected: dict[str, dict[tuple[str, int], str]] = {}
    starts: list[float] = []
    missed: list[int] = []
    with pair.traffic(FLOWS):
        wait(lambda: len(client_flows(pair.a.entries())) == len(FLOWS), 10, "traffic through A")
        expected["a"] = oracle(pair, pair.a, 43000)
        cpu = {node.name: cpu_seconds(setup.daemon(node)) for node in pair.nodes}
        for flap in range(flaps):
            target = pair.b if flap % 2 == 0 else pair.a
            starts.append(time.time())
            pair.switch_to(target)
            for node in pair.nodes:
                setup.daemon(node).pump()  # unread, its log would fill the pipe and stop it
            if target.name not in expected:
                reaction(setup.daemon(target), "keepalived MASTER")
                expected[target.name] = oracle(pair, target, 44000)
            elif judged:
                reaction(setup.daemon(target), "keepalived MASTER")
            if judged:
                missed.append(len(stale_left(pair, target, expected[target.name])))
        end = time.time()
        final = pair.master()
        # The final master's judgement after its commit, then steady traffic through it.
        while not any(when(r) >= starts[-1] and "keepalived MASTER" in r["trigger"]
                      for r in records(setup.daemon(final), "reaction")):
            assert setup.daemon(final).wait_for('"event": "reaction"', 20) is not None
        time.sleep(1.0)
        table = client_flows(final.entries())
        left = stale_left(pair, final, expected[final.name])
        assert oracle(pair, final, 45000) == expected[final.name]
        for node in pair.nodes:
            drain(setup.daemon(node))
        used = {node.name: cpu_seconds(setup.daemon(node)) for node in pair.nodes}

    lines = [f"\n{setup.name}: {flaps} failovers in {end - starts[0]:.1f} s"]
    for node in pair.nodes:
        daemon = setup.daemon(node)
        reactions = [r for r in records(daemon, "reaction") if when(r) >= starts[0]]
        per_flap = [sum(1 for r in reactions if start <= when(r) < stop)
                    for start, stop in zip(starts, [*starts[1:], float("inf")], strict=True)]
        deleted = [r for r in records(daemon, "entry") if r["action"] == "deleted"]
        # Collateral: an entry deleted although its source is what a fresh flow gets on this node.
        collateral = [r for r in deleted
                      if r["orig"]["src"] != CLIENT
                      or r["reply"]["dst"] == expected[node.name][(r["orig"]["dst"], r["orig"]["dport"])]]
        lines.append(f"  {node.name}: reactions per failover {per_flap}; deleted {len(deleted)}, collateral "
                     f"{len(collateral)}; CPU {used[node.name] - cpu[node.name]:.2f} s while flapping, "
                     f"{used[node.name]:.2f} s since start")
        if judged:
            assert max(per_flap) <= 2, (node.name, per_flap)
        else:  # a reaction may come after the next failover began: counted in all
            assert len(reactions) <= 2 * flaps, (node.name, per_flap)
        assert collateral == [], collateral
        start = cpu[node.name]  # its start, warm-up and first sweep, before the first failover
        assert used[node.name] - start < start * max(1.0, flaps / 10), (node.name, start, used[node.name])
    lines.append(f"  stale left after each judgement: {missed or '-'}; in the final table on {final.name}: "
                 f"{len(left)} of {len(table)} flows")
    print("\n".join(lines))
    assert final is (pair.a if flaps % 2 == 0 else pair.b)
    assert {k[1] for k in table} == {f.sport for f in FLOWS}, "a healthy flow lost its entry"
    assert left == {}
    assert sum(missed) == 0, missed


README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_shows_the_configuration_the_tests_use() -> None:
    # README's "HA pair" section holds node A's files as the tests write them (the directory
    # /run/ha for the pair's private one, contrib's notify script for the tests' wrapper of it).
    readme = README.read_text()
    section = readme[readme.index("## HA pair (keepalived + conntrackd)"):]
    section = section[:section.index("\n## ", 5)]
    node = NODES[0]
    for text in (keepalived_conf(node, "/run/ha", "/usr/lib/topowatch/keepalived-notify"),
                 conntrackd_conf(node, "/run/ha"), *map(ruleset, RULESETS.values()), POLICIES):
        assert "\n\n" + textwrap.indent(text, "    ") + "\n" in section, text
