"""What a reader of the asynchronous RLHF paper looks at, written in the run folder after every validation (rank 0):

* ``rlhf_eval.csv`` + ``reward_kl.png``: gold reward, KL to the reference and win-rate against the reference over
  updates, and gold reward against KL (the paper's trade-off axes);
* ``training.csv``: every update's policy version, staleness (update - version), reward-model score, sample KL and
  the timings: the actor's generation and waiting seconds for the batch, the learner's waiting seconds;
* ``timing.csv``: the learner's and the actor's idle fractions over the run so far (waiting / wall time);
* ``samples.csv``: decoded generations of the latest evaluation with their gold reward.
"""
from __future__ import annotations

import os
import time
from typing import Dict, List

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from callbacks.run_files import report_dir, save_figure, write_rows

TRAIN_KEYS = ("version", "staleness", "score", "gold", "kl", "actor_gen_s", "actor_wait_s", "learner_wait_s")


def idle_fractions(rows: List[Dict[str, float]], wall_s: float) -> Dict[str, float]:
    """Learner: waiting for batches (or for the actor to read weights) / wall time of the updates; actor: waiting
    for weights / (waiting + generating)."""
    if not rows:
        return {}
    gen = sum(r["actor_gen_s"] for r in rows)
    wait = sum(r["actor_wait_s"] for r in rows)
    learner_wait = sum(r["learner_wait_s"] for r in rows)
    return {"updates": len(rows), "wall_s": wall_s, "learner_idle": learner_wait / wall_s if wall_s > 0 else 0.0,
            "actor_idle": wait / (wait + gen) if wait + gen > 0 else 0.0, "actor_gen_s": gen,
            "learner_wait_s": learner_wait}


class RLHFReport(L.Callback):
    def __init__(self):
        self.rows: List[Dict[str, float]] = []
        self._t0 = None
        self.wall_s = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        logged = trainer.callback_metrics
        row = {"step": int(trainer.global_step)}
        for key in TRAIN_KEYS:
            v = logged.get(f"train/{key}")
            if v is not None:
                row[key] = float(v)
        self.rows.append(row)
        self.wall_s += time.perf_counter() - self._t0
        self._t0 = time.perf_counter()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._t0 = None  # evaluation time is not the updates' wall time

    def state_dict(self) -> dict:
        return {"rows": list(self.rows), "wall_s": self.wall_s}

    def load_state_dict(self, state: dict) -> None:
        self.rows, self.wall_s = list(state.get("rows", [])), float(state.get("wall_s", 0.0))

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.write(trainer, pl_module)

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer, pl_module)

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = report_dir(trainer)
        if out is None:
            return
        if self.rows:
            write_rows(os.path.join(out, "training.csv"), self.rows)
            write_rows(os.path.join(out, "timing.csv"), [idle_fractions(self.rows, self.wall_s)])
        if pl_module.samples:
            write_rows(os.path.join(out, "samples.csv"), pl_module.samples)
        if pl_module.eval_history:
            write_rows(os.path.join(out, "rlhf_eval.csv"), pl_module.eval_history)
            self.plot(os.path.join(out, "reward_kl.png"), pl_module.eval_history)

    @staticmethod
    def plot(path: str, history: List[Dict[str, float]]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in history]
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
        axes[0].plot(steps, [r["gold"] for r in history], "o-", label="gold reward")
        if "win_rate" in history[0]:
            axes[0].plot(steps, [r["win_rate"] for r in history], "s--", label="win-rate vs reference")
        axes[0].set_xlabel("updates")
        axes[0].legend()
        axes[1].plot(steps, [r["kl"] for r in history], "o-", color="C2")
        axes[1].set_xlabel("updates")
        axes[1].set_ylabel("KL(policy || reference), nats per response")
        axes[2].plot([r["kl"] for r in history], [r["gold"] for r in history], "o-", color="C3")
        axes[2].set_xlabel("KL to the reference")
        axes[2].set_ylabel("gold reward")
        save_figure(fig, path)
