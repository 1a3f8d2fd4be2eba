"""The paper's "max_time" staggering of asynchronous inference workers (Riemer et al., ICLR 2025, Alg. 1; spec
``staggered_async.md`` section 1.4 and errata 1-2), as logic that runs the same on a real clock (worker processes,
``datamodules.async_inference``) and on an injected virtual clock (``simulate``, for exact tests).

Shared state (``StaggerState``, a float64 array that may live in shared memory, with a lock): ``t0`` (the start),
``t_max`` (the running maximum of the observed inference time, only growing) and one entry per worker.  Worker ``i``
first starts at ``t0 + i t_max / N``, then repeats: read the latest observation, infer (``dt``), wait until its
cycle has lasted ``t_max``, publish.  When an inference overruns (``dt > t_max``), ``t_max`` becomes ``dt`` and the
schedule is re-spread.  Two re-spreads:

* ``respread="even"`` (default): the overrunning worker publishes at once, at ``now``, and the others, in the order
  of their pending deadlines (their order in the pipeline), get the deadlines ``now + r t_max_new / N`` for
  ``r = 1 .. N-1``: the spacing is ``t_max_new / N`` again from the next publication on, and no deadline moves
  earlier, so no worker is asked to publish before its inference is done (tested for overruns of 1.05x to 3x).
* ``respread="official"``: the official ``run_realtime_pokemon.py``: worker ``j`` sleeps an extra
  ``D[j] += ((i - j) mod N) (dt - t_max) / N`` before its next cycle, and a worker zeroes its ``D`` after sleeping
  it (wiping what was added meanwhile).  This shrinks the phase between workers to ``(t_max_old - delta) / N``
  instead of widening it (errata 1): a 2x overrun (``delta = t_max``) synchronises all workers.

Both read the observation *after* any extra sleep (the official worker reads it before: errata 2; reading after gives
observations fresher by the extra sleep).  A worker is a generator: it yields ``("sleep_until", t)``, ``("infer",)``
(sent back: the time after inference and ``dt``) and ``("publish",)``, and is sent the current time otherwise; the
driver (real or virtual) does the waiting, inferring and publishing.
"""
from __future__ import annotations

import heapq
from contextlib import nullcontext
from typing import Callable, Dict, Generator, List, Optional

import numpy as np

RESPREADS = ("even", "official")


class StaggerState:
    """``[t0, t_max, x_0 .. x_{N-1}]``: ``x`` = next publication deadline (``even``) or extra sleep (``official``)."""

    def __init__(self, n_workers: int, t_max: float, respread: str = "even", buffer: Optional[np.ndarray] = None,
                 lock=None, initialise: bool = True):
        if not isinstance(n_workers, int) or n_workers < 1:
            raise ValueError(f"n_workers must be an integer >= 1, got {n_workers!r}")
        if not t_max > 0:
            raise ValueError(f"t_max (the initial inference-time bound) must be > 0 seconds, got {t_max}")
        if respread not in RESPREADS:
            raise ValueError(f"respread={respread!r}; expected one of {', '.join(RESPREADS)}")
        self.n, self.respread = n_workers, respread
        self.array = np.zeros(2 + n_workers) if buffer is None else buffer
        self.lock = lock if lock is not None else nullcontext()
        if initialise:  # a worker process attaching to the shared array leaves the running maximum alone
            self.array[1] = t_max

    @staticmethod
    def size(n_workers: int) -> int:
        return 2 + n_workers

    @property
    def t_max(self) -> float:
        return float(self.array[1])

    def start(self, t0: float) -> None:
        """The run starts at ``t0``: worker ``i``'s first deadline is ``t0 + (i / N + 1) t_max``."""
        with self.lock:
            self.array[0] = t0
            t_max = self.array[1]
            if self.respread == "even":
                self.array[2:] = t0 + (np.arange(self.n) / self.n + 1.0) * t_max
            else:
                self.array[2:] = 0.0


