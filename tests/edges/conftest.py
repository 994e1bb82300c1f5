# SPDX-License-Identifier: GPL-2.0-or-later
"""Every edge test starts with no learned message layouts (``ctcodec._LAYOUTS``).

The codec learns a dump's message shapes module-wide, once per process. Without this, a test
reads shapes learned by whichever test ran first, and a mutation tool, which runs the tests once
before any mutant is active and forks each mutant's run from there, never calls a mutated
``_learn`` at all (the run of 2026-12-03, fifth session: 15 of its first 20 mutants survived so).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from topowatch.edges import ctcodec


@pytest.fixture(autouse=True)
def _no_learned_layouts(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(ctcodec, "_LAYOUTS", {})
    monkeypatch.setattr(ctcodec, "_LEARNED_LENGTHS", set())
    yield
