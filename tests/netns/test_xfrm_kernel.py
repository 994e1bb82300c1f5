"""XFRM in real namespaces: the dump and events against `ip xfrm`, and the IPsec scenario.

This kernel has no ESP: policies can be added, SAs cannot. So:
- the dump and the event stream are compared with ``ip xfrm policy`` (text;
  this iproute2 prints no JSON for xfrm);
- the scenario "a policy appears for a masqueraded flow" checks that the
  daemon deletes the entry and names the policy and the missing SA (a fresh
  flow is dropped by xfrm before conntrack confirms it: no oracle there);
- the reverse, "the policy goes away", is checked against the kernel oracle.
"""

from __future__ import annotations

import re
import socket
import time

import pytest
import trio

from topowatch.core.xfrm import Direction, XfrmPolicy
from topowatch.edges import xfrm as X
from topowatch.errors import TopowatchError
from topowatch.lab import SIP_SERVER, Daemon, Lab, LabFlow
from topowatch.netns import Namespace

pytestmark = pytest.mark.netns

OUT_POLICY = (
    "src 10.0.1.0/24 dst 192.0.2.0/24 dir out priority 100 "
    "tmpl src 203.0.113.2 dst 203.0.113.1 proto esp reqid 1 mode tunnel"
)
EXEMPT_RULESET = """\
table inet t {
    chain post {
        type nat hook postrouting priority srcnat; policy accept;
        rt ipsec exists accept
        oifname "up2" masquerade
    }
}
"""


def ip_xfrm_policies(ns: Namespace) -> list[tuple[str, str, str, str, str]]:
    """The oracle: (src, dst, dir, priority, reqids) per policy, from `ip xfrm policy` text."""
    text = ns.run("ip", "xfrm", "policy").strip()
    out = []
    for block in re.split(r"\n(?=src )", text) if text else []:
        w = block.split()
        reqids = ",".join(w[i + 1] for i, x in enumerate(w) if x == "reqid")
        out.append((w[1], w[3], w[w.index("dir") + 1], w[w.index("priority") + 1], reqids))
    return out


def ours(p: XfrmPolicy) -> tuple[str, str, str, str, str]:
    return (str(p.selector.src), str(p.selector.dst), p.direction.name.lower(), str(p.priority),
            ",".join(str(t.reqid) for t in p.templates))


def factory(ns: Namespace) -> X.SocketFactory:
    return lambda: trio.socket.from_stdlib_socket(ns.socket(socket.AF_NETLINK, socket.SOCK_RAW, X.NETLINK_XFRM))


async def test_dump_and_events_match_ip_xfrm(netns: Namespace) -> None:
    add = ["ip", "xfrm", "policy", "add"]
    netns.run(*add, *OUT_POLICY.split())
    netns.run(*add, *["src", "10.0.2.0/24", "dst", "0.0.0.0/0", "proto", "udp", "dport", "53", "dir", "out", "priority", "5", "mark", "1", "mask", "0xf"])
    netns.run(*add, *["src", "fd00::/64", "dst", "fd01::/64", "dir", "fwd", "action", "block"])
    netns.run(*add, *["src", "192.0.2.0/24", "dst", "10.0.1.0/24", "dir", "in", "tmpl", "proto", "esp", "reqid", "1", "mode", "transport"])
    policies, states = await X.dump_xfrm(factory(netns))
    assert [ours(p) for p in policies] == ip_xfrm_policies(netns)
    assert states == ()
    # No ESP in this kernel: an SA cannot be added (so SA messages are tested synthesised).
    with pytest.raises(TopowatchError, match="not found"):
        netns.run("ip", "xfrm", "state", "add", "src", "203.0.113.2", "dst", "203.0.113.1", "proto", "esp",
                  "spi", "0x100", "reqid", "1", "mode", "tunnel", "enc", "cbc(aes)",
                  "0x00112233445566778899aabbccddeeff")
    assert X.probe(factory(netns)) is None

    async with X.XfrmEvents(sock_factory=factory(netns)) as events:
        changes = [
            (["add", *["src", "10.9.0.0/16", "dst", "0.0.0.0/0", "dir", "out", "priority", "3"]], X.EventAction.NEW),
            (["update", *OUT_POLICY.replace("reqid 1", "reqid 4").split()], X.EventAction.UPDATE),
            (["del", *["src", "10.0.1.0/24", "dst", "192.0.2.0/24", "dir", "out"]], X.EventAction.DELETE),
            (["flush"], X.EventAction.FLUSH),
        ]
        for argv, action in changes:
            before = ip_xfrm_policies(netns)
            await trio.to_thread.run_sync(lambda a=argv: netns.run("ip", "xfrm", "policy", *a))
            with trio.fail_after(5):
                event = await events.__anext__()
            assert isinstance(event, X.XfrmEvent) and event.action is action, event
            after = ip_xfrm_policies(netns)
            if action is X.EventAction.FLUSH:
                assert after == [] and before
            else:
                assert isinstance(event.value, XfrmPolicy)
                assert (ours(event.value) in after) == (action is not X.EventAction.DELETE)
        # A hard lifetime: the kernel deletes the policy and says so only with a POLEXPIRE.
        netns.run("ip", "xfrm", "policy", "add", *["src", "10.8.0.0/16", "dst", "0.0.0.0/0", "dir", "out"],
                  "limit", "time-hard", "1")
        with trio.fail_after(5):
            added = await events.__anext__()
            expired = await events.__anext__()
        assert isinstance(added, X.XfrmEvent) and added.action is X.EventAction.NEW
        assert isinstance(expired, X.XfrmEvent) and expired.action is X.EventAction.EXPIRE and expired.changes
        assert ip_xfrm_policies(netns) == []
        assert isinstance(expired.value, XfrmPolicy) and expired.value.direction is Direction.OUT


