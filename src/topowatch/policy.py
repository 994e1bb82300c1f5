# SPDX-License-Identifier: GPL-2.0-or-later
"""Policies from rules.d drop-in TOML files: which events trigger, which entries, what action.

This module decides which policy files are in force, what each key of each
policy means, and which policies a burst of events activates. It never
deletes, never talks to the kernel, never writes a file, and never puts a
file it refused into force: on any error the whole load fails and the caller
keeps the previous policy.

Theory of operation (systemd's drop-in rules, ``systemd.unit(5)``):

1. Directories in priority order, highest first: ``/etc/topowatch/rules.d``,
   ``/run/topowatch/rules.d``, ``/usr/local/lib/topowatch/rules.d``,
   ``/usr/lib/topowatch/rules.d`` (systemd's unit search order), then
   ``lib/topowatch/rules.d`` under the prefix topowatch was installed to when
   that is another one (a virtualenv); or the list given. Only ``*.toml``
   names count; hidden names are ignored.
2. A name in a higher directory hides the same name in lower ones. The winner
   is an empty file or a symlink to ``/dev/null``: the name is masked and
   contributes nothing.
3. The remaining files are read in file-name order (``NN-name.toml``). Each
   holds ``[policy.NAME]`` tables; a later file wins per key of a policy, so a
   drop-in can change one key of a shipped policy.
4. Keys not set by any file take their defaults. When no file defines any
   policy, the built-in policy ``default`` applies (every topology event
   triggers; UNREPLIED connectionless entries in every zone; flush; cap 100000).
5. Files, their directories and every directory above those must not be
   writable by group or others and must be owned by root (or by the user
   running topowatch), as sshd's StrictModes demands (a parent such as /tmp
   that is writable by all but sticky is accepted: nobody else may rename
   what root owns in it); a file or directory that fails is refused with an
   error. A directory that does not exist is skipped, unless it held policy
   files at the last load (``required``): gone or unreadable at a reload,
   it is an error, never a fall-back to the built-in default.
6. A file is opened without blocking (a FIFO named ``*.toml`` is refused, not
   waited on), must be a regular file (checked on the open descriptor) of
   at most ``MAX_FILE_BYTES``; nesting too deep for the TOML parser is an
   error like any other.

Every mistake in every file is collected and reported together
(``PolicyErrors``), each naming the file, line and key.

At reaction time ``EffectivePolicy.select`` takes the burst's events and
returns the active policies: an entry is eligible when an active policy
admits it; it is deleted when an active policy admitting it says ``flush``;
the reaction is refused when more entries would be deleted than the smallest
cap of the active flushing policies.
"""

from __future__ import annotations

import difflib
import enum
import json
import math
import os
import re
import stat
import sys
import sysconfig
import tomllib
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import ip_network
from types import MappingProxyType
from typing import Any

import trio

from topowatch.core.conntrack import Entry
from topowatch.core.eligibility import DEFAULT_ELIGIBILITY, Eligibility, any_of
from topowatch.core.flow import PROTO_NAMES, PROTO_NUMBERS
from topowatch.core.model import AF_INET, AF_INET6, IPNetwork
from topowatch.core.pressure import DEFAULT_LOWERED, LOWERABLE, STATEFUL, PressurePolicy, Protection
from topowatch.errors import PolicyError
from topowatch.text import escape
from topowatch.trust import default_trusted_uids as _default_trusted_uids
from topowatch.trust import parent_problem as _parent_problem
from topowatch.trust import trust_problem as _trust_problem

# A reload's file reads (bounded in size: MAX_FILE_BYTES each) may take this long before it is given up.
RELOAD_TIMEOUT = 10.0

SYSTEM_DIRS: tuple[str, ...] = (
    "/etc/topowatch/rules.d",
    "/run/topowatch/rules.d",
    "/usr/local/lib/topowatch/rules.d",  # where pip, as root, installs the shipped files
    "/usr/lib/topowatch/rules.d",
)
SHIPPED_RULES = "lib/topowatch/rules.d"  # under the install prefix (the wheel's shared-data)


def installed_dirs() -> tuple[str, ...]:
    """Where this installation put its own shipped policies when that is none of ``SYSTEM_DIRS``.

    The wheel installs rules.d under its data prefix: /usr/local or /usr for pip
    as root, the virtualenv for an install into one. Searched after the system
    directories, so the shipped files are in force wherever topowatch was
    installed, and any same-named file in /etc, /run or /usr overrides them.
    """
    found: list[str] = []
    for prefix in (sysconfig.get_path("data"), sys.prefix):
        path = os.path.join(prefix, SHIPPED_RULES)
        if path not in SYSTEM_DIRS and path not in found:
            found.append(path)
    return tuple(found)


DEFAULT_DIRS: tuple[str, ...] = SYSTEM_DIRS + installed_dirs()

TRIGGERS: tuple[str, ...] = (
    "link", "address", "route", "rule", "xfrm", "ruleset", "networkmanager", "dispatcher",
)
ALL_TRIGGERS = frozenset(TRIGGERS)
REQUEST = "request"  # an explicit request (CLI or D-Bus trigger), optionally for one interface

FAMILY_NAMES: dict[str, int] = {"ipv4": AF_INET, "ipv6": AF_INET6}
FAMILY_OF: dict[int, str] = {num: name for name, num in FAMILY_NAMES.items()}

BUILTIN = "built-in default"
DEFAULT_NAME = "default"
IFNAMSIZ = 16
U32 = 0xFFFFFFFF
# A policy file is a few hundred bytes; anything past this is refused before it is parsed.
MAX_FILE_BYTES = 1 << 20

