"""The nftables reader against the real nft and kernel, in a fresh namespace.

Each test loads a ruleset with ``nft -f -`` inside its own namespace, reads it
back with ``read_ruleset`` run from a thread that entered that namespace (so
the nft it spawns lists that namespace's ruleset), and checks the IR.
"""

from __future__ import annotations

import shutil
from ipaddress import ip_address
from pathlib import Path

import pytest

from topowatch.core.flow import NatKind
from topowatch.core.nat import (
    Hook,
    IntervalSet,
    Key,
    Match,
    NameSet,
    NatRuleset,
    NatStatement,
    Op,
    UnknownMatch,
    Verdict,
    VerdictKind,
)
from topowatch.edges.nft import read_ruleset
from topowatch.netns import Namespace

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft"),
]

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus"

RULESET = r"""
table inet nat {
    set lan_hosts {
        type ipv4_addr
        flags interval
        elements = { 10.0.1.0/24, 10.0.9.1-10.0.9.9 }
    }
    chain prerouting {
        type nat hook prerouting priority dstnat; policy accept;
        iifname "up1" tcp dport 8080 dnat ip to 10.0.1.5:80
        iifname "lan" udp dport 53 redirect to :5353
    }
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "up*" ip saddr @lan_hosts counter masquerade
        oifname "eth\*" meta l4proto { tcp, udp } snat ip to 192.0.2.1-192.0.2.9:1024-2048 random,persistent
        ip6 saddr fd00::/64 oifname != "lan" masquerade fully-random
        meta mark & 0xff == 0x1 ct mark 7 ct zone 3 jump marked
    }
    chain marked {
        th sport 1000-2000 return
        goto final
    }
    chain final {
        accept
    }
    chain forward_helper {
        accept
    }
}
table ip early {
    chain post {
        type nat hook postrouting priority 50; policy accept;
        ip daddr != { 10.0.0.0/8, 192.168.0.0/16 } oif "lo" snat to 192.0.2.200
    }
    chain filter_post {
        type filter hook postrouting priority 0; policy accept;
        counter
    }
}
"""


def read_in(ns: Namespace) -> NatRuleset:
    return ns.call(read_ruleset)


def test_empty_namespace_has_no_nat(netns: Namespace) -> None:
    assert read_in(netns) == NatRuleset(marks_known=True)


