"""The differential fuzzer's generator: one seed, one gateway scenario (pure, no I/O).

A scenario is three namespaces, named by role: ``cl`` (LAN clients on two
LAN links, ``c0`` and ``c1``; one of them also holds a LAN server), ``gw``
(the gateway under test: ``lan0``, ``lan1`` and 2-4 uplinks ``up1..upN``)
and ``wan`` (the far end of every uplink, the servers and a remote sender on
its loopback). It carries:

- the commands that build it, per role (addresses, routes, ip rules, rp_filter
  sysctls, an nftables or iptables-nft ruleset: NAT, marks, reverse-path drop);
- the flows: UDP from a LAN source on a given LAN link (some with a source of
  the other LAN: asymmetric ingress), from the remote side to the gateway's
  uplink addresses (port forwards), and from the gateway itself;
- 1-3 mutations (routes, addresses, links, ip rules, rp_filter, xfrm policies,
  the ruleset, NAT loaded late), each a list of commands.

The mix is fixed by the seed, not left to chance where the issue asks for a
share: rp_filter strict, loose and off by ``seed % 3`` (equal shares over
consecutive seeds), marks and mark-based rules when ``seed % 5 == 0`` (a
fifth), and at least a fifth of the ruleset's rules match the input
interface (rules are given an ``iifname`` until that holds).

Everything random comes from one ``random.Random(seed)``: the same seed gives
the same scenario, byte for byte (``Scenario.script`` is the reproducer a
person runs). The generator knows nothing of topowatch's model; it never
predicts a binding. The runner (``difffuzz.py``) builds it, asks the kernel
and compares.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_network

RP_MODES = ("strict", "loose", "off")
DPORTS = (53, 123, 4500, 5060, 5353)
FWD_PORT = 8080  # port forwards from the remote side
LOCAL_PORT = 8081  # fib daddr type local / addrtype LOCAL port forwards

Cmd = tuple[str, tuple[str, ...], str | None]  # (role, argv, stdin)


# -- addressing ---------------------------------------------------------------------


def lan(fam: int, n: int) -> str:
    return f"10.{77 + n}.0" if fam == 4 else f"fd{77 + n}:"


def lan_gw(fam: int, n: int) -> str:
    return f"10.{77 + n}.0.1" if fam == 4 else f"fd{77 + n}::1"


def lan_net(fam: int, n: int) -> str:
    return f"10.{77 + n}.0.0/24" if fam == 4 else f"fd{77 + n}::/64"


def lan_host(fam: int, n: int, h: int) -> str:
    return f"10.{77 + n}.0.{h}" if fam == 4 else f"fd{77 + n}::{h}"


def up_gw(fam: int, n: int, h: int = 1) -> str:
    return f"100.64.{n}.{h}" if fam == 4 else f"2001:db8:{n}::{h:x}"


def up_far(fam: int, n: int) -> str:
    return f"100.64.{n}.2" if fam == 4 else f"2001:db8:{n}::2"


def via(fam: int, n: int) -> tuple[str, ...]:
    """A route's nexthop on uplink ``n`` (with its device: the nexthop check then needs no lookup)."""
    return ("via", up_far(fam, n), "dev", f"up{n}")


def up_net(fam: int, n: int) -> str:
    return f"100.64.{n}.0/24" if fam == 4 else f"2001:db8:{n}::/64"


def server(fam: int, x: int, h: int = 7) -> str:
    return f"198.18.{x}.{h}" if fam == 4 else f"2001:db8:f{x}::{h}"


def server_net(fam: int, x: int) -> str:
    return f"198.18.{x}.0/24" if fam == 4 else f"2001:db8:f{x}::/64"


def remote(fam: int) -> str:
    return "192.0.2.50" if fam == 4 else "2001:db8:ee::50"


def plen(fam: int) -> int:
    return 24 if fam == 4 else 64


SERVERS = 4
# LAN sources: (host, LAN link it sends on, LAN its address belongs to). Host 9 of LAN 0 sends
# on LAN 1: asymmetric ingress (strict rp_filter drops it; loose and off let it through).
SOURCES = ((2, 0, 0), (3, 0, 0), (4, 0, 0), (2, 1, 1), (9, 1, 0))
LAN_SERVER = 5  # on LAN 0: the port forwards' target


