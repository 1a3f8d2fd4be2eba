"""The max_time staggering schedule on an injected virtual clock (datamodules/stagger.py), and the worker processes
that run it on the real clock (datamodules/async_inference.py): publication, a worker crash reported, no orphans
when the learner dies or is stopped.  No wall-clock time is asserted: the timing ratios are the benchmark's
(scripts/bench_staggering.py)."""
import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from datamodules.stagger import StaggerState, simulate, single_slot

ROOT = Path(__file__).resolve().parents[1]
N, T = 8, 0.16


def _gaps(out, after=0.0):
    t = np.array([p[0] for p in out["publish"] if p[0] >= after])
    return np.diff(t)


@pytest.mark.parametrize("respread", ["even", "official"])
def test_constant_inference_publishes_every_t_max_over_n(respread):
    out = simulate(N, T, lambda i, c: T, until=5.0, respread=respread)
    gaps = _gaps(out, after=T)
    assert np.allclose(gaps, T / N) and out["t_max"] == T
    ages = [p[0] - p[2] for p in out["publish"]]
    assert np.allclose(ages, T)  # every action is one t_max old
    assert single_slot([p[0] for p in out["publish"]], T / N)["act_fraction"] == 1.0


def test_jitter_within_the_bound_keeps_exact_spacing():
    rng = np.random.default_rng(0)
    out = simulate(N, 1.1 * T, lambda i, c: T * rng.uniform(0.9, 1.1), until=5.0)
    assert out["t_max"] == 1.1 * T and np.allclose(_gaps(out, after=1.1 * T), 1.1 * T / N)


def _overrun(i, c):
    return 2 * T if (i, c) == (3, 5) else T


def test_even_respread_absorbs_a_2x_overrun_within_one_cycle():
    out = simulate(N, T, _overrun, until=5.0, respread="even")
    assert out["t_max"] == 2 * T
    t_over = [p[0] for p in out["publish"] if p[1] == 3][5]
    # from the overrun on, every gap is the new t_max / N: even spacing is restored at once
    assert np.allclose(_gaps(out, after=t_over), 2 * T / N)
    t = [p[0] for p in out["publish"]]
    assert single_slot(t, T / N)["lost"] == 0


