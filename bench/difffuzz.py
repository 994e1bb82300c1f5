#!/usr/bin/env python3
"""Differential fuzzer: topowatch's ``plan --json`` against the kernel, on generated gateways.

For each seed: build the scenario of ``fuzzgen.generate(seed)`` in three
namespaces of its own (prefix "h8", or ``--prefix``), send one UDP datagram
per flow (nothing answers: every entry stays UNREPLIED), take the gateway's
snapshot (topology and ruleset) as a daemon running there would hold it, apply
the mutations, then send fresh flows with the same source, destination,
protocol, destination port and LAN link from new source ports (several where
the scenario has more than one right answer: address and port ranges, numgen,
multipath). ``topowatch plan --json`` in the gateway namespace is the judge
under test, twice: as it runs beside a daemon (the daemon's snapshot file,
written before the mutations by the daemon's own ``snapshots.SnapshotWriter``
into a state directory of the scenario, while this process holds the
namespace's daemon lock) and with ``--previous none`` (no daemon). Then
each old entry is deleted and its flow sent again from its own port: the
kernel's NAT of that very flow is the oracle (the same multipath and
address-range choices); where a numgen or jhash map makes the choice, or the
old flow gets no entry, the fresh flows' bindings are (membership). Each old
entry is:

- agree: plan calls it stale iff the oracle gives it another binding;
- fp (false positive, a wrong delete): called stale, but the oracle gives it its binding;
- fn (false negative): not called stale, but the oracle gives it another binding;
- undecided: plan could not say;

and, not judged: gone (the kernel deleted it: masquerade on link down or
address removal), no-entry (the old flow never got one: dropped), no-oracle
(the fresh flows got no entry: dropped now), xfrm (an out policy without an SA
selects it: no fresh-flow oracle). Each fresh entry plan judges is counted as
fresh-ok, fresh-undecided or fresh-stale (a wrong delete: it was made under the
current state). Bindings compare by translated address and port on the DNAT
side and by translated address (and whether the port was remapped) on the SNAT
side, since the fresh flow's source port differs.

Usage (as root, from the repository):

    .venv/bin/python bench/difffuzz.py --seeds 0-99 --json out.json
    .venv/bin/python bench/difffuzz.py --seeds 0-1999 --json out.json -q   # the long run
    .venv/bin/python bench/difffuzz.py --seeds 17 --show                   # one seed's script

Exit status 0 when there was no false positive and no fresh-stale verdict in
either judgement, 1 otherwise. Nothing outside the namespaces it creates is touched.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import multiprocessing
import multiprocessing.context
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import fuzzgen  # noqa: E402
from fuzzgen import Flow, Scenario  # noqa: E402

from topowatch import cli  # noqa: E402
from topowatch.core.conntrack import Entry  # noqa: E402
from topowatch.edges.ctnetlink import Conntrack  # noqa: E402
from topowatch.lab import Daemon, log_record  # noqa: E402
from topowatch.netns import Namespace, _setns  # noqa: E402

NETLINK_NETFILTER = 12
SO_BINDTODEVICE = 25
# The namespaces' name prefix (``--prefix``, or DIFFFUZZ_PREFIX for the CI seeds).
PREFIX = os.environ.get("DIFFFUZZ_PREFIX") or "h8"
OLD_PORT = 20000
FRESH_PORT = 30000
# Fresh source ports per flow: FRESH_PORT + STRIDE * flow index + sample.
STRIDE = 20
POLICY = (
    '[policy.difffuzz]\ntriggers = ["route"]\naction = "log"\nfamilies = ["ipv4", "ipv6"]\n'
    "unreplied_only = true\n"
)
# The daemon's policy (``--daemon``): it deletes, as a daemon in service does, so that a reaction
# that judged every entry lets the next one judge only what its change can re-NAT.
DAEMON_POLICY = (
    '[policy.difffuzz]\naction = "flush"\nfamilies = ["ipv4", "ipv6"]\nunreplied_only = true\n'
    "max_deletions = 100000\n"
)
VERDICTS = ("agree", "fp", "fn", "undecided")
UNJUDGED = ("gone", "no_entry", "no_oracle", "xfrm")
FRESH = ("fresh_ok", "fresh_undecided", "fresh_stale")

Binding = tuple[Any, ...]
Key = tuple[int, str, int]  # (source port, original destination, destination port)


@dataclass
class Outcome:
    seed: int
    counts: Counter[str] = field(default_factory=Counter)
    findings: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    undecided_why: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    # The same entries judged by ``plan --previous none`` (no daemon snapshot).
    bare: Outcome | None = None


# -- the kernel side ---------------------------------------------------------------------


def run_script(text: str, names: dict[str, str], *, check: bool = True) -> str:
    """Run a scenario's shell lines; a failing mutation command is part of the scenario (``check=False``)."""
    env = {**os.environ, "CL": names["cl"], "GW": names["gw"], "WAN": names["wan"]}
    proc = subprocess.run(
        ["sh", "-e"] if check else ["sh"], input=text, env=env, capture_output=True, text=True, check=False
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"script failed ({proc.returncode}): {proc.stderr.strip()[-600:]}")
    return proc.stderr


