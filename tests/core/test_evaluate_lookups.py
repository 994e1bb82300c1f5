# SPDX-License-Identifier: GPL-2.0-or-later
"""nft lookups and nft-only matches in the evaluator: verdict maps, concatenations, fib, numgen,
ct status, xfrm keys; and the reasons an unknown one gives, whole.

The kernel's behaviour each expectation is worked from:

- ``nft_lookup_eval``/``nft_vmap``: the element holding the key decides,
  wherever it stands among the elements; a key no element holds is
  NFT_BREAK: the rule ends (a verdict after the lookup is not reached) and
  the next rule runs.
- ``nft_fib_eval`` with ``type``: the address type of the destination
  (``daddr``) or of the source (``saddr``); ``!=`` inverts the comparison.
- ``numgen inc mod N`` is any of 0..N-1: a match covering all of them is true
  whatever the value, one covering none false.
- ``rt ipsec``/``ipsec out reqid`` as a lookup key read the xfrm bundle the
  packet is routed into, as the plain matches do.
- A locally generated packet carries its socket's mark, which a conntrack
  entry does not show: a lookup keyed by it is unknown (both branches are
  followed, and disagree here).
"""

from __future__ import annotations

from typing import Any

from test_evaluate import LOCAL_IN as FAKE_LOCAL
from test_evaluate import C, FakeFib
from test_evaluate import ruleset as fake_ruleset
from test_evaluate_breadth import (
    ACCEPT,
    FIB,
    MASQ,
    MASQ_UP1,
    NUMGEN2,
    TOPOLOGY,
    B,
    cat,
    chain,
    m,
    payload,
    post,
    pre,
    rng,
    ruleset,
    sset,
    udp,
)
from test_xfrm import RT, pol, sa, sel, tmpl, topo

from topowatch.core.evaluate import predict
from topowatch.core.fib import Fib
from topowatch.core.flow import NO_NAT, NatKind, Unknown
from topowatch.core.model import IPAddress
from topowatch.core.nat import NatRuleset

DNAT_60 = {"dnat": {"family": "ip", "addr": "10.0.1.60"}}
LOCAL_FLOW = udp(src="203.0.113.2")  # from the gateway's own address: locally generated


def where(rs: NatRuleset, chain_index: int = 0, rule_index: int = 0) -> str:
    c = rs.chains[chain_index]
    return rs.describe_rule(c, c.rules[rule_index])


def vmap(key: Any, *elements: list[Any]) -> dict[str, Any]:
    return {"vmap": {"key": key, "data": sset(*elements)}}


OIFNAME = {"meta": {"key": "oifname"}}


def test_a_vmap_miss_ends_the_rule_before_its_verdict() -> None:
    rs = ruleset(post([vmap(OIFNAME, ["up2", {"jump": {"target": "m"}}]), ACCEPT], [MASQ]), chain("m", [ACCEPT]))
    assert predict(rs, FIB, udp()).snat == frozenset({MASQ_UP1})  # leaves by up1: a miss


def test_the_element_holding_the_key_decides_wherever_it_stands() -> None:
    rs = ruleset(post([vmap(OIFNAME, ["lan", ACCEPT], ["up2", ACCEPT], ["up1", {"jump": {"target": "m"}}])]),
                 chain("m", [MASQ]))
    assert predict(rs, FIB, udp()).snat == frozenset({MASQ_UP1})
    concat = ruleset(post([m(cat(payload("ip", "saddr"), payload("udp", "dport")),
                             sset(cat("10.0.1.9", 5060), cat("10.0.1.2", 53), cat("10.0.1.2", 5060))), MASQ]))
    assert predict(concat, FIB, udp()).snat == frozenset({MASQ_UP1})
    assert predict(concat, FIB, udp(src="10.0.1.3")).snat == frozenset({NO_NAT})


