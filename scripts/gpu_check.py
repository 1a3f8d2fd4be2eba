"""The GPU validation run: every CUDA path of the collection checked, and the GPU benchmarks measured, in one command.

    bash scripts/gpu_check.sh OUT [--wheels DIR]         # on a CUDA machine, about 8 minutes
    bash scripts/gpu_check.sh OUT --dry-run              # anywhere: list the commands and check that each parses
    python scripts/gpu_check.py merge OUT                # copy OUT's measured tables into docs/performance.md
    python scripts/gpu_check.py OUT --device cpu --steps recipes --budget 3600 --recipe-step 3500 --jobs 2
                                                         # the same run rehearsed on a CPU machine

Steps, each under its own time limit inside one overall budget (``--budget``, 480 s):

1. ``pytest -m gpu`` on every test file that holds a ``gpu`` mark (FoX's ``flex`` / ``fla`` kernels against
   ``dense``, the large FoX recipe under its per-block FSDP, ...);
2. every recipe that ``python -m recipes ls`` lists, for a few steps on the GPU in bf16-mixed
   (``--trainer.fast_dev_run=3``), on the small data the tests use (``tests.helpers.recipe_data_args``, minus its
   CPU-only overrides), several recipes at a time, each in its own process;
3. the benchmark scripts in their CUDA mode (``BENCHES``), each writing its markdown section into
   ``OUT/performance.md`` and its rows into ``OUT/bench/<name>.csv``.

Everything lands under OUT: one log per command (``logs/``), ``recipes.csv``, ``steps.csv`` and ``summary.md``
(what ran, what failed with its last error line, the benchmark tables and their goal lines).  The exit code is 0
only when every step passed.  ``--dry-run`` builds the same plan on any machine, writes it to ``OUT/plan.txt`` and
checks every command: pytest collects the gpu tests, each recipe command parses (``--print_config``, with its data
written as the real run would), each benchmark's arguments pass its own parser.  The default test suite runs it
(``tests/test_gpu_check.py``), so the script cannot rot between GPU runs.

On a lent machine that returns only a few files, pack the folder:
``bash scripts/gpu_check.sh /tmp/gc --wheels .whl; tar czf $OUT/gc.tgz -C /tmp gc; cp /tmp/gc/summary.md $OUT``.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recipes.catalog import one_line_error  # noqa: E402
from recipes.catalog import recipes as catalog_recipes  # noqa: E402

# name, script and its arguments (OUT-relative outputs are added by ``bench_command``), time limit in seconds; sized
# from the scripts' CUDA defaults to fit the ~190 s left for benchmarks (compiles and kernel tuning included)
BENCHES = [
    ("fox_attention", ["scripts/bench_fox_attention.py", "--device", "cuda", "--quick"], 75),
    ("fox_lm", ["scripts/bench_fox_lm.py", "--device", "cuda"], 45),
    ("fox_generate", ["scripts/bench_fox_generate.py", "--device", "cuda", "--prompt-lengths", "2048", "--reps", "3",
                      "--cached-reps", "2", "--kernel-reps", "5", "--breakdown-reps", "5"], 25),
    ("bias_only", ["scripts/bench_bias_only.py", "--device", "cuda"], 15),
    ("cbsom", ["scripts/bench_cbsom.py", "--device", "cuda", "--reps", "3"], 20),
    ("dualformer", ["scripts/bench_dualformer.py", "--device", "cuda", "--reps", "6", "--mazes", "4000",
                    "--decode-tokens", "100", "200"], 20),
]
# the arguments of recipe_data_args that pin a run to the CPU (the GPU check sets its own)
CPU_ONLY = ("--trainer.accelerator=", "--trainer.precision=", "--trainer.strategy=", "--trainer.devices=",
            "--data.init_args.actor_device=")
GPU_RUN = ["--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.precision=bf16-mixed",
           "--trainer.fast_dev_run=3", "--trainer.enable_progress_bar=false"]
CPU_RUN = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.fast_dev_run=3",
           "--trainer.enable_progress_bar=false"]  # --device cpu: a rehearsal in the recipes' CPU settings


@dataclass
class Result:
    name: str
    kind: str
    status: str = "not run"   # passed / failed / timed out / not run
    seconds: float = 0.0
    detail: str = ""
    log: str = ""
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------------------------
def gpu_test_files() -> List[str]:
    """Every test file that holds a ``gpu`` mark: a new CUDA test is picked up without editing this script."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text())


