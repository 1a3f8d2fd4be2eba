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

import os
from typing import Dict, List, Optional, Protocol

import gymnasium as gym
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from datamodules.envs import (NormalizeObservation, NormalizeReward, bytes_to_tensor, find_wrapper, make_vector_env,
                              restore_envs, snapshot_envs, tensor_to_bytes)
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


class RolloutCollector:
    """Steps a vector env with a policy; owns the current observations, the episodes in progress and the noise."""

    def __init__(self, env: gym.vector.VectorEnv, n_steps: int, gamma: float, gae_lambda: float, seed: int,
                 world_size: int = 1):
        """``env`` is reset here with seeds ``seed, seed + 1, ...``; the noise generator is seeded from ``seed`` too."""
        if n_steps < 1:
            raise ValueError(f"data.n_steps (rollout length) must be >= 1, got {n_steps}")
        self.env, self.n_steps, self.gamma, self.gae_lambda = env, n_steps, gamma, gae_lambda
        self.world_size = world_size
        self.obs, _ = env.reset(seed=[int(seed) + i for i in range(env.num_envs)])
        self.ep_return = np.zeros(env.num_envs)
        self.ep_length = np.zeros(env.num_envs, dtype=np.int64)
        self.noise = torch.Generator().manual_seed(int(seed) + 2**31)
        self.iteration = 0
        self.episodes: List[tuple] = []  # (env steps of all ranks when it ended, return, length)
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
        finished_returns, finished_lengths = [], []
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
            self.ep_return += raw
            self.ep_length += 1
            if done.any():
                step_count = (self.iteration * T + t + 1) * N * self.world_size
                for i in np.flatnonzero(done):
                    finished_returns.append(self.ep_return[i])
                    finished_lengths.append(int(self.ep_length[i]))
                    self.episodes.append((step_count, float(self.ep_return[i]), int(self.ep_length[i])))
                self.ep_return[done], self.ep_length[done] = 0.0, 0
                next_obs, _ = self.env.reset(options={"reset_mask": done})
            for k, v in (("obs", obs), ("actions", out["actions"]), ("log_probs", out["log_probs"]),
                         ("values", out["values"]), ("rewards", torch.as_tensor(reward, dtype=torch.float32)),
                         ("dones", torch.as_tensor(done))):
                buf[k].append(v.to(device))
            self.obs = next_obs
        rollout = {k: torch.stack(v) for k, v in buf.items()}
        last_value = policy.value(torch.as_tensor(self.obs, dtype=torch.float32, device=device))
        rollout["advantages"], rollout["returns"] = gae(rollout["rewards"], rollout["values"].float(),
                                                        rollout["dones"], last_value.float(), self.gamma,
                                                        self.gae_lambda)
        rollout["episode_returns"] = torch.tensor(finished_returns, dtype=torch.float64)
        rollout["episode_lengths"] = torch.tensor(finished_lengths, dtype=torch.long)
        rollout["iteration"] = torch.tensor(self.iteration)
        self.iteration += 1
        return rollout

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> Dict[str, object]:
        state = {"obs": torch.as_tensor(np.asarray(self.obs)), "ep_return": torch.as_tensor(self.ep_return.copy()),
                 "ep_length": torch.as_tensor(self.ep_length.copy()), "noise": self.noise.get_state(),
                 "iteration": self.iteration, "episodes": torch.tensor(self.episodes, dtype=torch.float64)
                 .reshape(-1, 3)}
        snap = snapshot_envs(self.env)
        if snap is not None:
            state["envs"] = bytes_to_tensor(snap)
        for name, kind in (("normalize_observation", NormalizeObservation), ("normalize_reward", NormalizeReward)):
            wrapper = find_wrapper(self.env, kind)
            if wrapper is not None:
                state[name] = wrapper.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, object], reseed: Optional[int] = None) -> None:
        for name, kind in (("normalize_observation", NormalizeObservation), ("normalize_reward", NormalizeReward)):
            wrapper = find_wrapper(self.env, kind)
            if wrapper is not None and name in state:
                wrapper.load_state_dict(state[name])
        self.noise.set_state(state["noise"])
        self.iteration = int(state["iteration"])
        self.episodes = [(int(s), float(r), int(n)) for s, r, n in state["episodes"].tolist()]
        if "envs" in state and snapshot_envs(self.env) is not None:
            restore_envs(self.env, tensor_to_bytes(state["envs"]))
            self.obs = state["obs"].numpy().copy()
            self.ep_return = state["ep_return"].numpy().copy()
            self.ep_length = state["ep_length"].numpy().copy()
        else:  # worker-process environments: fresh episodes from seeds that depend on the resumed iteration
            n = self.env.num_envs
            self.obs, _ = self.env.reset(seed=[int(reseed or 0) + 7919 * self.iteration + i for i in range(n)])
            self.ep_return, self.ep_length = np.zeros(n), np.zeros(n, dtype=np.int64)


