# SPDX-License-Identifier: GPL-2.0-or-later
"""A record's reason names the entry's own route before, as well as now.

The tenth mutation run (2026-12-04) found ``Decider._record_decision`` 91 (the previous
prediction not passed to ``_decision``) surviving: no test built a record of a class whose side
could not be predicted, with a previous snapshot whose route for the record's destination is
narrower than the class's. ``_own_words`` then words the egress before with ``before.dnat`` and
the previous FIB; without ``before`` it kept the class's route (the first flow's).
"""

from __future__ import annotations

import sys
from ipaddress import IPv4Address, ip_network

import pytest

from topowatch.core.conntrack import IPS_CONFIRMED, IPS_DST_NAT_DONE, IPS_SRC_NAT_DONE, CtTuple, Entry
from topowatch.core.decide import Decider, StaleDecisions, pack_record
from topowatch.core.flow import IPPROTO_UDP, NO_NAT, Binding, NatKind, Prediction, Unknown
from topowatch.core.model import AF_INET

from test_decide import FIB_NOW, UP2, from_raw, to_raw  # isort: skip
from test_decide_fields import classifier  # isort: skip
from test_fib import OWN, fib, ip  # isort: skip

CLIENT = IPv4Address("10.0.1.2")  # the LAN class of test_decide_fields.CLASSED
Y = IPv4Address("100.64.0.2")  # the source the entries were translated to
DONE = IPS_CONFIRMED | IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE


def udp(port: int, dst: str) -> Entry:
    """UDP from CLIENT:port to ``dst``:53, its source translated to Y (the destination kept)."""
    d = IPv4Address(dst)
    return Entry(AF_INET, IPPROTO_UDP, CtTuple(CLIENT, d, port, 53), CtTuple(d, Y, 53, port),
                 status=DONE, id=port)  # fmt: skip


def test_a_stale_records_egress_before_is_its_own_route_in_the_previous_fib() -> None:
    fib_before = fib(OWN)
    (default,) = fib_before.lookup(ip("192.0.2.1"))  # type: ignore[misc]
    assert (default.route, str(default.prefix)) == ("default via 203.0.113.1 dev wan table main", "0.0.0.0/0")
    unknown = Unknown("xt match")
    now = Prediction(frozenset({NO_NAT}), unknown, (UP2,))
    then = Prediction(frozenset({NO_NAT}), unknown, (default,))  # another egress then: stale

    def predict(f: object, flow: object) -> Prediction:
        return then if f is fib_before else now

    decider = Decider(predict=predict, fib_now=FIB_NOW, fib_before=fib_before, classifier=classifier(),
                      build=from_raw, sport_matters=False)  # fmt: skip
    seed = udp(1, "192.0.2.70")  # the class's first flow: the default route carried it then
    decider.add_raw(to_raw(seed))
    program = decider.raw_program(to_raw(seed))
    assert program is not None and program[-5:-4] == b"S"
    slot = int.from_bytes(program[-4:], sys.byteorder)
    other = udp(10, "8.9.1.1")  # main's 8.0.0.0/8, via the same gateway, carried this one then
    assert decider.records is not None
    decider.records += pack_record(other, 1, slot)  # side byte 1: the source
    stale = decider.plan().stale
    assert isinstance(stale, StaleDecisions)
    built = stale.at(len(stale.head))
    assert (built.entry, built.side, built.code) == (other, "snat", "egress_changed_unknown_nat")
    egress_before = built.why.egress_before
    assert isinstance(egress_before, tuple) and len(egress_before) == 1
    assert (egress_before[0].route, str(egress_before[0].prefix)) == (
        "8.0.0.0/8 via 203.0.113.1 dev wan table main", "8.0.0.0/8")


def test_only_a_dnat_range_routed_one_by_one_keeps_a_class_route() -> None:
    """The fixed DNAT addresses that keep a class's route are those of a range of at most 64.

    A flow of a class may be routed to its destination (a binding that keeps it) or to a fixed
    DNAT address; an egress whose route carries one of those addresses stays the class's. A range
    of more than 64 addresses (``MAX_DNAT_ADDRESSES``) is never routed one by one (its egress is
    unknown), so its addresses keep nothing: the flow to 192.0.2.70 gets the default route's
    words, as with no range at all (``test_own_route_names_the_route_that_carries_the_flow``).
    The eleventh mutation review found ``_own_routes`` 9 (``or`` for ``and``) untested: it lists
    every address of any range, however wide.
    """
    from topowatch.core.decide import _own_routes

    f = fib(OWN)
    (eight,) = f.lookup(ip("8.1.2.3"))  # type: ignore[misc]
    assert str(eight.prefix) == "8.0.0.0/8"
    default = ("default via 203.0.113.1 dev wan table main", "0.0.0.0/0")

    def words(last: str, first: str = "8.1.1.0") -> tuple[str, str | None]:
        dnat = frozenset({NO_NAT, Binding(NatKind.DNAT, ip(first), ip(last))})
        (worded,) = _own_routes((eight,), ip("192.0.2.70"), dnat, f)
        return worded.route, None if worded.prefix is None else str(worded.prefix)

    # 64 addresses (8.1.1.0-8.1.1.63), each routed by 8.0.0.0/8: the class's route stays.
    assert words("8.1.1.63") == ("8.0.0.0/8 via 203.0.113.1 dev wan table main", "8.0.0.0/8")
    # 65 addresses: not routed one by one, so the flow's own route is the default.
    assert words("8.1.1.64") == default
    assert words("8.255.255.255") == default
    # One address: routed by 8.0.0.0/8, it keeps the class's route; 7.255.255.255, routed by the
    # default, does not (the next address, 8.0.0.0, is no destination of the flow).
    assert words("8.1.1.0") == ("8.0.0.0/8 via 203.0.113.1 dev wan table main", "8.0.0.0/8")
    assert words("7.255.255.255", first="7.255.255.255") == default


