"""Token streams for language-model recipes.

``TextDataModule(path=None)`` (the default) reads the Python standard library's ``.py`` sources as bytes
(vocab 256): present on every machine, no download, deterministic.  With ``path`` set it reads

* a nanoGPT-style token memmap: a ``.bin`` file (split by position) or a directory with ``train.bin`` and
  ``val.bin``; ``dtype`` uint16/uint32; vocabulary from ``vocab_size``, a ``meta.pkl`` beside it, or the max id;
* a Hugging Face dataset saved with ``save_to_disk`` (a ``Dataset``, split by position, or a ``DatasetDict`` with a
  ``train`` and a ``validation``/``test`` split), tokenised with ``tokenizer`` (a local HF tokenizer directory; no
  download) or, without one, as UTF-8 bytes.

The datamodule decides the vocabulary (its tokenizer, ``meta.pkl``, ``vocab_size`` or the largest id) and the model
takes it from there.

Documents (``documents``): ``stream`` (default) draws windows anywhere in the token stream.  ``aligned`` starts
every training window at a document start (or a ``seq_len`` chunk of a long document) with BOS at position 0, the FoX
paper's protocol; ``packed`` fills each window with whole documents kept apart by segment ids (attention never
crosses a boundary; see ``datamodules.text_documents``).  Document starts come from the data: the stdlib files,
the rows of a Hugging Face dataset (a text column, or pre-tokenised ``input_ids`` arrays), or ``doc_sep_id`` in a
token file.  BOS is ``bos_id``, else the tokenizer's (bytes: a new id 256, vocab 257), else ``doc_sep_id``.

Training draws random windows of ``seq_len + 1`` tokens: sample ``i`` of the run is a pure function of
``(seed, i)``, and the sampler restarts from the trainer's step count, so a resumed run sees exactly the batches
an uninterrupted run would.  Validation uses ``val_windows`` fixed windows ``eval_factor`` times longer than
training, for the per-position (length-extrapolation) evaluation (with documents: from document starts).

Prediction (``predict``): ``prompts`` (a file, see ``datamodules.prompts``) encoded with the same tokenizer and
batched with left padding; without it, the start of each validation window.
"""
from __future__ import annotations

import math
import os
import sysconfig
from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.prompts import PromptDataset, collate_prompts, read_prompts
from datamodules.sampling import ResumableSampler, resume_position, world_of
from datamodules.text_documents import DocumentStarts, DocumentWindows, split_starts, starts_from_separator
from datamodules.text_tokenizers import ByteTokenizer, CharTokenizer, HFTokenizer, char_meta

DOCUMENT_MODES = ("stream", "aligned", "packed")


