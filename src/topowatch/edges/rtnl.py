# SPDX-License-Identifier: GPL-2.0-or-later
"""The rtnetlink edge: dump links, addresses, routes and rules into a Topology; stream their changes.

Theory of operation: requests and event subscriptions run on a plain netlink
socket wrapped by ``trio.socket`` (pyroute2's own sockets block trio, or stop
working after one overrun). pyroute2 serves as a codec only: its marshal
decodes the kernel's messages, its message classes encode the dump requests.
Pure functions turn each decoded message into a ``core.model`` value, so they
are tested against recorded kernel messages without a kernel.

What this module decides:
- which kernel objects enter a snapshot: links (AF_UNSPEC; bridge-port
  messages are not links), IPv4 and IPv6 addresses, routes of every table and
  type (cached/cloned routes are not topology and are left out), IPv4 and IPv6
  policy rules, all in the kernel's dump order;
- how a route names its nexthops: the kernel's RTA_OIF/RTA_GATEWAY (or
  RTA_VIA), or one per RTA_MULTIPATH hop with weight = hops + 1. A route that
  uses a nexthop object (RTA_NH_ID) is also dumped with those attributes while
  ``nexthop_compat_mode`` is on (the default); when they are missing, the
  nexthop objects are dumped (RTM_GETNEXTHOP) and the id is resolved, a group
  into one Nexthop per member with its weight. An id that still cannot be
  resolved leaves the route without nexthops (logged), never a crash.
  Routes that do not forward (blackhole, unreachable, prohibit, throw) carry no
  nexthops: the kernel reports loopback there as a placeholder;
- which rule attributes the FIB evaluates; every other selector present in a
  rule (ipproto, sport, dport, uidrange, l3mdev, tun_id, dscp, flowlabel, and
  attributes this pyroute2 does not know, as ``attr<N>``) is named in
  ``PolicyRule.unmodelled`` so a lookup reaching it answers "unknown".
  FRA_PROTOCOL (who installed the rule) and FRA_FLOW (a realm) are not
  selectors and are dropped.

What it must never do:
- use an interrupted dump (NLM_F_DUMP_INTR): it dumps again, a bounded number
  of times, then raises ``DumpInterrupted``;
- stop yielding events: an overrun (ENOBUFS) becomes an ``Overrun`` event and
  the stream goes on; a message it cannot decode is logged, counted, skipped
  (bad input only, see ``decode_messages``: a bug raises), and so is a route
  message on which pyroute2's decoder would never return;
- leave a congested socket behind: on overrun the stale backlog is discarded
  at once, because until the queue is read empty the kernel drops every new
  notification without reporting another ENOBUFS (see ``_drain``);
- enter another network namespace: every socket works in the namespace it was
  created in (pass a socket made elsewhere to work there);
- leak pyroute2's untyped values: ``Any`` stays inside this module.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import socket
import struct
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from ipaddress import ip_address, ip_network
from types import TracebackType
from typing import Any, Generic, Protocol, Self, TypeAlias, TypeVar

import trio
from pyroute2.netlink import nlmsg
from pyroute2.netlink.exceptions import NetlinkDecodeError
from pyroute2.netlink.rtnl.fibmsg import fibmsg
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.marshal import MarshalRtnl
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from topowatch.core.model import (
    AF_INET,
    AF_INET6,
    Address,
    IPAddress,
    IPNetwork,
    Link,
    Nexthop,
    PolicyRule,
    Route,
    RouteType,
    RuleAction,
    Topology,
)
from topowatch.errors import DumpInterrupted, NetlinkError
from topowatch.text import decode

log = logging.getLogger(__name__)

# --- netlink numbers (linux/netlink.h, linux/rtnetlink.h, linux/fib_rules.h) ----------

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_EXT_ACK = 11
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 32, 33, 34
RTM_NEWNEXTHOP, RTM_DELNEXTHOP, RTM_GETNEXTHOP = 104, 105, 106
RTM_NEWNETCONF, RTM_DELNETCONF = 80, 81
NETCONFA_IFINDEX, NETCONFA_RP_FILTER = 1, 3
NETCONFA_IFINDEX_ALL, NETCONFA_IFINDEX_DEFAULT = -1, -2

# rtnetlink multicast groups (RTNLGRP_*), joined with NETLINK_ADD_MEMBERSHIP.
RTNLGRP_LINK = 1
RTNLGRP_IPV4_IFADDR = 5
RTNLGRP_IPV4_ROUTE = 7
RTNLGRP_IPV4_RULE = 8
RTNLGRP_IPV6_IFADDR = 9
RTNLGRP_IPV6_ROUTE = 11
RTNLGRP_IPV6_RULE = 19
RTNLGRP_IPV4_NETCONF = 24
RTNLGRP_NEXTHOP = 32
# A nexthop object can be replaced without any route message; its group matters.
DEFAULT_GROUPS: tuple[int, ...] = (
    RTNLGRP_LINK,
    RTNLGRP_IPV4_IFADDR,
    RTNLGRP_IPV6_IFADDR,
    RTNLGRP_IPV4_ROUTE,
    RTNLGRP_IPV6_ROUTE,
    RTNLGRP_IPV4_RULE,
    RTNLGRP_IPV6_RULE,
    RTNLGRP_NEXTHOP,
    # rp_filter changes (RTM_NEWNETCONF): they change which interface a flow may enter on.
    RTNLGRP_IPV4_NETCONF,
)

IFF_UP = 0x1
IFF_RUNNING = 0x40
RTM_F_CLONED = 0x200
FIB_RULE_INVERT = 0x2
FIB_RULE_FIND_SADDR = 0x10000  # IPv6: a `from` rule picks a source when the lookup has none
RTA_NH_ID = 30
RTA_MULTIPATH = 9
RTA_ENCAP_TYPE = 21
RTA_ENCAP = 22
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
UNSET_U32 = 0xFFFFFFFF

RECV_BUFSIZE = 1 << 16  # the kernel caps one dump datagram at 32 KiB
DUMP_ATTEMPTS = 5
EVENT_RCVBUF = 8 << 20

# Routes whose oif the kernel fills with loopback as a placeholder.
_NON_FORWARDING = frozenset({RouteType.BLACKHOLE, RouteType.UNREACHABLE, RouteType.PROHIBIT, RouteType.THROW})

# Rule attributes that select packets the FIB does not evaluate, by iproute2's word.
_UNMODELLED_RULE_ATTRS = {
    "FRA_IP_PROTO": "ipproto",
    "FRA_SPORT_RANGE": "sport",
    "FRA_DPORT_RANGE": "dport",
    "FRA_UID_RANGE": "uidrange",
    "FRA_L3MDEV": "l3mdev",
    "FRA_TUN_ID": "tun_id",
}
# Rule attributes newer than pyroute2 0.9.7's map, by number.
_UNMODELLED_RULE_NUMBERS = {
    25: "dscp",
    26: "flowlabel",
    27: "flowlabel",
    28: "sport",
    29: "dport",
    30: "dscp",
}
# Present in rules, but not selectors.
_IGNORED_RULE_ATTRS = frozenset({"FRA_PRIORITY", "FRA_PROTOCOL", "FRA_FLOW", "FRA_PAD", "FRA_UNSPEC"})
_MODELLED_RULE_ATTRS = frozenset(
    {
        "FRA_DST",
        "FRA_SRC",
        "FRA_IIFNAME",
        "FRA_OIFNAME",
        "FRA_GOTO",
        "FRA_FWMARK",
        "FRA_FWMASK",
        "FRA_TABLE",
        "FRA_SUPPRESS_PREFIXLEN",
        "FRA_SUPPRESS_IFGROUP",
    }
)


class UndecodableMessage(NetlinkError):
    """A kernel message this edge cannot turn into a model value (skipped, never fatal)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, errno.EBADMSG)


