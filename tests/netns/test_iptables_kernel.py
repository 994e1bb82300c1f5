"""iptables (nft and legacy) nat tables read back from the kernel, and the kernel as oracle for predict().

Rules are loaded with iptables-nft-restore / iptables-legacy-restore inside
fresh namespaces only; the host's tables are never touched.
"""

from __future__ import annotations

import shutil
import socket
from dataclasses import dataclass
from ipaddress import ip_address

import pytest
import trio

from topowatch.core.evaluate import predict
from topowatch.core.fib import Fib
from topowatch.core.flow import IPPROTO_UDP, Binding, Flow, NatKind
from topowatch.core.model import AF_INET, IPAddress
from topowatch.core.nat import Hook, Match, NatStatement, PolicyMatch
from topowatch.edges import rtnl
from topowatch.edges.iptables import LEGACY_TABLE, RulesetRead, legacy_nat_exists, read_all
from topowatch.lab import OTHER_SERVER, SIP_SERVER, Lab
from topowatch.netns import Namespace

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("iptables-nft-restore", "iptables-legacy-restore",
                                           "ip6tables-nft-restore", "ip6tables-legacy-restore")),
        reason="needs iptables-nft and iptables-legacy"),
]

NFT_RULES = """\
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:EXEMPT - [0:0]
-A PREROUTING -i up+ -p tcp -m multiport --dports 80,443 -j DNAT --to-destination 10.0.1.5
-A POSTROUTING -j EXEMPT
-A POSTROUTING -o up1 -m mark ! --mark 0x1/0xff -j MASQUERADE --random-fully
-A EXEMPT -m policy --dir out --pol ipsec -j ACCEPT
-A EXEMPT -m addrtype --dst-type LOCAL -j RETURN
COMMIT
"""

V6_RULES = """\
*nat
-A PREROUTING -i up1 -p udp --dport 53 -j DNAT --to-destination [2001:db8::53]:5353
-A POSTROUTING -o up1 ! -s 2001:db8:1::/48 -j SNAT --to-source 2001:db8::1-2001:db8::4
COMMIT
"""


def read_in(ns: Namespace) -> RulesetRead:
    return ns.call(read_all)


def test_iptables_nft_table_is_read_through_save_not_nft(netns: Namespace) -> None:
    netns.run("iptables-nft-restore", input=NFT_RULES)
    got = read_in(netns)
    assert "iptables-nft-save" in got.sources and not any("legacy" in s for s in got.sources)
    rs = got.ruleset
    assert rs.unknown_expressions() == frozenset()  # no "xt match policy": the save view replaced nft's
    assert sorted(c.name for c in rs.chains if c.table == "nat") == [
        "EXEMPT", "INPUT", "OUTPUT", "POSTROUTING", "PREROUTING"]
    post = rs.chain("ip", "nat", "POSTROUTING")
    exempt = rs.chain("ip", "nat", "EXEMPT")
    assert post is not None and exempt is not None
    assert (post.hook, post.priority) == (Hook.POSTROUTING, 100)
    masq = post.rules[1].exprs[-1]
    assert isinstance(masq, NatStatement) and masq.kind is NatKind.MASQUERADE and masq.flags == ("random-fully",)
    mark = post.rules[1].exprs[1]
    assert isinstance(mark, Match) and mark.selector.mask == 0xFF
    pol = exempt.rules[0].exprs[0]
    assert isinstance(pol, PolicyMatch) and (pol.direction, pol.pol) == ("out", "ipsec")
    assert read_in(netns).ruleset == rs  # stable
    # Reading never instantiated a legacy table (that would start connection tracking).
    assert not netns.call(lambda: legacy_nat_exists("ip"))


def test_legacy_tables_v4_and_v6_are_added_beside_nft(netns: Namespace) -> None:
    netns.run("iptables-legacy-restore", input="*nat\n-A POSTROUTING -o up2 -j MASQUERADE\nCOMMIT\n")
    netns.run("ip6tables-legacy-restore", input=V6_RULES)
    netns.run("nft", "-f", "-", input="table ip mine {\n chain post {\n"
                                      "  type nat hook postrouting priority 50;\n  oifname \"up3\" masquerade\n }\n}\n")
    got = read_in(netns)
    rs = got.ruleset
    assert [c.table for c in rs.base_chains(Hook.POSTROUTING, AF_INET)] == ["mine", LEGACY_TABLE]
    legacy = rs.chain("ip", LEGACY_TABLE, "POSTROUTING")
    assert legacy is not None and legacy.priority == 100
    pre6 = rs.chain("ip6", LEGACY_TABLE, "PREROUTING")
    post6 = rs.chain("ip6", LEGACY_TABLE, "POSTROUTING")
    assert pre6 is not None and post6 is not None and pre6.priority == -100
    dnat = pre6.rules[0].exprs[-1]
    assert isinstance(dnat, NatStatement)
    assert (dnat.addr, dnat.ports) == ((ip_address("2001:db8::53"),) * 2, (5353, 5353))
    snat = post6.rules[0].exprs[-1]
    assert isinstance(snat, NatStatement) and snat.addr == (ip_address("2001:db8::1"), ip_address("2001:db8::4"))
    assert rs.unknown_expressions() == frozenset()


