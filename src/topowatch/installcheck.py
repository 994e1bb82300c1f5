# SPDX-License-Identifier: GPL-2.0-or-later
"""Are the files topowatch ships installed where the programs that read them look?

pip installs the wheel's shared data under its prefix: /usr/local for pip as
root, the virtualenv for an install into one. systemd reads units from
/usr/local/lib/systemd/system but dbus-daemon never reads
/usr/local/share/dbus-1/system.d and NetworkManager never reads
/usr/local/lib/NetworkManager/dispatcher.d, and nothing reads a virtualenv.
For each shipped file found under an install prefix in a directory its
consumer does not read, and not copied to one it does, ``check`` reports it
with the command that puts it where it is read. It also reads the units
systemd would load and checks that their ExecStart names an executable, as
systemd resolves it (a bare name in its fixed search path).

topowatch's own shipped policies need no check: ``policy.installed_dirs``
searches the install prefix.

This module only reads files; it never copies, links or edits one (the fix
is a command for the admin). Every path is looked up under ``root`` so tests
can build a tree of their own.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass

# systemd's unit search path for the system manager (systemd.unit(5)), highest priority first.
UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system",
             "/usr/lib/systemd/system", "/lib/systemd/system")
# Where systemd looks for an ExecStart= program given without a path (systemd.service(5)).
EXEC_SEARCH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
UNITS = ("topowatch.service", "topowatch@.service")


@dataclass(frozen=True, slots=True)
class Shipped:
    """One shipped file: where the wheel puts it under its prefix, who reads it, and from where."""

    what: str
    path: str  # relative to the install prefix
    consumer: str
    reads: tuple[str, ...]  # the consumer's directories, highest priority first; the fix uses the first
    mode: int
    after: str = ""  # what to run once it is in place


SHIPPED = (
    Shipped("systemd unit", "lib/systemd/system/topowatch.service", "systemd", UNIT_DIRS, 0o644,
            "systemctl daemon-reload"),
    Shipped("systemd template unit", "lib/systemd/system/topowatch@.service", "systemd", UNIT_DIRS, 0o644,
            "systemctl daemon-reload"),
    Shipped("D-Bus policy", "share/dbus-1/system.d/io.github.topowatch.conf", "dbus-daemon",
            ("/etc/dbus-1/system.d", "/usr/share/dbus-1/system.d"), 0o644, "systemctl reload dbus"),
    Shipped("NetworkManager dispatcher hook", "lib/NetworkManager/dispatcher.d/90-topowatch",
            "NetworkManager", ("/etc/NetworkManager/dispatcher.d", "/usr/lib/NetworkManager/dispatcher.d"),
            0o755),
)


@dataclass(frozen=True, slots=True)
class Misplaced:
    """A problem with an installed file and the command that fixes it."""

    path: str
    problem: str
    fix: str


def install_prefixes() -> tuple[str, ...]:
    """Where this topowatch's wheel put its shared data (the data scheme path, and sys.prefix)."""
    found: list[str] = []
    for prefix in (sysconfig.get_path("data"), sys.prefix):
        if prefix not in found:
            found.append(prefix)
    return tuple(found)


def installed_binary() -> str:
    """The ``topowatch`` program of this installation (what a unit should name)."""
    script = os.path.join(sysconfig.get_path("scripts"), "topowatch")
    if os.access(script, os.X_OK):
        return script
    return shutil.which("topowatch") or script  # a wrapper (the Debian package's /usr/bin/topowatch)


def _at(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def _same_dir(root: str, a: str, b: str) -> bool:
    return os.path.realpath(_at(root, a)) == os.path.realpath(_at(root, b))


def _fix(src: str, shipped: Shipped, binary: str) -> str:
    dest = os.path.join(shipped.reads[0], os.path.basename(shipped.path))
    if shipped.consumer == "systemd":
        command = (f"sed 's|^ExecStart=topowatch |ExecStart={binary} |' {shlex.quote(src)} > "
                   f"{shlex.quote(dest)}")
    elif shipped.consumer == "NetworkManager":
        # A link: the hook finds hook-lib.sh and this installation's topowatch from where it really is.
        command = f"ln -s {shlex.quote(src)} {shlex.quote(dest)}"
    else:
        command = f"install -o root -g root -m {shipped.mode:04o} {shlex.quote(src)} {shlex.quote(dest)}"
    return f"{command} && {shipped.after}" if shipped.after else command


def misplaced_files(prefixes: Sequence[str], binary: str, root: str = "/") -> list[Misplaced]:
    """Shipped files under ``prefixes`` that their consumer does not read, nor has a copy of."""
    out: list[Misplaced] = []
    for shipped in SHIPPED:
        name = os.path.basename(shipped.path)
        copies = [d for d in shipped.reads if os.path.exists(_at(root, os.path.join(d, name)))]
        for prefix in prefixes:
            src = os.path.join(prefix, shipped.path)
            if not os.path.exists(_at(root, src)):
                continue
            here = os.path.dirname(src)
            if any(_same_dir(root, here, d) for d in shipped.reads) or copies:
                continue
            out.append(Misplaced(src, f"{shipped.what} installed where {shipped.consumer} does not look "
                                      f"(it reads {' and '.join(shipped.reads[:2])})",
                                 _fix(src, shipped, binary)))
    return out


def _exec_program(unit_text: str) -> str | None:
    for line in unit_text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.strip() == "ExecStart" and value.strip():
            return value.split()[0].lstrip("-@:+!")
    return None


def unit_programs(binary: str, root: str = "/") -> list[Misplaced]:
    """Units systemd would load whose ExecStart names no executable program (as systemd resolves it)."""
    out: list[Misplaced] = []
    for unit in UNITS:
        found = (os.path.join(d, unit) for d in UNIT_DIRS if os.path.isfile(_at(root, os.path.join(d, unit))))
        path = next(found, None)
        if path is None:
            continue
        try:
            with open(_at(root, path), encoding="utf-8", errors="replace") as f:
                program = _exec_program(f.read())
        except OSError:
            continue
        if program is None:
            continue
        candidates = [program] if program.startswith("/") else [os.path.join(d, program) for d in EXEC_SEARCH]
        if any(os.path.isfile(_at(root, c)) and os.access(_at(root, c), os.X_OK) for c in candidates):
            continue
        where = "" if program.startswith("/") else f" (systemd searches {':'.join(EXEC_SEARCH[:4])})"
        edit = f"sed 's|^ExecStart={program} |ExecStart={binary} |'"
        dest = os.path.join(UNIT_DIRS[0], unit)
        fix = (f"{edit} -i {shlex.quote(path)}" if path == dest else f"{edit} {shlex.quote(path)} > {dest}")
        fix += " && systemctl daemon-reload"
        out.append(Misplaced(path, f"ExecStart names {program}, which is not an executable{where}: "
                                   "systemd cannot start the unit", fix))
    return out


def check(
    prefixes: Sequence[str] | None = None, binary: str | None = None, root: str = "/"
) -> list[Misplaced]:
    """Every problem found; empty when every shipped file is where it is read."""
    prefixes = install_prefixes() if prefixes is None else prefixes
    binary = installed_binary() if binary is None else binary
    return misplaced_files(prefixes, binary, root) + unit_programs(binary, root)
