# SPDX-License-Identifier: GPL-2.0-or-later
"""``Conntrack``'s dump, scan, create, stats and raw-dump paths against a scripted ctnetlink.

``Conntrack`` gets one end of a socketpair (``test_ctdelete.Wire``); the other end is
``ScriptKernel``, which answers inside ``sendto`` as ctnetlink does
(include/uapi/linux/netfilter/nfnetlink_conntrack.h, net/netfilter/nf_conntrack_netlink.c):

- a dump request (``IPCTNL_MSG_CT_GET`` with ``NLM_F_DUMP``) gets the scripted datagrams of
  ``IPCTNL_MSG_CT_NEW`` messages flagged ``NLM_F_MULTI`` carrying the request's sequence
  number, then ``NLMSG_DONE`` (an ``int`` 0 after the header, 20 bytes); a message of a dump
  the table changed under carries ``NLM_F_DUMP_INTR``; a refused dump is one ``NLMSG_ERROR``
  (-errno, the request's header echoed: ``NETLINK_CAP_ACK``). While an earlier dump's
  datagrams are still unread, a new dump is refused with EBUSY (netlink_dump_start: one dump
  per socket at a time), so a dump abandoned unread shows;
- ``IPCTNL_MSG_CT_GET_STATS_CPU`` gets one message per CPU (``res_id`` the CPU) of big-endian
  u32 counters, then ``NLMSG_DONE``;
- ``IPCTNL_MSG_CT_NEW`` with ``NLM_F_CREATE`` gets an error answer when scripted to fail, an
  ACK only when asked for one.

Every expected value is worked out by hand from the script (entry ids, datagram sizes the
kernel recorded, counts); none is computed by the code under test.
"""

from __future__ import annotations

import errno
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Any

import pytest
from test_ctcodec import dump_message
from test_ctdelete import FakeKernel, Request, Wire, entries

from topowatch.core.conntrack import IPS_CONFIRMED, IPS_SEEN_REPLY, CtTuple, Entry
from topowatch.edges import ctcodec, ctnetlink
from topowatch.edges.ctnetlink import Conntrack
from topowatch.errors import DumpInterrupted, NetlinkError, PermissionDenied

HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK, NLM_F_DUMP_INTR, NLM_F_DUMP = 0x1, 0x2, 0x4, 0x10, 0x300
NLM_F_EXCL, NLM_F_CREATE = 0x200, 0x400
CT_NEW, CT_GET, CT_GET_STATS_CPU = 0x100, 0x101, 0x104
CTA_STATUS, CTA_MARK, CTA_ZONE, CTA_MARK_MASK, CTA_STATUS_MASK = 3, 8, 18, 21, 26
REPLIED = IPS_CONFIRMED | IPS_SEEN_REPLY
READER = "topowatch-ct-reader"


# --- what the kernel sends ------------------------------------------------------------------


@dataclass(frozen=True)
class Intr:
    """An entry message of an interrupted dump (``NLM_F_DUMP_INTR``)."""

    entry: Entry


@dataclass(frozen=True)
class Stale:
    """A message of an earlier request (its sequence number is ``seq - back``)."""

    item: Any
    back: int = 1


@dataclass(frozen=True)
class Done:
    flags: int = 0


@dataclass(frozen=True)
class Err:
    errno: int


@dataclass(frozen=True)
class Raw:
    """A message built by hand for the sequence number (``make(seq)``)."""

    make: Callable[[int], bytes]


Item = Entry | Intr | Stale | Done | Err | Raw


def done_msg(seq: int, flags: int = 0) -> bytes:
    return HDR.pack(20, NLMSG_DONE, NLM_F_MULTI | flags, seq, 0) + struct.pack("=i", 0)


