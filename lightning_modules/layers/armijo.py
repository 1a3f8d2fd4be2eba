"""Armijo backtracking line search along the negative gradient, as the official SPMA code's ``armijo_search``.

``step(closure, evaluate)``: ``closure()`` returns the loss with gradients computed (``backward`` done); trial
points are scored with ``evaluate()`` under ``no_grad`` (``evaluate=None``: ``closure(backward=False)``).  From ``alpha`` (``alpha_max`` at the start and after
``reset()``), accept when ``L(theta - alpha g) <= L(theta) - c * alpha * ||g||^2``, else ``alpha <- beta * alpha``;
the next search starts at ``reset_factor *`` the accepted step.  After ``max_trials`` rejections the parameters stay
at the last rejected trial (the official behaviour; ``on_failure="restore"`` puts them back instead).  The official
code calls ``reset()`` at every outer iteration (its ``train()``).  ``state["search"]`` holds the last search's
``trials`` (backtracking steps), ``step`` and ``accepted``, and the running ``searches`` / ``total_trials``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch


class Armijo(torch.optim.Optimizer):
    def __init__(self, params, alpha_max: float = 1e6, c: float = 0.5, beta: float = 0.9,
                 reset_factor: float = 1.8, max_trials: int = 500, on_failure: str = "last_trial"):
        if not 0 < beta < 1 or not c > 0 or not alpha_max > 0:
            raise ValueError(f"armijo needs 0 < beta < 1, c > 0, alpha_max > 0; got {beta}, {c}, {alpha_max}")
        if on_failure not in ("last_trial", "restore"):
            raise ValueError(f"on_failure={on_failure!r}; expected last_trial or restore")
        super().__init__(params, dict(lr=alpha_max))
        self.alpha_max, self.c, self.beta = alpha_max, c, beta
        self.reset_factor, self.max_trials, self.on_failure = reset_factor, max_trials, on_failure
        self.state["search"] = {"alpha": alpha_max, "trials": 0, "accepted": True, "searches": 0, "total_trials": 0}

    def reset(self) -> None:
        self.state["search"]["alpha"] = self.alpha_max

    @torch.no_grad()
    def step(self, closure: Callable[..., torch.Tensor],  # type: ignore[override]
             evaluate: Optional[Callable[[], torch.Tensor]] = None) -> torch.Tensor:
        evaluate = evaluate or (lambda: closure(backward=False))
        with torch.enable_grad():
            loss = closure()
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        start = [p.detach().clone() for p in params]
        grads = [p.grad.detach().clone() for p in params]
        sq = sum(float(g.double().square().sum()) for g in grads)
        search = self.state["search"]
        search["searches"] += 1
        alpha, f0 = search["alpha"], float(loss)
        for trial in range(self.max_trials + 1):
            for p, p0, g in zip(params, start, grads):
                p.copy_(p0 - alpha * g)
            if float(evaluate()) <= f0 - self.c * alpha * sq:
                search.update(alpha=self.reset_factor * alpha, trials=trial, accepted=True, step=alpha,
                              total_trials=search["total_trials"] + trial)
                return loss
            if trial < self.max_trials:
                alpha *= self.beta
        search.update(alpha=self.reset_factor * alpha, trials=self.max_trials, accepted=False, step=alpha,
                      total_trials=search["total_trials"] + self.max_trials)
        if self.on_failure == "restore":
            for p, p0 in zip(params, start):
                p.copy_(p0)
        return loss
