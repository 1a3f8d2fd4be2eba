"""What a reader of the Nabla-GFlowNet paper looks at, written in the run folder after every validation (rank 0):

* ``alignment_metrics.csv``: one row per evaluation (step, reward, and the task's diversity and prior-preservation
  metrics), the pretrained model first (step ``pretrained``) and, for the ring, the exact target ``p_prior r^beta``
  (``target``, its reward and mode metrics from 20,000 exact samples);
* ``reward_vs_diversity.png``: reward against diversity (ring: mode entropy and on-support rate; digits: mean
  pairwise feature distance and feature Frechet distance to the prior's samples) over training, the paper's
  trade-off plot, with the pretrained model and the target marked;
* ``samples.png`` (+ ``samples.csv`` for the ring): the latest samples, over the prior's samples and the target's
  modes (ring), or as a grid beside the prior's grid (digits).
"""
from __future__ import annotations

import csv
import os
from typing import Dict, List

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from callbacks.run_files import report_dir

COLUMNS = ("reward", "on_support", "mode_entropy", "tv", "pair_dist", "on_manifold", "class_rate", "class_entropy",
           "fd", "fd_class")


def ring_target_row(module, n: int = 20_000, seed: int = 0) -> Dict[str, float]:
    """The metrics of ``n`` exact samples of the ring target (the reference point of the trade-off plot)."""
    w, means, std = module.ring_target()
    g = torch.Generator().manual_seed(seed)
    which = torch.multinomial(w, n, replacement=True, generator=g)
    x = (means[which] + std * torch.randn(n, 2, generator=g, dtype=torch.float64)).float()
    return module.metrics(x.to(module.device))


class NablaGFNReport(L.Callback):
    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.write(trainer, pl_module)

    @rank_zero_only
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer, pl_module)

    def rows(self, pl_module) -> List[Dict]:
        rows = [{"step": "pretrained", **pl_module.reference.get("metrics", {})}]
        if pl_module.hparams.task == "ring":
            if not hasattr(self, "_target"):
                self._target = ring_target_row(pl_module)
            rows.append({"step": "target", **self._target})
        return rows + list(pl_module.eval_history)

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = report_dir(trainer)
        if out is None or pl_module.last_samples is None:
            return
        rows = self.rows(pl_module)
        keys = ["step"] + [c for c in COLUMNS if any(c in r for r in rows)]
        extra = sorted({k for r in rows for k in r if k.startswith(("mode_", "class_")) and k not in keys})
        with open(os.path.join(out, "alignment_metrics.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys + extra, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in r.items()})
        self._plot_tradeoff(out, rows, pl_module.hparams.task)
        self._plot_samples(out, pl_module)

    @staticmethod
    def _plot_tradeoff(out: str, rows: List[Dict], task: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        pairs = [("mode_entropy", "mode entropy"), ("on_support", "on-support rate")] if task == "ring" else \
            [("pair_dist", "mean pairwise feature distance"),
             ("fd_class", "feature Frechet distance to the prior's class")]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
        runs = [r for r in rows if isinstance(r["step"], int)]
        for ax, (key, label) in zip(axes, pairs):
            if runs and key in runs[0]:
                xs, ys = [r[key] for r in runs], [r["reward"] for r in runs]
                ax.plot(xs, ys, "-o", ms=3, color="tab:blue", label="fine-tuned (over steps)")
                ax.annotate(f"step {runs[-1]['step']}", (xs[-1], ys[-1]), fontsize=7)
            for r, style in ((rows[0], "ks"), (rows[1] if len(rows) > 1 and rows[1]["step"] == "target" else None,
                                                 "r*")):
                if r is not None and key in r:
                    ax.plot([r[key]], [r["reward"]], style, ms=9, label=str(r["step"]))
            ax.set_xlabel(label)
            ax.set_ylabel("mean log r")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "reward_vs_diversity.png"), dpi=110)
        plt.close(fig)

    @staticmethod
    def _plot_samples(out: str, pl_module) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        x = pl_module.last_samples.float()
        ref = pl_module.reference.get("samples")
        step = pl_module.global_step
        if pl_module.hparams.task == "ring":
            with open(os.path.join(out, "samples.csv"), "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["x", "y"])
                w.writerows([[f"{a:.4f}", f"{b:.4f}"] for a, b in x.tolist()])
            r = pl_module.reward
            weights, means, _ = pl_module.ring_target()
            fig, ax = plt.subplots(figsize=(5, 5))
            if ref is not None:
                ax.scatter(ref[:, 0], ref[:, 1], s=2, c="0.75", label="pretrained")
            ax.scatter(x[:, 0], x[:, 1], s=2, c="tab:blue", label=f"fine-tuned, step {step}")
            ax.scatter(means[:, 0], means[:, 1], s=400 * weights, facecolors="none", edgecolors="r",
                       label="target modes (area ~ weight)")
            ax.plot(*r.center.tolist(), "r+", ms=12)
            ax.set_aspect("equal")
            ax.legend(fontsize=7, loc="upper left")
        else:
            import torchvision

            if pl_module.hparams.task == "sd":  # latents: decoded with the pipeline's VAE
                vae, sf = pl_module.reward.vae, pl_module.reward.scaling
                with torch.no_grad():
                    x, ref = (None if v is None else vae.decode(v[:16].to(pl_module.device).float() / sf).sample.cpu()
                              for v in (x, ref))
            grids = [torchvision.utils.make_grid(v[:64].clamp(-1, 1), nrow=8, normalize=True, value_range=(-1, 1),
                                                 pad_value=1.0) for v in ([ref] if ref is not None else []) + [x]]
            fig, axes = plt.subplots(1, len(grids), figsize=(4 * len(grids), 4.2), squeeze=False)
            for ax, grid, title in zip(axes[0], grids, (["pretrained"] if ref is not None else []) +
                                       [f"fine-tuned, step {step}"]):
                ax.imshow(grid.permute(1, 2, 0).numpy())
                ax.set_title(title)
                ax.axis("off")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "samples.png"), dpi=110)
        plt.close(fig)
