"""Faults of the external tools and of the ruleset under a running reactor.

A missing ``nft``, an ``nft`` that hangs, EMFILE when spawning one, and a
ruleset swapped between its read and the deletes. The tools are real
programs (shell scripts standing in for nft on a path of their own) run by
the real readers (``edges.iptables.read_all``, ``edges.nft.read_ruleset``);
topology, entries and deletes are the fake backend's, on trio's virtual
clock. The contract: the reaction goes on, logs one line, keeps the previous
ruleset, and never deletes on a ruleset it knows is stale.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from test_reactor import B, FakeBackend, nft_doc
from topowatch.core.decide import Decider
from topowatch.core.eligibility import Eligibility
from topowatch.core.fib import Fib
from topowatch.core.flow import NO_NAT, Binding, Flow, NatKind, Prediction
from topowatch.core.nat import NatRuleset
from topowatch.edges import iptables, nft
from topowatch.edges.iptables import read_all
from topowatch.edges.nft import parse_ruleset_json, read_ruleset
from topowatch.errors import MissingTool, RulesetError
from topowatch.reactor import Reactor, ReactorConfig, Trigger

MASQUERADED = frozenset({Binding(NatKind.MASQUERADE, IPv4Address("203.0.113.2"))})


def masquerade_if_post(ruleset: NatRuleset, fib: Fib, flow: Flow) -> Prediction:
    """A ruleset with a chain named "post" masquerades every flow; any other NATs nothing."""
    post = any(c.name == "post" for c in ruleset.chains)
    return Prediction(dnat=frozenset({NO_NAT}), snat=MASQUERADED if post else frozenset({NO_NAT}), egress=())


async def start(backend: FakeBackend, nursery: trio.Nursery) -> Reactor:
    reactor = Reactor(backend, ReactorConfig(startup_sweep=False), predictor=masquerade_if_post)
    await nursery.start(reactor.run)
    return reactor


# --- a ruleset swapped between its read and the deletes ----------------------------------------


class SwappingBackend(FakeBackend):
    """Rulesets from nft JSON; ``during_dump`` runs while the entries are dumped (a commit meanwhile)."""

    ruleset_events = True

    def __init__(self) -> None:
        super().__init__()
        self.doc = nft_doc("post")
        self.during_dump: Callable[[], Any] | None = None
        self.event_in_flight = False  # the commit's event has not reached the reactor when it deletes
        self.generation_moved = False

    async def ruleset(self) -> NatRuleset:
        self.rulesets_read += 1
        self.generation_moved = False
        return parse_ruleset_json(self.doc)

    async def ruleset_unchanged(self) -> bool:
        return not self.generation_moved

    async def judge(
        self, eligibility: Eligibility, decider: Callable[[Any], Decider], early: Any = None
    ) -> Decider:
        judging = decider(None)
        for e in self.table:
            judging.add(e)
        if self.during_dump is not None:
            change, self.during_dump = self.during_dump, None
            change()
            self.generation_moved = True
            if not self.event_in_flight:
                # The commit's event reaches the reactor while the dump is still running.
                await self.send.send(Trigger("nftables", "nftables ruleset changed (generation 9)", kind="ruleset"))
                await trio.sleep(0.01)
        return judging


async def test_a_ruleset_swapped_during_the_dump_deletes_nothing_on_the_old_one(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    backend = SwappingBackend()
    backend.doc = nft_doc("other")  # at start: no NAT, and the entries have none: healthy
    async with trio.open_nursery() as nursery:
        reactor = await start(backend, nursery)
        backend.topo = B  # and a link came up meanwhile
        backend.doc = nft_doc("post")  # a masquerade rule: both entries are stale by it ...

        def swap() -> None:  # ... but it is taken back while the reaction dumps
            backend.doc = nft_doc("other")

        backend.during_dump = swap
        with caplog.at_level(logging.INFO, logger="topowatch.reactor"):
            await backend.send.send(Trigger("nftables", "nftables ruleset changed (generation 8)", kind="ruleset"))
            await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert backend.deleted == []  # judged stale by a ruleset no longer in force: kept
    first, second = reactor.reactions
    assert first.skipped == "the ruleset changed during the reaction; the next reaction decides on the new one"
    assert [r.message for r in caplog.records if "changed during the reaction" in r.message] == [first.summary()]
    assert "up2" in second.change.summary()  # T0 stayed: the next reaction still sees the change
    assert "generation 9" in second.trigger
    assert second.skipped is None and second.plan.examined == 2 and not second.plan.stale
    assert reactor.ruleset == parse_ruleset_json(nft_doc("other"))


async def test_a_swap_whose_event_is_still_in_flight_is_seen_by_the_generation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The kernel's generation id moved, no trigger yet: the reaction reads again before deleting."""
    backend = SwappingBackend()
    backend.doc = nft_doc("other")
    backend.event_in_flight = True
    async with trio.open_nursery() as nursery:
        reactor = await start(backend, nursery)
        backend.doc = nft_doc("post")

        def swap() -> None:
            backend.doc = nft_doc("other")

        backend.during_dump = swap
        await backend.send.send(Trigger("nftables", "nftables ruleset changed (generation 8)", kind="ruleset"))
        await trio.sleep(1)
        assert backend.deleted == []
        assert reactor.reactions[0].skipped is not None and "changed during the reaction" in reactor.reactions[0].skipped
        # The event arrives: the next reaction decides on the ruleset now in force.
        await backend.send.send(Trigger("nftables", "nftables ruleset changed (generation 9)", kind="ruleset"))
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert backend.deleted == [] and reactor.reactions[1].skipped is None and not reactor.reactions[1].plan.stale


