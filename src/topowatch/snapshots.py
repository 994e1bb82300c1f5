# SPDX-License-Identifier: GPL-2.0-or-later
"""The daemon's snapshots on disk: what ``plan`` and ``flush`` judge an entry's past with.

What this module decides: how the daemon's T0 (the topology and NAT ruleset
its last reaction judged against) and the T0 before it are written to the
state directory, and whether a file found there may be used, and which of
its snapshots is the "previous" one for a judgement now.

Theory of operation: after each reaction that moved T0, the reactor hands a
``Snapshots`` value (current, previous, reaction number) to the
``SnapshotWriter``, a trio task that writes the latest one in a worker
thread (at most one write in flight; a newer value replaces one not yet
written: latest wins). A write is atomic: a temporary file in the same
directory, fsync, rename; mode 0600. ``plan`` and ``flush`` read the file
(``load``) when it is present and trusted, and ``choose`` picks the previous
snapshot: the file's previous one when the state now equals the file's
current one (the daemon reacted to everything: its last judgement is
reproduced), else the file's current one (what the daemon's next reaction
will judge against).

The format is JSON, not pickle: a file in the state directory cannot run
code however it was made. Values are encoded by a closed registry of the
``core`` value types (frozen dataclasses, enums, ``ipaddress`` values,
tuples and frozensets); decoding builds only those, through their own
constructors (which validate), and anything else is refused.

Rules:
- a write failure (EROFS, ENOSPC, an untrusted directory) never touches a
  reaction: it is logged once (and once more when writes work again) and
  counted;
- a file that is not trusted (owner and mode as ``trust`` checks them, also
  of its directory), of another network namespace, of another format
  version, truncated or damaged is not used: one log line says why, never a
  traceback, and the judgement goes on without a previous snapshot;
- this module never decides staleness and never reads the kernel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from types import ModuleType
from typing import Any

import trio

from topowatch.core import flow as core_flow
from topowatch.core import model as core_model
from topowatch.core import nat as core_nat
from topowatch.core import xfrm as core_xfrm
from topowatch.core.model import PolicyRule, RouteList, Topology
from topowatch.core.nat import NatRuleset
from topowatch.errors import TopowatchError
from topowatch.trust import (
    UntrustedDirectory,
    default_trusted_uids,
    directory_problem,
    trust_problem,
    write_private,
)

log = logging.getLogger("topowatch.snapshots")

FORMAT = "topowatch-snapshots"
VERSION = 1
# A file larger than this is not read (a 100k-route table with both snapshots is about 20 MB).
MAX_BYTES = 512 * 1024 * 1024


class SnapshotError(TopowatchError):
    """A snapshot file cannot be written or used (what, and why)."""


# -- the values ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One T0 of the daemon: the state it judged against, since reaction ``reaction`` (at ``taken``)."""

    topology: Topology
    ruleset: NatRuleset
    reaction: int
    taken: float  # time.time() when it became the daemon's T0


@dataclass(frozen=True, slots=True)
class Snapshots:
    """What the file holds: the daemon's T0 and the one before it (None: its last judgement had none,
    as the startup sweep, or no reaction has judged yet)."""

    current: Snapshot
    previous: Snapshot | None
    reaction: int  # the daemon's reaction count when written
    netns: str  # ``edges.sysctl.netns_key`` of the namespace the daemon runs in
    pid: int  # the daemon's: ``plan`` uses the file only while that daemon holds the namespace's lock
    written: float = 0.0


