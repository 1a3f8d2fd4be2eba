"""Writes the FoX analysis a reader of the paper looks at, in the run dir, after every validation.

* ``position_loss.csv`` / ``position_loss.png``: validation loss per token position on windows longer than the
  training length (smoothed curve, training length marked) and the per-bin means (``position_bins.csv``);
* ``gate_stats.csv`` / ``gates.png``: per layer and head, mean log f, fraction of tokens with f > 0.9, decay time.

It reads ``pl_module.analysis`` (filled by ``FoXLM.on_validation_epoch_end``); on rank 0 only.
"""
from __future__ import annotations

import csv
import os
from typing import Optional

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_only

from callbacks.run_files import run_dir


def smooth(y: np.ndarray, width: int) -> np.ndarray:
    """Centred moving average (window shrinks at the edges)."""
    if width <= 1 or len(y) < 3:
        return y
    c = np.concatenate([[0.0], np.cumsum(y)])
    half = width // 2
    idx = np.arange(len(y))
    lo, hi = np.maximum(0, idx - half), np.minimum(len(y), idx + half + 1)
    return (c[hi] - c[lo]) / (hi - lo)


def write_position_loss(out_dir: str, curve: np.ndarray, train_len: int, bins, label: str = "model") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(out_dir, "position_loss.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["position", "loss"])
        w.writerows((i, f"{v:.6f}") for i, v in enumerate(curve))
    with open(os.path.join(out_dir, "position_bins.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["start", "end", "loss"])
        w.writerows((a, b, f"{curve[a:b].mean():.6f}") for a, b in bins)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(np.arange(len(curve)), smooth(curve, max(1, len(curve) // 64)), lw=1, label=label)
    for i, (a, b) in enumerate(bins):
        ax.hlines(curve[a:b].mean(), a, b - 1, colors="black", lw=2, label="bin mean" if i == 0 else None)
    ax.axvline(train_len, color="gray", ls="--", lw=1, label="training length")
    ax.set_xlabel("token position")
    ax.set_ylabel("validation loss (nats)")
    ax.set_title("Per-position loss beyond the training length")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "position_loss.png"), dpi=120)
    plt.close(fig)


def write_gate_stats(out_dir: str, gates: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean, frac, tau = (np.asarray(gates[k]) for k in ("mean_log_f", "frac_f_gt_0.9", "decay_time"))
    with open(os.path.join(out_dir, "gate_stats.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["layer", "head", "mean_log_f", "frac_f_gt_0.9", "decay_time"])
        for layer in range(mean.shape[0]):
            for head in range(mean.shape[1]):
                w.writerow([layer, head, f"{mean[layer, head]:.6f}", f"{frac[layer, head]:.6f}",
                            f"{tau[layer, head]:.4f}"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, data, title, cmap, lim in ((axes[0], mean, "mean log f", "viridis", (None, None)),
                                       (axes[1], frac, "fraction of tokens with f > 0.9", "magma", (0.0, 1.0))):
        im = ax.imshow(data, aspect="auto", cmap=cmap, vmin=lim[0], vmax=lim[1])
        ax.set_xticks(range(data.shape[1]))
        ax.set_yticks(range(data.shape[0]))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(title)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "gates.png"), dpi=120)
    plt.close(fig)


class FoXReport(L.Callback):
    def __init__(self, out_dir: Optional[str] = None):
        self.out_dir = out_dir

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        analysis = getattr(pl_module, "analysis", None)
        if trainer.sanity_checking or not analysis:
            return
        out = self.out_dir or run_dir(trainer)
        os.makedirs(out, exist_ok=True)
        write_position_loss(out, analysis["position_loss"].numpy(), analysis["train_seq_len"], analysis["bins"],
                            label=analysis.get("label", "model"))
        if "gates" in analysis:
            write_gate_stats(out, {k: v.numpy() for k, v in analysis["gates"].items()})
