"""Feasible Learning: lambda is training state.  A run killed mid-epoch and resumed ends with the multipliers and
weights of an uninterrupted run; a checkpoint whose lambda does not fit the training set is a one-line error."""
import torch

from tests.helpers import kill_and_resume, run_cli

COMMON = ["fit", "--config", "recipes/feasible_digits.yaml", "--trainer.max_steps=30",
          "--checkpoint.every_n_train_steps=12", "--trainer.enable_progress_bar=false"]
FL = ("    - class_path: callbacks.feasible_learning.FeasibleLearning\n"
      "      init_args:\n        target_probability: 0.6\n        dual_lr: 0.1\n        resilient_alpha: 2.0\n")


def test_fl_killed_mid_epoch_and_resumed_equals_uninterrupted(tmp_path):
    a, b = kill_and_resume(tmp_path, COMMON, FL, kill_at=27, saved_step=24)
    assert a["global_step"] == b["global_step"] == 30
    fl_a = next(v for k, v in a["callbacks"].items() if k.startswith("FeasibleLearning"))
    fl_b = next(v for k, v in b["callbacks"].items() if k.startswith("FeasibleLearning"))
    assert int((fl_a["lam"] > 0).sum()) > 10  # the multipliers really moved
    assert torch.equal(fl_b["lam"], fl_a["lam"])
    for key in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][key], a["state_dict"][key], rtol=0, atol=0, msg=key)
    for i, state in a["optimizer_states"][0]["state"].items():
        torch.testing.assert_close(b["optimizer_states"][0]["state"][i]["exp_avg"], state["exp_avg"], rtol=0, atol=0)

    # the same checkpoint against a differently split training set
    bad = run_cli([*COMMON, f"--trainer.default_root_dir={tmp_path / 'other'}",
                   f"--trainer.logger.init_args.save_dir={tmp_path / 'other'}", "--data.init_args.test_fraction=0.3",
                   f"--ckpt_path={tmp_path / 'resumed' / 'checkpoints' / 'last.ckpt'}"])
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        "error: ValueError: FeasibleLearning: the checkpoint holds multipliers for 1347 samples but the training set "
        "has 1257; resume with the same training data")
