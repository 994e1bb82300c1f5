# SPDX-License-Identifier: GPL-2.0-or-later
"""The XFRM edge: dump IPsec policies and SAs into ``core.xfrm`` values; stream their changes.

Theory of operation: as ``edges.rtnl`` does, requests and events run on a
plain ``NETLINK_XFRM`` socket wrapped by ``trio.socket``. pyroute2 has no
XFRM classes, so this module declares the kernel's structs
(``linux/xfrm.h``) on pyroute2's ``nlmsg``/``nla`` base classes: policy and
SA infos, their ids (the headers of delete messages), expire messages,
flushes, and the attributes topowatch reads (templates, mark, if_id, policy
type). Pure functions turn each decoded message into a core value, so they
are tested against synthesised and recorded messages without a kernel.

What this module decides:
- which messages change the topology: new/update/delete of a policy or an
  SA, a flush, and a *hard* expire (the kernel deletes the object then and
  sends no delete message). A soft expire (rekey due) changes nothing and
  is reported without a trigger;
- how a delete names its object: the id header when that is all there is,
  the full info in XFRMA_POLICY / XFRMA_SA when the kernel adds it.

What it must never do:
- crash on a message: a malformed one (or a truncated tail) raises
  ``UndecodableMessage`` from the codec and converters and is skipped
  (logged, counted) by the event stream; only that error is caught, so a
  bug in the codec is not mistaken for bad input;
- stop yielding events: ENOBUFS becomes an overrun ``Trigger`` after the
  stale backlog is drained (``rtnl._drain``: a congested socket drops every
  later notification silently until it is read empty), and the stream goes on;
- use an interrupted dump (NLM_F_DUMP_INTR): dump again, then ``DumpInterrupted``;
- enter another network namespace, or change any xfrm object.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import socket
import struct
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_network
from typing import Any, TypeAlias

import trio
from pyroute2.netlink import nla, nlmsg

from topowatch.core.model import AF_INET, AF_INET6, IPAddress
from topowatch.core.xfrm import (
    AF_UNSPEC,
    Action,
    Direction,
    Mode,
    PolicyType,
    XfrmPolicy,
    XfrmSelector,
    XfrmState,
    XfrmTemplate,
)
from topowatch.edges import rtnl
from topowatch.edges.rtnl import (
    DUMP_ATTEMPTS,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    DecodeStats,
    NetlinkSocket,
    SocketFactory,
    UndecodableMessage,
    split_datagram,
)
from topowatch.sources import Trigger

log = logging.getLogger(__name__)

NETLINK_XFRM = 6

# XFRM_MSG_* (linux/xfrm.h)
XFRM_MSG_NEWSA = 0x10
XFRM_MSG_DELSA = 0x11
XFRM_MSG_GETSA = 0x12
XFRM_MSG_NEWPOLICY = 0x13
XFRM_MSG_DELPOLICY = 0x14
XFRM_MSG_GETPOLICY = 0x15
XFRM_MSG_ACQUIRE = 0x17
XFRM_MSG_EXPIRE = 0x18
XFRM_MSG_UPDPOLICY = 0x19
XFRM_MSG_UPDSA = 0x1A
XFRM_MSG_POLEXPIRE = 0x1B
XFRM_MSG_FLUSHSA = 0x1C
XFRM_MSG_FLUSHPOLICY = 0x1D

# XFRMNLGRP_* multicast groups.
XFRMNLGRP_ACQUIRE = 1
XFRMNLGRP_EXPIRE = 2
XFRMNLGRP_SA = 3
XFRMNLGRP_POLICY = 4
DEFAULT_GROUPS: tuple[int, ...] = (XFRMNLGRP_POLICY, XFRMNLGRP_SA, XFRMNLGRP_EXPIRE)
# The policy trigger kind of every xfrm change (rules.d ``triggers = ["xfrm"]``).
TRIGGER_KIND = "xfrm"

# XFRMA_* attributes this edge reads.
XFRMA_TMPL = 5
XFRMA_SA = 6
XFRMA_POLICY = 7
XFRMA_POLICY_TYPE = 16
XFRMA_MARK = 21
XFRMA_IF_ID = 31

TMPL_SIZE = 64  # struct xfrm_user_tmpl
_TMPL = struct.Struct("=16sIB3xH2x16sIBBBxIII")
assert _TMPL.size == TMPL_SIZE

# --- the kernel's structs, on pyroute2's base classes ------------------------------------

# struct xfrm_selector (56 bytes): ports are big-endian on the wire.
_SELECTOR = (
    ("sel_daddr", "16s"),
    ("sel_saddr", "16s"),
    ("sel_dport", ">H"),
    ("sel_dport_mask", ">H"),
    ("sel_sport", ">H"),
    ("sel_sport_mask", ">H"),
    ("sel_family", "H"),
    ("sel_prefixlen_d", "B"),
    ("sel_prefixlen_s", "B"),
    ("sel_proto", "B"),
    ("__sel_pad", "3x"),
    ("sel_ifindex", "i"),
    ("sel_user", "I"),
)
# struct xfrm_lifetime_cfg (64) and xfrm_lifetime_cur (32): read, never used.
_LIFETIMES = (
    ("lft", "8Q"),
    ("curlft", "4Q"),
)
# struct xfrm_userpolicy_info (168 bytes).
USERPOLICY_INFO = (
    *_SELECTOR,
    *_LIFETIMES,
    ("priority", "I"),
    ("index", "I"),
    ("dir", "B"),
    ("action", "B"),
    ("flags", "B"),
    ("share", "B"),
    ("__pol_pad", "4x"),
)
# struct xfrm_usersa_info (224 bytes).
USERSA_INFO = (
    *_SELECTOR,
    ("id_daddr", "16s"),
    ("id_spi", ">I"),
    ("id_proto", "B"),
    ("__id_pad", "3x"),
    ("saddr", "16s"),
    *_LIFETIMES,
    ("stats", "3I"),
    ("seq", "I"),
    ("reqid", "I"),
    ("family", "H"),
    ("mode", "B"),
    ("replay_window", "B"),
    ("flags", "B"),
    ("__sa_pad", "7x"),
)
USERPOLICY_ID = (*_SELECTOR, ("index", "I"), ("dir", "B"), ("__id_pad", "3x"))  # 64 bytes
USERSA_ID = (("daddr", "16s"), ("spi", ">I"), ("family", "H"), ("proto", "B"), ("__id_pad", "x"))  # 24


def _size(fields: Sequence[tuple[str, str]]) -> int:
    return sum(struct.calcsize(fmt) for _, fmt in fields)


assert _size(USERPOLICY_INFO) == 168 and _size(USERSA_INFO) == 224
assert _size(USERPOLICY_ID) == 64 and _size(USERSA_ID) == 24


class _xfrm_attrs(nlmsg):  # type: ignore[misc]
    """The XFRMA_* attributes shared by every XFRM message."""

    prefix = "XFRMA_"
    nla_map = (
        (0, "XFRMA_UNSPEC", "none"),
        (1, "XFRMA_ALG_AUTH", "hex"),
        (2, "XFRMA_ALG_CRYPT", "hex"),
        (3, "XFRMA_ALG_COMP", "hex"),
        (4, "XFRMA_ENCAP", "hex"),
        (XFRMA_TMPL, "XFRMA_TMPL", "cdata"),
        (XFRMA_SA, "XFRMA_SA", "usersa_info"),
        (XFRMA_POLICY, "XFRMA_POLICY", "userpolicy_info"),
        (8, "XFRMA_SEC_CTX", "hex"),
        (9, "XFRMA_LTIME_VAL", "hex"),
        (10, "XFRMA_REPLAY_VAL", "hex"),
        (11, "XFRMA_REPLAY_THRESH", "uint32"),
        (12, "XFRMA_ETIMER_THRESH", "uint32"),
        (13, "XFRMA_SRCADDR", "cdata"),
        (14, "XFRMA_COADDR", "cdata"),
        (15, "XFRMA_LASTUSED", "uint64"),
        (XFRMA_POLICY_TYPE, "XFRMA_POLICY_TYPE", "policy_type"),
        (17, "XFRMA_MIGRATE", "hex"),
        (18, "XFRMA_ALG_AEAD", "hex"),
        (19, "XFRMA_KMADDRESS", "hex"),
        (20, "XFRMA_ALG_AUTH_TRUNC", "hex"),
        (XFRMA_MARK, "XFRMA_MARK", "mark"),
        (22, "XFRMA_TFCPAD", "uint32"),
        (23, "XFRMA_REPLAY_ESN_VAL", "hex"),
        (24, "XFRMA_SA_EXTRA_FLAGS", "uint32"),
        (25, "XFRMA_PROTO", "uint8"),
        (26, "XFRMA_ADDRESS_FILTER", "hex"),
        (27, "XFRMA_PAD", "hex"),
        (28, "XFRMA_OFFLOAD_DEV", "hex"),
        (29, "XFRMA_SET_MARK", "uint32"),
        (30, "XFRMA_SET_MARK_MASK", "uint32"),
        (XFRMA_IF_ID, "XFRMA_IF_ID", "uint32"),
    )

    class usersa_info(nla):  # type: ignore[misc]
        fields = USERSA_INFO

    class userpolicy_info(nla):  # type: ignore[misc]
        fields = USERPOLICY_INFO

    class policy_type(nla):  # type: ignore[misc]
        fields = (("type", "B"), ("__reserved", "3x"))

    class mark(nla):  # type: ignore[misc]
        fields = (("v", "I"), ("m", "I"))


class xfrm_userpolicy_info(_xfrm_attrs):
    """XFRM_MSG_NEWPOLICY / UPDPOLICY (and a policy dump)."""

    fields = USERPOLICY_INFO


class xfrm_usersa_info(_xfrm_attrs):
    """XFRM_MSG_NEWSA / UPDSA (and an SA dump)."""

    fields = USERSA_INFO


class xfrm_userpolicy_id(_xfrm_attrs):
    """XFRM_MSG_DELPOLICY: the id, with the full policy in XFRMA_POLICY."""

    fields = USERPOLICY_ID


class xfrm_usersa_id(_xfrm_attrs):
    """XFRM_MSG_DELSA: the id, with the full SA in XFRMA_SA."""

    fields = USERSA_ID


class xfrm_user_expire(_xfrm_attrs):
    """XFRM_MSG_EXPIRE: an SA's lifetime ran out (``hard``: it is gone)."""

    fields = (*USERSA_INFO, ("hard", "B"), ("__exp_pad", "7x"))


