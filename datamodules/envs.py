"""Vectorised gymnasium environments for the reinforcement-learning recipes (the environment side of the on-policy
and off-policy foundations).

* ``make_vector_env``: ``num_envs`` copies of a registered gymnasium environment (classic control, MuJoCo through the
  ``mujoco`` package, MinAtar, Atari through ``ale-py``, anything registered by an installed package), stepped in this process (``sync``) or in worker
  processes (``asynchronous=True``), with autoreset *disabled*: the vector env returns the true final observation of
  an episode and the caller resets the finished copies (``reset_mask``), so truncated episodes can be bootstrapped
  from their last state.  The caller seeds the first reset (``reset(seed=[...])``, one seed per copy; each DDP rank
  its own block).
* ``NormalizeObservation`` / ``NormalizeReward``: running-statistics wrappers (the usual PPO normalisation: obs
  ``(o - mean) / std`` clipped to +-10; rewards divided by the running std of the discounted return, reset at episode
  ends) whose statistics are plain tensors in ``state_dict()`` so they travel in checkpoints.  ``frozen=True`` stops
  the updates (evaluation environments share the training statistics).
* ``snapshot_envs`` / ``restore_envs``: the exact state of synchronous environments (the wrapper chain pickled, plus
  MuJoCo's integration state and every copy's ``np_random``), so a resumed run steps the same episodes as an
  uninterrupted one.  Environments in worker processes cannot be snapshotted: their owners re-seed them on resume.
"""
from __future__ import annotations

import pickle
from typing import Any, Dict, List, Optional

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode, SyncVectorEnv, VectorEnv, VectorWrapper
from gymnasium.wrappers.utils import RunningMeanStd


def register_namespaces(env_id: str) -> None:
    """Environment ids of installed packages that gymnasium does not register by itself: ``MinAtar/<Game>-v0|v1``
    (the ``minatar`` package), ``ALE/<Game>-v5`` (``ale-py``, ROMs bundled) and ours, ``WCMDP/...``
    (``datamodules.wcmdp_envs``)."""
    if env_id.startswith("MinAtar/") and "MinAtar/Breakout-v1" not in gym.registry:
        import minatar.gym

        minatar.gym.register_envs()
    elif env_id.startswith("ALE/") and "ALE/Breakout-v5" not in gym.registry:
        import ale_py

        gym.register_envs(ale_py)
    elif env_id.startswith("WCMDP/"):  # the machine-replacement WCMDP (datamodules.wcmdp_envs)
        from datamodules.wcmdp_envs import register

        register()


def check_env_id(env_id: str, field: str = "data.env_id") -> None:
    register_namespaces(env_id)
    try:
        gym.spec(env_id)
    except gym.error.Error as err:
        raise ValueError(f"{field}={env_id!r} is not a registered gymnasium environment ({err}); "
                         "e.g. CartPole-v1, Acrobot-v1, InvertedPendulum-v5, Hopper-v5, MinAtar/Breakout-v1, ALE/Pong-v5") from None


def atari_preprocessing(frame_skip: int = 4, screen_size: int = 84, stack: int = 4, noop_max: int = 30,
                        terminal_on_life_loss: bool = False, sticky_actions: float = 0.25) -> tuple:
    """``(env_kwargs, wrappers)`` of the standard Atari setting (Machado et al. 2018, Dopamine): the emulator at every
    frame (``frameskip=1``) with sticky actions, then gymnasium's ``AtariPreprocessing`` (each action repeated
    ``frame_skip`` frames, the max over the last two, 84x84 grey, up to ``noop_max`` no-ops at reset) and the last
    ``stack`` frames stacked: ``uint8 (stack, 84, 84)`` observations."""
    from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation

    def wrap(env: gym.Env) -> gym.Env:
        env = AtariPreprocessing(env, noop_max=noop_max, frame_skip=frame_skip, screen_size=screen_size,
                                 terminal_on_life_loss=terminal_on_life_loss, grayscale_obs=True, scale_obs=False)
        return FrameStackObservation(env, stack)
    return {"frameskip": 1, "repeat_action_probability": sticky_actions}, [wrap]


def make_vector_env(env_id: str, num_envs: int, asynchronous: bool = False,
                    normalize_observation: bool = False, normalize_reward: bool = False, gamma: float = 0.99,
                    env_kwargs: Optional[Dict[str, Any]] = None, wrappers: Optional[list] = None) -> VectorEnv:
    """The vector env, not reset yet (wrapped: ``NormalizeReward`` outermost); ``wrappers`` wrap every copy."""
    check_env_id(env_id)
    if num_envs < 1:
        raise ValueError(f"data.num_envs must be >= 1, got {num_envs}")
    env = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="async" if asynchronous else "sync",
                       vector_kwargs={"autoreset_mode": AutoresetMode.DISABLED}, wrappers=wrappers,
                       **(env_kwargs or {}))
    if normalize_observation:
        env = NormalizeObservation(env)
    if normalize_reward:
        env = NormalizeReward(env, gamma)
    return env


def find_wrapper(env: VectorEnv, kind: type) -> Optional[VectorWrapper]:
    while isinstance(env, VectorWrapper):
        if isinstance(env, kind):
            return env
        env = env.env
    return None


