"""W&B behind one switch (recipes/loggers/wandb.yaml): offline with no credentials, the full resolved config and the
recipe's plots logged, and a second run in the same folder works (the LightningCLI + W&B config.yaml pitfall)."""

import pytest

from recipes.cli import main
from recipes.loggers import RecipeWandbLogger
from tests.helpers import run_cli, wandb_run_summary


def test_offline_without_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert RecipeWandbLogger(save_dir=str(tmp_path / "w"))._offline
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert not RecipeWandbLogger(save_dir=str(tmp_path / "w"))._offline


def test_wandb_preset_logs_config_and_plots_and_reruns_in_the_same_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    args = ["fit", "--config", "recipes/feasible_digits.yaml", "--config", "recipes/loggers/wandb.yaml",
            "--trainer.max_epochs=1", "--trainer.check_val_every_n_epoch=1", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={run}", f"--trainer.logger.init_args.save_dir={tmp_path / 'wandb'}"]
    assert main(args) == 0
    assert main(args) == 0  # the same folder again: config.yaml exists and is overwritten, no failure
    runs = sorted((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    first, recorded = (wandb_run_summary(next(r.glob("run-*.wandb"))) for r in runs)
    assert first["exit_code"] == 0 and recorded["exit_code"] == 0  # each command closes its run: complete files
    recipe = recorded["config"]["recipe"]  # the full resolved config
    assert recipe["trainer"]["max_epochs"] == 1 and recipe["data"]["init_args"]["with_index"] is True
    assert any(cb["class_path"] == "callbacks.feasible_learning.FeasibleLearning" for cb in recipe["trainer"]["callbacks"])
    assert {"val/acc", "samples/train_max"} <= recorded["history"], sorted(recorded["history"])
    images = {p.name.rsplit("_", 2)[0] for p in (runs[-1] / "files" / "media" / "images" / "plots").glob("*.png")}
    assert {"loss_histogram", "lambda_vs_loss"} <= images
    assert (run / "config.yaml").is_file() and (run / "loss_histogram.png").is_file()
    assert "target_probability: 0.6" in (run / "config.yaml").read_text()


def test_checkpoint_artifacts_offline_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """log_model uploads checkpoints (Lightning's option); offline there is nothing to upload to, which Lightning
    refuses: the user gets that reason in one line."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    code = main(["fit", "--config", "recipes/erm_digits.yaml", "--config", "recipes/loggers/wandb.yaml",
                 "--trainer.logger.init_args.log_model=true", f"--trainer.default_root_dir={tmp_path / 'run'}",
                 f"--trainer.logger.init_args.save_dir={tmp_path / 'wandb'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and "log_model=True and offline=True" in err[-1]
    assert err[-1].endswith("to log your model.")


def test_a_run_started_by_the_sweep_agent_reports_to_wandb(tmp_path):
    """``wandb agent`` sets WANDB_SWEEP_ID / WANDB_RUN_ID and runs the sweep's command (a fresh process) naming only
    the recipe: the CLI adds a W&B logger after the recipe's CSV logger, so the run joins the agent's run id and its
    config holds the swept value."""
    env = {"HOME": str(tmp_path), "WANDB_MODE": "offline", "WANDB_SWEEP_ID": "sweep01", "WANDB_RUN_ID": "agentrun7",
           "WANDB_API_KEY": ""}
    root = tmp_path / "runs"
    proc = run_cli(["fit", "--config", "recipes/erm_digits.yaml", "--trainer.max_epochs=1",
                    "--trainer.enable_progress_bar=false", "--model.init_args.lr=0.00123",
                    f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}"], env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_root = root / "agentrun7"  # one folder per agent run
    (offline,) = (run_root / "wandb" / "wandb").glob("offline-run-*-agentrun7")
    run = wandb_run_summary(next(offline.glob("run-*.wandb")))
    assert run["run_id"] == "agentrun7" and run["exit_code"] == 0
    assert run["config"]["recipe"]["model"]["init_args"]["lr"] == 0.00123  # the swept value, in the run's config
    assert any(k.startswith("train/") for k in run["history"]), sorted(run["history"])
    assert (run_root / "logs" / "version_0" / "metrics.csv").is_file()  # the CSV logger is kept


@pytest.mark.slow
@pytest.mark.parametrize("recipe, extra, plots", [
    ("recipes/cbsom_digits.yaml", ["--trainer.max_epochs=1", "--trainer.check_val_every_n_epoch=1"],
     {"selectivity_maps", "orientation_map", "distance_curves"}),
    ("recipes/fox_lm.yaml", ["--trainer.max_steps=4", "--trainer.val_check_interval=4",
                             "--data.init_args.val_windows=2", "--data.init_args.max_bytes=300000"],
     {"position_loss", "gates"}),
])
def test_wandb_gets_each_methods_plots(tmp_path, monkeypatch, recipe, extra, plots):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["fit", "--config", recipe, "--config", "recipes/loggers/wandb.yaml", *extra,
                 "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path / 'run'}",
                 f"--trainer.logger.init_args.save_dir={tmp_path / 'wandb'}"]) == 0
    (run,) = (tmp_path / "wandb" / "wandb").glob("offline-run-*")
    images = {p.name.rsplit("_", 2)[0] for p in (run / "files" / "media" / "images" / "plots").glob("*.png")}
    assert plots <= images, images
