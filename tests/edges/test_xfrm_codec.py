"""The XFRM codec against recorded kernel messages (record_xfrm.py) and synthesised ones.

SAs cannot be added on this kernel (no ESP), so every SA message is
synthesised with the codec's encoder, which lays the kernel's structs out
field by field; the policy messages the kernel sent are recorded.
"""

from __future__ import annotations

import errno
import re
import struct
from collections import deque
from contextlib import aclosing
from ipaddress import ip_address, ip_network
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from topowatch.core.model import AF_INET, AF_INET6
from topowatch.core.xfrm import (
    Action,
    Direction,
    Mode,
    PolicyType,
    XfrmPolicy,
    XfrmSelector,
    XfrmState,
    XfrmTemplate,
)
from topowatch.edges import xfrm as X
from topowatch.edges.rtnl import DecodeStats
from topowatch.errors import DumpInterrupted

DATA = Path(__file__).resolve().parent / "data"
A = ip_address
N = ip_network


def records(name: str) -> list[bytes]:
    data = (DATA / name).read_bytes()
    out, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack_from("=I", data, offset)
        out.append(data[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return out


# -- values used by the synthesised messages ---------------------------------------------------

SEL = XfrmSelector(AF_INET, N("10.0.1.0/24"), N("192.0.2.0/24"), dport=5060, dport_mask=0xFFFF, proto=17)
TMPL = XfrmTemplate(AF_INET, A("198.51.100.1"), A("203.0.113.2"), reqid=1, mode=Mode.TUNNEL, spi=0x1234)
POLICY = XfrmPolicy(SEL, Direction.OUT, priority=100, index=9, templates=(TMPL, TMPL), mark=5, mark_mask=0xFF,
                    if_id=3)
POLICY6 = XfrmPolicy(XfrmSelector(AF_INET6, N("fd00::/64"), N("fd01::/64")), Direction.FWD, index=18,
                     action=Action.BLOCK, type=PolicyType.SUB)
SA = XfrmState(AF_INET, A("198.51.100.1"), A("203.0.113.2"), 50, 0xC0FFEE01, reqid=1, mode=Mode.TUNNEL,
               mark=1, mark_mask=3, if_id=4)
SA6 = XfrmState(AF_INET6, A("2001:db8::1"), A("2001:db8::2"), 51, 0x200, reqid=7,
                selector=XfrmSelector(AF_INET6, N("fd00::/64"), N("fd01::/64")))

SYNTH: list[tuple[str, bytes, X.EventAction, object, bool]] = [
    ("new policy", X.encode_policy(POLICY), X.EventAction.NEW, POLICY, True),
    ("update policy", X.encode_policy(POLICY, X.XFRM_MSG_UPDPOLICY), X.EventAction.UPDATE, POLICY, True),
    ("delete policy", X.encode_policy(POLICY, X.XFRM_MSG_DELPOLICY), X.EventAction.DELETE, POLICY, True),
    ("v6 sub block policy", X.encode_policy(POLICY6), X.EventAction.NEW, POLICY6, True),
    ("policy hard expire", X.encode_policy(POLICY, X.XFRM_MSG_POLEXPIRE), X.EventAction.EXPIRE, POLICY, True),
    ("policy soft expire", X.encode_policy(POLICY, X.XFRM_MSG_POLEXPIRE, hard=False), X.EventAction.EXPIRE,
     POLICY, False),
    ("new SA", X.encode_state(SA), X.EventAction.NEW, SA, True),
    ("update SA", X.encode_state(SA, X.XFRM_MSG_UPDSA), X.EventAction.UPDATE, SA, True),
    ("delete SA", X.encode_state(SA, X.XFRM_MSG_DELSA), X.EventAction.DELETE, SA, True),
    ("v6 SA with selector", X.encode_state(SA6), X.EventAction.NEW, SA6, True),
    ("SA hard expire", X.encode_state(SA, X.XFRM_MSG_EXPIRE), X.EventAction.EXPIRE, SA, True),
    ("SA soft expire", X.encode_state(SA, X.XFRM_MSG_EXPIRE, hard=False), X.EventAction.EXPIRE, SA, False),
    ("flush SAs", X.encode_flush(X.XFRM_MSG_FLUSHSA, 50), X.EventAction.FLUSH, None, True),
    ("flush policies", X.encode_flush(X.XFRM_MSG_FLUSHPOLICY), X.EventAction.FLUSH, None, True),
]


@pytest.mark.parametrize(("data", "action", "value", "changes"), [c[1:] for c in SYNTH], ids=[c[0] for c in SYNTH])
def test_synthesised_events(data: bytes, action: X.EventAction, value: object, changes: bool) -> None:
    stats = DecodeStats()
    (event,) = X.events_from_data(data, stats)
    assert (event.action, event.value, event.changes) == (action, value, changes)
    assert stats.undecodable == 0
    assert event.description.startswith("xfrm ")


def test_struct_sizes_are_the_kernels() -> None:
    # The payload after the 16-byte header (attributes start 4-aligned after it).
    assert len(X.encode_flush(X.XFRM_MSG_FLUSHSA)) == 16 + 4
    new = X.encode_state(XfrmState(AF_INET, A("1.1.1.1"), A("2.2.2.2"), 50, 1))
    assert len(new) == 16 + 224
    delete = X.encode_policy(XfrmPolicy(XfrmSelector(AF_INET), Direction.OUT), X.XFRM_MSG_DELPOLICY)
    assert struct.unpack_from("=I", delete)[0] == len(delete)
    assert struct.unpack_from("=HH", delete, 16 + 64)[1] == X.XFRMA_POLICY  # the info follows the 64-byte id


def test_delete_by_id_without_the_policy_attribute() -> None:
    data = X._encode(X.xfrm_userpolicy_id, X.XFRM_MSG_DELPOLICY, {"index": 17, "dir": 1}, [])
    (event,) = X.events_from_data(data)
    assert event.value is None and "dir out index 17" in event.description and event.changes
    sa_id = X._encode(X.xfrm_usersa_id, X.XFRM_MSG_DELSA,
                      {"daddr": A("198.51.100.1").packed + bytes(12), "spi": 0x100, "family": AF_INET,
                       "proto": 50}, [])
    (event,) = X.events_from_data(sa_id)
    assert event.value is None and "spi 0x100 dst 198.51.100.1" in event.description


def test_messages_that_are_not_topology_are_ignored() -> None:
    acquire = struct.pack("=IHHII", 16 + 8, X.XFRM_MSG_ACQUIRE, 0, 0, 0) + bytes(8)
    stats = DecodeStats()
    assert X.events_from_data(acquire, stats) == []
    assert stats.undecodable == 0


# -- recorded kernel messages --------------------------------------------------------------------


def ip_xfrm_policies(text: str) -> list[dict[str, str]]:
    """The oracle: `ip xfrm policy` text, one dict per policy (src, dst, dir, priority, reqids, mark)."""
    out: list[dict[str, str]] = []
    for block in re.split(r"\n(?=src )", text.strip()):
        words = block.split()
        d = {"src": words[1], "dst": words[3], "dir": words[words.index("dir") + 1],
             "priority": words[words.index("priority") + 1],
             "reqids": ",".join(words[i + 1] for i, w in enumerate(words) if w == "reqid")}
        if "mark" in words:
            d["mark"] = words[words.index("mark") + 1]
        if "action" in words:
            d["action"] = words[words.index("action") + 1]
        out.append(d)
    return out


def as_oracle(p: XfrmPolicy) -> dict[str, str]:
    d = {"src": str(p.selector.src), "dst": str(p.selector.dst), "dir": p.direction.name.lower(),
         "priority": str(p.priority), "reqids": ",".join(str(t.reqid) for t in p.templates)}
    if p.mark_mask:
        d["mark"] = f"{p.mark:#x}/{p.mark_mask:#x}"
    if p.action is Action.BLOCK:
        d["action"] = "block"
    return d


def test_recorded_dump_matches_ip_xfrm() -> None:
    stats = DecodeStats()
    msgs = [m for chunk in records("xfrm_dump.bin") for m in X.decode_messages(chunk, stats)]
    policies = [X.policy_from_msg(m) for m in msgs]
    assert stats.undecodable == 0
    assert [as_oracle(p) for p in policies] == ip_xfrm_policies((DATA / "xfrm_ip.txt").read_text())
    by_prio = {p.priority: p for p in policies}
    assert by_prio[50].templates[0].optional and by_prio[50].selector.dport == 5060
    assert by_prio[0].if_id == 7 and by_prio[0].selector.family == AF_INET6
    icmp = by_prio[7]
    assert (icmp.selector.proto, icmp.selector.sport, icmp.selector.sport_mask) == (1, 8, 0xFFFF)
    assert by_prio[100].templates[0].daddr == A("198.51.100.1")


def test_recorded_events() -> None:
    events = [e for chunk in records("xfrm_events.bin") for e in X.events_from_data(chunk)]
    assert [(e.kind, e.action) for e in events] == [
        (X.EventKind.POLICY, X.EventAction.NEW),
        (X.EventKind.POLICY, X.EventAction.UPDATE),
        (X.EventKind.POLICY, X.EventAction.DELETE),
        (X.EventKind.POLICY, X.EventAction.EXPIRE),
        (X.EventKind.POLICY, X.EventAction.FLUSH),
    ]
    assert isinstance(events[1].value, XfrmPolicy) and events[1].value.templates[0].reqid == 3
    assert events[2].value == events[1].value  # the delete carries the full policy
    assert events[3].changes and "hard" in events[3].description  # no delete message follows a hard expire


# -- malformed input never crashes -------------------------------------------------------------


ALL = [c[1] for c in SYNTH] + records("xfrm_events.bin") + records("xfrm_dump.bin")
# Every XFRM message of those, one by one (a dump datagram holds several, and ends with NLMSG_DONE).
SINGLES = [raw for data in ALL for kind, _, _, raw in X.split_datagram(data) if kind in X.MSG_CLASSES]
# A message in front of the broken one: it must still decode, whatever follows it.
INTACT = X.encode_policy(POLICY)


def message_kind(msg: bytes) -> int:
    return int(struct.unpack_from("=H", msg, 4)[0])


def test_singles_cover_every_message_kind() -> None:
    assert {message_kind(m) for m in SINGLES} == set(X.MSG_CLASSES)
    assert len(INTACT) % 4 == 0 and X.events_from_data(INTACT)[0].value == POLICY


@pytest.mark.parametrize("msg", SINGLES, ids=range(len(SINGLES)))
def test_every_truncation_is_skipped(msg: bytes) -> None:
    fixed = 16 + X._MIN_PAYLOAD[message_kind(msg)]  # header and the message's struct
    for cut in range(1, len(msg)):
        broken = bytearray(msg[:cut])
        if len(broken) >= 4:
            struct.pack_into("=I", broken, 0, len(broken))  # a consistent header that lies about the body
        stats = DecodeStats()
        events = X.events_from_data(INTACT + bytes(broken), stats)
        assert events[0].value == POLICY, cut  # the intact message before it still decodes
        if cut < fixed:
            # No whole header, or not the whole struct: nothing can be read of it, and that is counted.
            assert len(events) == 1 and stats.undecodable == 1 and stats.ignored == 0, cut
        else:
            # Cut among the attributes: what is left decodes, or the message is refused; once either way.
            assert len(events) - 1 + stats.undecodable + stats.ignored == 1, cut


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SINGLES), st.lists(st.tuples(st.integers(0, 300), st.integers(0, 255)), max_size=6))
def test_corrupted_messages_are_counted_never_raised(msg: bytes, flips: list[tuple[int, int]]) -> None:
    broken = bytearray(msg)
    for pos, value in flips:
        if pos < len(broken):
            broken[pos] = value
    stats = DecodeStats()
    events = X.events_from_data(INTACT + bytes(broken), stats)
    assert events[0].value == POLICY  # the intact message before it still decodes
    # Every message decoded is an event, ignored, or undecodable: none lost, none counted twice.
    assert len(events) + stats.ignored <= stats.messages <= len(events) + stats.ignored + stats.undecodable
    if broken[:16] == msg[:16]:
        # The header holds (length and type): the corrupted message has exactly one outcome.
        assert len(events) - 1 + stats.undecodable + stats.ignored == 1
    if broken == msg:
        assert events[1:] == X.events_from_data(msg) and stats.undecodable == 0


