"""Metrics and the per-reaction log record: values a scraper and a log reader would see.

The reactor runs against the fake backend on trio's virtual clock; the
exposition is parsed back with prometheus-client's own parser.
"""

from __future__ import annotations

import json
import logging
import socket
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from test_reactor import B, FakeBackend, stale_when_up2
from topowatch.core.conntrack import IPS_SEEN_REPLY, CtTuple, Entry
from topowatch.edges import ctcodec
from topowatch.edges.ctnetlink import Conntrack
from topowatch.errors import UsageError
from topowatch.logs import JsonFormatter
from topowatch.metrics import Metrics, parse_listen, read_table_fill, serve_http, serve_textfile
from topowatch.netns import Namespace
from topowatch.reactor import Reactor, ReactorConfig, Trigger


def samples(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def fake_sysctls(tmp_path: Path, count: int, limit: int) -> str:
    d = tmp_path / "netfilter"
    d.mkdir(exist_ok=True)
    (d / "nf_conntrack_count").write_text(f"{count}\n")
    (d / "nf_conntrack_max").write_text(f"{limit}\n")
    return str(d)


async def run_reactions(metrics: Metrics | None = None, **config: object) -> Reactor:
    backend = FakeBackend()
    reactor = Reactor(backend, ReactorConfig(startup_sweep=False, **config), predictor=stale_when_up2)  # type: ignore[arg-type]
    if metrics is not None:
        reactor.on_reaction = metrics.observe
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        backend.topo = B
        await backend.send.send(Trigger("rtnl", "link up2 added"))
        await trio.sleep(5)
        await backend.send.send(Trigger("rtnl", "route changed"))
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    return reactor


async def test_reactions_are_counted(autojump_clock: trio.testing.MockClock, tmp_path: Path) -> None:
    errors = {"reaction": 2}
    metrics = Metrics(lambda: errors, sysctl_dir=fake_sysctls(tmp_path, 300, 1200))
    reactor = await run_reactions(metrics)
    assert len(reactor.reactions) == 2
    got = samples(metrics.exposition().decode())
    assert got["topowatch_reactions_total{result=deleted}"] == 1
    assert got["topowatch_reactions_total{result=nothing}"] == 1  # the second found nothing stale
    assert got["topowatch_reactions_total{result=refused}"] == 0
    assert got["topowatch_entries_examined_total"] == 2  # 2 entries, then an empty table
    assert got["topowatch_entries_stale_total"] == 2
    assert got["topowatch_entries_deleted_total"] == 2
    assert got["topowatch_entries_kept_total{reason=replied}"] == 0
    assert got["topowatch_reaction_latency_seconds_count"] == 2
    assert got["topowatch_reaction_latency_seconds_bucket{le=+Inf}"] == 2
    assert got["topowatch_conntrack_entries"] == 300
    assert got["topowatch_conntrack_max"] == 1200
    assert got["topowatch_conntrack_fill_ratio"] == 0.25
    assert got["topowatch_errors_total{kind=reaction}"] == 2
    assert got["topowatch_errors_total{kind=delete}"] == 0


async def test_refused_and_dry_run(autojump_clock: trio.testing.MockClock, tmp_path: Path) -> None:
    metrics = Metrics(sysctl_dir=str(tmp_path / "absent"))
    await run_reactions(metrics, max_deletions=1)
    got = samples(metrics.exposition().decode())
    assert got["topowatch_reactions_total{result=refused}"] == 2
    assert got["topowatch_entries_deleted_total"] == 0
    # Unreadable table fill (no conntrack): left out, never made up.
    assert not any(k.startswith("topowatch_conntrack_") for k in got)


def test_table_fill_reader(tmp_path: Path) -> None:
    assert read_table_fill(fake_sysctls(tmp_path, 5, 10)) == (5, 10)
    assert read_table_fill(str(tmp_path / "nothing")) is None
    (tmp_path / "netfilter" / "nf_conntrack_max").write_text("garbage")
    assert read_table_fill(str(tmp_path / "netfilter")) is None


def test_textfile_is_replaced_atomically(tmp_path: Path) -> None:
    metrics = Metrics(sysctl_dir=fake_sysctls(tmp_path, 1, 2))
    out = tmp_path / "prom" / "topowatch.prom"
    out.parent.mkdir()
    out.write_text("old content\n")
    before = out.stat().st_ino
    assert metrics.write_textfile(str(out))
    assert out.stat().st_ino != before  # a new file renamed over the old one, never rewritten in place
    assert samples(out.read_text())["topowatch_conntrack_entries"] == 1
    assert sorted(p.name for p in out.parent.iterdir()) == ["topowatch.prom"]  # no temp file left
    assert not metrics.write_textfile(str(tmp_path / "missing-dir" / "x.prom"))


async def test_textfile_refresh(autojump_clock: trio.testing.MockClock, tmp_path: Path) -> None:
    sysctls = fake_sysctls(tmp_path, 1, 2)
    metrics = Metrics(sysctl_dir=sysctls)
    out = tmp_path / "t.prom"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_textfile, metrics, str(out), 60.0)
        await trio.sleep(1)
        assert samples(out.read_text())["topowatch_conntrack_entries"] == 1
        fake_sysctls(tmp_path, 2, 2)
        await trio.sleep(60)
        assert samples(out.read_text())["topowatch_conntrack_entries"] == 2
        nursery.cancel_scope.cancel()
    start = trio.current_time()
    await serve_textfile(metrics, str(out), 0)  # refresh 0: writes once and returns
    assert trio.current_time() == start


