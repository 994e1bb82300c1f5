"""Log records: a short line per reaction and per group in text, one JSON record per deleted entry."""

from __future__ import annotations

import datetime
import io
import json
import logging
import os
import threading
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest
import trio
import trio.testing

from topowatch.core.conntrack import IPS_CONFIRMED, IPS_SRC_NAT, IPS_SRC_NAT_DONE, CtTuple, Entry
from topowatch.core.model import AF_INET
from topowatch.logs import JsonFormatter, TextFormatter, setup_logging, stderr_is_journal
from topowatch.reactor import Reactor, ReactorConfig, Trigger

from test_reactor import B, FakeBackend, stale_when_up2, udp_entry  # isort: skip


def snat_entry(sport: int, to: str) -> Entry:
    src, dst, nat = IPv4Address("10.0.1.2"), IPv4Address("192.0.2.10"), IPv4Address(to)
    return Entry(AF_INET, 17, CtTuple(src, dst, sport, 5060), CtTuple(dst, nat, 5060, sport),
                 status=IPS_CONFIRMED | IPS_SRC_NAT_DONE | IPS_SRC_NAT)


@pytest.fixture
def captured() -> Iterator[tuple[list[logging.LogRecord], io.StringIO, io.StringIO]]:
    """Records of the topowatch loggers, and their renderings in text and JSON."""
    records: list[logging.LogRecord] = []
    text, js = io.StringIO(), io.StringIO()

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)
            text.write(TextFormatter(journald=False).format(record) + "\n")
            js.write(JsonFormatter().format(record) + "\n")

    root = logging.getLogger("topowatch")
    entries = logging.getLogger("topowatch.entries")
    saved = root.handlers[:], root.level, root.propagate, entries.level
    root.handlers[:] = [Capture()]
    root.setLevel(logging.INFO)
    root.propagate = False
    entries.setLevel(logging.NOTSET)
    try:
        yield records, text, js
    finally:
        root.handlers[:], level, root.propagate, entries_level = saved
        root.setLevel(level)
        entries.setLevel(entries_level)


async def react_once(table: list[Entry]) -> Reactor:
    backend = FakeBackend()
    backend.table = table
    reactor = Reactor(backend, ReactorConfig(startup_sweep=False), predictor=stale_when_up2)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        backend.topo = B
        await backend.send.send(Trigger("rtnl", "link up2 added"))
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    return reactor


async def test_reaction_text_is_one_short_line_and_a_line_per_reason(
    autojump_clock: trio.testing.MockClock, captured: tuple[list[logging.LogRecord], io.StringIO, io.StringIO]
) -> None:
    table = [udp_entry(5000 + i) for i in range(5)] + [snat_entry(6000 + i, "100.64.0.2") for i in range(4)]
    await react_once(table)
    records, _, _ = captured
    text = [r.getMessage() for r in records if r.name != "topowatch.entries" and r.getMessage().startswith("reaction 1")]
    summary, *groups = text  # the line that sums them up (written once the deletes are done), then the groups
    assert len(summary) < 200, summary
    assert "9 of 9 examined udp entries stale, 9 deleted (5 null_binding_now_nat, 4 snat_changed)" in summary
    assert "ms incl." in summary and "debounce" in summary
    assert summary.count("link up2 added") == 1  # the change is said once
    assert len(groups) == 2
    assert groups[0] == (
        "reaction 1: deleted udp 10.0.1.2:5000 -> 192.0.2.10:5060, udp 10.0.1.2:5001 -> 192.0.2.10:5060, "
        "udp 10.0.1.2:5002 -> 192.0.2.10:5060, and 2 more "
        "(5 null_binding_now_nat: source no NAT -> masquerade to 203.0.113.2)"
    )
    assert groups[1].endswith(", and 1 more (4 snat_changed: source snat to 100.64.0.2 -> masquerade to 203.0.113.2)")
    assert all(len(line) < 250 for line in groups), groups


