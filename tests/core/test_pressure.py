"""core.pressure: watermarks with hysteresis, the eviction budget, and which entries go first.

The picker's choice is checked against an independent selection: filter by
the rules written out again here, sort by (class, age) with ``sorted``, take
the budget; compared by rank, since equal ranks may be chosen in any order.
"""

from __future__ import annotations

from ipaddress import ip_address, ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topowatch.core.conntrack import IPS_ASSURED, IPS_CONFIRMED, IPS_SEEN_REPLY, CtTuple, Entry, Reread
from topowatch.core.flow import IPPROTO_GRE, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP
from topowatch.core.model import AF_INET, AF_INET6
from topowatch.core.pressure import (
    Candidate,
    Census,
    EvictionPicker,
    PressureController,
    PressurePolicy,
    Protection,
    Sample,
    State,
    describe_pressure,
    lowered_values,
    restore_plan,
    sample_interval,
    still_evictable,
    timeout_class,
)

POLICY = PressurePolicy(enabled=True, high=0.9, low=0.7, batch=100, rate=1000)
TIMEOUTS = {"udp": 30, "udp_stream": 120, "tcp_syn_sent": 120, "tcp_syn_recv": 60, "icmp": 30,
            "icmpv6": 30, "gre": 30, "gre_stream": 180, "generic": 600}


def sample(t: float, count: int, *, limit: int = 1000, drop: int = 0, early: int = 0) -> Sample:
    return Sample(time=t, count=count, max=limit, buckets=limit, drop=drop, early_drop=early)


# -- watermarks -------------------------------------------------------------------------------

HYSTERESIS = [
    # fills (per mille of max), expected states after each, started at, ended at
    ([100, 500, 899], "NNN", (), ()),
    ([900], "H", (0,), ()),
    ([950, 800, 701, 700], "HHHN", (0,), (3,)),
    ([950, 850, 950, 600, 800, 900], "HHHNNH", (0, 5), (3,)),
    ([1000, 1000, 100], "HHN", (0,), (2,)),
]


@pytest.mark.parametrize(("fills", "states", "starts", "ends"), HYSTERESIS)
def test_watermarks_apply_with_hysteresis(fills: list[int], states: str, starts: tuple[int, ...],
                                          ends: tuple[int, ...]) -> None:
    controller = PressureController(POLICY)
    got, started, ended = "", [], []
    for i, fill in enumerate(fills):
        step = controller.observe(sample(float(i), fill))
        got += "H" if step.state is State.HIGH else "N"
        if step.started:
            started.append(i)
        if step.ended:
            ended.append(i)
    assert (got, tuple(started), tuple(ended)) == (states, starts, ends)


def test_budget_brings_the_count_to_the_low_mark_within_batch_and_rate() -> None:
    controller = PressureController(POLICY)
    first = controller.observe(sample(0.0, 950))
    assert first.budget == 100  # excess 250, batch 100
    controller.evicted(100)
    # 0.05 s later the bucket holds 1000/s * 0.05 = 50 tokens.
    assert controller.observe(sample(0.05, 850)).budget == 50
    controller.evicted(50)
    # Long after, the bucket is full again but the excess is only 20.
    assert controller.observe(sample(10.0, 720)).budget == 20
    # Below the low mark: pressure ends, nothing to evict.
    assert controller.observe(sample(11.0, 690)).budget == 0


def test_unused_budget_is_not_spent() -> None:
    controller = PressureController(POLICY)
    controller.observe(sample(0.0, 950))
    controller.evicted(3)  # only 3 candidates were found
    assert controller.observe(sample(0.001, 950)).budget == 98


def test_replied_entries_only_while_new_flows_are_refused() -> None:
    allowing = PressurePolicy(enabled=True, high=0.9, low=0.7, evict_replied=frozenset({IPPROTO_UDP}))
    controller = PressureController(allowing)
    assert not controller.observe(sample(0.0, 1000, drop=5)).replied_allowed  # no previous sample
    step = controller.observe(sample(1.0, 1000, drop=9))
    assert step.replied_allowed and step.refused == 4
    assert not controller.observe(sample(2.0, 1000, drop=9)).replied_allowed  # no new refusal
    # A policy that lists no protocol never opens the last resort.
    plain = PressureController(POLICY)
    plain.observe(sample(0.0, 1000, drop=0))
    assert not plain.observe(sample(1.0, 1000, drop=50)).replied_allowed


