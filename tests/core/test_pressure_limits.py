# SPDX-License-Identifier: GPL-2.0-or-later
"""core.pressure at its limits: the re-check's boundaries, the token bucket away from time 0, a
single refused flow, class timeouts that are not known, lowering and restoring timeouts.

Issue 16's mutation run left these boundaries unchecked (each case below names what it pins).
Every expectation is worked out by hand from the module's rules: a timer the kernel resets to
its class timeout on every packet and otherwise runs down; a bucket of ``rate`` tokens a second
up to ``batch``; the last resort open once the kernel's ``drop`` counter rose at all.
"""

from __future__ import annotations

import pytest

from topowatch.core.conntrack import IPS_ASSURED, IPS_CONFIRMED, IPS_SEEN_REPLY, Reread
from topowatch.core.flow import IPPROTO_GRE, IPPROTO_TCP, IPPROTO_UDP
from topowatch.core.pressure import (
    Candidate,
    EvictionPicker,
    PressureController,
    PressurePolicy,
    Sample,
    count_by,
    lowered_values,
    restore_plan,
    sample_interval,
    still_evictable,
    timeout_class,
)

from test_pressure import POLICY, TIMEOUTS, entry, sample  # isort: skip

ASSURED = IPS_SEEN_REPLY | IPS_ASSURED


# -- the re-check just before an eviction -------------------------------------------------------------


@pytest.mark.parametrize(("before", "now", "elapsed", "evict"), [
    # udp_stream 120, read 118 left: a refresh would read at least 120 - 5 = 115 now, an idle
    # timer 118 - 5 = 113 (one second of slack: 114). The first timer where the two can be told.
    (118, 113, 5.0, True),
    (118, 114, 5.0, True),
    (118, 115, 5.0, False),
    (119, 113, 5.0, False),  # 120 left at most one second above: a refresh cannot be told, kept
    # 40 left, 5 s later: idle reads 35, with the second of slack up to 36 exactly.
    (40, 36, 5.0, True),
    (40, 37, 5.0, False),
])  # fmt: skip
def test_a_replied_candidate_is_idle_exactly_when_its_timer_ran_down(before: int, now: int, elapsed: float,
                                                                      evict: bool) -> None:
    picked = entry(1, status=ASSURED, timeout=before)
    reread = Reread(ASSURED | IPS_CONFIRMED, picked.id, 0, now, None)
    assert still_evictable(Candidate(picked, 0, True), reread, elapsed, TIMEOUTS) is evict


def test_a_replied_candidate_whose_class_timeout_is_not_known_is_kept() -> None:
    picked = entry(1, status=ASSURED, timeout=40)
    reread = Reread(ASSURED | IPS_CONFIRMED, picked.id, 0, 1, None)  # ran down a long way
    timeouts = {k: v for k, v in TIMEOUTS.items() if k != "udp_stream"}
    assert still_evictable(Candidate(picked, 0, True), reread, 5.0, timeouts) is False


# -- timeout classes ------------------------------------------------------------------------------


@pytest.mark.parametrize(("proto", "status", "name"), [
    (IPPROTO_TCP, IPS_SEEN_REPLY, "tcp_syn_recv"),  # answered, not yet ESTABLISHED
    (IPPROTO_TCP, ASSURED, "tcp_syn_recv"),
    (IPPROTO_TCP, IPS_ASSURED, "tcp_syn_sent"),  # never answered
    (IPPROTO_GRE, 0, "gre"),
    (IPPROTO_GRE, IPS_SEEN_REPLY, "gre"),  # replied but not assured: the unreplied timeout
    (IPPROTO_UDP, IPS_SEEN_REPLY, "udp"),
])  # fmt: skip
def test_timeout_classes_of_replied_and_unassured_entries(proto: int, status: int, name: str) -> None:
    assert timeout_class(proto, status) == name


def test_without_class_timeouts_the_lowest_timer_goes_first() -> None:
    """No timeout known for the class: the age cannot be told, the timer nearest its end goes first."""
    policy = PressurePolicy(enabled=True)
    picker = EvictionPicker(policy, 2, collect_replied=False, timeouts={})
    for n, timer in enumerate([50, 3, 20, 7]):
        picker.add(entry(n, timeout=timer))
    assert [c.entry.timeout for c in picker.chosen()] == [3, 7]


@pytest.mark.parametrize("keep", [0, 1, 2])
def test_built_entries_keep_at_most_keep_of_a_class(keep: int) -> None:
    picker = EvictionPicker(PressurePolicy(enabled=True), keep, collect_replied=False, timeouts=TIMEOUTS)
    for n, timer in enumerate([25, 3, 20, 7, 11]):
        picker.add(entry(n, timeout=timer))
    assert [c.entry.timeout for c in picker.chosen()] == [3, 7][:keep]
    assert picker.census.examined == 5
    assert set(picker.census.sources["UNREPLIED udp"]) == {entry(n).orig.src.packed for n in range(5)}


# -- the controller ---------------------------------------------------------------------------------


def test_early_drops_are_counted_from_the_second_sample() -> None:
    controller = PressureController(POLICY)
    assert controller.observe(sample(100.0, 500, early=40)).early_dropped == 0  # no previous sample
    assert controller.observe(sample(101.0, 500, early=47)).early_dropped == 7


