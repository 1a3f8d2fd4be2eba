"""Preemption and SLURM requeue: what happens between a stop signal and the end of the process.

``RecipeCheckpoint`` (callbacks/guards.py) turns SIGTERM / SIGUSR1 into a checkpoint at the next optimizer-step
boundary and raises ``Preempted``; ``python -m recipes`` then calls ``end_preempted_run`` once training has torn
down.  The requeue is never asked for while a training process could still be in a collective: SLURM cancels every
task of the job the moment ``scontrol requeue`` lands (SIGTERM to each), and a task still tearing down would die
mid-collective with a traceback (what a real slurmctld showed; a recording ``scontrol`` cannot).  So:

* launched by ``scripts/slurm/train.sbatch`` (``RECIPES_REQUEUE_FILE`` set), rank 0 writes that file and every task
  exits 0; the batch script requeues once ``srun`` has returned, when no task is left to cancel;
* launched any other way under SLURM, every rank first ignores SIGTERM, the ranks meet at a barrier, and rank 0
  requeues (Lightning's own behaviour, minus the race).

``watch_slurm_signals`` keeps the requeue signal from killing a process outside training: SLURM's ``--signal``
warning can land during start-up or after the last step (teardown, reports), where SIGUSR1's default action would
end a finished run as "killed by signal".  A signal seen before training starts still stops it at the first step.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
from typing import Optional

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 143  # stopped by a signal, not requeued: 128 + SIGTERM, as a shell reports it
_seen: set = set()  # signals that reached this process outside training


class Preempted(SystemExit):
    """Training stopped on a signal after saving ``checkpoint`` at ``step``; ``requeue``: SLURM's requeue signal.
    A ``SystemExit`` like Lightning's ``SIGTERMException`` (this module is standard library only, so the entry point
    can watch signals before it imports torch)."""

    def __init__(self, step: int, checkpoint: Optional[str], requeue: bool):
        super().__init__(f"preempted at step {step}")
        self.step, self.checkpoint, self.requeue = step, checkpoint, requeue


def _remember(signum, frame) -> None:
    _seen.add(signum)


def watch_slurm_signals(signum: int = signal.SIGUSR1) -> None:
    """Under SLURM, record the requeue signal instead of dying of it (main thread only; idempotent)."""
    if os.environ.get("SLURM_JOB_ID") and threading.current_thread() is threading.main_thread():
        if signal.getsignal(signum) in (signal.SIG_DFL, None, _remember):
            signal.signal(signum, _remember)


def ignore_slurm_signals_at_exit(signum: int = signal.SIGUSR1) -> None:
    """The run is over: ignore the requeue signal from here on.  Python resets its own handlers to the default
    action while the interpreter shuts down (a DDP process can take seconds there), so a handler is not enough;
    an ignored signal stays ignored."""
    if os.environ.get("SLURM_JOB_ID") and threading.current_thread() is threading.main_thread():
        signal.signal(signum, signal.SIG_IGN)


def seen_before_training(signum: int) -> bool:
    """Whether ``signum`` reached this process outside training since the last call (the call consumes it)."""
    seen = signum in _seen
    _seen.discard(signum)
    return seen


def slurm_job_id() -> str:
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array_job}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if array_job else os.environ.get("SLURM_JOB_ID", "")


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` this SLURM job (array-aware, as Lightning's own handler does); True when it worked."""
    job = slurm_job_id()
    if not re.fullmatch(r"[0-9]+(_[0-9]+)?", job):
        log.warning(f"SLURM job id {job!r} is not a job number; not requeued: resume by hand with --ckpt_path last")
        return False
    try:
        result = subprocess.call(["scontrol", "requeue", job])
    except OSError as err:
        result = err
    if result != 0:
        log.warning(f"scontrol requeue {job} failed ({result}); not requeued: resume by hand with --ckpt_path last")
        return False
    return True


def _rank() -> int:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) or 0


def end_preempted_run(stop: Preempted) -> int:
    """After training has torn down: requeue (SLURM requeue signal) or say how to resume; the exit code."""
    import torch.distributed as dist

    rank0 = _rank() == 0
    where = f" (saved {stop.checkpoint})" if stop.checkpoint else ""
    if stop.requeue:
        job = slurm_job_id()
        handover = os.environ.get("RECIPES_REQUEUE_FILE")
        if handover:  # the batch script requeues after srun has returned
            if rank0:
                with open(handover, "w") as f:
                    f.write(f"preempted at step {stop.step}{where}; requeued SLURM job {job}, which resumes from "
                            "that checkpoint by itself\n")
            return 0
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the requeue cancels this job step: end quietly
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.barrier()  # every rank ignores SIGTERM before rank 0 asks for the requeue
        done = [requeue_slurm_job() if rank0 else False]
        if distributed:
            dist.broadcast_object_list(done, src=0)
        if done[0]:
            if rank0:
                print(f"preempted at step {stop.step}{where}; requeued SLURM job {job}, which resumes from that "
                      "checkpoint by itself", file=sys.stderr)
            return 0
    if rank0:
        print(f"stopped by a preemption signal at step {stop.step}{where}; resume with --ckpt_path last",
              file=sys.stderr)
    return PREEMPTED_EXIT_CODE
