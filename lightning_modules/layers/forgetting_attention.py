"""Forgetting Attention (FoX, Lin et al., ICLR 2025): causal softmax attention with a forget-gate bias.

    o = softmax(sm_scale * Q K^T + D) V,   D_ij = c_i - c_j  (j <= i),   c = cumsum(log_fgate)  (fp32)

Backends (all compute the same function; `dense` is the reference the others are tested against):

* ``dense``      -- explicit fp32 (or fp64) scores + bias + softmax; any device, O(T^2) memory.
* ``blockwise``  -- CPU: FlashAttention-style tiling over query blocks that reuses PyTorch's fused CPU SDPA
                    kernel and its fused backward.  The gate enters as one extra head-dim column:
                    q' = [q, 1/s], k' = [k, r - c_j], v' = [v, 0], where r is a per-query-block reference (the row
                    term c_i - r cancels in the softmax).  Each query block
                    is attended in two tiles (keys before the block: full; the block itself: causal) and the tiles
                    are merged with their log-sum-exps; tiles above the diagonal are never computed.  The backward
                    calls the fused backward per tile with the merged output and log-sum-exp, and reads
                    dL/dc_j = -sum_i dS_ij from the extra k' column.  Memory is O(T * block), not O(T^2).
                    Precision: the per-block reference keeps |r - c_j| below half a block's gate decay for the keys
                    that carry weight.  In fp32 the output and dq/dk/dv are as accurate as the dense fp32
                    reference; d log f is within ~4x of its error (5e-4 vs 1.3e-4 absolute at T=512, block 256,
                    mean log f = -2.3; tested).  float64 is exact to ~1e-15.
                    Subnormals: gate-decayed probabilities are often subnormal, which slows CPU float math 5-7x;
                    call ``torch.set_flush_denormal(True)`` before the first parallel op (the recipes' entry point
                    does) so the intra-op worker threads inherit flush-to-zero.
* ``native``     -- CPU: a C++ FlashAttention-2 kernel with the gate in the tile loop (``csrc/fox_attention_cpu.cpp``,
                    built with ``torch.utils.cpp_extension`` on first use, ~25 s, cached).  Reads strided q/k/v in
                    place, never forms a T x T matrix, skips tiles above the diagonal, saves only the log-sum-exp.
                    Faster than PyTorch's fused causal SDPA kernel on the shapes benchmarked (docs/performance.md).
                    fp32 error within 2.5x of the dense fp32 reference's (tested); float64 exact to ~1e-14.
                    ``PAPER_RECIPES_NO_NATIVE=1`` (or a failed build) falls back to ``blockwise``.
* ``flex``       -- CUDA: torch FlexAttention with a learnable-bias ``score_mod`` (PyTorch >= 2.6), compiled.
* ``fla``        -- CUDA: ``fla.ops.forgetting_attn.parallel_forgetting_attn`` when ``fla-core`` is installed.

``auto`` picks ``fla`` > ``flex`` on CUDA and ``native`` > ``blockwise`` elsewhere.  ``log_fgate=None`` means no gate (plain
causal attention, handled by ``F.scaled_dot_product_attention(is_causal=True)``).
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import sys
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "dense", "native", "blockwise", "flex", "fla")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def forgetting_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_fgate: Optional[torch.Tensor],
    *,
    sm_scale: Optional[float] = None,
    backend: str = "auto",
    block_size: int = 256,
) -> torch.Tensor:
    """Causal forgetting attention.

    Args:
        q: ``(B, H, Tq, D)`` queries; the queries are the *last* ``Tq`` positions of the ``Tk`` keys.
        k, v: ``(B, H, Tk, D)`` keys and values, ``Tq <= Tk``.
        log_fgate: ``(B, H, Tk)`` log forget gates (<= 0) in float32 (float64 with float64 inputs; half-precision
            gates are cast up), or ``None`` for no gate.
        sm_scale: logit scale, default ``1/sqrt(D)``.  The gate bias is not scaled.
        backend: one of ``auto, dense, blockwise, flex, fla``.
        block_size: query block of the ``blockwise`` backend.
    Returns:
        ``(B, H, Tq, D)`` output in ``q.dtype``.
    """
    _check_inputs(q, k, v, log_fgate, backend, block_size)
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if log_fgate is None:
        return _no_gate(q, k, v, scale)
    gate_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    log_fgate = log_fgate.to(gate_dtype)
    name = resolve_backend(backend, q)
    if name == "dense":
        return dense_forgetting_attention(q, k, v, log_fgate, scale)
    if name == "native":
        return native_forgetting_attention(q, k, v, log_fgate, scale)
    if name == "blockwise":
        return blockwise_forgetting_attention(q, k, v, log_fgate, scale, block_size)
    if name == "flex":
        return _flex_forgetting_attention(q, k, v, log_fgate, scale)
    return _fla_forgetting_attention(q, k, v, log_fgate, scale)


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """The backend ``auto`` would run for ``q`` (or ``backend`` itself, checked for availability)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if q.is_cuda:
            return "fla" if fla_available() and q.dtype in (torch.float16, torch.bfloat16) else "flex"
        return "native" if native_extension() is not None else "blockwise"
    if backend == "native" and (q.is_cuda or native_extension() is None):
        raise ValueError("attention backend 'native' needs a CPU tensor and a C++ compiler for its one-time build "
                         f"({_native_error or 'CUDA input'}); use 'blockwise' or 'auto'")
    if backend == "fla" and not (q.is_cuda and fla_available()):
        raise ValueError("attention backend 'fla' needs a CUDA device and the fla-core package (pip install fla-core)")
    if backend == "flex" and not q.is_cuda and torch.is_grad_enabled() and q.requires_grad:
        raise ValueError("attention backend 'flex' cannot train on CPU (no FlexAttention backward there); "
                         "use backend='blockwise' or 'auto'")
    return backend