# ---------------------------------------------------------------------------
# Kernel as oracle: nft chains at priorities 50 and 150 around iptables-legacy's 100.

ORACLE_NFT = """\
table ip early {
    chain post {
        type nat hook postrouting priority 50; policy accept;
        oifname "up2" udp dport 5070 snat ip to 203.0.113.77
    }
}
table ip late {
    chain post {
        type nat hook postrouting priority 150; policy accept;
        oifname "up1" masquerade
    }
}
"""

ORACLE_LEGACY = """\
*nat
:POSTROUTING ACCEPT [0:0]
:UPLINKS - [0:0]
-A POSTROUTING -s 10.0.1.0/24 -j UPLINKS
-A UPLINKS -o up2 -j MASQUERADE
-A UPLINKS -o up3 -j SNAT --to-source 100.64.0.9
-A UPLINKS -o up1 -p udp -m multiport --dports 5061,5062 -j SNAT --to-source 198.51.100.9
COMMIT
"""


async def fib_of(ns: Namespace) -> Fib:
    def make() -> trio.socket.SocketType:
        return trio.socket.from_stdlib_socket(ns.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE))

    return Fib(await rtnl.dump_topology(make))


async def check_oracle(lab: Lab, cases: list[tuple[str, int, str]], base_port: int) -> None:
    fib = await fib_of(lab.router)
    ruleset = lab.router.call(read_all).ruleset
    for i, (dst, dport, expected) in enumerate(cases):
        sport = base_port + i
        entry = lab.oracle(dst, dport, sport)
        assert entry is not None, (dst, dport)
        flow = Flow(AF_INET, IPPROTO_UDP, ip_address("10.0.1.2"), ip_address(dst), sport, dport)
        prediction = predict(ruleset, fib, flow)
        assert isinstance(prediction.snat, frozenset), prediction
        (binding,) = prediction.snat
        assert isinstance(binding, Binding) and binding.addr_lo == entry.reply.dst, (dst, dport, prediction.explain)
        assert str(entry.reply.dst) == expected  # the scenario does what it says


@pytest.mark.slow
async def test_predict_agrees_with_kernel_across_nft_and_legacy_priorities() -> None:
    with Lab.create(ruleset=ORACLE_NFT) as lab:
        lab.router.run("iptables-legacy-restore", input=ORACLE_LEGACY)
        # Before: default via up1, OTHER_SERVER via up3.
        await check_oracle(lab, [
            (SIP_SERVER, 5060, "198.51.100.2"),   # up1: legacy has nothing for 5060, late (150) masquerades
            (SIP_SERVER, 5061, "198.51.100.9"),   # up1: legacy (100) SNAT runs before late (150)
            (OTHER_SERVER, 5060, "100.64.0.9"),   # up3: legacy SNAT
        ], 42000)
        lab.flip()  # the default moves to up2, the up3 host route goes
        await check_oracle(lab, [
            (SIP_SERVER, 5060, "203.0.113.2"),    # up2: legacy MASQUERADE
            (SIP_SERVER, 5070, "203.0.113.77"),   # up2: early (50) SNAT wins over legacy
            (OTHER_SERVER, 5062, "203.0.113.2"),  # up2 now, not up3
        ], 42100)


# ---------------------------------------------------------------------------
# Kernel as oracle for ``-m addrtype``: one counting rule per type in the raw table, one packet per
# destination from a peer namespace; the types whose rule counted it are the kernel's answer.

V4_TYPES = ("UNSPEC", "UNICAST", "LOCAL", "BROADCAST", "ANYCAST", "MULTICAST", "BLACKHOLE", "UNREACHABLE",
            "PROHIBIT", "THROW", "NAT", "XRESOLVE")
