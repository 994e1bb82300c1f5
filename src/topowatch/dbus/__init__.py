# SPDX-License-Identifier: GPL-2.0-or-later
"""topowatch on D-Bus: the well-known name, object path and interface, and where the bus is.

Names (one daemon per network namespace):

- bus name ``io.github.topowatch`` in the init network namespace; elsewhere
  ``io.github.topowatch.netns_<escaped name>`` when ``ip netns`` knows the namespace
  (``/run/netns/<name>`` is a bind mount of it), else ``io.github.topowatch.inode_<inode>``;
- object ``/io/github/topowatch`` exporting interface ``io.github.topowatch.Agent1``.

The mapping is one-to-one, so two namespaces never share a name: a bus name
element holds only ``[A-Za-z0-9_]``, so every other byte of the namespace
name, and ``_`` itself, is written ``_xx`` (two lowercase hex digits, as
systemd's ``bus_label_escape``): ``ns-x`` is ``netns_ns_2dx``, ``ns_x`` is
``netns_ns_5fx``. A name too long for the bus (255 characters in all) is
``netnsh_<sha256 of the name>``. ``netns_``, ``netnsh_`` and ``inode_`` never
meet. ``topowatch bus-name`` prints it: the CLI, the daemon and every hook ask
this one function.

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
trio-asyncio (``topowatch bus-name`` and the hooks need only the name) and
never connect to anything; ``service``, ``networkmanager`` and ``client`` do.
"""

from __future__ import annotations

import hashlib
import logging
import os

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
MAX_BUS_NAME = 255

log = logging.getLogger("topowatch.dbus")


def system_bus_address() -> str:
    return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or SYSTEM_BUS_DEFAULT


def missing_dependency() -> str | None:
    """Why D-Bus support cannot work here (None when it can)."""
    try:
        import dbus_fast  # noqa: F401
        import trio_asyncio  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed (a dependency of topowatch: reinstall it)"
    return None


def inode_of(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def netns_name(own: tuple[int, int], run_dir: str = NETNS_RUN_DIR) -> str | None:
    """What ``ip netns identify`` answers: the /run/netns entry bound to the namespace ``own``."""
    try:
        names = sorted(os.listdir(run_dir))
    except OSError:
        return None
    for name in names:
        if inode_of(os.path.join(run_dir, name)) == own:
            return name
    return None


def escape(name: str) -> str:
    """``name`` as bus name element characters, one-to-one: [A-Za-z0-9] kept, every other byte ``_xx``."""
    return "".join(
        chr(b) if chr(b).isascii() and chr(b).isalnum() else f"_{b:02x}"
        for b in os.fsencode(name)
    )


def named_suffix(name: str) -> str:
    """The suffix of the daemon's bus name in the network namespace ``ip netns`` calls ``name``."""
    suffix = "netns_" + escape(name)
    if len(BUS_NAME) + 1 + len(suffix) > MAX_BUS_NAME:
        suffix = "netnsh_" + hashlib.sha256(os.fsencode(name)).hexdigest()
    return suffix


def in_init_netns(
    own: tuple[int, int], init_ns: str = "/proc/1/ns/net", net_core: str = NET_CORE_SYSCTLS
) -> bool | None:
    """Is ``own`` (st_dev, st_ino of our ``ns/net``) the init network namespace? None: cannot tell."""
    init = inode_of(init_ns)
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
    """None in the init network namespace, else ``netns_<escaped name>`` or ``inode_<inode>``.

    Also when it cannot be told which namespace is the init one (never the bare name then).
    """
    own = inode_of(self_ns)
    if own is None:
        return None  # no /proc at all: nothing tells namespaces apart, nor could two daemons meet
    init = in_init_netns(own, init_ns, net_core)
    if init:
        return None
    name = netns_name(own, run_dir)
    suffix = named_suffix(name) if name is not None else f"inode_{own[1]}"
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
