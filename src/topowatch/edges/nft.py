# SPDX-License-Identifier: GPL-2.0-or-later
"""Read the nftables ruleset (``nft -j list ruleset``) into a ``NatRuleset``.

Theory of operation: ``read_ruleset`` runs nft in the current namespace and
hands its text to ``parse_ruleset_output``. ``parse_ruleset_json``, a pure
function over the decoded document, is the reference reader; the text goes
to a faster, leaner one (``_FastReader``) that must give the same answer
(a test holds them to it) and hands anything it does not expect (another
order or layout, an error) to the reference. It reads nft's items one at a
time with the cyclic collector paused, parses only the rules of chains that
matter (below), shares equal expressions, reuses the rules the last read
made of identical items (a re-read parses what changed), reports progress every
``bulkparse.STEP`` rules and gives up after ``PARSE_TIMEOUT`` seconds (the
caller keeps its previous ruleset): a 50k-rule ruleset costs less CPU than
nft spends printing it (``bench/parse.py``). The parser keeps
the base chains of type nat at the four NAT hooks of the ip, ip6 and inet
families (tables not dormant) and every regular chain they reach by jump or
goto; named sets are resolved into the matches that use them. Every
expression is either modelled exactly (see ``core.nat``) or kept as an
``UnknownMatch``/``UnknownStatement`` carrying the expression's name
("xt match policy", "fib daddr oif", "mangle"): the parser never raises on
an expression it does not know or cannot read, and never approximates one.
A document whose structure is wrong (a chain name that is a list, a handle
that is a word) is a ``RulesetError`` naming the item and field, and no
other exception leaves the parser: the reactor keeps the previous ruleset.
The policy on types: every field of a table, chain, rule, set or map item
that the parser reads is checked where the item is read (``_Item``): a
table's family, name and flags; a chain's family, table, name, type, hook,
prio, policy and handle; a rule's family, table, chain, expr, handle and
comment; a set's or map's family, table, name, flags and type (its ``map``
is read for presence only). Values inside expressions (a rule's ``expr``
list, a set's ``elem``) are not items: one of the wrong type makes that
expression unknown, as an unknown expression is. Fields the parser never
reads (a table's handle, a chain's dev, a set's size or policy, metainfo,
flowtables, elements' counters) are not checked. Modelled beyond
plain matches: concatenations and named/anonymous sets with intervals, verdict
maps, NAT maps (``snat|dnat [prefix] to KEY map``, numgen/jhash keys),
``fib ... type`` and ``fib saddr [. iif] oif|oifname``, ``ct state``,
``ct status`` flag tests, and ``meta|ct mark set`` to a constant. Named sets
and maps are resolved only when constant (not dynamic, no timeout).

Volatile data (counter values, element expiry) is dropped so that two reads
of the same ruleset compare equal.

This module never changes the ruleset; it only lists it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import re
import socket
import subprocess
from collections.abc import Callable, Iterable, Iterator, Mapping
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any, ClassVar

from topowatch.core.flow import PROTO_NUMBERS, NatKind
from topowatch.core.model import AF_INET, AF_INET6, IPAddress
from topowatch.core.nat import (
    FAMILY_AFS,
    Chain,
    ConcatMatch,
    CtStateMatch,
    CtStatusMatch,
    ElementKey,
    Expression,
    Hook,
    IntervalSet,
    Key,
    MarkCopy,
    MarkSet,
    Match,
    NameSet,
    NatMapStatement,
    NatRuleset,
    NatStatement,
    NatTarget,
    Op,
    Passive,
    Rule,
    Selector,
    UnknownMatch,
    UnknownStatement,
    Verdict,
    VerdictKind,
    VerdictMap,
    make_interval,
    make_match,
    make_names,
    make_nat,
    make_rule,
)
from topowatch.edges.bulkparse import Budget, ParseTooSlow, gc_paused
from topowatch.errors import MissingTool, PermissionDenied, RulesetError
from topowatch.text import run_tool, undecodable

# At most half the unit's WatchdogSec (30 s): a hanging nft must fail the read (the previous ruleset
# stays), not stall the reaction until the watchdog restarts the daemon. 50k rules list in about 6 s.
NFT_TIMEOUT = 15.0
# Parsing what nft printed: 50k rules take 1-4 s (bench/parse.py); past this the read fails and the
# previous ruleset stays (the watchdog meanwhile sees the parse's steps as progress).
PARSE_TIMEOUT = 30.0

_HOOKS = {h.value: h for h in Hook}
_VERDICTS = {v.value: v for v in VerdictKind}
_NAT_KINDS = {
    "snat": NatKind.SNAT,
    "dnat": NatKind.DNAT,
    "masquerade": NatKind.MASQUERADE,
    "redirect": NatKind.REDIRECT,
}
_PASSIVE = frozenset({"counter", "log"})
_FAMILY_WORDS = {"ip": AF_INET, "ip6": AF_INET6}

_META_KEYS = {
    "iifname": Key.IIFNAME,
    "oifname": Key.OIFNAME,
    "iif": Key.IIF,
    "oif": Key.OIF,
    "l4proto": Key.L4PROTO,
    "nfproto": Key.NFPROTO,
    "protocol": Key.NFPROTO,  # ethertype: values are translated to AF_* below
    "mark": Key.MARK,
}
_BARE_META = frozenset({"iifname", "oifname", "iif", "oif"})
_PORT_PROTOS = {"tcp": 6, "udp": 17, "udplite": 136, "sctp": 132, "dccp": 33}
_PROTO_WORDS = {**PROTO_NUMBERS, "ipv6-icmp": 58, "icmp6": 58, "ah": 51, "ipip": 4, "ipv6": 41}
_NFPROTO_WORDS = {"ipv4": AF_INET, "ipv6": AF_INET6}
_ETHERTYPES = {"ip": AF_INET, "ip6": AF_INET6, 0x0800: AF_INET, 0x86DD: AF_INET6}

_BOUNDS: dict[Key, tuple[int, int]] = {
    Key.L4PROTO: (0, 0xFF),
    Key.NFPROTO: (0, 0xFFFF),
    Key.SPORT: (0, 0xFFFF),
    Key.DPORT: (0, 0xFFFF),
    Key.MARK: (0, 0xFFFFFFFF),
    Key.CT_MARK: (0, 0xFFFFFFFF),
    Key.CT_ZONE: (0, 0xFFFF),
    Key.IPSEC_REQID: (0, 0xFFFFFFFF),
    Key.IPSEC_SPI: (0, 0xFFFFFFFF),
}
# nft's ``ipsec in|out [spnum N] KEY`` keys (nft_xfrm).
_IPSEC_KEYS = {
    "reqid": Key.IPSEC_REQID,
    "spi": Key.IPSEC_SPI,
    "saddr": Key.IPSEC_SADDR,
    "daddr": Key.IPSEC_DADDR,
}

_SetTable = Mapping[tuple[str, str, str], Mapping[str, Any]]


class _NotModelled(Exception):
    """An expression (or value) we do not model; its message is the expression's name."""


# ---------------------------------------------------------------------------
# Rendering: nft-like text for reasons. Never fails.


def _text(e: Any, quote: bool = False) -> str:
    try:
        return _render(e, quote)
    except Exception:
        return json.dumps(e, sort_keys=True, separators=(",", ":"))


def _render(e: Any, quote: bool = False) -> str:
    # Exact types first: the hot path of a large ruleset (a match's sides, a NAT statement).
    kind = type(e)
    if kind is str:
        return f'"{e}"' if quote and not e.startswith("@") else e
    if kind is dict and len(e) == 1:
        ((k, v),) = e.items()
        if k == "match":
            return _render_match(v)
        if k == "meta":
            key = str(v["key"])
            return key if key in _BARE_META else f"meta {key}"
        if k == "payload" and "protocol" in v:
            return f"{v['protocol']} {v['field']}"
        return _render_one(k, v, quote)
    if isinstance(e, bool):
        return "exists" if e else "missing"
    if isinstance(e, str):
        return f'"{e}"' if quote and not e.startswith("@") else e
    if isinstance(e, int):
        return str(e)
    if isinstance(e, list):
        return ", ".join(_render(x, quote) for x in e)
    if not isinstance(e, dict) or len(e) != 1:
        return json.dumps(e, sort_keys=True, separators=(",", ":"))
    ((k, v),) = e.items()
    return _render_one(k, v, quote)


def _render_match(v: Any) -> str:
    op = v.get("op", "==")
    left = _render(v["left"])
    q = isinstance(v["left"], dict) and v["left"].get("meta", {}).get("key") in _BARE_META
    right = _render(v["right"], q)
    return f"{left} {right}" if op == "==" else f"{left} {op} {right}"


def _render_one(k: str, v: Any, quote: bool) -> str:
    """A one-key object ``{k: v}``."""
    if k in _NAT_KINDS:  # first: one in every NAT rule
        return _render_nat(k, v)
    if k == "set":
        items = v if isinstance(v, list) else [v]
        return "{ " + ", ".join(_render_element(x, quote) for x in items) + " }"
    if k == "elem":
        return _render(v.get("val"), quote)
    if k == "range":
        return f"{_render(v[0], quote)}-{_render(v[1], quote)}"
    if k == "prefix":
        return f"{v['addr']}/{v['len']}"
    if k == "meta":
        key = str(v["key"])
        return key if key in _BARE_META else f"meta {key}"
    if k == "payload":
        if "protocol" in v:
            return f"{v['protocol']} {v['field']}"
        return f"@{v.get('base')},{v.get('offset')},{v.get('len')}"
    if k == "ct":
        parts = ["ct", v.get("dir", ""), v.get("family", ""), v["key"]]
        return " ".join(p for p in parts if p)
    if k in ("&", "|", "^", "<<", ">>"):
        return f" {k} ".join(_render(x) for x in v)
    if k == "concat":
        return " . ".join(_render(x, quote) for x in v)
    if k in ("map", "vmap"):
        return f"{_render(v['key'])} {k} {_render(v['data'])}"
    if k == "fib":
        flags = v.get("flags", [])
        flags = [flags] if isinstance(flags, str) else flags
        return f"fib {' . '.join(flags)} {v.get('result')}"
    if k == "rt":
        return " ".join(p for p in ("rt", v.get("family", ""), v.get("key", "")) if p)
    if k == "numgen":
        return f"numgen {v.get('mode')} mod {v.get('mod')}"
    if k in ("jhash", "symhash"):
        return f"{k} mod {v.get('mod')}"
    if k == "xt":
        return f"xt {v.get('type')} {v.get('name')}"
    if k == "ipsec":
        words = ("ipsec", v.get("dir", ""), v.get("family", ""), v.get("key", ""))
        return " ".join(str(p) for p in words if p)
    if k == "exthdr":
        return " ".join(str(p) for p in (v.get("name", "exthdr"), v.get("field", "")) if p)
    if k in _VERDICTS:
        return f"{k} {v['target']}" if isinstance(v, dict) and "target" in v else k
    if k == "match":
        return _render_match(v)
    if k in _NAT_KINDS:
        return _render_nat(k, v)
    if k == "mangle":
        return f"{_render(v['key'])} set {_render(v['value'])}"
    return str(k)


