"""Numerics of forgetting attention: every backend against a naive loop / the dense reference, in float64."""
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.layers.forgetting_attention import forgetting_attention, gate_bias

SHAPES = [  # (B, H, Tq, Tk, D, block)
    (1, 1, 1, 1, 8, 4),       # T = 1
    (2, 3, 7, 7, 8, 4),       # T not a multiple of the block
    (1, 2, 37, 37, 16, 8),
    (2, 2, 5, 23, 8, 4),      # Tq < Tk (queries are the last positions, as in decoding)
    (1, 2, 70, 70, 32, 256),  # one block
]


def naive(q, k, v, log_f, scale):
    """Double loop straight from the definition: o_i = sum_j softmax_j(s q_i.k_j + c_i - c_j) v_j, j <= i."""
    b, h, tq, _ = q.shape
    tk = k.shape[2]
    c = torch.cumsum(log_f, -1)
    out = torch.zeros_like(q)
    for i in range(tq):
        pos = i + tk - tq
        logits = torch.stack([(q[:, :, i] * k[:, :, j]).sum(-1) * scale + c[:, :, pos] - c[:, :, j]
                              for j in range(pos + 1)], -1)
        out[:, :, i] = (torch.softmax(logits, -1)[..., None] * v[:, :, : pos + 1]).sum(2)
    return out


def inputs(b, h, tq, tk, d, seed=0, gate_shift=0.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, d, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(b, h, tk, d, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(b, h, tk, d, generator=g, dtype=dtype).requires_grad_()
    log_f = F.logsigmoid(2 * torch.randn(b, h, tk, generator=g, dtype=dtype) + gate_shift).requires_grad_()
    return q, k, v, log_f


def value_and_grads(fn, q, k, v, log_f):
    out = fn(q, k, v, log_f)
    weights = torch.sin(torch.arange(out.numel(), dtype=out.dtype)).view_as(out)  # a generic upstream gradient
    grads = torch.autograd.grad((out * weights).sum(), [q, k, v, log_f])
    return [out.detach(), *grads]


CPU_BACKENDS = ["dense", "native", "blockwise"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backend_matches_naive_loop_fp64(backend, shape):
    b, h, tq, tk, d, block = shape
    q, k, v, log_f = inputs(b, h, tq, tk, d)
    ref = value_and_grads(lambda *a: naive(*a, 1 / math.sqrt(d)), q, k, v, log_f)
    got = value_and_grads(lambda *a: forgetting_attention(*a, backend=backend, block_size=block), q, k, v, log_f)
    for name, r, g in zip(["out", "dq", "dk", "dv", "dlog_f"], ref, got):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-11, msg=f"{backend} {name}")


@pytest.mark.parametrize("backend", ["native", "blockwise"])
@pytest.mark.parametrize("gate_shift", [-4.0, 0.0, 6.0])
def test_matches_dense_over_many_blocks(backend, gate_shift):
    """Long sequence, many tiles, strong and weak gates, strided (B, T, H, D) inputs: == dense in float64."""
    q, k, v, log_f = inputs(2, 2, 600, 600, 16, seed=1, gate_shift=gate_shift)
    q, k, v = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v))
    ref = value_and_grads(lambda *a: forgetting_attention(*a, backend="dense"), q, k, v, log_f)
    got = value_and_grads(lambda *a: forgetting_attention(*a, backend=backend, block_size=64), q, k, v, log_f)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)


def test_native_kernel_builds_here():
    """On Linux with a C++ compiler the native kernel must build (not silently fall back)."""
    import shutil
    import sys

    from lightning_modules.layers.forgetting_attention import _native_error, native_extension, resolve_backend
    if not (sys.platform.startswith("linux") and shutil.which("g++")):
        pytest.skip("needs Linux and g++")
    assert native_extension() is not None, _native_error
    assert resolve_backend("auto", torch.zeros(1)) == "native"


