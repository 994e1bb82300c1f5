"""The fast nft reader (``parse_ruleset_output``) agrees with the reference reader on every document.

``parse_ruleset_json`` (the whole document decoded, every walked rule
parsed on its own) is the reference; the fast reader streams nft's text,
defers rules of chains that do not matter, and shares equal expressions.
They must give equal rulesets, or the same error, on the corpus, on
generated gateways of every shape, on documents in another order or
layout, and on hostile ones; the summary that lets a rule go unparsed
must say exactly what parsing it would.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from topowatch.core.nat import NatRuleset
from topowatch.edges import bulkparse, nft
from topowatch.errors import RulesetError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))

import fuzz_targets as F

Outcome = NatRuleset | str


def reference(text: str) -> Outcome:
    """What the reference reader makes of nft's output text (a ruleset, or the error's words)."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"nft -j list ruleset: output is not JSON ({exc.msg} at line {exc.lineno})"
    except RecursionError:
        return "nft -j list ruleset: output is nested too deeply to read"
    if nft.undecodable(text):
        doc = nft.mark_undecodable(doc)
    try:
        return nft.parse_ruleset_json(doc)
    except RulesetError as exc:
        return str(exc)


def fast(text: str) -> Outcome:
    try:
        return nft.parse_ruleset_output(text)
    except RulesetError as exc:
        return str(exc)


def agree(text: str) -> Outcome:
    if not text.strip():
        return fast(text)
    got, want = fast(text), reference(text)
    assert got == want
    return got


# --- documents shaped like nft's output -----------------------------------------------------------

FWD = {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "wan0"}}


def counter(n: int) -> dict[str, Any]:
    return {"counter": {"packets": n, "bytes": n * 60}}


def gateway(rules: int, seed: int = 0, *, filter_rules: int = 0, marks: bool = False) -> dict[str, Any]:
    """A gateway as ``nft -j list ruleset`` prints it: NAT rules (some in jumped-to chains), a filter table."""
    rnd = random.Random(seed)
    items: list[dict[str, Any]] = [
        {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
        {"table": {"family": "ip", "name": "nat", "handle": 1}},
        {"set": {"family": "ip", "name": "lan", "table": "nat", "type": "ipv4_addr", "handle": 2,
                 "flags": ["interval"], "elem": [{"prefix": {"addr": "10.0.0.0", "len": 8}}]}},
        {"map": {"family": "ip", "name": "ups", "table": "nat", "type": "ifname", "handle": 3, "map": "verdict",
                 "elem": [["wan0", {"jump": {"target": "up0"}}], ["wan1", {"goto": {"target": "up1"}}]]}},
        {"chain": {"family": "ip", "table": "nat", "name": "pre", "handle": 4, "type": "nat",
                   "hook": "prerouting", "prio": -100, "policy": "accept"}},
        {"chain": {"family": "ip", "table": "nat", "name": "post", "handle": 5, "type": "nat",
                   "hook": "postrouting", "prio": 100, "policy": "accept"}},
        {"chain": {"family": "ip", "table": "nat", "name": "up0", "handle": 6}},
        {"chain": {"family": "ip", "table": "nat", "name": "up1", "handle": 7}},
        {"chain": {"family": "ip", "table": "nat", "name": "unused", "handle": 8}},
    ]
    handle = 100
    nat: list[tuple[str, list[Any]]] = [
        ("post", [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "@lan"}},
                  {"vmap": {"key": {"meta": {"key": "oifname"}}, "data": "@ups"}}]),
        ("up0", [counter(3), {"masquerade": None}]),
        ("up1", [{"snat": {"addr": "192.0.2.1"}}]),
        ("unused", [{"snat": {"addr": "192.0.2.9"}}]),
    ]
    for i in range(rules):
        a, b = divmod(i, 250)
        if i % 3 == 0:
            nat.append(("pre", [FWD, {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                                                "right": 1024 + i % 60000}},
                                counter(rnd.randrange(1000)), {"dnat": {"addr": f"10.1.{a % 250}.{b + 1}", "port": 80}}]))
        elif i % 3 == 1:
            nat.append(("post", [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                                            "right": f"10.2.{a % 250}.{b + 1}"}},
                                 {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": f"wan{i % 3}"}},
                                 counter(0), {"snat": {"addr": f"203.0.113.{1 + i % 250}"}}]))
        else:
            nat.append(("up0", [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                                           "right": {"prefix": {"addr": f"10.3.{a % 250}.0", "len": 24}}}},
                                {"jump": {"target": "up1"}}]))
    for chain, exprs in nat:
        handle += 1
        items.append({"rule": {"family": "ip", "table": "nat", "chain": chain, "handle": handle, "expr": exprs}})
    items += [
        {"table": {"family": "inet", "name": "filter", "handle": 9}},
        {"chain": {"family": "inet", "table": "filter", "name": "fwd", "handle": 1, "type": "filter",
                   "hook": "forward", "prio": 0, "policy": "drop"}},
        {"chain": {"family": "inet", "table": "filter", "name": "pre", "handle": 2, "type": "filter",
                   "hook": "prerouting", "prio": -150, "policy": "accept"}},
        {"chain": {"family": "inet", "table": "filter", "name": "hosts", "handle": 3}},
        {"rule": {"family": "inet", "table": "filter", "chain": "pre", "handle": 4, "expr": [
            {"match": {"op": "==", "left": {"fib": {"flags": ["saddr", "iif"], "result": "oif"}}, "right": False}},
            counter(1), {"drop": None}]}},
        {"rule": {"family": "inet", "table": "filter", "chain": "fwd", "handle": 5, "expr": [
            {"jump": {"target": "hosts"}}]}},
    ]
    for i in range(filter_rules):
        items.append({"rule": {"family": "inet", "table": "filter", "chain": "hosts", "handle": 10 + i, "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                       "right": f"10.{i // 62500}.{i // 250 % 250}.{i % 250 + 1}"}},
            {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}},
            counter(i), {"accept": None}]}})
    if marks:
        items.append({"rule": {"family": "inet", "table": "filter", "chain": "hosts", "handle": 9, "expr": [
            {"mangle": {"key": {"meta": {"key": "mark"}}, "value": 16}}]}})
    return {"nftables": items}


