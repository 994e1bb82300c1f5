# SPDX-License-Identifier: GPL-2.0-or-later
"""Build hook: compiles the scan fast path (src/topowatch/edges/_ctscan.c) into the wheel.

It decides only whether the extension is built: with a C compiler and the
Python headers it is (into the wheel, or beside its source for an editable
install); without them the build goes on as pure Python, says so once, and
topowatch uses its pure-Python scan (``topowatch doctor`` reports which).

The compiler and flags are the builder's, as a distribution passes them
(``dpkg-buildflags``): ``CC`` (else Python's), ``CPPFLAGS``, ``CFLAGS`` (else
``-O2``) and ``LDFLAGS``, around the flags the extension itself needs. It
must never fail a build because the compiler is missing or refuses, unless
``TOPOWATCH_REQUIRE_COMPILED=1`` asks for that (a package that must ship
the compiled scan).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = Path("src/topowatch/edges/_ctscan.c")
TARGET = "topowatch/edges/_ctscan"


def compile_command(source: Path, output: Path, env: Mapping[str, str] = os.environ) -> list[str]:
    """The compiler's argv: the builder's CC and flags around what the extension needs."""
    cc = shlex.split(env.get("CC") or sysconfig.get_config_var("CC") or "cc")
    cflags = shlex.split(env["CFLAGS"]) if env.get("CFLAGS") else ["-O2"]
    include = sysconfig.get_paths()["include"]
    return [*cc, *shlex.split(env.get("CPPFLAGS", "")), *cflags, "-fPIC", "-shared", "-Wall", "-Werror",
            "-std=c11", f"-I{include}", str(source), *shlex.split(env.get("LDFLAGS", "")),
            "-o", str(output)]  # fmt: skip


def compile_extension(source: Path, output: Path) -> str | None:
    """Compile ``source`` into the shared object ``output``; None on success, else why not."""
    command = compile_command(source, output)
    try:
        proc = subprocess.run(command, capture_output=True, text=True, check=False, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{shlex.join(command)}: {exc}"
    if proc.returncode != 0:
        return f"{shlex.join(command)}: {proc.stderr.strip()[-2000:]}"
    return None


class CompiledFastPath(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        source = Path(self.root, SOURCE)
        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        if version == "editable":
            output = source.with_name("_ctscan" + suffix)  # imported from the source tree
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="topowatch-build")
            output = Path(self._tmp.name, "_ctscan" + suffix)
        why = compile_extension(source, output)
        if why is not None and os.environ.get("TOPOWATCH_REQUIRE_COMPILED") == "1":
            raise RuntimeError(f"topowatch: compiled scan fast path not built, and "
                               f"TOPOWATCH_REQUIRE_COMPILED=1 requires it: {why}")
        if why is not None:
            print(f"topowatch: compiled scan fast path not built, using the pure-Python path: {why}",
                  file=sys.stderr)
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        if version != "editable":
            build_data["force_include"][str(output)] = TARGET + suffix