def pytest_command(out: Path, collect_only: bool = False) -> List[str]:
    # -v: each test's outcome is in the log as it ends (the JUnit file is written only at the end); a test that
    # hangs fails at 90 s (pytest-timeout) instead of eating the step
    return [sys.executable, "-m", "pytest", "-o", "addopts=", "-o", "timeout=90", "-m", "gpu", "-p",
            "no:cacheprovider", "-v", "-rfEs",
            *(["--collect-only"] if collect_only else [f"--junitxml={out / 'pytest_gpu.xml'}"]), *gpu_test_files()]


def recipe_args(name: str, folder: Path, device: str = "cuda") -> List[str]:
    """The ``python -m recipes`` arguments of one recipe's GPU run (writes its small data under ``folder``); with
    ``device='cpu'`` the same run in the settings the CPU tests use."""
    from tests.helpers import recipe_data_args, run_dir_args

    path = ROOT / "recipes" / f"{name}.yaml"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # a tiny prior's fit
        data = recipe_data_args(path, folder / "data")
    if device == "cpu":
        return ["fit", "--config", f"recipes/{name}.yaml", *data, *CPU_RUN, *run_dir_args(folder / "run")]
    data = [a for a in data if not a.startswith(CPU_ONLY)]
    if re.search(r"actor_device: cuda", path.read_text()):  # the actor shares the one GPU
        data.append("--data.init_args.actor_device=cuda:0")
    return ["fit", "--config", f"recipes/{name}.yaml", *data, *GPU_RUN, *run_dir_args(folder / "run")]


def bench_command(name: str, args: List[str], out: Path, device: str = "cuda") -> List[str]:
    args = [device if i and args[i - 1] == "--device" else a for i, a in enumerate(args)]
    return [sys.executable, *args, "--write", f"--doc={out / 'performance.md'}", f"--csv={out / 'bench' / name}.csv"]


TIMINGS = ROOT / "scripts" / "gpu_check_timings.csv"  # recipes.csv of a rehearsal: the order of the recipe step


def planned_recipes(only: Optional[List[str]]) -> list:
    """The recipes of ``recipes ls`` (or ``only``), longest first by the last rehearsal's timings (``TIMINGS``;
    a recipe it lacks counts as the longest), so that the step's deadline cuts no long run started last."""
    rows = catalog_recipes()
    if only:
        unknown = sorted(set(only) - {r.name for r in rows})
        if unknown:
            raise SystemExit(f"error: unknown recipe(s) {', '.join(unknown)}; see python -m recipes ls")
        rows = [r for r in rows if r.name in only]
    seconds = {}
    if TIMINGS.exists():
        with open(TIMINGS) as fh:
            seconds = {row["recipe"]: float(row["seconds"]) for row in csv.DictReader(fh)}
    return sorted(rows, key=lambda r: -seconds.get(r.name, float("inf")))


# ---------------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------------
def run_logged(cmd: List[str], log: Path, timeout: float, env: Optional[dict] = None) -> tuple:
    """Run ``cmd`` in its own process group with output to ``log``; returns (status, seconds, last error line)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log, "w") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})})
        try:
            code = proc.wait(timeout=max(timeout, 1))
            status = "passed" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the run and every process it started
            proc.wait()
            status = "timed out"
    detail = last_error(log)
    if status == "timed out":
        detail = f"stopped at its {timeout:.0f} s limit; last output: {detail or '(none)'}"
    return status, time.time() - start, detail[:300]


def last_error(log: Path) -> str:
    """The most telling line of a log: the last line that names an error, else the last line (the command line
    the log starts with excluded)."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines()[1:] if ln.strip()]
    errors = [ln for ln in lines if re.search(r"error|Error|FAILED|Traceback|Killed", ln)]
    return (errors or lines or [""])[-1][:300]


class Budget:
    def __init__(self, seconds: float):
        self.end = time.time() + seconds

    def left(self) -> float:
        return self.end - time.time()


def run_pytest(out: Path, budget: Budget, limit: float) -> Result:
    r = Result("pytest -m gpu", "pytest", log="logs/pytest_gpu.log")
    limit = min(limit, budget.left())
    r.status, r.seconds, r.detail = run_logged(pytest_command(out), out / r.log, limit)
    xml = out / "pytest_gpu.xml"
    if xml.exists():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        r.extra = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        r.detail = (", ".join(f"{v} {k}" for k, v in r.extra.items()) + ("; " + r.detail if r.status != "passed"
                                                                          else ""))
    return r


