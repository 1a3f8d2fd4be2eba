"""The replay buffer: n-step returns against hand computations (episode ends, truncation), sampling only complete
windows that are still stored, uint8 storage and its stated size, and a restored buffer sampling the same batches."""
import numpy as np
import pytest
import torch

from datamodules.replay import ReplayBuffer, describe_memory


def _fill(buf, steps):
    """Two envs; env 0 rewards 1, 2, 3, ... and terminates at its step 1; env 1 rewards 10, 20, ... and is truncated
    at its step 2.  Observations encode (env, step)."""
    for t in range(steps):
        obs = np.array([[t], [100 + t]], dtype=np.uint8)
        buf.add(obs, np.array([t, t]), np.array([1.0 + t, 10.0 * (t + 1)]), obs + 1,
                terminated=np.array([t == 1, False]), truncated=np.array([False, t == 2]))


def test_n_step_targets_match_hand_computations():
    g = 0.5
    buf = ReplayBuffer(64, (1,), num_envs=2, n_step=3, gamma=g)
    _fill(buf, 6)
    logical = np.array([0, 2, 1, 3, 5, 6])  # env 0 t=0, env 0 t=1, env 1 t=0, env 1 t=1, env 1 t=2, env 0 t=3
    out = buf.n_step_targets(logical)
    want_returns = [1 + g * 2,  # env 0 from t=0: stops at the termination after t=1
                    2,  # env 0 from t=1: terminates at once
                    10 + g * 20 + g * g * 30,  # env 1 from t=0: three steps, the last one truncated
                    20 + g * 30,  # env 1 from t=1: stops at the truncation
                    30,  # env 1 from t=2: truncated at once
                    4 + g * 5 + g * g * 6]  # env 0 from t=3: a full window
    np.testing.assert_allclose(out["returns"], want_returns, rtol=1e-6)
    np.testing.assert_allclose(out["discounts"], [0, 0, g ** 3, g ** 2, g, g ** 3])  # 0 after a termination
    np.testing.assert_array_equal(out["next_obs"][:, 0], [2, 2, 103, 103, 103, 6])  # truncation: its final obs


def test_sampling_covers_only_complete_stored_windows():
    buf = ReplayBuffer(20, (1,), num_envs=2, n_step=3, gamma=0.9, seed=1)
    assert not buf.can_sample()
    _fill(buf, 2)
    assert not buf.can_sample()  # 2 steps per env: no 3-step window yet
    with pytest.raises(RuntimeError, match="no complete 3-step window"):
        buf.sample(4)
    _fill(buf, 25)  # 54 transitions written into 20 slots
    lo, hi = buf.sampleable()
    assert (lo, hi) == (54 - 20, 54 - 1 - 4)
    idx = buf.sample(4000)["indices"].numpy()
    newest = {(54 - 1 - k) % 20 for k in range(4)}  # each env's two newest steps: windows incomplete
    assert set(idx.tolist()) == set(range(20)) - newest


def test_frames_stay_uint8_and_the_memory_is_stated():
    buf = ReplayBuffer(1000, (10, 10, 4), num_envs=4, obs_dtype=np.uint8)
    assert buf.obs.dtype == np.uint8 and buf.bytes_per_transition == 2 * 400 + 8 + 4 + 1 + 1 + 4  # + frames spanned
    assert describe_memory(buf) == "replay: 1,000 transitions x 818 bytes = 0.8 MiB"
    with pytest.raises(ValueError, match="capacity 3 must hold"):
        ReplayBuffer(3, (1,), num_envs=2, n_step=2)


def test_a_restored_buffer_samples_the_same_batches():
    a = ReplayBuffer(16, (1,), num_envs=2, n_step=2, gamma=0.9, seed=3)
    _fill(a, 11)
    a.sample(5)
    b = ReplayBuffer(16, (1,), num_envs=2, n_step=2, gamma=0.9, seed=99)
    b.load_state_dict({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in a.state_dict().items()})
    for _ in range(3):
        x, y = a.sample(7), b.sample(7)
        for k in x:
            assert torch.equal(x[k], y[k]), k
    _fill(a, 3)
    _fill(b, 3)
    assert torch.equal(a.sample(9)["returns"], b.sample(9)["returns"])
