"""The iptables-save reader's shortcuts say exactly what the slow ways say.

Lines are split without shlex where shlex would split them the same way,
addresses read without ``ipaddress`` where ``ip_network`` would read them
the same way, a rule's text joined without quoting each word where none
needs it, equal modules and targets read once and shared, and the common
rule lines (``iptables._FAST_LINE``) read whole instead of word by word.
Each shortcut is held against the plain way on generated input.
"""

from __future__ import annotations

import re
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
from topowatch.corpus import default_corpus
from topowatch.edges import bulkparse, iptables

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))

import fuzz_targets as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import parse as bench_parse

CORPUS = default_corpus()
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


@settings(max_examples=500)
@given(st.lists(st.sampled_from(list("a -\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\u2028\u2029é")), max_size=30).map("".join))
def test_lines_are_splitlines(text: str) -> None:
    assert iptables._lines(text) == text.splitlines()


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


@settings(max_examples=500)
@given(st.lists(ADDRESS_PARTS, max_size=9).map("".join), st.sampled_from([AF_INET, AF_INET6]))
def test_a_source_read_whole_is_the_word_paths(text: str, family: int) -> None:
    got = iptables._fast_source(text, family)
    want = iptables._addr_match.__wrapped__("-s", text, False, family)
    assert type(got) is type(want)
    assert got == want


@pytest.mark.parametrize("text", ["10.0.0.1", "10.0.0.1/", "10.0.0.1/8", "10.0.0.1/08", "10.0.0.1/33", "10.0.0.1/0",
                                  "10.0.0.1/255.0.0.0", "010.0.0.1", "10.0.0.1/ 8"])
def test_addresses_by_hand(text: str) -> None:
    test_addresses_read_as_ip_network_reads_them.hypothesis.inner_test(text, AF_INET)  # type: ignore[attr-defined]
    test_a_source_read_whole_is_the_word_paths.hypothesis.inner_test(text, AF_INET)  # type: ignore[attr-defined]


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


# -- whole lines: the common shapes against the word-by-word reader ----------------


