"""The conformance corpus: every in-scope file loads, and at least 90% of its NAT statements are exact.

The corpus (shared/corpus beside the checkout, or $TOPOWATCH_CORPUS) holds rulesets nobody
on this project wrote. ``*.nft`` text is loaded through this system's nft in
a throwaway namespace; without root those files are reported as skipped.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from topowatch.core.nat import NatStatement
from topowatch.corpus import (
    Report,
    _t_family,
    corpus_files,
    corpus_report,
    default_corpus,
    file_report,
    format_of,
    t_json_rules,
)
from topowatch.edges.nft import parse_ruleset_json
from topowatch.errors import RulesetError

CORPUS = default_corpus()
needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason=f"corpus not found at {CORPUS}")


@pytest.fixture(scope="module")
def report() -> Report:
    return corpus_report(CORPUS)


@needs_corpus
def test_every_in_scope_file_is_reported(report: Report) -> None:
    paths = [f.path for f in report.files]
    assert paths == [str(p.relative_to(CORPUS)) for p in corpus_files(CORPUS)]
    formats = {f.format for f in report.files}
    assert formats == {"t.json", "json-nft", "nft", "iptables"}
    for f in report.files:
        assert f.skipped is None or f.format == "nft", f.describe()  # only nft text may be unloadable here
        assert 0 <= f.exact <= f.nat_statements
        assert all(name and n > 0 for name, n in f.unknown)
    print("\n" + report.describe())


@needs_corpus
def test_at_least_90_percent_of_nat_statements_are_exact(report: Report) -> None:
    assert report.nat_statements >= 250
    assert report.ratio >= 0.90, report.describe()


@needs_corpus
def test_iptables_files(report: Report) -> None:
    by_path = {f.path: f for f in report.files}
    docker = by_path["rulesets/docker-usernet-portmap.iptables-save"]
    assert (docker.nat_statements, docker.exact, docker.unknown) == (3, 3, ())
    cmds = by_path["rulesets/strongswan-mobike-nat-mappings-moon.cmds"]
    assert (cmds.nat_statements, cmds.exact) == (1, 1)  # phase 2 after "iptables -t nat -F"
    assert "placeholders: PH_IP_MOON=192.168.0.1" in cmds.notes
    moon = by_path["strongswan-scenarios/ip-two-pools/hosts/moon/etc/iptables.rules"]
    assert (moon.nat_statements, moon.exact) == (1, 1)
    assert "PH_IP_WINNETOU=192.168.0.150" in moon.notes[0]
    # A filter-only file has no NAT statement and nothing unknown from the nat table.
    alice = by_path["rulesets/strongswan-mobike-alice-policy-ipsec.iptables-restore"]
    assert (alice.nat_statements, alice.unknown) == (0, ())


@needs_corpus
def test_unloadable_nft_text_is_skipped_with_nfts_message(report: Report) -> None:
    skipped = [f for f in report.files if f.skipped is not None]
    for f in skipped:
        assert f.skipped.startswith(("nft cannot load it: ", "no namespace")), f.skipped  # type: ignore[union-attr]
    if any(f.format == "nft" and f.skipped is None for f in report.files):  # nft ran: its messages are kept
        assert any("Error:" in (f.skipped or "") for f in skipped)


def test_t_json_blocks_and_unknown_names() -> None:
    text = """# iifname "eth0" snat to 192.168.3.2
[
    {"match": {"left": {"meta": {"key": "iifname"}}, "op": "==", "right": "eth0"}},
    {"snat": {"addr": "192.168.3.2"}}
]

