"""Softmax Policy Mirror Ascent (Asad et al., AISTATS 2025, "Fast Convergence of Softmax Policy Mirror Ascent";
spec ``shared/specs/spma.md``).

Tabular, exact advantages (``layers.tabular_mdp``), float64; each update is written as the direction it adds to the
logits ``z`` (one SGD step of size 1, so the trainer counts iterations and checkpoints them like any step):

* ``spma_update``: ``pi <- pi (1 + eta A)``, in log space ``z <- log pi + log1p(eta_t A)``; ``sum_a pi A = 0``
  keeps it on the simplex with no normaliser.  ``eta_t = min(eta, guard / max(-A))`` keeps ``1 + eta_t A > 0``
  (``guard < 1``; any ``eta < 1 - gamma`` never needs it with rewards in [0, 1]).
* ``npg_update``: ``pi <- pi exp(eta A) / Z`` (SPMA is its first-order expansion: they agree to O(eta^2)).
* ``spg_update``: ``z <- z + alpha d(s) pi A / (1 - gamma)`` (the softmax policy gradient), ``alpha = (1 - gamma)^3 / 8``
  for its theory step (``spg_step: theory``) or a given constant.
* ``loglinear_spma_projection``: log-linear policies ``pi_theta(a|s) ~ exp(theta . phi(s, a))``; the SPMA target
  ``p = pi_t (1 + eta A)`` projected by ``argmin_theta E_{s ~ d^pi_t} CE(p(.|s), pi_theta(.|s))``, a convex
  weighted softmax classification solved with L-BFGS to tolerance.

``TabularPolicyOptimization`` runs one of them on a ``datamodules.tabular_mdp`` MDP, one iteration per training step,
logging ``train/gap`` (``J* - J(pi_t)``), ``train/log10_gap``, ``train/J``, ``train/eta_t`` and the simplex error.

``SPMAAgent`` is the deep recipe: the on-policy actor-critic (``layers.on_policy``) with the official code's loss
``-log r * A + (1/eta) * ((r - 1) - log r)``; ``loss: ppo`` / ``loss: mdpo`` give the baselines with the very same
rollouts, networks, optimisers and inner loop.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.layers import tabular_mdp
from lightning_modules.layers.on_policy import OnPolicyModule

D = torch.float64
TABULAR_METHODS = ("spma", "npg", "spg", "spma_loglinear")


# ---------------------------------------------------------------------------------------------------- tabular updates
def safe_eta(A: torch.Tensor, eta: float, guard: float = 0.9) -> float:
    worst = float((-A).max())
    return eta if worst <= 0 or eta * worst < guard else guard / worst


def spma_update(log_pi: torch.Tensor, A: torch.Tensor, eta: float, guard: float = 0.9) -> Tuple[torch.Tensor, float]:
    """``(log pi_{t+1}, eta_t)``: ``pi (1 + eta_t A)`` in log space (no normalisation)."""
    eta_t = safe_eta(A, eta, guard)
    return log_pi + torch.log1p(eta_t * A), eta_t


def npg_update(log_pi: torch.Tensor, A: torch.Tensor, eta: float) -> torch.Tensor:
    return F.log_softmax(log_pi + eta * A, -1)


def spg_update(z: torch.Tensor, A: torch.Tensor, d: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    return z + alpha * d[:, None] * z.softmax(-1) * A / (1 - gamma)


def tabular_gaps(mdp: tabular_mdp.TabularMDP, method: str, T: int, step: float,
                 on_policy=None) -> np.ndarray:
    """``J* - J(pi_t)`` for t = 0..T-1 of ``spma`` / ``npg`` (step = eta) or ``spg`` (step = alpha) from the uniform
    policy, in float64; ``on_policy(log_pi)`` sees every iterate (SPMA's unnormalised)."""
    j_star = tabular_mdp.optimal(mdp)["J"]
    z = torch.zeros(mdp.states, mdp.actions, dtype=D)
    gaps = []
    for _ in range(T):
        log_pi = F.log_softmax(z, -1)
        ev = tabular_mdp.evaluate(mdp, log_pi.exp())
        gaps.append(j_star - ev["J"])
        if method == "spma":
            z, _ = spma_update(log_pi, ev["A"], step)
        elif method == "npg":
            z = npg_update(log_pi, ev["A"], step)
        elif method == "spg":
            z = spg_update(z, ev["A"], ev["d"], step, mdp.gamma)
        else:
            raise ValueError(f"method {method!r}; expected spma, npg or spg")
        if on_policy is not None:
            on_policy(z)
    return np.maximum(np.array(gaps), 1e-300)


def features(kind: str, states: int, actions: int, dim: int, seed: int = 0) -> torch.Tensor:
    """``phi`` (S, A, dim): ``random`` Gaussian features, or ``aggregated`` one-hots of (state group, action) with
    states grouped into ``dim // actions`` contiguous blocks (exact for ``dim = S * A``)."""
    if kind == "random":
        return torch.randn(states, actions, dim, generator=torch.Generator().manual_seed(seed), dtype=D)
    if kind == "aggregated":
        groups = dim // actions
        if groups < 1:
            raise ValueError(f"aggregated features need dim >= actions ({actions}), got {dim}")
        phi = torch.zeros(states, actions, groups * actions, dtype=D)
        for s in range(states):
            for a in range(actions):
                phi[s, a, (s * groups // states) * actions + a] = 1.0
        return phi
    raise ValueError(f"features {kind!r}; expected random or aggregated")


def loglinear_policy(theta: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(phi @ theta, -1)


def projection_loss(theta: torch.Tensor, phi: torch.Tensor, target: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``sum_s d(s) CE(target(.|s), pi_theta(.|s))``: convex in ``theta``."""
    return -(d[:, None] * target * loglinear_policy(theta, phi)).sum()


def loglinear_spma_projection(theta0: torch.Tensor, phi: torch.Tensor, target: torch.Tensor, d: torch.Tensor,
                              tol: float = 1e-10, max_iter: int = 100) -> Tuple[torch.Tensor, float]:
    """``(theta, loss)`` minimising ``projection_loss`` from ``theta0`` by damped Newton (exact gradient
    ``sum_s d(s) Phi_s^T (pi_s - p_s)`` and Hessian ``sum_s d(s) Phi_s^T (diag pi_s - pi_s pi_s^T) Phi_s``, a
    pseudo-inverse where features are redundant, backtracking until the loss decreases) until ``|grad| < tol``."""
    theta = theta0.detach().clone().to(D)
    w = target.sum(-1)  # 1 per state for a proper target
    loss = float(projection_loss(theta, phi, target, d))
    for _ in range(max_iter):
        pi = loglinear_policy(theta, phi).exp()
        grad = torch.einsum("s,sak,sa->k", d, phi, pi * w[:, None] - target)
        if float(grad.norm()) < tol:
            break
        mean = torch.einsum("sa,sak->sk", pi, phi)
        cov = torch.einsum("sa,sak,sal->skl", pi, phi, phi) - mean[:, :, None] * mean[:, None, :]
        H = torch.einsum("s,skl->kl", d * w, cov)
        step = torch.linalg.pinv(H, hermitian=True) @ grad
        t = 1.0
        while t > 1e-12:
            trial = theta - t * step
            new = float(projection_loss(trial, phi, target, d))
            if new <= loss - 1e-4 * t * float(grad @ step):
                break
            t *= 0.5
        else:
            break
        theta, loss = trial, new
    return theta, loss


# ---------------------------------------------------------------------------------------------------- tabular module
class TabularPolicyOptimization(L.LightningModule):
    def __init__(self, method: str = "spma", eta: float = 0.1, eta_guard: float = 0.9,
                 spg_step: Union[str, float] = "theory", feature_kind: str = "aggregated", feature_dim: int = 8,
                 seed: int = 0):
        super().__init__()
        if method not in TABULAR_METHODS:
            raise ValueError(f"model.method={method!r}; expected one of {', '.join(TABULAR_METHODS)}")
        if not eta > 0:
            raise ValueError(f"model.eta must be > 0, got {eta}")
        if not 0 < eta_guard < 1:
            raise ValueError(f"model.eta_guard must be in (0, 1), got {eta_guard}")
        if spg_step != "theory" and not float(spg_step) > 0:
            raise ValueError(f"model.spg_step must be 'theory' or > 0, got {spg_step}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.mdp: Optional[tabular_mdp.TabularMDP] = None
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.z: Optional[nn.Parameter] = None

    def setup(self, stage: str) -> None:
        if self.mdp is not None:
            return
        self.mdp = self.trainer.datamodule.mdp
        self.j_star = tabular_mdp.optimal(self.mdp)["J"]
        S, A = self.mdp.states, self.mdp.actions
        if self.hparams.method == "spma_loglinear":
            # a buffer, so that it moves with the module (to the GPU); not saved: rebuilt from the hyperparameters
            self.register_buffer("phi", features(self.hparams.feature_kind, S, A, self.hparams.feature_dim,
                                                 self.hparams.seed), persistent=False)
            self.z = nn.Parameter(torch.zeros(self.phi.shape[-1], dtype=D))  # theta = 0: the uniform policy
        else:
            self.z = nn.Parameter(torch.full((S, A), -torch.log(torch.tensor(float(A))).item(), dtype=D))

    def policy(self) -> torch.Tensor:
        """The current policy ``pi`` (S, A)."""
        with torch.no_grad():
            if self.hparams.method == "spma_loglinear":
                return loglinear_policy(self.z, self.phi).exp()
            return self.z.softmax(-1)

    def configure_optimizers(self):
        return torch.optim.SGD([self.z], lr=1.0)  # z <- z - grad, with grad = -(the method's update)

    def training_step(self, batch, batch_idx):
        hp, mdp = self.hparams, self.mdp
        pi = self.policy()
        ev = tabular_mdp.evaluate(mdp, pi)
        A, eta_t, z = ev["A"], hp.eta, self.z.detach()
        if hp.method == "spma":
            new, eta_t = spma_update(F.log_softmax(z, -1), A, hp.eta, hp.eta_guard)
            simplex_error = float((new.exp().sum(-1) - 1).abs().max())
            if simplex_error > 1e-9:
                raise RuntimeError(f"SPMA left the simplex by {simplex_error:.3g} at iteration {int(self.iteration)}")
            new = F.log_softmax(new, -1)  # removes the ~1e-16 rounding, nothing more
        elif hp.method == "npg":
            new, simplex_error = npg_update(F.log_softmax(z, -1), A, hp.eta), 0.0
        elif hp.method == "spg":
            alpha = (1 - mdp.gamma) ** 3 / 8 if hp.spg_step == "theory" else float(hp.spg_step)
            new, eta_t, simplex_error = spg_update(z, A, ev["d"], alpha, mdp.gamma), alpha, 0.0
        else:  # log-linear SPMA: project the SPMA target onto the policy class
            eta_t = safe_eta(A, hp.eta, hp.eta_guard)
            target = pi * (1 + eta_t * A)
            simplex_error = float((target.sum(-1) - 1).abs().max())
            new, loss = loglinear_spma_projection(z, self.phi, target, ev["d"])
            self.log("train/projection_loss", loss, on_step=True, on_epoch=False, batch_size=1)
        opt = self.optimizers()
        opt.zero_grad()
        self.z.grad = z - new
        opt.step()
        self.iteration += 1
        gap = max(self.j_star - ev["J"], 0.0)
        self.last = {"iteration": int(self.iteration), "J": ev["J"], "gap": gap, "eta_t": float(eta_t),
                     "simplex_error": simplex_error}  # float64, for the report
        log = dict(on_step=True, on_epoch=False, batch_size=1)
        self.log("train/J", ev["J"], **log)
        self.log("train/gap", gap, prog_bar=True, **log)
        self.log("train/log10_gap", float(torch.log10(torch.tensor(max(gap, 1e-300)))), **log)
        self.log("train/eta_t", float(eta_t), **log)
        self.log("train/simplex_error", simplex_error, **log)

    def _exact(self, split: str) -> None:
        ev = tabular_mdp.evaluate(self.mdp, self.policy())
        self.log(f"{split}/J", ev["J"], batch_size=1)
        self.log(f"{split}/gap", max(self.j_star - ev["J"], 0.0), prog_bar=split == "val", batch_size=1)

    def validation_step(self, batch, batch_idx):
        self._exact("val")

    def test_step(self, batch, batch_idx):
        self._exact("test")

    def predict_step(self, batch, batch_idx):
        """One record per state: ``index`` (state), ``prediction`` (the most likely action), its ``probability``,
        ``optimal`` (an optimal action), ``value`` V^pi(s) and ``optimal_value`` V*(s)."""
        s = int(batch)
        pi = self.policy()
        star = tabular_mdp.optimal(self.mdp)
        V = tabular_mdp.evaluate(self.mdp, pi)["V"]
        return [{"index": s, "prediction": int(pi[s].argmax()), "probability": round(float(pi[s].max()), 6),
                 "optimal": int(star["pi"][s].argmax()), "value": round(float(V[s]), 6),
                 "optimal_value": round(float(star["V"][s]), 6)}]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tabular_shape"] = tuple(self.z.shape)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.z is None and "tabular_shape" in checkpoint:
            self.z = nn.Parameter(torch.zeros(checkpoint["tabular_shape"], dtype=D))


# ---------------------------------------------------------------------------------------------------- deep agent
class SPMAAgent(OnPolicyModule):
    """The deep SPMA recipe (``loss: spma``, ``eta``, ``kl: k3 | linear``) and its baselines (``loss: ppo | mdpo``);
    everything else is ``layers.on_policy.OnPolicyModule``."""
