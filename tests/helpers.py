"""Shared helpers for CLI-level tests."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
SMALL_DATA = ["--data.init_args.max_bytes=300000"]  # embedded data, but quick to read
MNIST_TASKS = ("mnist", "fashion_mnist", "kmnist", "qmnist", "emnist_digits", "emnist_letters", "emnist_mnist")


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


def last_checkpoint(folder):
    """The checkpoint ``folder/checkpoints/last.ckpt`` links, loaded on the CPU."""
    import torch

    return torch.load(Path(folder) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def _write_idx(path, array, code=0x08):
    """An idx (SN3 Pascal Vincent) file: magic (type code, rank), big-endian sizes, then the data."""
    import struct

    import numpy as np

    array = np.asarray(array, dtype=">i4" if code == 0x0C else np.uint8)
    header = struct.pack(">I", (code << 8) | array.ndim) + b"".join(struct.pack(">I", n) for n in array.shape)
    Path(path).write_bytes(header + array.tobytes())


def write_mnist_family(root, tasks=("mnist", "fashion_mnist", "kmnist"), n_train=40, n_test=20, seed=0):
    """torchvision's raw layout for MNIST-family tasks (``datamodules.bias_tasks.MNIST_FAMILY``) with random images."""
    import numpy as np

    rng = np.random.default_rng(seed)
    folders = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "kmnist": "KMNIST", "qmnist": "QMNIST"}
    for task in tasks:
        images = {split: rng.integers(0, 256, (n, 28, 28)) for split, n in (("train", n_train), ("test", n_test))}
        labels = {split: rng.integers(1 if task == "emnist_letters" else 0, 27 if task == "emnist_letters" else 10,
                                      len(images[split])) for split in images}
        raw = Path(root) / (folders.get(task) or "EMNIST") / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for split in ("train", "test"):
            if task == "qmnist":  # labels: (n, 8) int32, class first
                extended = np.zeros((len(labels[split]), 8), dtype=np.int64)
                extended[:, 0] = labels[split]
                _write_idx(raw / f"qmnist-{split}-images-idx3-ubyte", images[split])
                _write_idx(raw / f"qmnist-{split}-labels-idx2-int", extended, code=0x0C)
            elif task.startswith("emnist_"):
                prefix = f"emnist-{task.split('_', 1)[1]}-{split}"
                _write_idx(raw / f"{prefix}-images-idx3-ubyte", images[split])
                _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[split])
            else:
                prefix = "train" if split == "train" else "t10k"
                _write_idx(raw / f"{prefix}-images-idx3-ubyte", images[split])
                _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[split])


SHRINK_DUALFORMER = ["--model.init_args.d_model=32", "--model.init_args.n_layers=1", "--model.init_args.n_heads=2",
                     "--data.init_args.batch_size=2"]  # a GPU-sized Dualformer recipe, the same mazes, on CPU