# --- nexthop objects (pyroute2 0.9.7 has no nhmsg) -------------------------------


class nhmsg(nlmsg):  # type: ignore[misc]
    """struct nhmsg and its NHA_* attributes (linux/nexthop.h), decode only."""

    prefix = "NHA_"
    fields = (
        ("family", "B"),
        ("scope", "B"),
        ("protocol", "B"),
        ("resvd", "B"),
        ("flags", "I"),
    )
    nla_map = (
        (1, "NHA_ID", "uint32"),
        (2, "NHA_GROUP", "cdata"),
        (3, "NHA_GROUP_TYPE", "uint16"),
        (4, "NHA_BLACKHOLE", "flag"),
        (5, "NHA_OIF", "uint32"),
        (6, "NHA_GATEWAY", "ipaddr"),
        (7, "NHA_ENCAP_TYPE", "uint16"),
        (9, "NHA_GROUPS", "flag"),
        (10, "NHA_MASTER", "uint32"),
        (11, "NHA_FDB", "flag"),
    )


@dataclass(frozen=True, slots=True)
class NexthopObject:
    """An `ip nexthop` object: one hop, a blackhole, or a group of (id, weight) members."""

    id: int
    oif: int = 0
    gateway: IPAddress | None = None
    blackhole: bool = False
    group: tuple[tuple[int, int], ...] = ()

    def describe(self, names: Mapping[int, str] | None = None) -> str:
        names = names or {}
        parts = [f"id {self.id}"]
        if self.group:
            parts.append("group " + "/".join(f"{i},{w}" for i, w in self.group))
        if self.blackhole:
            parts.append("blackhole")
        if self.gateway is not None:
            parts.append(f"via {self.gateway}")
        if self.oif:
            parts.append(f"dev {names.get(self.oif, f'if{self.oif}')}")
        return " ".join(parts)


def _marshal() -> Any:
    marshal = MarshalRtnl()
    marshal.msg_map[RTM_NEWNEXTHOP] = nhmsg
    marshal.msg_map[RTM_DELNEXTHOP] = nhmsg
    return marshal


# --- decoding ----------------------------------------------------------------------


@dataclass(slots=True)
class DecodeStats:
    """Counters an operator can read: what arrived, what was skipped and why."""

    messages: int = 0
    undecodable: int = 0
    ignored: int = 0
    overruns: int = 0


def split_datagram(data: bytes, stats: DecodeStats | None = None) -> Iterator[tuple[int, int, int, bytes]]:
    """The netlink messages in a datagram as (type, flags, sequence number, bytes).

    Framing is read here, not by pyroute2, so that errors and the end of a dump
    are always seen and one bad message cannot hide the others. A length that
    does not fit ends the datagram (counted in ``stats.undecodable``).
    """
    offset = 0
    while offset + 16 <= len(data):
        length, kind, flags, seq = struct.unpack_from("=IHHI", data, offset)
        if length < 16 or offset + length > len(data):
            log.warning("rtnetlink: a message claims %d bytes at offset %d of %d", length, offset, len(data))
            if stats is not None:
                stats.undecodable += 1
            return
        yield kind, flags, seq, data[offset : offset + length]
        offset += (length + 3) & ~3


# What pyroute2 0.9.7's marshal raises on bad input, found by feeding it truncated and garbled
# recorded messages (tests/edges/test_rtnl_convert.py keeps feeding it): ``struct.error`` from a
# fixed field or header that runs past the message (the message's own, or the one an
# NLMSG_ERROR quotes), and ``NetlinkDecodeError`` from the attributes of the quoted message (a
# message's own attribute errors it keeps in ``header['error']``). Anything else is a bug, and raises.
_BAD_INPUT = (struct.error, NetlinkDecodeError)


def _encap_scan_never_ends(data: bytes, offset: int) -> bool:
    """True where pyroute2's ``rtmsg.encap_info``, looking for RTA_ENCAP_TYPE from ``offset``, loops forever.

    It steps from attribute to attribute by their raw length (unaligned, and
    over the rest of the message); a step of 0 repeats forever, unless the
    attribute there is RTA_ENCAP_TYPE. A read past the end stops it.
    """
    while offset < len(data):
        if offset + 2 > len(data):
            return False
        step = struct.unpack_from("=H", data, offset)[0]
        offset += step
        if offset + 4 > len(data):
            return False
        if struct.unpack_from("=H", data, offset + 2)[0] == RTA_ENCAP_TYPE:
            return False
        if step == 0:
            return True
    return False