class xfrm_user_polexpire(_xfrm_attrs):
    """XFRM_MSG_POLEXPIRE: a policy's lifetime ran out (``hard``: it is gone)."""

    fields = (*USERPOLICY_INFO, ("hard", "B"), ("__exp_pad", "7x"))


class xfrm_usersa_flush(_xfrm_attrs):
    """XFRM_MSG_FLUSHSA: every SA of ``proto`` (0: all) is gone."""

    fields = (("proto", "B"), ("__flush_pad", "3x"))


class xfrm_flush_policy(_xfrm_attrs):
    """XFRM_MSG_FLUSHPOLICY: no header; XFRMA_POLICY_TYPE says which type."""

    fields = ()


MSG_CLASSES: dict[int, type[_xfrm_attrs]] = {
    XFRM_MSG_NEWSA: xfrm_usersa_info,
    XFRM_MSG_UPDSA: xfrm_usersa_info,
    XFRM_MSG_DELSA: xfrm_usersa_id,
    XFRM_MSG_NEWPOLICY: xfrm_userpolicy_info,
    XFRM_MSG_UPDPOLICY: xfrm_userpolicy_info,
    XFRM_MSG_DELPOLICY: xfrm_userpolicy_id,
    XFRM_MSG_EXPIRE: xfrm_user_expire,
    XFRM_MSG_POLEXPIRE: xfrm_user_polexpire,
    XFRM_MSG_FLUSHSA: xfrm_usersa_flush,
    XFRM_MSG_FLUSHPOLICY: xfrm_flush_policy,
}
_MIN_PAYLOAD = {kind: _size(cls.fields) for kind, cls in MSG_CLASSES.items()}


