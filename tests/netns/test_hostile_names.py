"""Bytes that are not UTF-8 and control characters from the kernel: the daemon stays up, logs stay one line.

A real iptables-nft rule with a Latin-1 comment (``caf\\xe9``) once killed
the daemon with a UnicodeDecodeError at start and at every re-read; an
interface named with an ESC sequence reached the log raw.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from topowatch.lab import Daemon
from topowatch.netns import Namespace

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(shutil.which("iptables-nft") is None, reason="needs iptables-nft"),
]

LATIN1_COMMENT = b"caf\xe9"
ESC_NAME = b"e\x1b[31m"


def in_ns(ns: Namespace, *argv: bytes | str) -> subprocess.CompletedProcess[bytes]:
    """A command in ``ns`` with raw bytes for arguments and output (``Namespace.run`` decodes as UTF-8)."""
    return subprocess.run(["ip", "netns", "exec", ns.name, *argv], capture_output=True, check=True, timeout=60)


def test_latin1_comment_and_escape_in_a_name(netns: Namespace, tmp_path: Path) -> None:
    in_ns(netns, "iptables-nft", "-t", "nat", "-A", "POSTROUTING", "-o", "lo", "-m", "comment",
          "--comment", LATIN1_COMMENT, "-j", "MASQUERADE")
    assert LATIN1_COMMENT in in_ns(netns, "iptables-nft-save", "-t", "nat").stdout
    rules = tmp_path / "rules.d"
    rules.mkdir(mode=0o755)

    # The one-off commands read the same ruleset.
    plan = in_ns(netns, sys.executable, "-m", "topowatch", "plan", "--rules-dir", str(rules))
    assert b"examined" in plan.stdout and b"Traceback" not in plan.stderr

    with Daemon(netns, "--no-dbus", "--debounce", "0.05", "--rules-dir", str(rules)) as daemon:
        assert daemon.wait_for("reaction 1 (") is not None, daemon.lines
        # A ruleset change makes it read the table again; an interface with an ESC in its name appears.
        in_ns(netns, "iptables-nft", "-t", "nat", "-A", "POSTROUTING", "-o", "lo", "-m", "comment",
              "--comment", LATIN1_COMMENT + b"2", "-j", "MASQUERADE")
        line = daemon.wait_for("reaction 2 (")
        assert line is not None, daemon.lines
        # Alone in its burst (one link: a TUN device), so the short reaction line names it.
        in_ns(netns, "ip", "tuntap", "add", "name", ESC_NAME, "mode", "tun")
        line = daemon.wait_for("reaction 3 (")
        assert line is not None, daemon.lines
        assert daemon.proc.poll() is None, daemon.lines
        assert daemon.stop() == 0
    text = "\n".join(daemon.lines)
    assert "Traceback" not in text and "UnicodeDecodeError" not in text
    assert not any("\x1b" in line for line in daemon.lines), daemon.lines
    assert "e\\x1b[31m" in text, daemon.lines