def error_msg(seq: int, err: int, request_type: int = CT_GET) -> bytes:
    echoed = HDR.pack(16, request_type, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
    return HDR.pack(36, NLMSG_ERROR, 0, seq, 0) + struct.pack("=i", -err) + echoed


def entry_msg(e: Entry, seq: int, flags: int = 0) -> bytes:
    msg = dump_message(e, seq)  # NLM_F_MULTI set
    return msg[:6] + struct.pack("=H", NLM_F_MULTI | flags) + msg[8:]


def encode(item: Item, seq: int) -> bytes:
    if isinstance(item, Entry):
        return entry_msg(item, seq)
    if isinstance(item, Intr):
        return entry_msg(item.entry, seq, NLM_F_DUMP_INTR)
    if isinstance(item, Stale):
        return encode(item.item, seq - item.back)
    if isinstance(item, Done):
        return done_msg(seq, item.flags)
    if isinstance(item, Raw):
        return item.make(seq)
    return error_msg(seq, item.errno)


def in_datagrams(table: list[Entry], per: int = 3) -> list[list[Item]]:
    """The kernel's usual answer: ``per`` entries a datagram, then the DONE alone."""
    out: list[list[Item]] = [list(table[i : i + per]) for i in range(0, len(table), per)]
    return [*out, [Done()]]


@dataclass
class DumpRequest:
    seq: int
    flags: int
    family: int
    attrs: dict[int, int]  # attribute type -> value (big-endian u16/u32 read)


@dataclass
class ScriptKernel(FakeKernel):
    """``FakeKernel`` that also dumps, reports per-CPU statistics and creates entries."""

    peer: socket.socket | None = None  # the Conntrack's end, to see what it left unread
    attempts: list[list[list[Item]]] = field(default_factory=list)  # per dump request, its datagrams
    table: list[Entry] = field(default_factory=list)  # dumped once ``attempts`` ran out
    honour_status: bool = False  # apply CTA_STATUS/CTA_STATUS_MASK (a kernel >= 5.15)
    dumps: list[DumpRequest] = field(default_factory=list)
    sent: list[bytes] = field(default_factory=list)  # every datagram of every dump answer
    busy: int = 0  # dump requests refused with EBUSY (an earlier dump left unread)
    cpus: list[dict[int, int]] = field(default_factory=list)  # per CPU: CTA_STATS_* -> counter
    stats_datagrams: list[list[bytes]] | None = None  # scripted answer to a stats request (seq ignored)
    stats_error: int = 0
    created: list[list[Request]] = field(default_factory=list)  # per sendmsg of creates

    def handle(self, data: bytes) -> None:
        mlen, mtype, flags, seq, _pid = HDR.unpack_from(data, 0)
        if mtype == CT_GET and flags & NLM_F_DUMP == NLM_F_DUMP:
            self._dump(data, mlen, flags, seq)
        elif mtype == CT_GET_STATS_CPU:
            self._stats(seq)
        elif mtype == CT_NEW:
            self._create(data)
        else:
            super().handle(data)

    def _dump(self, data: bytes, mlen: int, flags: int, seq: int) -> None:
        attrs: dict[int, int] = {}
        pos = 20
        while pos + 4 <= mlen:
            alen, atype = struct.unpack_from("=HH", data, pos)
            attrs[atype] = int.from_bytes(data[pos + 4 : pos + alen], "big")
            pos += (alen + 3) & ~3
        self.dumps.append(DumpRequest(seq, flags, data[16], attrs))
        if self.peer is not None and self._unread():
            self.busy += 1
            self.sock.send(error_msg(seq, errno.EBUSY))
            return
        if self.attempts:
            script = self.attempts.pop(0)
        else:
            table = self.table
            if self.honour_status and CTA_STATUS_MASK in attrs:
                value, mask = attrs[CTA_STATUS], attrs[CTA_STATUS_MASK]
                table = [e for e in table if e.status & mask == value]
            script = in_datagrams(table)
        for datagram in script:
            raw = b"".join(encode(item, seq) for item in datagram)
            self.sent.append(raw)
            self.sock.send(raw)

    def _unread(self) -> bool:
        assert self.peer is not None
        try:
            self.peer.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        return True

    def _stats(self, seq: int) -> None:
        if self.stats_datagrams is not None:
            for raw in self.stats_datagrams:
                self.sock.send(raw)
            return
        if self.stats_error:
            self.sock.send(error_msg(seq, self.stats_error, CT_GET_STATS_CPU))
            return
        for cpu, counters in enumerate(self.cpus):
            self.sock.send(stats_msg(seq, cpu, counters))
        self.sock.send(done_msg(seq))

    def _create(self, data: bytes) -> None:
        requests: list[Request] = []
        pos = 0
        while pos + 16 <= len(data):
            mlen, mtype, flags, seq, _pid = HDR.unpack_from(data, pos)
            assert mtype == CT_NEW
            requests.append(Request(seq, flags, self._id(data, pos + 20, pos + mlen)))
            pos += (mlen + 3) & ~3
        self.created.append(requests)
        for r in requests:
            err = self.errors.get(r.ct_id, 0)
            if err == 0 and not r.flags & NLM_F_ACK:
                continue
            if r.ct_id in self.dropped:
                self.overrun = True
                continue
            self.sock.send(self._answer(r.seq, err))


def stats_msg(seq: int, cpu: int, counters: dict[int, int], attr_len: int = 8) -> bytes:
    body = b"".join(struct.pack("=HH", attr_len, atype) + struct.pack(">I", value)[: attr_len - 4]
                    + b"\0" * ((4 - attr_len % 4) % 4) for atype, value in counters.items())  # fmt: skip
    nfgen = struct.pack("=BBH", 0, 0, socket.htons(cpu))
    return HDR.pack(20 + len(body), CT_GET_STATS_CPU, NLM_F_MULTI, seq, 0) + nfgen + body


class CountingWire(Wire):
    """``Wire`` that records what ``Conntrack`` does to the socket itself."""

    def __init__(self, sock: socket.socket, kernel: FakeKernel) -> None:
        super().__init__(sock, kernel)
        self.recv_threads: list[str] = []
        self.addresses: list[Any] = []
        self.options: list[tuple[Any, ...]] = []

    def setsockopt(self, *args: Any) -> None:
        self.options.append(args)

    def sendto(self, data: bytes, address: Any) -> int:
        self.addresses.append(address)
        return super().sendto(data, address)

    def recv_into(self, buf: Any, nbytes: int, flags: int = 0) -> int:
        self.recv_threads.append(threading.current_thread().name)
        return super().recv_into(buf, nbytes, flags)


def make(*, pipelined: bool | None = None, status_filter: bool = True,
         ) -> tuple[Conntrack, ScriptKernel, CountingWire]:  # fmt: skip
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (ours, theirs):  # room for a whole scripted dump in the queue
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    kernel = ScriptKernel(theirs, peer=ours)
    wire = CountingWire(ours, kernel)
    ct = Conntrack(wire, status_filter=status_filter)  # type: ignore[arg-type]
    ct.timeout = 0.5  # a wait for an answer that never comes fails the test quickly
    if pipelined is not None:
        ct.pipelined = pipelined
    return ct, kernel, wire


@pytest.fixture(autouse=True)
def _short_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    """A drain that finds nothing more gives up after 0.1 s here (1 s in the product)."""
    monkeypatch.setattr(ctnetlink, "DRAIN_WAIT", 0.1)


PATHS = ["serial", "pipelined"]


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest) -> str:
    if request.param == "pipelined" and ctcodec._ctscan is None:
        pytest.skip("the compiled module is not built")
    return str(request.param)


