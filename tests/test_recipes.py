"""Every shipped recipe runs (fast_dev_run); logging backends; bad input gives one-line errors.  That every recipe
parses and prints its config (--print_config) is checked by the GPU check's dry run, tests/test_gpu_check.py."""

import pytest
import torch

from recipes.cli import main
from tests.helpers import RECIPES, SMALL_DATA, recipe_data_args, run_cli, run_dir_args


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_fast_dev_run(recipe, tmp_path):
    code = main(["fit", "--config", str(recipe), "--trainer.fast_dev_run=2", *run_dir_args(tmp_path),
                 *recipe_data_args(recipe, tmp_path)])
    assert code == 0


def test_fit_writes_plots_csvs_checkpoints_and_config(tmp_path):
    code = main(["fit", "--config", "recipes/fox_lm.yaml", "--trainer.max_steps=6", "--trainer.val_check_interval=3",
                 "--checkpoint.every_n_train_steps=3", "--data.init_args.val_windows=2", *run_dir_args(tmp_path),
                 *SMALL_DATA])
    assert code == 0
    run = tmp_path / "logs" / "version_0"
    for name in ["config.yaml", "metrics.csv", "position_loss.png", "position_loss.csv", "position_bins.csv",
                 "gates.png", "gate_stats.csv"]:
        assert (run / name).stat().st_size > 0, name
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert "val/loss_128_256" in header and "val/loss_256_512" in header and "gates/mean_log_f" in header
    rows = (run / "position_loss.csv").read_text().splitlines()
    assert len(rows) == 1 + 512  # 4x the training length
    from lightning_modules.fox_lm import FoXLM  # the lazily built model reloads from its checkpoint alone

    loaded = FoXLM.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert loaded.vocab_size == 256 and loaded.train_seq_len == 128  # sizes from the checkpoint's record
    assert loaded.hparams.vocab_size is None and loaded.hparams.train_seq_len is None  # hparams = what was passed
    assert loaded.model.lm_head.out_features == 256


def test_wandb_logger_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    code = main(["fit", "--config", "recipes/fox_lm.yaml", "--trainer.logger=WandbLogger",
                 f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.logger.init_args.project=tests",
                 f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
                 "--data.init_args.val_windows=2", *SMALL_DATA])
    assert code == 0
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir())


def test_tensorboard_logger(tmp_path):
    code = main(["fit", "--config", "recipes/fox_lm.yaml", "--trainer.logger=TensorBoardLogger",
                 f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}",
                 "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--data.init_args.val_windows=2",
                 *SMALL_DATA])
    assert code == 0
    assert list(tmp_path.rglob("events.out.tfevents.*"))


BAD_INPUTS = [
    (["--model.init_args.d_modle=64"], "d_modle"),
    (["--model.init_args.d_model=big"], "d_model"),
    (["--model.init_args.n_layers=0"], "n_layers must be a positive integer, got 0"),
    (["--model.init_args.d_model=-64"], "d_model must be a positive integer, got -64"),
    (["--model.init_args.d_model=100", "--model.init_args.n_heads=3"], "d_model=100 is not divisible by n_heads=3"),
    (["--data.init_args.path=/no/such/tokens.bin"], "data path '/no/such/tokens.bin' does not exist"),
    (["--data.init_args.seq_len=400000"], "data.seq_len=400000 is longer than the training data"),
    (["--data.init_args.batch_size=0"], "data.batch_size must be a positive integer, got 0"),
    (["--model.init_args.fgate=sometimes"], "fgate"),
]


