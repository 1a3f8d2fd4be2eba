"""Run a W&B sweep YAML (scripts/sweeps/<recipe>.yaml) here, with no W&B server: the same configurations a W&B agent
would run, launched with the same command line.

    python scripts/sweep_local.py scripts/sweeps/cbsom_digits.yaml [--count 4] [--seed 0] [--dry-run]
        [--out runs/sweeps/cbsom_digits] [--set KEY=VALUE ...]

* Search: ``grid`` (every combination of ``values`` / ``value``, in the YAML's order) or ``random`` (``values``,
  ``value``, ``uniform``, ``int_uniform``, ``log_uniform_values``, ``q_uniform``, ``normal``; ``--count`` runs,
  seeded).  ``bayes`` needs W&B's server-side engine (the open-source ``sweeps`` package requires numpy < 2, which this
  project's stack does not allow): run it with ``wandb sweep`` + ``wandb agent``.
* Command: the YAML's ``command`` with W&B's own macro expansion (``wandb.sdk.launch.sweeps.utils``): ``${args}`` is
  ``--key=value`` with Python's ``str(value)``, ``${env}`` is ``/usr/bin/env``, ``${interpreter}`` this Python.
  ``--set KEY=VALUE`` appends fixed overrides after ``${args}`` (e.g. a shorter run for a smoke test).
* Before any run starts, every configuration is parsed by the recipe CLI (``--print_config``): a parameter the recipe
  does not have, or a value of the wrong type, stops the sweep with one line naming it (exit 2).
* Each run gets ``RECIPES_RUN_ID=<sweep>-<k>``, so its checkpoints, logs and plots go to
  ``<default_root_dir>/<sweep>-<k>/``; W&B logging, if the recipe uses it, is offline without credentials.
  ``results.csv`` in ``--out`` lists each run's parameters, exit code and final metric (the sweep's ``metric.name``
  from the run's ``metrics.csv``).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import itertools
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTIONS = ("constant", "categorical", "uniform", "int_uniform", "log_uniform_values", "q_uniform", "normal")


class SweepError(ValueError):
    """A sweep file or parameter that cannot run; printed as one line."""


def load(path: Path) -> dict:
    if not path.is_file():
        raise SweepError(f"sweep file {str(path)!r} does not exist")
    sweep = yaml.safe_load(path.read_text())
    if not isinstance(sweep, dict) or "parameters" not in sweep or "command" not in sweep:
        raise SweepError(f"{path}: expected a W&B sweep with 'parameters' and 'command'")
    method = sweep.get("method")
    if method not in ("grid", "random", "bayes"):
        raise SweepError(f"{path}: method={method!r}; expected grid, random or bayes")
    command = sweep["command"]
    if not isinstance(command, list) or "${args}" not in command:
        raise SweepError(f"{path}: 'command' must be a block-style list holding ${{args}}")
    if "--config" not in command or command.index("--config") > command.index("${args}"):
        raise SweepError(f"{path}: '--config <recipe>' must come before ${{args}} in 'command' (later values win)")
    for name, spec in sweep["parameters"].items():
        if not isinstance(spec, dict) or "parameters" in spec:
            raise SweepError(f"sweep parameter {name!r}: use flat dotted names with values / value / distribution")
        values = spec.get("values", [spec.get("value")] if "value" in spec else [])
        if any(v is None for v in values) or ("value" in spec and spec["value"] is None):
            raise SweepError(f"sweep parameter {name!r} has a None value; LightningCLI reads it as the string "
                             "'None' (use null-free values)")
        dist = spec.get("distribution")
        if dist is not None and dist not in DISTRIBUTIONS:
            raise SweepError(f"sweep parameter {name!r}: distribution {dist!r} is not supported here "
                             f"({', '.join(DISTRIBUTIONS)})")
    return sweep


def _sample(spec: dict, rng: random.Random):
    if "value" in spec:
        return spec["value"]
    if "values" in spec and spec.get("distribution") in (None, "categorical"):
        return rng.choice(spec["values"])
    dist, lo, hi = spec.get("distribution", "uniform"), spec.get("min"), spec.get("max")
    if dist == "int_uniform":
        return rng.randint(int(lo), int(hi))
    if dist == "log_uniform_values":
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    if dist == "q_uniform":
        q = spec.get("q", 1)
        return round(rng.uniform(lo, hi) / q) * q
    if dist == "normal":
        return rng.gauss(spec.get("mu", 0.0), spec.get("sigma", 1.0))
    return rng.uniform(lo, hi)


def configurations(sweep: dict, count: Optional[int], seed: int) -> List[Dict[str, object]]:
    params = sweep["parameters"]
    if sweep["method"] == "grid":
        axes = []
        for name, spec in params.items():
            if "values" not in spec and "value" not in spec:
                raise SweepError(f"grid sweep parameter {name!r} needs 'values' or 'value', not a distribution")
            axes.append([(name, v) for v in spec.get("values", [spec.get("value")])])
        grid = [dict(combo) for combo in itertools.product(*axes)]
        return grid[:count] if count else grid
    if sweep["method"] == "bayes":
        raise SweepError("method 'bayes' needs W&B's sweep server (wandb sweep + wandb agent); locally use grid or "
                         "random")
    rng = random.Random(seed)
    return [{name: _sample(spec, rng) for name, spec in params.items()} for _ in range(count or 4)]


def expand(command: List[str], config: Dict[str, object], program: Optional[str], extra: List[str]) -> List[str]:
    """The argv a W&B agent would run for ``config`` (its own macro code), plus ``extra`` after ``${args}``."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    flags = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in config.items()}})
    argv = []
    for part in sweep_utils.create_sweep_command(list(command)):
        if part == "${env}":
            argv.append("/usr/bin/env")
        elif part == "${interpreter}":
            argv.append(sys.executable)
        elif part == "${program}":
            argv.append(program or "")
        elif part.startswith("${") and part[2:-1] in flags:
            argv.extend(flags[part[2:-1]])
            if part == "${args}":
                argv.extend(extra)
        else:
            argv.append(part)
    return argv


