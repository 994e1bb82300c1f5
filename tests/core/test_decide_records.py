"""Stale and undecided records (``Decider.records``): each record's code, read from the record
alone (``StaleDecisions.codes``), is the one written out here and the one its Decision carries.

The mutation run of 2026-12-03 (README "Mutation testing") found ``codes`` never read on its
own: every test that read it had built the decisions first, and ``codes`` then answers from
them, so ``Decider._record_codes`` and ``_joint_expected`` could be changed at will. Here
records are written by hand (``pack_record``: the layout a compiled scan writes) with the side
byte the scan gives them, for every kind of prediction a record comes from: both sides known,
a side that cannot be predicted, alternatives refused by their union on one side, and
alternatives each refusing another side (``_JOINT``); UDP and ICMP. Each expected code is
written out from the rules in decide's docstring (``_code_of``: the entry carries no NAT on
that side; or the prediction gives none there; or other), not computed by the code under test.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Any

import pytest

from topowatch.core.conntrack import IPS_CONFIRMED, IPS_DST_NAT_DONE, IPS_SRC_NAT_DONE, CtTuple, Entry
from topowatch.core.decide import Decider, StaleDecisions, _alternatives_block, pack_record
from topowatch.core.fib import Fib
from topowatch.core.flow import (
    IPPROTO_ICMP,
    IPPROTO_UDP,
    NO_NAT,
    Binding,
    Flow,
    Ingress,
    NatKind,
    Prediction,
    Unknown,
)
from topowatch.core.model import AF_INET

from test_decide import FIB_BEFORE, FIB_NOW, UP1, UP2, from_raw, to_raw  # isort: skip
from test_decide_fields import classifier  # isort: skip

CLIENT = IPv4Address("10.0.1.2")  # the LAN class of test_decide_fields.CLASSED
SERVER = IPv4Address("198.51.100.7")  # the default route's class
DONE = IPS_CONFIRMED | IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE
M = IPv4Address("203.0.113.2")  # a masquerade address
Y = IPv4Address("100.64.0.2")  # another source address
X = IPv4Address("10.0.9.10")  # a DNAT target
Z = IPv4Address("10.0.9.11")  # another one
W = IPv4Address("10.0.9.12")  # a third

MASQ_M = Binding(NatKind.MASQUERADE, M, M)
TO_X = Binding(NatKind.DNAT, X, X)
TO_W = Binding(NatKind.DNAT, W, W)
NONE = frozenset({NO_NAT})


def udp(port: int, dst_seen: IPv4Address = SERVER, src_seen: IPv4Address = CLIENT) -> Entry:
    """A UDP entry to SERVER:53 from CLIENT:port, whose reply comes from ``dst_seen`` to ``src_seen``
    (ports kept)."""
    return Entry(AF_INET, IPPROTO_UDP, CtTuple(CLIENT, SERVER, port, 53), CtTuple(dst_seen, src_seen, 53, port),
                 status=DONE, id=port)  # fmt: skip


def ping(ident: int, dst_seen: IPv4Address = SERVER, src_seen: IPv4Address = CLIENT) -> Entry:
    """An ICMP echo (type 8) whose reply is an echo reply (type 0): the "ports" differ by convention
    (``CtTuple``: sport the id, dport type << 8 | code), yet nothing was translated."""
    return Entry(AF_INET, IPPROTO_ICMP, CtTuple(CLIENT, SERVER, ident, 0x0800),
                 CtTuple(dst_seen, src_seen, ident, 0x0000), status=DONE, id=ident)  # fmt: skip


def always(prediction: Prediction, before: Prediction | None = None) -> Callable[[Fib, Flow], Prediction]:
    def predict(fib: Fib, flow: Flow) -> Prediction:
        return before if fib is FIB_BEFORE and before is not None else prediction

    return predict


def way(name: str, index: int, dnat: frozenset[Binding], snat: frozenset[Binding]) -> Prediction:
    return Prediction(dnat, snat, (UP2,), Ingress(index, name))


def joined(*ways: Prediction) -> Prediction:
    """Alternatives and their union (``Prediction``: dnat and snat are the unions)."""
    dnat = frozenset().union(*(w.dnat for w in ways))  # type: ignore[arg-type]
    snat = frozenset().union(*(w.snat for w in ways))  # type: ignore[arg-type]
    return Prediction(dnat, snat, (UP2,), Unknown("lan0 or lan1"), alternatives=ways)


LAN0 = way("lan0", 4, NONE, frozenset({MASQ_M}))
LAN1 = way("lan1", 5, frozenset({TO_X}), NONE)
LAN2 = way("lan2", 6, frozenset({TO_X}), NONE)  # LAN1 by another interface
PLAIN = Prediction(NONE, frozenset({MASQ_M}), (UP2,))

# name, prediction, previous snapshot's prediction (FIB_BEFORE) or None, seed entry (judged whole
# first: it gives the class its slot), undecided records (else stale), [(entry, side byte, code)].
Case = tuple[str, Prediction, Prediction | None, Entry, bool, list[tuple[Entry, int, str]]]
CASES: list[Case] = [
    ("both sides known", PLAIN, None, udp(1), False, [
        (udp(10), 1, "null_binding_now_nat"),  # source kept, masquerade expected
        (udp(11, src_seen=Y), 1, "snat_changed"),  # SNAT to Y, masquerade to M expected
        (udp(12, dst_seen=X), 0, "nat_now_none"),  # DNAT to X, no DNAT expected
    ]),
    ("known, DNAT expected, no SNAT", Prediction(frozenset({TO_X}), NONE, (UP2,)), None, udp(1), False, [
        (udp(10), 0, "null_binding_now_nat"),  # destination kept, DNAT to X expected
        (udp(11, dst_seen=Z), 0, "dnat_changed"),  # DNAT to Z
        (udp(12, dst_seen=X, src_seen=Y), 1, "nat_now_none"),  # DNAT right, SNAT to Y, none expected
    ]),
    # The compiled scan sends every ICMP entry to Python (``_ctscan.c`` ``verdict``), so no record is
    # ICMP today; one written by hand reads back as its Decision all the same.
    ("ICMP, known", Prediction(frozenset({TO_X}), frozenset({MASQ_M}), (UP2,)), None, ping(1), False, [
        (ping(10, dst_seen=X), 1, "null_binding_now_nat"),  # source kept (an echo reply's type is not a port)
        (ping(11), 0, "null_binding_now_nat"),  # destination kept
        (ping(12, dst_seen=Z, src_seen=M), 0, "dnat_changed"),
        (ping(13, dst_seen=X, src_seen=Y), 1, "snat_changed"),
    ]),
    ("source unpredictable, egress moved", Prediction(NONE, Unknown("xt match"), (UP2,)),
     Prediction(NONE, Unknown("xt match"), (UP1,)), udp(1), False, [
        (udp(10, src_seen=Y), 1, "egress_changed_unknown_nat"),
        (udp(11, src_seen=M), 1, "egress_changed_unknown_nat"),
    ]),
    ("source unpredictable, egress unknown", Prediction(NONE, Unknown("xt match"), Unknown("fwmark rule")),
     Prediction(NONE, Unknown("xt match"), (UP1,)), udp(1), True, [
        (udp(10, src_seen=Y), 1, "unknown_nat_unknown_egress"),
    ]),
    ("destination unpredictable, no previous snapshot", Prediction(Unknown("xt match"), NONE, (UP2,)), None,
     udp(1), True, [
        (udp(10, dst_seen=X), 0, "unknown_nat"),
    ]),
    # The union of LAN0 and LAN1 refuses a source SNATed to Y (no way gives Y): side byte 1, and
    # the union gives M or nothing there.
    ("alternatives, the union refuses a side", joined(LAN0, LAN1), None, udp(1), False, [
        (udp(10, src_seen=Y), 1, "snat_changed"),
        (udp(11, dst_seen=Z), 0, "dnat_changed"),  # DNAT to Z: the union gives X or nothing
    ]),
    # Both ways give no SNAT; the union refuses SNAT to Y (nothing now), and DNAT to Z (X expected).
    ("alternatives, no SNAT either way", joined(way("lan0", 4, NONE, NONE), LAN1), None, udp(1), False, [
        (udp(10, src_seen=Y), 1, "nat_now_none"),
        (udp(11, dst_seen=Z), 0, "dnat_changed"),
    ]),
    # A way that drops the flow (no SNAT side) after a DNAT to W: the union's DNAT side holds W, so
    # an entry DNATed to Z is refused a binding the union gives (not "no NAT now").
    ("alternatives, one dropped after its DNAT", joined(way("lan0", 4, NONE, frozenset({MASQ_M})),
                                                        way("lan2", 6, frozenset({TO_W}), frozenset())),
     None, udp(1), False, [
        (udp(10, dst_seen=Z), 0, "dnat_changed"),
        # DNAT to W and masqueraded: the union gives both (W by the dropped way), the one live way
        # refuses the destination: the ways' side, and no live way gives a DNAT there now.
        (udp(11, dst_seen=W, src_seen=M), 2, "nat_now_none"),
    ]),
    # Each way refuses another side, the union neither: the side most ways refuse first, DNAT on a
    # tie (``_joint_stale``), or'ed with _JOINT (2).
    ("alternatives, each refuses a side", joined(LAN0, LAN1), None, udp(1), False, [
        (udp(10), 2, "null_binding_now_nat"),  # LAN0 refuses the kept source, LAN1 the kept destination
        (udp(11, dst_seen=X, src_seen=M), 2, "dnat_changed"),  # LAN0 refuses DNAT to X, LAN1 SNAT to M
    ]),
    ("alternatives, most refuse the source", joined(LAN0, LAN1, LAN2), None, udp(1), False, [
        (udp(10, dst_seen=X, src_seen=M), 3, "snat_changed"),  # LAN0 refuses DNAT, LAN1 and LAN2 SNAT
        (udp(11), 2, "null_binding_now_nat"),  # kept tuples: LAN0 refuses the source, LAN1, LAN2 DNAT
    ]),
]


def recorded(case: Case) -> Decider:
    """A Decider with the case's seed added whole and its records appended to the seed's slot."""
    _, prediction, before, seed, undecided, records = case
    decider = Decider(predict=always(prediction, before), fib_now=FIB_NOW,
                      fib_before=FIB_BEFORE if before is not None else None, classifier=classifier(),
                      build=from_raw, sport_matters=False)  # fmt: skip
    decider.add_raw(to_raw(seed))
    program = decider.raw_program(to_raw(seed))
    assert program is not None and program[-5:-4] == b"S"  # a slot: records may name it
    slot = int.from_bytes(program[-4:], sys.byteorder)
    target = decider.undecided_records if undecided else decider.records
    assert target is not None
    for e, side, _ in records:
        target += pack_record(e, side, slot)
    return decider


def records_of(decider: Decider, undecided: bool) -> StaleDecisions:
    plan = decider.plan()
    decisions: Any = plan.undecided if undecided else plan.stale
    assert isinstance(decisions, StaleDecisions)
    return decisions


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_each_records_code_is_read_from_the_record(case: Case) -> None:
    _, _, _, _, undecided, records = case
    decider = recorded(case)
    decisions = records_of(decider, undecided)
    head = len(decisions.head)
    # Read from the records alone first (nothing built yet) ...
    assert decisions.codes()[head:] == [code for _, _, code in records]
    # ... and the same as each record's Decision, built one by one and then all together.
    fresh = records_of(decider, undecided)
    built = [fresh.at(head + i) for i in range(len(records))]
    assert [d.code for d in built] == [code for _, _, code in records]
    assert [d.entry for d in built] == [e for e, _, _ in records]
    assert [d.side for d in built] == ["snat" if side & 1 else "dnat" for _, side, _ in records]
    assert [d.code for d in records_of(decider, undecided)][head:] == [code for _, _, code in records]


def test_the_records_agree_with_judging_each_entry_whole() -> None:
    """Each case's record entries, added whole to a Decider without records, get the same verdicts
    and codes (the records stand for what the reasoned path decides)."""
    for name, prediction, before, _, undecided, records in CASES:
        decider = Decider(predict=always(prediction, before), fib_now=FIB_NOW,
                          fib_before=FIB_BEFORE if before is not None else None)  # fmt: skip
        for e, _, _ in records:
            decider.add(e)
        plan = decider.plan()
        judged = plan.undecided if undecided else plan.stale
        assert [(d.entry, d.code) for d in judged] == [(e, code) for e, _, code in records], name
        assert not (plan.stale if undecided else plan.undecided), name


@pytest.mark.parametrize("side", ["snat", "dnat"])
@pytest.mark.parametrize("ruleset_changed", [False, True])
def test_an_unpredictable_class_with_its_egress_unchanged_is_undecided_only_where_the_ruleset_changed(
    ruleset_changed: bool, side: str,
) -> None:
    """The reasoned path: the egress alone says nothing once the ruleset changed (undecided,
    UNKNOWN_NAT), else nothing is to be done. The class's program (mode 3) carries that verdict to
    the compiled scan: 2 (undecided) or 0 (nothing), the other side its checks; and an undecided
    record reads back as the reasoned path's Decision. (Before 2026-12-03 the program said 0 in
    both cases: with a new ruleset the scan left the class's other entries silently alone, where
    Python listed them.)"""
    unknown = Unknown("xt match")
    if side == "snat":
        prediction = Prediction(NONE, unknown, (UP2,))
        seed, other, byte, what = udp(1, src_seen=Y), udp(10, src_seen=Y), 1, "source"
    else:
        prediction = Prediction(unknown, NONE, (UP2,))
        seed, other, byte, what = udp(1, dst_seen=X), udp(10, dst_seen=X), 0, "destination"
    predict = always(prediction, prediction)  # the same egress before and now
    decider = Decider(predict=predict, fib_now=FIB_NOW, fib_before=FIB_BEFORE, classifier=classifier(),
                      build=from_raw, sport_matters=False,
                      predict_before=predict if ruleset_changed else None)  # fmt: skip
    decider.add_raw(to_raw(seed))
    program = decider.raw_program(to_raw(seed))
    assert program is not None
    slot = program[-4:]
    verdict = b"\x03\x02" if ruleset_changed else b"\x03\x00"
    # No NAT on the known side: one binding, address kept (and on the destination side the port).
    if side == "snat":
        assert program == b"P" + b"\x02\x01" + b"\x04" + bytes(36) + verdict + b"S" + slot
    else:
        assert program == b"P" + verdict + b"\x02\x01" + b"\x00" + bytes(36) + b"S" + slot
    plan = decider.plan()
    assert plan.stale == ()
    if not ruleset_changed:
        assert plan.undecided == ()
        return
    assert [(d.entry, d.code, d.why.ruleset_changed) for d in plan.undecided] == [(seed, "unknown_nat", True)]
    assert decider.undecided_records is not None
    decider.undecided_records += pack_record(other, byte, int.from_bytes(slot, sys.byteorder))
    decisions = records_of(decider, undecided=True)
    assert decisions.codes() == ["unknown_nat", "unknown_nat"]
    assert list(decisions.entries()) == [seed, other]  # read from the record, as for stale ones
    built = records_of(decider, undecided=True)[1]
    assert (built.entry, built.side, built.code, built.why.ruleset_changed) == (other, side, "unknown_nat", True)
    assert built.reason == f"{what} NAT cannot be predicted (xt match); the egress is the same, but the ruleset changed"


def test_the_protocols_of_records_alone_and_the_first_records_entries() -> None:
    """``protos`` reads the records' protocol bytes also where no decision was built in Python (the
    class's first entry was healthy); ``first(n)`` keeps the first n records, their entries read
    from the records as the delete reads them."""
    decider = recorded(("", PLAIN, None, udp(1, src_seen=M), False, [
        (udp(10), 1, "null_binding_now_nat"), (udp(11, src_seen=Y), 1, "snat_changed"),
    ]))
    decisions = records_of(decider, undecided=False)
    assert decisions.head == ()  # the seed is healthy (masqueraded to M)
    assert decisions.protos() == {IPPROTO_UDP}
    first = decisions.first(1)
    assert list(first.entries()) == [udp(10)]
    assert first.codes() == ["null_binding_now_nat"]
    assert [d.entry for d in first] == [udp(10)]


@pytest.mark.parametrize(("ways", "fits"), [(255, True), (256, False)])
def test_an_alternatives_block_counts_its_ways_in_one_byte(ways: int, fits: bool) -> None:
    """Up to 255 live ways fit the block's count byte; more go to Python (None), never a crash."""
    alternatives = tuple(way(f"lan{i}", 10 + i, NONE, frozenset({MASQ_M})) for i in range(ways))
    block = _alternatives_block(joined(*alternatives))
    if not fits:
        assert block is None
        return
    assert block is not None
    side = b"\x02\x01" + b"\x04" + bytes(36)  # no DNAT: address and port kept
    masq = b"\x02\x01" + b"\x01" + int(M).to_bytes(16, "big") * 2 + bytes(4)
    assert block == b"A" + side + masq + bytes((255,)) + (side + masq) * 255


