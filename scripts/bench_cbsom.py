"""Training-step time with the SOM callback (CB, AB) vs SOM off, same model, one process.

    python scripts/bench_cbsom.py [--write]

A step = forward + cross-entropy + backward + SGD step + (the SOM step: BMU choice and the in-place update on every
conv), on random 32x32 RGB batches of 64, for the tiny preset and the ResNet-18 widths (64, 144, 256, 529).  The SOM
work is driven through the callback's own hooks exactly as Lightning calls them; configurations are timed
round-robin (interleaved, medians).  Target: overhead <= 10%.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

torch.set_flush_denormal(True)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks.self_organizing_map import SelfOrganizingMap  # noqa: E402
from lightning_modules.topographic_resnet import PRESETS, TopographicResNet  # noqa: E402
from scripts._report import interleaved_times, update_section  # noqa: E402


class _Trainer:  # the two attributes the callback reads at a step
    world_size, global_step, estimated_stepping_batches = 1, 0, 10_000


class _Module(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.model = net

    def log(self, *args, **kwargs):  # the callback logs diagnostics through the LightningModule
        pass


def make_step(preset: str, mode: str, batch: int, stem: str):
    torch.manual_seed(0)
    net = TopographicResNet(10, 3, stem=stem, **PRESETS[preset])
    module = _Module(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    som = SelfOrganizingMap(mode=mode, alpha0=0.01) if mode != "off" else None
    trainer = _Trainer()
    if som is not None:
        som.on_fit_start(trainer, module)

    def step():
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if som is not None:
            som.on_before_optimizer_step(trainer, module, opt)
        opt.step()
        trainer.global_step += 1
        if som is not None:
            som.on_train_batch_end(trainer, module, None, None, 0)

    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    rows = []
    for preset, stem in (("tiny", "small"), ("resnet18", "small")):
        steps = {mode: make_step(preset, mode, args.batch, stem) for mode in ("off", "cb", "ab")}
        t = interleaved_times(steps, args.reps)
        rows.append((preset, t["off"], t["cb"], t["ab"]))
        print(f"{preset}: off {t['off'] * 1e3:.1f} ms, CB {t['cb'] * 1e3:.1f} ms (x{t['cb'] / t['off']:.3f}), "
              f"AB {t['ab'] * 1e3:.1f} ms (x{t['ab'] / t['off']:.3f})", flush=True)
    text = [f"### CB-SOM step overhead, CPU ({torch.get_num_threads()} threads), batch {args.batch}, 32x32 RGB; "
            f"torch {torch.__version__}", "",
            "| widths | SOM off ms/step | CB-SOM ms/step | × off | AB-SOM ms/step | × off |", "|---|---|---|---|---|---|"]
    text += [f"| {p} | {o * 1e3:.1f} | {c * 1e3:.1f} | {c / o:.3f} | {a * 1e3:.1f} | {a / o:.3f} |"
             for p, o, c, a in rows]
    text += ["", "Reproduce: `python scripts/bench_cbsom.py`"]
    print("\n".join(text))
    if args.write:
        update_section("bench_cbsom_cpu", "\n".join(text))


if __name__ == "__main__":
    main()