# rt nexthop 1.2.3.4 masquerade
[
    {"match": {"left": {"rt": {"key": "nexthop", "family": "ip"}}, "op": "==", "right": "1.2.3.4"}},
    {"masquerade": null}
]
"""
    rules = t_json_rules(text, "ip")
    assert [r.comment for r in rules] == ['iifname "eth0" snat to 192.168.3.2', "rt nexthop 1.2.3.4 masquerade"]
    assert isinstance(rules[0].exprs[-1], NatStatement)
    assert rules[1].unknown_expressions() == ("rt nexthop",)


def test_file_report_counts_exact_only_when_the_whole_rule_is_modelled(tmp_path: Path) -> None:
    f = tmp_path / "x.iptables-restore"
    f.write_text("*nat\n-A POSTROUTING -o a -j MASQUERADE\n-A POSTROUTING -m statistic --every 2 -j MASQUERADE\n"
                 "-A POSTROUTING -j SNAT --to-source 1.1.1.1 --to-source 2.2.2.2\nCOMMIT\n")
    r = file_report(tmp_path, f)
    assert (r.nat_statements, r.exact) == (3, 1)
    assert dict(r.unknown) == {"-m statistic": 1, "-j SNAT with 2 --to-source ranges": 1}
    assert format_of(tmp_path / "hosts") is None


# ---------------------------------------------------------------------------
# Real documents, mistyped: the nft parser reads them or raises RulesetError, nothing else.


def _t_json_documents(path: Path) -> Iterator[dict[str, Any]]:
    """Each rule of an nft py-test JSON file, as a document: one nat base chain holding it."""
    family = _t_family(path)
    blocks: list[list[str]] = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("#"):
            blocks.append([])
        elif blocks:
            blocks[-1].append(line)
    for block in blocks:
        try:
            exprs = json.loads("\n".join(block))
        except json.JSONDecodeError:
            continue
        if isinstance(exprs, list):
            yield {"nftables": [
                {"table": {"family": family, "name": "test", "handle": 1}},
                {"chain": {"family": family, "table": "test", "name": "c", "handle": 1, "type": "nat",
                           "hook": "postrouting", "prio": 100, "policy": "accept"}},
                {"rule": {"family": family, "table": "test", "chain": "c", "handle": 2, "expr": exprs}},
            ]}


def _documents() -> list[dict[str, Any]]:
    if not CORPUS.is_dir():
        return []
    docs: list[dict[str, Any]] = []
    for path in corpus_files(CORPUS):
        fmt = format_of(path)
        if fmt == "json-nft":
            docs.append(json.loads(path.read_text()))
        elif fmt == "t.json":
            docs.extend(_t_json_documents(path))
    return docs


DOCUMENTS = _documents()


def _value_paths(obj: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a JSON document that holds a value (the root excepted)."""
    if prefix:
        yield prefix
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _value_paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _value_paths(value, (*prefix, i))


PLACES_OF = [list(_value_paths(doc)) for doc in DOCUMENTS]
PLACES = [(i, path) for i, paths in enumerate(PLACES_OF) for path in paths]


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {str: "string", list: "array", dict: "object", type(None): "null"}[type(value)]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=6) | st.sampled_from(["", "@s", "ip", "inet", "nat", "postrouting", "10.0.0.1", "0x10"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(max_size=5) | st.sampled_from(["set", "elem", "prefix", "range", "concat", "meta", "payload"]),
        inner, max_size=3),
    max_leaves=8,
)


@needs_corpus
def test_the_corpus_gives_documents_to_mistype() -> None:
    assert len(DOCUMENTS) >= 400 and len(PLACES) >= 15_000  # enough to mistype
    for doc in DOCUMENTS:
        parse_ruleset_json(doc)  # each reads as it is


@needs_corpus
@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mistyped_corpus_documents_parse_or_are_ruleset_errors(data: st.DataObject) -> None:
    """Up to three values of a real document replaced by values of another JSON type."""
    index, _ = data.draw(st.sampled_from(PLACES))
    doc = copy.deepcopy(DOCUMENTS[index])
    places = PLACES_OF[index]
    for path in data.draw(st.lists(st.sampled_from(places), min_size=1, max_size=3, unique=True)):
        node: Any = doc
        try:
            for key in path[:-1]:
                node = node[key]
            original = node[path[-1]]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier replacement took this place away
        if not isinstance(node, dict | list):
            continue  # ... or made it a string
        node[path[-1]] = data.draw(JSON_VALUES.filter(lambda v, o=original: _json_type(v) != _json_type(o)))
    try:
        ruleset = parse_ruleset_json(doc)
    except RulesetError as exc:
        assert str(exc).startswith("nft JSON: ")
        return
    assert ruleset == parse_ruleset_json(doc)
