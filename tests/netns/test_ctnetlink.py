"""The conntrack edge against the real kernel, each test in its own namespace.

``conntrack -L`` in the same namespace is the oracle for what the table holds.
"""

from __future__ import annotations

import errno
import socket
import struct
import time
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Address, ip_address

import pytest

from topowatch.core.conntrack import IPS_ASSURED, IPS_SEEN_REPLY, CtTuple, Entry, Reread
from topowatch.core.decide import StaleEntries, pack_record
from topowatch.edges import ctcodec
from topowatch.edges.ctfake import parse_conntrack_listing
from topowatch.edges.ctnetlink import Conntrack, probe_status_filter
from topowatch.errors import DumpInterrupted, NetlinkError
from topowatch.netns import Namespace

pytestmark = [pytest.mark.netns]


@pytest.fixture
def ct(netns: Namespace) -> Iterator[Conntrack]:
    sock = netns.socket(socket.AF_NETLINK, socket.SOCK_RAW, ctcodec.NETLINK_NETFILTER)
    conntrack = Conntrack(sock)
    try:
        yield conntrack
    finally:
        conntrack.close()


def listing(ns: Namespace) -> list[Entry]:
    return parse_conntrack_listing(ns.run("conntrack", "-L", "-o", "extended,id"))


def key(e: Entry) -> tuple[object, ...]:
    return (e.family, e.proto, e.orig, e.reply, e.zone, e.mark, e.id, e.unreplied)


def udp4(i: int, *, replied: bool = False, zone: int = 0, mark: int = 0, nat: str = "203.0.113.1") -> Entry:
    src = IPv4Address(0x0A000000 + i // 50000 + 1)
    sport = 1024 + i % 50000
    dst = IPv4Address("198.51.100.7")
    return Entry(
        2, 17, CtTuple(src, dst, sport, 53), CtTuple(dst, ip_address(nat), 53, sport),
        status=IPS_SEEN_REPLY | IPS_ASSURED if replied else 0, zone=zone, mark=mark, timeout=600,
    )  # fmt: skip


def mixed() -> list[Entry]:
    a = ip_address
    entries = [udp4(i, replied=i % 3 == 0) for i in range(60)]
    entries += [
        udp4(1000, zone=7),
        udp4(1001, mark=0x2A),
        Entry(10, 17, CtTuple(a("2001:db8:1::1"), a("2001:db8:2::1"), 5000, 53),
              CtTuple(a("2001:db8:2::1"), a("2001:db8:9::1"), 53, 5000), status=0, timeout=600),
        Entry(10, 58, CtTuple(a("2001:db8:1::1"), a("2001:db8:2::1"), 77, 128 << 8),
              CtTuple(a("2001:db8:2::1"), a("2001:db8:1::1"), 77, 129 << 8), status=0, timeout=600),
        Entry(2, 1, CtTuple(a("10.9.0.1"), a("198.51.100.7"), 99, 8 << 8),
              CtTuple(a("198.51.100.7"), a("10.9.0.1"), 99, 0), status=0, timeout=600),
        Entry(2, 1, CtTuple(a("10.9.0.2"), a("198.51.100.7"), 99, 8 << 8),
              CtTuple(a("198.51.100.7"), a("10.9.0.2"), 99, 0), status=IPS_SEEN_REPLY, timeout=600),
    ]  # fmt: skip
    return entries


def test_status_filter_is_probed_and_used(ct: Conntrack) -> None:
    # Kernel 6.18 here: the filter exists (DESIGN: >= 5.15).
    assert ct.status_filter_supported is True
    assert probe_status_filter(ct) is True
    ct.create(mixed())
    entries = ct.dump()
    assert ct.last_dump is not None
    assert ct.last_dump.kernel_status_filter
    # The kernel did the filtering: nothing replied arrived to be dropped here.
    assert ct.last_dump.filtered_in_userspace == 0
    assert ct.last_dump.messages == len(entries) == 45


def test_unreplied_dump_matches_conntrack_tool(netns: Namespace, ct: Conntrack) -> None:
    assert ct.create(mixed()) == 66
    oracle = [e for e in listing(netns) if e.unreplied]
    got = ct.dump()
    assert ct.last_dump is not None and ct.last_dump.decode_errors == 0
    assert sorted(map(key, got), key=repr) == sorted(map(key, oracle), key=repr)
    everything = ct.dump(unreplied_only=False)
    assert len(everything) == len(listing(netns)) == 66


def test_unreplied_dump_of_real_traffic(netns: Namespace, ct: Conntrack) -> None:
    # A namespace tracks only once a rule needs conntrack.
    netns.run(
        "nft",
        "add table ip t; add chain ip t c { type filter hook output priority 0; }; add rule ip t c ct state new counter",
    )
    echo = netns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 7))
    client = netns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 40000))
    client.settimeout(5)
    echo.settimeout(5)
    client.sendto(b"x", ("127.0.0.1", 7))
    data, peer = echo.recvfrom(10)
    echo.sendto(data, peer)  # replied
    client.recvfrom(10)
    for port in (9, 10, 11):
        client.sendto(b"x", ("127.0.0.1", port))  # nobody listens: UNREPLIED
    echo.close()
    client.close()
    got = ct.dump()
    assert sorted(e.orig.dport for e in got if e.proto == 17) == [9, 10, 11]
    assert {e.orig.dport for e in ct.dump(unreplied_only=False) if e.proto == 17} == {7, 9, 10, 11}
    oracle = [e for e in listing(netns) if e.unreplied]
    assert sorted(map(key, got), key=repr) == sorted(map(key, oracle), key=repr)


