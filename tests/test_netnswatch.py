"""The watch on /run/netns: a daemon whose namespace name is gone stops; nothing else stops it.

A temporary directory stands in for /run/netns and a file hard-linked into it
for the namespace (what ``ip netns add`` leaves is a bind mount: the same
device and inode). The real thing, with ``ip netns del`` and a daemon on a
private bus, is ``tests/netns/test_netns_gone.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio
import trio.testing

from topowatch.netnswatch import NamedNamespace, named_namespace, watch


def _namespace(tmp_path: Path, name: str) -> tuple[Path, Path]:
    own, run = tmp_path / "self", tmp_path / "netns"
    own.write_text("")
    run.mkdir()
    os.link(own, run / name)
    return own, run


def test_named_namespace(tmp_path: Path) -> None:
    own, run = _namespace(tmp_path, "lab-x")
    named = named_namespace(str(own), str(run))
    assert named == NamedNamespace("lab-x", (own.stat().st_dev, own.stat().st_ino), str(run))
    assert named.still_named()
    (run / "lab-x").unlink()
    assert named_namespace(str(own), str(run)) is None  # no name: nothing to watch
    assert not named.still_named()


async def test_watch_stops_when_the_name_goes_and_not_before(tmp_path: Path) -> None:
    own, run = _namespace(tmp_path, "lab-x")
    named = named_namespace(str(own), str(run))
    assert named is not None
    gone: list[bool] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch, lambda: gone.append(True), named)
        await trio.testing.wait_all_tasks_blocked()
        (run / "other").write_text("")  # another namespace comes and goes: not ours
        (run / "other").unlink()
        await trio.sleep(0.1)
        await trio.testing.wait_all_tasks_blocked()
        assert gone == []
        # `ip netns del lab-x; ip netns add lab-x`: the name now leads to another namespace.
        (run / "lab-x").unlink()
        (run / "lab-x").write_text("")
        with trio.fail_after(5):
            while not gone:
                await trio.sleep(0.01)
    assert gone == [True]


async def test_watch_returns_at_once_when_already_gone(tmp_path: Path) -> None:
    own, run = _namespace(tmp_path, "lab")
    named = named_namespace(str(own), str(run))
    assert named is not None
    (run / "lab").unlink()
    gone: list[bool] = []
    with trio.fail_after(5):
        await watch(lambda: gone.append(True), named)
    assert gone == [True]


async def test_unwatchable_directory_is_a_warning_not_a_stop(tmp_path: Path) -> None:
    named = NamedNamespace("lab", (0, 0), str(tmp_path / "missing"))
    gone: list[bool] = []
    with trio.fail_after(5):
        await watch(lambda: gone.append(True), named)
    assert gone == []