def test_generated_gateways_agree_and_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    for kwargs in ({"rules": 300}, {"rules": 300, "filter_rules": 200}, {"rules": 60, "filter_rules": 50, "marks": True}):
        text = json.dumps(gateway(**kwargs))  # type: ignore[arg-type]
        want = reference(text)
        assert isinstance(want, NatRuleset) and want.chains
        with monkeypatch.context() as m:
            m.setattr(nft, "parse_ruleset_json", lambda *a: pytest.fail("the reference reader was asked"))
            assert nft.parse_ruleset_output(text) == want


def test_the_mark_chains_come_in_only_when_a_rule_may_set_a_mark() -> None:
    plain = agree(json.dumps(gateway(30, filter_rules=20)))
    marked = agree(json.dumps(gateway(30, filter_rules=20, marks=True)))
    assert isinstance(plain, NatRuleset) and isinstance(marked, NatRuleset)
    assert {c.table for c in plain.chains} == {"nat"}
    assert {(c.table, c.name) for c in marked.chains} >= {("filter", "fwd"), ("filter", "hosts")}
    assert plain.rpfilter == marked.rpfilter == frozenset({2, 10})


def test_a_filter_table_is_decoded_not_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rules of chains that matter to no NAT and set no mark are summarized, never parsed."""
    monkeypatch.setattr(nft._LastRead, "rules", {})
    parsed: list[Any] = []
    real = nft._expression

    def counting(e: Any, *args: Any) -> Any:
        parsed.append(e)
        return real(e, *args)

    monkeypatch.setattr(nft, "_expression", counting)
    small = nft.parse_ruleset_output(json.dumps(gateway(30)))
    alone = len(parsed)
    parsed.clear()
    nft._LastRead.rules = {}  # not the rules the last read made: each parsed again
    big = nft.parse_ruleset_output(json.dumps(gateway(30, filter_rules=2000)))
    assert big == small and len(parsed) == alone


def test_equal_expressions_are_one_object(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nft._LastRead, "rules", {})
    ruleset = nft.parse_ruleset_output(json.dumps(gateway(90)))
    pre = next(c for c in ruleset.chains if c.name == "pre")
    firsts = {id(rule.exprs[0]) for rule in pre.rules}
    counters = {id(rule.exprs[2]) for rule in pre.rules}
    assert len(pre.rules) == 30 and len(firsts) == 1 and len(counters) == 1
    assert len({id(rule.exprs[1]) for rule in pre.rules}) == 30  # each its own port


def change_set(doc: dict[str, Any]) -> None:
    lan = next(i["set"] for i in doc["nftables"] if i.get("set", {}).get("name") == "lan")
    lan["elem"] = [{"prefix": {"addr": "10.0.0.0", "len": 16}}]


def change_rule(doc: dict[str, Any]) -> None:
    rule = next(i["rule"] for i in doc["nftables"] if i.get("rule", {}).get("chain") == "pre")
    rule["expr"][1]["match"]["right"] = 7


def change_chain(doc: dict[str, Any]) -> None:
    chain = next(i["chain"] for i in doc["nftables"] if i.get("chain", {}).get("name") == "unused")
    chain |= {"type": "nat", "hook": "output", "prio": -100, "policy": "accept"}


def add_mark(doc: dict[str, Any]) -> None:
    doc["nftables"].append({"rule": {"family": "inet", "table": "filter", "chain": "hosts", "handle": 9, "expr": [
        {"mangle": {"key": {"meta": {"key": "mark"}}, "value": 16}}]}})


def reorder(doc: dict[str, Any]) -> None:
    doc["nftables"].sort(key=lambda item: "set" in item or "map" in item)


def without_map(doc: dict[str, Any]) -> None:
    doc["nftables"] = [i for i in doc["nftables"] if "map" not in i]


# In a mark chain (a table with no nat chain: no rule of it is parsed as it is read).
LATE_RULE = {"rule": {"family": "inet", "table": "filter", "chain": "hosts", "handle": 99999, "expr": [
    {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "@late"}},
    {"accept": None}]}}


def set_after(doc: dict[str, Any]) -> None:
    """A set a rule of a mark chain looks up, new and after it (the rule's text is the same)."""
    doc["nftables"].append({"set": {"family": "inet", "table": "filter", "name": "late", "type": "ipv4_addr",
                                    "elem": ["192.0.2.1"]}})


def map_after(doc: dict[str, Any]) -> None:
    """The map the first read lacked comes after the rules that look it up."""
    ups = next(i for i in doc["nftables"] if "map" in i)
    without_map(doc)
    doc["nftables"].append(ups)


@pytest.mark.parametrize("change", [change_set, change_rule, change_chain, add_mark, reorder, map_after,
                                    set_after, lambda doc: None])
def test_a_re_read_reuses_what_did_not_change_and_only_that(change: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nft._LastRead, "rules", {})
    before = gateway(60, filter_rules=40, marks=change is set_after)
    if change is set_after:
        before["nftables"].append(LATE_RULE)
    after = json.loads(json.dumps(before))
    if change is map_after:
        without_map(before)
    first = nft.parse_ruleset_output(json.dumps(before))
    change(after)
    again = agree(json.dumps(after))
    assert isinstance(first, NatRuleset) and isinstance(again, NatRuleset)
    old = {id(r) for c in first.chains for r in c.rules}
    new = [r for c in again.chains for r in c.rules]
    reused = sum(id(r) in old for r in new)
    if change in (change_set, reorder, map_after, set_after):  # the table's sets changed or come after rules
        assert reused == 0
    else:  # every rule the last read made, but the one changed
        assert reused == sum(len(c.rules) for c in first.chains) - (change is change_rule) > 60


@pytest.mark.parametrize("layout", ["compact", "indented", "shuffled", "sets last", "extra key", "two lists",
                                    "trailing", "undecodable", "escaped undecodable"])
def test_other_layouts_agree(layout: str) -> None:
    doc = gateway(40, filter_rules=10, marks=True)
    items = doc["nftables"]
    if layout == "shuffled":
        random.Random(7).shuffle(items)
    elif layout == "sets last":
        items.sort(key=lambda item: "set" in item or "map" in item)
    elif layout in ("undecodable", "escaped undecodable"):
        items[-1]["rule"]["expr"].insert(0, {"match": {"op": "==", "left": {"meta": {"key": "iifname"}},
                                                      "right": "lan\udcff"}})
    text = json.dumps(doc, indent=2 if layout == "indented" else None, ensure_ascii=layout != "undecodable")
    if layout == "extra key":
        text = text[:-1] + ', "x": 1}'
    elif layout == "two lists":
        text = text[:-1] + ', "nftables": []}'
    elif layout == "trailing":
        text += " ]"
    got = agree(text)
    assert isinstance(got, NatRuleset if layout != "trailing" else str)


@pytest.mark.parametrize("path", F.corpus_texts("json-nft", limit=1000) + F.SEEDS["nft-json"]()[:1],
                         ids=lambda b: str(len(b)))
def test_the_corpus_agrees(path: bytes) -> None:
    agree(F.text_of(path))


# --- generated documents: any order, any field -------------------------------------------------------

CHAINS = ["pre", "post", "sub", "marks", "other"]
HOOKS = ["prerouting", "postrouting", "output", "input", "forward", "ingress"]


def expression_palette(names: list[str]) -> list[Any]:
    return [
        FWD, counter(1), {"log": {"prefix": "x"}}, {"accept": None}, {"drop": None}, {"return": None},
        *({"jump": {"target": n}} for n in names), *({"goto": {"target": n}} for n in names),
        {"jump": {"target": 7}}, {"goto": "sub"},
        {"vmap": {"key": {"meta": {"key": "iifname"}}, "data": {"set": [["eth0", {"jump": {"target": "sub"}}]]}}},
        {"vmap": {"key": {"meta": {"key": "iifname"}}, "data": "@vm"}},
        {"mangle": {"key": {"meta": {"key": "mark"}}, "value": 1}},
        {"mangle": {"key": {"ct": {"key": "mark"}}, "value": {"meta": {"key": "mark"}}}},
        {"mangle": {"key": {"payload": {"protocol": "ip", "field": "dscp"}}, "value": 1}},
        {"mangler": 1}, {"xt": {"type": "match", "name": "policy"}}, {"xt": {"type": "target", "name": "MARK"}},
        {"xt": "x"}, {"xtra": {}},
        {"snat": {"addr": "192.0.2.1"}}, {"dnat": {"addr": "10.0.0.1", "port": 80}}, {"masquerade": None},
        {"snat": {"addr": {"map": {"key": {"xt": {"type": "target", "name": "x"}}, "data": "@m"}}}},
        {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "@lan"}},
        {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": True}},
        {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 1}},
        {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 1.0}},
        {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": "1"}},
        {"match": {"right": 1, "op": "==", "left": {"payload": {"field": "dport", "protocol": "tcp"}}}},
        {"match": {"op": "==", "left": {"fib": {"flags": ["saddr", "iif"], "result": "oif"}}, "right": False}},
        {"match": "x"}, [], "jump", {"a": 1, "b": 2}, {"undecodable\udcff": 1},
        *(quick_palette()),
    ]


