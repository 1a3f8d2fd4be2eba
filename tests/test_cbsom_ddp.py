"""CB-SOM under real DDP (2 CPU processes, gloo): every rank picks the same BMU at every step in every layer (CB:
from the all-reduced gradients; AB: from the all-reduced batch-mean maps; random: from a generator seeded alike), so
the replicas stay identical after the in-place SOM updates, which DDP itself does not synchronise."""
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT


@pytest.mark.slow  # a multi-process check (developers' guide: run before resolving, not in the default suite)
@pytest.mark.parametrize("mode", ["cb", "ab", "random"])
def test_two_ranks_pick_the_same_bmus_and_stay_identical(tmp_path, mode):
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "cbsom_ddp_run.py"), str(tmp_path), "2", mode, "6"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["step"] == r1["step"] == 6
    assert len(r0["history"]) == 6 * 9 and r0["history"] == r1["history"]  # 9 convs x 6 steps, same BMUs
    assert len({bmu for _, _, bmu in r0["history"]}) > 3
    for key, value in r0["weights"].items():
        if "running_" in key or "num_batches" in key:
            continue  # BatchNorm statistics are per rank under plain DDP (no SyncBatchNorm)
        assert torch.equal(r1["weights"][key], value), key
