# SPDX-License-Identifier: GPL-2.0-or-later
"""Text from outside (tool output, kernel names, files): bytes until decoded here, on purpose.

What this module decides: how external bytes become ``str`` and how a
``str`` that came from outside is shown in a log line. Every program we run
(``nft``, ``iptables-save``, ``ipset``) is read as bytes and decoded with
``decode``: UTF-8 with ``surrogateescape``, so no byte sequence fails and
an undecodable byte survives as a lone surrogate (U+DC80..U+DCFF) that
``undecodable`` finds. A parser that meets one where meaning depends on the
text (an interface name, a match) makes that rule unknown, never "no NAT";
where it cannot matter (a comment) it is kept as it is.

``escape`` makes any such text safe for one log line: control characters
(C0, DEL, C1, including newlines: no forged log lines) and undecodable bytes
become ``\\xNN`` escapes; everything else is left readable.

Rules: stdlib only; never raises on any input.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence

ENCODING = "utf-8"
ERRORS = "surrogateescape"

_UNDECODABLE = re.compile("[\udc80-\udcff]")
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def decode(data: bytes) -> str:
    """External bytes as text; an undecodable byte becomes a lone surrogate (see ``undecodable``)."""
    return data.decode(ENCODING, ERRORS)


def undecodable(text: str) -> bool:
    """Did ``text`` hold bytes that were not UTF-8 (``decode``'s surrogate escapes)?"""
    return _UNDECODABLE.search(text) is not None


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"  # the original byte
    if code > 0xFF:
        return f"\\u{code:04x}"  # any other lone surrogate
    return f"\\x{code:02x}"


def escape(text: str) -> str:
    """``text`` safe for one log line: control characters and undecodable bytes as ``\\xNN``."""
    return _UNSAFE.sub(_escape_one, text)


def run_tool(argv: Sequence[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
    """``subprocess.run`` capturing bytes, stdout and stderr then ``decode``d (never a UnicodeDecodeError)."""
    proc = subprocess.run(list(argv), capture_output=True, check=False, timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, decode(proc.stdout), decode(proc.stderr))