def commands_script(cmds: tuple[fuzzgen.Cmd, ...]) -> str:
    return "\n".join(fuzzgen._shell(c) for c in cmds) + "\n"


def send(ns: Namespace, flows: list[tuple[Flow, int]]) -> None:
    """One datagram per (flow, source port), sent from inside ``ns`` (in this process)."""

    def go() -> None:
        for flow, sport in flows:
            fam = socket.AF_INET if flow.family == 4 else socket.AF_INET6
            s = socket.socket(fam, socket.SOCK_DGRAM)
            try:
                if flow.dev:
                    s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, flow.dev.encode())
                s.bind((flow.src or ("0.0.0.0" if fam == socket.AF_INET else "::"), sport))
                s.sendto(b"difffuzz", (flow.dst, flow.dport))
            except OSError:
                pass  # no route (unreachable, link down): no entry, counted by the caller
            finally:
                s.close()

    ns.call(go)


def settle(gw: Namespace, timeout: float = 3.0) -> None:
    """Until the mutations have taken effect: no IPv6 address still tentative (an address just added
    is not a usable source until the kernel's DAD work has run, even with DAD off)."""
    end = time.monotonic() + timeout
    while gw.run("ip", "-6", "addr", "show", "tentative").strip() and time.monotonic() < end:
        time.sleep(0.02)


def dump(gw: Namespace) -> list[Entry]:
    sock = gw.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    ct = Conntrack(sock)
    try:
        return ct.dump(unreplied_only=False)
    finally:
        ct.close()


def delete(gw: Namespace, entries: list[Entry]) -> None:
    sock = gw.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    ct = Conntrack(sock)
    try:
        ct.delete(entries)
    finally:
        ct.close()


def index(entries: list[Entry]) -> dict[tuple[int, str, int], Entry]:
    """Entries by (source port, original destination, destination port): ports are unique per scenario."""
    return {(e.orig.sport, str(e.orig.dst), e.orig.dport): e for e in entries if e.proto == 17}


def wait_entries(gw: Namespace, keys: set[tuple[int, str, int]], settle: float = 0.2, *,
                 patience: float = 0.0) -> dict[Any, Entry]:  # fmt: skip
    """The gateway's entries once every key has one, or after ``settle`` seconds (some are dropped).

    Two looks 50 ms apart that agree end the wait early, but not before ``patience`` seconds: on a
    loaded machine the gateway's softirq may not have forwarded the last datagrams yet.
    """
    start = time.monotonic()
    end = start + settle
    last: set[Any] | None = None
    while True:
        found = index(dump(gw))
        now = time.monotonic()
        # Done when all are there, or two looks 50 ms apart agree (the rest were dropped).
        if keys <= found.keys() or now >= end or ((found.keys() & keys) == last and now - start >= patience):
            return found
        last = found.keys() & keys
        time.sleep(0.05)


_FORKSERVER: multiprocessing.context.ForkServerContext | None = None


def _plan_child(ns_path: str, argv: list[str], conn: Any) -> None:
    """In a process forked from the fork server: enter the namespace (the whole process: it has one
    thread), run the CLI's ``main``, send back what it printed."""
    with open(ns_path, "rb") as f:
        _setns(f.fileno())
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(argv)
    conn.send((rc, buf.getvalue()))
    conn.close()


def _snapshot_child(ns_path: str, state_dir: str, pid: int, conn: Any) -> None:
    """In a forked process: the namespace's topology and ruleset read as the daemon reads them, and
    written to ``state_dir`` by the daemon's own writer, as a daemon (``pid``) that reacted once
    more after the flows were made (a request: no change) keeps them: current and previous are
    both this state. Sends the file's path."""
    import trio

    from topowatch.edges.kernel import KernelBackend
    from topowatch.snapshots import SnapshotWriter

    with open(ns_path, "rb") as f:
        _setns(f.fileno())

    async def persist() -> str:
        backend = KernelBackend()
        topology, ruleset = await backend.topology(), await backend.ruleset()
        writer = SnapshotWriter.for_namespace(state_dir)
        writer.pid = pid
        writer.t0_moved(topology, ruleset, 0, False)  # at start
        writer.t0_moved(topology, ruleset, 1, True)  # reaction 1, judged with the T0 of the start
        await writer.flush()
        if writer.failures:
            raise RuntimeError(f"writing the snapshot to {writer.path} failed")
        return writer.path

    conn.send(trio.run(persist))
    conn.close()


