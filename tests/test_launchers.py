"""Launchers and scale checks: scripts/torchrun.sh runs a real 2-process DDP fit on this machine; device / node
counts that cannot work stop before any training in one line."""
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, run_cli, run_dir_args


@pytest.mark.slow  # a multi-process check (developers' guide: run before resolving, not in the default suite)
def test_torchrun_launcher_two_cpu_processes_equal_one_process(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "torchrun"
    proc = subprocess.run([str(ROOT / "scripts" / "torchrun.sh"), "2", "recipes/feasible_digits.yaml",
                           "--trainer.max_steps=8", "--trainer.accelerator=cpu", "--data.init_args.batch_size=32",
                           "--trainer.enable_progress_bar=false", *run_dir_args(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting with 2 processes" in proc.stdout + proc.stderr
    one = run_cli(["fit", "--config", "recipes/feasible_digits.yaml", "--trainer.max_steps=8",
                   "--data.init_args.batch_size=64", "--trainer.enable_progress_bar=false",
                   *run_dir_args(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=False) for d in (out, tmp_path / "one"))
    assert a["global_step"] == b["global_step"] == 8
    lam = [next(v for k, v in c["callbacks"].items() if k.startswith("FeasibleLearning"))["lam"] for c in (a, b)]
    torch.testing.assert_close(lam[0], lam[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("extra, env, needle", [
    (["--trainer.devices=64", "--trainer.accelerator=cpu"], {}, "trainer.devices=64 but this machine has"),
    (["--trainer.num_nodes=1"], {"SLURM_JOB_ID": "7", "SLURM_NNODES": "2"},
     "trainer.num_nodes=1 but the SLURM allocation has 2 nodes"),
    (["--trainer.devices=1", "--trainer.num_nodes=2"],
     {"SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "2(x2)"},
     "trainer.devices=1 but SLURM runs 2 tasks per node"),
])
def test_impossible_scale_is_a_one_line_error_before_training(tmp_path, monkeypatch, capsys, extra, env, needle):
    from recipes.cli import main

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["fit", "--config", "recipes/feasible_digits.yaml", *extra, *run_dir_args(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and needle in err[-1], err[-3:]
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "checkpoints").exists()  # stopped before any training


def _fake_srun(tmp_path):
    """An ``srun`` on PATH that records the command it was given (one argument per line) instead of launching it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(f"#!/bin/bash\nprintf '%s\\n' \"$@\" > {tmp_path / 'srun_args.txt'}\n")
    srun.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("recipe, strategy, want", [("recipes/fox_760m.yaml", None, None),
                                                     ("recipes/cbsom_digits.yaml", "ddp", "ddp")])
def test_sbatch_script_derives_the_scale_and_keeps_the_recipes_strategy(tmp_path, recipe, strategy, want):
    env = {**os.environ, "PATH": f"{_fake_srun(tmp_path)}:{os.environ['PATH']}", "SLURM_JOB_ID": "77",
           "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "8(x2)", "SLURM_CPUS_PER_TASK": "6", "PYTHON": "python3"}
    env.pop("STRATEGY", None)
    if strategy:
        env["STRATEGY"] = strategy
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "slurm" / "train.sbatch"), recipe, "--trainer.max_steps=5"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "srun_args.txt").read_text().splitlines()
    assert args[:5] == ["python3", "-m", "recipes", "fit", "--config"] and args[5] == recipe
    assert "--trainer.num_nodes=2" in args and "--trainer.devices=8" in args and args[-1] == "--trainer.max_steps=5"
    given = [a.split("=", 1)[1] for a in args if a.startswith("--trainer.strategy=")]
    assert given == ([want] if want else [])  # no override: the recipe's FSDP strategy stands


@pytest.mark.slow
def test_torchrun_launcher_across_two_nodes_equals_one_process(tmp_path):
    """The multi-node branch: two launches of ``scripts/torchrun.sh 1`` with NNODES=2 meet at one c10d rendezvous
    (two "nodes" of one CPU process each on this machine, so ``--trainer.num_nodes=2``) and train the same global
    batches as one process; weights and Feasible Learning's multipliers end equal."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "NNODES": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RDZV_ID": "test-c10d"}
    out = tmp_path / "two_nodes"
    nodes = [subprocess.Popen(["bash", "-x", str(ROOT / "scripts" / "torchrun.sh"), "1",
                               "recipes/feasible_digits.yaml", "--trainer.max_steps=8", "--trainer.accelerator=cpu",
                               "--data.init_args.batch_size=32", "--trainer.enable_progress_bar=false",
                               *run_dir_args(out)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    logs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, logs):
        assert node.returncode == 0, err[-3000:]
        assert f"--rdzv-endpoint=127.0.0.1:{port}" in err and "--rdzv-backend=c10d" in err  # bash -x
        assert "--trainer.num_nodes=2" in err and "--trainer.devices=1" in err
    assert sorted(line.split("GLOBAL_RANK: ")[1][0] for _, err in logs for line in err.splitlines()
                  if "GLOBAL_RANK: " in line) == ["0", "1"]
    one = run_cli(["fit", "--config", "recipes/feasible_digits.yaml", "--trainer.max_steps=8",
                   "--data.init_args.batch_size=64", "--trainer.enable_progress_bar=false",
                   *run_dir_args(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=False) for d in (out, tmp_path / "one"))
    assert a["global_step"] == b["global_step"] == 8
    for key, value in b["state_dict"].items():
        torch.testing.assert_close(a["state_dict"][key], value, rtol=1e-4, atol=2e-5, msg=key)
    lam = [next(v for k, v in c["callbacks"].items() if k.startswith("FeasibleLearning"))["lam"] for c in (a, b)]
    assert int((lam[1] > 0).sum()) > 20
    torch.testing.assert_close(lam[0], lam[1], rtol=1e-4, atol=1e-5)