async def test_one_json_record_per_deleted_entry(
    autojump_clock: trio.testing.MockClock, captured: tuple[list[logging.LogRecord], io.StringIO, io.StringIO]
) -> None:
    await react_once([udp_entry(5000 + i) for i in range(3)] + [snat_entry(6000, "100.64.0.2")])
    _, _, js = captured
    objects = [json.loads(line) for line in js.getvalue().splitlines()]
    entries = [o for o in objects if o.get("event") == "entry"]
    assert len(entries) == 4
    first = entries[0]
    assert first["reaction"] == 1 and first["action"] == "deleted"
    assert first["code"] == "null_binding_now_nat" and "now it would be" in first["reason"]
    assert first["orig"] == {"src": "10.0.1.2", "dst": "192.0.2.10", "sport": 5000, "dport": 5060}
    assert first["actual"]["kind"] == "none" and first["expected"][0]["kind"] == "masquerade"
    assert {e["code"] for e in entries} == {"null_binding_now_nat", "snat_changed"}
    # Beside the text, the fields it is rendered from (``core.reason``), for programs.
    why = first["why"]
    assert (why["code"], why["side"], why["actual"]) == ("null_binding_now_nat", "snat", first["actual"])
    assert (why["original"], why["translated"], why["expected"]) == ("10.0.1.2", "10.0.1.2", first["expected"])
    assert isinstance(why["egress"], list) and "cause" not in why
    assert [e["why"]["translated"] for e in entries if e["code"] == "snat_changed"] == ["100.64.0.2"]
    reaction = next(o for o in objects if o.get("event") == "reaction")
    assert reaction["stale_by_code"] == {"null_binding_now_nat": 3, "snat_changed": 1}
    for obj in objects:
        assert obj["priority"] == 6  # info
        parsed = datetime.datetime.fromisoformat(obj["ts"])
        assert parsed.tzinfo is not None  # RFC 3339: an offset is part of the time


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """setup_logging changes process-wide loggers: put them back for the tests after (caplog needs it)."""
    root, entries = logging.getLogger("topowatch"), logging.getLogger("topowatch.entries")
    saved = root.handlers[:], root.level, root.propagate, entries.level
    try:
        yield
    finally:
        root.handlers[:], level, root.propagate, entries_level = saved
        root.setLevel(level)
        entries.setLevel(entries_level)


@pytest.mark.usefixtures("restore_logging")
def test_text_entry_records_need_verbose() -> None:
    setup_logging(0, "text")
    assert not logging.getLogger("topowatch.entries").isEnabledFor(logging.INFO)
    setup_logging(1, "text")
    assert logging.getLogger("topowatch.entries").isEnabledFor(logging.INFO)
    setup_logging(0, "json")
    assert logging.getLogger("topowatch.entries").isEnabledFor(logging.INFO)
    setup_logging(0, "text", quiet=True)
    assert not logging.getLogger("topowatch").isEnabledFor(logging.INFO)
    assert logging.getLogger("topowatch").isEnabledFor(logging.WARNING)


def test_journald_is_told_by_device_and_inode(tmp_path: Path) -> None:
    with open(tmp_path / "stream", "w") as stream, open(tmp_path / "other", "w") as other:
        st = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert stderr_is_journal(stream, env)
        assert not stderr_is_journal(other, env)  # inherited by a child whose stderr went elsewhere
        assert not stderr_is_journal(stream, {"JOURNAL_STREAM": "1"})
        assert not stderr_is_journal(stream, {})


def test_journald_text_has_priority_prefix() -> None:
    record = logging.LogRecord("topowatch", logging.WARNING, __file__, 1, "table full", None, None)
    assert TextFormatter(journald=True).format(record) == "<4>table full"
    assert not TextFormatter(journald=False).format(record).startswith("<")


