# SPDX-License-Identifier: GPL-2.0-or-later
"""Conntrack sysctls of this namespace, the ledger that survives a crash while they are lowered,
and the IPv4 reverse-path settings (``read_netconf``) the topology snapshot carries.

Decides nothing. ``ConntrackSysctl`` reads ``nf_conntrack_count``, ``_max``
and ``_buckets`` and reads and writes the per-namespace state timeouts under
``/proc/sys/net/netfilter`` (a root given for tests). ``_max`` and
``_buckets`` can be written only in the init namespace: elsewhere the kernel
answers EINVAL or EACCES, reported as ``SysctlError``, never retried.

``TimeoutLedger`` is the crash-safety of lowered timeouts: before the first
write, the values read are saved to a file keyed by the network namespace
(``pressure-<key>.json`` in the state directory, ``/run/topowatch`` by
default: gone at reboot, exactly when the kernel's values are back to
their defaults anyway), written atomically (temporary file, fsync, rename).
A daemon that starts and finds its namespace's ledger restores it and
removes it. Daemons in different namespaces never share a ledger.

The ledger is trusted only as far as who could have written it: the state
directory (and every directory above it) and the ledger itself must be
owned by root or by us and not writable by others (``topowatch.trust``),
and the ledger is opened without following a symlink. Of what it says,
only timeouts the agent itself may lower (``core.pressure.LOWERABLE``) are
restored, and only to a value within ``SANE_TIMEOUTS`` above the one
written: a ledger asking for ``tcp_timeout_established=5`` restores nothing.

This module never writes a sysctl outside ``root`` and never changes a
timeout it did not read first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from topowatch.core.model import Netconf
from topowatch.core.pressure import LOWERABLE
from topowatch.errors import TopowatchError
from topowatch.trust import (
    UntrustedDirectory,
    default_trusted_uids,
    directory_problem,
    trust_problem,
    write_private,
)

log = logging.getLogger("topowatch.sysctl")

NETFILTER = "/proc/sys/net/netfilter"
# A value a ledger may restore: from one second to the kernel's longest default (5 days).
SANE_TIMEOUTS = range(1, 432_000 + 1)
MAX_LEDGER_BYTES = 65536
STATE_DIR = "/run/topowatch"
SO_NETNS_COOKIE = 71  # include/uapi/asm-generic/socket.h (>= 5.14)


class SysctlError(TopowatchError):
    """A sysctl could not be read or written (what, and the kernel's reason)."""


def sysctl_name(short: str) -> str:
    """``udp`` -> ``nf_conntrack_udp_timeout``; ``tcp_syn_sent`` -> ``nf_conntrack_tcp_timeout_syn_sent``."""
    proto, _, state = short.partition("_")
    return f"nf_conntrack_{proto}_timeout" + (f"_{state}" if state else "")


@dataclass(frozen=True, slots=True)
class TableSize:
    count: int
    max: int
    buckets: int


class ConntrackSysctl:
    def __init__(self, root: str = NETFILTER) -> None:
        self.root = root

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def read(self, name: str) -> int:
        try:
            with open(self._path(name), encoding="ascii") as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not an integer"
            raise SysctlError(f"cannot read {self._path(name)}: {why}") from exc

    def write(self, name: str, value: int) -> None:
        try:
            with open(self._path(name), "w", encoding="ascii") as f:
                f.write(f"{int(value)}\n")
        except OSError as exc:
            raise SysctlError(f"cannot write {value} to {self._path(name)}: {exc.strerror}") from exc

    def table(self) -> TableSize:
        return TableSize(self.read("nf_conntrack_count"), self.read("nf_conntrack_max"),
                         self.read("nf_conntrack_buckets"))

    def timeouts(self, names: Iterable[str]) -> dict[str, int]:
        """The timeouts that exist here (a module not loaded, e.g. gre, leaves its names out)."""
        out: dict[str, int] = {}
        for name in names:
            with contextlib.suppress(SysctlError):
                out[name] = self.read(sysctl_name(name))
        return out

    def set_timeouts(self, values: Mapping[str, int]) -> dict[str, int]:
        """Write each value; returns what was written. Stops at the first failure (raises)."""
        written: dict[str, int] = {}
        for name, value in values.items():
            self.write(sysctl_name(name), value)
            written[name] = value
        return written


def netns_key() -> str:
    """A name for this network namespace that no other live namespace has.

    The namespace cookie (unique for the boot, never reused) where the kernel
    has it; else the device and inode of ``/proc/thread-self/ns/net``.
    """
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            cookie = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        return f"cookie-{int.from_bytes(cookie, 'little')}"
    except OSError:
        st = os.stat("/proc/thread-self/ns/net")
        return f"ino-{st.st_dev}-{st.st_ino}"


@dataclass(frozen=True, slots=True)
class LedgerRecord:
    saved: dict[str, int]  # the values before topowatch lowered them
    written: dict[str, int]  # what topowatch wrote


def sane_record(saved: Mapping[str, object], written: Mapping[str, object]) -> tuple[LedgerRecord, list[str]]:
    """What of a ledger may be restored, and a sentence for each entry refused.

    Only timeouts the agent may lower; integers within ``SANE_TIMEOUTS``; a
    written value below the saved one (the agent only ever lowers).
    """
    good_saved: dict[str, int] = {}
    good_written: dict[str, int] = {}
    refused: list[str] = []
    for name, value in saved.items():
        wrote = written.get(name)
        if name not in LOWERABLE:
            refused.append(f"{name}: not a timeout topowatch lowers")
        elif type(value) is not int or value not in SANE_TIMEOUTS:
            refused.append(f"{name}: saved value {value!r} is not a sane timeout")
        elif wrote is not None and (type(wrote) is not int or wrote not in SANE_TIMEOUTS or wrote >= value):
            refused.append(f"{name}: written value {wrote!r} is not below the saved {value}")
        else:
            good_saved[name] = value
            if wrote is not None:
                good_written[name] = wrote
    return LedgerRecord(good_saved, good_written), refused


class TimeoutLedger:
    def __init__(self, path: str, *, trusted_uids: Collection[int] | None = None) -> None:
        self.path = path
        self.trusted_uids = default_trusted_uids() if trusted_uids is None else frozenset(trusted_uids)

    @classmethod
    def for_namespace(cls, state_dir: str = STATE_DIR) -> TimeoutLedger:
        return cls(os.path.join(state_dir, f"pressure-{netns_key()}.json"))

    def save(self, record: LedgerRecord) -> None:
        data = json.dumps({"saved": record.saved, "written": record.written}, sort_keys=True).encode()
        try:
            write_private(self.path, data, prefix=".pressure-", trusted_uids=self.trusted_uids)
        except UntrustedDirectory as exc:
            raise SysctlError(f"will not save the timeouts to restore in {self.path}: {exc}") from exc
        except OSError as exc:
            raise SysctlError(f"cannot save the timeouts to restore in {self.path}: {exc.strerror}") from exc

    def load(self) -> LedgerRecord | None:
        """The record a previous run left, or None. A damaged file is set aside (``.bad``) and said so.

        A ledger someone else could have written is not used at all (logged);
        entries that are not sane are left out (logged), the rest restored.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("pressure ledger %s cannot be opened (%s: a symlink is never followed); not restoring "
                      "from it", self.path, exc.strerror or exc)
            return None
        try:
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                problem = directory_problem(os.path.dirname(self.path) or ".", self.trusted_uids)
                if not stat.S_ISREG(st.st_mode):
                    problem = "not a regular file"
                problem = problem or trust_problem(self.path, st, self.trusted_uids)
                if problem:
                    log.error("pressure ledger %s is not trusted (%s); not restoring from it",
                              self.path, problem)
                    return None
                doc = json.loads(f.read(MAX_LEDGER_BYTES + 1))
            record, refused = sane_record({str(k): int(v) for k, v in doc["saved"].items()},
                                          {str(k): int(v) for k, v in doc["written"].items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            log.error("pressure ledger %s is unreadable (%s); setting it aside as %s.bad",
                      self.path, exc, self.path)
            with contextlib.suppress(OSError):
                os.replace(self.path, self.path + ".bad")
            return None
        for reason in refused:
            log.error("pressure ledger %s: %s; not restoring it", self.path, reason)
        return record

    def clear(self) -> bool:
        """Remove the ledger (the timeouts are back); False, logged, when it cannot be removed.

        A read-only or broken state directory must not stop the daemon once the
        timeouts are restored: the ledger left behind only makes a later start
        find the values already restored, which ``restore_plan`` leaves alone
        (as values someone else set).
        """
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return True
        except OSError as exc:
            log.error("cannot remove the pressure ledger %s (%s); the timeouts are restored, going on",
                      self.path, exc.strerror or exc)
            return False
        return True


IPV4_CONF = "/proc/sys/net/ipv4/conf"


def read_netconf(root: str = IPV4_CONF) -> tuple[Netconf, ...]:
    """``rp_filter`` and ``src_valid_mark`` of ``all``, ``default`` and every interface, as read now.

    Read in the namespace of the calling thread (``/proc/sys/net`` is per
    namespace). An interface that vanishes while it is read is left out; a
    value that cannot be read or parsed raises ``SysctlError``.
    """
    try:
        names = sorted(os.listdir(root))
    except OSError as exc:
        raise SysctlError(f"cannot list {root}: {exc.strerror}") from exc
    found: list[Netconf] = []
    for name in names:
        values: list[int] = []
        for key in ("rp_filter", "src_valid_mark"):
            path = os.path.join(root, name, key)
            try:
                with open(path, "rb") as f:
                    text = f.read().decode("ascii", "replace").strip()
            except FileNotFoundError:
                break  # the interface left meanwhile
            except OSError as exc:
                raise SysctlError(f"cannot read {path}: {exc.strerror}") from exc
            try:
                values.append(int(text))
            except ValueError as exc:
                raise SysctlError(f"{path}: not a number: {text!r}") from exc
        if len(values) == 2:
            try:
                found.append(Netconf(name, values[0], bool(values[1])))
            except ValueError as exc:
                raise SysctlError(f"{root}/{name}: {exc}") from exc
    return tuple(found)
