"""Issue #15: an HA pair's failover at 100k replicated entries: topowatch beside conntrackd's commit.

Run as root from the repository: ``.venv/bin/python bench/ha.py [--entries 100000]``.

The pair of ``tests/netns/hapair.py`` (keepalived + conntrackd, contrib's
notify script, everything in namespaces this script creates and removes)
with per-node masquerade: node A's table gets ``--entries`` UNREPLIED UDP
entries masqueraded to A's address (inserted through ctnetlink, as if
forwarded from the LAN), conntrackd replicates them into B's external cache,
then B becomes master. On B the notify script commits them into the kernel
table (each still carrying A's address: stale there) and then asks topowatch
for a full judgement, which deletes them.

Printed side by side: how long conntrackd's commit took (its own log), and
the time from the failover (the priority files written) to B's last stale
delete (the deleting reaction's JSON record, logged when its deletes are
done), with each of B's reactions since the failover. Then what is left:
stale entries on B (must be 0) and entries topowatch deleted that were not
the replicated ones (collateral, must be 0). A report, not a timed test.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import socket
import sys
import tempfile
import threading
import time
from datetime import datetime
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests" / "netns"), str(ROOT / "tests")]

from hapair import Pair, wait  # noqa: E402

from test_dbus import POLICY_FILE, SYSTEM_CONF, PrivateBus  # noqa: E402
from topowatch.core.conntrack import (  # noqa: E402
    IPS_CONFIRMED,
    IPS_DST_NAT_DONE,
    IPS_SRC_NAT,
    IPS_SRC_NAT_DONE,
    CtTuple,
    Entry,
)
from topowatch.edges.ctnetlink import Conntrack  # noqa: E402
from topowatch.lab import NETLINK_NETFILTER, SIP_SERVER, Daemon, log_record  # noqa: E402

RULESET = """\
table inet ha {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan0" masquerade
    }
}
"""
A_WAN = "203.0.113.2"


def replicated(n: int) -> list[Entry]:
    """``n`` UNREPLIED entries from LAN hosts 10.0.1.10.. to the SIP server's ports 5060-5069,
    masqueraded to A's address (each to a port of its own, as masquerade picks them)."""
    hosts, ports = 240, 10
    out = []
    for i in range(n):
        src = IPv4Address("10.0.1.10") + i % hosts
        sport, dport, mapped = 20000 + i // hosts, 5060 + i % ports, 10000 + i // ports
        out.append(Entry(
            family=socket.AF_INET, proto=17,
            orig=CtTuple(src, IPv4Address(SIP_SERVER), sport, dport),
            reply=CtTuple(IPv4Address(SIP_SERVER), IPv4Address(A_WAN), dport, mapped),
            status=IPS_CONFIRMED | IPS_SRC_NAT | IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE,
            timeout=900,
        ))
    return out


def stale_on(pair: Pair) -> int:
    """Entries on B still carrying A's address (what the commit brought and topowatch must delete)."""
    ct = Conntrack(pair.b.ns.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER))
    try:
        return sum(1 for e in ct.dump(unreplied_only=False) if str(e.reply.dst) == A_WAN)
    finally:
        ct.close()


def commit_log(pair: Pair) -> list[str]:
    text = (pair.b.dir / "conntrackd.log").read_text(errors="replace")
    return [line.split("] ", 2)[-1] for line in text.splitlines() if "ommit" in line]


def run(n: int) -> int:
    bus = PrivateBus(SYSTEM_CONF, policy=str(POLICY_FILE))
    bus.start()
    rules = Path(tempfile.mkdtemp(prefix="thha-rules-"))
    try:
        rules.chmod(0o755)
        (rules / "50-ha.toml").write_text(f"[policy.default]\nmax_deletions = {2 * n}\n")
        with Pair.create({"DBUS_SYSTEM_BUS_ADDRESS": bus.address}) as pair:
            for node in pair.nodes:
                node.ns.run("nft", "-f", "-", input=RULESET)
            daemons = {node.name: pair.watch(node, rules, "--no-startup-sweep") for node in pair.nodes}
            try:
                for daemon in daemons.values():
                    assert daemon.wait_for("D-Bus: serving") is not None, daemon.lines
                return measure(pair, daemons["b"], n)
            finally:
                for daemon in daemons.values():
                    daemon.stop()
    finally:
        bus.close()
        for path in rules.iterdir():
            path.unlink()
        rules.rmdir()


