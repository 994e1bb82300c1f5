"""The CLI's contract with a person: one clear line and the right exit status, never a traceback."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from topowatch.lab import Daemon
from topowatch.netns import Namespace

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "topowatch", *args],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )


def assert_one_line(proc: subprocess.CompletedProcess[str]) -> str:
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr
    assert len(err.splitlines()) == 1, proc.stderr
    return err


@pytest.mark.parametrize(
    "args",
    [
        ("run", "--debounce", "soon"),
        ("run", "--debounce", "-1"),
        ("run", "--max-deletions", "many"),
        ("flush", "--bogus"),
        ("plan", "-p", "bogus"),  # filters are checked before anything is read (plan deletes nothing)
        ("plan", "-s", "10.0.0.300"),
        ("plan", "--mark", "3/1"),
        ("plan", "--zone", "70000"),
        ("plan", "--json", "--json-lines"),
        ("frobnicate",),
        (),
    ],
)
def test_usage_errors_exit_2(args: tuple[str, ...]) -> None:
    proc = run(*args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "error" in proc.stderr


def test_help_lists_commands() -> None:
    proc = run("--help")
    assert proc.returncode == 0
    for command in ("run", "plan", "flush", "lab"):
        assert command in proc.stdout


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
@pytest.mark.parametrize("command", ["plan", "flush", "run", "lab"])
def test_not_root_is_one_line(command: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = run(command, env=env, prefix=("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"))
    assert proc.returncode == 1
    err = assert_one_line(proc)
    assert "needs root" in err


@pytest.mark.netns
def test_nft_missing_is_one_line(netns: Namespace, tmp_path: Path) -> None:
    # A PATH with python but without nft: the ruleset cannot be read.
    (tmp_path / "ip").symlink_to(shutil.which("ip") or "/usr/sbin/ip")
    env = {"PATH": str(tmp_path), "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        ["ip", "netns", "exec", netns.name, sys.executable, "-m", "topowatch", "plan"],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )
    assert proc.returncode == 1
    err = assert_one_line(proc)
    assert "nft" in err


@pytest.mark.netns
def test_plan_in_empty_namespace(netns: Namespace) -> None:
    """A namespace with no NAT at all: nothing examined, nothing stale, exit 0."""
    out = netns.run(sys.executable, "-m", "topowatch", "plan", "--json")
    doc = json.loads(out)
    assert doc["entries_examined"] == 0
    assert doc["stale"] == [] and doc["undecided"] == []


def test_check_valid_and_invalid(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.mkdir(mode=0o755)
    (good / "50-x.toml").write_text('[policy.x]\nprotocols = ["udp"]\n')
    (good / "50-x.toml").chmod(0o644)
    proc = run("check", "--rules-dir", str(good))
    assert proc.returncode == 0, proc.stderr
    assert "[policy.x]" in proc.stdout
    bad = tmp_path / "bad"
    bad.mkdir(mode=0o755)
    (bad / "50-y.toml").write_text('[policy.y]\nprotocls = ["udp"]\n')
    (bad / "50-y.toml").chmod(0o644)
    proc = run("check", "--rules-dir", str(bad))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "50-y.toml:2" in proc.stderr and "protocls" in proc.stderr


# -- issue 14: the CLI as conntrack-tools and systemctl users expect ----------------------------

SCHEMA = json.loads((ROOT / "src" / "topowatch" / "schema" / "plan.schema.json").read_text())
NAT = """table ip nat {
    chain post {
        type nat hook postrouting priority 100;
        oifname "up1" masquerade
    }
}
"""


def _send(sources: tuple[str, ...]) -> None:
    import socket

    for src in sources:
        for port in (5060, 5061):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((src, port))
            s.sendto(b"x", ("192.0.2.10", 5060))
            s.close()
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        t.setblocking(False)
        t.bind((src, 4000))
        with contextlib.suppress(BlockingIOError):
            t.connect(("192.0.2.10", 80))  # SYN_SENT: UNREPLIED tcp, which no default policy admits
        t.close()


@pytest.fixture
def stale_ns() -> Iterator[Namespace]:
    """One namespace, its own flows leaving unNATed via up0; then the default moves to up1 (masquerade).

    Left: 4 stale udp entries (10.0.1.2 and 10.0.2.2, ports 5060 and 5061) and 2 UNREPLIED tcp ones.
    """
    ns = Namespace.create("h6c")
    try:
        ns.run("ip", "link", "set", "lo", "up")
        for link, addrs in (("lan0", ("10.0.1.2/24", "10.0.2.2/24")), ("up0", ("198.51.100.2/24",)),
                            ("up1", ("203.0.113.2/24",))):
            ns.run("ip", "link", "add", link, "type", "veth", "peer", "name", link + "p")
            ns.run("ip", "link", "set", link, "up")
            ns.run("ip", "link", "set", link + "p", "up")
            for addr in addrs:
                ns.run("ip", "addr", "add", addr, "dev", link)
        ns.run("ip", "route", "add", "default", "via", "198.51.100.1", "dev", "up0")
        ns.run("nft", "-f", "-", input=NAT)
        ns.call(lambda: _send(("10.0.1.2", "10.0.2.2")))
        ns.run("ip", "route", "replace", "default", "via", "203.0.113.1", "dev", "up1")
        yield ns
    finally:
        ns.delete()


def in_ns(ns: Namespace, *args: str, stderr: int = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns.name, sys.executable, "-m", "topowatch", *args],
                          stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=60, check=False)


def plan_json(ns: Namespace, *args: str) -> dict[str, object]:
    proc = in_ns(ns, "plan", "--json", *args)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    jsonschema.validate(doc, SCHEMA)
    return doc


def rules_dir(text: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix="h6rules"))
    d.chmod(0o755)
    (d / "50-x.toml").write_text(text)
    (d / "50-x.toml").chmod(0o644)
    return d


@pytest.mark.netns
def test_filters_narrow_like_conntrack(stale_ns: Namespace) -> None:
    def stale(*args: str) -> list[tuple[str, int]]:
        return sorted((d["orig"]["src"], d["orig"]["sport"]) for d in plan_json(stale_ns, *args)["stale"])

    everything = stale()
    assert everything == [("10.0.1.2", 5060), ("10.0.1.2", 5061), ("10.0.2.2", 5060), ("10.0.2.2", 5061)]
    assert stale("-s", "10.0.2.0/24") == [("10.0.2.2", 5060), ("10.0.2.2", 5061)]
    assert stale("--src", "10.0.1.2") == [("10.0.1.2", 5060), ("10.0.1.2", 5061)]
    assert stale("-d", "192.0.2.0/24", "-p", "udp") == everything
    assert stale("-d", "198.51.100.0/24") == []
    assert stale("--family", "ipv6") == []
    assert stale("--family", "ipv4", "--zone", "0", "--mark", "0/0xff") == everything
    assert stale("--zone", "1") == [] and stale("--mark", "1") == []
    doc = plan_json(stale_ns, "-s", "10.0.2.0/24")
    assert doc["filters"] == {"src": "10.0.2.0/24"}


@pytest.mark.netns
def test_a_filter_never_widens_the_policy(stale_ns: Namespace) -> None:
    # The UNREPLIED tcp entries are stale too: a policy that admits tcp finds them ...
    with_tcp = rules_dir('[policy.x]\nprotocols = ["udp", "tcp"]\n')
    assert len(plan_json(stale_ns, "--rules-dir", str(with_tcp), "-p", "tcp")["stale"]) == 2
    # ... but -p tcp cannot make them eligible under the default policy, which excludes tcp.
    doc = plan_json(stale_ns, "-p", "tcp")
    assert doc["stale"] == [] and doc["eligible"] == 0
    # Nor can a filter reach entries a policy's prefix excludes.
    only_1 = rules_dir('[policy.x]\nsources = ["10.0.1.0/24"]\n')
    assert plan_json(stale_ns, "--rules-dir", str(only_1), "-s", "10.0.2.0/24")["stale"] == []


@pytest.mark.netns
def test_summary_limit_and_json_lines(stale_ns: Namespace) -> None:
    doc = plan_json(stale_ns, "--limit", "1")
    assert len(doc["stale"]) == 1 and doc["stale_count"] == 4 and doc["truncated"] is True
    assert doc["stale_by_code"] == {"null_binding_now_nat": 4}
    assert doc["stale"][0]["code"] == "null_binding_now_nat"
    why = doc["stale"][0]["why"]  # the reason's fields (schema-checked by plan_json)
    assert why["code"] == "null_binding_now_nat" and why["expected"] == doc["stale"][0]["expected"]
    named = [r for r in why["rules"] if "chain" in r]  # the rule read from the kernel, by chain and handle
    assert named and all(r["handle"] and r["chain"].startswith("table ") and r["rule"] in r["text"] for r in named)
    assert plan_json(stale_ns)["truncated"] is False
    summary = plan_json(stale_ns, "--summary")
    assert summary["stale"] == [] and summary["stale_count"] == 4
    text = in_ns(stale_ns, "plan", "--summary")
    assert text.returncode == 0 and "4 stale null_binding_now_nat" in text.stdout
    assert "10.0.1.2" not in text.stdout
    limited = in_ns(stale_ns, "plan", "--limit", "2")
    assert limited.stdout.count("  STALE ") == 2 and "and 2 more stale" in limited.stdout
    lines = in_ns(stale_ns, "plan", "--json-lines", "--limit", "3")
    records = [json.loads(line) for line in lines.stdout.splitlines()]
    assert [r["record"] for r in records] == ["stale", "stale", "stale", "summary"]
    assert records[-1]["stale_count"] == 4 and records[-1]["truncated"] is True
    jsonschema.validate(records[-1], {"$defs": SCHEMA["$defs"], "$ref": "#/$defs/jsonl_summary"})
    for r in records[:-1]:
        jsonschema.validate({"entries_examined": 0, "stale": [r], "undecided": [], "elapsed_ms": 0}, SCHEMA)


@pytest.mark.netns
def test_plan_exit_code_and_flush_prints_each_entry_once(stale_ns: Namespace) -> None:
    assert in_ns(stale_ns, "plan").returncode == 0  # opt-in only
    assert in_ns(stale_ns, "plan", "--exit-code", "-s", "10.0.9.0/24").returncode == 0
    assert in_ns(stale_ns, "plan", "--exit-code").returncode == 4
    flushed = in_ns(stale_ns, "flush", stderr=subprocess.STDOUT)  # as on a terminal: both streams
    assert flushed.returncode == 0, flushed.stdout
    for src in ("10.0.1.2:5060 ->", "10.0.1.2:5061 ->", "10.0.2.2:5060 ->", "10.0.2.2:5061 ->"):
        assert flushed.stdout.count(src) == 1, flushed.stdout
    assert "deleted 4 entries" in flushed.stdout
    assert in_ns(stale_ns, "plan", "--exit-code").returncode == 0


@pytest.mark.netns
def test_flush_json_log_has_a_record_per_deletion(stale_ns: Namespace) -> None:
    proc = in_ns(stale_ns, "flush", "--json", "--log-format", "json", "-s", "10.0.1.0/24")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["deleted"] == 2
    records = [json.loads(line) for line in proc.stderr.splitlines()]
    deleted = [r for r in records if r.get("event") == "entry"]
    assert len(deleted) == 2 and {r["action"] for r in deleted} == {"deleted"}
    assert {r["code"] for r in deleted} == {"null_binding_now_nat"}


def test_sigpipe_is_quiet(tmp_path: Path) -> None:
    """``topowatch check | head -1``: the reader is gone before the first write."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "topowatch", "check", "--rules-dir", str(ROOT / "rules.d")],
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=60, check=False)
    finally:
        os.close(write)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode == -signal.SIGPIPE