def test_the_bucket_refills_by_the_time_between_samples_away_from_time_zero() -> None:
    controller = PressureController(POLICY)  # batch 100, rate 1000/s
    assert controller.observe(sample(5000.0, 950)).budget == 100
    controller.evicted(100)
    assert controller.observe(sample(5000.02, 950)).budget == 20  # 1000/s * 0.02 s
    controller.evicted(20)
    assert controller.observe(sample(5000.02, 950)).budget == 0  # no time, no tokens


def test_one_refused_flow_opens_the_last_resort() -> None:
    policy = PressurePolicy(enabled=True, high=0.9, low=0.7, evict_replied=frozenset({IPPROTO_UDP}))
    controller = PressureController(policy)
    controller.observe(sample(0.0, 1000, drop=5))
    step = controller.observe(sample(1.0, 1000, drop=6))
    assert step.refused == 1 and step.replied_allowed


def test_a_step_says_when_to_look_again() -> None:
    policy = PressurePolicy(enabled=True, min_interval=0.01, max_interval=30.0)
    controller = PressureController(policy)
    first = controller.observe(Sample(10.0, 100, 1000))
    # 10 % full: 30 * (0.01 / 30) ** (0.1 / 0.9), no growth known yet.
    assert first.interval == pytest.approx(30 * (0.01 / 30) ** (0.1 / 0.9))
    second = controller.observe(Sample(10.1, 150, 1000))
    # 50 entries in 0.1 s: 500/s; 900 - 150 = 750 to the high mark, half of 750 / 500 s (the
    # fill alone, 15 %, would ask for 30 * (0.01 / 30) ** (0.15 / 0.9) = 7.9 s).
    assert second.interval == pytest.approx(750 / 500 / 2)


@pytest.mark.parametrize(("t0", "c0", "t1", "c1", "want"), [
    (10.0, 100, 10.1, 150, 750 / 500 / 2),
    (10.0, 100, 12.0, 400, 500 / 150 / 2),  # the fill (40 %) asks for less: 0.85 s
    (10.0, 100, 14.0, 300, None),  # 50/s: 600 / 50 / 2 = 6 s, more than the fill alone asks
    (10.0, 100, 10.0, 400, None),  # no time between the samples: the growth cannot be told
    (10.0, 400, 12.0, 100, None),  # shrinking
])  # fmt: skip
def test_growth_shortens_the_interval(t0: float, c0: int, t1: float, c1: int, want: float | None) -> None:
    policy = PressurePolicy(enabled=True, min_interval=0.01, max_interval=30.0)
    by_fill = 30 * (0.01 / 30) ** ((c1 / 1000) / 0.9)
    got = sample_interval(policy, Sample(t1, c1, 1000), Sample(t0, c0, 1000))
    assert got == pytest.approx(by_fill if want is None else min(want, by_fill))


# -- lowering and restoring ------------------------------------------------------------------------


def test_a_timeout_already_at_the_lowered_value_is_not_written() -> None:
    policy = PressurePolicy(enabled=True, lower_timeouts=(("udp", 10), ("icmp", 10), ("generic", 60)))
    assert lowered_values(policy, {"udp": 10, "icmp": 30, "generic": 59}) == {"icmp": 10}


def test_restore_goes_on_past_a_timeout_that_is_gone() -> None:
    saved = {"udp": 30, "icmp": 30, "generic": 600}
    written = {"udp": 10, "icmp": 10, "generic": 60}
    restore, foreign = restore_plan(saved, written, {"icmp": 10, "generic": 60})  # udp no longer readable
    assert restore == {"icmp": 30, "generic": 600}
    assert foreign == {}


def test_count_by_names_each_reason_class() -> None:
    chosen = [Candidate(entry(1), 5, False), Candidate(entry(2), 6, False),
              Candidate(entry(3, proto=IPPROTO_TCP), 1, False), Candidate(entry(4, status=ASSURED), 9, True)]  # fmt: skip
    assert count_by(chosen) == {"UNREPLIED udp": 2, "UNREPLIED tcp": 1, "replied udp": 1}
    assert count_by([]) == {}


def test_the_log_line_says_refusals_early_drops_and_short_hash_chains_exactly() -> None:
    from topowatch.core.pressure import State, Step, describe_pressure

    step = Step(State.HIGH, refused=1200, early_dropped=30)
    assert describe_pressure(Sample(0, 950, 1000, 250), None, step) == (
        "conntrack table 95% full (950/1,000); the kernel refused 1,200 new flow(s) since the last look; "
        "it early-dropped 30 unreplied entries itself")  # 1000 buckets * 4 = max: chains are short enough
    assert describe_pressure(Sample(0, 950, 1001, 250), None, Step(State.HIGH)) == (
        "conntrack table 95% full (950/1,001); only 250 hash buckets for 1,001 entries: every lookup "
        "walks long chains (raise nf_conntrack_buckets)")
    assert describe_pressure(Sample(0, 950, 1000, 0), None, Step(State.HIGH)) == (
        "conntrack table 95% full (950/1,000)")  # buckets not read: nothing said about them
    assert describe_pressure(Sample(0, 950, 1249, 250), None, Step(State.HIGH)).endswith(
        "(raise nf_conntrack_buckets)")  # more than 4 entries per bucket, fewer than 5


def test_a_candidates_reason_names_its_class() -> None:
    assert Candidate(entry(1), 12, False).reason() == "UNREPLIED udp, idle about 12 s"
    assert Candidate(entry(1, status=ASSURED), 7, True).reason() == "replied udp, idle about 7 s"