def test_zone_and_mark_filters(ct: Conntrack) -> None:
    ct.create(mixed())
    assert [e.orig.sport for e in ct.dump(zone=7)] == [udp4(1000).orig.sport]
    assert [e.orig.sport for e in ct.dump(mark=0x2A)] == [udp4(1001).orig.sport]
    assert {e.family for e in ct.dump(family=10)} == {10}
    assert len(ct.dump(family=10)) == 2


def test_delete_a_subset_exactly(netns: Namespace, ct: Conntrack) -> None:
    ct.create(mixed())
    before = listing(netns)
    unreplied = ct.dump()
    victims = unreplied[::2]
    result = ct.delete(victims)
    assert (result.requested, result.deleted, result.not_found, result.errors) == (
        len(victims),
        len(victims),
        0,
        (),
    )
    after = listing(netns)
    gone = {key(e) for e in victims}
    assert sorted(map(key, after), key=repr) == sorted(
        (key(e) for e in before if key(e) not in gone), key=repr
    )
    assert sum(not e.unreplied for e in after) == sum(not e.unreplied for e in before) == 21


def test_deleting_twice_counts_enoent(ct: Conntrack) -> None:
    ct.create(udp4(i) for i in range(30))
    entries = ct.dump()
    assert ct.delete(entries).deleted == 30
    again = ct.delete(entries)
    assert (again.deleted, again.not_found, again.failed, again.unconfirmed) == (0, 30, 0, 0)


def test_a_delete_with_another_id_misses(ct: Conntrack) -> None:
    ct.create([udp4(1)])
    (entry,) = ct.dump()
    stranger = Entry(entry.family, entry.proto, entry.orig, entry.reply, entry.status, id=entry.id ^ 1)
    missed = ct.delete([stranger])
    assert (missed.deleted, missed.not_found) == (0, 1)
    assert [key(e) for e in ct.dump()] == [key(entry)]


def test_a_recreated_entry_is_not_hit_by_the_old_id(ct: Conntrack) -> None:
    # The kernel's id hashes the entry's address and its orig tuple (not the
    # reply): recreated at once, an entry often reuses the freed slab slot and
    # gets the same id back. Entries created in between take that slot.
    ct.create([udp4(1)])
    (old,) = ct.dump()
    for attempt in range(5):
        assert ct.delete(ct.dump(unreplied_only=False)).failed == 0
        ct.create(udp4(100 + 10 * attempt + i) for i in range(8))
        ct.create([udp4(1, nat="203.0.113.2")])
        (new,) = [e for e in ct.dump() if e.orig == old.orig]
        if new.id != old.id:
            break
    assert new.id != old.id
    missed = ct.delete([old])
    assert (missed.deleted, missed.not_found) == (0, 1)
    assert key(new) in {key(e) for e in ct.dump()}
    assert ct.delete([new]).deleted == 1
    assert not [e for e in ct.dump() if e.orig == old.orig]


