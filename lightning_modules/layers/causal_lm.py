"""Causal language models for RLHF-style fine-tuning: one interface for a Hugging Face ``AutoModelForCausalLM`` (a
local folder, or a config for a randomly initialised model) and a tiny GRU language model for CPU recipes.

* ``build_lm(spec)``: ``{kind: tiny, vocab_size, embed, hidden, layers}`` | ``{kind: hf, path}`` (a
  ``save_pretrained`` folder, never downloaded) | ``{kind: hf_config, config: {model_type: gpt2, ...}}``; dropout
  off.  Every model
  is called ``model(input_ids, attention_mask=..., position_ids=..., output_hidden_states=...)`` and returns an
  object with ``.logits`` (and ``.hidden_states`` when asked).
* ``lm_forward``: logits (and the last hidden states) over prompt + response, with position ids that skip the
  prompts' left padding; ``response_logits`` keeps the positions that predict the response tokens.
* ``sample_responses``: ``k`` samples per prompt at a temperature (no top-k / top-p, as the paper), ``length`` new
  tokens, truncated after the first EOS (``eos_mask``): a KV-cached ``generate`` for Hugging Face models, a plain
  loop for the tiny one; all randomness from a seed.
"""
from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Optional, Tuple

import torch
from torch import nn


class TinyGRULM(nn.Module):
    """Embedding, a GRU and a linear head: the spec's toy policy (about 30k parameters at 64 / 64)."""

    def __init__(self, vocab_size: int = 8, embed: int = 64, hidden: int = 64, layers: int = 1):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, hidden_size=hidden)
        self.embed = nn.Embedding(vocab_size, embed)
        self.gru = nn.GRU(embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, input_ids, attention_mask=None, position_ids=None, output_hidden_states=False):
        h, _ = self.gru(self.embed(input_ids))
        return SimpleNamespace(logits=self.head(h), hidden_states=(h,) if output_hidden_states else None)


def _check_folder(path: str, what: str) -> None:
    if not os.path.isdir(str(path)):
        raise FileNotFoundError(f"{what} folder {path!r} does not exist; expected a local save_pretrained folder "
                                "(models are never downloaded)")


def no_dropout(model: nn.Module) -> nn.Module:
    """Dropout off (as TRL does for RLHF): log-probabilities of the same tokens must not change between the actor,
    the learner and the reference."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def build_lm(spec: dict) -> nn.Module:
    spec = dict(spec or {})
    kind = spec.pop("kind", "tiny")
    if kind == "tiny":
        return TinyGRULM(**spec)
    from transformers import AutoConfig, AutoModelForCausalLM

    if kind == "hf":
        _check_folder(spec.get("path"), "policy model")
        return no_dropout(AutoModelForCausalLM.from_pretrained(spec["path"], local_files_only=True,
                                                               dtype=torch.float32))
    if kind == "hf_config":
        config = dict(spec.get("config") or {})
        if "model_type" not in config:
            raise ValueError(f"policy {{kind: hf_config}} needs config.model_type (e.g. gpt2), got {config}")
        return no_dropout(AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config)))
    raise ValueError(f"policy kind {kind!r}; expected tiny, hf (a local folder) or hf_config")


def is_hf(model: nn.Module) -> bool:
    return not isinstance(model, TinyGRULM)  # (importing transformers to check would cost the actor seconds)


def lm_forward(model: nn.Module, prompts: torch.Tensor, prompt_mask: torch.Tensor, responses: torch.Tensor,
               response_mask: torch.Tensor, hidden: bool = False):
    """Prompts (n, P) left-padded and responses (n, L): the logits (n, L, V) that predict the response tokens and,
    with ``hidden``, the last layer's states (n, L, H) they are computed from (the state before each response token,
    where a critic values the choice of that token, as TRL's PPO)."""
    tokens = torch.cat([prompts, responses], 1)
    attn = torch.cat([prompt_mask, response_mask], 1).long()
    positions = (attn.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=tokens, attention_mask=attn, position_ids=positions, output_hidden_states=hidden)
    P = prompts.shape[1]
    logits = out.logits[:, P - 1:-1]
    states = out.hidden_states[-1][:, P - 1:-1] if hidden else None
    return logits, states


def response_logprobs(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """``logits`` (n, L, V) predicting ``tokens`` (n, L): per-token log-probabilities at ``temperature``, 0 where
    ``mask`` is 0."""
    logp = torch.log_softmax(logits / (temperature + 1e-7), dim=-1)
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1) * mask.to(logp.dtype)


def eos_mask(responses: torch.Tensor, eos_id: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """1 up to and including the first EOS (everything when ``eos_id`` is None), and whether each row has one."""
    if eos_id is None:
        return (torch.ones_like(responses, dtype=torch.float32),
                torch.zeros(len(responses), dtype=torch.bool, device=responses.device))
    is_eos = responses == eos_id
    before = (is_eos.long().cumsum(1) - is_eos.long()) == 0
    return before.float(), is_eos.any(1)


@torch.no_grad()
def sample_responses(model: nn.Module, prompts: torch.Tensor, prompt_mask: torch.Tensor, k: int, length: int,
                     temperature: float, seed: int, eos_id: Optional[int] = None,
                     pad_id: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts (B, P) -> prompts repeated k times (B * k, P), their mask, and the responses (B * k, length) with
    ``pad_id`` after the first EOS."""
    p = prompts.repeat_interleave(k, 0)
    pm = prompt_mask.repeat_interleave(k, 0)
    device = p.device
    if is_hf(model):
        from transformers import GenerationConfig

        # a complete config: nothing from the model folder's generation_config.json (a repetition penalty, top-k)
        # may change the samples away from the plain temperature sampling whose log-probabilities we record
        config = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=length,
                                  min_new_tokens=length if eos_id is None else 0, eos_token_id=eos_id,
                                  pad_token_id=pad_id)
        torch.manual_seed(seed)
        out = model.generate(input_ids=p, attention_mask=pm.long(), generation_config=config)
        resp = out[:, p.shape[1]:]
        if resp.shape[1] < length:
            resp = torch.cat([resp, resp.new_full((len(resp), length - resp.shape[1]), pad_id)], 1)
    else:
        gen = torch.Generator(device=device).manual_seed(seed)
        resp = torch.zeros(len(p), 0, dtype=torch.long, device=device)
        for _ in range(length):
            logits = model(input_ids=torch.cat([p, resp], 1)).logits[:, -1].float()
            probs = torch.softmax(logits / (temperature + 1e-7), -1)
            resp = torch.cat([resp, torch.multinomial(probs, 1, generator=gen)], 1)
    mask, _ = eos_mask(resp, eos_id)
    resp = torch.where(mask.bool(), resp, torch.full_like(resp, pad_id))
    return p, pm, resp