def _render_element(e: Any, quote: bool) -> str:
    if isinstance(e, list) and len(e) == 2:  # a map element: key : value
        return f"{_render(e[0], quote)} : {_render(e[1], quote)}"
    return _render(e, quote)


def _render_nat(k: str, v: Any) -> str:
    if not isinstance(v, dict):
        return k
    words = [k]
    if "family" in v:
        words.append(v["family"])
    type_flags = v.get("type_flags")
    if type_flags:
        words.append(" ".join(type_flags) if isinstance(type_flags, list) else str(type_flags))
    target = ""
    if "addr" in v:
        addr = _render(v["addr"])
        target = f"[{addr}]" if ":" in addr and "port" in v else addr
    if "port" in v:
        target += f":{_render(v['port'])}"
    if target:
        words.append(f"to {target}")
    flags = v.get("flags")
    if flags:
        words.append(",".join(flags) if isinstance(flags, list) else str(flags))
    return " ".join(words)


def expression_name(e: Any) -> str:
    """The name of an expression for "unmodelled expression: NAME" ("xt match policy", "rt ipsec")."""
    if isinstance(e, dict) and len(e) == 1:
        ((k, v),) = e.items()
        if not isinstance(v, dict):
            return str(k)
        if k == "xt":
            return f"xt {v.get('type', '?')} {v.get('name', '?')}"
        if k in ("rt", "meta", "ct", "ipsec", "socket", "osf"):
            return f"{k} {v.get('key', '')}".strip()
        if k == "payload":
            if "protocol" in v:
                return f"{v['protocol']} {v.get('field', '')}".strip()
            return "raw payload"
        if k == "fib":
            return f"fib {v.get('result', '')}".strip()
        if k == "exthdr":
            return f"exthdr {v.get('name', '')}".strip()
        if k == "match":
            return expression_name(v.get("left"))
        return str(k)
    if isinstance(e, str) and e.startswith("@"):
        return f"set {e}"
    return type(e).__name__


# ---------------------------------------------------------------------------
# Matches.


def _selector(left: Any) -> Selector:
    if type(left) is dict and len(left) == 1:
        ((k, v),) = left.items()
        if k in ("meta", "payload") and type(v) is dict:
            # The same few selectors recur in every rule of a large ruleset: read each once.
            try:
                return _flat_selector(k, tuple(v.items()))
            except TypeError:  # a value that is not hashable: not one of those
                pass
    return _selector_of(left)


@functools.lru_cache(maxsize=4096)
def _flat_selector(k: str, items: tuple[tuple[str, Any], ...]) -> Selector:
    return _selector_of({k: dict(items)})


def _selector_of(left: Any) -> Selector:
    if not isinstance(left, dict) or len(left) != 1:
        raise _NotModelled(expression_name(left))
    ((k, v),) = left.items()
    text = _text(left)
    if k == "meta" and v.get("key") in _META_KEYS:
        return Selector(_META_KEYS[v["key"]], text)
    if k == "payload" and "protocol" in v:
        proto, field = v["protocol"], v.get("field")
        if proto in ("ip", "ip6"):
            fam = _FAMILY_WORDS[proto]
            if field in ("saddr", "daddr"):
                return Selector(Key.SADDR if field == "saddr" else Key.DADDR, text, family=fam)
            if (proto, field) in (("ip", "protocol"), ("ip6", "nexthdr")):
                return Selector(Key.L4PROTO, text, family=fam)
        if field in ("sport", "dport"):
            key = Key.SPORT if field == "sport" else Key.DPORT
            if proto == "th":
                return Selector(key, text)
            if proto in _PORT_PROTOS:
                return Selector(key, text, proto=_PORT_PROTOS[proto])
    if k == "ct" and "dir" not in v and v.get("key") in ("mark", "zone"):
        return Selector(Key.CT_MARK if v["key"] == "mark" else Key.CT_ZONE, text)
    if k == "rt" and v.get("key") == "ipsec":
        return Selector(Key.RT_IPSEC, text)
    if k == "meta" and v.get("key") == "secpath":
        return Selector(Key.SECPATH, text)
    if k == "ipsec" and v.get("key") in _IPSEC_KEYS and v.get("dir", "in") in ("in", "out"):
        sa_family = _FAMILY_WORDS.get(v["family"]) if "family" in v else None
        if (sa_family is None) != (v["key"] in ("reqid", "spi")):
            raise _NotModelled(expression_name(left))
        spnum = v.get("spnum", 0)
        if type(spnum) is not int or spnum < 0:
            raise _NotModelled(expression_name(left))
        direction = v.get("dir", "in")
        return Selector(_IPSEC_KEYS[v["key"]], text, family=sa_family, direction=direction, spnum=spnum)
    special = _special_selector(k, v, text)
    if special is not None:
        return special
    if k == "&" and isinstance(v, list) and len(v) == 2:
        inner = _selector(v[0])
        if inner.key in (Key.MARK, Key.CT_MARK) and inner.mask is None:
            return Selector(inner.key, text, mask=_scalar(inner.key, v[1]))
    raise _NotModelled(expression_name(left))


def _scalar(key: Key, v: Any) -> int:
    if isinstance(v, dict) and "elem" in v:
        return _scalar(key, v["elem"].get("val"))
    if key is Key.FIB_TYPE and isinstance(v, str) and v in _FIB_TYPES:
        return _FIB_TYPES[v]
    if isinstance(v, bool):
        if key in (Key.RT_IPSEC, Key.SECPATH):  # exists / missing
            return int(v)
        raise _NotModelled("boolean value")
    if key is Key.NFPROTO:
        # meta nfproto takes ipv4/ipv6 (NFPROTO_* equal AF_*); meta protocol an ethertype.
        if v in _NFPROTO_WORDS:
            return _NFPROTO_WORDS[v]
        if v in _ETHERTYPES:
            return _ETHERTYPES[v]
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        if key is Key.L4PROTO and v in _PROTO_WORDS:
            return _PROTO_WORDS[v]
        try:
            return int(v, 0)
        except ValueError:
            pass
    raise _NotModelled(f"value {v!r}")


@functools.lru_cache(maxsize=1 << 16)
def _address(text: str) -> tuple[int, int]:
    """(value, version) of an address; ValueError as ``ip_address`` says. The hot spot of big rulesets.

    A dotted quad goes through ``inet_pton`` (C, and as strict as ``ip_address``:
    no leading zeros, exactly four parts); anything else through ``ip_address``.
    """
    try:
        return int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big"), 4
    except (OSError, ValueError):  # ValueError: an embedded NUL
        a = ip_address(text)
        return int(a), a.version


def _addr_interval(v: Any) -> tuple[int, int, int]:
    """(lo, hi, version) of an address, prefix or range."""
    if isinstance(v, dict) and "elem" in v:
        return _addr_interval(v["elem"].get("val"))
    if isinstance(v, str):
        try:
            value, version = _address(v)
        except ValueError as exc:
            raise _NotModelled(f"value {v!r}") from exc
        return value, value, version
    if isinstance(v, dict) and "prefix" in v:
        prefix = v["prefix"]
        net: IPv4Network | IPv6Network = ip_network(f"{prefix['addr']}/{prefix['len']}", strict=False)
        return int(net.network_address), int(net.broadcast_address), net.version
    if isinstance(v, dict) and "range" in v:
        lo, hi = (ip_address(x) for x in v["range"])
        if lo.version != hi.version:
            raise _NotModelled("mixed address range")
        return int(lo), int(hi), lo.version
    raise _NotModelled(expression_name(v))


def _elements(right: Any, sets: _SetTable, family: str, table: str) -> list[Any]:
    """The elements a right-hand side stands for: one value, an anonymous set or a named set."""
    if isinstance(right, str) and right.startswith("@"):
        found = sets.get((family, table, right[1:]))
        if found is None:
            raise _NotModelled(f"set {right} (not in the ruleset)")
        if "map" in found:
            raise _NotModelled(f"map {right}")
        flags = _flag_list(found.get("flags"))
        if "dynamic" in flags or "timeout" in flags:
            raise _NotModelled(f"dynamic set {right}")
        if isinstance(found.get("type"), list) or found.get("type") == "concat":
            raise _NotModelled(f"concatenation set {right}")
        elem = found.get("elem", [])
        return list(elem) if isinstance(elem, list) else [elem]
    if isinstance(right, dict) and "set" in right:
        elem = right["set"]
        return list(elem) if isinstance(elem, list) else [elem]
    return [right]