def word_by_word(text: str, **kw: Any) -> iptables.ParsedTable:
    """``parse_save`` with no line read whole (the reader as it was before ``_FAST_LINE``)."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(iptables, "_fast_groups", lambda line: None)
        return iptables.parse_save(text, **kw)


def both_ways(text: str, **kw: Any) -> None:
    fast = iptables.parse_save(text, **kw)
    assert fast == word_by_word(text, **kw)


# Each part of a line: the shapes _FAST_LINE takes, and words next to them it must hand on.
CHAINS = ["PREROUTING", "POSTROUTING", "OUTPUT", "user", "DNAT", "MASQUERADE", "-x", "'q'"]
ADDRS = ["10.0.0.1", "10.0.0.0/24", "10.0.0.1/32", "10.0.0.1,10.0.0.2", "10.0.0.0/8,192.0.2.1", "2001:db8::1",
         "2001:db8::/64", "host.example", "300.1.1.1", "10.0.0.1/33", "01.2.3.4", "-x", "!", "a,", ","]
IFACES = ["wan0", "eth+", "a.b", "-x", "!", "\"a b\"", "é"]
PROTOS = ["tcp", "udp", "TCP", "all", "0", "6", "17", "icmp", "sctp", "foo", "256", "-1"]
PORTS = ["80", "0", "08", "65535", "65536", "99999", "1024:2048", "2048:1024", "http", ":80", "-1", "!"]
COMMENTS = ['"fwd 0"', '"fwd0"', "fwd0", '""', '"-x"', '"-1"', '"!"', '"! a"', "'a b'", '"a\'b"', '"é"',
            '"\udcff"', '"a\tb"', '"a\\\\b"', "-x", '"a"b', '"a b']
TARGETS = ["DNAT", "SNAT", "MASQUERADE", "REDIRECT"] * 3 + ["DNAT", "SNAT", "MASQUERADE", "REDIRECT", "NETMAP", "RETURN", "ACCEPT", "DROP", "MARK", "LOG", "TPROXY",
           "user", "-x"]
TARGET_OPTIONS = ["--to-destination 10.1.0.1:80", "--to-destination 10.1.0.1", "--to-destination 10.1.0.1-10.1.0.9",
                  "--to-source 203.0.113.1", "--to-source 1.2.3.4-1.2.3.9:1000-2000", "--to-source :80",
                  "--to-destination :80", "--to-destination 1.2.3.4:90-80", "--to-destination 1.2.3.9-1.2.3.4",
                  "--to-destination [2001:db8::1]:80", "--to-source 2001:db8::1", "--to-ports 8080",
                  "--to-ports 8080-8090", "--to 10.0.0.0/24", "--random", "--random-fully", "--persistent",
                  "--set-mark 0x1", "--set-xmark 0x1/0xff", "--log-prefix x", "--jump user", "--source 1.2.3.4",
                  "--to-destination 10.1.0.1 10.1.0.2", "--to-destination", "--to-source host.example",
                  "--to-destination 10.1.0.1:99999"]

OWN_OPTIONS = {"DNAT": "--to-destination", "SNAT": "--to-source", "REDIRECT": "--to-ports", "MASQUERADE": "--to-p",
               "NETMAP": "--to ", "MARK": "--set-"}


@st.composite
def rule_lines(draw: st.DrawFn) -> str:
    """An ``-A`` line: mostly _FAST_LINE's shapes, with what must leave them (a ``!``, another order, ...)."""
    parts = ["-A", draw(st.sampled_from(CHAINS))]
    for flag, values in (("-s", ADDRS), ("-d", ADDRS), ("-i", IFACES), ("-o", IFACES), ("-p", PROTOS)):
        if draw(st.integers(0, 2)) == 0:
            parts += [*(["!"] if draw(st.integers(0, 9)) == 0 else []), flag, draw(st.sampled_from(values))]
    if draw(st.booleans()):
        parts += ["-m", draw(st.sampled_from(["tcp", "udp", "sctp", "multiport"]))]
        for flag in draw(st.sampled_from([["--dport"], ["--sport"], ["--sport", "--dport"], ["--dport", "--sport"],
                                          [], ["--syn"], ["--dports"]])):
            parts += [flag, draw(st.sampled_from(PORTS))]
    if draw(st.booleans()):
        parts += ["-m", "comment", "--comment", draw(st.sampled_from(COMMENTS))]
    if draw(st.integers(0, 5)):
        target = draw(st.sampled_from(TARGETS))
        parts += [draw(st.sampled_from(["-j", "-j", "-j", "-g", "--jump"])), target]
        own = [o for o in TARGET_OPTIONS if o.startswith(OWN_OPTIONS.get(target, "--random"))]
        options = st.sampled_from(own) if draw(st.integers(0, 3)) else st.sampled_from(TARGET_OPTIONS)
        parts += draw(st.lists(options, max_size=2))
    if draw(st.integers(0, 9)) == 0:  # another order
        head, rest = parts[:2], parts[2:]
        parts = head + draw(st.permutations(rest))
    gaps = draw(st.lists(st.sampled_from([" "] * 40 + ["  ", "\t"]), min_size=len(parts), max_size=len(parts)))
    return "".join(g + p for g, p in zip(gaps, parts, strict=True))[1:]


@settings(max_examples=600, deadline=None)
@given(st.lists(rule_lines(), min_size=1, max_size=8), st.sampled_from(["ip", "ip6"]), st.booleans())
def test_lines_read_whole_are_read_as_word_by_word(lines: list[str], family: str, header: bool) -> None:
    declared = [":PREROUTING ACCEPT [0:0]", ":POSTROUTING ACCEPT [0:0]", ":user - [0:0]"]
    body = ["*nat", *declared, *lines, "COMMIT"] if header else lines
    both_ways("\n".join(body) + "\n", family=family, all_chains=True)