@pytest.fixture
def kern(path: str) -> Iterator[tuple[Conntrack, ScriptKernel, CountingWire]]:
    ct, kernel, wire = make(pipelined=path == "pipelined")
    yield ct, kernel, wire
    ct.close()


def ids(es: list[Entry]) -> list[int]:
    return [e.id for e in es]


def mixed() -> list[Entry]:
    """Ids 1-6: 2 and 5 replied, the others unreplied."""
    es = entries(6)
    return [Entry(e.family, e.proto, e.orig, e.reply, status=REPLIED if e.id in (2, 5) else IPS_CONFIRMED, id=e.id)
            for e in es]  # fmt: skip


def v6(i: int, **kw: Any) -> Entry:
    a, b = ip_address("2001:db8::2"), ip_address("2001:db8::a")
    return Entry(10, 17, CtTuple(a, b, 1000 + i, 53), CtTuple(b, a, 53, 1000 + i), status=IPS_CONFIRMED, id=i, **kw)


def v4(i: int, **kw: Any) -> Entry:
    a, b = ip_address("10.0.1.2"), ip_address("192.0.2.10")
    return Entry(2, 17, CtTuple(a, b, 1000 + i, 53), CtTuple(b, a, 53, 1000 + i), status=IPS_CONFIRMED, id=i, **kw)


# --- dump: completeness, the request, the accounting ----------------------------------------


def test_a_dump_returns_every_entry_of_every_datagram(kern: tuple[Conntrack, ScriptKernel, CountingWire]) -> None:
    ct, kernel, wire = kern
    table = entries(7)
    kernel.attempts = [[table[:3], table[3:6], [table[6], Done()]]]  # the DONE shares the last datagram
    got = ct.dump(unreplied_only=False)
    assert ids(got) == [1, 2, 3, 4, 5, 6, 7]
    assert got == table
    [request] = kernel.dumps
    assert (request.flags, request.family, request.attrs) == (NLM_F_REQUEST | NLM_F_DUMP, 0, {})
    assert wire.addresses == [(0, 0)]  # to the kernel (port id 0), no multicast group
    stats = ct.last_dump
    assert stats is not None
    assert (stats.entries, stats.messages, stats.recvs, stats.bytes) == (7, 7, 3, sum(map(len, kernel.sent)))
    assert (stats.filtered_in_userspace, stats.kernel_status_filter, stats.interrupted_retries) == (0, False, 0)
    assert (stats.decode_errors, stats.error_samples) == (0, ())
    assert 0 < stats.seconds < 60 and 0 <= stats.wait_seconds <= stats.seconds
    assert 0 <= stats.judge_seconds <= stats.seconds
    assert stats.entries_per_second == 7 / stats.seconds
    assert kernel.busy == 0


def test_every_dump_has_a_new_sequence_number(kern: tuple[Conntrack, ScriptKernel, CountingWire]) -> None:
    ct, kernel, _wire = kern
    kernel.table = entries(2)
    for _ in range(3):
        assert ids(ct.dump(unreplied_only=False)) == [1, 2]
    seqs = [r.seq for r in kernel.dumps]
    assert seqs == [seqs[0], seqs[0] + 1, seqs[0] + 2]
    assert ct.last_dump is not None and ct.last_dump.recvs == 2


def test_messages_of_an_earlier_request_are_not_this_dumps(kern: tuple[Conntrack, ScriptKernel, CountingWire]) -> None:
    """A DONE, an error and an entry with another sequence number (answers to an earlier request):
    none ends this dump, fails it or joins it."""
    ct, kernel, _wire = kern
    table = entries(4)
    kernel.attempts = [[[Stale(Done()), table[0]], [Stale(Err(errno.EBUSY)), table[1], Stale(table[3], 2)],
                        [table[2], Done()]]]  # fmt: skip
    assert ids(ct.dump(unreplied_only=False)) == [1, 2, 3]
    assert ct.last_dump is not None and (ct.last_dump.messages, ct.last_dump.recvs) == (3, 3)


def test_the_status_filter_is_asked_of_the_kernel_and_applied_again(
    kern: tuple[Conntrack, ScriptKernel, CountingWire],
) -> None:
    ct, kernel, _wire = kern
    kernel.table = mixed()
    kernel.honour_status = True
    assert ids(ct.dump()) == [1, 3, 4, 6]
    assert kernel.dumps[0].attrs == {CTA_STATUS: 0, CTA_STATUS_MASK: IPS_SEEN_REPLY}
    stats = ct.last_dump
    assert stats is not None
    assert (stats.entries, stats.messages, stats.filtered_in_userspace, stats.kernel_status_filter) == (4, 4, 0, True)
    assert ct.status_filter_supported is True


