# SPDX-License-Identifier: GPL-2.0-or-later
"""Read the iptables nat tables (nft and legacy, IPv4 and IPv6) into the same ``NatRuleset`` as nftables.

What this module decides: which nat chains iptables contributes to the
ruleset and what each rule means, in the IR of ``core.nat``. What it must
never do: change a table, guess an option it does not model, or touch a
namespace other than the current one. It never instantiates a legacy table
(``iptables-legacy-save -t nat`` would register the nat hooks, and so start
connection tracking): a legacy table is read only if
``/proc/net/ip{,6}_tables_names`` lists it.

Theory of operation:
- ``parse_save`` is pure: it reads iptables-save / iptables-restore text (or
  ``iptables -t nat -A ...`` command lines, or a fragment of ``-A`` lines) and
  returns the nat table's base chains at their hooks with iptables' nat
  priorities (``PREROUTING``/``OUTPUT`` at dstnat -100, ``POSTROUTING``/
  ``INPUT`` at srcnat 100) and every user chain they reach. A fragment is
  completed with the table's base chains (policy ACCEPT).
- every option is either modelled exactly (a ``Match``, an ``XtMatch``, a
  NAT statement, a mark set, a verdict) or kept as ``UnknownMatch``/
  ``UnknownStatement`` naming it (``-m statistic``, ``-j TPROXY``,
  ``--ctexpire``, an unknown base option such as ``-z``); the rest of the
  rule, its target included, is still read, so a rule with an unknown part
  is unknown, never "no NAT". A rule line that cannot be read at all (shlex
  cannot split it) stays in its chain as an ``UnknownStatement``: a flow that
  reaches it is unknown. Commands that change a chain in ways not modelled
  (``-D``, ``-R``, and an unreadable ``-F``/``-P``) make that chain unknown
  from its first rule. A rule with several ``-s``/``-d`` addresses becomes one
  rule per address pair, as iptables itself expands it.
- the lines iptables-save prints most (``-A CHAIN [-s/-d/-i/-o/-p] [-m
  tcp|udp ports] [-m comment] -j TARGET [options]``) are matched whole by
  ``_FAST_LINE`` (or by its compiled twin ``_ctscan.iptables_line``, which
  must take exactly the lines it takes, with the same groups) and their rules
  built from the parts by the same readers; a line of any other shape, or a
  part that reading whole does not take, is read word by word. Both give the
  same rules (tests/edges/test_iptables_fast.py).
- ``read_all_rulesets`` reads nftables (``nft -j``) and iptables together:
  an nft ``ip nat``/``ip6 nat`` table holding xt expressions is iptables-nft's
  and is taken from ``iptables-nft-save`` instead (nft shows xt matches
  without their options); legacy tables are added as table ``nat[legacy]``.
  A missing or failing tool is reported, never fatal.
- ``-m set`` is resolved against the kernel's ipsets (``ipset save``) into
  address matches; a set that cannot be read is unknown by name. The read
  says which sets the reached rules name (``RulesetRead.sets``) and what it
  saw of them (``set_contents``): ipsets change without any event, so
  ``edges.nftevents.IpsetPoll`` watches exactly those (``read_named_ipsets``).

Chains at the same hook and priority run in registration order, which no dump
shows: nft chains are listed first, legacy ones after, and the evaluator
answers unknown where their order would change a flow's binding.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, ip_address, ip_network
from typing import Any

from topowatch.core.flow import PROTO_NUMBERS, NatKind
from topowatch.core.model import AF_INET, AF_INET6, IPAddress
from topowatch.core.nat import (
    AddrTypeMatch,
    AnyOf,
    Chain,
    CtStateMatch,
    CtStatusMatch,
    CtTupleMatch,
    Expression,
    Hook,
    IntervalSet,
    IntervalsTwin,
    Key,
    MarkCopy,
    MarkSet,
    Match,
    MatchTwin,
    NameSet,
    NatRuleset,
    NatStatement,
    NatTwin,
    NetmapStatement,
    Op,
    Passive,
    PolicyElement,
    PolicyMatch,
    Rule,
    RuleTwin,
    Selector,
    SelectorTwin,
    UnknownMatch,
    UnknownStatement,
    Verdict,
    VerdictKind,
    make_interval,
    make_match,
    make_nat,
    make_rule,
)
from topowatch.edges import ctcodec
from topowatch.edges.bulkparse import Budget, gc_paused
from topowatch.edges.nft import PARSE_TIMEOUT, read_ruleset, run_ruleset_tool
from topowatch.errors import MissingTool, PermissionDenied, RulesetError
from topowatch.text import run_tool, undecodable

log = logging.getLogger("topowatch.iptables")

SAVE_TIMEOUT = 15.0  # as nft.NFT_TIMEOUT: a hanging tool fails its read, not the daemon
LEGACY_TABLE = "nat[legacy]"

# Base chains of the nat table: hook and priority (NF_IP_PRI_NAT_DST / NF_IP_PRI_NAT_SRC).
BASE_CHAINS: dict[str, tuple[Hook, int]] = {
    "PREROUTING": (Hook.PREROUTING, -100),
    "INPUT": (Hook.INPUT, 100),
    "OUTPUT": (Hook.OUTPUT, -100),
    "POSTROUTING": (Hook.POSTROUTING, 100),
}
# Base chains of the mangle table (NF_IP_PRI_MANGLE): read for the marks they set before NAT and routing.
MANGLE_CHAINS: dict[str, tuple[Hook, int]] = {
    "PREROUTING": (Hook.PREROUTING, -150),
    "INPUT": (Hook.INPUT, -150),
    "FORWARD": (Hook.FORWARD, -150),
    "OUTPUT": (Hook.OUTPUT, -150),
    "POSTROUTING": (Hook.POSTROUTING, -150),
}
_TABLE_CHAINS = {"nat": BASE_CHAINS, "mangle": MANGLE_CHAINS}

_PROTOS = {**PROTO_NUMBERS, "ipv6-icmp": 58, "icmp6": 58, "icmpv6": 58, "ah": 51, "ipip": 4, "ipv6": 41,
           "mh": 135, "ipv6-mh": 135}
_PORT_MODULES = {"tcp": 6, "udp": 17, "sctp": 132, "dccp": 33, "udplite": 136}
# Targets that neither decide nor touch a mark or an address (mangle's TCPMSS, DSCP, ... included).
_PASSIVE_TARGETS = frozenset({"LOG", "NFLOG", "ULOG", "TRACE", "AUDIT", "TCPMSS", "DSCP", "TOS", "TTL", "HL",
                              "CLASSIFY", "CHECKSUM"})
_CT_STATES = frozenset({"NEW", "ESTABLISHED", "RELATED", "INVALID", "UNTRACKED", "SNAT", "DNAT"})
_CT_STATUSES = frozenset({"NONE", "EXPECTED", "SEEN_REPLY", "ASSURED", "CONFIRMED"})
_ADDR_TYPES = frozenset({"UNSPEC", "UNICAST", "LOCAL", "BROADCAST", "ANYCAST", "MULTICAST", "BLACKHOLE",
                         "UNREACHABLE", "PROHIBIT", "THROW", "NAT", "XRESOLVE"})
_MARK_FULL = 0xFFFFFFFF


class _NotModelled(Exception):
    """An option we do not model; the message is its name ("-m statistic")."""


# ---------------------------------------------------------------------------
# ipsets


@dataclass(frozen=True, slots=True)
class IpSet:
    """One ipset as ``ipset save`` shows it: its type, family and members (``nomatch`` ones apart)."""

    name: str
    type: str
    family: int
    members: tuple[str, ...] = ()
    nomatch: tuple[str, ...] = ()


def parse_ipset_save(text: str) -> dict[str, IpSet]:
    """``ipset save`` output: ``create NAME TYPE family inet ...`` and ``add NAME MEMBER [nomatch]`` lines."""
    creates: dict[str, tuple[str, int]] = {}
    members: dict[str, list[str]] = {}
    nomatch: dict[str, list[str]] = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] == "create":
            family = AF_INET6 if "inet6" in words[3:] else AF_INET
            creates[words[1]] = (words[2], family)
        elif len(words) >= 3 and words[0] == "add":
            (nomatch if "nomatch" in words[3:] else members).setdefault(words[1], []).append(words[2])
    return {
        name: IpSet(name, kind, family, tuple(members.get(name, ())), tuple(nomatch.get(name, ())))
        for name, (kind, family) in creates.items()
    }


# ---------------------------------------------------------------------------
# Values


def _number(word: str) -> bool:
    """ASCII digits that ``int()`` reads (``str.isdigit`` also takes "²", and int() refuses 5,000 digits)."""
    return word.isascii() and word.isdigit() and len(word) <= 20


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError as exc:
        raise _NotModelled(f"value {text!r}") from exc


def _mark(text: str) -> tuple[int, int]:
    value, _, mask = text.partition("/")
    return _int(value), _int(mask) if mask else _MARK_FULL


def _proto(text: str) -> int | None:
    """A protocol number; None for ``all``."""
    word = text.lower()
    if word in ("all", "0"):
        return None
    if word in _PROTOS:
        return _PROTOS[word]
    if _number(word) and int(word) <= 0xFF:
        return int(word)
    raise _NotModelled(f"-p {text}")


def _port(text: str) -> int:
    if _number(text) and int(text) <= 0xFFFF:
        return int(text)
    try:
        import socket

        return socket.getservbyname(text)
    except (OSError, ValueError) as exc:  # ValueError: a NUL or a surrogate in the name
        raise _NotModelled(f"port {text!r}") from exc


def _port_range(text: str, sep: str = ":") -> tuple[int, int]:
    if sep in text:
        lo, _, hi = text.partition(sep)
        return (_port(lo) if lo else 0, _port(hi) if hi else 0xFFFF)
    p = _port(text)
    return (p, p)


def _version(family: int) -> int:
    return 4 if family == AF_INET else 6


def _quad_span(text: str) -> tuple[int, int] | None:
    """A dotted quad or ``quad/len`` (the usual IPv4 address) as an interval; None for anything else."""
    addr, slash, bits = text.partition("/")
    quad = _quad(addr)
    if quad is None:
        return None
    if slash and not (len(bits) <= 2 and bits.isascii() and bits.isdigit() and int(bits) <= 32):
        return None
    mask = (0xFFFFFFFF << (32 - int(bits or 32))) & 0xFFFFFFFF
    return quad & mask, quad | (~mask & 0xFFFFFFFF)


@functools.lru_cache(maxsize=4096)
def _addr_interval(text: str, family: int) -> tuple[int, int]:
    """An address or ``addr/len`` or ``addr/mask`` as an interval; hostnames are not resolved."""
    if family == AF_INET:
        span = _quad_span(text)
        if span is not None:
            return span
    try:
        net = ip_network(text, strict=False)
    except ValueError as exc:
        raise _NotModelled(f"address {text!r} (hostname or bad address)") from exc
    if net.version != _version(family):
        raise _NotModelled(f"IPv{net.version} address {text} in an IPv{_version(family)} table")
    return int(net.network_address), int(net.broadcast_address)


def _quad(text: str) -> int | None:
    """A dotted quad as ``ip_address`` reads one (``inet_pton`` is as strict), else None."""
    try:
        return int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    except (OSError, ValueError):  # ValueError: an embedded NUL
        return None


@functools.lru_cache(maxsize=4096)
def _address(text: str, family: int) -> IPAddress:
    quad = _quad(text) if family == AF_INET else None
    if quad is not None:
        return IPv4Address(quad)
    try:
        addr = ip_address(text.strip("[]"))
    except ValueError as exc:
        raise _NotModelled(f"address {text!r}") from exc
    if addr.version != _version(family):
        raise _NotModelled(f"IPv{addr.version} address {text} in an IPv{_version(family)} table")
    return addr


def _nat_range(text: str, family: int) -> tuple[tuple[IPAddress, IPAddress] | None, tuple[int, int] | None]:
    """``a[-b][:p[-q]]``, ``[v6][-[v6]]:p``, ``:p`` -> (address range, port range)."""
    addr_text, port_text = text, ""
    if family == AF_INET6:
        if text.startswith("["):
            close = text.rindex("]")
            addr_text, rest = text[: close + 1], text[close + 1:]
            if rest.startswith(":"):
                port_text = rest[1:]
            elif rest:
                raise _NotModelled(f"NAT range {text!r}")
        elif text.startswith(":"):
            addr_text, port_text = "", text[1:]
    elif ":" in text:
        addr_text, _, port_text = text.partition(":")
    addr: tuple[IPAddress, IPAddress] | None = None
    if addr_text:
        lo_text, sep, hi_text = addr_text.partition("-")
        lo = _address(lo_text, family)
        hi = _address(hi_text, family) if sep else lo
        if int(hi) < int(lo):
            raise _NotModelled(f"NAT range {text!r}")
        addr = (lo, hi)
    ports = _port_range(port_text, "-") if port_text else None
    return addr, ports


# ---------------------------------------------------------------------------
# Tokens into options


@dataclass
class _Option:
    name: str
    args: list[str]
    invert: bool


@dataclass
class _Module:
    name: str
    options: list[_Option] = field(default_factory=list)


@dataclass
class _ParsedRule:
    chain: str
    sources: list[tuple[str, bool]] = field(default_factory=list)  # (address, invert)
    dests: list[tuple[str, bool]] = field(default_factory=list)
    base: list[Expression] = field(default_factory=list)
    modules: list[_Module] = field(default_factory=list)
    proto: int | None = None
    target: _Module | None = None
    goto: bool = False


_BASE_SHORT = {
    "--source": "-s", "--src": "-s", "--destination": "-d", "--dst": "-d", "--in-interface": "-i",
    "--out-interface": "-o", "--protocol": "-p", "--match": "-m", "--jump": "-j", "--goto": "-g",
    "--fragment": "-f", "--set-counters": "-c", "--ipv4": "-4", "--ipv6": "-6",
}


def _options(tokens: Sequence[str], start: int) -> tuple[list[_Option], int]:
    """Long options with their arguments from ``start`` until a short option; ``!`` before or after a name."""
    out: list[_Option] = []
    i = start
    invert = False
    while i < len(tokens):
        tok = tokens[i]
        if tok == "!":
            invert = True
            i += 1
            continue
        if not tok.startswith("--") or _BASE_SHORT.get(tok):
            break
        i += 1
        args: list[str] = []
        opt_invert = invert
        invert = False
        while i < len(tokens) and not (tokens[i].startswith("-") and len(tokens[i]) > 1
                                       and not tokens[i][1].isdigit()):
            if tokens[i] == "!":
                if i + 1 < len(tokens) and tokens[i + 1].startswith("-") and not tokens[i + 1][1:2].isdigit():
                    break  # "! --next-option"
                opt_invert = True
            else:
                args.append(tokens[i])
            i += 1
        out.append(_Option(tok, args, opt_invert))
    return out, i


def _tokens_to_rule(chain: str, tokens: Sequence[str], family: int) -> _ParsedRule:
    rule = _ParsedRule(chain)
    i = 0
    invert = False
    implicit: _Module | None = None
    while i < len(tokens):
        tok = _BASE_SHORT.get(tokens[i], tokens[i])
        if tok == "!":
            invert = True
            i += 1
            continue
        arg = tokens[i + 1] if i + 1 < len(tokens) else ""
        if tok in ("-s", "-d"):
            target = rule.sources if tok == "-s" else rule.dests
            target.extend((a, invert) for a in arg.split(","))
            i += 2
        elif tok in ("-i", "-o"):
            rule.base.append(_iface(tok, arg, invert))
            i += 2
        elif tok == "-p":
            proto = _proto_or_unknown(arg, invert, rule)
            if proto is not None and not invert:
                rule.proto = proto
            i += 2
        elif tok == "-f":
            rule.base.append(UnknownMatch("-f", "! -f" if invert else "-f"))
            i += 1
        elif tok in ("-4", "-6"):
            i += 1
        elif tok == "-c":
            i += 3
        elif tok == "-m":
            module = _Module(arg)
            module.options, i = _options(tokens, i + 2)
            rule.modules.append(module)
            implicit = None
        elif tok in ("-j", "-g"):
            rule.target = _Module(arg)
            rule.goto = tok == "-g"
            rule.target.options, i = _options(tokens, i + 2)
        elif tok.startswith("--"):
            # An option of the protocol's implicit match (``-p tcp --dport 80``).
            if implicit is None:
                implicit = _Module(f"implicit:{rule.proto}")
                rule.modules.append(implicit)
            opts, j = _options(tokens, i - (1 if invert else 0))
            implicit.options.extend(opts)
            i = max(j, i + 1)
        else:
            # A base option we do not know: unknown, with the arguments that follow it. The rest of
            # the rule (its target too) is read on, so the rule's outcome is unknown, not "no NAT".
            j = i + 1
            while j < len(tokens) and tokens[j] != "!" and not tokens[j].startswith("-"):
                j += 1
            words = ["!"] * invert + list(tokens[i:j])
            rule.base.append(UnknownMatch(f"option {tokens[i]}", " ".join(_quote(w) for w in words)))
            i = j
        if tok != "!":
            invert = False
    return rule


def _proto_or_unknown(arg: str, invert: bool, rule: _ParsedRule) -> int | None:
    text = f"{'! ' if invert else ''}-p {arg}"
    try:
        proto = _proto(arg)
    except _NotModelled as exc:
        rule.base.append(UnknownMatch(str(exc), text))
        return None
    if proto is None:
        if invert:
            rule.base.append(Match(Selector(Key.L4PROTO, "-p"), Op.EQ, IntervalSet(()), text))
        return None
    rule.base.append(Match(Selector(Key.L4PROTO, "-p"), Op.NE if invert else Op.EQ,
                           IntervalSet(((proto, proto),)), text))
    return proto


@functools.lru_cache(maxsize=1024)
def _iface(tok: str, name: str, invert: bool) -> Match:
    key = Key.IIFNAME if tok == "-i" else Key.OIFNAME
    text = f"{'! ' if invert else ''}{tok} {name}"
    if name.endswith("+"):
        values = NameSet(prefixes=frozenset({name[:-1]}))
    else:
        values = NameSet(exact=frozenset({name}))
    return Match(Selector(key, tok), Op.NE if invert else Op.EQ, values, text)


# ---------------------------------------------------------------------------
# Match modules


def _opt_text(module: str, o: _Option) -> str:
    words = ([f"-m {module}"] if module and not module.startswith("implicit") else [])
    words += (["!"] if o.invert else []) + [o.name, *(_quote(a) for a in o.args)]
    return " ".join(words)


def _one_arg(o: _Option) -> str:
    if len(o.args) != 1:
        raise _NotModelled(f"{o.name} with {len(o.args)} arguments")
    return o.args[0]


def _ports_match(key: Key, proto: int | None, values: IntervalSet, invert: bool, text: str) -> Match:
    return Match(Selector(key, text, proto=proto), Op.NE if invert else Op.EQ, values, text)


def _port_module(name: str, proto: int | None, opts: list[_Option]) -> list[Expression]:
    out: list[Expression] = []
    for o in opts:
        text = _opt_text(name, o)
        try:
            if o.name in ("--sport", "--source-port", "--dport", "--destination-port"):
                key = Key.SPORT if o.name in ("--sport", "--source-port") else Key.DPORT
                out.append(_ports_match(key, proto, IntervalSet((_port_range(_one_arg(o)),)), o.invert, text))
            else:
                raise _NotModelled(f"{'-m ' + name if not name.startswith('implicit') else '-p'} {o.name}")
        except _NotModelled as exc:
            out.append(UnknownMatch(str(exc), text))
    return out


def _multiport(proto: int | None, opts: list[_Option]) -> list[Expression]:
    out: list[Expression] = []
    for o in opts:
        text = _opt_text("multiport", o)
        ranges = IntervalSet(tuple(_port_range(p) for p in _one_arg(o).split(",")))
        if o.name in ("--sports", "--source-ports"):
            out.append(_ports_match(Key.SPORT, proto, ranges, o.invert, text))
        elif o.name in ("--dports", "--destination-ports"):
            out.append(_ports_match(Key.DPORT, proto, ranges, o.invert, text))
        elif o.name == "--ports":
            either = (_ports_match(Key.SPORT, proto, ranges, False, text),
                      _ports_match(Key.DPORT, proto, ranges, False, text))
            if o.invert:
                # ! --ports: neither port is in the set (xt_multiport inverts the whole match).
                out.extend(_ports_match(m.selector.key, proto, ranges, True, text) for m in either)
            else:
                out.append(AnyOf(either, text))
        else:
            raise _NotModelled(f"-m multiport {o.name}")
    return out


def _mark_match(module: str, key: Key, opts: list[_Option]) -> list[Expression]:
    out: list[Expression] = []
    for o in opts:
        if o.name != "--mark":
            raise _NotModelled(f"-m {module} {o.name}")
        value, mask = _mark(_one_arg(o))
        text = _opt_text(module, o)
        sel = Selector(key, text, mask=None if mask == _MARK_FULL else mask)
        out.append(Match(sel, Op.NE if o.invert else Op.EQ, IntervalSet(((value, value),)), text))
    return out


def _words(arg: str, allowed: frozenset[str], what: str) -> frozenset[str]:
    words = frozenset(w.upper() for w in arg.split(","))
    bad = words - allowed
    if bad:
        raise _NotModelled(f"{what} {','.join(sorted(bad))}")
    return words


def _conntrack(module: str, opts: list[_Option], family: int) -> list[Expression]:
    out: list[Expression] = []
    for o in opts:
        text = _opt_text(module, o)
        try:
            if o.name in ("--ctstate", "--state"):
                out.append(CtStateMatch(_words(_one_arg(o), _CT_STATES, o.name), o.invert, text))
            elif o.name == "--ctstatus":
                out.append(CtStatusMatch(_words(_one_arg(o), _CT_STATUSES, o.name), o.invert, text))
            elif o.name in ("--ctorigsrc", "--ctorigdst"):
                values = IntervalSet((_addr_interval(_one_arg(o), family),), _version(family))
                out.append(CtTupleMatch(o.name[4:], values, o.invert, text))
            elif o.name in ("--ctorigsrcport", "--ctorigdstport"):
                out.append(CtTupleMatch(o.name[4:], IntervalSet((_port_range(_one_arg(o)),)), o.invert, text))
            elif o.name == "--ctproto":
                proto = _proto(_one_arg(o))
                values = IntervalSet(((0, 0xFF),)) if proto is None else IntervalSet(((proto, proto),))
                out.append(CtTupleMatch("proto", values, o.invert, text))
            elif o.name == "--ctdir":
                # nat chains see the first packet: it travels in the original direction.
                # As a state set: ORIGINAL is "any state" (true), REPLY "no state" (false).
                original = _one_arg(o).upper() == "ORIGINAL"
                out.append(CtStateMatch(frozenset({"NEW"}) if original else frozenset(), o.invert, text))
            else:
                raise _NotModelled(f"-m {module} {o.name}")
        except _NotModelled as exc:
            out.append(UnknownMatch(str(exc), text))
    return out


def _addrtype(opts: list[_Option]) -> list[Expression]:
    out: list[Expression] = []
    limit: str | None = None
    for o in opts:
        if o.name in ("--limit-iface-in", "--limit-iface-out"):
            limit = o.name.rsplit("-", 1)[1]
    for o in opts:
        if o.name in ("--src-type", "--dst-type"):
            types = _words(_one_arg(o), _ADDR_TYPES, f"-m addrtype {o.name}")
            out.append(AddrTypeMatch(o.name[2:5], types, o.invert, _opt_text("addrtype", o), limit))
        elif o.name not in ("--limit-iface-in", "--limit-iface-out"):
            raise _NotModelled(f"-m addrtype {o.name}")
    return out


def _policy(opts: list[_Option], family: int) -> list[Expression]:
    direction = pol = None
    strict = False
    elements: list[PolicyElement] = []
    current: dict[str, object] = {}
    negated: set[str] = set()

    def close() -> None:
        if current or negated:
            elements.append(PolicyElement(**current, negated=frozenset(negated)))  # type: ignore[arg-type]
        current.clear()
        negated.clear()

    for o in opts:
        if o.name == "--dir":
            direction = _one_arg(o)
        elif o.name == "--pol":
            pol = _one_arg(o)
        elif o.name == "--strict":
            strict = True
        elif o.name == "--next":
            close()
        elif o.name in ("--reqid", "--spi", "--proto", "--mode", "--tunnel-src", "--tunnel-dst"):
            key = o.name[2:].replace("-", "_")
            arg = _one_arg(o)
            if key in ("reqid", "spi"):
                current[key] = _int(arg)
            elif key == "proto":
                current[key] = _proto(arg)
            elif key == "mode":
                if arg not in ("tunnel", "transport"):
                    raise _NotModelled(f"-m policy --mode {arg}")
                current[key] = arg
            else:
                _addr_interval(arg, family)  # checks the family
                current[key] = ip_network(arg, strict=False)
            if o.invert:
                negated.add(key)
        else:
            raise _NotModelled(f"-m policy {o.name}")
    close()
    if direction not in ("in", "out") or pol not in ("ipsec", "none"):
        raise _NotModelled("-m policy without --dir in|out and --pol ipsec|none")
    text = " ".join(_opt_text("policy", o) if i == 0 else _opt_text("", o) for i, o in enumerate(opts))
    return [PolicyMatch(direction, pol, tuple(elements), strict, text)]


def _set_match(opts: list[_Option], family: int, ipsets: Mapping[str, IpSet] | None) -> list[Expression]:
    out: list[Expression] = []
    for o in opts:
        text = _opt_text("set", o)
        if o.name.startswith(("--packets-", "--bytes-")):
            out.append(UnknownMatch(f"-m set {o.name}", text))
            continue
        if o.name in ("--return-nomatch", "--update-counters", "--update-subcounters"):
            continue
        if o.name not in ("--match-set", "--set"):
            raise _NotModelled(f"-m set {o.name}")
        if len(o.args) != 2:
            raise _NotModelled("-m set --match-set without NAME FLAGS")
        name, flags = o.args
        found = (ipsets or {}).get(name)
        if found is None:
            out.append(UnknownMatch(f"-m set --match-set {name} (set not readable)", text))
            continue
        dims = flags.split(",")
        single = found.type in ("hash:ip", "hash:net", "bitmap:ip")
        if not single or len(dims) != 1 or dims[0] not in ("src", "dst"):
            out.append(UnknownMatch(f"-m set --match-set {name} ({found.type} {flags})", text))
            continue
        if found.nomatch:
            out.append(UnknownMatch(f"-m set --match-set {name} (nomatch entries)", text))
            continue
        if found.family != family:
            out.append(UnknownMatch(f"-m set --match-set {name} (set of the other family)", text))
            continue
        intervals = []
        for entry in found.members:
            member = entry.split(",")[0]
            if "-" in member and "/" not in member:
                lo_text, hi_text = member.split("-", 1)
                intervals.append((int(_address(lo_text, family)), int(_address(hi_text, family))))
            else:
                intervals.append(_addr_interval(member, family))
        key = Key.SADDR if dims[0] == "src" else Key.DADDR
        values = IntervalSet(tuple(intervals), _version(family))
        out.append(Match(Selector(key, text, family=family), Op.NE if o.invert else Op.EQ, values, text))
    return out


def _iprange(opts: list[_Option], family: int) -> list[Expression]:
    out: list[Expression] = []
    for o in opts:
        if o.name not in ("--src-range", "--dst-range"):
            raise _NotModelled(f"-m iprange {o.name}")
        lo_text, _, hi_text = _one_arg(o).partition("-")
        lo, hi = _address(lo_text, family), _address(hi_text or lo_text, family)
        key = Key.SADDR if o.name == "--src-range" else Key.DADDR
        text = _opt_text("iprange", o)
        values = IntervalSet(((int(lo), int(hi)),), _version(family))
        out.append(Match(Selector(key, text, family=family), Op.NE if o.invert else Op.EQ, values, text))
    return out


def _module(
    m: _Module, rule: _ParsedRule, family: int, ipsets: Mapping[str, IpSet] | None
) -> list[Expression]:
    name = m.name
    try:
        if name.startswith("implicit:"):
            proto = rule.proto
            if proto not in _PORT_MODULES.values():
                raise _NotModelled(f"-p {proto} options {' '.join(o.name for o in m.options)}")
            return _port_module(name, proto, m.options)
        if name in _PORT_MODULES:
            return _port_module(name, _PORT_MODULES[name], m.options)
        if name == "multiport":
            return _multiport(rule.proto, m.options)
        if name == "mark":
            return _mark_match("mark", Key.MARK, m.options)
        if name == "connmark":
            return _mark_match("connmark", Key.CT_MARK, m.options)
        if name in ("conntrack", "state"):
            return _conntrack(name, m.options, family)
        if name == "addrtype":
            return _addrtype(m.options)
        if name == "policy":
            return _policy(m.options, family)
        if name == "set":
            return _set_match(m.options, family, ipsets)
        if name == "iprange":
            return _iprange(m.options, family)
        if name == "comment":
            return []
        raise _NotModelled(f"-m {name}")
    except _NotModelled as exc:
        text = " ".join(_opt_text(name, o) for o in m.options) or f"-m {name}"
        return [UnknownMatch(str(exc), text)]
    except (ValueError, IndexError) as exc:
        return [UnknownMatch(f"-m {name} (malformed: {exc})", f"-m {name}")]


# ---------------------------------------------------------------------------
# Targets


def _target(rule: _ParsedRule, family: int, chains: set[str]) -> list[Expression]:
    t = rule.target
    if t is None:
        return []
    name = t.name
    opts = {o.name: o for o in t.options}
    text = " ".join([f"-{'g' if rule.goto else 'j'} {name}", *(_opt_text("", o) for o in t.options)])
    try:
        if rule.goto:
            return [Verdict(VerdictKind.GOTO, name, text)]
        if name in ("ACCEPT", "RETURN", "DROP"):
            return [Verdict(VerdictKind[name], None, text)]
        if name in chains:
            return [Verdict(VerdictKind.JUMP, name, text)]
        flags = tuple(o[2:] for o in opts if o in ("--random", "--random-fully", "--persistent"))
        unknown_opts = [o for o in opts if o not in ("--random", "--random-fully", "--persistent",
                                                     "--to-ports", "--to-source", "--to-destination", "--to")]
        if name in ("MASQUERADE", "REDIRECT", "SNAT", "DNAT", "NETMAP") and unknown_opts:
            raise _NotModelled(f"-j {name} {unknown_opts[0]}")
        if name in ("MASQUERADE", "REDIRECT"):
            ports = _port_range(_one_arg(opts["--to-ports"]), "-") if "--to-ports" in opts else None
            kind = NatKind.MASQUERADE if name == "MASQUERADE" else NatKind.REDIRECT
            return [NatStatement(kind, text, family, None, ports, flags)]
        if name in ("SNAT", "DNAT"):
            key = "--to-source" if name == "SNAT" else "--to-destination"
            given = [o for o in t.options if o.name == key]
            if len(given) != 1 or len(given[0].args) != 1:
                raise _NotModelled(f"-j {name} with {len(given)} {key} ranges")
            addr, ports = _nat_range(given[0].args[0], family)
            kind = NatKind.SNAT if name == "SNAT" else NatKind.DNAT
            if addr is None and kind is NatKind.SNAT:
                raise _NotModelled(f"-j {name} without an address")
            return [NatStatement(kind, text, family, addr, ports, flags)]
        if name == "NETMAP":
            net = ip_network(_one_arg(opts["--to"]), strict=False)
            if net.version != _version(family):
                raise _NotModelled(f"-j NETMAP to IPv{net.version} in an IPv{_version(family)} table")
            return [NetmapStatement(net, text)]
        if name in ("MARK", "CONNMARK"):
            return [_mark_target(name, t.options, text)]
        if name in _PASSIVE_TARGETS:
            return [Passive(name, text)]
        raise _NotModelled(f"-j {name}")
    except _NotModelled as exc:
        return [UnknownStatement(str(exc), text)]
    except (KeyError, ValueError, IndexError) as exc:
        return [UnknownStatement(f"-j {name} (malformed: {exc})", text)]


def _mark_target(name: str, opts: list[_Option], text: str) -> MarkSet | MarkCopy:
    words = {o.name for o in opts}
    if name == "CONNMARK" and words & {"--save-mark", "--restore-mark"}:
        return _connmark_copy(opts, text)
    if len(opts) != 1:
        raise _NotModelled(f"-j {name} with {len(opts)} options")
    o = opts[0]
    ct = name == "CONNMARK"
    if o.name == "--set-xmark":
        value, mask = _mark(_one_arg(o))
        return MarkSet(value, mask, text, ct)
    if o.name == "--set-mark":
        value, mask = _mark(_one_arg(o))
        return MarkSet(value, (mask | value) & _MARK_FULL, text, ct)
    if o.name == "--and-mark":
        return MarkSet(0, ~_int(_one_arg(o)) & _MARK_FULL, text, ct)
    if o.name == "--or-mark":
        value = _int(_one_arg(o))
        return MarkSet(value, value, text, ct)
    if o.name == "--xor-mark":
        return MarkSet(_int(_one_arg(o)), 0, text, ct)
    raise _NotModelled(f"-j {name} {o.name}")


def _connmark_copy(opts: list[_Option], text: str) -> MarkCopy:
    """``CONNMARK --save-mark|--restore-mark [--nfmask N] [--ctmask C] [--mask M]`` (xt_connmark).

    Restore: mark = (mark & ~nfmask) ^ (ctmark & ctmask); save: ctmark =
    (ctmark & ~ctmask) ^ (mark & nfmask). A shift is not modelled.
    """
    nfmask = ctmask = _MARK_FULL
    save = False
    for o in opts:
        if o.name in ("--save-mark", "--restore-mark"):
            save = o.name == "--save-mark"
        elif o.name == "--nfmask":
            nfmask = _int(_one_arg(o))
        elif o.name == "--ctmask":
            ctmask = _int(_one_arg(o))
        elif o.name == "--mask":
            nfmask = ctmask = _int(_one_arg(o))
        else:
            raise _NotModelled(f"-j CONNMARK {o.name}")
    if save:
        return MarkCopy(to_ct=True, text=text, src_mask=nfmask, dst_mask=ctmask)
    return MarkCopy(to_ct=False, text=text, src_mask=ctmask, dst_mask=nfmask)


# ---------------------------------------------------------------------------
# The common line shapes, read without splitting them into words
#
# iptables-save prints most NAT rules in a few shapes: ``-A CHAIN [-s A] [-d A]
# [-i IF] [-o IF] [-p P] [-m tcp|udp [--sport N] [--dport N]] [-m comment
# --comment C] [-j TARGET [--option [ARG ...]] ...]``, one space between words,
# no word quoted but the comment, no ``!``. Such a line is matched whole by
# ``_FAST_LINE`` (in ``_read_lines``) and kept as its groups; ``_fast_rules``
# builds from it exactly the rules the word-by-word path (``_rules``) builds,
# the same functions reading each part, and hands anything else (a user chain
# named like a NAT target, a long option the word path would read as a base
# option, a port range) to that path. A word in the shapes holds only
# printable ASCII without quotes or backslashes, so the words are the line's
# own and the rule's text is the line (its comment quoted as ``_quote`` would).

_WORD = r"[\x21\x23-\x26\x28-\x5b\x5d-\x7e]"  # printable ASCII but space, quotes and backslash
_ARG = rf"[\x23-\x26\x28-\x2c\x2e-\x5b\x5d-\x7e]{_WORD}*+"  # a word not starting with "-" or "!"
# Possessive (*+): no repetition here can give anything back to what follows it (a space, a quote, the end).
# An optional part is written ``(?:PART|)``, not ``(?:PART)?``: the same strings and groups, but the
# regex engine tries an alternative for much less than it repeats a group (a third of the line's time).
# Groups: the line (the match is full), chain, -s, -d, -i, -o, -p, the port module whole ("-m tcp --dport
# 80"), its name, --sport, --dport, the comment, the target whole ("-j DNAT --to-destination ..."), its
# name, its options: ``groups()`` is the line's tuple (``_FastGroups``) as the compiled reader gives it.
_FAST_LINE = re.compile(
    rf"(-A ({_ARG})(?: -s ({_ARG})|)(?: -d ({_ARG})|)(?: -i ({_ARG})|)(?: -o ({_ARG})|)(?: -p ({_ARG})|)"
    r"(?: (-m (tcp|udp)(?: --sport ([0-9]{1,5})|)(?: --dport ([0-9]{1,5})|))|)"
    rf"(?: -m comment --comment (\"(?:[^\"\\'!-][^\"\\']*+|)\"|{_ARG})|)"
    rf"(?: (-j ({_ARG})((?: --[a-z][a-z-]*+(?: {_ARG})*+)*+))|)"
    r")"
)
# A line _FAST_LINE matched: its groups (the first one the line itself).
_FastGroups = tuple[str, str, str | None, str | None, str | None, str | None, str | None, str | None,
                    str | None, str | None, str | None, str | None, str | None, str | None, str | None]


def _fast_groups_py(line: str) -> _FastGroups | None:
    """``_FAST_LINE.fullmatch(line)``'s groups; the reference of the compiled reader (``_read_lines`` runs it
    inline)."""
    m = _FAST_LINE.fullmatch(line)
    return None if m is None else m.groups()  # type: ignore[return-value]  # 15 groups, (str | None)


def _compiled_line_reader() -> Callable[[str], _FastGroups | None] | None:
    """``_ctscan.iptables_line`` (edges/_ctscan.c): ``_fast_groups_py`` without the regex engine and its
    match objects. None where the extension is not loaded (``ctcodec._ctscan``: not built, or
    TOPOWATCH_PURE_PYTHON is set) or is older than this function."""
    reader: Callable[[str], _FastGroups | None] | None = getattr(ctcodec._ctscan, "iptables_line", None)
    return reader


# What _read_lines reads the lines with (looked up on each call: tests replace it).
_fast_groups: Callable[[str], _FastGroups | None] = _compiled_line_reader() or _fast_groups_py
_PORT_KEYS = {"tcp": 6, "udp": 17}
_EQ, _DPORT = Op.EQ, Key.DPORT  # an Enum member read through its class costs a lookup each time
_NAT_TARGETS = {"SNAT": (NatKind.SNAT, " --to-source "), "DNAT": (NatKind.DNAT, " --to-destination ")}
_MISSING: Any = object()
_new = object.__new__
_inet_pton, _from_bytes = socket.inet_pton, int.from_bytes


@functools.lru_cache(maxsize=256)
def _fast_proto(arg: str) -> tuple[int | None, tuple[Expression, ...]]:
    """``-p ARG`` as ``_tokens_to_rule`` reads it: the rule's protocol and the base expressions it adds."""
    parsed = _ParsedRule("")
    proto = _proto_or_unknown(arg, False, parsed)
    return proto, tuple(parsed.base)


