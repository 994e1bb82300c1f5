"""The Debian package: built from this checkout with dpkg-buildpackage, checked, never installed.

``scripts/deb`` builds it (installing missing build dependencies; pip fetches
the Python dependencies from PyPI into the private virtualenv). The test runs
lintian on it (no errors; the warnings it may give are listed below, each
with the reason it stays), extracts it with ``dpkg -x`` into a temporary
directory, checks every shipped file's destination, mode and content, the
one conffile, the hardening of the compiled scan (built with
dpkg-buildflags), verifies the units with systemd-analyze, and runs the
extracted topowatch (``--version``, ``bus-name``, ``doctor``). About two
minutes, most of it pip and dpkg-buildpackage.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from test_install import HOST_UNITS, SYSTEMD_ANALYZE, verify
from topowatch import __version__

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("dpkg-buildpackage") is None,
                       reason="dpkg-buildpackage not installed (apt-get install dpkg-dev; scripts/deb installs "
                       "the rest)"),
    pytest.mark.skipif(os.geteuid() != 0 and shutil.which("dh") is None,
                       reason="debhelper not installed and not root: scripts/deb cannot install it"),
]

ROOT = Path(__file__).resolve().parents[1]
VENV = "usr/lib/topowatch/venv"
# Lintian warnings this package gives, and why each stays.
ACCEPTED_WARNINGS = {
    # The bus policy names its destination with send_destination_prefix (one daemon per network
    # namespace, io.github.topowatch.netns_*); lintian knows only send_destination.
    "dbus-policy-without-send-destination",
    # Modules of the dependencies in the private virtualenv carry `#!/usr/bin/env python` lines
    # of their own; they are imported, never run.
    "unusual-interpreter",
}


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    proc = subprocess.run(["sh", str(ROOT / "scripts/deb"), str(out)], capture_output=True, text=True,
                          timeout=1200, check=False)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    (package,) = out.glob(f"topowatch_{__version__}_*.deb")
    return package


@pytest.fixture(scope="module")
def tree(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("extracted")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    # What the dependency python3.11 provides once installed: the interpreter the venv links to.
    (root / "usr/bin/python3.11").symlink_to("/usr/bin/python3.11")
    return root


@pytest.mark.skipif(shutil.which("lintian") is None, reason="lintian not installed")
def test_lintian_finds_no_error(deb: Path) -> None:
    proc = subprocess.run(["lintian", "--allow-root", "--tag-display-limit", "0", str(deb)],
                          capture_output=True, text=True, timeout=600, check=False)
    tags = [line for line in proc.stdout.splitlines() if re.match(r"^[EWI]: ", line)]
    errors = [line for line in tags if line.startswith("E: ")]
    assert errors == [], "\n".join(errors)
    warnings = {line.split()[2] for line in tags if line.startswith("W: ")}
    print("lintian warnings:", *sorted(warnings))
    assert warnings <= ACCEPTED_WARNINGS, sorted(warnings - ACCEPTED_WARNINGS)


def _unit_dir(tree: Path) -> Path:
    found = [d for d in (tree / "lib/systemd/system", tree / "usr/lib/systemd/system") if d.is_dir()]
    assert len(found) == 1, found
    return found[0]


def test_files_land_in_debian_paths_with_their_modes(deb: Path, tree: Path) -> None:
    shipped = {  # destination -> (source in the repository, mode)
        "etc/default/topowatch": ("contrib/default/topowatch", 0o644),
        "usr/lib/topowatch/hook-lib.sh": ("contrib/lib/hook-lib.sh", 0o644),
        "usr/lib/topowatch/strongswan-updown": ("contrib/strongswan/topowatch-updown", 0o755),
        "usr/lib/topowatch/vpn-hook": ("contrib/vpn/topowatch-vpn", 0o755),
        "usr/lib/topowatch/ppp/ip-up.d/topowatch": ("contrib/ppp/ip-up.d/topowatch", 0o755),
        "usr/lib/topowatch/ppp/ip-down.d/topowatch": ("contrib/ppp/ip-down.d/topowatch", 0o755),
        "usr/lib/topowatch/keepalived-notify": ("contrib/keepalived/topowatch-notify", 0o755),
        "usr/lib/NetworkManager/dispatcher.d/90-topowatch": ("contrib/networkmanager/90-topowatch", 0o755),
        "usr/share/dbus-1/system.d/io.github.topowatch.conf": ("contrib/dbus/io.github.topowatch.conf", 0o644),
        "usr/lib/topowatch/rules.d/README.md": ("rules.d/README.md", 0o644),
        **{f"usr/lib/topowatch/rules.d/{p.name}": (f"rules.d/{p.name}", 0o644)
           for p in (ROOT / "rules.d").glob("*.toml")},
    }
    for dest, (src, mode) in shipped.items():
        path = tree / dest
        assert path.is_file(), dest
        assert stat.S_IMODE(path.stat().st_mode) == mode, (dest, oct(path.stat().st_mode))
        assert path.read_bytes() == (ROOT / src).read_bytes(), dest
    for page in ("usr/share/man/man8/topowatch.8.gz", "usr/share/man/man5/topowatch.rules.d.5.gz",
                 "usr/share/doc/topowatch/copyright"):
        assert stat.S_IMODE((tree / page).stat().st_mode) == 0o644, page
    wrapper = tree / "usr/bin/topowatch"
    assert stat.S_IMODE(wrapper.stat().st_mode) == 0o755
    assert f'exec /{VENV}/bin/python3 -m topowatch "$@"' in wrapper.read_text()
    # The units the Debian way (dh_installsystemd), naming the packaged binary in full.
    units = _unit_dir(tree)
    for unit in ("topowatch.service", "topowatch@.service"):
        text = (units / unit).read_text()
        assert stat.S_IMODE((units / unit).stat().st_mode) == 0o644
        assert "\nExecStart=/usr/bin/topowatch run $TOPOWATCH_OPTIONS\n" in text, unit
        assert text.replace("ExecStart=/usr/bin/topowatch ", "ExecStart=topowatch ") == \
            (ROOT / "contrib" / unit).read_text()
    # The only conffile.
    control = tree.parent / f"{tree.name}-control"
    subprocess.run(["dpkg-deb", "-e", str(deb), str(control)], check=True)
    assert (control / "conffiles").read_text().split() == ["/etc/default/topowatch"]
    # dh_installsystemd: the unit is enabled and started on install; the template only shipped.
    postinst = (control / "postinst").read_text()
    assert "deb-systemd-helper" in postinst and "topowatch.service" in postinst
    assert "topowatch@.service" not in postinst
    assert "compileall" in postinst and "__pycache__" in (control / "prerm").read_text()
    # Nothing in the virtualenv but Python: its shared data went to the paths above.
    venv = tree / VENV
    assert sorted(p.name for p in venv.iterdir()) == ["bin", "lib", "lib64", "pyvenv.cfg"]
    assert os.readlink(venv / "lib64") == "lib"
    assert sorted(p.name for p in (venv / "lib").iterdir()) == ["python3.11"]
    # The interpreter is the one python3.11 (a dependency) installs; the venv links to it.
    link = os.path.normpath(venv / "bin" / os.readlink(venv / "bin/python3.11"))
    assert link == str(tree / "usr/bin/python3.11")
    assert not list(venv.rglob("__pycache__"))  # compiled by postinst, removed by prerm


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf (binutils)")
def test_compiled_scan_is_built_with_dpkg_buildflags(tree: Path) -> None:
    (scan,) = (tree / VENV).glob("lib/python3.11/site-packages/topowatch/edges/_ctscan*.so")
    dynamic = subprocess.run(["readelf", "-d", str(scan)], capture_output=True, text=True, check=True).stdout
    assert "BIND_NOW" in dynamic  # LDFLAGS -Wl,-z,now (without the builder's LDFLAGS: lazy binding)


@pytest.mark.skipif(SYSTEMD_ANALYZE is None or HOST_UNITS is None, reason="needs systemd-analyze")
def test_units_verify_in_the_extracted_tree(tree: Path) -> None:
    proc = verify(tree, "topowatch.service", "topowatch@lab.service")
    assert proc.returncode == 0, proc.stderr


def _run(tree: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # The wrapper's interpreter, at the extracted path (the wrapper names /usr/lib/topowatch).
    python = tree / VENV / "bin/python3"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    return subprocess.run([str(python), "-m", "topowatch", *args], capture_output=True, text=True, env=env,
                          timeout=120, check=False, cwd="/")


def test_extracted_topowatch_runs(tree: Path) -> None:
    proc = _run(tree, "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"topowatch {__version__}"
    where = subprocess.run([str(tree / VENV / "bin/python3"), "-c", "import topowatch; print(topowatch.__file__)"],
                           capture_output=True, text=True, check=True, cwd="/").stdout
    assert where.startswith(str(tree / VENV)), where  # the packaged copy, not this checkout
    proc = _run(tree, "bus-name")
    assert proc.returncode == 0 and proc.stdout.startswith("io.github.topowatch"), proc.stderr
    proc = _run(tree, "doctor", "--json")
    assert proc.returncode in (0, 1), proc.stderr
    findings = {f["key"]: f for f in json.loads(proc.stdout)["findings"]}
    assert findings["scan_path"]["status"] == "ok", findings["scan_path"]  # the compiled scan loads
    assert findings["install"]["status"] == "ok", findings["install"]  # nothing misplaced in the venv
