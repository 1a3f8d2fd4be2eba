"""Random weights, learned biases (Williams et al., ICLR 2025; spec ``shared/specs/random_weights_biases.md``).

``BiasLearningMLP``: ``y = W2 relu(W1 x + b1[task]) + b2[task]`` with ``W1 ~ U[-R, R]`` and ``W2 ~ N(0, 1/N)`` drawn
from a seed and frozen; only the per-task biases are trained (``train_weights=true``: the same network fully
trained, the baseline).  One frozen network serves several tasks by switching bias sets: ``forward(x, task)``.
Batches are ``(x, y, task_index)``; a batch may mix tasks, each sample goes through its own task's biases, and a
task absent from a batch gets no gradient, so training one task leaves every other task's biases bit-identical.

``learn="masks"``: the paper's mask-learning comparison on the same frozen network.  The hidden biases are a frozen
random draw too (``U[-R, R]``) and each task learns one score per hidden unit instead: the unit's output is gated by
``sigmoid(k s)`` while training, with the steepness ``k`` annealed geometrically from ``steepness_start`` to
``steepness_end`` over the run, and by the hard step ``s > 0`` at evaluation (the output bias is learned in both
modes, so both train ``N + classes`` numbers per task).

The test loop evaluates every bias set on every task: the cross-task accuracy matrix (``test/acc_<bias>_on_<task>``)
and how often switching the bias set changes the prediction (``test/changed_<bias>_on_<task>``); the report callback
(``callbacks.bias_learning_report``) plots them.

``BiasLearningRNN``: a leaky tanh RNN with a frozen ``W ~ N(0, g^2/N)`` trained through its bias and initial state
only (readout fixed, or trained with ``train_readout``) to generate a target trajectory autonomously (Van der Pol,
sine, Lorenz: ``datamodules.dynamics``); the spec's gain effect is that ``g < 1`` fails where ``g = 1.5`` works.
"""
from __future__ import annotations

from typing import List, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import Metric

from lightning_modules.layers.frozen_random import DISTRIBUTIONS, LeakyRandomRNN, RandomLinear, UnitMask
from lightning_modules.layers.predictions import class_records


LEARN = ("biases", "masks")


