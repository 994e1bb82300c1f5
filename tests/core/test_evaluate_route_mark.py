"""``rt ipsec`` and ``-m policy --dir out`` read the bundle of the packet's route, made with the mark of then.

Kernel facts the expectations are worked from (net/ipv4/ip_forward.c,
net/xfrm/xfrm_policy.c, net/netfilter/nft_rt.c, xt_policy.c):

- ``ip_forward`` calls ``xfrm4_route_forward`` before the forward hook: the
  xfrm policy lookup (``xfrm_decode_session``: ``flowi_mark = skb->mark``)
  sees the mark the packet has as it leaves prerouting, and the bundle it
  finds becomes the packet's route (``skb_dst``);
- nft's ``rt ipsec`` is ``skb_dst(skb)->xfrm != NULL``, xt_policy's
  ``match_policy_out`` walks ``skb_dst(skb)->xfrm``: neither looks the policy
  up again, so a mark set after routing (forward, or a mangle chain at
  postrouting before nat) changes neither.

An xfrm out policy here selects 10.0.1.0/24 -> 192.0.2.0/24 with mark 5/0xff
(its SA is installed); the nat chain exempts IPsec traffic, then masquerades.
A flow from 10.0.1.2 marked 5 in prerouting is routed into the tunnel: no
NAT. Marked 5 only after routing, it was routed with mark 0 (no policy): it
is masqueraded.
"""

from __future__ import annotations

from typing import Any

import pytest

from topowatch.core.evaluate import predict
from topowatch.core.fib import Fib
from topowatch.core.flow import Binding, NatKind
from topowatch.core.nat import NatRuleset
from topowatch.edges.iptables import parse_save
from topowatch.edges.nft import parse_ruleset_json

from test_xfrm import LOCAL_END, pol, sa, tmpl, topo, udp  # isort: skip

MARKED = pol(templates=(tmpl(1),), mark=5, mark_mask=0xFF, priority=100, index=1)
FIB = Fib(topo((MARKED,), (sa(1),)))
MASQ = frozenset({Binding(NatKind.MASQUERADE, LOCAL_END, LOCAL_END)})
EXEMPT = frozenset({Binding(NatKind.NONE)})

# Where the mark 5 is set, and what the kernel does with the flow.
CASES = [
    ("nowhere", None, MASQ),
    ("prerouting, before routing", "prerouting", EXEMPT),
    ("forward, after routing", "forward", MASQ),
    ("postrouting, before nat", "postrouting", MASQ),
]

IPTABLES_NAT = ("*nat\n-A POSTROUTING -m policy --dir out --pol ipsec -j ACCEPT\n"
                "-A POSTROUTING -o up1 -j MASQUERADE\nCOMMIT\n")


def iptables(hook: str | None) -> NatRuleset:
    nat = parse_save(IPTABLES_NAT).ruleset
    line = f"-A {hook.upper()} -s 10.0.1.0/24 -j MARK --set-mark 5\n" if hook else ""
    mangle = parse_save(f"*mangle\n{line}COMMIT\n", table="mangle", kind="mangle").ruleset
    return NatRuleset(nat.chains + mangle.chains, marks_known=True)


def chain(name: str, kind: str, at: str, prio: int) -> dict[str, Any]:
    return {"chain": {"family": "inet", "table": "t", "name": name, "type": kind, "hook": at, "prio": prio,
                      "policy": "accept"}}


def rule(chain: str, handle: int, *expr: dict[str, Any]) -> dict[str, Any]:
    return {"rule": {"family": "inet", "table": "t", "chain": chain, "handle": handle, "expr": list(expr)}}


RT_IPSEC = {"rt": {"key": "ipsec"}}


def exempting(*items: dict[str, Any]) -> NatRuleset:
    """Table ``inet t``: postrouting's nat chain accepts ``rt ipsec exists`` and masquerades the
    rest; ``items`` add the chains and rules of the test."""
    return parse_ruleset_json({"nftables": [
        {"table": {"family": "inet", "name": "t"}},
        chain("post", "nat", "postrouting", 100),
        rule("post", 2, {"match": {"op": "==", "left": RT_IPSEC, "right": True}}, {"accept": None}),
        rule("post", 3, {"masquerade": None}),
        *items,
    ]})


