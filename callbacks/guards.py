"""Run-safety callbacks shared by every recipe."""
from __future__ import annotations

import logging
import os
import signal
import threading

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.preemption import Preempted, seen_before_training

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss is NaN or inf; the last finished checkpoint is left untouched."""


class FiniteLossGuard(L.Callback):
    """Stops the run before ``backward`` when the loss is not finite, and before the optimizer step when a gradient
    is not finite (a finite but huge loss can overflow in the backward), so no bad update and no checkpoint of
    non-finite weights.  Under fp16 loss scaling the gradient check is left to the scaler (it skips such steps).

    Under DDP the check is agreed on by all ranks, so every rank stops together.
    """

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        bad = not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
        if trainer.world_size > 1 and "fsdp" in type(trainer.strategy).__name__.lower():
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)  # shards differ; DDP's grads are equal
        if bad:
            raise NonFiniteLossError(
                f"non-finite training gradients at step {trainer.global_step}; stopped before the update: the last "
                "saved checkpoint is unchanged (lower the learning rate or check the data)")

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.detach().float().item()}) at step {trainer.global_step}; stopped "
                "before the update: the last saved checkpoint is unchanged (lower the learning rate or check the data)")


class RecipeCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also saves when training ends and when the run is told to stop, so finished work is
    never lost.

    * End of training: with step-based checkpointing the last steps (after the last multiple of
      ``every_n_train_steps``) are otherwise never written.  ``last.ckpt`` then points at the final checkpoint.
    * Preemption: on SIGTERM or SIGUSR1, the step in progress finishes, a checkpoint is written (after every
      callback's step work, e.g. the SOM update), and the run stops; ``--ckpt_path last`` resumes it exactly
      (tested).  ``python -m recipes`` then exits 143.  A signal during the last step does not stop the run: it is
      finishing anyway.  Under gradient accumulation the run stops only after a micro-batch that ended with an
      optimizer step: stopping in the middle would drop the gradients accumulated so far, which no checkpoint
      holds.
    * SLURM (``SLURMEnvironment(auto_requeue=True)``, Lightning's default there): Lightning's own requeue handler
      saves the moment the signal lands, which can be mid-backward or between accumulated micro-batches, so this
      callback takes the requeue signal (SIGUSR1) instead and does the same at the next optimizer-step boundary:
      it also writes Lightning's ``hpc_ckpt_<n>.ckpt`` in ``default_root_dir`` and stops; the job is requeued once
      training has torn down (``callbacks.preemption``), and the requeued job (same command, no ``--ckpt_path``)
      resumes from that file through Lightning's own SLURM auto-resume.  SIGTERM under SLURM (preemption,
      ``scancel --signal=TERM``) writes the hpc checkpoint too but does not requeue (tested on a real slurmctld +
      slurmd: tests/test_slurm.py).
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._preempted, self._requeue_asked, self._old_handler = False, False, None
        env = getattr(trainer._accelerator_connector, "cluster_environment", None)
        self._slurm = isinstance(env, SLURMEnvironment) and env.auto_requeue
        self._signum = env.requeue_signal if self._slurm else signal.SIGUSR1
        # Registered before Lightning's signal connector runs (setup hooks come first), which then leaves it alone.
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self._old_handler = signal.signal(self._signum, self._on_signal)
            if seen_before_training(self._signum):  # the warning landed during start-up: stop at the first step
                self._preempted = self._requeue_asked = True

    def _on_signal(self, signum, frame) -> None:
        self._preempted = self._requeue_asked = True

    def _on_sigterm(self, signum, frame) -> None:
        self._preempted = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """SIGTERM during training is ours too (Lightning's handler, installed just before this hook, broadcasts
        from inside the signal handler, which can meet another rank mid-collective or one that has left): the flag
        is agreed on by all ranks at the next step boundary instead."""
        if threading.current_thread() is threading.main_thread():
            self._old_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._old_handler is not None:
            signal.signal(self._signum, self._old_handler)
            self._old_handler = None
        if getattr(self, "_old_sigterm", None) is not None:
            if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
                signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        """``last.ckpt`` always links the newest finished checkpoint of the folder.  Lightning records the last
        path in a checkpoint before linking it, so a resumed run (or a second run in the folder) does not know the
        existing link is its own and writes ``last-v1.ckpt`` beside a stale ``last.ckpt``; an existing *link* of
        ours is re-pointed instead (a real file named last.ckpt is never overwritten)."""
        if self.save_last == "link":
            last = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
            if os.path.islink(last):
                self.last_model_path = last
        super()._save_last_checkpoint(trainer, monitor_candidates)

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
        if stop and not self._last_step(trainer):
            self._save_now(trainer)
            path, requeue = self._save_for_requeue(trainer) if self._slurm else (self.last_model_path, False)
            raise Preempted(trainer.global_step, path or None, requeue)

    @staticmethod
    def _last_step(trainer: L.Trainer) -> bool:
        """The step just finished is the run's last (max_steps, or the last batch of the last epoch): no stop."""
        if 0 < trainer.max_steps <= trainer.global_step:
            return True
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
        return trainer.is_last_batch and 0 < max_epochs <= trainer.current_epoch + 1

    def _save_for_requeue(self, trainer: L.Trainer) -> tuple:
        """Lightning's SLURM hand-over: ``hpc_ckpt_<n>.ckpt``, auto-resumed by a job that sees it."""
        requeue = self._requeue_asked
        if trainer.world_size > 1:
            requeue = trainer.strategy.reduce_boolean_decision(requeue, all=False)
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(path, weights_only=False)
        return path, requeue

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        self._save_now(trainer)
