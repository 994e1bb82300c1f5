# SPDX-License-Identifier: GPL-2.0-or-later
"""``topowatch doctor``: what this kernel and system support, each probed, and what follows.

Every finding comes from asking the system, never from a version number: a
request the kernel either honours or ignores, a program that runs or not, a
socket that opens, a name on the bus, a file that holds what it should. Each
finding says what was asked, what came back, and what topowatch does
differently where the feature is missing.

ctnetlink itself is asked first, in the caller's namespace, with the one
request that reads nothing but counters (the per-CPU statistics, as
``conntrack -S``): a kernel without it answers EINVAL (no such nfnetlink
subsystem) or has no NETLINK_NETFILTER at all. Without it nothing else about
conntrack is worth probing, and the filter findings say so.

Theory of operation for the conntrack probes: filters that a kernel does not
know are silently ignored, and an ignored filter on a flush deletes the whole
table. So every probe that sends a filtered request runs in a *throwaway
network namespace*: a thread of this process ``unshare(CLONE_NEWNET)``s,
opens a ctnetlink socket there, creates canary entries and sends the
request. A filter honoured deletes (or dumps) one canary; one ignored
deletes (or dumps) all of them. The namespace dies with the thread and its
socket. Before sending anything the thread checks that its namespace is not
the one the process started in, and refuses otherwise.

This module must never send a filtered request, create an entry or delete
one in the caller's namespace, never load a kernel module (the iptables
programs are run only where their tables already exist), and never change
any configuration. It decides nothing for the daemon: the daemon probes what
it uses itself (``edges.ctnetlink.probe_status_filter``).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import enum
import errno as errno_mod
import glob
import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address
from typing import TypeVar

from topowatch import installcheck
from topowatch.core.conntrack import IPS_ASSURED, IPS_SEEN_REPLY, CtTuple, Entry
from topowatch.edges import ctcodec
from topowatch.edges.ctcodec import DumpParser, be32, encode_tuple, nest, nla
from topowatch.edges.ctnetlink import Conntrack, probe_status_filter
from topowatch.errors import TopowatchError
from topowatch.installcheck import Misplaced
from topowatch.text import run_tool

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NETLINK_XFRM = 6
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
CAP_SYS_ADMIN = 21
TOOL_TIMEOUT = 5.0
BUS_TIMEOUT = 2.0
NETFILTER_SYSCTLS = "/proc/sys/net/netfilter"
BUS_POLICY_DIRS = ("/usr/share/dbus-1/system.d", "/etc/dbus-1/system.d")
# SHA-256 of contrib/dbus/io.github.topowatch.conf in canonical XML (C14N 2.0, comments and
# whitespace between elements dropped): what the bus enforces, not how it is written down.
# tests/netns/test_doctor.py recomputes it from the file, so the two cannot drift apart.
BUS_POLICY_SHA256 = "9b11a3dce14ece2689de8c64296f05387f3c960ff1dc4e9979330ca2de318a0d"
NM_BUS_NAME = "org.freedesktop.NetworkManager"
# Average hash chain length at a full table above which lookups get slow.
CHAIN_WARN = 8

# include/uapi/linux/netfilter/nfnetlink_conntrack.h
CTA_FILTER = 25
CTA_FILTER_ORIG_FLAGS = 1
CTA_FILTER_F_CTA_IP_SRC = 1 << 0

# Canaries: documentation addresses, UDP, in the throwaway namespace only.
_SERVER = IPv4Address("192.0.2.53")
_CANARY_A = IPv4Address("198.18.0.1")
_CANARY_B = IPv4Address("198.18.0.2")


class Status(enum.StrEnum):
    OK = "ok"
    MISSING = "missing"  # probed: the feature is not there
    WARNING = "warning"  # there, but configured in a way that costs something
    SKIPPED = "skipped"  # could not be probed here (the detail says why)


@dataclass(frozen=True, slots=True)
class Finding:
    """One probe: what it asked, what came back, and what topowatch does about a gap."""

    key: str
    title: str
    status: Status
    detail: str
    consequence: str = ""
    required: bool = False  # the daemon cannot run without it


class ProbeRefused(TopowatchError):
    """A namespace probe would have run outside a throwaway namespace."""


# -- throwaway namespace --------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _netns_inode(path: str) -> int:
    return os.stat(path).st_ino


def in_throwaway_netns(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a new thread inside a new, empty network namespace that dies with the thread.

    Raises ``ProbeRefused`` if the thread's namespace is still the caller's,
    and ``PermissionError`` without CAP_SYS_ADMIN.
    """
    own = _netns_inode("/proc/self/ns/net")
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            if _libc.unshare(CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
            if _netns_inode(f"/proc/self/task/{threading.get_native_id()}/ns/net") == own:
                raise ProbeRefused("the probe thread is still in the caller's network namespace")
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name="doctor-throwaway-netns")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


