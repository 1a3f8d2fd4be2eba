"""Training-step time with the SOM callback (CB, AB) vs SOM off, same model, one process, inside a real
``Trainer.fit`` (so the callback's hooks, its per-step ``self.log`` calls and a CSV logger are all counted).

    python scripts/bench_cbsom.py [--device cpu|cuda] [--reps 5] [--steps 12] [--presets tiny resnet18]
    python scripts/bench_cbsom.py --write [--doc PATH] [--csv PATH]   # update a markdown section / CSV rows

A step is timed from ``on_train_batch_start`` (first callback) to ``on_train_batch_end`` (last callback): forward,
cross-entropy, backward, SGD step and, with the callback, the SOM step (BMU choice and the in-place update on every
conv) and its logging.  Batches are random 32x32 RGB images, batch 64, for the tiny preset and the ResNet-18 widths
(64, 144, 256, 529).  The three configurations run round-robin, ``--reps`` fits of ``--steps`` steps each (the first
two steps of each fit are dropped; the order rotates from fit to fit); the table gives medians over all timed steps.
Target: overhead <= 10%.  On a GPU the wall time is mostly ``Trainer`` start-up: 3 x ``--reps`` fits per preset.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

torch.set_flush_denormal(True)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402

from callbacks.self_organizing_map import SelfOrganizingMap  # noqa: E402
from lightning_modules.topographic_resnet import TopographicClassifier  # noqa: E402
from scripts._report import add_output_args, sync, write_outputs  # noqa: E402

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")


class _Start(L.Callback):
    def __init__(self, device):
        self.device, self.t0, self.times = device, 0.0, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        sync(self.device)
        self.t0 = time.perf_counter()


class _End(L.Callback):
    def __init__(self, start: _Start):
        self.start = start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sync(self.start.device)
        self.start.times.append(time.perf_counter() - self.start.t0)


def timed_fit(preset: str, mode: str, steps: int, batch: int, device: str, log_dir: str) -> list:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(steps * batch, 3, 32, 32), torch.randint(0, 10, (steps * batch,)))
    model = TopographicClassifier(num_classes=10, in_channels=3, preset=preset, stem="small", lr=0.01)
    start = _Start(device)
    som = [SelfOrganizingMap(mode=mode, alpha0=0.01, seed=0)] if mode != "off" else []
    trainer = L.Trainer(accelerator=device, devices=1, max_steps=steps, callbacks=[start, *som, _End(start)],
                        logger=L.pytorch.loggers.CSVLogger(log_dir, name=f"{preset}_{mode}"), log_every_n_steps=10,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, DataLoader(data, batch_size=batch))
    return start.times[2:]


CSV_HEADER = ["preset", "off_ms", "cb_ms", "cb_over_off", "ab_ms", "ab_over_off"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--presets", nargs="+", default=["tiny", "resnet18"])
    add_output_args(ap)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as log_dir:
        for preset in args.presets:
            times = {mode: [] for mode in ("off", "cb", "ab")}
            modes = list(times)
            for rep in range(args.reps):
                for mode in modes[rep % 3:] + modes[:rep % 3]:  # rotate the order: no mode always runs first
                    times[mode] += timed_fit(preset, mode, args.steps, args.batch, args.device, log_dir)
            t = {mode: statistics.median(v) for mode, v in times.items()}
            rows.append((preset, t["off"], t["cb"], t["ab"]))
            print(f"{preset}: off {t['off'] * 1e3:.1f} ms, CB {t['cb'] * 1e3:.1f} ms (x{t['cb'] / t['off']:.3f}), "
                  f"AB {t['ab'] * 1e3:.1f} ms (x{t['ab'] / t['off']:.3f})", flush=True)
    where = (f"CPU ({torch.get_num_threads()} threads)" if args.device == "cpu"
             else torch.cuda.get_device_name() if args.device == "cuda" else args.device)
    text = [f"### CB-SOM step overhead in `Trainer.fit`, {where}, batch {args.batch}, 32x32 RGB; "
            f"torch {torch.__version__}, Lightning {L.__version__}", "",
            "| widths | SOM off ms/step | CB-SOM ms/step | × off | AB-SOM ms/step | × off |",
            "|---|---|---|---|---|---|"]
    text += [f"| {p} | {o * 1e3:.1f} | {c * 1e3:.1f} | {c / o:.3f} | {a * 1e3:.1f} | {a / o:.3f} |"
             for p, o, c, a in rows]
    text += ["", f"Medians over {args.reps} interleaved fits x {args.steps - 2} timed steps. Reproduce: "
                 f"`python scripts/bench_cbsom.py --device {args.device}`"]
    print("\n".join(text))
    csv_rows = [[p, o * 1e3, c * 1e3, c / o, a * 1e3, a / o] for p, o, c, a in rows]
    write_outputs(args, f"bench_cbsom_{args.device}", "\n".join(text), CSV_HEADER, csv_rows)
    return rows


if __name__ == "__main__":
    main()
