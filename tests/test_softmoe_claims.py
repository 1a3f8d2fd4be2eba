"""The SoftMoE tokenization claim at MinAtar scale (slow: 12 runs of 100k steps per setting, about 40 min on 2
idle cores): one scaled expert over PerConv tokens ends at least as high as the scaled flatten baseline on Breakout
and SpaceInvaders, mean over 3 seeds (the issue's acceptance; spec 3, tier 3), with the recipes' DQN and with the
spec's "fair chance" (C51, 3-step returns).  Runs the functions of scripts/softmoe_compare.py;
``SOFTMOE_COMPARE_OUT=runs/softmoe_compare`` checks the runs that script already finished instead of repeating them.

Measured: the claim does NOT hold at this scale in either setting (docs/results.md, section SoftMoE: the routing
stays uniform, so every position gets the same vector); nor with one update per environment step on top of C51 and
3-step returns (Breakout, 3 seeds: 4.09 vs 8.11; ``--setting c51_nstep3_rr1``, 50 min per SoftMoE run, not repeated
here).  The test keeps asserting the paper's claim and is marked as
an expected failure, strict: if a change makes the claim hold, it fails as XPASS and the results must be updated."""
import os
from pathlib import Path

import pytest

from scripts.softmoe_compare import checks, run_one, summarise


@pytest.mark.slow
@pytest.mark.xfail(strict=True, raises=AssertionError,  # a crash still fails
                   reason="measured: one scaled expert stays far below the scaled flatten baseline on MinAtar "
                          "(uniform routing); see docs/results.md")
@pytest.mark.parametrize("setting", ["dqn", "c51_nstep3"])
def test_one_scaled_expert_over_tokens_matches_the_scaled_flatten_baseline(setting, tmp_path):
    out = Path(os.environ.get("SOFTMOE_COMPARE_OUT", tmp_path))
    os.environ["OMP_NUM_THREADS"] = "1"
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(arm, game, seed) for seed in (0, 1, 2) for game in ("Breakout-v1", "SpaceInvaders-v1")
            for arm in ("softmoe1_x4", "flatten_x4")]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda job: run_one(*job, 100_000, setting, out), jobs))
    rows = summarise(results)
    verdict = checks(rows)
    assert len(verdict) == 2 and all(verdict.values()), [(r["game"], r["arm"], r["mean"]) for r in rows]
