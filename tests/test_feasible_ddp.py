"""Feasible Learning under DDP (2 CPU processes, gloo): every rank applies the same update to the multipliers of the
whole global batch, so the replicas are identical, and equal to one process trained on the same global batches."""
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT


def run(out, devices, local_batch, steps=25):
    out.mkdir()
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "feasible_ddp_run.py"), str(out), str(devices),
                           str(local_batch), str(steps)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(devices)]


@pytest.mark.slow  # a multi-process check (developers' guide: run before resolving, not in the default suite)
def test_two_rank_lambda_replicas_are_identical_and_equal_one_process(tmp_path):
    r0, r1 = run(tmp_path / "ddp", 2, 16)
    (single,) = run(tmp_path / "one", 1, 32)  # the same global batches: rank r takes permutation[r::2]
    assert r0["step"] == r1["step"] == single["step"] == 25
    assert torch.equal(r0["lam"], r1["lam"])  # bit-identical replicas, no broadcast needed
    assert int((r0["lam"] > 0).sum()) > 20
    torch.testing.assert_close(r0["lam"], single["lam"], rtol=1e-4, atol=1e-5)
    for key, value in single["weights"].items():
        torch.testing.assert_close(r0["weights"][key], value, rtol=1e-4, atol=1e-5, msg=key)
