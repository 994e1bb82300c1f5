# SPDX-License-Identifier: GPL-2.0-or-later
"""The conformance corpus: how much of real rulesets' NAT topowatch models exactly.

What this module decides: for each in-scope file of a corpus folder, how many
NAT statements it holds, how many are modelled exactly, and the name of every
expression that is not. A NAT statement is *modelled exactly* when it is a
modelled NAT statement (``NatStatement``, ``NetmapStatement``, a NAT map) and
every other expression of its rule is modelled too: only then is the
prediction for a flow reaching it exact. An unmodelled NAT statement is one
the reader keeps as ``UnknownStatement`` (nft ``snat to ... map`` forms it
cannot read, ``xt target MASQUERADE``, ``-j SNAT`` with several ranges).

In scope (by name): ``*.t.json`` and ``*.t.json.output`` (nft's py tests: a
``# rule`` comment line, then its JSON expression array), ``*.json-nft``
(``nft -j list ruleset``), ``*.nft`` (nft text, loaded with this system's
nft inside a throwaway namespace and read back as JSON; a file nft cannot
load, or no namespace, is *skipped* with the reason), ``*.iptables-save``,
``*.iptables-restore``, ``iptables.rules`` (iptables-restore format) and
``*.cmds`` (``[host::]iptables -t nat -A ...`` lines). strongSwan's
``PH_IP_<HOST>`` placeholders are replaced with the addresses its
``SOURCE.txt`` or the file's header gives. Everything else is out of scope.

It never changes the host: nft runs only in a namespace it creates and removes.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from topowatch.core import nat
from topowatch.core.nat import NatRuleset, NatStatement, NetmapStatement, Rule, UnknownMatch, UnknownStatement
from topowatch.edges.iptables import parse_save
from topowatch.edges.nft import parse_rule, parse_ruleset_json
from topowatch.errors import RulesetError, TopowatchError

IPTABLES_SUFFIXES = (".iptables-save", ".iptables-restore", ".cmds")
_NAT_WORDS = ("snat", "dnat", "masquerade", "redirect")
_IPT_NAT_TARGETS = ("-j SNAT", "-j DNAT", "-j MASQUERADE", "-j REDIRECT", "-j NETMAP")
_PLACEHOLDER = re.compile(r"\bPH_IP_[A-Z0-9_]+\b")


def default_corpus() -> Path:
    """Where the corpus is: ``$TOPOWATCH_CORPUS``, else ``shared/corpus`` beside the source checkout.

    The checkout's sibling comes first so a clone elsewhere (CI's) finds the
    copy laid beside it; ``/work/shared/corpus`` is the development machine's.
    """
    env = os.environ.get("TOPOWATCH_CORPUS")
    if env:
        return Path(env)
    beside = Path(__file__).resolve().parents[3] / "shared" / "corpus"  # <checkout>/../shared
    return beside if beside.is_dir() else Path("/work/shared/corpus")


@dataclass(frozen=True, slots=True)
class FileReport:
    """One file: its NAT statements, how many are exact, the unmodelled expressions by name and count."""

    path: str
    format: str
    nat_statements: int = 0
    exact: int = 0
    unknown: tuple[tuple[str, int], ...] = ()
    skipped: str | None = None
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.skipped is not None:
            return f"{self.path}: skipped ({self.skipped})"
        line = f"{self.path}: {self.exact}/{self.nat_statements} NAT statements exact"
        if self.unknown:
            names = (f"{name} x{n}" if n > 1 else name for name, n in self.unknown)
            line += "; not modelled: " + ", ".join(names)
        return line


@dataclass(frozen=True, slots=True)
class Report:
    files: tuple[FileReport, ...] = field(default_factory=tuple)

    @property
    def nat_statements(self) -> int:
        return sum(f.nat_statements for f in self.files)

    @property
    def exact(self) -> int:
        return sum(f.exact for f in self.files)

    @property
    def ratio(self) -> float:
        return self.exact / self.nat_statements if self.nat_statements else 1.0

    def unknown(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for f in self.files:
            for name, n in f.unknown:
                total[name] += n
        return total

    def describe(self) -> str:
        lines = [f.describe() for f in self.files]
        lines.append(f"total: {self.exact}/{self.nat_statements} NAT statements modelled exactly "
                     f"({self.ratio:.1%}); {sum(1 for f in self.files if f.skipped)} files skipped")
        return "\n".join(lines)


# ---------------------------------------------------------------------------
# Counting


def is_nat_statement(expr: object) -> bool:
    """A NAT statement, modelled or not (an unmodelled one is recognised by its text)."""
    map_type = getattr(nat, "NatMapStatement", None)
    if isinstance(expr, NatStatement | NetmapStatement):
        return True
    if map_type is not None and isinstance(expr, map_type):
        return True
    if isinstance(expr, UnknownStatement):
        text = expr.text.strip()
        return (text.split(" ", 1)[0] in _NAT_WORDS or text.startswith(_IPT_NAT_TARGETS)
                or expr.expression.startswith(("xt target SNAT", "xt target DNAT", "xt target MASQUERADE",
                                                "xt target REDIRECT", "xt target NETMAP")))
    return False


def _unknown_names(rule: Rule) -> list[str]:
    return [e.expression for e in rule.exprs if isinstance(e, UnknownMatch | UnknownStatement)]


def _count(rules: Iterable[Rule]) -> tuple[int, int, Counter[str]]:
    total = exact = 0
    unknown: Counter[str] = Counter()
    for rule in rules:
        names = _unknown_names(rule)
        unknown.update(names)
        for expr in rule.exprs:
            if is_nat_statement(expr):
                total += 1
                if not names:
                    exact += 1
    return total, exact, unknown


def _ruleset_rules(ruleset: NatRuleset) -> Iterator[Rule]:
    for chain in ruleset.chains:
        yield from chain.rules


def json_rules(doc: dict[str, Any]) -> list[Rule]:
    """Every rule of an ``nft -j`` document, reached from a nat chain or not (sets resolved)."""
    parse_ruleset_json(doc)  # raises RulesetError on a malformed document
    items = [i for i in doc["nftables"] if isinstance(i, dict) and len(i) == 1]
    sets = {
        (b["family"], b["table"], b["name"]): b
        for i in items for k, b in i.items()
        if k in ("set", "map") and isinstance(b, dict) and {"family", "table", "name"} <= b.keys()
    }
    rules: list[Rule] = []
    for item in items:
        body = item.get("rule")
        if not isinstance(body, dict) or body.get("family") not in nat.FAMILY_AFS:
            continue
        exprs = body.get("expr", [])
        rules.append(parse_rule(exprs if isinstance(exprs, list) else [exprs], family=body["family"],
                                table=str(body.get("table", "")), handle=int(body.get("handle", 0)),
                                sets=sets))
    return rules


def _report(path: str, fmt: str, rules: Iterable[Rule], notes: Iterable[str] = ()) -> FileReport:
    total, exact, unknown = _count(rules)
    return FileReport(path, fmt, total, exact, tuple(sorted(unknown.items())), None, tuple(notes))


# ---------------------------------------------------------------------------
# Formats


def t_json_rules(text: str, family: str) -> list[Rule]:
    """nft py-test JSON: ``# rule`` lines, each followed by its JSON expression array."""
    rules: list[Rule] = []
    comment: str | None = None
    block: list[str] = []

    def flush() -> None:
        if comment is not None and "".join(block).strip():
            exprs = json.loads("\n".join(block))
            rules.append(parse_rule(exprs if isinstance(exprs, list) else [exprs], family=family,
                                    table="test", handle=len(rules) + 1, comment=comment))

    for line in text.splitlines():
        if line.startswith("#"):
            flush()
            comment, block = line[1:].strip(), []
        else:
            block.append(line)
    flush()
    return rules


