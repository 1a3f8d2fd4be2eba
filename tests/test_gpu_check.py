"""scripts/gpu_check.sh: its dry run lists every command of the GPU validation run and checks that each parses, here
on the CPU, so the script cannot rot between GPU runs; its runner, summary and wheel list work as documented."""
import os
import subprocess
import sys
import time

import pytest
import torch

from recipes.catalog import recipes
from scripts import gpu_check
from tests.helpers import ROOT


def test_dry_run_lists_and_parses_every_command(tmp_path):
    """The real script, in a real process: pytest collects the gpu tests, every recipe of ``recipes ls`` parses
    with the GPU run's arguments (--print_config), every benchmark's arguments pass its parser."""
    out = tmp_path / "check"
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(out), "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = (out / "plan.txt").read_text().splitlines()
    assert " -m gpu " in plan[0] and plan[0].endswith(" ".join(gpu_check.gpu_test_files()))
    assert {"tests/test_forgetting_attention.py", "tests/test_gpu_fox.py", "tests/test_large_fox.py"} <= set(
        gpu_check.gpu_test_files())
    lines = {line.split("--config recipes/")[1].split(".yaml")[0]: line for line in plan if "--config" in line}
    assert set(lines) == {r.name for r in recipes()}
    for name, line in lines.items():
        assert "--trainer.accelerator=gpu" in line and "--trainer.precision=bf16-mixed" in line, name
        assert "accelerator=cpu" not in line and "precision=32-true" not in line and "actor_device=cpu" not in line
    assert "--data.init_args.actor_device=cuda:0" in lines["online_dpo_tldr"]  # one GPU: the actor shares it
    assert "strategy=auto" not in lines["fox_125m"]  # the per-block FSDP strategy is what the GPU run checks
    benches = [line for line in plan if line.startswith("python scripts/bench_")]
    assert len(benches) == len(gpu_check.BENCHES) and all("--device cuda" in b and "--csv=" in b for b in benches)


def test_dry_run_names_a_command_that_does_not_parse(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "BENCHES", [("cbsom", ["scripts/bench_cbsom.py", "--devise", "cuda"], 5)])
    monkeypatch.setattr(gpu_check, "GPU_RUN", [*gpu_check.GPU_RUN, "--trainer.max_stepz=3"])
    assert gpu_check.dry_run(tmp_path, ["fox_lm"], collect_tests=False) == 1
    err = capsys.readouterr().err
    assert "recipe fox_lm:" in err and "max_stepz" in err
    assert "bench cbsom:" in err and "--devise" in err


def test_unknown_recipe_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="unknown recipe.*no_such_recipe"):
        gpu_check.main([str(tmp_path), "--dry-run", "--recipes", "no_such_recipe"])


