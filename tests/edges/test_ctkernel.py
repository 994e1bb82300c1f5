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
import gc
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Any

import pytest
from test_ctcodec import dump_message
from test_ctdelete import FakeKernel, Request, Wire, entries

from topowatch.core.conntrack import IPS_CONFIRMED, IPS_SEEN_REPLY, CtTuple, Entry
from topowatch.core.decide import StaleEntries, pack_record
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
    get_timeout: dict[int, int] = field(default_factory=dict)  # entry id -> CTA_TIMEOUT its re-read shows
    get_acked: set[int] = field(default_factory=set)  # entry ids whose re-read gets a bare ACK (errno 0)

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

    def _reread(self, data: bytes, pos: int, mlen: int, seq: int) -> None:
        """``FakeKernel``'s re-read answer, with a CTA_TIMEOUT where scripted, or a bare ACK."""
        alen = struct.unpack_from("=H", data, pos + 20)[0]
        orig, _proto, _zone = ctcodec._decode_tuple(data, pos + 24, pos + 20 + alen, ctcodec.AddressCache())
        ct_id = orig.sport - 1000
        if ct_id in self.get_acked:
            self.gets[-1].append(ct_id)
            self.sock.send(self._answer(seq, 0))
            return
        if ct_id not in self.get_timeout:
            super()._reread(data, pos, mlen, seq)
            return
        self.gets[-1].append(ct_id)
        attrs = [(3, ctcodec.nla(CTA_STATUS, ctcodec.be32(self.get_status.get(ct_id, IPS_CONFIRMED)))),
                 (7, ctcodec.nla(7, ctcodec.be32(self.get_timeout[ct_id]))),
                 (8, ctcodec.nla(CTA_MARK, ctcodec.be32(self.get_mark.get(ct_id, 0)))),
                 (12, ctcodec.nla(12, ctcodec.be32(ct_id)))]  # fmt: skip
        self.sock.send(ctcodec.encode_message(CT_NEW, 0, seq, 2, attrs))

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
    kw.setdefault("status", IPS_CONFIRMED)
    return Entry(10, 17, CtTuple(a, b, 1000 + i, 53), CtTuple(b, a, 53, 1000 + i), id=i, **kw)


def v4(i: int, **kw: Any) -> Entry:
    a, b = ip_address("10.0.1.2"), ip_address("192.0.2.10")
    kw.setdefault("status", IPS_CONFIRMED)
    return Entry(2, 17, CtTuple(a, b, 1000 + i, 53), CtTuple(b, a, 53, 1000 + i), id=i, **kw)


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
    kernel.table = [v4(1), v4(2, zone=7), v4(3, mark=0x20), v6(4), v6(5, zone=7, mark=0x20), v4(6, mark=0x21),
                    v4(7, zone=7, status=REPLIED)]  # fmt: skip
    assert ids(ct.dump(unreplied_only=False, zone=7)) == [2, 5, 7]
    assert kernel.dumps[-1].attrs == {CTA_ZONE: 7}
    assert ct.last_dump is not None and (ct.last_dump.entries, ct.last_dump.filtered_in_userspace) == (3, 4)
    assert ids(ct.dump(unreplied_only=False, mark=0x20)) == [3, 5]
    assert kernel.dumps[-1].attrs == {CTA_MARK: 0x20, CTA_MARK_MASK: 0xFFFFFFFF}
    assert ids(ct.dump(unreplied_only=False, family=10)) == [4, 5]
    assert (kernel.dumps[-1].family, kernel.dumps[-1].attrs) == (10, {})
    assert ids(ct.dump(unreplied_only=False, zone=0)) == [1, 3, 4, 6]
    assert kernel.dumps[-1].attrs == {CTA_ZONE: 0}
    assert ids(ct.dump(unreplied_only=False, mark=0)) == [1, 2, 4, 7]
    assert ids(ct.dump(unreplied_only=False, zone=7, mark=0x20, family=10)) == [5]
    assert ids(ct.dump(unreplied_only=False, family=2)) == [1, 2, 3, 6, 7]
    assert ids(ct.dump(zone=7)) == [2, 5]
    assert ct.last_dump is not None and (ct.last_dump.entries, ct.last_dump.filtered_in_userspace) == (2, 5)


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
        self.one_each = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def recv_burst(self, *args: Any) -> Any:
        self.calls.append(args)
        # A reader that never stops fails the dump instead of hanging the test (raised in the reader,
        # it is handed to the judging thread).
        assert len(self.calls) < 60, "the reader polls on and on"
        if self.one_each:
            args = (args[0], args[2], *args[2:])  # a burst of one datagram: size no more than the room
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
    assert (kernel.dumps[0].family, kernel.dumps[0].flags) == (0, NLM_F_REQUEST | NLM_F_DUMP)
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


