"""The SOM step of CB-SOM / AB-SOM as a Lightning callback (spec ``shared/specs/cbsom.md`` 1.4-1.10).

After every optimizer step, for every targeted conv layer: pick one best-matching unit (BMU) and pull every kernel
toward the BMU's kernel, ``w_i += alpha(t) h_i(t) (w_c - w_i)``, in place, outside the optimizer (no momentum, no
weight decay).  ``t`` counts optimizer steps from 0 (the step just taken; the authors' ``epoch * steps + batch``)
and ``T`` is ``trainer.estimated_stepping_batches``.

* ``mode="cb"``: BMU = largest per-channel norm of the gradient, read in ``on_before_optimizer_step`` where it is
  final (after accumulation, unscaled under AMP; the argmax is scale-invariant anyway) and already all-reduced under
  DDP, so every rank picks the same BMU.  The BMU's kernel is taken *after* the step (spec B2).
* ``mode="ab"``: BMU = largest norm of the batch-mean conv output (signed, pre-BN), collected by forward hooks
  during training over all micro-batches of the step and averaged across ranks (spec B4).
* ``mode="random"``: uniform BMU from a generator seeded identically on every rank (``seed``, or when unset the
  run's ``seed_everything`` seed, broadcast from rank 0) and saved in checkpoints.
* ``mode="none"``: no update (the baseline, same recipe).

Under ``16-mixed`` with loss scaling, a step the ``GradScaler`` skips (inf/nan gradients) gets no SOM step either;
under ``bf16-mixed`` the weights, gradients and the update stay in float32 (tested).

Targeted layers: every ``nn.Conv2d`` (``layers="all"``; the authors' script silently updated only the stem, bug
B1) or the convs whose names start with one of the given prefixes.  Each needs a perfect-square channel count.
Logged per layer: BMU, distinct BMUs so far, and the alignment cos(dW_SOM, -dL/dW) (the paper's Fig. 1c idea),
kept as a running mean so the checkpointed state stays O(layers x channels) however long the run.  A step never waits
for the host: BMUs stay on the device and reach the host-side record (``flush``) only at checkpoints, reports and every
512 steps.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Union

import lightning as L
import torch
from torch import nn

from lightning_modules.layers.topographic import (BMU_MODES, SOMSchedule, activation_bmu, credit_bmu, grid_coords,
                                                  random_bmu, sheet_side, som_update_)

FLUSH_EVERY = 512


def _scaler_will_skip(trainer, optimizer) -> bool:
    """Whether fp16 loss scaling (``16-mixed`` with a ``GradScaler``) is about to skip this optimizer step: the
    gradients, already unscaled when ``on_before_optimizer_step`` runs, hold an inf or nan."""
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return False
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return bool(grads) and not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())


class SelfOrganizingMap(L.Callback):
    def __init__(
        self,
        mode: str = "cb",
        alpha0: float = 0.008,
        alpha0_overrides: Optional[Dict[str, float]] = None,
        sigma0: Optional[float] = None,
        decay: float = -3.0,
        alpha_min: float = 0.003,
        sigma_min: float = 0.003,
        layers: Union[str, List[str]] = "all",
        seed: Optional[int] = None,
    ):
        if mode not in BMU_MODES:
            raise ValueError(f"SOM mode {mode!r} is unknown; expected one of {', '.join(BMU_MODES)}")
        if alpha0 < 0:
            raise ValueError(f"SOM alpha0 must be >= 0, got {alpha0}")
        bad = {k: v for k, v in (alpha0_overrides or {}).items() if v < 0}
        if bad:
            raise ValueError(f"SOM alpha0_overrides must be >= 0, got {bad}")
        if sigma0 is not None and sigma0 <= 0:
            raise ValueError(f"SOM sigma0 must be > 0 (or null for sqrt(channels)), got {sigma0}")
        SOMSchedule(alpha0=alpha0, sigma0=sigma0 or 1.0, decay=decay, alpha_min=alpha_min, sigma_min=sigma_min)
        self.mode, self.alpha0, self.alpha0_overrides = mode, alpha0, dict(alpha0_overrides or {})
        self.sigma0, self.decay, self.alpha_min, self.sigma_min = sigma0, decay, alpha_min, sigma_min
        self.layers, self.seed = layers, seed
        self.generator = torch.Generator().manual_seed(0 if seed is None else seed)
        self._seeded = seed is not None
        self.targets: Dict[str, nn.Conv2d] = {}
        self.schedules: Dict[str, SOMSchedule] = {}
        self.distinct: Dict[str, set] = {}
        self.updates: Dict[str, int] = {}  # SOM updates applied per layer
        self.align_sum: Dict[str, float] = {}  # sum of cos(dW_SOM, -grad) over the updates that had a gradient
        self.align_n: Dict[str, int] = {}
        self._coords: Dict[str, torch.Tensor] = {}  # sheet coordinates on the weight's device
        self._seen: Dict[str, torch.Tensor] = {}  # device-side distinct-BMU mask (for per-step logging)
        self._pending: Dict[str, List[torch.Tensor]] = {}  # device BMUs not yet in `distinct`
        self._align_acc: Dict[str, torch.Tensor] = {}  # device sum of alignments not yet in `align_sum`
        self._credit: Dict[str, int] = {}
        self._act_sum: Dict[str, torch.Tensor] = {}
        self._act_n: Dict[str, int] = {}
        self._hooks = []
        self._stepped = False

    # ------------------------------------------------------------------------------------------------------------
    def _selected(self, name: str) -> bool:
        if self.layers == "all":
            return True
        prefixes = [self.layers] if isinstance(self.layers, str) else list(self.layers)
        return any(name.startswith(p) for p in prefixes)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Seed the random-BMU generator from the run's seed when none was given (before a checkpoint restores it);
        rank 0's seed is broadcast, so every rank draws the same BMUs."""
        if self._seeded or stage != "fit":
            return
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        if trainer.world_size > 1:
            seed = int(trainer.strategy.broadcast(seed, src=0))
        self.generator.manual_seed(seed)
        self._seeded = True

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Find the targeted convs (after ``configure_model``, so lazily built models are seen).  A callback reused
        for a second ``fit`` targets that fit's model and keeps its records."""
        if self.mode == "none":
            return
        self.targets, self._coords, self._seen = {}, {}, {}
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for name, module in pl_module.named_modules():
            if isinstance(module, nn.Conv2d) and self._selected(name):
                try:
                    side = sheet_side(module.out_channels)
                except ValueError as err:
                    raise ValueError(f"SOM layer {name!r}: {err}") from None
                alpha0 = next((v for p, v in self.alpha0_overrides.items() if name.startswith(p)), self.alpha0)
                self.targets[name] = module
                self.schedules[name] = SOMSchedule(alpha0=alpha0, sigma0=self.sigma0 or float(side), decay=self.decay,
                                                   alpha_min=self.alpha_min, sigma_min=self.sigma_min)
                self.distinct.setdefault(name, set())  # may hold restored checkpoint state already
                for store in (self.updates, self.align_sum, self.align_n):
                    store.setdefault(name, 0)
        if not self.targets:
            raise ValueError(f"SOM layers={self.layers!r} matched no nn.Conv2d in {type(pl_module).__name__}")
        if self.mode == "ab":
            for name, module in self.targets.items():
                self._hooks.append(module.register_forward_hook(self._activation_hook(name)))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _activation_hook(self, name: str):
        def hook(module, inputs, output):
            if module.training and torch.is_grad_enabled():
                mean = output.detach().float().mean(0)
                self._act_sum[name] = self._act_sum.get(name, 0) + mean
                self._act_n[name] = self._act_n.get(name, 0) + 1
        return hook

    # ------------------------------------------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.mode == "none":
            return
        if _scaler_will_skip(trainer, optimizer):  # fp16 loss scaling found inf/nan: no optimizer step, no SOM step
            self._credit.clear()
            self._act_sum.clear()
            self._act_n.clear()
            return
        if self.mode == "cb":
            for name, module in self.targets.items():
                if module.weight.grad is not None:
                    self._credit[name] = credit_bmu(module.weight.grad, as_tensor=True)
        self._stepped = True

    def _bmu(self, trainer: L.Trainer, name: str, channels: int) -> Optional[torch.Tensor]:
        """This step's BMU of layer ``name`` as a 0-dim tensor on the layer's device (None: nothing to do)."""
        if self.mode == "cb":
            return self._credit.get(name)
        if self.mode == "random":
            device = self.targets[name].weight.device
            return torch.tensor(random_bmu(channels, self.generator), device=device)
        if name not in self._act_sum:
            return None
        mean = self._act_sum[name] / self._act_n[name]
        if trainer.world_size > 1:  # all ranks pick the BMU of the global batch
            mean = trainer.strategy.reduce(mean, reduce_op="mean")
        return activation_bmu(mean, as_tensor=True)

    def _device_state(self, name: str, weight: torch.Tensor):
        coords = self._coords.get(name)
        if coords is None or coords.device != weight.device:
            dtype = torch.float32 if weight.device.type == "mps" else torch.float64  # h in float64, as on CPU
            self._coords[name] = coords = grid_coords(weight.shape[0]).to(weight.device, dtype)
            seen = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
            seen[sorted(self.distinct[name])] = True  # restored from a checkpoint, if any
            self._seen[name] = seen
        return coords, self._seen[name]

    def flush(self) -> None:
        """Move the device-side BMU and alignment records into ``distinct`` / ``align_sum`` (one host sync)."""
        for name, pending in self._pending.items():
            if pending:
                self.distinct[name].update(torch.stack(pending).tolist())
                pending.clear()
        for name, acc in self._align_acc.items():
            self.align_sum[name] += float(acc)
        self._align_acc.clear()

    def distinct_fraction(self, name: str, channels: Optional[int] = None) -> float:
        """Fraction of layer ``name``'s kernels that were a BMU so far (``channels`` for a restored state read
        outside ``fit``, where no layer is targeted)."""
        self.flush()
        return len(self.distinct[name]) / (channels or self.targets[name].out_channels)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._stepped:
            return
        self._stepped = False
        total = max(1, int(trainer.estimated_stepping_batches))
        step = trainer.global_step - 1  # the optimizer step just taken, counted from 0
        # log only on the steps whose metrics the loggers write (as Lightning decides: every log_every_n_steps);
        # a self.log call costs ~0.5 ms, which at 2 per layer was most of the callback's cost at the tiny preset
        log_now = trainer.global_step % max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1)) == 0
        for name, module in self.targets.items():
            schedule = self.schedules[name]
            alpha, sigma = schedule.alpha(step, total), schedule.sigma(step, total)
            bmu = self._bmu(trainer, name, module.out_channels)
            if bmu is None:
                continue
            coords, seen = self._device_state(name, module.weight)
            delta = som_update_(module.weight.data, bmu, alpha, sigma, coords)
            self.updates[name] += 1
            seen[bmu] = True
            pending = self._pending.setdefault(name, [])
            pending.append(bmu)
            if module.weight.grad is not None:  # cos(dW_SOM, -grad): Fig. 1c-style misalignment
                cos = torch.nn.functional.cosine_similarity(delta.flatten().float(),
                                                            -module.weight.grad.flatten().float(), dim=0)
                self._align_acc[name] = self._align_acc[name] + cos if name in self._align_acc else cos
                self.align_n[name] += 1
            if log_now:
                pl_module.log(f"som/{name}/bmu", bmu.float(), on_step=True, on_epoch=False)
                pl_module.log(f"som/{name}/distinct_bmu_frac", seen.float().mean(), on_step=True, on_epoch=False)
            if len(pending) >= FLUSH_EVERY:
                self.flush()
        if log_now:
            first = next(iter(self.schedules))
            pl_module.log("som/alpha", self.schedules[first].alpha(step, total), on_step=True, on_epoch=False)
            pl_module.log("som/sigma", self.schedules[first].sigma(step, total), on_step=True, on_epoch=False)
        self._credit.clear()
        self._act_sum.clear()
        self._act_n.clear()

    def mean_alignment(self, name: str) -> float:
        """Mean cos(dW_SOM, -dL/dW) of layer ``name`` over the run so far (nan before the first update)."""
        self.flush()
        n = self.align_n.get(name, 0)
        return self.align_sum[name] / n if n else float("nan")

    # ------------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        self.flush()
        return {"generator": self.generator.get_state(),
                "distinct": {k: sorted(v) for k, v in self.distinct.items()},
                "updates": dict(self.updates), "align_sum": dict(self.align_sum), "align_n": dict(self.align_n)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending, self._align_acc, self._coords, self._seen = {}, {}, {}, {}
        self.generator.set_state(state_dict["generator"])
        self.distinct = {k: set(v) for k, v in state_dict.get("distinct", {}).items()}
        for key in ("updates", "align_sum", "align_n"):
            setattr(self, key, dict(state_dict.get(key, {})))
