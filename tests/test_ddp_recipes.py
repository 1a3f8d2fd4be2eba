"""Every method's recipe runs unchanged under DDP (2 CPU processes, gloo, launched by Lightning from
``python -m recipes``) and ends where one process trained on the same global batches ends, method state included:
FoX weights and gates, CB-SOM weights after the SOM steps, Feasible Learning's multipliers (digits and DPO pairs).  BatchNorm (CB-SOM)
normalises per rank under DDP and SyncBatchNorm needs a GPU, so there the one-process reference accumulates the two
ranks' local batches as two micro-batches (the sampler gives each rank one contiguous slice of the global batch, so
the micro-batches hold the same samples); BatchNorm running statistics are per rank and not compared.  Slow: ~2.5
minutes on 2 cores."""
import pytest
import torch

from tests.helpers import run_cli

CASES = {
    "fox_lm": (["--trainer.max_steps=4", "--trainer.val_check_interval=2", "--data.init_args.max_bytes=300000",
                "--data.init_args.val_windows=4", "--model.init_args.n_layers=2"], "data.init_args.batch_size", 8),
    "cbsom_digits": (["--trainer.max_steps=10"], "data.init_args.batch_size", 32),
    "feasible_digits": (["--trainer.max_steps=10"], "data.init_args.batch_size", 32),
    "feasible_dpo_toy": (["--trainer.max_steps=10", "--data.init_args.n_train=512", "--data.init_args.n_val=64"],
                         "data.init_args.batch_size", 32),
}


def fit(tmp_path, recipe, name, devices, batch, more=()):
    extra, batch_key, _ = CASES[recipe]
    out = tmp_path / name
    proc = run_cli(["fit", "--config", f"recipes/{recipe}.yaml", *extra, *more, f"--{batch_key}={batch}",
                    "--trainer.accelerator=cpu", f"--trainer.devices={devices}",
                    f"--trainer.strategy={'ddp' if devices > 1 else 'auto'}", "--trainer.enable_progress_bar=false",
                    f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}"],
                   env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(CASES))
def test_two_process_ddp_equals_one_process_on_the_same_global_batches(tmp_path, recipe):
    local = CASES[recipe][2]
    ddp = fit(tmp_path, recipe, "ddp", 2, local)
    if recipe == "cbsom_digits":
        one = fit(tmp_path, recipe, "one", 1, local, ["--trainer.accumulate_grad_batches=2"])
    else:
        one = fit(tmp_path, recipe, "one", 1, 2 * local)
    assert ddp["global_step"] == one["global_step"]
    for key, value in one["state_dict"].items():
        if "running_" in key or "num_batches_tracked" in key:
            continue
        if value.is_floating_point():
            torch.testing.assert_close(ddp["state_dict"][key], value, rtol=1e-4, atol=2e-5, msg=key)
        else:
            assert torch.equal(ddp["state_dict"][key], value), key
    if recipe.startswith("feasible"):
        lam = {name: next(v for k, v in c["callbacks"].items() if k.startswith("FeasibleLearning"))["lam"]
               for name, c in (("ddp", ddp), ("one", one))}
        init = 1.0 if recipe == "feasible_dpo_toy" else 0.0  # the authors' DPO setting starts every lambda at 1
        assert int((lam["one"] != init).sum()) > 50
        torch.testing.assert_close(lam["ddp"], lam["one"], rtol=1e-4, atol=1e-5)
    if recipe == "cbsom_digits":
        som = {name: next(v for k, v in c["callbacks"].items() if k.startswith("SelfOrganizingMap"))
               for name, c in (("ddp", ddp), ("one", one))}
        assert som["ddp"]["distinct"] == som["one"]["distinct"]  # the same BMUs were chosen