@pytest.mark.parametrize("extra, needle", BAD_INPUTS, ids=[b[1][:30] for b in BAD_INPUTS])
def test_bad_input_is_one_line_error(extra, needle, tmp_path, capsys):
    code = main(["fit", "--config", "recipes/fox_lm.yaml", "--trainer.max_steps=1", *run_dir_args(tmp_path),
                 *SMALL_DATA, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and err[-1] == errors[0] and needle in errors[0], err
    assert len(errors[0]) < 300 and "Traceback" not in "\n".join(err)


def test_bad_input_exit_code_in_a_real_process(tmp_path):
    proc = run_cli(["fit", "--config", "recipes/fox_lm.yaml", "--model.init_args.n_heads=3",
                    *run_dir_args(tmp_path), *SMALL_DATA])
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert lines[-1].startswith("error: ") and "not divisible by n_heads=3" in lines[-1]
    assert "Traceback" not in proc.stderr


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, capsys):
    args = ["fit", "--config", "recipes/fox_lm.yaml", "--checkpoint.every_n_train_steps=2",
            "--data.init_args.val_windows=2", "--trainer.val_check_interval=100", *run_dir_args(tmp_path),
            *SMALL_DATA]
    assert main([*args, "--trainer.max_steps=2"]) == 0
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    before = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    # a fresh run in the same directory with an absurd learning rate: after one update the weights are ~1e30 and
    # the next forward overflows to inf/nan
    code = main([*args, "--trainer.max_steps=50", "--model.init_args.lr=1e30", "--model.init_args.warmup=0",
                 "--trainer.gradient_clip_val=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: NonFiniteLossError: non-finite training"), err[-3:]
    after = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert after["global_step"] == 2
    for key, value in after["state_dict"].items():
        assert torch.equal(value, before[key]), key  # the finished checkpoint is untouched
    # the overflowing backward (finite loss, inf gradients) stopped before the update: no checkpoint of bad weights
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt", "step0000002.ckpt"]


def test_omegaconf_interpolation_in_a_recipe(tmp_path, capsys):
    extra = tmp_path / "extra.yaml"
    extra.write_text("data:\n  class_path: datamodules.text.TextDataModule\n  init_args:\n    seq_len: 48\n"
                     "model:\n  class_path: lightning_modules.fox_lm.FoXLM\n  init_args:\n"
                     "    d_model: 64\n    train_seq_len: ${data.init_args.seq_len}\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", "recipes/fox_lm.yaml", "--config", str(extra), "--print_config"])
    out = capsys.readouterr().out
    assert "train_seq_len: 48" in out and "seq_len: 48" in out


def test_validate_test_predict_subcommands(tmp_path, capsys):
    base = ["--config", "recipes/fox_lm.yaml", "--data.init_args.val_windows=2", *run_dir_args(tmp_path),
            *SMALL_DATA]
    assert main(["fit", *base, "--trainer.max_steps=2"]) == 0
    for sub in ("validate", "test"):
        assert main([sub, *base, "--ckpt_path=last"]) == 0
    assert main(["predict", *base, "--ckpt_path=last", "--model.init_args.max_new_tokens=3"]) == 0
    out = capsys.readouterr().out
    assert "val/loss" in out and "test/loss_256_512" in out


@pytest.mark.parametrize("init_args, needle", [("{mode: kohonen}", "SOM mode 'kohonen' is unknown"),
                                               ("{alpha0: -0.5}", "SOM alpha0 must be >= 0, got -0.5")])
def test_bad_som_callback_config_is_one_line(init_args, needle, tmp_path, capsys):
    extra = tmp_path / "som.yaml"
    extra.write_text("trainer:\n  callbacks:\n    - class_path: callbacks.self_organizing_map.SelfOrganizingMap\n"
                     f"      init_args: {init_args}\n")
    code = main(["fit", "--config", "recipes/cbsom_digits.yaml", "--config", str(extra), *run_dir_args(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and needle in err[-1], err[-1:]
    assert "Not a valid subclass" not in err[-1] and len(err[-1]) < 200


FL_BAD = [("callbacks.feasible_learning.FeasibleLearning", "{epsilon: -0.1}", [],
           "FeasibleLearning epsilon must be >= 0, got -0.1"),
          ("callbacks.feasible_learning.FeasibleLearning", "{epsilon: 0.5, dual_lr: 0}", [],
           "FeasibleLearning dual_lr must be > 0, got 0"),
          ("callbacks.feasible_learning.FeasibleLearning", "{epsilon: 0.5, resilient_alpha: -2}", [],
           "FeasibleLearning resilient_alpha must be > 0 (or null for FL), got -2"),
          ("callbacks.feasible_learning.FeasibleLearning", "{epsilon: 0.5}", ["--data.init_args.with_index=false"],
           "FeasibleLearning needs training items that carry their sample index")]


@pytest.mark.parametrize("cls, init_args, extra, needle", FL_BAD, ids=[b[3][17:45] for b in FL_BAD])
def test_bad_feasible_learning_config_is_one_line(cls, init_args, extra, needle, tmp_path, capsys):
    override = tmp_path / "fl.yaml"
    override.write_text(f"trainer:\n  callbacks:\n    - class_path: {cls}\n      init_args: {init_args}\n")
    code = main(["fit", "--config", "recipes/feasible_digits.yaml", "--config", str(override),
                 *run_dir_args(tmp_path), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and needle in err[-1], err[-1:]
    assert "Not a valid subclass" not in err[-1] and len(err[-1]) < 250


CALLBACK_FLAGS = [
    ("feasible_digits", ["--trainer.callbacks.init_args.dual_lr=0"], "FeasibleLearning dual_lr must be > 0, got 0.0"),
    ("feasible_digits", ["--trainer.callbacks.init_args.epsilon=-1",
                         "--trainer.callbacks.init_args.target_probability=null"],
     "FeasibleLearning epsilon must be >= 0, got -1.0"),
    ("feasible_digits", ["--trainer.callbacks.init_args.dual_lrr=1"], "Option 'dual_lrr' is not accepted"),
    ("cbsom_digits", ["--trainer.callbacks.init_args.mode=kohonen"], "SOM mode 'kohonen' is unknown"),
    ("cbsom_digits", ["--trainer.callbacks.init_args.alpha0=x"], "trainer.callbacks.alpha0: expected float"),
]


@pytest.mark.parametrize("recipe, extra, needle", CALLBACK_FLAGS, ids=[c[2][:30] for c in CALLBACK_FLAGS])
def test_bad_method_callback_flag_is_one_line(recipe, extra, needle, tmp_path, capsys):
    """The README's way to tune a method (--trainer.callbacks.init_args.X, which edits the last callback): a bad
    value is one line naming it, not jsonargparse's dump of the whole callback list."""
    code = main(["fit", "--config", f"recipes/{recipe}.yaml", *run_dir_args(tmp_path), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and needle in err[-1], err[-1:]
    assert "Namespace(" not in err[-1] and "class_path" not in err[-1] and len(err[-1]) < 200, err[-1]
