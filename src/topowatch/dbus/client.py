# SPDX-License-Identifier: GPL-2.0-or-later
"""``topowatch status`` and ``topowatch trigger``: one call to the daemon over the system bus.

Decides only how an answer looks on a terminal. Every failure (no bus, no
daemon, access denied by the bus policy, a timeout) becomes one
``TopowatchError`` with a one-line message; it never retries and never
starts anything.
"""

from __future__ import annotations

import json
from typing import Any

import trio
import trio_asyncio
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from topowatch.dbus import INTERFACE, OBJECT_PATH, bus_name, system_bus_address
from topowatch.dbus.connection import BusUnreachable, connect, disconnect
from topowatch.errors import PermissionDenied, TopowatchError

CALL_TIMEOUT = 30.0

_NOT_RUNNING = {"org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner"}
_DENIED = {"org.freedesktop.DBus.Error.AccessDenied"}


class DaemonNotRunning(TopowatchError):
    """Nobody owns the daemon's name on the bus."""


async def _call(
    bus: MessageBus, name: str, member: str, signature: str = "", body: list[Any] | None = None
) -> Any:
    msg = Message(destination=name, path=OBJECT_PATH, interface=INTERFACE, member=member,
                  signature=signature, body=body or [])
    with trio.fail_after(CALL_TIMEOUT):
        reply = await trio_asyncio.aio_as_trio(bus.call)(msg)
    if reply is None:
        raise TopowatchError(f"{member}: no reply from {name}")
    if reply.message_type is MessageType.ERROR:
        text = reply.body[0] if reply.body else reply.error_name
        if reply.error_name in _NOT_RUNNING:
            raise DaemonNotRunning(
                f"the topowatch daemon is not running ({name} has no owner on the system bus)"
            )
        if reply.error_name in _DENIED:
            raise PermissionDenied(f"the bus policy does not let you call {member}: {text}; run it with sudo")
        raise TopowatchError(f"{member}: {text}")
    return reply.body[0] if reply.body else None


async def call(member: str, signature: str = "", body: list[Any] | None = None, *,
               name: str | None = None, address: str | None = None) -> Any:
    """One method call to the daemon; returns the first value of the reply."""
    name = name or bus_name()
    address = address or system_bus_address()
    result: Any = None
    error: TopowatchError | None = None
    async with trio_asyncio.open_loop():
        try:
            bus = await connect(address)
        except BusUnreachable as exc:
            error = TopowatchError(f"cannot reach the system bus: {exc}")
        else:
            try:
                result = await _call(bus, name, member, signature, body)
            except trio.TooSlowError:
                error = TopowatchError(f"{member}: no answer from {name} within {CALL_TIMEOUT:.0f} s")
            except TopowatchError as exc:
                error = exc
            finally:
                await disconnect(bus)
    # Raised out here: inside the loop's nursery it would arrive wrapped in an ExceptionGroup.
    if error is not None:
        raise error
    return result


def render_status(status: dict[str, Any]) -> str:
    lines = [
        f"topowatch {status.get('version', '?')} (pid {status.get('pid', '?')}) "
        f"on the bus as {status.get('name')}",
        f"up {status.get('uptime_s', 0):.0f} s{', dry run' if status.get('dry_run') else ''}",
        f"reactions {status.get('reactions', 0)}, deleted {status.get('deleted_total', 0)} "
        f"(already gone {status.get('already_gone_total', 0)}, failed {status.get('failed_total', 0)}, "
        f"kept as replied since the dump {status.get('kept_replied_total', 0)}), "
        f"refused {status.get('refused_total', 0)}, undecided in the last {status.get('undecided', 0)}, "
        f"source restarts {status.get('source_restarts', 0)}",
    ]
    last = status.get("last_reaction")
    lines.append(f"last: {last['summary']}" if last else "last: no reaction yet")
    return "\n".join(lines)


async def status_main(as_json: bool) -> int:
    text = await call("Status")
    try:
        status = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise TopowatchError(f"Status: the daemon answered something that is not JSON: {exc}") from exc
    print(json.dumps(status, indent=2) if as_json else render_status(status))
    return 0


async def trigger_main(interface: str | None, as_json: bool = False) -> int:
    await call("Trigger", "s", [interface or ""])
    if as_json:
        print(json.dumps({"requested": True, "interface": interface}))
    else:
        print(f"reaction requested{f' for {interface}' if interface else ''}")
    return 0
