# SPDX-License-Identifier: GPL-2.0-or-later
"""An in-memory conntrack table with the ``Conntrack`` interface, for tests.

It applies the kernel's semantics that callers depend on: a dump filters by
status (UNREPLIED), zone, mark and family; a delete finds its entry by the
given tuple in either direction within the zone, misses (ENOENT) when the
dumped id no longer matches, and a create refuses (EEXIST) a tuple already in
the table. It counts the netlink requests the real edge would send (one per
dump attempt, one per batch; ``delete_current`` one re-read and one delete
per batch), so a test can assert that a million deletes cost a handful of
requests. ``update`` changes an entry in place (a reply arrived, its timer
was refreshed), as packets would between a dump and a delete.

It never touches a socket; ``interrupt_next`` makes the next dumps report
``NLM_F_DUMP_INTR`` so retry and ``DumpInterrupted`` paths can be tested.
"""

from __future__ import annotations

import errno as errno_mod
import itertools
from collections.abc import Callable, Iterable
from ipaddress import ip_address

from topowatch.core.conntrack import IPS_ASSURED, IPS_CONFIRMED, IPS_SEEN_REPLY, CtTuple, Entry, Reread
from topowatch.edges.ctcodec import CTA_STATS_NAMES, AddressCache
from topowatch.edges.ctnetlink import (
    DUMP_RETRIES,
    MAX_BATCH,
    RECHECK_BATCH,
    DeleteResult,
    DumpConsumerT,
    DumpStats,
)
from topowatch.errors import DumpInterrupted, NetlinkError

_Key = tuple[int, int, int, CtTuple]  # zone, family, proto, tuple


def _keys(e: Entry) -> tuple[_Key, _Key]:
    return (e.zone, e.family, e.proto, e.orig), (e.zone, e.family, e.proto, e.reply)


