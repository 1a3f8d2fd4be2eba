"""Weakly coupled MDPs for fair resource allocation (Tu et al., AISTATS 2025; spec ``shared/specs/fair_wcmdp.md``,
errata first): the machine-replacement arms of the official code and the joint MDP they form under a budget.

* ``machine_replacement_arm``: one machine with ``n_states`` deterioration levels and two actions (0 keep, 1 replace).
  Keep: stay with ``prob_remain``, else move ``deterioration_step`` levels up (the last level absorbs).  Replace: go
  to level 0 with the arm's own ``prob_remain``, else to level 1 (errata 3).  Costs: operation ``s**2``
  (``quadratic``) or ``s`` (``linear``) when keeping, the constant ``replace_cost_scale * (n_states - 1)**2`` when
  replacing, both divided by the largest; the reward is minus the cost.  ``replace_cost_scale`` is 0.5 in the
  official configs and 1.5 in its code default (errata 1): a setting.
* ``JointMDP``: ``N`` arms evolving independently, coupled by at most ``budget`` replacements per step (exactly
  ``budget`` with ``use_all_resources``, errata 2).  Joint states are tuples of local states in lexicographic order
  (arm 0 most significant); one transition matrix per joint action, the Kronecker product of the arms' matrices;
  per-arm rewards ``r[s, a, i]``; the initial distribution uniform over joint states (as in the official code).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import List, Sequence

import numpy as np
from scipy import sparse
from scipy.special import gammaln

COST_TYPES = ("quadratic", "linear")


@dataclass
class Arm:
    """``P[a]``: ``(S, S)`` transition matrix of action ``a``; ``reward[s, a]``."""
    P: np.ndarray
    reward: np.ndarray

    @property
    def n_states(self) -> int:
        return self.P.shape[1]


def machine_replacement_arm(n_states: int = 3, prob_remain: float = 0.8, deterioration_step: int = 1,
                            cost_type: str = "quadratic", replace_cost_scale: float = 0.5) -> Arm:
    if not isinstance(n_states, int) or n_states < 2:
        raise ValueError(f"n_states must be an integer >= 2, got {n_states!r}")
    if not 0 <= prob_remain <= 1:
        raise ValueError(f"prob_remain must be in [0, 1], got {prob_remain}")
    if not isinstance(deterioration_step, int) or deterioration_step < 1:
        raise ValueError(f"deterioration_step must be an integer >= 1, got {deterioration_step!r}")
    if cost_type not in COST_TYPES:
        raise ValueError(f"cost_type={cost_type!r}; expected one of {', '.join(COST_TYPES)}")
    if not replace_cost_scale >= 0:
        raise ValueError(f"replace_cost_scale must be >= 0, got {replace_cost_scale}")
    S = n_states
    P = np.zeros((2, S, S))
    for s in range(S):
        up = min(s + deterioration_step, S - 1)
        P[0, s, s] += prob_remain
        P[0, s, up] += 1 - prob_remain
        P[1, s, 0] += prob_remain
        P[1, s, 1] += 1 - prob_remain
    levels = np.arange(S, dtype=float)
    operation = levels ** 2 if cost_type == "quadratic" else levels
    cost = np.stack([operation, np.full(S, replace_cost_scale * (S - 1) ** 2)], axis=1)
    cost = cost / cost.max()
    return Arm(P=P, reward=-cost)


def machine_replacement_arms(n_arms: int, n_states: int = 3, prob_remain=0.8, cost_type="quadratic",
                             replace_cost_scale: float = 0.5, deterioration_step: int = 1) -> List[Arm]:
    """``n_arms`` machines; ``prob_remain`` / ``cost_type`` a value for all or one per arm (heterogeneous arms)."""
    if not isinstance(n_arms, int) or n_arms < 1:
        raise ValueError(f"n_arms must be an integer >= 1, got {n_arms!r}")

    def per_arm(value, name):
        values = list(value) if isinstance(value, (list, tuple)) else [value] * n_arms
        if len(values) != n_arms:
            raise ValueError(f"{name} has {len(values)} values for {n_arms} arms")
        return values

    return [machine_replacement_arm(n_states, p, deterioration_step, c, replace_cost_scale)
            for p, c in zip(per_arm(prob_remain, "prob_remain"), per_arm(cost_type, "cost_type"))]


def budget_actions(n_arms: int, budget: int, use_all_resources: bool = False) -> np.ndarray:
    """Joint actions (0 keep / 1 replace per arm) with at most (or, using all, exactly) ``budget`` replacements."""
    if not isinstance(budget, int) or not 0 <= budget <= n_arms:
        raise ValueError(f"budget must be an integer in [0, {n_arms}] (the number of arms), got {budget!r}")
    acts = [a for a in itertools.product((0, 1), repeat=n_arms)
            if (sum(a) == budget if use_all_resources else sum(a) <= budget)]
    return np.array(acts, dtype=np.int64).reshape(len(acts), n_arms)


class JointMDP:
    """The joint MDP of ``arms`` under a replacement budget (see the module docstring)."""

    def __init__(self, arms: Sequence[Arm], budget: int = 1, gamma: float = 0.95, use_all_resources: bool = False,
                 max_states: int = 100_000):
        if not 0 <= gamma < 1:
            raise ValueError(f"gamma must be in [0, 1), got {gamma}")
        sizes = {arm.n_states for arm in arms}
        if len(sizes) != 1:
            raise ValueError(f"all arms need the same number of states, got {sorted(sizes)}")
        self.arms, self.gamma, self.n_arms = list(arms), float(gamma), len(arms)
        self.n_local = sizes.pop()
        self.n_states = self.n_local ** self.n_arms
        if self.n_states > max_states:
            raise ValueError(f"{self.n_arms} arms of {self.n_local} states make {self.n_states:,} joint states "
                             f"(limit {max_states:,}): use the count MDP for identical arms")
        self.actions = budget_actions(self.n_arms, budget, use_all_resources)
        self.budget, self.use_all_resources = budget, use_all_resources
        self.states = np.array(list(itertools.product(range(self.n_local), repeat=self.n_arms)), dtype=np.int64)
        self.P = [self._kron([arm.P[a_i] for arm, a_i in zip(self.arms, a)]) for a in self.actions]
        # reward[s, a, i] = r_i(s_i, a_i)
        self.reward = np.stack([np.stack([arm.reward[self.states[:, i], a[i]] for a in self.actions], axis=1)
                                for i, arm in enumerate(self.arms)], axis=2)
        self.mu = np.full(self.n_states, 1.0 / self.n_states)

    @staticmethod
    def _kron(mats: List[np.ndarray]) -> sparse.csr_matrix:
        out = sparse.csr_matrix(mats[0])
        for m in mats[1:]:
            out = sparse.kron(out, sparse.csr_matrix(m), format="csr")
        return out

    @property
    def n_actions(self) -> int:
        return len(self.actions)


def _log_multinomial(counts) -> float:
    counts = np.asarray(counts)
    return float(gammaln(counts.sum() + 1) - gammaln(counts + 1).sum())


class CountMDP:
    """The count-aggregated MDP of ``n_arms`` identical arms (spec 1.4): a state is how many arms are in each local
    state, an action how many arms in each local state are replaced (at most, or with ``use_all_resources`` exactly,
    ``min(budget, n_arms)``).  Transitions convolve the arms' multinomial moves; the reward is the sum over arms; the
    initial distribution is the push-forward of the uniform joint start, the multinomial ``N! / prod n_s! / S^N``
    computed in log space (the official int64 version overflows from N = 23, errata 4)."""

    def __init__(self, arm: Arm, n_arms: int, budget: int = 1, gamma: float = 0.95, use_all_resources: bool = False):
        if not isinstance(n_arms, int) or n_arms < 1:
            raise ValueError(f"n_arms must be an integer >= 1, got {n_arms!r}")
        if not isinstance(budget, int) or not 0 <= budget <= n_arms:
            raise ValueError(f"budget must be an integer in [0, {n_arms}] (the number of arms), got {budget!r}")
        if not 0 <= gamma < 1:
            raise ValueError(f"gamma must be in [0, 1), got {gamma}")
        self.arm, self.n_arms, self.budget, self.gamma = arm, n_arms, budget, float(gamma)
        S = self.n_local = arm.n_states
        self.states = [c for c in itertools.product(range(n_arms + 1), repeat=S) if sum(c) == n_arms]
        self.index = {c: j for j, c in enumerate(self.states)}
        self.n_states = len(self.states)
        need = min(budget, n_arms)
        # actions: replacements per local state; feasible ones depend on the state
        self.actions = [m for m in itertools.product(range(budget + 1), repeat=S)
                        if (sum(m) == need if use_all_resources else sum(m) <= budget)]
        self.n_actions = len(self.actions)
        self.feasible = np.array([[all(mi <= ci for mi, ci in zip(m, c)) for m in self.actions]
                                  for c in self.states])
        self._moves: dict = {}
        rows, cols, vals = [], [], []
        self.reward = np.zeros((self.n_states, self.n_actions))
        for j, c in enumerate(self.states):
            for a, m in enumerate(self.actions):
                if not self.feasible[j, a]:
                    continue
                keep = [ci - mi for ci, mi in zip(c, m)]
                self.reward[j, a] = sum(keep[s] * arm.reward[s, 0] + m[s] * arm.reward[s, 1] for s in range(S))
                dist = {tuple([0] * S): 1.0}
                for s in range(S):
                    for act, n in ((0, keep[s]), (1, m[s])):
                        if n:
                            dist = self._convolve(dist, self._multinomial(n, act, s))
                for nxt, p in dist.items():
                    rows.append(j * self.n_actions + a)
                    cols.append(self.index[nxt])
                    vals.append(p)
        # P[(j, a), j'] for feasible pairs (infeasible rows stay empty)
        self.P = sparse.csr_matrix((vals, (rows, cols)), shape=(self.n_states * self.n_actions, self.n_states))
        logs = np.array([_log_multinomial(c) for c in self.states]) - n_arms * np.log(S)
        self.mu = np.exp(logs)

    def _multinomial(self, n: int, action: int, s: int) -> dict:
        key = (n, action, s)
        if key not in self._moves:
            p = self.arm.P[action, s]
            out = {}
            for c in itertools.product(range(n + 1), repeat=self.n_local):
                if sum(c) == n and all(pi > 0 or ci == 0 for pi, ci in zip(p, c)):
                    logp = _log_multinomial(c) + sum(ci * np.log(pi) for pi, ci in zip(p, c) if ci)
                    out[c] = float(np.exp(logp))
            self._moves[key] = out
        return self._moves[key]

    @staticmethod
    def _convolve(a: dict, b: dict) -> dict:
        out: dict = {}
        for ca, pa in a.items():
            for cb, pb in b.items():
                key = tuple(x + y for x, y in zip(ca, cb))
                out[key] = out.get(key, 0.0) + pa * pb
        return out
