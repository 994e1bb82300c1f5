"""The ways a flow may have come, chain orders and destination ports, with the kernel as oracle.

The gateway of test_semantics_oracle (namespaces prefixed "tf"): a LAN client,
the gateway, two uplink peers. Each test makes an entry, changes the gateway,
sends a fresh flow (the kernel's answer for today) and checks what topowatch
says of both:

- rp_filter off, an SNAT for flows entering on lan added above a masquerade:
  the kernel gives the old flow's fresh twin the new SNAT, so the masqueraded
  entry is stale; but it may have entered on an uplink, where masquerade is
  still right. The daemon, which knows that every interface gave it that
  masquerade before the change, leaves it undecided (``unknown_ingress``) and
  never deletes it; ``plan``, with no previous snapshot, cannot tell it from
  an entry made since on either interface: both undecided, never healthy (a
  false negative) nor stale;
- two nat chains at one priority (their order is the registration order, no
  dump shows it): an entry made before any NAT is stale whichever runs first;
  the fresh entry has the binding of one order and not the other's, so
  without a previous snapshot it is undecided (it may be an old one, made
  when the other order ran), never stale;
- a DNAT that changed the port replaced by one without a port: the kernel
  keeps the destination port of a fresh flow, so the old entry is stale.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from topowatch.lab import Daemon, log_record

from test_semantics_oracle import SERVER4, TRACK, Gateway, kernel_verdict, nat, translated_source, verdict  # isort: skip

pytestmark = [pytest.mark.netns]


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    with Gateway.create("tf") as gw:
        yield gw


def test_the_daemon_leaves_an_old_entry_undecided_where_its_interface_now_refuses_its_binding(
    gateway: Gateway,
) -> None:
    gateway.rp_filter(0)
    gateway.nft(nat("ip", "post", "postrouting", "masquerade"))
    old = gateway.fresh("10.77.0.3", 5060, SERVER4, 53)
    assert translated_source(old) == "100.64.0.1"
    with Daemon(gateway.gw, "--debounce", "0.2", "--no-startup-sweep", "--no-dbus", "--log-format", "json",
                "-vv") as daemon:
        assert daemon.wait_for("ready") is not None, daemon.lines
        gateway.gw.run("nft", "insert", "rule", "ip", "h7nat", "post", "iifname", "lan", "snat", "to",
                       "100.64.0.99")
        record = daemon.wait_record(lambda r: r.get("event") == "reaction")
        assert record is not None, daemon.lines
        fresh = gateway.fresh("10.77.0.3", 41000, SERVER4, 53)
        assert daemon.stop() == 0, daemon.lines
    assert translated_source(fresh) == "100.64.0.99"
    assert kernel_verdict(old, fresh) == "stale"
    assert record["undecided_by_code"] == {"unknown_ingress": 1}, record
    assert record["stale"] == 0, record
    entries = [(log_record(line) or {}) for line in daemon.lines]
    (undecided,) = [r for r in entries if r.get("action") == "undecided"]
    assert undecided["orig"]["sport"] == 5060 and undecided["code"] == "unknown_ingress", undecided
    assert ("10.77.0.3", 5060) in {(str(e.orig.src), e.orig.sport) for e in gateway.entries()}
    # Without a previous snapshot: some interface gives each its SNAT, another refuses it, and
    # nothing says which is old: undecided, never healthy (the old one is stale) nor stale.
    plan = gateway.plan()
    assert verdict(plan, "10.77.0.3", 5060) == "undecided", plan
    assert verdict(plan, "10.77.0.3", 41000) == "undecided", plan


def test_chains_at_one_priority_condemn_an_entry_that_every_order_would_translate(gateway: Gateway) -> None:
    gateway.nft(TRACK)
    old = gateway.fresh("10.77.0.2", 5060, SERVER4, 53)
    assert translated_source(old) == "10.77.0.2"
    gateway.nft(nat("ip", "post", "postrouting", "snat to 100.64.0.98").replace("h7nat", "tfa"))
    gateway.nft(nat("ip", "post", "postrouting", "snat to 100.64.0.99").replace("h7nat", "tfb"))
    gateway.send("10.77.0.2", 5060, SERVER4, 53)  # the old flow goes on, untranslated
    fresh = gateway.fresh("10.77.0.2", 41000, SERVER4, 53)
    assert translated_source(fresh) == "100.64.0.99"  # the chain registered last runs first
    plan = gateway.plan()
    assert verdict(plan, "10.77.0.2", 5060) == kernel_verdict(old, fresh) == "stale", plan
    assert verdict(plan, "10.77.0.2", 41000) == "undecided", plan
    (stale,) = (d for d in plan["stale"] if d["orig"]["sport"] == 5060)
    assert sorted(b["addr"] for b in stale["expected"]) == ["100.64.0.98", "100.64.0.99"]


def test_a_dnat_without_a_port_keeps_the_destination_port(gateway: Gateway) -> None:
    gateway.nft(nat("ip", "pre", "prerouting", "udp dport 5060 dnat to 100.64.0.2:5070", priority=-100))
    old = gateway.fresh("10.77.0.2", 5060, SERVER4, 5060)
    assert (str(old.reply.src), old.reply.sport) == ("100.64.0.2", 5070)
    gateway.gw.run("nft", "flush", "chain", "ip", "h7nat", "pre")
    gateway.gw.run("nft", "add", "rule", "ip", "h7nat", "pre", "udp", "dport", "5060", "dnat", "to", "100.64.0.2")
    fresh = gateway.fresh("10.77.0.2", 41000, SERVER4, 5060)
    assert (str(fresh.reply.src), fresh.reply.sport) == ("100.64.0.2", 5060)
    plan = gateway.plan()
    assert verdict(plan, "10.77.0.2", 5060) == "stale", plan
    assert verdict(plan, "10.77.0.2", 41000) == "healthy", plan
    (stale,) = (d for d in plan["stale"] if d["orig"]["sport"] == 5060)
    assert stale["side"] == "dnat", stale
