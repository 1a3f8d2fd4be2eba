"""Preemption: SIGTERM or SIGUSR1 sent to a real training process finishes the optimizer step in progress, saves a
checkpoint and stops (exit 143); resuming with --ckpt_path last ends exactly where an uninterrupted run ends (CB-SOM
with its SOM state, under gradient accumulation so that a signal can land between micro-batches)."""
import os
import signal as sig
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import ROOT, run_cli

STEPS, ACCUMULATE = 20, 3
COMMON = ["fit", "--config", "recipes/cbsom_digits.yaml", f"--trainer.max_steps={STEPS}",
          f"--trainer.accumulate_grad_batches={ACCUMULATE}", "--checkpoint.every_n_train_steps=50",
          "--trainer.enable_progress_bar=false"]
SOM = ("    - class_path: callbacks.self_organizing_map.SelfOrganizingMap\n"
       "      init_args:\n        mode: random\n        alpha0: 0.1\n        sigma_min: 1.0\n")


def args(tmp_path, name, extra_callbacks="", extra=()):
    cfg = tmp_path / f"{name}-{len(list(tmp_path.glob('*.yaml')))}.yaml"
    cfg.write_text("trainer:\n  callbacks:\n" + SOM + extra_callbacks)
    out = tmp_path / name
    return [*COMMON, "--config", str(cfg), f"--trainer.default_root_dir={out}",
            f"--trainer.logger.init_args.save_dir={out}", *extra]


