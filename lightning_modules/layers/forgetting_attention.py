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

``auto`` picks ``native`` > ``blockwise`` on CPU; on CUDA ``fla`` (half precision, ``Tq == Tk``: training and prefill)
> ``flex``, and ``dense`` for decode steps (``Tq <= 16``: one row of scores per query, no compile, no ``Tq == Tk``
rule).  ``log_fgate=None`` means no gate (plain causal attention through ``F.scaled_dot_product_attention``).

Documents: ``segment_ids`` ``(B, Tk)`` labels every key position; a query sees only keys of its own run of equal ids
(a packed document, or the real tokens of a left-padded prompt), causally.  Each run is a contiguous block, so this is
``start_i <= j <= i`` with ``start_i`` the first position of query i's run; every backend takes it (dense: a mask;
native: per-row starts in the tile loop, tiles before a block's first start skipped; blockwise: per-tile masks; flex:
a document ``mask_mod``; fla: ``cu_seqlens`` over the flattened batch).  The cumulative gate is re-based to 0 at every
run start, which changes no output (only differences ``c_i - c_j`` inside a run are used) and keeps ``|c|`` as small as
one document's decay.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import sys
import threading
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
    segment_ids: Optional[torch.Tensor] = None,
    cumulative: bool = False,
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
        segment_ids: optional ``(B, Tk)`` integer labels of the keys' documents (see the module docstring).
        cumulative: ``log_fgate`` already holds the cumulative sums ``c`` (a decode cache keeps them, so a step does
            not re-sum the whole cache); not for ``fla``, which sums itself.
    Returns:
        ``(B, H, Tq, D)`` output in ``q.dtype``.
    """
    _check_inputs(q, k, v, log_fgate, backend, block_size, segment_ids)
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    tq, tk = q.shape[2], k.shape[2]
    starts = q_starts = None  # (B, Tk) start of every key's run; (B, Tq) those of the queries
    if segment_ids is not None:
        if tq == 1:  # a decode step sees only its own run: its start is all that is needed (no cummax over the keys)
            q_starts = last_run_start(segment_ids)
        else:
            starts = segment_starts(segment_ids)
            q_starts = starts[:, tk - tq:].contiguous()
    if log_fgate is None:
        return _no_gate(q, k, v, scale, q_starts)
    gate_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    log_fgate = log_fgate.to(gate_dtype)
    name = resolve_backend(backend, q, tk)
    if cumulative and name == "fla":
        raise ValueError("backend 'fla' takes log gates, not their cumulative sums (cumulative=True)")
    c = log_fgate if cumulative else torch.cumsum(log_fgate, dim=-1)
    if q_starts is not None:
        # re-base c to 0 at every run start (outputs unchanged, |c| stays one document's decay).  A single query reads
        # c only inside its own run, so one offset per row gives those keys exactly the values a per-key re-base would.
        ref = q_starts if starts is None else starts
        c = c - c.gather(-1, ref[:, None, :].expand(c.shape[0], c.shape[1], ref.shape[1]))
    if name == "dense":
        return dense_forgetting_attention(q, k, v, c, scale, q_starts)
    if name == "native":
        return native_forgetting_attention(q, k, v, c, scale, q_starts)
    if name == "blockwise":
        return blockwise_forgetting_attention(q, k, v, c, scale, block_size, q_starts)
    if name == "flex":
        return _flex_forgetting_attention(q, k, v, c, scale, q_starts)
    return _fla_forgetting_attention(q, k, v, log_fgate, scale, q_starts if starts is None else starts)


DECODE_MAX_QUERIES = 16  # at most this many queries against a longer cache: a decode step (auto -> dense on CUDA)


def choose_backend(backend: str, *, device_type: str, dtype: torch.dtype, tq: int, tk: int, fla: bool,
                   native: bool) -> str:
    """What ``auto`` runs for a call with these properties (a pure function, so every device's rule is testable on
    any machine).  CUDA: ``fla`` only where it works (half precision and ``Tq == Tk``: its kernel rejects a query
    block shorter than the keys), ``dense`` for decode steps (``Tq <= 16 < Tk``: O(Tk) work, no compile per cache
    length), ``flex`` otherwise.  CPU: ``native`` when it built, else ``blockwise``."""
    if backend != "auto":
        return backend
    if device_type == "cuda":
        if tq < tk and tq <= DECODE_MAX_QUERIES:
            return "dense"
        if fla and dtype in (torch.float16, torch.bfloat16) and tq == tk:
            return "fla"
        return "flex"
    return "native" if native else "blockwise"


def resolve_backend(backend: str, q: torch.Tensor, tk: Optional[int] = None) -> str:
    """The backend ``auto`` would run for ``q`` against ``tk`` keys (default ``Tq``), or ``backend`` itself, checked
    for availability."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    tq = q.shape[2] if q.dim() == 4 else 1
    tk = tq if tk is None else tk
    if backend == "auto":
        native = False if q.is_cuda else native_extension() is not None
        return choose_backend(backend, device_type=q.device.type, dtype=q.dtype, tq=tq, tk=tk,
                              fla=q.is_cuda and fla_available(), native=native)
    if backend == "native" and (q.is_cuda or native_extension() is None):
        raise ValueError("attention backend 'native' needs a CPU tensor and a C++ compiler for its one-time build "
                         f"({_native_error or 'CUDA input'}); use 'blockwise' or 'auto'")
    if backend == "fla" and not (q.is_cuda and fla_available()):
        raise ValueError("attention backend 'fla' needs a CUDA device and the fla-core package (pip install fla-core)")
    if backend == "fla" and tq != tk:
        raise ValueError(f"attention backend 'fla' needs as many queries as keys (got Tq={tq}, Tk={tk}, a decode "
                         "step); use 'auto', which decodes with 'dense'")
    if backend == "flex" and not q.is_cuda and torch.is_grad_enabled() and q.requires_grad:
        raise ValueError("attention backend 'flex' cannot train on CPU (no FlexAttention backward there); "
                         "use backend='blockwise' or 'auto'")
    return backend


