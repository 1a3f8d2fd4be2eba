"""The fairness reports of the weakly-coupled-MDP recipes (spec ``fair_wcmdp.md`` 4.1), saved in the run folder at
the end of the fit (rank 0; not under ``fast_dev_run``).

* ``GGFReport`` (``GGFLinearProgram``): ``policies.csv`` (per-arm values, GGF, total, worst arm, Gini, max-min gap and
  solve time of every policy solved: fair, utilitarian, index tie-break, random, count LP), ``per_arm_values.png``
  (bars per arm and policy), ``tradeoff.csv`` / ``tradeoff.png`` (total against worst arm of the GGF LPs with
  ``w_k ~ b**-(k-1)``: the price of fairness).  The settings (replacement cost scale, "use all resources") are in
  every row.
* ``CPDRLReport`` (``WCMDPAgent``): the trained deterministic policy against the GGF optimum.  On the count-proportion
  environment, at every ``eval_arms`` N: its exact per-arm value on the count MDP, the count-LP optimum and the gap,
  and ``episodes`` Monte-Carlo episodes per arm (per-arm means, GGF, the arm-equality z score) beside a uniformly
  random policy; on the joint-state environment, at its own N: exact per-arm values on the joint MDP against the GGF
  LP.  ``fairness.csv``, ``fairness.png`` (GGF against N), ``per_arm_values.csv`` / ``per_arm_values.png``.
"""
from __future__ import annotations

import os
from typing import Dict, List, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from callbacks.run_files import report_dir, save_figure, write_rows


