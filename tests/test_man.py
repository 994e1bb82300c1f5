"""The man pages match the code: regenerated from the parser and the policy schema, they equal the
committed files; every command, option and policy key is in them; groff reads them without warnings;
the wheel installs them."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from topowatch.cli import build_parser
from topowatch.policy import KEYS

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("topowatch.8", "topowatch.rules.d.5")


def test_committed_pages_match_the_code(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts/genman.py"), "--out", str(tmp_path)], check=True)
    for page in PAGES:
        committed = ROOT / "man" / page
        assert committed.exists(), f"man/{page} missing: run python scripts/genman.py"
        assert (tmp_path / page).read_text() == committed.read_text(), (
            f"man/{page} is out of date: run python scripts/genman.py and commit the result"
        )


def test_check_mode_reports_a_stale_page(tmp_path: Path) -> None:
    for page in PAGES:
        (tmp_path / page).write_text("stale\n")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/genman.py"), "--check", "--out", str(tmp_path)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert "out of date" in proc.stderr


def _all_options(parser: argparse.ArgumentParser) -> set[str]:
    found: set[str] = set()
    for action in parser._actions:
        found.update(o for o in action.option_strings if o not in ("-h", "--help"))
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.add(name)
                found |= _all_options(sub)
    return found


def test_every_command_and_option_is_documented() -> None:
    text = (ROOT / "man/topowatch.8").read_text()
    for word in _all_options(build_parser()):
        assert word.replace("-", "\\-") in text, word


def test_every_policy_key_is_documented() -> None:
    text = (ROOT / "man/topowatch.rules.d.5").read_text()
    for key in KEYS:
        assert f"\\fB{key}\\fR" in text, key


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff not installed")
@pytest.mark.parametrize("page", PAGES)
def test_groff_reads_without_warnings(page: str) -> None:
    proc = subprocess.run(["groff", "-man", "-ww", "-z", str(ROOT / "man" / page)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0
    assert proc.stderr == ""


def test_the_wheel_installs_the_pages() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    shared = config["tool"]["hatch"]["build"]["targets"]["wheel"]["shared-data"]
    assert shared["man/topowatch.8"] == "share/man/man8/topowatch.8"
    assert shared["man/topowatch.rules.d.5"] == "share/man/man5/topowatch.rules.d.5"
