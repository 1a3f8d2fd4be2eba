"""Run-safety callbacks shared by every recipe."""
from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss is NaN or inf; the last finished checkpoint is left untouched."""


class FiniteLossGuard(L.Callback):
    """Stops the run before ``backward`` when the loss is not finite (so no bad step and no bad checkpoint).

    Under DDP the check is agreed on by all ranks, so every rank stops together.
    """

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.detach().float().item()}) at step {trainer.global_step}; stopped "
                "before the update: the last saved checkpoint is unchanged (lower the learning rate or check the data)")


class RecipeCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also saves when training ends, so the final weights are never lost.

    With step-based checkpointing the last steps of a run (after the last multiple of ``every_n_train_steps``) are
    otherwise never written.  ``last.ckpt`` then points at the final checkpoint.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking or self._last_global_step_saved == trainer.global_step:
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