def nft(hook: str | None) -> NatRuleset:
    items: list[dict[str, Any]] = [
        {"table": {"family": "inet", "name": "t"}},
        chain("post", "nat", "postrouting", 100),
        rule("post", 2, {"match": {"op": "==", "left": {"rt": {"key": "ipsec"}}, "right": True}}, {"accept": None}),
        rule("post", 3, {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "up1"}},
             {"masquerade": None}),
    ]
    if hook:
        items += [
            chain("marks", "filter", hook, -150),
            rule("marks", 4, {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                                        "right": {"prefix": {"addr": "10.0.1.0", "len": 24}}}},
                 {"mangle": {"key": {"meta": {"key": "mark"}}, "value": 5}}),
        ]
    return parse_ruleset_json({"nftables": items})


@pytest.mark.parametrize("reader", [iptables, nft], ids=["-m policy", "rt ipsec"])
@pytest.mark.parametrize(("where", "hook", "expected"), CASES, ids=[c[0] for c in CASES])
def test_the_ipsec_match_reads_the_route_made_with_the_mark_of_then(
    reader: Any, where: str, hook: str | None, expected: frozenset[Binding]
) -> None:
    ruleset = reader(hook)
    assert ruleset.marks_known
    # The entry's own first mark (0) and an unknown one: a forwarded packet arrives with mark 0
    # where the ruleset holds every chain that sets one.
    for flow in (udp(packet_mark=0), udp()):
        assert predict(ruleset, FIB, flow).snat == expected, (where, flow)


def test_outputs_mark_chains_see_the_route_the_socket_got_with_its_mark() -> None:
    """A local flow from 10.0.1.1 with socket mark 5: its route (``ip_route_output_flow`` with the
    socket's mark) is the tunnel's bundle. Output's route chain (-150) ``rt ipsec missing meta mark
    set 0`` sees that route: the bundle is there, the mark stays 5, the re-route keeps the tunnel,
    and postrouting's ``rt ipsec exists accept`` exempts it."""
    ruleset = exempting(
        chain("out", "route", "output", -150),
        rule("out", 4, {"match": {"op": "==", "left": RT_IPSEC, "right": False}},
             {"mangle": {"key": {"meta": {"key": "mark"}}, "value": 0}}),
    )
    assert predict(ruleset, FIB, udp(src="10.0.1.1", packet_mark=5)).snat == EXEMPT


def test_outputs_nat_chain_sees_the_route_outputs_mark_chains_left() -> None:
    """A local flow from 10.0.1.1 with socket mark 5 (its route: the tunnel's bundle); output's nat
    chain ``rt ipsec exists accept`` then ``dnat to 10.0.1.50``: the packet's route has the bundle,
    the accept ends the chain before the DNAT, and postrouting exempts it."""
    ruleset = exempting(
        chain("out", "nat", "output", -100),
        rule("out", 4, {"match": {"op": "==", "left": RT_IPSEC, "right": True}}, {"accept": None}),
        rule("out", 5, {"dnat": {"family": "ip", "addr": "10.0.1.50"}}),
    )
    p = predict(ruleset, FIB, udp(src="10.0.1.1", packet_mark=5))
    assert (p.dnat, p.snat) == (EXEMPT, EXEMPT)


def test_outputs_mark_chains_after_its_nat_see_the_route_of_then() -> None:
    """As above, with output's nat chain at -100 (no rule binds) and the route chain at 0, after it:
    ``rt ipsec missing meta mark set 0`` still sees the socket's route with mark 5 (the bundle; no
    DNAT re-routed it), the mark stays 5 and postrouting exempts the flow."""
    ruleset = exempting(
        chain("onat", "nat", "output", -100),
        chain("out", "route", "output", 0),
        rule("onat", 5, {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}},
                                   "right": 53}},
             {"dnat": {"family": "ip", "addr": "10.0.1.50"}}),
        rule("out", 4, {"match": {"op": "==", "left": RT_IPSEC, "right": False}},
             {"mangle": {"key": {"meta": {"key": "mark"}}, "value": 0}}),
    )
    p = predict(ruleset, FIB, udp(src="10.0.1.1", packet_mark=5))
    assert (p.dnat, p.snat) == (EXEMPT, EXEMPT)
