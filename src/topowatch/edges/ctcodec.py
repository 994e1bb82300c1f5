# SPDX-License-Identifier: GPL-2.0-or-later
"""ctnetlink messages as bytes: a hand-written struct codec, no I/O.

Theory of operation: a conntrack dump is a stream of netlink datagrams, each
holding many ``IPCTNL_MSG_CT_NEW`` messages (``nlmsghdr`` + ``nfgenmsg`` +
attributes). ``DumpParser.feed`` walks one datagram and turns every message
into a ``core.conntrack.Entry``; requests (dump, delete, create) are built by
the ``encode_*`` functions. A dump repeats a few message shapes: each shape
is learned from its first message (decoded by ``decode_entry``, the
reference) and later messages of that shape are read with one ``struct``
call and one comparison of all their attribute headers (see "learned message
layouts"); anything else takes the reference path. Attribute layouts follow
``include/uapi/linux/netfilter/nfnetlink_conntrack.h``; attribute values are
big-endian, attribute headers are host order. With ``DumpParser.sink`` set,
messages read by a learned layout go to the sink as raw records
(``core.decide.RawEntry``) and no object is built for them;
``entry_from_raw`` builds one on demand. ``encode_delete`` packs the common
shapes with one precompiled ``struct`` and equals ``encode_delete_reference``
byte for byte.

This module decides:
- how an entry's tuples, status, zone, mark, id and timeout are read
  (ICMP/ICMPv6 per ``CtTuple``'s convention: ``sport`` is the id,
  ``dport`` is ``type << 8 | code``);
- that a malformed or truncated message is skipped and counted, never raised:
  one bad message must not lose the rest of the dump;
- that a DELETE is never encoded without ``CTA_TUPLE_ORIG``: a DELETE without a
  tuple is a flush of the whole table (with filters that older kernels
  silently ignore). ``encode_message`` refuses it with ``FlushRefused``.

It must never perform I/O, and never guess a value it could not read (an
entry missing a tuple or its status is malformed, not defaulted).
"""

from __future__ import annotations

import os
import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from errno import EBADMSG
from ipaddress import IPv4Address, IPv6Address
from operator import itemgetter
from typing import Any

from topowatch.core.conntrack import ICMP_PROTOS, IPS_CONFIRMED, IPS_SEEN_REPLY, CtTuple, Entry, Reread
from topowatch.core.decide import RawEntry
from topowatch.core.flow import IPPROTO_ICMP, IPPROTO_ICMPV6
from topowatch.core.model import AF_INET, AF_INET6, IPAddress

# The compiled fast path of ``DumpParser.feed`` with a sink (``_ctscan.c``): it reads the
# canonical message shape and settles entries the consumer's precompiled checks call
# healthy; every other message takes the reference decode here, as without it. Optional:
# without a compiler at install time, or with TOPOWATCH_PURE_PYTHON=1, the pure path runs.
_ctscan: Any
try:
    if os.environ.get("TOPOWATCH_PURE_PYTHON"):
        raise ImportError("TOPOWATCH_PURE_PYTHON is set")
    from topowatch.edges import _ctscan
except ImportError as exc:
    _ctscan = None
    FAST_PATH: str = f"pure Python ({exc})"
else:
    FAST_PATH = "compiled"

# --- netlink (include/uapi/linux/netlink.h) ---------------------------------
NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4

NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400

NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

# --- nfnetlink / ctnetlink --------------------------------------------------
NFNL_SUBSYS_CTNETLINK = 1
NFNETLINK_V0 = 0
IPCTNL_MSG_CT_NEW = NFNL_SUBSYS_CTNETLINK << 8 | 0
IPCTNL_MSG_CT_GET = NFNL_SUBSYS_CTNETLINK << 8 | 1
IPCTNL_MSG_CT_DELETE = NFNL_SUBSYS_CTNETLINK << 8 | 2

CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_STATUS = 3
CTA_PROTOINFO = 4
CTA_TIMEOUT = 7
CTA_MARK = 8
CTA_ID = 12
CTA_ZONE = 18
CTA_PROTOINFO_TCP = 1
CTA_PROTOINFO_TCP_STATE = 1
CTA_MARK_MASK = 21
CTA_STATUS_MASK = 26

CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_TUPLE_ZONE = 3

CTA_IP_V4_SRC = 1
CTA_IP_V4_DST = 2
CTA_IP_V6_SRC = 3
CTA_IP_V6_DST = 4

CTA_PROTO_NUM = 1
CTA_PROTO_SRC_PORT = 2
CTA_PROTO_DST_PORT = 3
CTA_PROTO_ICMP_ID = 4
CTA_PROTO_ICMP_TYPE = 5
CTA_PROTO_ICMP_CODE = 6
CTA_PROTO_ICMPV6_ID = 7
CTA_PROTO_ICMPV6_TYPE = 8
CTA_PROTO_ICMPV6_CODE = 9

_SRC_TYPES = frozenset({CTA_IP_V4_SRC, CTA_IP_V6_SRC})
_DST_TYPES = frozenset({CTA_IP_V4_DST, CTA_IP_V6_DST})
_SPORT_TYPES = frozenset({CTA_PROTO_SRC_PORT, CTA_PROTO_ICMP_ID, CTA_PROTO_ICMPV6_ID})
_ICMP_TYPE_TYPES = frozenset({CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMPV6_TYPE})
_ICMP_CODE_TYPES = frozenset({CTA_PROTO_ICMP_CODE, CTA_PROTO_ICMPV6_CODE})

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (big-endian, always 0 here)
_NLA = struct.Struct("=HH")
_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_ERRNO = struct.Struct("=i")
_HDR_LEN = _NLMSGHDR.size + _NFGENMSG.size  # 20
_SEEN_REPLY = IPS_SEEN_REPLY

# The largest interned-address table kept between dumps; beyond it the cache
# is dropped and refilled (addresses are cheap to rebuild, memory is not).
ADDRESS_CACHE_LIMIT = 1 << 18


class FlushRefused(ValueError):
    """A DELETE without CTA_TUPLE_ORIG was about to be encoded: that is a flush."""


class MalformedMessage(ValueError):
    """One message could not be decoded; a dump skips it and counts it."""


def _align(n: int) -> int:
    return (n + 3) & ~3


# --- encoding ----------------------------------------------------------------


def nla(atype: int, payload: bytes) -> bytes:
    """One attribute: header, payload, padding to 4 bytes."""
    length = 4 + len(payload)
    return _NLA.pack(length, atype) + payload + b"\0" * (_align(length) - length)