def test_delete_stays_in_the_entrys_zone(ct: Conntrack) -> None:
    ct.create([udp4(5, zone=0), udp4(5, zone=7)])
    (zoned,) = ct.dump(zone=7)
    assert ct.delete([zoned]).deleted == 1
    left = ct.dump(unreplied_only=False)
    assert [(e.orig, e.zone) for e in left] == [(udp4(5).orig, 0)]


def test_icmp_and_v6_entries_delete_by_tuple(ct: Conntrack) -> None:
    ct.create(mixed())
    targets = [e for e in ct.dump() if e.family == 10 or e.proto == 1]
    assert {(e.family, e.proto) for e in targets} == {(10, 17), (10, 58), (2, 1)}
    assert ct.delete(targets).deleted == 3
    assert not [e for e in ct.dump(unreplied_only=False) if e.family == 10 or (e.proto == 1 and e.unreplied)]


def test_many_batches(ct: Conntrack) -> None:
    ct.batch_max = 64
    assert ct.create(udp4(i, replied=i % 10 == 0) for i in range(1000)) == 1000
    entries = ct.dump()
    assert len(entries) == 900
    result = ct.delete(entries)
    assert (result.deleted, result.batches) == (900, 15)
    assert len(ct.dump(unreplied_only=False)) == 100
    assert ct.requests >= 16 + 15


def test_create_reports_refusals(ct: Conntrack) -> None:
    ct.create([udp4(1), udp4(2)])
    with pytest.raises(NetlinkError) as info:
        ct.create([udp4(2), udp4(3)])
    assert info.value.errno == errno.EEXIST
    assert "created 1" in str(info.value)
    assert len(ct.dump()) == 3


def test_interrupted_dump_is_retried_then_refused(ct: Conntrack, monkeypatch: pytest.MonkeyPatch) -> None:
    ct.create([udp4(1)])
    real = ct._dump_once
    interruptions = {"left": 2}

    def flaky(*args: object) -> tuple[ctcodec.DumpParser, int, int]:
        parser, recvs, nbytes = real(*args)  # type: ignore[arg-type]
        if interruptions["left"]:
            interruptions["left"] -= 1
            parser.interrupted = True
        return parser, recvs, nbytes

    monkeypatch.setattr(ct, "_dump_once", flaky)
    assert len(ct.dump()) == 1
    assert ct.last_dump is not None and ct.last_dump.interrupted_retries == 2
    interruptions["left"] = ct.dump_retries + 1
    with pytest.raises(DumpInterrupted):
        ct.dump()