def test_ruleset_round_trip(netns: Namespace) -> None:
    netns.run("nft", "-f", "-", input=RULESET)
    rs = read_in(netns)
    assert rs == read_in(netns)

    names = [(c.family, c.table, c.name) for c in rs.chains]
    assert sorted(names) == sorted([
        ("inet", "nat", "prerouting"), ("inet", "nat", "postrouting"), ("inet", "nat", "marked"),
        ("inet", "nat", "final"), ("ip", "early", "post"),
    ])  # forward_helper is reached by nothing; filter_post is not nat
    post = rs.chain("inet", "nat", "postrouting")
    pre = rs.chain("inet", "nat", "prerouting")
    early = rs.chain("ip", "early", "post")
    assert post is not None and pre is not None and early is not None
    assert (pre.hook, pre.priority, pre.type, pre.policy) == (Hook.PREROUTING, -100, "nat", "accept")
    assert (post.hook, post.priority) == (Hook.POSTROUTING, 100)
    assert rs.base_chains(Hook.POSTROUTING, 2) == (early, post)
    assert rs.base_chains(Hook.POSTROUTING, 10) == (post,)

    # prerouting
    r1, r2 = pre.rules
    iif, dport, nat = r1.exprs
    assert isinstance(iif, Match) and iif.values == NameSet(exact=frozenset({"up1"}))
    assert isinstance(dport, Match) and dport.selector.proto == 6 and dport.values == IntervalSet(((8080, 8080),))
    assert isinstance(nat, NatStatement)
    assert nat == NatStatement(NatKind.DNAT, nat.text, 2, (ip_address("10.0.1.5"),) * 2, (80, 80))
    redirect = r2.exprs[-1]
    assert isinstance(redirect, NatStatement)
    assert (redirect.kind, redirect.addr, redirect.ports) == (NatKind.REDIRECT, None, (5353, 5353))

    # postrouting
    masq, snat, masq6, marks = post.rules
    oif, saddr, _counter, stmt = masq.exprs
    assert isinstance(oif, Match) and oif.values == NameSet(prefixes=frozenset({"up"}))
    assert isinstance(saddr, Match) and saddr.selector.key is Key.SADDR
    assert saddr.values == IntervalSet(
        ((int(ip_address("10.0.1.0")), int(ip_address("10.0.1.255"))),
         (int(ip_address("10.0.9.1")), int(ip_address("10.0.9.9")))), 4)
    assert isinstance(stmt, NatStatement) and stmt.kind is NatKind.MASQUERADE
    assert rs.describe_rule(post, masq) == (
        f'table inet nat chain postrouting handle {masq.handle}: oifname "up*" ip saddr @lan_hosts counter masquerade'
    )
    oif, proto, stmt = snat.exprs
    assert isinstance(oif, Match) and oif.values == NameSet(exact=frozenset({"eth*"}))  # escaped: literal star
    assert isinstance(proto, Match) and proto.values == IntervalSet(((6, 6), (17, 17)))
    assert isinstance(stmt, NatStatement)
    assert stmt.addr == (ip_address("192.0.2.1"), ip_address("192.0.2.9"))
    assert (stmt.ports, stmt.flags, stmt.family) == ((1024, 2048), ("persistent", "random"), 2)
    saddr6, oif6, stmt6 = masq6.exprs
    assert isinstance(saddr6, Match) and saddr6.selector.family == 10
    assert isinstance(oif6, Match) and oif6.op is Op.NE
    assert isinstance(stmt6, NatStatement) and stmt6.flags == ("fully-random",)
    mark, ctmark, zone, jump = marks.exprs
    assert isinstance(mark, Match) and (mark.selector.key, mark.selector.mask) == (Key.MARK, 0xFF)
    assert isinstance(ctmark, Match) and ctmark.selector.key is Key.CT_MARK
    assert isinstance(zone, Match) and zone.selector.key is Key.CT_ZONE
    assert jump == Verdict(VerdictKind.JUMP, "marked")
    marked = rs.chain("inet", "nat", "marked")
    assert marked is not None and not marked.is_base
    assert [r.verdict for r in marked.rules] == [Verdict(VerdictKind.RETURN), Verdict(VerdictKind.GOTO, "final")]

    # ip table: set negation and iif by name
    (rule,) = early.rules
    daddr, oif_lo, stmt = rule.exprs
    assert isinstance(daddr, Match) and daddr.op is Op.NE
    assert isinstance(oif_lo, Match) and oif_lo.selector.key is Key.OIF
    assert oif_lo.values == NameSet(exact=frozenset({"lo"}))
    assert rs.unknown_expressions() == frozenset()


def test_changed_ruleset_differs(netns: Namespace) -> None:
    netns.run("nft", "-f", "-", input=RULESET)
    before = read_in(netns)
    netns.run("nft", "add", "element", "inet", "nat", "lan_hosts", "{ 10.7.0.1 }")
    after = read_in(netns)
    assert after != before
    netns.run("nft", "delete", "element", "inet", "nat", "lan_hosts", "{ 10.7.0.1 }")
    assert read_in(netns) == before


@pytest.mark.skipif(shutil.which("iptables-nft") is None, reason="needs iptables-nft")
def test_iptables_nft_compat_is_unknown_by_name(netns: Namespace) -> None:
    netns.run("iptables-nft", "-t", "nat", "-A", "POSTROUTING", "-m", "policy", "--pol", "ipsec", "--dir", "out",
              "-j", "ACCEPT")
    netns.run("iptables-nft", "-t", "nat", "-A", "POSTROUTING", "-o", "up1", "-j", "MASQUERADE")
    rs = read_in(netns)
    post = rs.chain("ip", "nat", "POSTROUTING")
    assert post is not None and post.hook is Hook.POSTROUTING
    first = post.rules[0]
    assert any(isinstance(e, UnknownMatch) and e.expression == "xt match policy" for e in first.exprs), first
    assert "xt match policy" in rs.unknown_expressions()


def corpus_rulesets() -> list[Path]:
    folder = CORPUS / "rulesets"
    return sorted(folder.glob("*.nft")) if folder.is_dir() else []


@pytest.mark.skipif(not corpus_rulesets(), reason="corpus not found")
def test_corpus_rulesets_load_and_read_back(netns: Namespace) -> None:
    """Real rulesets from fw4, firewalld, docker, libreswan: those nft accepts here read back without error."""
    loaded = 0
    for path in corpus_rulesets():
        netns.run("nft", "flush", "ruleset")
        if netns.run("sh", "-c", f"nft -f {path} >/dev/null 2>&1; echo $?").strip() != "0":
            continue  # needs an include or an interface this namespace lacks
        loaded += 1
        rs = read_in(netns)
        assert rs == read_in(netns)
        for chain in rs.chains:
            for rule in chain.rules:
                assert rs.describe_rule(chain, rule)
    assert loaded >= 1
