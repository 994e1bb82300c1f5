"""Delete accounting of ``ctnetlink.Conntrack.delete`` against a scripted kernel over a socketpair.

``Conntrack`` gets one end of an ``AF_UNIX``/``SOCK_DGRAM`` socketpair (behind a
thin wrapper for the netlink-only calls: bind, setsockopt, sendto's address);
the other end is a fake kernel that answers each DELETE as ctnetlink does,
inside ``sendto`` (the kernel handles a whole sendmsg before it returns): an
error answer (NLMSG_ERROR with -errno, the request's header echoed) for every
failed request, an ACK only for a request that asked for one. Which request
fails is scripted by the entry's id, so the answers do not depend on how
``delete`` batches. Overruns are scripted as answers the kernel drops and an
ENOBUFS from the next recv, as netlink reports them.

Every expected count below is worked out by hand from the script.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Any

import pytest

from topowatch.core.conntrack import IPS_CONFIRMED, IPS_SEEN_REPLY, CtTuple, Entry, Reread
from topowatch.core.decide import StaleEntries, pack_record
from topowatch.edges import ctcodec, ctnetlink
from topowatch.edges.ctnetlink import Conntrack, DeleteResult
from topowatch.errors import NetlinkError, PermissionDenied

HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid


@dataclass
class Request:
    seq: int
    flags: int
    ct_id: int


@dataclass
class FakeKernel:
    """The ctnetlink end: answers DELETE requests from a script keyed by entry id."""

    sock: socket.socket
    errors: dict[int, int] = field(default_factory=dict)  # entry id -> errno
    dropped: set[int] = field(default_factory=set)  # entry ids whose answer the kernel drops
    stray: list[tuple[int, int]] = field(default_factory=list)  # (seq, errno) answers of no request
    sends: list[list[Request]] = field(default_factory=list)  # per sendmsg, the requests in it
    overrun: bool = False  # the next recv reports ENOBUFS
    recv_error: int = 0  # the next recv fails with this errno
    get_errors: dict[int, int] = field(default_factory=dict)  # entry id -> errno of its re-read (GET)
    get_status: dict[int, int] = field(default_factory=dict)  # entry id -> status its re-read shows
    get_mark: dict[int, int] = field(default_factory=dict)  # entry id -> mark its re-read shows
    get_id: dict[int, int] = field(default_factory=dict)  # entry id -> the id now (recreated since the dump)
    get_lost: dict[int, int] = field(default_factory=dict)  # entry id -> re-reads whose answer is dropped
    gets: list[list[int]] = field(default_factory=list)  # per sendmsg of GETs, the entry ids asked for
    one_datagram: bool = False  # all answers to a sendmsg in one datagram
    kept: set[int] = field(default_factory=set)  # entry ids a test says must never be asked to go

    def handle(self, data: bytes) -> None:
        requests: list[Request] = []
        pos = 0
        while pos + 16 <= len(data):
            mlen, mtype, flags, seq, _pid = HDR.unpack_from(data, pos)
            if mtype == ctcodec.IPCTNL_MSG_CT_GET:
                if pos == 0:
                    self.gets.append([])
                self._reread(data, pos, mlen, seq)
                pos += (mlen + 3) & ~3
                continue
            assert mtype == ctcodec.IPCTNL_MSG_CT_DELETE
            requests.append(Request(seq, flags, self._id(data, pos + 20, pos + mlen)))
            assert requests[-1].ct_id not in self.kept, f"entry {requests[-1].ct_id} deleted though re-checked as kept"
            pos += (mlen + 3) & ~3
        assert pos == len(data)
        if not requests:
            return
        self.sends.append(requests)
        answers = [self._answer(seq, err) for seq, err in self.stray]
        self.stray.clear()
        for r in requests:
            err = self.errors.get(r.ct_id, 0)
            if err == 0 and not r.flags & ctcodec.NLM_F_ACK:
                continue  # a success that asked for no ACK is silent
            if r.ct_id in self.dropped:
                self.overrun = True
                continue
            answers.append(self._answer(r.seq, err))
        if self.one_datagram and answers:
            self.sock.send(b"".join(answers))
            return
        for answer in answers:  # one datagram per answer, as the kernel queues them
            self.sock.send(answer)

    def _reread(self, data: bytes, pos: int, mlen: int, seq: int) -> None:
        """A GET by orig tuple: the entry as it is now (status and id; ``entries`` gives id = sport - 1000)."""
        alen = struct.unpack_from("=H", data, pos + 20)[0]
        orig, _proto, _zone = ctcodec._decode_tuple(data, pos + 24, pos + 20 + alen, ctcodec.AddressCache())
        ct_id = orig.sport - 1000
        self.gets[-1].append(ct_id)
        if self.get_lost.get(ct_id):
            self.get_lost[ct_id] -= 1
            return
        if self.get_errors.get(ct_id):
            self.sock.send(self._answer(seq, self.get_errors[ct_id]))
            return
        attrs = [(3, ctcodec.nla(ctcodec.CTA_STATUS, ctcodec.be32(self.get_status.get(ct_id, IPS_CONFIRMED)))),
                 (8, ctcodec.nla(ctcodec.CTA_MARK, ctcodec.be32(self.get_mark.get(ct_id, 0)))),
                 (12, ctcodec.nla(ctcodec.CTA_ID, ctcodec.be32(self.get_id.get(ct_id, ct_id))))]
        self.sock.send(ctcodec.encode_message(ctcodec.IPCTNL_MSG_CT_NEW, 0, seq, 2, attrs))

    @staticmethod
    def _id(data: bytes, pos: int, end: int) -> int:
        """The entry's CTA_ID; without one (a dumped id of 0), the script's key from the orig tuple."""
        start = pos
        while pos + 4 <= end:
            alen, atype = struct.unpack_from("=HH", data, pos)
            if atype & ctcodec.NLA_TYPE_MASK == ctcodec.CTA_ID:
                return int.from_bytes(data[pos + 4 : pos + 8], "big")
            pos += (alen + 3) & ~3
        alen = struct.unpack_from("=H", data, start)[0]
        orig, _proto, _zone = ctcodec._decode_tuple(data, start + 4, start + alen, ctcodec.AddressCache())
        return orig.sport - 1000

    @staticmethod
    def _answer(seq: int, err: int) -> bytes:
        echoed = HDR.pack(16, ctcodec.IPCTNL_MSG_CT_DELETE, 0, seq, 0)  # NETLINK_CAP_ACK: header only
        return HDR.pack(36, ctcodec.NLMSG_ERROR, 0, seq, 0) + struct.pack("=i", -err) + echoed


class Wire:
    """The ``Conntrack`` end: a real socket; netlink's addresses and options are accepted and dropped."""

    def __init__(self, sock: socket.socket, kernel: FakeKernel) -> None:
        self.sock = sock
        self.kernel = kernel
        self.idle_recvs = 0  # recvs in a row that found nothing

    def bind(self, address: Any) -> None:
        raise OSError(errno.EINVAL, "already bound")  # what Conntrack accepts from a bound socket

    def setsockopt(self, *args: Any) -> None:
        pass

    def getsockopt(self, level: int, option: int) -> int:
        return self.sock.getsockopt(level, option)

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)

    def fileno(self) -> int:
        return self.sock.fileno()

    def sendto(self, data: bytes, address: Any) -> int:
        n = self.sock.send(data)
        self.kernel.handle(self.kernel.sock.recv(1 << 20))
        return n

    def recv_into(self, buf: Any, nbytes: int, flags: int = 0) -> int:
        if self.kernel.overrun:
            self.kernel.overrun = False
            raise OSError(errno.ENOBUFS, "No buffer space available")
        if self.kernel.recv_error:
            err, self.kernel.recv_error = self.kernel.recv_error, 0
            raise OSError(err, os.strerror(err))
        try:
            n = self.sock.recv_into(buf, nbytes, flags)
        except BlockingIOError:
            # Waiting is poll's job: a caller that keeps asking without it spins (fail, do not hang).
            self.idle_recvs += 1
            assert self.idle_recvs < 50, "recv asked again and again without waiting"
            raise
        self.idle_recvs = 0
        return n

    def close(self) -> None:
        self.sock.close()
        self.kernel.sock.close()


