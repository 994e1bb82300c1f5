# SPDX-License-Identifier: GPL-2.0-or-later
"""Log records: short text lines for a person, one JSON object per line for programs.

Text (the default) is for a person: one line per reaction and one per group
of deleted entries; under journald (stderr is the journal stream, told by
comparing stderr's device and inode with ``JOURNAL_STREAM`` as systemd
documents) each line starts with its ``<N>`` priority instead of a time, and
so does each JSON line (journald strips the prefix and keeps the priority).

JSON (``--log-format json``) is the machine interface: every record is one
object with an RFC 3339 ``ts``, ``level``, the journald ``priority``, the
logger, ``msg`` and the record's structured ``fields``; each deleted (or
would-be deleted) entry is a record of its own on the ``topowatch.entries``
logger. In text mode that logger speaks only with ``-v``.

Every text record is one line whatever it quotes: control characters and
bytes that were not UTF-8 (an interface name, a rule, a file name) are
escaped (``topowatch.text.escape``), so outside input can neither forge a
line nor send terminal escapes; JSON records are escaped by JSON itself.

Decides the format and the per-entry verbosity only; never filters what the
rest of the program says.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import time
from typing import TextIO

from topowatch.text import escape

JOURNALD_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}
# Per-entry records (one per deleted entry): JSON always, text with -v.
ENTRIES_LOGGER = "topowatch.entries"


def priority(levelno: int) -> int:
    """The syslog/journald priority of a logging level."""
    return JOURNALD_PRIORITY.get(levelno, 6)


def stderr_is_journal(stream: TextIO | None = None, environ: dict[str, str] | None = None) -> bool:
    """True when ``stream`` (stderr) is the journal stream systemd named in ``JOURNAL_STREAM``.

    systemd sets ``JOURNAL_STREAM=<device>:<inode>`` for a service whose
    stdout or stderr is the journal; it is inherited by children whose
    stderr went elsewhere, so only a match of both numbers counts.
    """
    value = (environ if environ is not None else os.environ).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):
        return False


def rfc3339(created: float) -> str:
    return datetime.datetime.fromtimestamp(created, datetime.UTC).isoformat(timespec="milliseconds")


class TextFormatter(logging.Formatter):
    """``<6>message`` under journald (stderr is the journal), a timestamp on a terminal."""

    def __init__(self, journald: bool) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR:
            message += " (" + repr(record.exc_info[1]) + ")"
        message = escape(message)
        if self.journald:
            return f"<{priority(record.levelno)}>{message}"
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        return f"{stamp}.{int(record.msecs):03d} {record.levelname.lower():7} {message}"


class JsonFormatter(logging.Formatter):
    """One object per line; under journald prefixed with ``<N>``, which journald takes as the
    record's priority and strips, so the journal holds the object and the right priority."""

    def __init__(self, journald: bool = False) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        obj = {
            "ts": rfc3339(record.created),
            "level": record.levelname.lower(),
            "priority": priority(record.levelno),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            obj.update(extra)
        text = json.dumps(obj, default=str)
        return f"<{obj['priority']}>{text}" if self.journald else text


def setup_logging(verbose: int = 0, fmt: str = "text", quiet: bool = False) -> None:
    """-q: warnings and errors only; -v: per-entry lines in text too; -vv: debug."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose >= 2 else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    journald = stderr_is_journal(sys.stderr)
    handler.setFormatter(JsonFormatter(journald) if fmt == "json" else TextFormatter(journald))
    root = logging.getLogger("topowatch")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    entries = logging.getLogger(ENTRIES_LOGGER)
    entries.setLevel(logging.NOTSET if fmt == "json" or verbose >= 1 else logging.WARNING)