# -- the ruleset's intermediate form ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule of a chain: matches (all must hold) and one action.

    ``family`` 4 or 6 restricts it to that family (0: both; nftables inet
    only). Matches: ("iif", name), ("oif", name), ("saddr", net), ("daddr",
    net), ("not_saddr", net), ("dport", port), ("mark", value),
    ("daddr_set", name), ("fib_local",), ("ipsec_none",). Actions: see
    ``ACTIONS``.
    """

    family: int
    matches: tuple[tuple[str, ...], ...]
    action: tuple[str, ...]

    @property
    def iif(self) -> bool:
        return any(m[0] == "iif" for m in self.matches)


NAT_ACTIONS = frozenset(
    {
        "masquerade",
        "snat",
        "snat_range",
        "snat_ports",
        "dnat",
        "dnat_range",
        "redirect",
        "snat_map",
        "numgen",
        "jhash",
        "netmap",
        "dnat_map",
        "vmap_oif",
    }
)
ACTIONS = NAT_ACTIONS | {"accept", "return", "drop", "jump", "goto", "mark", "ct_save", "ct_restore"}
NFT_ONLY = frozenset({"snat_map", "numgen", "vmap_oif", "jhash", "dnat_map", "concat"})


@dataclass(frozen=True, slots=True)
class Ruleset:
    """Chains by name: ``pre``, ``out``, ``post`` (NAT base chains), ``sub`` (a regular chain),
    ``mpre``, ``mout`` (mark chains: filter at prerouting, route at output), ``rpf`` (reverse-path)."""

    backend: str  # "nft" or "iptables"
    chains: tuple[tuple[str, tuple[Rule, ...]], ...]
    sets: tuple[tuple[str, int, tuple[str, ...]], ...] = ()  # (name, family, elements)

    def chain(self, name: str) -> tuple[Rule, ...]:
        return dict(self.chains).get(name, ())

    def rules(self) -> list[Rule]:
        return [r for _, rules in self.chains for r in rules]

    def nat_families(self) -> set[int]:
        fams: set[int] = set()
        for name in ("pre", "out", "post", "sub"):
            for r in self.chain(name):
                fams |= {4, 6} if r.family == 0 else {r.family}
        return fams


@dataclass(frozen=True, slots=True)
class Flow:
    """One UDP flow: ``sender`` role, its source (None: the kernel picks), the LAN link (``dev``)."""

    name: str
    family: int
    sender: str  # "cl", "wan" or "gw"
    src: str | None
    dev: str | None
    dst: str
    dport: int


@dataclass(frozen=True, slots=True)
class Mutation:
    kind: str
    commands: tuple[Cmd, ...]


@dataclass(frozen=True, slots=True)
class Scenario:
    seed: int
    rp_mode: str
    marks: bool
    backend: str
    uplinks: int
    setup: tuple[Cmd, ...]
    ruleset: Ruleset | None  # None: NAT is loaded late (a mutation)
    final_ruleset: Ruleset | None
    mutations: tuple[Mutation, ...]
    flows: tuple[Flow, ...]
    xfrm: tuple[tuple[str, str], ...] = ()  # (src net, dst net) of out policies added (no SA)
    features: frozenset[str] = field(default_factory=frozenset)

    @property
    def multi(self) -> bool:
        """Whether a flow may have several right answers (ranges, numgen, multipath)."""
        return bool(self.features & {"snat_range", "dnat_range", "numgen", "jhash", "multipath"})

    def script(self) -> str:
        """A shell reproducer: namespaces $CL $GW $WAN must exist (names are the runner's)."""
        lines = [
            f"# topowatch difffuzz seed {self.seed}: rp_filter {self.rp_mode}, marks {self.marks}, "
            f"{self.backend}, {self.uplinks} uplinks",
            "CL=${CL:-h8cl}; GW=${GW:-h8gw}; WAN=${WAN:-h8wan}",
            "for n in $CL $GW $WAN; do ip netns add $n; ip -n $n link set lo up; done",
        ]
        lines += [_shell(c) for c in self.setup]
        lines.append("# flows (UDP, one datagram each; the old ones before the mutations):")
        lines += [
            f"#   {f.name}: {f.sender} {f.src or '(auto)'} dev {f.dev or '-'} -> {f.dst}:{f.dport}"
            for f in self.flows
        ]
        for m in self.mutations:
            lines.append(f"# mutation: {m.kind}")
            lines += [_shell(c) for c in m.commands]
        lines.append("ip netns exec $GW topowatch plan --json")
        return "\n".join(lines) + "\n"


_NS = {"cl": "$CL", "gw": "$GW", "wan": "$WAN"}


def _shell(cmd: Cmd) -> str:
    """One command as a shell line (``ip -n`` where it can: no mount namespace per command)."""
    role, argv, stdin = cmd
    if role == "host" and argv[0] == "veth":
        a, an, b, bn = _NS[argv[1]], argv[2], _NS[argv[3]], argv[4]
        return (
            f"ip link add {an} netns {a} type veth peer name {bn} netns {b}"
            f" && ip -n {a} link set {an} up && ip -n {b} link set {bn} up"
        )
    if argv[0] == "ip":
        line = f"ip -n {_NS[role]} " + " ".join(_quote(a) for a in argv[1:])
    else:
        line = f"ip netns exec {_NS[role]} " + " ".join(_quote(a) for a in argv)
    if stdin is not None:
        return f"{line} <<'EOF'\n{stdin.rstrip()}\nEOF"
    return line


def _quote(arg: str) -> str:
    if arg and all(c.isalnum() or c in "-_./:=,@+" for c in arg):
        return arg
    return "'" + arg.replace("'", "'\\''") + "'"


# -- rendering -------------------------------------------------------------------------------

_FAM_WORD = {4: "ip", 6: "ip6"}


def _nft_match(m: tuple[str, ...], fam: int) -> str:
    kind = m[0]
    if kind == "iif":
        return f'iifname "{m[1]}"'
    if kind == "oif":
        return f'oifname "{m[1]}"'
    if kind in ("saddr", "daddr"):
        return f"{_FAM_WORD[fam]} {kind} {m[1]}"
    if kind == "not_saddr":
        return f"{_FAM_WORD[fam]} saddr != {m[1]}"
    if kind == "dport":
        return f"udp dport {m[1]}"
    if kind == "mark":
        return f"meta mark {m[1]}"
    if kind == "daddr_set":
        return f"{_FAM_WORD[fam]} daddr @{m[1]}"
    if kind == "fib_local":
        return "fib daddr type local"
    if kind == "ipsec_none":
        return "rt ipsec missing"
    if kind == "rpf_missing":
        return "fib saddr . iif oif missing"
    if kind == "concat":
        return f"{_FAM_WORD[fam]} saddr . udp dport {{ {m[1]} }}"
    if kind == "ct_new":
        return "ct state new"
    if kind == "ct_dnat":
        return "ct status dnat"
    if kind == "ct_mark":
        return f"ct mark {m[1]}"
    if kind == "multiport":
        return f"udp dport {{ {m[1]} }}"
    if kind == "iprange":
        return f"{_FAM_WORD[fam]} saddr {m[1]}"
    raise ValueError(kind)


def _nft_action(a: tuple[str, ...], fam: int) -> str:
    kind = a[0]
    fw = _FAM_WORD.get(fam, "")
    if kind == "masquerade":
        return "masquerade"
    if kind in ("snat", "snat_range"):
        return f"snat {fw} to {a[1]}"
    if kind == "snat_ports":
        addr = f"[{a[1]}]" if fam == 6 else a[1]
        return f"snat {fw} to {addr}:{a[2]}"
    if kind in ("dnat", "dnat_range"):
        if len(a) > 2:
            addr = f"[{a[1]}]" if fam == 6 else a[1]
            return f"dnat {fw} to {addr}:{a[2]}"
        return f"dnat {fw} to {a[1]}"
    if kind == "redirect":
        return f"redirect to :{a[1]}"
    if kind == "snat_map":
        pairs = ", ".join(f"{k} : {v}" for k, v in zip(a[1::2], a[2::2], strict=True))
        return f"snat {fw} to {fw} saddr map {{ {pairs} }}"
    if kind == "numgen":
        pairs = ", ".join(f"{i} : {v}" for i, v in enumerate(a[1:]))
        return f"snat {fw} to numgen inc mod {len(a) - 1} map {{ {pairs} }}"
    if kind == "vmap_oif":
        pairs = ", ".join(f'"{k}" : {v}' for k, v in zip(a[1::2], a[2::2], strict=True))
        return f"oifname vmap {{ {pairs} }}"
    if kind in ("accept", "return", "drop"):
        return kind
    if kind == "jump":
        return f"jump h8{a[1]}"
    if kind == "goto":
        return f"goto h8{a[1]}"
    if kind == "netmap":
        return f"snat {fw} prefix to {fw} saddr map {{ {a[1]} : {a[2]} }}"
    if kind == "jhash":
        pairs = ", ".join(f"{i} : {v}" for i, v in enumerate(a[1:]))
        return f"snat {fw} to jhash {fw} saddr . udp sport mod {len(a) - 1} map {{ {pairs} }}"
    if kind == "dnat_map":
        pairs = ", ".join(f"{k} : {v}" for k, v in zip(a[1::2], a[2::2], strict=True))
        return f"dnat {fw} to udp dport map {{ {pairs} }}"
    if kind == "mark":
        return f"meta mark set {a[1]}"
    if kind == "ct_save":
        return "ct mark set meta mark"
    if kind == "ct_restore":
        return "meta mark set ct mark"
    raise ValueError(kind)


def _nft_rule(r: Rule) -> str:
    fam = r.family
    parts = [_nft_match(m, fam) for m in r.matches]
    if fam and not any(
        m[0] in ("saddr", "daddr", "not_saddr", "daddr_set", "concat", "iprange") for m in r.matches
    ):
        parts.insert(0, f"meta nfproto ipv{fam}")
    if _needs_proto(r):
        parts.append("meta l4proto udp")  # a port in a NAT statement needs a transport protocol
    parts.append(_nft_action(r.action, fam))
    return " ".join(parts)


def _needs_proto(r: Rule) -> bool:
    a = r.action
    ports = a[0] in ("snat_ports", "redirect", "jhash", "dnat_map") or (
        a[0] in ("dnat", "dnat_range") and len(a) > 2
    )
    return ports and not any(m[0] in ("dport", "multiport", "concat") for m in r.matches)


_NFT_CHAINS = {
    "pre": "type nat hook prerouting priority dstnat; policy accept;",
    "out": "type nat hook output priority -100; policy accept;",
    "post": "type nat hook postrouting priority srcnat; policy accept;",
    "sub": "",
}
_NFT_AUX = {
    "mpre": ("h8mark", "type filter hook prerouting priority mangle; policy accept;"),
    "mout": ("h8mark", "type route hook output priority mangle; policy accept;"),
    "rpf": ("h8rpf", "type filter hook prerouting priority raw; policy accept;"),
}


def render_nft(rs: Ruleset) -> str:
    """The whole ruleset as one ``nft -f`` script that replaces the fuzzer's tables atomically."""
    out = []
    for table in ("h8nat", "h8mark", "h8rpf"):
        out.append(f"table inet {table} {{}}\ndelete table inet {table}")
    nat = ["table inet h8nat {"]
    for name, fam, elems in rs.sets:
        kind = "ipv4_addr" if fam == 4 else "ipv6_addr"
        nat.append(f"    set {name} {{ type {kind}; flags interval; elements = {{ {', '.join(elems)} }} }}")
    for name in ("pre", "out", "post", "sub"):
        rules = rs.chain(name)
        if (
            name == "sub"
            and not rules
            and not any(r.action[0] in ("jump", "goto", "vmap_oif") for r in rs.rules())
        ):
            continue
        nat.append(f"    chain h8{name} {{")  # h8: plain "out" or "fwd" are nft keywords
        if _NFT_CHAINS[name]:
            nat.append(f"        {_NFT_CHAINS[name]}")
        nat += [f"        {_nft_rule(r)}" for r in rules]
        nat.append("    }")
    nat.append("}")
    out.append("\n".join(nat))
    aux: dict[str, list[str]] = {}
    for name, (table, spec) in _NFT_AUX.items():
        rules = rs.chain(name)
        if rules:
            body = [f"    chain h8{name} {{", f"        {spec}"] + [f"        {_nft_rule(r)}" for r in rules]
            aux.setdefault(table, []).extend([*body, "    }"])
    for table, body in aux.items():
        out.append("\n".join([f"table inet {table} {{", *body, "}"]))
    return "\n".join(out) + "\n"


def _ipt_match(m: tuple[str, ...], sets: dict[str, tuple[str, ...]]) -> list[str]:
    kind = m[0]
    if kind == "iif":
        return ["-i", m[1]]
    if kind == "oif":
        return ["-o", m[1]]
    if kind == "saddr":
        return ["-s", m[1]]
    if kind == "daddr":
        return ["-d", m[1]]
    if kind == "not_saddr":
        return ["!", "-s", m[1]]
    if kind == "dport":
        return ["-p", "udp", "-m", "udp", "--dport", m[1]]
    if kind == "mark":
        return ["-m", "mark", "--mark", m[1]]
    if kind == "fib_local":
        return ["-m", "addrtype", "--dst-type", "LOCAL"]
    if kind == "ipsec_none":
        return ["-m", "policy", "--dir", "out", "--pol", "none"]
    if kind == "rpf_missing":
        return ["-m", "rpfilter", "--invert"]
    if kind == "daddr_set":
        return ["-m", "set", "--match-set", f"h8{m[1]}", "dst"]
    if kind == "ct_new":
        return ["-m", "conntrack", "--ctstate", "NEW"]
    if kind == "ct_dnat":
        return ["-m", "conntrack", "--ctstate", "DNAT"]
    if kind == "ct_mark":
        return ["-m", "connmark", "--mark", m[1]]
    if kind == "multiport":
        return ["-p", "udp", "-m", "multiport", "--dports", m[1].replace(" ", "")]
    if kind == "iprange":
        return ["-m", "iprange", "--src-range", m[1]]
    raise ValueError(kind)


def _ipt_action(a: tuple[str, ...], fam: int) -> list[str]:
    kind = a[0]
    if kind == "masquerade":
        return ["-j", "MASQUERADE"]
    if kind in ("snat", "snat_range"):
        return ["-j", "SNAT", "--to-source", a[1]]
    if kind == "snat_ports":
        addr = f"[{a[1]}]" if fam == 6 else a[1]
        return ["-j", "SNAT", "--to-source", f"{addr}:{a[2]}"]
    if kind in ("dnat", "dnat_range"):
        if len(a) > 2:
            addr = f"[{a[1]}]" if fam == 6 else a[1]
            return ["-j", "DNAT", "--to-destination", f"{addr}:{a[2]}"]
        return ["-j", "DNAT", "--to-destination", a[1]]
    if kind == "redirect":
        return ["-p", "udp", "-j", "REDIRECT", "--to-ports", a[1]]
    if kind == "accept":
        return ["-j", "ACCEPT"]
    if kind == "return":
        return ["-j", "RETURN"]
    if kind == "drop":
        return ["-j", "DROP"]
    if kind == "jump":
        return ["-j", "H8SUB"]
    if kind == "goto":
        return ["-g", "H8SUB"]
    if kind == "netmap":
        return ["-j", "NETMAP", "--to", a[2]]
    if kind == "mark":
        return ["-j", "MARK", "--set-mark", a[1]]
    if kind == "ct_save":
        return ["-j", "CONNMARK", "--save-mark"]
    if kind == "ct_restore":
        return ["-j", "CONNMARK", "--restore-mark"]
    raise ValueError(kind)


_IPT_CHAINS = {"pre": "PREROUTING", "out": "OUTPUT", "post": "POSTROUTING", "sub": "H8SUB"}


def render_iptables(rs: Ruleset, fam: int) -> str:
    """``iptables-nft-restore`` input (``ip6tables-nft-restore`` for 6): nat, mangle and raw tables."""
    sets = {name: elems for name, _, elems in rs.sets}
    out = [
        "*nat",
        ":PREROUTING ACCEPT [0:0]",
        ":INPUT ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]",
        ":H8SUB - [0:0]",
    ]

    def lines(chain: str, rules: tuple[Rule, ...]) -> list[str]:
        res = []
        for r in rules:
            if r.family not in (0, fam):
                continue
            argv = ["-A", chain]
            for m in r.matches:
                words = _ipt_match(m, sets)
                if words[:2] == ["-p", "udp"] and "-p" in argv:
                    words = words[2:]
                argv += words
            if _needs_proto(r):
                argv += ["-p", "udp"]
            action = _ipt_action(r.action, fam)
            argv += action[2:] if action[:2] == ["-p", "udp"] else action
            res.append(" ".join(argv))
        return res

    for name, chain in _IPT_CHAINS.items():
        out += lines(chain, rs.chain(name))
    out.append("COMMIT")
    out += ["*mangle", ":PREROUTING ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    out += lines("PREROUTING", rs.chain("mpre")) + lines("OUTPUT", rs.chain("mout"))
    out.append("COMMIT")
    out += ["*raw", ":PREROUTING ACCEPT [0:0]"]
    out += lines("PREROUTING", rs.chain("rpf"))
    out.append("COMMIT")
    return "\n".join(out) + "\n"


def load_commands(rs: Ruleset) -> tuple[Cmd, ...]:
    """The commands that make ``rs`` the gateway's NAT, mark and reverse-path ruleset."""
    if rs.backend == "nft":
        return (("gw", ("nft", "-f", "-"), render_nft(rs)),)
    cmds: list[Cmd] = []
    for name, fam, elems in rs.sets:  # -m set names an ipset; it must exist before the rule
        cmds.append(
            (
                "gw",
                (
                    "ipset",
                    "create",
                    "-exist",
                    f"h8{name}",
                    "hash:net",
                    "family",
                    "inet" if fam == 4 else "inet6",
                ),
                None,
            )
        )
        cmds += [("gw", ("ipset", "add", "-exist", f"h8{name}", e), None) for e in elems]
    return (
        *cmds,
        ("gw", ("iptables-nft-restore",), render_iptables(rs, 4)),
        ("gw", ("ip6tables-nft-restore",), render_iptables(rs, 6)),
    )


# -- generation ------------------------------------------------------------------------------


class _Gen:
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.rp_mode = RP_MODES[seed % 3]
        self.marks = seed % 5 == 0
        self.backend = "nft" if self.rng.random() < 0.6 else "iptables"
        self.uplinks = self.rng.randint(2, 4)
        self.features: set[str] = set()

    def up(self) -> int:
        return self.rng.randint(1, self.uplinks)

    def other_up(self, n: int) -> int:
        return self.rng.choice([u for u in range(1, self.uplinks + 1) if u != n])

    def fam(self) -> int:
        return self.rng.choice((4, 4, 6)) if self.backend == "iptables" else self.rng.choice((0, 4, 4, 6))

    # rules ----------------------------------------------------------------------------

    def snat_action(self, fam: int, n: int) -> tuple[str, ...]:
        f = fam or 4
        choices = ["masquerade", "snat", "snat", "snat_range", "snat_ports"]
        if fam:
            choices.append("netmap")
        if self.backend == "nft" and fam:
            choices += ["snat_map", "numgen", "jhash"]
        kind = self.rng.choice(choices) if fam else "masquerade"
        self.features.add(kind)
        if kind == "masquerade":
            return ("masquerade",)
        if kind == "snat":
            return ("snat", up_gw(f, n, self.rng.choice((1, 99))))
        if kind == "snat_range":
            return ("snat_range", f"{up_gw(f, n, 100)}-{up_gw(f, n, 103)}")
        if kind == "snat_ports":
            return ("snat_ports", up_gw(f, n, 99), "2000-2099")
        if kind == "snat_map":
            return ("snat_map", lan_net(f, 0), up_gw(f, n, 60), lan_net(f, 1), up_gw(f, self.other_up(n), 61))
        if kind == "netmap":
            return ("netmap", lan_net(f, 0), up_net(f, n))
        if kind == "jhash":
            return ("jhash", up_gw(f, n, 80), up_gw(f, self.other_up(n), 81))
        return ("numgen", up_gw(f, n, 70), up_gw(f, self.other_up(n), 71))

    def post_rule(self) -> Rule:
        fam = self.fam()
        n = self.up()
        f = fam or 4
        matches: list[tuple[str, ...]] = []
        r = self.rng.random()
        if r < 0.75:
            matches.append(("oif", f"up{n}"))
        elif r < 0.85 and fam:
            matches.append(("daddr", server_net(f, self.rng.randrange(SERVERS))))
        if fam and self.rng.random() < 0.2:
            matches.append(("saddr", lan_net(f, self.rng.randint(0, 1))))
        if (
            fam
            and self.rng.random() < 0.1
            and not (self.backend == "iptables" and matches[-1:] and matches[-1][0] == "saddr")
        ):
            matches.append(("not_saddr", f"{lan_host(f, 0, 2)}/{32 if f == 4 else 128}"))
        if self.rng.random() < 0.15:
            matches.append(("dport", str(self.rng.choice(DPORTS))))
        if fam and self.rng.random() < 0.1:
            matches.append(("daddr_set", f"srv{f}"))
            self.features.add("set")
        extra = self.rng.random()
        if extra < 0.05 and fam and self.backend == "nft":
            self.features.add("concat")
            pairs = ", ".join(f"{lan_host(f, 0, h)} . {p}" for h, p in ((2, 53), (3, 5060), (9, 4500)))
            matches.append(("concat", pairs))
        elif extra < 0.1:
            self.features.add("ct_state")
            matches.append(("ct_new",))
        elif extra < 0.14:
            self.features.add("ct_status")
            matches.append(("ct_dnat",))
        elif extra < 0.2:
            self.features.add("multiport")
            matches.append(("multiport", "53, 5060"))
        elif extra < 0.25 and fam:
            self.features.add("iprange")
            matches.append(("iprange", f"{lan_host(f, 0, 2)}-{lan_host(f, 0, 3)}"))
        if self.marks and self.rng.random() < 0.15:
            self.features.add("ct_mark_match")
            matches.append(("ct_mark", "0x1"))
        if self.rng.random() < 0.1:
            self.features.add("ipsec_none")
            matches.append(("ipsec_none",))
        a = self.rng.random()
        if a < 0.08:
            return Rule(fam, tuple(matches), ("accept",))
        if a < 0.14:
            self.features.add("jump")
            return Rule(fam, tuple(matches), ("jump", "sub"))
        if a < 0.16:
            self.features.add("goto")
            return Rule(fam, tuple(matches), ("goto", "sub"))
        if a < 0.2 and self.backend == "nft":
            self.features.add("vmap")
            m = self.other_up(n)
            return Rule(
                fam,
                tuple(x for x in matches if x[0] != "oif"),
                ("vmap_oif", f"up{n}", "jump h8sub", f"up{m}", "accept"),
            )
        return Rule(fam, tuple(matches), self.snat_action(fam, n))

    def pre_rule(self) -> Rule:
        fam = self.rng.choice((4, 4, 6))
        kinds = ["fwd", "fwd", "rewrite", "redirect", "local", "range"]
        if self.backend == "nft":
            kinds.append("dnat_map")
        kind = self.rng.choice(kinds)
        n = self.up()
        if kind == "fwd":
            self.features.add("dnat_ports")
            port = self.rng.choice(("80", "8000-8003"))
            if "-" in port:
                self.features.add("dnat_range")
            return Rule(
                fam,
                (("iif", f"up{n}"), ("dport", str(FWD_PORT))),
                ("dnat", lan_host(fam, 0, LAN_SERVER), port),
            )
        if kind == "local":
            self.features.add("fib_local")
            return Rule(
                fam,
                (("fib_local",), ("dport", str(LOCAL_PORT))),
                ("dnat", lan_host(fam, 0, LAN_SERVER), "81"),
            )
        if kind == "redirect":
            self.features.add("redirect")
            m: tuple[tuple[str, ...], ...] = (("dport", "5353"),)
            if self.rng.random() < 0.6:
                m = (("iif", f"lan{self.rng.randint(0, 1)}"), *m)
            return Rule(fam, m, ("redirect", "53"))
        x, y = self.rng.sample(range(SERVERS), 2)
        m = (("daddr", f"{server(fam, x)}/{32 if fam == 4 else 128}"), ("dport", "5060"))
        if self.rng.random() < 0.5:
            m = (("iif", f"lan{self.rng.randint(0, 1)}"), *m)
        if kind == "dnat_map":
            self.features.add("dnat_map")
            return Rule(
                fam,
                (("iif", f"lan{self.rng.randint(0, 1)}"), ("daddr", server_net(fam, x))),
                ("dnat_map", "5060", server(fam, y), "53", server(fam, (y + 1) % SERVERS)),
            )
        if kind == "range":
            self.features.add("dnat_range")
            return Rule(fam, m, ("dnat_range", f"{server(fam, y, 7)}-{server(fam, y, 9)}"))
        self.features.add("dnat")
        return Rule(fam, m, ("dnat", server(fam, y)))

    def out_rule(self) -> Rule:
        fam = self.rng.choice((4, 6))
        y = self.rng.randrange(SERVERS)
        self.features.add("output_dnat")
        return Rule(fam, (("dport", "123"),), ("dnat", server(fam, y)))

    def mark_rules(self) -> tuple[tuple[Rule, ...], tuple[Rule, ...]]:
        self.features.add("marks")
        pre: list[Rule] = []
        if self.rng.random() < 0.5:
            self.features.add("ct_restore")
            pre.append(Rule(0, (), ("ct_restore",)))
        pre.append(Rule(0, (("iif", f"lan{self.rng.randint(0, 1)}"),), ("mark", "0x1")))
        if self.rng.random() < 0.6:
            pre.append(Rule(4, (("saddr", f"{lan_host(4, 0, 3)}/32"),), ("mark", "0x2")))
        if self.rng.random() < 0.5:
            pre.append(Rule(0, (("dport", "5060"),), ("mark", "0x1")))
        if self.rng.random() < 0.5:
            self.features.add("ct_save")
            pre.append(Rule(0, (), ("ct_save",)))
        out = (Rule(0, (("dport", "123"),), ("mark", "0x1")),) if self.rng.random() < 0.5 else ()
        return tuple(pre), out

    def ruleset(self) -> Ruleset:
        post = [self.post_rule() for _ in range(self.rng.randint(2, 5))]
        pre = [self.pre_rule() for _ in range(self.rng.randint(0, 3))]
        out = [self.out_rule()] if self.rng.random() < 0.3 else []
        sub: list[Rule] = []
        if any(r.action[0] in ("jump", "goto", "vmap_oif") for r in post):
            sub = [self.post_rule() for _ in range(self.rng.randint(1, 2))]
            sub = [r for r in sub if r.action[0] not in ("jump", "goto", "vmap_oif")]
            sub.insert(self.rng.randint(0, len(sub)), Rule(0, (("dport", "53"),), ("return",)))
        mpre: tuple[Rule, ...] = ()
        mout: tuple[Rule, ...] = ()
        if self.marks:
            mpre, mout = self.mark_rules()
            fam = self.rng.choice((4, 0)) if self.backend == "nft" else 4
            post.insert(0, Rule(fam, (("mark", "0x2"),), self.snat_action(fam, self.up())))
        rpf: tuple[Rule, ...] = ()
        if self.rng.random() < 0.15:
            self.features.add("nf_rpfilter")
            rpf = (Rule(0, (("rpf_missing",),), ("drop",)),)
        self.ensure_iif_share(pre, post)
        chains = (
            ("pre", tuple(pre)),
            ("out", tuple(out)),
            ("post", tuple(post)),
            ("sub", tuple(sub)),
            ("mpre", mpre),
            ("mout", mout),
            ("rpf", rpf),
        )
        sets = ()
        if "set" in self.features:
            sets = (
                ("srv4", 4, (server_net(4, 1), server(4, 2))),
                ("srv6", 6, (server_net(6, 1), server(6, 2))),
            )
        return Ruleset(self.backend, chains, sets)

    def ensure_iif_share(self, pre: list[Rule], post: list[Rule]) -> None:
        """At least a fifth of the NAT rules match the input interface (those at output cannot)."""

        def total() -> tuple[int, int]:
            rules = pre + post
            return sum(r.iif for r in rules), len(rules)

        # iptables refuses -i at POSTROUTING: there the prerouting rules carry it.
        lists = (pre, post) if self.backend == "nft" else (pre,)
        while True:
            iif, n = total()
            if iif * 5 >= n:
                return
            candidates = [(lst, i) for lst in lists for i, r in enumerate(lst) if not r.iif]
            if not candidates:
                pre.append(self.pre_rule())
                continue
            lst, i = self.rng.choice(candidates)
            r = lst[i]
            link = self.rng.choice(("lan0", "lan1", f"up{self.up()}"))
            if lst is pre and any(m[0] == "fib_local" for m in r.matches):
                link = f"up{self.up()}"
            lst[i] = Rule(r.family, (("iif", link), *r.matches), r.action)

    # topology ---------------------------------------------------------------------------

    def setup(self) -> list[Cmd]:
        cmds: list[Cmd] = []
        dad = ("net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
        for role in ("cl", "wan"):
            cmds.append((role, ("sysctl", "-qw", *dad), None))
        cmds.append(
            (
                "gw",
                (
                    "sysctl",
                    "-qw",
                    *dad,
                    "net.ipv4.ip_forward=1",
                    "net.ipv6.conf.all.forwarding=1",
                    "net.ipv4.conf.all.promote_secondaries=1",
                    "net.ipv4.conf.default.promote_secondaries=1",
                ),
                None,
            )
        )
        for n in (0, 1):
            cmds.append(("host", ("veth", "cl", f"c{n}", "gw", f"lan{n}"), None))
        for n in range(1, self.uplinks + 1):
            cmds.append(("host", ("veth", "gw", f"up{n}", "wan", f"isp{n}"), None))
        for fam in (4, 6):
            for n in (0, 1):
                cmds.append(
                    ("gw", ("ip", "addr", "add", f"{lan_gw(fam, n)}/{plen(fam)}", "dev", f"lan{n}"), None)
                )
            for host, dev, net in SOURCES:
                p = plen(fam) if dev == net else (32 if fam == 4 else 128)
                cmds.append(
                    ("cl", ("ip", "addr", "add", f"{lan_host(fam, net, host)}/{p}", "dev", f"c{dev}"), None)
                )
            cmds.append(
                (
                    "cl",
                    ("ip", "addr", "add", f"{lan_host(fam, 0, LAN_SERVER)}/{plen(fam)}", "dev", "c0"),
                    None,
                )
            )
            for n in (0, 1):
                cmds.append(
                    (
                        "cl",
                        (
                            "ip",
                            f"-{fam}",
                            "route",
                            "add",
                            "default",
                            "via",
                            lan_gw(fam, n),
                            "dev",
                            f"c{n}",
                            "metric",
                            str(10 * n + 1),
                        ),
                        None,
                    )
                )
            for n in range(1, self.uplinks + 1):
                cmds.append(
                    ("gw", ("ip", "addr", "add", f"{up_gw(fam, n)}/{plen(fam)}", "dev", f"up{n}"), None)
                )
                cmds.append(
                    ("wan", ("ip", "addr", "add", f"{up_far(fam, n)}/{plen(fam)}", "dev", f"isp{n}"), None)
                )
            for x in range(SERVERS):
                cmds.append(
                    (
                        "wan",
                        ("ip", "addr", "add", f"{server(fam, x)}/{32 if fam == 4 else 128}", "dev", "lo"),
                        None,
                    )
                )
            cmds.append(
                ("wan", ("ip", "addr", "add", f"{remote(fam)}/{32 if fam == 4 else 128}", "dev", "lo"), None)
            )
        # Servers and clients answer nothing: every entry stays UNREPLIED (no ICMP errors either).
        sink = (
            "table inet h8sink {\n chain in {\n  type filter hook input priority 0; policy accept;\n"
            "  meta l4proto udp drop\n }\n}\n"
        )
        cmds.append(("wan", ("nft", "-f", "-"), sink))
        cmds.append(("cl", ("nft", "-f", "-"), sink))
        cmds += self.rp_filter()
        cmds += self.routes()
        return cmds

    def rp_filter(self) -> list[Cmd]:
        value = {"strict": 1, "loose": 2, "off": 0}[self.rp_mode]
        links = ["lan0", "lan1", *(f"up{n}" for n in range(1, self.uplinks + 1))]
        # Strict mode is the max of conf.all and the link's own value: set it one way or the other.
        per_link = self.rp_mode == "strict" and self.rng.random() < 0.5
        keys = [
            f"net.ipv4.conf.all.rp_filter={0 if per_link else value}",
            f"net.ipv4.conf.default.rp_filter={value}",
        ]
        keys += [f"net.ipv4.conf.{link}.rp_filter={value}" for link in links]
        return [("gw", ("sysctl", "-qw", *keys), None)]

    def routes(self) -> list[Cmd]:
        cmds: list[Cmd] = []
        self.default_up = self.up()
        for fam in (4, 6):
            cmds.append(
                ("gw", ("ip", f"-{fam}", "route", "add", "default", *via(fam, self.default_up)), None)
            )
            for x in range(SERVERS):
                r = self.rng.random()
                if r < 0.35:
                    cmds.append(
                        (
                            "gw",
                            ("ip", f"-{fam}", "route", "add", server_net(fam, x), *via(fam, self.up())),
                            None,
                        )
                    )
                elif r < 0.47:
                    self.features.add("multipath")
                    a = self.up()
                    b = self.other_up(a)
                    cmds.append(
                        (
                            "gw",
                            (
                                "ip",
                                f"-{fam}",
                                "route",
                                "add",
                                server_net(fam, x),
                                "nexthop",
                                *via(fam, a),
                                "nexthop",
                                *via(fam, b),
                            ),
                            None,
                        )
                    )
                elif r < 0.5:
                    self.features.add("unreachable")
                    cmds.append(
                        ("gw", ("ip", f"-{fam}", "route", "add", "unreachable", server_net(fam, x)), None)
                    )
            # Replies to port forwards' remote sender and its reverse path.
            cmds.append(
                (
                    "gw",
                    (
                        "ip",
                        f"-{fam}",
                        "route",
                        "add",
                        f"{remote(fam)}/{32 if fam == 4 else 128}",
                        *via(fam, self.up()),
                    ),
                    None,
                )
            )
        # Tables before rules: IPv6 checks a new route's gateway through the rules, and a rule to a
        # table whose default is a gateway route makes the gateway "unreachable" (EHOSTUNREACH).
        if self.marks:
            cmds += self.mark_routing()
        if self.rng.random() < 0.4:
            cmds += self.ip_rules()
        return cmds

    def ip_rules(self) -> list[Cmd]:
        self.features.add("ip_rule")
        cmds: list[Cmd] = []
        for fam in (4, 6):
            t = self.other_up(self.default_up)
            cmds.append(
                ("gw", ("ip", f"-{fam}", "route", "add", "default", *via(fam, t), "table", "100"), None)
            )
            kind = self.rng.choice(("from", "iif", "not_from", "to"))
            sel: tuple[str, ...]
            if kind == "from":
                sel = ("from", lan_host(fam, 0, 3))
            elif kind == "iif":
                self.features.add("rule_iif")
                sel = ("iif", f"lan{self.rng.randint(0, 1)}")
            elif kind == "not_from":
                sel = ("not", "from", lan_host(fam, 0, 2))
            else:
                sel = ("to", server_net(fam, self.rng.randrange(SERVERS)))
            cmds.append(("gw", ("ip", f"-{fam}", "rule", "add", *sel, "lookup", "100", "pref", "1000"), None))
        return cmds

    def mark_routing(self) -> list[Cmd]:
        cmds: list[Cmd] = []
        for fam in (4, 6):
            t = self.other_up(self.default_up)
            cmds.append(
                ("gw", ("ip", f"-{fam}", "route", "add", "default", *via(fam, t), "table", "101"), None)
            )
            cmds.append(
                (
                    "gw",
                    ("ip", f"-{fam}", "rule", "add", "fwmark", "0x1", "lookup", "101", "pref", "900"),
                    None,
                )
            )
        return cmds

    def mixed(self) -> list[Cmd]:
        """An iptables-nft nat rule next to an nft table at the same priority (srcnat, 100): the kernel
        runs chains of equal priority in registration order, which no dump shows.

        Drawn from a Random of its own, so that adding this kept every other seed's scenario as it was.
        """
        rng = random.Random(self.seed ^ 0x5EED)
        if self.backend != "nft" or rng.random() >= 0.1:
            return []
        self.features.add("mixed")
        n = rng.randint(1, self.uplinks)
        return [("gw", ("iptables-nft", "-t", "nat", "-A", "POSTROUTING", "-o", f"up{n}", "-j", "MASQUERADE"),
                 None)]

    # mutations ---------------------------------------------------------------------------

    def mutate_ruleset(self, rs: Ruleset) -> Ruleset:
        chains = dict(rs.chains)
        post = list(chains["post"])
        pre = list(chains["pre"])
        op = self.rng.choice(("add", "drop", "swap", "pre"))
        if op == "add" or not post:
            post.insert(self.rng.randint(0, len(post)), self.post_rule())
        elif op == "drop":
            post.pop(self.rng.randrange(len(post)))
        elif op == "swap":
            post.reverse()
        else:
            pre.append(self.pre_rule())
        self.ensure_iif_share(pre, post)
        chains["post"] = tuple(post)
        chains["pre"] = tuple(pre)
        sets = rs.sets
        if "set" in self.features and not sets:
            sets = (
                ("srv4", 4, (server_net(4, 1), server(4, 2))),
                ("srv6", 6, (server_net(6, 1), server(6, 2))),
            )
        return Ruleset(rs.backend, tuple(chains.items()), sets)

    def mutation(self, rs: Ruleset | None) -> tuple[Mutation, Ruleset | None]:
        kinds = [
            "default_route",
            "default_route",
            "prefix_route",
            "prefix_route",
            "link_down",
            "address",
            "ip_rule",
            "ruleset",
            "ruleset",
            "rp_filter",
            "xfrm",
        ]
        if rs is None:
            kinds = ["late_nat"]
        kind = self.rng.choice(kinds)
        fam = self.rng.choice((4, 6))
        cmds: list[Cmd] = []
        if kind == "late_nat":
            rs = self.ruleset()
            cmds += load_commands(rs)
        elif kind == "default_route":
            cmds.append(
                (
                    "gw",
                    (
                        "ip",
                        f"-{fam}",
                        "route",
                        "replace",
                        "default",
                        *via(fam, self.other_up(self.default_up)),
                    ),
                    None,
                )
            )
        elif kind == "prefix_route":
            x = self.rng.randrange(SERVERS)
            if self.rng.random() < 0.5:
                cmds.append(
                    (
                        "gw",
                        ("ip", f"-{fam}", "route", "replace", server_net(fam, x), *via(fam, self.up())),
                        None,
                    )
                )
            else:
                cmds.append(("gw", ("ip", f"-{fam}", "route", "flush", server_net(fam, x)), None))
        elif kind == "link_down":
            cmds.append(("gw", ("ip", "link", "set", f"up{self.up()}", "down"), None))
        elif kind == "address":
            n = self.up()
            cmds.append(
                ("gw", ("ip", "addr", "add", f"{up_gw(fam, n, 11)}/{plen(fam)}", "dev", f"up{n}"), None)
            )
            cmds.append(("gw", ("ip", "addr", "del", f"{up_gw(fam, n)}/{plen(fam)}", "dev", f"up{n}"), None))
        elif kind == "ip_rule":
            self.features.add("ip_rule")
            t = self.other_up(self.default_up)
            sel = self.rng.choice(
                (
                    ("from", lan_host(fam, 0, 3)),
                    ("iif", "lan1"),
                    ("to", server_net(fam, self.rng.randrange(SERVERS))),
                )
            )
            cmds.append(
                ("gw", ("ip", f"-{fam}", "route", "replace", "default", *via(fam, t), "table", "102"), None)
            )
            cmds.append(("gw", ("ip", f"-{fam}", "rule", "add", *sel, "lookup", "102", "pref", "500"), None))
        elif kind == "ruleset" and rs is not None:
            rs = self.mutate_ruleset(rs)
            cmds += load_commands(rs)
        elif kind == "rp_filter":
            value = self.rng.choice((0, 1, 2))
            cmds.append(
                (
                    "gw",
                    (
                        "sysctl",
                        "-qw",
                        *(f"net.ipv4.conf.{link}.rp_filter={value}" for link in ("all", "lan0", "lan1")),
                    ),
                    None,
                )
            )
        elif kind == "xfrm":
            self.features.add("xfrm")
            n = self.up()
            x = self.rng.randrange(SERVERS)
            self.xfrm.append((lan_net(fam, 0), server_net(fam, x)))
            cmds.append(
                (
                    "gw",
                    (
                        "ip",
                        "xfrm",
                        "policy",
                        "add",
                        "src",
                        lan_net(fam, 0),
                        "dst",
                        server_net(fam, x),
                        "dir",
                        "out",
                        "tmpl",
                        "src",
                        up_gw(fam, n),
                        "dst",
                        up_far(fam, n),
                        "proto",
                        "esp",
                        "mode",
                        "tunnel",
                    ),
                    None,
                )
            )
        return Mutation(kind, tuple(cmds)), rs

    # flows -----------------------------------------------------------------------------

    def flows(self) -> list[Flow]:
        flows: list[Flow] = []
        sources = list(SOURCES)
        for fam in (4, 4, 6):
            for host, dev, net in self.rng.sample(sources, 3):
                for _ in range(self.rng.randint(1, 2)):
                    x = self.rng.randrange(SERVERS)
                    dport = self.rng.choice(DPORTS)
                    flows.append(
                        Flow("", fam, "cl", lan_host(fam, net, host), f"c{dev}", server(fam, x), dport)
                    )
        for fam in (4, 6):
            if self.rng.random() < 0.6:
                n = self.up()
                port = self.rng.choice((FWD_PORT, FWD_PORT, LOCAL_PORT))
                flows.append(Flow("", fam, "wan", remote(fam), None, up_gw(fam, n), port))
        if self.rng.random() < 0.5:
            fam = self.rng.choice((4, 6))
            flows.append(
                Flow(
                    "",
                    fam,
                    "gw",
                    None,
                    None,
                    server(fam, self.rng.randrange(SERVERS)),
                    self.rng.choice((123, 53)),
                )
            )
        # Distinct flows only (the same 4-tuple from one sender twice would be one flow).
        seen: set[tuple[object, ...]] = set()
        unique = []
        for f in flows:
            key = (f.family, f.sender, f.src, f.dev, f.dst, f.dport)
            if key not in seen:
                seen.add(key)
                unique.append(Flow(f"f{len(unique)}", *key[:1], f.sender, f.src, f.dev, f.dst, f.dport))
        return unique

    def scenario(self) -> Scenario:
        self.xfrm: list[tuple[str, str]] = []
        setup = self.setup()
        late = self.rng.random() < 0.08
        rs = None if late else self.ruleset()
        if late:
            # Conntrack runs only once a rule needs it: a ct match with no NAT tracks the early flows.
            self.features.add("late_nat")
            setup.append(
                (
                    "gw",
                    ("nft", "-f", "-"),
                    "table inet h8ct {\n chain h8fwd {\n"
                    "  type filter hook forward priority 0; policy accept;\n  ct state new accept\n }\n"
                    " chain h8out {\n  type filter hook output priority 0; policy accept;\n"
                    "  ct state new accept\n }\n}\n",
                )
            )
        else:
            setup += load_commands(rs)
            setup += self.mixed()
        flows = self.flows()
        mutations = []
        cur = rs
        for _ in range(self.rng.randint(1, 3)):
            m, cur = self.mutation(cur)
            mutations.append(m)
        return Scenario(
            self.seed,
            self.rp_mode,
            self.marks,
            self.backend,
            self.uplinks,
            tuple(setup),
            rs,
            cur,
            tuple(mutations),
            tuple(flows),
            tuple(self.xfrm),
            frozenset(self.features),
        )


def generate(seed: int) -> Scenario:
    """The scenario of ``seed`` (the same seed, the same scenario)."""
    return _Gen(seed).scenario()


def xfrm_matches(scn: Scenario, flow: Flow) -> bool:
    """Whether an out policy the scenario adds selects this flow (no SA: no fresh-flow oracle)."""
    if flow.src is None:
        return False
    for src, dst in scn.xfrm:
        s, d = ip_network(src), ip_network(dst)
        if (
            s.version == ip_address(flow.src).version
            and ip_address(flow.src) in s
            and ip_address(flow.dst) in d
        ):
            return True
    return False


def iif_share(rs: Ruleset) -> tuple[int, int]:
    """(rules matching the input interface, NAT rules that could) of a ruleset."""
    rules = [*rs.chain("pre"), *rs.chain("post")]
    return sum(r.iif for r in rules), len(rules)