def test_counters_that_go_backwards_count_as_no_refusal() -> None:
    controller = PressureController(POLICY)
    controller.observe(sample(0.0, 1000, drop=100, early=100))
    step = controller.observe(sample(1.0, 1000, drop=3, early=2))
    assert (step.refused, step.early_dropped) == (0, 0)


@given(st.lists(st.integers(0, 1000), min_size=1, max_size=40))
def test_state_is_high_exactly_when_hysteresis_says(fills: list[int]) -> None:
    controller = PressureController(POLICY)
    high = False
    for i, fill in enumerate(fills):
        step = controller.observe(sample(float(i), fill))
        if not high and fill >= 900:
            high = True
        elif high and fill <= 700:
            high = False
        assert (step.state is State.HIGH) == high
        assert step.budget == 0 or high
        assert step.budget <= POLICY.batch


# -- sampling interval ----------------------------------------------------------------------------


def test_interval_is_rare_when_empty_and_frequent_near_the_high_mark() -> None:
    policy = PressurePolicy(enabled=True, min_interval=0.5, max_interval=30.0)
    empty = sample_interval(policy, sample(0, 0), None)
    half = sample_interval(policy, sample(0, 450), None)
    near = sample_interval(policy, sample(0, 900), None)
    assert empty == 30.0 and near == 0.5 and near < half < empty


@given(st.integers(0, 1000), st.integers(0, 1000))
def test_interval_never_grows_with_fill(a: int, b: int) -> None:
    policy = PressurePolicy(enabled=True)
    lo, hi = sorted((a, b))
    assert sample_interval(policy, sample(0, hi), None) <= sample_interval(policy, sample(0, lo), None)


def test_fast_growth_shortens_the_interval() -> None:
    policy = PressurePolicy(enabled=True, min_interval=0.5, max_interval=30.0)
    quiet = sample_interval(policy, sample(10, 100), sample(0, 100))
    # 100 entries/s with 800 to go before the high mark: look again within 4 s.
    growing = sample_interval(policy, sample(1, 100), sample(0, 0))
    assert growing == pytest.approx(4.0) and growing < quiet


# -- timeouts -------------------------------------------------------------------------------------


def test_lowering_only_lowers() -> None:
    policy = PressurePolicy(enabled=True, lower_timeouts=(("udp", 10), ("generic", 60), ("icmp", 45)))
    assert lowered_values(policy, {"udp": 30, "generic": 600, "icmp": 30}) == {"udp": 10, "generic": 60}
    assert lowered_values(policy, {"udp": 5}) == {}  # already lower: left alone
    assert lowered_values(policy, {}) == {}  # module not loaded: nothing to write


RESTORE = [
    # saved, written, current -> to restore, foreign
    ({"udp": 30}, {"udp": 10}, {"udp": 10}, {"udp": 30}, {}),
    ({"udp": 30}, {"udp": 10}, {"udp": 15}, {}, {"udp": 15}),  # an admin changed it meanwhile
    ({"udp": 30}, {"udp": 10}, {"udp": 30}, {}, {"udp": 30}),  # ... back to the old value: still theirs
    ({"udp": 30, "icmp": 30}, {"udp": 10, "icmp": 10}, {"udp": 10}, {"udp": 30}, {}),  # icmp vanished
    ({"udp": 30}, {}, {"udp": 10}, {"udp": 30}, {}),  # crashed before recording the write
]


@pytest.mark.parametrize(("saved", "written", "current", "restore", "foreign"), RESTORE)
def test_restore_writes_back_only_what_topowatch_changed(
    saved: dict[str, int], written: dict[str, int], current: dict[str, int],
    restore: dict[str, int], foreign: dict[str, int],
) -> None:
    assert restore_plan(saved, written, current) == (restore, foreign)