class XfrmMarshal:
    """Decodes one netlink message into its pyroute2 XFRM class (``.parse`` as pyroute2's marshals)."""

    def parse(self, data: bytes) -> list[Any]:
        if len(data) < 16:
            raise UndecodableMessage(f"xfrm: a message of {len(data)} bytes has no header")
        length, kind = struct.unpack_from("=IH", data)
        cls = MSG_CLASSES.get(kind)
        if cls is None:
            return []  # acquire, report, mapping, ...: not topology
        if length - 16 < _MIN_PAYLOAD[kind]:
            raise UndecodableMessage(f"xfrm: message type {kind:#x} too short ({length} bytes)")
        msg = cls(bytes(data))
        with _converting(f"type {kind:#x}"):
            msg.decode()  # pyroute2 keeps attribute errors in the header; the rest it raises
        return [msg]


# --- messages to core values --------------------------------------------------------------


def _address(raw: Any, family: int, what: str) -> IPAddress:
    data = bytes(raw)
    if len(data) != 16:
        raise UndecodableMessage(f"xfrm: {what} is {len(data)} bytes, not 16")
    if family == AF_INET:
        return IPv4Address(data[:4])
    if family == AF_INET6:
        return IPv6Address(data)
    raise UndecodableMessage(f"xfrm: {what} has family {family}")


