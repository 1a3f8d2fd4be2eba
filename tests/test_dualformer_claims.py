"""The Dualformer claims at CPU scale (spec dualformer.md section 4; slow: 9 runs of 2,000 steps, about an hour on 2
cores): on 5x5 mazes with unseen layouts, the same encoder-decoder trained for the same steps on complete traces,
on plans only and with Dualformer's trace dropping, 3 seeds, greedy answers on 200 test mazes:
(a) Dualformer's fast-mode optimal rate is above Solution-Only's; (b) Dualformer's slow-mode traces are shorter than
the full-trace model's, at an optimal rate at least as high within noise (two binomial standard errors); (c) its
fast-mode answers are at most half as long as its slow-mode ones.  Runs the functions of
scripts/dualformer_compare.py; ``DUALFORMER_COMPARE_OUT=runs/dualformer_compare`` checks the runs that script already
finished instead of repeating them.

Measured (docs/results.md): (b) and (c) hold; (a) does not at this scale, and is marked as an expected failure,
strict: if a change makes it hold, it fails as XPASS and the results must be updated."""
import argparse
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def verdict(tmp_path_factory):
    from concurrent.futures import ThreadPoolExecutor

    from datamodules.trace_dataset import TraceDataConfig, ensure_dataset
    from scripts.dualformer_compare import ARMS, run_one, table, verdict

    out = Path(os.environ.get("DUALFORMER_COMPARE_OUT") or tmp_path_factory.mktemp("dualformer_compare"))
    args = argparse.Namespace(out=out, steps=2000, n_train=20000, sizes=[5], items=200, samples=8, seeds=[0, 1, 2])
    ensure_dataset(out / "data", TraceDataConfig(sizes=(5,), n_train=20000, n_test=200), processes=2)
    os.environ["OMP_NUM_THREADS"] = "1"
    with ThreadPoolExecutor(2) as pool:
        rows = [r for rs in pool.map(lambda t: run_one(*t, args), [(a, s) for s in args.seeds for a in ARMS])
                for r in rs]
    tab = table(rows, args.samples)
    assert all(r["seeds"] == 3 and r["items"] == 200 for r in tab)
    return verdict(tab)


@pytest.mark.parametrize("claim", [
    pytest.param("(a) Dualformer fast optimal > Solution-Only", marks=pytest.mark.xfail(
        strict=True, raises=AssertionError, reason="measured: at 2,000 steps Solution-Only's fast mode is ahead "
        "(0.478 vs 0.258; 0.905 vs 0.720 at 5,000 steps, seed 0); see docs/results.md")),
                                   "(b) Dualformer slow trace < full trace",
                                   "(b) Dualformer slow optimal >= full trace - 2 se",
                                   "(c) fast answers <= half the slow ones"])
def test_dualformer_claim(verdict, claim):
    assert verdict[claim], verdict