def test_a_kernel_that_ignores_the_status_filter_is_filtered_in_userspace_and_not_asked_again(
    kern: tuple[Conntrack, ScriptKernel, CountingWire],
) -> None:
    ct, kernel, _wire = kern
    kernel.table = mixed()  # honour_status False: a kernel older than 5.15 dumps everything
    assert ids(ct.dump()) == [1, 3, 4, 6]
    stats = ct.last_dump
    assert stats is not None
    assert (stats.entries, stats.messages, stats.filtered_in_userspace, stats.kernel_status_filter) == (4, 6, 2, True)
    assert ct.status_filter_supported is False
    assert ids(ct.dump()) == [1, 3, 4, 6]
    assert kernel.dumps[1].attrs == {}
    assert ct.last_dump is not None and (ct.last_dump.kernel_status_filter, ct.last_dump.filtered_in_userspace) == (
        False, 2)


def test_a_replied_entry_the_kernel_kept_although_filtered_is_still_dropped(
    kern: tuple[Conntrack, ScriptKernel, CountingWire],
) -> None:
    """Replied entries from a filtering kernel (one ignoring it) are never returned, whichever way
    they were read; and a dump without the filter returns them."""
    ct, kernel, _wire = kern
    kernel.table = mixed()
    ct.status_filter_supported = False
    assert ids(ct.dump()) == [1, 3, 4, 6]
    assert kernel.dumps[0].attrs == {}
    assert ct.last_dump is not None and ct.last_dump.kernel_status_filter is False
    assert ids(ct.dump(unreplied_only=False)) == [1, 2, 3, 4, 5, 6]
    assert ct.last_dump is not None and ct.last_dump.filtered_in_userspace == 0


def test_unfiltered_dumps_keep_the_status_filter_verdict(kern: tuple[Conntrack, ScriptKernel, CountingWire]) -> None:
    ct, kernel, _wire = kern
    kernel.table = mixed()
    assert len(ct.dump(unreplied_only=False)) == 6
    assert ct.status_filter_supported is True  # replied entries in an unfiltered dump prove nothing


def test_zone_mark_and_family_are_asked_of_the_kernel_and_applied_again(
    kern: tuple[Conntrack, ScriptKernel, CountingWire],
) -> None:
    ct, kernel, _wire = kern
    kernel.table = [v4(1), v4(2, zone=7), v4(3, mark=0x20), v6(4), v6(5, zone=7, mark=0x20), v4(6, mark=0x21)]
    assert ids(ct.dump(unreplied_only=False, zone=7)) == [2, 5]
    assert kernel.dumps[-1].attrs == {CTA_ZONE: 7}
    assert ct.last_dump is not None and (ct.last_dump.entries, ct.last_dump.filtered_in_userspace) == (2, 4)
    assert ids(ct.dump(unreplied_only=False, mark=0x20)) == [3, 5]
    assert kernel.dumps[-1].attrs == {CTA_MARK: 0x20, CTA_MARK_MASK: 0xFFFFFFFF}
    assert ids(ct.dump(unreplied_only=False, family=10)) == [4, 5]
    assert (kernel.dumps[-1].family, kernel.dumps[-1].attrs) == (10, {})
    assert ids(ct.dump(unreplied_only=False, zone=0)) == [1, 3, 4, 6]
    assert kernel.dumps[-1].attrs == {CTA_ZONE: 0}
    assert ids(ct.dump(unreplied_only=False, mark=0)) == [1, 2, 4]
    assert ids(ct.dump(unreplied_only=False, zone=7, mark=0x20, family=10)) == [5]
    assert ids(ct.dump(unreplied_only=False, family=2)) == [1, 2, 3, 6]


def short(seq: int) -> bytes:
    """An entry message shorter than its nfgenmsg (18 bytes): a decode error, not an entry."""
    return HDR.pack(18, CT_NEW, NLM_F_MULTI, seq, 0) + b"\0\0" + b"\0\0"


def test_a_message_that_does_not_decode_is_counted_over_the_instances_life(
    kern: tuple[Conntrack, ScriptKernel, CountingWire],
) -> None:
    ct, kernel, _wire = kern
    one, two = entries(2)
    kernel.attempts = [[[one, Raw(short)], [two, Done()]], [[Raw(short), Raw(short), one, Done()]]]
    assert ids(ct.dump(unreplied_only=False)) == [1, 2]
    stats = ct.last_dump
    assert stats is not None
    assert (stats.entries, stats.messages, stats.decode_errors) == (2, 3, 1)
    assert stats.error_samples == ("message shorter than nfgenmsg",)
    assert ct.decode_errors == 1
    assert ids(ct.dump(unreplied_only=False)) == [1]
    assert ct.last_dump is not None and ct.last_dump.decode_errors == 2
    assert ct.decode_errors == 3


# --- dump: interruption ----------------------------------------------------------------------