def _selector(m: Any) -> XfrmSelector:
    family = int(m["sel_family"])
    if family == AF_UNSPEC:
        return XfrmSelector(AF_UNSPEC)
    if family not in (AF_INET, AF_INET6):
        raise UndecodableMessage(f"xfrm: selector family {family}")
    limit = 32 if family == AF_INET else 128
    plen_s, plen_d = int(m["sel_prefixlen_s"]), int(m["sel_prefixlen_d"])
    if plen_s > limit or plen_d > limit:
        raise UndecodableMessage(f"xfrm: selector prefix length /{plen_s} or /{plen_d} too long")
    return XfrmSelector(
        family,
        ip_network((_address(m["sel_saddr"], family, "selector saddr"), plen_s), strict=False),
        ip_network((_address(m["sel_daddr"], family, "selector daddr"), plen_d), strict=False),
        sport=int(m["sel_sport"]),
        sport_mask=int(m["sel_sport_mask"]),
        dport=int(m["sel_dport"]),
        dport_mask=int(m["sel_dport_mask"]),
        proto=int(m["sel_proto"]),
        ifindex=max(int(m["sel_ifindex"]), 0),
    )


def parse_templates(raw: bytes, default_family: int) -> tuple[XfrmTemplate, ...]:
    """XFRMA_TMPL: an array of struct xfrm_user_tmpl (pyroute2 cannot express arrays of structs)."""
    if len(raw) % TMPL_SIZE:
        raise UndecodableMessage(f"xfrm: XFRMA_TMPL of {len(raw)} bytes is not whole templates")
    out = []
    for off in range(0, len(raw), TMPL_SIZE):
        daddr, spi, proto, family, saddr, reqid, mode, share, optional, aalgos, ealgos, calgos = (
            _TMPL.unpack_from(raw, off)
        )
        family = family or default_family
        spi = struct.unpack(">I", struct.pack("=I", spi))[0]
        try:
            mode_value = Mode(mode)
        except ValueError as exc:
            raise UndecodableMessage(f"xfrm: template mode {mode}") from exc
        out.append(
            XfrmTemplate(
                family,
                _address(daddr, family, "template daddr"),
                _address(saddr, family, "template saddr"),
                proto=proto,
                spi=spi,
                reqid=reqid,
                mode=mode_value,
                share=share,
                optional=bool(optional),
                aalgos=aalgos,
                ealgos=ealgos,
                calgos=calgos,
            )
        )
    return tuple(out)


def _mark(msg: Any) -> tuple[int, int]:
    mark = msg.get_attr("XFRMA_MARK")
    if mark is None:
        return 0, 0
    return int(mark["v"]), int(mark["m"])


def _check(msg: Any, what: str) -> None:
    rtnl.check_decoded(msg, f"xfrm: {what}")


def _converting(what: str) -> contextlib.AbstractContextManager[None]:
    return rtnl.converting(f"xfrm: {what}")


def policy_from_msg(msg: Any, info: Any = None) -> XfrmPolicy:
    """A policy from its info (the message itself, or ``info``: the XFRMA_POLICY of a delete)."""
    with _converting("policy"):
        _check(msg, "policy")
        m = info if info is not None else msg
        selector = _selector(m)
        if selector.family == AF_UNSPEC:
            raise UndecodableMessage("xfrm: policy selector has no family")
        raw = msg.get_attr("XFRMA_TMPL")
        templates = parse_templates(bytes(raw), selector.family) if raw is not None else ()
        ptype = msg.get_attr("XFRMA_POLICY_TYPE")
        mark, mask = _mark(msg)
        return XfrmPolicy(
            selector,
            Direction(int(m["dir"])),
            priority=int(m["priority"]),
            index=int(m["index"]),
            action=Action(int(m["action"])),
            templates=templates,
            mark=mark,
            mark_mask=mask,
            if_id=int(msg.get_attr("XFRMA_IF_ID") or 0),
            type=PolicyType(int(ptype["type"])) if ptype is not None else PolicyType.MAIN,
            flags=int(m["flags"]),
        )


