# SPDX-License-Identifier: GPL-2.0-or-later
"""Ruleset changes as reactor triggers: nftables generation events, a legacy-iptables poll, an ipset poll.

What it decides: when the NAT ruleset may have changed, so that the reactor
re-reads it and re-evaluates entries (a NAT rule added after a flow started
must be able to fix it). It never reads or parses the ruleset itself
(``edges.nft`` does), never changes it, and never leaves the namespace it
was started in.

Theory of operation:

- nftables: a ``NETLINK_NETFILTER`` socket joined to ``NFNLGRP_NFTABLES``.
  Every committed transaction ends with one ``NFT_MSG_NEWGEN`` (the new
  ruleset generation) after the messages for each object it changed, so one
  trigger per NEWGEN coalesces a transaction into one reaction; the object
  messages themselves are only counted. An overrun (``ENOBUFS``) yields an
  overrun trigger and the stream goes on: the queued backlog is discarded at
  once, because the kernel drops every new notification without another
  ENOBUFS until the queue has been read empty (as ``edges.rtnl`` does).
- iptables-legacy gives no events, so ``LegacyNatPoll`` polls, but only
  while this namespace has a legacy nat table: then, every ``interval``
  seconds, it runs ``iptables-legacy-save -t nat`` (and the ip6 one) and
  yields a trigger when the text (without comments and counters) differs
  from the previous poll. Whether a table exists is a cheap read of
  ``/proc/thread-self/net/ip_tables_names`` (and ``ip6_tables_names``),
  never a program run: ``iptables-legacy-save`` would instantiate the table.
  It is read at start and by ``recheck()``, which the kernel backend calls
  after every topology snapshot and ruleset read; those happen only on
  events, so with no legacy nat table the poll has no timer at all and an
  idle daemon never wakes up. A legacy nat table made without any other
  event is noticed at the next reaction.
- ipsets give no events either, and an iptables ``-m set --match-set S``
  rule means what S holds now. ``IpsetPoll`` is told, after every ruleset
  read, which sets the ruleset names and what that read saw of each
  (``watch``); while there is at least one, every ``interval`` seconds it
  runs ``ipset save S`` for each (never for sets the ruleset does not name,
  however large) and yields a trigger naming the sets whose digest (type,
  family, members and ``nomatch`` members, sorted: what the parser reads;
  timeouts and counters are not) differs from the last one compared. The
  first comparison after a read is against what that read saw, so a change
  between the read and the next poll is not missed; a poll that disagrees
  with a read that saw the same as the previous read (the two reads cannot
  agree, say) is taken as the new reference rather than triggering again at
  every poll. With no set named there is no timer: ``watch`` with none
  cancels the sleep, and the poll waits for the next ``watch``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import socket
import struct
import subprocess
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from topowatch.edges.iptables import IpSet, read_named_ipsets
from topowatch.edges.rtnl import receive, subscribe
from topowatch.sources import Trigger
from topowatch.text import run_tool

log = logging.getLogger(__name__)

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN = 15  # enum nf_tables_msg_types
NFT_MSG_GETGEN = 16
NLM_F_REQUEST = 1
NFTA_GEN_ID = 1
NFTA_GEN_PROC_PID = 2
NFTA_GEN_PROC_NAME = 3
EVENT_RCVBUF = 4 << 20

NFTABLES_SOURCE = "nftables"
LEGACY_SOURCE = "iptables-legacy"
LEGACY_INTERVAL = 10.0
IPSET_SOURCE = "ipset"
IPSET_INTERVAL = 5.0
# The policy trigger kind of every trigger made here.
RULESET_KIND = "ruleset"


@dataclass(frozen=True, slots=True)
class Generation:
    """One committed nftables transaction: the new generation id and who made it."""

    genid: int
    pid: int | None = None
    process: str | None = None

    def describe(self) -> str:
        who = ""
        if self.process:
            who = f" by {self.process}" + (f" (pid {self.pid})" if self.pid else "")
        elif self.pid:
            who = f" by pid {self.pid}"
        return f"nftables ruleset changed (generation {self.genid}{who})"


def _attrs(payload: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + 4 <= len(payload):
        length, kind = struct.unpack_from("=HH", payload, offset)
        if length < 4 or offset + length > len(payload):
            return
        yield kind & 0x3FFF, payload[offset + 4 : offset + length]
        offset += (length + 3) & ~3


def parse_generations(data: bytes) -> tuple[list[Generation], int]:
    """The NEWGEN messages in one datagram, and how many other nftables messages it held."""
    gens: list[Generation] = []
    others = 0
    offset = 0
    while offset + 16 <= len(data):
        length, kind, _flags, _seq = struct.unpack_from("=IHHI", data, offset)
        if length < 16 or offset + length > len(data):
            break
        body = data[offset + 16 : offset + length]
        offset += (length + 3) & ~3
        if kind != (NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWGEN):
            others += 1
            continue
        genid, pid, name = 0, None, None
        if len(body) >= 4:
            genid = struct.unpack_from("!H", body, 2)[0]  # nfgenmsg.res_id: the low 16 bits
        for attr, value in _attrs(body[4:]):
            if attr == NFTA_GEN_ID and len(value) >= 4:
                genid = struct.unpack_from("!I", value)[0]
            elif attr == NFTA_GEN_PROC_PID and len(value) >= 4:
                pid = struct.unpack_from("!I", value)[0]
            elif attr == NFTA_GEN_PROC_NAME:
                name = value.split(b"\0", 1)[0].decode(errors="replace") or None
        gens.append(Generation(genid, pid, name))
    return gens, others


def current_generation(timeout: float = 2.0) -> int | None:
    """The nftables ruleset generation of this namespace now (``NFT_MSG_GETGEN``); None if it cannot be asked.

    Blocking (a worker thread calls it); one request, one answer. The id
    changes with every committed transaction, iptables-nft's included (not
    with legacy iptables or ipsets: those are polled).
    """
    request = struct.pack("=IHHII", 20, NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETGEN, NLM_F_REQUEST, 1, 0)
    request += struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)  # struct nfgenmsg
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER) as s:
            s.settimeout(timeout)
            s.send(request)
            data = s.recv(65536)
    except OSError:
        return None
    gens, _ = parse_generations(data)
    return gens[0].genid if gens else None


def open_nftables_socket() -> trio.socket.SocketType:
    return trio.socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)


class NftablesEvents:
    """An ``EventSource``: one trigger per committed nftables transaction, overrun-safe."""

    name = NFTABLES_SOURCE

    def __init__(
        self,
        sock_factory: Callable[[], trio.socket.SocketType] = open_nftables_socket,
        rcvbuf: int | None = EVENT_RCVBUF,
    ) -> None:
        self._factory = sock_factory
        self._rcvbuf = rcvbuf
        self.overruns = 0
        self.messages = 0

    async def _subscribe(self) -> trio.socket.SocketType:
        sock = self._factory()
        try:
            await subscribe(sock, (NFNLGRP_NFTABLES,), rcvbuf=self._rcvbuf, what="nftables")
        except BaseException:
            sock.close()
            raise
        return sock

    @contextlib.asynccontextmanager
    async def events(self) -> AsyncIterator[AsyncIterator[Trigger]]:
        sock = await self._subscribe()
        triggers = self._triggers(sock)
        try:
            yield triggers
        finally:
            await triggers.aclose()
            sock.close()

    async def _triggers(self, sock: trio.socket.SocketType) -> AsyncGenerator[Trigger, None]:
        while True:
            data = await receive(sock, "nftables")
            if data is None:
                self.overruns += 1
                yield Trigger(NFTABLES_SOURCE, "nftables event overrun: ruleset changes were lost",
                              overrun=True, kind=RULESET_KIND)
                continue
            gens, others = parse_generations(data)
            self.messages += others + len(gens)
            for gen in gens:
                yield Trigger(NFTABLES_SOURCE, gen.describe(), kind=RULESET_KIND)


# ---------------------------------------------------------------------------
# iptables-legacy: no events, so a modest poll, and only where a legacy nat table exists.

_COUNTERS = re.compile(r"\[\d+:\d+\]")
# thread-self: a worker thread may have entered another namespace than the process (``/proc/net``).
PROC_TABLES = (Path("/proc/thread-self/net/ip_tables_names"), Path("/proc/thread-self/net/ip6_tables_names"))
LEGACY_SAVE = ("iptables-legacy-save", "ip6tables-legacy-save")


def normalise_save(text: str) -> str:
    """iptables-save text without comments (timestamps) and counters: equal text, same rules."""
    lines = [_COUNTERS.sub("", line).rstrip() for line in text.splitlines() if not line.startswith("#")]
    return "\n".join(line for line in lines if line)


def legacy_nat_present(proc_files: Sequence[Path] = PROC_TABLES) -> bool:
    """True if this namespace has a legacy nat table (a cheap read, no program run)."""
    for path in proc_files:
        with contextlib.suppress(OSError):
            if "nat" in path.read_text().split():
                return True
    return False


def read_legacy_nat(commands: Sequence[str] = LEGACY_SAVE, timeout: float = 10.0) -> str:
    """The normalised ``-t nat`` save text of each legacy program (missing programs count as empty)."""
    parts: list[str] = []
    for command in commands:
        try:
            proc = run_tool([command, "-t", "nat"], timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            parts.append(f"{command}: {exc}")
            continue
        out = proc.stdout if proc.returncode == 0 else f"{command}: exit {proc.returncode}"
        parts.append(normalise_save(out))
    return "\n--\n".join(parts)


class _Poll:
    """The ``EventSource`` shell of a poll: ``events()`` serves the subclass's ``_triggers()``."""

    def _triggers(self) -> AsyncGenerator[Trigger, None]:
        raise NotImplementedError

    @contextlib.asynccontextmanager
    async def events(self) -> AsyncIterator[AsyncIterator[Trigger]]:
        triggers = self._triggers()
        try:
            yield triggers
        finally:
            await triggers.aclose()