def fla_available() -> bool:
    return importlib.util.find_spec("fla") is not None


def _check_inputs(q, k, v, log_fgate, backend, block_size) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, T, D), got {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; expected float16, bfloat16, float32 or float64")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} does not fit k {tuple(k.shape)}: need equal B, H and D")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"q has {q.shape[2]} positions but k only {k.shape[2]}; need Tq <= Tk")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if log_fgate is not None:
        want = (k.shape[0], k.shape[1], k.shape[2])
        if tuple(log_fgate.shape) != want:
            raise ValueError(f"log_fgate must have shape (B, H, Tk) = {want}, got {tuple(log_fgate.shape)}")
        if log_fgate.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"log_fgate has dtype {log_fgate.dtype}; expected a float dtype (float32 preferred)")
    if int(block_size) < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")


def _no_gate(q, k, v, scale):
    tq, tk = q.shape[2], k.shape[2]
    if tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# ----------------------------------------------------------------------------------------------------------------
# dense reference
# ----------------------------------------------------------------------------------------------------------------
def gate_bias(log_fgate: torch.Tensor, tq: int) -> torch.Tensor:
    """``(B, H, Tq, Tk)`` bias ``c_i - c_j`` for ``j <= i`` and ``-inf`` above the diagonal (queries = last Tq)."""
    tk = log_fgate.shape[-1]
    c = torch.cumsum(log_fgate, dim=-1)
    bias = c[..., tk - tq:, None] - c[..., None, :]
    causal = torch.ones(tq, tk, dtype=torch.bool, device=c.device).tril(tk - tq)
    return bias.masked_fill(~causal, float("-inf"))


