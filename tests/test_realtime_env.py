"""The virtual-time realtime simulator (datamodules/realtime_env.py): exact action intervals per mode, the landing
convention, the official frame simulation's accounting, single-slot vs FIFO, merged transitions and their semi-MDP
discount in the replay buffer, the spec's fixed-policy Freeway table, bad input."""
import collections

import numpy as np
import pytest

from datamodules.realtime_env import RealtimeSimulator, TransitionMerger, play_realtime_episodes
from datamodules.replay import ReplayBuffer

BIG = 10**6  # actions = frame numbers


def _run(sim: RealtimeSimulator, frames: int, rewards=None, ends=()):
    """Observation of frame f = [f]; act returns the frame it saw; applied actions and closed transitions."""
    applied, closed = [], []
    for f in range(frames):
        a = sim.begin_frame(np.array([f]), lambda o: int(o[0]))
        applied.append(a if sim.act_frames and sim.act_frames[-1] == sim.frames else None)
        r = 0.0 if rewards is None else rewards[f]
        closed += sim.end_frame(np.array([f + 1]), r, f in ends, False)
        if f in ends:
            sim.start_episode()
    return applied, closed


@pytest.mark.parametrize("k", [1, 2, 4, 8, 16])
def test_staggered_with_k_workers_acts_at_every_frame_after_warm_up(k):
    sim = RealtimeSimulator(BIG, k, k, "staggered", record=True)
    applied, _ = _run(sim, 40 * k)
    assert sim.act_frames[0] == k - 1  # warm-up: k - 1 default frames
    assert set(sim.intervals().tolist()) == {1}
    assert sim.acted == 40 * k - (k - 1) and sim.lost == 0
    # the action on frame f was computed on the observation of frame f - k + 1
    assert all(a == f - k + 1 for f, a in enumerate(applied) if a is not None)


@pytest.mark.parametrize("k", [1, 2, 4, 8, 16])
def test_sequential_acts_every_k_frames(k):
    sim = RealtimeSimulator(BIG, k, 1, "sequential", record=True)
    applied, _ = _run(sim, 40 * k)
    assert set(sim.intervals().tolist()) == ({k} if k > 1 else {1})
    assert sim.acted * k == 40 * k  # act fraction exactly 1/k
    assert all(a == f - k + 1 for f, a in enumerate(applied) if a is not None)


@pytest.mark.parametrize("k", [2, 4, 8, 16])
def test_unstaggered_single_slot_leaves_one_action_per_k_frames_and_a_fifo_one_per_frame(k):
    single = RealtimeSimulator(BIG, k, k, "unstaggered", record=True)
    _run(single, 20 * k)
    assert set(single.intervals().tolist()) == {k}
    assert single.acted == 20 and single.lost == 20 * (k - 1)  # the others were overwritten in the slot
    fifo = RealtimeSimulator(BIG, k, k, "unstaggered", action_slot="fifo", record=True)
    applied, _ = _run(fifo, 20 * k)
    assert set(fifo.intervals().tolist()) == {1} and fifo.lost == 0
    assert max(f - a for f, a in enumerate(applied) if a is not None) == 2 * k - 2  # stale: queued behind


def _official_loop(k: int, noops: int, frames: int):
    """The official simulate_delay_atari.py loop (--delay k --noops n), restated: a FIFO of the last k decision
    observations padded with zeros, the action chosen on its oldest entry, then n default frames inside env.step."""
    f, applied = 0, []
    history = collections.deque([np.zeros(1)] * (k - 1) + [np.array([0])], maxlen=k) if k > 1 else \
        collections.deque([np.array([0])], maxlen=1)
    while f < frames:
        applied.append((f, int(history[0][0])))
        f += 1 + noops  # the action frame and the noops
        history.append(np.array([f]))
    return applied


@pytest.mark.parametrize("k", [1, 2, 5, 8])
@pytest.mark.parametrize("mode", ["sequential", "staggered"])
def test_official_accounting_matches_the_official_frame_simulation(k, mode):
    sim = RealtimeSimulator(BIG, k, 1 if mode == "sequential" else k, mode, accounting="official", record=True)
    applied, _ = _run(sim, 30 * (k + 1))
    ours = [(f, a) for f, a in enumerate(applied) if a is not None]
    ref = [x for x in _official_loop(k, k if mode == "sequential" else 0, 30 * (k + 1))]
    assert ours == ref
    if mode == "sequential":
        assert set(sim.intervals().tolist()) == {k + 1}  # errata 3: acts every k + 1 frames