@dataclass(frozen=True, slots=True)
class Choice:
    """The previous snapshot a judgement uses, and why (shown by ``plan``)."""

    previous: Snapshot | None
    source: str  # "daemon", "file" (--previous FILE), "none"
    which: str | None  # "current" or "previous" (of the file), None without one
    why: str
    path: str | None = None

    def json(self, now: float | None = None) -> dict[str, Any]:
        snap = self.previous
        now = time.time() if now is None else now
        return {
            "source": self.source, "file": self.path, "snapshot": self.which, "why": self.why,
            "reaction": snap.reaction if snap else None,
            "taken": round(snap.taken, 3) if snap else None,
            "age_seconds": round(max(0.0, now - snap.taken), 3) if snap else None,
        }  # fmt: skip

    def text(self, now: float | None = None) -> str:
        snap = self.previous
        if snap is None:
            return f"previous snapshot: none ({self.why})"
        now = time.time() if now is None else now
        return (f"previous snapshot: the daemon's {self.which} one, of reaction {snap.reaction}, "
                f"{_age(now - snap.taken)} old ({self.why})")


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def same_topology(a: Topology, b: Topology) -> bool:
    """Equal as the FIB sees them: the daemon's T0 is kept from events, and a dump lists the same
    tables in another order. Routes compare as a set (a lookup orders them by prefix and metric,
    and a snapshot's routes are distinct), rules in priority order, ties in their order
    (``core.fib``: the first of equal priority is tried first)."""
    if a == b:
        return True

    def by_priority(t: Topology) -> list[PolicyRule]:
        return sorted(t.rules, key=lambda r: r.priority)

    return (replace(a, routes=(), rules=()) == replace(b, routes=(), rules=())
            and len(a.routes) == len(b.routes) and set(a.routes) == set(b.routes)
            and by_priority(a) == by_priority(b))  # fmt: skip


def choose(stored: Stored | Snapshots, topology: Topology, ruleset: NatRuleset, *, source: str = "daemon",
           path: str | None = None) -> Choice:  # fmt: skip
    """The previous snapshot for a judgement of the state (``topology``, ``ruleset``) now.

    The state equals the file's current snapshot: the daemon has reacted to
    every change, and its last judgement used the file's previous snapshot
    (None: that judgement had none). Otherwise the daemon's next reaction
    will judge this state against the file's current snapshot.
    ``SnapshotError`` if the snapshot needed cannot be decoded.
    """
    previous: Callable[[], Snapshot | None]
    if isinstance(stored, Snapshots):
        current = stored.current
        previous = functools.partial(getattr, stored, "previous")
    else:
        current, previous = stored.current(), stored.previous
    if same_topology(current.topology, topology) and current.ruleset == ruleset:
        why = "the state is the one the daemon last judged: its judgement's previous snapshot"
        before = previous()
        if before is None:
            return Choice(None, source, None, why + ", none (its first judgement)", path)
        return Choice(before, source, "previous", why, path)
    return Choice(current, source, "current",
                  "the state changed since the daemon's last reaction: its T0, as its next reaction", path)


# -- the codec ---------------------------------------------------------------------------

_MODULES: tuple[tuple[str, ModuleType], ...] = (
    ("model", core_model), ("nat", core_nat), ("xfrm", core_xfrm), ("flow", core_flow))


def _registry() -> tuple[dict[type, str], dict[str, type]]:
    """Every dataclass and enum defined in the core value modules, by tag ("nat.Chain")."""
    by_type: dict[type, str] = {}
    for short, module in _MODULES:
        for name, obj in vars(module).items():
            if not isinstance(obj, type) or obj.__module__ != module.__name__:
                continue
            if dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum):
                by_type[obj] = f"{short}.{name}"
    return by_type, {tag: cls for cls, tag in by_type.items()}


_TAGS, _CLASSES = _registry()
_FIELDS: dict[type, tuple[tuple[str, Any], ...]] = {}
_MISSING = object()


def _fields(cls: type) -> tuple[tuple[str, Any], ...]:
    """(name, default or _MISSING) of a dataclass's init fields, memoised."""
    found = _FIELDS.get(cls)
    if found is None:
        out = []
        for f in dataclasses.fields(cls):
            if not f.init:
                raise SnapshotError(f"{cls.__name__}.{f.name} is not an init field: cannot be stored")
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = _MISSING
            out.append((f.name, default))
        found = _FIELDS[cls] = tuple(out)
    return found


_PLAIN = (bool, int, str, float)