def dense_forgetting_attention(q, k, v, log_fgate, scale):
    """Reference: scores, bias and softmax in fp32 (fp64 for fp64 inputs); O(T^2) memory."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale + gate_bias(log_fgate.to(ct), q.shape[2])
    return torch.matmul(torch.softmax(scores, dim=-1), v.to(ct)).to(q.dtype)


# ----------------------------------------------------------------------------------------------------------------
# native CPU kernel (C++, built on first use)
# ----------------------------------------------------------------------------------------------------------------
_NATIVE_BLOCKS = (64, 256)  # query rows x keys per tile; measured best of 32..256 x 128..512 on 2 cores
_native_module = None
_native_error: Optional[str] = None


def native_extension():
    """The compiled kernel module, or None if it cannot be built here (the reason is in ``_native_error``)."""
    global _native_module, _native_error
    if _native_module is not None or _native_error is not None:
        return _native_module
    if os.environ.get("PAPER_RECIPES_NO_NATIVE") == "1":
        _native_error = "disabled by PAPER_RECIPES_NO_NATIVE=1"
        return None
    try:
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" notice
        from torch.utils.cpp_extension import load

        from torch.utils.cpp_extension import get_default_build_root

        linux = sys.platform.startswith("linux")
        capability = torch.backends.cpu.get_cpu_capability().lower()  # -march=native: one build per CPU kind
        name = f"paper_recipes_fox_attention_cpu_{capability}"
        if not os.path.exists(os.path.join(get_default_build_root(), name, f"{name}.so")):
            print("Building the FoX CPU attention kernel (once per machine, ~25 s) ...", file=sys.stderr, flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _native_module = load(
                name=name,
                sources=[os.path.join(os.path.dirname(__file__), "csrc", "fox_attention_cpu.cpp")],
                extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                extra_ldflags=["-fopenmp"] + (["-lmvec"] if linux else []),
                verbose=False)
    except Exception as err:  # no compiler, no ninja, unsupported platform: fall back to 'blockwise'
        _native_error = " ".join(str(err).split())[:300] or type(err).__name__
        warnings.warn(f"FoX native CPU kernel unavailable, using the 'blockwise' backend: {_native_error}")
    return _native_module


class _NativeFoX(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, c, scale):
        out, lse = native_extension().forward(q, k, v, c, scale, *_NATIVE_BLOCKS)
        ctx.save_for_backward(q, k, v, c, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_o):
        q, k, v, c, out, lse = ctx.saved_tensors
        dq, dk, dv, dc = native_extension().backward(_last_dim_contiguous(grad_o), q, k, v, c, out, lse,
                                                     ctx.scale, *_NATIVE_BLOCKS)
        return dq, dk, dv, dc, None


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def native_forgetting_attention(q, k, v, log_fgate, scale):
    """The C++ kernel; half-precision inputs are computed in fp32."""
    if q.is_cuda or native_extension() is None:
        raise ValueError("attention backend 'native' is unavailable here; use 'blockwise' or 'auto'")
    dtype = q.dtype
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    q, k, v = (_last_dim_contiguous(t.to(ct)) for t in (q, k, v))
    c = torch.cumsum(log_fgate.to(ct), dim=-1).contiguous()
    return _NativeFoX.apply(q, k, v, c, scale).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# blockwise CPU path on PyTorch's fused SDPA kernel
# ----------------------------------------------------------------------------------------------------------------
_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _blocks(tq: int, tk: int, block: int):
    """Yield (a, b, start) per query block: query rows [a, b) sit at key positions [start, start + b - a)."""
    off = tk - tq
    for a in range(0, tq, block):
        b = min(a + block, tq)
        yield a, b, off + a


def _set_gate_column(kx, c, start, n):
    """Write r - c_j into k''s last column for keys [0, start + n); r = midpoint of c over the query block."""
    ref = 0.5 * (c[..., start] + c[..., start + n - 1])
    kx[..., : start + n, -1] = (ref[..., None] - c[..., : start + n]).to(kx.dtype)


class _BlockwiseFoX(torch.autograd.Function):
    """q' = [q, 1/s], k' = [k, r - c_j], v' = [v, 0]; the kernel's scale s turns q'.k' into s q.k + r - c_j."""

    @staticmethod
    def forward(ctx, q, k, v, c, scale, block):
        tq, tk, d = q.shape[2], k.shape[2], q.shape[3]
        qx = torch.cat([q, q.new_tensor(1.0 / scale).expand(q.shape[:3] + (1,))], dim=-1)
        kx = torch.cat([k, k.new_zeros(k.shape[:3] + (1,))], dim=-1)
        vx = torch.cat([v, v.new_zeros(v.shape[:3] + (1,))], dim=-1)
        out = q.new_empty(q.shape[:3] + (d + 1,))
        lse = q.new_empty(q.shape[:3], dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
        for a, b, start in _blocks(tq, tk, block):
            _set_gate_column(kx, c, start, b - a)
            qb, end = qx[..., a:b, :], start + b - a
            o_d, l_d = _flash_fwd(qb, kx[..., start:end, :], vx[..., start:end, :], 0.0, True, scale=scale)
            if start > 0:
                o_p, l_p = _flash_fwd(qb, kx[..., :start, :], vx[..., :start, :], 0.0, False, scale=scale)
                l_m = torch.logaddexp(l_d, l_p)
                o_d = o_d * torch.exp(l_d - l_m)[..., None].to(o_d.dtype) \
                    + o_p * torch.exp(l_p - l_m)[..., None].to(o_p.dtype)
                l_d = l_m
            if b - a == tq:  # one block: no copy
                out, lse = o_d, l_d
            else:
                out[..., a:b, :] = o_d
                lse[..., a:b] = l_d
        ctx.save_for_backward(qx, kx, vx, c, out, lse)
        ctx.scale, ctx.block = scale, block
        return out[..., :d]

    @staticmethod
    def backward(ctx, grad_o):
        qx, kx, vx, c, out, lse = ctx.saved_tensors
        scale, block = ctx.scale, ctx.block
        tq, tk, d = qx.shape[2], kx.shape[2], qx.shape[3] - 1
        go = torch.cat([grad_o, grad_o.new_zeros(grad_o.shape[:3] + (1,))], dim=-1)
        if tq == tk and tq <= block:  # one causal tile: the kernel's gradients are the answer, no copies
            _set_gate_column(kx, c, 0, tq)
            gq, gk, gv = _flash_bwd(go, qx, kx, vx, out, lse, 0.0, True, scale=scale)
            return gq[..., :d], gk[..., :d], gv[..., :d], -gk[..., d].to(c.dtype), None, None
        # A diagonal tile is the first to touch its keys (earlier blocks end before it), so it assigns; the
        # "past" tiles add.  Only keys before the first query (Tq < Tk) need zeros.
        dq = torch.empty(qx.shape[:3] + (d,), dtype=qx.dtype, device=qx.device)
        dk, dv = torch.empty_like(kx), torch.empty_like(vx)  # dk's last column: sum_i dS_ij
        dk[..., : tk - tq, :] = 0
        dv[..., : tk - tq, :] = 0
        for a, b, start in _blocks(tq, tk, block):
            _set_gate_column(kx, c, start, b - a)
            end = start + b - a
            args = (go[..., a:b, :], qx[..., a:b, :])
            gq, gk, gv = _flash_bwd(*args, kx[..., start:end, :], vx[..., start:end, :],
                                    out[..., a:b, :], lse[..., a:b], 0.0, True, scale=scale)
            dq[..., a:b, :] = gq[..., :d]
            dk[..., start:end, :] = gk
            dv[..., start:end, :] = gv
            if start > 0:
                gq, gk, gv = _flash_bwd(*args, kx[..., :start, :], vx[..., :start, :],
                                        out[..., a:b, :], lse[..., a:b], 0.0, False, scale=scale)
                dq[..., a:b, :] += gq[..., :d]
                dk[..., :start, :] += gk
                dv[..., :start, :] += gv
        # d logit_ij / d c_j = -1 (key role); the query role's gradient is exactly zero (softmax row shift)
        dc = -dk[..., d].to(c.dtype)
        return dq, dk[..., :d], dv[..., :d], dc, None, None


def blockwise_forgetting_attention(q, k, v, log_fgate, scale, block_size=256):
    """FlashAttention-style tiling over PyTorch's fused SDPA kernel (see the module docstring)."""
    if q.is_cuda:
        raise ValueError("backend 'blockwise' runs PyTorch's fused CPU kernel; on CUDA use 'flex', 'fla' or 'auto'")
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):  # the gate column must not be rounded to half precision
        q, k, v = q.float(), k.float(), v.float()
    c = torch.cumsum(log_fgate, dim=-1)
    return _BlockwiseFoX.apply(q, k, v, c, scale, int(block_size)).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# CUDA backends
# ----------------------------------------------------------------------------------------------------------------
_compiled_flex = None


def _flex_forgetting_attention(q, k, v, log_fgate, scale):
    """FlexAttention with ``score + c[q] - c[kv]`` and a causal block mask (tiles above the diagonal skipped)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _compiled_flex
    tq, tk = q.shape[2], k.shape[2]
    off = tk - tq
    c = torch.cumsum(log_fgate.float(), dim=-1)
    c_q = c[..., off:].detach()  # query-side gradient of c is exactly zero (softmax row shift): skip its atomics

    def score_mod(score, b, h, qi, kvi):
        return score + c_q[b, h, qi] - c[b, h, kvi]

    def causal(b, h, qi, kvi):
        return qi + off >= kvi

    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        block_mask = create_block_mask(causal, None, None, tq, tk, device=q.device)
        return _compiled_flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
    block_mask = create_block_mask(causal, None, None, tq, tk, device=q.device)
    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)


def _fla_forgetting_attention(q, k, v, log_fgate, scale):  # pragma: no cover - needs CUDA + fla-core
    from fla.ops.forgetting_attn import parallel_forgetting_attn

    if q.shape[2] != k.shape[2]:
        raise ValueError("backend 'fla' needs Tq == Tk; use 'flex' or 'dense' for decoding")
    o = parallel_forgetting_attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                 log_fgate.float().transpose(1, 2), scale=scale)
    return o.transpose(1, 2)