@functools.lru_cache(maxsize=1024)
def _point(value: int) -> IntervalSet:
    return make_interval(value, value)


def _fast_ports(whole: str, module: str, sport: str | None, dport: str | None,
                family: int) -> tuple[Expression, ...]:
    """``-m tcp|udp [--sport N] [--dport N]`` (``whole``): one match per option, as ``_port_module`` does."""
    number = _PORT_KEYS[module]
    if sport is None and dport is not None and (port := int(dport)) <= 0xFFFF:  # the usual one
        # make_match(make_selector(...), _point(port), ...), inline (core.nat's twins): a match with
        # an IntervalSet on a port key, which Match takes as it is.
        selector = _new(SelectorTwin)
        selector.key = _DPORT
        selector.text = whole
        selector.family = None
        selector.proto = number
        selector.mask = None
        selector.direction = None
        selector.spnum = 0
        selector.params = ()
        selector.__class__ = Selector
        match = _new(MatchTwin)
        match.selector = selector
        match.op = _EQ
        match.values = _point(port)  # shared, as the other ports' matches below
        match.text = whole
        match.__class__ = Match
        return (match,)
    out: list[Expression] = []
    for key, flag, value in ((Key.SPORT, "--sport", sport), (Key.DPORT, "--dport", dport)):
        if value is None:
            continue
        port = int(value)
        if port > 0xFFFF:  # what the word path makes of it (an unknown match)
            given = (("--sport", sport), ("--dport", dport))
            opts = [_Option(f, [v], False) for f, v in given if v is not None]
            return tuple(_module(_Module(module, opts), _ParsedRule(""), family, None))
        text = f"-m {module} {flag} {value}"
        out.append(Match(Selector(key, text, None, number), Op.EQ, _point(port), text))
    return tuple(out)


