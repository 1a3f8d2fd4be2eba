"""The convergence plot of an exact (tabular) policy-optimisation run, saved in the run folder at the end of the fit
(rank 0): ``gap.csv`` (iteration, J, J* - J, step size) and ``gap.png`` (log10 of the gap against iterations, the
plot of the SPMA paper's tabular experiments).  The rows are checkpointed, so a resumed run's report is whole."""
from __future__ import annotations

import csv
import os
from typing import Dict, List

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from callbacks.run_files import run_dir


class PolicyGapReport(L.Callback):
    def __init__(self):
        self.rows: List[Dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        last = getattr(pl_module, "last", None)
        if last is not None:
            self.rows.append(dict(last))

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        self.rows = list(state["rows"])

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run or not self.rows:
            return
        out = run_dir(trainer)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "gap.csv"), "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(self.rows[0]))
            w.writeheader()
            w.writerows(self.rows)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        hp = pl_module.hparams
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        ax.semilogy([r["iteration"] for r in self.rows], [max(r["gap"], 1e-300) for r in self.rows])
        ax.set_xlabel("iteration t")
        ax.set_ylabel("J* - J(pi_t)")
        ax.set_title(f"{hp.method}, eta={hp.eta}", fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "gap.png"), dpi=120)
        plt.close(fig)
