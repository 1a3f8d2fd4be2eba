"""CB-SOM vs AB-SOM vs random-BMU vs SOM off on the embedded digits, several seeds (spec cbsom.md 4.4-4.5).

    python scripts/cbsom_compare.py --seeds 0 1 2 3 --out runs/cbsom_compare

Each run is ``python -m recipes fit --config recipes/cbsom_digits.yaml`` with the SOM mode and the seed changed.
Reads each run's ``topography.csv`` and final ``val/acc`` (the 450 held-out digits), writes ``summary.csv``,
``layers.csv`` and ``table.md``, and evaluates the acceptance checks of issue #4:

* baseline: accuracy >= 0.95 and |weight-topography z| < 2.5 in every layer;
* CB-SOM (claim a): mean accuracy >= baseline - 0.03 and weight-topography z >= 2 in at least 2/3 of the layers;
* CB vs AB (claim b, the mechanism), in every layer: distinct-BMU fraction CB > AB, mean kernel cosine CB < AB,
  |alignment| CB < 0.5 |alignment| AB.
"""
from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts._report import fit_run, run_grid, seeds_main  # noqa: E402
MODES = ("none", "cb", "ab", "random")
OVERRIDE = """trainer:
  callbacks:
    - class_path: callbacks.self_organizing_map.SelfOrganizingMap
      init_args: {{mode: {mode}, alpha0: 0.1, sigma_min: 1.0, alpha_min: 0.003, decay: -3.0, layers: all, seed: {seed}}}
    - class_path: callbacks.topography_report.TopographyReport
      init_args: {{n_perm: 200, seed: {seed}}}
"""


def run(mode: str, seed: int, out: Path, extra) -> dict:
    run_dir = out / f"{mode}_seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    override = run_dir / "som.yaml"
    override.write_text(OVERRIDE.format(mode=mode, seed=seed))
    logs, seconds = fit_run(["recipes/cbsom_digits.yaml", override], run_dir, [f"--seed_everything={seed}", *extra])
    accs = [float(r["val/acc"]) for r in csv.DictReader(open(logs / "metrics.csv")) if r.get("val/acc")]
    layers = list(csv.DictReader(open(logs / "topography.csv")))
    return {"mode": mode, "seed": seed, "acc": accs[-1], "layers": layers, "seconds": seconds}


def per_layer_mean(results, mode, key):
    runs = [r for r in results if r["mode"] == mode]
    names = [row["layer"] for row in runs[0]["layers"]]
    out = {}
    for name in names:
        vals = [float(row[key]) for r in runs for row in r["layers"] if row["layer"] == name and row.get(key)]
        out[name] = statistics.fmean(vals) if vals else float("nan")
    return out


def checks(results) -> dict:
    acc = {m: [r["acc"] for r in results if r["mode"] == m] for m in MODES if any(r["mode"] == m for r in results)}
    z = {m: per_layer_mean(results, m, "weight_topo_z") for m in acc}
    out = {"baseline_acc": statistics.fmean(acc["none"]) >= 0.95,
           "baseline_no_topography": all(abs(v) < 2.5 for v in z["none"].values()),
           "cb_accuracy": statistics.fmean(acc["cb"]) >= statistics.fmean(acc["none"]) - 0.03,
           "cb_topography": sum(v >= 2 for v in z["cb"].values()) >= 2 * len(z["cb"]) / 3}
    if "ab" in acc:
        dist = {m: per_layer_mean(results, m, "distinct_bmu_frac") for m in ("cb", "ab")}
        cos = {m: per_layer_mean(results, m, "mean_kernel_cosine") for m in ("cb", "ab")}
        align = {m: per_layer_mean(results, m, "mean_alignment") for m in ("cb", "ab")}
        names = list(dist["cb"])
        out["cb_more_distinct_bmus"] = all(dist["cb"][n] > dist["ab"][n] for n in names)
        out["cb_less_homogenised"] = all(cos["cb"][n] < cos["ab"][n] for n in names)
        out["cb_better_aligned"] = all(abs(align["cb"][n]) < 0.5 * abs(align["ab"][n]) for n in names)
    return out


def write(results, out: Path, cmd: str) -> str:
    with open(out / "summary.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["mode", "seed", "val_acc", "seconds"])
        w.writerows((r["mode"], r["seed"], f"{r['acc']:.4f}", f"{r['seconds']:.0f}") for r in results)
    keys = ["weight_topo_z", "response_topo_z", "distinct_bmu_frac", "mean_kernel_cosine", "mean_alignment"]
    modes = [m for m in MODES if any(r["mode"] == m for r in results)]
    means = {m: {k: per_layer_mean(results, m, k) for k in keys} for m in modes}
    names = list(means[modes[0]]["weight_topo_z"])
    with open(out / "layers.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["mode", "layer"] + keys)
        for m in modes:
            for n in names:
                w.writerow([m, n] + [f"{means[m][k][n]:.4f}" for k in keys])
    lines = ["| mode | val acc mean | median | min | weight-topo z (mean over layers; min–max) | distinct BMU frac | "
             "kernel cos | alignment | s/run |", "|---|---|---|---|---|---|---|---|---|"]
    for m in modes:
        acc = [r["acc"] for r in results if r["mode"] == m]
        zs = list(means[m]["weight_topo_z"].values())
        fmt = lambda k: f"{statistics.fmean(means[m][k].values()):.3f}" if m != "none" else "–"  # noqa: E731
        secs = statistics.fmean(r["seconds"] for r in results if r["mode"] == m)
        lines.append(f"| {m} | {statistics.fmean(acc):.4f} | {statistics.median(acc):.4f} | {min(acc):.4f} | "
                     f"{statistics.fmean(zs):.2f} ({min(zs):.2f}–{max(zs):.2f}) | {fmt('distinct_bmu_frac')} | "
                     f"{statistics.fmean(means[m]['mean_kernel_cosine'].values()):.3f} | {fmt('mean_alignment')} | "
                     f"{secs:.0f} |")
    base = [(abs(float(row["weight_topo_z"])), r["seed"], row["layer"]) for r in results if r["mode"] == "none"
            for row in r["layers"]]
    if base:
        worst = max(base)
        lines += ["", f"SOM off, single runs: max |weight-topo z| {worst[0]:.2f} (seed {worst[1]}, {worst[2]}); "
                      f"{sum(v >= 2.5 for v, _, _ in base)} of {len(base)} run x layer values have |z| >= 2.5"]
    if "ab" in modes:
        lines += ["", "| layer | distinct BMU CB / AB | kernel cos CB / AB | alignment CB / AB | weight z CB / AB |",
                  "|---|---|---|---|---|"]
        for n in names:
            cell = lambda k, f: f"{means['cb'][k][n]:{f}} / {means['ab'][k][n]:{f}}"  # noqa: E731
            lines.append(f"| {n} | {cell('distinct_bmu_frac', '.3f')} | {cell('mean_kernel_cosine', '.3f')} | "
                         f"{cell('mean_alignment', '.4f')} | {cell('weight_topo_z', '.2f')} |")
    lines += ["", "Checks: " + ", ".join(f"{k}={'pass' if v else 'FAIL'}" for k, v in checks(results).items()),
              "", f"Reproduce: `{cmd}`"]
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    return table


def compare(seeds, out: Path, modes=MODES, extra=()):
    return run_grid(seeds, modes, out, lambda mode, seed: run(mode, seed, out, list(extra)),
                    lambda r: f"val acc {r['acc']:.4f}")


def main():
    seeds_main(__doc__, "cbsom_compare", compare, write)


if __name__ == "__main__":
    main()
