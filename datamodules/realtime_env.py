"""A realtime environment in virtual time (Riemer et al., ICLR 2025, "staggered asynchronous inference"; spec
``shared/specs/staggered_async.md``, errata first): the environment never waits for the agent.

One call of ``begin_frame`` / ``end_frame`` around the environment's step is one frame.  Inference takes
``inference_frames`` (k) frames, optionally ``k + U{-jitter..jitter}``; staggered workers pad every cycle to the
longest, ``k + jitter`` frames (the paper's max_time staggering in frames).  At each frame:

1. every inference worker due to start reads the current observation and computes its action (``act(obs)``, with
   the weights of that moment);
2. every worker whose inference ends at this frame publishes its action (an action computed on the observation of
   frame ``f`` lands on frame ``f + k - 1``, so ``k = 1`` is turn-based) and starts again at the next frame;
3. the environment applies the freshest published action, once, or the default behaviour (``noop`` = action 0,
   ``random``, ``repeat`` the last applied action, or an action index) if none is fresh.

Modes: ``sequential`` (one worker, the next inference starts when the last action has landed, plus ``learn_frames`` of
inline learning), ``staggered`` (``n_workers`` workers, worker ``j`` first starts at frame ``floor(j (k + jitter) /
N)``) and ``unstaggered`` (all workers start together). With ``N = k`` staggered workers the agent acts at every frame
after a warm-up of ``k - 1`` default frames; sequentially every ``k`` frames. ``action_slot="single"`` is the official
shared slot (an action published on top of a fresh one overwrites it: ``lost``), ``"fifo"`` a queue (one stale action
per frame). Every episode starts with idle workers (in-flight actions of the last episode are dropped), as the
official simulations pad each episode's observation history.

``accounting="official"`` reproduces the official frame simulations (``simulate_delay_atari.py``, errata 3): a
decision acts at once on the observation of ``k - 1`` decisions earlier (zeros before the episode's first), followed
in ``sequential`` mode by ``k`` default frames (``--noops k``: acts every ``k + 1`` frames) and in ``staggered``
mode by none.

Transitions (what ``end_frame`` returns, for the replay buffer): one per agent action, from the observation that
action was computed on to the observation the next agent action was computed on, with the rewards of the frames from
its landing up to the next agent action (the default-action run merged into the preceding agent transition, as the
official code does), ``frames`` the number of frames it spans; an episode end closes it with the final observation.
"""
from __future__ import annotations

import collections
import pickle
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Union

import numpy as np
import torch

MODES = ("sequential", "staggered", "unstaggered")
SLOTS = ("single", "fifo")
ACCOUNTINGS = ("ours", "official")
DEFAULTS = ("noop", "random", "repeat")


@dataclass
class Transition:
    obs: np.ndarray
    action: int
    next_obs: Optional[np.ndarray] = None
    rewards: List[float] = field(default_factory=list)
    terminated: bool = False
    truncated: bool = False

    @property
    def frames(self) -> int:
        return max(1, len(self.rewards))

    def reward(self, gamma: float = 1.0) -> float:
        """The summed reward of its frames, discounted per frame when ``gamma < 1`` (the semi-MDP return)."""
        return float(sum(r * gamma ** j for j, r in enumerate(self.rewards)))


class TransitionMerger:
    """Builds the agent transitions of a stream of frames: ``agent_action(seen, action)`` when an agent action is
    applied (``seen``: the observation it was computed on) closes the open transition at ``seen`` and opens one;
    ``frame_outcome`` adds the frame's reward and, at an episode end, closes it with the final observation.
    ``closed()`` hands over the transitions closed since the last call."""

    def __init__(self):
        self.open: Optional[Transition] = None
        self._closed: List[Transition] = []

    def agent_action(self, seen: np.ndarray, action: int) -> None:
        if self.open is not None:
            self.open.next_obs = seen
            self._closed.append(self.open)
        self.open = Transition(seen, int(action))

    def frame_outcome(self, next_obs: np.ndarray, reward: float, terminated: bool, truncated: bool) -> None:
        if self.open is not None:
            self.open.rewards.append(float(reward))
            if terminated or truncated:
                self.open.next_obs = np.array(next_obs, copy=True)
                self.open.terminated, self.open.truncated = bool(terminated), bool(truncated)
                self._closed.append(self.open)
                self.open = None

    def closed(self) -> List[Transition]:
        out, self._closed = self._closed, []
        return out


@dataclass
class _Worker:
    next_start: int  # episode frame at which it next reads an observation (-1: never again this episode)
    landing: int = -1  # episode frame its in-flight action lands on (-1: idle)
    action: int = 0
    obs: Optional[np.ndarray] = None


