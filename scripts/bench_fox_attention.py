"""Forward+backward time, throughput and memory of each FoX attention backend vs causal attention without a gate.

    python scripts/bench_fox_attention.py                       # CPU: T = 256..4096, fp32, B=2 H=4 D=64
    python scripts/bench_fox_attention.py --device cuda         # GPU: T = 2k..16k, bf16, D = 64 and 128
    python scripts/bench_fox_attention.py --device cuda --quick # GPU: the acceptance shapes only (D = 128), 5 repeats
    python scripts/bench_fox_attention.py --write [--doc PATH] [--csv PATH]   # update a markdown section / CSV rows

What is measured: one forward + backward (the output's gradient given, input gradients cleared) of each path at each
shape, timed side by side in one process (interleaved repeats, medians; every path is run once alone first, which
also compiles it, and twice more as warm-up).  Columns: median ms, time relative to the baseline, TFLOP/s (the
causal attention FLOPs of the shape, ``attention_flops``, the same count for every path, divided by the time) and
memory: on CUDA the peak allocated during one fwd+bwd minus what was allocated before it (the new input gradients
included); on CPU the bytes autograd saves for the backward (what grows with T).

CUDA (the issue's acceptance: FoX fwd+bwd >= 0.9x the FA2 causal baseline at T >= 4k, D = 128, memory O(T)):

* baseline ``SDPA FA2 causal (no gate)``: ``F.scaled_dot_product_attention(is_causal=True)`` with its
  FlashAttention-2 backend forced (``sdpa_kernel(SDPBackend.FLASH_ATTENTION)``); ratios are against it;
* ``FoX flex`` (compiled FlexAttention: one compile per shape, outside the timing) and ``FoX fla`` (when fla-core is
  importable); ``FA2 causal (no gate)`` (``flash_attn_func``) as a second no-gate row when flash-attn is installed;
* q, k, v are allocated ``(B, T, H, D)`` and passed as ``(B, H, T, D)`` views, the log gates ``(B, T, H)`` as
  ``(B, H, T)``: the layout ``ForgettingAttentionLayer`` passes them in;
* default grid: bf16, T = 2048, 4096, 8192, 16384, D = 64 and 128, B = 2, H = 4; ``--quick``: D = 128 only and
  5 repeats (the shapes the goals read, about half the time: each FlexAttention shape compiles once, ~5-15 s);
* under the table, goal lines: for D = 128 and T >= 4096 the minimum over T of the throughput ratio (baseline time /
  FoX time) of FoX fla and of FoX flex, >= 0.9; and for each FoX path whether its peak memory grows ~linearly in T
  (O(T): mem(T_max) / mem(T_min) <= 1.5 * T_max / T_min over the D = 128 rows).

A path that fails at a shape (out of memory, a backend or compile error) is recorded as a failed row with a
one-line reason, and the run goes on.

CPU: baseline causal ``F.scaled_dot_product_attention`` (the fused flash kernel); FoX native and blockwise; SDPA with
the FoX bias passed as a full float mask (the naive way to add the gate).  Inputs ``(B, H, T, D)`` contiguous.
"""
from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

torch.set_flush_denormal(True)  # before any parallel op: worker threads inherit it (see forgetting_attention.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_modules.layers.forgetting_attention import fla_available, forgetting_attention, gate_bias  # noqa
from scripts._report import (add_output_args, interleaved_times, short_error, sync, without_output_args,  # noqa
                             write_outputs)

CPU_BASELINE = "SDPA causal (no gate)"
CUDA_BASELINE = "SDPA FA2 causal (no gate)"
FOX_CUDA_PATHS = ("FoX fla", "FoX flex")
GOAL_SPEED = 0.9  # FoX fwd+bwd throughput >= 0.9x the baseline's ...
GOAL_HEAD_DIM = 128  # ... at D = 128 ...
GOAL_MIN_T = 4096  # ... and T >= 4k
MEMORY_SLACK = 1.5  # O(T): memory may grow at most 1.5x faster than T between the smallest and the largest T
CSV_HEADER = ["D", "T", "path", "ms", "time_vs_baseline", "tflops", "mem_mib", "error"]


def attention_flops(batch: int, heads: int, t: int, d: int, causal: bool = True, mode: str = "fwd_bwd") -> float:
    """FLOPs of attention at this shape, FlashAttention's convention (its ``benchmarks/``): the forward is two
    ``T x T x D`` matmuls, ``4 * B * H * T^2 * D``, halved when causal (the masked half is skipped); the backward
    is 2.5x the forward (five matmuls to the forward's two), so forward + backward is 3.5x the forward."""
    fwd = 4 * batch * heads * t * t * d / (2 if causal else 1)
    return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[mode]


