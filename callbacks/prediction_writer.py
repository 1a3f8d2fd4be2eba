"""Writes what ``predict`` returns (a list of dict records per batch) into the run dir, appended and flushed after
every batch so an interrupted run keeps what it finished: ``.csv`` (header from the first record) or ``.jsonl``.
Under DDP every rank writes its own file (``<name>.rank<r>.<ext>`` beyond rank 0)."""
from __future__ import annotations

import csv
import json
import os
from typing import Optional, Sequence

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from callbacks.run_files import run_dir


class PredictionWriter(BasePredictionWriter):
    def __init__(self, filename: str = "predictions.csv", out_dir: Optional[str] = None,
                 fields: Optional[Sequence[str]] = None):
        super().__init__(write_interval="batch")
        if not filename.endswith((".csv", ".jsonl")):
            raise ValueError(f"PredictionWriter filename={filename!r}; expected a .csv or .jsonl name")
        self.filename, self.out_dir, self.fields, self.path = filename, out_dir, fields, None
        self._header: Optional[list] = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = self.out_dir or run_dir(trainer)
        os.makedirs(out, exist_ok=True)
        name = self.filename
        if trainer.global_rank > 0:
            stem, ext = os.path.splitext(name)
            name = f"{stem}.rank{trainer.global_rank}{ext}"
        self.path, self._header = os.path.join(out, name), None
        open(self.path, "w").close()

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        if not isinstance(prediction, list) or not all(isinstance(r, dict) for r in prediction) or not prediction:
            return
        rows = [{k: r[k] for k in (self.fields or r) if k in r} for r in prediction]
        with open(self.path, "a", encoding="utf-8", newline="") as fh:
            if self.filename.endswith(".jsonl"):
                fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
                return
            if self._header is None:
                self._header = list(rows[0])
                csv.writer(fh).writerow(self._header)
            csv.DictWriter(fh, self._header, extrasaction="ignore").writerows(rows)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and self.path:
            print(f"predictions written to {self.path}")
