"""Replay memory for the off-policy recipes (the storage half of the off-policy foundation).

``ReplayBuffer`` keeps the last ``capacity`` transitions of ``num_envs`` parallel environments in flat numpy arrays:
every ``add`` writes one transition per environment, so environment ``i``'s consecutive transitions are
``num_envs`` slots apart (time-major), ``capacity`` is a multiple of ``num_envs``, and the oldest transitions are
overwritten first.  Observations keep their dtype (``uint8`` / ``bool`` frames stay one byte per value);
``bytes_per_transition`` states the memory.

Sampling is uniform over the transitions whose ``n``-step window is complete and n-step returns are formed then: ``R =
sum_{k<K} gamma^k r_{t+k}`` over the ``K <= n`` steps up to the first episode end, bootstrapped from the next
observation of step ``t+K-1`` with discount ``gamma^K`` (0 if that step terminated; a truncated episode bootstraps
from its final observation). A transition added with ``frames=F`` (a semi-MDP transition spanning ``F`` frames, the
realtime recipes) counts as ``F`` steps in the discounts: ``gamma^(F_0 + ... + F_{K-1})``. The newest ``n - 1`` steps
of each environment wait until their window is complete. ``state_dict()`` holds the contents, the counters and the
sampling generator, so a resumed run samples the same minibatches.

``PrioritizedReplayBuffer`` (Schaul et al. 2016, as Dopamine's Rainbow) samples a transition with probability
proportional to ``priority^alpha`` through a ``SumTree`` (stratified: one draw per equal slice of the total), new
windows at the largest priority seen so far, and returns importance weights ``(len * P)^-beta`` divided by their
batch maximum; ``update_priorities`` takes the learner's new priorities (``|TD error|`` or the per-sample loss).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch


class ReplayBuffer:
    def __init__(self, capacity: int, obs_shape: Tuple[int, ...], num_envs: int = 1, n_step: int = 1,
                 gamma: float = 0.99, obs_dtype=np.uint8, seed: int = 0):
        if num_envs < 1 or n_step < 1:
            raise ValueError(f"replay needs num_envs >= 1 and n_step >= 1, got {num_envs}, {n_step}")
        if capacity < num_envs * n_step:
            raise ValueError(f"replay capacity {capacity} must hold n_step x num_envs = {num_envs * n_step} "
                             "transitions at least")
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        self.capacity = capacity - capacity % num_envs
        self.num_envs, self.n_step, self.gamma = num_envs, n_step, gamma
        self.obs = np.zeros((self.capacity, *obs_shape), dtype=obs_dtype)
        self.next_obs = np.zeros_like(self.obs)
        self.actions = np.zeros(self.capacity, dtype=np.int64)
        self.rewards = np.zeros(self.capacity, dtype=np.float32)
        self.terminated = np.zeros(self.capacity, dtype=bool)
        self.done = np.zeros(self.capacity, dtype=bool)  # terminated or truncated: the episode ended here
        self.frames = np.ones(self.capacity, dtype=np.int32)  # frames a transition spans (semi-MDP discount)
        self.added = 0  # transitions written so far (logical position of the next write)
        self.rng = np.random.default_rng(seed)

    @property
    def bytes_per_transition(self) -> int:
        return (2 * self.obs[0].nbytes + self.actions.itemsize + self.rewards.itemsize + self.terminated.itemsize
                + self.done.itemsize + self.frames.itemsize)

    def __len__(self) -> int:
        return min(self.added, self.capacity)

    def add(self, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, next_obs: np.ndarray,
            terminated: np.ndarray, truncated: np.ndarray, frames: Optional[np.ndarray] = None) -> None:
        """One transition per environment (arrays with a leading ``num_envs`` axis); ``next_obs`` is the true next
        observation (the final one when the episode ended); ``frames``: how many frames each spans (a semi-MDP
        transition is discounted by ``gamma ** frames``; 1 by default)."""
        i = self.added % self.capacity
        rows = slice(i, i + self.num_envs)
        self.obs[rows], self.next_obs[rows] = obs, next_obs
        self.actions[rows], self.rewards[rows] = actions, rewards
        self.terminated[rows] = terminated
        self.done[rows] = np.logical_or(terminated, truncated)
        self.frames[rows] = 1 if frames is None else frames
        self.added += self.num_envs

    def sampleable(self) -> Tuple[int, int]:
        """``[lo, hi]``: the logical positions whose n-step window is complete and still stored (empty if lo > hi)."""
        lo = max(0, self.added - self.capacity)
        hi = self.added - 1 - (self.n_step - 1) * self.num_envs
        return lo, hi

    def can_sample(self) -> bool:
        lo, hi = self.sampleable()
        return hi >= lo

    def n_step_targets(self, logical: np.ndarray) -> Dict[str, np.ndarray]:
        """Returns, bootstrap observations and discounts of the windows starting at ``logical`` positions."""
        B, N = len(logical), self.num_envs
        ret = np.zeros(B, dtype=np.float64)
        discount = np.ones(B, dtype=np.float64)
        alive = np.ones(B, dtype=bool)  # the window has not met an episode end yet
        last = logical % self.capacity
        for k in range(self.n_step):
            idx = (logical + k * N) % self.capacity
            ret += np.where(alive, discount * self.rewards[idx], 0.0)
            discount = np.where(alive, discount * self.gamma ** self.frames[idx], discount)
            last = np.where(alive, idx, last)
            alive &= ~self.done[idx]
        discount = np.where(self.terminated[last], 0.0, discount)
        return {"returns": ret.astype(np.float32), "next_obs": self.next_obs[last],
                "discounts": discount.astype(np.float32)}

    def sample(self, batch_size: int) -> Dict[str, torch.Tensor]:
        """``obs``, ``actions``, n-step ``returns``, bootstrap ``next_obs`` and ``discounts`` (0 after termination),
        and the sampled ``indices``."""
        lo, hi = self.sampleable()
        if hi < lo:
            raise RuntimeError(f"the replay buffer holds no complete {self.n_step}-step window yet")
        logical = self.rng.integers(lo, hi + 1, size=batch_size)
        idx = logical % self.capacity
        out = self.n_step_targets(logical)
        return {"obs": torch.from_numpy(self.obs[idx]), "actions": torch.from_numpy(self.actions[idx]),
                "returns": torch.from_numpy(out["returns"]), "next_obs": torch.from_numpy(out["next_obs"]),
                "discounts": torch.from_numpy(out["discounts"]), "indices": torch.from_numpy(idx)}

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> Dict[str, object]:
        n = len(self)
        return {"obs": torch.from_numpy(self.obs[:n].copy()), "next_obs": torch.from_numpy(self.next_obs[:n].copy()),
                "actions": torch.from_numpy(self.actions[:n].copy()),
                "rewards": torch.from_numpy(self.rewards[:n].copy()),
                "terminated": torch.from_numpy(self.terminated[:n].copy()),
                "done": torch.from_numpy(self.done[:n].copy()), "frames": torch.from_numpy(self.frames[:n].copy()),
                "added": self.added,
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        n = state["obs"].shape[0]
        if n > self.capacity or tuple(state["obs"].shape[1:]) != self.obs.shape[1:]:
            raise ValueError(f"the checkpoint's replay buffer ({tuple(state['obs'].shape)}) does not fit this one "
                             f"(capacity {self.capacity}, observations {self.obs.shape[1:]})")
        for name in ("obs", "next_obs", "actions", "rewards", "terminated", "done", "frames"):
            if name in state:  # checkpoints from before semi-MDP transitions have no frames: 1 each
                getattr(self, name)[:n] = state[name].numpy()
        self.added = int(state["added"])
        self.rng.bit_generator.state = state["rng"]


class SumTree:
    """Sums of non-negative leaf values in a complete binary tree (``size`` a power of two): vectorised updates and
    prefix-sum search, O(log capacity) each."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.size = 1 << max(0, (capacity - 1).bit_length())
        self.tree = np.zeros(2 * self.size)

    @property
    def total(self) -> float:
        return float(self.tree[1])

    def leaves(self, idx: np.ndarray) -> np.ndarray:
        return self.tree[np.asarray(idx) + self.size]

    def update(self, idx: np.ndarray, values: np.ndarray) -> None:
        node = np.asarray(idx, dtype=np.int64) + self.size
        if node.size == 0:
            return
        self.tree[node] = values
        while node[0] > 1:  # all leaves sit at the same depth: climb one level at a time
            node = np.unique(node // 2)
            self.tree[node] = self.tree[2 * node] + self.tree[2 * node + 1]

    def find(self, prefix: np.ndarray) -> np.ndarray:
        """The leaf where each running sum ``prefix`` (in ``[0, total)``) falls; never a zero leaf while total > 0."""
        u = np.asarray(prefix, dtype=np.float64).copy()
        node = np.ones(len(u), dtype=np.int64)
        while node[0] < self.size:
            left = 2 * node
            right_mass = self.tree[left + 1]
            go_right = (u >= self.tree[left]) & (right_mass > 0) | (self.tree[left] <= 0)
            u = np.where(go_right, u - self.tree[left], u)
            node = np.where(go_right, left + 1, left)
        return node - self.size


class PrioritizedReplayBuffer(ReplayBuffer):
    def __init__(self, capacity: int, obs_shape: Tuple[int, ...], num_envs: int = 1, n_step: int = 1,
                 gamma: float = 0.99, obs_dtype=np.uint8, seed: int = 0, alpha: float = 0.5, beta: float = 0.5,
                 epsilon: float = 1e-6):
        super().__init__(capacity, obs_shape, num_envs, n_step, gamma, obs_dtype, seed)
        if not 0 <= alpha <= 1 or not 0 <= beta <= 1:
            raise ValueError(f"prioritised replay needs alpha and beta in [0, 1], got {alpha}, {beta}")
        self.alpha, self.beta, self.epsilon = alpha, beta, epsilon
        self.tree = SumTree(self.capacity)
        self.max_priority = 1.0

    def add(self, obs, actions, rewards, next_obs, terminated, truncated, frames=None) -> None:
        first = self.added % self.capacity
        self.tree.update(np.arange(first, first + self.num_envs), np.zeros(self.num_envs))  # incomplete windows
        super().add(obs, actions, rewards, next_obs, terminated, truncated, frames)
        lo, hi = self.sampleable()
        start = max(lo, hi - self.num_envs + 1)
        if hi >= start:  # the windows this write completed enter at the largest priority so far
            done = np.arange(start, hi + 1) % self.capacity
            self.tree.update(done, np.full(len(done), self.max_priority ** self.alpha))

    def sample(self, batch_size: int) -> Dict[str, torch.Tensor]:
        if not self.can_sample() or self.tree.total <= 0:
            raise RuntimeError(f"the replay buffer holds no complete {self.n_step}-step window yet")
        total = self.tree.total
        prefix = (np.arange(batch_size) + self.rng.random(batch_size)) * (total / batch_size)
        idx = self.tree.find(np.minimum(prefix, np.nextafter(total, 0)))
        probs = self.tree.leaves(idx) / total
        lo, hi = self.sampleable()
        weights = (probs * (hi - lo + 1)) ** -self.beta
        out = self.n_step_targets(idx)
        return {"obs": torch.from_numpy(self.obs[idx]), "actions": torch.from_numpy(self.actions[idx]),
                "returns": torch.from_numpy(out["returns"]), "next_obs": torch.from_numpy(out["next_obs"]),
                "discounts": torch.from_numpy(out["discounts"]), "indices": torch.from_numpy(idx),
                "weights": torch.from_numpy((weights / weights.max()).astype(np.float32))}

    def update_priorities(self, indices: np.ndarray, priorities: np.ndarray) -> None:
        """New priorities of sampled slots (those overwritten since are left alone)."""
        indices = np.asarray(indices, dtype=np.int64)
        p = np.abs(np.asarray(priorities, dtype=np.float64)) + self.epsilon
        live = self.tree.leaves(indices) > 0
        if live.any():
            self.max_priority = max(self.max_priority, float(p[live].max()))
            self.tree.update(indices[live], p[live] ** self.alpha)

    def state_dict(self) -> Dict[str, object]:
        return {**super().state_dict(), "priorities": torch.from_numpy(self.tree.leaves(np.arange(self.capacity))),
                "max_priority": self.max_priority}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        super().load_state_dict(state)
        self.tree.update(np.arange(self.capacity), state["priorities"].numpy())
        self.max_priority = float(state["max_priority"])


def describe_memory(buffer: ReplayBuffer) -> str:
    total = buffer.bytes_per_transition * buffer.capacity
    return (f"replay: {buffer.capacity:,} transitions x {buffer.bytes_per_transition} bytes = "
            f"{total / 2**20:.1f} MiB")
