"""A strongSwan site-to-site gateway in namespaces: charon with kernel-libipsec (userspace ESP).

kernel-libipsec does ESP in charon over a TUN device (ipsec0) and routes the remote traffic
selector into it (table 220): no xfrm policy or state exists, so this exercises route and link
events (and the updown hook), never ``policy ipsec``/``rt ipsec``. The IKEv2 SA (PSK, UDP
encapsulation forced, as kernel-libipsec needs) covers 10.0.1.0/24 === 172.16.0.0/24: only the
site's flows move into the tunnel; every other flow stays on the WAN and must be left alone.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from vpnlab import (
    CHARON,
    GW_LAN,
    GW_WAN,
    PEER_WAN,
    Outcome,
    StrongSwan,
    VpnLab,
    assert_fixed,
    flows,
    hook_line,
    react,
)

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not os.access(CHARON, os.X_OK) or shutil.which("swanctl") is None,
                       reason="needs strongswan-charon, strongswan-swanctl and libcharon-extra-plugins "
                              "(kernel-libipsec; scripts/setup installs them)"),
]
NAT_T = (4500, PEER_WAN, 4500)  # IKE and ESP in UDP, between the gateway and the peer


@pytest.fixture(scope="module")
def swan() -> Iterator[StrongSwan]:
    with VpnLab.create({"ipsec0": GW_LAN}) as lab:
        yield StrongSwan.configure(lab)


@pytest.fixture(scope="module")
def up(swan: StrongSwan) -> Outcome:
    def initiate() -> None:
        swan.swanctl("gw", swan.lab.gw, "--initiate", "--child", "site", "--timeout", "20")

    return react(swan.lab, flows(5000), "swan-up", initiate, hook_line("wan0", "up-client site", "xfrm"),
                 tunnel=NAT_T)


@pytest.fixture(scope="module")
def down(swan: StrongSwan, up: Outcome) -> Outcome:
    def terminate() -> None:
        swan.swanctl("gw", swan.lab.gw, "--terminate", "--ike", "site", "--timeout", "20")

    return react(swan.lab, flows(6000), "swan-down", terminate, hook_line("wan0", "down-client site", "xfrm"))


def test_tunnel_up_fixes_only_the_sites_flows(up: Outcome) -> None:
    # The site's flow was masqueraded out the WAN; through the tunnel it is not NATed. The
    # others keep their route and their entries (the fixed SNAT and the null binding too).
    assert up.names(up.stale) == {"site"}, up.table()
    assert_fixed(up)
    assert up.first["site"] == "10.0.1.2", up.table()
    assert up.tunnel_after is not None and up.tunnel_before is not None
    assert up.tunnel_after.id == up.tunnel_before.id and not up.tunnel_deleted


def test_tunnel_down_fixes_the_sites_null_binding(down: Outcome) -> None:
    # Nothing was masqueraded into ipsec0, so the kernel heals nothing: the site's null
    # binding would leak the LAN address out the WAN but for topowatch.
    assert down.names(down.stale) == {"site"} and down.healed_by_kernel == set(), down.table()
    assert_fixed(down)
    assert down.first["site"] == GW_WAN, down.table()
