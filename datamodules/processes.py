"""Processes a run starts beside the learner (inference workers, environment processes, an RLHF actor): what they
all need to start, stop and report failures.

* ``start_shielded`` / ``ignore_stop_signals``: Ctrl-C and SIGTERM reach the whole process group; the children ignore
  them and the parent decides (it stops them, or checkpoints first).
* ``_locked``: ``with lock`` that gives up (``_ParentGone``) when the parent's pipe closes (the parent died holding it).
* ``WorkerError``: what the parent raises when a child reported an error or died.
* ``worker_pids_alive``: which of some pids still run (zombies count as dead): tests check for orphans with it.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import List


class WorkerError(RuntimeError):
    pass


class _ParentGone(Exception):
    pass


def clock() -> float:
    return time.monotonic()  # system-wide on Linux and macOS: comparable across processes


@contextlib.contextmanager
def _locked(lock, alive=None):
    """``with lock``, but a worker whose parent died while holding it (or waiting) stops instead of blocking."""
    if alive is None:
        with lock:
            yield
        return
    while not lock.acquire(timeout=0.05):
        if alive.poll(0):
            raise _ParentGone
    try:
        yield
    finally:
        lock.release()


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def start_shielded(proc) -> None:
    """``proc.start()`` with Ctrl-C / SIGTERM blocked meanwhile: the child inherits the block, so a signal to the
    whole job while it is still importing stays pending until it has installed its handlers (``ignore_stop_signals``)
    instead of killing it; ours is delivered after the start."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        proc.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def ignore_stop_signals() -> None:
    """In a child: Ctrl-C and a scheduler's SIGTERM reach the whole group, and the parent decides (it stops the
    child, or checkpoints first); the child ends on the stop event or when the parent's pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def worker_pids_alive(pids: List[int]) -> List[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        try:  # a zombie is dead
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().split(")")[-1].split()[0] == "Z":
                    continue
        except OSError:
            pass
        alive.append(pid)
    return alive
