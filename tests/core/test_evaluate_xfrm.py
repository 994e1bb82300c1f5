"""The flow the NAT evaluator hands the xfrm lookup: every field it reads, one at a time.

``rt ipsec exists accept`` before ``oifname "up1" masquerade`` exempts flows
that leave through IPsec. An out policy with an SA (a bundle) selects on one
field of the flow at a time: protocol, source port, destination port (and
a destination port range left open by a DNAT), packet mark, output
interface. A flow it selects is exempt (no NAT), one it does not is
masqueraded, and where the field is only partly known the answer is unknown;
each expectation follows from the selector alone (``xfrm_selector_match``).
"""

from __future__ import annotations

from typing import Any

import pytest

from topowatch.core.evaluate import predict
from topowatch.core.fib import Fib
from topowatch.core.flow import IPPROTO_TCP, IPPROTO_UDP, NO_NAT, Binding, Flow, NatKind, Unknown
from topowatch.edges.nft import parse_ruleset_json

from test_xfrm import MASQ, RT, A, pol, sa, sel, tmpl, topo  # isort: skip

EXEMPT, UNKNOWN = "exempt", "unknown"


def ruleset(dnat_ports: tuple[int, int] | None = None) -> Any:
    rules: list[dict[str, Any]] = [
        {"table": {"family": "inet", "name": "t"}},
        {"chain": {"family": "inet", "table": "t", "name": "post", "type": "nat", "hook": "postrouting",
                   "prio": 100, "policy": "accept"}},
        {"rule": {"family": "inet", "table": "t", "chain": "post", "handle": 2,
                  "expr": [{"match": {"op": "==", "left": RT, "right": True}}, {"accept": None}]}},
        {"rule": {"family": "inet", "table": "t", "chain": "post", "handle": 3,
                  "expr": [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "up1"}},
                           {"masquerade": None}]}},
    ]  # fmt: skip
    if dnat_ports is not None:
        rules[1:1] = [
            {"chain": {"family": "inet", "table": "t", "name": "pre", "type": "nat", "hook": "prerouting",
                       "prio": -100, "policy": "accept"}},
            {"rule": {"family": "inet", "table": "t", "chain": "pre", "handle": 4, "expr": [
                {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 5060}},
                {"dnat": {"family": "ip", "addr": "192.0.2.10", "port": {"range": list(dnat_ports)}}}]}},
        ]  # fmt: skip
    return parse_ruleset_json({"nftables": rules})


def flow(proto: int = IPPROTO_UDP, sport: int = 5060, dport: int = 5060, **kw: Any) -> Flow:
    return Flow(2, proto, A("10.0.1.2"), A("192.0.2.10"), sport, dport, **kw)


CASES = [
    # (name, selector fields, policy fields, flow, DNAT port range, expected)
    ("proto selected", {"proto": IPPROTO_UDP}, {}, flow(), None, EXEMPT),
    ("proto not selected", {"proto": IPPROTO_UDP}, {}, flow(IPPROTO_TCP), None, MASQ),
    ("sport selected", {"sport": 5060, "sport_mask": 0xFFFF}, {}, flow(sport=5060), None, EXEMPT),
    ("sport not selected", {"sport": 5060, "sport_mask": 0xFFFF}, {}, flow(sport=5061), None, MASQ),
    ("dport selected", {"dport": 53, "dport_mask": 0xFFFF}, {}, flow(dport=53), None, EXEMPT),
    ("dport not selected", {"dport": 53, "dport_mask": 0xFFFF}, {}, flow(dport=54), None, MASQ),
    ("sport and dport told apart", {"sport": 53, "sport_mask": 0xFFFF}, {}, flow(sport=1000, dport=53), None,
     MASQ),
    ("dport range all selected", {"dport": 5000, "dport_mask": 0xFFFE}, {}, flow(), (5000, 5001), EXEMPT),
    ("dport range partly selected", {"dport": 5000, "dport_mask": 0xFFFF}, {}, flow(), (5000, 5001), UNKNOWN),
    ("dport range's top selected alone", {"dport": 5001, "dport_mask": 0xFFFF}, {}, flow(), (5000, 5001),
     UNKNOWN),
    ("dport range outside", {"dport": 6000, "dport_mask": 0xFFFF}, {}, flow(), (5000, 5001), MASQ),
    ("a DNAT to one port", {"dport": 5000, "dport_mask": 0xFFFF}, {}, flow(), (5000, 5000), EXEMPT),
    ("mark selected (a fresh flow's mark is 0)", {}, {"mark": 0, "mark_mask": 0xFF}, flow(), None, EXEMPT),
    ("mark not selected", {}, {"mark": 1, "mark_mask": 0xFF}, flow(), None, MASQ),
    ("output interface selected (up1)", {"ifindex": 3}, {}, flow(), None, EXEMPT),
    ("output interface not selected", {"ifindex": 2}, {}, flow(), None, MASQ),
]


