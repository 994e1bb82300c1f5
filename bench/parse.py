"""Issue #13 item 8: reading a large ruleset costs no more than the tool that prints it.

Run as root from the repository: ``.venv/bin/python bench/parse.py [--rules 5000,50000]``.

For each size and shape, a ruleset is loaded into a throwaway namespace and
printed by the tool topowatch reads it with; then topowatch's reader parses
that very output in a fresh process. Printed side by side: the tool's CPU
(user + system), wall time and peak RSS, and topowatch's CPU, wall time and
RSS growth (peak minus what the process held before parsing: the text
itself, read and decoded, is counted), with their ratios (topowatch / tool).
The target: topowatch's CPU at most the tool's (ratio <= 1.00).

Shapes (``--shapes``):
- ``nat``: every rule a NAT rule (DNAT port forwards, per-host SNAT,
  masquerade), read from ``nft -j list ruleset``: every rule is parsed.
- ``gateway``: half NAT rules, half a forward filter table (per-host
  accepts and drops), from ``nft -j list ruleset``: the filter half is
  decoded, not parsed (no rule in it sets a mark).
- ``iptables``: the NAT rules through ``iptables-nft-restore``, read from
  ``iptables-nft-save -t nat`` by ``iptables.parse_save``.

``--daemon`` also runs ``topowatch run --no-dbus`` (a log-only policy of
its own) in the namespace of each nft shape and prints, from its JSON log
records and ``/proc``: the seconds from start to "ready" (its first ruleset
read included) and to the end of its startup sweep, then, after one rule is
added (a new nftables generation), the reaction that reads the ruleset again
(its ``ruleset`` phase and its whole latency), and the daemon's RSS and peak
RSS (VmRSS, VmHWM) after each.

``--reference`` adds the reference reader (``json.loads`` and
``nft.parse_ruleset_json`` with the garbage collector on, which is what the
daemon did before), for comparison. Machine load changes every number: the
1-minute load average is printed first, and each measurement is the
median of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from topowatch.netns import Namespace

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: the text as the daemon gets it (bytes, decoded), then the parse.
CHILD = r"""
import gc, json, resource, sys, time
kind, path = sys.argv[1], sys.argv[2]
from topowatch.text import decode
if kind == "iptables":
    from topowatch.edges.iptables import parse_save
    from topowatch.edges.bulkparse import gc_paused
    def parse(text):
        with gc_paused():
            return sum(len(c.rules) for c in parse_save(text, family="ip").ruleset.chains)
elif kind == "reference":
    from topowatch.edges.nft import parse_ruleset_json
    parse = lambda text: sum(len(c.rules) for c in parse_ruleset_json(json.loads(text)).chains)
else:
    from topowatch.edges.nft import parse_ruleset_output
    parse = lambda text: sum(len(c.rules) for c in parse_ruleset_output(text, timeout=None).chains)
