"""Classification tasks for the random-weights / learned-biases recipes (spec random_weights_biases.md 4.1, 4.3).

``DigitsTasksDataModule`` (embedded): scikit-learn's digits scaled to [0, 1], stratified 75/25 split with
``random_state=0`` (1,347 / 450), flattened to 64 features, under one or more tasks built in ``setup()``:

* ``identity``; ``transpose`` (the 8x8 image transposed); ``invert`` (1 - x); ``permlabel`` (same inputs, label
  ``(3y + 1) mod 10``); ``vflip`` (rows flipped).

``MNISTFamilyDataModule``: one task per dataset, read from torchvision's on-disk layout under ``path`` (nothing is
downloaded): ``mnist``, ``fashion_mnist``, ``kmnist``, ``qmnist``, ``emnist_digits``, ``emnist_letters``,
``emnist_mnist`` (28x28 grey, 784 features; labels as torchvision gives them, EMNIST letters shifted to 0-25).

Items are ``(x, y, task_index)``; every task's training samples are shuffled together (each sample goes through its
own task's biases in the model).  ``tasks=None`` takes the model's task list (the model owns the bias sets), so a
recipe names its tasks once.  Predict items are ``(x, y, task_index, index)`` over the test sets in order.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from datamodules.sampling import eval_sampler, shuffled_resumable

DIGIT_TASKS = ("identity", "transpose", "invert", "permlabel", "vflip")


def digit_task(name: str, x: np.ndarray, y: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``x``: ``(N, 8, 8)`` in [0, 1]; the task's inputs and labels."""
    if name == "identity":
        return x, y
    if name == "transpose":
        return x.transpose(0, 2, 1), y
    if name == "invert":
        return 1.0 - x, y
    if name == "permlabel":
        return x, (3 * y + 1) % 10
    if name == "vflip":
        return x[:, ::-1, :], y
    raise ValueError(f"unknown digits task {name!r}; expected one of {', '.join(DIGIT_TASKS)}")


class _Indexed(Dataset):
    def __init__(self, data: TensorDataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        return (*self.data[i], i)


class _TaskData(L.LightningDataModule):
    """Shared loaders; subclasses fill ``self.splits = {task: (x_train, y_train, x_test, y_test)}`` in ``_load``."""

    def __init__(self):
        super().__init__()
        self.train_set: Optional[TensorDataset] = None
        self.test_set: Optional[TensorDataset] = None

    @property
    def task_names(self) -> List[str]:
        if self.hparams.tasks:
            return list(self.hparams.tasks)
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is not None and getattr(module, "tasks", None):
            return list(module.tasks)
        return [self.default_tasks[0]]

    def _load(self, tasks: List[str]) -> Dict[str, tuple]:
        raise NotImplementedError

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        tasks = self.task_names
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"data.tasks must be distinct, got {tasks}")
        splits = self._load(tasks)
        train, test = [], []
        for t, name in enumerate(tasks):
            x_tr, y_tr, x_te, y_te = splits[name]
            train.append((x_tr, y_tr, np.full(len(y_tr), t)))
            test.append((x_te, y_te, np.full(len(y_te), t)))

        def stack(parts):
            x, y, t = (np.concatenate(p) for p in zip(*parts))
            x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).flatten(1)
            return TensorDataset(x, torch.from_numpy(y.astype(np.int64)), torch.from_numpy(t.astype(np.int64)))

        self.train_set, self.test_set = stack(train), stack(test)
        self.in_features = self.train_set.tensors[0].shape[1]

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        sampler = shuffled_resumable(self.train_set, hp.batch_size, self.trainer, hp.seed, drop_last=False)
        return DataLoader(self.train_set, batch_size=hp.batch_size, sampler=sampler, num_workers=hp.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=1024, sampler=eval_sampler(self.test_set, self.trainer),
                          num_workers=self.hparams.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        self.setup("predict")
        data = _Indexed(self.test_set)
        return DataLoader(data, batch_size=1024, sampler=eval_sampler(data, self.trainer),
                          num_workers=self.hparams.num_workers)


class DigitsTasksDataModule(_TaskData):
    default_tasks = DIGIT_TASKS
    num_classes = 10

    def __init__(self, tasks: Optional[List[str]] = None, batch_size: int = 128, test_fraction: float = 0.25,
                 split_seed: int = 0, seed: Optional[int] = None, num_workers: int = 0):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"data.test_fraction must be in (0, 1), got {test_fraction}")
        for name in tasks or ():
            digit_task(name, np.zeros((1, 8, 8)), np.zeros(1, dtype=np.int64))  # names checked before any work
        self.save_hyperparameters(logger=False)  # model and data both have tasks / seed, meaning different things

    def _load(self, tasks: List[str]) -> Dict[str, tuple]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = digits.images.astype(np.float32) / 16.0
        x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target, test_size=self.hparams.test_fraction,
                                                  stratify=digits.target, random_state=self.hparams.split_seed)
        out = {}
        for name in tasks:
            a, b = digit_task(name, x_tr, y_tr), digit_task(name, x_te, y_te)
            out[name] = (a[0], a[1], b[0], b[1])
        return out


