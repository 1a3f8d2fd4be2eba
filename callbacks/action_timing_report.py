"""The wall-clock timing of a realtime run with asynchronous inference workers (Riemer et al., ICLR 2025): every
action the workers published and when.  At the end of ``fit`` (rank 0) it writes to the run dir

* ``publications.csv``: one row per published action (seconds since the first, worker, inference seconds, the frame
  whose observation it acted on, gap to the previous publication);
* ``action_timing.png``: the gaps between consecutive actions against the schedule's target ``t_max / N_I`` (the
  paper's claim: staggered workers act every ``t_max / N_I`` seconds whatever the inference time) and each worker's
  publication times.

It reads ``trainer.datamodule.publications()`` (``WallClockRealtimeDataModule``); other data modules have none and
nothing is written.
"""
from __future__ import annotations

import csv
import os

import lightning as L
import numpy as np

from callbacks.run_files import run_dir


class ActionTimingReport(L.Callback):
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not hasattr(trainer.datamodule, "publications"):
            return
        pubs, target = trainer.datamodule.publications()
        if pubs is None or len(pubs) < 2:
            return
        out = run_dir(trainer)
        os.makedirs(out, exist_ok=True)
        t = pubs[:, 0] - pubs[0, 0]
        gaps = np.diff(t, prepend=np.nan)
        with open(os.path.join(out, "publications.csv"), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["time_s", "worker", "inference_s", "obs_frame", "gap_s"])
            for row, ti, g in zip(pubs, t, gaps):
                w.writerow([f"{ti:.6f}", int(row[1]), f"{row[3]:.6f}", int(row[4]), "" if np.isnan(g) else f"{g:.6f}"])
        self._plot(out, t, pubs[:, 1].astype(int), gaps[1:], target)

    @staticmethod
    def _plot(out: str, t: np.ndarray, workers: np.ndarray, gaps: np.ndarray, target: float) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
        a.hist(gaps * 1e3, bins=60, color="tab:blue", alpha=0.8)
        a.axvline(target * 1e3, color="tab:red", ls="--", label=f"t_max / N_I = {target * 1e3:.1f} ms")
        a.axvline(np.mean(gaps) * 1e3, color="k", ls=":", label=f"mean {np.mean(gaps) * 1e3:.1f} ms")
        a.set_xlabel("gap between consecutive actions (ms)")
        a.set_ylabel("count")
        a.legend(fontsize=8)
        last = t <= min(t[-1], t[0] + 40 * target * max(1, workers.max() + 1))
        b.scatter(t[last], workers[last], s=6)
        b.set_xlabel("seconds")
        b.set_ylabel("worker")
        b.set_title("publications (first cycles)", fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "action_timing.png"), dpi=120)
        plt.close(fig)
