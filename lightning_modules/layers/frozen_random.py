"""Layers whose weights stay at their random initial values (Williams et al., ICLR 2025, "Expressivity of Neural
Networks with Random Weights and Learned Biases"; spec ``shared/specs/random_weights_biases.md``).

``RandomLinear`` is ``y = x W^T + b_task``:

* ``W`` is drawn once from a seeded generator with a named distribution: ``uniform`` (the box ``[-scale, scale]``,
  the theorem's ``U[-R, R]``) or ``normal`` (``N(0, scale^2 / fan_in)``, i.e. gain ``g`` and variance ``g^2/N``).
  Frozen, it is a non-persistent buffer: a checkpoint holds only what is trained, and the seed (an init argument,
  so in the hyper-parameters) rebuilds ``W`` bit for bit in any process.  ``train_weight=True`` makes the same
  draw a trained parameter (the full-training baseline is the same module with one flag).
* The bias is one vector per task in a ``ParameterDict`` (``tasks``; one task ``"default"`` unless given).  A batch
  uses one bias set, so the tasks it does not use get no gradient at all (``grad`` stays ``None``) and an optimizer
  leaves them bit-identical.  ``bias_init``: ``zeros`` or ``uniform`` (the same box as the weight).
  ``train_bias=False`` makes it one frozen draw shared by every task (a non-persistent buffer, like the weight): the
  random network mask learning selects units from.

``UnitMask`` is the paper's mask-learning comparison: one learned score ``s`` per unit and task, the gate
``sigmoid(k s)`` while training with the steepness ``k`` annealed upwards by the caller, and the hard step
``s > 0`` in eval mode.

``LeakyRandomRNN`` is the leaky tanh RNN of the spec (4.4): ``r_t = (1 - dt) r_{t-1} + dt tanh(W r_{t-1} + B x_t +
b)`` with ``W ~ N(0, g^2/N)`` a frozen ``RandomLinear`` whose bias is the learned ``b``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

DISTRIBUTIONS = ("uniform", "normal")
BIAS_INITS = ("zeros", "uniform")


def random_weight(out_features: int, in_features: int, distribution: str, scale: float, seed: int,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``(out, in)`` weight a frozen layer uses: a pure function of its arguments (CPU generator, any process)."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"weight distribution {distribution!r}; expected one of {', '.join(DISTRIBUTIONS)}")
    if not scale > 0:
        raise ValueError(f"weight scale must be > 0, got {scale}")
    g = torch.Generator().manual_seed(int(seed))
    if distribution == "uniform":
        w = torch.rand(out_features, in_features, generator=g, dtype=torch.float64) * (2 * scale) - scale
    else:
        w = torch.randn(out_features, in_features, generator=g, dtype=torch.float64) * (scale / math.sqrt(in_features))
    return w.to(dtype)


class RandomLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, distribution: str = "uniform", scale: float = 1.0,
                 seed: int = 0, tasks: Optional[Sequence[str]] = None, bias: bool = True, bias_init: str = "zeros",
                 train_weight: bool = False, train_bias: bool = True):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"layer sizes must be >= 1, got in={in_features}, out={out_features}")
        if bias_init not in BIAS_INITS:
            raise ValueError(f"bias_init {bias_init!r}; expected one of {', '.join(BIAS_INITS)}")
        self.in_features, self.out_features = in_features, out_features
        self.distribution, self.scale, self.seed, self.train_weight = distribution, scale, int(seed), train_weight
        weight = random_weight(out_features, in_features, distribution, scale, seed)
        if train_weight:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight, persistent=False)
        self.tasks = list(tasks) if tasks else ["default"]
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"task names must be distinct, got {self.tasks}")
        self.biases = nn.ParameterDict()
        self.register_buffer("fixed_bias", None, persistent=False)
        if bias:
            g = torch.Generator().manual_seed(int(seed) + 1)

            def draw() -> torch.Tensor:
                if bias_init == "uniform":
                    return torch.rand(out_features, generator=g) * (2 * scale) - scale
                return torch.zeros(out_features)

            if not train_bias:
                self.fixed_bias = draw()
            for task in self.tasks if train_bias else ():
                self.biases[task] = nn.Parameter(draw())

    def bias(self, task: Optional[str] = None) -> Optional[torch.Tensor]:
        if self.fixed_bias is not None:
            return self.fixed_bias
        if not len(self.biases):
            return None
        task = self.tasks[0] if task is None else task
        if task not in self.biases:
            raise KeyError(f"unknown task {task!r}; this layer has bias sets for {', '.join(self.tasks)}")
        return self.biases[task]

    def forward(self, x: torch.Tensor, task: Optional[str] = None) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.to(x.dtype), self.bias(task))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {self.distribution}(scale={self.scale}), "
                f"seed={self.seed}, tasks={len(self.tasks)}, weight={'trained' if self.train_weight else 'frozen'}")


class UnitMask(nn.Module):
    """Learned per-unit gates, one score vector per task: ``h * sigmoid(steepness * s_task)`` in train mode, ``h * (s_task
    > 0)`` in eval mode (the soft gates annealed towards, then replaced by, hard steps).  ``steepness`` is a buffer the
    owner sets every step from its schedule; scores start at ``score_init`` (every unit on)."""

    def __init__(self, size: int, tasks: Optional[Sequence[str]] = None, score_init: float = 0.1):
        super().__init__()
        if size < 1:
            raise ValueError(f"mask size must be >= 1, got {size}")
        self.tasks = list(tasks) if tasks else ["default"]
        self.scores = nn.ParameterDict({t: nn.Parameter(torch.full((size,), float(score_init))) for t in self.tasks})
        self.register_buffer("steepness", torch.tensor(1.0), persistent=False)

    def gate(self, task: Optional[str] = None) -> torch.Tensor:
        task = self.tasks[0] if task is None else task
        if task not in self.scores:
            raise KeyError(f"unknown task {task!r}; this mask has score sets for {', '.join(self.tasks)}")
        s = self.scores[task]
        return torch.sigmoid(self.steepness * s) if self.training else (s > 0).to(s.dtype)

    def forward(self, h: torch.Tensor, task: Optional[str] = None) -> torch.Tensor:
        return h * self.gate(task).to(h.dtype)


class LeakyRandomRNN(nn.Module):
    """Leaky tanh RNN with a frozen random recurrent matrix ``W ~ N(0, g^2/N)`` and learned bias (per task) and
    initial state; ``inputs`` > 0 adds a frozen random input matrix ``B ~ N(0, 1/inputs)``.  ``forward(steps, x)``
    returns the states ``(batch, steps, N)`` after ``r_0``."""

    def __init__(self, size: int, gain: float = 1.5, dt: float = 0.1, seed: int = 0, inputs: int = 0,
                 tasks: Optional[Sequence[str]] = None, train_weight: bool = False, learn_initial_state: bool = True):
        super().__init__()
        if size < 1:
            raise ValueError(f"RNN width must be >= 1, got {size}")
        if gain < 0:
            raise ValueError(f"RNN gain must be >= 0, got {gain}")
        if not 0 < dt <= 1:
            raise ValueError(f"RNN dt must be in (0, 1], got {dt}")
        self.size, self.gain, self.dt = size, gain, dt
        # gain 0 is a valid ablation (no recurrence): draw with scale 1 and zero it
        self.recurrent = RandomLinear(size, size, "normal", gain or 1.0, seed, tasks, train_weight=train_weight)
        if gain == 0:
            self.recurrent.weight.data.zero_()
        self.input = RandomLinear(inputs, size, "normal", 1.0, seed + 2, bias=False,
                                  train_weight=train_weight) if inputs else None
        r0 = torch.zeros(size)
        self.initial_state = nn.Parameter(r0) if learn_initial_state else None
        if not learn_initial_state:
            self.register_buffer("r0_fixed", r0, persistent=False)

    def forward(self, steps: int, x: Optional[torch.Tensor] = None, task: Optional[str] = None,
                batch: int = 1) -> torch.Tensor:
        r = self.initial_state if self.initial_state is not None else self.r0_fixed
        r = r.expand(x.shape[0] if x is not None else batch, -1)
        drive = self.input(x) if (x is not None and self.input is not None) else None
        states = []
        for t in range(steps):
            pre = self.recurrent(r, task)
            if drive is not None:
                pre = pre + drive[:, t]
            r = (1 - self.dt) * r + self.dt * torch.tanh(pre)
            states.append(r)
        return torch.stack(states, dim=1)
