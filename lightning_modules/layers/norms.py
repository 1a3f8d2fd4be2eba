"""Normalisation layers shared by the language-model recipes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HeadRMSNorm(nn.Module):
    """RMSNorm over the head dimension of a ``(..., H, D)`` tensor with a weight per head and channel.

    ``share_across_heads=True`` keeps one ``(D,)`` weight for all heads (the layout of the FoX paper's released
    checkpoints, see the spec's changelog note); the default is per head.
    """

    def __init__(self, n_heads: int, head_dim: int, eps: float = 1e-6, share_across_heads: bool = False):
        super().__init__()
        self.head_dim, self.eps = head_dim, eps
        self.weight = nn.Parameter(torch.ones(head_dim) if share_across_heads else torch.ones(n_heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(at_least_fp32(x), (self.head_dim,), eps=self.eps).to(x.dtype)
        return y * self.weight.to(x.dtype)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or left in float64: for gate / norm math that must not run in half precision."""
    return x if x.dtype == torch.float64 else x.float()
