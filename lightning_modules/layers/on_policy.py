"""The on-policy actor-critic LightningModule every on-policy recipe builds on (SPMA, PPO, MDPO, ...).

One training step consumes one rollout (``datamodules.rollouts``) with the inner loop of the official SPMA (SB3)
code: ``n_epochs`` passes over the flattened rollout in shuffled minibatches of ``batch_size``; per minibatch,
advantages normalised within it (unbiased std), the policy loss named by ``loss`` (``layers.policy_losses``) minus
``ent_coef`` times the entropy on the actor, the squared error to the GAE returns on the critic, and one step of each
of the actor and the critic (``lr_actor``, ``lr_critic``: one Adam with two parameter groups, which is the same
update as the official code's two Adams; or the Armijo line search with ``armijo_actor`` / ``armijo_critic``, then
two optimisers).  Actor and critic are separate networks, so one backward of the summed losses gives each its own
gradient (and DDP one gradient average per minibatch).  ``max_grad_norm`` clips the actor's and the critic's
gradients separately (the official SPMA code does not clip: ``null``).  The minibatch order is a pure function of ``(seed, rollout, rank)``;
``seed`` (initial weights, minibatch order) defaults to the run's ``seed_everything``.

Logged per rollout: ``train/loss_actor``, ``train/loss_critic``, ``train/entropy``, ``train/kl`` (the k3 estimate of
``KL(pi_old || pi)`` after the update), ``train/clip_fraction``, ``train/explained_variance``,
``train/episode_return`` / ``train/episode_length`` (episodes that ended in the rollout), ``env_steps`` (progress
bar); validation and test: ``val/return`` / ``test/return`` (deterministic policy), ``*_std``, ``*_length``;
``predict``: one row per deterministic episode.  ``global_step`` counts rollouts (one counted optimizer step each).

The networks are sized from the data module's spaces at ``setup`` (and from the checkpoint when loaded on its own):
``action_head="auto"`` takes categorical for ``Discrete`` and Gaussian for ``Box`` actions.
"""
from __future__ import annotations

import os
import warnings
from typing import Dict, List, Optional, Sequence

import gymnasium as gym
import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from lightning_modules.layers.armijo import Armijo
from lightning_modules.layers.episode_eval import EpisodeEvaluation
from lightning_modules.layers.policies import ActorCritic
from lightning_modules.layers.policy_losses import (KL_ESTIMATORS, POLICY_LOSSES, clip_fraction, explained_variance,
                                                    kl_k3, normalize_advantages, policy_loss)

HEADS = ("auto", "categorical", "gaussian")
# training_step(dataloader_iter) is how the module pulls each rollout when it is ready for it (see
# datamodules.rollouts); Lightning flags the signature as experimental on every run.
warnings.filterwarnings("ignore", message=".*Found `dataloader_iter` argument in the `training_step`.*")
# checkpoints hold the state after the update on purpose: it is the state the data module's environments match
warnings.filterwarnings("ignore", message=".*Using ModelCheckpoint with manual optimization.*")


def head_for(space: gym.Space, requested: str) -> tuple:
    """``(kind, action_dim)`` for an action space, checking a requested head against it."""
    if isinstance(space, gym.spaces.Discrete):
        kind, dim = "categorical", int(space.n)
    elif isinstance(space, gym.spaces.Box) and len(space.shape) == 1:
        kind, dim = "gaussian", int(space.shape[0])
    else:
        raise ValueError(f"action space {space} is not supported (Discrete or a 1-D Box)")
    if requested not in HEADS:
        raise ValueError(f"model.action_head={requested!r}; expected one of {', '.join(HEADS)}")
    if requested != "auto" and requested != kind:
        what = "continuous" if kind == "gaussian" else "discrete"
        raise ValueError(f"model.action_head={requested} but the environment has {what} actions ({space}); "
                         f"use {kind} or auto")
    return kind, dim