@pytest.mark.parametrize(("name", "selector", "policy", "f", "dnat", "expected"), CASES, ids=[c[0] for c in CASES])
def test_the_xfrm_lookup_reads_each_field_of_the_flow(  # noqa: PLR0917
    name: str, selector: dict[str, Any], policy: dict[str, Any], f: Flow, dnat: tuple[int, int] | None,
    expected: Any,
) -> None:
    bundled = topo((pol(sel(**selector), templates=(tmpl(1),), priority=100, index=1, **policy),), (sa(1),))
    p = predict(ruleset(dnat), Fib(bundled), f)
    if expected == UNKNOWN:
        assert isinstance(p.snat, Unknown), (name, p.snat)
    elif expected == EXEMPT:
        assert p.snat == frozenset({NO_NAT}), (name, p.snat)
        assert not isinstance(p.egress, Unknown) and p.egress[0].xfrm, name  # the egress names the policy
    else:
        assert p.snat == frozenset({expected}), (name, p.snat)
        assert not isinstance(p.egress, Unknown) and not p.egress[0].xfrm, name


SECPATH = {"meta": {"key": "secpath"}}


def dnat_ruleset(match: dict[str, Any]) -> Any:
    """At prerouting and output: ``<match> accept``, then ``udp dport 5060 dnat to 10.0.9.9``."""
    rules: list[dict[str, Any]] = [{"table": {"family": "ip", "name": "t"}}]
    for handle, (name, hook, prio) in enumerate((("pre", "prerouting", -100), ("out", "output", -100)), 1):
        rules += [
            {"chain": {"family": "ip", "table": "t", "name": name, "type": "nat", "hook": hook, "prio": prio,
                       "policy": "accept"}},
            {"rule": {"family": "ip", "table": "t", "chain": name, "handle": 10 * handle,
                      "expr": [{"match": {"op": "==", "left": match, "right": True}}, {"accept": None}]}},
            {"rule": {"family": "ip", "table": "t", "chain": name, "handle": 10 * handle + 1, "expr": [
                {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 5060}},
                {"dnat": {"addr": "10.0.9.9"}}]}},
        ]  # fmt: skip
    return parse_ruleset_json({"nftables": rules})


TO_9 = frozenset({Binding(NatKind.DNAT, A("10.0.9.9"))})
FORWARDED = flow()
LOCAL = Flow(2, IPPROTO_UDP, A("203.0.113.2"), A("192.0.2.10"), 5060, 5060)  # from the gateway's own address
INBOUND = sa(1, daddr=A("203.0.113.2"), saddr=A("198.51.100.1"))  # an SA that ends here


@pytest.mark.parametrize(
    ("name", "match", "f", "states", "expected"),
    [
        # secpath: only decrypted packets carry one; a local flow never does
        ("secpath, forwarded, no SA ends here", SECPATH, FORWARDED, (), TO_9),
        ("secpath, forwarded, an SA ends here", SECPATH, FORWARDED, (INBOUND,), UNKNOWN),
        ("secpath, local, an SA ends here", SECPATH, LOCAL, (INBOUND,), TO_9),
        # rt ipsec before routing: there is no route yet, the expression breaks (the rule never matches)
        ("rt ipsec at prerouting", RT, FORWARDED, (sa(1),), TO_9),
    ],
)
def test_xfrm_matches_before_routing(name: str, match: dict[str, Any], f: Flow, states: tuple[Any, ...],
                                     expected: Any) -> None:  # fmt: skip
    t = topo((pol(sel("0.0.0.0/0", "0.0.0.0/0"), templates=(tmpl(1),), priority=100, index=1),), states)
    p = predict(dnat_ruleset(match), Fib(t), f)
    if expected == UNKNOWN:
        assert isinstance(p.dnat, Unknown), (name, p.dnat)
    else:
        assert p.dnat == expected, (name, p.dnat)


def test_the_egress_says_when_its_xfrm_policy_is_unknown_and_names_no_policy_that_leaves_it_clear() -> None:
    """A DNAT to ports 5000-5001 and an out policy selecting dport 5000: whether the flow goes into
    the tunnel depends on the port the DNAT picks (``xfrm_selector_match`` on the translated
    port), so the egress's xfrm is "unknown (<policy>: a port range only partly selected)". An out
    policy with no templates (``action allow``, no ``tmpl``) matches but transforms nothing
    (``xfrm_lookup`` returns the plain route): the egress names no policy, and the flow is
    masqueraded as any clear flow."""
    bundled = topo((pol(sel(dport=5000, dport_mask=0xFFFF), templates=(tmpl(1),), priority=100, index=1),),
                   (sa(1),))
    p = predict(ruleset((5000, 5001)), Fib(bundled), flow())
    assert not isinstance(p.egress, Unknown)
    assert p.egress[0].xfrm.startswith("unknown (xfrm policy src 10.0.1.0/24 dst 192.0.2.0/24 dport 5000 dir out")
    assert p.egress[0].xfrm.endswith(": a port range only partly selected)"), p.egress[0].xfrm
    bare = topo((pol(priority=0, index=4),))
    p = predict(ruleset(), Fib(bare), flow())
    assert not isinstance(p.egress, Unknown) and p.egress[0].xfrm == ""
    assert p.snat == frozenset({MASQ})
