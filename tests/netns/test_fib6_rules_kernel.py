"""The kernel as oracle for IPv6 `from` rules when a lookup has no source.

``fib6_rule_match`` skips a rule with a source prefix unless the lookup carries
a source (``RT6_LOOKUP_F_HAS_SADDR``); IPv4's ``fib4_rule_match`` compares the
source 0.0.0.0 instead. ``ip route get`` without ``from`` makes exactly such a
lookup, and so does the IPv6 address-type match (``match_lookup_rt6``). The
model's answers for each lookup, with and without a source, are compared with
the kernel's in a namespace built here.
"""

from __future__ import annotations

import json
import socket
from ipaddress import ip_address

import pytest
import trio

from topowatch.core.fib import Fib
from topowatch.core.flow import EgressKind, Unknown
from topowatch.edges import rtnl
from topowatch.netns import Namespace

pytestmark = pytest.mark.netns

SETUP = [
    "link add up1 type veth peer name isp1",
    "link set up1 up",
    "link set isp1 up",
    "addr add 2001:db8:1::2/64 dev up1 nodad",
    "addr add 10.1.0.2/24 dev up1",
    "route add default via 2001:db8:1::1 dev up1",
    "route add default via 10.1.0.1 dev up1",
    "-6 route add blackhole 2001:db8:99::/48 table 100",
    "-4 route add blackhole 192.0.2.0/24 table 100",
    # ::/1 and 0.0.0.0/1 hold the unspecified source; 2001:db8:1::/64 does not.
    "-6 rule add from ::/1 lookup 100 pref 100",
    "-6 rule add from 2001:db8:1::/64 lookup 100 pref 101",
    "-4 rule add from 0.0.0.0/1 lookup 100 pref 100",
]

LOOKUPS = [
    ("2001:db8:99::1", None),
    ("2001:db8:99::1", "2001:db8:1::2"),
    ("2001:db8:99::1", "8000::1"),
    ("2001:db8:5::1", None),
    ("192.0.2.1", None),
    ("192.0.2.1", "10.1.0.2"),
]


def kernel_answer(ns: Namespace, dst: str, src: str | None) -> tuple[EgressKind, str | None]:
    argv = ["ip", "-j", "route", "get", dst] + (["from", src] if src else [])
    try:
        out = ns.run(*argv)
    except Exception as exc:  # the kernel's error routes answer with an errno
        assert "Invalid argument" in str(exc), exc
        return EgressKind.BLACKHOLE, None
    (route,) = json.loads(out)
    return EgressKind.UNICAST, route["dev"]


def model_answer(fib: Fib, dst: str, src: str | None) -> tuple[EgressKind, str | None]:
    egresses = fib.lookup(ip_address(dst), src=ip_address(src) if src else None)
    assert not isinstance(egresses, Unknown), egresses
    (egress,) = egresses
    names = fib.topology.names()
    return egress.kind, names.get(egress.oif) if egress.kind == EgressKind.UNICAST else None


async def test_a_from_rule_meets_a_lookup_without_a_source_as_the_kernel_does(netns: Namespace) -> None:
    for command in SETUP:
        netns.run("ip", *command.split())
    topology = await rtnl.dump_topology(
        lambda: trio.socket.from_stdlib_socket(netns.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE))
    )
    fib = Fib(topology)
    answers = {(dst, src): (model_answer(fib, dst, src), kernel_answer(netns, dst, src)) for dst, src in LOOKUPS}
    assert {k: model for k, (model, kernel) in answers.items()} == {k: kernel for k, (model, kernel) in answers.items()}
    # The cases the oracle must have met: a source-less IPv6 lookup the ::/1 rule skips, the
    # same destination from a source that rule sends to the blackhole, and IPv4's source 0 matched.
    assert answers[("2001:db8:99::1", None)][1] == (EgressKind.UNICAST, "up1")
    assert answers[("2001:db8:99::1", "2001:db8:1::2")][1] == (EgressKind.BLACKHOLE, None)
    assert answers[("192.0.2.1", None)][1] == (EgressKind.BLACKHOLE, None)