def _values(sel: Selector, right: Any, sets: _SetTable, family: str, table: str) -> IntervalSet | NameSet:
    elements = _elements(right, sets, family, table)
    for e in elements:
        if isinstance(e, dict) and "concat" in e:
            raise _NotModelled("concat")
    if sel.key in (Key.IIFNAME, Key.OIFNAME, Key.IIF, Key.OIF, Key.FIB_OIFNAME):
        exact: set[str] = set()
        prefixes: set[str] = set()
        indexes: set[int] = set()
        wild = sel.key in (Key.IIFNAME, Key.OIFNAME, Key.FIB_OIFNAME)
        for element in elements:
            e = element["elem"].get("val") if isinstance(element, dict) and "elem" in element else element
            if isinstance(e, int) and not isinstance(e, bool) and not wild:
                indexes.add(e)
            elif isinstance(e, str) and wild and e.endswith("*") and not e.endswith("\\*"):
                prefixes.add(e[:-1].replace("\\*", "*"))
            elif isinstance(e, str):
                exact.add(e.replace("\\*", "*") if wild else e)
            else:
                raise _NotModelled(expression_name(e))
        return NameSet(frozenset(exact), frozenset(prefixes), frozenset(indexes))
    if sel.key in (Key.SADDR, Key.DADDR, Key.IPSEC_SADDR, Key.IPSEC_DADDR):
        want = 4 if sel.family == AF_INET else 6
        intervals = []
        for e in elements:
            lo, hi, version = _addr_interval(e)
            if version != want:
                raise _NotModelled(f"IPv{version} value for {sel.text}")
            intervals.append((lo, hi))
        return IntervalSet(tuple(intervals), want)
    out: list[tuple[int, int]] = []
    for e in elements:
        val = e["elem"].get("val") if isinstance(e, dict) and "elem" in e else e
        if isinstance(val, dict) and "range" in val:
            out.append((_scalar(sel.key, val["range"][0]), _scalar(sel.key, val["range"][1])))
        elif isinstance(val, dict) and "prefix" in val:
            raise _NotModelled(f"prefix of {sel.text}")
        else:
            x = _scalar(sel.key, val)
            out.append((x, x))
    return IntervalSet(tuple(out))


def _compare(sel: Selector, op: str, right: Any) -> IntervalSet:
    """``< > <= >=`` as the interval they admit."""
    if sel.key in (Key.SADDR, Key.DADDR, Key.IPSEC_SADDR, Key.IPSEC_DADDR):
        lo, hi, version = _addr_interval(right)
        if lo != hi:
            raise _NotModelled(f"operator {op} on a range")
        top = (1 << (32 if version == 4 else 128)) - 1
        bounds, x = (0, top), lo
    elif sel.key in _BOUNDS:
        bounds, x = _BOUNDS[sel.key], _scalar(sel.key, right)
    else:
        raise _NotModelled(f"operator {op} on {sel.text}")
    addresses = (Key.SADDR, Key.DADDR, Key.IPSEC_SADDR, Key.IPSEC_DADDR)
    wanted = (4 if sel.family == AF_INET else 6) if sel.key in addresses else None
    first, last = bounds
    span = {
        "<": (first, x - 1),
        "<=": (first, x),
        ">": (x + 1, last),
        ">=": (x, last),
    }[op]
    return IntervalSet((span,) if span[0] <= span[1] else (), wanted)


def _match(body: Mapping[str, Any], sets: _SetTable, family: str, table: str) -> Expression:
    text = _text({"match": body})
    try:
        special = _special_match(body, sets, family, table, text)
        if special is not None:
            return special
        sel = _selector(body.get("left"))
        op = body.get("op", "==")
        right = body.get("right")
        # "in" is nft's implicit operator: a lookup or equality for every (non-bitmask) key modelled here.
        if op in ("==", "!=", "in"):
            return Match(sel, Op.NE if op == "!=" else Op.EQ, _values(sel, right, sets, family, table), text)
        if op in ("<", "<=", ">", ">="):
            return Match(sel, Op.EQ, _compare(sel, op, right), text)
        raise _NotModelled(f"operator {op!r} on {sel.text}")
    except _NotModelled as exc:
        return UnknownMatch(str(exc), text)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return UnknownMatch(f"malformed match {text}", text)


# ---------------------------------------------------------------------------
# nftables breadth: ct state/status, fib, numgen/hash, concatenations, verdict maps,
# NAT maps, constant mark sets. Each either modelled exactly or _NotModelled by name.

_FIB_TYPES = {
    "unspec": 0, "unicast": 1, "local": 2, "broadcast": 3, "anycast": 4,
    "multicast": 5, "blackhole": 6, "unreachable": 7, "prohibit": 8,
}
_CT_STATES = {"invalid": "INVALID", "established": "ESTABLISHED", "related": "RELATED", "new": "NEW",
              "untracked": "UNTRACKED"}
_CT_STATE_BITS = {1: "INVALID", 2: "ESTABLISHED", 4: "RELATED", 8: "NEW", 64: "UNTRACKED"}
_CT_STATUS = {"expected": "EXPECTED", "seen-reply": "SEEN_REPLY", "assured": "ASSURED",
              "confirmed": "CONFIRMED", "snat": "SRC_NAT", "dnat": "DST_NAT", "dying": "DYING"}
_CT_STATUS_BITS = {1: "EXPECTED", 2: "SEEN_REPLY", 4: "ASSURED", 8: "CONFIRMED", 16: "SRC_NAT",
                   32: "DST_NAT", 512: "DYING"}
# fib flag sets the evaluator answers: the address's type (optionally on the input interface),
# and the reverse-path oif of the source.
_FIB_FLAGS_TYPE = ({"daddr"}, {"daddr", "iif"}, {"saddr"}, {"saddr", "iif"})
_FIB_FLAGS_OIF = ({"saddr"}, {"saddr", "iif"})


def _special_selector(k: str, v: Any, text: str) -> Selector | None:
    """fib, numgen and jhash/symhash as selectors; None for anything else."""
    if not isinstance(v, dict):
        return None
    if k == "fib":
        flags = _flag_list(v.get("flags"))
        result = v.get("result")
        if result == "type" and set(flags) in _FIB_FLAGS_TYPE:
            return Selector(Key.FIB_TYPE, text, params=tuple(sorted(flags)))
        if result in ("oif", "check", "oifname") and set(flags) in _FIB_FLAGS_OIF:
            key = Key.FIB_OIFNAME if result == "oifname" else Key.FIB_OIF
            return Selector(key, text, params=tuple(sorted(flags)))
        raise _NotModelled(f"fib {' . '.join(flags)} {result}")
    if k in ("numgen", "jhash", "symhash"):
        mod, offset = v.get("mod"), v.get("offset", 0)
        if type(mod) is not int or type(offset) is not int or mod <= 0:
            raise _NotModelled(k)
        return Selector(Key.NUMGEN if k == "numgen" else Key.HASH, text, params=(mod, offset))
    return None


def _words(right: Any, names: Mapping[str, str], bits: Mapping[int, str], what: str) -> frozenset[str]:
    items = right if isinstance(right, list) else [right]
    out: set[str] = set()
    for item in items:
        if isinstance(item, str) and item in names:
            out.add(names[item])
            continue
        value = item if isinstance(item, int) and not isinstance(item, bool) else None
        if isinstance(item, str):
            with contextlib.suppress(ValueError):
                value = int(item, 0)
        if value is None or value <= 0:
            raise _NotModelled(f"{what} {item!r}")
        for bit in range(value.bit_length()):
            if value >> bit & 1:
                if 1 << bit not in bits:
                    raise _NotModelled(f"{what} bit {1 << bit:#x}")
                out.add(bits[1 << bit])
    return frozenset(out)


def _unwrap(e: Any) -> Any:
    return e["elem"].get("val") if isinstance(e, dict) and "elem" in e else e


def _lookup_elements(right: Any, sets: _SetTable, family: str, table: str, *, is_map: bool) -> list[Any]:
    """The raw elements of an anonymous set/map or a named one (constant contents only)."""
    if isinstance(right, str) and right.startswith("@"):
        found = sets.get((family, table, right[1:]))
        if found is None:
            raise _NotModelled(f"set {right} (not in the ruleset)")
        if ("map" in found) != is_map:
            raise _NotModelled(f"{'set' if is_map else 'map'} {right}")
        flags = _flag_list(found.get("flags"))
        if "dynamic" in flags or "timeout" in flags:
            raise _NotModelled(f"dynamic set {right}")
        elem = found.get("elem", [])
        return list(elem) if isinstance(elem, list) else [elem]
    if isinstance(right, dict) and "set" in right:
        elem = right["set"]
        return list(elem) if isinstance(elem, list) else [elem]
    if is_map:
        raise _NotModelled("map data")
    return [right]


def _element_key(selectors: tuple[Selector, ...], raw: Any, family: str, table: str) -> ElementKey:
    value = _unwrap(raw)
    parts = value["concat"] if isinstance(value, dict) and "concat" in value else [value]
    if len(parts) != len(selectors):
        raise _NotModelled("concat element of another width")
    return tuple(_values(sel, part, {}, family, table) for sel, part in zip(selectors, parts, strict=True))


def _key_selectors(key: Any) -> tuple[Selector, ...]:
    parts = key["concat"] if isinstance(key, dict) and "concat" in key else [key]
    selectors = tuple(_selector(p) for p in parts)
    if len(selectors) > 1 and any(s.key in (Key.NUMGEN, Key.HASH) for s in selectors):
        raise _NotModelled("numgen/hash in a concatenation")
    return selectors


def _special_match(
    body: Mapping[str, Any], sets: _SetTable, family: str, table: str, text: str
) -> Expression | None:
    """ct state/status, concatenations and fib existence; None where ``_match`` does the rest."""
    left, op, right = body.get("left"), body.get("op", "=="), body.get("right")
    negate = op in ("!=", "!")
    if isinstance(left, dict) and "ct" in left and "dir" not in left["ct"]:
        key = left["ct"].get("key")
        is_set = isinstance(right, dict) and "set" in right
        values = right["set"] if isinstance(right, dict) and is_set else right
        if key == "state" and op in ("==", "in", "!=", "!"):
            # A first packet has exactly one state bit: a flag test and set membership agree.
            return CtStateMatch(_words(values, _CT_STATES, _CT_STATE_BITS, "ct state"), negate, text)
        if key == "status" and not is_set and op in ("in", "!=", "!"):
            return CtStatusMatch(_words(values, _CT_STATUS, _CT_STATUS_BITS, "ct status"), negate, text)
        if key in ("state", "status"):
            raise _NotModelled(f"ct {key} {op} {'set' if is_set else 'value'}")
        return None
    if isinstance(left, dict) and "concat" in left:
        if op not in ("==", "in", "!="):
            raise _NotModelled(f"operator {op!r} on a concatenation")
        selectors = _key_selectors(left)
        raws = _lookup_elements(right, sets, family, table, is_map=False)
        elements = tuple(_element_key(selectors, r, family, table) for r in raws)
        return ConcatMatch(selectors, Op.NE if op == "!=" else Op.EQ, elements, text)
    if isinstance(left, dict) and "fib" in left and isinstance(right, bool):
        sel = _selector(left)
        if sel.key is not Key.FIB_OIF or op not in ("==", "!="):
            raise _NotModelled(f"fib {op} {right}")
        exists = right != (op == "!=")
        return Match(sel, Op.NE if exists else Op.EQ, IntervalSet(((0, 0),)), text)
    return None


