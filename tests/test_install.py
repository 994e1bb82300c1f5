"""Installed where it is read: the shipped policies of any install prefix, the units, doctor's check.

Each install is a directory tree of its own (``root``): a virtualenv, pip as
root to /usr/local, a distribution package in /usr. Nothing is installed on
the host.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from topowatch import doctor, installcheck, policy

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "contrib/topowatch.service"
TEMPLATE = ROOT / "contrib/topowatch@.service"
SHIPPED = {  # source file -> where the wheel puts it under its prefix
    "contrib/topowatch.service": "lib/systemd/system/topowatch.service",
    "contrib/topowatch@.service": "lib/systemd/system/topowatch@.service",
    "contrib/dbus/io.github.topowatch.conf": "share/dbus-1/system.d/io.github.topowatch.conf",
    "contrib/networkmanager/90-topowatch": "lib/NetworkManager/dispatcher.d/90-topowatch",
}


def install(root: Path, prefix: str) -> None:
    """What pip does with the wheel's shared data and script under ``prefix``."""
    for src, dest in SHIPPED.items():
        target = root / prefix.lstrip("/") / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / src, target)
    script = root / prefix.lstrip("/") / "bin/topowatch"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)


# -- shipped policies ------------------------------------------------------------------------


def test_shipped_policies_of_a_virtualenv_are_searched(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Installed into a virtualenv, rules.d landed under it and was never read: the shipped policies
    # were silently inactive and the built-in default applied.
    venv = tmp_path / "venv"
    (venv / "lib/topowatch").mkdir(parents=True)
    shutil.copytree(ROOT / "rules.d", venv / "lib/topowatch/rules.d")
    monkeypatch.setattr(sys, "prefix", str(venv))
    monkeypatch.setattr(sysconfig, "get_path", lambda name: str(venv))
    dirs = policy.installed_dirs()
    assert dirs == (str(venv / "lib/topowatch/rules.d"),)
    loaded = policy.load_policies((*policy.SYSTEM_DIRS, *dirs))
    names = {p.name for p in loaded.policies}
    assert {"uplink", "ipsec", "route", "address", "ruleset"} <= names
    assert policy.DEFAULT_DIRS[: len(policy.SYSTEM_DIRS)] == policy.SYSTEM_DIRS  # /etc and /run still win


@pytest.mark.parametrize("prefix", ["/usr", "/usr/local"])
def test_system_prefixes_add_no_directory(monkeypatch: pytest.MonkeyPatch, prefix: str) -> None:
    monkeypatch.setattr(sys, "prefix", prefix)
    monkeypatch.setattr(sysconfig, "get_path", lambda name: prefix)
    assert policy.installed_dirs() == ()


# -- the units --------------------------------------------------------------------------------


def _service(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(f"{section}{key}", []).append(value)
    return settings


def test_units_take_options_from_the_environment_file() -> None:
    for unit in (UNIT, TEMPLATE):
        s = _service(unit)
        assert s["[Service]EnvironmentFile"] == ["-/etc/default/topowatch"]
        assert s["[Service]ExecStart"] == ["topowatch run $TOPOWATCH_OPTIONS"]


def test_template_is_the_unit_in_a_named_namespace() -> None:
    unit, template = _service(UNIT), _service(TEMPLATE)
    assert template.pop("[Service]NetworkNamespacePath") == ["/run/netns/%i"]
    assert "%i" in template.pop("[Unit]Description")[0]
    unit.pop("[Unit]Description")
    assert template == unit  # every hardening setting, the watchdog, the environment file


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
HOST_UNITS = next((d for d in ("/usr/lib/systemd/system", "/lib/systemd/system") if os.path.isdir(d)), None)


def verify(root: Path, *units: str) -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify inside ``root``, with the host's units (targets) copied into it."""
    units_dir = root / "usr/lib/systemd/system"
    units_dir.mkdir(parents=True, exist_ok=True)
    assert HOST_UNITS is not None
    for unit in Path(HOST_UNITS).iterdir():
        if unit.suffix == ".target" and not (units_dir / unit.name).exists():
            shutil.copy(unit, units_dir / unit.name, follow_symlinks=False)
    kill = root / "usr/bin/kill"
    kill.parent.mkdir(parents=True, exist_ok=True)
    if not kill.exists():
        kill.write_text("#!/bin/sh\n")
        kill.chmod(0o755)
    return subprocess.run([str(SYSTEMD_ANALYZE), "verify", "--man=no", f"--root={root}", *units],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.skipif(SYSTEMD_ANALYZE is None or HOST_UNITS is None, reason="needs systemd-analyze (apt-get install systemd)")
def test_units_verify_where_pip_as_root_installs_them(tmp_path: Path) -> None:
    # pip as root: /usr/local/bin/topowatch and /usr/local/lib/systemd/system, both read by systemd.
    install(tmp_path, "/usr/local")
    proc = verify(tmp_path, "topowatch.service", "topowatch@lab.service")
    assert proc.returncode == 0, proc.stderr
    # The unit used to name /usr/bin/topowatch, which pip never installs: systemd said so.
    (tmp_path / "usr/local/bin/topowatch").unlink()
    proc = verify(tmp_path, "topowatch.service")
    assert proc.returncode != 0
    assert "topowatch is not executable" in proc.stderr


# -- doctor: shipped files where their consumer looks ---------------------------------------------


def test_pip_as_root_misplaces_the_bus_policy_and_the_dispatcher_hook(tmp_path: Path) -> None:
    install(tmp_path, "/usr/local")
    problems = installcheck.check(["/usr/local"], "/usr/local/bin/topowatch", root=str(tmp_path))
    by_path = {p.path: p for p in problems}
    assert sorted(by_path) == ["/usr/local/lib/NetworkManager/dispatcher.d/90-topowatch",
                               "/usr/local/share/dbus-1/system.d/io.github.topowatch.conf"]
    dbus = by_path["/usr/local/share/dbus-1/system.d/io.github.topowatch.conf"]
    assert "dbus-daemon does not look" in dbus.problem
    assert dbus.fix == ("install -o root -g root -m 0644 /usr/local/share/dbus-1/system.d/io.github.topowatch.conf "
                        "/etc/dbus-1/system.d/io.github.topowatch.conf && systemctl reload dbus")
    nm = by_path["/usr/local/lib/NetworkManager/dispatcher.d/90-topowatch"]
    assert nm.fix == ("ln -s /usr/local/lib/NetworkManager/dispatcher.d/90-topowatch "
                      "/etc/NetworkManager/dispatcher.d/90-topowatch")
    # Each fix, done: nothing left to report.
    for p in problems:
        dest = tmp_path / p.fix.split(" && ")[0].split()[-1].lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / p.path.lstrip("/"), dest)
    assert installcheck.check(["/usr/local"], "/usr/local/bin/topowatch", root=str(tmp_path)) == []


def test_a_virtualenv_misplaces_everything_and_the_unit_fix_names_its_binary(tmp_path: Path) -> None:
    venv = "/opt/tw/venv"
    install(tmp_path, venv)
    problems = installcheck.check([venv], f"{venv}/bin/topowatch", root=str(tmp_path))
    assert sorted(p.path.removeprefix(venv + "/") for p in problems) == sorted(SHIPPED.values())
    unit = next(p for p in problems if p.path.endswith("/topowatch.service"))
    assert unit.fix == (f"sed 's|^ExecStart=topowatch |ExecStart={venv}/bin/topowatch |' "
                        f"{venv}/lib/systemd/system/topowatch.service > /etc/systemd/system/topowatch.service"
                        " && systemctl daemon-reload")
    # The admin copied the unit as shipped: systemd reads it, but cannot find a bare `topowatch`.
    etc = tmp_path / "etc/systemd/system"
    etc.mkdir(parents=True)
    shutil.copy(UNIT, etc / "topowatch.service")
    problems = installcheck.check([venv], f"{venv}/bin/topowatch", root=str(tmp_path))
    (exec_problem,) = [p for p in problems if p.path == "/etc/systemd/system/topowatch.service"]
    assert "ExecStart names topowatch, which is not an executable" in exec_problem.problem
    assert exec_problem.fix == (f"sed 's|^ExecStart=topowatch |ExecStart={venv}/bin/topowatch |' -i "
                                "/etc/systemd/system/topowatch.service && systemctl daemon-reload")
    subprocess.run(["sh", "-c", exec_problem.fix.split(" && ")[0].replace(" /etc/", f" {tmp_path}/etc/")],
                   check=True)
    assert f"ExecStart={venv}/bin/topowatch run" in (etc / "topowatch.service").read_text()
    assert not [p for p in installcheck.check([venv], f"{venv}/bin/topowatch", root=str(tmp_path))
                if p.path.startswith("/etc/systemd")]


def test_a_distribution_package_in_usr_is_fine(tmp_path: Path) -> None:
    install(tmp_path, "/usr")
    assert installcheck.check(["/usr"], "/usr/bin/topowatch", root=str(tmp_path)) == []


def test_doctor_reports_each_misplaced_file_with_its_fix() -> None:
    found = [installcheck.Misplaced("/usr/local/share/dbus-1/system.d/x.conf", "not read", "install ...")]
    (finding,) = doctor._install(lambda: found)
    assert finding.status is doctor.Status.WARNING
    assert finding.detail == "/usr/local/share/dbus-1/system.d/x.conf: not read"
    assert finding.consequence == "fix: install ..."
    (ok,) = doctor._install(list)
    assert ok.status is doctor.Status.OK


# -- the build honours the builder's compiler and flags ------------------------------------------


def test_compile_command_takes_cc_and_flags_from_the_builder() -> None:
    sys.path.insert(0, str(ROOT))
    try:
        from hatch_build import compile_command
    finally:
        sys.path.remove(str(ROOT))
    env = {"CC": "ccache gcc-12", "CPPFLAGS": "-D_FORTIFY_SOURCE=2", "CFLAGS": "-g -O2 -fstack-protector-strong",
           "LDFLAGS": "-Wl,-z,relro -Wl,-z,now"}
    argv = compile_command(Path("a.c"), Path("a.so"), env)
    assert argv[:2] == ["ccache", "gcc-12"]
    for flag in ("-D_FORTIFY_SOURCE=2", "-fstack-protector-strong", "-Wl,-z,relro", "-Wl,-z,now", "-fPIC", "-shared"):
        assert flag in argv
    assert "-O2" in compile_command(Path("a.c"), Path("a.so"), {})  # no CFLAGS: our default


@pytest.mark.slow
def test_a_failed_compile_is_fatal_only_when_asked(tmp_path: Path) -> None:
    def build(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                               "-q", "-w", str(tmp_path), str(ROOT)], env={**os.environ, "CC": "false", **env},
                              capture_output=True, text=True, timeout=300, check=False)

    proc = build(TOPOWATCH_REQUIRE_COMPILED="1")
    assert proc.returncode != 0
    assert "TOPOWATCH_REQUIRE_COMPILED=1 requires it" in proc.stderr
    proc = build()
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("topowatch-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")  # pure: no compiled scan inside


# -- licence ---------------------------------------------------------------------------------


def test_sources_name_their_licence() -> None:
    files = subprocess.run(["git", "ls-files", "src", "scripts", "contrib", "debian/rules", "hatch_build.py"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    missing = [f for f in files if not f.endswith(".json") and (ROOT / f).exists()
               and "SPDX-License-Identifier: GPL-2.0-or-later" not in "".join((ROOT / f).read_text().splitlines(True)[:3])]
    assert missing == []
    head = (ROOT / "COPYING").read_text().split()[:7]
    assert head == ["GNU", "GENERAL", "PUBLIC", "LICENSE", "Version", "2,", "June"]  # pyproject: GPL-2.0-or-later


def test_the_default_install_has_dbus_support() -> None:
    # Without the old extra the hooks silently did nothing and status/trigger failed.
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~ \[]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    assert {"dbus-fast", "trio-asyncio"} <= names
    assert project["optional-dependencies"]["dbus"] == []  # `topowatch[dbus]` still installs
    from topowatch import dbus

    assert dbus.missing_dependency() is None
