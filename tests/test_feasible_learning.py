"""Feasible Learning callback: the dual-first update of the spec, exactly, against hand formulas and against the
authors' group's library (cooper-optim); scale invariance; duplicates; bad input."""
import copy
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from callbacks.feasible_learning import FeasibleLearning, dual_step_
from datamodules.images import DigitsDataModule
from lightning_modules.feasible_classifier import FeasibleClassifier


def test_dual_step_touches_only_the_batch_and_matches_the_formula():
    lam = torch.tensor([0.0, 0.5, 2.0, 0.3, 0.0], dtype=torch.float64)
    idx = torch.tensor([3, 1, 4])
    c = torch.tensor([0.2, -1.0, -0.1], dtype=torch.float64)
    for alpha in (None, 0.5):
        got = lam.clone()
        dual_step_(got, idx, c, dual_lr=0.7, resilient_alpha=alpha)
        want = lam.clone()
        for i, ci in zip(idx.tolist(), c.tolist()):
            decay = 0.0 if alpha is None else want[i] / alpha
            want[i] = max(0.0, float(want[i] + 0.7 * (ci - decay)))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
        assert got[0] == lam[0] and got[2] == lam[2]  # samples not in the batch: untouched
    assert bool((got >= 0).all())


def test_a_sample_twice_in_one_batch_gets_one_update_with_its_mean_violation():
    lam = torch.zeros(4, dtype=torch.float64)
    dual_step_(lam, torch.tensor([2, 0, 2]), torch.tensor([1.0, 0.5, 3.0], dtype=torch.float64), dual_lr=0.1)
    torch.testing.assert_close(lam, torch.tensor([0.05, 0.0, 0.2, 0.0], dtype=torch.float64))


def test_a_reused_scratch_buffer_carries_nothing_between_steps():
    torch.manual_seed(0)
    lam_reused = torch.rand(50, dtype=torch.float64)
    lam_fresh = lam_reused.clone()
    scratch = torch.full((2, 50), 123.0, dtype=torch.float64)  # stale garbage from "earlier steps"
    for _ in range(20):
        idx = torch.randint(0, 50, (16,))  # duplicates included
        c = torch.randn(16, dtype=torch.float64)
        dual_step_(lam_reused, idx, c, dual_lr=0.3, resilient_alpha=2.0, scratch=scratch)
        dual_step_(lam_fresh, idx, c, dual_lr=0.3, resilient_alpha=2.0)
        assert torch.equal(lam_reused, lam_fresh)


def test_mean_reduction_is_the_batch_mean_of_the_weighted_losses():
    fl = FeasibleLearning(epsilon=0.5, dual_lr=1.0, init=0.0, reduction="mean")
    fl.lam = torch.zeros(6)
    losses = torch.tensor([0.1, 0.9, 2.0], requires_grad=True)
    out = fl.primal_loss(losses, torch.tensor([4, 0, 2]))
    lam = torch.tensor([0.0, 0.4, 1.5])  # dual step first: max(0, 0 + 1.0 (loss - 0.5))
    torch.testing.assert_close(fl.lam[[4, 0, 2]], lam)
    torch.testing.assert_close(out, (lam * losses.detach()).mean())
    fl_sum = FeasibleLearning(epsilon=0.5, dual_lr=1.0, init=0.0)
    fl_sum.lam = torch.zeros(6)
    torch.testing.assert_close(fl_sum.primal_loss(losses, torch.tensor([4, 0, 2])), (lam * losses.detach()).sum())


@pytest.mark.parametrize("order", ["dual_first", "simultaneous"])
def test_both_update_orders_against_a_hand_computation_with_the_dpo_settings(order):
    """The authors' DPO settings: lambda init 1, mean reduction, alpha 1, dual lr 1; float64."""
    fl = FeasibleLearning(epsilon=0.3, dual_lr=1.0, resilient_alpha=1.0, init=1.0, reduction="mean",
                          update_order=order)
    fl.lam = torch.ones(5, dtype=torch.float64)
    losses = torch.tensor([0.1, 0.9, 2.0], dtype=torch.float64, requires_grad=True)
    out = fl.primal_loss(losses, torch.tensor([3, 0, 1]))
    # lambda <- max(0, lambda + 1.0 * (loss - 0.3 - lambda / 1.0)) = max(0, loss - 0.3)
    after = [max(0.0, 1.0 + (x - 0.3 - 1.0)) for x in (0.1, 0.9, 2.0)]
    assert fl.lam[[3, 0, 1]].tolist() == pytest.approx(after, abs=1e-15)
    assert fl.lam[[2, 4]].tolist() == [1.0, 1.0]
    used = after if order == "dual_first" else [1.0, 1.0, 1.0]
    assert out.item() == pytest.approx(sum(a * x for a, x in zip(used, (0.1, 0.9, 2.0))) / 3, rel=1e-15)
    out.backward()
    assert losses.grad.tolist() == pytest.approx([a / 3 for a in used], rel=1e-15)