def test_transitions_merge_default_runs_and_episode_ends_close_them():
    sim = RealtimeSimulator(BIG, 3, 1, "sequential")
    rewards = [float(f) for f in range(20)]
    _, closed = _run(sim, 20, rewards=rewards, ends={13})
    # landings at 2, 5, 8, 11 (episode ends at frame 13), then 16, 19 in the next episode
    first = closed[0]
    assert first.obs[0] == 0 and first.action == 0 and first.next_obs[0] == 3 and first.rewards == [2, 3, 4]
    assert [t.frames for t in closed[:4]] == [3, 3, 3, 3] and closed[3].rewards == [11, 12, 13]
    assert closed[3].terminated and closed[3].next_obs[0] == 14  # the final observation
    assert closed[4].obs[0] == 14 and closed[4].rewards == [16, 17, 18]  # frame 14 + 2 = 16 lands
    assert closed[0].reward(0.5) == pytest.approx(2 + 0.5 * 3 + 0.25 * 4)


def test_semi_mdp_transitions_are_discounted_by_gamma_to_the_frames():
    buf = ReplayBuffer(8, (1,), n_step=2, gamma=0.9, obs_dtype=np.float32)
    for i, frames in enumerate([3, 1, 2]):
        buf.add(np.array([[i]]), np.array([0]), np.array([1.0]), np.array([[i + 1]]), np.array([False]),
                np.array([False]), frames=np.array([frames]))
    out = buf.n_step_targets(np.array([0, 1]))
    assert out["returns"][0] == pytest.approx(1 + 0.9**3) and out["discounts"][0] == pytest.approx(0.9**4)
    assert out["returns"][1] == pytest.approx(1 + 0.9) and out["discounts"][1] == pytest.approx(0.9**3)
    merger = TransitionMerger()
    merger.agent_action(np.zeros(1), 2)
    merger.frame_outcome(np.ones(1), 1.0, False, False)
    assert merger.closed() == []


