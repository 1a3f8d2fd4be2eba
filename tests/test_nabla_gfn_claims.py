"""The Nabla-GFlowNet claims at CPU scale (spec nabla_gfn.md 4.1-4.2; slow).  The ring tier (about 15 minutes on 2
cores): one prior, then residual Nabla-DB (1,000 iterations), DRaFT-1 and ReFL (300) over 3 alignment seeds --
Nabla-DB's reward >= the pretrained model's + 1.5, on-support >= 0.9, mode entropy >= 1.4 and TV to the exact target's
mode weights <= 0.25 on every seed; DRaFT-1 collapses on every seed; Nabla-DB keeps more support and more modes than
DRaFT-1.  The digits tier (about 45 minutes): Nabla-DB's feature Frechet distance to the prior's 3s below, and its mean
pairwise feature distance above, DRaFT-1's and ReFL's, with at least half its samples 3s.  Runs the functions of
scripts/nabla_gfn_compare.py; ``NABLA_GFN_COMPARE_OUT=runs/nabla_gfn_compare`` checks the runs that script already
finished instead of repeating them."""
import argparse
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _verdict(tier, tmp_path_factory):
    from concurrent.futures import ThreadPoolExecutor

    from scripts.nabla_gfn_compare import TIER_ARMS, prior, run_one, verdict

    out = Path(os.environ.get("NABLA_GFN_COMPARE_OUT") or tmp_path_factory.mktemp("nabla_gfn_compare"))
    args = argparse.Namespace(out=out, steps=None)
    os.environ["OMP_NUM_THREADS"] = "1"
    prior(tier, args)
    arms = [a for a in TIER_ARMS[tier] if a in ("nabla_gfn", "draft", "refl")]
    with ThreadPoolExecutor(2) as pool:
        rows = list(pool.map(lambda t: run_one(tier, *t, args), [(a, s) for s in (0, 1, 2) for a in arms]))
    assert len(rows) == 9
    return verdict(tier, rows)


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    return _verdict("ring", tmp_path_factory)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return _verdict("digits", tmp_path_factory)


@pytest.mark.parametrize("claim", ["Nabla-DB reward >= pretrained + 1.5 (every seed)", "on-support >= 0.9 (every seed)",
                                   "mode entropy >= 1.4 (every seed)", "TV <= 0.25 (every seed)",
                                   "DRaFT-1 collapses (every seed)", "Nabla-DB on-support and entropy > DRaFT-1's"])
def test_ring_claim(ring, claim):
    assert ring[claim], ring


@pytest.mark.parametrize("claim", ["Nabla-DB feature FD to the prior's 3s < DRaFT-1's and ReFL's",
                                   "Nabla-DB pairwise feature distance > DRaFT-1's and ReFL's",
                                   "Nabla-DB share of 3s >= 0.5"])
def test_digits_claim(digits, claim):
    assert digits[claim], digits
