"""DQN-family targets and losses in float64 against hand computations and a loop reference of the C51 projection."""
import numpy as np
import pytest
import torch

from lightning_modules.layers.value_losses import (categorical_loss, categorical_projection, td_loss, td_targets)

D = torch.float64


def test_td_targets_dqn_and_double_dqn():
    q_target = torch.tensor([[1.0, 5.0, 2.0], [0.5, 0.0, 3.0]], dtype=D)
    q_online = torch.tensor([[9.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=D)
    r, disc = torch.tensor([1.0, -1.0], dtype=D), torch.tensor([0.9, 0.0], dtype=D)  # the second terminated
    torch.testing.assert_close(td_targets(q_target, r, disc), torch.tensor([1 + 0.9 * 5, -1.0], dtype=D))
    torch.testing.assert_close(td_targets(q_target, r, disc, q_online), torch.tensor([1 + 0.9 * 1, -1.0], dtype=D))


def test_td_losses_values_and_gradients():
    q = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=D, requires_grad=True)
    a, y = torch.tensor([1, 0]), torch.tensor([2.5, 0.0], dtype=D)
    # errors 0.5 (quadratic part: 0.125) and -3 (linear part: 2.5)
    torch.testing.assert_close(td_loss(q, a, y, "huber"), torch.tensor((0.125 + 2.5) / 2, dtype=D))
    torch.testing.assert_close(td_loss(q, a, y, "mse"), torch.tensor((0.25 + 9) / 2, dtype=D))
    (g,) = torch.autograd.grad(td_loss(q, a, y, "huber"), q)
    torch.testing.assert_close(g, torch.tensor([[0, -0.25], [0.5, 0]], dtype=D))  # d/dq of huber / 2
    with pytest.raises(ValueError, match="td loss 'l1'"):
        td_loss(q, a, y, "l1")


def _projection_loop(p, r, d, z):
    N, vmin, vmax = len(z), z[0], z[-1]
    dz = (vmax - vmin) / (N - 1)
    m = np.zeros(N)
    for j in range(N):
        tz = min(max(r + d * z[j], vmin), vmax)
        b = (tz - vmin) / dz
        lo, up = int(np.floor(b)), int(np.ceil(b))
        if lo == up:
            m[lo] += p[j]
        else:
            m[lo] += p[j] * (up - b)
            m[up] += p[j] * (b - lo)
    return m


def test_categorical_projection_matches_a_loop_reference_and_conserves_mass():
    g = torch.Generator().manual_seed(0)
    z = torch.linspace(-10, 10, 51, dtype=D)
    p = torch.softmax(torch.randn(6, 51, generator=g, dtype=D), -1)
    r = torch.tensor([0.0, 1.3, -2.7, 15.0, -30.0, 0.4], dtype=D)  # in range, beyond v_max, below v_min
    d = torch.tensor([0.99, 0.9, 0.0, 0.0, 0.5, 1.0], dtype=D)
    out = categorical_projection(p, r, d, z)
    for i in range(6):
        np.testing.assert_allclose(out[i].numpy(), _projection_loop(p[i].numpy(), float(r[i]), float(d[i]),
                                                                    z.numpy()), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.sum(-1), torch.ones(6, dtype=D))
    assert out[3, -1] == pytest.approx(1.0) and out[4, 0] == pytest.approx(1.0)  # clipped at the ends
    torch.testing.assert_close(categorical_projection(p, torch.zeros(6, dtype=D), torch.ones(6, dtype=D), z), p)
    shifted = categorical_projection(p, torch.full((6,), 0.16, dtype=D), torch.ones(6, dtype=D), z)  # 0.4 atom up
    torch.testing.assert_close(shifted[:, 1:-1], 0.6 * p[:, 1:-1] + 0.4 * p[:, :-2], rtol=0, atol=1e-15)


def test_categorical_loss_is_the_cross_entropy_of_the_taken_action():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 5, generator=g, dtype=D, requires_grad=True)
    actions = torch.tensor([2, 0, 3])
    target = torch.softmax(torch.randn(3, 5, generator=g, dtype=D), -1)
    want = -sum((target[i] * torch.log_softmax(logits[i, actions[i]], -1)).sum() for i in range(3)) / 3
    torch.testing.assert_close(categorical_loss(logits, actions, target), want)
    assert torch.autograd.gradcheck(lambda x: categorical_loss(x, actions, target), (logits,))
