"""Target trajectories for autonomous pattern generation by RNNs (spec random_weights_biases.md 4.4), integrated
with scipy's ``solve_ivp`` (tolerances 1e-9) and sampled every ``dt`` time units:

* ``vanderpol``: the Van der Pol oscillator ``x'' = mu (1 - x^2) x' - x`` (mu = 1) from ``(2, 0)``, the x coordinate
  scaled by 1/2 (200 steps of 0.1: variance 0.52, the spec's target);
* ``sine``: ``sin(2 pi t / period)``;
* ``lorenz``: the Lorenz system (sigma 10, rho 28, beta 8/3) from ``(1, 1, 1)`` after a transient, the x coordinate
  scaled by 1/20.

The whole trajectory is one training example: an epoch is ``iterations`` full-BPTT steps on it (batch size 1), and
validation scores the generated trajectory against it.
"""
from __future__ import annotations

from typing import Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

SYSTEMS = ("vanderpol", "sine", "lorenz")


def trajectory(system: str, steps: int, dt: float, mu: float = 1.0, period: float = 6.0) -> np.ndarray:
    """``(steps, 1)`` target values at ``t = dt, 2 dt, ..., steps * dt``."""
    from scipy.integrate import solve_ivp

    if system not in SYSTEMS:
        raise ValueError(f"data.system={system!r}; expected one of {', '.join(SYSTEMS)}")
    if steps < 1 or not dt > 0:
        raise ValueError(f"data.steps must be >= 1 and data.dt > 0, got {steps} and {dt}")
    t = dt * np.arange(1, steps + 1)
    if system == "sine":
        return np.sin(2 * np.pi * t / period)[:, None]
    if system == "vanderpol":
        def f(_, z):
            return [z[1], mu * (1 - z[0] ** 2) * z[1] - z[0]]
        sol = solve_ivp(f, (0, t[-1]), [2.0, 0.0], t_eval=t, rtol=1e-9, atol=1e-9)
        return (sol.y[0] / 2.0)[:, None]
    transient = 10.0

    def lorenz(_, z):
        return [10.0 * (z[1] - z[0]), z[0] * (28.0 - z[2]) - z[1], z[0] * z[1] - 8.0 / 3.0 * z[2]]
    sol = solve_ivp(lorenz, (0, transient + t[-1]), [1.0, 1.0, 1.0], t_eval=transient + t, rtol=1e-9, atol=1e-9)
    return (sol.y[0] / 20.0)[:, None]


class _Repeat(Dataset):
    def __init__(self, target: torch.Tensor, times: int):
        self.target, self.times = target, times

    def __len__(self) -> int:
        return self.times

    def __getitem__(self, i):
        return (self.target,)


class TrajectoryDataModule(L.LightningDataModule):
    def __init__(self, system: str = "vanderpol", steps: int = 200, dt: float = 0.1, iterations: int = 100,
                 mu: float = 1.0, period: float = 6.0):
        super().__init__()
        if iterations < 1:
            raise ValueError(f"data.iterations must be >= 1, got {iterations}")
        self.save_hyperparameters(logger=False)
        self.target: Optional[torch.Tensor] = None
        trajectory(system, 1, dt, mu, period)  # names and sizes checked before any work

    def setup(self, stage: Optional[str] = None) -> None:
        if self.target is None:
            hp = self.hparams
            self.target = torch.from_numpy(trajectory(hp.system, hp.steps, hp.dt, hp.mu, hp.period).astype(np.float32))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Repeat(self.target, self.hparams.iterations), batch_size=1)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Repeat(self.target, 1), batch_size=1)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()
