# SPDX-License-Identifier: GPL-2.0-or-later
"""Network namespaces: create, run commands in, open sockets in, remove.

Used by the lab, the benchmarks and the tests; the daemon itself never enters
another namespace (it works in the one it was started in). Everything created
here carries a unique name and is removed by its owner, even on failure.
This module never touches the init namespace's configuration.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import secrets
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from topowatch.errors import TopowatchError

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

T = TypeVar("T")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def unique_name(prefix: str = "tw") -> str:
    return f"{prefix}{secrets.token_hex(3)}"


class Namespace:
    """A named network namespace (``ip netns``) owned by this process."""

    def __init__(self, name: str) -> None:
        self.name = name

    @property
    def path(self) -> str:
        return f"{NETNS_RUN_DIR}/{self.name}"

    @classmethod
    def create(cls, prefix: str = "tw") -> Namespace:
        name = unique_name(prefix)
        proc = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise TopowatchError(f"cannot create namespace {name}: {proc.stderr.strip()}")
        ns = cls(name)
        ns.run("ip", "link", "set", "lo", "up")
        return ns

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)

    def run(self, *argv: str, check: bool = True, input: str | None = None) -> str:
        """Run a command inside the namespace; return its stdout."""
        proc = subprocess.run(
            ["ip", "netns", "exec", self.name, *argv],
            capture_output=True,
            text=True,
            check=False,
            input=input,
        )
        if check and proc.returncode != 0:
            raise TopowatchError(
                f"[{self.name}] {' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}"
            )
        return proc.stdout

    def popen(self, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[str]:
        return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
            ["ip", "netns", "exec", self.name, *argv], text=True, **kwargs
        )

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in a thread that has entered this namespace; sockets it opens stay here."""
        result: list[T] = []
        error: list[BaseException] = []

        def target() -> None:
            try:
                with open(self.path, "rb") as f:
                    _setns(f.fileno())
                result.append(fn())
            except BaseException as exc:
                error.append(exc)

        thread = threading.Thread(target=target, name=f"netns-{self.name}")
        thread.start()
        thread.join()
        if error:
            raise error[0]
        return result[0]

    def socket(self, family: int, type: int, proto: int = 0) -> socket.socket:
        """A socket created inside this namespace."""
        return self.call(lambda: socket.socket(family, type, proto))

    def __enter__(self) -> Namespace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()


@contextlib.contextmanager
def namespaces(*prefixes: str) -> Iterator[list[Namespace]]:
    """Create one namespace per prefix; remove them all on exit."""
    created: list[Namespace] = []
    try:
        for prefix in prefixes:
            created.append(Namespace.create(prefix))
        yield created
    finally:
        for ns in created:
            ns.delete()


def veth(a: Namespace, a_name: str, b: Namespace, b_name: str) -> None:
    """A veth pair between two namespaces, both ends up.

    Created inside ``a`` with its peer placed in ``b`` at once: no device ever
    appears in the init namespace, even for a moment.
    """
    a.run("ip", "link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", b.name)
    a.run("ip", "link", "set", a_name, "up")
    b.run("ip", "link", "set", b_name, "up")
