"""The tokenizers a text datamodule decodes and encodes with (one place decides the vocabulary).

* ``ByteTokenizer``: UTF-8 bytes, vocab 256; with documents it adds a BOS id 256 (vocab 257), since every byte value
  can occur in text;
* ``CharTokenizer``: nanoGPT's character-level ``meta.pkl`` (``stoi`` / ``itos``), beside a token file;
* ``HFTokenizer``: a local Hugging Face tokenizer folder (``save_pretrained`` output; never downloaded).

All have ``encode(text) -> ids``, ``decode(ids) -> text``, ``vocab_size``, ``bos_id`` and ``eos_id`` (or None).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import List, Optional


class ByteTokenizer:
    name = "bytes"

    def __init__(self, with_bos: bool = False):
        self.bos_id: Optional[int] = 256 if with_bos else None
        self.eos_id: Optional[int] = None
        self.vocab_size = 257 if with_bos else 256

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class CharTokenizer:
    name = "meta.pkl"

    def __init__(self, meta: dict):
        self.stoi, self.itos = meta["stoi"], meta["itos"]
        self.vocab_size = int(meta.get("vocab_size", len(self.itos)))
        self.bos_id: Optional[int] = None
        self.eos_id: Optional[int] = None

    def encode(self, text: str) -> List[int]:
        unknown = sorted({ch for ch in text if ch not in self.stoi})
        if unknown:
            raise ValueError(f"characters {''.join(unknown)!r} are not in the data's vocabulary (meta.pkl stoi)")
        return [self.stoi[ch] for ch in text]

    def decode(self, ids) -> str:
        return "".join(self.itos[int(i)] for i in ids if int(i) in self.itos)


class HFTokenizer:
    name = "huggingface"

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:  # a folder without tokenizer files
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"tokenizer folder {path!r} holds no loadable tokenizer ({first}); expected a "
                             "save_pretrained tokenizer folder") from None
        self.vocab_size = len(self.tok)
        self.eos_id: Optional[int] = self.tok.eos_token_id
        self.bos_id: Optional[int] = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.eos_id

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def char_meta(folder: Path) -> Optional[dict]:
    """nanoGPT's ``meta.pkl`` beside a token file, or None."""
    meta = Path(folder) / "meta.pkl"
    if not meta.exists():
        return None
    with open(meta, "rb") as fh:
        return pickle.load(fh)
