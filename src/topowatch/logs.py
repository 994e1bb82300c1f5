# SPDX-License-Identifier: GPL-2.0-or-later
"""Log records: journald-friendly text by default, one JSON object per line on request.

Decides the format only; never filters what the rest of the program says. Every
text record is one line whatever it quotes: control characters and bytes that
were not UTF-8 (an interface name, a rule, a file name) are escaped
(``topowatch.text.escape``), so outside input can neither forge a line nor
send terminal escapes; JSON records are escaped by JSON itself.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from topowatch.text import escape

JOURNALD_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class TextFormatter(logging.Formatter):
    """``<6>topowatch: message`` under journald (stderr is the journal), a timestamp on a terminal."""

    def __init__(self, journald: bool) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR:
            message += " (" + repr(record.exc_info[1]) + ")"
        message = escape(message)
        if self.journald:
            return f"<{JOURNALD_PRIORITY.get(record.levelno, 6)}>{message}"
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        return f"{stamp}.{int(record.msecs):03d} {record.levelname.lower():7} {message}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            obj.update(extra)
        return json.dumps(obj, default=str)


def setup_logging(verbose: int = 0, fmt: str = "text") -> None:
    import os

    level = logging.DEBUG if verbose >= 2 else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    journald = bool(os.environ.get("JOURNAL_STREAM")) and fmt == "text"
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(journald))
    root = logging.getLogger("topowatch")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
