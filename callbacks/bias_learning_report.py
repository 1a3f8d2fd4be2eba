"""What a reader of the random-weights / learned-biases paper looks at, saved in the run folder at the end of a fit
(and after ``test``), from the whole held-out set on rank 0:

* ``cross_task_accuracy.{csv,png}``: every bias set evaluated on every task (rows: bias set, columns: task; the
  paper's bias-switching result), and ``cross_task_changed.csv``: how often switching to another task's bias set
  changes the prediction;
* ``task_variance.{csv,png}``: per hidden unit, the variance of its activation over each task's inputs (Yang et al.
  2019's task variance, normalised by the unit's largest), units clustered by their task profile (k-means) and
  sorted by cluster;
* ``bias_vs_task_variance.csv``: per task, the correlation across units between the learned bias (mask-learning
  runs: the learned mask score) and the task variance, the fraction of units the task leaves active on its inputs,
  the fraction its mask keeps (1 for bias learning), and the accuracy;
* ``learned_biases.png``: the learned hidden biases (or mask scores) per task.

``TrajectoryReport`` (the RNN recipes): ``trajectory.{csv,png}``, the target and the generated trajectory, with the
MSE and the MSE over the target's variance.
"""
from __future__ import annotations

import csv
import os
from typing import Dict

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only

from callbacks.run_files import run_dir, whole


@torch.no_grad()
def evaluate_bias_sets(module, loader) -> Dict[str, torch.Tensor]:
    """Cross-task accuracy / changed matrices and per-task hidden activations (own bias set) over ``loader``."""
    from lightning_modules.bias_learning import CrossTaskAccuracy

    metric = CrossTaskAccuracy(len(module.tasks), sync_on_compute=False)  # rank 0 alone: no collective
    hidden = {t: [] for t in range(len(module.tasks))}
    was_training = module.training
    module.eval()
    for x, y, task in loader:
        x, y, task = x.to(module.device), y.to(module.device), task.to(module.device)
        metric.to(module.device).update(module._every_bias_set(x), y, task)
        for t in task.unique().tolist():
            hidden[t].append(module.features(x[task == t], module.tasks[t]).cpu())
    module.train(was_training)
    out = {k: v.cpu() for k, v in metric.matrices().items()}
    out["hidden"] = {t: torch.cat(h) for t, h in hidden.items() if h}
    return out


def task_variance(hidden: Dict[int, torch.Tensor], tasks: int) -> torch.Tensor:
    """``(units, tasks)``: the variance of each unit's activation over each task's inputs."""
    units = next(iter(hidden.values())).shape[1]
    tv = torch.zeros(units, tasks, dtype=torch.float64)
    for t, h in hidden.items():
        tv[:, t] = h.double().var(0, unbiased=False)
    return tv


def cluster_units(normalised: np.ndarray, tasks: int, seed: int = 0) -> np.ndarray:
    """k-means labels of the units' normalised task-variance profiles (``tasks + 1`` clusters, or fewer units)."""
    from sklearn.cluster import KMeans

    k = min(tasks + 1, len(normalised))
    if tasks < 2 or k < 2:  # one task: every profile is the same point
        return np.zeros(len(normalised), dtype=int)
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(normalised)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


