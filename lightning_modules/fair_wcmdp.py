"""Fair resource allocation in weakly coupled MDPs (Tu et al., AISTATS 2025; spec ``shared/specs/fair_wcmdp.md``,
errata first): the exact GGF linear program as a recipe, and CP-DRL on the on-policy foundation.

``GGFLinearProgram`` (``recipes/ggf_lp_machine_replacement.yaml``): each training step is one exact solve
(``lightning_modules.fair_wcmdp_lp``, HiGHS) of one policy of the comparison, in this order (``jobs``):

* ``fair``: the GGF LP with ``weights`` (its occupancy measure is the module's parameter ``x``; the policy
  ``x(s, a) / sum_a x(s, a)`` is randomised where it needs to be);
* ``utilitarian``: the utilitarian LP (one HiGHS vertex: with identical arms its per-arm split is arbitrary);
* ``index_tiebreak``: the deterministic utilitarian policy that breaks ties by arm index (errata 5);
* ``random``: uniform over the feasible joint actions;
* ``count`` (identical arms only): the utilitarian count LP over ``N`` (the symmetry theorem: equals ``fair``);
* ``ggf_base_<b>`` for each ``tradeoff_bases`` entry: the GGF LP with ``w_k`` proportional to ``b**-(k-1)`` (``b = 1``
  utilitarian, large ``b`` max-min), the price-of-fairness curve.

Each solve is exact (per-arm values by exact policy evaluation); the step writes the result into ``results``
(checkpointed) and, for ``fair``, moves ``x`` to the optimum through an SGD step of rate 1 (``x <- x - (x - x*)``) so
that Lightning counts it.  Validation / test evaluate ``x``'s policy exactly (``val/ggf``, ``val/worst``, ...).
Predict: one record per joint state (the fair policy's most likely joint action and its probability).

``WCMDPAgent``: the on-policy actor-critic (``layers.on_policy``; ``loss: ppo`` by default) for
``recipes/cpdrl_machine_replacement.yaml`` (count-proportion env, ``N`` drawn per episode) and
``recipes/ppo_joint_machine_replacement.yaml`` (joint one-hot state, the non-invariant baseline); the fairness of the
trained policy is measured by ``callbacks.fairness_report.CPDRLReport``.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence

import lightning as L
import numpy as np
import torch
from torch import nn

from lightning_modules.fair_wcmdp_eval import summary
from lightning_modules.fair_wcmdp_lp import (check_weights, evaluate_policy, ggf_weights,
                                             index_tiebreak_utilitarian_policy, occupancy_policy, solve_count_lp,
                                             solve_ggf_lp, solve_utilitarian_lp, WEIGHTS)
from lightning_modules.layers.on_policy import OnPolicyModule

D = torch.float64


def base_weights(n: int, base: float) -> np.ndarray:
    """``w_k`` proportional to ``base**-(k-1)``, summing to 1 (``base = 2``: the official ``exponential2``)."""
    w = float(base) ** -np.arange(n, dtype=float)
    return w / w.sum()


class GGFLinearProgram(L.LightningModule):
    def __init__(self, weights="exponential2", tradeoff_bases: Sequence[float] = (1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 100.0),
                 max_variables: int = 2_000_000):
        super().__init__()
        if isinstance(weights, str):
            if weights not in WEIGHTS:
                raise ValueError(f"model.weights={weights!r}; expected one of {', '.join(WEIGHTS)} or a list of "
                                 "non-increasing weights summing to 1")
        else:
            try:
                check_weights(weights)
            except ValueError as err:
                raise ValueError(f"model.weights: {err}") from None
        bad = [b for b in tradeoff_bases if not float(b) >= 1]
        if bad:
            raise ValueError(f"model.tradeoff_bases must all be >= 1 (1 = utilitarian), got {bad}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.x: Optional[nn.Parameter] = None
        self.jobs: List[str] = []
        self.results: List[Dict[str, object]] = []

    # ------------------------------------------------------------------ problem
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        dm.setup(stage)
        self.mdp, self.count_mdp = dm.joint, dm.count
        N = self.mdp.n_arms
        self.w = ggf_weights(N, self.hparams.weights) if isinstance(self.hparams.weights, str) else \
            check_weights(self.hparams.weights)
        if len(self.w) != N:
            raise ValueError(f"model.weights has {len(self.w)} values for data.n_arms={N} arms")
        self.jobs = ["fair", "utilitarian", "index_tiebreak", "random"] + (["count"] if self.count_mdp else []) + \
            [f"ggf_base_{float(b):g}" for b in self.hparams.tradeoff_bases]
        if self.x is None:
            self.x = nn.Parameter(torch.zeros(self.mdp.n_states, self.mdp.n_actions, dtype=D))

    def configure_optimizers(self):
        return torch.optim.SGD([self.x], lr=1.0)

    def policy(self) -> np.ndarray:
        return occupancy_policy(self.x.detach().cpu().numpy())

    # ------------------------------------------------------------------ one exact solve per step
    def _solve(self, job: str) -> Dict[str, object]:
        mdp, t0 = self.mdp, time.perf_counter()
        x_star = None
        if job == "fair":
            sol = solve_ggf_lp(mdp, self.w, self.hparams.max_variables)
            values, x_star = sol.values, sol.x
        elif job == "utilitarian":
            values = solve_utilitarian_lp(mdp, self.w).values
        elif job == "index_tiebreak":
            values = evaluate_policy(mdp, index_tiebreak_utilitarian_policy(mdp))
        elif job == "random":
            values = evaluate_policy(mdp, np.full((mdp.n_states, mdp.n_actions), 1.0 / mdp.n_actions))
        elif job == "count":
            values = solve_count_lp(self.count_mdp).values
        else:  # ggf_base_<b>
            values = solve_ggf_lp(mdp, base_weights(mdp.n_arms, float(job[len("ggf_base_"):])),
                                  self.hparams.max_variables).values
        row = {"policy": job, **summary(values, self.w), "seconds": time.perf_counter() - t0}
        row.update({f"arm_{i}": float(v) for i, v in enumerate(values)})
        return row, x_star

    def training_step(self, batch, batch_idx):
        job = self.jobs[int(batch)]
        row, x_star = self._solve(job)
        opt = self.optimizers()
        opt.zero_grad()
        self.x.grad = (self.x.detach() - torch.as_tensor(x_star, dtype=D, device=self.x.device)) \
            if x_star is not None else torch.zeros_like(self.x)
        opt.step()
        self.results = [r for r in self.results if r["policy"] != job] + [row]
        log = dict(on_step=True, on_epoch=False, batch_size=1)
        if job == "fair":
            self.log("train/ggf", row["ggf"], prog_bar=True, **log)
            self.log("train/worst", row["worst"], **log)
            self.log("train/total", row["total"], **log)

    def _exact(self, split: str) -> None:
        s = summary(evaluate_policy(self.mdp, self.policy()), self.w)
        for k in ("ggf", "total", "worst", "gini"):
            self.log(f"{split}/{k}", s[k], prog_bar=split == "val" and k == "ggf", batch_size=1)

    def validation_step(self, batch, batch_idx):
        self._exact("val")

    def test_step(self, batch, batch_idx):
        self._exact("test")

    def predict_step(self, batch, batch_idx):
        """One record per joint state: ``index``, ``state`` (local states, arm 0 first), ``prediction`` (the most
        likely joint action: 1 = replace, per arm), its ``probability``, and ``replace_prob`` per arm."""
        s = int(batch)
        pi = self.policy()[s]
        a = int(pi.argmax())
        replace = pi @ self.mdp.actions
        return [{"index": s, "state": "-".join(map(str, self.mdp.states[s])),
                 "prediction": "-".join(map(str, self.mdp.actions[a])), "probability": round(float(pi[a]), 6),
                 "replace_prob": "-".join(f"{p:.4f}" for p in replace)}]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ggf_lp"] = {"shape": tuple(self.x.shape), "results": self.results}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("ggf_lp", {})
        if self.x is None and "shape" in state:
            self.x = nn.Parameter(torch.zeros(state["shape"], dtype=D))
        self.results = list(state.get("results", []))


class WCMDPAgent(OnPolicyModule):
    """PPO (``loss: ppo``; the foundation's other losses as options) on a machine-replacement environment: CP-DRL on
    ``WCMDP/MachineReplacementCounts-v0``, the joint-state baseline on ``WCMDP/MachineReplacementJoint-v0``.
    Everything else is ``layers.on_policy.OnPolicyModule``."""

    def __init__(self, loss: str = "ppo", clip_range: float = 0.2, **kwargs):
        super().__init__(loss=loss, clip_range=clip_range, **kwargs)
