"""Prompts for generation: read from a file, encoded with the data's tokenizer, batched with left padding.

A ``.jsonl`` file holds one object per line with a ``"prompt"`` string (prompts may span lines); any other file holds
one prompt per line (``\\n`` and ``\\t`` escapes are expanded).  Bad input -- a missing file, an empty prompt, a file
with no prompt -- is one ``ValueError`` / ``FileNotFoundError`` naming the file and line.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.utils.data import Dataset

from lightning_modules.layers.generation import left_pad


def read_prompt_rows(path: str, extra: Sequence[str] = ()) -> List[Dict[str, Optional[str]]]:
    """``{"prompt": text, key: value or None for key in extra}`` per prompt; plain-text files have no extra fields."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist; expected a text file with one prompt per line "
                                "or a .jsonl file of {\"prompt\": ...} objects")
    rows = []
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    for n, line in enumerate(lines, 1):
        row: Dict[str, Optional[str]] = {}
        if path.endswith(".jsonl"):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                text = obj["prompt"]
                row = {key: obj.get(key) for key in extra}
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise ValueError(f"{path}:{n}: expected a JSON object with a \"prompt\" string ({err})") from None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{n}: \"prompt\" must be a string, got {type(text).__name__}")
        else:
            text = line.replace("\\n", "\n").replace("\\t", "\t")
            row = {key: None for key in extra}
        if not text.strip():
            raise ValueError(f"{path}:{n}: empty prompt; every line must hold a prompt (remove blank lines)")
        rows.append({"prompt": text, **row})
    if not rows:
        raise ValueError(f"prompt file {path!r} holds no prompt")
    return rows


def read_prompts(path: str) -> List[str]:
    return [row["prompt"] for row in read_prompt_rows(path)]


class PromptDataset(Dataset):
    """Item ``i``: ``{"index", "prompt" (text), "ids" (token ids)}``."""

    def __init__(self, prompts: List[str], encode: Callable[[str], List[int]], bos_id=None):
        self.items = [{"index": i, "prompt": text, "ids": ([bos_id] if bos_id is not None else []) + list(encode(text))}
                      for i, text in enumerate(prompts)]

    @classmethod
    def from_ids(cls, ids: List[List[int]], decode: Callable) -> "PromptDataset":
        """Prompts given as token ids (their text decoded for the record)."""
        ds = cls([], None)
        ds.items = [{"index": i, "prompt": decode(p), "ids": list(p)} for i, p in enumerate(ids)]
        return ds

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def collate_prompts(items) -> dict:
    """Left-padded ``tokens`` and ``segment_ids`` (0 = padding), with the prompts' ``index`` and text."""
    tokens, segments = left_pad([it["ids"] for it in items])
    return {"tokens": tokens, "segment_ids": segments, "index": torch.tensor([it["index"] for it in items]),
            "prompt": [it["prompt"] for it in items]}