def quick_palette() -> list[Any]:
    """Matches and NAT statements in the shapes ``nft._quick`` takes, with every value that fails somewhere."""
    lefts = [{"meta": {"key": k}} for k in ("iifname", "oifname", "iif", "mark", "l4proto", "nfproto", "protocol",
                                            "skuid", 7)]
    lefts += [{"payload": {"protocol": p, "field": f}} for p, f in (("ip", "saddr"), ("ip6", "daddr"),
                                                                   ("tcp", "dport"), ("th", "sport"), ("ip", "ttl"),
                                                                   ("udp", 5))]
    lefts += [{"meta": {"key": "iifname", "x": 1}}, {"payload": {"field": "dport", "protocol": "tcp"}}]
    rights: list[Any] = ["eth0", "ppp*", "e\\*", "@lan", "@nope", "10.0.0.1", "fd00::1", "1.2.3.4.5", "", "0x10",
                         "ipv4", "ip6", "tcp", 80, 0, -1, 65536, 2**40, 0x86DD]
    out: list[Any] = [{"match": {"op": op, "left": left, "right": right}}
                      for left in lefts for right in rights for op in ("==", "!=", "in", "<")]
    out += [{"match": {"op": "==", "left": lefts[0], "right": "eth0", "extra": 1}}]
    for kind in ("snat", "dnat", "masquerade"):
        for addr in ("192.0.2.1", "fd00::1", "@lan", "bad", "10.0.0.01", 5):
            out.append({kind: {"addr": addr}})
            out += [{kind: {"addr": addr, "port": port}} for port in (80, 0, 65535, 65536, -1, True, "80")]
            out.append({kind: {"port": 80, "addr": addr}})
            out.append({kind: {"addr": addr, "flags": ["random"]}})
    return out


