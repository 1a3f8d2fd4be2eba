"""Forgetting Transformer (FoX, Lin et al., ICLR 2025): the network, read top to bottom.

One code path builds FoX and its baselines by flags (spec ``shared/specs/fox.md`` sections 1.2-1.5):

* ``fgate``: ``full`` (data-dependent gate ``f_t = sigmoid(w_h . x_t + b_h)``), ``bias_only`` (``f_h = sigmoid(b_h)``),
  ``fixed`` (constant per head, ALiBi-like) or ``none`` (no gate: NoPE, or RoPE with ``rope=True``).
* ``block``: ``llama`` (pre-norm, SwiGLU, hidden_ratio 4) or ``pro`` (k/v token shift, per-head QK-norm, per-head
  output norm + sigmoid output gate, hidden_ratio 3.5).

Gate math is fp32: ``log f = logsigmoid(logit.float())`` and the cumulative sum happens inside
``forgetting_attention``.  Decoding keeps a per-layer cache of keys, values, log gates and the token-shift states.

Documents: ``segment_ids`` ``(B, T)`` (all positions so far, cache included) keeps packed documents -- or the
padding and the prompt of a left-padded row -- apart: attention stays inside a run of equal ids and the token shift
restarts at every run start, so each document's outputs are those it would have alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.layers.forgetting_attention import forgetting_attention
from lightning_modules.layers.generation import SamplingConfig, generate, left_pad
from lightning_modules.layers.mlp import SwiGLU, swiglu_hidden_size
from lightning_modules.layers.norms import HeadRMSNorm, at_least_fp32
from lightning_modules.layers.rotary import RotaryEmbedding
from lightning_modules.layers.token_shift import TokenShift

GATE_TYPES = ("full", "bias_only", "fixed", "none")
BLOCK_TYPES = ("llama", "pro")


@dataclass
class FoXConfig:
    vocab_size: int
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    block: str = "llama"
    hidden_ratio: Optional[float] = None  # default: 4 (llama) or 3.5 (pro)
    mlp_multiple_of: int = 256
    fgate: str = "full"
    fgate_bias_init: Optional[List[float]] = None  # [T_min, T_max] decay times for bias_only / fixed gates
    rope: bool = False
    rope_base: float = 10000.0
    qk_norm_share_across_heads: bool = False
    init_std: float = 0.02
    attn_backend: str = "auto"
    attn_block_size: int = 256
    head_dim: int = field(init=False)
    pro: bool = field(init=False)

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_multiple_of", "attn_block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.fgate not in GATE_TYPES:
            raise ValueError(f"fgate={self.fgate!r}; expected one of {', '.join(GATE_TYPES)}")
        if self.block not in BLOCK_TYPES:
            raise ValueError(f"block={self.block!r}; expected one of {', '.join(BLOCK_TYPES)}")
        if self.fgate_bias_init is not None:
            if self.fgate not in ("bias_only", "fixed"):
                raise ValueError(f"fgate_bias_init applies to fgate 'bias_only' or 'fixed', not {self.fgate!r}")
            if len(self.fgate_bias_init) != 2 or not 1.0 <= self.fgate_bias_init[0] <= self.fgate_bias_init[1]:
                raise ValueError(f"fgate_bias_init={self.fgate_bias_init!r}; expected [T_min, T_max] with 1 <= T_min <= T_max")
        self.pro = self.block == "pro"
        if self.hidden_ratio is None:
            self.hidden_ratio = 3.5 if self.pro else 4.0
        if self.hidden_ratio <= 0:
            raise ValueError(f"hidden_ratio must be > 0, got {self.hidden_ratio}")
        self.head_dim = self.d_model // self.n_heads
        if self.rope and self.head_dim % 2:
            raise ValueError(f"rope needs an even head dimension, got d_model/n_heads = {self.head_dim}")


def gate_bias_from_decay_times(n_heads: int, t_min: float, t_max: float) -> torch.Tensor:
    """``b_h = -log(expm1(1/tau_h))`` with ``tau_h`` log-spaced in ``[t_min, t_max]``, so ``log sigmoid(b_h) = -1/tau_h``."""
    tau = torch.logspace(math.log10(t_min), math.log10(t_max), n_heads, dtype=torch.float64)
    return (-torch.log(torch.expm1(1.0 / tau))).float()


@dataclass
class LayerCache:
    """What one attention layer needs to decode the next token."""
    k: torch.Tensor  # (B, H, T, D) keys after shift / norm / rope
    v: torch.Tensor  # (B, H, T, D)
    cum_log_f: Optional[torch.Tensor]  # (B, H, T) fp32 cumulative log gate c_t, None without a gate
    k_prev: Optional[torch.Tensor] = None  # (B, H, D) last pre-shift key (Pro token shift)
    v_prev: Optional[torch.Tensor] = None

    @property
    def length(self) -> int:
        return self.k.shape[2]


class ForgettingAttentionLayer(nn.Module):
    def __init__(self, cfg: FoXConfig):
        super().__init__()
        d, h, hd = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.cfg, self.n_heads, self.head_dim = cfg, h, hd
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        if cfg.fgate == "full":
            self.fgate_proj = nn.Linear(d, h, bias=True)
        elif cfg.fgate == "bias_only":
            self.fgate_bias = nn.Parameter(torch.zeros(h))
        elif cfg.fgate == "fixed":
            self.register_buffer("fgate_bias", torch.zeros(h))
        if cfg.pro:
            self.k_shift = TokenShift(d, h)
            self.v_shift = TokenShift(d, h)
            self.q_norm = HeadRMSNorm(h, hd, eps=1e-5, share_across_heads=cfg.qk_norm_share_across_heads)
            self.k_norm = HeadRMSNorm(h, hd, eps=1e-5, share_across_heads=cfg.qk_norm_share_across_heads)
            self.o_norm = HeadRMSNorm(h, hd, eps=1e-6)
            self.g_proj = nn.Linear(d, d, bias=False)
        self.rotary = RotaryEmbedding(hd, cfg.rope_base) if cfg.rope else None
        self.record_gates = False  # set by the LM during evaluation to collect gate statistics
        self.last_log_f: Optional[torch.Tensor] = None

    def log_forget_gate(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """``(B, T, H)`` fp32 log forget gates, or None for ``fgate='none'``."""
        if self.cfg.fgate == "none":
            return None
        if self.cfg.fgate == "full":
            return F.logsigmoid(at_least_fp32(self.fgate_proj(x)))
        return F.logsigmoid(at_least_fp32(self.fgate_bias)).expand(x.shape[0], x.shape[1], -1)

    def forward(self, x: torch.Tensor, cache: Optional[LayerCache] = None, use_cache: bool = False,
                segment_ids: Optional[torch.Tensor] = None, resets: Optional[torch.Tensor] = None):
        b, t, _ = x.shape
        shape = (b, t, self.n_heads, self.head_dim)
        q, k, v = self.q_proj(x).view(shape), self.k_proj(x).view(shape), self.v_proj(x).view(shape)
        k_raw, v_raw = k, v
        if self.cfg.pro:
            k = self.k_shift(x, k, None if cache is None else cache.k_prev, resets)
            v = self.v_shift(x, v, None if cache is None else cache.v_prev, resets)
            q, k = self.q_norm(q), self.k_norm(k)
        offset = 0 if cache is None else cache.length
        if self.rotary is not None:
            q, k = self.rotary(q, offset), self.rotary(k, offset)
        log_f = self.log_forget_gate(x)
        if self.record_gates and log_f is not None:
            self.last_log_f = log_f.detach()
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        log_f = None if log_f is None else log_f.transpose(1, 2)  # (B, H, T)
        gate, cumulative, cum = log_f, False, None
        if log_f is not None and (cache is not None or use_cache):
            # the cache keeps c_t = sum_{l<=t} log f_l, so a decode step adds its own gates instead of re-summing
            # the whole cache (the same additions, in the same order, as one cumsum)
            cum = torch.cumsum(log_f, dim=-1)
            if cache is not None:
                cum = torch.cat([cache.cum_log_f, cache.cum_log_f[..., -1:] + cum], dim=2)
            if cache is not None:
                gate, cumulative = cum, True
        if cache is not None:
            k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
        o = forgetting_attention(q, k, v, gate, backend=self.cfg.attn_backend, block_size=self.cfg.attn_block_size,
                                 segment_ids=segment_ids, cumulative=cumulative)
        o = o.transpose(1, 2)  # (B, T, H, D)
        if self.cfg.pro:
            o = self.o_norm(o) * torch.sigmoid(self.g_proj(x)).view(shape)
        y = self.o_proj(o.reshape(b, t, -1))
        new_cache = None
        if use_cache:
            new_cache = LayerCache(k, v, cum,
                                   k_raw[:, -1].detach() if self.cfg.pro else None,
                                   v_raw[:, -1].detach() if self.cfg.pro else None)
        return y, new_cache


class Block(nn.Module):
    def __init__(self, cfg: FoXConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.attn = ForgettingAttentionLayer(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.mlp = SwiGLU(cfg.d_model, swiglu_hidden_size(cfg.d_model, cfg.hidden_ratio, cfg.mlp_multiple_of))

    def forward(self, x, cache=None, use_cache=False, segment_ids=None, resets=None):
        a, new_cache = self.attn(self.attn_norm(x), cache, use_cache, segment_ids, resets)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), new_cache


class FoXTransformer(nn.Module):
    def __init__(self, cfg: FoXConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)  # untied, as in the official code
        self.activation_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self):
        """All Linear/Embedding weights N(0, init_std), biases 0 (no special gate init), norms 1."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=self.cfg.init_std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.RMSNorm, HeadRMSNorm)):
                nn.init.ones_(m.weight)
        if self.cfg.fgate in ("bias_only", "fixed"):
            init = self.cfg.fgate_bias_init
            bias = gate_bias_from_decay_times(self.cfg.n_heads, *init) if init else torch.zeros(self.cfg.n_heads)
            for blk in self.blocks:
                with torch.no_grad():
                    blk.attn.fgate_bias.copy_(bias)

    def forward(self, idx: torch.Tensor, caches: Optional[List[LayerCache]] = None, use_cache: bool = False,
                segment_ids: Optional[torch.Tensor] = None):
        """``idx``: ``(B, T)`` token ids -> ``(B, T, vocab)`` logits (and the new caches when ``use_cache``).

        ``segment_ids``: ``(B, cached + T)`` document labels of every position so far (see the module docstring)."""
        x = self.embed(idx)
        resets = None
        if segment_ids is not None:
            t, total = idx.shape[1], segment_ids.shape[1]
            if total != t + (0 if caches is None else caches[0].length):
                raise ValueError(f"segment_ids covers {total} positions; expected the cached and new tokens "
                                 f"({t + (0 if caches is None else caches[0].length)})")
            prev = torch.cat([segment_ids[:, :1] - 1, segment_ids[:, :-1]], dim=1)  # position 0 starts a run
            resets = (segment_ids != prev)[:, total - t:]
        new_caches = []
        for i, blk in enumerate(self.blocks):
            cache = None if caches is None else caches[i]
            if self.activation_checkpointing and self.training and not use_cache:
                x, c = torch.utils.checkpoint.checkpoint(blk, x, None, False, segment_ids, resets,
                                                         use_reentrant=False)
            else:
                x, c = blk(x, cache, use_cache, segment_ids, resets)
            new_caches.append(c)
        logits = self.lm_head(self.norm(x))
        return (logits, new_caches) if use_cache else logits

    def generation_step(self, tokens: torch.Tensor, segment_ids: torch.Tensor, caches):
        """``layers.generation``'s step: next-token logits of the newest position, and the caches."""
        logits, caches = self(tokens, caches, use_cache=True, segment_ids=segment_ids)
        return logits[:, -1], caches

    @torch.no_grad()
    def generate(self, prompts, config: SamplingConfig, eos_id: Optional[int] = None, use_cache: bool = True,
                 generator: Optional[torch.Generator] = None) -> List[List[int]]:
        """New tokens for each prompt (a list of token-id lists, any lengths: left-padded into one batch)."""
        tokens, segments = left_pad(prompts)
        device = self.lm_head.weight.device
        return generate(self.generation_step, tokens.to(device), segments.to(device), config, eos_id=eos_id,
                        use_cache=use_cache, generator=generator)

    def param_groups(self, weight_decay: float):
        """AdamW groups: matrices and embeddings decayed; biases, norm weights and gate biases not."""
        decay, no_decay = [], []
        for mod in self.modules():
            for name, p in mod.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                is_norm = isinstance(mod, (nn.RMSNorm, HeadRMSNorm))
                (no_decay if is_norm or name.endswith("bias") else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
