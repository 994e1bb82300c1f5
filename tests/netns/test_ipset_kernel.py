"""An ipset's members change, no rule does: the daemon notices and fixes the flows it leaves stale.

ipsets give no netlink event topowatch hears, so the daemon polls the sets
the iptables ruleset names (``-m set --match-set``). Here a masquerade rule
applies only to destinations in the set; the set starts empty, so a flow to
the SIP server leaves unNATed and sticks. ``ipset add`` puts the server in
the set: the daemon must react, delete the entry, and the next packet
leaves masqueraded, as a fresh flow does (the kernel is the oracle).
Everything happens in the lab's namespaces; ipsets are per namespace.
"""

from __future__ import annotations

import shutil

import pytest

from topowatch.edges.nftevents import IPSET_INTERVAL
from topowatch.lab import SIP_SERVER, Daemon, Lab, LabFlow

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,  # waits for one poll interval
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("ipset", "iptables-nft", "iptables-nft-save", "nft")),
        reason="needs ipset, iptables-nft and nft",
    ),
]

# A NAT rule for an interface that does not exist: the namespace tracks connections, nothing is NATed.
TRACKING = """\
table inet t {
    chain post {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "none0" masquerade
    }
}
"""


def test_ipset_member_added_fixes_the_flow_it_concerns() -> None:
    sip = LabFlow("sip", 5060, SIP_SERVER, 5060)
    with Lab.create(ruleset=TRACKING) as lab:
        router = lab.router
        router.run("ip", "route", "replace", "default", "via", "203.0.113.1", "dev", "up2")
        router.run("ipset", "create", "masq", "hash:ip")
        router.run(
            "iptables-nft",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            "up2",
            "-m",
            "set",
            "--match-set",
            "masq",
            "dst",
            "-j",
            "MASQUERADE",
        )
        lab.start_traffic((sip,))
        before = lab.wait_entry(sip.sport, sip.dst)
        assert before.unreplied
        assert str(before.reply.dst) == "10.0.1.2"  # the set is empty: no NAT
        with Daemon(router, "--debounce", "0.2", "--no-startup-sweep") as daemon:
            assert daemon.wait_for("ready") is not None, daemon.lines
            router.run("ipset", "add", "masq", SIP_SERVER)
            # (Other reactions may come first: IPv6 link-local addresses finishing DAD.)
            line = daemon.wait_for("ipset masq changed", timeout=IPSET_INTERVAL + 10)
            assert line is not None and "reaction" in line, "\n".join(daemon.lines)
            code = daemon.stop()
        assert code == 0, daemon.lines
        assert any("deleted udp 10.0.1.2:5060" in x for x in daemon.lines), daemon.lines
        oracle = lab.oracle(sip.dst, sip.dport, 41000)
        assert oracle is not None and str(oracle.reply.dst) == "203.0.113.2"
        assert lab.wait_seen("sip", "203.0.113.2") == "203.0.113.2"