def nest(atype: int, *parts: bytes) -> bytes:
    return nla(atype | NLA_F_NESTED, b"".join(parts))


def be16(value: int) -> bytes:
    return _BE16.pack(value)


def be32(value: int) -> bytes:
    return _BE32.pack(value)


def encode_tuple(atype: int, family: int, proto: int, t: CtTuple) -> bytes:
    """CTA_TUPLE_ORIG or CTA_TUPLE_REPLY for one direction of an entry."""
    if family == AF_INET:
        ip = nest(CTA_TUPLE_IP, nla(CTA_IP_V4_SRC, t.src.packed), nla(CTA_IP_V4_DST, t.dst.packed))
    else:
        ip = nest(CTA_TUPLE_IP, nla(CTA_IP_V6_SRC, t.src.packed), nla(CTA_IP_V6_DST, t.dst.packed))
    num = nla(CTA_PROTO_NUM, bytes((proto,)))
    l4: tuple[bytes, ...]
    if proto == IPPROTO_ICMP:
        l4 = (
            nla(CTA_PROTO_ICMP_ID, be16(t.icmp_id)),
            nla(CTA_PROTO_ICMP_TYPE, bytes((t.icmp_type,))),
            nla(CTA_PROTO_ICMP_CODE, bytes((t.icmp_code,))),
        )
    elif proto == IPPROTO_ICMPV6:
        l4 = (
            nla(CTA_PROTO_ICMPV6_ID, be16(t.icmp_id)),
            nla(CTA_PROTO_ICMPV6_TYPE, bytes((t.icmp_type,))),
            nla(CTA_PROTO_ICMPV6_CODE, bytes((t.icmp_code,))),
        )
    else:
        # Every port-carrying tracker (tcp, udp, udplite, sctp, dccp, gre keys)
        # requires both ports; the generic tracker ignores them.
        l4 = (nla(CTA_PROTO_SRC_PORT, be16(t.sport)), nla(CTA_PROTO_DST_PORT, be16(t.dport)))
    return nest(atype, ip, nest(CTA_TUPLE_PROTO, num, *l4))


def encode_message(
    msg_type: int, flags: int, seq: int, family: int, attrs: Sequence[tuple[int, bytes]]
) -> bytes:
    """A complete ctnetlink message. ``attrs`` are (type, encoded attribute) pairs.

    Refuses a DELETE that carries no CTA_TUPLE_ORIG: the kernel would read it
    as a flush request.
    """
    if msg_type == IPCTNL_MSG_CT_DELETE and not any(
        atype == CTA_TUPLE_ORIG and len(raw) > 4 for atype, raw in attrs
    ):
        raise FlushRefused("refusing to encode IPCTNL_MSG_CT_DELETE without CTA_TUPLE_ORIG (a flush)")
    body = b"".join(raw for _, raw in attrs)
    length = _HDR_LEN + len(body)
    return _NLMSGHDR.pack(length, msg_type, flags, seq, 0) + _NFGENMSG.pack(family, NFNETLINK_V0, 0) + body


def encode_dump_request(
    seq: int,
    *,
    family: int = 0,
    status: tuple[int, int] | None = None,
    zone: int | None = None,
    mark: int | None = None,
) -> bytes:
    """A dump request. ``status`` is (value, mask): the kernel keeps entries with
    ``status & mask == value`` (>= 5.15; older kernels ignore it and dump all)."""
    attrs: list[tuple[int, bytes]] = []
    if status is not None:
        value, mask = status
        attrs.append((CTA_STATUS, nla(CTA_STATUS, be32(value))))
        attrs.append((CTA_STATUS_MASK, nla(CTA_STATUS_MASK, be32(mask))))
    if mark is not None:
        attrs.append((CTA_MARK, nla(CTA_MARK, be32(mark))))
        attrs.append((CTA_MARK_MASK, nla(CTA_MARK_MASK, be32(0xFFFFFFFF))))
    if zone is not None:
        attrs.append((CTA_ZONE, nla(CTA_ZONE, be16(zone))))
    return encode_message(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, family, attrs)


def encode_delete_reference(entry: Entry, seq: int, *, ack: bool) -> bytes:
    """``encode_delete`` built attribute by attribute: the reference its fast path must equal."""
    attrs = [(CTA_TUPLE_ORIG, encode_tuple(CTA_TUPLE_ORIG, entry.family, entry.proto, entry.orig))]
    if entry.zone:
        attrs.append((CTA_ZONE, nla(CTA_ZONE, be16(entry.zone))))
    if entry.id:
        attrs.append((CTA_ID, nla(CTA_ID, be32(entry.id))))
    flags = NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
    return encode_message(IPCTNL_MSG_CT_DELETE, flags, seq, entry.family, attrs)


# Fast path of ``encode_delete`` for port-carrying tuples: one ``struct`` per
# (family, zone?, id?) shape, headers as constants, values big-endian (the
# ports are swapped by hand on a little-endian host: the struct is native
# order for the netlink headers). ``encode_delete_reference`` is the
# reference; tests compare both byte for byte.
_SWAP_PORTS = sys.byteorder == "little"


def _delete_struct(family: int, zone: bool, ct_id: bool) -> tuple[struct.Struct, tuple[bytes, ...], int]:
    size = 4 if family == AF_INET else 16
    ip_len = 4 + 2 * (4 + size)
    tuple_len = 4 + ip_len + 28
    fmt = f"=IHHII BBH 4s 4s 4s{size}s 4s{size}s 4s 4sB3x 4sH2x 4sH2x"
    consts = [
        _NLA.pack(tuple_len, CTA_TUPLE_ORIG | NLA_F_NESTED),
        _NLA.pack(ip_len, CTA_TUPLE_IP | NLA_F_NESTED),
        _NLA.pack(4 + size, CTA_IP_V4_SRC if size == 4 else CTA_IP_V6_SRC),
        _NLA.pack(4 + size, CTA_IP_V4_DST if size == 4 else CTA_IP_V6_DST),
        _NLA.pack(28, CTA_TUPLE_PROTO | NLA_F_NESTED),
        _NLA.pack(5, CTA_PROTO_NUM),
        _NLA.pack(6, CTA_PROTO_SRC_PORT),
        _NLA.pack(6, CTA_PROTO_DST_PORT),
    ]
    if zone:
        fmt += " 4sH2x"
        consts.append(_NLA.pack(6, CTA_ZONE))
    if ct_id:
        fmt += " 4sI"
        consts.append(_NLA.pack(8, CTA_ID))
    st = struct.Struct(fmt)
    return st, tuple(consts), st.size