def test_each_way_of_a_class_names_the_entrys_own_route() -> None:
    """Within a class, the ways an undecided entry may have come are worded with its own route.

    Two ways, both out by main's 8.0.0.0/8 route (the class's first flow went to 8.1.2.3): lan0
    masquerades to 100.64.0.2 (the entry's binding), lan1 to 198.51.100.2. Without a previous
    snapshot the entry, SNATed to 100.64.0.2, is undecided (``unknown_ingress``), naming lan0 as
    a way that keeps it and lan1 as one that refuses its source. For the entry to 192.0.2.70 both
    ways leave by the default route (``test_fib``'s OWN, via the same gateway), so both are named
    so; for one to 8.9.1.1 the class's route is its own and stays. The eleventh mutation run found
    ``_own_words``'s rewording of ``keeps`` and ``ways`` (39-44, 55, 56, 60, 61) and its
    ``_own_routes`` call with no destination (31) untested.
    """
    import dataclasses

    from topowatch.core.flow import Ingress
    from topowatch.core.reason import Way

    from test_alternatives import union  # isort: skip

    f = fib(OWN)
    (eight,) = f.lookup(ip("8.1.2.3"))  # type: ignore[misc]
    assert (eight.route, str(eight.prefix)) == ("8.0.0.0/8 via 203.0.113.1 dev wan table main", "8.0.0.0/8")
    lan0, lan1 = Ingress(2, "lan0"), Ingress(3, "lan1")
    given, other = Binding(NatKind.SNAT, Y), Binding(NatKind.SNAT, ip("198.51.100.2"))
    keeps = Prediction(frozenset({NO_NAT}), frozenset({given}), (eight,), lan0)
    refuses = Prediction(frozenset({NO_NAT}), frozenset({other}), (eight,), lan1)
    now = union(keeps, refuses)

    def why(dst: str) -> tuple[str, tuple[Way, ...], tuple[Way, ...]]:
        decider = Decider(predict=lambda fib, flow: now, fib_now=f, classifier=classifier(), sport_matters=False)
        decider.add(udp(7, dst))
        plan = decider.plan()
        assert not plan.stale
        (undecided,) = plan.undecided
        return undecided.code, undecided.why.keeps, undecided.why.ways

    default = dataclasses.replace(eight, route="default via 203.0.113.1 dev wan table main",
                                  prefix=ip_network("0.0.0.0/0"))  # fmt: skip
    assert why("192.0.2.70") == (
        "unknown_ingress", (Way(lan0, (default,)),), (Way(lan1, (default,), "snat", (other,)),))
    assert why("8.9.1.1") == ("unknown_ingress", (Way(lan0, (eight,)),), (Way(lan1, (eight,), "snat", (other,)),))


@pytest.mark.parametrize("case", ["dnat stale", "snat stale", "undecided"])
def test_an_entry_judged_one_by_one_names_its_own_route_before(case: str) -> None:
    """As the record above, but judged by ``Decider.add`` (no compiled scan): its reason's egress
    before is its own route in the previous FIB, whichever side cannot be predicted and whether
    the entry is stale (the egress moved) or undecided (the egress stayed, the ruleset changed).

    The class's first flow went to 192.0.2.70 (the default route then); this entry goes to
    8.9.1.1, which main's 8.0.0.0/8 carried then (``test_fib``'s OWN, worked by hand). The
    eleventh mutation run found ``Decider._judge`` 38, 63, 79 (``before`` not passed to
    ``_decision``) untested: the reason then kept the class's route.
    """
    fib_before = fib(OWN)
    (default,) = fib_before.lookup(ip("192.0.2.1"))  # type: ignore[misc]
    unknown = Unknown("xt match")
    kept, to_y = frozenset({NO_NAT}), frozenset({Binding(NatKind.SNAT, Y)})
    if case == "dnat stale":
        # The destination NAT is unknown now only (say a match on the route now unknown): the
        # destination was kept then, so the route then is the one to 8.9.1.1 itself.
        then, now = Prediction(kept, to_y, (default,)), Prediction(unknown, to_y, (UP2,))
    else:
        then = Prediction(kept, unknown, (default,))
        now = then if case == "undecided" else Prediction(kept, unknown, (UP2,))  # another egress: stale

    def predict(f: object, flow: object) -> Prediction:
        return then if f is fib_before else now

    decider = Decider(predict=predict, fib_now=FIB_NOW, fib_before=fib_before, classifier=classifier(),
                      sport_matters=False, predict_before=predict if case == "undecided" else None)  # fmt: skip
    seed, other = udp(1, "192.0.2.70"), udp(10, "8.9.1.1")
    decider.add(seed)
    decider.add(other)
    plan = decider.plan()
    found = list(plan.undecided if case == "undecided" else plan.stale)
    assert [d.entry for d in found] == [seed, other]
    code = "unknown_nat" if case == "undecided" else "egress_changed_unknown_nat"
    side = "dnat" if case == "dnat stale" else "snat"
    words = [(d.side, d.code, [(e.route, str(e.prefix)) for e in d.why.egress_before]) for d in found]
    assert words == [
        (side, code, [("default via 203.0.113.1 dev wan table main", "0.0.0.0/0")]),
        (side, code, [("8.0.0.0/8 via 203.0.113.1 dev wan table main", "8.0.0.0/8")]),
    ]
