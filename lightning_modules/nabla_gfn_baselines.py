"""The reward-gradient baselines of the Nabla-GFlowNet comparison (spec ``nabla_gfn.md`` 4.1), on the same prior,
sampler, reward and metrics as ``NablaGFN`` (``lightning_modules.nabla_gfn_align``).  Both maximise ``beta log r``
directly, with no prior term, which is why they collapse onto the reward's mode.

* ``DRaFT`` (DRaFT-K, Clark et al. 2024): run the chain without gradients, then its last ``last_steps`` steps with
  gradients through the network; loss ``-beta mean log r(x_K)``.
* ``ReFL`` (Xu et al. 2023): run the chain without gradients to a random state whose timestep lies in
  ``[timestep_range[0], timestep_range[1])``, predict the clean sample in one step with gradients; loss
  ``-beta mean log r(x0_hat)``.
* ``DDPO`` (Black et al. 2024, the option the issue names; gradient-free in the reward): PPO-clip on the Gaussian
  log-probabilities of the sampled transitions, ``ratio = p_theta(x_prev | x_t) / p_old``, with the batch-standardised
  rewards as advantages (clipped to ``adv_clip``), ``timestep_fraction`` of each trajectory's steps per update.  With
  one update per batch of trajectories the ratio is 1 and the gradient is REINFORCE's (tested).  Its learning rate
  defaults to 1e-4: on the ring, 1e-3 diverged; at 1e-4, 300 iterations reached reward -0.64 with on-support 0.26
  (it drifts off the prior's support, more slowly than the gradient baselines).
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch

from lightning_modules.nabla_gfn import subsample_steps
from lightning_modules.nabla_gfn_align import DiffusionAlignment


class DRaFT(DiffusionAlignment):
    def __init__(self, *args, last_steps: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        if not 1 <= last_steps <= self.chain.num_steps:
            raise ValueError(f"model.last_steps must be in [1, {self.chain.num_steps}], got {last_steps}")
        self.save_hyperparameters()

    def alignment_loss(self) -> Dict[str, torch.Tensor]:
        hp, chain = self.hparams, self.chain
        g = self.generator()
        first = chain.num_steps - hp.last_steps
        x = self.sample(hp.batch_size, g, stop=first)["x"]
        for k in range(first, chain.num_steps):
            kk = chain.full(k, len(x))
            noise = torch.randn(x.shape, generator=g).to(x.device, x.dtype)
            x = chain.mean(x, self.eps_policy(x, chain.timesteps[kk]), kk) + chain.std(kk, x) * noise
        log_r = self.reward(x)
        return {"loss": -hp.beta * log_r.mean(), "reward": log_r.mean().detach()}


class ReFL(DiffusionAlignment):
    def __init__(self, *args, timestep_range: Sequence[int] = (5, 15), **kwargs):
        super().__init__(*args, **kwargs)
        lo, hi = (int(v) for v in timestep_range)
        self.states = [j for j in range(self.chain.num_steps) if lo <= int(self.chain.timesteps[j]) < hi]
        if not self.states:
            raise ValueError(f"model.timestep_range {list(timestep_range)} holds no timestep of the sampling chain "
                             f"({int(self.chain.timesteps[-1])} .. {int(self.chain.timesteps[0])})")
        self.save_hyperparameters()

    def alignment_loss(self) -> Dict[str, torch.Tensor]:
        hp, chain = self.hparams, self.chain
        g = self.generator()
        j = self.states[int(torch.randint(len(self.states), (1,), generator=g))]
        x = self.sample(hp.batch_size, g, stop=j)["x"]
        jj = chain.full(j, len(x))
        x0 = chain.x0_hat(x, self.eps_policy(x, chain.timesteps[jj]), jj)
        log_r = self.reward(x0)
        return {"loss": -hp.beta * log_r.mean(), "reward": log_r.mean().detach()}


class DDPO(DiffusionAlignment):
    def __init__(self, *args, clip_range: float = 1e-4, adv_clip: float = 5.0, timestep_fraction: float = 1.0,
                 **kwargs):
        kwargs.setdefault("lr", 1e-4)  # measured on the ring: 1e-3 diverges within 200 iterations, 1e-4 does not
        super().__init__(*args, **kwargs)
        if clip_range <= 0 or adv_clip <= 0 or not 0 <= timestep_fraction <= 1:
            raise ValueError(f"DDPO needs clip_range > 0, adv_clip > 0 and timestep_fraction in [0, 1]; got "
                             f"{clip_range}, {adv_clip}, {timestep_fraction}")
        self.save_hyperparameters()

    def alignment_loss(self) -> Dict[str, torch.Tensor]:
        hp, chain = self.hparams, self.chain
        g = self.generator()
        out = self.sample(hp.batch_size, g, keep=True)
        with torch.no_grad():
            log_r = self.reward(out["x"])
            adv = ((log_r - log_r.mean()) / (log_r.std() + 1e-8)).clamp(-hp.adv_clip, hp.adv_clip)
        if hp.timestep_fraction >= 1:
            steps = torch.arange(chain.num_steps).expand(hp.batch_size, -1)
        else:
            steps = subsample_steps(chain.num_steps, hp.batch_size, hp.timestep_fraction, g)
        rows = torch.arange(hp.batch_size)[:, None].expand_as(steps).reshape(-1).to(out["x"].device)
        k = steps.reshape(-1).to(out["x"].device)
        keep = chain.var[k] > 0  # a deterministic step has no density
        rows, k = rows[keep], k[keep]
        self.use_prompts(out["prompts"][rows.cpu()] if "prompts" in out else None)
        x_t, x_prev, eps_old = out["states"][k, rows], out["states"][k + 1, rows], out["eps"][k, rows]
        var = chain.var[k].to(x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))
        mu_new = chain.mean(x_t, self.eps_policy(x_t, chain.timesteps[k]), k)
        mu_old = chain.mean(x_t, eps_old, k)
        log_ratio = (((x_prev - mu_old) ** 2 - (x_prev - mu_new) ** 2) / (2 * var)).flatten(1).sum(-1)
        ratio = log_ratio.exp()
        a = adv[rows]
        loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - hp.clip_range, 1 + hp.clip_range)).mean()
        return {"loss": loss, "reward": log_r.mean()}
