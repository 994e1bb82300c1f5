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

This module never writes a sysctl outside ``root`` and never changes a
timeout it did not read first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from topowatch.core.model import Netconf
from topowatch.errors import TopowatchError

log = logging.getLogger("topowatch.sysctl")

NETFILTER = "/proc/sys/net/netfilter"
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


class TimeoutLedger:
    def __init__(self, path: str) -> None:
        self.path = path

    @classmethod
    def for_namespace(cls, state_dir: str = STATE_DIR) -> TimeoutLedger:
        return cls(os.path.join(state_dir, f"pressure-{netns_key()}.json"))

    def save(self, record: LedgerRecord) -> None:
        directory = os.path.dirname(self.path) or "."
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".pressure-", dir=directory)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump({"saved": record.saved, "written": record.written}, f, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            raise SysctlError(f"cannot save the timeouts to restore in {self.path}: {exc.strerror}") from exc

    def load(self) -> LedgerRecord | None:
        """The record a previous run left, or None. A damaged file is set aside (``.bad``) and said so."""
        try:
            with open(self.path, encoding="utf-8") as f:
                doc = json.load(f)
            record = LedgerRecord(
                {str(k): int(v) for k, v in doc["saved"].items()},
                {str(k): int(v) for k, v in doc["written"].items()},
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("pressure ledger %s is unreadable (%s); setting it aside as %s.bad",
                      self.path, exc, self.path)
            with contextlib.suppress(OSError):
                os.replace(self.path, self.path + ".bad")
            return None
        return record

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


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
