"""Asynchronous against synchronous RLHF in wall time (Noukhovitch et al., ICLR 2025; spec async_rlhf.md 6.4): the
toy Online DPO recipe to the same number of updates, synchronous (the actor waits for each update's weights) and
asynchronous (staleness 1: the actor generates batch t + 1 while the learner trains on batch t), back to back per
seed in this script; the ratio of wall times (whole ``fit`` processes, start-up included, and the updates alone from
the report's timing), the learner's and the actor's idle fractions, and the final gold reward of both.  Table to
docs/performance.md (section ``async_rlhf``).

    python scripts/bench_async_rlhf.py [--seeds 0 1] [--steps 400]

On the toy, generation (8 sequential sampling steps of 128 sequences) and an update take about the same time on one
core each, the regime where asynchrony pays most (ideal ratio (g + l) / max(g, l) -> 0.5).  Needs 2 free cores: the
actor and the learner are one thread each.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts._report import fit_run, shown_command, update_section  # noqa: E402

ARMS = {"sync": ["--data.init_args.sync=true"], "async": ["--data.init_args.sync=false",
                                                          "--data.init_args.staleness=1"]}


def one(arm: str, seed: int, steps: int, out: Path) -> dict:
    run_dir = out / f"{arm}_s{seed}"
    logs, wall = fit_run(["recipes/online_dpo_toy.yaml"], run_dir, [
        f"--seed_everything={seed}", f"--trainer.max_steps={steps}", f"--data.init_args.steps_per_epoch={steps}",
        *ARMS[arm]])
    with open(logs / "timing.csv") as fh:
        timing = {k: float(v) for k, v in next(csv.DictReader(fh)).items()}
    with open(logs / "rlhf_eval.csv") as fh:
        gold = float(list(csv.DictReader(fh))[-1]["gold"])
    with open(logs / "training.csv") as fh:
        rows = list(csv.DictReader(fh))
    gen = statistics.median(float(r["actor_gen_s"]) for r in rows[1:])
    return {"arm": arm, "seed": seed, "wall": wall, "updates_wall": timing["wall_s"], "gold": gold,
            "learner_idle": timing["learner_idle"], "actor_idle": timing["actor_idle"], "gen_s": gen,
            "train_s": timing["wall_s"] / len(rows) - timing["learner_wait_s"] / len(rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_async_rlhf")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    rows = []
    for seed in args.seeds:
        for arm in ARMS:
            rows.append(one(arm, seed, args.steps, args.out))
            r = rows[-1]
            print(f"{arm:5s} seed {seed}: {r['wall']:.1f} s (updates {r['updates_wall']:.1f} s), gold {r['gold']:.3f}, "
                  f"learner idle {r['learner_idle']:.2f}, actor idle {r['actor_idle']:.2f}", flush=True)
    by = {arm: [r for r in rows if r["arm"] == arm] for arm in ARMS}
    mean = lambda arm, k: statistics.mean(r[k] for r in by[arm])  # noqa: E731
    ratios = [a["updates_wall"] / s["updates_wall"] for a, s in zip(by["async"], by["sync"])]
    whole = [a["wall"] / s["wall"] for a, s in zip(by["async"], by["sync"])]
    lines = ["## Asynchronous RLHF: asynchronous against synchronous wall time (scripts/bench_async_rlhf.py)", "",
             "The learner waits for generation in the synchronous run and the actor waits for each update; at "
             "staleness 1 the actor generates batch t + 1 while the learner trains on batch t.  The updates' wall "
             "time is from the first to the last update (the report's timing.csv); the whole fit adds start-up and "
             "the final evaluation of 512 prompts.", "",
             f"Toy Online DPO, {args.steps} updates of 64 prompts x 2 samples, seeds {args.seeds}, actor and learner "
             f"one thread each on this machine's cores. `{shown_command('bench_async_rlhf', sys.argv[1:])}`", "",
             "| | sync | async (staleness 1) |", "|---|---|---|",
             f"| wall time of the updates, s | {mean('sync', 'updates_wall'):.1f} | "
             f"{mean('async', 'updates_wall'):.1f} |",
             f"| wall time of the whole fit (start-up, evaluation), s | {mean('sync', 'wall'):.1f} | "
             f"{mean('async', 'wall'):.1f} |",
             f"| learner idle fraction | {mean('sync', 'learner_idle'):.2f} | {mean('async', 'learner_idle'):.2f} |",
             f"| actor idle fraction | {mean('sync', 'actor_idle'):.2f} | {mean('async', 'actor_idle'):.2f} |",
             f"| generation / update time per batch, s | {mean('sync', 'gen_s'):.3f} / {mean('sync', 'train_s'):.3f} | "
             f"{mean('async', 'gen_s'):.3f} / {mean('async', 'train_s'):.3f} |",
             f"| final gold reward | {mean('sync', 'gold'):.3f} | {mean('async', 'gold'):.3f} |", "",
             f"Async / sync wall time of the updates: {' / '.join(f'{r:.2f}' for r in ratios)} (mean "
             f"{statistics.mean(ratios):.2f}; goal <= 0.7, the paper's headline ~0.5); whole fits "
             f"{statistics.mean(whole):.2f}.", ""]
    text = "\n".join(lines)
    update_section("async_rlhf", text)
    print(text)


if __name__ == "__main__":
    main()
