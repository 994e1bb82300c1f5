"""D-Bus: the agent service, the NetworkManager source and the CLI clients, on a real private bus.

Every test runs its own ``dbus-daemon`` on a socket in a fresh temporary
directory and points ``DBUS_SYSTEM_BUS_ADDRESS`` at it; an autouse fixture
points it at a socket that does not exist otherwise, so nothing here ever
talks to the host's system bus. The fake NetworkManager is a dbus-fast
service at NM's own name and object paths, emitting real signals.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Annotated, Any, cast

import pytest
import trio
from hypothesis import assume, given
from hypothesis import strategies as st

pytest.importorskip("dbus_fast")
trio_asyncio = pytest.importorskip("trio_asyncio")

import jsonschema  # noqa: E402
from dbus_fast import Message, MessageType  # noqa: E402
from dbus_fast.aio import MessageBus  # noqa: E402
from dbus_fast.annotations import DBusSignature, DBusStr  # noqa: E402
from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_property, dbus_signal  # noqa: E402

from topowatch import dbus as twdbus  # noqa: E402
from topowatch.core.conntrack import IPS_CONFIRMED, IPS_SRC_NAT_DONE, CtTuple, Entry  # noqa: E402
from topowatch.core.decide import Decider  # noqa: E402
from topowatch.core.eligibility import Eligibility  # noqa: E402
from topowatch.core.fib import Fib  # noqa: E402
from topowatch.core.flow import NO_NAT, Binding, Flow, NatKind, Prediction  # noqa: E402
from topowatch.core.model import AF_INET, Link, Route, Topology  # noqa: E402
from topowatch.core.nat import NatRuleset  # noqa: E402
from topowatch.dbus.connection import Backoff, connect, disconnect  # noqa: E402
from topowatch.dbus.networkmanager import ACTIVE, DEVICE, NM_NAME, VPN, NetworkManagerSource  # noqa: E402
from topowatch.dbus.service import AgentService, check_interface, policy_reload  # noqa: E402
from topowatch.errors import UsageError  # noqa: E402
from topowatch.netns import Namespace  # noqa: E402
from topowatch.policy import EffectivePolicy, PolicyStore  # noqa: E402
from topowatch.reactor import DeleteCounts, EventSource, Reactor, ReactorConfig, StillStale, Trigger  # noqa: E402

DBUS_DAEMON = shutil.which("dbus-daemon")
DBUS_SEND = shutil.which("dbus-send")
pytestmark = pytest.mark.skipif(DBUS_DAEMON is None, reason="needs dbus-daemon")

ROOT = Path(__file__).resolve().parent.parent
POLICY_FILE = ROOT / "contrib" / "dbus" / "io.github.topowatch.conf"
SCHEMA = json.loads((ROOT / "src" / "topowatch" / "schema" / "plan.schema.json").read_text())
FAST = Backoff(first=0.05, maximum=0.2)

SESSION_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""

# The system bus's default policy (as /usr/share/dbus-1/system.conf), plus our policy file.
SYSTEM_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"""


class PrivateBus:
    """A dbus-daemon of our own; ``start``/``stop`` may be called again (reconnection tests)."""

    def __init__(self, template: str = SESSION_CONF, **fmt: str) -> None:
        self.dir = tempfile.mkdtemp(prefix="twbus-", dir="/tmp")  # short: sun_path holds 108 bytes
        os.chmod(self.dir, 0o755)  # the policy test connects as nobody
        self.socket = os.path.join(self.dir, "bus.sock")
        self.address = f"unix:path={self.socket}"
        self.conf = os.path.join(self.dir, "bus.conf")
        Path(self.conf).write_text(template.format(socket=self.socket, **fmt))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        read, write = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [cast(str, DBUS_DAEMON), f"--config-file={self.conf}", "--nofork", f"--print-address={write}"],
                pass_fds=(write,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            os.close(write)
            write = -1
            with os.fdopen(read, "rb") as pipe:
                read = -1
                line = pipe.readline()  # written once the socket listens
            assert line.startswith(b"unix:"), line
        finally:
            for fd in (read, write):
                if fd >= 0:
                    os.close(fd)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=5)
            self.proc = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_host_bus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/topowatch-test-bus")


@pytest.fixture
def private_bus(monkeypatch: pytest.MonkeyPatch) -> Iterator[PrivateBus]:
    bus = PrivateBus()
    bus.start()
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
    try:
        yield bus
    finally:
        bus.close()


# -- a reactor on a fake backend --------------------------------------------------------


def udp_entry(sport: int) -> Entry:
    src, dst = IPv4Address("10.0.1.2"), IPv4Address("192.0.2.10")
    return Entry(AF_INET, 17, CtTuple(src, dst, sport, 5060), CtTuple(dst, src, 5060, sport),
                 status=IPS_CONFIRMED | IPS_SRC_NAT_DONE)


