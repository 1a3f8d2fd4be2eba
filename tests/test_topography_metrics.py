"""Topography measures on synthetic sheets whose answer is known."""
import math

import torch

from lightning_modules.layers.topographic import grid_coords, grid_distances
from lightning_modules.layers.topography_metrics import (class_dprime, distance_curve, holm_adjust,
                                                         mean_pairwise_cosine, neighbour_similarity,
                                                         orientation_smoothness, pearson_similarity,
                                                         preferred_orientation, selectivity_ratio, sine_gratings,
                                                         tdann_smoothness)

G = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731


def smooth_sheet(channels=64, dim=50, noise=0.3, seed=0):
    """Unit vectors that vary smoothly with grid position (+ noise): a topographic sheet by construction."""
    g = G(seed)
    r = grid_coords(channels).double()
    basis = torch.randn(2, dim, generator=g, dtype=torch.float64)
    phase = torch.randn(dim, generator=g, dtype=torch.float64)
    clean = torch.sin(r @ basis * 0.6 + phase)
    return clean + noise * torch.randn(channels, dim, generator=g, dtype=torch.float64)


def test_smooth_sheet_is_topographic_and_random_one_is_not():
    smooth = neighbour_similarity(smooth_sheet(), generator=G(1))
    assert smooth["z"] > 5 and smooth["p"] < 0.01 and smooth["stat"] > 0
    zs = [neighbour_similarity(torch.randn(64, 50, generator=G(s)), generator=G(s + 100))["z"] for s in range(5)]
    assert max(abs(z) for z in zs) < 3.0


def test_permutation_p_value_convention_and_null():
    """p = (1 + #{null >= stat}) / (1 + n_perm), the null being the neighbour-minus-all statistic of shuffled sheets."""
    vectors = torch.randn(16, 30, generator=G(11), dtype=torch.float64)
    res = neighbour_similarity(vectors, n_perm=50, generator=G(12))
    sim, dist = pearson_similarity(vectors), grid_distances(16)
    near, off = (dist > 0.5) & (dist < 1.5), ~torch.eye(16, dtype=torch.bool)
    g = G(12)
    null = torch.stack([sim[q][:, q][near].mean() - sim[q][:, q][off].mean()
                        for q in (torch.randperm(16, generator=g) for _ in range(50))])
    assert abs(res["stat"] - float(sim[near].mean() - sim[off].mean())) < 1e-12
    assert abs(res["null_mean"] - float(null.mean())) < 1e-12 and abs(res["null_sd"] - float(null.std())) < 1e-12
    assert res["p"] == (1 + int((null >= res["stat"]).sum())) / 51
    assert neighbour_similarity(smooth_sheet(), n_perm=50, generator=G(1))["p"] == 1 / 51  # resolution limit


def test_holm_adjust_hand_computed():
    # sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> running max 0.06)
    adjusted = holm_adjust([0.01, 0.04, 0.03, 0.005])
    assert all(abs(a - b) < 1e-12 for a, b in zip(adjusted, [0.03, 0.06, 0.06, 0.02]))
    assert holm_adjust([0.5, 0.6]) == [1.0, 1.0] and holm_adjust([]) == [] and holm_adjust([0.2]) == [0.2]
    # 9 layers, 200 shuffles (p >= 1/201): nothing is significant at 0.05 unless the smallest p is 1/201 (no shuffle
    # reached that layer's statistic); with 2000 shuffles there is room
    assert holm_adjust([1 / 201] * 9)[0] < 0.05 < min(holm_adjust([2 / 201] * 9))
    assert max(holm_adjust([2 / 2001] * 9)) < 0.05  # with 2000 shuffles there is room


def test_distance_curve_and_smoothness():
    sim = pearson_similarity(smooth_sheet())
    curve = distance_curve(sim, 64)
    assert curve["distance"][0] == 1.0 and curve["mean"][0] > curve["mean"][-1]
    assert float(curve["spearman"]) < -0.2  # similarity falls with distance
    diff_curve = distance_curve(1 - sim, 64)["mean"]
    assert tdann_smoothness(diff_curve) > 0.2
    assert tdann_smoothness(torch.ones(5)) == 0.0


def test_dprime_and_selectivity_ratio():
    g = G(3)
    labels = torch.arange(200) % 2
    responses = torch.randn(200, 16, generator=g, dtype=torch.float64)
    responses[labels == 0, :8] += 2.0  # units 0..7 (top half of the 4x4 sheet) prefer class 0
    dp = class_dprime(responses, labels, 2)
    assert dp.shape == (2, 16) and float(dp[0, :8].mean()) > 1.5 and abs(float(dp[0, 8:].mean())) < 0.5
    torch.testing.assert_close(dp[1], -dp[0])  # one-vs-rest with two classes is antisymmetric
    assert selectivity_ratio(dp) < 0.8  # a contiguous block: neighbours differ less than random pairs
    shuffled = dp[:, torch.randperm(16, generator=G(4))]
    assert selectivity_ratio(shuffled) > selectivity_ratio(dp)


def test_orientation_map_from_gratings():
    gr = sine_gratings(9, orientations=8, frequencies=(0.2,), phases=4)
    assert gr["images"].shape == (32, 1, 9, 9) and 0 <= float(gr["images"].min()) <= float(gr["images"].max()) <= 1
    # units whose response is energy along a known orientation recover it
    channels = 16
    true = torch.tensor([math.pi * (i % 8) / 8 for i in range(channels)], dtype=torch.float64)
    resp = torch.cos(2 * (gr["orientation"][:, None] - true[None, :])) + 1
    pref = preferred_orientation(resp, gr["orientation"])
    torch.testing.assert_close(pref, true)
    smooth = orientation_smoothness(torch.sort(true)[0], generator=G(5))  # sorted: neighbours share orientation
    rough = orientation_smoothness(true[torch.randperm(channels, generator=G(6))], generator=G(7))
    assert smooth["stat"] < rough["stat"] and smooth["z"] < -1


def test_mean_pairwise_cosine():
    same = torch.ones(9, 3, 3, 3)
    assert abs(mean_pairwise_cosine(same) - 1.0) < 1e-12
    assert abs(mean_pairwise_cosine(torch.randn(64, 200, generator=G(8)))) < 0.05
