"""Training-step throughput and MFU of the FoX LM vs the same model with the forget gate off (NoPE), one process.

    python scripts/bench_fox_lm.py                      # CPU: small shapes (d 128-256, 4 layers), llama block
    python scripts/bench_fox_lm.py --device cuda        # GPU: the paper's 125M model (Pro block), T = 2048 and 8192
    python scripts/bench_fox_lm.py --device cuda --backend flex --peak-tflops 989.4
    python scripts/bench_fox_lm.py --write [--doc PATH] [--csv PATH]   # update a markdown section / CSV rows

A step is forward + cross-entropy + backward + AdamW, on random tokens (bf16 autocast on CUDA, fp32 on CPU);
the two configurations of a shape are timed round-robin (interleaved repeats, medians) and reported as tokens/s,
the ratio FoX / gates-off (goal >= 0.9, a goal line per shape) and MFU.

CUDA shapes: the 125M model of ``recipes/fox_125m.yaml`` (d_model 768, 12 layers, 12 heads of 64, GPT-2 vocabulary
50257, Pro block by default; ``--block llama`` for the other) at T = 2048, batch 8 and T = 8192, batch 2 (16,384
tokens per step each); no activation checkpointing, one GPU.  The FoX attention backend is what ``auto`` picks
(``fla`` when fla-core is importable, else ``flex``; the title names it); ``--backend`` forces one.  The gates-off
model runs causal SDPA whatever the backend.

MFU = model FLOPs per token x tokens/s / the device's peak dense bf16 FLOP/s.  Model FLOPs per token
(``flops_per_token``): the PaLM / nanoGPT estimate ``6 N + 12 L H Dh T`` with the attention term halved for causal
attention (FlashAttention's convention, as in ``bench_fox_attention.py``: the masked half is not computed), i.e.
``6 N + 6 L d_model T``; ``N`` counts every parameter that takes part in a matmul: all but the input embedding (a
lookup), the untied output head included; each model is counted with its own ``N`` (the gate projection adds
12 x 769 per layer).  Peak: ``--peak-tflops``, else a small table by device name (``peak_bf16_tflops``: H100 SXM /
H200 989.4, A100 312, L40S 362; PCIe / NVL variants and other devices unknown); unknown devices (and CPU) leave the
MFU columns empty.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

torch.set_flush_denormal(True)  # before any parallel op (see forgetting_attention.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_modules.fox_model import FoXConfig, FoXTransformer  # noqa: E402
from lightning_modules.layers.forgetting_attention import BACKENDS, choose_backend, fla_available  # noqa: E402
from scripts._report import add_output_args, interleaved_times, short_error, write_outputs  # noqa: E402

CPU_SHAPES = [  # (d_model, layers, heads, T, batch, vocab)
    (128, 4, 4, 128, 16, 256),  # the recipe's tiny config
    (128, 4, 4, 512, 4, 256),
    (256, 4, 4, 1024, 2, 256),
]
GPU_SHAPES = [(768, 12, 12, 2048, 8, 50257), (768, 12, 12, 8192, 2, 50257)]  # recipes/fox_125m.yaml
GOAL_RATIO = 0.9  # FoX step throughput >= 0.9x the gates-off model's
PEAK_BF16_TFLOPS = [  # (substring of torch.cuda.get_device_name(), dense bf16 TFLOP/s); first match wins
    ("H100 PCIe", None), ("H100 NVL", None), ("H200 NVL", None),  # lower clocks / power: not the SXM figure
    ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.0),
]
CSV_HEADER = ["d_model", "layers", "heads", "T", "batch", "vocab", "fox_tok_s", "nogate_tok_s", "fox_over_nogate",
              "fox_mfu", "nogate_mfu", "error"]


def peak_bf16_tflops(device_name: str) -> Optional[float]:
    """Dense bf16 tensor-core peak of a GPU by its name (``PEAK_BF16_TFLOPS``), None if unknown."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def flops_per_token(n_params: int, n_layers: int, d_model: int, seq_len: int, causal: bool = True) -> float:
    """Training FLOPs per token (forward + backward): ``6 N`` for the matmuls with the weights plus the attention
    scores and their weighted sum, ``12 L H Dh T`` (PaLM, appendix B; nanoGPT's ``estimate_mfu``; ``H Dh = d_model``),
    halved when ``causal`` (the masked half is skipped, FlashAttention's count)."""
    attention = 12 * n_layers * d_model * seq_len
    return 6 * n_params + (attention / 2 if causal else attention)


def matmul_params(model: FoXTransformer) -> int:
    """``N`` of ``flops_per_token``: every parameter but the input embedding (a table lookup, no FLOPs)."""
    return sum(p.numel() for p in model.parameters()) - model.embed.weight.numel()


def mfu(tokens_per_s: float, flops_token: float, peak_tflops: Optional[float]) -> Optional[float]:
    """Model FLOP utilisation: achieved model FLOP/s over the peak (None without a peak)."""
    if not peak_tflops:
        return None
    return tokens_per_s * flops_token / (peak_tflops * 1e12)


def goal_line(row: dict, target: float = GOAL_RATIO) -> Tuple[Optional[bool], str]:
    """``(met, line)`` of the goal FoX / gates off >= ``target`` at one shape; a failed shape is not met."""
    where = f"d_model {row['d_model']}, T={row['T']}, batch {row['batch']}"
    if row.get("error"):
        return False, f"Goal FoX / gates off >= {target:g} at {where}: NOT met (failed: {row['error']})."
    met = row["ratio"] >= target
    return met, f"Goal FoX / gates off >= {target:g} at {where}: {'met' if met else 'NOT met'} ({row['ratio']:.3f})."


