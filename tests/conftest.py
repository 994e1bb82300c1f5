"""Capability checks, run once, exported as markers with reasons (as trio's tests do)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from topowatch.netns import Namespace


def _can_netns() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None:
        return "needs iproute2"
    try:
        ns = Namespace.create("twprobe")
    except Exception as exc:
        return f"cannot create a network namespace: {exc}"
    ns.delete()
    return None


_NETNS_REASON = _can_netns()
needs_netns = pytest.mark.skipif(_NETNS_REASON is not None, reason=_NETNS_REASON or "")
needs_nft = pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft")
needs_conntrack_tool = pytest.mark.skipif(shutil.which("conntrack") is None, reason="needs conntrack")


# scripts/mutation runs the tests once per mutant: there, property tests try at most this many
# examples (0: as each test says).
_MUTATION_EXAMPLES = int(os.environ.get("TOPOWATCH_MUTATION_EXAMPLES") or 0)
if _MUTATION_EXAMPLES:
    from hypothesis import Phase as _Phase
    from hypothesis import settings as _settings

    # No shrinking: a mutant is killed by any failing example, and shrinking one cost a minute per
    # mutant of ruleindex.py (2026-12-03, sixth run: counted as timeouts).
    _NO_SHRINK = (_Phase.explicit, _Phase.reuse, _Phase.generate)
    _settings.register_profile("mutation", max_examples=_MUTATION_EXAMPLES, deadline=None, phases=_NO_SHRINK)
    _settings.load_profile("mutation")


def _cap_examples(item: pytest.Item) -> None:
    from hypothesis import settings

    test = getattr(item, "obj", None)
    current = getattr(test, "_hypothesis_internal_use_settings", None)
    # No deadline there: coverage tracing (mutmut's stats run) and a loaded machine slow every
    # example, and a test failing on its deadline stops the stats run (2026-12-03, third run).
    if isinstance(current, settings):
        examples = min(current.max_examples, _MUTATION_EXAMPLES)
        test._hypothesis_internal_use_settings = settings(  # type: ignore[union-attr]
            current, max_examples=examples, deadline=None, phases=_NO_SHRINK
        )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("netns") is not None and _NETNS_REASON is not None:
            item.add_marker(pytest.mark.skip(reason=_NETNS_REASON))
        if _MUTATION_EXAMPLES:
            _cap_examples(item)


@pytest.fixture
def netns() -> Iterator[Namespace]:
    """A fresh namespace, removed after the test."""
    if _NETNS_REASON is not None:
        pytest.skip(_NETNS_REASON)
    ns = Namespace.create("twt")
    try:
        yield ns
    finally:
        ns.delete()


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout
