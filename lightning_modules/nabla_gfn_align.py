"""What every diffusion-alignment method of the Nabla-GFlowNet recipes shares (spec ``nabla_gfn.md`` 4.3).

``DiffusionAlignment`` loads the pretrained ``DiffusionPrior`` (frozen), makes the policy theta from it (a full copy,
or the copy with ``peft`` LoRA adapters on ``lora_targets`` with ``lora_rank > 0``, the paper's choice for Stable
Diffusion), builds the reward of its ``task`` and the sampling chain, and runs one alignment iteration per training
step with manual optimisation: sample ``batch_size`` trajectories without gradients from a generator seeded by
``(seed, step, rank)`` (a resumed run draws what an uninterrupted one would), compute the method's loss
(``alignment_loss``), step one optimiser with per-group gradient clipping.

Validation samples ``eval_samples`` from the policy with a fixed seed and logs the task's metrics (``val/...``,
``lightning_modules.nabla_gfn_rewards``); the pretrained model's samples, scored once at the start, are the
reference (``ref/...``; the digits tier's feature Frechet distances are measured against ``reference_samples`` of
them, default ``eval_samples``).  ``eval_history``
keeps every evaluation for the report callback (``callbacks.nabla_gfn_report``).
"""
from __future__ import annotations

import copy
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import lightning as L
import torch
from torch import nn

from datamodules.nabla_gfn_data import check_task, require_at_least
from lightning_modules.diffusion_prior import build_chain, load_prior
from lightning_modules.nabla_gfn_rewards import (ClassifierReward, FolderReward, RingReward, digits_classifier,
                                                 image_metrics, ring_metrics, ring_target,
                                                 sample_records)


def outside_autocast(t: torch.Tensor):
    """For a backward pass: Lightning runs a manual-optimisation ``training_step`` (and so its backward passes) inside
    bf16-mixed's autocast, which would redo the matmuls of the float32 parts of the graph (the rewards) in bf16."""
    return torch.autocast(t.device.type, enabled=False)


def make_reward(task: str, spec: Optional[Dict[str, Any]]) -> nn.Module:
    """``spec``: ``{"kind": "ring", "center", "rho"}``, ``{"kind": "classifier", "classes", "ink"}`` or
    ``{"kind": "folder", "path", "label"}``; ``None``: the task's default (ring; the digit 3)."""
    spec = dict(spec or {"kind": "ring" if task == "ring" else "classifier"})
    kind = spec.pop("kind", None)
    if kind == "ring":
        return RingReward(**spec)
    if kind == "classifier":
        return ClassifierReward(**spec)
    if kind == "folder":
        if "path" not in spec:
            raise ValueError("reward kind 'folder' needs a path (the reward model's folder)")
        return FolderReward(spec.pop("path"), **spec)
    raise ValueError(f"reward kind {kind!r} is not one of ring, classifier, folder")