_NAME_RE = re.compile(r"[A-Za-z0-9_-]+\Z")
_TOML_POS_RE = re.compile(r"at line (\d+), column (\d+)")
_BARE_OR_QUOTED = r'(?:[A-Za-z0-9_-]+|"[^"\n]*"|\'[^\'\n]*\')'
_KEY_PART_RE = re.compile(_BARE_OR_QUOTED)
_DOTTED = rf"{_BARE_OR_QUOTED}(?:\s*\.\s*{_BARE_OR_QUOTED})*"
_HEADER_RE = re.compile(rf"^\s*\[\[?\s*({_DOTTED})\s*\]\]?")
_KEYLINE_RE = re.compile(rf"^\s*({_DOTTED})\s*=")


class Action(enum.StrEnum):
    FLUSH = "flush"  # delete the stale entries
    LOG = "log"  # log what would be deleted, delete nothing


class PolicyErrors(PolicyError):
    """Every error found in one load; ``errors`` holds each with its file, line and key."""

    def __init__(self, errors: Sequence[PolicyError]) -> None:
        self.errors = tuple(errors)
        lines = "\n".join(f"  {e}" for e in self.errors)
        super().__init__(f"{len(self.errors)} error(s) in policy files:\n{lines}")


# -- keys --------------------------------------------------------------------------------------


class _Invalid(Exception):
    """A value is wrong; the caller adds file, line and key."""


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _type_name(value: object) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)


def _list(value: object, what: str) -> list[object]:
    if not isinstance(value, list):
        raise _Invalid(f"expected an array of {what}, got {_type_name(value)} {value!r}")
    if not value:
        raise _Invalid("empty array: it would match nothing (leave the key out for the default, "
                       "or set enabled = false)")
    return value


def _int(value: object, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"{what}: expected an integer, got {_type_name(value)} {value!r}")
    if not low <= value <= high:
        sign = "negative" if value < 0 else "too small" if value < low else "too large"
        raise _Invalid(f"{what}: {value} is {sign} (must be {low}..{high})")
    return value


def _v_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {_type_name(value)} {value!r}")
    return value


def _v_triggers(value: object) -> frozenset[str]:
    out = set()
    for i, item in enumerate(_list(value, "event kinds")):
        if not isinstance(item, str):
            raise _Invalid(f"[{i}]: expected a string, got {_type_name(item)} {item!r}")
        if item not in ALL_TRIGGERS:
            raise _Invalid(f"[{i}]: unknown trigger {item!r}{_suggest(item, TRIGGERS)} "
                           f"(one of {', '.join(TRIGGERS)})")
        out.add(item)
    return frozenset(out)


def _v_families(value: object) -> frozenset[int]:
    out = set()
    for i, item in enumerate(_list(value, "families")):
        if not isinstance(item, str) or item not in FAMILY_NAMES:
            hint = _suggest(item, FAMILY_NAMES) if isinstance(item, str) else ""
            raise _Invalid(f"[{i}]: unknown family {item!r}{hint} (\"ipv4\" or \"ipv6\")")
        out.add(FAMILY_NAMES[item])
    return frozenset(out)


def _v_protocols(value: object) -> frozenset[int]:
    out = set()
    for i, item in enumerate(_list(value, "protocol names or numbers")):
        if isinstance(item, str):
            if item not in PROTO_NUMBERS:
                raise _Invalid(f"[{i}]: unknown protocol name {item!r}{_suggest(item, PROTO_NUMBERS)} "
                               f"(names: {', '.join(sorted(PROTO_NUMBERS))}; or a number 0..255)")
            out.add(PROTO_NUMBERS[item])
        else:
            out.add(_int(item, f"[{i}]", 0, 255))
    return frozenset(out)


def _v_zones(value: object) -> frozenset[int]:
    return frozenset(_int(item, f"[{i}]", 0, 0xFFFF) for i, item in enumerate(_list(value, "zones")))


def _mark_part(text: str, where: str) -> int:
    try:
        number = int(text.strip(), 0)
    except ValueError:
        raise _Invalid(f"{where}: {text!r} is not a number (decimal or 0x hex)") from None
    return _int(number, where, 0, U32)


def _v_marks(value: object) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for i, item in enumerate(_list(value, "marks")):
        where = f"[{i}]"
        if isinstance(item, str):
            text, _, mask_text = item.partition("/")
            mark = _mark_part(text, where)
            mask = _mark_part(mask_text, where) if mask_text else U32
        else:
            mark, mask = _int(item, where, 0, U32), U32
        if mark & ~mask:
            raise _Invalid(f"{where}: {item!r} sets bits outside its mask: it would match nothing")
        out.append((mark, mask))
    return tuple(dict.fromkeys(out))


def _v_prefixes(value: object) -> tuple[IPNetwork, ...]:
    out: list[IPNetwork] = []
    for i, item in enumerate(_list(value, "prefixes")):
        if not isinstance(item, str):
            raise _Invalid(f"[{i}]: expected a prefix string like \"10.0.0.0/8\", got "
                           f"{_type_name(item)} {item!r}")
        try:
            out.append(ip_network(item, strict=True))
            continue
        except ValueError:
            pass
        try:
            loose = ip_network(item, strict=False)
        except ValueError:
            raise _Invalid(f"[{i}]: bad prefix {item!r} (expected an address or address/length)") from None
        raise _Invalid(f"[{i}]: bad prefix {item!r}: host bits set; did you mean {str(loose)!r}?")
    return tuple(dict.fromkeys(out))


def _v_interfaces(value: object) -> tuple[str, ...]:
    out: list[str] = []
    for i, item in enumerate(_list(value, "interface names")):
        if not isinstance(item, str):
            raise _Invalid(f"[{i}]: expected an interface name, got {_type_name(item)} {item!r}")
        bad = not item or item in (".", "..") or any(c in item for c in "/: \t\n?[]")
        if bad or len(item.replace("*", "")) >= IFNAMSIZ:
            raise _Invalid(f"[{i}]: bad interface name {item!r} (at most {IFNAMSIZ - 1} characters, "
                           f"no '/', ':' or spaces; '*' matches any run of characters)")
        out.append(item)
    return tuple(dict.fromkeys(out))


