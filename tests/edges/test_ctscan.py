"""The compiled scan (edges/_ctscan.c) against the pure-Python path it replaces.

Both paths are run on the same bytes: recorded kernel dumps (v4, v6, ICMP,
zones, with and without NAT), generated messages of every shape the codec
knows, truncations and random corruption. They must agree on every entry,
every counter and, with a ``Decider`` behind them, on the whole plan. The
pure path itself is checked against the kernel (test_ctcodec.py) and against
the per-entry reasoned decision (tests/core/test_decide.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import struct
from collections import Counter
from collections.abc import Iterator
from ipaddress import ip_address
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topowatch.core.admission import CASES as ADMISSION
from topowatch.core.admission import AdmissionCase
from topowatch.core.classify import Classifier
from topowatch.core.conntrack import (
    IPS_CONFIRMED,
    IPS_DST_NAT_DONE,
    IPS_SEEN_REPLY,
    IPS_SRC_NAT_DONE,
    CtTuple,
    Entry,
)
from topowatch.core.decide import Decider, compile_program, decide, pack_record
from topowatch.core.eligibility import Eligibility
from topowatch.core.fib import Fib
from topowatch.core.flow import (
    Binding,
    Egress,
    EgressKind,
    Flow,
    Ingress,
    NatKind,
    Prediction,
    RuleRef,
    Unknown,
)
from topowatch.core.model import Address, Topology
from topowatch.edges import ctcodec as c
from topowatch.report import code_samples, count_codes, group_by_code

# The recordings, the entry strategy and the kernel's message shape are test_ctcodec's.
from test_ctcodec import dump_message, entries, load, recorded_seq  # isort: skip

FIB = Fib(Topology())


def test_the_compiled_path_is_built_and_used() -> None:
    """The install compiles it (gcc and the headers are on every machine that runs the tests)."""
    assert c._ctscan is not None, c.FAST_PATH
    assert c.FAST_PATH == "compiled"
    from topowatch.edges import _ctscan

    assert _ctscan.IPS_SEEN_REPLY == IPS_SEEN_REPLY
    assert _ctscan.IPS_SRC_NAT_DONE == IPS_SRC_NAT_DONE
    assert _ctscan.IPS_DST_NAT_DONE == IPS_DST_NAT_DONE
    from topowatch.core.decide import PROGRAM_RANGE_BYTES

    assert _ctscan.RANGE_BYTES == PROGRAM_RANGE_BYTES


# --- both paths on the same bytes --------------------------------------------------------


class Collect:
    """A consumer that keeps what it is given, raw entries built into ``Entry`` values."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []

    def add_raw(self, raw: Any) -> None:
        self.entries.append(c.entry_from_raw(raw))


def run(parts: list[bytes], seq: int, *, compiled: bool, skip_replied: bool = False) -> dict[str, Any]:
    """Feed the datagrams ``parts`` to one path; everything the parser and its sink ended with."""
    saved = c._ctscan
    if not compiled:
        c._ctscan = None
    try:
        sink = Collect()
        parser = c.DumpParser(seq=seq, skip_replied=skip_replied, sink=sink.add_raw)
        for part in parts:
            parser.feed(part)
    finally:
        c._ctscan = saved
    return {
        "entries": Counter(sink.entries + parser.entries),
        "messages": parser.messages,
        "decode_errors": parser.decode_errors,
        "samples": sorted(parser.error_samples),
        "stale": parser.stale,
        "done": parser.done,
        "interrupted": parser.interrupted,
        "errno": parser.errno,
        "skipped": parser.skipped_replied,
    }


def agree(data: bytes | list[bytes], seq: int, **kw: Any) -> dict[str, Any]:
    parts = [data] if isinstance(data, bytes) else data
    pure = run(parts, seq, compiled=False, **kw)
    fast = run(parts, seq, compiled=True, **kw)
    assert fast == pure
    return fast


@pytest.mark.parametrize("name", ["lab_nat", "created"])
@pytest.mark.parametrize("skip_replied", [False, True])
def test_recorded_dumps_decode_the_same(name: str, skip_replied: bool) -> None:
    messages = load(name)
    out = agree(b"".join(messages), recorded_seq(messages), skip_replied=skip_replied)
    assert out["decode_errors"] == 0
    assert sum(out["entries"].values()) + out["skipped"] == out["messages"] > 0


def test_the_compiled_read_takes_the_recordings_and_hands_the_rest_to_the_reference() -> None:
    """The kernel's own shapes, ICMP included, are read in C; a directional zone goes to the reference."""
    seen: list[int] = []

    class Parser(c.DumpParser):
        __slots__ = ()

        def _generic(self, data: bytes, pos: int, mend: int) -> None:
            seen.append(pos)
            super()._generic(data, pos, mend)

    messages = load("lab_nat")
    sink = Collect()
    parser = Parser(seq=recorded_seq(messages), sink=sink.add_raw)
    parser.feed(b"".join(messages))
    assert not seen and not parser.entries and parser.decode_errors == 0
    assert {e.proto for e in sink.entries} >= {1, 17}  # ICMP and UDP, both read in C
    e = Entry(2, 17, CtTuple(ip_address("10.0.0.1"), ip_address("10.0.0.2"), 1, 2),
              CtTuple(ip_address("10.0.0.2"), ip_address("10.0.0.1"), 2, 1), status=IPS_CONFIRMED)  # fmt: skip
    orig = c.encode_tuple(c.CTA_TUPLE_ORIG, 2, 17, e.orig)
    zoned = c.nest(c.CTA_TUPLE_ORIG, orig[4:], c.nla(c.CTA_TUPLE_ZONE, c.be16(9)))
    msg = c.encode_message(c.IPCTNL_MSG_CT_NEW, c.NLM_F_MULTI, 5, 2, [
        (1, zoned), (2, c.encode_tuple(c.CTA_TUPLE_REPLY, 2, 17, e.reply)), (3, c.nla(3, c.be32(8)))])  # fmt: skip
    parser = Parser(seq=5, sink=sink.add_raw)
    parser.feed(msg)
    assert seen and parser.decode_errors == 0 and len(parser.entries) == 1


