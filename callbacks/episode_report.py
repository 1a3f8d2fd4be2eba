"""What a reader of an on-policy RL paper looks at, saved in the run folder (rank 0, no collectives) at every epoch end
and when the fit ends:

* ``episodes.csv``: every training episode of rank 0's environments (environment steps of all ranks when it ended,
  return, length); ``return_curve.png``: episode returns against environment steps, the mean and +-1 std over a
  sliding window of ``window`` episodes, with the deterministic evaluations (``val/return``, +-std) on top;
* ``training.csv``: per rollout (per ``every`` updates of an off-policy agent), the environment steps and every
  ``train/*`` metric (losses, entropy, KL to the behaviour policy, clip fraction, explained variance; TD loss, mean
  Q, epsilon); ``training.png``: the ``panels`` that were logged (by default entropy, KL, explained variance, episode
  length, the losses, mean Q and epsilon);
* ``evaluation.csv``: environment steps, ``val/return``, ``val/return_std``, ``val/length``.

The rows survive a resume: the training and evaluation rows are this callback's checkpointed state, the episodes are
the data module's.
"""
from __future__ import annotations

import csv
import os
from typing import Dict, List

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_only

from callbacks.run_files import run_dir


def window_stats(values: np.ndarray, window: int):
    """Mean and std over the last ``window`` values at every position (shorter at the start)."""
    mean, std = np.empty(len(values)), np.empty(len(values))
    for i in range(len(values)):
        chunk = values[max(0, i + 1 - window):i + 1]
        mean[i], std[i] = chunk.mean(), chunk.std()
    return mean, std


PANELS = ("entropy", "kl", "explained_variance", "episode_length", "loss_actor", "loss_critic", "loss", "q_mean",
          "epsilon")


class EpisodeReport(L.Callback):
    def __init__(self, window: int = 20, every: int = 1, panels=PANELS):
        if every < 1:
            raise ValueError(f"EpisodeReport every must be >= 1 training step, got {every}")
        self.window, self.every, self.panels = window, every, tuple(panels)
        self.training: List[Dict[str, float]] = []
        self.evaluation: List[Dict[str, float]] = []

    def _steps(self, trainer) -> float:
        collector = getattr(trainer.datamodule, "collector", None)
        return float(collector.env_steps) if collector is not None else float("nan")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero or trainer.global_step % self.every:
            return
        row = {"env_steps": self._steps(trainer)}
        if self.training and self.training[-1]["env_steps"] == row["env_steps"]:
            return  # the call that found the epoch's rollouts exhausted: no new rollout
        row.update({k[len("train/"):]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})
        self.training.append(row)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        m = trainer.callback_metrics
        if "val/return" in m:
            self.evaluation.append({"env_steps": self._steps(trainer), "return": float(m["val/return"]),
                                    "return_std": float(m.get("val/return_std", float("nan"))),
                                    "length": float(m.get("val/length", float("nan")))})

    def state_dict(self) -> dict:
        return {"training": self.training, "evaluation": self.evaluation}

    def load_state_dict(self, state: dict) -> None:
        self.training, self.evaluation = list(state["training"]), list(state["evaluation"])

    @rank_zero_only
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.fast_dev_run:
            self.write(trainer)

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.fast_dev_run:
            self.write(trainer)

    def write(self, trainer: L.Trainer) -> None:
        out = run_dir(trainer)
        os.makedirs(out, exist_ok=True)
        collector = getattr(trainer.datamodule, "collector", None)
        episodes = np.array(collector.episodes if collector is not None else [], dtype=float).reshape(-1, 3)
        with open(os.path.join(out, "episodes.csv"), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["env_steps", "return", "length"])
            w.writerows([int(s), f"{r:.6g}", int(n)] for s, r, n in episodes)
        for name, rows in (("training.csv", self.training), ("evaluation.csv", self.evaluation)):
            keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "env_steps", k))
            with open(os.path.join(out, name), "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=keys or ["env_steps"])
                w.writeheader()
                w.writerows(rows)
        self._plots(out, trainer, episodes)

    def _plots(self, out: str, trainer: L.Trainer, episodes: np.ndarray) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        hp = getattr(trainer.datamodule, "hparams", {})
        mh = trainer.lightning_module.hparams
        arm = f"{mh.get('head', '')} {mh.get('tokenization', '') if mh.get('head') == 'softmoe' else ''}"
        title = f"{hp.get('env_id', '')} {mh.get('loss', '')} {arm if 'head' in mh else ''}".strip()
        fig, ax = plt.subplots(figsize=(6.5, 4))
        if len(episodes):
            mean, std = window_stats(episodes[:, 1], self.window)
            ax.scatter(episodes[:, 0], episodes[:, 1], s=3, alpha=0.25, color="tab:blue", label="training episodes")
            ax.plot(episodes[:, 0], mean, color="tab:blue", label=f"mean of {self.window}")
            ax.fill_between(episodes[:, 0], mean - std, mean + std, color="tab:blue", alpha=0.2)
        if self.evaluation:
            ev = np.array([[r["env_steps"], r["return"], r["return_std"]] for r in self.evaluation])
            ax.errorbar(ev[:, 0], ev[:, 1], yerr=ev[:, 2], color="tab:red", marker="o", ms=3, capsize=2,
                        label="deterministic evaluation")
        ax.set_xlabel("environment steps")
        ax.set_ylabel("episode return")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "return_curve.png"), dpi=120)
        plt.close(fig)

        panels = [k for k in self.panels if any(k in r for r in self.training)]
        if panels:
            cols = min(3, len(panels))
            rows = (len(panels) + cols - 1) // cols
            fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
            for ax in axes.flat[len(panels):]:
                ax.axis("off")
            for ax, key in zip(axes.flat, panels):
                pts = [(r["env_steps"], r[key]) for r in self.training if key in r]
                ax.plot(*zip(*pts), lw=1)
                ax.set_title(key, fontsize=9)
                ax.set_xlabel("env steps", fontsize=8)
            fig.tight_layout()
            fig.savefig(os.path.join(out, "training.png"), dpi=110)
            plt.close(fig)