DISAGREEMENTS = [  # name, prediction, record entry, side byte, undecided record
    ("stale, masqueraded as predicted", PLAIN, udp(10, src_seen=M), 1, False),
    ("undecided, masqueraded as predicted", PLAIN, udp(10, src_seen=M), 1, True),
    # LAN0 gives it its bindings (no DNAT, masquerade to M): no way refuses it.
    ("stale, a way gives it its bindings", joined(LAN0, LAN1), udp(10, src_seen=M), 0, False),
    # Every way refuses it (the joint case above), but the scan records alternatives stale only.
    ("undecided, every way refuses it", joined(LAN0, LAN1), udp(10), 0, True),
]


@pytest.mark.parametrize(("name", "prediction", "e", "side", "undecided"), DISAGREEMENTS,
                         ids=[c[0] for c in DISAGREEMENTS])  # fmt: skip
def test_a_record_the_reference_does_not_judge_so_reads_as_a_disagreement(
    name: str, prediction: Prediction, e: Entry, side: int, undecided: bool
) -> None:
    """A record the reasoned path would not make (an entry it leaves alone, or an undecided record
    of a prediction with alternatives, which the scan only ever records stale) is a defect of the
    compiled scan: its Decision says so, with the scan's verdict, never a reason."""
    decider = recorded((name, prediction, None, udp(1), undecided, [(e, side, "")]))
    decisions = records_of(decider, undecided)
    d = decisions.at(len(decisions.head))
    verdict = "undecided" if undecided else "stale"
    assert (d.entry, d.side, d.code, d.why.verdict) == (e, "snat" if side & 1 else "dnat", "internal_disagreement",
                                                        verdict)  # fmt: skip
    assert d.reason == (f"judged {verdict} by the compiled scan, but the reference judgement disagrees "
                        "(a defect)")  # fmt: skip
    assert d.actual is None and d.expected == ()


def test_records_compare_and_hash_as_their_decisions() -> None:
    decider = recorded(CASES[0])
    decisions = records_of(decider, undecided=False)
    built = tuple(records_of(decider, undecided=False))
    assert decisions == built and decisions == list(built) and hash(decisions) == hash(built)
    assert decisions != built[1:]
    assert decisions != "not decisions"  # a sequence, but text
    assert decisions != 5  # not a sequence
    assert repr(records_of(decider, undecided=False)) == "StaleDecisions(1 built, 3 as records)"