def _v_action(value: object) -> Action:
    if not isinstance(value, str) or value not in {a.value for a in Action}:
        hint = _suggest(value, [a.value for a in Action]) if isinstance(value, str) else ""
        raise _Invalid(f"unknown action {value!r}{hint} (\"flush\" or \"log\")")
    return Action(value)


def _v_max_deletions(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"expected an integer, got {_type_name(value)} {value!r}")
    if value <= 0:
        raise _Invalid(f"must be > 0, got {value} (set action = \"log\" to delete nothing)")
    return value


def _v_seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(f"expected a number of seconds, got {_type_name(value)} {value!r}")
    if not math.isfinite(value) or value < 0:
        raise _Invalid(f"must be a finite number of seconds >= 0, got {value}")
    return float(value)


@dataclass(frozen=True, slots=True)
class _Key:
    parse: Callable[[object], Any]
    default: Any
    doc: str


# One table for every key: its parser, its default and what it means (rendered as a comment).
KEYS: Mapping[str, _Key] = MappingProxyType({
    "enabled": _Key(_v_bool, True, "false: the policy is kept but never acts"),
    "triggers": _Key(_v_triggers, ALL_TRIGGERS, "event kinds that start a reaction"),
    "families": _Key(_v_families, DEFAULT_ELIGIBILITY.families, "address families of eligible entries"),
    "protocols": _Key(_v_protocols, None, "every connectionless protocol (anything but tcp, sctp, dccp)"),
    "unreplied_only": _Key(_v_bool, True, "only entries that never saw a reply"),
    "zones": _Key(_v_zones, None, "every conntrack zone"),
    "marks": _Key(_v_marks, None, "any conntrack mark"),
    "sources": _Key(_v_prefixes, None, "any original source address"),
    "destinations": _Key(_v_prefixes, None, "any original destination address"),
    "interfaces": _Key(_v_interfaces, None, "events on any interface"),
    "action": _Key(_v_action, Action.FLUSH, "flush deletes, log only logs"),
    "max_deletions": _Key(_v_max_deletions, 100_000, "refuse a reaction deleting more entries"),
    "debounce": _Key(_v_seconds, 0.25, "seconds of quiet that end a burst of events"),
    "max_wait": _Key(_v_seconds, 2.0, "react at the latest this long after a burst began"),
})


def _v_fraction(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(f"expected a fraction of nf_conntrack_max like 0.9, got {_type_name(value)} {value!r}")
    if not 0 < value <= 1:
        raise _Invalid(f"must be a fraction > 0 and <= 1 of nf_conntrack_max, got {value}"
                       + (f" (did you mean {value / 100}?)" if 1 < value <= 100 else ""))
    return float(value)


def _v_count(value: object) -> int:
    return _int(value, "count", 1, 10_000_000)


def _v_interval(value: object) -> float:
    seconds = _v_seconds(value)
    if seconds <= 0:
        raise _Invalid("must be > 0 seconds")
    return seconds


def _v_timeouts(value: object) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, dict):
        raise _Invalid(f"expected a table like {{ udp = 10, tcp_syn_sent = 20 }}, got {_type_name(value)}")
    out: dict[str, int] = {}
    for name, seconds in value.items():
        if name not in LOWERABLE:
            raise _Invalid(f"{name}: not a timeout that may be lowered{_suggest(name, LOWERABLE)} "
                           f"(only unreplied and half-open states: {', '.join(LOWERABLE)})")
        out[name] = _int(seconds, name, 1, 2**31 - 1)
    return tuple(out.items())


def _v_evict_replied(value: object) -> frozenset[int]:
    protocols = _v_protocols(value)
    stateful = sorted(PROTO_NAMES.get(p, str(p)) for p in protocols & STATEFUL)
    if stateful:
        raise _Invalid(f"replied {', '.join(stateful)} entries are never evicted (their state is not "
                       f"read: an established connection must not be cut); list connectionless protocols")
    return protocols


_PRESSURE_DEFAULT = PressurePolicy()

# The [pressure] table: one for the namespace, merged per key like the policies.
PRESSURE_KEYS: Mapping[str, _Key] = MappingProxyType({
    "enabled": _Key(_v_bool, False, "watch the table fill and act above the high mark"),
    "high": _Key(_v_fraction, _PRESSURE_DEFAULT.high, "fill (count / nf_conntrack_max) that starts it"),
    "low": _Key(_v_fraction, _PRESSURE_DEFAULT.low, "fill at which it ends (timeouts restored)"),
    "lower_timeouts": _Key(_v_timeouts, DEFAULT_LOWERED, "timeouts (s) set while above the high mark"),
    "evict_unreplied": _Key(_v_bool, True, "evict UNREPLIED entries, least recently refreshed first"),
    "evict_replied": _Key(_v_evict_replied, frozenset(),
                          "connectionless protocols whose replied entries may go while flows are refused"),
    "protect_zones": _Key(_v_zones, frozenset(), "conntrack zones never evicted"),
    "protect_marks": _Key(_v_marks, (), "conntrack marks never evicted"),
    "protect_prefixes": _Key(_v_prefixes, (), "entries from or to these prefixes are never evicted"),
    "batch": _Key(_v_count, _PRESSURE_DEFAULT.batch, "evictions per tick at most"),
    "rate": _Key(_v_count, _PRESSURE_DEFAULT.rate, "evictions per second at most"),
    "min_interval": _Key(_v_interval, _PRESSURE_DEFAULT.min_interval,
                         "seconds between looks near the high mark"),
    "max_interval": _Key(_v_interval, _PRESSURE_DEFAULT.max_interval,
                         "seconds between looks in an empty table"),
    "resize_buckets": _Key(_v_bool, False, "raise nf_conntrack_buckets to nf_conntrack_max when pressure "
                           "starts (init namespace only)"),
})
# Pseudo policy name under which a file's [pressure] keys travel (no policy can be named so).
_PRESSURE = ":pressure"