class _Encoder:
    """Values to JSON text. An object met in the last file written (a Route unchanged since, the
    same tuple of routes) is not encoded again: its text is kept, by identity, for one more file.

    The daemon's snapshots share their unchanged values (``LiveTopology``), so a
    reaction to one route of a large table re-encodes that route and the tuple
    holding it, not the table. Used by one thread at a time.
    """

    def __init__(self) -> None:
        self._old: dict[int, tuple[object, str]] = {}
        self._new: dict[int, tuple[object, str]] = {}

    def done(self) -> None:
        """One file is written: keep only what it held."""
        self._old, self._new = self._new, {}

    def encode(self, value: object) -> str:
        if value is None or isinstance(value, bool | str | float):
            return json.dumps(value)
        if type(value) is int:
            return str(value)
        key = id(value)
        hit = self._new.get(key)
        if hit is not None and hit[0] is value:
            return hit[1]
        hit = self._old.get(key)
        if hit is not None and hit[0] is value:
            self._new[key] = hit
            self._carry(value, deep=True)
            return hit[1]
        text = self._encode(value)
        self._new[key] = (value, text)  # the value is kept alive, so its id is not reused meanwhile
        return text

    def _carry(self, value: object, *, deep: bool) -> None:
        """Keep the texts of what a value met again holds, for the next file: the next snapshot
        rebuilds its containers (a new tuple of routes, a new Topology) around the same values.

        Into containers and, with ``deep``, into a value's fields; an element of a container is
        kept alone (its own fields are needed only to encode it, and it is never encoded again
        while it lives). Without this a value held by a container met whole was forgotten after
        one file, and the file after re-encoded every route (0.5-1 s at 10,000 routes)."""
        if isinstance(value, tuple | frozenset):
            children: Iterable[object] = value
        elif isinstance(value, RouteList):
            children = value.chunks
        elif deep and dataclasses.is_dataclass(value) and not isinstance(value, type):
            children = (getattr(value, name) for name, _ in _fields(type(value)))
        else:
            return
        old, new = self._old, self._new
        for child in children:
            if child is None or type(child) in _PLAIN:
                continue
            key = id(child)
            if key in new:
                continue
            hit = old.get(key)
            if hit is not None and hit[0] is child:
                new[key] = hit
                self._carry(child, deep=False)

    def _encode(self, value: object) -> str:
        cls = type(value)
        if isinstance(value, tuple):
            return "[" + ",".join(map(self.encode, value)) + "]"
        if isinstance(value, RouteList):  # a list of its routes; each chunk's text is kept apart
            return "[" + ",".join(t[1:-1] for t in map(self.encode, value.chunks) if t != "[]") + "]"
        if isinstance(value, enum.Enum):
            tag = _TAGS.get(cls)
            if tag is None:
                raise SnapshotError(f"cannot store a {cls.__name__}")
            return f'{{"e":"{tag}","v":{self.encode(value.value)}}}'
        if cls in (IPv4Address, IPv6Address):
            return f'{{"a":{json.dumps(str(value))}}}'
        if cls in (IPv4Network, IPv6Network):
            return f'{{"n":{json.dumps(str(value))}}}'
        if isinstance(value, frozenset):
            return '{"fs":[' + ",".join(sorted(map(self.encode, value))) + "]}"
        tag = _TAGS.get(cls)
        if tag is None or isinstance(value, type) or not dataclasses.is_dataclass(value):
            raise SnapshotError(f"cannot store a {cls.__name__}")
        parts = [f'"@":"{tag}"']
        for name, default in _fields(cls):
            v = getattr(value, name)
            if default is not _MISSING and type(v) is type(default) and v == default:
                continue
            parts.append(f'"{name}":{self.encode(v)}')
        return "{" + ",".join(parts) + "}"


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _decode_object(obj: dict[str, Any]) -> Any:
    """json's object_hook: one tagged object (its members already decoded, lists not yet tuples)."""
    if "@" in obj:
        cls = _CLASSES.get(obj.pop("@"))
        if cls is None or not dataclasses.is_dataclass(cls):
            raise ValueError("unknown value type")
        names = {name for name, _ in _fields(cls)}
        if not obj.keys() <= names:
            raise ValueError(f"{cls.__name__}: unknown fields {sorted(obj.keys() - names)}")
        return cls(**{k: _tuples(v) for k, v in obj.items()})
    if "a" in obj:
        return (IPv4Address if ":" not in obj["a"] else IPv6Address)(obj["a"])
    if "n" in obj:
        return (IPv4Network if ":" not in obj["n"] else IPv6Network)(obj["n"])
    if "fs" in obj:
        return frozenset(_tuples(obj["fs"]))
    if "e" in obj:
        cls = _CLASSES.get(obj["e"])
        if cls is None or not issubclass(cls, enum.Enum):
            raise ValueError("unknown enum")
        return cls(obj["v"])
    return obj  # the file's own structure (plain keys)


