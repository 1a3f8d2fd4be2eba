"""Offline DPO with per-pair losses, so that every preference pair can carry its own constraint: ERM-DPO on its own,
Feasible-Learning DPO with the ``callbacks.feasible_learning.FeasibleLearning`` callback (Ramirez et al., AISTATS 2025,
spec ``shared/specs/feasible_learning.md``: errata, 1.3 and 1.6's DPO column).

Per pair ``i``: ``h_i = (log pi(y+) - log pi(y-)) - (log ref(y+) - log ref(y-))`` (sequence log-probabilities, summed
over response tokens) and the DPO sigmoid loss ``l_i = -log sigmoid(beta h_i)`` (β = 0.1;
``layers.preference_losses.dpo_pair_losses``).  ERM-DPO minimises the mean of ``l_i``.  FL-DPO asks ``l_i <= epsilon``
for every training pair (the authors' ``loss_tolerance``, 0.3): the callback owns one multiplier per pair and turns
``training_step``'s per-pair losses into ``mean_i lambda_i l_i`` (the authors' DPO settings: lambda initialised to 1,
mean reduction, dual learning rate 1, ``update_order: simultaneous``; Resilient FL with ``resilient_alpha: 1``, what
their scripts run).

The policy is ``layers.causal_lm.build_lm``'s: the toy GRU, a local ``AutoModelForCausalLM`` folder, or a config.
The reference is the policy as it starts (a frozen copy), or, with ``lora`` (``peft`` LoRA adapters, the paper's
r = 8, alpha = 16, peft's default target modules; dropout 0, because TRL's DPO trainer switches every dropout off,
LoRA's included), the same model with its adapters switched off, so no second copy is held.  The learning rate warms
up linearly from 0 over ``warmup_steps`` optimizer steps and then stays or follows a cosine to 0 at the last step
(transformers' ``get_cosine_schedule_with_warmup``).

Logged: ``train/loss``, the mean per-pair loss, implicit-reward accuracy and margin of the training batches;
``val/loss``, ``val/accuracy`` (the fraction of held-out pairs whose implicit reward
``beta (log pi - log ref)`` ranks the chosen response first) and ``val/margin``.  ``sample_losses`` gives per-pair
losses, ids and correctness to ``callbacks.sample_loss_report.SampleLossReport`` (loss tails, CDFs, multipliers).
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Optional

import lightning as L
import torch

from lightning_modules.layers.causal_lm import build_lm, is_hf, lm_forward, response_logprobs
from lightning_modules.layers.preference_losses import dpo_pair_losses
from lightning_modules.layers.sample_losses import PerSampleLoss

SCHEDULES = ("constant", "cosine")


class FeasibleDPO(PerSampleLoss, L.LightningModule):
    def __init__(self, policy: Optional[dict] = None, beta: float = 0.1, lr: float = 1e-3,
                 weight_decay: float = 0.0, schedule: str = "constant", warmup_steps: int = 0,
                 lora: Optional[dict] = None):
        super().__init__()
        if not beta > 0:
            raise ValueError(f"model.beta must be > 0, got {beta}")
        if not lr > 0 or weight_decay < 0 or warmup_steps < 0:
            raise ValueError(f"need lr > 0, weight_decay >= 0, warmup_steps >= 0; got {lr}, {weight_decay}, "
                             f"{warmup_steps}")
        if schedule not in SCHEDULES:
            raise ValueError(f"model.schedule={schedule!r}; expected one of {', '.join(SCHEDULES)}")
        policy = dict(policy or {"kind": "tiny"})
        self.save_hyperparameters()
        self.policy = build_lm(policy)
        self.ref = None
        if lora:
            self.policy = self._with_lora(self.policy, dict(lora))
        else:
            self.ref = copy.deepcopy(self.policy).requires_grad_(False).eval()

    @staticmethod
    def _with_lora(model, lora: dict):
        if not is_hf(model):
            raise ValueError("model.lora needs a Hugging Face policy (kind: hf or hf_config), not the toy GRU")
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=int(lora.get("r", 8)), lora_alpha=int(lora.get("alpha", 16)),
                            lora_dropout=float(lora.get("dropout", 0.0)),
                            target_modules=lora.get("target_modules"), task_type="CAUSAL_LM")
        return get_peft_model(model, config)  # LoRA dropout > 0 makes the log-probabilities that move lambda noisy

    # ------------------------------------------------------------------ log-probabilities
    def _seq_logprobs(self, model, batch) -> torch.Tensor:
        """Sequence log-probabilities of the chosen (first B) and rejected (last B) responses, one forward."""
        p, pm = batch["prompt"], batch["prompt_mask"]
        resp = torch.cat([batch["chosen"], batch["rejected"]])
        rmask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]])
        logits, _ = lm_forward(model, torch.cat([p, p]), torch.cat([pm, pm]), resp, rmask)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 up to fp32, fp64 kept
        return response_logprobs(logits, resp, rmask).sum(-1)

    def _reference(self):
        if self.ref is not None:
            return self.ref, contextlib.nullcontext()
        return self.policy, self.policy.disable_adapter()

    def sample_losses(self, batch) -> dict:
        """Per-pair DPO losses, their ids, whether the implicit reward ranks the chosen response first, the margins."""
        B = len(batch["prompt"])
        seq = self._seq_logprobs(self.policy, batch)
        model, ctx = self._reference()
        with torch.no_grad(), ctx:
            ref = self._seq_logprobs(model, batch)
        losses = dpo_pair_losses(seq[:B], seq[B:], ref[:B], ref[B:], self.hparams.beta)
        margin = self.hparams.beta * ((seq[:B] - ref[:B]) - (seq[B:] - ref[B:])).detach()
        return {"loss": losses, "index": batch.get("index"), "correct": margin > 0, "margin": margin}

    # ------------------------------------------------------------------ steps
    def training_step(self, batch, batch_idx):
        out = self.sample_losses(batch)
        loss = self.reduce_sample_losses(out["loss"], out["index"])
        self.log("train/loss", loss)
        self.log("train/pair_loss", out["loss"].detach().mean(), prog_bar=True)
        self.log("train/accuracy", out["correct"].float().mean())
        self.log("train/margin", out["margin"].mean())
        return loss

    def validation_step(self, batch, batch_idx):
        out = self.sample_losses(batch)
        n = len(out["loss"])
        self.log("val/loss", out["loss"].mean(), prog_bar=True, sync_dist=True, batch_size=n)
        self.log("val/accuracy", out["correct"].float().mean(), prog_bar=True, sync_dist=True, batch_size=n)
        self.log("val/margin", out["margin"].mean(), sync_dist=True, batch_size=n)

    def test_step(self, batch, batch_idx):
        self.validation_step(batch, batch_idx)

    def predict_step(self, batch, batch_idx):
        """One record per held-out pair: ``index, loss, margin, correct``."""
        out = self.sample_losses(batch)
        return [{"index": int(i), "loss": float(l), "margin": float(m), "correct": bool(c)}
                for i, l, m, c in zip(out["index"], out["loss"], out["margin"], out["correct"])]

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.schedule == "constant" and hp.warmup_steps == 0:
            return opt
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = hp.warmup_steps

        def factor(step: int) -> float:  # linear warm-up, then constant or cosine to 0 (transformers' shapes)
            if step < warm:
                return step / warm  # 0 at the first step, as transformers' schedules
            if hp.schedule == "constant":
                return 1.0
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