_DELETE_STRUCTS = {
    (family, zone, ct_id): _delete_struct(family, zone, ct_id)
    for family in (AF_INET, AF_INET6)
    for zone in (False, True)
    for ct_id in (False, True)
}


def _be16_native(value: int) -> int:
    return ((value & 0xFF) << 8 | value >> 8) if _SWAP_PORTS else value


def _be32_native(value: int) -> int:
    return int.from_bytes(value.to_bytes(4, "big"), sys.byteorder)


def encode_delete(entry: Entry, seq: int, *, ack: bool) -> bytes:
    """Delete exactly ``entry``: its orig tuple, its zone, and its kernel id.

    The id makes the request miss an entry that was deleted and recreated with
    the same tuple since the dump (the kernel answers ENOENT). An id of 0
    means "unknown" and is not sent. Same bytes as ``encode_delete_reference``.
    """
    proto = entry.proto
    zone = entry.zone
    ct_id = entry.id
    shape = _DELETE_STRUCTS.get((entry.family, bool(zone), bool(ct_id)))
    if shape is None or proto in ICMP_PROTOS or not 0 <= proto <= 0xFF or not 0 <= zone <= 0xFFFF:
        return encode_delete_reference(entry, seq, ack=ack)
    st, c, size = shape
    orig = entry.orig
    sport, dport = orig.sport, orig.dport
    if _SWAP_PORTS:
        sport = (sport & 0xFF) << 8 | sport >> 8
        dport = (dport & 0xFF) << 8 | dport >> 8
    flags = NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
    head = (size, IPCTNL_MSG_CT_DELETE, flags, seq, 0, entry.family, NFNETLINK_V0, 0,
            c[0], c[1], c[2], orig.src.packed, c[3], orig.dst.packed, c[4], c[5], proto,
            c[6], sport, c[7], dport)  # fmt: skip
    if zone and ct_id:
        return st.pack(*head, c[8], _be16_native(zone), c[9], _be32_native(ct_id))
    if zone:
        return st.pack(*head, c[8], _be16_native(zone))
    if ct_id:
        return st.pack(*head, c[8], _be32_native(ct_id))
    return st.pack(*head)


_TYPE_OFFSET = 4  # of nlmsg_type inside nlmsghdr
_U16 = struct.Struct("=H")


def encode_get(entry: Entry, seq: int) -> bytes:
    """Ask for ``entry`` again by orig tuple and zone (``IPCTNL_MSG_CT_GET``, no dump).

    The same attributes as ``encode_delete`` (the kernel's GET ignores
    CTA_ID: the caller compares the answer's id). The answer is one
    IPCTNL_MSG_CT_NEW with this ``seq``, or an NLMSG_ERROR (ENOENT: gone).
    """
    data = bytearray(encode_delete(entry, seq, ack=False))
    _U16.pack_into(data, _TYPE_OFFSET, IPCTNL_MSG_CT_GET)
    return bytes(data)


def _tcp_state(data: bytes, pos: int, end: int) -> int | None:
    """CTA_PROTOINFO_TCP_STATE inside a CTA_PROTOINFO payload [pos, end), or None."""
    while pos + 4 <= end:
        alen, atype = _NLA.unpack_from(data, pos)
        if alen < 4 or pos + alen > end:
            return None
        if atype & NLA_TYPE_MASK == CTA_PROTOINFO_TCP:
            ipos, iend = pos + 4, pos + alen
            while ipos + 4 <= iend:
                ilen, itype = _NLA.unpack_from(data, ipos)
                if ilen < 4 or ipos + ilen > iend:
                    return None
                if itype & NLA_TYPE_MASK == CTA_PROTOINFO_TCP_STATE and ilen >= 5:
                    return data[ipos + 4]
                ipos += _align(ilen)
            return None
        pos += _align(alen)
    return None


def parse_get_answers(data: bytes, n: int | None = None) -> list[tuple[int, int, Reread | None]]:
    """The answers to ``encode_get`` requests in one datagram: (seq, errno, what the kernel says now).

    An entry answer gives errno 0 and a ``Reread`` (status, id, mark,
    timeout, TCP state); an NLMSG_ERROR gives its errno and None (an answer
    without CTA_STATUS or CTA_ID is malformed: errno EBADMSG). Only the
    top-level attributes are read: the tuples are the ones asked for.
    """
    end = len(data) if n is None else n
    pos = 0
    out: list[tuple[int, int, Reread | None]] = []
    unpack_nla = _NLA.unpack_from
    be32 = _BE32.unpack_from
    while pos + 16 <= end:
        mlen, mtype, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, pos)
        if mlen < 16 or pos + mlen > end:
            break
        mend = pos + mlen
        if mtype == NLMSG_ERROR and mlen >= 36:
            err = -_ERRNO.unpack_from(data, pos + 16)[0]
            out.append((_NLMSGHDR.unpack_from(data, pos + 20)[3], err, None))
        elif mtype == IPCTNL_MSG_CT_NEW:
            status = ct_id = -1
            mark = timeout = 0
            tcp_state: int | None = None
            apos = pos + _HDR_LEN
            while apos + 4 <= mend:
                alen, atype = unpack_nla(data, apos)
                if alen < 4 or apos + alen > mend:
                    break
                atype &= NLA_TYPE_MASK
                if alen >= 8:
                    if atype == CTA_STATUS:
                        status = be32(data, apos + 4)[0]
                    elif atype == CTA_ID:
                        ct_id = be32(data, apos + 4)[0]
                    elif atype == CTA_MARK:
                        mark = be32(data, apos + 4)[0]
                    elif atype == CTA_TIMEOUT:
                        timeout = be32(data, apos + 4)[0]
                    elif atype == CTA_PROTOINFO:
                        tcp_state = _tcp_state(data, apos + 4, apos + alen)
                apos += _align(alen)
            if status < 0 or ct_id < 0:
                out.append((mseq, EBADMSG, None))
            else:
                out.append((mseq, 0, Reread(status, ct_id, mark, timeout, tcp_state)))
        pos += _align(mlen)
    return out


