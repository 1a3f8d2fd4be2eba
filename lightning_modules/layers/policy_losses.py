"""Policy-optimisation losses as pure functions of per-sample tensors (minimised; means over the minibatch).

With ``lr = log pi_theta(a|s) - log pi_old(a|s)`` and ``r = exp(lr)`` for actions sampled from ``pi_old``:

* ``spma_loss`` (Asad et al., AISTATS 2025, the official code's deep loss): ``-lr * A + (1/eta) * KL``, where KL is
  the "k3" estimator ``(r - 1) - lr`` of ``KL(pi_old || pi_theta)`` (``kl="k3"``, default) or the linear Bregman
  term ``-lr`` (``kl="linear"``: unbiased, higher variance).  At ``r = 1`` the KL term is 0 and so is its gradient:
  the first inner step is the pure policy gradient ``-A grad log pi``.
* ``mdpo_loss`` (Tomar et al., 2020): ``-r * A + (1/eta) * r * lr``, the ratio-weighted advantage and the reverse
  ``KL(pi_theta || pi_old)`` estimated with samples of ``pi_old``.
* ``ppo_clip_loss`` (Schulman et al., 2017): ``-min(r A, clip(r, 1 - eps, 1 + eps) A)``.

``normalize_advantages`` uses the unbiased (N - 1) standard deviation, as the official SPMA (SB3) code does.
"""
from __future__ import annotations

import torch

POLICY_LOSSES = ("spma", "ppo", "mdpo")
KL_ESTIMATORS = ("k3", "linear")


def normalize_advantages(adv: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    if adv.numel() < 2:
        return adv
    return (adv - adv.mean()) / (adv.std(unbiased=True) + eps)


def kl_k3(logp_new: torch.Tensor, logp_old: torch.Tensor) -> torch.Tensor:
    """Per-sample ``(r - 1) - log r``: non-negative, an unbiased estimate of ``KL(pi_old || pi_new)``."""
    lr = logp_new - logp_old
    return torch.expm1(lr) - lr


def spma_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, eta: float,
              kl: str = "k3") -> torch.Tensor:
    if not eta > 0:
        raise ValueError(f"eta must be > 0, got {eta}")
    lr = logp_new - logp_old
    if kl == "k3":
        div = kl_k3(logp_new, logp_old)
    elif kl == "linear":
        div = -lr
    else:
        raise ValueError(f"kl={kl!r}; expected one of {', '.join(KL_ESTIMATORS)}")
    return (-lr * adv + div / eta).mean()


def mdpo_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, eta: float) -> torch.Tensor:
    if not eta > 0:
        raise ValueError(f"eta must be > 0, got {eta}")
    lr = logp_new - logp_old
    r = lr.exp()
    return (-r * adv + r * lr / eta).mean()


def ppo_clip_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, clip: float) -> torch.Tensor:
    if not clip > 0:
        raise ValueError(f"clip range must be > 0, got {clip}")
    r = (logp_new - logp_old).exp()
    return -torch.minimum(r * adv, r.clamp(1 - clip, 1 + clip) * adv).mean()


def policy_loss(name: str, logp_new: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, eta: float = 1.0,
                clip: float = 0.2, kl: str = "k3") -> torch.Tensor:
    if name == "spma":
        return spma_loss(logp_new, logp_old, adv, eta, kl)
    if name == "mdpo":
        return mdpo_loss(logp_new, logp_old, adv, eta)
    if name == "ppo":
        return ppo_clip_loss(logp_new, logp_old, adv, clip)
    raise ValueError(f"policy loss {name!r}; expected one of {', '.join(POLICY_LOSSES)}")


def clip_fraction(logp_new: torch.Tensor, logp_old: torch.Tensor, clip: float) -> torch.Tensor:
    return ((logp_new - logp_old).exp().sub(1).abs() > clip).float().mean()


def explained_variance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - Var[target - pred] / Var[target]`` (nan when the target is constant)."""
    var = target.var(unbiased=False)
    return 1 - (target - pred).var(unbiased=False) / var if var > 0 else torch.full_like(var, float("nan"))