@pytest.mark.netns
def test_plan_into_a_closed_pipe_is_quiet(stale_ns: Namespace) -> None:
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run(["ip", "netns", "exec", stale_ns.name, sys.executable, "-m", "topowatch", "plan"],
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=60, check=False)
    finally:
        os.close(write)
    assert proc.stderr == "", proc.stderr


@pytest.mark.netns
@pytest.mark.parametrize("command", ["check", "plan", "flush", "run"])
def test_missing_rules_dir_is_an_error(command: str, tmp_path: Path, netns: Namespace) -> None:
    # In a namespace of its own: were the check missing, a daemon must not judge the host's table.
    proc = in_ns(netns, command, "--rules-dir", str(tmp_path / "nowhere"))
    assert proc.returncode == 2
    assert assert_one_line(proc) == f"topowatch: error: --rules-dir {tmp_path / 'nowhere'}: no such directory"


def test_global_options_after_the_command(tmp_path: Path) -> None:
    from topowatch.cli import build_parser

    args = build_parser().parse_args(["-v", "check", "-v", "-q", "--log-format", "json"])
    assert (args.verbose, args.sub_verbose, args.sub_quiet, args.sub_log_format) == (1, 1, True, "json")
    good = rules_dir('[policy.x]\nprotocols = ["udp"]\n')
    proc = run("check", "--rules-dir", str(good), "-vv", "--log-format", "json", "-q")
    assert proc.returncode == 0, proc.stderr
    assert run("plan", "--log-format", "yaml").returncode == 2