# -- conntrack probes (throwaway namespace only) ----------------------------------------------


def _canary(src: IPv4Address, sport: int, *, replied: bool = False) -> Entry:
    status = IPS_SEEN_REPLY | IPS_ASSURED if replied else 0
    return Entry(2, 17, CtTuple(src, _SERVER, sport, 53), CtTuple(_SERVER, src, 53, sport),
                 status=status, timeout=300)  # fmt: skip


def _filter_attrs(src: IPv4Address) -> list[tuple[int, bytes]]:
    """CTA_TUPLE_ORIG carrying the filter's values, and CTA_FILTER selecting only its source.

    The tuple's ports match no canary, so a kernel that reads it as an exact
    tuple (a single-entry request) finds nothing.
    """
    tup = CtTuple(src, IPv4Address("192.0.2.99"), 9, 9)
    flags = struct.pack("=I", CTA_FILTER_F_CTA_IP_SRC)
    return [
        (ctcodec.CTA_TUPLE_ORIG, encode_tuple(ctcodec.CTA_TUPLE_ORIG, 2, 17, tup)),
        # The flags are host-endian (NLA_U32), unlike every address and port here.
        (CTA_FILTER, nest(CTA_FILTER, nla(CTA_FILTER_ORIG_FLAGS, flags))),
    ]


def _message(msg_type: int, flags: int, seq: int, attrs: Sequence[tuple[int, bytes]]) -> bytes:
    # Built by hand: the codec refuses a DELETE without a tuple (a flush), rightly so
    # everywhere but here, inside a namespace that exists for this request only.
    body = b"".join(raw for _, raw in attrs)
    header = ctcodec._NLMSGHDR.pack(ctcodec._HDR_LEN + len(body), msg_type, flags, seq, 0)
    return header + ctcodec._NFGENMSG.pack(2, 0, 0) + body


def _dump_with(ct: Conntrack, attrs: Sequence[tuple[int, bytes]]) -> tuple[list[Entry], int]:
    seq = ct._next_seq()
    ct._send(_message(ctcodec.IPCTNL_MSG_CT_GET, ctcodec.NLM_F_REQUEST | ctcodec.NLM_F_DUMP, seq, attrs))
    parser = DumpParser(seq=seq, cache=ct.cache)
    while not parser.done:
        data = ct._recv(block=True)
        assert data is not None
        parser.feed(data)
    return parser.entries, parser.errno


def _flush_with(ct: Conntrack, attrs: Sequence[tuple[int, bytes]]) -> int:
    """Send a DELETE without an exact tuple; the kernel's errno (0: accepted)."""
    seq = ct._next_seq()
    ct._send(_message(ctcodec.IPCTNL_MSG_CT_DELETE, ctcodec.NLM_F_REQUEST | ctcodec.NLM_F_ACK, seq, attrs))
    while True:
        data = ct._recv(block=True)
        assert data is not None
        for answer_seq, err in ctcodec.parse_answers(data):
            if answer_seq == seq:
                return err


def _sources(entries: Sequence[Entry]) -> set[IPv4Address]:
    return {e.orig.src for e in entries if isinstance(e.orig.src, IPv4Address)}


def _verdict(left: set[IPv4Address], *, honoured: set[IPv4Address], ignored: set[IPv4Address]) -> str:
    if left == honoured:
        return "honoured"
    if left == ignored:
        return "ignored"
    return "unclear"