V6_TYPES = ("UNSPEC", "UNICAST", "LOCAL", "ANYCAST", "MULTICAST", "UNREACHABLE")
ADDRTYPE_SETUP = [
    ("addr", "add", "10.9.0.1/24", "dev", "peer0"),
    ("-6", "addr", "add", "2001:db8:9::1/64", "dev", "peer0", "nodad"),
    ("route", "add", "blackhole", "192.0.2.0/24"),
    ("route", "add", "blackhole", "198.51.100.0/24", "table", "local"),
    ("route", "add", "unreachable", "198.51.101.0/24", "table", "local"),
    ("route", "add", "prohibit", "198.51.102.0/24", "table", "local"),
    ("route", "add", "throw", "198.51.103.0/24", "table", "local"),
    ("route", "add", "anycast", "100.65.0.1", "dev", "peer0", "table", "local"),
    ("route", "add", "100.66.0.0/24", "dev", "peer0", "table", "local"),
    ("-6", "route", "add", "blackhole", "2001:db8:dead::/48"),
    ("-6", "route", "add", "prohibit", "2001:db8:beef::/48"),
    ("-6", "route", "add", "2001:db8:f00::/48", "via", "2001:db8:9::2"),
    ("-6", "route", "add", "2001:db8:a::/64", "dev", "peer0"),  # on link, no address of ours in it
]
# Not on the peer's own link (it would ask ARP/ND for them, and nobody answers).
V4_DESTS = ("10.9.0.1", "10.9.0.255", "8.8.8.8", "192.0.2.1", "198.51.100.1", "198.51.101.1",
            "198.51.102.1", "198.51.103.1", "100.65.0.1", "100.66.0.7")
V6_DESTS = ("2001:db8:9::1", "2001:db8:a::7", "2001:db8:a::", "2001:db8:dead::1", "2001:db8:beef::1",
            "2001:db8:f00::", "2001:db8:77::1")


