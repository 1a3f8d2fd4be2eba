"""Measures of topography on a channel sheet (spec shared/specs/cbsom.md section 3).

Units are the ``C`` channels of a layer on the ``sqrt(C) x sqrt(C)`` sheet of ``topographic.grid_distances``.  Each
unit has a vector ``v_i``: its flattened kernel (weight topography) or its response profile over probe images
(functional topography).

* ``neighbour_similarity``: mean Pearson similarity of grid neighbours (distance 1) minus the mean over all pairs,
  against a null that permutes unit positions (weights/responses fixed): z-score and one-sided permutation p-value
  ``(1 + #{null >= stat}) / (1 + n_perm)`` (so never below ``1 / (1 + n_perm)``).
* ``holm_adjust``: Holm-Bonferroni adjusted p-values for a family of tests (e.g. the layers of a network).
* ``distance_curve``: mean similarity per grid distance, Spearman rho(similarity, distance) and TDANN's smoothness
  ``(max(curve) - curve[0]) / max(curve)`` of the |difference| curve.
* ``class_dprime`` / ``selectivity_ratio``: one-vs-rest d' per class and unit; ``mean |d'_i - d'_j|`` at distance 1
  over the mean over all pairs (< 1 = topographic).
* ``sine_gratings`` / ``preferred_orientation`` / ``orientation_smoothness``: a first-layer orientation map.
* ``mean_pairwise_cosine``: kernel homogenisation, to read the smoothness measures honestly.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch

from lightning_modules.layers.topographic import grid_distances


def pearson_similarity(vectors: torch.Tensor) -> torch.Tensor:
    """``(C, C)`` Pearson correlation (centred cosine) between the rows of ``vectors`` ``(C, n)``."""
    v = vectors.reshape(vectors.shape[0], -1).double()
    v = v - v.mean(1, keepdim=True)
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return v @ v.T


def _neighbour_minus_all(sim: torch.Tensor, near: torch.Tensor, off_diag: torch.Tensor) -> torch.Tensor:
    return sim[near].mean() - sim[off_diag].mean()


def neighbour_similarity(vectors: torch.Tensor, n_perm: int = 200,
                         generator: Optional[torch.Generator] = None) -> Dict[str, float]:
    """Neighbour-minus-all similarity and its position-shuffle null.

    ``stat`` = mean Pearson similarity of the grid-neighbour pairs (distance 1) minus the mean over all pairs; the null
    draws ``n_perm`` random assignments of the units to the grid positions (vectors fixed).  Returns the null mean and
    sd, ``z = (stat - null_mean) / null_sd`` and the one-sided permutation p-value for "neighbours are more similar than
    chance", ``p = (1 + #{null >= stat}) / (1 + n_perm)`` (valid at any ``n_perm``; its smallest value is
    ``1 / (1 + n_perm)``).
    """
    sim = pearson_similarity(vectors)
    channels = sim.shape[0]
    dist = grid_distances(channels)
    near = (dist > 0.5) & (dist < 1.5)
    off_diag = ~torch.eye(channels, dtype=torch.bool)
    stat = float(_neighbour_minus_all(sim, near, off_diag))
    # the mean over all pairs does not change under a permutation: only the neighbour pairs are re-drawn
    perms = torch.stack([torch.randperm(channels, generator=generator) for _ in range(n_perm)])
    rows, cols = near.nonzero(as_tuple=True)
    null = sim[perms[:, rows], perms[:, cols]].mean(1) - sim[off_diag].mean()
    sd = float(null.std())
    return {"stat": stat, "null_mean": float(null.mean()), "null_sd": sd,
            "z": (stat - float(null.mean())) / max(sd, 1e-12),
            "p": (1 + int((null >= stat).sum())) / (1 + n_perm)}


def holm_adjust(pvalues: Sequence[float]) -> List[float]:
    """Holm-Bonferroni step-down adjusted p-values, in the input order.

    With the ``m`` p-values sorted ``p_(1) <= ... <= p_(m)``, the adjusted value of the k-th smallest is
    ``min(1, max_{j <= k} (m - j + 1) p_(j))``.  Rejecting every hypothesis whose adjusted p is below ``alpha`` keeps
    the family-wise error rate (the chance of at least one false rejection in the family) at most ``alpha`` under any
    dependence between the tests.  Resolution limit: a permutation p is at least ``1 / (1 + n_perm)``, so the smallest
    p of a family of ``m`` can only be rejected at ``alpha`` if ``m / (1 + n_perm) < alpha``.
    """
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, (m - rank) * float(pvalues[i]))
        adjusted[i] = min(1.0, running)
    return adjusted


def _spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rx, ry = x.argsort().argsort().double(), y.argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx @ ry) / (rx.norm() * ry.norm()).clamp_min(1e-12))


def distance_curve(values: torch.Tensor, channels: int) -> Dict[str, torch.Tensor]:
    """Mean of a pairwise ``(C, C)`` quantity per grid distance (pairs i < j), and Spearman rho with distance."""
    dist = grid_distances(channels)
    iu = torch.triu_indices(channels, channels, 1)
    d, v = dist[iu[0], iu[1]], values.double()[iu[0], iu[1]]
    levels = torch.unique(torch.round(d, decimals=6))
    means = torch.stack([v[torch.isclose(d, lv)].mean() for lv in levels])
    return {"distance": levels, "mean": means, "spearman": torch.tensor(_spearman(v, d))}


def tdann_smoothness(abs_diff_curve: torch.Tensor) -> float:
    """TDANN's summary of a distance-binned |difference| curve: ``(max - first) / max`` (higher = smoother)."""
    top = float(abs_diff_curve.max())
    return (top - float(abs_diff_curve[0])) / top if top > 0 else 0.0


