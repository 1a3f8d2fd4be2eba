"""DQN learning in a realtime environment in wall-clock time, with real asynchronous inference processes (Riemer et
al., ICLR 2025; spec ``staggered_async.md`` 1.4-1.5): the learner side of the run as a LightningDataModule.

At ``fit`` the module starts an **environment process** (``datamodules.async_inference.EnvLoop``: one frame every
``frame_period`` seconds, never waiting; the default action when no new one was published) and ``n_workers``
**inference processes** (``InferencePool``, max_time staggering with ``respread``), which act epsilon-greedily with
the module's network, its weights published to shared memory every ``publish_every`` updates and at the start (each
action carries the version it was computed with).  ``inference_sleep`` (+- ``inference_jitter``) adds a simulated
inference time per action: on a 2-core machine a large network's forward passes cannot run in parallel, so a sleep
stands for them.  The environment process sends every agent transition (default runs merged, ``semi_mdp_discount``
as in ``RealtimeDataModule``) and every finished episode through a queue; this module adds them to the replay
buffer and samples one minibatch per ``update_period`` frames after ``warmup_steps`` frames.  If the learner is
slower than that, the environment does not wait for it (updates per frame fall); if faster, it waits for frames.

A process that fails stops the run with its error; all of them end with the run (``teardown``), when the learner
process dies (a pipe only it holds) and on SIGTERM / Ctrl-C.  Checkpoints hold the replay buffer, the counters and
the episodes; a resumed run starts the environment afresh (a wall-clock run cannot be replayed exactly).
Validation / test / predict run in virtual time (``RealtimeDataModule.evaluate``): staggered, ``n_workers`` workers,
``k = ceil(max(inference_sleep, t_max) / frame_period)`` frames per inference.
"""
from __future__ import annotations

import atexit
import copy
import functools
import math
import multiprocessing as mp
import queue
import time
import traceback
from typing import Dict, List, Optional, Union

import gymnasium as gym
import numpy as np
import torch

from datamodules.async_inference import (Channels, EnvLoop, InferencePool, WorkerError, ignore_stop_signals,
                                         start_shielded)
from datamodules.envs import make_vector_env
from datamodules.realtime_data import RealtimeDataModule
from datamodules.replay import ReplayBuffer
from datamodules.replay_data import linear_epsilon
from datamodules.stagger import RESPREADS


def _env_main(ch: Channels, alive, env_id: str, env_kwargs: dict, seed: int, frame_period: float,
              default_action, out: mp.Queue, schedule: tuple, gamma: float) -> None:
    """The environment process: frames until the run stops or the learner process dies."""
    torch.set_num_threads(1)
    ignore_stop_signals()
    out.cancel_join_thread()  # at the end, transitions the learner no longer reads must not keep us alive
    try:
        env = make_vector_env(env_id, 1, env_kwargs=env_kwargs)
        obs, _ = env.reset(seed=[seed])

        def transition(t):
            out.put(("t", t.obs, t.action, t.reward(gamma), t.next_obs, t.terminated, t.truncated, t.frames))

        loop = EnvLoop(env, obs, ch, frame_period, default_action, seed, on_transition=transition,
                       on_episode=lambda ret, length, frame: out.put(("e", ret, length, frame)))
        with ch.sched_lock:  # frame 0 is written: ready
            ch._ready.value += 1
        while not ch.go.wait(0.05):  # the workers get ready; the learner may die meanwhile
            if ch.stop.is_set() or alive.poll(0):
                return
        tick = time.monotonic()
        while not ch.stop.is_set() and not alive.poll(0):
            ch.epsilon = linear_epsilon(schedule[0] + loop.frame, *schedule[1:])
            left = tick - time.monotonic()
            if left > 0:
                time.sleep(left)
            loop.step()
            tick += frame_period
        env.close()
    except BaseException:
        ch.errors.put(("environment process", traceback.format_exc()))
        ch.stop.set()


class _Processes:
    """The run's processes, stopped once (``close``) by teardown, at exit, or after a failure."""

    def __init__(self, pool: InferencePool):
        self.pool, self.closed = pool, False
        atexit.register(self.close)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool.close()


