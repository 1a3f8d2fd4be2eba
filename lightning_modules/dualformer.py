"""Dualformer (Su et al., ICLR 2025; spec ``dualformer.md``): an encoder-decoder trained on A* search traces with
structured trace dropping, answering in fast mode (plan only), slow mode (trace, then plan) or auto mode.

The arm (full trace, solution only, Dualformer) is the datamodule's ``mixture``; this module is the same for all
three.  Training is teacher forcing on ``bos [trace] plan eos`` with the token cross-entropy averaged per sequence
and then over the batch (spec 1.2).  The mode is chosen by forcing the first decoder token after ``bos``
(spec 1.4): ``slow`` forces ``create``, ``fast`` forces ``plan``, ``auto`` forces nothing.

Optimiser as the official trainer: AdamW (0.9, 0.99), linear warm-up, cosine decay to ``min_lr_ratio`` x lr.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F

from datamodules.search_tasks import check_task, judge, puzzle_of, vocabulary
from lightning_modules.layers.encoder_decoder import EncoderDecoder
from lightning_modules.dualformer_eval import MODES, check_mode, parse_response
from lightning_modules.layers.generation import SamplingConfig, generate


def sequence_mean_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Token cross-entropy averaged over each sequence's targets (``pad_id`` excluded), then over the batch."""
    per_token = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=pad_id, reduction="none")
    mask = (targets != pad_id).to(per_token.dtype)
    return ((per_token * mask).sum(1) / mask.sum(1).clamp_min(1)).mean()


class Dualformer(L.LightningModule):
    def __init__(self, max_size: int = 5, d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
                 positions: str = "rope", max_len: int = 1024, lr: float = 5e-4, betas: Sequence[float] = (0.9, 0.99),
                 weight_decay: float = 0.0, warmup_steps: int = 200, min_lr_ratio: float = 0.1,
                 schedule: str = "cosine", max_new_tokens: int = 512, predict_mode: str = "auto", task: str = "maze",
                 max_cost: int = 0, boxes: int = 2):
        super().__init__()
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"unknown schedule {schedule!r}: expected 'cosine' or 'constant'")
        check_mode(predict_mode)
        for name, value in (("d_model", d_model), ("n_layers", n_layers), ("n_heads", n_heads),
                            ("max_new_tokens", max_new_tokens), ("max_len", max_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        if not lr > 0 or warmup_steps < 0 or not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"need lr > 0, warmup_steps >= 0 and min_lr_ratio in [0, 1]; got lr={lr}, "
                             f"warmup_steps={warmup_steps}, min_lr_ratio={min_lr_ratio}")
        self.save_hyperparameters()
        self.vocabulary = vocabulary(check_task(task), max_size, max_cost, boxes)
        self.ids: Dict[str, int] = {w: i for i, w in enumerate(self.vocabulary)}
        self.pad_id, self.bos_id, self.eos_id = self.ids["pad"], self.ids["bos"], self.ids["eos"]
        self.model = EncoderDecoder(len(self.vocabulary), d_model, n_layers, n_heads, positions, max_len)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        vocab = getattr(dm, "vocabulary", None)
        if vocab is not None and list(vocab) != self.vocabulary:
            hp = self.hparams
            raise ValueError(f"model.max_size={hp.max_size} (task {hp.task!r}, max_cost {hp.max_cost}) does not match "
                             f"the data (vocabulary of {len(vocab)} tokens, {len(self.vocabulary)} here): set "
                             f"model.max_size to the largest size in data.sizes and the same task, max_cost, boxes")

    # ---------------------------------------------------------------------------------------------- training
    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        return self.model(src, src != self.pad_id, tgt_in)

    def _loss(self, batch) -> torch.Tensor:
        tgt = batch["tgt"]
        return sequence_mean_cross_entropy(self(batch["src"], tgt[:, :-1]), tgt[:, 1:], self.pad_id)

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._loss(batch), prog_bar=True, batch_size=batch["src"].shape[0], sync_dist=True)

    def test_step(self, batch, batch_idx):
        self.log("test/loss", self._loss(batch), batch_size=batch["src"].shape[0], sync_dist=True)

    def predict_step(self, batch, batch_idx):
        """One row per test maze: the greedy answer in ``predict_mode`` and whether its plan is correct / optimal."""
        mode = self.hparams.predict_mode
        rows = []
        for src, index, size, best, answer in zip(batch["src"], batch["index"].tolist(), batch["size"].tolist(),
                                                  batch["optimal_cells"].tolist(), self.generate(batch["src"], mode)):
            words = self.decode_tokens(answer)
            prompt = [w for w in self.decode_tokens(src) if w not in ("bos", "eos", "pad")]
            parsed = parse_response(words)
            task = self.hparams.task
            correct, optimal = judge(task, puzzle_of(task, prompt, size), parsed.plan, best)
            rows.append({"index": index, "mode": mode, "correct": int(correct), "optimal": int(optimal),
                         "trace_tokens": parsed.trace_len, "optimal_cells": best, "response": " ".join(words)})
        return rows

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1

        def factor(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            if hp.schedule == "constant":
                return 1.0
            progress = min(1.0, (step - hp.warmup_steps) / max(1, total - hp.warmup_steps))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---------------------------------------------------------------------------------------------- decoding
    @torch.no_grad()
    def generate(self, src: torch.Tensor, mode: str = "auto", samples: int = 1, temperature: float = 0.0,
                 max_new_tokens: Optional[int] = None, seed: int = 0, use_cache: bool = True) -> List[List[int]]:
        """Responses (the forced mode token included, ``eos`` excluded) for each source row, ``samples`` per row
        (rows ``i * samples .. (i + 1) * samples - 1``): greedy at ``temperature=0``, else multinomial."""
        prefix = [self.bos_id] + [self.ids[w] for w in MODES[check_mode(mode)]]
        src = src.to(self.device).repeat_interleave(samples, dim=0)
        src_mask = src != self.pad_id
        memory = self.model.encode(src, src_mask)
        tokens = torch.tensor(prefix, device=self.device).expand(src.shape[0], -1)

        def step(toks, _segments, cache):
            logits, cache = self.model.decode(toks, memory, src_mask, cache, use_cache=use_cache)
            return logits[:, -1], cache

        config = SamplingConfig(max_new_tokens=int(max_new_tokens or self.hparams.max_new_tokens),
                                temperature=temperature, seed=seed)
        new = generate(step, tokens, torch.ones_like(tokens), config, eos_id=self.eos_id, use_cache=use_cache)
        return [prefix[1:] + [t for t in row if t != self.eos_id] for row in new]

    def decode_tokens(self, ids: Sequence[int]) -> List[str]:
        return [self.vocabulary[int(i)] for i in ids]