def run_recipes(out: Path, budget: Budget, args: argparse.Namespace) -> List[Result]:
    """Every planned recipe in its own process, ``args.jobs`` at a time, within ``args.recipe_step`` seconds."""
    deadline = time.time() + min(args.recipe_step, budget.left())
    results = [Result(r.name, r.size, log=f"logs/recipe_{r.name}.log") for r in planned_recipes(args.recipes)]

    def one(res: Result) -> Result:
        left = deadline - time.time()
        if left < 5:
            res.detail = "the recipe step's time ran out before it started"
            return res
        cmd = [sys.executable, str(Path(__file__).relative_to(ROOT)), "recipe", res.name, str(out / "runs" / res.name),
               args.device]
        res.status, res.seconds, res.detail = run_logged(cmd, out / res.log, min(args.per_recipe, left),
                                                         env={"OMP_NUM_THREADS": "2"})
        if res.status == "passed":
            res.detail = ""
        print(f"  {res.status:9s} {res.seconds:6.1f} s  {res.name}  {res.detail}", flush=True)
        return res

    with ThreadPoolExecutor(args.jobs) as pool:
        return list(pool.map(one, results))


def run_benches(out: Path, budget: Budget, device: str) -> List[Result]:
    results = []
    for name, args, limit in BENCHES:
        res = Result(name, "bench", log=f"logs/bench_{name}.log")
        if budget.left() > 10:
            res.status, res.seconds, res.detail = run_logged(bench_command(name, args, out, device), out / res.log,
                                                             min(limit, budget.left()))
        else:
            res.detail = "the overall budget ran out before it started"
        goals = [ln.strip() for ln in (out / res.log).read_text().splitlines()
                 if re.search(r"\b(met|NOT met)\b", ln)] if (out / res.log).exists() else []
        res.extra = {"goals": goals}
        if res.status == "passed":
            res.detail = ""
        print(f"  {res.status:9s} {res.seconds:6.1f} s  bench {name}  {res.detail}", flush=True)
        results.append(res)
    return results


def environment(out: Path) -> str:
    lines = [f"python {sys.version.split()[0]}"]
    try:
        import torch

        lines.append(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
                     f"devices: {[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}")
    except Exception as err:  # the summary says what is missing rather than stopping
        lines.append(f"torch: {err}")
    for pkg in ("lightning", "triton", "fla-core", "flash-attn", "transformers", "jsonargparse", "gymnasium"):
        try:
            from importlib.metadata import version

            lines.append(f"{pkg} {version(pkg)}")
        except Exception:
            lines.append(f"{pkg}: not installed")
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True) if _which("nvidia-smi") else None
    if smi is not None:
        lines.append(f"nvidia-smi: {smi.stdout.strip()}")
    (out / "env.txt").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def _which(cmd: str) -> bool:
    from shutil import which

    return which(cmd) is not None