def test_a_lookup_on_the_sockets_mark_is_unknown_and_says_so() -> None:
    """At output, ``meta mark vmap { 1 : accept }`` then ``dnat to 10.0.1.60``: accepted with mark 1,
    DNATed otherwise; the entry does not say the mark."""
    rs = ruleset(("out", "output", [[vmap({"meta": {"key": "mark"}}, [1, ACCEPT])], [DNAT_60]]))
    p = predict(rs, FIB, LOCAL_FLOW)
    assert isinstance(p.dnat, Unknown)
    assert p.dnat.reason == f"dnat unknown: {where(rs)}: the packet mark of the flow's first packet is not known"
    concat = ruleset(("out", "output", [
        [m(cat({"meta": {"key": "mark"}}, payload("udp", "dport")), sset(cat(1, 5060))), ACCEPT], [DNAT_60]]))
    p = predict(concat, FIB, LOCAL_FLOW)
    assert isinstance(p.dnat, Unknown)
    assert p.dnat.reason == (f"dnat unknown: {where(concat)}: the packet mark of the flow's first packet "
                             "is not known")
    # Known marks decide: a forwarded packet's mark is 0.
    assert predict(concat, FIB, udp()).dnat == frozenset({NO_NAT})


FIB_DADDR_TYPE = {"fib": {"flags": ["daddr"], "result": "type"}}
FIB_SADDR_TYPE = {"fib": {"flags": ["saddr"], "result": "type"}}


def test_fib_type_not_equal_inverts_the_answer() -> None:
    rs = ruleset(pre([m(FIB_DADDR_TYPE, "local", "!="), DNAT_60]))
    assert predict(rs, FIB, udp(dst="192.0.2.10")).dnat == frozenset({B(NatKind.DNAT, "10.0.1.60")})
    assert predict(rs, FIB, udp(dst="203.0.113.2")).dnat == frozenset({NO_NAT})


def test_fib_saddr_type_reads_the_source() -> None:
    """From 10.0.1.2 (unicast) to 203.0.113.2 (ours, local): saddr is unicast, daddr is not."""
    rs = ruleset(pre([m(FIB_SADDR_TYPE, "unicast"), DNAT_60]))
    assert predict(rs, FIB, udp(dst="203.0.113.2")).dnat == frozenset({B(NatKind.DNAT, "10.0.1.60")})
    rs = ruleset(pre([m(FIB_SADDR_TYPE, "local"), DNAT_60]))
    assert predict(rs, FIB, udp(dst="203.0.113.2")).dnat == frozenset({NO_NAT})


def test_a_numgen_match_over_its_whole_range_is_true_and_outside_it_false() -> None:
    every = ruleset(pre([m(NUMGEN2, rng(0, 1)), DNAT_60]))
    assert predict(every, FIB, udp()).dnat == frozenset({B(NatKind.DNAT, "10.0.1.60")})
    none = ruleset(pre([m(NUMGEN2, rng(2, 9)), ACCEPT], [DNAT_60]))
    assert predict(none, FIB, udp()).dnat == frozenset({B(NatKind.DNAT, "10.0.1.60")})


def test_fib_with_iif_where_there_is_no_input_interface_is_unknown_and_says_so() -> None:
    """At output (nft refuses ``iif`` there: a ruleset read otherwise is unknown, named)."""
    typed = ruleset(("out", "output", [[m({"fib": {"flags": ["daddr", "iif"], "result": "type"}}, "local"),
                                        DNAT_60]]))
    p = predict(typed, FIB, LOCAL_FLOW)
    assert isinstance(p.dnat, Unknown)
    assert p.dnat.reason == f"dnat unknown: {where(typed)}: fib daddr . iif type: no known input interface here"
    rpf = ruleset(("out", "output", [[m({"fib": {"flags": ["saddr", "iif"], "result": "oif"}}, False), ACCEPT],
                                     [DNAT_60]]))
    p = predict(rpf, FIB, LOCAL_FLOW)
    assert isinstance(p.dnat, Unknown)
    assert p.dnat.reason == f"dnat unknown: {where(rpf)}: fib saddr . iif oif: no known input interface here"