class LegacyNatPoll(_Poll):
    """An ``EventSource``: legacy iptables nat tables, polled only while one exists; a trigger on change."""

    name = LEGACY_SOURCE

    def __init__(
        self,
        interval: float = LEGACY_INTERVAL,
        present: Callable[[], bool] = legacy_nat_present,
        read: Callable[[], str] = read_legacy_nat,
        in_thread: bool = True,
    ) -> None:
        self.interval = interval
        self._present = present
        self._read = read
        self._in_thread = in_thread  # False only for tests on a virtual clock
        self._appeared = trio.Event()
        self.polls = 0
        self.checks = 0

    def recheck(self) -> bool:
        """Whether a legacy nat table exists now; if one does, the poll runs (again).

        Call it from event-driven places only (after a topology snapshot or a
        ruleset read), from the trio thread: it is what lets the poll sleep
        without a timer while there is nothing to poll.
        """
        self.checks += 1
        present = self._present()
        if present:
            self._appeared.set()
        return present

    async def _snapshot(self) -> str | None:
        if not self._present():
            return None
        self.polls += 1
        if not self._in_thread:
            return self._read()
        return await trio.to_thread.run_sync(self._read)

    async def _triggers(self) -> AsyncGenerator[Trigger, None]:
        previous = await self._snapshot()
        while True:
            if previous is None:
                # Nothing to poll: no timer; a recheck() that finds a table ends the wait.
                await self._appeared.wait()
            else:
                await trio.sleep(self.interval)
            self._appeared = trio.Event()
            current = await self._snapshot()
            if current != previous:
                if current is None:
                    what = "legacy iptables nat tables went away"
                elif previous is None:
                    what = "legacy iptables nat table appeared"
                else:
                    what = "legacy iptables nat table changed"
                previous = current
                yield Trigger(LEGACY_SOURCE, what, kind=RULESET_KIND)


