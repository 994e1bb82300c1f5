# SPDX-License-Identifier: GPL-2.0-or-later
"""core.nat's ``layout_twin`` (called directly, not at import) and ``make_nat``'s refusals.

``layout_twin(cls, names)`` promises: a plain slotted class, named
``<cls>Twin`` in ``cls``'s module, whose instance, every slot filled, becomes
a ``cls`` by ``__class__`` assignment; an ImportError naming the class when
``names`` are not ``cls``'s fields in order, or when ``cls`` is not laid out
as the twin (Python allows ``__class__`` assignment only between classes of
the same layout). The expectations follow from Python's data model, not from
the function's code.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import pytest

from topowatch.core.flow import NatKind
from topowatch.core.nat import layout_twin, make_nat

HERE = __name__


@dataclass(frozen=True, slots=True)
class Pair:
    a: int
    b: str


@dataclass(frozen=True)
class Unslotted:  # a __dict__, no slots: no slotted class shares its layout
    a: int
    b: str


def test_the_twin_builds_the_frozen_class() -> None:
    twin: Any = layout_twin(Pair, ("a", "b"))
    assert twin.__name__ == "PairTwin"
    assert twin.__module__ == HERE  # the class's module, not core.nat's
    assert twin.__slots__ == ("a", "b")
    assert not hasattr(twin(), "__dict__")
    made: Any = object.__new__(twin)
    made.a = 1
    made.b = "x"
    made.__class__ = Pair
    assert type(made) is Pair and made == Pair(1, "x") and hash(made) == hash(Pair(1, "x"))


@pytest.mark.parametrize("names", [("b", "a"), ("a",), ("a", "b", "c")])
def test_other_fields_are_refused_by_name(names: tuple[str, ...]) -> None:
    with pytest.raises(ImportError) as got:
        layout_twin(Pair, names)
    assert str(got.value) == f"{HERE}.Pair: fields ('a', 'b') != {names} (its layout twin's)"


def test_another_layout_is_refused_by_name() -> None:
    with pytest.raises(ImportError) as got:
        layout_twin(Unslotted, ("a", "b"))
    assert str(got.value).startswith(f"{HERE}.Unslotted: not laid out as its twin: ")
    assert isinstance(got.value.__cause__, TypeError)


A4, B4 = IPv4Address("10.0.0.1"), IPv4Address("10.0.0.9")
A6 = IPv6Address("2001:db8::1")


@pytest.mark.parametrize("kind", [NatKind.SNAT, NatKind.DNAT])
@pytest.mark.parametrize(("addr", "ports"), [
    ((B4, A4), None),  # reversed, two objects
    ((B4, A4), (80, 80)),
    ((A4, A6), None),  # two families
    ((IPv4Address("10.0.0.9"), IPv4Address("10.0.0.1")), (1, 65535)),
])
def test_make_nat_refuses_a_bad_address_range_as_the_class_does(kind: NatKind, addr: Any, ports: Any) -> None:
    with pytest.raises(ValueError, match="bad address range"):
        make_nat(kind, "nat", None, addr, ports)


@pytest.mark.parametrize("ports", [(80, 65536), (-1, 5), (65535, 65536)])
def test_make_nat_refuses_a_port_outside_0_to_65535_as_the_class_does(ports: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="bad port range"):
        make_nat(NatKind.DNAT, "dnat", None, (A4, A4), ports)