# --- stats: per-CPU counters summed ------------------------------------------------------------

NAMES = {2: "found", 4: "invalid", 8: "insert", 9: "insert_failed", 10: "drop", 11: "early_drop",
         12: "error", 13: "search_restart", 14: "clash_resolve", 15: "chain_toolong"}  # fmt: skip


@pytest.fixture
def serial() -> Iterator[tuple[Conntrack, ScriptKernel, CountingWire]]:
    ct, kernel, wire = make(pipelined=False)
    yield ct, kernel, wire
    ct.close()


def test_stats_sum_every_cpus_counters(serial: tuple[Conntrack, ScriptKernel, CountingWire]) -> None:
    """Two CPUs: drop 3 + 4, found 10 + 0 (absent on CPU 1); the counters nobody sent are 0."""
    ct, kernel, wire = serial
    kernel.cpus = [{10: 3, 2: 10, 8: 1}, {10: 4, 11: 2, 99: 7}]  # 99: an attribute this reader does not know
    got = ct.stats()
    assert got == {**dict.fromkeys(NAMES.values(), 0), "drop": 7, "found": 10, "insert": 1, "early_drop": 2}
    assert wire.addresses == [(0, 0)]
    assert ct.requests == 1


def test_stats_read_on_over_datagrams_and_skip_other_requests_answers(
    serial: tuple[Conntrack, ScriptKernel, CountingWire],
) -> None:
    ct, kernel, _wire = serial
    seq = ct._seq  # the request's sequence number: the next one
    kernel.stats_datagrams = [
        stats_msg(seq - 1, 0, {10: 100}) + done_msg(seq - 1),  # an earlier request's answer
        stats_msg(seq, 0, {10: 1}),
        stats_msg(seq, 1, {10: 2}) + stats_msg(seq, 2, {9: 5}),
        done_msg(seq),
        stats_msg(seq + 1, 3, {10: 1000}),  # after the DONE: not read
    ]
    got = ct.stats()
    assert (got["drop"], got["insert_failed"]) == (3, 5)


@pytest.mark.parametrize(("err", "raised", "text"), [
    (errno.EPERM, PermissionDenied, r"^conntrack statistics: Operation not permitted \(needs CAP_NET_ADMIN\)$"),
    (errno.EOPNOTSUPP, NetlinkError, r"^conntrack statistics: Operation not supported$"),
], ids=["EPERM", "EOPNOTSUPP"])
def test_refused_stats_raise(
    serial: tuple[Conntrack, ScriptKernel, CountingWire], err: int, raised: type[Exception], text: str
) -> None:
    ct, kernel, _wire = serial
    kernel.stats_error = err
    with pytest.raises(raised, match=text) as info:
        ct.stats()
    if raised is NetlinkError:
        assert info.value.errno == err  # type: ignore[attr-defined]


def test_malformed_stats_raise_a_netlink_error(serial: tuple[Conntrack, ScriptKernel, CountingWire]) -> None:
    ct, kernel, _wire = serial
    seq = ct._seq
    kernel.stats_datagrams = [stats_msg(seq, 0, {10: 1}, attr_len=6)]  # a 2-byte counter
    with pytest.raises(NetlinkError, match=r"^conntrack statistics: stats counter drop shorter than 4 bytes$") as info:
        ct.stats()
    assert info.value.errno == 0


