# SPDX-License-Identifier: GPL-2.0-or-later
"""Who receives a dump: the reader thread where the module is compiled, the caller's thread otherwise.

``Conntrack`` gets one end of a socketpair (``test_ctdelete.Wire``); the other end
is a scripted kernel that answers a dump request (``IPCTNL_MSG_CT_GET`` with
``NLM_F_DUMP``) as ctnetlink does, inside ``sendto``: the entries in datagrams of
``NLM_F_MULTI`` messages carrying the request's sequence number, then an
``NLMSG_DONE``. The serial path receives each datagram with the wire's
``recv_into`` in the caller's thread; the pipelined one with
``_ctscan.recv_burst`` on the socket's descriptor, in the reader thread
(``topowatch-ct-reader``), never through the wire.

Expected values are worked out from the script: three datagrams (two of
three entries each, and the DONE), ids 1 to 6.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from test_ctcodec import dump_message
from test_ctdelete import FakeKernel, Wire, entries

from topowatch.core.conntrack import Entry
from topowatch.edges import ctcodec
from topowatch.edges.ctnetlink import Conntrack

HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
READER = "topowatch-ct-reader"


@dataclass
class DumpKernel(FakeKernel):
    """``FakeKernel`` that also answers dump requests: ``datagrams`` of entries, then the DONE."""

    datagrams: list[list[Entry]] = field(default_factory=list)
    dumps: int = 0  # dump requests answered

    def handle(self, data: bytes) -> None:
        _len, mtype, flags, seq, _pid = HDR.unpack_from(data, 0)
        if mtype != ctcodec.IPCTNL_MSG_CT_GET or flags & ctcodec.NLM_F_DUMP != ctcodec.NLM_F_DUMP:
            super().handle(data)
            return
        self.dumps += 1
        for part in self.datagrams:
            self.sock.send(b"".join(dump_message(e, seq) for e in part))
        self.sock.send(ctcodec.encode_message(ctcodec.NLMSG_DONE, ctcodec.NLM_F_MULTI, seq, 0, []))


class RecordingWire(Wire):
    """``Wire`` that names the thread of each ``recv_into`` (the serial path's receives)."""

    def __init__(self, sock: socket.socket, kernel: FakeKernel) -> None:
        super().__init__(sock, kernel)
        self.recv_threads: list[str] = []

    def recv_into(self, buf: Any, nbytes: int, flags: int = 0) -> int:
        self.recv_threads.append(threading.current_thread().name)
        return super().recv_into(buf, nbytes, flags)


class BurstRecorder:
    """The compiled module, with the thread of each ``recv_burst`` named (the pipelined receives)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.threads: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def recv_burst(self, *args: Any) -> Any:
        self.threads.append(threading.current_thread().name)
        return self.real.recv_burst(*args)


@pytest.fixture
def bursts(monkeypatch: pytest.MonkeyPatch) -> BurstRecorder:
    if ctcodec._ctscan is None:
        pytest.skip("the compiled module is not built")
    recorder = BurstRecorder(ctcodec._ctscan)
    monkeypatch.setattr(ctcodec, "_ctscan", recorder)
    return recorder


def connect() -> tuple[Conntrack, DumpKernel, RecordingWire]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    kernel = DumpKernel(theirs)
    six = entries(6)
    kernel.datagrams = [six[:3], six[3:]]
    wire = RecordingWire(ours, kernel)
    ct = Conntrack(wire, status_filter=True)  # type: ignore[arg-type]
    ct.timeout = 0.5  # a wait for an answer that never comes fails the test quickly
    return ct, kernel, wire


@pytest.fixture
def dumping() -> Iterator[tuple[Conntrack, DumpKernel, RecordingWire]]:
    ct, kernel, wire = connect()
    yield ct, kernel, wire
    ct.close()


def test_with_the_compiled_module_the_reader_thread_receives_the_dump(
    bursts: BurstRecorder, dumping: tuple[Conntrack, DumpKernel, RecordingWire]
) -> None:
    """A fresh ``Conntrack`` pipelines its dumps where the module is compiled: every datagram is
    received by ``recv_burst`` in the reader thread, none by a ``recv`` in the caller's thread."""
    ct, kernel, wire = dumping
    assert ct.pipelined is True
    got = ct.dump(unreplied_only=False)
    assert [e.id for e in got] == [1, 2, 3, 4, 5, 6] and kernel.dumps == 1
    assert bursts.threads and set(bursts.threads) == {READER}
    assert wire.recv_threads == []
    assert ct.last_dump is not None and ct.last_dump.recvs == 3  # two datagrams of entries and the DONE


def test_a_dump_not_pipelined_is_received_one_datagram_per_recv_in_the_callers_thread(
    bursts: BurstRecorder, dumping: tuple[Conntrack, DumpKernel, RecordingWire]
) -> None:
    ct, _kernel, wire = dumping
    ct.pipelined = False
    assert [e.id for e in ct.dump(unreplied_only=False)] == [1, 2, 3, 4, 5, 6]
    assert bursts.threads == []
    assert wire.recv_threads == [threading.current_thread().name] * 3
    assert ct.last_dump is not None and ct.last_dump.recvs == 3


def test_without_the_compiled_module_a_dump_is_not_pipelined(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``_ctscan``, no reader: ``pipelined`` is false from the start, and the dump is read one
    datagram per ``recv`` in the caller's thread."""
    monkeypatch.setattr(ctcodec, "_ctscan", None)
    ct, _kernel, wire = connect()
    try:
        assert ct.pipelined is False
        assert [e.id for e in ct.dump(unreplied_only=False)] == [1, 2, 3, 4, 5, 6]
        assert wire.recv_threads == [threading.current_thread().name] * 3
    finally:
        ct.close()
