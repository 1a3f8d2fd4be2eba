"""Real asynchronous inference in wall-clock time (Riemer et al., ICLR 2025; spec ``staggered_async.md`` 1.4-1.5): a
realtime environment loop that never waits, and ``N_I`` inference worker **processes** (not threads: the GIL) staggered
by ``datamodules.stagger``'s max_time schedule.

* ``Channels``: what the processes share, in shared memory: the latest observation and its frame number, a single
  action slot (publication counter, action, policy version, observation frame, worker), the stagger state, the
  policy's flat weights with a version counter (written by the learner, reloaded by a worker when the version moved),
  the exploration epsilon, a log of every publication, a stop event and an error queue.
* ``InferencePool``: starts the workers (spawn), watches them (``check()`` raises ``WorkerError`` naming a worker that
  failed, with its traceback, or died), stops them (``close()``: stop event, join, terminate stragglers).  Workers
  also end by themselves when the process that started them dies (a pipe whose write end only that process holds)
  and on SIGTERM / Ctrl-C.
* A worker's inference is the policy network (``net_factory()`` built in the worker, weights from the channels,
  epsilon-greedy) and/or a simulated inference time (``sleep``: seconds, ``jitter``: relative +-, ``overrun``:
  ``(worker, cycle, factor)`` injected once) for scheduler experiments on few cores.
* ``EnvLoop``: steps a one-copy vector env every ``frame_period`` seconds (absolute ticks, no drift), applies the
  action slot's action if a new one was published since the previous frame, else the default (``noop`` / ``random`` /
  an action index), writes the new observation, and hands the agent transitions (``realtime_env.TransitionMerger``:
  from the observation an action was computed on, default runs merged) to ``on_transition``.
"""
from __future__ import annotations

import collections
import multiprocessing as mp
import queue
import time
import traceback
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from datamodules.processes import (WorkerError, _locked, _ParentGone, clock, ignore_stop_signals,
                                   start_shielded)
from datamodules.realtime_env import TransitionMerger
from datamodules.stagger import StaggerState, worker_loop

LOG_FIELDS = 5  # publication time, worker, observation time, inference seconds, observation frame


