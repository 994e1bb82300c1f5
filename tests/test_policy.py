"""rules.d policies: precedence, validation (file, line, key), StrictModes, reload, selection.

Every test works in tmp_path directories; nothing under /etc, /run or /usr/lib is touched.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from topowatch.core.conntrack import IPS_CONFIRMED, IPS_SEEN_REPLY, CtTuple, Entry
from topowatch.core.eligibility import DEFAULT_ELIGIBILITY, Eligibility, any_of
from topowatch.core.model import AF_INET, AF_INET6
from topowatch.errors import PolicyError, TopowatchError
from topowatch.policy import (
    ALL_TRIGGERS,
    DEFAULT_EFFECTIVE,
    DEFAULT_POLICY,
    KEYS,
    TRIGGERS,
    Action,
    EffectivePolicy,
    FileStatus,
    Policy,
    PolicyErrors,
    PolicyStore,
    check_main,
    key_lines,
    load_policies,
)

REPO_RULES = Path(__file__).resolve().parents[1] / "rules.d"
ETC, RUN, USR = 0, 1, 2
EMPTY = "<empty file>"
DEVNULL = "<symlink to /dev/null>"


def layers(root: Path) -> list[Path]:
    """Three directories standing in for /etc, /run and /usr/lib (highest priority first)."""
    out = []
    for name in ("etc", "run", "usr"):
        d = root / name / "rules.d"
        d.mkdir(parents=True, exist_ok=True)
        for p in (d, d.parent, root):
            p.chmod(0o755)
        out.append(d)
    return out


def put(directory: Path, name: str, content: str, mode: int = 0o644) -> Path:
    path = directory / name
    if content == DEVNULL:
        path.symlink_to(os.devnull)
        return path
    path.write_text("" if content == EMPTY else content)
    path.chmod(mode)
    return path


def load(dirs: list[Path], **kwargs: Any) -> EffectivePolicy:
    return load_policies([str(d) for d in dirs], **kwargs)


def errors_of(dirs: list[Path], **kwargs: Any) -> tuple[PolicyError, ...]:
    with pytest.raises(PolicyErrors) as info:
        load(dirs, **kwargs)
    return info.value.errors


def entry(
    proto: int = 17,
    src: str = "10.0.1.2",
    dst: str = "198.51.100.7",
    *,
    replied: bool = False,
    zone: int = 0,
    mark: int = 0,
) -> Entry:
    s, d = ip_address(src), ip_address(dst)
    return Entry(
        family=AF_INET if s.version == 4 else AF_INET6,
        proto=proto,
        orig=CtTuple(s, d, 40000, 53),
        reply=CtTuple(d, s, 53, 40000),
        status=IPS_CONFIRMED | (IPS_SEEN_REPLY if replied else 0),
        zone=zone,
        mark=mark,
    )


# -- precedence ----------------------------------------------------------------------------------

A5 = "[policy.a]\nmax_deletions = 5\n"
A7_LOG = '[policy.a]\nmax_deletions = 7\naction = "log"\n'
B9 = "[policy.b]\nmax_deletions = 9\n"

# (files as (layer, name, content), expected {policy: {key: value}}, expected {(policy, key): (layer, name)})
PRECEDENCE: dict[str, tuple[list[tuple[int, str, str]], dict[str, dict[str, Any]], dict[Any, Any]]] = {
    "usr only": ([(USR, "50-a.toml", A5)], {"a": {"max_deletions": 5}}, {("a", "max_deletions"): (USR, "50-a.toml")}),
    "etc overrides usr, lower file hidden whole": (
        [(USR, "50-a.toml", A7_LOG), (ETC, "50-a.toml", A5)],
        {"a": {"max_deletions": 5, "action": Action.FLUSH}},
        {("a", "max_deletions"): (ETC, "50-a.toml")},
    ),
    "run overrides usr": (
        [(USR, "50-a.toml", A5), (RUN, "50-a.toml", A7_LOG)],
        {"a": {"max_deletions": 7, "action": Action.LOG}},
        {("a", "action"): (RUN, "50-a.toml")},
    ),
    "etc over run over usr": (
        [(USR, "50-a.toml", A5), (RUN, "50-a.toml", A7_LOG), (ETC, "50-a.toml", "[policy.a]\nmax_deletions = 3\n")],
        {"a": {"max_deletions": 3, "action": Action.FLUSH}},
        {("a", "max_deletions"): (ETC, "50-a.toml")},
    ),
    "empty file in etc masks": ([(USR, "50-a.toml", A5), (ETC, "50-a.toml", EMPTY)], {}, {}),
    "/dev/null link in run masks, other names stay": (
        [(USR, "50-a.toml", A5), (RUN, "50-a.toml", DEVNULL), (USR, "60-b.toml", B9)],
        {"b": {"max_deletions": 9}},
        {("b", "max_deletions"): (USR, "60-b.toml")},
    ),
    "mask in a lower dir hides nothing above": (
        [(USR, "50-a.toml", DEVNULL), (ETC, "50-a.toml", A5)],
        {"a": {"max_deletions": 5}},
        {},
    ),
    "sorted by name across dirs, not by dir": (
        [(ETC, "10-x.toml", "[policy.a]\nmax_deletions = 1\n"), (USR, "20-x.toml", "[policy.a]\nmax_deletions = 2\n")],
        {"a": {"max_deletions": 2}},
        {("a", "max_deletions"): (USR, "20-x.toml")},
    ),
    "names sort as strings: 9- after 10-": (
        [(USR, "9-x.toml", "[policy.a]\nmax_deletions = 9\n"), (USR, "10-x.toml", "[policy.a]\nmax_deletions = 10\n")],
        {"a": {"max_deletions": 9}},
        {("a", "max_deletions"): (USR, "9-x.toml")},
    ),
    "later file wins per key, earlier keys stay": (
        [(USR, "10-a.toml", A7_LOG), (ETC, "20-a.toml", "[policy.a]\nmax_deletions = 2\n")],
        {"a": {"max_deletions": 2, "action": Action.LOG}},
        {("a", "max_deletions"): (ETC, "20-a.toml"), ("a", "action"): (USR, "10-a.toml")},
    ),
    "other names and hidden files ignored": (
        [(USR, "50-a.conf", A5), (USR, ".50-a.toml", A5), (ETC, "README.md", "x = ="), (USR, "60-b.toml", B9)],
        {"b": {"max_deletions": 9}},
        {},
    ),
    "comment-only file defines nothing": ([(USR, "50-a.toml", "# nothing here\n")], {}, {}),
    "file may tune the built-in name": (
        [(USR, "50-a.toml", "[policy.default]\nmax_deletions = 4\n")],
        {"default": {"max_deletions": 4, "triggers": ALL_TRIGGERS}},
        {},
    ),
}


@pytest.mark.parametrize("case", PRECEDENCE, ids=list(PRECEDENCE))
def test_precedence(tmp_path: Path, case: str) -> None:
    files, expected, origins = PRECEDENCE[case]
    dirs = layers(tmp_path)
    for layer, name, content in files:
        put(dirs[layer], name, content)
    effective = load(dirs)
    if not expected:
        assert effective == DEFAULT_EFFECTIVE
        assert effective.policies == (DEFAULT_POLICY,)
    else:
        assert [p.name for p in effective.policies] == sorted(expected)
    for name, keys in expected.items():
        for key, value in keys.items():
            assert effective[name].value(key) == value, (name, key)
    for (name, key), (layer, filename) in origins.items():
        assert effective.origin(name, key).file == str(dirs[layer] / filename)


def test_file_states_are_reported(tmp_path: Path) -> None:
    dirs = layers(tmp_path)
    put(dirs[USR], "50-a.toml", A5)
    put(dirs[ETC], "50-a.toml", A7_LOG)
    put(dirs[RUN], "60-b.toml", DEVNULL)
    put(dirs[USR], "60-b.toml", B9)
    put(dirs[USR], "70-c.toml", EMPTY)
    states = {(f.path, f.status, f.by) for f in load(dirs).files}
    assert states == {
        (str(dirs[ETC] / "50-a.toml"), FileStatus.READ, ""),
        (str(dirs[RUN] / "60-b.toml"), FileStatus.MASKED, ""),
        (str(dirs[USR] / "60-b.toml"), FileStatus.OVERRIDDEN, str(dirs[RUN] / "60-b.toml")),
        (str(dirs[USR] / "70-c.toml"), FileStatus.MASKED, ""),
        (str(dirs[USR] / "50-a.toml"), FileStatus.OVERRIDDEN, str(dirs[ETC] / "50-a.toml")),
    }


def test_missing_directories_give_the_builtin_default(tmp_path: Path) -> None:
    effective = load_policies([str(tmp_path / "nope"), str(tmp_path / "neither")])
    assert effective == DEFAULT_EFFECTIVE
    default = effective["default"]
    assert default.triggers == ALL_TRIGGERS == frozenset(TRIGGERS)
    assert default.eligibility == DEFAULT_ELIGIBILITY
    assert default.action is Action.FLUSH
    assert default.max_deletions == 100_000
    assert (default.debounce, default.max_wait) == (0.25, 2.0)


# -- the merge as a property ---------------------------------------------------------------------

NAMES = ["10-a.toml", "20-b.toml", "30-c.toml", "5-d.toml"]
KEY_VALUES = {
    "max_deletions": st.integers(1, 10),
    "action": st.sampled_from(["flush", "log"]),
    "enabled": st.booleans(),
    "zones": st.lists(st.integers(0, 5), min_size=1, max_size=3),
}
CONTENT = st.one_of(
    st.just(EMPTY),
    st.just(DEVNULL),
    st.dictionaries(
        st.sampled_from(["p", "q"]),
        st.fixed_dictionaries({}, optional=KEY_VALUES),
        max_size=2,
    ),
)
LAYOUT = st.lists(st.dictionaries(st.sampled_from(NAMES), CONTENT, max_size=4), min_size=3, max_size=3)


def toml_of(content: dict[str, dict[str, Any]]) -> str:
    out = ["# generated"]
    for policy, keys in content.items():
        out.append(f"[policy.{policy}]")
        for key, value in keys.items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            else:
                text = f'"{value}"' if isinstance(value, str) else str(value)
            out.append(f"{key} = {text}")
    return "\n".join(out) + "\n"


def expected_merge(layout: list[dict[str, Any]], dirs: list[Path]) -> dict[str, dict[str, tuple[Any, str]]]:
    """An independent statement of the rules: for each name the highest layer holding it wins;
    masks drop out; the rest apply in name order, key by key."""
    merged: dict[str, dict[str, tuple[Any, str]]] = {}
    for name in sorted({n for layer in layout for n in layer}):
        layer = next(i for i in range(3) if name in layout[i])
        content = layout[layer][name]
        if content in (EMPTY, DEVNULL):
            continue
        for policy, keys in content.items():
            target = merged.setdefault(policy, {})
            for key, value in keys.items():
                target[key] = (value, str(dirs[layer] / name))
    return merged


def as_parsed(key: str, value: Any) -> Any:
    if key == "zones":
        return frozenset(value)
    if key == "action":
        return Action(value)
    return value


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(LAYOUT)
def test_merge_matches_the_rules(layout: list[dict[str, Any]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        dirs = layers(Path(tmp))
        for layer, files in enumerate(layout):
            for name, content in files.items():
                put(dirs[layer], name, content if content in (EMPTY, DEVNULL) else toml_of(content))
        effective = load(dirs)
        expected = expected_merge(layout, dirs)
        if not expected:
            assert effective == DEFAULT_EFFECTIVE
            return
        assert [p.name for p in effective.policies] == sorted(expected)
        for name, keys in expected.items():
            policy = effective[name]
            for key, spec in KEYS.items():
                if key in keys:
                    value, path = keys[key]
                    assert policy.value(key) == as_parsed(key, value), (name, key)
                    assert effective.origin(name, key).file == path
                else:
                    assert policy.value(key) == spec.default, (name, key)
                    assert effective.origin(name, key).file == ""


# -- validation: every mistake names file, line and key -------------------------------------------

# (file text, line, key, words the message must hold)
INVALID: dict[str, tuple[str, int, str, str]] = {
    "unknown key": ("[policy.a]\naction = 'log'\nmax_deletion = 5\n", 3, "policy.a.max_deletion",
                    "did you mean 'max_deletions'"),
    "unknown top-level key": ("# x\n[polcy.a]\naction = 'log'\n", 2, "polcy", "did you mean 'policy'"),
    "policy not a table": ("policy = 3\n", 1, "policy", "expected [policy.NAME] tables"),
    "policy entry not a table": ("[policy]\na = 3\n", 2, "policy.a", "expected a table"),
    "bad policy name": ('[policy."a b"]\naction = "log"\n', 1, "policy.a b", "bad policy name"),
    "bool as string": ("[policy.a]\nunreplied_only = 'yes'\n", 2, "policy.a.unreplied_only", "expected true or false"),
    "int as string": ("[policy.a]\n\nmax_deletions = '5'\n", 3, "policy.a.max_deletions", "expected an integer"),
    "bool as int": ("[policy.a]\nmax_deletions = true\n", 2, "policy.a.max_deletions", "expected an integer"),
    "string for array": ("[policy.a]\ntriggers = 'link'\n", 2, "policy.a.triggers", "expected an array"),
    "empty array": ("[policy.a]\nfamilies = []\n", 2, "policy.a.families", "empty array"),
    "unknown trigger": ("[policy.a]\ntriggers = ['link', 'lnk']\n", 2, "policy.a.triggers",
                        "[1]: unknown trigger 'lnk'; did you mean 'link'"),
    "unknown family": ("[policy.a]\nfamilies = ['ipv5']\n", 2, "policy.a.families", "unknown family 'ipv5'"),
    "bad protocol name": ("[policy.a]\nprotocols = ['udp', 'udpp']\n", 2, "policy.a.protocols",
                          "unknown protocol name 'udpp'; did you mean 'udp'"),
    "protocol number too large": ("[policy.a]\nprotocols = [256]\n", 2, "policy.a.protocols", "too large"),
    "negative protocol": ("[policy.a]\nprotocols = [-1]\n", 2, "policy.a.protocols", "negative"),
    "negative zone": ("[policy.a]\nzones = [1, -1]\n", 2, "policy.a.zones", "[1]: -1 is negative"),
    "bad mark number": ("[policy.a]\nmarks = ['0x10/0xzz']\n", 2, "policy.a.marks", "not a number"),
    "mark outside mask": ("[policy.a]\nmarks = ['0x100/0xff']\n", 2, "policy.a.marks", "outside its mask"),
    "negative mark": ("[policy.a]\nmarks = [-2]\n", 2, "policy.a.marks", "negative"),
    "bad prefix": ("[policy.a]\nsources = ['10.0.0.300/8']\n", 2, "policy.a.sources", "bad prefix '10.0.0.300/8'"),
    "prefix with host bits": ("[policy.a]\ndestinations = ['10.1.2.3/8']\n", 2, "policy.a.destinations",
                              "did you mean '10.0.0.0/8'"),
    "prefix not a string": ("[policy.a]\nsources = [10]\n", 2, "policy.a.sources", "expected a prefix string"),
    "bad interface": ("[policy.a]\ninterfaces = ['eth/0']\n", 2, "policy.a.interfaces", "bad interface name"),
    "interface too long": ("[policy.a]\ninterfaces = ['abcdefghijklmnop']\n", 2, "policy.a.interfaces",
                           "at most 15"),
    "unknown action": ("[policy.a]\naction = 'flsh'\n", 2, "policy.a.action", "did you mean 'flush'"),
    "negative max_deletions": ("[policy.a]\nmax_deletions = -3\n", 2, "policy.a.max_deletions", "must be > 0"),
    "zero max_deletions": ("[policy.a]\nmax_deletions = 0\n", 2, "policy.a.max_deletions", "must be > 0"),
    "negative debounce": ("[policy.a]\ndebounce = -0.5\n", 2, "policy.a.debounce", ">= 0, got -0.5"),
    "infinite max_wait": ("[policy.a]\nmax_wait = inf\n", 2, "policy.a.max_wait", "finite"),
    "max_wait below debounce": ("[policy.a]\ndebounce = 3.0\nmax_wait = 1.0\n", 3, "policy.a.max_wait",
                                "shorter than debounce 3.0"),
    "max_wait default below debounce": ("[policy.a]\n\ndebounce = 3\n", 3, "policy.a.debounce",
                                        "max_wait 2.0 is shorter than debounce 3.0"),
    "bad TOML value": ("[policy.a]\naction = 'log'\nmax_wait = 2.0.0\n", 3, "policy.a.max_wait", "bad TOML syntax"),
    "bad TOML duplicate key": ("[policy.a]\naction = 'log'\naction = 'flush'\n", 3, "policy.a.action",
                               "bad TOML syntax"),
    "dotted key form": ("policy.a.action = 'log'\npolicy.a.debouce = 1\n", 2, "policy.a.debouce",
                        "did you mean 'debounce'"),
    "dotted key inside [policy]": ("[policy]\na.action = 'log'\nb.zones = ['x']\n", 3, "policy.b.zones",
                                   "expected an integer"),
    "quoted table name": ("[policy.\"a\"]\n\n\n\"max_wait\" = -1\n", 4, "policy.a.max_wait", ">= 0"),
    "after a multi-line array": ("[policy.a]\ntriggers = [\n  'link',\n  'route',\n]\nactoin = 'log'\n", 6,
                                 "policy.a.actoin", "did you mean 'action'"),
    # [pressure]
    "pressure unknown key": ("[pressure]\nenabled = true\nhihg = 0.9\n", 3, "pressure.hihg", "did you mean 'high'"),
    "pressure percent": ("[pressure]\nhigh = 90\n", 2, "pressure.high", "did you mean 0.9?"),
    "pressure low above high": ("[pressure]\nhigh = 0.5\nlow = 0.8\n", 3, "pressure.low",
                                "low 0.8 must be below high 0.5 (high from "),
    "pressure low above default high": ("[pressure]\n\nlow = 0.95\n", 3, "pressure.low",
                                        "low 0.95 must be below high 0.9 (high from built-in default)"),
    "pressure tcp replied": ("[pressure]\nevict_replied = ['udp', 'tcp']\n", 2, "pressure.evict_replied",
                             "replied tcp entries are never evicted"),
    "pressure healthy timeout": ("[pressure]\nlower_timeouts = { udp_stream = 5 }\n", 2,
                                 "pressure.lower_timeouts", "udp_stream: not a timeout that may be lowered"),
    "pressure zero timeout": ("[pressure]\nlower_timeouts = { udp = 0 }\n", 2, "pressure.lower_timeouts",
                              "udp: 0 is too small (must be 1.."),
    "pressure bad prefix": ("[pressure]\nprotect_prefixes = ['10.0.0.1/8']\n", 2, "pressure.protect_prefixes",
                            "did you mean '10.0.0.0/8'"),
    "pressure not a table": ("pressure = 1\n", 1, "pressure", "expected a table [pressure]"),
    "pressure zero batch": ("[pressure]\nbatch = 0\n", 2, "pressure.batch", "must be 1..10000000"),
    "pressure intervals": ("[pressure]\nmin_interval = 60\n", 2, "pressure.min_interval",
                           "min_interval 60.0 exceeds max_interval 30.0"),
}


@pytest.mark.parametrize("case", INVALID, ids=list(INVALID))
def test_invalid(tmp_path: Path, case: str) -> None:
    text, line, key, words = INVALID[case]
    dirs = layers(tmp_path)
    path = put(dirs[USR], "50-x.toml", text)
    (error,) = errors_of(dirs)
    assert (error.file, error.line, error.key) == (str(path), line, key)
    message = str(error)
    assert message.startswith(f"{path}:{line}: {key}: ")
    assert words in message


def test_multiline_string_content_is_not_a_key(tmp_path: Path) -> None:
    # The lines inside x's string would look like "action = 1"; the error for the real key
    # on line 7 must point there, not at line 4.
    dirs = layers(tmp_path)
    put(dirs[USR], "50-x.toml", '# a\n[policy.a]\nx = """\naction = 1\n"""\n\naction = 2\n')
    by_key = {e.key: e.line for e in errors_of(dirs)}
    assert by_key == {"policy.a.x": 3, "policy.a.action": 7}


def test_not_utf8(tmp_path: Path) -> None:
    dirs = layers(tmp_path)
    path = dirs[USR] / "50-x.toml"
    path.write_bytes(b"[policy.a]\n# caf\xe9\n")
    path.chmod(0o644)
    (error,) = errors_of(dirs)
    assert (error.file, error.line) == (str(path), 2)
    assert "not UTF-8" in str(error)


def test_every_error_in_every_file_is_reported(tmp_path: Path) -> None:
    dirs = layers(tmp_path)
    first = put(dirs[USR], "10-a.toml", "[policy.a]\nzones = [-1]\naction = 'nope'\n")
    second = put(dirs[ETC], "20-b.toml", "[policy.b]\n\nfamilies = ['ipv7']\nmax_wait = 'x'\n")
    third = put(dirs[RUN], "30-c.toml", "[policy.c\n")
    found = [(e.file, e.line, e.key) for e in errors_of(dirs)]
    assert found == [
        (str(first), 2, "policy.a.zones"),
        (str(first), 3, "policy.a.action"),
        (str(second), 3, "policy.b.families"),
        (str(second), 4, "policy.b.max_wait"),
        (str(third), 1, ""),
    ]


def test_max_wait_below_debounce_across_files_names_both(tmp_path: Path) -> None:
    dirs = layers(tmp_path)
    first = put(dirs[USR], "10-a.toml", "[policy.a]\ndebounce = 3.0\n")
    second = put(dirs[ETC], "20-a.toml", "[policy.a]\n\nmax_wait = 1.5\n")
    (error,) = errors_of(dirs)
    assert (error.file, error.line, error.key) == (str(second), 3, "policy.a.max_wait")
    assert f"debounce from {first}:2" in str(error)


def test_a_later_file_can_repair_an_earlier_value(tmp_path: Path) -> None:
    # Cross-key checks apply to the merged policy, so a drop-in may fix a shipped pair.
    dirs = layers(tmp_path)
    put(dirs[USR], "10-a.toml", "[policy.a]\ndebounce = 3.0\n")
    put(dirs[ETC], "20-a.toml", "[policy.a]\nmax_wait = 5\n")
    policy = load(dirs)["a"]
    assert (policy.debounce, policy.max_wait) == (3.0, 5.0)


def test_policy_errors_is_a_policy_error_and_lists_each() -> None:
    errors = PolicyErrors([PolicyError("bad", file="/x/a.toml", line=3, key="policy.a.zones")])
    assert isinstance(errors, PolicyError)
    assert isinstance(errors, TopowatchError)
    assert "/x/a.toml:3: policy.a.zones: bad" in str(errors)


def test_key_lines() -> None:
    text = "# c\n[policy.a]\naction = 'log'\n[policy . \"b\"]\n'zones' = [1]\n[other]\npolicy.c.x = 1\n"
    lines = key_lines(text)
    assert lines[("policy", "a")] == 2
    assert lines[("policy", "a", "action")] == 3
    assert lines[("policy", "b", "zones")] == 5
    assert lines[("other", "policy", "c", "x")] == 7
    assert ("policy", "c", "x") not in lines


# -- StrictModes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o666, 0o664, 0o646, 0o620, 0o602])
def test_group_or_other_writable_file_is_refused(tmp_path: Path, mode: int) -> None:
    dirs = layers(tmp_path)
    path = put(dirs[USR], "50-a.toml", A5, mode=mode)
    (error,) = errors_of(dirs)
    assert error.file == str(path)
    assert f"writable by group or others (mode {mode:04o})" in str(error)
    assert "chmod go-w" in str(error)


def test_writable_directory_is_refused(tmp_path: Path) -> None:
    dirs = layers(tmp_path)
    put(dirs[RUN], "50-a.toml", A5)
    dirs[RUN].chmod(0o777)
    (error,) = errors_of(dirs)
    assert error.file == str(dirs[RUN])
    assert "directory refused: writable by group or others" in str(error)


def test_writable_empty_file_cannot_mask(tmp_path: Path) -> None:
    dirs = layers(tmp_path)
    put(dirs[USR], "50-a.toml", A5)
    path = put(dirs[ETC], "50-a.toml", EMPTY, mode=0o666)
    (error,) = errors_of(dirs)
    assert error.file == str(path)


def test_devnull_link_masks_although_devnull_is_world_writable(tmp_path: Path) -> None:
    assert os.stat(os.devnull).st_mode & 0o002
    dirs = layers(tmp_path)
    put(dirs[USR], "50-a.toml", A5)
    put(dirs[ETC], "50-a.toml", DEVNULL)
    assert load(dirs) == DEFAULT_EFFECTIVE


def test_hidden_file_is_not_read_so_not_checked(tmp_path: Path) -> None:
    dirs = layers(tmp_path)
    put(dirs[USR], "50-a.toml", "this is not toml", mode=0o666)
    put(dirs[ETC], "50-a.toml", A5)
    assert load(dirs)["a"].max_deletions == 5


def test_untrusted_owner_is_refused_injected(tmp_path: Path) -> None:
    dirs = layers(tmp_path)
    put(dirs[USR], "50-a.toml", A5)
    stranger = dirs[USR].stat().st_uid + 4321
    found = errors_of(dirs, trusted_uids={stranger})
    # Each directory is refused, and no file in a refused directory is read.
    assert [(e.file, e.line) for e in found] == [(str(d), 0) for d in dirs]
    assert all(f"owned by uid {dirs[USR].stat().st_uid}, not uid {stranger}" in str(e) for e in found)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_file_owned_by_another_user_is_refused_as_root(tmp_path: Path) -> None:
    dirs = layers(tmp_path)
    path = put(dirs[USR], "50-a.toml", A5)
    os.chown(path, 1234, 1234)
    (error,) = errors_of(dirs)
    assert error.file == str(path)
    assert "owned by uid 1234, not root" in str(error)
    assert "chown root" in str(error)


# -- reload --------------------------------------------------------------------------------------


def test_store_reload_keeps_the_previous_policy_on_error(tmp_path: Path) -> None:
    dirs = layers(tmp_path)
    path = put(dirs[USR], "50-a.toml", A5)
    store = PolicyStore.open([str(d) for d in dirs])
    first = store.current
    assert first["a"].max_deletions == 5

    path.write_text("[policy.a]\nmax_deletions = 6\n")
    second = store.reload()
    assert store.current is second
    assert second["a"].max_deletions == 6

    path.write_text("[policy.a]\nmax_deletions = -6\n")
    with pytest.raises(PolicyErrors) as info:
        store.reload()
    assert info.value.errors[0].key == "policy.a.max_deletions"
    assert store.current is second

    path.chmod(0o666)
    path.write_text(A5)
    with pytest.raises(PolicyErrors):
        store.reload()
    assert store.current is second


def test_store_open_refuses_an_invalid_policy(tmp_path: Path) -> None:
    dirs = layers(tmp_path)
    put(dirs[USR], "50-a.toml", "[policy.a]\nbogus = 1\n")
    with pytest.raises(PolicyErrors):
        PolicyStore.open([str(d) for d in dirs])


# -- selection at reaction time ------------------------------------------------------------------


def test_select_by_trigger_and_interface() -> None:
    uplink = Policy("uplink", triggers=frozenset({"link", "address"}), interfaces=("ppp*", "wwan0"))
    ipsec = Policy("ipsec", triggers=frozenset({"xfrm"}))
    off = Policy("off", enabled=False)
    effective = EffectivePolicy((ipsec, off, uplink))

    def names(*events: tuple[str, str | None]) -> list[str]:
        return [p.name for p in effective.select(events).policies]

    assert names(("link", "ppp0")) == ["uplink"]
    assert names(("link", "eth0")) == []
    assert names(("link", "xppp0")) == []  # patterns are anchored
    assert names(("link", "wwan0")) == ["uplink"]
    assert names(("link", "wwan01")) == []
    assert names(("address", None)) == ["uplink"]  # no interface named: counts
    assert names(("xfrm", None)) == ["ipsec"]
    assert names(("route", None)) == []
    assert names(("link", "eth0"), ("xfrm", None)) == ["ipsec"]
    assert names(("startup", None)) == ["ipsec", "uplink"]  # not a trigger kind: re-read everything
    assert names(("request", None)) == ["ipsec", "uplink"]
    assert names(("request", "ppp1")) == ["ipsec", "uplink"]
    assert names(("request", "eth0")) == ["ipsec"]  # a request for one interface: its policies only
    assert names(("overrun", "eth0")) == ["ipsec", "uplink"]
    assert names() == []


def test_selection_actions_caps_and_eligibility() -> None:
    watch_all = Policy("watch", action=Action.LOG, max_deletions=5,
                       eligibility=Eligibility(protocols=frozenset({1, 6, 17})))
    flush_udp = Policy("udp", max_deletions=50, eligibility=Eligibility(protocols=frozenset({17})))
    flush_v6 = Policy("v6", max_deletions=70, eligibility=Eligibility(families=frozenset({AF_INET6})))
    selection = EffectivePolicy((flush_udp, flush_v6, watch_all)).select([("route", None)])
    assert selection.action_for(entry(17)) is Action.FLUSH
    assert selection.action_for(entry(1)) is Action.LOG
    assert selection.action_for(entry(6)) is Action.LOG
    assert selection.action_for(entry(47)) is None
    assert selection.action_for(entry(47, "2001:db8::1", "2001:db8::2")) is Action.FLUSH
    assert selection.flushes(entry(17)) and not selection.flushes(entry(1))
    assert selection.max_deletions == 50  # the log policy's cap does not bind
    union = selection.eligibility
    for e in (entry(17), entry(1), entry(6), entry(47, "2001:db8::1", "2001:db8::2")):
        assert union.admits(e)
    assert not union.admits(entry(47))
    assert not union.admits(entry(17, replied=True))
    assert EffectivePolicy((watch_all,)).select([("route", None)]).max_deletions == 0


def test_daemon_window_is_the_shortest_among_enabled() -> None:
    effective = EffectivePolicy((
        Policy("a", debounce=0.5, max_wait=4.0),
        Policy("b", debounce=0.1, max_wait=3.0),
        Policy("c", enabled=False, debounce=0.0, max_wait=0.0),
    ))
    assert (effective.debounce, effective.max_wait) == (0.1, 3.0)
    assert effective.triggers == ALL_TRIGGERS


def test_policy_rejects_max_wait_below_debounce() -> None:
    with pytest.raises(ValueError, match="max_wait"):
        Policy("a", debounce=1.0, max_wait=0.5)


# -- any_of (core.eligibility) -------------------------------------------------------------------

ADDRS = ["10.0.1.2", "10.9.0.1", "198.51.100.7", "2001:db8::1", "2001:db8:1::2", "fd00::5"]
ENTRIES = st.builds(
    lambda proto, pair, replied, zone, mark: entry(proto, *pair, replied=replied, zone=zone, mark=mark),
    st.sampled_from([1, 6, 17, 33, 47, 58, 132, 136]),
    st.sampled_from([(a, b) for a in ADDRS for b in ADDRS if (":" in a) == (":" in b)]),
    st.booleans(),
    st.integers(0, 3),
    st.integers(0, 7),
)
NETS = st.sampled_from(["10.0.0.0/16", "10.0.0.0/8", "198.51.100.0/24", "2001:db8::/48", "fd00::/8"]).map(
    ip_network
)
ELIGIBILITIES = st.builds(
    Eligibility,
    families=st.sampled_from([frozenset({AF_INET}), frozenset({AF_INET6}), frozenset({AF_INET, AF_INET6})]),
    protocols=st.none() | st.frozensets(st.sampled_from([1, 6, 17, 47, 58]), min_size=1),
    unreplied_only=st.booleans(),
    zones=st.none() | st.frozensets(st.integers(0, 3), min_size=1),
    marks=st.none() | st.lists(st.tuples(st.integers(0, 7), st.just(7)), min_size=1, max_size=2).map(tuple),
    sources=st.none() | st.lists(NETS, min_size=1, max_size=2).map(tuple),
    destinations=st.none() | st.lists(NETS, min_size=1, max_size=2).map(tuple),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(ELIGIBILITIES, max_size=4), st.lists(ENTRIES, min_size=1, max_size=8))
def test_any_of_admits_exactly_what_one_alternative_admits(alts: list[Eligibility], entries: list[Entry]) -> None:
    union = any_of(alts)
    bound = replace(union, alternatives=())
    for e in entries:
        expected = any(a.admits(e) for a in alts)
        assert union.admits(e) == expected
        if expected:
            assert bound.admits(e), "the loose bound must admit whatever an alternative admits"


def test_any_of_edge_cases() -> None:
    assert any_of([DEFAULT_ELIGIBILITY]) is DEFAULT_ELIGIBILITY
    assert not any_of([]).admits(entry())
    assert DEFAULT_ELIGIBILITY.alternatives == ()
    tcp = Eligibility(protocols=frozenset({6}))
    both = any_of([DEFAULT_ELIGIBILITY, tcp])
    assert both.protocols is not None and 6 in both.protocols and 17 in both.protocols
    assert any_of([DEFAULT_ELIGIBILITY, replace(DEFAULT_ELIGIBILITY, zones=frozenset({1}))]).protocols is None
    assert not any_of([DEFAULT_ELIGIBILITY, replace(tcp, unreplied_only=False)]).unreplied_only


# -- the shipped rules.d -------------------------------------------------------------------------


def shipped(tmp_path: Path) -> Path:
    # Copied with fixed modes: a checkout's umask must not decide the test.
    target = tmp_path / "rules.d"
    target.mkdir(mode=0o755)
    target.chmod(0o755)
    tmp_path.chmod(0o755)
    for source in sorted(REPO_RULES.glob("*.toml")):
        put(target, source.name, source.read_text())
    return target


SHIPPED_TRIGGERS = {
    "link": "uplink", "networkmanager": "uplink", "dispatcher": "uplink", "xfrm": "ipsec",
    "route": "route", "rule": "route", "address": "address", "ruleset": "ruleset",
}


def test_shipped_rules_validate_and_mean_the_builtin_default(tmp_path: Path) -> None:
    assert sorted(p.name for p in REPO_RULES.glob("*.toml")) == [
        "50-uplink.toml", "60-ipsec.toml", "70-route.toml", "75-address.toml", "80-ruleset.toml",
        "90-pressure.toml",
    ]
    effective = load_policies([str(shipped(tmp_path))])
    assert sorted(p.name for p in effective.policies) == ["address", "ipsec", "route", "ruleset", "uplink"]
    assert set(SHIPPED_TRIGGERS) == ALL_TRIGGERS == effective.triggers
    for kind, name in SHIPPED_TRIGGERS.items():
        selection = effective.select([(kind, "ppp0")])
        assert [p.name for p in selection.policies] == [name], kind
        assert selection.eligibility == DEFAULT_ELIGIBILITY
        assert selection.max_deletions == 100_000
        assert selection.flushes(entry(17)) and selection.flushes(entry(47, "2001:db8::1", "2001:db8::2"))
        assert not selection.flushes(entry(6)) and not selection.flushes(entry(17, replied=True))
    for policy in effective.policies:
        assert policy.enabled and policy.interfaces is None and policy.action is Action.FLUSH
        assert policy.eligibility == DEFAULT_ELIGIBILITY
    assert (effective.debounce, effective.max_wait) == (0.25, 2.0)
    assert len(effective.select([("startup", None)]).policies) == 5


def test_shipped_policy_can_be_tuned_and_masked_from_etc(tmp_path: Path) -> None:
    usr = shipped(tmp_path)
    etc = tmp_path / "etc"
    etc.mkdir(mode=0o755)
    etc.chmod(0o755)
    put(etc, "60-ipsec.toml", DEVNULL)
    put(etc, "90-local.toml", '[policy.uplink]\naction = "log"\ninterfaces = ["ppp*", "wwan*"]\n')
    effective = load_policies([str(etc), str(usr)])
    assert sorted(p.name for p in effective.policies) == ["address", "route", "ruleset", "uplink"]
    assert effective["uplink"].action is Action.LOG
    assert effective["uplink"].triggers == frozenset({"link", "networkmanager", "dispatcher"})
    assert effective.origin("uplink", "triggers").file == str(usr / "50-uplink.toml")
    assert effective.origin("uplink", "action") == replace(effective.origin("uplink", "action"),
                                                            file=str(etc / "90-local.toml"), line=2)
    assert effective.select([("xfrm", None)]).policies == ()
    assert effective.select([("link", "eth0")]).policies == ()


# -- render and check ----------------------------------------------------------------------------

RICH = """\
[policy.rich]
triggers = ["xfrm", "link"]
families = ["ipv6"]
protocols = ["udp", 200, "gre"]
unreplied_only = false
zones = [3, 1]
marks = ["0x10/0xf0", 5]
sources = ["2001:db8::/32"]
destinations = ["fd00::/8", "2001:db8:1::1"]
interfaces = ["wg*"]
action = "log"
max_deletions = 7
debounce = 0
max_wait = 1.5