def test_an_interrupted_dump_is_thrown_away_and_repeated(kern: tuple[Conntrack, ScriptKernel, CountingWire]) -> None:
    ct, kernel, _wire = kern
    first, second = entries(3), [v4(i) for i in (4, 5)]
    kernel.attempts = [[[first[0], Intr(first[1])], [first[2]], [Done()]], in_datagrams(second)]
    assert ids(ct.dump(unreplied_only=False)) == [4, 5]
    assert len(kernel.dumps) == 2 and kernel.dumps[1].seq == kernel.dumps[0].seq + 1
    stats = ct.last_dump
    assert stats is not None
    assert (stats.interrupted_retries, stats.entries, stats.messages, stats.recvs) == (1, 2, 2, 2)
    assert kernel.busy == 0  # the interrupted dump was read to its end


def test_a_dump_whose_done_alone_is_interrupted_is_repeated(kern: tuple[Conntrack, ScriptKernel, CountingWire]) -> None:
    ct, kernel, _wire = kern
    kernel.attempts = [[entries(2), [Done(NLM_F_DUMP_INTR)]]]
    kernel.table = entries(3)
    assert ids(ct.dump(unreplied_only=False)) == [1, 2, 3]
    assert len(kernel.dumps) == 2 and ct.last_dump is not None and ct.last_dump.interrupted_retries == 1


def test_a_dump_interrupted_every_time_raises_after_its_retries(
    kern: tuple[Conntrack, ScriptKernel, CountingWire],
) -> None:
    """Never an interrupted dump: the first attempt and ``dump_retries`` (3) repeats, then an error."""
    ct, kernel, _wire = kern
    assert ct.dump_retries == 3
    kernel.attempts = [[[Intr(e) for e in entries(2)], [Done()]] for _ in range(5)]
    with pytest.raises(DumpInterrupted, match=r"^conntrack dump interrupted 4 times: results may be inconsistent$") as raised:
        ct.dump(unreplied_only=False)
    assert raised.value.errno == errno.EINTR
    assert len(kernel.dumps) == 4 and ct.last_dump is None
    ct.dump_retries = 0
    with pytest.raises(DumpInterrupted, match=r"^conntrack dump interrupted 1 times"):
        ct.dump(unreplied_only=False)
    assert len(kernel.dumps) == 5
    ct.dump_retries = 1
    kernel.attempts = [[[Intr(e) for e in entries(2)], [Done()]]]
    kernel.table = entries(1)
    assert ids(ct.dump(unreplied_only=False)) == [1]  # the one repeat succeeded
    assert ct.last_dump is not None and ct.last_dump.interrupted_retries == 1
    assert kernel.busy == 0


# --- dump: refusals and failures -------------------------------------------------------------


@pytest.mark.parametrize(("err", "raised", "text"), [
    (errno.EPERM, PermissionDenied, r"^ctnetlink dump: Operation not permitted \(needs CAP_NET_ADMIN\)$"),
    (errno.EACCES, PermissionDenied, r"^ctnetlink dump: Permission denied \(needs CAP_NET_ADMIN\)$"),
    (errno.EBUSY, NetlinkError, r"^ctnetlink dump: Device or resource busy$"),
    (errno.EINTR, NetlinkError, r"^ctnetlink dump: Interrupted system call$"),
], ids=["EPERM", "EACCES", "EBUSY", "EINTR"])
def test_a_refused_dump_raises_the_kernels_errno_without_a_repeat(
    kern: tuple[Conntrack, ScriptKernel, CountingWire], err: int, raised: type[Exception], text: str,
) -> None:
    ct, kernel, _wire = kern
    kernel.attempts = [[[Err(err)]]]
    with pytest.raises(raised, match=text) as info:
        ct.dump(unreplied_only=False)
    if raised is NetlinkError:
        assert info.value.errno == err  # type: ignore[attr-defined]
    assert len(kernel.dumps) == 1 and ct.last_dump is None


def test_an_error_after_entries_fails_the_whole_dump(kern: tuple[Conntrack, ScriptKernel, CountingWire]) -> None:
    ct, kernel, _wire = kern
    kernel.attempts = [[entries(3), [Err(errno.ENOMEM)]]]
    with pytest.raises(NetlinkError, match=r"^ctnetlink dump: Cannot allocate memory$") as info:
        ct.dump(unreplied_only=False)
    assert info.value.errno == errno.ENOMEM
    kernel.table = entries(2)
    assert ids(ct.dump(unreplied_only=False)) == [1, 2]  # the error ended that dump: nothing left to read
    assert kernel.busy == 0


def test_a_judgement_that_fails_mid_dump_reads_the_rest_so_the_next_dump_runs(
    kern: tuple[Conntrack, ScriptKernel, CountingWire],
) -> None:
    """The kernel refuses a new dump while one is unread (EBUSY): a failure while judging the
    first datagram must leave nothing of its dump queued."""
    ct, kernel, _wire = kern
    table = entries(9)
    kernel.attempts = [in_datagrams(table)]  # 3 + 3 + 3 entries, then the DONE

    def fail() -> None:
        raise RuntimeError("judging failed")

    ct.before_burst = fail
    with pytest.raises(RuntimeError, match="judging failed"):
        ct.dump(unreplied_only=False)
    ct.before_burst = None
    kernel.table = entries(2)
    assert ids(ct.dump(unreplied_only=False)) == [1, 2]
    assert kernel.busy == 0
    assert ct.last_dump is not None and ct.last_dump.recvs == 2
    assert ct.timeout == 0.5  # the drain's own wait is put back


