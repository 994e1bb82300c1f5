"""The pressure ledger and the metrics textfile trust no one but root and us (sshd's StrictModes)."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import pytest

from topowatch.edges.sysctl import LedgerRecord, SysctlError, TimeoutLedger
from topowatch.metrics import Metrics

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")


def state_dir(tmp_path: Path, mode: int = 0o700) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    d.chmod(mode)
    return d


def plant(d: Path, doc: object, mode: int = 0o600) -> TimeoutLedger:
    path = d / "pressure-x.json"
    path.write_text(json.dumps(doc))
    path.chmod(mode)
    return TimeoutLedger(str(path))


LOWERED = {"saved": {"udp": 30}, "written": {"udp": 10}}


def test_a_sound_ledger_is_restored(tmp_path: Path) -> None:
    assert plant(state_dir(tmp_path), LOWERED).load() == LedgerRecord({"udp": 30}, {"udp": 10})


@pytest.mark.parametrize(("dir_mode", "file_mode"), [(0o777, 0o600), (0o700, 0o666), (0o770, 0o600)])
def test_a_ledger_others_could_write_is_not_used(tmp_path: Path, dir_mode: int, file_mode: int,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    ledger = plant(state_dir(tmp_path, dir_mode), LOWERED, file_mode)
    with caplog.at_level(logging.ERROR):
        assert ledger.load() is None
    assert "not trusted" in caplog.text and "writable by group or others" in caplog.text
    assert Path(ledger.path).exists()  # left for the admin to look at


@needs_root
def test_a_ledger_owned_by_another_user_is_not_used(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = state_dir(tmp_path)
    ledger = plant(d, LOWERED)
    os.chown(ledger.path, 1234, 1234)
    with caplog.at_level(logging.ERROR):
        assert ledger.load() is None
    assert "owned by uid 1234" in caplog.text
    os.chown(ledger.path, 0, 0)
    os.chown(d, 1234, 1234)  # a user owning the state dir could have put it there
    assert ledger.load() is None


def test_a_symlinked_ledger_is_not_followed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = state_dir(tmp_path)
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps(LOWERED))
    (d / "pressure-x.json").symlink_to(target)
    with caplog.at_level(logging.ERROR):
        assert TimeoutLedger(str(d / "pressure-x.json")).load() is None
    assert "symlink is never followed" in caplog.text


def test_only_timeouts_the_agent_lowers_within_sane_bounds_are_restored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    doc = {"saved": {"udp": 30, "tcp_established": 5, "generic": 10**9, "icmp": 5, "tcp_syn_sent": 120},
           "written": {"udp": 10, "tcp_established": 432000, "generic": 60, "icmp": 10}}
    with caplog.at_level(logging.ERROR):
        record = plant(state_dir(tmp_path), doc).load()
    # tcp_syn_sent: saved, no write recorded (a crash between the two): restorable.
    assert record == LedgerRecord({"udp": 30, "tcp_syn_sent": 120}, {"udp": 10})
    assert "tcp_established: not a timeout topowatch lowers" in caplog.text
    assert "generic: saved value 1000000000 is not a sane timeout" in caplog.text
    assert "icmp: written value 10 is not below the saved 5" in caplog.text


def test_no_ledger_is_saved_in_a_directory_others_may_write(tmp_path: Path) -> None:
    d = state_dir(tmp_path, 0o777)
    with pytest.raises(SysctlError, match="will not save"):
        TimeoutLedger(str(d / "pressure-x.json")).save(LedgerRecord({"udp": 30}, {"udp": 10}))


def test_the_textfile_never_writes_through_a_planted_symlink(tmp_path: Path) -> None:
    d = tmp_path / "textfile"
    d.mkdir(mode=0o755)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    path = d / "topowatch.prom"
    # prometheus-client's own writer used a predictable temporary name: plant a link at it, and at the path.
    (d / f"topowatch.prom.{os.getpid()}.{threading.current_thread().ident}").symlink_to(victim)
    path.symlink_to(victim)
    metrics = Metrics(sysctl_dir=str(tmp_path / "none"))
    assert metrics.write_textfile(str(path))
    assert victim.read_text() == "precious\n"
    assert not path.is_symlink() and "topowatch_reactions_total" in path.read_text()
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_the_textfile_is_refused_in_a_directory_others_may_write(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "textfile"
    d.mkdir()
    d.chmod(0o777)
    metrics = Metrics(sysctl_dir=str(tmp_path / "none"))
    with caplog.at_level(logging.ERROR):
        assert not metrics.write_textfile(str(d / "topowatch.prom"))
        assert not metrics.write_textfile(str(d / "topowatch.prom"))
    assert caplog.text.count("writable by group or others") == 1  # said once
    assert not (d / "topowatch.prom").exists()
