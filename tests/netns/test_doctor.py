"""``topowatch doctor`` against the real kernel: probes answer, and the caller's table is never touched.

The doctor runs inside a test namespace that holds entries with exactly the
canaries' tuples: its flush probes must run in their own throwaway namespace,
so every entry here survives.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from topowatch import doctor
from topowatch.core.conntrack import IPS_ASSURED, IPS_SEEN_REPLY, CtTuple, Entry
from topowatch.edges import ctcodec
from topowatch.edges.ctnetlink import Conntrack
from topowatch.netns import Namespace

ROOT = Path(__file__).resolve().parents[2]


def entries(ns: Namespace) -> set[tuple[object, ...]]:
    sock = ns.socket(socket.AF_NETLINK, socket.SOCK_RAW, ctcodec.NETLINK_NETFILTER)
    with Conntrack(sock) as ct:
        return {(e.orig, e.reply, e.status & IPS_SEEN_REPLY) for e in ct.dump(unreplied_only=False)}


def doctor_json(ns: Namespace, *prefix: str) -> tuple[int, dict[str, dict[str, object]], str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent"}
    proc = subprocess.run(["ip", "netns", "exec", ns.name, *prefix, sys.executable, "-m", "topowatch",
                           "doctor", "--json"], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    doc = json.loads(proc.stdout)
    return proc.returncode, {f["key"]: f for f in doc["findings"]}, proc.stderr


@pytest.mark.netns
def test_doctor_probes_and_leaves_the_callers_table_alone(netns: Namespace) -> None:
    a = IPv4Address("198.18.0.1")
    b = IPv4Address("198.18.0.2")
    server = IPv4Address("192.0.2.53")
    mine = [  # the doctor's own canary tuples, plus a replied one: any flush here would hit them
        Entry(2, 17, CtTuple(a, server, 40001, 53), CtTuple(server, a, 53, 40001), timeout=300),
        Entry(2, 17, CtTuple(b, server, 40002, 53), CtTuple(server, b, 53, 40002), timeout=300),
        Entry(2, 17, CtTuple(a, server, 7, 53), CtTuple(server, a, 53, 7),
              status=IPS_SEEN_REPLY | IPS_ASSURED, timeout=300),
    ]
    sock = netns.socket(socket.AF_NETLINK, socket.SOCK_RAW, ctcodec.NETLINK_NETFILTER)
    with Conntrack(sock) as ct:
        ct.create(mine)
    before = entries(netns)
    assert len(before) == 3

    code, found, _ = doctor_json(netns)

    assert entries(netns) == before
    assert code == 0
    assert found["ctnetlink"]["status"] == "ok", found["ctnetlink"]
    # Kernel 6.18 here (DESIGN): status filters on dump and flush, CTA_FILTER on dump and flush.
    for key in ("ct_status_dump", "ct_tuple_dump", "ct_status_flush", "ct_tuple_flush"):
        assert found[key]["status"] == "ok", found[key]
    assert "1 of 2 canaries" in str(found["ct_tuple_dump"]["detail"])
    assert found["permissions"]["status"] == "ok"
    assert found["xfrm"]["status"] == "ok"
    assert found["ct_table"]["status"] in ("ok", "warning")
    assert "nf_conntrack_count 3" in str(found["ct_table"]["detail"])  # read in the caller's namespace
    # No bus at that address: said so, with what topowatch does instead.
    assert found["networkmanager"]["status"] in ("missing", "skipped")
    assert found["daemon_on_bus"]["consequence"] or found["daemon_on_bus"]["status"] == "skipped"
    expected_nft = "ok" if shutil.which("nft") else "missing"
    assert found["nft"]["status"] == expected_nft


@pytest.mark.netns
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_doctor_without_privileges_says_what_is_missing(netns: Namespace) -> None:
    drop = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all")
    code, found, _ = doctor_json(netns, *drop)
    assert code == 1  # the daemon could not run like this
    assert found["permissions"]["status"] == "missing"
    assert "CAP_NET_ADMIN" in str(found["permissions"]["consequence"])
    assert found["ctnetlink"]["status"] == "skipped"  # refused, so not known to be missing
    assert "CAP_NET_ADMIN" in str(found["ctnetlink"]["detail"])
    for key in ("ct_status_dump", "ct_tuple_dump", "ct_status_flush", "ct_tuple_flush"):
        assert found[key]["status"] == "skipped"
        assert "CAP_SYS_ADMIN" in str(found[key]["detail"])


def test_probe_refuses_to_run_in_the_callers_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoUnshare:
        def unshare(self, flags: int) -> int:
            return 0  # pretends success but stays in the caller's namespace

    monkeypatch.setattr(doctor, "_libc", NoUnshare())
    called: list[bool] = []
    with pytest.raises(doctor.ProbeRefused):
        doctor.in_throwaway_netns(lambda: called.append(True))
    assert called == []


def test_verdicts() -> None:
    a, b = IPv4Address("198.18.0.1"), IPv4Address("198.18.0.2")
    assert doctor._verdict({b}, honoured={b}, ignored=set()) == "honoured"
    assert doctor._verdict(set(), honoured={b}, ignored=set()) == "ignored"
    assert doctor._verdict({a}, honoured={b}, ignored=set()) == "unclear"


def test_text_report_names_each_probe_and_consequence() -> None:
    findings = [
        doctor.Finding("x", "ctnetlink status filter on dump", doctor.Status.MISSING, "ignored",
                       "the daemon filters in userspace"),
        doctor.Finding("y", "xfrm", doctor.Status.OK, "a NETLINK_XFRM socket opens"),
    ]
    text = doctor.render_text(findings)
    assert "[missing] ctnetlink status filter on dump: ignored" in text
    assert "-> the daemon filters in userspace" in text
    assert "[  ok   ] xfrm" in text


POLICY = ROOT / "contrib/dbus/io.github.topowatch.conf"


def test_ctnetlink_missing_is_missing_not_skipped() -> None:
    # A kernel without the subsystem answers EINVAL; one without nfnetlink has no such socket.
    def no_nfnetlink() -> int:
        raise OSError(errno.EPROTONOSUPPORT, os.strerror(errno.EPROTONOSUPPORT))

    for answer in (lambda: errno.EINVAL, no_nfnetlink):
        finding = doctor._ctnetlink(answer)
        assert finding.status is doctor.Status.MISSING, finding
        assert finding.required
        assert "cannot dump or delete conntrack entries" in finding.consequence
    assert doctor._ctnetlink(lambda: 0).status is doctor.Status.OK
    refused = doctor._ctnetlink(lambda: errno.EPERM)
    assert refused.status is doctor.Status.SKIPPED
    assert "CAP_NET_ADMIN" in refused.detail


def test_doctor_without_ctnetlink_says_so_for_every_filter(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    def must_not_probe(fn: object) -> object:
        raise AssertionError("probed filters of a ctnetlink that is not there")

    def not_run(key: str, title: str, *args: object, **kwargs: object) -> doctor.Finding:
        return doctor.Finding(key, title, doctor.Status.OK, "not run by this test")

    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent")
    monkeypatch.setattr(doctor, "_tool", not_run)  # nft and iptables are not what this is about
    monkeypatch.setattr(doctor, "ctnetlink_errno", lambda: errno.EINVAL)
    monkeypatch.setattr(doctor, "in_throwaway_netns", must_not_probe)
    code = doctor.doctor_main(as_json=True)
    found = {f["key"]: f for f in json.loads(capsys.readouterr().out)["findings"]}
    assert code == 1  # the daemon cannot run without it
    assert found["ctnetlink"]["status"] == "missing"
    assert "EINVAL" in found["ctnetlink"]["detail"]
    for key in ("ct_status_dump", "ct_tuple_dump", "ct_status_flush", "ct_tuple_flush"):
        assert found[key]["status"] == "missing", found[key]
        assert "ctnetlink itself is missing" in found[key]["detail"]
        assert found[key]["consequence"]


def test_bus_policy_digest_is_contribs() -> None:
    assert doctor.policy_digest(POLICY.read_text()) == doctor.BUS_POLICY_SHA256


def test_bus_policy_is_checked_by_content(tmp_path: Path) -> None:
    installed = tmp_path / "io.github.topowatch.conf"
    assert doctor._bus_policy([str(tmp_path)]).status is doctor.Status.MISSING
    installed.write_text("<busconfig/>")  # there, but not ours: the bus would refuse the name
    finding = doctor._bus_policy([str(tmp_path)])
    assert finding.status is doctor.Status.WARNING
    assert str(installed) in finding.detail and finding.consequence
    shipped = POLICY.read_text()
    installed.write_text(shipped)
    assert doctor._bus_policy([str(tmp_path)]).status is doctor.Status.OK
    # Comments and layout do not matter; a rule does.
    installed.write_text(shipped.replace("<busconfig>", "<busconfig>\n  <!-- local note -->\n\n"))
    assert doctor._bus_policy([str(tmp_path)]).status is doctor.Status.OK
    installed.write_text(shipped.replace('send_member="Status"', 'send_member="Trigger"'))
    assert doctor._bus_policy([str(tmp_path)]).status is doctor.Status.WARNING
    installed.write_text("<busconfig>")  # not even XML
    assert "unreadable" in doctor._bus_policy([str(tmp_path)]).detail
    # A second copy that differs spoils a good one: dbus-daemon reads both directories.
    installed.write_text(shipped)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "io.github.topowatch.conf").write_text("<busconfig/>")
    assert doctor._bus_policy([str(tmp_path), str(tmp_path / "etc")]).status is doctor.Status.WARNING


def test_table_findings(tmp_path: Path) -> None:
    (tmp_path / "nf_conntrack_buckets").write_text("1024")
    (tmp_path / "nf_conntrack_max").write_text("65536")
    (tmp_path / "nf_conntrack_count").write_text("10")
    table = doctor._table(str(tmp_path))
    assert table.status is doctor.Status.WARNING  # 64 entries per bucket when full
    assert "average chain 64.0" in table.detail