def _route_attrs_loop(data: bytes, start: int, first: int, length: int, depth: int = 0) -> bool:
    """True if decoding the attributes of a route message (or of one multipath hop) would hang pyroute2.

    Walks the chain as pyroute2's ``decode_nlas`` does (``start`` and
    ``length`` are the message's or hop's, ``first`` its first attribute):
    an RTA_ENCAP with no RTA_ENCAP_TYPE before it makes pyroute2 scan for the
    type (see ``_encap_scan_never_ends``); RTA_MULTIPATH hops hold chains of
    their own. Whatever pyroute2 would fail on instead ends the walk.
    """
    if depth > 256:
        return False  # pyroute2 recurses too, and fails (RecursionError) long before this depth
    offset = first
    typed = False
    while offset - start <= length - 4:
        if offset + 4 > len(data):
            return False
        nla_length, nla_type = struct.unpack_from("=HH", data, offset)
        nla_type &= NLA_TYPE_MASK
        if nla_type == RTA_ENCAP and not typed and _encap_scan_never_ends(data, offset):
            return True
        if nla_type == RTA_ENCAP_TYPE:
            typed = True
        if nla_type == RTA_MULTIPATH:
            # An array of hops: each a rtnexthop (length, flags, hops, ifindex) and its attributes,
            # bounded by the attribute's own length field as pyroute2 reads it.
            hop, end = offset + 4, offset + max(nla_length, 4)
            while hop < end:
                if hop + 8 > len(data):
                    break
                hop_length = max(struct.unpack_from("=H", data, hop)[0], 4)
                if _route_attrs_loop(data, hop, hop + 8, hop_length, depth + 1):
                    return True
                hop += (hop_length + 3) & ~3
        offset += (min(max(nla_length, 4), length - offset + start) + 3) & ~3
    return False


RTMSG_SIZE = 12  # struct rtmsg, before a route message's attributes


def decode_messages(data: bytes, marshal: Any = None, stats: DecodeStats | None = None) -> list[Any]:
    """Decode one or more netlink datagrams (concatenated) into pyroute2 messages.

    A message pyroute2 cannot parse at all is left out (counted in
    ``stats.undecodable``); one whose attributes fail to decode is kept and
    carries the error in ``msg['header']['error']``, for the converters to refuse.
    Only bad input is skipped (``_BAD_INPUT``, and a route message pyroute2
    would never finish decoding): an error of another kind is a bug and raises.
    """
    marshal = marshal if marshal is not None else _marshal()
    out: list[Any] = []
    for kind, _, _, raw in split_datagram(bytes(data), stats):
        route = kind in (RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE)
        if route and _route_attrs_loop(raw, 0, 16 + RTMSG_SIZE, len(raw)):
            log.warning("rtnetlink: a route message of %d bytes has an RTA_ENCAP that cannot be read",
                        len(raw))
            if stats is not None:
                stats.undecodable += 1
            continue
        try:
            out.extend(marshal.parse(raw))
        except _BAD_INPUT as exc:
            log.warning("rtnetlink: cannot parse a message of %d bytes: %r", len(raw), exc)
            if stats is not None:
                stats.undecodable += 1
    return out


def _msg_type(msg: Any) -> int:
    return int(msg["header"]["type"])


def check_decoded(msg: Any, what: str) -> None:
    error = msg["header"].get("error")
    if error is not None and not isinstance(error, OSError):
        raise UndecodableMessage(f"{what} message does not decode: {error}")


def _unknown_attrs(msg: Any) -> dict[int, bytes]:
    """Attributes pyroute2 did not recognise: number -> raw payload."""
    out: dict[int, bytes] = {}
    for name, value in msg["attrs"]:
        if name == "UNKNOWN":
            nla_type = int(value["header"]["type"]) & 0x3FFF
            out[nla_type] = bytes(value.data[value.offset + 4 : value.offset + value.length])
    return out


def _attr(msg: Any, name: str) -> Any:
    return msg.get_attr(name)


def _name(value: Any) -> str | None:
    """A name attribute (interface, kind) as text: pyroute2 hands non-UTF-8 names over as bytes.

    Those are decoded as every external text is (``topowatch.text``): the
    same bytes give the same ``str`` here and in a rule that names them.
    """
    if value is None:
        return None
    if isinstance(value, bytes):
        return decode(value.split(b"\0", 1)[0])
    return str(value)


def _addr(text: Any, what: str) -> IPAddress:
    try:
        return ip_address(text)
    except ValueError as exc:
        raise UndecodableMessage(f"{what}: {text!r} is not an IP address") from exc


def _net(addr: Any, plen: int, family: int) -> IPNetwork:
    if addr is None:
        addr = "0.0.0.0" if family == AF_INET else "::"
    try:
        return ip_network(f"{addr}/{plen}", strict=False)
    except ValueError as exc:
        raise UndecodableMessage(f"{addr!r}/{plen} is not a network") from exc


@contextlib.contextmanager
def converting(what: str) -> Iterator[None]:
    """Turn any failure inside a converter into UndecodableMessage naming the object."""
    try:
        yield
    except UndecodableMessage:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, struct.error) as exc:
        raise UndecodableMessage(f"{what} message cannot be converted: {exc!r}") from exc


def link_from_msg(msg: Any) -> Link | None:
    """An RTM_NEWLINK/RTM_DELLINK message as a Link; None for non-link families (bridge ports)."""
    with converting("link"):
        check_decoded(msg, "link")
        if msg["family"] != socket.AF_UNSPEC:
            return None
        flags = int(msg["flags"])
        linkinfo = _attr(msg, "IFLA_LINKINFO")
        kind = linkinfo.get_attr("IFLA_INFO_KIND") if linkinfo is not None else None
        up = bool(flags & IFF_UP)
        return Link(
            index=int(msg["index"]),
            name=_name(_attr(msg, "IFLA_IFNAME")) or "",
            up=up,
            running=bool(flags & IFF_RUNNING),
            kind=_name(kind) or "",
            master=int(_attr(msg, "IFLA_MASTER") or 0),
        )


def address_from_msg(msg: Any) -> Address | None:
    """An RTM_NEWADDR/RTM_DELADDR message as an Address; None for non-IP families.

    IFA_LOCAL is the local address when present (IFA_ADDRESS is then the peer
    on a point-to-point link); IFA_FLAGS supersedes the 8-bit ifa_flags.
    """
    with converting("address"):
        check_decoded(msg, "address")
        family = int(msg["family"])
        if family not in (AF_INET, AF_INET6):
            return None
        local = _attr(msg, "IFA_LOCAL")
        address = _attr(msg, "IFA_ADDRESS")
        if local is None and address is None:
            raise UndecodableMessage("address message has neither IFA_LOCAL nor IFA_ADDRESS")
        mine = _addr(local if local is not None else address, "IFA_LOCAL")
        peer = None
        if local is not None and address is not None:
            other = _addr(address, "IFA_ADDRESS")
            peer = other if other != mine else None
        flags = _attr(msg, "IFA_FLAGS")
        return Address(
            ifindex=int(msg["index"]),
            address=mine,
            prefixlen=int(msg["prefixlen"]),
            scope=int(msg["scope"]),
            flags=int(flags if flags is not None else msg["flags"]),
            peer=peer,
        )


