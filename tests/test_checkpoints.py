"""Every subcommand with every kind of checkpoint, for every recipe; checkpoint problems and generation settings as
one-line errors.  The whole matrix runs for one recipe of each model class by default, for all recipes with -m slow."""
import json
from pathlib import Path

import pytest
import torch

from recipes.cli import main
from tests.helpers import RECIPES, SMALL_DATA, one_line_error, recipe_data_args, run_dir_args

DEFAULT = {"fox_lm", "cbsom_digits", "feasible_digits", "feasible_utkface"}  # FoXLM, TopographicClassifier,
# FeasibleClassifier, FeasibleRegressor


def _outputs(root: Path, name: str):
    files = sorted(root.glob(f"logs/version_*/{name}"), key=lambda f: f.stat().st_mtime)
    return files[-1] if files else None


@pytest.mark.parametrize("recipe", [pytest.param(r, marks=() if r.stem in DEFAULT else pytest.mark.slow)
                                    for r in RECIPES], ids=lambda p: p.stem)
def test_every_subcommand_with_every_checkpoint_kind(recipe, tmp_path):
    data = recipe_data_args(recipe, tmp_path)
    base = ["--config", str(recipe), *run_dir_args(tmp_path), *data, "--trainer.limit_val_batches=2",
            "--trainer.limit_test_batches=2", "--trainer.limit_predict_batches=2", "--trainer.max_epochs=-1"]
    if "fox" in recipe.stem or "transformer" in recipe.stem:
        base += ["--data.init_args.val_windows=2", "--model.init_args.max_new_tokens=3"]
    fit = ["fit", *base, "--trainer.val_check_interval=2", "--checkpoint.every_n_train_steps=2",
           "--checkpoint.save_top_k=-1", "--trainer.check_val_every_n_epoch=null"]
    assert main([*fit, "--trainer.max_steps=2"]) == 0
    ckpt_file = str(tmp_path / "checkpoints" / "step0000002.ckpt")
    out_name = "completions.jsonl" if "fox" in recipe.stem or "transformer" in recipe.stem else "predictions.csv"
    for kind in (ckpt_file, "last"):
        for sub in ("validate", "test"):
            assert main([sub, *base, f"--ckpt_path={kind}"]) == 0, (sub, kind)
        assert main(["predict", *base, f"--ckpt_path={kind}"]) == 0, kind
        written = _outputs(tmp_path, out_name)
        assert written is not None and len(written.read_text().splitlines()) >= 2, (kind, written)
    assert main([*fit, f"--ckpt_path={ckpt_file}", "--trainer.max_steps=4"]) == 0  # resume from a file
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    assert main([*fit, "--ckpt_path=last", "--trainer.max_steps=6"]) == 0
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6


FOX = ["--config", "recipes/fox_lm.yaml", "--data.init_args.val_windows=2", *SMALL_DATA]


def _fit_fox(tmp_path, *extra):
    args = ["fit", *FOX, *run_dir_args(tmp_path), "--trainer.max_steps=2", "--checkpoint.every_n_train_steps=2",
            *extra]
    assert main(args) == 0
    return str(tmp_path / "checkpoints" / "step0000002.ckpt")


def test_architecture_from_the_checkpoint_run_settings_from_the_command_line(tmp_path):
    ckpt = _fit_fox(tmp_path / "a", "--model.init_args.d_model=64", "--model.init_args.block=pro")
    out = tmp_path / "b"
    assert main(["validate", *FOX, *run_dir_args(out), f"--ckpt_path={ckpt}",
                 "--model.init_args.attn_backend=dense"]) == 0
    config = (out / "logs" / "version_0" / "config.yaml").read_text()
    assert "d_model: 64" in config and "block: pro" in config  # the checkpoint's network
    assert "attn_backend: dense" in config  # the user's run-time choice is kept
    hp = torch.load(ckpt, weights_only=False)["hyper_parameters"]
    assert hp["vocab_size"] is None and hp["train_seq_len"] is None  # hparams are what the user passed