def state_from_msg(msg: Any, info: Any = None) -> XfrmState:
    """An SA from its info (the message itself, or ``info``: the XFRMA_SA of a delete)."""
    with _converting("SA"):
        _check(msg, "SA")
        m = info if info is not None else msg
        family = int(m["family"])
        mark, mask = _mark(msg)
        return XfrmState(
            family,
            _address(m["id_daddr"], family, "SA daddr"),
            _address(m["saddr"], family, "SA saddr"),
            proto=int(m["id_proto"]),
            spi=int(m["id_spi"]),
            reqid=int(m["reqid"]),
            mode=Mode(int(m["mode"])),
            selector=_selector(m),
            mark=mark,
            mark_mask=mask,
            if_id=int(msg.get_attr("XFRMA_IF_ID") or 0),
        )


# --- events --------------------------------------------------------------------------------


class EventKind(enum.StrEnum):
    POLICY = "policy"
    SA = "SA"


class EventAction(enum.StrEnum):
    NEW = "added"
    UPDATE = "updated"
    DELETE = "removed"
    FLUSH = "flushed"
    EXPIRE = "expired"


@dataclass(frozen=True, slots=True)
class XfrmEvent:
    """One change the kernel announced. ``changes`` is False for a soft expire (a rekey warning)."""

    kind: EventKind
    action: EventAction
    description: str
    value: XfrmPolicy | XfrmState | None = None
    changes: bool = True


@dataclass(frozen=True, slots=True)
class Overrun:
    description: str = "xfrm event overrun: events were lost, resync by a full dump"


Event: TypeAlias = XfrmEvent | Overrun


def _kind_type(msg: Any) -> int:
    return int(msg["header"]["type"])


def event_from_msg(msg: Any) -> XfrmEvent | None:
    """A multicast message as an event; None for messages that are not topology."""
    kind = _kind_type(msg)
    if kind in (XFRM_MSG_NEWPOLICY, XFRM_MSG_UPDPOLICY):
        pol = policy_from_msg(msg)
        action = EventAction.NEW if kind == XFRM_MSG_NEWPOLICY else EventAction.UPDATE
        return XfrmEvent(EventKind.POLICY, action, f"xfrm policy {action}: {pol.describe()}", pol)
    if kind == XFRM_MSG_DELPOLICY:
        with _converting("policy delete"):
            info = msg.get_attr("XFRMA_POLICY")
        if info is not None:
            pol = policy_from_msg(msg, info)
            text = f"xfrm policy removed: {pol.describe()}"
            return XfrmEvent(EventKind.POLICY, EventAction.DELETE, text, pol)
        with _converting("policy delete"):
            text = f"dir {Direction(int(msg['dir'])).name.lower()} index {int(msg['index'])}"
        return XfrmEvent(EventKind.POLICY, EventAction.DELETE, f"xfrm policy removed: {text}")
    if kind in (XFRM_MSG_NEWSA, XFRM_MSG_UPDSA):
        st = state_from_msg(msg)
        action = EventAction.NEW if kind == XFRM_MSG_NEWSA else EventAction.UPDATE
        return XfrmEvent(EventKind.SA, action, f"xfrm SA {action}: {st.describe()}", st)
    if kind == XFRM_MSG_DELSA:
        with _converting("SA delete"):
            info = msg.get_attr("XFRMA_SA")
        if info is not None:
            st = state_from_msg(msg, info)
            return XfrmEvent(EventKind.SA, EventAction.DELETE, f"xfrm SA removed: {st.describe()}", st)
        with _converting("SA delete"):
            family = int(msg["family"])
            text = f"spi {int(msg['spi']):#x} dst {_address(msg['daddr'], family, 'SA daddr')}"
        return XfrmEvent(EventKind.SA, EventAction.DELETE, f"xfrm SA removed: {text}")
    if kind == XFRM_MSG_EXPIRE:
        st = state_from_msg(msg)
        hard = bool(msg["hard"])
        how = "hard, removed" if hard else "soft, rekey due"
        text = f"xfrm SA expired ({how}): {st.describe()}"
        return XfrmEvent(EventKind.SA, EventAction.EXPIRE, text, st, hard)
    if kind == XFRM_MSG_POLEXPIRE:
        pol = policy_from_msg(msg)
        hard = bool(msg["hard"])
        how = "hard, removed" if hard else "soft"
        text = f"xfrm policy expired ({how}): {pol.describe()}"
        return XfrmEvent(EventKind.POLICY, EventAction.EXPIRE, text, pol, hard)
    if kind == XFRM_MSG_FLUSHSA:
        with _converting("SA flush"):
            proto = int(msg["proto"])
        which = f" (proto {proto})" if proto else ""
        return XfrmEvent(EventKind.SA, EventAction.FLUSH, f"xfrm SAs flushed{which}")
    if kind == XFRM_MSG_FLUSHPOLICY:
        return XfrmEvent(EventKind.POLICY, EventAction.FLUSH, "xfrm policies flushed")
    return None