@st.composite
def documents(draw: st.DrawFn) -> str:
    items: list[Any] = [{"metainfo": {"json_schema_version": 1}}]
    tables = draw(st.lists(st.sampled_from([("ip", "nat"), ("inet", "fw"), ("ip6", "t"), ("bridge", "b")]),
                           min_size=1, max_size=3, unique=True))
    palette = expression_palette(CHAINS)
    for family, table in tables:
        flags = draw(st.sampled_from([[], ["dormant"], "dormant", 5]))
        items.append({"table": {"family": family, "name": table, "handle": 1, "flags": flags}})
        for name in draw(st.lists(st.sampled_from(["lan", "vm", "m"]), unique=True, max_size=3)):
            body: dict[str, Any] = {"family": family, "table": table, "name": name, "type": "ipv4_addr",
                                    "elem": [{"prefix": {"addr": "10.0.0.0", "len": 8}}]}
            if name != "lan":
                body |= {"type": "ifname", "map": "verdict" if name == "vm" else "ipv4_addr",
                         "elem": [["eth0", {"goto": {"target": "sub"}} if name == "vm" else "192.0.2.7"]]}
            body["flags"] = draw(st.sampled_from([[], ["interval"], ["dynamic"], 3]))
            items.append({"map" if "map" in body else "set": body})
        for name in draw(st.lists(st.sampled_from(CHAINS), unique=True, min_size=1)):
            chain: dict[str, Any] = {"family": family, "table": table, "name": name, "handle": 2}
            kind = draw(st.sampled_from(["nat", "filter", "route", None, 3]))
            if kind is not None:
                chain |= {"type": kind, "hook": draw(st.sampled_from([*HOOKS, 1])),
                          "prio": draw(st.sampled_from([0, -100, 100, "x"])),
                          "policy": draw(st.sampled_from(["accept", "drop", "reject"]))}
            items.append({"chain": chain})
        for _ in range(draw(st.integers(0, 8))):
            exprs = draw(st.lists(st.one_of(st.sampled_from(palette),
                                            st.binary(max_size=24).map(lambda b: F._Choices(b).node(1))),
                                  max_size=5))
            rule: dict[str, Any] = {"family": family, "table": table, "chain": draw(st.sampled_from(CHAINS)),
                                    "handle": draw(st.sampled_from([3, 4, "5", [6]])), "expr": exprs}
            if draw(st.booleans()):
                rule["comment"] = draw(st.sampled_from(["c", 7]))
            if draw(st.integers(0, 20)) == 0:
                rule["expr"] = {"counter": None}
            items.append({"rule": rule})
    if draw(st.booleans()):
        items = draw(st.permutations(items))
    if draw(st.integers(0, 20)) == 0:
        items.append(draw(st.sampled_from([[], {"rule": 1}, {"a": 1, "b": 2}])))
    return json.dumps({"nftables": items}, ensure_ascii=draw(st.booleans()),
                      indent=draw(st.sampled_from([None, None, 1])))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents())
