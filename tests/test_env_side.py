"""The environment side shared by the RL data modules (datamodules/env_side.py) and the shared evaluation steps
(lightning_modules/layers/episode_eval.py)."""
import gymnasium as gym
import numpy as np
import pytest
import torch

from datamodules.env_side import EpisodeCursor, play_episodes
from datamodules.envs import make_vector_env
from lightning_modules.layers.episode_eval import EpisodeEvaluation


def _walk(cursor: EpisodeCursor, steps: int, seed: int) -> list:
    """Random actions from a fixed generator; every observation seen and every episode finished."""
    rng = np.random.default_rng(seed)
    seen = []
    for t in range(steps):
        a = rng.integers(cursor.env.single_action_space.n, size=cursor.env.num_envs)
        next_obs, reward, terminated, truncated, _ = cursor.env.step(a)
        ended = cursor.advance(next_obs, reward, terminated, truncated, env_steps=t + 1)
        seen.append((np.asarray(cursor.obs).copy(), ended))
    return seen


def test_the_cursor_counts_episodes_like_a_plain_loop():
    cursor = EpisodeCursor(make_vector_env("CartPole-v1", 3), seed=5)
    seen = _walk(cursor, 300, seed=1)
    env = gym.make("CartPole-v1")  # copy 1 alone, with the same seed and actions
    env.reset(seed=6)
    rng = np.random.default_rng(1)
    ret, length, finished = 0.0, 0, []
    for _ in range(300):
        a = rng.integers(2, size=3)[1]
        _, r, term, trunc, _ = env.step(a)
        ret, length = ret + r, length + 1
        if term or trunc:
            finished.append((ret, length))
            ret, length = 0.0, 0
            env.reset()
    ours = [(r, n) for _, ended in seen for r, n in ended]
    assert len(cursor.episodes) == len(ours) and all(a > 0 for a, _ in ours)
    assert set(finished) <= set(ours)  # copy 1's episodes are among all copies' episodes
    assert sorted(s for s, _, _ in cursor.episodes) == [s for s, _, _ in cursor.episodes]  # in step order


@pytest.mark.parametrize("env_id", ["CartPole-v1", "MinAtar/Breakout-v1"])
def test_a_restored_cursor_continues_exactly(env_id):
    a = EpisodeCursor(make_vector_env(env_id, 2), seed=3)
    _walk(a, 137, seed=0)
    state = a.state_dict()
    assert "envs" in state  # synchronous environments are snapshotted
    b = EpisodeCursor(make_vector_env(env_id, 2), seed=99)
    b.load_state_dict(state, reseed=0)
    assert b.episodes == a.episodes and np.array_equal(b.obs, a.obs)
    future_a, future_b = _walk(a, 200, seed=7), _walk(b, 200, seed=7)
    for (oa, ea), (ob, eb) in zip(future_a, future_b):
        assert np.array_equal(oa, ob) and ea == eb


def test_worker_process_environments_restart_from_the_reseed():
    a = EpisodeCursor(make_vector_env("CartPole-v1", 2, asynchronous=True), seed=3)
    _walk(a, 50, seed=0)
    state = a.state_dict()
    assert "envs" not in state
    b = EpisodeCursor(make_vector_env("CartPole-v1", 2, asynchronous=True), seed=0)
    b.load_state_dict(state, reseed=1234)
    fresh = make_vector_env("CartPole-v1", 2)
    expected, _ = fresh.reset(seed=[1234, 1235])
    assert b.episodes == a.episodes and np.allclose(b.obs, expected) and not b.ep_length.any()
    for env in (a.env, b.env, fresh):
        env.close()


def test_play_episodes_plays_whole_episodes_and_cuts_at_max_steps():
    # CartPole with a constant action ends every episode within a few dozen steps
    out = play_episodes(make_vector_env("CartPole-v1", 3), lambda obs: np.zeros(len(obs), dtype=np.int64),
                        episodes=7, seeds=[0, 1, 2])
    assert out["returns"].dtype == torch.float64 and len(out["returns"]) == 7
    assert torch.equal(out["returns"], out["lengths"].double())  # reward 1 per step
    env = gym.make("CartPole-v1")
    env.reset(seed=1)
    n, done = 0, False
    while not done:
        _, _, term, trunc, _ = env.step(0)
        n, done = n + 1, term or trunc
    assert n in out["lengths"].tolist()  # copy 1's first episode, replayed alone
    cut = play_episodes(make_vector_env("CartPole-v1", 2), lambda obs: (obs[:, 2] > 0).astype(np.int64),
                        episodes=3, seeds=[0, 1], max_steps=25)
    assert cut["lengths"].tolist() == [25, 25, 25]


class _Logged(EpisodeEvaluation):
    def __init__(self):
        self.records = {}

    def log(self, name, value, **kw):
        self.records[name] = (float(value), kw)


def test_the_evaluation_steps_log_mean_std_and_length_and_predict_one_row_per_episode():
    m = _Logged()
    batch = {"returns": torch.tensor([1.0, 3.0], dtype=torch.float64), "lengths": torch.tensor([10, 30])}
    m.validation_step(batch, 0)
    assert m.records["val/return"][0] == 2.0 and m.records["val/return_std"][0] == 1.0
    assert m.records["val/length"][0] == 20.0 and m.records["val/return"][1]["prog_bar"]
    assert m.records["val/return"][1]["batch_size"] == 2 and m.records["val/return"][1]["sync_dist"]
    m.test_step(batch, 0)
    assert not m.records["test/return"][1]["prog_bar"]
    assert m.predict_step(batch, 0) == [{"index": 0, "return": 1.0, "length": 10},
                                        {"index": 1, "return": 3.0, "length": 30}]