def _t_family(path: Path) -> str:
    """The family the py test runs in: its ``*family;table;chain`` line, else its folder."""
    test = path.parent / (path.name.split(".t.json")[0] + ".t")
    if test.is_file():
        for line in test.read_text(errors="replace").splitlines():
            if line.startswith("*"):
                family = line[1:].split(";", 1)[0]
                if family in nat.FAMILY_AFS:
                    return family
    return path.parent.name if path.parent.name in nat.FAMILY_AFS else "inet"


def placeholders(root: Path, text: str) -> dict[str, str]:
    """strongSwan ``PH_IP_<HOST>`` addresses: SOURCE.txt's ``host=addr`` list, and the file header's own."""
    found: dict[str, str] = {}
    for source in root.rglob("SOURCE.txt"):
        pairs = re.findall(r"\b([a-z][a-z0-9]*)=(\d+\.\d+\.\d+\.\d+)", source.read_text(errors="replace"))
        for host, addr in pairs:
            found[f"PH_IP_{host.upper()}"] = addr
    for name, addr in re.findall(r"(PH_IP_[A-Z0-9_]+)\s*(?:=\s*|\()(\d+\.\d+\.\d+\.\d+)", text):
        found[name] = addr
    return found


def _iptables_report(root: Path, path: Path, rel: str) -> FileReport:
    text = path.read_text(errors="replace")
    notes: list[str] = []
    used = sorted(set(_PLACEHOLDER.findall(text)))
    if used:
        known = placeholders(root, text)
        for name in used:
            if name in known:
                text = re.sub(rf"\b{name}\b", known[name], text)
        done = [n for n in used if n in known]
        if done:
            notes.append("placeholders: " + ", ".join(f"{n}={known[n]}" for n in done))
    family = "ip6" if "ip6" in path.name else "ip"
    parsed = parse_save(text, family=family, all_chains=True)
    notes.extend(parsed.problems)
    return _report(rel, "iptables", _ruleset_rules(parsed.ruleset), notes)