class Channels:
    def __init__(self, obs_shape: Tuple[int, ...], obs_dtype, n_workers: int, t_max: float, respread: str = "even",
                 n_params: int = 0, log_capacity: int = 100_000):
        ctx = mp.get_context("spawn")
        self.obs_shape, self.obs_dtype = tuple(obs_shape), np.dtype(obs_dtype).str
        self.n_workers, self.t_max0, self.respread = n_workers, float(t_max), respread
        nbytes = int(np.prod(self.obs_shape)) * np.dtype(obs_dtype).itemsize
        self._obs, self._obs_frame, self.obs_lock = ctx.RawArray("B", max(1, nbytes)), ctx.RawValue("q", -1), ctx.Lock()
        self._slot, self.slot_lock = ctx.RawArray("q", 5), ctx.Lock()
        self._sched, self.sched_lock = ctx.RawArray("d", StaggerState.size(n_workers)), ctx.Lock()
        self._weights, self._version = ctx.RawArray("f", max(1, n_params)), ctx.RawValue("q", 0)
        self.weights_lock = ctx.Lock()
        self._epsilon = ctx.RawValue("d", 0.0)
        self._log, self._log_count = ctx.RawArray("d", LOG_FIELDS * log_capacity), ctx.RawValue("q", 0)
        self.log_lock = ctx.Lock()
        self.log_capacity = log_capacity
        self.stop, self.go, self.errors = ctx.Event(), ctx.Event(), ctx.Queue()
        self.frames = ctx.RawValue("q", 0)  # frames the environment has stepped
        self._ready = ctx.RawValue("q", 0)
        StaggerState(n_workers, t_max, respread, buffer=self.sched)

    # numpy views (made on first use in each process)
    @property
    def sched(self) -> np.ndarray:
        return np.frombuffer(self._sched, dtype=np.float64)

    def stagger(self, initialise: bool = False) -> StaggerState:
        return StaggerState(self.n_workers, self.t_max0, self.respread, buffer=self.sched, lock=self.sched_lock,
                            initialise=initialise)

    def write_obs(self, obs: np.ndarray, frame: int) -> None:
        with self.obs_lock:
            raw = np.ascontiguousarray(obs, dtype=self.obs_dtype).view(np.uint8).ravel()
            np.frombuffer(self._obs, dtype=np.uint8)[:] = raw
            self._obs_frame.value = frame

    def read_obs(self) -> Tuple[np.ndarray, int]:
        with self.obs_lock:
            raw = np.frombuffer(self._obs, dtype=np.uint8).copy()
            frame = self._obs_frame.value
        return raw.view(self.obs_dtype).reshape(self.obs_shape), frame

    def publish(self, action: int, version: int, obs_frame: int, worker: int) -> None:
        with self.slot_lock:
            slot = np.frombuffer(self._slot, dtype=np.int64)
            slot[1:] = (action, version, obs_frame, worker)
            slot[0] += 1

    def read_slot(self) -> np.ndarray:
        """``[publication counter, action, policy version, observation frame, worker]``."""
        with self.slot_lock:
            return np.frombuffer(self._slot, dtype=np.int64).copy()

    def set_weights(self, flat: torch.Tensor) -> int:
        values = flat.detach().float().cpu().numpy()
        with self.weights_lock:
            np.frombuffer(self._weights, dtype=np.float32)[:values.size] = values
            self._version.value += 1
            return self._version.value

    def weights_if_newer(self, version: int, alive=None) -> Optional[Tuple[int, np.ndarray]]:
        if self._version.value == version:
            return None
        with _locked(self.weights_lock, alive):
            return self._version.value, np.frombuffer(self._weights, dtype=np.float32).copy()

    @property
    def epsilon(self) -> float:
        return self._epsilon.value

    @epsilon.setter
    def epsilon(self, value: float) -> None:
        self._epsilon.value = float(value)

    def log(self, row: Tuple[float, ...], alive=None) -> None:
        with _locked(self.log_lock, alive):
            n = self._log_count.value
            if n < self.log_capacity:
                np.frombuffer(self._log, dtype=np.float64)[n * LOG_FIELDS:(n + 1) * LOG_FIELDS] = row
                self._log_count.value = n + 1

    def publications(self) -> np.ndarray:
        """Every logged publication: ``(time, worker, observation time, inference seconds, observation frame)``."""
        with self.log_lock:
            n = self._log_count.value
            return np.frombuffer(self._log, dtype=np.float64)[:n * LOG_FIELDS].reshape(n, LOG_FIELDS).copy()


class _Inference:
    """A worker's inference: the network (epsilon-greedy, weights refreshed from the channels) and/or a sleep."""

    def __init__(self, ch: Channels, worker: int, net_factory: Optional[Callable], num_actions: int,
                 sleep: float, jitter: float, overrun: Optional[Tuple[int, int, float]], seed: int, alive=None):
        self.ch, self.worker, self.alive = ch, worker, alive
        self.net = net_factory() if net_factory is not None else None
        self.num_actions, self.sleep, self.jitter, self.overrun = num_actions, sleep, jitter, overrun
        self.rng = np.random.default_rng(seed)
        self.version, self.cycle = 0, 0

    def __call__(self, obs: np.ndarray) -> int:
        start = clock()
        action = int(self.rng.integers(self.num_actions))
        if self.net is not None:
            fresh = self.ch.weights_if_newer(self.version, self.alive)
            if fresh is not None:
                self.version, flat = fresh
                n = sum(p.numel() for p in self.net.parameters())
                torch.nn.utils.vector_to_parameters(torch.from_numpy(flat[:n]), self.net.parameters())
            if self.rng.random() >= self.ch.epsilon:
                with torch.no_grad():
                    action = int(self.net(torch.as_tensor(obs[None])).argmax(-1)[0])
        if self.sleep > 0:
            wanted = self.sleep * (1 + self.rng.uniform(-self.jitter, self.jitter))
            if self.overrun is not None and self.overrun[:2] == (self.worker, self.cycle):
                wanted = self.sleep * self.overrun[2]
            left = wanted - (clock() - start)
            if left > 0:
                time.sleep(left)
        self.cycle += 1
        return action