class CrossTaskAccuracy(Metric):
    """``correct[b, t]``: test samples of task ``t`` classified right with bias set ``b``; ``changed[b, t]``: samples
    of task ``t`` whose prediction with bias set ``b`` differs from the prediction with their own; ``count[t]``."""

    full_state_update = False

    def __init__(self, tasks: int, **kwargs):
        super().__init__(**kwargs)
        self.add_state("correct", torch.zeros(tasks, tasks, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("changed", torch.zeros(tasks, tasks, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(tasks, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: torch.Tensor, y: torch.Tensor, task: torch.Tensor) -> None:
        """``predictions``: ``(bias sets, batch)`` class indices."""
        n = self.count.shape[0]
        own = predictions.gather(0, task[None]).squeeze(0)
        # per-task sums by index_add_, not an integer matmul: CUDA has no int64 matmul ("addmm_cuda" / "mm" not
        # implemented for 'Long')
        self.correct.index_add_(1, task, (predictions == y).long())
        self.changed.index_add_(1, task, (predictions != own).long())
        self.count += F.one_hot(task, n).sum(0)

    def compute(self) -> dict:
        count = self.count.clamp(min=1).double()
        return {"accuracy": self.correct.double() / count, "changed": self.changed.double() / count,
                "count": self.count.clone()}

    def matrices(self) -> dict:
        """``compute()`` (synchronised across ranks) with the shapes kept: ``(tasks, tasks)`` and ``(tasks,)``
        (torchmetrics squeezes one-element results, which a single task would be)."""
        n = self.count.shape[0]
        out = self.compute()
        return {"accuracy": out["accuracy"].reshape(n, n), "changed": out["changed"].reshape(n, n),
                "count": out["count"].reshape(n)}


class BiasLearningMLP(L.LightningModule):
    def __init__(self, width: int = 1024, tasks: Optional[List[str]] = None, in_features: int = 64,
                 num_classes: int = 10, distribution: str = "uniform", radius: float = 1.0, seed: int = 0,
                 train_weights: bool = False, lr: float = 3e-2, weight_decay: float = 0.0, learn: str = "biases",
                 steepness_start: float = 1.0, steepness_end: float = 200.0):
        super().__init__()
        if learn not in LEARN:
            raise ValueError(f"model.learn={learn!r}; expected one of {', '.join(LEARN)}")
        if learn == "masks" and train_weights:
            raise ValueError("model.learn=masks selects units of a frozen network; it cannot be combined with "
                             "model.train_weights=true")
        if not 0 < steepness_start <= steepness_end:
            raise ValueError(f"model.steepness_start={steepness_start}, model.steepness_end={steepness_end}; "
                             "expected 0 < start <= end")
        if width < 1:
            raise ValueError(f"model.width must be >= 1, got {width}")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"model.distribution={distribution!r}; expected one of {', '.join(DISTRIBUTIONS)}")
        if not radius > 0:
            raise ValueError(f"model.radius must be > 0, got {radius}")
        if not lr > 0:
            raise ValueError(f"model.lr must be > 0, got {lr}")
        tasks = list(tasks) if tasks else ["identity"]
        self.save_hyperparameters()
        self.tasks = tasks
        # normal: N(0, radius^2 / d), so radius 1 is variance 1/d (the spec's second initialisation)
        masks = learn == "masks"
        self.hidden = RandomLinear(in_features, width, distribution, radius, seed, tasks, train_weight=train_weights,
                                   bias_init="uniform" if masks else "zeros", train_bias=not masks)
        self.mask = UnitMask(width, tasks) if masks else None
        self.readout = RandomLinear(width, num_classes, "normal", 1.0, seed + 10, tasks, train_weight=train_weights)
        self.val_acc = CrossTaskAccuracy(len(tasks))
        self.test_acc = CrossTaskAccuracy(len(tasks))

    # ------------------------------------------------------------------ model
    def features(self, x: torch.Tensor, task: str) -> torch.Tensor:
        h = torch.relu(self.hidden(x.flatten(1), task))
        return h if self.mask is None else self.mask(h, task)

    def unit_parameters(self, task: str) -> torch.Tensor:
        """What the task learned per hidden unit: its hidden biases, or its mask scores."""
        return (self.hidden.biases if self.mask is None else self.mask.scores)[task]

    def units_on(self, task: str) -> float:
        """Fraction of hidden units the task's mask keeps (1 without masks)."""
        return 1.0 if self.mask is None else float((self.mask.scores[task] > 0).double().mean())

    def _anneal(self) -> None:
        """The mask steepness at this optimizer step: geometric from start to end over the planned steps."""
        if self.mask is None:
            return
        total = max(1, int(self.trainer.estimated_stepping_batches) - 1) if self._trainer is not None else 1
        progress = min(1.0, self.global_step / total)
        start, end = self.hparams.steepness_start, self.hparams.steepness_end
        self.mask.steepness.fill_(start * (end / start) ** progress)

    def forward(self, x: torch.Tensor, task: Optional[str] = None) -> torch.Tensor:
        task = self.tasks[0] if task is None else task
        return self.readout(self.features(x, task), task)

    def logits_by_task(self, x: torch.Tensor, task_index: torch.Tensor) -> torch.Tensor:
        """Each sample through its own task's biases (tasks absent from the batch are not touched)."""
        out = x.new_empty(x.shape[0], self.hparams.num_classes)
        for t in task_index.unique().tolist():
            rows = task_index == t
            out[rows] = self(x[rows], self.tasks[t]).to(out.dtype)  # bf16 under autocast; index_put needs one dtype
        return out

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ steps
    def setup(self, stage: str) -> None:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return
        data_tasks = list(getattr(dm, "task_names", self.tasks))
        if data_tasks != self.tasks:
            raise ValueError(f"data tasks {data_tasks} differ from model.tasks {self.tasks}")
        features = getattr(dm, "in_features", self.hparams.in_features)
        if features != self.hparams.in_features:
            raise ValueError(f"model.in_features={self.hparams.in_features} but the data has {features} features")

    def training_step(self, batch, batch_idx):
        x, y, task = batch
        self._anneal()
        loss = F.cross_entropy(self.logits_by_task(x, task), y)
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    def _every_bias_set(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self(x, name).argmax(-1) for name in self.tasks])  # (bias sets, batch)

    def validation_step(self, batch, batch_idx):
        x, y, task = batch
        logits = self.logits_by_task(x, task)
        self.log("val/loss", F.cross_entropy(logits, y), batch_size=x.shape[0], sync_dist=True)
        own = logits.argmax(-1)
        # the diagonal only: every row of the prediction stack is the sample's own bias set
        self.val_acc.update(own.expand(len(self.tasks), -1), y, task)

    def on_validation_epoch_end(self) -> None:
        acc = self.val_acc.matrices()["accuracy"].diagonal()
        self.val_acc.reset()
        for name, value in zip(self.tasks, acc):
            self.log(f"val/acc_{name}", value.float())
        self.log("val/acc", acc.mean().float(), prog_bar=True)
        if self.mask is not None:
            self.log("val/units_on", sum(self.units_on(t) for t in self.tasks) / len(self.tasks))

    def test_step(self, batch, batch_idx):
        x, y, task = batch
        self.test_acc.update(self._every_bias_set(x), y, task)

    def on_test_epoch_end(self) -> None:
        result = self.test_acc.matrices()
        self.test_acc.reset()
        self.cross_task = {k: v.cpu() for k, v in result.items()}
        acc, changed = result["accuracy"], result["changed"]
        for b, bias in enumerate(self.tasks):
            for t, task in enumerate(self.tasks):
                self.log(f"test/acc_{bias}_on_{task}", acc[b, t].float())
                if b != t:
                    self.log(f"test/changed_{bias}_on_{task}", changed[b, t].float())
        self.log("test/acc", acc.diagonal().mean().float())
        if len(self.tasks) > 1:
            off = ~torch.eye(len(self.tasks), dtype=torch.bool, device=acc.device)
            self.log("test/acc_off_diagonal", acc[off].mean().float())
            self.log("test/changed", changed[off].mean().float())

    def predict_step(self, batch, batch_idx):
        """One record per held-out sample: ``index, task, prediction, probability, target`` (own bias set)."""
        x, y, task, index = batch
        rows = class_records(self.logits_by_task(x, task), y, index)
        for row, t in zip(rows, task.tolist()):
            row["task"] = self.tasks[t]
        return rows

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr,
                                weight_decay=self.hparams.weight_decay)


class BiasLearningRNN(L.LightningModule):
    """Autonomous pattern generation: ``y_t = C r_t`` from ``r_0`` with no input; trained on the whole target
    trajectory (full BPTT) through the bias and ``r_0`` (``train_readout``: also ``C``; ``train_weights``: all)."""

    def __init__(self, width: int = 1024, gain: float = 1.5, dt: float = 0.1, outputs: int = 1, seed: int = 0,
                 train_readout: bool = False, train_weights: bool = False, lr: float = 3e-2):
        super().__init__()
        if width < 1:
            raise ValueError(f"model.width must be >= 1, got {width}")
        if gain < 0:
            raise ValueError(f"model.gain must be >= 0, got {gain}")
        if not lr > 0:
            raise ValueError(f"model.lr must be > 0, got {lr}")
        self.save_hyperparameters()
        self.rnn = LeakyRandomRNN(width, gain, dt, seed, train_weight=train_weights)
        self.readout = RandomLinear(width, outputs, "normal", 1.0, seed + 10, bias=False,
                                    train_weight=train_readout or train_weights)

    def forward(self, steps: int) -> torch.Tensor:
        return self.readout(self.rnn(steps))[0]  # (steps, outputs)

    def _mse(self, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self(target.shape[-2]), target.reshape(target.shape[-2], -1))

    def training_step(self, batch, batch_idx):
        loss = self._mse(batch[0])
        self.log("train/mse", loss, prog_bar=True, batch_size=1)
        return loss

    def _score(self, batch, split: str) -> None:
        target = batch[0]
        mse = self._mse(target)
        self.log(f"{split}/mse", mse, prog_bar=split == "val", batch_size=1)
        self.log(f"{split}/mse_over_variance", mse / target.var().clamp(min=1e-12), batch_size=1)

    def validation_step(self, batch, batch_idx):
        self._score(batch, "val")

    def test_step(self, batch, batch_idx):
        self._score(batch, "test")

    def predict_step(self, batch, batch_idx):
        """The generated trajectory beside the target: ``index`` (time step), ``prediction``, ``target``."""
        target = batch[0].reshape(batch[0].shape[-2], -1)
        generated = self(target.shape[0])
        return [{"index": t, "prediction": round(float(generated[t, 0]), 6), "target": round(float(target[t, 0]), 6)}
                for t in range(target.shape[0])]

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)