def decode_messages(data: bytes, stats: DecodeStats | None = None) -> list[Any]:
    """Decode one or more XFRM messages; one that cannot be parsed is left out (counted).

    Only ``UndecodableMessage`` (bad input) is caught: a bug in the codec raises. A tail too short
    to hold a netlink header (a truncated message) is counted too.
    """
    marshal = XfrmMarshal()
    out: list[Any] = []
    data = bytes(data)
    consumed = 0
    for _, _, _, raw in split_datagram(data, stats):
        consumed += (len(raw) + 3) & ~3
        try:
            out.extend(marshal.parse(raw))
        except UndecodableMessage as exc:
            log.warning("xfrm: cannot parse a message of %d bytes: %s", len(raw), exc)
            if stats is not None:
                stats.undecodable += 1
    tail = len(data) - consumed
    if 0 < tail < 16:  # split_datagram counts a bad length only where a whole header is there
        log.warning("xfrm: %d bytes after the last message are no message", tail)
        if stats is not None:
            stats.undecodable += 1
    return out


def events_from_data(data: bytes, stats: DecodeStats | None = None) -> list[XfrmEvent]:
    """Every event in a datagram; undecodable messages are skipped and counted, never raised."""
    stats = stats if stats is not None else DecodeStats()
    out: list[XfrmEvent] = []
    for msg in decode_messages(data, stats):
        stats.messages += 1
        try:
            event = event_from_msg(msg)
        except UndecodableMessage as exc:  # bad input; a bug in a converter raises
            stats.undecodable += 1
            log.warning("xfrm: skipped an event: %s", exc)
            continue
        if event is None:
            stats.ignored += 1
        else:
            out.append(event)
    return out


# --- dumps ---------------------------------------------------------------------------------


def open_xfrm_socket() -> trio.socket.SocketType:
    """A NETLINK_XFRM socket in the calling thread's network namespace."""
    return trio.socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_XFRM)


def dump_request(msg_type: int, seq: int) -> bytes:
    """A GETPOLICY / GETSA dump request: a bare header (the kernel reads no payload for a dump)."""
    return struct.pack("=IHHII", 16, msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)


async def dump_xfrm(
    sock_factory: SocketFactory | None = None,
    *,
    sock: NetlinkSocket | None = None,
    attempts: int = DUMP_ATTEMPTS,
    stats: DecodeStats | None = None,
) -> tuple[tuple[XfrmPolicy, ...], tuple[XfrmState, ...]]:
    """Dump every policy and SA of the socket's namespace, in the kernel's dump order.

    A policy or SA that does not decode is logged, counted and left out.
    """
    own = sock is None
    s: NetlinkSocket = sock if sock is not None else (sock_factory or open_xfrm_socket)()
    stats = stats if stats is not None else DecodeStats()
    try:
        dumper = rtnl._Dumper(s, attempts, stats)
        dumper.marshal = XfrmMarshal()
        policies: list[XfrmPolicy] = []
        states: list[XfrmState] = []
        for msg in await dumper.dump("xfrm policy", lambda seq: dump_request(XFRM_MSG_GETPOLICY, seq)):
            try:
                policies.append(policy_from_msg(msg))
            except UndecodableMessage as exc:
                stats.undecodable += 1
                log.warning("xfrm: skipped a policy: %s", exc)
        for msg in await dumper.dump("xfrm SA", lambda seq: dump_request(XFRM_MSG_GETSA, seq)):
            try:
                states.append(state_from_msg(msg))
            except UndecodableMessage as exc:
                stats.undecodable += 1
                log.warning("xfrm: skipped an SA: %s", exc)
        return tuple(policies), tuple(states)
    finally:
        if own:
            s.close()


