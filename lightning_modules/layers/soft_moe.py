"""Soft Mixture of Experts (Puigcerver et al., ICLR 2024) and the tokenizations of a conv encoder's output, as used by
"Don't flatten, tokenize!" (Sokar et al., ICLR 2025; spec ``shared/specs/softmoe_tokenize.md``, errata first).

``SoftMoE`` maps tokens ``X`` (batch, m, t) to tokens of the same shape:

* ``p = ceil(m * capacity_factor / n)`` slots per expert; logits ``L[b, i, e, s] = X[b, i] . Phi[:, e, s]``;
* dispatch ``D = softmax(L)`` over the tokens ``i`` (each slot a convex combination of tokens; the official code
  maps NaNs to 0, which only masked tokens produce: there are none here);
* experts ``f_e(x) = W2_e relu(W1_e x + b1_e) + b2_e`` (hidden ``expert_hidden``, output ``t``), applied to their
  ``p`` slots, all experts at once (stacked weights, ``einsum``);
* combine ``C = softmax(L)`` jointly over all ``(e, s)`` per token; ``Y[b, i] = sum_{e,s} C f_e(slot_{e,s})``.

As the official code (Dopamine ``labs/moes``, errata 1-3): ``Phi`` is lecun-normal on its ``(t, n, p)`` shape (fan-in
``n t``, truncated at 2 sigma, Flax's variance correction), expert kernels xavier-uniform per expert, biases 0; with
``normalize=True`` only the routing logits use the L2-normalised tokens and ``Phi`` (eps 1e-6, ``Phi`` times a
learned scale), the slots are built from the raw tokens; the learned scale exists either way (one parameter).

Tokenizations of an encoder output ``(batch, d, h, w)`` (PyTorch channels-first): ``per_conv`` (``h w`` tokens of
``d``, one per position, row-major), ``per_feat`` (``d`` tokens of ``h w``), ``per_sample`` (one token of
``h w d`` in channels-last order, as the official code flattens).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

TOKENIZATIONS = ("per_conv", "per_feat", "per_sample")
_TRUNC_CORRECTION = 0.87962566103423978  # std of a unit normal truncated to [-2, 2]


def tokenize(x: torch.Tensor, kind: str) -> torch.Tensor:
    """``(batch, d, h, w)`` -> ``(batch, m, t)``."""
    if kind == "per_conv":
        return x.flatten(2).transpose(1, 2)
    if kind == "per_feat":
        return x.flatten(2)
    if kind == "per_sample":
        return x.permute(0, 2, 3, 1).flatten(1)[:, None]
    raise ValueError(f"tokenization {kind!r}; expected one of {', '.join(TOKENIZATIONS)}")


def token_shape(kind: str, d: int, h: int, w: int) -> tuple:
    """``(m, t)`` of a tokenization of a ``(d, h, w)`` encoder output."""
    shapes = {"per_conv": (h * w, d), "per_feat": (d, h * w), "per_sample": (1, h * w * d)}
    if kind not in shapes:
        raise ValueError(f"tokenization {kind!r}; expected one of {', '.join(TOKENIZATIONS)}")
    return shapes[kind]


def slots_per_expert(tokens: int, experts: int, capacity_factor: float = 1.0) -> int:
    if experts < 1:
        raise ValueError(f"number of experts must be >= 1, got {experts}")
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    return max(1, math.ceil(tokens * capacity_factor / experts))


class SoftMoE(nn.Module):
    def __init__(self, tokens: int, dim: int, experts: int = 1, expert_hidden: int = 512,
                 capacity_factor: float = 1.0, normalize: bool = False):
        super().__init__()
        if tokens < 1 or dim < 1 or expert_hidden < 1:
            raise ValueError(f"SoftMoE sizes must be >= 1, got tokens={tokens}, dim={dim}, "
                             f"expert_hidden={expert_hidden}")
        self.tokens, self.dim, self.experts = tokens, dim, experts
        self.slots = slots_per_expert(tokens, experts, capacity_factor)
        self.normalize = normalize
        n, p, t = experts, self.slots, dim
        self.phi = nn.Parameter(torch.empty(t, n, p))
        self.scale = nn.Parameter(torch.ones(()))  # used only with normalize, present always (errata 3)
        self.w1 = nn.Parameter(torch.empty(n, t, expert_hidden))
        self.b1 = nn.Parameter(torch.zeros(n, expert_hidden))
        self.w2 = nn.Parameter(torch.empty(n, expert_hidden, t))
        self.b2 = nn.Parameter(torch.zeros(n, t))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        t, n, _ = self.phi.shape
        std = math.sqrt(1.0 / (n * t)) / _TRUNC_CORRECTION
        nn.init.trunc_normal_(self.phi, std=std, a=-2 * std, b=2 * std)
        for w in (self.w1, self.w2):
            for e in range(w.shape[0]):
                nn.init.xavier_uniform_(w.data[e])
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.b2)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, m, n, p)`` routing logits."""
        phi = self.phi
        if self.normalize:
            x = x / (x.norm(dim=-1, keepdim=True) + 1e-6)
            phi = self.scale * phi / (phi.norm(dim=0, keepdim=True) + 1e-6)
        return torch.einsum("bmt,tnp->bmnp", x, phi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, m, _ = x.shape
        logits = self.logits(x)
        dispatch = logits.softmax(dim=1)  # over tokens (no token masking here: the official NaN guard never fires)
        combine = logits.flatten(2).softmax(dim=-1).view_as(logits)  # over all slots of all experts
        slots = torch.einsum("bmnp,bmt->bnpt", dispatch, x)  # from the raw tokens (errata 1)
        hidden = torch.relu(torch.einsum("bnpt,nth->bnph", slots, self.w1) + self.b1[:, None])
        out = torch.einsum("bnph,nht->bnpt", hidden, self.w2) + self.b2[:, None]
        return torch.einsum("bmnp,bnpt->bmt", combine, out)

    def extra_repr(self) -> str:
        return (f"tokens={self.tokens}, dim={self.dim}, experts={self.experts}, slots={self.slots}, "
                f"hidden={self.w1.shape[-1]}, normalize={self.normalize}")


def soft_moe_reference(layer: SoftMoE, x: torch.Tensor) -> torch.Tensor:
    """The same layer written one sample, one expert and one slot at a time (the float64 test reference)."""
    outs = []
    for b in range(x.shape[0]):
        X = x[b]
        phi = layer.phi
        Xr = X
        if layer.normalize:
            Xr = X / (X.norm(dim=-1, keepdim=True) + 1e-6)
            phi = layer.scale * phi / (phi.norm(dim=0, keepdim=True) + 1e-6)
        n, p = layer.experts, layer.slots
        L = torch.stack([torch.stack([Xr @ phi[:, e, s] for s in range(p)], -1) for e in range(n)], 1)  # m, n, p
        D = torch.nan_to_num(F.softmax(L, dim=0))
        C = F.softmax(L.reshape(L.shape[0], -1), dim=-1).reshape(L.shape)
        Y = torch.zeros_like(X)
        for e in range(n):
            for s in range(p):
                slot = (D[:, e, s, None] * X).sum(0)
                y = torch.relu(slot @ layer.w1[e] + layer.b1[e]) @ layer.w2[e] + layer.b2[e]
                Y = Y + C[:, e, s, None] * y[None]
        outs.append(Y)
    return torch.stack(outs)