def _verdict_of(e: Any) -> Verdict:
    if isinstance(e, dict) and len(e) == 1:
        ((k, v),) = e.items()
        if k in ("accept", "drop", "return", "continue"):
            return Verdict(_VERDICTS[k])
        if k in ("jump", "goto") and isinstance(v, dict) and isinstance(v.get("target"), str):
            return Verdict(_VERDICTS[k], v["target"])
    raise _NotModelled(f"verdict {expression_name(e)}")


def _vmap(v: Any, sets: _SetTable, family: str, table: str) -> VerdictMap | UnknownStatement:
    text = _text({"vmap": v})
    try:
        selectors = _key_selectors(v["key"])
        elements = []
        for raw in _lookup_elements(v["data"], sets, family, table, is_map=True):
            k, d = raw
            elements.append((_element_key(selectors, k, family, table), _verdict_of(d)))
        return VerdictMap(selectors, tuple(elements), text)
    except _NotModelled as exc:
        return UnknownStatement(f"vmap: {exc}", text)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return UnknownStatement("malformed vmap", text)


def _nat_target(d: Any) -> NatTarget:
    d = _unwrap(d)
    parts = d["concat"] if isinstance(d, dict) and "concat" in d else [d]
    if len(parts) not in (1, 2):
        raise _NotModelled("nat map data")
    lo, hi, version = _addr_interval(parts[0])
    make = IPv4Address if version == 4 else IPv6Address
    ports: tuple[int, int] | None = None
    if len(parts) == 2:
        port = parts[1]
        if type(port) is int:
            ports = (port, port)
        elif isinstance(port, dict) and "range" in port and all(type(p) is int for p in port["range"]):
            ports = (port["range"][0], port["range"][1])
        else:
            raise _NotModelled("nat map port")
    return NatTarget((make(lo), make(hi)), ports)


def _nat_lookup(
    kind: NatKind, kind_word: str, body: Mapping[str, Any], *, family: int | None, chain_family: str,
    sets: _SetTable, table: str, text: str,
) -> NatStatement | NatMapStatement:
    """``snat|dnat to numgen ... [offset N]`` and ``snat|dnat [prefix] to KEY map {...}``."""
    addr = body["addr"]
    flags = _flag_list(body.get("flags"))
    type_flags = set(_flag_list(body.get("type_flags")))
    if "port" in body or not type_flags <= {"interval", "concat", "prefix"}:
        raise _NotModelled(f"{kind_word} to {expression_name(addr)}")
    if "map" not in addr:  # numgen/jhash/symhash as the address itself (offset..offset+mod-1)
        sel = _special_selector(next(iter(addr)), next(iter(addr.values())), _text(addr))
        if sel is None or sel.key not in (Key.NUMGEN, Key.HASH) or type_flags:
            raise _NotModelled(f"{kind_word} to {expression_name(addr)}")
        mod, offset = (int(p) for p in sel.params)
        fam = family or _FAMILY_WORDS.get(chain_family)
        if fam is None:
            raise _NotModelled(f"{kind_word} to {expression_name(addr)} without a family")
        make = IPv4Address if fam == AF_INET else IPv6Address
        return NatStatement(kind, text, family, (make(offset), make(offset + mod - 1)), None, tuple(flags))
    selectors = _key_selectors(addr["map"]["key"])
    elements = []
    for raw in _lookup_elements(addr["map"]["data"], sets, chain_family, table, is_map=True):
        k, d = raw
        elements.append((_element_key(selectors, k, chain_family, table), _nat_target(d)))
    versions = {t.addr[0].version for _, t in elements}
    if len(versions) > 1:
        raise _NotModelled(f"{kind_word} map of mixed families")
    if family is None and chain_family == "inet" and versions:
        family = AF_INET if versions == {4} else AF_INET6
    netmap = "netmap" in flags or "prefix" in type_flags
    rest = tuple(f for f in flags if f != "netmap")
    return NatMapStatement(kind, text, family, selectors, tuple(elements), rest, netmap)


def _mark_key(key: Any) -> bool | None:
    """True for the ct mark, False for the packet mark (meta mark), None for anything else."""
    if not isinstance(key, dict):
        return None
    meta, ct = key.get("meta"), key.get("ct")
    if isinstance(meta, dict) and meta.get("key") == "mark":
        return False
    if isinstance(ct, dict) and ct.get("key") == "mark" and "dir" not in ct:
        return True
    return None


def _constant(value: Any) -> int | None:
    constant: int | None = None
    if type(value) is int:
        constant = value
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            constant = int(value, 0)
    return constant if constant is not None and 0 <= constant <= 0xFFFFFFFF else None


def _mark_value(value: Any) -> tuple[bool | None, int, int] | None:
    """A mark value as (source, mask, constant): ``(source & mask) | constant``.

    Source is None for a constant alone, else which mark it reads (as
    ``_mark_key``). Shapes: C; M; M & C; M | C; (M & C1) | C2. None: other.
    """
    full = 0xFFFFFFFF
    constant = _constant(value)
    if constant is not None:
        return None, 0, constant
    source = _mark_key(value)
    if source is not None:
        return source, full, 0
    if not isinstance(value, dict) or len(value) != 1:
        return None
    ((op, args),) = value.items()
    if op not in ("&", "|") or not isinstance(args, list) or len(args) != 2:
        return None
    right = _constant(args[1])
    if right is None:
        return None
    if op == "&":
        left_key = _mark_key(args[0])
        return None if left_key is None else (left_key, right, 0)
    inner = _mark_value(args[0])
    if inner is None or inner[0] is None or inner[2]:
        return None
    return inner[0], inner[1], right


def _mark_set(v: Any) -> MarkSet | MarkCopy | UnknownStatement:
    """``meta mark set`` / ``ct mark set`` a constant, the other mark, or either masked and or-ed.

    ``X set C`` is ``MarkSet``; ``X set X & M | C`` (bits of M kept, C or-ed
    in outside them) is ``MarkSet`` with a mask; ``X set Y [& M]`` copies
    (``MarkCopy``). Anything else is unknown.
    """
    text = _text({"mangle": v})
    body: Mapping[str, Any] = v if isinstance(v, dict) else {}
    target = _mark_key(body.get("key"))
    shape = None if target is None else _mark_value(body.get("value"))
    if target is None or shape is None:
        return UnknownStatement("mangle", text)
    source, mask, constant = shape
    full = 0xFFFFFFFF
    if source is None:
        return MarkSet(constant, full, text, ct=target)
    if source == target:
        # new = (old & mask) | C = (old & ~keep) ^ C, keep the bits C does not force (nft prints
        # "and 0xffffc0ff or 0x200" as "& 0xffffc2ff | 0x200").
        mask &= ~constant
        return MarkSet(constant, ~mask & full, text, ct=target)
    if constant:
        return UnknownStatement("mangle", text)
    return MarkCopy(to_ct=target, text=text, src_mask=mask, dst_mask=full)


# ---------------------------------------------------------------------------
# Statements.


def _nat(
    kind_word: str, v: Any, chain_family: str, sets: _SetTable | None = None, table: str = ""
) -> NatStatement | NatMapStatement | UnknownStatement:
    text = _text({kind_word: v})
    kind = _NAT_KINDS[kind_word]
    body: Mapping[str, Any] = v if isinstance(v, dict) else {}
    try:
        family: int | None = _FAMILY_WORDS.get(body["family"]) if "family" in body else None
        if "family" in body and family is None:
            raise _NotModelled(f"{kind_word} family {body['family']}")
        if isinstance(body.get("addr"), dict) and {"map", "numgen", "jhash", "symhash"} & set(body["addr"]):
            return _nat_lookup(kind, kind_word, body, family=family, chain_family=chain_family,
                               sets=sets or {}, table=table, text=text)
        type_flags = body.get("type_flags")
        if type_flags:
            names = type_flags if isinstance(type_flags, list) else [type_flags]
            raise _NotModelled(f"{kind_word} {' '.join(names)}")
        addr: tuple[IPAddress, IPAddress] | None = None
        if "addr" in body:
            if kind in (NatKind.MASQUERADE, NatKind.REDIRECT):
                raise _NotModelled(f"{kind_word} with an address")
            try:
                lo, hi, version = _addr_interval(body["addr"])
            except _NotModelled as exc:
                raise _NotModelled(f"{kind_word} to {expression_name(body['addr'])}") from exc
            make = IPv4Address if version == 4 else IPv6Address
            addr = (make(lo), make(hi))
            if family is None and chain_family == "inet":
                family = AF_INET if version == 4 else AF_INET6
        elif kind in (NatKind.SNAT, NatKind.DNAT) and "port" not in body:
            raise _NotModelled(f"{kind_word} without an address")
        ports: tuple[int, int] | None = None
        if "port" in body:
            port = body["port"]
            if isinstance(port, int) and not isinstance(port, bool):
                ports = (port, port)
            elif isinstance(port, dict) and "range" in port and all(type(p) is int for p in port["range"]):
                ports = (port["range"][0], port["range"][1])
            else:
                raise _NotModelled(f"{kind_word} to port {expression_name(port)}")
        flags = body.get("flags", [])
        flags = [flags] if isinstance(flags, str) else list(flags)
        if "netmap" in flags:
            raise _NotModelled(f"{kind_word} netmap")
        return NatStatement(kind, text, family, addr, ports, tuple(flags))
    except _NotModelled as exc:
        return UnknownStatement(str(exc), text)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return UnknownStatement(f"malformed {kind_word}", text)