def _forked(target: Any, *args: Any) -> Any:
    """Run ``target(*args, conn)`` in a process forked from the fork server; what it sent."""
    global _FORKSERVER  # noqa: PLW0603 (one fork server per process, started on first use)
    if _FORKSERVER is None:
        _FORKSERVER = multiprocessing.get_context("forkserver")
        # Everything ``plan`` imports, once (imports are most of a plan's time).
        _FORKSERVER.set_forkserver_preload(
            [
                "difffuzz",
                "topowatch.edges.kernel",
                "topowatch.reactor",
                "topowatch.policy",
                "topowatch.report",
            ]
        )
    parent, child = _FORKSERVER.Pipe(duplex=False)
    proc = _FORKSERVER.Process(target=target, args=(*args, child))
    proc.start()
    child.close()
    try:
        got = parent.recv()
    except EOFError:
        got = None
    proc.join()
    parent.close()
    return got


def snapshot(gw: Namespace, state_dir: str) -> str:
    """The gateway's snapshot file in ``state_dir``, as a daemon running there (this process, which
    holds the namespace's lock: ``daemon_lock``) keeps it; its path."""
    got = _forked(_snapshot_child, gw.path, state_dir, os.getpid())
    if got is None:
        raise RuntimeError("writing the snapshot failed")
    return got  # type: ignore[no-any-return]


def daemon_lock(gw: Namespace) -> socket.socket:
    """The gateway namespace's daemon lock, held by this process (close it to let go): ``plan``
    uses a daemon's snapshot file only while the daemon that wrote it holds the lock."""
    from topowatch import nslock

    return gw.call(nslock.acquire)


def plan(gw: Namespace, rules_dir: str, *, subprocess: bool = False, state_dir: str | None = None,
         previous: str = "auto") -> dict[str, Any]:  # fmt: skip
    """``topowatch plan --json`` in the gateway namespace, a fresh process each time.

    By default forked from a fork server that has imported topowatch once (a
    third of the time of a new interpreter); ``subprocess`` runs the command
    itself. Never in a thread of this process: trio's worker threads outlive
    a ``trio.run`` and would carry a previous namespace into the next plan.
    ``state_dir`` and ``previous``: its ``--state-dir`` and ``--previous``.
    """
    argv = ["plan", "--json", "--rules-dir", rules_dir, "--previous", previous]
    if state_dir is not None:
        argv += ["--state-dir", state_dir]
    if subprocess:
        return json.loads(gw.run(sys.executable, "-m", "topowatch", *argv))  # type: ignore[no-any-return]
    got = _forked(_plan_child, gw.path, argv)
    rc, out = got if got is not None else (None, "")
    if rc != 0:
        raise RuntimeError(f"topowatch plan failed (exit {rc})")
    return json.loads(out)  # type: ignore[no-any-return]


# -- judging -------------------------------------------------------------------------------


def binding(e: Entry) -> Binding:
    """What the entry's NAT did, comparable across source ports."""
    snat = None if e.reply.dst == e.orig.src else str(e.reply.dst)
    remapped = e.reply.dport != e.orig.sport
    dnat = (
        None
        if (e.reply.src == e.orig.dst and e.reply.sport == e.orig.dport)
        else (str(e.reply.src), e.reply.sport)
    )
    return (snat, remapped, dnat)


def same_binding(old: Entry, fresh: Entry) -> bool:
    """Whether the old entry has a binding the fresh flow's NAT admits: the same translated
    addresses and DNAT port; a remapped source port only matters where the fresh flow's was
    remapped too (a port range), since a NAT without one admits any port."""
    o_snat, o_remapped, o_dnat = binding(old)
    f_snat, f_remapped, f_dnat = binding(fresh)
    return o_snat == f_snat and o_dnat == f_dnat and (o_remapped or not f_remapped)


def tuple_key(t: dict[str, Any]) -> tuple[int, str, int]:
    return (t["sport"], str(ip_address(t["dst"])), t["dport"])


def in_expected(fresh: Entry, decision: dict[str, Any]) -> bool:
    """Whether the kernel's fresh binding is one that plan's ``expected`` list admits (its side)."""
    side = decision.get("side")
    if side == "dnat":
        addr, port = str(fresh.reply.src), fresh.reply.sport
        none = fresh.reply.src == fresh.orig.dst and fresh.reply.sport == fresh.orig.dport
    else:
        addr, port = str(fresh.reply.dst), fresh.reply.dport
        none = fresh.reply.dst == fresh.orig.src and fresh.reply.dport == fresh.orig.sport
    for b in decision["expected"]:
        if b["kind"] == "none":
            if none:
                return True
            continue
        if b["addr"] and "-" not in b["addr"] and ip_address(b["addr"]) != ip_address(addr):
            continue
        if b["addr"] and "-" in b["addr"]:
            lo, hi = (ip_address(x) for x in b["addr"].split("-"))
            if not lo <= ip_address(addr) <= hi:
                continue
        ports = b["ports"]
        if ports and not ports[0] <= port <= ports[1] and side == "dnat":
            continue
        return True
    return False


