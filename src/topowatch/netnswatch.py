# SPDX-License-Identifier: GPL-2.0-or-later
"""Whether the named network namespace the daemon started in still has its name.

``ip netns del NAME`` unmounts and unlinks ``/run/netns/NAME``; the namespace
itself lives on for as long as a process is in it. A daemon left there would
keep its D-Bus name (``io.github.topowatch.netns_<NAME escaped>``), so the
daemon of a namespace re-created under the same name would run without D-Bus
and every hook would reach the orphan. So a daemon started in a namespace that
``/run/netns`` names stops when that name no longer leads to its namespace
(removed, or re-created as another one), and its bus name goes with it.

Theory of operation: no timer and no watch. The idle daemon must never wake
up (``tests/netns/test_idle.py`` counts its context switches); an inotify
watch on /run/netns would wake it for every namespace any program adds or
deletes on the host. Instead the guard compares ``/run/netns/NAME`` with the
namespace the daemon is in (device and inode, as ``ip netns identify``) at
the moments that matter:

- after each reaction (something happened in the namespace);
- before each D-Bus method call is served: a hook or the CLI calling the
  orphan's name finds out, and so does the daemon of the re-created
  namespace, which, finding its name taken, calls the owner once
  (``dbus.service``) so that an orphan steps aside; it then gets the name at
  its next attempt.

A daemon started in the init namespace, or in a namespace no name leads to,
is never stopped by the guard.

This module never changes ``/run/netns`` and decides nothing but "the name
is gone"; the caller stops the daemon.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import trio

from topowatch.dbus import NETNS_RUN_DIR, inode_of, netns_name

log = logging.getLogger("topowatch.netns")


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


class NamespaceGuard:
    """Says, when asked, whether the daemon's namespace lost its name; ``gone`` is set once it has."""

    def __init__(self, named: NamedNamespace | None) -> None:
        self.named = named
        self.gone = trio.Event()

    @classmethod
    def here(cls) -> NamespaceGuard:
        return cls(named_namespace())

    def check(self) -> bool:
        """True while the daemon may go on; the first False logs why and sets ``gone``."""
        if self.gone.is_set():
            return False
        if self.named is None or self.named.still_named():
            return True
        log.warning("network namespace %r is gone (%s no longer leads to it): stopping, which releases the "
                    "D-Bus name", self.named.name, os.path.join(self.named.run_dir, self.named.name))
        self.gone.set()
        return False

    def after_reaction(self, _reaction: object) -> None:
        self.check()

    async def stop_when_gone(self, stop: trio.CancelScope) -> None:
        """Cancel ``stop`` once the name is found gone (waits without waking up until then)."""
        await self.gone.wait()
        stop.cancel()
