"""Every parser of external input, fuzzed: it parses, or raises ``TopowatchError``; nothing else escapes.

The targets and seeds are ``fuzz_targets``'s, shared with the coverage-guided
harness (``scripts/fuzz``). Here each runs a few hundred examples: mutations
of real inputs (recorded netlink messages, the shared ruleset corpus,
generated texts) and, for the text formats, lines built from their own
words, where byte mutations rarely reach. The deeper netlink properties
(what survives a corrupted dump) are in ``tests/edges``; this file holds
the one contract for all of them.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import fuzz_targets as F
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from topowatch.edges import ctcodec, iptables, nftevents
from topowatch.edges.iptables import IpSet, parse_ipset_save
from topowatch.errors import PolicyError, UsageError
from topowatch.metrics import parse_listen
from topowatch.policy import load_policies

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run(name: str, data: bytes) -> None:
    """The contract: the target returns or raises the project's own error."""
    with contextlib.suppress(F.ALLOWED):
        F.TARGETS[name](data)


# --- the seeds are real inputs that the parsers read ------------------------------------------


def test_every_parser_has_seeds_and_reads_them() -> None:
    assert set(F.SEEDS) == set(F.TARGETS)
    for name, seeds in F.SEEDS.items():
        got = seeds()
        assert got, name
        for seed in got:
            run(name, seed)


def test_the_seeds_hold_what_the_parsers_look_for() -> None:
    """Mutations of seeds the parsers reject at once would fuzz nothing but the first check."""
    ct = F.SEEDS["ctnetlink"]()[0]
    parser = ctcodec.DumpParser(seq=F._first_seq(ct))
    parser.feed(ct)
    assert parser.entries and parser.decode_errors == 0
    nat = iptables.parse_save(F.IPTABLES_SAMPLE.decode(), ipsets=parse_ipset_save(F.IPSET_SAMPLE.decode()))
    assert sum(len(c.rules) for c in nat.ruleset.chains) >= 12
    assert parse_ipset_save(F.IPSET_SAMPLE.decode())["lan"].nomatch == ("192.168.1.0/24",)
    gens, others = nftevents.parse_generations(F.SEEDS["nft-events"]()[1])
    assert [g.genid for g in gens] == [77] and others == 1


# --- byte mutations of the seeds, every parser ------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, name: str) -> bytes:
    seeds = F.SEEDS[name]()
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 8))):
        if not data:
            data = bytearray(b"\0")
        at = draw(st.integers(0, len(data) - 1))
        how = draw(st.sampled_from(["byte", "cut", "insert", "splice", "truncate"]))
        if how == "byte":
            data[at] = draw(st.integers(0, 255))
        elif how == "cut":
            del data[at : at + draw(st.integers(1, 16))]
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif how == "splice":
            other = draw(st.sampled_from(seeds))
            start = draw(st.integers(0, max(0, len(other) - 1)))
            data[at:at] = other[start : start + draw(st.integers(1, 64))]
        else:
            del data[at:]
    return bytes(data)


@pytest.mark.parametrize("name", sorted(F.TARGETS))
@FUZZ
@given(data=st.data())
def test_mutated_inputs_parse_or_raise_our_error(name: str, data: st.DataObject) -> None:
    run(name, data.draw(mutated(name)))


@pytest.mark.parametrize("name", sorted(F.TARGETS))
@FUZZ
@given(raw=st.binary(max_size=512))
def test_random_bytes_parse_or_raise_our_error(name: str, raw: bytes) -> None:
    run(name, raw)


# --- text formats from their own words ----------------------------------------------------------

