"""The guard of a daemon in a named namespace: once the name is gone it says so, and only then.

A temporary directory stands in for /run/netns and a file hard-linked into it
for the namespace (what ``ip netns add`` leaves is a bind mount: the same
device and inode). The real thing, with ``ip netns del``, a daemon on a
private bus and a second daemon taking over the name, is
``tests/netns/test_netns_gone.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from topowatch.netnswatch import NamedNamespace, NamespaceGuard, named_namespace


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
    assert named_namespace(str(own), str(run)) is None  # no name: nothing to guard
    assert not named.still_named()


async def test_guard_stops_the_daemon_once_the_name_leads_elsewhere(tmp_path: Path) -> None:
    own, run = _namespace(tmp_path, "lab-x")
    guard = NamespaceGuard(named_namespace(str(own), str(run)))
    (run / "other").write_text("")  # another namespace comes and goes: not ours
    (run / "other").unlink()
    assert guard.check()
    assert not guard.gone.is_set()
    # `ip netns del lab-x; ip netns add lab-x`: the name now leads to another namespace.
    (run / "lab-x").unlink()
    (run / "lab-x").write_text("")
    with trio.CancelScope() as daemon:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(guard.stop_when_gone, daemon)
            guard.after_reaction(None)  # the check after a reaction finds it
            await trio.sleep_forever()
    assert daemon.cancelled_caught
    assert guard.gone.is_set() and not guard.check()


def test_unnamed_namespace_is_never_gone() -> None:
    guard = NamespaceGuard(None)
    assert guard.check() and not guard.gone.is_set()
