"""Semantics the evaluator must share with the kernel, each checked with the kernel as oracle.

    client ns (lan0) --lan-- gw --up1-- isp1 ns
                              \\--up2-- isp2 ns

The gateway forwards single UDP datagrams that nobody answers (UNREPLIED
entries). A scenario makes an entry, changes the gateway, then sends a
*fresh* datagram with the same addresses from a new source port: the entry
the kernel creates for it is today's NAT. ``topowatch plan --json`` must call
the old entry stale exactly when its binding differs from the fresh one's,
and must never call the fresh entry stale.

Covered: late NAT (an entry made before the family had any NAT chain keeps
leaving untranslated; IPv4, IPv6, and a flow delivered to the gateway itself
with and without an input-hook SNAT); a flow the gateway sends itself,
which meets postrouting with no input interface; the input interface, which only
reverse-path filtering pins (rp_filter off, loose, strict, a netfilter
reverse-path drop); packet marks set before routing that feed ``ip rule
fwmark`` (mwan3-style, with a conntrack mark restored and saved), in nft and
in an iptables-nft mangle table.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from topowatch.core.conntrack import IPS_DST_NAT_DONE, IPS_SRC_NAT_DONE, Entry
from topowatch.edges.ctnetlink import Conntrack
from topowatch.lab import Daemon
from topowatch.netns import Namespace, namespaces, veth

pytestmark = [pytest.mark.netns]

NETLINK_NETFILTER = 12
SERVER4 = "198.18.0.7"
SERVER6 = "2001:db8:18::7"


@dataclass
class Gateway:
    """Four namespaces: a LAN client, the gateway, two uplink peers (see the module docstring)."""

    client: Namespace
    gw: Namespace
    isp1: Namespace
    isp2: Namespace

    @classmethod
    @contextlib.contextmanager
    def create(cls, prefix: str = "h7") -> Iterator[Gateway]:
        with namespaces(*(prefix + role for role in "cgab")) as (client, gw, isp1, isp2):
            for ns in (client, gw, isp1, isp2):
                for conf in ("all", "default"):
                    ns.run("sysctl", "-qw", f"net.ipv6.conf.{conf}.accept_dad=0")
            veth(client, "lan0", gw, "lan")
            veth(gw, "up1", isp1, "isp1")
            veth(gw, "up2", isp2, "isp2")
            for cmd in (
                "addr add 10.77.0.2/24 dev lan0", "addr add 10.77.0.3/24 dev lan0",
                "addr add fd77::2/64 dev lan0 nodad",
                "route add default via 10.77.0.1", "-6 route add default via fd77::1",
            ):
                client.run("ip", *cmd.split())
            for cmd in (
                "addr add 10.77.0.1/24 dev lan", "addr add fd77::1/64 dev lan nodad",
                "addr add 100.64.0.1/24 dev up1", "addr add 2001:db8:64::1/64 dev up1 nodad",
                "addr add 100.64.1.1/24 dev up2", "addr add 2001:db8:65::1/64 dev up2 nodad",
                "route add 198.18.0.0/24 via 100.64.0.2", "-6 route add 2001:db8:18::/64 via 2001:db8:64::2",
            ):
                gw.run("ip", *cmd.split())
            gw.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
            gw.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
            for ns, dev, v4, v6 in ((isp1, "isp1", "100.64.0.2/24", "2001:db8:64::2/64"),
                                    (isp2, "isp2", "100.64.1.2/24", "2001:db8:65::2/64")):
                ns.run("ip", "addr", "add", v4, "dev", dev)
                ns.run("ip", "addr", "add", v6, "dev", dev, "nodad")
            yield cls(client, gw, isp1, isp2)

    # -- traffic and observation ---------------------------------------------------

    def send(self, src: str, sport: int, dst: str, dport: int, ns: Namespace | None = None) -> None:
        """One UDP datagram from ``src:sport`` (an address of ``ns``, the client by default)."""
        family = socket.AF_INET6 if ":" in dst else socket.AF_INET
        sock = (ns or self.client).socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((src, sport))
            sock.sendto(b"h7", (dst, dport))
        finally:
            sock.close()

    def entries(self) -> list[Entry]:
        ct = Conntrack(self.gw.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER))
        try:
            return ct.dump(unreplied_only=False)
        finally:
            ct.close()

    def entry(self, src: str, sport: int, dst: str, timeout: float = 5.0) -> Entry:
        end = time.monotonic() + timeout
        while True:
            for e in self.entries():
                if str(e.orig.src) == src and e.orig.sport == sport and str(e.orig.dst) == dst:
                    return e
            if time.monotonic() >= end:
                raise TimeoutError(f"no entry for {src}:{sport} -> {dst}")
            time.sleep(0.02)

    def fresh(self, src: str, sport: int, dst: str, dport: int, ns: Namespace | None = None) -> Entry:
        """Kernel as oracle: a fresh flow's entry shows the NAT today's gateway gives."""
        self.send(src, sport, dst, dport, ns)
        return self.entry(src, sport, dst)

    def rp_filter(self, value: int, *, src_valid_mark: int = 0) -> None:
        """IPv4 rp_filter ``value`` in force on every interface of the gateway (``all``; each 0)."""
        for conf in ("default", "lan", "up1", "up2"):
            self.gw.run("sysctl", "-qw", f"net.ipv4.conf.{conf}.rp_filter=0")
        self.gw.run("sysctl", "-qw", f"net.ipv4.conf.all.rp_filter={value}")
        self.gw.run("sysctl", "-qw", f"net.ipv4.conf.all.src_valid_mark={src_valid_mark}")

    def nft(self, ruleset: str) -> None:
        self.gw.run("nft", "-f", "-", input=ruleset)

    def plan(self) -> dict[str, Any]:
        proc = subprocess.run(
            ["ip", "netns", "exec", self.gw.name, sys.executable, "-m", "topowatch", "plan", "--json"],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert proc.returncode == 0, proc.stderr
        doc: dict[str, Any] = json.loads(proc.stdout)
        return doc


def verdict(plan: dict[str, Any], src: str, sport: int) -> str:
    """``stale``, ``undecided`` or ``healthy`` for the entry of ``src:sport`` in a plan."""
    for kind in ("stale", "undecided"):
        if any(d["orig"]["src"] == src and d["orig"]["sport"] == sport for d in plan[kind]):
            return kind
    return "healthy"


def translated_source(e: Entry) -> str:
    return str(e.reply.dst)


def kernel_verdict(old: Entry, fresh: Entry) -> str:
    """The oracle's answer for ``old``: stale when its source translation differs from a fresh flow's."""
    return "healthy" if (old.reply.dst, old.reply.src) == (fresh.reply.dst, fresh.reply.src) else "stale"


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    with Gateway.create() as gw:
        yield gw


# A rule that needs conntrack, so the gateway tracks flows before any NAT chain exists.
TRACK = """\
table inet h7track {
    chain h7fwd {
        type filter hook forward priority 0; policy accept;
        ct state new counter
    }
    chain h7in {
        type filter hook input priority 0; policy accept;
        ct state new counter
    }
}
"""


def nat(family: str, chain: str, hook: str, *rules: str, priority: int = 100) -> str:
    """A nat base chain in table ``h7nat`` (created if missing) holding ``rules``."""
    body = "".join(f"        {rule}\n" for rule in rules)
    return (f"table {family} h7nat {{\n    chain {chain} {{\n"
            f"        type nat hook {hook} priority {priority}; policy accept;\n{body}    }}\n}}\n")


# -- late NAT ----------------------------------------------------------------------------


@pytest.mark.parametrize(("src", "dst", "masq_to"), [
    ("10.77.0.2", SERVER4, "100.64.0.1"),
    ("fd77::2", SERVER6, "2001:db8:64::1"),
], ids=["ipv4", "ipv6"])
def test_entry_made_before_any_nat_chain_is_judged_as_a_null_binding(
    gateway: Gateway, src: str, dst: str, masq_to: str
) -> None:
    gateway.nft(TRACK)
    gateway.send(src, 5060, dst, 5060)
    old = gateway.entry(src, 5060, dst)
    assert not old.status & (IPS_SRC_NAT_DONE | IPS_DST_NAT_DONE)
    gateway.nft(nat("inet", "post", "postrouting", 'oifname "up1" masquerade'))
    gateway.send(src, 5060, dst, 5060)  # the old flow goes on: the kernel never NATs it now
    old = gateway.entry(src, 5060, dst)
    assert translated_source(old) == src and not old.status & IPS_SRC_NAT_DONE
    fresh = gateway.fresh(src, 41000, dst, 5060)
    assert translated_source(fresh) == masq_to
    plan = gateway.plan()
    assert verdict(plan, src, 5060) == kernel_verdict(old, fresh) == "stale", plan
    assert verdict(plan, src, 41000) == "healthy", plan
    (stale,) = (d for d in plan["stale"] if d["orig"]["sport"] == 5060)
    assert stale["actual"]["kind"] == "none" and stale["expected"][0]["addr"] == masq_to


def test_entry_made_before_any_nat_chain_with_a_dnat_now(gateway: Gateway) -> None:
    gateway.nft(TRACK)
    gateway.send("10.77.0.2", 5060, SERVER4, 53)
    gateway.nft(nat("ip", "pre", "prerouting", "udp dport 53 dnat to 100.64.0.2"))
    gateway.send("10.77.0.2", 5060, SERVER4, 53)
    old = gateway.entry("10.77.0.2", 5060, SERVER4)
    fresh = gateway.fresh("10.77.0.2", 41000, SERVER4, 53)
    assert str(fresh.reply.src) == "100.64.0.2" and str(old.reply.src) == SERVER4
    plan = gateway.plan()
    assert verdict(plan, "10.77.0.2", 5060) == kernel_verdict(old, fresh) == "stale", plan
    assert verdict(plan, "10.77.0.2", 41000) == "healthy", plan


@pytest.mark.parametrize("input_snat", [True, False], ids=["input-snat", "no-input-snat"])
def test_entry_delivered_locally_made_before_any_nat_chain(gateway: Gateway, input_snat: bool) -> None:
    """A flow to the gateway itself meets the SNAT side at input, never at postrouting."""
    gateway.nft(TRACK)
    gateway.send("10.77.0.2", 5060, "10.77.0.1", 5353)
    gateway.nft(nat("ip", "post", "postrouting", "masquerade"))
    if input_snat:
        gateway.nft(nat("ip", "innat", "input", "ip saddr 10.77.0.0/24 snat to 10.77.0.99"))
    gateway.send("10.77.0.2", 5060, "10.77.0.1", 5353)
    old = gateway.entry("10.77.0.2", 5060, "10.77.0.1")
    assert translated_source(old) == "10.77.0.2"
    fresh = gateway.fresh("10.77.0.2", 41000, "10.77.0.1", 5353)
    assert translated_source(fresh) == ("10.77.0.99" if input_snat else "10.77.0.2")
    expected = kernel_verdict(old, fresh)
    assert expected == ("stale" if input_snat else "healthy")
    plan = gateway.plan()
    assert verdict(plan, "10.77.0.2", 5060) == expected, plan
    assert verdict(plan, "10.77.0.2", 41000) == "healthy", plan


def test_a_flow_the_gateway_sends_has_no_input_interface_at_postrouting(gateway: Gateway) -> None:
    """``ip_output`` hands postrouting ``skb->dev`` as the input device, which is none for a packet
    the gateway's own socket made: ``iifname "lo"`` and ``iifname "lan"`` do not match it, the rule
    after them does. Made before any NAT, the old entry is stale; the fresh one is healthy."""
    gateway.nft(TRACK)
    gateway.send("100.64.0.1", 5060, SERVER4, 5060, ns=gateway.gw)
    old = gateway.entry("100.64.0.1", 5060, SERVER4)
    gateway.nft(nat("ip", "post", "postrouting", 'iifname "lo" snat to 100.64.0.99',
                    'iifname "lan" snat to 100.64.0.98', 'oifname "up1" snat to 100.64.0.97'))
    fresh = gateway.fresh("100.64.0.1", 41000, SERVER4, 5060, ns=gateway.gw)
    assert translated_source(old) == "100.64.0.1"
    assert translated_source(fresh) == "100.64.0.97"
    plan = gateway.plan()
    assert verdict(plan, "100.64.0.1", 5060) == kernel_verdict(old, fresh) == "stale", plan
    assert verdict(plan, "100.64.0.1", 41000) == "healthy", plan


# -- the input interface ------------------------------------------------------------------

IIF_SNAT = nat("ip", "post", "postrouting", 'iifname "lan" snat to 100.64.0.99', "masquerade")
POLICY_ROUTES = ("route add default via 100.64.1.2 table 100", "route add 198.18.0.0/24 via 100.64.0.2 table 100",
                 "rule add not from 10.77.0.2 lookup 100")


@pytest.mark.parametrize("rp_filter", [0, 2], ids=["rp_filter-off", "rp_filter-loose"])
def test_policy_rule_does_not_move_a_flow_that_enters_on_the_lan(gateway: Gateway, rp_filter: int) -> None:
    """Issue 12's reproduction: the reverse path of the source moves to up2, the packet does not.

    Off or loose, the kernel accepts the flow on lan whatever the reverse
    path says: it keeps its iifname-"lan" SNAT. The reverse path is no guess
    of where the flow entered: entering on an uplink it would be masqueraded,
    so without a previous snapshot both entries are undecided, never stale.
    """
    gateway.rp_filter(rp_filter)
    gateway.nft(IIF_SNAT)
    old = gateway.fresh("10.77.0.3", 5060, SERVER4, 53)
    assert translated_source(old) == "100.64.0.99"
    for cmd in POLICY_ROUTES:
        gateway.gw.run("ip", *cmd.split())
    fresh = gateway.fresh("10.77.0.3", 41000, SERVER4, 53)
    assert translated_source(fresh) == "100.64.0.99"
    plan = gateway.plan()
    assert kernel_verdict(old, fresh) == "healthy"
    assert verdict(plan, "10.77.0.3", 5060) == "undecided", plan
    assert verdict(plan, "10.77.0.3", 41000) == "undecided", plan


def masquerade_then_iif_snat(gateway: Gateway) -> tuple[Entry, Entry]:
    """An entry masqueraded, then an iifname-"lan" SNAT above the masquerade: (old, fresh)."""
    gateway.nft(nat("ip", "post", "postrouting", "masquerade"))
    old = gateway.fresh("10.77.0.3", 5060, SERVER4, 53)
    assert translated_source(old) == "100.64.0.1"
    gateway.gw.run("nft", "insert", "rule", "ip", "h7nat", "post", "iifname", "lan", "snat", "to", "100.64.0.99")
    fresh = gateway.fresh("10.77.0.3", 41000, SERVER4, 53)
    assert translated_source(fresh) == "100.64.0.99"
    return old, fresh


def test_strict_rp_filter_pins_the_input_interface(gateway: Gateway) -> None:
    """Strict, the flow can only have entered on lan (its reverse path), so its masquerade is stale."""
    gateway.rp_filter(1)
    old, fresh = masquerade_then_iif_snat(gateway)
    plan = gateway.plan()
    assert verdict(plan, "10.77.0.3", 5060) == kernel_verdict(old, fresh) == "stale", plan
    assert verdict(plan, "10.77.0.3", 41000) == "healthy", plan


def test_daemon_reacts_to_rp_filter_becoming_strict(gateway: Gateway) -> None:
    """rp_filter off: the masqueraded entry might have entered on an uplink. Made strict (a netconf
    event), it can only have entered on lan, where the SNAT now applies: the daemon deletes it."""
    gateway.rp_filter(0)
    old, fresh = masquerade_then_iif_snat(gateway)
    assert verdict(gateway.plan(), "10.77.0.3", 5060) == "undecided"
    with Daemon(gateway.gw, "--debounce", "0.2", "--no-startup-sweep", "--no-dbus") as daemon:
        assert daemon.wait_for("ready") is not None, daemon.lines
        gateway.gw.run("sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1")
        assert daemon.wait_for("reaction 1 (") is not None, daemon.lines
        assert daemon.stop() == 0, daemon.lines
    assert any("deleted udp 10.77.0.3:5060" in line for line in daemon.lines), daemon.lines
    assert any("rp_filter" in line for line in daemon.lines), daemon.lines
    assert kernel_verdict(old, fresh) == "stale"
    remaining = {(str(e.orig.src), e.orig.sport) for e in gateway.entries()}
    assert ("10.77.0.3", 5060) not in remaining and ("10.77.0.3", 41000) in remaining


@pytest.mark.parametrize("rp_filter", [0, 2], ids=["rp_filter-off", "rp_filter-loose"])
def test_unpinned_input_interface_never_condemns_a_binding_some_interface_gives(
    gateway: Gateway, rp_filter: int
) -> None:
    """Off or loose, the flow may have entered on an uplink, where masquerade is still right.

    The kernel's fresh flow (sent from the LAN) gets the SNAT; the old entry
    may be called stale only if no interface would give it its masquerade:
    here one would, so it is never deleted. Nor is it healthy (the kernel
    says stale: that would be a false negative): without a previous snapshot
    nothing tells it from an entry made since on an uplink, so it is
    undecided, and so is the fresh entry (an uplink would masquerade it).
    """
    gateway.rp_filter(rp_filter)
    old, fresh = masquerade_then_iif_snat(gateway)
    plan = gateway.plan()
    assert kernel_verdict(old, fresh) == "stale"
    assert verdict(plan, "10.77.0.3", 5060) == "undecided", plan
    assert verdict(plan, "10.77.0.3", 41000) == "undecided", plan
    (undecided,) = (d for d in plan["undecided"] if d["orig"]["sport"] == 5060)
    assert undecided["code"] == "unknown_ingress", undecided


@pytest.mark.parametrize("tool", ["nft", "iptables-nft"])
def test_netfilter_reverse_path_drop_pins_the_input_interface(gateway: Gateway, tool: str) -> None:
    """rp_filter off, but a netfilter reverse-path drop makes the kernel strict anyway."""
    gateway.rp_filter(0)
    if tool == "nft":
        gateway.nft("""\
