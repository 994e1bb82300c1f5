"""Build the reference rtnetlink topology in a namespace and record the kernel's messages.

Run as root from the project root: ``.venv/bin/python tests/edges/record_rtnl.py``.
It writes ``tests/edges/data/rtnl_dump.bin`` (the raw dump answers, one netlink
datagram after another), ``rtnl_events.bin`` (the multicast messages a few changes
produce) and ``rtnl_ip.json`` (what ``ip -j`` said about the same namespace, the
oracle the conversion tests compare against). The netns tests build the same
topology through ``build`` and compare with the same ``expected_*`` helpers.

This script only ever touches the namespace it creates.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
from collections.abc import Iterable
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

from topowatch.core import model
from topowatch.netns import Namespace

DATA = Path(__file__).parent / "data"

# Every line is one `ip -batch` command. Interfaces are veth pairs (both ends
# here) because dummy is not available on every test kernel; ifb0 stays down
# so that its IPv6 address stays tentative and its flags are deterministic.
BUILD = """
link add up0 type veth peer name up0p
link add up1 type veth peer name up1p
link add lan0 type veth peer name lan0p
link add br0 type bridge
link add ifb0 type ifb
link set lan0p master br0
link set up0 up
link set up0p up
link set up1 up
link set up1p up
link set lan0 up
link set lan0p up
link set br0 up
address add 10.0.1.1/24 dev lan0
address add 10.0.1.2/24 dev lan0
address add 10.0.1.3/24 dev lan0
address add 192.168.5.1/24 dev lan0
address add 203.0.113.5/24 dev up0
address add 198.51.100.2/24 dev up1
address add 10.255.0.1 peer 10.255.0.2 dev up1
address add fd00:1::1/64 dev lan0 nodad
address add fd00:1::2/64 dev lan0 nodad preferred_lft 0
address add 2001:db8::5/64 dev up0 nodad
address add 2001:db8:1::5/64 dev up1 nodad
address add 2001:db8:99::1/64 dev ifb0
route add default via 203.0.113.1 dev up0 metric 100
route add default via 198.51.100.1 dev up1 metric 200
route add 10.50.0.0/16 nexthop via 203.0.113.1 dev up0 weight 1 nexthop via 198.51.100.1 dev up1 weight 3
route add 10.51.0.0/16 via 203.0.113.1 dev up0 proto static src 203.0.113.5
route add 10.71.0.0/16 tos 0x10 via 203.0.113.1 dev up0
route add default via 198.51.100.1 dev up1 table 100 proto static
route add blackhole 10.66.0.0/16 table 100
route add unreachable 10.67.0.0/16 table 100
route add prohibit 10.68.0.0/16 table 100 metric 5
route add throw 10.69.0.0/16 table 100
route add local 10.98.0.0/24 dev lo table 100
route add broadcast 10.0.1.255 dev lan0 table 100 proto kernel scope link src 10.0.1.1
route add 10.70.0.0/16 dev lan0 src 10.0.1.1 scope link table 1000
nexthop add id 10 via 203.0.113.1 dev up0
nexthop add id 11 via 198.51.100.1 dev up1
nexthop add id 12 group 10/11,3
nexthop add id 13 blackhole
route add 10.80.0.0/16 nhid 12
route add 10.81.0.0/16 nhid 10
route add 10.82.0.0/16 nhid 13
route add default via 2001:db8::1 dev up0 metric 1024
route add 2001:db8:77::/48 nexthop via fe80::1 dev up0 weight 2 nexthop via fe80::2 dev up1
route add default via 2001:db8:1::1 dev up1 table 200
route add blackhole 2001:db8:66::/48 table 200
route add unreachable 2001:db8:67::/48 table 200
route add prohibit 2001:db8:68::/48 table 200
route add throw 2001:db8:69::/48 table 200
rule add pref 100 from 10.0.1.0/24 lookup 100
rule add pref 110 to 10.60.0.0/16 lookup 1000
rule add pref 120 fwmark 0x1/0xff lookup 100
rule add pref 121 fwmark 0x2 lookup 100
rule add pref 122 fwmark 0/0xf lookup 100
rule add pref 130 iif lan0 lookup main suppress_prefixlength 0
rule add pref 140 oif up1 lookup 100
rule add pref 150 tos 0x10 lookup 100
rule add pref 160 not from 10.0.2.0/24 goto 170
rule add pref 170 nop
rule add pref 180 from 10.0.3.0/24 blackhole
rule add pref 181 from 10.0.4.0/24 unreachable
rule add pref 182 from 10.0.5.0/24 prohibit
rule add pref 190 ipproto tcp dport 80 lookup 100
rule add pref 191 sport 1000-2000 lookup 100
rule add pref 192 uidrange 1000-2000 lookup 100
rule add pref 193 lookup main suppress_ifgroup 5
rule add pref 194 from 10.0.6.0/24 to 10.0.7.0/24 iif lan0 oif up0 fwmark 0x4/0xf tos 0x08 lookup 1000
"""

# Run with `ip -6 -batch`: a batch line cannot carry the -6 option.
BUILD6 = """
rule add pref 100 from fd00:1::/64 lookup 200
rule add pref 110 to 2001:db8:77::/48 lookup 200
rule add pref 120 fwmark 0x3 lookup 200
rule add pref 130 iif lan0 oif up1 lookup 200
rule add pref 140 not to 2001:db8:5::/48 unreachable
rule add pref 150 lookup main suppress_prefixlength 0
rule add pref 160 ipproto udp lookup 200
"""


def build(ns: Namespace) -> None:
    """Give ``ns`` the reference topology (links, addresses, routes, nexthops, rules)."""
    # No DAD: link-local addresses would flip from tentative while we compare.
    ns.run("sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
    ns.run("ip", "-batch", "-", input=BUILD.strip() + "\n")
    ns.run("ip", "-6", "-batch", "-", input=BUILD6.strip() + "\n")


# --- the oracle: what `ip -j` says, in core.model words -----------------------

_PROTOCOLS = {
    "redirect": 1, "kernel": 2, "boot": 3, "static": 4, "ra": 9, "dhcp": 16,
}  # fmt: skip
_SCOPES = {"global": 0, "universe": 0, "site": 200, "link": 253, "host": 254, "nowhere": 255}
_TABLES = {"main": model.TABLE_MAIN, "local": model.TABLE_LOCAL, "default": model.TABLE_DEFAULT}
_ACTIONS = {
    "goto": model.RuleAction.GOTO,
    "nop": model.RuleAction.NOP,
    "blackhole": model.RuleAction.BLACKHOLE,
    "unreachable": model.RuleAction.UNREACHABLE,
    "prohibit": model.RuleAction.PROHIBIT,
}
_ADDR_FLAGS = {
    "secondary": model.IFA_F_SECONDARY,
    "temporary": model.IFA_F_SECONDARY,
    "nodad": model.IFA_F_NODAD,
    "optimistic": model.IFA_F_OPTIMISTIC,
    "dadfailed": model.IFA_F_DADFAILED,
    "home": model.IFA_F_HOMEADDRESS,
    "deprecated": model.IFA_F_DEPRECATED,
    "tentative": model.IFA_F_TENTATIVE,
    "permanent": model.IFA_F_PERMANENT,
}
# Bits the comparison looks at: `ip` prints others (noprefixroute, ...) by other names.
ADDR_FLAG_MASK = sum(set(_ADDR_FLAGS.values()))


def _num(value: Any, names: dict[str, int]) -> int:
    if isinstance(value, int):
        return value
    return names[value] if value in names else int(value, 0)


def _net(text: str, family: int, plen: int | None = None) -> model.IPNetwork:
    if text == "default":
        return ip_network("0.0.0.0/0" if family == model.AF_INET else "::/0")
    if plen is not None and "/" not in text:
        text = f"{text}/{plen}"
    return ip_network(text, strict=False)


def ip_json(ns: Namespace) -> dict[str, Any]:
    """What `ip -j` says about links, addresses, routes and rules in ``ns``."""

    def j(*argv: str) -> Any:
        return json.loads(ns.run("ip", "-j", *argv) or "[]")

    return {
        "link": j("-d", "link", "show"),
        "addr": j("address", "show"),
        "route4": j("-4", "route", "show", "table", "all"),
        "route6": j("-6", "route", "show", "table", "all"),
        "rule4": j("-4", "rule", "show"),
        "rule6": j("-6", "rule", "show"),
    }


def expected_links(doc: dict[str, Any]) -> list[model.Link]:
    index = {item["ifname"]: item["ifindex"] for item in doc["link"]}
    links = []
    for item in doc["link"]:
        up = "UP" in item["flags"]
        links.append(
            model.Link(
                index=item["ifindex"],
                name=item["ifname"],
                up=up,
                running=up and item.get("operstate") in ("UP", "UNKNOWN"),
                kind=item.get("linkinfo", {}).get("info_kind", ""),
                master=index.get(item.get("master", ""), 0),
            )
        )
    return links


def expected_addresses(doc: dict[str, Any]) -> dict[tuple[int, int], list[tuple[Any, ...]]]:
    """Per (ifindex, family), the addresses in `ip`'s (the kernel's) order, as comparable tuples."""
    out: dict[tuple[int, int], list[tuple[Any, ...]]] = {}
    for item in doc["addr"]:
        for a in item.get("addr_info", []):
            family = model.AF_INET if a["family"] == "inet" else model.AF_INET6
            flags = 0
            for name, bit in _ADDR_FLAGS.items():
                if a.get(name):
                    flags |= bit
            if not a.get("dynamic"):
                flags |= model.IFA_F_PERMANENT
            peer = ip_address(a["address"]) if "address" in a and a["address"] != a["local"] else None
            out.setdefault((item["ifindex"], family), []).append(
                (ip_address(a["local"]), a["prefixlen"], _SCOPES[a["scope"]], flags, peer)
            )
    return out


def address_tuples(addresses: Iterable[model.Address]) -> dict[tuple[int, int], list[tuple[Any, ...]]]:
    out: dict[tuple[int, int], list[tuple[Any, ...]]] = {}
    for a in addresses:
        flags = a.flags & ADDR_FLAG_MASK
        out.setdefault((a.ifindex, a.family), []).append((a.address, a.prefixlen, a.scope, flags, a.peer))
    return out


def route_key(r: model.Route) -> tuple[Any, ...]:
    hops = tuple(sorted((nh.oif, str(nh.gateway), nh.weight) for nh in r.nexthops))
    return (
        str(r.dst), r.table, int(r.type), hops, r.metric, str(r.prefsrc), r.scope, r.tos, r.protocol,
    )  # fmt: skip


def expected_routes(doc: dict[str, Any]) -> list[tuple[Any, ...]]:
    index = {item["ifname"]: item["ifindex"] for item in doc["link"]}
    keys = []
    for family, items in ((model.AF_INET, doc["route4"]), (model.AF_INET6, doc["route6"])):
        for item in items:
            rtype = model.RouteType[item.get("type", "unicast").upper()]
            if item.get("nexthops"):
                hops = [
                    (index[h["dev"]], h.get("gateway", "None"), h.get("weight", 1)) for h in item["nexthops"]
                ]
            elif "dev" in item and rtype not in _NO_HOP_TYPES:
                hops = [(index[item["dev"]], item.get("gateway", "None"), 1)]
            else:
                hops = []
            prefsrc = item.get("prefsrc")
            key = (
                str(_net(item["dst"], family)),
                _num(item.get("table", "main"), _TABLES),
                int(rtype),
                tuple(sorted((o, str(g), w) for o, g, w in hops)),
                item.get("metric", 0),
                str(ip_address(prefsrc)) if prefsrc else "None",
                _num(item.get("scope", "global"), _SCOPES),
                _num(item.get("tos", 0), {})
                if not isinstance(item.get("tos"), str)
                else int(item["tos"], 16),
                _num(item.get("protocol", "boot"), _PROTOCOLS),
            )
            keys.append(key)
    return keys


_NO_HOP_TYPES = {
    model.RouteType.BLACKHOLE, model.RouteType.UNREACHABLE, model.RouteType.PROHIBIT, model.RouteType.THROW,
}  # fmt: skip


_UNMODELLED_KEYS = {
    "ipproto": ("ipproto",),
    "sport": ("sport", "sport_start"),
    "dport": ("dport", "dport_start"),
    "uidrange": ("uid_start",),
    "l3mdev": ("l3mdev",),
}


def expected_rules(doc: dict[str, Any]) -> list[model.PolicyRule]:
    rules = []
    for family, items in ((model.AF_INET, doc["rule4"]), (model.AF_INET6, doc["rule6"])):
        for item in items:
            # `ip -j rule` words: "not"/"nop" are present with a null value, a goto is
            # a "goto" key, port and uid ranges split into *_start/*_end.
            if "goto" in item:
                action = model.RuleAction.GOTO
            elif "nop" in item:
                action = model.RuleAction.NOP
            else:
                action = _ACTIONS.get(item.get("action", ""), model.RuleAction.TO_TBL)
            src = item.get("src", "all")
            dst = item.get("dst", "all")
            unmodelled = tuple(
                sorted(name for name, keys in _UNMODELLED_KEYS.items() if any(key in item for key in keys))
            )
            ifgroup = item.get("suppress_ifgroup")
            fwmark = item.get("fwmark")
            fwmask = item.get("fwmask")
            rules.append(
                model.PolicyRule(
                    family=family,
                    priority=item["priority"],
                    action=action,
                    table=_num(item.get("table", "0"), _TABLES),
                    src=None if src == "all" else _net(src, family, item.get("srclen")),
                    dst=None if dst == "all" else _net(dst, family, item.get("dstlen")),
                    iifname=item.get("iif"),
                    oifname=item.get("oif"),
                    fwmark=None if fwmark is None else int(fwmark, 16),
                    fwmask=None if fwmark is None else (0xFFFFFFFF if fwmask is None else int(fwmask, 16)),
                    tos=int(item.get("tos", "0"), 16),
                    goto=item.get("goto"),
                    suppress_prefixlen=item.get("suppress_prefixlen"),
                    suppress_ifgroup=None if ifgroup is None else int(ifgroup),
                    invert="not" in item,
                    unmodelled=unmodelled,
                )
            )
    return rules


# --- recording -------------------------------------------------------------------

RTM_GETLINK, RTM_GETADDR, RTM_GETROUTE, RTM_GETRULE, RTM_GETNEXTHOP = 18, 22, 26, 34, 106


def _dump_raw(sock: socket.socket, msg_type: int, header: bytes) -> bytes:
    seq = msg_type
    flags = 0x01 | 0x300  # NLM_F_REQUEST | NLM_F_DUMP
    sock.send(struct.pack("=IHHII", 16 + len(header), msg_type, flags, seq, 0) + header)
    chunks = []
    while True:
        data = sock.recv(1 << 20)
        chunks.append(data)
        offset = 0
        done = False
        while offset + 16 <= len(data):
            length, mtype = struct.unpack_from("=IH", data, offset)
            done = done or mtype == 3
            offset += (length + 3) & ~3
        if done:
            return b"".join(chunks)


def record_dump(ns: Namespace) -> bytes:
    sock = ns.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    try:
        ifinfo = struct.pack("=BxHiII", 0, 0, 0, 0, 0)
        ifaddr = struct.pack("=BBBBI", 0, 0, 0, 0, 0)
        rt = struct.pack("=BBBBBBBBI", 0, 0, 0, 0, 0, 0, 0, 0, 0)
        nh = struct.pack("=BBBBI", 0, 0, 0, 0, 0)
        return b"".join(
            _dump_raw(sock, t, h)
            for t, h in (
                (RTM_GETLINK, ifinfo),
                (RTM_GETADDR, ifaddr),
                (RTM_GETROUTE, rt),
                (RTM_GETRULE, rt),
                (RTM_GETNEXTHOP, nh),
            )
        )
    finally:
        sock.close()


# The changes recorded as events (one `ip` command each) and the (kind, action)
# each must produce first.
EVENT_CHANGES: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("link", "add", "ev0", "type", "veth", "peer", "name", "ev0p"), "link", "new"),
    (("address", "add", "10.77.0.1/24", "dev", "lan0"), "address", "new"),
    (("address", "add", "2001:db8:77::1/64", "dev", "lan0", "nodad"), "address", "new"),
    (("route", "add", "10.78.0.0/16", "via", "10.0.1.254", "dev", "lan0", "table", "300"), "route", "new"),
    (("route", "add", "2001:db8:78::/48", "via", "fd00:1::fe", "dev", "lan0"), "route", "new"),
    (("rule", "add", "pref", "500", "from", "10.78.0.0/16", "lookup", "300"), "rule", "new"),
    (("-6", "rule", "add", "pref", "500", "from", "2001:db8:78::/48", "lookup", "300"), "rule", "new"),
    (("nexthop", "add", "id", "40", "via", "10.0.1.254", "dev", "lan0"), "nexthop", "new"),
    (("-6", "rule", "del", "pref", "500"), "rule", "del"),
    (("route", "del", "10.78.0.0/16", "table", "300"), "route", "del"),
    (("address", "del", "10.77.0.1/24", "dev", "lan0"), "address", "del"),
    (("link", "del", "ev0"), "link", "del"),
)


def record_events(ns: Namespace) -> bytes:
    """The multicast datagrams EVENT_CHANGES produce, one after another."""
    sock = ns.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    try:
        sock.bind((0, 0))
        _subscribe(sock)
        for argv, _, _ in EVENT_CHANGES:
            ns.run("ip", *argv)
        sock.setblocking(False)
        chunks = []
        while True:
            try:
                chunks.append(sock.recv(1 << 20))
            except BlockingIOError:
                return b"".join(chunks)
    finally:
        sock.close()


def _subscribe(sock: socket.socket) -> None:
    for group in (1, 5, 7, 8, 9, 11, 19, 32):
        sock.setsockopt(270, 1, group)  # SOL_NETLINK, NETLINK_ADD_MEMBERSHIP


def main() -> int:
    with Namespace.create("twrec") as ns:
        build(ns)
        DATA.mkdir(exist_ok=True)
        (DATA / "rtnl_dump.bin").write_bytes(record_dump(ns))
        (DATA / "rtnl_ip.json").write_text(json.dumps(ip_json(ns), indent=1, sort_keys=True) + "\n")
        (DATA / "rtnl_events.bin").write_bytes(record_events(ns))
    print(f"recorded into {DATA}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