MNIST_FAMILY = {  # task -> (torchvision class, keyword arguments)
    "mnist": ("MNIST", {}), "fashion_mnist": ("FashionMNIST", {}), "kmnist": ("KMNIST", {}),
    "qmnist": ("QMNIST", {"what": None}), "emnist_digits": ("EMNIST", {"split": "digits"}),
    "emnist_letters": ("EMNIST", {"split": "letters"}), "emnist_mnist": ("EMNIST", {"split": "mnist"}),
}


class MNISTFamilyDataModule(_TaskData):
    """One task per dataset under ``path`` (torchvision's folder layout, e.g. ``path/MNIST/raw``)."""

    default_tasks = tuple(MNIST_FAMILY)
    num_classes = 26

    def __init__(self, path: str, tasks: Optional[List[str]] = None, batch_size: int = 256,
                 max_train_per_task: Optional[int] = None, seed: Optional[int] = None, num_workers: int = 0):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        unknown = [t for t in tasks or () if t not in MNIST_FAMILY]
        if unknown:
            raise ValueError(f"unknown MNIST-family task {unknown[0]!r}; expected one of {', '.join(MNIST_FAMILY)}")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"data.path {path!r} is not a folder (torchvision's MNIST-family layout)")
        self.save_hyperparameters(logger=False)  # model and data both have tasks / seed, meaning different things

    def _load(self, tasks: List[str]) -> Dict[str, tuple]:
        import torchvision.datasets as tvd

        out = {}
        for name in tasks:
            cls, kwargs = MNIST_FAMILY[name]
            parts = []
            for train in (True, False):
                extra = dict(kwargs)
                if cls == "QMNIST":
                    extra["what"] = "train" if train else "test10k"
                try:
                    ds = getattr(tvd, cls)(self.hparams.path, train=train, download=False, **extra)
                except RuntimeError as err:  # torchvision: "Dataset not found. You can use download=True ..."
                    raise FileNotFoundError(f"task {name!r}: no {cls} files under {self.hparams.path!r} "
                                            f"({' '.join(str(err).split())[:80]})") from None
                x = ds.data.numpy().astype(np.float32) / 255.0
                y = np.asarray(ds.targets)
                y = (y[:, 0] if y.ndim == 2 else y).astype(np.int64)  # QMNIST: extended targets, class first
                if name == "emnist_letters":
                    y = y - 1  # 1..26 -> 0..25
                if train and self.hparams.max_train_per_task:
                    x, y = x[: self.hparams.max_train_per_task], y[: self.hparams.max_train_per_task]
                parts += [x, y]
            out[name] = tuple(parts)
        return out
