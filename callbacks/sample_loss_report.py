"""Per-sample loss distribution of a run (spec ``shared/specs/feasible_learning.md`` section 3), for FL and ERM alike.

After every validation epoch (rank 0): a full pass over the training set in eval mode without augmentation
(``datamodule.train_eval_dataloader()``; training-batch losses lag the model, pitfall P10) and over the validation
set, giving per-sample losses.  Logged and kept per epoch: mean, max, q90/q95/q99, CVaR_0.10/0.05 (mean of the worst
10% / 5%), the fraction with loss > epsilon and the mean positive violation, accuracy (classifiers); with a
``FeasibleLearning`` callback also the multipliers' max / mean / median / fraction exactly zero and the Spearman
correlation of lambda with the training loss.

At the end of fit, in the run dir: ``sample_metrics.csv`` (one row per validation epoch), ``train_losses.csv``
(final per-sample training loss, correctness and lambda), ``loss_histogram.csv`` (the training-loss histogram of every
validation epoch on fixed log-spaced bins, ``HIST_EDGES``) and ``loss_histogram.png`` (the final histogram, with up
to four earlier epochs' outlines and epsilon marked),
``lambda_vs_loss.png`` (FL runs) and, when ``compare_to`` names other runs' dirs that hold a ``train_losses.csv``
(e.g. the ERM run), ``loss_cdf.png``: the training-loss distributions of this run and those, one curve each.
"""
from __future__ import annotations

import csv
import math
import os
from typing import Dict, List, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import move_data_to_device, rank_zero_only

from callbacks.run_files import run_dir, whole


HIST_EDGES = [0.0] + [10 ** (k / 8) for k in range(-32, 13)]  # 0, 1e-4 .. 10^1.5, log-spaced (8 per decade)


def loss_histogram(losses: torch.Tensor) -> List[int]:
    """Counts of ``losses`` in the bins ``HIST_EDGES`` (last bin open to the right)."""
    edges = torch.tensor(HIST_EDGES[1:-1], dtype=torch.float64)
    return torch.bincount(torch.bucketize(losses.double().flatten(), edges, right=True),
                          minlength=len(HIST_EDGES)).tolist()


def tail_stats(losses: torch.Tensor, epsilon: Optional[float] = None) -> Dict[str, float]:
    """Mean, max, upper quantiles, CVaR (mean of the worst ceil(beta n)) and, given epsilon, violation stats."""
    x = losses.double().flatten()
    worst = torch.sort(x, descending=True).values
    out = {"mean": float(x.mean()), "max": float(worst[0])}
    for q in (0.90, 0.95, 0.99):
        out[f"q{int(q * 100)}"] = float(torch.quantile(x, q))
    for beta, name in ((0.10, "cvar10"), (0.05, "cvar05")):
        out[name] = float(worst[: max(1, math.ceil(beta * len(x)))].mean())
    if epsilon is not None:
        excess = x - epsilon
        out["frac_violated"] = float((excess > 0).double().mean())
        out["mean_pos_violation"] = float(excess.clamp_min(0).mean())
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    rho = spearmanr(a.double().cpu().numpy(), b.double().cpu().numpy()).statistic
    return float(rho) if rho == rho else float("nan")


@torch.no_grad()
def per_sample_pass(pl_module, loader) -> Dict[str, torch.Tensor]:
    """Eval-mode pass: per-sample losses, correctness (if the module gives it) and sample ids (if the items have them)."""
    was_training = pl_module.training
    pl_module.eval()
    losses, correct, index = [], [], []
    try:
        for batch in loader:
            batch = move_data_to_device(batch, pl_module.device)  # tuples (x, y, index) and dicts alike
            out = pl_module.sample_losses(batch)
            losses.append(out["loss"].float().cpu())
            if "correct" in out:
                correct.append(out["correct"].cpu())
            if out.get("index") is not None:
                index.append(out["index"].cpu())
    finally:
        pl_module.train(was_training)
    res = {"loss": torch.cat(losses)}
    if correct:
        res["correct"] = torch.cat(correct)
    if index:
        res["index"] = torch.cat(index)
    return res


