"""topowatch on D-Bus: the well-known name, object path and interface, and where the bus is.

Names (one daemon per network namespace):

- bus name ``io.github.topowatch`` in the init network namespace; elsewhere
  ``io.github.topowatch.netns_<name>`` when ``ip netns`` knows the namespace
  (``/run/netns/<name>`` is a bind mount of it) or ``io.github.topowatch.netns_<inode>``;
- object ``/io/github/topowatch`` exporting interface ``io.github.topowatch.Agent1``.

The system bus address comes from ``DBUS_SYSTEM_BUS_ADDRESS``, else the
well-known socket, as every D-Bus library does.

This module decides names only. It must never import dbus-fast or
trio-asyncio (they are an optional extra: ``topowatch[dbus]``) and never
connect to anything; ``service``, ``networkmanager`` and ``client`` do.
"""

from __future__ import annotations

import os
import re

BUS_NAME = "io.github.topowatch"
OBJECT_PATH = "/io/github/topowatch"
INTERFACE = "io.github.topowatch.Agent1"
ERROR_PREFIX = "io.github.topowatch.Error"

SYSTEM_BUS_DEFAULT = "unix:path=/var/run/dbus/system_bus_socket"

# Since Linux 6.x the init network namespace has a fixed inode (PROC_NET_INIT_INO).
PROC_NET_INIT_INO = 0xEFFFFFF9
NETNS_RUN_DIR = "/run/netns"


def system_bus_address() -> str:
    return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or SYSTEM_BUS_DEFAULT


def missing_dependency() -> str | None:
    """Why D-Bus support cannot work here (None when it can)."""
    try:
        import dbus_fast  # noqa: F401
        import trio_asyncio  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed (pip install 'topowatch[dbus]')"
    return None


def _inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _netns_name(own: tuple[int, int], run_dir: str) -> str | None:
    """What ``ip netns identify`` answers: the /run/netns entry bound to our namespace."""
    try:
        names = sorted(os.listdir(run_dir))
    except OSError:
        return None
    for name in names:
        if _inode(os.path.join(run_dir, name)) == own:
            return name
    return None


def _element(text: str) -> str:
    # A bus name element: [A-Za-z0-9_]+, not starting with a digit (ours start with "netns_").
    return re.sub(r"[^A-Za-z0-9_]", "_", text)


def netns_suffix(
    self_ns: str = "/proc/self/ns/net", init_ns: str = "/proc/1/ns/net", run_dir: str = NETNS_RUN_DIR
) -> str | None:
    """None in the init network namespace (or when that cannot be told), else ``netns_<name|inode>``."""
    own = _inode(self_ns)
    if own is None:
        return None
    init = _inode(init_ns)  # unreadable without ptrace rights on PID 1; then the fixed inode tells
    if own == init or (init is None and own[1] == PROC_NET_INIT_INO):
        return None
    if init is None:
        # An older kernel whose init inode is not fixed and PID 1 we may not inspect: assume init.
        return None
    name = _netns_name(own, run_dir)
    return "netns_" + _element(name if name is not None else str(own[1]))


def bus_name(suffix: str | None = None) -> str:
    """The well-known name of the daemon in this network namespace."""
    if suffix is None:
        suffix = netns_suffix()
    return f"{BUS_NAME}.{suffix}" if suffix else BUS_NAME