@pytest.mark.parametrize("gate_shift", [-2.0, 0.0, 4.0])
def test_fp32_error_is_that_of_the_dense_fp32_reference(gate_shift):
    """fp32 error vs an fp64 reference, relative to the dense fp32 reference's own error: native within 2.5x
    (online softmax, vectorised exp), blockwise within 1.5x except d log f (within 5x)."""
    q, k, v, log_f = inputs(2, 4, 512, 512, 32, seed=2, gate_shift=gate_shift)
    exact = value_and_grads(lambda *a: forgetting_attention(*a, backend="dense"), q, k, v, log_f)
    f32 = [t.detach().float().requires_grad_() for t in (q, k, v, log_f)]
    dense = value_and_grads(lambda *a: forgetting_attention(*a, backend="dense"), *f32)
    block = value_and_grads(lambda *a: forgetting_attention(*a, backend="blockwise", block_size=256), *f32)
    native = value_and_grads(lambda *a: forgetting_attention(*a, backend="native"), *f32)
    for name, e, d, b, n in zip(["out", "dq", "dk", "dv", "dlog_f"], exact, dense, block, native):
        err_dense = (d.double() - e).abs().max().item()
        err_block = (b.double() - e).abs().max().item()
        err_native = (n.double() - e).abs().max().item()
        assert err_block <= (5.0 if name == "dlog_f" else 1.5) * err_dense + 1e-6, (name, err_block, err_dense)
        assert err_native <= 2.5 * err_dense + 1e-6, (name, err_native, err_dense)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_gate_is_plain_causal_attention(backend):
    q, k, v, _ = inputs(2, 3, 29, 29, 8)
    zero = torch.zeros(2, 3, 29, dtype=torch.float64)
    out = forgetting_attention(q, k, v, zero, backend=backend, block_size=8)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    torch.testing.assert_close(forgetting_attention(q, k, v, None), out)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fixed_gate_is_alibi(backend):
    """A constant per-head gate f_h gives D_ij = (i - j) log f_h: ALiBi with slope -log f_h."""
    b, h, t, d = 1, 4, 33, 8
    q, k, v, _ = inputs(b, h, t, t, d)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)
    log_f = (-slopes)[None, :, None].expand(b, h, t)
    pos = torch.arange(t, dtype=torch.float64)
    alibi = -slopes[:, None, None] * (pos[:, None] - pos[None, :])
    alibi = alibi.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=alibi[None])
    torch.testing.assert_close(forgetting_attention(q, k, v, log_f, backend=backend, block_size=8), ref)


def test_query_side_gradient_of_c_is_zero():
    """The row term c_i cancels in the softmax: d out / d c_i through the query role is exactly 0."""
    q, k, v, log_f = inputs(2, 2, 19, 19, 8)
    c = torch.cumsum(log_f.detach(), -1)
    c_q = c.clone().requires_grad_()
    c_k = c.clone().requires_grad_()
    scores = q @ k.transpose(-1, -2) / math.sqrt(8) + c_q[..., :, None] - c_k[..., None, :]
    scores = scores.masked_fill(torch.ones(19, 19, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.softmax(scores, -1) @ v
    g_q, g_k = torch.autograd.grad((out * torch.randn_like(out)).sum(), [c_q, c_k])
    assert g_q.abs().max() < 1e-12
    assert g_k.abs().max() > 1e-3


def test_gate_bias_layout():
    log_f = torch.log(torch.tensor([[[0.5, 0.5, 0.25]]]))
    bias = gate_bias(log_f, 3)[0, 0]
    expected = torch.tensor([[0.0, -math.inf, -math.inf], [math.log(0.5), 0.0, -math.inf],
                             [math.log(0.125), math.log(0.25), 0.0]])
    torch.testing.assert_close(bias, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_half_precision_inputs_cast_gate_up(dtype):
    q, k, v, log_f = (t.detach() for t in inputs(1, 2, 40, 40, 16, dtype=torch.float32))
    out = forgetting_attention(q.to(dtype), k.to(dtype), v.to(dtype), log_f.to(torch.bfloat16))
    assert out.dtype == dtype
    ref = forgetting_attention(q, k, v, log_f.to(torch.bfloat16).float(), backend="dense")
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(backend="triton9"), "unknown attention backend 'triton9'"),
    (dict(block_size=0), "block_size must be >= 1"),
])
def test_bad_arguments_name_the_value(kwargs, match):
    q, k, v, log_f = inputs(1, 1, 4, 4, 8)
    with pytest.raises(ValueError, match=match):
        forgetting_attention(q, k, v, log_f, **kwargs)


def test_bad_shapes_and_dtypes():
    q, k, v, log_f = inputs(1, 2, 4, 4, 8)
    with pytest.raises(ValueError, match=r"log_fgate must have shape \(B, H, Tk\)"):
        forgetting_attention(q, k, v, log_f[..., :3])
    with pytest.raises(ValueError, match="Tq <= Tk"):
        forgetting_attention(q, k[:, :, :2], v[:, :, :2], log_f[..., :2])
    with pytest.raises(ValueError, match="dtype torch.int64"):
        forgetting_attention(q.long(), k, v, log_f)
    with pytest.raises(ValueError, match=r"q must have shape \(B, H, T, D\)"):
        forgetting_attention(q[0], k, v, log_f)
    with pytest.raises(ValueError, match="'flex' cannot train on CPU"):
        forgetting_attention(q, k, v, log_f, backend="flex")