class UnknownTypes(Fib):
    """The breadth gateway, whose address types are not known."""

    def address_type(self, addr: IPAddress, dev: int | None = None) -> Any:
        return Unknown(f"the type of {addr} is not known")


def test_an_unknown_address_type_names_the_expression_and_the_fibs_reason() -> None:
    rs = ruleset(pre([m(FIB_DADDR_TYPE, "local"), DNAT_60]))
    p = predict(rs, UnknownTypes(TOPOLOGY), udp())
    assert isinstance(p.dnat, Unknown)
    assert p.dnat.reason == f"dnat unknown: {where(rs)}: fib daddr type: the type of 192.0.2.10 is not known"


def test_two_unknown_ct_statuses_are_named_together() -> None:
    """After a DNAT to a range holding the destination the DST_NAT bit may be unset; EXPECTED is not told."""
    rs = ruleset(pre([{"dnat": {"family": "ip", "addr": rng("192.0.2.1", "192.0.2.20")}}]),
                 post([m({"ct": {"key": "status"}}, ["expected", "dnat"], "in"), MASQ]))
    p = predict(rs, FIB, udp())
    assert isinstance(p.snat, Unknown)
    assert p.snat.reason == (f"snat unknown via dev up1 via 203.0.113.1: {where(rs, 1)}: ct status dst_nat,expected "
                             "of the flow's first packet is not known")


def test_rt_ipsec_without_a_known_output_interface_is_unknown_and_says_so() -> None:
    rs = fake_ruleset(C("output", [[RT_MATCH, {"accept": None}], [{"dnat": {"addr": "10.0.0.8"}}]], hook="output"))
    fib = FakeFib(routes={"0.0.0.0/0": Unknown("a rule with ipproto")}, ingress=FAKE_LOCAL)
    p = predict(rs, fib, udp())
    assert isinstance(p.dnat, Unknown)
    assert p.dnat.reason == (f"dnat unknown: {where(rs)}: rt ipsec: the output interface is unknown: route before "
                             "DNAT unknown: a rule with ipproto")


RT_MATCH = m(RT, True)
IN_IPSEC = topo((pol(sel(), templates=(tmpl(1),), priority=100, index=1),), (sa(1),))  # 10.0.1.0/24 -> 192.0.2.0/24


def test_xfrm_keys_of_a_lookup_read_the_bundle() -> None:
    """``rt ipsec vmap { exists : accept }`` (and a concatenation with ``ipsec out reqid``) before the
    masquerade: a flow the policy puts in IPsec is accepted unNATed, another masqueraded."""
    reqid = {"ipsec": {"key": "reqid", "dir": "out"}}
    for rs in (ruleset(post([vmap(RT, [True, ACCEPT])], [MASQ])),
               ruleset(post([vmap(reqid, [1, ACCEPT])], [MASQ])),
               ruleset(post([m(cat(payload("ip", "saddr"), RT), sset(cat("10.0.1.2", True))), ACCEPT], [MASQ])),
               ruleset(post([m(cat(payload("ip", "saddr"), reqid), sset(cat("10.0.1.2", 1))), ACCEPT], [MASQ]))):
        assert predict(rs, Fib(IN_IPSEC), udp()).snat == frozenset({NO_NAT})
        # Outside the policy's 192.0.2.0/24 (that gateway routes it by its default, up1).
        assert predict(rs, Fib(IN_IPSEC), udp(dst="198.51.100.9")).snat == frozenset({MASQ_UP1})
    rs = ruleset(post([vmap(RT, [True, ACCEPT])], [MASQ]))
    p = predict(rs, FIB, udp())  # the breadth gateway: no xfrm state read
    assert isinstance(p.snat, Unknown)
    assert p.snat.reason == (f"snat unknown via dev up1 via 203.0.113.1: {where(rs)}: rt ipsec: the xfrm "
                             "policies and SAs were not read")
