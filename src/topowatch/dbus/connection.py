# SPDX-License-Identifier: GPL-2.0-or-later
"""Staying connected to a bus from trio: connect, back off, reconnect, say so once.

Theory of operation: dbus-fast's asyncio ``MessageBus`` runs on a trio-asyncio
loop opened by the caller (``trio_asyncio.open_loop()``). ``stay_connected``
connects, hands the bus to the caller's ``session`` coroutine (trio), and
when the bus goes away (or never was there) retries with a bounded
exponential back-off. An outage is logged once when it starts and once when
it ends, never per retry.

This module never decides what to do on the bus (its callers do) and never
lets a library error escape as anything but a retry or a ``TopowatchError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio
import trio_asyncio
from dbus_fast import AuthError, DBusError, InvalidAddressError
from dbus_fast.aio import MessageBus

from topowatch.errors import TopowatchError


class BusUnreachable(TopowatchError):
    """No bus answers at the address (no socket, refused, authentication failed)."""


# What a failed connect raises: no socket, refused, wrong address, auth refused, closed early.
CONNECT_ERRORS = (OSError, EOFError, AuthError, InvalidAddressError, DBusError, asyncio.TimeoutError)


@dataclass(frozen=True, slots=True)
class Backoff:
    first: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0

    def delays(self) -> Callable[[], float]:
        state = {"next": self.first}

        def step() -> float:
            delay = state["next"]
            state["next"] = min(delay * self.factor, self.maximum)
            return delay

        return step


DEFAULT_BACKOFF = Backoff()


async def connect(address: str, timeout: float = 5.0) -> MessageBus:
    """One attempt; must run inside ``trio_asyncio.open_loop()``."""
    bus = MessageBus(bus_address=address)
    try:
        with trio.fail_after(timeout):
            connected: MessageBus = await trio_asyncio.aio_as_trio(bus.connect)()
            return connected
    except (*CONNECT_ERRORS, trio.TooSlowError) as exc:
        bus.disconnect()
        raise BusUnreachable(f"no bus at {address} ({exc or type(exc).__name__})") from exc


async def disconnect(bus: MessageBus, timeout: float = 2.0) -> None:
    """Close the connection and wait until dbus-fast has let go of the socket (shielded)."""
    with trio.CancelScope(shield=True), trio.move_on_after(timeout):
        if bus.connected:
            bus.disconnect()
        await wait_disconnected(bus)


async def wait_disconnected(bus: MessageBus) -> None:
    """Return when the bus connection is gone, whatever the reason (never raises for it)."""
    done = trio.Event()

    async def waiter() -> None:
        # A dropped connection reports its cause here; the caller only needs "gone".
        with contextlib.suppress(Exception):
            await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]

    def finished(_: asyncio.Future[None]) -> None:
        done.set()

    loop = trio_asyncio.current_loop.get()
    task = loop.create_task(waiter())
    task.add_done_callback(finished)
    try:
        await done.wait()
    finally:
        if not task.done():
            task.cancel()


async def stay_connected(
    address: str,
    session: Callable[[MessageBus], Awaitable[None]],
    *,
    what: str,
    log: logging.Logger,
    backoff: Backoff = DEFAULT_BACKOFF,
    quiet: bool = False,
) -> None:
    """Run ``session(bus)`` whenever the bus is up, forever; ``quiet`` logs outages at debug level."""
    delay = backoff.delays()
    down_reported = False
    refused: str | None = None
    outage_level = logging.DEBUG if quiet else logging.WARNING
    while True:
        try:
            bus = await connect(address)
        except BusUnreachable as exc:
            if not down_reported:
                log.log(outage_level, "%s: %s; running on without it, will reconnect when it appears",
                        what, exc)
                down_reported = True
            await trio.sleep(delay())
            continue
        failure: str | None = None
        try:
            log.debug("%s: connected to %s", what, address)
            if not refused:
                down_reported = False
                delay = backoff.delays()
            await session(bus)
        except (*CONNECT_ERRORS, TopowatchError) as exc:
            failure = str(exc) or type(exc).__name__
        finally:
            await disconnect(bus)
        if failure is not None:
            # Refused on the bus (name taken, policy denies it): say so once per distinct reason.
            if failure != refused:
                log.error("%s: %s; will retry", what, failure)
            refused = failure
        elif not down_reported:
            refused = None
            log.log(outage_level, "%s: lost the bus at %s; running on without it, will reconnect",
                    what, address)
            down_reported = True
        await trio.sleep(delay())