def test_replied_entries_seen_in_a_filtered_dump_clear_the_flag(
    ct: Conntrack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulate a kernel that ignores CTA_STATUS: send the request without it.
    ct.create(mixed())
    real = ct._dump_once

    def ignoring(
        status: object, zone: int | None, mark: int | None, family: int
    ) -> tuple[ctcodec.DumpParser, int, int]:
        return real(None, zone, mark, family)

    monkeypatch.setattr(ct, "_dump_once", ignoring)
    entries = ct.dump()
    assert ct.status_filter_supported is False
    assert len(entries) == 45 and all(e.unreplied for e in entries)
    assert ct.last_dump is not None and ct.last_dump.filtered_in_userspace == 21
    ct.dump()
    assert ct.last_dump.kernel_status_filter is False


class Collect:
    """A ``scan`` consumer that keeps everything, raw entries rebuilt by the codec's builder."""

    def __init__(self) -> None:
        self.raw: list[Entry] = []
        self.entries: list[Entry] = []

    def add(self, entry: Entry) -> None:
        self.entries.append(entry)

    def add_raw(self, raw: ctcodec.RawEntry) -> None:
        self.raw.append(ctcodec.entry_from_raw(raw))


@pytest.mark.parametrize("unreplied_only", [True, False])
def test_scan_streams_what_dump_returns(ct: Conntrack, unreplied_only: bool) -> None:
    ct.create(mixed())
    dumped = sorted(map(key, ct.dump(unreplied_only=unreplied_only)), key=repr)
    attempts = 0

    def start() -> Collect:
        nonlocal attempts
        attempts += 1
        return Collect()

    got = ct.scan(start, unreplied_only=unreplied_only)
    assert attempts == 1
    assert sorted(map(key, got.raw + got.entries), key=repr) == dumped
    assert got.raw, "no entry reached the consumer raw"
    assert ct.last_dump is not None and ct.last_dump.entries == len(dumped)


# --- the pipelined dump ------------------------------------------------------------------


def reader_threads() -> list[str]:
    import threading

    return [t.name for t in threading.enumerate() if t.name == "topowatch-ct-reader"]


def test_pipelined_and_serial_dumps_agree(ct: Conntrack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several bursts (a small burst size), every entry once, the same counters as one recv at a time."""
    from topowatch.edges import ctnetlink

    assert ct.pipelined, "the compiled module is built, so dumps are pipelined"
    monkeypatch.setattr(ctnetlink, "PIPELINE_CHUNK", 256 << 10)  # about 1,600 entries per burst
    ct.create([udp4(i, replied=i % 4 == 0) for i in range(12000)] + mixed()[-4:])
    runs = {}
    for pipelined in (True, False):
        ct.pipelined = pipelined
        entries = sorted(map(key, ct.dump(unreplied_only=False)), key=repr)
        assert ct.last_dump is not None
        stats = ct.last_dump
        got = ct.scan(Collect, unreplied_only=True)
        runs[pipelined] = (entries, stats.messages, stats.recvs, stats.bytes, stats.decode_errors,
                           sorted(map(key, got.raw + got.entries), key=repr))  # fmt: skip
    assert runs[True] == runs[False]
    assert len(runs[True][0]) == 12004 and runs[True][2] > 40  # many datagrams, in several bursts
    assert not reader_threads()


@pytest.mark.parametrize("pipelined", [True, False])
def test_a_dump_says_how_long_it_waited_for_the_kernel_and_how_long_it_judged(
    ct: Conntrack, pipelined: bool
) -> None:
    ct.pipelined = pipelined
    ct.create([udp4(i) for i in range(3000)])

    class Slow(Collect):
        def add_raw(self, raw: ctcodec.RawEntry) -> None:
            if len(self.raw) % 1000 == 0:
                time.sleep(0.02)  # judging that takes time: at least 60 ms of it
            super().add_raw(raw)

    ct.scan(Slow)
    stats = ct.last_dump
    assert stats is not None
    assert stats.judge_seconds >= 0.06 and stats.wait_seconds > 0
    assert stats.wait_seconds + stats.judge_seconds <= stats.seconds


@pytest.mark.parametrize("first", [64 << 10, 4 << 20])
def test_the_first_burst_is_small_so_judging_starts_while_the_kernel_walks(
    ct: Conntrack, monkeypatch: pytest.MonkeyPatch, first: int
) -> None:
    # The first entries of each flow class cost a prediction each: handed over after one
    # datagram, not after a whole burst, they are judged while the kernel fills the rest.
    from topowatch.edges import ctnetlink

    monkeypatch.setattr(ctnetlink, "PIPELINE_CHUNK", 4 << 20)  # more than the whole dump
    monkeypatch.setattr(ctnetlink, "PIPELINE_FIRST", first)
    ct.create([udp4(i) for i in range(5000)])
    seen: list[int] = []
    ct.after_burst = lambda consumer: seen.append(len(consumer.raw) + len(consumer.entries))
    try:
        ct.scan(Collect)
    finally:
        ct.after_burst = None
    assert seen[-1] == 5000
    if first == 4 << 20:
        assert seen == [5000]  # one burst held the whole dump
    else:
        assert len(seen) >= 2 and 0 < seen[0] < 1000, seen  # one datagram: a few hundred entries


@pytest.mark.parametrize(("pipelined", "chunk"), [(True, 128 << 10), (True, 4 << 20), (False, 0)])
def test_a_consumer_failing_mid_dump_stops_the_reader(
    ct: Conntrack, monkeypatch: pytest.MonkeyPatch, pipelined: bool, chunk: int
) -> None:
    from topowatch.edges import ctnetlink

    if chunk:  # 128 KiB: the dump is far from read when it fails; 4 MiB: the reader has it all
        monkeypatch.setattr(ctnetlink, "PIPELINE_CHUNK", chunk)
    ct.pipelined = pipelined
    ct.create([udp4(i) for i in range(5000)])
    recvs = []
    real_recv = ct._recv

    def counted(*, block: bool) -> bytes | None:
        recvs.append(block)
        return real_recv(block=block)

    monkeypatch.setattr(ct, "_recv", counted)

    class Failing(Collect):
        def add_raw(self, raw: ctcodec.RawEntry) -> None:
            if len(self.raw) == 100:
                raise RuntimeError("consumer failed")
            super().add_raw(raw)

    with pytest.raises(RuntimeError, match="consumer failed"):
        ct.scan(Failing)
    assert not reader_threads()
    if chunk == 4 << 20:
        assert not recvs  # the reader had received the end: nothing left to drain
    elif pipelined:
        assert recvs  # the rest of the dump was drained
    # The socket is usable again: the abandoned dump's rest is ignored as stale answers.
    assert len(ct.dump()) == 5000


class FakeBurst:
    """Stands in for the compiled module's recv_burst; feed stays the real one."""

    def __init__(self, answers: list[tuple[bytes, int, int, int]]) -> None:
        self.answers = answers
        self.feed = ctcodec._ctscan.feed  # type: ignore[union-attr]

    def recv_burst(self, fd: int, size: int, room: int, seq: int, timeout_ms: int) -> tuple[bytes, int, int, int]:
        return self.answers.pop(0) if self.answers else (b"", 0, 0, errno.ETIMEDOUT)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ((b"", 0, 0, errno.ENOBUFS), "ctnetlink dump failed: No buffer space available"),
        ((b"", 0, 0, errno.EMSGSIZE), "exceeds the receive buffer"),
        ((b"", 0, 0, errno.ETIMEDOUT), "no answer from ctnetlink within 0.3 s"),
    ],
)
def test_reader_errors_are_raised_in_the_judging_thread(
    ct: Conntrack, monkeypatch: pytest.MonkeyPatch, answer: tuple[bytes, int, int, int], message: str
) -> None:
    ct.timeout = 0.3
    monkeypatch.setattr(ctcodec, "_ctscan", FakeBurst([answer]))
    with pytest.raises(NetlinkError, match=message):
        ct.dump()
    assert not reader_threads()