class FakeConntrack:
    """A conntrack table in a dict; same methods and counters as ``Conntrack``."""

    def __init__(self, entries: Iterable[Entry] = (), *, status_filter_supported: bool = True) -> None:
        self._by_tuple: dict[_Key, Entry] = {}
        self._ids = itertools.count(1)
        self.status_filter_supported: bool | None = status_filter_supported
        self.batch_max = MAX_BATCH
        self.recheck_batch = RECHECK_BATCH
        self.dump_retries = DUMP_RETRIES
        self.interrupt_next = 0
        self.requests = 0
        self.messages = 0  # delete and create messages, one per entry
        self.decode_errors = 0
        self.last_dump: DumpStats | None = None
        self.closed = False
        self.cache = AddressCache()
        self.counters: dict[str, int] = {}  # what ``stats`` reports (drop, early_drop, ...)
        if entries:
            self.create(entries)
            self.requests = self.messages = 0

    @property
    def table(self) -> list[Entry]:
        """Every entry, each once, in insertion order."""
        seen: dict[int, Entry] = {}
        for e in self._by_tuple.values():
            seen.setdefault(e.id, e)
        return list(seen.values())

    def _batches(self, n: int) -> int:
        return -(-n // self.batch_max)

    def dump(
        self,
        *,
        unreplied_only: bool = True,
        zone: int | None = None,
        mark: int | None = None,
        family: int = 0,
    ) -> list[Entry]:
        retries = 0
        while True:
            self.requests += 1
            if not self.interrupt_next:
                break
            self.interrupt_next -= 1
            if retries == self.dump_retries:
                raise DumpInterrupted("fake dump interrupted", errno_mod.EINTR)
            retries += 1
        entries = [
            e
            for e in self.table
            if (not unreplied_only or not e.status & IPS_SEEN_REPLY)
            and (zone is None or e.zone == zone)
            and (mark is None or e.mark == mark)
            and (not family or e.family == family)
        ]
        self.last_dump = DumpStats(
            entries=len(entries),
            messages=len(entries),
            kernel_status_filter=unreplied_only and bool(self.status_filter_supported),
            interrupted_retries=retries,
        )
        return entries

    def scan(self, start: Callable[[], DumpConsumerT], *, unreplied_only: bool = True) -> DumpConsumerT:
        """``dump`` streamed into a fresh consumer (each entry through ``add``), as the real edge does."""
        consumer = start()
        for entry in self.dump(unreplied_only=unreplied_only):
            consumer.add(entry)
        return consumer

    def stats(self) -> dict[str, int]:
        """The kernel counters a test sets in ``counters`` (every name present, as the real edge gives)."""
        self.requests += 1
        return {name: self.counters.get(name, 0) for name in CTA_STATS_NAMES.values()}

    def delete(self, entries: Iterable[Entry]) -> DeleteResult:
        requested = deleted = not_found = 0
        for e in entries:
            requested += 1
            found = self._by_tuple.get((e.zone, e.family, e.proto, e.orig))
            if found is None or (e.id and found.id != e.id):
                not_found += 1
                continue
            for key in _keys(found):
                self._by_tuple.pop(key, None)
            deleted += 1
        batches = self._batches(requested)
        self.requests += batches
        self.messages += requested
        return DeleteResult(requested=requested, deleted=deleted, not_found=not_found, batches=batches)

    def delete_current(
        self, entries: Iterable[Entry], still: Callable[[Entry, Reread], bool] | None = None
    ) -> DeleteResult:
        """``Conntrack.delete_current``: re-read each entry, delete only what is still the one judged."""
        requested = deleted = not_found = kept_replied = kept_changed = batches = 0
        pending = list(entries)
        for start in range(0, len(pending), self.recheck_batch):
            chunk = pending[start : start + self.recheck_batch]
            self.requests += 1
            victims = []
            for e in chunk:
                found = self._by_tuple.get((e.zone, e.family, e.proto, e.orig))
                if found is None or (e.id and found.id != e.id):
                    not_found += 1
                    continue
                now = Reread(found.status, found.id, found.mark, found.timeout)
                if still is not None and not still(e, now):
                    if now.replied_since(e):
                        kept_replied += 1
                    else:
                        kept_changed += 1
                    continue
                victims.append(found)
            if victims:
                result = self.delete(victims)
                requested += result.requested
                deleted += result.deleted
                not_found += result.not_found
                batches += 1
        return DeleteResult(requested=requested, deleted=deleted, not_found=not_found, batches=batches,
                            kept_replied=kept_replied, kept_changed=kept_changed)

    def update(self, entry: Entry) -> None:
        """The entry with ``entry``'s orig tuple (and zone) takes its status, mark and timeout; id kept."""
        found = self._by_tuple.get((entry.zone, entry.family, entry.proto, entry.orig))
        if found is None:
            raise NetlinkError("no such entry", errno_mod.ENOENT)
        stored = Entry(found.family, found.proto, found.orig, found.reply, entry.status | IPS_CONFIRMED,
                       found.zone, entry.mark, found.id, entry.timeout or found.timeout)
        for key in _keys(found):
            self._by_tuple[key] = stored

    def create(self, entries: Iterable[Entry]) -> int:
        created = refused = n = 0
        for e in entries:
            n += 1
            orig_key, reply_key = _keys(e)
            if orig_key in self._by_tuple or reply_key in self._by_tuple:
                refused += 1
                continue
            stored = Entry(
                e.family,
                e.proto,
                e.orig,
                e.reply,
                e.status | IPS_CONFIRMED,
                e.zone,
                e.mark,
                e.id or next(self._ids),
                e.timeout or 120,
            )
            self._by_tuple[orig_key] = self._by_tuple[reply_key] = stored
            created += 1
        self.requests += self._batches(n)
        self.messages += n
        if refused:
            raise NetlinkError(f"created {created}; refused: EEXIST x{refused}", errno_mod.EEXIST)
        return created

    def close(self) -> None:
        self.closed = True


_TUPLE_KEYS = frozenset({"src", "dst", "sport", "dport", "type", "code", "id", "srckey", "dstkey"})
_FAMILIES = {"ipv4": 2, "ipv6": 10}


def parse_conntrack_listing(text: str) -> list[Entry]:
    """Entries from ``conntrack -L -o extended,id`` output: the oracle tests compare against.

    The listing shows only the UNREPLIED and ASSURED status bits; the entries
    carry those (plus IPS_CONFIRMED), so compare status through
    ``Entry.unreplied`` and ``Entry.assured`` only.
    """
    out: list[Entry] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 5 or words[0] not in _FAMILIES:
            continue
        family, proto, timeout = _FAMILIES[words[0]], int(words[3]), int(words[4])
        tuples: list[dict[str, str]] = []
        meta: dict[str, str] = {}
        flags: set[str] = set()
        for word in words[5:]:
            if word.startswith("["):
                flags.add(word.strip("[]"))
                continue
            key, sep, value = word.partition("=")
            if not sep:
                continue  # a TCP state name
            if key == "src" and len(tuples) < 2 and not meta:
                tuples.append({})
            if key in _TUPLE_KEYS and tuples and not meta and key not in tuples[-1]:
                tuples[-1][key] = value
            else:
                meta[key] = value

        def ctuple(t: dict[str, str]) -> CtTuple:
            if "type" in t:
                sport, dport = int(t["id"]), int(t["type"]) << 8 | int(t["code"])
            elif "srckey" in t:
                sport, dport = int(t["srckey"], 16), int(t["dstkey"], 16)
            else:
                sport, dport = int(t.get("sport", 0)), int(t.get("dport", 0))
            return CtTuple(ip_address(t["src"]), ip_address(t["dst"]), sport, dport)

        status = IPS_CONFIRMED
        if "UNREPLIED" not in flags:
            status |= IPS_SEEN_REPLY
        if "ASSURED" in flags:
            status |= IPS_ASSURED
        out.append(
            Entry(
                family,
                proto,
                ctuple(tuples[0]),
                ctuple(tuples[1]),
                status,
                int(meta.get("zone", 0)),
                int(meta.get("mark", 0)),
                int(meta.get("id", 0)),
                timeout,
            )
        )
    return out