def _gateway(hop: Any, what: str) -> IPAddress | None:
    gateway = hop.get_attr("RTA_GATEWAY")
    if gateway is not None:
        return _addr(gateway, what)
    via = hop.get_attr("RTA_VIA")  # an IPv4 route through an IPv6 gateway
    if via is not None:
        return _addr(via["addr"], what)
    return None


def route_nexthop_id(msg: Any) -> int | None:
    """The nexthop object id (RTA_NH_ID) a route message uses, if any."""
    raw = _unknown_attrs(msg).get(RTA_NH_ID)
    if raw is None or len(raw) < 4:
        return None
    return int(struct.unpack_from("=I", raw)[0])


def _expanded_nexthops(msg: Any, what: str) -> tuple[Nexthop, ...]:
    multipath = _attr(msg, "RTA_MULTIPATH")
    if multipath:
        return tuple(
            Nexthop(oif=int(hop["oif"]), gateway=_gateway(hop, what), weight=int(hop["hops"]) + 1)
            for hop in multipath
        )
    oif = _attr(msg, "RTA_OIF")
    gateway = _gateway(msg, what)
    if oif is None and gateway is None:
        return ()
    return (Nexthop(oif=int(oif or 0), gateway=gateway),)


def resolve_nexthop_object(nhid: int, objects: Mapping[int, NexthopObject]) -> tuple[Nexthop, ...] | None:
    """The hops of nexthop object ``nhid``; None when it (or a group member) is unknown."""
    obj = objects.get(nhid)
    if obj is None:
        return None
    if obj.blackhole:
        return ()
    if not obj.group:
        return (Nexthop(oif=obj.oif, gateway=obj.gateway),)
    hops: list[Nexthop] = []
    for member, weight in obj.group:
        m = objects.get(member)
        if m is None or m.group:
            return None
        if not m.blackhole:
            hops.append(Nexthop(oif=m.oif, gateway=m.gateway, weight=weight))
    return tuple(hops)


def route_from_msg(msg: Any, nexthop_objects: Mapping[int, NexthopObject] | None = None) -> Route | None:
    """An RTM_NEWROUTE/RTM_DELROUTE message as a Route.

    None for what is not topology: cached/cloned routes (RTM_F_CLONED) and
    families other than IPv4/IPv6 (MPLS, multicast routing tables).
    """
    with converting("route"):
        check_decoded(msg, "route")
        family = int(msg["family"])
        if family not in (AF_INET, AF_INET6) or int(msg["flags"]) & RTM_F_CLONED:
            return None
        what = "route gateway"
        try:
            rtype = RouteType(int(msg["type"]))
        except ValueError as exc:
            raise UndecodableMessage(f"route type {msg['type']} is unknown") from exc
        table = _attr(msg, "RTA_TABLE")
        dst = _net(_attr(msg, "RTA_DST"), int(msg["dst_len"]), family)
        nexthops: tuple[Nexthop, ...] = ()
        if rtype not in _NON_FORWARDING:
            nexthops = _expanded_nexthops(msg, what)
            nhid = route_nexthop_id(msg)
            if not nexthops and nhid is not None:
                resolved = resolve_nexthop_object(nhid, nexthop_objects or {})
                if resolved is None:
                    log.warning("rtnetlink: route %s uses unknown nexthop id %d: no nexthops", dst, nhid)
                nexthops = resolved or ()
        prefsrc = _attr(msg, "RTA_PREFSRC")
        return Route(
            dst=dst,
            table=int(table if table is not None else msg["table"]),
            type=rtype,
            nexthops=nexthops,
            metric=int(_attr(msg, "RTA_PRIORITY") or 0),
            prefsrc=_addr(prefsrc, "RTA_PREFSRC") if prefsrc is not None else None,
            scope=int(msg["scope"]),
            tos=int(msg["tos"]),
            protocol=int(msg["proto"]),
        )


def route_needs_nexthop_objects(msg: Any) -> bool:
    """True for a route that names a nexthop id but carries no expanded hops (compat mode off)."""
    with contextlib.suppress(Exception):
        return (
            int(msg["family"]) in (AF_INET, AF_INET6)
            and route_nexthop_id(msg) is not None
            and not _expanded_nexthops(msg, "route gateway")
        )
    return False


