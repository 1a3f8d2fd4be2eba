"""Online RLHF data as a LightningDataModule: the learner's side of the actor (``datamodules.rlhf_actor``).

The training loader yields the actor's batches in order; the module pulls them itself (``training_step(self,
dataloader_iter)``), so nothing is fetched ahead.  Before batch ``t`` is fetched the policy's weights are published as
version ``t`` (= ``trainer.global_step``, the updates so far) if a batch needs them.  ``steps_per_epoch`` updates
make an epoch (validation runs after each); ``trainer.max_steps`` or ``max_epochs`` sets the run length.

Settings: ``sync`` (every batch from the current policy), ``staleness`` ``L >= 1`` (asynchronous: batch ``t`` from
``theta_{t-L}``, the actor generating while the learner trains), ``num_mini_batches`` ``M`` (the paper's
off-policyness ``N``: ``M`` batches from one policy, then ``M`` updates).  ``prompts``: ``toy`` (embedded),
``jsonl`` (``train_path`` / ``val_path``) or ``hf_disk`` (``train_path``: a ``save_to_disk`` folder with the train and
validation splits).  ``tokenizer``: a local Hugging Face tokenizer folder (file prompts only).

Validation yields held-out prompts (the toy's are fixed by the seed; file prompts: the validation split), with their
reference responses where the data has them.  The checkpoint holds the batches in flight (made from policy
versions older than the saved step), so a resumed run trains on exactly what an uninterrupted one would.
"""
from __future__ import annotations

import atexit
import os
from typing import Dict, List, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from datamodules.env_side import _Items
from datamodules.rlhf_actor import Actor, PromptSampler, Schedule
from datamodules.sampling import world_of
from datamodules.rlhf_prompts import (PromptSet, check_text_source, encode_rows, left_pad, read_hf_disk, read_jsonl, right_pad,
                                      toy_prompts)

PROMPT_SOURCES = ("toy", "jsonl", "hf_disk")