def tiny_prior(root, task):
    """A ``DiffusionPrior`` checkpoint of ``task`` after two steps (what the alignment recipes start from)."""
    out = Path(root) / f"prior_{task}"
    if not (out / "checkpoints" / "last.ckpt").exists():
        from recipes.cli import main

        assert main(["fit", "--config", f"recipes/diffusion_prior_{task}.yaml", f"--trainer.default_root_dir={out}",
                     f"--trainer.logger.init_args.save_dir={out}", "--trainer.max_steps=2",
                     "--trainer.limit_val_batches=0", "--data.init_args.n_train=1024"]) == 0
    return str(out)


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
    if "datamodules.nabla_gfn_data" in text:  # few samples; alignment runs start from a two-step prior
        small = ["--model.init_args.eval_samples=64", "--model.init_args.predict_batch=8"]
        if "DiffusionDataModule" in text:
            return [*small, "--data.init_args.n_train=1024"]
        if "task: sd" in text:  # a tiny pipeline folder and reward, CPU
            pipe, reward = write_tiny_sd(tmp_path)
            return [*small, f"--model.init_args.prior_ckpt={pipe}", f"--model.init_args.reward={{kind: folder, "
                    f"path: {reward}}}", "--model.init_args.num_steps=4", "--model.init_args.batch_size=2",
                    "--model.init_args.micro_batch=3", "--model.init_args.eval_samples=4",
                    "--model.init_args.predict_batch=2", "--model.init_args.flow_net={kind: unet, block_out_channels: "
                    "[8, 16], attention: false, norm_num_groups: 4}", "--trainer.accelerator=cpu",
                    "--trainer.precision=32-true"]
        task = "digits" if "task: digits" in text else "ring"
        return [*small, f"--model.init_args.prior_ckpt={tiny_prior(tmp_path, task)}", "--model.init_args.batch_size=8",
                "--model.init_args.reference_samples=64"]
    if "datamodules.rlhf_data" in text:  # few prompts; the TL;DR recipe on tiny GPT-2 folders, CPU
        small = ["--data.init_args.eval_prompts=32", "--data.init_args.batch_size=8"]
        if "prompts: hf_disk" not in text:
            return small
        T = write_tiny_rlhf(tmp_path / "rlhf")
        return [*small, f"--model.init_args.policy.path={T / 'policy'}",
                f"--data.init_args.tokenizer={T / 'tokenizer'}", f"--model.init_args.reward.path={T / 'rm'}",
                f"--model.init_args.gold.path={T / 'rm'}", f"--data.init_args.train_path={T / 'tldr'}",
                "--data.init_args.actor_device=cpu", "--data.init_args.eval_batch_size=4",
                "--model.init_args.response_length=5", "--trainer.accelerator=cpu", "--trainer.precision=32-true"]
    if "datamodules.preference_pairs" in text and "source: hf_disk" in text:  # the GPU recipe on tiny folders, CPU
        T = write_tiny_preferences(tmp_path / "pairs")
        return [f"--model.init_args.policy.path={T / 'policy'}", f"--data.init_args.tokenizer={T / 'tokenizer'}",
                f"--data.init_args.train_path={T / 'orca'}", "--trainer.accelerator=cpu",
                "--trainer.precision=32-true", "--trainer.accumulate_grad_batches=2"]
    if "datamodules.dualformer_data" in text:  # a few mazes generated in the test's folder, short answers
        return [f"--data.init_args.data_dir={tmp_path / 'mazes'}", "--data.init_args.n_train=64",
                "--data.init_args.n_test=8", "--data.init_args.processes=1", "--model.init_args.max_new_tokens=24",
                *(SHRINK_DUALFORMER if "d_model: 64" not in text else []),
                *(["--data.init_args.max_trace_tokens=1500", "--data.init_args.max_expansions=300"]
                  if "task: sokoban" in text else [])]
    if "datamodules.replay_data.ReplayDataModule" in text and "atari: true" in text:  # a short warm-up, small replay
        return ["--data.init_args.warmup_steps=64", "--data.init_args.capacity=1000",
                "--data.init_args.eval_max_steps=50"]
    if "datamodules.realtime" in text:  # realtime recipes (virtual or wall-clock time): the same, shorter
        return ["--data.init_args.warmup_steps=64", "--data.init_args.capacity=1000",
                "--data.init_args.eval_max_steps=50"]
    if "datamodules.bias_tasks.MNISTFamilyDataModule" in text:  # all seven tasks, tiny files, a narrow network
        write_mnist_family(tmp_path / "mnist", MNIST_TASKS)
        return [f"--data.init_args.path={tmp_path / 'mnist'}", "--data.init_args.batch_size=16",
                "--model.init_args.width=64"]
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


def one_line_error(capsys) -> str:
    """The run's stderr ends with exactly one ``error: ...`` line and holds no traceback; returns that line."""
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and err[-1] == errors[0] and "Traceback" not in "\n".join(err), err[-5:]
    return errors[0]


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


