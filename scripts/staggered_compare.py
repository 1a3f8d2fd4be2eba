"""Return against inference time, sequential vs staggered asynchronous interaction, MinAtar Freeway in virtual time
(Riemer et al., ICLR 2025; spec staggered_async.md section 4.2, points 3 and 4).  Numbers go to docs/results.md,
plots and CSVs to ``--out``.

    python scripts/staggered_compare.py --part fixed      # fixed policies, k = 1..16 (seconds per cell)
    python scripts/staggered_compare.py --part trained    # DQN trained under each delay, k = 1, 4, 8 x 3 seeds

``fixed``: the spec's protocol (sticky actions 0, the environment seeded once with 0, 20 consecutive episodes, noop
default): the state-independent ``always_up`` policy (isolates inaction regret), a ``car_aware`` heuristic that
reads the stale observation (adds delay regret), and the all-noop and uniform-random baselines; sequential (one
worker, an action every k frames) against staggered (N_I = k workers).

``trained``: the shipped recipes ``realtime_dqn_freeway_{sequential,staggered}`` (DQN, ``--frames`` frames, updates
every 4 frames in both modes), staggered with N_I = k.  Each final greedy policy (epsilon 0.001) is scored over 20
episodes in the mode and delay it was trained in, and the k = 1 policies again at every k in both modes (a fixed
trained policy).  Checks: staggered > sequential at k >= 4 (mean over seeds), and sequential at k = 8 within noise of
noop (its mean return <= the noop baseline + 2 standard errors over seeds + 1).  Runs already finished in ``--out``
are reused; ``--jobs`` processes at a time, one thread each.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts._report import fit_run, write_checked_section  # noqa: E402

RESULTS = ROOT / "docs" / "results.md"
ENV = "MinAtar/Freeway-v1"


def freeway_env():
    from datamodules.envs import make_vector_env

    return make_vector_env(ENV, 1, env_kwargs={"sticky_action_prob": 0.0})


def simulator(mode: str, k: int, default: str = "noop", seed: int = 0):
    from datamodules.realtime_env import RealtimeSimulator

    return RealtimeSimulator(3, k, 1 if mode == "sequential" else k, mode, default, seed=seed)


def car_aware(obs: np.ndarray) -> int:
    """Up (1) unless a car is within one cell of the chicken's column in the lane above; else noop (0)."""
    rows = np.flatnonzero(obs[:, 4, 0])
    if not len(rows):
        return 1
    above = int(rows[0]) - 1
    if above < 0:
        return 1
    return 0 if obs[above, 3:6, 1].any() else 1


def fixed_policies(seed: int = 0) -> Dict[str, Callable[[np.ndarray], int]]:
    rng = np.random.default_rng(seed)
    return {"always_up": lambda o: 1, "car_aware": car_aware, "noop": lambda o: 0,
            "random": lambda o: int(rng.integers(3))}


def play(act, mode: str, k: int, episodes: int = 20, seed: int = 0) -> Dict[str, float]:
    from datamodules.realtime_env import play_realtime_episodes

    env = freeway_env()
    try:
        out = play_realtime_episodes(env, simulator(mode, k, seed=seed), act, episodes, seed)
    finally:
        env.close()
    r = out["returns"].numpy()
    return {"return": float(r.mean()), "se": float(r.std(ddof=1) / np.sqrt(len(r))) if len(r) > 1 else 0.0,
            "act_fraction": float(out["act_fraction"].mean())}


