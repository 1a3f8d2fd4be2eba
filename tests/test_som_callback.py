"""The SOM callback: the exact update after each optimizer step, BMU rules in place, every layer targeted."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning as L
from callbacks.self_organizing_map import SelfOrganizingMap
from lightning_modules.layers.topographic import SOMSchedule, credit_bmu, activation_bmu, som_update_


class TinyConvNet(L.LightningModule):
    def __init__(self, widths=(4, 9, 16)):
        super().__init__()
        layers, c_in = [], 1
        for w in widths:
            layers += [nn.Conv2d(c_in, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
            c_in = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, 3)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def loader(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)),
                      batch_size=8)


class Recorder(L.Callback):
    """Placed before the SOM callback: records the pre-step gradients, the batch-mean conv outputs and the
    post-step (pre-SOM) weights of every conv."""

    def __init__(self):
        self.grads, self.post_step, self.act = {}, {}, {}

    def setup(self, trainer, pl_module, stage):
        for name, m in pl_module.named_modules():
            if isinstance(m, nn.Conv2d):
                m.register_forward_hook(lambda mod, i, o, name=name: self.act.__setitem__(
                    name, o.detach().float().mean(0)) if mod.training else None)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {n: m.weight.grad.clone() for n, m in pl_module.named_modules() if isinstance(m, nn.Conv2d)}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.post_step = {n: m.weight.detach().clone() for n, m in pl_module.named_modules()
                          if isinstance(m, nn.Conv2d)}
        # everything else the SOM step must leave alone: conv biases, BatchNorm affine parameters and statistics
        self.others = {k: v.detach().clone() for k, v in pl_module.state_dict().items()
                       if not any(k == f"{n}.weight" for n in self.post_step)}


def fit(som, steps=1, accumulate=1, model=None, **trainer_kwargs):
    torch.manual_seed(0)
    model = model or TinyConvNet()
    rec = Recorder()
    trainer = L.Trainer(max_steps=steps, accumulate_grad_batches=accumulate, callbacks=[rec, som], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", **trainer_kwargs)
    trainer.fit(model, loader())
    return model, rec, trainer


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("mode", ["cb", "ab"])
def test_one_step_is_the_exact_som_update_on_every_layer(mode, precision):
    som = SelfOrganizingMap(mode=mode, alpha0=0.2, sigma_min=1.0)
    model, rec, trainer = fit(som, precision=precision)
    total = trainer.estimated_stepping_batches
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert set(som.targets) == set(convs)  # every conv, not only the first (the authors' bug B1)
    for name, conv in convs.items():
        post = rec.post_step[name].clone()
        bmu = credit_bmu(rec.grads[name]) if mode == "cb" else activation_bmu(rec.act[name])
        schedule = SOMSchedule(alpha0=0.2, sigma0=float(conv.out_channels) ** 0.5, sigma_min=1.0)
        som_update_(post, bmu, schedule.alpha(0, total), schedule.sigma(0, total))  # the first step is t = 0
        torch.testing.assert_close(conv.weight.detach(), post, rtol=0, atol=1e-7)
        assert not torch.equal(conv.weight.detach(), rec.post_step[name]), name  # the layer did change
        assert som.distinct[name] == {bmu}
    state = model.state_dict()
    assert any(".bias" in k for k in rec.others) and any("running_var" in k for k in rec.others)
    for key, value in rec.others.items():  # conv biases and BatchNorm untouched by the SOM step
        assert torch.equal(state[key], value), key


def test_no_som_step_when_fp16_loss_scaling_skips_the_optimizer_step():
    from lightning.pytorch.plugins.precision import MixedPrecision

    # A huge initial scale overflows the fp16 backward: the GradScaler skips the first steps and halves its scale.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 60)
    som = SelfOrganizingMap(mode="cb", alpha0=0.2, sigma_min=1.0)
    torch.manual_seed(0)
    model = TinyConvNet()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = L.Trainer(max_steps=1, callbacks=[som], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer.fit(model, loader())
    assert scaler.get_scale() < 2.0 ** 60  # the step was skipped
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n  # neither the optimizer nor the SOM moved a weight
    assert set(som.updates.values()) == {0}
    # with a sane scale, the steps go through and so do the SOM steps
    som_ok = SelfOrganizingMap(mode="cb", alpha0=0.2, sigma_min=1.0)
    trainer = L.Trainer(max_steps=2, callbacks=[som_ok], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))])
    trainer.fit(TinyConvNet(), loader())
    assert set(som_ok.updates.values()) == {2}


def test_mode_none_changes_nothing_after_the_step():
    som = SelfOrganizingMap(mode="none")
    model, rec, _ = fit(som)
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            assert torch.equal(m.weight.detach(), rec.post_step[name])


def test_one_som_step_per_optimizer_step_under_accumulation():
    som = SelfOrganizingMap(mode="cb", alpha0=0.2)
    _, _, trainer = fit(som, steps=3, accumulate=2)
    assert trainer.global_step == 3
    assert set(som.updates.values()) == {3} and set(som.align_n.values()) == {3}
    assert all(-1.0 <= som.mean_alignment(n) <= 1.0 for n in som.targets)


def test_layer_prefixes_and_per_stage_alpha():
    som = SelfOrganizingMap(mode="cb", alpha0=0.1, alpha0_overrides={"features.6": 0.3}, layers=["features.3",
                                                                                                   "features.6"])
    model, rec, _ = fit(som)
    assert set(som.targets) == {"features.3", "features.6"}
    assert som.schedules["features.6"].alpha0 == 0.3 and som.schedules["features.3"].alpha0 == 0.1
    assert torch.equal(model.features[0].weight.detach(), rec.post_step["features.0"])  # not targeted: untouched
    for name in ("features.3", "features.6"):
        conv = dict(model.named_modules())[name]
        assert not torch.equal(conv.weight.detach(), rec.post_step[name]), name


def test_a_callback_reused_for_a_second_fit_updates_that_fits_model():
    som = SelfOrganizingMap(mode="ab", alpha0=0.2, sigma_min=1.0)
    fit(som, steps=2)
    model, rec, _ = fit(som, steps=2, model=TinyConvNet())
    assert set(som.updates.values()) == {4}  # 2 steps per fit, AB hooks on the second model too
    conv = model.features[3]
    assert not torch.equal(conv.weight.detach(), rec.post_step["features.3"])


def test_random_bmu_seed_follows_seed_everything_when_unset():
    def draws(som, seed):
        L.seed_everything(seed, verbose=False)
        fit(som, steps=4)
        return [int(torch.randint(1 << 30, (1,), generator=som.generator)) for _ in range(3)]

    same = draws(SelfOrganizingMap(mode="random"), 7)
    assert draws(SelfOrganizingMap(mode="random"), 7) == same
    assert draws(SelfOrganizingMap(mode="random"), 8) != same
    assert draws(SelfOrganizingMap(mode="random", seed=7), 8) == same  # an explicit seed wins


def test_random_bmu_generator_is_checkpointed():
    a = SelfOrganizingMap(mode="random", seed=7)
    state = a.state_dict()
    first = [int(torch.randint(16, (1,), generator=a.generator)) for _ in range(5)]
    b = SelfOrganizingMap(mode="random", seed=123)
    b.load_state_dict(state)
    assert [int(torch.randint(16, (1,), generator=b.generator)) for _ in range(5)] == first


def test_non_square_layer_is_a_one_line_error():
    som = SelfOrganizingMap(mode="cb")
    with pytest.raises(ValueError, match="SOM layer 'features.3': a topographic layer needs a perfect-square "
                                         "channel count, got 10"):
        fit(som, model=TinyConvNet(widths=(4, 10, 16)))


@pytest.mark.parametrize("kwargs, match", [(dict(mode="kohonen"), "SOM mode 'kohonen' is unknown"),
                                           (dict(alpha0=-0.5), "SOM alpha0 must be >= 0, got -0.5"),
                                           (dict(sigma0=-1.0), "SOM sigma0 must be > 0"),
                                           (dict(decay=2.0), "decay must be <= 0")])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelfOrganizingMap(**kwargs)


def test_two_simulated_ranks_pick_the_same_ab_bmu():
    """Each rank's local batch-mean map favours a different channel; after the all-reduce both pick the global one."""
    a0, a1 = torch.zeros(9, 2, 2), torch.zeros(9, 2, 2)
    a0[1], a1[2] = 3.0, 3.0          # local winners: channel 1 on rank 0, channel 2 on rank 1
    a0[5], a1[5] = 2.5, 2.5          # the global batch's winner: channel 5 (mean 2.5 vs 1.5)

    class Strategy:
        def __init__(self, other):
            self.other = other

        def reduce(self, t, reduce_op="mean"):
            assert reduce_op == "mean"
            return (t + self.other) / 2

    picks = []
    for mine, theirs in ((a0, a1), (a1, a0)):
        som = SelfOrganizingMap(mode="ab")
        som._act_sum, som._act_n = {"conv": mine.clone()}, {"conv": 1}
        trainer = type("T", (), {"world_size": 2, "strategy": Strategy(theirs)})()
        picks.append(som._bmu(trainer, "conv", 9))
    assert picks == [5, 5]
    assert activation_bmu(a0) == 1 and activation_bmu(a1) == 2