def hints(scn: Scenario, flow: Flow, old: Entry | None) -> list[str]:
    """What about this flow and scenario may explain a disagreement (for grouping by cause)."""
    out = []
    if flow.sender == "cl" and flow.src and flow.dev:
        own = next(n for n in (0, 1) if flow.src.startswith(fuzzgen.lan(flow.family, n)))
        if f"c{own}" != flow.dev:
            out.append("asymmetric ingress")
    if flow.sender == "wan":
        out.append("port forward from an uplink")
    if "late_nat" in scn.features and old is not None and binding(old) == (None, False, None):
        out.append("entry made before NAT was loaded")
    if scn.marks:
        out.append("marks")
    if scn.multi:
        out.append("several right answers")
    out.append(f"rp_filter {scn.rp_mode}, IPv{flow.family}")
    return out


def _ways(reason: str) -> str:
    """What an unknown_ingress reason is unsure of: the input interface (a way that refuses the
    bindings enters elsewhere than every way that gives them) or, on one interface, the path of a
    multipath route or the order of chains at one priority."""
    keep = reason.split(": by ", 1)[-1].split(" it keeps its bindings", 1)[0]
    kept = {label.split(", ", 1)[0] for label in keep.split(" and ", 1)[0].split("; ")}
    risk = re.findall(r"by ([^;]*?) its (?:source|destination) would be", reason.split(", and then ", 1)[-1])
    if any(label.split(", ", 1)[0] not in kept for label in risk):
        return "the input interface"
    return "the path or chain order"


def _why(reason: str) -> str:
    """The last clause of an undecided reason: what could not be predicted (for grouping)."""
    if reason.endswith("which way it came is not known"):
        return ("an old entry's way in or out now refuses its bindings, another gives them "
                f"(unknown_ingress): {_ways(reason)}")
    tail = reason.rsplit(": ", 1)[-1]
    return tail if len(tail) <= 100 else tail[:97] + "..."


def judge(
    scn: Scenario, before: dict[Any, Entry], after: dict[Any, Entry], verdicts: dict[str, Any], samples: int,
    *, exact: dict[Any, Entry] | None = None,
) -> Outcome:
    out = Outcome(scn.seed)
    stale = {tuple_key(d["orig"]): d for d in verdicts["stale"]}
    undecided = {tuple_key(d["orig"]): d for d in verdicts["undecided"]}

    def note(  # noqa: PLR0917
        kind: str,
        flow: Flow,
        old: Entry | None,
        fresh: list[Entry],
        decision: dict[str, Any] | None,
        why: str,
    ) -> None:
        out.findings.append(
            {
                "seed": scn.seed,
                "kind": kind,
                "flow": flow.name,
                "flow_text": f"{flow.sender} {flow.src or '(auto)'} dev {flow.dev or '-'} "
                f"-> {flow.dst}:{flow.dport}",
                "old": old.describe() if old else None,
                "fresh": [f.describe() for f in fresh],
                "reason": decision["reason"] if decision else None,
                "expected": decision["expected"] if decision else None,
                "why": why,
                "hints": hints(scn, flow, old),
            }
        )

    for i, flow in enumerate(scn.flows):
        key = (OLD_PORT + i, flow.dst, flow.dport)
        fresh_keys = [(FRESH_PORT + STRIDE * i + k, flow.dst, flow.dport) for k in range(samples)]
        fresh = [after[k] for k in fresh_keys if k in after]
        called_stale = [after[k] for k in fresh_keys if k in after and k in stale]
        if called_stale:
            k = next(k for k in fresh_keys if k in stale)
            note(
                "fresh_stale",
                flow,
                None,
                called_stale,
                stale[k],
                "entries made under the current state called stale",
            )
        for k in (k for k in fresh_keys if k in after):
            if k in stale:
                out.counts["fresh_stale"] += 1
            elif k in undecided:
                out.counts["fresh_undecided"] += 1
            else:
                out.counts["fresh_ok"] += 1
        if fuzzgen.xfrm_matches(scn, flow):
            out.counts["xfrm"] += 1
            continue
        if key not in before:
            out.counts["no_entry"] += 1
            continue
        if key not in after:
            out.counts["gone"] += 1
            continue
        if not fresh:
            out.counts["no_oracle"] += 1
            continue
        old = after[key]
        again = (exact or {}).get(key)
        if again is not None and not {"numgen", "jhash"} & scn.features:
            # The old flow itself, sent again once its entry was deleted: what it gets now (the same
            # multipath and address-range choices), where nothing random makes the choice (numgen; a
            # jhash whose seed, unless given, is drawn anew when its table is made again).
            truth_stale = not same_binding(old, again)
        else:
            truth_stale = not any(same_binding(old, f) for f in [*fresh, *([again] if again else [])])
        if key in undecided:
            out.counts["undecided"] += 1
            out.undecided_why[_why(undecided[key]["reason"])] += 1
            continue
        called = key in stale
        if called == truth_stale:
            out.counts["agree"] += 1
            out.counts["agree_stale"] += called
            if called and not all(in_expected(f, stale[key]) for f in fresh):
                out.counts["mispredicted"] += 1
                note(
                    "mispredicted",
                    flow,
                    old,
                    fresh,
                    stale[key],
                    "stale, but the kernel's fresh binding is not among the expected ones",
                )
        elif called:
            out.counts["fp"] += 1
            note("fp", flow, old, fresh, stale[key], "called stale, but a fresh flow got the same binding")
        else:
            out.counts["fn"] += 1
            note(
                "fn",
                flow,
                old,
                fresh,
                None,
                "not called stale, but no fresh flow got its binding"
                + (" (several right answers: the samples may have missed it)" if scn.multi else ""),
            )
    return out