def _fast_target(whole: str, name: str, options: str, family: int,
                 chains: set[str]) -> tuple[Expression, ...] | None:
    """``-j NAME OPTIONS`` (``whole``) as ``_target`` reads it; None: the word path reads it otherwise."""
    nat = _NAT_TARGETS.get(name)
    if nat is not None and name not in chains:
        kind, flag = nat
        arg = options[len(flag):]
        if options.startswith(flag) and arg and " " not in arg:
            if family == AF_INET:
                addr_text, colon, port_text = arg.partition(":")  # a.b.c.d[:port], the usual one
                try:
                    quad = _from_bytes(_inet_pton(AF_INET, addr_text), "big")  # _quad(addr_text), inline
                except (OSError, ValueError):  # ValueError: an embedded NUL
                    quad = None
                if quad is not None and (not colon or (len(port_text) <= 5 and port_text.isascii()
                                                       and port_text.isdigit() and int(port_text) <= 0xFFFF)):
                    # make_nat(kind, whole, family, (addr, addr), ports), inline (core.nat's twins):
                    # SNAT or DNAT to one address, a port inside 0-65535.
                    one = IPv4Address(quad)
                    port = int(port_text) if colon else None
                    nat_statement = _new(NatTwin)
                    nat_statement.kind = kind
                    nat_statement.text = whole
                    nat_statement.family = family
                    nat_statement.addr = (one, one)
                    nat_statement.ports = None if port is None else (port, port)
                    nat_statement.flags = ()
                    nat_statement.__class__ = NatStatement
                    return (nat_statement,)
            try:
                addr, ports = _nat_range(arg, family)
                if addr is not None or name == "DNAT":
                    return (make_nat(kind, whole, family, addr, ports),)
            except (_NotModelled, ValueError, IndexError):
                pass  # the general reader says how
    opts: list[_Option] = []
    for word in options.split(" ")[1:] if options else ():
        if word.startswith("--"):
            if word in _BASE_SHORT:
                return None  # ``-j X --jump Y``: the word path ends the target there
            opts.append(_Option(word, [], False))
        else:
            opts[-1].args.append(word)
    return tuple(_target(_ParsedRule("", target=_Module(name, opts)), family, chains))


