"""Sends the plots a recipe writes in its run folder (FoX per-position loss and gates, SOM maps, FL loss histograms
and CDFs, ...) to W&B as images.  Added by ``python -m recipes`` whenever a ``WandbLogger`` is configured."""
from __future__ import annotations

import os
from typing import Dict

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from callbacks.run_files import run_dir


class LogPlotsToWandb(L.Callback):
    def __init__(self):
        self._sent: Dict[str, float] = {}  # path -> modification time already logged

    def _send(self, trainer: L.Trainer) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        folder = run_dir(trainer)
        if not loggers or not os.path.isdir(folder):
            return
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if not name.endswith(".png") or self._sent.get(path) == os.path.getmtime(path):
                continue
            self._sent[path] = os.path.getmtime(path)
            for logger in loggers:
                logger.log_image(key=f"plots/{name[:-4]}", images=[path], step=trainer.global_step)

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._send(trainer)

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._send(trainer)
