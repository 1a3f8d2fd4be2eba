"""Diffusion sampling as a chain of Gaussian transitions, on the schedules of ``diffusers``.

``GaussianChain`` reads a ``diffusers`` scheduler (``DDPMScheduler`` or ``DDIMScheduler``, built by name or loaded
from a model folder) for its ``alphas_cumprod`` and its inference timesteps, and writes each sampler step as the
Gaussian ``x_prev ~ N(mu(x_t, eps), sigma^2 I)`` of DDIM with noise ``eta`` (``eta = 1``: the DDPM posterior),
vectorised over a *per-sample* step index so that transitions from different steps train in one batch.  A test
checks ``mean`` + ``std`` * z against ``DDIMScheduler.step`` and ``DDPMScheduler.step`` in float64.

Indexing follows diffusers: step ``k = 0 .. K-1`` goes from timestep ``timesteps[k]`` (noisier) to the next one, the
last step to the scheduler's final level (``alphas_cumprod[0]`` with ``set_alpha_to_one=False``).  *States* are
indexed ``j = 0 .. K``: state ``j < K`` sits at ``timesteps[j]``, state ``K`` is the sample.  A grid that ends at
timestep 0 makes its last transition deterministic (``sigma = 0``): ``zero_noise_steps`` lists such steps, and
methods that need a density at every step (the Nabla-GFlowNet residuals) refuse them.

The epsilon networks: ``TimeMLP`` (an MLP on ``[x, sin/cos time features]``, the spec's 2-D net) and ``UNetEps``
(``diffusers.UNet2DModel`` with an ``(x, t) -> eps`` call), built from a plain dict by ``make_eps_net``.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

SCHEDULERS = ("ddpm", "ddim")


def make_scheduler(name: str = "ddpm", folder: Optional[str] = None, **config):
    """A diffusers scheduler: ``name`` in ``SCHEDULERS`` with ``config`` (its constructor's arguments), or the one saved
    in ``folder`` (a model folder with ``scheduler/scheduler_config.json``, or the config file's own folder)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if name not in SCHEDULERS:
        raise ValueError(f"scheduler {name!r} is not one of {', '.join(SCHEDULERS)}")
    cls = DDPMScheduler if name == "ddpm" else DDIMScheduler
    if folder is not None:
        import os

        sub = "scheduler" if os.path.isdir(os.path.join(folder, "scheduler")) else None
        if not os.path.isfile(os.path.join(folder, sub or "", "scheduler_config.json")):
            raise FileNotFoundError(f"no scheduler_config.json in {folder} (or in its scheduler/ folder)")
        return cls.from_pretrained(folder, subfolder=sub, **config)
    return cls(clip_sample=False, **config)


class GaussianChain(nn.Module):
    """The ``num_steps`` sampler transitions of ``scheduler`` with noise ``eta`` (see the module docstring)."""

    def __init__(self, scheduler, num_steps: int, eta: float = 1.0):
        super().__init__()
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        scheduler.set_timesteps(num_steps)
        alphas = scheduler.alphas_cumprod.double()
        timesteps = scheduler.timesteps.long()
        if hasattr(scheduler, "previous_timestep"):  # DDPMScheduler: the last step goes to alpha = 1
            prev = torch.tensor([int(scheduler.previous_timestep(int(t))) for t in timesteps])
        else:  # DDIMScheduler: a fixed stride, the last step to ``final_alpha_cumprod``
            prev = timesteps - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        final = float(getattr(scheduler, "final_alpha_cumprod", torch.tensor(1.0)))
        if type(scheduler).__name__ == "DDPMScheduler":
            final = 1.0  # DDPMScheduler's step uses alpha = 1 below timestep 0
        a_t = alphas[timesteps]
        a_prev = torch.where(prev >= 0, alphas[prev.clamp(min=0)], torch.full_like(a_t, final))
        var = eta ** 2 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        self.num_steps, self.eta = len(timesteps), float(eta)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.register_buffer("timesteps", timesteps, persistent=False)
        self.register_buffer("prev_timesteps", prev.clamp(min=0), persistent=False)
        self.register_buffer("alphas_cumprod", alphas, persistent=False)
        self.register_buffer("a_t", a_t, persistent=False)
        self.register_buffer("a_prev", a_prev, persistent=False)
        self.register_buffer("var", var.clamp(min=0), persistent=False)

    # ---- tables, per sample ------------------------------------------------------------------------------------------
    def zero_noise_steps(self) -> list:
        return [int(k) for k in torch.nonzero(self.var <= 0).flatten()]

    def state_timestep(self, j: torch.Tensor) -> torch.Tensor:
        """The diffusers timestep of state ``j`` (the sample, ``j = K``, gets the last step's target timestep)."""
        table = torch.cat([self.timesteps, self.prev_timesteps[-1:]])
        return table[j]

    def state_alpha(self, j: torch.Tensor) -> torch.Tensor:
        """``alpha_bar`` of state ``j``: ``alphas_cumprod[timesteps[j]]``, and the final level for ``j = K``."""
        return torch.cat([self.a_t, self.a_prev[-1:]])[j]

    @staticmethod
    def _b(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))

    def x0_hat(self, x: torch.Tensor, eps: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """One-step clean prediction ``(x - sqrt(1 - a) eps) / sqrt(a)`` at state ``j``."""
        a = self._b(self.state_alpha(j), x)
        return (x - (1 - a).sqrt() * eps) / a.sqrt()

    def mean(self, x: torch.Tensor, eps: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``mu`` of step ``k`` from ``x`` (at ``timesteps[k]``) and the predicted noise ``eps``."""
        a_prev, var = self._b(self.a_prev[k], x), self._b(self.var[k], x)
        x0 = self.x0_hat(x, eps, k)
        return a_prev.sqrt() * x0 + (1 - a_prev - var).clamp(min=0).sqrt() * eps

    def std(self, k: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self._b(self.var[k], like).sqrt()

    def forward_score(self, mean: torch.Tensor, x_prev: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``grad_{x_prev} log N(x_prev; mean, var_k)`` = ``(mean - x_prev) / var_k``."""
        return (mean - x_prev) / self._b(self.var[k], x_prev)

    def full(self, k: int, n: int) -> torch.Tensor:
        return torch.full((n,), k, dtype=torch.long, device=self.timesteps.device)

    # ---- sampling ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], shape: Sequence[int],
               generator: Optional[torch.Generator] = None, start: Optional[torch.Tensor] = None,
               stop: Optional[int] = None, keep: bool = False) -> Dict[str, torch.Tensor]:
        """Run the chain from ``start`` (default: N(0, I) of ``shape``) through steps ``0 .. stop - 1`` (default all).
        Returns ``x`` (the last state) and with ``keep`` the stacked ``states`` ``(steps + 1, B, ...)`` and the
        networks' ``eps`` ``(steps, B, ...)``.  Noise is drawn on the CPU from ``generator`` (the same samples on
        every device)."""
        dev = self.timesteps.device
        x = start if start is not None else torch.randn(*shape, generator=generator).to(dev)
        stop = self.num_steps if stop is None else stop
        states, epss = [x], []
        for k in range(stop):
            kk = self.full(k, x.shape[0])
            eps = eps_fn(x, self.timesteps[kk])
            noise = torch.randn(x.shape, generator=generator).to(dev, x.dtype)
            x = self.mean(x, eps, kk) + self.std(kk, x) * noise
            if keep:
                states.append(x)
                epss.append(eps)
        out = {"x": x}
        if keep:
            out["states"] = torch.stack(states)
            out["eps"] = torch.stack(epss) if epss else x.new_zeros((0, *x.shape))
        return out


# ---- epsilon networks ------------------------------------------------------------------------------------------------
def time_features(t: torch.Tensor, n: int, horizon: int) -> torch.Tensor:
    """``n`` sinusoidal features of the integer timestep ``t`` (frequencies geometric from 1 to ``horizon``)."""
    freqs = torch.exp(torch.linspace(0.0, math.log(max(horizon, 2)), n // 2, device=t.device)) / horizon
    ang = t.float()[:, None] * freqs[None, :] * math.pi
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


class TimeMLP(nn.Module):
    """``eps(x, t)`` = MLP([x, time features]) with SiLU, for vectors (``shape = [dim]``)."""

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, time_dim: int = 16, horizon: int = 1000):
        super().__init__()
        self.time_dim, self.horizon = time_dim, horizon
        layers, width = [], dim + time_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    @property
    def out_layer(self) -> nn.Linear:
        return self.net[-1]

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, time_features(t, self.time_dim, self.horizon)], dim=-1))


