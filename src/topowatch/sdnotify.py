# SPDX-License-Identifier: GPL-2.0-or-later
"""systemd's notify protocol: READY, STATUS, WATCHDOG and STOPPING datagrams.

Theory of operation: systemd hands a ``Type=notify`` service the path of a
datagram socket in ``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract
namespace) and, with ``WatchdogSec=``, the timeout in ``$WATCHDOG_USEC`` (for
the pid in ``$WATCHDOG_PID``, when set). Each notification is one datagram of
``KEY=value`` lines (``sd_notify(3)``).

The watchdog proves that *the reaction loop* is alive, not merely the process:
``watchdog`` runs as a task in the daemon's trio run and pings every half
timeout only while the reactor is idle-waiting for events, or is busy with a
reaction that made progress within ``stall_limit``. Progress is two things
together: the trio loop ticks (the watchdog task itself runs at all), and the
reaction completes phases (snapshot, ruleset read, dump, decide, delete: the
reactor's ``progress_at``, or its start) or steps inside one that runs in a
worker thread (``nft`` answered, its JSON decoded, ...: the heartbeat's
``work_done`` counter, which the watchdog sees change). So a reaction on a large table or
ruleset may last longer than ``WatchdogSec`` while its phases go on; a trio
run blocked by synchronous work pings nothing at all; a phase stuck in an
await stops the pings once it has lasted ``stall_limit``. Either way systemd
kills and restarts the service.

Rules: without ``$NOTIFY_SOCKET`` every call is a no-op; without
``$WATCHDOG_USEC`` (or with a ``$WATCHDOG_PID`` that is not ours) there is no
watchdog task and so no periodic wakeup at all. A failed send is ignored
(systemd may be restarting): this module never raises into the daemon, never
blocks, and never decides anything about conntrack.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import Protocol

import trio

from topowatch.text import escape

log = logging.getLogger("topowatch.sdnotify")


class Notifier:
    """Sends notifications to ``$NOTIFY_SOCKET``; a silent no-op when there is none."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address if address.startswith(("/", "\0")) else ""
        self.watchdog_usec = _watchdog_usec(env)
        self.sent: list[str] = []  # the last messages sent, for status and tests

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    @property
    def watchdog_timeout(self) -> float | None:
        """Seconds systemd waits for a WATCHDOG=1 ping, or None when no watchdog is configured."""
        return self.watchdog_usec / 1e6 if self.watchdog_usec else None

    def notify(self, **fields: str | int) -> bool:
        """Send one datagram of ``KEY=value`` lines; True when systemd got it."""
        if not self.address:
            return False
        message = "\n".join(f"{key}={_one_line(str(value))}" for key, value in fields.items())
        try:
            # One socket per message: a few per reaction at most, and nothing to leak or reopen.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(message.encode(), self.address)
        except OSError as exc:
            log.debug("sd_notify %r failed: %s", message, exc)
            return False
        self.sent.append(message)
        del self.sent[:-32]
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify(READY=1, STATUS=status) if status else self.notify(READY=1)

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def stopping(self, status: str = "") -> bool:
        return self.notify(STOPPING=1, STATUS=status) if status else self.notify(STOPPING=1)


def _one_line(text: str) -> str:
    # Names from outside (interfaces) may hold control characters or bytes that were not UTF-8.
    return escape(text.replace("\n", " "))


def _watchdog_usec(env: Mapping[str, str]) -> int:
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return 0  # meant for another process (e.g. our parent)
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return 0
    return max(usec, 0)


class Heartbeat(Protocol):
    """What the watchdog reads from the reactor: when its current reaction began (None: idle).

    A heartbeat may also have ``progress_at``: when the reaction last completed a phase.
    """

    @property
    def busy_since(self) -> float | None: ...


def loop_alive(heartbeat: Heartbeat, now: float, stall_limit: float) -> bool:
    """Is the reaction loop idle-waiting, or has its reaction made progress within ``stall_limit``?"""
    since = heartbeat.busy_since
    if since is None:
        return True
    progress = getattr(heartbeat, "progress_at", None)
    last = since if progress is None else max(since, progress)
    return now - last < stall_limit


class _Steps:
    """The heartbeat as the watchdog sees it: a change of its ``work_done`` counter counts as progress now.

    Worker threads cannot read the trio clock; they count steps, and the
    watchdog notes when it saw the count move.
    """

    def __init__(self, heartbeat: Heartbeat) -> None:
        self.heartbeat = heartbeat
        self.work: int | None = getattr(heartbeat, "work_done", None)
        self.moved_at: float | None = None

    def update(self, now: float) -> _Steps:
        work = getattr(self.heartbeat, "work_done", None)
        if work != self.work:
            self.work, self.moved_at = work, now
        return self

    @property
    def busy_since(self) -> float | None:
        return self.heartbeat.busy_since

    @property
    def progress_at(self) -> float | None:
        times = [t for t in (getattr(self.heartbeat, "progress_at", None), self.moved_at) if t is not None]
        return max(times) if times else None


async def watchdog(heartbeat: Heartbeat, notifier: Notifier, *, stall_limit: float | None = None) -> None:
    """Ping systemd every half timeout while the loop is alive; return at once without a watchdog.

    ``stall_limit`` (default: the watchdog timeout) is how long one reaction may
    run before the loop counts as stuck.
    """
    timeout = notifier.watchdog_timeout
    if timeout is None or not notifier.enabled:
        return
    limit = timeout if stall_limit is None else stall_limit
    stalled = False
    seen = _Steps(heartbeat)
    while True:
        if loop_alive(seen.update(trio.current_time()), trio.current_time(), limit):
            notifier.watchdog()
            stalled = False
        elif not stalled:
            stalled = True
            log.error("reaction loop busy for more than %.0f s: no more watchdog pings", limit)
        await trio.sleep(timeout / 2)
