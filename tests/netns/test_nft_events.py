"""Ruleset changes are topology changes, in real namespaces with the kernel as oracle.

A committed nftables transaction arrives as one NFT_MSG_NEWGEN on
NFNLGRP_NFTABLES; the daemon re-reads the ruleset and fixes a flow that
started before the NAT rule existed: the next packet leaves masqueraded,
as a fresh flow does.
"""

from __future__ import annotations

import socket

import pytest
import trio

from topowatch.edges.nftevents import NETLINK_NETFILTER, NftablesEvents
from topowatch.lab import SIP_SERVER, Daemon, Lab, LabFlow
from topowatch.netns import Namespace
from topowatch.reactor import Trigger

pytestmark = [pytest.mark.netns]

POST_ONLY = """\
table inet t {
    chain post {
        type nat hook postrouting priority srcnat; policy accept;
    }
}
"""
# A NAT rule for an interface that does not exist: the namespace tracks connections, nothing is NATed.
TRACKING = POST_ONLY.replace("srcnat; policy accept;", 'srcnat; policy accept;\n        oifname "none0" masquerade')


async def test_one_trigger_per_transaction(netns: Namespace) -> None:
    raw = netns.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    source = NftablesEvents(sock_factory=lambda: trio.socket.from_stdlib_socket(raw))
    got: list[Trigger] = []
    async with source.events() as events:
        # One transaction with a table, a chain and three rules; then a second one.
        await trio.to_thread.run_sync(lambda: netns.run("nft", "-f", "-", input=POST_ONLY + (
            'add rule inet t post oifname "a" masquerade\n'
            'add rule inet t post oifname "b" masquerade\n'
            'add rule inet t post oifname "c" masquerade\n')))
        await trio.to_thread.run_sync(lambda: netns.run("nft", "flush", "chain", "inet", "t", "post"))
        with trio.move_on_after(5):
            async for trigger in events:
                got.append(trigger)
                if len(got) == 2:
                    break
        # Nothing more arrives for what was one transaction each.
        with trio.move_on_after(0.3):
            async for trigger in events:
                got.append(trigger)
    assert len(got) == 2, got
    assert all(t.source == "nftables" and not t.overrun and "generation" in t.description for t in got)
    assert "nft" in got[0].description  # the kernel names the process that committed it
    assert source.messages >= 6


def test_nat_rule_added_after_the_flow_started_fixes_it() -> None:
    sip = LabFlow("sip", 5060, SIP_SERVER, 5060)
    with Lab.create(ruleset=TRACKING) as lab:
        lab.router.run("ip", "route", "replace", "default", "via", "203.0.113.1", "dev", "up2")
        lab.start_traffic((sip,))
        before = lab.wait_entry(sip.sport, sip.dst)
        assert str(before.reply.dst) == "10.0.1.2" and before.unreplied
        with Daemon(lab.router, "--debounce", "0.2", "--no-startup-sweep") as daemon:
            assert daemon.wait_for("ready") is not None, daemon.lines
            lab.router.run("nft", "add", "rule", "inet", "t", "post", "oifname", "up2", "masquerade")
            # (Other reactions may come first: IPv6 link-local addresses finishing DAD.)
            line = daemon.wait_for("nftables ruleset changed")
            assert line is not None and "reaction" in line, "\n".join(daemon.lines)
            code = daemon.stop()
        assert code == 0, daemon.lines
        assert any("deleted udp 10.0.1.2:5060" in x for x in daemon.lines), daemon.lines
        oracle = lab.oracle(sip.dst, sip.dport, 41000)
        assert oracle is not None and str(oracle.reply.dst) == "203.0.113.2"
        assert lab.wait_seen("sip", "203.0.113.2") == "203.0.113.2"