# -- the compiled line reader (_ctscan.iptables_line) against the regex ------------------------

COMPILED = iptables._compiled_line_reader()
needs_compiled = pytest.mark.skipif(COMPILED is None, reason="the compiled line reader is not built (sh scripts/setup)")


def assert_same_groups(line: str) -> None:
    """The compiled reader takes ``line`` exactly where _FAST_LINE does, with the same groups."""
    want = iptables._fast_groups_py(line)
    assert want is None or want[0] == line  # the first group is the line
    if COMPILED is not None:
        got = COMPILED(line)
        assert got == want
        assert got is None or all(type(g) is str or g is None for g in got)


@needs_compiled
def test_the_parse_reads_with_the_compiled_reader() -> None:
    assert iptables._fast_groups is COMPILED


# Pieces of the grammar and what sits next to it: lines built from them are mostly near misses.
PIECES = [" -s ", " -d ", " -i ", " -o ", " -p ", " -m tcp", " -m udp", " -m tcpx", " -m comment --comment ",
          " --sport ", " --dport ", " -j ", " --to-destination ", " --a-b", " --A", " --", " -- ", "1", "12345",
          "123456", "0", "a", "wan0", "10.0.0.1/32", "DNAT", "-x", "!", "!x", "x!", '"', '"a b"', '""', '"-"',
          "'", "\\", " ", "  ", "\t", "é", "\u3000", "\udcff", "\U0001f600", "\x00", "\x7f", "~", "#"]
NASTY = list(" !\"#'-./0123456789:AZaz\\{}~\x00\t\x7f\x80é\u3000\udcff\U0001f600")


WORDS = st.one_of(  # mostly words _FAST_LINE takes
    st.text(alphabet=st.sampled_from([*"aZ09.:/,#~_-!"]), min_size=1, max_size=5).filter(lambda w: w[0] not in "-!"),
    st.text(alphabet=st.sampled_from([*"aZ09.:/,#~_"]), min_size=1, max_size=5),
    st.text(alphabet=st.sampled_from([*"aZ09.-!:/,#~_", "é", "\x00", '"', "'", "\\", "\udcff"]), max_size=5),
)
QUOTED = st.text(alphabet=st.sampled_from([*"a !-'\\\"\t", "é", "\x00", "\u3000", "\udcff", "\U0001f600"]),
                 max_size=6)


@st.composite
def grammar_lines(draw: st.DrawFn) -> str:
    """A line in _FAST_LINE's order, each part there or not, its words of any characters (most are taken)."""
    line = "-A " + draw(WORDS)
    for flag in ("-s", "-d", "-i", "-o", "-p"):
        if draw(st.booleans()):
            line += f" {flag} {draw(WORDS)}"
    if draw(st.booleans()):
        line += " -m " + draw(st.sampled_from(["tcp", "udp", "tcp", "udp", "sctp", "tcpx"]))
        for flag in ("--sport", "--dport"):
            if draw(st.booleans()):
                line += f" {flag} " + draw(st.text(alphabet=st.sampled_from([*"0123456789a", "١"]), max_size=7))
    if draw(st.booleans()):
        comment = draw(st.one_of(QUOTED.map(lambda q: f'"{q}"'), WORDS))
        line += " -m comment --comment " + comment
    if draw(st.booleans()):
        line += " -j " + draw(WORDS)
        for _ in range(draw(st.integers(0, 3))):
            line += " --" + draw(st.text(alphabet=st.sampled_from(list("az-A_=")), max_size=5))
            line += "".join(" " + w for w in draw(st.lists(WORDS, max_size=2)))
    return line


