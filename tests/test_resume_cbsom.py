"""CB-SOM: a run killed mid-epoch and resumed with --ckpt_path last ends exactly where an uninterrupted run does,
including the SOM callback's state (random-BMU generator, distinct BMUs, update counts, alignment sums)."""
import pytest
import torch

from tests.helpers import run_cli

# 22 batches per epoch: checkpoints at steps 12 and 24, the crash after step 27 resumes from step 24, in epoch 1.
COMMON = ["fit", "--config", "recipes/cbsom_digits.yaml", "--trainer.max_steps=30", "--checkpoint.every_n_train_steps=12",
          "--trainer.enable_progress_bar=false"]


def callbacks_yaml(path, mode, kill_at=None):
    text = ("trainer:\n  callbacks:\n    - class_path: callbacks.self_organizing_map.SelfOrganizingMap\n"
            f"      init_args:\n        mode: {mode}\n        alpha0: 0.1\n        sigma_min: 1.0\n        seed: 5\n")
    if kill_at is not None:
        text += f"    - class_path: tests.helpers.KillAfterStep\n      init_args:\n        step: {kill_at}\n"
    path.write_text(text)
    return str(path)


def run(tmp_path, name, mode, extra=(), kill_at=None):
    out = tmp_path / name
    cfg = callbacks_yaml(tmp_path / f"{name}.yaml", mode, kill_at)
    return run_cli([*COMMON, "--config", cfg, f"--trainer.default_root_dir={out}",
                    f"--trainer.logger.init_args.save_dir={out}", *extra])


def last(path):
    return torch.load(path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


@pytest.mark.parametrize("mode", ["cb", "random"])
def test_cbsom_killed_mid_epoch_and_resumed_equals_uninterrupted(tmp_path, mode):
    straight = run(tmp_path, "straight", mode)
    assert straight.returncode == 0, straight.stderr[-2000:]
    crashed = run(tmp_path, "resumed", mode, kill_at=27)
    assert crashed.returncode == -9
    assert last(tmp_path / "resumed")["global_step"] == 24
    resumed = run(tmp_path, "resumed", mode, extra=["--ckpt_path=last"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    a, b = last(tmp_path / "straight"), last(tmp_path / "resumed")
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
