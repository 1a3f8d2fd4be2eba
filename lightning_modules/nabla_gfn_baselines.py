"""The reward-gradient baselines of the Nabla-GFlowNet comparison (spec ``nabla_gfn.md`` 4.1), on the same prior,
sampler, reward and metrics as ``NablaGFN`` (``lightning_modules.nabla_gfn_align``).  Both maximise ``beta log r``
directly, with no prior term, which is why they collapse onto the reward's mode.

* ``DRaFT`` (DRaFT-K, Clark et al. 2024): run the chain without gradients, then its last ``last_steps`` steps with
  gradients through the network; loss ``-beta mean log r(x_K)``.
* ``ReFL`` (Xu et al. 2023): run the chain without gradients to a random state whose timestep lies in
  ``[timestep_range[0], timestep_range[1])``, predict the clean sample in one step with gradients; loss
  ``-beta mean log r(x0_hat)``.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch

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
