"""The differential fuzzer's generator and judge, without a kernel (bench/fuzzgen.py, bench/difffuzz.py).

The generator must fix the mix the issue asks for (rp_filter modes in equal
shares, marks in a fifth of the gateways, at least a fifth of the rules on the
input interface), be reproducible per seed, and render only what iptables and
nft accept. The judge must call a wrong delete a false positive and a missed
stale entry a false negative.
"""

from __future__ import annotations

import sys
from collections import Counter
from ipaddress import ip_address
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import difffuzz
import fuzzgen

from topowatch.core.conntrack import CtTuple, Entry

SEEDS = range(300)


@pytest.fixture(scope="module")
def scenarios() -> list[fuzzgen.Scenario]:
    return [fuzzgen.generate(s) for s in SEEDS]


def test_same_seed_same_scenario() -> None:
    assert fuzzgen.generate(7).script() == fuzzgen.generate(7).script()
    assert fuzzgen.generate(7).script() != fuzzgen.generate(8).script()


def test_rp_filter_modes_in_equal_shares(scenarios: list[fuzzgen.Scenario]) -> None:
    assert Counter(s.rp_mode for s in scenarios) == {"strict": 100, "loose": 100, "off": 100}


def test_marks_in_a_fifth_of_the_gateways(scenarios: list[fuzzgen.Scenario]) -> None:
    marked = [s for s in scenarios if s.marks]
    assert len(marked) == len(scenarios) // 5
    for s in marked:
        assert s.ruleset is None or s.ruleset.chain("mpre"), s.seed
        assert any("fwmark" in " ".join(argv) for _, argv, _ in s.setup), s.seed
        assert s.ruleset is None or any(m[0] == "mark" for r in s.ruleset.rules() for m in r.matches), s.seed


def test_a_fifth_of_the_rules_match_the_input_interface(scenarios: list[fuzzgen.Scenario]) -> None:
    for s in scenarios:
        for rs in (s.ruleset, s.final_ruleset):
            if rs is not None:
                iif, n = fuzzgen.iif_share(rs)
                assert iif * 5 >= n, (s.seed, iif, n)


def test_mutations_one_to_three(scenarios: list[fuzzgen.Scenario]) -> None:
    assert {len(s.mutations) for s in scenarios} == {1, 2, 3}
    kinds = {m.kind for s in scenarios for m in s.mutations}
    assert kinds >= {
        "default_route",
        "prefix_route",
        "link_down",
        "address",
        "ip_rule",
        "ruleset",
        "rp_filter",
        "xfrm",
        "late_nat",
    }


def test_grammar_coverage(scenarios: list[fuzzgen.Scenario]) -> None:
    features = set().union(*(s.features for s in scenarios))
    assert features >= {
        "masquerade",
        "snat",
        "snat_range",
        "snat_ports",
        "snat_map",
        "numgen",
        "jhash",
        "netmap",
        "dnat",
        "dnat_ports",
        "dnat_range",
        "dnat_map",
        "redirect",
        "fib_local",
        "set",
        "concat",
        "vmap",
        "jump",
        "goto",
        "marks",
        "ct_save",
        "ct_restore",
        "ct_state",
        "ct_status",
        "multiport",
        "iprange",
        "ipsec_none",
        "nf_rpfilter",
        "mixed",
        "multipath",
        "unreachable",
        "ip_rule",
        "rule_iif",
        "late_nat",
        "xfrm",
    }
    assert {s.backend for s in scenarios} == {"nft", "iptables"}
    assert {s.uplinks for s in scenarios} == {2, 3, 4}
    assert {f.family for s in scenarios for f in s.flows} == {4, 6}
    assert {f.sender for s in scenarios for f in s.flows} == {"cl", "wan", "gw"}


def test_iptables_rendering_is_accepted_shape(scenarios: list[fuzzgen.Scenario]) -> None:
    for s in scenarios:
        rs = s.final_ruleset
        if rs is None or rs.backend != "iptables":
            continue
        for fam in (4, 6):
            for line in fuzzgen.render_iptables(rs, fam).splitlines():
                words = line.split()
                if line.startswith("-A POSTROUTING"):
                    assert "-i" not in words, line  # iptables refuses -i at POSTROUTING
                if line.startswith("-A PREROUTING"):
                    assert "-o" not in words, line
                nat_ports = ("]:" in words[-1]) if fam == 6 else (":" in words[-1])
                if any(w in words for w in ("--to-ports", "--dport", "--dports")) or (
                    ("SNAT" in words or "DNAT" in words) and nat_ports
                ):
                    assert "-p" in words, line  # ports need a protocol
        assert not any(r.action[0] in fuzzgen.NFT_ONLY for r in rs.rules()), s.seed


def test_nft_rules_with_ports_name_a_protocol(scenarios: list[fuzzgen.Scenario]) -> None:
    for s in scenarios:
        rs = s.final_ruleset
        if rs is None or rs.backend != "nft":
            continue
        for line in fuzzgen.render_nft(rs).splitlines():
            if " to :" in line or "]:" in line or ("dnat" in line and ":8" in line):
                assert "udp" in line, line


def test_xfrm_selected_flows_are_known() -> None:
    scn = next(s for s in map(fuzzgen.generate, range(1000)) if s.xfrm)
    src, dst = scn.xfrm[0]
    host = next(str(ip_address(h)) for h in (src.split("/")[0][:-1] + "2",))
    flow = fuzzgen.Flow(
        "x",
        ip_address(host).version,
        "cl",
        host,
        "c0",
        dst.split("/")[0].rstrip(":0").rstrip(".") + ("::7" if ":" in dst else ".7"),
        53,
    )
    assert fuzzgen.xfrm_matches(scn, flow)
    assert not fuzzgen.xfrm_matches(scn, fuzzgen.Flow("y", flow.family, "gw", None, None, flow.dst, 53))