class DiffusionAlignment(L.LightningModule):
    def __init__(self, task: str = "ring", prior_ckpt: str = "runs/diffusion_prior_ring",
                 reward: Optional[Dict[str, Any]] = None, beta: float = 1.0, scheduler: Optional[str] = None,
                 num_steps: Optional[int] = None, eta: float = 1.0, batch_size: int = 128, lr: float = 1e-3,
                 weight_decay: float = 0.0, betas: Sequence[float] = (0.9, 0.999), clip: float = 1.0,
                 lora_rank: int = 0, lora_alpha: Optional[float] = None,
                 lora_targets: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"), eval_samples: int = 2000,
                 eval_seed: int = 1234, reference_samples: Optional[int] = None, predict_batch: int = 250,
                 seed: Optional[int] = None, prompts: Union[List[str], str, None] = None,
                 guidance_scale: float = 5.0):
        super().__init__()
        check_task(task)
        if beta < 0:
            raise ValueError(f"model.beta (the reward temperature) must be >= 0, got {beta}")
        require_at_least("model", 1, batch_size=batch_size, eval_samples=eval_samples, predict_batch=predict_batch)
        require_at_least("model", 0, lora_rank=lora_rank)  # 0: train the full copy
        if lr <= 0:
            raise ValueError(f"model.lr must be > 0, got {lr}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.conditioning, self.prompts = None, None
        if task == "sd":  # a diffusers pipeline folder: text-conditioned latent diffusion, a decoded-image reward
            from lightning_modules.nabla_gfn_sd import DecodedReward, load_pipeline

            if not reward or reward.get("kind") != "folder":
                raise ValueError("task 'sd' needs model.init_args.reward {kind: folder, path: ...} (a reward model "
                                 "scored on the decoded images)")
            prior, prior_hp, vae, self.conditioning, self.prompts = load_pipeline(prior_ckpt, prompts, guidance_scale)
            self.chain = build_chain(scheduler or "ddim", {}, num_steps or 50, eta, folder=prior_ckpt)
            self.reward = DecodedReward(vae, make_reward(task, reward)).requires_grad_(False)
        else:
            prior, prior_hp = load_prior(prior_ckpt, task)
            self.chain = build_chain(scheduler or prior_hp.get("scheduler", "ddim"), prior_hp["schedule"],
                                     num_steps or int(prior_hp.get("num_steps", 49)), eta)
            self.reward = make_reward(task, reward).requires_grad_(False)
        self.shape = tuple(prior_hp["shape"])
        self.prior, self.prior_hparams = prior, prior_hp
        self.policy = self._make_policy(prior)
        self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else int(seed)
        self.eval_history: List[Dict[str, float]] = []
        self.last_samples: Optional[torch.Tensor] = None
        self.reference: Dict[str, Any] = {}

    # ---- networks ----------------------------------------------------------------------------------------------------
    def _make_policy(self, prior: nn.Module) -> nn.Module:
        policy = copy.deepcopy(prior).requires_grad_(True).train()
        hp = self.hparams
        if hp.lora_rank == 0:
            return policy
        from peft import LoraConfig, inject_adapter_in_model

        names = {n.rsplit(".", 1)[-1] for n, _ in policy.named_modules()} | {n for n, _ in policy.named_modules()}
        targets = [t for t in hp.lora_targets if any(n == t or n.endswith("." + t) for n in names)]
        if not targets:
            raise ValueError(f"model.lora_targets {list(hp.lora_targets)} match no layer of the prior's network")
        policy.requires_grad_(False)
        config = LoraConfig(r=hp.lora_rank, lora_alpha=hp.lora_alpha or hp.lora_rank, target_modules=targets,
                            init_lora_weights="gaussian")
        return inject_adapter_in_model(config, policy)

    def policy_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def eps_policy(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.policy(x, t)

    def eps_prior(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.prior(x, t)

    # ---- sampling ----------------------------------------------------------------------------------------------------
    def generator(self, salt: int = 0) -> torch.Generator:
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return torch.Generator().manual_seed(((self.seed * 1_000_003 + self.global_step) * 101 + rank) * 7 + salt)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator, prior: bool = False, keep: bool = False,
               stop: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """``n`` trajectories; with prompts (task ``sd``) each row draws one first (``prompts`` in the output), and
        the networks' next calls use them (``use_prompts`` changes that)."""
        fn = self.eps_prior if prior else self.eps_policy
        index = None
        if self.conditioning is not None:
            index = torch.randint(len(self.prompts), (n,), generator=generator)
            self.use_prompts(index)
        dtype = next(self.prior.parameters()).dtype
        start = torch.randn((n, *self.shape), generator=generator).to(self.chain.timesteps.device, dtype)
        out = self.chain.sample(fn, (n, *self.shape), generator=generator, keep=keep, stop=stop, start=start)
        if index is not None:
            out["prompts"] = index
        return out

    def use_prompts(self, index: Optional[torch.Tensor]) -> None:
        if self.conditioning is not None and index is not None:
            self.conditioning.use(index)

    # ---- the loop ----------------------------------------------------------------------------------------------------
    def alignment_loss(self) -> Dict[str, torch.Tensor]:
        """The method's loss for one iteration (key ``loss``) and what to log beside it; ``accumulated: True`` when
        it has already back-propagated (``self.manual_backward``) itself."""
        raise NotImplementedError

    def param_groups(self) -> List[Dict[str, Any]]:
        hp = self.hparams
        return [{"params": self.policy_parameters(), "lr": hp.lr, "weight_decay": hp.weight_decay, "name": "policy"}]

    def configure_optimizers(self):
        return torch.optim.AdamW(self.param_groups(), betas=tuple(self.hparams.betas), eps=1e-8)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        opt.zero_grad()
        out = self.alignment_loss()
        if not out.pop("accumulated", False):  # a method that back-propagates in micro-batches has done it
            with outside_autocast(out["loss"]):
                self.manual_backward(out["loss"])
        for group in opt.optimizer.param_groups:  # clipped separately per group, as the official code does
            if self.hparams.clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(group["params"], self.hparams.clip)
                self.log(f"train/grad_norm_{group.get('name', 'params')}", norm)
        opt.step()
        for key, value in out.items():
            self.log(f"train/{key}", value.detach(), prog_bar=key in ("loss", "reward"))
        return out["loss"].detach()

    # ---- evaluation --------------------------------------------------------------------------------------------------
    def metrics(self, x: torch.Tensor) -> Dict[str, float]:
        hp = self.hparams
        if hp.task == "sd":
            from lightning_modules.nabla_gfn_sd import latent_metrics

            return latent_metrics(x, self.reward)
        if hp.task == "ring":
            return ring_metrics(x, self.reward, self.target_weights())
        clf = digits_classifier()[0].to(x.device)
        classes = getattr(self.reward, "classes", ())
        return image_metrics(x, self.reward, clf, self.reference.get("features"), classes,
                             self.reference.get("class_features"))

    def ring_target(self):
        """``(weights, means, std)`` of the ring's exact target for this reward and beta (``ring_target``)."""
        r = self.reward
        return ring_target(self.hparams.beta, tuple(r.center.tolist()), r.rho)

    def target_weights(self) -> torch.Tensor:
        return self.ring_target()[0]

    def setup(self, stage: str) -> None:
        task = getattr(getattr(getattr(self.trainer, "datamodule", None), "hparams", None), "task", None)
        if task is not None and task != self.hparams.task:
            raise ValueError(f"data.task {task!r} and model.task {self.hparams.task!r} differ; give both the same task")

    def on_fit_start(self) -> None:
        self._reference()

    def on_train_start(self) -> None:
        """A run resumed from a checkpoint written just before an evaluation (step checkpoints are) makes up that
        evaluation, so its history (and report) equals an uninterrupted run's."""
        step, every = self.global_step, getattr(self.trainer, "val_check_batch", None)
        if step > 0 and isinstance(every, int) and step % every == 0 and \
                not any(h["step"] == step for h in self.eval_history):
            self._evaluate()

    def _evaluate(self) -> Dict[str, float]:
        hp = self.hparams
        x = self.sample(hp.eval_samples, torch.Generator().manual_seed(hp.eval_seed))["x"]
        m = self.metrics(x)
        self.last_samples = x.cpu()
        if self._trainer is None or not self.trainer.sanity_checking:
            self.eval_history.append({"step": self.global_step, **m})
        return m

    def on_test_start(self) -> None:
        self._reference()

    def _reference(self) -> None:
        if self.reference:
            return
        hp = self.hparams
        n = hp.reference_samples or hp.eval_samples
        x = self.sample(n, torch.Generator().manual_seed(hp.eval_seed), prior=True)["x"]
        if hp.task == "digits":
            clf = digits_classifier()[0].to(x.device)
            self.reference["features"] = feats = clf.features(x)
            classes = getattr(self.reward, "classes", None)
            if classes:
                label = clf.head(feats).argmax(-1)
                self.reference["class_features"] = feats[torch.isin(label, torch.tensor(classes, device=x.device))]
        self.reference["metrics"] = self.metrics(x[:hp.eval_samples])
        self.reference["samples"] = x[:hp.eval_samples].cpu()

    def validation_step(self, batch, batch_idx: int) -> None:
        self._reference()
        m = self._evaluate()
        for key in ("reward", "on_support", "mode_entropy", "tv", "pair_dist", "on_manifold", "class_rate", "fd",
                    "fd_class", "class_entropy"):
            if key in m:
                self.log(f"val/{key}", m[key], prog_bar=key in ("reward", "on_support", "tv", "fd"))
        for key, value in self.reference["metrics"].items():
            if not key.startswith(("mode_", "class_")) or key in ("mode_entropy", "class_entropy", "class_rate"):
                self.log(f"ref/{key}", value)

    test_step = validation_step

    def predict_step(self, batch, batch_idx: int) -> list:
        """``predict_batch`` samples of the policy per item, seeded by ``eval_seed`` and the item."""
        i, n = int(batch[0]), self.hparams.predict_batch
        out = self.sample(n, torch.Generator().manual_seed(self.hparams.eval_seed + 1 + i))
        if "prompts" in out:  # latents: the prompt and the reward of each (decode them with the pipeline's VAE)
            with torch.no_grad():
                log_r = self.reward(out["x"]).cpu().tolist()
            return [{"index": i * n + j, "prompt": self.prompts[int(p)], "log_r": f"{r:.5f}"}
                    for j, (p, r) in enumerate(zip(out["prompts"].tolist(), log_r))]
        return sample_records(out["x"], self.reward, i * n)

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint["eval_history"] = list(self.eval_history)

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        self.eval_history = list(checkpoint.get("eval_history", []))