def test_bad_flag_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.main([str(tmp_path), "--steps", "foo"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "'foo'" in err[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_a_real_run_without_cuda_says_so(tmp_path, capsys):
    assert gpu_check.main([str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_the_real_run_rehearsed_on_the_cpu(tmp_path):
    """The non-dry path end to end (a child process per recipe, logs, CSVs, summary), in the CPU settings."""
    out = tmp_path / "check"
    argv = [str(out), "--device", "cpu", "--steps", "recipes", "--recipes", "fox_lm", "--jobs", "1"]
    assert gpu_check.main(argv) == 0
    assert (out / "summary.md").read_text().startswith("# GPU check rehearsed on the CPU: all passed")
    assert (out / "recipes.csv").read_text().splitlines()[1].startswith("fox_lm,cpu,passed,")
    log = (out / "logs" / "recipe_fox_lm.log").read_text()
    assert "--trainer.accelerator=cpu" in log and "`Trainer.fit` stopped: `max_steps=3` reached." in log


def test_run_logged_kills_the_whole_process_group_at_its_time_limit(tmp_path):
    pid_file = tmp_path / "child.pid"
    code = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); print('ValueError: bad'); "
            f"time.sleep(60)")
    start = time.time()
    status, seconds, detail = gpu_check.run_logged([sys.executable, "-c", code], tmp_path / "log.txt", timeout=3)
    assert status == "timed out" and 2.5 < seconds < 30 and time.time() - start < 30
    assert detail == "stopped at its 3 s limit; last output: ValueError: bad"
    child = int(pid_file.read_text())
    for _ in range(50):  # the grandchild is gone too
        if not os.path.exists(f"/proc/{child}") or open(f"/proc/{child}/stat").read().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail("the grandchild outlived its time limit")
    status, _, detail = gpu_check.run_logged([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "b.txt", 30)
    assert status == "failed"


def test_summary_tables_and_exit_status(tmp_path):
    (tmp_path / "performance.md").write_text("# P\n\n<!-- bench_x_cuda:start -->\n### X\n| a |\n|---|\n| 1 |\n"
                                             "<!-- bench_x_cuda:end -->\n")
    results = [gpu_check.Result("pytest -m gpu", "pytest", "passed", 12.0, "9 tests, 0 failures"),
               gpu_check.Result("fox_lm", "cpu", "passed", 8.0),
               gpu_check.Result("fox_125m", "gpu", "failed", 20.0, "RuntimeError: CUDA out of memory"),
               gpu_check.Result("fox_attention", "bench", "passed", 50.0, extra={"goals": ["goal A: met (1.02x)"]})]
    assert gpu_check.write_summary(tmp_path, "torch x", results, 90.0) is False
    text = (tmp_path / "summary.md").read_text()
    assert "FAILURES" in text and "| fox_125m | gpu | failed | 20.0 | RuntimeError: CUDA out of memory |" in text
    assert "1 passed, 1 failed, 0 timed out, 0 not run" in text and "- goal A: met (1.02x)" in text
    assert "### X" in text and "bench_x_cuda:start" not in text
    rows = (tmp_path / "recipes.csv").read_text().splitlines()
    assert rows[0] == "recipe,size,status,seconds,detail" and len(rows) == 3
    assert gpu_check.write_summary(tmp_path, "", results[:2], 1.0) is True


def test_merge_copies_the_measured_sections(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "performance.md").write_text("<!-- bench_a_cuda:start -->\nnew A\n<!-- bench_a_cuda:end -->\n\n"
                                        "<!-- bench_b_cuda:start -->\nnew B\n<!-- bench_b_cuda:end -->\n")
    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n\n<!-- bench_a_cuda:start -->\nold A\n<!-- bench_a_cuda:end -->\n\nkept\n")
    assert gpu_check.merge(out, doc) == 0
    text = doc.read_text()
    assert "new A" in text and "old A" not in text and "new B" in text and "kept" in text
    assert gpu_check.merge(tmp_path / "nothing", doc) == 2


def test_wheels_are_what_the_machine_lacks_at_the_tested_versions():
    reqs = gpu_check.wheel_requirements()
    names = {r.split("==")[0] for r in reqs}
    assert {"jsonargparse", "omegaconf", "gymnasium", "minatar", "ale-py", "diffusers", "fla-core"} <= names
    assert not names & {"torch", "lightning", "transformers", "numpy", "wandb"}  # the machine's own, or not needed
    from importlib.metadata import version

    assert f"jsonargparse=={version('jsonargparse')}" in reqs


def test_recipes_run_longest_first_and_unmeasured_first_of_all(tmp_path, monkeypatch):
    timings = tmp_path / "timings.csv"
    timings.write_text("recipe,size,status,seconds,detail\nfox_lm,cpu,passed,9.0,\nspma_tabular,cpu,passed,30.5,\n")
    monkeypatch.setattr(gpu_check, "TIMINGS", timings)
    order = [r.name for r in gpu_check.planned_recipes(["fox_lm", "spma_tabular", "dpo_toy"])]
    assert order == ["dpo_toy", "spma_tabular", "fox_lm"]