# -- one scenario ---------------------------------------------------------------------------


def sample_count(scn: Scenario) -> int:
    """Fresh flows per old one: one where the answer is single; six where it is one of several and
    the old flow itself, sent again, says which (address and port ranges, multipath: the exact
    oracle); sixteen where a numgen or jhash map chooses and only membership can judge (a jhash
    seed is drawn anew when its table is made again): six samples of a two-element map miss one
    element once in 32 (seed 187, a false "fn"), sixteen once in 32,768."""
    if {"numgen", "jhash"} & scn.features:
        return 16
    return 6 if scn.multi else 1


def build(scn: Scenario, created: list[Namespace]) -> tuple[dict[str, Namespace], dict[str, str]]:
    """The scenario's three namespaces (appended to ``created`` as they are made) and its setup."""
    for role in ("cl", "gw", "wan"):
        created.append(Namespace.create(f"{PREFIX}{role}"))
    ns = dict(zip(("cl", "gw", "wan"), created, strict=True))
    names = {role: n.name for role, n in ns.items()}
    run_script(commands_script(scn.setup), names)
    return ns, names


def send_old(scn: Scenario, ns: dict[str, Namespace]) -> tuple[set[Key], dict[Key, Entry]]:
    """One datagram per old flow; its keys, and the gateway's entries once they are there."""
    by_sender: dict[str, list[tuple[Flow, int]]] = {}
    for i, flow in enumerate(scn.flows):
        by_sender.setdefault(flow.sender, []).append((flow, OLD_PORT + i))
    for sender, flows in by_sender.items():
        send(ns[sender], flows)
    old_keys = {(OLD_PORT + i, f.dst, f.dport) for i, f in enumerate(scn.flows)}
    return old_keys, wait_entries(ns["gw"], old_keys)


def mutate(scn: Scenario, ns: dict[str, Namespace], names: dict[str, str]) -> list[str]:
    """The scenario's mutations, until they have taken effect; the kinds of those that failed."""
    failed = [m.kind for m in scn.mutations if run_script(commands_script(m.commands), names, check=False)]
    settle(ns["gw"])
    return failed


def send_fresh(scn: Scenario, ns: dict[str, Namespace], before: dict[Key, Entry], samples: int) -> set[Key]:
    """``samples`` fresh flows per old one, from new source ports; their keys."""
    by_sender: dict[str, list[tuple[Flow, int]]] = {}
    for i, flow in enumerate(scn.flows):
        old = before.get((OLD_PORT + i, flow.dst, flow.dport))
        # The kernel chose the old flow's source (sent from the gateway); the fresh flow has the same.
        same = dataclasses.replace(flow, src=str(old.orig.src)) if flow.src is None and old else flow
        for k in range(samples):
            by_sender.setdefault(flow.sender, []).append((same, FRESH_PORT + STRIDE * i + k))
    for sender, flows in by_sender.items():
        send(ns[sender], flows)
    return {(FRESH_PORT + STRIDE * i + k, f.dst, f.dport)
            for i, f in enumerate(scn.flows) for k in range(samples)}  # fmt: skip


