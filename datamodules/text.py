"""Token streams for language-model recipes.

``TextDataModule(path=None)`` (the default) reads the Python standard library's ``.py`` sources as bytes
(vocab 256): present on every machine, no download, deterministic.  With ``path`` set it reads

* a nanoGPT-style token memmap: a ``.bin`` file (split by position) or a directory with ``train.bin`` and
  ``val.bin``; ``dtype`` uint16/uint32; vocabulary from ``vocab_size``, a ``meta.pkl`` beside it, or the max id;
* a Hugging Face dataset saved with ``save_to_disk`` (a ``Dataset``, split by position, or a ``DatasetDict`` with a
  ``train`` and a ``validation``/``test`` split), tokenised with ``tokenizer`` (a local HF tokenizer directory; no
  download) or, without one, as UTF-8 bytes.

Training draws random windows of ``seq_len + 1`` tokens: sample ``i`` of the run is a pure function of
``(seed, i)``, and the sampler restarts from the trainer's step count, so a resumed run sees exactly the batches
an uninterrupted run would.  Validation uses ``val_windows`` fixed windows ``eval_factor`` times longer than
training, for the per-position (length-extrapolation) evaluation.
"""
from __future__ import annotations

import math
import os
import pickle
import sysconfig
from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.sampling import ResumableSampler, resume_position, world_of


def stdlib_bytes(max_bytes: Optional[int] = None) -> np.ndarray:
    """The standard library's ``.py`` files (sorted by path, site-packages excluded) concatenated as bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for f in sorted(root.rglob("*.py")):
        if "site-packages" in f.parts or "dist-packages" in f.parts:
            continue
        data = f.read_bytes()
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    if not chunks:
        raise FileNotFoundError(f"no .py files under the standard library at {root}")
    out = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    return out[:max_bytes] if max_bytes is not None else out


class RandomWindows(Dataset):
    """Item ``i`` = the window of ``seq_len + 1`` tokens at a start drawn from ``(seed, i)``: ``(x, y)`` shifted by 1."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, length: int):
        self.tokens, self.seq_len, self.seed, self.length = tokens, seq_len, seed, length
        self.n_starts = len(tokens) - seq_len  # starts 0 .. len - seq_len - 1

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        start = int(np.random.default_rng([self.seed, int(i)]).integers(self.n_starts))
        w = torch.from_numpy(self.tokens[start:start + self.seq_len + 1].astype(np.int64))
        return w[:-1], w[1:]


