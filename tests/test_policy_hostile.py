"""Hostile or unlucky policy files and directories: never a hang, a crash or a silent fall-back."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from topowatch.cli import reload_policies
from topowatch.policy import MAX_FILE_BYTES, EffectivePolicy, PolicyErrors, PolicyStore, load_policies

GOOD = '[policy.watch]\naction = "log"\n'


def rules_dir(root: Path, name: str = "rules.d") -> Path:
    d = root / name
    d.mkdir(mode=0o755, parents=True)
    d.chmod(0o755)
    return d


def put(directory: Path, name: str, content: str | bytes) -> Path:
    path = directory / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    path.chmod(0o644)
    return path


def errors(directory: Path) -> list[str]:
    with pytest.raises(PolicyErrors) as info:
        load_policies([str(directory)])
    return [str(e) for e in info.value.errors]


def test_deeply_nested_toml_is_an_error_not_a_crash(tmp_path: Path) -> None:
    d = rules_dir(tmp_path)
    put(d, "50-deep.toml", "x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    (error,) = errors(d)
    assert "50-deep.toml" in error and "nested too deeply" in error


def test_huge_file_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    d = rules_dir(tmp_path)
    put(d, "50-huge.toml", GOOD + "#" * MAX_FILE_BYTES + "\n")
    (error,) = errors(d)
    assert "50-huge.toml" in error and "too large" in error


def test_a_fifo_named_toml_neither_blocks_check_nor_loads(tmp_path: Path) -> None:
    d = rules_dir(tmp_path)
    put(d, "40-good.toml", GOOD)
    os.mkfifo(d / "50-fifo.toml", 0o644)
    proc = subprocess.run([sys.executable, "-m", "topowatch", "check", "--rules-dir", str(d)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "50-fifo.toml: not a regular file" in proc.stderr and "Traceback" not in proc.stderr


async def test_sighup_reload_keeps_the_policy_on_any_failure(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    d = rules_dir(tmp_path)
    path = put(d, "50-watch.toml", GOOD)
    store = PolicyStore.open([str(d)])
    first = store.current

    put(d, "50-watch.toml", "x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert await reload_policies(store) is False
    assert store.current is first

    # A read that does not finish in time is given up (the thread is left to end on its own).
    release = threading.Event()

    def stuck() -> EffectivePolicy:
        release.wait(30)
        raise RuntimeError("late")

    store.load = stuck  # type: ignore[method-assign]
    try:
        with caplog.at_level(logging.ERROR, "topowatch"):
            assert await reload_policies(store, timeout=0.2) is False
        assert "keeping the previous policy" in caplog.text
    finally:
        release.set()
    assert store.current is first

    def broken() -> EffectivePolicy:
        raise ValueError("bug")

    store.load = broken  # type: ignore[method-assign]
    assert await reload_policies(store) is False
    assert store.current is first

    del store.load
    path.write_text('[policy.watch]\naction = "flush"\n')
    assert await reload_policies(store) is True
    assert store.current is not first


def test_a_parent_others_may_write_is_refused_unless_sticky(tmp_path: Path) -> None:
    parent = tmp_path / "open"
    parent.mkdir()
    d = rules_dir(parent)
    put(d, "50-watch.toml", GOOD)
    parent.chmod(0o777)
    (error,) = errors(d)
    assert f"its parent {parent} is writable by group or others" in error
    parent.chmod(0o1777)  # like /tmp: nobody else may rename what we own in it
    assert load_policies([str(d)])["watch"].action.value == "log"
    parent.chmod(0o755)


def test_a_directory_that_held_files_and_is_gone_keeps_the_last_policy(tmp_path: Path) -> None:
    root = tmp_path / "etc"
    root.mkdir(mode=0o755)
    etc = rules_dir(root)
    put(etc, "50-watch.toml", GOOD)
    never = tmp_path / "never" / "rules.d"  # optional: it never existed
    store = PolicyStore.open([str(etc), str(never)])
    first = store.current
    assert first["watch"].action.value == "log"
    etc.rename(root / "elsewhere")
    with pytest.raises(PolicyErrors) as info:
        store.reload()
    assert "held policy files at the last load and is now gone" in str(info.value)
    assert store.current is first  # not the built-in default (flush)
    # A fresh start (no last load) runs without it, as without any optional directory.
    assert PolicyStore.open([str(etc), str(never)]).current.policies[0].name == "default"


def test_check_escapes_control_characters_in_file_names(tmp_path: Path) -> None:
    d = rules_dir(tmp_path)
    put(d, "50-\x1b[31mred.toml", "bogus = 1\n")
    proc = subprocess.run([sys.executable, "-m", "topowatch", "check", "--rules-dir", str(d)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 1
    assert "\x1b" not in proc.stderr and "50-\\x1b[31mred.toml" in proc.stderr, proc.stderr


async def test_a_file_of_many_mistakes_logs_a_bounded_list(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    d = rules_dir(tmp_path)
    path = put(d, "50-watch.toml", GOOD)
    store = PolicyStore.open([str(d)])
    path.write_text("[policy.watch]\n" + "".join(f"k{i} = 1\n" for i in range(5000)))
    with caplog.at_level(logging.ERROR, "topowatch"):
        assert await reload_policies(store) is False
    assert len(caplog.records) == 22  # 20 errors, how many more, "keeping the previous policy"
    assert "... and 4980 more errors" in caplog.text
