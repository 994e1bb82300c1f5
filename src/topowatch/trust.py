# SPDX-License-Identifier: GPL-2.0-or-later
"""Who may have written a file we act on: owner and mode checks in the manner of sshd's StrictModes.

What this module decides: whether a path (a policy file, the state
directory, the pressure ledger, the metrics textfile's directory) could
have been written or swapped by anyone but root or the user topowatch runs
as. A file or directory must be owned by one of those and not writable by
group or others; every directory above it (symlinks resolved) too, except
that one writable by all but sticky (``/tmp``) is accepted: nobody else
may rename what we own in it. Each check returns a sentence saying what is
wrong and how to fix it, or None. ``write_private`` writes a state file only
into such a directory.

Rules: stdlib only; never changes a mode or an owner; never raises for a
path that does not exist (that is a problem like any other).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Collection


def trust_problem(path: str, st: os.stat_result, trusted_uids: Collection[int]) -> str | None:
    """The problem with one file or directory's own owner and mode (``st``), or None."""
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (f"refused: writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}), as sshd's "
                f"StrictModes would refuse it; fix with: chmod go-w {path}")
    if st.st_uid not in trusted_uids:
        owners = " or ".join("root" if u == 0 else f"uid {u}" for u in sorted(trusted_uids))
        return f"refused: owned by uid {st.st_uid}, not {owners}; fix with: chown root {path}"
    return None


def parent_problem(directory: str, trusted_uids: Collection[int]) -> str | None:
    """The first directory above ``directory`` (symlinks resolved) that others could use to swap it."""
    path = os.path.realpath(directory)
    parent = os.path.dirname(path)
    chain: list[str] = []
    while True:
        chain.append(parent)
        if parent == os.path.dirname(parent):
            break
        parent = os.path.dirname(parent)
    for ancestor in reversed(chain):
        try:
            st = os.stat(ancestor)
        except OSError as exc:
            return f"cannot check {ancestor}: {exc.strerror}"
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if writable and not st.st_mode & stat.S_ISVTX:
            return (f"its parent {ancestor} is writable by group or others (mode "
                    f"{stat.S_IMODE(st.st_mode):04o}): anyone could rename it away; fix with: "
                    f"chmod go-w {ancestor}")
        if st.st_uid not in trusted_uids:
            return f"its parent {ancestor} is owned by uid {st.st_uid}; fix with: chown root {ancestor}"
    return None


def default_trusted_uids() -> frozenset[int]:
    return frozenset({0, os.geteuid()})


def directory_problem(directory: str, trusted_uids: Collection[int] | None = None) -> str | None:
    """Is ``directory`` (and every directory above it) ours alone? A sentence saying why not, or None."""
    uids = default_trusted_uids() if trusted_uids is None else trusted_uids
    try:
        st = os.stat(directory)
    except OSError as exc:
        return f"cannot check {directory}: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{directory} is not a directory"
    problem = trust_problem(directory, st, uids)
    if problem:
        return f"{directory} {problem}"
    problem = parent_problem(directory, uids)
    return f"{directory}: {problem}" if problem else None


class UntrustedDirectory(Exception):
    """``write_private`` refused a directory others could use (the sentence of ``directory_problem``)."""


def write_private(
    path: str, data: bytes, *, prefix: str, trusted_uids: Collection[int] | None = None
) -> None:
    """Write ``data`` to ``path`` atomically, mode 0600: its directory made (0700) if missing and
    checked (``UntrustedDirectory``), a temporary file (``prefix``) written, fsynced and renamed
    over it, removed on any failure. ``OSError`` for the rest."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    problem = directory_problem(directory, trusted_uids)
    if problem:
        raise UntrustedDirectory(problem)
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=directory)  # mode 0600, O_EXCL
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
