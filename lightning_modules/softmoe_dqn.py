""""Don't flatten, tokenize!" (Sokar et al., ICLR 2025; spec ``shared/specs/softmoe_tokenize.md``, errata first):
a value-based agent whose penultimate dense layer is replaced by a Soft Mixture of Experts over the tokens of the
encoder output, or kept as the flattened baseline.

``SoftMoEDQN`` = the DQN-family agent of ``layers.off_policy`` (DQN, double DQN, C51) with the network of
``layers.q_networks``: ``encoder`` (``minatar`` / ``nature`` / ``impala``) then ``head``:

* ``flatten`` with ``scale`` 1 or k: ``Linear(h w d, hidden x scale) + ReLU`` (baseline, scaled baseline);
* ``softmoe``: ``tokenization`` (``per_conv`` = one token per spatial position, the paper's; ``per_feat``;
  ``per_sample`` = one token, i.e. the baseline plus a projection), ``experts`` experts with hidden width
  ``hidden x scale`` each, ``p = ceil(m capacity_factor / experts)`` slots per expert (or ``slots`` in total);
  the claim arm is ``experts=1, tokenization=per_conv, scale=4`` (one scaled expert);
* ``tokenized_sum`` / ``tokenized_avg``: the paper's tokenized baseline (a shared dense layer per token, summed or
  averaged).

The MinAtar arms of the spec's tiny recipe use ``hidden=64`` (the paper's 512 scaled down) so that SoftMoE-1 x4
(expert 16 -> 256 -> 16) and SoftMoE-4 (4 experts 16 -> 64 -> 16) have the same expert parameters up to biases.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from lightning_modules.layers.off_policy import ValueBasedModule
from lightning_modules.layers.q_networks import ENCODERS, HEADS, QNetwork
from lightning_modules.layers.soft_moe import TOKENIZATIONS


class SoftMoEDQN(ValueBasedModule):
    def __init__(self, encoder: str = "minatar", head: str = "softmoe", tokenization: str = "per_conv",
                 experts: int = 1, hidden: int = 64, scale: int = 4, capacity_factor: float = 1.0,
                 slots: Optional[int] = None, normalize: bool = False, encoder_scale: int = 1,
                 loss: str = "huber", double: bool = False, distributional: bool = False, atoms: int = 51,
                 v_min: float = -10.0, v_max: float = 10.0, lr: float = 2.5e-4, adam_eps: float = 3.125e-4,
                 target_update_period: int = 1000, max_grad_norm: Optional[float] = None,
                 seed: Optional[int] = None):
        if encoder not in ENCODERS:
            raise ValueError(f"model.encoder={encoder!r}; expected one of {', '.join(ENCODERS)}")
        if head not in HEADS:
            raise ValueError(f"model.head={head!r}; expected one of {', '.join(HEADS)}")
        if tokenization not in TOKENIZATIONS:
            raise ValueError(f"model.tokenization={tokenization!r}; expected one of {', '.join(TOKENIZATIONS)}")
        if not isinstance(experts, int) or experts < 1:
            raise ValueError(f"model.experts must be an integer >= 1, got {experts!r}")
        if slots is not None and (slots < experts or slots % experts):
            raise ValueError(f"model.slots={slots} must be a positive multiple of model.experts={experts} "
                             "(slots are shared out evenly over the experts)")
        if not capacity_factor > 0:
            raise ValueError(f"model.capacity_factor must be > 0, got {capacity_factor}")
        super().__init__(loss, double, distributional, atoms, v_min, v_max, lr, adam_eps, target_update_period,
                         max_grad_norm, seed)
        self.save_hyperparameters()

    def build_network(self, obs_shape: tuple, num_actions: int, atoms: int, input_scale: float) -> nn.Module:
        hp = self.hparams
        return QNetwork(obs_shape, num_actions, hp.encoder, hp.head, hp.hidden, hp.scale, hp.tokenization,
                        hp.experts, hp.capacity_factor, hp.slots, hp.normalize, atoms, input_scale=input_scale,
                        encoder_scale=hp.encoder_scale)
