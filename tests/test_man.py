"""The man pages match the code: regenerated from the parser and the policy schema, they equal the
committed files; every command, option and policy key is in them; groff reads them without warnings;
the wheel installs them, with the shipped policies, the unit, the bus policy and the hooks."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from topowatch.cli import build_parser
from topowatch.policy import KEYS, PRESSURE_KEYS

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
    pressure = text.split(".SH PRESSURE\n", 1)[1].split("\n.SH ", 1)[0]
    for key in PRESSURE_KEYS:
        assert f"\\fB{key}\\fR" in pressure, key


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff not installed")
@pytest.mark.parametrize("page", PAGES)
def test_groff_reads_without_warnings(page: str) -> None:
    proc = subprocess.run(["groff", "-man", "-ww", "-z", str(ROOT / "man" / page)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0
    assert proc.stderr == ""


# Where each shipped file lands under the install prefix (/usr: where systemd, dbus-daemon,
# NetworkManager, man and topowatch's own policy loader look).
INSTALLED = {
    "man/topowatch.8": "share/man/man8/topowatch.8",
    "man/topowatch.rules.d.5": "share/man/man5/topowatch.rules.d.5",
    **{f"rules.d/{p.name}": f"lib/topowatch/rules.d/{p.name}"
       for p in sorted((ROOT / "rules.d").glob("*.toml"))},
    "rules.d/README.md": "lib/topowatch/rules.d/README.md",
    "contrib/topowatch.service": "lib/systemd/system/topowatch.service",
    "contrib/topowatch@.service": "lib/systemd/system/topowatch@.service",
    "contrib/lib/hook-lib.sh": "lib/topowatch/hook-lib.sh",
    "contrib/dbus/io.github.topowatch.conf": "share/dbus-1/system.d/io.github.topowatch.conf",
    "contrib/networkmanager/90-topowatch": "lib/NetworkManager/dispatcher.d/90-topowatch",
    "contrib/strongswan/topowatch-updown": "lib/topowatch/strongswan-updown",
    "contrib/vpn/topowatch-vpn": "lib/topowatch/vpn-hook",
    "contrib/ppp/ip-up.d/topowatch": "lib/topowatch/ppp/ip-up.d/topowatch",
    "contrib/ppp/ip-down.d/topowatch": "lib/topowatch/ppp/ip-down.d/topowatch",
    "contrib/keepalived/topowatch-notify": "lib/topowatch/keepalived-notify",
}
EXECUTABLE = {"contrib/networkmanager/90-topowatch", "contrib/strongswan/topowatch-updown", "contrib/vpn/topowatch-vpn",
              "contrib/ppp/ip-up.d/topowatch", "contrib/ppp/ip-down.d/topowatch",
              "contrib/keepalived/topowatch-notify"}


@pytest.mark.slow
def test_the_wheel_installs_the_pages(tmp_path: Path) -> None:
    # Built as pip builds it for an install; hatchling comes with the test extra, so no network.
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--no-index", "--disable-pip-version-check", "-q", "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("topowatch-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        data = {}
        for info in archive.infolist():
            _, sep, rest = info.filename.partition(".data/data/")
            if sep:
                data[rest] = info
        assert sorted(data) == sorted(INSTALLED.values())
        for source, target in INSTALLED.items():
            assert archive.read(data[target]) == (ROOT / source).read_bytes(), source
            mode = data[target].external_attr >> 16
            # pip keeps the executable bit of a file the wheel marks so: the hooks must run as installed.
            assert bool(mode & 0o111) == (source in EXECUTABLE), (source, oct(mode))
        assert "topowatch/cli.py" in archive.namelist()