def test_stats_without_an_answer_time_out(serial: tuple[Conntrack, ScriptKernel, CountingWire]) -> None:
    ct, kernel, _wire = serial
    ct.timeout = 0.1
    kernel.stats_datagrams = []
    with pytest.raises(NetlinkError, match=r"^no answer from ctnetlink within 0.1 s$"):
        ct.stats()


# --- create --------------------------------------------------------------------------------------


def created(kernel: ScriptKernel) -> list[list[int]]:
    return [[r.ct_id for r in send] for send in kernel.created]


def test_create_sends_a_batch_with_one_ack_and_counts_it(serial: tuple[Conntrack, ScriptKernel, CountingWire]) -> None:
    ct, kernel, _wire = serial
    assert ct.create(entries(4)) == 4
    assert created(kernel) == [[1, 2, 3, 4]]
    create = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL
    assert [r.flags for r in kernel.created[0]] == [create] * 3 + [create | NLM_F_ACK]
    seqs = [r.seq for r in kernel.created[0]]
    assert seqs == list(range(seqs[0], seqs[0] + 4))
    assert ct.create([]) == 0 and len(kernel.created) == 1


def test_create_splits_batches_and_adds_them_up(serial: tuple[Conntrack, ScriptKernel, CountingWire]) -> None:
    ct, kernel, _wire = serial
    ct.batch_max = 16
    assert ct.create(entries(40)) == 40
    assert [len(s) for s in kernel.created] == [16, 16, 8]
    assert [[bool(r.flags & NLM_F_ACK) for r in s].count(True) for s in kernel.created] == [1, 1, 1]


def test_refused_creates_are_counted_by_errno_after_everything_was_sent(
    serial: tuple[Conntrack, ScriptKernel, CountingWire],
) -> None:
    ct, kernel, _wire = serial
    ct.batch_max = 16
    kernel.errors = {2: errno.EEXIST, 20: errno.EEXIST, 21: errno.EINVAL, 40: errno.EEXIST}
    with pytest.raises(NetlinkError, match=r"^created 36; refused: EEXIST x3, EINVAL x1$") as info:
        ct.create(entries(40))
    assert info.value.errno == errno.EEXIST  # the smallest errno: EEXIST 17, EINVAL 22
    assert [len(s) for s in kernel.created] == [16, 16, 8]


def test_an_unknown_errno_is_named_by_number(serial: tuple[Conntrack, ScriptKernel, CountingWire]) -> None:
    ct, kernel, _wire = serial
    kernel.errors = {1: 4000}
    with pytest.raises(NetlinkError, match=r"^created 1; refused: 4000 x1$") as info:
        ct.create(entries(2))
    assert info.value.errno == 4000


@pytest.mark.parametrize(("script", "raised", "text", "code"), [
    ({1: errno.EPERM, 2: errno.EPERM}, PermissionDenied, r"^ctnetlink create: Operation not permitted", 0),
    ({1: errno.EACCES, 2: errno.EPERM}, PermissionDenied, r"^ctnetlink create: Operation not permitted", 0),
    ({2: errno.EACCES}, PermissionDenied, r"^ctnetlink create: Permission denied", 0),
    ({1: errno.EPERM, 2: errno.EEXIST}, NetlinkError, r"^created 1; refused: EPERM x1, EEXIST x1$", errno.EPERM),
], ids=["EPERM", "EACCES and EPERM", "EACCES", "EPERM and EEXIST"])
def test_creates_refused_for_permissions_alone_are_permission_denied(
    serial: tuple[Conntrack, ScriptKernel, CountingWire], script: dict[int, int], raised: type[Exception],
    text: str, code: int,
) -> None:
    ct, kernel, _wire = serial
    kernel.errors = script
    with pytest.raises(raised, match=text) as info:
        ct.create(entries(3))
    if code:
        assert info.value.errno == code  # type: ignore[attr-defined]


