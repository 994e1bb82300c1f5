"""topowatch on D-Bus: the well-known name, object path and interface, and where the bus is.

Names (one daemon per network namespace):

- bus name ``io.github.topowatch`` in the init network namespace; elsewhere
  ``io.github.topowatch.netns_<name>`` when ``ip netns`` knows the namespace
  (``/run/netns/<name>`` is a bind mount of it) or ``io.github.topowatch.netns_<inode>``;
- object ``/io/github/topowatch`` exporting interface ``io.github.topowatch.Agent1``.

Which namespace is the init one, asked in turn until one answers:

1. ``/proc/1/ns/net`` against ``/proc/self/ns/net`` (needs ptrace rights on
   PID 1: under ``ProtectProc=invisible`` or in a container it is unreadable);
2. the fixed inode of the init namespace (``PROC_NET_INIT_INO``, recent kernels):
   ours equal to it is the init namespace;
3. the sysctls the kernel registers in the init namespace only
   (``net.core.netdev_max_backlog`` and friends, for as long as network
   namespaces exist): ``/proc/sys/net`` shows the reader's namespace, so they
   are there exactly when we are in the init one.

When none answers, the name is the one for another namespace (from our own
inode) and a warning says so: two daemons in two namespaces must never both
take the bare name.

The system bus address comes from ``DBUS_SYSTEM_BUS_ADDRESS``, else the
well-known socket, as every D-Bus library does.

This module decides names only. It must never import dbus-fast or
trio-asyncio (they are an optional extra: ``topowatch[dbus]``) and never
connect to anything; ``service``, ``networkmanager`` and ``client`` do.
"""

from __future__ import annotations

import logging
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
NET_CORE_SYSCTLS = "/proc/sys/net/core"
# Registered for init_net only (net/core/sysctl_net_core.c, ``net_core_table``).
INIT_ONLY_SYSCTLS = ("netdev_max_backlog", "message_cost", "dev_weight", "netdev_budget")
# Registered in every namespace (``netns_core_table``): present means the directory is readable.
PER_NETNS_SYSCTL = "somaxconn"

log = logging.getLogger("topowatch.dbus")


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


def in_init_netns(
    own: tuple[int, int], init_ns: str = "/proc/1/ns/net", net_core: str = NET_CORE_SYSCTLS
) -> bool | None:
    """Is ``own`` (st_dev, st_ino of our ``ns/net``) the init network namespace? None: cannot tell."""
    init = _inode(init_ns)
    if init is not None:
        return own == init
    if own[1] == PROC_NET_INIT_INO:
        return True  # no namespace but the init one gets an inode below the dynamic range
    if any(os.path.exists(os.path.join(net_core, name)) for name in INIT_ONLY_SYSCTLS):
        return True
    if os.path.exists(os.path.join(net_core, PER_NETNS_SYSCTL)):
        return False
    return None


def netns_suffix(
    self_ns: str = "/proc/self/ns/net",
    init_ns: str = "/proc/1/ns/net",
    run_dir: str = NETNS_RUN_DIR,
    net_core: str = NET_CORE_SYSCTLS,
) -> str | None:
    """None in the init network namespace, else ``netns_<name|inode>`` (also when it cannot be told)."""
    own = _inode(self_ns)
    if own is None:
        return None  # no /proc at all: nothing tells namespaces apart, nor could two daemons meet
    init = in_init_netns(own, init_ns, net_core)
    if init:
        return None
    name = _netns_name(own, run_dir)
    suffix = "netns_" + _element(name if name is not None else str(own[1]))
    if init is None:
        log.warning("cannot tell whether this is the init network namespace (%s unreadable, inode %d is "
                    "not the fixed init inode, %s shows no sysctls): using the bus name %s.%s",
                    init_ns, own[1], net_core, BUS_NAME, suffix)
    return suffix


def bus_name(suffix: str | None = None) -> str:
    """The well-known name of the daemon in this network namespace."""
    if suffix is None:
        suffix = netns_suffix()
    return f"{BUS_NAME}.{suffix}" if suffix else BUS_NAME
