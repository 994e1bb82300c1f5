"""The conformance corpus: every in-scope file loads, and at least 90% of its NAT statements are exact.

The corpus (shared/corpus beside the checkout, or $TOPOWATCH_CORPUS) holds rulesets nobody
on this project wrote. ``*.nft`` text is loaded through this system's nft in
a throwaway namespace; without root those files are reported as skipped.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from topowatch.core.nat import NatStatement
from topowatch.corpus import (
    Report,
    corpus_files,
    corpus_report,
    default_corpus,
    file_report,
    format_of,
    t_json_rules,
)

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
