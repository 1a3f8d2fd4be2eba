"""A finite MDP as the data of a tabular policy-optimisation run (``lightning_modules.spma.TabularPolicyOptimization``).

``kind``: ``chain`` (clear action gaps: the spec's choice for clean linear-convergence lines) or ``random``
(Dirichlet transitions, uniform rewards: the spec's prototype instance).  The MDP is built in ``setup`` from the
hyper-parameters alone, so every process and every resumed run has the same one.  The training loader yields one
item per iteration, ``iterations_per_epoch`` per epoch (the module does an exact update per item); validation and
test one item (an exact evaluation), predict one item per state.
"""
from __future__ import annotations

from typing import Optional

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_modules.layers import tabular_mdp

KINDS = ("chain", "random")


class TabularMDPDataModule(L.LightningDataModule):
    def __init__(self, kind: str = "chain", states: int = 10, actions: int = 4, gamma: float = 0.9,
                 slip: float = 0.1, concentration: float = 0.3, seed: int = 0, iterations_per_epoch: int = 50):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"data.kind={kind!r}; expected one of {', '.join(KINDS)}")
        if states < 2 or actions < 2:
            raise ValueError(f"data.states and data.actions must be >= 2, got {states}, {actions}")
        if not 0 < gamma < 1:
            raise ValueError(f"data.gamma must be in (0, 1), got {gamma}")
        if iterations_per_epoch < 1:
            raise ValueError(f"data.iterations_per_epoch must be >= 1, got {iterations_per_epoch}")
        self.save_hyperparameters(logger=False)
        self.mdp: Optional[tabular_mdp.TabularMDP] = None

    def setup(self, stage: str) -> None:
        hp = self.hparams
        if self.mdp is None:
            self.mdp = tabular_mdp.chain(hp.states, hp.actions, hp.slip, hp.gamma) if hp.kind == "chain" else \
                tabular_mdp.random_mdp(hp.states, hp.actions, hp.gamma, hp.concentration, hp.seed)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.arange(self.hparams.iterations_per_epoch), batch_size=None, shuffle=False)

    def val_dataloader(self) -> DataLoader:  # one item: the module evaluates its policy exactly
        return DataLoader(torch.arange(1), batch_size=None)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(torch.arange(1), batch_size=None)

    def predict_dataloader(self) -> DataLoader:  # one item per state
        return DataLoader(torch.arange(self.hparams.states), batch_size=None)