# What each part of the lines read whole read to, by its words (in one table's parse): -s, -i, -o,
# -p, the port module and the target; an absent part (None) reads to no expression.
_FastMemo = tuple[dict[str | None, tuple[Expression, ...]], dict[str | None, tuple[Expression, ...]],
                  dict[str | None, tuple[Expression, ...]], dict[str | None, tuple[Expression, ...]],
                  dict[str | None, tuple[Expression, ...]], dict[str | None, tuple[Expression, ...] | None]]


def _fast_memo() -> _FastMemo:
    return {None: ()}, {None: ()}, {None: ()}, {None: ()}, {None: ()}, {None: ()}


def _fast_rules(  # noqa: PLR0917 - the hot path: positional
    groups: _FastGroups, family: int, chains: set[str], handle: int, memo: _FastMemo, out: list[Rule],
) -> bool:
    """Append the rule(s) of a line ``_fast_groups`` took (its groups) to ``out``, as ``_rules`` reads it.

    False (nothing appended): read it word by word. ``memo`` (``_fast_memo``) keeps what
    each part read to; the chains are those of one table, so a part's words say it all.
    """
    (text, _chain, src, dst, iif, oif, proto_arg, ports, module, sport, dport, comment, jump, target,
     options) = groups
    by_src, by_iif, by_oif, by_proto, by_ports, by_jump = memo
    e_target = by_jump.get(jump, _MISSING)
    if e_target is _MISSING:
        assert jump is not None and target is not None and options is not None  # None is in the memo
        e_target = by_jump[jump] = _fast_target(jump, target, options, family, chains)
    if e_target is None:
        return False
    e_iif = by_iif.get(iif)
    if e_iif is None:
        e_iif = by_iif[iif] = (_iface("-i", iif, False),)
    e_oif = by_oif.get(oif)
    if e_oif is None:
        e_oif = by_oif[oif] = (_iface("-o", oif, False),)
    e_proto = by_proto.get(proto_arg)
    if e_proto is None:
        e_proto = by_proto[proto_arg] = _fast_proto(proto_arg)[1]
    e_ports = by_ports.get(ports)
    if e_ports is None:
        assert ports is not None and module is not None  # None is in the memo
        e_ports = by_ports[ports] = _fast_ports(ports, module, sport, dport, family)
    if comment is not None and comment[0] == '"':
        # The only quotes of the line; the word between them quoted as ``_quote`` does (it holds no '):
        # if it is empty or holds a space (the usual one, a phrase), else as _NEEDS_QUOTES says.
        quoted = " " in comment or len(comment) == 2 or _NEEDS_QUOTES.search(comment, 1, len(comment) - 1)
        text = text.replace('"', "'" if quoted else "")
    if dst is None and (src is None or "," not in src):
        e_src = by_src.get(src)
        if e_src is None:
            assert src is not None  # None is in the memo
            e_src = by_src[src] = (_fast_source(src, family),)
        # make_rule(handle, exprs, text), inline (core.nat's twins): the exprs a tuple, the text the line.
        rule = _new(RuleTwin)
        rule.handle = handle
        rule.exprs = (*e_src, *e_iif, *e_oif, *e_proto, *e_ports, *e_target)
        rule.text = text
        rule.comment = None
        rule.__class__ = Rule
        out.append(rule)
        return True
    exprs = (*e_iif, *e_oif, *e_proto, *e_ports, *e_target)
    sources = [_addr_match("-s", a, False, family) for a in src.split(",")] if src is not None else [None]
    dests = [_addr_match("-d", a, False, family) for a in dst.split(",")] if dst is not None else [None]
    out.extend(make_rule(handle, (*[e for e in (s, d) if e is not None], *exprs), text)
               for s in sources for d in dests)
    return True


