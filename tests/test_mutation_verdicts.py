# SPDX-License-Identifier: GPL-2.0-or-later
"""The README's mutation table is the count of the verdict file it names (issue 16).

``tests/mutation/verdicts-2026-12-04.txt.gz`` holds mutmut's verdict on every mutant (the merge of
the runs the README's reports describe, ``scripts/mutation_merge.py``). This checks that every
mutant has one, that each module kills at least 90 % of them, and that the README's table under
"Where each module stands" says what the file says, so neither changes without the other.
"""

from __future__ import annotations

import gzip
import re
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VERDICTS = ROOT / "tests" / "mutation" / "verdicts-2026-12-04.txt.gz"
KILLED = {"killed", "timeout", "segfault"}  # a timeout or a crash counts as killed, as in every report


def counts() -> dict[str, Counter[str]]:
    by_module: dict[str, Counter[str]] = defaultdict(Counter)
    for line in gzip.decompress(VERDICTS.read_bytes()).decode().splitlines():
        name, _, status = line.rpartition(": ")
        module = re.split(r"\.x(?:_|ǁ)", name, maxsplit=1)[0]  # x_NAME functions, xǁCLASSǁNAME methods
        by_module[module.removeprefix("topowatch.").replace(".", "/") + ".py"][status] += 1
    return by_module


def test_every_mutant_has_a_verdict_and_each_module_kills_nine_in_ten() -> None:
    modules = counts()
    assert "core/decide.py" in modules and "edges/ctnetlink.py" in modules and "reactor.py" in modules
    for module, c in modules.items():
        assert set(c) <= KILLED | {"survived"}, (module, c)  # nothing "not checked", "no tests" or suspicious
        assert sum(c[s] for s in KILLED) >= 0.9 * sum(c.values()), (module, c)


def test_the_readme_table_is_the_verdict_files_count() -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Where each module stands (2026-12-04, after the eleventh session)"):]
    rows = re.findall(r"^\| `([a-z/_]+\.py)` \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|", section, re.M)
    table = {m: tuple(map(int, n)) for m, *n in rows[:len(counts())]}
    expected = {m: (sum(c.values()), sum(c.values()), sum(c[s] for s in KILLED), c["survived"])
                for m, c in counts().items()}  # fmt: skip
    assert table == expected
