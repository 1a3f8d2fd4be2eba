"""Forward+backward time and memory of each FoX attention backend vs plain causal SDPA at the same shape.

    python scripts/bench_fox_attention.py                       # CPU: T = 256..4096, fp32, B=2 H=4 D=64
    python scripts/bench_fox_attention.py --device cuda         # GPU: T = 1k..16k, bf16, D = 64 and 128
    python scripts/bench_fox_attention.py --write               # also update docs/performance.md

Ratios are measured side by side in one process (interleaved repeats, medians).  Memory: on CUDA the peak
allocated during fwd+bwd minus the inputs; on CPU the bytes autograd saves for the backward (what grows with T).
Baselines: causal ``F.scaled_dot_product_attention`` (FlashAttention kernel on CUDA, the fused flash kernel on
CPU); on CPU, SDPA with the FoX bias passed as a full float mask (the naive way to add the gate); on CUDA, FA2's
``flash_attn_func`` (no gate: it takes no data-dependent bias) when flash-attn is installed.
"""
from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

torch.set_flush_denormal(True)  # before any parallel op: worker threads inherit it (see forgetting_attention.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_modules.layers.forgetting_attention import fla_available, forgetting_attention, gate_bias  # noqa
from scripts._report import interleaved_times, update_section  # noqa: E402


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
    """Name -> forward function of every path measured at this shape."""
    cases = {"SDPA causal (no gate)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    if device == "cpu":
        cases["FoX native (default)"] = lambda: forgetting_attention(q, k, v, log_f, backend="native")
        cases["FoX blockwise (fallback)"] = lambda: forgetting_attention(q, k, v, log_f, backend="blockwise")
        cases["SDPA + full float bias"] = lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=gate_bias(log_f, q.shape[2]).to(q.dtype))
    else:
        cases["FoX flex"] = lambda: forgetting_attention(q, k, v, log_f, backend="flex")
        if fla_available():
            cases["FoX fla"] = lambda: forgetting_attention(q, k, v, log_f, backend="fla")
        if importlib.util.find_spec("flash_attn") is not None:  # FA2 takes no data-dependent bias: no-gate baseline
            from flash_attn import flash_attn_func

            cases["FA2 causal (no gate)"] = lambda: flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)
    return cases


def fwd_bwd(fwd, grad, leaves):
    def run():
        for t in leaves:
            t.grad = None
        fwd().backward(grad)
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lengths", type=int, nargs="+", default=None)
    ap.add_argument("--head-dims", type=int, nargs="+", default=None)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--write", action="store_true", help="update docs/performance.md")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    lengths = args.lengths or ([1024, 2048, 4096, 8192, 16384] if cuda else [256, 512, 1024, 2048, 4096])
    head_dims = args.head_dims or ([64, 128] if cuda else [64])
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = []
    for d in head_dims:
        for t in lengths:
            g = torch.Generator(device=args.device).manual_seed(0)
            shape = (args.batch, args.heads, t, d)
            q, k, v = (torch.randn(shape, device=args.device, dtype=dtype, generator=g).requires_grad_()
                       for _ in range(3))
            log_f = F.logsigmoid(torch.randn(shape[:3], device=args.device, generator=g) + 2.0).requires_grad_()
            grad = torch.randn(shape, device=args.device, dtype=dtype, generator=g)
            fwds = forwards(q, k, v, log_f, args.device)
            steps = {name: fwd_bwd(fwd, grad, (q, k, v, log_f)) for name, fwd in fwds.items()}
            times = interleaved_times(steps, args.reps, args.device)
            base = times["SDPA causal (no gate)"]
            for name, fwd in fwds.items():
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                    steps[name]()
                    mem = torch.cuda.max_memory_allocated() - before
                else:
                    mem = saved_bytes(fwd)
                rows.append((d, t, name, times[name] * 1e3, times[name] / base, mem / 2**20))
                print(f"D={d} T={t:6d} {name:26s} {times[name] * 1e3:9.2f} ms  x{times[name] / base:5.2f}  "
                      f"{mem / 2**20:8.1f} MiB", flush=True)
    device_name = torch.cuda.get_device_name() if cuda else f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
    mem_label = "peak extra memory (MiB)" if cuda else "saved for backward (MiB)"
    text = [f"### FoX attention, fwd+bwd, {args.device} ({device_name}), {str(dtype).replace('torch.', '')}, "
            f"B={args.batch}, H={args.heads}; torch {torch.__version__}",
            "", f"| D | T | path | ms | × causal SDPA | {mem_label} |", "|---|---|---|---|---|---|"]
    text += [f"| {d} | {t} | {name} | {ms:.2f} | {ratio:.2f} | {mem:.1f} |" for d, t, name, ms, ratio, mem in rows]
    text += ["", f"Reproduce: `python scripts/bench_fox_attention.py --device {args.device}`"]
    print("\n".join(text))
    if args.write:
        update_section(f"bench_fox_attention_{'cuda' if cuda else 'cpu'}", "\n".join(text))


if __name__ == "__main__":
    main()
