"""Value-based (DQN-family) targets and losses as pure functions; ``returns`` and ``discounts`` are the replay
buffer's n-step returns and bootstrap discounts (``gamma^K``, 0 after a termination: ``datamodules.replay``).

* ``td_targets``: ``y = R + discount * Q_target(s', a*)`` with ``a* = argmax Q_target(s', .)`` (DQN) or
  ``argmax Q_online(s', .)`` (double DQN, when ``q_next_online`` is given).
* ``td_loss``: Huber (delta 1, as Dopamine / SB3) or squared error between ``Q(s, a)`` and the target, mean over the
  batch.
* ``categorical_projection`` (C51, Bellemare et al. 2017): the target distribution ``R + discount * z`` of the next
  state's chosen action projected onto the fixed support ``z`` (clipped to ``[v_min, v_max]``, mass split between
  the two neighbouring atoms); ``categorical_loss``: cross-entropy of ``Q(s, a)``'s distribution against it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

TD_LOSSES = ("huber", "mse")


def td_targets(q_next_target: torch.Tensor, returns: torch.Tensor, discounts: torch.Tensor,
               q_next_online: Optional[torch.Tensor] = None) -> torch.Tensor:
    choose = q_next_online if q_next_online is not None else q_next_target
    best = choose.argmax(-1, keepdim=True)
    return returns + discounts * q_next_target.gather(-1, best).squeeze(-1)


def td_loss(q: torch.Tensor, actions: torch.Tensor, targets: torch.Tensor, kind: str = "huber",
            reduction: str = "mean") -> torch.Tensor:
    """``reduction="none"``: one loss per sample (prioritised replay weights them)."""
    chosen = q.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    if kind == "huber":
        return F.smooth_l1_loss(chosen, targets.detach(), beta=1.0, reduction=reduction)
    if kind == "mse":
        return F.mse_loss(chosen, targets.detach(), reduction=reduction)
    raise ValueError(f"td loss {kind!r}; expected one of {', '.join(TD_LOSSES)}")


def categorical_projection(next_probs: torch.Tensor, returns: torch.Tensor, discounts: torch.Tensor,
                           support: torch.Tensor) -> torch.Tensor:
    """``next_probs`` (B, N) on ``support`` (N, evenly spaced) -> the projected target (B, N)."""
    v_min, v_max, N = float(support[0]), float(support[-1]), support.numel()
    delta = (v_max - v_min) / (N - 1)
    tz = (returns[:, None] + discounts[:, None] * support[None]).clamp(v_min, v_max)
    b = (tz - v_min) / delta
    lower, upper = b.floor().long(), b.ceil().long()
    same = lower == upper  # the atom lands exactly on a support point: all its mass there
    w_lower = torch.where(same, torch.ones_like(b), upper.to(b.dtype) - b)
    w_upper = torch.where(same, torch.zeros_like(b), b - lower.to(b.dtype))
    target = torch.zeros_like(next_probs)
    target.scatter_add_(1, lower, next_probs * w_lower)
    target.scatter_add_(1, upper.clamp(max=N - 1), next_probs * w_upper)
    return target


def categorical_loss(logits: torch.Tensor, actions: torch.Tensor, target: torch.Tensor,
                     reduction: str = "mean") -> torch.Tensor:
    """``logits`` (B, A, N): cross-entropy of the taken action's distribution against ``target`` (B, N)."""
    chosen = logits[torch.arange(logits.shape[0], device=logits.device), actions.long()]
    per_sample = -(target.detach() * F.log_softmax(chosen, -1)).sum(-1)
    return per_sample.mean() if reduction == "mean" else per_sample