def test_check_says_what_each_shipped_policy_may_delete() -> None:
    proc = run("check", "--rules-dir", str(ROOT / "rules.d"))
    assert proc.returncode == 0, proc.stderr
    said = proc.stdout.split("# what these policies may delete:\n", 1)[1]
    for name in ("uplink", "ipsec", "route", "address", "ruleset"):
        assert f"#   policy {name} (on " in said
        assert "deletes UNREPLIED entries of connectionless protocols (not tcp, sctp, dccp)" in said
    assert "only while the kernel refuses new flows, replied (assured, possibly live) udp entries" in said
    assert "never replied tcp, sctp or dccp" in said
    doc = json.loads(run("check", "--rules-dir", str(ROOT / "rules.d"), "--json").stdout)
    assert doc["valid"] is True and doc["pressure"]["evict_replied"] == ["udp"]
    assert any("possibly live" in line for line in doc["may_delete"])
    assert doc["policies"]["uplink"]["triggers"] == ["link", "networkmanager", "dispatcher"]
    bad = rules_dir('[policy.y]\nprotocls = ["udp"]\n')
    proc = run("check", "--rules-dir", str(bad), "--json")
    assert proc.returncode == 1 and json.loads(proc.stdout)["valid"] is False


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_check_as_a_user_treats_unreadable_run_dir_as_absent() -> None:
    top = Path(tempfile.mkdtemp(prefix="h6check"))
    top.chmod(0o755)
    locked = top / "run"
    (locked / "rules.d").mkdir(parents=True)
    locked.chmod(0o700)  # as /run/topowatch: root only
    good = rules_dir('[policy.x]\nprotocols = ["udp"]\n')
    code = ("import sys, topowatch.policy as p; "
            f"p.DEFAULT_DIRS = ({str(locked / 'rules.d')!r}, {str(good)!r}); sys.exit(p.check_main(None))")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=60, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "[policy.x]" in proc.stdout