def test_policy_refuses_what_it_must_never_do() -> None:
    with pytest.raises(ValueError, match="never evicted"):
        PressurePolicy(evict_replied=frozenset({IPPROTO_TCP}))
    with pytest.raises(ValueError, match="low < high"):
        PressurePolicy(high=0.5, low=0.5)
    with pytest.raises(ValueError, match="cannot be lowered"):
        PressurePolicy(lower_timeouts=(("udp_stream", 5),))  # a healthy flow's timeout


TIMEOUT_CLASSES = [
    (IPPROTO_UDP, 0, "udp"),
    (IPPROTO_UDP, IPS_SEEN_REPLY, "udp"),
    (IPPROTO_UDP, IPS_SEEN_REPLY | IPS_ASSURED, "udp_stream"),
    (IPPROTO_TCP, 0, "tcp_syn_sent"),
    (IPPROTO_ICMP, 0, "icmp"),
    (58, 0, "icmpv6"),
    (IPPROTO_GRE, IPS_ASSURED, "gre_stream"),
    (132, 0, "generic"),  # sctp: its own states are not read here
    (50, 0, "generic"),
]


@pytest.mark.parametrize(("proto", "status", "name"), TIMEOUT_CLASSES)
def test_timeout_class(proto: int, status: int, name: str) -> None:
    assert timeout_class(proto, status) == name


# -- the picker -------------------------------------------------------------------------------------


def entry(n: int, *, proto: int = IPPROTO_UDP, status: int = 0, timeout: int = 30, zone: int = 0,
          mark: int = 0, src: str | None = None, family: int = AF_INET) -> Entry:
    if family == AF_INET:
        s = ip_address(src or f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}")
        d = ip_address("192.0.2.1")
    else:
        s = ip_address(src or f"2001:db8::{n:x}")
        d = ip_address("2001:db8:ffff::1")
    sport = 1024 + n % 60000
    return Entry(family, proto, CtTuple(s, d, sport, 53), CtTuple(d, s, 53, sport),
                 status | IPS_CONFIRMED, zone, mark, n + 1, timeout)


PROTECT = Protection(zones=frozenset({7}), marks=((0x10, 0xF0),), prefixes=(ip_network("10.9.0.0/16"),
                                                                          ip_network("2001:db8::/120")))


def expected_ranks(entries: list[Entry], policy: PressurePolicy, keep: int, collect_replied: bool
                   ) -> list[tuple[int, int]]:
    """The selection written out independently: filter, then per class the ``keep`` oldest."""
    by_class: dict[int, list[int]] = {0: [], 1: []}
    for e in entries:
        o = e.orig
        if e.zone in policy.protect.zones or any(e.mark & m == v for v, m in policy.protect.marks):
            continue
        if any(o.src in net or o.dst in net for net in policy.protect.prefixes if net.version == o.src.version):
            continue
        replied = bool(e.status & IPS_SEEN_REPLY)
        if replied and not (collect_replied and e.proto in policy.evict_replied and e.proto != IPPROTO_TCP):
            continue
        if not replied and not policy.evict_unreplied:
            continue
        full = TIMEOUTS[timeout_class(e.proto, e.status)]
        by_class[1 if replied else 0].append(max(full - e.timeout, 0))
    return [(cls, age) for cls in (0, 1) for age in sorted(by_class[cls], reverse=True)[:keep]]


entries_strategy = st.lists(
    st.builds(
        entry,
        st.integers(0, 5000),
        proto=st.sampled_from([IPPROTO_UDP, IPPROTO_TCP, IPPROTO_ICMP, IPPROTO_GRE]),
        status=st.sampled_from([0, IPS_SEEN_REPLY, IPS_SEEN_REPLY | IPS_ASSURED]),
        timeout=st.integers(1, 200),
        zone=st.sampled_from([0, 0, 0, 7]),
        mark=st.sampled_from([0, 0, 0x10, 0x11, 0x20]),
        src=st.sampled_from([None, None, "10.9.3.4", "10.8.0.1"]),
    ),
    max_size=60,
)