def _pressure_policy(values: Mapping[str, Any]) -> PressurePolicy:
    return PressurePolicy(
        enabled=values["enabled"], high=values["high"], low=values["low"],
        lower_timeouts=values["lower_timeouts"], evict_unreplied=values["evict_unreplied"],
        evict_replied=values["evict_replied"],
        protect=Protection(values["protect_zones"], values["protect_marks"], values["protect_prefixes"]),
        batch=values["batch"], rate=values["rate"],
        min_interval=values["min_interval"], max_interval=values["max_interval"],
        resize_buckets=values["resize_buckets"],
    )  # fmt: skip


def _pressure_value(policy: PressurePolicy, key: str) -> Any:
    protect = {"protect_zones": "zones", "protect_marks": "marks", "protect_prefixes": "prefixes"}
    if key in protect:
        return getattr(policy.protect, protect[key])
    return getattr(policy, key)


# -- values ------------------------------------------------------------------------------------


def _interface_regex(patterns: Iterable[str]) -> re.Pattern[str]:
    return re.compile("|".join(".*".join(map(re.escape, p.split("*"))) for p in patterns) + r"\Z")


@dataclass(frozen=True, slots=True)
class Policy:
    """One named policy with every key resolved."""

    name: str
    enabled: bool = True
    triggers: frozenset[str] = ALL_TRIGGERS
    eligibility: Eligibility = DEFAULT_ELIGIBILITY
    # None: events on any interface. Otherwise an event that names an interface
    # activates the policy only if one pattern matches it; one without an interface always does.
    interfaces: tuple[str, ...] | None = None
    action: Action = Action.FLUSH
    max_deletions: int = 100_000
    debounce: float = 0.25
    max_wait: float = 2.0

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"bad policy name {self.name!r}")
        if self.max_wait < self.debounce:
            raise ValueError(f"policy {self.name}: max_wait {self.max_wait} < debounce {self.debounce}")

    def matches_interface(self, name: str | None) -> bool:
        if self.interfaces is None or name is None:
            return True
        return _interface_regex(self.interfaces).match(name) is not None

    def triggered_by(self, kind: str, interface: str | None = None) -> bool:
        """Does one event activate this policy? Kinds outside ``TRIGGERS`` (startup, restart,
        overrun, request) activate every enabled policy: they mean "re-read everything";
        an explicit request for one interface (``topowatch trigger IFACE``, D-Bus
        ``Trigger``) only those whose ``interfaces`` admit it."""
        if not self.enabled:
            return False
        if kind in ALL_TRIGGERS:
            return kind in self.triggers and self.matches_interface(interface)
        if kind == REQUEST:
            return self.matches_interface(interface)
        return True

    def value(self, key: str) -> Any:
        """The resolved value of a key, in its parsed form (``KEYS[key].parse`` output)."""
        if key in _ELIGIBILITY_KEYS:
            return getattr(self.eligibility, key)
        return getattr(self, key)


_ELIGIBILITY_KEYS = frozenset(
    {"families", "protocols", "unreplied_only", "zones", "marks", "sources", "destinations"}
)