def worker_loop(i: int, state: StaggerState) -> Generator[tuple, object, None]:
    """Worker ``i``'s schedule (see the module docstring); runs until the driver stops it."""
    a, n = state.array, state.n
    with state.lock:
        first = a[0] + i * a[1] / n
    now = yield ("sleep_until", first)
    while True:
        if state.respread == "official":
            with state.lock:
                extra = a[2 + i]
            now = yield ("sleep_until", now + extra)
            with state.lock:
                a[2 + i] = 0.0  # after the sleep: additions made meanwhile are lost, as in the official code
        after, dt = yield ("infer",)
        with state.lock:
            t_max = a[1]
            if dt > t_max:  # overrun: t_max grows, the schedule is re-spread
                if state.respread == "official":
                    delta = dt - t_max
                    for j in range(n):
                        if j != i:
                            a[2 + j] += ((i - j) % n) * delta / n
                else:  # the others keep their order in the pipeline (by pending deadline), spaced dt / n
                    others = sorted((j for j in range(n) if j != i), key=lambda j: (a[2 + j], (j - i) % n))
                    for rank, j in enumerate(others, start=1):
                        a[2 + j] = after + rank * dt / n
                    a[2 + i] = after
                a[1] = t_max = dt
                target = after
            elif state.respread == "official":
                target = after + (t_max - dt)
            else:
                target = max(a[2 + i], after)
        now = yield ("sleep_until", target)
        while state.respread == "even":  # a re-spread during the wait moved the deadline later: wait for it
            with state.lock:
                deadline = a[2 + i]
            if deadline <= now:
                break
            now = yield ("sleep_until", deadline)
        now = yield ("publish",)
        if state.respread == "even":
            with state.lock:  # the next deadline stays on the grid, even after a late publication
                a[2 + i] += a[1]


def simulate(n_workers: int, t_max: float, inference_time: Callable[[int, int], float], until: float,
             respread: str = "even") -> Dict[str, object]:
    """The workers on a virtual clock from 0 to ``until``: ``inference_time(worker, cycle) -> seconds``.  Returns
    ``publish``: ``(time, worker, observation time)`` in time order, and the final ``t_max``."""
    state = StaggerState(n_workers, t_max, respread)
    state.start(0.0)
    loops = [worker_loop(i, state) for i in range(n_workers)]
    cycles, read_at = [0] * n_workers, [0.0] * n_workers
    publish: List[tuple] = []
    queue: List[tuple] = []  # (time, order, worker, value sent to it then)
    order = 0

    def handle(i: int, cmd: tuple, now: float) -> None:
        nonlocal order
        order += 1
        if cmd[0] == "sleep_until":
            wake = max(now, cmd[1])
            heapq.heappush(queue, (wake, order, i, wake))
        elif cmd[0] == "infer":
            read_at[i] = now
            dt = float(inference_time(i, cycles[i]))
            cycles[i] += 1
            heapq.heappush(queue, (now + dt, order, i, (now + dt, dt)))
        else:
            publish.append((now, i, read_at[i]))
            heapq.heappush(queue, (now, order, i, now))

    for i, loop in enumerate(loops):
        handle(i, next(loop), 0.0)
    while queue:
        now, _, i, value = heapq.heappop(queue)
        if now > until:
            break
        handle(i, loops[i].send(value), now)
    return {"publish": publish, "t_max": state.t_max}


def single_slot(publish_times: np.ndarray, frame_period: float) -> Dict[str, float]:
    """What an environment stepping every ``frame_period`` makes of these publication times with one action slot: a
    frame applies the latest action published since the previous frame, once.  ``act_fraction`` (frames with an
    agent action) and ``lost`` (actions overwritten before any frame applied them)."""
    t = np.sort(np.asarray(publish_times, dtype=float))
    if not len(t):
        return {"act_fraction": 0.0, "lost": 0, "frames": 0}
    frame = np.floor(t / frame_period + 1e-9).astype(np.int64)  # the frame that applies it
    used = len(np.unique(frame))
    frames = int(frame.max() - frame.min() + 1)
    return {"act_fraction": used / frames, "lost": int(len(t) - used), "frames": frames}