def saved_bytes(fn) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return total


def forwards(q, k, v, log_f, device):
    """Name -> forward function of every path measured at this shape; the baseline first.  On CUDA ``q, k, v`` are
    ``(B, T, H, D)`` and ``log_f`` ``(B, T, H)`` (the model's layout, viewed head-first in each call); on CPU
    ``(B, H, T, D)`` and ``(B, H, T)``."""
    if not device.startswith("cuda"):
        return {
            CPU_BASELINE: lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            "FoX native (default)": lambda: forgetting_attention(q, k, v, log_f, backend="native"),
            "FoX blockwise (fallback)": lambda: forgetting_attention(q, k, v, log_f, backend="blockwise"),
            "SDPA + full float bias": lambda: F.scaled_dot_product_attention(
                q, k, v, attn_mask=gate_bias(log_f, q.shape[2]).to(q.dtype)),
        }

    def heads_first():
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def sdpa_fa2():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # FA2 or an error, never a silent fallback to another kernel
            return F.scaled_dot_product_attention(*heads_first(), is_causal=True)

    cases = {CUDA_BASELINE: sdpa_fa2,
             "FoX flex": lambda: forgetting_attention(*heads_first(), log_f.transpose(1, 2), backend="flex")}
    if fla_available():
        cases["FoX fla"] = lambda: forgetting_attention(*heads_first(), log_f.transpose(1, 2), backend="fla")
    if importlib.util.find_spec("flash_attn") is not None:  # FA2 takes no data-dependent bias: no-gate row
        from flash_attn import flash_attn_func

        cases["FA2 causal (no gate)"] = lambda: flash_attn_func(q, k, v, causal=True).transpose(1, 2)
    return cases


def fwd_bwd(fwd, grad, leaves):
    def run():
        for t in leaves:
            t.grad = None
        fwd().backward(grad)
    return run