def run_seed(seed: int, rules_dir: str, *, plan_subprocess: bool = False) -> Outcome:
    started = time.monotonic()
    scn = fuzzgen.generate(seed)
    samples = sample_count(scn)
    created: list[Namespace] = []
    lock: socket.socket | None = None
    state_dir = tempfile.mkdtemp(prefix=f"{PREFIX}state")  # mode 0700: trusted by plan
    try:
        ns, names = build(scn, created)
        gw = ns["gw"]
        old_keys, before = send_old(scn, ns)
        lock = daemon_lock(gw)  # this process plays the daemon of the gateway namespace
        # What a daemon running here keeps: its T0 is this state, the one the old flows were made under.
        snapshot(gw, state_dir)
        out_notes = mutate(scn, ns, names)
        fresh_keys = send_fresh(scn, ns, before, samples)
        after = wait_entries(gw, fresh_keys | (old_keys & before.keys()))
        verdicts = plan(gw, rules_dir, subprocess=plan_subprocess, state_dir=state_dir)
        if verdicts.get("previous", {}).get("snapshot") is None:
            raise RuntimeError(f"plan used no daemon snapshot: {verdicts.get('previous')}")
        bare_verdicts = plan(gw, rules_dir, subprocess=plan_subprocess, previous="none")
        # An entry the kernel deleted meanwhile (its masquerade cleanup is asynchronous) is gone.
        remaining = index(dump(gw)).keys()
        after = {k: e for k, e in after.items() if k in remaining}
        exact = resend(gw, ns, scn, after)
        out = judge(scn, before, after, verdicts, samples, exact=exact)
        out.counts.update(f"mutation_failed_{k}" for k in out_notes)
        out.bare = judge(scn, before, after, bare_verdicts, samples, exact=exact)
        for f in out.findings:
            f["view"] = "plan"
        for f in out.bare.findings:
            f["view"] = "plan --previous none"
    except Exception as exc:
        out = Outcome(seed, error=f"{type(exc).__name__}: {exc}")
    finally:
        if lock is not None:
            lock.close()
        for n in created:
            n.delete()
        shutil.rmtree(state_dir, ignore_errors=True)
    out.seconds = time.monotonic() - started
    return out


def _quiet(daemon: Daemon, quiet: float = 1.5, limit: float = 30.0) -> None:
    """Until the daemon has logged nothing for ``quiet`` seconds (its reactions to the mutations
    are done: debounce 0.2 s), or ``limit``."""
    end = time.monotonic() + limit
    while time.monotonic() < end and daemon.wait_for("", quiet) is not None:
        pass


def run_seed_daemon(seed: int, rules_dir: str) -> Outcome:
    """The same scenario judged by ``topowatch run`` as it runs on a gateway.

    The daemon starts after the old flows were made: its startup sweep judges them under the
    state they were made in (an entry it deletes is a wrong delete, counted ``sweep_stale``).
    Then the mutations; the daemon reacts to their events as they come, deleting what it finds
    stale (``DAEMON_POLICY``); once its log is quiet it is stopped. Its per-entry records
    (``-vv --log-format json``) are the verdicts, judged against the kernel as ``plan``'s are:
    a deleted entry's oracle is its own flow sent again, and fresh flows.
    """
    started = time.monotonic()
    scn = fuzzgen.generate(seed)
    samples = sample_count(scn)
    created: list[Namespace] = []
    state_dir = tempfile.mkdtemp(prefix=f"{PREFIX}state")
    try:
        ns, names = build(scn, created)
        gw = ns["gw"]
        old_keys, before = send_old(scn, ns)
        with Daemon(gw, "-vv", "--log-format", "json", "--debounce", "0.2", "--no-dbus", "--rules-dir",
                    rules_dir, "--state-dir", state_dir) as daemon:  # fmt: skip
            sweep = daemon.wait_record(lambda r: r.get("event") == "reaction", timeout=60)
            if sweep is None:
                raise RuntimeError(f"the daemon's startup sweep did not end: {daemon.lines[-5:]}")
            out_notes = mutate(scn, ns, names)
            _quiet(daemon)
            code = daemon.stop()
        records = [r for r in map(log_record, daemon.lines) if r is not None]
        if code != 0:
            raise RuntimeError(f"the daemon failed (exit {code}): {daemon.lines[-5:]}")
        entries = [r for r in records if r.get("event") == "entry"]
        swept = [r for r in entries if r.get("reaction") == sweep["reaction"] and r["action"] == "deleted"]
        later = [r for r in entries if r.get("reaction", 0) > sweep["reaction"]]
        verdicts = {"stale": [r for r in later if r["action"] == "deleted"],
                    "undecided": [r for r in later if r["action"] == "undecided"]}  # fmt: skip
        deleted = {tuple_key(r["orig"]) for r in verdicts["stale"]}
        fresh_keys = send_fresh(scn, ns, before, samples)
        after = wait_entries(gw, fresh_keys | ((old_keys & before.keys()) - deleted))
        remaining = index(dump(gw)).keys()
        after = {k: e for k, e in after.items() if k in remaining}
        # An entry the daemon deleted is judged as it was (its binding is the one it was made with).
        after.update({k: before[k] for k in deleted if k in before})
        exact = resend(gw, ns, scn, after)
        out = judge(scn, before, after, verdicts, samples, exact=exact)
        out.counts.update(f"mutation_failed_{k}" for k in out_notes)
        out.counts["reactions"] = sum(r.get("event") == "reaction" for r in records) - 1
        out.counts["daemon_errors"] = sum(r.get("level") in ("error", "critical") for r in records)
        for r in swept:
            out.counts["sweep_stale"] += 1
            out.findings.append({"seed": seed, "kind": "sweep_stale", "flow": "-",
                                 "flow_text": str(r["orig"]),
                                 "old": None, "fresh": [], "reason": r.get("reason"), "expected": None,
                                 "why": "the startup sweep deleted an entry made under the current state",
                                 "hints": []})  # fmt: skip
        for f in out.findings:
            f["view"] = "daemon"
    except Exception as exc:
        out = Outcome(seed, error=f"{type(exc).__name__}: {exc}")
    finally:
        for n in created:
            n.delete()
        shutil.rmtree(state_dir, ignore_errors=True)
    out.seconds = time.monotonic() - started
    return out


