"""SoftMoE tokenization against the flattened baseline (Sokar et al., ICLR 2025; spec softmoe_tokenize.md section 3):
arms x seeds x MinAtar games with the shipped recipes, final returns with bootstrap intervals, return curves; the
numbers go to docs/results.md (section ``softmoe``), plots and CSVs to ``--out``.

    python scripts/softmoe_compare.py                                    # 3 arms x 3 seeds x 2 games, 100k steps
    python scripts/softmoe_compare.py --arms flatten_x4 softmoe1_x4 --seeds 0 1 2 --games Breakout-v1
    python scripts/softmoe_compare.py --setting c51_nstep3 --section softmoe_c51   # the spec's "fair chance"

Arms: ``flatten_x1`` (1,600 -> 64), ``flatten_x4`` (the scaled baseline, 1,600 -> 256), ``softmoe1_x4`` (the claim
arm: one expert 16 -> 256 -> 16 over 100 PerConv tokens), ``softmoe4`` (4 experts 16 -> 64 -> 16),
``softmoe1_persample_x4`` (one token: the baseline plus a projection, the control that isolates tokenization).
Settings: ``dqn`` (the recipes as shipped), ``c51_nstep3`` (C51 with 51 atoms in [-10, 10] and 3-step returns, the
spec's "fair chance" for the single expert: the paper ties it to Rainbow's / DER's categorical loss), ``rr1`` (one
update per environment step, four times the recipes' replay ratio, target copied every 4k environment steps as in
the recipes) and ``c51_nstep3_rr1`` (both: the closest to DER's setting).

The final return of a run is the mean return of the training episodes that ended in its last 10% of environment
steps (epsilon = 0.01 there); per game and arm the mean and IQM over seeds with 95% bootstrap intervals.  The check
is the issue's: mean(softmoe1_x4) >= mean(flatten_x4) on every game.  Runs already finished in ``--out`` are reused,
so seeds can be added later.  ``--jobs`` processes at a time, one thread each.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts._report import fit_run, write_checked_section  # noqa: E402

RESULTS = ROOT / "docs" / "results.md"
ARMS = {"flatten_x1": ("dqn_flatten_minatar", ["--model.init_args.scale=1"]),
        "flatten_x4": ("dqn_flatten_minatar", []),
        "softmoe1_x4": ("dqn_softmoe1_minatar", []),
        "softmoe4": ("dqn_softmoe4_minatar", []),
        "softmoe1_persample_x4": ("dqn_softmoe1_minatar", ["--model.init_args.tokenization=per_sample"])}
SETTINGS = {"dqn": [],
            "c51_nstep3": ["--model.init_args.distributional=true", "--data.init_args.n_step=3"],
            # one update per environment step; the target network is still copied every 4k environment steps
            "rr1": ["--data.init_args.update_period=1", "--model.init_args.target_update_period=4000"],
            "c51_nstep3_rr1": ["--model.init_args.distributional=true", "--data.init_args.n_step=3",
                               "--data.init_args.update_period=1", "--model.init_args.target_update_period=4000"]}


_SEEDING = threading.Lock()


def run_one(arm: str, game: str, seed: int, steps: int, setting: str, out: Path) -> Dict[str, object]:
    recipe, extra = ARMS[arm]
    name = f"{setting}_{game}_{arm}_s{seed}"
    run_dir = out / name
    logs = run_dir / "logs" / "version_0"
    epochs = max(1, steps // 10_000)
    if not (logs / "done").exists():
        args = [f"--seed_everything={seed}", f"--data.init_args.env_id=MinAtar/{game}",
                f"--trainer.max_epochs={epochs}", *extra, *SETTINGS[setting]]
        _, seconds = fit_run([f"recipes/{recipe}.yaml"], run_dir, args)
        (logs / "done").write_text(f"{seconds:.1f}\n")
    seconds = float((logs / "done").read_text())
    with open(logs / "episodes.csv") as fh:
        episodes = [(float(r["env_steps"]), float(r["return"])) for r in csv.DictReader(fh)]
    total = epochs * 10_000
    last = [r for s, r in episodes if s > 0.9 * total] or [episodes[-1][1]]
    with _SEEDING:  # building the initial network seeds torch's global generator, shared by the worker threads
        routing = routing_stats(run_dir, seed)
    return {"arm": arm, "game": game, "seed": seed, "setting": setting, "seconds": seconds,
            "final": statistics.fmean(last), "episodes": episodes, "routing": routing}


def routing_stats(run_dir: Path, seed: int, n: int = 2000) -> Dict[str, float]:
    """How much a SoftMoE head routes, on the last ``n`` stored observations of the final checkpoint, at the final
    and at the initial weights: the dispatch and combine entropies divided by their maxima (1 = uniform weights,
    every slot the mean token) and the spread of the output tokens around their mean relative to their norm (0 = all
    positions get the same vector, so the Q layer cannot tell where things are).  Empty for other heads."""
    import math

    import torch

    from lightning_modules.layers.soft_moe import tokenize
    from lightning_modules.softmoe_dqn import SoftMoEDQN

    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if not ckpt.exists():
        return {}
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    hp = state["hyper_parameters"]
    if hp.get("head") != "softmoe":
        return {}
    obs = state["ReplayDataModule"]["ranks"][0]["buffer"]["obs"][-n:]
    out = {}
    for when in ("initial", "final"):
        agent = SoftMoEDQN(**{**{k: v for k, v in hp.items() if not k.startswith("_")}, "seed": hp.get("seed") or seed})
        agent.build(**state["value_network"])
        if when == "final":
            agent.load_state_dict(state["state_dict"])
        net = agent.online
        with torch.no_grad():
            x = obs.float() * net.input_scale
            x = net.encoder(x.permute(0, 3, 1, 2) if net.channels_last else x)
            tokens = tokenize(x, net.head.tokenization)
            logits = net.head.moe.logits(tokens)
            d = logits.softmax(1)
            c = logits.flatten(2).softmax(-1)
            y = net.head.moe(tokens)
        m, slots = d.shape[1], c.shape[-1]
        out[f"dispatch_entropy_{when}"] = float(-(d * d.clamp_min(1e-12).log()).sum(1).mean() / math.log(m))
        out[f"combine_entropy_{when}"] = float(-(c * c.clamp_min(1e-12).log()).sum(-1).mean() / math.log(slots)) \
            if slots > 1 else 0.0
        out[f"token_spread_{when}"] = float((y - y.mean(1, keepdim=True)).norm(dim=-1).mean() / y.norm(dim=-1).mean())
    return out


def iqm(values: Sequence[float]) -> float:
    v = np.sort(np.asarray(values, dtype=float))
    n = len(v)
    if n < 4:
        return float(v.mean())
    lo, hi = int(np.floor(0.25 * n)), int(np.ceil(0.75 * n))
    return float(v[lo:hi].mean())


def bootstrap(values: Sequence[float], stat=np.mean, reps: int = 5_000, seed: int = 0) -> tuple:
    v = np.asarray(values, dtype=float)
    draws = np.random.default_rng(seed).choice(v, size=(reps, len(v)))
    stats = np.array([stat(d) for d in draws])
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def summarise(results: List[dict]) -> List[dict]:
    rows = []
    for game in sorted({r["game"] for r in results}):
        for arm in ARMS:
            group = [r for r in results if r["game"] == game and r["arm"] == arm]
            if not group:
                continue
            finals = [r["final"] for r in group]
            rows.append({"game": game, "arm": arm, "seeds": len(group), "mean": statistics.fmean(finals),
                         "ci": bootstrap(finals), "iqm": iqm(finals), "finals": finals,
                         "minutes": statistics.fmean(r["seconds"] for r in group) / 60})
    return rows


def checks(rows: List[dict]) -> Dict[str, bool]:
    out = {}
    for game in sorted({r["game"] for r in rows}):
        by = {r["arm"]: r for r in rows if r["game"] == game}
        if "softmoe1_x4" in by and "flatten_x4" in by:
            out[f"softmoe1_x4_mean_ge_flatten_x4_{game}"] = by["softmoe1_x4"]["mean"] >= by["flatten_x4"]["mean"]
    return out


def plots(results: List[dict], out: Path, window: int = 50) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    games = sorted({r["game"] for r in results})
    fig, axes = plt.subplots(1, len(games), figsize=(5.5 * len(games), 4), squeeze=False)
    grid = np.linspace(0, max(s for r in results for s, _ in r["episodes"]), 60)
    for ax, game in zip(axes[0], games):
        for arm in ARMS:
            group = [r for r in results if r["game"] == game and r["arm"] == arm]
            if not group:
                continue
            curves = []
            for r in group:
                ep = np.array(r["episodes"])
                c = np.concatenate([[0.0], np.cumsum(ep[:, 1])])
                idx = np.arange(1, len(ep) + 1)
                smooth = (c[idx] - c[np.maximum(0, idx - window)]) / np.minimum(idx, window)  # trailing mean
                curves.append(np.interp(grid, ep[:, 0], smooth))
            curves = np.array(curves)
            ax.plot(grid, curves.mean(0), label=f"{arm} ({len(group)} seeds)")
            ax.fill_between(grid, curves.min(0), curves.max(0), alpha=0.15)
        ax.set_title(f"MinAtar {game}", fontsize=10)
        ax.set_xlabel("environment steps")
        ax.set_ylabel(f"training episode return (mean of {window})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "return_curves.png", dpi=120)
    plt.close(fig)
    rows = summarise(results)
    fig, axes = plt.subplots(1, len(games), figsize=(5.5 * len(games), 3.6), squeeze=False)
    for ax, game in zip(axes[0], games):
        sub = [r for r in rows if r["game"] == game]
        ax.bar(range(len(sub)), [r["mean"] for r in sub],
               yerr=np.array([[r["mean"] - r["ci"][0], r["ci"][1] - r["mean"]] for r in sub]).T, capsize=3)
        for i, r in enumerate(sub):
            ax.scatter([i] * len(r["finals"]), r["finals"], color="k", s=8, zorder=3)
        ax.set_xticks(range(len(sub)), [r["arm"] for r in sub], rotation=20, fontsize=8)
        ax.set_title(f"MinAtar {game}: final return (95% bootstrap CI)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "final_returns.png", dpi=120)
    plt.close(fig)


def write(results: List[dict], out: Path, command: str, section: str, setting: str, steps: int) -> str:
    rows = summarise(results)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "runs.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["setting", "game", "arm", "seed", "final_return", "seconds"])
        w.writerows([r["setting"], r["game"], r["arm"], r["seed"], f"{r['final']:.4g}", f"{r['seconds']:.0f}"]
                     for r in results)
    plots(results, out)
    verdict = checks(rows)
    lines = [f"### SoftMoE tokenization vs flatten, MinAtar, setting `{setting}`, {steps:,} steps", "",
             f"`{command}` (2-core CPU, one thread per run).  Final return = mean return of the training episodes "
             "in the last 10% of steps; mean and IQM over seeds, 95% bootstrap interval of the mean.", "",
             "| game | arm | seeds | mean | 95% CI | IQM | per seed | minutes/run |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['game']} | {r['arm']} | {r['seeds']} | {r['mean']:.2f} | [{r['ci'][0]:.2f}, "
                     f"{r['ci'][1]:.2f}] | {r['iqm']:.2f} | {', '.join(f'{x:.2f}' for x in r['finals'])} | "
                     f"{r['minutes']:.1f} |")
    lines.append("")
    routed = [r for r in results if r["routing"]]
    if routed:
        lines += ["SoftMoE routing at the end of each run (initial weights in brackets; entropies divided by their "
                  "maximum, 1 = uniform; token spread = mean distance of the output tokens from their mean over their "
                  "norm, 0 = every position gets the same vector):", "",
                  "| game | arm | seed | dispatch entropy | combine entropy | token spread |",
                  "|---|---|---|---|---|---|"]
        for r in sorted(routed, key=lambda r: (r["game"], r["arm"], r["seed"])):
            g = r["routing"]
            lines.append(f"| {r['game']} | {r['arm']} | {r['seed']} | {g['dispatch_entropy_final']:.4f} "
                         f"({g['dispatch_entropy_initial']:.4f}) | {g['combine_entropy_final']:.4f} "
                         f"({g['combine_entropy_initial']:.4f}) | {g['token_spread_final']:.4f} "
                         f"({g['token_spread_initial']:.4f}) |")
        lines.append("")
    return write_checked_section(section, lines, verdict, RESULTS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", nargs="+", default=["flatten_x4", "softmoe1_x4", "softmoe4"], choices=list(ARMS))
    ap.add_argument("--games", nargs="+", default=["Breakout-v1", "SpaceInvaders-v1"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=100_000, help="environment steps per run (a multiple of 10k)")
    ap.add_argument("--setting", default="dqn", choices=list(SETTINGS))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--section", default="softmoe")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "softmoe_compare")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    jobs = [(arm, game, seed) for seed in args.seeds for game in args.games for arm in args.arms]
    # the slow arms first, so the two workers finish together
    jobs.sort(key=lambda j: (j[0].startswith("flatten"), j[2]))
    results = []
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_one, *job, args.steps, args.setting, args.out) for job in jobs]
        for f in futures:
            r = f.result()
            results.append(r)
            print(f"{r['game']:16s} {r['arm']:22s} seed {r['seed']}: final {r['final']:6.2f} ({r['seconds']:.0f} s)",
                  flush=True)
    command = "python scripts/softmoe_compare.py " + " ".join(sys.argv[1:])
    print(write(results, args.out, command.strip(), args.section, args.setting, args.steps))


if __name__ == "__main__":
    main()