@pytest.fixture
def wired(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Conntrack, FakeKernel]]:
    # The status-filter probe is a dump (tests/netns/test_ctnetlink.py runs it on a kernel).
    monkeypatch.setattr(ctnetlink, "probe_status_filter", lambda ct: True)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    kernel = FakeKernel(theirs)
    ct = Conntrack(Wire(ours, kernel))  # type: ignore[arg-type]
    ct.timeout = 0.5  # a wait for an answer that never comes fails the test quickly
    yield ct, kernel
    ct.close()


def entries(n: int) -> list[Entry]:
    """n entries, ids 1..n (the script's keys)."""
    a, b = ip_address("10.0.1.2"), ip_address("192.0.2.10")
    return [Entry(2, 17, CtTuple(a, b, 1000 + i, 53), CtTuple(b, a, 53, 1000 + i), status=IPS_CONFIRMED, id=i)
            for i in range(1, n + 1)]  # fmt: skip


def acks(kernel: FakeKernel) -> list[list[bool]]:
    return [[bool(r.flags & ctcodec.NLM_F_ACK) for r in send] for send in kernel.sends]


def test_a_clean_batch_is_one_sendmsg_with_one_ack(wired: tuple[Conntrack, FakeKernel]) -> None:
    ct, kernel = wired
    result = ct.delete(entries(5))
    assert result == DeleteResult(requested=5, deleted=5, not_found=0, errors=(), unconfirmed=0, batches=1)
    assert acks(kernel) == [[False, False, False, False, True]]
    # Every flag exactly: a request, and the ACK asked for on the last only.
    assert [r.flags for r in kernel.sends[0]] == [ctcodec.NLM_F_REQUEST] * 4 + [ctcodec.NLM_F_REQUEST | ctcodec.NLM_F_ACK]
    assert [r.ct_id for r in kernel.sends[0]] == [1, 2, 3, 4, 5]
    assert ct.requests == 1
    assert result.describe() == "deleted 5/5, already gone 0"


def test_enoent_is_already_gone_not_an_error(wired: tuple[Conntrack, FakeKernel]) -> None:
    ct, kernel = wired
    kernel.errors = {2: errno.ENOENT, 4: errno.ENOENT}
    result = ct.delete(entries(5))
    assert (result.deleted, result.not_found, result.errors, result.failed) == (3, 2, (), 0)


def test_ebusy_is_an_error(wired: tuple[Conntrack, FakeKernel]) -> None:
    ct, kernel = wired
    kernel.errors = {3: errno.EBUSY}
    result = ct.delete(entries(5))
    assert (result.deleted, result.not_found, result.errors, result.failed) == (4, 0, ((errno.EBUSY, 1),), 1)
    assert result.describe() == "deleted 4/5, already gone 0, EBUSY 1"


