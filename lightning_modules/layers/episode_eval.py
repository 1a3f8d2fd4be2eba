"""The evaluation steps every reinforcement-learning module shares (on-policy ``layers.on_policy``, off-policy
``layers.off_policy``).  The data module's validation / test / predict loaders yield one evaluation, a dict of the
``returns`` and ``lengths`` of whole episodes (``datamodules.env_side.play_episodes``).

Logged: ``val/return`` (progress bar) / ``test/return``, ``*/return_std``, ``*/length``, averaged over DDP ranks
weighted by their episodes; predict: one record per episode (``index``, ``return``, ``length``)."""
from __future__ import annotations

from typing import Dict, List

import torch


class EpisodeEvaluation:
    """Mix in before ``L.LightningModule``."""

    def _evaluation(self, batch: Dict[str, torch.Tensor], split: str) -> None:
        returns = batch["returns"].float()
        size = returns.numel()
        self.log(f"{split}/return", returns.mean(), prog_bar=split == "val", sync_dist=True, batch_size=size)
        self.log(f"{split}/return_std", returns.std(unbiased=False), sync_dist=True, batch_size=size)
        self.log(f"{split}/length", batch["lengths"].float().mean(), sync_dist=True, batch_size=size)

    def validation_step(self, batch, batch_idx):
        self._evaluation(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluation(batch, "test")

    def predict_step(self, batch, batch_idx) -> List[dict]:
        return [{"index": i, "return": round(float(r), 4), "length": int(n)}
                for i, (r, n) in enumerate(zip(batch["returns"].tolist(), batch["lengths"].tolist()))]