def encode_create(entry: Entry, seq: int, *, ack: bool) -> bytes:
    """Create ``entry`` as given (both tuples, so a NAT binding is just a reply tuple).

    The kernel refuses a status without IPS_CONFIRMED (EBUSY), so it is added;
    a zero timeout is refused (EINVAL), so it defaults to 120 s.
    """
    attrs = [
        (CTA_TUPLE_ORIG, encode_tuple(CTA_TUPLE_ORIG, entry.family, entry.proto, entry.orig)),
        (CTA_TUPLE_REPLY, encode_tuple(CTA_TUPLE_REPLY, entry.family, entry.proto, entry.reply)),
        (CTA_STATUS, nla(CTA_STATUS, be32(entry.status | IPS_CONFIRMED))),
        (CTA_TIMEOUT, nla(CTA_TIMEOUT, be32(entry.timeout or 120))),
    ]
    if entry.mark:
        attrs.append((CTA_MARK, nla(CTA_MARK, be32(entry.mark))))
    if entry.zone:
        attrs.append((CTA_ZONE, nla(CTA_ZONE, be16(entry.zone))))
    flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL | (NLM_F_ACK if ack else 0)
    return encode_message(IPCTNL_MSG_CT_NEW, flags, seq, entry.family, attrs)


def batches(messages: Iterable[bytes], max_bytes: int) -> Iterable[list[bytes]]:
    """Group encoded messages into lists whose total size stays under ``max_bytes``."""
    batch: list[bytes] = []
    size = 0
    for msg in messages:
        if batch and size + len(msg) > max_bytes:
            yield batch
            batch, size = [], 0
        batch.append(msg)
        size += len(msg)
    if batch:
        yield batch


# --- decoding ----------------------------------------------------------------


class AddressCache:
    """Interned ``ipaddress`` objects keyed by their packed bytes.

    A table repeats a few thousand addresses across a million tuples: one
    object each saves both the constructor and the memory.
    """

    __slots__ = ("addresses", "limit")

    def __init__(self, limit: int = ADDRESS_CACHE_LIMIT) -> None:
        self.addresses: dict[bytes, IPAddress] = {}
        self.limit = limit

    def get(self, raw: bytes) -> IPAddress:
        addr = self.addresses.get(raw)
        if addr is None:
            if len(raw) == 4:
                addr = IPv4Address(raw)
            elif len(raw) == 16:
                addr = IPv6Address(raw)
            else:
                raise MalformedMessage(f"address of {len(raw)} bytes")
            if len(self.addresses) >= self.limit:
                self.addresses.clear()
            self.addresses[raw] = addr
        return addr


def _header_word(length: int, atype: int) -> int:
    """An attribute header as the fast-path structs read it (big-endian u32)."""
    return int.from_bytes(_NLA.pack(length, atype), "big")


# Fast path: the exact layout current kernels emit for a port-carrying tuple
# (no directional zone). The attribute headers are read as big-endian words
# together with the values and compared with these; anything else (older
# kernels without NLA_F_NESTED, ICMP, zones, reordering) takes the generic walk.
_PORT_L4 = ">IIB3xIH2xIH2x"
_V4_PORT_TUPLE = struct.Struct(">II4sI4s" + _PORT_L4[1:])
_V6_PORT_TUPLE = struct.Struct(">II16sI16s" + _PORT_L4[1:])
_PORT_L4_HEADERS = (
    _header_word(28, CTA_TUPLE_PROTO | NLA_F_NESTED),
    _header_word(5, CTA_PROTO_NUM),
    _header_word(6, CTA_PROTO_SRC_PORT),
    _header_word(6, CTA_PROTO_DST_PORT),
)
_V4_HEADERS = (
    _header_word(20, CTA_TUPLE_IP | NLA_F_NESTED),
    _header_word(8, CTA_IP_V4_SRC),
    _header_word(8, CTA_IP_V4_DST),
    *_PORT_L4_HEADERS,
)
_V6_HEADERS = (
    _header_word(44, CTA_TUPLE_IP | NLA_F_NESTED),
    _header_word(20, CTA_IP_V6_SRC),
    _header_word(20, CTA_IP_V6_DST),
    *_PORT_L4_HEADERS,
)
_FAST_LAYOUTS = {
    _V4_PORT_TUPLE.size: (_V4_PORT_TUPLE.unpack_from, _V4_HEADERS),
    _V6_PORT_TUPLE.size: (_V6_PORT_TUPLE.unpack_from, _V6_HEADERS),
}


def _decode_tuple(data: bytes, pos: int, end: int, cache: AddressCache) -> tuple[CtTuple, int, int]:
    """One CTA_TUPLE_* payload: (tuple, protocol, directional zone or -1)."""
    fast = _FAST_LAYOUTS.get(end - pos)
    if fast is not None:
        unpack, headers = fast
        w0, w1, rsrc, w2, rdst, w3, w4, num, w5, sp, w6, dp = unpack(data, pos)
        if (w0, w1, w2, w3, w4, w5, w6) == headers and num not in ICMP_PROTOS:
            addresses = cache.addresses
            src = addresses.get(rsrc)
            if src is None:
                src = cache.get(rsrc)
            dst = addresses.get(rdst)
            if dst is None:
                dst = cache.get(rdst)
            return CtTuple(src, dst, sp, dp), num, -1
    return _walk_tuple(data, pos, end, cache)