def _worker_main(i: int, ch: Channels, alive, net_factory, num_actions: int, sleep: float, jitter: float,
                 overrun, seed: int) -> None:
    torch.set_num_threads(1)
    ignore_stop_signals()
    try:
        infer = _Inference(ch, i, net_factory, num_actions, sleep, jitter, overrun, seed, alive)
        with ch.sched_lock:
            ch._ready.value += 1
        while not ch.go.wait(0.05):  # the schedule starts once every worker is ready
            if ch.stop.is_set() or alive.poll(0):
                return
        loop = worker_loop(i, ch.stagger())
        cmd = next(loop)
        action, read_at, obs_frame, dt = 0, 0.0, -1, 0.0
        while not ch.stop.is_set():
            if cmd[0] == "sleep_until":
                while True:  # sleep by polling the parent's pipe: its end (EOF) wakes us at once
                    left = cmd[1] - clock()
                    if ch.stop.is_set() or left <= 0:
                        break
                    if alive.poll(min(left, 0.05)):
                        raise _ParentGone
                cmd = loop.send(clock())
            elif cmd[0] == "infer":
                obs, obs_frame = ch.read_obs()
                read_at = clock()
                action = infer(obs)
                after = clock()
                dt = after - read_at
                cmd = loop.send((after, dt))
            else:
                now = clock()
                ch.publish(action, infer.version, obs_frame, i)
                ch.log((now, i, read_at, dt, obs_frame), alive)
                cmd = loop.send(now)
    except _ParentGone:
        return
    except BaseException:  # reported to the parent, which stops the run with it
        ch.errors.put((i, traceback.format_exc()))
        ch.stop.set()


class InferencePool:
    def __init__(self, ch: Channels, net_factory: Optional[Callable] = None, num_actions: int = 1,
                 sleep: float = 0.0, jitter: float = 0.0, overrun: Optional[Tuple[int, int, float]] = None,
                 seed: int = 0):
        self.ch = ch
        ctx = mp.get_context("spawn")
        self.reader, self._alive = ctx.Pipe(duplex=False)  # we keep the write end; our death closes it
        reader = self.reader
        self.extra: List[tuple] = []  # other processes of the run to watch and stop: (name, process)
        self.closing = False
        self.procs = [ctx.Process(target=_worker_main, name=f"inference-{i}", daemon=True,
                                  args=(i, ch, reader, net_factory, num_actions, sleep, jitter, overrun, seed + 7 * i))
                      for i in range(ch.n_workers)]

    def start(self, timeout: float = 120.0, margin: float = 0.05) -> float:
        """Starts the workers and waits until all are ready (imports, network built); the schedule's time 0 is
        ``margin`` seconds after that, returned."""
        for p in self.procs:
            start_shielded(p)
        deadline = clock() + timeout
        expected = len(self.procs) + len(self.extra)  # the extra processes (an environment) count themselves too
        while self.ch._ready.value < expected:
            self.check()
            if clock() > deadline:
                raise WorkerError(f"only {self.ch._ready.value} of {expected} processes (inference workers and "
                                  f"environment) were ready after {timeout:.0f} s")
            time.sleep(0.01)
        t0 = clock() + margin
        self.ch.stagger().start(t0)
        self.ch.go.set()
        return t0

    @property
    def pids(self) -> List[int]:
        return [p.pid for p in self.procs]

    def check(self) -> None:
        """Raises ``WorkerError`` if a worker reported an error, died, or the run was stopped by anyone but us."""
        stopped = self.ch.stop.is_set() and not self.closing
        try:  # a failing process queues its traceback, then sets stop: give the traceback time to arrive
            who, tb = self.ch.errors.get(timeout=2.0) if stopped else self.ch.errors.get_nowait()
        except queue.Empty:
            pass
        else:
            raise WorkerError(f"{'inference worker ' if isinstance(who, int) else ''}{who} failed:\n{tb}")
        named = [(f"inference worker {i}", p) for i, p in enumerate(self.procs)] + self.extra
        for name, p in named:
            if p.exitcode is not None and not self.closing:  # killed without a word
                raise WorkerError(f"{name} died (exit code {p.exitcode})")
        if stopped:
            raise WorkerError("the realtime processes stopped without an error report")

    def close(self, timeout: float = 3.0) -> None:
        self.closing = True
        self.ch.stop.set()
        deadline = clock() + timeout
        procs = self.procs + [p for _, p in self.extra]
        for p in procs:
            if p.pid is not None:
                p.join(max(0.0, deadline - clock()))
        for p in procs:
            if p.pid is not None and p.is_alive():  # stuck (SIGTERM is ignored by our processes): kill it
                p.kill()
                p.join(1.0)
        self._alive.close()