@pytest.mark.netns
def test_one_daemon_per_namespace() -> None:
    from topowatch.nslock import AlreadyRunning, acquire

    a, b = Namespace.create("h6la"), Namespace.create("h6lb")
    try:
        held = a.call(acquire)
        with pytest.raises(AlreadyRunning, match=r"another topowatch daemon runs in this network namespace \(pid "):
            a.call(acquire)
        other = b.call(acquire)  # another namespace: its own lock
        other.close()
        held.close()
        a.call(acquire).close()  # released with the socket (and with the process, whatever kills it)
    finally:
        a.delete()
        b.delete()


@pytest.mark.netns
def test_second_daemon_in_a_namespace_refuses_to_start(tmp_path: Path) -> None:
    rules = rules_dir('[policy.x]\nprotocols = ["udp"]\n')
    args = ("--no-dbus", "--no-startup-sweep", "--rules-dir", str(rules), "--state-dir", str(tmp_path))
    a, b = Namespace.create("h6da"), Namespace.create("h6db")
    try:
        with Daemon(a, *args) as first, Daemon(b, *args) as elsewhere:
            assert first.wait_for("ready") is not None, first.lines
            assert elsewhere.wait_for("ready") is not None, elsewhere.lines  # one per namespace: fine
            second = subprocess.run(["ip", "netns", "exec", a.name, sys.executable, "-m", "topowatch", "run", *args],
                                    capture_output=True, text=True, timeout=60, check=False)
            assert second.returncode == 1
            err = assert_one_line(second)
            assert err.startswith("topowatch: error: another topowatch daemon runs in this network namespace")
            assert f"(pid {first.proc.pid})" in err or "(pid " in err
            assert first.proc.poll() is None
    finally:
        a.delete()
        b.delete()
