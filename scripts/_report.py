"""Helpers shared by the benchmark scripts: interleaved timing and writing a section of docs/performance.md."""
from __future__ import annotations

import re
import statistics
import time
from pathlib import Path
from typing import Callable, Dict

import torch

DOCS = Path(__file__).resolve().parents[1] / "docs" / "performance.md"


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
