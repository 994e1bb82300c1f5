# SPDX-License-Identifier: GPL-2.0-or-later
"""core.pressure: the picker fed raw dump tuples (``add_raw``, what ``Conntrack.scan`` feeds) never
picks a protected entry, and counts the census as for built entries.

Issue 16's mutation run found ``add_raw`` checked only without any protection, all IPv4, zone and
mark 0: a raw tuple's zone, mark, family or original source read from another field survived, and
so would a pressure run that evicts entries the policy protects. The expectation is written out
again here (``test_pressure.expected_ranks``: filter by zone, mark and prefix, then per class the
oldest), and the census is counted by hand.
"""

from __future__ import annotations

from collections import Counter
from ipaddress import ip_address

import pytest

from topowatch.core.conntrack import IPS_ASSURED, IPS_SEEN_REPLY, Entry
from topowatch.core.flow import IPPROTO_TCP, IPPROTO_UDP
from topowatch.core.model import AF_INET6
from topowatch.core.pressure import EvictionPicker, PressurePolicy

from test_pressure import PROTECT, TIMEOUTS, entry, expected_ranks  # isort: skip

# PROTECT: zone 7, mark 0x10/0xf0, 10.9.0.0/16 and 2001:db8::/120 (source or destination).
TABLE = [
    entry(1, timeout=3),  # picked: the oldest UNREPLIED
    entry(2, zone=7, timeout=1),  # protected by its zone (its mark 0)
    entry(3, mark=0x17, timeout=1),  # protected by its mark (zone 0)
    entry(4, src="10.9.1.1", timeout=1),  # protected by its source
    entry(5, timeout=2),  # picked
    entry(6, family=AF_INET6, src="2001:db8::42", timeout=1),  # protected by its v6 source
    entry(7, family=AF_INET6, src="2001:db9::1", timeout=4),  # v6, not protected: picked
    entry(8, mark=0x27, zone=3, timeout=1),  # zone 3, mark 0x27: not protected, picked
    entry(9, status=IPS_SEEN_REPLY | IPS_ASSURED, timeout=20),  # replied udp: the last resort
    entry(10, status=IPS_SEEN_REPLY | IPS_ASSURED, zone=7, timeout=5),  # protected
    entry(11, proto=IPPROTO_TCP, status=IPS_SEEN_REPLY | IPS_ASSURED, timeout=5),  # replied tcp: never
    entry(12, src="10.8.0.1", timeout=25),  # picked last of the UNREPLIED
    entry(13, zone=0x17, mark=7, timeout=1),  # zone 23 and mark 7: neither protects, picked
]
PROTECTED = {2, 3, 4, 6, 10}


def raw(e: Entry) -> tuple[object, ...]:
    o, r = e.orig, e.reply
    return (e.family, e.proto, o.src.packed, o.dst.packed, o.sport, o.dport, r.src.packed, r.dst.packed,
            r.sport, r.dport, e.status, e.zone, e.mark, e.id, e.timeout)  # fmt: skip


def streamed(entries: list[Entry], keep: int, policy: PressurePolicy) -> EvictionPicker:
    by_id = {e.id: e for e in entries}
    picker = EvictionPicker(policy, keep, collect_replied=True, timeouts=TIMEOUTS, build=lambda r: by_id[r[13]])
    for e in entries:
        picker.add_raw(raw(e))  # type: ignore[arg-type]
    return picker


POLICY = PressurePolicy(enabled=True, evict_replied=frozenset({IPPROTO_UDP}), protect=PROTECT)


@pytest.mark.parametrize("keep", [0, 1, 2, 5, 20])
def test_raw_entries_are_picked_by_the_rules_written_out(keep: int) -> None:
    picker = streamed(TABLE, keep, POLICY)
    chosen = picker.chosen()
    assert [(1 if c.replied else 0, c.age) for c in chosen] == expected_ranks(TABLE, POLICY, keep, True)
    assert not {c.entry.id - 1 for c in chosen} & PROTECTED
    assert picker.census.protected == len(PROTECTED)
    assert picker.census.examined == len(TABLE)


def test_raw_entries_picked_are_those_the_rules_pick() -> None:
    chosen = streamed(TABLE, 20, POLICY).chosen()
    # UNREPLIED oldest first (udp class timeout 30: age 30 - timer; 8 and 13 tie), then the
    # replied udp (udp_stream 120: age 100).
    picked = [c.entry.id - 1 for c in chosen]
    assert set(picked[:2]) == {8, 13}
    assert picked[2:] == [5, 1, 7, 12, 9]
    assert [c.age for c in chosen] == [29, 29, 28, 27, 26, 5, 100]
    assert [c.replied for c in chosen] == [False] * 6 + [True]


def test_the_census_of_raw_entries_counts_their_original_sources() -> None:
    picker = streamed(TABLE, 20, POLICY)
    want: dict[str, Counter[bytes]] = {}
    for e in TABLE:
        state = "assured" if e.status & IPS_ASSURED else "UNREPLIED"
        label = f"{state} {'tcp' if e.proto == IPPROTO_TCP else 'udp'}"
        want.setdefault(label, Counter())[e.orig.src.packed] += 1
    assert picker.census.sources == want
    assert picker.census.classes == Counter({("UNREPLIED", "udp"): 10, ("assured", "udp"): 2, ("assured", "tcp"): 1})
    assert ip_address("10.9.1.1").packed in picker.census.sources["UNREPLIED udp"]  # protected, still counted


def test_a_raw_entry_without_a_builder_is_refused_with_a_reason() -> None:
    picker = EvictionPicker(POLICY, 5, collect_replied=False, timeouts=TIMEOUTS)
    picker.add_raw(raw(TABLE[0]))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^EvictionPicker\.add_raw needs an entry builder$"):
        picker.chosen()


@pytest.mark.parametrize(("src", "dst", "protected"), [
    ("10.9.0.0", "192.0.2.1", True),  # the first and the last address of 10.9.0.0/16 are inside it
    ("10.9.255.255", "192.0.2.1", True),
    ("192.0.2.1", "10.9.0.0", True),
    ("192.0.2.1", "10.9.255.255", True),
    ("10.8.255.255", "10.10.0.0", False),  # just outside, on either side
    ("2001:db8::", "2001:db8:ffff::1", True),  # 2001:db8::/120
    ("2001:db8::ff", "2001:db8:ffff::1", True),
    ("2001:db8:ffff::1", "2001:db8::ff", True),
    ("2001:db8:ffff::1", "2001:db8::", True),
    ("2001:db8::100", "2001:db7:ffff:ffff:ffff:ffff:ffff:ffff", False),
])  # fmt: skip
def test_the_ends_of_a_protected_prefix_are_protected(src: str, dst: str, protected: bool) -> None:
    a, b = ip_address(src), ip_address(dst)
    family = 2 if a.version == 4 else AF_INET6
    assert PROTECT.covers_raw(family, 0, 0, a.packed, b.packed) is protected
    e = entry(1, family=family, src=src)
    e = Entry(e.family, e.proto, type(e.orig)(a, b, e.orig.sport, e.orig.dport),
              type(e.reply)(b, a, e.reply.sport, e.reply.dport), e.status, 0, 0, e.id, 1)  # fmt: skip
    assert [c.entry.id for c in streamed([e], 5, POLICY).chosen()] == ([] if protected else [e.id])
