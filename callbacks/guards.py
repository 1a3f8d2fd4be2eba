"""Run-safety callbacks shared by every recipe."""
from __future__ import annotations

import os
import signal
import threading

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException


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


def _slurm_managed() -> bool:
    """Under a SLURM batch job Lightning owns SIGUSR1 (checkpoint + requeue, ``SLURMEnvironment(auto_requeue)``)."""
    return "SLURM_JOB_ID" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


class RecipeCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also saves when training ends and when the run is told to stop, so finished work is
    never lost.

    * End of training: with step-based checkpointing the last steps (after the last multiple of
      ``every_n_train_steps``) are otherwise never written.  ``last.ckpt`` then points at the final checkpoint.
    * Preemption: on SIGTERM (Lightning's own flag) or SIGUSR1 (outside SLURM, where Lightning leaves it unhandled),
      the step in progress finishes, a checkpoint is written (after every callback's step work, e.g. the SOM update),
      and the run stops; ``--ckpt_path last`` resumes it exactly (tested).  ``python -m recipes`` then exits 143.
      Under gradient accumulation the run stops only after a micro-batch that ended with an optimizer step: stopping
      in the middle would drop the gradients accumulated so far, which no checkpoint holds.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._preempted, self._old_usr1 = False, None
        if stage == "fit" and not _slurm_managed() and threading.current_thread() is threading.main_thread():
            self._old_usr1 = signal.signal(signal.SIGUSR1, self._on_usr1)

    def _on_usr1(self, signum, frame) -> None:
        self._preempted = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._old_usr1 is not None:
            signal.signal(signal.SIGUSR1, self._old_usr1)
            self._old_usr1 = None

    def _save_now(self, trainer: L.Trainer) -> None:
        if self._last_global_step_saved == trainer.global_step:
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step == getattr(self, "_step_at_batch_start", None):  # mid-accumulation, on every rank
            if trainer.received_sigterm:  # Lightning would stop after this micro-batch: stop after the step instead
                self._preempted = True
                trainer._signal_connector.received_sigterm = False
            return
        stop = self._preempted or trainer.received_sigterm
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            self._save_now(trainer)
            raise SIGTERMException()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        self._save_now(trainer)