def test_generated_documents_agree(text: str) -> None:
    agree(text)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(expression_palette(CHAINS)),
                          st.binary(max_size=32).map(lambda b: F._Choices(b).node(0))), max_size=6))
def test_a_summary_says_what_parsing_would(exprs: list[Any]) -> None:
    item = nft._Item("rule", {"family": "inet", "table": "t", "chain": "c", "handle": 1, "expr": exprs}, 0)
    targets, must_parse, mark = nft._summary(item)
    if must_parse:
        return
    rule = nft.parse_rule(exprs, family="inet", table="t", sets=F.NFT_SETS)
    assert list(targets) == list(nft._jump_targets(rule))
    assert mark == any(nft._may_set_mark(e) for e in rule.exprs)


def test_quick_expressions_are_the_general_ones() -> None:
    sets = {(family, "t", name): body for family in ("ip", "ip6", "inet")
            for (_, _, name), body in F.NFT_SETS.items()}
    taken = 0
    for e in quick_palette():
        for family in ("ip", "ip6", "inet"):
            quick = nft._quick(e, sets, family, "t")
            if quick is not None:
                taken += 1
                assert quick == nft._expression(e, sets, family, "t"), (e, family)
    assert taken > 1000  # the shortcut is taken, and for failing values too


def test_flat_keys_are_equal_only_for_what_parses_alike() -> None:
    sets = {(family, "t", name): body for family in ("ip", "ip6", "inet")
            for (_, _, name), body in F.NFT_SETS.items()}
    palette = [*expression_palette(CHAINS), *quick_palette()]
    palette += [{"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": r}} for r in (1, True, "1", 1.0)]
    palette += [{"match": {"op": "==", "left": {"payload": {"field": "dport", "protocol": "tcp"}}, "right": 1}},
                {"dnat": {"port": 80, "addr": "10.0.0.1"}}, {"dnat": {"addr": "10.0.0.1", "port": True}}]
    groups: dict[Any, list[Any]] = {}
    for e in palette:
        for family in ("ip", "ip6", "inet"):
            if isinstance(e, dict) and len(e) == 1:
                ((k, v),) = e.items()
                key = nft._flat_key(k, v, family, "t")
                if key is not None:
                    groups.setdefault(key, []).append(nft._expression(e, sets, family, "t"))
    assert sum(len(g) for g in groups.values()) > 1000  # most of the palette is keyed flat
    for key, parsed in groups.items():
        assert all(p == parsed[0] for p in parsed), key
    bools = {"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": True}}["match"]
    assert nft._flat_key("match", bools, "ip", "t") is None  # True == 1, but parses apart: not keyed flat


