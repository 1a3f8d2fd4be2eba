"""Maze A* trace datasets, generated once in parallel processes and memory-mapped from disk (spec ``dualformer.md``
section 3; the official code keeps them in MongoDB, files are enough).

Layout of a dataset folder::

    meta.json            the generation settings, the vocabulary and the split sizes
    train_tokens.npy     every example's prompt, full trace and plan ids, concatenated (int16)
    train_index.npy      (n, 5) int64: offset, prompt length, trace length, plan length, maze size
    test_tokens.npy, test_index.npy

Generation is a pure function of the settings: layout ``i`` of a split is drawn from its own
``random.Random("maze:<split seed>:<i>")``, the test split from seed ``seed + 10**6`` and the train split from
``seed``; train layouts that also occur in the test split are skipped, so no layout is shared (the paper's unseen
mazes), and duplicate (layout, start, goal) tasks are dropped.  The same settings give the same files whatever the
number of processes.  A folder is written atomically (a temporary folder renamed into place) and reused when its
``meta.json`` matches.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from datamodules.maze_astar import MIN_SIZE, layout_tasks, maze_vocabulary, plan_tokens, prompt_tokens, trace_tokens

FORMAT_VERSION = 1
TEST_SEED_OFFSET = 10 ** 6
LAYOUTS_PER_CHUNK = 64


@dataclass(frozen=True)
class MazeDataConfig:
    sizes: Tuple[int, ...] = (5,)
    n_train: int = 20000
    n_test: int = 200
    pairs_per_layout: int = 1
    seed: int = 0

    def __post_init__(self):
        sizes = tuple(self.sizes) if isinstance(self.sizes, (list, tuple)) else (self.sizes,)
        for s in sizes:
            if not isinstance(s, int) or isinstance(s, bool) or s < MIN_SIZE:
                raise ValueError(f"maze size must be an integer >= {MIN_SIZE}, got {s!r}")
        if not sizes:
            raise ValueError("sizes must name at least one maze size")
        object.__setattr__(self, "sizes", sizes)
        for name in ("n_train", "n_test", "pairs_per_layout"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (0 if name != "pairs_per_layout" else 1):
                raise ValueError(f"{name} must be a non-negative integer (pairs_per_layout >= 1), got {v!r}")

    @property
    def max_size(self) -> int:
        return max(self.sizes)

    @property
    def vocabulary(self) -> List[str]:
        return maze_vocabulary(self.max_size)


def _chunk(args) -> List[tuple]:
    """Tasks of layouts ``start .. stop-1`` of one split stream, as (layout, start, goal, size, ids...)."""
    stream_seed, start, stop, sizes, pairs, max_size = args
    ids = {w: i for i, w in enumerate(maze_vocabulary(max_size))}
    out = []
    for i in range(start, stop):
        rng = random.Random(f"maze:{stream_seed}:{i}")
        size = sizes[rng.randrange(len(sizes))]
        for maze, result in layout_tasks(rng, size, pairs):
            encode = lambda words: np.asarray([ids[w] for w in words], dtype=np.int16)  # noqa: E731
            out.append((maze.layout(), maze.start, maze.goal, size, encode(prompt_tokens(maze)),
                        encode(trace_tokens(result.events)), encode(plan_tokens(result.plan))))
    return out


def generate_split(stream_seed: int, count: int, cfg: MazeDataConfig, exclude: frozenset = frozenset(),
                   processes: int = 1, desc: str = "mazes") -> List[tuple]:
    """``count`` tasks of one split, in layout order, none on a layout in ``exclude``."""
    tasks: List[tuple] = []
    seen = set()
    next_layout = 0
    pool = get_context("spawn").Pool(processes) if processes > 1 else None
    try:
        with tqdm(total=count, desc=desc, unit="maze", dynamic_ncols=True, leave=False) as bar:
            while len(tasks) < count:
                jobs = []
                for _ in range(max(1, processes) * 4):
                    jobs.append((stream_seed, next_layout, next_layout + LAYOUTS_PER_CHUNK, cfg.sizes,
                                 cfg.pairs_per_layout, cfg.max_size))
                    next_layout += LAYOUTS_PER_CHUNK
                results = pool.map(_chunk, jobs) if pool is not None else [_chunk(j) for j in jobs]
                before = len(tasks)
                for task in (t for chunk in results for t in chunk):
                    key = task[:3]
                    if task[0] in exclude or key in seen or len(tasks) >= count:
                        continue
                    seen.add(key)
                    tasks.append(task)
                bar.update(len(tasks) - before)
                if next_layout > 1000 * max(count, 1) + 10 * LAYOUTS_PER_CHUNK:
                    raise ValueError(f"could not generate {count} distinct mazes of sizes {list(cfg.sizes)}: "
                                     f"only {len(tasks)} exist; ask for fewer")
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return tasks


def _write_split(root: Path, split: str, tasks: Sequence[tuple]) -> None:
    index = np.zeros((len(tasks), 5), dtype=np.int64)
    pieces, offset = [], 0
    for n, (_, _, _, size, prompt, trace, plan) in enumerate(tasks):
        index[n] = (offset, len(prompt), len(trace), len(plan), size)
        pieces += [prompt, trace, plan]
        offset += len(prompt) + len(trace) + len(plan)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int16)
    np.save(root / f"{split}_tokens.npy", tokens.astype(np.int16))
    np.save(root / f"{split}_index.npy", index)


def _meta(cfg: MazeDataConfig, counts: Dict[str, int]) -> dict:
    return {"format": FORMAT_VERSION, "task": "maze", "config": {**asdict(cfg), "sizes": list(cfg.sizes)},
            "vocabulary": cfg.vocabulary, "splits": counts}


def ensure_dataset(root, cfg: MazeDataConfig, processes: int = 1) -> Path:
    """The dataset folder for ``cfg`` under ``root``, generated and written first when missing."""
    root = Path(root)
    folder = root / (f"maze_{'-'.join(map(str, cfg.sizes))}_n{cfg.n_train}-{cfg.n_test}_p{cfg.pairs_per_layout}"
                     f"_s{cfg.seed}")
    want = _meta(cfg, {"train": cfg.n_train, "test": cfg.n_test})
    if (folder / "meta.json").is_file():
        have = json.loads((folder / "meta.json").read_text())
        if have == want:
            return folder
        raise ValueError(f"{folder} holds a different dataset (its meta.json does not match these settings); "
                         f"remove it or choose another data_dir")
    test = generate_split(cfg.seed + TEST_SEED_OFFSET, cfg.n_test, cfg, processes=processes, desc="test mazes")
    train = generate_split(cfg.seed, cfg.n_train, cfg, exclude=frozenset(t[0] for t in test), processes=processes,
                           desc="train mazes")
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


class MazeTraces:
    """One split of a dataset folder, memory-mapped: ``[i]`` -> dict of ``prompt``, ``trace``, ``plan`` (int64
    arrays of ids) and ``size``."""

    def __init__(self, folder, split: str):
        folder = Path(folder)
        self.meta = json.loads((folder / "meta.json").read_text())
        self.tokens = np.load(folder / f"{split}_tokens.npy", mmap_mode="r")
        self.index = np.load(folder / f"{split}_index.npy", mmap_mode="r")
        self.vocabulary: List[str] = self.meta["vocabulary"]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        off, lp, lt, ln, size = (int(v) for v in self.index[i])
        seq = np.asarray(self.tokens[off:off + lp + lt + ln], dtype=np.int64)
        return {"prompt": seq[:lp], "trace": seq[lp:lp + lt], "plan": seq[lp + lt:], "size": size}
