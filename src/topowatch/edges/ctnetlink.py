# SPDX-License-Identifier: GPL-2.0-or-later
"""The conntrack edge: dump, delete and create entries over a raw ctnetlink socket.

Theory of operation: one ``AF_NETLINK``/``NETLINK_NETFILTER`` socket, opened in
the namespace the caller is in (or handed in). Requests are encoded and
answers decoded by ``edges.ctcodec``; this module owns the socket, the
sequence numbers, batching and the accounting.

- ``dump`` asks the kernel for UNREPLIED entries only (``CTA_STATUS=0``,
  ``CTA_STATUS_MASK=IPS_SEEN_REPLY``, honoured from 5.15) and filters again in
  userspace, always: an older kernel ignores the filter and dumps everything.
  Seeing an entry with ``IPS_SEEN_REPLY`` in a filtered dump proves the filter
  was ignored and clears ``status_filter_supported``. Zone and mark filters
  work the same way (kernel first where it can, userspace always). A dump
  flagged ``NLM_F_DUMP_INTR`` is thrown away and repeated; after
  ``dump_retries`` repeats it raises ``DumpInterrupted``, never returns it.
- ``delete`` sends one ``IPCTNL_MSG_CT_DELETE`` per entry carrying its orig
  tuple, its zone and the id it was dumped with, many per ``sendmsg``. Only
  the last message of a batch asks for an ACK: the kernel always answers a
  failed request, and it processes a whole ``sendmsg`` before the call
  returns, so "batch size minus errors" is exact once the last request is
  answered, at one ``recv`` per failure instead of one per entry. If the
  receive buffer overran (answers were dropped) the batch's unanswered
  requests are counted as ``unconfirmed``, never as deleted, and later
  batches are halved. ENOENT means the entry already left (or was recreated
  with a new id): it is counted apart, not as an error. Measured on 6.18:
  the kernel's id hashes the entry's address and orig tuple only, so an
  entry recreated at once in the freed slab slot gets the same id back; the
  id check catches recreations only when the memory differs.
- ``scan`` is ``dump`` streamed: each datagram is decoded and handed to a
  consumer (``core.decide.Decider``) as it arrives, raw records for messages
  a learned layout reads, ``Entry`` values for the rest; nothing is kept
  here, so a million-entry table costs one datagram of memory plus what the
  consumer keeps. An interrupted dump restarts with a fresh consumer.
- With the compiled module, a dump is pipelined: a reader thread receives
  bursts of datagrams (``_ctscan.recv_burst``, without the GIL), so that the
  kernel, which fills the next part of a dump inside recvmsg, works while
  this thread judges; at most ``PIPELINE_DEPTH`` bursts wait. Set
  ``pipelined`` false for one datagram per ``recv`` in the caller's thread.
- ``delete_current`` closes the race between a dump and its delete: a
  delete by tuple cannot carry a status condition (the kernel checks only
  CTA_ID), so each batch of ``recheck_batch`` entries is first asked for
  again (one ``IPCTNL_MSG_CT_GET`` per entry by orig tuple and zone, all in
  one ``sendmsg``), and only the entries whose answer still has the dumped
  id and satisfies the caller's condition (still UNREPLIED, still idle, ...)
  are deleted, in the next ``sendmsg``. An entry replied to before its
  re-check is kept; what remains is the window from the re-check to the
  delete, measured per batch (``DeleteResult.windows``) and kept short by
  the small batch. An answer lost to a receive-buffer overrun is asked for
  again in a smaller batch, never deleted unchecked.
- ``create`` inserts entries (tests and benchmarks fill tables with it).

This module must never send a DELETE without a tuple (a flush: the codec
refuses to encode one), never return an interrupted dump, and never enter or
touch a namespace other than its socket's.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import gc
import itertools
import math
import os
import queue
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from topowatch.core.conntrack import IPS_SEEN_REPLY, Entry, Reread
from topowatch.core.decide import STALE_RECORD, RawEntry, StaleEntries, record_raw
from topowatch.edges import ctcodec
from topowatch.edges.ctcodec import AddressCache, DumpParser
from topowatch.errors import DumpInterrupted, NetlinkError, PermissionDenied

SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33

# Requested socket buffers (the kernel doubles what it is given). A dump is
# flow-controlled and needs little; the receive buffer bounds how many answers
# one delete batch may provoke before the kernel drops them.
RCVBUF_BYTES = 32 << 20
SNDBUF_BYTES = 4 << 20
# Kernel memory one queued answer costs (skb truesize of a capped NLMSG_ERROR,
# rounded up): batches are sized so that every request may fail without
# overrunning the receive buffer.
ANSWER_TRUESIZE = 1024
MAX_BATCH = 16384
RECV_BUFFER_BYTES = 1 << 20
DEFAULT_TIMEOUT = 30.0
# Entries re-read and then deleted per pair of sendmsg calls (``delete_current``): small, because
# everything between the re-read and the delete (decoding the answers, judging them again,
# encoding the deletes) is the window in which a reply can still be missed. Kernel memory one
# queued GET answer costs (an entry message, rounded up) sizes it down on a small receive buffer.
RECHECK_BATCH = 64
GET_ANSWER_TRUESIZE = 4096
RECHECK_ROUNDS = 3
RECHECK_RECV_BYTES = 256 << 10  # one receive of a batch's answers (a few hundred bytes each)
# The pipelined dump (``Conntrack._pipelined``): bytes per burst, free room that ends a burst
# (a dump datagram is at most 32 KiB), bursts held ahead of the judging, and the reader's
# poll, which also bounds how long closing it waits. A burst ends at 1 MiB: the kernel fills the
# next datagram inside each recv, so a reader never waits and a 4 MiB burst held a filtered
# dump's whole answer (2.6 MB: 16k UNREPLIED entries of 160k), judged only after the kernel's
# walk ended (``bench/pipeline.py``: 25 ms over the undecoded dump at 4 MiB, 3 ms at 1 MiB).
# The first burst is one datagram (``PIPELINE_FIRST``, no more than the room): the first entry of
# each flow class costs a prediction (about 1 ms on a 2,000-rule ruleset), and judged while the
# kernel walks on they no longer wait for a whole burst (``bench/pipeline.py --cold``, 10% table:
# 33 ms over the floor with a first burst of 1 MiB, -5 ms with one datagram, medians of 12).
PIPELINE_CHUNK = 1 << 20
PIPELINE_ROOM = 64 << 10
PIPELINE_FIRST = 64 << 10
PIPELINE_DEPTH = 4
PIPELINE_POLL_MS = 100
# How long draining an abandoned dump waits for its next datagram (see ``Conntrack._drain``).
DRAIN_WAIT = 1.0
DUMP_RETRIES = 3

_FLAGS_OFFSET = 6  # of nlmsg_flags inside nlmsghdr
_U16 = struct.Struct("=H")


def _with_ack(message: bytes) -> bytes:
    """One encoded request with the ACK flag set (the last of a batch: its answer ends the batch)."""
    flags = _U16.unpack_from(message, _FLAGS_OFFSET)[0]
    return message[:_FLAGS_OFFSET] + _U16.pack(flags | ctcodec.NLM_F_ACK) + message[_FLAGS_OFFSET + 2:]


class DumpConsumer(Protocol):
    """What ``Conntrack.scan`` feeds (``core.decide.Decider`` is one)."""

    def add(self, entry: Entry) -> None: ...

    def add_raw(self, raw: RawEntry) -> None: ...


DumpConsumerT = TypeVar("DumpConsumerT", bound=DumpConsumer)


@dataclass(slots=True)
class _Tally:
    """The counts of ``delete`` and ``delete_current``, batch by batch, as the kernel answers them."""

    requested: int = 0
    deleted: int = 0
    not_found: int = 0
    unconfirmed: int = 0
    batches: int = 0
    errors: dict[int, int] = field(default_factory=dict)

    def count(self, out: _Outcome) -> bool:
        """Count one sent batch of deletes; True when answers were lost to an overrun."""
        self.batches += 1
        self.requested += out.sent
        failed = sum(out.errors.values())
        self.not_found += out.errors.pop(errno_mod.ENOENT, 0)
        for err, count in out.errors.items():
            self.errors[err] = self.errors.get(err, 0) + count
        if out.overrun:
            # Successes are silent: those whose answer may have been dropped are unknown.
            confirmed = 1 if out.answered_last and out.last_errno == 0 else 0
            self.deleted += confirmed
            self.unconfirmed += out.sent - failed - confirmed
        else:
            self.deleted += out.sent - failed
        return out.overrun

    def result(self, **more: Any) -> DeleteResult:
        if errno_mod.EPERM in self.errors and self.deleted == 0:
            _raise_for(errno_mod.EPERM, "ctnetlink delete")
        return DeleteResult(
            requested=self.requested, deleted=self.deleted, not_found=self.not_found,
            errors=tuple(sorted(self.errors.items())), unconfirmed=self.unconfirmed, batches=self.batches,
            **more,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class DeleteResult:
    """What a batch of deletes did, counted from the kernel's answers."""

    requested: int = 0
    deleted: int = 0
    not_found: int = 0
    errors: tuple[tuple[int, int], ...] = ()  # (errno, count), sorted by errno
    unconfirmed: int = 0  # answers lost to a receive-buffer overrun
    batches: int = 0
    # ``delete_current`` only: entries its re-check kept (replied to since the dump, or otherwise
    # no longer what the caller's condition admits), entries it could not re-check (answers lost
    # again and again: not deleted), and per batch the seconds from sending the re-check to the
    # kernel having handled the deletes (the remaining window).
    kept_replied: int = 0
    kept_changed: int = 0
    unchecked: int = 0
    windows: tuple[float, ...] = ()

    @property
    def failed(self) -> int:
        return sum(count for _, count in self.errors)

    def describe(self) -> str:
        text = f"deleted {self.deleted}/{self.requested}, already gone {self.not_found}"
        for err, count in self.errors:
            text += f", {errno_mod.errorcode.get(err, str(err))} {count}"
        if self.unconfirmed:
            text += f", unconfirmed {self.unconfirmed}"
        if self.kept_replied:
            text += f", kept (replied since the dump) {self.kept_replied}"
        if self.kept_changed:
            text += f", kept (changed since the dump) {self.kept_changed}"
        if self.unchecked:
            text += f", not re-checked (kept) {self.unchecked}"
        return text

    @property
    def window_p99(self) -> float | None:
        """The 99th percentile of ``windows`` (nearest rank), None without any."""
        return percentile(self.windows, 0.99)


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q`` quantile by nearest rank, None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass(frozen=True, slots=True)
class DumpStats:
    """How the last dump went: sizes, time, decoder errors and filtering."""

    entries: int = 0  # returned to the caller
    messages: int = 0  # entry messages received
    decode_errors: int = 0
    filtered_in_userspace: int = 0  # received but dropped by the userspace filter
    kernel_status_filter: bool = False  # the status filter was sent to the kernel
    interrupted_retries: int = 0
    recvs: int = 0
    bytes: int = 0
    seconds: float = 0.0
    error_samples: tuple[str, ...] = ()
    # Of ``seconds``: waiting for the kernel's next datagrams, and reading and judging them (the
    # rest is the request and the attempts' set-up); both 0 where not measured.
    wait_seconds: float = 0.0
    judge_seconds: float = 0.0

    @property
    def entries_per_second(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


@dataclass(slots=True)
class _Outcome:
    sent: int = 0
    answered_last: bool = False
    last_errno: int = 0
    errors: dict[int, int] = field(default_factory=dict)
    overrun: bool = False


@dataclass(slots=True)
class _Verdicts:
    """One re-checked batch: indexes (in the batch) to delete and to ask again; what was kept."""

    victims: list[int] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)
    kept_replied: int = 0
    kept_changed: int = 0