def write_summary(out: Path, env: str, results: List[Result], seconds: float, device: str = "cuda") -> bool:
    ok = all(r.status == "passed" for r in results)
    with open(out / "steps.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "kind", "status", "seconds", "detail", "log"])
        w.writerows([r.name, r.kind, r.status, f"{r.seconds:.1f}", r.detail, r.log] for r in results)
    recipes = [r for r in results if r.kind in ("cpu", "gpu")]
    with open(out / "recipes.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["recipe", "size", "status", "seconds", "detail"])
        w.writerows([r.name, r.kind, r.status, f"{r.seconds:.1f}", r.detail] for r in recipes)
    counts = {s: sum(r.status == s for r in recipes) for s in ("passed", "failed", "timed out", "not run")}
    title = "GPU check" if device == "cuda" else "GPU check rehearsed on the CPU"
    text = [f"# {title}: {'all passed' if ok else 'FAILURES'} ({seconds:.0f} s)", "", "```", env, "```", "",
            "| step | status | seconds | detail |", "|---|---|---|---|"]
    text += [f"| {r.name} | {r.status} | {r.seconds:.1f} | {r.detail.replace('|', '/')} |" for r in results
             if r.kind not in ("cpu", "gpu")]
    tally = ", ".join(f"{v} {k}" for k, v in counts.items())
    setting = "bf16-mixed, one GPU" if device == "cuda" else "the CPU tests' settings"
    text += ["", f"## Recipes (fast_dev_run=3, {setting}): {tally}", "",
             "| recipe | size | status | seconds | detail |", "|---|---|---|---|---|"]
    text += [f"| {r.name} | {r.kind} | {r.status} | {r.seconds:.1f} | {r.detail.replace('|', '/')} |"
             for r in recipes]
    goals = [g for r in results for g in r.extra.get("goals", [])]
    if goals:
        text += ["", "## Goals", "", *[f"- {g}" for g in goals]]
    perf = out / "performance.md"
    if perf.exists():
        tables = re.sub(r"<!-- [\w.-]+:(start|end) -->\n?", "", perf.read_text())
        text += ["", "## Benchmarks", "", re.sub(r"^# Performance\n+", "", tables)]
    (out / "summary.md").write_text("\n".join(text) + "\n")
    return ok


# ---------------------------------------------------------------------------------------------------------------
# the dry run
# ---------------------------------------------------------------------------------------------------------------
class _Parsed(Exception):
    pass


def bench_parses(script: str, argv: List[str]) -> str:
    """'' when ``argv`` passes ``script``'s own argument parser, else the parser's complaint (nothing is run)."""
    import importlib.util
    from unittest import mock

    spec = importlib.util.spec_from_file_location(f"_gpu_check_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    err = io.StringIO()
    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop), \
            mock.patch.object(sys, "argv", [script, *argv]), contextlib.redirect_stderr(err):
        try:
            module.main()
        except _Parsed:
            return ""
        except SystemExit:
            return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "exited while parsing"
    return "main() returned without parsing its arguments"


def recipe_parses(args: List[str]) -> str:
    """'' when the recipe command parses and prints its config, else the error line."""
    from recipes.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([*args, "--print_config"])
        except SystemExit as exc:
            code = exc.code
    if code not in (0, None):
        return (err.getvalue().strip().splitlines() or [f"exit {code}"])[-1]
    if "class_path" not in out.getvalue() or "trainer:" not in out.getvalue():
        return "--print_config printed no model / trainer"
    return ""


def dry_run(out: Path, only: Optional[List[str]], collect_tests: bool = True) -> int:
    plan, problems = [], []
    files = gpu_test_files()
    plan.append(shlex.join(pytest_command(out)))
    command = (pytest_command(out, collect_only=True) if collect_tests
               else [sys.executable, "-c", "print('1 test collected')"])
    collect = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    for r in planned_recipes(only):
        args = recipe_args(r.name, out / "runs" / r.name)
        plan.append(f"[{r.size}] python -m recipes " + shlex.join(args))
        problem = recipe_parses(args)
        if problem:
            problems.append(f"recipe {r.name}: {problem}")
    for name, args, _ in BENCHES:
        cmd = bench_command(name, args, out)
        plan.append(shlex.join(["python", *cmd[1:]]))
        problem = bench_parses(args[0], cmd[2:])
        if problem:
            problems.append(f"bench {name}: {problem}")
    stdout = collect.communicate()[0]
    collected = re.search(r"(\d+)(?:/\d+)? tests? collected", stdout)
    if collect.returncode != 0 or not collected or int(collected.group(1)) == 0:
        problems.append(f"pytest -m gpu collects nothing from {files}: {stdout.strip().splitlines()[-1:]}")
    (out / "plan.txt").write_text("\n".join(plan) + "\n")
    print("\n".join(plan))
    print(f"\n{len(plan)} commands ({len(files)} gpu test files, {len(plan) - 1 - len(BENCHES)} recipes, "
          f"{len(BENCHES)} benchmarks); plan in {out / 'plan.txt'}")
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return 1 if problems else 0


# ---------------------------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------------------------
def run_one_recipe(name: str, folder: str, device: str) -> int:
    """The child process of one recipe: write its data, then ``python -m recipes`` in this process."""
    import torch

    torch.set_flush_denormal(True)
    args = recipe_args(name, Path(folder), device)
    print("python -m recipes " + shlex.join(args), flush=True)
    from recipes.cli import main

    return main(args)


MACHINE_PACKAGES = ROOT / "scripts" / "gpu_machine_packages.txt"
NEVER_CARRY = ("torch", "torchvision", "torchaudio", "triton", "nvidia-", "cuda-")  # the machine's CUDA build stays
EXTRA_GPU = ["fla-core"]  # not installed on CPU machines; any version that matches the machine's torch
NOT_NEEDED = {"wandb"}  # only with --trainer.logger=WandbLogger; the check logs CSV (and wandb's wheel is 20 MB)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_requirements() -> List[str]:
    """``name==version`` of every package the recipes and tests need (this environment's versions, the ones the
    suite passes with) that the GPU machine's image lacks, plus the GPU-only kernels: what scripts/gpu_wheels.sh
    downloads for that machine.  The machine's own packages (transformers, peft, ...) stay at its versions."""
    import tomllib
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    machine = {_norm(ln) for ln in MACHINE_PACKAGES.read_text().split() if ln and not ln.startswith("#")}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}
    todo = [r for r in map(Requirement, project["dependencies"] + ["pytest-timeout"]) if r.name not in NOT_NEEDED]
    seen: dict = {}
    while todo:
        req = todo.pop()
        name = _norm(req.name)
        if name.startswith(NEVER_CARRY) or name in machine or (name in seen and req.extras <= seen[name][1]):
            continue  # the machine's own packages come with their own dependencies
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            continue  # an optional dependency this environment does without
        extras = set(req.extras) | (seen[name][1] if name in seen else set())
        seen[name] = (dist.version, extras)
        for spec in dist.requires or []:
            sub = Requirement(spec)
            if sub.marker is None or any(sub.marker.evaluate({**env, "extra": e}) for e in extras | {""}):
                todo.append(sub)
    return [f"{n}=={seen[n][0]}" for n in sorted(seen)] + EXTRA_GPU


def merge(out: Path, doc: Optional[Path] = None) -> int:
    """Copy every measured section of ``OUT/performance.md`` into ``doc`` (docs/performance.md), same names."""
    from scripts._report import DOCS, update_section

    doc = doc or DOCS
    source = out / "performance.md"
    if not source.exists():
        print(f"error: {source} does not exist: give the output folder of a GPU check", file=sys.stderr)
        return 2
    sections = re.findall(r"<!-- ([\w.-]+):start -->\n(.*?)\n<!-- \1:end -->", source.read_text(), re.S)
    for name, body in sections:
        update_section(name, body, doc)
    print(f"{len(sections)} sections copied into {doc}: {', '.join(n for n, _ in sections)}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["recipe"] and len(argv) == 4:
        return run_one_recipe(*argv[1:4])
    if argv[:1] == ["merge"] and len(argv) == 2:
        return merge(Path(argv[1]))
    if argv[:1] == ["wheels"]:
        print("\n".join(wheel_requirements()))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="output folder (created)")
    ap.add_argument("--dry-run", action="store_true", help="list the commands and check that each parses")
    steps = ["pytest", "recipes", "bench"]
    ap.add_argument("--steps", nargs="+", choices=steps, default=steps, help="which steps to run (default: all)")
    ap.add_argument("--recipes", nargs="+", default=None, help="only these recipes (default: all of recipes ls)")
    ap.add_argument("--jobs", type=int, default=12, help="recipes run at the same time")
    ap.add_argument("--per-recipe", type=float, default=130.0, help="time limit of one recipe run, seconds")
    ap.add_argument("--pytest-step", type=float, default=150.0, help="time limit of pytest -m gpu, seconds")
    ap.add_argument("--recipe-step", type=float, default=140.0, help="time limit of all recipe runs, seconds")
    ap.add_argument("--budget", type=float, default=480.0,
                    help="time limit of the whole check, seconds (the benchmarks get what the steps before leave)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: a rehearsal of the same run here (the recipes in their CPU test settings, the "
                         "benchmarks' CPU modes; the gpu tests skip)")
    ap.error = one_line_error
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        return dry_run(args.out, args.recipes)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; use --dry-run to check the commands on this machine", file=sys.stderr)
        return 2
    start, budget = time.time(), Budget(args.budget)
    env = environment(args.out)
    print(env, flush=True)
    results: List[Result] = []
    if "pytest" in args.steps:
        results.append(run_pytest(args.out, budget, args.pytest_step))
        print(f"pytest -m gpu: {results[-1].status} ({results[-1].detail})", flush=True)
    if "recipes" in args.steps:
        results += run_recipes(args.out, budget, args)
    if "bench" in args.steps:
        results += run_benches(args.out, budget, args.device)
    ok = write_summary(args.out, env, results, time.time() - start, args.device)
    print((args.out / "summary.md").read_text())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
