"""ERM vs Feasible Learning vs Resilient FL on the embedded digits, several seeds (spec feasible_learning.md 4.2-4.4).

    python scripts/feasible_compare.py --seeds 0 1 2 3 --out runs/feasible_compare

Each run is ``python -m recipes fit --config recipes/{erm,feasible,rfl}_digits.yaml --seed_everything=SEED`` (the
seed sets the model init and the data order, identical across the three modes).  Reads the last row of each run's
``sample_metrics.csv`` (full eval-mode passes at the end of training), writes ``summary.csv``, ``table.md`` and
``loss_cdf.png`` (training-loss distributions of the three modes, first seed), and evaluates the acceptance checks
of issue #5 (spec 4.4), paired by seed:

* train tail, every seed: max FL <= 0.5 ERM, CVaR_0.05 FL <= 0.8 ERM, q99 FL <= 0.8 ERM;
* violation rate FL <= ERM and <= 0.06; mean test accuracy FL >= ERM - 0.03; train accuracy FL >= ERM - 0.005;
* mean train loss FL > ERM; RFL max < ERM max on every seed;
* multipliers at the end: >= 50% exactly zero and Spearman rho(lambda, train loss) > 0 on every FL seed.
"""
from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts._report import fit_run, run_grid, seeds_main  # noqa: E402
MODES = {"erm": "recipes/erm_digits.yaml", "fl": "recipes/feasible_digits.yaml", "rfl": "recipes/rfl_digits.yaml"}
KEYS = ["train_max", "train_q99", "train_cvar05", "train_frac_violated", "train_mean", "train_acc", "val_acc",
        "val_mean", "val_cvar05", "lambda_max", "lambda_mean", "lambda_frac_zero", "lambda_loss_spearman"]


def run(mode: str, seed: int, out: Path, extra) -> dict:
    run_dir = out / f"{mode}_seed{seed}"
    logs, seconds = fit_run([MODES[mode]], run_dir, [f"--seed_everything={seed}", *extra])
    last = list(csv.DictReader(open(logs / "sample_metrics.csv")))[-1]
    row = {"mode": mode, "seed": seed, "seconds": seconds, "dir": str(logs)}
    row.update({k: float(last[k]) for k in KEYS if last.get(k) not in (None, "")})
    return row


def _by(results, mode):
    return {r["seed"]: r for r in results if r["mode"] == mode}


def checks(results) -> dict:
    erm, fl, rfl = _by(results, "erm"), _by(results, "fl"), _by(results, "rfl")
    seeds = sorted(erm)
    mean = lambda rows, k: statistics.fmean(rows[s][k] for s in seeds)  # noqa: E731
    out = {
        "fl_max_half_of_erm": all(fl[s]["train_max"] <= 0.5 * erm[s]["train_max"] for s in seeds),
        "fl_cvar05_0.8_of_erm": all(fl[s]["train_cvar05"] <= 0.8 * erm[s]["train_cvar05"] for s in seeds),
        "fl_q99_0.8_of_erm": all(fl[s]["train_q99"] <= 0.8 * erm[s]["train_q99"] for s in seeds),
        "fl_violations_le_erm": mean(fl, "train_frac_violated") <= mean(erm, "train_frac_violated")
        and mean(fl, "train_frac_violated") <= 0.06,
        "fl_test_acc_within_3pt": mean(fl, "val_acc") >= mean(erm, "val_acc") - 0.03,
        "fl_train_acc_within_0.5pt": mean(fl, "train_acc") >= mean(erm, "train_acc") - 0.005,
        "fl_mean_train_loss_above_erm": mean(fl, "train_mean") > mean(erm, "train_mean"),
        "fl_half_lambdas_zero": all(fl[s]["lambda_frac_zero"] >= 0.5 for s in seeds),
        "fl_lambda_tracks_loss": all(fl[s]["lambda_loss_spearman"] > 0 for s in seeds),
    }
    if rfl:
        out["rfl_max_below_erm"] = all(rfl[s]["train_max"] < erm[s]["train_max"] for s in seeds)
    return out


def _cdf_plot(results, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = min(r["seed"] for r in results)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for r in (r for r in results if r["seed"] == seed):
        values = sorted(max(float(row["loss"]), 1e-6) for row in csv.DictReader(open(Path(r["dir"]) /
                                                                                    "train_losses.csv")))
        n = len(values)
        ax.plot(values, [(i + 1) / n for i in range(n)], label=f"{r['mode'].upper()} (max {values[-1]:.2f})")
    ax.axvline(0.5108, color="k", ls="--", lw=0.8, label="epsilon = log(1/0.6)")
    ax.set_xscale("log")
    ax.set_xlabel("per-sample training loss after training (log scale)")
    ax.set_ylabel("fraction of training samples")
    ax.set_title(f"Digits, linear model, seed {seed}: training-loss CDF")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss_cdf.png", dpi=120)
    plt.close(fig)


def write(results, out: Path, cmd: str) -> str:
    with open(out / "summary.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["mode", "seed", "seconds"] + KEYS, extrasaction="ignore")
        w.writeheader()
        w.writerows(results)
    modes = [m for m in MODES if any(r["mode"] == m for r in results)]
    shown = [("train max", "train_max"), ("train q99", "train_q99"), ("train CVaR5%", "train_cvar05"),
             ("train frac > eps", "train_frac_violated"), ("train mean loss", "train_mean"),
             ("train acc", "train_acc"), ("test acc", "val_acc"), ("test CVaR5%", "val_cvar05"),
             ("lambda max", "lambda_max"), ("lambda frac 0", "lambda_frac_zero"),
             ("rho(lambda, loss)", "lambda_loss_spearman")]
    lines = ["| metric | " + " | ".join(m.upper() for m in modes) + " |", "|---|" + "---|" * len(modes)]
    for label, key in shown:
        cells = []
        for m in modes:
            vals = [r[key] for r in results if r["mode"] == m and key in r]
            cells.append(f"{statistics.fmean(vals):.3f} ± {statistics.pstdev(vals):.3f}" if vals else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    secs = {m: statistics.fmean(r["seconds"] for r in results if r["mode"] == m) for m in modes}
    lines.append("| s/run | " + " | ".join(f"{secs[m]:.0f}" for m in modes) + " |")
    lines += ["", "Checks: " + ", ".join(f"{k}={'pass' if v else 'FAIL'}" for k, v in checks(results).items()),
              "", f"Reproduce: `{cmd}`"]
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    _cdf_plot(results, out)
    return table


def compare(seeds, out: Path, modes=tuple(MODES), extra=()):
    return run_grid(seeds, modes, out, lambda mode, seed: run(mode, seed, out, list(extra)),
                    lambda r: f"train max {r['train_max']:.3f}, CVaR5% {r['train_cvar05']:.3f}, "
                              f"test acc {r['val_acc']:.4f}")


def main():
    seeds_main(__doc__, "feasible_compare", compare, write)


if __name__ == "__main__":
    main()
