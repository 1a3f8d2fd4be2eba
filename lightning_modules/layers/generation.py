"""Autoregressive generation for any causal LM with a step function: batched, left-padded prompts, greedy or sampled
through ``transformers``' logits warpers (temperature, top-k, top-p), stop at EOS, seeded.

The model side is one callable, ``step(tokens, segment_ids, cache) -> (last_logits, cache)``:

* ``tokens`` ``(B, T)``: the whole left-padded prompt on the first call (``cache=None``), then the newest token;
* ``segment_ids`` ``(B, T_total)``: 0 on left padding, 1 on real tokens, for every position so far (a model that
  attends by document keeps padding and prompt apart with it; positions are absolute, so a relative position
  encoding sees the same distances as without padding); ``None`` when no row is padded;
* ``cache``: whatever the model returned last time, or ``None`` to recompute from scratch (``use_cache=False``:
  the step then receives all tokens so far every time).

Shared by every language-model recipe; the FoX LM supplies its KV/gate/shift cache through ``step``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)


@dataclass
class SamplingConfig:
    """``temperature=0`` is greedy; ``top_k=None`` / ``top_p=1.0`` switch those filters off."""
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: Optional[int] = None
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1 or null, got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def warpers(self) -> LogitsProcessorList:
        """transformers' warpers in its own order (temperature, top-k, top-p); empty when greedy."""
        out = LogitsProcessorList()
        if self.greedy:
            return out
        if self.temperature != 1.0:
            out.append(TemperatureLogitsWarper(float(self.temperature)))
        if self.top_k is not None:
            out.append(TopKLogitsWarper(int(self.top_k)))
        if self.top_p < 1.0:
            out.append(TopPLogitsWarper(float(self.top_p)))
        return out


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0):
    """``(tokens, segment_ids)``, both ``(B, max_len)`` int64: each prompt right-aligned, segment 0 on padding."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    segments = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        segments[i, width - len(p):] = 1
    return tokens, segments


@torch.no_grad()
def generate(step: Callable, tokens: torch.Tensor, segment_ids: torch.Tensor, config: SamplingConfig,
             eos_id: Optional[int] = None, use_cache: bool = True,
             generator: Optional[torch.Generator] = None) -> List[List[int]]:
    """New tokens per row (EOS included when produced; nothing after it).

    Rows stop at their own EOS; the loop ends when every row has stopped or after ``max_new_tokens``.  Sampling
    draws from ``generator`` (default: a CPU/device generator seeded with ``config.seed``), so a run is a function
    of the seed and the batch."""
    device = tokens.device
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(int(config.seed))
    warpers = config.warpers()
    b = tokens.shape[0]
    done = torch.zeros(b, dtype=torch.bool, device=device)
    new: List[List[int]] = [[] for _ in range(b)]
    seen, seg = tokens, segment_ids
    if bool(segment_ids.all()):  # no row is padded: no document masks to build at every step
        seg = None
    logits, cache = step(tokens, seg, None)
    for n in range(config.max_new_tokens):
        scores = logits.float()
        if config.greedy:
            nxt = scores.argmax(-1)
        else:
            scores = warpers(seen, scores)
            nxt = torch.multinomial(torch.softmax(scores, -1), 1, generator=generator).squeeze(-1)
        for i, (token, finished) in enumerate(zip(nxt.tolist(), done.tolist())):
            if not finished:
                new[i].append(token)
        if eos_id is not None:
            done |= nxt == eos_id
        if bool(done.all()) or n == config.max_new_tokens - 1:  # no forward pass for a token never sampled
            break
        seen = torch.cat([seen, nxt[:, None]], dim=1)
        seg = None if seg is None else torch.cat([seg, seg[:, -1:]], dim=1)
        if use_cache:
            logits, cache = step(nxt[:, None], seg, cache)
        else:
            logits, _ = step(seen, seg, None)
    return new
