"""Value networks for pixel observations: ``encoder -> penultimate head -> Linear(actions x atoms)``.

Encoders (the input is raw frames: ``uint8`` divided by 255, ``bool`` as 0/1; ``channels_last`` frames such as
MinAtar's ``10 x 10 x C`` are moved to channels-first):

* ``minatar``: ``Conv2d(C, 16, 3, padding=1) + ReLU``, the MinAtar paper's network (a ``16 x 10 x 10`` output);
* ``nature``: the Nature DQN convolutions (8x8/4 32, 4x4/2 64, 3x3/1 64, ReLU) with PyTorch's VALID padding (a
  ``64 x 7 x 7`` output on 84x84; Dopamine's Flax port pads SAME and gets 11x11, spec 1.4);
* ``impala``: three stacks of (Conv 3x3, MaxPool 3x3 stride 2 SAME, two residual blocks) with 16, 32, 32 channels
  times ``scale`` and a final ReLU (``32 x 11 x 11`` on 84x84).

Penultimate heads over the encoder output ``(d, h, w)`` (spec 1.1 and 3):

* ``flatten``: ``Linear(h w d, width) + ReLU`` (the baseline; ``width = hidden x scale`` is the scaled baseline);
* ``softmoe``: tokenize (``per_conv`` / ``per_feat`` / ``per_sample``), ``SoftMoE`` (``experts``, expert hidden
  ``hidden x scale``, ``slots`` in total or ``capacity_factor``), flatten the output tokens (``m t`` features);
* ``tokenized_sum`` / ``tokenized_avg``: the paper's tokenized baseline, one shared ``Linear(t, width) + ReLU`` per
  token, summed or averaged over the tokens.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.layers.soft_moe import TOKENIZATIONS, SoftMoE, token_shape, tokenize

ENCODERS = ("minatar", "nature", "impala")
HEADS = ("flatten", "softmoe", "tokenized_sum", "tokenized_avg")


class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


def _impala(c_in: int, channels: Sequence[int]) -> nn.Module:
    layers, c = [], c_in
    for out in channels:
        layers += [nn.Conv2d(c, out, 3, padding=1), nn.MaxPool2d(3, stride=2, padding=1), _Residual(out),
                   _Residual(out)]
        c = out
    return nn.Sequential(*layers, nn.ReLU())


def make_encoder(kind: str, in_channels: int, scale: int = 1) -> nn.Module:
    if kind == "minatar":
        return nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU())
    if kind == "nature":
        return nn.Sequential(nn.Conv2d(in_channels, 32, 8, stride=4), nn.ReLU(), nn.Conv2d(32, 64, 4, stride=2),
                             nn.ReLU(), nn.Conv2d(64, 64, 3, stride=1), nn.ReLU())
    if kind == "impala":
        return _impala(in_channels, [16 * scale, 32 * scale, 32 * scale])
    raise ValueError(f"model.encoder={kind!r}; expected one of {', '.join(ENCODERS)}")


class FlattenHead(nn.Module):
    def __init__(self, d: int, h: int, w: int, width: int):
        super().__init__()
        self.dense = nn.Linear(d * h * w, width)
        self.out_features = width

    def forward(self, x):
        return F.relu(self.dense(x.flatten(1)))


class SoftMoEHead(nn.Module):
    def __init__(self, d: int, h: int, w: int, tokenization: str, experts: int, expert_hidden: int,
                 capacity_factor: float = 1.0, slots: Optional[int] = None, normalize: bool = False):
        super().__init__()
        m, t = token_shape(tokenization, d, h, w)
        if slots is not None:
            if slots < experts or slots % experts:
                raise ValueError(f"model.slots={slots} must be a positive multiple of model.experts={experts} "
                                 "(slots are shared out evenly over the experts)")
            capacity_factor = slots / m
        self.tokenization = tokenization
        self.moe = SoftMoE(m, t, experts, expert_hidden, capacity_factor, normalize)
        self.out_features = m * t

    def forward(self, x):
        return self.moe(tokenize(x, self.tokenization)).flatten(1)


class TokenizedHead(nn.Module):
    def __init__(self, d: int, h: int, w: int, tokenization: str, width: int, reduce: str):
        super().__init__()
        _, t = token_shape(tokenization, d, h, w)
        self.tokenization, self.reduce = tokenization, reduce
        self.dense = nn.Linear(t, width)
        self.out_features = width

    def forward(self, x):
        y = F.relu(self.dense(tokenize(x, self.tokenization)))
        return y.sum(1) if self.reduce == "sum" else y.mean(1)


class QNetwork(nn.Module):
    """``forward(raw obs) -> (B, actions)`` Q-values, or ``(B, actions, atoms)`` logits when ``atoms > 1``."""

    def __init__(self, obs_shape: Sequence[int], num_actions: int, encoder: str = "minatar", head: str = "flatten",
                 hidden: int = 64, scale: int = 1, tokenization: str = "per_conv", experts: int = 1,
                 capacity_factor: float = 1.0, slots: Optional[int] = None, normalize: bool = False,
                 atoms: int = 1, channels_last: Optional[bool] = None, input_scale: float = 1.0,
                 encoder_scale: int = 1):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"model.head={head!r}; expected one of {', '.join(HEADS)}")
        if tokenization not in TOKENIZATIONS:
            raise ValueError(f"model.tokenization={tokenization!r}; expected one of {', '.join(TOKENIZATIONS)}")
        if experts < 1:
            raise ValueError(f"model.experts must be >= 1, got {experts}")
        for name, v in (("hidden", hidden), ("scale", scale), ("atoms", atoms), ("encoder_scale", encoder_scale)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"model.{name} must be an integer >= 1, got {v!r}")
        if len(obs_shape) != 3:
            raise ValueError(f"pixel value networks need (H, W, C) or (C, H, W) observations, got {tuple(obs_shape)}")
        # MinAtar gives (10, 10, C), stacked Atari frames (4, 84, 84): the smaller end is the channels
        self.channels_last = obs_shape[-1] < obs_shape[0] if channels_last is None else channels_last
        c = obs_shape[-1] if self.channels_last else obs_shape[0]
        self.input_scale, self.num_actions, self.atoms = input_scale, num_actions, atoms
        self.encoder = make_encoder(encoder, c, encoder_scale)
        with torch.no_grad():
            probe = torch.zeros(1, c, *(obs_shape[:2] if self.channels_last else obs_shape[1:]))
            d, h, w = self.encoder(probe).shape[1:]
        width = hidden * scale
        if head == "flatten":
            self.head = FlattenHead(d, h, w, width)
        elif head == "softmoe":
            self.head = SoftMoEHead(d, h, w, tokenization, experts, width, capacity_factor, slots, normalize)
        else:
            self.head = TokenizedHead(d, h, w, tokenization, width, head.split("_")[1])
        self.out = nn.Linear(self.head.out_features, num_actions * atoms)

    def features(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.float()
        if self.input_scale != 1.0:
            x = x * self.input_scale
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)
        return self.head(self.encoder(x))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        y = self.out(self.features(obs))
        return y if self.atoms == 1 else y.view(-1, self.num_actions, self.atoms)
