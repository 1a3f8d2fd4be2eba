"""SwiGLU feed-forward block (LLaMA style)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu_hidden_size(d_model: int, hidden_ratio: float, multiple_of: int) -> int:
    """``round_up(int(d * hidden_ratio * 2/3), multiple_of)``, the rule of the FoX/LLaMA configs."""
    hidden = int(d_model * hidden_ratio * 2 / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