def segment_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` int64: for every position, the first position of its run of equal ``segment_ids``."""
    t = segment_ids.shape[-1]
    pos = torch.arange(t, device=segment_ids.device).expand_as(segment_ids)
    new = torch.ones_like(segment_ids, dtype=torch.bool)
    new[..., 1:] = segment_ids[..., 1:] != segment_ids[..., :-1]
    return torch.where(new, pos, torch.zeros_like(pos)).cummax(-1).values


def last_run_start(segment_ids: torch.Tensor) -> torch.Tensor:
    """``(B, 1)`` int64: the first position of the run that ends at the last position, i.e.
    ``segment_starts(segment_ids)[:, -1:]`` without the scan over every position."""
    pos = torch.arange(segment_ids.shape[-1], device=segment_ids.device)
    return torch.where(segment_ids != segment_ids[..., -1:], pos, -1).amax(-1, keepdim=True) + 1


def cu_seqlens_from_starts(starts: torch.Tensor) -> torch.Tensor:
    """FlashAttention-style ``cu_seqlens`` (int32 ``[N + 1]``) of every run in the batch flattened to one row:
    run boundaries inside each row, and every row boundary."""
    b, t = starts.shape
    pos = torch.arange(t, device=starts.device).expand(b, t)
    first = (starts == pos).flatten().nonzero().flatten()
    return torch.cat([first, first.new_tensor([b * t])]).to(torch.int32)


def fla_available() -> bool:
    return importlib.util.find_spec("fla") is not None


def _check_inputs(q, k, v, log_fgate, backend, block_size, segment_ids=None) -> None:
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
    if segment_ids is not None:
        if tuple(segment_ids.shape) != (k.shape[0], k.shape[2]):
            raise ValueError(f"segment_ids must have shape (B, Tk) = {(k.shape[0], k.shape[2])}, "
                             f"got {tuple(segment_ids.shape)}")
        if segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool:
            raise ValueError(f"segment_ids has dtype {segment_ids.dtype}; expected an integer dtype")


def visible(tq: int, tk: int, q_starts: Optional[torch.Tensor], device) -> torch.Tensor:
    """Boolean mask of the keys each query sees: ``(Tq, Tk)`` causal, or ``(B, 1, Tq, Tk)`` with document starts."""
    causal = torch.ones(tq, tk, dtype=torch.bool, device=device).tril(tk - tq)
    if q_starts is None:
        return causal
    keys = torch.arange(tk, device=device)
    return (causal & (keys[None, None, :] >= q_starts[:, :, None]))[:, None]


def _no_gate(q, k, v, scale, q_starts=None):
    tq, tk = q.shape[2], k.shape[2]
    if tq == tk and q_starts is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible(tq, tk, q_starts, q.device), scale=scale)


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


def dense_forgetting_attention(q, k, v, c, scale, q_starts=None):
    """Reference: scores, bias ``c_i - c_j`` (``c`` = cumulative log gate) and softmax in fp32 (fp64 for fp64
    inputs), keys outside ``[start_i, i]`` masked; O(Tq Tk) memory."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    tq, tk = q.shape[2], k.shape[2]
    c = c.to(ct)
    bias = (c[..., tk - tq:, None] - c[..., None, :]).masked_fill(~visible(tq, tk, q_starts, q.device),
                                                                  float("-inf"))
    scores = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale + bias
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
    # torch reuses a cached build when the source is unchanged (a second or so to load); it compiles otherwise.
    # Announce only a real build: the notice appears if loading has not finished after two seconds.
    notice = threading.Timer(2.0, lambda: print("Building the FoX CPU attention kernel (once per machine and kernel "
                                                "version, ~25 s) ...", file=sys.stderr, flush=True))
    try:
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" notice
        from torch.utils.cpp_extension import load

        linux = sys.platform.startswith("linux")
        capability = torch.backends.cpu.get_cpu_capability().lower()  # -march=native: one build per CPU kind
        notice.daemon = True
        notice.start()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _native_module = load(
                name=f"paper_recipes_fox_attention_cpu_{capability}",
                sources=[os.path.join(os.path.dirname(__file__), "csrc", "fox_attention_cpu.cpp")],
                extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                extra_ldflags=["-fopenmp"] + (["-lmvec"] if linux else []),
                verbose=False)
    except Exception as err:  # no compiler, no ninja, unsupported platform: fall back to 'blockwise'
        _native_error = " ".join(str(err).split())[:300] or type(err).__name__
        warnings.warn(f"FoX native CPU kernel unavailable, using the 'blockwise' backend: {_native_error}")
    finally:
        notice.cancel()
    return _native_module


_NO_STARTS = torch.empty(0, dtype=torch.int64)


class _NativeFoX(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, c, starts, scale):
        out, lse = native_extension().forward(q, k, v, c, starts, scale, *_NATIVE_BLOCKS)
        ctx.save_for_backward(q, k, v, c, starts, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_o):
        q, k, v, c, starts, out, lse = ctx.saved_tensors
        dq, dk, dv, dc = native_extension().backward(_last_dim_contiguous(grad_o), q, k, v, c, starts, out, lse,
                                                     ctx.scale, *_NATIVE_BLOCKS)
        return dq, dk, dv, dc, None, None


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def native_forgetting_attention(q, k, v, c, scale, q_starts=None):
    """The C++ kernel on the cumulative gate ``c``; half-precision inputs are computed in fp32."""
    if q.is_cuda or native_extension() is None:
        raise ValueError("attention backend 'native' is unavailable here; use 'blockwise' or 'auto'")
    dtype = q.dtype
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    q, k, v = (_last_dim_contiguous(t.to(ct)) for t in (q, k, v))
    starts = _NO_STARTS if q_starts is None else q_starts.to(torch.int64).contiguous()
    c = c.to(ct).contiguous()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, c)):
        return _NativeFoX.apply(q, k, v, c, starts, scale).to(dtype)
    # nothing to differentiate (generation, evaluation): the kernel without the autograd.Function's per-call cost
    return native_extension().forward(q, k, v, c, starts, scale, *_NATIVE_BLOCKS)[0].to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# blockwise CPU path on PyTorch's fused SDPA kernel
# ----------------------------------------------------------------------------------------------------------------
_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
_MASKED = -1e30  # additive mask of a hidden key: finite, so a tile row with no visible key stays finite (weight 0)


def _blocks(tq: int, tk: int, block: int):
    """Yield (a, b, start) per query block: query rows [a, b) sit at key positions [start, start + b - a)."""
    off = tk - tq
    for a in range(0, tq, block):
        b = min(a + block, tq)
        yield a, b, off + a


def _tiles(q_starts, a: int, b: int, start: int, dtype):
    """The key tiles of query block [a, b) (at key positions [start, start + b - a)): ``(k0, k1, causal, mask)``,
    the diagonal tile first.  Without document starts: the causal diagonal and all keys before it.  With them:
    keys from the block's smallest start, with an additive mask only where a row's start cuts into a tile."""
    end = start + b - a
    if q_starts is None:
        return [(start, end, True, None)] + ([(0, start, False, None)] if start > 0 else [])
    qs = q_starts[:, a:b]  # (B, n)
    lo, hi = int(qs.min()), int(qs.max())
    pos = torch.arange(start, end, device=qs.device)

    def mask(k0, k1, causal):
        keys = torch.arange(k0, k1, device=qs.device)
        ok = keys[None, None, :] >= qs[:, :, None]
        if causal:
            ok = ok & (keys[None, :] <= pos[:, None])
        return torch.zeros(ok.shape, dtype=dtype, device=qs.device).masked_fill_(~ok, _MASKED)[:, None]

    tiles = [(start, end, True, None) if hi <= start else (start, end, False, mask(start, end, True))]
    if lo < start:
        tiles.append((lo, start, False, None if hi <= lo else mask(lo, start, False)))
    return tiles


def _set_gate_column(kx, c, start, n):
    """Write r - c_j into k''s last column for keys [0, start + n); r = midpoint of c over the query block."""
    ref = 0.5 * (c[..., start] + c[..., start + n - 1])
    kx[..., : start + n, -1] = (ref[..., None] - c[..., : start + n]).to(kx.dtype)


class _BlockwiseFoX(torch.autograd.Function):
    """q' = [q, 1/s], k' = [k, r - c_j], v' = [v, 0]; the kernel's scale s turns q'.k' into s q.k + r - c_j."""

    @staticmethod
    def forward(ctx, q, k, v, c, q_starts, scale, block):
        tq, tk, d = q.shape[2], k.shape[2], q.shape[3]
        qx = torch.cat([q, q.new_tensor(1.0 / scale).expand(q.shape[:3] + (1,))], dim=-1)
        kx = torch.cat([k, k.new_zeros(k.shape[:3] + (1,))], dim=-1)
        vx = torch.cat([v, v.new_zeros(v.shape[:3] + (1,))], dim=-1)
        out = q.new_empty(q.shape[:3] + (d + 1,))
        lse = q.new_empty(q.shape[:3], dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
        for a, b, start in _blocks(tq, tk, block):
            _set_gate_column(kx, c, start, b - a)
            qb = qx[..., a:b, :]
            o_d = l_d = None
            for k0, k1, causal, mask in _tiles(q_starts, a, b, start, q.dtype):
                o_t, l_t = _flash_fwd(qb, kx[..., k0:k1, :], vx[..., k0:k1, :], 0.0, causal, attn_mask=mask,
                                      scale=scale)
                if o_d is None:
                    o_d, l_d = o_t, l_t
                    continue
                l_m = torch.logaddexp(l_d, l_t)
                o_d = o_d * torch.exp(l_d - l_m)[..., None].to(o_d.dtype) \
                    + o_t * torch.exp(l_t - l_m)[..., None].to(o_t.dtype)
                l_d = l_m
            if b - a == tq:  # one block: no copy
                out, lse = o_d, l_d
            else:
                out[..., a:b, :] = o_d
                lse[..., a:b] = l_d
        ctx.save_for_backward(qx, kx, vx, c, out, lse, *([] if q_starts is None else [q_starts]))
        ctx.scale, ctx.block = scale, block
        return out[..., :d]

    @staticmethod
    def backward(ctx, grad_o):
        qx, kx, vx, c, out, lse, *rest = ctx.saved_tensors
        q_starts = rest[0] if rest else None
        scale, block = ctx.scale, ctx.block
        tq, tk, d = qx.shape[2], kx.shape[2], qx.shape[3] - 1
        go = torch.cat([grad_o, grad_o.new_zeros(grad_o.shape[:3] + (1,))], dim=-1)
        if tq == tk and tq <= block and q_starts is None:  # one causal tile: the kernel's gradients, no copies
            _set_gate_column(kx, c, 0, tq)
            gq, gk, gv = _flash_bwd(go, qx, kx, vx, out, lse, 0.0, True, scale=scale)
            return gq[..., :d], gk[..., :d], gv[..., :d], -gk[..., d].to(c.dtype), None, None, None
        # A diagonal tile is the first to touch its keys (earlier blocks end before it), so it assigns; the
        # "past" tiles add.  Only keys before the first query (Tq < Tk) need zeros.
        dq = torch.empty(qx.shape[:3] + (d,), dtype=qx.dtype, device=qx.device)
        dk, dv = torch.empty_like(kx), torch.empty_like(vx)  # dk's last column: sum_i dS_ij
        dk[..., : tk - tq, :] = 0
        dv[..., : tk - tq, :] = 0
        for a, b, start in _blocks(tq, tk, block):
            _set_gate_column(kx, c, start, b - a)
            args = (go[..., a:b, :], qx[..., a:b, :])
            for n_tile, (k0, k1, causal, mask) in enumerate(_tiles(q_starts, a, b, start, qx.dtype)):
                gq, gk, gv = _flash_bwd(*args, kx[..., k0:k1, :], vx[..., k0:k1, :], out[..., a:b, :],
                                        lse[..., a:b], 0.0, causal, attn_mask=mask, scale=scale)
                if n_tile == 0:  # the diagonal tile
                    dq[..., a:b, :] = gq[..., :d]
                    dk[..., k0:k1, :] = gk
                    dv[..., k0:k1, :] = gv
                else:
                    dq[..., a:b, :] += gq[..., :d]
                    dk[..., k0:k1, :] += gk
                    dv[..., k0:k1, :] += gv
        # d logit_ij / d c_j = -1 (key role); the query role's gradient is exactly zero (softmax row shift)
        dc = -dk[..., d].to(c.dtype)
        return dq, dk[..., :d], dv[..., :d], dc, None, None, None


def blockwise_forgetting_attention(q, k, v, c, scale, block_size=256, q_starts=None):
    """FlashAttention-style tiling over PyTorch's fused SDPA kernel on the cumulative gate ``c`` (see the module
    docstring)."""
    if q.is_cuda:
        raise ValueError("backend 'blockwise' runs PyTorch's fused CPU kernel; on CUDA use 'flex', 'fla' or 'auto'")
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):  # the gate column must not be rounded to half precision
        q, k, v = q.float(), k.float(), v.float()
    return _BlockwiseFoX.apply(q, k, v, c, q_starts, scale, int(block_size)).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# CUDA backends
# ----------------------------------------------------------------------------------------------------------------
_compiled_flex = None
_FLEX_MIN_KEYS = 128  # FlexAttention's key block on GPU


def flex_bucket(n: int, minimum: int = 1) -> int:
    """The padded length a compiled FlexAttention call runs at: the next power of two >= ``n`` (>= ``minimum``)."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def _pad_to(x: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    if x.shape[dim] == n:
        return x
    shape = list(x.shape)
    shape[dim] = n - x.shape[dim]
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def _flex_forgetting_attention(q, k, v, c, scale, q_starts=None, compiled: Optional[bool] = None):
    """FlexAttention with ``score + c[q] - c[kv]`` and a causal (or causal document) block mask: tiles above the
    diagonal and before a block's documents are skipped.

    On CUDA (or with ``compiled=True``) it runs compiled with static shapes on a padded cache: queries and keys are
    padded to the next power of two (keys to at least 128) and the real lengths enter the mask as tensors, so a
    growing cache recompiles once per doubling, never per length (tested by counting compiles).  Padded rows see no
    key and are dropped."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _compiled_flex
    b, tq, tk = q.shape[0], q.shape[2], k.shape[2]
    use_compile = compiled if compiled is not None else q.is_cuda
    tq_pad, tk_pad = (flex_bucket(tq), flex_bucket(tk, _FLEX_MIN_KEYS)) if use_compile else (tq, tk)
    c = c.float()
    # the query-side gradient of c is exactly zero: a detached copy skips its atomics
    c_q = _pad_to(c[..., tk - tq:].detach(), 2, tq_pad).contiguous()
    c_k = _pad_to(c, 2, tk_pad).contiguous()
    n_q, off = torch.tensor(tq, device=q.device), torch.tensor(tk - tq, device=q.device)
    starts = None if q_starts is None else _pad_to(q_starts, 1, tq_pad)

    def score_mod(score, bi, h, qi, kvi):
        return score + c_q[bi, h, qi] - c_k[bi, h, kvi]

    def visible_mod(bi, h, qi, kvi):
        ok = (qi < n_q) & (qi + off >= kvi)
        return ok if starts is None else ok & (kvi >= starts[bi, qi])

    # on CUDA the block mask is built compiled, tile by tile: uncompiled it materialises a Tq x Tk boolean mask
    # (256 MiB at 16k, more in temporaries), which makes the flex path's memory O(T^2).  (Inductor's CPU build of
    # this graph fails in torch 2.14; the CPU path is forward-only and short anyway.)
    block_mask = create_block_mask(visible_mod, None if starts is None else b, None, tq_pad, tk_pad,
                                   device=q.device, _compile=use_compile and q.is_cuda)
    q, k, v = _pad_to(q, 2, tq_pad), _pad_to(k, 2, tk_pad), _pad_to(v, 2, tk_pad)
    if use_compile:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        out = _compiled_flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
    else:
        out = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
    return out[..., :tq, :]


def _fla_forgetting_attention(q, k, v, log_fgate, scale, starts=None):  # pragma: no cover - needs CUDA + fla-core
    """FLA's kernel on ``(B, T, H, D)`` views; with documents, the batch is flattened to one row with
    ``cu_seqlens`` at every document and row start (FLA's varlen mode restarts the gate cumsum there)."""
    from fla.ops.forgetting_attn import parallel_forgetting_attn

    if q.shape[2] != k.shape[2]:
        raise ValueError("backend 'fla' needs Tq == Tk; use 'auto', which decodes with 'dense'")
    b, h, t, d = q.shape
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    g = log_fgate.float().transpose(1, 2)
    if starts is None:
        return parallel_forgetting_attn(qt, kt, vt, g, scale=scale).transpose(1, 2)
    flat = [x.reshape(1, b * t, *x.shape[2:]) for x in (qt, kt, vt, g)]
    o = parallel_forgetting_attn(*flat, scale=scale, cu_seqlens=cu_seqlens_from_starts(starts))
    return o.reshape(b, t, h, d).transpose(1, 2)