UP2 = Topology(links=(Link(1, "lo"), Link(2, "up1"), Link(3, "up2")), routes=(Route(IPv4Network("0.0.0.0/0")),))


class FakeBackend:
    def __init__(self, sources: Sequence[EventSource] = ()) -> None:
        self.table = [udp_entry(5060), udp_entry(5061)]
        self.deleted: list[Entry] = []
        self._sources = sources

    def sources(self) -> Sequence[EventSource]:
        return self._sources

    async def topology(self) -> Topology:
        return UP2

    async def ruleset(self) -> NatRuleset:
        return NatRuleset()

    async def entries(self, eligibility: Eligibility) -> list[Entry]:
        return [e for e in self.table if eligibility.admits(e)]

    async def judge(
        self, eligibility: Eligibility, decider: Callable[[Any], Decider], early: Any = None
    ) -> Decider:
        """Every listed entry, added to one decider (``reactor.Backend.judge``)."""
        judging = decider(None)
        for e in await self.entries(eligibility):
            judging.add(e)
        return judging

    async def delete(self, entries: Sequence[Entry], still: StillStale) -> DeleteCounts:
        self.deleted.extend(entries)
        self.table = [e for e in self.table if e not in entries]
        return DeleteCounts(deleted=len(entries))


def masquerade_everything(ruleset: Any, fib: Fib, flow: Flow) -> Prediction:
    snat = frozenset({Binding(NatKind.MASQUERADE, IPv4Address("203.0.113.2"))})
    return Prediction(dnat=frozenset({NO_NAT}), snat=snat, egress=())


def make_reactor(backend: FakeBackend) -> Reactor:
    config = ReactorConfig(startup_sweep=False, debounce=0.05, max_wait=0.5, restart_backoff=0.05)
    return Reactor(backend, config, predictor=masquerade_everything)


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


@contextlib.asynccontextmanager
async def client(address: str) -> AsyncIterator[MessageBus]:
    async with trio_asyncio.open_loop():
        bus = await connect(address)
        try:
            yield bus
        finally:
            await disconnect(bus)


async def call(bus: MessageBus, member: str, signature: str = "", body: list[Any] | None = None,
               name: str = twdbus.BUS_NAME) -> Message:
    msg = Message(destination=name, path=twdbus.OBJECT_PATH, interface=twdbus.INTERFACE, member=member,
                  signature=signature, body=body or [])
    reply: Message = await trio_asyncio.aio_as_trio(bus.call)(msg)
    return reply


async def add_match(bus: MessageBus, rule: str) -> None:
    reply = await trio_asyncio.aio_as_trio(bus.call)(Message(
        destination="org.freedesktop.DBus", path="/org/freedesktop/DBus", interface="org.freedesktop.DBus",
        member="AddMatch", signature="s", body=[rule]))
    assert reply.message_type is MessageType.METHOD_RETURN


@contextlib.asynccontextmanager
async def agent(address: str, reactor: Reactor, **kwargs: Any) -> AsyncIterator[AgentService]:
    service = AgentService(reactor, name=twdbus.BUS_NAME, address=address, backoff=FAST, **kwargs)
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        nursery.start_soon(service.run)
        with trio.fail_after(5):
            await service.connected.wait()
        yield service
        nursery.cancel_scope.cancel()


# -- names ------------------------------------------------------------------------------


def test_bus_name_outside_init_namespace(tmp_path: Path) -> None:
    own, init, run = tmp_path / "self", tmp_path / "init", tmp_path / "netns"
    own.write_text("")
    init.write_text("")
    run.mkdir()
    assert twdbus.netns_suffix(str(own), str(own), str(run)) is None  # same namespace as PID 1
    assert twdbus.netns_suffix(str(own), str(init), str(run)) == f"inode_{own.stat().st_ino}"
    os.link(own, run / "lab-uplink.1")  # what `ip netns add` leaves: a bind mount of the namespace
    assert twdbus.netns_suffix(str(own), str(init), str(run)) == "netns_lab_2duplink_2e1"
    assert twdbus.bus_name("netns_lab_2duplink_2e1") == "io.github.topowatch.netns_lab_2duplink_2e1"
    assert twdbus.bus_name("") == "io.github.topowatch"


