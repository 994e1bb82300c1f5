"""The CLI's contract with a person: one clear line and the right exit status, never a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
    import json

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