def _rms_state(rms: RunningMeanStd) -> Dict[str, torch.Tensor]:
    return {"mean": torch.as_tensor(np.asarray(rms.mean, dtype=np.float64)),
            "var": torch.as_tensor(np.asarray(rms.var, dtype=np.float64)),
            "count": torch.tensor(float(rms.count), dtype=torch.float64)}


def _load_rms(rms: RunningMeanStd, state: Dict[str, torch.Tensor]) -> None:
    rms.mean = state["mean"].numpy().copy().reshape(np.shape(rms.mean))
    rms.var = state["var"].numpy().copy().reshape(np.shape(rms.var))
    rms.count = float(state["count"])


class NormalizeObservation(VectorWrapper):
    """Observations standardised by running statistics of every observation seen (at reset: only the copies that
    were reset), clipped to ``+-clip``; float32 out."""

    def __init__(self, env: VectorEnv, clip: float = 10.0, epsilon: float = 1e-8):
        super().__init__(env)
        self.rms = RunningMeanStd(shape=self.single_observation_space.shape)
        self.clip, self.epsilon, self.frozen = clip, epsilon, False

    def normalize(self, obs: np.ndarray) -> np.ndarray:
        z = (obs - self.rms.mean) / np.sqrt(self.rms.var + self.epsilon)
        return np.clip(z, -self.clip, self.clip).astype(np.float32)

    def step(self, actions):
        obs, reward, terminated, truncated, info = self.env.step(actions)
        if not self.frozen:
            self.rms.update(np.asarray(obs, dtype=np.float64))
        return self.normalize(obs), reward, terminated, truncated, info

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)
        mask = (options or {}).get("reset_mask")
        if not self.frozen:
            rows = obs if mask is None else obs[np.asarray(mask)]
            if len(rows):
                self.rms.update(np.asarray(rows, dtype=np.float64))
        return self.normalize(obs), info

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return _rms_state(self.rms)

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        _load_rms(self.rms, state)


class NormalizeReward(VectorWrapper):
    """Rewards divided by the running std of the discounted return ``G <- gamma G + r`` (``G`` zeroed when an
    episode ends), clipped to ``+-clip``.  The raw reward stays in ``info["raw_reward"]``."""

    def __init__(self, env: VectorEnv, gamma: float = 0.99, clip: float = 10.0, epsilon: float = 1e-8):
        super().__init__(env)
        self.rms = RunningMeanStd(shape=())
        self.returns = np.zeros(self.num_envs)
        self.gamma, self.clip, self.epsilon, self.frozen = gamma, clip, epsilon, False

    def step(self, actions):
        obs, reward, terminated, truncated, info = self.env.step(actions)
        info = dict(info)
        info["raw_reward"] = np.asarray(reward, dtype=np.float64)
        self.returns = self.returns * self.gamma + reward
        if not self.frozen:
            self.rms.update(self.returns)
        scaled = np.clip(reward / np.sqrt(self.rms.var + self.epsilon), -self.clip, self.clip)
        self.returns[np.logical_or(terminated, truncated)] = 0.0
        return obs, scaled, terminated, truncated, info

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {**_rms_state(self.rms), "returns": torch.as_tensor(self.returns.copy())}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        _load_rms(self.rms, state)
        self.returns = state["returns"].numpy().copy()


def _is_mujoco(env) -> bool:
    return hasattr(env, "model") and hasattr(env, "data") and type(env.model).__module__.startswith("mujoco")


def snapshot_envs(env: VectorEnv) -> Optional[bytes]:
    """The exact state of a synchronous vector env's copies, or ``None`` (worker processes)."""
    base = env.unwrapped
    if not isinstance(base, SyncVectorEnv):
        return None
    copies: List[tuple] = []
    for sub in base.envs:
        u = sub.unwrapped
        extra: Dict[str, Any] = {}
        if getattr(u, "_np_random", None) is not None:  # MinAtar never seeds it: do not make one up
            extra["np_random"] = u.np_random.bit_generator.state
        if _is_mujoco(u):  # gymnasium's MuJoCo envs pickle their constructor arguments only
            import mujoco

            spec = mujoco.mjtState.mjSTATE_INTEGRATION
            state = np.empty(mujoco.mj_stateSize(u.model, spec))
            mujoco.mj_getState(u.model, u.data, state, spec)
            extra["mujoco"] = state
        copies.append((pickle.dumps(sub), extra))
    return pickle.dumps((copies, np.array(base._autoreset_envs)))


def restore_envs(env: VectorEnv, blob: bytes) -> None:
    base = env.unwrapped
    copies, autoreset = pickle.loads(blob)
    if len(copies) != len(base.envs):
        raise ValueError(f"the checkpoint holds {len(copies)} environments, this run has {len(base.envs)} "
                         "(data.num_envs must match to resume)")
    for i, (pickled, extra) in enumerate(copies):
        sub = pickle.loads(pickled)
        u = sub.unwrapped
        if "mujoco" in extra:
            import mujoco

            mujoco.mj_setState(u.model, u.data, extra["mujoco"], mujoco.mjtState.mjSTATE_INTEGRATION)
            mujoco.mj_forward(u.model, u.data)
        if "np_random" in extra:  # a fresh generator first for envs rebuilt by EzPickle
            u.np_random.bit_generator.state = extra["np_random"]
        base.envs[i].close()
        base.envs[i] = sub
    base._autoreset_envs = autoreset


def bytes_to_tensor(blob: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    return t.numpy().tobytes()