def _expression(e: Any, sets: _SetTable, family: str, table: str) -> Expression:
    """One expression, modelled or unknown by name; a malformed one is unknown too, never an error."""
    try:
        return _expression_of(e, sets, family, table)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RecursionError):
        return UnknownStatement(f"malformed {_name(e)}", _text(e))


def _name(e: Any) -> str:
    try:
        return expression_name(e)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RecursionError):
        return "expression"


def _expression_of(e: Any, sets: _SetTable, family: str, table: str) -> Expression:
    if not isinstance(e, dict) or len(e) != 1:
        return UnknownStatement(expression_name(e), _text(e))
    ((k, v),) = e.items()
    if k == "match" and isinstance(v, dict):
        return _match(v, sets, family, table)
    if k in ("accept", "drop", "return", "continue"):
        return Verdict(_VERDICTS[k])
    if k in ("jump", "goto") and isinstance(v, dict) and isinstance(v.get("target"), str):
        return Verdict(_VERDICTS[k], v["target"])
    if k in _PASSIVE:
        return Passive(k, _text(e))
    if k in _NAT_KINDS:
        return _nat(k, v, family, sets, table)
    if k == "vmap":
        return _vmap(v, sets, family, table)
    if k == "mangle":
        return _mark_set(v)
    if k == "xt" and isinstance(v, dict) and v.get("type") == "match":
        return UnknownMatch(expression_name(e), _text(e))
    return UnknownStatement(expression_name(e), _text(e))


def parse_rule(exprs: Iterable[Any], *, family: str, table: str, handle: int = 0,
               sets: _SetTable | None = None, comment: str | None = None) -> Rule:
    """One rule from its JSON ``expr`` list (also used for nft's ``*.t.json`` test files)."""
    return Rule(handle, tuple(_expression(e, sets or {}, family, table) for e in exprs), comment=comment)


# ---------------------------------------------------------------------------
# The ruleset.


def _flag_list(v: Any) -> list[str]:
    if v is None:
        return []
    return [v] if isinstance(v, str) else [str(x) for x in v]


# Items whose fields the parser reads; any other item (metainfo, element, flowtable, ...) is skipped.
_ITEM_KINDS = frozenset({"table", "chain", "rule", "set", "map"})


def _shown(value: Any) -> str:
    """A mistyped value for an error message: its JSON type and a short rendering."""
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return f"{kinds.get(type(value), type(value).__name__)} {text[:40]}"


class _Item:
    """One ``{"chain": {...}}`` item; its accessors raise ``RulesetError`` naming the item and field."""

    __slots__ = ("body", "index", "kind")

    def __init__(self, kind: str, body: Mapping[str, Any], index: int) -> None:
        self.kind, self.body, self.index = kind, body, index

    def where(self) -> str:
        names = [self.body.get(k) for k in ("family", "table", "chain", "name")]
        words = " ".join(str(n) for n in names if isinstance(n, str))
        return f"item {self.index} ({self.kind}{' ' + words if words else ''})"

    def fail(self, key: str, want: str) -> RulesetError:
        got = _shown(self.body[key]) if key in self.body else "nothing"
        return RulesetError(f"nft JSON: {self.where()}: \"{key}\" must be {want}, got {got}")

    def text(self, key: str, *, optional: bool = False) -> str | None:
        value = self.body.get(key)
        if isinstance(value, str) or (optional and key not in self.body):
            return value
        raise self.fail(key, "a string")

    def name(self, key: str) -> str:
        value = self.text(key)
        assert value is not None
        return value

    def number(self, key: str, default: int | None = None) -> int:
        value = self.body.get(key)
        if key not in self.body and default is not None:
            return default
        if type(value) is int:
            return value
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return int(value)
        raise self.fail(key, "an integer")

    def words(self, key: str) -> list[str]:
        value = self.body.get(key)
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(x, str) for x in value):
            return list(value)
        raise self.fail(key, "a string or a list of strings")


_Key = tuple[str, str, str]  # (family, table, chain or set name)


class _Collected:
    """A document's tables, chains and sets, each item checked as it is added (both readers use it)."""

    def __init__(self) -> None:
        self.dormant: set[tuple[str, str]] = set()
        self.marks_elsewhere = False
        self.chains: dict[_Key, _Item] = {}
        self.sets: dict[_Key, dict[str, Any]] = {}

    def add(self, index: int, raw: Any) -> tuple[str, _Key, _Item] | None:
        """Check item ``index`` and keep it; (kind, key, item) of a kept item, None for one skipped.

        A rule is checked (family, table, chain) but not kept: the caller keeps it.
        """
        if not isinstance(raw, dict) or len(raw) != 1:
            raise RulesetError(f"nft JSON: item {index} must be an object with one key, got {_shown(raw)}")
        ((kind, body),) = raw.items()
        if kind not in _ITEM_KINDS:
            return None
        if not isinstance(body, dict):
            raise RulesetError(f"nft JSON: item {index} ({kind}) must be an object, got {_shown(body)}")
        item = _Item(kind, body, index)
        if kind == "rule":  # the most items: their three names read at once where all are strings
            family, table, chain = body.get("family"), body.get("table"), body.get("chain")
            if type(family) is str and type(table) is str and type(chain) is str and family in FAMILY_AFS:
                return kind, (family, table, chain), item
        family = item.name("family")
        if family not in FAMILY_AFS:
            # arp, bridge, netdev: no NAT here; but a mark set at netdev ingress or in a bridge
            # chain reaches prerouting, and this reader does not follow it.
            if kind == "rule" and not self.marks_elsewhere:
                text = json.dumps(body.get("expr"))
                self.marks_elsewhere = '"mangle"' in text or '"xt"' in text
            return None
        if kind == "table":
            name = item.name("name")
            if "dormant" in item.words("flags"):
                self.dormant.add((family, name))
            return None
        if kind == "chain":
            key = (family, item.name("table"), item.name("name"))
            self.chains[key] = item
            return kind, key, item
        if kind == "rule":
            return kind, (family, item.name("table"), item.name("chain")), item
        item.words("flags")  # read when a rule looks the set up
        set_type = body.get("type")
        if not (set_type is None or isinstance(set_type, str)
                or (isinstance(set_type, list) and all(isinstance(t, str) for t in set_type))
                or (isinstance(set_type, dict) and "typeof" in set_type)):
            raise item.fail("type", 'a string, a list of strings or a {"typeof": ...} object')
        key = (family, item.name("table"), item.name("name"))
        self.sets[key] = body
        return kind, key, item

    def live(self) -> list[_Key]:
        return [k for k in self.chains if (k[0], k[1]) not in self.dormant]


def _is_nat_base(chain: _Item) -> bool:
    return chain.text("type", optional=True) == "nat" and chain.text("hook", optional=True) in _HOOKS


def _is_other_base(chain: _Item) -> bool:
    kind, hook = chain.text("type", optional=True), chain.text("hook", optional=True)
    return kind in ("filter", "route") and hook in _HOOKS


def _rule_of(item: _Item, key: _Key, sets: _SetTable,
             expression: Callable[[Any, str, str], Expression] | None = None) -> Rule:
    """One rule item as a ``Rule``; ``expression`` (memoized) or ``_expression`` reads each expression."""
    exprs = item.body.get("expr", [])
    if not isinstance(exprs, list):
        raise item.fail("expr", "a list")
    handle, comment = item.number("handle", 0), item.text("comment", optional=True)
    family, table = key[0], key[1]
    if expression is None:
        return parse_rule(exprs, family=family, table=table, handle=handle, sets=sets, comment=comment)
    return make_rule(handle, tuple([expression(e, family, table) for e in exprs]), "", comment)


def _jump_targets(rule: Rule) -> list[str]:
    out: list[str] = []
    for expr in rule.exprs:  # the value classes are final: their type is the test (isinstance walks the MRO)
        if type(expr) is Verdict:
            if expr.target is not None:
                out.append(expr.target)
        elif type(expr) is VerdictMap:
            out.extend(d.target for _, d in expr.elements if d.target is not None)
    return out


def _assemble(got: _Collected, wanted: set[_Key], mark_bases: set[_Key],
              rules_of: Callable[[_Key], tuple[Rule, ...]],
              exprs_of: Callable[[_Key], Iterable[object]]) -> NatRuleset:
    """The ruleset: the wanted chains in dump order, base chains with their hooks; the rpfilter families."""
    out: list[Chain] = []
    for key, item in got.chains.items():
        if key not in wanted:
            continue
        base = _is_nat_base(item) or key in mark_bases
        hook = item.text("hook") if base else None
        policy = (item.text("policy", optional=True) or "accept") if base else None
        if policy not in (None, "accept", "drop"):
            raise item.fail("policy", "accept or drop")
        out.append(
            Chain(
                family=key[0],
                table=key[1],
                name=key[2],
                rules=rules_of(key),
                hook=_HOOKS[hook] if hook is not None else None,
                priority=item.number("prio") if base else None,
                type=item.text("type") if base else None,
                policy=policy,
                handle=item.number("handle", 0),
            )
        )
    return NatRuleset(tuple(out), rpfilter=_rpfilter_families(got.chains, exprs_of, got.dormant),
                      marks_known=not got.marks_elsewhere,
                      xt_rpfilter=_rpfilter_families(got.chains, exprs_of, got.dormant,
                                                     drop=_is_xt_rpfilter_drop))


