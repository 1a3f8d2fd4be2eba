"""Rotary position embedding (RoPE), rotate-half convention as in LLaMA."""
from __future__ import annotations

import torch
from torch import nn

from lightning_modules.layers.norms import at_least_fp32


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Rotate ``x`` of shape ``(B, T, H, D)`` for positions ``offset .. offset + T - 1``."""
        xf = at_least_fp32(x)
        t = torch.arange(offset, offset + x.shape[1], device=x.device, dtype=xf.dtype)
        freqs = torch.outer(t, self.inv_freq.to(x.device, xf.dtype))
        cos = torch.cat([freqs.cos(), freqs.cos()], dim=-1)[None, :, None, :]
        sin = torch.cat([freqs.sin(), freqs.sin()], dim=-1)[None, :, None, :]
        x1, x2 = xf.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return (xf * cos + rotated * sin).to(x.dtype)