def rule_from_msg(msg: Any) -> PolicyRule | None:
    """An RTM_NEWRULE/RTM_DELRULE message as a PolicyRule; None for non-IP families."""
    with converting("rule"):
        check_decoded(msg, "rule")
        family = int(msg["family"])
        if family not in (AF_INET, AF_INET6):
            return None
        try:
            action = RuleAction(int(msg["action"]))
        except ValueError as exc:
            raise UndecodableMessage(f"rule action {msg['action']} is unknown") from exc
        unmodelled: set[str] = set()
        for name, value in msg["attrs"]:
            if name in _UNMODELLED_RULE_ATTRS:
                if name != "FRA_L3MDEV" or value:
                    unmodelled.add(_UNMODELLED_RULE_ATTRS[name])
            elif name == "UNKNOWN":
                number = int(value["header"]["type"]) & 0x3FFF
                unmodelled.add(_UNMODELLED_RULE_NUMBERS.get(number, f"attr{number}"))
            elif name not in _MODELLED_RULE_ATTRS and name not in _IGNORED_RULE_ATTRS:
                unmodelled.add(name.removeprefix("FRA_").lower())
        if family == AF_INET6 and int(msg["flags"]) & FIB_RULE_FIND_SADDR and int(msg["src_len"]):
            unmodelled.add("find_saddr")  # fib6_rule_saddr: a source is chosen, then compared
        src = _attr(msg, "FRA_SRC")
        dst = _attr(msg, "FRA_DST")
        fwmark = _attr(msg, "FRA_FWMARK")
        fwmask = _attr(msg, "FRA_FWMASK")
        if fwmark is None and fwmask:
            fwmark = 0  # the kernel omits a zero mark; the mask still selects
        table = _attr(msg, "FRA_TABLE")
        suppress_prefixlen = _attr(msg, "FRA_SUPPRESS_PREFIXLEN")
        suppress_ifgroup = _attr(msg, "FRA_SUPPRESS_IFGROUP")
        goto = _attr(msg, "FRA_GOTO")
        return PolicyRule(
            family=family,
            priority=int(_attr(msg, "FRA_PRIORITY") or 0),
            action=action,
            table=int(table if table is not None else msg["table"]),
            src=_net(src, int(msg["src_len"]), family) if src is not None else None,
            dst=_net(dst, int(msg["dst_len"]), family) if dst is not None else None,
            iifname=_name(_attr(msg, "FRA_IIFNAME")),
            oifname=_name(_attr(msg, "FRA_OIFNAME")),
            fwmark=None if fwmark is None else int(fwmark),
            fwmask=None if fwmask is None else int(fwmask),
            tos=int(msg["tos"]),
            goto=int(goto) if goto is not None and action == RuleAction.GOTO else None,
            suppress_prefixlen=(None if suppress_prefixlen in (None, UNSET_U32) else int(suppress_prefixlen)),
            suppress_ifgroup=None if suppress_ifgroup in (None, UNSET_U32) else int(suppress_ifgroup),
            invert=bool(int(msg["flags"]) & FIB_RULE_INVERT),
            unmodelled=tuple(sorted(unmodelled)),
        )


def nexthop_object_from_msg(msg: Any) -> NexthopObject:
    """An RTM_NEWNEXTHOP/RTM_DELNEXTHOP message as a NexthopObject."""
    with converting("nexthop"):
        check_decoded(msg, "nexthop")
        nhid = _attr(msg, "NHA_ID")
        if nhid is None:
            raise UndecodableMessage("nexthop message has no NHA_ID")
        group: list[tuple[int, int]] = []
        raw = _attr(msg, "NHA_GROUP")
        if raw:
            # struct nexthop_grp { u32 id; u8 weight (minus one); u8 weight_high; u16 resvd2; }
            for offset in range(0, len(raw) - len(raw) % 8, 8):
                member, weight, high = struct.unpack_from("=IBBxx", raw, offset)
                group.append((int(member), (high << 8 | weight) + 1))
        gateway = _attr(msg, "NHA_GATEWAY")
        return NexthopObject(
            id=int(nhid),
            oif=int(_attr(msg, "NHA_OIF") or 0),
            gateway=_addr(gateway, "NHA_GATEWAY") if gateway is not None else None,
            blackhole=bool(_attr(msg, "NHA_BLACKHOLE")),
            group=tuple(group),
        )


def topology_from_messages(messages: Iterable[Any], stats: DecodeStats | None = None) -> Topology:
    """Assemble a Topology from decoded dump answers of any kind, keeping the kernel's order.

    Messages that do not convert are logged and skipped (counted in ``stats``).
    """
    stats = stats if stats is not None else DecodeStats()
    links: list[Link] = []
    addresses: list[Address] = []
    routes: list[Any] = []
    rules: list[PolicyRule] = []
    objects: dict[int, NexthopObject] = {}
    for msg in messages:
        kind = _msg_type(msg)
        try:
            if kind == RTM_NEWLINK:
                stats.messages += 1
                link = link_from_msg(msg)
                if link is not None:
                    links.append(link)
            elif kind == RTM_NEWADDR:
                stats.messages += 1
                address = address_from_msg(msg)
                if address is not None:
                    addresses.append(address)
            elif kind == RTM_NEWROUTE:
                stats.messages += 1
                routes.append(msg)
            elif kind == RTM_NEWRULE:
                stats.messages += 1
                rule = rule_from_msg(msg)
                if rule is not None:
                    rules.append(rule)
            elif kind == RTM_NEWNEXTHOP:
                stats.messages += 1
                obj = nexthop_object_from_msg(msg)
                objects[obj.id] = obj
        except UndecodableMessage as exc:
            stats.undecodable += 1
            log.warning("rtnetlink dump: skipped a message: %s", exc)
    converted: list[Route] = []
    for msg in routes:
        try:
            route = route_from_msg(msg, objects)
        except UndecodableMessage as exc:
            stats.undecodable += 1
            log.warning("rtnetlink dump: skipped a message: %s", exc)
            continue
        if route is not None:
            converted.append(route)
    return Topology(
        links=tuple(links), addresses=tuple(addresses), routes=tuple(converted), rules=tuple(rules)
    )


# --- sockets and dumps --------------------------------------------------------------


class NetlinkSocket(Protocol):
    """The part of ``trio.socket.SocketType`` this edge uses (tests may pass a wrapper)."""

    def send(self, data: bytes, /) -> Awaitable[int]: ...

    def recv(self, bufsize: int, /) -> Awaitable[bytes]: ...

    def bind(self, address: tuple[int, int], /) -> Awaitable[None]: ...

    def setsockopt(self, level: int, optname: int, value: int, /) -> None: ...

    def close(self) -> None: ...


SocketFactory: TypeAlias = Callable[[], NetlinkSocket]


def open_rtnl_socket() -> trio.socket.SocketType:
    """A NETLINK_ROUTE socket in the calling thread's network namespace."""
    sock = trio.socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
    with contextlib.suppress(OSError):
        sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
    return sock


def _request(msg_class: Any, msg_type: int, seq: int, **fields: int) -> bytes:
    msg = msg_class()
    for key, value in fields.items():
        msg[key] = value
    msg["header"]["type"] = msg_type
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_DUMP
    msg["header"]["sequence_number"] = seq
    msg.encode()
    return bytes(msg.data)


def _nexthop_request(seq: int) -> bytes:
    return struct.pack("=IHHIIBBBBI", 24, RTM_GETNEXTHOP, NLM_F_REQUEST | NLM_F_DUMP, seq, 0, 0, 0, 0, 0, 0)


def _errno_of(raw: bytes) -> int:
    """The errno an NLMSG_ERROR or NLMSG_DONE message carries (0: an ACK, or a clean end)."""
    if len(raw) < 20:
        return 0
    (code,) = struct.unpack_from("=i", raw, 16)
    return -code if code < 0 else 0


