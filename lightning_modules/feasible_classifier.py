"""Classifier and regressor with per-sample losses for Feasible Learning (Ramirez et al., AISTATS 2025; spec
``shared/specs/feasible_learning.md``).

The same module is ERM (mean loss) or FL / Resilient FL: add the ``callbacks.feasible_learning.FeasibleLearning``
callback and ``training_step``'s ``reduce_sample_losses`` becomes the dual step plus ``sum_i lambda_i * loss_i``.

* ``FeasibleClassifier``: per-sample cross-entropy; the FL bound is ``epsilon = log(1/p)`` for a target probability p
  on the true class (the paper's CIFAR-10 uses p = 0.6, epsilon = 0.511).
* ``FeasibleRegressor``: per-sample squared error on standardised targets (the paper's UTKFace age regression);
  the mean absolute error is also logged in the target's own units (years).

Backbones: ``linear`` (the spec's tiny digits protocol: an ERM that cannot fit every sample), ``mlp``,
``resnet18_cifar`` (torchvision ResNet-18 with a 3x3 stride-1 stem and no max-pool for 32x32 inputs) and ``resnet18``
(torchvision's, for 200x200 faces); no pretrained weights.  SGD (+ optional cosine schedule per epoch), Adam or AdamW.
"""
from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError
from torchmetrics.classification import MulticlassAccuracy

from lightning_modules.layers.predictions import class_records, value_records
from lightning_modules.layers.sample_losses import PerSampleLoss

BACKBONES = ("linear", "mlp", "resnet18_cifar", "resnet18")
OPTIMIZERS = ("sgd", "adam", "adamw")


