"""Topographic ResNet classifier for CB-SOM / AB-SOM (Dehghani et al., ICLR 2025; spec shared/specs/cbsom.md 1.2).

A ResNet-18-family network whose every conv has a perfect-square channel count, so each conv's channels can sit on a
``sqrt(C) x sqrt(C)`` sheet for the SOM step (``callbacks.self_organizing_map.SelfOrganizingMap``).  Paper widths:
stem 64 and stages 64, 144, 256, 529 (``preset="resnet18"``); ``preset="tiny"`` (16; 16, 36, 64, one block per
stage) is the CPU size.  The blocks are torchvision's ``BasicBlock``; as in the paper, convs carry a bias by default
(torchvision's have none), which ``conv_bias=False`` turns off.  The SOM step itself lives in the callback, so with
the callback off this is the matched non-topographic baseline.
"""
from __future__ import annotations

from typing import List, Literal, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from torchvision.models.resnet import BasicBlock

from lightning_modules.layers.predictions import class_records

PRESETS = {
    "resnet18": dict(stem_width=64, widths=[64, 144, 256, 529], blocks=[2, 2, 2, 2]),
    "tiny": dict(stem_width=16, widths=[16, 36, 64], blocks=[1, 1, 1]),
}


def _conv_with_bias(conv: nn.Conv2d) -> nn.Conv2d:
    return nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     conv.dilation, conv.groups, bias=True)


class TopographicResNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, stem_width: int = 64, widths: List[int] = (64,),
                 blocks: List[int] = (2,), stem: Literal["imagenet", "small"] = "imagenet", conv_bias: bool = True):
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("stem_width", stem_width)):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if len(widths) != len(blocks) or not widths:
            raise ValueError(f"widths {list(widths)} and blocks {list(blocks)} must be non-empty and of equal length")
        if stem == "imagenet":  # 7x7 stride 2 + max-pool, as ResNet-18
            self.stem = nn.Sequential(nn.Conv2d(in_channels, stem_width, 7, 2, 3, bias=conv_bias),
                                      nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        else:  # 3x3 stride 1 for 8x8 / 32x32 inputs
            self.stem = nn.Sequential(nn.Conv2d(in_channels, stem_width, 3, 1, 1, bias=conv_bias),
                                      nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True))
        stages, c_in = [], stem_width
        for i, (width, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(n):
                s = stride if j == 0 else 1
                down = None
                if s != 1 or c_in != width:
                    down = nn.Sequential(nn.Conv2d(c_in, width, 1, s, bias=conv_bias), nn.BatchNorm2d(width))
                block = BasicBlock(c_in, width, s, down)
                if conv_bias:
                    block.conv1, block.conv2 = _conv_with_bias(block.conv1), _conv_with_bias(block.conv2)
                layers.append(block)
                c_in = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():  # the paper's init: Kaiming-normal (fan_out, relu) convs, BN gamma 1 beta 0
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stages(self.stem(x)).mean((2, 3)))


class TopographicClassifier(L.LightningModule):
    """Image classifier trained with SGD; add the ``SelfOrganizingMap`` callback for CB-SOM / AB-SOM."""

    def __init__(
        self,
        num_classes: Optional[int] = None,
        in_channels: Optional[int] = None,
        preset: Literal["resnet18", "tiny"] = "tiny",
        stem: Literal["imagenet", "small"] = "small",
        conv_bias: bool = True,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        milestones: Optional[List[int]] = None,
        gamma: float = 0.1,
    ):
        super().__init__()
        self.save_hyperparameters()
        if preset not in PRESETS:
            raise ValueError(f"preset={preset!r}; expected one of {', '.join(PRESETS)}")
        if lr <= 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"need lr > 0, momentum >= 0, weight_decay >= 0; got {lr}, {momentum}, {weight_decay}")
        self.model: Optional[TopographicResNet] = None
        if num_classes is not None and in_channels is not None:
            self._build(num_classes, in_channels)

    def _build(self, num_classes: int, in_channels: int) -> None:
        hp = self.hparams
        self.model = TopographicResNet(num_classes, in_channels, stem=hp.stem, conv_bias=hp.conv_bias,
                                       **PRESETS[hp.preset])
        hp.num_classes, hp.in_channels = num_classes, in_channels
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def configure_model(self) -> None:
        if self.model is None:
            dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            num_classes = self.hparams.num_classes or getattr(dm, "num_classes", None)
            in_channels = self.hparams.in_channels or getattr(dm, "in_channels", None)
            if num_classes is None or in_channels is None:
                raise ValueError("model.num_classes / model.in_channels are unset and the datamodule does not "
                                 "provide them")
            self._build(int(num_classes), int(in_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _step(self, batch, metric, split: str):
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        metric(logits, y)
        self.log(f"{split}/loss", loss, prog_bar=split != "train", sync_dist=split != "train")
        self.log(f"{split}/acc", metric, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, self.train_acc, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, self.val_acc, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, self.test_acc, "test")

    def predict_step(self, batch, batch_idx):
        """One record per held-out image: ``index, prediction, probability, target``."""
        x, y, index = batch
        return class_records(self.model(x), y, index)

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.SGD(self.model.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        if not hp.milestones:
            return opt
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(hp.milestones), gamma=hp.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

