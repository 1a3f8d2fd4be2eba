"""Image classification data for the CB-SOM recipes.

``DigitsDataModule`` (the embedded default): scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10
classes; no download), scaled to [0, 1], stratified train/test split with a fixed seed (spec cbsom.md 4.1: 1,347 /
450).  The held-out part serves as validation and test set.
"""
from __future__ import annotations

from typing import Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset


class DigitsDataModule(L.LightningDataModule):
    num_classes = 10
    in_channels = 1

    def __init__(self, batch_size: int = 64, test_fraction: float = 0.25, split_seed: int = 0, num_workers: int = 0):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"data.test_fraction must be in (0, 1), got {test_fraction}")
        self.save_hyperparameters()
        self.train_set: Optional[TensorDataset] = None
        self.test_set: Optional[TensorDataset] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = (digits.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
        y = digits.target.astype(np.int64)
        hp = self.hparams
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=hp.test_fraction, stratify=y,
                                                  random_state=hp.split_seed)
        self.train_set = TensorDataset(torch.from_numpy(x_tr), torch.from_numpy(y_tr))
        self.test_set = TensorDataset(torch.from_numpy(x_te), torch.from_numpy(y_te))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True,
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256, num_workers=self.hparams.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