class FixedWindows(Dataset):
    """``n`` evenly spaced windows of ``seq_len + 1`` tokens (validation)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, n: int):
        span = len(tokens) - seq_len - 1
        self.tokens, self.seq_len = tokens, seq_len
        self.starts = [int(round(j * span / max(1, n - 1))) for j in range(n)] if n > 1 else [0]

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int):
        s = self.starts[i]
        w = torch.from_numpy(self.tokens[s:s + self.seq_len + 1].astype(np.int64))
        return w[:-1], w[1:]


class TextDataModule(L.LightningDataModule):
    def __init__(
        self,
        path: Optional[str] = None,
        seq_len: int = 128,
        batch_size: int = 16,
        eval_factor: int = 4,
        val_windows: int = 16,
        val_batch_size: Optional[int] = None,
        val_fraction: float = 0.1,
        samples_per_epoch: Optional[int] = None,
        dtype: str = "uint16",
        vocab_size: Optional[int] = None,
        tokenizer: Optional[str] = None,
        text_key: str = "text",
        max_bytes: Optional[int] = None,
        seed: int = 1234,
        num_workers: int = 0,
    ):
        super().__init__()
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("eval_factor", eval_factor),
                            ("val_windows", val_windows)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{name} must be a positive integer, got {value!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        if dtype not in ("uint16", "uint32"):
            raise ValueError(f"data.dtype={dtype!r}; expected 'uint16' or 'uint32'")
        if path is not None and not os.path.exists(path):
            raise FileNotFoundError(f"data path {path!r} does not exist; expected a .bin token file, a directory "
                                    "with train.bin/val.bin, or a Hugging Face dataset saved with save_to_disk")
        if tokenizer is not None and not os.path.isdir(tokenizer):
            raise FileNotFoundError(f"tokenizer path {tokenizer!r} is not a directory; expected a local Hugging Face "
                                    "tokenizer (save_pretrained output)")
        self.save_hyperparameters()
        self.path, self.seq_len, self.batch_size, self.seed = path, seq_len, batch_size, seed
        self.eval_seq_len = seq_len * eval_factor
        self.train_tokens: Optional[np.ndarray] = None
        self.val_tokens: Optional[np.ndarray] = None
        self.vocab_size: Optional[int] = vocab_size if path is not None else 256
        if path is not None and not (self._is_hf_dataset(path) or self._memmap_files(path)):
            raise ValueError(f"data path {path!r} is neither a .bin token file, a directory with train.bin/val.bin, "
                             "nor a saved Hugging Face dataset")
        if self.vocab_size is None:
            self._load()  # the model needs the vocabulary size before it is built

    # ----------------------------------------------------------------------------------------------------------
    @staticmethod
    def _is_hf_dataset(path: str) -> bool:
        p = Path(path)
        return p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists())

    @staticmethod
    def _memmap_files(path: str):
        p = Path(path)
        if p.is_file() and p.suffix == ".bin":
            return [p]
        if p.is_dir() and (p / "train.bin").exists() and (p / "val.bin").exists():
            return [p / "train.bin", p / "val.bin"]
        return None

    def _split(self, tokens: np.ndarray):
        cut = int(len(tokens) * (1 - self.hparams.val_fraction))
        return tokens[:cut], tokens[cut:]

    def _load(self) -> None:
        if self.train_tokens is not None:
            return
        hp = self.hparams
        if self.path is None:
            self.train_tokens, self.val_tokens = self._split(stdlib_bytes(hp.max_bytes))
        elif self._is_hf_dataset(self.path):
            self._load_hf()
        else:
            files = self._memmap_files(self.path)
            arrays = [np.memmap(f, dtype=np.dtype(hp.dtype), mode="r") for f in files]
            self.train_tokens, self.val_tokens = self._split(arrays[0]) if len(arrays) == 1 else arrays
            if self.vocab_size is None:
                meta = Path(files[0]).parent / "meta.pkl"
                if meta.exists():
                    with open(meta, "rb") as fh:
                        self.vocab_size = int(pickle.load(fh)["vocab_size"])
                else:
                    self.vocab_size = int(max(a.max() for a in arrays)) + 1
        self._check_lengths()

    def _load_hf(self) -> None:
        import datasets

        hp = self.hparams
        ds = datasets.load_from_disk(self.path)
        if isinstance(ds, datasets.DatasetDict):
            val_name = next((s for s in ("validation", "val", "test") if s in ds), None)
            if "train" not in ds or val_name is None:
                raise ValueError(f"dataset at {self.path!r} has splits {list(ds)}; expected 'train' and "
                                 "'validation' (or 'val'/'test')")
            parts = [ds["train"], ds[val_name]]
        else:
            parts = [ds]
        for part in parts:
            if hp.text_key not in part.column_names:
                raise ValueError(f"dataset at {self.path!r} has no column {hp.text_key!r} (columns: "
                                 f"{part.column_names}); set data.text_key")
        encode, eos, self.vocab_size = self._encoder()
        streams = []
        for part in parts:
            ids = []
            for text in part[hp.text_key]:
                ids.extend(encode(text))
                ids.extend(eos)
            streams.append(np.asarray(ids, dtype=np.uint32 if self.vocab_size > 65535 else np.uint16))
        self.train_tokens, self.val_tokens = self._split(streams[0]) if len(streams) == 1 else streams

    def _encoder(self):
        if self.hparams.tokenizer is None:
            return (lambda text: list(text.encode("utf-8"))), [], 256
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.hparams.tokenizer, local_files_only=True)
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        return (lambda text: tok.encode(text, add_special_tokens=False)), eos, len(tok)

    def _check_lengths(self) -> None:
        need_train, need_val = self.seq_len + 2, self.eval_seq_len + 1
        if len(self.train_tokens) < need_train:
            raise ValueError(f"data.seq_len={self.seq_len} is longer than the training data "
                             f"({len(self.train_tokens)} tokens); use a shorter seq_len or more data")
        if len(self.val_tokens) < need_val:
            raise ValueError(f"validation windows of seq_len*eval_factor={self.eval_seq_len} tokens do not fit the "
                             f"validation data ({len(self.val_tokens)} tokens); lower data.eval_factor or seq_len")

    # ----------------------------------------------------------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        self._load()

    def _world(self):
        return world_of(self.trainer)

    def train_dataloader(self) -> DataLoader:
        world, rank = self._world()
        hp = self.hparams
        per_epoch = hp.samples_per_epoch or max(1, len(self.train_tokens) // self.seq_len)
        batches = max(1, per_epoch // (self.batch_size * world))
        trainer = self.trainer
        epochs = (trainer.max_epochs if trainer is not None and trainer.max_epochs not in (None, -1) else None)
        if epochs is None and trainer is not None and trainer.max_steps > 0:
            epochs = math.ceil(trainer.max_steps * trainer.accumulate_grad_batches / batches)
        length = (epochs or 1) * batches * self.batch_size * world
        start_epoch, consumed = resume_position(trainer, batches)  # resume: skip what was already consumed
        skip = consumed * self.batch_size
        dataset = RandomWindows(self.train_tokens, self.seq_len, self.seed, length)
        sampler = ResumableSampler(dataset, world, rank, batches * self.batch_size, skip, start_epoch)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          num_workers=hp.num_workers, persistent_workers=hp.num_workers > 0)

    def test_dataloader(self) -> DataLoader:
        """The validation windows (the recipes hold no separate test split)."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """Prompts: the first ``seq_len`` tokens of each validation window."""
        ds = FixedWindows(self.val_tokens, self.seq_len - 1, self.hparams.val_windows)
        return DataLoader(ds, batch_size=self.hparams.val_batch_size or self.batch_size)

    def val_dataloader(self) -> DataLoader:
        hp = self.hparams
        ds = FixedWindows(self.val_tokens, self.eval_seq_len, hp.val_windows)
        world, rank = self._world()
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
        return DataLoader(ds, batch_size=hp.val_batch_size or max(1, self.batch_size // hp.eval_factor),
                          sampler=sampler, num_workers=hp.num_workers)
