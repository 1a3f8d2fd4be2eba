"""W&B sweep files for every recipe, and scripts/sweep_local.py running them with no server."""
import csv
import subprocess
import sys

import pytest
import torch
import yaml

from tests.helpers import RECIPES, ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import sweep_local  # noqa: E402

SWEEPS = sorted((ROOT / "scripts" / "sweeps").glob("*.yaml"))


def test_one_sweep_per_recipe():
    assert {p.stem for p in SWEEPS} == {p.stem for p in RECIPES}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_is_in_wandb_format_and_every_parameter_reaches_the_recipe(path):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["command"] == ["${env}", "${interpreter}", "-m", "recipes", "fit", "--config",
                                f"recipes/{path.stem}.yaml", "${args}"]
    assert sweep["metric"]["goal"] in ("minimize", "maximize")
    for name, spec in sweep["parameters"].items():
        # a flat dotted key of the recipe, or the one top-level scalar a sweep varies (the run's seed)
        assert ("." in name or name == "seed_everything") and "parameters" not in spec
        assert None not in spec.get("values", [0])
    sweep_local.load(path)  # the local runner's own checks
    configs = sweep_local.configurations(sweep, 3, seed=0)
    listed = {name: spec["values"] for name, spec in sweep["parameters"].items() if "values" in spec}
    if listed:  # besides the first few, a set of configurations in which every listed value occurs once at least
        configs += [{name: values[k % len(values)] for name, values in listed.items()}
                    for k in range(max(map(len, listed.values())))]
    for k, config in enumerate(configs):
        argv = sweep_local.expand(sweep["command"], config, sweep.get("program"), [])
        resolved = sweep_local.check(argv, k, config)
        for key, value in config.items():  # the swept value is what the recipe will run with
            node = resolved
            parts = key.split(".")
            if parts[:2] == ["trainer", "callbacks"]:
                node, parts = node["trainer"]["callbacks"][-1], parts[2:]
            for part in parts:
                node = node[part]
            assert node == pytest.approx(value), key


def test_args_are_expanded_exactly_as_the_wandb_agent_does():
    argv = sweep_local.expand(["${env}", "${interpreter}", "-m", "recipes", "fit", "--config", "r.yaml", "${args}"],
                              {"model.init_args.lr": 1e-05, "data.flag": True, "a.list": [1, 2]}, None, ["--x=1"])
    assert argv[0] == "/usr/bin/env" and argv[1] == sys.executable
    assert argv[4:] == ["fit", "--config", "r.yaml", "--model.init_args.lr=1e-05", "--data.flag=True",
                        "--a.list=[1, 2]", "--x=1"]


def run_sweep(args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "sweep_local.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_local_two_config_sweep_runs_end_to_end(tmp_path):
    """A method recipe swept over its callback's and its model's parameters: every run trains with its values."""
    root = tmp_path / "runs"
    sweep = tmp_path / "feasible.yaml"
    sweep.write_text("method: grid\nmetric:\n  name: val/acc\n  goal: maximize\nparameters:\n"
                     "  trainer.callbacks.init_args.dual_lr:\n    values: [0.05, 0.2]\n"
                     "  model.init_args.lr:\n    values: [0.002]\n"
                     "command:\n  - ${env}\n  - ${interpreter}\n  - -m\n  - recipes\n  - fit\n  - --config\n"
                     "  - recipes/feasible_digits.yaml\n  - ${args}\n")
    proc = run_sweep([str(sweep), "--count", "2", "--out", str(tmp_path / "sweep"),
                      "--set", "trainer.max_epochs=2", "--set", "trainer.check_val_every_n_epoch=1",
                      "--set", f"trainer.default_root_dir={root}", "--set", f"trainer.logger.init_args.save_dir={root}",
                      "--set", "trainer.enable_progress_bar=false"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "results.csv")))
    assert [r["trainer.callbacks.init_args.dual_lr"] for r in rows] == ["0.05", "0.2"]
    for row in rows:
        assert row["returncode"] == "0" and 0.0 < float(row["val/acc"]) <= 1.0  # the sweep metric was read
        (config,) = (root / row["run"]).glob("logs/version_*/config.yaml")  # each run in its own folder
        saved = yaml.safe_load(config.read_text())
        assert saved["model"]["init_args"]["lr"] == 0.002
        fl = saved["trainer"]["callbacks"][-1]
        assert fl["class_path"].endswith("FeasibleLearning")
        assert fl["init_args"]["dual_lr"] == float(row["trainer.callbacks.init_args.dual_lr"])
        ckpt = torch.load(root / row["run"] / "checkpoints" / "last.ckpt", weights_only=False)
        state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("FeasibleLearning"))
        assert state["dual_lr"] == fl["init_args"]["dual_lr"]  # the callback that trained used the swept value


@pytest.mark.parametrize("param, needle", [
    ("model.init_args.lrr:\n    values: [0.1]", "lrr"),
    ("data.init_args.batch_size:\n    values: [3.5]", "batch_size"),
    ("model.init_args.lr:\n    values: [null]", "None value"),
    ("model.init_args.lr:\n    distribution: uniform\n    min: 0.1\n    max: 0.2", "needs 'values'"),
])
def test_bad_sweep_parameter_stops_before_any_run_in_one_line(tmp_path, param, needle):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"method: grid\nparameters:\n  {param}\ncommand:\n  - ${{env}}\n  - ${{interpreter}}\n  - -m\n"
                   "  - recipes\n  - fit\n  - --config\n  - recipes/erm_digits.yaml\n  - ${args}\n")
    proc = run_sweep([str(bad), "--out", str(tmp_path / "out")])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert not (tmp_path / "out" / "results.csv").exists()