def _judge_answer(entry: Entry, answer: tuple[int, Reread | None], i: int, *,
                  still: Callable[[Entry, Reread], bool] | None, tally: _Tally, out: _Verdicts) -> None:
    """``delete_current``'s rule for one answer: gone, failed, kept, or a victim."""
    err, now = answer
    if err == errno_mod.ENOENT or (now is not None and entry.id and now.id != entry.id):
        tally.not_found += 1
    elif err or now is None:
        tally.errors[err] = tally.errors.get(err, 0) + 1
    elif still is not None and not still(entry, now):
        if now.replied_since(entry):
            out.kept_replied += 1
        else:
            out.kept_changed += 1
    else:
        out.victims.append(i)


class _Pending(Protocol):
    """Entries waiting for their re-check and delete, in one of two forms."""

    def __len__(self) -> int: ...
    def deletes(self, start: int, count: int, first: int) -> list[bytes] | None: ...
    def gets(self, start: int, count: int, first: int) -> bytes: ...
    def verdicts(self, answers: list[bytes], start: int, count: int, first: int, *,
                 still: Callable[[Entry, Reread], bool] | None, tally: _Tally) -> _Verdicts: ...  # fmt: skip
    def selected(self, deletes: list[bytes] | None, start: int, count: int, first: int, *,
                 victims: list[int]) -> bytes: ...  # fmt: skip
    def subset(self, indexes: list[int]) -> _Pending: ...


