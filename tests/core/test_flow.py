# SPDX-License-Identifier: GPL-2.0-or-later
"""core.flow's values: what they refuse, and the texts reasons and logs carry (issue 16's mutation
run). Every expected text is written out by hand. ``Binding.admits`` is held to the admission
table (``tests/core/test_admission.py``).
"""

from __future__ import annotations

import re
from ipaddress import ip_address, ip_network

import pytest

from topowatch.core.flow import (
    NO_NAT,
    Binding,
    Egress,
    EgressKind,
    Flow,
    NatKind,
    RuleRef,
    Unknown,
    proto_name,
)
from topowatch.core.model import AF_INET, AF_INET6

A = ip_address


def exact(text: str) -> str:
    return f"^{re.escape(text)}$"


def test_protocol_names() -> None:
    assert [proto_name(n) for n in (1, 6, 17, 33, 47, 50, 58, 132, 136, 99)] == [
        "icmp", "tcp", "udp", "dccp", "gre", "esp", "icmpv6", "sctp", "udplite", "99"]  # fmt: skip


def test_unknown_has_no_truth_value_and_compares_by_reason_alone() -> None:
    with pytest.raises(TypeError, match=exact("Unknown has no truth value; test with isinstance()")):
        bool(Unknown("x"))
    rule = RuleRef("chain postrouting", 3, "masquerade")
    assert Unknown("x", rule) == Unknown("x") and Unknown("x", rule).rule is rule and Unknown("x").rule is None


def test_a_flow_refuses_mixed_families() -> None:
    with pytest.raises(ValueError, match=exact("Flow mixes address families: 10.0.0.1 -> 2001:db8::1")):
        Flow(AF_INET, 6, A("10.0.0.1"), A("2001:db8::1"))
    with pytest.raises(ValueError, match=exact("Flow.family 10 does not match 10.0.0.1")):
        Flow(AF_INET6, 6, A("10.0.0.1"), A("10.0.0.2"))
    with pytest.raises(ValueError, match=exact("Flow.family 2 does not match 2001:db8::1")):
        Flow(AF_INET, 6, A("2001:db8::1"), A("2001:db8::2"))
    assert Flow(AF_INET6, 6, A("2001:db8::1"), A("2001:db8::2")).packet_mark is None


@pytest.mark.parametrize(
    ("proto", "text"),
    [
        (6, "tcp 10.0.0.1:1000 -> 192.0.2.1:80"),
        (17, "udp 10.0.0.1:1000 -> 192.0.2.1:80"),
        (33, "dccp 10.0.0.1:1000 -> 192.0.2.1:80"),
        (132, "sctp 10.0.0.1:1000 -> 192.0.2.1:80"),
        (136, "udplite 10.0.0.1:1000 -> 192.0.2.1:80"),
        (1, "icmp 10.0.0.1 -> 192.0.2.1"),
        (47, "gre 10.0.0.1 -> 192.0.2.1"),
    ],
)
def test_a_flow_names_its_ports_where_its_protocol_has_them(proto: int, text: str) -> None:
    assert Flow(AF_INET, proto, A("10.0.0.1"), A("192.0.2.1"), 1000, 80).describe() == text


@pytest.mark.parametrize(
    ("egress", "text"),
    [
        (Egress(EgressKind.UNICAST, 3, "up1"), "dev up1"),
        (Egress(EgressKind.UNICAST, 3, "up1", A("198.51.100.1")), "dev up1 via 198.51.100.1"),
        (Egress(EgressKind.UNICAST, 3, "up1", A("198.51.100.1"), xfrm="out 10.0.0.0/8"),
         "dev up1 via 198.51.100.1 (xfrm policy out 10.0.0.0/8)"),
        (Egress(EgressKind.UNICAST, 3, "up1", xfrm="out 10.0.0.0/8"), "dev up1 (xfrm policy out 10.0.0.0/8)"),
        (Egress(EgressKind.BLACKHOLE, route="blackhole 192.0.2.0/24"), "blackhole (blackhole 192.0.2.0/24)"),
        (Egress(EgressKind.UNREACHABLE), "unreachable"),
        (Egress(EgressKind.LOCAL, 1, "lo", route="local 10.0.0.1"), "local (local 10.0.0.1)"),
    ],
)
def test_egress_texts(egress: Egress, text: str) -> None:
    assert egress.describe() == text