def build_backbone(name: str, in_shape: Sequence[int], outputs: int, hidden: int = 128) -> nn.Module:
    """``in_shape`` = one input's shape (C, H, W) or (D,)."""
    features = math.prod(in_shape)
    if name == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(features, outputs))
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, outputs))
    if name in ("resnet18_cifar", "resnet18"):
        from torchvision.models import resnet18

        if len(in_shape) != 3:
            raise ValueError(f"backbone {name!r} needs image inputs (C, H, W), got shape {tuple(in_shape)}")
        net = resnet18(weights=None, num_classes=outputs)
        if name == "resnet18_cifar":
            net.conv1 = nn.Conv2d(in_shape[0], 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        elif in_shape[0] != 3:
            net.conv1 = nn.Conv2d(in_shape[0], 64, 7, 2, 3, bias=False)
        return net
    raise ValueError(f"model.backbone={name!r}; expected one of {', '.join(BACKBONES)}")


class _FeasibleBase(PerSampleLoss, L.LightningModule):
    def __init__(self, backbone: str, optimizer: str, lr: float, momentum: float, weight_decay: float,
                 cosine_epochs: Optional[int], hidden: int):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"model.backbone={backbone!r}; expected one of {', '.join(BACKBONES)}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"model.optimizer={optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
        if lr <= 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"need lr > 0, momentum >= 0, weight_decay >= 0; got {lr}, {momentum}, {weight_decay}")
        if cosine_epochs is not None and cosine_epochs < 1:
            raise ValueError(f"model.cosine_epochs must be >= 1 (or null), got {cosine_epochs}")
        self.net: Optional[nn.Module] = None

    def _input_shape(self):
        dm = self._trainer.datamodule if self._trainer is not None else None
        if dm is None:
            raise ValueError("the model's input shape is unknown: train with a datamodule")
        dm.setup("fit")
        return tuple(dm.train_set[0][0].shape), dm

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        else:
            cls = torch.optim.Adam if hp.optimizer == "adam" else torch.optim.AdamW
            opt = cls(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.cosine_epochs is None:
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=hp.cosine_epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        out = self.sample_losses(batch)
        loss = self.reduce_sample_losses(out["loss"], out["index"])
        self.log("train/loss", loss)
        self.log("train/mean_sample_loss", out["loss"].detach().mean(), prog_bar=True)
        return loss


class FeasibleClassifier(_FeasibleBase):
    def __init__(
        self,
        num_classes: Optional[int] = None,
        backbone: Literal["linear", "mlp", "resnet18_cifar", "resnet18"] = "linear",
        optimizer: Literal["sgd", "adam", "adamw"] = "adam",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        cosine_epochs: Optional[int] = None,
        hidden: int = 128,
    ):
        super().__init__(backbone, optimizer, lr, momentum, weight_decay, cosine_epochs, hidden)
        self.save_hyperparameters()

    def configure_model(self) -> None:
        if self.net is not None:
            return
        shape, dm = self._input_shape()
        num_classes = self.hparams.num_classes or getattr(dm, "num_classes", None)
        if num_classes is None:
            raise ValueError("model.num_classes is unset and the datamodule does not provide it")
        self.hparams.num_classes = int(num_classes)
        self.net = build_backbone(self.hparams.backbone, shape, int(num_classes), self.hparams.hidden)
        self.val_acc = MulticlassAccuracy(int(num_classes), average="micro")

    def sample_losses(self, batch) -> dict:
        """Per-sample cross-entropy, the sample ids (or None) and whether each prediction is right."""
        x, y, *rest = batch
        logits = self.net(x)
        losses = F.cross_entropy(logits.float(), y, reduction="none")
        return {"loss": losses, "index": rest[0] if rest else None, "correct": logits.argmax(-1) == y,
                "logits": logits, "target": y}

    def validation_step(self, batch, batch_idx):
        out = self.sample_losses(batch)
        self.val_acc(out["logits"], out["target"])
        self.log("val/loss", out["loss"].mean(), prog_bar=True, sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch, batch_idx):
        self.validation_step(batch, batch_idx)

    def predict_step(self, batch, batch_idx):
        """One record per held-out sample: ``index, prediction, probability, target``."""
        x, y, index = batch
        return class_records(self.net(x), y, index)


class FeasibleRegressor(_FeasibleBase):
    def __init__(
        self,
        backbone: Literal["linear", "mlp", "resnet18_cifar", "resnet18"] = "resnet18",
        optimizer: Literal["sgd", "adam", "adamw"] = "adamw",
        lr: float = 1e-4,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        cosine_epochs: Optional[int] = None,
        hidden: int = 128,
    ):
        super().__init__(backbone, optimizer, lr, momentum, weight_decay, cosine_epochs, hidden)
        self.save_hyperparameters()
        self.target_std = 1.0

    def configure_model(self) -> None:
        if self.net is not None:
            return
        shape, dm = self._input_shape()
        self.target_std = float(getattr(dm, "target_std", 1.0))
        self.net = build_backbone(self.hparams.backbone, shape, 1, self.hparams.hidden)
        self.val_mae, self.val_mse = MeanAbsoluteError(), MeanSquaredError()

    def sample_losses(self, batch) -> dict:
        """Per-sample squared error on the standardised target and the sample ids (or None)."""
        x, y, *rest = batch
        pred = self.net(x).float().squeeze(-1)
        return {"loss": (pred - y.float()) ** 2, "index": rest[0] if rest else None, "pred": pred, "target": y}

    def validation_step(self, batch, batch_idx):
        out = self.sample_losses(batch)
        self.val_mse(out["pred"], out["target"])
        self.val_mae(out["pred"] * self.target_std, out["target"] * self.target_std)
        self.log("val/loss", self.val_mse, prog_bar=True)
        self.log("val/mae", self.val_mae, prog_bar=True)

    def test_step(self, batch, batch_idx):
        self.validation_step(batch, batch_idx)

    def predict_step(self, batch, batch_idx):
        """One record per held-out sample: ``index, prediction, target`` in the data's units (years for UTKFace)."""
        x, y, index = batch
        dm = self._trainer.datamodule if self._trainer is not None else None
        mean = float(getattr(dm, "target_mean", 0.0))
        pred = self.net(x).float().squeeze(-1)
        return value_records(pred * self.target_std + mean, y.float() * self.target_std + mean, index)
