"""On-policy rollouts as a LightningDataModule (the environment side of every on-policy recipe).

Each training item is one rollout: ``n_steps`` steps of ``num_envs`` vectorised environments taken with the current
policy, which the data module reaches through its trainer (``trainer.lightning_module``), with GAE(lambda)
advantages and returns computed once.  The module consumes it with ``training_step(self, dataloader_iter)`` and
pulls the rollout itself: Lightning prefetches one batch ahead otherwise, which would collect rollout ``k + 1`` with
the policy from before update ``k``.

The policy is any LightningModule with three methods (``RolloutPolicy``):

* ``act(obs, noise) -> {"actions", "log_probs", "values"}``: a sampled action per row, its log-probability under
  the current policy (summed over action dimensions) and the critic's value; all randomness from ``noise``, a CPU
  ``torch.Generator`` the data module owns and checkpoints;
* ``value(obs)``: the critic (bootstraps the rollout's end and truncated episodes);
* ``act_deterministic(obs)``: the evaluation action (argmax / mean).

Rollout dict (tensors on the module's device): ``obs`` (T, N, ...), ``actions`` (T, N, ...), ``log_probs``,
``values``, ``rewards`` (as trained on: normalised when ``normalize_reward``; truncated episodes get
``gamma * V(final obs)`` added), ``dones`` (the episode ended after this step), ``advantages``, ``returns``, all
(T, N); ``episode_returns`` / ``episode_lengths`` of the episodes that ended in it (raw rewards); ``iteration``.

One epoch is ``rollouts_per_epoch`` rollouts, so ``trainer.max_epochs`` sets the run length: ``max_epochs *
rollouts_per_epoch * n_steps * num_envs`` environment steps per rank.  Validation, test and predict play
``eval_episodes`` episodes (10 for test / predict when 0) with the deterministic policy on separate environments
(fixed seeds, the training observation statistics frozen).

Environment copy ``i`` of rank ``k`` is seeded from ``(seed, k, i)``; ``seed`` defaults to the run's
``seed_everything``.  Checkpoints hold the environments' exact state (synchronous envs; ``datamodules.envs.snapshot_envs``), the
normalisation statistics, the current observations, the episodes in progress, the noise generator and the counters,
so a resumed run continues exactly as an uninterrupted one.  Worker-process environments (``asynchronous=True``)
cannot be snapshotted: a resumed run re-seeds them from ``(seed, rank, iteration)`` and continues with every
learnable state restored.  Under DDP each rank steps its own environments (its own seeds) and the checkpoint holds
every rank's state.
"""
from __future__ import annotations

from typing import Dict, Optional, Protocol

import gymnasium as gym
import numpy as np
import torch

from datamodules.env_side import EnvDataModule, EpisodeCursor, play_episodes
from datamodules.envs import NormalizeObservation, NormalizeReward, check_env_id, find_wrapper, make_vector_env
from datamodules.sampling import world_of


class RolloutPolicy(Protocol):
    device: torch.device

    def act(self, obs: torch.Tensor, noise: torch.Generator) -> Dict[str, torch.Tensor]: ...

    def value(self, obs: torch.Tensor) -> torch.Tensor: ...

    def act_deterministic(self, obs: torch.Tensor) -> torch.Tensor: ...


def gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, last_value: torch.Tensor, gamma: float,
        lam: float):
    """Generalised advantage estimation over ``(T, N)`` tensors: ``dones[t]`` means the episode ended after step
    ``t`` (nothing is bootstrapped across it); ``last_value`` is ``V`` of the observation after the last step.
    Returns ``(advantages, returns = advantages + values)``."""
    T = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(last_value)
    for t in reversed(range(T)):
        next_value = last_value if t == T - 1 else values[t + 1]
        keep = 1.0 - dones[t].to(rewards.dtype)
        delta = rewards[t] + gamma * next_value * keep - values[t]
        running = delta + gamma * lam * keep * running
        advantages[t] = running
    return advantages, advantages + values


