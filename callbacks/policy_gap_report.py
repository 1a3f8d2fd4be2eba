"""The convergence plot of an exact (tabular) policy-optimisation run, saved in the run folder at the end of the fit
(rank 0): ``gap.csv`` (iteration, J, J* - J, step size) and ``gap.png`` (log10 of the gap against iterations, the
plot of the SPMA paper's tabular experiments).  The rows are checkpointed, so a resumed run's report is whole."""
from __future__ import annotations

import os
from typing import Dict, List

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from callbacks.run_files import report_dir, save_figure, write_rows


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
        out = report_dir(trainer)
        if out is None or not self.rows:
            return
        write_rows(os.path.join(out, "gap.csv"), self.rows)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        hp = pl_module.hparams
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        ax.semilogy([r["iteration"] for r in self.rows], [max(r["gap"], 1e-300) for r in self.rows])
        ax.set_xlabel("iteration t")
        ax.set_ylabel("J* - J(pi_t)")
        ax.set_title(f"{hp.method}, eta={hp.eta}", fontsize=9)
        save_figure(fig, os.path.join(out, "gap.png"))