DEFAULT_POLICY = Policy(DEFAULT_NAME)


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a value came from: a file and line, or the built-in default (file == "")."""

    file: str = ""
    line: int = 0

    def __str__(self) -> str:
        if not self.file:
            return BUILTIN
        return f"{self.file}:{self.line}" if self.line else self.file


class FileStatus(enum.StrEnum):
    READ = "read"
    MASKED = "masked"  # empty or /dev/null: hides lower ones, contributes nothing
    OVERRIDDEN = "overridden"  # a higher directory holds the same name


@dataclass(frozen=True, slots=True)
class PolicyFile:
    name: str
    path: str
    status: FileStatus
    by: str = ""  # for OVERRIDDEN: the path that hides this one


@dataclass(frozen=True, slots=True)
class Selection:
    """The policies one burst activates, combined for one reaction."""

    policies: tuple[Policy, ...]

    @property
    def eligibility(self) -> Eligibility:
        """Admits an entry when an active policy does (its loose bound suits a kernel dump filter)."""
        return any_of([p.eligibility for p in self.policies])

    @property
    def max_deletions(self) -> int:
        """The smallest cap among active flushing policies (0 when none flushes)."""
        return min((p.max_deletions for p in self.policies if p.action is Action.FLUSH), default=0)

    def action_for(self, entry: Entry) -> Action | None:
        """FLUSH if an active policy admitting the entry flushes, LOG if only loggers admit it."""
        admitting = [p for p in self.policies if p.eligibility.admits(entry)]
        if not admitting:
            return None
        return Action.FLUSH if any(p.action is Action.FLUSH for p in admitting) else Action.LOG

    def flushes(self, entry: Entry) -> bool:
        return self.action_for(entry) is Action.FLUSH

    def names(self) -> str:
        return ", ".join(p.name for p in self.policies) or "none"


@dataclass(frozen=True, slots=True)
class EffectivePolicy:
    """The merged policies in force. Compares equal by meaning (policies), not by origin."""

    policies: tuple[Policy, ...] = (DEFAULT_POLICY,)
    pressure: PressurePolicy = _PRESSURE_DEFAULT
    origins: Mapping[tuple[str, str], Origin] = field(
        default_factory=lambda: MappingProxyType({}), compare=False, hash=False
    )
    files: tuple[PolicyFile, ...] = field(default=(), compare=False, hash=False)
    dirs: tuple[str, ...] = field(default=DEFAULT_DIRS, compare=False, hash=False)

    def __getitem__(self, name: str) -> Policy:
        for policy in self.policies:
            if policy.name == name:
                return policy
        raise KeyError(name)

    @property
    def enabled(self) -> tuple[Policy, ...]:
        return tuple(p for p in self.policies if p.enabled)

    @property
    def debounce(self) -> float:
        """One burst window for the daemon: the shortest among enabled policies."""
        return min((p.debounce for p in self.enabled), default=DEFAULT_POLICY.debounce)

    @property
    def max_wait(self) -> float:
        return min((p.max_wait for p in self.enabled), default=DEFAULT_POLICY.max_wait)

    @property
    def triggers(self) -> frozenset[str]:
        return frozenset().union(*(p.triggers for p in self.enabled))

    def select(self, events: Iterable[tuple[str, str | None]]) -> Selection:
        """The policies a burst activates; ``events`` are (kind, interface or None) pairs."""
        events = list(events)
        return Selection(tuple(
            p for p in self.policies if any(p.triggered_by(kind, iface) for kind, iface in events)
        ))

    def origin(self, policy: str, key: str) -> Origin:
        return self.origins.get((policy, key), Origin())

    def render(self) -> str:
        """The effective policy as TOML, each value with a comment naming where it came from."""
        out = ["# topowatch effective policy", "# directories, highest priority first:"]
        out += [f"#   {d}" for d in self.dirs]
        for f in self.files:
            if f.status is FileStatus.READ:
                out.append(f"# read       {f.path}")
            elif f.status is FileStatus.MASKED:
                out.append(f"# masked     {f.name} by {f.path}")
            else:
                out.append(f"# overridden {f.path} by {f.by}")
        if not self.files:
            out.append("# no policy files")
        if not any(name != _PRESSURE for name, _ in self.origins):
            out.append(f"# no file defines a policy: the {BUILTIN} policy applies")
        for policy in self.policies:
            out += ["", f"[policy.{policy.name}]"]
            for key, spec in KEYS.items():
                value = policy.value(key)
                where = str(self.origin(policy.name, key))
                if value is None:
                    out.append(f"# {key}: {spec.doc}  ({where})")
                else:
                    out.append(f"{key} = {_render_value(key, value)}  # {where}")
        out += ["", "[pressure]"]
        for key, spec in PRESSURE_KEYS.items():
            value = _pressure_value(self.pressure, key)
            where = str(self.origin(_PRESSURE, key))
            if value in ((), frozenset()):
                out.append(f"# {key}: {spec.doc}: none  ({where})")
            else:
                out.append(f"{key} = {_render_value(key, value)}  # {where}")
        return "\n".join(out) + "\n"


def _render_value(key: str, value: Any) -> str:
    def strings(items: Iterable[str]) -> str:
        return "[" + ", ".join(f'"{s}"' for s in items) + "]"

    if isinstance(value, bool):
        return "true" if value else "false"
    if key == "triggers":
        return strings(t for t in TRIGGERS if t in value)
    if key == "families":
        return strings(FAMILY_OF[f] for f in sorted(value))
    if key == "protocols":
        names = (f'"{PROTO_NAMES[p]}"' if p in PROTO_NAMES else str(p) for p in sorted(value))
        return "[" + ", ".join(names) + "]"
    if key == "zones":
        return "[" + ", ".join(str(z) for z in sorted(value)) + "]"
    if key == "marks":
        return strings(f"{m:#x}/{k:#x}" for m, k in value)
    if key == "lower_timeouts":
        return "{ " + ", ".join(f"{name} = {seconds}" for name, seconds in value) + " }"
    if key == "evict_replied":
        return _render_value("protocols", value)
    if key == "protect_zones":
        return _render_value("zones", value)
    if key == "protect_marks":
        return _render_value("marks", value)
    if key in ("sources", "destinations", "protect_prefixes"):
        return strings(str(n) for n in value)
    if key == "interfaces":
        return strings(value)
    if isinstance(value, Action):
        return f'"{value.value}"'
    return repr(value)


DEFAULT_EFFECTIVE = EffectivePolicy()


# -- files -------------------------------------------------------------------------------------


def _key_parts(dotted: str) -> tuple[str, ...]:
    return tuple(p[1:-1] if p[0] in "\"'" else p for p in _KEY_PART_RE.findall(dotted))


def _scan(text: str) -> Iterable[tuple[int, tuple[str, ...]]]:
    """(line, key path) for each table header and ``key =`` line, skipping multi-line strings."""
    table: tuple[str, ...] = ()
    in_string = ""
    for number, line in enumerate(text.splitlines(), start=1):
        if in_string:
            if line.count(in_string) % 2:
                in_string = ""
            continue
        header = _HEADER_RE.match(line)
        if header:
            table = _key_parts(header.group(1))
            yield number, table
            continue
        keyline = _KEYLINE_RE.match(line)
        if keyline:
            yield number, table + _key_parts(keyline.group(1))
        for quote in ('"""', "'''"):
            if line.count(quote) % 2:
                in_string = quote
                break


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path (and table) to the first line that names it.

    tomllib gives no positions; this scan knows table headers and ``key =``
    lines (dotted or quoted), skips multi-line strings, and is good enough to
    point a person at the line.
    """
    lines: dict[tuple[str, ...], int] = {}
    for number, path in _scan(text):
        for i in range(1, len(path) + 1):
            lines.setdefault(path[:i], number)
    return lines


def _line_of(lines: Mapping[tuple[str, ...], int], path: tuple[str, ...]) -> int:
    for i in range(len(path), 0, -1):
        if path[:i] in lines:
            return lines[path[:i]]
    return 0


def _key_at_line(text: str, line: int) -> str:
    """The dotted key a syntax error's line names, if the scan can tell."""
    return next((".".join(path) for number, path in _scan(text) if number == line), "")