class RolloutCollector(EpisodeCursor):
    """Steps a vector env with a policy; owns the current observations, the episodes in progress and the noise."""

    def __init__(self, env: gym.vector.VectorEnv, n_steps: int, gamma: float, gae_lambda: float, seed: int,
                 world_size: int = 1):
        """``env`` is reset here with seeds ``seed, seed + 1, ...``; the noise generator is seeded from ``seed`` too."""
        if n_steps < 1:
            raise ValueError(f"data.n_steps (rollout length) must be >= 1, got {n_steps}")
        super().__init__(env, seed)
        self.n_steps, self.gamma, self.gae_lambda = n_steps, gamma, gae_lambda
        self.world_size = world_size
        self.noise = torch.Generator().manual_seed(int(seed) + 2**31)
        self.iteration = 0
        space = env.single_action_space
        self.discrete = isinstance(space, gym.spaces.Discrete)
        self.low = None if self.discrete else np.asarray(space.low)
        self.high = None if self.discrete else np.asarray(space.high)

    @property
    def env_steps(self) -> int:
        """Environment steps taken so far by all ranks together."""
        return self.iteration * self.n_steps * self.env.num_envs * self.world_size

    def _to_env(self, actions: torch.Tensor) -> np.ndarray:
        a = actions.cpu().numpy()
        return a.astype(np.int64) if self.discrete else np.clip(a, self.low, self.high)

    @torch.no_grad()
    def collect(self, policy: RolloutPolicy) -> Dict[str, torch.Tensor]:
        device, T, N = policy.device, self.n_steps, self.env.num_envs
        keys = ("obs", "actions", "log_probs", "values", "rewards", "dones")
        buf: Dict[str, list] = {k: [] for k in keys}
        finished = []
        for t in range(T):
            obs = torch.as_tensor(self.obs, dtype=torch.float32, device=device)
            out = policy.act(obs, self.noise)
            next_obs, reward, terminated, truncated, info = self.env.step(self._to_env(out["actions"]))
            raw = np.asarray(info.get("raw_reward", reward), dtype=np.float64)
            reward = np.asarray(reward, dtype=np.float64).copy()
            done = np.logical_or(terminated, truncated)
            cut = np.logical_and(truncated, np.logical_not(terminated))
            if cut.any():  # bootstrap a time-limit cut from its final state
                final = torch.as_tensor(next_obs[cut], dtype=torch.float32, device=device)
                reward[cut] += self.gamma * policy.value(final).double().cpu().numpy()
            steps_so_far = (self.iteration * T + t + 1) * N * self.world_size  # all ranks
            finished += self.advance(next_obs, raw, terminated, truncated, steps_so_far)
            for k, v in (("obs", obs), ("actions", out["actions"]), ("log_probs", out["log_probs"]),
                         ("values", out["values"]), ("rewards", torch.as_tensor(reward, dtype=torch.float32)),
                         ("dones", torch.as_tensor(done))):
                buf[k].append(v.to(device))
        rollout = {k: torch.stack(v) for k, v in buf.items()}
        last_value = policy.value(torch.as_tensor(self.obs, dtype=torch.float32, device=device))
        rollout["advantages"], rollout["returns"] = gae(rollout["rewards"], rollout["values"].float(),
                                                        rollout["dones"], last_value.float(), self.gamma,
                                                        self.gae_lambda)
        rollout["episode_returns"] = torch.tensor([r for r, _ in finished], dtype=torch.float64)
        rollout["episode_lengths"] = torch.tensor([n for _, n in finished], dtype=torch.long)
        rollout["iteration"] = torch.tensor(self.iteration)
        self.iteration += 1
        return rollout

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> Dict[str, object]:
        state = {**super().state_dict(), "noise": self.noise.get_state(), "iteration": self.iteration}
        for name, kind in (("normalize_observation", NormalizeObservation), ("normalize_reward", NormalizeReward)):
            wrapper = find_wrapper(self.env, kind)
            if wrapper is not None:
                state[name] = wrapper.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, object], reseed: Optional[int] = None) -> None:
        """Worker-process environments (no snapshot) start fresh episodes from seeds that depend on the resumed
        iteration."""
        for name, kind in (("normalize_observation", NormalizeObservation), ("normalize_reward", NormalizeReward)):
            wrapper = find_wrapper(self.env, kind)
            if wrapper is not None and name in state:
                wrapper.load_state_dict(state[name])
        self.noise.set_state(state["noise"])
        self.iteration = int(state["iteration"])
        super().load_state_dict(state, reseed=int(reseed or 0) + 7919 * self.iteration)


