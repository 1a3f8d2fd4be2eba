"""The SLURM path against a real one-node SLURM (slurmctld + slurmd + munged started by
scripts/slurm/local_cluster.py, owned and stopped by the test module), not a recording fake: scripts/slurm/train.sbatch
with two CPU tasks trains what one process trains; time-limit warnings preempt and requeue the job, which resumes by
itself and ends where an uninterrupted run ends, with a log a user can read; ``scancel --signal=TERM`` saves and
stops, and ``--ckpt_path last`` continues.  Skipped, with the reason, where SLURM cannot be installed or run (no root,
no apt-get).  Slow: about 7 minutes on 2 cores."""
import os
import re
import sys
import time

import pytest
import torch

from scripts.slurm.local_cluster import LocalSlurm, SlurmUnavailable, ensure_installed
from tests.helpers import ROOT, run_cli

pytestmark = pytest.mark.slow

SMALL = ["--data.init_args.max_bytes=300000", "--data.init_args.val_windows=2", "--model.init_args.n_layers=2"]
# ~100 s of training on 2 cores: longer than the first warning can come (at most 75 s after a job starts)
STEPS = 800
LONG = [*SMALL, f"--trainer.max_steps={STEPS}", "--trainer.val_check_interval=200",
        "--checkpoint.every_n_train_steps=100", "--data.init_args.batch_size=8"]
SEGMENT = re.compile(r"^job \S+, start \d+ on .*$", re.M)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("a two-task SLURM job needs 2 CPUs")
    try:
        ensure_installed(install=True)
        with LocalSlurm(str(tmp_path_factory.mktemp("slurm")), cpus=2, requeue_delay=False) as cluster:
            yield cluster
    except SlurmUnavailable as err:
        pytest.skip(f"no local SLURM here: {err}")


# A user's own batch script: plain srun, no hand-over file, so the recipe requeues the job itself.
OWN_SCRIPT = """#!/bin/bash
#SBATCH --open-mode=append
echo "job $SLURM_JOB_ID, start $((${SLURM_RESTART_COUNT:-0} + 1)) on $(hostname)"
export OMP_NUM_THREADS=1
shift
srun "$PYTHON" -m recipes fit --config recipes/fox_lm.yaml --trainer.num_nodes=1 --trainer.devices=2 "$@"
"""


def submit(slurm, out, sbatch=(), recipe=(), script=None):
    """sbatch scripts/slurm/train.sbatch (or ``script``) with 2 CPU tasks on the FoX LM recipe; the job id."""
    out.mkdir(parents=True, exist_ok=True)
    if script is None:
        script = ROOT / "scripts" / "slurm" / "train.sbatch"
    return slurm.sbatch(["--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0",
                         f"--output={out}/slurm-%j.out", *sbatch, str(script),
                         "recipes/fox_lm.yaml", "--trainer.accelerator=cpu", "--trainer.strategy=ddp", *recipe,
                         "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={out}",
                         f"--trainer.logger.init_args.save_dir={out}"],
                        cwd=str(ROOT), env={"PYTHON": sys.executable, "PYTHONPATH": str(ROOT)})


def log_segments(out, job):
    """The job's log (one file, appended across restarts) cut at each start's header line."""
    text = (out / f"slurm-{job}.out").read_text()
    starts = [m.start() for m in SEGMENT.finditer(text)]
    return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]


def last_line(segment):
    return segment.strip().splitlines()[-1]