@st.composite
def near_lines(draw: st.DrawFn) -> str:
    """A line of the grammar's pieces or its parts, or a generated rule line with a few characters changed."""
    if draw(st.booleans()):
        return draw(grammar_lines())
    if draw(st.booleans()):
        line = "-A" + draw(st.sampled_from([" ", "", "  "])) + draw(st.sampled_from(["X", "PREROUTING", "-x", "é"]))
        return line + "".join(draw(st.lists(st.sampled_from(PIECES), max_size=14)))
    chars = list(draw(rule_lines()))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(chars)))
        what = draw(st.sampled_from(["insert", "replace", "delete"]))
        if what == "insert" or at == len(chars):
            chars.insert(at, draw(st.sampled_from(NASTY)))
        elif what == "replace":
            chars[at] = draw(st.sampled_from(NASTY))
        else:
            del chars[at]
    return "".join(chars)


@needs_compiled
@settings(max_examples=3000, deadline=None)
@given(near_lines())
def test_the_compiled_reader_takes_what_the_regex_takes(line: str) -> None:
    assert_same_groups(line)


@needs_compiled
@settings(max_examples=1000, deadline=None)
@given(st.text(alphabet=st.sampled_from(NASTY + list("-Asdiopmjtcuknrgel")), max_size=60))
def test_the_compiled_reader_on_any_text(text: str) -> None:
    assert_same_groups("-A " + text)
    assert_same_groups(text)


ANY_CHAR = st.one_of(st.characters(max_codepoint=0x7F), st.characters(),
                    st.sampled_from(["\udcff", "\ud800", "\U0001f600", "\u3000", "é", "ÿ", "\u0100", "\x00"]))
# Where a word goes in each part (first, inside, last): every character at every place.
WORD_PLACES = ["-A {}", "-A {}x", "-A x{}", "-A X -s {}", "-A X -p {}x -j Y", "-A X -m tcp --dport {}",
               "-A X -m udp --sport 1{} -j Y", '-A X -m comment --comment "{}"', '-A X -m comment --comment "{}x"',
               '-A X -m comment --comment "x{}" -j Y', "-A X -m comment --comment {}", "-A X -j {}", "-A X -j Y{}",
               "-A X -j Y --{}", "-A X -j Y --a{}", "-A X -j Y --a {}", "-A X -j Y --a b{} --c"]


@needs_compiled
@settings(max_examples=2000, deadline=None)
@given(st.sampled_from(WORD_PLACES), st.text(alphabet=ANY_CHAR, max_size=3))
def test_the_compiled_reader_on_every_character_in_every_word(place: str, word: str) -> None:
    assert_same_groups(place.format(word))


@needs_compiled
@pytest.mark.parametrize("char", ["é", "ÿ", "\u0100", "\u3000", "\udcff", "\U0001f600", "\x00", "\t", "!", "-", "'"])
@pytest.mark.parametrize("place", WORD_PLACES)
def test_the_compiled_reader_on_each_kind_of_string(place: str, char: str) -> None:
    assert_same_groups(place.format(char))


@needs_compiled
@pytest.mark.parametrize("line", [
    "", "-A", "-A ", "-A X", "-A X ", "-A X -s", "-A X -s ", "-A X -s a", "-A !X", "-A -X", "-A X\x00",
    "-A X -m tcp", "-A X -m udp --sport 1 --dport 2", "-A X -m tcp --dport 1 --sport 2", "-A X -m tcp --sport ",
    "-A X -m tcp --sport 123456", "-A X -m tcp --sport 12345", "-A X -m tcp --sport ١",
    '-A X -m comment --comment ""', '-A X -m comment --comment "', '-A X -m comment --comment "a',
    '-A X -m comment --comment "!a"', '-A X -m comment --comment "-"', '-A X -m comment --comment "a\'b"',
    '-A X -m comment --comment "a\\b"', '-A X -m comment --comment "é \udcff\U0001f600\x00"',
    '-A X -m comment --comment "a""', "-A X -m comment --comment a", "-A X -m comment --comment -a",
    "-A X -j", "-A X -j Y", "-A X -j Y ", "-A X -j Y --", "-A X -j Y --a", "-A X -j Y --a-", "-A X -j Y --a b c",
    "-A X -j Y --a -b", "-A X -j Y --a !b", "-A X -j Y --a b --c", "-A X -j Y --A", "-A X -j Y --a=b",
    "-A X -j Y --a b\u3000", "-A X -s a -d b -i c -o d -p e -m udp --sport 1 -m comment --comment e -j f --g h",
    "-A X -d b -s a", "-A X -j Y -m tcp", "-A X -m comment --comment a -m tcp",
])
def test_the_compiled_reader_by_hand(line: str) -> None:
    assert_same_groups(line)


