"""Training-step cost of bias-only learning against full training of the same network (same width, same draw).

    python scripts/bench_bias_only.py [--widths 1024 4096 16384] [--features 64 784] [--reps 30] [--device cuda]
    python scripts/bench_bias_only.py --no-write --csv rows.csv   # CSV rows only, docs/performance.md untouched

A step is forward + backward + Adam on a batch of 128; the two modes run round-robin in one process
(``scripts._report.interleaved_times``) and the table gives the ratio bias-only / full.  With frozen weights the
backward computes no weight gradient (one matmul of three per layer) and Adam touches only the biases.  Memory: the
bytes of trained state (parameters, gradients, Adam's two moments), exact; and the peak memory of training: on CUDA
the peak allocated memory of a step, on CPU the growth of the peak resident set over three steps in a fresh Linux
process per mode (peak RSS reset through ``/proc/self/clear_refs`` after building model and batch, ``VmHWM`` after
the steps minus ``VmRSS`` before: activations, gradients and Adam state, with large blocks returned to the OS).
The device defaults to CUDA when available.  Results go to section ``bias_only_step`` of docs/performance.md (or
``--doc PATH``) unless ``--no-write``; ``--csv PATH`` also writes the table's rows (ms, KiB / MiB as in the table).
"""
from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_modules.bias_learning import BiasLearningMLP  # noqa: E402
from scripts._report import add_output_args, interleaved_times, without_output_args, write_outputs  # noqa: E402


def make_step(model: BiasLearningMLP, x: torch.Tensor, y: torch.Tensor, task: torch.Tensor):
    opt = model.configure_optimizers()

    def step():
        opt.zero_grad(set_to_none=True)
        model.training_step((x, y, task), 0).backward()
        opt.step()
    return step


def trained_state_bytes(model: BiasLearningMLP) -> int:
    return sum(4 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)  # p, grad, m, v


def peak_cuda_bytes(step, device: str) -> int:
    if not device.startswith("cuda"):
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def peak_cpu_bytes(mode: str, features: int, width: int, batch: int) -> int:
    """Peak-RSS growth of three training steps, measured in a fresh process (no other run's pages in the way)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # big blocks go back to the OS when freed
    out = subprocess.run([sys.executable, __file__, "--peak-child", mode, str(features), str(width), str(batch)],
                         capture_output=True, text=True, check=True, cwd=ROOT, env=env)
    return int(out.stdout.strip().splitlines()[-1])


def _peak_child(mode: str, features: int, width: int, batch: int) -> None:
    torch.manual_seed(0)
    model = BiasLearningMLP(width=width, in_features=features, train_weights=mode == "full")
    model.log = lambda *a, **k: None
    x, y, task = torch.rand(batch, features), torch.randint(0, 10, (batch,)), torch.zeros(batch, dtype=torch.long)
    step = make_step(model, x, y, task)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:  # Linux: reset the peak RSS (VmHWM) to the current RSS
        fh.write("5")
    before = _status_kib("VmRSS")
    for _ in range(3):
        step()
    print(1024 * (_status_kib("VmHWM") - before))


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        return int(next(line for line in fh if line.startswith(key + ":")).split()[1])


def bench(widths, features_list, reps: int, device: str, batch: int = 128):
    rows = []
    for features in features_list:
        for width in widths:
            g = torch.Generator().manual_seed(0)
            x = torch.rand(batch, features, generator=g).to(device)
            y = torch.randint(0, 10, (batch,), generator=g).to(device)
            task = torch.zeros(batch, dtype=torch.long, device=device)
            models = {mode: BiasLearningMLP(width=width, in_features=features, train_weights=mode == "full").to(device)
                      for mode in ("bias_only", "full")}
            for m in models.values():
                m.log = lambda *a, **k: None  # no trainer: skip logging
            steps = {mode: make_step(m, x, y, task) for mode, m in models.items()}
            times = interleaved_times(steps, reps, device)
            rows.append({"features": features, "width": width, "bias_ms": 1e3 * times["bias_only"],
                         "full_ms": 1e3 * times["full"], "ratio": times["bias_only"] / times["full"],
                         "bias_state": trained_state_bytes(models["bias_only"]),
                         "full_state": trained_state_bytes(models["full"]),
                         "bias_peak": peak_cuda_bytes(steps["bias_only"], device) if device != "cpu" else
                         peak_cpu_bytes("bias_only", features, width, batch),
                         "full_peak": peak_cuda_bytes(steps["full"], device) if device != "cpu" else
                         peak_cpu_bytes("full", features, width, batch)})
            r = rows[-1]
            print(f"d={features:4d} N={width:6d}: bias-only {r['bias_ms']:.2f} ms, full {r['full_ms']:.2f} ms, "
                  f"ratio {r['ratio']:.2f}", flush=True)
    return rows


CSV_HEADER = ["features", "width", "bias_only_ms", "full_ms", "bias_only_over_full", "trained_state_bias_only_kib",
              "trained_state_full_mib", "peak_bias_only_mib", "peak_full_mib", "peak_ratio"]


def csv_rows(rows):
    return [[r["features"], r["width"], r["bias_ms"], r["full_ms"], r["ratio"], r["bias_state"] / 1024,
             r["full_state"] / 2**20, r["bias_peak"] / 2**20, r["full_peak"] / 2**20,
             r["bias_peak"] / max(1, r["full_peak"])] for r in rows]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--features", type=int, nargs="+", default=[64, 784])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--peak-child", nargs=4, metavar=("MODE", "D", "N", "BATCH"), help=argparse.SUPPRESS)
    add_output_args(ap, write_default=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    if args.peak_child:
        mode, *sizes = args.peak_child
        return _peak_child(mode, *map(int, sizes))
    rows = bench(args.widths, args.features, args.reps, args.device)
    where = f"{args.device}, {torch.get_num_threads()} threads" if args.device == "cpu" else args.device
    peak = "peak allocated" if args.device.startswith("cuda") else "peak RSS growth"
    lines = ["## Bias-only vs full training: step time and memory (issue #13)", "",
             f"`{' '.join(['python scripts/bench_bias_only.py', *without_output_args(argv)])}` ({where}, batch 128, "
             f"median of {args.reps} interleaved steps of forward + backward + Adam; one hidden layer, 10 classes; "
             f"trained state: parameters + gradients + Adam moments, exact; {peak}: of a training step"
             + (", in a fresh process per mode)." if args.device == "cpu" else ")."), "",
             "| inputs d | width N | bias-only ms | full ms | bias-only / full | trained state bias-only | full | "
             f"{peak} bias-only | full | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        line = (f"| {r['features']} | {r['width']} | {r['bias_ms']:.2f} | {r['full_ms']:.2f} | **{r['ratio']:.2f}** | "
                f"{r['bias_state'] / 1024:.0f} KiB | {r['full_state'] / 2**20:.1f} MiB | "
                f"{r['bias_peak'] / 2**20:.1f} MiB | {r['full_peak'] / 2**20:.1f} MiB | "
                f"**{r['bias_peak'] / max(1, r['full_peak']):.2f}** |")
        lines.append(line)
    text = "\n".join(lines) + "\n"
    write_outputs(args, "bias_only_step", text, CSV_HEADER, csv_rows(rows))
    print(text)


if __name__ == "__main__":
    main()
