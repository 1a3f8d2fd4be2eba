"""Gymnasium environments of the machine-replacement WCMDP (Tu et al., AISTATS 2025; spec ``fair_wcmdp.md`` 1.5):

* ``CountProportionEnv`` (CP-DRL): identical machines; at each reset ``N`` is drawn from ``machine_range`` and the
  budget ``K`` from ``resource_range`` (capped at ``N``).  Observation ``(n_0/N, ..., n_{S-1}/N, K/N)``, fixed size
  whatever ``N``.  Action ``[0, 1]^{S+1}``: a priority per local state and the share of the budget to use, decoded as
  the official code does: ``budget = min(floor(u_S (K + 1)), K)``; priorities of empty states zeroed and normalised
  (the state proportions if all are zero); then ``budget`` times: draw a state by priority and, if a machine in it
  has not been replaced yet, replace one chosen uniformly among them (arms in a state are exchangeable: the policy is
  permutation invariant by construction).  Reward: the mean per-arm reward plus ``reward_offset`` (+1 in the
  official code).  After each step ``env.arm_rewards`` holds each arm's own reward (per-arm values) and
  ``env.replaced`` the machines replaced: attributes, not ``info`` entries, since ``N`` changes between episodes and
  vector environments stack ``info``.
* ``JointStateEnv``: a fixed list of (possibly different) arms; observation the arms' one-hot local states
  concatenated; action an index into the budget-feasible joint actions (``datamodules.wcmdp.budget_actions``);
  the same reward.  The non-invariant baseline.

Episodes last ``episode_length`` steps (300 in the official evaluation) and are truncated there; arms start in
uniformly random local states (the LPs' uniform start).

Both are registered with gymnasium (``COUNT_ENV_ID``, ``JOINT_ENV_ID``; ``datamodules.envs`` registers them on first
use) with the machine parameters as plain keyword arguments, so the on-policy foundation's ``RolloutDataModule``
steps them like any environment id (``data.env_kwargs``).  ``decode_distribution`` is the exact distribution of
``decode``'s replacement counts, for exact evaluation of a count-proportion policy on the count MDP.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import gymnasium as gym
import numpy as np

from datamodules.wcmdp import Arm, budget_actions, machine_replacement_arm, machine_replacement_arms

COUNT_ENV_ID = "WCMDP/MachineReplacementCounts-v0"
JOINT_ENV_ID = "WCMDP/MachineReplacementJoint-v0"


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
        self.arm_rewards: Optional[np.ndarray] = None
        self.replaced: Optional[np.ndarray] = None

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
        self.arm_rewards, self.replaced = arm_rewards, replace.copy()
        return float(arm_rewards.mean()) + self.reward_offset, self.t >= self.episode_length, {}


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

    def budget_to_use(self, action: np.ndarray) -> int:
        return budget_to_use(action, self.S, self.budget)

    def decode(self, action: np.ndarray) -> np.ndarray:
        """The machines (indices) replaced this step for a continuous action (the official decoding)."""
        action = np.clip(np.asarray(action, dtype=np.float64).ravel(), 0.0, 1.0)
        use = budget_to_use(action, self.S, self.budget)
        counts = self.counts()
        prio = state_priorities(action, counts)
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


def budget_to_use(action, n_local: int, budget: int) -> int:
    """The official budget share: ``min(floor(u_S (K + 1)), K)`` of an action clipped to ``[0, 1]``."""
    u = float(np.clip(np.asarray(action, dtype=np.float64).ravel()[n_local], 0.0, 1.0))
    return min(int(np.floor(u * (budget + 1))), budget)


def state_priorities(action, counts) -> np.ndarray:
    """The per-state draw probabilities: priorities of empty states zeroed and normalised; the state proportions
    when nothing is left."""
    counts = np.asarray(counts)
    action = np.clip(np.asarray(action, dtype=np.float64).ravel(), 0.0, 1.0)
    prio = np.where(counts > 0, action[:len(counts)], 0.0)
    return prio / prio.sum() if prio.sum() > 0 else counts / counts.sum()


def decode_distribution(counts, action, budget: int) -> dict:
    """Exact distribution of ``CountProportionEnv.decode``'s replacements per local state (a tuple per outcome):
    ``budget_to_use`` draws of a state by priority, each replacing one machine of it if one is left."""
    counts = tuple(int(c) for c in counts)
    prio = state_priorities(action, counts)
    dist = {tuple([0] * len(counts)): 1.0}
    for _ in range(budget_to_use(action, len(counts), budget)):
        nxt: dict = {}
        for m, p in dist.items():
            for s, q in enumerate(prio):
                if q <= 0:
                    continue
                key = tuple(mi + (i == s and mi < counts[i]) for i, mi in enumerate(m))
                nxt[key] = nxt.get(key, 0.0) + p * q
        dist = nxt
    return dist


def env_kwarg(name: str, value, kind):
    """A keyword argument from a command line (``--data.init_args.env_kwargs.x=3`` arrives as a string) as ``kind``."""
    if kind is bool and isinstance(value, str):
        if value.lower() not in ("true", "false"):
            raise ValueError(f"env_kwargs.{name}={value!r}; expected true or false")
        return value.lower() == "true"
    if isinstance(value, (list, tuple)):
        return [env_kwarg(name, v, kind) for v in value]
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"env_kwargs.{name}={value!r}; expected {kind.__name__}") from None


def make_count_env(n_states: int = 3, prob_remain: float = 0.8, cost_type: str = "quadratic",
                   replace_cost_scale: float = 0.5, deterioration_step: int = 1, machine_range=(2, 5),
                   resource_range=(1, 1), episode_length: int = 300, reward_offset: float = 1.0) -> CountProportionEnv:
    """``COUNT_ENV_ID``: identical machines (``datamodules.wcmdp.machine_replacement_arm``'s parameters)."""
    arm = machine_replacement_arm(env_kwarg("n_states", n_states, int), env_kwarg("prob_remain", prob_remain, float),
                                  env_kwarg("deterioration_step", deterioration_step, int), cost_type,
                                  env_kwarg("replace_cost_scale", replace_cost_scale, float))
    return CountProportionEnv(arm, machine_range, resource_range, env_kwarg("episode_length", episode_length, int),
                              env_kwarg("reward_offset", reward_offset, float))


def make_joint_env(n_arms: int = 3, n_states: int = 3, prob_remain=0.8, cost_type="quadratic",
                   replace_cost_scale: float = 0.5, deterioration_step: int = 1, budget: int = 1,
                   use_all_resources: bool = False, episode_length: int = 300,
                   reward_offset: float = 1.0) -> JointStateEnv:
    """``JOINT_ENV_ID``: ``n_arms`` machines, ``prob_remain`` / ``cost_type`` one value or one per arm."""
    arms = machine_replacement_arms(env_kwarg("n_arms", n_arms, int), env_kwarg("n_states", n_states, int),
                                    env_kwarg("prob_remain", prob_remain, float), cost_type,
                                    env_kwarg("replace_cost_scale", replace_cost_scale, float),
                                    env_kwarg("deterioration_step", deterioration_step, int))
    return JointStateEnv(arms, env_kwarg("budget", budget, int),
                         env_kwarg("use_all_resources", use_all_resources, bool),
                         env_kwarg("episode_length", episode_length, int),
                         env_kwarg("reward_offset", reward_offset, float))


def register() -> None:
    for env_id, entry in ((COUNT_ENV_ID, "make_count_env"), (JOINT_ENV_ID, "make_joint_env")):
        if env_id not in gym.registry:
            gym.register(env_id, entry_point=f"datamodules.wcmdp_envs:{entry}")