# ---------------------------------------------------------------------------
# The table


@dataclass(frozen=True, slots=True)
class _Unreadable:
    """A rule (or a change to a chain) we could not read: any flow that reaches it is unknown."""

    reason: str
    text: str


@dataclass
class _Table:
    policies: dict[str, str] = field(default_factory=dict)
    user: list[str] = field(default_factory=list)
    lines: dict[str, list[list[str] | _Unreadable | _FastGroups]] = field(default_factory=dict)
    bases: dict[str, tuple[Hook, int]] = field(default_factory=lambda: BASE_CHAINS)

    def add_chain(self, name: str) -> None:
        if name not in self.bases and name not in self.user:
            self.user.append(name)
        self.lines.setdefault(name, [])

    def unknown_from_start(self, names: Sequence[str], reason: str, text: str) -> None:
        """The chains' contents are not known any more: a flow entering one is unknown."""
        for name in names:
            self.add_chain(name)
            self.lines[name].insert(0, _Unreadable(reason, text))


def _strip_command(tokens: list[str]) -> tuple[str | None, list[str]]:
    """``[host::]iptables [-w] -t nat -A ...`` -> ("nat", ["-A", ...]); restore lines pass through."""
    if tokens and "::" in tokens[0]:
        tokens = [tokens[0].split("::", 1)[1], *tokens[1:]]
    if not tokens or tokens[0].startswith(("-", ":")):
        return None, tokens
    if not tokens[0].split("/")[-1].startswith(("iptables", "ip6tables")):
        return "", []  # another command (``conntrack -F``): not a rule
    table = "filter"
    rest: list[str] = []
    i = 1
    while i < len(tokens):
        if tokens[i] in ("-t", "--table") and i + 1 < len(tokens):
            table = tokens[i + 1]
            i += 2
        elif tokens[i] in ("-w", "--wait", "-W", "--wait-interval") and i + 1 < len(tokens) \
                and _number(tokens[i + 1]):
            i += 2
        elif tokens[i] in ("-w", "--wait"):
            i += 1
        else:
            rest.append(tokens[i])
            i += 1
    return table, rest


