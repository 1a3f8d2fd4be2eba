"""A T5-like encoder-decoder in the LLaMA block style (the Searchformer / Dualformer model, spec ``dualformer.md``
1.5): pre-norm RMSNorm, RoPE on self-attention and none on cross-attention (or learned absolute positions), SwiGLU
feed-forward without biases, no dropout, a causal decoder with a KV cache for generation.

    model = EncoderDecoder(vocab_size, d_model=64, n_layers=2, n_heads=4)
    logits = model(src, src_mask, tgt_in)                       # teacher forcing, (B, T, vocab)
    memory = model.encode(src, src_mask)
    logits, cache = model.decode(tokens, memory, src_mask)      # first call: the whole decoder prefix
    logits, cache = model.decode(next_token, memory, src_mask, cache)

``src_mask`` is ``True`` on real source tokens (right padding is ``False``).  Decoder padding needs no mask: it is
right padding under a causal mask, and the loss ignores it.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.layers.mlp import SwiGLU, swiglu_hidden_size
from lightning_modules.layers.rotary import RotaryEmbedding

POSITIONS = ("rope", "learned")


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, rope: bool):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.kv_proj = nn.Linear(d_model, 2 * d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.rope = RotaryEmbedding(self.head_dim) if rope else None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.n_heads, self.head_dim)

    def keys_values(self, source: torch.Tensor, offset: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        k, v = (self._heads(t) for t in self.kv_proj(source).chunk(2, dim=-1))
        if self.rope is not None:
            k = self.rope(k, offset)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, kv: Tuple[torch.Tensor, torch.Tensor], mask: Optional[torch.Tensor] = None,
                causal: bool = False, offset: int = 0) -> torch.Tensor:
        q = self._heads(self.q_proj(x))
        if self.rope is not None:
            q = self.rope(q, offset)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), kv[0], kv[1], attn_mask=mask, is_causal=causal)
        return self.o_proj(out.transpose(1, 2).reshape(x.shape))


class Block(nn.Module):
    """Self-attention (causal in the decoder), cross-attention (decoder only), SwiGLU; each pre-normed."""

    def __init__(self, d_model: int, n_heads: int, hidden: int, rope: bool, cross: bool):
        super().__init__()
        self.self_norm = nn.RMSNorm(d_model)
        self.self_attn = Attention(d_model, n_heads, rope)
        self.cross_norm = nn.RMSNorm(d_model) if cross else None
        self.cross_attn = Attention(d_model, n_heads, rope=False) if cross else None
        self.mlp_norm = nn.RMSNorm(d_model)
        self.mlp = SwiGLU(d_model, hidden)

    def forward(self, x, self_mask=None, causal=False, memory=None, memory_mask=None, cache: Optional[dict] = None,
                offset: int = 0):
        h = self.self_norm(x)
        k, v = self.self_attn.keys_values(h, offset)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        x = x + self.self_attn(h, (k, v), self_mask, causal, offset)
        if self.cross_attn is not None:
            if cache is not None and "ck" in cache:
                ckv = cache["ck"], cache["cv"]
            else:
                ckv = self.cross_attn.keys_values(memory)
                if cache is not None:
                    cache["ck"], cache["cv"] = ckv
            x = x + self.cross_attn(self.cross_norm(x), ckv, memory_mask)
        return x + self.mlp(self.mlp_norm(x))


class EncoderDecoder(nn.Module):
    def __init__(self, vocab_size: int, d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
                 positions: str = "rope", max_len: int = 4096, hidden_ratio: float = 4.0, mlp_multiple_of: int = 256,
                 decoder_layers: Optional[int] = None):
        super().__init__()
        if positions not in POSITIONS:
            raise ValueError(f"unknown positions {positions!r}: expected one of {list(POSITIONS)}")
        hidden = swiglu_hidden_size(d_model, hidden_ratio, mlp_multiple_of)
        rope = positions == "rope"
        self.embed = nn.Embedding(vocab_size, d_model)
        self.src_pos = nn.Embedding(max_len, d_model) if not rope else None
        self.tgt_pos = nn.Embedding(max_len, d_model) if not rope else None
        self.encoder = nn.ModuleList(Block(d_model, n_heads, hidden, rope, cross=False) for _ in range(n_layers))
        self.decoder = nn.ModuleList(Block(d_model, n_heads, hidden, rope, cross=True)
                                     for _ in range(decoder_layers or n_layers))
        self.enc_norm, self.dec_norm = nn.RMSNorm(d_model), nn.RMSNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.max_len = max_len
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def _embed(self, tokens: torch.Tensor, table: Optional[nn.Embedding], offset: int = 0) -> torch.Tensor:
        x = self.embed(tokens)
        if table is not None:
            if offset + tokens.shape[1] > self.max_len:
                raise ValueError(f"sequence of {offset + tokens.shape[1]} tokens exceeds max_len={self.max_len}")
            x = x + table(torch.arange(offset, offset + tokens.shape[1], device=tokens.device))
        return x

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        x = self._embed(src, self.src_pos)
        mask = src_mask[:, None, None, :]
        for block in self.encoder:
            x = block(x, self_mask=mask)
        return self.enc_norm(x)

    def decode(self, tokens: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor,
               cache: Optional[List[dict]] = None, use_cache: bool = True):
        """Logits ``(B, T, vocab)`` for decoder ``tokens`` after the ``cache`` (``None``: from position 0), and the
        updated cache (``None`` when ``use_cache`` is false)."""
        offset = 0 if cache is None else cache[0]["k"].shape[2]
        if cache is None and use_cache:
            cache = [{} for _ in self.decoder]
        x = self._embed(tokens, self.tgt_pos, offset)
        mask, causal = None, offset == 0 and tokens.shape[1] > 1
        if offset and tokens.shape[1] > 1:  # several new tokens after a cache: causal within, all of the past
            mask = torch.ones(tokens.shape[1], offset + tokens.shape[1], dtype=torch.bool, device=tokens.device)
            mask = mask.tril(offset)
        memory_mask = src_mask[:, None, None, :]
        for i, block in enumerate(self.decoder):
            x = block(x, mask, causal, memory, memory_mask, None if cache is None else cache[i], offset)
        return self.lm_head(self.dec_norm(x)), cache

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return self.decode(tgt, self.encode(src, src_mask), src_mask, use_cache=False)[0]