class OnPolicyModule(EpisodeEvaluation, L.LightningModule):
    def __init__(self, loss: str = "spma", eta: float = 1.0, kl: str = "k3", clip_range: float = 0.2,
                 n_epochs: int = 10, batch_size: int = 64, lr_actor: float = 3e-4, lr_critic: float = 3e-4,
                 ent_coef: float = 0.0, max_grad_norm: Optional[float] = None, normalize_advantage: bool = True,
                 hidden: Sequence[int] = (64, 64), activation: str = "tanh", action_head: str = "auto",
                 log_std_init: float = 0.0, armijo_actor: bool = False, armijo_critic: bool = False,
                 seed: Optional[int] = None):
        super().__init__()
        if loss not in POLICY_LOSSES:
            raise ValueError(f"model.loss={loss!r}; expected one of {', '.join(POLICY_LOSSES)}")
        if not eta > 0:
            raise ValueError(f"model.eta must be > 0, got {eta}")
        if kl not in KL_ESTIMATORS:
            raise ValueError(f"model.kl={kl!r}; expected one of {', '.join(KL_ESTIMATORS)}")
        if n_epochs < 1 or batch_size < 1:
            raise ValueError(f"model.n_epochs and model.batch_size must be >= 1, got {n_epochs}, {batch_size}")
        if action_head not in HEADS:
            raise ValueError(f"model.action_head={action_head!r}; expected one of {', '.join(HEADS)}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.policy: Optional[ActorCritic] = None
        # no seed given: the run's seed_everything (Lightning exports it as PL_GLOBAL_SEED)
        self.seed = int(seed) if seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))

    # ------------------------------------------------------------------ networks
    def build(self, obs_dim: int, action_kind: str, action_dim: int) -> None:
        hp = self.hparams
        torch.manual_seed(self.seed)  # the initial weights are a function of the seed alone
        self.policy = ActorCritic(obs_dim, action_kind, action_dim, hp.hidden, hp.activation, hp.log_std_init)

    def setup(self, stage: str) -> None:
        if self.policy is not None:
            return
        dm = self.trainer.datamodule
        obs = dm.observation_space
        kind, dim = head_for(dm.action_space, self.hparams.action_head)
        self.build(int(np.prod(obs.shape)), kind, dim)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        p = self.policy
        checkpoint["on_policy"] = {"obs_dim": p.obs_dim, "action_kind": p.action_kind, "action_dim": p.action_dim}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.policy is None and "on_policy" in checkpoint:
            self.build(**checkpoint["on_policy"])

    # ------------------------------------------------------------------ the rollout policy (datamodules.rollouts)
    def act(self, obs: torch.Tensor, noise: torch.Generator) -> Dict[str, torch.Tensor]:
        return self.policy.act(obs, noise)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.policy.value(obs)

    def act_deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        return self.policy.act_deterministic(obs)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        """One Adam with an actor and a critic parameter group (the same update as two Adams stepped together, at
        half the per-step overhead); two optimisers when a side uses the Armijo line search."""
        hp = self.hparams
        if not (hp.armijo_actor or hp.armijo_critic):
            return torch.optim.Adam([{"params": self.policy.actor_parameters(), "lr": hp.lr_actor, "name": "actor"},
                                     {"params": self.policy.critic_parameters(), "lr": hp.lr_critic,
                                      "name": "critic"}], eps=1e-5, foreach=True)
        actor = Armijo(self.policy.actor_parameters()) if hp.armijo_actor else \
            torch.optim.Adam(self.policy.actor_parameters(), lr=hp.lr_actor, eps=1e-5, foreach=True)
        critic = Armijo(self.policy.critic_parameters()) if hp.armijo_critic else \
            torch.optim.Adam(self.policy.critic_parameters(), lr=hp.lr_critic, eps=1e-5, foreach=True)
        return [actor, critic]

    def _clip(self, params) -> None:
        if self.hparams.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.hparams.max_grad_norm, foreach=True)

    def actor_loss(self, mb: Dict[str, torch.Tensor]) -> tuple:
        """``(loss, log pi_new, entropy)`` of a minibatch; subclasses may change the loss."""
        hp = self.hparams
        logp, entropy = self.policy.evaluate(mb["obs"], mb["actions"])
        adv = normalize_advantages(mb["advantages"]) if hp.normalize_advantage else mb["advantages"]
        loss = policy_loss(hp.loss, logp, mb["log_probs"], adv, hp.eta, hp.clip_range, hp.kl)
        if hp.ent_coef:
            loss = loss - hp.ent_coef * entropy.mean()
        return loss, logp, entropy

    def critic_loss(self, mb: Dict[str, torch.Tensor]) -> torch.Tensor:
        return F.mse_loss(self.policy.value(mb["obs"]), mb["returns"])

    def _mean_over_ranks(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_gather(x).mean() if self.trainer.world_size > 1 else x

    def _optimizer_step(self, opt, count: bool, closure=None, **kwargs) -> None:
        """One optimizer step through the strategy (precision plugin, the callbacks' ``on_before_optimizer_step``);
        only ``count=True`` goes through the ``LightningOptimizer``, which advances ``global_step``: one step per
        rollout, so ``max_steps``, ``val_check_interval`` and step checkpoints count rollouts."""
        if count:
            opt.step(closure=closure, **kwargs)
        else:
            self.trainer.strategy.optimizer_step(opt.optimizer, closure or (lambda: None), **kwargs)

    def _armijo_step(self, opt, loss_fn, count: bool) -> None:
        def closure():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn()
            self.manual_backward(loss)
            return self._mean_over_ranks(loss.detach())

        def evaluate():  # every rank scores the trial on the mean loss, so all take the same step
            return self._mean_over_ranks(loss_fn().detach())
        self._optimizer_step(opt, count, closure, evaluate=evaluate)

    def training_step(self, dataloader_iter):
        rollout, _, _ = next(dataloader_iter)  # collected now, with the current policy
        hp = self.hparams
        flat = {k: rollout[k].flatten(0, 1) for k in ("obs", "actions", "log_probs", "values", "advantages",
                                                       "returns")}
        n = flat["log_probs"].shape[0]
        size = min(hp.batch_size, n)
        rank = self.trainer.global_rank if self._trainer is not None else 0
        order = torch.Generator().manual_seed(self.seed * 1_000_003 + int(rollout["iteration"]) * 1009 + rank)
        optimizers = self.optimizers()
        joint = not isinstance(optimizers, list)  # one Adam, two parameter groups
        if not joint:
            opt_actor, opt_critic = optimizers
            armijo = [isinstance(getattr(o, "optimizer", o), Armijo) for o in optimizers]
            for o, is_armijo in zip(optimizers, armijo):
                if is_armijo:
                    getattr(o, "optimizer", o).reset()  # the official code restarts the search every outer iteration
        actor_params, critic_params = self.policy.actor_parameters(), self.policy.critic_parameters()
        stats: Dict[str, List[torch.Tensor]] = {"loss_actor": [], "loss_critic": [], "entropy": [],
                                                "clip_fraction": []}
        starts = list(range(0, n - size + 1, size))  # full minibatches only, as SB3's rollout buffer
        for epoch in range(hp.n_epochs):
            perm = torch.randperm(n, generator=order).to(self.device)
            for start in starts:
                last = epoch == hp.n_epochs - 1 and start == starts[-1]  # the rollout's one counted step
                mb = {k: v[perm[start:start + size]] for k, v in flat.items()}
                a_loss, logp, entropy = self.actor_loss(mb)
                c_loss = self.critic_loss(mb)
                with torch.no_grad():
                    stats["loss_actor"].append(a_loss.detach())
                    stats["loss_critic"].append(c_loss.detach())
                    stats["entropy"].append(entropy.mean())
                    stats["clip_fraction"].append(clip_fraction(logp, mb["log_probs"], hp.clip_range))
                if joint:  # separate networks: one backward gives each loss's gradient to its own side
                    optimizers.zero_grad(set_to_none=True)
                    self.manual_backward(a_loss + c_loss)
                    self._clip(actor_params)
                    self._clip(critic_params)
                    self._optimizer_step(optimizers, last)
                    continue
                for o, is_armijo, fn, params, count in (
                        (opt_actor, armijo[0], lambda: self.actor_loss(mb)[0], actor_params, False),
                        (opt_critic, armijo[1], lambda: self.critic_loss(mb), critic_params, last)):
                    if is_armijo:
                        self._armijo_step(o, fn, count)
                    else:
                        o.zero_grad(set_to_none=True)
                        self.manual_backward(fn())
                        self._clip(params)
                        self._optimizer_step(o, count)
        with torch.no_grad():
            logp, _ = self.policy.evaluate(flat["obs"], flat["actions"])
            kl = kl_k3(logp, flat["log_probs"]).mean()
        log = dict(on_step=True, on_epoch=False, batch_size=n)
        for k, v in stats.items():
            self.log(f"train/{k}", torch.stack(v).mean() if v else float("nan"), sync_dist=True, **log)
        self.log("train/kl", kl, sync_dist=True, **log)
        self.log("train/explained_variance", explained_variance(flat["values"], flat["returns"]), sync_dist=True,
                 **log)
        if rollout["episode_returns"].numel():
            self.log("train/episode_return", rollout["episode_returns"].mean().float(), prog_bar=True, **log)
            self.log("train/episode_length", rollout["episode_lengths"].float().mean(), **log)
        steps = (int(rollout["iteration"]) + 1) * n * self.trainer.world_size
        self.log("env_steps", float(steps), prog_bar=True, reduce_fx="max", **log)