def test_bus_names_of_namespaces_are_unambiguous() -> None:
    # ns-x and ns_x were both "netns_ns_x": the second daemon ran without D-Bus, hooks reached the first.
    names = ["ns-x", "ns_x", "ns.x", "nsx", "ns_2dx", "ns x", os.fsdecode(b"caf\xe9"), "café", "1", "x" * 255, "y" * 255]
    suffixes = [twdbus.named_suffix(n) for n in names]
    assert len(set(suffixes)) == len(names), dict(zip(names, suffixes, strict=True))
    assert twdbus.named_suffix("ns-x") == "netns_ns_2dx"
    assert twdbus.named_suffix("ns_x") == "netns_ns_5fx"
    for suffix in suffixes:
        name = twdbus.bus_name(suffix)
        assert len(name) <= 255 and all(c.isascii() and (c.isalnum() or c == "_") for c in suffix), name
    assert twdbus.named_suffix("x" * 255).startswith("netnsh_")


@given(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40))
def test_bus_name_escaping_is_one_to_one(a: str, b: str) -> None:
    assume(a != b)
    assert twdbus.escape(a) != twdbus.escape(b)
    assert twdbus.named_suffix(a).startswith(("netns_", "netnsh_"))  # never an unnamed one's inode_


def _net_core(path: Path, *names: str) -> str:
    path.mkdir()
    for name in names:
        (path / name).write_text("1\n")
    return str(path)