def check_realtime_args(inference_frames: int, n_workers: int, mode: str, default_action: Union[str, int],
                        jitter: int, action_slot: str, accounting: str, learn_frames: int,
                        num_actions: Optional[int] = None, prefix: str = "data.") -> None:
    """One-line errors naming the bad value."""
    for name, value, low in (("inference_frames", inference_frames, 1), ("n_workers", n_workers, 1),
                             ("jitter", jitter, 0), ("learn_frames", learn_frames, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{prefix}{name} must be an integer >= {low}, got {value!r}")
    for name, value, allowed in (("mode", mode, MODES), ("action_slot", action_slot, SLOTS),
                                 ("accounting", accounting, ACCOUNTINGS)):
        if value not in allowed:
            raise ValueError(f"{prefix}{name}={value!r}; expected one of {', '.join(allowed)}")
    if isinstance(default_action, str) and default_action not in DEFAULTS:
        raise ValueError(f"{prefix}default_action={default_action!r}; expected one of {', '.join(DEFAULTS)} "
                         "or an action index")
    if not isinstance(default_action, str) and (not isinstance(default_action, (int, np.integer))
                                                or default_action < 0
                                                or num_actions is not None and default_action >= num_actions):
        raise ValueError(f"{prefix}default_action={default_action!r}; expected one of {', '.join(DEFAULTS)} or an "
                         f"action index in [0, {num_actions})")
    if mode == "sequential" and n_workers != 1:
        raise ValueError(f"{prefix}n_workers={n_workers}: sequential interaction has one inference worker")
    if accounting == "official" and mode == "unstaggered":
        raise ValueError(f"{prefix}accounting='official' simulates sequential and staggered interaction only, got "
                         f"{prefix}mode='unstaggered'")
    if accounting == "official" and jitter:
        raise ValueError(f"{prefix}jitter={jitter}: the official frame simulation has a fixed delay (jitter 0)")


class RealtimeSimulator:
    def __init__(self, num_actions: int, inference_frames: int = 1, n_workers: int = 1, mode: str = "staggered",
                 default_action: Union[str, int] = "noop", jitter: int = 0, action_slot: str = "single",
                 accounting: str = "ours", learn_frames: int = 0, seed: int = 0, record: bool = False):
        check_realtime_args(inference_frames, n_workers, mode, default_action, jitter, action_slot, accounting,
                            learn_frames, num_actions)
        self.num_actions, self.k, self.n = int(num_actions), int(inference_frames), int(n_workers)
        self.mode, self.default_action, self.jitter = mode, default_action, int(jitter)
        self.slot, self.accounting, self.learn_frames = action_slot, accounting, int(learn_frames)
        self.period = self.k + self.jitter  # the longest inference: a staggered worker's cycle
        self.rng = np.random.default_rng(seed)
        self.record = record
        # counters over the whole run (frames, agent actions applied, published actions overwritten unapplied)
        self.frames = self.acted = self.lost = self.decisions = 0
        self.act_frames: List[int] = []  # run frame of every agent action (``record=True`` only)
        self.merger = TransitionMerger()
        self.start_episode()

    # ------------------------------------------------------------------ episode
    def start_episode(self) -> None:
        """Idle workers on their initial phases; nothing published; no open transition."""
        if self.mode == "staggered":
            starts = [(j * self.period) // self.n for j in range(self.n)]
        else:
            starts = [0] * self.n
        self.workers = [_Worker(s) for s in starts]
        self.queue: collections.deque = collections.deque()  # published, not yet applied: (action, obs)
        self.merger.open = None
        self.last_applied = 0
        self.f = 0  # frame within the episode
        self.history: collections.deque = collections.deque(maxlen=self.k)  # official: observations of decisions

    # ------------------------------------------------------------------ one frame
    def _duration(self) -> int:
        if not self.jitter:
            return self.k
        return max(1, self.k + int(self.rng.integers(-self.jitter, self.jitter + 1)))

    def _default(self) -> int:
        if self.default_action == "noop":
            return 0
        if self.default_action == "random":
            return int(self.rng.integers(self.num_actions))
        if self.default_action == "repeat":
            return self.last_applied
        return int(self.default_action)

    def _publish(self, action: int, obs: np.ndarray) -> None:
        if self.slot == "single" and self.queue:
            self.queue.clear()
            self.lost += 1
        self.queue.append((action, obs))

    def _official_decision(self, obs: np.ndarray, act: Callable[[np.ndarray], int]) -> Optional[tuple]:
        period = self.k + 1 if self.mode == "sequential" else 1
        if self.f % period:
            return None
        self.history.append(obs)
        seen = self.history[0] if len(self.history) == self.k else np.zeros_like(obs)
        self.decisions += 1
        return int(act(seen)), seen

    def begin_frame(self, obs: np.ndarray, act: Callable[[np.ndarray], int]) -> int:
        """Starts and lands this frame's inferences (``act(observation) -> action``); the action to apply now."""
        obs = np.array(obs, copy=True)
        if self.accounting == "official":
            fresh = self._official_decision(obs, act)
        else:
            for w in self.workers:  # 1. starts: read the current observation
                if w.next_start == self.f:
                    busy = self._duration()
                    if self.mode == "staggered":  # max_time: every cycle padded to the longest inference
                        busy = self.period
                    w.action, w.obs, w.landing = int(act(obs)), obs, self.f + busy - 1
                    self.decisions += 1
            for w in self.workers:  # 2. landings: publish, start again at the next frame
                if w.landing == self.f:
                    self._publish(w.action, w.obs)
                    w.landing, w.obs = -1, None
                    w.next_start = self.f + 1 + (self.learn_frames if self.mode == "sequential" else 0)
            fresh = self.queue.popleft() if self.queue else None
        if fresh is None:
            action = self._default()
        else:
            action, seen = fresh
            self.acted += 1
            if self.record:
                self.act_frames.append(self.frames)
            self.merger.agent_action(seen, action)
        self.last_applied = action
        return action

    def end_frame(self, next_obs: np.ndarray, reward: float, terminated: bool, truncated: bool) -> List[Transition]:
        """Accounts the frame's outcome; the transitions it closed (an episode end closes the open one; call
        ``start_episode`` after resetting the environment)."""
        self.merger.frame_outcome(next_obs, reward, terminated, truncated)
        self.f += 1
        self.frames += 1
        return self.merger.closed()

    # ------------------------------------------------------------------ measures
    @property
    def act_fraction(self) -> float:
        return self.acted / max(1, self.frames)

    def intervals(self) -> np.ndarray:
        """Frames between consecutive recorded agent actions."""
        return np.diff(np.asarray(self.act_frames, dtype=np.int64))

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> Dict[str, object]:
        keep = {k: v for k, v in self.__dict__.items() if k != "rng"}
        return {"pickled": torch.frombuffer(bytearray(pickle.dumps(keep)), dtype=torch.uint8).clone(),
                "rng": self.rng.bit_generator.state}

    CONFIG = {"k": "inference_frames", "n": "n_workers", "mode": "mode", "slot": "action_slot",
              "accounting": "accounting", "jitter": "jitter", "learn_frames": "learn_frames",
              "default_action": "default_action"}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """The state in flight of a simulator with the same settings (a changed setting is one line naming it)."""
        saved = pickle.loads(state["pickled"].numpy().tobytes())
        for attr, name in self.CONFIG.items():
            if attr in saved and attr in self.__dict__ and saved[attr] != self.__dict__[attr]:
                raise ValueError(f"data.{name}={self.__dict__[attr]!r} but the checkpoint's run used "
                                 f"{saved[attr]!r}: a realtime run resumes with the settings it started with")
        self.__dict__.update(saved)
        self.rng.bit_generator.state = state["rng"]


def play_realtime_episodes(env, sim: RealtimeSimulator, act: Callable[[np.ndarray], int], episodes: int, seed: int,
                           max_frames: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """``episodes`` whole episodes on a one-copy vector env through ``sim``: the environment seeded once with ``seed``,
    then consecutive episodes (the spec's protocol); raw ``returns`` (float64), ``lengths`` (frames) and per-episode
    ``act_fraction`` (agent actions / frames)."""
    returns, lengths, fractions = [], [], []
    for e in range(episodes):
        obs, _ = env.reset(seed=[int(seed)]) if e == 0 else env.reset()
        sim.start_episode()
        acted0, ret, length = sim.acted, 0.0, 0
        while True:
            a = sim.begin_frame(obs[0], act)
            obs, reward, terminated, truncated, _ = env.step(np.array([a]))
            sim.end_frame(obs[0], float(reward[0]), bool(terminated[0]), bool(truncated[0]))
            ret, length = ret + float(reward[0]), length + 1
            if terminated[0] or truncated[0] or max_frames is not None and length >= max_frames:
                break
        returns.append(ret)
        lengths.append(length)
        fractions.append((sim.acted - acted0) / length)
    return {"returns": torch.tensor(returns, dtype=torch.float64), "lengths": torch.tensor(lengths),
            "act_fraction": torch.tensor(fractions, dtype=torch.float64)}
