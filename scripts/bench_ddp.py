"""Training throughput of 2-process DDP vs 1 process, CPU (gloo), for the tiny recipes.

    python scripts/bench_ddp.py [--reps 2] [--write]

Each measurement is ``python -m recipes fit --config recipes/<recipe>.yaml`` for a fixed number of steps: one
process with batch B on one thread and on all cores (intra-op threads), vs DDP with 2 processes x 1 thread, each
with batch B (global batch 2B).  A timing callback records samples per second over the steps after a warm-up (start-up, data loading and
compilation excluded).  The two set-ups are run alternately ``--reps`` times and the medians compared, so machine
noise hits both alike.  DDP cannot share one process with its baseline; that is why it is interleaved instead.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = {  # recipe: (batch key, local batch, steps, extra args)
    "cbsom_digits": ("data.init_args.batch_size", 64, 60, []),
    "feasible_digits": ("data.init_args.batch_size", 64, 200, ["--trainer.check_val_every_n_epoch=1000"]),
    "fox_lm": ("data.init_args.batch_size", 16, 30, ["--data.init_args.max_bytes=2000000",
                                                      "--trainer.val_check_interval=1000"]),
}


class StepTimer(L.Callback):
    """Writes global samples/s over steps ``warmup..end`` to ``out`` (rank 0)."""

    def __init__(self, out: str, warmup: int = 5):
        self.out, self.warmup, self.start, self.samples = out, warmup, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.start is not None:
            self.samples += len(batch[0]) * trainer.world_size

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero and self.start is not None:
            elapsed = time.perf_counter() - self.start
            Path(self.out).write_text(json.dumps({"samples_per_s": self.samples / elapsed, "seconds": elapsed}))


def measure(recipe: str, devices: int, tmp: Path, tag: str, threads: int) -> float:
    key, batch, steps, extra = CASES[recipe]
    out = tmp / f"{recipe}-{tag}.json"
    cfg = tmp / f"{recipe}-{tag}.yaml"
    cfg.write_text(f"trainer:\n  callbacks:\n    - class_path: scripts.bench_ddp.StepTimer\n"
                   f"      init_args:\n        out: {out}\n")
    args = [sys.executable, "-m", "recipes", "fit", "--config", f"recipes/{recipe}.yaml", "--config", str(cfg),
            f"--{key}={batch}", f"--trainer.max_steps={steps}", "--trainer.accelerator=cpu",
            f"--trainer.devices={devices}", f"--trainer.strategy={'ddp' if devices > 1 else 'auto'}",
            "--trainer.enable_progress_bar=false", "--trainer.logger=false", "--checkpoint.every_n_train_steps=100000",
            f"--trainer.default_root_dir={tmp / tag}", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(out.read_text())["samples_per_s"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--recipes", nargs="+", default=list(CASES))
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    rows, cores = [], os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for recipe in args.recipes:
            single, full, two = [], [], []
            for r in range(args.reps):
                single.append(measure(recipe, 1, tmp, f"single{r}", 1))
                full.append(measure(recipe, 1, tmp, f"full{r}", cores))
                two.append(measure(recipe, 2, tmp, f"ddp{r}", max(1, cores // 2)))
            a, f, b = statistics.median(single), statistics.median(full), statistics.median(two)
            rows.append((recipe, CASES[recipe][1], a, f, b))
            print(f"{recipe}: 1 process x 1 thread {a:.0f}, x {cores} threads {f:.0f}, 2-process DDP {b:.0f} "
                  f"samples/s (x{b / a:.2f} / x{b / f:.2f})", flush=True)
    text = [f"### DDP throughput, CPU ({os.cpu_count()} cores, gloo); torch {__import__('torch').__version__}", "",
            "| recipe | local batch | 1 process, 1 thread | 1 process, all cores | 2-process DDP, 1 thread each | "
            "DDP × 1 thread | DDP × all cores |", "|---|---|---|---|---|---|---|"]
    text += [f"| {r} | {b} | {a:.0f} | {f:.0f} | {t:.0f} | {t / a:.2f} | {t / f:.2f} |" for r, b, a, f, t in rows]
    text[2] = text[2].replace("| 1 process, 1 thread |", "| 1 process, 1 thread (samples/s) |")
    text += ["", "Reproduce: `python scripts/bench_ddp.py`"]
    print("\n".join(text))
    if args.write:
        from scripts._report import update_section

        update_section("bench_ddp_cpu", "\n".join(text))


if __name__ == "__main__":
    main()