@dataclass(frozen=True, slots=True)
class ConntrackProbes:
    status_dump: bool
    tuple_dump: str  # honoured / ignored / refused (errno) / unclear
    status_flush: str  # honoured / ignored (flushed all) / refused / unclear
    tuple_flush: str
    details: dict[str, str]


def probe_conntrack() -> ConntrackProbes:
    """The four ctnetlink filter probes; call only inside ``in_throwaway_netns``."""
    ct = Conntrack(socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, ctcodec.NETLINK_NETFILTER))
    ct.timeout = 5.0
    details: dict[str, str] = {}
    try:
        status_dump = probe_status_filter(ct)
        details["status_dump"] = (
            "a dump with CTA_STATUS_MASK 0 answered EINVAL (the kernel parses the mask)" if status_dump
            else "a dump with CTA_STATUS_MASK 0 was answered: the kernel ignores the status filter"
        )
        a, b = _canary(_CANARY_A, 40001), _canary(_CANARY_B, 40002, replied=True)
        both = {_CANARY_A, _CANARY_B}

        # Tuple filter on dump: canaries A and B, filter "orig source == A".
        ct.create([a, b])
        entries, err = _dump_with(ct, _filter_attrs(_CANARY_A))
        if err:
            tuple_dump = "refused"
            details["tuple_dump"] = f"a dump with CTA_FILTER was refused: {os.strerror(err)}"
        else:
            tuple_dump = _verdict(_sources(entries), honoured={_CANARY_A}, ignored=both)
            details["tuple_dump"] = (f"a dump filtered on canary A's source returned "
                                     f"{len(entries)} of 2 canaries")

        # Status filter on flush: A unreplied, B replied; "flush UNREPLIED" must leave B.
        err = _flush_with(ct, [
            (ctcodec.CTA_STATUS, nla(ctcodec.CTA_STATUS, be32(0))),
            (ctcodec.CTA_STATUS_MASK, nla(ctcodec.CTA_STATUS_MASK, be32(IPS_SEEN_REPLY))),
        ])
        left = _sources(ct.dump(unreplied_only=False))
        if err and left == both:
            status_flush = "refused"
            details["status_flush"] = f"a flush with a status filter was refused: {os.strerror(err)}"
        else:
            status_flush = _verdict(left, honoured={_CANARY_B}, ignored=set())
            details["status_flush"] = (f"a flush of UNREPLIED entries deleted {2 - len(left)} of 2 canaries "
                                       "(one UNREPLIED, one replied)")
        ct.delete(ct.dump(unreplied_only=False))

        # Tuple filter on flush: both canaries unreplied; "flush orig source == A" must leave B.
        ct.create([a, _canary(_CANARY_B, 40002)])
        err = _flush_with(ct, _filter_attrs(_CANARY_A))
        left = _sources(ct.dump(unreplied_only=False))
        if err and left == both:
            tuple_flush = "refused"
            details["tuple_flush"] = (f"a flush with CTA_FILTER was refused or read as an exact tuple: "
                                      f"{os.strerror(err)}")
        else:
            tuple_flush = _verdict(left, honoured={_CANARY_B}, ignored=set())
            details["tuple_flush"] = (f"a flush filtered on canary A's source deleted {2 - len(left)} "
                                      "of 2 canaries")
    finally:
        ct.close()
    return ConntrackProbes(status_dump, tuple_dump, status_flush, tuple_flush, details)


CTNETLINK_TITLE = "ctnetlink (nf_conntrack_netlink)"
CTNETLINK_CONSEQUENCE = (
    "topowatch cannot dump or delete conntrack entries: run, plan and flush fail, and the daemon "
    "refuses to start (load nf_conntrack_netlink; the kernel needs CONFIG_NF_CT_NETLINK)")
# What a kernel answers a ctnetlink request with when the subsystem is not there.
_NO_SUBSYSTEM = (errno_mod.EINVAL, errno_mod.EOPNOTSUPP, errno_mod.ENOENT)


def _netfilter_socket() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, ctcodec.NETLINK_NETFILTER)


