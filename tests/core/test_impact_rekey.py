"""An IPsec rekey re-NATs no flow, unless an SPI is read: ``core.impact`` on SA changes.

A rekey installs a new SA beside the old one (same addresses, reqid, mode,
protocol; a new SPI), then deletes the old one; an acquire adds a larval SA
(SPI 0) that no packet uses. The expectations: the cases below by hand, and a
property whose oracle is the predictor itself: whenever ``impact`` says "no
flow" for an SA change, every flow's predicted NAT and egress are the same
before and after it.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from ipaddress import ip_address
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topowatch.core import impact as impact_module
from topowatch.core.evaluate import predict
from topowatch.core.fib import Fib
from topowatch.core.impact import Impact, impact
from topowatch.core.model import Netconf
from topowatch.core.nat import NatRuleset, PolicyElement
from topowatch.core.xfrm import Mode, XfrmPolicy, XfrmState
from topowatch.edges.iptables import parse_save
from topowatch.edges.nft import parse_ruleset_json

from test_impact import in_boxes, in_tuples  # isort: skip
from test_xfrm import RULESET, TUNNEL, TWO, pol, sa, tmpl, topo, udp  # isort: skip

EXEMPT = parse_ruleset_json(RULESET)  # rt ipsec exists accept; oifname up1 masquerade


def nft_spi(spi: int) -> NatRuleset:
    items: list[dict[str, Any]] = [
        {"table": {"family": "inet", "name": "t"}},
        {"chain": {"family": "inet", "table": "t", "name": "post", "type": "nat", "hook": "postrouting",
                   "prio": 100, "policy": "accept"}},
        {"rule": {"family": "inet", "table": "t", "chain": "post", "handle": 2,
                  "expr": [{"match": {"op": "==", "left": {"ipsec": {"key": "spi", "dir": "out"}}, "right": spi}},
                           {"accept": None}]}},
        {"rule": {"family": "inet", "table": "t", "chain": "post", "handle": 3,
                  "expr": [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "up1"}},
                           {"masquerade": None}]}},
    ]
    return parse_ruleset_json({"nftables": items})


def xt(element: str) -> NatRuleset:
    return parse_save(f"*nat\n-A POSTROUTING -m policy --dir out --pol ipsec {element} -j ACCEPT\n"
                      "-A POSTROUTING -o up1 -j MASQUERADE\nCOMMIT\n").ruleset


OLD, NEW, LARVAL = sa(1, 0x100), sa(1, 0x200), sa(1, 0)
OTHER_REQID, OTHER_PEER = sa(2, 0x300), sa(1, 0x400, daddr=ip_address("198.51.100.9"))

CASES = [
    # (name, policies, states before, states now, ruleset, any flow?)
    ("a rekey's new SA beside the old one", (TUNNEL,), (OLD,), (OLD, NEW), EXEMPT, False),
    ("the old SA deleted after the rekey", (TUNNEL,), (OLD, NEW), (NEW,), EXEMPT, False),
    ("an SA replaced by another SPI at once", (TUNNEL,), (OLD,), (NEW,), EXEMPT, False),
    ("a larval SA of an acquire comes", (TUNNEL,), (), (LARVAL,), EXEMPT, False),
    ("a larval SA replaced by the negotiated one", (TUNNEL,), (LARVAL,), (NEW,), EXEMPT, True),
    ("the first SA installed", (TUNNEL,), (), (OLD,), EXEMPT, True),
    ("the last SA deleted", (TUNNEL,), (OLD,), (), EXEMPT, True),
    ("an SA of another reqid", (TWO,), (OLD,), (OLD, OTHER_REQID), EXEMPT, True),
    ("an SA to another peer", (TUNNEL,), (OLD,), (OLD, OTHER_PEER), EXEMPT, True),
    ("an SA of another mode", (TUNNEL,), (OLD,), (OLD, sa(1, 0x500, mode=Mode.TRANSPORT)), EXEMPT, True),
    ("a rekey where nft reads the SPI", (TUNNEL,), (OLD,), (NEW,), nft_spi(0x100), True),
    ("a rekey where -m policy reads the SPI", (TUNNEL,), (OLD,), (NEW,), xt("--spi 0x100"), True),
    ("a rekey where -m policy reads the reqid only", (TUNNEL,), (OLD,), (NEW,), xt("--reqid 1"), False),
    ("a rekey under a template naming an SPI", (pol(templates=(tmpl(1, spi=0x100),), priority=100, index=1),),
     (OLD,), (NEW,), EXEMPT, True),
    ("the same SAs in another order", (TUNNEL,), (OLD, NEW), (NEW, OLD), EXEMPT, False),
]


@pytest.mark.parametrize(("policies", "before", "now", "ruleset", "anything"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_what_an_sa_change_can_renat(policies: tuple[XfrmPolicy, ...], before: tuple[XfrmState, ...],
                                     now: tuple[XfrmState, ...], ruleset: NatRuleset, anything: bool) -> None:
    answer = impact(topo(policies, before), topo(policies, now), ruleset)
    assert answer.everything is anything, answer.describe()
    assert answer.everything or answer.none


# -- the property: "no flow" means no prediction moved ---------------------------------------

POOL = [sa(1, 0x100), sa(1, 0x200), sa(1, 0), sa(2, 0x300, proto=51), sa(2, 0x310, proto=51),
        sa(1, 0x400, daddr=ip_address("198.51.100.9")), sa(1, 0x600, mode=Mode.TRANSPORT),
        sa(1, 0x700, mark=5, mark_mask=0xFF)]
POLICIES = [(TUNNEL,), (TWO,), (pol(templates=(tmpl(1), tmpl(2, proto=51, optional=True)), priority=100, index=1),),
            (pol(templates=(tmpl(1, spi=0x100),), priority=100, index=1),)]
RULESETS = [EXEMPT, nft_spi(0x100), xt("--reqid 1"), xt("--spi 0x200"), xt("")]
FLOWS = [udp(), udp(src="10.0.1.9", dport=53), udp(dst="192.0.3.1"), udp(packet_mark=5)]


def what_is_judged(ruleset: NatRuleset, fib: Fib, flow: int) -> tuple[object, ...]:
    p = predict(ruleset, fib, FLOWS[flow])
    snat = p.snat if isinstance(p.snat, frozenset) else "unknown"
    egress = p.egress if isinstance(p.egress, tuple) else "unknown"
    return (p.dnat, snat, egress)


SPIS = st.sampled_from([0x100, 0x200, 0x300, 0x999])


@st.composite
def sa_changes(draw: st.DrawFn) -> tuple[list[XfrmState], list[XfrmState]]:
    """SAs before and now: unrelated lists, or a rekey of some (new SPIs), with SAs added or dropped."""
    before = draw(st.lists(st.sampled_from(POOL), max_size=4, unique=True))
    if draw(st.booleans()):
        return before, draw(st.lists(st.sampled_from(POOL), max_size=4, unique=True))
    now = [replace(s, spi=draw(SPIS)) if s.valid and draw(st.booleans()) else s for s in before]
    if draw(st.booleans()):
        now += draw(st.lists(st.sampled_from(POOL), max_size=2))
    if now and draw(st.booleans()):
        now.pop(draw(st.integers(0, len(now) - 1)))
    return before, now


@settings(max_examples=400, deadline=None)
@given(policies=st.sampled_from(POLICIES), change=sa_changes(), ruleset=st.sampled_from(RULESETS))
def test_an_sa_change_that_renats_no_flow_moves_no_prediction(
    policies: tuple[XfrmPolicy, ...], change: tuple[list[XfrmState], list[XfrmState]], ruleset: NatRuleset
) -> None:
    before, now = change
    t0, t1 = topo(policies, tuple(before)), topo(policies, tuple(now))
    if not impact(t0, t1, ruleset).none:
        return
    fib0, fib1 = Fib(t0), Fib(t1)
    for flow in range(len(FLOWS)):
        assert what_is_judged(ruleset, fib0, flow) == what_is_judged(ruleset, fib1, flow), (flow, before, now)


def test_the_property_meets_rekeys_that_matter() -> None:
    """The pool holds SA changes whose predictions move (else the property could not fail)."""
    fib0, fib1 = Fib(topo((TUNNEL,), ())), Fib(topo((TUNNEL,), (sa(1, 0x100),)))
    assert what_is_judged(EXEMPT, fib0, 0) != what_is_judged(EXEMPT, fib1, 0)
    spi0, spi1 = Fib(topo((TUNNEL,), (sa(1, 0x100),))), Fib(topo((TUNNEL,), (sa(1, 0x200),)))
    assert what_is_judged(nft_spi(0x100), spi0, 0) != what_is_judged(nft_spi(0x100), spi1, 0)


# -- the tenth session: what the rekey exemption skips, the SPI walk's bound, its cache --------------


def test_a_rekey_beside_another_changed_field_is_that_change() -> None:
    """A rekey excuses the SA change alone: the snapshot's fields after ``xfrm_states`` (here the
    rp_filter settings) are still compared (the ninth run: ``continue`` as ``break`` survived)."""
    t0 = topo((TUNNEL,), (OLD,))
    t1 = replace(topo((TUNNEL,), (NEW,)), netconf=(Netconf("all", rp_filter=1),), netconf_known=True)
    assert impact(t0, topo((TUNNEL,), (NEW,)), EXEMPT).none  # the rekey alone: no flow
    assert impact(t0, t1, EXEMPT) == Impact(everything=True, why="netconf changed")


@pytest.mark.parametrize("wrap", [in_tuples, in_boxes])
def test_the_spi_walk_reads_200_levels_and_takes_deeper_as_reading_an_spi(wrap: Any) -> None:
    """``_reads_spi`` walks 200 levels of containers; a value below them cannot be read, which
    counts as reading an SPI (the conservative answer: the rekey is then a change). Two frames a
    level here; a mutation tool's trampoline adds more, hence the raised recursion limit."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 3000))
    try:
        assert impact_module._reads_spi(wrap(PolicyElement(spi=0x100), 200)) is True
        assert impact_module._reads_spi(wrap(PolicyElement(reqid=1), 200)) is False
        assert impact_module._reads_spi(wrap("up1", 200)) is False
        assert impact_module._reads_spi(wrap("up1", 201)) is True
        assert impact_module._reads_spi(wrap(("up1", "up2"), 199)) is False
    finally:
        sys.setrecursionlimit(limit)


def test_the_last_four_rulesets_walked_for_an_spi_are_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SPI cache keeps the four rulesets read last, newest first (bounded memory)."""
    monkeypatch.setattr(impact_module, "_SPI_READERS", [])
    rulesets = [xt("--reqid 1") for _ in range(5)]
    for ruleset in rulesets:
        assert impact_module._ruleset_reads_spi(ruleset) is False
    kept = [seen for seen, _ in impact_module._SPI_READERS]
    assert len(kept) == 4
    assert all(a is b for a, b in zip(kept, rulesets[:0:-1], strict=True))  # the 5th, 4th, 3rd, 2nd