def _lines(text: str) -> list[str]:
    """``text.splitlines()``; by ``str.split`` (a scan for one character) where that splits the same."""
    if text.isascii() and not any(boundary in text for boundary in "\r\x0b\x0c\x1c\x1d\x1e"):
        lines = text.split("\n")  # no other line boundary (ASCII: no \x85, \u2028, \u2029 either)
        if not lines[-1]:
            lines.pop()  # splitlines ends at a final line boundary
        return lines
    return text.splitlines()


def _read_lines(text: str, kind: str = "nat") -> tuple[_Table, list[str]]:
    """The ``kind`` table's declarations and rule lines; problems (bad lines) listed by number."""
    table = _Table(bases=_TABLE_CHAINS[kind])
    problems: list[str] = []
    current: str | None = None
    seen_header = False
    last: str | None = None  # the chain the line before appended to, and its lines
    last_lines: list[list[str] | _Unreadable | _FastGroups] = []
    fast_line = _fast_groups
    regex = _FAST_LINE.fullmatch if fast_line is _fast_groups_py else None  # the reference, without its call
    in_kind = True  # current == kind or (not seen_header and current is None), kept up to date
    for number, raw in enumerate(_lines(text), 1):
        line = raw.strip()
        if line.startswith("-A "):
            if regex is None:
                fast = fast_line(line)
            else:
                m = regex(line)
                fast = None if m is None else m.groups()  # type: ignore[assignment]  # as _fast_groups_py
            if fast is not None:
                # A common shape (see _FAST_LINE): its words are the line's own, read when its rules are
                # built.
                if in_kind:
                    name = fast[1]
                    if name != last:
                        table.add_chain(name)
                        last, last_lines = name, table.lines[name]
                    last_lines.append(fast)
                continue
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current, seen_header = line[1:].strip(), True
            in_kind = current == kind
            continue
        if line == "COMMIT":
            current = None
            in_kind = not seen_header
            continue
        last = None  # any other line may change the table's chains
        unreadable: str | None = None
        try:
            tokens = _split(line)
        except ValueError as exc:
            # Its words are still enough to tell which chain it belongs to.
            problems.append(f"line {number}: {exc}")
            unreadable = f"unreadable line ({exc})"
            tokens = [word.strip("'\"") for word in line.split()]
        if tokens and tokens[0].startswith("[") and tokens[0].endswith("]"):
            tokens = tokens[1:]  # iptables-save -c counters
        if unreadable is None and not line.isascii() and _undecodable(tokens):
            problems.append(f"line {number}: bytes that are not UTF-8")
            unreadable = "bytes that are not UTF-8 (the rule cannot be read reliably)"
        command_table, tokens = _strip_command(tokens)
        if command_table is not None:
            in_nat = command_table == kind
        else:
            in_nat = in_kind
        if not in_nat or not tokens:
            continue
        head = tokens[0]
        if unreadable is not None and head in ("-A", "--append", "-I", "--insert") and len(tokens) > 1:
            marker: list[str] | _Unreadable = _Unreadable(unreadable, line)
            table.add_chain(tokens[1])
            if head in ("-A", "--append"):
                table.lines[tokens[1]].append(marker)
            else:
                pos = int(tokens[2]) if len(tokens) > 2 and _number(tokens[2]) else 1
                table.lines[tokens[1]].insert(pos - 1, marker)
        elif unreadable is not None and head in ("-F", "--flush", "-P", "--policy"):
            names = [tokens[1]] if len(tokens) > 1 else [*table.bases, *table.user]
            table.unknown_from_start(names, unreadable, line)
        elif unreadable is not None:
            continue  # a declaration or a delete-chain: nothing a flow can reach changes
        elif head in ("-D", "--delete", "-R", "--replace") and len(tokens) > 1:
            problems.append(f"line {number}: not modelled: {head}")
            table.unknown_from_start([tokens[1]], f"{head} {tokens[1]} is not modelled", line)
        elif head.startswith(":"):
            name = head[1:]
            table.add_chain(name)
            if len(tokens) > 1 and tokens[1] != "-":
                table.policies[name] = tokens[1]
        elif head in ("-N", "--new-chain") and len(tokens) > 1:
            table.add_chain(tokens[1])
        elif head in ("-P", "--policy") and len(tokens) > 2:
            table.policies[tokens[1]] = tokens[2]
        elif head in ("-A", "--append") and len(tokens) > 1:
            table.add_chain(tokens[1])
            table.lines[tokens[1]].append(tokens[2:])
        elif head in ("-I", "--insert") and len(tokens) > 1:
            table.add_chain(tokens[1])
            rest = tokens[2:]
            pos = 1
            if rest and _number(rest[0]):
                pos, rest = int(rest[0]), rest[1:]
            table.lines[tokens[1]].insert(pos - 1, rest)
        elif head in ("-F", "--flush"):
            for name in ([tokens[1]] if len(tokens) > 1 else list(table.lines)):
                table.lines[name] = []
        elif head in ("-X", "--delete-chain"):
            for name in ([tokens[1]] if len(tokens) > 1 else list(table.user)):
                if name in table.user and not table.lines.get(name):
                    table.user.remove(name)
                    table.lines.pop(name, None)
        elif head in ("-Z", "--zero"):
            continue
        else:
            problems.append(f"line {number}: not modelled: {head}")
    return table, problems


def _undecodable(tokens: list[str]) -> bool:
    """Does a token other than a ``--comment`` text hold bytes that were not UTF-8 (``text.decode``)?"""
    return any(undecodable(token) for i, token in enumerate(tokens)
               if not (i and tokens[i - 1] == "--comment"))


def _quote(token: str) -> str:
    return shlex.quote(token) if not token or _NEEDS_QUOTES.search(token) else token


def _command_text(words: list[str]) -> str:
    """The words as one shell line, each quoted where it must be (most need not: one check for all)."""
    if all(words) and _NEEDS_QUOTES.search("".join(words)) is None:
        return " ".join(words)
    return " ".join(_quote(w) for w in words)


_NEEDS_QUOTES = re.compile(r"[\s'\"]")  # \s is str.isspace()
_WORDS = re.compile(r"[^ \t\r\n]+")  # shlex's whitespace
_QUOTED_WORDS = re.compile(r'(?:[^ \t\r\n"]+|"[^"]*")+')


def _split(line: str) -> list[str]:
    """``shlex.split(line)``, without its per-character loop for the lines iptables-save prints.

    A line without quotes or backslashes is split at shlex's whitespace; one
    whose only quoting is balanced double quotes (``--comment "a b"``) too,
    each word then losing its quote characters. Anything else goes to shlex.
    """
    if "\\" in line or "'" in line:
        return shlex.split(line)
    if '"' not in line:
        return _WORDS.findall(line)
    if line.count('"') % 2:
        return shlex.split(line)  # no closing quotation: shlex says so
    return [word.replace('"', "") for word in _QUOTED_WORDS.findall(line)]


@dataclass(frozen=True, slots=True)
class ParsedTable:
    """A nat table read from iptables-save text, the lines it could not read, and the ipsets it names.

    ``sets`` are the names ``-m set --match-set`` uses in the chains kept (a
    set named only in a chain no base chain reaches does not count, unless
    ``all_chains``).
    """

    ruleset: NatRuleset
    problems: tuple[str, ...] = ()
    sets: frozenset[str] = frozenset()


