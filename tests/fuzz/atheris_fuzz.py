"""Coverage-guided fuzzing of one parser with atheris (libFuzzer for Python).

    python tests/fuzz/atheris_fuzz.py PARSER [libFuzzer options] [CORPUS_DIR ...]

``scripts/fuzz PARSER SECONDS`` runs it with a corpus directory seeded from
``fuzz_targets.SEEDS`` (recorded netlink messages, the shared ruleset corpus,
generated texts). The targets are the ones the CI's hypothesis tests run; an
input that ends in any exception other than ``TopowatchError`` is a crash,
written by libFuzzer as ``crash-<sha1>`` (replay: ``scripts/fuzz PARSER
--replay FILE``). atheris is optional: ``pip install atheris`` (a binary
wheel for x86_64 Linux; elsewhere it builds against clang's libFuzzer).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))

with atheris.instrument_imports(include=["topowatch", "tomllib"]):
    import fuzz_targets


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in fuzz_targets.TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(fuzz_targets.TARGETS)}}} [libFuzzer options] [corpus]")
    name = sys.argv.pop(1)
    target = fuzz_targets.TARGETS[name]
    fuzz_targets.quiet()

    def one(data: bytes) -> None:
        with contextlib.suppress(fuzz_targets.ALLOWED):
            target(data)

    atheris.Setup(sys.argv, one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
