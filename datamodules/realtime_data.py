"""The replay data module in a realtime environment (staggered asynchronous inference, spec
``shared/specs/staggered_async.md``): the off-policy foundation of ``datamodules.replay_data`` with its environment
stepped frame by frame through ``datamodules.realtime_env.RealtimeSimulator`` in virtual time.

* Every frame is one environment step (``env_steps``, the epsilon schedule and the update schedule count frames:
  learning runs beside the environment at a fixed rate in wall-clock time, whatever the interaction mode); the
  inference workers due to start read the frame's observation and choose epsilon-greedily with the module's current
  weights; the frame applies the freshest landed action or the default behaviour.
* The replay buffer receives one transition per agent action (``RealtimeSimulator``'s: the observation the action was
  computed on, the rewards from its landing to the next agent action, the next agent action's observation), so
  sequential interaction at ``k`` frames per inference stores ``1/k`` as many transitions as staggered interaction
  with ``N_I = k`` workers.  ``semi_mdp_discount=true`` discounts a transition spanning ``F`` frames by ``gamma^F``
  (and the rewards inside it per frame); the official code's plain ``gamma`` is the default.
* Validation / test / predict play ``eval_episodes`` consecutive episodes (the evaluation environment seeded once)
  through a simulator of the same mode, and report the act fraction beside the returns.

One environment copy (``num_envs=1``): a realtime environment is one stream of frames.
"""
from __future__ import annotations

from typing import Dict, Optional, Union

import gymnasium as gym
import numpy as np
import torch

from datamodules.realtime_env import RealtimeSimulator, check_realtime_args, play_realtime_episodes
from datamodules.replay import ReplayBuffer
from datamodules.replay_data import GreedyPolicy, ReplayDataModule, TransitionCollector


class RealtimeCollector(TransitionCollector):
    def __init__(self, env: gym.vector.VectorEnv, buffer: ReplayBuffer, seed: int, warmup_steps: int,
                 epsilon_decay_steps: int, epsilon_end: float, update_period: float, world_size: int,
                 sim: RealtimeSimulator, semi_mdp_discount: bool, gamma: float):
        super().__init__(env, buffer, seed, warmup_steps, epsilon_decay_steps, epsilon_end, update_period, world_size)
        self.sim, self.semi_mdp, self.gamma = sim, semi_mdp_discount, gamma

    def _chooser(self, policy: GreedyPolicy):
        epsilon = self.epsilon

        def act(obs: np.ndarray) -> int:
            if self.rng.random() < epsilon:
                return int(self.rng.integers(self.num_actions))
            return int(policy.greedy_actions(torch.as_tensor(obs[None], device=policy.device))[0])
        return act

    @torch.no_grad()
    def step(self, policy: GreedyPolicy) -> None:
        """One frame."""
        action = self.sim.begin_frame(self.obs[0], self._chooser(policy))
        next_obs, reward, terminated, truncated, _ = self.env.step(np.array([action]))
        gamma = self.gamma if self.semi_mdp else 1.0
        for t in self.sim.end_frame(next_obs[0], float(reward[0]), bool(terminated[0]), bool(truncated[0])):
            self.buffer.add(t.obs[None], np.array([t.action]), np.array([t.reward(gamma)]), t.next_obs[None],
                            np.array([t.terminated]), np.array([t.truncated]),
                            frames=np.array([t.frames if self.semi_mdp else 1]))
        self.local_steps += 1
        ended = self.advance(next_obs, reward, terminated, truncated, self.env_steps)
        self.pending += ended
        if ended:
            self.sim.start_episode()

    def state_dict(self) -> Dict[str, object]:
        return {**super().state_dict(), "realtime": self.sim.state_dict()}

    def load_state_dict(self, state: Dict[str, object], reseed: int = 0) -> None:
        super().load_state_dict(state, reseed)
        self.sim.load_state_dict(state["realtime"])
        if "envs" not in state:  # the environment restarted from a reseed: so does the episode's schedule
            self.sim.start_episode()