def _counted(ns: Namespace, tool: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in ns.run(tool, "-c", "-t", "raw").splitlines():
        if line.startswith("[") and "--dst-type" in line:
            packets = int(line[1:].split(":", 1)[0])
            counts[line.split("--dst-type ")[1].split()[0]] = packets
    return counts


@dataclass(frozen=True)
class _Packet:
    """What ``xt_match`` reads of a packet."""

    family: int
    proto: int
    saddr: IPAddress
    daddr: IPAddress
    sport: int
    dport: tuple[int, int]
    iif: object = None
    oif: object = None


def _send(dst: str) -> None:
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        s.sendto(b"x", (dst, 9))


async def test_addrtype_agrees_with_the_kernel() -> None:
    from topowatch.core.nat import AddrTypeMatch
    from topowatch.core.xtmatch import xt_match
    from topowatch.netns import namespaces, veth

    with namespaces("twat", "twap") as (router, peer):
        veth(router, "peer0", peer, "r0")
        for argv in ADDRTYPE_SETUP:
            router.run("ip", *argv)
        peer.run("ip", "addr", "add", "10.9.0.2/24", "dev", "r0")
        peer.run("ip", "-6", "addr", "add", "2001:db8:9::2/64", "dev", "r0", "nodad")
        peer.run("ip", "route", "add", "default", "via", "10.9.0.1")
        peer.run("ip", "-6", "route", "add", "default", "via", "2001:db8:9::1")
        for tool, types in (("iptables-nft-restore", V4_TYPES), ("ip6tables-nft-restore", V6_TYPES)):
            lines = [f"-A PREROUTING -p udp --dport 9 -m addrtype --dst-type {t}" for t in types]
            router.run(tool, input="*raw\n" + "\n".join(lines) + "\nCOMMIT\n")
        fib = await fib_of(router)
        compared = 0
        for dst in V4_DESTS + V6_DESTS:
            v6 = ":" in dst
            save, types = ("ip6tables-nft-save", V6_TYPES) if v6 else ("iptables-nft-save", V4_TYPES)
            before = _counted(router, save)
            peer.call(lambda d=dst: _send(d))
            await trio.sleep(0.05)
            after = _counted(router, save)
            assert sum(after.values()) > sum(before.values()), f"the packet to {dst} never arrived"
            kernel = {t for t in types if after[t] > before[t]}
            flow = Flow(socket.AF_INET6 if v6 else AF_INET, IPPROTO_UDP,
                        ip_address("2001:db8:9::2" if v6 else "10.9.0.2"), ip_address(dst), 40000, 9)
            view = _Packet(flow.family, flow.proto, flow.src, flow.dst, flow.sport, (flow.dport, flow.dport))
            for t in types:
                m = AddrTypeMatch("dst", frozenset({t}), False, f"-m addrtype --dst-type {t}")
                predicted = xt_match(m, view, fib, flow, hook=Hook.PREROUTING)
                if isinstance(predicted, bool):
                    assert predicted is (t in kernel), (dst, t, kernel)
                    compared += 1
        assert compared == len(V4_DESTS) * len(V4_TYPES) + len(V6_DESTS) * len(V6_TYPES)  # every answer known


# ``--limit-iface-in`` (prerouting, packets from the peer arrive on peer0: the destination's type)
# and ``--limit-iface-out`` (output, the router's own packets from a bound source: the source's
# type): the type of the local-table route counts only where its device is that interface.
LIMIT_IN_DESTS = ("10.9.0.1", "10.9.0.255", "10.8.0.1", "10.8.0.255", "8.8.8.8", "100.65.0.1", "192.0.2.1")
LIMIT_OUT_PAIRS = (("10.9.0.1", "8.8.8.8"), ("10.8.0.1", "8.8.8.8"), ("10.8.0.1", "10.8.0.7"),
                   ("10.9.0.1", "10.8.0.7"), ("10.9.0.1", "10.9.0.255"))  # fmt: skip
LIMIT_TYPES = ("UNICAST", "LOCAL", "BROADCAST", "ANYCAST", "BLACKHOLE")


def _counted_in(ns: Namespace, chain: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in ns.run("iptables-nft-save", "-c", "-t", "raw").splitlines():
        if line.startswith("[") and f"-A {chain} " in line and "-type " in line:
            counts[line.split("-type ")[1].split()[0]] = int(line[1:].split(":", 1)[0])
    return counts


def _send_from(src: str, dst: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        s.bind((src, 0))
        s.sendto(b"x", (dst, 9))


async def test_addrtype_limit_iface_agrees_with_the_kernel() -> None:
    from topowatch.core.flow import Ingress
    from topowatch.core.nat import AddrTypeMatch
    from topowatch.core.xtmatch import xt_match
    from topowatch.netns import namespaces, veth

    with namespaces("twal", "twlp", "twlq") as (router, peer, other):
        veth(router, "peer0", peer, "r0")
        veth(router, "d1", other, "x0")  # a second interface of the router's: its addresses are not peer0's
        router.run("ip", "addr", "add", "10.9.0.1/24", "dev", "peer0")
        router.run("ip", "addr", "add", "10.8.0.1/24", "dev", "d1")
        router.run("ip", "route", "add", "default", "via", "10.9.0.2")
        router.run("ip", "route", "add", "blackhole", "192.0.2.0/24")
        router.run("ip", "route", "add", "anycast", "100.65.0.1", "dev", "peer0", "table", "local")
        peer.run("ip", "addr", "add", "10.9.0.2/24", "dev", "r0")
        peer.run("ip", "route", "add", "default", "via", "10.9.0.1")
        rules = [f"-A PREROUTING -p udp --dport 9 -m addrtype --dst-type {t} --limit-iface-in" for t in LIMIT_TYPES]
        rules += [f"-A OUTPUT -p udp --dport 9 -m addrtype --src-type {t} --limit-iface-out" for t in LIMIT_TYPES]
        router.run("iptables-nft-restore", input="*raw\n" + "\n".join(rules) + "\nCOMMIT\n")
        fib = await fib_of(router)
        peer0 = next(link for link in fib.topology.links if link.name == "peer0")
        cases = [("PREROUTING", "10.9.0.2", dst) for dst in LIMIT_IN_DESTS]
        cases += [("OUTPUT", src, dst) for src, dst in LIMIT_OUT_PAIRS]
        compared = 0
        for chain, src, dst in cases:
            before = _counted_in(router, chain)
            if chain == "PREROUTING":
                peer.call(lambda d=dst: _send(d))
            else:
                router.call(lambda s=src, d=dst: _send_from(s, d))
            await trio.sleep(0.05)
            after = _counted_in(router, chain)
            kernel = {t for t in LIMIT_TYPES if after[t] > before[t]}
            assert kernel, f"the packet {src} -> {dst} was not counted"
            flow = Flow(AF_INET, IPPROTO_UDP, ip_address(src), ip_address(dst), 40000, 9)
            if chain == "PREROUTING":
                view = _Packet(AF_INET, IPPROTO_UDP, flow.src, flow.dst, 40000, (9, 9),
                               iif=Ingress(peer0.index, "peer0"))  # fmt: skip
                hook, side, limit = Hook.PREROUTING, "dst", "in"
            else:
                (egress,) = fib.lookup(flow.dst)  # type: ignore[misc]
                view = _Packet(AF_INET, IPPROTO_UDP, flow.src, flow.dst, 40000, (9, 9), oif=egress)
                hook, side, limit = Hook.OUTPUT, "src", "out"
            for t in LIMIT_TYPES:
                m = AddrTypeMatch(side, frozenset({t}), False, f"-m addrtype --{side}-type {t} --limit-iface-{limit}",
                                  limit_iface=limit)  # fmt: skip
                predicted = xt_match(m, view, fib, flow, hook=hook, local=chain == "OUTPUT")
                assert isinstance(predicted, bool), (chain, src, dst, t, predicted)
                assert predicted is (t in kernel), (chain, src, dst, t, kernel)
                compared += 1
        assert compared == len(cases) * len(LIMIT_TYPES)