def test_every_truncation_of_a_recorded_dump_decodes_the_same() -> None:
    messages = load("lab_nat")
    data, seq = b"".join(messages), recorded_seq(messages)
    for cut in range(0, len(data), 3):
        agree(data[:cut], seq)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_random_corruption_decodes_the_same(data: st.DataObject) -> None:
    messages = load(data.draw(st.sampled_from(["lab_nat", "created"])))
    blob = bytearray(b"".join(messages))
    for _ in range(data.draw(st.integers(1, 8))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    agree(bytes(blob), recorded_seq(messages), skip_replied=data.draw(st.booleans()))


@st.composite
def messages(draw: st.DrawFn, seq: int = 5) -> bytes:
    """One message in a shape the kernel sends, or a variant of it: attributes left out, repeated, odd."""
    e = draw(entries())
    attrs = [
        (1, c.encode_tuple(c.CTA_TUPLE_ORIG, e.family, e.proto, e.orig)),
        (2, c.encode_tuple(c.CTA_TUPLE_REPLY, e.family, e.proto, e.reply)),
        (3, c.nla(c.CTA_STATUS, c.be32(e.status))),
        (7, c.nla(c.CTA_TIMEOUT, c.be32(e.timeout))),
        (8, c.nla(c.CTA_MARK, c.be32(e.mark))),
        (12, c.nla(c.CTA_ID, c.be32(e.id))),
        (11, c.nla(11, c.be32(1))),  # CTA_USE: skipped by both
        (18, c.nla(c.CTA_ZONE, c.be16(e.zone))),
        (4, c.nest(4, c.nla(1, b"\x03"))),  # CTA_PROTOINFO: skipped by both
    ]
    picked = draw(st.lists(st.sampled_from(attrs), min_size=0, max_size=12))
    if draw(st.booleans()):
        picked = [a for a in attrs if a[0] != 18 or e.zone]  # the kernel's own shape
    odd = draw(st.sampled_from([None, "zone5", "status2", "tuplezone", "family"]))
    if odd == "zone5":
        picked.append((18, c.nla(c.CTA_ZONE, b"\0\0\1")))
    elif odd == "status2":
        picked.append((3, c.nla(c.CTA_STATUS, b"\0\1")))
    elif odd == "tuplezone":  # a directional zone inside the orig tuple
        body = c.encode_tuple(c.CTA_TUPLE_ORIG, e.family, e.proto, e.orig)[4:]
        picked.insert(0, (1, c.nest(1, body[: len(body)], c.nla(3, c.be16(9)))))
    family = e.family if odd != "family" else (10 if e.family == 2 else 2)
    flags = draw(st.sampled_from([c.NLM_F_MULTI, c.NLM_F_MULTI | c.NLM_F_DUMP_INTR]))
    return c.encode_message(c.IPCTNL_MSG_CT_NEW, flags, draw(st.sampled_from([seq, seq, 4])), family, picked)


@settings(max_examples=500, deadline=None)
@given(st.lists(messages(), max_size=12), st.booleans(), st.booleans(), st.sampled_from([None, 0, -1, -4]))
def test_generated_messages_decode_the_same(
    items: list[bytes], skip_replied: bool, split: bool, end: int | None
) -> None:
    tail = b""
    if end is not None:
        tail = (c.encode_message(c.NLMSG_DONE, c.NLM_F_MULTI, 5, 0, []) if end == 0
                else struct.pack("=IHHIIi", 20, c.NLMSG_ERROR, 0, 5, 0, end))  # fmt: skip
    whole = agree(b"".join(items) + tail, 5, skip_replied=skip_replied)
    if split:  # one datagram per message: the same outcome
        assert agree([*items, tail], 5, skip_replied=skip_replied) == whole


def test_a_feed_length_outside_the_buffer_is_refused() -> None:
    from topowatch.edges import _ctscan

    parser = c.DumpParser(seq=1, sink=lambda raw: None)
    with pytest.raises(ValueError, match="outside"):
        _ctscan.feed(parser, b"\0" * 8, 9, 1, 0, parser.sink, None, None, None, False)
    with pytest.raises(TypeError):
        _ctscan.feed(parser, b"", 0, 1, 0, parser.sink, [], None, None, False)


def test_an_exception_in_the_sink_propagates() -> None:
    e = Entry(2, 17, CtTuple(ip_address("10.0.0.1"), ip_address("10.0.0.2"), 1, 2),
              CtTuple(ip_address("10.0.0.2"), ip_address("10.0.0.1"), 2, 1), status=IPS_CONFIRMED)  # fmt: skip
    msg = c.encode_message(c.IPCTNL_MSG_CT_NEW, c.NLM_F_MULTI, 1, 2, [
        (1, c.encode_tuple(1, 2, 17, e.orig)), (2, c.encode_tuple(2, 2, 17, e.reply)), (3, c.nla(3, c.be32(8)))])  # fmt: skip

    def sink(raw: Any) -> None:
        raise RuntimeError("consumer failed")

    parser = c.DumpParser(seq=1, sink=sink)
    with pytest.raises(RuntimeError, match="consumer failed"):
        parser.feed(msg)


# --- settled by the compiled checks: the plan is the pure path's -------------------------------

MASQ = ip_address("203.0.113.2")
OPTIONS: list[frozenset[Binding] | Unknown] = [
    frozenset({Binding(NatKind.MASQUERADE, MASQ, MASQ)}),
    frozenset({Binding(NatKind.NONE)}),
    frozenset({Binding(NatKind.MASQUERADE, MASQ, MASQ, 1024, 2047), Binding(NatKind.NONE)}),
    frozenset({Binding(NatKind.SNAT, ip_address("203.0.113.1"), ip_address("203.0.113.9"))}),
    frozenset({Binding(NatKind.SNAT, ip_address("2001:db8::1"), ip_address("2001:db8::ff"), 80, 80)}),
    Unknown("xt match"),
    frozenset(),
]


# The previous snapshot's FIB: under it a flow's egress is another uplink, the same, or unknown,
# by its source, destination and port (so an unpredictable side is stale, nothing or undecided, by class).
FIB_BEFORE = Fib(Topology())
UPLINKS = (Egress(EgressKind.UNICAST, 2, "up1"), Egress(EgressKind.UNICAST, 3, "up2"))


def predictor(choice: int) -> Any:
    def predict(fib: Fib, flow: Flow) -> Prediction:
        pick = (choice + int(flow.dst) + flow.dport + flow.zone) % len(OPTIONS)
        dnat = OPTIONS[(pick + 1) % len(OPTIONS)] if choice % 2 else frozenset({Binding(NatKind.NONE)})
        egress: tuple[Egress, ...] | Unknown = (UPLINKS[0],)
        if fib is FIB_BEFORE:
            way = (int(flow.src) + int(flow.dst) + flow.dport) % 3
            egress = (UPLINKS[way],) if way < 2 else Unknown("a route the model does not read")
        # Rule lines as the evaluator writes them, one naming a rule (its chain and handle reach the
        # Reason's fields on both paths) and one naming none.
        rule = RuleRef("table inet nat chain postrouting", 7 + pick, 'oifname "up1" masquerade')
        return Prediction(dnat=dnat, snat=OPTIONS[pick], egress=egress, rules=(rule,),
                          explain=(f"snat via dev up1: {rule} (to 203.0.113.1)", "marks at output unknown: x"))

    return predict


WAYS = (Ingress(4, "lan0"), Ingress(5, "lan1"), Ingress(2, "up1"))


def alternatives_predictor(choice: int) -> Any:
    """Predictions with alternatives, as ``evaluate`` makes them where reverse-path filtering does
    not pin the input interface: each way (input interface) its own bindings and egress, the sides
    their union (unknown where one is), a way that drops the flow before SNAT among them."""

    def predict(fib: Fib, flow: Flow) -> Prediction:
        seed = choice + int(flow.dst) + flow.dport + flow.zone + (5 if fib is FIB_BEFORE else 0)
        alts = []
        for i in range(2 + seed % 2):
            pick = (seed * (i + 3) + i) % len(OPTIONS)
            snat = OPTIONS[pick]
            dnat = OPTIONS[(pick + choice + i) % len(OPTIONS)] if choice % 2 else frozenset({Binding(NatKind.NONE)})
            if dnat == frozenset():  # dropped before routing: no SNAT hook either
                snat = frozenset()
            alts.append(Prediction(dnat=dnat, snat=snat, egress=(UPLINKS[i % 2],), ingress=WAYS[i]))

        def union(sides: list[frozenset[Binding] | Unknown]) -> frozenset[Binding] | Unknown:
            unknown = [s for s in sides if isinstance(s, Unknown)]
            return unknown[0] if unknown else frozenset().union(*sides)  # type: ignore[arg-type]

        return Prediction(dnat=union([a.dnat for a in alts]), snat=union([a.snat for a in alts]),
                          egress=tuple(dict.fromkeys(e for a in alts for e in a.egress)),  # type: ignore[union-attr]
                          ingress=Unknown("any of lan0, lan1, up1 (rp_filter off)"), alternatives=tuple(alts))  # fmt: skip

    return predict


CLIENTS = [ip_address("10.0.1.2"), ip_address("10.0.1.3")]
SERVERS = [ip_address("192.0.2.10"), ip_address("192.0.2.11")]
TRANSLATED = [ip_address("10.0.1.2"), MASQ, ip_address("203.0.113.5"), ip_address("192.0.2.10")]
V6 = [ip_address("2001:db8::2"), ip_address("2001:db8::80"), ip_address("2001:db8:1::1")]


@st.composite
def table(draw: st.DrawFn) -> Entry:
    v6 = draw(st.booleans())
    proto = draw(st.sampled_from([17, 6, 1 if not v6 else 58]))
    pool = V6 if v6 else CLIENTS
    client, server = draw(st.sampled_from(pool)), draw(st.sampled_from(V6 if v6 else SERVERS))
    sport, dport = draw(st.sampled_from([1000, 1500, 5060])), draw(st.sampled_from([53, 80, 5060]))
    translated = draw(st.sampled_from(V6 if v6 else TRANSLATED))
    dst_seen = draw(st.sampled_from([server, translated]))
    nat_port = draw(st.sampled_from([sport, 80, 1024, 3000]))
    status = IPS_CONFIRMED | draw(st.sampled_from([0, 0, IPS_SEEN_REPLY])) | draw(st.sampled_from(
        [IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE, IPS_SRC_NAT_DONE, IPS_DST_NAT_DONE, 0]))  # fmt: skip
    if proto in (1, 58):
        orig, reply = CtTuple(client, server, sport, 8 << 8), CtTuple(dst_seen, translated, sport, 0)
    else:
        orig, reply = CtTuple(client, server, sport, dport), CtTuple(dst_seen, translated, dport, nat_port)
    return Entry(10 if v6 else 2, proto, orig, reply, status=status, zone=draw(st.sampled_from([0, 7])),
                 mark=draw(st.sampled_from([0, 0x10])), id=draw(st.integers(0, 3)))  # fmt: skip


def classes_for(eligibility: Eligibility, sport_matters: bool) -> Classifier:
    """Classes under which ``predictor`` is the same for a class: every address and port its own."""
    pool = {*CLIENTS, *SERVERS, *TRANSLATED, *V6}
    topology = Topology(addresses=tuple(Address(1, a, a.max_prefixlen) for a in pool))
    ports = (53, 80, 5060, 1000, 1500, 1024, 3000, 8 << 8)
    return Classifier.build([topology], [ports], eligibility, sport_matters=sport_matters)


def plan_of(items: list[Entry], *, compiled: bool, choice: int, sport_matters: bool,
            eligibility: Eligibility, per_datagram: int, classes: bool = False, before: bool = False,
            alternatives: bool = False) -> Any:  # fmt: skip
    saved = c._ctscan
    if not compiled:
        c._ctscan = None
    try:
        predict = alternatives_predictor(choice) if alternatives else predictor(choice)
        decider = Decider(predict=predict, fib_now=FIB, eligibility=eligibility,
                          fib_before=FIB_BEFORE if before else None,
                          sport_matters=sport_matters, build=c.entry_from_raw,
                          classifier=classes_for(eligibility, sport_matters) if classes else None)  # fmt: skip
        if classes:
            assert decider.class_tables is not None
        parser = c.DumpParser(seq=9, skip_replied=eligibility.unreplied_only, sink=decider.add_raw)
        parser.settle = decider
        for i in range(0, len(items), per_datagram):
            parser.feed(b"".join(dump_message(e, 9) for e in items[i : i + per_datagram]))
            for e in parser.entries:
                decider.add(e)
            parser.entries.clear()
        plan = decider.plan()
    finally:
        c._ctscan = saved
    codes = (count_codes(plan.stale), count_codes(plan.undecided))  # from the records, when there are some
    return {
        "examined": plan.examined + parser.skipped_replied,
        "eligible": plan.eligible,
        # The whole Reason (code and every field: rule lines, egress, ways), and its text.
        "stale": Counter((d.entry, d.why, d.reason, d.code) for d in plan.stale),
        "undecided": Counter((d.entry, d.why, d.reason, d.code) for d in plan.undecided),
        "codes": codes,
    }


@settings(max_examples=300, deadline=None)
@given(
    items=st.lists(table(), max_size=60),
    choice=st.integers(0, 13),
    sport_matters=st.booleans(),
    per_datagram=st.sampled_from([1, 7, 100]),
    eligibility=st.sampled_from([
        Eligibility(),
        Eligibility(unreplied_only=False, protocols=frozenset({6, 17, 1, 58})),
        Eligibility(zones=frozenset({7}), marks=((0x10, 0xF0),)),
    ]),
    before=st.booleans(),
)
def test_settled_entries_give_the_pure_paths_plan(  # noqa: PLR0917 (hypothesis gives them by name)
    items: list[Entry], choice: int, sport_matters: bool, per_datagram: int, eligibility: Eligibility, before: bool
) -> None:
    kw: dict[str, Any] = {"choice": choice, "sport_matters": sport_matters, "eligibility": eligibility,
                          "per_datagram": per_datagram, "before": before}  # fmt: skip
    fast, pure = plan_of(items, compiled=True, **kw), plan_of(items, compiled=False, **kw)
    assert fast == pure
    assert fast["examined"] == len(items)
    # By flow classes (keyed by class in C and in Python alike): the same plan.
    assert plan_of(items, compiled=True, classes=True, **kw) == pure
    assert plan_of(items, compiled=False, classes=True, **kw) == pure


@settings(max_examples=300, deadline=None)
@given(
    items=st.lists(table(), max_size=60),
    choice=st.integers(0, 13),
    sport_matters=st.booleans(),
    per_datagram=st.sampled_from([1, 7, 100]),
    before=st.booleans(),
)
def test_predictions_with_alternatives_give_the_pure_paths_plan(
    items: list[Entry], choice: int, sport_matters: bool, per_datagram: int, before: bool
) -> None:
    """Entries every way refuses are records of the compiled scan (``_alternatives_block``); their
    Decisions, codes and counts are the pure path's, with and without a previous snapshot. Each
    entry comes three times (other ids): a class's first entry is judged in Python, the others in C."""
    items = [dataclasses.replace(e, id=e.id + 4 * copy) for e in items for copy in range(3)]
    kw: dict[str, Any] = {"choice": choice, "sport_matters": sport_matters, "eligibility": Eligibility(),
                          "per_datagram": per_datagram, "before": before, "alternatives": True}  # fmt: skip
    pure = plan_of(items, compiled=False, **kw)
    assert plan_of(items, compiled=True, classes=True, **kw) == pure
    assert plan_of(items, compiled=True, **kw) == pure


def every_class() -> list[Entry]:
    """Three entries (masqueraded, not NATed, NATed elsewhere) of every client, server and ports."""
    return [
        Entry(2, 17, CtTuple(client, server, sport, dport), CtTuple(server, nat, dport, sport), status=status)
        for client in CLIENTS for server in SERVERS for dport in (53, 80, 5060) for sport in (1000, 1500, 5060)
        for nat, status in ((MASQ, IPS_CONFIRMED | IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE),
                            (client, IPS_CONFIRMED), (TRANSLATED[2], IPS_CONFIRMED))
    ]  # fmt: skip


def test_records_reasons_name_the_rule_by_chain_and_handle() -> None:
    """A record's Reason carries the rule lines of its class's prediction, the rule's chain and
    handle among them, as the pure path's does (guards the comparisons above against reasons
    that have no rule to compare)."""
    kw: dict[str, Any] = {"choice": 0, "sport_matters": False, "eligibility": Eligibility(), "per_datagram": 50}
    fast = plan_of(every_class(), compiled=True, classes=True, **kw)
    assert fast == plan_of(every_class(), compiled=False, **kw)
    named = {line.rule for _, why, _, _ in fast["stale"] for line in why.rules}
    handles = {rule.handle for rule in named if rule is not None}
    assert None in named and len(handles) >= 2 and handles <= set(range(7, 7 + len(OPTIONS)))
    assert {rule.chain for rule in named if rule is not None} == {"table inet nat chain postrouting"}


@pytest.mark.parametrize("choice", range(14))
def test_classes_whose_nat_cannot_be_predicted_give_the_pure_paths_plan(choice: int) -> None:
    """Every class of every destination and port, three entries each (the first judged in Python,
    the others by the class's verdict in C): stale where the egress moved, undecided where it is
    unknown, nothing where it stayed, as the pure path says, with or without a previous snapshot."""
    items = every_class()
    for before in (False, True):
        kw: dict[str, Any] = {"choice": choice, "sport_matters": False, "eligibility": Eligibility(),
                              "per_datagram": 50, "before": before}  # fmt: skip
        pure = plan_of(items, compiled=False, **kw)
        assert plan_of(items, compiled=True, classes=True, **kw) == pure


def test_the_compiled_class_key_splits_and_joins_as_the_classifier_does() -> None:
    """One key per class in C: entries of one class share a cache slot, of two classes never."""
    classifier = classes_for(Eligibility(marks=((0x10, 0xF0),)), sport_matters=True)
    decider = Decider(predict=predictor(1), fib_now=FIB, build=c.entry_from_raw, classifier=classifier,
                      eligibility=Eligibility(unreplied_only=False, protocols=frozenset({6, 17, 1, 58})))
    rows = []
    for client in [*CLIENTS, ip_address("10.0.1.9"), ip_address("10.0.1.10")]:
        for server in [*SERVERS, ip_address("192.0.2.77")]:
            for dport in (53, 54, 55, 80):
                for mark in (0, 0x10, 0x11, 0x20):
                    rows.append(Entry(2, 17, CtTuple(client, server, 1000, dport),
                                      CtTuple(server, client, dport, 1000), mark=mark))  # fmt: skip
    parser = c.DumpParser(seq=9, skip_replied=False, sink=decider.add_raw)
    parser.settle = decider
    parser.feed(b"".join(dump_message(e, 9) for e in rows))
    keys = {classifier.key(2, 17, int(e.orig.src), int(e.orig.dst), 1000, e.orig.dport, 0, e.mark, 0) for e in rows}
    assert len(decider.raw_cache) == len(keys)
    # 10.0.1.9 and .10 are one class (neither is named), 54 and 55 one port class, 0x10 and 0x11 one mark class.
    assert len(keys) == 3 * 3 * 3 * 3


@pytest.mark.parametrize("count", [40, 700])
def test_more_classes_in_one_burst_than_the_memo_keeps_give_the_pure_paths_plan(count: int) -> None:
    """The compiled scan keeps a class's program in a per-burst memo (at most 256 classes): past
    that, classes are found in the settle cache only. 8 x ``count`` classes (the address classes
    found by the compiled search among 1,400 starts for 700 servers spread over 10.0.0.0/8), each
    met three times in one burst, half of them healthy: the same plan as the pure path, and one
    prediction per class."""
    servers = [ip_address(f"10.{i % 7 * 31}.{i // 7}.{(i * 37) % 251 + 1}") for i in range(count)]
    ports = (53, 80, 123, 443, 5060, 8080, 8443, 9000)
    pool = {*CLIENTS, *servers, MASQ}
    topology = Topology(addresses=tuple(Address(1, a, a.max_prefixlen) for a in pool))
    eligibility = Eligibility()
    rows = [Entry(2, 17, CtTuple(CLIENTS[0], server, 1000 + n, dport),
                  CtTuple(server, MASQ if (n + int(server) + dport) % 2 else CLIENTS[0], dport, 1000 + n),
                  status=IPS_CONFIRMED | IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE)
            for n in range(3) for server in servers for dport in ports]  # fmt: skip
    plans = []
    for compiled in (True, False):
        saved = c._ctscan
        if not compiled:
            c._ctscan = None
        try:
            classifier = Classifier.build([topology], [ports], eligibility, sport_matters=False)
            decider = Decider(predict=predictor(0), fib_now=FIB, eligibility=eligibility, sport_matters=False,
                              build=c.entry_from_raw, classifier=classifier)  # fmt: skip
            parser = c.DumpParser(seq=9, skip_replied=True, sink=decider.add_raw)
            parser.settle = decider
            parser.feed(b"".join(dump_message(e, 9) for e in rows))  # one burst
            for e in parser.entries:
                decider.add(e)
            plan = decider.plan()
        finally:
            c._ctscan = saved
        plans.append((plan.examined, plan.eligible, Counter((d.entry, d.reason, d.code) for d in plan.stale),
                      Counter((d.entry, d.reason) for d in plan.undecided)))  # fmt: skip
        assert decider.predicted == 8 * count
    assert plans[0] == plans[1]
    assert plans[0][0] == 24 * count and 0 < sum(plans[0][2].values()) < 24 * count


def test_healthy_entries_of_a_known_key_never_reach_python() -> None:
    """1000 healthy entries of one key: one is judged in Python (the key's first), the rest in C."""
    seen: list[Any] = []
    decider = Decider(predict=lambda fib, flow: Prediction(frozenset({Binding(NatKind.NONE)}),
                                                           OPTIONS[0], ()),
                      fib_now=FIB, sport_matters=False, build=c.entry_from_raw)  # fmt: skip
    add_raw, judge_raw = decider.add_raw, decider.judge_raw
    judged: list[Any] = []

    def sink(raw: Any) -> None:
        seen.append(raw)
        add_raw(raw)

    def judge(raw: Any) -> None:
        judged.append(raw)
        judge_raw(raw)

    decider.judge_raw = judge  # type: ignore[method-assign]

    client, server = CLIENTS[0], SERVERS[0]
    healthy = [Entry(2, 17, CtTuple(client, server, p, 53), CtTuple(server, MASQ, 53, p),
                     status=IPS_CONFIRMED | IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE) for p in range(1000, 2000)]  # fmt: skip
    stale = Entry(2, 17, CtTuple(client, server, 7, 53), CtTuple(server, client, 53, 7),
                  status=IPS_CONFIRMED | IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE)  # fmt: skip
    parser = c.DumpParser(seq=9, skip_replied=True, sink=sink)
    parser.settle = decider
    parser.feed(b"".join(dump_message(e, 9) for e in [*healthy, stale]))
    plan = decider.plan()
    assert len(seen) == 1  # the key's first entry: added whole
    assert [r[4] for r in judged] == [7]  # the stale one: its program failed, straight to judgement
    assert plan.examined == plan.eligible == 1001
    assert [d.entry.orig.sport for d in plan.stale] == [7]


def scanned(decider: Decider, items: list[Entry]) -> tuple[Any, list[Any]]:
    """``items`` as one UNREPLIED dump through the compiled scan into ``decider``: its plan, and the raw
    entries whose class's program failed (they reach the Python judgement)."""
    judged: list[Any] = []
    judge_raw = decider.judge_raw
    decider.judge_raw = lambda raw: (judged.append(raw), judge_raw(raw))  # type: ignore[method-assign,func-returns-value]
    parser = c.DumpParser(seq=9, skip_replied=True, sink=decider.add_raw)
    parser.settle = decider
    parser.feed(b"".join(dump_message(e, 9) for e in items))
    return decider.plan(), judged


def test_stale_entries_of_a_known_class_become_records_without_python() -> None:
    """With classes, a stale entry of a class whose prediction is known never calls back: it is a record,
    and its Decision, built when read, is the pure path's."""
    predict = lambda fib, flow: Prediction(frozenset({Binding(NatKind.NONE)}), OPTIONS[0], ())  # noqa: E731
    classifier = classes_for(Eligibility(), sport_matters=False)
    client, server = CLIENTS[0], SERVERS[0]
    healthy = [Entry(2, 17, CtTuple(client, server, p, 53), CtTuple(server, MASQ, 53, p),
                     status=IPS_CONFIRMED | IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE, id=p) for p in range(1000, 1200)]
    # Masqueraded to another address (SNAT stale) and never NATed (a null binding, SNAT stale).
    stale = [Entry(2, 17, CtTuple(client, server, p, 53), CtTuple(server, TRANSLATED[2], 53, p),
                   status=IPS_CONFIRMED | IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE, zone=7, id=p) for p in range(2000, 2050)]
    stale += [Entry(2, 17, CtTuple(client, server, p, 53), CtTuple(server, client, 53, p),
                    status=IPS_CONFIRMED, mark=0x10, id=p) for p in range(3000, 3050)]
    # Tuples that differ with no NAT hook run: no binding can be read, neither stale nor undecided.
    odd = Entry(2, 17, CtTuple(client, server, 9, 53), CtTuple(server, TRANSLATED[2], 53, 9), status=IPS_CONFIRMED)
    items = [*healthy, *stale, odd]
    decider = Decider(predict=predict, fib_now=FIB, sport_matters=False, build=c.entry_from_raw,
                      classifier=classifier)
    plan, judged = scanned(decider, items)
    entries = plan.stale.entries()  # type: ignore[attr-defined]
    assert len(entries.records) == 98 * 100  # nothing built yet
    codes = plan.stale.codes()  # type: ignore[attr-defined]  # read from the records
    protos = plan.stale.protos()  # type: ignore[attr-defined]
    samples = code_samples(plan.stale, sample=3)
    assert [d.code for d in plan.stale] == codes and {d.entry.proto for d in plan.stale} == protos == {17}
    assert Counter(codes) == {"snat_changed": 50, "null_binding_now_nat": 50}
    assert samples == [(code, count, list(group[:3])) for code, group in group_by_code(plan.stale)
                       for count in [len(group)]]
    assert judged == []
    # The first entry of each class (zone 7; mark 0x10) is added whole, in Python; the others are records.
    assert decider.records is not None and len(decider.records) == 98 * 100
    assert plan.examined == plan.eligible == len(items)
    pure = decide(items, predict=predict, fib_now=FIB, sport_matters=False)
    key = lambda d: (d.entry, d.why, d.side, d.reason, d.code, d.actual, d.expected)  # noqa: E731
    assert Counter(map(key, plan.stale)) == Counter(map(key, pure.stale))
    assert {d.entry.orig.sport for d in plan.stale} == {e.orig.sport for e in stale}
    assert len(plan.stale) == 100 and not plan.undecided
    assert Counter(entries) == Counter(stale)


def test_entries_every_way_refuses_become_records_without_python() -> None:
    """A prediction with alternatives (two input interfaces): an entry each way refuses is a
    record, never a callback, on the side the union refuses or, where the union refuses neither,
    the side the ways refuse (``_joint_stale``); one some way admits is judged in Python."""
    other = ip_address("192.0.2.99")
    lan0 = Prediction(frozenset({Binding(NatKind.NONE)}), OPTIONS[0], (UPLINKS[0],), WAYS[0])
    lan1 = Prediction(frozenset({Binding(NatKind.DNAT, other, other)}), frozenset({Binding(NatKind.NONE)}),
                      (UPLINKS[1],), WAYS[1])  # fmt: skip
    both = Prediction(lan0.dnat | lan1.dnat, OPTIONS[0] | lan1.snat, (*UPLINKS,), Unknown("lan0 or lan1"),  # type: ignore[operator]
                      alternatives=(lan0, lan1))  # fmt: skip
    predict = lambda fib, flow: both  # noqa: E731
    client, server = CLIENTS[0], SERVERS[0]
    done = IPS_CONFIRMED | IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE

    def entry(port: int, dst_seen: Any, src_seen: Any) -> Entry:
        return Entry(2, 17, CtTuple(client, server, port, 53), CtTuple(dst_seen, src_seen, 53, port), status=done,
                     id=port)  # fmt: skip

    # lan0 refuses its source (not masqueraded), lan1 its destination (not DNATed): the union refuses
    # neither, so the side is the one most ways refuse first, DNAT on a tie (side byte 2).
    joint = [entry(p, server, client) for p in range(1000, 1040)]
    # lan0 refuses the other masquerade address, lan1 its kept destination; the union refuses the source.
    union = [entry(p, server, TRANSLATED[2]) for p in range(2000, 2030)]
    # Masqueraded and not DNATed: lan0 gives it that, lan1 refuses it (DNAT); with no previous snapshot
    # it may be old, from lan1: undecided, judged in Python (never settled by the checks).
    healthy = [entry(p, server, MASQ) for p in range(3000, 3020)]
    items = [*healthy, *joint, *union]
    decider = Decider(predict=predict, fib_now=FIB, sport_matters=False, build=c.entry_from_raw,
                      classifier=classes_for(Eligibility(), sport_matters=False))  # fmt: skip
    plan, judged = scanned(decider, items)
    assert decider.records is not None
    sides = Counter(decider.records[i * 100 + 2] for i in range(len(decider.records) // 100))
    assert sides == {2: 40, 1: 30}  # one class: only its first entry (a healthy one) is added whole
    assert sorted(raw[4] for raw in judged) == list(range(3001, 3020))  # a way admits them: Python judges
    pure = decide(items, predict=predict, fib_now=FIB, sport_matters=False)
    key = lambda d: (d.entry, d.why, d.side, d.reason, d.code, d.actual, d.expected)  # noqa: E731
    assert Counter(map(key, plan.stale)) == Counter(map(key, pure.stale))
    assert Counter(plan.stale.codes()) == {"null_binding_now_nat": 40, "snat_changed": 30}  # type: ignore[attr-defined]
    assert Counter(d.side for d in plan.stale) == {"dnat": 40, "snat": 30}
    assert len(plan.stale) == 70
    assert Counter(map(key, plan.undecided)) == Counter(map(key, pure.undecided))
    assert {d.entry.orig.sport for d in plan.undecided} == set(range(3000, 3020))
    assert {d.code for d in plan.undecided} == {"unknown_ingress"}



@settings(max_examples=200, deadline=None)
@given(items=st.lists(table(), min_size=1, max_size=40))
def test_requests_are_encode_delete_and_encode_get_byte_for_byte(items: list[Entry]) -> None:
    items = [e for e in items if e.proto not in (1, 58)]
    records = b"".join(pack_record(e) for e in items)
    for delete in (True, False):
        expected = [(c.encode_delete(e, 40 + i, ack=False) if delete else c.encode_get(e, 40 + i))
                    for i, e in enumerate(items)]
        assert c._ctscan is not None
        assert c._ctscan.requests(records, 0, len(items), 40, delete) == b"".join(expected)
        select = bytes(i % 2 for i in range(len(items)))
        assert c._ctscan.requests(records, 0, len(items), 40, delete, select) == b"".join(expected[1::2])
        # ack_last: the last request encoded (of those selected) asks for an ACK, as encode_delete's.
        chosen = [i for i in range(len(items)) if select[i]]
        if delete and chosen:
            acked = [c.encode_delete(e, 40 + i, ack=i == chosen[-1]) for i, e in enumerate(items) if select[i]]
            assert c._ctscan.requests(records, 0, len(items), 40, True, select, True) == b"".join(acked)
            whole = [c.encode_delete(e, 40 + i, ack=i == len(items) - 1) for i, e in enumerate(items)]
            assert c._ctscan.requests(records, 0, len(items), 40, True, None, True) == b"".join(whole)
    if len(items) > 2:
        assert c._ctscan.requests(records, 1, 2, 41, True) == b"".join(
            c.encode_delete(e, 41 + i, ack=False) for i, e in enumerate(items[1:3]))


def get_answer(e: Entry, seq: int, *, status: int, ct_id: int, mark: int) -> bytes:
    now = Entry(e.family, e.proto, e.orig, e.reply, status=status, zone=e.zone, mark=mark, id=ct_id, timeout=30)
    return dump_message(now, seq)


def error_answer(seq: int, errno: int) -> bytes:
    request = struct.pack("=IHHII", 20, 0, 0, seq, 0)
    return struct.pack("=IHHIIi", 36, 2, 0, seq, 0, -errno) + request


@settings(max_examples=300, deadline=None)
@given(items=st.lists(table(), min_size=1, max_size=30), data=st.data())
def test_recheck_reads_answers_as_the_python_delete_path_does(items: list[Entry], data: st.DataObject) -> None:
    """Codes from ``recheck`` against an expectation written from ``Conntrack.delete_current``'s rules."""
    items = [e for e in items if e.proto not in (1, 58)]
    records = b"".join(pack_record(e) for e in items)
    answers: list[bytes] = []
    expected: list[int] = []
    for i, e in enumerate(items):
        kind = data.draw(st.sampled_from(["same", "replied", "remarked", "other id", "enoent", "ebusy", "lost"]))
        seq = 100 + i
        if kind == "same":
            answers.append(get_answer(e, seq, status=e.status, ct_id=e.id, mark=e.mark))
            expected.append(1)
        elif kind == "replied":
            answers.append(get_answer(e, seq, status=e.status ^ IPS_SEEN_REPLY, ct_id=e.id, mark=e.mark))
            expected.append(4)
        elif kind == "remarked":
            answers.append(get_answer(e, seq, status=e.status, ct_id=e.id, mark=e.mark ^ 1))
            expected.append(4)
        elif kind == "other id":
            answers.append(get_answer(e, seq, status=e.status, ct_id=e.id + 1, mark=e.mark))
            expected.append(2 if e.id else 1)  # an id of 0 matches any
        elif kind == "enoent":
            answers.append(error_answer(seq, 2))
            expected.append(2)
        elif kind == "ebusy":
            answers.append(error_answer(seq, 16))
            expected.append(3)
        else:
            expected.append(0)
    codes = bytearray(len(items))
    assert c._ctscan is not None
    errors, changed = c._ctscan.recheck(b"".join(answers), 100, records, 0, len(items), codes)
    assert list(codes) == expected
    assert errors == [(i, 16) for i, code in enumerate(expected) if code == 3]
    assert [i for i, *_ in changed] == [i for i, code in enumerate(expected) if code == 4]


# --- programs ------------------------------------------------------------------------------


def test_programs_encode_the_checks_byte_for_byte() -> None:
    lo, hi = int(ip_address("203.0.113.1")), int(ip_address("203.0.113.9"))
    program = compile_program(None, ((lo, hi, 1024, 2047, False), (None, None, None, None, True)))
    assert program == (b"P" + b"\x00" + b"\x02\x02"
                       + b"\x03" + lo.to_bytes(16, "big") + hi.to_bytes(16, "big") + b"\x04\x00\x07\xff"
                       + b"\x04" + bytes(32) + bytes(4))  # fmt: skip
    assert compile_program((), ()) == b"P\x01\x01"
    assert compile_program((( -1, 5, None, None, False),), ()) is None
    assert compile_program(((0, 1 << 128, None, None, False),), ()) is None
    assert compile_program(((None, None, 0, 70000, False),), ()) is None
    assert compile_program(tuple((None, None, None, None, False) for _ in range(256)), ()) is None


def iter_programs() -> Iterator[bytes]:
    for d in (None, (), ((1, 2, 3, 4, False),), ((1, 2, None, None, True),)):
        for s in (None, (), ((None, None, None, None, False), (5, 9, None, None, False))):
            program = compile_program(d, s)
            assert program is not None
            yield program


def test_a_truncated_program_never_settles_an_entry() -> None:
    """A program cut short (not one the Decider makes) sends the entry to Python, never settles it."""
    from topowatch.edges import _ctscan

    e = Entry(2, 17, CtTuple(CLIENTS[0], SERVERS[0], 1, 53), CtTuple(SERVERS[0], CLIENTS[0], 53, 1),
              status=IPS_CONFIRMED | IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE)  # fmt: skip
    msg = dump_message(e, 9)
    for program in iter_programs():
        for cut in range(1, len(program)):
            got: list[Any] = []
            parser = c.DumpParser(seq=9, sink=got.append)
            key = b"\0\0" + b"\0\0\0\0" + bytes((17, 2, 0)) + (53).to_bytes(2, "big") + CLIENTS[0].packed + SERVERS[0].packed
            cache: dict[bytes, bytes | None] = {key: program[:cut]}
            out = _ctscan.feed(parser, msg, len(msg), 9, 0, got.append, cache, lambda raw: None, got.append, False)
            assert len(got) == 1, (program, cut)  # judged in Python: a cut program settles nothing
            assert out[6] == 0


# --- choosing the path ---------------------------------------------------------------------


def test_the_pure_path_can_be_forced_and_the_doctor_says_which_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    from topowatch import doctor

    env = {"TOPOWATCH_PURE_PYTHON": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", "from topowatch.edges import ctcodec as c; "
                           "print(c.FAST_PATH, c._ctscan)"], capture_output=True, text=True, env=env, check=True)  # fmt: skip
    assert proc.stdout.strip() == "pure Python (TOPOWATCH_PURE_PYTHON is set) None"
    assert doctor._scan_path().status is doctor.Status.OK
    monkeypatch.setattr(c, "FAST_PATH", "pure Python (No module named 'topowatch.edges._ctscan')")
    found = doctor._scan_path()
    assert found.status is doctor.Status.WARNING
    assert "_ctscan" in found.detail and "compiler" in found.consequence


# --- the admission table through the compiled checks ------------------------------------------


def settled_in_c(case: AdmissionCase, side: str, order: tuple[Binding, ...]) -> bool:
    """True when the compiled scan settles the case's entry as healthy; False when it hands it to Python.

    A ``Decider`` predicts the case's bindings on ``side`` (no NAT on the other); the key's first
    entry, with no translation, goes to Python and leaves its program in the cache; the case's
    entry (same key, another source port, the case's translation on ``side``) is then read and
    checked in C only, by ``side_admits`` running that program.
    """
    peer = ip_address("10.9.9.9") if case.original.version == 4 else ip_address("fd09::9")
    family = 2 if case.original.version == 4 else 10
    # A tuple where the Decider takes a set: its program lists the bindings in this order.
    bindings: Any = order
    none = frozenset({Binding(NatKind.NONE)})

    def predict(fib: Fib, flow: Flow) -> Prediction:
        return Prediction(dnat=bindings if side == "dnat" else none, snat=bindings if side == "snat" else none,
                          egress=())  # fmt: skip

    status = IPS_CONFIRMED | IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE
    if side == "snat":  # original = orig src; translated = reply dst, port = reply dport
        orig1, orig2 = CtTuple(case.original, peer, 1, 53), CtTuple(case.original, peer, 2, 53)
        first = Entry(family, 17, orig1, CtTuple(peer, case.original, 53, 1), status=status)
        entry = Entry(family, 17, orig2, CtTuple(peer, case.translated, 53, case.port), status=status)
    else:  # original = orig dst; translated = reply src, port = reply sport (original port: orig dport)
        orig1, orig2 = CtTuple(peer, case.original, 1, case.before), CtTuple(peer, case.original, 2, case.before)
        first = Entry(family, 17, orig1, CtTuple(case.original, peer, case.before, 1), status=status)
        entry = Entry(family, 17, orig2, CtTuple(case.translated, peer, case.port, 2), status=status)
    decider = Decider(predict=predict, fib_now=FIB, sport_matters=False, build=c.entry_from_raw)
    sunk: list[Any] = []
    judged: list[Any] = []
    add_raw, judge_raw = decider.add_raw, decider.judge_raw

    def sink(raw: Any) -> None:
        sunk.append(raw)
        add_raw(raw)

    def judge(raw: Any) -> None:
        judged.append(raw)
        judge_raw(raw)

    decider.judge_raw = judge  # type: ignore[method-assign]
    parser = c.DumpParser(seq=9, skip_replied=True, sink=sink)
    parser.settle = decider
    parser.feed(dump_message(first, 9) + dump_message(entry, 9))
    assert [r[4] for r in sunk] == [1], "the key's first entry is added in Python, the second read in C"
    assert len(judged) in (0, 1)
    assert decider.examined == 2
    return not judged


@pytest.mark.parametrize("side", ["snat", "dnat"])
@pytest.mark.parametrize("case", ADMISSION, ids=[a.name for a in ADMISSION])
def test_the_compiled_checks_follow_the_admission_table(case: AdmissionCase, side: str) -> None:
    assert c._ctscan is not None
    for order in itertools.permutations(case.bindings):
        assert settled_in_c(case, side, order) is case.expected(side), order


@settings(max_examples=300, deadline=None)
@given(items=st.lists(table(), min_size=1, max_size=8), noise=st.binary(max_size=600), data=st.data())
def test_recheck_survives_any_answer_bytes(items: list[Entry], noise: bytes, data: st.DataObject) -> None:
    """Garbage, truncated or lying answers never crash the compiled re-check; codes stay in range."""
    items = [e for e in items if e.proto not in (1, 58)] or [udp_entry()]
    records = b"".join(pack_record(e) for e in items)
    good = b"".join(get_answer(e, 100 + i, status=e.status, ct_id=e.id, mark=e.mark) for i, e in enumerate(items))
    cut = data.draw(st.integers(0, len(good)))
    codes = bytearray(len(items))
    assert c._ctscan is not None
    for answers in (noise, good[:cut], good[:cut] + noise):
        c._ctscan.recheck(answers, 100, records, 0, len(items), codes)
        assert set(codes) <= {0, 1, 2, 3, 4}
    with pytest.raises(ValueError):
        c._ctscan.recheck(good, 100, records[:-1], 0, len(items), codes)  # not whole records
    with pytest.raises(ValueError):
        c._ctscan.requests(records, 0, len(items) + 1, 1, True)  # past the end


def udp_entry() -> Entry:
    return Entry(2, 17, CtTuple(CLIENTS[0], SERVERS[0], 1000, 53), CtTuple(SERVERS[0], MASQ, 53, 1000),
                 status=IPS_CONFIRMED | IPS_SRC_NAT_DONE)  # fmt: skip


@pytest.mark.parametrize("compiled", [True, False])
def test_entries_differing_only_in_source_port_are_each_judged_by_their_own_prediction(compiled: bool) -> None:
    """Rules that read the source port (``sport_matters``): a flow from port 5060 is masqueraded,
    the same flow from port 1000 is not NATed. Four masqueraded entries, ports 5060, 1000, 5060,
    1000: the two from port 1000 are stale, and no cached check of one port serves the other (the
    run of 2026-12-03, sixth session: ``DumpParser._feed_compiled`` passing ``sport_matters`` as
    None to the scan, which then keyed its cache without the port, survived: no test's
    predictions read the source port)."""

    def predict(fib: Fib, flow: Flow) -> Prediction:
        masq = frozenset({Binding(NatKind.MASQUERADE, MASQ, MASQ)})
        snat = masq if flow.sport == 5060 else frozenset({Binding(NatKind.NONE)})
        return Prediction(dnat=frozenset({Binding(NatKind.NONE)}), snat=snat, egress=(UPLINKS[0],))

    client, server = ip_address("10.0.1.2"), ip_address("192.0.2.10")
    items = [Entry(2, 17, CtTuple(client, server, sport, 53), CtTuple(server, MASQ, 53, sport),
                   status=IPS_CONFIRMED | IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE, id=i)
             for i, sport in enumerate((5060, 1000, 5060, 1000), start=1)]  # fmt: skip
    saved = c._ctscan
    if not compiled:
        c._ctscan = None
    elif saved is None:
        pytest.skip("the compiled scan is not built")
    try:
        decider = Decider(predict=predict, fib_now=FIB, eligibility=Eligibility(), sport_matters=True,
                          build=c.entry_from_raw)  # fmt: skip
        parser = c.DumpParser(seq=9, sink=decider.add_raw)
        parser.settle = decider
        parser.feed(b"".join(dump_message(e, 9) for e in items))
        for e in parser.entries:
            decider.add(e)
        plan = decider.plan()
    finally:
        c._ctscan = saved
    assert sorted(d.entry.id for d in plan.stale) == [2, 4]
    assert (plan.examined, plan.eligible, len(plan.undecided)) == (4, 4, 0)


def test_undecided_entries_of_a_known_class_become_undecided_records_without_python() -> None:
    """A class whose destination NAT cannot be predicted, its egress unchanged but the ruleset
    changed: the class's first entry is judged whole (undecided, ``unknown_nat``), every other one
    is an undecided record of the compiled scan, never a callback (the ninth run: ``_feed_compiled``
    24, 25, 30, 31, 50, 63, the undecided records not passed to the scan, survived: the entries then
    reached ``judge_raw`` and the plan was the same)."""
    unknown = Unknown("xt match")
    prediction = Prediction(unknown, frozenset({Binding(NatKind.NONE)}), ())
    predict = lambda fib, flow: prediction  # noqa: E731
    client, server = CLIENTS[0], SERVERS[0]
    items = [Entry(2, 17, CtTuple(client, server, p, 53), CtTuple(server, client, 53, p), status=IPS_CONFIRMED,
                   id=p) for p in range(1000, 1030)]  # fmt: skip
    decider = Decider(predict=predict, fib_now=FIB, fib_before=FIB, predict_before=predict, sport_matters=False,
                      build=c.entry_from_raw, classifier=classes_for(Eligibility(), sport_matters=False))  # fmt: skip
    plan, judged = scanned(decider, items)
    assert judged == []
    assert decider.undecided_records is not None and len(decider.undecided_records) == 29 * 100
    assert decider.records == bytearray()
    assert plan.stale == ()
    assert [(d.entry, d.code) for d in plan.undecided] == [(e, "unknown_nat") for e in items]
    assert plan.examined == plan.eligible == 30


class Settle:
    """A consumer with the scan's documented attributes only (no class tables, no records)."""

    def __init__(self, sport_matters: bool) -> None:
        self.raw_cache: dict[object, object] = {}
        self.sport_matters = sport_matters
        self.examined = self.eligible = 0
        self.judged: list[object] = []

    def raw_program(self, raw: object) -> bytes:
        return b"R"  # refused: counted as examined, nothing else

    def judge_raw(self, raw: object) -> None:
        self.judged.append(raw)


@pytest.mark.parametrize("sport_matters", [False, True])
def test_a_consumer_without_class_tables_or_records_settles_by_flow_key(sport_matters: bool) -> None:
    """``DumpParser.settle`` needs only raw_cache, raw_program, judge_raw, sport_matters, examined and
    eligible (its comment): the scan keys its cache by flow, with or without the source port (the
    ninth run: ``_feed_compiled`` 13, 21, 29, those optional attributes read as required, survived)."""
    client, server = CLIENTS[0], SERVERS[0]
    items = [Entry(2, 17, CtTuple(client, server, p, 53), CtTuple(server, client, 53, p), status=IPS_CONFIRMED)
             for p in (1000, 1001, 1002)]  # fmt: skip
    sunk: list[object] = []
    settle = Settle(sport_matters)
    parser = c.DumpParser(seq=9, sink=sunk.append, settle=settle)
    parser.feed(b"".join(dump_message(e, 9) for e in items))
    # One key (ports ignored): the first entry to the sink, the others settled as refused. Each its
    # own key: every entry to the sink.
    assert [raw[4] for raw in sunk] == ([1000, 1001, 1002] if sport_matters else [1000])  # type: ignore[index]
    assert (settle.examined, settle.eligible, settle.judged) == ((0, 0, []) if sport_matters else (2, 0, []))
    assert parser.messages == 3
