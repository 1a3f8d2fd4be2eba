"""Measures and plots the topography of every conv sheet after validation (spec shared/specs/cbsom.md section 3).

Per conv layer (rank 0, on the validation images): weight topography and response topography (neighbour similarity
vs a position-shuffle null: z, the one-sided permutation p ``(1 + #{null >= stat}) / (1 + n_perm)`` and that p
Holm-Bonferroni adjusted over the layers of the network, ``*_p_holm``: a layer whose adjusted p is below alpha is
topographic at family-wise error rate alpha), the distance curve of response similarity (Spearman rho, TDANN
smoothness), class-selectivity d' smoothness ratio, kernel homogenisation (mean pairwise cosine) and, when a
``SelfOrganizingMap`` callback is present, its distinct-BMU fraction and mean alignment cos(dW_SOM, -grad).
Responses are each channel's spatially averaged raw conv output (as in the authors' analysis notebook).  The first
conv also gets an orientation map from generated sine gratings.

Writes into the run dir: ``topography.csv`` (one row per layer), ``distance_curves.csv``, ``selectivity_maps.png``
(d' per class on the last main-path conv's sheet), ``orientation_map.png``, ``distance_curves.png``.
"""
from __future__ import annotations

import csv
import math
import os
from typing import Dict, List

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from callbacks.run_files import run_dir, whole
from torch import nn

from lightning_modules.layers.topographic import sheet_side
from lightning_modules.layers.topography_metrics import (class_dprime, distance_curve, holm_adjust,
                                                         mean_pairwise_cosine, neighbour_similarity,
                                                         orientation_smoothness, pearson_similarity,
                                                         preferred_orientation, selectivity_ratio, sine_gratings,
                                                         tdann_smoothness)


def _square_convs(module: nn.Module) -> Dict[str, nn.Conv2d]:
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d) and math.isqrt(m.out_channels) ** 2 == m.out_channels:
            out[name] = m
    return out


@torch.no_grad()
def conv_responses(model: nn.Module, convs: Dict[str, nn.Conv2d], images: torch.Tensor, batch: int = 256):
    """Name -> ``(N, C)`` spatially averaged conv outputs of ``images``."""
    store: Dict[str, List[torch.Tensor]] = {n: [] for n in convs}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: store[n].append(o.float().mean((2, 3)).cpu()))
             for n, m in convs.items()]
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(images), batch):
            model(images[i:i + batch])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {n: torch.cat(v) for n, v in store.items()}