def test_flex_forward_matches_dense_on_cpu():
    """FlexAttention (the CUDA backend) runs forward-only on CPU: its score_mod must equal the reference."""
    q, k, v, log_f = (t.detach().float() for t in inputs(1, 2, 64, 64, 16))
    out = forgetting_attention(q, k, v, log_f, backend="flex")
    torch.testing.assert_close(out, forgetting_attention(q, k, v, log_f, backend="dense"), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flex", "fla"])
@pytest.mark.parametrize("t", [1, 100, 1000])
def test_gpu_backends_match_dense(backend, t):
    if backend == "fla":
        pytest.importorskip("fla")
    q, k, v, log_f = (x.detach().cuda() for x in inputs(2, 4, t, t, 64, dtype=torch.float32))
    q, k, v = (x.bfloat16().requires_grad_() for x in (q, k, v))
    log_f = log_f.float().requires_grad_()
    ref = value_and_grads(lambda *a: forgetting_attention(*(x.float() if x.dtype != torch.float32 else x for x in a),
                                                          backend="dense"), q, k, v, log_f)
    got = value_and_grads(lambda *a: forgetting_attention(*a, backend=backend), q, k, v, log_f)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g.float(), r.float(), rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------------------------------------
# documents: packed sequences and left padding through every backend
# ---------------------------------------------------------------------------------------------------------------
from lightning_modules.layers.forgetting_attention import (  # noqa: E402
    choose_backend, cu_seqlens_from_starts, segment_starts)


def naive_segments(q, k, v, log_f, scale, seg):
    """Straight from the definition, one document at a time: keys of the query's own run, causally."""
    b, h, tq, _ = q.shape
    tk = k.shape[2]
    out = torch.zeros_like(q)
    for bi in range(b):
        for i in range(tq):
            pos = i + tk - tq
            js = [j for j in range(pos + 1) if all(seg[bi, m] == seg[bi, pos] for m in range(j, pos + 1))]
            logits = torch.stack([(q[bi, :, i] * k[bi, :, j]).sum(-1) * scale + log_f[bi, :, j + 1:pos + 1].sum(-1)
                                  for j in js], -1)
            out[bi, :, i] = (torch.softmax(logits, -1)[..., None] * v[bi, :, js]).sum(1)
    return out


SEGMENTS = [  # (B, H, Tq, Tk, D, block, segment ids of each row)
    (2, 2, 13, 13, 8, 4, [[0] * 5 + [1] * 3 + [2] * 5, [7] * 2 + [3] * 11]),   # packed documents
    (2, 2, 19, 19, 8, 8, [[0] * 6 + [1] * 13, [1] * 19]),                        # a left-padded row and a full one
    (1, 2, 6, 21, 8, 4, [[0] * 4 + [1] * 9 + [0] * 8]),                          # queries = last 6 (a decode chunk)
    (2, 1, 40, 40, 16, 256, [[i // 7 for i in range(40)], [0] * 40]),           # one block, many documents
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", SEGMENTS, ids=lambda c: "x".join(map(str, c[:6])))
def test_documents_match_the_naive_loop_fp64(backend, case):
    b, h, tq, tk, d, block, seg = case
    seg = torch.tensor(seg)
    q, k, v, log_f = inputs(b, h, tq, tk, d, seed=3)
    ref = value_and_grads(lambda *a: naive_segments(*a, 1 / math.sqrt(d), seg), q, k, v, log_f)
    got = value_and_grads(lambda *a: forgetting_attention(*a, backend=backend, block_size=block, segment_ids=seg),
                          q, k, v, log_f)
    for name, r, g in zip(["out", "dq", "dk", "dv", "dlog_f"], ref, got):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-11, msg=f"{backend} {name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_documents_equal_documents_one_by_one(backend):
    """Three documents packed in one row give each document's own outputs and gradients (float64)."""
    lengths = [9, 30, 17]
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    q, k, v, log_f = inputs(1, 2, sum(lengths), sum(lengths), 16, seed=4)
    packed = value_and_grads(lambda *a: forgetting_attention(*a, backend=backend, block_size=8, segment_ids=seg),
                             q, k, v, log_f)
    lo = 0
    for n in lengths:
        parts = [t.detach()[..., lo:lo + n, :].clone().requires_grad_() for t in (q, k, v)]
        lf = log_f.detach()[..., lo:lo + n].clone().requires_grad_()
        # the upstream gradient of value_and_grads depends on the element index: recompute it for the slice
        out = forgetting_attention(*parts, lf, backend=backend, block_size=8)
        w = torch.sin(torch.arange(q.numel(), dtype=q.dtype)).view_as(q)[..., lo:lo + n, :]
        alone = [out.detach(), *torch.autograd.grad((out * w).sum(), [*parts, lf])]
        for name, a, p in zip(["out", "dq", "dk", "dv", "dlog_f"], alone, packed):
            torch.testing.assert_close(p[..., lo:lo + n, :] if p.dim() == 4 else p[..., lo:lo + n], a,
                                       rtol=1e-10, atol=1e-11, msg=f"{backend} {name}")
        lo += n


def test_segment_starts_and_cu_seqlens():
    seg = torch.tensor([[0, 0, 1, 1, 1, 0], [5, 5, 5, 5, 5, 5]])
    assert segment_starts(seg).tolist() == [[0, 0, 2, 2, 2, 5], [0, 0, 0, 0, 0, 0]]
    assert cu_seqlens_from_starts(segment_starts(seg)).tolist() == [0, 2, 5, 6, 12]


def test_no_gate_with_documents_is_masked_sdpa():
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    q, k, v, _ = inputs(1, 2, 7, 7, 8)
    out = forgetting_attention(q, k, v, None, segment_ids=seg)
    zero = torch.zeros(1, 2, 7, dtype=torch.float64)
    torch.testing.assert_close(out, forgetting_attention(q, k, v, zero, backend="dense", segment_ids=seg))


def test_flex_documents_forward_matches_dense_on_cpu():
    seg = torch.tensor([[0] * 20 + [1] * 44, [3] * 64])
    q, k, v, log_f = (t.detach().float() for t in inputs(2, 2, 64, 64, 16))
    out = forgetting_attention(q, k, v, log_f, backend="flex", segment_ids=seg)
    ref = forgetting_attention(q, k, v, log_f, backend="dense", segment_ids=seg)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tq, tk, dtype, fla, expected", [
    (512, 512, torch.bfloat16, True, "fla"),      # training / prefill in half precision: FLA's kernel
    (1, 513, torch.bfloat16, True, "dense"),      # a decode step: never fla (it rejects Tq != Tk), no flex compile
    (4, 600, torch.bfloat16, True, "dense"),      # a short chunk against the cache
    (64, 600, torch.bfloat16, True, "flex"),      # a long chunk against a cache: flex (fla needs Tq == Tk)
    (512, 512, torch.float32, True, "flex"),      # fp32: fla takes half precision only
    (512, 512, torch.bfloat16, False, "flex"),    # no fla-core
])
def test_auto_backend_on_cuda_like_inputs(tq, tk, dtype, fla, expected):
    assert choose_backend("auto", device_type="cuda", dtype=dtype, tq=tq, tk=tk, fla=fla, native=False) == expected
    assert choose_backend("auto", device_type="cpu", dtype=dtype, tq=tq, tk=tk, fla=False, native=True) == "native"
    assert choose_backend("auto", device_type="cpu", dtype=dtype, tq=tq, tk=tk, fla=False, native=False) == \
        "blockwise"


def test_bad_segment_ids():
    q, k, v, log_f = inputs(1, 2, 4, 4, 8)
    with pytest.raises(ValueError, match=r"segment_ids must have shape \(B, Tk\) = \(1, 4\)"):
        forgetting_attention(q, k, v, log_f, segment_ids=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="segment_ids has dtype torch.float32"):
        forgetting_attention(q, k, v, log_f, segment_ids=torch.zeros(1, 4))


def test_compiled_flex_recompiles_per_doubling_not_per_cache_length():
    """Decoding grows the cache by one key per step: the compiled flex path pads to power-of-two buckets, so cache
    lengths 40..128 share one compiled kernel, 129 starts the next (counted with dynamo's graph counter).  Runs the
    compiled forward on CPU (inference); outputs equal the dense reference."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from lightning_modules.layers import forgetting_attention as fa

    torch._dynamo.reset()
    counters.clear()
    graphs = []
    with torch.no_grad():
        for tk in (40, 77, 128, 129):
            q, k, v, log_f = (t.detach().float() for t in inputs(2, 2, 1, tk, 16, seed=tk))
            c = torch.cumsum(log_f, -1)
            starts = torch.tensor([[0], [5]])
            out = fa._flex_forgetting_attention(q, k, v, c, 0.25, starts, compiled=True)
            torch.testing.assert_close(out, fa.dense_forgetting_attention(q, k, v, c, 0.25, starts), rtol=1e-5,
                                       atol=1e-5)
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [1, 1, 1, 2], graphs