def _walk_tuple(data: bytes, pos: int, end: int, cache: AddressCache) -> tuple[CtTuple, int, int]:
    """The generic tuple walk: any attribute order, any subset, nests checked."""
    unpack_nla = _NLA.unpack_from
    src: IPAddress | None = None
    dst: IPAddress | None = None
    proto = -1
    sport = dport = 0
    icmp_type = icmp_code = -1
    tzone = -1
    while pos + 4 <= end:
        alen, atype = unpack_nla(data, pos)
        aend = pos + alen
        if alen < 4 or aend > end:
            raise MalformedMessage("tuple attribute overruns its nest")
        atype &= NLA_TYPE_MASK
        if atype == CTA_TUPLE_IP:
            p = pos + 4
            while p + 4 <= aend:
                ilen, itype = unpack_nla(data, p)
                iend = p + ilen
                if ilen < 4 or iend > aend:
                    raise MalformedMessage("address attribute overruns its nest")
                itype &= NLA_TYPE_MASK
                if itype in _SRC_TYPES:
                    src = cache.get(data[p + 4 : iend])
                elif itype in _DST_TYPES:
                    dst = cache.get(data[p + 4 : iend])
                p += (ilen + 3) & ~3
        elif atype == CTA_TUPLE_PROTO:
            p = pos + 4
            while p + 4 <= aend:
                ilen, itype = unpack_nla(data, p)
                iend = p + ilen
                if ilen < 4 or iend > aend:
                    raise MalformedMessage("protocol attribute overruns its nest")
                itype &= NLA_TYPE_MASK
                if itype == CTA_PROTO_NUM:
                    if ilen < 5:
                        raise MalformedMessage("short CTA_PROTO_NUM")
                    proto = data[p + 4]
                elif ilen < 5:
                    raise MalformedMessage(f"empty protocol attribute {itype}")
                elif itype in _SPORT_TYPES:
                    if ilen < 6:
                        raise MalformedMessage("short port")
                    sport = data[p + 4] << 8 | data[p + 5]
                elif itype == CTA_PROTO_DST_PORT:
                    if ilen < 6:
                        raise MalformedMessage("short port")
                    dport = data[p + 4] << 8 | data[p + 5]
                elif itype in _ICMP_TYPE_TYPES:
                    icmp_type = data[p + 4]
                elif itype in _ICMP_CODE_TYPES:
                    icmp_code = data[p + 4]
                p += (ilen + 3) & ~3
        elif atype == CTA_TUPLE_ZONE:
            if alen < 6:
                raise MalformedMessage("short CTA_TUPLE_ZONE")
            tzone = data[pos + 4] << 8 | data[pos + 5]
        pos += (alen + 3) & ~3
    if src is None or dst is None or proto < 0:
        raise MalformedMessage("tuple without addresses or protocol")
    if proto in ICMP_PROTOS:
        if icmp_type < 0 or icmp_code < 0:
            raise MalformedMessage("ICMP tuple without type or code")
        dport = icmp_type << 8 | icmp_code
    return CtTuple(src, dst, sport, dport), proto, tzone


def decode_entry(data: bytes, pos: int, end: int, family: int, cache: AddressCache) -> Entry:
    """The attributes of one IPCTNL_MSG_CT_NEW message (after nfgenmsg) as an Entry.

    Raises ``MalformedMessage`` when a required part is missing, an attribute
    overruns the message, or the addresses do not match ``family``.
    """
    unpack_nla = _NLA.unpack_from
    orig: CtTuple | None = None
    reply: CtTuple | None = None
    proto = -1
    status = -1
    zone = -1
    tzone = -1
    mark = 0
    ct_id = 0
    timeout = 0
    while pos + 4 <= end:
        alen, atype = unpack_nla(data, pos)
        aend = pos + alen
        if alen < 4 or aend > end:
            raise MalformedMessage("attribute overruns the message")
        atype &= NLA_TYPE_MASK
        if atype == CTA_TUPLE_ORIG:
            orig, proto, tzone = _decode_tuple(data, pos + 4, aend, cache)
        elif atype == CTA_TUPLE_REPLY:
            reply, rproto, _ = _decode_tuple(data, pos + 4, aend, cache)
            if proto >= 0 and rproto != proto:
                raise MalformedMessage("orig and reply protocols differ")
        elif alen >= 8 and atype == CTA_STATUS:
            status = _BE32.unpack_from(data, pos + 4)[0]
        elif alen >= 8 and atype == CTA_TIMEOUT:
            timeout = _BE32.unpack_from(data, pos + 4)[0]
        elif alen >= 8 and atype == CTA_MARK:
            mark = _BE32.unpack_from(data, pos + 4)[0]
        elif alen >= 8 and atype == CTA_ID:
            ct_id = _BE32.unpack_from(data, pos + 4)[0]
        elif alen >= 6 and atype == CTA_ZONE:
            zone = data[pos + 4] << 8 | data[pos + 5]
        pos += (alen + 3) & ~3
    if orig is None or reply is None:
        raise MalformedMessage("entry without both tuples")
    if status < 0:
        raise MalformedMessage("entry without CTA_STATUS")
    if zone < 0:
        # A directional zone shows only inside the tuples; CTA_ZONE with that
        # id still finds the entry on delete.
        zone = max(tzone, 0)
    addr_version = 4 if family == AF_INET else 6 if family == AF_INET6 else 0
    if orig.src.version != addr_version or reply.src.version != addr_version:
        raise MalformedMessage(f"addresses do not match family {family}")
    return Entry(family, proto, orig, reply, status, zone, mark, ct_id, timeout)


# --- learned message layouts (the bulk fast path) ------------------------------
#
# A dump of a busy table repeats a handful of message shapes: the same
# attributes, in the same order, with the same lengths; only the values
# differ. The first message of a shape is decoded by ``decode_entry`` (the
# reference) and its shape is compiled into one ``struct`` that reads every
# attribute header together with the values that matter; later messages of
# the same length are unpacked in one C call, and their headers compared
# with the learned ones as one tuple. Any difference (another shape of the
# same length, a directional zone, ICMP, anything unexpected) falls back to
# ``decode_entry``, so the fast path can only ever agree with it.

_LAYOUTS_PER_LENGTH = 4
_LAYOUTS_LIMIT = 256
# Values of optional attributes the shape does not carry, appended to the
# unpacked record so that one itemgetter reads present and absent alike.
_ABSENT = (0,)  # mark, id, timeout, zone all default to 0
# In ``core.decide.RawEntry`` order: what a layout's ``values`` returns.
_VALUE_NAMES = (
    "family", "oproto", "osrc", "odst", "osport", "odport",
    "rsrc", "rdst", "rsport", "rdport", "status", "zone", "mark", "id", "timeout",
)  # fmt: skip
_TUPLE_L4_SHAPE = (CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT)
_SCALARS = {CTA_STATUS: "status", CTA_TIMEOUT: "timeout", CTA_MARK: "mark", CTA_ID: "id"}


@dataclass(frozen=True, slots=True)
class _Layout:
    """One compiled message shape: how to unpack it, which words must match, where values are."""

    unpack: Callable[[bytes, int], tuple[Any, ...]]
    mask: int  # over the message read as one little-endian integer: headers and family
    expected: int
    values: Callable[[tuple[Any, ...]], RawEntry]
    rproto: int  # index of the reply tuple's protocol in the unpacked record


class _ShapeRefused(Exception):
    """The message's shape is not one the fast path handles; it stays on the generic walk."""