class _NftLoader:
    """One throwaway namespace for every ``*.nft`` file (flushed between files)."""

    def __init__(self) -> None:
        self.ns: Any = None
        self.error: str | None = None

    def load(self, path: Path) -> dict[str, Any] | str:
        """The ruleset's JSON, or why the file was skipped."""
        if self.ns is None and self.error is None:
            try:
                from topowatch.netns import Namespace

                self.ns = Namespace.create("twcorpus")
            except (TopowatchError, OSError) as exc:
                self.error = f"no namespace to load nft text in: {exc}"
        if self.ns is None:
            return self.error or "no namespace"
        try:
            self.ns.run("nft", "flush", "ruleset")
            self.ns.run("nft", "-f", str(path))
            out = self.ns.run("nft", "-j", "list", "ruleset")
        except TopowatchError as exc:
            found = re.search(r"failed \(\d+\): (.*)", str(exc))
            message = found.group(1) if found else str(exc)
            return f"nft cannot load it: {message}"
        doc: dict[str, Any] = json.loads(out) if out.strip() else {"nftables": []}
        return doc

    def close(self) -> None:
        if self.ns is not None:
            self.ns.delete()
            self.ns = None


def format_of(path: Path) -> str | None:
    """The corpus format of a file, None if out of scope."""
    name = path.name
    if name.endswith((".t.json", ".t.json.output")):
        return "t.json"
    if name.endswith(".json-nft"):
        return "json-nft"
    if name.endswith(".nft"):
        return "nft"
    if name.endswith(IPTABLES_SUFFIXES) or name == "iptables.rules":
        return "iptables"
    return None


def file_report(root: Path, path: Path, loader: _NftLoader | None = None) -> FileReport:
    rel = str(path.relative_to(root))
    fmt = format_of(path)
    if fmt is None:
        return FileReport(rel, "out of scope", skipped="out of scope")
    try:
        if fmt == "t.json":
            return _report(rel, fmt, t_json_rules(path.read_text(errors="replace"), _t_family(path)))
        if fmt == "json-nft":
            return _report(rel, fmt, json_rules(json.loads(path.read_text())))
        if fmt == "nft":
            if loader is None:
                return FileReport(rel, fmt, skipped="nft text needs a namespace loader")
            doc = loader.load(path)
            if isinstance(doc, str):
                return FileReport(rel, fmt, skipped=doc)
            return _report(rel, fmt, json_rules(doc))
        return _iptables_report(root, path, rel)
    except (RulesetError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        return FileReport(rel, fmt, skipped=f"unreadable: {exc}")


def corpus_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and format_of(p) is not None)


def corpus_report(root: Path | str, *, load_nft_text: bool = True) -> Report:
    """Every in-scope file under ``root``, in path order."""
    root = Path(root)
    loader = _NftLoader() if load_nft_text else None
    try:
        return Report(tuple(file_report(root, p, loader) for p in corpus_files(root)))
    finally:
        if loader is not None:
            loader.close()
