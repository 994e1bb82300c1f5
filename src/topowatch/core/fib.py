"""A userspace FIB lookup that mirrors the kernel's (INTERFACE STUB: being implemented).

Decides, for a flow and a topology snapshot, where the flow enters and where it
leaves: policy rules by priority with their selectors, then the longest prefix
in each table, metric order, route types. Multipath answers several egresses
("ambiguous"). Anything it does not model answers ``Unknown``. It never
performs I/O.
"""

from __future__ import annotations

from topowatch.core.flow import Egress, Flow, Ingress, Unknown
from topowatch.core.model import IPAddress, Topology


class Fib:
    """Lookups over one ``Topology`` snapshot (indexes are built once)."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology

    def lookup(
        self,
        dst: IPAddress,
        *,
        src: IPAddress | None = None,
        iifname: str | None = None,
        oifname: str | None = None,
        mark: int | None = 0,
        tos: int = 0,
    ) -> tuple[Egress, ...] | Unknown:
        """Route ``dst`` as the kernel would; several egresses for multipath."""
        raise NotImplementedError

    def ingress(self, flow: Flow) -> Ingress | Unknown:
        """Where the flow's first packet entered: local if its source is ours, else reverse path."""
        raise NotImplementedError

    def egress(self, flow: Flow, ingress: Ingress) -> tuple[Egress, ...] | Unknown:
        """Where the flow (after any DNAT, passed in ``flow``) leaves."""
        raise NotImplementedError

    def is_local(self, addr: IPAddress) -> bool:
        raise NotImplementedError

    def redirect_address(self, family: int, ingress: Ingress) -> IPAddress | None:
        """The address REDIRECT picks: the input interface's first primary address, loopback for local."""
        raise NotImplementedError
