# SPDX-License-Identifier: GPL-2.0-or-later
"""Merge mutmut verdicts of several results directories into one list (README "Mutation testing").

Parallel runs (one worktree per module) each keep their verdicts in their own ``mutants/``;
mutmut also resets a function's verdicts to "not checked" when new tests come to cover it.
This prints one ``NAME: STATUS`` line per mutant, as ``mutmut results --all true`` does, for
``scripts/mutation_report.py``:

    scripts/mutation_merge.py --default A/mutants --owner core/classify.py=B/mutants \\
        --owner reactor.py=C/mutants,C/saved.meta --fallback OLD/mutants | scripts/mutation_report.py

For each module the first directory (or ``.meta`` file) of its ``--owner`` list, or
``--default``, holds its current code's mutants; a mutant it has not judged takes the verdict
of the next owner entry, then of each ``--fallback``, but only where that meta's hash of the
mutant's function is the owner's (the same code: mutmut hashes each function). It never
invents a verdict: a mutant no directory judged on the same code stays "not checked".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# mutmut 3.8.1's exit codes (mutmut/stats.py status_by_exit_code; any other is "suspicious").
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 2: "check was interrupted by user",
          None: "not checked", 33: "no tests", 34: "skipped", 35: "suspicious", 36: "timeout",
          -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", -11: "segfault", -9: "segfault",
          37: "caught by type check"}


def load(source: str, module: str) -> dict[str, Any] | None:
    path = Path(source)
    if path.is_dir():
        path = path / "src" / "topowatch" / f"{module}.meta"
    if not path.is_file():
        return None
    meta: dict[str, Any] = json.loads(path.read_text())
    return meta


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--default", required=True, help="results directory of the modules no --owner names")
    parser.add_argument("--owner", action="append", default=[], metavar="MODULE=DIR[,DIR...]",
                        help="e.g. core/classify.py=/work/wt/x/mutants (repeatable)")
    parser.add_argument("--fallback", action="append", default=[], metavar="DIR",
                        help="older results, used where a function's hash is the same (repeatable)")
    args = parser.parse_args(argv)
    owners: dict[str, list[str]] = {}
    for item in args.owner:
        module, _, dirs = item.partition("=")
        owners[module] = dirs.split(",")
    root = Path(args.default) / "src" / "topowatch"
    modules = sorted(str(p.relative_to(root))[: -len(".meta")] for p in root.rglob("*.py.meta"))
    for module in sorted(set(modules) | set(owners)):
        sources = owners.get(module, [args.default])
        own = load(sources[0], module)
        if own is None:
            continue
        hashes = own["hash_by_function_name"]
        others = [m for m in (load(s, module) for s in (*sources[1:], *args.fallback)) if m is not None]
        for key, own_code in own["exit_code_by_key"].items():
            function = key.rsplit(".", 1)[-1].rsplit("__mutmut_", 1)[0]
            code = own_code
            for other in others if code is None else ():
                theirs = other["exit_code_by_key"].get(key)
                same = other["hash_by_function_name"].get(function) == hashes.get(function)
                if theirs is not None and same:
                    code = theirs
                    break
            print(f"    {key}: {STATUS.get(code, 'suspicious')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
