"""The off-policy foundation: epsilon schedule, update schedule, prioritised replay (sum tree, sampling law, weights),
the DQN / double-DQN / C51 update against the pure losses, Atari preprocessing, and a MinAtar run preempted mid-epoch
and resumed equal to an uninterrupted one (buffer, exploration, target network, environments)."""
import numpy as np
import pytest
import torch

from datamodules.replay import PrioritizedReplayBuffer, ReplayBuffer, SumTree
from datamodules.replay_data import ReplayDataModule, TransitionCollector, linear_epsilon
from lightning_modules.layers.value_losses import (categorical_loss, categorical_projection, td_loss,
                                                   td_targets)
from lightning_modules.softmoe_dqn import SoftMoEDQN
from tests.helpers import ddp_signal_and_resume, signal_and_resume


def test_linear_epsilon_is_dopamines_schedule():
    # warm-up 100, decay 1000 to 0.01: 1 until step 100, then linear, 0.01 from step 1100 on
    assert linear_epsilon(0, 100, 1000, 0.01) == 1.0 and linear_epsilon(100, 100, 1000, 0.01) == 1.0
    assert linear_epsilon(600, 100, 1000, 0.01) == pytest.approx(0.01 + 0.99 * 0.5)
    assert linear_epsilon(1100, 100, 1000, 0.01) == pytest.approx(0.01)
    assert linear_epsilon(10**6, 100, 1000, 0.01) == pytest.approx(0.01)
    assert linear_epsilon(5, 0, 0, 0.05) == 0.05


def test_sum_tree_totals_and_search_against_a_cumulative_sum():
    rng = np.random.default_rng(0)
    tree = SumTree(13)
    values = rng.random(13) * (rng.random(13) > 0.3)
    tree.update(np.arange(13), values)
    assert tree.total == pytest.approx(values.sum())
    u = rng.random(2000) * values.sum()
    expected = np.searchsorted(np.cumsum(values), u, side="right")
    assert np.array_equal(tree.find(u), expected)
    assert (values[tree.find(np.linspace(0, values.sum(), 500, endpoint=False))] > 0).all()  # never a zero leaf
    tree.update(np.array([2, 2]), np.array([5.0, 5.0]))  # duplicates: the sums stay right
    values[2] = 5.0
    assert tree.total == pytest.approx(values.sum())


def _fill(buffer, steps, num_envs, rng, done_every=7):
    for t in range(steps):
        obs = np.full((num_envs, 2), t, dtype=np.uint8)
        end = np.full(num_envs, (t + 1) % done_every == 0)
        buffer.add(obs, rng.integers(3, size=num_envs), np.full(num_envs, float(t)), obs + 1, end,
                   np.zeros(num_envs, bool))


def test_prioritised_sampling_follows_the_priorities_and_skips_incomplete_windows():
    rng = np.random.default_rng(1)
    buf = PrioritizedReplayBuffer(40, (2,), num_envs=2, n_step=3, gamma=0.9, seed=0, alpha=1.0, beta=1.0)
    _fill(buf, 30, 2, rng)  # 60 transitions written, 40 kept; the newest 2 x 2 are not complete windows
    lo, hi = buf.sampleable()
    live = np.array([(p % 40) for p in range(lo, hi + 1)])
    assert (buf.tree.leaves(live) == 1.0).all() and buf.tree.total == pytest.approx(len(live))
    prios = np.linspace(0.5, 3.0, len(live))
    buf.update_priorities(live, prios - buf.epsilon)
    prio_of = np.zeros(40)
    prio_of[live] = prios
    counts = np.zeros(40)
    for _ in range(400):
        b = buf.sample(32)
        np.add.at(counts, b["indices"].numpy(), 1)
        w = (prio_of[b["indices"].numpy()] / prios.sum() * len(live)) ** -1.0
        assert torch.allclose(b["weights"], torch.from_numpy((w / w.max()).astype(np.float32)), rtol=1e-5)
    dead = np.setdiff1d(np.arange(40), live)
    assert counts[dead].sum() == 0
    freq = counts[live] / counts.sum()
    assert np.abs(freq - prios / prios.sum()).max() < 0.01
    # n-step returns are those of the uniform buffer
    ref = ReplayBuffer(40, (2,), num_envs=2, n_step=3, gamma=0.9, seed=0)
    _fill(ref, 30, 2, np.random.default_rng(1))
    b = buf.sample(16)
    out = ref.n_step_targets(b["indices"].numpy())
    assert np.allclose(out["returns"], b["returns"].numpy()) and np.allclose(out["discounts"], b["discounts"])


def test_prioritised_state_round_trip_samples_the_same_minibatches():
    rng = np.random.default_rng(2)
    a = PrioritizedReplayBuffer(50, (2,), num_envs=1, n_step=2, seed=3)
    _fill(a, 60, 1, rng)
    a.update_priorities(np.arange(10), np.arange(10) + 1.0)
    b = PrioritizedReplayBuffer(50, (2,), num_envs=1, n_step=2, seed=99)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        x, y = a.sample(8), b.sample(8)
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert a.max_priority == b.max_priority


