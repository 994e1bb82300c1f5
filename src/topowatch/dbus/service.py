# SPDX-License-Identifier: GPL-2.0-or-later
"""The daemon's D-Bus face: ``io.github.topowatch.Agent1`` on the system bus.

Theory of operation: ``AgentService.run`` opens a trio-asyncio loop, stays
connected to the system bus (``connection.stay_connected``), owns the
well-known name (``bus_name()``: one daemon per network namespace) and
exports ``AgentInterface`` at ``/io/github/topowatch``. dbus-fast calls the
methods on the asyncio side; each one crosses back into trio
(``trio_asyncio.trio_as_aio``) before it touches the reactor. Signals go the
other way through a bounded queue that a trio task drains onto the bus, so the
reactor never waits for D-Bus and a missing bus only drops signals.

Methods (JSON travels as one string, the same contracts as the CLI):

- ``Trigger(s interface)``: push a trigger into the reactor ('' = all interfaces);
- ``TriggerEvent(s kind, s interface, s detail)``: the same, for hooks that
  know what happened (``dispatcher``, ``networkmanager``, ``link`` ...), so
  policies select on the kind. Both ask for a full judgement: topology and
  ruleset read again, every eligible entry judged;
- ``Plan() -> s``: a dry run now, JSON as ``topowatch plan --json``;
- ``Reload() -> s``: reload policies through the hook the daemon supplies
  (``policy_reload``: the files are read in a worker thread, never on the loop);
- ``Status() -> s``: counters as JSON (see ``status_json``);
- signal ``Reacted(s summary)`` after each reaction (JSON, see ``reaction_json``);
- signal ``Pressure(s summary)`` when table pressure starts and ends (JSON:
  ``event`` start|end, ``fill``, ``summary``; see ``topowatch.pressure``).
  ``AgentService.emit(member, signature, *body)`` sends any other signal from
  the same object (declare it on ``AgentInterface`` for introspection).

A daemon whose network namespace lost its name (``netnswatch``) answers
every call with ``io.github.topowatch.Error.Gone`` and stops; a daemon that
finds its name taken calls the owner's Status once, so such an orphan finds
out and releases the name for the next attempt.

Who may call what is the bus's decision, in ``contrib/dbus/io.github.topowatch.conf``.
This module never decides staleness, never deletes by itself (Trigger only
asks the reactor; Plan is a dry run) and never lets a D-Bus problem stop
the daemon.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import trio
import trio_asyncio
from dbus_fast import DBusError, Message, MessageType, NameFlag, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusSignature, DBusStr
from dbus_fast.service import ServiceInterface, dbus_method, dbus_signal

from topowatch import __version__
from topowatch.dbus import ERROR_PREFIX, INTERFACE, OBJECT_PATH, bus_name, system_bus_address
from topowatch.dbus.connection import DEFAULT_BACKOFF, Backoff, stay_connected, wait_disconnected
from topowatch.errors import TopowatchError, UsageError
from topowatch.policy import RELOAD_TIMEOUT, PolicyStore
from topowatch.pressure import PressureAgent, PressureEvent
from topowatch.reactor import Reaction, Reactor, plan_once
from topowatch.report import plan_json
from topowatch.sources import Trigger

log = logging.getLogger("topowatch.dbus")

SIGNAL_QUEUE = 256
OWNER_CALL_TIMEOUT = 2.0
# Kinds a hook may name in TriggerEvent (the policy trigger kinds, plus a plain request).
TRIGGER_KINDS = frozenset(
    {"request", "link", "address", "route", "rule", "xfrm", "ruleset", "networkmanager", "dispatcher"}
)
_IFNAME = re.compile(r"[^/\s:]{1,15}")

# A method that returns nothing (dbus-fast reads a plain "-> None" as a missing signature).
NoReply = Annotated[None, DBusSignature("")]
ReloadHook = Callable[[], "str | Awaitable[str]"]


class NotSupported(TopowatchError):
    """The daemon was started without what this request needs."""


class NamespaceGone(TopowatchError):
    """The daemon's network namespace lost its name (``ip netns del``): it is stopping."""


def check_interface(name: str) -> str | None:
    """An interface name as the kernel accepts it ('' means all: None)."""
    if name == "":
        return None
    if not _IFNAME.fullmatch(name) or name in {".", ".."}:
        raise UsageError(f"not an interface name: {name!r}")
    return name


def reaction_json(reaction: Reaction) -> dict[str, Any]:
    """The Reacted signal's payload: the reaction's log record plus its one-line summary."""
    return {**reaction.fields(), "summary": reaction.summary()}