class _Rollouts(IterableDataset):
    def __init__(self, dm: "RolloutDataModule"):
        self.dm = dm

    def __iter__(self):
        dm = self.dm
        collector = dm.collector
        end = (collector.iteration // dm.hparams.rollouts_per_epoch + 1) * dm.hparams.rollouts_per_epoch
        while collector.iteration < end:
            yield collector.collect(dm.policy)


class _Evaluation(IterableDataset):
    def __init__(self, dm: "RolloutDataModule"):
        self.dm = dm

    def __iter__(self):
        yield self.dm.evaluate(self.dm.policy)


class RolloutDataModule(L.LightningDataModule):
    def __init__(self, env_id: str = "CartPole-v1", num_envs: int = 8, n_steps: int = 256,
                 rollouts_per_epoch: int = 4, gamma: float = 0.99, gae_lambda: float = 0.95,
                 seed: Optional[int] = None,
                 asynchronous: bool = False, normalize_observation: bool = False, normalize_reward: bool = False,
                 eval_episodes: int = 10, env_kwargs: Optional[dict] = None):
        super().__init__()
        if n_steps < 1:
            raise ValueError(f"data.n_steps (rollout length) must be >= 1, got {n_steps}")
        if rollouts_per_epoch < 1:
            raise ValueError(f"data.rollouts_per_epoch must be >= 1, got {rollouts_per_epoch}")
        if not 0 < gamma <= 1 or not 0 <= gae_lambda <= 1:
            raise ValueError(f"data.gamma={gamma} must be in (0, 1] and data.gae_lambda={gae_lambda} in [0, 1]")
        if eval_episodes < 0:
            raise ValueError(f"data.eval_episodes must be >= 0, got {eval_episodes}")
        self.save_hyperparameters(logger=False)
        # no seed given: the run's seed_everything (Lightning exports it as PL_GLOBAL_SEED)
        self.seed = int(seed) if seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        self.collector: Optional[RolloutCollector] = None
        self._pending_state: Optional[dict] = None
        self._spaces: Optional[tuple] = None

    # ------------------------------------------------------------------ spaces (the module builds its networks)
    def _probe(self) -> tuple:
        if self._spaces is None:
            from datamodules.envs import check_env_id

            check_env_id(self.hparams.env_id)
            env = gym.make(self.hparams.env_id, **(self.hparams.env_kwargs or {}))
            self._spaces = (env.observation_space, env.action_space)
            env.close()
        return self._spaces

    @property
    def observation_space(self) -> gym.Space:
        return self._probe()[0]

    @property
    def action_space(self) -> gym.Space:
        return self._probe()[1]

    @property
    def policy(self) -> RolloutPolicy:
        return self.trainer.lightning_module

    # ------------------------------------------------------------------ environments
    def _seed(self, rank: int) -> int:
        return self.seed * 100_003 + rank * self.hparams.num_envs

    def setup(self, stage: str) -> None:
        if self.collector is not None:
            return
        world, rank = world_of(self.trainer)
        hp = self.hparams
        env = make_vector_env(hp.env_id, hp.num_envs, hp.asynchronous, hp.normalize_observation, hp.normalize_reward,
                              hp.gamma, hp.env_kwargs)
        self.collector = RolloutCollector(env, hp.n_steps, hp.gamma, hp.gae_lambda, self._seed(rank), world)
        if self._pending_state is not None:
            self._load(self._pending_state)
            self._pending_state = None

    def teardown(self, stage: str) -> None:  # environment worker processes end with the run
        if self.collector is not None:
            self.collector.env.close()
            self.collector = None

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Rollouts(self), batch_size=None, num_workers=0)

    def val_dataloader(self):
        return DataLoader(_Evaluation(self), batch_size=None, num_workers=0) if self.hparams.eval_episodes else []

    def test_dataloader(self) -> DataLoader:
        return DataLoader(_Evaluation(self), batch_size=None, num_workers=0)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(_Evaluation(self), batch_size=None, num_workers=0)

    @torch.no_grad()
    def evaluate(self, policy: RolloutPolicy) -> Dict[str, torch.Tensor]:
        """``eval_episodes`` episodes with the deterministic policy on fresh environments (the same seeds every
        time, the training observation statistics frozen): raw returns and lengths."""
        hp = self.hparams
        _, rank = world_of(self.trainer)
        episodes = hp.eval_episodes or 10  # test / predict with validation off
        n = min(episodes, 8)
        env = make_vector_env(hp.env_id, n, False, hp.normalize_observation, False, hp.gamma, hp.env_kwargs)
        train_norm = find_wrapper(self.collector.env, NormalizeObservation) if self.collector else None
        norm = find_wrapper(env, NormalizeObservation)
        if norm is not None:
            norm.frozen = True
            if train_norm is not None:
                norm.load_state_dict(train_norm.state_dict())
        obs, _ = env.reset(seed=[self._seed(rank) + 50_000_017 + i for i in range(n)])
        discrete = isinstance(env.single_action_space, gym.spaces.Discrete)
        space = env.single_action_space
        returns, lengths = [], []
        ret, length = np.zeros(n), np.zeros(n, dtype=np.int64)
        started = n
        active = np.ones(n, dtype=bool)
        while active.any():
            a = policy.act_deterministic(torch.as_tensor(obs, dtype=torch.float32, device=policy.device)).cpu().numpy()
            a = a.astype(np.int64) if discrete else np.clip(a, space.low, space.high)
            obs, reward, terminated, truncated, _ = env.step(a)
            ret += np.where(active, reward, 0.0)
            length += active
            ended = np.logical_or(terminated, truncated)
            done = np.logical_and(ended, active)
            for i in np.flatnonzero(done):
                returns.append(ret[i])
                lengths.append(int(length[i]))
                ret[i], length[i] = 0.0, 0
                if started < episodes:
                    started += 1
                else:
                    active[i] = False
            if ended.any():
                obs, _ = env.reset(options={"reset_mask": ended})
        env.close()
        return {"returns": torch.tensor(returns, dtype=torch.float64), "lengths": torch.tensor(lengths)}

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> Dict[str, object]:
        if self.collector is None:
            return {}
        state = self.collector.state_dict()
        world, _ = world_of(self.trainer)
        if world > 1:  # every rank steps its own environments; the checkpoint keeps them all
            gathered: List[Optional[dict]] = [None] * world
            torch.distributed.all_gather_object(gathered, state)
            return {"ranks": gathered}
        return {"ranks": [state]}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        if not state:
            return
        if self.collector is None:
            self._pending_state = state
            return
        self._load(state)

    def _load(self, state: Dict[str, object]) -> None:
        world, rank = world_of(self.trainer)
        ranks = state["ranks"]
        if len(ranks) != world:
            raise ValueError(f"the checkpoint holds the environments of {len(ranks)} processes, this run has {world} "
                             "(resume with the same number of devices)")
        self.collector.load_state_dict(ranks[rank], reseed=self._seed(rank))
