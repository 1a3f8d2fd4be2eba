"""Items that carry their position in the training set, for per-sample state such as Feasible Learning's
multipliers (spec ``shared/specs/feasible_learning.md`` P7: the id is the global position in the dataset, stable
across epochs, shuffles, augmentation and ranks)."""
from __future__ import annotations

from torch.utils.data import Dataset


class IndexedDataset(Dataset):
    """``dataset[i] = (x, y)`` -> ``(x, y, i)``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        return (*item, i) if isinstance(item, tuple) else (item, i)
