"""Image classification data for the CB-SOM recipes (nothing is downloaded).

* ``DigitsDataModule`` (the embedded default): scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10
  classes), scaled to [0, 1], stratified train/test split with a fixed seed (spec cbsom.md 4.1: 1,347 / 450).  The
  held-out part serves as validation and test set.
* ``CIFARDataModule``: CIFAR-10 / CIFAR-100 from the standard python-pickle folder.

With ``with_index=true`` the digits and CIFAR training items are ``(x, y, index)``, index = position in the training
set (Feasible Learning's per-sample multipliers); ``train_eval_dataloader()`` is the training set in order without
augmentation, for per-sample training-loss metrics.
* ``ImageFolderDataModule``: an ImageNet-style train/val ``ImageFolder`` tree with the paper's augmentations.

Training order is a pure function of ``(seed, epoch)`` (``seed`` unset: the run's ``seed_everything`` value) and
restarts from the trainer's restored step, so a run resumed mid-epoch sees the batches an uninterrupted run would
(``datamodules.sampling``); under DDP each rank gets its share of the same permutation.  Random augmentations
(CIFAR / ImageFolder) draw from torch's RNG, seeded by ``seed_everything`` but not restored on resume; the digits
recipes have none, so their resumed runs are bit-identical (tested).
"""
from __future__ import annotations

import os
from typing import Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from datamodules.indexed import IndexedTrainLoaders, held_out_predictions
from datamodules.sampling import eval_sampler, shuffled_resumable


class DigitsDataModule(IndexedTrainLoaders, L.LightningDataModule):
    num_classes = 10
    in_channels = 1

    def __init__(self, batch_size: int = 64, test_fraction: float = 0.25, split_seed: int = 0, num_workers: int = 0,
                 seed: Optional[int] = None, standardize: bool = False, with_index: bool = False):
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
        if hp.standardize:  # per pixel, with the training split's statistics (spec feasible_learning.md 4.1)
            mean, std = x_tr.mean(0, keepdims=True), x_tr.std(0, keepdims=True) + 1e-3
            x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
        self.train_set = self.train_eval_set = TensorDataset(torch.from_numpy(x_tr), torch.from_numpy(y_tr))
        self.test_set = TensorDataset(torch.from_numpy(x_te), torch.from_numpy(y_te))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256, sampler=eval_sampler(self.test_set, self.trainer),
                          num_workers=self.hparams.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """The held-out set in order, items ``(x, y, index)``: one prediction per sample."""
        return held_out_predictions(self, self.test_set, 256)


