"""Topographic building blocks for self-organizing conv layers (CB-SOM, Dehghani et al., ICLR 2025).

Spec: ``shared/specs/cbsom.md`` section 1.  A *unit* is one output channel of a conv layer; its SOM weight vector is
the layer's own flattened kernel (bias excluded).  The ``C`` channels sit row-major on a ``sqrt(C) x sqrt(C)`` grid
(channel ``k`` at ``(k // s, k % s)``), distances are Euclidean, no wrap-around.  After each optimizer step, per
layer, one best-matching unit ``c`` is picked and every unit moves toward it:

    w_i <- w_i + alpha(t) * h_i(t) * (w_c - w_i),    h_i(t) = exp(-||r_i - r_c||^2 / (2 sigma(t)^2))

with ``alpha(t) = max(alpha_min, alpha0 * exp(decay * t / T))`` and the same form for ``sigma``.  BMU rules:

* ``cb`` (credit-based): the channel with the largest gradient norm ``||dL/dw_i||`` (the pre-step gradient);
* ``ab`` (activation-based): the channel whose batch-mean conv output (signed, pre-BN) has the largest norm;
* ``random``: uniform over channels (a control, rank-synchronised by the caller's generator).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

BMU_MODES = ("cb", "ab", "random", "none")


def sheet_side(channels: int) -> int:
    """Side of the square sheet holding ``channels`` units; a one-line ValueError if it is not a perfect square."""
    side = math.isqrt(int(channels)) if channels > 0 else 0
    if channels <= 0 or side * side != channels:
        lo, hi = side * side, (side + 1) ** 2
        raise ValueError(f"a topographic layer needs a perfect-square channel count, got {channels} "
                         f"(nearest: {lo if lo else 1} or {hi})")
    return side


def grid_coords(channels: int) -> torch.Tensor:
    """``(C, 2)`` integer grid coordinates ``(row, col)`` of each channel, row-major."""
    side = sheet_side(channels)
    k = torch.arange(channels)
    return torch.stack([k // side, k % side], dim=1)


def grid_distances(channels: int) -> torch.Tensor:
    """``(C, C)`` Euclidean distances between channel positions on the sheet (float64)."""
    r = grid_coords(channels).double()
    return torch.cdist(r, r)


def neighbourhood(channels: int, bmu: Union[int, torch.Tensor], sigma: float,
                  coords: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gaussian neighbourhood ``h_i = exp(-d(i, bmu)^2 / (2 sigma^2))``, shape ``(C,)``, in ``coords``' dtype and
    device (default: float64 on CPU).  ``bmu`` may be a 0-dim tensor on that device (no host sync)."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    r = grid_coords(channels).double() if coords is None else coords
    d2 = ((r - r[bmu]) ** 2).sum(1)
    return torch.exp(-d2 / (2.0 * sigma * sigma))


@dataclass
class SOMSchedule:
    """``x(t) = max(x_min, x0 * exp(decay * t / T))`` for the learning rate alpha and the radius sigma."""

    alpha0: float
    sigma0: float
    decay: float = -3.0
    alpha_min: float = 0.003
    sigma_min: float = 0.003

    def __post_init__(self):
        for name in ("alpha0", "alpha_min", "sigma_min"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.sigma0 <= 0:
            raise ValueError(f"sigma0 must be > 0, got {self.sigma0}")
        if self.decay > 0:
            raise ValueError(f"decay must be <= 0 (a decaying schedule), got {self.decay}")

    def _at(self, x0: float, floor: float, step: int, total: int) -> float:
        if total <= 0:
            raise ValueError(f"total steps must be > 0, got {total}")
        return max(floor, x0 * math.exp(self.decay * step / total))

    def alpha(self, step: int, total: int) -> float:
        return self._at(self.alpha0, self.alpha_min, step, total)

    def sigma(self, step: int, total: int) -> float:
        return self._at(self.sigma0, self.sigma_min, step, total)


def unit_vectors(weight: torch.Tensor) -> torch.Tensor:
    """The SOM vectors of a conv (or linear) weight: one flattened kernel per output channel, ``(C, rest)``."""
    return weight.reshape(weight.shape[0], -1)


def credit_bmu(weight_grad: torch.Tensor, as_tensor: bool = False) -> Union[int, torch.Tensor]:
    """CB-SOM: the output channel whose kernel gradient has the largest L2 norm (``as_tensor``: a 0-dim tensor on the
    gradient's device, so a training step needs no host sync)."""
    bmu = unit_vectors(weight_grad).float().norm(dim=1).argmax()
    return bmu if as_tensor else int(bmu)


def activation_bmu(batch_mean_output: torch.Tensor, as_tensor: bool = False) -> Union[int, torch.Tensor]:
    """AB-SOM: ``batch_mean_output`` is the batch mean of the signed conv output, ``(C, H, W)``; the channel with
    the largest Frobenius norm of its mean map wins (norm of the mean map, not the mean of per-sample norms)."""
    bmu = batch_mean_output.reshape(batch_mean_output.shape[0], -1).float().norm(dim=1).argmax()
    return bmu if as_tensor else int(bmu)


def random_bmu(channels: int, generator: Optional[torch.Generator] = None) -> int:
    return int(torch.randint(channels, (1,), generator=generator))


@torch.no_grad()
def som_update_(weight: torch.Tensor, bmu: Union[int, torch.Tensor], alpha: float, sigma: float,
                coords: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Apply ``w_i += alpha * h_i * (w_c - w_i)`` in place to ``weight`` (``(C, ...)``); returns the change ``dW``.

    The BMU's own kernel does not move.  Computed in the weight's dtype (float32 or wider).  ``bmu`` may be a 0-dim
    tensor and ``coords`` the cached ``grid_coords`` on the weight's device: then nothing waits for the host.
    """
    channels = weight.shape[0]
    w = unit_vectors(weight)
    if coords is None:
        h = neighbourhood(channels, bmu if isinstance(bmu, int) else bmu.cpu(), sigma)
    else:
        h = neighbourhood(channels, bmu, sigma, coords)
    h = h.to(device=weight.device, dtype=w.dtype)
    delta = (alpha * h)[:, None] * (w[bmu][None, :] - w)
    delta[bmu] = 0.0
    delta = delta.view_as(weight)
    weight.add_(delta)
    return delta
