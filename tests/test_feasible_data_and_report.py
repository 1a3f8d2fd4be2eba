"""Indexed datasets for per-sample state, the UTKFace folder reader, the tail metrics and the run's saved report."""
import csv
import math

import numpy as np
import pytest
import torch

from callbacks.sample_loss_report import SampleLossReport, spearman, tail_stats
from datamodules.images import CIFARDataModule, DigitsDataModule
from datamodules.utkface import UTKFaceDataModule
from recipes.cli import main
from tests.helpers import run_dir_args, write_cifar, write_utkface


def test_digits_with_index_and_standardised_pixels():
    dm = DigitsDataModule(batch_size=50, standardize=True, with_index=True)
    dm.setup()
    assert dm.num_train_samples == 1347
    x, y, idx = next(iter(dm.train_dataloader()))
    torch.testing.assert_close(x, dm.train_set.tensors[0][idx])  # the index is the sample's position
    assert torch.equal(y, dm.train_set.tensors[1][idx])
    xs = dm.train_set.tensors[0].flatten(1)
    raw = DigitsDataModule()
    raw.setup()
    sd = raw.train_set.tensors[0].flatten(1).std(0, unbiased=False)
    assert float(xs.mean(0).abs().max()) < 1e-4
    torch.testing.assert_close(xs.std(0, unbiased=False), sd / (sd + 1e-3), rtol=1e-4, atol=1e-5)  # sd + 1e-3 guard
    ordered = torch.cat([b[2] for b in dm.train_eval_dataloader()])
    assert torch.equal(ordered, torch.arange(1347))


def test_cifar_with_index_and_unaugmented_train_pass(tmp_path):
    write_cifar(tmp_path, n=10)
    dm = CIFARDataModule(str(tmp_path), batch_size=5, with_index=True)
    dm.setup()
    assert dm.num_train_samples == 50
    x, _, idx = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 3, 32, 32) and idx.dtype == torch.int64
    a = next(iter(dm.train_eval_dataloader()))
    b = next(iter(dm.train_eval_dataloader()))
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], torch.arange(len(a[2])))  # no augmentation, in order


def test_utkface_folder_split_and_standardised_age(tmp_path):
    root = write_utkface(tmp_path / "faces", n=40)
    (root / "notes.txt").write_text("not an image")
    (root / "x_1_2_3.jpg").write_bytes(b"")  # not in the naming convention: skipped
    dm = UTKFaceDataModule(str(root), image_size=16, batch_size=4, num_workers=0, young_keep=1.0)
    dm.setup()
    ages = [a for _, a in dm.files]
    assert len(ages) == 40 and min(ages) >= 1
    assert len(dm.test_set) == 8 and len(dm.train_set) == 8  # 80/20, then the first quarter of the 32
    x, y, idx = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and y.dtype == torch.float32
    stored = torch.tensor(dm.train_set.targets[idx.numpy()])
    torch.testing.assert_close(y, stored)
    name_ages = [int(f.split("/")[-1].split("_")[0]) for f in dm.train_set.files]
    torch.testing.assert_close(torch.tensor(dm.train_set.targets), (torch.tensor(name_ages) - 35.43) / 18.77)


