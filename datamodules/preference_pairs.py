"""Preference pairs ``(prompt, chosen, rejected)`` for offline DPO and Feasible-Learning DPO (spec
``shared/specs/feasible_learning.md`` 1.3 and 1.6, the DPO column), as a LightningDataModule.

Sources (``source``):

* ``toy`` (the default; no files): the RLHF toy task (``datamodules.rlhf_prompts``): a prompt is 4 tokens from a
  vocabulary of 8, its ideal response the 8 tokens ``(prompt[t mod 4] + 1) mod 8``.  Each response of a pair copies
  the ideal token at every position with its own probability ``q ~ U(0, 1)`` (else a uniform token); the
  preference is programmatic: the response with the higher gold reward (fraction of ideal tokens,
  ``layers.reward_models.ToyGoldReward``) is chosen, ties are redrawn.  Pairs whose responses are far apart are easy,
  pairs one token apart are hard: the tail that Feasible Learning targets.
* ``jsonl``: one object per line, ``{"prompt", "chosen", "rejected", "system" (optional)}`` (TRL's preference
  format); ``train_path`` and ``val_path``.
* ``hf_disk``: a ``datasets.save_to_disk`` folder in the layout of the pairs the paper trains on
  (``argilla/distilabel-intel-orca-dpo-pairs``: ``system``, ``input``, ``chosen``, ``rejected``, ``status``,
  ``chosen_score``, ``in_gsm8k_train``; column names are settings).  As the authors' ``dpof.py``: ties, pairs whose
  chosen score is below 8 and GSM8K-train questions are dropped (``orca_filter``), the first ``val_fraction`` (0.2)
  of the rows, unshuffled, are the held-out split, the rest trains.

Text is encoded with a local tokenizer folder, as TRL's DPO trainer that the authors run, with four differences
(documented choices): the prompt goes through the tokenizer's chat template in one call (system message, user
message, generation prompt; the authors' ``chatml_format`` templates the system message and the user message
separately and joins the strings, which for Llama-3.1 repeats the ``<|begin_of_text|>`` header) or, without a
template, ``system \\n\\n prompt \\n\\n``; the BOS token leads the prompt once (TRL prepends it even when the template
already starts with it); each response is its text and the EOS token (the authors also append the literal text
``<|im_end|>\\n`` before the EOS, whatever the model).  Prompt and responses are tokenized separately (TRL tokenizes
them together and moves a token that merges across the boundary into the response).  Truncation: TRL's rule with
``max_length`` (``truncate_pair``), else the prompt keeps its last ``max_prompt_tokens`` tokens and each response
its first ``max_response_tokens``.

Items carry their position in the training set (``with_index``), for Feasible Learning's per-pair multipliers.
Batches are dicts: ``prompt`` (left-padded) / ``prompt_mask``, ``chosen`` / ``chosen_mask``, ``rejected`` /
``rejected_mask`` (right-padded to one length) and ``index``.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.prompts import read_prompt_rows
from datamodules.rlhf_prompts import (TOY_RESPONSE, TOY_VOCAB, check_text_source, left_pad, load_disk_split,
                                      right_pad, toy_prompts)
from datamodules.sampling import eval_sampler, shuffled_resumable

SOURCES = ("toy", "jsonl", "hf_disk")


def toy_pairs(n: int, seed: int) -> Dict[str, torch.Tensor]:
    """``n`` toy preference pairs from ``seed``: ``prompt`` (n, 4), ``chosen`` / ``rejected`` (n, 8) and their gold
    rewards (chosen strictly higher)."""
    from lightning_modules.layers.reward_models import ToyGoldReward

    gold = ToyGoldReward()
    rng = np.random.default_rng(seed + 7919)
    out = {"prompt": [], "chosen": [], "rejected": [], "gold_chosen": [], "gold_rejected": []}
    have, draw = 0, 0
    while have < n:
        m = 2 * (n - have) + 16
        prompts = toy_prompts(m, seed * 1_000_003 + draw)
        draw += 1
        target = (prompts[:, torch.arange(TOY_RESPONSE) % prompts.shape[1]] + 1) % TOY_VOCAB
        resp = []
        for _ in range(2):
            q = torch.from_numpy(rng.random((m, 1)))
            copy = torch.from_numpy(rng.random((m, TOY_RESPONSE))) < q
            noise = torch.from_numpy(rng.integers(0, TOY_VOCAB, size=(m, TOY_RESPONSE))).long()
            resp.append(torch.where(copy, target, noise))
        ones = torch.ones(m, TOY_RESPONSE)
        g = [gold(prompts, None, r, ones) for r in resp]
        keep = torch.nonzero(g[0] != g[1]).squeeze(-1)[: n - have]
        first = g[0][keep] > g[1][keep]
        out["prompt"].append(prompts[keep])
        out["chosen"].append(torch.where(first[:, None], resp[0][keep], resp[1][keep]))
        out["rejected"].append(torch.where(first[:, None], resp[1][keep], resp[0][keep]))
        out["gold_chosen"].append(torch.maximum(g[0][keep], g[1][keep]))
        out["gold_rejected"].append(torch.minimum(g[0][keep], g[1][keep]))
        have += len(keep)
    return {k: torch.cat(v) for k, v in out.items()}


def read_pairs_jsonl(path: str) -> List[dict]:
    """``{"prompt", "chosen", "rejected", "system"}`` rows; a row without a chosen or rejected string is one error
    naming the file and row."""
    rows = read_prompt_rows(path, extra=("chosen", "rejected", "system"))
    if not path.endswith(".jsonl"):
        raise ValueError(f"preference file {path!r} must be a .jsonl file of {{\"prompt\", \"chosen\", \"rejected\"}} "
                         "objects")
    for n, row in enumerate(rows, 1):
        for key in ("chosen", "rejected"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ValueError(f"{path}: pair {n} has no {key!r} string; every line needs \"prompt\", \"chosen\" "
                                 "and \"rejected\"")
    return rows


def read_pairs_hf_disk(path: str, split: str = "train", prompt_column: str = "input",
                       system_column: Optional[str] = "system", orca_filter: bool = True) -> List[dict]:
    ds = load_disk_split(path, split, [prompt_column, "chosen", "rejected"])
    cols = ds.column_names
    rows = []
    for r in ds:
        if orca_filter and (("status" in cols and r["status"] == "tie")
                            or ("chosen_score" in cols and (r["chosen_score"] is None or r["chosen_score"] < 8))
                            or ("in_gsm8k_train" in cols and r["in_gsm8k_train"])):
            continue
        system = r[system_column] if system_column and system_column in cols else None
        rows.append({"prompt": r[prompt_column], "chosen": r["chosen"], "rejected": r["rejected"], "system": system})
    if not rows:
        raise ValueError(f"dataset {path!r} holds no preference pair after filtering (orca_filter={orca_filter})")
    return rows


def truncate_pair(prompt: List[int], chosen: List[int], rejected: List[int], max_prompt_tokens: int,
                  max_length: Optional[int], max_response_tokens: int):
    """TRL's DPO rule when ``max_length`` is given: only if the prompt plus the longer response exceed it, the prompt
    keeps its last ``max_prompt_tokens``; only if they still do, both responses keep their first
    ``max_length - max_prompt_tokens``.  Without ``max_length``: prompt and responses are cut to their own limits."""
    if max_length is None:
        return prompt[-max_prompt_tokens:], chosen[:max_response_tokens], rejected[:max_response_tokens]
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest > max_length:
        prompt = prompt[-max_prompt_tokens:]
    if len(prompt) + longest > max_length:
        keep = max_length - max_prompt_tokens
        chosen, rejected = chosen[:keep], rejected[:keep]
    return prompt, chosen, rejected


def encode_pairs(rows: List[dict], tokenizer, max_prompt_tokens: int, max_response_tokens: int = 512,
                 max_length: Optional[int] = None) -> List[dict]:
    """Token ids of every pair: the prompt through the chat template (if the tokenizer has one) behind the BOS token
    (if the tokenizer has one and the template did not already start with it), responses + EOS; then
    ``truncate_pair``."""
    tok = tokenizer.tok
    template = getattr(tok, "chat_template", None)
    bos = tok.bos_token_id
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    out = []
    for row in rows:
        system = row.get("system") or ""
        if template:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": row["prompt"]}]
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = (system + "\n\n" if system else "") + row["prompt"] + "\n\n"
        prompt = tokenizer.encode(text)
        if bos is not None and prompt[:1] != [bos]:
            prompt = [bos] + prompt
        prompt, chosen, rejected = truncate_pair(prompt, tokenizer.encode(row["chosen"]) + eos,
                                                 tokenizer.encode(row["rejected"]) + eos, max_prompt_tokens,
                                                 max_length, max_response_tokens)
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


class PairSet(Dataset):
    """Item ``i``: ``{"index": i, "prompt", "chosen", "rejected"}`` (token id lists)."""

    def __init__(self, pairs: List[dict]):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        return {"index": i, **self.pairs[i]}


def collate_pairs(items: List[dict], pad_id: int = 0) -> Dict[str, torch.Tensor]:
    prompt, prompt_mask = left_pad([it["prompt"] for it in items], pad_id)
    length = max(len(it[k]) for it in items for k in ("chosen", "rejected"))
    chosen, chosen_mask = right_pad([it["chosen"] for it in items], length, pad_id)
    rejected, rejected_mask = right_pad([it["rejected"] for it in items], length, pad_id)
    return {"prompt": prompt, "prompt_mask": prompt_mask, "chosen": chosen, "chosen_mask": chosen_mask,
            "rejected": rejected, "rejected_mask": rejected_mask,
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long)}


class _Collate:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items):
        return collate_pairs(items, self.pad_id)


def _as_rows(pairs: Dict[str, torch.Tensor]) -> List[dict]:
    return [{"prompt": p.tolist(), "chosen": c.tolist(), "rejected": r.tolist()}
            for p, c, r in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"])]


class PreferenceDataModule(L.LightningDataModule):
    def __init__(self, source: str = "toy", train_path: Optional[str] = None, val_path: Optional[str] = None,
                 tokenizer: Optional[str] = None, n_train: int = 1024, n_val: int = 512, data_seed: int = 0,
                 prompt_column: str = "input", system_column: Optional[str] = "system", orca_filter: bool = True,
                 val_fraction: float = 0.2, max_prompt_tokens: int = 1024, max_response_tokens: int = 512,
                 max_length: Optional[int] = None,
                 batch_size: int = 64, eval_batch_size: int = 256, with_index: bool = True,
                 seed: Optional[int] = None, num_workers: int = 0):
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"data.source={source!r}; expected one of {', '.join(SOURCES)}")
        for name, value in (("n_train", n_train), ("n_val", n_val), ("batch_size", batch_size),
                            ("eval_batch_size", eval_batch_size), ("max_prompt_tokens", max_prompt_tokens),
                            ("max_response_tokens", max_response_tokens)):
            if int(value) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}")
        if max_length is not None and int(max_length) <= int(max_prompt_tokens):
            raise ValueError(f"data.max_length={max_length} must exceed data.max_prompt_tokens={max_prompt_tokens} "
                             "(responses keep max_length - max_prompt_tokens tokens)")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        if source == "jsonl" and train_path and not val_path:
            raise ValueError("data.source=jsonl needs data.val_path (held-out pairs)")
        check_text_source("source", source, train_path, tokenizer)
        self.save_hyperparameters()
        self.train_set: Optional[PairSet] = None
        self.val_set: Optional[PairSet] = None
        self.pad_id, self.vocab_size, self.eos_id = 0, TOY_VOCAB, None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        if hp.source == "toy":
            self.train_set = PairSet(_as_rows(toy_pairs(hp.n_train, hp.data_seed)))
            self.val_set = PairSet(_as_rows(toy_pairs(hp.n_val, hp.data_seed + 1)))
            return
        from datamodules.text_tokenizers import HFTokenizer

        tok = HFTokenizer(hp.tokenizer)
        self.vocab_size, self.eos_id = tok.vocab_size, tok.eos_id
        self.pad_id = tok.tok.pad_token_id if tok.tok.pad_token_id is not None else (tok.eos_id or 0)
        if hp.source == "jsonl":
            train, val = read_pairs_jsonl(hp.train_path), read_pairs_jsonl(hp.val_path)
        else:
            rows = read_pairs_hf_disk(hp.train_path, "train", hp.prompt_column, hp.system_column, hp.orca_filter)
            cut = int(len(rows) * hp.val_fraction)
            if cut < 1 or cut >= len(rows):
                raise ValueError(f"data.val_fraction={hp.val_fraction} of {len(rows)} pairs leaves an empty split")
            val, train = rows[:cut], rows[cut:]
        enc = lambda rows: PairSet(encode_pairs(rows, tok, hp.max_prompt_tokens, hp.max_response_tokens,  # noqa
                                                hp.max_length))
        self.train_set, self.val_set = enc(train), enc(val)

    @property
    def num_train_samples(self) -> int:
        self.setup()
        return len(self.train_set)

    def _loader(self, data, batch_size, sampler=None) -> DataLoader:
        return DataLoader(data, batch_size=batch_size, sampler=sampler, collate_fn=_Collate(self.pad_id),
                          num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        sampler = shuffled_resumable(self.train_set, hp.batch_size, self.trainer, hp.seed, drop_last=False)
        return self._loader(self.train_set, hp.batch_size, sampler)

    def train_eval_dataloader(self) -> DataLoader:
        """Every training pair once, in order (per-pair loss tails after training)."""
        return self._loader(self.train_set, self.hparams.eval_batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.hparams.eval_batch_size, eval_sampler(self.val_set, self.trainer))

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()
