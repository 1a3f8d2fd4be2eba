"""The pretrained diffusion model every Nabla-GFlowNet alignment run starts from (spec ``nabla_gfn.md`` 4.1-4.3).

``DiffusionPrior``: epsilon-prediction pretraining, ``|eps - eps_net(sqrt(a) x0 + sqrt(1 - a) eps, t)|^2`` at a
uniform timestep of a ``diffusers`` schedule, with Adam and cosine decay.  Its checkpoint carries what an alignment
run needs to rebuild the network and its sampler (``task``, ``net``, the schedule; ``load_prior``).  Validation
samples ``eval_samples`` points with the chain the alignment runs use and logs the task's metrics (``val/...``):
for the ring its on-support rate and mode entropy (``ln 8 = 2.079`` is uniform), for digits the classifier's
on-manifold rate and class entropy.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, Optional

import lightning as L
import torch
import torch.nn.functional as F

from datamodules.nabla_gfn_data import check_task, sample_shape
from lightning_modules.layers.diffusion import GaussianChain, diffuse, make_eps_net, make_scheduler
from lightning_modules.nabla_gfn_rewards import (ClassifierReward, RingReward, digits_classifier, image_metrics,
                                                 ring_metrics, ring_target, sample_records)

RING_NET = {"kind": "mlp", "hidden": 128, "depth": 3, "time_dim": 16}
RING_SCHEDULE = {"num_train_timesteps": 50, "beta_start": 1e-4, "beta_end": 0.2, "beta_schedule": "linear",
                 "steps_offset": 1}


def build_chain(scheduler: str, schedule: Dict[str, Any], num_steps: int, eta: float,
                folder: Optional[str] = None) -> GaussianChain:
    """The sampling chain: ``scheduler`` (ddpm | ddim) with ``schedule`` (diffusers' arguments), or the one saved in
    the model ``folder``.  DDIM keeps the last level below one (``set_alpha_to_one=False``, as Stable Diffusion's
    scheduler does)."""
    if folder is not None:
        return GaussianChain(make_scheduler(scheduler, folder=folder), num_steps, eta)
    extra = {"set_alpha_to_one": False} if scheduler == "ddim" else {}
    return GaussianChain(make_scheduler(scheduler, **{**extra, **dict(schedule)}), num_steps, eta)


class DiffusionPrior(L.LightningModule):
    ARCHITECTURE = ("task", "net", "schedule")

    def __init__(self, task: str = "ring", net: Optional[Dict[str, Any]] = None,
                 schedule: Optional[Dict[str, Any]] = None, scheduler: str = "ddim", num_steps: int = 49,
                 eta: float = 1.0, lr: float = 2e-3, min_lr_ratio: float = 0.0, eval_samples: int = 2000,
                 eval_seed: int = 1234, predict_batch: int = 250):
        super().__init__()
        if check_task(task) == "sd":
            raise ValueError("DiffusionPrior trains the ring or digits prior; task 'sd' aligns a pretrained pipeline "
                             "folder (model.init_args.prior_ckpt of an alignment recipe)")
        if lr <= 0:
            raise ValueError(f"model.lr must be > 0, got {lr}")
        self.save_hyperparameters()
        self.shape = sample_shape(task)
        self.net_spec = dict(net or RING_NET)
        self.schedule = dict(schedule or RING_SCHEDULE)
        self.chain = build_chain(scheduler, self.schedule, num_steps, eta)
        self.net = make_eps_net(self.net_spec, self.shape, self.chain.num_train_timesteps)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x0 = batch[0]
        t = torch.randint(0, self.chain.num_train_timesteps, (len(x0),), device=x0.device)
        noise = torch.randn_like(x0)
        loss = F.mse_loss(self.net(diffuse(x0, noise, self.chain.alphas_cumprod[t]), t), noise)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @torch.no_grad()
    def sample(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return self.chain.sample(self.net, (n, *self.shape), generator=g)["x"]

    def validation_step(self, batch, batch_idx: int) -> None:
        x = self.sample(self.hparams.eval_samples, self.hparams.eval_seed)
        if self.hparams.task == "ring":
            metrics = ring_metrics(x, RingReward().to(x.device), ring_target(0.0)[0])
            keep = ("on_support", "mode_entropy", "pair_dist")
        else:
            clf = digits_classifier()[0].to(x.device)
            metrics = image_metrics(x, ClassifierReward().to(x.device), clf, None)
            keep = ("on_manifold", "class_entropy", "pair_dist")
        for key in keep:
            self.log(f"val/{key}", metrics[key], prog_bar=key != "pair_dist")

    test_step = validation_step

    def predict_step(self, batch, batch_idx: int) -> list:
        """``predict_batch`` samples per item, seeded by ``eval_seed`` and the item (``sample_records``)."""
        i = int(batch[0])
        x = self.sample(self.hparams.predict_batch, self.hparams.eval_seed + 1 + i)
        reward = RingReward() if self.hparams.task == "ring" else ClassifierReward()
        return sample_records(x, reward.to(x.device), i * self.hparams.predict_batch)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self.trainer else 1
        floor = self.hparams.min_lr_ratio
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def load_prior(path: str, task: str):
    """``(eps net (frozen), its hyperparameters)`` from a ``DiffusionPrior`` checkpoint at ``path`` (a file, or a
    run folder with ``checkpoints/last.ckpt``), checked against ``task``: one line if it is missing, unreadable,
    of another model or trained on samples of another shape."""
    from recipes import checkpoints

    if os.path.isdir(path):
        path = os.path.join(path, "checkpoints", "last.ckpt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"prior checkpoint {path} not found: train it first (python -m recipes fit --config "
                                f"recipes/diffusion_prior_{task}.yaml) or pass model.init_args.prior_ckpt")
    ckpt = checkpoints.read_checkpoint(path)
    hp = ckpt.get("hyper_parameters") or {}
    if "net" not in hp or "schedule" not in hp or "task" not in hp:
        raise ValueError(f"prior checkpoint {path} is not a DiffusionPrior checkpoint (no task / net / schedule)")
    want, have = list(sample_shape(task)), list(sample_shape(hp["task"]))
    if want != have:
        raise ValueError(f"prior checkpoint {path} was trained on task {hp['task']!r} (samples of shape {have}); "
                         f"task {task!r} needs samples of shape {want}")
    net_spec = dict(hp["net"] or RING_NET)
    schedule = dict(hp["schedule"] or RING_SCHEDULE)
    net = make_eps_net(net_spec, sample_shape(task), int(schedule["num_train_timesteps"]))
    state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise ValueError(f"prior checkpoint {path} does not fit its network spec {net_spec}: {first}") from None
    return net.eval().requires_grad_(False), {**hp, "net": net_spec, "schedule": schedule,
                                              "shape": list(sample_shape(task))}