def ctnetlink_errno(open_socket: Callable[[], socket.socket] = _netfilter_socket) -> int:
    """The kernel's answer (0: answered) to a per-CPU statistics request in the caller's namespace.

    The request carries no filter and reads only counters. OSError when the
    socket does not open or nothing answers within ``TOOL_TIMEOUT``.
    """
    with open_socket() as sock:
        sock.settimeout(TOOL_TIMEOUT)
        sock.bind((0, 0))
        seq = 1
        sock.send(ctcodec.encode_stats_request(seq))
        totals = dict.fromkeys(ctcodec.CTA_STATS_NAMES.values(), 0)
        while True:
            data = sock.recv(1 << 16)
            try:
                done, err = ctcodec.parse_stats(data, seq, totals)
            except ctcodec.MalformedMessage as exc:
                raise OSError(errno_mod.EBADMSG, f"malformed answer: {exc}") from exc
            if done:
                return err


def _ctnetlink(answer: Callable[[], int] | None = None) -> Finding:
    key, title = "ctnetlink", CTNETLINK_TITLE
    asked = "a conntrack statistics request (counters only, this namespace)"
    try:
        err = (answer or ctnetlink_errno)()
    except OSError as exc:
        if exc.errno in (errno_mod.EPROTONOSUPPORT, errno_mod.EAFNOSUPPORT):
            return Finding(key, title, Status.MISSING,
                           f"a NETLINK_NETFILTER socket does not open ({exc.strerror}): this kernel has no "
                           "nfnetlink", CTNETLINK_CONSEQUENCE, required=True)
        return Finding(key, title, Status.SKIPPED, f"{asked} failed: {exc.strerror or exc}")
    if err == 0:
        return Finding(key, title, Status.OK, f"{asked} was answered")
    if err in (errno_mod.EPERM, errno_mod.EACCES):
        return Finding(key, title, Status.SKIPPED,
                       f"{asked} was refused ({os.strerror(err)}): asking needs CAP_NET_ADMIN")
    if err in _NO_SUBSYSTEM:
        return Finding(key, title, Status.MISSING,
                       f"{asked} was answered {errno_mod.errorcode.get(err, err)} ({os.strerror(err)}): "
                       "the kernel has no ctnetlink subsystem, and could not load it",
                       CTNETLINK_CONSEQUENCE, required=True)
    return Finding(key, title, Status.MISSING, f"{asked} was answered {os.strerror(err)}",
                   CTNETLINK_CONSEQUENCE, required=True)


_CT_KEYS = ("ct_status_dump", "ct_tuple_dump", "ct_status_flush", "ct_tuple_flush")
_CT_TITLES = ("ctnetlink status filter on dump", "ctnetlink tuple filter (CTA_FILTER) on dump",
              "ctnetlink status filter on flush", "ctnetlink tuple filter (CTA_FILTER) on flush")


def _conntrack_findings(ctnetlink: Finding | None = None) -> list[Finding]:
    keys, titles = _CT_KEYS, _CT_TITLES
    if ctnetlink is not None and ctnetlink.status is Status.MISSING:
        # Not skipped: the answer is known. No ctnetlink, no filters on it either.
        return [Finding(k, t, Status.MISSING, f"not probed: ctnetlink itself is missing ({ctnetlink.detail})",
                        "no filter to use without ctnetlink: " + CTNETLINK_CONSEQUENCE)
                for k, t in zip(keys, titles, strict=True)]
    try:
        probes = in_throwaway_netns(probe_conntrack)
    except ProbeRefused as exc:
        return [Finding(k, t, Status.SKIPPED, str(exc)) for k, t in zip(keys, titles, strict=True)]
    except (OSError, TopowatchError) as exc:
        why = f"cannot probe in a throwaway namespace: {exc}"
        if isinstance(exc, PermissionError) or getattr(exc, "errno", 0) == errno_mod.EPERM:
            why += " (needs CAP_SYS_ADMIN: run doctor as root)"
        return [Finding(k, t, Status.SKIPPED, why) for k, t in zip(keys, titles, strict=True)]
    d = probes.details
    out = [
        Finding(keys[0], titles[0], Status.OK if probes.status_dump else Status.MISSING, d["status_dump"],
                "" if probes.status_dump else
                "the daemon dumps every entry and keeps the UNREPLIED ones itself: the same result, "
                "with more data copied per reaction"),
        Finding(keys[1], titles[1], Status.OK if probes.tuple_dump == "honoured" else Status.MISSING,
                f"{d['tuple_dump']} ({probes.tuple_dump})",
                "" if probes.tuple_dump == "honoured" else
                "none: topowatch does not depend on it (it selects entries in userspace)"),
    ]
    for key, title, verdict in ((keys[2], titles[2], probes.status_flush),
                                (keys[3], titles[3], probes.tuple_flush)):
        if verdict == "honoured":
            status, consequence = Status.OK, ""  # unused by design: staleness is no filter
        elif verdict == "ignored":
            status, consequence = Status.MISSING, (
                "DANGER for other tools: this kernel flushes the WHOLE table when given this filter; "
                "topowatch never sends a flush (it deletes by exact tuple)")
        else:
            status, consequence = Status.MISSING, (
                "none: topowatch never sends a flush (it deletes by exact tuple, safe on every kernel)")
        out.append(Finding(key, title, status, f"{d[key.removeprefix('ct_')]} ({verdict})", consequence))
    return out