def test_truncated_checkpoint_names_the_newest_readable_one(tmp_path, capsys):
    ckpt = Path(_fit_fox(tmp_path))
    half = tmp_path / "checkpoints" / "step0000004.ckpt"
    data = ckpt.read_bytes()
    half.write_bytes(data[: len(data) // 2])
    for kind in (str(half), "last"):
        if kind == "last":
            (tmp_path / "checkpoints" / "last.ckpt").unlink()
            (tmp_path / "checkpoints" / "last.ckpt").symlink_to(half.name)
        assert main(["validate", *FOX, *run_dir_args(tmp_path), f"--ckpt_path={kind}"]) == 2
        line = one_line_error(capsys)
        assert "step0000004.ckpt cannot be read (truncated or corrupt" in line, line
        assert line.endswith(f"the newest readable checkpoint beside it is {ckpt}"), line


def test_checkpoint_of_another_recipe_is_one_line(tmp_path, capsys):
    assert main(["fit", "--config", "recipes/cbsom_digits.yaml", *run_dir_args(tmp_path / "som"),
                 "--trainer.max_steps=1", "--checkpoint.every_n_train_steps=1"]) == 0
    som = next((tmp_path / "som" / "checkpoints").glob("step*.ckpt"))
    capsys.readouterr()
    assert main(["validate", *FOX, *run_dir_args(tmp_path), f"--ckpt_path={som}"]) == 2
    line = one_line_error(capsys)
    assert "holds a lightning_modules.topographic_resnet.TopographicClassifier model but this recipe's model is " \
           "lightning_modules.fox_lm.FoXLM" in line, line


def test_vocabulary_clashes_name_both_values(tmp_path, capsys):
    assert main(["fit", *FOX, *run_dir_args(tmp_path), "--trainer.max_steps=1",
                 "--model.init_args.vocab_size=100"]) == 2
    line = one_line_error(capsys)
    assert "model.vocab_size=100" in line and "256" in line, line
    ckpt = _fit_fox(tmp_path / "a")
    import numpy as np

    np.random.default_rng(0).integers(0, 1000, 30_000).astype(np.uint16).tofile(tmp_path / "t.bin")
    capsys.readouterr()
    assert main(["validate", "--config", "recipes/fox_lm.yaml", "--data.init_args.val_windows=2",
                 f"--data.init_args.path={tmp_path / 't.bin'}", "--data.init_args.vocab_size=1000",
                 *run_dir_args(tmp_path / "b"), f"--ckpt_path={ckpt}"]) == 2
    line = one_line_error(capsys)
    assert "vocabulary of 256 tokens" in line and "1000" in line, line


@pytest.mark.parametrize("extra, needle", [
    (["--data.init_args.prompts=/no/prompts.txt"], "prompt file '/no/prompts.txt' does not exist"),
    (["--data.init_args.prompts={empty}"], ":2: empty prompt"),
    (["--model.init_args.top_p=1.5"], "top_p must be in (0, 1], got 1.5"),
    (["--model.init_args.top_p=0"], "top_p must be in (0, 1], got 0.0"),
    (["--model.init_args.max_new_tokens=0"], "max_new_tokens must be an integer >= 1, got 0"),
    (["--model.init_args.temperature=-1"], "temperature must be >= 0 (0 = greedy), got -1.0"),
    (["--model.init_args.top_k=many"], "model.top_k: expected int or null, got 'many'"),
])
def test_bad_generation_input_is_one_line(extra, needle, tmp_path, capsys):
    empty = tmp_path / "prompts.txt"
    empty.write_text("def f(\n\nclass A\n")
    extra = [e.format(empty=empty) for e in extra]
    assert main(["predict", *FOX, *run_dir_args(tmp_path), *extra]) == 2
    line = one_line_error(capsys)
    assert needle in line and len(line) < 300, line


def test_generated_text_beats_a_random_byte_string(tmp_path):
    """Greedy text from a briefly trained tiny FoX has a lower loss under the same model than random bytes: the
    completions come from the model, decoded with the data's tokenizer (a test that fails on garbage)."""
    _fit_fox(tmp_path, "--trainer.max_steps=20", "--checkpoint.every_n_train_steps=20")
    ckpt = str(tmp_path / "checkpoints" / "step0000020.ckpt")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["import os\n", "def main(", "class A"]))
    assert main(["predict", *FOX, *run_dir_args(tmp_path), f"--ckpt_path={ckpt}", f"--data.init_args.prompts={prompts}",
                 "--model.init_args.max_new_tokens=48", "--model.init_args.temperature=0"]) == 0
    rows = [json.loads(line) for line in _outputs(tmp_path, "completions.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["import os\n", "def main(", "class A"]
    assert all(r["tokens"] == 48 and r["seconds"] > 0 for r in rows)
    from lightning_modules.fox_lm import FoXLM

    lm = FoXLM.load_from_checkpoint(ckpt).eval()

    def loss(text_bytes):
        ids = torch.tensor(list(text_bytes))[None]
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(lm(ids[:, :-1])[0], ids[0, 1:]).item()

    rng = torch.Generator().manual_seed(0)
    for r in rows:
        generated = (r["prompt"] + r["completion"]).encode()
        noise = r["prompt"].encode() + bytes(torch.randint(0, 256, (48,), generator=rng).tolist())
        assert loss(generated) < loss(noise) - 1.0, (r, loss(generated), loss(noise))


def test_fine_tune_from_weights_with_init_from(tmp_path):
    """--model.init_args.init_from starts a new fit from a checkpoint's weights (architecture from it, optimizer and
    step fresh): the first logged training loss equals the source checkpoint's loss, not a fresh model's."""
    ckpt = _fit_fox(tmp_path / "a", "--model.init_args.d_model=64", "--trainer.max_steps=6",
                    "--checkpoint.every_n_train_steps=6")
    ckpt = str(tmp_path / "a" / "checkpoints" / "step0000006.ckpt")
    out = tmp_path / "b"
    assert main(["fit", *FOX, *run_dir_args(out), f"--model.init_args.init_from={ckpt}", "--trainer.max_steps=1",
                 "--checkpoint.every_n_train_steps=1"]) == 0
    tuned = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    source = torch.load(ckpt, weights_only=False)
    assert tuned["global_step"] == 1 and tuned["state_dict"]["model.embed.weight"].shape == (256, 64)
    moved = (tuned["state_dict"]["model.embed.weight"] - source["state_dict"]["model.embed.weight"]).abs().max()
    assert 0 < moved < 0.05  # one small step away from the source weights, far from a fresh N(0, 0.02) draw


def test_a_bug_of_ours_keeps_its_traceback(tmp_path, capsys):
    """User errors are one line; an exception from a lookup inside our code is a bug: re-raised with its traceback
    (a real process shows it and exits non-zero)."""
    extra = tmp_path / "bug.yaml"
    extra.write_text("trainer:\n  callbacks:\n    - class_path: tests.helpers.LookupBugAtStep\n")
    with pytest.raises(KeyError, match="missing"):
        main(["fit", *FOX, "--config", str(extra), *run_dir_args(tmp_path), "--trainer.max_steps=2"])
    from tests.helpers import run_cli

    proc = run_cli(["fit", *FOX, "--config", str(extra), *run_dir_args(tmp_path / "p"), "--trainer.max_steps=2"])
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "KeyError: 'missing'" in proc.stderr
    assert "error: KeyError" not in proc.stderr
