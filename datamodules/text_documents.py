"""Document-aware training windows (the FoX paper's protocol and sequence packing).

A token stream with known document starts is cut into *units*: each document in chunks of at most ``seq_len``
tokens.  A unit becomes ``(x, y)`` with ``y`` = its tokens and ``x`` = ``[BOS] + y[:-1]``, so every window starts at a
document start with BOS at position 0 and no target crosses a document boundary.

* ``aligned``: one unit per window (shorter units are padded: target ``-100``, not trained);
* ``packed``: consecutive units fill the window; their segment ids keep attention inside each document, so a packed
  window computes what its documents would one by one (tested), without the padding.

Items are ``(x, y, segment_ids)``; item ``i`` is a pure function of ``(seed, i)`` (resumable, as ``RandomWindows``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

IGNORE = -100  # cross_entropy's ignore_index: padding targets


def starts_from_separator(tokens: np.ndarray, sep_id: int) -> np.ndarray:
    """Document starts of a stream whose documents each end with ``sep_id`` (nanoGPT's EOT convention)."""
    ends = np.flatnonzero(np.asarray(tokens) == sep_id) + 1
    return np.concatenate([[0], ends[ends < len(tokens)]]).astype(np.int64)


def split_starts(starts: np.ndarray, cut: int) -> Tuple[np.ndarray, np.ndarray]:
    """Document starts of ``tokens[:cut]`` and of ``tokens[cut:]`` (a document split by the cut starts again)."""
    starts = np.asarray(starts, dtype=np.int64)
    head = starts[starts < cut]
    tail = starts[starts >= cut] - cut
    return head, np.concatenate([[0], tail[tail > 0]]).astype(np.int64)


def units(starts: np.ndarray, n_tokens: int, size: int) -> np.ndarray:
    """``(N, 2)`` int64 ``(start, length)``: every document cut into chunks of at most ``size`` tokens."""
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.append(starts[1:], n_tokens)
    lengths = ends - starts
    keep = lengths > 0
    starts, lengths = starts[keep], lengths[keep]
    counts = -(-lengths // size)
    first = np.repeat(starts, counts)
    k = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    unit_start = first + k * size
    unit_len = np.minimum(size, np.repeat(starts + lengths, counts) - unit_start)
    return np.stack([unit_start, unit_len], axis=1)


def fill_window(tokens: np.ndarray, table: np.ndarray, first: int, seq_len: int, bos_id: int, packed: bool):
    x = torch.zeros(seq_len, dtype=torch.long)
    y = torch.full((seq_len,), IGNORE, dtype=torch.long)
    seg = torch.zeros(seq_len, dtype=torch.long)
    fill, doc, u = 0, 0, first
    while fill < seq_len:
        start, length = (int(v) for v in table[u])
        n = min(length, seq_len - fill)
        chunk = torch.from_numpy(np.asarray(tokens[start:start + n]).astype(np.int64))
        y[fill:fill + n] = chunk
        x[fill] = bos_id
        x[fill + 1:fill + n] = chunk[:-1]
        seg[fill:fill + n] = doc
        fill, doc, u = fill + n, doc + 1, (u + 1) % len(table)
        if not packed:
            break
    seg[fill:] = doc  # padding: a run of its own
    return x, y, seg


class DocumentWindows(Dataset):
    """Training windows of ``seq_len`` from document units; item ``i`` starts at a unit drawn from ``(seed, i)``."""

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, seq_len: int, bos_id: int, seed: int, length: int,
                 packed: bool):
        self.tokens, self.seq_len, self.bos_id, self.seed, self.length = tokens, seq_len, bos_id, seed, length
        self.table, self.packed = units(starts, len(tokens), seq_len), packed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        first = int(np.random.default_rng([self.seed, int(i)]).integers(len(self.table)))
        return fill_window(self.tokens, self.table, first, self.seq_len, self.bos_id, self.packed)


class DocumentStarts(Dataset):
    """Validation: ``n`` evenly spaced units of up to ``seq_len`` tokens, each from a document start, padded, so the
    per-position loss counts positions from the start of each document."""

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, seq_len: int, bos_id: int, n: int,
                 table: Optional[np.ndarray] = None):
        self.tokens, self.seq_len, self.bos_id = tokens, seq_len, bos_id
        self.table = units(starts, len(tokens), seq_len) if table is None else table
        first_chunks = self.table[np.isin(self.table[:, 0], starts)]  # document starts, not later chunks
        pick = np.unique(np.linspace(0, len(first_chunks) - 1, n).round().astype(np.int64))
        self.table = first_chunks[pick]

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int):
        return fill_window(self.tokens, self.table, i, self.seq_len, self.bos_id, packed=False)