@settings(max_examples=300)
@given(entries_strategy, st.integers(0, 30), st.booleans(), st.booleans())
def test_picker_keeps_the_oldest_allowed_entries_of_each_class(entries: list[Entry], keep: int,
                                                                 collect_replied: bool, evict_unreplied: bool) -> None:
    policy = PressurePolicy(enabled=True, evict_unreplied=evict_unreplied,
                            evict_replied=frozenset({IPPROTO_UDP, IPPROTO_GRE}), protect=PROTECT)
    picker = EvictionPicker(policy, keep, collect_replied=collect_replied, timeouts=TIMEOUTS)
    for e in entries:
        picker.add(e)
    chosen = picker.chosen()
    assert [(1 if c.replied else 0, c.age) for c in chosen] == expected_ranks(entries, policy, keep, collect_replied)
    for c in chosen:
        assert not PROTECT.covers(c.entry)
        assert not (c.replied and c.entry.proto == IPPROTO_TCP)
    assert picker.census.examined == len(entries)
    assert picker.census.protected == sum(1 for e in entries if PROTECT.covers(e))


def test_picker_never_takes_replied_tcp_or_protected_entries() -> None:
    policy = PressurePolicy(enabled=True, evict_replied=frozenset({IPPROTO_UDP}), protect=PROTECT)
    table = [
        entry(1, proto=IPPROTO_TCP, status=IPS_SEEN_REPLY | IPS_ASSURED, timeout=1),  # established tcp
        entry(2, zone=7, timeout=1),  # protected zone
        entry(3, mark=0x15, timeout=1),  # protected mark 0x10/0xf0
        entry(4, src="10.9.1.1", timeout=1),  # protected prefix
        entry(5, status=IPS_SEEN_REPLY | IPS_ASSURED, timeout=100),  # assured udp, idle 20 s
        entry(6, timeout=29),  # UNREPLIED udp, idle 1 s
    ]
    picker = EvictionPicker(policy, 10, collect_replied=True, timeouts=TIMEOUTS)
    for e in table:
        picker.add(e)
    assert [c.entry.id for c in picker.chosen()] == [7, 6]  # UNREPLIED first, then the assured udp
    assert picker.census.protected == 3
    assert picker.chosen()[1].reason() == "replied udp, idle about 20 s"


def test_raw_and_built_entries_are_picked_alike() -> None:
    table = [entry(i, timeout=1 + i % 29, status=IPS_SEEN_REPLY if i % 3 == 0 else 0) for i in range(50)]
    policy = PressurePolicy(enabled=True, evict_replied=frozenset({IPPROTO_UDP}))

    def raw(e: Entry) -> tuple[int, ...]:
        o, r = e.orig, e.reply
        return (e.family, e.proto, o.src.packed, o.dst.packed, o.sport, o.dport, r.src.packed, r.dst.packed,
                r.sport, r.dport, e.status, e.zone, e.mark, e.id, e.timeout)

    by_id = {e.id: e for e in table}
    built = EvictionPicker(policy, 12, collect_replied=True, timeouts=TIMEOUTS)
    streamed = EvictionPicker(policy, 12, collect_replied=True, timeouts=TIMEOUTS,
                              build=lambda r: by_id[r[13]])
    for e in table:
        built.add(e)
        streamed.add_raw(raw(e))  # type: ignore[arg-type]
    assert [(c.replied, c.age) for c in built.chosen()] == [(c.replied, c.age) for c in streamed.chosen()]
    assert built.census.classes == streamed.census.classes


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_protection_on_raw_values_equals_protection_on_entries(src: int, dst: int, zone: int, mark: int) -> None:
    e = Entry(AF_INET, IPPROTO_UDP, CtTuple(ip_address(src), ip_address(dst), 1, 2),
              CtTuple(ip_address(dst), ip_address(src), 2, 1), IPS_CONFIRMED, zone, mark)
    nets = (ip_network("10.0.0.0/8"), ip_network("192.168.0.0/16"), ip_network("2001:db8::/32"))
    protection = Protection(zones=frozenset({5}), marks=((0x100, 0xF00),), prefixes=nets)
    expected = zone == 5 or mark & 0xF00 == 0x100 or any(
        n.version == 4 and (e.orig.src in n or e.orig.dst in n) for n in nets)
    assert protection.covers(e) == expected