def _learn(data: bytes, pos: int, end: int) -> _Layout:
    """Compile the shape of the message at ``pos`` (at its nfgenmsg) up to ``end``.

    Raises ``_ShapeRefused`` for shapes the fast path does not cover.
    """
    fmt = ["B3x"]  # family, version, res_id
    mask = 0xFF  # the family byte
    where: dict[str, int] = {"family": 0}
    count = 1

    def add(code: str, name: str) -> None:
        nonlocal count
        fmt.append(code)
        where[name] = count
        count += 1

    def header(p: int, limit: int) -> tuple[int, int, int]:
        if p + 4 > limit:
            raise _ShapeRefused("truncated header")
        nonlocal mask
        alen, atype = _NLA.unpack_from(data, p)
        if alen < 4 or p + alen > limit:
            raise _ShapeRefused("attribute overruns")
        fmt.append("4x")
        mask |= 0xFFFFFFFF << (8 * (p - pos))
        return alen, atype & NLA_TYPE_MASK, p + alen

    def pad(alen: int) -> None:
        if _align(alen) > alen:
            fmt.append(f"{_align(alen) - alen}x")

    def tuple_shape(p: int, limit: int, prefix: str) -> None:
        seen = []
        while p < limit:
            alen, atype, aend = header(p, limit)
            seen.append(atype)
            if atype == CTA_TUPLE_IP:
                q = p + 4
                inner = []
                while q < aend:
                    ilen, itype, _ = header(q, aend)
                    inner.append(itype)
                    size = ilen - 4
                    if itype in _SRC_TYPES and size in (4, 16):
                        add(f"{size}s", name=prefix + "src")
                    elif itype in _DST_TYPES and size in (4, 16):
                        add(f"{size}s", name=prefix + "dst")
                    else:
                        raise _ShapeRefused("unexpected address attribute")
                    pad(ilen)
                    q += _align(ilen)
                if len(inner) != 2:
                    raise _ShapeRefused("not one source and one destination")
            elif atype == CTA_TUPLE_PROTO:
                q = p + 4
                inner = []
                while q < aend:
                    ilen, itype, _ = header(q, aend)
                    inner.append(itype)
                    if itype == CTA_PROTO_NUM and ilen == 5:
                        add("B", name=prefix + "proto")
                    elif itype == CTA_PROTO_SRC_PORT and ilen == 6:
                        add("H", name=prefix + "sport")
                    elif itype == CTA_PROTO_DST_PORT and ilen == 6:
                        add("H", name=prefix + "dport")
                    else:
                        raise _ShapeRefused("not a port-carrying protocol")
                    pad(ilen)
                    q += _align(ilen)
                if tuple(inner) != _TUPLE_L4_SHAPE:
                    raise _ShapeRefused("unexpected protocol attributes")
            else:
                raise _ShapeRefused("directional zone or unknown tuple attribute")
            pad(alen)
            p += _align(alen)
        if seen != [CTA_TUPLE_IP, CTA_TUPLE_PROTO]:
            raise _ShapeRefused("unexpected tuple shape")

    p = pos + _NFGENMSG.size
    top: set[int] = set()
    while p < end:
        alen, atype, aend = header(p, end)
        if atype in top:
            raise _ShapeRefused("repeated attribute")  # which one counts is the reference's call
        top.add(atype)
        if (atype in _SCALARS and alen != 8) or (atype == CTA_ZONE and alen != 6):
            raise _ShapeRefused("odd-sized attribute")
        if atype in (CTA_TUPLE_ORIG, CTA_TUPLE_REPLY):
            prefix = "o" if atype == CTA_TUPLE_ORIG else "r"
            if prefix + "src" in where:
                raise _ShapeRefused("repeated tuple")
            tuple_shape(p + 4, aend, prefix)
        elif atype in _SCALARS and alen == 8:
            add("I", name=_SCALARS[atype])
        elif atype == CTA_ZONE and alen == 6:
            add("H", name="zone")
            pad(alen)
        else:
            fmt.append(f"{_align(alen) - 4}x")
        p += _align(alen)
    if p != end or not all(n in where for n in ("osrc", "rsrc", "oproto", "rproto", "status")):
        raise _ShapeRefused("message without both tuples and a status")
    record = struct.Struct(">" + "".join(fmt))
    if record.size != end - pos:
        raise _ShapeRefused("shape does not cover the message")
    expected = int.from_bytes(data[pos:end], "little") & mask
    absent = count  # index of _ABSENT[0] once appended
    values = itemgetter(*(where.get(n, absent) for n in _VALUE_NAMES))
    return _Layout(record.unpack_from, mask, expected, values, where["rproto"])


_LAYOUTS: dict[int, list[_Layout]] = {}  # by message length after nlmsghdr
_LEARNED_LENGTHS: set[int] = set()  # by whole message length


def _slot_setters(cls: type, names: tuple[str, ...]) -> tuple[Callable[[object, object], None], ...]:
    """The slot descriptors' setters of a frozen value type, checked against its fields.

    The fast path fills ``CtTuple`` and ``Entry`` through their slots, skipping
    the generated ``__init__`` (half the cost of a decoded entry). That is
    only sound while the fields are exactly these and ``__post_init__`` checks
    nothing that a learned shape does not already guarantee (the family byte
    and the address lengths are part of every shape). A change to either
    type fails here, at import, instead of building half-initialised values.
    """
    actual = tuple(f.name for f in fields(cls))
    if actual != names:
        raise ImportError(f"ctcodec fast path: {cls.__name__} fields {actual} != {names}; update the codec")
    return tuple(getattr(cls, name).__set__ for name in names)


_CTTUPLE_SETTERS = _slot_setters(CtTuple, ("src", "dst", "sport", "dport"))
_ENTRY_SETTERS = _slot_setters(
    Entry, ("family", "proto", "orig", "reply", "status", "zone", "mark", "id", "timeout")
)