def test_bus_name_when_pid1_namespace_is_unreadable(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # ProtectProc=invisible, a container, no ptrace rights on PID 1: /proc/1/ns/net cannot be read.
    own, run = tmp_path / "self", tmp_path / "netns"
    own.write_text("")
    run.mkdir()
    unreadable = str(tmp_path / "no-pid-1")
    inode = own.stat().st_ino
    init_view = _net_core(tmp_path / "init-core", "somaxconn", "netdev_max_backlog", "message_cost")
    other_view = _net_core(tmp_path / "other-core", "somaxconn", "rmem_max")
    no_view = _net_core(tmp_path / "no-core")
    with caplog.at_level(logging.WARNING, logger="topowatch.dbus"):
        # The init-only sysctls tell: present in the init namespace, absent in every other.
        assert twdbus.netns_suffix(str(own), unreadable, str(run), init_view) is None
        assert twdbus.netns_suffix(str(own), unreadable, str(run), other_view) == f"inode_{inode}"
        assert caplog.records == []
        # Nothing tells: never the bare name, and a warning names the one taken.
        assert twdbus.netns_suffix(str(own), unreadable, str(run), no_view) == f"inode_{inode}"
        assert len(caplog.records) == 1
        assert f"io.github.topowatch.inode_{inode}" in caplog.records[0].getMessage()
        os.link(own, run / "lab")
        assert twdbus.netns_suffix(str(own), unreadable, str(run), no_view) == "netns_lab"
    assert twdbus.in_init_netns((0, twdbus.PROC_NET_INIT_INO), unreadable, no_view) is True


@pytest.mark.netns
def test_bus_name_in_a_real_namespace_without_pid1(netns: Namespace) -> None:
    # The real kernel's /proc/sys/net in a namespace of our own, /proc/1/ns/net out of reach.
    code = ("from topowatch import dbus; import os; own = os.stat('/proc/self/ns/net'); "
            "print(dbus.netns_suffix(init_ns='/nonexistent'), "
            "dbus.in_init_netns((own.st_dev, own.st_ino), '/nonexistent'))")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    inside = subprocess.run(["ip", "netns", "exec", netns.name, sys.executable, "-c", code], env=env,
                            capture_output=True, text=True, check=True).stdout.split()
    assert inside == [twdbus.named_suffix(netns.name), "False"]


def test_interface_names() -> None:
    assert check_interface("") is None
    assert check_interface("ppp0") == "ppp0"
    for bad in ("a/b", "x" * 16, "..", "eth 0"):
        with pytest.raises(UsageError):
            check_interface(bad)


def test_system_bus_address_honours_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/tmp/x")
    assert twdbus.system_bus_address() == "unix:path=/tmp/x"
    monkeypatch.delenv("DBUS_SYSTEM_BUS_ADDRESS")
    assert twdbus.system_bus_address() == twdbus.SYSTEM_BUS_DEFAULT


# -- the agent service ------------------------------------------------------------------


async def test_methods_and_reacted_signal(private_bus: PrivateBus) -> None:
    backend = FakeBackend()
    reactor = make_reactor(backend)
    reloads: list[str] = []

    def reload() -> str:
        reloads.append("x")
        return "policies reloaded: default"

    async with agent(private_bus.address, reactor, reload=reload) as service, client(private_bus.address) as bus:
        signals: list[Message] = []

        def on_message(msg: Message) -> None:
            if msg.message_type is MessageType.SIGNAL and msg.interface == twdbus.INTERFACE:
                signals.append(msg)

        bus.add_message_handler(on_message)
        await add_match(bus, f"type='signal',interface='{twdbus.INTERFACE}'")

        # Introspection shows the whole interface with its signatures.
        intro = await trio_asyncio.aio_as_trio(bus.introspect)(twdbus.BUS_NAME, twdbus.OBJECT_PATH)
        iface = next(i for i in intro.interfaces if i.name == twdbus.INTERFACE)
        assert {m.name: m.in_signature for m in iface.methods} == {
            "Trigger": "s", "TriggerEvent": "sss", "Plan": "", "Reload": "", "Status": ""}
        assert sorted(s.name for s in iface.signals) == ["Pressure", "Reacted"]

        # Plan: a dry run with the daemon's backend, in the `plan --json` contract; deletes nothing.
        reply = await call(bus, "Plan")
        assert reply.message_type is MessageType.METHOD_RETURN, reply.body
        plan = json.loads(reply.body[0])
        jsonschema.validate(plan, SCHEMA)
        assert len(plan["stale"]) == 2
        assert backend.deleted == []

        # Trigger: one reaction, then the Reacted signal.
        reply = await call(bus, "Trigger", "s", ["up2"])
        assert reply.message_type is MessageType.METHOD_RETURN, reply.body
        await wait_for(lambda: len(signals) == 1)
        assert len(reactor.reactions) == 1
        assert "D-Bus request for up2" in reactor.reactions[0].trigger
        assert len(backend.deleted) == 2
        reacted = json.loads(signals[0].body[0])
        assert signals[0].member == "Reacted"
        assert signals[0].path == twdbus.OBJECT_PATH
        assert reacted["deleted"] == 2
        assert reacted["summary"] == reactor.reactions[0].summary()

        # A hook's trigger carries its kind and interface to the policies.
        reply = await call(bus, "TriggerEvent", "sss", ["dispatcher", "wwan0", "vpn-up office"])
        assert reply.message_type is MessageType.METHOD_RETURN, reply.body
        await wait_for(lambda: len(signals) == 2)
        assert "D-Bus dispatcher for wwan0: vpn-up office" in reactor.reactions[1].trigger

        # Status: counters over the daemon's life.
        reply = await call(bus, "Status")
        status = json.loads(reply.body[0])
        assert status["reactions"] == 2
        assert status["deleted_total"] == 2
        assert status["undecided"] == 0
        assert status["source_restarts"] == 0
        assert status["name"] == twdbus.BUS_NAME
        assert status["last_reaction"]["reaction"] == 2
        assert status["uptime_s"] >= 0

        # Reload goes through the hook the daemon supplies.
        reply = await call(bus, "Reload")
        assert reply.body == ["policies reloaded: default"]
        assert reloads == ["x"]

        # Bad arguments come back as errors of our own, and trigger nothing.
        reply = await call(bus, "Trigger", "s", ["eth0/../x"])
        assert reply.message_type is MessageType.ERROR
        assert reply.error_name == "io.github.topowatch.Error.InvalidArgs"
        reply = await call(bus, "TriggerEvent", "sss", ["reboot", "", ""])
        assert reply.error_name == "io.github.topowatch.Error.InvalidArgs"
        await trio.sleep(0.2)
        assert len(reactor.reactions) == 2

        # Any other signal is one call away (pressure signals come this way).
        service.emit("PressureHigh", "s", '{"fill": 0.93}')
        await wait_for(lambda: len(signals) == 3)
        assert signals[2].member == "PressureHigh"
        assert signals[2].body == ['{"fill": 0.93}']


async def test_pressure_start_and_end_are_signalled_and_in_status(private_bus: PrivateBus, tmp_path: Path) -> None:
    """The pressure agent's start and end reach the bus as ``Pressure`` signals; Status carries its state."""
    from test_pressure_agent import agent_for, full_table  # the agent on a fake table and fake sysctls

    pressure, ct, _, _ = agent_for(tmp_path, full_table())
    reactor = make_reactor(FakeBackend())
    async with agent(private_bus.address, reactor, pressure=pressure), client(private_bus.address) as bus:
        signals: list[Message] = []
        bus.add_message_handler(lambda m: signals.append(m) if m.member == "Pressure" else None)
        await add_match(bus, f"type='signal',interface='{twdbus.INTERFACE}',member='Pressure'")
        await trio.to_thread.run_sync(pressure.observe)  # 95% full: starts, lowers, evicts
        pressure.deliver()
        await wait_for(lambda: len(signals) == 1)
        start = json.loads(signals[0].body[0])
        assert start["event"] == "start" and start["fill"] == 0.95
        assert "95% full (95/100)" in start["summary"]
        status = json.loads((await call(bus, "Status")).body[0])
        assert status["pressure"]["state"] == "high" and status["pressure"]["evicted"] == 20
        assert status["pressure"]["timeouts_lowered"] == {"udp": 10, "generic": 60}
        for e in list(ct.table)[:40]:
            ct.delete([e])
        await trio.to_thread.run_sync(pressure.observe)
        pressure.deliver()
        await wait_for(lambda: len(signals) == 2)
        assert json.loads(signals[1].body[0])["event"] == "end"  # evictions and timeouts are not signalled
        status = json.loads((await call(bus, "Status")).body[0])
        assert status["pressure"]["state"] == "normal" and status["pressure"]["timeouts_lowered"] == {}


async def test_hook_trigger_is_a_full_judgement(private_bus: PrivateBus) -> None:
    # The backend reports ruleset changes as events, so a burst of topology kinds alone (xfrm)
    # would keep the last ruleset; a hook's TriggerEvent must read it again (a VPN's updown script
    # may have changed a legacy table, which has no events).
    class EventfulBackend(FakeBackend):
        ruleset_events = True
        reads = 0

        async def ruleset(self) -> NatRuleset:
            self.reads += 1
            return await super().ruleset()

    backend = EventfulBackend()
    reactor = make_reactor(backend)
    async with agent(private_bus.address, reactor), client(private_bus.address) as bus:
        assert backend.reads == 1  # at start
        reply = await call(bus, "TriggerEvent", "sss", ["xfrm", "", "up-client office"])
        assert reply.message_type is MessageType.METHOD_RETURN, reply.body
        await wait_for(lambda: len(reactor.reactions) == 1)
        assert backend.reads == 2
        assert len(backend.deleted) == 2
        # Everything was judged; the same flows stick again and the tunnel's hook calls once more.
        # No topology change is in sight, so only a full judgement finds them.
        backend.table = [udp_entry(5060), udp_entry(5061)]
        reply = await call(bus, "TriggerEvent", "sss", ["xfrm", "", "up-client office"])
        assert reply.message_type is MessageType.METHOD_RETURN, reply.body
        await wait_for(lambda: len(reactor.reactions) == 2)
        assert backend.reads == 3
        assert len(backend.deleted) == 4


async def test_reload_without_store_is_an_error(private_bus: PrivateBus) -> None:
    reactor = make_reactor(FakeBackend())
    async with agent(private_bus.address, reactor), client(private_bus.address) as bus:
        reply = await call(bus, "Reload")
        assert reply.message_type is MessageType.ERROR
        assert reply.error_name == "io.github.topowatch.Error.NotSupported"


def _store(tmp_path: Path) -> PolicyStore:
    d = tmp_path / "rules.d"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    policy = d / "50-watch.toml"
    policy.write_text('[policy.watch]\naction = "log"\n')
    policy.chmod(0o644)
    return PolicyStore.open([str(d)])


async def test_reload_reads_the_files_off_the_event_loop(private_bus: PrivateBus, tmp_path: Path) -> None:
    """While Reload's files are read, the loop serves other calls (here Status) before the read ends."""
    store = _store(tmp_path)
    reading, release = threading.Event(), threading.Event()
    load = store.load

    def slow() -> EffectivePolicy:
        reading.set()
        if not release.wait(10):
            raise RuntimeError("the event loop served nothing while the policy files were read")
        return load()

    store.load = slow  # type: ignore[method-assign]
    changes: list[str] = []
    reactor = make_reactor(FakeBackend())
    hook = policy_reload(store, changed=lambda: changes.append("x"))
    async with agent(private_bus.address, reactor, reload=hook), client(private_bus.address) as bus:
        replies: list[Message] = []
        async with trio.open_nursery() as nursery:

            async def reload() -> None:
                replies.append(await call(bus, "Reload"))

            nursery.start_soon(reload)
            await trio.to_thread.run_sync(reading.wait, abandon_on_cancel=True)
            status = await call(bus, "Status")  # answered while Reload waits for its worker
            assert status.message_type is MessageType.METHOD_RETURN and not replies
            release.set()
        assert replies[0].body == ["policies reloaded: watch"], replies[0].body
        assert changes == ["x"] and store.current is not None


async def test_reload_too_slow_keeps_the_policy(private_bus: PrivateBus, tmp_path: Path) -> None:
    store = _store(tmp_path)
    first = store.current
    release = threading.Event()

    def stuck() -> EffectivePolicy:
        release.wait(30)
        raise RuntimeError("late")

    store.load = stuck  # type: ignore[method-assign]
    reactor = make_reactor(FakeBackend())
    try:
        async with agent(private_bus.address, reactor, reload=policy_reload(store, timeout=0.2)), \
                client(private_bus.address) as bus:
            reply = await call(bus, "Reload")
            assert reply.message_type is MessageType.ERROR
            assert reply.error_name == "io.github.topowatch.Error.Failed"
            assert "took more than 0.2 s" in reply.body[0]
    finally:
        release.set()
    assert store.current is first


async def test_second_daemon_cannot_take_the_name(private_bus: PrivateBus, caplog: pytest.LogCaptureFixture) -> None:
    reactor = make_reactor(FakeBackend())
    async with agent(private_bus.address, reactor), trio.open_nursery() as nursery:
        second = AgentService(make_reactor(FakeBackend()), name=twdbus.BUS_NAME, address=private_bus.address,
                              backoff=FAST)
        nursery.start_soon(second.run)
        await trio.sleep(0.8)  # several retries
        assert not second.connected.is_set()
        nursery.cancel_scope.cancel()
    owned = [r for r in caplog.records if "already owned" in r.getMessage()]
    assert len(owned) == 1  # said once, not per retry


async def test_no_bus_logs_once_then_connects(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="topowatch.dbus")
    bus = PrivateBus()
    try:
        reactor = make_reactor(FakeBackend())
        service = AgentService(reactor, name=twdbus.BUS_NAME, address=bus.address, backoff=FAST)
        async with trio.open_nursery() as nursery:
            await nursery.start(reactor.run)
            nursery.start_soon(service.run)
            await trio.sleep(0.8)  # a dozen attempts at the missing socket
            assert not service.connected.is_set()
            down = [r for r in caplog.records if "running on without it" in r.getMessage()]
            assert len(down) == 1
            assert down[0].levelno == logging.WARNING

            # The daemon still reacts without D-Bus; the signal is dropped, not queued.
            reactor.push(Trigger("test", "while the bus is down"))
            await wait_for(lambda: len(reactor.reactions) == 1)
            assert service.signals_dropped == 1

            bus.start()
            with trio.fail_after(5):
                await service.connected.wait()
            async with client(bus.address) as c:
                reply = await call(c, "Status")
                assert json.loads(reply.body[0])["reactions"] == 1

            # The bus goes away and comes back: said once again, and connected again.
            bus.stop()
            await wait_for(lambda: not service.connected.is_set())
            await trio.sleep(0.5)
            lost = [r for r in caplog.records if "lost the bus" in r.getMessage()]
            assert len(lost) == 1
            bus.start()
            with trio.fail_after(5):
                await service.connected.wait()
            nursery.cancel_scope.cancel()
        serving = [r for r in caplog.records if "serving io.github.topowatch" in r.getMessage()]
        assert len(serving) == 2
    finally:
        bus.close()


# -- the bus policy file --------------------------------------------------------------


def test_policy_file_is_well_formed() -> None:
    root = ET.parse(POLICY_FILE).getroot()
    assert root.tag == "busconfig"
    policies = {p.get("user") or p.get("context"): p for p in root.findall("policy")}
    assert set(policies) == {"root", "default"}
    root_rules = [dict(e.attrib, verdict=e.tag) for e in policies["root"]]
    assert {"own_prefix": "io.github.topowatch", "verdict": "allow"} in root_rules
    default = [dict(e.attrib, verdict=e.tag) for e in policies["default"]]
    assert {"own_prefix": "io.github.topowatch", "verdict": "deny"} in default
    allowed = {r.get("send_member") for r in default if r["verdict"] == "allow" and "send_member" in r}
    assert allowed == {"Status"}  # Trigger, TriggerEvent, Reload and Plan stay root's
    text = POLICY_FILE.read_text()
    for method in ("Trigger", "Reload", "Plan", "Status"):
        assert method in text


def _nobody() -> tuple[int, int] | None:
    try:
        pw = pwd.getpwnam("nobody")
    except KeyError:
        return None
    return pw.pw_uid, pw.pw_gid


@pytest.mark.skipif(os.geteuid() != 0 or DBUS_SEND is None or _nobody() is None,
                    reason="needs root, dbus-send and a 'nobody' user")
async def test_policy_file_enforced_by_the_bus() -> None:
    bus = PrivateBus(SYSTEM_CONF, policy=str(POLICY_FILE))
    bus.start()
    uid, gid = cast(tuple[int, int], _nobody())

    async def send(member: str, *args: str, as_nobody: bool, dest: str = twdbus.BUS_NAME,
                   path: str = twdbus.OBJECT_PATH, iface: str = twdbus.INTERFACE) -> subprocess.CompletedProcess[bytes]:
        argv = [cast(str, DBUS_SEND), f"--bus={bus.address}", "--print-reply", f"--dest={dest}", path,
                f"{iface}.{member}", *args]
        extra: dict[str, Any] = {"user": uid, "group": gid, "extra_groups": []} if as_nobody else {}
        return await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False, **extra)

    try:
        reactor = make_reactor(FakeBackend())
        async with agent(bus.address, reactor):
            status = await send("Status", as_nobody=True)
            assert status.returncode == 0, status.stderr
            assert b"reactions" in status.stdout
            for member, args in (("Trigger", ("string:",)), ("Reload", ()), ("Plan", ()),
                                 ("TriggerEvent", ("string:link", "string:", "string:"))):
                denied = await send(member, *args, as_nobody=True)
                assert denied.returncode != 0
                assert b"AccessDenied" in denied.stderr, (member, denied.stderr)
            allowed = await send("Trigger", "string:", as_nobody=False)
            assert allowed.returncode == 0, allowed.stderr
            own = await send("RequestName", f"string:{twdbus.BUS_NAME}.netns_x", "uint32:4", as_nobody=True,
                             dest="org.freedesktop.DBus", path="/org/freedesktop/DBus", iface="org.freedesktop.DBus")
            assert b"AccessDenied" in own.stderr
            await wait_for(lambda: len(reactor.reactions) == 1)  # root's Trigger reached the reactor
    finally:
        bus.close()