class _Dumper:
    def __init__(self, sock: NetlinkSocket, attempts: int, stats: DecodeStats) -> None:
        self.sock = sock
        self.attempts = attempts
        self.stats = stats
        self.seq = 0
        self.marshal = _marshal()

    async def dump(self, what: str, build: Callable[[int], bytes]) -> list[Any]:
        for _ in range(self.attempts):
            self.seq += 1
            messages, interrupted = await self._once(build(self.seq), self.seq)
            if not interrupted:
                return messages
            log.info("rtnetlink: %s dump interrupted, dumping again", what)
        raise DumpInterrupted(f"{what} dump interrupted {self.attempts} times: results may be inconsistent")

    async def _once(self, request: bytes, seq: int) -> tuple[list[Any], bool]:
        try:
            await self.sock.send(request)
        except OSError as exc:
            raise NetlinkError(f"cannot send a netlink dump request: {exc}", exc.errno or 0) from exc
        messages: list[Any] = []
        interrupted = False
        while True:
            try:
                data = await self.sock.recv(RECV_BUFSIZE)
            except OSError as exc:
                raise NetlinkError(f"netlink dump receive failed: {exc}", exc.errno or 0) from exc
            for kind, flags, msg_seq, raw in split_datagram(data, self.stats):
                if msg_seq != seq:
                    continue  # a stale answer to an earlier, abandoned request
                if flags & NLM_F_DUMP_INTR:
                    interrupted = True
                if kind in (NLMSG_ERROR, NLMSG_DONE):
                    code = _errno_of(raw)
                    if code:
                        raise NetlinkError(f"netlink dump failed: {os.strerror(code)}", code)
                    if kind == NLMSG_DONE:
                        return messages, interrupted
                    continue
                messages.extend(decode_messages(raw, self.marshal, self.stats))


async def dump_topology(
    sock_factory: SocketFactory | None = None,
    *,
    sock: NetlinkSocket | None = None,
    attempts: int = DUMP_ATTEMPTS,
    stats: DecodeStats | None = None,
    routes: bool = True,
) -> Topology:
    """Dump links, addresses, routes (all tables) and rules of the socket's namespace.

    With ``routes`` False the routes are not dumped (the result has none): the cheap part,
    for a caller that keeps the routes from events.

    With ``sock`` the caller keeps ownership of it; otherwise a socket from
    ``sock_factory`` (default: a new one here) is opened and closed. Each part
    whose dump is interrupted is dumped again, at most ``attempts`` times, then
    ``DumpInterrupted`` is raised. Kernel errors raise ``NetlinkError``.
    """
    own = sock is None
    want_routes = routes
    s: NetlinkSocket = sock if sock is not None else (sock_factory or open_rtnl_socket)()
    stats = stats if stats is not None else DecodeStats()
    try:
        d = _Dumper(s, attempts, stats)
        unspec = socket.AF_UNSPEC
        messages = await d.dump("link", lambda seq: _request(ifinfmsg, RTM_GETLINK, seq, family=unspec))
        messages += await d.dump("address", lambda seq: _request(ifaddrmsg, RTM_GETADDR, seq, family=unspec))
        route_messages: list[Any] = []
        if want_routes:
            route_messages = await d.dump(
                "route", lambda seq: _request(rtmsg, RTM_GETROUTE, seq, family=unspec)
            )
        messages += route_messages
        messages += await d.dump("rule", lambda seq: _request(fibmsg, RTM_GETRULE, seq, family=unspec))
        if any(route_needs_nexthop_objects(m) for m in route_messages):
            try:
                messages += await d.dump("nexthop", _nexthop_request)
            except DumpInterrupted:
                raise
            except NetlinkError as exc:
                log.warning("rtnetlink: cannot dump nexthop objects (%s): nhid routes stay hopless", exc)
        return topology_from_messages(messages, stats)
    finally:
        if own:
            s.close()


# --- events ---------------------------------------------------------------------------


class EventKind(enum.StrEnum):
    LINK = "link"
    ADDRESS = "address"
    ROUTE = "route"
    RULE = "rule"
    NEXTHOP = "nexthop"
    NETCONF = "netconf"


class EventAction(enum.StrEnum):
    NEW = "new"
    DEL = "del"


EventValue: TypeAlias = Link | Address | Route | PolicyRule | NexthopObject


@dataclass(frozen=True, slots=True)
class RtnlEvent:
    """One change the kernel announced, with the value it concerns and one line for people."""

    kind: EventKind
    action: EventAction
    description: str
    value: EventValue | None = None
    flags: int = 0  # the message's nlmsg_flags (NLM_F_REPLACE, NLM_F_APPEND of the request)
    nexthop_object: bool = False  # a route that names a nexthop object (RTA_NH_ID)


@dataclass(frozen=True, slots=True)
class Overrun:
    """Events were lost (ENOBUFS): the consumer must rebuild its topology from a full dump."""

    description: str = "rtnetlink event overrun: events were lost, resync by a full dump"


Event: TypeAlias = RtnlEvent | Overrun


_EVENT_TYPES: dict[int, tuple[EventKind, EventAction]] = {
    RTM_NEWLINK: (EventKind.LINK, EventAction.NEW),
    RTM_DELLINK: (EventKind.LINK, EventAction.DEL),
    RTM_NEWADDR: (EventKind.ADDRESS, EventAction.NEW),
    RTM_DELADDR: (EventKind.ADDRESS, EventAction.DEL),
    RTM_NEWROUTE: (EventKind.ROUTE, EventAction.NEW),
    RTM_DELROUTE: (EventKind.ROUTE, EventAction.DEL),
    RTM_NEWRULE: (EventKind.RULE, EventAction.NEW),
    RTM_DELRULE: (EventKind.RULE, EventAction.DEL),
    RTM_NEWNEXTHOP: (EventKind.NEXTHOP, EventAction.NEW),
    RTM_DELNEXTHOP: (EventKind.NEXTHOP, EventAction.DEL),
}