def test_dropped_create_answers_raise(serial: tuple[Conntrack, ScriptKernel, CountingWire]) -> None:
    ct, kernel, _wire = serial
    kernel.errors = {2: errno.EEXIST}
    kernel.dropped = {2}
    with pytest.raises(NetlinkError, match=r"^ctnetlink answers were dropped while creating entries$") as info:
        ct.create(entries(3))
    assert info.value.errno == errno.ENOBUFS


# --- the socket: opening, options, sizes, sending, waiting ---------------------------------------


class SizedWire(CountingWire):
    """``CountingWire`` whose socket reports the given buffer sizes (what the kernel granted)."""

    def __init__(self, sock: socket.socket, kernel: FakeKernel, rcvbuf: int, sndbuf: int) -> None:
        super().__init__(sock, kernel)
        self.sizes = {socket.SO_RCVBUF: rcvbuf, socket.SO_SNDBUF: sndbuf}

    def getsockopt(self, level: int, option: int) -> int:
        return self.sizes[option]


@pytest.mark.parametrize(("rcvbuf", "sndbuf", "batch_bytes", "batch_max", "recheck"), [
    (20 * 4096, 20001, 10000, 80, 20),  # half the send buffer; an answer of 1 KiB, a re-read of 4 KiB each
    (10 * 1024, 6000, 4096, 16, 16),  # the floors
    (1 << 26, 1 << 24, 1 << 23, 16384, 64),  # the ceilings
], ids=["sized", "floors", "ceilings"])
def test_batches_are_sized_from_the_buffers_the_kernel_granted(
    rcvbuf: int, sndbuf: int, batch_bytes: int, batch_max: int, recheck: int
) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ct = Conntrack(SizedWire(ours, ScriptKernel(theirs), rcvbuf, sndbuf), status_filter=True)  # type: ignore[arg-type]
    try:
        assert (ct.batch_bytes, ct.batch_max, ct.recheck_batch) == (batch_bytes, batch_max, recheck)
        assert type(ct.batch_bytes) is int
    finally:
        ct.close()


def test_a_fresh_conntrack_has_the_documented_defaults() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ct = Conntrack(Wire(ours, ScriptKernel(theirs)), status_filter=True)  # type: ignore[arg-type]
    try:
        assert (ct.timeout, ct.dump_retries) == (30.0, 3)
        assert (ct.last_dump, ct.decode_errors, ct.requests) == (None, 0, 0)
        assert (ct.before_burst, ct.after_burst) == (None, None)
        assert ct.pipelined is (ctcodec._ctscan is not None)
    finally:
        ct.close()


def test_the_socket_asks_for_big_buffers_and_header_only_acks() -> None:
    """SO_RCVBUFFORCE (33) and SO_SNDBUFFORCE (32) first; refused (no CAP_NET_ADMIN), the plain
    options (capped by the sysctls); then NETLINK_CAP_ACK (SOL_NETLINK 270, option 10) on."""

    class Refusing(CountingWire):
        refuse = False

        def setsockopt(self, *args: Any) -> None:
            super().setsockopt(*args)
            if self.refuse and args[1] in (32, 33):
                raise OSError(errno.EPERM, "Operation not permitted")

    sol = socket.SOL_SOCKET
    for refuse, expected in (
        (False, [(sol, 33, 32 << 20), (sol, 32, 4 << 20), (270, 10, 1)]),
        (True, [(sol, 33, 32 << 20), (sol, socket.SO_RCVBUF, 32 << 20), (sol, 32, 4 << 20),
                (sol, socket.SO_SNDBUF, 4 << 20), (270, 10, 1)]),
    ):  # fmt: skip
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        wire = Refusing(ours, ScriptKernel(theirs))
        wire.refuse = refuse
        Conntrack(wire, status_filter=True).close()  # type: ignore[arg-type]
        assert wire.options == expected