# -- NetworkManager -------------------------------------------------------------------


class FakeDevice(ServiceInterface):
    def __init__(self, interface: str, ip_interface: str) -> None:
        super().__init__(DEVICE)
        self._interface, self._ip_interface = interface, ip_interface

    @dbus_property(access=PropertyAccess.READ)
    def Interface(self) -> DBusStr:
        return self._interface

    @dbus_property(access=PropertyAccess.READ)
    def IpInterface(self) -> DBusStr:
        return self._ip_interface

    @dbus_signal()
    def StateChanged(self, new: int, old: int, reason: int) -> Annotated[list[int], DBusSignature("uuu")]:
        return [new, old, reason]


class FakeActive(ServiceInterface):
    def __init__(self, conn_id: str, conn_type: str) -> None:
        super().__init__(ACTIVE)
        self._id, self._type = conn_id, conn_type

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> DBusStr:
        return self._id

    @dbus_property(access=PropertyAccess.READ)
    def Type(self) -> DBusStr:
        return self._type

    @dbus_signal()
    def StateChanged(self, state: int, reason: int) -> Annotated[list[int], DBusSignature("uu")]:
        return [state, reason]


class FakeVpn(ServiceInterface):
    def __init__(self) -> None:
        super().__init__(VPN)

    @dbus_signal()
    def VpnStateChanged(self, state: int, reason: int) -> Annotated[list[int], DBusSignature("uu")]:
        return [state, reason]