table inet h7rpf {
    chain pre {
        type filter hook prerouting priority raw; policy accept;
        counter
        fib saddr . iif oif missing drop
    }
}
""")
    else:
        if shutil.which("iptables-nft") is None:
            pytest.skip("needs iptables-nft")
        gateway.gw.run("iptables-nft", "-t", "raw", "-A", "PREROUTING", "-m", "rpfilter", "--invert", "-j", "DROP")
    old, fresh = masquerade_then_iif_snat(gateway)
    plan = gateway.plan()
    assert verdict(plan, "10.77.0.3", 5060) == kernel_verdict(old, fresh) == "stale", plan
    assert verdict(plan, "10.77.0.3", 41000) == "healthy", plan


# -- marks before routing ---------------------------------------------------------------

NFT_MWAN = """\
table inet h7mark {
    chain pre {
        type filter hook prerouting priority mangle; policy accept;
        meta mark set ct mark
        meta mark and 0x3f00 != 0x0 return
        ip saddr 10.77.0.3 meta mark set meta mark and 0xffffc0ff or 0x200
        ct mark set meta mark
    }
}
"""
IPT_MWAN = """\
*mangle
:h7mwan - [0:0]
-A PREROUTING -j h7mwan
-A h7mwan -j CONNMARK --restore-mark --nfmask 0x3f00 --ctmask 0x3f00
-A h7mwan -m mark ! --mark 0x0/0x3f00 -j RETURN
-A h7mwan -s 10.77.0.3/32 -j MARK --set-xmark 0x200/0x3f00
-A h7mwan -j CONNMARK --save-mark --nfmask 0x3f00 --ctmask 0x3f00
COMMIT
"""


@pytest.mark.parametrize("tool", ["nft", "iptables-nft"])
def test_mark_routing_with_connmark_restore(gateway: Gateway, tool: str) -> None:
    """mwan3's pattern: restore the ct mark, mark new flows of a source, save; ``ip rule fwmark`` routes.

    Before the mark rules, both flows leave masqueraded on up1; after, a
    fresh flow of 10.77.0.3 is marked and leaves on up2, while 10.77.0.2's
    still leaves on up1.
    """
    if tool != "nft" and shutil.which("iptables-nft-restore") is None:
        pytest.skip("needs iptables-nft-restore")
    gw = gateway.gw
    gw.run("ip", "route", "add", "default", "via", "100.64.1.2", "table", "100")
    gw.run("ip", "rule", "add", "fwmark", "0x200/0x3f00", "lookup", "100")
    gateway.nft(nat("ip", "post", "postrouting", "masquerade"))
    marked, plain = gateway.fresh("10.77.0.3", 5060, SERVER4, 53), gateway.fresh("10.77.0.2", 5060, SERVER4, 53)
    assert translated_source(marked) == translated_source(plain) == "100.64.0.1"
    if tool == "nft":
        gateway.nft(NFT_MWAN)
    else:
        gw.run("iptables-nft-restore", "--noflush", input=IPT_MWAN)
    fresh_marked = gateway.fresh("10.77.0.3", 41000, SERVER4, 53)
    fresh_plain = gateway.fresh("10.77.0.2", 41000, SERVER4, 53)
    assert translated_source(fresh_marked) == "100.64.1.1" and fresh_marked.mark & 0x3F00 == 0x200
    assert translated_source(fresh_plain) == "100.64.0.1"
    plan = gateway.plan()
    assert verdict(plan, "10.77.0.3", 5060) == kernel_verdict(marked, fresh_marked) == "stale", plan
    assert verdict(plan, "10.77.0.2", 5060) == kernel_verdict(plain, fresh_plain) == "healthy", plan
    for src in ("10.77.0.3", "10.77.0.2"):
        assert verdict(plan, src, 41000) == "healthy", plan
