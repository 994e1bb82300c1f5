"""The contrib hooks (NetworkManager, strongSwan, ppp, keepalived) with fake arguments and stub programs.

Each script runs with a PATH holding only the tools it may use and stubs of
``busctl``/``dbus-send``/``topowatch``/``logger`` that record their argv, so
every test asserts the exact call (or its absence). A stub can block on a fifo
until the test releases it: that tells a hook that waits for it from one that
does not, without measuring time. The fallback tests at the end run the real
``busctl`` against a private ``dbus-daemon``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from test_dbus import SYSTEM_CONF  # the system bus's default policy plus the shipped one
from topowatch import dbus as twdbus
from topowatch.netns import Namespace

ROOT = Path(__file__).resolve().parents[1]
NM = ROOT / "contrib/networkmanager/90-topowatch"
SWAN = ROOT / "contrib/strongswan/topowatch-updown"
VPN = ROOT / "contrib/vpn/topowatch-vpn"
PPP_UP = ROOT / "contrib/ppp/ip-up.d/topowatch"
PPP_DOWN = ROOT / "contrib/ppp/ip-down.d/topowatch"
KEEPALIVED = ROOT / "contrib/keepalived/topowatch-notify"
LIB = ROOT / "contrib/lib/hook-lib.sh"
HOOKS = [NM, SWAN, VPN, PPP_UP, PPP_DOWN, KEEPALIVED]
TOOLS = ["sh", "timeout", "sed", "tail", "tr", "cut", "sleep", "mv", "readlink"]  # what the hooks (and stubs) may use
BUS = ["--system", "--timeout=2", "call", "io.github.topowatch", "/io/github/topowatch",
       "io.github.topowatch.Agent1", "TriggerEvent", "sss"]

OWNER_QUERY = ["--system", "--timeout=1", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
               "org.freedesktop.DBus", "NameHasOwner", "s", "io.github.topowatch"]

# Records its argv in logs/NAME (logs/NAME.owner for a NameHasOwner query, logs/topowatch.bus-name
# for `topowatch bus-name`, which prints STUB_BUS_NAME or the init namespace's name and exits with
# STUB_BUS_NAME_EXIT). STUB_OWNER answers that query as the bus would (unset: no bus, the query
# fails). STUB_BLOCK=NAME (or NAME.owner) makes that call write its pid to logs/NAME.pid and wait
# on the fifo STUB_FIFO; else the call prints STUB_ERROR on stderr and exits with STUB_EXIT.
STUB = """#!/bin/sh
log={log}
case "$*" in *NameHasOwner*) log={log}.owner ;; esac
for a in "$@"; do printf '%s\\n' "$a"; done > "$log.$$"
if [ "{name} $*" = "topowatch bus-name" ]; then
    mv "$log.$$" "$log.bus-name"
    [ "${{STUB_BUS_NAME_EXIT:-0}}" = 0 ] || exit "$STUB_BUS_NAME_EXIT"
    echo "${{STUB_BUS_NAME:-io.github.topowatch}}"
    exit 0
fi
mv "$log.$$" "$log"
if [ "${{STUB_BLOCK:-}}" = "${{log##*/}}" ]; then
    echo "$$" > "$log.pid"
    read -r _ < "$STUB_FIFO"
fi
case $log in
    *.owner)
        [ -n "${{STUB_OWNER:-}}" ] || exit 1
        if [ "{name}" = dbus-send ]; then
            printf 'method return time=1 sender=org.freedesktop.DBus -> destination=:1.7 serial=3\\n'
            printf '   boolean %s\\n' "$STUB_OWNER"
        else
            printf 'b %s\\n' "$STUB_OWNER"
        fi
        exit 0
        ;;
esac
[ -z "${{STUB_ERROR:-}}" ] || echo "$STUB_ERROR" >&2
exit "${{STUB_EXIT:-0}}"
"""


@dataclass
class Bin:
    dir: Path
    logs: Path

    def calls(self, name: str) -> list[str] | None:
        path = self.logs / name
        return path.read_text().splitlines() if path.exists() else None

    def wait_for(self, name: str, seconds: float = 10.0) -> list[str] | None:
        """The calls once the stub has recorded them; a bound on waiting, not an assertion on time."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if (calls := self.calls(name)) is not None:
                return calls
            time.sleep(0.02)
        return None

    def pid(self, name: str) -> int | None:
        """The pid a blocked stub wrote (waiting until it has)."""
        text = self.wait_for(f"{name}.pid")
        return int(text[0]) if text else None

    @property
    def fifo(self) -> Path:
        return self.logs / "release"

    def release(self) -> None:
        """Let every stub blocked on the fifo go on (no-op when none waits)."""
        try:
            fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no reader: nothing is blocked
                return
            raise
        os.close(fd)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def make_bin(tmp_path: Path, stubs: tuple[str, ...]) -> Bin:
    bindir, logs = tmp_path / "bin", tmp_path / "logs"
    bindir.mkdir()
    logs.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found is not None, tool
        (bindir / tool).symlink_to(found)
    for name in stubs:
        stub = bindir / name
        stub.write_text(STUB.format(log=logs / name, name=name))
        stub.chmod(0o755)
    os.mkfifo(logs / "release")
    return Bin(bindir, logs)