def parse_ruleset_json(doc: dict[str, Any], budget: Budget | None = None) -> NatRuleset:
    """The NAT part of ``nft -j list ruleset`` output, as a decoded document.

    Raises ``RulesetError``, and nothing else, on a document whose structure
    is wrong: not an object with an ``nftables`` list, an item that is not a
    one-key object, or a table, chain, rule, set or map with a field of the
    wrong type (the message names the item and the field). A malformed
    expression inside a rule is not an error: it is unknown by name.

    This is the reference reader: plain, every rule of every chain it walks
    parsed on its own. ``parse_ruleset_output`` reads nft's text faster and
    in less memory, and must agree with it on every document (a test says so).
    ``budget`` counts the rules parsed (progress and a deadline).
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("nftables"), list):
        raise RulesetError("nft JSON: expected an object with an \"nftables\" list")
    got = _Collected()
    rules: dict[_Key, list[_Item]] = {}
    for index, raw in enumerate(doc["nftables"]):
        added = got.add(index, raw)
        if added is not None and added[0] == "rule":
            rules.setdefault(added[1], []).append(added[2])

    parsed: dict[_Key, tuple[Rule, ...]] = {}
    reaches: dict[_Key, set[_Key]] = {}

    def walk(roots: list[_Key]) -> set[_Key]:
        """The chains ``roots`` reach by jump/goto (themselves included), each parsed once."""
        seen: set[_Key] = set()
        todo = list(roots)
        while todo:
            key = todo.pop()
            if key in seen:
                continue
            seen.add(key)
            if key in parsed:
                todo.extend(reaches[key])
                continue
            family, table, _ = key
            chain_rules = []
            targets: set[_Key] = set()
            for item in rules.get(key, []):
                rule = _rule_of(item, key, got.sets)
                if budget is not None:
                    budget.tick()
                chain_rules.append(rule)
                targets.update(t for t in ((family, table, name) for name in _jump_targets(rule))
                               if t in got.chains)
            parsed[key] = tuple(chain_rules)
            reaches[key] = targets
            todo.extend(targets)
        return seen

    # Base nat chains and what they reach by jump/goto, in dump order.
    live = got.live()
    wanted = walk([k for k in live if _is_nat_base(got.chains[k])])
    # Mark chains: other base chains that reach a statement that may set a mark (see core.nat.mark_chains).
    mark_bases: set[_Key] = set()
    for key in (k for k in live if _is_other_base(got.chains[k])):
        reached = walk([key])
        if any(_may_set_mark(e) for k in reached for r in parsed[k] for e in r.exprs):
            mark_bases.add(key)
            wanted |= reached

    def exprs_of(key: _Key) -> Iterator[object]:
        return (item.body.get("expr", []) for item in rules.get(key, []))

    return _assemble(got, wanted, mark_bases, parsed.__getitem__, exprs_of)


# ---------------------------------------------------------------------------
# The fast reader: nft's text item by item, rules parsed only where they matter.


class _Irregular(Exception):
    """The text is not shaped as nft prints it (or not JSON): the reference reader decides."""


_scan = json.JSONDecoder().raw_decode
_WS = re.compile(r"[ \t\n\r]*")  # json's own whitespace
_HEAD = re.compile(r'[ \t\n\r]*\{[ \t\n\r]*"nftables"[ \t\n\r]*:[ \t\n\r]*\[[ \t\n\r]*')
_NEXT = re.compile(r"[ \t\n\r]*(?:(,)[ \t\n\r]*|(\]))")


def _stream(text: str) -> Iterator[tuple[Any, int, int]]:
    """``{"nftables": [ITEM, ...]}`` item by item, each with its start and end (``_scan`` reads it again).

    Only that exact shape (json's whitespace around it) is read here; any other text,
    valid JSON or not, raises ``_Irregular`` (``json.loads`` then reads or refuses it).
    """
    head = _HEAD.match(text)
    if head is None:
        raise _Irregular
    pos = head.end()
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            try:
                raw, end = _scan(text, pos)
            except (ValueError, RecursionError) as exc:
                raise _Irregular from exc
            yield raw, pos, end
            sep = _NEXT.match(text, end)
            if sep is None:
                raise _Irregular
            pos = sep.end()
            if sep.group(1) is None:  # "]": the last item
                break
    pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
    if text[pos:pos + 1] != "}" or _WS.match(text, pos + 1).end() != len(text):  # type: ignore[union-attr]
        raise _Irregular


def _frozen(value: Any) -> Any:
    """A JSON value as a hashable key equal only to its own: types apart (1, 1.0, true), order kept."""
    kind = type(value)
    if kind is str or kind is int or value is None:
        return value
    if kind is dict:
        return ("d", tuple([(k, _frozen(v)) for k, v in value.items()]))
    if kind is list:
        return ("l", tuple([_frozen(v) for v in value]))
    return (kind, value)


def _flat(d: dict[str, Any]) -> tuple[tuple[str, Any], ...] | None:
    """A dict of strings and integers (not booleans) as its items; None for any other dict."""
    for v in d.values():
        kind = type(v)
        if kind is not str and kind is not int:
            return None
    return tuple(d.items())


def _expression_key(e: Any) -> Any:
    """``_frozen(e)``, or a cheaper key as exact for the two shapes most rules are made of.

    ``{"match": {"op", "left": {K: FLAT}, "right": SCALAR}}`` and ``{NAT: FLAT}``:
    their parse reads the inner objects by key, so their key order does not
    matter; a string and an integer never compare equal, and booleans (equal
    to 1 and 0) are not taken here.
    """
    if type(e) is dict and len(e) == 1:
        ((k, v), ) = e.items()
        if type(v) is dict:
            if k == "match" and len(v) == 3:
                op, left, right = v.get("op"), v.get("left"), v.get("right")
                kind = type(right)
                if type(op) is str and (kind is str or kind is int) and type(left) is dict and len(left) == 1:
                    ((lk, lv), ) = left.items()
                    flat = _flat(lv) if type(lv) is dict else None
                    if flat is not None:
                        return ("m", op, lk, flat, right)
            elif k in _NAT_KINDS:
                flat = _flat(v)
                if flat is not None:
                    return ("n", k, flat)
    return _frozen(e)


def _flat_key(k: str, v: Any, family: str, table: str) -> tuple[str | int | None, ...] | None:
    """``(family, table, _expression_key({k: v}))`` as one flat tuple, for the shapes most rules are made of.

    A match ``{"op", "left": {K: {A: B[, C: D]}}, "right": SCALAR}`` and a NAT
    statement ``{A: B[, C: D]}``, every value a string or an integer (not a
    boolean): what ``_expression_key`` takes by the same checks, written out
    flat (no nested tuples to build and hash for each expression). Two
    expressions with equal keys parse alike: the keys hold every string and
    integer of both, in order, and the position of each (a one-key object
    leaves its second pair None, which no string or integer equals). None:
    another shape, which the general key takes.
    """
    if type(v) is not dict:
        return None
    if k == "match":
        if len(v) != 3:
            return None
        op, left, right = v.get("op"), v.get("left"), v.get("right")
        kind = type(right)
        if type(op) is not str or not (kind is str or kind is int) or type(left) is not dict \
                or len(left) != 1:
            return None
        ((lk, inner),) = left.items()
        head: str = "m"
    elif k in _NAT_KINDS:
        inner, head, op, lk, right = v, k, None, None, None
    else:
        return None
    if type(inner) is not dict:
        return None
    if len(inner) == 1:
        ((a, b),) = inner.items()
        c = d = None
    elif len(inner) == 2:
        ((a, b), (c, d)) = inner.items()
        if type(d) is not str and type(d) is not int:
            return None
    else:
        return None
    if type(b) is not str and type(b) is not int:
        return None
    return (family, table, head, op, lk, a, b, c, d, right)


def _quick(e: Any, sets: _SetTable, family: str, table: str) -> Expression | None:
    """``_expression(e)`` for the plainest matches and NAT statements, rendered directly; else None.

    Only shapes whose every step is the general one's are taken: a match
    ``{"op", "left": meta KEY | payload PROTO FIELD, "right": string | integer}``
    whose selector is modelled, and ``snat|dnat`` to one address string with
    at most an integer port, in an ip or ip6 chain. The text is built from
    the selector's (the left side's rendering) as ``_render_match`` and
    ``_render_nat`` build it; values, statements and failures come from the
    same functions as in the general path. Anything odd: None, and the
    general path decides.
    """
    try:
        ((k, v), ) = e.items()
        if type(v) is not dict:
            return None
        if k == "match":
            return _quick_match(v, sets, family, table)
        if k in ("snat", "dnat") and family in _FAMILY_WORDS:
            return _quick_nat(k, v)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        pass
    return None


def _quick_match(v: dict[str, Any], sets: _SetTable, family: str, table: str) -> Expression | None:
    if len(v) != 3:
        return None
    op, left, right = v.get("op"), v.get("left"), v.get("right")
    kind = type(right)
    if op not in ("==", "!=", "in") or not (kind is str or kind is int) or type(left) is not dict \
            or len(left) != 1:
        return None
    ((lk, lv), ) = left.items()
    if type(lv) is not dict:
        return None
    if lk == "meta":
        key = lv.get("key")
        if len(lv) != 1 or type(key) is not str or key not in _META_KEYS:
            return None
        quote = key in _BARE_META
    elif lk == "payload":
        if len(lv) != 2 or type(lv.get("protocol")) is not str or type(lv.get("field")) is not str:
            return None
        quote = False
    else:
        return None
    try:
        sel = _selector(left)
    except _NotModelled:
        return None
    if isinstance(right, str):
        shown = f'"{right}"' if quote and not right.startswith("@") else right
    else:
        shown = str(right)
    text = f"{sel.text} {shown}" if op == "==" else f"{sel.text} {op} {shown}"
    try:
        values = _scalar_values(sel, right)
        if values is None:
            values = _values(sel, right, sets, family, table)
        return make_match(sel, _NE if op == "!=" else _EQ, values, text)
    except _NotModelled as exc:
        return UnknownMatch(str(exc), text)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return UnknownMatch(f"malformed match {text}", text)


_EQ, _NE = Op.EQ, Op.NE  # an Enum member read through its class is a lookup each time
_WILD_KEYS = (Key.IIFNAME, Key.OIFNAME, Key.FIB_OIFNAME)
_INDEX_KEYS = (Key.IIF, Key.OIF)
_ADDRESS_KEYS = (Key.SADDR, Key.DADDR, Key.IPSEC_SADDR, Key.IPSEC_DADDR)
_NOT_INTEGERS = (*_WILD_KEYS, *_INDEX_KEYS, *_ADDRESS_KEYS, Key.NFPROTO)  # an integer means more, or fails


def _scalar_values(sel: Selector, right: Any) -> IntervalSet | NameSet | None:
    """``_values(sel, right, ...)`` for a name, an address or an integer, the usual right sides; else None.

    Only what ``_values`` reads without a word of its own: a name for an
    interface key, an address of the selector's family, an integer (not a
    boolean) for a key that is no ``meta nfproto``. Anything else (a set,
    another type, an error to word): None, and ``_values`` decides.
    """
    key, kind = sel.key, type(right)
    if kind is str and not right.startswith("@"):
        if key in _WILD_KEYS:
            if right.endswith("*") and not right.endswith("\\*"):
                return make_names(prefixes=frozenset({right[:-1].replace("\\*", "*")}))
            return make_names(frozenset({right.replace("\\*", "*")}))
        if key in _INDEX_KEYS:
            return make_names(frozenset({right}))
        if key in _ADDRESS_KEYS:
            try:
                value, version = _address(right)
            except ValueError:
                return None
            want = 4 if sel.family == AF_INET else 6
            return make_interval(value, value, want) if version == want else None
    elif kind is int and key not in _NOT_INTEGERS:
        return make_interval(right, right)
    return None


def _quick_nat(k: str, v: dict[str, Any]) -> Expression | None:
    addr = v.get("addr")
    port = v.get("port")
    if type(addr) is not str or not (len(v) == 1 or (len(v) == 2 and type(port) is int)):
        return None
    target = addr if port is None else (f"[{addr}]" if ":" in addr else addr) + f":{port}"
    text = f"{k} to {target}"
    try:
        lo, hi, version = _addr_interval(addr)
    except _NotModelled:
        return UnknownStatement(f"{k} to {expression_name(addr)}", text)
    make = IPv4Address if version == 4 else IPv6Address
    try:
        ports = None if port is None else (port, port)
        first = make(lo)
        return make_nat(_NAT_KINDS[k], text, None, (first, first if hi == lo else make(hi)), ports)
    except ValueError:
        return UnknownStatement(f"malformed {k}", text)


# What a deferred rule's expressions say without parsing them: its jump/goto targets, whether
# it must be parsed to know more (a verdict map's targets, a mangle or NAT statement, a bad
# field), and whether it may set a mark (``_may_set_mark`` of its parsed expressions).
_Summary = tuple[tuple[str, ...], bool, bool]
_PLAIN: _Summary = ((), False, False)
_PARSE: _Summary = ((), True, False)
_PASSIVES = {k: Passive(k, k) for k in _PASSIVE}
_PARSE_KEYS = frozenset({"vmap", "mangle", *_NAT_KINDS})  # what ``_expression`` makes of any counter or log


def _summary(item: _Item) -> _Summary:
    exprs = item.body.get("expr", [])
    if not isinstance(exprs, list):
        return _PARSE
    try:
        item.number("handle", 0)
        item.text("comment", optional=True)
    except RulesetError:
        return _PARSE
    targets: list[str] = []
    mark = False
    for e in exprs:
        if not isinstance(e, dict) or len(e) != 1:
            continue  # unknown by its type's name: no target, no mark
        ((k, v),) = e.items()
        if k in ("jump", "goto"):
            if isinstance(v, dict) and isinstance(v.get("target"), str):
                targets.append(v["target"])
        elif k in _PARSE_KEYS:
            return _PARSE
        elif k.startswith(("mangle", "xt")) and not (k == "xt" and isinstance(v, dict)
                                                     and v.get("type") == "match"):
            mark = True  # an unknown statement by that name (an xt match is a match)
    return (tuple(targets), False, mark) if targets or mark else _PLAIN


# One rule as the fast reader keeps it: its offset in the text, the rule (parsed as it was read, in
# a nat base chain, or known from the last read) or its summary, and its item's digest.
_Record = tuple[int, Rule | None, _Summary | None, bytes]


class _LastRead:
    """What the last fast read made of each rule item, by the item's text: a re-read parses what changed.

    ``rules`` maps the BLAKE2b digest of a rule item's exact JSON text to the
    ``Rule`` made of it (None where it was only summarized), its summary, and
    the digest of its table's sets and maps as they were (a rule that looks a
    set up means something else once the set changed). Identical text and
    identical sets give an identical rule, so it is reused as it is: on a
    re-read after one rule was added, 50k rules are decoded, not parsed, and
    the new ruleset shares them with the old. Replaced whole by each read
    that succeeds; a read that fails leaves it.
    """

    rules: ClassVar[dict[bytes, tuple[Rule | None, _Summary | None, bytes]]] = {}


def _digest(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


class _FastReader:
    """``parse_ruleset_json`` over nft's text, with the same answer, faster and leaner.

    - Items are decoded one at a time (``_stream``): the whole document never
      exists as objects at once. A rule is kept as its offset in the text.
    - Rules of nat base chains are parsed as they are read; any other rule is
      summarized (``_summary``) and parsed only if its chain turns out to be
      wanted: reached from a nat chain, or a mark chain. A large filter table
      costs its decoding, not its parsing.
    - Equal expressions of one table are parsed once and shared (``_frozen``
      keys): the ``iifname "wan0"`` of 10,000 rules is one object.
    - A rule whose item text (and its table's sets) the last read saw is
      that read's ``Rule`` again (``_LastRead``): a re-read parses only what
      changed, and the old and new rulesets share the rest.
    - Anything unexpected (another order of items, a field of the wrong
      type) raises, and ``parse_ruleset_output`` lets the reference decide.
    """

    def __init__(self, text: str, mark: bool, budget: Budget) -> None:
        self.text, self.mark, self.budget = text, mark, budget
        # Byte offsets are character offsets in an ASCII text (nft's, but for odd names and comments).
        self.blob = memoryview(text.encode("ascii")) if text.isascii() else None
        self.last = _LastRead.rules
        self.set_digests: dict[tuple[str, str], bytes] = {}
        self.got = _Collected()
        self.records: dict[_Key, list[_Record]] = {}
        self.memo: dict[Any, Expression] = {}
        self.flat_memo: dict[tuple[str | int | None, ...], Expression] = {}  # by ``_flat_key``
        self.nat_bases: set[_Key] = set()
        self.parsed_tables: set[tuple[str, str]] = set()  # tables with a rule parsed as it was read
        self.rules: dict[_Key, tuple[Rule, ...]] = {}
        self.reaches: dict[_Key, set[_Key]] = {}

    def read(self) -> NatRuleset:
        got, tick = self.got, self.budget.tick
        for index, (raw, start, end) in enumerate(_stream(self.text)):
            added = got.add(index, _mark_item(raw) if self.mark else raw)
            if added is None:
                continue
            kind, key, item = added
            if kind == "rule":
                digest = self._digest(start, end)
                table = (key[0], key[1])
                known = self.last.get(digest)
                same = known is not None and known[2] == self.set_digests.get(table, b"")
                rule, summary = (known[0], known[1]) if known is not None and same else (None, None)
                if rule is None and key in self.nat_bases:
                    rule = _rule_of(item, key, got.sets, self._expression)
                elif rule is None and summary is None:
                    summary = _summary(item)
                if rule is not None:
                    self.parsed_tables.add(table)
                self.records.setdefault(key, []).append((start, rule, summary, digest))
                tick()
            elif kind == "chain":
                hook = item.body.get("hook")
                if item.body.get("type") == "nat" and isinstance(hook, str) and hook in _HOOKS:
                    self.nat_bases.add(key)
                else:
                    self.nat_bases.discard(key)
            else:
                table = (key[0], key[1])
                if table in self.parsed_tables:
                    raise _Irregular  # a set after rules that may use it were parsed
                self.set_digests[table] = _digest(self.set_digests.get(table, b"") + self._digest(start, end))
        self.budget.check()  # every item read

        live = got.live()
        wanted = self._walk([k for k in live if _is_nat_base(got.chains[k])])
        mark_bases: set[_Key] = set()
        for key in (k for k in live if _is_other_base(got.chains[k])):
            reached = self._walk([key])
            if any(self._may_set_mark(k) for k in reached):
                mark_bases.add(key)
                wanted |= reached
        ruleset = _assemble(got, wanted, mark_bases, self._rules, self._exprs)
        _LastRead.rules = self._remembered()
        return ruleset

    def _digest(self, start: int, end: int) -> bytes:
        if self.blob is not None:
            return _digest(self.blob[start:end])
        return _digest(self.text[start:end].encode("utf-8", "surrogatepass"))

    def _remembered(self) -> dict[bytes, tuple[Rule | None, _Summary | None, bytes]]:
        out: dict[bytes, tuple[Rule | None, _Summary | None, bytes]] = {}
        for key, records in self.records.items():
            parsed = self.rules.get(key)
            sets = self.set_digests.get((key[0], key[1]), b"")
            for i, (_, rule, summary, digest) in enumerate(records):
                out[digest] = (rule if rule is not None or parsed is None else parsed[i], summary, sets)
        return out

    def _expression(self, e: Any, family: str, table: str) -> Expression:
        if type(e) is dict and len(e) == 1:
            ((k, v),) = e.items()
            passive = _PASSIVES.get(k)
            if passive is not None:
                return passive
            flat = _flat_key(k, v, family, table)
            if flat is not None:
                found = self.flat_memo.get(flat)
                if found is None:
                    found = self.flat_memo[flat] = (_quick(e, self.got.sets, family, table)
                                                    or _expression(e, self.got.sets, family, table))
                return found
        try:
            key = (family, table, _expression_key(e))
        except RecursionError:
            return _expression(e, self.got.sets, family, table)
        found = self.memo.get(key)
        if found is None:
            found = _quick(e, self.got.sets, family, table) or _expression(e, self.got.sets, family, table)
            self.memo[key] = found
        return found

    def _item(self, start: int) -> _Item:
        raw, _ = _scan(self.text, start)
        if self.mark:
            raw = _mark_item(raw)
        return _Item("rule", raw["rule"], -1)

    def _rule(self, key: _Key, record: _Record) -> Rule:
        if record[1] is not None:
            return record[1]
        self.budget.tick()
        return _rule_of(self._item(record[0]), key, self.got.sets, self._expression)

    def _rules(self, key: _Key) -> tuple[Rule, ...]:
        found = self.rules.get(key)
        if found is None:
            found = self.rules[key] = tuple(self._rule(key, r) for r in self.records.get(key, ()))
        return found

    def _targets(self, key: _Key) -> set[_Key]:
        found = self.reaches.get(key)
        if found is None:
            names: list[str] = []
            for record in self.records.get(key, ()):
                summary = record[2]
                if summary is None or summary[1]:
                    names.extend(_jump_targets(self._rule(key, record)))
                else:
                    names.extend(summary[0])
            family, table = key[0], key[1]
            found = {t for t in ((family, table, n) for n in names) if t in self.got.chains}
            self.reaches[key] = found
        return found

    def _walk(self, roots: list[_Key]) -> set[_Key]:
        seen: set[_Key] = set()
        todo = list(roots)
        while todo:
            key = todo.pop()
            if key not in seen:
                seen.add(key)
                todo.extend(self._targets(key))
        return seen

    def _may_set_mark(self, key: _Key) -> bool:
        for record in self.records.get(key, ()):
            summary = record[2]
            if summary is None or summary[1]:
                if any(_may_set_mark(e) for e in self._rule(key, record).exprs):
                    return True
            elif summary[2]:
                return True
        return False

    def _exprs(self, key: _Key) -> Iterator[object]:
        return (self._item(record[0]).body.get("expr", []) for record in self.records.get(key, ()))


def _may_set_mark(expr: object) -> bool:
    """A mark statement, or a statement that is not understood (it may set one: ``xt`` MARK, maps)."""
    return isinstance(expr, MarkSet | MarkCopy) or (
        isinstance(expr, UnknownStatement) and (expr.expression.startswith(("mangle", "xt")))
    )


# Expressions that neither end a chain nor jump: a rule made only of these lets every packet on.
_PASSING_EXPRS = frozenset({"counter", "log", "mangle", "match", "limit", "quota", "continue", "notrack"})


def _is_rpfilter_drop(exprs: object) -> bool:
    """``fib saddr . iif oif missing [counter] drop``: a reverse-path drop (strict, mark 0)."""
    if not isinstance(exprs, list):
        return False
    keys = [next(iter(e)) for e in exprs if isinstance(e, dict) and len(e) == 1]
    if len(keys) != len(exprs) or keys[-1:] != ["drop"]:
        return False
    matches = [e["match"] for e in exprs if "match" in e]
    if len(matches) != 1 or any(k not in ("match", "counter", "log", "drop") for k in keys):
        return False
    match = matches[0]
    if not isinstance(match, dict):
        return False
    fib = match.get("left", {}).get("fib") if isinstance(match.get("left"), dict) else None
    return (
        isinstance(fib, dict)
        and fib.get("result") == "oif"
        and isinstance(fib.get("flags"), list)
        and sorted(fib["flags"]) == ["iif", "saddr"]
        and match.get("op") in ("==", None)
        and match.get("right") in (False, 0, "0", "missing")
    )


def _is_xt_rpfilter_drop(exprs: object) -> bool:
    """iptables-nft's ``-m rpfilter ... -j DROP`` (its options are not in the dump)."""
    if not isinstance(exprs, list) or not all(isinstance(e, dict) and len(e) == 1 for e in exprs):
        return False
    keys = [next(iter(e)) for e in exprs]
    xts = [e["xt"] for e in exprs if "xt" in e]
    return (keys[-1:] == ["drop"] and len(xts) == 1 and isinstance(xts[0], dict)
            and xts[0].get("type") == "match" and xts[0].get("name") == "rpfilter"
            and all(k in ("xt", "counter", "drop") for k in keys))


def _rpfilter_families(
    chains: Mapping[tuple[str, str, str], _Item],
    exprs_of: Callable[[tuple[str, str, str]], Iterable[object]],
    dormant: set[tuple[str, str]],
    drop: Callable[[object], bool] | None = None,
) -> frozenset[int]:
    """The families where a prerouting filter chain drops every packet that fails the reverse path.

    Only a drop that every packet reaches counts: the chain's rules before it
    may count, log or set marks, but none may end the chain (accept, a jump,
    a verdict map, ...) for some packets. ``exprs_of`` gives a chain's rules'
    ``expr`` values in order (read lazily: the first rule that ends the chain stops it).
    """
    found: set[int] = set()
    for key, chain in chains.items():
        if (key[0], key[1]) in dormant or chain.text("hook", optional=True) != "prerouting":
            continue
        if chain.text("type", optional=True) != "filter":
            continue
        for exprs in exprs_of(key):
            if (drop or _is_rpfilter_drop)(exprs):
                found.update(FAMILY_AFS[key[0]])
                break
            if not isinstance(exprs, list) or not all(
                isinstance(e, dict) and len(e) == 1 and next(iter(e)) in _PASSING_EXPRS for e in exprs
            ):
                break
    return frozenset(found)


def run_ruleset_tool(
    argv: list[str],
    runner: Callable[[list[str]], subprocess.CompletedProcess[str]],
    *,
    timeout: float,
    missing: str,
) -> str:
    """A ruleset dumper's output (``nft -j``, ``iptables-save``), its failures as our errors.

    ``runner`` runs ``argv`` (with ``timeout``); ``missing`` is the message when
    the program is not installed. A refusal for want of privilege is a
    ``PermissionDenied``, anything else a ``RulesetError`` naming the command.
    """
    try:
        proc = runner(argv)
    except FileNotFoundError as exc:
        raise MissingTool(missing) from exc
    except PermissionError as exc:
        raise PermissionDenied(f"cannot run {argv[0]}: {exc.strerror}") from exc
    except subprocess.TimeoutExpired as exc:
        raise RulesetError(f"{' '.join(argv)} did not answer within {timeout:.0f} s") from exc
    except OSError as exc:  # EMFILE, ENOMEM, ...: this read fails, the next one tries again
        raise RulesetError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
    if proc.returncode != 0:
        message = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[0]
        if "Operation not permitted" in proc.stderr or "Permission denied" in proc.stderr:
            raise PermissionDenied(f"{' '.join(argv)}: {message} (needs CAP_NET_ADMIN)")
        raise RulesetError(f"{' '.join(argv)} failed: {message}")
    return proc.stdout


def _run_nft(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return run_tool(argv, timeout=NFT_TIMEOUT)


def read_ruleset(nft: str = "nft", progress: Callable[[], None] | None = None) -> NatRuleset:
    """Run ``nft -j list ruleset`` in the current namespace and parse it.

    ``progress`` is called after each step (nft answered, its items read, and
    every ``bulkparse.STEP`` rules); a parse longer than ``PARSE_TIMEOUT`` fails.
    """
    argv = [nft, "-j", "list", "ruleset"]
    stdout = run_ruleset_tool(argv, _run_nft, timeout=NFT_TIMEOUT,
                              missing=f"{nft} not found: install nftables to read the ruleset")
    if progress is not None:
        progress()
    return parse_ruleset_output(stdout, " ".join(argv), progress)


def parse_ruleset_output(
    stdout: str, command: str = "nft -j list ruleset", progress: Callable[[], None] | None = None,
    *, timeout: float | None = PARSE_TIMEOUT,
) -> NatRuleset:
    """``nft -j list ruleset`` output as text: a ruleset, or ``RulesetError`` naming ``command``.

    The fast reader (``_FastReader``) reads it; a text it does not expect
    (not nft's shape, an error anywhere) goes to the reference reader, which
    reads it or words the error. Either runs with the cyclic collector paused
    and within ``timeout`` seconds (``bulkparse.ParseTooSlow`` past it).
    """
    if not stdout.strip():
        return NatRuleset(marks_known=True)  # nothing at all: no chain sets a mark either
    budget = Budget(progress, timeout)
    mark = not stdout.isascii() and undecodable(stdout)
    with gc_paused():
        try:
            return _FastReader(stdout, mark, budget).read()
        except ParseTooSlow:
            raise
        except (_Irregular, RulesetError, RecursionError):
            pass  # the reference reader decides, and words any error
        try:
            doc = json.loads(stdout)
        except json.JSONDecodeError as exc:
            raise RulesetError(f"{command}: output is not JSON ({exc.msg} at line {exc.lineno})") from exc
        except RecursionError as exc:
            raise RulesetError(f"{command}: output is nested too deeply to read") from exc
        budget.check()
        if mark:
            doc = mark_undecodable(doc)
        return parse_ruleset_json(doc, budget)


def mark_undecodable(doc: Any) -> Any:
    """``doc`` with each rule expression that holds bytes nft printed as non-UTF-8 made unknown.

    ``nft`` output is decoded with surrogate escapes (``topowatch.text``); an
    expression holding one (an interface name, a set element) cannot be
    compared reliably, so it becomes ``{"undecodable": ...}``, which no
    modelled expression reads: the rule is unknown, never "no NAT". A rule's
    comment does not matter and is kept.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("nftables"), list):
        return doc
    return {**doc, "nftables": [_mark_item(raw) for raw in doc["nftables"]]}


def _mark_item(raw: Any) -> Any:
    """One item of the ``nftables`` list as ``mark_undecodable`` leaves it."""
    body = raw.get("rule") if isinstance(raw, dict) and len(raw) == 1 else None
    if isinstance(body, dict) and isinstance(body.get("expr"), list):
        exprs = [{"undecodable": e} if _holds_undecodable(e) else e for e in body["expr"]]
        return {"rule": {**body, "expr": exprs}}
    return raw


def _holds_undecodable(value: Any) -> bool:
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, str):
            if undecodable(item):
                return True
        elif isinstance(item, dict):
            todo.extend(item.keys())
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
    return False
