"""The wall-clock realtime recipe end to end: DQN learning while an environment process runs in real time and
staggered inference worker processes act; its reports; and that none of its processes outlive the run, however it
ends (finished, the learner killed).  Timing itself is measured by scripts/bench_staggering.py, not asserted here."""
import csv
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from recipes.cli import main
from tests.helpers import ROOT, run_dir_args

RECIPE = "recipes/realtime_dqn_freeway_wallclock.yaml"
SHORT = ["--data.init_args.warmup_steps=200", "--data.init_args.capacity=2000", "--data.init_args.steps_per_epoch=400",
         "--data.init_args.n_workers=3", "--trainer.log_every_n_steps=10"]


def _marked_processes(mark):
    """Processes (ours or orphans) started with REALTIME_TEST_MARK=mark in their environment."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if f"REALTIME_TEST_MARK={mark}".encode() in fh.read().split(b"\0"):
                    with open(f"/proc/{pid}/stat") as st:
                        if st.read().split(")")[-1].split()[0] != "Z":
                            found.append(int(pid))
        except OSError:
            continue
    return found


def _cli(args, mark):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "REALTIME_TEST_MARK": mark, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "recipes", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_processes(proc, mark, count=5, seconds=120):
    deadline = time.time() + seconds
    while len(_marked_processes(mark)) < count and time.time() < deadline:
        time.sleep(0.2)
    assert len(_marked_processes(mark)) >= count, proc.stderr.read() if proc.poll() is not None else "not started"


def _wait_gone(mark, seconds=30.0):  # they end within seconds; a loaded 2-core machine needed up to 19 s
    deadline = time.time() + seconds
    while _marked_processes(mark) and time.time() < deadline:
        time.sleep(0.2)
    return _marked_processes(mark)


def test_wallclock_fit_learns_from_worker_actions_writes_its_timing_and_ends_its_processes(tmp_path):
    mark = uuid.uuid4().hex
    proc = _cli(["fit", "--config", RECIPE, "--trainer.max_epochs=2", *run_dir_args(tmp_path), *SHORT], mark)
    out, err = proc.communicate(timeout=300)  # an orphan holding our pipes would make this time out
    assert proc.returncode == 0, err[-3000:]
    assert not _wait_gone(mark), "processes of the run outlived it"
    run = tmp_path / "logs" / "version_0"
    rows = list(csv.DictReader((run / "publications.csv").open()))
    assert {int(r["worker"]) for r in rows} == {0, 1, 2}  # every worker acted
    frames = [int(r["obs_frame"]) for r in rows]
    # ever newer observations; an overrun (a loaded machine) publishes an older one late, now and then
    assert frames[-1] > frames[0] and sum(b >= a for a, b in zip(frames, frames[1:])) >= 0.9 * (len(frames) - 1)
    assert (run / "action_timing.png").stat().st_size > 0
    metrics = list(csv.DictReader((run / "metrics.csv").open()))
    steps = [float(r["env_steps"]) for r in metrics if r.get("env_steps")]
    losses = [float(r["train/loss"]) for r in metrics if r.get("train/loss")]
    assert steps and max(steps) > 200 and len(losses) >= 3  # updates ran on transitions of the realtime loop
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()


@pytest.mark.parametrize("after", [pytest.param(1.0, marks=pytest.mark.slow), 8.0],
                         ids=["while-starting", "while-learning"])
def test_killing_the_learner_ends_the_environment_and_the_workers(after, tmp_path):
    mark = uuid.uuid4().hex
    proc = _cli(["fit", "--config", RECIPE, "--trainer.max_epochs=50", *run_dir_args(tmp_path), *SHORT], mark)
    _wait_for_processes(proc, mark)  # learner, environment, 3 workers
    time.sleep(after)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up
    proc.wait(30)
    assert not _wait_gone(mark), "environment / inference processes outlived the learner"


@pytest.mark.parametrize("recipe, arg, needle", [
    (RECIPE, "--data.init_args.n_workers=0", "data.n_workers must be an integer >= 1, got 0"),
    (RECIPE, "--data.init_args.frame_period=0", "data.frame_period must be > 0 seconds, got 0"),
    (RECIPE, "--data.init_args.default_action=jump", "data.default_action='jump'; expected noop, random"),
    ("recipes/realtime_dqn_freeway_staggered.yaml", "--data.init_args.inference_frames=0",
     "data.inference_frames must be an integer >= 1, got 0"),
    ("recipes/realtime_dqn_freeway_sequential.yaml", "--data.init_args.default_action=jump",
     "data.default_action='jump'; expected one of noop, random, repeat or an action index")])
def test_bad_realtime_input_is_one_line(recipe, arg, needle, tmp_path, capsys):
    code = main(["fit", "--config", recipe, arg, *run_dir_args(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err


def test_sigterm_to_the_whole_job_checkpoints_and_ends_every_process(tmp_path):
    """A scheduler's preemption (SIGTERM to the process group): the learner saves a checkpoint and exits 143, the
    environment and the workers (which leave the decision to the learner) end with it."""
    mark = uuid.uuid4().hex
    proc = _cli(["fit", "--config", RECIPE, "--trainer.max_epochs=50", *run_dir_args(tmp_path), *SHORT], mark)
    _wait_for_processes(proc, mark)
    time.sleep(8.0)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert not _wait_gone(mark), "processes of the run outlived it"
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