def test_a_codec_bug_is_not_taken_for_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only UndecodableMessage is skipped: a programming error in a converter surfaces."""
    def broken(msg: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(X, "event_from_msg", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        X.events_from_data(INTACT)


def test_bad_values_are_undecodable_not_errors() -> None:
    bad_family = bytearray(X.encode_state(SA))
    struct.pack_into("=H", bad_family, 16 + 212, 99)  # usersa_info.family
    stats = DecodeStats()
    assert X.events_from_data(bytes(bad_family), stats) == []
    assert stats.undecodable == 1
    odd_tmpl = X._encode(X.xfrm_userpolicy_info, X.XFRM_MSG_NEWPOLICY, X._policy_fields(POLICY),
                         [["XFRMA_TMPL", bytes(10)]])
    stats = DecodeStats()
    assert X.events_from_data(odd_tmpl, stats) == []
    assert stats.undecodable == 1


# -- the socket side, with a fake socket ---------------------------------------------------------


class FakeSocket:
    """Answers dump requests from canned datagrams; plays an event script of datagrams and errors."""

    def __init__(self, script: list[bytes | OSError] | None = None, interrupt_first: bool = False) -> None:
        self.script: deque[bytes | OSError] = deque(script or [])
        self.sent: list[bytes] = []
        self.replies: deque[bytes] = deque()
        self.interrupt_first = interrupt_first
        self.options: list[tuple[int, int, int]] = []
        self.closed = False

    async def send(self, data: bytes) -> int:
        self.sent.append(data)
        _, kind, _, seq = struct.unpack_from("=IHHI", data)
        if kind == X.XFRM_MSG_GETPOLICY:
            body = [X.encode_policy(POLICY), X.encode_policy(POLICY6)]
        else:
            body = [X.encode_state(SA), X.encode_state(SA6)]
        flags = 0x2 | (0x10 if self.interrupt_first else 0)
        self.interrupt_first = False
        datagram = b"".join(self._reseq(m, seq, flags) for m in body)
        done = struct.pack("=IHHIIi", 20, 3, 0x2, seq, 0, 0)
        self.replies.extend([datagram, done])
        return len(data)

    @staticmethod
    def _reseq(msg: bytes, seq: int, flags: int) -> bytes:
        out = bytearray(msg)
        struct.pack_into("=HI", out, 6, flags, seq)
        return bytes(out)

    async def recv(self, bufsize: int) -> bytes:
        await trio.lowlevel.checkpoint()
        if self.replies:
            return self.replies.popleft()
        if not self.script:
            await trio.sleep_forever()
        item = self.script.popleft()
        if isinstance(item, OSError):
            raise item
        return item

    async def bind(self, address: tuple[int, int]) -> None:
        await trio.lowlevel.checkpoint()

    def setsockopt(self, level: int, optname: int, value: int) -> None:
        self.options.append((level, optname, value))

    def close(self) -> None:
        self.closed = True


async def test_dump_decodes_policies_and_sas() -> None:
    sock = FakeSocket()
    policies, states = await X.dump_xfrm(sock=sock)
    assert policies == (POLICY, POLICY6) and states == (SA, SA6)
    kinds = [struct.unpack_from("=H", m, 4)[0] for m in sock.sent]
    assert kinds == [X.XFRM_MSG_GETPOLICY, X.XFRM_MSG_GETSA]
    assert not sock.closed  # the caller's socket stays open


async def test_interrupted_dump_is_dumped_again() -> None:
    sock = FakeSocket(interrupt_first=True)
    policies, _ = await X.dump_xfrm(sock=sock)
    assert policies == (POLICY, POLICY6) and len(sock.sent) == 3

    class Always(FakeSocket):
        async def send(self, data: bytes) -> int:
            self.interrupt_first = True
            return await super().send(data)

    with pytest.raises(DumpInterrupted):
        await X.dump_xfrm(sock=Always(), attempts=2)


async def test_event_stream_survives_overrun_and_garbage() -> None:
    script: list[bytes | OSError] = [
        X.encode_policy(POLICY),
        b"\xff" * 40,
        OSError(errno.ENOBUFS, "No buffer space available"),
        X.encode_state(SA, X.XFRM_MSG_EXPIRE, hard=False),
        X.encode_state(SA, X.XFRM_MSG_EXPIRE),
    ]
    sock = FakeSocket(script)
    got = []
    async with X.XfrmEvents(sock) as events:
        with trio.fail_after(2):
            for _ in range(4):
                got.append(await events.__anext__())
    assert isinstance(got[0], X.XfrmEvent) and got[0].value == POLICY
    assert isinstance(got[1], X.Overrun)
    assert isinstance(got[2], X.XfrmEvent) and not got[2].changes
    assert isinstance(got[3], X.XfrmEvent) and got[3].changes
    assert events.stats.overruns == 1 and events.stats.undecodable == 1
    groups = {value for level, opt, value in sock.options if opt == 1}
    assert groups == {X.XFRMNLGRP_POLICY, X.XFRMNLGRP_SA, X.XFRMNLGRP_EXPIRE}


async def test_source_yields_triggers_for_changes_only() -> None:
    script: list[bytes | OSError] = [
        X.encode_state(SA, X.XFRM_MSG_EXPIRE, hard=False),  # soft: no trigger
        OSError(errno.ENOBUFS, "No buffer space available"),
        X.encode_policy(POLICY, X.XFRM_MSG_DELPOLICY),
    ]
    source = X.XfrmSource(lambda: FakeSocket(script))
    assert source.name == "xfrm"
    triggers = []
    async with source.events() as stream, aclosing(stream) as closing:  # type: ignore[type-var]
        with trio.fail_after(2):
            async for trigger in closing:
                triggers.append(trigger)
                if len(triggers) == 2:
                    break
    assert triggers[0].overrun and triggers[0].source == "xfrm"
    assert not triggers[1].overrun and triggers[1].description.startswith("xfrm policy removed: src 10.0.1.0/24")
    assert {t.kind for t in triggers} == {"xfrm"}
