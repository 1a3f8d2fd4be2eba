"""The value-based (DQN-family) LightningModule every off-policy recipe builds on: DQN, double DQN and the C51
distributional agent, with a hard-copied target network.

One training step is one update on a minibatch the replay data module (``datamodules.replay_data``) samples when the
module pulls it: the online network's ``Q(s, a)`` against ``R + discount * Q_target(s', a*)`` (``a*`` the target
network's argmax, or the online network's with ``double=True``) under the Huber or squared loss; or, with
``distributional=True``, the cross-entropy of the taken action's return distribution on ``atoms`` atoms in
``[v_min, v_max]`` against the projected target (``layers.value_losses``).  Adam with ``lr`` and ``eps`` (the
spec's short-budget 2.5e-4 / 3.125e-4 by default), optional gradient-norm clipping, the target network copied every
``target_update_period`` updates (``global_step`` counts updates).  With prioritised replay the loss is weighted
by the batch's importance weights and the new priorities (``|TD error|``, or the per-sample cross-entropy) go back to
the data module.

Subclasses say which network: ``build_network(obs_shape, num_actions, atoms) -> nn.Module`` mapping raw
observations to ``(B, A)`` Q-values or ``(B, A, atoms)`` logits.  The module is the data module's policy:
``greedy_actions(obs)``.  Logged every ``trainer.log_every_n_steps`` updates (a ``self.log`` costs more than a small
network's update): ``train/loss``, ``train/q_mean``, ``train/epsilon``, ``train/episode_return`` /
``train/episode_length`` (training episodes that ended since the previous log), ``env_steps``; validation / test
``*/return``, ``*/return_std``, ``*/length``; predict: one row per evaluation episode.
"""
from __future__ import annotations

import copy
import os
import warnings
from typing import Optional

import lightning as L
import torch
from torch import nn

from lightning_modules.layers.episode_eval import EpisodeEvaluation
from lightning_modules.layers.value_losses import (TD_LOSSES, categorical_loss, categorical_projection, td_loss,
                                                   td_targets)

warnings.filterwarnings("ignore", message=".*Found `dataloader_iter` argument in the `training_step`.*")
# checkpoints hold the state after the update on purpose: it is the state the data module's environments match
warnings.filterwarnings("ignore", message=".*Using ModelCheckpoint with manual optimization.*")