class EnvLoop:
    """A realtime loop over a one-copy vector env (reset already, its observation given)."""

    def __init__(self, env, obs: np.ndarray, ch: Channels, frame_period: float,
                 default_action: Union[str, int] = "noop", seed: int = 0,
                 on_transition: Optional[Callable] = None, on_episode: Optional[Callable] = None,
                 history: int = 4096):
        if not frame_period > 0:
            raise ValueError(f"frame_period must be > 0 seconds, got {frame_period}")
        self.env, self.obs, self.ch, self.period = env, obs, ch, float(frame_period)
        self.default_action, self.rng = default_action, np.random.default_rng(seed)
        self.num_actions = int(env.single_action_space.n)
        self.on_transition, self.on_episode = on_transition, on_episode
        self.merger = TransitionMerger()
        self.seen: Dict[int, np.ndarray] = collections.OrderedDict()  # frame -> observation, the recent ones
        self.history = history
        self.frame, self.last_publication, self.ep_return, self.ep_length = 0, 0, 0.0, 0
        self.episode_start = 0  # first frame of the current episode
        self.stats = {"frames": 0, "acted": 0, "late_frames": 0, "delays": [], "versions": []}
        self._write(obs[0])

    def _write(self, obs: np.ndarray) -> None:
        self.seen[self.frame] = obs
        if len(self.seen) > self.history:
            self.seen.popitem(last=False)
        self.ch.write_obs(obs, self.frame)

    def _default(self) -> int:
        if self.default_action == "random":
            return int(self.rng.integers(self.num_actions))
        return 0 if self.default_action == "noop" else int(self.default_action)

    def step(self) -> None:
        """One frame (no waiting)."""
        slot = self.ch.read_slot()
        action = self._default()
        if slot[0] > self.last_publication:
            self.last_publication = int(slot[0])
            action, version, obs_frame = int(slot[1]), int(slot[2]), int(slot[3])
            self.stats["acted"] += 1
            self.stats["delays"].append(self.frame - obs_frame)
            self.stats["versions"].append(version)
            seen = self.seen.get(obs_frame)
            if seen is not None and obs_frame >= self.episode_start:
                self.merger.agent_action(seen, action)
            else:  # computed in the last episode (or its observation left the history): it lands, the world does
                self.merger.open = None  # not wait, but it is no transition, and ends the open one's frames
        next_obs, reward, terminated, truncated, _ = self.env.step(np.array([action]))
        self.merger.frame_outcome(next_obs[0], float(reward[0]), bool(terminated[0]), bool(truncated[0]))
        for t in self.merger.closed():
            if self.on_transition is not None:
                self.on_transition(t)
        self.ep_return, self.ep_length = self.ep_return + float(reward[0]), self.ep_length + 1
        if terminated[0] or truncated[0]:
            if self.on_episode is not None:
                self.on_episode(self.ep_return, self.ep_length, self.frame + 1)
            self.ep_return, self.ep_length = 0.0, 0
            next_obs, _ = self.env.reset()
            self.episode_start = self.frame + 1
        self.frame += 1
        self.stats["frames"] += 1
        self.ch.frames.value = self.frame
        self._write(next_obs[0])

    def run(self, seconds: float, pool: Optional[InferencePool] = None, start: Optional[float] = None) -> None:
        """Frames at absolute ticks ``start + f * frame_period`` for ``seconds`` (a frame whose tick has passed by more
        than a period counts as late); checks the workers every frame."""
        start = clock() if start is None else start
        end = start + seconds
        tick = max(start, clock())
        while tick < end and not self.ch.stop.is_set():
            left = tick - clock()
            if left > 0:
                time.sleep(left)
            elif -left > self.period:
                self.stats["late_frames"] += 1
            self.step()
            if pool is not None:
                pool.check()
            tick += self.period
        if pool is not None:
            pool.check()
