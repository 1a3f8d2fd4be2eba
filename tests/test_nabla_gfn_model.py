"""Nabla-GFlowNet recipes end to end on CPU: a short alignment moves the reward up and writes its report, a resumed
run equals an uninterrupted one (the sampling seeds and the lagged trajectories included), LoRA trains only the
adapters, and bad input stops with one line."""
import csv

import pytest
import torch

from recipes.cli import main
from tests.helpers import one_line_error, run_dir_args, tiny_prior


@pytest.fixture(scope="module")
def ring_prior(tmp_path_factory):
    """A rough ring prior (800 steps, about 8 s; on-support about 0.67 against 0.96 after the recipe's 3,000)."""
    root = tmp_path_factory.mktemp("prior")
    assert main(["fit", "--config", "recipes/diffusion_prior_ring.yaml", *run_dir_args(root),
                 "--trainer.max_steps=800", "--trainer.limit_val_batches=0", "--data.init_args.batch_size=256",
                 "--data.init_args.n_train=20000"]) == 0
    return str(root)


def _align(root, prior, recipe="nabla_gfn_ring", *extra):
    return main(["fit", "--config", f"recipes/{recipe}.yaml", *run_dir_args(root),
                 f"--model.init_args.prior_ckpt={prior}", "--model.init_args.eval_samples=500", *extra])


def test_short_alignment_moves_the_reward_up_and_writes_its_report(ring_prior, tmp_path):
    assert _align(tmp_path, ring_prior, "nabla_gfn_ring", "--trainer.max_steps=60", "--trainer.val_check_interval=30",
                  "--model.init_args.batch_size=64") == 0
    run = tmp_path / "logs" / "version_0"
    rows = list(csv.DictReader(open(run / "alignment_metrics.csv")))
    assert [r["step"] for r in rows] == ["pretrained", "target", "30", "60"]
    pre, target, last = rows[0], rows[1], rows[-1]
    assert float(last["reward"]) > float(pre["reward"]) + 0.5, (pre, last)
    assert float(last["tv"]) < float(pre["tv"]) - 0.05
    assert float(last["on_support"]) > float(pre["on_support"]) - 0.15  # still mostly on the prior's ring
    assert float(target["reward"]) > float(last["reward"])  # the exact target is not yet reached
    for name in ("reward_vs_diversity.png", "samples.png", "samples.csv", "metrics.csv"):
        assert (run / name).stat().st_size > 0, name


@pytest.mark.parametrize("recipe, extra", [("nabla_gfn_ring", ["--model.init_args.sample_lag=1"]),
                                           ("draft_ring", [])])  # ReFL shares DRaFT's loop
def test_resume_equals_uninterrupted(recipe, extra, ring_prior, tmp_path):
    common = ["--trainer.val_check_interval=3", "--checkpoint.every_n_train_steps=3", "--model.init_args.batch_size=16",
              "--model.init_args.eval_samples=64", *extra]
    assert _align(tmp_path / "straight", ring_prior, recipe, "--trainer.max_steps=6", *common) == 0
    assert _align(tmp_path / "resumed", ring_prior, recipe, "--trainer.max_steps=3", *common) == 0
    assert _align(tmp_path / "resumed", ring_prior, recipe, "--trainer.max_steps=6", "--ckpt_path=last", *common) == 0
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 6
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert a["eval_history"] == b["eval_history"]
    if "nabla_gfn_lagged" in a:
        assert torch.equal(a["nabla_gfn_lagged"]["states"], b["nabla_gfn_lagged"]["states"])


def test_lora_trains_only_the_adapters_on_the_digits_unet(tmp_path):
    prior = tiny_prior(tmp_path, "digits")
    assert main(["fit", "--config", "recipes/nabla_gfn_digits.yaml", *run_dir_args(tmp_path / "run"),
                 f"--model.init_args.prior_ckpt={prior}", "--model.init_args.eval_samples=32",
                 "--model.init_args.reference_samples=64",
                 "--model.init_args.batch_size=4", "--trainer.max_steps=2", "--trainer.val_check_interval=2"]) == 0
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    lora = [k for k in state if "lora_" in k and k.startswith("policy.")]
    assert any(".attentions." in k for k in lora) and any(".resnets." in k for k in lora)
    moved = {k for k in lora if "lora_B" in k and state[k].abs().sum() > 0}
    assert moved  # B starts at zero and was trained
    for key, value in state.items():  # every base weight of the policy is still the prior's
        if key.startswith("policy.") and "lora_" not in key:
            base = "prior." + key[len("policy."):].replace(".base_layer", "")
            assert torch.equal(value, state[base]), key
    assert any(k.startswith("flow.") for k in state)