def test_v6_entries_are_protected_by_v6_prefixes_only() -> None:
    protection = Protection(prefixes=(ip_network("2001:db8::/120"),))
    assert protection.covers(entry(1, family=AF_INET6))
    assert not protection.covers(entry(1, family=AF_INET6, src="2001:db9::1"))
    assert not protection.covers(entry(1))


# -- what the log says ----------------------------------------------------------------------------


def test_the_log_line_says_what_fills_the_table() -> None:
    census = Census()
    for i in range(1200):
        census.add(IPPROTO_UDP, 0, ip_address("198.51.100.7" if i % 3 == 1 else "198.51.100.9").packed)
    for i in range(300):
        census.add(IPPROTO_UDP, IPS_SEEN_REPLY | IPS_ASSURED, ip_address(f"10.0.{i >> 8}.{i & 255}").packed)
    census.protected = 12
    step = PressureController(POLICY).observe(sample(0, 980))
    text = describe_pressure(Sample(0, 1500, 1530, 64, drop=0), census, step)
    assert text.startswith("conntrack table 98% full (1,500/1,530): ")
    assert "1,200 UNREPLIED udp entries from 2 sources (198.51.100.9, 198.51.100.7)" in text
    assert "300 assured udp entries from 300 sources" in text
    assert "12 protected by policy" in text
    assert "only 64 hash buckets for 1,530 entries" in text  # max > 4x buckets


# -- the re-check just before an eviction ------------------------------------------------------------

ASSURED = IPS_SEEN_REPLY | IPS_ASSURED
# (proto, picked as replied, timer at the scan, status now, timer now, tcp state now, seconds since, evict?)
STILL_EVICTABLE = [
    (IPPROTO_UDP, False, 20, 0, 14, None, 5.0, True),  # still UNREPLIED
    (IPPROTO_UDP, False, 20, IPS_SEEN_REPLY, 14, None, 5.0, False),  # answered since the scan
    (IPPROTO_TCP, False, 100, 0, 95, 1, 5.0, True),  # still SYN_SENT
    (IPPROTO_TCP, False, 100, ASSURED, 431990, 3, 5.0, False),  # the handshake completed
    (IPPROTO_TCP, False, 100, 0, 431999, 3, 5.0, False),  # ESTABLISHED, picked up mid-stream: never
    (IPPROTO_UDP, True, 40, ASSURED, 35, None, 5.0, True),  # assured, its timer ran down: idle
    (IPPROTO_UDP, True, 40, ASSURED, 36, None, 4.2, True),  # ... whole seconds (one of slack)
    (IPPROTO_UDP, True, 40, ASSURED, 29, None, 5.0, True),  # read 6 s before a long scan ended: idle
    (IPPROTO_UDP, True, 40, ASSURED, 118, None, 5.0, False),  # a packet reset its timer: not idle
    (IPPROTO_UDP, True, 40, ASSURED, 37, None, 5.0, False),  # above a timer run down from 40: a refresh
    (IPPROTO_UDP, True, 119, ASSURED, 114, None, 5.0, False),  # a refresh could not be told: kept
    (IPPROTO_GRE, True, 100, ASSURED, 95, None, 5.0, True),  # gre_stream 180: idle
]


@pytest.mark.parametrize("row", STILL_EVICTABLE)
def test_still_evictable(row: tuple[int, bool, int, int, int, int | None, float, bool]) -> None:
    proto, replied, before, status, timer, tcp, elapsed, evict = row
    picked = entry(1, proto=proto, status=ASSURED if replied else 0, timeout=before)
    now = Reread(status | IPS_CONFIRMED, picked.id, 0, timer, tcp)
    assert still_evictable(Candidate(picked, 0, replied), now, elapsed, TIMEOUTS) is evict