def resend(gw: Namespace, ns: dict[str, Namespace], scn: Scenario, after: dict[Any, Entry]
           ) -> dict[Any, Entry]:  # fmt: skip
    """The exact oracle: each old flow's entry deleted, the flow sent again from its own port.

    The entry the kernel makes is what that very flow gets now: the same
    multipath hash and the same jhash choice as the old entry would meet.
    Entries that could not be deleted (the same id again) are left out.
    """
    olds = {}
    for i, flow in enumerate(scn.flows):
        key = (OLD_PORT + i, flow.dst, flow.dport)
        if key in after:
            olds[key] = (i, flow, after[key])
    delete(gw, [e for _, _, e in olds.values()])
    by_sender: dict[str, list[tuple[Flow, int]]] = {}
    for i, flow, _ in olds.values():
        # As the old flow was sent: a flow of the gateway's own with the source left to the kernel
        # (bound to it, the multipath hash could differ); counted only if it gets the same source.
        by_sender.setdefault(flow.sender, []).append((flow, OLD_PORT + i))
    for sender, flows in by_sender.items():
        send(ns[sender], flows)
    # Every one of these flows had an entry: wait longer for them than for fresh flows, which may be
    # dropped now. Without its entry the exact oracle is lost, and membership over the fresh flows'
    # samples may miss the old flow's path (a false "fn": seed 318 on a loaded machine).
    found = wait_entries(gw, set(olds), settle=1.0, patience=0.3)
    return {k: found[k] for k, (_, _, e) in olds.items()
            if k in found and found[k].id != e.id and found[k].orig.src == e.orig.src}


def parse_seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            seeds.extend(range(int(lo), int(hi) + 1))
        else:
            seeds.append(int(part))
    return seeds


def summary(outcomes: list[Outcome]) -> dict[str, Any]:
    total: Counter[str] = Counter()
    for o in outcomes:
        total.update(o.counts)
    judged = sum(total[k] for k in VERDICTS)
    return {
        "scenarios": len(outcomes),
        "errors": sum(o.error is not None for o in outcomes),
        "counts": {k: total[k] for k in (*VERDICTS, "agree_stale", "mispredicted", *UNJUDGED, *FRESH)},
        "with_oracle": judged,
        "undecided_share": round(total["undecided"] / judged, 4) if judged else 0.0,
        "seconds": round(sum(o.seconds for o in outcomes), 1),
        "undecided_why": dict(sum((o.undecided_why for o in outcomes), Counter()).most_common(12)),
    }


