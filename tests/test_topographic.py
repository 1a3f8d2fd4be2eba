"""The SOM rule of CB-SOM / AB-SOM (spec cbsom.md 1.4-1.7 and 4.5 item 5), on hand-made inputs."""
import math

import pytest
import torch
from torch import nn

from lightning_modules.layers.topographic import (SOMSchedule, activation_bmu, credit_bmu, grid_coords,
                                                  grid_distances, neighbourhood, random_bmu, sheet_side,
                                                  som_update_)


def test_sheet_layout_is_row_major_square():
    assert sheet_side(16) == 4 and sheet_side(529) == 23
    coords = grid_coords(9)
    assert coords[5].tolist() == [1, 2] and coords[8].tolist() == [2, 2]
    d = grid_distances(16)
    assert d[0, 1] == 1 and d[0, 4] == 1 and d[0, 5] == pytest.approx(math.sqrt(2)) and d[0, 15] == pytest.approx(
        math.sqrt(18))  # no wrap-around: corner to corner


@pytest.mark.parametrize("channels", [0, 10, 63, 144 + 1])
def test_non_square_channel_count_is_a_one_line_error(channels):
    with pytest.raises(ValueError, match=f"perfect-square channel count, got {channels}"):
        sheet_side(channels)


def test_neighbourhood_is_gaussian_in_grid_distance():
    h = neighbourhood(16, bmu=5, sigma=2.0)
    d = grid_distances(16)[5]
    torch.testing.assert_close(h, torch.exp(-d ** 2 / 8.0))
    assert h[5] == 1.0 and h.argmax() == 5


def test_schedule_decays_exponentially_with_floors():
    s = SOMSchedule(alpha0=0.008, sigma0=8.0, decay=-3.0, alpha_min=0.003, sigma_min=0.003)
    total = 1000
    assert s.alpha(0, total) == pytest.approx(0.008) and s.sigma(0, total) == pytest.approx(8.0)
    assert s.sigma(500, total) == pytest.approx(8.0 * math.exp(-1.5))
    # alpha hits its floor at t/T = ln(0.008/0.003)/3 = 0.327 (spec 1.7: "epoch 29 of 90")
    assert s.alpha(320, total) > 0.003 and s.alpha(340, total) == 0.003 and s.alpha(total, total) == 0.003
    assert s.sigma(total, total) == pytest.approx(8.0 * math.exp(-3.0))  # 0.40, above its 0.003 floor
    # the digits recipe's sigma floor of 1.0: 8 exp(-3 t/T) = 1 at t/T = ln 8 / 3 = 0.693
    s1 = SOMSchedule(alpha0=0.1, sigma0=8.0, decay=-3.0, alpha_min=0.003, sigma_min=1.0)
    assert s1.sigma(680, total) > 1.0 and s1.sigma(700, total) == 1.0 and s1.sigma(total, total) == 1.0
    assert s1.alpha(total, total) == pytest.approx(0.1 * math.exp(-3.0))  # 0.005, above its floor


@pytest.mark.parametrize("kwargs, match", [(dict(alpha0=-0.1, sigma0=4.0), "alpha0 must be >= 0, got -0.1"),
                                           (dict(alpha0=0.1, sigma0=0.0), "sigma0 must be > 0"),
                                           (dict(alpha0=0.1, sigma0=4.0, decay=1.0), "decay must be <= 0")])
def test_bad_schedule(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SOMSchedule(**kwargs)


def test_credit_bmu_is_the_largest_gradient_norm():
    grad = torch.zeros(9, 3, 3, 3)
    grad[2] = 0.5          # norm 0.5 * sqrt(27) = 2.6
    grad[7, 0, 0, 0] = 3.0  # norm 3.0: the winner, though its largest single entry is not the largest total
    grad[4, :, 1, 1] = -1.5  # norm 1.5 * sqrt(3) = 2.6
    assert credit_bmu(grad) == 7
    assert credit_bmu(-grad) == 7  # sign does not matter


def test_activation_bmu_uses_the_norm_of_the_batch_mean_map():
    out = torch.zeros(2, 4, 3, 3)  # (batch, C, H, W)
    out[0, 1], out[1, 1] = 5.0, -5.0  # huge per sample, cancels in the batch mean
    out[:, 3] = 1.0
    out[:, 2, 0, 0] = 2.0
    assert activation_bmu(out.mean(0)) == 3  # ||mean map||: ch1 0, ch2 2, ch3 3


def test_random_bmu_is_uniform_over_the_sheet():
    g = torch.Generator().manual_seed(5)
    counts = torch.bincount(torch.tensor([random_bmu(16, g) for _ in range(3200)]), minlength=16)
    assert len(counts) == 16 and int(counts.min()) > 140 and int(counts.max()) < 260  # ~200 each (sd 14)


def test_update_is_exact_and_leaves_the_bmu_bias_and_bn_alone():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 16, 3, bias=True), nn.BatchNorm2d(16)
    before = conv.weight.detach().clone().double()
    bias, bn_state = conv.bias.detach().clone(), {k: v.clone() for k, v in bn.state_dict().items()}
    alpha, sigma, bmu = 0.1, 1.5, 6
    delta = som_update_(conv.weight.data, bmu, alpha, sigma)
    h = neighbourhood(16, bmu, sigma)
    w = before.reshape(16, -1)
    expected = w + alpha * h[:, None] * (w[bmu] - w)
    torch.testing.assert_close(conv.weight.detach().double().reshape(16, -1), expected, rtol=0, atol=1e-7)
    assert torch.equal(conv.weight.detach()[bmu], before[bmu].float())  # the BMU does not move
    torch.testing.assert_close(delta.double().reshape(16, -1), expected - w, rtol=0, atol=1e-7)
    assert torch.equal(conv.bias.detach(), bias)
    assert all(torch.equal(v, bn.state_dict()[k]) for k, v in bn_state.items())


def test_update_pulls_neighbours_more_than_far_units():
    weight = torch.randn(16, 4, dtype=torch.float64)
    bmu = 0
    dist_before = (weight - weight[bmu]).norm(dim=1)
    som_update_(weight, bmu, alpha=0.5, sigma=1.0)
    shrink = (weight - weight[bmu]).norm(dim=1) / dist_before.clamp_min(1e-12)
    d = grid_distances(16)[bmu]
    # each unit's distance to the BMU shrinks by exactly (1 - alpha h_i): more for near units
    torch.testing.assert_close(shrink[1:], 1 - 0.5 * torch.exp(-d[1:] ** 2 / 2.0))
    assert shrink[1] < shrink[15]


@pytest.mark.parametrize("channels", [16, 529])
def test_device_path_with_tensor_bmu_and_cached_coords_is_bitwise_the_reference(channels):
    torch.manual_seed(0)
    w = torch.randn(channels, 4, 3, 3)
    ref, fast = w.clone(), w.clone()
    d_ref = som_update_(ref, 7, 0.1, 3.7)
    d_fast = som_update_(fast, torch.tensor(7), 0.1, 3.7, grid_coords(channels).double())
    assert torch.equal(ref, fast) and torch.equal(d_ref, d_fast)
    grad = torch.randn(channels, 4, 3, 3)
    assert int(credit_bmu(grad, as_tensor=True)) == credit_bmu(grad)
