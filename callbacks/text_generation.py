"""Writes what ``predict`` generated into the run dir: ``completions.jsonl``, one JSON object per prompt
(``index, prompt, completion, tokens, seconds``), appended and flushed after every batch so an interrupted run keeps
what it finished.  Under DDP every rank writes its own file (``completions.rank<r>.jsonl`` beyond rank 0)."""
from __future__ import annotations

import json
import os
from typing import Optional

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from callbacks.run_files import run_dir

FIELDS = ("index", "prompt", "completion", "tokens", "seconds")


class CompletionWriter(BasePredictionWriter):
    def __init__(self, filename: str = "completions.jsonl", out_dir: Optional[str] = None):
        super().__init__(write_interval="batch")
        self.filename, self.out_dir, self.path = filename, out_dir, None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = self.out_dir or run_dir(trainer)
        os.makedirs(out, exist_ok=True)
        name = self.filename
        if trainer.global_rank > 0:
            stem, ext = os.path.splitext(name)
            name = f"{stem}.rank{trainer.global_rank}{ext}"
        self.path = os.path.join(out, name)
        open(self.path, "w").close()

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        if not isinstance(prediction, list) or not all(isinstance(r, dict) for r in prediction):
            return  # not a generation record (another module's predictions)
        with open(self.path, "a", encoding="utf-8") as fh:
            for record in prediction:
                fh.write(json.dumps({k: record[k] for k in FIELDS if k in record}, ensure_ascii=False) + "\n")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and self.path:
            print(f"completions written to {self.path}")
