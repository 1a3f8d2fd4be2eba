"""Losses of online RLHF from sampled responses, as pure functions (minimised; Noukhovitch et al., ICLR 2025, spec
``async_rlhf.md`` section 2; the official code's conventions, read in ``mnoukhov/async_rlhf`` and TRL 0.9.4).

Shapes: ``k`` responses per prompt are stored prompt-major, row ``b * k + j`` is sample ``j`` of prompt ``b``;
``scores`` is ``(B, k)``; per-token tensors are ``(B * k, L)`` with a 0/1 ``mask`` of the response tokens (up to and
including the first EOS); sequence log-probabilities are sums over masked tokens.

* ``layers.causal_lm.response_logprobs``: ``log softmax(logits / T)[y]`` per response token (the policy's
  *and* the reference's logits are divided by the sampling temperature, as TRL does, so the implicit reward is on the
  sampling scale).
* ``select_pairs``: chosen = argmax, rejected = argmin of the ``k`` scores per prompt, and which prompts tie (every
  score equal).  The official code keeps ties in the mean (loss ``log 2``, gradient 0); ``mask_ties`` drops them.
* ``dpo_pair_losses`` / ``dpo_loss`` (their mean): ``-log sigmoid(beta * h)`` (``sigmoid``) or
  ``(h - 1 / (2 beta))^2`` (``ipo``) with
  ``h = (log pi(y+) - log pi(y-)) - (log ref(y+) - log ref(y-))``; no behaviour-policy log-probabilities.
* ``rloo_advantages``: ``score - kl_coef * sum_t (log pi_b - log ref)`` minus the mean of the other ``k - 1`` samples
  of the same prompt; ``rloo_loss``: PPO-clip on the *sequence-level* ratio ``pi_theta / pi_b`` (the staleness
  correction that clipping zeroes out as the data ages).
* ``ppo_token_rewards`` / ``ppo_advantages`` / ``ppo_losses``: TRL's PPOv2 -- the per-token KL penalty with the score
  added at the last response token, GAE over tokens (``datamodules.rollouts.gae``), advantages whitened over response
  tokens, clipped token-level policy loss and clipped value loss.
* ``best_of_k_nll``: ``-mean sum_t log pi(y+)`` of the best-scored sample (online rejection-sampling SFT).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from datamodules.rollouts import gae
from lightning_modules.layers.policy_losses import ppo_clip_loss

DPO_KINDS = ("sigmoid", "ipo")


def select_pairs(scores: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``scores`` (B, k) -> flat row indices of the chosen and rejected samples (B,), and the tie flags (B,)."""
    B, k = scores.shape
    base = torch.arange(B, device=scores.device) * k
    chosen, rejected = scores.argmax(-1), scores.argmin(-1)
    tie = scores.max(-1).values == scores.min(-1).values
    return base + chosen, base + rejected, tie


def _masked_mean(x: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    if keep is None:
        return x.mean()
    keep = keep.to(x.dtype)
    return (x * keep).sum() / keep.sum().clamp(min=1.0)


def dpo_pair_losses(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, beta: float, kind: str = "sigmoid") -> torch.Tensor:
    """The loss of every pair (B,), unreduced: what a per-pair weighting (Feasible Learning's multipliers) needs."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    h = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)
    if kind == "sigmoid":
        return -F.logsigmoid(beta * h)
    if kind == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    raise ValueError(f"DPO loss kind {kind!r}; expected one of {', '.join(DPO_KINDS)}")


def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, kind: str = "sigmoid",
             keep: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Sequence log-probabilities (B,) -> the mean loss over the pairs ``keep`` selects (all by default) and the
    logged statistics: implicit rewards ``beta * (log pi - log ref)`` of chosen / rejected, their margin and
    accuracy."""
    per_pair = dpo_pair_losses(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta, kind)
    r_c, r_r = beta * (pi_chosen - ref_chosen).detach(), beta * (pi_rejected - ref_rejected).detach()
    stats = {"rewards_chosen": _masked_mean(r_c, keep), "rewards_rejected": _masked_mean(r_r, keep),
             "margin": _masked_mean(r_c - r_r, keep), "accuracy": _masked_mean((r_c > r_r).to(per_pair.dtype), keep)}
    return _masked_mean(per_pair, keep), stats


def rloo_advantages(scores: torch.Tensor, seq_logp_behaviour: torch.Tensor, seq_logp_ref: torch.Tensor,
                    kl_coef: float) -> torch.Tensor:
    """``scores`` (B, k), sequence log-probs (B * k,) -> leave-one-out advantages (B * k,)."""
    B, k = scores.shape
    if k < 2:
        raise ValueError(f"RLOO needs k >= 2 samples per prompt, got k={k}")
    reward = scores - kl_coef * (seq_logp_behaviour - seq_logp_ref).view(B, k)
    baseline = (reward.sum(-1, keepdim=True) - reward) / (k - 1)
    return (reward - baseline).reshape(-1)


def rloo_loss(seq_logp: torch.Tensor, seq_logp_behaviour: torch.Tensor, advantages: torch.Tensor,
              clip: float) -> torch.Tensor:
    return ppo_clip_loss(seq_logp, seq_logp_behaviour, advantages.detach(), clip)


def ppo_token_rewards(scores: torch.Tensor, logp_behaviour: torch.Tensor, logp_ref: torch.Tensor,
                      mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards (n, L): ``-kl_coef * (log pi_b - log ref)`` on response tokens, plus ``scores`` (n,) at the
    last response token."""
    rewards = -kl_coef * (logp_behaviour - logp_ref) * mask
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    return rewards.scatter_add(1, last[:, None], scores.to(rewards.dtype)[:, None])


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / std`` over the masked entries (TRL's ``masked_whiten``: unbiased variance)."""
    m = mask.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / (n - 1).clamp(min=1.0)
    return (x - mean) * torch.rsqrt(var + eps)


def ppo_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                   lam: float = 0.95) -> Tuple[torch.Tensor, torch.Tensor]:
    """GAE over the token axis of ``(n, L)`` tensors; every sequence ends at its last response token (nothing is
    bootstrapped past it).  Returns ``(whitened advantages, returns)``, both 0 off the mask."""
    m = mask.to(rewards.dtype)
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    dones = torch.zeros_like(m).scatter(1, last[:, None], 1.0)
    adv, ret = gae((rewards * m).T, (values * m).T, dones.T, torch.zeros_like(rewards[:, 0]), gamma, lam)
    adv, ret = adv.T * m, ret.T * m
    return whiten(adv, mask) * m, ret


def ppo_losses(logp: torch.Tensor, logp_behaviour: torch.Tensor, advantages: torch.Tensor, values: torch.Tensor,
               values_old: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float,
               value_clip: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token-level clipped policy loss and clipped value loss ``0.5 max((v - R)^2, (clip(v, v_old +- c) - R)^2)``,
    both means over response tokens."""
    m = mask.to(logp.dtype)
    ratio = (logp - logp_behaviour).exp()
    pg = -torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    v_clipped = values_old + (values - values_old).clamp(-value_clip, value_clip)
    vf = 0.5 * torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)
    n = m.sum().clamp(min=1.0)
    return (pg * m).sum() / n, (vf * m).sum() / n


def best_of_k_nll(seq_logp: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``-mean(log pi(best sample))``: ``seq_logp`` (B * k,), ``scores`` (B, k)."""
    B, k = scores.shape
    best = torch.arange(B, device=scores.device) * k + scores.argmax(-1)
    return -seq_logp[best].mean()