def _snapshot_json(enc: _Encoder, snap: Snapshot) -> str:
    return (f'{{"reaction":{snap.reaction},"taken":{snap.taken!r},"topology":{enc.encode(snap.topology)},'
            f'"ruleset":{enc.encode(snap.ruleset)}}}')


def encode(snaps: Snapshots, encoder: _Encoder | None = None) -> bytes:
    """The file: a header line (format, version, namespace, reaction, time), a line with the
    current snapshot, a line with the previous one (``null`` for none)."""
    enc = encoder or _Encoder()
    head = {"format": FORMAT, "version": VERSION, "netns": snaps.netns, "pid": snaps.pid,
            "reaction": snaps.reaction, "written": snaps.written or time.time()}  # fmt: skip
    lines = [json.dumps(head, separators=(",", ":")), _snapshot_json(enc, snaps.current),
             "null" if snaps.previous is None else _snapshot_json(enc, snaps.previous)]  # fmt: skip
    enc.done()
    return "\n".join(lines).encode()


def _snapshot(line: bytes) -> Snapshot | None:
    doc = json.loads(line, object_hook=_decode_object)
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise TypeError("a snapshot is not an object")
    topology, ruleset = doc["topology"], doc["ruleset"]
    if not isinstance(topology, Topology) or not isinstance(ruleset, NatRuleset):
        raise TypeError("a snapshot without a topology and a ruleset")
    return Snapshot(topology, ruleset, int(doc["reaction"]), float(doc["taken"]))


@contextlib.contextmanager
def _damaged() -> Iterator[None]:
    try:
        yield
    except SnapshotError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise SnapshotError(f"damaged or truncated ({type(exc).__name__}: {exc})") from exc


class Stored:
    """A file read and checked (header: format, version, namespace); its snapshots decoded when
    asked for (a large table's snapshot takes seconds, and a judgement often needs one)."""

    def __init__(self, data: bytes, netns: str | None = None) -> None:
        lines = data.split(b"\n")
        with _damaged():
            head = json.loads(lines[0])
            if not isinstance(head, dict):
                raise TypeError("the header is not an object")
            if head.get("format") != FORMAT or head.get("version") != VERSION:
                raise SnapshotError(f"format {head.get('format')!r} version {head.get('version')!r}, "
                                    f"not {FORMAT!r} version {VERSION}")
            if netns is not None and head.get("netns") != netns:
                raise SnapshotError(f"of another network namespace ({head.get('netns')}; this one is "
                                    f"{netns})")
            if len(lines) != 3:
                raise ValueError(f"{len(lines)} lines, not 3")
            self.netns = str(head["netns"])
            self.pid = int(head["pid"])
            self.reaction = int(head["reaction"])
            self.written = float(head["written"])
        self._lines = lines[1:]
        self._decoded: dict[int, Snapshot | None] = {}

    def _line(self, i: int) -> Snapshot | None:
        if i not in self._decoded:
            with _damaged():
                self._decoded[i] = _snapshot(self._lines[i])
        return self._decoded[i]

    def current(self) -> Snapshot:
        snap = self._line(0)
        if snap is None:
            raise SnapshotError("damaged: no current snapshot")
        return snap

    def previous(self) -> Snapshot | None:
        return self._line(1)

    def snapshots(self) -> Snapshots:
        return Snapshots(self.current(), self.previous(), self.reaction, self.netns, self.pid, self.written)


