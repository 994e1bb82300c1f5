"""An OpenVPN gateway in namespaces: a TUN client that the peer's server gives redirect-gateway.

The server (on the peer) pushes ``redirect-gateway def1``: the client adds 0.0.0.0/1 and
128.0.0.0/1 through the tunnel and a host route to the server by the WAN. Its ``up``,
``route-up`` and ``down`` scripts are the contrib hook. Each change is judged by the kernel's
oracle as in test_vpn_wireguard (vpnlab has the topology).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from vpnlab import (
    OVPN_GW,
    OVPN_PORT,
    PEER_WAN,
    OpenVpn,
    Outcome,
    VpnLab,
    assert_default_route_down,
    assert_default_route_up,
    flows,
    hook_line,
    react,
    tunnel_name,
)

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(shutil.which("openvpn") is None or shutil.which("openssl") is None,
                       reason="needs openvpn and openssl (scripts/setup installs them)"),
]
TUNNEL = (OVPN_PORT + 1, PEER_WAN, OVPN_PORT)


@pytest.fixture(scope="module")
def vpn() -> Iterator[OpenVpn]:
    name = tunnel_name("tun")
    with VpnLab.create({name: OVPN_GW}) as lab:
        vpn = OpenVpn.configure(lab, name)
        vpn.start_server()
        yield vpn


@pytest.fixture(scope="module")
def up(vpn: OpenVpn) -> Outcome:
    return react(vpn.lab, flows(5000), "ovpn-up", vpn.start_client, hook_line(vpn.gw_name, "openvpn-route-up"),
                 tunnel=TUNNEL)


@pytest.fixture(scope="module")
def down(vpn: OpenVpn, up: Outcome) -> Outcome:
    return react(vpn.lab, flows(6000), "ovpn-down", vpn.stop_client, hook_line(vpn.gw_name, "openvpn-down"))


def test_tunnel_up_fixes_stuck_flows(up: Outcome) -> None:
    # 0.0.0.0/1 and 128.0.0.0/1 into the tunnel.
    assert_default_route_up(up, OVPN_GW)


def test_tunnel_down_fixes_flows_that_leave_by_the_wan(down: Outcome) -> None:
    assert_default_route_down(down)


def test_tunnel_flow_is_judged_by_the_host_route(vpn: OpenVpn, up: Outcome, tmp_path: Path) -> None:
    # redirect-gateway keeps the server on the WAN with a host route. OpenVPN brings the tunnel
    # up only once the server answered, so its flow is replied by then (out of the default
    # policies' scope); judged with replied entries in scope, it is still not stale.
    assert up.tunnel_before is not None and up.tunnel_after is not None
    assert up.tunnel_after.id == up.tunnel_before.id and not up.tunnel_deleted
    rules = tmp_path / "rules.d"
    rules.mkdir(mode=0o755)
    (rules / "50-all.toml").write_text('[policy.all]\nunreplied_only = false\naction = "flush"\n')
    if up.tunnel_after.unreplied:
        pytest.fail(f"the tunnel's flow is UNREPLIED with the tunnel up: {up.tunnel_after}")
    plan = vpn.lab.gw.run(sys.executable, "-m", "topowatch", "plan", "--json", "--rules-dir", str(rules),
                          "-d", PEER_WAN, "-p", "udp")
    doc = json.loads(plan)
    judged = [s for s in doc["stale"] if s["orig"]["sport"] == TUNNEL[0]]
    assert doc["entries_examined"] >= 1 and judged == [], doc


def test_hooks_ask_for_a_full_judgement(up: Outcome, down: Outcome, vpn: OpenVpn) -> None:
    # up, route-up and down reached the daemon (react() waited for the reaction that took
    # route-up and down); up too.
    assert up.reactions and down.reactions
    assert vpn.lab.daemon is not None
    assert any(hook_line(vpn.gw_name, "openvpn-up") in line for line in vpn.lab.daemon.lines)
