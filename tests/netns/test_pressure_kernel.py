"""Table pressure on the real kernel, in namespaces the tests create.

Each namespace's conntrack count is held against the init namespace's
``nf_conntrack_max`` (read-only in here, never written): a full table is
reached by filling the test's own namespace. The kernel early-drops
non-assured entries by itself, so the table that matters is one full of
assured entries: then new flows are refused until something evicts.

A new flow here is a UDP datagram the namespace sends to itself over
loopback: conntrack tracks it at OUTPUT, and when it cannot allocate an
entry the kernel drops the packet (``sendto`` fails with EPERM) and counts
it in the ``drop`` statistic.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import time
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path

import pytest

from topowatch.core.conntrack import IPS_ASSURED, IPS_SEEN_REPLY, CtTuple, Entry
from topowatch.core.flow import IPPROTO_TCP, IPPROTO_UDP
from topowatch.core.model import AF_INET
from topowatch.edges.ctnetlink import Conntrack
from topowatch.edges.sysctl import NETFILTER
from topowatch.errors import NetlinkError
from topowatch.lab import Daemon
from topowatch.netns import Namespace

pytestmark = [pytest.mark.netns, pytest.mark.slow]

RULESET = """\
table ip t {
    chain out {
        type filter hook output priority 0; policy accept;
        ct state new counter
    }
}
"""
SINK = "127.0.0.1"  # loopback traffic is tracked at OUTPUT like any other


def sysctl(ns: Namespace, name: str) -> int:
    return int(ns.run("cat", f"{NETFILTER}/{name}").split()[0])


def make_ns() -> Namespace:
    ns = Namespace.create("twp")
    try:
        ns.run("nft", "-f", "-", input=RULESET)
    except BaseException:
        ns.delete()
        raise
    return ns


@pytest.fixture
def ns() -> Iterator[Namespace]:
    namespace = make_ns()
    try:
        yield namespace
    finally:
        namespace.delete()


def rules(tmp_path: Path, text: str) -> Path:
    tmp_path.chmod(0o755)
    d = tmp_path / "rules.d"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    f = d / "90-pressure.toml"
    f.write_text(text)
    f.chmod(0o644)
    return d


def udp(n: int, *, timeout: int, status: int = IPS_SEEN_REPLY | IPS_ASSURED, zone: int = 0,
        net: int = 10, proto: int = IPPROTO_UDP) -> Entry:
    src = ip_address(f"{net}.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}")
    dst = ip_address("192.0.2.53")
    sport = 1024 + n % 50000
    return Entry(AF_INET, proto, CtTuple(src, dst, sport, 53), CtTuple(dst, src, 53, sport), status, zone,
                 0, 0, timeout)


def create(ns: Namespace, entries: list[Entry]) -> int:
    def run() -> int:
        with Conntrack() as ct:
            try:
                return ct.create(entries)
            except NetlinkError as exc:
                if exc.errno != errno.ENOMEM:
                    raise
                return -1  # the table is full

    return ns.call(run)


def dump(ns: Namespace) -> list[Entry]:
    def run() -> list[Entry]:
        with Conntrack() as ct:
            return ct.dump(unreplied_only=False)

    return ns.call(run)


def stats(ns: Namespace) -> dict[str, int]:
    def run() -> dict[str, int]:
        with Conntrack() as ct:
            return ct.stats()

    return ns.call(run)


def new_flow(ns: Namespace) -> bool:
    """Send one datagram of a new flow; False when the kernel refused it (table full)."""
    sock = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.sendto(b"x", (SINK, 9))
    except PermissionError:
        return False
    finally:
        sock.close()
    return True


def test_timeouts_lowered_restored_and_recovered_after_sigkill(ns: Namespace, tmp_path: Path) -> None:
    limit = sysctl(ns, "nf_conntrack_max")
    high = 300 / limit  # a few hundred entries are "pressure" in this test
    policy = rules(tmp_path, f"[pressure]\nenabled = true\nhigh = {high:.8f}\nlow = {high / 2:.8f}\n"
                             "lower_timeouts = { udp = 7, generic = 33 }\nevict_unreplied = false\n"
                             "min_interval = 0.2\nmax_interval = 0.5\n")
    state = tmp_path / "state"
    args = ("--no-dbus", "--no-startup-sweep", "--rules-dir", str(policy), "--state-dir", str(state))
    before = (sysctl(ns, "nf_conntrack_udp_timeout"), sysctl(ns, "nf_conntrack_generic_timeout"))
    assert before == (30, 600)
    host_before = Path(NETFILTER, "nf_conntrack_udp_timeout").read_text()

    with Daemon(ns, *args) as daemon:
        assert daemon.wait_for("ready") is not None, daemon.lines
        assert create(ns, [udp(i, timeout=300, status=0) for i in range(400)]) == 400
        line = daemon.wait_for("lowered conntrack timeouts")
        assert line is not None, daemon.lines
        assert "udp 30 -> 7 s" in line and "generic 600 -> 33 s" in line
        assert (sysctl(ns, "nf_conntrack_udp_timeout"), sysctl(ns, "nf_conntrack_generic_timeout")) == (7, 33)
        assert Path(NETFILTER, "nf_conntrack_udp_timeout").read_text() == host_before  # the host's untouched
        ledgers = list(state.glob("pressure-*.json"))
        assert len(ledgers) == 1
        starts = [x for x in daemon.lines if "pressure starts" in x]
        assert starts and "400 UNREPLIED udp entries from 400 sources" in starts[0], starts
        # SIGKILL: no chance to restore.
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(10)
    assert sysctl(ns, "nf_conntrack_udp_timeout") == 7
    ns.run("conntrack", "-F")  # the test's own namespace: the pressure is gone

    with Daemon(ns, *args) as daemon:
        line = daemon.wait_for("restored conntrack timeouts")
        assert line is not None, daemon.lines
        assert any("previous run lowered" in x for x in daemon.lines), daemon.lines
        assert daemon.wait_for("ready") is not None or any("ready" in x for x in daemon.lines)
        assert (sysctl(ns, "nf_conntrack_udp_timeout"), sysctl(ns, "nf_conntrack_generic_timeout")) == before
        assert list(state.glob("pressure-*.json")) == []

        # Pressure again, then it ends by itself: the exact values come back.
        assert create(ns, [udp(i, timeout=300, status=0) for i in range(400)]) == 400
        assert daemon.wait_for("lowered conntrack timeouts") is not None, daemon.lines
        ns.run("conntrack", "-F")
        assert daemon.wait_for("pressure ends") is not None, daemon.lines
        assert daemon.wait_for("restored conntrack timeouts") is not None, daemon.lines
        assert sysctl(ns, "nf_conntrack_udp_timeout") == 30

        # Pressure once more, and a clean stop restores too.
        assert create(ns, [udp(i, timeout=300, status=0) for i in range(400)]) == 400
        assert daemon.wait_for("lowered conntrack timeouts") is not None, daemon.lines
        assert daemon.stop() == 0
    assert (sysctl(ns, "nf_conntrack_udp_timeout"), sysctl(ns, "nf_conntrack_generic_timeout")) == before
    assert list(state.glob("pressure-*.json")) == []


def test_daemons_in_two_namespaces_keep_separate_ledgers(tmp_path: Path) -> None:
    a, b = make_ns(), make_ns()
    try:
        limit = sysctl(a, "nf_conntrack_max")
        high = 300 / limit
        policy = rules(tmp_path, f"[pressure]\nenabled = true\nhigh = {high:.8f}\nlow = {high / 2:.8f}\n"
                                 "lower_timeouts = { udp = 9 }\nevict_unreplied = false\nmin_interval = 0.2\n"
                                 "max_interval = 0.5\n")
        state = tmp_path / "state"
        args = ("--no-dbus", "--no-startup-sweep", "--rules-dir", str(policy), "--state-dir", str(state))
        with Daemon(a, *args) as da, Daemon(b, *args) as db:
            assert da.wait_for("ready") is not None and db.wait_for("ready") is not None
            create(a, [udp(i, timeout=300, status=0) for i in range(400)])
            create(b, [udp(i, timeout=300, status=0) for i in range(400)])
            assert da.wait_for("lowered") is not None and db.wait_for("lowered") is not None
            assert len(list(state.glob("pressure-*.json"))) == 2
            a.run("conntrack", "-F")
            assert da.wait_for("restored conntrack timeouts") is not None, da.lines
            # b is still under pressure: its ledger and its lowered timeout stay.
            assert len(list(state.glob("pressure-*.json"))) == 1
            assert (sysctl(a, "nf_conntrack_udp_timeout"), sysctl(b, "nf_conntrack_udp_timeout")) == (30, 9)
    finally:
        a.delete()
        b.delete()


def test_full_table_of_assured_entries_refuses_new_flows_until_the_policy_evicts(
    ns: Namespace, tmp_path: Path
) -> None:
    limit = sysctl(ns, "nf_conntrack_max")
    if limit > 1 << 20:
        pytest.skip(f"nf_conntrack_max is {limit} (raised by a benchmark?): filling it would take too long")
    # This namespace's own assured-udp timeout, long enough that nothing expires during the test.
    ns.run("sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout_stream=3600")
    stream = sysctl(ns, "nf_conntrack_udp_timeout_stream")
    assert stream == 3600
    # Ages (class timeout - remaining): protected ones are the oldest, then the "old" udp, then fresh.
    protected_zone = [udp(i, timeout=stream - 1000, zone=5) for i in range(1000)]
    protected_net = [udp(i, timeout=stream - 1000, net=77) for i in range(1000)]
    # Replied tcp, made to look the oldest of all (its class timeout raised here too): never evicted.
    ns.run("sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_timeout_syn_recv=3600")
    tcp = [udp(i, timeout=1000, net=11, proto=IPPROTO_TCP) for i in range(1000)]
    old = [udp(i, timeout=stream - 600, net=12) for i in range(5000)]
    fresh_count = limit - 8000 - int(ns.run("cat", f"{NETFILTER}/nf_conntrack_count"))
    fresh = [udp(i, timeout=stream, net=13) for i in range(fresh_count)]
    for group in (protected_zone, protected_net, tcp, old, fresh):
        assert create(ns, group) == len(group)
    assert create(ns, [udp(0, timeout=stream, net=14)]) == -1  # ENOMEM: the table is full
    assert sysctl(ns, "nf_conntrack_count") == limit

    # Without the policy: new flows are refused, and the kernel says so in its counters.
    drops = stats(ns)["drop"]
    assert [new_flow(ns) for _ in range(3)] == [False, False, False]
    assert stats(ns)["drop"] >= drops + 3

    policy = rules(tmp_path, "[pressure]\nenabled = true\nhigh = 0.95\nlow = 0.9\nevict_replied = ['udp']\n"
                             "protect_zones = [5]\nprotect_prefixes = ['77.0.0.0/8']\nbatch = 1000\n"
                             "min_interval = 0.2\n")
    args = ("--no-dbus", "--no-startup-sweep", "--rules-dir", str(policy), "--state-dir", str(tmp_path / "s"))
    with Daemon(ns, *args) as daemon:
        assert daemon.wait_for("ready") is not None, daemon.lines
        start = daemon.wait_for("pressure starts")
        assert start is not None, daemon.lines
        assert "100% full" in start and "assured udp entries" in start and "protected by policy" in start
        # Keep knocking: refusals open the last resort; the policy evicts; a new flow gets in.
        admitted = False
        deadline = time.monotonic() + 30
        while not admitted and time.monotonic() < deadline:
            admitted = new_flow(ns)
            if not admitted:
                time.sleep(0.1)
        assert admitted, daemon.lines
        evicted = daemon.wait_for("pressure: evicted")
        assert evicted is not None, daemon.lines
        assert "replied udp" in evicted and "idle up to 6" in evicted, evicted  # about 600 s idle
        assert daemon.stop() == 0

    left = dump(ns)
    by_net: dict[int, int] = {}
    for e in left:
        first = e.orig.src.packed[0]
        by_net[first] = by_net.get(first, 0) + 1
    zone5 = sum(1 for e in left if e.zone == 5)
    assert zone5 == 1000  # protected by zone: all there
    assert by_net.get(77) == 1000  # protected by prefix
    assert by_net.get(11) == 1000  # tcp: never
    assert by_net.get(13) == fresh_count  # the freshest were never chosen while older ones were left
    assert 0 < 5000 - by_net.get(12, 0) <= 5000  # the old udp paid, and only they
    assert len(left) < limit  # room for new flows
    # Timeouts restored on stop.
    assert sysctl(ns, "nf_conntrack_udp_timeout") == 30
    assert os.listdir(tmp_path / "s") == []