class BiasLearningReport(L.Callback):
    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.fast_dev_run:
            self.write(trainer, pl_module)

    @rank_zero_only
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.fast_dev_run:
            self.write(trainer, pl_module)

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        dm.setup("test")
        loader = whole(dm.test_dataloader())
        result = evaluate_bias_sets(pl_module, loader)
        out = run_dir(trainer)
        os.makedirs(out, exist_ok=True)
        tasks = list(pl_module.tasks)
        for name, key in (("cross_task_accuracy", "accuracy"), ("cross_task_changed", "changed")):
            with open(os.path.join(out, f"{name}.csv"), "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["bias_set", *tasks])
                w.writerows([b, *(round(float(v), 6) for v in row)] for b, row in zip(tasks, result[key]))
        tv = task_variance(result["hidden"], len(tasks)).numpy()
        live = tv.max(1) > 0
        normalised = tv[live] / tv[live].max(1, keepdims=True)
        labels = np.full(len(tv), -1)
        if live.any():
            labels[live] = cluster_units(normalised, len(tasks))
        with open(os.path.join(out, "task_variance.csv"), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["unit", "cluster", *(f"tv_{t}" for t in tasks)])
            w.writerows([u, int(labels[u]), *(f"{v:.6g}" for v in tv[u])] for u in range(len(tv)))
        biases = {t: pl_module.unit_parameters(t).detach().cpu().double().numpy() for t in tasks}
        with open(os.path.join(out, "bias_vs_task_variance.csv"), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["task", "pearson_bias_tv", "active_fraction", "units_on", "accuracy"])
            for k, t in enumerate(tasks):
                h = result["hidden"].get(k)
                active = float((h > 0).any(0).double().mean()) if h is not None else float("nan")
                w.writerow([t, round(_pearson(biases[t], tv[:, k]), 4), round(active, 4),
                            round(pl_module.units_on(t), 4), round(float(result["accuracy"][k, k]), 4)])
        learned = "mask score" if getattr(pl_module, "mask", None) is not None else "hidden bias"
        self._plots(out, tasks, result, normalised, labels[live], biases, learned)

    @staticmethod
    def _plots(out, tasks, result, normalised, labels, biases, learned) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        acc = result["accuracy"].numpy()
        fig, ax = plt.subplots(figsize=(1.2 * len(tasks) + 2.5, 1.0 * len(tasks) + 2))
        im = ax.imshow(acc, vmin=0, vmax=1, cmap="viridis")
        for b in range(len(tasks)):
            for t in range(len(tasks)):
                ax.text(t, b, f"{acc[b, t]:.2f}", ha="center", va="center",
                        color="k" if acc[b, t] > 0.6 else "w", fontsize=8)
        ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set_xlabel("task evaluated")
        ax.set_ylabel("bias set used")
        ax.set_title("test accuracy, one frozen network")
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "cross_task_accuracy.png"), dpi=120)
        plt.close(fig)

        if len(normalised):
            order = np.argsort(labels, kind="stable")
            fig, ax = plt.subplots(figsize=(1.0 * len(tasks) + 2.5, 4.5))
            ax.imshow(normalised[order], aspect="auto", interpolation="nearest", cmap="magma", vmin=0, vmax=1)
            ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
            ax.set_ylabel(f"active units ({len(order)}), sorted by cluster")
            ax.set_title("normalised task variance")
            fig.tight_layout()
            fig.savefig(os.path.join(out, "task_variance.png"), dpi=120)
            plt.close(fig)

        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for t in tasks:
            ax.hist(biases[t], bins=60, histtype="step", label=t)
        ax.set_xlabel(f"learned {learned}")
        ax.set_ylabel("units")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "learned_biases.png"), dpi=120)
        plt.close(fig)


class TrajectoryReport(L.Callback):
    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.fast_dev_run:
            self.write(trainer, pl_module)

    @torch.no_grad()
    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        dm.setup("fit")
        target = dm.target.to(pl_module.device)
        generated = pl_module(target.shape[0])
        mse = float((generated - target).square().mean())
        ratio = mse / max(float(target.var()), 1e-12)
        out = run_dir(trainer)
        os.makedirs(out, exist_ok=True)
        t, g = target[:, 0].cpu().numpy(), generated[:, 0].cpu().numpy()
        with open(os.path.join(out, "trajectory.csv"), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["step", "target", "generated"])
            w.writerows((i, f"{a:.6g}", f"{b:.6g}") for i, (a, b) in enumerate(zip(t, g)))
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        hp = pl_module.hparams
        fig, ax = plt.subplots(figsize=(6.5, 3.2))
        ax.plot(t, color="k", lw=1.5, label="target")
        ax.plot(g, color="tab:red", lw=1.2, ls="--", label="generated")
        ax.set_xlabel("time step")
        ax.legend(fontsize=8)
        kind = "full training" if hp.train_weights else ("biases + readout" if hp.train_readout else "biases only")
        ax.set_title(f"N={hp.width}, g={hp.gain}, {kind}: MSE {mse:.4f} ({ratio:.3f} of the target variance)",
                     fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "trajectory.png"), dpi=120)
        plt.close(fig)