@needs_compiled
@pytest.mark.skipif(not CORPUS.is_dir(), reason=f"corpus not found at {CORPUS}")
def test_the_compiled_reader_on_the_corpus() -> None:
    files = [p for p in sorted(CORPUS.rglob("*")) if p.is_file() and b"-A " in p.read_bytes()]
    assert files
    taken = 0
    for path in files:
        for raw in path.read_bytes().decode("utf-8", "surrogateescape").splitlines():
            for line in (raw, raw.strip()):
                assert_same_groups(line)
                taken += iptables._fast_groups_py(line) is not None
    assert taken  # the corpus has lines of the common shapes


@needs_compiled
def test_the_compiled_reader_refuses_what_is_not_a_str() -> None:
    assert COMPILED is not None
    with pytest.raises(TypeError):
        COMPILED(b"-A X")  # type: ignore[arg-type]


# _FAST_LINE as first written: each optional part ``(?:PART)?`` (it is ``(?:PART|)``, which the engine runs faster).
_ARG = iptables._ARG
OPTIONAL_SPELLING = re.compile(
    rf"-A ({_ARG})(?: -s ({_ARG}))?(?: -d ({_ARG}))?(?: -i ({_ARG}))?(?: -o ({_ARG}))?(?: -p ({_ARG}))?"
    r"(?: (-m (tcp|udp)(?: --sport ([0-9]{1,5}))?(?: --dport ([0-9]{1,5}))?))?"
    rf"(?: -m comment --comment (\"(?:[^\"\\'!-][^\"\\']*+)?\"|{_ARG}))?"
    rf"(?: (-j ({_ARG})((?: --[a-z][a-z-]*+(?: {_ARG})*+)*+)))?"
)


@settings(max_examples=600, deadline=None)
@given(rule_lines())
def test_the_line_regex_takes_what_its_first_spelling_takes(line: str) -> None:
    fast, first = iptables._FAST_LINE.fullmatch(line), OPTIONAL_SPELLING.fullmatch(line)
    assert (fast is None) == (first is None)
    if fast is not None and first is not None:
        assert fast.groups() == (line, *first.groups())


@pytest.mark.parametrize("reader", ["compiled", "regex"])
def test_the_common_shapes_are_read_whole(monkeypatch: pytest.MonkeyPatch, reader: str) -> None:
    """The benchmark's lines (port forwards, SNAT, masquerade) never reach the word-by-word reader."""
    if reader == "regex":
        monkeypatch.setattr(iptables, "_fast_groups", iptables._fast_groups_py)
    elif COMPILED is None:
        pytest.skip("the compiled line reader is not built (sh scripts/setup)")
    else:
        assert iptables._fast_groups is COMPILED
    text = bench_parse.iptables_restore(300)
    expected = word_by_word(text)
    monkeypatch.setattr(iptables, "_rules", lambda *a, **kw: pytest.fail("read word by word"))
    got = iptables.parse_save(text)
    assert got == expected and sum(len(c.rules) for c in got.ruleset.chains) == 300


@pytest.mark.parametrize("line", [
    '-A PREROUTING -i wan0 -p tcp -m tcp --dport 1024 -m comment --comment "fwd 0" -j DNAT --to-destination 10.1.0.1:80',
    "-A POSTROUTING -s 10.64.0.0/24 -o wan1 -j MASQUERADE",
    "-A POSTROUTING -s 10.100.0.2/32 -o wan2 -j SNAT --to-source 203.0.115.3",
    "-A PREROUTING -d 192.0.2.1/32 -p udp -m udp --sport 53 --dport 5353 -j REDIRECT --to-ports 53",
    "-A POSTROUTING -j user",
    "-A user -j RETURN",
    "-A user",
])
def test_each_common_shape_is_read_whole(line: str) -> None:
    assert iptables._FAST_LINE.fullmatch(line) is not None
    assert_same_groups(line)