def decode(data: bytes, netns: str | None = None) -> Snapshots:
    """The file's contents, or ``SnapshotError`` saying what is wrong (never another exception).

    The header is checked first (format, version and, given ``netns``, the
    namespace): a file of another version or namespace is never decoded.
    """
    return Stored(data, netns).snapshots()


# -- the file --------------------------------------------------------------------------


def snapshot_path(state_dir: str, netns: str) -> str:
    return os.path.join(state_dir, f"snapshots-{netns}.json")


def write(path: str, snaps: Snapshots, *, trusted_uids: Collection[int] | None = None,
          encoder: _Encoder | None = None) -> int:  # fmt: skip
    """Write ``snaps`` to ``path`` atomically (mode 0600); the bytes written. ``SnapshotError`` on failure.

    ``encoder``: one kept from the last write (the daemon's), which re-encodes only what changed.
    """
    data = encode(snaps, encoder)
    try:
        write_private(path, data, prefix=".snapshots-", trusted_uids=trusted_uids)
    except UntrustedDirectory as exc:
        raise SnapshotError(f"will not write {path}: {exc}") from exc
    except OSError as exc:
        raise SnapshotError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return len(data)


def remove(path: str) -> None:
    """Remove a file a previous run left (its T0 is not this daemon's); ``SnapshotError`` on failure."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise SnapshotError(f"cannot remove {path}: {exc.strerror or exc}") from exc


def load(path: str, netns: str, *, trusted_uids: Collection[int] | None = None) -> Stored:
    """The snapshots in ``path``, if it is trusted and of namespace ``netns``; else ``SnapshotError``
    (``FileNotFoundError`` when there is no file). The trust checks come before any byte is parsed."""
    uids = default_trusted_uids() if trusted_uids is None else trusted_uids
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise SnapshotError(f"cannot open it ({exc.strerror or exc}; a symlink is never followed)") from exc
    with os.fdopen(fd, "rb") as f:
        try:
            st = os.fstat(f.fileno())
        except OSError as exc:
            raise SnapshotError(f"cannot stat it ({exc.strerror or exc})") from exc
        problem = None if stat.S_ISREG(st.st_mode) else "not a regular file"
        problem = problem or trust_problem(path, st, uids)
        problem = problem or directory_problem(os.path.dirname(os.path.abspath(path)), uids)
        if problem:
            raise SnapshotError(f"not trusted: {problem}")
        if st.st_size > MAX_BYTES:
            raise SnapshotError(f"larger than {MAX_BYTES} bytes")
        try:
            data = f.read(MAX_BYTES + 1)
        except OSError as exc:
            raise SnapshotError(f"cannot read it ({exc.strerror or exc})") from exc
    return Stored(data, netns)


# -- the daemon's writer -----------------------------------------------------------------


# A write waits for T0 to stay put this long (seconds), and at most ``WRITE_LATEST`` after the
# first snapshot it would write.
WRITE_QUIET = 1.0
WRITE_LATEST = 10.0
BUSY_POLL = 0.05  # seconds between looks at a reaction that runs, while a write waits for its end


class SnapshotWriter:
    """The daemon's side: ``submit`` the latest snapshots (from the trio thread); ``run`` writes them.

    ``submit(None)`` removes the file (the daemon has no T0 worth keeping: a
    file a previous run left must not pass for this one's). Failures are
    counted with ``count`` and logged at the first failure and at the first
    success after failures; the reactions never wait for a write.
    """

    def __init__(
        self, path: str, netns: str, *, count: Callable[[], None] | None = None,
        write_fn: Callable[[str, Snapshots], int] | None = None, pid: int | None = None,
        quiet: float = WRITE_QUIET, latest: float = WRITE_LATEST,
    ) -> None:
        self.path = path
        self.quiet, self.latest = quiet, latest
        # True while the daemon reacts: a write waits (its encoding would hold the GIL beside the
        # reaction's re-check and delete, stretching the window between them).
        self.busy: Callable[[], bool] = lambda: False
        self.netns = netns
        self.pid = os.getpid() if pid is None else pid
        self._last: Snapshot | None = None
        self.count = count
        self.failures = 0
        self.writes = 0
        self.last_seconds = 0.0
        self.last_bytes = 0
        self._write = write_fn or functools.partial(write, encoder=_Encoder())
        self._pending: tuple[Snapshots | None] | None = None
        self._wake = trio.Event()
        self._failing = False

    @classmethod
    def for_namespace(cls, state_dir: str, *, count: Callable[[], None] | None = None) -> SnapshotWriter:
        from topowatch.edges.sysctl import netns_key

        netns = netns_key()
        return cls(snapshot_path(state_dir, netns), netns, count=count)

    def t0_moved(self, topology: Topology, ruleset: NatRuleset | None, reaction: int,
                 judged_with_previous: bool) -> None:  # fmt: skip
        """The reactor's word: T0 is now (``topology``, ``ruleset``) after reaction ``reaction``
        (0: at start); its previous one is the T0 told before, unless that reaction judged with
        none (the startup sweep). A None ruleset (none read yet) removes the file."""
        if ruleset is None:
            self._last = None
            self.submit(None)
            return
        now = time.time()
        current = Snapshot(topology, ruleset, reaction, now)
        previous = self._last if judged_with_previous else None
        self._last = current
        self.submit(Snapshots(current, previous, reaction, self.netns, self.pid, now))

    def submit(self, snaps: Snapshots | None) -> None:
        self._pending = (snaps,)  # latest wins: an older value not yet written is dropped
        self._wake.set()

    def _one(self, snaps: Snapshots | None) -> None:
        """In a worker thread: one write (or removal)."""
        start = time.monotonic()
        if snaps is None:
            remove(self.path)
        else:
            self.last_bytes = self._write(self.path, snaps)
        self.last_seconds = time.monotonic() - start

    async def flush(self) -> None:
        """Write what is pending now (in a worker thread), once."""
        if self._pending is None:
            return
        (snaps,), self._pending = self._pending, None
        try:
            await trio.to_thread.run_sync(self._one, snaps)
        except (SnapshotError, OSError) as exc:
            self.failures += 1
            if self.count is not None:
                self.count()
            if not self._failing:
                self._failing = True
                log.error("cannot keep the daemon's snapshots for plan and flush: %s; reactions go on "
                          "(said once; counted)", exc)
            return
        self.writes += 1
        if self._failing:
            self._failing = False
            log.warning("the daemon's snapshots are written again (%s) after %d failures",
                        self.path, self.failures)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write the latest snapshots once T0 has stayed put for ``quiet`` seconds, or ``latest``
        seconds after the first unwritten one (an event storm writes a few times, not once per
        reaction: an encode costs 25-30 ms of CPU at 10k routes). A file that lags costs nothing
        worse than an undecided answer: a previous snapshot only ever turns an entry that some
        way in admits from undecided into healthy, never into stale (``core.decide``)."""
        task_status.started()
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                deadline = trio.current_time() + self.latest
                while trio.current_time() < deadline:
                    with trio.move_on_after(min(self.quiet, deadline - trio.current_time())):
                        await self._wake.wait()
                        self._wake = trio.Event()
                        continue  # a newer T0 came: wait for quiet again
                    break
                while self.busy():  # a reaction runs: after it (its own T0 may replace this one)
                    await trio.sleep(BUSY_POLL)
                await self.flush()
        finally:
            # The daemon stops: its snapshots say nothing of what changes next (``plan`` would
            # refuse them anyway, no daemon holding the namespace's lock); none is left behind.
            if self.writes:
                with contextlib.suppress(SnapshotError):
                    remove(self.path)
