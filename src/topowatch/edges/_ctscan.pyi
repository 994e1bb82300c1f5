# SPDX-License-Identifier: GPL-2.0-or-later
from collections.abc import Callable
from typing import Any

IPS_SEEN_REPLY: int
IPS_SRC_NAT_DONE: int
IPS_DST_NAT_DONE: int
RANGE_BYTES: int
RECORD_BYTES: int

def feed(
    parser: Any,
    data: bytes,
    n: int,
    seq: int,
    skip_mask: int,
    sink: Callable[[Any], object],
    cache: dict[bytes, bytes | None] | None,
    program: Callable[[Any], bytes | None] | None,
    judge: Callable[[Any], object] | None,
    sport_matters: bool,
    tables: bytes | None = None,
    records: bytearray | None = None,
    undecided: bytearray | None = None,
    /,
) -> tuple[int, int, int, int, int, int, int, int]: ...

def recv_burst(
    fd: int, size: int, room: int, seq: int, timeout_ms: int, /
) -> tuple[bytes, int, int, int]: ...

def requests(
    records: bytes, start: int, count: int, first_seq: int, delete: bool, select: bytes | None = None, /
) -> bytes: ...

def recheck(
    answers: bytes, first_seq: int, records: bytes, start: int, count: int, codes: bytearray, /
) -> tuple[list[tuple[int, int]], list[tuple[int, int, int, int, int]]]: ...

def iptables_line(
    line: str, /
) -> (
    tuple[str, str, str | None, str | None, str | None, str | None, str | None, str | None, str | None,
          str | None, str | None, str | None, str | None, str | None, str | None]
    | None
): ...