class UNetEps(nn.Module):
    """``diffusers.UNet2DModel`` as ``eps(x, t)`` for images ``(B, C, H, W)``."""

    def __init__(self, channels: int, size: int, block_out_channels: Sequence[int] = (32, 64),
                 layers_per_block: int = 1, attention: bool = True, norm_num_groups: int = 8):
        super().__init__()
        from diffusers import UNet2DModel

        n = len(block_out_channels)
        down = ["DownBlock2D"] * (n - 1) + ["AttnDownBlock2D" if attention else "DownBlock2D"]
        up = ["AttnUpBlock2D" if attention else "UpBlock2D"] + ["UpBlock2D"] * (n - 1)
        self.unet = UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels,
                                block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                                down_block_types=tuple(down), up_block_types=tuple(up),
                                norm_num_groups=norm_num_groups, attention_head_dim=8)

    @property
    def out_layer(self) -> nn.Conv2d:
        return self.unet.conv_out

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t).sample


def make_eps_net(spec: Dict, shape: Sequence[int], horizon: int) -> nn.Module:
    """The network of ``spec`` (``{"kind": "mlp" | "unet", ...its arguments}``) for samples of ``shape``."""
    spec = dict(spec)
    kind = spec.pop("kind", "mlp")
    if kind == "mlp":
        if len(shape) != 1:
            raise ValueError(f"net kind 'mlp' takes vectors, got samples of shape {list(shape)}; use kind 'unet'")
        return TimeMLP(shape[0], horizon=horizon, **spec)
    if kind == "unet":
        if len(shape) != 3:
            raise ValueError(f"net kind 'unet' takes images (C, H, W), got samples of shape {list(shape)}")
        return UNetEps(shape[0], shape[1], **spec)
    raise ValueError(f"net kind {kind!r} is not one of mlp, unet")


def zero_output(net: nn.Module) -> nn.Module:
    """Zero the last layer's weight and bias, so ``net`` starts as the zero function (the flow-score correction)."""
    layer = net.out_layer
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return net


def diffuse(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The forward process ``sqrt(a) x0 + sqrt(1 - a) noise`` with a per-sample ``alpha_bar``."""
    a = alpha_bar.to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise
