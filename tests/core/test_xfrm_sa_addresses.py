# SPDX-License-Identifier: GPL-2.0-or-later
"""nft's ``ipsec out ip|ip6 saddr|daddr``: which SAs have addresses to read.

``nft_xfrm.c``'s ``xfrm_state_addr_ok``: an address key reads the SA's
addresses only when the SA is of the key's family *and* in tunnel or beet
mode; otherwise (a transport-mode SA, whose addresses are the packet's own)
the expression sets NFT_BREAK, and the rule does not match, whatever its
operator. ``reqid`` and ``spi`` read every SA. Expectations here are worked
out from that function, not from ``core.xfrm``.
"""

from __future__ import annotations

from ipaddress import ip_address, ip_network
from typing import Any

import pytest

from topowatch.core.flow import IPPROTO_UDP, Unknown
from topowatch.core.model import AF_INET, Address, Link, Nexthop, Route, Topology
from topowatch.core.nat import Match
from topowatch.core.xfrm import (
    Direction,
    Mode,
    XfrmFlow,
    XfrmPolicy,
    XfrmSelector,
    XfrmState,
    XfrmTemplate,
    nft_match,
)
from topowatch.edges.nft import parse_rule

A = ip_address
N = ip_network
HERE, PEER = A("203.0.113.2"), A("198.51.100.1")
ANY4 = A("0.0.0.0")


def topo(mode: Mode) -> Topology:
    """A host at 203.0.113.2 with one out policy for its traffic to 198.51.100.1 and that SA."""
    if mode is Mode.TRANSPORT:
        t = XfrmTemplate(AF_INET, ANY4, ANY4, reqid=1, mode=mode)
    else:
        t = XfrmTemplate(AF_INET, PEER, HERE, reqid=1, mode=mode)
    policy = XfrmPolicy(XfrmSelector(AF_INET, N(f"{HERE}/32"), N(f"{PEER}/32")), Direction.OUT,
                        priority=10, index=1, templates=(t,))
    sa = XfrmState(AF_INET, PEER, HERE, 50, 0x100, reqid=1, mode=mode)
    return Topology(
        links=(Link(1, "lo"), Link(3, "up1")),
        addresses=(Address(3, HERE, 24),),
        routes=(Route(N("0.0.0.0/0"), nexthops=(Nexthop(3, A("203.0.113.1")),)),),
        xfrm_policies=(policy,),
        xfrm_states=(sa,),
        xfrm_known=True,
    )


FLOW = XfrmFlow(AF_INET, IPPROTO_UDP, HERE, PEER, 4500, 5060, None, 0, 3)


def nft(key: str, right: Any, op: str = "==", **kw: Any) -> Match:
    expr = {"ipsec": {"key": key, "dir": "out", **kw}}
    rule = parse_rule([{"match": {"op": op, "left": expr, "right": right}}], family="inet", table="t")
    (m,) = rule.exprs
    assert isinstance(m, Match), m
    return m


CASES: list[tuple[str, Match, Mode, bool]] = [
    # Tunnel and beet SAs carry addresses of their own: read as written.
    ("tunnel daddr ==", nft("daddr", str(PEER), family="ip"), Mode.TUNNEL, True),
    ("tunnel daddr !=", nft("daddr", "192.0.2.1", "!=", family="ip"), Mode.TUNNEL, True),
    ("tunnel saddr ==", nft("saddr", str(HERE), family="ip"), Mode.TUNNEL, True),
    ("beet daddr ==", nft("daddr", str(PEER), family="ip"), Mode.BEET, True),
    ("beet saddr !=", nft("saddr", str(HERE), "!=", family="ip"), Mode.BEET, False),
    # Transport: the expression breaks, so neither == nor != matches.
    ("transport daddr == its own address", nft("daddr", str(PEER), family="ip"), Mode.TRANSPORT, False),
    ("transport daddr != another", nft("daddr", "192.0.2.1", "!=", family="ip"), Mode.TRANSPORT, False),
    ("transport saddr == its own address", nft("saddr", str(HERE), family="ip"), Mode.TRANSPORT, False),
    ("transport saddr != another", nft("saddr", "192.0.2.1", "!=", family="ip"), Mode.TRANSPORT, False),
    # reqid and spi are read whatever the mode.
    ("transport reqid ==", nft("reqid", 1), Mode.TRANSPORT, True),
    ("transport spi !=", nft("spi", 0x200, "!="), Mode.TRANSPORT, True),
]


@pytest.mark.parametrize(("m", "mode", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_sa_addresses_are_read_only_in_tunnel_and_beet_mode(m: Match, mode: Mode, expected: bool) -> None:
    got = nft_match(m, topo(mode), FLOW, "postrouting", local=True)
    assert not isinstance(got, Unknown), got
    assert got is expected
