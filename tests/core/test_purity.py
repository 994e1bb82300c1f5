"""core/ imports only the standard library and itself: the lint rule that keeps it pure."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "src" / "topowatch" / "core"
FORBIDDEN_STDLIB = {"subprocess", "socket", "time", "asyncio", "threading", "os", "select"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_core_is_pure() -> None:
    files = sorted(CORE.glob("*.py"))
    assert files, "core/ has no modules"
    offenders = []
    for path in files:
        for name in imported_modules(path):
            top = name.split(".")[0]
            if name.startswith("topowatch.core") or name == "__future__":
                continue
            if top not in sys.stdlib_module_names or top in FORBIDDEN_STDLIB:
                offenders.append(f"{path.name}: {name}")
    assert offenders == []


def test_checker_catches_an_impure_module(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import trio\nfrom topowatch.edges import rtnl\nimport subprocess\n")
    assert imported_modules(bad) == {"trio", "topowatch.edges", "subprocess"}