def test_egress_defaults() -> None:
    e = Egress(EgressKind.UNICAST)
    assert (e.oif, e.oifname, e.gateway, e.masquerade_source, e.route, e.xfrm, e.prefix) == (0, "", None, None, "", "", None)
    assert Egress(EgressKind.UNICAST, prefix=ip_network("10.0.0.0/8")).prefix == ip_network("10.0.0.0/8")


def test_a_binding_fills_the_high_ends_and_refuses_what_cannot_be() -> None:
    b = Binding(NatKind.SNAT, A("192.0.2.1"), port_lo=1024)
    assert (b.addr_hi, b.port_hi) == (A("192.0.2.1"), 1024)
    assert Binding(NatKind.SNAT, A("192.0.2.1"), A("192.0.2.9"), 1, 2).addr_hi == A("192.0.2.9")
    assert (NO_NAT.kind, NO_NAT.addr_lo, NO_NAT.addr_hi, NO_NAT.port_lo, NO_NAT.port_hi) == (NatKind.NONE, None, None, None, None)
    with pytest.raises(ValueError, match=exact("a NONE binding has no address")):
        Binding(NatKind.NONE, A("192.0.2.1"))
    with pytest.raises(ValueError, match=exact("bad address range 192.0.2.9-192.0.2.1")):
        Binding(NatKind.SNAT, A("192.0.2.9"), A("192.0.2.1"))
    with pytest.raises(ValueError, match=exact("bad address range 192.0.2.1-2001:db8::1")):
        Binding(NatKind.SNAT, A("192.0.2.1"), A("2001:db8::1"))
    with pytest.raises(ValueError, match=exact("bad port range 2-1")):
        Binding(NatKind.SNAT, A("192.0.2.1"), port_lo=2, port_hi=1)
    # Equal ends are a range of one.
    assert Binding(NatKind.DNAT, A("192.0.2.1"), A("192.0.2.1"), 80, 80).ports == (80, 80)
    assert Binding(NatKind.MASQUERADE, port_lo=5, port_hi=5).addr_lo is None


def test_a_binding_translates_to_its_range_or_keeps_the_address() -> None:
    original = A("10.0.0.1")
    assert NO_NAT.translated(original) == (original, original)
    assert Binding(NatKind.MASQUERADE).translated(original) == (original, original)
    assert Binding(NatKind.SNAT, A("192.0.2.1"), A("192.0.2.9")).translated(original) == (A("192.0.2.1"), A("192.0.2.9"))


@pytest.mark.parametrize(
    ("binding", "addr_text", "ports", "text"),
    [
        (NO_NAT, None, None, "no NAT"),
        (Binding(NatKind.MASQUERADE), None, None, "masquerade to original address"),
        (Binding(NatKind.MASQUERADE, port_lo=1024, port_hi=2048), None, (1024, 2048),
         "masquerade to original address:1024-2048"),
        (Binding(NatKind.SNAT, A("192.0.2.1")), "192.0.2.1", None, "snat to 192.0.2.1"),
        (Binding(NatKind.SNAT, A("192.0.2.1"), A("192.0.2.9")), "192.0.2.1-192.0.2.9", None,
         "snat to 192.0.2.1-192.0.2.9"),
        (Binding(NatKind.DNAT, A("192.0.2.1"), port_lo=80), "192.0.2.1", (80, 80), "dnat to 192.0.2.1:80"),
        (Binding(NatKind.REDIRECT, port_lo=8080, port_hi=8081), None, (8080, 8081),
         "redirect to original address:8080-8081"),
    ],
)
def test_binding_texts(binding: Binding, addr_text: str | None, ports: tuple[int, int] | None, text: str) -> None:
    assert (binding.addr_text, binding.ports, binding.describe()) == (addr_text, ports, text)


def test_a_rule_reference_reads_as_its_chain_handle_and_text() -> None:
    assert str(RuleRef("ip nat postrouting", 3, "oifname up2 masquerade")) == (
        "ip nat postrouting handle 3: oifname up2 masquerade")


def test_admits_reads_a_source_side_unless_told() -> None:
    """Without ``dnat_side`` the binding is a source's: a changed port is admitted (a clash moved it)."""
    snat = Binding(NatKind.SNAT, A("192.0.2.1"))
    assert snat.admits(A("10.0.0.1"), A("192.0.2.1"), 1000, 2000)
    assert not snat.admits(A("10.0.0.1"), A("192.0.2.1"), 1000, 2000, dnat_side=True)