class FakeNetworkManager:
    """NM's name, a modem device (ppp0 while up) and a VPN active connection, at NM's paths."""

    MODEM = "/org/freedesktop/NetworkManager/Devices/3"
    ACTIVE_VPN = "/org/freedesktop/NetworkManager/ActiveConnection/7"

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self.modem = FakeDevice("ttyUSB2", "ppp0")
        self.active = FakeActive("office", "vpn")
        self.vpn = FakeVpn()

    async def start(self) -> None:
        self.bus.export(self.MODEM, self.modem)
        self.bus.export(self.ACTIVE_VPN, self.active)
        self.bus.export(self.ACTIVE_VPN, self.vpn)
        await trio_asyncio.aio_as_trio(self.bus.request_name)(NM_NAME)


@contextlib.asynccontextmanager
async def fake_nm(address: str) -> AsyncIterator[FakeNetworkManager]:
    async with client(address) as bus:
        nm = FakeNetworkManager(bus)
        await nm.start()
        yield nm


async def next_trigger(recv: trio.MemoryReceiveChannel[Trigger], timeout: float = 3.0) -> Trigger:
    with trio.fail_after(timeout):
        return await recv.receive()


async def test_networkmanager_signals_become_triggers(private_bus: PrivateBus) -> None:
    source = NetworkManagerSource(private_bus.address, backoff=FAST)
    assert source.name == "networkmanager"
    async with fake_nm(private_bus.address) as nm, source.events() as events:
        recv = cast(trio.MemoryReceiveChannel[Trigger], events)
        with trio.fail_after(5):
            await source.subscribed.wait()
        nm.modem.StateChanged(70, 50, 0)  # IP_CONFIG: not settled, no trigger
        nm.modem.StateChanged(100, 70, 0)
        trigger = await next_trigger(recv)
        assert trigger == Trigger("networkmanager", "NetworkManager: device ppp0 activated",
                                  kind="networkmanager", interface="ppp0")
        nm.vpn.VpnStateChanged(3, 0)  # CONNECT: not settled
        nm.vpn.VpnStateChanged(5, 0)
        trigger = await next_trigger(recv)
        assert trigger.description == "NetworkManager: VPN 'office' (vpn) activated"
        assert trigger.interface is None
        nm.active.StateChanged(4, 2)
        trigger = await next_trigger(recv)
        assert trigger.description == "NetworkManager: connection 'office' (vpn) deactivated"
        # The object is gone once NM drops it: the name seen before stands in.
        nm.bus.unexport(nm.ACTIVE_VPN, nm.active)
        nm.vpn.VpnStateChanged(7, 0)
        trigger = await next_trigger(recv)
        assert trigger.description == "NetworkManager: VPN 'office' (vpn) disconnected"
        with trio.move_on_after(0.2):
            extra = await recv.receive()
            pytest.fail(f"unexpected trigger {extra}")