def test_expression_keys_keep_apart_what_parses_apart() -> None:
    def key(right: Any) -> Any:
        return nft._expression_key({"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": right}})

    keys = [key(1), key(True), key(1.0), key("1"), key([1]), key({"set": [1]})]
    assert len(set(keys)) == len(keys)
    assert nft._frozen({"a": [1, True, 1.0, None]}) != nft._frozen({"a": [True, 1, 1, None]})


# --- the parse's clock ---------------------------------------------------------------------------------


def test_a_parse_reports_progress_and_stops_past_its_deadline() -> None:
    text = json.dumps(gateway(3 * bulkparse.STEP))
    steps: list[int] = []
    nft.parse_ruleset_output(text, progress=lambda: steps.append(1))
    assert len(steps) >= 3  # every STEP rules, and once every item was read
    with pytest.raises(bulkparse.ParseTooSlow, match="took more than"):
        nft.parse_ruleset_output(text, timeout=-1.0)


def test_the_collector_is_paused_while_parsing_and_back_after() -> None:
    import gc

    seen: list[bool] = []
    text = json.dumps(gateway(2 * bulkparse.STEP))
    nft.parse_ruleset_output(text, progress=lambda: seen.append(gc.isenabled()))
    assert seen and not any(seen) and gc.isenabled()
    with bulkparse.gc_paused():
        nft._LastRead.rules = {}  # parsed again: as many new objects
        nft.parse_ruleset_output(text)
        assert not gc.isenabled()  # nested: the outer pause still holds
        assert gc.get_count()[0] > 10_000
    assert gc.isenabled()
    # What the parse made is in the oldest generation already, not walked as young objects on the way.
    assert len(gc.get_objects(generation=0)) + len(gc.get_objects(generation=1)) < 10_000
