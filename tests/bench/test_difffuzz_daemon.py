"""The differential fuzzer with the daemon as the judge: its reactions agree with the kernel.

``bench/difffuzz.py --daemon``: each seed's gateway is built in namespaces of its own
(prefix DIFFFUZZ_PREFIX, default h8), ``topowatch run`` starts there after the old flows
were made (its startup sweep judges every entry), the seed's mutations follow, and the
entries the daemon deleted (and left undecided) in its reactions are judged against the
kernel: each deleted flow sent again from its own port, and fresh flows.

A reaction that follows a sweep may judge only what its change can re-NAT (``core.impact``),
so these seeds catch what ``plan`` cannot: the reactor's choice of what to judge. In
``NO_FN`` an ``ip rule``, address, link or xfrm change (no route, no ruleset change) makes
entries stale; a reactor that judged none of them after such a change (the bug fixed on
2026-12-04) misses 12 there. The other seeds mix route and ruleset changes.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import difffuzz

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft"),
    pytest.mark.skipif(shutil.which("iptables-nft-restore") is None, reason="needs iptables-nft"),
    pytest.mark.skipif(shutil.which("ipset") is None, reason="needs ipset"),
]

# Seeds whose stale entries only a change of rules, addresses, links or xfrm makes.
NO_FN = (163, 242, 259, 301, 344)
# Route and ruleset changes, and seeds where nothing turns stale (the sweep and the reactions
# must delete nothing there).
OTHERS = (0, 3, 5, 8, 107)


@pytest.fixture(scope="module")
def rules_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    base = tmp_path_factory.mktemp("difffuzz-daemon")
    base.chmod(0o755)
    rules = base / "rules.d"
    rules.mkdir(mode=0o755)
    (rules / "50-difffuzz.toml").write_text(difffuzz.DAEMON_POLICY)
    (rules / "50-difffuzz.toml").chmod(0o644)
    yield str(rules)


@pytest.mark.parametrize("seed", [*NO_FN, *OTHERS])
def test_the_daemons_reactions_agree_with_the_kernel(seed: int, rules_dir: str) -> None:
    out = difffuzz.run_seed_daemon(seed, rules_dir)
    if out.error is not None:
        raise RuntimeError(f"seed {seed} did not run: {out.error}")
    assert out.counts["reactions"] >= 1, f"seed {seed}: the daemon did not react to the mutations"
    judged = sum(out.counts[k] for k in difffuzz.VERDICTS)
    assert judged > 0, f"seed {seed}: no old entry had an oracle: {dict(out.counts)}"
    wrong = [f for f in out.findings if f["kind"] in ("fp", "fresh_stale", "sweep_stale")]
    assert not wrong, [f"{f['kind']} {f['flow_text']}: old {f['old']}; fresh {f['fresh']}; {f['reason']}"
                       for f in wrong]  # fmt: skip
    if seed in NO_FN:
        # Stale entries the daemon deleted, or left undecided (the kernel says they are stale:
        # not judging them at all would show as "fn").
        assert out.counts["agree_stale"] + out.counts["undecided"] >= 1, f"seed {seed}: {dict(out.counts)}"
        missed = [f for f in out.findings if f["kind"] == "fn"]
        assert not missed, [f"{f['flow_text']}: old {f['old']}; fresh {f['fresh']}" for f in missed]
