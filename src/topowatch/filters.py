# SPDX-License-Identifier: GPL-2.0-or-later
"""conntrack-style filters of ``plan`` and ``flush``: -p, -s, -d, --zone, --mark, --family.

A filter only narrows: an entry must be admitted by the policies *and* by
the filter (``narrow``), so no option can make an entry eligible that the
policies exclude (tcp stays out unless a policy lists it). Options mirror
conntrack(8): ``-s``/``-d`` are the original source and destination (here
with a prefix length too), ``-p`` a protocol name or number, ``-w``/``--zone``
a zone, ``-m``/``--mark`` a mark with an optional mask, ``-f``/``--family``
ipv4 or ipv6. This module parses and combines; it never reads the kernel.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from topowatch.core.conntrack import Entry
from topowatch.core.eligibility import ALL_PROTOS, Eligibility
from topowatch.core.flow import PROTO_NUMBERS
from topowatch.core.model import AF_INET, AF_INET6, IPNetwork
from topowatch.errors import UsageError

FAMILIES = {"ipv4": AF_INET, "ipv6": AF_INET6}
U32 = 0xFFFFFFFF


def parse_proto(text: str) -> int:
    name = text.strip().lower()
    if name in PROTO_NUMBERS:
        return PROTO_NUMBERS[name]
    try:
        number = int(name, 0)
    except ValueError:
        raise UsageError(f"-p {text}: unknown protocol (names: {', '.join(sorted(PROTO_NUMBERS))}; "
                         "or a number 0..255)") from None
    if not 0 <= number <= 255:
        raise UsageError(f"-p {text}: a protocol number is 0..255")
    return number


def parse_prefix(option: str, text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise UsageError(f"{option} {text}: not an address or prefix (e.g. 10.0.1.0/24)") from None


def parse_mark(text: str) -> tuple[int, int]:
    value_text, _, mask_text = text.partition("/")
    try:
        value = int(value_text, 0)
        mask = int(mask_text, 0) if mask_text else U32
    except ValueError:
        raise UsageError(f"--mark {text}: not a number or number/mask (decimal or 0x hex)") from None
    if not (0 <= value <= U32 and 0 <= mask <= U32):
        raise UsageError(f"--mark {text}: marks and masks are 32-bit")
    if value & ~mask:
        raise UsageError(f"--mark {text}: sets bits outside its mask: it would match nothing")
    return value, mask


def parse_zone(text: str) -> int:
    try:
        zone = int(text, 0)
    except ValueError:
        raise UsageError(f"--zone {text}: not a number") from None
    if not 0 <= zone <= 0xFFFF:
        raise UsageError(f"--zone {text}: a zone is 0..65535")
    return zone


@dataclass(frozen=True, slots=True)
class EntryFilter:
    """What the command line selects; ``None`` in a field: any."""

    proto: int | None = None
    src: IPNetwork | None = None
    dst: IPNetwork | None = None
    zone: int | None = None
    mark: tuple[int, int] | None = None
    family: int | None = None

    @classmethod
    def parse(
        cls, *, proto: str | None = None, src: str | None = None, dst: str | None = None,
        zone: str | None = None, mark: str | None = None, family: str | None = None,
    ) -> EntryFilter:
        return cls(
            proto=parse_proto(proto) if proto is not None else None,
            src=parse_prefix("-s", src) if src is not None else None,
            dst=parse_prefix("-d", dst) if dst is not None else None,
            zone=parse_zone(zone) if zone is not None else None,
            mark=parse_mark(mark) if mark is not None else None,
            family=FAMILIES[family] if family is not None else None,
        )

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.proto, self.src, self.dst, self.zone, self.mark, self.family))

    def eligibility(self) -> Eligibility:
        """The filter as selectors that admit every state and protocol the filter does not name."""
        return Eligibility(
            families=frozenset({self.family}) if self.family is not None else frozenset(FAMILIES.values()),
            protocols=frozenset({self.proto}) if self.proto is not None else ALL_PROTOS,
            unreplied_only=False,
            zones=frozenset({self.zone}) if self.zone is not None else None,
            marks=(self.mark,) if self.mark is not None else None,
            sources=(self.src,) if self.src is not None else None,
            destinations=(self.dst,) if self.dst is not None else None,
        )

    def json(self) -> dict[str, object]:
        out: dict[str, object] = {}
        if self.proto is not None:
            out["proto"] = self.proto
        if self.src is not None:
            out["src"] = str(self.src)
        if self.dst is not None:
            out["dst"] = str(self.dst)
        if self.zone is not None:
            out["zone"] = self.zone
        if self.mark is not None:
            out["mark"] = f"{self.mark[0]:#x}/{self.mark[1]:#x}"
        if self.family is not None:
            out["family"] = "ipv4" if self.family == AF_INET else "ipv6"
        return out


def narrow(entries: Iterable[Entry], policy: Eligibility, cli: EntryFilter) -> list[Entry]:
    """The entries both the policies and the filter admit (the filter can only take away)."""
    if not cli:
        return list(entries)
    selectors = cli.eligibility()
    return [e for e in entries if selectors.admits(e) and policy.admits(e)]