@dataclass(slots=True)
class _Loader:
    trusted_uids: Collection[int]
    errors: list[PolicyError] = field(default_factory=list)
    required: Collection[str] = ()  # directories that held policy files at the last load

    def error(self, message: str, file: str, line: int = 0, key: str = "") -> None:
        self.errors.append(PolicyError(message, file=file, line=line, key=key))

    def discover(self, dirs: Sequence[str]) -> list[PolicyFile]:
        winners: dict[str, PolicyFile] = {}
        hidden: list[PolicyFile] = []
        for directory in dirs:
            gone = ("held policy files at the last load and is now {}; keeping the last good policy "
                    "(restart topowatch to run without it)")
            try:
                st = os.stat(directory)
            except FileNotFoundError:
                if os.path.normpath(directory) in self.required:
                    self.error(gone.format("gone"), directory)
                continue
            except PermissionError:
                if os.geteuid() != 0:
                    continue  # a user's ``check``: root's /run/topowatch (0700) counts as absent
                self.error("cannot read directory: permission denied", directory)
                continue
            except OSError as exc:
                self.error(f"cannot read directory: {exc.strerror}", directory)
                continue
            if not stat.S_ISDIR(st.st_mode):
                self.error("not a directory", directory)
                continue
            problem = _trust_problem(directory, st, self.trusted_uids) or _parent_problem(
                directory, self.trusted_uids)
            if problem:
                self.error(f"directory {problem}", directory)
                continue
            try:
                names = sorted(os.listdir(directory))
            except OSError as exc:
                self.error(f"cannot read directory: {exc.strerror}", directory)
                continue
            for name in names:
                if not name.endswith(".toml") or name.startswith("."):
                    continue
                path = os.path.join(directory, name)
                if name in winners:
                    hidden.append(PolicyFile(name, path, FileStatus.OVERRIDDEN, winners[name].path))
                    continue
                winners[name] = PolicyFile(name, path, FileStatus.READ)
        files = []
        for name in sorted(winners):
            entry = winners[name]
            if self._masks(entry.path):
                entry = PolicyFile(name, entry.path, FileStatus.MASKED)
            files.append(entry)
        return files + hidden

    def _masks(self, path: str) -> bool:
        """Is this an empty file or a link to /dev/null? Refused files count as not masking."""
        if os.path.islink(path) and os.path.realpath(path) == os.devnull:
            st = os.lstat(path)
            if st.st_uid not in self.trusted_uids:
                self.error(f"refused: symlink owned by uid {st.st_uid}, not root", path)
            return True
        try:
            st = os.stat(path)
        except OSError as exc:
            self.error(f"cannot read: {exc.strerror}", path)
            return True
        if not (stat.S_ISREG(st.st_mode) and st.st_size == 0):
            return False
        problem = _trust_problem(path, st, self.trusted_uids)
        if problem:
            self.error(problem, path)
        return True

    def read(self, path: str) -> dict[str, dict[str, tuple[Any, int]]]:
        """The policies one file sets: name -> key -> (parsed value, line)."""
        try:
            # Non-blocking: opening a FIFO for reading must not wait for a writer.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as exc:
            self.error(f"cannot read: {exc.strerror}", path)
            return {}
        try:
            with os.fdopen(fd, "rb") as handle:
                st = os.fstat(handle.fileno())
                if not stat.S_ISREG(st.st_mode):
                    self.error("not a regular file", path)
                    return {}
                problem = _trust_problem(path, st, self.trusted_uids)
                if problem:
                    self.error(problem, path)
                    return {}
                raw = handle.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            self.error(f"cannot read: {exc.strerror}", path)
            return {}
        if len(raw) > MAX_FILE_BYTES:
            self.error(f"too large: more than {MAX_FILE_BYTES // 1024} KiB (a policy file is a few lines)",
                       path)
            return {}
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.error(f"not UTF-8 (byte {exc.start})", path, raw[: exc.start].count(b"\n") + 1)
            return {}
        try:
            document = tomllib.loads(text)
        except RecursionError:
            self.error("nested too deeply to read", path)
            return {}
        except tomllib.TOMLDecodeError as exc:
            match = _TOML_POS_RE.search(str(exc))
            line = int(match.group(1)) if match else max(1, text.count("\n"))
            message = _TOML_POS_RE.sub(r"at column \2", str(exc)) if match else str(exc)
            self.error(f"bad TOML syntax: {message}", path, line, _key_at_line(text, line))
            return {}
        return self.parse(path, text, document)

    def parse(self, path: str, text: str, document: dict[str, Any]) -> dict[str, dict[str, tuple[Any, int]]]:
        lines = key_lines(text)
        out: dict[str, dict[str, tuple[Any, int]]] = {}
        for top, value in document.items():
            if top == "pressure":
                self._parse_pressure(path, lines, value, out.setdefault(_PRESSURE, {}))
                continue
            if top != "policy":
                self.error(f"unknown key {top!r}{_suggest(top, ['policy', 'pressure'])} (a file holds "
                           f"[policy.NAME] tables and a [pressure] table)",
                           path, _line_of(lines, (top,)), top)
                continue
            if not isinstance(value, dict):
                self.error(f"expected [policy.NAME] tables, got {_type_name(value)}", path,
                           _line_of(lines, (top,)), top)
                continue
            for name, table in value.items():
                where = ("policy", name)
                if not _NAME_RE.match(name):
                    self.error("bad policy name: use letters, digits, '-' and '_'", path,
                               _line_of(lines, where), f"policy.{name}")
                    continue
                if not isinstance(table, dict):
                    self.error(f"expected a table [policy.{name}], got {_type_name(table)}", path,
                               _line_of(lines, where), f"policy.{name}")
                    continue
                keys = out.setdefault(name, {})
                for key, item in table.items():
                    line = _line_of(lines, (*where, key))
                    dotted = f"policy.{name}.{key}"
                    spec = KEYS.get(key)
                    if spec is None:
                        self.error(f"unknown key {key!r}{_suggest(key, KEYS)}", path, line, dotted)
                        continue
                    try:
                        keys[key] = (spec.parse(item), line)
                    except _Invalid as exc:
                        self.error(str(exc), path, line, dotted)
        return out


    def _parse_pressure(
        self, path: str, lines: Mapping[tuple[str, ...], int], table: object, keys: dict[str, tuple[Any, int]]
    ) -> None:
        if not isinstance(table, dict):
            self.error(f"expected a table [pressure], got {_type_name(table)}", path,
                       _line_of(lines, ("pressure",)), "pressure")
            return
        for key, item in table.items():
            line = _line_of(lines, ("pressure", key))
            spec = PRESSURE_KEYS.get(key)
            if spec is None:
                hint = _suggest(key, PRESSURE_KEYS)
                self.error(f"unknown key {key!r}{hint}", path, line, f"pressure.{key}")
                continue
            try:
                keys[key] = (spec.parse(item), line)
            except _Invalid as exc:
                self.error(str(exc), path, line, f"pressure.{key}")