@pytest.mark.parametrize(
    ("script", "deleted", "not_found", "errors"),
    [
        ({1: errno.ENOENT}, 4, 1, ()),  # the first request
        ({5: errno.ENOENT}, 4, 1, ()),  # the last request: its error is its only answer (no ACK follows)
        ({5: errno.EBUSY}, 4, 0, ((errno.EBUSY, 1),)),
        ({1: errno.EBUSY, 5: errno.ENOENT}, 3, 1, ((errno.EBUSY, 1),)),
        ({1: errno.ENOENT, 2: errno.ENOENT, 3: errno.ENOENT, 4: errno.ENOENT, 5: errno.ENOENT}, 0, 5, ()),
        ({2: errno.EBUSY, 3: errno.EINVAL, 4: errno.EBUSY}, 2, 0, ((errno.EBUSY, 2), (errno.EINVAL, 1))),  # sorted by errno: EBUSY 16, EINVAL 22
    ],
    ids=["first ENOENT", "last ENOENT", "last EBUSY", "first EBUSY last ENOENT", "all gone", "mixed"],
)
def test_answers_to_the_first_and_the_last_request(
    wired: tuple[Conntrack, FakeKernel], script: dict[int, int], deleted: int, not_found: int,
    errors: tuple[tuple[int, int], ...],
) -> None:
    ct, kernel = wired
    kernel.errors = script
    result = ct.delete(entries(5))
    assert (result.requested, result.deleted, result.not_found, result.errors) == (5, deleted, not_found, errors)
    assert result.unconfirmed == 0 and result.batches == 1


def test_partial_batches_by_count(wired: tuple[Conntrack, FakeKernel]) -> None:
    """40 entries at 16 per batch: 16 + 16 + 8, each batch's last asks for the ACK."""
    ct, kernel = wired
    ct.batch_max = 16
    # the last of batch 1, the first of batch 2, the last of batch 3
    kernel.errors = {16: errno.EBUSY, 17: errno.ENOENT, 40: errno.ENOENT}
    result = ct.delete(entries(40))
    assert [len(s) for s in kernel.sends] == [16, 16, 8]
    assert acks(kernel) == [[False] * 15 + [True], [False] * 15 + [True], [False] * 7 + [True]]
    assert result == DeleteResult(requested=40, deleted=37, not_found=2, errors=((errno.EBUSY, 1),),
                                  unconfirmed=0, batches=3)  # fmt: skip
    assert ct.requests == 3


def test_partial_batches_by_bytes(wired: tuple[Conntrack, FakeKernel]) -> None:
    """A send buffer for three requests splits 7 entries into 3 + 3 + 1 sends."""
    ct, kernel = wired
    size = len(ctcodec.encode_delete(entries(1)[0], 1, ack=False))
    ct.batch_bytes = 3 * size
    kernel.errors = {3: errno.ENOENT, 7: errno.EBUSY}
    result = ct.delete(entries(7))
    assert [len(s) for s in kernel.sends] == [3, 3, 1]
    assert acks(kernel) == [[False, False, True], [False, False, True], [True]]
    assert result == DeleteResult(requested=7, deleted=5, not_found=1, errors=((errno.EBUSY, 1),),
                                  unconfirmed=0, batches=3)  # fmt: skip


def test_sequence_numbers_run_on_and_answers_of_no_request_are_ignored(
    wired: tuple[Conntrack, FakeKernel],
) -> None:
    ct, kernel = wired
    ct.delete(entries(3))
    first = [r.seq for r in kernel.sends[0]]
    assert first == [first[0], first[0] + 1, first[0] + 2]
    # An error answer to an earlier request (seq before this batch's) and one after it: not this batch's.
    kernel.stray = [(first[0], errno.EBUSY), (first[0] + 10, errno.ENOENT)]
    result = ct.delete(entries(3))
    assert [r.seq for r in kernel.sends[1]] == [first[0] + 3, first[0] + 4, first[0] + 5]
    assert (result.deleted, result.not_found, result.errors) == (3, 0, ())
    # The same with every answer in one datagram: a stray one does not hide those after it.
    kernel.one_datagram = True
    kernel.stray = [(first[0], errno.EBUSY)]
    kernel.errors = {2: errno.ENOENT}
    result = ct.delete(entries(3))
    assert (result.deleted, result.not_found, result.errors) == (2, 1, ())


def test_sequence_numbers_wrap_to_a_contiguous_range(wired: tuple[Conntrack, FakeKernel]) -> None:
    ct, kernel = wired
    ct._seq = 0xFFFFFFFE  # two numbers left before the wrap: a batch of 5 restarts at 1
    ct.delete(entries(5))
    assert [r.seq for r in kernel.sends[0]] == [1, 2, 3, 4, 5]
    ct.delete(entries(1))
    assert [r.seq for r in kernel.sends[1]] == [6]


def test_counts_add_up_over_batches_with_errors_and_overruns(wired: tuple[Conntrack, FakeKernel]) -> None:
    """Three batches of 16, 16 and 8: EBUSY in the first and the last; the first two overrun."""
    ct, kernel = wired
    ct.batch_max = 16
    kernel.errors = {3: errno.EBUSY, 40: errno.EBUSY, 20: errno.ENOENT}
    kernel.dropped = {5, 20}  # silent successes never drop; these are answers that would come
    kernel.errors[5] = errno.ENOENT
    result = ct.delete(entries(40))
    # batch 1: EBUSY(3) received, ENOENT(5) dropped, the ACK of 16: 1 deleted, 16 - 1 - 1 = 14 unconfirmed
    # batch 2: ENOENT(20) dropped, the ACK of 32: 1 deleted, 15 unconfirmed
    # batch 3 (no overrun, batch_max stays at its floor of 16): EBUSY(40) received: 7 deleted
    assert result == DeleteResult(requested=40, deleted=9, not_found=0, errors=((errno.EBUSY, 2),),
                                  unconfirmed=29, batches=3)  # fmt: skip
    assert ct.batch_max == 16  # halved from 16: the floor


def test_an_overrun_counts_the_unanswered_as_unconfirmed_and_halves_batches(
    wired: tuple[Conntrack, FakeKernel],
) -> None:
    """The kernel dropped the ENOENT of entry 2; the EBUSY of 3 and the last's ACK came.

    Successes are silent, so of 1, 2 and 4 nothing is known: 1 deleted (the last), 3 unconfirmed.
    """
    ct, kernel = wired
    ct.batch_max = 64
    kernel.errors = {2: errno.ENOENT, 3: errno.EBUSY}
    kernel.dropped = {2}
    result = ct.delete(entries(5))
    assert result == DeleteResult(requested=5, deleted=1, not_found=0, errors=((errno.EBUSY, 1),),
                                  unconfirmed=3, batches=1)  # fmt: skip
    assert ct.batch_max == 32


