"""The iptables-save reader's shortcuts say exactly what the slow ways say.

Lines are split without shlex where shlex would split them the same way,
addresses read without ``ipaddress`` where ``ip_network`` would read them
the same way, a rule's text joined without quoting each word where none
needs it, and equal modules and targets read once and shared. Each
shortcut is held against the plain way on generated input.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topowatch.core.model import AF_INET, AF_INET6
from topowatch.core.nat import NatRuleset
from topowatch.edges import bulkparse, iptables

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))

import fuzz_targets as F

LINE_CHARS = st.sampled_from(list("ab-1 \t\r\n\x0b\"'\\é\u3000\udcff"))


def outcome(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except ValueError as exc:
        return ("ValueError", str(exc))


@settings(max_examples=500)
@given(st.lists(LINE_CHARS, max_size=30).map("".join))
def test_split_is_shlex_split(line: str) -> None:
    assert outcome(iptables._split, line) == outcome(shlex.split, line)


@given(st.lists(st.lists(LINE_CHARS, max_size=6).map("".join), max_size=6))
def test_command_text_quotes_as_each_word_would_be(words: list[str]) -> None:
    assert iptables._command_text(words) == " ".join(iptables._quote(w) for w in words)


def reference_interval(text: str, family: int) -> Any:
    try:
        net = ip_network(text, strict=False)
    except ValueError:
        return "refused"
    if net.version != (4 if family == AF_INET else 6):
        return "refused"
    return int(net.network_address), int(net.broadcast_address)


ADDRESS_PARTS = st.sampled_from(["10", "0", "255", "256", "01", "1", ".", "/", "8", "32", "33", "0", "08", "::",
                                 "ff", ":", "[", "]", " ", "٣", "\0", "255.255.0.0", "-"])


@settings(max_examples=500)
@given(st.lists(ADDRESS_PARTS, max_size=9).map("".join), st.sampled_from([AF_INET, AF_INET6]))
def test_addresses_read_as_ip_network_reads_them(text: str, family: int) -> None:
    try:
        got: Any = iptables._addr_interval(text, family)
    except iptables._NotModelled:
        got = "refused"
    assert got == reference_interval(text, family)


@pytest.mark.parametrize("text", ["10.0.0.1", "10.0.0.1/", "10.0.0.1/8", "10.0.0.1/08", "10.0.0.1/33", "10.0.0.1/0",
                                  "10.0.0.1/255.0.0.0", "010.0.0.1", "10.0.0.1/ 8"])
def test_addresses_by_hand(text: str) -> None:
    test_addresses_read_as_ip_network_reads_them.hypothesis.inner_test(text, AF_INET)  # type: ignore[attr-defined]


IPT_LINES = [line.decode() for line in F.IPTABLES_SAMPLE.splitlines() if line.startswith(b"-")] + [
    "-A POSTROUTING -o wan0 -j SNAT --to-source 192.0.2.1",
    "-A POSTROUTING -o wan1 -j SNAT --to-source 192.0.2.1",
    "-A POSTROUTING -o wan0 -j SNAT --to-source 192.0.2.1 --random",
    "-A POSTROUTING -p tcp --dport 80 -j uplink",
    "-A POSTROUTING -p udp --dport 80 -j uplink",
    "-A POSTROUTING -p udp --dport 80 -g uplink",
    "-A POSTROUTING -p udp -m multiport --dports 80,443:445 -m comment --comment \"web out\" -j MASQUERADE",
    "-A POSTROUTING -p udp --dport 80 -j MASQUERADE",
    "-A POSTROUTING -p udp ! --dport 80 -j MASQUERADE",
    "-A uplink -m set --match-set lan src -j RETURN",
    "-A uplink -m set --match-set lan dst -j RETURN",
    "-A uplink -j nochain",
    "-A uplink -m comment --comment \"a b\" -j ACCEPT",
    "-A uplink -m comment --comment 'a b' -j ACCEPT",
]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(IPT_LINES), max_size=20), st.sampled_from(["ip", "ip6"]))
def test_shared_modules_and_targets_change_nothing(lines: list[str], family: str) -> None:
    text = "\n".join(["*nat", ":POSTROUTING ACCEPT [0:0]", ":uplink - [0:0]", *lines, "COMMIT"])
    ipsets = iptables.parse_ipset_save(F.IPSET_SAMPLE.decode())
    shared = iptables.parse_save(text, family=family, ipsets=ipsets, all_chains=True)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(iptables, "_options_key", lambda options: object())  # every lookup misses
        alone = iptables.parse_save(text, family=family, ipsets=ipsets, all_chains=True)
    assert shared == alone


def test_equal_targets_are_one_object_and_rules_are_counted() -> None:
    lines = [f"-A POSTROUTING -s 10.0.{i // 250}.{i % 250} -o wan0 -j SNAT --to-source 192.0.2.1"
             for i in range(2 * bulkparse.STEP)]
    steps: list[int] = []
    parsed = iptables.parse_save("\n".join(["*nat", *lines, "COMMIT"]),
                                 budget=bulkparse.Budget(lambda: steps.append(1)))
    rules = parsed.ruleset.chains[-1].rules
    assert len(rules) == 2 * bulkparse.STEP and len({id(r.exprs[-1]) for r in rules}) == 1
    assert len({id(r.exprs[0]) for r in rules}) == len(rules)
    assert len(steps) == 2
    with pytest.raises(bulkparse.ParseTooSlow):
        iptables.parse_save("\n".join(["*nat", *lines, "COMMIT"]), budget=bulkparse.Budget(timeout=-1.0))


def test_read_all_counts_its_steps_and_fails_whole_past_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = [f"-A POSTROUTING -s 10.0.{i // 250}.{i % 250} -j SNAT --to-source 192.0.2.1"
             for i in range(3 * bulkparse.STEP)]
    save = "\n".join(["*nat", *lines, "COMMIT"]) + "\n"

    def runner(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, 0, save if argv[0] == "iptables-legacy-save" else "", "")

    def read(progress: Any = None) -> iptables.RulesetRead:
        return iptables.read_all(runner=runner, which=lambda tool: tool, legacy_exists=lambda family: family == "ip",
                                 read_nft=lambda _nft: NatRuleset(()), progress=progress)

    steps: list[int] = []
    got = read(lambda: steps.append(1))
    assert len(got.ruleset.chain("ip", iptables.LEGACY_TABLE, "POSTROUTING").rules) == 3 * bulkparse.STEP
    assert len(steps) == 3
    monkeypatch.setattr(iptables, "PARSE_TIMEOUT", -1.0)
    with pytest.raises(bulkparse.ParseTooSlow):  # a RulesetError: the reactor keeps the previous ruleset
        read()
