# SPDX-License-Identifier: GPL-2.0-or-later
"""How deep nft jumps nest: the deepest ruleset nft loads is followed, a deeper one is unknown.

Kernel behaviour (``nft_chain_validate``, ``nft_immediate_validate``): each
jump or goto puts the chain it reaches one level deeper than the base chain
(level 0); a chain at level ``NFT_JUMP_STACK_SIZE`` (16) makes the ruleset
fail to load (-EMLINK). So at most 15 jumps nest, and ``nft_do_chain``'s
16-entry jump stack always holds them. A ruleset that nests 16 (read from
somewhere else: nft would not have loaded it) is not followed: the hook is
unknown, naming the rule whose jump went too deep.

Built by hand over the gateway of ``test_evaluate_breadth``: a flow from
lan to 192.0.2.10 leaves by up1.
"""

from __future__ import annotations

from ipaddress import ip_address

from test_evaluate_breadth import FIB, B, udp

from topowatch.core.evaluate import predict
from topowatch.core.flow import NatKind, RuleRef, Unknown
from topowatch.core.nat import Chain, Hook, NatRuleset, NatStatement, Rule, Verdict, VerdictKind

SNAT = NatStatement(NatKind.SNAT, "snat to 192.0.2.1", addr=(ip_address("192.0.2.1"), ip_address("192.0.2.1")))


def nested(jumps: int) -> NatRuleset:
    """postrouting -> jump c1 -> jump c2 ... -> c<jumps>: snat to 192.0.2.1."""
    chains = [Chain("ip", "nat", "post", (Rule(100, (Verdict(VerdictKind.JUMP, "c1"),)),), Hook.POSTROUTING, 100,
                    "nat", "accept")]
    for level in range(1, jumps + 1):
        body = (SNAT,) if level == jumps else (Verdict(VerdictKind.JUMP, f"c{level + 1}"),)
        chains.append(Chain("ip", "nat", f"c{level}", (Rule(100 + level, body),)))
    return NatRuleset(tuple(chains), marks_known=True)


def test_fifteen_nested_jumps_are_followed() -> None:
    assert predict(nested(15), FIB, udp()).snat == frozenset({B(NatKind.SNAT, "192.0.2.1")})


def test_sixteen_nested_jumps_are_unknown_naming_the_jump_too_deep() -> None:
    p = predict(nested(16), FIB, udp())
    assert isinstance(p.snat, Unknown)
    assert p.snat.reason == ("snat unknown via dev up1 via 203.0.113.1: table ip nat chain c15 handle 115: "
                             "jump c16: jumps nest too deep")
    assert p.snat.rule == RuleRef("table ip nat chain c15", 115, "jump c16")