def test_recv_burst_concatenates_pads_and_sees_the_end() -> None:
    from topowatch.edges import _ctscan

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        b.setblocking(False)
        done = ctcodec.encode_message(ctcodec.NLMSG_DONE, ctcodec.NLM_F_MULTI, 7, 0, [])
        other = ctcodec.encode_message(ctcodec.NLMSG_DONE, ctcodec.NLM_F_MULTI, 6, 0, [])  # another dump's
        for datagram in (b"\x01\x02\x03\x04\x05", other, done, b"after"):
            a.send(datagram)
        data, count, ended, err = _ctscan.recv_burst(b.fileno(), 1 << 16, 64, 7, 100)
        assert (count, ended, err) == (3, 1, 0)
        assert data == b"\x01\x02\x03\x04\x05\0\0\0" + other + done
        data, count, ended, err = _ctscan.recv_burst(b.fileno(), 1 << 16, 64, 7, 100)
        assert (data, count, ended, err) == (b"after\0\0\0", 1, 0, 0)  # what came, handed over
        assert _ctscan.recv_burst(b.fileno(), 1 << 16, 64, 7, 50) == (b"", 0, 0, errno.ETIMEDOUT)
        a.send(b"x" * 200)
        assert _ctscan.recv_burst(b.fileno(), 128, 64, 7, 50)[3] == errno.EMSGSIZE
        a.send(b"y" * 40)
        a.send(b"z" * 40)
        # Less than ``room`` left after the first: the burst ends there.
        assert _ctscan.recv_burst(b.fileno(), 100, 64, 7, 50)[:3] == (b"y" * 40, 1, 0)
        with pytest.raises(ValueError, match="room"):
            _ctscan.recv_burst(b.fileno(), 10, 64, 7, 50)