def signal_and_resume(tmp_path, common, signal_at, callbacks_yaml="    - class_path: "
                      "callbacks.episode_report.EpisodeReport\n"):
    """Run ``common`` (a ``fit`` command line) straight through, and again stopped by SIGTERM at batch ``signal_at``
    (Lightning saves and exits 143) and resumed with ``--ckpt_path last``; both final trainer weights must be equal.
    Returns the two final checkpoints (straight, resumed) for the caller's further checks."""
    import torch

    env = {"OMP_NUM_THREADS": "1"}
    straight = run_cli([*common, *run_dir_args(tmp_path / "straight")], env=env)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killer = tmp_path / "kill.yaml"
    killer.write_text("trainer:\n  callbacks:\n" + callbacks_yaml + "    - class_path: tests.helpers.SignalAtStep\n"
                      f"      init_args:\n        batch: {signal_at}\n")
    stopped = run_cli([*common, "--config", str(killer), *run_dir_args(tmp_path / "resumed")], env=env)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    resumed = run_cli([*common, *run_dir_args(tmp_path / "resumed"), "--ckpt_path=last"], env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = last_checkpoint(tmp_path / "straight"), last_checkpoint(tmp_path / "resumed")
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    return a, b


ddp_signal_and_resume = signal_and_resume  # the same with ``--trainer.devices=2 --trainer.strategy=ddp`` in common


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
        """Test helper: send ``signal`` (a name, e.g. SIGTERM) to this process once, at the end of micro-batch
        ``batch`` (counted over the run) (a preemption landing in the middle of gradient accumulation)."""

        def __init__(self, batch: int, signal: str = "SIGTERM"):
            self.batch, self.signal, self.seen = batch, signal, 0

        def on_train_batch_end(self, trainer, *args, **kwargs):
            import signal as sig

            self.seen += 1
            if self.seen == self.batch:
                os.kill(os.getpid(), getattr(sig, self.signal))

    class SignalAfterFit(L.Callback):
        """Test helper: send ``signal`` to this process as it exits, after the run (SLURM's time-limit warning
        landing once the work is done)."""

        def __init__(self, signal: str = "SIGUSR1"):
            self.signal = signal

        def teardown(self, trainer, pl_module, stage):
            import atexit
            import signal as sig

            atexit.register(os.kill, os.getpid(), getattr(sig, self.signal))

    class TouchAtStep(L.Callback):
        """Test helper: create the file ``path`` once ``global_step`` reaches ``step`` (tells a test when to signal)."""

        def __init__(self, step: int, path: str):
            self.step, self.path = step, path

        def on_train_batch_end(self, trainer, *args, **kwargs):
            if trainer.global_step >= self.step and not os.path.exists(self.path):
                open(self.path, "w").close()

    class LookupBugAtStep(L.Callback):
        """Test helper: a bug of ours (a KeyError from a dict lookup) at step ``step``."""

        def __init__(self, step: int = 1):
            self.step = step

        def on_train_batch_end(self, trainer, *args, **kwargs):
            if trainer.global_step >= self.step:
                {}["missing"]

    class RecordStartStep(L.Callback):
        """Test helper: write ``global_step`` at the start of training to ``path`` (0 unless the run resumed)."""

        def __init__(self, path: str):
            self.path = path

        def on_train_start(self, trainer, *args, **kwargs):
            with open(self.path, "w") as f:
                f.write(str(trainer.global_step))
except ImportError:  # pragma: no cover
    pass


def wandb_run_records(path) -> list:
    """The complete records of a W&B ``.wandb`` run file as raw protobuf bytes, block framing removed (the file is a
    LevelDB style log: a 7-byte W&B header, then 32 KiB blocks of chunks each with a 7-byte header of crc32,
    little-endian length and type full/first/middle/last), so a test can look for a value that a block boundary
    might split.  A record whose chunks are not all on disk yet (W&B's service process may still be writing) is left
    out."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", path
    records, current, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the tail of a block too short for a header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        current = chunk if kind in (1, 2) else current + chunk
        if kind in (1, 4):
            records.append(current)
    return records


def wandb_run_summary(path, timeout: float = 60.0) -> dict:
    """What an offline W&B run recorded: ``run_id``, ``config`` (key -> decoded JSON value), ``history`` (the set
    of logged metric keys) and ``exit_code``, parsed with W&B's own protobuf schema.  ``wandb.finish`` returns
    before W&B's service process has necessarily written the run file to its end, so this reads again until the
    run's exit record is on disk (``exit_code`` stays None if it never comes within ``timeout`` seconds)."""
    import json
    import time

    from wandb.proto import wandb_internal_pb2 as pb2

    deadline = time.monotonic() + timeout
    while True:
        out = {"run_id": None, "config": {}, "history": set(), "exit_code": None}
        for raw in wandb_run_records(path):
            record = pb2.Record()
            record.ParseFromString(raw)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                out["run_id"] = record.run.run_id
            elif kind == "config":
                for item in record.config.update:
                    out["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            elif kind == "history":
                out["history"].update(item.key or "/".join(item.nested_key) for item in record.history.item)
            elif kind == "exit":
                out["exit_code"] = record.exit.exit_code
        if out["exit_code"] is not None or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def write_tiny_sd(root):
    """A tiny Stable-Diffusion-layout pipeline folder (unet, vae, text_encoder, tokenizer, scheduler; random weights,
    a 12-token vocabulary) and a TorchScript reward model on its decoded images; returns ``(pipeline, reward)``."""
    import json

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = Path(root)
    pipe, reward = root / "tiny_sd", root / "tiny_reward"
    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                         attention_head_dim=2, norm_num_groups=4).save_pretrained(pipe / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,), latent_channels=4, norm_num_groups=4,
                  sample_size=8).save_pretrained(pipe / "vae")
    CLIPTextModel(CLIPTextConfig(vocab_size=12, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=16, eos_token_id=1, bos_token_id=0,
                                 pad_token_id=1)).save_pretrained(pipe / "text_encoder")
    tok = pipe / "tokenizer"
    tok.mkdir(parents=True)
    vocab = ["<|startoftext|>", "<|endoftext|>", "c", "a", "t</w>", "d", "o", "g</w>", "x", "y", "z", "!"]
    (tok / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(vocab)}))
    (tok / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(tok / "vocab.json"), str(tok / "merges.txt"), model_max_length=16).save_pretrained(tok)
    DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  clip_sample=False, set_alpha_to_one=False, steps_offset=1).save_pretrained(pipe / "scheduler")
    reward.mkdir()

    class Brightness(torch.nn.Module):
        def forward(self, x):
            return -((x.mean(dim=(1, 2, 3)) - 0.5) ** 2) * 10

    torch.jit.script(Brightness()).save(str(reward / "reward.pt"))
    return str(pipe), str(reward)