# ---------------------------------------------------------------------------------------------------- fixed policies
def fixed_part(ks: List[int], episodes: int, out: Path) -> str:
    rows = []
    for name in ("always_up", "car_aware"):
        for k in ks:
            row = {"policy": name, "k": k}
            for mode in ("sequential", "staggered"):
                res = play(fixed_policies()[name], mode, k, episodes)
                row.update({f"{mode}_{key}": v for key, v in res.items()})
            rows.append(row)
            print(f"{name:9s} k={k:2d}: sequential {row['sequential_return']:5.2f} "
                  f"({row['sequential_act_fraction']:.2f})"
                  f"  staggered {row['staggered_return']:5.2f} ({row['staggered_act_fraction']:.2f})", flush=True)
    baselines = {name: play(fixed_policies()[name], "staggered", 1, episodes)["return"] for name in ("noop", "random")}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "fixed_policies.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    _plot_fixed(rows, baselines, out)
    up = {r["k"]: r for r in rows if r["policy"] == "always_up"}
    verdict = {"sequential_falls_toward_noop": up[max(ks)]["sequential_return"] <= baselines["noop"] + 1.0
               and all(up[a]["sequential_return"] >= up[b]["sequential_return"] for a, b in zip(ks, ks[1:])),
               "staggered_near_k1_up_to_k8": all(abs(up[k]["staggered_return"] - up[1]["staggered_return"])
                                                 <= 2 * max(up[k]["staggered_se"], up[1]["staggered_se"])
                                                 for k in ks if k <= 8)}
    lines = ["### Fixed policies in virtual time, MinAtar Freeway", "",
             "`python scripts/staggered_compare.py --part fixed` (sticky actions 0, the environment seeded once "
             "with 0, "
             f"{episodes} consecutive episodes, noop default).  Return (act fraction = agent actions per frame); "
             "sequential: one inference worker, staggered: N_I = k workers.  Baselines: all-noop "
             f"{baselines['noop']:.2f}, uniform random {baselines['random']:.2f}.", "",
             "| policy | k | sequential return | sequential act/frame | staggered return | staggered act/frame |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['k']} | {r['sequential_return']:.2f} ± {r['sequential_se']:.2f} | "
                     f"{r['sequential_act_fraction']:.3f} | {r['staggered_return']:.2f} ± {r['staggered_se']:.2f} | "
                     f"{r['staggered_act_fraction']:.3f} |")
    lines += ["", "± is one standard error over episodes.  The spec's prototype measured, for always-up, sequential "
              "18.6 / 6.3 / 6.3 / 1.9 / 0.2 and staggered 18.6 x 4 / 11.7 at k = 1 / 2 / 4 / 8 / 16 (its own "
              "simulator, not the paper's numbers).", ""]
    shutil.copy(out / "fixed_policies.png", RESULTS.parent / "realtime_fixed_policies.png")
    lines += ["", "![fixed policies: return against k](realtime_fixed_policies.png)", ""]
    return write_checked_section("realtime_fixed", lines, verdict, RESULTS)


