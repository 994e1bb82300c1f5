# SPDX-License-Identifier: GPL-2.0-or-later
"""One daemon per network namespace: an abstract unix socket as the lock.

An abstract unix socket name belongs to the network namespace it is bound
in (``net/unix/af_unix.c`` hashes it with the namespace), needs no file and
goes away with the process that holds it, also after a crash or SIGKILL. So
``bind`` of the same name fails with EADDRINUSE exactly while another
daemon of this namespace runs, with or without D-Bus, whatever its state
directory. This module takes and holds the lock, and says who holds it; it decides nothing.
"""

from __future__ import annotations

import errno
import os
import socket

from topowatch.errors import TopowatchError

LOCK_NAME = "io.github.topowatch.daemon"


class AlreadyRunning(TopowatchError):
    """Another topowatch daemon holds this network namespace's lock."""


def holder(name: str = LOCK_NAME) -> int | None:
    """The pid of the daemon holding this namespace's lock (its socket's peer credentials), or None
    when no daemon runs here (or it cannot be asked; 0 when its pid is not visible from here)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(1.0)
        probe.connect("\0" + name)
        creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        return int.from_bytes(creds[:4], "little")
    except OSError:
        return None
    finally:
        probe.close()


def _holder(name: str) -> str:
    pid = holder(name)
    return f" (pid {pid})" if pid else ""


def acquire(name: str = LOCK_NAME) -> socket.socket:
    """Bind the namespace's lock; the caller keeps the socket open for its lifetime."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind("\0" + name)
        sock.listen(1)  # lets a second daemon name the holder's pid
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise AlreadyRunning(
                f"another topowatch daemon runs in this network namespace{_holder(name)}; "
                "one per namespace (stop it first)"
            ) from exc
        raise TopowatchError(f"cannot take the namespace lock: {os.strerror(exc.errno or 0)}") from exc
    return sock
