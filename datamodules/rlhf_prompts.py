"""Prompts for online RLHF (spec ``async_rlhf.md`` sections 4.1 and 6.2): the embedded toy task, JSONL files and
Hugging Face datasets saved to disk (the TL;DR layout of the paper), as token ids with optional reference responses.

* Toy (the default; no files): a prompt is 4 tokens from a vocabulary of 8, drawn from ``(seed, batch)``; the gold
  reward of a response is ``lightning_modules.layers.reward_models.toy_gold_reward``.
* ``jsonl``: one object per line, ``{"prompt": text, "reference": text (optional)}``.
* ``hf_disk``: ``datasets.load_from_disk`` folder of a ``DatasetDict`` with the train / validation splits and text
  columns ``query`` and ``reference_response`` (names are settings), as in
  ``vwxyzjn/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_1706381144``.

Text is encoded with a local tokenizer folder (``datamodules.text_tokenizers.HFTokenizer``); prompts longer than
``max_prompt_tokens`` keep their last tokens.  Bad input is one line naming the file, line or column.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch

from datamodules.prompts import read_prompt_rows

TOY_VOCAB, TOY_PROMPT, TOY_RESPONSE = 8, 4, 8


@dataclass
class PromptSet:
    """Token ids of prompts and (optionally) of their reference responses."""
    prompts: List[List[int]]
    references: Optional[List[List[int]]] = None
    texts: List[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)


def toy_prompts(n: int, seed: int) -> torch.Tensor:
    """``n`` toy prompts (n, 4), uniform over the vocabulary of 8, from ``seed``."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, TOY_VOCAB, size=(n, TOY_PROMPT))).long()


def read_jsonl(path: str) -> List[dict]:
    """``{"prompt", "reference"}`` rows of a JSONL file (or a text file of prompts, without references)."""
    return read_prompt_rows(path, extra=("reference",))


def check_text_source(key: str, source: str, train_path: Optional[str], tokenizer: Optional[str]) -> None:
    """A file source (not ``toy``) needs ``data.train_path`` and a local tokenizer folder: one-line errors."""
    if source != "toy" and not train_path:
        raise ValueError(f"data.{key}={source} needs data.train_path")
    if source != "toy" and not tokenizer:
        raise ValueError(f"data.{key}={source} needs data.tokenizer (a local tokenizer folder)")
    if tokenizer and not os.path.isdir(tokenizer):
        raise FileNotFoundError(f"tokenizer folder {tokenizer!r} does not exist; expected a local "
                                "save_pretrained folder (tokenizers are never downloaded)")


def load_disk_split(path: str, split: str, columns):
    """Split ``split`` of a ``datasets.save_to_disk`` folder (or the folder's one dataset), checked to have
    ``columns``; a missing folder, split or column is a one-line error naming it."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"dataset folder {path!r} does not exist; expected a datasets.save_to_disk folder")
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(path)
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise ValueError(f"dataset {path!r} has no split {split!r}; it has {', '.join(ds)}")
        ds = ds[split]
    for col in columns:
        if col not in ds.column_names:
            raise ValueError(f"dataset {path!r} has no column {col!r}; it has {', '.join(ds.column_names)}")
    return ds


def read_hf_disk(path: str, split: str, prompt_column: str = "query",
                 reference_column: Optional[str] = "reference_response") -> List[dict]:
    ds = load_disk_split(path, split, [prompt_column])
    refs = ds[reference_column] if reference_column and reference_column in ds.column_names else None
    return [{"prompt": q, "reference": None if refs is None else refs[i]} for i, q in enumerate(ds[prompt_column])]


def encode_rows(rows: List[dict], tokenizer, max_prompt_tokens: int, bos: bool = False) -> PromptSet:
    prompts, refs = [], []
    for row in rows:
        ids = tokenizer.encode(row["prompt"])[-max_prompt_tokens:]
        if bos and tokenizer.bos_id is not None:
            ids = [tokenizer.bos_id] + ids[-(max_prompt_tokens - 1):]
        prompts.append(ids)
        if row.get("reference") is not None:
            ref = tokenizer.encode(row["reference"])
            refs.append(ref + ([tokenizer.eos_id] if tokenizer.eos_id is not None else []))
    if refs and len(refs) != len(prompts):
        raise ValueError("some rows have a reference response and some do not; give every row one or none")
    return PromptSet(prompts, refs or None, [r["prompt"] for r in rows])


def left_pad(ids: List[List[int]], pad_id: int):
    """(n, P) token ids left-padded with ``pad_id`` and their 0/1 mask."""
    P = max(len(x) for x in ids)
    tokens = torch.full((len(ids), P), pad_id, dtype=torch.long)
    mask = torch.zeros(len(ids), P)
    for i, x in enumerate(ids):
        if x:
            tokens[i, P - len(x):] = torch.tensor(x)
            mask[i, P - len(x):] = 1.0
    return tokens, mask


def right_pad(ids: List[List[int]], length: int, pad_id: int):
    tokens = torch.full((len(ids), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(ids), length)
    for i, x in enumerate(ids):
        x = x[:length]
        tokens[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, :len(x)] = 1.0
    return tokens, mask
