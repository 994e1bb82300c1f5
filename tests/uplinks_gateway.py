"""A gateway with two uplinks for the tests of incremental reactions and ``core.impact``.

A LAN (10.0.0.0/8), up1 (198.51.100.2/24, the default route's) and up2 (203.0.113.2/24,
masqueraded: the only NAT rule). 192.0.2.0/24 leaves by up1 in ``BEFORE`` and by up2 in
``MOVED``; ``UNUSED`` adds a route in table 100, which no rule reaches.
"""

from __future__ import annotations

from dataclasses import replace
from ipaddress import ip_address, ip_network
from typing import Any

from topowatch.core.model import Address, Link, Nexthop, Route, Topology
from topowatch.edges.nft import parse_ruleset_json

LO, LAN, UP1, UP2 = 1, 2, 3, 4
LINKS = (Link(LO, "lo"), Link(LAN, "lan"), Link(UP1, "up1"), Link(UP2, "up2"))
ADDRESSES = (Address(LAN, ip_address("10.0.0.1"), 8), Address(UP1, ip_address("198.51.100.2"), 24),
             Address(UP2, ip_address("203.0.113.2"), 24))  # fmt: skip
VIA1, VIA2 = Nexthop(UP1, ip_address("198.51.100.1")), Nexthop(UP2, ip_address("203.0.113.1"))
BASE_ROUTES = (
    Route(ip_network("10.0.0.0/8"), nexthops=(Nexthop(LAN),)),
    Route(ip_network("198.51.100.0/24"), nexthops=(Nexthop(UP1),)),
    Route(ip_network("203.0.113.0/24"), nexthops=(Nexthop(UP2),)),
    Route(ip_network("0.0.0.0/0"), nexthops=(VIA1,)),
)
MOVING = ip_network("192.0.2.0/24")
BEFORE = Topology(LINKS, ADDRESSES, (*BASE_ROUTES, Route(MOVING, nexthops=(VIA1,))))
MOVED = replace(BEFORE, routes=(*BASE_ROUTES, Route(MOVING, nexthops=(VIA2,))))
UNUSED = replace(BEFORE, routes=(*BEFORE.routes, Route(ip_network("198.18.0.0/15"), table=100, nexthops=(VIA2,))))

RULESET_DOC: list[dict[str, Any]] = [
    {"table": {"family": "ip", "name": "nat", "handle": 1}},
    {"chain": {"family": "ip", "table": "nat", "name": "post", "handle": 2, "type": "nat",
               "hook": "postrouting", "prio": 100, "policy": "accept"}},
    {"rule": {"family": "ip", "table": "nat", "chain": "post", "handle": 3, "expr": [
        {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "up2"}}, {"masquerade": None}]}},
]  # fmt: skip
RULESET = parse_ruleset_json({"nftables": RULESET_DOC})