async def test_a_change_outside_the_nat_chains_during_the_dump_still_deletes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = SwappingBackend()
    backend.doc = nft_doc("other")
    async with trio.open_nursery() as nursery:
        reactor = await start(backend, nursery)
        backend.doc = nft_doc("post")

        def filter_change() -> None:  # a filter table changed: the NAT part read is the same
            backend.doc = {"nftables": [*nft_doc("post")["nftables"],
                                        {"table": {"family": "inet", "name": "filter", "handle": 7}}]}

        backend.during_dump = filter_change
        read_before = backend.rulesets_read
        await backend.send.send(Trigger("nftables", "nftables ruleset changed (generation 8)", kind="ruleset"))
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert len(backend.deleted) == 2  # read again, the same NAT: the decisions stand
    assert reactor.reactions[0].skipped is None and reactor.reactions[0].deleted.deleted == 2
    assert backend.rulesets_read >= read_before + 2  # once for the reaction, once to confirm before deleting


# --- nft missing, hanging, unspawnable, with the real readers ----------------------------------


def fake_nft(tmp_path: Path, doc: dict[str, Any]) -> Path:
    """An ``nft`` that prints ``doc`` for ``-j list ruleset``, and hangs while ``hang`` exists beside it."""
    (tmp_path / "ruleset.json").write_text(json.dumps(doc))
    path = tmp_path / "nft"
    path.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        [ -e {tmp_path / "hang"} ] && exec sleep 600
        [ "$*" = "-j list ruleset" ] || exit 3
        exec cat {tmp_path / "ruleset.json"}
        """))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


class ToolBackend(FakeBackend):
    """The ruleset as the kernel backend reads it: ``read_all`` in a worker thread, running ``nft``."""

    ruleset_events = True

    def __init__(self, nft_path: Path) -> None:
        super().__init__()
        self.nft = str(nft_path)

    async def ruleset(self) -> NatRuleset:
        self.rulesets_read += 1

        def read() -> NatRuleset:
            # No legacy table is looked for: that would read this host's /proc.
            return read_all(self.nft, legacy_exists=lambda family: False).ruleset

        return await trio.to_thread.run_sync(read)


async def reaction_with_a_broken_nft(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock,
    break_it: Callable[[Path], None],
) -> Reactor:
    """Start on a good ruleset, break nft, trigger a ruleset reaction; the reactor must go on."""
    path = fake_nft(tmp_path, nft_doc("post"))
    backend = ToolBackend(path)
    async with trio.open_nursery() as nursery:
        reactor = await start(backend, nursery)
        good = reactor.ruleset
        assert good == parse_ruleset_json(nft_doc("post"))
        break_it(path)
        with caplog.at_level(logging.INFO, logger="topowatch.reactor"):
            await backend.send.send(Trigger("nftables", "nftables ruleset changed (generation 3)", kind="ruleset"))
            # Real time passes in the worker thread (a hanging nft is killed after its timeout).
            autojump_clock.autojump_threshold = 0.5
            with trio.fail_after(60):
                while not reactor.reactions:
                    await trio.sleep(0.2)
        (unreadable,) = [r for r in caplog.records if "ruleset unreadable" in r.message]
        assert unreadable.levelno == logging.ERROR and "keeping the previous one" in unreadable.message
        assert reactor.ruleset is good  # the previous ruleset stays in force ...
        (reaction,) = reactor.reactions
        assert reaction.skipped is None and len(backend.deleted) == 2  # ... and the reaction decided by it
        assert reactor.errors == {"ruleset": 1}
        nursery.cancel_scope.cancel()
    return reactor


async def test_nft_missing_keeps_the_previous_ruleset(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    await reaction_with_a_broken_nft(tmp_path, caplog, autojump_clock, lambda path: path.unlink())
    assert any("not found: install nftables" in r.message for r in caplog.records)


async def test_nft_hanging_times_out_and_keeps_the_previous_ruleset(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(nft, "NFT_TIMEOUT", 0.5)
    await reaction_with_a_broken_nft(tmp_path, caplog, autojump_clock,
                                     lambda path: (path.parent / "hang").touch())
    assert any("nft -j list ruleset did not answer within" in r.message for r in caplog.records)


async def test_emfile_spawning_nft_keeps_the_previous_ruleset(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_descriptors(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    await reaction_with_a_broken_nft(tmp_path, caplog, autojump_clock,
                                     lambda path: monkeypatch.setattr(nft.subprocess, "run", no_descriptors))
    assert any("cannot run" in r.message and "Too many open files" in r.message for r in caplog.records)


def test_emfile_for_real_is_a_ruleset_error(tmp_path: Path) -> None:
    """Every descriptor in use (RLIMIT_NOFILE reached): running nft is our error, not an OSError."""
    path = fake_nft(tmp_path, nft_doc("post"))
    script = textwrap.dedent(f"""\
        import os, resource
        from topowatch.edges.nft import read_ruleset
        from topowatch.errors import TopowatchError
        read_ruleset({str(path)!r})  # works while descriptors are free
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        held = []
        try:
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        try:
            read_ruleset({str(path)!r})
        except TopowatchError as exc:
            print(type(exc).__name__, exc)
        """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("RulesetError cannot run "), proc.stdout
    assert "Too many open files" in proc.stdout


def test_read_ruleset_maps_each_spawn_failure_to_our_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(MissingTool):
        read_ruleset(str(tmp_path / "absent"))
    for code in (errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM):
        def fail(*args: Any, code: int = code, **kwargs: Any) -> None:
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(nft.subprocess, "run", fail)
        with pytest.raises(RulesetError, match=f"cannot run {tmp_path / 'nft'}: {os.strerror(code)}"):
            read_ruleset(str(tmp_path / "nft"))


def test_a_hanging_tool_times_out_before_the_watchdog_restarts_the_daemon() -> None:
    """The reaction that waits for a hanging nft (then reads on with the previous ruleset) must end
    well inside the unit's WatchdogSec, or systemd restarts the daemon instead."""
    unit = (Path(__file__).resolve().parents[1] / "contrib" / "topowatch.service").read_text()
    found = re.search(r"^WatchdogSec=(\d+)s?$", unit, re.MULTILINE)
    assert found is not None
    watchdog = float(found.group(1))
    assert watchdog / 2 >= nft.NFT_TIMEOUT
    assert watchdog / 2 >= iptables.SAVE_TIMEOUT