def describe(kind: EventKind, action: EventAction, value: EventValue, names: Mapping[int, str]) -> str:
    """One line, in `ip monitor` words: "route added: default via 10.0.2.1 dev up1"."""
    verb = {
        EventAction.NEW: "added" if kind != EventKind.LINK else "changed",
        EventAction.DEL: "removed",
    }[action]
    if isinstance(value, Link):
        state = "up" if value.up and value.running else "down"
        text = f"{value.name} ({state})"
    elif isinstance(value, Address):
        dev = names.get(value.ifindex, f"if{value.ifindex}")
        text = f"{value.address}/{value.prefixlen} dev {dev}"
    elif isinstance(value, Route):
        text = value.describe(dict(names))
    elif isinstance(value, PolicyRule):
        text = ("-6 " if value.family == AF_INET6 else "") + value.describe()
    else:
        text = value.describe(names)
    return f"{kind} {verb}: {text}"


def event_from_msg(msg: Any, names: Mapping[int, str] | None = None) -> RtnlEvent | None:
    """A multicast message as an event; None for messages that are not topology (cloned routes,
    bridge-port link messages, other families). Raises UndecodableMessage for garbage."""
    kind_action = _EVENT_TYPES.get(_msg_type(msg))
    if kind_action is None:
        return None
    kind, action = kind_action
    value: EventValue | None
    if kind == EventKind.LINK:
        value = link_from_msg(msg)
    elif kind == EventKind.ADDRESS:
        value = address_from_msg(msg)
    elif kind == EventKind.ROUTE:
        value = route_from_msg(msg)
    elif kind == EventKind.RULE:
        value = rule_from_msg(msg)
    else:
        value = nexthop_object_from_msg(msg)
    if value is None:
        return None
    header = msg.get("header") if hasattr(msg, "get") else None
    flags = int(header.get("flags", 0)) if isinstance(header, dict) else 0
    nexthop_object = kind == EventKind.ROUTE and route_nexthop_id(msg) is not None
    return RtnlEvent(kind, action, describe(kind, action, value, names or {}), value, flags, nexthop_object)


def netconf_event(raw: bytes, names: Mapping[int, str] | None = None) -> RtnlEvent | None:
    """An IPv4 ``RTM_NEWNETCONF`` that carries ``rp_filter`` as an event; None for anything else.

    pyroute2 has no netconf message class: the message (``struct netconfmsg``,
    one family byte and padding, then attributes) is read here. Only
    rp_filter is modelled (``src_valid_mark`` changes are not announced by
    the kernel; the next snapshot reads them).
    """
    if len(raw) < 20:
        return None
    kind = struct.unpack_from("=H", raw, 4)[0]
    if kind not in (RTM_NEWNETCONF, RTM_DELNETCONF) or raw[16] != socket.AF_INET:
        return None
    ifindex: int | None = None
    rp_filter: int | None = None
    offset = 20
    while offset + 4 <= len(raw):
        length, nla_type = struct.unpack_from("=HH", raw, offset)
        if length < 4 or offset + length > len(raw):
            break
        if length >= 8 and nla_type & 0x3FFF == NETCONFA_IFINDEX:
            ifindex = struct.unpack_from("=i", raw, offset + 4)[0]
        elif length >= 8 and nla_type & 0x3FFF == NETCONFA_RP_FILTER:
            rp_filter = struct.unpack_from("=i", raw, offset + 4)[0]
        offset += (length + 3) & ~3
    if rp_filter is None or ifindex is None:
        return None
    name = {NETCONFA_IFINDEX_ALL: "all", NETCONFA_IFINDEX_DEFAULT: "default"}.get(ifindex) or (
        (names or {}).get(ifindex, f"if{ifindex}")
    )
    action = EventAction.NEW if kind == RTM_NEWNETCONF else EventAction.DEL
    return RtnlEvent(EventKind.NETCONF, action, f"netconf changed: rp_filter of {name} is {rp_filter}")


def _drain(sock: NetlinkSocket) -> int:
    """Discard every datagram queued on ``sock`` without blocking; return how many.

    After an overrun the kernel marks the socket congested and silently drops
    every later notification (no second ENOBUFS) until the receive queue has
    been read empty. Left alone, a change made between the overrun and the
    end of the backlog would be lost without a trace, and the consumer's
    resync dump might predate it. The backlog is stale anyway (the consumer
    dumps again), so it is thrown away at once: from here on each change is
    either delivered or reported by another overrun.
    """
    fileno = getattr(sock, "fileno", None)
    if fileno is None or fileno() < 0:
        return 0  # not a kernel socket (a test double): nothing is queued in the kernel
    raw = socket.socket(fileno=fileno())
    count = 0
    try:
        while True:
            raw.recv(RECV_BUFSIZE, socket.MSG_DONTWAIT)
            count += 1
    except BlockingIOError:
        pass
    except OSError as exc:
        if exc.errno != errno.ENOBUFS:
            raise NetlinkError(f"cannot drain the rtnetlink socket: {exc}", exc.errno or 0) from exc
    finally:
        raw.detach()  # the fd stays the caller's
    return count


async def subscribe(
    sock: NetlinkSocket,
    groups: Sequence[int],
    *,
    rcvbuf: int | None,
    what: str,
    optional: Callable[[int, OSError], bool] | None = None,
) -> None:
    """Bind ``sock`` and join ``groups``: the part every event stream (rtnetlink, xfrm, nftables) shares.

    An unbound netlink socket joins groups but is delivered nothing, so it is
    bound (EINVAL: bound already). ``rcvbuf`` (bytes, None to leave it) is
    forced with SO_RCVBUFFORCE where we may, else asked with SO_RCVBUF. A
    group ``optional(group, error)`` accepts is skipped; any other failure is
    a ``NetlinkError`` naming ``what``.
    """
    try:
        await sock.bind((0, 0))
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise NetlinkError(f"cannot bind the {what} socket: {exc}", exc.errno or 0) from exc
    if rcvbuf is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    for group in groups:
        try:
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
        except OSError as exc:
            if optional is not None and optional(group, exc):
                continue
            raise NetlinkError(f"cannot join {what} group {group}: {exc}", exc.errno or 0) from exc


async def receive(sock: NetlinkSocket, what: str) -> bytes | None:
    """One datagram of events, or None after an overrun (ENOBUFS): events were lost.

    On an overrun the stale backlog is drained at once (see ``_drain``) and
    said so; the caller reports the overrun so its consumer resyncs.
    """
    try:
        data: bytes = await sock.recv(RECV_BUFSIZE)
    except OSError as exc:
        if exc.errno != errno.ENOBUFS:
            raise NetlinkError(f"{what} event receive failed: {exc}", exc.errno or 0) from exc
        discarded = _drain(sock)
        log.warning("%s: event overrun (ENOBUFS), %d stale datagrams discarded; resync needed",
                    what, discarded)
        return None
    return data