# --- the event source -----------------------------------------------------------------------


class XfrmEvents(rtnl.EventStream[Event]):
    """XFRM change events as an async iterator; ``async with XfrmEvents() as events``.

    Joins the policy, SA and expire groups. Overruns yield ``Overrun`` (after
    draining the stale backlog) and the stream goes on.
    """

    what = "xfrm"
    default_groups = DEFAULT_GROUPS

    def _open(self) -> NetlinkSocket:
        return open_xfrm_socket()

    def _overrun(self) -> Event:
        return Overrun()

    def _feed(self, data: bytes) -> None:
        self._pending.extend(events_from_data(data, self.stats))


class XfrmSource:
    """The reactor's xfrm event source (``name`` "xfrm"): changes and overruns as ``Trigger`` values."""

    name = "xfrm"

    def __init__(self, sock_factory: SocketFactory | None = None) -> None:
        self._factory = sock_factory

    @contextlib.asynccontextmanager
    async def events(self) -> AsyncIterator[AsyncIterator[Trigger]]:
        async with XfrmEvents(sock_factory=self._factory) as stream:

            async def triggers() -> AsyncIterator[Trigger]:
                async for event in stream:
                    if isinstance(event, Overrun):
                        yield Trigger(self.name, event.description, overrun=True, kind=TRIGGER_KIND)
                    elif event.changes:
                        yield Trigger(self.name, event.description, kind=TRIGGER_KIND)
                    else:
                        log.info("%s", event.description)

            yield triggers()

    async def dump_xfrm(self) -> tuple[tuple[XfrmPolicy, ...], tuple[XfrmState, ...]]:
        return await dump_xfrm(self._factory)


def probe(sock_factory: SocketFactory | None = None) -> OSError | None:
    """None if a NETLINK_XFRM socket can be opened here, else the error (no xfrm in this kernel)."""
    try:
        sock = (sock_factory or open_xfrm_socket)()
    except OSError as exc:
        return exc
    sock.close()
    return None


# --- encoding (requests in tests, synthesised messages) ------------------------------------


def _addr_bytes(addr: IPAddress | None) -> bytes:
    if addr is None:
        return bytes(16)
    return addr.packed.ljust(16, b"\0")


def _selector_fields(sel: XfrmSelector) -> dict[str, Any]:
    if sel.family == AF_UNSPEC or sel.src is None or sel.dst is None:
        return {"sel_daddr": bytes(16), "sel_saddr": bytes(16), "sel_family": 0}
    return {
        "sel_daddr": _addr_bytes(sel.dst.network_address),
        "sel_saddr": _addr_bytes(sel.src.network_address),
        "sel_dport": sel.dport,
        "sel_dport_mask": sel.dport_mask,
        "sel_sport": sel.sport,
        "sel_sport_mask": sel.sport_mask,
        "sel_family": sel.family,
        "sel_prefixlen_d": sel.dst.prefixlen,
        "sel_prefixlen_s": sel.src.prefixlen,
        "sel_proto": sel.proto,
        "sel_ifindex": sel.ifindex,
    }


def template_bytes(templates: Sequence[XfrmTemplate]) -> bytes:
    return b"".join(
        _TMPL.pack(
            _addr_bytes(t.daddr), struct.unpack("=I", struct.pack(">I", t.spi))[0], t.proto, t.family,
            _addr_bytes(t.saddr), t.reqid, int(t.mode), t.share, int(t.optional),
            t.aalgos, t.ealgos, t.calgos,
        )
        for t in templates
    )


def _policy_fields(pol: XfrmPolicy) -> dict[str, Any]:
    return {
        **_selector_fields(pol.selector),
        "lft": (0,) * 8,
        "curlft": (0,) * 4,
        "priority": pol.priority,
        "index": pol.index,
        "dir": int(pol.direction),
        "action": int(pol.action),
        "flags": pol.flags,
    }


