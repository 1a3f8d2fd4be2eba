"""The CP-DRL claim of the fair-WCMDP recipe (spec fair_wcmdp.md 4.2, item 3; slow: about 40 minutes on 2 cores):
PPO on count proportions, trained once with N ~ U{2..5}, evaluated at N = 3..8 (and 50): its GGF within 3% of the
count-LP optimum for every seed (the spec marks the paper's target unconfirmed), per-arm values equal up to Monte-Carlo
noise, a better GGF than random everywhere and than the joint-state PPO (one network per N, the same environment
steps each) at every N.  The exact-LP claims are in tests/test_fair_wcmdp_lp.py and tests/test_fair_wcmdp.py.

Measured (docs/results.md): the 3% gap holds for N = 3..7 on every seed, but not at N = 8 (beyond the training
range), where one seed of three is 4.3% (one machine) or 5.5% (another) from the optimum.  That check keeps asserting
3% and is marked as an expected failure, strict: if a change makes it hold, it fails as XPASS and the results must be
updated.

``FAIR_WCMDP_COMPARE_OUT=runs/fair_wcmdp_compare`` checks the runs ``scripts/fair_wcmdp_compare.py`` already finished
instead of repeating them."""
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
EVAL_ARMS = [3, 4, 5, 6, 7, 8, 50]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    from scripts.fair_wcmdp_compare import rl_runs, rl_table

    out = Path(os.environ.get("FAIR_WCMDP_COMPARE_OUT") or tmp_path_factory.mktemp("fair_wcmdp_compare"))
    rows = rl_runs([0, 1, 2], [0, 1], [3, 4, 5, 6, 7, 8], EVAL_ARMS, 200, out, jobs=2)
    table = {r["n"]: r for r in rl_table(rows, EVAL_ARMS)}
    assert sorted(table) == EVAL_ARMS
    for n in range(3, 9):
        assert table[n]["seeds"] == 3 and table[n]["joint_seeds"] == 2
    return table


def test_cpdrl_arms_are_equal_and_it_beats_random_and_the_joint_state_ppo(table):
    for n in range(3, 9):
        r = table[n]
        assert r["cp"] >= r["joint"] - 1e-9, (n, r["cp"], r["joint"])
    for n, r in table.items():
        assert r["cp_z"] < 4.0, (n, r["cp_z"])  # arms equal up to Monte-Carlo noise
        assert r["cp"] > r["random"], (n, r["cp"], r["random"])
    assert sum(table[n]["cp"] - table[n]["joint"] for n in range(3, 9)) > 0


@pytest.mark.parametrize("n", [3, 4, 5, 6, 7])
def test_cpdrl_is_within_3_percent_of_the_optimum_on_every_seed(table, n):
    assert -1e-9 <= table[n]["cp_worst_gap"] <= 0.03, (n, table[n]["cp_worst_gap"])


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="measured: at N = 8, beyond the training range 2..5, one seed of three is 4.3-5.5% from "
                          "the optimum; see docs/results.md")
def test_cpdrl_is_within_3_percent_of_the_optimum_on_every_seed_at_n8(table):
    assert -1e-9 <= table[8]["cp_worst_gap"] <= 0.03, table[8]["cp_worst_gap"]
