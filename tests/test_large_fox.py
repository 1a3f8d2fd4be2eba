"""The paper-size FoX recipes (125M / 360M / 760M at 16k context): FSDP (one unit per block), bf16-mixed,
activation checkpointing, 32 sequences per step.  Lightning runs FSDP only on CUDA, so on CPU the same recipes run
shrunk under DDP with everything else unchanged; the FSDP run itself is the GPU test."""
import pytest
import torch
import yaml

from lightning_modules.fox_model import Block
from recipes.strategies import BlockFSDP
from tests.helpers import ROOT, SHRINK_LARGE_FOX, run_cli, run_dir_args, write_token_dir

LARGE = {"fox_125m": (768, 12, 12), "fox_360m": (1024, 24, 16), "fox_760m": (1536, 24, 24)}


@pytest.mark.parametrize("name", list(LARGE))
def test_large_recipe_holds_the_paper_setup_and_builds_its_fsdp_strategy(name):
    cfg = yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text())
    trainer, model, data = cfg["trainer"], cfg["model"]["init_args"], cfg["data"]["init_args"]
    d, layers, heads = LARGE[name]
    assert (model["d_model"], model["n_layers"], model["n_heads"]) == (d, layers, heads) and d // heads == 64
    assert model["block"] == "pro" and model["activation_checkpointing"] and model["vocab_size"] == 50257
    assert data["seq_len"] == 16384 and trainer["precision"] == "bf16-mixed"
    assert trainer["devices"] * trainer["num_nodes"] * trainer["accumulate_grad_batches"] * data["batch_size"] == 32
    assert round(model["warmup"] * trainer["max_steps"]) == 512
    strategy = BlockFSDP(**trainer["strategy"]["init_args"])
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert strategy.sharding_strategy.name == "FULL_SHARD"


def test_bad_wrap_class_is_a_clear_error():
    with pytest.raises(ValueError, match="'nowhere.Block' cannot be imported"):
        BlockFSDP(wrap=["nowhere.Block"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_large_recipe_on_a_cpu_machine_says_why_in_one_line(tmp_path, capsys):
    from recipes.cli import main

    base = ["fit", "--config", "recipes/fox_125m.yaml", *run_dir_args(tmp_path)]
    assert main(base) == 2  # as shipped: accelerator gpu
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: ValueError: trainer.accelerator=gpu but this machine has no CUDA GPU; on CPU run "
        "--trainer.accelerator=cpu")
    assert main([*base, "--trainer.accelerator=cpu", "--trainer.devices=2"]) == 2  # its FSDP strategy on CPU
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ValueError: trainer.strategy=recipes.strategies.BlockFSDP shards with torch "
                              "FSDP, which needs CUDA GPUs"), err[-1]
    assert "Traceback" not in "\n".join(err)


@pytest.mark.slow
def test_shrunk_large_recipe_trains_under_two_process_ddp_on_cpu(tmp_path):
    tokens = write_token_dir(tmp_path / "tokens")
    proc = run_cli(["fit", "--config", "recipes/fox_760m.yaml", f"--data.init_args.path={tokens}", *SHRINK_LARGE_FOX,
                    "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
                    "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.enable_progress_bar=false",
                    *run_dir_args(tmp_path / "run")], env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 and ckpt["hyper_parameters"]["activation_checkpointing"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP runs on CUDA only (Lightning)")
@pytest.mark.parametrize("recipe", ["fox_125m", "fox_760m"])
def test_shrunk_large_recipe_trains_with_its_fsdp_strategy_on_gpu(recipe, tmp_path):
    tokens = write_token_dir(tmp_path / "tokens")
    proc = run_cli(["fit", "--config", f"recipes/{recipe}.yaml", f"--data.init_args.path={tokens}", *SHRINK_LARGE_FOX,
                    f"--trainer.devices={torch.cuda.device_count()}", "--trainer.max_steps=2",
                    "--trainer.val_check_interval=2", *run_dir_args(tmp_path / "run")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