def status_json(reactor: Reactor, *, name: str, started: float, now: float) -> dict[str, Any]:
    """Counters over the daemon's life; ``started``/``now`` are monotonic seconds."""
    totals = reactor.totals  # the history is bounded; these count every reaction
    last = reactor.reactions[-1] if reactor.reactions else None
    return {
        "name": name,
        "version": __version__,
        "pid": os.getpid(),
        "uptime_s": round(now - started, 3),
        "dry_run": reactor.config.dry_run,
        "reactions": totals.reactions,
        "deleted_total": totals.deleted,
        "already_gone_total": totals.already_gone,
        "kept_replied_total": totals.kept_replied,
        "failed_total": totals.failed,
        "refused_total": totals.refused,
        "stale_total": totals.stale,
        "undecided": last.undecided_count if last else 0,
        "undecided_total": totals.undecided,
        "source_restarts": reactor.source_restarts,
        "last_reaction": reaction_json(last) if last else None,
    }


async def dry_run_plan(reactor: Reactor) -> dict[str, Any]:
    """What ``topowatch plan --json`` prints, computed with the daemon's backend and policies."""
    selection = reactor.policy().select([("request", None)])
    backend = reactor.backend
    async with reactor.lock:  # one kernel conversation at a time: reactions use the same sockets
        start = time.monotonic()
        topology = await backend.topology()
        ruleset = await backend.ruleset()
        entries = await backend.entries(selection.eligibility) if selection.policies else []
    plan = plan_once(topology, ruleset, entries, selection.eligibility, reactor.predictor)
    return plan_json(plan, time.monotonic() - start)


def _dbus_error(exc: TopowatchError) -> DBusError:
    kinds = {UsageError: "InvalidArgs", NotSupported: "NotSupported", NamespaceGone: "Gone"}
    kind = kinds.get(type(exc), "Failed")
    return DBusError(f"{ERROR_PREFIX}.{kind}", str(exc))


class AgentInterface(ServiceInterface):
    """The exported methods; each one hands over to ``AgentService`` in trio."""

    def __init__(self, agent: AgentService) -> None:
        super().__init__(INTERFACE)
        self._agent = agent

    async def _in_trio(self, fn: Callable[..., Awaitable[str]], *args: Any) -> str:
        try:
            result: str = await trio_asyncio.trio_as_aio(self._agent.serve)(fn, *args)
        except TopowatchError as exc:
            raise _dbus_error(exc) from exc
        return result

    @dbus_method()
    async def Trigger(self, interface: DBusStr) -> NoReply:
        await self._in_trio(self._agent.trigger, "request", interface, "")

    @dbus_method()
    async def TriggerEvent(self, kind: DBusStr, interface: DBusStr, detail: DBusStr) -> NoReply:
        await self._in_trio(self._agent.trigger, kind, interface, detail)

    @dbus_method()
    async def Plan(self) -> DBusStr:
        return await self._in_trio(self._agent.plan)

    @dbus_method()
    async def Reload(self) -> DBusStr:
        return await self._in_trio(self._agent.reload)

    @dbus_method()
    async def Status(self) -> DBusStr:
        return await self._in_trio(self._agent.status)

    @dbus_signal()
    def Reacted(self, summary: DBusStr) -> DBusStr:
        return summary

    @dbus_signal()
    def Pressure(self, summary: DBusStr) -> DBusStr:
        return summary


def policy_reload(store: PolicyStore, *, changed: Callable[[], None] | None = None,
                  timeout: float = RELOAD_TIMEOUT) -> ReloadHook:
    """The Reload method for a daemon's policy store: the files are read off the event loop.

    ``PolicyStore.reload_in_worker`` reads them in a worker thread within
    ``timeout`` s, so events, the watchdog and other calls go on meanwhile; a
    mistake in them, or a read too slow, is the caller's D-Bus error and the
    previous policy stays. ``changed`` runs once a new policy is in force.
    """

    async def reload() -> str:
        policy = await store.reload_in_worker(timeout)
        if changed is not None:
            changed()
        names = ", ".join(p.name for p in policy.policies)
        log.info("policies reloaded over D-Bus: %s", names)
        return f"policies reloaded: {names}"

    return reload