# ---------------------------------------------------------------------------
# ipsets named by ``-m set``: no events, so a modest poll, and only while the ruleset names one.


def ipset_digest(content: IpSet | None) -> str:
    """A digest of what the parser reads of one set; sorted, so the kernel's listing order does not count."""
    if content is None:
        return "unreadable"
    text = "\n".join([content.type, str(content.family), *sorted(content.members), "nomatch",
                      *sorted(content.nomatch)])
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()  # names as read: bytes


class IpsetPoll(_Poll):
    """An ``EventSource``: the ipsets that ``-m set`` rules name, polled only while there are any."""

    name = IPSET_SOURCE

    def __init__(
        self,
        interval: float = IPSET_INTERVAL,
        read: Callable[[Sequence[str]], Mapping[str, IpSet | None]] = read_named_ipsets,
        in_thread: bool = True,
    ) -> None:
        self.interval = interval
        self._read = read
        self._in_thread = in_thread  # False only for tests on a virtual clock
        self._seen: dict[str, str] = {}  # per set: the digest the next poll is compared with
        self._read_saw: dict[str, str] = {}  # per set: what the latest ruleset read saw
        self._watching = trio.Event()
        self._sleep: trio.CancelScope | None = None
        self._reads = 0  # ruleset reads told (watch calls): a poll overtaken by one is not compared
        self.polls = 0

    @property
    def sets(self) -> tuple[str, ...]:
        """The sets polled now (the ones the latest ruleset read named)."""
        return tuple(sorted(self._seen))

    def watch(self, contents: Mapping[str, IpSet | None]) -> None:
        """The sets the ruleset just read names, as that read saw them; call it from the trio thread.

        None of them: the poll stops (no timer). A set whose content the read
        saw as the previous read did keeps the digest last polled, so two
        readers that disagree for good trigger once, not at every poll.
        """
        read_saw = {name: ipset_digest(content) for name, content in contents.items()}
        self._seen = {
            name: self._seen[name] if name in self._seen and self._read_saw.get(name) == digest else digest
            for name, digest in read_saw.items()
        }
        self._read_saw = read_saw
        self._reads += 1
        if self._seen:
            self._watching.set()
        elif self._sleep is not None:
            self._sleep.cancel()

    async def _snapshot(self, names: tuple[str, ...]) -> dict[str, str]:
        self.polls += 1
        if self._in_thread:
            got = await trio.to_thread.run_sync(self._read, names)
        else:
            got = self._read(names)
        return {name: ipset_digest(got.get(name)) for name in names}

    async def _triggers(self) -> AsyncGenerator[Trigger, None]:
        while True:
            if not self._seen:
                # Nothing to poll: no timer; a watch() that names a set ends the wait.
                await self._watching.wait()
                self._watching = trio.Event()
                continue
            with trio.CancelScope() as self._sleep:
                await trio.sleep(self.interval)
            self._sleep = None
            names, reads = self.sets, self._reads
            if not names:
                continue
            current = await self._snapshot(names)
            if reads != self._reads:
                # A ruleset read came meanwhile: its view is the reference; this poll may predate it.
                continue
            changed = [n for n in names if current[n] != self._seen[n]]
            for name in changed:
                self._seen[name] = current[name]
            if changed:
                yield Trigger(IPSET_SOURCE, f"ipset {', '.join(changed)} changed", kind=RULESET_KIND)