def test_jitter_pads_staggered_cycles_to_the_longest_inference():
    """Inference of 8 +- 2 frames: staggered workers cycle every 10 frames (max_time), so 10 workers act at every
    frame and 8 at 8 frames in 10; unstaggered workers drift and collide; all seeded."""
    full = RealtimeSimulator(BIG, 8, 10, "staggered", jitter=2, seed=3, record=True)
    _run(full, 400)
    assert set(full.intervals().tolist()) == {1} and full.act_frames[0] == 9
    short = RealtimeSimulator(BIG, 8, 8, "staggered", jitter=2, seed=3, record=True)
    _run(short, 400)
    landings = [range((10 * j) // 8 + 9, 400, 10) for j in range(8)]  # worker j: start floor(10 j / 8), period 10
    assert short.act_frames == sorted(f for r in landings for f in r) and short.lost == 0
    a = RealtimeSimulator(BIG, 8, 8, "unstaggered", jitter=2, seed=3, record=True)
    b = RealtimeSimulator(BIG, 8, 8, "unstaggered", jitter=2, seed=3, record=True)
    _run(a, 400)
    _run(b, 400)
    assert a.act_frames == b.act_frames and a.lost > 0 and a.act_fraction < 0.8


def test_default_behaviours():
    for default, check in (("noop", lambda acts: set(acts) == {0}), ("random", lambda acts: len(set(acts)) == 3),
                           (2, lambda acts: set(acts) == {2})):
        sim = RealtimeSimulator(3, 8, 1, "sequential", default_action=default, seed=0, record=True)
        acts = [sim.begin_frame(np.zeros(1), lambda o: 1) for _ in range(64) if not sim.end_frame(0, 0, False, False)]
        assert check([a for f, a in enumerate(acts) if f % 8 != 7]), default
    sim = RealtimeSimulator(3, 4, 1, "sequential", default_action="repeat", record=True)
    acts = []
    for _ in range(12):
        acts.append(sim.begin_frame(np.zeros(1), lambda o: 2))
        sim.end_frame(0, 0, False, False)
    assert acts == [0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2, 2]


def test_state_dict_resumes_mid_flight():
    a = RealtimeSimulator(BIG, 5, 5, "staggered", jitter=1, seed=1, record=True)
    _run(a, 33)
    b = RealtimeSimulator(BIG, 5, 5, "staggered", jitter=1, seed=99, record=True)
    b.load_state_dict(a.state_dict())
    ra, rb = _run(a, 50), _run(b, 50)
    assert ra[0] == rb[0] and a.act_frames == b.act_frames
    c = RealtimeSimulator(BIG, 4, 5, "staggered", jitter=1, seed=1)
    with pytest.raises(ValueError, match="data.inference_frames=4 but the checkpoint's run used 5"):
        c.load_state_dict(a.state_dict())


def test_freeway_fixed_policy_table_in_shape():
    """The spec's protocol (sticky 0, seeded once with 0, 20 episodes): always-up sequential at k = 8 falls toward
    the noop baseline; staggered at k = 8 keeps the k = 1 return (the spec's prototype: 1.9 and 18.6)."""
    from datamodules.envs import make_vector_env

    env = make_vector_env("MinAtar/Freeway-v1", 1, env_kwargs={"sticky_action_prob": 0.0})
    up = {}
    for mode, k in (("staggered", 1), ("sequential", 8), ("staggered", 8)):
        sim = RealtimeSimulator(3, k, 1 if mode == "sequential" else k, mode)
        up[mode, k] = play_realtime_episodes(env, sim, lambda o: 1, 20, seed=0)
    env.close()
    k1 = up["staggered", 1]["returns"].mean().item()
    assert k1 == pytest.approx(18.6)
    assert up["sequential", 8]["returns"].mean().item() == pytest.approx(1.85)
    assert up["staggered", 8]["returns"].mean().item() == pytest.approx(k1)
    assert up["sequential", 8]["act_fraction"].mean().item() == pytest.approx(0.125, abs=1e-3)
    assert up["staggered", 8]["act_fraction"].min().item() > 0.99


@pytest.mark.parametrize("kwargs, needle", [
    (dict(inference_frames=0), "inference_frames must be an integer >= 1, got 0"),
    (dict(n_workers=0), "n_workers must be an integer >= 1, got 0"),
    (dict(mode="async"), "mode='async'; expected one of sequential, staggered, unstaggered"),
    (dict(default_action="left"), "default_action='left'; expected one of noop, random, repeat or an action index"),
    (dict(default_action=7), "default_action=7"),
    (dict(mode="sequential", n_workers=4), "sequential interaction has one inference worker"),
    (dict(accounting="paper"), "accounting='paper'"),
])
def test_bad_input_names_the_value(kwargs, needle):
    args = dict(inference_frames=4, n_workers=1, mode="staggered") | kwargs
    with pytest.raises(ValueError, match=None) as err:
        RealtimeSimulator(3, **args)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_a_preempted_staggered_run_resumed_mid_epoch_equals_an_uninterrupted_one(tmp_path):
    """Virtual time is exactly replayable: SIGTERM after update 130 (epoch 2 of 3), resume with --ckpt_path last; the
    networks, Adam, the workers in flight and the episodes end as in the uninterrupted run."""
    import torch

    from tests.helpers import signal_and_resume

    common = ["fit", "--config", "recipes/realtime_dqn_freeway_staggered.yaml", "--trainer.max_epochs=3",
              "--data.init_args.inference_frames=4", "--data.init_args.n_workers=4", "--data.init_args.jitter=1",
              "--data.init_args.warmup_steps=200", "--data.init_args.steps_per_epoch=400",
              "--data.init_args.capacity=2000", "--data.init_args.epsilon_decay_steps=600",
              "--data.init_args.eval_episodes=0", "--model.init_args.target_update_period=20",
              "--trainer.enable_progress_bar=false", "--checkpoint.every_n_train_steps=1000"]
    a, b = signal_and_resume(tmp_path, common, 130)
    assert a["global_step"] == b["global_step"] == 1 + (1200 - 200) // 4
    for k in a["optimizer_states"][0]["state"]:
        assert torch.equal(a["optimizer_states"][0]["state"][k]["exp_avg"],
                           b["optimizer_states"][0]["state"][k]["exp_avg"])
    da, db = a["RealtimeDataModule"]["ranks"][0], b["RealtimeDataModule"]["ranks"][0]
    assert da["local_steps"] == db["local_steps"] == 1200
    for k in da["buffer"]:  # every transition the staggered workers produced, in order
        va, vb = da["buffer"][k], db["buffer"][k]
        assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, k


def test_trained_comparison_reports_greedy_and_late_training_returns(tmp_path, monkeypatch):
    """The trained part's table and checks from given runs (the training itself is the slow claim run)."""
    import scripts.staggered_compare as sc

    def fake_run(mode, k, seed, frames, out):
        base = {1: 40.0, 4: 10.0, 8: 0.0}[k] + (5.0 if mode == "staggered" and k > 1 else 0.0)
        episodes = [(f, base + (3.0 if f > 0.8 * frames else 0.0) + seed) for f in range(2500, frames + 1, 2500)]
        return {"mode": mode, "k": k, "seed": seed, "seconds": 1.0, "episodes": episodes, "final": base + seed,
                "transfer": {}}

    monkeypatch.setattr(sc, "run_one", fake_run)
    monkeypatch.setattr(sc, "play", lambda *a, **kw: {"return": 0.0})
    monkeypatch.setattr(sc, "RESULTS", tmp_path / "results.md")
    text = sc.trained_part([1, 4, 8], [0, 1], 20_000, 1, tmp_path / "runs", section="trained_test")
    assert "| 4 | 10.50 ± 0.50 (10.0, 11.0) | 15.50 ± 0.50 (15.0, 16.0) | 13.50 ± 0.50 (13.0, 14.0) | " in text
    assert "staggered_gt_sequential_k4 yes" in text and "staggered_gt_sequential_k8_late_training yes" in text
    assert "sequential_k8_within_noise_of_noop yes" in text  # 0.5 +- 0.5 over a 0.0 baseline: within 2 se + 1
    assert (tmp_path / "trained_test.png").stat().st_size > 0 and "<!-- trained_test:start -->" in (
        tmp_path / "results.md").read_text()