async def test_networkmanager_signal_drives_a_reaction(private_bus: PrivateBus) -> None:
    source = NetworkManagerSource(private_bus.address, backoff=FAST)
    reactor = make_reactor(FakeBackend(sources=[source]))
    async with fake_nm(private_bus.address) as nm, trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        with trio.fail_after(5):
            await source.subscribed.wait()
        nm.modem.StateChanged(100, 70, 0)
        await wait_for(lambda: len(reactor.reactions) == 1)
        assert "NetworkManager: device ppp0 activated" in reactor.reactions[0].trigger
        nursery.cancel_scope.cancel()


async def test_networkmanager_absent_is_quiet(private_bus: PrivateBus, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    source = NetworkManagerSource(private_bus.address, backoff=FAST)
    async with source.events() as events:
        recv = cast(trio.MemoryReceiveChannel[Trigger], events)
        with trio.fail_after(5):
            await source.subscribed.wait()
        await trio.sleep(0.2)
        # NM starts after us: its signals still arrive (the match rules name it, not its owner).
        async with fake_nm(private_bus.address) as nm:
            nm.modem.StateChanged(30, 100, 0)
            trigger = await next_trigger(recv)
            assert trigger.description == "NetworkManager: device ppp0 disconnected"
    assert [r.getMessage() for r in caplog.records if r.name.startswith("topowatch")] == []


async def test_networkmanager_without_bus_idles_quietly(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    source = NetworkManagerSource("unix:path=/nonexistent/bus", backoff=FAST)
    async with source.events() as events:
        recv = cast(trio.MemoryReceiveChannel[Trigger], events)
        with trio.move_on_after(0.5):
            await recv.receive()
            pytest.fail("a trigger without a bus")
    assert [r.getMessage() for r in caplog.records if r.name.startswith("topowatch")] == []


# -- the CLI clients ------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "topowatch", *args], capture_output=True, text=True,
                          timeout=30, check=False)


async def test_cli_status_and_trigger(private_bus: PrivateBus) -> None:
    reactor = make_reactor(FakeBackend())
    async with agent(private_bus.address, reactor):
        done = await trio.run_process([sys.executable, "-m", "topowatch", "trigger", "--interface", "ppp0"],
                                      capture_stdout=True, capture_stderr=True, check=False)
        assert done.returncode == 0, done.stderr
        assert b"reaction requested for ppp0" in done.stdout
        await wait_for(lambda: len(reactor.reactions) == 1)
        assert "D-Bus request for ppp0" in reactor.reactions[0].trigger
        done = await trio.run_process([sys.executable, "-m", "topowatch", "trigger", "--json"],
                                      capture_stdout=True, capture_stderr=True, check=False)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"requested": True, "interface": None}
        await wait_for(lambda: len(reactor.reactions) == 2)

        done = await trio.run_process([sys.executable, "-m", "topowatch", "status", "--json"],
                                      capture_stdout=True, capture_stderr=True, check=False)
        assert done.returncode == 0, done.stderr
        status = json.loads(done.stdout)
        assert status["reactions"] == 2
        assert status["deleted_total"] == 2 and status["kept_replied_total"] == 0

        done = await trio.run_process([sys.executable, "-m", "topowatch", "status"],
                                      capture_stdout=True, capture_stderr=True, check=False)
        assert done.returncode == 0, done.stderr
        assert b"reactions 2, deleted 2" in done.stdout
        assert b"kept as replied since the dump 0" in done.stdout
        assert b"last: reaction 2" in done.stdout


def test_cli_without_daemon(private_bus: PrivateBus) -> None:
    # systemctl's convention: status 3 is "not running", apart from 1, "could not ask" (no bus).
    done = run_cli("status")
    assert done.returncode == 3
    assert done.stderr.strip() == (
        "topowatch: the topowatch daemon is not running "
        "(io.github.topowatch has no owner on the system bus)"
    )
    done = run_cli("trigger")
    assert done.returncode == 1
    assert "not running" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_cli_without_bus() -> None:
    done = run_cli("status", "--json")
    assert done.returncode == 1
    assert done.stderr.startswith("topowatch: error: cannot reach the system bus: no bus at unix:path=/nonexistent")
    assert len(done.stderr.strip().splitlines()) == 1
    assert done.stdout == ""
