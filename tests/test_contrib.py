"""The contrib hooks (NetworkManager, strongSwan, ppp) with fake arguments and stub programs.

Each script runs with a PATH holding only the tools it may use and stubs of
``busctl``/``dbus-send``/``topowatch``/``logger`` that record their argv, so
every test asserts the exact call (or its absence) and how long the hook took.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NM = ROOT / "contrib/networkmanager/90-topowatch"
SWAN = ROOT / "contrib/strongswan/topowatch-updown"
PPP_UP = ROOT / "contrib/ppp/ip-up.d/topowatch"
PPP_DOWN = ROOT / "contrib/ppp/ip-down.d/topowatch"
HOOKS = [NM, SWAN, PPP_UP, PPP_DOWN]
TOOLS = ["sh", "timeout", "sed", "tail", "tr", "cut", "sleep", "mv"]  # what the hooks (and stubs) may use
BUS = ["--system", "--timeout=2", "call", "io.github.topowatch", "/io/github/topowatch",
       "io.github.topowatch.Agent1", "TriggerEvent", "sss"]

STUB = """#!/bin/sh
for a in "$@"; do printf '%s\\n' "$a"; done > "{log}.$$"
mv "{log}.$$" "{log}"
[ -n "${{STUB_SLEEP:-}}" ] && sleep "$STUB_SLEEP"
exit "${{STUB_EXIT:-0}}"
"""


@dataclass
class Bin:
    dir: Path
    logs: Path

    def calls(self, name: str) -> list[str] | None:
        path = self.logs / name
        return path.read_text().splitlines() if path.exists() else None

    def wait_for(self, name: str, seconds: float = 3.0) -> list[str] | None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if (calls := self.calls(name)) is not None:
                return calls
            time.sleep(0.02)
        return None


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
        stub.write_text(STUB.format(log=logs / name))
        stub.chmod(0o755)
    return Bin(bindir, logs)


@pytest.fixture
def stubs(tmp_path: Path) -> Bin:
    return make_bin(tmp_path, ("busctl", "topowatch", "logger"))


def run(hook: Path, *args: str, bin: Bin, env: dict[str, str] | None = None,
        argv0: Path | None = None) -> tuple[subprocess.CompletedProcess[str], float]:
    environ = {"PATH": str(bin.dir), "TOPOWATCH_HOOK_CONFIG": "/nonexistent", **(env or {})}
    start = time.monotonic()
    proc = subprocess.run([str(bin.dir / "sh"), str(argv0 or hook), *args], env=environ,
                          capture_output=True, text=True, timeout=20, check=False)
    return proc, time.monotonic() - start


# -- syntax ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("hook", HOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_syntax_and_mode(hook: Path) -> None:
    subprocess.run(["sh", "-n", str(hook)], check=True)
    assert hook.read_text().startswith("#!/bin/sh\n")
    assert os.stat(hook).st_mode & 0o111 == 0o111


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_shellcheck() -> None:
    proc = subprocess.run(["shellcheck", "-s", "sh", *map(str, HOOKS)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout


def test_ppp_hooks_are_one_script() -> None:
    assert PPP_UP.read_bytes() == PPP_DOWN.read_bytes()


# -- NetworkManager -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "interface"),
    [
        (("eth0", "up"), {}, "eth0"),
        (("eth0", "down"), {}, "eth0"),
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
    proc, elapsed = run(NM, *args, bin=stubs, env=env)
    assert proc.returncode == 0, proc.stderr
    assert stubs.calls("busctl") == [*BUS, "dispatcher", interface, args[1]]
    assert stubs.calls("topowatch") is None
    assert elapsed < 2


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
    proc, _ = run(NM, *args, bin=stubs)
    assert proc.returncode == 0
    assert stubs.calls("busctl") is None
    assert stubs.calls("topowatch") is None


def test_nm_daemon_down_does_nothing_by_default(stubs: Bin) -> None:
    proc, _ = run(NM, "eth0", "up", bin=stubs, env={"STUB_EXIT": "1"})
    assert proc.returncode == 0
    assert stubs.calls("busctl") is not None
    time.sleep(0.2)
    assert stubs.calls("topowatch") is None


def test_nm_daemon_down_flushes_once_when_configured(stubs: Bin, tmp_path: Path) -> None:
    conf = tmp_path / "default"
    conf.write_text("# topowatch hooks\nTOPOWATCH_HOOK_FALLBACK=\"flush\"\n")
    proc, elapsed = run(NM, "eth0", "up", bin=stubs, env={"STUB_EXIT": "1", "TOPOWATCH_HOOK_CONFIG": str(conf)})
    assert proc.returncode == 0
    assert stubs.wait_for("topowatch") == ["flush"]
    assert elapsed < 2
    assert "one-shot flush" in "\n".join(stubs.calls("logger") or [])


def test_nm_flush_fallback_runs_in_the_background(stubs: Bin) -> None:
    # A slow one-shot flush must not hold NetworkManager: the hook returns first.
    proc, elapsed = run(NM, "eth0", "up", bin=stubs,
                        env={"STUB_EXIT": "1", "TOPOWATCH_HOOK_FALLBACK": "flush", "STUB_SLEEP": "0"})
    assert proc.returncode == 0
    assert stubs.wait_for("topowatch") == ["flush"]
    assert elapsed < 2


def test_nm_unknown_fallback_is_refused(stubs: Bin) -> None:
    proc, _ = run(NM, "eth0", "up", bin=stubs, env={"STUB_EXIT": "1", "TOPOWATCH_HOOK_FALLBACK": "reboot"})
    assert proc.returncode == 0
    time.sleep(0.2)
    assert stubs.calls("topowatch") is None
    assert "unknown TOPOWATCH_HOOK_FALLBACK" in "\n".join(stubs.calls("logger") or [])


def test_nm_hanging_bus_is_cut_short(stubs: Bin) -> None:
    proc, elapsed = run(NM, "eth0", "up", bin=stubs, env={"STUB_SLEEP": "30"})
    assert proc.returncode == 0
    assert stubs.calls("busctl") is not None
    assert elapsed < 4  # `timeout 2` around the call


def test_nm_uses_dbus_send_without_busctl(tmp_path: Path) -> None:
    b = make_bin(tmp_path, ("dbus-send", "topowatch", "logger"))
    proc, _ = run(NM, "eth0", "up", bin=b)
    assert proc.returncode == 0
    assert b.calls("dbus-send") == [
        "--system", "--print-reply", "--reply-timeout=2000", "--dest=io.github.topowatch",
        "/io/github/topowatch", "io.github.topowatch.Agent1.TriggerEvent",
        "string:dispatcher", "string:eth0", "string:up",
    ]


def test_nm_without_any_bus_tool_falls_back(tmp_path: Path) -> None:
    b = make_bin(tmp_path, ("topowatch", "logger"))
    proc, _ = run(NM, "eth0", "up", bin=b, env={"TOPOWATCH_HOOK_FALLBACK": "flush"})
    assert proc.returncode == 0
    assert b.wait_for("topowatch") == ["flush"]


def test_bus_name_override_reaches_a_namespaced_daemon(stubs: Bin) -> None:
    proc, _ = run(NM, "eth0", "up", bin=stubs, env={"TOPOWATCH_BUS_NAME": "io.github.topowatch.netns_lab"})
    assert proc.returncode == 0
    calls = stubs.calls("busctl")
    assert calls is not None and calls[3] == "io.github.topowatch.netns_lab"


# -- strongSwan ----------------------------------------------------------------------------------


@pytest.mark.parametrize("verb", ["up-client", "down-client", "up-host", "down-host", "up-client-v6",
                                  "down-host-v6"])
def test_strongswan_triggers_xfrm(stubs: Bin, verb: str) -> None:
    env = {"PLUTO_VERB": verb, "PLUTO_INTERFACE": "eth1", "PLUTO_CONNECTION": "site-b"}
    proc, elapsed = run(SWAN, bin=stubs, env=env)
    assert proc.returncode == 0, proc.stderr
    assert stubs.calls("busctl") == [*BUS, "xfrm", "eth1", f"{verb} site-b"]
    assert elapsed < 2


def test_strongswan_sanitises_its_environment(stubs: Bin) -> None:
    env = {"PLUTO_VERB": "up-client", "PLUTO_INTERFACE": "unknown", "PLUTO_CONNECTION": "a b;$(reboot)\n"}
    proc, _ = run(SWAN, bin=stubs, env=env)
    assert proc.returncode == 0
    assert stubs.calls("busctl") == [*BUS, "xfrm", "", "up-client abreboot"]


@pytest.mark.parametrize("env", [{"PLUTO_VERB": "prepare-host"}, {}])
def test_strongswan_ignores_other_verbs(stubs: Bin, env: dict[str, str]) -> None:
    proc, _ = run(SWAN, bin=stubs, env=env)
    assert proc.returncode == 0
    assert stubs.calls("busctl") is None


def test_strongswan_daemon_down_with_flush(stubs: Bin) -> None:
    env = {"PLUTO_VERB": "up-client", "STUB_EXIT": "1", "TOPOWATCH_HOOK_FALLBACK": "flush"}
    proc, _ = run(SWAN, bin=stubs, env=env)
    assert proc.returncode == 0
    assert stubs.wait_for("topowatch") == ["flush"]


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
    yield up / "topowatch", down / "topowatch"


def test_ppp_up_and_down(stubs: Bin, ppp_dirs: tuple[Path, Path]) -> None:
    up, down = ppp_dirs
    args = ("ppp0", "/dev/ttyUSB0", "115200", "100.64.0.2", "100.64.0.1", "lte")
    proc, elapsed = run(up, *args, bin=stubs, argv0=up, env={"PPP_IFACE": "ppp0"})
    assert proc.returncode == 0, proc.stderr
    assert stubs.calls("busctl") == [*BUS, "dispatcher", "ppp0", "ppp-up"]
    assert elapsed < 2
    proc, _ = run(down, *args, bin=stubs, argv0=down)  # no PPP_IFACE: the first argument
    assert proc.returncode == 0
    assert stubs.calls("busctl") == [*BUS, "dispatcher", "ppp0", "ppp-down"]


def test_ppp_bad_interface(stubs: Bin, ppp_dirs: tuple[Path, Path]) -> None:
    up, _ = ppp_dirs
    proc, _ = run(up, "../../x", bin=stubs, argv0=up)
    assert proc.returncode == 0
    assert stubs.calls("busctl") is None
