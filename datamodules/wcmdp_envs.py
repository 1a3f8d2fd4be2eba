"""Gymnasium environments of the machine-replacement WCMDP (Tu et al., AISTATS 2025; spec ``fair_wcmdp.md`` 1.5):

* ``CountProportionEnv`` (CP-DRL): identical machines; at each reset ``N`` is drawn from ``machine_range`` and the
  budget ``K`` from ``resource_range`` (capped at ``N``).  Observation ``(n_0/N, ..., n_{S-1}/N, K/N)``, fixed size
  whatever ``N``.  Action ``[0, 1]^{S+1}``: a priority per local state and the share of the budget to use, decoded as
  the official code does: ``budget = min(floor(u_S (K + 1)), K)``; priorities of empty states zeroed and normalised
  (the state proportions if all are zero); then ``budget`` times: draw a state by priority and, if a machine in it
  has not been replaced yet, replace one chosen uniformly among them (arms in a state are exchangeable: the policy is
  permutation invariant by construction).  Reward: the mean per-arm reward plus ``reward_offset`` (+1 in the
  official code).  ``info["arm_rewards"]`` holds each arm's own reward, for per-arm values.
* ``JointStateEnv``: a fixed list of (possibly different) arms; observation the arms' one-hot local states
  concatenated; action an index into the budget-feasible joint actions (``datamodules.wcmdp.budget_actions``);
  the same reward.  The non-invariant baseline.

Episodes last ``episode_length`` steps (300 in the official evaluation) and are truncated there; arms start in
uniformly random local states (the LPs' uniform start).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import gymnasium as gym
import numpy as np

from datamodules.wcmdp import Arm, budget_actions


def _check_range(name: str, value, low: int) -> Tuple[int, int]:
    try:
        lo, hi = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair [low, high] of integers, got {value!r}") from None
    if not low <= lo <= hi:
        raise ValueError(f"{name}={[lo, hi]} must satisfy {low} <= low <= high")
    return lo, hi


class _MachineEnv(gym.Env):
    def __init__(self, episode_length: int, reward_offset: float):
        if not isinstance(episode_length, int) or episode_length < 1:
            raise ValueError(f"episode_length must be an integer >= 1, got {episode_length!r}")
        self.episode_length, self.reward_offset = episode_length, float(reward_offset)
        self.t = 0

    @staticmethod
    def _tables(arms: Sequence[Arm]) -> Tuple[np.ndarray, np.ndarray]:
        """Per arm: cumulative transition rows ``(n, 2, S, S)`` and rewards ``(n, S, 2)``, for vectorised steps."""
        return (np.stack([np.cumsum(arm.P, axis=-1) for arm in arms]), np.stack([arm.reward for arm in arms]))

    def _advance(self, cum: np.ndarray, rewards: np.ndarray, replace: np.ndarray):
        """One step of every arm at once: ``cum``/``rewards`` from ``_tables`` (one row per arm)."""
        n = len(self.local)
        idx = np.arange(n)
        arm_rewards = rewards[idx, self.local, replace]
        rows = cum[idx, replace, self.local]  # (n, S)
        u = self.np_random.random(n)
        self.local = np.minimum((rows <= u[:, None]).sum(axis=1), rows.shape[1] - 1)
        self.t += 1
        reward = float(arm_rewards.mean()) + self.reward_offset
        return reward, self.t >= self.episode_length, {"arm_rewards": arm_rewards, "replaced": replace.copy()}


class CountProportionEnv(_MachineEnv):
    def __init__(self, arm: Arm, machine_range=(2, 5), resource_range=(1, 1), episode_length: int = 300,
                 reward_offset: float = 1.0):
        super().__init__(episode_length, reward_offset)
        self.arm, self.S = arm, arm.n_states
        self.machine_range = _check_range("machine_range", machine_range, 1)
        self.resource_range = _check_range("resource_range", resource_range, 0)
        if self.resource_range[0] > self.machine_range[0]:
            raise ValueError(f"resource_range={list(self.resource_range)} starts above the fewest machines "
                             f"{self.machine_range[0]}: a budget must be in [0, N]")
        self.observation_space = gym.spaces.Box(0.0, 1.0, (self.S + 1,), np.float32)
        self.action_space = gym.spaces.Box(0.0, 1.0, (self.S + 1,), np.float32)
        self.n_arms, self.budget = self.machine_range[0], self.resource_range[0]
        self.local = np.zeros(self.n_arms, dtype=np.int64)
        cum, rewards = self._tables([arm])
        self._cum, self._rewards = cum[0], rewards[0]  # identical arms: one table, indexed per arm below

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        opts = options or {}
        self.n_arms = int(opts.get("n_arms", self.np_random.integers(self.machine_range[0],
                                                                       self.machine_range[1] + 1)))
        budget = opts.get("budget", self.np_random.integers(self.resource_range[0], self.resource_range[1] + 1))
        self.budget = min(int(budget), self.n_arms)
        self.local = self.np_random.integers(0, self.S, self.n_arms)
        self.t = 0
        return self._obs(), {"n_arms": self.n_arms, "budget": self.budget}

    def counts(self) -> np.ndarray:
        return np.bincount(self.local, minlength=self.S)

    def _obs(self) -> np.ndarray:
        return np.append(self.counts() / self.n_arms, self.budget / self.n_arms).astype(np.float32)

    def decode(self, action: np.ndarray) -> np.ndarray:
        """The machines (indices) replaced this step for a continuous action (the official decoding)."""
        action = np.clip(np.asarray(action, dtype=np.float64).ravel(), 0.0, 1.0)
        use = min(int(np.floor(action[self.S] * (self.budget + 1))), self.budget)
        counts = self.counts()
        prio = np.where(counts > 0, action[:self.S], 0.0)
        prio = prio / prio.sum() if prio.sum() > 0 else counts / counts.sum()
        replace = np.zeros(self.n_arms, dtype=np.int64)
        for _ in range(use):
            s = int(self.np_random.choice(self.S, p=prio))
            free = np.flatnonzero((self.local == s) & (replace == 0))
            if len(free):
                replace[self.np_random.choice(free)] = 1
        return replace

    def step(self, action):
        replace = self.decode(action)
        n = self.n_arms
        reward, truncated, info = self._advance(np.broadcast_to(self._cum, (n,) + self._cum.shape),
                                                np.broadcast_to(self._rewards, (n,) + self._rewards.shape), replace)
        return self._obs(), reward, False, truncated, info


class JointStateEnv(_MachineEnv):
    def __init__(self, arms: Sequence[Arm], budget: int = 1, use_all_resources: bool = False,
                 episode_length: int = 300, reward_offset: float = 1.0):
        super().__init__(episode_length, reward_offset)
        self.arms = list(arms)
        self.S = self.arms[0].n_states
        self.actions = budget_actions(len(self.arms), budget, use_all_resources)
        self._cum, self._rewards = self._tables(self.arms)
        self.observation_space = gym.spaces.Box(0.0, 1.0, (len(self.arms) * self.S,), np.float32)
        self.action_space = gym.spaces.Discrete(len(self.actions))
        self.local = np.zeros(len(self.arms), dtype=np.int64)

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        self.local = self.np_random.integers(0, self.S, len(self.arms))
        self.t = 0
        return self._obs(), {}

    def _obs(self) -> np.ndarray:
        obs = np.zeros((len(self.arms), self.S), dtype=np.float32)
        obs[np.arange(len(self.arms)), self.local] = 1.0
        return obs.ravel()

    def step(self, action):
        reward, truncated, info = self._advance(self._cum, self._rewards, self.actions[int(action)])
        return self._obs(), reward, False, truncated, info
