"""What every reinforcement-learning data module shares, on-policy (``datamodules.rollouts``) and off-policy
(``datamodules.replay_data``): the environment side of a run.

* ``EpisodeCursor``: the live state of a vector env, its current observations and the episodes in progress and
  finished, with an exact checkpoint (the environments' own state where ``datamodules.envs.snapshot_envs`` can take
  it, fresh episodes from a seed that depends on the resumed step where it cannot: worker-process environments).
* ``play_episodes``: evaluation, a number of whole episodes on fresh environments with fixed seeds.
* ``EnvDataModule``: the LightningDataModule base.  The policy is the trainer's LightningModule; environment copy
  ``i`` of rank ``k`` is seeded from ``(seed, k, i)``, ``seed`` defaulting to the run's ``seed_everything``; the
  train loader yields what the subclass's ``train_dataset()`` yields, validation / test / predict one evaluation
  (``evaluate``); the checkpoint holds the collector's state of every DDP rank (``collector.state_dict()``), loaded
  as soon as the collector exists (``restore_pending`` at the end of the subclass's ``setup``).
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence

import gymnasium as gym
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from datamodules.envs import bytes_to_tensor, restore_envs, snapshot_envs, tensor_to_bytes
from datamodules.sampling import world_of


class EpisodeCursor:
    """A vector env, reset with seeds ``seed, seed + 1, ...``, with its current observations ``obs``, the returns and
    lengths of the episodes in progress and ``episodes``: ``(env steps when it ended, return, length)`` of every
    finished one."""

    def __init__(self, env: gym.vector.VectorEnv, seed: int):
        self.env = env
        self.obs, _ = env.reset(seed=[int(seed) + i for i in range(env.num_envs)])
        self.ep_return = np.zeros(env.num_envs)
        self.ep_length = np.zeros(env.num_envs, dtype=np.int64)
        self.episodes: List[tuple] = []

    def advance(self, next_obs: np.ndarray, reward: np.ndarray, terminated: np.ndarray, truncated: np.ndarray,
                env_steps: int) -> List[tuple]:
        """Accounts one step of every copy (``reward`` as reported: raw), resets the copies whose episode ended and
        makes the result the current observations; returns ``(return, length)`` of the episodes that ended."""
        self.ep_return += reward
        self.ep_length += 1
        done = np.logical_or(terminated, truncated)
        ended = []
        if done.any():
            for i in np.flatnonzero(done):
                ended.append((float(self.ep_return[i]), int(self.ep_length[i])))
                self.episodes.append((int(env_steps), *ended[-1]))
            self.ep_return[done], self.ep_length[done] = 0.0, 0
            next_obs, _ = self.env.reset(options={"reset_mask": done})
        self.obs = next_obs
        return ended

    def state_dict(self) -> Dict[str, object]:
        state = {"obs": torch.as_tensor(np.asarray(self.obs)), "ep_return": torch.as_tensor(self.ep_return.copy()),
                 "ep_length": torch.as_tensor(self.ep_length.copy()),
                 "episodes": torch.tensor(self.episodes, dtype=torch.float64).reshape(-1, 3)}
        snap = snapshot_envs(self.env)
        if snap is not None:
            state["envs"] = bytes_to_tensor(snap)
        return state

    def load_state_dict(self, state: Dict[str, object], reseed: int) -> None:
        """The saved state; environments that cannot be restored start fresh episodes from seeds
        ``reseed, reseed + 1, ...`` (pass a seed that depends on the resumed step)."""
        self.episodes = [(int(s), float(r), int(n)) for s, r, n in state["episodes"].tolist()]
        if "envs" in state and snapshot_envs(self.env) is not None:
            restore_envs(self.env, tensor_to_bytes(state["envs"]))
            self.obs = state["obs"].numpy().copy()
            self.ep_return = state["ep_return"].numpy().copy()
            self.ep_length = state["ep_length"].numpy().copy()
        else:
            n = self.env.num_envs
            self.obs, _ = self.env.reset(seed=[int(reseed) + i for i in range(n)])
            self.ep_return, self.ep_length = np.zeros(n), np.zeros(n, dtype=np.int64)


def play_episodes(env: gym.vector.VectorEnv, act: Callable[[np.ndarray], np.ndarray], episodes: int,
                  seeds: Sequence[int], max_steps: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """``episodes`` whole episodes on ``env`` (reset with ``seeds``, closed at the end) with ``act(obs) -> actions``,
    each cut at ``max_steps``: their raw returns (float64) and lengths, in the order they ended."""
    n = env.num_envs
    obs, _ = env.reset(seed=list(seeds))
    returns, lengths = [], []
    ret, length = np.zeros(n), np.zeros(n, dtype=np.int64)
    started, active = n, np.ones(n, dtype=bool)
    while active.any():
        obs, reward, terminated, truncated, _ = env.step(act(obs))
        ret += np.where(active, reward, 0.0)
        length += active
        ended = terminated | truncated
        if max_steps is not None:
            ended = ended | (length >= max_steps)
        for i in np.flatnonzero(ended & active):
            returns.append(ret[i])
            lengths.append(int(length[i]))
            if started < episodes:
                started += 1
            else:
                active[i] = False
        ret[ended], length[ended] = 0.0, 0
        if ended.any():
            obs, _ = env.reset(options={"reset_mask": ended})
    env.close()
    return {"returns": torch.tensor(returns, dtype=torch.float64), "lengths": torch.tensor(lengths)}


class _Items(IterableDataset):
    def __init__(self, items: Callable[[], object]):
        self.items = items

    def __iter__(self):
        yield from self.items()


class EnvDataModule(L.LightningDataModule):
    """Subclasses set ``self.collector`` in ``setup`` (an object with ``env``, ``state_dict()`` and
    ``load_state_dict(state, reseed=...)``), call ``restore_pending()`` after, and define ``_probe() ->
    (observation space, action space)``, ``train_items()`` (a generator of one epoch's training items) and
    ``evaluate(policy)``.  Their hyperparameters include ``num_envs`` and ``eval_episodes`` (0: no validation)."""

    state_name = "environments"  # what the checkpoint holds per rank, for the message on a device-count mismatch

    def __init__(self, seed: Optional[int] = None):
        super().__init__()
        # no seed given: the run's seed_everything (Lightning exports it as PL_GLOBAL_SEED)
        self.seed = int(seed) if seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        self.collector = None
        self._pending_state: Optional[dict] = None
        self._spaces: Optional[tuple] = None

    def _probe(self) -> tuple:
        raise NotImplementedError

    @property
    def observation_space(self) -> gym.Space:
        return self._probe()[0]

    @property
    def action_space(self) -> gym.Space:
        return self._probe()[1]

    @property
    def policy(self):
        return self.trainer.lightning_module

    def _seed(self, rank: int) -> int:
        return self.seed * 100_003 + rank * self.hparams.num_envs

    def eval_seeds(self, n: int) -> List[int]:
        """The evaluation environments' seeds: the same every time, apart from the training ones."""
        _, rank = world_of(self.trainer)
        return [self._seed(rank) + 50_000_017 + i for i in range(n)]

    def restore_pending(self) -> None:
        if self._pending_state is not None:
            self._load(self._pending_state)
            self._pending_state = None

    def teardown(self, stage: str) -> None:  # environment worker processes end with the run
        if self.collector is not None:
            self.collector.env.close()
            self.collector = None

    # ------------------------------------------------------------------ loaders
    def train_items(self):
        raise NotImplementedError

    def _evaluation(self):
        yield self.evaluate(self.policy)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Items(self.train_items), batch_size=None, num_workers=0)

    def val_dataloader(self):
        if not self.hparams.eval_episodes:
            return []
        return DataLoader(_Items(self._evaluation), batch_size=None, num_workers=0)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(_Items(self._evaluation), batch_size=None, num_workers=0)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(_Items(self._evaluation), batch_size=None, num_workers=0)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> Dict[str, object]:
        if self.collector is None:
            return {}
        state = self.collector.state_dict()
        world, _ = world_of(self.trainer)
        if world > 1:  # every rank has its own environments; the checkpoint keeps them all
            gathered: List[Optional[dict]] = [None] * world
            torch.distributed.all_gather_object(gathered, state)
            return {"ranks": gathered}
        return {"ranks": [state]}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        if not state:
            return
        if self.collector is None:
            self._pending_state = state
            return
        self._load(state)

    def _load(self, state: Dict[str, object]) -> None:
        world, rank = world_of(self.trainer)
        ranks = state["ranks"]
        if len(ranks) != world:
            raise ValueError(f"the checkpoint holds the {self.state_name} of {len(ranks)} processes, this run has "
                             f"{world} (resume with the same number of devices)")
        self.collector.load_state_dict(ranks[rank], reseed=self._seed(rank))
