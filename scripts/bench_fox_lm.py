"""Training-step throughput of the FoX LM vs the same model with the forget gate off (NoPE), one process.

    python scripts/bench_fox_lm.py [--device cuda] [--write]

A step is forward + cross-entropy + backward + AdamW, on random tokens; configurations are timed round-robin
(interleaved repeats, medians) and reported as tokens/s and the ratio FoX / gates-off (target >= 0.9).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

torch.set_flush_denormal(True)  # before any parallel op (see forgetting_attention.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_modules.fox_model import FoXConfig, FoXTransformer  # noqa: E402
from scripts._report import interleaved_times, update_section  # noqa: E402

CPU_SHAPES = [  # (d_model, layers, heads, T, batch)
    (128, 4, 4, 128, 16),  # the recipe's tiny config
    (128, 4, 4, 512, 4),
    (256, 4, 4, 1024, 2),
]
GPU_SHAPES = [(768, 12, 12, 2048, 8), (768, 12, 12, 8192, 2)]


def make_step(fgate: str, d: int, layers: int, heads: int, t: int, b: int, device: str, block: str):
    torch.manual_seed(0)
    cfg = FoXConfig(vocab_size=256, d_model=d, n_layers=layers, n_heads=heads, fgate=fgate, block=block)
    model = FoXTransformer(cfg).to(device)
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-4)
    x = torch.randint(0, 256, (b, t + 1), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))

    def step():
        with autocast:
            logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--block", default="llama", choices=["llama", "pro"])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    shapes = GPU_SHAPES if args.device.startswith("cuda") else CPU_SHAPES
    rows = []
    for d, layers, heads, t, b in shapes:
        steps = {g: make_step(g, d, layers, heads, t, b, args.device, args.block) for g in ("full", "none")}
        times = interleaved_times(steps, args.reps, args.device)
        tps = {g: b * t / s for g, s in times.items()}
        rows.append((d, layers, heads, t, b, tps["full"], tps["none"], tps["full"] / tps["none"]))
        print(f"d={d} L={layers} H={heads} T={t} B={b}: FoX {tps['full']:.0f} tok/s, gates off "
              f"{tps['none']:.0f} tok/s, ratio {tps['full'] / tps['none']:.3f}", flush=True)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    text = [f"### FoX LM training step ({args.block} block), {args.device} ({name}); torch {torch.__version__}", "",
            "| d_model | layers | heads | T | batch | FoX tok/s | gates off tok/s | FoX / gates off |",
            "|---|---|---|---|---|---|---|---|"]
    text += [f"| {d} | {l} | {h} | {t} | {b} | {f:.0f} | {n:.0f} | {r:.3f} |" for d, l, h, t, b, f, n, r in rows]
    text += ["", f"Reproduce: `python scripts/bench_fox_lm.py --device {args.device} --block {args.block}`"]
    print("\n".join(text))
    if args.write:
        update_section(f"bench_fox_lm_{args.block}_{'cuda' if args.device.startswith('cuda') else 'cpu'}",
                       "\n".join(text))


if __name__ == "__main__":
    main()