class AgentService:
    """Serves one reactor on the system bus for as long as ``run`` runs; reconnects by itself."""

    def __init__(
        self,
        reactor: Reactor,
        *,
        reload: ReloadHook | None = None,
        name: str | None = None,
        address: str | None = None,
        backoff: Backoff = DEFAULT_BACKOFF,
        pressure: PressureAgent | None = None,
        guard: Callable[[], bool] | None = None,
    ) -> None:
        self.reactor = reactor
        # Asked before each call is served: False once the daemon's namespace lost its name.
        self.guard = guard
        self.pressure = pressure
        self.reload_hook = reload
        self.name = name or bus_name()
        self.address = address or system_bus_address()
        self.backoff = backoff
        self.interface = AgentInterface(self)
        self.started = time.monotonic()
        self.connected = trio.Event()  # set while the name is ours (tests and status wait on it)
        self.signals_dropped = 0
        self._bus: MessageBus | None = None
        self._signals_in, self._signals_out = trio.open_memory_channel[Message](SIGNAL_QUEUE)
        reactor.reaction_hooks.append(self._reacted)
        if pressure is not None:
            pressure.hooks.append(self._pressure)

    # -- trio side of the methods ------------------------------------------------

    async def serve(self, fn: Callable[..., Awaitable[str]], *args: Any) -> str:
        if self.guard is not None and not self.guard():
            raise NamespaceGone(f"this daemon's network namespace is gone; {self.name} is being released")
        return await fn(*args)

    async def trigger(self, kind: str, interface: str, detail: str) -> str:
        if kind not in TRIGGER_KINDS:
            raise UsageError(f"unknown trigger kind {kind!r} (one of {', '.join(sorted(TRIGGER_KINDS))})")
        ifname = check_interface(interface)
        if len(detail) > 200 or not detail.isprintable():
            raise UsageError("detail must be printable and at most 200 characters")
        what = f"D-Bus {kind}" + (f" for {ifname}" if ifname else "") + (f": {detail}" if detail else "")
        # A full judgement, as after lost events: a hook or an admin asks because something changed
        # that the kernel's events may not show (a VPN's firewall script, a legacy table), so the
        # ruleset is read again even for a topology kind such as xfrm.
        self.reactor.push(Trigger("dbus", what, overrun=True, kind=kind, interface=ifname))
        log.info("%s", what)
        return ""

    async def plan(self) -> str:
        return json.dumps(await dry_run_plan(self.reactor))

    async def reload(self) -> str:
        if self.reload_hook is None:
            raise NotSupported("this daemon has no policy store to reload")
        result = self.reload_hook()
        if inspect.isawaitable(result):
            result = await result
        return str(result)

    async def status(self) -> str:
        obj = status_json(self.reactor, name=self.name, started=self.started, now=time.monotonic())
        obj["signals_dropped"] = self.signals_dropped
        if self.pressure is not None:
            obj["pressure"] = self.pressure.status()
        return json.dumps(obj)

    # -- signals --------------------------------------------------------------------

    def _reacted(self, reaction: Reaction) -> None:
        self.emit("Reacted", "s", json.dumps(reaction_json(reaction)))

    def _pressure(self, event: PressureEvent) -> None:
        if event.kind in ("start", "end"):  # evictions and timeouts are in the log and the metrics
            self.emit("Pressure", "s", json.dumps({"event": event.kind, "fill": round(event.fill, 4),
                                                   "summary": event.summary}))

    def emit(self, member: str, signature: str, *body: Any) -> None:
        """Queue a signal from our object; never blocks, drops (and counts) when no bus or queue full."""
        if self._bus is None:
            self.signals_dropped += 1
            return
        msg = Message(message_type=MessageType.SIGNAL, path=OBJECT_PATH, interface=INTERFACE,
                      member=member, signature=signature, body=list(body))
        try:
            self._signals_in.send_nowait(msg)
        except trio.WouldBlock:
            self.signals_dropped += 1

    async def _send_signals(self, bus: MessageBus) -> None:
        async for msg in self._signals_out:
            await trio_asyncio.aio_as_trio(bus.send)(msg)

    # -- the connection ---------------------------------------------------------------

    async def _session(self, bus: MessageBus) -> None:
        bus.export(OBJECT_PATH, self.interface)
        reply = await trio_asyncio.aio_as_trio(bus.request_name)(self.name, NameFlag.DO_NOT_QUEUE)
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            await self._call_owner(bus)
            raise NotSupported(
                f"{self.name} is already owned on the bus (another topowatch in this namespace, or the "
                "daemon of a namespace deleted since, which was asked to step aside)"
            )
        log.info("D-Bus: serving %s on %s", self.name, self.address)
        self._bus = bus
        self.connected.set()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_signals, bus)
                await wait_disconnected(bus)
                nursery.cancel_scope.cancel()
        finally:
            self._bus = None
            self.connected = trio.Event()
            while True:  # signals queued for a bus that went away are not news on the next one
                try:
                    self._signals_out.receive_nowait()
                except trio.WouldBlock:
                    break
                self.signals_dropped += 1
            bus.unexport(OBJECT_PATH, self.interface)

    async def _call_owner(self, bus: MessageBus) -> None:
        """Call Status on the owner of our name once: an orphan whose namespace is gone then stops."""
        msg = Message(destination=self.name, path=OBJECT_PATH, interface=INTERFACE, member="Status")
        with trio.move_on_after(OWNER_CALL_TIMEOUT):
            await trio_asyncio.aio_as_trio(bus.call)(msg)  # the answer (or error) does not matter

    async def run(self) -> None:
        async with trio_asyncio.open_loop():
            await stay_connected(self.address, self._session, what="D-Bus", log=log, backoff=self.backoff)