def test_cserm_is_the_mean_clamped_square_and_moves_no_multiplier():
    fl = FeasibleLearning(epsilon=0.5, dual_lr=1.0, init=0.0, mode="cserm")
    fl.lam = torch.zeros(4, dtype=torch.float64)
    losses = torch.tensor([0.1, 0.9, 2.0], dtype=torch.float64, requires_grad=True)
    out = fl.primal_loss(losses, torch.tensor([0, 1, 2]))
    assert out.item() == pytest.approx((0.0 + 0.4 ** 2 + 1.5 ** 2) / 3, rel=1e-15)
    out.backward()
    assert losses.grad.tolist() == pytest.approx([0.0, 2 * 0.4 / 3, 2 * 1.5 / 3], rel=1e-15)
    assert fl.lam.tolist() == [0.0] * 4


def test_epsilon_from_target_probability_and_bad_config():
    assert FeasibleLearning(target_probability=0.6).epsilon == pytest.approx(math.log(1 / 0.6))
    cases = [(dict(epsilon=-0.1), "epsilon must be >= 0, got -0.1"),
             (dict(epsilon=0.5, dual_lr=0.0), "dual_lr must be > 0, got 0.0"),
             (dict(epsilon=0.5, resilient_alpha=-1.0), "resilient_alpha must be > 0"),
             (dict(epsilon=0.5, init=-1.0), "init must be >= 0"),
             (dict(epsilon=0.5, reduction="max"), "reduction='max'"),
             (dict(epsilon=0.5, update_order="primal_first"), "update_order='primal_first'"),
             (dict(epsilon=0.5, mode="erm"), "mode='erm'"),
             (dict(), "exactly one of epsilon"),
             (dict(epsilon=0.5, target_probability=0.6), "exactly one of epsilon"),
             (dict(target_probability=1.5), "target_probability must be in")]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            FeasibleLearning(**kwargs)


