# SPDX-License-Identifier: GPL-2.0-or-later
"""Prometheus metrics: what reactions did, how long they took, how full the table is.

Theory of operation: ``Metrics`` owns a private ``CollectorRegistry``.
``observe`` (the reactor's ``on_reaction`` callback) adds one reaction to
the counters and the latency histogram. Two values are read when the
registry is collected, never cached: the conntrack table fill
(``nf_conntrack_count`` against ``nf_conntrack_max`` under
/proc/sys/net/netfilter, in the namespace the daemon runs in) and the
reactor's error counts by kind. They are exposed either

- on a local HTTP endpoint (``--metrics-listen 127.0.0.1:9877``) served by
  trio itself: prometheus-client's own server is a thread, which the daemon
  does not need for one GET handler. At most ``MAX_CONNECTIONS`` are served
  at once (more wait in the kernel's listen backlog, holding none of our
  file descriptors), each for at most ``HTTP_TIMEOUT`` seconds, so local
  clients cannot starve the daemon's netlink sockets of descriptors; an
  accept that fails (EMFILE, ...) is logged and tried again later; or
- in a textfile for node_exporter's textfile collector
  (``--metrics-textfile PATH``), rewritten by atomic rename after every
  reaction and every ``refresh`` seconds (0: after reactions only). The
  temporary file is made by ``mkstemp`` (O_EXCL: a planted file or symlink
  is never written through) in the target's directory, which must pass the
  same owner and mode checks as the state directory (``topowatch.trust``);
  a directory that fails is refused (said once per reason), never written.

This module never decides anything about entries and never touches the
conntrack table; a metric it cannot read is left out, never made up.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping

import trio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from topowatch.errors import UsageError
from topowatch.pressure import PressureEvent
from topowatch.reactor import Reaction
from topowatch.trust import directory_problem

log = logging.getLogger("topowatch.metrics")

NETFILTER_SYSCTLS = "/proc/sys/net/netfilter"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, math.inf)
HTTP_TIMEOUT = 5.0
MAX_REQUEST_BYTES = 8192
MAX_CONNECTIONS = 8
ACCEPT_RETRY = 1.0  # after a failed accept (EMFILE, ENFILE, ENOBUFS, ENOMEM, ...)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT`` for IPv6) into a host and a port."""
    host, sep, port = text.rpartition(":")
    # ASCII digits, few: str.isdigit() takes "²", and int() refuses "²" and 5,000 digits with a ValueError.
    number = port.isascii() and port.isdigit() and len(port) <= 5
    if not sep or not host or not number or not 0 < int(port) < 65536:
        raise UsageError(f"--metrics-listen: expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def read_table_fill(sysctl_dir: str = NETFILTER_SYSCTLS) -> tuple[int, int] | None:
    """(nf_conntrack_count, nf_conntrack_max) of this namespace, or None when unreadable."""
    try:
        with open(os.path.join(sysctl_dir, "nf_conntrack_count")) as f:
            count = int(f.read())
        with open(os.path.join(sysctl_dir, "nf_conntrack_max")) as f:
            limit = int(f.read())
    except (OSError, ValueError):
        return None
    return count, limit


class _LiveCollector(Collector):
    """Values read at collection time: the table fill and the reactor's error counts."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        fill = read_table_fill(self.metrics.sysctl_dir)
        if fill is not None:
            count, limit = fill
            yield GaugeMetricFamily("topowatch_conntrack_entries",
                                    "Entries in the conntrack table (nf_conntrack_count)", value=count)
            yield GaugeMetricFamily("topowatch_conntrack_max",
                                    "Size limit of the conntrack table (nf_conntrack_max)", value=limit)
            yield GaugeMetricFamily("topowatch_conntrack_fill_ratio",
                                    "nf_conntrack_count / nf_conntrack_max",
                                    value=count / limit if limit else 0.0)
        state = self.metrics.pressure_state
        if state is not None:
            yield GaugeMetricFamily("topowatch_pressure_high", "1 while the table is above the pressure "
                                    "policy's high mark (until it falls below the low mark)",
                                    value=1.0 if state() == "high" else 0.0)
        errors = CounterMetricFamily("topowatch_errors", "Errors by kind", labels=["kind"])
        for kind, value in sorted(self.metrics.errors().items()):
            errors.add_metric([kind], value)
        yield errors


class Metrics:
    """The daemon's metrics; ``observe`` is the reactor's ``on_reaction`` callback."""

    def __init__(
        self,
        errors: Callable[[], Mapping[str, int]] = dict,
        *,
        sysctl_dir: str = NETFILTER_SYSCTLS,
    ) -> None:
        self.sysctl_dir = sysctl_dir
        self._reactor_errors = errors
        self._delete_failures = 0
        self._textfile_problem: str | None = None  # the last reason the textfile was not written
        self.registry = CollectorRegistry()
        r = self.registry
        self.reactions = Counter("topowatch_reactions", "Reactions by result (deleted, dry_run, refused, "
                                 "nothing)", ["result"], registry=r)
        self.examined = Counter("topowatch_entries_examined", "Conntrack entries examined", registry=r)
        self.eligible = Counter("topowatch_entries_eligible", "Entries eligible under the policy", registry=r)
        self.stale = Counter("topowatch_entries_stale", "Entries judged stale", registry=r)
        self.undecided = Counter("topowatch_entries_undecided", "Entries that could not be judged",
                                 registry=r)
        self.deleted = Counter("topowatch_entries_deleted", "Stale entries deleted", registry=r)
        self.kept = Counter("topowatch_entries_kept", "Stale entries the re-check before the delete kept "
                            "(replied: a reply came after the dump; changed: otherwise no longer admitted)",
                            ["reason"], registry=r)
        for reason in ("replied", "changed"):
            self.kept.labels(reason)
        self.latency = Histogram("topowatch_reaction_latency_seconds",
                                 "From the first event of a burst to the last delete",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.last = Gauge("topowatch_last_reaction_timestamp_seconds", "When the last reaction ended",
                          registry=r)
        for result in ("deleted", "dry_run", "refused", "nothing"):
            self.reactions.labels(result)
        self.pressure_episodes = Counter("topowatch_pressure_episodes",
                                         "Times the table fill crossed the pressure policy's high mark",
                                         registry=r)
        self.evicted = Counter("topowatch_pressure_evicted", "Entries evicted under table pressure, by class",
                               ["class"], registry=r)
        self.timeout_changes = Counter("topowatch_pressure_timeout_changes",
                                       "Conntrack timeouts lowered or restored by the pressure policy",
                                       registry=r)
        # The pressure agent's state (normal/high), read at collection; None: no agent.
        self.pressure_state: Callable[[], str] | None = None
        r.register(_LiveCollector(self))

    def errors(self) -> dict[str, int]:
        counts = {"delete": self._delete_failures, "reaction": 0, "ruleset": 0, "source": 0}
        for kind, value in self._reactor_errors().items():
            counts[kind] = counts.get(kind, 0) + value
        return counts

    def observe(self, reaction: Reaction) -> None:
        plan = reaction.plan
        if reaction.refused:
            result = "refused"
        elif reaction.dry_run and plan.stale:
            result = "dry_run"
        elif reaction.deleted.deleted:
            result = "deleted"
        else:
            result = "nothing"
        self.reactions.labels(result).inc()
        self.examined.inc(plan.examined)
        self.eligible.inc(plan.eligible)
        self.stale.inc(len(plan.stale))
        self.undecided.inc(len(plan.undecided))
        self.deleted.inc(reaction.deleted.deleted)
        self.kept.labels("replied").inc(reaction.deleted.kept_replied)
        self.kept.labels("changed").inc(reaction.deleted.kept_changed)
        self._delete_failures += reaction.deleted.failed
        self.latency.observe(reaction.latency)
        self.last.set(time.time())

    def observe_pressure(self, event: PressureEvent) -> None:
        if event.kind == "start":
            self.pressure_episodes.inc()
        elif event.kind == "evict":
            for name, count in event.by_class.items():
                self.evicted.labels(name).inc(count)
        elif event.kind == "timeouts":
            self.timeout_changes.inc(event.timeouts_changed)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def write_textfile(self, path: str) -> bool:
        """Write the textfile by atomic rename; False (logged once per reason) when it cannot be written."""
        directory = os.path.dirname(os.path.abspath(path))
        problem = directory_problem(directory)
        if problem is None:
            try:
                fd, tmp = tempfile.mkstemp(prefix=".topowatch-metrics-", suffix=".tmp", dir=directory)
            except OSError as exc:
                problem = f"cannot create a temporary file in {directory}: {exc.strerror or exc}"
        if problem is not None:
            if problem != self._textfile_problem:
                log.error("cannot write the metrics textfile %s: %s", path, problem)
            self._textfile_problem = problem
            return False
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o644)  # node_exporter reads it
                f.write(generate_latest(self.registry))
            os.replace(tmp, path)  # replaces a symlink at ``path`` itself, never its target
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            problem = f"{exc.strerror or exc}"
            if problem != self._textfile_problem:
                log.error("cannot write the metrics textfile %s: %s", path, problem)
            self._textfile_problem = problem
            return False
        self._textfile_problem = None
        return True


async def serve_textfile(metrics: Metrics, path: str, refresh: float) -> None:
    """Keep ``path`` current: now, then every ``refresh`` seconds (0: only now; reactions write it too)."""
    metrics.write_textfile(path)
    if refresh <= 0:
        return
    while True:
        await trio.sleep(refresh)
        metrics.write_textfile(path)


async def _answer(metrics: Metrics, stream: trio.abc.Stream) -> None:
    request = b""
    while b"\r\n\r\n" not in request and b"\n\n" not in request and len(request) < MAX_REQUEST_BYTES:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        request += chunk
    words = request.split(b"\n", 1)[0].split()
    method, target = (words[0], words[1].split(b"?")[0]) if len(words) >= 2 else (b"", b"")
    if method in (b"GET", b"HEAD") and target in (b"/metrics", b"/"):
        status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, metrics.exposition()
    elif method in (b"GET", b"HEAD"):
        status, ctype, body = "404 Not Found", "text/plain", b"try /metrics\n"
    else:
        status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
    head = (f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    await stream.send_all(head if method == b"HEAD" else head + body)


async def serve_http(
    metrics: Metrics,
    listeners: list[trio.SocketListener],
    *,
    max_connections: int = MAX_CONNECTIONS,
    timeout: float = HTTP_TIMEOUT,
) -> None:
    """Serve ``GET /metrics`` on bound listeners until cancelled (trio, no thread).

    Never raises for a client or a failed accept: the daemon must outlive both.
    """
    for listener in listeners:
        host, port = listener.socket.getsockname()[:2]
        log.info("metrics on http://%s:%d/metrics", host if ":" not in host else f"[{host}]", port)
    slots = trio.Semaphore(max_connections)  # shared by all listeners

    async def handler(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(timeout):
                await _answer(metrics, stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("metrics client went away: %s", exc)
        finally:
            await trio.aclose_forcefully(stream)
            slots.release()

    async def accept_loop(listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:  # closed when the server stops
            await accept_forever(listener, nursery)

    async def accept_forever(listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        failed = False
        while True:
            await slots.acquire()  # at the cap, the next client waits in the backlog
            try:
                stream = await listener.accept()
            except OSError as exc:
                slots.release()
                if not failed:
                    log.error("metrics: cannot accept a connection (%s); trying again every %.0f s",
                              exc.strerror or exc, ACCEPT_RETRY)
                failed = True
                await trio.sleep(ACCEPT_RETRY)
                continue
            except BaseException:
                slots.release()
                raise
            failed = False
            nursery.start_soon(handler, stream)

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(accept_loop, listener, nursery)
