"""CB-SOM: a run killed mid-epoch and resumed with --ckpt_path last ends exactly where an uninterrupted run does,
including the SOM callback's state (random-BMU generator, distinct BMUs, update counts, alignment sums)."""
import pytest
import torch

from tests.helpers import kill_and_resume

# 22 batches per epoch: checkpoints at steps 12 and 24, the crash after step 27 resumes from step 24, in epoch 1.
COMMON = ["fit", "--config", "recipes/cbsom_digits.yaml", "--trainer.max_steps=30", "--checkpoint.every_n_train_steps=12",
          "--trainer.enable_progress_bar=false"]


@pytest.mark.parametrize("mode", [pytest.param("cb", marks=pytest.mark.slow), "random"])  # random: RNG state too
def test_cbsom_killed_mid_epoch_and_resumed_equals_uninterrupted(tmp_path, mode):
    som = ("    - class_path: callbacks.self_organizing_map.SelfOrganizingMap\n"
           f"      init_args:\n        mode: {mode}\n        alpha0: 0.1\n        sigma_min: 1.0\n        seed: 5\n")
    a, b = kill_and_resume(tmp_path, COMMON, som, kill_at=27, saved_step=24)
    assert a["global_step"] == b["global_step"] == 30
    for key in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][key], a["state_dict"][key], rtol=0, atol=0, msg=key)
    for i, state in a["optimizer_states"][0]["state"].items():
        torch.testing.assert_close(b["optimizer_states"][0]["state"][i]["momentum_buffer"], state["momentum_buffer"],
                                   rtol=0, atol=0)
    som_a = next(v for k, v in a["callbacks"].items() if k.startswith("SelfOrganizingMap"))
    som_b = next(v for k, v in b["callbacks"].items() if k.startswith("SelfOrganizingMap"))
    assert set(som_a["updates"].values()) == {30}  # one SOM step per optimizer step in every layer, none repeated
    assert som_b["updates"] == som_a["updates"] and som_b["distinct"] == som_a["distinct"]
    assert som_b["align_sum"] == som_a["align_sum"]
    assert torch.equal(som_b["generator"], som_a["generator"])
