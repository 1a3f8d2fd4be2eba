"""Exact solvers for fair resource allocation in weakly coupled MDPs (Tu et al., AISTATS 2025; spec
``shared/specs/fair_wcmdp.md`` 1.2-1.3): the generalized Gini function, the GGF occupancy-measure LP and the
utilitarian LP of a joint MDP (``datamodules.wcmdp.JointMDP``), solved by scipy's HiGHS, and exact policy
evaluation.

GGF of per-arm values ``v``: ``sum_k w_k v_(k)`` with ``v`` sorted ascending and ``w`` non-increasing, summing to 1
(the worst-off arm weighs most).  The LP (reward form; dual of the assignment problem that sorts ``v``)::

    maximise  sum_k l_k + sum_i n_i
    s.t.      l_k + n_i <= w_k sum_{s,a} r_i(s, a) x(s, a)                     for every rank k and arm i
              sum_a x(s', a) - gamma sum_{s,a} P(s'|s, a) x(s, a) = mu(s')     for every joint state s'
              x >= 0

A GGF-optimal policy may be randomised: ``pi(a|s) = x(s, a) / sum_a' x(s, a')``; simulate it by sampling.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy import sparse
from scipy.optimize import linprog
from scipy.sparse.linalg import spsolve

WEIGHTS = ("exponential2", "exponential3", "uniform")


def ggf_weights(n: int, kind: str = "exponential2") -> np.ndarray:
    """``w_k`` proportional to ``1 / 2**(k-1)`` (``exponential2``, the official default), ``1 / 3**(k-1)`` or uniform,
    normalised to sum to 1."""
    if kind not in WEIGHTS:
        raise ValueError(f"weights={kind!r}; expected one of {', '.join(WEIGHTS)}")
    base = {"exponential2": 2.0, "exponential3": 3.0, "uniform": 1.0}[kind]
    w = base ** -np.arange(n, dtype=float)
    return w / w.sum()


def check_weights(w) -> np.ndarray:
    w = np.asarray(w, dtype=float)
    if w.ndim != 1 or not len(w):
        raise ValueError(f"GGF weights must be a non-empty vector, got shape {w.shape}")
    if np.any(np.diff(w) > 1e-12) or np.any(w < 0):
        raise ValueError(f"GGF weights must be non-negative and non-increasing (worst-off first), got {w.tolist()}")
    if abs(w.sum() - 1) > 1e-9:
        raise ValueError(f"GGF weights must sum to 1, got {w.tolist()} (sum {w.sum():.6g})")
    return w


def ggf(values, w) -> float:
    """Generalized Gini function of per-arm values (rewards: the lowest value gets ``w[0]``)."""
    return float(np.sort(np.asarray(values, dtype=float)) @ np.asarray(w, dtype=float))


def gini(values) -> float:
    """Gini coefficient of the per-arm values' magnitudes (0 = all equal): mean absolute difference over twice the
    mean absolute value."""
    v = np.abs(np.asarray(values, dtype=float))
    return float(np.abs(v[:, None] - v[None, :]).mean() / (2 * v.mean())) if v.mean() > 0 else 0.0


@dataclass
class Solution:
    """``x[s, a]`` occupancy, ``policy[s, a]``, per-arm ``values`` (expected discounted return from ``mu``),
    ``ggf`` of the values with the weights used, ``objective`` (the LP's own optimum)."""
    x: np.ndarray
    policy: np.ndarray
    values: np.ndarray
    ggf: float
    objective: float


def _flow(mdp) -> sparse.csr_matrix:
    """Rows s': sum_a x(s', a) - gamma sum_{s,a} P_a(s, s') x(s, a); columns (s, a) in row-major order."""
    S, A = mdp.n_states, mdp.n_actions
    blocks = []
    eye = sparse.identity(S, format="csr")
    for a in range(A):
        blocks.append((eye - mdp.gamma * mdp.P[a].T).tocsc())
    # column (s, a) is column s of block a: interleave to row-major (s, a)
    stacked = sparse.hstack(blocks, format="csc")  # columns a * S + s
    order = np.arange(S * A).reshape(A, S).T.ravel()  # (s, a) -> a * S + s
    return stacked[:, order].tocsr()


class LPStatusError(ValueError):
    """HiGHS did not return an optimum (infeasible, unbounded, a limit): a property of the problem as given, so the
    command line reports it in one line."""


def _solve(c, A_ub, b_ub, A_eq, b_eq, bounds, what: str):
    res = linprog(c, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=b_eq, bounds=bounds, method="highs")
    if res.status != 0:
        raise LPStatusError(f"{what}: HiGHS status {res.status}: {res.message}")
    return res


def _solution(mdp, x: np.ndarray, w: np.ndarray, objective: float) -> Solution:
    x = np.maximum(x.reshape(mdp.n_states, mdp.n_actions), 0.0)
    values = np.einsum("sa,sai->i", x, mdp.reward)
    return Solution(x=x, policy=occupancy_policy(x), values=values, ggf=ggf(values, w), objective=objective)


def occupancy_policy(x: np.ndarray) -> np.ndarray:
    """``pi(a|s) = x(s, a) / sum_a x(s, a)``; uniform where a state has no occupancy."""
    total = x.sum(axis=1, keepdims=True)
    return np.where(total > 0, x / np.where(total > 0, total, 1.0), 1.0 / x.shape[1])


def solve_ggf_lp(mdp, weights="exponential2", max_variables: int = 2_000_000) -> Solution:
    """The exact GGF-optimal occupancy measure of a joint MDP."""
    N = mdp.n_arms
    w = ggf_weights(N, weights) if isinstance(weights, str) else check_weights(weights)
    if len(w) != N:
        raise ValueError(f"{len(w)} GGF weights for {N} arms")
    SA = mdp.n_states * mdp.n_actions
    if SA > max_variables:
        raise ValueError(f"the exact GGF LP of {N} arms needs {SA:,} occupancy variables (limit {max_variables:,}); "
                         "for identical arms use the count LP")
    R = mdp.reward.reshape(SA, N)  # (s, a) rows
    # variables: x (SA), l (N), n (N); rows (k, i): l_k + n_i - w_k r_i . x <= 0
    k_idx, i_idx = np.meshgrid(np.arange(N), np.arange(N), indexing="ij")
    k_idx, i_idx = k_idx.ravel(), i_idx.ravel()
    x_part = sparse.csr_matrix(-(w[k_idx, None] * R[:, i_idx].T))
    l_part = sparse.csr_matrix((np.ones(N * N), (np.arange(N * N), k_idx)), shape=(N * N, N))
    n_part = sparse.csr_matrix((np.ones(N * N), (np.arange(N * N), i_idx)), shape=(N * N, N))
    A_ub = sparse.hstack([x_part, l_part, n_part], format="csr")
    A_eq = sparse.hstack([_flow(mdp), sparse.csr_matrix((mdp.n_states, 2 * N))], format="csr")
    c = np.concatenate([np.zeros(SA), -np.ones(2 * N)])
    bounds = [(0, None)] * SA + [(None, None)] * (2 * N)
    res = _solve(c, A_ub, np.zeros(N * N), A_eq, mdp.mu, bounds, f"GGF LP ({N} arms)")
    return _solution(mdp, res.x[:SA], w, -res.fun)


def solve_utilitarian_lp(mdp, weights="exponential2") -> Solution:
    """The occupancy measure maximising the sum of the per-arm values (one optimal vertex: with identical arms its
    split between arms is arbitrary, errata 5)."""
    N = mdp.n_arms
    w = ggf_weights(N, weights) if isinstance(weights, str) else check_weights(weights)
    SA = mdp.n_states * mdp.n_actions
    c = -mdp.reward.sum(axis=2).reshape(SA)
    res = _solve(c, None, None, _flow(mdp), mdp.mu, [(0, None)] * SA, f"utilitarian LP ({N} arms)")
    return _solution(mdp, res.x, w, -res.fun)


def evaluate_policy(mdp, policy: np.ndarray, mu: Optional[np.ndarray] = None) -> np.ndarray:
    """Exact per-arm expected discounted returns of a stationary (possibly randomised) joint policy ``policy[s, a]``:
    ``V_i = (I - gamma P_pi)^-1 r_pi,i``, averaged over ``mu`` (no truncated rollouts, errata 6)."""
    mu = mdp.mu if mu is None else mu
    P_pi = sum(sparse.diags(policy[:, a]) @ mdp.P[a] for a in range(mdp.n_actions))
    r_pi = np.einsum("sa,sai->si", policy, mdp.reward)
    M = (sparse.identity(mdp.n_states, format="csc") - mdp.gamma * P_pi).tocsc()
    V = spsolve(M, r_pi)
    V = V.reshape(mdp.n_states, -1)
    return mu @ V


def solve_count_lp(count_mdp) -> Solution:
    """The utilitarian LP of a count MDP (feasible state-action pairs only), its policy polished by exact policy
    iteration.  With identical arms, ``objective / n_arms`` is the GGF optimum for weights summing to 1 (spec 1.4);
    ``values`` holds that per-arm value N times."""
    m = count_mdp
    S, A = m.n_states, m.n_actions
    pairs = np.flatnonzero(m.feasible.ravel())  # (j, a) row-major
    j_of = pairs // A
    flow = sparse.csr_matrix((np.ones(len(pairs)), (j_of, np.arange(len(pairs)))), shape=(S, len(pairs)))
    flow = flow - m.gamma * m.P[pairs].T
    res = _solve(-m.reward.ravel()[pairs], None, None, flow.tocsr(), m.mu, [(0, None)] * len(pairs),
                 f"count LP ({m.n_arms} arms)")
    x = np.zeros(S * A)
    x[pairs] = np.maximum(res.x, 0.0)
    # polish: HiGHS's tolerances leave ~1e-6 relative at N = 40 (multinomial start weights down to 1e-19), so the
    # LP's greedy policy is improved by exact policy iteration (a utilitarian optimum is deterministic)
    choice = np.where(m.feasible, x.reshape(S, A), -1.0).argmax(axis=1)
    R = np.where(m.feasible, m.reward, -np.inf)
    for _ in range(1000):
        V = _count_policy_values(m, choice)
        Q = R + m.gamma * (m.P @ V).reshape(S, A)
        better = Q.max(axis=1) > Q[np.arange(S), choice] + 1e-12 * (1 + np.abs(V))
        if not better.any():
            break
        choice = np.where(better, Q.argmax(axis=1), choice)
    policy = np.zeros((S, A))
    policy[np.arange(S), choice] = 1.0
    P_pi = m.P[np.arange(S) * A + choice]
    occupancy = spsolve((sparse.identity(S, format="csc") - m.gamma * P_pi.T).tocsc(), m.mu)
    x = policy * occupancy[:, None]
    total = float(m.mu @ V)
    per_arm = total / m.n_arms
    return Solution(x=x, policy=policy, values=np.full(m.n_arms, per_arm), ggf=per_arm, objective=total)


def _count_policy_values(m, choice: np.ndarray) -> np.ndarray:
    policy = np.zeros((m.n_states, m.n_actions))
    policy[np.arange(m.n_states), choice] = 1.0
    return count_policy_state_values(m, policy)


def count_policy_state_values(m, policy: np.ndarray) -> np.ndarray:
    """``V(n)`` of a (possibly randomised) count policy ``policy[j, a]`` (zero on infeasible pairs): the total over
    arms, exactly."""
    S, A = m.n_states, m.n_actions
    if np.any(policy[~m.feasible] > 0):
        raise ValueError("the count policy puts mass on infeasible actions")
    P_pi = sparse.diags(policy.ravel()) @ m.P  # rows (j, a) weighted by pi(a|j)
    P_pi = sparse.csr_matrix((np.ones(S * A), (np.repeat(np.arange(S), A), np.arange(S * A))),
                             shape=(S, S * A)) @ P_pi
    r = (policy * np.where(m.feasible, m.reward, 0.0)).sum(axis=1)
    return spsolve((sparse.identity(S, format="csc") - m.gamma * P_pi).tocsc(), r)


def evaluate_count_policy(m, policy: np.ndarray) -> float:
    """The per-arm expected discounted return of a permutation-invariant policy given on the count MDP (every arm
    has the same value, the total over ``n_arms``), from the multinomial start."""
    return float(m.mu @ count_policy_state_values(m, policy)) / m.n_arms


def index_tiebreak_utilitarian_policy(mdp, tol: float = 1e-9) -> np.ndarray:
    """A deterministic utilitarian-optimal joint policy that breaks ties by arm index (among optimal actions, the one
    replacing the lowest-index arm): optimal in total, but not permutation invariant (errata 5)."""
    R = mdp.reward.sum(axis=2)
    V = np.zeros(mdp.n_states)
    for _ in range(100_000):
        Q = R + mdp.gamma * np.stack([mdp.P[a] @ V for a in range(mdp.n_actions)], axis=1)
        V_new = Q.max(axis=1)
        if np.abs(V_new - V).max() < 1e-13:
            break
        V = V_new
    first = np.array([np.flatnonzero(a)[0] if a.any() else mdp.n_arms for a in mdp.actions])
    policy = np.zeros((mdp.n_states, mdp.n_actions))
    for s in range(mdp.n_states):
        best = np.flatnonzero(Q[s] >= Q[s].max() - tol)
        policy[s, best[np.argmin(first[best])]] = 1.0
    return policy
