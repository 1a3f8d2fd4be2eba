"""How the exact solvers of the fair WCMDP scale (spec fair_wcmdp.md 4.2.4): build + solve time of the joint GGF LP
(exponential in the number of arms N: S^N states) and of the count LP (polynomial: C(N+S-1, S-1) states) for
machine replacement (S = 3, K = 1), and the count-proportion environment's steps per second.  Times are reported as
ratios to the N = 3 time of the same solver in the same run (machines are noisy), with the seconds beside them; a plot
of both curves and the CSV go to ``--out``, the table to docs/performance.md (section ``wcmdp``).

    python scripts/bench_wcmdp.py [--joint 2 3 4 5 6] [--count 3 5 10 20 30 40 50] [--out runs/bench_wcmdp]
"""
from __future__ import annotations

import argparse
import csv
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from callbacks.run_files import save_figure  # noqa: E402
from scripts._report import update_section  # noqa: E402

DOCS = ROOT / "docs" / "performance.md"


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--joint", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    ap.add_argument("--count", type=int, nargs="+", default=[3, 5, 10, 20, 30, 40, 50])
    ap.add_argument("--env-steps", type=int, default=20_000)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_wcmdp")
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args(argv)
    from datamodules.wcmdp import CountMDP, JointMDP, machine_replacement_arm, machine_replacement_arms
    from datamodules.wcmdp_envs import CountProportionEnv
    from lightning_modules.fair_wcmdp_lp import solve_count_lp, solve_ggf_lp

    rows = []
    for n in args.joint:
        mdp, build = timed(lambda: JointMDP(machine_replacement_arms(n), budget=1))
        sol, solve = timed(lambda: solve_ggf_lp(mdp))
        rows.append({"solver": "joint GGF LP", "n_arms": n, "states": mdp.n_states,
                     "variables": mdp.n_states * mdp.n_actions, "build_s": build, "solve_s": solve,
                     "per_arm_cost": -sol.ggf})
        print(rows[-1], flush=True)
    for n in args.count:
        mdp, build = timed(lambda: CountMDP(machine_replacement_arm(), n, budget=1))
        sol, solve = timed(lambda: solve_count_lp(mdp))
        rows.append({"solver": "count LP", "n_arms": n, "states": mdp.n_states,
                     "variables": int(mdp.feasible.sum()), "build_s": build, "solve_s": solve,
                     "per_arm_cost": -sol.objective / n})
        print(rows[-1], flush=True)
    env = CountProportionEnv(machine_replacement_arm(), machine_range=(50, 50))
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    actions = rng.random((args.env_steps, 4))
    start = time.perf_counter()
    for a in actions:
        _, _, _, trunc, _ = env.step(a)
        if trunc:
            env.reset()
    env_rate = args.env_steps / (time.perf_counter() - start)
    print(f"count-proportion env, N = 50: {env_rate:,.0f} steps/s")

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "wcmdp_scaling.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, args.out / "wcmdp_scaling.png")
    if not args.no_docs:
        shutil.copy(args.out / "wcmdp_scaling.png", DOCS.parent / "wcmdp_scaling.png")
        update_section("wcmdp", markdown(rows, env_rate, args), DOCS)


def plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for solver, marker in (("joint GGF LP", "o-"), ("count LP", "s-")):
        pts = [(r["n_arms"], r["build_s"] + r["solve_s"]) for r in rows if r["solver"] == solver]
        if pts:
            ax.plot(*zip(*pts), marker, label=solver)
    ax.set_yscale("log")
    ax.set_xlabel("arms N (machine replacement, S = 3, K = 1)")
    ax.set_ylabel("build + solve seconds (log)")
    ax.legend()
    save_figure(fig, path)


def markdown(rows, env_rate, args) -> str:
    lines = ["## Fair WCMDP: exact solvers against the number of arms (scripts/bench_wcmdp.py)", "",
             f"`python scripts/bench_wcmdp.py --joint {' '.join(map(str, args.joint))} --count "
             f"{' '.join(map(str, args.count))}`: build + solve time, as a ratio to the same solver at N = 3 in the "
             "same run (seconds beside it).  The joint GGF LP grows with S^N states (exponential), the count LP with "
             "C(N+2, 2) states (polynomial; its exact policy-iteration polish included).", "",
             "| solver | N | states | LP variables | build + solve / N = 3 | seconds | per-arm cost |",
             "|---|---|---|---|---|---|---|"]
    for solver in ("joint GGF LP", "count LP"):
        sel = [r for r in rows if r["solver"] == solver]
        base = next((r["build_s"] + r["solve_s"] for r in sel if r["n_arms"] == 3), None)
        for r in sel:
            t = r["build_s"] + r["solve_s"]
            ratio = f"{t / base:.1f}x" if base else "-"
            lines.append(f"| {solver} | {r['n_arms']} | {r['states']:,} | {r['variables']:,} | {ratio} | {t:.3f} | "
                         f"{r['per_arm_cost']:.6f} |")
    lines += ["", f"Count-proportion environment at N = 50: {env_rate:,.0f} steps per second (random actions, one "
              "process).", "", "![build + solve time against N](wcmdp_scaling.png)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
