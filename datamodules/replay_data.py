"""Off-policy experience as a LightningDataModule (the environment side of every value-based recipe; the Lightning
DQN-example pattern).

The data module steps ``num_envs`` vectorised environments with the module's epsilon-greedy policy, stores every
transition in a replay buffer (``datamodules.replay``: uniform or prioritised, n-step returns) and yields one sampled
minibatch per update.  The policy is the trainer's LightningModule (``GreedyPolicy``: ``greedy_actions(obs)``, the
argmax action of raw observations); exploration is this module's: with probability epsilon a uniform random action,
drawn from a generator it owns and checkpoints.  The module consumes batches with
``training_step(self, dataloader_iter)`` and pulls each one itself, so the environment steps before update ``k`` are
taken with the weights after update ``k - 1`` (Lightning would prefetch one batch ahead otherwise).

* Schedule (Dopamine's): ``warmup_steps`` environment steps of uniform random actions fill the buffer; then epsilon
  decays linearly from 1 to ``epsilon_end`` over ``epsilon_decay_steps`` environment steps; one update every
  ``update_period`` environment steps (the replay ratio; fractional values give several updates per step, e.g.
  0.5 = two).  Environment steps count all copies and all ranks' copies are independent (each rank its own buffer).
* One epoch is ``steps_per_epoch`` environment steps of this rank (Dopamine's iteration), ended at an update, so
  ``trainer.max_epochs`` sets the run length; ``max_steps`` counts updates.
* Batches: ``obs``, ``actions``, n-step ``returns``, bootstrap ``next_obs``, ``discounts`` (``gamma^K``, 0 after a
  termination), ``indices`` (buffer slots), ``weights`` (prioritised only), and ``episode_returns`` /
  ``episode_lengths`` of the episodes that ended since the previous batch, ``env_steps`` and ``epsilon``.
* Validation, test and predict play ``eval_episodes`` episodes (10 for test / predict when 0) at
  ``eval_epsilon`` (0.001, Dopamine's) on separate environments with fixed seeds, each cut at ``eval_max_steps``.

Checkpoints hold the buffer's contents and sampler, the environments' exact state (synchronous envs), the current
observations, the episodes in progress, the exploration generator and the counters, so a resumed run continues
exactly as an uninterrupted one.  ``atari=True`` applies the standard Atari preprocessing
(``datamodules.envs.atari_preprocessing``: sticky actions 0.25 unless ``env_kwargs`` says otherwise, 4-frame skip
with max-pool, 84x84 grey, 4 stacked frames; ``terminal_on_life_loss`` as DER) to ``ALE/...`` environments.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Protocol

import gymnasium as gym
import numpy as np
import torch

from datamodules.env_side import EnvDataModule, EpisodeCursor, play_episodes
from datamodules.envs import atari_preprocessing, check_env_id, make_vector_env
from datamodules.replay import PrioritizedReplayBuffer, ReplayBuffer, describe_memory
from datamodules.sampling import world_of


class GreedyPolicy(Protocol):
    device: torch.device

    def greedy_actions(self, obs: torch.Tensor) -> torch.Tensor: ...


def linear_epsilon(step: int, warmup: int, decay: int, end: float) -> float:
    """1 during warm-up, then linearly down to ``end`` over ``decay`` steps (Dopamine's
    ``linearly_decaying_epsilon``)."""
    if decay <= 0:
        return end if step >= warmup else 1.0
    left = decay + warmup - step
    return end + float(np.clip((1.0 - end) * left / decay, 0.0, 1.0 - end))


class TransitionCollector(EpisodeCursor):
    """Steps a vector env epsilon-greedily into a replay buffer; owns the observations, the episodes in progress, the
    exploration generator and the update schedule."""

    def __init__(self, env: gym.vector.VectorEnv, buffer: ReplayBuffer, seed: int, warmup_steps: int,
                 epsilon_decay_steps: int, epsilon_end: float, update_period: float, world_size: int = 1):
        super().__init__(env, seed)
        self.buffer, self.world_size = buffer, world_size
        self.warmup, self.decay, self.epsilon_end, self.update_period = (warmup_steps, epsilon_decay_steps,
                                                                         epsilon_end, update_period)
        self.rng = np.random.default_rng(int(seed) + 2**31)
        self.num_actions = int(env.single_action_space.n)
        self.local_steps = 0  # environment steps of this rank (all copies)
        self.updates = 0
        self.epoch_end: Optional[int] = None
        self.pending: List[tuple] = []  # episodes that ended since the last batch: (return, length)

    @property
    def env_steps(self) -> int:
        return self.local_steps * self.world_size

    @property
    def epsilon(self) -> float:
        return linear_epsilon(self.local_steps, self.warmup, self.decay, self.epsilon_end)

    def update_due(self) -> bool:
        if self.local_steps < self.warmup or not self.buffer.can_sample():
            return False
        return self.updates < 1 + int((self.local_steps - self.warmup) // self.update_period)

    @torch.no_grad()
    def step(self, policy: GreedyPolicy) -> None:
        n = self.env.num_envs
        explore = self.rng.random(n) < self.epsilon
        actions = self.rng.integers(self.num_actions, size=n)
        if not explore.all():
            greedy = policy.greedy_actions(torch.as_tensor(self.obs, device=policy.device)).cpu().numpy()
            actions = np.where(explore, actions, greedy)
        next_obs, reward, terminated, truncated, _ = self.env.step(actions)
        self.buffer.add(self.obs, actions, reward, next_obs, terminated, truncated)
        self.local_steps += n
        self.pending += self.advance(next_obs, reward, terminated, truncated, self.env_steps)

    def batch(self, policy: GreedyPolicy, batch_size: int) -> Dict[str, torch.Tensor]:
        """Steps until an update is due, then one minibatch (counted as an update)."""
        while not self.update_due():
            self.step(policy)
        self.updates += 1
        batch = self.buffer.sample(batch_size)
        batch["episode_returns"] = torch.tensor([r for r, _ in self.pending], dtype=torch.float64)
        batch["episode_lengths"] = torch.tensor([n for _, n in self.pending], dtype=torch.long)
        batch["env_steps"] = torch.tensor(self.env_steps)
        batch["epsilon"] = torch.tensor(self.epsilon)
        self.pending = []
        return batch

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> Dict[str, object]:
        return {**super().state_dict(), "rng": self.rng.bit_generator.state, "local_steps": self.local_steps,
                "updates": self.updates, "epoch_end": self.epoch_end,
                "pending": torch.tensor(self.pending, dtype=torch.float64).reshape(-1, 2),
                "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: Dict[str, object], reseed: int = 0) -> None:
        """Worker-process environments (no snapshot) start fresh episodes from seeds that depend on the resumed
        step."""
        self.buffer.load_state_dict(state["buffer"])
        self.rng.bit_generator.state = state["rng"]
        self.local_steps, self.updates = int(state["local_steps"]), int(state["updates"])
        self.epoch_end = None if state["epoch_end"] is None else int(state["epoch_end"])
        self.pending = [(float(r), int(n)) for r, n in state["pending"].tolist()]
        super().load_state_dict(state, reseed=int(reseed) + 7919 * self.local_steps)


class ReplayDataModule(EnvDataModule):
    state_name = "replay"

    def __init__(self, env_id: str = "MinAtar/Breakout-v1", num_envs: int = 1, batch_size: int = 32,
                 capacity: int = 100_000, warmup_steps: int = 5_000, update_period: float = 4.0,
                 epsilon_decay_steps: int = 50_000, epsilon_end: float = 0.01, n_step: int = 1, gamma: float = 0.99,
                 prioritized: bool = False, priority_alpha: float = 0.5, priority_beta: float = 0.5,
                 steps_per_epoch: int = 10_000, seed: Optional[int] = None, asynchronous: bool = False,
                 atari: bool = False, terminal_on_life_loss: bool = False, eval_episodes: int = 0,
                 eval_epsilon: float = 0.001,
                 eval_max_steps: int = 27_000, env_kwargs: Optional[dict] = None):
        super().__init__(seed)
        for name, value, low in (("num_envs", num_envs, 1), ("batch_size", batch_size, 1), ("n_step", n_step, 1),
                                 ("steps_per_epoch", steps_per_epoch, 1), ("warmup_steps", warmup_steps, 0),
                                 ("epsilon_decay_steps", epsilon_decay_steps, 0), ("eval_episodes", eval_episodes, 0),
                                 ("eval_max_steps", eval_max_steps, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"data.{name} must be an integer >= {low}, got {value!r}")
        if not update_period > 0:
            raise ValueError(f"data.update_period (environment steps per update) must be > 0, got {update_period}")
        if capacity < max(batch_size, num_envs * n_step):
            raise ValueError(f"data.capacity={capacity} must hold a batch ({batch_size}) and n_step x num_envs "
                             f"({n_step * num_envs}) transitions")
        if not 0 <= epsilon_end <= 1 or not 0 <= eval_epsilon <= 1:
            raise ValueError(f"data.epsilon_end={epsilon_end} and data.eval_epsilon={eval_epsilon} must be in [0, 1]")
        if not 0 < gamma <= 1:
            raise ValueError(f"data.gamma must be in (0, 1], got {gamma}")
        if atari and not env_id.startswith("ALE/"):
            raise ValueError(f"data.atari=true needs an ALE/<Game>-v5 environment, got data.env_id={env_id!r}")
        check_env_id(env_id)
        self.save_hyperparameters(logger=False)
        self.collector: Optional[TransitionCollector] = None

    # ------------------------------------------------------------------ environments
    def _env_args(self) -> tuple:
        kwargs, wrappers = ({}, None)
        if self.hparams.atari:
            kwargs, wrappers = atari_preprocessing(terminal_on_life_loss=self.hparams.terminal_on_life_loss)
        return {**kwargs, **(self.hparams.env_kwargs or {})}, wrappers

    def make_env(self, num_envs: int, asynchronous: bool = False) -> gym.vector.VectorEnv:
        kwargs, wrappers = self._env_args()
        return make_vector_env(self.hparams.env_id, num_envs, asynchronous, env_kwargs=kwargs, wrappers=wrappers)

    def _probe(self) -> tuple:
        if self._spaces is None:
            env = self.make_env(1)
            self._spaces = (env.single_observation_space, env.single_action_space)
            env.close()
            if not isinstance(self._spaces[1], gym.spaces.Discrete):
                raise ValueError(f"data.env_id={self.hparams.env_id!r} has {self._spaces[1]} actions; value-based "
                                 "agents need a discrete action space")
        return self._spaces

    def make_buffer(self, rank: int) -> ReplayBuffer:
        hp, space = self.hparams, self.observation_space
        kwargs = dict(capacity=hp.capacity, obs_shape=space.shape, num_envs=hp.num_envs, n_step=hp.n_step,
                      gamma=hp.gamma, obs_dtype=space.dtype, seed=self._seed(rank) + 17)
        if hp.prioritized:
            return PrioritizedReplayBuffer(**kwargs, alpha=hp.priority_alpha, beta=hp.priority_beta)
        return ReplayBuffer(**kwargs)

    def make_collector(self, env: gym.vector.VectorEnv, buffer: ReplayBuffer, rank: int,
                       world: int) -> TransitionCollector:
        hp = self.hparams
        return TransitionCollector(env, buffer, self._seed(rank), hp.warmup_steps, hp.epsilon_decay_steps,
                                   hp.epsilon_end, hp.update_period, world)

    def setup(self, stage: str) -> None:
        if self.collector is not None or stage != "fit":
            return
        world, rank = world_of(self.trainer)
        hp = self.hparams
        buffer = self.make_buffer(rank)
        env = self.make_env(hp.num_envs, hp.asynchronous)
        self.collector = self.make_collector(env, buffer, rank, world)
        if rank == 0 and self.trainer is not None and not self.trainer.fast_dev_run:
            print(describe_memory(buffer))
        self.restore_pending()

    def train_items(self):
        """Minibatches until the epoch's last environment step (``steps_per_epoch`` of this rank) has had its
        updates."""
        c, spe = self.collector, self.hparams.steps_per_epoch
        if c.epoch_end is None or c.local_steps >= c.epoch_end and not c.update_due():
            c.epoch_end = (c.local_steps // spe + 1) * spe
        while True:
            yield c.batch(self.policy, self.hparams.batch_size)
            if c.local_steps >= c.epoch_end and not c.update_due():
                return

    def update_priorities(self, indices: torch.Tensor, priorities: torch.Tensor) -> None:
        buffer = self.collector.buffer
        if isinstance(buffer, PrioritizedReplayBuffer):
            buffer.update_priorities(indices.cpu().numpy(), priorities.detach().double().cpu().numpy())

    @torch.no_grad()
    def evaluate(self, policy: GreedyPolicy) -> Dict[str, torch.Tensor]:
        """``eval_episodes`` episodes at ``eval_epsilon`` on fresh environments with the same seeds every time."""
        hp = self.hparams
        episodes = hp.eval_episodes or 10
        n = min(episodes, 8)
        rng = np.random.default_rng(self._seed(world_of(self.trainer)[1]) + 99)
        env = self.make_env(n)
        A = int(env.single_action_space.n)

        def act(obs: np.ndarray) -> np.ndarray:
            greedy = policy.greedy_actions(torch.as_tensor(obs, device=policy.device)).cpu().numpy()
            return np.where(rng.random(n) < hp.eval_epsilon, rng.integers(A, size=n), greedy)

        return play_episodes(env, act, episodes, self.eval_seeds(n), hp.eval_max_steps)
