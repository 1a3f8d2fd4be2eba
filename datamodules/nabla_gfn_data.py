"""Data for the Nabla-GFlowNet recipes (spec ``shared/specs/nabla_gfn.md`` 4.1-4.2; nothing is downloaded).

Tasks, by name:

* ``ring``: the 2-D prior data, 8 equal Gaussians (std ``RING_STD`` = 0.25) on a circle of radius 3;
* ``digits``: scikit-learn's bundled 8x8 handwritten digits, ``(1, 8, 8)`` scaled to [-1, 1], a stratified
  train/test split with a fixed seed.

``DiffusionDataModule`` serves a task's training samples to the prior (``lightning_modules.diffusion_prior``), in an
order that is a pure function of ``(seed, epoch)`` and restarts from the restored step (``datamodules.sampling``).
``AlignmentDataModule`` serves the alignment runs, whose samples come from the model itself: item ``i`` is the
iteration index ``i``, and a resumed run restarts from its step.  Both serve ``predict_batches`` items to
``predict`` (a batch of samples each).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from datamodules.sampling import ResumableSampler, resume_position, shuffled_resumable, world_of

TASKS = ("ring", "digits", "sd")  # sd: a diffusers pipeline folder (lightning_modules.nabla_gfn_sd), no data here
RING_MODES, RING_RADIUS, RING_STD = 8, 3.0, 0.25


def require_at_least(prefix: str, low, **values) -> None:
    """One line naming the first of ``values`` below ``low``: ``<prefix>.<name> must be >= <low>, got <value>``."""
    for name, value in values.items():
        if value < low:
            raise ValueError(f"{prefix}.{name} must be >= {low}, got {value}")


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {', '.join(TASKS)}")
    return task


def sample_shape(task: str) -> Tuple[int, ...]:
    if check_task(task) == "sd":
        raise ValueError("task 'sd' takes its latent shape from the model folder; it has no generated data")
    return (2,) if task == "ring" else (1, 8, 8)


def ring_modes(n: int = RING_MODES, radius: float = RING_RADIUS) -> torch.Tensor:
    """``(n, 2)`` mode centres, evenly spaced on the circle, the first at angle 0."""
    ang = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    return radius * torch.stack([ang.cos(), ang.sin()], dim=-1)


def sample_ring(n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    modes = ring_modes()
    which = torch.randint(len(modes), (n,), generator=generator)
    return (modes[which] + RING_STD * torch.randn(n, 2, generator=generator, dtype=torch.float64)).float()


def digits(split: str = "train", test_fraction: float = 0.2, split_seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(images (N, 1, 8, 8) in [-1, 1], labels)`` of the ``train`` or ``test`` part of the bundled digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    x_tr, x_te, y_tr, y_te = train_test_split(x, data.target.astype(np.int64), test_size=test_fraction,
                                              stratify=data.target, random_state=split_seed)
    x, y = (x_tr, y_tr) if split == "train" else (x_te, y_te)
    return torch.from_numpy(x), torch.from_numpy(y)


class DiffusionDataModule(L.LightningDataModule):
    """Training samples of ``task`` for the prior: ``n_train`` ring points drawn once from ``data_seed``, or the
    digits training split (``n_train`` unused).  Validation has one dummy batch: the prior's validation step samples
    from the model and scores it (``lightning_modules.diffusion_prior``)."""

    def __init__(self, task: str = "ring", n_train: int = 100_000, batch_size: int = 512, data_seed: int = 0,
                 seed: Optional[int] = None, predict_batches: int = 4):
        super().__init__()
        sample_shape(task)
        require_at_least("data", 1, batch_size=batch_size, n_train=n_train, predict_batches=predict_batches)
        self.save_hyperparameters()
        self.train_set: Optional[TensorDataset] = None

    @property
    def shape(self) -> Tuple[int, ...]:
        return sample_shape(self.hparams.task)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        if hp.task == "ring":
            x = sample_ring(hp.n_train, torch.Generator().manual_seed(hp.data_seed))
        else:
            x = digits("train")[0]
        self.train_set = TensorDataset(x)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        sampler = shuffled_resumable(self.train_set, hp.batch_size, self.trainer, hp.seed, drop_last=True)
        return DataLoader(self.train_set, batch_size=hp.batch_size, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Iterations(1), batch_size=1)

    test_dataloader = val_dataloader

    def predict_dataloader(self) -> DataLoader:
        """``predict_batches`` items: the model draws one batch of samples per item (``predict_step``)."""
        return DataLoader(_Iterations(self.hparams.predict_batches), batch_size=1)


class _Iterations(Dataset):
    """Item ``i`` is ``i``: ``n`` items, or unbounded (``None``, read through a sampler)."""

    def __init__(self, n: Optional[int]):
        self.n = n

    def __len__(self) -> int:
        return self.n if self.n is not None else 2 ** 62

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(i)


class AlignmentDataModule(L.LightningDataModule):
    """One item per alignment iteration (its index); the model draws its own trajectories.  ``task`` is read by the
    model (the sample shape, the reward's data); the epoch length only sets how often the epoch-level hooks run."""

    def __init__(self, task: str = "ring", iterations_per_epoch: int = 100, predict_batches: int = 4):
        super().__init__()
        check_task(task)
        require_at_least("data", 1, iterations_per_epoch=iterations_per_epoch, predict_batches=predict_batches)
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader:
        n = self.hparams.iterations_per_epoch
        epoch, done = resume_position(self.trainer, n)
        world, rank = world_of(self.trainer)
        sampler = ResumableSampler(_Iterations(None), world, rank, local_per_epoch=n, skip=done, start_epoch=epoch)
        return DataLoader(_Iterations(None), batch_size=1, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Iterations(1), batch_size=1)

    test_dataloader = val_dataloader

    def predict_dataloader(self) -> DataLoader:
        """``predict_batches`` items: the model draws one batch of samples per item (``predict_step``)."""
        return DataLoader(_Iterations(self.hparams.predict_batches), batch_size=1)