class _Greedy:
    device = torch.device("cpu")

    def greedy_actions(self, obs):
        return torch.zeros(obs.shape[0], dtype=torch.long)


@pytest.mark.parametrize("num_envs,period,warmup,steps,expected", [(1, 4, 10, 30, 1 + 20 // 4), (2, 0.5, 10, 20, 21),
                                                                   (4, 4, 8, 40, 1 + 32 // 4)])
def test_one_update_per_update_period_environment_steps_after_the_warm_up(num_envs, period, warmup, steps, expected):
    from datamodules.envs import make_vector_env

    env = make_vector_env("MinAtar/Breakout-v1", num_envs)
    buf = ReplayBuffer(1000, env.single_observation_space.shape, num_envs, obs_dtype=bool)
    c = TransitionCollector(env, buf, seed=0, warmup_steps=warmup, epsilon_decay_steps=100, epsilon_end=0.1,
                            update_period=period)
    while True:
        if c.update_due():
            c.updates += 1
            continue
        if c.local_steps >= steps:
            break
        c.step(_Greedy())
    assert c.updates == expected and len(buf) == steps
    env.close()


def test_dqn_double_and_c51_updates_use_the_pure_losses():
    torch.manual_seed(0)
    obs_shape, A = (10, 10, 4), 3
    batch = {"obs": torch.rand(5, *obs_shape) > 0.5, "next_obs": torch.rand(5, *obs_shape) > 0.5,
             "actions": torch.tensor([0, 1, 2, 1, 0]), "returns": torch.randn(5), "discounts": torch.rand(5)}
    for double in (False, True):
        m = SoftMoEDQN(head="flatten", scale=1, double=double, seed=0)
        m.build(obs_shape, A, "bool")
        with torch.no_grad():  # a target network different from the online one
            for p in m.target.parameters():
                p.add_(0.1 * torch.randn_like(p))
        loss, prios, _ = m.loss(batch)
        q, qn_t, qn_o = m.online(batch["obs"]), m.target(batch["next_obs"]), m.online(batch["next_obs"])
        y = td_targets(qn_t, batch["returns"], batch["discounts"], qn_o if double else None)
        assert torch.allclose(loss, td_loss(q, batch["actions"], y, "huber"), atol=1e-6)
        assert torch.allclose(prios, (q.gather(1, batch["actions"][:, None])[:, 0] - y).abs(), atol=1e-6)
    m = SoftMoEDQN(head="flatten", scale=1, distributional=True, atoms=11, v_min=-2, v_max=2, seed=0)
    m.build(obs_shape, A, "bool")
    loss, _, q = m.loss(batch)
    logits, nt = m.online(batch["obs"]), m.target(batch["next_obs"])
    support = torch.linspace(-2, 2, 11)
    best = (nt.softmax(-1) * support).sum(-1).argmax(-1)
    target = categorical_projection(nt.softmax(-1)[torch.arange(5), best], batch["returns"], batch["discounts"],
                                    support)
    assert torch.allclose(loss, categorical_loss(logits, batch["actions"], target), atol=1e-6)
    assert torch.allclose(q, (logits.softmax(-1) * support).sum(-1), atol=1e-6)


@pytest.mark.parametrize("distributional", [False, True])
def test_the_losses_targets_and_priorities_are_float32_under_bf16_autocast(distributional):
    """bf16-mixed: the targets (C51's projection scatters float32 masses: CPU autocast keeps softmax in bf16), the
    loss and the priorities stay float32, with double DQN and prioritised weights."""
    torch.manual_seed(0)
    obs_shape, A = (10, 10, 4), 3
    batch = {"obs": torch.rand(5, *obs_shape) > 0.5, "next_obs": torch.rand(5, *obs_shape) > 0.5,
             "actions": torch.tensor([0, 1, 2, 1, 0]), "returns": torch.randn(5), "discounts": torch.rand(5),
             "weights": torch.rand(5)}
    m = SoftMoEDQN(head="softmoe", scale=1, double=True, distributional=distributional, atoms=11, seed=0)
    m.build(obs_shape, A, "bool")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, priorities, _ = m.loss(batch)
    assert loss.dtype == priorities.dtype == torch.float32 and torch.isfinite(loss)
    ref, _, _ = m.loss(batch)
    assert torch.allclose(loss, ref, rtol=0.1), (loss, ref)


def test_atari_preprocessing_gives_stacked_84x84_uint8_frames():
    dm = ReplayDataModule(env_id="ALE/Pong-v5", atari=True, warmup_steps=10, capacity=100)
    space = dm.observation_space
    assert space.shape == (4, 84, 84) and space.dtype == np.uint8
    env = dm.make_env(1)
    obs, _ = env.reset(seed=[0])
    for _ in range(3):
        obs, *_ = env.step(np.array([1]))
    assert obs.shape == (1, 4, 84, 84) and obs.dtype == np.uint8 and obs.max() > 0
    env.close()
    net = SoftMoEDQN(encoder="nature", head="softmoe", experts=4, hidden=32, scale=1)
    net.build(space.shape, 6, "uint8")
    assert net.online.input_scale == pytest.approx(1 / 255)
    assert net.online(torch.as_tensor(obs)).shape == (1, 6)
    assert net.online.head.moe.tokens == 49  # VALID Nature CNN: 7 x 7 positions of 64 channels


def minatar_states(blob: torch.Tensor) -> list:
    """The game state of every MinAtar copy in a snapshot, comparable (equal generators need not pickle equally)."""
    import pickle

    def plain(v):
        if hasattr(v, "get_state"):
            v = v.get_state()
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return np.asarray(v).tolist() if isinstance(v, np.ndarray) else v

    copies, autoreset = pickle.loads(blob.numpy().tobytes())
    out = [autoreset.tolist()]
    for pickled, extra in copies:
        game = pickle.loads(pickled).unwrapped.game
        out.append(plain([extra.get("np_random"), game.random, game.last_action, vars(game.env)]))
    return out


SMALL = ["--data.init_args.warmup_steps=200", "--data.init_args.steps_per_epoch=400",
         "--data.init_args.capacity=2000", "--data.init_args.epsilon_decay_steps=600",
         "--model.init_args.target_update_period=20", "--trainer.enable_progress_bar=false",
         "--checkpoint.every_n_train_steps=1000"]


@pytest.mark.parametrize("prioritized", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["uniform", "prioritized"])
def test_a_preempted_minatar_run_resumed_mid_epoch_equals_an_uninterrupted_one(prioritized, tmp_path):
    """SIGTERM after update 130 (epoch 2 of 3): checkpoint, exit 143, resume with --ckpt_path last; online and target
    networks, Adam, the replay buffer, its sampler, exploration, MinAtar's state and the episodes end identical."""
    common = ["fit", "--config", "recipes/dqn_softmoe1_minatar.yaml", "--trainer.max_epochs=3", *SMALL,
              f"--data.init_args.prioritized={str(prioritized).lower()}"]
    a, b = signal_and_resume(tmp_path, common, 130)
    assert a["global_step"] == b["global_step"] == 1 + (1200 - 200) // 4 and a["epoch"] == b["epoch"]
    assert any(k.startswith("target.") for k in a["state_dict"])
    for k in a["optimizer_states"][0]["state"]:
        assert torch.equal(a["optimizer_states"][0]["state"][k]["exp_avg"],
                           b["optimizer_states"][0]["state"][k]["exp_avg"])
    da, db = a["ReplayDataModule"]["ranks"][0], b["ReplayDataModule"]["ranks"][0]
    for k in ("obs", "ep_return", "ep_length", "episodes"):
        assert torch.equal(da[k], db[k]), k
    assert minatar_states(da["envs"]) == minatar_states(db["envs"])
    assert da["rng"] == db["rng"] and da["local_steps"] == db["local_steps"] == 1200
    for k in da["buffer"]:
        va, vb = da["buffer"][k], db["buffer"][k]
        assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, k
    ra = (tmp_path / "straight" / "logs" / "version_0" / "episodes.csv").read_text()
    rb = (tmp_path / "resumed" / "logs" / "version_1" / "episodes.csv").read_text()
    assert ra == rb and len(ra.splitlines()) > 20


@pytest.mark.slow
def test_two_ddp_ranks_keep_their_own_replay_and_resume_exactly(tmp_path):
    common = ["fit", "--config", "recipes/dqn_flatten_minatar.yaml", "--trainer.max_epochs=2", *SMALL,
              "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    a, b = ddp_signal_and_resume(tmp_path, common, signal_at=60)
    ranks = a["ReplayDataModule"]["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["buffer"]["obs"], ranks[1]["buffer"]["obs"])
    for ra, rb in zip(ranks, b["ReplayDataModule"]["ranks"]):
        assert torch.equal(ra["buffer"]["obs"], rb["buffer"]["obs"]) and ra["rng"] == rb["rng"]
        assert minatar_states(ra["envs"]) == minatar_states(rb["envs"])


def test_greedy_actions_are_taken_in_float32_under_bf16_autocast():
    """The data module acts inside the training step's autocast; Q-values that bf16 would round into a tie must still
    give the float32 argmax (a tie sends argmax to action 0)."""
    class Probe(torch.nn.Module):
        def forward(self, obs):  # Q = (1, 1.001) * obs: distinct in float32, one bf16 value near 1
            return torch.nn.functional.linear(obs, torch.tensor([[1.0], [1.001]]))

    m = SoftMoEDQN(head="flatten", scale=1, seed=0)
    m.online = Probe()
    obs = torch.ones(3, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m.online(obs).dtype == torch.bfloat16 and m.online(obs).argmax(-1).tolist() == [0, 0, 0]  # the tie
        assert m.greedy_actions(obs).tolist() == [1, 1, 1]