# -- everything else -----------------------------------------------------------------------------


def _cap_effective() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def _permissions() -> Finding:
    caps = _cap_effective()
    names = [n for bit, n in ((CAP_NET_ADMIN, "CAP_NET_ADMIN"), (CAP_NET_RAW, "CAP_NET_RAW"),
                              (CAP_SYS_ADMIN, "CAP_SYS_ADMIN")) if caps >> bit & 1]
    detail = f"euid {os.geteuid()}, effective capabilities: {', '.join(names) or 'none of the relevant'}"
    if not caps >> CAP_NET_ADMIN & 1:
        return Finding("permissions", "permissions", Status.MISSING, detail,
                       "run, plan and flush cannot read or change the conntrack table: run them as root "
                       "(the systemd unit grants CAP_NET_ADMIN)", required=True)
    if not caps >> CAP_NET_RAW & 1:
        return Finding("permissions", "permissions", Status.WARNING, detail,
                       "iptables-legacy-save cannot read legacy tables: legacy NAT rules stay unknown, "
                       "so entries they cover are judged by egress change only")
    return Finding("permissions", "permissions", Status.OK, detail)


def _run(argv: Sequence[str]) -> tuple[int, str]:
    try:
        proc = run_tool(argv, timeout=TOOL_TIMEOUT)
    except FileNotFoundError:
        return 127, "not installed"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 126, str(exc)
    message = (proc.stderr.strip().splitlines() or [""])[0]
    return proc.returncode, message


def _tool(key: str, title: str, argv: Sequence[str], consequence: str, *, gate: str | None = None) -> Finding:
    if shutil.which(argv[0]) is None:
        return Finding(key, title, Status.MISSING, f"{argv[0]} not found on PATH", consequence)
    if gate is not None:
        try:
            with open(gate) as f:
                present = bool(f.read().split())
        except OSError:
            present = False
        if not present:
            return Finding(key, title, Status.OK,
                           f"{argv[0]} is installed; no table exists ({gate} empty or absent), so it was "
                           "not run (running it could load kernel modules)")
    code, message = _run(argv)
    if code == 0:
        return Finding(key, title, Status.OK, f"`{' '.join(argv)}` ran")
    return Finding(key, title, Status.MISSING, f"`{' '.join(argv)}` failed ({code}): {message}", consequence)


def _xfrm() -> Finding:
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM)
    except OSError as exc:
        return Finding("xfrm", "xfrm (IPsec policies)", Status.MISSING,
                       f"a NETLINK_XFRM socket does not open: {exc.strerror}",
                       "IPsec policy changes are not seen as events: IPsec tunnels are noticed only "
                       "through the routes, NetworkManager and the strongSwan hook")
    sock.close()
    return Finding("xfrm", "xfrm (IPsec policies)", Status.OK, "a NETLINK_XFRM socket opens")


