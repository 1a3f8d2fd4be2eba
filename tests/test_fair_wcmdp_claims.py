"""The CP-DRL claim of the fair-WCMDP recipe (spec fair_wcmdp.md 4.2, item 3; slow: about 40 minutes on 2 cores):
PPO on count proportions, trained once with N ~ U{2..5}, evaluated at N = 3..8 (and 50): its GGF within 3% of the
count-LP optimum for every seed (the spec marks the paper's target unconfirmed), per-arm values equal up to Monte-Carlo
noise, a better GGF than random everywhere and than the joint-state PPO (one network per N, the same environment
steps each) at every N.  The exact-LP claims are in tests/test_fair_wcmdp_lp.py and tests/test_fair_wcmdp.py.

``FAIR_WCMDP_COMPARE_OUT=runs/fair_wcmdp_compare`` checks the runs ``scripts/fair_wcmdp_compare.py`` already finished
instead of repeating them."""
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_cpdrl_is_near_optimal_fair_and_beats_the_baselines(tmp_path):
    from scripts.fair_wcmdp_compare import rl_runs, rl_table

    out = Path(os.environ.get("FAIR_WCMDP_COMPARE_OUT", tmp_path))
    eval_arms = [3, 4, 5, 6, 7, 8, 50]
    rows = rl_runs([0, 1, 2], [0, 1], [3, 4, 5, 6, 7, 8], eval_arms, 200, out, jobs=2)
    table = {r["n"]: r for r in rl_table(rows, eval_arms)}
    assert sorted(table) == eval_arms
    for n in range(3, 9):
        r = table[n]
        assert r["seeds"] == 3 and r["joint_seeds"] == 2
        assert -1e-9 <= r["cp_worst_gap"] <= 0.03, (n, r["cp_worst_gap"])
        assert r["cp"] >= r["joint"] - 1e-9, (n, r["cp"], r["joint"])
    for n, r in table.items():
        assert r["cp_z"] < 4.0, (n, r["cp_z"])  # arms equal up to Monte-Carlo noise
        assert r["cp"] > r["random"], (n, r["cp"], r["random"])
    assert sum(table[n]["cp"] - table[n]["joint"] for n in range(3, 9)) > 0
