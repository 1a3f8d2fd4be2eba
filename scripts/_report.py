"""Helpers shared by the benchmark scripts: interleaved timing and writing a section of docs/performance.md."""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch


ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "performance.md"


def fit_run(configs: List[str], run_dir: Path, extra: List[str]) -> Tuple[Path, float]:
    """``python -m recipes fit`` with ``configs`` (merged in order) into ``run_dir`` (logs in ``logs/version_0``, no
    progress bar); returns the log folder and the wall time.  A failed run raises with its stderr tail."""
    cmd = [sys.executable, "-m", "recipes", "fit", *(a for c in configs for a in ("--config", str(c))),
           f"--trainer.default_root_dir={run_dir}", f"--trainer.logger.init_args.save_dir={run_dir}",
           "--trainer.logger.init_args.version=0", "--trainer.enable_progress_bar=false", *extra]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise RuntimeError(f"run failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return run_dir / "logs" / "version_0", time.time() - start


def run_grid(seeds, modes, out: Path, run: Callable, describe: Callable) -> list:
    """``run(mode, seed)`` for every seed and mode (modes inner, in order), printing ``describe(result)``."""
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in seeds:
        for mode in modes:
            result = run(mode, seed)
            results.append(result)
            print(f"{mode:7s} seed {seed}: {describe(result)} ({result['seconds']:.0f} s)", flush=True)
    return results


def seeds_main(doc: str, script: str, compare, write, default_seeds=(0, 1, 2, 3)) -> None:
    """The command line shared by the multi-seed comparison scripts: ``--seeds``, ``--out``; prints the table."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(default_seeds))
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / script)
    args = ap.parse_args()
    results = compare(args.seeds, args.out)
    print(write(results, args.out, f"python scripts/{script}.py --seeds " + " ".join(map(str, args.seeds))))


def shown_command(script: str, argv: List[str]) -> str:
    """``python scripts/<script>.py`` with ``argv`` minus ``--out <folder>`` (a local path, not part of the recipe of
    the numbers): the command a results section names."""
    kept = [a for i, a in enumerate(argv) if a != "--out" and (i == 0 or argv[i - 1] != "--out")]
    return " ".join([f"python scripts/{script}.py", *kept])


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_times(fns: Dict[str, Callable[[], None]], reps: int, device: str = "cpu", warmup: int = 2):
    """Median seconds per call of each function, run round-robin so machine noise hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in samples.items()}


def update_section(name: str, text: str, path: Path = DOCS) -> None:
    """Replace (or append) the block between ``<!-- name:start -->`` and ``<!-- name:end -->``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text.rstrip()}\n{end}"
    old = path.read_text() if path.exists() else "# Performance\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def write_checked_section(name: str, lines: List[str], verdict: Dict[str, bool], path: Path) -> str:
    """``lines`` plus a ``Checks:`` line (each acceptance threshold, yes / NO) as section ``name`` of ``path``;
    returns the text."""
    text = "\n".join([*lines, "Checks: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in verdict.items()), ""])
    update_section(name, text, path)
    return text