# -- the judge ---------------------------------------------------------------------------------

FLOW = fuzzgen.Flow("f0", 4, "cl", "10.77.0.2", "c0", "198.18.0.7", 53)


def _entry(sport: int, nat_src: str) -> Entry:
    src, dst = ip_address("10.77.0.2"), ip_address("198.18.0.7")
    return Entry(2, 17, CtTuple(src, dst, sport, 53), CtTuple(dst, ip_address(nat_src), 53, sport))


def _verdict(e: Entry) -> dict[str, object]:
    t = {"src": str(e.orig.src), "dst": str(e.orig.dst), "sport": e.orig.sport, "dport": e.orig.dport}
    return {
        "orig": t,
        "side": "snat",
        "reason": "test",
        "expected": [{"kind": "masquerade", "addr": "100.64.2.1", "ports": None}],
    }


def _judge(old_nat: str, fresh_nat: str, stale: list[Entry], undecided: list[Entry] = ()) -> Counter[str]:
    scn = fuzzgen.Scenario(1, "off", False, "nft", 2, (), None, None, (), (FLOW,))
    old = _entry(difffuzz.OLD_PORT, old_nat)
    fresh = _entry(difffuzz.FRESH_PORT, fresh_nat)
    before = difffuzz.index([old])
    after = difffuzz.index([old, fresh])
    verdicts = {"stale": [_verdict(e) for e in stale], "undecided": [_verdict(e) for e in undecided]}
    return difffuzz.judge(scn, before, after, verdicts, 1).counts


def test_judge_classifies_each_verdict() -> None:
    old, fresh = _entry(difffuzz.OLD_PORT, "100.64.1.1"), _entry(difffuzz.FRESH_PORT, "100.64.2.1")
    assert _judge("100.64.1.1", "100.64.2.1", [old])["agree"] == 1
    assert _judge("100.64.1.1", "100.64.2.1", [])["fn"] == 1
    same = _entry(difffuzz.OLD_PORT, "100.64.2.1")
    assert _judge("100.64.2.1", "100.64.2.1", [same])["fp"] == 1
    assert _judge("100.64.2.1", "100.64.2.1", [])["agree"] == 1
    assert _judge("100.64.1.1", "100.64.2.1", [], [old])["undecided"] == 1
    counts = _judge("100.64.1.1", "100.64.2.1", [old, fresh])
    assert counts["fresh_stale"] == 1
    assert counts["agree"] == 1


def test_judge_membership_over_several_fresh_flows() -> None:
    """With several right answers, the old entry agrees with any fresh binding: not stale."""
    scn = fuzzgen.Scenario(
        1, "off", False, "nft", 2, (), None, None, (), (FLOW,), features=frozenset({"numgen"})
    )
    old = _entry(difffuzz.OLD_PORT, "100.64.1.70")
    fresh = [_entry(difffuzz.FRESH_PORT + k, ip) for k, ip in enumerate(("100.64.2.71", "100.64.1.70"))]
    counts = difffuzz.judge(
        scn,
        difffuzz.index([old]),
        difffuzz.index([old, *fresh]),
        {"stale": [_verdict(old)], "undecided": []},
        2,
    ).counts
    assert counts["fp"] == 1


def test_judge_source_port_by_membership() -> None:
    """A NAT without a port range admits any source port; one with a range needs a remapped port."""
    src, dst = ip_address("10.77.0.2"), ip_address("198.18.0.7")
    nat = ip_address("100.64.1.99")

    def entry(sport: int, nat_port: int) -> Entry:
        return Entry(2, 17, CtTuple(src, dst, sport, 53), CtTuple(dst, nat, 53, nat_port))

    remapped, kept = entry(difffuzz.OLD_PORT, 2048), entry(difffuzz.OLD_PORT, difffuzz.OLD_PORT)
    assert difffuzz.same_binding(remapped, entry(difffuzz.FRESH_PORT, difffuzz.FRESH_PORT))
    assert difffuzz.same_binding(remapped, entry(difffuzz.FRESH_PORT, 2001))
    assert not difffuzz.same_binding(kept, entry(difffuzz.FRESH_PORT, 2001))


@pytest.mark.parametrize(("features", "kind"), [({"multipath"}, "fn"), ({"multipath", "jhash"}, "agree")])
def test_judge_the_old_flow_sent_again_is_the_oracle_where_no_seed_may_change(features: set[str], kind: str) -> None:
    """The old flow itself, sent again once its entry is deleted, decides (its own multipath choice);
    with a jhash map (a seed drawn anew) or numgen the fresh flows decide by membership."""
    scn = fuzzgen.Scenario(1, "off", False, "nft", 2, (), None, None, (), (FLOW,), features=frozenset(features))
    old = _entry(difffuzz.OLD_PORT, "100.64.1.1")
    fresh = [_entry(difffuzz.FRESH_PORT + k, ip) for k, ip in enumerate(("100.64.2.1", "100.64.1.1"))]
    again = _entry(difffuzz.OLD_PORT, "100.64.2.1")
    counts = difffuzz.judge(scn, difffuzz.index([old]), difffuzz.index([old, *fresh]),
                            {"stale": [], "undecided": []}, 2, exact=difffuzz.index([again])).counts
    assert counts[kind] == 1