IPT_WORDS = [
    "-A", "-I", "-D", "-R", "-N", "-X", "-F", "-P", "-Z", "POSTROUTING", "PREROUTING", "OUTPUT", "INPUT",
    "uplink", "1", "-s", "-d", "!", "-i", "-o", "eth0", "ppp+", "-p", "udp", "tcp", "icmp", "ipv6-icmp", "47",
    "-m", "--dport", "--sport", "--dports", "--sports", "multiport", "conntrack", "--ctstate", "--ctstatus",
    "NEW,DNAT", "SNAT", "CONFIRMED", "--ctorigsrc", "--ctexpire", "mark", "--mark", "0x10/0xf0", "0xffffffff",
    "addrtype", "--src-type", "--dst-type", "LOCAL", "--limit-iface-in", "policy", "--dir", "out", "in",
    "--pol", "ipsec", "none", "--strict", "--reqid", "--proto", "esp", "--mode", "tunnel", "--tunnel-src",
    "--next", "set", "--match-set", "lan", "src,dst", "src", "iprange", "--src-range", "--dst-range",
    "10.0.0.1-10.0.0.9", "comment", "--comment", "'a b'", '"x', "statistic", "-j", "--goto", "-g",
    "MASQUERADE", "DNAT", "REDIRECT", "NETMAP", "RETURN", "ACCEPT", "DROP", "MARK", "CONNMARK", "LOG",
    "--to-source", "--to-destination", "--to-ports", "--to", "--random", "--persistent", "--set-xmark",
    "--set-mark", "0x1/0xff", "10.0.0.0/8", "192.0.2.1-192.0.2.9:1024-2047", "[fd00::1]:53", "fd00::/64",
    "::", "0.0.0.0/0", "1.2.3.4/33", "65536", "-1", "1:65535", "99999999999999999999", ":", "-", ",", "/",
    "\\", "'", '"', "--", "-w", "-t", "nat", "filter", "[0:0]", "%", "\udcff", "é", "*nat", "COMMIT",
    "²", "٣", "9" * 5000, "0x" + "f" * 5000, "a\0b",
]


@st.composite
def iptables_text(draw: st.DrawFn) -> bytes:
    lines = ["*nat", ":POSTROUTING ACCEPT [0:0]", ":uplink - [0:0]"]
    for _ in range(draw(st.integers(1, 12))):
        words = draw(st.lists(st.sampled_from(IPT_WORDS), min_size=1, max_size=14))
        head = draw(st.sampled_from(["-A POSTROUTING", "-A uplink", "-I PREROUTING 2", "", ":", "iptables -t nat"]))
        lines.append(" ".join([head, *words]).strip())
    if draw(st.booleans()):
        lines.append("COMMIT")
    return "\n".join(lines).encode("utf-8", "surrogateescape")


@FUZZ
@given(iptables_text())
def test_iptables_lines_from_its_words(text: bytes) -> None:
    run("iptables-save", text)


IPSET_WORDS = ["create", "add", "lan", "hosts", "hash:ip", "hash:net", "bitmap:ip", "hash:ip,port", "family",
               "inet", "inet6", "nomatch", "timeout", "10", "10.0.0.0/8", "10.0.0.1-10.0.0.9", "10.0.0.9-10.0.0.1",
               "fd00::/64", "fd00::1-fd00::9", "10.0.0.1,udp:53", "1.2.3.4/99", "::ffff:1.2.3.4", "-", ",", "/",
               "range", "0-0", "\udcff", "é"]


@st.composite
def ipset_text(draw: st.DrawFn) -> bytes:
    lines = [" ".join(draw(st.lists(st.sampled_from(IPSET_WORDS), min_size=1, max_size=8)))
             for _ in range(draw(st.integers(1, 12)))]
    return "\n".join(lines).encode("utf-8", "surrogateescape")


@FUZZ
@given(ipset_text())
def test_ipset_lines_from_its_words(text: bytes) -> None:
    run("ipset", text)


TOML_KEYS = ["enabled", "triggers", "families", "protocols", "zones", "marks", "prefixes", "sources",
             "destinations", "interfaces", "action", "max_deletions", "debounce", "max_wait", "unreplied_only",
             "high", "low", "min_interval", "max_interval", "timeouts", "evict_replied", "protect_prefixes",
             "nosuchkey"]
