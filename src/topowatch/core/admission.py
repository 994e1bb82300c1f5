# SPDX-License-Identifier: GPL-2.0-or-later
"""The admission rule, stated once: when a predicted binding admits an entry's actual one.

An entry is healthy on one side (source or destination) when at least one
predicted binding admits the translation the entry carries: its translated
address lies in the binding's address range (for a binding without one, the
address was kept: translated equals original), and, where the binding names
a port range, the translated port lies in it. On the source side a binding
without a port range admits any port (the kernel keeps the port unless it
clashes); on the destination side it admits only the original port (the
kernel never changes a destination port it was not given a range for:
``nf_nat_l4proto_unique_tuple``).

The rule is executed in four places, each shaped by its caller's speed:
``Binding.admits`` (the reasoned path, over ``ipaddress`` values),
``decide._admitted`` (integers), ``decide._admitted_raw`` (packed bytes, the
bulk path) and ``side_admits`` in ``edges/_ctscan.c`` (the compiled scan,
run from the programs ``decide.compile_program`` writes). ``CASES`` is the
rule as data, each expectation worked out by hand from the rule above (not
by calling any of them): tests/core/test_admission.py runs the three Python
functions over it and tests/edges/test_ctscan.py the compiled one, through
a ``Decider`` and a real dump message, so a fault in any copy, or in a
helper they share, fails against the table rather than against another
copy. A change of the rule starts here.

The cases sit on the edges: the ends of every range and one past them,
addresses that differ only in a high byte (a comparison of the low bytes
alone admits them), IPv6 values above 2**64, ports 0 and 65535, and sets of
bindings where only the last admits. An empty set (the flow would be dropped
now) is not a case: the callers never judge such a side. This module never
performs I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import ip_address

from topowatch.core.flow import Binding, NatKind
from topowatch.core.model import IPAddress


@dataclass(frozen=True, slots=True)
class AdmissionCase:
    """Does any of ``bindings`` admit ``original`` translated to ``translated:port``?

    ``admitted`` is the answer on the source side. ``original_port`` is the
    port before translation (None: ``port``, the port kept); ``dnat_admitted``
    the answer on the destination side where it differs (None: ``admitted``).
    """

    name: str
    bindings: tuple[Binding, ...]
    original: IPAddress
    translated: IPAddress
    port: int
    admitted: bool
    original_port: int | None = None
    dnat_admitted: bool | None = None

    def __post_init__(self) -> None:
        if self.original.version != self.translated.version:
            raise ValueError(f"{self.name}: original and translated of different families")
        for port in (self.port, self.original_port):
            if port is not None and not 0 <= port <= 0xFFFF:
                raise ValueError(f"{self.name}: port {port} out of range")

    @property
    def before(self) -> int:
        """The original port."""
        return self.port if self.original_port is None else self.original_port

    def expected(self, side: str) -> bool:
        """The answer on ``side`` ("snat" or "dnat")."""
        if side == "dnat" and self.dnat_admitted is not None:
            return self.dnat_admitted
        return self.admitted


def _b(kind: NatKind, lo: str | None = None, hi: str | None = None,
       ports: tuple[int, int] | None = None) -> Binding:  # fmt: skip
    return Binding(
        kind,
        None if lo is None else ip_address(lo),
        None if lo is None else ip_address(hi or lo),
        None if ports is None else ports[0],
        None if ports is None else ports[1],
    )


# A table row reads best positionally, as the columns of ``AdmissionCase``.
def _case(name: str, bindings: tuple[Binding, ...], original: str, translated: str, port: int,  # noqa: PLR0917
          admitted: bool, original_port: int | None = None, dnat_admitted: bool | None = None,
          ) -> AdmissionCase:  # fmt: skip
    return AdmissionCase(name, bindings, ip_address(original), ip_address(translated), port, admitted,
                         original_port, dnat_admitted)


_NONE = _b(NatKind.NONE)
_MASQ = _b(NatKind.MASQUERADE, "203.0.113.2")
_RANGE = _b(NatKind.SNAT, "192.0.2.64", "192.0.2.127")
_PORTS = _b(NatKind.MASQUERADE, "203.0.113.2", ports=(1024, 2047))
_KEPT_PORTS = _b(NatKind.REDIRECT, ports=(8000, 8099))  # address kept, port range named
_TEN = _b(NatKind.SNAT, "10.0.0.0", "10.255.255.255")
_V6 = _b(NatKind.SNAT, "2001:db8::1", "2001:db8::ffff")
_V6_HIGH = _b(NatKind.DNAT, "2001:db8:0:1::", "2001:db8:0:1::ff")
_DNAT = _b(NatKind.DNAT, "192.0.2.1")
_DNAT_PORTS = _b(NatKind.DNAT, "192.0.2.1", ports=(8000, 8099))

CASES: tuple[AdmissionCase, ...] = (
    # no NAT: the address kept, any port
    _case("none, address kept", (_NONE,), "10.0.1.2", "10.0.1.2", 5060, True),
    _case("none, address kept, port changed", (_NONE,), "10.0.1.2", "10.0.1.2", 1, True),
    _case("none, address translated", (_NONE,), "10.0.1.2", "203.0.113.2", 5060, False),
    _case("none, address one above", (_NONE,), "10.0.1.2", "10.0.1.3", 5060, False),
    _case("none, v6 kept", (_NONE,), "fd00:1::2", "fd00:1::2", 0, True),
    _case("none, v6 differs in the first byte", (_NONE,), "fd00:1::2", "2d00:1::2", 0, False),
    # one address
    _case("masquerade, that address", (_MASQ,), "10.0.1.2", "203.0.113.2", 5060, True),
    _case("masquerade, one above", (_MASQ,), "10.0.1.2", "203.0.113.3", 5060, False),
    _case("masquerade, one below", (_MASQ,), "10.0.1.2", "203.0.113.1", 5060, False),
    _case("masquerade, address kept", (_MASQ,), "10.0.1.2", "10.0.1.2", 5060, False),
    _case("masquerade of the original itself", (_MASQ,), "203.0.113.2", "203.0.113.2", 9, True),
    # an address range: both ends in, one past each out
    _case("range, low end", (_RANGE,), "10.0.1.2", "192.0.2.64", 1, True),
    _case("range, high end", (_RANGE,), "10.0.1.2", "192.0.2.127", 1, True),
    _case("range, inside", (_RANGE,), "10.0.1.2", "192.0.2.77", 1, True),
    _case("range, one below", (_RANGE,), "10.0.1.2", "192.0.2.63", 1, False),
    _case("range, one above", (_RANGE,), "10.0.1.2", "192.0.2.128", 1, False),
    _case("range, low byte in range but high byte not", (_RANGE,), "10.0.1.2", "193.0.2.77", 1, False),
    _case("range /8, one above in the first byte", (_TEN,), "10.0.1.2", "11.0.0.0", 1, False),
    _case("range /8, one below in the first byte", (_TEN,), "10.0.1.2", "9.255.255.255", 1, False),
    _case("range /8, its last address", (_TEN,), "192.168.1.2", "10.255.255.255", 1, True),
    # a port range: both ends in, one past each out, and the address must fit too
    _case("ports, low end", (_PORTS,), "10.0.1.2", "203.0.113.2", 1024, True),
    _case("ports, high end", (_PORTS,), "10.0.1.2", "203.0.113.2", 2047, True),
    _case("ports, one below", (_PORTS,), "10.0.1.2", "203.0.113.2", 1023, False),
    _case("ports, one above", (_PORTS,), "10.0.1.2", "203.0.113.2", 2048, False),
    _case("ports in range, address not", (_PORTS,), "10.0.1.2", "203.0.113.3", 1500, False),
    _case("port 0 in 0-0", (_b(NatKind.SNAT, "203.0.113.2", ports=(0, 0)),), "10.0.1.2", "203.0.113.2", 0,
          True),
    _case("port 1 outside 0-0", (_b(NatKind.SNAT, "203.0.113.2", ports=(0, 0)),), "10.0.1.2", "203.0.113.2",
          1, False),
    _case("port 65535 in 65535", (_b(NatKind.DNAT, "192.0.2.1", ports=(65535, 65535)),), "192.0.2.10",
          "192.0.2.1", 65535, True),
    _case("port 65534 outside 65535", (_b(NatKind.DNAT, "192.0.2.1", ports=(65535, 65535)),), "192.0.2.10",
          "192.0.2.1", 65534, False),
    # address kept, port range named (redirect to :8000-8099 on the original address)
    _case("kept address, port in range", (_KEPT_PORTS,), "192.0.2.10", "192.0.2.10", 8050, True),
    _case("kept address, port outside", (_KEPT_PORTS,), "192.0.2.10", "192.0.2.10", 5060, False),
    _case("kept port range, address changed", (_KEPT_PORTS,), "192.0.2.10", "192.0.2.11", 8050, False),
    # IPv6: values above 2**64, ranges that end inside the low bytes
    _case("v6 range, low end", (_V6,), "fd00:1::2", "2001:db8::1", 1, True),
    _case("v6 range, high end", (_V6,), "fd00:1::2", "2001:db8::ffff", 1, True),
    _case("v6 range, one below", (_V6,), "fd00:1::2", "2001:db8::", 1, False),
    _case("v6 range, one above", (_V6,), "fd00:1::2", "2001:db8::1:0", 1, False),
    _case("v6 range, low bytes fit but the prefix differs", (_V6,), "fd00:1::2", "2001:db9::1", 1, False),
    _case("v6 range in the fourth word", (_V6_HIGH,), "2001:db8::10", "2001:db8:0:1::80", 1, True),
    _case("v6 range, the same low bytes a word lower", (_V6_HIGH,), "2001:db8::10", "2001:db8::80", 1, False),
    # several bindings (ECMP, numgen, maps): any one admits
    _case("second of two admits", (_MASQ, _RANGE), "10.0.1.2", "192.0.2.100", 1, True),
    _case("neither of two admits", (_MASQ, _RANGE), "10.0.1.2", "192.0.2.200", 1, False),
    _case("port fails the first, address fits the second", (_PORTS, _b(NatKind.SNAT, "203.0.113.2")),
          "10.0.1.2", "203.0.113.2", 80, True),
    _case("none or masquerade, kept", (_MASQ, _NONE), "10.0.1.2", "10.0.1.2", 5060, True),
    _case("none or masquerade, masqueraded", (_MASQ, _NONE), "10.0.1.2", "203.0.113.2", 5060, True),
    _case("port range or another address, that address", (_PORTS, _RANGE), "10.0.1.2", "192.0.2.70", 80,
          True),
    _case("kept port range or one address, that address", (_KEPT_PORTS, _MASQ), "10.0.1.2", "203.0.113.2", 1,
          True),
    _case("none or masquerade, translated elsewhere", (_MASQ, _NONE), "10.0.1.2", "198.51.100.2", 5060,
          False),
    # the port before translation: a destination port is kept unless a range is named
    _case("no port range, port kept", (_DNAT,), "192.0.2.10", "192.0.2.1", 5060, True, 5060),
    _case("no port range, port changed", (_DNAT,), "192.0.2.10", "192.0.2.1", 5070, True, 5060, False),
    _case("no port range, port one above", (_DNAT,), "192.0.2.10", "192.0.2.1", 5061, True, 5060, False),
    _case("none, port changed", (_NONE,), "192.0.2.10", "192.0.2.10", 5070, True, 5060, False),
    _case("none, port 0 kept", (_NONE,), "192.0.2.10", "192.0.2.10", 0, True, 0),
    _case("none, port 65535 from 0", (_NONE,), "192.0.2.10", "192.0.2.10", 65535, True, 0, False),
    _case("port range, the original outside it", (_DNAT_PORTS,), "192.0.2.10", "192.0.2.1", 8050, True, 80),
    _case("port range, the original inside, the translated not", (_DNAT_PORTS,), "192.0.2.10", "192.0.2.1",
          80, False, 8050),
    _case("a range refuses the port, the second keeps it", (_DNAT_PORTS, _DNAT), "192.0.2.10", "192.0.2.1",
          80, True, 80),
    _case("a range refuses the port, the second would keep another", (_DNAT_PORTS, _DNAT), "192.0.2.10",
          "192.0.2.1", 80, True, 81, False),
    _case("a kept port refuses the changed port, a range admits it", (_DNAT, _DNAT_PORTS), "192.0.2.10",
          "192.0.2.1", 8050, True, 80),
    _case("v6 none, port kept", (_NONE,), "2001:db8::10", "2001:db8::10", 443, True, 443),
    _case("v6 none, port changed", (_NONE,), "2001:db8::10", "2001:db8::10", 444, True, 443, False),
)
