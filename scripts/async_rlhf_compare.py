"""Off-policy robustness of the RLHF losses (Noukhovitch et al., ICLR 2025; spec async_rlhf.md 1.3 and 6.3): every
loss on the toy task at off-policyness N in {1, 4, 16, 64} over seeds, to docs/results.md (section
``async_rlhf_<axis>``) with a reward-vs-N plot; runs to ``--out``.

    python scripts/async_rlhf_compare.py                          # the paper's N: N batches per policy, then N updates
    python scripts/async_rlhf_compare.py --axis lag --losses online_dpo rloo   # asynchronous lag L

``--axis N`` (default) is the paper's controlled staleness (``num_mini_batches``, synchronous): every N updates the
actor generates N batches with the current policy, so batch i of a round is i updates old and the total samples and
updates do not change with N.  ``--axis lag`` is the asynchronous pipeline at depth L (``staleness``): every batch
is L updates old.  Every run: the toy recipe of its loss (400 updates of 64 prompts), gold reward and KL of one sample
per prompt on 512 held-out prompts every 100 updates (the tables: the last; the curves: all).  Runs already finished
in ``--out`` are reused; ``--jobs`` at a time, one thread per process.

Claims (means over seeds): reward(Online DPO, N = 64) >= 0.9 x reward(Online DPO, N = 1) and reward(RLOO, N = 64) <
0.7 x reward(RLOO, N = 1); PPO and best-of-2 are reported.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from callbacks.run_files import save_figure  # noqa: E402
from scripts._report import fit_run, shown_command, write_checked_section  # noqa: E402

RESULTS = ROOT / "docs" / "results.md"
LOSSES = {"online_dpo": ("online_dpo_toy", [], "Online DPO"),
          "rloo": ("rloo_toy", [], "RLOO (sequence-level PPO-clip)"),
          "ppo": ("ppo_toy", [], "PPO (token-level, critic)"),
          "best_of_2": ("online_dpo_toy", ["--model.init_args.loss=best_of_2"], "best-of-2 SFT"),
          "ipo": ("online_dpo_toy", ["--model.init_args.loss=ipo"], "online IPO")}
AXES = {"N": "num_mini_batches", "lag": "staleness"}


def run_one(loss: str, n: int, seed: int, args) -> Dict:
    recipe, extra, _ = LOSSES[loss]
    run_dir = args.out / f"{args.axis}_{loss}_{n}_s{seed}"
    logs = run_dir / "logs" / "version_0"
    if not (logs / "done").exists():
        setting = ([f"--data.init_args.num_mini_batches={n}", "--data.init_args.sync=true"] if args.axis == "N"
                   else [f"--data.init_args.staleness={n}", "--data.init_args.sync=false"])
        _, seconds = fit_run([f"recipes/{recipe}.yaml"], run_dir, [
            f"--seed_everything={seed}", f"--trainer.max_steps={args.steps}",
            f"--data.init_args.steps_per_epoch={args.eval_every}", *setting, *extra])
        (logs / "done").write_text(f"{seconds:.1f}\n")
    with open(logs / "rlhf_eval.csv") as fh:
        history = list(csv.DictReader(fh))
    last = history[-1]
    with open(logs / "training.csv") as fh:
        train = list(csv.DictReader(fh))
    return {"loss": loss, "n": n, "seed": seed, "gold": float(last["gold"]), "kl": float(last["kl"]),
            "win_rate": float(last["win_rate"]), "steps": int(last["step"]),
            "staleness": statistics.mean(float(r["staleness"]) for r in train),
            "seconds": float((logs / "done").read_text()),
            "curve": [(int(r["step"]), float(r["gold"]), float(r["kl"])) for r in history]}


def mean(rows: List[Dict], key: str) -> float:
    return statistics.mean(r[key] for r in rows)


def verdict(cells: Dict) -> Dict[str, bool]:
    out = {}
    for loss, op, factor in (("online_dpo", ">=", 0.9), ("rloo", "<", 0.7)):
        lo, hi = cells.get((loss, 1)), cells.get((loss, 64))
        if lo and hi:
            a, b = mean(hi, "gold"), factor * mean(lo, "gold")
            out[f"{LOSSES[loss][2]}: reward(64) {op} {factor} x reward(1)"] = a >= b if op == ">=" else a < b
    return out


def write(rows: List[Dict], args, command: str) -> str:
    ns = sorted({r["n"] for r in rows})
    losses = [loss for loss in LOSSES if any(r["loss"] == loss for r in rows)]
    cells = {(loss, n): [r for r in rows if r["loss"] == loss and r["n"] == n] for loss in losses for n in ns}
    name = "N (batches per policy, synchronous)" if args.axis == "N" else "L (asynchronous lag)"
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"Toy task (spec 6.2), {args.steps} updates of 64 prompts x 2 samples, seeds {seeds}; final gold reward "
             "(mean of one sample per prompt on 512 held-out prompts, temperature 0.7; a uniform policy scores "
             f"0.125) and KL to the reference, per loss and {name}.  `{command}`", "",
             f"| loss | {args.axis} | gold reward (per seed) | mean | / at {args.axis} = 1 | KL | win-rate vs ref | "
             "mean staleness |", "|---|---|---|---|---|---|---|---|"]
    for loss in losses:
        base = mean(cells[(loss, ns[0])], "gold") if cells[(loss, ns[0])] else float("nan")
        for n in ns:
            c = cells[(loss, n)]
            if not c:
                continue
            g = mean(c, "gold")
            lines.append(f"| {LOSSES[loss][2]} | {n} | {' / '.join(format(r['gold'], '.3f') for r in c)} | {g:.3f} | "
                         f"{g / base:.2f} | {mean(c, 'kl'):.2f} | {mean(c, 'win_rate'):.3f} | "
                         f"{mean(c, 'staleness'):.1f} |")
    lines.append("")
    plot(cells, losses, ns, args.axis, ROOT / "docs" / f"async_rlhf_{args.axis}.png")
    curves(rows, losses, ns, args.axis, ROOT / "docs" / f"async_rlhf_{args.axis}_curves")
    lines.append(f"![reward and KL against {args.axis}](async_rlhf_{args.axis}.png)")
    lines.append("")
    lines.append(f"Gold reward and KL over updates, per loss and {args.axis} (means over seeds; the numbers: "
                 f"`async_rlhf_{args.axis}_curves.csv`):")
    lines.append("")
    lines.append(f"![gold reward and KL over updates](async_rlhf_{args.axis}_curves.png)")
    lines.append("")
    return write_checked_section(f"async_rlhf_{args.axis}", lines, verdict(cells), RESULTS)


def plot(cells, losses, ns, axis: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for loss in losses:
        pts = [(n, mean(cells[(loss, n)], "gold"), mean(cells[(loss, n)], "kl")) for n in ns if cells[(loss, n)]]
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=LOSSES[loss][2])
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=LOSSES[loss][2])
    for ax, label in zip(axes, ("final gold reward", "KL to the reference")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(axis)
        ax.set_ylabel(label)
    axes[0].axhline(0.125, color="grey", ls=":", label="uniform policy")
    axes[0].legend(fontsize=7)
    save_figure(fig, str(path))


def curves(rows: List[Dict], losses, ns, axis: str, stem: Path) -> None:
    """Every run's evaluations (CSV) and the seed means of gold reward and KL over updates, one panel per loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(f"{stem}.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["loss", axis, "seed", "step", "gold", "kl"])
        for r in rows:
            for step, gold, kl in r["curve"]:
                w.writerow([r["loss"], r["n"], r["seed"], step, gold, kl])
    fig, axes = plt.subplots(2, len(losses), figsize=(3.2 * len(losses), 5.6), squeeze=False)
    for j, loss in enumerate(losses):
        for n in ns:
            runs = [r["curve"] for r in rows if r["loss"] == loss and r["n"] == n]
            if not runs:
                continue
            steps = [p[0] for p in runs[0]]
            for i, col in ((0, 1), (1, 2)):
                axes[i][j].plot(steps, [statistics.mean(run[k][col] for run in runs) for k in range(len(steps))],
                                "o-", label=f"{axis} = {n}")
        axes[0][j].set_title(LOSSES[loss][2], fontsize=8)
        axes[1][j].set_xlabel("updates")
    axes[0][0].set_ylabel("gold reward")
    axes[1][0].set_ylabel("KL to the reference")
    axes[0][0].legend(fontsize=7)
    save_figure(fig, f"{stem}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--axis", choices=list(AXES), default="N")
    ap.add_argument("--losses", nargs="+", choices=list(LOSSES), default=["online_dpo", "rloo", "ppo", "best_of_2"])
    ap.add_argument("--values", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--eval-every", type=int, default=100, help="updates between evaluations")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "async_rlhf_compare")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["OMP_NUM_THREADS"] = "1"
    tasks = [(loss, n, seed) for seed in args.seeds for loss in args.losses for n in args.values]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda t: run_one(*t, args), tasks))
    print(write(rows, args, shown_command("async_rlhf_compare", sys.argv[1:])))


if __name__ == "__main__":
    main()