TOML_SCALARS = st.one_of(
    st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(['"flush"', '"log"', '"route"', '"ipv4"', '"udp"', '"10.0.0.0/8"', '"fd00::/300"',
                     '"0x10/0xf0"', '"ppp*"', '"*"', '""', '"\\u0000"', '"\\udcff"', "1979-05-27", "07:32:00",
                     "inf", "nan", "0x1f", "1e400", '"""\nx"""', "{a = 1}", "[]"]),
)


def toml_value(depth: int) -> st.SearchStrategy[str]:
    return st.recursive(
        TOML_SCALARS.map(lambda v: v if isinstance(v, str) else str(v).lower()),
        lambda inner: st.lists(inner, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"),
        max_leaves=depth,
    )


@st.composite
def toml_text(draw: st.DrawFn) -> bytes:
    lines = []
    for _ in range(draw(st.integers(1, 4))):
        lines.append(draw(st.sampled_from(["[policy.a]", "[policy.b-1]", "[pressure]", "[[policy.c]]",
                                           "[policy]", "[policy.'q x']", "[other]", "[policy.a.triggers]"])))
        for _ in range(draw(st.integers(0, 5))):
            lines.append(f"{draw(st.sampled_from(TOML_KEYS))} = {draw(toml_value(8))}")
    if draw(st.booleans()):  # deep nesting: tomllib recurses once per level
        depth = draw(st.integers(900, 1500))
        lines.append("prefixes = " + "[" * depth + "]" * depth)
    return "\n".join(lines).encode()


@FUZZ
@given(toml_text())
def test_rules_toml_from_its_keys(text: bytes) -> None:
    run("rules-toml", text)


# --- crashes the fuzzing found --------------------------------------------------------------------


def test_ipset_digest_of_members_that_were_not_utf8() -> None:
    """ipset save output decoded with surrogateescape: the poll's digest must not raise on it."""
    text = b"create lan hash:ip family inet\nadd lan 10.0.0.\xff7\n".decode("utf-8", "surrogateescape")
    sets = parse_ipset_save(text)
    assert sets["lan"].members == ("10.0.0.\udcff7",)
    digest = nftevents.ipset_digest(sets["lan"])
    assert digest != nftevents.ipset_digest(IpSet("lan", "hash:ip", 2, ("10.0.0.7",)))


@pytest.mark.parametrize("line", [
    "-I POSTROUTING ² -j MASQUERADE",  # str.isdigit() takes "²"; int() does not
    "-I POSTROUTING " + "9" * 5000 + " -j MASQUERADE",  # int() refuses more than 4,300 digits
    "-I POSTROUTING '² -j MASQUERADE",  # ... in a line shlex cannot split, too
    "-A POSTROUTING -p ² -j MASQUERADE",
])
def test_iptables_numbers_that_int_refuses(line: str) -> None:
    parsed = iptables.parse_save(f"*nat\n{line}\nCOMMIT\n")
    (post,) = [c for c in parsed.ruleset.chains if c.name == "POSTROUTING"]
    assert len(post.rules) == 1  # kept in its chain, known or unknown


@FUZZ
@given(st.one_of(st.text(max_size=30), st.sampled_from(["127.0.0.1:²", "[::1]:٣٣", "h:" + "9" * 5000])))
def test_metrics_listen_is_parsed_or_a_usage_error(text: str) -> None:
    """``--metrics-listen``: "²" passes str.isdigit() but not int()."""
    try:
        host, port = parse_listen(text)
    except UsageError:
        return
    assert host and 0 < port < 65536


def test_deeply_nested_toml_is_a_policy_error(tmp_path: Path) -> None:
    """tomllib recurses per nesting level: a RecursionError is bad input, named with its file."""
    (tmp_path / "50-deep.toml").write_text("[policy.a]\nprefixes = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(PolicyError, match=r"50-deep\.toml: nested too deeply"):
        load_policies([str(tmp_path)], trusted_uids={os.geteuid()})