data = open(path, "rb").read()
gc.collect()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cpu, wall = time.process_time(), time.perf_counter()
rules = parse(decode(data))
cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"cpu": cpu, "wall": wall, "before_kb": before, "peak_kb": peak, "rules": rules}))
"""


def nft_script(rules: int, shape: str) -> str:
    """``nft -f`` input: ``rules`` rules in the given shape (a gateway's NAT, and its filter table)."""
    nat = rules if shape in ("nat", "iptables") else rules // 2
    out = ["flush ruleset", "table ip nat {",
           "  chain pre { type nat hook prerouting priority -100; policy accept; }",
           "  chain post { type nat hook postrouting priority 100; policy accept; }", "}"]
    out += (f"add rule ip nat {chain} {body}" for chain, body in nat_rules(nat))
    if shape == "gateway":
        out += ["table inet filter {",
                "  chain forward_rules { type filter hook forward priority 0; policy drop; }", "}"]
        for i in range(rules - nat):
            a, b = divmod(i, 250)
            host = f"10.{a // 250}.{a % 250}.{b + 1}"
            v6 = f"2001:db8:{a:x}::{b + 1:x}"
            body = (f"ip saddr {host} tcp dport 22 ct state new counter accept" if i % 3 == 0 else
                    f"ip6 daddr {v6} udp dport {1000 + i % 5000} accept" if i % 3 == 1 else
                    f'iifname "lan{i % 8}" oifname "wan{i % 3}" ip daddr {host} counter drop')
            out.append(f"add rule inet filter forward_rules {body}")
    return "\n".join(out) + "\n"


def nat_rules(n: int) -> list[tuple[str, str]]:
    out = []
    for i in range(n):
        a, b = divmod(i, 250)
        if i % 2 == 0:
            out.append(("pre", f'iifname "wan{i % 3}" tcp dport {1024 + i % 60000} counter '
                               f'dnat to 10.{1 + a // 250}.{a % 250}.{b + 1}:{80 + i % 3} comment "fwd {i}"'))
        elif i % 10 == 1:
            out.append(("post", f'oifname "wan{i % 3}" ip saddr 10.64.{a % 250}.0/24 counter masquerade'))
        else:
            host = f"10.{100 + a // 250}.{a % 250}.{b + 1}"
            out.append(("post", f'ip saddr {host} oifname "wan{i % 3}" counter '
                                f"snat to 203.0.{113 + i % 3}.{1 + i % 250}"))
    return out


def iptables_restore(rules: int) -> str:
    out = ["*nat", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
           ":POSTROUTING ACCEPT [0:0]"]
    for i in range(rules):
        a, b = divmod(i, 250)
        if i % 2 == 0:
            to = f"10.{1 + a // 250}.{a % 250}.{b + 1}:{80 + i % 3}"
            out.append(f'-A PREROUTING -i wan{i % 3} -p tcp -m tcp --dport {1024 + i % 60000} -m comment '
                       f'--comment "fwd {i}" -j DNAT --to-destination {to}')
        elif i % 10 == 1:
            out.append(f"-A POSTROUTING -s 10.64.{a % 250}.0/24 -o wan{i % 3} -j MASQUERADE")
        else:
            out.append(f"-A POSTROUTING -s 10.{100 + a // 250}.{a % 250}.{b + 1}/32 -o wan{i % 3} "
                       f"-j SNAT --to-source 203.0.{113 + i % 3}.{1 + i % 250}")
    return "\n".join([*out, "COMMIT"]) + "\n"


POLICY = """\
# bench/parse.py: every trigger, nothing deleted.
[policy.bench]
action = "log"
"""


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def daemon_run(ns: Namespace, tmp: str) -> dict[str, object]:
    """The daemon's start, startup sweep and one ruleset re-read on this namespace's ruleset."""
    from topowatch.lab import Daemon

    rules = Path(tmp, "rules.d")
    rules.mkdir(mode=0o755)
    (rules / "50-bench.toml").write_text(POLICY)
    (rules / "50-bench.toml").chmod(0o644)
    out: dict[str, object] = {}
    start = time.monotonic()
    with Daemon(ns, "--no-dbus", "--rules-dir", str(rules), "--debounce", "0.05", "--max-wait", "0.2",
                "--log-format", "json") as daemon:
        if daemon.wait_for("ready", 600) is None:
            raise SystemExit("topowatch did not become ready:\n" + "\n".join(daemon.lines[-20:]))
        out["ready_s"] = time.monotonic() - start
        sweep = daemon.wait_record(lambda rec: rec.get("event") == "reaction", 600)
        out["sweep_s"] = time.monotonic() - start
        out["rss_mb"], out["hwm_mb"] = rss_mb(daemon.proc.pid)
        if sweep is None:
            raise SystemExit("no startup sweep:\n" + "\n".join(daemon.lines[-20:]))
        ns.run("nft", "add", "rule", "ip", "nat", "post", "oifname", "bench9", "masquerade")
        again = daemon.wait_record(lambda rec: rec.get("event") == "reaction", 600)
        if again is None:
            raise SystemExit("no reaction to the ruleset change:\n" + "\n".join(daemon.lines[-20:]))
        out["reread_ruleset_s"] = float(again.get("timings", {}).get("ruleset", float("nan"))) / 1000
        out["reread_reaction_s"] = float(again.get("latency_ms", float("nan"))) / 1000
        phases = again.get("timings", {})
        out["reread_phases"] = ", ".join(f"{k} {v / 1000:.2f} s" for k, v in phases.items())
        out["rss_after_mb"], out["hwm_after_mb"] = rss_mb(daemon.proc.pid)
    return out


@dataclass
class Run:
    cpu: float
    wall: float
    rss_mb: float  # the tool: its peak RSS; topowatch: the growth of its peak while parsing


def tool_run(ns: Namespace, argv: list[str], out: Path) -> Run:
    """The tool's stdout into ``out``; its CPU, wall time and peak RSS (wait4's rusage)."""
    with out.open("wb") as sink:
        start = time.perf_counter()
        proc = subprocess.Popen(["ip", "netns", "exec", ns.name, *argv], stdout=sink, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {proc.stderr.read().decode() if proc.stderr else ''}")
    # ``ip netns exec`` execs the tool: the rusage is the tool's.
    return Run(usage.ru_utime + usage.ru_stime, wall, usage.ru_maxrss / 1024)


def parse_run(kind: str, path: Path) -> tuple[Run, int]:
    proc = subprocess.run([sys.executable, "-c", CHILD, kind, str(path)], capture_output=True, text=True,
                          check=False, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"the parse failed:\n{proc.stderr}")
    got = json.loads(proc.stdout)
    return Run(got["cpu"], got["wall"], (got["peak_kb"] - got["before_kb"]) / 1024), int(got["rules"])


def median(runs: list[Run]) -> Run:
    return Run(statistics.median(r.cpu for r in runs), statistics.median(r.wall for r in runs),
               statistics.median(r.rss_mb for r in runs))


def measure(shape: str, rules: int, args: argparse.Namespace) -> dict[str, object]:
    repeat, prefix, reference, daemon = args.repeat, args.prefix, args.reference, args.daemon
    with Namespace.create(prefix) as ns, tempfile.TemporaryDirectory(prefix="twbparse") as tmp:
        out = Path(tmp) / "out"
        start = time.perf_counter()
        if shape == "iptables":
            proc = subprocess.run(["ip", "netns", "exec", ns.name, "iptables-nft-restore"],
                                  input=iptables_restore(rules), text=True, capture_output=True, check=False)
            argv = ["iptables-nft-save", "-t", "nat"]
        else:
            proc = subprocess.run(["ip", "netns", "exec", ns.name, "nft", "-f", "-"],
                                  input=nft_script(rules, shape), text=True, capture_output=True, check=False)
            argv = ["nft", "-j", "list", "ruleset"]
        if proc.returncode != 0:
            raise SystemExit(f"loading the {shape} ruleset failed: {proc.stderr[:500]}")
        load = time.perf_counter() - start
        tools, ours, refs = [], [], []
        parsed = 0
        for _ in range(repeat):
            tools.append(tool_run(ns, argv, out))
            run, parsed = parse_run("iptables" if shape == "iptables" else "fast", out)
            ours.append(run)
            if reference and shape != "iptables":
                refs.append(parse_run("reference", out)[0])
        size = out.stat().st_size
        run_daemon = daemon_run(ns, tmp) if daemon and shape != "iptables" else None
    tool, mine = median(tools), median(ours)
    result: dict[str, object] = {
        "shape": shape, "rules": rules, "load_s": round(load, 2), "bytes": size, "rules_parsed": parsed,
        "tool": " ".join(argv), "tool_run": asdict(tool), "topowatch": asdict(mine),
        "cpu_ratio": mine.cpu / tool.cpu, "wall_ratio": mine.wall / tool.wall,
        "rss_ratio": mine.rss_mb / tool.rss_mb,
    }
    if refs:
        result["reference"] = asdict(median(refs))
    if run_daemon is not None:
        result["daemon"] = run_daemon
    return result


def show(r: dict[str, object]) -> None:
    tool, mine = r["tool_run"], r["topowatch"]
    assert isinstance(tool, dict) and isinstance(mine, dict)
    print(f"{r['shape']:8} {r['rules']:>7,} rules  {r['bytes'] / 1e6:6.1f} MB  "
          f"tool {tool['cpu']:6.2f} s CPU {tool['wall']:6.2f} s wall {tool['rss_mb']:6.0f} MB | "
          f"topowatch {mine['cpu']:6.2f} s CPU {mine['wall']:6.2f} s wall +{mine['rss_mb']:4.0f} MB | "
          f"ratio CPU {r['cpu_ratio']:.2f} wall {r['wall_ratio']:.2f} RSS {r['rss_ratio']:.2f}", flush=True)
    ref = r.get("reference")
    if isinstance(ref, dict):
        print(f"{'':8} {'':>7}        {'':6}     reference reader (json.loads, collector on): "
              f"{ref['cpu']:6.2f} s CPU {ref['wall']:6.2f} s wall +{ref['rss_mb']:4.0f} MB "
              f"(CPU ratio {ref['cpu'] / tool['cpu']:.2f})", flush=True)
    d = r.get("daemon")
    if isinstance(d, dict):
        print(f"{'':8} {'':>7}        {'':6}     daemon: ready {d['ready_s']:.1f} s, startup sweep done "
              f"{d['sweep_s']:.1f} s, RSS {d['rss_mb']:.0f} MB (peak {d['hwm_mb']:.0f}); a rule added: "
              f"ruleset read {d['reread_ruleset_s']:.2f} s, reaction {d['reread_reaction_s']:.2f} s, "
              f"RSS {d['rss_after_mb']:.0f} MB (peak {d['hwm_after_mb']:.0f})", flush=True)
        print(f"{'':8} {'':>7}        {'':6}     that reaction's phases: {d['reread_phases']}", flush=True)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rules", default="5000,50000", help="ruleset sizes, comma-separated")
    parser.add_argument("--shapes", default="nat,gateway,iptables", help="nat, gateway, iptables")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (the median is shown)")
    parser.add_argument("--reference", action="store_true", help="also time the reference reader")
    parser.add_argument("--daemon", action="store_true", help="also run the daemon on each nft ruleset")
    parser.add_argument("--prefix", default="twbparse", help="name prefix of the namespaces created")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/parse.py needs root (it loads rulesets into a namespace)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    print(f"load average (1 min): {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs", flush=True)
    results = []
    for rules in (int(n) for n in args.rules.split(",")):
        for shape in args.shapes.split(","):
            result = measure(shape, rules, args)
            show(result)
            results.append(result)
    worst = max(float(str(r["cpu_ratio"])) for r in results)
    verdict = "PASS" if worst <= 1.0 else "FAIL"
    print(f"{verdict}  topowatch's CPU at most the tool's (worst ratio {worst:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if worst <= 1.0 else 1


if __name__ == "__main__":
    signal.signal(signal.SIGINT, _terminate)
    sys.exit(main())
