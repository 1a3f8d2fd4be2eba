"""FoX language model as a LightningModule (FoX, Transformer-RoPE, Transformer-NoPE and gate ablations by flags).

Training: next-token cross-entropy on ``seq_len`` windows.  Validation runs on windows ``eval_factor`` times longer
than training (from the datamodule) and gives

* ``val/loss``: the loss on positions ``[0, T_train)`` (in-length), the number to monitor;
* ``val/loss_{a}_{b}``: the loss on each position bin, the paper's per-token-loss analysis scaled down
  (bins ``[0, T/2), [T/2, T), [T, 2T), [2T, 4T), ...``);
* ``gates/*``: per layer and head, mean ``log f``, fraction of tokens with ``f > 0.9`` and the decay time
  ``-1 / mean log f`` on in-length validation tokens.

``self.analysis`` keeps the full curves for ``callbacks.fox_report.FoXReport``, which writes PNG + CSV.  With
document batches ``(x, y, segment_ids)`` attention stays inside each document, padded targets (``-100``) are not
trained, and positions count from each document's start.

Sizes decided by the data (the vocabulary, the training length) are taken from the datamodule when the model is
built and recorded in the checkpoint (``checkpoint["fox_lm"]``), never written back into the init arguments, so the
hyperparameters of a checkpoint are what the user passed.  ``ARCHITECTURE`` names the init arguments that shape the
state dict: with a checkpoint file the CLI takes those from the checkpoint and everything else (optimisation,
attention backend, generation settings) from the command line.

``predict`` generates: each batch of left-padded prompts is continued with ``layers.generation`` (greedy at
``temperature=0``, else transformers' temperature / top-k / top-p warpers, seeded, stopping at the tokenizer's EOS)
and decoded with the datamodule's tokenizer; ``callbacks.text_generation.CompletionWriter`` writes the JSONL.
"""
from __future__ import annotations

import math
import os
from typing import List, Literal, Optional, Tuple

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import Metric

from lightning_modules.fox_model import FoXConfig, FoXTransformer
from lightning_modules.layers.forgetting_attention import segment_starts
from lightning_modules.layers.generation import SamplingConfig, generate

IGNORE_INDEX = -100