async def _bus_names(names: Sequence[str]) -> dict[str, bool]:
    from dbus_fast import BusType, Message
    from dbus_fast.aio import MessageBus

    bus = await asyncio.wait_for(MessageBus(bus_type=BusType.SYSTEM).connect(), BUS_TIMEOUT)
    try:
        owned: dict[str, bool] = {}
        for name in names:
            reply = await asyncio.wait_for(bus.call(Message(
                destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus", member="NameHasOwner", signature="s", body=[name],
            )), BUS_TIMEOUT)  # fmt: skip
            owned[name] = bool(reply is not None and reply.body and reply.body[0])
        return owned
    finally:
        bus.disconnect()


def _bus() -> list[Finding]:
    from topowatch import dbus as names

    own = names.bus_name()
    missing = names.missing_dependency()
    if missing is not None:
        why = f"cannot ask the system bus: {missing}"
        return [Finding("networkmanager", "NetworkManager on the system bus", Status.SKIPPED, why),
                Finding("daemon_on_bus", f"topowatch daemon on the bus ({own})", Status.SKIPPED, why)]
    try:
        owned = asyncio.run(_bus_names([NM_BUS_NAME, own]))
    except Exception as exc:  # any failure to reach the bus is the finding itself
        why = f"system bus {names.system_bus_address()} not reachable: {exc or type(exc).__name__}"
        return [
            Finding("networkmanager", "NetworkManager on the system bus", Status.MISSING, why,
                    "no NetworkManager events: reactions come from kernel events and the hooks only"),
            Finding("daemon_on_bus", f"topowatch daemon on the bus ({own})", Status.MISSING, why,
                    "the daemon runs without D-Bus: `status`/`trigger` do not work; the hooks fall back "
                    "to their configured action"),
        ]
    nm = Finding("networkmanager", "NetworkManager on the system bus",
                 Status.OK if owned[NM_BUS_NAME] else Status.MISSING,
                 f"{NM_BUS_NAME} {'has' if owned[NM_BUS_NAME] else 'has no'} owner",
                 "" if owned[NM_BUS_NAME] else
                 "no NetworkManager events: reactions come from kernel events (and the ppp/strongSwan hooks)")
    daemon = Finding("daemon_on_bus", f"topowatch daemon on the bus ({own})",
                     Status.OK if owned[own] else Status.MISSING,
                     f"{own} {'has' if owned[own] else 'has no'} owner",
                     "" if owned[own] else
                     "`topowatch status`/`trigger` cannot reach a daemon; the hooks fall back to their "
                     "configured action (one-shot flush or nothing)")
    return [nm, daemon]


def policy_digest(text: str) -> str:
    """SHA-256 of a bus policy in canonical XML: the same for any layout, comments or none."""
    return hashlib.sha256(ET.canonicalize(text, strip_text=True).encode()).hexdigest()


def _bus_policy(dirs: Sequence[str] = BUS_POLICY_DIRS) -> Finding:
    key, title = "bus_policy", "D-Bus policy installed"
    found = sorted(p for d in dirs for p in glob.glob(os.path.join(d, "*topowatch*.conf")))
    if not found:
        return Finding(key, title, Status.MISSING, f"no *topowatch*.conf in {' or '.join(dirs)}",
                       "the system bus refuses the daemon's name: it runs without D-Bus (install "
                       "contrib's bus policy file to get status, trigger and signals)")
    differ: list[str] = []
    for path in found:
        try:
            with open(path, encoding="utf-8") as f:
                digest = policy_digest(f.read())
        except (OSError, UnicodeDecodeError, ET.ParseError) as exc:
            differ.append(f"{path} (unreadable: {exc})")
            continue
        if digest != BUS_POLICY_SHA256:
            differ.append(path)
    if not differ:
        return Finding(key, title, Status.OK, f"{', '.join(found)}: the policy shipped with topowatch")
    return Finding(key, title, Status.WARNING,
                   f"{', '.join(differ)}: not the policy shipped with topowatch "
                   "(contrib/dbus/io.github.topowatch.conf; compared without comments and layout)",
                   "the bus enforces what that file says: the daemon may be refused its name, or others "
                   "allowed Trigger, Reload and Plan; install the shipped file or review the changes")


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _table(sysctl_dir: str = NETFILTER_SYSCTLS) -> Finding:
    buckets = _read_int(os.path.join(sysctl_dir, "nf_conntrack_buckets"))
    limit = _read_int(os.path.join(sysctl_dir, "nf_conntrack_max"))
    count = _read_int(os.path.join(sysctl_dir, "nf_conntrack_count"))
    title = "conntrack hash size vs max"
    if buckets is None or limit is None:
        return Finding("ct_table", title, Status.SKIPPED,
                       f"{sysctl_dir}/nf_conntrack_buckets or _max unreadable (nf_conntrack not loaded?)")
    chain = limit / buckets if buckets else float("inf")
    detail = (f"nf_conntrack_buckets {buckets}, nf_conntrack_max {limit} (average chain {chain:.1f} at a "
              f"full table), nf_conntrack_count {count if count is not None else '?'}")
    if chain > CHAIN_WARN:
        return Finding("ct_table", title, Status.WARNING, detail,
                       f"more than {CHAIN_WARN} entries per bucket when full: every lookup, including "
                       "topowatch's delete by tuple, walks a long chain; raise nf_conntrack_buckets")
    return Finding("ct_table", title, Status.OK, detail)