def stdlib_bytes(max_bytes: Optional[int] = None, with_starts: bool = False):
    """The standard library's ``.py`` files (sorted by path, site-packages excluded) concatenated as bytes (and, with
    ``with_starts``, the offset where each file starts: the documents)."""
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
    out = out[:max_bytes] if max_bytes is not None else out
    if not with_starts:
        return out
    starts = np.cumsum([0] + [len(c) for c in chunks[:-1]]).astype(np.int64)
    return out, starts[starts < len(out)]


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
        documents: str = "stream",
        doc_sep_id: Optional[int] = None,
        bos_id: Optional[int] = None,
        prompts: Optional[str] = None,
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
        if documents not in DOCUMENT_MODES:
            raise ValueError(f"data.documents={documents!r}; expected one of {', '.join(DOCUMENT_MODES)}")
        # Not merged into the model's hparams for logging: the model's vocab_size means "embedding rows, None = from
        # the data" and may differ from this one on purpose.  Both are in the saved config.yaml.
        self.save_hyperparameters(logger=False)
        self.path, self.seq_len, self.batch_size, self.seed = path, seq_len, batch_size, seed
        self.eval_seq_len = seq_len * eval_factor
        self.train_tokens: Optional[np.ndarray] = None
        self.val_tokens: Optional[np.ndarray] = None
        self.train_starts: Optional[np.ndarray] = None  # document starts, when the data has documents
        self.val_starts: Optional[np.ndarray] = None
        if path is not None and not (self._is_hf_dataset(path) or self._memmap_files(path)):
            raise ValueError(f"data path {path!r} is neither a .bin token file, a directory with train.bin/val.bin, "
                             "nor a saved Hugging Face dataset")
        self.prompt_texts = read_prompts(prompts) if prompts is not None else None
        self.tokenizer = self._tokenizer()
        self.vocab_size: Optional[int] = self.tokenizer.vocab_size if self.tokenizer is not None else vocab_size
        if self.vocab_size is None:
            self._load()  # the model needs the vocabulary size before it is built
        self.bos_id = self._bos_id()
        if self.prompt_texts is not None:
            if self.tokenizer is None:
                raise ValueError("data.prompts needs a tokenizer to encode the prompts: set data.tokenizer (a local "
                                 "Hugging Face tokenizer folder) or put nanoGPT's meta.pkl beside the token file")
            for text in self.prompt_texts:
                self.tokenizer.encode(text)  # a character outside the vocabulary fails here, in one line

    # ----------------------------------------------------------------------------------------------------------
    def _tokenizer(self):
        hp = self.hparams
        if hp.tokenizer is not None:
            return HFTokenizer(hp.tokenizer)
        if self.path is not None and self._is_hf_dataset(self.path) and self._pretokenised(self.path):
            return None  # per-document token arrays: vocabulary from vocab_size or the largest id
        if self.path is None or self._is_hf_dataset(self.path):
            return ByteTokenizer(with_bos=hp.documents != "stream" and hp.bos_id is None)
        meta = char_meta(Path(self._memmap_files(self.path)[0]).parent)
        return CharTokenizer(meta) if meta and "stoi" in meta and "itos" in meta else None

    def _bos_id(self) -> Optional[int]:
        hp = self.hparams
        bos = hp.bos_id
        if bos is None and self.tokenizer is not None:
            bos = self.tokenizer.bos_id
        if bos is None:
            bos = hp.doc_sep_id
        if hp.documents != "stream" and bos is None:
            raise ValueError(f"data.documents={hp.documents!r} puts BOS at every document start; set data.bos_id "
                             "(this data's tokenizer has none)")
        if bos is not None and self.vocab_size is not None and not 0 <= bos < self.vocab_size:
            raise ValueError(f"data.bos_id={bos} is outside the vocabulary [0, {self.vocab_size})")
        return bos

    @property
    def eos_id(self) -> Optional[int]:
        return None if self.tokenizer is None else self.tokenizer.eos_id

    def encode(self, text: str):
        return self.tokenizer.encode(text)

    def decode(self, ids) -> str:
        """Text of token ids (the ids themselves, space-separated, for a token file without a tokenizer)."""
        if self.tokenizer is None:
            return " ".join(str(int(i)) for i in ids)
        return self.tokenizer.decode(ids)

    # ----------------------------------------------------------------------------------------------------------
    @staticmethod
    def _is_hf_dataset(path: str) -> bool:
        p = Path(path)
        return p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists())

    def _pretokenised(self, path: str) -> bool:
        """A saved dataset of per-document ``input_ids`` arrays (and no text column)."""
        import datasets

        ds = datasets.load_from_disk(path)
        part = ds[next(iter(ds))] if isinstance(ds, datasets.DatasetDict) else ds
        return "input_ids" in part.column_names and self.hparams.text_key not in part.column_names

    @staticmethod
    def _memmap_files(path: str):
        p = Path(path)
        if p.is_file() and p.suffix == ".bin":
            return [p]
        if p.is_dir() and (p / "train.bin").exists() and (p / "val.bin").exists():
            return [p / "train.bin", p / "val.bin"]
        return None

    def _split(self, tokens: np.ndarray, starts: Optional[np.ndarray] = None):
        cut = int(len(tokens) * (1 - self.hparams.val_fraction))
        if starts is not None:
            self.train_starts, self.val_starts = split_starts(starts, cut)
        return tokens[:cut], tokens[cut:]

    def _load(self) -> None:
        if self.train_tokens is not None:
            return
        hp = self.hparams
        if self.path is None:
            tokens, starts = stdlib_bytes(hp.max_bytes, with_starts=True)
            self.train_tokens, self.val_tokens = self._split(tokens, starts)
        elif self._is_hf_dataset(self.path):
            self._load_hf()
        else:
            files = self._memmap_files(self.path)
            arrays = [np.memmap(f, dtype=np.dtype(hp.dtype), mode="r") for f in files]
            if len(arrays) == 1:
                starts = None if hp.doc_sep_id is None else starts_from_separator(arrays[0], hp.doc_sep_id)
                self.train_tokens, self.val_tokens = self._split(arrays[0], starts)
            else:
                self.train_tokens, self.val_tokens = arrays
                if hp.doc_sep_id is not None:
                    self.train_starts, self.val_starts = (starts_from_separator(a, hp.doc_sep_id) for a in arrays)
            if self.vocab_size is None:
                meta = char_meta(Path(files[0]).parent)
                self.vocab_size = (int(meta["vocab_size"]) if meta else int(max(a.max() for a in arrays)) + 1)
        if hp.documents != "stream" and self.train_starts is None:
            raise ValueError(f"data.documents={hp.documents!r} needs document boundaries: set data.doc_sep_id (the "
                             "id that ends every document in the token file)")
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
        pretokenised = self.tokenizer is None
        for part in parts:
            if not pretokenised and hp.text_key not in part.column_names:
                raise ValueError(f"dataset at {self.path!r} has no column {hp.text_key!r} (columns: "
                                 f"{part.column_names}); set data.text_key, or give per-document 'input_ids'")
        eos = [] if self.eos_id is None else [self.eos_id]
        streams, all_starts = [], []
        for part in parts:
            docs = part["input_ids"] if pretokenised else (self.tokenizer.encode(t) + eos for t in part[hp.text_key])
            ids, starts = [], []
            for doc in docs:  # each row is a document
                starts.append(len(ids))
                ids.extend(int(i) for i in doc)
            if pretokenised and self.vocab_size is None:
                self.vocab_size = max(ids) + 1
            streams.append(np.asarray(ids, dtype=np.uint32 if max(ids, default=0) > 65535 else np.uint16))
            all_starts.append(np.asarray(starts, dtype=np.int64))
        if len(streams) == 1:
            self.train_tokens, self.val_tokens = self._split(streams[0], all_starts[0])
        else:
            (self.train_tokens, self.val_tokens), (self.train_starts, self.val_starts) = streams, all_starts

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
        if hp.documents == "stream":
            dataset = RandomWindows(self.train_tokens, self.seq_len, self.seed, length)
        else:
            dataset = DocumentWindows(self.train_tokens, self.train_starts, self.seq_len, self.bos_id, self.seed,
                                      length, packed=hp.documents == "packed")
        sampler = ResumableSampler(dataset, world, rank, batches * self.batch_size, skip, start_epoch)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          num_workers=hp.num_workers, persistent_workers=hp.num_workers > 0)

    def test_dataloader(self) -> DataLoader:
        """The validation windows (the recipes hold no separate test split)."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """Prompts from ``prompts`` (encoded with the data's tokenizer, BOS first with documents), else the first
        ``seq_len // 2`` tokens of each validation window; batches are left-padded (``datamodules.prompts``)."""
        hp = self.hparams
        bos = self.bos_id if hp.documents != "stream" else None
        if self.prompt_texts is not None:
            ds = PromptDataset(self.prompt_texts, self.encode, bos)
        else:
            self._load()
            windows = FixedWindows(self.val_tokens, max(1, self.seq_len // 2) - 1, hp.val_windows)
            ds = PromptDataset.from_ids([torch.cat([x, y[-1:]]).tolist() for x, y in windows], self.decode)
        return DataLoader(ds, batch_size=hp.val_batch_size or self.batch_size, collate_fn=collate_prompts)

    def val_dataloader(self) -> DataLoader:
        hp = self.hparams
        if hp.documents == "stream":
            ds = FixedWindows(self.val_tokens, self.eval_seq_len, hp.val_windows)
        else:
            ds = DocumentStarts(self.val_tokens, self.val_starts, self.eval_seq_len, self.bos_id, hp.val_windows)
        world, rank = self._world()
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
        return DataLoader(ds, batch_size=hp.val_batch_size or max(1, self.batch_size // hp.eval_factor),
                          sampler=sampler, num_workers=hp.num_workers)
