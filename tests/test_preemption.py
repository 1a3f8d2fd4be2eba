"""Preemption: SIGTERM or SIGUSR1 sent to a real training process finishes the step, saves a checkpoint and stops
(exit 143); resuming with --ckpt_path last ends exactly where an uninterrupted run ends (CB-SOM, with its SOM state)."""
import pytest
import torch

from tests.helpers import run_cli

COMMON = ["fit", "--config", "recipes/cbsom_digits.yaml", "--trainer.max_steps=30", "--checkpoint.every_n_train_steps=50",
          "--trainer.enable_progress_bar=false"]
SOM = ("    - class_path: callbacks.self_organizing_map.SelfOrganizingMap\n"
       "      init_args:\n        mode: random\n        alpha0: 0.1\n        sigma_min: 1.0\n")


def go(tmp_path, name, extra=(), signal_at=None, signal="SIGTERM"):
    cfg = tmp_path / f"{name}-{signal_at}.yaml"
    text = "trainer:\n  callbacks:\n" + SOM
    if signal_at is not None:
        text += (f"    - class_path: tests.helpers.SignalAtStep\n      init_args:\n        step: {signal_at}\n"
                 f"        signal: {signal}\n")
    cfg.write_text(text)
    out = tmp_path / name
    return run_cli([*COMMON, "--config", str(cfg), f"--trainer.default_root_dir={out}",
                    f"--trainer.logger.init_args.save_dir={out}", *extra])


def last(tmp_path, name):
    return torch.load(tmp_path / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


@pytest.mark.parametrize("signal", ["SIGTERM", "SIGUSR1"])
def test_signal_saves_a_checkpoint_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path, signal):
    straight = go(tmp_path, "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    stopped = go(tmp_path, "resumed", signal_at=13, signal=signal)
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert "resume with --ckpt_path last" in stopped.stderr.strip().splitlines()[-1]
    assert last(tmp_path, "resumed")["global_step"] == 13  # no step-based checkpoint was due: the signal wrote it
    resumed = go(tmp_path, "resumed", extra=["--ckpt_path=last"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = last(tmp_path, "straight"), last(tmp_path, "resumed")
    assert a["global_step"] == b["global_step"] == 30
    for key in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][key], a["state_dict"][key], rtol=0, atol=0, msg=key)
    som_a, som_b = (next(v for k, v in c["callbacks"].items() if k.startswith("SelfOrganizingMap")) for c in (a, b))
    assert som_a["distinct"] == som_b["distinct"] and torch.equal(som_a["generator"], som_b["generator"])
