# SPDX-License-Identifier: GPL-2.0-or-later
"""NetworkManager as an event source: device and active-connection (VPN included) state changes.

Theory of operation: one bus connection (its own trio-asyncio loop) with
three match rules, all with ``sender='org.freedesktop.NetworkManager'``:
``Device.StateChanged``, ``Connection.Active.StateChanged`` and
``VPN.Connection.VpnStateChanged``. The bus applies a well-known-name sender
to whoever owns it when a signal is sent, so the rules hold across NM
restarts and NM may start after us. A signal into a settled state (tables
below) becomes a ``Trigger`` (source and kind ``networkmanager``) naming the
device or connection, resolved by a Properties.Get on the signal's object
(cached; the object path stands in when NM does not answer within a second).

Rules: NM absent or the bus absent is not an error: the source idles quietly
(debug-level log only; the D-Bus service already said the bus is gone) and
reconnects with back-off. Intermediate states (prepare, config, need-auth)
trigger nothing: the settled state that follows does, and the reactor
debounces the rest. This module never calls a mutating NM method and never
decides whether a change matters beyond its state table.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import trio
import trio_asyncio
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from topowatch.dbus import system_bus_address
from topowatch.dbus.connection import Backoff, stay_connected, wait_disconnected
from topowatch.sources import Trigger

log = logging.getLogger("topowatch.networkmanager")

NM_NAME = "org.freedesktop.NetworkManager"
DEVICE = "org.freedesktop.NetworkManager.Device"
ACTIVE = "org.freedesktop.NetworkManager.Connection.Active"
VPN = "org.freedesktop.NetworkManager.VPN.Connection"
PROPERTIES = "org.freedesktop.DBus.Properties"

# NMDeviceState values that end a transition: the topology has settled.
DEVICE_STATES: dict[int, str] = {
    10: "unmanaged",
    20: "unavailable",
    30: "disconnected",
    100: "activated",
    120: "failed",
}
# NMActiveConnectionState
ACTIVE_STATES: dict[int, str] = {2: "activated", 4: "deactivated"}
# NMVpnConnectionState
VPN_STATES: dict[int, str] = {5: "activated", 6: "failed", 7: "disconnected"}


@dataclass(frozen=True, slots=True)
class Watched:
    interface: str
    member: str
    states: dict[int, str]
    what: str


WATCHED: tuple[Watched, ...] = (
    Watched(DEVICE, "StateChanged", DEVICE_STATES, "device"),
    Watched(ACTIVE, "StateChanged", ACTIVE_STATES, "connection"),
    Watched(VPN, "VpnStateChanged", VPN_STATES, "VPN"),
)
_BY_SIGNAL = {(w.interface, w.member): w for w in WATCHED}


def match_rule(w: Watched) -> str:
    return f"type='signal',sender='{NM_NAME}',interface='{w.interface}',member='{w.member}'"


@dataclass(frozen=True, slots=True)
class NmSignal:
    watched: Watched
    path: str
    state: int


NM_BACKOFF = Backoff(first=1.0, maximum=60.0)


class NetworkManagerSource:
    """An ``EventSource`` (name ``networkmanager``) for the reactor."""

    name = "networkmanager"

    def __init__(self, address: str | None = None, backoff: Backoff = NM_BACKOFF) -> None:
        self.address = address or system_bus_address()
        self.backoff = backoff
        self.subscribed = trio.Event()  # set once the match rules are in place (tests wait on it)
        self._names: dict[str, str] = {}

    @contextlib.asynccontextmanager
    async def events(self) -> AsyncIterator[AsyncIterator[Trigger]]:
        send, recv = trio.open_memory_channel[Trigger](64)
        async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
            nursery.start_soon(self._watch, send)
            try:
                yield recv
            finally:
                nursery.cancel_scope.cancel()

    async def _watch(self, send: trio.MemorySendChannel[Trigger]) -> None:
        async def session(bus: MessageBus) -> None:
            await self._session(bus, send)

        await stay_connected(self.address, session, what="NetworkManager watch", log=log,
                             backoff=self.backoff, quiet=True)

    async def _session(self, bus: MessageBus, send: trio.MemorySendChannel[Trigger]) -> None:
        raw_in, raw_out = trio.open_memory_channel[NmSignal](256)

        def handler(msg: Message) -> None:
            if msg.message_type is not MessageType.SIGNAL:
                return
            watched = _BY_SIGNAL.get((msg.interface or "", msg.member or ""))
            if watched is None or not msg.body or not isinstance(msg.body[0], int):
                return
            try:
                raw_in.send_nowait(NmSignal(watched, msg.path or "", msg.body[0]))
            except trio.WouldBlock:
                log.warning("NetworkManager: signals arrive faster than they are read; one dropped")

        bus.add_message_handler(handler)
        try:
            for w in WATCHED:
                await self._call(bus, Message(
                    destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                    interface="org.freedesktop.DBus", member="AddMatch", signature="s", body=[match_rule(w)],
                ))
            self._names.clear()  # object paths are NM's; a new connection may mean a new NM
            log.debug("NetworkManager: subscribed to device and connection state changes")
            self.subscribed.set()
            async with trio.open_nursery() as nursery:

                async def translate() -> None:
                    async for signal in raw_out:
                        trigger = await self._trigger(bus, signal)
                        if trigger is not None:
                            await send.send(trigger)

                nursery.start_soon(translate)
                await wait_disconnected(bus)
                nursery.cancel_scope.cancel()
        finally:
            self.subscribed = trio.Event()
            bus.remove_message_handler(handler)

    async def _call(self, bus: MessageBus, msg: Message) -> Any:
        reply = await trio_asyncio.aio_as_trio(bus.call)(msg)
        if reply is None or reply.message_type is MessageType.ERROR:
            raise LookupError(reply.error_name if reply is not None else "no reply")
        return reply.body

    async def _get(self, bus: MessageBus, path: str, iface: str, prop: str) -> Any:
        body = await self._call(bus, Message(destination=NM_NAME, path=path, interface=PROPERTIES,
                                             member="Get", signature="ss", body=[iface, prop]))
        return body[0].value

    async def _describe(self, bus: MessageBus, signal: NmSignal) -> tuple[str, str | None]:
        """A readable name for the object, and the kernel interface it concerns (if known).

        Read fresh each time (a modem's IP interface exists only while it is up);
        an object NM has already removed (a deactivated connection) keeps the
        name it had last time.
        """
        name: str | None = None
        ifname: str | None = None
        with trio.move_on_after(1.0):
            try:
                if signal.watched.interface == DEVICE:
                    ifname = str(await self._get(bus, signal.path, DEVICE, "IpInterface")) or None
                    name = ifname or str(await self._get(bus, signal.path, DEVICE, "Interface")) or None
                else:
                    conn_id = str(await self._get(bus, signal.path, ACTIVE, "Id"))
                    conn_type = str(await self._get(bus, signal.path, ACTIVE, "Type"))
                    name = f"'{conn_id}' ({conn_type})"
            except (LookupError, OSError, ValueError, AttributeError) as exc:
                log.debug("NetworkManager: cannot read %s: %s", signal.path, exc)
        if name is None:
            name = self._names.get(signal.path, signal.path)
        else:
            if len(self._names) > 1024:
                self._names.clear()
            self._names[signal.path] = name
        return name, ifname

    async def _trigger(self, bus: MessageBus, signal: NmSignal) -> Trigger | None:
        state = signal.watched.states.get(signal.state)
        if state is None:
            log.debug("NetworkManager: %s %s entered state %d (not settled)", signal.watched.what,
                      signal.path, signal.state)
            return None
        name, ifname = await self._describe(bus, signal)
        description = f"NetworkManager: {signal.watched.what} {name} {state}"
        return Trigger(self.name, description, kind="networkmanager", interface=ifname)


def networkmanager_source(address: str | None = None) -> NetworkManagerSource:
    return NetworkManagerSource(address)
