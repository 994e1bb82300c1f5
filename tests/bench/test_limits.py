"""bench/flush.py's Limits on files of its own (never the host's sysctls): each value restored alone.

A failing write must not skip the other value, and a signal that arrives
while restoring must wait until both were written back.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def flush() -> Iterator[ModuleType]:
    sys.path.insert(0, str(BENCH))  # flush.py imports its sibling idle.py
    try:
        spec = importlib.util.spec_from_file_location("bench_flush", BENCH / "flush.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_flush", None)
        sys.path.remove(str(BENCH))


def files(tmp_path: Path, ct_max: int = 1000, buckets: int = 500) -> tuple[Path, Path]:
    max_path, buckets_path = tmp_path / "nf_conntrack_max", tmp_path / "hashsize"
    max_path.write_text(f"{ct_max}\n")
    buckets_path.write_text(f"{buckets}\n")
    return max_path, buckets_path


def test_raise_then_restore(flush: ModuleType, tmp_path: Path) -> None:
    max_path, buckets_path = files(tmp_path)
    limits = flush.Limits(str(max_path), str(buckets_path))
    assert len(limits.raise_to(4000)) == 2
    assert (max_path.read_text(), buckets_path.read_text()) == ("4000", "4000")
    notes = limits.restore()
    assert (max_path.read_text(), buckets_path.read_text()) == ("1000", "500")
    assert limits.saved == {} and limits.deferred is None and len(notes) == 2


def test_one_failing_write_does_not_skip_the_other(flush: ModuleType, tmp_path: Path) -> None:
    max_path, buckets_path = files(tmp_path)
    limits = flush.Limits(str(max_path), str(buckets_path))
    limits.raise_to(4000)
    write = limits.write

    def failing(path: str, value: str) -> None:
        if path == str(buckets_path):  # restored first
            raise PermissionError(13, "Permission denied")
        write(path, value)

    limits.write = failing
    notes = limits.restore()
    assert max_path.read_text() == "1000"  # restored although the buckets failed before it
    assert limits.saved == {str(buckets_path): "500"}  # what is left to do, kept
    assert any("could NOT restore" in n and str(buckets_path) in n for n in notes), notes
    limits.write = write
    limits.restore()  # a later try finishes the job
    assert buckets_path.read_text() == "500" and limits.saved == {}


def test_a_second_signal_waits_until_both_are_restored(flush: ModuleType, tmp_path: Path) -> None:
    max_path, buckets_path = files(tmp_path)
    limits = flush.Limits(str(max_path), str(buckets_path))
    limits.raise_to(4000)
    write = limits.write

    def interrupted(path: str, value: str) -> None:
        if path == str(buckets_path):
            os.kill(os.getpid(), signal.SIGTERM)  # as a second Ctrl-C or kill would, mid-restore
        write(path, value)

    limits.write = interrupted
    previous: Any = signal.signal(signal.SIGTERM, flush._terminate)  # as main() installs it
    try:
        notes = limits.restore()  # does not raise: the signal is held
        assert signal.getsignal(signal.SIGTERM) is flush._terminate  # and the handler is back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert (max_path.read_text(), buckets_path.read_text()) == ("1000", "500")
    assert limits.deferred == signal.SIGTERM, notes


def test_a_signal_before_holding_still_restores(flush: ModuleType, tmp_path: Path) -> None:
    """A signal that ends the first try (before it held signals) gets a second try, then stops."""
    max_path, buckets_path = files(tmp_path)
    limits = flush.Limits(str(max_path), str(buckets_path))
    limits.raise_to(4000)
    write = limits.write
    calls = 0

    def first_fails(path: str, value: str) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise SystemExit(128 + signal.SIGHUP)  # what _terminate raises
        write(path, value)

    limits.write = first_fails
    limits.restore_surely()
    assert (max_path.read_text(), buckets_path.read_text()) == ("1000", "500")
    assert limits.deferred == signal.SIGHUP