@pytest.mark.parametrize("line", [
    "-A PREROUTING ! -s 10.0.0.1 -j ACCEPT",  # an inversion
    "-A PREROUTING -p tcp --dport 80 -j ACCEPT",  # an implicit match
    "-A PREROUTING -m comment --comment \"-x\" -j ACCEPT",  # a comment the word reader takes for an option
    "-A PREROUTING -j LOG --log-prefix \"a b\"",  # a quoted word but the comment
    "-A PREROUTING -o wan0 -s 10.0.0.1 -j ACCEPT",  # another order
    "-A PREROUTING  -j ACCEPT",  # two spaces
])
def test_other_lines_are_read_word_by_word(line: str) -> None:
    assert iptables._FAST_LINE.fullmatch(line) is None
    assert_same_groups(line)
    both_ways(line)


@pytest.mark.parametrize("line", [
    "-A POSTROUTING -j SNAT --to-source :80",  # SNAT without an address: unknown
    "-A PREROUTING -j DNAT --to-destination :80",
    "-A PREROUTING -j DNAT --to-destination 1.2.3.4:90-80",  # a bad port range
    "-A PREROUTING -j DNAT --to-destination 1.2.3.9-1.2.3.4",  # a bad address range
    "-A PREROUTING -j DNAT --to-destination 10.1.0.1:99999",
    "-A PREROUTING -j DNAT --to-destination 10.1.0.1 10.1.0.2",
    "-A PREROUTING -j DNAT --to-destination 10.1.0.1 --random",
    "-A PREROUTING -j DNAT --to-destination 2001:db8::1",  # the other family
    "-A PREROUTING -j DNAT --to-destination host.example",
    "-A PREROUTING -j DNAT",
    "-A PREROUTING -j DNAT --jump user",  # the word reader ends the target at --jump
    "-A PREROUTING -j user --to-destination 10.1.0.1",
    "-A DNAT -j ACCEPT",
    "-A PREROUTING -j DNAT --to-destination 10.1.0.1:80\n:DNAT - [0:0]",  # DNAT is a user chain
    "-A PREROUTING -p tcp -m tcp --dport 65536 -j ACCEPT",
    "-A PREROUTING -p tcp -m tcp --sport 1 --dport 99999 -j ACCEPT",
    "-A PREROUTING -p foo -m udp --dport 0 -j ACCEPT",
    "-A PREROUTING -s 10.0.0.1,10.0.0.0/8 -d host.example,10.0.0.2 -j ACCEPT",
    "-A PREROUTING -m comment --comment \"\" -j ACCEPT",
    "-A PREROUTING -m comment --comment \"a\tb\" -j ACCEPT",
    "-A PREROUTING -m comment --comment \"\udcff\" -j ACCEPT",
])
def test_lines_read_whole_or_handed_on_are_read_as_word_by_word(line: str) -> None:
    for family in ("ip", "ip6"):
        both_ways(f"*nat\n:user - [0:0]\n{line}\nCOMMIT\n", family=family, all_chains=True)



@pytest.mark.skipif(not CORPUS.is_dir(), reason=f"corpus not found at {CORPUS}")
def test_corpus_tables_read_as_word_by_word() -> None:
    files = [p for p in sorted(CORPUS.rglob("*")) if p.is_file() and p.suffix not in (".nft", ".json")
             and b"-A " in p.read_bytes()]
    assert files
    for path in files:
        text = path.read_bytes().decode("utf-8", "surrogateescape")
        for family in ("ip", "ip6"):
            for kind in ("nat", "mangle"):
                both_ways(text, family=family, kind=kind, all_chains=True)