def test_an_overrun_that_dropped_the_last_answer_confirms_nothing(wired: tuple[Conntrack, FakeKernel]) -> None:
    ct, kernel = wired
    kernel.dropped = {5}
    kernel.errors = {1: errno.ENOENT}
    result = ct.delete(entries(5))
    assert result == DeleteResult(requested=5, deleted=0, not_found=1, errors=(), unconfirmed=4, batches=1)


def test_permission_denied_for_every_request_raises(wired: tuple[Conntrack, FakeKernel]) -> None:
    ct, kernel = wired
    kernel.errors = dict.fromkeys(range(1, 4), errno.EPERM)
    with pytest.raises(PermissionDenied, match=r"^ctnetlink delete: Operation not permitted \(needs CAP_NET_ADMIN\)$"):
        ct.delete(entries(3))


def test_permission_denied_for_some_is_counted(wired: tuple[Conntrack, FakeKernel]) -> None:
    ct, kernel = wired
    kernel.errors = {1: errno.EPERM}
    result = ct.delete(entries(3))
    assert (result.deleted, result.errors) == (2, ((errno.EPERM, 1),))


def test_no_answer_to_the_last_request_is_a_timeout(wired: tuple[Conntrack, FakeKernel]) -> None:
    """A kernel that never answers the ACK asked for: an error after the timeout, not a guess."""
    ct, kernel = wired
    handle: Callable[[bytes], None] = kernel.handle

    def silent(data: bytes) -> None:
        kernel.sends.append([])
        del data

    kernel.handle = silent  # type: ignore[method-assign]
    with pytest.raises(NetlinkError, match="no answer from ctnetlink"):
        ct.delete(entries(2))
    kernel.handle = handle  # type: ignore[method-assign]


def test_an_overrun_whose_last_answer_is_an_error_confirms_nothing(wired: tuple[Conntrack, FakeKernel]) -> None:
    """Entry 2's ENOENT was dropped; the last failed with EBUSY: no success is known at all."""
    ct, kernel = wired
    kernel.errors = {2: errno.ENOENT, 5: errno.EBUSY}
    kernel.dropped = {2}
    result = ct.delete(entries(5))
    assert result == DeleteResult(requested=5, deleted=0, not_found=0, errors=((errno.EBUSY, 1),),
                                  unconfirmed=4, batches=1)  # fmt: skip


