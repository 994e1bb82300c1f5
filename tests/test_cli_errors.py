"""Start-up failures end in one line on stderr and exit 1, never a (multi-page) exception group traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from topowatch.errors import NetlinkError, UsageError
from topowatch.netns import Namespace

# The daemon's first snapshot fails inside its nursery (as a kernel refusal or a bug would).
SCRIPT = """
import sys
from topowatch.edges.kernel import KernelBackend
from topowatch.errors import NetlinkError

async def topology(self):
    raise {exc}

KernelBackend.topology = topology
from topowatch.cli import main
sys.exit(main(["run", "--no-dbus", "--rules-dir", sys.argv[1]]))
"""


@pytest.mark.netns
@pytest.mark.parametrize(("exc", "expected"), [
    ("NetlinkError('cannot dump routes: Operation not permitted', 1)", "cannot dump routes: Operation not permitted"),
    ("RuntimeError('wedged')", "unexpected RuntimeError: wedged"),
    ("OSError(24, 'Too many open files')", "Too many open files"),
])
def test_startup_failure_in_the_nursery_is_one_line(netns: Namespace, tmp_path: Path, exc: str,
                                                    expected: str) -> None:
    rules = tmp_path / "rules.d"
    rules.mkdir(mode=0o755)
    proc = subprocess.run(
        ["ip", "netns", "exec", netns.name, sys.executable, "-c", SCRIPT.format(exc=exc), str(rules)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "ExceptionGroup" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"topowatch: error: {expected}"], proc.stderr


def test_exception_groups_report_our_error_first(capsys: pytest.CaptureFixture[str]) -> None:
    from topowatch.cli import _failed

    group = BaseExceptionGroup("x", [ValueError("bug"), ExceptionGroup("y", [UsageError("bad flag")])])
    assert _failed(group, 0) == 2
    assert capsys.readouterr().err == "topowatch: error: bad flag\n"
    assert _failed(NetlinkError("caf\udce9 \x1b[31m\nfake line"), 0) == 1
    assert capsys.readouterr().err == "topowatch: error: caf\\xe9 \\x1b[31m\\x0afake line\n"
    assert _failed(BaseExceptionGroup("z", [KeyboardInterrupt()]), 0) == 130