class RolloutDataModule(EnvDataModule):
    def __init__(self, env_id: str = "CartPole-v1", num_envs: int = 8, n_steps: int = 256,
                 rollouts_per_epoch: int = 4, gamma: float = 0.99, gae_lambda: float = 0.95,
                 seed: Optional[int] = None,
                 asynchronous: bool = False, normalize_observation: bool = False, normalize_reward: bool = False,
                 eval_episodes: int = 10, env_kwargs: Optional[dict] = None):
        super().__init__(seed)
        if n_steps < 1:
            raise ValueError(f"data.n_steps (rollout length) must be >= 1, got {n_steps}")
        if rollouts_per_epoch < 1:
            raise ValueError(f"data.rollouts_per_epoch must be >= 1, got {rollouts_per_epoch}")
        if not 0 < gamma <= 1 or not 0 <= gae_lambda <= 1:
            raise ValueError(f"data.gamma={gamma} must be in (0, 1] and data.gae_lambda={gae_lambda} in [0, 1]")
        if eval_episodes < 0:
            raise ValueError(f"data.eval_episodes must be >= 0, got {eval_episodes}")
        self.save_hyperparameters(logger=False)
        self.collector: Optional[RolloutCollector] = None

    # ------------------------------------------------------------------ spaces (the module builds its networks)
    def _probe(self) -> tuple:
        if self._spaces is None:
            check_env_id(self.hparams.env_id)
            env = gym.make(self.hparams.env_id, **(self.hparams.env_kwargs or {}))
            self._spaces = (env.observation_space, env.action_space)
            env.close()
        return self._spaces

    # ------------------------------------------------------------------ environments
    def setup(self, stage: str) -> None:
        if self.collector is not None:
            return
        world, rank = world_of(self.trainer)
        hp = self.hparams
        env = make_vector_env(hp.env_id, hp.num_envs, hp.asynchronous, hp.normalize_observation, hp.normalize_reward,
                              hp.gamma, hp.env_kwargs)
        self.collector = RolloutCollector(env, hp.n_steps, hp.gamma, hp.gae_lambda, self._seed(rank), world)
        self.restore_pending()

    def train_items(self):
        collector, per_epoch = self.collector, self.hparams.rollouts_per_epoch
        end = (collector.iteration // per_epoch + 1) * per_epoch
        while collector.iteration < end:
            yield collector.collect(self.policy)

    @torch.no_grad()
    def evaluate(self, policy: RolloutPolicy) -> Dict[str, torch.Tensor]:
        """``eval_episodes`` episodes with the deterministic policy on fresh environments (the same seeds every
        time, the training observation statistics frozen): raw returns and lengths."""
        hp = self.hparams
        episodes = hp.eval_episodes or 10  # test / predict with validation off
        n = min(episodes, 8)
        env = make_vector_env(hp.env_id, n, False, hp.normalize_observation, False, hp.gamma, hp.env_kwargs)
        train_norm = find_wrapper(self.collector.env, NormalizeObservation) if self.collector else None
        norm = find_wrapper(env, NormalizeObservation)
        if norm is not None:
            norm.frozen = True
            if train_norm is not None:
                norm.load_state_dict(train_norm.state_dict())
        space = env.single_action_space
        discrete = isinstance(space, gym.spaces.Discrete)

        def act(obs: np.ndarray) -> np.ndarray:
            a = policy.act_deterministic(torch.as_tensor(obs, dtype=torch.float32, device=policy.device)).cpu().numpy()
            return a.astype(np.int64) if discrete else np.clip(a, space.low, space.high)

        return play_episodes(env, act, episodes, self.eval_seeds(n))
