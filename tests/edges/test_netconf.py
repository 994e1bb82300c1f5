"""Reverse-path settings at the edges: /proc reads, RTM_NEWNETCONF events, nft reverse-path drops.

The kernel tests run in a namespace of their own; /proc/sys/net is read from
a thread that entered it (``Namespace.call``).
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import Any

import pytest
import trio

from topowatch.core.model import AF_INET, AF_INET6, Netconf
from topowatch.edges import rtnl
from topowatch.edges.iptables import prerouting_rpfilter_drop
from topowatch.edges.nft import parse_ruleset_json
from topowatch.edges.sysctl import SysctlError, read_netconf
from topowatch.netns import Namespace


def write_conf(root: Path, name: str, rp_filter: str, src_valid_mark: str = "0") -> None:
    (root / name).mkdir()
    (root / name / "rp_filter").write_text(rp_filter + "\n")
    (root / name / "src_valid_mark").write_text(src_valid_mark + "\n")


def test_read_netconf(tmp_path: Path) -> None:
    write_conf(tmp_path, "all", "2")
    write_conf(tmp_path, "lan", "1", "1")
    (tmp_path / "gone").mkdir()  # an interface that left while it was read
    assert read_netconf(str(tmp_path)) == (Netconf("all", 2), Netconf("lan", 1, src_valid_mark=True))


@pytest.mark.parametrize(("value", "match"), [("x", "not a number"), ("7", "must be 0, 1 or 2")])
def test_read_netconf_refuses_garbage(tmp_path: Path, value: str, match: str) -> None:
    write_conf(tmp_path, "all", value)
    with pytest.raises(SysctlError, match=match):
        read_netconf(str(tmp_path))


def netconf_msg(ifindex: int, rp_filter: int | None, family: int = socket.AF_INET, kind: int = 80) -> bytes:
    attrs = struct.pack("=HHi", 8, rtnl.NETCONFA_IFINDEX, ifindex)
    if rp_filter is not None:
        attrs += struct.pack("=HHi", 8, rtnl.NETCONFA_RP_FILTER, rp_filter)
    body = bytes((family, 0, 0, 0)) + attrs
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body


def test_netconf_event() -> None:
    event = rtnl.netconf_event(netconf_msg(3, 2), {3: "lan"})
    assert event is not None and event.kind is rtnl.EventKind.NETCONF
    assert event.description == "netconf changed: rp_filter of lan is 2"
    assert rtnl.netconf_event(netconf_msg(-1, 1)).description.endswith("of all is 1")  # type: ignore[union-attr]
    assert rtnl.netconf_event(netconf_msg(3, None)) is None  # forwarding or another setting
    assert rtnl.netconf_event(netconf_msg(3, 1, family=socket.AF_INET6)) is None
    assert rtnl.netconf_event(netconf_msg(3, 1)[:18]) is None


def test_event_stream_turns_netconf_messages_into_events() -> None:
    stream = rtnl.RtnlEvents(rcvbuf=None)
    stream._feed(netconf_msg(-1, 2) + netconf_msg(2, None))
    assert [e.description for e in stream._pending] == ["netconf changed: rp_filter of all is 2"]  # type: ignore[union-attr]
    assert stream.stats.ignored == 1


def nft_doc(*rules: list[dict[str, Any]], hook: str = "prerouting", kind: str = "filter",
            family: str = "inet") -> dict[str, Any]:
    items: list[dict[str, Any]] = [
        {"table": {"family": family, "name": "fw", "handle": 1}},
        {"chain": {"family": family, "table": "fw", "name": "pre", "handle": 1, "type": kind, "hook": hook,
                   "prio": -300, "policy": "accept"}},
    ]
    items += [{"rule": {"family": family, "table": "fw", "chain": "pre", "handle": i + 2, "expr": expr}}
              for i, expr in enumerate(rules)]
    return {"nftables": items}


RPF = [{"match": {"op": "==", "left": {"fib": {"result": "oif", "flags": ["saddr", "iif"]}}, "right": False}},
       {"drop": None}]
COUNTER = [{"counter": {"packets": 0, "bytes": 0}}]
ACCEPT_LO = [{"match": {"op": "==", "left": {"meta": {"key": "iif"}}, "right": "lo"}}, {"accept": None}]
MARKED = [{"match": {"op": "==", "left": {"fib": {"result": "oif", "flags": ["saddr", "mark", "iif"]}},
                     "right": False}}, {"drop": None}]


@pytest.mark.parametrize(("doc", "expected"), [
    (nft_doc(RPF), {AF_INET, AF_INET6}),
    (nft_doc(COUNTER, RPF), {AF_INET, AF_INET6}),
    (nft_doc(RPF, family="ip6"), {AF_INET6}),
    (nft_doc(ACCEPT_LO, RPF), set()),  # some packets never reach it
    (nft_doc(MARKED), set()),  # the lookup uses the mark: not modelled as a pin
    (nft_doc(RPF, hook="input"), set()),
    (nft_doc([RPF[0], {"accept": None}]), set()),
])
def test_nft_reverse_path_drop(doc: dict[str, Any], expected: set[int]) -> None:
    assert parse_ruleset_json(doc).rpfilter == frozenset(expected)


@pytest.mark.netns
async def test_kernel_announces_rp_filter_changes(netns: Namespace) -> None:
    sock = trio.socket.from_stdlib_socket(netns.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE))
    try:
        async with rtnl.RtnlEvents(sock) as events:
            await trio.to_thread.run_sync(lambda: netns.run("sysctl", "-qw", "net.ipv4.conf.all.rp_filter=2"))
            with trio.fail_after(10):
                async for event in events:
                    if isinstance(event, rtnl.RtnlEvent) and event.kind is rtnl.EventKind.NETCONF:
                        assert event.description == "netconf changed: rp_filter of all is 2"
                        break
    finally:
        sock.close()
    conf = {n.name: n for n in netns.call(read_netconf)}
    assert conf["all"].rp_filter == 2 and "lo" in conf


def test_marks_set_outside_the_ip_families_are_not_followed() -> None:
    """A netdev ingress chain may set a mark before prerouting: the ruleset is no longer whole."""
    doc = nft_doc(RPF)
    assert parse_ruleset_json(doc).marks_known
    doc["nftables"] += [
        {"table": {"family": "netdev", "name": "ing", "handle": 9}},
        {"chain": {"family": "netdev", "table": "ing", "name": "in", "handle": 1, "type": "filter",
                   "hook": "ingress", "dev": "lan", "prio": 0, "policy": "accept"}},
        {"rule": {"family": "netdev", "table": "ing", "chain": "in", "handle": 2,
                  "expr": [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": 1}}]}},
    ]
    assert not parse_ruleset_json(doc).marks_known


XT_RPF = [{"xt": {"type": "match", "name": "rpfilter"}}, {"counter": {"packets": 0, "bytes": 0}}, {"drop": None}]


def test_iptables_nft_rpfilter_is_left_to_iptables_save() -> None:
    rs = parse_ruleset_json(nft_doc(XT_RPF, family="ip"))
    assert rs.xt_rpfilter == {AF_INET} and not rs.rpfilter


@pytest.mark.parametrize(("save", "expected"), [
    ("*raw\n-A PREROUTING -m rpfilter --invert -j DROP\nCOMMIT\n", True),
    ("*raw\n-A PREROUTING -j CT --notrack\n-A PREROUTING -m rpfilter --invert -j DROP\n", True),
    ("*raw\n-A PREROUTING -i lo -j ACCEPT\n-A PREROUTING -m rpfilter --invert -j DROP\n", False),
    ("*raw\n-A PREROUTING -m rpfilter --loose --invert -j DROP\n", False),
    ("*raw\n-A PREROUTING -m rpfilter --validmark --invert -j DROP\n", False),
    ("*raw\n-A OUTPUT -m rpfilter --invert -j DROP\n", False),
])
def test_prerouting_rpfilter_drop(save: str, expected: bool) -> None:
    assert prerouting_rpfilter_drop(save) is expected