class RealtimeDataModule(ReplayDataModule):
    state_name = "realtime replay"

    def __init__(self, env_id: str = "MinAtar/Freeway-v1", inference_frames: int = 1, n_workers: int = 1,
                 mode: str = "staggered", default_action: Union[str, int] = "noop", jitter: int = 0,
                 action_slot: str = "single", accounting: str = "ours", learn_frames: int = 0,
                 semi_mdp_discount: bool = False, num_envs: int = 1, batch_size: int = 32, capacity: int = 100_000,
                 warmup_steps: int = 5_000, update_period: float = 4.0, epsilon_decay_steps: int = 50_000,
                 epsilon_end: float = 0.01, n_step: int = 1, gamma: float = 0.99, prioritized: bool = False,
                 priority_alpha: float = 0.5, priority_beta: float = 0.5, steps_per_epoch: int = 10_000,
                 seed: Optional[int] = None, eval_episodes: int = 0, eval_epsilon: float = 0.001,
                 eval_max_steps: int = 27_000, env_kwargs: Optional[dict] = None):
        check_realtime_args(inference_frames, n_workers, mode, default_action, jitter, action_slot, accounting,
                            learn_frames)
        if num_envs != 1:
            raise ValueError(f"data.num_envs={num_envs}: a realtime environment is one stream of frames (use 1)")
        super().__init__(env_id=env_id, num_envs=num_envs, batch_size=batch_size, capacity=capacity,
                         warmup_steps=warmup_steps, update_period=update_period,
                         epsilon_decay_steps=epsilon_decay_steps, epsilon_end=epsilon_end, n_step=n_step, gamma=gamma,
                         prioritized=prioritized, priority_alpha=priority_alpha, priority_beta=priority_beta,
                         steps_per_epoch=steps_per_epoch, seed=seed, eval_episodes=eval_episodes,
                         eval_epsilon=eval_epsilon, eval_max_steps=eval_max_steps, env_kwargs=env_kwargs)
        for name in ("asynchronous", "atari", "terminal_on_life_loss"):  # the replay module's, always off here
            self.hparams.setdefault(name, False)
        n_actions = self.action_space.n
        if not isinstance(default_action, str) and default_action >= n_actions:
            raise ValueError(f"data.default_action={default_action} is not an action of {env_id} "
                             f"(0..{n_actions - 1})")

    def make_simulator(self, seed: int, record: bool = False) -> RealtimeSimulator:
        hp = self.hparams
        return RealtimeSimulator(self.action_space.n, hp.inference_frames, hp.n_workers, hp.mode, hp.default_action,
                                 hp.jitter, hp.action_slot, hp.accounting, hp.learn_frames, seed=seed, record=record)

    def make_collector(self, env: gym.vector.VectorEnv, buffer: ReplayBuffer, rank: int,
                       world: int) -> TransitionCollector:
        hp = self.hparams
        return RealtimeCollector(env, buffer, self._seed(rank), hp.warmup_steps, hp.epsilon_decay_steps,
                                 hp.epsilon_end, hp.update_period, world, self.make_simulator(self._seed(rank) + 5),
                                 hp.semi_mdp_discount, hp.gamma)

    @torch.no_grad()
    def evaluate(self, policy: GreedyPolicy) -> Dict[str, torch.Tensor]:
        hp = self.hparams
        seed = self.eval_seeds(1)[0]
        rng = np.random.default_rng(seed + 99)
        A = int(self.action_space.n)

        def act(obs: np.ndarray) -> int:
            if rng.random() < hp.eval_epsilon:
                return int(rng.integers(A))
            return int(policy.greedy_actions(torch.as_tensor(obs[None], device=policy.device))[0])

        env = self.make_env(1)
        try:
            return play_realtime_episodes(env, self.make_simulator(seed + 7), act, hp.eval_episodes or 10, seed,
                                          hp.eval_max_steps)
        finally:
            env.close()