[policy.plain]
enabled = false
"""


@pytest.mark.parametrize("source", ["rich", "shipped", "none"])
def test_render_round_trips(tmp_path: Path, source: str) -> None:
    if source == "rich":
        (first := tmp_path / "first").mkdir(mode=0o755)
        first.chmod(0o755)
        put(first, "50-rich.toml", RICH)
    elif source == "shipped":
        first = shipped(tmp_path)
    else:
        first = tmp_path / "missing"
    effective = load_policies([str(first)])
    text = effective.render()
    again = tmp_path / "again"
    again.mkdir(mode=0o755)
    again.chmod(0o755)
    tmp_path.chmod(0o755)
    put(again, "50-rendered.toml", text)
    assert load_policies([str(again)]) == effective
    if source == "rich":
        rich = effective["rich"]
        assert rich.eligibility.protocols == frozenset({17, 200, 47})
        assert rich.eligibility.marks == ((0x10, 0xF0), (5, 0xFFFFFFFF))
        assert f'marks = ["0x10/0xf0", "0x5/0xffffffff"]  # {first}/50-rich.toml:7' in text
        assert "# read       " + str(first / "50-rich.toml") in text


def test_render_names_the_origin_of_each_value(tmp_path: Path) -> None:
    dirs = layers(tmp_path)
    put(dirs[USR], "10-a.toml", "[policy.a]\n\naction = 'log'\n")
    put(dirs[ETC], "20-a.toml", "[policy.a]\nmax_deletions = 9\n")
    put(dirs[RUN], "30-b.toml", DEVNULL)
    text = load(dirs).render()
    assert f'action = "log"  # {dirs[USR]}/10-a.toml:3' in text
    assert f"max_deletions = 9  # {dirs[ETC]}/20-a.toml:2" in text
    assert "debounce = 0.25  # built-in default" in text
    assert "# protocols: every connectionless protocol" in text
    assert f"# masked     30-b.toml by {dirs[RUN]}/30-b.toml" in text


def test_render_of_the_builtin_default_says_so() -> None:
    text = DEFAULT_EFFECTIVE.render()
    assert "[policy.default]" in text
    assert "no file defines a policy" in text


def test_check_main_prints_the_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check_main([str(shipped(tmp_path))]) == 0
    out, err = capsys.readouterr()
    assert "[policy.ipsec]" in out and 'triggers = ["xfrm"]' in out
    assert err == ""


def test_check_main_lists_every_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dirs = layers(tmp_path)
    bad = put(dirs[USR], "50-a.toml", "[policy.a]\nzones = [-1]\nactoin = 'log'\n")
    assert check_main([str(d) for d in dirs]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert f"{bad}:2: policy.a.zones:" in err
    assert f"{bad}:3: policy.a.actoin:" in err
    assert "2 error(s)" in err



def test_shipped_pressure_default_is_sane(tmp_path: Path) -> None:
    pressure = load_policies([str(shipped(tmp_path))]).pressure
    assert pressure.enabled and (pressure.low, pressure.high) == (0.75, 0.90)
    assert pressure.evict_unreplied and pressure.evict_replied == frozenset({17})  # udp only, never tcp
    assert dict(pressure.lower_timeouts)["udp"] == 10
    assert pressure.batch <= 1000  # small bounded batches
    # Without any file, nothing touches the table's timeouts.
    assert not load_policies([str(tmp_path / "none")]).pressure.enabled


def test_pressure_keys_merge_per_key_and_render(tmp_path: Path) -> None:
    dirs = layers(tmp_path)
    put(dirs[USR], "90-pressure.toml", "[pressure]\nenabled = true\nhigh = 0.8\nlow = 0.5\n")
    local = put(dirs[ETC], "95-local.toml",
                "[pressure]\nprotect_zones = [3]\nprotect_marks = ['0x10/0xf0']\nlow = 0.6\n")
    effective = load(dirs)
    p = effective.pressure
    assert (p.enabled, p.high, p.low) == (True, 0.8, 0.6)
    assert p.protect.zones == frozenset({3}) and p.protect.marks == ((0x10, 0xF0),)
    text = effective.render()
    assert f"low = 0.6  # {local}:4" in text
    assert 'protect_marks = ["0x10/0xf0"]' in text
    # The rendered [pressure] table loads back to the same pressure policy.
    again = tmp_path / "again"
    again.mkdir(mode=0o755)
    again.chmod(0o755)
    put(again, "50-all.toml", "[pressure]\n" + text.split("\n[pressure]\n")[1])
    assert load_policies([str(again)]).pressure == p