def _scan_path() -> Finding:
    """Whether the dump scan runs compiled (edges/_ctscan.c) or on its pure-Python fallback."""
    from topowatch.edges import ctcodec

    title = "conntrack scan fast path"
    if ctcodec.FAST_PATH == "compiled":
        return Finding("scan_path", title, Status.OK, "compiled (topowatch.edges._ctscan)")
    return Finding("scan_path", title, Status.WARNING, ctcodec.FAST_PATH,
                   "every dump is decoded and judged in Python, about twice as slow on a large table; "
                   "reinstall with a C compiler and the Python headers present")  # fmt: skip


def _install(check: Callable[[], Sequence[Misplaced]] | None = None) -> list[Finding]:
    """Shipped files installed where their consumer does not look, each with the command that fixes it."""
    problems = (check or installcheck.check)()
    if not problems:
        return [Finding("install", "shipped files", Status.OK,
                        "the unit, bus policy and dispatcher hook found under "
                        f"{', '.join(installcheck.install_prefixes())} are where systemd, dbus-daemon and "
                        "NetworkManager read them, and the units name an executable")]
    return [Finding(f"install_{i}", "shipped file", Status.WARNING, f"{p.path}: {p.problem}", f"fix: {p.fix}")
            for i, p in enumerate(problems, 1)]


def run_doctor() -> list[Finding]:
    ctnetlink = _ctnetlink()
    findings = [_permissions(), ctnetlink]
    findings += _conntrack_findings(ctnetlink)
    findings.append(_tool("nft", "nftables (nft)", ["nft", "-j", "list", "tables"],
                          "the daemon cannot read the NAT ruleset and refuses to start", ))
    findings.append(_tool("iptables_nft", "iptables-nft-save", ["iptables-nft-save"],
                          "tables holding xt matches (e.g. -m policy --pol ipsec) are read only from "
                          "`nft -j`, where such matches stay unknown: entries they cover are judged by "
                          "egress change only"))
    findings.append(_tool("iptables_legacy", "iptables-legacy-save", ["iptables-legacy-save"],
                          "legacy NAT tables cannot be read: their rules stay unknown and entries they "
                          "cover are judged by egress change only", gate="/proc/net/ip_tables_names"))
    findings.append(_xfrm())
    findings += _bus()
    findings.append(_bus_policy())
    findings.append(_table())
    findings.append(_scan_path())
    findings += _install()
    return findings


def render_text(findings: Sequence[Finding]) -> str:
    lines: list[str] = []
    for f in findings:
        lines.append(f"[{f.status.value:^7}] {f.title}: {f.detail}")
        if f.consequence:
            lines.append(f"          -> {f.consequence}")
    return "\n".join(lines)


def doctor_main(*, as_json: bool = False) -> int:
    """Print the findings; exit 1 when something the daemon needs is missing."""
    findings = run_doctor()
    failed = any(f.required and f.status is Status.MISSING for f in findings)
    if as_json:
        print(json.dumps({"ok": not failed, "findings": [asdict(f) for f in findings]}, indent=2))
    else:
        print(render_text(findings))
    return 1 if failed else 0