class SampleLossReport(L.Callback):
    def __init__(self, epsilon: Optional[float] = None, target_probability: Optional[float] = None,
                 compare_to: Optional[List[str]] = None, label: Optional[str] = None):
        if epsilon is not None and target_probability is not None:
            raise ValueError("SampleLossReport takes epsilon or target_probability, not both")
        if target_probability is not None:
            if not 0.0 < target_probability <= 1.0:
                raise ValueError(f"SampleLossReport target_probability must be in (0, 1], got {target_probability}")
            epsilon = -math.log(target_probability)
        if epsilon is not None and epsilon < 0:
            raise ValueError(f"SampleLossReport epsilon must be >= 0, got {epsilon}")
        self.epsilon, self.compare_to, self.label = epsilon, list(compare_to or []), label
        self._eps_used = epsilon  # FeasibleLearning's epsilon when that callback is present
        self.rows: List[dict] = []
        self.histograms: List[tuple] = []  # (epoch, counts over HIST_EDGES) per validation epoch
        self.final: Optional[Dict[str, torch.Tensor]] = None

    def _fl(self, trainer):
        return next((cb for cb in trainer.callbacks if type(cb).__name__ == "FeasibleLearning"), None)

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = getattr(trainer, "datamodule", None)
        if trainer.sanity_checking or dm is None or not hasattr(dm, "train_eval_dataloader"):
            return
        if not hasattr(pl_module, "sample_losses"):
            raise ValueError(f"SampleLossReport needs {type(pl_module).__name__}.sample_losses(batch)")
        fl = self._fl(trainer)
        eps = self._eps_used = fl.epsilon if fl is not None else self.epsilon
        train = per_sample_pass(pl_module, dm.train_eval_dataloader())
        val = per_sample_pass(pl_module, whole(dm.val_dataloader()))
        row = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        row.update({f"train_{k}": v for k, v in tail_stats(train["loss"], eps).items()})
        row.update({f"val_{k}": v for k, v in tail_stats(val["loss"], eps).items()})
        for name, part in (("train", train), ("val", val)):
            if "correct" in part:
                row[f"{name}_acc"] = float(part["correct"].float().mean())
        if fl is not None and fl.lam is not None and "index" in train:
            lam = fl.lam.detach().float().cpu()[train["index"]]
            train["lambda"] = lam
            row.update(fl.multiplier_stats())
            row["lambda_loss_spearman"] = spearman(lam, train["loss"])
        self.rows.append(row)
        self.histograms.append((trainer.current_epoch, loss_histogram(train["loss"])))
        self.final = train
        for key, value in row.items():
            if key not in ("epoch", "step"):
                pl_module.log(f"samples/{key}", float(value), rank_zero_only=True)

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.rows or trainer.fast_dev_run:
            return
        out = run_dir(trainer)
        os.makedirs(out, exist_ok=True)
        self.write(out, trainer.default_root_dir)

    def write(self, out: str, root_dir: Optional[str] = None) -> None:
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        with open(os.path.join(out, "sample_metrics.csv"), "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)
        with open(os.path.join(out, "loss_histogram.csv"), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["epoch", "bin_low", "bin_high", "count"])
            for epoch, counts in self.histograms:
                highs = HIST_EDGES[1:] + [math.inf]
                w.writerows((epoch, lo, hi, c) for lo, hi, c in zip(HIST_EDGES, highs, counts))
        final = self.final
        cols = [c for c in ("index", "loss", "correct", "lambda") if c in final]
        paths = [os.path.join(out, "train_losses.csv")]
        if root_dir and os.path.abspath(root_dir) != os.path.abspath(out):
            paths.append(os.path.join(root_dir, "train_losses.csv"))  # a stable place for compare_to
        for path in paths:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(cols)
                w.writerows(zip(*[final[c].tolist() for c in cols]))
        self._plots(out, final)

    def _plots(self, out: str, final: Dict[str, torch.Tensor]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        eps = self._eps_used
        loss = final["loss"].numpy()
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        edges = [HIST_EDGES[1] / 2] + HIST_EDGES[1:] + [HIST_EDGES[-1] * 2]  # drawable: [0, 1e-4) and the open bin
        last = len(self.histograms) - 1
        earlier = sorted(set(torch.linspace(0, last, 5).round().long().tolist()) - {last})  # up to four epochs
        picks = [self.histograms[i] for i in earlier]
        for k, (epoch, counts) in enumerate(picks):
            ax.stairs(counts, edges, color="tab:gray", alpha=0.3 + 0.5 * k / max(1, len(picks)),
                      label=f"epoch {epoch}")
        epoch, counts = self.histograms[-1]
        ax.stairs(counts, edges, fill=True, color="tab:blue", alpha=0.8, label=f"epoch {epoch} (final)")
        if eps is not None:
            ax.axvline(eps, color="k", ls="--", label=f"epsilon = {eps:.3f}")
        ax.legend(fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=1)
        ax.set_xlabel("per-sample training loss (first bin: < 1e-4)")
        ax.set_ylabel("samples")
        ax.set_title(f"{self.label or 'this run'}: max {loss.max():.3f}, CVaR5% {self.rows[-1]['train_cvar05']:.3f}")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "loss_histogram.png"), dpi=120)
        plt.close(fig)
        if "lambda" in final:
            fig, ax = plt.subplots(figsize=(4.5, 3.5))
            ax.scatter(loss, final["lambda"].numpy(), s=4, alpha=0.5)
            ax.set_xlabel("per-sample training loss")
            ax.set_ylabel("multiplier lambda")
            ax.set_title(f"Spearman rho = {self.rows[-1]['lambda_loss_spearman']:.2f}")
            fig.tight_layout()
            fig.savefig(os.path.join(out, "lambda_vs_loss.png"), dpi=120)
            plt.close(fig)
        others = {}
        for run in self.compare_to:
            path = os.path.join(run, "train_losses.csv")
            if os.path.isfile(path):
                with open(path) as fh:
                    others[os.path.basename(os.path.normpath(run))] = sorted(float(r["loss"]) for r in csv.DictReader(fh))
        if others:
            fig, ax = plt.subplots(figsize=(5.5, 3.5))
            for name, values in [(self.label or "this run", sorted(loss.tolist())), *others.items()]:
                n = len(values)
                ax.plot([max(v, 1e-6) for v in values], [(i + 1) / n for i in range(n)], label=name)
            if eps is not None:
                ax.axvline(eps, color="k", ls="--", lw=0.8, label=f"epsilon = {eps:.3f}")
            ax.set_xscale("log")
            ax.set_xlabel("per-sample training loss (log scale, floored at 1e-6)")
            ax.set_ylabel("fraction of samples")
            ax.set_title("Training-loss CDF")
            ax.legend()
            fig.tight_layout()
            fig.savefig(os.path.join(out, "loss_cdf.png"), dpi=120)
            plt.close(fig)
