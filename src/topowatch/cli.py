# SPDX-License-Identifier: GPL-2.0-or-later
"""The command line: run, plan, flush, check, doctor, lab.

Every command works in the network namespace it is started in and touches
only that namespace; one daemon per namespace (``nslock``). Exit status: 0
success, 1 runtime error (one line on stderr, never a traceback), 2 usage;
``plan --exit-code`` 4 when stale entries were found; ``status`` 3 when no
daemon runs (systemctl's convention; 1 when it cannot ask). A closed stdout
(``plan | head -1``) ends a one-shot command quietly (SIGPIPE's default).
This module parses arguments and wires edges to the reactor; it decides
nothing itself.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import trio

from topowatch import __version__
from topowatch.errors import PermissionDenied, TopowatchError, UsageError
from topowatch.logs import setup_logging
from topowatch.text import escape

if TYPE_CHECKING:
    from topowatch.core.decide import Decision, FlushPlan
    from topowatch.core.model import Topology
    from topowatch.core.nat import NatRuleset
    from topowatch.policy import PolicyStore
    from topowatch.pressure import PressureAgent
    from topowatch.reactor import Reaction, Reactor
    from topowatch.sdnotify import Notifier
    from topowatch.snapshots import Choice

log = logging.getLogger("topowatch")

# How long a SIGHUP may spend reading the policy files before the previous policy simply stays.
RELOAD_TIMEOUT = 10.0
# Policy errors logged or printed at most (a hostile file can hold tens of thousands); `check` shows all.
MAX_ERRORS_SHOWN = 20


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0: {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def _listen_address(text: str) -> tuple[str, int]:
    from topowatch.metrics import parse_listen

    try:
        return parse_listen(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# Exit status of ``plan --exit-code`` when stale entries were found.
EXIT_STALE = 4
# Exit status of ``status`` when no daemon runs (systemctl's and LSB's "not running").
EXIT_NOT_RUNNING = 3


STATE_DIR_HELP = ("where state that must survive a crash lives (the timeouts a pressure policy lowered, "
                  "the daemon's snapshots for plan and flush; default /run/topowatch)")


def _audit_options(command: argparse.ArgumentParser, rules_help: str) -> None:
    output = command.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print one JSON object")
    output.add_argument("--json-lines", action="store_true",
                        help="print one JSON object per entry, then one summary object")
    command.add_argument("--summary", action="store_true", help="print the counts by reason code, no entries")
    command.add_argument("--limit", type=_positive_int, metavar="N",
                         help="show at most N stale and N undecided entries (the counts stay whole)")
    command.add_argument("--rules-dir", action="append", metavar="DIR", help=rules_help)
    command.add_argument("--state-dir", default="/run/topowatch", metavar="DIR",
                         help="the daemon's state directory, where its snapshots are read (default "
                         "/run/topowatch)")
    command.add_argument("--previous", default="auto", metavar="auto|none|FILE",
                         help="the snapshot an entry may have been made under: auto (default): the "
                         "running daemon's, from its state directory, when there is one and it is "
                         "trusted; none: no previous snapshot (an entry whose way in is not known "
                         "may stay undecided); FILE: that snapshot file")
    conntrack = command.add_argument_group(
        "filters (as conntrack's; they only narrow what the policies select, never widen it)")
    conntrack.add_argument("-p", "--proto", metavar="PROTO", help="protocol name or number")
    conntrack.add_argument("-s", "--src", "--orig-src", metavar="ADDR[/LEN]", help="original source")
    conntrack.add_argument("-d", "--dst", "--orig-dst", metavar="ADDR[/LEN]", help="original destination")
    conntrack.add_argument("-w", "--zone", metavar="ZONE", help="conntrack zone")
    conntrack.add_argument("-m", "--mark", metavar="MARK[/MASK]", help="conntrack mark, optional mask")
    conntrack.add_argument("-f", "--family", choices=("ipv4", "ipv6"), help="address family")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="topowatch",
        description="Delete exactly the UNREPLIED conntrack entries that a topology change left "
        "NATed the wrong way.",
    )
    parser.add_argument("--version", action="version", version=f"topowatch {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log detail (-v: a line per deleted entry; -vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    parser.add_argument("--log-format", choices=("text", "json"), default=None,
                        help="log record format (json: one object per line, a record per deleted entry)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="the daemon: react to topology events")
    run.add_argument("--debounce", type=_positive_float, default=None, metavar="SECONDS",
                     help="quiet gap that ends a burst of events (default: the policies', 0.25)")
    run.add_argument("--max-wait", type=_positive_float, default=None, metavar="SECONDS",
                     help="react at the latest this long after a burst began (default: the policies', 2)")
    run.add_argument("--dry-run", action="store_true", help="log what would be deleted, delete nothing")
    run.add_argument("--max-deletions", type=_positive_int, default=100_000, metavar="N",
                     help="refuse a reaction that would delete more than N entries (default 100000)")
    run.add_argument("--no-startup-sweep", action="store_true",
                     help="do not judge the table once at start")
    run.add_argument("--no-dbus", action="store_true",
                     help="no D-Bus service and no NetworkManager events (system bus)")
    rules_help = "read policies only from DIR (repeatable, highest priority first)"
    run.add_argument("--rules-dir", action="append", metavar="DIR", help=rules_help)
    run.add_argument("--state-dir", default="/run/topowatch", metavar="DIR", help=STATE_DIR_HELP)
    run.add_argument("--metrics-listen", type=_listen_address, metavar="HOST:PORT",
                     help="serve Prometheus metrics on http://HOST:PORT/metrics (e.g. 127.0.0.1:9877)")
    run.add_argument("--metrics-textfile", metavar="PATH",
                     help="write Prometheus metrics to PATH (atomic rename) for node_exporter")
    run.add_argument("--metrics-refresh", type=_positive_float, default=60.0, metavar="SECONDS",
                     help="also rewrite the textfile this often, for the table fill (0: after "
                     "reactions only; default 60)")

    plan = sub.add_parser("plan", help="audit now: list stale entries, delete nothing")
    _audit_options(plan, rules_help)
    plan.add_argument("--exit-code", action="store_true",
                      help=f"exit {EXIT_STALE} when stale entries were found, 0 when none")

    flush = sub.add_parser("flush", help="delete the stale entries now")
    flush.add_argument("--dry-run", action="store_true", help="show what would be deleted, delete nothing")
    flush.add_argument("--max-deletions", type=_positive_int, default=100_000, metavar="N",
                       help="refuse to delete more than N entries (default 100000)")
    _audit_options(flush, rules_help)

    check = sub.add_parser("check", help="validate rules.d; show the effective policy and what it may delete")
    check.add_argument("--rules-dir", action="append", metavar="DIR", help=rules_help)
    check.add_argument("--json", action="store_true", help="print one JSON object")

    doctor = sub.add_parser("doctor", help="probe what this kernel and system support")
    doctor.add_argument("--json", action="store_true", help="print one JSON object")

    status = sub.add_parser("status", help="ask the running daemon for its counters (over D-Bus)")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    trigger = sub.add_parser("trigger", help="ask the running daemon to react now (over D-Bus; root)")
    trigger.add_argument("--interface", metavar="IF", help="the interface that changed (default: all)")
    trigger.add_argument("--json", action="store_true", help="print one JSON object")
    bus_name = sub.add_parser("bus-name", help="print the D-Bus name of the daemon of this network namespace "
                              "(what the CLI and the hooks call)")
    bus_name.add_argument("--netns", metavar="NAME", help="of the namespace `ip netns` calls NAME instead")

    lab = sub.add_parser("lab", help="build a namespace lab and show topowatch fixing stuck flows")
    lab.add_argument("--keep", action="store_true", help="leave the lab's namespaces in place")
    for command in sub.choices.values():
        _global_options_after(command)
    return parser


def _global_options_after(command: argparse.ArgumentParser) -> None:
    """The global options, accepted after the command too (``topowatch plan -v``); main() merges them."""
    group = command.add_argument_group("global options (also before the command)")
    group.add_argument("-v", "--verbose", dest="sub_verbose", action="count", default=argparse.SUPPRESS,
                       help="more log detail")
    group.add_argument("-q", "--quiet", dest="sub_quiet", action="store_true", default=argparse.SUPPRESS,
                       help="warnings and errors only")
    group.add_argument("--log-format", dest="sub_log_format", choices=("text", "json"),
                       default=argparse.SUPPRESS, help="log record format")


def _require_root(command: str) -> None:
    if os.geteuid() != 0:
        raise PermissionDenied(
            f"'{command}' needs root (CAP_NET_ADMIN) to read and change the conntrack table; "
            "run it with sudo"
        )


async def _audit(args: argparse.Namespace, delete: bool) -> int:
    from topowatch.edges.kernel import KernelBackend
    from topowatch.filters import EntryFilter, narrow
    from topowatch.policy import load_policies
    from topowatch.reactor import plan_once, still_stale

    dry_run = delete and args.dry_run
    entry_filter = EntryFilter.parse(proto=args.proto, src=args.src, dst=args.dst, zone=args.zone,
                                     mark=args.mark, family=args.family)
    selection = load_policies(args.rules_dir).select([("request", None)])
    eligibility = selection.eligibility
    backend = KernelBackend()
    start = time.monotonic()
    topology = await backend.topology()
    ruleset = await backend.ruleset()
    entries = await backend.entries(eligibility) if selection.policies else []
    entries = narrow(entries, eligibility, entry_filter)

    choice = _previous_snapshot(args.previous, args.state_dir, topology, ruleset)
    before = None if choice.previous is None else (choice.previous.topology, choice.previous.ruleset)
    plan = plan_once(topology, ruleset, entries, eligibility, previous=before)
    deleted: int | None = None
    flushed = [d for d in plan.stale if selection.flushes(d.entry)]
    if delete and not dry_run:
        cap = min(args.max_deletions, selection.max_deletions)
        if len(flushed) > cap:
            raise TopowatchError(
                f"{len(flushed)} stale entries exceed the cap of {cap} deletions; nothing deleted"
            )
        result = await backend.delete([d.entry for d in flushed], still_stale(selection))
        deleted = result.deleted
        _log_entries("deleted", flushed)
        if result.failed:
            log.error("%d deletes failed: %s", result.failed, "; ".join(result.errors[:3]))
    elif delete:
        deleted = 0
        _log_entries("would delete", flushed)
    elapsed = time.monotonic() - start
    _print_plan(args, plan, elapsed, deleted, entry_filter.json(),
                verb="deleted" if delete and not dry_run else "stale", previous=choice)
    if not (args.json or args.json_lines):
        if delete and not dry_run:
            print(f"deleted {deleted} entries")
        elif dry_run:
            print(f"dry run: {len(flushed)} entries would be deleted")
    if getattr(args, "exit_code", False) and plan.stale:
        return EXIT_STALE
    return 0


def _previous_snapshot(option: str, state_dir: str, topology: Topology, ruleset: NatRuleset) -> Choice:
    """The previous snapshot ``--previous`` asks for (``snapshots.choose``), and why.

    ``auto``: the running daemon's file in ``state_dir``; not there, not
    trusted, of another namespace or version, damaged, or of a daemon that no
    longer runs (the file then says nothing of the changes since): none, and
    one log line says why. ``none``: none. Else a file's path: as ``auto``,
    whichever daemon wrote it.
    """
    from topowatch import nslock, snapshots
    from topowatch.edges.sysctl import netns_key

    if option == "none":
        return snapshots.Choice(None, "none", None, "--previous none")
    netns = netns_key()
    auto = option == "auto"
    path = snapshots.snapshot_path(state_dir, netns) if auto else option
    try:
        stored = snapshots.load(path, netns)
        if auto:
            holder = nslock.holder()
            if holder is None:
                raise snapshots.SnapshotError("no daemon runs in this namespace: its snapshot says nothing "
                                              "of the changes since it stopped")
            if holder not in (0, stored.pid):
                raise snapshots.SnapshotError(f"written by pid {stored.pid}, not by the daemon that runs "
                                              f"(pid {holder}), which has not written its own yet")
        return snapshots.choose(stored, topology, ruleset, source="daemon" if auto else "file", path=path)
    except FileNotFoundError:
        if not auto:
            raise UsageError(f"--previous {option}: no such file") from None
        why = f"no daemon snapshot ({path} does not exist)"
    except snapshots.SnapshotError as exc:
        why = f"daemon snapshot {path} not used: {exc}"
        log.warning("%s; judging with no previous snapshot", escape(why))
    return snapshots.Choice(None, "none", None, why, path)


def _log_entries(action: str, decisions: Sequence[Decision]) -> None:
    """A record per entry on ``topowatch.entries``: every one in JSON logs, in text with -v."""
    from topowatch.logs import ENTRIES_LOGGER
    from topowatch.report import decision_json

    entries = logging.getLogger(ENTRIES_LOGGER)
    if not entries.isEnabledFor(logging.INFO):
        return
    for d in decisions:
        entries.info("%s %s: %s", action, d.entry.describe(), d.reason,
                     extra={"fields": {"event": "entry", "action": action, **decision_json(d)}})


def _print_plan(
    args: argparse.Namespace, plan: FlushPlan, elapsed: float, deleted: int | None,
    filters: dict[str, object], *, verb: str, previous: Choice,
) -> None:
    from topowatch.report import decision_json, plan_json, plan_text, summary_json, summary_text

    limit = args.limit
    if args.json_lines:
        shown = 0
        for record, decisions in (("stale", plan.stale), ("undecided", plan.undecided)):
            for d in decisions if limit is None else decisions[:limit]:
                print(json.dumps({"record": record, **decision_json(d)}))
                shown += 1
        tail = summary_json(plan, elapsed, deleted)
        tail.update(record="summary", filters=filters, limit=limit,
                    truncated=shown < len(plan.stale) + len(plan.undecided), previous=previous.json())
        print(json.dumps(tail))
    elif args.json:
        if args.summary:
            obj = summary_json(plan, elapsed, deleted)
            obj.update(stale=[], undecided=[], truncated=bool(plan.stale or plan.undecided), limit=0)
        else:
            obj = plan_json(plan, elapsed, deleted, limit)
        obj["filters"] = filters
        obj["previous"] = previous.json()
        print(json.dumps(obj, indent=2))
    elif args.summary:
        print(summary_text(plan, elapsed, verb=verb))
        print(escape(previous.text()))
    else:
        print(plan_text(plan, elapsed, verb=verb, limit=limit))
        print(escape(previous.text()))


async def _observers(
    args: argparse.Namespace, reactor: Reactor, notifier: Notifier, pressure: PressureAgent
) -> list[Callable[[], Awaitable[None]]]:
    """Hook sd_notify STATUS and metrics onto each reaction; the tasks that serve them.

    The metrics port is bound here, before the reactor starts, so a bad
    address fails the start with a plain error.
    """
    from topowatch.metrics import Metrics, serve_http, serve_textfile
    from topowatch.sdnotify import watchdog

    tasks: list[Callable[[], Awaitable[None]]] = [functools.partial(watchdog, reactor, notifier)]
    metrics = Metrics(lambda: reactor.errors) if args.metrics_listen or args.metrics_textfile else None
    textfile = args.metrics_textfile
    if metrics is not None and args.metrics_listen:
        host, port = args.metrics_listen
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            raise UsageError(f"--metrics-listen {host}:{port}: {exc.strerror or exc}") from exc
        tasks.append(functools.partial(serve_http, metrics, listeners))
    if metrics is not None and textfile:
        tasks.append(functools.partial(serve_textfile, metrics, textfile, args.metrics_refresh))

    def on_reaction(reaction: Reaction) -> None:
        notifier.status(reaction.summary())
        if metrics is not None:
            metrics.observe(reaction)
            if textfile:
                metrics.write_textfile(textfile)

    reactor.reaction_hooks.append(on_reaction)
    if metrics is not None:
        pressure.hooks.append(metrics.observe_pressure)
        metrics.pressure_state = lambda: pressure.state.value
    return tasks


def _dbus_tasks(
    args: argparse.Namespace, reactor: Reactor, store: PolicyStore, pressure: PressureAgent,
    guard: Callable[[], bool] | None = None,
) -> list[Callable[[], Awaitable[None]]]:
    """The D-Bus service and NetworkManager events, unless --no-dbus or the extra is missing (said once)."""
    from topowatch.dbus import missing_dependency

    if args.no_dbus:
        return []
    missing = missing_dependency()
    if missing is not None:
        log.warning("D-Bus: %s; running without D-Bus and NetworkManager events", missing)
        return []
    from topowatch.dbus.networkmanager import NetworkManagerSource
    from topowatch.dbus.service import AgentService, policy_reload

    backend = reactor.backend
    if hasattr(backend, "extra_sources"):
        backend.extra_sources.append(NetworkManagerSource())
    reload = policy_reload(store, changed=pressure.policy_changed)
    return [AgentService(reactor, reload=reload, pressure=pressure, guard=guard).run]


async def reload_policies(store: PolicyStore, timeout: float = RELOAD_TIMEOUT) -> bool:
    """SIGHUP: ``PolicyStore.reload_in_worker`` within ``timeout`` s; True if the new policy is in force.

    Any failure (errors in the files, a read that does not finish in time,
    anything unexpected) is logged and keeps the previous policy: the event
    loop never waits on a file and the daemon never ends over one.
    """
    from topowatch.errors import PolicyError
    from topowatch.policy import PolicyErrors

    try:
        policy = await store.reload_in_worker(timeout)
    except PolicyErrors as exc:
        for error in exc.errors[:MAX_ERRORS_SHOWN]:
            log.error("%s", error)
        if len(exc.errors) > MAX_ERRORS_SHOWN:
            log.error("... and %d more errors", len(exc.errors) - MAX_ERRORS_SHOWN)
        log.error("keeping the previous policy")
        return False
    except PolicyError as exc:
        log.error("%s; keeping the previous policy", exc)
        return False
    log.info("policies reloaded: %s", ", ".join(p.name for p in policy.policies))
    return True


async def _run_daemon(args: argparse.Namespace) -> int:
    from topowatch import netnswatch
    from topowatch.collector import settle
    from topowatch.edges.kernel import KernelBackend
    from topowatch.edges.sysctl import TimeoutLedger
    from topowatch.nslock import acquire
    from topowatch.policy import PolicyStore
    from topowatch.pressure import PressureAgent
    from topowatch.reactor import Reactor, ReactorConfig
    from topowatch.sdnotify import Notifier
    from topowatch.snapshots import SnapshotWriter

    lock = acquire()  # before anything touches the namespace: one daemon per namespace
    store = PolicyStore.open(args.rules_dir)
    config = ReactorConfig(
        debounce=args.debounce,
        max_wait=args.max_wait,
        dry_run=args.dry_run,
        max_deletions=args.max_deletions,
        startup_sweep=not args.no_startup_sweep,
        background_details=True,
        settle=settle,
    )
    backend = KernelBackend()
    reactor = Reactor(backend, config, policy=lambda: store.current)
    pressure = PressureAgent(lambda: store.current.pressure,
                             ledger=TimeoutLedger.for_namespace(args.state_dir))
    notifier = Notifier()
    # The daemon's T0 and the one before, for plan and flush (``snapshots``); a failure only counts.
    writer = SnapshotWriter.for_namespace(args.state_dir,
                                          count=functools.partial(reactor.count_error, "snapshot"))
    reactor.t0_hook = writer.t0_moved
    reactor.before_ready = writer.flush  # the first (whole) encoding before "ready"
    writer.busy = lambda: reactor.busy_since is not None  # no write beside a reaction
    observers = await _observers(args, reactor, notifier, pressure)
    guard = netnswatch.NamespaceGuard.here()
    reactor.reaction_hooks.append(guard.after_reaction)
    observers += _dbus_tasks(args, reactor, store, pressure, guard.check)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            await nursery.start(reactor.run)
            await nursery.start(pressure.run)
            for observer in observers:
                nursery.start_soon(observer)
            notifier.ready("ready, waiting for events")

            async def wait_signal() -> None:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        if await reload_policies(store):
                            pressure.policy_changed()
                        continue
                    log.info("received %s: stopping", signal.Signals(signum).name)
                    notifier.stopping(f"stopping after {reactor.totals.reactions} reaction(s)")
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(wait_signal)
            # Stop (releasing the bus name) once `ip netns del` took this namespace's name away.
            nursery.start_soon(guard.stop_when_gone, nursery.cancel_scope)
    if not reactor.details.drain(10.0):
        log.warning("stopping before every reaction's per-entry records were written")
    log.info("stopped after %d reaction(s)", reactor.totals.reactions)
    lock.close()
    return 0


def _check_rules_dirs(dirs: list[str] | None) -> None:
    """A --rules-dir that is not there is a mistake, not an empty policy (``check`` would say "default")."""
    for directory in dirs or ():
        try:
            st = os.stat(directory)
        except FileNotFoundError:
            raise UsageError(f"--rules-dir {directory}: no such directory") from None
        except OSError as exc:
            raise UsageError(f"--rules-dir {directory}: {exc.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"--rules-dir {directory}: not a directory")


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, in order: what a nursery's failure holds."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _error_lines(exc: BaseException) -> list[str]:
    from topowatch.policy import PolicyErrors

    if isinstance(exc, PolicyErrors):
        shown = [f"  {escape(str(e))}" for e in exc.errors[:MAX_ERRORS_SHOWN]]
        more = len(exc.errors) - len(shown)
        tail = [f"  ... and {more} more"] if more else []
        return [f"{len(exc.errors)} error(s) in policy files:", *shown, *tail]
    if isinstance(exc, TopowatchError):
        return [escape(str(exc))]
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {escape(str(exc.filename))}" if exc.filename is not None else ""
        return [f"{exc.strerror}{where}"]
    return [f"unexpected {type(exc).__name__}: {escape(str(exc))}"]


def _failed(exc: BaseException, verbose: int) -> int:
    """One line on stderr (a list for policy errors), never a traceback; the exit status.

    A failure inside the daemon's nursery arrives as an exception group: the
    first error of our own kind inside it is the one reported. With ``-vv``
    the traceback follows, for a bug report.
    """
    leaves = _leaves(exc)
    if any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
        return 130
    leaf = next((e for e in leaves if isinstance(e, TopowatchError)), leaves[0])
    for line in _error_lines(leaf):
        print(f"topowatch: error: {line}" if not line.startswith("  ") else f"topowatch: {line}",
              file=sys.stderr)
    if verbose >= 2:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    return 2 if isinstance(leaf, UsageError) else 1


def main(argv: Sequence[str] | None = None) -> int:
    # A command whose reader went away (``plan | head -1``, ``--help | head``) ends quietly, as ls
    # does; the daemon and the lab keep Python's default (EPIPE as an error) and clean up.
    previous = signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in {"run", "lab"}:
        signal.signal(signal.SIGPIPE, previous)
    verbose = args.verbose + getattr(args, "sub_verbose", 0)
    quiet = args.quiet or getattr(args, "sub_quiet", False)
    log_format = getattr(args, "sub_log_format", None) or args.log_format or "text"
    setup_logging(verbose, log_format, quiet=quiet)
    for stream in (sys.stdout, sys.stderr):
        # Names from outside (interfaces, files) may hold bytes that were not UTF-8: print, never fail.
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    try:
        _check_rules_dirs(getattr(args, "rules_dir", None))
        if args.command == "lab":
            _require_root("lab")
            from topowatch.lab import run_lab

            return run_lab(keep=args.keep)
        if args.command == "doctor":
            from topowatch.doctor import doctor_main

            return doctor_main(as_json=args.json)
        if args.command == "check":
            from topowatch.policy import check_main

            return check_main(args.rules_dir, as_json=args.json)
        if args.command == "bus-name":
            from topowatch import dbus

            print(dbus.bus_name(dbus.named_suffix(args.netns) if args.netns else None))
            return 0
        if args.command in {"status", "trigger"}:
            from topowatch.dbus import missing_dependency

            missing = missing_dependency()
            if missing is not None:
                raise TopowatchError(f"'{args.command}' talks to the daemon over D-Bus, but {missing}")
            from topowatch.dbus.client import DaemonNotRunning, status_main, trigger_main

            try:
                if args.command == "status":
                    return trio.run(status_main, args.json)
                return trio.run(trigger_main, args.interface, args.json)
            except DaemonNotRunning as exc:
                if args.command != "status":
                    raise
                print(f"topowatch: {exc}", file=sys.stderr)
                return EXIT_NOT_RUNNING
        _require_root(args.command)
        if args.command == "run":
            return trio.run(_run_daemon, args)
        if args.command == "plan":
            return trio.run(_audit, args, False)
        if args.command == "flush":
            return trio.run(_audit, args, True)
        raise UsageError(f"unknown command {args.command!r}")
    except (Exception, KeyboardInterrupt, BaseExceptionGroup) as exc:
        return _failed(exc, verbose)


if __name__ == "__main__":
    sys.exit(main())