def _plot_fixed(rows: List[dict], baselines: Dict[str, float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, name in zip(axes, ("always_up", "car_aware")):
        sub = [r for r in rows if r["policy"] == name]
        ks = [r["k"] for r in sub]
        for mode in ("sequential", "staggered"):
            ax.errorbar(ks, [r[f"{mode}_return"] for r in sub], yerr=[r[f"{mode}_se"] for r in sub], marker="o",
                        capsize=3, label=mode)
        for b, v in baselines.items():
            ax.axhline(v, ls=":", color="grey")
            ax.text(ks[0], v, b, fontsize=8, va="bottom")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("inference time k (frames)")
        ax.set_ylabel("episode return")
        ax.set_title(f"Freeway, fixed policy {name}", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "fixed_policies.png", dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- trained DQN
def load_policy(run_dir: Path):
    import torch

    from lightning_modules.realtime_dqn import RealtimeDQN

    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    hp = {k: v for k, v in state["hyper_parameters"].items() if not k.startswith("_")}
    agent = RealtimeDQN(**hp)
    agent.build(**state["value_network"])
    agent.load_state_dict(state["state_dict"])
    agent.eval()
    rng = np.random.default_rng(0)

    def act(obs: np.ndarray) -> int:
        if rng.random() < 0.001:
            return int(rng.integers(3))
        with torch.no_grad():
            return int(agent.greedy_actions(torch.as_tensor(obs[None]))[0])
    return act


def run_one(mode: str, k: int, seed: int, frames: int, out: Path) -> Dict[str, object]:
    run_dir = out / f"{mode}_k{k}_s{seed}"
    logs = run_dir / "logs" / "version_0"
    if not (logs / "done").exists():
        args = [f"--seed_everything={seed}", f"--trainer.max_epochs={max(1, frames // 10_000)}",
                f"--data.init_args.inference_frames={k}", "--data.init_args.eval_episodes=0"]
        if mode == "staggered":
            args.append(f"--data.init_args.n_workers={k}")
        _, seconds = fit_run([f"recipes/realtime_dqn_freeway_{mode}.yaml"], run_dir, args)
        (logs / "done").write_text(f"{seconds:.1f}\n")
    seconds = float((logs / "done").read_text())
    with open(logs / "episodes.csv") as fh:
        episodes = [(float(r["env_steps"]), float(r["return"])) for r in csv.DictReader(fh)]
    act = load_policy(run_dir)
    result = {"mode": mode, "k": k, "seed": seed, "seconds": seconds, "episodes": episodes,
              "final": play(act, mode, k)["return"], "transfer": {}}
    if k == 1 and mode == "staggered":  # the k = 1 policy, fixed, at every delay in both modes
        for kk in (1, 2, 4, 8, 16):
            for m in ("sequential", "staggered"):
                result["transfer"][(m, kk)] = play(load_policy(run_dir), m, kk)["return"]
    return result


def trained_part(ks: List[int], seeds: List[int], frames: int, jobs: int, out: Path,
                 section: str = "realtime_trained") -> str:
    os.environ["OMP_NUM_THREADS"] = "1"
    todo = [(m, k, s) for s in seeds for k in ks for m in (("staggered",) if k == 1 else ("sequential", "staggered"))]
    with ThreadPoolExecutor(jobs) as pool:
        results = [f.result() for f in [pool.submit(run_one, *job, frames, out) for job in todo]]
    for r in results:
        print(f"{r['mode']:10s} k={r['k']} seed {r['seed']}: greedy return {r['final']:.2f} ({r['seconds']:.0f} s)")
    noop = play(fixed_policies()["noop"], "staggered", 1)["return"]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "trained.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["mode", "k", "seed", "greedy_return", "seconds"])
        w.writerows([r["mode"], r["k"], r["seed"], f"{r['final']:.4g}", f"{r['seconds']:.0f}"] for r in results)

    def cell(mode: str, k: int) -> List[float]:
        m = "staggered" if k == 1 else mode  # k = 1: both modes are the same run
        return [r["final"] for r in results if r["mode"] == m and r["k"] == k]

    def stat(v: List[float]) -> str:
        se = statistics.stdev(v) / len(v) ** 0.5 if len(v) > 1 else 0.0
        return f"{statistics.fmean(v):.2f} ± {se:.2f} ({', '.join(f'{x:.1f}' for x in v)})"
    def late(mode: str, k: int) -> List[float]:  # mean training-episode return over the last fifth of the frames
        m = "staggered" if k == 1 else mode
        return [statistics.fmean([ret for f, ret in r["episodes"] if f > 0.8 * frames] or [float("nan")])
                for r in results if r["mode"] == m and r["k"] == k]

    verdict = {}
    for k in ks:
        if k >= 4:
            verdict[f"staggered_gt_sequential_k{k}"] = statistics.fmean(cell("staggered", k)) > statistics.fmean(
                cell("sequential", k))
            verdict[f"staggered_gt_sequential_k{k}_late_training"] = statistics.fmean(
                late("staggered", k)) > statistics.fmean(late("sequential", k))
    if 8 in ks:
        s8 = cell("sequential", 8)
        se = statistics.stdev(s8) / len(s8) ** 0.5 if len(s8) > 1 else 0.0
        verdict["sequential_k8_within_noise_of_noop"] = statistics.fmean(s8) <= noop + 2 * se + 1.0
    _plot_trained(results, ks, noop, out)
    lines = ["### DQN trained under inference delay, MinAtar Freeway (virtual time)", "",
             f"`python scripts/staggered_compare.py --part trained --ks {' '.join(map(str, ks))} --seeds "
             f"{' '.join(map(str, seeds))} --frames {frames}` (the shipped recipes, {frames:,} frames per run, an "
             "update every 4 frames in both modes; staggered with N_I = k).  Greedy return of the final policy "
             "(epsilon 0.001) over 20 episodes in the mode "
             "and delay it was trained in, and the mean return of the training episodes (epsilon 0.01) over the "
             "last "
             "fifth of the frames; mean ± standard error over seeds (per seed).  "
             f"All-noop baseline {noop:.2f}.",
             "", "| k | sequential, greedy | staggered, greedy | sequential, late training "
             "| staggered, late training |",
             "|---|---|---|---|---|"]
    for k in ks:
        lines.append(f"| {k} | {stat(cell('sequential', k))} | {stat(cell('staggered', k))} | "
                     f"{stat(late('sequential', k))} | {stat(late('staggered', k))} |")
    transfer = [r for r in results if r["transfer"]]
    if transfer:
        lines += ["", "The k = 1 policies, fixed, played at other delays (mean over seeds):", "",
                  "| k | sequential | staggered |", "|---|---|---|"]
        for kk in (1, 2, 4, 8, 16):
            lines.append(f"| {kk} | " + " | ".join(f"{statistics.fmean(r['transfer'][(m, kk)] for r in transfer):.2f}"
                                                 for m in ("sequential", "staggered")) + " |")
    shutil.copy(out / "trained.png", RESULTS.parent / f"{section}.png")
    lines += ["", f"![DQN trained under delay: final return and training curves]({section}.png)", ""]
    return write_checked_section(section, lines, verdict, RESULTS)


def _plot_trained(results: List[dict], ks: List[int], noop: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for mode in ("sequential", "staggered"):
        means = [statistics.fmean(r["final"] for r in results
                                  if r["k"] == k and r["mode"] == ("staggered" if k == 1 else mode)) for k in ks]
        axes[0].plot(ks, means, marker="o", label=mode)
        for r in results:
            if r["mode"] == mode and r["k"] > 1 or r["k"] == 1:
                axes[0].scatter([r["k"]], [r["final"]], s=8, color="k")
    axes[0].axhline(noop, ls=":", color="grey", label="noop")
    axes[0].set_xlabel("inference time k (frames)")
    axes[0].set_ylabel("greedy return (20 episodes)")
    axes[0].set_title("DQN trained under delay", fontsize=10)
    axes[0].legend(fontsize=8)
    for r in results:
        ep = np.array(r["episodes"])
        if len(ep) >= 5:  # a running mean of 5 episodes (no edge effects)
            ls = "-" if r["mode"] == "staggered" else "--"
            axes[1].plot(ep[4:, 0], np.convolve(ep[:, 1], np.ones(5) / 5, mode="valid"), ls, lw=0.8,
                         color=f"C{ks.index(r['k'])}", label=f"{r['mode']} k={r['k']}" if r["seed"] == 0 else None)
    axes[1].set_xlabel("frames")
    axes[1].set_ylabel("training episode return")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "trained.png", dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["fixed", "trained"], default="fixed")
    ap.add_argument("--ks", type=int, nargs="+", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--frames", type=int, default=200_000, help="frames per training run (a multiple of 10k)")
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "staggered_compare")
    ap.add_argument("--section", default="realtime_trained", help="docs/results.md section of the trained part")
    args = ap.parse_args()
    if args.part == "fixed":
        print(fixed_part(args.ks or [1, 2, 4, 8, 16], args.episodes, args.out))
    else:
        print(trained_part(args.ks or [1, 4, 8], args.seeds, args.frames, args.jobs, args.out, args.section))


if __name__ == "__main__":
    main()