def class_dprime(responses: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One-vs-rest d' per class and unit: ``(mu_c - mu_rest) / sqrt((var_c + var_rest) / 2)``, ``(K, C)``."""
    r = responses.double()
    out = torch.zeros(num_classes, r.shape[1], dtype=torch.float64)
    for k in range(num_classes):
        a, b = r[labels == k], r[labels != k]
        if len(a) < 2 or len(b) < 2:
            continue
        pooled = ((a.var(0) + b.var(0)) / 2).sqrt().clamp_min(1e-12)
        out[k] = (a.mean(0) - b.mean(0)) / pooled
    return out


def selectivity_ratio(dprime: torch.Tensor) -> float:
    """Mean over classes of ``mean |d'_i - d'_j|`` at grid distance 1 over the mean over all pairs (< 1 smooth)."""
    channels = dprime.shape[1]
    dist = grid_distances(channels)
    near = (dist > 0.5) & (dist < 1.5)
    off_diag = ~torch.eye(channels, dtype=torch.bool)
    ratios = []
    for row in dprime:
        diff = (row[:, None] - row[None, :]).abs()
        ratios.append(float(diff[near].mean() / diff[off_diag].mean().clamp_min(1e-12)))
    return sum(ratios) / len(ratios)


def sine_gratings(size: int, orientations: int = 8, frequencies: Sequence[float] = (0.15, 0.25),
                  phases: int = 4) -> Dict[str, torch.Tensor]:
    """Full-contrast sine gratings in [0, 1]: ``images (N, 1, size, size)`` and each one's ``orientation``
    (radians in [0, pi)) and ``frequency`` (cycles per pixel)."""
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing="ij")
    images, thetas, freqs = [], [], []
    for o in range(orientations):
        theta = math.pi * o / orientations
        for f in frequencies:
            for p in range(phases):
                wave = torch.sin(2 * math.pi * f * (xs * math.cos(theta) + ys * math.sin(theta))
                                 + 2 * math.pi * p / phases)
                images.append(0.5 + 0.5 * wave)
                thetas.append(theta)
                freqs.append(f)
    return {"images": torch.stack(images)[:, None].float(), "orientation": torch.tensor(thetas, dtype=torch.float64),
            "frequency": torch.tensor(freqs)}


def preferred_orientation(responses: torch.Tensor, orientation: torch.Tensor) -> torch.Tensor:
    """Per unit, the grating orientation with the largest mean response (``responses (N, C)``)."""
    levels = torch.unique(orientation)
    per_level = torch.stack([responses[orientation == lv].double().mean(0) for lv in levels])  # (O, C)
    return levels[per_level.argmax(0)]


def orientation_smoothness(pref: torch.Tensor, n_perm: int = 200,
                           generator: Optional[torch.Generator] = None) -> Dict[str, float]:
    """Mean circular |d theta| (period pi) of grid neighbours vs a position-shuffle null (lower = smoother)."""
    channels = pref.shape[0]
    diff = (pref[:, None] - pref[None, :]).abs() % math.pi
    diff = torch.minimum(diff, math.pi - diff).double()
    dist = grid_distances(channels)
    near = (dist > 0.5) & (dist < 1.5)
    stat = float(diff[near].mean())
    null = torch.stack([diff[p][:, p][near].mean() for p in (torch.randperm(channels, generator=generator)
                                                             for _ in range(n_perm))])
    sd = float(null.std())
    return {"stat": stat, "null_mean": float(null.mean()), "z": (stat - float(null.mean())) / max(sd, 1e-12)}


def mean_pairwise_cosine(weight: torch.Tensor) -> float:
    """Mean off-diagonal cosine between flattened kernels (homogenisation; 1 = all kernels alike)."""
    v = weight.reshape(weight.shape[0], -1).double()
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = v @ v.T
    c = cos.shape[0]
    return float((cos.sum() - cos.diagonal().sum()) / (c * (c - 1)))
