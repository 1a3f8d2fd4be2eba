"""Actor-critic networks and action heads for the on-policy recipes.

* ``CategoricalHead`` (discrete actions): logits; ``log_prob``, ``entropy``, ``sample`` (Gumbel-max with noise from a
  given CPU generator, so a run's actions are a pure function of its seeds on any device) and ``mode`` (argmax).
* ``DiagGaussianHead`` (continuous actions): a state-independent learned ``log_std`` (initialised to
  ``log_std_init``, as SB3 does); log-probabilities and entropies are summed over action dimensions.
* ``ActorCritic``: separate actor and critic MLPs (no shared trunk; the official SPMA code's shared-extractor option
  lets the critic's gradient into the actor step), orthogonal initialisation (gain sqrt(2) hidden, 0.01 policy output,
  1 value output) as in SB3 / CleanRL.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}
LOG_2PI = math.log(2 * math.pi)


def mlp(sizes: Sequence[int], activation: str = "tanh", out_gain: float = 1.0, ortho: bool = True) -> nn.Sequential:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(a, b)
        last = i == len(sizes) - 2
        if ortho:
            nn.init.orthogonal_(lin.weight, out_gain if last else math.sqrt(2))
            nn.init.zeros_(lin.bias)
        layers.append(lin)
        if not last:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def _uniform(shape, noise: torch.Generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=noise, dtype=torch.float32).to(device)


class CategoricalHead(nn.Module):
    kind = "categorical"

    def log_prob(self, logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(logits, -1).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)

    def entropy(self, logits: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits, -1)
        return -(logp.exp() * logp).sum(-1)

    def sample(self, logits: torch.Tensor, noise: torch.Generator) -> torch.Tensor:
        u = _uniform(logits.shape, noise, logits.device).clamp_(min=1e-20, max=1 - 1e-7)
        return (logits - torch.log(-torch.log(u))).argmax(-1)

    def mode(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)


class DiagGaussianHead(nn.Module):
    kind = "gaussian"

    def __init__(self, action_dim: int, log_std_init: float = 0.0):
        super().__init__()
        self.log_std = nn.Parameter(torch.full((action_dim,), float(log_std_init)))

    def log_prob(self, mean: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        z = (actions - mean) / self.log_std.exp()
        return (-0.5 * z.square() - self.log_std - 0.5 * LOG_2PI).sum(-1)

    def entropy(self, mean: torch.Tensor) -> torch.Tensor:
        return (0.5 + 0.5 * LOG_2PI + self.log_std).sum(-1).expand(mean.shape[:-1])

    def sample(self, mean: torch.Tensor, noise: torch.Generator) -> torch.Tensor:
        eps = torch.randn(mean.shape, generator=noise, dtype=torch.float32).to(mean.device)
        return mean + self.log_std.exp() * eps

    def mode(self, mean: torch.Tensor) -> torch.Tensor:
        return mean


class ActorCritic(nn.Module):
    def __init__(self, obs_dim: int, action_kind: str, action_dim: int, hidden: Sequence[int] = (64, 64),
                 activation: str = "tanh", log_std_init: float = 0.0, ortho_init: bool = True):
        super().__init__()
        if action_kind not in ("categorical", "gaussian"):
            raise ValueError(f"action head {action_kind!r}; expected categorical or gaussian")
        self.obs_dim, self.action_kind, self.action_dim = obs_dim, action_kind, action_dim
        self.actor = mlp([obs_dim, *hidden, action_dim], activation, 0.01, ortho_init)
        self.critic = mlp([obs_dim, *hidden, 1], activation, 1.0, ortho_init)
        self.head = CategoricalHead() if action_kind == "categorical" else DiagGaussianHead(action_dim, log_std_init)

    def actor_parameters(self):
        return [*self.actor.parameters(), *self.head.parameters()]

    def critic_parameters(self):
        return list(self.critic.parameters())

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs.flatten(1)).squeeze(-1)

    def evaluate(self, obs: torch.Tensor, actions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(log pi(a|s), entropy)`` of given actions under the current policy."""
        out = self.actor(obs.flatten(1))
        return self.head.log_prob(out, actions), self.head.entropy(out)

    def act(self, obs: torch.Tensor, noise: torch.Generator) -> Dict[str, torch.Tensor]:
        out = self.actor(obs.flatten(1))
        actions = self.head.sample(out, noise)
        return {"actions": actions, "log_probs": self.head.log_prob(out, actions), "values": self.value(obs)}

    def act_deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        return self.head.mode(self.actor(obs.flatten(1)))