def parse_save(
    text: str,
    *,
    family: str = "ip",
    table: str = "nat",
    ipsets: Mapping[str, IpSet] | None = None,
    all_chains: bool = False,
    kind: str = "nat",
    budget: Budget | None = None,
) -> ParsedTable:
    """The nat table of iptables-save / iptables-restore text (or ``iptables -t nat -A`` lines).

    ``family`` is "ip" (iptables) or "ip6" (ip6tables); ``table`` the name the
    chains carry in the ruleset; ``all_chains`` keeps user chains no base
    chain reaches (for counting). Never raises on a rule: what it cannot read is
    unknown by name, and a line it cannot read at all is listed in ``problems``. ``budget``
    counts the rules read (progress, and ``bulkparse.ParseTooSlow`` past its deadline).
    """
    if family not in ("ip", "ip6"):
        raise ValueError(f"parse_save: family must be ip or ip6, got {family!r}")
    af = AF_INET if family == "ip" else AF_INET6
    bases = _TABLE_CHAINS[kind]
    parsed_table, problems = _read_lines(text, kind)
    names = set(bases) | set(parsed_table.user)
    rules_of: dict[str, list[Rule]] = {}
    sets_of: dict[str, set[str]] = {}
    memo: dict[tuple[object, ...], list[Expression]] = {}  # equal modules and targets: read once, shared
    fast_memo = _fast_memo()  # the same for lines read whole
    for chain_name in [*bases, *parsed_table.user]:
        out: list[Rule] = []
        named = sets_of.setdefault(chain_name, set())
        entries = parsed_table.lines.pop(chain_name, [])
        entries.reverse()
        while entries:
            entry = entries.pop()  # each line let go once read: its memory serves the rules that follow
            if budget is not None:
                budget.tick()
            handle = len(out) + 1
            tokens: list[str] | _Unreadable
            if isinstance(entry, tuple):  # _FastGroups
                if _fast_rules(entry, af, names, handle, fast_memo, out):
                    continue
                tokens = _split(entry[0])[2:]  # word by word after all
            else:
                tokens = entry
            if isinstance(tokens, _Unreadable):
                out.append(Rule(handle, (UnknownStatement(tokens.reason, tokens.text),), text=tokens.text))
                continue
            rule_text = _command_text(["-A", chain_name, *tokens])
            out.extend(_rules(chain_name, tokens, af, chains=names, ipsets=ipsets, handle=handle,
                              text=rule_text, sets=named, memo=memo))
        rules_of[chain_name] = out

    # Base chains and the user chains they reach.
    reached: list[str] = []
    todo = list(bases)
    while todo:
        name = todo.pop(0)
        if name in reached:
            continue
        reached.append(name)
        if not parsed_table.user:
            continue  # without user chains a jump reaches only a base chain, reached anyway
        for rule in rules_of.get(name, []):
            v = rule.verdict
            if v is not None and v.target is not None and v.target in names:
                todo.append(v.target)
    chains: list[Chain] = []
    sets: set[str] = set()
    for name in [*bases, *parsed_table.user]:
        if name not in reached and not all_chains:
            continue
        sets |= sets_of.get(name, set())
        base = bases.get(name)
        policy = parsed_table.policies.get(name, "ACCEPT").lower() if base else None
        if policy not in (None, "accept", "drop"):
            problems.append(f"chain {name}: policy {policy} not modelled")
            policy = "accept"
        chains.append(Chain(
            family=family, table=table, name=name, rules=tuple(rules_of.get(name, ())),
            hook=base[0] if base else None, priority=base[1] if base else None,
            type=("nat" if kind == "nat" else "filter") if base else None, policy=policy,
        ))
    return ParsedTable(NatRuleset(tuple(chains)), tuple(problems), frozenset(sets))


def _rules(
    chain: str, tokens: list[str], family: int, *, chains: set[str], ipsets: Mapping[str, IpSet] | None,
    handle: int, text: str, sets: set[str], memo: dict[tuple[object, ...], list[Expression]] | None = None,
) -> list[Rule]:
    """The rule(s) of one line; the ipsets its ``-m set`` matches name are added to ``sets``.

    ``memo`` keeps what each module and target read to (they depend on their
    options, the rule's protocol, its goto and whether the target is a chain).
    """
    if memo is None:
        memo = {}
    try:
        parsed = _tokens_to_rule(chain, tokens, family)
    except _NotModelled as exc:
        # The rule as a whole is not known (its target neither): a flow that reaches it is unknown.
        return [Rule(handle, (UnknownStatement(str(exc), text),), text=text)]
    for module in parsed.modules:
        if module.name == "set":
            sets.update(o.args[0] for o in module.options if o.name in ("--match-set", "--set") and o.args)
    exprs: list[Expression] = list(parsed.base)
    for module in parsed.modules:
        key: tuple[object, ...] = ("m", module.name, _options_key(module.options), parsed.proto, family)
        found = memo.get(key)
        if found is None:
            found = memo[key] = _module(module, parsed, family, ipsets)
        exprs.extend(found)
    target = parsed.target
    if target is not None:
        key = ("t", target.name, _options_key(target.options), parsed.goto, family, target.name in chains)
        found = memo.get(key)
        if found is None:
            found = memo[key] = _target(parsed, family, chains)
        exprs.extend(found)
    sources: list[Expression | None] = [_addr_match("-s", a, inv, family) for a, inv in parsed.sources]
    dests: list[Expression | None] = [_addr_match("-d", a, inv, family) for a, inv in parsed.dests]
    out: list[Rule] = []
    for s in sources or [None]:
        for d in dests or [None]:
            head = [e for e in (s, d) if e is not None]
            out.append(Rule(handle, (*head, *exprs), text=text))
    return out


def _options_key(options: list[_Option]) -> tuple[tuple[str, tuple[str, ...], bool], ...]:
    return tuple([(o.name, tuple(o.args), o.invert) for o in options])


@functools.lru_cache(maxsize=4096)
def _addr_match(flag: str, addr: str, invert: bool, family: int) -> Expression:
    text = f"{'! ' if invert else ''}{flag} {addr}"
    try:
        lo, hi = _addr_interval(addr, family)
    except _NotModelled as exc:
        return UnknownMatch(str(exc), text)
    values = make_interval(lo, hi, 4 if family == AF_INET else 6)
    return make_match(_addr_selector(flag, family), Op.NE if invert else Op.EQ, values, text)


# A prefix length as _quad_span takes it (one or two ASCII digits, at most 32; "" is /32): its
# network mask and host bits.
_PREFIX_MASKS = {
    bits: (mask, ~mask & 0xFFFFFFFF)
    for bits in ["", *(str(n) for n in range(33)), *(f"0{n}" for n in range(10))]
    for mask in [(0xFFFFFFFF << (32 - int(bits or 32))) & 0xFFFFFFFF]
}


def _fast_source(addr: str, family: int) -> Expression:
    """``_addr_match("-s", addr, False, family)``; a dotted quad or quad/len (the usual) read here.

    The fast path keeps what each address read to for its whole parse: the caches
    (4096 addresses) are left to the word path, a 50k-rule table would only churn them.
    """
    if family == AF_INET:
        quad_text, slash, bits = addr.partition("/")  # _quad_span(addr), inline
        try:
            quad = _from_bytes(_inet_pton(AF_INET, quad_text), "big")
        except (OSError, ValueError):  # ValueError: an embedded NUL
            return _addr_match("-s", addr, False, family)
        masks = _PREFIX_MASKS.get(bits)  # "" (no slash): the host mask
        if masks is None or (slash and not bits):
            return _addr_match("-s", addr, False, family)
        mask, host = masks
        # make_match(selector, EQ, make_interval(lo, hi, 4), text), inline (core.nat's twins):
        # lo <= hi, and an address key takes an IntervalSet.
        values = _new(IntervalsTwin)
        values.intervals = ((quad & mask, quad | host),)
        values.version = 4
        values.__class__ = IntervalSet
        match = _new(MatchTwin)
        match.selector = _addr_selector("-s", AF_INET)
        match.op = _EQ
        match.values = values
        match.text = "-s " + addr
        match.__class__ = Match
        return match  # type: ignore[no-any-return]
    return _addr_match("-s", addr, False, family)


@functools.lru_cache(maxsize=8)
def _addr_selector(flag: str, family: int) -> Selector:
    return Selector(Key.SADDR if flag == "-s" else Key.DADDR, flag, family=family)


# ---------------------------------------------------------------------------
# Reading the kernel

Runner = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return run_tool(argv, timeout=SAVE_TIMEOUT)


def _save(tool: str, runner: Runner, table: str = "nat") -> str:
    return run_ruleset_tool([tool, "-t", table], runner, timeout=SAVE_TIMEOUT, missing=f"{tool} not found")


def read_ipsets(
    runner: Runner = _run, which: Callable[[str], str | None] = shutil.which
) -> dict[str, IpSet] | None:
    """The kernel's ipsets (``ipset save``), or None if ipset is not installed or fails."""
    if which("ipset") is None:
        return None
    try:
        proc = runner(["ipset", "save"])
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return parse_ipset_save(proc.stdout)


def read_named_ipsets(
    names: Iterable[str], runner: Runner = _run, which: Callable[[str], str | None] = shutil.which
) -> dict[str, IpSet | None]:
    """Each named ipset (``ipset save NAME``, one run each), None for one that cannot be read.

    A set that does not exist and a read that fails are both None, as a set
    missing from ``read_ipsets`` is: the poll compares these with what the
    ruleset read saw, and the two must agree on what "cannot be read" is.
    """
    got: dict[str, IpSet | None] = dict.fromkeys(names)
    if which("ipset") is None:
        return got
    for name in got:
        try:
            proc = runner(["ipset", "save", name])
        except (OSError, subprocess.TimeoutExpired):
            continue
        if proc.returncode == 0:
            got[name] = parse_ipset_save(proc.stdout).get(name)
    return got