# --- delete_current: the re-check before each delete batch -----------------------------------


def set_status(ct: Conntrack, entry: Entry, status: int) -> None:
    """Change a live entry's status bits (IPCTNL_MSG_CT_NEW without NLM_F_CREATE: an update)."""
    seq = ct._next_seq()
    attrs = [
        (ctcodec.CTA_TUPLE_ORIG, ctcodec.encode_tuple(ctcodec.CTA_TUPLE_ORIG, entry.family, entry.proto,
                                                      entry.orig)),
        (ctcodec.CTA_STATUS, ctcodec.nla(ctcodec.CTA_STATUS, ctcodec.be32(status))),
    ]  # fmt: skip
    if entry.zone:  # the entry is found in its own zone only (the dump's order may pick the zoned one)
        attrs.append((ctcodec.CTA_ZONE, ctcodec.nla(ctcodec.CTA_ZONE, ctcodec.be16(entry.zone))))
    msg = ctcodec.encode_message(ctcodec.IPCTNL_MSG_CT_NEW, ctcodec.NLM_F_REQUEST, seq, entry.family, attrs)
    out = ct._transact([msg], seq)
    assert out.errors == {}, out.errors


def unreplied_now(dumped: Entry, now: Reread) -> bool:
    return not now.status & IPS_SEEN_REPLY


def pending(dumped: list[Entry], form: str) -> Sequence[Entry]:
    """The entries to delete as a list, or as the records a compiled scan keeps (re-checked in C)."""
    if form == "entries":
        return dumped
    return StaleEntries(dumped[:1], b"".join(pack_record(e) for e in dumped[1:]), lambda i: dumped[1 + i])


FORMS = ["entries", pytest.param("records", marks=pytest.mark.skipif(ctcodec._ctscan is None,
                                                                      reason="the compiled scan is not built"))]


@pytest.mark.parametrize("form", FORMS)
def test_delete_current_keeps_an_entry_replied_since_the_dump(ct: Conntrack, form: str) -> None:
    ct.create([udp4(i) for i in range(40)] + [udp4(1000, zone=7)])
    dumped = ct.dump()
    answered = dumped[17]
    set_status(ct, answered, answered.status | IPS_SEEN_REPLY | IPS_ASSURED)  # a reply came meanwhile
    ct.recheck_batch = 16  # several batches, each re-read just before its delete
    result = ct.delete_current(pending(dumped, form), unreplied_now)
    assert (result.deleted, result.kept_replied, result.not_found, result.failed) == (40, 1, 0, 0)
    assert len(result.windows) == result.batches == (3 if form == "entries" else 4)  # the head is its own batch
    assert result.window_p99 is not None
    (left,) = ct.dump(unreplied_only=False)
    assert (left.orig, left.id, left.unreplied) == (answered.orig, answered.id, False)


@pytest.mark.parametrize("form", FORMS)
def test_delete_current_counts_gone_and_other_ids_as_already_gone(ct: Conntrack, form: str) -> None:
    ct.create([udp4(i) for i in range(5)])
    dumped = ct.dump()
    ct.delete(dumped[:1])
    other = dumped[1]
    stranger = Entry(other.family, other.proto, other.orig, other.reply, other.status, id=other.id ^ 1)
    result = ct.delete_current(pending([dumped[0], stranger, *dumped[2:]], form))
    assert (result.deleted, result.not_found) == (3, 2)
    assert [e.orig for e in ct.dump()] == [other.orig]


