"""One fuzz target per parser of external input, and the seeds each starts from.

Each target takes bytes, hands them to a parser the way the daemon does, and
holds the parser to its contract: it returns a value (or counts what it could
not read), or raises the project's own error type, ``TopowatchError``; any
other exception escapes and is the finding. Hangs are found by the caller (a
coverage-guided run's ``-timeout``; examples small enough to parse at once in
the hypothesis tests).

The hypothesis tests (``test_fuzz_parsers.py``, in CI) and the coverage-guided
harness (``atheris_fuzz.py``, run by ``scripts/fuzz``) share these targets
and seeds, so a crash either finds is replayed by the other.

Text arrives as bytes and is decoded with ``surrogateescape``: every byte
string maps to some ``str``, including lone surrogates, the most hostile
text a decoder at the edge could pass on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from topowatch.core.nat import NatRuleset
from topowatch.corpus import corpus_files, default_corpus, format_of
from topowatch.edges import ctcodec, iptables, nft, nftevents, rtnl, xfrm
from topowatch.errors import PolicyError, RulesetError, TopowatchError
from topowatch.policy import EffectivePolicy, load_policies
from topowatch.text import undecodable

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "edges" / "data"


def text_of(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


# --- netlink ----------------------------------------------------------------------------------


def _first_seq(data: bytes) -> int:
    return struct.unpack_from("=I", data, 8)[0] if len(data) >= 16 else 0


def fuzz_ctnetlink(data: bytes) -> None:
    """A dump datagram: the reference decode, the compiled scan into a sink, the ACK/stats readers."""
    seq = _first_seq(data)
    pure = ctcodec.DumpParser(seq=seq)
    pure.feed(data)
    for entry in pure.entries:
        entry.describe()  # what a log line shows of it
    raw: list[object] = []
    sunk = ctcodec.DumpParser(seq=seq, sink=raw.append)
    sunk.feed(data)
    for item in raw:
        ctcodec.entry_from_raw(item)  # type: ignore[arg-type]
    ctcodec.ends_dump(data, seq)
    ctcodec.parse_answers(data)
    with contextlib.suppress(ctcodec.MalformedMessage):  # its callers catch it (ctnetlink, doctor)
        ctcodec.parse_stats(data, seq, {})


def fuzz_rtnetlink(data: bytes) -> None:
    """A dump or event datagram: decoded, turned into a topology, and into events."""
    stats = rtnl.DecodeStats()
    topology = rtnl.topology_from_messages(rtnl.decode_messages(data, stats=stats), stats)
    topology.names()
    events = rtnl.RtnlEvents()
    events._feed(data)
    for event in events._pending:
        if isinstance(event, rtnl.RtnlEvent):
            assert event.description


def fuzz_xfrm(data: bytes) -> None:
    """An XFRM dump or event datagram: policies and SAs, or counted as undecodable."""
    stats = rtnl.DecodeStats()
    for event in xfrm.events_from_data(data, stats):
        assert event.description


def fuzz_nft_events(data: bytes) -> None:
    """An NFNLGRP_NFTABLES datagram: the generations it announces."""
    gens, others = nftevents.parse_generations(data)
    for gen in gens:
        gen.describe()
    assert others >= 0


# --- rulesets ---------------------------------------------------------------------------------


def fuzz_nft_json(data: bytes) -> None:
    """``nft -j list ruleset`` output, read as ``nft.read_ruleset`` reads it: a ruleset or RulesetError.

    The fast reader must say what the reference reader (the whole document
    decoded, ``parse_ruleset_json``) says: the same ruleset or the same error.
    """
    text = text_of(data)
    try:
        ruleset = nft.parse_ruleset_output(text, "nft -j list ruleset")
    except RulesetError as exc:
        assert str(exc)
        assert str(exc) == _nft_reference(text), (str(exc), _nft_reference(text))
        return
    _use(ruleset)
    if text.strip():
        assert ruleset == _nft_reference(text)


def _nft_reference(text: str) -> NatRuleset | str:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"nft -j list ruleset: output is not JSON ({exc.msg} at line {exc.lineno})"
    except RecursionError:
        return "nft -j list ruleset: output is nested too deeply to read"
    try:
        return nft.parse_ruleset_json(nft.mark_undecodable(doc) if undecodable(text) else doc)
    except RulesetError as exc:
        return str(exc)


# nft's JSON words: the bytes of an "nft-rule" input choose among them, so that mutations explore
# expression shapes instead of breaking the JSON syntax (what "nft-json" mostly does).
NFT_NAMES = [
    "match", "payload", "meta", "ct", "fib", "rt", "ipsec", "numgen", "jhash", "symhash", "socket", "exthdr",
    "snat", "dnat", "masquerade", "redirect", "prefix", "range", "set", "concat", "map", "vmap", "elem",
    "jump", "goto", "accept", "drop", "return", "continue", "counter", "log", "mangle", "xt", "&", "|", "^",
    "<<", ">>", "lookup", "limit", "quota", "notrack", "reject", "tcp option", "osf",
]
NFT_FIELDS = [
    "op", "left", "right", "protocol", "field", "key", "addr", "port", "family", "flags", "len", "data",
    "target", "mod", "offset", "name", "type", "dir", "spnum", "value", "mask", "result", "expr", "elem",
    "map", "seed", "val", "base", "timeout",
]
NFT_WORDS = [
    "==", "!=", "in", "<", ">=", "&", "ip", "ip6", "inet", "saddr", "daddr", "sport", "dport", "tcp", "udp",
    "icmp", "l4proto", "nfproto", "oifname", "iifname", "oif", "iif", "mark", "zone", "state", "status", "new",
    "established", "related", "dnat", "snat", "original", "reply", "10.0.0.1", "10.0.0.0", "192.0.2.1",
    "fd00::1", "::", "eth0", "ppp*", "@lan", "@ports", "type", "local", "unicast", "random", "persistent",
    "fully-random", "netmap", "prefix", "postrouting", "accept", "lan", "th", "ipsec", "reqid", "spi", "in",
    "out", "exists", "missing", "nexthop", "", "0x10", "\udcff",
]
NFT_SCALARS: list[object] = [0, 1, 8, 16, 24, 32, 64, 128, 1024, 65535, 65536, -1, 2**32, 2**64, 0.5, None, True,
                             False]
NFT_SETS = {
    ("inet", "t", "lan"): {"family": "inet", "table": "t", "name": "lan", "type": "ipv4_addr",
                           "flags": ["interval"], "elem": [{"prefix": {"addr": "10.0.0.0", "len": 8}}]},
    ("inet", "t", "ports"): {"family": "inet", "table": "t", "name": "ports", "type": "inet_service",
                             "map": "ipv4_addr", "elem": [[53, "192.0.2.1"], [{"range": [1, 9]}, "10.0.0.1"]]},
}


class _Choices:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def next(self) -> int:
        if self.at >= len(self.data):
            return 0
        self.at += 1
        return self.data[self.at - 1]

    def pick(self, items: list[Any]) -> Any:
        return items[self.next() % len(items)]

    def node(self, depth: int) -> Any:
        kind = self.next() % 8 if depth < 12 else self.next() % 3
        if kind == 0:
            return self.pick(NFT_WORDS)
        if kind == 1:
            return self.pick(NFT_SCALARS)
        if kind == 2:
            return self.pick(NFT_WORDS) if self.next() % 2 else self.next() * 257 + self.next()
        if kind in (3, 4):
            return {self.pick(NFT_NAMES): self.node(depth + 1)}
        if kind == 5:
            return {self.pick(NFT_FIELDS): self.node(depth + 1) for _ in range(self.next() % 4 + 1)}
        return [self.node(depth + 1) for _ in range(self.next() % 4)]


def fuzz_nft_rule(data: bytes) -> None:
    """One rule's expressions, built from the bytes out of nft's JSON words: parsed, never raised."""
    choices = _Choices(data)
    exprs = [{choices.pick(NFT_NAMES): choices.node(1)} for _ in range(choices.next() % 5 + 1)]
    family = choices.pick(["inet", "ip", "ip6"])
    rule = nft.parse_rule(exprs, family=family, table="t", sets=NFT_SETS)
    for expr in rule.exprs:
        assert expr is not None
    doc = {"nftables": [
        {"chain": {"family": "inet", "table": "t", "name": "post", "type": "nat", "hook": "postrouting",
                   "prio": 100}},
        *({"set": body} for body in NFT_SETS.values()),
        {"rule": {"family": "inet", "table": "t", "chain": "post", "expr": exprs}},
    ]}
    with contextlib.suppress(RulesetError):
        _use(nft.parse_ruleset_json(doc))


def fuzz_iptables_save(data: bytes) -> None:
    """iptables-save text (or ``iptables -t nat -A`` lines): never raises, in either family."""
    text = text_of(data)
    for family in ("ip", "ip6"):
        parsed = iptables.parse_save(text, family=family, all_chains=True)
        _use(parsed.ruleset)
        for problem in parsed.problems:
            assert isinstance(problem, str)


def fuzz_ipset(data: bytes) -> None:
    """``ipset save`` text, and the iptables rules that match on what it holds."""
    text = text_of(data)
    sets = iptables.parse_ipset_save(text)
    for content in sets.values():
        nftevents.ipset_digest(content)
    rules = "".join(f"-A POSTROUTING -m set --match-set {name} {flags} -j MASQUERADE\n"
                    for name in list(sets)[:8] for flags in ("src", "dst"))
    for family in ("ip", "ip6"):
        _use(iptables.parse_save(rules, family=family, ipsets=sets).ruleset)


def fuzz_rules_toml(data: bytes) -> None:
    """One rules.d drop-in, loaded as ``topowatch check`` and SIGHUP load it: a policy or PolicyErrors."""
    with tempfile.TemporaryDirectory(prefix="h3fuzz") as tmp:
        (Path(tmp) / "50-fuzz.toml").write_bytes(data)
        try:
            policy = load_policies([tmp], trusted_uids={os.geteuid()})
        except PolicyError as exc:
            assert str(exc)
            return
    _use_policy(policy)


def _use(ruleset: NatRuleset) -> None:
    """What the daemon does with a ruleset besides evaluating it: compare, hash, show."""
    assert ruleset == dataclasses.replace(ruleset, chains=tuple(ruleset.chains))  # rebuilt from its fields
    hash(ruleset)
    for chain in ruleset.chains:
        for rule in chain.rules:
            rule.unknown_expressions()
            assert isinstance(rule.text, str)


def _use_policy(policy: EffectivePolicy) -> None:
    policy.render()
    policy.select({("route", "eth0"), ("ruleset", None)})


TARGETS: dict[str, Callable[[bytes], None]] = {
    "ctnetlink": fuzz_ctnetlink,
    "rtnetlink": fuzz_rtnetlink,
    "xfrm": fuzz_xfrm,
    "nft-events": fuzz_nft_events,
    "nft-json": fuzz_nft_json,
    "nft-rule": fuzz_nft_rule,
    "iptables-save": fuzz_iptables_save,
    "ipset": fuzz_ipset,
    "rules-toml": fuzz_rules_toml,
}

# Exceptions a target may end with: the project's own (everything else is a finding).
ALLOWED: tuple[type[BaseException], ...] = (TopowatchError,)


# --- seeds ------------------------------------------------------------------------------------


def _netlink_messages(data: bytes) -> list[bytes]:
    out, offset = [], 0
    while offset + 16 <= len(data):
        (length,) = struct.unpack_from("=I", data, offset)
        if length < 16:
            break
        out.append(data[offset : offset + length])
        offset += (length + 3) & ~3
    return out


def _xfrm_records(name: str) -> list[bytes]:
    data = (DATA / name).read_bytes()
    out, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack_from("=I", data, offset)
        out.append(data[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return out


def _ct_seeds() -> list[bytes]:
    seeds = []
    for name in ("lab_nat", "created"):
        messages = [bytes.fromhex(line) for line in (DATA / f"ct_{name}.hex").read_text().split()]
        seeds.append(b"".join(messages))
        seeds.extend(messages[:4])
    return seeds


def _rtnl_seeds() -> list[bytes]:
    seeds = []
    for name in ("rtnl_dump.bin", "rtnl_events.bin"):
        data = (DATA / name).read_bytes()
        seeds.append(data)
        seeds.extend(_netlink_messages(data))
    return seeds


def _xfrm_seeds() -> list[bytes]:
    records = _xfrm_records("xfrm_dump.bin") + _xfrm_records("xfrm_events.bin")
    singles = [m for r in records for m in _netlink_messages(r)]
    return [*records, *singles]


def _nft_event_seeds() -> list[bytes]:
    def attr(kind: int, value: bytes) -> bytes:
        return struct.pack("=HH", 4 + len(value), kind) + value + b"\0" * (-len(value) % 4)

    body = struct.pack("=BBH", 0, 0, 0x1234) + attr(1, struct.pack("!I", 77)) + attr(2, struct.pack("!I", 42)) \
        + attr(3, b"nft\0")
    newgen = struct.pack("=IHHII", 16 + len(body), 10 << 8 | 15, 0, 0, 0) + body
    other = struct.pack("=IHHII", 20, 10 << 8 | 3, 0, 0, 0) + b"\x02\x00\x00\x00"
    return [newgen, other + newgen, newgen * 3]


def corpus_texts(kind: str, limit: int = 40) -> list[bytes]:
    """Files of the shared corpus in one format ("json-nft", "iptables"), if the corpus is there."""
    root = default_corpus()
    if not root.is_dir():
        return []
    files = [p for p in corpus_files(root) if format_of(p) == kind]
    return [p.read_bytes() for p in files[:limit]]


IPTABLES_SAMPLE = b"""\
# Generated by iptables-save v1.8.9 (nf_tables)
*filter
:INPUT ACCEPT [0:0]
-A INPUT -i lo -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [12:720]
:uplink - [0:0]
-A PREROUTING -i wan0 -p udp -m udp --dport 5060 -j DNAT --to-destination 10.0.1.2:5060
-A PREROUTING -d 203.0.113.5/32 -m addrtype --dst-type LOCAL -j DNAT --to-destination 10.0.1.3
-A POSTROUTING -m policy --dir out --pol ipsec -j ACCEPT
-A POSTROUTING -s 10.0.1.0/24,10.0.2.0/24 ! -d 10.0.0.0/8 -j uplink
-A POSTROUTING -m conntrack --ctstate DNAT,SNAT --ctstatus CONFIRMED -j RETURN
-A POSTROUTING -m mark --mark 0x10/0xf0 -j SNAT --to-source 198.51.100.1-198.51.100.9:1024-2047
-A POSTROUTING -p tcp -m multiport --dports 80,443:445 -m comment --comment "web out" -j MASQUERADE --to-ports 3000-4000
-A POSTROUTING -m set --match-set lan src -j MASQUERADE
-A POSTROUTING -m iprange --src-range 10.9.0.1-10.9.0.9 -j NETMAP --to 192.0.2.0/24
-A POSTROUTING -m statistic --mode nth --every 2 -j SNAT --to-source 192.0.2.7
-A uplink -o ppp+ -j MASQUERADE
-A uplink -j MARK --set-xmark 0x1/0xff
-I uplink 1 -p icmp -j RETURN
COMMIT
"""

IPTABLES_COMMANDS = b"""\
iptables -t nat -N uplink
iptables -w -t nat -A POSTROUTING -o eth1 -j uplink
host::iptables -t nat -A uplink -s 10.0.0.0/8 -j SNAT --to-source 192.0.2.1
ip6tables -t nat -A POSTROUTING -o eth1 -s fd00::/64 -j MASQUERADE
iptables -t nat -D POSTROUTING 1
iptables -t nat -A POSTROUTING -m comment --comment 'unterminated -j ACCEPT
conntrack -F
"""

IPSET_SAMPLE = b"""\
create lan hash:net family inet hashsize 1024 maxelem 65536
add lan 10.0.0.0/8
add lan 192.168.1.0/24 nomatch
create hosts hash:ip family inet hashsize 1024 maxelem 65536 timeout 30
add hosts 10.0.1.2 timeout 20
add hosts 10.0.1.5-10.0.1.9
create v6 hash:net family inet6 hashsize 1024 maxelem 65536
add v6 fd00::/64
create pairs hash:ip,port family inet hashsize 1024 maxelem 65536
add pairs 10.0.0.1,udp:53
create range bitmap:ip range 10.0.0.0-10.0.0.255
add range 10.0.0.7
"""

TOML_SAMPLES = [
    b'[policy.uplink]\ntriggers = ["route", "link"]\ninterfaces = ["ppp*", "wwan0"]\naction = "flush"\n'
    b'max_deletions = 1000\ndebounce = 0.5\nmax_wait = 2.0\nprotocols = ["udp", "icmp"]\n',
    b'[policy.ipsec]\ntriggers = ["xfrm"]\nprefixes = ["10.0.0.0/8", "fd00::/8"]\nmarks = ["0x10/0xf0"]\n'
    b'zones = [0, 7]\nfamilies = ["ipv4"]\naction = "log"\n',
    b'[pressure]\nenabled = true\nhigh = 0.9\nlow = 0.75\n',
    b'policy.x.enabled = false\n"policy"."y".action = """\nflush"""\n',
    b"[policy.a]\ndebounce = 3\nmax_wait = 1\n[[policy.b]]\nx = 1\n",
]


def _json_nft_seeds() -> list[bytes]:
    doc = {"nftables": [
        {"metainfo": {"version": "1.0.9", "json_schema_version": 1}},
        {"table": {"family": "inet", "name": "nat", "handle": 1}},
        {"set": {"family": "inet", "table": "nat", "name": "lan", "type": "ipv4_addr", "flags": ["interval"],
                 "elem": [{"prefix": {"addr": "10.0.0.0", "len": 8}}]}},
        {"chain": {"family": "inet", "table": "nat", "name": "post", "handle": 2, "type": "nat",
                   "hook": "postrouting", "prio": 100, "policy": "accept"}},
        {"chain": {"family": "inet", "table": "nat", "name": "up", "handle": 3}},
        {"rule": {"family": "inet", "table": "nat", "chain": "post", "handle": 4, "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "@lan"}},
            {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "ppp0"}},
            {"jump": {"target": "up"}}]}},
        {"rule": {"family": "inet", "table": "nat", "chain": "up", "handle": 5, "expr": [
            {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["new", "related"]}},
            {"snat": {"addr": {"range": ["192.0.2.1", "192.0.2.9"]}, "port": {"range": [1024, 2047]}}}]}},
        {"rule": {"family": "inet", "table": "nat", "chain": "up", "handle": 6, "expr": [
            {"masquerade": None}]}},
    ]}
    return [json.dumps(doc).encode(), *corpus_texts("json-nft")]


SEEDS: dict[str, Callable[[], list[bytes]]] = {
    "ctnetlink": _ct_seeds,
    "rtnetlink": _rtnl_seeds,
    "xfrm": _xfrm_seeds,
    "nft-events": _nft_event_seeds,
    "nft-json": _json_nft_seeds,
    "nft-rule": lambda: [bytes(range(256)), bytes(range(255, -1, -1)), b"\x03\x05" * 64, b"\x00" * 64],
    "iptables-save": lambda: [IPTABLES_SAMPLE, IPTABLES_COMMANDS, *corpus_texts("iptables")],
    "ipset": lambda: [IPSET_SAMPLE],
    "rules-toml": lambda: [*TOML_SAMPLES, *(p.read_bytes() for p in sorted((ROOT / "rules.d").glob("*.toml")))],
}


def quiet() -> None:
    """The parsers log each bad message they skip; a fuzz run would spend its time formatting them."""
    logging.disable(logging.CRITICAL)