async def http(port: int, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


async def test_http_endpoint(tmp_path: Path) -> None:
    metrics = Metrics(sysctl_dir=fake_sysctls(tmp_path, 7, 70))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_http, metrics, listeners)
        ok = await http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        missing = await http(port, b"GET /nope HTTP/1.0\r\n\r\n")
        post = await http(port, b"POST /metrics HTTP/1.0\r\n\r\n")
        head = await http(port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
        # A client that connects and says nothing must not take the server down.
        idle = socket.create_connection(("127.0.0.1", port))
        idle.close()
        again = await http(port, b"GET / HTTP/1.0\r\n\r\n")
        nursery.cancel_scope.cancel()
    head_ok, body = ok.split(b"\r\n\r\n", 1)
    assert head_ok.startswith(b"HTTP/1.0 200")
    assert b"Content-Type: text/plain; version=" in head_ok
    assert samples(body.decode())["topowatch_conntrack_entries"] == 7
    assert missing.startswith(b"HTTP/1.0 404")
    assert post.startswith(b"HTTP/1.0 405")
    assert head.startswith(b"HTTP/1.0 200") and head.endswith(b"\r\n\r\n")
    assert again.startswith(b"HTTP/1.0 200")


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9877") == ("127.0.0.1", 9877)
    assert parse_listen("[::1]:9877") == ("::1", 9877)
    for bad in ("9877", "127.0.0.1:", "host:99999", ":80", "127.0.0.1:http"):
        with pytest.raises(UsageError):
            parse_listen(bad)


async def test_one_json_record_per_reaction(autojump_clock: trio.testing.MockClock) -> None:
    records: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(JsonFormatter().format(record))

    logger = logging.getLogger("topowatch")
    handler = Capture()
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        await run_reactions()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    objects = [json.loads(r) for r in records]
    reactions = [o for o in objects if o.get("event") == "reaction"]
    assert len(reactions) == 2
    first = reactions[0]
    for key in ("trigger", "events", "change", "examined", "eligible", "stale", "deleted", "undecided",
                "latency_ms", "timings"):
        assert key in first, key
    assert first["trigger"] == "link up2 added"
    assert (first["examined"], first["stale"], first["deleted"]) == (2, 2, 2)
    assert set(first["timings"]) >= {"snapshot", "dump+decide", "delete"}
    assert first["msg"].startswith("reaction 1 (")


@pytest.mark.netns
def test_table_fill_is_read_in_the_namespace(netns: Namespace) -> None:
    sock = netns.socket(socket.AF_NETLINK, socket.SOCK_RAW, ctcodec.NETLINK_NETFILTER)
    with Conntrack(sock) as ct:
        src, dst = IPv4Address("10.0.0.1"), IPv4Address("192.0.2.1")
        ct.create([Entry(2, 17, CtTuple(src, dst, 1000 + i, 53), CtTuple(dst, src, 53, 1000 + i), timeout=60)
                   for i in range(25)])
    fill = netns.call(read_table_fill)
    assert fill is not None
    assert fill[0] == 25
    assert fill[1] > 0


async def test_errors_by_kind_come_from_the_reactor(autojump_clock: trio.testing.MockClock) -> None:
    backend = FakeBackend()
    reactor = Reactor(backend, ReactorConfig(startup_sweep=False), predictor=stale_when_up2)
    metrics = Metrics(lambda: reactor.errors)
    reactor.reaction_hooks.append(metrics.observe)
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        backend.ruleset_error = True  # unreadable: the previous ruleset stays, and it is counted
        await backend.send.send(Trigger("nft", "ruleset changed"))
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    got = samples(metrics.exposition().decode())
    assert got["topowatch_errors_total{kind=ruleset}"] == 1
    assert got["topowatch_errors_total{kind=reaction}"] == 0
    assert got["topowatch_reactions_total{result=nothing}"] == 1


async def test_entries_kept_by_the_recheck_are_counted(autojump_clock: trio.testing.MockClock) -> None:
    metrics = Metrics(sysctl_dir="/nonexistent")
    backend = FakeBackend()
    answered = backend.table[0]

    async def reply_arrives(entries: object) -> None:
        backend.table[0] = replace(answered, status=answered.status | IPS_SEEN_REPLY)

    async with trio.open_nursery() as nursery:
        reactor = Reactor(backend, ReactorConfig(startup_sweep=False), predictor=stale_when_up2,
                          on_reaction=metrics.observe)
        reactor.before_delete = reply_arrives
        await nursery.start(reactor.run)
        backend.topo = B
        await backend.send.send(Trigger("rtnl", "link up2 added"))
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    got = samples(metrics.exposition().decode())
    assert got["topowatch_entries_kept_total{reason=replied}"] == 1
    assert got["topowatch_entries_deleted_total"] == 1