def entry_from_raw(raw: RawEntry, cache: AddressCache | None = None) -> Entry:
    """The ``Entry`` of a raw entry that a learned layout read (see ``core.decide.RawEntry``).

    Built through the slots like the fast path does: the layout already
    guarantees what ``Entry.__post_init__`` checks (family and address sizes).
    """
    (family, proto, osrc, odst, osport, odport, rsrc, rdst, rsport, rdport,
     status, zone, mark, ct_id, timeout) = raw  # fmt: skip
    cache = cache or _BUILD_CACHE
    get, interned = cache.get, cache.addresses.get
    new = object.__new__
    t_src, t_dst, t_sport, t_dport = _CTTUPLE_SETTERS
    orig = new(CtTuple)
    t_src(orig, interned(osrc) or get(osrc))
    t_dst(orig, interned(odst) or get(odst))
    t_sport(orig, osport)
    t_dport(orig, odport)
    reply = new(CtTuple)
    t_src(reply, interned(rsrc) or get(rsrc))
    t_dst(reply, interned(rdst) or get(rdst))
    t_sport(reply, rsport)
    t_dport(reply, rdport)
    e_family, e_proto, e_orig, e_reply, e_status, e_zone, e_mark, e_id, e_timeout = _ENTRY_SETTERS
    entry = new(Entry)
    e_family(entry, family)
    e_proto(entry, proto)
    e_orig(entry, orig)
    e_reply(entry, reply)
    e_status(entry, status)
    e_zone(entry, zone)
    e_mark(entry, mark)
    e_id(entry, ct_id)
    e_timeout(entry, timeout)
    return entry


_BUILD_CACHE = AddressCache(limit=1 << 16)


def _learned(data: bytes, pos: int, end: int) -> None:
    """Remember the shape of a message that ``decode_entry`` just accepted."""
    if sum(map(len, _LAYOUTS.values())) >= _LAYOUTS_LIMIT:
        return
    try:
        layout = _learn(data, pos, end)
    except (_ShapeRefused, struct.error):
        return
    same = _LAYOUTS.setdefault(end - pos, [])
    if len(same) < _LAYOUTS_PER_LENGTH:
        same.append(layout)
        _LEARNED_LENGTHS.add(end - pos + 16)


@dataclass(slots=True)
class DumpParser:
    """Accumulates one dump: entries, decode errors, and how the dump ended.

    ``feed`` takes one received datagram. Messages whose sequence number is not
    ``seq`` belong to an earlier request and are ignored (counted in ``stale``).
    With ``skip_replied`` set, entries with ``IPS_SEEN_REPLY`` are counted in
    ``skipped_replied`` and not kept (no objects are built for them on the
    fast path): the caller filters UNREPLIED entries anyway.
    """

    seq: int
    cache: AddressCache = field(default_factory=AddressCache)
    entries: list[Entry] = field(default_factory=list)
    messages: int = 0
    decode_errors: int = 0
    stale: int = 0
    done: bool = False
    interrupted: bool = False
    errno: int = 0
    error_samples: list[str] = field(default_factory=list)
    skip_replied: bool = False
    skipped_replied: int = 0
    # When set, entries read by a learned layout go to it as raw entries
    # (``core.decide.RawEntry``) instead of being built and kept in ``entries``.
    sink: Callable[[RawEntry], None] | None = None
    # With ``sink`` and the compiled path: a consumer whose precompiled checks settle
    # entries without Python (``core.decide.Decider``: raw_cache, raw_program, judge_raw,
    # sport_matters, examined, eligible), or None for every entry to reach the sink.
    settle: Any = None

    def _error(self, why: str) -> None:
        self.decode_errors += 1
        if len(self.error_samples) < 8:
            self.error_samples.append(why)

    def _generic(self, data: bytes, pos: int, mend: int) -> None:
        """The reference decode of one IPCTNL_MSG_CT_NEW message; learns its shape."""
        if mend - pos < _HDR_LEN:
            self._error("message shorter than nfgenmsg")
            return
        try:
            entry = decode_entry(data, pos + _HDR_LEN, mend, data[pos + 16], self.cache)
        except MalformedMessage as exc:
            self._error(str(exc))
            return
        except ValueError as exc:  # a value type refused the decoded fields
            self._error(f"invalid entry: {exc}")
            return
        _learned(data, pos + 16, mend)
        if self.skip_replied and entry.status & _SEEN_REPLY:
            self.skipped_replied += 1
        else:
            self.entries.append(entry)

    def feed(self, data: bytes, n: int | None = None) -> None:
        end = len(data) if n is None else n
        if self.sink is not None and _ctscan is not None:
            self._feed_compiled(data, end)
            return
        pos = 0
        unpack_hdr = _NLMSGHDR.unpack_from
        seq = self.seq
        cache = self.cache
        addresses = cache.addresses
        append = self.entries.append
        layouts = _LAYOUTS
        learned = _LEARNED_LENGTHS
        from_bytes = int.from_bytes
        absent = _ABSENT
        skip_mask = _SEEN_REPLY if self.skip_replied else 0
        sink = self.sink
        new = object.__new__
        t_src, t_dst, t_sport, t_dport = _CTTUPLE_SETTERS
        e_family, e_proto, e_orig, e_reply, e_status, e_zone, e_mark, e_id, e_timeout = _ENTRY_SETTERS
        messages = skipped = 0
        while pos + 16 <= end:
            mlen, mtype, mflags, mseq, _pid = unpack_hdr(data, pos)
            if mlen < 16 or pos + mlen > end:
                # Cannot resynchronise inside a datagram: the rest is lost.
                self._error(f"netlink message of length {mlen} at {pos} overruns {end}")
                break
            if mtype == IPCTNL_MSG_CT_NEW and mseq == seq:
                messages += 1
                if mflags & NLM_F_DUMP_INTR:
                    self.interrupted = True
                shape = from_bytes(data[pos + 16 : pos + mlen], "little") if mlen in learned else 0
                for layout in layouts.get(mlen - 16, ()):
                    if shape & layout.mask != layout.expected:
                        continue
                    record = layout.unpack(data, pos + 16) + absent
                    raw = layout.values(record)
                    if record[layout.rproto] != raw[1]:
                        self._generic(data, pos, pos + mlen)  # malformed: the reference decode says so
                        break
                    if raw[10] & skip_mask:
                        skipped += 1
                        break
                    if sink is not None:
                        sink(raw)
                        break
                    (family, proto, osrc, odst, osport, odport,
                     rsrc, rdst, rsport, rdport, status, zone, mark, ct_id, timeout) = raw  # fmt: skip
                    orig = new(CtTuple)
                    t_src(orig, addresses.get(osrc) or cache.get(osrc))
                    t_dst(orig, addresses.get(odst) or cache.get(odst))
                    t_sport(orig, osport)
                    t_dport(orig, odport)
                    reply = new(CtTuple)
                    t_src(reply, addresses.get(rsrc) or cache.get(rsrc))
                    t_dst(reply, addresses.get(rdst) or cache.get(rdst))
                    t_sport(reply, rsport)
                    t_dport(reply, rdport)
                    entry = new(Entry)
                    e_family(entry, family)
                    e_proto(entry, proto)
                    e_orig(entry, orig)
                    e_reply(entry, reply)
                    e_status(entry, status)
                    e_zone(entry, zone)
                    e_mark(entry, mark)
                    e_id(entry, ct_id)
                    e_timeout(entry, timeout)
                    append(entry)
                    break
                else:
                    self._generic(data, pos, pos + mlen)
            elif mseq != seq:
                self.stale += 1
            else:
                if mflags & NLM_F_DUMP_INTR:
                    self.interrupted = True
                if mtype == IPCTNL_MSG_CT_NEW:
                    pass
                elif mtype == NLMSG_DONE:
                    self.done = True
                elif mtype == NLMSG_ERROR:
                    if mlen < 20:
                        self._error("short NLMSG_ERROR")
                    else:
                        err = -_ERRNO.unpack_from(data, pos + 16)[0]
                        if err:
                            self.errno = err
                        self.done = True
                elif mtype == NLMSG_OVERRUN:
                    self._error("NLMSG_OVERRUN")
            pos += (mlen + 3) & ~3
        else:
            if pos < end:
                self._error(f"{end - pos} trailing bytes after the last message")
        self.messages += messages
        self.skipped_replied += skipped


    def _feed_compiled(self, data: bytes, end: int) -> None:
        """``feed`` through ``_ctscan``: the same outcome, most entries settled in C."""
        settle = self.settle
        cache = program = judge = tables = records = undecided = None
        sport_matters = False
        if settle is not None:
            cache, program, judge = settle.raw_cache, settle.raw_program, settle.judge_raw
            sport_matters = settle.sport_matters
            tables = getattr(settle, "class_tables", None)
            records = getattr(settle, "records", None)
            undecided = getattr(settle, "undecided_records", None)
        skip_mask = _SEEN_REPLY if self.skip_replied else 0
        assert self.sink is not None
        messages, skipped, stale, done, interrupted, errno, examined, eligible = _ctscan.feed(
            self, data, end, self.seq, skip_mask, self.sink, cache, program, judge, sport_matters, tables,
            records, undecided,
        )
        self.messages += messages
        self.skipped_replied += skipped
        self.stale += stale
        if done:
            self.done = True
        if interrupted:
            self.interrupted = True
        if errno:
            self.errno = errno
        if settle is not None:
            settle.examined += examined
            settle.eligible += eligible