class _Entries:
    """Pending ``Entry`` values: encoded and read in Python."""

    def __init__(self, entries: list[Entry]) -> None:
        self.entries = entries

    def __len__(self) -> int:
        return len(self.entries)

    def deletes(self, start: int, count: int, first: int) -> list[bytes] | None:
        return [ctcodec.encode_delete(e, first + i, ack=False)
                for i, e in enumerate(self.entries[start : start + count])]  # fmt: skip

    def gets(self, start: int, count: int, first: int) -> bytes:
        chunk = self.entries[start : start + count]
        return b"".join(ctcodec.encode_get(e, first + i) for i, e in enumerate(chunk))

    def verdicts(self, answers: list[bytes], start: int, count: int, first: int, *,
                 still: Callable[[Entry, Reread], bool] | None, tally: _Tally) -> _Verdicts:  # fmt: skip
        by_index: dict[int, tuple[int, Reread | None]] = {}
        for datagram in answers:
            for seq, err, now in ctcodec.parse_get_answers(datagram):
                index = seq - first
                if 0 <= index < count:
                    by_index[index] = (err, now)
        out = _Verdicts()
        for i in range(count):
            answer = by_index.get(i)
            if answer is None:
                out.lost.append(i)
            else:
                _judge_answer(self.entries[start + i], answer, i, still=still, tally=tally, out=out)
        return out

    def selected(self, deletes: list[bytes] | None, start: int, count: int, first: int, *,
                 victims: list[int]) -> bytes:  # fmt: skip
        assert deletes is not None
        return b"".join([*(deletes[i] for i in victims[:-1]), _with_ack(deletes[victims[-1]])])

    def subset(self, indexes: list[int]) -> _Pending:
        return _Entries([self.entries[i] for i in indexes])


class _Records:
    """Pending ``core.decide.STALE_RECORD`` records: encoded and read in C (``_ctscan``)."""

    def __init__(self, records: bytes, cache: AddressCache) -> None:
        self.records = records
        self.cache = cache

    def __len__(self) -> int:
        return len(self.records) // STALE_RECORD.size

    def deletes(self, start: int, count: int, first: int) -> list[bytes] | None:
        return None  # encoded in C for the victims only, after the re-check (microseconds)

    def gets(self, start: int, count: int, first: int) -> bytes:
        assert ctcodec._ctscan is not None
        data: bytes = ctcodec._ctscan.requests(self.records, start, count, first, False)
        return data

    def verdicts(self, answers: list[bytes], start: int, count: int, first: int, *,
                 still: Callable[[Entry, Reread], bool] | None, tally: _Tally) -> _Verdicts:  # fmt: skip
        assert ctcodec._ctscan is not None
        codes = bytearray(count)
        errors: list[tuple[int, int]] = []
        changed: list[tuple[int, int, int, int, int]] = []
        for datagram in answers:
            more_errors, more_changed = ctcodec._ctscan.recheck(
                datagram, first, self.records, start, count, codes)
            errors += more_errors
            changed += more_changed
        out = _Verdicts()
        if codes.count(1) == count:  # the usual batch: every entry as dumped, each to be deleted
            out.victims = list(range(count))
            return out
        # The last answer for an index counts, as in ``_Entries``.
        last_error = dict(errors)
        last_changed = {i: rest for i, *rest in changed}
        for i, code in enumerate(codes):
            if code == 0:
                out.lost.append(i)
            elif code == 1:
                out.victims.append(i)
            elif code == 2:
                tally.not_found += 1
            elif code == 3:
                err = last_error[i]
                tally.errors[err] = tally.errors.get(err, 0) + 1
            else:
                status, ct_id, mark, timeout = last_changed[i]
                entry = ctcodec.entry_from_raw(record_raw(self.records, start + i)[0], self.cache)
                now = Reread(status, ct_id, mark, timeout)
                _judge_answer(entry, (0, now), i, still=still, tally=tally, out=out)
        return out

    def selected(self, deletes: list[bytes] | None, start: int, count: int, first: int, *,
                 victims: list[int]) -> bytes:  # fmt: skip
        assert ctcodec._ctscan is not None
        select: bytes | None = None
        if len(victims) < count:
            chosen = bytearray(count)
            for i in victims:
                chosen[i] = 1
            select = bytes(chosen)
        # The last request carries the ACK flag (see ``_transact_bytes``).
        data: bytes = ctcodec._ctscan.requests(self.records, start, count, first, True, select, True)
        return data

    def subset(self, indexes: list[int]) -> _Pending:
        size = STALE_RECORD.size
        return _Records(b"".join(self.records[i * size : (i + 1) * size] for i in indexes), self.cache)