def weights(folder):
    return torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The LONG run as 2 DDP processes (Lightning's launcher, no SLURM), never stopped."""
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = run_cli(["fit", "--config", "recipes/fox_lm.yaml", *LONG, "--trainer.accelerator=cpu",
                    "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.enable_progress_bar=false",
                    f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}"],
                   env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return weights(out)


def assert_same_weights(a, b, atol=0.0, rtol=0.0):
    assert a["global_step"] == b["global_step"]
    for key, value in b["state_dict"].items():
        torch.testing.assert_close(a["state_dict"][key], value, rtol=rtol, atol=atol, msg=key)


def test_two_tasks_train_what_one_process_trains_and_a_late_warning_changes_nothing(slurm, tmp_path):
    """2 tasks x 8 sequences == 1 process x 16 (the same global batches).  The time-limit warning (SIGUSR1) is sent
    the moment training reports it is done, so it lands during teardown: the job still completes with exit 0."""
    out = tmp_path / "ddp"
    short = [*SMALL, "--trainer.max_steps=4", "--trainer.val_check_interval=2"]
    job = submit(slurm, out, recipe=[*short, "--data.init_args.batch_size=8"])
    log = out / f"slurm-{job}.out"
    end = time.monotonic() + 600
    while "`max_steps=4` reached" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < end and slurm.job(job)["JobState"] in ("PENDING", "RUNNING"), \
            log.read_text()[-3000:] if log.exists() else slurm.job(job)
        time.sleep(0.05)
    slurm.signal_job(job, "USR1")
    info = slurm.wait(job)
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text[-3000:]
    assert "Traceback" not in text and "srun: error" not in text, text[-3000:]
    one = run_cli(["fit", "--config", "recipes/fox_lm.yaml", *short, "--data.init_args.batch_size=16",
                   "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.enable_progress_bar=false",
                   f"--trainer.default_root_dir={tmp_path / 'one'}",
                   f"--trainer.logger.init_args.save_dir={tmp_path / 'one'}"], env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    assert_same_weights(weights(out), weights(tmp_path / "one"), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("launcher", ["train.sbatch", "own script"])
def test_time_limit_warnings_preempt_requeue_and_the_run_ends_as_if_uninterrupted(slurm, tmp_path, uninterrupted,
                                                                                   launcher):
    """--time=2 --signal=USR1@75: each job gets the warning at most 75 s in (SLURM checks time limits on a timer),
    stops at a step boundary and is requeued: by scripts/slurm/train.sbatch once srun has returned, or, under a
    user's own plain-srun script, by rank 0 after every rank has stopped listening to SIGTERM.  Every restart
    resumes by itself from the previous hpc checkpoint; the final weights equal the uninterrupted run's bit for
    bit; no log has a traceback.  With train.sbatch each preempted job's log ends with the one-line reason (SLURM's
    own srun / slurmstepd lines about the cancelled step come after it under a plain script)."""
    out = tmp_path / "preempted"
    script = None
    if launcher == "own script":
        script = tmp_path / "own.sbatch"
        script.write_text(OWN_SCRIPT)
    job = submit(slurm, out, sbatch=["--time=2", "--signal=USR1@75"], recipe=LONG, script=script)
    info = slurm.wait(job, timeout=1500)
    segments = log_segments(out, job)
    restarts = int(info["Restarts"])
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), segments[-1][-3000:]
    assert restarts >= 1 and len(segments) == restarts + 1, (restarts, len(segments))
    steps = []
    for n, segment in enumerate(segments):
        assert "Traceback" not in segment, segment[-3000:]
        if n:
            assert f"hpc_ckpt_{n}.ckpt" in segment  # restored from the previous job's hpc checkpoint by itself
        if n < restarts:
            said = [m for line in segment.splitlines() if (m := re.fullmatch(
                rf"preempted at step (\d+) \(saved \S+hpc_ckpt_{n + 1}\.ckpt\); requeued SLURM job {job}, which "
                rf"resumes from that checkpoint by itself", line))]
            assert len(said) == 1, segment[-2000:]  # rank 0 says it, once
            if launcher == "train.sbatch":
                assert said[0].group(0) == last_line(segment) and "srun: error" not in segment, segment[-2000:]
                assert "Terminated" not in segment.splitlines(), segment[-2000:]  # bash's notice for a killed child
            steps.append(int(said[0].group(1)))
        else:
            assert "srun: error" not in segment, segment[-2000:]
    assert steps == sorted(steps) and 0 < steps[0] and steps[-1] < STEPS, steps
    assert f"`max_steps={STEPS}` reached" in segments[-1]
    assert_same_weights(weights(out), uninterrupted)


def test_scancel_term_saves_and_stops_and_ckpt_path_last_continues(slurm, tmp_path, uninterrupted):
    """scancel --signal=TERM (no requeue): the job saves at the next step boundary and stops with exit 143 and a
    one-line reason, no traceback; the same command with --ckpt_path=last finishes the run, equal to the
    uninterrupted one."""
    out = tmp_path / "stopped"
    job = submit(slurm, out, recipe=LONG)
    end = time.monotonic() + 600
    while not (out / "checkpoints" / "step0000100.ckpt").exists():
        assert time.monotonic() < end and slurm.job(job)["JobState"] in ("PENDING", "RUNNING"), slurm.job(job)
        time.sleep(0.2)
    slurm.signal_job(job, "TERM")
    info = slurm.wait(job)
    (segment,) = log_segments(out, job)
    assert info["ExitCode"] == "143:0" and info["Restarts"] == "0", info
    assert "Traceback" not in segment, segment[-3000:]
    stopped = [line for line in segment.splitlines() if line.startswith("stopped by a preemption signal at step ")]
    assert len(stopped) == 1 and "--ckpt_path last" in stopped[0], segment[-2000:]  # rank 0 says it, once
    assert last_line(segment).startswith(f"job {job} stopped by a signal before its end"), segment[-2000:]
    step = int(re.search(r"at step (\d+)", stopped[0]).group(1))
    assert 100 <= step < STEPS and weights(out)["global_step"] == step

    again = submit(slurm, out, recipe=[*LONG, "--ckpt_path=last"])
    info = slurm.wait(again)
    (segment,) = log_segments(out, again)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), segment[-3000:]
    assert "Traceback" not in segment and "Restored all states from the checkpoint" in segment
    assert_same_weights(weights(out), uninterrupted)
