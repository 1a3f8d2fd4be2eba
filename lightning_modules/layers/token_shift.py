"""Data-dependent token shift (the FoX "Pro" block's ``ShiftLinear``), per head.

``y_t = a_t * x_{t-1} + (1 - a_t) * x_t`` with ``a_t = sigmoid(w_h . u_t)`` a scalar per head and token computed in
fp32 from the block input ``u``, and ``x_0 = 0`` (or the cached last token when decoding).  At a document start
(``resets``: packed documents, the first real token of a left-padded prompt) the previous token is 0 too, so a
document never mixes in its neighbour's last token.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lightning_modules.layers.norms import at_least_fp32


class TokenShift(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.mix_proj = nn.Linear(d_model, n_heads, bias=False)

    def forward(self, u: torch.Tensor, x: torch.Tensor, prev: Optional[torch.Tensor] = None,
                resets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``u``: ``(B, T, d_model)`` block input; ``x``: ``(B, T, H, D)``; ``prev``: ``(B, H, D)`` or None;
        ``resets``: ``(B, T)`` bool, True where a document starts."""
        alpha = torch.sigmoid(at_least_fp32(self.mix_proj(u)))[..., None]  # (B, T, H, 1)
        first = torch.zeros_like(x[:, :1]) if prev is None else prev[:, None].to(x.dtype)
        shifted = torch.cat([first, x[:, :-1]], dim=1)
        if resets is not None:
            shifted = shifted.masked_fill(resets[:, :, None, None], 0.0)
        return (alpha * at_least_fp32(shifted) + (1 - alpha) * at_least_fp32(x)).to(x.dtype)
