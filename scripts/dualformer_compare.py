"""Dualformer vs its two baselines on small mazes (Su et al., ICLR 2025; spec dualformer.md section 4): the same
encoder-decoder trained for the same number of steps on complete A* traces (Searchformer), on plans only
(Solution-Only) and on Dualformer's randomised traces, per seed; tables and a plot to docs/results.md (section
``dualformer``), runs to ``--out``.

    python scripts/dualformer_compare.py                 # 3 arms x seeds 0 1 2, 5x5 mazes, 2,000 steps each

Every arm is evaluated on the same 200 test mazes (unseen wall layouts) greedily in each mode it can answer in
(Dualformer: fast, slow, auto; full trace: slow; solution only: fast) and with ``--samples`` draws at temperature 1
(1-Solved-k, 1-Optimal-k, diversity).  The claims of spec section 4 are checked on the greedy answers: (a) Dualformer
fast mode's optimal rate above Solution-Only's; (b) Dualformer slow mode's trace shorter than the full-trace model's,
its optimal rate at least as high within noise (two binomial standard errors of the difference); (c) fast-mode
answers much shorter than slow-mode ones (at most half as many tokens).  Runs already finished in ``--out`` are
reused; ``--jobs`` runs at a time, one thread each.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from callbacks.run_files import save_figure  # noqa: E402
from datamodules.trace_dataset import TraceDataConfig, ensure_dataset  # noqa: E402
from scripts._report import fit_run, shown_command, update_section, write_checked_section  # noqa: E402

RESULTS = ROOT / "docs" / "results.md"
ARMS = {"dualformer": ("fast", "slow", "auto"), "full_trace": ("slow",), "solution_only": ("fast",)}
LABEL = {"dualformer": "Dualformer", "full_trace": "full trace (Searchformer)", "solution_only": "Solution-Only"}


def _report_config(out: Path, items: int, samples: int, modes) -> Path:
    path = out / f"report_{'_'.join(modes)}.yaml"
    path.write_text("trainer:\n  callbacks:\n    - class_path: callbacks.dualformer_report.DualformerReport\n"
                    f"      init_args: {{items: {items}, samples: {samples}, modes: {list(modes)}}}\n"
                    "    - class_path: lightning.pytorch.callbacks.LearningRateMonitor\n")
    return path


def run_one(arm: str, seed: int, args) -> List[dict]:
    run_dir = args.out / f"{arm}_s{seed}"
    logs = run_dir / "logs" / "version_0"
    if not (logs / "done").exists():
        extra = [f"--seed_everything={seed}", f"--trainer.max_steps={args.steps}",
                 f"--data.init_args.data_dir={args.out / 'data'}", f"--data.init_args.n_train={args.n_train}",
                 f"--data.init_args.sizes={list(args.sizes)}", f"--model.init_args.max_size={max(args.sizes)}",
                 "--data.init_args.processes=1"]
        _, seconds = fit_run([f"recipes/{arm}_maze.yaml", _report_config(args.out, args.items, args.samples,
                                                                          ARMS[arm])], run_dir, extra)
        (logs / "done").write_text(f"{seconds:.1f}\n")
    with open(logs / "modes.csv") as fh:
        rows = list(csv.DictReader(fh))
    seconds = float((logs / "done").read_text())
    return [{**{k: (v if k in ("mode", "arm") else float(v)) for k, v in r.items() if v != ""}, "arm": arm,
             "seed": seed, "seconds": seconds} for r in rows]


def table(rows: List[dict], samples: int) -> List[dict]:
    """Mean and seed-sd per (arm, mode)."""
    out = []
    for arm, modes in ARMS.items():
        for mode in modes:
            group = [r for r in rows if r["arm"] == arm and r["mode"] == mode]
            if not group:
                continue
            agg = {"arm": arm, "mode": mode, "seeds": len(group), "items": int(group[0]["items"])}
            for key in ("optimal_rate", "correct_rate", "mean_trace_tokens", "mean_response_tokens", "slow_fraction",
                        f"optimal_{samples}", f"solved_{samples}", "diversity", "seconds"):
                vals = [r[key] for r in group if key in r]
                if vals:
                    agg[key] = statistics.mean(vals)
                    agg[key + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            out.append(agg)
    return out


def _get(tab, arm, mode, key):
    for r in tab:
        if r["arm"] == arm and r["mode"] == mode:
            return r.get(key)
    return None


def verdict(tab) -> Dict[str, bool]:
    if {r["arm"] for r in tab} != set(ARMS):
        return {}  # a subset of the arms: no claim to check

    def g(arm, mode, key):
        return _get(tab, arm, mode, key)

    slow_df, slow_ft = g("dualformer", "slow", "optimal_rate"), g("full_trace", "slow", "optimal_rate")
    n = g("dualformer", "slow", "items") * g("dualformer", "slow", "seeds")
    se = math.sqrt(max(slow_df * (1 - slow_df) + slow_ft * (1 - slow_ft), 1e-12) / n)
    return {"(a) Dualformer fast optimal > Solution-Only": (g("dualformer", "fast", "optimal_rate")
                                                           > g("solution_only", "fast", "optimal_rate")),
            "(b) Dualformer slow trace < full trace": (g("dualformer", "slow", "mean_trace_tokens")
                                                      < g("full_trace", "slow", "mean_trace_tokens")),
            "(b) Dualformer slow optimal >= full trace - 2 se": slow_df >= slow_ft - 2 * se,
            "(c) fast answers <= half the slow ones": (g("dualformer", "fast", "mean_response_tokens")
                                                       <= 0.5 * g("dualformer", "slow", "mean_response_tokens"))}


def write(tab, args, command: str) -> str:
    k = args.samples

    def pm(r, key, spec=".3f"):
        if key not in r:
            return "-"
        return f"{r[key]:{spec}} ± {r[key + '_sd']:{spec}}" if r["seeds"] > 1 else f"{r[key]:{spec}}"

    title = "fast, slow and auto modes against the two baselines" if len(args.arms) == 3 else \
        " and ".join(LABEL[a] for a in args.arms)
    lines = [f"### Dualformer on small mazes, {args.steps} steps: {title}", "",
             f"`{command}`: {', '.join(f'{s}x{s}' for s in args.sizes)} mazes, {args.n_train} training mazes, "
             f"{args.steps} steps of batch 32 per arm, the same encoder-decoder (d = 64, 2 + 2 layers); "
             f"{tab[0]['items']} test mazes with unseen wall layouts; mean ± sd over seeds {list(args.seeds)}. "
             "Optimal and correct rates and token counts are greedy; the k-sample columns draw "
             f"k = {k} answers at temperature 1.", "",
             f"| arm | mode | optimal | correct | trace tokens | answer tokens | auto: slow share | 1-Optimal-{k} | "
             f"1-Solved-{k} | distinct optimal plans | minutes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in tab:
        lines.append(f"| {LABEL[r['arm']]} | {r['mode']} | {pm(r, 'optimal_rate')} | {pm(r, 'correct_rate')} | "
                     f"{pm(r, 'mean_trace_tokens', '.1f')} | {pm(r, 'mean_response_tokens', '.1f')} | "
                     f"{pm(r, 'slow_fraction', '.2f') if r['mode'] == 'auto' else '-'} | {pm(r, f'optimal_{k}')} | "
                     f"{pm(r, f'solved_{k}')} | {pm(r, 'diversity', '.2f')} | {r['seconds'] / 60:.1f} |")
    lines += ["", f"![optimal rate against trace length, per arm and mode]({args.section}_trace_vs_optimal.png)", ""]
    checks = verdict(tab)
    if not checks:  # a subset of the arms
        text = "\n".join(lines)
        update_section(args.section, text, RESULTS)
        return text
    return write_checked_section(args.section, lines, checks, RESULTS)


def plot(tab, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.4, 3.8))
    markers = {"fast": "o", "slow": "s", "auto": "^"}
    colours = {"dualformer": "tab:blue", "full_trace": "tab:orange", "solution_only": "tab:green"}
    for r in tab:
        ax.errorbar(r["mean_trace_tokens"], r["optimal_rate"], yerr=r["optimal_rate_sd"],
                    xerr=r["mean_trace_tokens_sd"], fmt=markers[r["mode"]], color=colours[r["arm"]], ms=7,
                    label=f"{LABEL[r['arm']]}, {r['mode']}")
    ax.set_xlabel("mean trace tokens (greedy)")
    ax.set_ylabel("optimal rate (greedy)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, str(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--sizes", type=int, nargs="+", default=[5])
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--section", default="dualformer", help="docs/results.md section (and plot name) to write")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "dualformer_compare")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ensure_dataset(args.out / "data", TraceDataConfig(sizes=tuple(args.sizes), n_train=args.n_train, n_test=200),
                   processes=2)
    os.environ["OMP_NUM_THREADS"] = "1"
    tasks = [(arm, seed) for seed in args.seeds for arm in args.arms]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = [r for rs in pool.map(lambda t: run_one(t[0], t[1], args), tasks) for r in rs]
    tab = table(rows, args.samples)
    plot(tab, ROOT / "docs" / f"{args.section}_trace_vs_optimal.png")
    command = shown_command("dualformer_compare", sys.argv[1:])
    print(write(tab, args, command))


if __name__ == "__main__":
    main()
