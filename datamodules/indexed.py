"""Items that carry their position in the training set, for per-sample state such as Feasible Learning's
multipliers (spec ``shared/specs/feasible_learning.md`` P7: the id is the global position in the dataset, stable
across epochs, shuffles, augmentation and ranks)."""
from __future__ import annotations

from typing import Optional

from torch.utils.data import DataLoader, Dataset

from datamodules.sampling import shuffled_resumable


class IndexedDataset(Dataset):
    """``dataset[i] = (x, y)`` -> ``(x, y, i)``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        return (*item, i) if isinstance(item, tuple) else (item, i)


class IndexedTrainLoaders:
    """Mixin for map-style image datamodules: the resumable shuffled training loader, the in-order un-augmented
    training pass (``train_eval_dataloader``, for per-sample metrics), ``num_train_samples``, and ``(x, y, index)``
    items when ``hparams.with_index``.  Expects ``train_set`` / ``train_eval_set`` and ``hparams`` with
    ``batch_size``, ``seed``, ``num_workers`` and ``with_index``."""

    train_drop_last = False
    eval_batch_size: Optional[int] = 512  # None: the training batch size

    @property
    def num_train_samples(self) -> int:
        self.setup()
        return len(self.train_set)

    def _indexed(self, data):
        return IndexedDataset(data) if self.hparams.with_index else data

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        data = self._indexed(self.train_set)
        sampler = shuffled_resumable(data, hp.batch_size, self.trainer, hp.seed, drop_last=self.train_drop_last)
        return DataLoader(data, batch_size=hp.batch_size, sampler=sampler, num_workers=hp.num_workers,
                          drop_last=self.train_drop_last, persistent_workers=hp.num_workers > 0)

    def train_eval_dataloader(self) -> DataLoader:
        batch = self.eval_batch_size or self.hparams.batch_size
        return DataLoader(self._indexed(self.train_eval_set), batch_size=batch, num_workers=self.hparams.num_workers)


def held_out_predictions(datamodule, dataset, batch_size: int) -> DataLoader:
    """``predict``'s loader: ``dataset`` in order with ``(x, y, index)`` items (split across DDP ranks)."""
    from datamodules.sampling import eval_sampler

    datamodule.setup("predict")
    data = IndexedDataset(dataset)
    return DataLoader(data, batch_size=batch_size, sampler=eval_sampler(data, datamodule.trainer),
                      num_workers=datamodule.hparams.num_workers)
