"""Samplers that let a resumed run see exactly the batches an uninterrupted run would (shared by all datamodules).

Both are ``DistributedSampler`` subclasses, so Lightning keeps them as they are under DDP, and both restart from the
trainer's restored step count: ``skip`` local samples are left out of the epoch the run resumes in.  Their
``__len__`` is the full epoch, because Lightning counts a resumed epoch's batches from the restored step.
"""
from __future__ import annotations

import os
import warnings
from typing import Iterator, Optional, Tuple

import torch
from torch.utils.data import DistributedSampler

# Lightning warns that a mid-epoch resume is unreliable unless the loader has state_dict(); ours needs none: the
# sampler restarts from trainer.global_step and its order is a pure function of (seed, epoch) (tested).
warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")


def world_of(trainer) -> Tuple[int, int]:
    """``(world_size, global_rank)`` of the trainer, ``(1, 0)`` without one."""
    return (1, 0) if trainer is None else (trainer.world_size, trainer.global_rank)


def resume_position(trainer, batches_per_epoch: int) -> Tuple[int, int]:
    """``(epoch, batches already consumed in it)`` of a (resumed) fit, from the restored step count.

    Exact when the checkpoint was written at an optimizer-step boundary inside the epoch (step-based checkpoints),
    which is what the recipes write.
    """
    if trainer is None:
        return 0, 0
    consumed = trainer.global_step * trainer.accumulate_grad_batches
    epoch = trainer.current_epoch
    return epoch, min(batches_per_epoch, max(0, consumed - epoch * batches_per_epoch))


class ResumableSampler(DistributedSampler):
    """Sequential indices ``epoch * total + n * world + rank`` (for datasets whose item ``i`` is a pure function of
    ``i``, such as random text windows), ``local_per_epoch`` per rank and epoch."""

    def __init__(self, dataset, num_replicas: int, rank: int, local_per_epoch: int, skip: int = 0,
                 start_epoch: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=True)
        self.num_samples, self.total_size = local_per_epoch, local_per_epoch * num_replicas
        self.skip, self.first_epoch = skip, start_epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        skip = self.skip if self.epoch == self.first_epoch else 0
        base = self.epoch * self.total_size
        for n in range(skip, self.num_samples):
            yield base + n * self.num_replicas + self.rank


class ShuffleResumableSampler(DistributedSampler):
    """A fresh permutation of a finite dataset every epoch, drawn from ``(seed, epoch)`` only (as
    ``DistributedSampler``), split across ranks, minus the ``skip`` local samples a resumed epoch already used.

    Rank ``r`` takes the ``r``-th contiguous slice of every global batch of ``batch_size * world`` samples (the last,
    shorter global batch is cut into equal slices too).  So a DDP step sees the same samples as one process with
    the global batch, and each rank's local batch is exactly one micro-batch of one process that accumulates
    ``world`` micro-batches: BatchNorm groups the same samples either way.  With ``drop_last=False`` the permutation
    is padded by repeating its first samples (``DistributedSampler``'s rule) so every rank gets the same count.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 skip: int = 0, start_epoch: int = 0, drop_last: bool = False, batch_size: int = 1):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.skip, self.first_epoch, self.batch_size = skip, start_epoch, batch_size
        self.set_epoch(start_epoch)

    def _permutation(self) -> list:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            indices = torch.randperm(len(self.dataset), generator=g).tolist()
        else:
            indices = list(range(len(self.dataset)))
        if self.drop_last:
            return indices[: self.total_size]
        pad = self.total_size - len(indices)
        return indices + (indices * (pad // len(indices) + 1))[:pad]

    def __iter__(self) -> Iterator[int]:
        indices, world, step = self._permutation(), self.num_replicas, self.batch_size * self.num_replicas
        local = []
        for start in range(0, self.total_size, step):
            block = indices[start:start + step]
            share = len(block) // world
            local.extend(block[self.rank * share:(self.rank + 1) * share])
        skip = self.skip if self.epoch == self.first_epoch else 0
        return iter(local[skip:])


def shuffled_resumable(dataset, batch_size: int, trainer, seed: Optional[int], drop_last: bool,
                       shuffle: bool = True) -> ShuffleResumableSampler:
    """The training sampler for a finite map-style dataset, positioned where a resumed fit left off.  ``seed=None``
    follows the run's ``seed_everything`` value (as Lightning's own distributed sampler does), else 0."""
    if seed is None:
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    world, rank = world_of(trainer)
    local = len(dataset) // world if drop_last else -(-len(dataset) // world)
    batches = local // batch_size if drop_last else -(-local // batch_size)
    epoch, consumed = resume_position(trainer, max(1, batches))
    return ShuffleResumableSampler(dataset, world, rank, shuffle=shuffle, seed=seed, skip=consumed * batch_size,
                                   start_epoch=epoch, drop_last=drop_last, batch_size=batch_size)


def eval_sampler(dataset, trainer) -> Optional[DistributedSampler]:
    """Ordered, rank-split evaluation sampler under DDP; ``None`` (plain order) on one process."""
    world, rank = world_of(trainer)
    return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