def write_tiny_rlhf(root, n_train=24, n_val=6):
    """Tiny Hugging Face folders for the RLHF recipes: a word-level tokenizer (``tokenizer``), a 1-layer GPT-2 policy
    (``policy``), a GPT-2 sequence-classification reward model (``rm``), prompts as JSONL (``train.jsonl``,
    ``val.jsonl``) and as a TL;DR-layout ``save_to_disk`` dataset (``tldr``: ``query`` / ``reference_response``).
    Returns the folder."""
    import json
    import random

    import torch
    from datasets import Dataset, DatasetDict
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast

    root = Path(root)
    words = [f"w{i}" for i in range(20)]
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    fast.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(vocab), n_embd=16, n_layer=1, n_head=2, n_positions=64, eos_token_id=2,
                        bos_token_id=2, pad_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(root / "policy")
    config.num_labels = 1
    GPT2ForSequenceClassification(config).save_pretrained(root / "rm")
    rng = random.Random(0)
    rows = [{"prompt": " ".join(rng.choice(words) for _ in range(rng.randint(2, 6))),
             "reference": " ".join(rng.choice(words) for _ in range(3))} for _ in range(n_train + n_val)]
    for name, part in (("train", rows[:n_train]), ("val", rows[n_train:])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    as_tldr = lambda part: Dataset.from_dict({"query": [r["prompt"] for r in part],  # noqa: E731
                                              "reference_response": [r["reference"] for r in part]})
    DatasetDict(train=as_tldr(rows[:n_train]), validation=as_tldr(rows[n_train:])).save_to_disk(str(root / "tldr"))
    return root


ORCA_COLUMNS = ("system", "input", "chosen", "rejected", "status", "chosen_score", "in_gsm8k_train")


def write_tiny_preferences(root, n=40):
    """``write_tiny_rlhf``'s tokenizer and GPT-2 policy, plus preference pairs: ``train.jsonl`` / ``val.jsonl``
    (``prompt`` / ``chosen`` / ``rejected``, some with a ``system``), ``orca`` (a ``save_to_disk`` dataset in the
    layout of ``argilla/distilabel-intel-orca-dpo-pairs``, where every fifth row is a tie, a low score or a GSM8K
    question that the authors' filter drops) and ``tokenizer_chat`` (the tokenizer with a chat template and a BOS
    token).
    Returns the folder."""
    import json
    import random

    from datasets import Dataset
    from transformers import AutoTokenizer

    root = Path(write_tiny_rlhf(root))
    rng = random.Random(1)
    words = [f"w{i}" for i in range(20)]
    say = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    rows = []
    for i in range(n):
        bad = i % 5 == 4
        rows.append({"system": say(2) if i % 2 else "", "input": say(rng.randint(2, 6)), "chosen": say(3),
                     "rejected": say(rng.randint(1, 4)), "status": "tie" if bad and i % 3 == 0 else "unanimous",
                     "chosen_score": 7.0 if bad and i % 3 == 1 else 9.0, "in_gsm8k_train": bad and i % 3 == 2})
    Dataset.from_dict({c: [r[c] for r in rows] for c in ORCA_COLUMNS}).save_to_disk(str(root / "orca"))
    as_pair = lambda r: {"prompt": r["input"], "chosen": r["chosen"], "rejected": r["rejected"],  # noqa: E731
                         **({"system": r["system"]} if r["system"] else {})}
    (root / "train.jsonl").write_text("".join(json.dumps(as_pair(r)) + "\n" for r in rows[: n - 10]))
    (root / "val.jsonl").write_text("".join(json.dumps(as_pair(r)) + "\n" for r in rows[n - 10:]))
    tok = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True, bos_token="[EOS]")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}assistant : {% endif %}")
    tok.save_pretrained(root / "tokenizer_chat")
    return root