def peak_extra_bytes(step, leaves) -> int:
    """CUDA: peak allocated during one ``step`` minus what was allocated before it (input gradients cleared first)."""
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def release(device: str) -> None:
    """After a failure: return the cached blocks (a failed out-of-memory call leaves them fragmented)."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def attempt(fn: Callable, device: str):
    """``(fn(), None)``, or ``(None, one-line error)`` if it raised -- then the CUDA cache is emptied, once the
    exception (and the frames and tensors it holds) is gone."""
    try:
        return fn(), None
    except Exception as err:  # noqa: BLE001 -- any failure of one path or shape must not end the run
        error = short_error(err)
    release(device)
    return None, error


def bench_shape(fwds: Dict[str, Callable], grad, leaves, reps: int, device: str) -> Dict[str, dict]:
    """Name -> ``{"ms", "mem" (MiB), "error"}`` of every path at one shape.  A path that fails is recorded with a
    one-line error (``ms`` None) and left out of the rest; the others are still timed."""
    cuda = device.startswith("cuda")
    out = {name: {"ms": None, "mem": None, "error": None} for name in fwds}
    steps = {}
    for name, fwd in fwds.items():  # alone first: compiles, and a failure is this path's only
        step = fwd_bwd(fwd, grad, leaves)
        _, out[name]["error"] = attempt(lambda: (step(), sync(device)), device)
        if out[name]["error"] is None:
            steps[name] = step
    times, error = attempt(lambda: interleaved_times(steps, reps, device) if steps else {}, device)
    if error is not None:  # rare: a path that ran alone failed in the round-robin
        for name in steps:
            out[name]["error"] = "in the timed repeats: " + error
        return out
    for name, step in steps.items():
        out[name]["ms"] = times[name] * 1e3
        mem, error = attempt(lambda: peak_extra_bytes(step, leaves) if cuda else saved_bytes(fwds[name]), device)
        if error is None:
            out[name]["mem"] = mem / 2**20
        else:
            out[name]["error"] = "memory measurement: " + error
    return out


def shape_rows(d: int, t: int, batch: int, heads: int, results: Dict[str, dict], baseline: str) -> List[dict]:
    """Table rows of one shape: ``D, T, path, ms, ratio`` (time / the baseline's), ``tflops``, ``mem``, ``error``."""
    base = results.get(baseline, {}).get("ms")
    flops = attention_flops(batch, heads, t, d)
    rows = []
    for name, r in results.items():
        ms = r["ms"]
        rows.append({"D": d, "T": t, "path": name, "ms": ms, "ratio": ms / base if ms and base else None,
                     "tflops": flops / (ms * 1e-3) / 1e12 if ms else None, "mem": r["mem"], "error": r["error"]})
    return rows


def _cells(rows: Sequence[dict], path: str, d: int) -> List[dict]:
    return sorted((r for r in rows if r["path"] == path and r["D"] == d), key=lambda r: r["T"])


def speed_goal(rows: Sequence[dict], path: str, baseline: str, d: int = GOAL_HEAD_DIM, min_t: int = GOAL_MIN_T,
               target: float = GOAL_SPEED) -> Tuple[Optional[bool], str]:
    """Is ``path``'s fwd+bwd throughput >= ``target`` x the baseline's at every ``T >= min_t`` of head dim ``d``?
    Throughput ratio = baseline ms / path ms, per T; the goal reads its minimum.  A failed FoX row fails the goal;
    a T where the baseline failed is left out (and named).  Returns ``(met, line)``, ``met`` None if nothing was
    measured."""
    name = f"Goal {path} fwd+bwd throughput >= {target:g}x {baseline} (D={d}, T >= {min_t})"
    base = {r["T"]: r["ms"] for r in _cells(rows, baseline, d)}
    ratios, failed, no_base = [], [], []
    for r in _cells(rows, path, d):
        if r["T"] < min_t:
            continue
        if r["ms"] is None:
            failed.append(f"T={r['T']}: {r['error']}")
        elif base.get(r["T"]) is None:
            no_base.append(r["T"])
        else:
            ratios.append((base[r["T"]] / r["ms"], r["T"]))
    notes = ([f"failed at {'; '.join(failed)}"] if failed else []) + (
        [f"baseline failed at T={', '.join(map(str, no_base))}"] if no_base else [])
    if ratios:
        worst, worst_t = min(ratios)
        notes.insert(0, f"min {worst:.2f}x at T={worst_t}; per T: " + ", ".join(f"{t} {x:.2f}x" for x, t in ratios))
    if not ratios and not failed:
        return None, f"{name}: not measured ({'; '.join(notes) or f'no {path} rows at these shapes'})."
    met = not failed and min(ratios)[0] >= target
    return met, f"{name}: {'met' if met else 'NOT met'} ({'; '.join(notes)})."


def memory_goal(rows: Sequence[dict], path: str, d: int = GOAL_HEAD_DIM,
                slack: float = MEMORY_SLACK) -> Tuple[Optional[bool], str]:
    """Does ``path``'s peak memory grow ~linearly in T over its rows of head dim ``d``: O(T) if
    ``mem(T_max) / mem(T_min) <= slack * T_max / T_min``?  A row without a memory figure (failed) fails the goal.
    Returns ``(met, line)``, ``met`` None if fewer than two lengths were measured."""
    name = f"Goal {path} peak memory O(T) (D={d})"
    cells = _cells(rows, path, d)
    ok = [r for r in cells if r["mem"] is not None and r["mem"] > 0]
    failed = [f"T={r['T']}: {r['error'] or 'no memory figure'}" for r in cells if r not in ok]
    if len(ok) < 2:
        why = f"failed at {'; '.join(failed)}" if failed else f"fewer than two lengths of {path}"
        return (False if failed else None), f"{name}: {'NOT met' if failed else 'not measured'} ({why})."
    lo, hi = ok[0], ok[-1]
    growth, t_ratio = hi["mem"] / lo["mem"], hi["T"] / lo["T"]
    met = not failed and growth <= slack * t_ratio
    text = (f"{lo['mem']:.1f} MiB at T={lo['T']} -> {hi['mem']:.1f} MiB at T={hi['T']}: x{growth:.2f} for "
            f"x{t_ratio:g} in T, O(T) bound x{slack * t_ratio:g}")
    if failed:
        text += f"; failed at {'; '.join(failed)}"
    return met, f"{name}: {'met' if met else 'NOT met'} ({text})."


def summary(rows: Sequence[dict], baseline: str = CUDA_BASELINE, paths: Sequence[str] = FOX_CUDA_PATHS) -> List[str]:
    """The goal lines: throughput vs the baseline, then memory, for each FoX path."""
    return ([speed_goal(rows, p, baseline)[1] for p in paths] + [memory_goal(rows, p)[1] for p in paths])


def csv_rows(rows: Sequence[dict]) -> List[list]:
    return [[r["D"], r["T"], r["path"], r["ms"], r["ratio"], r["tflops"], r["mem"], r["error"]] for r in rows]


def _fmt(x: Optional[float], spec: str) -> str:
    return "" if x is None else format(x, spec)


def measure(batch: int, heads: int, t: int, d: int, dtype, reps: int, device: str) -> Dict[str, dict]:
    """Random inputs of one shape (CUDA: the model's layout, see ``forwards``) and ``bench_shape`` of every path."""
    cuda = device.startswith("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    shape = (batch, t, heads, d) if cuda else (batch, heads, t, d)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=g).requires_grad_() for _ in range(3))
    log_f = F.logsigmoid(torch.randn(shape[:3], device=device, generator=g) + 2.0).requires_grad_()
    grad = torch.randn(batch, heads, t, d, device=device, dtype=dtype, generator=g)
    return bench_shape(forwards(q, k, v, log_f, device), grad, (q, k, v, log_f), reps, device)


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lengths", type=int, nargs="+", default=None)
    ap.add_argument("--head-dims", type=int, nargs="+", default=None)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--reps", type=int, default=None, help="timed repeats per path and shape (default 7, --quick 5)")
    ap.add_argument("--quick", action="store_true", help="D = 128 only and 5 repeats (unless given explicitly)")
    add_output_args(ap)
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    lengths = args.lengths or ([2048, 4096, 8192, 16384] if cuda else [256, 512, 1024, 2048, 4096])
    head_dims = args.head_dims or ([GOAL_HEAD_DIM] if args.quick else [64, 128] if cuda else [64])
    reps = args.reps or (5 if args.quick else 7)
    dtype = torch.bfloat16 if cuda else torch.float32
    baseline = CUDA_BASELINE if cuda else CPU_BASELINE
    if cuda:  # compiled FlexAttention recompiles per shape (dynamic=False): keep every shape compiled, not eager
        cfg = torch._dynamo.config
        limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        setattr(cfg, limit, max(getattr(cfg, limit), 4 * len(lengths) * len(head_dims)))
    rows = []
    for d in head_dims:
        for t in lengths:
            results, error = attempt(lambda: measure(args.batch, args.heads, t, d, dtype, reps, args.device),
                                     args.device)
            if error is not None:  # e.g. no memory for the inputs: the shape fails, the run goes on
                results = {"(all paths)": {"ms": None, "mem": None, "error": error}}
            for r in shape_rows(d, t, args.batch, args.heads, results, baseline):
                rows.append(r)
                if r["ms"] is None:
                    print(f"D={d} T={t:6d} {r['path']:26s} FAILED: {r['error']}", flush=True)
                else:
                    print(f"D={d} T={t:6d} {r['path']:26s} {r['ms']:9.2f} ms  x{_fmt(r['ratio'], '5.2f'):5s}  "
                          f"{r['tflops']:7.3g} TFLOP/s  {_fmt(r['mem'], '8.1f')} MiB", flush=True)
            del results
            release(args.device)
    device_name = (torch.cuda.get_device_name() if cuda
                   else f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads")
    mem_label = "peak extra memory (MiB)" if cuda else "saved for backward (MiB)"
    ratio_label = "× SDPA FA2 (time)" if cuda else "× causal SDPA"
    text = [f"### FoX attention, fwd+bwd, {args.device} ({device_name}), {str(dtype).replace('torch.', '')}, "
            f"B={args.batch}, H={args.heads}; torch {torch.__version__}",
            "", f"| D | T | path | ms | {ratio_label} | TFLOP/s | {mem_label} |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["ms"] is None:
            text.append(f"| {r['D']} | {r['T']} | {r['path']} | failed: {r['error']} | | | |")
        else:
            text.append(f"| {r['D']} | {r['T']} | {r['path']} | {r['ms']:.2f} | {_fmt(r['ratio'], '.2f')} | "
                        f"{r['tflops']:.3g} | {_fmt(r['mem'], '.1f')} |")
    text += ["", "TFLOP/s: causal attention fwd+bwd FLOPs (FlashAttention's count, 3.5 x 2 B H T^2 D) / time."]
    if cuda:
        goals = summary(rows, baseline)
        if not fla_available():
            goals.append("fla-core is not importable here: no FoX fla rows.")
        text += ["", *goals]
    shown = " ".join(["python scripts/bench_fox_attention.py", *without_output_args(argv)])
    text += ["", f"Reproduce: `{shown}`"]
    print("\n".join(text))
    header = [*CSV_HEADER[:6], "peak_extra_mib" if cuda else "saved_for_backward_mib", CSV_HEADER[7]]
    write_outputs(args, f"bench_fox_attention_{'cuda' if cuda else 'cpu'}", "\n".join(text), header, csv_rows(rows))
    return rows


if __name__ == "__main__":
    main()