class WallClockCollector:
    def __init__(self, dm: "WallClockRealtimeDataModule", buffer: ReplayBuffer):
        self.dm, self.buffer = dm, buffer
        hp = dm.hparams
        self.warmup, self.update_period = hp.warmup_steps, hp.update_period
        self.local_steps = self.updates = 0
        self.epoch_end: Optional[int] = None
        self.pending: List[tuple] = []
        self.episodes: List[tuple] = []
        self.env: Optional[_Processes] = None
        self.ch: Optional[Channels] = None
        self.transitions = 0

    @property
    def env_steps(self) -> int:
        return self.local_steps

    @property
    def epsilon(self) -> float:
        hp = self.dm.hparams
        return linear_epsilon(self.local_steps, hp.warmup_steps, hp.epsilon_decay_steps, hp.epsilon_end)

    def start(self, policy) -> None:
        hp, dm = self.dm.hparams, self.dm
        if getattr(policy.hparams, "distributional", False):
            raise ValueError("model.distributional=true: the wall-clock inference workers act on expected Q-values "
                             "of a plain DQN head; use the virtual-time recipes for C51")
        reseed = dm._seed(0) + 7919 * self.local_steps  # a resumed run does not replay the first run's randomness
        online = copy.deepcopy(policy.online).cpu().eval()
        flat = torch.nn.utils.parameters_to_vector(online.parameters())
        space = dm.observation_space
        self.ch = Channels(space.shape, space.dtype, hp.n_workers, max(hp.t_max, hp.inference_sleep), hp.respread,
                           n_params=flat.numel())
        self.ch.set_weights(flat)
        self.version_updates = 0
        pool = InferencePool(self.ch, functools.partial(copy.deepcopy, online), int(dm.action_space.n),
                             hp.inference_sleep, hp.inference_jitter, seed=reseed + 11)
        ctx = mp.get_context("spawn")
        self.queue = ctx.Queue()
        gamma = hp.gamma if hp.semi_mdp_discount else 1.0
        env_proc = ctx.Process(target=_env_main, name="realtime-env", daemon=True,
                               args=(self.ch, pool.reader, hp.env_id, hp.env_kwargs or {}, reseed, hp.frame_period,
                                     hp.default_action, self.queue,
                                     (self.local_steps, hp.warmup_steps, hp.epsilon_decay_steps, hp.epsilon_end),
                                     gamma))
        pool.extra.append(("environment process", env_proc))
        start_shielded(env_proc)
        self.env = _Processes(pool)
        self.frames0 = self.local_steps  # frames before a resume
        pool.start()

    def _drain(self) -> None:
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if item[0] == "t":
                _, obs, action, reward, next_obs, term, trunc, frames = item
                span = frames if self.dm.hparams.semi_mdp_discount else 1
                self.buffer.add(obs[None], np.array([action]), np.array([reward]), next_obs[None], np.array([term]),
                                np.array([trunc]), frames=np.array([span]))
                self.transitions += 1
            else:
                _, ret, length, frame = item
                self.pending.append((ret, length))
                self.episodes.append((self.frames0 + frame, ret, length))
        self.local_steps = self.frames0 + self.ch.frames.value

    def update_due(self) -> bool:
        if self.local_steps < self.warmup or not self.buffer.can_sample():
            return False
        due = 1 + int((self.local_steps - self.warmup) // self.update_period)
        self.updates = max(self.updates, due - 1)  # a learner slower than the world drops the updates it owes
        return self.updates < due

    def batch(self, policy, batch_size: int) -> Dict[str, torch.Tensor]:
        if self.env is None:
            self.start(policy)
        if self.updates - self.version_updates >= self.dm.hparams.publish_every:
            self.ch.set_weights(torch.nn.utils.parameters_to_vector(policy.online.parameters()))
            self.version_updates = self.updates
        self._drain()
        while not self.update_due():  # the learner waits for frames, never the environment for the learner
            self.env.pool.check()
            time.sleep(0.001)
            self._drain()
        self.env.pool.check()
        self.updates += 1
        batch = self.buffer.sample(batch_size)
        batch["episode_returns"] = torch.tensor([r for r, _ in self.pending], dtype=torch.float64)
        batch["episode_lengths"] = torch.tensor([n for _, n in self.pending], dtype=torch.long)
        batch["env_steps"] = torch.tensor(self.local_steps)
        batch["epsilon"] = torch.tensor(self.ch.epsilon)
        self.pending = []
        return batch

    def state_dict(self) -> Dict[str, object]:
        return {"local_steps": self.local_steps, "updates": self.updates, "buffer": self.buffer.state_dict(),
                "episodes": torch.tensor(self.episodes, dtype=torch.float64).reshape(-1, 3),
                "epoch_end": self.epoch_end}

    def load_state_dict(self, state: Dict[str, object], reseed: int = 0) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.local_steps, self.updates = int(state["local_steps"]), int(state["updates"])
        self.episodes = [(int(s), float(r), int(n)) for s, r, n in state["episodes"].tolist()]
        self.epoch_end = None if state["epoch_end"] is None else int(state["epoch_end"])


class WallClockRealtimeDataModule(RealtimeDataModule):
    state_name = "wall-clock replay"

    def __init__(self, env_id: str = "MinAtar/Freeway-v1", frame_period: float = 0.005, n_workers: int = 4,
                 inference_sleep: float = 0.016, inference_jitter: float = 0.1, t_max: float = 0.016,
                 respread: str = "even", default_action: Union[str, int] = "noop", publish_every: int = 50,
                 semi_mdp_discount: bool = False, batch_size: int = 32, capacity: int = 100_000,
                 warmup_steps: int = 2_000, update_period: float = 4.0, epsilon_decay_steps: int = 20_000,
                 epsilon_end: float = 0.01, gamma: float = 0.99, steps_per_epoch: int = 10_000,
                 seed: Optional[int] = None, eval_episodes: int = 0, eval_epsilon: float = 0.001,
                 eval_max_steps: int = 2_500, env_kwargs: Optional[dict] = None):
        if not frame_period > 0:
            raise ValueError(f"data.frame_period must be > 0 seconds, got {frame_period}")
        if not inference_sleep >= 0:
            raise ValueError(f"data.inference_sleep must be >= 0 seconds, got {inference_sleep}")
        if not 0 <= inference_jitter < 1:
            raise ValueError(f"data.inference_jitter must be in [0, 1) (relative), got {inference_jitter}")
        if not t_max > 0:
            raise ValueError(f"data.t_max must be > 0 seconds, got {t_max}")
        if respread not in RESPREADS:
            raise ValueError(f"data.respread={respread!r}; expected one of {', '.join(RESPREADS)}")
        if not isinstance(publish_every, int) or publish_every < 1:
            raise ValueError(f"data.publish_every must be an integer >= 1 update, got {publish_every!r}")
        if default_action not in ("noop", "random") and not isinstance(default_action, int):
            raise ValueError(f"data.default_action={default_action!r}; expected noop, random or an action index "
                             "(repeat is a virtual-time option)")
        k = max(1, math.ceil(max(inference_sleep, t_max) / frame_period - 1e-9))
        super().__init__(env_id=env_id, inference_frames=k, n_workers=n_workers, mode="staggered",
                         default_action=default_action, semi_mdp_discount=semi_mdp_discount, batch_size=batch_size,
                         capacity=capacity, warmup_steps=warmup_steps, update_period=update_period,
                         epsilon_decay_steps=epsilon_decay_steps, epsilon_end=epsilon_end, gamma=gamma,
                         steps_per_epoch=steps_per_epoch, seed=seed, eval_episodes=eval_episodes,
                         eval_epsilon=eval_epsilon, eval_max_steps=eval_max_steps, env_kwargs=env_kwargs)
        for name, value in (("inference_frames", k), ("mode", "staggered"), ("jitter", 0), ("action_slot", "single"),
                            ("accounting", "ours"), ("learn_frames", 0), ("n_step", 1), ("prioritized", False),
                            ("num_envs", 1)):
            self.hparams.setdefault(name, value)

    def setup(self, stage: str) -> None:
        if self.collector is not None or stage != "fit":
            return
        if self.trainer is not None and self.trainer.world_size > 1:
            raise ValueError(f"the wall-clock realtime recipe runs one learner: trainer.devices=1 (and one node), "
                             f"got a world size of {self.trainer.world_size}")
        self.collector = WallClockCollector(self, self.make_buffer(0))
        self.restore_pending()

    def publications(self):
        """``(rows, target gap)``: every action published so far ``(time, worker, observation time, inference s,
        observation frame)`` and the schedule's target gap ``t_max / N_I`` (t_max as it stands); ``(None, 0)`` before
        the workers start."""
        c = self.collector
        if c is None or c.ch is None:
            return None, 0.0
        return c.ch.publications(), float(c.ch.stagger().t_max) / self.hparams.n_workers

    def teardown(self, stage: str) -> None:
        if self.collector is not None and self.collector.env is not None:
            self.collector.env.close()
        self.collector = None

    def train_items(self):
        """Minibatches until the epoch's last frame (``steps_per_epoch``) has passed: updates a slow learner still
        owed then are dropped, as frames are in a realtime world."""
        c, spe = self.collector, self.hparams.steps_per_epoch
        if c.epoch_end is None or c.local_steps >= c.epoch_end:
            c.epoch_end = (c.local_steps // spe + 1) * spe
        try:
            while True:
                yield c.batch(self.policy, self.hparams.batch_size)
                if c.local_steps >= c.epoch_end:
                    return
        except WorkerError:
            if self.collector is not None and self.collector.env is not None:
                self.collector.env.close()
            raise

    def make_env(self, num_envs: int, asynchronous: bool = False) -> gym.vector.VectorEnv:
        return make_vector_env(self.hparams.env_id, num_envs, env_kwargs=self.hparams.env_kwargs or {})