def make_step(fgate: str, d: int, layers: int, heads: int, t: int, b: int, vocab: int, device: str, block: str,
              backend: str = "auto"):
    """One training step of a fresh model; returns ``(step, N of flops_per_token)``."""
    torch.manual_seed(0)
    cfg = FoXConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, fgate=fgate, block=block,
                    attn_backend=backend)
    model = FoXTransformer(cfg).to(device)
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-4)
    x = torch.randint(0, vocab, (b, t + 1), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))

    def step():
        with autocast:
            logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, matmul_params(model)


def bench_shape(shape, args, peak: Optional[float]) -> dict:
    """Tokens/s, ratio and MFU of FoX and gates off at one shape (``error`` set, numbers None, if it failed)."""
    d, layers, heads, t, b, vocab = shape
    row = dict(zip(CSV_HEADER[:6], shape), fox=None, nogate=None, ratio=None, fox_mfu=None, nogate_mfu=None,
               error=None)
    try:
        built = {g: make_step(g, d, layers, heads, t, b, vocab, args.device, args.block, args.backend)
                 for g in ("full", "none")}
        times = interleaved_times({g: s for g, (s, _) in built.items()}, args.reps, args.device)
    except Exception as err:  # noqa: BLE001 -- e.g. out of memory: the shape fails, the run goes on
        row["error"] = short_error(err)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        return row
    tps = {g: b * t / s for g, s in times.items()}
    row.update(fox=tps["full"], nogate=tps["none"], ratio=tps["full"] / tps["none"])
    row["fox_mfu"] = mfu(tps["full"], flops_per_token(built["full"][1], layers, d, t), peak)
    row["nogate_mfu"] = mfu(tps["none"], flops_per_token(built["none"][1], layers, d, t), peak)
    return row


def _pct(x: Optional[float]) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--block", default=None, choices=["llama", "pro"],
                    help="default: pro on CUDA (the 125M recipe's), llama on CPU")
    ap.add_argument("--backend", default="auto", choices=BACKENDS,
                    help="FoX attention backend (FoXConfig.attn_backend; default auto)")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak dense bf16 TFLOP/s for MFU (default: by GPU name; none on CPU)")
    add_output_args(ap)
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.block = args.block or ("pro" if cuda else "llama")
    shapes = GPU_SHAPES if cuda else CPU_SHAPES
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    peak = args.peak_tflops if args.peak_tflops is not None else peak_bf16_tflops(name) if cuda else None
    backend = args.backend
    if cuda and backend == "auto":  # what auto runs for a training call (Tq == Tk, bf16 under autocast)
        backend = "auto: " + choose_backend("auto", device_type="cuda", dtype=torch.bfloat16, tq=2, tk=2,
                                            fla=fla_available(), native=False)
    rows = []
    for shape in shapes:
        row = bench_shape(shape, args, peak)
        rows.append(row)
        d, layers, heads, t, b, _ = shape
        if row["error"]:
            print(f"d={d} L={layers} H={heads} T={t} B={b}: FAILED: {row['error']}", flush=True)
        else:
            print(f"d={d} L={layers} H={heads} T={t} B={b}: FoX {row['fox']:.0f} tok/s, gates off "
                  f"{row['nogate']:.0f} tok/s, ratio {row['ratio']:.3f}, MFU {_pct(row['fox_mfu']) or '-'} / "
                  f"{_pct(row['nogate_mfu']) or '-'}", flush=True)
    text = [f"### FoX LM training step ({args.block} block), {args.device} ({name}); FoX attention backend "
            f"{backend}; torch {torch.__version__}", "",
            "| d_model | layers | heads | T | batch | vocab | FoX tok/s | gates off tok/s | FoX / gates off | "
            "FoX MFU | gates off MFU |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['d_model']} | {r['layers']} | {r['heads']} | {r['T']} | {r['batch']} | {r['vocab']} |"
        text.append(f"{head} failed: {r['error']} | | | | |" if r["error"] else
                    f"{head} {r['fox']:.0f} | {r['nogate']:.0f} | {r['ratio']:.3f} | {_pct(r['fox_mfu'])} | "
                    f"{_pct(r['nogate_mfu'])} |")
    text += ["", "MFU: (6 N + 6 L d_model T) FLOPs per token x tokens/s / peak dense bf16 FLOP/s "
                 + (f"({peak:g} TFLOP/s)" if peak else "(peak unknown here: not computed)")
             + "; N = parameters other than the input embedding.", "",
             *(goal_line(r)[1] for r in rows)]
    shown = f"python scripts/bench_fox_lm.py --device {args.device} --block {args.block}"
    for flag, value in (("--backend", args.backend), ("--reps", args.reps), ("--peak-tflops", args.peak_tflops)):
        if value != ap.get_default(flag[2:].replace("-", "_")):
            shown += f" {flag} {value}"
    text += ["", f"Reproduce: `{shown}`"]
    print("\n".join(text))
    section = f"bench_fox_lm_{args.block}_{'cuda' if cuda else 'cpu'}" + (
        "" if args.backend == "auto" else f"_{args.backend}")
    csv_rows = [[r[k] for k in CSV_HEADER[:6]] + [r["fox"], r["nogate"], r["ratio"], r["fox_mfu"], r["nogate_mfu"],
                                                  r["error"]] for r in rows]
    write_outputs(args, section, "\n".join(text), CSV_HEADER, csv_rows)
    return rows


if __name__ == "__main__":
    main()
