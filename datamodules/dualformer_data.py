"""The DataModule of the Dualformer recipes: maze or Sokoban A* traces (``task``) written once to disk
(``datamodules.trace_dataset``), memory-mapped, with Dualformer's structured trace dropping applied per example at
batch time (``datamodules.trace_dropping``).

One flag picks the arm: ``mixture: dualformer`` (p = 0.45, 1/6, 1/6, 1/6, 0.05), ``full_trace`` (Searchformer,
p0 = 1), ``solution_only`` (p4 = 1), or five probabilities ``[p0, p1, p2, p3, p4]``.

A training item is ``(src, tgt)``: ``src = bos prompt eos`` for the encoder, ``tgt = bos [dropped trace] plan eos``
for the decoder, so level-4 targets start with ``plan`` and every other one with ``create`` (the mode tokens).  The
dropping of item ``i`` in epoch ``e`` is drawn from ``(seed, e, i)`` alone, and the sampler restarts from the
trainer's step count, so a resumed run sees exactly the batches of an uninterrupted one.  Validation loss uses the
same mixture on the test split with a fixed draw (epoch 0), as the official trainer drops on its test set too
(errata 5); the plan metrics come from decoding (``callbacks.dualformer_report``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Union

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.trace_dataset import TraceDataConfig, TraceDataset, ensure_dataset
from datamodules.sampling import ShuffleResumableSampler, eval_sampler, shuffled_resumable
from datamodules.trace_dropping import TraceDropper, example_rng, mixture


class EpochKeys(ShuffleResumableSampler):
    """Yields ``epoch * n + i`` instead of ``i`` so the dataset knows the epoch of each draw (also in workers)."""

    def __iter__(self):
        n = len(self.dataset)
        return (self.epoch * n + i for i in super().__iter__())


class DroppedTraces(Dataset):
    """``[epoch * n + i]`` -> item ``i`` of ``traces`` with its trace dropped by the draw of ``(seed, epoch, i)``:
    ``src`` and ``tgt`` ids, ``level``, ``index``, maze ``size`` and ``optimal_cells`` (A* plan length)."""

    def __init__(self, traces: TraceDataset, dropper: TraceDropper, seed: int, fixed_epoch: Optional[int] = None):
        self.traces, self.dropper, self.seed, self.fixed_epoch = traces, dropper, seed, fixed_epoch
        vocab = {w: i for i, w in enumerate(traces.vocabulary)}
        self.bos, self.eos = vocab["bos"], vocab["eos"]

    def __len__(self) -> int:
        return len(self.traces)

    def __getitem__(self, key: int):
        epoch, i = divmod(int(key), len(self.traces))
        if self.fixed_epoch is not None:
            epoch = self.fixed_epoch
        item = self.traces[i]
        level, trace = self.dropper(item["trace"], example_rng(self.seed, epoch, i))
        src = np.concatenate([[self.bos], item["prompt"], [self.eos]])
        tgt = np.concatenate([[self.bos], np.asarray(trace, dtype=np.int64), item["plan"], [self.eos]])
        return {"src": torch.from_numpy(src), "tgt": torch.from_numpy(tgt), "level": level, "index": i,
                "size": item["size"], "optimal_cells": len(item["plan"]) // 3}


def pad_right(seqs: Sequence[torch.Tensor], pad_id: int) -> torch.Tensor:
    out = torch.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=torch.long)
    for row, s in enumerate(seqs):
        out[row, :len(s)] = s
    return out


class PadCollate:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items):
        out = {k: pad_right([it[k] for it in items], self.pad_id) for k in ("src", "tgt")}
        out.update({k: torch.tensor([it[k] for it in items]) for k in ("level", "index", "size", "optimal_cells")})
        return out


class DualformerDataModule(L.LightningDataModule):
    def __init__(self, task: str = "maze", sizes: Union[int, List[int]] = 5, n_train: int = 20000, n_test: int = 200,
                 pairs_per_layout: int = 1, data_seed: int = 0, data_dir: Optional[str] = None, walls: int = 2,
                 boxes: int = 2, max_expansions: int = 20000, max_trace_tokens: int = 0, max_cost: int = 0,
                 mixture: Union[str, List[float]] = "dualformer", level3_variant: str = "paper",
                 create_drop: float = 0.3, batch_size: int = 32, val_batch_size: int = 64, val_items: int = 200,
                 processes: int = 2, num_workers: int = 0, seed: Optional[int] = None):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.config = TraceDataConfig(task, tuple(sizes) if isinstance(sizes, (list, tuple)) else (sizes,), n_train,
                                      n_test, pairs_per_layout, data_seed, walls, boxes, max_expansions,
                                      max_trace_tokens, max_cost)
        self.probs = _mixture(mixture)
        if data_dir is not None:
            blocking = next((p for p in (Path(data_dir), *Path(data_dir).parents) if p.exists()), None)
            if blocking is not None and not blocking.is_dir():
                raise NotADirectoryError(f"data.data_dir={data_dir!r}: {str(blocking)!r} is a file; expected a "
                                         f"folder (it is created when missing)")
        for name, v in (("batch_size", batch_size), ("val_batch_size", val_batch_size), ("processes", processes)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"data.{name} must be a positive integer, got {v!r}")
        self.vocabulary = self.config.vocabulary
        ids = {w: i for i, w in enumerate(self.vocabulary)}
        self.pad_id, self.bos_id, self.eos_id = ids["pad"], ids["bos"], ids["eos"]
        self.create_id, self.plan_id = ids["create"], ids["plan"]
        self.dropper = TraceDropper(self.probs, ids["create"], ids["close"],
                                    frozenset(i for w, i in ids.items() if w[0] == "c" and w[1:].isdigit()),
                                    level3_variant, create_drop)
        self.folder: Optional[Path] = None
        self.train_set: Optional[TraceDataset] = None
        self.test_set: Optional[TraceDataset] = None

    @property
    def task(self) -> str:
        return self.config.task

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    def _root(self) -> Path:
        if self.hparams.data_dir is not None:
            return Path(self.hparams.data_dir)
        return Path(self.trainer.default_root_dir if self.trainer is not None else ".") / "data"

    def prepare_data(self) -> None:
        ensure_dataset(self._root(), self.config, self.hparams.processes)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is None:
            self.folder = ensure_dataset(self._root(), self.config, self.hparams.processes)
            self.train_set, self.test_set = TraceDataset(self.folder, "train"), TraceDataset(self.folder, "test")

    @property
    def seed(self) -> int:
        return int(self.hparams.seed if self.hparams.seed is not None else os.environ.get("PL_GLOBAL_SEED", 0))

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        data = DroppedTraces(self.train_set, self.dropper, self.seed)
        base = shuffled_resumable(data, hp.batch_size, self.trainer, self.seed, drop_last=True)
        sampler = EpochKeys(data, base.num_replicas, base.rank, seed=base.seed, skip=base.skip,
                            start_epoch=base.first_epoch, drop_last=True, batch_size=hp.batch_size)
        return DataLoader(data, batch_size=hp.batch_size, sampler=sampler, drop_last=True, collate_fn=PadCollate(
            self.pad_id), num_workers=hp.num_workers, persistent_workers=hp.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        hp = self.hparams
        data = DroppedTraces(self.test_set, self.dropper, self.seed + 1, fixed_epoch=0)
        data = torch.utils.data.Subset(data, range(min(hp.val_items, len(data))))
        return DataLoader(data, batch_size=hp.val_batch_size, sampler=eval_sampler(data, self.trainer),
                          collate_fn=PadCollate(self.pad_id))

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """Every test puzzle in order (the prompts; ``predict`` decodes them in the model's ``predict_mode``)."""
        data = DroppedTraces(self.test_set, self.dropper, self.seed + 1, fixed_epoch=0)
        return DataLoader(data, batch_size=self.hparams.val_batch_size, sampler=eval_sampler(data, self.trainer),
                          collate_fn=PadCollate(self.pad_id))

    def decode(self, ids: Sequence[int]) -> List[str]:
        return [self.vocabulary[int(i)] for i in ids]


def _mixture(value):
    try:
        return mixture(value)
    except ValueError as err:
        raise ValueError(f"data.mixture: {err}") from None