def ends_dump(data: bytes, seq: int) -> bool:
    """Whether the datagram holds the NLMSG_DONE or NLMSG_ERROR that ends dump ``seq`` (headers only)."""
    pos, end = 0, len(data)
    while pos + 16 <= end:
        mlen, mtype, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, pos)
        if mlen < 16 or pos + mlen > end:
            return False
        if mseq == seq and mtype in (NLMSG_DONE, NLMSG_ERROR):
            return True
        pos += _align(mlen)
    return False


def parse_answers(data: bytes, n: int | None = None) -> list[tuple[int, int]]:
    """Every NLMSG_ERROR in a datagram as (seq of the request, errno); errno 0 is an ACK."""
    end = len(data) if n is None else n
    pos = 0
    out: list[tuple[int, int]] = []
    while pos + 16 <= end:
        mlen, mtype, _flags, _mseq, _pid = _NLMSGHDR.unpack_from(data, pos)
        if mlen < 16 or pos + mlen > end:
            break
        # The answer echoes the request's header after the errno; its seq is
        # ours, also when the kernel's own header seq is the same anyway.
        if mtype == NLMSG_ERROR and mlen >= 36:
            err = -_ERRNO.unpack_from(data, pos + 16)[0]
            req_seq = _NLMSGHDR.unpack_from(data, pos + 20)[3]
            out.append((req_seq, err))
        pos += _align(mlen)
    return out


# --- per-CPU statistics (IPCTNL_MSG_CT_GET_STATS_CPU) -----------------------------
#
# One message per possible CPU, ``res_id`` the CPU number (big-endian), each
# attribute a big-endian u32 counter of this namespace on that CPU
# (include/uapi/linux/netfilter/nfnetlink_conntrack.h, ctattr_stats_cpu).

IPCTNL_MSG_CT_GET_STATS_CPU = NFNL_SUBSYS_CTNETLINK << 8 | 4
CTA_STATS_NAMES: dict[int, str] = {
    2: "found", 4: "invalid", 8: "insert", 9: "insert_failed", 10: "drop", 11: "early_drop",
    12: "error", 13: "search_restart", 14: "clash_resolve", 15: "chain_toolong",
}  # fmt: skip


def encode_stats_request(seq: int) -> bytes:
    return encode_message(IPCTNL_MSG_CT_GET_STATS_CPU, NLM_F_REQUEST | NLM_F_DUMP, seq, 0, ())


def parse_stats(data: bytes, seq: int, totals: dict[str, int]) -> tuple[bool, int]:
    """Add one datagram's per-CPU counters (of the dump ``seq``) into ``totals``.

    Returns (done, errno). Unknown attributes are skipped; a counter shorter
    than 4 bytes or a message overrunning the datagram raises ``MalformedMessage``.
    """
    pos, end = 0, len(data)
    while pos + 16 <= end:
        mlen, mtype, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, pos)
        if mlen < 16 or pos + mlen > end:
            raise MalformedMessage("stats message overruns the datagram")
        if mseq != seq:
            pos += _align(mlen)
            continue
        if mtype == NLMSG_DONE:
            return True, 0
        if mtype == NLMSG_ERROR:
            err = -_ERRNO.unpack_from(data, pos + 16)[0] if mlen >= 20 else 0
            return True, err
        if mtype == IPCTNL_MSG_CT_GET_STATS_CPU:
            apos, mend = pos + _HDR_LEN, pos + mlen
            while apos + 4 <= mend:
                alen, atype = _NLA.unpack_from(data, apos)
                if alen < 4 or apos + alen > mend:
                    raise MalformedMessage("stats attribute overruns the message")
                name = CTA_STATS_NAMES.get(atype & NLA_TYPE_MASK)
                if name is not None:
                    if alen < 8:
                        raise MalformedMessage(f"stats counter {name} shorter than 4 bytes")
                    totals[name] = totals.get(name, 0) + _BE32.unpack_from(data, apos + 4)[0]
                apos += _align(alen)
        pos += _align(mlen)
    return False, 0
