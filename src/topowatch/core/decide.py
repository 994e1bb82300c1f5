# SPDX-License-Identifier: GPL-2.0-or-later
"""Decide which conntrack entries are stale: the heart of topowatch.

Theory of operation: an entry records the NAT its first packet got. For each
eligible entry we ask the evaluator which bindings the flow would get *now*
(topology T1, current ruleset) and compare them with the entry's actual
bindings, read from its tuples:

- prediction known, actual outside every predicted binding: **stale**;
- prediction known, actual admitted by one of them: healthy, left alone;
- prediction unknown (a rule or route we do not model): stale only if the
  flow's egress (route, oif, masquerade source) differs between T0 and T1,
  which needs the previous snapshot; otherwise **undecided**, never deleted;
- the flow would be dropped now: nothing to fix on that side.

A side whose NAT hook never ran (no ``*_NAT_DONE`` bit: the entry predates
every NAT chain of its family, and the kernel never NATs a confirmed entry
later) is a null binding, judged like any other (``Entry.actual_snat``).

Entries sharing a flow are decided once. Every stale or undecided entry
carries a reason a person can read. This module never performs I/O and never
deletes anything: it returns a ``FlushPlan``.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from topowatch.core.classify import Classifier
from topowatch.core.conntrack import ICMP_PROTOS, IPS_SEEN_REPLY, Entry
from topowatch.core.eligibility import DEFAULT_ELIGIBILITY, Eligibility
from topowatch.core.fib import Fib
from topowatch.core.flow import Binding, Egress, Flow, NatKind, Prediction, Unknown
from topowatch.core.model import IPAddress

Predictor = Callable[[Fib, Flow], Prediction]

# Prediction slots kept per flow key (no exact classifier) before they are all dropped: with
# a million distinct flows the memory stays bounded (classes need no such limit: their number
# follows the configuration, not the traffic).
FLOW_CACHE_LIMIT = 65_536


class ReasonCode(enum.StrEnum):
    """Why an entry is stale or undecided, as a word a program can count (``Decision.code``)."""

    NULL_BINDING_NOW_NAT = "null_binding_now_nat"  # no NAT on that side, now it would be NATed
    NAT_NOW_NONE = "nat_now_none"  # NATed, now that side would not be
    SNAT_CHANGED = "snat_changed"  # source NATed to another address or port range now
    DNAT_CHANGED = "dnat_changed"  # destination NATed elsewhere now
    EGRESS_CHANGED_UNKNOWN_NAT = "egress_changed_unknown_nat"  # NAT unpredictable, egress moved
    UNKNOWN_NAT = "unknown_nat"  # undecided: NAT unpredictable, no previous snapshot to compare
    UNKNOWN_NAT_UNKNOWN_EGRESS = "unknown_nat_unknown_egress"  # undecided: egress unpredictable too


def _stale_code(side: str, actual: Binding, expected: Iterable[Binding]) -> ReasonCode:
    if actual.kind is NatKind.NONE:
        return ReasonCode.NULL_BINDING_NOW_NAT
    if all(b.kind is NatKind.NONE for b in expected):
        return ReasonCode.NAT_NOW_NONE
    return ReasonCode.SNAT_CHANGED if side == "snat" else ReasonCode.DNAT_CHANGED


@dataclass(frozen=True, slots=True)
class Decision:
    """One entry's verdict: which side (``snat``/``dnat``), why (text) and why (``ReasonCode``)."""

    entry: Entry
    side: str
    actual: Binding | None
    expected: tuple[Binding, ...]
    reason: str
    code: str = ""


@dataclass(frozen=True, slots=True)
class FlushPlan:
    """What to delete and what could not be decided; a value, shown by plan, flush and logs alike."""

    examined: int
    eligible: int
    stale: tuple[Decision, ...] = ()
    undecided: tuple[Decision, ...] = ()
    distinct_flows: int = 0  # prediction slots: flow classes, or flow keys without classes
    notes: tuple[str, ...] = field(default=())
    predicted: int = 0  # predictions made (a class's, or a flow key's, each time its slot was empty)


@dataclass(frozen=True, slots=True)
class _Judgement:
    side: str
    stale: bool
    undecided: bool
    actual: Binding | None
    expected: tuple[Binding, ...]
    reason: str
    code: str = ""