def test_the_drain_of_a_failed_dump_stops_at_its_end(kern: tuple[Conntrack, ScriptKernel, CountingWire]) -> None:
    """What follows the abandoned dump's end is not the drain's: a later answer stays queued."""
    ct, kernel, _wire = kern
    calls: list[int] = []

    def fail_first() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("judging failed")

    kernel.attempts = [[*in_datagrams(entries(6)), [Stale(Done(), -1)]]]  # then the next request's DONE
    ct.before_burst = fail_first
    with pytest.raises(RuntimeError):
        ct.dump(unreplied_only=False)
    # The next dump's seq is the abandoned one's + 1: its DONE, queued already, ends it at once.
    kernel.attempts = [[]]
    kernel.peer = None  # no EBUSY: the DONE left queued is the point
    assert ct.dump(unreplied_only=False) == []


def test_a_dump_without_an_answer_times_out(kern: tuple[Conntrack, ScriptKernel, CountingWire]) -> None:
    ct, kernel, _wire = kern
    ct.timeout = 0.2
    kernel.attempts = [[]]  # not even a DONE
    with pytest.raises(NetlinkError, match=r"^no answer from ctnetlink within 0.2 s$"):
        ct.dump(unreplied_only=False)
    assert ct.timeout == 0.2
    kernel.attempts = [[entries(2)]]  # entries, and then nothing
    with pytest.raises(NetlinkError, match=r"^no answer from ctnetlink within 0.2 s$"):
        ct.dump(unreplied_only=False)


def test_a_receive_error_in_the_callers_thread_fails_the_dump_naming_it() -> None:
    ct, kernel, _wire = make(pipelined=False)
    try:
        kernel.recv_error = errno.ENOBUFS
        kernel.table = entries(3)
        with pytest.raises(NetlinkError, match=r"^ctnetlink dump failed: No buffer space available$") as info:
            ct.dump(unreplied_only=False)
        assert info.value.errno == errno.ENOBUFS
        assert ids(ct.dump(unreplied_only=False)) == [1, 2, 3]  # the failed dump was drained
        assert kernel.busy == 0
    finally:
        ct.close()


def test_a_datagram_fills_the_receive_buffer_exactly_or_fails() -> None:
    """A datagram as long as the buffer is read; a longer one (MSG_TRUNC reports its length) fails."""
    ct, kernel, _wire = make(pipelined=False)
    try:
        kernel.attempts = [[entries(2), [Done()]]]
        size = len(entry_msg(entries(1)[0], 1)) * 2
        ct._buf = bytearray(size)
        ct._view = memoryview(ct._buf)
        assert ids(ct.dump(unreplied_only=False)) == [1, 2]
        kernel.attempts = [[entries(3), [Done()]]]
        with pytest.raises(NetlinkError, match=rf"^ctnetlink datagram of {size * 3 // 2} bytes exceeds the receive buffer$"):
            ct.dump(unreplied_only=False)
    finally:
        ct.close()