class ValueBasedModule(EpisodeEvaluation, L.LightningModule):
    def __init__(self, loss: str = "huber", double: bool = False, distributional: bool = False, atoms: int = 51,
                 v_min: float = -10.0, v_max: float = 10.0, lr: float = 2.5e-4, adam_eps: float = 3.125e-4,
                 target_update_period: int = 1000, max_grad_norm: Optional[float] = None,
                 seed: Optional[int] = None):
        super().__init__()
        if loss not in TD_LOSSES:
            raise ValueError(f"model.loss={loss!r}; expected one of {', '.join(TD_LOSSES)}")
        if distributional and (atoms < 2 or not v_max > v_min):
            raise ValueError(f"model.atoms={atoms} must be >= 2 and model.v_min={v_min} < model.v_max={v_max}")
        if target_update_period < 1:
            raise ValueError(f"model.target_update_period must be >= 1 update, got {target_update_period}")
        if not lr > 0:
            raise ValueError(f"model.lr must be > 0, got {lr}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.online: Optional[nn.Module] = None
        self.target: Optional[nn.Module] = None
        self.seed = int(seed) if seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        self._episodes: list = []  # (return, length) of the training episodes not logged yet
        self.register_buffer("support", torch.linspace(v_min, v_max, atoms) if distributional else torch.zeros(0),
                             persistent=False)

    # ------------------------------------------------------------------ networks
    def build_network(self, obs_shape: tuple, num_actions: int, atoms: int, input_scale: float) -> nn.Module:
        raise NotImplementedError

    def build(self, obs_shape: tuple, num_actions: int, obs_dtype: str = "float32") -> None:
        """``uint8`` observations are frames: the network divides them by 255."""
        torch.manual_seed(self.seed)  # the initial weights are a function of the seed alone
        atoms = self.hparams.atoms if self.hparams.distributional else 1
        self.network_args = {"obs_shape": tuple(int(s) for s in obs_shape), "num_actions": int(num_actions),
                             "obs_dtype": str(obs_dtype)}
        input_scale = 1 / 255 if str(obs_dtype) == "uint8" else 1.0
        self.online = self.build_network(self.network_args["obs_shape"], int(num_actions), atoms, input_scale)
        self.target = copy.deepcopy(self.online).requires_grad_(False)

    def setup(self, stage: str) -> None:
        if self.online is None:
            dm = self.trainer.datamodule
            self.build(dm.observation_space.shape, dm.action_space.n, str(dm.observation_space.dtype))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["value_network"] = self.network_args

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.online is None and "value_network" in checkpoint:
            self.build(**checkpoint["value_network"])

    def q_values(self, out: torch.Tensor) -> torch.Tensor:
        """Q-values from the network output (the expectation over the atoms when distributional)."""
        return out if out.dim() == 2 else (out.softmax(-1) * self.support).sum(-1)

    # ------------------------------------------------------------------ the data module's policy
    @torch.no_grad()
    def greedy_actions(self, obs: torch.Tensor) -> torch.Tensor:
        # in float32 even under bf16-mixed (the data module acts inside the training step's autocast): bf16 Q-values
        # tie often, and argmax sends every tie to action 0 (noop in MinAtar and Atari)
        with torch.autocast(obs.device.type, enabled=False):
            return self.q_values(self.online(obs)).argmax(-1)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        return torch.optim.Adam(self.online.parameters(), lr=self.hparams.lr, eps=self.hparams.adam_eps, foreach=True)

    def loss(self, batch: dict):
        """``(loss, per-sample priorities, Q of the batch)``."""
        hp = self.hparams
        obs, next_obs = batch["obs"], batch["next_obs"]
        B = obs.shape[0]
        with torch.no_grad():
            next_target = self.target(next_obs)
        if hp.double:  # one online pass over s and s'
            both = self.online(torch.cat([obs, next_obs]))
            out, next_online = both[:B], both[B:].detach()
        else:
            out, next_online = self.online(obs), None
        weights = batch.get("weights")
        if hp.distributional:
            q_next = self.q_values(next_target)
            choose = self.q_values(next_online) if next_online is not None else q_next
            best = choose.argmax(-1)
            # float32 under any autocast (CPU's keeps softmax in bf16): the projection scatters float32 masses into it
            next_probs = next_target.float().softmax(-1)[torch.arange(B, device=obs.device), best]
            target = categorical_projection(next_probs, batch["returns"], batch["discounts"], self.support)
            per_sample = categorical_loss(out, batch["actions"], target, reduction="none")
            priorities = per_sample.detach()
        else:
            q_next_online = self.q_values(next_online) if next_online is not None else None
            y = td_targets(next_target, batch["returns"], batch["discounts"], q_next_online)
            per_sample = td_loss(out, batch["actions"], y, hp.loss, reduction="none")
            chosen = out.gather(-1, batch["actions"].long()[:, None]).squeeze(-1)
            priorities = (chosen - y).detach().abs()
        loss = (per_sample * weights).mean() if weights is not None else per_sample.mean()
        return loss, priorities, self.q_values(out.detach())

    def training_step(self, dataloader_iter):
        batch, _, _ = next(dataloader_iter)  # sampled now, after the environment steps taken with these weights
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        hp = self.hparams
        opt = self.optimizers()
        loss, priorities, q = self.loss(batch)
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if hp.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.online.parameters(), hp.max_grad_norm)
        opt.step()
        if "weights" in batch:
            self.trainer.datamodule.update_priorities(batch["indices"], priorities)
        if self.global_step % hp.target_update_period == 0:
            self.target.load_state_dict(self.online.state_dict())
        self._episodes.append(torch.stack([batch["episode_returns"].cpu(), batch["episode_lengths"].cpu().double()], 1))
        if self.global_step % self.trainer.log_every_n_steps == 0:  # self.log costs more than a small update
            self._log_training(loss, q, batch)

    def _log_training(self, loss: torch.Tensor, q: torch.Tensor, batch: dict) -> None:
        """The last update's loss and Q, and the episodes that ended since the previous log."""
        log = dict(on_step=True, on_epoch=False, batch_size=q.shape[0])
        self.log("train/loss", loss.detach(), prog_bar=True, **log)
        self.log("train/q_mean", q.mean(), **log)
        self.log("train/epsilon", batch["epsilon"].float(), **log)
        episodes = torch.cat(self._episodes)
        self._episodes = []
        if len(episodes):
            self.log("train/episode_return", episodes[:, 0].mean().float(), prog_bar=True, **log)
            self.log("train/episode_length", episodes[:, 1].mean().float(), **log)
        self.log("env_steps", batch["env_steps"].float(), prog_bar=True, reduce_fx="max", **log)
