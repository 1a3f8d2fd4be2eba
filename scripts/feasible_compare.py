"""ERM vs Feasible Learning vs Resilient FL vs CSERM, several seeds, on two families (spec feasible_learning.md
4.2-4.4 and 1.5-1.6):

    python scripts/feasible_compare.py --seeds 0 1 2 3 --out runs/feasible_compare              # digits
    python scripts/feasible_compare.py --family dpo --seeds 0 1 2 --out runs/feasible_compare_dpo

``digits``: ``python -m recipes fit --config recipes/{erm,feasible,rfl}_digits.yaml --seed_everything=SEED`` (the
seed sets the model init and the data order, identical across modes); ``dpo``: ``recipes/{dpo,feasible_dpo,
rfl_dpo}_toy.yaml`` (ERM-DPO, FL-DPO, RFL-DPO with the authors' alpha = 1) on the embedded toy preference pairs.  CSERM
(``mean relu(l - eps)^2``) is the FL recipe with ``--trainer.callbacks.init_args.mode=cserm``.  Reads the last row of
each run's ``sample_metrics.csv`` (full eval-mode passes at the end of training; for DPO "accuracy" is the held-out
implicit-reward accuracy and the held-out margin comes from ``metrics.csv``), writes ``summary.csv``, ``table.md``,
``loss_cdf.png`` (training-loss distributions of the modes, first seed) and ``multipliers.png`` (histogram of the
final multipliers of FL and RFL, first seed), and evaluates the acceptance checks, paired by seed:

digits (issue #5, spec 4.4; CSERM reported, not checked):

* train tail, every seed: max FL <= 0.5 ERM, CVaR_0.05 FL <= 0.8 ERM, q99 FL <= 0.8 ERM;
* violation rate FL <= ERM and <= 0.06; mean test accuracy FL >= ERM - 0.03; train accuracy FL >= ERM - 0.005;
* mean train loss FL > ERM; RFL max < ERM max on every seed;
* multipliers at the end: >= 50% exactly zero and Spearman rho(lambda, train loss) > 0 on every FL seed.

dpo (issue #21; RFL and CSERM reported, not checked):

* every seed: FL-DPO's worst and CVaR 5% training pair losses below ERM-DPO's;
* the mean held-out preference accuracy of FL-DPO within 3 points of ERM-DPO's.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts._report import fit_run, run_grid  # noqa: E402

CSERM = ["--trainer.callbacks.init_args.mode=cserm"]  # the FL recipe's callback (the last one) in CSERM mode
FAMILIES = {
    "digits": {"erm": ("recipes/erm_digits.yaml", []), "fl": ("recipes/feasible_digits.yaml", []),
               "rfl": ("recipes/rfl_digits.yaml", []), "cserm": ("recipes/feasible_digits.yaml", CSERM)},
    "dpo": {"erm": ("recipes/dpo_toy.yaml", []), "fl": ("recipes/feasible_dpo_toy.yaml", []),
            "rfl": ("recipes/rfl_dpo_toy.yaml", []), "cserm": ("recipes/feasible_dpo_toy.yaml", CSERM)},
}
MODES = FAMILIES["digits"]
EPSILON = {"digits": 0.5108, "dpo": 0.3}
LABELS = {"digits": {"erm": "ERM", "fl": "FL", "rfl": "RFL", "cserm": "CSERM"},
          "dpo": {"erm": "ERM-DPO", "fl": "FL-DPO", "rfl": "RFL-DPO", "cserm": "CSERM-DPO"}}
KEYS = ["train_max", "train_q99", "train_cvar05", "train_frac_violated", "train_mean", "train_acc", "val_acc",
        "val_mean", "val_cvar05", "val_margin", "lambda_max", "lambda_mean", "lambda_frac_zero",
        "lambda_loss_spearman"]


def run(mode: str, seed: int, out: Path, extra, family: str = "digits") -> dict:
    run_dir = out / f"{mode}_seed{seed}"
    recipe, more = FAMILIES[family][mode]
    logs, seconds = fit_run([recipe], run_dir, [f"--seed_everything={seed}", *more, *extra])
    return read_run(mode, seed, logs, seconds, family)


def read_run(mode: str, seed: int, logs: Path, seconds: float, family: str) -> dict:
    """The summary row of one finished run from its log folder."""
    last = list(csv.DictReader(open(logs / "sample_metrics.csv")))[-1]
    row = {"mode": mode, "seed": seed, "seconds": seconds, "dir": str(logs), "family": family}
    if mode in ("erm", "cserm"):  # no multipliers (CSERM's stay at their initial value)
        last = {k: v for k, v in last.items() if not k.startswith("lambda")}
    margins = [r["val/margin"] for r in csv.DictReader(open(logs / "metrics.csv")) if r.get("val/margin")]
    if margins:
        last["val_margin"] = margins[-1]
    row.update({k: float(last[k]) for k in KEYS if last.get(k) not in (None, "")})
    return row


def collect(seeds, out: Path, family: str = "digits", modes=None) -> list:
    """The rows of runs already made by ``compare`` into ``out`` (nothing is rerun; wall times unknown: nan)."""
    return [read_run(mode, seed, out / f"{mode}_seed{seed}" / "logs" / "version_0", float("nan"), family)
            for seed in seeds for mode in (modes or FAMILIES[family])]


def _by(results, mode):
    return {r["seed"]: r for r in results if r["mode"] == mode}


def checks(results) -> dict:
    erm, fl, rfl = _by(results, "erm"), _by(results, "fl"), _by(results, "rfl")
    seeds = sorted(erm)
    mean = lambda rows, k: statistics.fmean(rows[s][k] for s in seeds)  # noqa: E731
    if results and results[0].get("family") == "dpo":
        return {"fl_dpo_max_below_erm": all(fl[s]["train_max"] < erm[s]["train_max"] for s in seeds),
                "fl_dpo_cvar05_below_erm": all(fl[s]["train_cvar05"] < erm[s]["train_cvar05"] for s in seeds),
                "fl_dpo_heldout_acc_within_3pt": mean(fl, "val_acc") >= mean(erm, "val_acc") - 0.03}
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


def _family(results) -> str:
    return results[0].get("family", "digits") if results else "digits"


def _plots(results, out: Path) -> None:
    """``loss_cdf.png`` (every mode's final training-loss CDF) and ``multipliers.png`` (FL / RFL multipliers), both
    for the first seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    family = _family(results)
    seed = min(r["seed"] for r in results)
    eps = EPSILON[family]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    fig2, ax2 = plt.subplots(figsize=(6, 3.4))
    for r in (r for r in results if r["seed"] == seed):
        rows = list(csv.DictReader(open(Path(r["dir"]) / "train_losses.csv")))
        values = sorted(max(float(row["loss"]), 1e-6) for row in rows)
        n = len(values)
        label = LABELS[family][r["mode"]]
        ax.plot(values, [(i + 1) / n for i in range(n)], label=f"{label} (max {values[-1]:.2f})")
        if r["mode"] in ("fl", "rfl") and rows and "lambda" in rows[0]:
            lam = [float(row["lambda"]) for row in rows]
            ax2.hist(lam, bins=40, histtype="step", lw=1.5,
                     label=f"{label}: {sum(v == 0 for v in lam) / n:.0%} exactly 0, max {max(lam):.2f}")
    ax.axvline(eps, color="k", ls="--", lw=0.8, label=f"epsilon = {eps:.3g}")
    ax.set_xscale("log")
    what = "pair" if family == "dpo" else "sample"
    ax.set_xlabel(f"per-{what} training loss after training (log scale)")
    ax.set_ylabel(f"fraction of training {what}s")
    ax.set_title({"digits": "Digits, linear model", "dpo": "Toy preference pairs, DPO"}[family]
                 + f", seed {seed}: training-loss CDF")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss_cdf.png", dpi=120)
    ax2.set_yscale("log")
    ax2.set_xlabel(f"final multiplier lambda_i (one per training {what})")
    ax2.set_ylabel(f"training {what}s")
    ax2.set_title(f"Multipliers at the end, seed {seed}")
    ax2.legend(fontsize=8)
    fig2.tight_layout()
    fig2.savefig(out / "multipliers.png", dpi=120)
    plt.close(fig)
    plt.close(fig2)


def write(results, out: Path, cmd: str) -> str:
    seeds = sorted({r["seed"] for r in results})
    by = {(r["mode"], r["seed"]): r for r in results}
    ratio = lambda m, s, k: by[(m, s)][k] / by[("erm", s)][k]  # noqa: E731
    with open(out / "summary.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["mode", "seed", "seconds"] + KEYS, extrasaction="ignore")
        w.writeheader()
        w.writerows(results)
    family = _family(results)
    modes = [m for m in FAMILIES[family] if any(r["mode"] == m for r in results)]
    acc = "held-out pair accuracy" if family == "dpo" else "test acc"
    shown = [("train max", "train_max"), ("train q99", "train_q99"), ("train CVaR5%", "train_cvar05"),
             ("train frac > eps", "train_frac_violated"), ("train mean loss", "train_mean"),
             ("train acc", "train_acc"), (acc, "val_acc"), ("held-out mean loss", "val_mean"),
             ("held-out CVaR5%", "val_cvar05"), ("held-out margin", "val_margin"),
             ("lambda max", "lambda_max"), ("lambda frac 0", "lambda_frac_zero"),
             ("rho(lambda, loss)", "lambda_loss_spearman")]
    shown = [(label, key) for label, key in shown if any(key in r for r in results)]
    lines = ["| metric | " + " | ".join(LABELS[family][m] for m in modes) + " |", "|---|" + "---|" * len(modes)]
    for label, key in shown:
        cells = []
        for m in modes:
            vals = [r[key] for r in results if r["mode"] == m and key in r]
            cells.append(f"{statistics.fmean(vals):.3f} ± {statistics.pstdev(vals):.3f}" if vals else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    secs = {m: statistics.fmean(r["seconds"] for r in results if r["mode"] == m) for m in modes}
    lines.append("| s/run | " + " | ".join(f"{secs[m]:.0f}" for m in modes) + " |")
    lines += ["", "Per seed, ratio to ERM of the worst / CVaR 5% training loss: " + "; ".join(
        f"{LABELS[family][m]} " + ", ".join(f"{ratio(m, s, 'train_max'):.2f} / {ratio(m, s, 'train_cvar05'):.2f}"
                                             for s in seeds) for m in modes if m != "erm")]
    lines += ["", "Checks: " + ", ".join(f"{k}={'pass' if v else 'FAIL'}" for k, v in checks(results).items()),
              "", f"Reproduce: `{cmd}`"]
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    _plots(results, out)
    return table


def compare(seeds, out: Path, modes=None, extra=(), family: str = "digits"):
    modes = tuple(modes or FAMILIES[family])
    return run_grid(seeds, modes, out, lambda mode, seed: run(mode, seed, out, list(extra), family),
                    lambda r: f"train max {r['train_max']:.3f}, CVaR5% {r['train_cvar05']:.3f}, "
                              f"held-out acc {r['val_acc']:.4f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(FAMILIES), default="digits")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 3 (digits), 0 1 2 (dpo)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    seeds = args.seeds or ([0, 1, 2, 3] if args.family == "digits" else [0, 1, 2])
    out = args.out or ROOT / "runs" / ("feasible_compare" if args.family == "digits" else "feasible_compare_dpo")
    results = compare(seeds, out, family=args.family)
    family = "" if args.family == "digits" else " --family dpo"
    print(write(results, out, f"python scripts/feasible_compare.py{family} --seeds " + " ".join(map(str, seeds))))


if __name__ == "__main__":
    main()
