"""Reward models for online RLHF (spec ``async_rlhf.md`` sections 4.1 and 6.2), all called
``rm(prompts, prompt_mask, responses, response_mask) -> scores (n,)`` without gradients:

* ``ToyGoldReward``: the toy task's programmatic gold reward, the fraction of response positions ``t`` with
  ``y_t = (x_{t mod 4} + 1) mod 8`` (a uniform policy scores 1/8).
* ``BradleyTerryRM``: a scorer (a causal-LM backbone from ``layers.causal_lm.build_lm`` and a linear head on the last
  token's state) trained by ``fit_bradley_terry`` on pairs labelled by the gold reward: the paper's proxy reward model,
  so the gold reward measures over-optimisation of the proxy.
* ``FolderRM``: any Hugging Face ``AutoModelForSequenceClassification`` saved in a local folder (the TL;DR proxy and
  gold RMs), score = its first logit at the last token.

``pack`` joins left-padded prompts and right-padded responses into left-padded sequences (the last position is the
last real token), which is what every scorer reads.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.layers.causal_lm import build_lm


def pack(prompts: torch.Tensor, prompt_mask: torch.Tensor, responses: torch.Tensor, response_mask: torch.Tensor,
         pad_id: int = 0):
    """Left-padded ``(n, P + L)`` tokens, mask and position ids of prompt + response (real tokens only)."""
    tokens = torch.cat([prompts, responses], 1)
    mask = torch.cat([prompt_mask, response_mask], 1) > 0
    order = torch.argsort(mask.long(), dim=1, stable=True)  # padding first, real tokens in order after it
    tokens = torch.where(mask, tokens, torch.full_like(tokens, pad_id)).gather(1, order)
    mask = mask.gather(1, order).long()
    return tokens, mask, (mask.cumsum(1) - 1).clamp(min=0)


class ToyGoldReward(nn.Module):
    vocab = 8

    def forward(self, prompts, prompt_mask, responses, response_mask):
        P, L = prompts.shape[1], responses.shape[1]
        target = (prompts[:, torch.arange(L, device=prompts.device) % P] + 1) % self.vocab
        return ((responses == target).float() * response_mask).sum(-1) / L


class BradleyTerryRM(nn.Module):
    def __init__(self, backbone: dict, pad_id: int = 0):
        super().__init__()
        self.backbone = build_lm(backbone)
        self.head = nn.Linear(self.backbone.config.hidden_size, 1)
        self.pad_id = pad_id

    def forward(self, prompts, prompt_mask, responses, response_mask):
        tokens, mask, pos = pack(prompts, prompt_mask, responses, response_mask, self.pad_id)
        out = self.backbone(input_ids=tokens, attention_mask=mask, position_ids=pos, output_hidden_states=True)
        return self.head(out.hidden_states[-1][:, -1]).squeeze(-1)


def fit_bradley_terry(rm: BradleyTerryRM, prompts, prompt_mask, responses, response_mask, gold: torch.Tensor,
                      steps: int, lr: float = 3e-3, batch_size: int = 256, seed: int = 0) -> dict:
    """Trains ``rm`` on pairs (rows ``2i``, ``2i + 1`` answer the same prompt) labelled by ``gold`` (ties dropped):
    ``-log sigmoid(r(y+) - r(y-))``.  Returns the final training loss and pair accuracy."""
    n = len(gold) // 2
    g = gold.view(n, 2)
    keep = torch.nonzero(g[:, 0] != g[:, 1]).squeeze(-1)
    if keep.numel() == 0:
        raise ValueError("every gold-labelled pair is a tie: no preference to train the proxy reward model on")
    win_first = (g[keep, 0] > g[keep, 1])
    rows = torch.stack([2 * keep, 2 * keep + 1], 1)
    chosen = torch.where(win_first, rows[:, 0], rows[:, 1])
    rejected = torch.where(win_first, rows[:, 1], rows[:, 0])
    opt = torch.optim.AdamW(rm.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    loss = acc = torch.tensor(float("nan"))
    for _ in range(steps):
        pick = torch.randint(len(chosen), (min(batch_size, len(chosen)),), generator=gen)
        idx = torch.cat([chosen[pick], rejected[pick]])
        r = rm(prompts[idx], prompt_mask[idx], responses[idx], response_mask[idx]).view(2, -1)
        loss = -F.logsigmoid(r[0] - r[1]).mean()
        acc = (r[0] > r[1]).float().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"loss": float(loss.detach()), "accuracy": float(acc), "pairs": int(len(chosen))}


class FolderRM(nn.Module):
    def __init__(self, path: str, pad_id: Optional[int] = None):
        super().__init__()
        if not os.path.isdir(str(path)):
            raise FileNotFoundError(f"reward model folder {path!r} does not exist; expected a local "
                                    "save_pretrained folder of a sequence-classification model")
        from transformers import AutoModelForSequenceClassification

        self.model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True,
                                                                        dtype=torch.float32)
        self.pad_id = pad_id if pad_id is not None else (self.model.config.pad_token_id or 0)
        # an id no token has: the model then scores the last position, with left padding the last real token
        self.model.config.pad_token_id = -1
        self.model.requires_grad_(False)

    def forward(self, prompts, prompt_mask, responses, response_mask):
        tokens, mask, pos = pack(prompts, prompt_mask, responses, response_mask, self.pad_id)
        return self.model(input_ids=tokens, attention_mask=mask, position_ids=pos).logits[:, 0].float()


def build_reward(spec: dict, pad_id: int = 0) -> nn.Module:
    spec = dict(spec or {})
    kind = spec.pop("kind", "toy")
    if kind == "toy":
        return ToyGoldReward()
    if kind == "proxy":
        return BradleyTerryRM(spec.get("backbone", {"kind": "tiny"}), pad_id)
    if kind == "folder":
        return FolderRM(spec.get("path"), pad_id)
    raise ValueError(f"reward kind {kind!r}; expected toy (the toy's gold reward), proxy (a Bradley-Terry model "
                     "trained on gold-labelled pairs) or folder (a local sequence-classification model)")
