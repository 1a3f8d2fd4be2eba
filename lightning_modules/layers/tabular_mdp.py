"""Finite discounted MDPs with exact policy evaluation (float64): the ground truth for tabular policy-optimisation
experiments (SPMA / NPG / softmax PG) and any recipe that needs exact values of small MDPs.

An MDP is ``P`` (S, A, S) transition probabilities, ``r`` (S, A) rewards, ``gamma`` and ``rho`` (S) the start
distribution.  With ``P_pi[s, s'] = sum_a pi(a|s) P[s, a, s']`` and ``r_pi[s] = sum_a pi(a|s) r[s, a]``:

* ``V = (I - gamma P_pi)^-1 r_pi``, ``Q = r + gamma P V``, ``A = Q - V``, ``J = rho . V``;
* the discounted occupancy ``d_rho^pi = (1 - gamma) rho^T (I - gamma P_pi)^-1``;
* ``J*`` from policy iteration (exact: it stops when the greedy policy repeats).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

D = torch.float64


@dataclass
class TabularMDP:
    P: torch.Tensor  # (S, A, S)
    r: torch.Tensor  # (S, A)
    gamma: float
    rho: torch.Tensor  # (S,)

    def __post_init__(self):
        S, A, S2 = self.P.shape
        if S != S2 or self.r.shape != (S, A) or self.rho.shape != (S,):
            raise ValueError(f"inconsistent MDP shapes P {tuple(self.P.shape)}, r {tuple(self.r.shape)}, "
                             f"rho {tuple(self.rho.shape)}")
        if not 0 < self.gamma < 1:
            raise ValueError(f"gamma must be in (0, 1), got {self.gamma}")
        self.P, self.r, self.rho = self.P.to(D), self.r.to(D), self.rho.to(D)
        if not torch.allclose(self.P.sum(-1), torch.ones(S, A, dtype=D), atol=1e-10):
            raise ValueError("every P[s, a, :] must sum to 1")

    @property
    def states(self) -> int:
        return self.P.shape[0]

    @property
    def actions(self) -> int:
        return self.P.shape[1]


def _resolvent(mdp: TabularMDP, pi: torch.Tensor, P: torch.Tensor,
               r: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    P_pi = torch.einsum("sa,sat->st", pi, P)
    eye = torch.eye(mdp.states, dtype=D, device=pi.device)
    return eye - mdp.gamma * P_pi, (pi * r).sum(-1)


def evaluate(mdp: TabularMDP, pi: torch.Tensor) -> dict:
    """Exact ``V`` (S), ``Q`` and ``A`` (S, A), ``J`` and the occupancy ``d`` (S) of a policy ``pi`` (S, A), on
    ``pi``'s device (the MDP, built on the CPU, is copied there: a module's policy may live on a GPU)."""
    pi = pi.to(D)
    P, r, rho = (t.to(pi.device) for t in (mdp.P, mdp.r, mdp.rho))
    M, r_pi = _resolvent(mdp, pi, P, r)
    V = torch.linalg.solve(M, r_pi)
    Q = r + mdp.gamma * torch.einsum("sat,t->sa", P, V)
    d = (1 - mdp.gamma) * torch.linalg.solve(M.T, rho)
    return {"V": V, "Q": Q, "A": Q - V[:, None], "J": float(rho @ V), "d": d}


def optimal(mdp: TabularMDP, max_iter: int = 10_000) -> dict:
    """Policy iteration from the uniform policy: the optimal deterministic policy, ``V*`` and ``J*``."""
    pi = torch.full((mdp.states, mdp.actions), 1.0 / mdp.actions, dtype=D)
    greedy = None
    for _ in range(max_iter):
        ev = evaluate(mdp, pi)
        new = ev["Q"].argmax(-1)
        if greedy is not None and torch.equal(new, greedy):
            return {"pi": pi, "V": ev["V"], "J": ev["J"]}
        greedy = new
        pi = torch.nn.functional.one_hot(new, mdp.actions).to(D)
    raise RuntimeError("policy iteration did not converge")


def chain(states: int = 10, actions: int = 4, slip: float = 0.1, gamma: float = 0.9, left_reward: float = 0.1,
          right_reward: float = 1.0) -> TabularMDP:
    """A chain with clear action gaps: action 0 moves right, action 1 moves left (each slipping to the other side
    with ``slip``), the other actions stay; reward ``right_reward`` at the right end, ``left_reward`` (a distractor)
    at the left end, for every action; uniform start."""
    if states < 2 or actions < 2:
        raise ValueError(f"a chain needs >= 2 states and >= 2 actions, got {states}, {actions}")
    P = torch.zeros(states, actions, states, dtype=D)
    for s in range(states):
        right, left = min(s + 1, states - 1), max(s - 1, 0)
        P[s, 0, right] += 1 - slip
        P[s, 0, left] += slip
        P[s, 1, left] += 1 - slip
        P[s, 1, right] += slip
        for a in range(2, actions):
            P[s, a, s] = 1.0
    r = torch.zeros(states, actions, dtype=D)
    r[-1, :], r[0, :] = right_reward, left_reward
    return TabularMDP(P, r, gamma, torch.full((states,), 1.0 / states, dtype=D))


def random_mdp(states: int = 20, actions: int = 4, gamma: float = 0.9, concentration: float = 0.3,
               seed: int = 0) -> TabularMDP:
    """``P(.|s, a) ~ Dirichlet(concentration)``, ``r ~ U[0, 1]``, uniform start (the spec's prototype instance)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    P = torch.as_tensor(rng.dirichlet(np.full(states, concentration), size=(states, actions)))
    r = torch.as_tensor(rng.uniform(0, 1, size=(states, actions)))
    return TabularMDP(P, r, gamma, torch.full((states,), 1.0 / states, dtype=D))