SIP = LabFlow("sip", 5060, SIP_SERVER, 5060)


def wait_for(predicate: object, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("sweep", [False, True], ids=["first reaction", "after the sweep"])
def test_policy_appears_for_a_masqueraded_flow(sweep: bool) -> None:
    """The policy's arrival is judged by the daemon's first reaction, and by one that follows a
    startup sweep that judged every entry (the xfrm change is one any flow may feel)."""
    with Lab.create(ruleset=EXEMPT_RULESET) as lab:
        r = lab.router
        r.run("ip", "route", "replace", "default", "via", "203.0.113.1", "dev", "up2")
        lab.start_traffic((SIP,))
        assert wait_for(lambda: (e := lab.entry_for(SIP.sport, SIP.dst)) is not None
                        and str(e.reply.dst) == "203.0.113.2")
        args = () if sweep else ("--no-startup-sweep",)
        with Daemon(r, "-v", "--debounce", "0.2", *args) as daemon:  # -v: a line per entry
            assert daemon.wait_for("ready") is not None, daemon.lines
            if sweep:
                line = daemon.wait_for("reaction 1 (")
                assert line is not None and "0 deleted" in line, daemon.lines
            r.run("ip", "xfrm", "policy", "add", *OUT_POLICY.split())
            # Its reaction (after the sweep, others may come between: a fresh link's IPv6 DAD).
            needle = "deleted udp 10.0.1.2:5060" if sweep else "reaction 1 ("
            assert daemon.wait_for(needle) is not None, daemon.lines
            daemon.stop()
        deleted = [line for line in daemon.lines if "deleted udp 10.0.1.2:5060" in line and " reply " in line]
        assert deleted, daemon.lines
        assert "xfrm policy src 10.0.1.0/24 dst 192.0.2.0/24 dir out priority 100" in deleted[0]
        assert "no SA for reqid 1" in deleted[0]
        assert any("xfrm policy added" in line or "xfrm policy src" in line for line in daemon.lines)
        # Its packets now meet the policy without an SA: dropped before conntrack confirms them,
        # so the masqueraded entry does not come back.
        time.sleep(0.5)
        again = lab.entry_for(SIP.sport, SIP.dst)
        assert again is None or str(again.reply.dst) != "203.0.113.2"


@pytest.mark.slow
def test_policy_goes_away_oracle() -> None:
    with Lab.create(ruleset=EXEMPT_RULESET) as lab:
        r = lab.router
        # A flow that is not NATed (out the transit uplink), then quiet: its entry stays, UNREPLIED.
        lab.start_traffic((SIP,))
        assert wait_for(lambda: lab.entry_for(SIP.sport, SIP.dst) is not None)
        lab.stop_traffic()
        before = lab.entry_for(SIP.sport, SIP.dst)
        assert before is not None and str(before.reply.dst) == "10.0.1.2" and before.unreplied
        # Now the masqueraded uplink carries it, under an IPsec policy: exempt (once its SA is up).
        r.run("ip", "route", "replace", "default", "via", "203.0.113.1", "dev", "up2")
        r.run("ip", "xfrm", "policy", "add", *OUT_POLICY.split())
        with Daemon(r, "--debounce", "0.2", "--no-startup-sweep") as daemon:
            assert daemon.wait_for("ready") is not None, daemon.lines
            r.run("ip", "xfrm", "policy", "del", "src", "10.0.1.0/24", "dst", "192.0.2.0/24", "dir", "out")
            assert daemon.wait_for("reaction 1 (") is not None, daemon.lines
            daemon.stop()
        oracle = lab.oracle(SIP.dst, SIP.dport, 41000)
        assert oracle is not None and str(oracle.reply.dst) == "203.0.113.2"
        deleted = [line for line in daemon.lines if "deleted udp 10.0.1.2:5060" in line]
        assert deleted, daemon.lines
        assert f"masquerade to {oracle.reply.dst}" in deleted[0]
        assert lab.entry_for(SIP.sport, SIP.dst) is None
