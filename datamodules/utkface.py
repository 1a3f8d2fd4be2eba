"""Age regression from a folder of face images named in the UTKFace convention (nothing is downloaded).

File names are ``<age>_<gender>_<race>_<datetime>.jpg`` (the aligned-and-cropped release adds ``.chip.jpg``); the
age is the first field.  Preprocessing follows the Feasible Learning code (spec ``feasible_learning.md`` 1.6):
images resized to ``image_size`` (200), ages <= 4 kept with probability 0.3, a seeded 80/20 train/test split, the
training split then cut to its first ``train_fraction`` (0.25), targets standardised with the paper's mean 35.43 and
sd 18.77 (``target_mean`` / ``target_std``; null = the training split's own), images normalised per channel (ImageNet
statistics: the code's exact values are not recorded in the spec).  Training items are ``(image, target, index)``
with ``with_index=true``.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.indexed import IndexedTrainLoaders, held_out_predictions
from datamodules.sampling import eval_sampler

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def scan_ages(path: str) -> List[Tuple[str, int]]:
    """``(file, age)`` of every image in ``path`` whose name starts with an integer age, sorted by name."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"UTKFace folder {path!r} does not exist; expected images named "
                                "<age>_<gender>_<race>_<datetime>.jpg")
    found, bad = [], []
    for name in sorted(os.listdir(path)):
        if not name.lower().endswith(IMAGE_SUFFIXES):
            continue
        head = name.split("_", 1)[0]
        if head.isdigit() and 0 <= int(head) <= 130:
            found.append((os.path.join(path, name), int(head)))
        else:
            bad.append(name)
    if not found:
        example = f" (e.g. {bad[0]!r})" if bad else ""
        raise ValueError(f"no image in {path!r} is named in the UTKFace convention <age>_<gender>_<race>_<datetime>"
                         f".jpg{example}")
    return found


class _AgeImages(Dataset):
    def __init__(self, files: List[str], targets: np.ndarray, transform):
        self.files, self.targets, self.transform = files, targets.astype(np.float32), transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.files[i]) as img:
            image = self.transform(img.convert("RGB"))
        return image, torch.tensor(self.targets[i])


class UTKFaceDataModule(IndexedTrainLoaders, L.LightningDataModule):
    in_channels = 3
    num_outputs = 1
    eval_batch_size = None  # 200x200 faces: the training batch size

    def __init__(self, path: str, image_size: int = 200, batch_size: int = 128, test_fraction: float = 0.2,
                 train_fraction: float = 0.25, young_keep: float = 0.3, target_mean: Optional[float] = 35.43,
                 target_std: Optional[float] = 18.77, split_seed: int = 0, seed: Optional[int] = None,
                 with_index: bool = True, num_workers: int = 4):
        super().__init__()
        for name, value in (("test_fraction", test_fraction), ("train_fraction", train_fraction),
                            ("young_keep", young_keep)):
            if not 0.0 < value <= 1.0 or (name == "test_fraction" and value >= 1.0):
                raise ValueError(f"data.{name} must be in (0, 1{')' if name == 'test_fraction' else ']'}, "
                                 f"got {value}")
        if batch_size < 1 or image_size < 8:
            raise ValueError(f"need batch_size >= 1 and image_size >= 8, got {batch_size}, {image_size}")
        if target_std is not None and target_std <= 0:
            raise ValueError(f"data.target_std must be > 0, got {target_std}")
        self.files = scan_ages(path)
        self.save_hyperparameters()
        self.train_set = self.train_eval_set = self.test_set = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        from torchvision.transforms import v2 as T

        hp = self.hparams
        rng = np.random.default_rng(hp.split_seed)
        files = [f for f in self.files if f[1] > 4 or rng.random() < hp.young_keep]
        order = rng.permutation(len(files))
        n_test = max(1, int(round(hp.test_fraction * len(files))))
        test = [files[i] for i in order[:n_test]]
        train = [files[i] for i in order[n_test:]]
        train = train[: max(1, int(len(train) * hp.train_fraction))]
        if not train:
            raise ValueError(f"UTKFace folder {hp.path!r} leaves no training image after the split")
        ages = np.array([a for _, a in train], dtype=np.float64)
        mean = hp.target_mean if hp.target_mean is not None else float(ages.mean())
        std = hp.target_std if hp.target_std is not None else float(ages.std() + 1e-6)
        self.target_mean, self.target_std = mean, std
        transform = T.Compose([T.ToImage(), T.Resize((hp.image_size, hp.image_size), antialias=True),
                               T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

        def make(part):
            return _AgeImages([f for f, _ in part], (np.array([a for _, a in part]) - mean) / std, transform)

        self.train_set, self.test_set = make(train), make(test)
        self.train_eval_set = self.train_set  # no augmentation in this recipe

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.hparams.batch_size,
                          sampler=eval_sampler(self.test_set, self.trainer), num_workers=self.hparams.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """The held-out faces in order, items ``(x, age, index)``: one prediction per face."""
        return held_out_predictions(self, self.test_set, self.hparams.batch_size)
