"""The machine-replacement WCMDP as the data of an exact-LP run (``lightning_modules.fair_wcmdp.GGFLinearProgram``).

The arms, the joint MDP (and, for identical arms, the count MDP) are built in ``setup`` from the hyper-parameters
alone, so every process and every resumed run has the same problem.  ``prob_remain`` and ``cost_type`` take one value
for all arms or one per arm (heterogeneous arms); ``replace_cost_scale`` (0.5 in the official configs, 1.5 in its
code default: errata 1) and ``use_all_resources`` (errata 2) are settings.

Loaders: training yields one item per solve the module does (``len(module.jobs)``: one epoch solves every policy
once); validation and test one item (an exact evaluation); predict one item per joint state.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import lightning as L
import torch
from torch.utils.data import DataLoader

from datamodules.wcmdp import CountMDP, JointMDP, machine_replacement_arms


class MachineReplacementDataModule(L.LightningDataModule):
    def __init__(self, n_arms: int = 3, n_states: int = 3, prob_remain: Union[float, Sequence[float]] = 0.8,
                 cost_type: Union[str, Sequence[str]] = "quadratic", replace_cost_scale: float = 0.5,
                 deterioration_step: int = 1, budget: int = 1, use_all_resources: bool = False, gamma: float = 0.95,
                 max_joint_states: int = 100_000):
        super().__init__()
        self.save_hyperparameters(logger=False)
        # every value checked now (one line at start-up): the arms, the budget, the discount
        self.arms = machine_replacement_arms(n_arms, n_states, list(prob_remain) if isinstance(
            prob_remain, (list, tuple)) else prob_remain, list(cost_type) if isinstance(cost_type, (list, tuple))
            else cost_type, replace_cost_scale, deterioration_step)
        if not isinstance(budget, int) or not 0 <= budget <= n_arms:
            raise ValueError(f"data.budget={budget!r} must be an integer in [0, {n_arms}] (0 to the number of arms)")
        if not 0 <= gamma < 1:
            raise ValueError(f"data.gamma={gamma} must be in [0, 1)")
        n_joint = n_states ** n_arms
        if n_joint > max_joint_states:
            raise ValueError(f"data.n_arms={n_arms}: the exact joint LP needs {n_joint:,} joint states of "
                             f"{n_states} local states (data.max_joint_states={max_joint_states:,}); identical arms "
                             "at this size: the count LP (scripts/fair_wcmdp_compare.py --count-arms)")
        self.joint: Optional[JointMDP] = None
        self.count: Optional[CountMDP] = None

    @property
    def identical(self) -> bool:
        """All arms the same machine (then the count MDP and the symmetry theorem apply)."""
        a0 = self.arms[0]
        return all((a.P == a0.P).all() and (a.reward == a0.reward).all() for a in self.arms[1:])

    def setup(self, stage: str) -> None:
        if self.joint is not None:
            return
        hp = self.hparams
        self.joint = JointMDP(self.arms, hp.budget, hp.gamma, hp.use_all_resources, hp.max_joint_states)
        if self.identical:
            self.count = CountMDP(self.arms[0], hp.n_arms, hp.budget, hp.gamma, hp.use_all_resources)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.arange(len(self.trainer.lightning_module.jobs)), batch_size=None, shuffle=False)

    def val_dataloader(self) -> DataLoader:  # one item: the module evaluates its policy exactly
        return DataLoader(torch.arange(1), batch_size=None)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(torch.arange(1), batch_size=None)

    def predict_dataloader(self) -> DataLoader:  # one item per joint state
        return DataLoader(torch.arange(self.hparams.n_states ** self.hparams.n_arms), batch_size=None)
