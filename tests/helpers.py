"""Shared helpers for CLI-level tests."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
SMALL_DATA = ["--data.init_args.max_bytes=300000"]  # embedded data, but quick to read


def quick_data_args(recipe):
    """SMALL_DATA for recipes on the text datamodule (others have nothing slow to read)."""
    return SMALL_DATA if "datamodules.text.TextDataModule" in Path(recipe).read_text() else []


def run_dir_args(tmp_path):
    return [f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}"]


def run_cli(args, env=None, timeout=600):
    """``python -m recipes ARGS`` in a subprocess; returns the CompletedProcess (text)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "recipes", *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


try:
    import lightning as L

    class KillAfterStep(L.Callback):
        """Test helper: SIGKILL the process once ``global_step`` reaches ``step`` (a crash, no cleanup)."""

        def __init__(self, step: int):
            self.step = step

        def on_train_batch_end(self, trainer, *args, **kwargs):
            if trainer.global_step >= self.step:
                os.kill(os.getpid(), 9)
except ImportError:  # pragma: no cover
    pass