def _egress_text(egress: tuple[Egress, ...] | Unknown) -> str:
    if isinstance(egress, Unknown):
        return f"unknown ({egress.reason})"
    if not egress:
        return "none"
    return " or ".join(e.describe() for e in egress)


def _egress_sources(egress: tuple[Egress, ...]) -> str:
    # Called only where both egresses describe alike but differ, so neither is empty.
    return " or ".join(f"{e.describe()} (masquerade source {e.masquerade_source})" for e in egress)


def _egress_key(egress: tuple[Egress, ...]) -> frozenset[tuple[object, ...]]:
    return frozenset((e.kind, e.oif, e.gateway, e.masquerade_source, e.xfrm) for e in egress)


def _side(
    entry: Entry,
    side: str,
    predicted: frozenset[Binding] | Unknown,
    prediction: Prediction,
    before: Prediction | None,
    *,
    texts: dict[str, tuple[str, tuple[Binding, ...], str]] | None = None,
) -> _Judgement | None:
    """Judge one side of an entry; ``texts`` caches what depends on the prediction alone."""
    if side == "snat":
        actual = entry.actual_snat()
        original, translated = entry.orig.src, entry.reply.dst
        original_port, translated_port = entry.orig.sport, entry.reply.dport
        what = "source"
    else:
        actual = entry.actual_dnat()
        original, translated = entry.orig.dst, entry.reply.src
        original_port, translated_port = entry.orig.dport, entry.reply.sport
        what = "destination"
    if actual is None:
        return None  # no NAT hook ran, yet the tuples differ (made by hand): nothing to judge
    if entry.proto in ICMP_PROTOS:
        translated_port = original_port
    if isinstance(predicted, Unknown):
        now = _egress_text(prediction.egress)
        if before is None:
            return _Judgement(
                side, False, True, actual, (),
                f"{what} NAT cannot be predicted: {predicted.reason}", ReasonCode.UNKNOWN_NAT,
            )
        if isinstance(before.egress, Unknown) or isinstance(prediction.egress, Unknown):
            return _Judgement(
                side, False, True, actual, (),
                f"{what} NAT cannot be predicted ({predicted.reason}) and the egress is unknown",
                ReasonCode.UNKNOWN_NAT_UNKNOWN_EGRESS,
            )
        if _egress_key(before.egress) != _egress_key(prediction.egress):
            was = _egress_text(before.egress)
            if was == now:  # the same route, another address on it (a PPP reconnect): name the addresses
                was, now = _egress_sources(before.egress), _egress_sources(prediction.egress)
            return _Judgement(
                side, True, False, actual, (),
                f"{what} NAT cannot be predicted ({predicted.reason}), but the flow's egress changed "
                f"from {was} to {now}", ReasonCode.EGRESS_CHANGED_UNKNOWN_NAT,
            )
        return None  # egress unchanged: nothing says the entry went stale
    if not predicted:
        return None  # the flow would be dropped now: nothing to re-NAT
    dnat_side = side == "dnat"
    if any(b.admits(original, translated, original_port, translated_port, dnat_side=dnat_side)
           for b in predicted):  # fmt: skip
        return None
    cached = texts.get(side) if texts is not None else None
    if cached is None:
        expected = tuple(sorted(predicted, key=lambda b: (b.kind.value, str(b.addr_lo), b.port_lo or 0)))
        rules = f"; by {'; '.join(prediction.explain)}" if prediction.explain else ""
        tail = (
            f"{' or '.join(b.describe() for b in expected)} "
            f"(egress {_egress_text(prediction.egress)}{rules})"
        )
        cached = (what, expected, tail)
        if texts is not None:
            texts[side] = cached
    return _Judgement(
        side, True, False, actual, cached[1],
        f"{what} is {_translation(original, translated, actual)}, but now it would be {cached[2]}",
        _stale_code(side, actual, cached[1]),
    )


def _translation(original: IPAddress, translated: IPAddress, actual: Binding) -> str:
    if original == translated and actual.ports is None:
        return f"{original} (no NAT)"
    return f"{actual.describe()} ({original} -> {translated})"


_ADDRESS_TYPES = (IPv4Address, IPv6Address, IPv4Network, IPv6Network)


