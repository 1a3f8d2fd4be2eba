"""Nabla-GFlowNet: residual gradient detailed balance (Liu et al., ICLR 2025; spec ``shared/specs/nabla_gfn.md``).

Fine-tunes a pretrained diffusion sampler so that it samples ``p_prior(x) r(x)^beta``, keeping the prior's diversity.
In diffusers' indexing (step ``k`` goes from state ``k`` to state ``k + 1``, state ``K`` is the sample), with the
Gaussian policy score ``s(x_t -> x_prev)`` and the residual flow score ``f(x, j) = grad log F~`` (section 1.4-1.6):

    forward  (per transition):  s_theta^fwd - kappa s_prior^fwd - f(x_{k+1}, k+1)
    reverse  (per transition):  kappa (s_theta^rev - s_prior^rev) + f(x_k, k)
    terminal (per trajectory):  |g_phi(x_K)|^2          (weight 1 / transitions per trajectory, as officially)
    regulariser:                lambda |eps_theta(x_k) - eps_old(x_k)|^2

with ``s^fwd = grad_{x_prev} log N(x_prev; mu(x_t), sigma^2) = (mu - x_prev) / sigma^2`` and
``s^rev = grad_{x_t} log N(...)`` (a vector-Jacobian product through the network, computed without a graph to theta
as the official code does, so the reverse loss trains only g_phi), and the forward-looking flow score

    f(x, j) = beta gamma_j grad_x log r(x0_hat_theta(x, j)) + g_phi(x, t_j)      (j < K; the gradient detached)
    f(x, K) = beta gamma_K grad_x log r(x)                                        (terminal: no g_phi)

``gamma_j`` = ``alpha_bar`` of state ``j`` (``gamma="squared"``, the official default) or its square root
(``"sqrt"``); at the terminal state it is the chain's last level (0.9999 for the ring, errata 2). Terminal reverse
rows have a zero target: they add the policy's reverse score to the loss value, not to the gradient (errata 3).
``kappa`` is the official ``pretrained_strength``. Residuals are averaged as a plain mean of squares (errata 1, the
official form); ``weighting="eps"`` multiplies each row by ``(sigma^2 / c)^2`` with ``c = |d mu / d eps|``, which puts
the residual in epsilon units (the spec's prototype). Each iteration trains ``int(K * timestep_fraction) + 1``
transitions per trajectory: the terminal one and one random step from each equal chunk of the chain
(``subsample_steps``). The regulariser compares with the outputs stored while sampling: on-policy (``sample_lag=0``,
one update per batch) they are the current ones and it has no gradient; with the official lag it holds theta near the
previous iterate. One AdamW, two parameter groups (theta: ``lr``, ``weight_decay``; g_phi: ``flow_lr``,
``flow_weight_decay``), clipped separately. ``no_flow=true`` drops g_phi and the reverse loss (the forward-looking
guess alone). ``sample_lag=1`` trains on the previous iteration's trajectories, as the official code does (the first
iteration trains on its own).

Every transition needs noise (``sigma > 0``): a chain whose last step is deterministic stops with one line.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import nn

from lightning_modules.layers.diffusion import GaussianChain, make_eps_net, zero_output
from lightning_modules.nabla_gfn_align import DiffusionAlignment, outside_autocast

GAMMAS = ("squared", "sqrt")
WEIGHTINGS = ("none", "eps")


def subsample_steps(num_steps: int, batch: int, fraction: float, generator: torch.Generator,
                    stratified: bool = True) -> torch.Tensor:
    """``(batch, n)`` step indices per trajectory, ``n = int(K * fraction) + 1``: the terminal step ``K - 1`` first,
    then one uniform pick from each of ``n - 1`` equal chunks of all ``K`` steps (the official low-variance sampling:
    the last chunk holds the terminal step too, which can so be trained twice), or with ``stratified=False``
    ``n - 1`` distinct non-terminal steps drawn at random (the official ``low_var_subsampling=False``)."""
    n = min(int(num_steps * fraction) + 1, num_steps)
    chunks = n - 1
    cols = [torch.full((batch,), num_steps - 1, dtype=torch.long)]
    if chunks and stratified:
        edges = torch.linspace(0, num_steps, chunks + 1).long()
        for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist()):
            cols.append(lo + torch.randint(max(1, hi - lo), (batch,), generator=generator))
    elif chunks:
        picks = torch.stack([torch.randperm(num_steps - 1, generator=generator)[:chunks] for _ in range(batch)])
        cols.extend(picks.unbind(1))
    return torch.stack(cols, dim=1)


def eps_weight(chain: GaussianChain, k: torch.Tensor) -> torch.Tensor:
    """``(sigma_k^2 / c_k)^2``: ``c_k = |d mu / d eps|`` of step ``k`` (a residual in epsilon units)."""
    a_t, a_prev, var = chain.a_t[k], chain.a_prev[k], chain.var[k]
    c = ((1 - a_prev - var).clamp(min=0).sqrt() - a_prev.sqrt() * (1 - a_t).sqrt() / a_t.sqrt()).abs()
    return (var / c) ** 2


def _rowmean(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).mean(-1)


def nabla_db_losses(chain: GaussianChain, policy: nn.Module, prior: nn.Module, flow: Optional[nn.Module],
                    reward: nn.Module, x_t: torch.Tensor, x_prev: torch.Tensor, eps_old: torch.Tensor,
                    k: torch.Tensor, beta: float, gamma: str = "squared", kappa: float = 1.0,
                    weighting: str = "none") -> Dict[str, torch.Tensor]:
    """The residual Nabla-DB terms on transitions ``x_t -> x_prev`` of steps ``k`` (module docstring): ``fwd``,
    ``rev``, ``terminal`` and ``reg`` (means), and the per-row residuals ``fwd_res`` / ``rev_res``.  ``flow=None``:
    no g_phi (``no_flow``; ``rev`` is then zero)."""
    K = chain.num_steps
    term = k == K - 1
    tmask = term.to(x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))
    j_next = k + 1
    var = chain.var[k].to(x_t.dtype).reshape(tmask.shape)
    gam = chain.state_alpha(torch.cat([k, j_next])).to(x_t.dtype)
    gam = gam if gamma == "squared" else gam.sqrt()
    g_cur, g_next = gam[:len(k)].reshape(tmask.shape), gam[len(k):].reshape(tmask.shape)
    t_cur, t_next = chain.state_timestep(k), chain.state_timestep(j_next)

    with torch.enable_grad():
        xt = x_t.detach().requires_grad_(True)
        eps_theta = policy(xt, t_cur)  # graph to theta (forward loss, regulariser) and to x_t
        mu_theta = chain.mean(xt, eps_theta, k)
        logp_theta = -((x_prev - mu_theta) ** 2 / (2 * var)).sum()
        r_cur = reward(chain.x0_hat(xt, eps_theta, k)).sum()
        with outside_autocast(xt):  # the rewards' gradients in float32 under bf16-mixed too
            rev_theta, = torch.autograd.grad(logp_theta, xt, retain_graph=True)
            rg_cur, = torch.autograd.grad(r_cur, xt, retain_graph=True)
        xt_p = x_t.detach().requires_grad_(True)
        eps_prior = prior(xt_p, t_cur)
        mu_prior = chain.mean(xt_p, eps_prior, k)
        logp_prior = -((x_prev - mu_prior) ** 2 / (2 * var)).sum()
        xn = x_prev.detach().requires_grad_(True)
        x0_next = chain.x0_hat(xn, policy(xn, t_next), j_next)
        x0_next = torch.where(tmask.bool(), xn, x0_next)  # the terminal state: the reward at the sample itself
        r_next = reward(x0_next).sum()
        with outside_autocast(xn):
            rev_prior, = torch.autograd.grad(logp_prior, xt_p)
            rg_next, = torch.autograd.grad(r_next, xn)

    # (mu_theta - x) / var - kappa (mu_prior - x) / var, written without cancelling two large scores
    s_fwd = (mu_theta - kappa * mu_prior.detach() - (1 - kappa) * x_prev) / var
    flow_next = beta * g_next * rg_next
    flow_cur = beta * g_cur * rg_cur
    g_term = x_t.new_zeros(())
    if flow is not None:
        gn = flow(x_prev, t_next)
        gc = flow(x_t, t_cur)
        flow_next = flow_next + (1 - tmask) * gn
        flow_cur = flow_cur + gc
        n_term = term.sum().to(x_t.dtype)
        g_term = _rowmean(gn ** 2)[term].sum() / (n_term + 1e-6)
    fwd_res = s_fwd - flow_next
    rev_pred = kappa * (rev_theta - rev_prior)
    # terminal rows: the official target is zero, so the residual is the policy's own (detached) reverse score
    rev_res = torch.where(tmask.bool(), kappa * rev_theta, rev_pred + flow_cur) if flow is not None else rev_pred * 0
    w = eps_weight(chain, k).to(x_t.dtype) if weighting == "eps" else torch.ones_like(k, dtype=x_t.dtype)
    return {"fwd": (w * _rowmean(fwd_res ** 2)).mean(), "rev": (w * _rowmean(rev_res ** 2)).mean(),
            "terminal": g_term, "reg": _rowmean((eps_theta - eps_old) ** 2).mean(),
            "fwd_res": fwd_res.detach(), "rev_res": rev_res.detach()}


class NablaGFN(DiffusionAlignment):
    def __init__(self, *args, timestep_fraction: float = 0.1, reverse_scale: float = 1.0, reg_scale: float = 1e3,
                 gamma: str = "squared", kappa: float = 1.0, weighting: str = "none", no_flow: bool = False,
                 flow_net: Optional[Dict[str, Any]] = None, flow_lr: float = 1e-3, flow_weight_decay: float = 1e-2,
                 sample_lag: int = 0, micro_batch: Optional[int] = None, stratified: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        if gamma not in GAMMAS:
            raise ValueError(f"model.gamma {gamma!r} is not one of {', '.join(GAMMAS)}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"model.weighting {weighting!r} is not one of {', '.join(WEIGHTINGS)}")
        if not 0 <= timestep_fraction <= 1:
            raise ValueError(f"model.timestep_fraction must be in [0, 1], got {timestep_fraction}")
        if sample_lag not in (0, 1):
            raise ValueError(f"model.sample_lag must be 0 (on-policy) or 1 (the official one-iteration lag), "
                             f"got {sample_lag}")
        if micro_batch is not None and micro_batch < 1:
            raise ValueError(f"model.micro_batch must be >= 1 transitions (or null: all at once), got {micro_batch}")
        if not 0 < kappa <= 1:
            raise ValueError(f"model.kappa (the prior strength) must be in (0, 1], got {kappa}")
        zero = self.chain.zero_noise_steps()
        if zero:
            t = [int(self.chain.timesteps[z]) for z in zero]
            raise ValueError(f"the sampling chain's step(s) {zero} from timestep(s) {t} are deterministic (sigma = 0), "
                             "so their forward score is infinite: end the grid above timestep 0 (scheduler ddim with "
                             "steps_offset 1) or use eta > 0")
        self.save_hyperparameters()
        spec = dict(flow_net) if flow_net else dict(self.prior_hparams["net"])
        self.flow = None if no_flow else zero_output(make_eps_net(spec, self.shape, self.chain.num_train_timesteps))
        self._lagged: Optional[Dict[str, torch.Tensor]] = None

    def param_groups(self) -> List[Dict[str, Any]]:
        groups = super().param_groups()
        if self.flow is not None:
            hp = self.hparams
            groups.append({"params": list(self.flow.parameters()), "lr": hp.flow_lr,
                           "weight_decay": hp.flow_weight_decay, "name": "flow"})
        return groups

    def alignment_loss(self) -> Dict[str, torch.Tensor]:
        hp = self.hparams
        g = self.generator()
        fresh = self.sample(hp.batch_size, g, keep=True)
        batch = fresh
        if hp.sample_lag:  # restored from a checkpoint before Lightning moved the module, the lag is on the CPU
            lagged = {key: v.to(fresh[key].device) for key, v in self._lagged.items()} if self._lagged else None
            batch, self._lagged = (lagged or fresh), {key: v.detach() for key, v in fresh.items()}
        states, eps_old = batch["states"], batch["eps"]
        K = self.chain.num_steps
        steps = subsample_steps(K, hp.batch_size, hp.timestep_fraction, g, hp.stratified).to(states.device)
        rows = torch.arange(hp.batch_size, device=states.device)[:, None].expand_as(steps).reshape(-1)
        k = steps.reshape(-1)
        chunk = hp.micro_batch or len(k)
        sums = {key: states.new_zeros(()) for key in ("loss", "fwd", "rev", "terminal", "reg")}
        for lo in range(0, len(k), chunk):  # micro-batches of transitions, back-propagated one by one (memory)
            sl = slice(lo, lo + chunk)
            r, kk = rows[sl], k[sl]
            self.use_prompts(batch["prompts"][r.cpu()] if "prompts" in batch else None)  # each row's prompt (sd)
            parts = nabla_db_losses(self.chain, self.policy, self.prior, self.flow, self.reward, states[kk, r],
                                    states[kk + 1, r], eps_old[kk, r], kk, hp.beta, hp.gamma, hp.kappa, hp.weighting)
            n_term = (kk == K - 1).sum()
            # the chunk's share of the means over all rows; the terminal term (a mean over the terminal rows) enters
            # once per trained column, as in the official loss, i.e. with weight 1 / (transitions per trajectory)
            share = len(kk) / len(k)
            t_share = n_term / max(1, int((k == K - 1).sum())) / steps.shape[1]
            loss = share * (parts["fwd"] + hp.reg_scale * parts["reg"])
            if self.flow is not None:
                loss = loss + share * hp.reverse_scale * parts["rev"] + t_share * parts["terminal"]
            if chunk < len(k):
                with outside_autocast(loss):
                    self.manual_backward(loss) if self._trainer is not None else loss.backward()
            sums["loss"] = sums["loss"] + (loss.detach() if chunk < len(k) else loss)
            for key in ("fwd", "rev", "reg"):
                sums[key] = sums[key] + share * parts[key].detach()
            sums["terminal"] = sums["terminal"] + t_share * parts["terminal"].detach()
        with torch.no_grad():
            reward = self.reward(fresh["x"]).mean()
        return {**sums, "reward": reward, "accumulated": chunk < len(k)}

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._lagged is not None:
            checkpoint["nabla_gfn_lagged"] = {k: v.cpu() for k, v in self._lagged.items()}

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        lagged = checkpoint.get("nabla_gfn_lagged")
        self._lagged = {k: v.to(self.device) for k, v in lagged.items()} if lagged else None