@pytest.fixture
def stubs(tmp_path: Path) -> Iterator[Bin]:
    b = make_bin(tmp_path, ("busctl", "topowatch", "logger"))
    yield b
    b.release()


def run(hook: Path, *args: str, bin: Bin, env: dict[str, str] | None = None,
        argv0: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a hook to its end; one that hangs fails the test (TimeoutExpired), it is never waited out."""
    environ = {"PATH": str(bin.dir), "TOPOWATCH_HOOK_CONFIG": "/nonexistent", "STUB_FIFO": str(bin.fifo),
               **(env or {})}
    return subprocess.run([str(bin.dir / "sh"), str(argv0 or hook), *args], env=environ,
                          capture_output=True, text=True, timeout=20, check=False)


# -- syntax ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("hook", HOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_syntax_and_mode(hook: Path) -> None:
    subprocess.run(["sh", "-n", str(hook)], check=True)
    assert hook.read_text().startswith("#!/bin/sh\n")
    assert os.stat(hook).st_mode & 0o111 == 0o111


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_shellcheck() -> None:
    # -x follows each hook's `. hook-lib.sh` (its `# shellcheck source=` is relative to the repository).
    proc = subprocess.run(["shellcheck", "-x", "-s", "sh", *map(str, [*HOOKS, LIB])], cwd=ROOT, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stdout


def test_ppp_hooks_are_one_script() -> None:
    assert PPP_UP.read_bytes() == PPP_DOWN.read_bytes()


def test_hooks_share_one_library() -> None:
    # The bus call, the daemon question and the fallback live in hook-lib.sh only, not in three copies.
    subprocess.run(["sh", "-n", str(LIB)], check=True)
    lib = LIB.read_text()
    for function in ("say()", "trigger()", "daemon_state()", "fallback_mode()", "notify()", "resolve_bus_name()"):
        assert function in lib
        for hook in HOOKS:
            assert function not in hook.read_text(), (hook, function)
    for hook in HOOKS:
        assert "busctl" not in hook.read_text() and "io.github.topowatch" not in hook.read_text(), hook


INSTALLED = {  # where the wheel's shared-data and the Debian package put each file, under the prefix
    "lib/NetworkManager/dispatcher.d/90-topowatch": NM,
    "lib/topowatch/strongswan-updown": SWAN,
    "lib/topowatch/vpn-hook": VPN,
    "lib/topowatch/ppp/ip-up.d/topowatch": PPP_UP,
    "lib/topowatch/ppp/ip-down.d/topowatch": PPP_DOWN,
    "lib/topowatch/keepalived-notify": KEEPALIVED,
    "lib/topowatch/hook-lib.sh": LIB,
}


def test_installed_hooks_find_the_library(stubs: Bin, tmp_path: Path) -> None:
    prefix = tmp_path / "usr"
    for dest, src in INSTALLED.items():
        (prefix / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, prefix / dest)
    # An admin's symlink in /etc/ppp/ip-up.d resolves to the installed hook, and so to its library.
    etc = tmp_path / "etc/ppp/ip-up.d"
    etc.mkdir(parents=True)
    (etc / "topowatch").symlink_to(prefix / "lib/topowatch/ppp/ip-up.d/topowatch")
    nm = run(prefix / "lib/NetworkManager/dispatcher.d/90-topowatch", "eth0", "up", bin=stubs)
    assert nm.returncode == 0, nm.stderr
    assert stubs.calls("busctl") == [*BUS, "dispatcher", "eth0", "up"]
    assert stubs.calls("topowatch.bus-name") == ["bus-name"]  # no topowatch beside the library: PATH's
    # A virtualenv's topowatch is on no PATH: the one beside the library (PREFIX/bin) answers.
    (prefix / "bin").mkdir()
    (prefix / "bin/topowatch").write_text(STUB.format(log=stubs.logs / "own", name="topowatch"))
    (prefix / "bin/topowatch").chmod(0o755)
    nm = run(prefix / "lib/NetworkManager/dispatcher.d/90-topowatch", "eth0", "up", bin=stubs,
             env={"STUB_BUS_NAME": "io.github.topowatch.inode_7"})
    assert nm.returncode == 0, nm.stderr
    assert stubs.calls("own.bus-name") == ["bus-name"]
    assert stubs.calls("busctl") == [*BUS[:3], "io.github.topowatch.inode_7", *BUS[4:], "dispatcher", "eth0", "up"]
    swan = run(prefix / "lib/topowatch/strongswan-updown", bin=stubs, env={"PLUTO_VERB": "up-host"})
    assert swan.returncode == 0, swan.stderr
    assert stubs.calls("busctl") == [*BUS, "xfrm", "", "up-host"]
    vpn = run(prefix / "lib/topowatch/vpn-hook", "up", "wg0", bin=stubs)
    assert vpn.returncode == 0, vpn.stderr
    assert stubs.calls("busctl") == [*BUS, "dispatcher", "wg0", "wg-quick-up"]
    ppp = run(etc / "topowatch", "ppp0", bin=stubs, argv0=etc / "topowatch")
    assert ppp.returncode == 0, ppp.stderr
    assert stubs.calls("busctl") == [*BUS, "dispatcher", "ppp0", "ppp-up"]
    notify = run(prefix / "lib/topowatch/keepalived-notify", "INSTANCE", "gw", "MASTER", "150", bin=stubs,
                 env={"CONNTRACKD": "true"})
    assert notify.returncode == 0, notify.stderr
    assert stubs.calls("busctl") == [*BUS, "request", "", "keepalived MASTER gw"]


def test_missing_library_is_logged_not_fatal(stubs: Bin, tmp_path: Path) -> None:
    lonely = tmp_path / "nm/dispatcher.d/90-topowatch"
    lonely.parent.mkdir(parents=True)
    shutil.copy(NM, lonely)
    proc = run(lonely, "eth0", "up", bin=stubs, env={"TOPOWATCH_HOOK_LIB": str(tmp_path / "gone.sh")})
    assert proc.returncode == 0
    assert stubs.calls("busctl") is None
    assert "hook-lib.sh not found" in "\n".join(stubs.calls("logger") or [])


# -- NetworkManager -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "interface"),
    [
        (("eth0", "up"), {}, "eth0"),
        (("eth0", "down"), {}, "eth0"),
        (("eth0", "reapply"), {}, "eth0"),  # `nmcli device reapply`: addresses and routes may differ
        (("wwan0", "dhcp4-change"), {}, "wwan0"),
        (("wwan0", "dhcp6-change"), {}, "wwan0"),
        (("eth0", "vpn-up"), {"VPN_IP_IFACE": "tun0"}, "tun0"),
        (("eth0", "vpn-down"), {"VPN_IP_IFACE": "tun0"}, "tun0"),
        (("eth0", "vpn-up"), {}, "eth0"),
        (("", "connectivity-change"), {}, ""),
        (("none", "up"), {}, ""),
    ],
)
def test_nm_triggers_the_daemon(stubs: Bin, args: tuple[str, str], env: dict[str, str], interface: str) -> None:
    proc = run(NM, *args, bin=stubs, env=env)
    assert proc.returncode == 0, proc.stderr
    assert stubs.calls("busctl") == [*BUS, "dispatcher", interface, args[1]]
    assert stubs.calls("topowatch") is None


@pytest.mark.parametrize(
    "args",
    [
        ("eth0", "pre-up"),  # not ours
        ("", "hostname"),
        ("eth0/../x", "up"),  # not an interface name
        ("a" * 16, "up"),
        ("bad name", "up"),
        ("eth0:1", "up"),
        ("eth0",),  # missing the action
        (),
    ],
)
def test_nm_ignores_other_actions_and_bad_arguments(stubs: Bin, args: tuple[str, ...]) -> None:
    proc = run(NM, *args, bin=stubs)
    assert proc.returncode == 0
    assert stubs.calls("busctl") is None
    assert stubs.calls("topowatch") is None


def test_nm_daemon_down_does_nothing_by_default(stubs: Bin) -> None:
    proc = run(NM, "eth0", "up", bin=stubs, env={"STUB_EXIT": "1"})
    assert proc.returncode == 0
    assert stubs.calls("busctl") is not None
    time.sleep(0.2)
    assert stubs.calls("topowatch") is None


def test_nm_daemon_down_flushes_once_when_configured(stubs: Bin, tmp_path: Path) -> None:
    conf = tmp_path / "default"
    conf.write_text("# topowatch hooks\nTOPOWATCH_HOOK_FALLBACK=\"flush\"\n")
    proc = run(NM, "eth0", "up", bin=stubs, env={"STUB_EXIT": "1", "TOPOWATCH_HOOK_CONFIG": str(conf)})
    assert proc.returncode == 0
    assert stubs.wait_for("topowatch") == ["flush"]
    assert "one-shot flush" in "\n".join(stubs.calls("logger") or [])


def test_nm_flush_fallback_runs_in_the_background(stubs: Bin) -> None:
    # The one-shot flush blocks until the test releases it: a hook that waited for it would never
    # return (run() would time out), so returning at all, with the flush still alive, is the proof.
    env = {"STUB_EXIT": "1", "STUB_OWNER": "false", "TOPOWATCH_HOOK_FALLBACK": "flush", "STUB_BLOCK": "topowatch"}
    proc = run(NM, "eth0", "up", bin=stubs, env=env)
    assert proc.returncode == 0
    pid = stubs.pid("topowatch")
    assert pid is not None, "the fallback flush never started"
    assert alive(pid)  # the hook has exited; the flush it started has not
    assert stubs.calls("topowatch") == ["flush"]
    stubs.release()


@pytest.mark.parametrize(("owner", "flushed"), [("false", True), ("true", False)])
def test_nm_fallback_only_when_the_daemon_is_not_running(stubs: Bin, owner: str, flushed: bool) -> None:
    # The trigger failed either way; the bus then says whether anyone owns the daemon's name.
    # Owned: the daemon runs (it refused the call, or was slow) and reacts to the kernel itself.
    env = {"STUB_EXIT": "1", "STUB_OWNER": owner, "TOPOWATCH_HOOK_FALLBACK": "flush"}
    proc = run(NM, "eth0", "up", bin=stubs, env=env)
    assert proc.returncode == 0
    assert stubs.calls("busctl") == [*BUS, "dispatcher", "eth0", "up"]
    assert stubs.calls("busctl.owner") == OWNER_QUERY
    said = "\n".join(stubs.calls("logger") or [])
    if flushed:
        assert stubs.wait_for("topowatch") == ["flush"]
        assert "daemon not running" in said
    else:
        assert "it is running, so no flush" in said
        time.sleep(0.2)
        assert stubs.calls("topowatch") is None


def test_nm_no_fallback_question_without_the_fallback(stubs: Bin) -> None:
    proc = run(NM, "eth0", "up", bin=stubs, env={"STUB_EXIT": "1", "STUB_OWNER": "false"})
    assert proc.returncode == 0
    assert stubs.calls("busctl.owner") is None  # nothing to decide: no second bus call


def test_nm_hanging_daemon_is_cut_short_and_not_flushed(stubs: Bin) -> None:
    # The call never returns (the stub blocks until released): `timeout 2` ends it, the hook goes on,
    # and since the daemon holds its name (it is running, only slow) nothing is flushed.
    env = {"STUB_BLOCK": "busctl", "STUB_OWNER": "true", "TOPOWATCH_HOOK_FALLBACK": "flush"}
    proc = run(NM, "eth0", "up", bin=stubs, env=env)
    assert proc.returncode == 0
    pid = stubs.pid("busctl")
    assert pid is not None and not alive(pid)  # killed by timeout, not waited out
    assert stubs.calls("busctl.owner") == OWNER_QUERY
    assert "it is running, so no flush" in "\n".join(stubs.calls("logger") or [])
    assert stubs.calls("topowatch") is None


def test_nm_hanging_bus_is_not_flushed(stubs: Bin) -> None:
    # Neither the call nor the question is answered: whether the daemon runs is unknown; no flush.
    env = {"STUB_EXIT": "1", "STUB_BLOCK": "busctl.owner", "STUB_OWNER": "false",
           "TOPOWATCH_HOOK_FALLBACK": "flush"}
    proc = run(NM, "eth0", "up", bin=stubs, env=env)
    assert proc.returncode == 0
    pid = stubs.pid("busctl.owner")
    assert pid is not None and not alive(pid)
    assert "cannot tell whether the daemon runs" in "\n".join(stubs.calls("logger") or [])
    time.sleep(0.2)
    assert stubs.calls("topowatch") is None


def test_nm_unknown_fallback_is_refused(stubs: Bin) -> None:
    proc = run(NM, "eth0", "up", bin=stubs, env={"STUB_EXIT": "1", "TOPOWATCH_HOOK_FALLBACK": "reboot"})
    assert proc.returncode == 0
    time.sleep(0.2)
    assert stubs.calls("topowatch") is None
    assert "unknown TOPOWATCH_HOOK_FALLBACK" in "\n".join(stubs.calls("logger") or [])


@pytest.mark.parametrize(("owner", "flushed"), [("false", True), ("true", False)])
def test_nm_dbus_send_asks_the_bus_too(tmp_path: Path, owner: str, flushed: bool) -> None:
    b = make_bin(tmp_path, ("dbus-send", "topowatch", "logger"))
    env = {"STUB_EXIT": "1", "STUB_OWNER": owner, "TOPOWATCH_HOOK_FALLBACK": "flush"}
    proc = run(NM, "eth0", "up", bin=b, env=env)
    assert proc.returncode == 0
    assert b.calls("dbus-send.owner") == [
        "--system", "--print-reply", "--reply-timeout=1000", "--dest=org.freedesktop.DBus",
        "/org/freedesktop/DBus", "org.freedesktop.DBus.NameHasOwner", "string:io.github.topowatch",
    ]
    if flushed:
        assert b.wait_for("topowatch") == ["flush"]
    else:
        time.sleep(0.2)
        assert b.calls("topowatch") is None


def test_nm_uses_dbus_send_without_busctl(tmp_path: Path) -> None:
    b = make_bin(tmp_path, ("dbus-send", "topowatch", "logger"))
    proc = run(NM, "eth0", "up", bin=b)
    assert proc.returncode == 0
    assert b.calls("dbus-send") == [
        "--system", "--print-reply", "--reply-timeout=2000", "--dest=io.github.topowatch",
        "/io/github/topowatch", "io.github.topowatch.Agent1.TriggerEvent",
        "string:dispatcher", "string:eth0", "string:up",
    ]


def test_nm_without_any_bus_tool_falls_back(tmp_path: Path) -> None:
    b = make_bin(tmp_path, ("topowatch", "logger"))
    proc = run(NM, "eth0", "up", bin=b, env={"TOPOWATCH_HOOK_FALLBACK": "flush"})
    assert proc.returncode == 0
    assert b.wait_for("topowatch") == ["flush"]


@pytest.mark.parametrize("hook", [NM, SWAN, PPP_UP], ids=["nm", "strongswan", "ppp"])
def test_hooks_ask_topowatch_for_the_bus_name(stubs: Bin, hook: Path) -> None:
    # The daemon in `ip netns exec lab-x` owns ...netns_lab_2dx: the hook calls that, not the bare name.
    name = "io.github.topowatch.netns_lab_2dx"
    env = {"STUB_BUS_NAME": name, "PLUTO_VERB": "up-client", "STUB_EXIT": "1", "STUB_OWNER": "false",
           "TOPOWATCH_HOOK_FALLBACK": "flush"}
    proc = run(hook, "eth0", "up", bin=stubs, env=env)
    assert proc.returncode == 0, proc.stderr
    assert stubs.calls("topowatch.bus-name") == ["bus-name"]
    calls = stubs.calls("busctl")
    assert calls is not None and calls[3] == name
    assert stubs.calls("busctl.owner") == [*OWNER_QUERY[:-1], name]  # the fallback asks about that name too
    assert stubs.wait_for("topowatch") == ["flush"]


def test_no_bus_name_no_call_no_flush(stubs: Bin) -> None:
    env = {"STUB_BUS_NAME_EXIT": "1", "TOPOWATCH_HOOK_FALLBACK": "flush"}
    proc = run(NM, "eth0", "up", bin=stubs, env=env)
    assert proc.returncode == 0
    assert stubs.calls("busctl") is None
    assert "cannot tell the daemon's D-Bus name" in "\n".join(stubs.calls("logger") or [])
    time.sleep(0.2)
    assert stubs.calls("topowatch") is None


def test_failed_call_is_logged_to_syslog(stubs: Bin) -> None:
    error = "Call failed: Access denied\x1b[31m"  # the bus tool's words, control characters dropped
    proc = run(NM, "eth0", "up", bin=stubs, env={"STUB_EXIT": "1", "STUB_ERROR": error})
    assert proc.returncode == 0
    logged = stubs.calls("logger")
    assert logged is not None and logged[:4] == ["-t", "topowatch-hook", "-p", "daemon.notice"]
    assert logged[-1] == ("90-topowatch: TriggerEvent dispatcher 'eth0' up to io.github.topowatch failed: "
                          "Call failed: Access denied[31m")


def test_bus_name_override_reaches_a_namespaced_daemon(stubs: Bin) -> None:
    proc = run(NM, "eth0", "up", bin=stubs, env={"TOPOWATCH_BUS_NAME": "io.github.topowatch.netns_lab"})
    assert proc.returncode == 0
    calls = stubs.calls("busctl")
    assert calls is not None and calls[3] == "io.github.topowatch.netns_lab"


# -- strongSwan ----------------------------------------------------------------------------------


@pytest.mark.parametrize("verb", ["up-client", "down-client", "up-host", "down-host", "up-client-v6",
                                  "down-host-v6"])
def test_strongswan_triggers_xfrm(stubs: Bin, verb: str) -> None:
    env = {"PLUTO_VERB": verb, "PLUTO_INTERFACE": "eth1", "PLUTO_CONNECTION": "site-b"}
    proc = run(SWAN, bin=stubs, env=env)
    assert proc.returncode == 0, proc.stderr
    assert stubs.calls("busctl") == [*BUS, "xfrm", "eth1", f"{verb} site-b"]


def test_strongswan_sanitises_its_environment(stubs: Bin) -> None:
    env = {"PLUTO_VERB": "up-client", "PLUTO_INTERFACE": "unknown", "PLUTO_CONNECTION": "a b;$(reboot)\n"}
    proc = run(SWAN, bin=stubs, env=env)
    assert proc.returncode == 0
    assert stubs.calls("busctl") == [*BUS, "xfrm", "", "up-client abreboot"]


@pytest.mark.parametrize("env", [{"PLUTO_VERB": "prepare-host"}, {}])
def test_strongswan_ignores_other_verbs(stubs: Bin, env: dict[str, str]) -> None:
    proc = run(SWAN, bin=stubs, env=env)
    assert proc.returncode == 0
    assert stubs.calls("busctl") is None


def test_strongswan_daemon_down_with_flush(stubs: Bin) -> None:
    env = {"PLUTO_VERB": "up-client", "STUB_EXIT": "1", "TOPOWATCH_HOOK_FALLBACK": "flush"}
    proc = run(SWAN, bin=stubs, env=env)
    assert proc.returncode == 0
    assert stubs.wait_for("topowatch") == ["flush"]


def test_strongswan_running_daemon_is_not_flushed(stubs: Bin) -> None:
    env = {"PLUTO_VERB": "up-client", "STUB_EXIT": "1", "STUB_OWNER": "true", "TOPOWATCH_HOOK_FALLBACK": "flush"}
    proc = run(SWAN, bin=stubs, env=env)
    assert proc.returncode == 0
    assert stubs.calls("busctl.owner") == OWNER_QUERY
    time.sleep(0.2)
    assert stubs.calls("topowatch") is None


# -- OpenVPN and wg-quick ------------------------------------------------------------------------


@pytest.mark.parametrize("script_type", ["up", "route-up", "down", "route-pre-down"])
def test_openvpn_names_its_script_type(stubs: Bin, script_type: str) -> None:
    # OpenVPN's arguments differ by script type; its environment says which and on what device.
    env = {"script_type": script_type, "dev": "tun0"}
    proc = run(VPN, "tun0", "1500", "0", "10.8.0.2", "255.255.255.0", "init", bin=stubs, env=env)
    assert proc.returncode == 0, proc.stderr
    assert stubs.calls("busctl") == [*BUS, "dispatcher", "tun0", f"openvpn-{script_type}"]


@pytest.mark.parametrize("script_type", ["tls-verify", "client-connect", "ipchange"])
def test_openvpn_other_scripts_are_ignored(stubs: Bin, script_type: str) -> None:
    proc = run(VPN, bin=stubs, env={"script_type": script_type, "dev": "tun0"})
    assert proc.returncode == 0
    assert stubs.calls("busctl") is None


@pytest.mark.parametrize("verb", ["up", "down", "pre-down"])
def test_wg_quick_names_its_verb(stubs: Bin, verb: str) -> None:
    proc = run(VPN, verb, "wg0", bin=stubs)  # PostUp = .../vpn-hook up %i
    assert proc.returncode == 0, proc.stderr
    assert stubs.calls("busctl") == [*BUS, "dispatcher", "wg0", f"wg-quick-{verb}"]


@pytest.mark.parametrize("args", [("bogus", "wg0"), ("up", "../x"), ("up",), ()])
def test_vpn_hook_bad_arguments(stubs: Bin, args: tuple[str, ...]) -> None:
    proc = run(VPN, *args, bin=stubs)
    assert proc.returncode == 0
    assert stubs.calls("busctl") is None


def test_openvpn_without_device(stubs: Bin) -> None:
    proc = run(VPN, bin=stubs, env={"script_type": "up"})
    assert proc.returncode == 0
    assert stubs.calls("busctl") is None


# -- keepalived ----------------------------------------------------------------------------------

# Appends each call to logs/conntrackd, marked when the daemon had been asked already (logs/busctl
# exists); STUB_CONNTRACKD_FAIL=OPTION makes that request fail as conntrackd does without a daemon.
CONNTRACKD_STUB = """#!/bin/sh
mark=""
[ -e {logs}/busctl ] && mark=" (after the request)"
printf '%s%s\\n' "$*" "$mark" >> {logs}/conntrackd
if [ "$3" = "${{STUB_CONNTRACKD_FAIL:-}}" ]; then
    echo "cannot connect to UNIX socket" >&2
    exit 1
fi
exit 0
"""


@pytest.fixture
def conntrackd(stubs: Bin) -> Bin:
    stub = stubs.dir / "conntrackd"
    stub.write_text(CONNTRACKD_STUB.format(logs=stubs.logs))
    stub.chmod(0o755)
    return stubs


def test_keepalived_master_commits_then_asks_for_a_full_judgement(conntrackd: Bin) -> None:
    # conntrackd's primary-backup order, and the request only after the commit: a judgement before
    # it would not see the entries the commit brings.
    proc = run(KEEPALIVED, "INSTANCE", "VI_1", "MASTER", "150", bin=conntrackd)
    assert proc.returncode == 0, proc.stderr
    conf = "-C /etc/conntrackd/conntrackd.conf"
    assert conntrackd.calls("conntrackd") == [f"{conf} -c", f"{conf} -f", f"{conf} -R", f"{conf} -B"]
    assert conntrackd.calls("busctl") == [*BUS, "request", "", "keepalived MASTER VI_1"]
    assert conntrackd.calls("logger") is None


@pytest.mark.parametrize(("state", "requests"), [("BACKUP", ["-t", "-n"]), ("FAULT", ["-t"]), ("STOP", [])])
def test_keepalived_backup_fault_stop_touch_only_conntrackd(conntrackd: Bin, state: str, requests: list[str]) -> None:
    # Nothing enters the kernel table there, and the addresses leaving are the daemon's own events.
    proc = run(KEEPALIVED, "GROUP", "G1", state, "100", bin=conntrackd,
               env={"CONNTRACKD_CONFIG": "/etc/ha/conntrackd.conf"})
    assert proc.returncode == 0, proc.stderr
    assert (conntrackd.calls("conntrackd") or []) == [f"-C /etc/ha/conntrackd.conf {r}" for r in requests]
    assert conntrackd.calls("busctl") is None
    assert conntrackd.calls("logger") is None


def test_keepalived_failed_commit_is_logged_and_the_rest_runs(conntrackd: Bin) -> None:
    proc = run(KEEPALIVED, "INSTANCE", "VI_1", "MASTER", "150", bin=conntrackd, env={"STUB_CONNTRACKD_FAIL": "-c"})
    assert proc.returncode == 0
    assert [c.split()[-1] for c in conntrackd.calls("conntrackd") or []] == ["-c", "-f", "-R", "-B"]
    assert conntrackd.calls("busctl") == [*BUS, "request", "", "keepalived MASTER VI_1"]
    said = "\n".join(conntrackd.calls("logger") or [])
    assert "conntrackd -c (commit the external cache) failed: cannot connect to UNIX socket" in said


@pytest.mark.parametrize(("args", "said"), [
    (("INSTANCE", "VI_1", "UNKNOWN;x", "1"), "unknown state 'UNKNOWNx'"),
    ((), "no state given"),
])
def test_keepalived_bad_arguments(conntrackd: Bin, args: tuple[str, ...], said: str) -> None:
    proc = run(KEEPALIVED, *args, bin=conntrackd)
    assert proc.returncode == 0
    assert conntrackd.calls("conntrackd") is None and conntrackd.calls("busctl") is None
    assert said in "\n".join(conntrackd.calls("logger") or [])


def test_keepalived_sanitises_the_instance_name(conntrackd: Bin) -> None:
    proc = run(KEEPALIVED, "INSTANCE", "gw a;$(reboot)\n", "MASTER", "150", bin=conntrackd)
    assert proc.returncode == 0
    assert conntrackd.calls("busctl") == [*BUS, "request", "", "keepalived MASTER gwareboot"]


# -- ppp -----------------------------------------------------------------------------------------


@pytest.fixture
def ppp_dirs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    # Run from paths that look like pppd's run-parts directories.
    up = tmp_path / "etc/ppp/ip-up.d"
    down = tmp_path / "etc/ppp/ip-down.d"
    up.mkdir(parents=True)
    down.mkdir(parents=True)
    shutil.copy(PPP_UP, up / "topowatch")
    shutil.copy(PPP_DOWN, down / "topowatch")
    # Found walking up from the hook: /etc/ppp/ip-up.d -> /etc/ppp -> /etc, then etc/topowatch.
    (tmp_path / "etc/topowatch").mkdir()
    shutil.copy(LIB, tmp_path / "etc/topowatch/hook-lib.sh")
    yield up / "topowatch", down / "topowatch"


def test_ppp_up_and_down(stubs: Bin, ppp_dirs: tuple[Path, Path]) -> None:
    up, down = ppp_dirs
    args = ("ppp0", "/dev/ttyUSB0", "115200", "100.64.0.2", "100.64.0.1", "lte")
    proc = run(up, *args, bin=stubs, argv0=up, env={"PPP_IFACE": "ppp0"})
    assert proc.returncode == 0, proc.stderr
    assert stubs.calls("busctl") == [*BUS, "dispatcher", "ppp0", "ppp-up"]
    proc = run(down, *args, bin=stubs, argv0=down)  # no PPP_IFACE: the first argument
    assert proc.returncode == 0
    assert stubs.calls("busctl") == [*BUS, "dispatcher", "ppp0", "ppp-down"]


def test_ppp_bad_interface(stubs: Bin, ppp_dirs: tuple[Path, Path]) -> None:
    up, _ = ppp_dirs
    proc = run(up, "../../x", bin=stubs, argv0=up)
    assert proc.returncode == 0
    assert stubs.calls("busctl") is None


def test_ppp_running_daemon_is_not_flushed(stubs: Bin, ppp_dirs: tuple[Path, Path]) -> None:
    up, _ = ppp_dirs
    env = {"STUB_EXIT": "1", "STUB_OWNER": "true", "TOPOWATCH_HOOK_FALLBACK": "flush"}
    proc = run(up, "ppp0", bin=stubs, argv0=up, env=env)
    assert proc.returncode == 0
    assert stubs.calls("busctl.owner") == OWNER_QUERY
    time.sleep(0.2)
    assert stubs.calls("topowatch") is None


# -- the fallback against a real bus ------------------------------------------------------------

BUSCTL = shutil.which("busctl")
DBUS_DAEMON = shutil.which("dbus-daemon")
POLICY = ROOT / "contrib/dbus/io.github.topowatch.conf"


# Owns the daemon's name and exports nothing: a running daemon as far as the bus can tell.
OWNER = """
import asyncio, sys
from dbus_fast.aio import MessageBus

async def main():
    bus = await MessageBus(bus_address=sys.argv[1]).connect()
    await bus.request_name("io.github.topowatch")
    print("owned", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.fixture
def world(tmp_path: Path) -> Iterator[Path]:
    """A directory the unprivileged hook can read (pytest's tmp_path is root's alone)."""
    base = Path(tempfile.mkdtemp(prefix="twhook-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def system_bus(world: Path) -> Iterator[str]:
    """A private dbus-daemon with the system bus's policy and ours; its address."""
    sock = world / "bus.sock"
    conf = world / "bus.conf"
    conf.write_text(SYSTEM_CONF.format(socket=sock, policy=POLICY))
    read, write = os.pipe()
    proc = subprocess.Popen([str(DBUS_DAEMON), f"--config-file={conf}", "--nofork", f"--print-address={write}"],
                            pass_fds=(write,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    os.close(write)
    try:
        with os.fdopen(read, "rb") as pipe:
            assert pipe.readline().startswith(b"unix:")  # written once the socket listens
        yield f"unix:path={sock}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextlib.contextmanager
def name_owner(address: str) -> Iterator[None]:
    proc = subprocess.Popen([sys.executable, "-c", OWNER, address], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "owned"
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.skipif(BUSCTL is None or DBUS_DAEMON is None, reason="needs busctl and dbus-daemon")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the hook runs as nobody, the owner as root")
@pytest.mark.parametrize("running", [False, True], ids=["daemon-stopped", "daemon-running-access-denied"])
def test_fallback_on_a_real_bus(world: Path, system_bus: str, running: bool) -> None:
    # The real busctl, the shipped bus policy, and a hook run as nobody: TriggerEvent is root's
    # only, so the call is refused either way. The flush follows only when nobody owns the name.
    pytest.importorskip("dbus_fast")
    b = make_bin(world, ("topowatch", "logger"))
    (b.dir / "busctl").symlink_to(str(BUSCTL))
    b.logs.chmod(0o777)
    hook = world / "90-topowatch"
    shutil.copy(NM, hook)
    (world / "lib").mkdir()
    shutil.copy(LIB, world / "lib/hook-lib.sh")
    env = {"PATH": str(b.dir), "TOPOWATCH_HOOK_CONFIG": "/nonexistent", "TOPOWATCH_HOOK_FALLBACK": "flush",
           "DBUS_SYSTEM_BUS_ADDRESS": system_bus}
    with name_owner(system_bus) if running else contextlib.nullcontext():
        proc = subprocess.run([str(b.dir / "sh"), str(hook), "eth0", "up"], env=env, user=65534, group=65534,
                              extra_groups=[], capture_output=True, text=True, timeout=20, check=False)
    assert proc.returncode == 0, proc.stderr
    said = "\n".join(b.calls("logger") or [])
    if running:
        assert "it is running, so no flush" in said
        time.sleep(0.2)
        assert b.calls("topowatch") is None
    else:
        assert "daemon not running" in said
        assert b.wait_for("topowatch") == ["flush"]


# Owns the name `topowatch bus-name` gives in its namespace and prints each TriggerEvent it gets.
NAMESPACED_DAEMON = """
import asyncio, sys
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, method
from topowatch import dbus

class Agent(ServiceInterface):
    def __init__(self):
        super().__init__(dbus.INTERFACE)

    @method()
    def TriggerEvent(self, kind: "s", interface: "s", detail: "s"):
        print("TriggerEvent", kind, interface, detail, flush=True)

async def main():
    bus = await MessageBus(bus_address=sys.argv[1]).connect()
    bus.export(dbus.OBJECT_PATH, Agent())
    await bus.request_name(dbus.bus_name())
    print("owned", dbus.bus_name(), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.mark.netns
@pytest.mark.skipif(BUSCTL is None or DBUS_DAEMON is None, reason="needs busctl and dbus-daemon")
def test_hook_in_a_namespace_reaches_the_daemon_of_that_namespace(world: Path, system_bus: str) -> None:
    # The real `topowatch bus-name` and busctl, run by `ip netns exec` as NetworkManager in that
    # namespace would: the call reaches the daemon there (it used to go to io.github.topowatch).
    pytest.importorskip("dbus_fast")
    netns = Namespace.create("twt-x_")  # a '-' and a '_': both escaped, so no other name meets it
    try:
        _hook_reaches_daemon(netns, world, system_bus)
    finally:
        netns.delete()


def _hook_reaches_daemon(netns: Namespace, world: Path, system_bus: str) -> None:
    b = make_bin(world, ("logger",))
    (b.dir / "busctl").symlink_to(str(BUSCTL))
    (b.dir / "topowatch").symlink_to(Path(sys.executable).parent / "topowatch")
    (b.dir / "readlink").unlink()  # the lib is named; nothing else is needed
    env = {"PATH": str(b.dir), "TOPOWATCH_HOOK_CONFIG": "/nonexistent", "TOPOWATCH_HOOK_LIB": str(LIB),
           "DBUS_SYSTEM_BUS_ADDRESS": system_bus}
    daemon = netns.popen([sys.executable, "-c", NAMESPACED_DAEMON, system_bus], stdout=subprocess.PIPE)
    try:
        assert daemon.stdout is not None
        owned = daemon.stdout.readline().split()
        assert owned == ["owned", f"io.github.topowatch.{twdbus.named_suffix(netns.name)}"]
        assert "_2d" in owned[1] and "_5f" in owned[1]
        proc = subprocess.run([shutil.which("ip") or "ip", "netns", "exec", netns.name, str(b.dir / "sh"), str(NM),
                               "eth0", "up"],
                              env=env, capture_output=True, text=True, timeout=20, check=False)
        assert proc.returncode == 0, proc.stderr
        assert b.calls("logger") is None  # no failure to report
        daemon.terminate()  # busctl waited for the reply: anything the daemon got is printed by now
        assert daemon.stdout.read().split() == ["TriggerEvent", "dispatcher", "eth0", "up"]
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)
        if daemon.stdout is not None:
            daemon.stdout.close()
