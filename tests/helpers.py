"""Shared helpers for CLI-level tests."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
SMALL_DATA = ["--data.init_args.max_bytes=300000"]  # embedded data, but quick to read


def write_cifar(root, variant="cifar10", n=20):
    """A CIFAR python-pickle folder of random images under ``root`` (as the real archive unpacks)."""
    import pickle

    import numpy as np

    from datamodules.images import CIFAR_LAYOUT

    folder, train_files, test_file, key, classes = CIFAR_LAYOUT[variant]
    d = Path(root) / folder
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for f in train_files + [test_file]:
        entry = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: rng.integers(0, classes, n).tolist()}
        with open(d / f, "wb") as fh:
            pickle.dump(entry, fh)
    return d


def write_image_folder(root, classes=("cat", "dog", "fish"), per_class=3, size=(40, 50)):
    """An ImageNet-style ``train/<class>/*.png`` + ``val/<class>/*.png`` tree of random images."""
    import torch
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for cls in classes:
            (Path(root) / split / cls).mkdir(parents=True)
            for i in range(per_class):
                arr = (torch.rand(*size, 3, generator=rng) * 255).byte().numpy()
                Image.fromarray(arr).save(Path(root) / split / cls / f"{i}.png")
    return Path(root)


def write_utkface(root, n=24, size=(20, 20)):
    """A flat folder of random faces named ``<age>_<gender>_<race>_<datetime>.jpg.chip.jpg`` (ages 1..90)."""
    import torch
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    root = Path(root)
    root.mkdir(parents=True)
    for i in range(n):
        age = 1 + (i * 37) % 90
        arr = (torch.rand(*size, 3, generator=rng) * 255).byte().numpy()
        Image.fromarray(arr).save(root / f"{age}_{i % 2}_{i % 5}_2017010915{i:07d}.jpg.chip.jpg", format="JPEG")
    return root


def write_token_dir(root, vocab=50257, n_train=40_000, n_val=8_000):
    """A nanoGPT-style token folder (train.bin / val.bin, uint16) of random GPT-2-range ids."""
    import numpy as np

    root = Path(root)
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train.bin", n_train), ("val.bin", n_val)):
        rng.integers(0, vocab, n).astype(np.uint16).tofile(root / name)
    return root


SHRINK_LARGE_FOX = ["--model.init_args.d_model=64", "--model.init_args.n_layers=2", "--model.init_args.n_heads=1",
                    "--data.init_args.seq_len=64", "--data.init_args.val_windows=2", "--data.init_args.num_workers=0",
                    "--trainer.accumulate_grad_batches=2"]


def recipe_data_args(recipe, tmp_path):
    """Arguments that make a shipped recipe run quickly on this machine with data the test writes: the embedded text
    is read in part; CIFAR / ImageFolder recipes get a generated tree and small batches / images."""
    text = Path(recipe).read_text()
    if "recipes.strategies.BlockFSDP" in text:  # GPU-only FSDP recipe: same model/precision/data, shrunk, CPU
        write_token_dir(tmp_path / "tokens")
        return [f"--data.init_args.path={tmp_path / 'tokens'}", *SHRINK_LARGE_FOX, "--trainer.accelerator=cpu",
                "--trainer.devices=1", "--trainer.strategy=auto"]
    if "datamodules.text.TextDataModule" in text:
        return list(SMALL_DATA)
    if "datamodules.images.CIFARDataModule" in text:
        write_cifar(tmp_path / "cifar", n=16)
        return [f"--data.init_args.path={tmp_path / 'cifar'}", "--data.init_args.batch_size=4",
                "--data.init_args.num_workers=0"]
    if "datamodules.utkface.UTKFaceDataModule" in text:
        write_utkface(tmp_path / "utk")
        return [f"--data.init_args.path={tmp_path / 'utk'}", "--data.init_args.batch_size=4",
                "--data.init_args.image_size=32", "--data.init_args.num_workers=0"]
    if "datamodules.images.ImageFolderDataModule" in text:
        write_image_folder(tmp_path / "imagenet", per_class=4)
        return [f"--data.init_args.path={tmp_path / 'imagenet'}", "--data.init_args.batch_size=4",
                "--data.init_args.image_size=32", "--data.init_args.resize=36", "--data.init_args.num_workers=0"]
    return []


def run_dir_args(tmp_path):
    return [f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}"]


def run_cli(args, env=None, timeout=600):
    """``python -m recipes ARGS`` in a subprocess; returns the CompletedProcess (text)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "recipes", *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def kill_and_resume(tmp_path, common, callbacks_yaml, kill_at, saved_step):
    """Run ``common`` straight through, and again SIGKILLed after step ``kill_at`` (checkpoint at ``saved_step``) and
    resumed with ``--ckpt_path last``; ``callbacks_yaml`` is the ``trainer.callbacks`` list (YAML list items).
    Returns the two final checkpoints (straight, resumed)."""
    import torch

    def go(name, kill=False, extra=()):
        out = tmp_path / name
        cfg = tmp_path / f"{name}{'_kill' if kill else ''}.yaml"
        text = "trainer:\n  callbacks:\n" + callbacks_yaml
        if kill:
            text += f"    - class_path: tests.helpers.KillAfterStep\n      init_args:\n        step: {kill_at}\n"
        cfg.write_text(text)
        return run_cli([*common, "--config", str(cfg), f"--trainer.default_root_dir={out}",
                        f"--trainer.logger.init_args.save_dir={out}", *extra])

    def last(name):
        return torch.load(tmp_path / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)

    straight = go("straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    crashed = go("resumed", kill=True)
    assert crashed.returncode == -9, crashed.stderr[-2000:]  # really killed, no cleanup
    assert last("resumed")["global_step"] == saved_step
    resumed = go("resumed", extra=["--ckpt_path=last"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return last("straight"), last("resumed")


try:
    import lightning as L

    class KillAfterStep(L.Callback):
        """Test helper: SIGKILL the process once ``global_step`` reaches ``step`` (a crash, no cleanup)."""

        def __init__(self, step: int):
            self.step = step

        def on_train_batch_end(self, trainer, *args, **kwargs):
            if trainer.global_step >= self.step:
                os.kill(os.getpid(), 9)

    class SignalAtStep(L.Callback):
        """Test helper: send ``signal`` (a name, e.g. SIGTERM) to this process once, at ``step`` (a preemption)."""

        def __init__(self, step: int, signal: str = "SIGTERM"):
            self.step, self.signal, self.sent = step, signal, False

        def on_train_batch_end(self, trainer, *args, **kwargs):
            import signal as sig

            if trainer.global_step >= self.step and not self.sent:
                self.sent = True
                os.kill(os.getpid(), getattr(sig, self.signal))
except ImportError:  # pragma: no cover
    pass