async def test_the_daemons_counts_are_the_kernels_answers(
    wired: tuple[Conntrack, FakeKernel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``KernelBackend.delete`` (what the reactor calls) over the scripted kernel: ENOENT is already gone."""
    from topowatch.edges import kernel as kernel_mod

    monkeypatch.setattr(kernel_mod, "probe_xfrm", lambda: None)  # no NETLINK_XFRM socket for this test
    ct, kernel = wired
    backend = kernel_mod.KernelBackend()
    backend._ct = ct
    # Re-read first: 2 is gone by then; the deletes of the rest: 1 and 6 gone, 3 and 4 busy.
    kernel.get_errors = {2: errno.ENOENT}
    kernel.errors = {1: errno.ENOENT, 3: errno.EBUSY, 4: errno.EBUSY, 6: errno.ENOENT}
    counts = await backend.delete(entries(7), lambda dumped, now: True)
    assert (counts.deleted, counts.already_gone, counts.failed, counts.errors) == (2, 3, 2, ("2 x EBUSY",))
    assert [r.ct_id for r in kernel.sends[-1]] == [1, 3, 4, 5, 6, 7]  # 2 was not asked to go


def test_a_receive_error_is_a_netlink_error_naming_it(wired: tuple[Conntrack, FakeKernel]) -> None:
    ct, kernel = wired
    kernel.errors = {1: errno.ENOENT}  # an answer is waiting; the recv fails first
    kernel.recv_error = errno.EIO
    with pytest.raises(NetlinkError, match=r"^ctnetlink receive failed: Input/output error$") as info:
        ct.delete(entries(2))
    assert info.value.errno == errno.EIO


def test_describe_names_unknown_errnos_and_unconfirmed() -> None:
    result = DeleteResult(requested=9, deleted=1, not_found=2, errors=((errno.EBUSY, 1), (4095, 2)), unconfirmed=3)
    assert result.describe() == "deleted 1/9, already gone 2, EBUSY 1, 4095 2, unconfirmed 3"


# --- delete_current: the re-check before each batch's delete (what the daemon runs) -------------


# The forms ``delete_current`` takes its entries in: a list (re-checked in Python), a compiled scan's
# records (``StaleEntries``: re-checked in C, ``_ctscan.recheck``), and those records where the
# compiled module is missing (built into entries, re-read by Python's ``_answers``).
FORMS = ["entries", "records", "records without the compiled module"]


def as_records(es: list[Entry], head: int = 0) -> StaleEntries:
    """``es`` as a compiled scan keeps them: the first ``head`` built, the rest as records."""
    return StaleEntries(es[:head], b"".join(pack_record(e) for e in es[head:]), lambda i: es[head + i])


@pytest.fixture(params=FORMS)
def form(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Callable[[list[Entry]], Any]:
    if request.param == "entries":
        return list
    if request.param == "records without the compiled module":
        monkeypatch.setattr(ctcodec, "_ctscan", None)
    return as_records


def unreplied_and_unmarked(dumped: Entry, now: Reread) -> bool:
    """The caller's condition in these tests: no reply since the dump, and the mark the judgement read."""
    return not now.status & IPS_SEEN_REPLY and now.mark == dumped.mark


def test_the_recheck_deletes_only_what_is_still_the_entry_judged(wired: tuple[Conntrack, FakeKernel], form: Callable[[list[Entry]], Any]) -> None:
    """Eight entries re-read in one batch; each script line below is one outcome, worked out by hand."""
    ct, kernel = wired
    kernel.get_status = {2: IPS_CONFIRMED | IPS_SEEN_REPLY}  # replied since the dump: kept (replied)
    kernel.get_mark = {3: 7}  # the condition refuses it, no reply: kept (changed)
    kernel.get_id = {4: 99}  # deleted and recreated with the same tuple: not the entry judged
    kernel.get_errors = {5: errno.ENOENT, 6: errno.EBUSY}  # gone since the dump; a re-read that failed
    kernel.errors = {8: errno.ENOENT}  # gone between its re-read and its delete
    kernel.kept = {2, 3, 4, 5, 6}
    result = ct.delete_current(form(entries(8)), unreplied_and_unmarked)
    assert kernel.gets == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert [[r.ct_id for r in send] for send in kernel.sends] == [[1, 7, 8]]
    assert acks(kernel) == [[False, False, True]]
    assert len({r.seq for r in kernel.sends[0]}) == 3
    assert result == DeleteResult(requested=3, deleted=2, not_found=3, errors=((errno.EBUSY, 1),), unconfirmed=0,
                                  batches=1, kept_replied=1, kept_changed=1, unchecked=0,
                                  windows=result.windows)  # fmt: skip
    assert len(result.windows) == 1 and result.windows[0] >= 0
    assert result.describe() == (
        "deleted 2/3, already gone 3, EBUSY 1, kept (replied since the dump) 1, kept (changed since the dump) 1"
    )


def test_the_recheck_of_the_last_entry_decides_the_ack(wired: tuple[Conntrack, FakeKernel], form: Callable[[list[Entry]], Any]) -> None:
    """The last entry kept: the ACK goes on the last one still deleted, and its answer ends the batch."""
    ct, kernel = wired
    kernel.get_status = {4: IPS_CONFIRMED | IPS_SEEN_REPLY}
    kernel.kept = {4}
    kernel.errors = {3: errno.EBUSY}  # the ACK asked for is answered by this error
    result = ct.delete_current(form(entries(4)), unreplied_and_unmarked)
    assert [[r.ct_id for r in send] for send in kernel.sends] == [[1, 2, 3]]
    assert acks(kernel) == [[False, False, True]]
    assert (result.requested, result.deleted, result.errors, result.kept_replied) == (3, 2, ((errno.EBUSY, 1),), 1)


def test_the_recheck_without_a_condition_checks_the_id_alone(wired: tuple[Conntrack, FakeKernel], form: Callable[[list[Entry]], Any]) -> None:
    ct, kernel = wired
    kernel.get_status = {1: IPS_CONFIRMED | IPS_SEEN_REPLY}
    kernel.get_mark = {2: 7}
    kernel.get_id = {3: 99}
    kernel.kept = {3}
    result = ct.delete_current(form(entries(3)))
    assert [[r.ct_id for r in send] for send in kernel.sends] == [[1, 2]]
    assert (result.deleted, result.not_found, result.kept_replied, result.kept_changed) == (2, 1, 0, 0)


def test_a_dumped_id_of_zero_matches_whatever_id_the_entry_has_now(wired: tuple[Conntrack, FakeKernel], form: Callable[[list[Entry]], Any]) -> None:
    ct, kernel = wired
    unknown = [dataclasses.replace(e, id=0) for e in entries(2)]
    kernel.get_id = {1: 77, 2: 78}
    result = ct.delete_current(form(unknown), unreplied_and_unmarked)
    assert [[r.ct_id for r in send] for send in kernel.sends] == [[1, 2]]  # keyed by tuple: no CTA_ID was sent
    assert (result.deleted, result.not_found) == (2, 0)


def test_lost_recheck_answers_are_asked_again_in_smaller_batches_then_kept(
    wired: tuple[Conntrack, FakeKernel], form: Callable[[list[Entry]], Any],
) -> None:
    """Re-checks of 4 per batch; 2's answer is lost once, 5's in every one of the three rounds.

    Round 1: [1, 2, 3, 4] (delete 1, 3, 4) and [5, 6] (delete 6). Round 2, batches of 4 // 4 = 1:
    [2] (deleted) and [5] (lost again). Round 3: [5] lost again: never re-checked, never deleted.
    """
    ct, kernel = wired
    ct.recheck_batch = 4
    kernel.get_lost = {2: 1, 5: 3}
    kernel.kept = {5}
    result = ct.delete_current(form(entries(6)), unreplied_and_unmarked)
    assert kernel.gets == [[1, 2, 3, 4], [5, 6], [2], [5], [5]]
    assert [[r.ct_id for r in send] for send in kernel.sends] == [[1, 3, 4], [6], [2]]
    assert result == DeleteResult(requested=5, deleted=5, not_found=0, errors=(), unconfirmed=0, batches=3,
                                  unchecked=1, windows=result.windows)  # fmt: skip
    assert len(result.windows) == 3
    assert result.describe() == "deleted 5/5, already gone 0, not re-checked (kept) 1"


def test_recheck_batches_split_the_entries(wired: tuple[Conntrack, FakeKernel], form: Callable[[list[Entry]], Any]) -> None:
    ct, kernel = wired
    ct.recheck_batch = 16
    kernel.errors = {16: errno.ENOENT, 17: errno.EBUSY}  # the last of the first batch, the first of the second
    result = ct.delete_current(form(entries(40)), unreplied_and_unmarked)
    assert [len(g) for g in kernel.gets] == [16, 16, 8]
    assert [len(s) for s in kernel.sends] == [16, 16, 8]
    assert acks(kernel) == [[False] * 15 + [True], [False] * 15 + [True], [False] * 7 + [True]]
    assert (result.requested, result.deleted, result.not_found, result.errors, result.batches) == (
        40, 38, 1, ((errno.EBUSY, 1),), 3)


async def test_the_daemon_counts_unchecked_entries_as_failed(
    wired: tuple[Conntrack, FakeKernel], monkeypatch: pytest.MonkeyPatch
) -> None:
    from topowatch.edges import kernel as kernel_mod

    monkeypatch.setattr(kernel_mod, "probe_xfrm", lambda: None)
    ct, kernel = wired
    backend = kernel_mod.KernelBackend()
    backend._ct = ct
    kernel.get_lost = {3: 3}
    kernel.get_status = {2: IPS_CONFIRMED | IPS_SEEN_REPLY}
    kernel.kept = {2, 3}
    counts = await backend.delete(entries(4), unreplied_and_unmarked)
    assert (counts.deleted, counts.already_gone, counts.failed, counts.kept_replied, counts.kept_changed) == (
        2, 0, 1, 1, 0)
    assert counts.errors == ("1 not re-checked (answers lost), kept",)
    assert counts.window_p99 is not None and counts.window_p99 >= 0


def test_a_scans_built_head_is_rechecked_before_its_records(wired: tuple[Conntrack, FakeKernel]) -> None:
    """A compiled scan's entries: the two it built (the head) are re-read and deleted in their own
    batch, in Python; the six records after them in C; the counts add up over both."""
    ct, kernel = wired
    kernel.get_status = {2: IPS_CONFIRMED | IPS_SEEN_REPLY, 5: IPS_CONFIRMED | IPS_SEEN_REPLY}
    kernel.get_mark = {6: 7}
    kernel.get_errors = {7: errno.ENOENT}
    kernel.kept = {2, 5, 6, 7}
    result = ct.delete_current(as_records(entries(8), head=2), unreplied_and_unmarked)
    assert kernel.gets == [[1, 2], [3, 4, 5, 6, 7, 8]]
    assert [[r.ct_id for r in send] for send in kernel.sends] == [[1], [3, 4, 8]]
    assert acks(kernel) == [[True], [False, False, True]]
    assert result == DeleteResult(requested=4, deleted=4, not_found=1, errors=(), unconfirmed=0, batches=2,
                                  kept_replied=2, kept_changed=1, unchecked=0, windows=result.windows)  # fmt: skip
    assert len(result.windows) == 2


def test_records_whose_every_answer_is_as_dumped_are_all_deleted(wired: tuple[Conntrack, FakeKernel]) -> None:
    """The usual batch (every answer as dumped): every record is deleted, the last asks for the ACK."""
    ct, kernel = wired
    ct.recheck_batch = 16
    result = ct.delete_current(as_records(entries(20)), unreplied_and_unmarked)
    assert kernel.gets == [list(range(1, 17)), list(range(17, 21))]
    assert acks(kernel) == [[False] * 15 + [True], [False] * 3 + [True]]
    assert (result.requested, result.deleted, result.not_found, result.batches) == (20, 20, 0, 2)


def test_records_whose_answers_are_lost_are_asked_again_alone(wired: tuple[Conntrack, FakeKernel]) -> None:
    """The records' form of the rounds: 2 and 3 lost once (asked again in batches of 4 // 4 = 1), 4
    in every round (kept, unchecked)."""
    ct, kernel = wired
    ct.recheck_batch = 4
    kernel.get_lost = {2: 1, 3: 1, 4: 3}
    kernel.kept = {4}
    result = ct.delete_current(as_records(entries(5)), unreplied_and_unmarked)
    assert kernel.gets == [[1, 2, 3, 4], [5], [2], [3], [4], [4]]
    assert [[r.ct_id for r in send] for send in kernel.sends] == [[1], [5], [2], [3]]
    assert (result.deleted, result.unchecked, result.batches) == (4, 1, 4)


def test_the_python_rereads_skip_an_overrun_and_read_on(
    wired: tuple[Conntrack, FakeKernel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the compiled module, an ENOBUFS while reading the re-reads is the overrun netlink
    reports first: what is still queued is read after it."""
    monkeypatch.setattr(ctcodec, "_ctscan", None)
    ct, kernel = wired
    real = kernel._reread

    def reread_then_overrun(data: bytes, pos: int, mlen: int, seq: int) -> None:
        real(data, pos, mlen, seq)
        kernel.overrun = True

    monkeypatch.setattr(kernel, "_reread", reread_then_overrun)
    result = ct.delete_current(entries(3), unreplied_and_unmarked)
    assert [[r.ct_id for r in send] for send in kernel.sends] == [[1, 2, 3]]
    assert (result.deleted, result.unchecked) == (3, 0)


def test_the_python_rereads_name_a_receive_error(
    wired: tuple[Conntrack, FakeKernel], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ctcodec, "_ctscan", None)
    ct, kernel = wired
    kernel.recv_error = errno.EIO
    with pytest.raises(NetlinkError, match="ctnetlink receive failed: Input/output error") as raised:
        ct.delete_current(entries(2), unreplied_and_unmarked)
    assert raised.value.errno == errno.EIO
    assert kernel.sends == []  # nothing deleted on answers it could not read


# -- the status-filter probe ------------------------------------------------------------------------
#
# Kernel facts (ctnetlink_alloc_filter, >= 5.15): a dump request's CTA_STATUS with CTA_STATUS_MASK 0
# is refused with EINVAL; an older kernel ignores both attributes and dumps. A mark filter
# (CTA_MARK/CTA_MARK_MASK, older) keeps the probe's dump empty on either.

UNUSED_MARK = 0xFFFFFFFF


class ProbedKernel:
    """A ``Conntrack`` whose dumps answer with the scripted errnos, one per dump."""

    def __init__(self, *answers: int) -> None:
        self.answers = list(answers)
        self.asked: list[tuple[Any, ...]] = []

    def _dump_once(self, status: Any, zone: Any, mark: Any, family: int) -> tuple[Any, int, int]:
        self.asked.append((status, zone, mark, family))
        return dataclasses.make_dataclass("Parser", ["errno"])(self.answers.pop(0)), 0, 0


def test_a_kernel_that_refuses_a_zero_status_mask_honours_the_filter() -> None:
    kernel = ProbedKernel(errno.EINVAL, 0)
    assert ctnetlink.probe_status_filter(kernel) is True  # type: ignore[arg-type]
    assert kernel.asked == [((0, 0), None, UNUSED_MARK, 0), ((0, IPS_SEEN_REPLY), None, UNUSED_MARK, 0)]


def test_a_kernel_that_dumps_despite_a_zero_status_mask_ignores_the_filter() -> None:
    kernel = ProbedKernel(0)
    assert ctnetlink.probe_status_filter(kernel) is False  # type: ignore[arg-type]
    assert kernel.asked == [((0, 0), None, UNUSED_MARK, 0)]


@pytest.mark.parametrize(("answers", "raised", "text"), [
    ((errno.EINVAL, errno.EINVAL), NetlinkError, "probing the ctnetlink status filter: Invalid argument"),
    ((errno.EPERM,), PermissionDenied, "probing the ctnetlink status filter: Operation not permitted"),
    ((errno.ENOMEM,), NetlinkError, "probing the ctnetlink status filter: Cannot allocate memory"),
    ((errno.EINVAL, errno.EACCES), PermissionDenied, "probing the ctnetlink status filter: Permission denied"),
], ids=["EINVAL for another reason", "no CAP_NET_ADMIN", "another error", "refused on the second dump"])
def test_a_probe_that_cannot_tell_raises(answers: tuple[int, ...], raised: type[Exception], text: str) -> None:
    """Never guessed: a filter the kernel may not honour would make a filtered request mean another."""
    kernel = ProbedKernel(*answers)
    with pytest.raises(raised, match=text):
        ctnetlink.probe_status_filter(kernel)  # type: ignore[arg-type]
    assert kernel.answers == []


def test_a_conntrack_probes_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    probed: list[object] = []
    monkeypatch.setattr(ctnetlink, "probe_status_filter", lambda ct: probed.append(ct) or False)
    for told, expected, probes in ((None, False, 1), (True, True, 0), (False, False, 0)):
        probed.clear()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        ct = Conntrack(Wire(ours, FakeKernel(theirs)), status_filter=told)  # type: ignore[arg-type]
        assert (ct.status_filter_supported, len(probed)) == (expected, probes)
        ct.close()


def test_kept_and_failed_rereads_are_counted_one_by_one(
    wired: tuple[Conntrack, FakeKernel], form: Callable[[list[Entry]], Any]
) -> None:
    """Two of each outcome in one batch: each is counted, none overwrites the other."""
    ct, kernel = wired
    replied = IPS_CONFIRMED | IPS_SEEN_REPLY
    kernel.get_status = {1: replied, 2: replied}
    kernel.get_mark = {3: 7, 4: 9}
    kernel.get_errors = {5: errno.EBUSY, 6: errno.EBUSY, 7: errno.ENOMEM}
    kernel.kept = {1, 2, 3, 4, 5, 6, 7}
    result = ct.delete_current(form(entries(8)), unreplied_and_unmarked)
    assert [[r.ct_id for r in send] for send in kernel.sends] == [[8]]
    assert (result.kept_replied, result.kept_changed, result.errors, result.deleted) == (
        2, 2, ((errno.ENOMEM, 1), (errno.EBUSY, 2)), 1)


def test_counts_add_up_over_batches_that_delete_nothing(
    wired: tuple[Conntrack, FakeKernel], form: Callable[[list[Entry]], Any]
) -> None:
    """Batches of 4: the first keeps all its entries (nothing to delete: the next batch still goes),
    the second and third each keep one changed entry; the window of each batch that deleted is a
    duration (seconds from the re-read to the deletes handled), not a time of day."""
    ct, kernel = wired
    ct.recheck_batch = 4
    kernel.get_status = dict.fromkeys((1, 2, 3, 4), IPS_CONFIRMED | IPS_SEEN_REPLY)
    kernel.get_mark = {5: 7, 9: 7}
    kernel.kept = {1, 2, 3, 4, 5, 9}
    result = ct.delete_current(form(entries(12)), unreplied_and_unmarked)
    assert [[r.ct_id for r in send] for send in kernel.sends] == [[6, 7, 8], [10, 11, 12]]
    assert (result.kept_replied, result.kept_changed, result.deleted, result.batches) == (4, 2, 6, 2)
    assert len(result.windows) == 2 and all(0 <= w < 60 for w in result.windows), result.windows


def test_lost_answers_are_asked_again_in_batches_of_a_quarter(wired: tuple[Conntrack, FakeKernel]) -> None:
    """Batches of 16; the answers of 1-8 are lost once: round two asks for them 16 // 4 = 4 at a time."""
    ct, kernel = wired
    ct.recheck_batch = 16
    kernel.get_lost = dict.fromkeys(range(1, 9), 1)
    result = ct.delete_current(entries(10), unreplied_and_unmarked)
    assert kernel.gets == [list(range(1, 11)), [1, 2, 3, 4], [5, 6, 7, 8]]
    assert (result.deleted, result.unchecked) == (10, 0)


def test_entries_never_rechecked_add_up_over_the_head_and_the_records(wired: tuple[Conntrack, FakeKernel]) -> None:
    ct, kernel = wired
    kernel.get_lost = {1: 3, 4: 3}  # one of the head, one of the records: lost in every round
    kernel.kept = {1, 4}
    result = ct.delete_current(as_records(entries(5), head=2), unreplied_and_unmarked)
    assert (result.deleted, result.unchecked) == (3, 2)


def test_a_conntrack_binds_its_socket_and_names_a_bind_that_fails() -> None:
    class Bound(Wire):
        def __init__(self, sock: socket.socket, kernel: FakeKernel, error: int = 0) -> None:
            super().__init__(sock, kernel)
            self.bound: list[Any] = []
            self.blocking: list[bool] = []
            self.error = error

        def bind(self, address: Any) -> None:
            self.bound.append(address)
            if self.error:
                raise OSError(self.error, os.strerror(self.error))

        def setblocking(self, flag: bool) -> None:
            self.blocking.append(flag)
            super().setblocking(flag)

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    wire = Bound(ours, FakeKernel(theirs))
    ct = Conntrack(wire, status_filter=True)  # type: ignore[arg-type]
    assert (wire.bound, wire.blocking) == ([(0, 0)], [False])  # the kernel picks the port id
    ct.close()
    for error in (errno.EINVAL, errno.EADDRINUSE):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        wire = Bound(ours, FakeKernel(theirs), error)
        if error == errno.EINVAL:  # bound already by the caller: fine
            Conntrack(wire, status_filter=True).close()  # type: ignore[arg-type]
            continue
        with pytest.raises(NetlinkError, match=r"^cannot bind the ctnetlink socket: Address already in use$") as raised:
            Conntrack(wire, status_filter=True)  # type: ignore[arg-type]
        assert raised.value.errno == errno.EADDRINUSE
        wire.close()


def test_records_all_gone_since_the_dump_send_no_delete(wired: tuple[Conntrack, FakeKernel]) -> None:
    ct, kernel = wired
    kernel.get_errors = dict.fromkeys((1, 2, 3), errno.ENOENT)
    kernel.kept = {1, 2, 3}
    result = ct.delete_current(as_records(entries(3)), unreplied_and_unmarked)
    assert kernel.sends == []
    assert (result.requested, result.deleted, result.not_found) == (0, 0, 3)


def test_a_changed_entry_the_condition_still_admits_is_deleted(
    wired: tuple[Conntrack, FakeKernel], form: Callable[[list[Entry]], Any]
) -> None:
    """The condition here: no reply, and a mark below 0x10. Re-read, 1 has another status bit
    (ASSURED) and 2 mark 5: both still admitted, deleted (the mark read back is the kernel's);
    3 has mark 0x20: kept."""
    ct, kernel = wired
    kernel.get_status = {1: IPS_CONFIRMED | 0x4}  # IPS_ASSURED
    kernel.get_mark = {2: 5, 3: 0x20}
    kernel.kept = {3}
    seen: list[int] = []

    def low_mark(dumped: Entry, now: Reread) -> bool:
        seen.append(now.mark)
        return not now.status & IPS_SEEN_REPLY and now.mark < 0x10

    result = ct.delete_current(form(entries(3)), low_mark)
    assert [[r.ct_id for r in send] for send in kernel.sends] == [[1, 2]]
    assert (result.deleted, result.kept_changed) == (2, 1)
    assert 5 in seen and 0x20 in seen


class Ctscan:
    """The compiled module, but ``recv_burst`` answers first from a script of (datagram, n, errno)."""

    def __init__(self, real: Any, script: list[tuple[bytes, int, int]]) -> None:
        self.real, self.script = real, script

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def recv_burst(self, *args: Any) -> Any:
        if self.script:
            data, n, err = self.script.pop(0)
            return data, n, 0, err
        return self.real.recv_burst(*args)


def test_the_compiled_rereads_read_on_after_an_overrun(
    wired: tuple[Conntrack, FakeKernel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOBUFS with nothing received is the overrun reported first: the queued answers follow."""
    assert ctcodec._ctscan is not None
    monkeypatch.setattr(ctcodec, "_ctscan", Ctscan(ctcodec._ctscan, [(b"", 0, errno.ENOBUFS)]))
    ct, kernel = wired
    result = ct.delete_current(as_records(entries(3)), unreplied_and_unmarked)
    assert kernel.gets == [[1, 2, 3]]  # one round: no answer was taken for lost
    assert (result.deleted, result.unchecked) == (3, 0)


def test_the_compiled_rereads_name_a_receive_error(
    wired: tuple[Conntrack, FakeKernel], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ctcodec._ctscan is not None
    monkeypatch.setattr(ctcodec, "_ctscan", Ctscan(ctcodec._ctscan, [(b"", 0, errno.EIO)]))
    ct, kernel = wired
    with pytest.raises(NetlinkError, match=r"^ctnetlink receive failed: Input/output error$") as raised:
        ct.delete_current(as_records(entries(2)), unreplied_and_unmarked)
    assert raised.value.errno == errno.EIO
    assert kernel.sends == []


def test_records_rechecked_over_many_receives_keep_every_answer(
    wired: tuple[Conntrack, FakeKernel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's answers taken in several receives (here one datagram each, as when they fill the
    receive space): the errors and changes of every receive count, not those of the last alone."""
    assert ctcodec._ctscan is not None

    class OneAtATime(Ctscan):
        def recv_burst(self, fd: int, size: int, room: int, seq: int, timeout: int) -> Any:
            return self.real.recv_burst(fd, room, room, seq, timeout)

    monkeypatch.setattr(ctcodec, "_ctscan", OneAtATime(ctcodec._ctscan, []))
    ct, kernel = wired
    kernel.get_errors = {1: errno.EBUSY, 4: errno.EBUSY}
    kernel.get_status = {2: IPS_CONFIRMED | IPS_SEEN_REPLY}
    kernel.get_mark = {5: 7}
    kernel.kept = {1, 2, 4, 5}
    result = ct.delete_current(as_records(entries(6)), unreplied_and_unmarked)
    assert [[r.ct_id for r in send] for send in kernel.sends] == [[3, 6]]
    assert (result.errors, result.kept_replied, result.kept_changed, result.deleted) == (
        ((errno.EBUSY, 2),), 1, 1, 2)
