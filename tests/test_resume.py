"""A run killed after a checkpoint and resumed with --ckpt_path last ends with the weights of an uninterrupted run."""
import torch

from tests.helpers import SMALL_DATA, last_checkpoint as final_weights, run_cli

COMMON = ["fit", "--config", "recipes/fox_lm.yaml", "--trainer.max_steps=8", "--checkpoint.every_n_train_steps=3",
          "--trainer.val_check_interval=4", "--data.init_args.val_windows=2", "--model.init_args.n_layers=2",
          "--data.init_args.batch_size=8", "--trainer.enable_progress_bar=false", *SMALL_DATA]


def dirs(path):
    return [f"--trainer.default_root_dir={path}", f"--trainer.logger.init_args.save_dir={path}"]


def test_killed_and_resumed_equals_uninterrupted(tmp_path):
    straight = run_cli([*COMMON, *dirs(tmp_path / "straight")])
    assert straight.returncode == 0, straight.stderr[-2000:]

    killer = tmp_path / "kill.yaml"
    killer.write_text("trainer:\n  callbacks:\n    - class_path: callbacks.fox_report.FoXReport\n"
                      "    - class_path: tests.helpers.KillAfterStep\n      init_args:\n        step: 5\n")
    crashed = run_cli([*COMMON, "--config", str(killer), *dirs(tmp_path / "resumed")])
    assert crashed.returncode == -9  # really killed, after the step-3 checkpoint and before step 6
    assert final_weights(tmp_path / "resumed")["global_step"] == 3

    resumed = run_cli([*COMMON, *dirs(tmp_path / "resumed"), "--ckpt_path=last"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert a["global_step"] == b["global_step"] == 8
    for key in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][key], a["state_dict"][key], rtol=0, atol=0, msg=key)
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in opt_a:
        torch.testing.assert_close(opt_b[i]["exp_avg"], opt_a[i]["exp_avg"], rtol=0, atol=0)