class _Updates(IterableDataset):
    """The rest of the epoch's batches; its length (read by Lightning at every epoch start) tells the loop where the
    epoch ends, so validation runs after its last update, a resumed epoch included."""

    def __init__(self, dm: "RLHFDataModule"):
        self.dm = dm

    def _range(self) -> range:
        per_epoch, step = self.dm.hparams.steps_per_epoch, self.dm.trainer.global_step
        return range(step, (step // per_epoch + 1) * per_epoch)

    def __len__(self) -> int:
        return len(self._range())

    def __iter__(self):
        for _ in self._range():
            yield self.dm.next_batch()


class RLHFDataModule(L.LightningDataModule):
    def __init__(self, prompts: str = "toy", train_path: Optional[str] = None, val_path: Optional[str] = None,
                 tokenizer: Optional[str] = None, prompt_column: str = "query",
                 reference_column: Optional[str] = "reference_response", max_prompt_tokens: int = 512,
                 batch_size: int = 64, sync: bool = False, staleness: int = 1, num_mini_batches: int = 1,
                 steps_per_epoch: int = 100, eval_prompts: int = 512, eval_batch_size: int = 512,
                 actor_device: str = "cpu", actor_threads: int = 1, seed: Optional[int] = None):
        super().__init__()
        if prompts not in PROMPT_SOURCES:
            raise ValueError(f"data.prompts={prompts!r}; expected one of {', '.join(PROMPT_SOURCES)}")
        for name, value in (("staleness", staleness), ("num_mini_batches", num_mini_batches),
                            ("batch_size", batch_size), ("steps_per_epoch", steps_per_epoch),
                            ("eval_batch_size", eval_batch_size)):
            if int(value) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}")
        check_text_source("prompts", prompts, train_path, tokenizer)
        self.save_hyperparameters()
        self.seed = int(seed) if seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        self.schedule = Schedule(0 if sync else int(staleness), int(num_mini_batches))
        self.tokenizer = None
        if tokenizer:
            from datamodules.text_tokenizers import HFTokenizer

            self.tokenizer = HFTokenizer(tokenizer)
        self.eos_id = self.tokenizer.eos_id if self.tokenizer else None
        pad = getattr(getattr(self.tokenizer, "tok", None), "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else (self.eos_id if self.eos_id is not None else 0))
        self.train_set: Optional[PromptSet] = None
        self.val_set: Optional[PromptSet] = None
        self.actor: Optional[Actor] = None
        self._pending: List[List[dict]] = []  # per rank, from a checkpoint
        atexit.register(self.close)

    # ------------------------------------------------------------------ data
    def _read(self, split: str) -> Optional[PromptSet]:
        hp = self.hparams
        if hp.prompts == "jsonl":
            path = hp.train_path if split == "train" else hp.val_path
            rows = read_jsonl(path) if path else None
        else:
            rows = read_hf_disk(hp.train_path, split, hp.prompt_column, hp.reference_column)
        return None if rows is None else encode_rows(rows, self.tokenizer, hp.max_prompt_tokens)

    def setup(self, stage: str) -> None:
        if self.hparams.prompts != "toy" and self.train_set is None:
            self.train_set = self._read("train")
            self.val_set = self._read("validation")

    @property
    def rank_seed(self) -> int:
        """The seed of this rank's prompts and samples (rank 0: the run's seed)."""
        _, rank = world_of(getattr(self, "trainer", None))
        return self.seed + 1_000_003 * rank

    def sampler(self) -> PromptSampler:
        return PromptSampler(self.hparams.batch_size, self.rank_seed, self.train_set, self.pad_id)

    def prompts_for_reward_model(self, n: int) -> Dict[str, torch.Tensor]:
        """``n`` training prompts (apart from those the run trains on first) to label pairs for a proxy reward
        model."""
        if self.train_set is None:
            tokens = toy_prompts(n, seed=self.seed + 7_000_003)  # the same on every rank: one proxy model
            return {"prompts": tokens, "prompt_mask": torch.ones_like(tokens, dtype=torch.float32)}
        ids = [self.train_set.prompts[i % len(self.train_set)] for i in range(n)]
        tokens, mask = left_pad(ids, self.pad_id)
        return {"prompts": tokens, "prompt_mask": mask}

    # ------------------------------------------------------------------ the actor
    @property
    def learner(self):
        return self.trainer.lightning_module

    def _start_actor(self) -> Actor:
        module, step = self.learner, self.trainer.global_step
        n_params = sum(p.numel() for p in module.policy.parameters())
        world, rank = world_of(self.trainer)
        pending = self._pending[rank] if self._pending else []
        if self._pending and len(self._pending) != world:
            raise ValueError(f"the checkpoint holds the batches in flight of {len(self._pending)} processes, this run "
                             f"has {world} (resume with the same number of devices)")
        self.actor = Actor(module.generator_spec(self.hparams.actor_device, self.eos_id, self.pad_id), self.sampler(),
                           self.schedule, n_params, seed=self.rank_seed, start_batch=step + len(pending),
                           pending=pending, threads=self.hparams.actor_threads).start()
        self._pending = []
        return self.actor

    def next_batch(self) -> dict:
        actor = self.actor or self._start_actor()
        module = self.learner
        actor.publish(torch.nn.utils.parameters_to_vector(module.policy.parameters()), self.trainer.global_step)
        return actor.next_batch()

    def close(self) -> None:
        if self.actor is not None:
            self.actor.close()
            self.actor = None

    def teardown(self, stage: str) -> None:  # the actor process ends with the run
        self.close()

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Updates(self), batch_size=None, num_workers=0)

    def eval_batches(self) -> List[dict]:
        hp = self.hparams
        if self.val_set is None and hp.prompts != "toy":
            return []
        if self.val_set is None:
            tokens = toy_prompts(hp.eval_prompts, seed=self.seed + 1_000_003)
            sets = [{"prompts": tokens, "prompt_mask": torch.ones_like(tokens, dtype=torch.float32)}]
            return [{k: v[i:i + hp.eval_batch_size] for k, v in sets[0].items()}
                    for i in range(0, hp.eval_prompts, hp.eval_batch_size)]
        n = min(hp.eval_prompts, len(self.val_set))
        out = []
        for i in range(0, n, hp.eval_batch_size):
            rows = range(i, min(n, i + hp.eval_batch_size))
            tokens, mask = left_pad([self.val_set.prompts[j] for j in rows], self.pad_id)
            batch = {"prompts": tokens, "prompt_mask": mask}
            if self.val_set.references is not None:
                refs = [self.val_set.references[j] for j in rows]
                batch["references"], batch["reference_mask"] = right_pad(refs, max(len(r) for r in refs),
                                                                         self.pad_id)
            out.append(batch)
        return out

    def val_dataloader(self):
        if not self.hparams.eval_prompts:
            return []
        return DataLoader(_Items(self.eval_batches), batch_size=None, num_workers=0)

    def test_dataloader(self):
        return self.val_dataloader()

    def predict_dataloader(self):
        return DataLoader(_Items(self.eval_batches), batch_size=None, num_workers=0)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> Dict[str, object]:
        """Every rank's batches in flight (made from versions older than the saved step)."""
        if self.actor is None:
            return {"ranks": list(self._pending)}
        pending = self.actor.drain(self.trainer.global_step)
        world, _ = world_of(self.trainer)
        if world > 1:
            gathered: List[Optional[list]] = [None] * world
            torch.distributed.all_gather_object(gathered, pending)
            return {"ranks": gathered}
        return {"ranks": [pending]}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self._pending = [list(p) for p in state.get("ranks", [])]
