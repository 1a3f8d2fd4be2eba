"""FoX vs Transformer-RoPE on the embedded data: loss inside and beyond the training length (the paper's main
analysis, scaled down), over several seeds.

    python scripts/fox_compare.py --seeds 0 1 --out runs/fox_compare

Each run is ``python -m recipes fit --config recipes/<variant>.yaml`` with ``--seed_everything`` and the data seed
changed; the script reads each run's ``position_loss.csv`` / ``gate_stats.csv`` and writes ``summary.csv``,
``position_loss_fox_vs_rope.png`` and ``table.md`` (the markdown table for docs/results.md).
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts._report import fit_run  # noqa: E402
VARIANTS = {"FoX": "fox_lm", "Transformer-RoPE": "transformer_rope_lm"}


def run_variant(recipe: str, seed: int, out: Path, steps: int, extra: list) -> dict:
    logs, seconds = fit_run([f"recipes/{recipe}.yaml"], out / f"{recipe}_seed{seed}",
                            [f"--seed_everything={seed}", f"--data.init_args.seed={1234 + seed}",
                             f"--trainer.max_steps={steps}", *extra])
    curve = np.loadtxt(logs / "position_loss.csv", delimiter=",", skiprows=1)[:, 1]
    result = {"curve": curve, "seconds": seconds, "run_dir": str(logs)}
    gates = logs / "gate_stats.csv"
    if gates.exists():
        rows = list(csv.DictReader(open(gates)))
        result["head_mean_log_f"] = np.array([float(r["mean_log_f"]) for r in rows])
        result["head_frac_open"] = np.array([float(r["frac_f_gt_0.9"]) for r in rows])
    return result


def summarise(curve: np.ndarray, train_len: int) -> dict:
    return {"in_length": float(curve[:train_len].mean()),
            "beyond_1x_4x": float(curve[train_len:4 * train_len].mean()),
            "1x_2x": float(curve[train_len:2 * train_len].mean()),
            "2x_4x": float(curve[2 * train_len:4 * train_len].mean())}


def compare(seeds, out: Path, steps: int = 400, train_len: int = 128, extra=()) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for seed in seeds:
        for name, recipe in VARIANTS.items():
            res = run_variant(recipe, seed, out, steps, list(extra))
            res.update(summarise(res["curve"], train_len))
            results[(name, seed)] = res
            print(f"{name:17s} seed {seed}: in-length {res['in_length']:.3f}  [T,4T) {res['beyond_1x_4x']:.3f}  "
                  f"({res['seconds']:.0f} s)", flush=True)
    write_outputs(results, out, train_len)
    return results


def write_outputs(results: dict, out: Path, train_len: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from callbacks.fox_report import smooth

    with open(out / "summary.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["variant", "seed", "in_length", "1x_2x", "2x_4x", "beyond_1x_4x", "seconds"])
        for (name, seed), r in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            w.writerow([name, seed] + [f"{r[k]:.4f}" for k in ("in_length", "1x_2x", "2x_4x", "beyond_1x_4x")]
                       + [f"{r['seconds']:.0f}"])
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = {"FoX": "tab:blue", "Transformer-RoPE": "tab:red"}
    for (name, seed), r in results.items():
        c = r["curve"]
        ax.plot(np.arange(len(c)), smooth(c, 17), color=colors[name], alpha=0.8,
                label=f"{name} (seed {seed})", ls="-" if seed == min(s for _, s in results) else "--")
    ax.axvline(train_len, color="gray", ls=":", label="training length")
    ax.set_xlabel("token position")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("Loss by position, trained at T=%d" % train_len)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "position_loss_fox_vs_rope.png", dpi=120)
    plt.close(fig)


def markdown(results: dict, cmd: str) -> str:
    lines = ["| seed | model | loss [0, T) | [T, 2T) | [2T, 4T) | mean [T, 4T) | wall time |",
             "|---|---|---|---|---|---|---|"]
    for (name, seed), r in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        lines.append(f"| {seed} | {name} | {r['in_length']:.3f} | {r['1x_2x']:.3f} | {r['2x_4x']:.3f} | "
                     f"{r['beyond_1x_4x']:.3f} | {r['seconds']:.0f} s |")
    lines += ["", f"Reproduce: `{cmd}`"]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "fox_compare")
    args = ap.parse_args()
    results = compare(args.seeds, args.out, args.steps)
    table = markdown(results, "python scripts/fox_compare.py --seeds " + " ".join(map(str, args.seeds))
                     + f" --steps {args.steps}")
    print(table)
    (args.out / "table.md").write_text(table + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