@pytest.mark.parametrize("n", [2, 3, 8, 32])
@pytest.mark.parametrize("factor", [1.05, 1.2, 1.5, 2.0, 3.0])
def test_even_respread_restores_even_spacing_after_any_overrun_within_one_cycle(n, factor):
    """Whatever the overrun and whichever worker, one new cycle after it every gap is t_max_new / N, and no worker
    publishes twice in a row (no action lost to a 0 gap)."""
    for w in (0, n // 2, n - 1):
        out = simulate(n, 1.0, lambda i, c: factor if (i, c) == (w, 4) else 1.0, until=20.0, respread="even")
        assert out["t_max"] == factor
        t_over = [p[0] for p in out["publish"] if p[1] == w][4]
        gaps = _gaps(out, after=t_over + factor)
        assert len(gaps) > 2 * n and np.allclose(gaps, factor / n), (w, gaps.min(), gaps.max())


def test_official_respread_synchronises_the_workers_after_a_2x_overrun():
    """Errata 1: D[j] += ((i - j) mod N) delta / N with delta = t_max puts every worker on the same phase."""
    out = simulate(N, T, _overrun, until=5.0, respread="official")
    t_over = [p[0] for p in out["publish"] if p[1] == 3][5]
    later = np.array([p[0] for p in out["publish"] if p[0] > t_over + 2 * T])
    assert out["t_max"] == 2 * T
    groups = np.unique(np.round(later, 9))
    assert len(groups) <= len(later) / (N - 1)  # at most two distinct times per cycle of N publications
    even = single_slot([p[0] for p in simulate(N, T, _overrun, 5.0, "even")["publish"]], T / N)
    official = single_slot(list(later), T / N)
    assert official["lost"] > 0.75 * len(later) and even["lost"] == 0


def test_single_slot_counts_overwritten_actions():
    out = single_slot([0.001, 0.002, 0.015, 0.031], 0.01)
    assert out == {"act_fraction": 0.75, "lost": 1, "frames": 4}


@pytest.mark.parametrize("kwargs, needle", [(dict(n_workers=0), "n_workers must be an integer >= 1, got 0"),
                                            (dict(t_max=0.0), "t_max"),
                                            (dict(respread="fast"), "respread='fast'; expected one of even, official")])
def test_bad_schedule_input_is_named(kwargs, needle):
    args = dict(n_workers=4, t_max=0.1) | kwargs
    with pytest.raises(ValueError) as err:
        StaggerState(**args)
    assert needle in str(err.value)


# ------------------------------------------------------------------------------------------------ real processes
SCRIPT = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
from datamodules.async_inference import Channels, EnvLoop, InferencePool
from datamodules.envs import make_vector_env

def boom():
    raise RuntimeError("the network could not be built")

if __name__ == "__main__":
    mode = sys.argv[1]
    env = make_vector_env("MinAtar/Freeway-v1", 1)
    obs, _ = env.reset(seed=[0])
    ch = Channels(env.single_observation_space.shape, env.single_observation_space.dtype, 3, 0.03)
    pool = InferencePool(ch, net_factory=boom if mode == "crash" else None, num_actions=3, sleep=0.03)
    if mode == "sigterm":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        pool.start()
        print("pids", *pool.pids, flush=True)
        loop = EnvLoop(env, obs, ch, 0.01)
        loop.run(1.0 if mode == "ok" else 60.0, pool)
        pubs = ch.publications()
        print("acted", loop.stats["acted"], "frames", loop.stats["frames"], "publications", len(pubs),
              "workers", len(set(pubs[:, 1].astype(int).tolist())), flush=True)
    finally:
        pool.close()
"""


def _start(tmp_path, mode):
    script = tmp_path / "pool.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    return subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _pids(proc):
    line = proc.stdout.readline()
    assert line.startswith("pids"), (line, proc.stderr.read() if proc.poll() is not None else "")
    return [int(x) for x in line.split()[1:]]


def _gone(pids, seconds=10.0):
    from datamodules.processes import worker_pids_alive

    deadline = time.time() + seconds
    while worker_pids_alive(pids) and time.time() < deadline:
        time.sleep(0.1)
    return not worker_pids_alive(pids)


def test_worker_processes_act_in_the_environment_and_end_with_the_run(tmp_path):
    proc = _start(tmp_path, "ok")
    pids = _pids(proc)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    words = out.split()
    acted, frames, pubs, workers = (int(words[words.index(k) + 1]) for k in ("acted", "frames", "publications",
                                                                             "workers"))
    assert acted > 0 and pubs >= acted and workers == 3 and frames > acted
    assert _gone(pids)


def test_a_crashing_worker_stops_the_run_with_its_error(tmp_path):
    proc = _start(tmp_path, "crash")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "inference worker" in err and "the network could not be built" in err


def test_no_orphans_when_the_learner_is_killed(tmp_path):
    proc = _start(tmp_path, "long")
    pids = _pids(proc)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: the workers notice the pipe's end
    proc.wait(30)
    assert _gone(pids), "inference workers outlived their parent"


@pytest.mark.slow
@pytest.mark.parametrize("sig, mode", [(signal.SIGTERM, "sigterm"), (signal.SIGINT, "long")])
def test_sigterm_and_ctrl_c_stop_the_workers(sig, mode, tmp_path):
    proc = _start(tmp_path, mode)
    pids = _pids(proc)
    time.sleep(0.5)
    os.kill(proc.pid, sig)
    proc.communicate(timeout=30)
    assert proc.returncode != 0 and _gone(pids)


# ------------------------------------------------------------------------------------------------ inference scaling
def test_inference_scaling_script_converts_forward_times_to_k_and_workers(tmp_path):
    from scripts.bench_inference_scaling import main, simulate as act_fraction

    assert act_fraction(4, 0, 1, "sequential") == pytest.approx(0.25, abs=2e-3)
    assert act_fraction(5, 2, 7, "staggered") == 1.0 and act_fraction(5, 2, 5, "staggered") < 0.8  # N_I < slowest: gaps
    main(["--scales", "1", "2", "--budget", "0.05", "--frame-ms", "0.5", "--no-docs", "--out", str(tmp_path)])
    rows = list(csv.DictReader((tmp_path / "inference_scaling.csv").open()))
    assert [int(r["scale"]) for r in rows] == [1, 2] and int(rows[1]["params"]) > int(rows[0]["params"])
    for r in rows:
        k, n = int(r["k"]), int(r["n_workers"])
        assert k == max(1, math.ceil(float(r["median_ms"]) / 0.5)) and n >= k
        assert float(r["staggered_act_fraction"]) == 1.0
        assert float(r["sequential_act_fraction"]) <= 1 / k + 0.05
    assert (tmp_path / "inference_scaling.png").stat().st_size > 0


# ------------------------------------------------------------------------------------------------ the env loop
class _CountingEnv:
    """A one-copy vector env whose observation is the frame number within the episode, reward 1 per frame and the
    action it was given recorded; episodes end after ``length`` frames."""

    def __init__(self, length):
        import gymnasium as gym

        self.single_action_space, self.length, self.t, self.actions = gym.spaces.Discrete(3), length, 0, []

    def reset(self, seed=None):
        self.t = 0
        return np.array([[0.0]], dtype=np.float32), {}

    def step(self, action):
        self.actions.append(int(action[0]))
        self.t += 1
        done = self.t >= self.length
        return (np.array([[float(self.t)]], dtype=np.float32), np.array([1.0]), np.array([done]), np.array([False]),
                {})


def test_env_loop_applies_published_actions_once_and_merges_default_frames():
    from datamodules.async_inference import Channels, EnvLoop

    env = _CountingEnv(length=6)
    ch = Channels((1,), np.float32, 2, 0.01)
    out = []
    loop = EnvLoop(env, env.reset()[0], ch, 0.01, on_transition=out.append)
    loop.step()  # frame 0: nothing published -> noop
    ch.publish(2, 1, 0, 0)  # computed on frame 0's observation
    loop.step()  # frame 1: applies it
    loop.step()  # frame 2: applied once only -> noop, merged into the open transition
    ch.publish(1, 1, 1, 1)
    loop.step()  # frame 3: closes the first transition
    assert env.actions == [0, 2, 0, 1]
    (t,) = out
    assert (t.obs[0], t.action, t.next_obs[0], t.frames, t.rewards) == (0.0, 2, 1.0, 2, [1.0, 1.0])
    assert loop.stats["acted"] == 2 and loop.stats["delays"] == [1, 2]
    ch.publish(2, 2, 3, 0)
    loop.step()  # frame 4
    loop.step()  # frame 5: the episode ends (6 frames) and closes the open transition with its final observation
    assert out[-1].terminated and out[-1].next_obs[0] == 6.0 and out[-1].frames == 2
    ch.publish(1, 2, 5, 1)  # computed on the last episode's frame 5: it lands, but is no transition of this one
    loop.step()
    ch.publish(2, 2, 6, 0)  # on the new episode's first observation
    loop.step()
    ch.publish(0, 3, 7, 1)
    loop.step()
    assert env.actions[-3:] == [1, 2, 0] and len(out) == 4 and out[-1].obs[0] == 0.0 and out[-1].next_obs[0] == 1.0
