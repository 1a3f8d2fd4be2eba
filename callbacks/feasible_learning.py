"""Feasible Learning (Ramirez et al., AISTATS 2025) as a Lightning callback: one Lagrange multiplier per training
sample, updated on the batch's entries only (spec ``shared/specs/feasible_learning.md`` 1.3-1.4, 1.8).

FL asks for a model whose loss on *every* training sample is at most ``epsilon``:
``min_theta max_{lambda >= 0} sum_i lambda_i (loss_i - epsilon)``.  Each training step, as the official code runs it
(Cooper's ``AlternatingDualPrimalOptimizer`` + ``IndexedMultiplier`` + ``nuPI`` = plain gradient ascent):

1. dual step first, on the batch's samples only, with the losses of this step's forward pass:
   ``lambda_i <- max(0, lambda_i + dual_lr * (loss_i - epsilon - lambda_i / alpha))``
   (``resilient_alpha=None``: FL, no ``lambda/alpha`` term; a number: Resilient FL, the dual weight decay ``1/alpha``
   that a slack of cost ``alpha/2 |u|^2`` gives);
2. primal loss with the *updated* multipliers and the same forward: ``sum_i lambda_i * loss_i`` (``reduction="sum"``,
   Cooper's Lagrangian, the default) or its batch mean (``"mean"``, the authors' DPO code).  No ERM term.
   ``update_order="simultaneous"`` uses the multipliers from *before* this step's dual update instead (the authors'
   DPO code); ``"dual_first"`` (the default) is the vision code's order above.

``mode="cserm"`` is the paper's clamped-squared ERM baseline on the same recipe: the primal loss is
``mean_i relu(loss_i - epsilon)^2`` and no multiplier moves (they stay at ``init``; the statistics still log).

The module opts in with ``lightning_modules.layers.sample_losses.PerSampleLoss``; the datamodule's items carry their
index in the training set (``with_index=true``).  Under gradient accumulation the multipliers are updated per
micro-batch (as the authors' DPO code).  Under DDP every rank gathers the step's ``(index, loss)`` pairs from all
ranks and applies the identical update, so the replicas of lambda stay equal without a broadcast; with
``reduction="sum"`` the local loss is multiplied by the world size so that DDP's gradient average equals the
one-process gradient of the global batch.  A sample that occurs more than once in one (global) batch, as with
``DistributedSampler`` padding, gets **one** update with the mean of its violations, as if it had been seen once.
lambda is the callback's state: saved in every checkpoint and restored on resume.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import lightning as L
import torch

REDUCTIONS = ("sum", "mean")
UPDATE_ORDERS = ("dual_first", "simultaneous")
MODES = ("fl", "cserm")


def dual_step_(lam: torch.Tensor, index: torch.Tensor, violation: torch.Tensor, dual_lr: float,
               resilient_alpha: Optional[float] = None, scratch: Optional[torch.Tensor] = None) -> None:
    """In place on ``lam``: the projected gradient-ascent step of the samples in ``index`` (others untouched).

    Repeated ids get one step with their mean violation (every copy computes, and writes, the same value).  The work
    is O(batch) and never waits for the host (no ``unique``, no data-dependent shapes): per-id sums and counts go
    through ``scratch``, a ``(2, len(lam))`` buffer of which only the batch's entries are reset and read (allocated
    here when not given; the callback keeps one).
    """
    if scratch is None:
        scratch = lam.new_zeros((2, len(lam)))
    total, count = scratch[0], scratch[1]
    total[index] = 0.0
    count[index] = 0.0
    total.index_add_(0, index, violation.to(lam.dtype))
    count.index_add_(0, index, torch.ones_like(index, dtype=lam.dtype))
    mean = total[index] / count[index]  # the violation itself when ids are distinct
    old = lam[index]
    ascent = mean if resilient_alpha is None else mean - old / resilient_alpha
    lam[index] = (old + dual_lr * ascent).clamp_min(0.0)


class FeasibleLearning(L.Callback):
    def __init__(
        self,
        epsilon: Optional[float] = None,
        target_probability: Optional[float] = None,
        dual_lr: float = 1e-4,
        resilient_alpha: Optional[float] = None,
        init: float = 0.0,
        reduction: str = "sum",
        update_order: str = "dual_first",
        mode: str = "fl",
    ):
        if (epsilon is None) == (target_probability is None):
            raise ValueError("FeasibleLearning needs exactly one of epsilon (loss bound) and target_probability "
                             f"(epsilon = log(1/p)); got epsilon={epsilon}, target_probability={target_probability}")
        if target_probability is not None:
            if not 0.0 < target_probability <= 1.0:
                raise ValueError(f"FeasibleLearning target_probability must be in (0, 1], got {target_probability}")
            epsilon = -math.log(target_probability)
        if epsilon < 0:
            raise ValueError(f"FeasibleLearning epsilon must be >= 0, got {epsilon}")
        if dual_lr <= 0:
            raise ValueError(f"FeasibleLearning dual_lr must be > 0, got {dual_lr}")
        if resilient_alpha is not None and resilient_alpha <= 0:
            raise ValueError(f"FeasibleLearning resilient_alpha must be > 0 (or null for FL), got {resilient_alpha}")
        if init < 0:
            raise ValueError(f"FeasibleLearning init must be >= 0 (multipliers are non-negative), got {init}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"FeasibleLearning reduction={reduction!r}; expected one of {', '.join(REDUCTIONS)}")
        if update_order not in UPDATE_ORDERS:
            raise ValueError(f"FeasibleLearning update_order={update_order!r}; expected one of "
                             f"{', '.join(UPDATE_ORDERS)}")
        if mode not in MODES:
            raise ValueError(f"FeasibleLearning mode={mode!r}; expected one of {', '.join(MODES)}")
        self.epsilon, self.dual_lr, self.resilient_alpha = float(epsilon), dual_lr, resilient_alpha
        self.init, self.reduction, self.update_order, self.mode = init, reduction, update_order, mode
        self.lam: Optional[torch.Tensor] = None
        self._scratch: Optional[torch.Tensor] = None  # per-sample sums / counts for dual_step_ (not checkpointed)
        self._trainer: Optional[L.Trainer] = None
        self._module = None

    # ------------------------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not hasattr(pl_module, "set_sample_loss_reducer"):
            raise ValueError(f"FeasibleLearning needs per-sample losses, but {type(pl_module).__name__} returns a "
                             "scalar loss; add the PerSampleLoss mixin (lightning_modules.layers.sample_losses) and "
                             "return self.reduce_sample_losses(losses, index) from training_step")
        dm = trainer.datamodule
        n = getattr(dm, "num_train_samples", None)
        if dm is None or not dict(getattr(dm, "hparams", {})).get("with_index", False) or n is None:
            raise ValueError(f"FeasibleLearning needs training items that carry their sample index; "
                             f"{type(dm).__name__} does not provide them (set data.init_args.with_index=true)")
        if self.lam is None:
            self.lam = torch.full((int(n),), float(self.init), dtype=torch.float32)
        self._check_size(int(n))
        self._trainer, self._module = trainer, pl_module
        pl_module.set_sample_loss_reducer(self.primal_loss)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and hasattr(pl_module, "set_sample_loss_reducer"):
            pl_module.set_sample_loss_reducer(None)

    def _check_size(self, n: int) -> None:
        if self.lam is not None and len(self.lam) != n:
            raise ValueError(f"FeasibleLearning: the checkpoint holds multipliers for {len(self.lam)} samples but the "
                             f"training set has {n}; resume with the same training data")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._calls_before = pl_module._sample_loss_calls

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module._sample_loss_calls == self._calls_before:
            raise ValueError(f"FeasibleLearning: {type(pl_module).__name__}.training_step returned a loss without "
                             "calling self.reduce_sample_losses(losses, index), so no multiplier was updated")

    # ------------------------------------------------------------------------------------------------------------
    def _gather(self, index: torch.Tensor, violation: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """All ranks' ``(index, violation)`` of this step (ragged last batches padded with id -1, then dropped)."""
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return index, violation
        strategy = trainer.strategy
        size = torch.tensor([len(index)], device=index.device)
        longest = int(strategy.all_gather(size).max())
        pad = longest - len(index)
        index = torch.cat([index, index.new_full((pad,), -1)])
        violation = torch.cat([violation, violation.new_zeros(pad)])
        all_index, all_violation = strategy.all_gather(index).reshape(-1), strategy.all_gather(violation).reshape(-1)
        keep = all_index >= 0
        return all_index[keep], all_violation[keep]

    @torch.no_grad()
    def _dual_update(self, losses: torch.Tensor, index: torch.Tensor) -> None:
        if self.lam.device != losses.device:
            self.lam = self.lam.to(losses.device)
        if self._scratch is None or self._scratch.device != self.lam.device or self._scratch.shape[1] != len(self.lam):
            self._scratch = self.lam.new_zeros((2, len(self.lam)))
        index = index.to(device=losses.device, dtype=torch.long)
        if index.device.type == "cpu" and len(index) and (int(index.min()) < 0 or int(index.max()) >= len(self.lam)):
            # checked where it is free; on an accelerator the check would stall every step on a host sync, and an
            # out-of-range id fails the indexing kernel there instead
            raise ValueError(f"sample index out of range [0, {len(self.lam)}): got {int(index.min())}.."
                             f"{int(index.max())}; indices must be positions in the training set")
        all_index, violation = self._gather(index, losses.detach().to(self.lam.dtype) - self.epsilon)
        dual_step_(self.lam, all_index, violation, self.dual_lr, self.resilient_alpha, self._scratch)

    def primal_loss(self, losses: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The reducer installed on the module: dual step on the batch, then the Lagrangian's primal part (with the
        multipliers after the step, or before it for ``update_order="simultaneous"``); CSERM: its clamped square."""
        index = index.to(device=losses.device, dtype=torch.long)
        if self.mode == "cserm":
            return torch.relu(losses - self.epsilon).pow(2).mean()
        if self.lam is not None and self.lam.device != losses.device:  # lambda starts on the CPU: read it on the
            self.lam = self.lam.to(losses.device)  # losses' device (a CPU tensor cannot be indexed by a CUDA index)
        before = self.lam[index].clone() if self.update_order == "simultaneous" and self.lam is not None else None
        self._dual_update(losses, index)
        lam = self.lam[index] if before is None else before.to(self.lam.device)
        weighted = lam.to(losses.dtype) * losses
        if self.reduction == "mean":
            return weighted.mean()
        world = self._trainer.world_size if self._trainer is not None else 1
        return weighted.sum() * world

    # ------------------------------------------------------------------------------------------------------------
    def multiplier_stats(self) -> dict:
        lam = self.lam.float()
        return {"lambda_max": float(lam.max()), "lambda_mean": float(lam.mean()),
                "lambda_median": float(lam.median()), "lambda_frac_zero": float((lam == 0).float().mean())}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        for key, value in self.multiplier_stats().items():
            pl_module.log(f"fl/{key}", value, rank_zero_only=True)

    def state_dict(self) -> dict:
        return {"lam": None if self.lam is None else self.lam.detach().cpu().clone(), "epsilon": self.epsilon,
                "dual_lr": self.dual_lr, "resilient_alpha": self.resilient_alpha, "init": self.init,
                "reduction": self.reduction, "update_order": self.update_order, "mode": self.mode}

    def load_state_dict(self, state_dict: dict) -> None:
        lam = state_dict.get("lam")
        if lam is None:
            return
        if self.lam is not None:
            if len(lam) != len(self.lam):
                raise ValueError(f"FeasibleLearning: the checkpoint holds multipliers for {len(lam)} samples but "
                                 f"the training set has {len(self.lam)}; resume with the same training data")
            lam = lam.to(self.lam.device)
        self.lam = lam.to(torch.float32).clone()