def table(s: dict[str, Any]) -> str:
    c = s["counts"]
    rows = [
        ("scenarios", s["scenarios"]),
        ("errors", s["errors"]),
        ("old entries with an oracle", s["with_oracle"]),
    ]
    names = (*VERDICTS[:1], "agree_stale", *VERDICTS[1:], "mispredicted", *UNJUDGED, *FRESH)
    rows += [(k, c[k]) for k in names]
    rows.append(("undecided share", f"{100 * s['undecided_share']:.1f}%"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    global PREFIX  # noqa: PLW0603 (the command line sets it once, before any seed runs)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0-19", help="seeds: 0-99, 3,7,12 (default 0-19)")
    parser.add_argument("--json", metavar="FILE", help="write the summary, per-seed counts and findings")
    parser.add_argument("--show", action="store_true", help="print each seed's scenario script, run nothing")
    parser.add_argument(
        "--time-limit", type=float, default=0, metavar="S", help="stop starting seeds after S s"
    )
    parser.add_argument(
        "--plan-subprocess",
        action="store_true",
        help="run the topowatch command for each plan (default: its main in-process)",
    )
    parser.add_argument(
        "--daemon",
        action="store_true",
        help="judge with `topowatch run` (its startup sweep, then its reactions to the mutations), not plan",
    )
    parser.add_argument("--prefix", default=PREFIX, help=f"namespace name prefix (default {PREFIX})")
    parser.add_argument("-q", "--quiet", action="store_true", help="one line per seed only when it disagrees")
    args = parser.parse_args(argv)
    seeds = parse_seeds(args.seeds)
    PREFIX = args.prefix
    if args.show:
        for seed in seeds:
            print(fuzzgen.generate(seed).script())
        return 0
    outcomes: list[Outcome] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="h8difffuzz") as tmp:
        rules = Path(tmp) / "rules.d"
        rules.mkdir()
        (rules / "50-difffuzz.toml").write_text(DAEMON_POLICY if args.daemon else POLICY)
        os.chmod(tmp, 0o755)
        for seed in seeds:
            if args.time_limit and time.monotonic() - started > args.time_limit:
                break
            if args.daemon:
                o = run_seed_daemon(seed, str(rules))
            else:
                o = run_seed(seed, str(rules), plan_subprocess=args.plan_subprocess)
            outcomes.append(o)
            report(o, quiet=args.quiet)
    s = summary(outcomes)
    s["wall_seconds"] = round(time.monotonic() - started, 1)
    bare = [o.bare or Outcome(o.seed, error=o.error) for o in outcomes]
    sb = summary(bare)
    print(f"\ndifffuzz: {len(outcomes)} scenarios in {s['wall_seconds']} s")
    bad_seeds: set[int] = set()
    views = (
        [("topowatch run (its startup sweep, then its reactions to the mutations)", s, outcomes)]
        if args.daemon
        else [("plan (beside a daemon: its snapshot file, from before the mutations)", s, outcomes),
              ("plan --previous none (no daemon snapshot)", sb, bare)]
    )  # fmt: skip
    if args.daemon:
        total: Counter[str] = sum((o.counts for o in outcomes), Counter())
        print(f"  reactions to the mutations {total['reactions']}, entries the sweep deleted "
              f"{total['sweep_stale']}, error records {total['daemon_errors']}")
    for title, summ, outs in views:
        print(f"{title}:")
        print(table(summ))
        bad = sorted({f["seed"] for o in outs for f in o.findings
                      if f["kind"] in ("fp", "fresh_stale", "sweep_stale")})  # fmt: skip
        fn_seeds = sorted({f["seed"] for o in outs for f in o.findings if f["kind"] == "fn"})
        bad_seeds.update(bad)
        if summ["undecided_why"]:
            print("  undecided, by what could not be predicted:")
            for why, n in summ["undecided_why"].items():
                print(f"    {n:6d}  {why}")
        if bad:
            print(f"  seeds with wrong deletes (fp, fresh_stale): {bad}")
        if fn_seeds:
            print(f"  seeds with false negatives: {fn_seeds}")
    print("  reproduce one: bench/difffuzz.py --seeds N --show (script), --seeds N (run)")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "summary": s,
                    "no_snapshot_summary": sb,
                    "seeds": [
                        {
                            "seed": o.seed,
                            "counts": dict(o.counts),
                            "no_snapshot_counts": dict(o.bare.counts) if o.bare else {},
                            "error": o.error,
                            "seconds": round(o.seconds, 2),
                        }
                        for o in outcomes
                    ],
                    "findings": [f for o in (*outcomes, *bare) for f in o.findings],
                },
                indent=1,
            )
        )
    return 1 if bad_seeds or s["errors"] else 0


def report(o: Outcome, *, quiet: bool) -> None:
    """A seed's line and its findings (with ``quiet``, only where a view disagrees)."""
    daemon = "reactions" in o.counts  # set by every daemon run that ran
    views = [("plan", o), ("none", o.bare)] if o.bare is not None else [("daemon" if daemon else "plan", o)]
    wrong = ("fp", "fn", "fresh_stale", "sweep_stale")
    bad = o.error or any(f["kind"] in wrong for _, v in views for f in v.findings)
    extra = ("reactions", "sweep_stale", "daemon_errors") if daemon else ()
    if not quiet or bad:
        line = f"ERROR {o.error}" if o.error else "; ".join(
            f"{name} " + " ".join(f"{k}={v.counts[k]}" for k in (*VERDICTS, *FRESH, *extra) if v.counts[k])
            for name, v in views)
        print(f"seed {o.seed}: {line} ({o.seconds:.1f} s)", flush=True)
    for name, v in views:
        for f in v.findings:
            if f["kind"] in wrong or not quiet:
                print(
                    f"  {name} {f['kind']}: {f['flow']} {f['flow_text']}\n    old   {f['old']}\n"
                    f"    fresh {f['fresh']}\n    plan  {f['reason']}",
                    flush=True,
                )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
