"""Where a run's reports go, and what they read, without collectives: report callbacks run on rank 0 only, so they
must not call anything that waits for the other ranks (``Trainer.log_dir`` broadcasts; a DDP datamodule's
evaluation loader holds only this rank's shard)."""
from __future__ import annotations

import csv
import os
from typing import Dict, List, Optional

import lightning as L
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader


def run_dir(trainer: L.Trainer) -> str:
    """The folder for a run's config, plots and CSVs, computed locally (``trainer.log_dir`` broadcasts): the first
    logger's version folder for CSV / TensorBoard loggers, else ``default_root_dir`` (a W&B logger's ``save_dir`` is
    shared by all runs; its own copy of the plots goes to W&B)."""
    if trainer.loggers:
        logger = trainer.loggers[0]
        if isinstance(logger, (CSVLogger, TensorBoardLogger)) and logger.log_dir:
            return logger.log_dir
    return trainer.default_root_dir


def whole(loader: DataLoader) -> DataLoader:
    """The same dataset and batch size in order, every sample once (not this rank's shard)."""
    return DataLoader(loader.dataset, batch_size=loader.batch_size or 256, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn)


def report_dir(trainer: L.Trainer) -> Optional[str]:
    """``run_dir``, created, for a report written at the end of a run; ``None`` under ``fast_dev_run`` (no report)."""
    if trainer.fast_dev_run:
        return None
    out = run_dir(trainer)
    os.makedirs(out, exist_ok=True)
    return out


def save_figure(fig, path: str, dpi: int = 120) -> None:
    """Lay out, write and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def write_rows(path: str, rows: List[Dict[str, object]]) -> None:
    """Dict rows as a CSV, the union of their keys as the header, numbers at full precision."""
    fields: List[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