def legacy_nat_exists(family: str, proc_net: str = "/proc/thread-self/net", table: str = "nat") -> bool:
    """True if this namespace has instantiated the legacy ``table`` of ``family`` (never instantiates it).

    ``thread-self``: a thread may have entered another namespace than the process's (``/proc/net``).
    """
    path = os.path.join(proc_net, "ip_tables_names" if family == "ip" else "ip6_tables_names")
    try:
        with open(path, encoding="ascii") as f:
            return table in f.read().split()
    except OSError:
        return False


def legacy_mangle_exists(family: str) -> bool:
    """True if this namespace has instantiated the legacy mangle table of ``family``."""
    return legacy_nat_exists(family, table="mangle")


def _tool(family: str, legacy: bool) -> str:
    return f"{'ip' if family == 'ip' else 'ip6'}tables-{'legacy' if legacy else 'nft'}-save"


@dataclass(frozen=True, slots=True)
class RulesetRead:
    """The merged ruleset and what could not be read (tools missing or failing, lines not understood).

    ``sets`` names the ipsets the iptables rules read match on, ``ipsets``
    is what ``ipset save`` showed (None: not read, or unreadable).
    """

    ruleset: NatRuleset
    problems: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    sets: frozenset[str] = frozenset()
    ipsets: Mapping[str, IpSet] | None = None

    def set_contents(self) -> dict[str, IpSet | None]:
        """Each ipset the ruleset names, as this read saw it (None: it could not be read)."""
        return {name: (self.ipsets or {}).get(name) for name in sorted(self.sets)}


# Targets a packet passes through to the next rule (they end nothing for it).
_PASSING_TARGETS = _PASSIVE_TARGETS | {"MARK", "CONNMARK", "CT", "NOTRACK"}


def prerouting_rpfilter_drop(text: str) -> bool:
    """True if the table's PREROUTING drops every packet that fails a strict reverse path.

    That is ``-A PREROUTING -m rpfilter --invert -j DROP`` (no --loose, no
    --validmark, no other match), with every rule before it passing packets
    on (no target, or one of ``_PASSING_TARGETS``).
    """
    for line in text.splitlines():
        tokens = line.split()
        if tokens[:2] != ["-A", "PREROUTING"]:
            continue
        if tokens[2:] == ["-m", "rpfilter", "--invert", "-j", "DROP"]:
            return True
        jumps = [tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t in ("-j", "--jump", "-g", "--goto")]
        if any(target not in _PASSING_TARGETS for target in jumps):
            return False
    return False


def has_xt(ruleset: NatRuleset, family: str, table: str = "nat") -> bool:
    """True if the nft table holds xt expressions (it is iptables-nft's)."""
    return any(
        name.startswith("xt ")
        for c in ruleset.chains if (c.family, c.table) == (family, table)
        for r in c.rules for name in r.unknown_expressions()
    )


def merge(
    nft: NatRuleset, iptables_nft: Mapping[str, NatRuleset], legacy: Mapping[str, NatRuleset], *,
    mangle_nft: Mapping[str, NatRuleset] | None = None, mangle_legacy: Mapping[str, NatRuleset] | None = None,
    marks_known: bool = True,
) -> NatRuleset:
    """nft's chains; each iptables-nft table (by family) replaces nft's view of it; then legacy tables.

    The mangle tables (``mangle_*``) likewise. ``marks_known`` False says a
    table that may set marks could not be read.
    """
    mangle_nft, mangle_legacy = mangle_nft or {}, mangle_legacy or {}
    replaced = {(family, "nat") for family in iptables_nft} | {(family, "mangle") for family in mangle_nft}
    chains = [c for c in nft.chains if (c.family, c.table) not in replaced]
    for tables in (iptables_nft, legacy, mangle_nft, mangle_legacy):
        for family in ("ip", "ip6"):
            if family in tables:
                chains.extend(tables[family].chains)
    return NatRuleset(tuple(chains), rpfilter=nft.rpfilter, marks_known=nft.marks_known and marks_known)


def read_all(
    nft: str = "nft",
    runner: Runner = _run,
    which: Callable[[str], str | None] = shutil.which,
    legacy_exists: Callable[[str], bool] = legacy_nat_exists,
    read_nft: Callable[[str], NatRuleset] | None = None,
    *,
    legacy_mangle: Callable[[str], bool] | None = None,
    progress: Callable[[], None] | None = None,
) -> RulesetRead:
    """nftables and the iptables nat tables together (see the module docstring).

    ``legacy_mangle`` says whether a legacy mangle table exists; by default the
    kernel is asked, unless ``legacy_exists`` is a stand-in (then: none).
    Each iptables table is parsed with the cyclic collector paused, within
    ``nft.PARSE_TIMEOUT`` (past it, ``bulkparse.ParseTooSlow`` fails the whole
    read, as nft's own parse does), ``progress`` called every ``bulkparse.STEP`` rules.
    """
    legacy_rpf: Callable[[str, str], bool] = (
        (lambda family, table: legacy_nat_exists(family, table=table)) if legacy_exists is legacy_nat_exists
        else (lambda _family, _table: False)
    )
    if legacy_mangle is None:
        real = legacy_exists is legacy_nat_exists
        legacy_mangle = legacy_mangle_exists if real else (lambda _family: False)
    nft_rules = (read_nft or read_ruleset)(nft)
    problems: list[str] = []
    sources = ["nft"]
    ipsets: dict[str, IpSet] | None = None
    ipsets_read = False
    sets: set[str] = set()

    def table(family: str, legacy: bool, kind: str = "nat") -> NatRuleset | None:
        nonlocal ipsets, ipsets_read
        tool = _tool(family, legacy)
        if which(tool) is None:
            problems.append(f"{tool} not found: its {kind} table is not read")
            return None
        if not ipsets_read:
            ipsets, ipsets_read = read_ipsets(runner, which), True
        try:
            text = _save(tool, runner, kind)
        except (MissingTool, PermissionDenied, RulesetError) as exc:
            problems.append(str(exc))
            return None
        name = (LEGACY_TABLE if kind == "nat" else f"{kind}[legacy]") if legacy else kind
        with gc_paused():  # past its deadline, the whole read fails: the previous ruleset stays
            parsed = parse_save(text, family=family, table=name, ipsets=ipsets, kind=kind,
                                budget=Budget(progress, PARSE_TIMEOUT, f"{tool} -t {kind}"))
        problems.extend(f"{tool}: {p}" for p in parsed.problems)
        sources.append(tool)
        sets.update(parsed.sets)
        return parsed.ruleset

    from_nft: dict[str, NatRuleset] = {}
    from_legacy: dict[str, NatRuleset] = {}
    mangle_nft: dict[str, NatRuleset] = {}
    mangle_legacy: dict[str, NatRuleset] = {}
    marks_known = True
    for family in ("ip", "ip6"):
        if has_xt(nft_rules, family):
            got = table(family, legacy=False)
            if got is not None:
                from_nft[family] = got
        if legacy_exists(family):
            got = table(family, legacy=True)
            if got is not None:
                from_legacy[family] = got
        # Mangle: the marks it sets before NAT and routing (core.nat.NatRuleset.mark_chains).
        if has_xt(nft_rules, family, "mangle"):
            got = table(family, legacy=False, kind="mangle")
            if got is None:
                marks_known = False
            else:
                mangle_nft[family] = got
        if legacy_mangle(family):
            got = table(family, legacy=True, kind="mangle")
            if got is None:
                marks_known = False
            else:
                mangle_legacy[family] = got
    ruleset = merge(nft_rules, from_nft, from_legacy, mangle_nft=mangle_nft, mangle_legacy=mangle_legacy,
                    marks_known=marks_known)
    # Reverse-path drops by iptables' rpfilter match: iptables-save shows its options, the nft dump not.
    confirmed = set(ruleset.rpfilter)
    for family, af in (("ip", AF_INET), ("ip6", AF_INET6)):
        sources_of: list[tuple[str, str]] = []
        if af in nft_rules.xt_rpfilter:
            sources_of += [(_tool(family, legacy=False), t) for t in ("raw", "mangle")]
        sources_of += [(_tool(family, legacy=True), t) for t in ("raw", "mangle") if legacy_rpf(family, t)]
        for tool, name in sources_of:
            if which(tool) is None:
                continue
            try:
                if prerouting_rpfilter_drop(_save(tool, runner, name)):
                    confirmed.add(af)
            except (MissingTool, PermissionDenied, RulesetError) as exc:
                problems.append(str(exc))
    ruleset = replace(ruleset, rpfilter=frozenset(confirmed))
    return RulesetRead(ruleset, tuple(problems), tuple(sources), frozenset(sets), ipsets)


def read_all_logged(nft: str = "nft", read_nft: Callable[[str], NatRuleset] | None = None,
                    progress: Callable[[], None] | None = None) -> RulesetRead:
    """``read_all``, each problem logged as a warning (what ``KernelBackend`` reads)."""
    result = read_all(nft, read_nft=read_nft, progress=progress)
    for problem in result.problems:
        log.warning("ruleset: %s", problem)
    return result


def read_all_rulesets(nft: str = "nft") -> NatRuleset:
    """The ruleset ``KernelBackend`` evaluates: nftables and iptables (nft and legacy) nat tables merged."""
    return read_all_logged(nft).ruleset


__all__ = [
    "BASE_CHAINS",
    "LEGACY_TABLE",
    "IpSet",
    "ParsedTable",
    "RulesetRead",
    "has_xt",
    "legacy_nat_exists",
    "merge",
    "parse_ipset_save",
    "parse_save",
    "read_all",
    "read_all_logged",
    "read_all_rulesets",
    "read_ipsets",
    "read_named_ipsets",
]
