"""SPMA against its baselines, every claim of the spec's small run in one script (spec spma.md 4.2); numbers into
docs/results.md (section ``spma``), plots and CSVs into ``--out``.

    python scripts/spma_compare.py                                  # everything (about 30 min on 2 cores, --jobs 2)
    python scripts/spma_compare.py --parts tabular loglinear        # seconds
    python scripts/spma_compare.py --parts deep --seeds 0 1 2 --envs CartPole-v1

* ``tabular`` (exact advantages, float64): the log-gap curves of SPMA and NPG at eta = 1 - gamma and 0.5 and softmax
  PG at its theory step (1 - gamma)^3 / 8 and a tuned constant on the chain MDP (T = 300), the linear-convergence
  slopes in two disjoint windows, the SPG / SPMA gap ratio at T, SPMA - NPG per-step distance against eta (O(eta^2)),
  and the spec prototype's random MDP at t = 10, 50, 100, 299.
* ``loglinear``: log-linear SPMA with aggregated (2 state groups) and random features: gap curves (linear to a
  plateau) and the projection solved from two starts (convexity).
* ``deep``: ``python -m recipes fit`` of the SPMA / PPO / MDPO recipes on CartPole-v1, Acrobot-v1 and
  InvertedPendulum-v5 over seeds: final return (mean of the last 20 training episodes; and the last deterministic
  evaluation) with bootstrap intervals over seeds, return curves per environment.
* ``eta``: SPMA's sensitivity to eta in {0.3, 1, 3} on CartPole-v1 over the same seeds.

``checks()`` holds the acceptance thresholds; tests/test_spma_claims.py (slow) runs the same functions.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_modules.layers import tabular_mdp as tm  # noqa: E402
from lightning_modules.spma import (features, loglinear_policy, loglinear_spma_projection, npg_update,  # noqa: E402
                                    safe_eta, spma_update, tabular_gaps)
from scripts._report import fit_run, write_checked_section  # noqa: E402

RESULTS = ROOT / "docs" / "results.md"
D = torch.float64
RECIPES = {("CartPole-v1", "spma"): "spma_cartpole", ("CartPole-v1", "ppo"): "ppo_cartpole",
           ("CartPole-v1", "mdpo"): "mdpo_cartpole"}
ENV_RECIPE = {"CartPole-v1": "spma_cartpole", "Acrobot-v1": "spma_acrobot",
              "InvertedPendulum-v5": "spma_inverted_pendulum"}


# ------------------------------------------------------------------------------------------------ tabular
def log_slope(gaps: np.ndarray, lo: int, hi: int) -> float:
    return float(np.polyfit(np.arange(lo, hi), np.log(gaps[lo:hi]), 1)[0])


def tabular(T: int = 300) -> Dict[str, object]:
    mdp = tm.chain(10, 4, 0.1, 0.9)
    theory = (1 - mdp.gamma) ** 3 / 8
    runs = {"SPMA eta=0.1 (1-gamma)": ("spma", 0.1), "SPMA eta=0.5": ("spma", 0.5), "NPG eta=0.1": ("npg", 0.1),
            "NPG eta=0.5": ("npg", 0.5), f"SPG theory alpha={theory:.2e}": ("spg", theory),
            "SPG alpha=10 (tuned)": ("spg", 10.0)}
    curves = {name: tabular_gaps(mdp, m, T, s) for name, (m, s) in runs.items()}
    spma = curves["SPMA eta=0.1 (1-gamma)"]
    slopes = (log_slope(spma, 100, 200), log_slope(spma, 200, 300))
    log_pi = F.log_softmax(torch.randn(8, 4, generator=torch.Generator().manual_seed(1), dtype=D), -1)
    A = tm.evaluate(tm.random_mdp(8, 4, 0.9, seed=3), log_pi.exp())["A"]
    order2 = []
    for eta in (0.08, 0.04, 0.02, 0.01):
        a, _ = spma_update(log_pi, A, eta)
        order2.append((eta, float((a.exp() - npg_update(log_pi, A, eta).exp()).abs().max())))
    proto = tm.random_mdp(20, 4, 0.9, seed=0)
    prototype = {name: tabular_gaps(proto, m, T, s)[[10, 50, 100, 299]].tolist()
                 for name, (m, s) in (("SPMA eta=0.1", ("spma", 0.1)), ("NPG eta=0.1", ("npg", 0.1)),
                                      ("SPMA eta=0.5", ("spma", 0.5)), ("NPG eta=1", ("npg", 1.0)),
                                      ("SPG theory", ("spg", (1 - 0.9) ** 3 / 8)), ("SPG alpha=10", ("spg", 10.0)))}
    return {"curves": curves, "slopes": slopes, "spg_ratio": float(curves[f"SPG theory alpha={theory:.2e}"][-1]
                                                                    / spma[-1]),
            "order2": order2, "prototype": prototype, "T": T}


def loglinear(T: int = 200) -> Dict[str, object]:
    mdp = tm.chain(10, 4, 0.1, 0.9)
    j_star = tm.optimal(mdp)["J"]
    curves, convex = {}, {}
    for name, (kind, dim) in {"aggregated d=8": ("aggregated", 8), "random d=12": ("random", 12),
                              "random d=24": ("random", 24)}.items():
        phi = features(kind, 10, 4, dim)
        theta, gaps = torch.zeros(phi.shape[-1], dtype=D), []
        for t in range(T):
            pi = loglinear_policy(theta, phi).exp()
            ev = tm.evaluate(mdp, pi)
            gaps.append(j_star - ev["J"])
            target = pi * (1 + safe_eta(ev["A"], 0.5) * ev["A"])
            if t == 5 and kind == "random":  # the projection from the current and from a random start
                _, a = loglinear_spma_projection(theta, phi, target, ev["d"])
                start = 3 * torch.randn(phi.shape[-1], generator=torch.Generator().manual_seed(7), dtype=D)
                _, b = loglinear_spma_projection(start, phi, target, ev["d"])
                convex[name] = (a, b)
            theta, _ = loglinear_spma_projection(theta, phi, target, ev["d"])
        curves[name] = np.maximum(np.array(gaps), 1e-300)
    agg = curves["aggregated d=8"]
    return {"curves": curves, "convex": convex, "plateau": float(agg[-1]),
            "plateau_slope": log_slope(np.maximum(agg - agg[-1], 1e-300), 20, 120), "T": T}


# ------------------------------------------------------------------------------------------------ deep
def deep_run(env_id: str, loss: str, seed: int, out: Path, eta: float = 1.0) -> Dict[str, object]:
    recipe = RECIPES.get((env_id, loss), ENV_RECIPE[env_id])
    extra = [f"--seed_everything={seed}", f"--model.init_args.loss={loss}"]
    if loss in ("spma", "mdpo"):
        extra.append(f"--model.init_args.eta={eta}")
    name = f"{env_id}_{loss}_eta{eta}_s{seed}"
    logs, seconds = fit_run([f"recipes/{recipe}.yaml"], out / name, extra)
    with open(logs / "episodes.csv") as fh:
        episodes = [(float(r["env_steps"]), float(r["return"])) for r in csv.DictReader(fh)]
    with open(logs / "evaluation.csv") as fh:
        evaluation = [(float(r["env_steps"]), float(r["return"])) for r in csv.DictReader(fh)]
    return {"env": env_id, "loss": loss, "eta": eta, "seed": seed, "seconds": round(seconds, 1),
            "final": statistics.fmean(r for _, r in episodes[-20:]), "final_eval": evaluation[-1][1],
            "episodes": episodes, "evaluation": evaluation}


def run_all(jobs: Sequence[tuple], out: Path, workers: int) -> List[dict]:
    os.environ.setdefault("OMP_NUM_THREADS", "1" if workers > 1 else os.environ.get("OMP_NUM_THREADS", "2"))
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(deep_run, *job[:3], out, *job[3:]) for job in jobs]
        results = []
        for f in futures:
            r = f.result()
            results.append(r)
            print(f"{r['env']:20s} {r['loss']:5s} eta {r['eta']:<4} seed {r['seed']}: final {r['final']:8.1f} "
                  f"eval {r['final_eval']:8.1f} ({r['seconds']:.0f} s)", flush=True)
    return results


def bootstrap(values: Sequence[float], reps: int = 10_000, seed: int = 0) -> tuple:
    v = np.asarray(values, dtype=float)
    means = np.random.default_rng(seed).choice(v, size=(reps, len(v))).mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summarise(results: List[dict]) -> List[dict]:
    rows = []
    for key in sorted({(r["env"], r["loss"], r["eta"]) for r in results}):
        group = [r for r in results if (r["env"], r["loss"], r["eta"]) == key]
        finals = [r["final"] for r in group]
        rows.append({"env": key[0], "loss": key[1], "eta": key[2], "seeds": len(group),
                     "mean": statistics.fmean(finals), "std": statistics.pstdev(finals),
                     "ci": bootstrap(finals), "eval": statistics.fmean(r["final_eval"] for r in group),
                     "finals": finals})
    return rows


# ------------------------------------------------------------------------------------------------ checks
def checks(tab: dict, ll: dict, deep_rows: List[dict]) -> Dict[str, bool]:
    out = {}
    if tab:
        early, late = tab["slopes"]
        out["spma_log_gap_linear_two_windows"] = early < -0.005 and late < -0.005 and abs(late) >= 0.8 * abs(early)
        out["spg_theory_10x_behind_at_T"] = tab["spg_ratio"] >= 10
        d = [x for _, x in tab["order2"]]
        out["spma_npg_agree_O(eta^2)"] = all(3.5 < a / b < 4.5 for a, b in zip(d, d[1:]))
    if ll:
        out["loglinear_projection_convex"] = all(abs(a - b) < 1e-9 * abs(a) for a, b in ll["convex"].values())
        out["loglinear_linear_to_plateau"] = ll["plateau_slope"] < -0.05 and ll["plateau"] > 0
    by = {(r["env"], r["loss"]): r for r in deep_rows if r["eta"] == 1.0}
    for env in sorted({r["env"] for r in deep_rows}):
        if (env, "spma") in by and (env, "ppo") in by:
            spma, ppo = by[(env, "spma")], by[(env, "ppo")]
            out[f"{env}_spma_ge_ppo_minus_1std"] = spma["mean"] >= ppo["mean"] - ppo["std"]
    return out


# ------------------------------------------------------------------------------------------------ report
def _plots(out: Path, tab: dict, ll: dict, results: List[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, data, title in (("tabular_gap", tab, "tabular chain, exact advantages"),
                              ("loglinear_gap", ll, "log-linear SPMA (eta = 0.5), chain")):
        if not data:
            continue
        fig, ax = plt.subplots(figsize=(6.2, 4))
        for label, gaps in data["curves"].items():
            ax.semilogy(gaps, label=label)
        ax.set_xlabel("iteration t")
        ax.set_ylabel("J* - J(pi_t)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=120)
        plt.close(fig)
        with open(out / f"{name}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["iteration", *data["curves"]])
            w.writerows([t, *(f"{c[t]:.6g}" for c in data["curves"].values())] for t in range(data["T"]))
    for env in sorted({r["env"] for r in results}):
        fig, ax = plt.subplots(figsize=(6.2, 4))
        for key in sorted({(r["loss"], r["eta"]) for r in results if r["env"] == env}):
            runs = [r for r in results if r["env"] == env and (r["loss"], r["eta"]) == key]
            grid = np.linspace(0, max(r["episodes"][-1][0] for r in runs), 60)
            curves = []
            for r in runs:  # mean of the last 20 training episodes, on a common step grid
                steps = np.array([s for s, _ in r["episodes"]])
                rets = np.array([v for _, v in r["episodes"]])
                smooth = np.array([rets[max(0, i - 19):i + 1].mean() for i in range(len(rets))])
                curves.append(np.interp(grid, steps, smooth))
            curves = np.array(curves)
            label = key[0] if key[1] == 1.0 else f"{key[0]} eta={key[1]}"
            line, = ax.plot(grid, curves.mean(0), label=f"{label} ({len(runs)} seeds)")
            ax.fill_between(grid, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.15)
        ax.set_xlabel("environment steps")
        ax.set_ylabel("return (mean of 20 episodes)")
        ax.set_title(f"{env}: mean over seeds, band = min..max", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"deep_{env}.png", dpi=120)
        plt.close(fig)


def write(out: Path, tab: dict, ll: dict, results: List[dict], command: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    _plots(out, tab, ll, results)
    rows = summarise(results) if results else []
    if rows:
        with open(out / "deep_final_returns.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["env", "loss", "eta", "seed", "final_return_last20", "final_deterministic_eval", "seconds"])
            w.writerows([r["env"], r["loss"], r["eta"], r["seed"], f"{r['final']:.2f}", f"{r['final_eval']:.2f}",
                         r["seconds"]] for r in results)
    lines = ["## SPMA, softmax policy mirror ascent (issue #14)", "",
             f"Reproduce: `{command}` (2-core CPU; all numbers measured here; the paper's MuJoCo / Atari numbers are "
             "not quoted: the spec marks them unconfirmed).", ""]
    if tab:
        names = list(tab["curves"])
        lines += ["Tabular, exact advantages: 10-state, 4-action chain, gamma 0.9, uniform start and policy; gap "
                  "J* - J(pi_t) at iteration t (`tabular_gap.png`).", "",
                  "| method | t=10 | t=50 | t=100 | t=299 |", "|---|---|---|---|---|"]
        lines += [f"| {n} | " + " | ".join(f"{tab['curves'][n][t]:.3g}" for t in (10, 50, 100, 299)) + " |"
                  for n in names]
        e, l_ = tab["slopes"]
        lines += ["", f"SPMA at eta = 1 - gamma: slope of log gap {e:.4f} per iteration over t = 100..199 and "
                  f"{l_:.4f} over 200..299 (linear convergence, checked: both slopes below -0.005, the later at "
                  f"least 0.8x the earlier). Softmax PG at its theory step is {tab['spg_ratio']:.3g}x further from "
                  "J* at t = 299 (checked: at least 10x). SPMA vs NPG after one step from the same policy, "
                  "max |pi_SPMA - pi_NPG|: " +
                  ", ".join(f"eta={eta}: {d:.2e}" for eta, d in tab["order2"]) + " (halving eta quarters it: "
                  "O(eta^2); checked: each ratio between 3.5 and 4.5).", "",
                  "The spec prototype's random MDP (20 states, 4 actions, P ~ Dirichlet(0.3), "
                  "r ~ U[0, 1], gamma 0.9, numpy seed 0), gap at t = 10 / 50 / 100 / 299; these reproduce the "
                  "spec's independent-prototype table (spma.md section 2) to its three digits (asserted by "
                  "`tests/test_spma_claims.py`):", ""]
        lines += [f"- {n}: " + " / ".join(f"{g:.3g}" for g in v) for n, v in tab["prototype"].items()]
        lines.append("")
    if ll:
        lines += ["Log-linear SPMA (eta = 0.5 with the positivity guard; projection by damped Newton to |grad| < "
                  "1e-10), gap at t = 0 / 50 / 100 / 199 (`loglinear_gap.png`):", ""]
        lines += [f"- {n}: " + " / ".join(f"{c[t]:.3g}" for t in (0, 50, 100, 199)) for n, c in ll["curves"].items()]
        lines += ["", "Aggregated features cannot represent the optimal policy: the gap converges linearly "
                  f"(slope {ll['plateau_slope']:.3f} of the log excess) to a plateau of {ll['plateau']:.3f} "
                  "(checked: slope below -0.05, plateau above 0). "
                  "Projection from the current and from a random start: " +
                  ", ".join(f"{n}: {a:.10g} vs {b:.10g}" for n, (a, b) in ll["convex"].items()) + ".", ""]
    if rows:
        lines += ["Deep, small (the recipes' settings; final return = mean of the last 20 training episodes; "
                  "bootstrap 95% interval of the mean over seeds; eval = the last deterministic evaluation, 10 "
                  "episodes):", "", "| env | algorithm | eta | seeds | final return | std | 95% interval | eval | "
                  "per seed |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            eta = r["eta"] if r["loss"] != "ppo" else "-"
            lines.append(f"| {r['env']} | {r['loss']} | {eta} | {r['seeds']} | {r['mean']:.1f} | {r['std']:.1f} | "
                         f"{r['ci'][0]:.1f} .. {r['ci'][1]:.1f} | {r['eval']:.1f} | "
                         + " / ".join(f"{v:.1f}" for v in r["finals"]) + " |")
        lines.append("")
    return write_checked_section("spma", lines, checks(tab, ll, rows), RESULTS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["tabular", "loglinear", "deep", "eta"],
                    choices=["tabular", "loglinear", "deep", "eta"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--envs", nargs="+", default=list(ENV_RECIPE))
    ap.add_argument("--losses", nargs="+", default=["spma", "ppo", "mdpo"])
    ap.add_argument("--etas", type=float, nargs="+", default=[0.3, 3.0])
    ap.add_argument("--jobs", type=int, default=2, help="recipe runs in parallel (one thread each)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "spma_compare")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tab = tabular() if "tabular" in args.parts else {}
    ll = loglinear() if "loglinear" in args.parts else {}
    jobs = []
    if "deep" in args.parts:
        jobs += [(env, loss, seed) for env in args.envs for loss in args.losses for seed in args.seeds]
    if "eta" in args.parts:
        jobs += [("CartPole-v1", "spma", seed, eta) for eta in args.etas for seed in args.seeds]
    results = run_all(jobs, args.out, args.jobs) if jobs else []
    print(write(args.out, tab, ll, results, " ".join(["python scripts/spma_compare.py", *sys.argv[1:]])))


if __name__ == "__main__":
    main()
