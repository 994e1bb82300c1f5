# SPDX-License-Identifier: GPL-2.0-or-later
"""Which numbers an xfrm selector's ports are compared with, by protocol.

``include/net/xfrm.h``'s ``xfrm_flowi_sport``/``xfrm_flowi_dport``: TCP,
UDP, UDP-Lite and SCTP give their ports; ICMP and ICMPv6 their type (as the
source port) and code (as the destination port); MH its type; GRE the two
halves of its key; every other protocol (DCCP among them, whose ports
``decode_session`` reads but these two functions do not) gives 0 to both.
``__xfrm4_selector_match`` then asks ``(port ^ sel.port) & sel.mask == 0``.
Expectations are worked out from those, not from ``core.xfrm``.
"""

from __future__ import annotations

from ipaddress import ip_address, ip_network

import pytest

from topowatch.core.flow import Flow, Unknown
from topowatch.core.model import AF_INET, AF_INET6
from topowatch.core.xfrm import Direction, XfrmPolicy, XfrmSelector, output_policy

A = ip_address
N = ip_network
SRC, DST = A("10.0.1.2"), A("192.0.2.10")


def policy(sport: int, sport_mask: int, dport: int, dport_mask: int, proto: int = 0) -> XfrmPolicy:
    return XfrmPolicy(XfrmSelector(AF_INET, N("10.0.1.0/24"), N("192.0.2.0/24"), sport=sport, sport_mask=sport_mask,
                                   dport=dport, dport_mask=dport_mask, proto=proto), Direction.OUT, index=8)


CASES: list[tuple[str, int, int, int, XfrmPolicy, bool]] = [
    # (name, proto, sport, dport of the flow, policy, selected)
    ("tcp dport", 6, 40000, 443, policy(0, 0, 443, 0xFFFF), True),
    ("tcp other dport", 6, 40000, 444, policy(0, 0, 443, 0xFFFF), False),
    ("udplite sport", 136, 5000, 7, policy(5000, 0xFFFF, 0, 0), True),
    ("sctp dport under a mask", 132, 1, 0x1234, policy(0, 0, 0x1200, 0xFF00), True),
    ("sctp dport outside the mask", 132, 1, 0x1334, policy(0, 0, 0x1200, 0xFF00), False),
    ("dccp: its dport is 0 to the selector", 33, 40000, 443, policy(0, 0, 443, 0xFFFF), False),
    ("dccp: a selector for port 0 takes it", 33, 40000, 443, policy(0, 0, 0, 0xFFFF), True),
    ("dccp: a selector for sport 0 takes it", 33, 40000, 443, policy(0, 0xFFFF, 0, 0), True),
    ("esp: no ports, 0 to the selector", 50, 0, 0, policy(0, 0xFFFF, 0, 0xFFFF), True),
    ("esp: a selector for port 500 does not take it", 50, 0, 0, policy(0, 0, 500, 0xFFFF), False),
    # The flow keeps ICMP's type << 8 | code in dport (echo request 8/0, unreachable 3/1).
    ("icmp type as sport", 1, 77, 8 << 8, policy(8, 0xFFFF, 0, 0), True),
    ("icmp code as dport", 1, 77, 3 << 8 | 1, policy(3, 0xFFFF, 1, 0xFFFF), True),
    ("icmp other code", 1, 77, 3 << 8 | 1, policy(3, 0xFFFF, 0, 0xFFFF), False),
    ("icmp: the id is not a port", 1, 8, 0, policy(8, 0xFFFF, 0, 0), False),
]


@pytest.mark.parametrize(("proto", "sport", "dport", "pol", "selected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_selector_ports_by_protocol(proto: int, sport: int, dport: int, pol: XfrmPolicy, selected: bool) -> None:
    flow = Flow(AF_INET, proto, SRC, DST, sport, dport, packet_mark=0)
    assert output_policy((pol,), flow) == (pol if selected else None)


def test_icmpv6_type_and_code_and_gre_keys() -> None:
    echo6 = XfrmPolicy(XfrmSelector(AF_INET6, N("2001:db8:1::/64"), N("2001:db8:2::/64"), sport=128,
                                    sport_mask=0xFFFF, dport=0, dport_mask=0xFFFF), Direction.OUT, index=8)
    ping6 = Flow(AF_INET6, 58, A("2001:db8:1::2"), A("2001:db8:2::2"), 9, 128 << 8, packet_mark=0)
    reply6 = Flow(AF_INET6, 58, A("2001:db8:1::2"), A("2001:db8:2::2"), 9, 129 << 8, packet_mark=0)
    assert output_policy((echo6,), ping6) == echo6
    assert output_policy((echo6,), reply6) is None
    # GRE's key halves are not in the flow: a selector with ports cannot be answered.
    gre = Flow(AF_INET, 47, SRC, DST, packet_mark=0)
    got = output_policy((policy(0, 0, 1, 0xFFFF),), gre)
    assert isinstance(got, Unknown) and "gre" in got.reason
    # Without port masks GRE is selected as any other protocol.
    assert output_policy((policy(0, 0, 0, 0),), gre) == policy(0, 0, 0, 0)
