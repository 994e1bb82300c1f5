"""Layers: the edges never import the reactor (the values they share live in topowatch.sources)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "topowatch"


def imported(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_edges_never_import_the_reactor() -> None:
    offenders = {p.name for p in (SRC / "edges").glob("*.py") if "topowatch.reactor" in imported(p)}
    assert offenders == set()
    assert "topowatch.reactor" not in imported(SRC / "sources.py")


def test_the_check_sees_an_import() -> None:
    """The walk above finds a ``from topowatch.reactor import`` where there is one (guards a vacuous test)."""
    assert "topowatch.sources" in imported(SRC / "reactor.py")
