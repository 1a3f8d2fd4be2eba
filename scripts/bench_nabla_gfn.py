"""What one alignment iteration costs (spec nabla_gfn.md 4.1): residual Nabla-DB against DRaFT-1 and ReFL at equal
batch on the same prior, where Nabla-DB's time goes (sampling the trajectories, the loss terms -- of which the
reward gradients through x0_hat -- and backward + update), and the thread setting.  Times are medians of
interleaved repetitions in one process, reported as ratios (to DRaFT-1's iteration; for threads, 2 threads to 1);
the table goes to docs/performance.md (section ``nabla_gfn``).

    python scripts/bench_nabla_gfn.py [--tiers ring digits] [--batch 64] [--reps 5]

Each tier's prior comes from ``--prior-<tier>`` (a DiffusionPrior run folder; default: the compare script's priors
under runs/nabla_gfn_compare, trained here briefly when absent: a timing needs a network of the right shape, not a
good one).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts._report import fit_run, interleaved_times, update_section  # noqa: E402

DOCS = ROOT / "docs" / "performance.md"


def ensure_prior(tier: str, folder: Path) -> Path:
    if not (folder / "checkpoints" / "last.ckpt").exists():
        fit_run([f"recipes/diffusion_prior_{tier}.yaml"], folder, ["--trainer.max_steps=20",
                                                                   "--trainer.limit_val_batches=0"])
    return folder


def models(tier: str, prior: Path, batch: int):
    from lightning_modules.nabla_gfn import NablaGFN
    from lightning_modules.nabla_gfn_baselines import DRaFT, ReFL

    common = {"task": tier, "prior_ckpt": str(prior), "batch_size": batch}
    if tier == "digits":
        common["lora_rank"] = 8
    flow = {"flow_net": {"kind": "unet", "block_out_channels": [16, 32], "layers_per_block": 1, "attention": True,
                         "norm_num_groups": 4}} if tier == "digits" else {}
    return {"Nabla-DB": NablaGFN(**common, **flow, weighting="eps"), "DRaFT-1": DRaFT(**common),
            "ReFL": ReFL(**common)}


def iteration(model, opt):
    def step():
        out = model.alignment_loss()
        opt.zero_grad()
        out["loss"].backward()
        for group in opt.param_groups:
            torch.nn.utils.clip_grad_norm_(group["params"], 1.0)
        opt.step()
    return step


def parts(model, batch: int):
    """Nabla-DB's iteration in pieces: sampling; the loss terms; the reward gradients alone; backward + step."""
    from lightning_modules.nabla_gfn import nabla_db_losses, subsample_steps

    g = torch.Generator().manual_seed(0)
    opt = model.configure_optimizers()
    data = model.sample(batch, g, keep=True)
    steps = subsample_steps(model.chain.num_steps, batch, model.hparams.timestep_fraction, g)
    rows = torch.arange(batch)[:, None].expand_as(steps).reshape(-1)
    k = steps.reshape(-1)
    x_t, x_prev, eps_old = data["states"][k, rows], data["states"][k + 1, rows], data["eps"][k, rows]

    def loss():
        return nabla_db_losses(model.chain, model.policy, model.prior, model.flow, model.reward, x_t, x_prev, eps_old,
                               k, 1.0, weighting="eps")

    def reward_grads():
        for x, j in ((x_t, k), (x_prev, k + 1)):
            x = x.detach().requires_grad_(True)
            x0 = model.chain.x0_hat(x, model.policy(x, model.chain.state_timestep(j)), j)
            torch.autograd.grad(model.reward(x0).sum(), x)

    def backward_step():
        out = loss()
        total = out["fwd"] + out["rev"] + out["terminal"]
        opt.zero_grad()
        total.backward()
        opt.step()

    return {"sampling": lambda: model.sample(batch, g, keep=True), "loss terms": loss,
            "reward gradients (in the loss terms)": reward_grads, "loss + backward + step": backward_step}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiers", nargs="+", default=["ring", "digits"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prior-ring", type=Path, default=ROOT / "runs" / "nabla_gfn_compare" / "prior_ring")
    ap.add_argument("--prior-digits", type=Path, default=ROOT / "runs" / "nabla_gfn_compare" / "prior_digits")
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args(argv)
    lines = ["## Nabla-GFlowNet: one alignment iteration", "",
             f"`python scripts/bench_nabla_gfn.py --batch {args.batch} --reps {args.reps}`: medians of {args.reps} "
             "interleaved repetitions in one process; Nabla-DB trains 5 transitions per trajectory "
             "(`timestep_fraction` 0.1 of 49 steps, the terminal one included).", ""]
    for tier in args.tiers:
        prior = ensure_prior(tier, getattr(args, f"prior_{tier}"))
        torch.set_num_threads(1)
        ms = models(tier, prior, args.batch)
        fns = {name: iteration(m, m.configure_optimizers()) for name, m in ms.items()}
        t = interleaved_times(fns, args.reps)
        lines += [f"### {tier} tier (batch {args.batch}, 1 thread)", "",
                  "| method | s / iteration | ratio to DRaFT-1 |", "| --- | --- | --- |"]
        lines += [f"| {name} | {t[name]:.3f} | {t[name] / t['DRaFT-1']:.2f} |" for name in fns]
        pt = interleaved_times(parts(ms["Nabla-DB"], args.batch), args.reps)
        lines += ["", "| Nabla-DB part | s | share of the iteration |", "| --- | --- | --- |"]
        lines += [f"| {name} | {sec:.3f} | {sec / t['Nabla-DB']:.2f} |" for name, sec in pt.items()]

        def with_threads(n, fn=fns["Nabla-DB"]):
            def run():
                torch.set_num_threads(n)
                fn()
            return run

        tt = interleaved_times({"1": with_threads(1), "2": with_threads(2)}, args.reps)
        torch.set_num_threads(1)
        lines += ["", f"Threads: a Nabla-DB iteration with 2 threads takes {tt['2'] / tt['1']:.2f}x the time with 1 "
                  f"({tt['1']:.3f} s vs {tt['2']:.3f} s). The comparison script runs two runs at a time with one "
                  "thread each.", ""]
        print("\n".join(lines[-12:]), flush=True)
    text = "\n".join(lines)
    print(text)
    if not args.no_docs:
        update_section("nabla_gfn", text, DOCS)


if __name__ == "__main__":
    main()