class Bursts:
    """The compiled module with ``recv_burst`` recorded (its arguments and thread) and, first,
    answered from a script of (data, count, ended, errno)."""

    def __init__(self, real: Any, script: list[tuple[bytes, int, bool, int]] | None = None) -> None:
        self.real = real
        self.script = script or []
        self.calls: list[tuple[Any, ...]] = []
        self.threads: list[tuple[str, bool]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def recv_burst(self, *args: Any) -> Any:
        self.calls.append(args)
        me = threading.current_thread()
        self.threads.append((me.name, me.daemon))
        if self.script:
            return self.script.pop(0)
        return self.real.recv_burst(*args)


@pytest.fixture
def bursts(monkeypatch: pytest.MonkeyPatch) -> Bursts:
    if ctcodec._ctscan is None:
        pytest.skip("the compiled module is not built")
    recorder = Bursts(ctcodec._ctscan)
    monkeypatch.setattr(ctcodec, "_ctscan", recorder)
    return recorder


@pytest.fixture
def piped() -> Iterator[tuple[Conntrack, ScriptKernel, CountingWire]]:
    ct, kernel, wire = make(pipelined=True)
    yield ct, kernel, wire
    ct.close()


def test_the_reader_takes_one_datagram_first_then_bursts_of_a_mebibyte(
    bursts: Bursts, piped: tuple[Conntrack, ScriptKernel, CountingWire]
) -> None:
    """The documented pipeline: a first burst of one datagram (64 KiB, no more than the free room
    that ends a burst), then bursts of 1 MiB, each waiting 100 ms at most, for this dump's seq, in
    a daemon thread named ``topowatch-ct-reader``; the caller's thread receives nothing."""
    ct, kernel, wire = piped
    kernel.table = entries(9)
    assert ids(ct.dump(unreplied_only=False)) == list(range(1, 10))
    fd, seq = wire.fileno(), kernel.dumps[0].seq
    assert bursts.calls[0] == (fd, 64 << 10, 64 << 10, seq, 100)
    assert bursts.calls[1:] and all(c == (fd, 1 << 20, 64 << 10, seq, 100) for c in bursts.calls[1:])
    assert set(bursts.threads) == {(READER, True)}
    assert wire.recv_threads == []
    assert ct.last_dump is not None and ct.last_dump.recvs == 4  # 3 datagrams of entries and the DONE


def test_a_pipelined_dump_failed_after_its_end_was_read_needs_no_drain(
    bursts: Bursts, piped: tuple[Conntrack, ScriptKernel, CountingWire]
) -> None:
    """The reader received the DONE already: the drain reads nothing (it would wait a second)."""
    ct, kernel, wire = piped
    kernel.table = entries(3)
    calls: list[int] = []

    def fail_second() -> None:
        calls.append(1)
        if len(calls) == 2:  # the second burst: the rest of the dump with its DONE
            raise RuntimeError("judging failed")

    ct.before_burst = fail_second
    with pytest.raises(RuntimeError):
        ct.dump(unreplied_only=False)
    assert wire.recv_threads == []
    ct.before_burst = None
    assert ids(ct.dump(unreplied_only=False)) == [1, 2, 3]
    assert kernel.busy == 0


@pytest.mark.parametrize(("err", "text"), [
    (errno.EMSGSIZE, r"^a ctnetlink datagram exceeds the receive buffer$"),
    (errno.ENOBUFS, r"^ctnetlink dump failed: No buffer space available$"),
    (errno.EIO, r"^ctnetlink dump failed: Input/output error$"),
], ids=["EMSGSIZE", "ENOBUFS", "EIO"])
def test_a_receive_error_in_the_reader_fails_the_dump_naming_it(
    bursts: Bursts, piped: tuple[Conntrack, ScriptKernel, CountingWire], err: int, text: str
) -> None:
    ct, kernel, _wire = piped
    kernel.table = entries(3)
    bursts.script = [(b"", 0, False, err)]
    with pytest.raises(NetlinkError, match=text) as info:
        ct.dump(unreplied_only=False)
    assert info.value.errno == (0 if err == errno.EMSGSIZE else err)
    assert ids(ct.dump(unreplied_only=False)) == [1, 2, 3]  # the failed dump was drained
    assert kernel.busy == 0


def test_the_reader_waits_its_timeout_in_polls_then_fails(
    bursts: Bursts, piped: tuple[Conntrack, ScriptKernel, CountingWire]
) -> None:
    """Each empty poll of 100 ms counts towards ``timeout``: 0.2 s is two polls; a datagram
    received in between starts the count again."""
    ct, kernel, _wire = piped
    ct.timeout = 0.2
    kernel.attempts = [[]]
    timed_out = (b"", 0, False, errno.ETIMEDOUT)
    bursts.script = [timed_out, timed_out]
    with pytest.raises(NetlinkError, match=r"^no answer from ctnetlink within 0.2 s$"):
        ct.dump(unreplied_only=False)
    assert len(bursts.calls) == 2
    bursts.calls.clear()
    one = entry_msg(entries(1)[0], 0)  # a stray message: counted as a datagram, not this dump's
    bursts.script = [timed_out, (one, 1, False, 0), timed_out, timed_out]
    with pytest.raises(NetlinkError, match=r"^no answer from ctnetlink within 0.2 s$"):
        ct.dump(unreplied_only=False)
    assert len(bursts.calls) == 4


# --- scan: the dump streamed through a consumer ------------------------------------------------


class Consumer:
    """Records what a scan hands it: built entries (``add``) and raw ones (``add_raw``) by id."""

    made = 0

    def __init__(self) -> None:
        Consumer.made += 1
        self.number = Consumer.made
        self.built: list[int] = []
        self.raw: list[int] = []

    def add(self, entry: Entry) -> None:
        self.built.append(entry.id)

    def add_raw(self, raw: Any) -> None:
        self.raw.append(raw[13])  # RawEntry: (family, proto, 4 x orig, 4 x reply, status, zone, mark, id, timeout)

    @property
    def seen(self) -> list[int]:
        return sorted(self.built + self.raw)


def repeated(e: Entry) -> Raw:
    """``e``'s message with CTA_USE twice: the compiled reader leaves it to the reference decode,
    which builds an ``Entry`` (the learned layouts do not read it either: another length)."""

    def make(seq: int) -> bytes:
        msg = entry_msg(e, seq) + struct.pack("=HHI", 8, 11, 1)
        return struct.pack("=I", len(msg)) + msg[4:]

    return Raw(make)


def test_a_scan_hands_every_entry_to_one_consumer(kern: tuple[Conntrack, ScriptKernel, CountingWire]) -> None:
    """Entries arrive raw (``add_raw``) where a layout reads them, built (``add``) where the
    reference decode does; together they are every entry, each once."""
    ct, kernel, _wire = kern
    table = entries(7)
    kernel.attempts = [[table[:3], [repeated(table[3]), table[4]], [table[5], repeated(table[6])], [Done()]]]
    made: list[Consumer] = []
    after: list[Any] = []
    ct.after_burst = after.append

    def start() -> Consumer:
        made.append(Consumer())
        return made[-1]

    got = ct.scan(start, unreplied_only=False)
    assert len(made) == 1 and got is made[0]
    assert got.seen == [1, 2, 3, 4, 5, 6, 7]
    assert got.built[-2:] == [4, 7] and 5 in got.raw and 6 in got.raw
    assert after and all(c is got for c in after)
    assert kernel.dumps[0].attrs == {}
    stats = ct.last_dump
    assert stats is not None
    assert (stats.entries, stats.messages, stats.filtered_in_userspace, stats.kernel_status_filter) == (7, 7, 0, False)
    assert (stats.recvs, stats.bytes, stats.interrupted_retries) == (4, sum(map(len, kernel.sent)), 0)


def test_an_unreplied_scan_never_shows_a_replied_entry(kern: tuple[Conntrack, ScriptKernel, CountingWire]) -> None:
    ct, kernel, _wire = kern
    kernel.table = mixed()  # a kernel ignoring the status filter
    got = ct.scan(Consumer)
    assert got.seen == [1, 3, 4, 6]
    assert kernel.dumps[0].attrs == {CTA_STATUS: 0, CTA_STATUS_MASK: IPS_SEEN_REPLY}
    stats = ct.last_dump
    assert stats is not None
    assert (stats.entries, stats.messages, stats.filtered_in_userspace, stats.kernel_status_filter) == (4, 6, 2, True)
    assert ct.status_filter_supported is False
    assert ct.scan(Consumer).seen == [1, 3, 4, 6]
    assert kernel.dumps[1].attrs == {}
    assert ct.last_dump is not None and ct.last_dump.kernel_status_filter is False
    assert ct.scan(Consumer, unreplied_only=False).seen == [1, 2, 3, 4, 5, 6]
    assert ct.dump(unreplied_only=False) == mixed()  # the scans left no filtering behind


def test_an_unreplied_scan_on_a_filtering_kernel(kern: tuple[Conntrack, ScriptKernel, CountingWire]) -> None:
    ct, kernel, _wire = kern
    kernel.table = mixed()
    kernel.honour_status = True
    assert ct.scan(Consumer).seen == [1, 3, 4, 6]
    assert ct.status_filter_supported is True
    assert ct.last_dump is not None and (ct.last_dump.entries, ct.last_dump.filtered_in_userspace) == (4, 0)


def test_an_interrupted_scan_starts_again_with_a_fresh_consumer(
    kern: tuple[Conntrack, ScriptKernel, CountingWire],
) -> None:
    ct, kernel, _wire = kern
    kernel.attempts = [[[v4(1), Intr(v4(2))], [Done()]], in_datagrams([v4(3), v4(4), v4(5)])]
    made: list[Consumer] = []

    def start() -> Consumer:
        made.append(Consumer())
        return made[-1]

    got = ct.scan(start, unreplied_only=False)
    assert len(made) == 2 and got is made[1]
    assert made[0].seen == [1, 2] and got.seen == [3, 4, 5]
    assert ct.last_dump is not None and (ct.last_dump.interrupted_retries, ct.last_dump.entries) == (1, 3)


def test_a_refused_scan_raises(kern: tuple[Conntrack, ScriptKernel, CountingWire]) -> None:
    ct, kernel, _wire = kern
    kernel.attempts = [[[Err(errno.EPERM)]]]
    with pytest.raises(PermissionDenied, match=r"^ctnetlink dump: Operation not permitted"):
        ct.scan(Consumer)
    assert ct.dump(unreplied_only=False) == []  # the table is empty; the flag was put back
    assert kernel.dumps[1].attrs == {}


def test_a_consumer_with_a_compiled_program_settles_in_c(
    kern: tuple[Conntrack, ScriptKernel, CountingWire], path: str
) -> None:
    """A consumer with ``raw_program`` (a ``Decider``) is handed to the compiled feed as ``settle``;
    one without is not asked for it."""
    ct, kernel, _wire = kern
    kernel.table = entries(3)

    class Settled(Exception):
        pass

    class Settling(Consumer):
        raw_program = None

        @property
        def raw_cache(self) -> Any:
            raise Settled  # the compiled feed reads the settle's cache first: it was handed over

    if ctcodec._ctscan is None:
        pytest.skip("the compiled module is not built")
    with pytest.raises(Settled):
        ct.scan(Settling, unreplied_only=False)
    assert ct.scan(Consumer, unreplied_only=False).seen == [1, 2, 3]


# --- dump_datagrams ----------------------------------------------------------------------------


def test_the_raw_datagrams_of_a_dump_are_returned_as_received(
    kern: tuple[Conntrack, ScriptKernel, CountingWire],
) -> None:
    ct, kernel, _wire = kern
    kernel.attempts = [[[Stale(v4(9))], *in_datagrams(entries(4))]]
    got = ct.dump_datagrams()
    assert got == kernel.sent  # the stale datagram too: everything up to the DONE
    assert len(got) == 4 and kernel.dumps[0].attrs == {}
    kernel.table = mixed()
    kernel.honour_status = True
    got = ct.dump_datagrams(status=(0, IPS_SEEN_REPLY))
    assert kernel.dumps[1].attrs == {CTA_STATUS: 0, CTA_STATUS_MASK: IPS_SEEN_REPLY}
    assert got == kernel.sent[4:] and len(got) == 3  # 3 + 1 unreplied entries, the DONE
    kernel.attempts = [[[Err(errno.EPERM)]]]
    with pytest.raises(PermissionDenied, match=r"^ctnetlink dump: Operation not permitted"):
        ct.dump_datagrams()
    kernel.attempts = [[entries(1), [Err(errno.ENOMEM)]]]
    with pytest.raises(NetlinkError, match=r"^ctnetlink dump: Cannot allocate memory$") as info:
        ct.dump_datagrams()
    assert info.value.errno == errno.ENOMEM