E = TypeVar("E")


class EventStream(Generic[E]):
    """The shell of a netlink event stream: ``async with Stream() as events: async for e in events``.

    Entering subscribes a socket (the one given, kept by the caller, or one
    from the factory, closed on exit) to ``groups``; ``__anext__`` returns
    what ``_feed`` queued from each datagram, and the stream's overrun event
    (``_overrun``; counted in ``stats.overruns``, the stale queue dropped)
    when the kernel lost events. ``E`` is the stream's whole event type.
    """

    what = "netlink"  # for logs and errors
    default_groups: tuple[int, ...] = ()

    def __init__(
        self,
        sock: NetlinkSocket | None = None,
        *,
        sock_factory: SocketFactory | None = None,
        groups: Sequence[int] | None = None,
        rcvbuf: int | None = EVENT_RCVBUF,
    ) -> None:
        self._given = sock
        self._factory = sock_factory or self._open
        self._groups = tuple(groups if groups is not None else self.default_groups)
        self._rcvbuf = rcvbuf
        self._sock: NetlinkSocket | None = None
        self._pending: deque[E] = deque()
        self.stats = DecodeStats()

    def _open(self) -> NetlinkSocket:
        """A socket of the stream's protocol in the current namespace (without ``sock``/``sock_factory``)."""
        raise NotImplementedError

    def _overrun(self) -> E:
        raise NotImplementedError

    def _optional(self, group: int, exc: OSError) -> bool:
        """Whether failing to join ``group`` may be ignored (a kernel without it)."""
        return False

    def _feed(self, data: bytes) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        sock = self._given if self._given is not None else self._factory()
        try:
            await subscribe(sock, self._groups, rcvbuf=self._rcvbuf, what=self.what, optional=self._optional)
        except BaseException:
            if self._given is None:
                sock.close()
            raise
        self._sock = sock
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._sock is not None and self._given is None:
            self._sock.close()
        self._sock = None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> E:
        if self._sock is None:
            raise RuntimeError(f"{type(self).__name__} used outside its 'async with' block")
        while not self._pending:
            data = await receive(self._sock, self.what)
            if data is None:
                self.stats.overruns += 1
                self._pending.clear()
                return self._overrun()
            self._feed(data)
        return self._pending.popleft()


class RtnlEvents(EventStream[Event]):
    """rtnetlink change events as an async iterator; use as ``async with RtnlEvents() as events``.

    Joins the link, IPv4/IPv6 address, route and rule groups (and nexthop
    objects). With ``sock`` the caller keeps ownership; ``rcvbuf`` (bytes,
    None to leave the socket alone) is forced with SO_RCVBUFFORCE where we
    may, else asked with SO_RCVBUF. Overruns yield ``Overrun`` and the stream
    goes on; undecodable messages are logged, counted in ``stats``, skipped.
    """

    what = "rtnetlink"
    default_groups = DEFAULT_GROUPS

    def __init__(
        self,
        sock: NetlinkSocket | None = None,
        *,
        sock_factory: SocketFactory | None = None,
        groups: Sequence[int] | None = None,
        rcvbuf: int | None = EVENT_RCVBUF,
        names: Mapping[int, str] | None = None,
    ) -> None:
        super().__init__(sock, sock_factory=sock_factory, groups=groups, rcvbuf=rcvbuf)
        self._marshal = _marshal()
        self.names: dict[int, str] = dict(names or {})

    def _open(self) -> NetlinkSocket:
        return open_rtnl_socket()

    def _overrun(self) -> Event:
        return Overrun()

    def _optional(self, group: int, exc: OSError) -> bool:
        if group == RTNLGRP_NEXTHOP and exc.errno == errno.EINVAL:
            log.info("rtnetlink: kernel has no nexthop group; not following nexthop objects")
            return True
        return False

    def _feed(self, data: bytes) -> None:
        # Netconf messages are read here (pyroute2 cannot); the rest goes to the marshal.
        parts = list(split_datagram(bytes(data)))
        if any(kind in (RTM_NEWNETCONF, RTM_DELNETCONF) for kind, _, _, _ in parts):
            for kind, _, _, raw in parts:
                if kind in (RTM_NEWNETCONF, RTM_DELNETCONF):
                    self.stats.messages += 1
                    netconf = netconf_event(raw, self.names)
                    if netconf is None:
                        self.stats.ignored += 1
                    else:
                        self._pending.append(netconf)
            data = b"".join(raw + bytes(-len(raw) % 4) for kind, _, _, raw in parts
                            if kind not in (RTM_NEWNETCONF, RTM_DELNETCONF))
        for msg in decode_messages(data, self._marshal, self.stats):
            self.stats.messages += 1
            try:
                event = event_from_msg(msg, self.names)
            except UndecodableMessage as exc:
                self.stats.undecodable += 1
                log.warning("rtnetlink: skipped an event: %s", exc)
                continue
            except Exception as exc:  # a codec bug must not end the stream
                self.stats.undecodable += 1
                log.warning("rtnetlink: skipped an event (%r)", exc)
                continue
            if event is None:
                self.stats.ignored += 1
                continue
            if isinstance(event.value, Link):
                if event.action == EventAction.NEW:
                    self.names[event.value.index] = event.value.name
                else:
                    self.names.pop(event.value.index, None)
            self._pending.append(event)


# --- the narrow interface the reactor uses -----------------------------------------


class RtnlSource(Protocol):
    """What the reactor needs from rtnetlink; ``KernelRtnl`` and ``rtnl_fake.FakeRtnl`` provide it."""

    async def dump(self, routes: bool = True) -> Topology: ...

    def events(self) -> AbstractAsyncContextManager[AsyncIterator[Event]]: ...


class KernelRtnl:
    """The real rtnetlink source, in the namespace where ``sock_factory``'s sockets are made."""

    def __init__(self, sock_factory: SocketFactory | None = None) -> None:
        self._factory = sock_factory

    async def dump(self, routes: bool = True) -> Topology:
        return await dump_topology(self._factory, routes=routes)

    def events(self) -> AbstractAsyncContextManager[AsyncIterator[Event]]:
        return RtnlEvents(sock_factory=self._factory)