def _state_fields(st: XfrmState) -> dict[str, Any]:
    return {
        **_selector_fields(st.selector),
        "id_daddr": _addr_bytes(st.daddr),
        "id_spi": st.spi,
        "id_proto": st.proto,
        "saddr": _addr_bytes(st.saddr),
        "lft": (0,) * 8,
        "curlft": (0,) * 4,
        "stats": (0, 0, 0),
        "reqid": st.reqid,
        "family": st.family,
        "mode": int(st.mode),
    }


def _policy_attrs(pol: XfrmPolicy) -> list[Any]:
    attrs: list[Any] = []
    if pol.templates:
        attrs.append(["XFRMA_TMPL", template_bytes(pol.templates)])
    attrs.append(["XFRMA_POLICY_TYPE", {"type": int(pol.type)}])
    if pol.mark or pol.mark_mask:
        attrs.append(["XFRMA_MARK", {"v": pol.mark, "m": pol.mark_mask}])
    if pol.if_id:
        attrs.append(["XFRMA_IF_ID", pol.if_id])
    return attrs


def _state_attrs(st: XfrmState) -> list[Any]:
    attrs: list[Any] = []
    if st.mark or st.mark_mask:
        attrs.append(["XFRMA_MARK", {"v": st.mark, "m": st.mark_mask}])
    if st.if_id:
        attrs.append(["XFRMA_IF_ID", st.if_id])
    return attrs


def _encode(cls: type[_xfrm_attrs], msg_type: int, fields: dict[str, Any], attrs: list[Any],
            *, seq: int = 0, flags: int = 0) -> bytes:
    msg = cls()
    for name, fmt in cls.fields:
        if fmt.endswith("s") and name not in fields:
            msg[name] = bytes(struct.calcsize(fmt))  # pyroute2's default 0 does not pack as bytes
    for key, value in fields.items():
        msg[key] = value
    msg["attrs"] = attrs
    msg["header"]["type"] = msg_type
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = seq
    msg.encode()
    return bytes(msg.data)


def encode_policy(pol: XfrmPolicy, msg_type: int = XFRM_MSG_NEWPOLICY, *, hard: bool = True) -> bytes:
    """A NEWPOLICY / UPDPOLICY / DELPOLICY / POLEXPIRE message as the kernel sends it."""
    if msg_type == XFRM_MSG_DELPOLICY:
        fields = {**_selector_fields(pol.selector), "index": pol.index, "dir": int(pol.direction)}
        return _encode(xfrm_userpolicy_id, msg_type, fields,
                       [["XFRMA_POLICY", _policy_fields(pol)], *_policy_attrs(pol)])
    if msg_type == XFRM_MSG_POLEXPIRE:
        return _encode(xfrm_user_polexpire, msg_type, {**_policy_fields(pol), "hard": int(hard)},
                       _policy_attrs(pol))
    return _encode(xfrm_userpolicy_info, msg_type, _policy_fields(pol), _policy_attrs(pol))


def encode_state(st: XfrmState, msg_type: int = XFRM_MSG_NEWSA, *, hard: bool = True) -> bytes:
    """A NEWSA / UPDSA / DELSA / EXPIRE message as the kernel sends it."""
    if msg_type == XFRM_MSG_DELSA:
        fields = {"daddr": _addr_bytes(st.daddr), "spi": st.spi, "family": st.family, "proto": st.proto}
        return _encode(xfrm_usersa_id, msg_type, fields, [["XFRMA_SA", _state_fields(st)], *_state_attrs(st)])
    if msg_type == XFRM_MSG_EXPIRE:
        return _encode(xfrm_user_expire, msg_type, {**_state_fields(st), "hard": int(hard)}, _state_attrs(st))
    return _encode(xfrm_usersa_info, msg_type, _state_fields(st), _state_attrs(st))


def encode_flush(msg_type: int, proto: int = 0) -> bytes:
    if msg_type == XFRM_MSG_FLUSHSA:
        return _encode(xfrm_usersa_flush, msg_type, {"proto": proto}, [])
    return _encode(xfrm_flush_policy, msg_type, {}, [["XFRMA_POLICY_TYPE", {"type": 0}]])