class Recorder(L.Callback):
    """Before the step: the model's weights and the gradient the optimizer is about to apply."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        self.batch = [t.clone() for t in batch]
        self.lam_before = trainer.callbacks[1].lam.clone()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()}


def tiny_fit(fl, steps=1, optimizer="sgd", batch_size=32, seed=0):
    L.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(batch_size=batch_size, standardize=True, with_index=True)
    model = FeasibleClassifier(backbone="linear", optimizer=optimizer, lr=0.05)
    rec = Recorder()
    trainer = L.Trainer(max_steps=steps, callbacks=[rec, fl], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, dm)
    return model, rec, dm


@pytest.mark.parametrize("alpha", [None, 1.0])
def test_one_training_step_is_dual_first_then_the_weighted_primal_gradient(alpha):
    fl = FeasibleLearning(epsilon=0.3, dual_lr=0.5, resilient_alpha=alpha, init=0.2)
    model, rec, dm = tiny_fit(fl)
    x, y, idx = rec.batch
    # the reference: the same linear model at the pre-step weights, in float64
    w, b = (rec.weights[k].double() for k in ("net.1.weight", "net.1.bias"))
    w.requires_grad_(True), b.requires_grad_(True)
    losses = F.cross_entropy(x.flatten(1).double() @ w.T + b, y, reduction="none")
    lam = rec.lam_before.double()
    decay = 0.0 if alpha is None else lam[idx] / alpha
    new = (lam[idx] + 0.5 * (losses.detach() - 0.3 - decay)).clamp_min(0)  # dual step first ...
    (new * losses).sum().backward()  # ... then the primal gradient of sum_i lambda_i^new loss_i
    torch.testing.assert_close(fl.lam[idx].double(), new, rtol=1e-5, atol=1e-6)
    others = torch.ones(len(fl.lam), dtype=torch.bool)
    others[idx] = False
    assert torch.equal(fl.lam[others], rec.lam_before[others])  # only the batch's multipliers moved
    torch.testing.assert_close(rec.grads["net.1.weight"].double(), w.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(rec.grads["net.1.bias"].double(), b.grad, rtol=1e-4, atol=1e-6)


def test_dual_lr_scales_lambda_and_leaves_adam_training_unchanged():
    """With lambda_0 = 0 and no dual decay, lambda's trajectory is linear in dual_lr, and Adam (scale-invariant up to
    its eps) then trains the same model: tuning dual_lr does nothing in this setting (spec 1.3, P4)."""
    runs = []
    for dual_lr in (0.1, 10.0):
        fl = FeasibleLearning(epsilon=0.5108, dual_lr=dual_lr)
        model, _, _ = tiny_fit(fl, steps=30, optimizer="adam")
        runs.append((fl.lam.clone(), {n: p.detach().clone() for n, p in model.named_parameters()}))
    (lam_a, w_a), (lam_b, w_b) = runs
    torch.testing.assert_close(lam_b, 100 * lam_a, rtol=1e-4, atol=1e-4)
    for n in w_a:
        torch.testing.assert_close(w_b[n], w_a[n], rtol=1e-4, atol=1e-5)
    assert float(lam_a.max()) > 0


@pytest.mark.parametrize("alpha", [None, 1.0])
def test_equals_cooper_indexed_multiplier_with_nupi(alpha):
    cooper = pytest.importorskip("cooper")
    torch.manual_seed(0)
    n, eps, dual_lr = 40, 0.4, 0.3
    x, y = torch.randn(n, 6), torch.randint(0, 3, (n,))
    model = nn.Linear(6, 3)
    ours = copy.deepcopy(model)

    class FL(cooper.ConstrainedMinimizationProblem):
        def __init__(self):
            super().__init__()
            self.multiplier = cooper.multipliers.IndexedMultiplier(num_constraints=n)
            self.constraint = cooper.Constraint(cooper.ConstraintType.INEQUALITY, cooper.formulations.Lagrangian,
                                                multiplier=self.multiplier)

        def compute_cmp_state(self, idx):
            losses = F.cross_entropy(model(x[idx]), y[idx], reduction="none")
            state = cooper.ConstraintState(violation=losses - eps, constraint_features=idx)
            return cooper.CMPState(loss=None, observed_constraints={self.constraint: state})

    cmp = FL()
    dual = cooper.optim.nuPI(cmp.dual_parameters(), lr=dual_lr, weight_decay=0.0 if alpha is None else 1 / alpha,
                             maximize=True)
    reference = cooper.optim.AlternatingDualPrimalOptimizer(
        cmp=cmp, primal_optimizers=torch.optim.SGD(model.parameters(), lr=0.1), dual_optimizers=dual)
    fl = FeasibleLearning(epsilon=eps, dual_lr=dual_lr, resilient_alpha=alpha)
    fl.lam = torch.zeros(n)
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(8):  # batches of 12 distinct ids, revisiting samples across steps
        idx = torch.randperm(n, generator=gen)[:12]
        reference.roll(compute_cmp_state_kwargs={"idx": idx})
        opt.zero_grad()
        fl.primal_loss(F.cross_entropy(ours(x[idx]), y[idx], reduction="none"), idx).backward()
        opt.step()
        torch.testing.assert_close(fl.lam, cmp.multiplier.weight.detach().squeeze(-1), rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.weight, model.weight, rtol=0, atol=1e-6)
    assert float(fl.lam.max()) > 0 and int((fl.lam > 0).sum()) > 5


class ScalarLossModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(64, 10)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return F.cross_entropy(self.net(x.flatten(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class BypassingModule(FeasibleClassifier):
    def training_step(self, batch, batch_idx):
        return self.sample_losses(batch)["loss"].mean()  # never calls reduce_sample_losses


@pytest.mark.parametrize("module, dm_kwargs, match", [
    (ScalarLossModule, dict(with_index=True), "returns a scalar loss"),
    (FeasibleClassifier, dict(with_index=False), "carry their sample index"),
    (BypassingModule, dict(with_index=True), "without calling self.reduce_sample_losses"),
])
def test_unusable_model_or_data_is_a_clear_error(module, dm_kwargs, match):
    trainer = L.Trainer(max_steps=1, callbacks=[FeasibleLearning(epsilon=0.5)], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", limit_val_batches=0)
    with pytest.raises(ValueError, match=match):
        trainer.fit(module(), DigitsDataModule(**dm_kwargs))


def test_per_sample_losses_must_be_a_vector():
    model = FeasibleClassifier()
    with pytest.raises(ValueError, match=r"shape \(batch,\), got \(\)"):
        model.reduce_sample_losses(torch.tensor(1.0), torch.tensor(0))


def test_checkpoint_state_round_trip_and_size_check():
    fl = FeasibleLearning(epsilon=0.5, dual_lr=0.1)
    fl.lam = torch.rand(10)
    state = fl.state_dict()
    other = FeasibleLearning(epsilon=0.5, dual_lr=0.1)
    other.load_state_dict(state)
    assert torch.equal(other.lam, fl.lam)
    wrong = FeasibleLearning(epsilon=0.5, dual_lr=0.1)
    wrong.lam = torch.zeros(12)
    with pytest.raises(ValueError, match="multipliers for 10 samples but the training set has 12"):
        wrong.load_state_dict(state)