@pytest.mark.parametrize("extra, needle", [
    (["--model.init_args.beta=-1"], "model.beta (the reward temperature) must be >= 0, got -1"),
    (["--model.init_args.scheduler=euler"], "scheduler 'euler' is not one of ddpm, ddim"),
    (["--model.init_args.scheduler=ddpm"], "are deterministic (sigma = 0)"),
    (["--model.init_args.prior_ckpt={digits}"], "was trained on task 'digits' (samples of shape [1, 8, 8]); task "
                                                "'ring' needs samples of shape [2]"),
    (["--model.init_args.prior_ckpt={tmp}/nowhere"],
     "nowhere not found: train it first (python -m recipes fit --config recipes/diffusion_prior_ring.yaml)"),
    (["--model.init_args.reward={{kind: folder, path: {tmp}/no_reward}}"], "no_reward does not exist"),
    (["--model.init_args.gamma=cube"], "model.gamma 'cube' is not one of squared, sqrt"),
    (["--data.init_args.task=digits"], "data.task 'digits' and model.task 'ring' differ"),
    (["--model.init_args.batch_size=0"], "model.batch_size must be >= 1, got 0")])
def test_bad_input_is_one_line(extra, needle, ring_prior, tmp_path, capsys):
    digits = tiny_prior(tmp_path, "digits") if any("{digits}" in e for e in extra) else ""
    extra = [e.format(tmp=tmp_path, digits=digits) for e in extra]
    capsys.readouterr()
    assert _align(tmp_path / "run", ring_prior, "nabla_gfn_ring", "--trainer.max_steps=1", *extra) == 2
    assert needle in one_line_error(capsys)


def test_micro_batches_of_transitions_give_the_same_update(ring_prior):
    from lightning_modules.nabla_gfn import NablaGFN

    grads, losses = [], []
    for micro in (None, 7):
        torch.manual_seed(0)  # the same g_phi
        model = NablaGFN(task="ring", prior_ckpt=ring_prior, batch_size=16, micro_batch=micro,
                         weighting="eps").double()
        out = model.alignment_loss()
        assert out["accumulated"] == (micro is not None)
        if not out["accumulated"]:
            out["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        losses.append(float(out["loss"]))
    assert set(grads[0]) == set(grads[1]) and any(n.startswith("flow.") for n in grads[0])
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], rtol=1e-9, atol=1e-12), name
    assert losses[0] == pytest.approx(losses[1], rel=1e-10)


def test_stable_diffusion_layout_folder_aligns_and_reports(tmp_path):
    from tests.helpers import recipe_data_args

    args = recipe_data_args("recipes/nabla_gfn_sd.yaml", tmp_path)
    assert main(["fit", "--config", "recipes/nabla_gfn_sd.yaml", *run_dir_args(tmp_path / "run"), *args,
                 "--trainer.max_steps=2", "--trainer.val_check_interval=2",
                 "--model.init_args.prompts=[cat, dog]"]) == 0
    run = tmp_path / "run" / "logs" / "version_0"
    rows = list(csv.DictReader(open(run / "alignment_metrics.csv")))
    assert [r["step"] for r in rows] == ["pretrained", "2"] and float(rows[1]["pair_dist"]) > 0
    assert (run / "samples.png").stat().st_size > 0 and (run / "reward_vs_diversity.png").stat().st_size > 0
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert "nabla_gfn_lagged" in state and "prompts" in state["nabla_gfn_lagged"]
    assert main(["predict", "--config", "recipes/nabla_gfn_sd.yaml", *run_dir_args(tmp_path / "run"), *args,
                 "--ckpt_path=last", "--data.init_args.predict_batches=1", "--model.init_args.prompts=[cat, dog]"]) == 0
    preds = list(csv.DictReader(open(sorted((tmp_path / "run").glob("logs/version_*/predictions.csv"))[-1])))
    assert len(preds) == 2 and {p["prompt"] for p in preds} <= {"cat", "dog"}


def test_ddpo_option_is_reinforce_at_ratio_one_in_float64(ring_prior):
    from lightning_modules.nabla_gfn_baselines import DDPO

    model = DDPO(task="ring", prior_ckpt=ring_prior, batch_size=8, timestep_fraction=0.2).double()
    with torch.no_grad():
        for p in model.policy.parameters():  # a policy away from the prior
            p.add_(0.01 * torch.randn_like(p))
    out = model.alignment_loss()
    got = torch.autograd.grad(out["loss"], list(model.policy.parameters()))
    # the same trajectories and steps again (the generator is seeded by the step), REINFORCE by hand
    from lightning_modules.nabla_gfn import subsample_steps

    g = model.generator()
    traj = model.sample(8, g, keep=True)
    log_r = model.reward(traj["x"])
    adv = ((log_r - log_r.mean()) / (log_r.std() + 1e-8)).clamp(-5, 5)
    steps = subsample_steps(model.chain.num_steps, 8, 0.2, g)
    total = 0.0
    for b in range(8):
        for k in steps[b].tolist():
            x_t, x_prev = traj["states"][k, b:b + 1], traj["states"][k + 1, b:b + 1]
            kk = torch.tensor([k])
            mu = model.chain.mean(x_t, model.policy(x_t, model.chain.timesteps[kk]), kk)
            logp = -((x_prev - mu) ** 2).sum() / (2 * model.chain.var[k])
            total = total - adv[b] * logp
    want = torch.autograd.grad(total / steps.numel(), list(model.policy.parameters()))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)
    assert out["loss"].item() == pytest.approx(-adv.mean().item(), abs=1e-9)  # ratio 1