def test_opening_the_socket_names_what_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[Any, ...]] = []

    def refuse(exc: OSError) -> Callable[..., Any]:
        def open_(*args: Any) -> Any:
            asked.append(args)
            raise exc

        return open_

    monkeypatch.setattr(ctnetlink.socket, "socket", refuse(PermissionError(errno.EPERM, "Operation not permitted")))
    with pytest.raises(PermissionDenied, match=r"^opening a ctnetlink socket needs CAP_NET_ADMIN$"):
        ctnetlink.open_socket()
    assert asked == [(socket.AF_NETLINK, socket.SOCK_RAW, 12)]  # NETLINK_NETFILTER
    monkeypatch.setattr(ctnetlink.socket, "socket", refuse(OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")))
    with pytest.raises(NetlinkError, match=r"^cannot open a ctnetlink socket: Address family not supported by protocol$") as info:
        ctnetlink.open_socket()
    assert info.value.errno == errno.EAFNOSUPPORT
    monkeypatch.setattr(ctnetlink.socket, "socket", refuse(OSError("no errno")))
    with pytest.raises(NetlinkError, match=r"^cannot open a ctnetlink socket: None$") as info:
        ctnetlink.open_socket()
    assert info.value.errno == 0


class Flaky(CountingWire):
    """``CountingWire`` whose next ``sendto`` fails with ``fail`` before reaching the kernel."""

    fail: OSError | None = None

    def sendto(self, data: bytes, address: Any) -> int:
        if self.fail is not None:
            self.addresses.append(address)
            exc, self.fail = self.fail, None
            raise exc
        return super().sendto(data, address)


def flaky() -> tuple[Conntrack, ScriptKernel, Flaky]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    kernel = ScriptKernel(theirs, peer=ours)
    wire = Flaky(ours, kernel)
    ct = Conntrack(wire, status_filter=True)  # type: ignore[arg-type]
    ct.timeout = 0.5
    ct.pipelined = False
    return ct, kernel, wire


def test_a_send_that_would_block_waits_for_room_and_sends_again() -> None:
    ct, kernel, wire = flaky()
    try:
        kernel.cpus = [{10: 1}]
        wire.fail = BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        assert ct.stats()["drop"] == 1
        assert wire.addresses == [(0, 0), (0, 0)] and ct.requests == 1
    finally:
        ct.close()


def test_a_send_without_room_in_time_fails() -> None:
    ct, _kernel, wire = flaky()
    try:
        ct.timeout = 0.1
        # The kernel's end stops reading: fill its queue until our end cannot send.
        with pytest.raises(BlockingIOError):
            while True:
                wire.sock.send(b"x" * 512)
        wire.fail = BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        with pytest.raises(NetlinkError, match=r"^timed out sending to ctnetlink$"):
            ct.stats()
    finally:
        ct.close()


@pytest.mark.parametrize(("exc", "text", "code"), [
    (OSError(errno.EPERM, "Operation not permitted"), r"^ctnetlink send failed: Operation not permitted$", errno.EPERM),
    (OSError("no errno"), r"^ctnetlink send failed: None$", 0),
], ids=["EPERM", "no errno"])
def test_a_failed_send_names_the_error(exc: OSError, text: str, code: int) -> None:
    ct, _kernel, wire = flaky()
    try:
        wire.fail = exc
        with pytest.raises(NetlinkError, match=text) as info:
            ct.stats()
        assert info.value.errno == code
    finally:
        ct.close()


def test_an_answer_that_comes_later_is_waited_for(serial: tuple[Conntrack, ScriptKernel, CountingWire]) -> None:
    """Nothing is queued when the dump starts: the receive waits (poll, up to ``timeout``) for
    the kernel's datagrams, sent 50 ms later."""
    ct, kernel, _wire = serial
    ct.timeout = 10.0
    kernel.attempts = [[]]
    table = entries(2)

    def later() -> None:
        seq = kernel.dumps[-1].seq
        kernel.sock.send(b"".join(entry_msg(e, seq) for e in table))
        kernel.sock.send(done_msg(seq))

    timer = threading.Timer(0.05, later)
    timer.start()
    try:
        assert ids(ct.dump(unreplied_only=False)) == [1, 2]
    finally:
        timer.join()


def test_a_bind_failure_without_an_errno_is_errno_0() -> None:
    class Unbindable(CountingWire):
        def bind(self, address: Any) -> None:
            raise OSError("no errno")

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    wire = Unbindable(ours, ScriptKernel(theirs))
    with pytest.raises(NetlinkError, match=r"^cannot bind the ctnetlink socket: None$") as info:
        Conntrack(wire, status_filter=True)  # type: ignore[arg-type]
    assert info.value.errno == 0
    wire.close()


# --- percentile (nearest rank) -------------------------------------------------------------------


@pytest.mark.parametrize(("values", "q", "expected"), [
    ([5.0, 1.0, 4.0, 2.0, 3.0], 0.5, 3.0),  # rank ceil(2.5) = 3
    ([5.0, 1.0, 4.0, 2.0, 3.0], 0.99, 5.0),  # rank ceil(4.95) = 5
    ([5.0, 1.0, 4.0, 2.0, 3.0], 1.0, 5.0),
    ([5.0, 1.0, 4.0, 2.0, 3.0], 0.1, 1.0),  # rank ceil(0.5) = 1
    ([5.0, 1.0, 4.0, 2.0, 3.0], 0.0, 1.0),  # rank 0: the smallest
    ([5.0, 1.0, 4.0, 2.0, 3.0], 0.7, 4.0),  # rank ceil(3.5) = 4
    ([5.0, 1.0, 4.0, 2.0, 3.0], 1.5, 5.0),  # past the end: the largest
    ([7.0], 0.5, 7.0),
    ([], 0.5, None),
])
def test_percentile_is_the_nearest_rank(values: list[float], q: float, expected: float | None) -> None:
    assert ctnetlink.percentile(values, q) == expected


# --- delete_current: what the re-read shows ------------------------------------------------------


def test_a_changed_record_is_judged_with_the_timeout_the_kernel_shows_now(
    serial: tuple[Conntrack, ScriptKernel, CountingWire],
) -> None:
    """A record whose mark changed is asked ``still`` with the re-read's status, id, mark and
    timeout (a caller's "still idle" reads the timeout)."""
    if ctcodec._ctscan is None:
        pytest.skip("the compiled module is not built")
    ct, kernel, _wire = serial
    kernel.get_mark = {2: 7, 3: 9}
    kernel.get_timeout = {1: 30, 2: 42, 3: 300}
    kernel.kept = {2}
    seen: list[tuple[int, int, int, int, int]] = []

    def idle(dumped: Entry, now: Any) -> bool:
        seen.append((dumped.id, now.status, now.id, now.mark, now.timeout))
        return bool(now.timeout > 100)

    result = ct.delete_current(as_records(entries(3)), idle)
    assert seen == [(2, IPS_CONFIRMED, 2, 7, 42), (3, IPS_CONFIRMED, 3, 9, 300)]
    assert [[r.ct_id for r in send] for send in kernel.sends] == [[1, 3]]
    assert (result.deleted, result.kept_changed, result.kept_replied) == (2, 1, 0)


def as_records(es: list[Entry]) -> StaleEntries:
    return StaleEntries([], b"".join(pack_record(e) for e in es), lambda i: es[i])


def test_a_reread_answered_by_a_bare_ack_is_not_a_reason_to_delete(
    serial: tuple[Conntrack, ScriptKernel, CountingWire],
) -> None:
    """An answer with no entry in it (errno 0, nothing re-read) confirms nothing: kept, counted."""
    ct, kernel, _wire = serial
    kernel.get_acked = {2}
    kernel.kept = {2}
    result = ct.delete_current(entries(3))
    assert [[r.ct_id for r in send] for send in kernel.sends] == [[1, 3]]
    assert (result.deleted, result.errors) == (2, ((0, 1),))


def _fail_on_the_first_datagram_with_the_rest_after(ct: Conntrack, kernel: ScriptKernel, delay: float) -> None:
    """A dump of 4 entries whose judge fails on the first datagram; the rest of the dump and its
    DONE are sent ``delay`` seconds later. The dump raises the judge's error."""
    table = entries(4)
    kernel.attempts = [[table[:2]]]  # the first datagram now, the rest later

    def rest() -> None:
        seq = kernel.dumps[-1].seq
        kernel.sock.send(b"".join(entry_msg(e, seq) for e in table[2:]))
        kernel.sock.send(done_msg(seq))

    def fail() -> None:
        raise RuntimeError("judging failed")

    ct.before_burst = fail
    timer = threading.Timer(delay, rest)
    timer.start()
    try:
        with pytest.raises(RuntimeError, match="judging failed"):
            ct.dump(unreplied_only=False)
    finally:
        timer.join()


def test_the_drain_waits_for_the_rest_of_the_abandoned_dump(
    serial: tuple[Conntrack, ScriptKernel, CountingWire], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rest of the dump comes 30 ms after the failure: the drain waits for it (up to
    ``DRAIN_WAIT``) and reads it to the DONE, so nothing of it is left queued."""
    monkeypatch.setattr(ctnetlink, "DRAIN_WAIT", 5.0)
    ct, kernel, _wire = serial
    _fail_on_the_first_datagram_with_the_rest_after(ct, kernel, 0.03)
    assert kernel._unread() is False
    assert ct.timeout == 0.5


def test_a_scan_counts_what_did_not_decode_apart(kern: tuple[Conntrack, ScriptKernel, CountingWire]) -> None:
    ct, kernel, _wire = kern
    kernel.attempts = [[[v4(1), Raw(short), v4(2)], [v4(3, status=REPLIED), Done()]]]
    got = ct.scan(Consumer)
    assert got.seen == [1, 2]
    stats = ct.last_dump
    assert stats is not None
    assert (stats.entries, stats.messages, stats.decode_errors, stats.filtered_in_userspace) == (2, 4, 1, 1)


def test_a_burst_that_must_wait_for_room_is_handed_over_not_dropped(
    bursts: Bursts, piped: tuple[Conntrack, ScriptKernel, CountingWire]
) -> None:
    """One datagram a burst, ten bursts, and a judge that holds the first for 0.15 s: the reader
    fills the queue (4) and waits for room, more than one 0.1 s poll; every entry still arrives."""
    ct, kernel, _wire = piped
    bursts.one_each = True
    table = entries(10)
    kernel.attempts = [[[e] for e in table] + [[Done()]]]
    calls: list[int] = []

    def slow_first() -> None:
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.15)

    ct.before_burst = slow_first
    assert ids(ct.dump(unreplied_only=False)) == list(range(1, 11))
    assert ct.last_dump is not None and ct.last_dump.recvs == 11 and len(calls) == 11


def test_a_pipelined_dump_that_fails_while_the_reader_waits_stops_it(
    bursts: Bursts, piped: tuple[Conntrack, ScriptKernel, CountingWire], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The judge fails on the first datagram while the rest is still to come: the reader, waiting
    in its poll, is stopped (the judge's failure is what the caller sees) and the drain reads the
    rest when it comes."""
    monkeypatch.setattr(ctnetlink, "DRAIN_WAIT", 5.0)
    ct, kernel, _wire = piped
    _fail_on_the_first_datagram_with_the_rest_after(ct, kernel, 0.3)
    assert kernel._unread() is False


def test_waiting_and_judging_are_timed_apart(serial: tuple[Conntrack, ScriptKernel, CountingWire]) -> None:
    """The judge sleeps 0.1 s on the first burst; the rest of the dump comes 1 s after that burst
    reached the judge (at least 0.5 s waited, whatever the machine's load), its DONE apart."""
    ct, kernel, _wire = serial
    ct.timeout = 10.0
    table = entries(4)
    kernel.attempts = [[table[:2]]]

    def rest() -> None:
        seq = kernel.dumps[-1].seq
        kernel.sock.send(b"".join(entry_msg(e, seq) for e in table[2:]))
        kernel.sock.send(done_msg(seq))  # the last wait, short: the sum is what counts

    timer = threading.Timer(1.0, rest)

    def slow_first() -> None:
        if not timer.is_alive() and not timer.finished.is_set():
            timer.start()
            time.sleep(0.1)

    ct.before_burst = slow_first
    try:
        assert ids(ct.dump(unreplied_only=False)) == [1, 2, 3, 4]
    finally:
        if timer.is_alive():
            timer.join()
    stats = ct.last_dump
    assert stats is not None
    assert stats.wait_seconds >= 0.5 and stats.judge_seconds >= 0.1
    assert stats.seconds >= stats.wait_seconds + stats.judge_seconds


def test_raw_datagrams_that_come_later_are_waited_for(serial: tuple[Conntrack, ScriptKernel, CountingWire]) -> None:
    ct, kernel, _wire = serial
    ct.timeout = 10.0
    kernel.attempts = [[]]

    def later() -> None:
        seq = kernel.dumps[-1].seq
        kernel.sock.send(entry_msg(v4(1), seq))
        kernel.sock.send(done_msg(seq))

    timer = threading.Timer(0.05, later)
    timer.start()
    try:
        got = ct.dump_datagrams()
    finally:
        timer.join()
    assert len(got) == 2


def test_a_receive_error_without_an_errno_is_errno_0(serial: tuple[Conntrack, ScriptKernel, CountingWire]) -> None:
    ct, kernel, wire = serial

    def broken(buf: Any, nbytes: int, flags: int = 0) -> int:
        raise OSError("no errno")

    kernel.table = entries(1)
    wire.recv_into = broken  # type: ignore[method-assign]
    with pytest.raises(NetlinkError, match=r"^ctnetlink dump failed: None$") as info:
        ct.dump(unreplied_only=False)
    assert info.value.errno == 0


def test_a_dump_puts_the_cyclic_collector_back_as_it_found_it(
    kern: tuple[Conntrack, ScriptKernel, CountingWire],
) -> None:
    """Paused while a dump decodes; on again after it (also after a failed one), and left off when
    the caller had it off."""
    ct, kernel, _wire = kern
    kernel.table = entries(3)
    assert gc.isenabled()
    assert len(ct.dump(unreplied_only=False)) == 3
    assert gc.isenabled()
    kernel.attempts = [[[Err(errno.ENOMEM)]]]
    with pytest.raises(NetlinkError):
        ct.dump(unreplied_only=False)
    assert gc.isenabled()
    gc.disable()
    try:
        assert len(ct.dump(unreplied_only=False)) == 3
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_stats_that_come_later_are_waited_for(serial: tuple[Conntrack, ScriptKernel, CountingWire]) -> None:
    ct, kernel, _wire = serial
    ct.timeout = 10.0
    seq = ct._seq
    kernel.stats_datagrams = []

    def later() -> None:
        kernel.sock.send(stats_msg(seq, 0, {10: 5}))
        kernel.sock.send(done_msg(seq))

    timer = threading.Timer(0.05, later)
    timer.start()
    try:
        assert ct.stats()["drop"] == 5
    finally:
        timer.join()


def test_a_delete_whose_receive_fails_without_an_errno_is_errno_0(
    serial: tuple[Conntrack, ScriptKernel, CountingWire], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch's answers and the re-reads' answers (read in Python without the compiled module)."""
    ct, _kernel, wire = serial

    def broken(buf: Any, nbytes: int, flags: int = 0) -> int:
        raise OSError("no errno")

    wire.recv_into = broken  # type: ignore[method-assign]
    with pytest.raises(NetlinkError, match=r"^ctnetlink receive failed: None$") as info:
        ct.delete(entries(2))
    assert info.value.errno == 0
    monkeypatch.setattr(ctcodec, "_ctscan", None)
    with pytest.raises(NetlinkError, match=r"^ctnetlink receive failed: None$") as info:
        ct.delete_current(entries(2))
    assert info.value.errno == 0
