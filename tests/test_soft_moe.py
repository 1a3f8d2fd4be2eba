"""The SoftMoE layer and the tokenizations (float64): routing weights, the batched layer against a per-sample loop
reference in values and gradients, permutation equivariance, the PerSample one-expert degeneracy, parameter counts."""
import math

import pytest
import torch

from lightning_modules.layers.soft_moe import (SoftMoE, slots_per_expert, soft_moe_reference, token_shape,
                                               tokenize)

D = torch.float64


def _x(b=3, m=7, t=5, seed=0):
    return torch.randn(b, m, t, generator=torch.Generator().manual_seed(seed), dtype=D)


def test_slots_per_expert_and_routing_weights_are_distributions():
    assert slots_per_expert(121, 1) == 121 and slots_per_expert(121, 4) == 31 and slots_per_expert(121, 8) == 16
    assert slots_per_expert(100, 4, 0.1) == 3
    layer = SoftMoE(7, 5, experts=3, expert_hidden=4).double()
    logits = layer.logits(_x())
    dispatch, combine = logits.softmax(1), logits.flatten(2).softmax(-1)
    torch.testing.assert_close(dispatch.sum(1), torch.ones(3, 3, layer.slots, dtype=D))  # over tokens
    torch.testing.assert_close(combine.sum(-1), torch.ones(3, 7, dtype=D))  # over all slots
    with pytest.raises(ValueError, match="number of experts must be >= 1, got 0"):
        SoftMoE(7, 5, experts=0)


@pytest.mark.parametrize("experts, normalize", [(1, False), (3, False), (2, True)])
def test_the_batched_layer_equals_the_per_sample_loop_in_values_and_gradients(experts, normalize):
    layer = SoftMoE(7, 5, experts=experts, expert_hidden=6, normalize=normalize).double()
    with torch.no_grad():
        for p in (layer.b1, layer.b2):
            p.normal_()
        layer.scale.fill_(1.7)
    x = _x().requires_grad_(True)
    out, ref = layer(x), soft_moe_reference(layer, x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    params = [x, *layer.parameters()]
    got = torch.autograd.grad(out, params, g, allow_unused=True)
    want = torch.autograd.grad(ref, params, g, allow_unused=True)
    for a, b, name in zip(got, want, ["x", *(n for n, _ in layer.named_parameters())]):
        if b is None:
            assert a is None or float(a.abs().max()) == 0.0, name
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    if not normalize:  # the scale exists but plays no part without normalisation (errata 3)
        names = [n for n, _ in layer.named_parameters()]
        scale_grad = got[1 + names.index("scale")]
        assert scale_grad is None or float(scale_grad.abs()) == 0.0


def test_normalisation_routes_with_unit_tokens_but_dispatches_the_raw_ones():
    torch.manual_seed(0)  # with 2 hidden units an unseeded init left every ReLU dead (both outputs 0) in ~1 run of 5
    layer = SoftMoE(4, 3, experts=1, expert_hidden=8, normalize=True).double()
    x = _x(1, 4, 3)
    torch.testing.assert_close(layer.logits(10 * x), layer.logits(x), rtol=1e-5, atol=0)  # scale-free (eps 1e-6)
    assert not torch.allclose(layer(10 * x), layer(x))  # the experts see the raw tokens


def test_permuting_per_conv_tokens_permutes_the_output_tokens():
    layer = SoftMoE(12, 4, experts=2, expert_hidden=5).double()
    enc = torch.randn(2, 4, 3, 4, generator=torch.Generator().manual_seed(1), dtype=D)  # (batch, d, h, w)
    tokens = tokenize(enc, "per_conv")
    assert tokens.shape == (2, 12, 4) and token_shape("per_conv", 4, 3, 4) == (12, 4)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(layer(tokens[:, perm]), layer(tokens)[:, perm], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tokens[0, 5], enc[0, :, 1, 1])  # token = one spatial position, row-major


def test_tokenizations_and_the_channels_last_per_sample_order():
    enc = torch.arange(2 * 3 * 2 * 2, dtype=D).reshape(2, 3, 2, 2)
    assert tokenize(enc, "per_feat").shape == (2, 3, 4) and token_shape("per_feat", 3, 2, 2) == (3, 4)
    flat = tokenize(enc, "per_sample")
    assert flat.shape == (2, 1, 12)
    torch.testing.assert_close(flat[0, 0, :3], enc[0, :, 0, 0])  # (h, w, c) order: channels vary fastest
    with pytest.raises(ValueError, match="tokenization 'per_patchwork'"):
        tokenize(enc, "per_patchwork")


def test_per_sample_with_one_expert_is_an_mlp_plus_a_projection():
    """One token, one slot: dispatch = combine = 1, so SoftMoE-1 is Dense(H) -> ReLU -> Dense(h w d)."""
    layer = SoftMoE(1, 12, experts=1, expert_hidden=8).double()
    x = _x(4, 1, 12)
    mlp = torch.relu(x[:, 0] @ layer.w1[0] + layer.b1[0]) @ layer.w2[0] + layer.b2[0]
    torch.testing.assert_close(layer(x)[:, 0], mlp, rtol=1e-12, atol=1e-12)


def test_parameter_counts_and_the_lecun_normal_phi():
    m, t, H = 100, 16, 64
    one_scaled, four = SoftMoE(m, t, 1, 4 * H), SoftMoE(m, t, 4, H)
    count = lambda layer: sum(p.numel() for p in layer.parameters())  # noqa: E731
    expert = lambda h: t * h + h + h * t + t  # noqa: E731
    assert count(one_scaled) == t * 1 * 100 + 1 + expert(4 * H)  # Phi (t, n, p) + scale + the expert
    assert count(four) == t * 4 * 25 + 1 + 4 * expert(H)
    assert count(four) - count(one_scaled) == 3 * t  # equal but for the three extra experts' output biases
    big = SoftMoE(400, 32, experts=2, expert_hidden=4)
    std = 1 / math.sqrt(2 * 32)
    assert float(big.phi.abs().max()) <= 2 * std / 0.87962566103423978 + 1e-6
    assert abs(float(big.phi.std()) - std) < 0.05 * std  # fan-in n t, variance-corrected truncation