def measure(pair: Pair, daemon: Daemon, n: int) -> int:
    print(f"HA pair, per-node masquerade: {n:,} UNREPLIED entries on A, replicated by conntrackd (FTFW)")
    started = time.monotonic()
    ct = Conntrack(pair.a.ns.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER))
    try:
        created = ct.create(replicated(n))
    finally:
        ct.close()
    wait(lambda: pair.b.external_count() >= n, 300, f"{n} entries in B's external cache")
    print(f"  inserted on A and replicated into B's external cache in {time.monotonic() - started:.1f} s "
          f"({created:,} created)")
    failover = time.time()
    pair.switch_to(pair.b, timeout=60)
    master = time.time() - failover
    # B's reactions up to the one the notify script asked for after the commit (each record is
    # logged once its deletes are done; a reaction to the addresses may have run mid-commit), and
    # the per-entry records that follow each. A thread reads the daemon's log as fast as it comes:
    # a slow reader would stop the daemon at its next write and delay its next reaction.
    reactions: list[dict[str, Any]] = []
    deleted: set[tuple[str, int]] = set()
    tail = Tail(daemon)
    end = time.monotonic() + 900
    while not any("keepalived MASTER" in r["trigger"] for r in reactions) and time.monotonic() < end:
        tail.records(reactions, deleted, 1.0)
    if not any("keepalived MASTER" in r["trigger"] for r in reactions):
        print("  B's daemon did not react to the notify script's request", file=sys.stderr)
        return 1
    while tail.records(reactions, deleted, 2.0):
        pass
    left = stale_on(pair)
    collateral = len(deleted - {(str(e.orig.src), e.orig.sport) for e in replicated(n)})
    commits = commit_log(pair)
    took = next((c.split()[-2] for c in reversed(commits) if "has taken" in c), "?")
    committed = next((c for c in reversed(commits) if c.startswith("Committed")), "?")

    print(f"  failover -> B master (VRRP, notify script started):  {master:7.2f} s")
    seconds = f"{float(took):7.2f}" if took != "?" else "      ?"
    print(f"  conntrackd's commit on B:                             {seconds} s   ({committed})")
    for r in reactions:
        at = datetime.fromisoformat(r["ts"]).timestamp() - failover
        print(f"  failover -> reaction {r['reaction']} logged:                      {at:7.2f} s   "
              f"({r['trigger'][:48]}: {r['stale']:,} stale, {r['deleted']:,} deleted, "
              f"{r['latency_ms'] / 1000:.2f} s from first event to last delete)")
        phases = ", ".join(f"{k} {v / 1000:.2f}" for k, v in r["timings"].items() if v >= 1)
        print(f"      phases (s): debounce {r['debounce_ms'] / 1000:.2f}, {phases}")
    deleting = [r for r in reactions if r["deleted"]] or reactions
    last = datetime.fromisoformat(deleting[-1]["ts"]).timestamp() - failover
    print(f"  failover -> last stale delete on B:                   {last:7.2f} s")
    print(f"  stale left on B: {left:,}; deleted {len(deleted):,}, collateral {collateral:,}")
    return 0 if left == 0 and collateral == 0 and len(deleted) == n else 1


class Tail:
    """The daemon's log (stderr), read by a thread of its own as fast as it is written."""

    def __init__(self, daemon: Daemon) -> None:
        assert daemon.proc.stderr is not None
        self.fd = daemon.proc.stderr.fileno()
        self.chunks: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self.partial = b""
        threading.Thread(target=self._read, name="tail", daemon=True).start()

    def _read(self) -> None:
        with contextlib.suppress(OSError):
            while chunk := os.read(self.fd, 1 << 20):
                self.chunks.put(chunk)

    def records(self, reactions: list[dict[str, Any]], deleted: set[tuple[str, int]], timeout: float) -> bool:
        """Sort what came in ``timeout`` into reactions and deleted entries; False when nothing came."""
        try:
            data = self.partial + self.chunks.get(timeout=timeout)
        except queue.Empty:
            return False
        *lines, self.partial = data.split(b"\n")
        for line in lines:
            if b'"event": "reaction"' in line or b'"action": "deleted"' in line:
                record = log_record(line.decode(errors="replace"))
                if record is None:
                    continue
                if record.get("event") == "reaction":
                    reactions.append(record)
                elif record.get("event") == "entry":
                    deleted.add((record["orig"]["src"], record["orig"]["sport"]))
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--entries", type=int, default=100_000, help="replicated entries (default 100000)")
    args = parser.parse_args(argv)
    return run(args.entries)


if __name__ == "__main__":
    sys.exit(main())