class TopographyReport(L.Callback):
    def __init__(self, n_perm: int = 200, max_images: int = 1000, seed: int = 0, max_plot_classes: int = 10):
        if n_perm < 10:
            raise ValueError(f"n_perm must be >= 10, got {n_perm}")
        if max_images < 2 or max_plot_classes < 1:
            raise ValueError(f"need max_images >= 2 and max_plot_classes >= 1, got {max_images}, {max_plot_classes}")
        self.n_perm, self.max_images, self.seed = n_perm, max_images, seed
        self.max_plot_classes = max_plot_classes
        self.rows: List[dict] = []

    def _probe(self, trainer: L.Trainer, device):
        xs, ys, n = [], [], 0
        for x, y in whole(trainer.datamodule.val_dataloader()):
            xs.append(x), ys.append(y)
            n += len(y)
            if n >= self.max_images:
                break
        return torch.cat(xs)[: self.max_images].to(device), torch.cat(ys)[: self.max_images]

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or getattr(trainer, "datamodule", None) is None:
            return
        convs = _square_convs(pl_module)
        if not convs:
            return
        images, labels = self._probe(trainer, pl_module.device)
        responses = conv_responses(pl_module, convs, images)
        som = next((cb for cb in trainer.callbacks if type(cb).__name__ == "SelfOrganizingMap"), None)
        num_classes = int(labels.max()) + 1
        gen = torch.Generator().manual_seed(self.seed)
        rows, curves, last_dprime = [], {}, None
        for name, conv in convs.items():
            w_topo = neighbour_similarity(conv.weight.detach().cpu(), self.n_perm, gen)
            r_topo = neighbour_similarity(responses[name].T, self.n_perm, gen)
            sim = pearson_similarity(responses[name].T)
            curve = distance_curve(sim, conv.out_channels)
            dprime = class_dprime(responses[name], labels, num_classes)
            row = {"layer": name, "channels": conv.out_channels, "step": trainer.global_step,
                   "weight_topo_z": w_topo["z"], "weight_topo_p": w_topo["p"],
                   "response_topo_z": r_topo["z"], "response_topo_p": r_topo["p"],
                   "response_spearman": float(curve["spearman"]),
                   "response_tdann_smoothness": tdann_smoothness(distance_curve(1 - sim, conv.out_channels)["mean"]),
                   "selectivity_ratio": selectivity_ratio(dprime),
                   "mean_kernel_cosine": mean_pairwise_cosine(conv.weight.detach().cpu())}
            if som is not None and name in som.distinct:
                row["distinct_bmu_frac"] = som.distinct_fraction(name, conv.out_channels)
                row["mean_alignment"] = som.mean_alignment(name)
            rows.append(row)
            curves[name] = curve
            if "downsample" not in name or last_dprime is None:  # plot the last main-path conv, not a shortcut
                last_dprime = (name, dprime)
            for key in ("weight_topo_z", "response_topo_z", "mean_kernel_cosine"):
                pl_module.log(f"topo/{name}/{key}", float(row[key]), rank_zero_only=True)
        for key in ("weight_topo_p", "response_topo_p"):  # family = the layers of this network
            for row, adjusted in zip(rows, holm_adjust([row[key] for row in rows])):
                row[f"{key}_holm"] = adjusted
        first = next(iter(convs))
        orientation = self._orientation(pl_module, convs[first], images, gen)
        self.rows = rows
        out = run_dir(trainer)
        os.makedirs(out, exist_ok=True)
        self._write(out, rows, curves, last_dprime, first, orientation)

    def _orientation(self, pl_module, conv: nn.Conv2d, images: torch.Tensor, gen) -> dict:
        gr = sine_gratings(images.shape[-1])
        probe = gr["images"].repeat(1, images.shape[1], 1, 1).to(images.device)
        with torch.no_grad():
            resp = conv(probe).float().mean((2, 3)).relu().cpu()
        pref = preferred_orientation(resp, gr["orientation"])
        return {"preferred": pref, **orientation_smoothness(pref, self.n_perm, gen)}

    def _write(self, out, rows, curves, last_dprime, first, orientation) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "layer", k))
        with open(os.path.join(out, "topography.csv"), "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        with open(os.path.join(out, "distance_curves.csv"), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["layer", "grid_distance", "mean_response_similarity"])
            for name, c in curves.items():
                w.writerows((name, f"{d:.4f}", f"{m:.6f}") for d, m in zip(c["distance"].tolist(), c["mean"].tolist()))
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, c in curves.items():
            ax.plot(c["distance"].numpy(), c["mean"].numpy(), marker=".", label=name)
        ax.set_xlabel("distance on the sheet")
        ax.set_ylabel("mean response similarity")
        ax.set_title("Response similarity vs distance")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "distance_curves.png"), dpi=120)
        plt.close(fig)
        name, dprime = last_dprime
        side = sheet_side(dprime.shape[1])
        k = min(dprime.shape[0], self.max_plot_classes)  # ImageNet: the first classes, not 1000 panels
        cols = min(k, 5)
        fig, axes = plt.subplots(math.ceil(k / cols), cols, figsize=(2.2 * cols, 2.2 * math.ceil(k / cols)),
                                 squeeze=False)
        lim = float(dprime.abs().max())
        for i, ax in enumerate(axes.flat):
            ax.axis("off")
            if i < k:
                ax.imshow(dprime[i].reshape(side, side).numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim)
                ax.set_title(f"class {i}", fontsize=8)
        fig.suptitle(f"d' selectivity maps, {name}")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "selectivity_maps.png"), dpi=120)
        plt.close(fig)
        pref = orientation["preferred"]
        side = sheet_side(pref.shape[0])
        fig, ax = plt.subplots(figsize=(3.5, 3.2))
        im = ax.imshow(pref.reshape(side, side).numpy() * 180 / math.pi, cmap="hsv", vmin=0, vmax=180)
        ax.set_title(f"preferred orientation, {first}\nneighbour |dθ| z = {orientation['z']:.2f}", fontsize=8)
        ax.axis("off")
        fig.colorbar(im, ax=ax, label="degrees")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "orientation_map.png"), dpi=120)
        plt.close(fig)