def load_policies(
    dirs: Sequence[str] | None = None,
    *,
    trusted_uids: Collection[int] | None = None,
    required: Collection[str] = (),
) -> EffectivePolicy:
    """Read, merge and validate every policy file; raise ``PolicyErrors`` listing every mistake.

    ``dirs`` are highest priority first (default ``DEFAULT_DIRS``). ``trusted_uids``
    are the owners a file may have (default root and the effective user).
    ``required`` are directories that must exist (they held files before).
    """
    dirs = tuple(DEFAULT_DIRS if dirs is None else dirs)
    loader = _Loader(_default_trusted_uids() if trusted_uids is None else frozenset(trusted_uids),
                     required=frozenset(os.path.normpath(d) for d in required))
    files = loader.discover(dirs)
    merged: dict[str, dict[str, tuple[Any, Origin]]] = {}
    for f in files:
        if f.status is not FileStatus.READ:
            continue
        for name, keys in loader.read(f.path).items():
            target = merged.setdefault(name, {})
            for key, (value, line) in keys.items():
                target[key] = (value, Origin(f.path, line))
    policies: list[Policy] = []
    origins: dict[tuple[str, str], Origin] = {}
    pressure = _PRESSURE_DEFAULT
    chosen_pressure = merged.pop(_PRESSURE, {})
    if chosen_pressure:
        values = {key: chosen_pressure[key][0] if key in chosen_pressure else spec.default
                  for key, spec in PRESSURE_KEYS.items()}
        for key, (_, origin) in chosen_pressure.items():
            origins[(_PRESSURE, key)] = origin
        problem = None
        if values["low"] >= values["high"]:
            problem = ("low", "high", f"low {values['low']} must be below high {values['high']}")
        elif values["min_interval"] > values["max_interval"]:
            problem = ("min_interval", "max_interval",
                       f"min_interval {values['min_interval']} exceeds max_interval {values['max_interval']}")
        if problem is None:
            pressure = _pressure_policy(values)
        else:
            first, second, message = problem
            key = first if first in chosen_pressure else second
            other = second if key == first else first
            other_at = chosen_pressure[other][1] if other in chosen_pressure else Origin()
            origin = chosen_pressure[key][1]
            loader.error(f"{message} ({other} from {other_at})", origin.file, origin.line, f"pressure.{key}")
    for name in sorted(merged):
        chosen = merged[name]
        values = {key: chosen[key][0] if key in chosen else spec.default for key, spec in KEYS.items()}
        for key, (_, origin) in chosen.items():
            origins[(name, key)] = origin
        if values["max_wait"] < values["debounce"]:
            key = "max_wait" if "max_wait" in chosen else "debounce"
            origin = chosen[key][1]
            other = "debounce" if key == "max_wait" else "max_wait"
            other_at = chosen[other][1] if other in chosen else Origin()
            loader.error(f"max_wait {values['max_wait']} is shorter than debounce {values['debounce']} "
                         f"({other} from {other_at})", origin.file, origin.line, f"policy.{name}.{key}")
            continue
        policies.append(Policy(
            name=name,
            enabled=values["enabled"],
            triggers=values["triggers"],
            eligibility=Eligibility(
                **{key: values[key] for key in KEYS if key in _ELIGIBILITY_KEYS}
            ),
            interfaces=values["interfaces"],
            action=values["action"],
            max_deletions=values["max_deletions"],
            debounce=values["debounce"],
            max_wait=values["max_wait"],
        ))
    if loader.errors:
        raise PolicyErrors(loader.errors)
    return EffectivePolicy(
        policies=tuple(policies) or (DEFAULT_POLICY,),
        pressure=pressure,
        origins=MappingProxyType(origins),
        files=tuple(files),
        dirs=dirs,
    )


class PolicyStore:
    """The policy in force, and reloads that never leave the daemon without one.

    ``PolicyStore.open`` raises on errors: a daemon must not start on a policy
    it could not read. ``reload`` raises ``PolicyErrors`` too, but keeps the
    previous policy in force; the caller logs the errors. A running daemon
    reloads with ``reload_in_worker`` (SIGHUP and D-Bus alike): the files are
    read off the event loop, within a time limit, one reload at a time.
    """

    def __init__(
        self,
        current: EffectivePolicy,
        dirs: Sequence[str] | None = None,
        *,
        trusted_uids: Collection[int] | None = None,
    ) -> None:
        self.current = current
        self.dirs = tuple(DEFAULT_DIRS if dirs is None else dirs)
        self.trusted_uids = trusted_uids
        self._reloading = trio.Lock()

    @classmethod
    def open(
        cls, dirs: Sequence[str] | None = None, *, trusted_uids: Collection[int] | None = None
    ) -> PolicyStore:
        return cls(load_policies(dirs, trusted_uids=trusted_uids), dirs, trusted_uids=trusted_uids)

    @property
    def populated(self) -> frozenset[str]:
        """The directories that held policy files (read, masking or overridden) at the last load."""
        return frozenset(os.path.normpath(os.path.dirname(f.path)) for f in self.current.files)

    def load(self) -> EffectivePolicy:
        """Read the files again without putting them in force (blocking: run it off the event loop)."""
        return load_policies(self.dirs, trusted_uids=self.trusted_uids, required=self.populated)

    def install(self, policy: EffectivePolicy) -> None:
        self.current = policy

    def reload(self) -> EffectivePolicy:
        """Load again; the new policy replaces the current one only if it is valid (blocking)."""
        policy = self.load()
        self.install(policy)
        return policy

    async def reload_in_worker(self, timeout: float = RELOAD_TIMEOUT) -> EffectivePolicy:
        """``reload`` for a running daemon: the files are read in a worker thread within ``timeout`` s.

        The event loop goes on meanwhile (events, the watchdog, D-Bus calls).
        Reloads run one at a time, each putting in force what it read. Raises
        ``PolicyErrors`` for mistakes in the files and ``PolicyError`` for a
        read that did not finish in time (the thread is abandoned: files are
        bounded in size, so it ends on its own) or failed in any other way;
        the current policy then stays.
        """
        async with self._reloading:
            try:
                with trio.fail_after(timeout):
                    policy = await trio.to_thread.run_sync(self.load, abandon_on_cancel=True)
            except trio.TooSlowError:
                raise PolicyError(f"reading the policy files took more than {timeout:g} s") from None
            except PolicyError:
                raise
            except Exception as exc:  # a bug in reading must not end the daemon either
                raise PolicyError(f"cannot read the policy files ({type(exc).__name__}: {exc})") from exc
            self.install(policy)
            return policy