def last(folder):
    return torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    proc = run_cli(args(tmp, "run"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return last(tmp / "run")


def resume_and_compare(tmp_path, name, straight):
    resumed = run_cli(args(tmp_path, name, extra=["--ckpt_path=last"]))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    b = last(tmp_path / name)
    assert straight["global_step"] == b["global_step"] == STEPS
    for key in straight["state_dict"]:
        torch.testing.assert_close(b["state_dict"][key], straight["state_dict"][key], rtol=0, atol=0, msg=key)
    som_a, som_b = (next(v for k, v in c["callbacks"].items() if k.startswith("SelfOrganizingMap"))
                    for c in (straight, b))
    assert som_a["distinct"] == som_b["distinct"] and torch.equal(som_a["generator"], som_b["generator"])


@pytest.mark.parametrize("signal", ["SIGTERM", pytest.param("SIGUSR1", marks=pytest.mark.slow)])
def test_a_signal_from_outside_saves_a_checkpoint_and_the_resumed_run_equals_an_uninterrupted_one(
        tmp_path, signal, straight):
    marker = tmp_path / "at_step_4"
    touch = (f"    - class_path: tests.helpers.TouchAtStep\n      init_args:\n        step: 4\n"
             f"        path: {marker}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "recipes", *args(tmp_path, "resumed", touch)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert marker.exists(), "the run never reached step 4"
    proc.send_signal(getattr(sig, signal))  # asynchronous: it lands wherever the run is, between micro-batches too
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    assert "resume with --ckpt_path last" in err.strip().splitlines()[-1]
    stopped_at = last(tmp_path / "resumed")["global_step"]
    assert 4 <= stopped_at < STEPS  # no step-based checkpoint was due: the signal wrote it
    resume_and_compare(tmp_path, "resumed", straight)


def test_a_signal_between_micro_batches_stops_after_the_optimizer_step(tmp_path, straight):
    """Sent after micro-batch 11 of 3-batch accumulation steps (the 2nd micro-batch of step 4): the run finishes step
    4 (micro-batch 12) and saves it; stopping at once would lose the accumulated gradients of micro-batches 10-11."""
    send = "    - class_path: tests.helpers.SignalAtStep\n      init_args:\n        batch: 11\n"
    stopped = run_cli(args(tmp_path, "resumed", send))
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    ckpt = last(tmp_path / "resumed")
    assert ckpt["global_step"] == 4
    assert ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"] == 12
    resume_and_compare(tmp_path, "resumed", straight)


def fake_slurm(tmp_path):
    """The environment of a one-task SLURM batch step, with a ``scontrol`` that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol_calls.txt"}\n')
    scontrol.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "recipes",
            "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
            "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODELIST": "localhost"}


@pytest.mark.slow
@pytest.mark.parametrize("signal, handover, code", [("SIGUSR1", False, 0), ("SIGUSR1", True, 0),
                                                    ("SIGTERM", False, 143)])
def test_under_slurm_the_requeue_signal_saves_at_a_step_boundary_requeues_and_the_requeued_job_resumes(
        tmp_path, straight, signal, handover, code):
    """Lightning's own SLURM handler would save the moment SIGUSR1 lands (here: between micro-batches of step 4, so
    the hpc checkpoint would hold step 3 plus half a step's loop progress).  The recipe saves after step 4, writes
    Lightning's hpc checkpoint and stops; then, once training has torn down, either hands the requeue to the batch
    script (``RECIPES_REQUEUE_FILE``, as scripts/slurm/train.sbatch sets it: the file says where it stopped, no
    ``scontrol`` call) or calls ``scontrol requeue <job>`` itself (SIGUSR1 only).  The same command run again in the
    same SLURM environment (no --ckpt_path) resumes from that file and ends where an uninterrupted run ends.  The
    real-SLURM version is tests/test_slurm.py."""
    env = fake_slurm(tmp_path)
    if handover:
        env["RECIPES_REQUEUE_FILE"] = str(tmp_path / "requeue.txt")
    send = (f"    - class_path: tests.helpers.SignalAtStep\n      init_args:\n        batch: 11\n"
            f"        signal: {signal}\n")
    stopped = run_cli(args(tmp_path, "job", send), env=env)
    assert stopped.returncode == code, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr
    hpc = torch.load(tmp_path / "job" / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)
    assert hpc["global_step"] == 4
    assert hpc["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"] == 12
    calls = tmp_path / "scontrol_calls.txt"
    requeued_here = signal == "SIGUSR1" and not handover
    assert (calls.read_text().split() if calls.exists() else []) == (["requeue", "4242"] if requeued_here else [])
    said = (tmp_path / "requeue.txt").read_text().strip() if handover else stopped.stderr.strip().splitlines()[-1]
    if signal == "SIGUSR1":
        assert said.startswith("preempted at step 4 (saved ") and "hpc_ckpt_1.ckpt" in said
        assert said.endswith("requeued SLURM job 4242, which resumes from that checkpoint by itself")
    else:
        assert said.startswith("stopped by a preemption signal at step 4") and "--ckpt_path last" in said

    start = tmp_path / "start_step.txt"
    record = f"    - class_path: tests.helpers.RecordStartStep\n      init_args:\n        path: {start}\n"
    again = run_cli(args(tmp_path, "job", record), env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert start.read_text() == "4"  # resumed from the hpc checkpoint, not started over
    b = last(tmp_path / "job")
    assert b["global_step"] == STEPS
    for key in straight["state_dict"]:
        torch.testing.assert_close(b["state_dict"][key], straight["state_dict"][key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("when", ["last_step", "after_fit"])
def test_under_slurm_a_warning_signal_after_the_work_is_done_changes_nothing(tmp_path, when):
    """SLURM's --signal warning landing in the last step or after training (teardown, reports, exit): the run ends
    as finished (exit 0, no stop, no requeue); SIGUSR1's default action would kill it ("User defined signal 1")."""
    env = fake_slurm(tmp_path)
    helper = (f"    - class_path: tests.helpers.SignalAtStep\n      init_args:\n        batch: {4 * ACCUMULATE - 1}\n"
              "        signal: SIGUSR1\n" if when == "last_step" else
              "    - class_path: tests.helpers.SignalAfterFit\n")
    proc = run_cli([*args(tmp_path, "job", helper), "--trainer.max_steps=4"], env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (tmp_path / "scontrol_calls.txt").exists() and not (tmp_path / "job" / "hpc_ckpt_1.ckpt").exists()
    assert last(tmp_path / "job")["global_step"] == 4


