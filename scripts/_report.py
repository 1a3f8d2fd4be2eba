"""Helpers shared by the benchmark scripts: interleaved timing, writing a section of docs/performance.md, and the
output options (``--write``, ``--doc``, ``--csv``) the benchmarks share."""
from __future__ import annotations

import argparse
import csv
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

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


# ---------------------------------------------------------------------------------------------------------------
# The output options every benchmark script shares: --write / --doc / --csv
# ---------------------------------------------------------------------------------------------------------------
OUTPUT_FLAGS = ("--write", "--no-write", "--doc", "--csv")


def add_output_args(ap: argparse.ArgumentParser, write_default: bool = False) -> None:
    """``--write`` (update the script's section of the markdown file; ``--no-write`` turns it off where a script
    writes by default), ``--doc PATH`` (the file ``--write`` updates, default docs/performance.md) and ``--csv PATH``
    (the result rows as CSV, header row first)."""
    ap.add_argument("--write", action=argparse.BooleanOptionalAction, default=write_default,
                    help=f"update this script's section of --doc (default: {'on' if write_default else 'off'})")
    ap.add_argument("--doc", type=Path, default=DOCS,
                    help="markdown file --write updates (default docs/performance.md)")
    ap.add_argument("--csv", type=Path, default=None, help="also write the result rows to this CSV file")


def write_outputs(args: argparse.Namespace, section: str, text: str, header: Sequence[str],
                  rows: Iterable[Sequence]) -> None:
    """What ``add_output_args``' options ask for: ``text`` as section ``section`` of ``args.doc`` (with ``--write``)
    and ``rows`` under ``header`` as CSV (with ``--csv``; ``None`` cells are written empty)."""
    if args.write:
        update_section(section, text, args.doc)
    if args.csv is not None:
        write_csv(args.csv, header, rows)


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence]) -> None:
    rows = [list(r) for r in rows]
    bad = [r for r in rows if len(r) != len(header)]
    if bad:
        raise ValueError(f"CSV row {bad[0]} has {len(bad[0])} cells; the header has {len(header)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(header)
        out.writerows(["" if c is None else c for c in r] for r in rows)


def without_output_args(argv: Sequence[str]) -> List[str]:
    """``argv`` minus the output options (``--write``, ``--no-write``, ``--doc PATH``, ``--csv PATH``, also in the
    ``--doc=PATH`` form): what a results section shows as the command that produced the numbers."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--doc", "--csv"):
            skip = True
        elif a not in OUTPUT_FLAGS and not a.startswith(("--doc=", "--csv=")):
            kept.append(a)
    return kept


def short_error(err: BaseException, limit: int = 160) -> str:
    """One line naming a failure: the exception type and the first non-empty line of its message, shortened."""
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    text = f"{type(err).__name__}: {first}" if first else type(err).__name__
    text = text.replace("|", "/")  # it may go into a markdown table cell
    return text if len(text) <= limit else text[:limit - 3] + "..."