def _selector_text(e: Eligibility) -> str:
    """The entries a policy's selectors admit, in words."""
    state = "UNREPLIED" if e.unreplied_only else "UNREPLIED and replied (live connections too)"
    if e.protocols is None:
        protos = "entries of connectionless protocols (not tcp, sctp, dccp)"
    else:
        protos = "entries of " + ", ".join(PROTO_NAMES.get(p, str(p)) for p in sorted(e.protocols))
    where = []
    if e.families != DEFAULT_ELIGIBILITY.families:
        where.append("/".join(FAMILY_OF[f] for f in sorted(e.families)) + " only")
    if e.zones is not None:
        where.append("in zone " + ", ".join(str(z) for z in sorted(e.zones)))
    if e.marks is not None:
        where.append("with mark " + ", ".join(f"{m:#x}/{k:#x}" for m, k in e.marks))
    if e.sources is not None:
        where.append("from " + ", ".join(str(n) for n in e.sources))
    if e.destinations is not None:
        where.append("to " + ", ".join(str(n) for n in e.destinations))
    return f"{state} {protos}{' ' + ', '.join(where) if where else ''}"


def may_delete(policy: EffectivePolicy) -> list[str]:
    """What each policy in force may delete, one sentence each (``topowatch check`` prints them)."""
    out: list[str] = []
    for p in policy.policies:
        head = f"policy {p.name} (on {', '.join(t for t in TRIGGERS if t in p.triggers) or 'no event'})"
        if not p.enabled:
            out.append(f"{head}: disabled, deletes nothing")
        elif p.action is Action.LOG:
            out.append(f"{head}: deletes nothing; logs the stale {_selector_text(p.eligibility)}")
        else:
            out.append(f"{head}: deletes {_selector_text(p.eligibility)} whose NAT the current routes and "
                       f"ruleset would no longer give (stale), at most {p.max_deletions} per reaction")
    pressure = policy.pressure
    if not pressure.enabled:
        out.append("pressure: off; no entry is evicted for space and no timeout is changed")
        return out
    head = (f"pressure (from {pressure.high:.0%} of nf_conntrack_max down to {pressure.low:.0%}): "
            "evicts entries that need not be stale, least recently refreshed first")
    parts = []
    if pressure.evict_unreplied:
        parts.append("UNREPLIED entries of any protocol (a tcp SYN_SENT too)")
    if pressure.evict_replied:
        names = ", ".join(PROTO_NAMES.get(p, str(p)) for p in sorted(pressure.evict_replied))
        parts.append(f"only while the kernel refuses new flows, replied (assured, possibly live) {names} "
                     "entries")
    if not parts:
        parts.append("nothing (it only lowers timeouts)")
    protect = pressure.protect
    never = "never replied tcp, sctp or dccp"
    if protect.zones or protect.marks or protect.prefixes:
        never += ", never an entry matching a protect_* key"
    out.append(f"{head}: {'; '.join(parts)}; at most {pressure.batch} per look; {never}")
    if pressure.lower_timeouts:
        out.append("pressure: meanwhile lowers the timeouts " + ", ".join(
            f"{name} {seconds} s" for name, seconds in pressure.lower_timeouts) + " (restored after)")
    return out


def policy_json(policy: EffectivePolicy) -> dict[str, Any]:
    """The effective policy as one JSON object (``topowatch check --json``)."""

    def value(key: str, v: Any) -> Any:
        if isinstance(v, bool | int | float | str) or v is None:
            return v.value if isinstance(v, Action) else v
        if key in ("lower_timeouts",):
            return dict(v)
        rendered = _render_value(key, v)
        try:
            return tomllib.loads(f"v = {rendered}")["v"]
        except tomllib.TOMLDecodeError:
            return rendered

    return {
        "dirs": list(policy.dirs),
        "files": [{"name": f.name, "path": f.path, "status": f.status.value, "by": f.by or None}
                  for f in policy.files],
        "policies": {
            p.name: {key: value(key, p.value(key)) for key in KEYS} for p in policy.policies
        },
        "pressure": {key: value(key, _pressure_value(policy.pressure, key)) for key in PRESSURE_KEYS},
        "may_delete": may_delete(policy),
    }


def check_main(rules_dirs: list[str] | None, *, as_json: bool = False) -> int:
    """``topowatch check [--rules-dir DIR] [--json]``: the effective policy and what it may delete (0),
    or every error (1)."""
    try:
        policy = load_policies(rules_dirs)
    except PolicyErrors as exc:
        if as_json:
            print(json.dumps({"valid": False, "errors": [str(e) for e in exc.errors]}, indent=2))
        for error in exc.errors:
            print(f"topowatch: {escape(str(error))}", file=sys.stderr)  # file names may hold anything
        print(f"topowatch: {len(exc.errors)} error(s); policy not valid", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps({"valid": True, **policy_json(policy)}, indent=2))
        return 0
    sys.stdout.write(policy.render())
    sys.stdout.write("\n# what these policies may delete:\n")
    sys.stdout.write("".join(f"#   {line}\n" for line in may_delete(policy)))
    return 0
