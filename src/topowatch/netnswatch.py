# SPDX-License-Identifier: GPL-2.0-or-later
"""Whether the named network namespace the daemon started in still has its name.

``ip netns del NAME`` unmounts and unlinks ``/run/netns/NAME``; the namespace
itself lives on for as long as a process is in it. A daemon left there would
keep its D-Bus name (``io.github.topowatch.netns_<NAME escaped>``), so the
daemon of a namespace re-created under the same name would run without D-Bus
and every hook would reach the orphan. So a daemon started in a namespace that
``/run/netns`` names stops when that name no longer leads to its namespace
(removed, or re-created as another one), and its bus name goes with it.

Theory of operation: no timer. The idle daemon must never wake up
(``tests/netns/test_idle.py`` counts its context switches), so the watch is an
inotify watch on ``/run/netns`` itself: the kernel wakes the daemon only when
an entry there is created, deleted or renamed (``ip netns add/del``), and each
wake-up compares ``/run/netns/NAME`` with the namespace the daemon is in
(device and inode, as ``ip netns identify``). The comparison also runs once
right after the watch is set, so a deletion between start and watch is seen.
A daemon started in the init namespace, or in a namespace no name leads to,
watches nothing.

This module never changes ``/run/netns`` and decides nothing but "the name
is gone"; the caller stops the daemon.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import trio

from topowatch.dbus import NETNS_RUN_DIR, inode_of, netns_name

log = logging.getLogger("topowatch.netns")

# include/uapi/linux/inotify.h
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_ONLYDIR = 0x01000000
WATCHED = IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


@dataclass(frozen=True, slots=True)
class NamedNamespace:
    """The namespace ``ident`` (st_dev, st_ino of its ``ns/net``) that ``run_dir/name`` leads to."""

    name: str
    ident: tuple[int, int]
    run_dir: str = NETNS_RUN_DIR

    def still_named(self) -> bool:
        return inode_of(os.path.join(self.run_dir, self.name)) == self.ident


def named_namespace(
    self_ns: str = "/proc/self/ns/net", run_dir: str = NETNS_RUN_DIR
) -> NamedNamespace | None:
    """The name ``ip netns`` gives the namespace we are in, or None (init namespace, or unnamed)."""
    own = inode_of(self_ns)
    if own is None:
        return None
    name = netns_name(own, run_dir)
    return NamedNamespace(name, own, run_dir) if name is not None else None


def _inotify(path: str) -> int:
    fd: int = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"inotify_init1: {os.strerror(err)}")
    if _libc.inotify_add_watch(fd, os.fsencode(path), WATCHED | IN_ONLYDIR) < 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
    return fd


async def watch(on_gone: Callable[[], None], named: NamedNamespace | None = None) -> None:
    """Call ``on_gone`` once, when the name the daemon's namespace had at start no longer leads to it.

    ``named`` defaults to the namespace we are in; returns at once when it has no name.
    """
    if named is None:
        named = named_namespace()
        if named is None:
            return
    try:
        fd = _inotify(named.run_dir)
    except OSError as exc:
        log.warning("cannot watch %s (%s): if `ip netns del %s` removes this namespace's name, the daemon "
                    "keeps running and keeps its D-Bus name", named.run_dir, exc.strerror or exc, named.name)
        return
    try:
        while named.still_named():
            await trio.lowlevel.wait_readable(fd)
            try:
                while os.read(fd, 4096):  # drain: only "something changed" matters
                    pass
            except BlockingIOError:
                pass
    finally:
        os.close(fd)
    log.warning("network namespace %r is gone (%s no longer leads to it): stopping, which releases the "
                "D-Bus name", named.name, os.path.join(named.run_dir, named.name))
    on_gone()
