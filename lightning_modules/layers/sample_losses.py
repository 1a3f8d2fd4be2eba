"""The small protocol between a LightningModule with per-sample losses and a sample-weighting callback.

A module opts in with the ``PerSampleLoss`` mixin (not a base class: it adds two methods and one attribute to any
``LightningModule``) and ends its ``training_step`` with

    losses = F.cross_entropy(logits, y, reduction="none")      # shape (batch,)
    return self.reduce_sample_losses(losses, index)            # index: the samples' ids in the training set

With nothing installed this is ``losses.mean()`` (ERM).  A callback such as
``callbacks.feasible_learning.FeasibleLearning`` installs its own reduction with ``set_sample_loss_reducer`` (for
Feasible Learning: the dual step on the batch's multipliers, then ``sum_i lambda_i * loss_i``).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

Reducer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class PerSampleLoss:
    _sample_loss_reducer: Optional[Reducer] = None
    _sample_loss_calls: int = 0

    def set_sample_loss_reducer(self, reducer: Optional[Reducer]) -> None:
        """Install (or, with ``None``, remove) the function that turns per-sample losses into the training loss."""
        self._sample_loss_reducer = reducer

    def reduce_sample_losses(self, losses: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        if losses.ndim != 1:
            raise ValueError(f"per-sample losses must have shape (batch,), got {tuple(losses.shape)}; compute the "
                             "loss with reduction='none'")
        self._sample_loss_calls += 1
        if self._sample_loss_reducer is None:
            return losses.mean()
        if index is None:
            raise ValueError("the training batch carries no sample index, which per-sample weighting needs; use a "
                             "datamodule with with_index=true (items (x, y, index))")
        if index.shape != losses.shape:
            raise ValueError(f"sample index shape {tuple(index.shape)} does not match the losses' "
                             f"{tuple(losses.shape)}")
        return self._sample_loss_reducer(losses, index)