def bar_plot(path: str, series: Dict[str, Sequence[float]], title: str, ylabel: str = "per-arm discounted reward"):
    """Grouped bars: one group per arm, one bar per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(v) for v in series.values())
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * n + 3), 3.8))
    width = 0.8 / len(series)
    for k, (name, values) in enumerate(series.items()):
        ax.bar(np.arange(len(values)) + (k - (len(series) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(range(n), [f"arm {i}" for i in range(n)])
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def _settings(dm) -> Dict[str, object]:
    hp = dm.hparams
    kw = hp.get("env_kwargs") or hp
    return {"replace_cost_scale": kw.get("replace_cost_scale", 0.5),
            "use_all_resources": kw.get("use_all_resources", False)}


class GGFReport(L.Callback):
    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = report_dir(trainer)
        if out is None or not pl_module.results:
            return
        settings = _settings(trainer.datamodule)
        rows = [{**r, **settings} for r in pl_module.results]
        main = [r for r in rows if not r["policy"].startswith("ggf_base_")]
        trade = [r for r in rows if r["policy"].startswith("ggf_base_")]
        write_rows(os.path.join(out, "policies.csv"), main)
        n = pl_module.mdp.n_arms
        bar_plot(os.path.join(out, "per_arm_values.png"),
                 {r["policy"]: [r[f"arm_{i}"] for i in range(n)] for r in main},
                 f"{n} machines, replace cost {settings['replace_cost_scale']}, "
                 f"use all resources {settings['use_all_resources']}")
        lines = [f"{'policy':<16}{'GGF':>9}{'total':>9}{'worst':>9}{'Gini':>8}"]
        lines += [f"{r['policy']:<16}{r['ggf']:>9.4f}{r['total']:>9.4f}{r['worst']:>9.4f}{r['gini']:>8.4f}"
                  for r in main]
        rank_zero_info("GGF LP, per-arm expected discounted rewards (higher is better):\n" + "\n".join(lines))
        if trade:
            write_rows(os.path.join(out, "tradeoff.csv"), trade)
            self._tradeoff_plot(os.path.join(out, "tradeoff.png"), trade)

    @staticmethod
    def _tradeoff_plot(path: str, rows: List[Dict[str, object]]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        ax.plot([r["worst"] for r in rows], [r["total"] for r in rows], "o-")
        for r in rows:
            ax.annotate(f"b={r['policy'][len('ggf_base_'):]}", (r["worst"], r["total"]), fontsize=7)
        ax.set_xlabel("worst arm's value")
        ax.set_ylabel("total value")
        ax.set_title("GGF LP with w_k ~ b^-(k-1): b = 1 utilitarian, large b max-min", fontsize=9)
        save_figure(fig, path)


class CPDRLReport(L.Callback):
    def __init__(self, eval_arms: Sequence[int] = (3, 4, 5, 6, 7, 8), episodes: int = 200, budget: int = 1,
                 gamma: float = 0.95, seed: int = 0):
        bad = [n for n in eval_arms if not isinstance(n, int) or n < 1]
        if bad:
            raise ValueError(f"CPDRLReport eval_arms must be integers >= 1, got {bad}")
        if episodes < 0:
            raise ValueError(f"CPDRLReport episodes must be >= 0, got {episodes}")
        self.eval_arms, self.episodes, self.budget, self.gamma, self.seed = \
            list(eval_arms), episodes, budget, gamma, seed

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = report_dir(trainer)
        if out is None:
            return
        from lightning_modules.fair_wcmdp_eval import evaluate_agent

        dm = trainer.datamodule
        was_training = pl_module.training
        pl_module.eval()

        def act(obs: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                a = pl_module.act_deterministic(torch.as_tensor(obs, dtype=torch.float32, device=pl_module.device))
            return a.cpu().numpy()

        rows, arms = evaluate_agent(act, dm.hparams.env_id, dm.hparams.env_kwargs or {}, self.eval_arms,
                                    self.episodes, self.budget, self.gamma, self.seed)
        pl_module.train(was_training)
        write_rows(os.path.join(out, "fairness.csv"), rows)
        write_rows(os.path.join(out, "per_arm_values.csv"), arms)
        plot_fairness(out, rows, arms)
        rank_zero_info("\n".join(f"N={r['n_arms']} {r['policy']}: value {r['value']:.4f} vs optimum "
                                 f"{r['optimum']:.4f} (gap {100 * r['gap']:.2f}%)" for r in rows
                                 if r["policy"] != "random"))


def plot_fairness(out: str, rows: List[Dict[str, object]], arms: List[Dict[str, object]]) -> None:
    """``fairness.png``: GGF against N for the agent, random and the optimum; ``per_arm_values.png``: Monte-Carlo
    per-arm values of the agent (error bars: one standard error) at each N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ns = sorted({r["n_arms"] for r in rows})
    for policy, style in (("agent", "o-"), ("random", "s--")):
        pts = [(r["n_arms"], r["value"]) for r in rows if r["policy"] == policy]
        if pts:
            ax.plot(*zip(*pts), style, label=policy)
    ax.plot(ns, [next(r["optimum"] for r in rows if r["n_arms"] == n) for n in ns], "k:", label="GGF optimum (LP)")
    ax.set_xlabel("machines N")
    ax.set_ylabel("GGF of per-arm discounted rewards")
    ax.legend(fontsize=8)
    save_figure(fig, os.path.join(out, "fairness.png"))
    agent = [a for a in arms if a["policy"] == "agent"]
    if not agent:
        return
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for k, n in enumerate(sorted({a["n_arms"] for a in agent})):
        pts = [a for a in agent if a["n_arms"] == n]
        x = k + np.linspace(-0.35, 0.35, len(pts)) if len(pts) > 1 else np.array([k])
        ax.errorbar(x, [a["value"] for a in pts], yerr=[a["se"] for a in pts], fmt="o", ms=3, label=f"N={n}")
    ax.set_xticks(range(len({a["n_arms"] for a in agent})), [f"N={n}" for n in sorted({a["n_arms"] for a in agent})])
    ax.set_ylabel("per-arm value (Monte Carlo, +-1 s.e.)")
    ax.set_title("agent: one point per arm", fontsize=9)
    save_figure(fig, os.path.join(out, "per_arm_values.png"))