def open_socket() -> socket.socket:
    """A ctnetlink socket in the current namespace, buffers sized for bulk work."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, ctcodec.NETLINK_NETFILTER)
    except PermissionError as exc:
        raise PermissionDenied("opening a ctnetlink socket needs CAP_NET_ADMIN") from exc
    except OSError as exc:
        raise NetlinkError(f"cannot open a ctnetlink socket: {exc.strerror}", exc.errno or 0) from exc
    return sock


def _tune(sock: socket.socket) -> None:
    for force, plain, size in (
        (SO_RCVBUFFORCE, socket.SO_RCVBUF, RCVBUF_BYTES),
        (SO_SNDBUFFORCE, socket.SO_SNDBUF, SNDBUF_BYTES),
    ):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            # Without CAP_NET_ADMIN the sysctl maximum applies; batches shrink to fit.
            sock.setsockopt(socket.SOL_SOCKET, plain, size)
    # Answers echo only the request's header, not the whole request.
    sock.setsockopt(ctcodec.SOL_NETLINK, ctcodec.NETLINK_CAP_ACK, 1)


def _raise_for(errno: int, what: str) -> None:
    if errno in (errno_mod.EPERM, errno_mod.EACCES):
        raise PermissionDenied(f"{what}: {os.strerror(errno)} (needs CAP_NET_ADMIN)")
    raise NetlinkError(f"{what}: {os.strerror(errno)}", errno)


class Conntrack:
    """Dump, delete and create conntrack entries in the socket's namespace.

    Blocking; the daemon calls it from a worker thread. Not thread-safe: one
    caller at a time per instance.
    """

    def __init__(self, sock: socket.socket | None = None, *, status_filter: bool | None = None) -> None:
        """``status_filter``: whether the kernel honours the dump status filter, as another socket
        found it; None probes (two dumps: a walk of the whole table, 0.1 s at 160k entries)."""
        self.sock = sock if sock is not None else open_socket()
        try:
            self.sock.bind((0, 0))
        except OSError as exc:
            if exc.errno != errno_mod.EINVAL:  # EINVAL: already bound by the caller
                raise NetlinkError(
                    f"cannot bind the ctnetlink socket: {exc.strerror}", exc.errno or 0
                ) from exc
        _tune(self.sock)
        self.sock.setblocking(False)
        self._poll = select.poll()
        self._poll.register(self.sock.fileno(), select.POLLIN)
        self._buf = bytearray(RECV_BUFFER_BYTES)
        self._view = memoryview(self._buf)
        self._seq = int.from_bytes(os.urandom(2), "big") << 8
        self.cache = AddressCache()
        self.timeout = DEFAULT_TIMEOUT
        self.dump_retries = DUMP_RETRIES
        rcvbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        sndbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        self.batch_bytes = max(4096, sndbuf // 2)
        self.batch_max = max(16, min(MAX_BATCH, rcvbuf // ANSWER_TRUESIZE))
        self.recheck_batch = max(16, min(RECHECK_BATCH, rcvbuf // GET_ANSWER_TRUESIZE))
        self.last_dump: DumpStats | None = None
        self._skip_replied = False
        self.decode_errors = 0  # over the instance's life
        self.requests = 0  # netlink sendmsg calls, as the fake counts them
        self._sent_at = 0.0
        self.status_filter_supported: bool | None = None
        # A reader thread receives the dump while this one judges (needs the compiled module).
        self.pipelined = ctcodec._ctscan is not None
        self._ended: int | None = None  # the dump whose end the pipelined reader received
        # Called before each burst of a ``scan`` is judged, and with the consumer after it
        # (``edges.overlap``).
        self._timed = (0.0, 0.0)  # the last dump's waiting and judging (``DumpStats``)
        self.before_burst: Callable[[], None] | None = None
        self.after_burst: Callable[[Any], None] | None = None
        self.status_filter_supported = (probe_status_filter(self) if status_filter is None
                                        else status_filter)

    # --- plumbing -------------------------------------------------------------

    def _next_seq(self, count: int = 1) -> int:
        first = self._seq
        self._seq = (self._seq + count) & 0xFFFFFFFF
        if self._seq < first:  # wrapped: restart so the batch's range is contiguous
            first, self._seq = 1, 1 + count
        return first

    def _send(self, data: bytes | bytearray) -> None:
        self.requests += 1
        try:
            self.sock.sendto(data, (0, 0))
        except BlockingIOError:
            if not self._poll_for(select.POLLOUT):
                raise NetlinkError("timed out sending to ctnetlink") from None
            self.sock.sendto(data, (0, 0))
        except OSError as exc:
            raise NetlinkError(f"ctnetlink send failed: {exc.strerror}", exc.errno or 0) from exc
        # The kernel has handled every message of the datagram when sendmsg returns.
        self._sent_at = time.perf_counter()

    def _poll_for(self, events: int = select.POLLIN) -> bool:
        self._poll.modify(self.sock.fileno(), events)
        ready = self._poll.poll(self.timeout * 1000)
        self._poll.modify(self.sock.fileno(), select.POLLIN)
        return bool(ready)

    def _recv(self, *, block: bool) -> bytes | None:
        """One datagram, or None when none is queued (and ``block`` is false).

        Raises ``OSError(ENOBUFS)`` when the kernel dropped answers.
        """
        while True:
            try:
                n = self.sock.recv_into(self._buf, len(self._buf), socket.MSG_TRUNC)
            except BlockingIOError:
                if not block:
                    return None
                if not self._poll_for():
                    raise NetlinkError(f"no answer from ctnetlink within {self.timeout} s") from None
                continue
            if n > len(self._buf):
                raise NetlinkError(f"ctnetlink datagram of {n} bytes exceeds the receive buffer")
            return bytes(self._view[:n])

    # --- dump -----------------------------------------------------------------

    def _dump_once(
        self,
        status: tuple[int, int] | None,
        zone: int | None,
        mark: int | None,
        family: int,
        consumer: DumpConsumer | None = None,
    ) -> tuple[DumpParser, int, int]:
        seq = self._next_seq()
        self._send(ctcodec.encode_dump_request(seq, family=family, status=status, zone=zone, mark=mark))
        parser = DumpParser(seq=seq, cache=self.cache, skip_replied=self._skip_replied)
        add: Callable[[Entry], None] | None = None
        if consumer is not None:
            parser.sink = consumer.add_raw
            if hasattr(consumer, "raw_program"):
                parser.settle = consumer  # a Decider: the compiled scan settles its healthy entries
            add = consumer.add
        recvs = nbytes = 0
        waited = judged = 0.0
        # Decoding allocates only acyclic objects, hundreds of thousands of
        # them: the cyclic collector would rescan the growing list for nothing
        # (measured: 15-30 % of decode time).
        collecting = gc.isenabled()
        gc.disable()
        try:
            # Pipelined where compiled: the kernel fills the dump in another thread's recvmsg
            # while this one judges. Anything left (the reader stopped early) is read here.
            sources = [self._pipelined(seq)] if self.pipelined and ctcodec._ctscan is not None else []
            sources.append(self._serial())
            try:
                for source in sources:
                    tick = time.perf_counter()
                    for data, count in source:
                        got = time.perf_counter()
                        waited += got - tick
                        recvs += count
                        nbytes += len(data)
                        if self.before_burst is not None:
                            self.before_burst()
                        parser.feed(data)
                        if add is not None and parser.entries:
                            # Entries the learned layouts did not read (first of a shape, ICMP, zones).
                            for entry in parser.entries:
                                add(entry)
                            parser.entries.clear()
                        if self.after_burst is not None and consumer is not None:
                            self.after_burst(consumer)
                        tick = time.perf_counter()
                        judged += tick - got
                        if parser.done:
                            break
                    if parser.done:
                        break
            except BaseException:
                for source in sources:
                    source.close()  # the reader first: it must not read what the drain reads
                if not parser.done:
                    self._drain(seq)
                raise
            finally:
                for source in sources:
                    source.close()
        finally:
            if collecting:
                gc.enable()
        self._timed = (waited, judged)
        return parser, recvs, nbytes

    def _drain(self, seq: int) -> None:
        """Read and drop the rest of dump ``seq``, abandoned by a failure while it ran.

        The kernel keeps a dump going until it is read to its end, and refuses
        a new one on the socket meanwhile (EBUSY): without this, one failed
        judgement would leave every later dump refused. Stops at the dump's
        end, after ``DRAIN_WAIT`` seconds without a datagram, or on an error.
        """
        if self._ended == seq:
            return  # the reader received the end already (with what was thrown away)
        saved, self.timeout = self.timeout, DRAIN_WAIT
        try:
            while True:
                data = self._recv(block=True)
                if data is None or ctcodec.ends_dump(data, seq):
                    return
        except (OSError, NetlinkError):
            return
        finally:
            self.timeout = saved

    def _serial(self) -> Generator[tuple[bytes, int], None, None]:
        """Datagrams of the running dump, one ``recv`` at a time: (data, 1)."""
        while True:
            try:
                data = self._recv(block=True)
            except OSError as exc:
                raise NetlinkError(f"ctnetlink dump failed: {exc.strerror}", exc.errno or 0) from exc
            assert data is not None
            yield data, 1

    def _pipelined(self, seq: int) -> Generator[tuple[bytes, int], None, None]:
        """Datagrams of the running dump ``seq``, received by a reader thread: (data, datagrams).

        The reader calls ``_ctscan.recv_burst`` (no GIL held while it receives) and
        hands over bursts of up to ``PIPELINE_CHUNK`` bytes (the first: one datagram) through a queue of
        ``PIPELINE_DEPTH``: at most that much is held ahead of the judging. It stops
        at the datagram that ends the dump, on an error (raised here, as the
        serial path raises it), or when this generator is closed.
        """
        assert ctcodec._ctscan is not None
        recv_burst = ctcodec._ctscan.recv_burst
        chunks: queue.Queue[tuple[bytes, int] | BaseException | None] = queue.Queue(PIPELINE_DEPTH)
        stop = threading.Event()
        fd = self.sock.fileno()
        timeout = self.timeout

        def put(item: tuple[bytes, int] | BaseException | None) -> None:
            while not stop.is_set():
                try:
                    chunks.put(item, timeout=PIPELINE_POLL_MS / 1000)
                except queue.Full:
                    continue
                return

        def reader() -> None:
            waited = 0.0
            size = PIPELINE_FIRST
            try:
                while not stop.is_set():
                    data, count, ended, err = recv_burst(fd, size, PIPELINE_ROOM, seq, PIPELINE_POLL_MS)
                    if count:
                        size = PIPELINE_CHUNK
                        waited = 0.0
                        put((data, count))
                    if ended:
                        self._ended = seq  # read after join: a drain has nothing left to read
                        break
                    if err == errno_mod.ETIMEDOUT:
                        waited += PIPELINE_POLL_MS / 1000
                        if waited >= timeout:
                            raise NetlinkError(f"no answer from ctnetlink within {timeout} s")
                    elif err == errno_mod.EMSGSIZE:
                        raise NetlinkError("a ctnetlink datagram exceeds the receive buffer")
                    elif err:
                        raise NetlinkError(f"ctnetlink dump failed: {os.strerror(err)}", err)
            except BaseException as exc:  # handed to the judging thread, which raises it
                put(exc)
            put(None)

        thread = threading.Thread(target=reader, name="topowatch-ct-reader", daemon=True)
        thread.start()
        try:
            while True:
                item = chunks.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a reader waiting to hand over
                with contextlib.suppress(queue.Empty):
                    chunks.get(timeout=PIPELINE_POLL_MS / 1000)
            thread.join()

    def stats(self) -> dict[str, int]:
        """This namespace's conntrack counters summed over CPUs (``conntrack -S``): drop, early_drop, ...

        Every counter of ``ctcodec.CTA_STATS_NAMES`` is present (0 when the
        kernel did not send it). Cumulative since the namespace was created.
        """
        seq = self._next_seq()
        self._send(ctcodec.encode_stats_request(seq))
        totals = dict.fromkeys(ctcodec.CTA_STATS_NAMES.values(), 0)
        done = False
        while not done:
            data = self._recv(block=True)
            assert data is not None
            try:
                done, err = ctcodec.parse_stats(data, seq, totals)
            except ctcodec.MalformedMessage as exc:
                raise NetlinkError(f"conntrack statistics: {exc}", 0) from exc
            if err:
                _raise_for(err, "conntrack statistics")
        return totals

    def dump_datagrams(self, *, status: tuple[int, int] | None = None) -> list[bytes]:
        """The raw datagrams of one dump, undecoded (for recording test data)."""
        seq = self._next_seq()
        self._send(ctcodec.encode_dump_request(seq, status=status))
        parser = DumpParser(seq=seq, cache=self.cache)
        datagrams: list[bytes] = []
        while not parser.done:
            data = self._recv(block=True)
            assert data is not None
            datagrams.append(data)
            parser.feed(data)
        if parser.errno:
            _raise_for(parser.errno, "ctnetlink dump")
        return datagrams

    def dump(
        self,
        *,
        unreplied_only: bool = True,
        zone: int | None = None,
        mark: int | None = None,
        family: int = 0,
    ) -> list[Entry]:
        """Entries of the table, filtered; never an interrupted dump."""
        status = (0, IPS_SEEN_REPLY) if unreplied_only and self.status_filter_supported is not False else None
        started = time.perf_counter()
        # Replied entries are then counted, not built (the kernel may have ignored the filter).
        self._skip_replied = unreplied_only
        try:
            parser, recvs, nbytes, retries = self._complete_dump(
                lambda: self._dump_once(status, zone, mark, family)
            )
        finally:
            self._skip_replied = False
        received = parser.entries
        replied = parser.skipped_replied or any(e.status & IPS_SEEN_REPLY for e in received)
        if status is not None and replied:
            # The kernel ignored the status filter (older than 5.15).
            self.status_filter_supported = False

        def keep(e: Entry) -> bool:
            return (
                (not unreplied_only or not e.status & IPS_SEEN_REPLY)
                and (zone is None or e.zone == zone)
                and (mark is None or e.mark == mark)
                and (not family or e.family == family)
            )

        if unreplied_only or zone is not None or mark is not None or family:
            entries = [e for e in received if keep(e)]
        else:
            entries = received
        filtered = len(received) - len(entries) + parser.skipped_replied
        self._record(parser, entries=len(entries), filtered=filtered, kernel_filter=status is not None,
                     retries=retries, recvs=recvs, nbytes=nbytes, started=started)  # fmt: skip
        return entries

    def scan(self, start: Callable[[], DumpConsumerT], *, unreplied_only: bool = True) -> DumpConsumerT:
        """Stream one dump through a consumer instead of returning a list; never an interrupted one.

        ``start`` makes a fresh consumer for each attempt (an interrupted
        dump is thrown away with the consumer that saw it); the consumer of
        the complete dump is returned. Entries read by a learned layout reach
        it through ``add_raw`` (``core.decide.RawEntry``), the others through
        ``add``. With ``unreplied_only`` it sees no entry with SEEN_REPLY
        (kernel filter where honoured, userspace always). Memory stays at one
        datagram plus what the consumer keeps.
        """
        status = (0, IPS_SEEN_REPLY) if unreplied_only and self.status_filter_supported is not False else None
        started = time.perf_counter()
        consumers: list[DumpConsumerT] = []

        def attempt() -> tuple[DumpParser, int, int]:
            consumers[:] = [start()]
            return self._dump_once(status, None, None, 0, consumers[0])

        self._skip_replied = unreplied_only
        try:
            parser, recvs, nbytes, retries = self._complete_dump(attempt)
        finally:
            self._skip_replied = False
        if status is not None and parser.skipped_replied:
            self.status_filter_supported = False  # the kernel ignored the status filter
        self._record(parser, entries=parser.messages - parser.decode_errors - parser.skipped_replied,
                     filtered=parser.skipped_replied, kernel_filter=status is not None, retries=retries,
                     recvs=recvs, nbytes=nbytes, started=started)  # fmt: skip
        return consumers[0]

    def _complete_dump(
        self, attempt: Callable[[], tuple[DumpParser, int, int]]
    ) -> tuple[DumpParser, int, int, int]:
        """Dump until one attempt is not interrupted: (parser, recvs, bytes, retries)."""
        retries = 0
        while True:
            parser, recvs, nbytes = attempt()
            if parser.errno:
                _raise_for(parser.errno, "ctnetlink dump")
            if not parser.interrupted:
                return parser, recvs, nbytes, retries
            if retries == self.dump_retries:
                raise DumpInterrupted(
                    f"conntrack dump interrupted {retries + 1} times: results may be inconsistent",
                    errno_mod.EINTR,
                )
            retries += 1

    def _record(self, parser: DumpParser, *, entries: int, filtered: int, kernel_filter: bool,
                retries: int, recvs: int, nbytes: int, started: float) -> None:  # fmt: skip
        self.decode_errors += parser.decode_errors
        self.last_dump = DumpStats(
            entries=entries,
            messages=parser.messages,
            decode_errors=parser.decode_errors,
            filtered_in_userspace=filtered,
            kernel_status_filter=kernel_filter,
            interrupted_retries=retries,
            recvs=recvs,
            bytes=nbytes,
            seconds=time.perf_counter() - started,
            error_samples=tuple(parser.error_samples),
            wait_seconds=self._timed[0],
            judge_seconds=self._timed[1],
        )

    # --- batched requests -----------------------------------------------------

    def _transact(self, encoded: list[bytes], first_seq: int, last_seq: int | None = None) -> _Outcome:
        """Send one batch whose last message asks for an ACK; collect every answer.

        The messages carry increasing sequence numbers from ``first_seq`` to
        ``last_seq`` (by default one each, without gaps).
        """
        if last_seq is None:
            last_seq = first_seq + len(encoded) - 1
        data = b"".join([*encoded[:-1], _with_ack(encoded[-1])])
        return self._transact_bytes(data, len(encoded), first_seq, last_seq)

    def _transact_bytes(self, messages: bytes, sent: int, first_seq: int, last_seq: int) -> _Outcome:
        """``_transact`` of ``sent`` messages already joined, the last one (``last_seq``) with the
        ACK flag (``_with_ack``, or ``_ctscan.requests(..., ack_last)``)."""
        out = _Outcome(sent=sent)
        self._send(messages)
        # The kernel has handled the whole batch when sendmsg returns: every
        # answer is queued (or was dropped, which recv reports as ENOBUFS).
        block = False
        while not out.answered_last:
            try:
                datagram = self._recv(block=block)
            except OSError as exc:
                if exc.errno != errno_mod.ENOBUFS:
                    raise NetlinkError(f"ctnetlink receive failed: {exc.strerror}", exc.errno or 0) from exc
                out.overrun = True
                continue
            if datagram is None:
                if out.overrun:
                    break  # the last answer may be among the dropped ones
                block = True  # not expected: wait for it, up to the timeout
                continue
            for seq, err in ctcodec.parse_answers(datagram):
                if not first_seq <= seq <= last_seq:
                    continue
                if seq == last_seq:
                    out.answered_last = True
                    out.last_errno = err
                if err:
                    out.errors[err] = out.errors.get(err, 0) + 1
        return out

    def _chunks(
        self, entries: Iterable[Entry], encode: Callable[[Entry, int], bytes]
    ) -> Iterator[tuple[list[bytes], int]]:
        it = iter(entries)
        while True:
            chunk = list(itertools.islice(it, self.batch_max))
            if not chunk:
                return
            first = self._next_seq(len(chunk))
            encoded = [encode(e, first + i) for i, e in enumerate(chunk)]
            # Split further by bytes so that one sendmsg fits the send buffer.
            start, size = 0, 0
            for i, msg in enumerate(encoded):
                if size and size + len(msg) > self.batch_bytes:
                    yield encoded[start:i], first + start
                    start, size = i, 0
                size += len(msg)
            yield encoded[start:], first + start

    def delete(self, entries: Iterable[Entry]) -> DeleteResult:
        """Delete each entry by orig tuple, zone and dumped id; count the answers."""
        tally = _Tally()

        def encode(e: Entry, seq: int) -> bytes:
            return ctcodec.encode_delete(e, seq, ack=False)

        for encoded, first in self._chunks(entries, encode):
            if tally.count(self._transact(encoded, first)):
                self.batch_max = max(16, self.batch_max // 2)
        return tally.result()

    def delete_current(
        self, entries: Iterable[Entry], still: Callable[[Entry, Reread], bool] | None = None
    ) -> DeleteResult:
        """Delete each entry only if, re-read just before its batch's delete, it is still the one judged.

        Still the one: the kernel finds it by orig tuple and zone with the
        dumped id (an id of 0 matches any), and ``still(dumped, now)`` holds
        (None: no condition beyond the id). Gone or recreated entries count
        as ``not_found``; those the condition refuses as ``kept_replied``
        (a reply arrived since the dump) or ``kept_changed``.

        Entries a compiled scan kept as records (``core.decide.StaleEntries``)
        are re-checked and deleted from their records, in C
        (``_ctscan.requests``, ``_ctscan.recheck``): an answer whose SEEN_REPLY
        bit and mark are as dumped passes ``still`` without asking it (those
        are the only fields it may read that can change: eligibility reads
        the status bit and the mark); any other answer is asked as above.
        """
        tally = _Tally()
        counts = [0, 0, 0]  # kept_replied, kept_changed, unchecked
        windows: list[float] = []
        if isinstance(entries, StaleEntries) and entries.records and ctcodec._ctscan is not None:
            self._delete_checked(_Entries(list(entries.head)), still, tally=tally, counts=counts,
                                 windows=windows)
            self._delete_checked(_Records(entries.records, self.cache), still, tally=tally, counts=counts,
                                 windows=windows)
        else:
            self._delete_checked(_Entries(list(entries)), still, tally=tally, counts=counts, windows=windows)
        return tally.result(kept_replied=counts[0], kept_changed=counts[1], unchecked=counts[2],
                            windows=tuple(windows))  # fmt: skip

    def _delete_checked(self, pending: _Pending, still: Callable[[Entry, Reread], bool] | None, *,
                        tally: _Tally, counts: list[int], windows: list[float]) -> None:  # fmt: skip
        """``delete_current``'s rounds over one kind of pending entries."""
        size = self.recheck_batch
        for _ in range(RECHECK_ROUNDS):
            lost: list[int] = []
            for start in range(0, len(pending), size):
                count = min(size, len(pending) - start)
                # Encoded before the re-check where that costs (Python): the window holds no encoding.
                first = self._next_seq(count)
                deletes = pending.deletes(start, count, first)
                get_first = self._next_seq(count)
                began = time.perf_counter()
                self._send(pending.gets(start, count, get_first))
                answers = self._answers(get_first)
                verdicts = pending.verdicts(answers, start, count, get_first, still=still, tally=tally)
                lost.extend(start + i for i in verdicts.lost)
                counts[0] += verdicts.kept_replied
                counts[1] += verdicts.kept_changed
                if not verdicts.victims:
                    continue
                data = pending.selected(deletes, start, count, first, victims=verdicts.victims)
                last = verdicts.victims[-1]
                tally.count(self._transact_bytes(data, len(verdicts.victims), first, first + last))
                windows.append(self._sent_at - began)
            if not lost:
                return
            pending = pending.subset(lost)
            size = max(1, size // 4)  # answers were dropped: ask again in smaller batches
        counts[2] += len(pending)

    def _answers(self, first: int) -> list[bytes]:
        """Every queued answer to the GETs just sent, read without waiting.

        The kernel answers every GET (an entry or an error) before sendmsg
        returns, so everything is read without waiting: an index missing
        from the answers was dropped by a receive-buffer overrun (the caller
        asks again). The queue is read to its end, so no answer is left to
        fill the buffer of the next batch.
        """
        out: list[bytes] = []
        while True:
            if ctcodec._ctscan is not None:
                # Every queued answer in one call (one datagram each), without the GIL.
                datagram, n, _, err = ctcodec._ctscan.recv_burst(
                    self.sock.fileno(), RECHECK_RECV_BYTES, PIPELINE_ROOM, (first - 1) & 0xFFFFFFFF, 0
                )
                if err not in (0, errno_mod.ETIMEDOUT, errno_mod.ENOBUFS):
                    raise NetlinkError(f"ctnetlink receive failed: {os.strerror(err)}", err)
                if not n:
                    if err == errno_mod.ENOBUFS:
                        continue  # the overrun is reported first; what is still queued comes next
                    return out
            else:
                try:
                    datagram = self._recv(block=False)
                except OSError as exc:
                    if exc.errno != errno_mod.ENOBUFS:
                        raise NetlinkError(f"ctnetlink receive failed: {exc.strerror}",
                                           exc.errno or 0) from exc
                    continue
                if datagram is None:
                    return out
            out.append(datagram)

    def create(self, entries: Iterable[Entry]) -> int:
        """Insert entries as given; returns how many were created.

        Raises ``NetlinkError`` (after sending everything) if any was refused,
        with the counts by errno in its message and the first errno.
        """
        created = 0
        errors: dict[int, int] = {}

        def encode(e: Entry, seq: int) -> bytes:
            return ctcodec.encode_create(e, seq, ack=False)

        for encoded, first in self._chunks(entries, encode):
            out = self._transact(encoded, first)
            if out.overrun:
                raise NetlinkError("ctnetlink answers were dropped while creating entries", errno_mod.ENOBUFS)
            created += out.sent - sum(out.errors.values())
            for err, count in out.errors.items():
                errors[err] = errors.get(err, 0) + count
        if errors:
            first_err = min(errors)
            detail = ", ".join(
                f"{errno_mod.errorcode.get(e, str(e))} x{c}" for e, c in sorted(errors.items())
            )
            if set(errors) <= {errno_mod.EPERM, errno_mod.EACCES}:
                _raise_for(first_err, "ctnetlink create")
            raise NetlinkError(f"created {created}; refused: {detail}", first_err)
        return created

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Conntrack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def probe_status_filter(ct: Conntrack) -> bool:
    """Does the kernel honour the dump status filter (``CTA_STATUS_MASK``, >= 5.15)?

    Read-only and safe in any namespace. A kernel that parses the filter
    rejects a zero mask with EINVAL; one that does not know it ignores it and
    dumps. A mark filter nobody uses (0xffffffff) keeps that dump short on
    old kernels (mark filters are older than status filters). The same
    request with a valid mask must then succeed, which rules out an EINVAL
    for any other reason.
    """
    unused_mark = 0xFFFFFFFF
    parser, _, _ = ct._dump_once((0, 0), None, unused_mark, 0)
    if parser.errno == 0:
        return False
    if parser.errno != errno_mod.EINVAL:
        _raise_for(parser.errno, "probing the ctnetlink status filter")
    parser, _, _ = ct._dump_once((0, IPS_SEEN_REPLY), None, unused_mark, 0)
    if parser.errno:
        _raise_for(parser.errno, "probing the ctnetlink status filter")
    return True