def test_topography_report_writes_csv_and_plots(tmp_path):
    import csv

    from callbacks.topography_report import TopographyReport
    from datamodules.images import DigitsDataModule
    from lightning_modules.topographic_resnet import TopographicClassifier

    torch.manual_seed(0)
    som, report = SelfOrganizingMap(mode="cb", alpha0=0.1, sigma_min=1.0), TopographyReport(n_perm=20)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=5, log_every_n_steps=2, callbacks=[som, report],
                        default_root_dir=tmp_path,
                        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="logs"), enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(TopographicClassifier(), DigitsDataModule())
    run = tmp_path / "logs" / "version_0"
    for name in ["topography.csv", "distance_curves.csv", "distance_curves.png", "selectivity_maps.png",
                 "orientation_map.png"]:
        assert (run / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(run / "topography.csv")))
    assert {r["layer"] for r in rows} == set(som.targets)
    logged = [r for r in csv.DictReader(open(run / "metrics.csv")) if r.get("som/alpha")]
    assert [int(r["step"]) for r in logged] == [1, 3]  # the logger's steps (every 2nd), SOM diagnostics included
    assert all(0 < float(r["som/model.stem.0/distinct_bmu_frac"]) <= 1 and float(r["som/sigma"]) > 0 for r in logged)
    assert all(float(r["distinct_bmu_frac"]) > 0 and -1 <= float(r["mean_alignment"]) <= 1 for r in rows)