CIFAR_LAYOUT = {  # folder inside `path`, training files, test file, label key, classes
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], "test", b"fine_labels", 100),
}
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _read_cifar_file(path: str, label_key: bytes):
    """One CIFAR python batch as ``(uint8 (N, 3, 32, 32), int64 (N,))``; a one-line ValueError if it is not one."""
    import pickle

    try:
        with open(path, "rb") as fh:
            entry = pickle.load(fh, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is not a CIFAR python batch (unreadable pickle: {type(err).__name__})") from None
    if not isinstance(entry, dict) or b"data" not in entry or label_key not in entry:
        raise ValueError(f"{path} is not a CIFAR python batch (expected a dict with keys b'data' and {label_key!r})")
    data, labels = np.asarray(entry[b"data"]), np.asarray(entry[label_key])
    if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise ValueError(f"{path} is not a CIFAR python batch (data {tuple(data.shape)}, labels "
                         f"{tuple(labels.shape)}; expected (N, 3072) and (N,))")
    return data.astype(np.uint8).reshape(-1, 3, 32, 32), labels.astype(np.int64)


class _ArrayImages(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(torch.from_numpy(self.images[i])), int(self.labels[i])


class CIFARDataModule(IndexedTrainLoaders, L.LightningDataModule):
    """CIFAR-10 / CIFAR-100 from the standard python-pickle folder (``path`` holds ``cifar-10-batches-py`` or
    ``cifar-100-python``; nothing is downloaded).  Train: random crop 32 with padding 4 + horizontal flip."""

    in_channels = 3
    train_drop_last = True

    def __init__(self, path: str, variant: str = "cifar10", batch_size: int = 128, augment: bool = True,
                 num_workers: int = 0, seed: Optional[int] = None, with_index: bool = False):
        super().__init__()
        if variant not in CIFAR_LAYOUT:
            raise ValueError(f"data.variant={variant!r}; expected one of {', '.join(CIFAR_LAYOUT)}")
        folder, train_files, test_file, _, self.num_classes = CIFAR_LAYOUT[variant]
        root = os.path.join(path, folder)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"CIFAR folder {root!r} does not exist; expected the python version of "
                                    f"{variant} ({folder}/ with {', '.join(train_files[:2])}..., {test_file})")
        missing = [f for f in train_files + [test_file] if not os.path.isfile(os.path.join(root, f))]
        if missing:
            raise ValueError(f"CIFAR folder {root!r} is missing {', '.join(missing)}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters()
        self.root, self.train_files, self.test_file = root, train_files, test_file
        self.train_set = self.test_set = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        from torchvision.transforms import v2 as T

        label_key = CIFAR_LAYOUT[self.hparams.variant][3]
        parts = [_read_cifar_file(os.path.join(self.root, f), label_key) for f in self.train_files]
        x_tr, y_tr = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        x_te, y_te = _read_cifar_file(os.path.join(self.root, self.test_file), label_key)
        norm = [T.ToDtype(torch.float32, scale=True), T.Normalize(CIFAR_MEAN, CIFAR_STD)]
        aug = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if self.hparams.augment else []
        self.train_set = _ArrayImages(x_tr, y_tr, T.Compose(aug + norm))
        self.train_eval_set = _ArrayImages(x_tr, y_tr, T.Compose(norm))
        self.test_set = _ArrayImages(x_te, y_te, T.Compose(norm))


    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256, sampler=eval_sampler(self.test_set, self.trainer),
                          num_workers=self.hparams.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """The held-out set in order, items ``(x, y, index)``: one prediction per sample."""
        return held_out_predictions(self, self.test_set, 256)


class ImageFolderDataModule(L.LightningDataModule):
    """ImageNet-style ``path/train/<class>/*`` and ``path/val/<class>/*`` (torchvision ``ImageFolder``) with the
    paper's augmentations: train RandomResizedCrop(image_size) + horizontal flip, val Resize(resize) +
    CenterCrop(image_size), ImageNet normalisation."""

    in_channels = 3

    def __init__(self, path: str, image_size: int = 224, resize: int = 256, batch_size: int = 256,
                 num_workers: int = 8, seed: Optional[int] = None):
        super().__init__()
        for split in ("train", "val"):
            d = os.path.join(path, split)
            if not os.path.isdir(d):
                raise FileNotFoundError(f"image folder {d!r} does not exist; expected {path}/train/<class>/*.JPEG "
                                        f"and {path}/val/<class>/*.JPEG")
        classes = sorted(e.name for e in os.scandir(os.path.join(path, "train")) if e.is_dir())
        if not classes:
            raise ValueError(f"image folder {os.path.join(path, 'train')!r} has no class sub-folders")
        if image_size < 1 or resize < image_size:
            raise ValueError(f"need 1 <= image_size <= resize, got image_size={image_size}, resize={resize}")
        self.save_hyperparameters()
        self.num_classes = len(classes)
        self.train_set = self.val_set = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        from torchvision.datasets import ImageFolder
        from torchvision.transforms import v2 as T

        hp = self.hparams
        norm = [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        self.train_set = ImageFolder(os.path.join(hp.path, "train"),
                                     T.Compose([T.RandomResizedCrop(hp.image_size), T.RandomHorizontalFlip()] + norm))
        self.val_set = ImageFolder(os.path.join(hp.path, "val"),
                                   T.Compose([T.Resize(hp.resize), T.CenterCrop(hp.image_size)] + norm))
        if self.val_set.classes != self.train_set.classes:
            only_train = sorted(set(self.train_set.classes) - set(self.val_set.classes))
            only_val = sorted(set(self.val_set.classes) - set(self.train_set.classes))
            raise ValueError(f"train and val class folders differ under {hp.path!r}: only in train {only_train}, "
                             f"only in val {only_val}")

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        sampler = shuffled_resumable(self.train_set, hp.batch_size, self.trainer, hp.seed, drop_last=True)
        return DataLoader(self.train_set, batch_size=hp.batch_size, sampler=sampler, drop_last=True,
                          num_workers=hp.num_workers, persistent_workers=hp.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size,
                          sampler=eval_sampler(self.val_set, self.trainer), num_workers=self.hparams.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """The val images in order, items ``(x, y, index)``: one prediction per image."""
        return held_out_predictions(self, self.val_set, self.hparams.batch_size)