def mentions_sport(value: object, _depth: int = 0) -> bool:
    """True if a ruleset or policy value could read the source port anywhere.

    Conservative by construction: it walks every field of the value and
    answers True for any field, enum or text that names a source port
    (``sport``, ``--sport``, ``--sports``). When it is False, entries that
    differ only in their source port get the same prediction.
    """
    if _depth > 64:
        return True
    if isinstance(value, str):
        return "sport" in value
    if isinstance(value, enum.Enum):
        return "sport" in str(value.value).lower() or "sport" in value.name.lower()
    if isinstance(value, (int, float, bool, bytes, *_ADDRESS_TYPES)) or value is None:
        return False
    if isinstance(value, dict):
        return any(
            mentions_sport(k, _depth + 1) or mentions_sport(v, _depth + 1) for k, v in value.items()
        )
    if isinstance(value, (tuple, list, frozenset, set)):
        return any(mentions_sport(v, _depth + 1) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if "sport" in f.name and item not in (None, 0, (), frozenset()):
                return True
            if mentions_sport(item, _depth + 1):
                return True
        return False
    # An object we cannot look into: assume the worst.
    return True


# How one side of a prediction admits an entry, precompiled: None when the side
# is unknown; () when the flow would be dropped; else (lo, hi, port_lo, port_hi,
# kept) per binding, lo/hi None for "address kept", kept True where the port must
# be the original one (a destination binding without a port range).
_Range = tuple[int | None, int | None, int | None, int | None, bool]
_Check = tuple[_Range, ...] | None


def _compile(side: frozenset[Binding] | Unknown, *, dnat_side: bool = False) -> _Check:
    if isinstance(side, Unknown):
        return None
    return tuple(
        (
            None if b.addr_lo is None else int(b.addr_lo),
            None if b.addr_hi is None else int(b.addr_hi),
            b.port_lo,
            b.port_hi,
            dnat_side and b.ports is None,
        )
        for b in side
    )


def _admitted(check: _Check, original: int, translated: int, original_port: int, port: int) -> bool:
    # The rule is core/admission.py's; tests/core/test_admission.py runs this over its cases.
    assert check is not None
    for lo, hi, port_lo, port_hi, kept in check:
        if lo is None or hi is None:
            if translated != original:
                continue
        elif not lo <= translated <= hi:
            continue
        if port_lo is not None and port_hi is not None:
            if not port_lo <= port <= port_hi:
                continue
        elif kept and port != original_port:
            continue
        return True
    return False


@dataclass(slots=True)
class _Compiled:
    prediction: Prediction
    dnat: _Check
    snat: _Check
    # Reason texts that depend on the prediction alone, by side (filled by ``_side``).
    texts: dict[str, tuple[str, tuple[Binding, ...], str]] = field(default_factory=dict)
    # The judgement of a side whose actual binding is "no NAT", by side, where
    # it is the same for every entry of the flow key (see ``Decider._side``).
    unnated: dict[str, _Judgement | None] = field(default_factory=dict)

    # Sides whose check is known and has no port range (see ``Decider._side``).
    portless: frozenset[str] = frozenset()

    @classmethod
    def of(cls, prediction: Prediction) -> _Compiled:
        dnat, snat = _compile(prediction.dnat, dnat_side=True), _compile(prediction.snat)
        portless = frozenset(
            side
            for side, check in (("dnat", dnat), ("snat", snat))
            if check is not None and all(port_lo is None for _, _, port_lo, _, _ in check)
        )
        return cls(prediction, dnat, snat, portless=portless)


def _healthy(entry: Entry, compiled: _Compiled) -> bool:
    """True when the entry is certainly left alone: every side known and admitted.

    A side whose NAT hook never ran is read from its tuples like any other
    (kept tuples: a null binding; see ``Entry.actual_snat``).
    """
    orig, reply = entry.orig, entry.reply
    check = compiled.dnat
    if check is None:
        return False
    if check:
        port = orig.dport if entry.proto in ICMP_PROTOS else reply.sport
        if reply.src.version != orig.dst.version or not _admitted(
            check, int(orig.dst), int(reply.src), orig.dport, port
        ):
            return False
    check = compiled.snat
    if check is None:
        return False
    if check:
        port = orig.sport if entry.proto in ICMP_PROTOS else reply.dport
        if reply.dst.version != orig.src.version or not _admitted(
            check, int(orig.src), int(reply.dst), orig.sport, port
        ):
            return False
    return True


# --- raw entries: the bulk path ------------------------------------------------------
#
# A dump edge may hand entries over as plain tuples instead of ``Entry``
# values (building a million frozen objects costs more than judging them).
# A raw entry is, in this order: family, proto, orig src, orig dst, orig
# sport, orig dport, reply src, reply dst, reply sport, reply dport, status,
# zone, mark, id, timeout; addresses are packed bytes (4 or 16, both tuples
# of the family), ports and ICMP fields follow ``CtTuple``'s convention.
# ``Decider.add_raw`` judges a raw entry from a cache keyed by its flow key
# (packed) and its SEEN_REPLY bit: the first entry of a key is built into an
# ``Entry`` and goes through eligibility and the predictor like any other;
# later ones of the same key are judged healthy on the raw values by the same
# precompiled checks as ``_healthy``, and anything not certainly healthy is
# built and judged by the reasoned path. Sound because ``Eligibility.admits``
# reads only family, proto, status SEEN_REPLY, zone, mark and the orig
# addresses (a test pins its fields), and a prediction only the flow's
# fields (its sport only when ``sport_matters``, then part of the key).

RawEntry = tuple[int, int, bytes, bytes, int, int, bytes, bytes, int, int, int, int, int, int, int]
EntryBuilder = Callable[[RawEntry], Entry]

# Raw-cache value of an entry that the eligibility refuses.
_REFUSED: tuple[_Check, _Check] = (None, None)
# Raw-cache value of a class left alone (outside ``Decider.only``): every side "no binding", healthy.
_LEFT: tuple[_Check, _Check] = ((), ())


def _admitted_raw(check: _Check, original: bytes, translated: bytes, original_port: int, port: int) -> bool:
    """``_admitted`` over packed addresses (converted only where a range needs it)."""
    assert check is not None
    value = -1
    for lo, hi, port_lo, port_hi, kept in check:
        if lo is None or hi is None:
            if translated != original:
                continue
        else:
            if value < 0:
                value = int.from_bytes(translated, "big")
            if not lo <= value <= hi:
                continue
        if port_lo is not None and port_hi is not None:
            if not port_lo <= port <= port_hi:
                continue
        elif kept and port != original_port:
            continue
        return True
    return False


# A raw key's checks as bytes, for a compiled scan (``edges/_ctscan.c``) to settle
# entries of known keys without calling back: b"R" for a key the eligibility refuses;
# else b"P", then the DNAT side, then the SNAT side, each a mode byte (0 unknown: always
# judged; 1 no binding: never judged; 2 bindings, whether the side's NAT ran or not), and for mode 2
# a count byte and per binding 37 bytes: flags (1 address range, 2 port range, 4 the
# port must be the original one), lo and
# hi as 16-byte big-endian integers, port lo and hi as 2-byte big-endian integers.
# Exactly the checks of ``Decider.add_raw``; None where a value does not fit (the key
# then always goes through ``add_raw``).
PROGRAM_REFUSED = b"R"
PROGRAM_RANGE_BYTES = 37


def _program_side(check: _Check) -> bytes | None:
    if check is None:
        return b"\x00"
    if not check:
        return b"\x01"
    if len(check) > 255:
        return None
    out = bytearray(b"\x02")
    out.append(len(check))
    for lo, hi, port_lo, port_hi, kept in check:
        flags = 4 if kept else 0
        lo_b = hi_b = bytes(16)
        if lo is not None and hi is not None:
            if not (0 <= lo < 1 << 128 and 0 <= hi < 1 << 128):
                return None
            flags |= 1
            lo_b, hi_b = lo.to_bytes(16, "big"), hi.to_bytes(16, "big")
        ports = bytes(4)
        if port_lo is not None and port_hi is not None:
            if not (0 <= port_lo <= 0xFFFF and 0 <= port_hi <= 0xFFFF):
                return None
            flags |= 2
            ports = port_lo.to_bytes(2, "big") + port_hi.to_bytes(2, "big")
        out += bytes((flags,)) + lo_b + hi_b + ports
    return bytes(out)


def compile_program(dnat: _Check, snat: _Check) -> bytes | None:
    """The program of one raw key's checks (see above), or None when one does not fit."""
    d, s = _program_side(dnat), _program_side(snat)
    if d is None or s is None:
        return None
    return b"P" + d + s


class Decider:
    """``decide`` one entry at a time, so that a dump can be judged while it streams.

    ``add`` takes an ``Entry``; ``add_raw`` a raw entry (see above), which
    needs ``build``. Only stale and undecided entries are kept: ``plan()``
    returns the ``FlushPlan`` of everything added so far.
    """

    def __init__(
        self,
        *,
        predict: Predictor,
        fib_now: Fib,
        fib_before: Fib | None = None,
        eligibility: Eligibility = DEFAULT_ELIGIBILITY,
        sport_matters: bool = True,
        build: EntryBuilder | None = None,
        classifier: Classifier | None = None,
        only: frozenset[tuple[int, int]] | None = None,
    ) -> None:
        self.predict = predict
        # Flow classes (``core.classify``): predictions are kept per class, so the caches hold
        # one slot per class seen, whatever the traffic. Without an exact classifier they are
        # kept per flow key, and cleared when they pass ``FLOW_CACHE_LIMIT``.
        self.classifier = classifier if classifier is not None and classifier.exact else None
        # Judge only flows whose source or destination class is one of these (family, class);
        # the others are counted and left alone (their prediction cannot have changed).
        self.only = only if self.classifier is not None else None
        # The classifier's tables for a compiled scan, which then keys ``raw_cache`` by class.
        self.class_tables = self.classifier.packed() if self.classifier is not None else None
        self.fib_now = fib_now
        self.fib_before = fib_before
        self.eligibility = eligibility
        self.sport_matters = sport_matters
        self.build = build
        self.examined = 0
        self.eligible = 0
        self.predicted = 0
        self.stale: list[Decision] = []
        self.undecided: list[Decision] = []
        self._now: dict[Hashable, _Compiled] = {}
        self._before: dict[Hashable, Prediction] = {}
        self._raw: dict[Hashable, tuple[_Check, _Check] | _Compiled] = {}
        # Programs by packed raw key, filled and read by a compiled scan (``raw_program``).
        self.raw_cache: dict[bytes, bytes | None] = {}

    def _entry_key(self, entry: Entry) -> Hashable:
        classifier = self.classifier
        if classifier is not None:
            orig = entry.orig
            return classifier.key(
                entry.family, entry.proto, int(orig.src), int(orig.dst), orig.sport, orig.dport, entry.zone,
                entry.mark, entry.status & IPS_SEEN_REPLY,
            )
        return entry.flow_key() if not self.sport_matters else (entry.flow_key(), entry.orig.sport)

    def _compiled(self, entry: Entry) -> tuple[Hashable, _Compiled]:
        key = self._entry_key(entry)
        compiled = self._now.get(key)
        if compiled is None:
            if self.classifier is None and len(self._now) >= FLOW_CACHE_LIMIT:
                self._forget()
            compiled = _Compiled.of(self.predict(self.fib_now, entry.flow))
            self._now[key] = compiled
            self.predicted += 1
        return key, compiled

    def _forget(self) -> None:
        """Per-flow caches only: drop them all (they are rebuilt as flows come by)."""
        self._now.clear()
        self._before.clear()
        self._raw.clear()
        self.raw_cache.clear()

    def _skipped(self, key: Hashable) -> bool:
        """True for a class outside ``only`` (``Classifier.key``: family at 0, src and dst at 5, 6)."""
        only = self.only
        if only is None:
            return False
        assert isinstance(key, tuple)
        family = key[0]
        return (family, key[5]) not in only and (family, key[6]) not in only

    def add(self, entry: Entry) -> None:
        self.examined += 1
        if not self.eligibility.admits(entry):
            return
        self.eligible += 1
        if self.only is not None and self._skipped(self._entry_key(entry)):
            return
        key, compiled = self._compiled(entry)
        if not _healthy(entry, compiled):
            self._judge(entry, key, compiled)

    def _raw_key(self, raw: RawEntry) -> Hashable:
        (family, proto, osrc, odst, osport, odport, _rsrc, _rdst, _rsport, _rdport,
         status, zone, mark, _id, _timeout) = raw  # fmt: skip
        classifier = self.classifier
        if classifier is not None:
            return classifier.key(
                family, proto, int.from_bytes(osrc, "big"), int.from_bytes(odst, "big"), osport, odport, zone,
                mark, status & IPS_SEEN_REPLY,
            )
        if self.sport_matters:
            return (zone, mark, proto, osrc, odst, odport, family, status & IPS_SEEN_REPLY, osport)
        return (zone, mark, proto, osrc, odst, odport, family, status & IPS_SEEN_REPLY)

    def raw_program(self, raw: RawEntry) -> bytes | None:
        """The program of the key of a raw entry already added (see ``compile_program``)."""
        slot = self._raw.get(self._raw_key(raw))
        if slot is None:
            return None
        if slot is _REFUSED:
            return PROGRAM_REFUSED
        if slot is _LEFT:
            return compile_program((), ())
        assert isinstance(slot, _Compiled)
        return compile_program(slot.dnat, slot.snat)

    def add_raw(self, raw: RawEntry) -> None:
        (family, proto, osrc, odst, osport, odport, rsrc, rdst, rsport, rdport,
         status, zone, mark, _id, _timeout) = raw  # fmt: skip
        classifier = self.classifier
        key: Hashable
        if classifier is not None:
            key = classifier.key(
                family, proto, int.from_bytes(osrc, "big"), int.from_bytes(odst, "big"), osport, odport, zone,
                mark, status & IPS_SEEN_REPLY,
            )
        elif self.sport_matters:
            key = (zone, mark, proto, osrc, odst, odport, family, status & IPS_SEEN_REPLY, osport)
        else:
            key = (zone, mark, proto, osrc, odst, odport, family, status & IPS_SEEN_REPLY)
        slot = self._raw.get(key)
        if slot is None:
            self._first_raw(raw, key)
            return
        self.examined += 1
        if slot is _REFUSED:
            return
        self.eligible += 1
        if slot is _LEFT:
            return
        assert isinstance(slot, _Compiled)
        check = slot.dnat
        if check is None or (
            check and not _admitted_raw(check, odst, rsrc, odport, odport if proto in ICMP_PROTOS else rsport)
        ):
            self._judge_raw(raw, key, slot)
            return
        check = slot.snat
        if check is None or (
            check and not _admitted_raw(check, osrc, rdst, osport, osport if proto in ICMP_PROTOS else rdport)
        ):
            self._judge_raw(raw, key, slot)

    def judge_raw(self, raw: RawEntry) -> None:
        """``add_raw`` for an entry of a known, admitted key whose checks already failed.

        A compiled scan calls it after running the key's program (the checks
        ``add_raw`` would run, see ``raw_program``); it goes straight to the
        reasoned judgement.
        """
        key = self._raw_key(raw)
        slot = self._raw[key]
        assert isinstance(slot, _Compiled)
        self.examined += 1
        self.eligible += 1
        self._judge_raw(raw, key, slot)

    def _first_raw(self, raw: RawEntry, raw_key: Hashable) -> None:
        if self.build is None:
            raise ValueError("Decider.add_raw needs an entry builder")
        entry = self.build(raw)
        self.examined += 1
        if not self.eligibility.admits(entry):
            self._raw[raw_key] = _REFUSED
            return
        self.eligible += 1
        if self.only is not None and self._skipped(raw_key):
            self._raw[raw_key] = _LEFT  # healthy by construction: its prediction did not change
            return
        key, compiled = self._compiled(entry)
        self._raw[raw_key] = compiled
        if not _healthy(entry, compiled):
            self._judge(entry, key, compiled)

    def _judge_raw(self, raw: RawEntry, key: Hashable, compiled: _Compiled) -> None:
        assert self.build is not None
        (_family, proto, osrc, odst, osport, odport, rsrc, rdst, rsport, rdport,
         _status, _zone, _mark, _id, _timeout) = raw  # fmt: skip
        # Whether each side kept address and port, read on the packed values (``_side``'s test).
        icmp = proto in ICMP_PROTOS
        kept = (rsrc == odst and (icmp or rsport == odport), rdst == osrc and (icmp or rdport == osport))
        # The raw key also keys ``before`` predictions: its shape (8 or 9 items) differs from
        # the flow key's (7, or 2 with the sport), so the two kinds never collide.
        self._judge(self.build(raw), key, compiled, kept)

    def _side(
        self,
        entry: Entry,
        side: str,
        compiled: _Compiled,
        before: Prediction | None,
        kept: bool | None = None,  # the side kept address and port (computed here when None)
    ) -> _Judgement | None:
        """``_side``, reused across the flow key where the entry's side carries no NAT.

        With no translation on that side (address and port kept; whether its NAT hook
        ran or not), the judgement reads the entry only through its original
        address, which is part of the flow key, and its port, which no
        binding without a port range looks at. So when the prediction is
        known and has no port range, one judgement serves every such entry.
        """
        prediction = compiled.prediction
        predicted = prediction.dnat if side == "dnat" else prediction.snat
        if side not in compiled.portless or self.classifier is not None:
            # With classes the entry's own address is not part of the key: no reuse across it.
            return _side(entry, side, predicted, prediction, before, texts=compiled.texts)
        orig, reply = entry.orig, entry.reply
        if kept is None:
            if side == "dnat":
                kept = reply.src == orig.dst and (entry.proto in ICMP_PROTOS or reply.sport == orig.dport)
            else:
                kept = reply.dst == orig.src and (entry.proto in ICMP_PROTOS or reply.dport == orig.sport)
        if not kept:
            return _side(entry, side, predicted, prediction, before, texts=compiled.texts)
        try:
            return compiled.unnated[side]
        except KeyError:
            judged = _side(entry, side, predicted, prediction, before, texts=compiled.texts)
            compiled.unnated[side] = judged
            return judged

    def _judge(
        self,
        entry: Entry,
        key: Hashable,
        compiled: _Compiled,
        kept: tuple[bool | None, bool | None] = (None, None),  # per side, as ``_side`` takes it
    ) -> None:
        prediction = compiled.prediction
        before: Prediction | None = None
        if self.fib_before is not None and (
            isinstance(prediction.dnat, Unknown) or isinstance(prediction.snat, Unknown)
        ):
            before = self._before.get(key)
            if before is None:
                before = self.predict(self.fib_before, entry.flow)
                self._before[key] = before
        # DNAT first: a stale destination already condemns the entry (SNAT is not looked at).
        dnat = self._side(entry, "dnat", compiled, before, kept[0])
        if dnat is not None and dnat.stale:
            self.stale.append(Decision(entry, dnat.side, dnat.actual, dnat.expected, dnat.reason, dnat.code))
            return
        snat = self._side(entry, "snat", compiled, before, kept[1])
        if snat is not None and snat.stale:
            self.stale.append(Decision(entry, snat.side, snat.actual, snat.expected, snat.reason, snat.code))
            return
        chosen = next((j for j in (dnat, snat) if j is not None and j.undecided), None)
        if chosen is not None:
            self.undecided.append(
                Decision(entry, chosen.side, chosen.actual, chosen.expected, chosen.reason, chosen.code)
            )

    def plan(self) -> FlushPlan:
        return FlushPlan(
            examined=self.examined,
            eligible=self.eligible,
            stale=tuple(self.stale),
            undecided=tuple(self.undecided),
            distinct_flows=len(self._now),
            predicted=self.predicted,
        )


def decide(
    entries: Iterable[Entry],
    *,
    predict: Predictor,
    fib_now: Fib,
    fib_before: Fib | None = None,
    eligibility: Eligibility = DEFAULT_ELIGIBILITY,
    sport_matters: bool = True,
    classifier: Classifier | None = None,
    only: frozenset[tuple[int, int]] | None = None,
) -> FlushPlan:
    """Judge every eligible entry; ``predict`` is the evaluator bound to the current ruleset.

    With ``sport_matters`` False (see ``mentions_sport``), entries sharing
    (zone, mark, proto, src, dst, dport) are predicted once.
    """
    decider = Decider(
        predict=predict,
        fib_now=fib_now,
        fib_before=fib_before,
        eligibility=eligibility,
        sport_matters=sport_matters,
        classifier=classifier,
        only=only,
    )
    add = decider.add
    for entry in entries:
        add(entry)
    return decider.plan()