@pytest.mark.usefixtures("restore_logging")
def test_setup_logging_uses_priority_prefixes_only_on_the_journal_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open(tmp_path / "journal", "w") as journal, open(tmp_path / "other", "w") as other:
        st = os.fstat(journal.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        for stream, journald in ((journal, True), (other, False)):
            monkeypatch.setattr("sys.stderr", stream)
            setup_logging(0, "text")
            formatter = logging.getLogger("topowatch").handlers[0].formatter
            assert isinstance(formatter, TextFormatter) and formatter.journald is journald
        monkeypatch.setattr("sys.stderr", journal)
        setup_logging(0, "json")  # the priority as a field, and as the prefix journald strips
        formatter = logging.getLogger("topowatch").handlers[0].formatter
        assert isinstance(formatter, JsonFormatter) and formatter.journald
        record = logging.LogRecord("topowatch", logging.ERROR, __file__, 1, "x", None, None)
        line = formatter.format(record)
        assert line.startswith('<3>{"ts": ') and json.loads(line[3:])["priority"] == 3
        monkeypatch.setattr("sys.stderr", other)
        setup_logging(0, "json")
        assert logging.getLogger("topowatch").handlers[0].formatter.format(record).startswith("{")


def test_a_replaced_route_reads_as_one_change() -> None:
    from topowatch.reactor import _change_text

    lines = ("route default via 198.51.100.1 dev up1 removed", "route 192.0.2.30/32 via 100.64.0.1 dev up3 removed",
             "route default via 203.0.113.1 dev up2 added", "link up3 down")
    assert _change_text(lines) == ("route default: via 198.51.100.1 dev up1 -> via 203.0.113.1 dev up2; "
                                   "route 192.0.2.30/32 via 100.64.0.1 dev up3 removed; and 1 more")
    # Another table is another route: no pairing across tables.
    assert _change_text(("route default dev a removed", "route default dev b table 5 added")) == (
        "route default dev a removed; route default dev b table 5 added")


def test_the_line_names_a_cause_the_topology_change_does_not_show() -> None:
    from topowatch.core.decide import FlushPlan
    from topowatch.core.model import TopologyChange
    from topowatch.reactor import DeleteCounts, Reaction

    def line(trigger: str, change: tuple[str, ...]) -> str:
        return Reaction(1, trigger, 2, TopologyChange(change), FlushPlan(0, 0), DeleteCounts(), False, False,
                        0.3, {"snapshot": 0.01}).summary()

    both = line("route added: default via 203.0.113.1 dev up2, nftables ruleset changed (generation 7)",
                ("route default via 203.0.113.1 dev up2 added",))
    assert both.startswith("reaction 1 (nftables ruleset changed (generation 7); route default via 203.0.113.1 "
                           "dev up2 added): ")
    assert both.count("203.0.113.1") == 1  # the route event is not said twice
    assert line("startup sweep", ()).startswith("reaction 1 (startup sweep): 0 of 0 examined entries stale")


def test_a_reactions_entry_records_never_hold_the_next_reaction_back(
    captured: tuple[list[logging.LogRecord], io.StringIO, io.StringIO],
) -> None:
    """The daemon writes the per-entry records in a thread of their own: with that log stuck, the
    next reaction still runs and logs its line; released, every record comes, in order."""
    records, _, _ = captured
    stuck, entered = threading.Event(), threading.Event()

    class Slow(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            entered.set()
            stuck.wait(30)

    entries = logging.getLogger("topowatch.entries")
    slow = Slow()
    entries.addHandler(slow)
    backend = FakeBackend()
    backend.table = [udp_entry(5000 + i) for i in range(5)]
    reactor = Reactor(backend, ReactorConfig(startup_sweep=False, background_details=True),  # type: ignore[arg-type]
                      predictor=stale_when_up2)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(reactor.run)
            backend.topo = B
            await backend.send.send(Trigger("rtnl", "link up2 added"))
            with trio.fail_after(20):
                while reactor.totals.reactions < 1 or not entered.is_set():
                    await trio.sleep(0.05)
                backend.table = [udp_entry(6000 + i) for i in range(3)]
                await backend.send.send(Trigger("request", "full judgement asked"))
                while reactor.totals.reactions < 2:  # not held back by the stuck entry records
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
        lines = [r.getMessage() for r in records if r.name == "topowatch.reactor"]
        assert any(line.startswith("reaction 2 ") for line in lines)
        assert sum(r.name == "topowatch.entries" for r in records) <= 1  # the first one, stuck
        stuck.set()
        assert reactor.details.drain(10)
        written = [r.getMessage() for r in records if r.name == "topowatch.entries"]
        assert [line.split(":")[0] for line in written] == ["reaction 1"] * 5 + ["reaction 2"] * 3
    finally:
        stuck.set()
        entries.removeHandler(slow)
