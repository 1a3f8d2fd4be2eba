"""A* trace datasets of the Dualformer recipes (mazes and Sokoban, ``datamodules.search_tasks``), generated once in
parallel processes and memory-mapped from disk (spec ``dualformer.md`` section 3; the official code keeps them in
MongoDB, files are enough).

Layout of a dataset folder::

    meta.json            the generation settings, the vocabulary and the split sizes
    train_tokens.npy     every example's prompt, full trace and plan ids, concatenated (int16)
    train_index.npy      (n, 5) int64: offset, prompt length, trace length, plan length, grid size
    test_tokens.npy, test_index.npy

Generation is a pure function of the settings: layout ``i`` of a split is drawn from its own
``random.Random("<task>:<split seed>:<i>")``, the test split from seed ``seed + 10**6`` and the train split from
``seed``; train layouts that also occur in the test split are skipped, so no layout is shared (the paper's unseen
mazes; whole puzzles for Sokoban), and duplicate examples are dropped.  The same settings give the same files
whatever the number of processes.  A folder is written atomically (a temporary folder renamed into place) and reused when its
``meta.json`` matches.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from datamodules.maze_astar import MIN_SIZE
from datamodules.search_tasks import check_task, layout_examples, vocabulary

FORMAT_VERSION = 1
TEST_SEED_OFFSET = 10 ** 6
LAYOUTS_PER_CHUNK = 64


@dataclass(frozen=True)
class TraceDataConfig:
    """What a dataset folder holds.  ``pairs_per_layout`` (maze): (start, goal) draws per wall layout (the official
    generator tries up to 100); ``walls`` / ``boxes`` / ``max_expansions`` / ``max_trace_tokens`` / ``max_cost``:
    Sokoban (``max_cost`` 0: ``boxes * size^2``; ``max_trace_tokens`` 0: no cap)."""
    task: str = "maze"
    sizes: Tuple[int, ...] = (5,)
    n_train: int = 20000
    n_test: int = 200
    pairs_per_layout: int = 1
    seed: int = 0
    walls: int = 2
    boxes: int = 2
    max_expansions: int = 20000
    max_trace_tokens: int = 0
    max_cost: int = 0

    def __post_init__(self):
        check_task(self.task)
        sizes = tuple(self.sizes) if isinstance(self.sizes, (list, tuple)) else (self.sizes,)
        low = MIN_SIZE if self.task == "maze" else 5
        for s in sizes:
            if not isinstance(s, int) or isinstance(s, bool) or s < low:
                raise ValueError(f"{self.task} size must be an integer >= {low}, got {s!r}")
        if not sizes:
            raise ValueError("sizes must name at least one size")
        object.__setattr__(self, "sizes", sizes)
        for name in ("n_train", "n_test", "pairs_per_layout", "walls", "boxes", "max_expansions",
                     "max_trace_tokens", "max_cost"):
            v = getattr(self, name)
            low = 1 if name in ("pairs_per_layout", "boxes", "max_expansions") else 0
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")

    @property
    def max_size(self) -> int:
        return max(self.sizes)

    @property
    def vocabulary(self) -> List[str]:
        return vocabulary(self.task, self.max_size, self.max_cost, self.boxes)

    def layout(self, rng: random.Random) -> list:
        size = self.sizes[rng.randrange(len(self.sizes))]
        return layout_examples(self.task, rng, size, self.pairs_per_layout, self.walls, self.boxes,
                               self.max_expansions, self.max_trace_tokens, self.max_cost)


def _chunk(args) -> List[tuple]:
    """Examples of layouts ``start .. stop-1`` of one split stream: (split key, dedupe key, size, ids...)."""
    stream_seed, start, stop, cfg = args
    ids = {w: i for i, w in enumerate(cfg.vocabulary)}
    out = []
    for i in range(start, stop):
        rng = random.Random(f"{cfg.task}:{stream_seed}:{i}")
        for key, dedupe, size, *words in cfg.layout(rng):
            if any(w not in ids for seq in words for w in seq):
                continue  # a cost beyond the vocabulary (Sokoban)
            out.append((key, dedupe, size, *(np.asarray([ids[w] for w in seq], dtype=np.int16) for seq in words)))
    return out


def generate_split(stream_seed: int, count: int, cfg: TraceDataConfig, exclude: frozenset = frozenset(),
                   processes: int = 1, desc: str = "mazes") -> List[tuple]:
    """``count`` tasks of one split, in layout order, none on a layout in ``exclude``."""
    tasks: List[tuple] = []
    seen = set()
    next_layout = 0
    # fork where the platform has it (as DataLoader workers do): the workers run plain Python, and start in
    # milliseconds instead of re-importing the caller's modules
    method = "fork" if "fork" in get_all_start_methods() else "spawn"
    pool = get_context(method).Pool(processes) if processes > 1 else None
    try:
        with tqdm(total=count, desc=desc, unit="maze", dynamic_ncols=True, leave=False) as bar:
            while len(tasks) < count:
                jobs = []
                for _ in range(max(1, processes) * 8):
                    jobs.append((stream_seed, next_layout, next_layout + LAYOUTS_PER_CHUNK, cfg))
                    next_layout += LAYOUTS_PER_CHUNK
                results = pool.map(_chunk, jobs) if pool is not None else [_chunk(j) for j in jobs]
                before = len(tasks)
                for task in (t for chunk in results for t in chunk):
                    if task[0] in exclude or task[1] in seen or len(tasks) >= count:
                        continue
                    seen.add(task[1])
                    tasks.append(task)
                bar.update(len(tasks) - before)
                if next_layout > 1000 * max(count, 1) + 10 * LAYOUTS_PER_CHUNK:
                    raise ValueError(f"could not generate {count} distinct {cfg.task} examples of sizes "
                                     f"{list(cfg.sizes)}: only {len(tasks)} found; ask for fewer")
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return tasks


def _write_split(root: Path, split: str, tasks: Sequence[tuple]) -> None:
    index = np.zeros((len(tasks), 5), dtype=np.int64)
    pieces, offset = [], 0
    for n, (_, _, size, prompt, trace, plan) in enumerate(tasks):
        index[n] = (offset, len(prompt), len(trace), len(plan), size)
        pieces += [prompt, trace, plan]
        offset += len(prompt) + len(trace) + len(plan)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int16)
    np.save(root / f"{split}_tokens.npy", tokens.astype(np.int16))
    np.save(root / f"{split}_index.npy", index)


def _meta(cfg: TraceDataConfig, counts: Dict[str, int]) -> dict:
    return {"format": FORMAT_VERSION, "task": cfg.task, "config": {**asdict(cfg), "sizes": list(cfg.sizes)},
            "vocabulary": cfg.vocabulary, "splits": counts}


def ensure_dataset(root, cfg: TraceDataConfig, processes: int = 1) -> Path:
    """The dataset folder for ``cfg`` under ``root``, generated and written first when missing."""
    root = Path(root)
    name = f"{cfg.task}_{'-'.join(map(str, cfg.sizes))}_n{cfg.n_train}-{cfg.n_test}_s{cfg.seed}"
    if cfg.task == "maze":
        name += f"_p{cfg.pairs_per_layout}"
    else:
        name += f"_w{cfg.walls}b{cfg.boxes}_t{cfg.max_trace_tokens}"
    folder = root / name
    want = _meta(cfg, {"train": cfg.n_train, "test": cfg.n_test})
    if (folder / "meta.json").is_file():
        have = json.loads((folder / "meta.json").read_text())
        if have == want:
            return folder
        raise ValueError(f"{folder} holds a different dataset (its meta.json does not match these settings); "
                         f"remove it or choose another data_dir")
    test = generate_split(cfg.seed + TEST_SEED_OFFSET, cfg.n_test, cfg, processes=processes,
                          desc=f"test {cfg.task}")
    train = generate_split(cfg.seed, cfg.n_train, cfg, exclude=frozenset(t[0] for t in test), processes=processes,
                           desc=f"train {cfg.task}")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".maze-", dir=root))
    try:
        _write_split(tmp, "train", train)
        _write_split(tmp, "test", test)
        (tmp / "meta.json").write_text(json.dumps(want))
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "meta.json").is_file():  # another process won the race: use its copy
            raise
    return folder


class TraceDataset:
    """One split of a dataset folder, memory-mapped: ``[i]`` -> dict of ``prompt``, ``trace``, ``plan`` (int64
    arrays of ids) and ``size``; ``task`` and ``vocabulary`` from its ``meta.json``."""

    def __init__(self, folder, split: str):
        folder = Path(folder)
        self.meta = json.loads((folder / "meta.json").read_text())
        self.tokens = np.load(folder / f"{split}_tokens.npy", mmap_mode="r")
        self.index = np.load(folder / f"{split}_index.npy", mmap_mode="r")
        self.vocabulary: List[str] = self.meta["vocabulary"]
        self.task: str = self.meta["task"]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        off, lp, lt, ln, size = (int(v) for v in self.index[i])
        seq = np.asarray(self.tokens[off:off + lp + lt + ln], dtype=np.int64)
        return {"prompt": seq[:lp], "trace": seq[lp:lp + lt], "plan": seq[lp + lt:], "size": size}