@pytest.mark.parametrize("form", FORMS)
def test_delete_current_never_deletes_an_entry_whose_answer_was_lost(ct: Conntrack, form: str) -> None:
    ct.create([udp4(i) for i in range(300)])
    dumped = ct.dump()
    # A receive buffer far too small for 256 answers: most are dropped (ENOBUFS) and asked again.
    ct.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    result = ct.delete_current(pending(dumped, form), unreplied_now)
    left = ct.dump()
    assert result.deleted + result.unchecked == 300 and result.unchecked == len(left)
    assert result.unconfirmed == 0 or result.deleted + result.unconfirmed + result.unchecked == 300


# --- interrupted dumps (NLM_F_DUMP_INTR): dumped again, a partial result never used ---------------------


def interrupt_datagrams(ct: Conntrack, monkeypatch: pytest.MonkeyPatch, which: set[int]) -> list[int]:
    """Flag NLM_F_DUMP_INTR on the received datagrams numbered in ``which`` (1-based, over all dumps)."""
    ct.pipelined = False  # one datagram per recv, so the flag lands in the middle of a dump
    real = ct._recv
    seen = [0]

    def flagged(*, block: bool) -> bytes | None:
        data = real(block=block)
        if data is None:
            return None
        seen[0] += 1
        if seen[0] in which:
            out = bytearray(data)
            flags = struct.unpack_from("=H", out, 6)[0]
            struct.pack_into("=H", out, 6, flags | ctcodec.NLM_F_DUMP_INTR)
            return bytes(out)
        return data

    monkeypatch.setattr(ct, "_recv", flagged)
    return seen


def test_an_interrupted_scan_starts_over_with_a_fresh_consumer(
    ct: Conntrack, monkeypatch: pytest.MonkeyPatch
) -> None:
    ct.create(udp4(i) for i in range(3000))
    expected = sorted(map(key, ct.dump()), key=repr)
    seen = interrupt_datagrams(ct, monkeypatch, {3})  # the first attempt, a few datagrams in
    consumers: list[Collect] = []

    def start() -> Collect:
        consumers.append(Collect())
        return consumers[-1]

    got = ct.scan(start)
    assert seen[0] > 6 and len(consumers) == 2 and got is consumers[1]
    assert sorted(map(key, got.raw + got.entries), key=repr) == expected  # whole, nothing twice
    assert ct.last_dump is not None and ct.last_dump.interrupted_retries == 1


def test_a_dump_interrupted_every_time_is_refused_never_returned(
    ct: Conntrack, monkeypatch: pytest.MonkeyPatch
) -> None:
    ct.create(udp4(i) for i in range(3000))
    interrupt_datagrams(ct, monkeypatch, set(range(1, 1000)))
    with pytest.raises(DumpInterrupted, match="results may be inconsistent"):
        ct.scan(Collect)
    with pytest.raises(DumpInterrupted):
        ct.dump()
    monkeypatch.undo()
    assert len(ct.dump()) == 3000  # the socket is still usable: nothing of those dumps is left unread


def test_a_socket_told_the_status_filter_does_not_probe(netns: Namespace, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second socket of deletes overlapping a dump is told what the first one found: its probe
    (two dumps walking the whole table) would be on a reaction's clock."""
    from topowatch.edges import ctnetlink

    def probe(ct: Conntrack) -> bool:
        raise AssertionError("probed")

    monkeypatch.setattr(ctnetlink, "probe_status_filter", probe)
    sock = netns.socket(socket.AF_NETLINK, socket.SOCK_RAW, ctcodec.NETLINK_NETFILTER)
    told = Conntrack(sock, status_filter=True)
    try:
        assert told.status_filter_supported is True
    finally:
        told.close()
    untold = netns.socket(socket.AF_NETLINK, socket.SOCK_RAW, ctcodec.NETLINK_NETFILTER)
    try:
        with pytest.raises(AssertionError, match="probed"):
            Conntrack(untold)
    finally:
        untold.close()
