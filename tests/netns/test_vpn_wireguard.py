"""A WireGuard VPN gateway in namespaces: wg-quick's default-route mode over wireguard-go (TUN).

The gateway's tunnel is configured as wg-quick does it for ``AllowedIPs = 0.0.0.0/0``: the
tunnel's socket carries fwmark 51820, ``ip rule not fwmark 51820 table 51820`` sends everything
else to a table whose default route is the tunnel, and ``ip rule table main
suppress_prefixlength 0`` keeps the main table's specific routes (the ISP's net). wg-quick's
PostUp and PostDown run the contrib hook. Each change is judged by the kernel's oracle: a fresh
flow's entry shows today's NAT, and the first packet of each stuck flow after topowatch's
reaction must reach its server with that source (vpnlab has the topology).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from vpnlab import (
    PEER_WAN,
    WG_GW,
    WG_PORT,
    Outcome,
    VpnLab,
    WireGuard,
    assert_default_route_down,
    assert_default_route_up,
    flows,
    hook_line,
    react,
    tunnel_name,
)

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(shutil.which("wireguard-go") is None or shutil.which("wg-quick") is None,
                       reason="needs wireguard-go and wireguard-tools (scripts/setup installs them)"),
]

# The peer does not answer (yet): the tunnel's own flow stays UNREPLIED through the reaction.
BLOCK = f"""\
table inet tvblock {{
    chain input {{
        type filter hook input priority 0; policy accept;
        udp dport {WG_PORT} drop
    }}
}}
"""
TUNNEL = (WG_PORT, PEER_WAN, WG_PORT)


@pytest.fixture(scope="module")
def wg() -> Iterator[WireGuard]:
    name = tunnel_name("wg")
    with VpnLab.create({name: WG_GW}) as lab:
        wg = WireGuard.configure(lab, name)
        wg.wg_quick(lab.peer, "up", wg.peer_conf)
        yield wg


@pytest.fixture(scope="module")
def up(wg: WireGuard) -> Outcome:
    lab = wg.lab
    lab.peer.run("nft", "-f", "-", input=BLOCK)

    def let_through() -> None:
        lab.peer.run("nft", "delete", "table", "inet", "tvblock")
        lab.wait_entry(*TUNNEL[:2], lambda e: not e.unreplied, dport=TUNNEL[2])

    return react(lab, flows(5000), "wg-up", lambda: wg.wg_quick(lab.gw, "up", wg.gw_conf),
                 hook_line(wg.gw_name, "wg-quick-up"), tunnel=TUNNEL, ready=let_through)


@pytest.fixture(scope="module")
def down(wg: WireGuard, up: Outcome) -> Outcome:
    return react(wg.lab, flows(6000), "wg-down", lambda: wg.down(wg.lab.gw, wg.gw_name, wg.gw_conf),
                 hook_line(wg.gw_name, "wg-quick-down"))


def test_tunnel_up_fixes_stuck_flows(up: Outcome) -> None:
    # Table 51820's default route, for every packet without the tunnel's fwmark.
    assert_default_route_up(up, WG_GW)


def test_tunnel_down_fixes_flows_that_leave_by_the_wan(down: Outcome) -> None:
    assert_default_route_down(down)


def test_tunnel_flow_is_judged_under_the_fwmark_rules(up: Outcome) -> None:
    # wireguard-go's socket carries fwmark 51820: its flow leaves by the main table (the WAN),
    # while a flow without the mark would go into the tunnel. The mark of a local socket is not
    # in the entry, so topowatch must not call it stale: it keeps it, undecided, naming the rule.
    before, after = up.tunnel_before, up.tunnel_after
    assert before is not None and before.unreplied
    assert not up.tunnel_deleted and not up.deleted_others
    assert after is not None and after.id == before.id
    reasons = [r["reason"] for r in up.undecided if r["orig"]["sport"] == WG_PORT and r["orig"]["dst"] == PEER_WAN]
    assert reasons and all("fwmark 0xca6c" in reason for reason in reasons), up.undecided


def test_hooks_ask_for_a_full_judgement(up: Outcome, down: Outcome) -> None:
    # PostUp and PostDown reached the daemon (react() waited for the reaction that took each).
    for outcome in (up, down):
        assert outcome.reactions, outcome
