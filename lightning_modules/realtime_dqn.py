"""DQN under inference delay in a realtime environment (Riemer et al., ICLR 2025, "Enabling Realtime Reinforcement
Learning at Scale with Staggered Asynchronous Inference"; spec ``shared/specs/staggered_async.md``, errata first).

The algorithm is the off-policy foundation's (``layers.off_policy.ValueBasedModule``: DQN, double DQN, C51, one
learner); what changes is the environment side, ``datamodules.realtime_data.RealtimeDataModule``: actions computed by
sequential or staggered inference workers ``k`` frames after the observation they saw, default actions when none is
ready, one replay transition per agent action (default-action runs merged in, optionally discounted per frame).

The network is ``layers.q_networks.QNetwork``: the MinAtar convolution (default), the Nature CNN or the IMPALA CNN
with ``encoder_scale`` times its channels (the official code's model-size knob), then ``Linear(., hidden) + ReLU``
and the Q head.  Evaluation logs the act fraction (agent actions per frame) beside the returns.

The official code's Hogwild variant (several learner processes stepping a shared Adam) is not built: the Lightning
path keeps one learner, and learning in the realtime experiments runs at a fixed number of updates per frame.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from lightning_modules.layers.off_policy import ValueBasedModule
from lightning_modules.layers.q_networks import ENCODERS, QNetwork


class RealtimeDQN(ValueBasedModule):
    def __init__(self, encoder: str = "minatar", hidden: int = 128, encoder_scale: int = 1, loss: str = "huber",
                 double: bool = False, distributional: bool = False, atoms: int = 51, v_min: float = -10.0,
                 v_max: float = 10.0, lr: float = 2.5e-4, adam_eps: float = 3.125e-4,
                 target_update_period: int = 1000, max_grad_norm: Optional[float] = None,
                 seed: Optional[int] = None):
        if encoder not in ENCODERS:
            raise ValueError(f"model.encoder={encoder!r}; expected one of {', '.join(ENCODERS)}")
        for name, value in (("hidden", hidden), ("encoder_scale", encoder_scale)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name} must be an integer >= 1, got {value!r}")
        super().__init__(loss, double, distributional, atoms, v_min, v_max, lr, adam_eps, target_update_period,
                         max_grad_norm, seed)
        self.save_hyperparameters()

    def build_network(self, obs_shape: tuple, num_actions: int, atoms: int, input_scale: float) -> nn.Module:
        hp = self.hparams
        return QNetwork(obs_shape, num_actions, hp.encoder, "flatten", hp.hidden, 1, atoms=atoms,
                        input_scale=input_scale, encoder_scale=hp.encoder_scale)

    def _evaluation(self, batch, split: str) -> None:
        super()._evaluation(batch, split)
        if "act_fraction" in batch:
            fraction = batch["act_fraction"].float()
            self.log(f"{split}/act_fraction", fraction.mean(), sync_dist=True, batch_size=fraction.numel())