def cli_args(argv: List[str]) -> List[str]:
    """The arguments after ``-m recipes`` in an expanded command."""
    for i in range(len(argv) - 1):
        if argv[i] == "-m" and argv[i + 1] == "recipes":
            return argv[i + 2:]
    raise SweepError("the sweep command must run 'python -m recipes <subcommand> --config <recipe> ${args}'")


def check(argv: List[str], k: int, config: Dict[str, object]) -> dict:
    """Parse one configuration with the recipe CLI (no training); returns the resolved config."""
    sys.path.insert(0, str(ROOT))
    from recipes.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([*cli_args(argv), "--print_config"])
        except SystemExit as exc:
            code = exc.code or 0
    if code:
        lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("error: ")]
        reason = lines[-1][len("error: "):] if lines else err.getvalue().strip().splitlines()[-1:]
        shown = " ".join(f"--{k2}={v}" for k2, v in config.items())
        raise SweepError(f"sweep configuration {k} ({shown}) is not accepted by the recipe: {reason}")
    return yaml.safe_load(out.getvalue())


def final_metric(run_root: Path, name: str) -> Optional[float]:
    value = None
    for metrics in sorted(run_root.glob("**/metrics.csv")):
        for row in csv.DictReader(open(metrics)):
            if row.get(name) not in (None, ""):
                value = float(row[name])
    return value


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--count", type=int, default=None, help="runs (random: default 4; grid: default all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="a fixed override appended after ${args} (repeatable)")
    ap.add_argument("--dry-run", action="store_true", help="check every configuration and print the commands")
    args = ap.parse_args(argv)
    try:
        sweep = load(args.sweep)
        name = args.sweep.stem
        configs = configurations(sweep, args.count, args.seed)
        extra = [e if e.startswith("--") else f"--{e}" for e in args.extra]
        commands = [expand(sweep["command"], c, sweep.get("program"), extra) for c in configs]
        resolved = [check(cmd, k, c) for k, (cmd, c) in enumerate(zip(commands, configs))]
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or ROOT / "runs" / "sweeps" / name
    out.mkdir(parents=True, exist_ok=True)
    metric = (sweep.get("metric") or {}).get("name")
    rows = []
    for k, (cmd, config, res) in enumerate(zip(commands, configs, resolved)):
        run_id = f"{name}-{k:03d}"
        print(f"[{k + 1}/{len(commands)}] {run_id}: " + " ".join(cmd[cmd.index('--config'):]), flush=True)
        if args.dry_run:
            continue
        env = {**os.environ, "RECIPES_RUN_ID": run_id, "PYTHONPATH": str(ROOT)}
        start = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env=env)
        root = Path(res["trainer"].get("default_root_dir") or ROOT)
        run_root = (root if root.is_absolute() else ROOT / root) / run_id
        value = final_metric(run_root, metric) if metric else None
        rows.append({"run": run_id, **config, "returncode": proc.returncode, "seconds": round(time.time() - start, 1),
                     metric or "metric": value, "dir": str(run_root)})
    if rows:
        with open(out / "results.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        done = [r for r in rows if r.get(metric) is not None]
        if done and metric:
            goal_max = (sweep.get("metric") or {}).get("goal") == "maximize"
            best = (max if goal_max else min)(done, key=lambda r: r[metric])
            print(f"best {metric} = {best[metric]:.4f}: {best['run']} ({best['dir']})")
        print(f"results: {out / 'results.csv'}")
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