class PositionalLoss(Metric):
    """Sum and count of the per-token loss at every position (DDP-reduced by torchmetrics)."""

    full_state_update = False

    def __init__(self, length: int):
        super().__init__()
        self.add_state("total", torch.zeros(length, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(length, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, token_loss: torch.Tensor, positions: Optional[torch.Tensor] = None,
               valid: Optional[torch.Tensor] = None) -> None:
        """``token_loss`` ``(B, T)``; ``positions``: each token's index in its document (default: in the window);
        ``valid``: which targets count (default: all)."""
        if positions is None and valid is None:
            t = token_loss.shape[1]
            self.total[:t] += token_loss.detach().double().sum(0)
            self.count[:t] += token_loss.shape[0]
            return
        if positions is None:
            positions = torch.arange(token_loss.shape[1], device=token_loss.device).expand_as(token_loss)
        keep = (positions < self.total.shape[0]) if valid is None else valid & (positions < self.total.shape[0])
        pos = positions[keep]
        self.total.index_add_(0, pos, token_loss.detach().double()[keep])
        self.count.index_add_(0, pos, torch.ones_like(pos, dtype=torch.float64))

    def compute(self) -> torch.Tensor:
        return self.total / self.count.clamp_min(1)


class GateStats(Metric):
    """Per layer x head: sum of log f, count of f > 0.9, token count."""

    full_state_update = False

    def __init__(self, n_layers: int, n_heads: int):
        super().__init__()
        self.add_state("sum_log_f", torch.zeros(n_layers, n_heads, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_open", torch.zeros(n_layers, n_heads, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, log_fs: List[torch.Tensor], keep: Optional[torch.Tensor] = None) -> None:
        """``log_fs``: per layer ``(B, T, H)``; ``keep``: ``(B, T)`` tokens to count (default: all)."""
        stacked = torch.stack([lf.double() for lf in log_fs])  # (L, B, T, H)
        w = torch.ones(stacked.shape[1:3], dtype=torch.float64, device=stacked.device) if keep is None \
            else keep.double()
        self.sum_log_f += (stacked * w[None, :, :, None]).sum((1, 2))
        self.n_open += ((stacked > math.log(0.9)).double() * w[None, :, :, None]).sum((1, 2))
        self.n += w.sum()

    def compute(self):
        mean = self.sum_log_f / self.n.clamp_min(1)
        return {"mean_log_f": mean, "frac_f_gt_0.9": self.n_open / self.n.clamp_min(1),
                "decay_time": -1.0 / mean.clamp_max(-1e-12)}


def position_bins(train_len: int, eval_len: int) -> List[Tuple[int, int]]:
    """``[0, T/2), [T/2, T), [T, 2T), [2T, 4T), ...`` clipped to ``eval_len``."""
    bins = [(0, max(1, train_len // 2)), (max(1, train_len // 2), train_len)] if train_len > 1 else [(0, 1)]
    lo = train_len
    while lo < eval_len:
        hi = min(2 * lo, eval_len)
        bins.append((lo, hi))
        lo = hi
    return [(a, b) for a, b in bins if a < b <= eval_len]


class FoXLM(L.LightningModule):
    """Forgetting Transformer LM.  Sizes left ``None`` (``vocab_size``, ``train_seq_len``) come from the datamodule."""

    def __init__(
        self,
        vocab_size: Optional[int] = None,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        block: Literal["llama", "pro"] = "llama",
        hidden_ratio: Optional[float] = None,
        mlp_multiple_of: int = 256,
        fgate: Literal["full", "bias_only", "fixed", "none"] = "full",
        fgate_bias_init: Optional[List[float]] = None,
        rope: bool = False,
        rope_base: float = 10000.0,
        qk_norm_share_across_heads: bool = False,
        init_std: float = 0.02,
        attn_backend: Literal["auto", "dense", "blockwise", "flex", "fla"] = "auto",
        attn_block_size: int = 256,
        activation_checkpointing: bool = False,
        lr: float = 3e-3,
        betas: Tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.1,
        warmup: float = 0.1,
        min_lr_ratio: float = 0.0,
        train_seq_len: Optional[int] = None,
        max_new_tokens: int = 64,
        temperature: float = 0.8,
        top_k: Optional[int] = None,
        top_p: float = 1.0,
        sample_seed: int = 0,
        init_from: Optional[str] = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.sampling = SamplingConfig(max_new_tokens, temperature, top_k, top_p, sample_seed)  # checks the values
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0 (a fraction of training if < 1, else steps), got {warmup}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.model: Optional[FoXTransformer] = None
        self.analysis: dict = {}
        self.vocab_size: Optional[int] = None  # the size the network was built with
        self.train_seq_len: Optional[int] = train_seq_len
        if vocab_size is not None:  # otherwise built in configure_model once the datamodule is known
            self._build(vocab_size)

    #: the init arguments that shape the network's state dict (see the module docstring)
    ARCHITECTURE = ("vocab_size", "d_model", "n_layers", "n_heads", "block", "hidden_ratio", "mlp_multiple_of",
                    "fgate", "rope", "rope_base", "qk_norm_share_across_heads", "train_seq_len")

    # ---------------------------------------------------------------------------------------------------------
    def _config(self, vocab_size: int) -> FoXConfig:
        hp = self.hparams
        return FoXConfig(
            vocab_size=vocab_size, d_model=hp.d_model, n_layers=hp.n_layers, n_heads=hp.n_heads, block=hp.block,
            hidden_ratio=hp.hidden_ratio, mlp_multiple_of=hp.mlp_multiple_of, fgate=hp.fgate,
            fgate_bias_init=hp.fgate_bias_init, rope=hp.rope, rope_base=hp.rope_base,
            qk_norm_share_across_heads=hp.qk_norm_share_across_heads, init_std=hp.init_std,
            attn_backend=hp.attn_backend, attn_block_size=hp.attn_block_size)

    def _build(self, vocab_size: int) -> None:
        self.model = FoXTransformer(self._config(vocab_size))
        self.model.activation_checkpointing = self.hparams.activation_checkpointing
        self.vocab_size = vocab_size

    def _datamodule_value(self, name: str):
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(dm, name, None)

    def configure_model(self) -> None:
        dm_vocab = self._datamodule_value("vocab_size")
        if self.model is None:
            if self._trainer is None:  # FoXLM.load_from_checkpoint: built from the checkpoint's record next
                return
            if dm_vocab is None:
                raise ValueError("model.vocab_size is unset and the datamodule does not provide vocab_size")
            self._build(int(dm_vocab))
        if dm_vocab is not None and dm_vocab > self.vocab_size:
            raise ValueError(f"model.vocab_size={self.vocab_size} is smaller than the data's vocabulary "
                             f"(data vocab_size {dm_vocab}); set it to >= {dm_vocab} or leave it unset")
        if self.train_seq_len is None:
            self.train_seq_len = self._datamodule_value("seq_len")

        if self.hparams.init_from and not getattr(self, "_initialised_from", None):
            self._load_weights(self.hparams.init_from)

    def _load_weights(self, path: str) -> None:
        """Start from the weights of a FoX checkpoint (fine-tuning: optimizer, schedule and step start fresh)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model.init_from {path!r} does not exist; expected a FoX LM checkpoint file")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        self.on_load_checkpoint(checkpoint)
        self.load_state_dict(checkpoint["state_dict"])
        self._initialised_from = path

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["fox_lm"] = {"vocab_size": self.vocab_size, "train_seq_len": self.train_seq_len}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Build (or check) the network from the sizes the checkpoint was trained with."""
        keys = checkpoint.get("state_dict", {})
        if keys and not any(k.startswith("model.blocks.") for k in keys):
            raise ValueError(f"the checkpoint holds no FoX LM weights (its first keys: {', '.join(list(keys)[:3])}); "
                             "pass a checkpoint written by a FoX recipe or converted with "
                             "scripts/convert_fox_checkpoint.py")
        facts = checkpoint.get("fox_lm") or {"vocab_size": checkpoint.get("hyper_parameters", {}).get("vocab_size"),
                                             "train_seq_len": checkpoint.get("hyper_parameters", {})
                                             .get("train_seq_len")}
        vocab = facts.get("vocab_size")
        if vocab is not None:
            data_vocab = self._datamodule_value("vocab_size")
            if data_vocab is not None and data_vocab > vocab:
                raise ValueError(f"the checkpoint's model has a vocabulary of {vocab} tokens but this run's data has "
                                 f"{data_vocab} (data vocab_size / tokenizer); evaluate it on data with the tokenizer "
                                 "it was trained with")
            if self.model is None or self.vocab_size != vocab:  # the checkpoint's size (>= the data's)
                self._build(int(vocab))
        if facts.get("train_seq_len") is not None and self.hparams.train_seq_len is None:
            self.train_seq_len = int(facts["train_seq_len"])

    def forward(self, idx: torch.Tensor, segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.model(idx, segment_ids=segment_ids)

    # ---------------------------------------------------------------------------------------------------------
    @staticmethod
    def _unpack(batch):
        """``(x, y)`` (a token stream) or ``(x, y, segment_ids)`` (documents)."""
        return (batch[0], batch[1], batch[2] if len(batch) > 2 else None)

    def token_losses(self, x: torch.Tensor, y: torch.Tensor, segment_ids: Optional[torch.Tensor] = None):
        logits = self.model(x, segment_ids=segment_ids)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none",
                               ignore_index=IGNORE_INDEX).view_as(y)

    def training_step(self, batch, batch_idx):
        x, y, seg = self._unpack(batch)
        tok = self.token_losses(x, y, seg)
        loss = tok.mean() if seg is None else tok.sum() / (y != IGNORE_INDEX).sum().clamp_min(1)
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._start_eval()

    def on_test_epoch_start(self) -> None:
        self._start_eval()

    def _network_device(self) -> torch.device:
        """Where the network's parameters are.  Not ``self.device``: under FSDP (the large recipes' ``BlockFSDP``)
        torch moves the parameters but never calls the module's ``.to``, so Lightning's ``self.device`` stays CPU."""
        return next(self.model.parameters()).device

    def _start_eval(self) -> None:
        eval_len = self._datamodule_value("eval_seq_len") or self.train_seq_len
        if eval_len is None:
            raise ValueError("cannot size the per-position evaluation: set model.train_seq_len or use a datamodule "
                             "with seq_len / eval_seq_len")
        cfg = self.model.cfg
        device = self._network_device()
        self.pos_loss = PositionalLoss(int(eval_len)).to(device)
        self.gate_stats = GateStats(cfg.n_layers, cfg.n_heads).to(device)
        for blk in self.model.blocks:
            blk.attn.record_gates = cfg.fgate != "none"

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def _eval_step(self, batch, split: str) -> None:
        x, y, seg = self._unpack(batch)
        train_len = self.train_seq_len or x.shape[1]
        tok = self.token_losses(x, y, seg)
        if seg is None:
            self.pos_loss.update(tok)
            in_length = tok[:, :train_len].mean()
            keep = None
            gates = [blk.attn.last_log_f[:, :train_len] for blk in self.model.blocks] \
                if self.model.cfg.fgate != "none" else None
        else:  # positions from each document's start; padding not counted
            positions = torch.arange(x.shape[1], device=x.device) - segment_starts(seg)
            valid = y != IGNORE_INDEX
            self.pos_loss.update(tok, positions, valid)
            keep = valid & (positions < train_len)
            in_length = (tok * keep).sum() / keep.sum().clamp_min(1)
            gates = [blk.attn.last_log_f for blk in self.model.blocks] if self.model.cfg.fgate != "none" else None
        self.log(f"{split}/loss", in_length, prog_bar=True, sync_dist=True, batch_size=x.shape[0])
        if gates is not None:
            self.gate_stats.update(gates, keep)

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")

    def predict_step(self, batch, batch_idx):
        """Continue each prompt of a left-padded batch (``datamodules.prompts.collate_prompts``); returns one record
        per prompt: ``index, prompt, completion, tokens, seconds`` (the batch's generation time) and the new ids."""
        import time

        if not isinstance(batch, dict) or "tokens" not in batch:
            raise ValueError("FoXLM.predict_step needs prompt batches ({'tokens', 'segment_ids', ...}) from a text "
                             "datamodule's predict_dataloader")
        # the prompts' device (Lightning moved the batch there), not self.device, which is CPU under FSDP
        generator = torch.Generator(device=batch["tokens"].device).manual_seed(self.sampling.seed * 1_000_003
                                                                                 + batch_idx)
        eos = self._datamodule_value("eos_id")
        start = time.perf_counter()
        new = generate(self.model.generation_step, batch["tokens"], batch["segment_ids"], self.sampling,
                       eos_id=eos, generator=generator)
        seconds = time.perf_counter() - start
        dm = self._trainer.datamodule if self._trainer is not None else None
        decode = getattr(dm, "decode", None) or (lambda ids: " ".join(map(str, ids)))
        return [{"index": int(i), "prompt": p, "completion": decode(ids), "tokens": len(ids),
                 "seconds": round(seconds, 4), "token_ids": ids}
                for i, p, ids in zip(batch["index"].tolist(), batch["prompt"], new)]

    def _end_eval(self, split: str) -> None:
        for blk in self.model.blocks:
            blk.attn.record_gates, blk.attn.last_log_f = False, None
        curve = self.pos_loss.compute()
        have = int((self.pos_loss.count > 0).sum())
        train_len = self.train_seq_len or have
        bins = position_bins(train_len, have)
        for a, b in bins:
            self.log(f"{split}/loss_{a}_{b}", curve[a:b].mean().float(), sync_dist=False)
        cfg = self.model.cfg
        label = f"{'FoX' if cfg.fgate != 'none' else 'Transformer'} ({cfg.block}, gate={cfg.fgate}, rope={cfg.rope})"
        self.analysis = {"position_loss": curve[:have].cpu(), "train_seq_len": train_len, "bins": bins,
                         "step": self.global_step, "label": label}
        if self.model.cfg.fgate != "none" and self.gate_stats.n > 0:
            stats = {k: v.cpu() for k, v in self.gate_stats.compute().items()}
            self.analysis["gates"] = stats
            mean = stats["mean_log_f"]
            self.log("gates/mean_log_f", mean.mean().float())
            self.log("gates/max_head_mean_log_f", mean.max().float())
            self.log("gates/frac_heads_long_range", (stats["frac_f_gt_0.9"] > 0.5).double().mean().float())
            for layer in range(mean.shape[0]):
                self.log(f"gates/L{layer}_mean_log_f", mean[layer].mean().float())

    # ---------------------------------------------------------------------------------------------------------
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Under FSDP clip by norm through the root FSDP module, which reduces the norm over every shard: Lightning's
        FSDP precision plugin refuses ``gradient_clip_algorithm='norm'`` (the large recipes' ``gradient_clip_val:
        1.0`` would stop at the first optimizer step).  Anything else: Lightning's own clipping."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        root = self.trainer.strategy.model
        if isinstance(root, FullyShardedDataParallel) and gradient_clip_val and \
                (gradient_clip_algorithm is None or gradient_clip_algorithm == "norm"):
            root.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                            gradient_clip_algorithm=gradient_clip_algorithm)

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(self.model.param_groups(hp.weight_decay), lr=hp.lr, betas=tuple(hp.betas),
                                fused=False)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = int(hp.warmup * total) if hp.warmup < 1 else int(hp.warmup)

        def lr_lambda(step: int) -> float:
            if step < warm:
                return (step + 1) / (warm + 1)
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