def test_utkface_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="UTKFace folder .* does not exist"):
        UTKFaceDataModule(str(tmp_path / "missing"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "face.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="no image in .* is named in the UTKFace convention.*'face.jpg'"):
        UTKFaceDataModule(str(tmp_path / "bad"))


def test_tail_stats_against_numpy():
    rng = np.random.default_rng(0)
    x = rng.exponential(size=997)
    s = tail_stats(torch.from_numpy(x), epsilon=0.5)
    worst = np.sort(x)[::-1]
    assert s["max"] == pytest.approx(x.max()) and s["mean"] == pytest.approx(x.mean())
    assert s["q99"] == pytest.approx(np.quantile(x, 0.99))
    assert s["cvar05"] == pytest.approx(worst[: math.ceil(0.05 * 997)].mean())
    assert s["cvar10"] == pytest.approx(worst[: math.ceil(0.10 * 997)].mean())
    assert s["frac_violated"] == pytest.approx((x > 0.5).mean())
    assert s["mean_pos_violation"] == pytest.approx(np.maximum(x - 0.5, 0).mean())
    assert spearman(torch.arange(10.0), torch.arange(10.0) ** 3) == pytest.approx(1.0)


def test_fl_run_saves_metrics_losses_and_plots_and_compares_with_erm(tmp_path):
    common = ["--trainer.max_epochs=3", "--trainer.check_val_every_n_epoch=1", "--trainer.enable_progress_bar=false"]
    erm = tmp_path / "erm"
    assert main(["fit", "--config", "recipes/erm_digits.yaml", *common, *run_dir_args(erm)]) == 0
    fl = tmp_path / "fl"
    override = tmp_path / "compare.yaml"
    override.write_text("trainer:\n  callbacks:\n    - class_path: callbacks.sample_loss_report.SampleLossReport\n"
                        f"      init_args: {{compare_to: [{erm}], label: FL}}\n"
                        "    - class_path: callbacks.feasible_learning.FeasibleLearning\n"
                        "      init_args: {target_probability: 0.6, dual_lr: 0.1}\n")
    assert main(["fit", "--config", "recipes/feasible_digits.yaml", "--config", str(override), *common,
                 *run_dir_args(fl)]) == 0
    (log_dir,) = (fl / "logs").iterdir()
    for name in ("sample_metrics.csv", "train_losses.csv", "loss_histogram.png", "lambda_vs_loss.png", "loss_cdf.png"):
        assert (log_dir / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(log_dir / "sample_metrics.csv")))
    assert len(rows) == 3
    for key in ("train_max", "train_q99", "train_cvar05", "train_frac_violated", "train_acc", "val_acc",
                "lambda_frac_zero", "lambda_max", "lambda_loss_spearman"):
        assert math.isfinite(float(rows[-1][key])), key
    assert float(rows[-1]["lambda_max"]) > 0
    hist = list(csv.DictReader(open(log_dir / "loss_histogram.csv")))  # one histogram per validation epoch
    epochs = sorted({int(r["epoch"]) for r in hist})
    assert len(epochs) == len(rows) and all(sum(int(r["count"]) for r in hist if int(r["epoch"]) == e) == 1347
                                            for e in epochs)
    last = [r for r in hist if int(r["epoch"]) == epochs[-1]]
    top = max(float(r["bin_low"]) for r in last if int(r["count"]) > 0)
    assert top <= float(rows[-1]["train_max"]) < float(next(r["bin_high"] for r in last if float(r["bin_low"]) == top))
    losses = list(csv.DictReader(open(log_dir / "train_losses.csv")))
    assert len(losses) == 1347 and {"index", "loss", "correct", "lambda"} <= set(losses[0])
    assert not (next((erm / "logs").iterdir()) / "lambda_vs_loss.png").exists()  # ERM has no multipliers



def test_regressor_fl_on_a_face_folder_updates_lambda_and_reports_mae_in_years(tmp_path):
    import lightning as L

    from callbacks.feasible_learning import FeasibleLearning
    from lightning_modules.feasible_classifier import FeasibleRegressor

    root = write_utkface(tmp_path / "faces", n=40)
    dm = UTKFaceDataModule(str(root), image_size=16, batch_size=4, num_workers=0, young_keep=1.0, train_fraction=1.0)
    fl = FeasibleLearning(epsilon=0.02, dual_lr=0.1)
    report = SampleLossReport(label="FL")
    trainer = L.Trainer(max_epochs=2, callbacks=[fl, report], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        num_sanity_val_steps=0, default_root_dir=tmp_path / "run")
    model = FeasibleRegressor(backbone="linear", lr=1e-3)
    trainer.fit(model, dm)
    assert len(fl.lam) == 32 and int((fl.lam > 0).sum()) > 0
    assert model.target_std == 18.77
    metrics = trainer.callback_metrics
    assert float(metrics["val/mae"]) > 1.0  # in years, not standardised units
    row = report.rows[-1]
    assert "train_acc" not in row and row["train_max"] >= row["train_q99"] >= row["train_mean"] > 0
    assert 0.0 <= row["lambda_frac_zero"] <= 1.0
    # no logger: the report goes to the run's root folder, never to the working directory
    assert (tmp_path / "run" / "sample_metrics.csv").exists() and (tmp_path / "run" / "loss_histogram.png").exists()
