"""External bytes are decoded on purpose; undecodable rules are unknown; log lines stay one escaped line."""

from __future__ import annotations

import logging
import sys

from topowatch.core.nat import UnknownStatement
from topowatch.edges.iptables import parse_save
from topowatch.edges.nft import mark_undecodable, parse_ruleset_json
from topowatch.edges.rtnl import _name
from topowatch.logs import TextFormatter
from topowatch.text import decode, escape, run_tool, undecodable


def test_decode_never_fails_and_marks_what_was_not_utf8() -> None:
    assert decode("café".encode()) == "café" and not undecodable("café")
    assert decode(b"caf\xe9") == "caf\udce9" and undecodable(decode(b"caf\xe9"))
    assert decode(bytes(range(256))).encode("utf-8", "surrogateescape") == bytes(range(256))


def test_escape_makes_one_safe_line() -> None:
    assert escape("e\x1b[31m\nfake\r\x00\x7f\x85") == "e\\x1b[31m\\x0afake\\x0d\\x00\\x7f\\x85"
    assert escape(decode(b"d\xe9v")) == "d\\xe9v"
    assert escape("café, eth0.100, wg-ß") == "café, eth0.100, wg-ß"


def test_run_tool_reads_bytes() -> None:
    proc = run_tool([sys.executable, "-c", "import sys; sys.stdout.buffer.write(b'caf\\xe9\\n')"], timeout=30)
    assert proc.returncode == 0 and proc.stdout == "caf\udce9\n"


def test_text_log_records_are_escaped() -> None:
    record = logging.LogRecord("topowatch", logging.INFO, __file__, 1, "link %s up", ("e\x1b[31m\nx\udce9",),
                               None)
    for journald in (False, True):
        line = TextFormatter(journald).format(record)
        assert "\x1b" not in line and "\n" not in line
        assert line.endswith("link e\\x1b[31m\\x0ax\\xe9 up")
        line.encode("utf-8")  # a lone surrogate would make the handler fail


def test_iptables_rule_with_undecodable_bytes_is_unknown_but_a_comment_is_harmless() -> None:
    text = decode(b"*nat\n:POSTROUTING ACCEPT [0:0]\n"
                  b"-A POSTROUTING -o eth0 -m comment --comment \"caf\xe9\" -j MASQUERADE\n"
                  b"-A POSTROUTING -o d\xe9v -j MASQUERADE\nCOMMIT\n")
    parsed = parse_save(text)
    (post,) = [c for c in parsed.ruleset.chains if c.name == "POSTROUTING"]
    first, second = post.rules
    assert not first.unknown_expressions()  # -o eth0, masquerade: read as usual
    assert isinstance(second.exprs[0], UnknownStatement) and len(second.exprs) == 1
    assert any("not UTF-8" in p for p in parsed.problems)


def test_nft_expression_with_undecodable_bytes_is_unknown() -> None:
    doc = {"nftables": [
        {"table": {"family": "inet", "name": "t"}},
        {"chain": {"family": "inet", "table": "t", "name": "post", "type": "nat", "hook": "postrouting",
                   "prio": 100, "policy": "accept"}},
        {"rule": {"family": "inet", "table": "t", "chain": "post", "comment": "caf\udce9", "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "d\udce9v"}},
            {"masquerade": None}]}},
        {"rule": {"family": "inet", "table": "t", "chain": "post", "comment": "caf\udce9", "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "eth0"}},
            {"masquerade": None}]}},
    ]}
    (chain,) = parse_ruleset_json(mark_undecodable(doc)).chains
    first, second = chain.rules
    assert isinstance(first.exprs[0], UnknownStatement)
    assert not second.unknown_expressions()


def test_rtnl_names_that_are_not_utf8_decode_like_rule_text() -> None:
    assert _name(b"d\xe9v\0") == decode(b"d\xe9v") == "d\udce9v"
    assert _name("eth0") == "eth0" and _name(None) is None


def test_sd_notify_status_with_a_hostile_name_is_sent_escaped(tmp_path: object) -> None:
    import socket
    from pathlib import Path

    from topowatch.sdnotify import Notifier

    path = str(Path(str(tmp_path)) / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        assert Notifier({"NOTIFY_SOCKET": path}).status("reaction 1 (link d\udce9v\x1b[31m added)")
        assert sock.recv(4096) == b"STATUS=reaction 1 (link d\\xe9v\\x1b[31m added)"


def test_ipset_digest_of_names_that_are_not_utf8() -> None:
    from topowatch.edges.iptables import IpSet
    from topowatch.edges.nftevents import ipset_digest

    a = ipset_digest(IpSet("caf\udce9", "hash:ip", 2, ("10.0.0.1", "x\udce9")))
    assert a != ipset_digest(IpSet("caf\udce9", "hash:ip", 2, ("10.0.0.1", "x\udce8")))
