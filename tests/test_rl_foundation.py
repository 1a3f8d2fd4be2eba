"""The on-policy foundation: GAE, the policy losses and heads against float64 references, the Armijo line search on a
quadratic, environment snapshots and normalisation statistics, rollout shapes and seeding, and the rule that a
rollout is collected with the policy it trains (no stale prefetch)."""
import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from datamodules.envs import NormalizeObservation, NormalizeReward, make_vector_env, restore_envs, snapshot_envs
from datamodules.rollouts import RolloutCollector, gae
from lightning_modules.layers.armijo import Armijo
from lightning_modules.layers.on_policy import head_for
from lightning_modules.layers.policies import ActorCritic, CategoricalHead, DiagGaussianHead
from lightning_modules.layers.policy_losses import (explained_variance, kl_k3, mdpo_loss, normalize_advantages,
                                                    ppo_clip_loss, spma_loss)

D = torch.float64


def test_gae_matches_a_hand_computed_case():
    g, lam = 0.9, 0.5
    r = torch.tensor([[1.0], [0.0], [2.0]], dtype=D)
    v = torch.tensor([[0.5], [1.0], [0.2]], dtype=D)
    done = torch.tensor([[False], [True], [False]])
    last = torch.tensor([3.0], dtype=D)
    adv, ret = gae(r, v, done, last, g, lam)
    d2 = 2.0 + g * 3.0 - 0.2  # step 2 bootstraps from the value after the rollout
    d1 = 0.0 - 1.0  # the episode ended after step 1: no bootstrap
    d0 = 1.0 + g * 1.0 - 0.5
    a2, a1 = d2, d1  # nothing flows back across the episode end
    a0 = d0 + g * lam * a1
    torch.testing.assert_close(adv[:, 0], torch.tensor([a0, a1, a2], dtype=D), rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, adv + v, rtol=0, atol=0)


def _logps(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(n, generator=g, dtype=D) * 2
    new = (old + 0.3 * torch.randn(n, generator=g, dtype=D)).requires_grad_(True)
    adv = torch.randn(n, generator=g, dtype=D)
    return new, old, adv


def test_spma_loss_values_and_its_kl_term_vanishes_with_its_gradient_at_ratio_one():
    new, old, adv = _logps()
    eta = 0.7
    lr = new.detach() - old
    ref = (-lr * adv + ((lr.exp() - 1) - lr) / eta).mean()
    torch.testing.assert_close(spma_loss(new, old, adv, eta), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(spma_loss(new, old, adv, eta, "linear"), (-lr * adv - lr / eta).mean(), rtol=0,
                               atol=1e-12)
    at_one = old.clone().requires_grad_(True)  # r = 1: the first inner step
    loss = spma_loss(at_one, old, adv, eta)
    (grad,) = torch.autograd.grad(loss, at_one)
    assert float(kl_k3(at_one.detach(), old).abs().max()) == 0.0
    torch.testing.assert_close(loss, torch.zeros((), dtype=D), rtol=0, atol=1e-15)
    torch.testing.assert_close(grad, -adv / len(adv), rtol=0, atol=1e-15)  # the pure policy gradient
    (g_lin,) = torch.autograd.grad(spma_loss(at_one, old, adv, eta, "linear"), at_one)
    torch.testing.assert_close(g_lin, (-adv - 1 / eta) / len(adv), rtol=0, atol=1e-15)  # linear KL: not at r = 1
    with pytest.raises(ValueError, match="eta must be > 0"):
        spma_loss(new, old, adv, 0.0)


def test_ppo_and_mdpo_losses_against_hand_computations():
    new, old, adv = _logps(seed=1)
    r = (new.detach() - old).exp()
    clipped = [min(ri * ai, min(max(ri, 0.8), 1.2) * ai) for ri, ai in zip(r.tolist(), adv.tolist())]
    torch.testing.assert_close(ppo_clip_loss(new, old, adv, 0.2), torch.tensor(-np.mean(clipped), dtype=D), rtol=0,
                               atol=1e-12)
    eta = 2.0
    mdpo = [-ri * ai + ri * math.log(ri) / eta for ri, ai in zip(r.tolist(), adv.tolist())]
    torch.testing.assert_close(mdpo_loss(new, old, adv, eta), torch.tensor(np.mean(mdpo), dtype=D), rtol=0,
                               atol=1e-12)
    # gradients: finite differences of the float64 losses
    for fn in (lambda x: ppo_clip_loss(x, old, adv, 0.2), lambda x: mdpo_loss(x, old, adv, eta),
               lambda x: spma_loss(x, old, adv, 0.5)):
        assert torch.autograd.gradcheck(fn, (new,))


def test_advantage_normalisation_uses_the_unbiased_std_and_explained_variance():
    a = torch.tensor([1.0, 2.0, 4.0], dtype=D)
    torch.testing.assert_close(normalize_advantages(a), (a - a.mean()) / (a.std(unbiased=True) + 1e-8))
    y = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=D)
    assert float(explained_variance(y, y)) == 1.0 and float(explained_variance(torch.zeros_like(y) + 2.5, y)) == 0.0


def test_heads_match_torch_distributions_in_float64():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=g, dtype=D)
    acts = torch.randint(0, 4, (5,), generator=g)
    ref = torch.distributions.Categorical(logits=logits)
    cat = CategoricalHead()
    torch.testing.assert_close(cat.log_prob(logits, acts), ref.log_prob(acts))
    torch.testing.assert_close(cat.entropy(logits), ref.entropy())
    head = DiagGaussianHead(3, log_std_init=-0.5).double()
    mean = torch.randn(5, 3, generator=g, dtype=D)
    a = torch.randn(5, 3, generator=g, dtype=D)
    normal = torch.distributions.Normal(mean, head.log_std.exp())
    torch.testing.assert_close(head.log_prob(mean, a), normal.log_prob(a).sum(-1))
    torch.testing.assert_close(head.entropy(mean), normal.entropy().sum(-1))


def test_sampling_follows_the_policy_and_only_its_generator():
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3]])).expand(20000, 3)
    draws = CategoricalHead().sample(logits, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=3).double() / len(draws)
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.6, 0.3], dtype=D), rtol=0, atol=0.015)
    torch.manual_seed(123)  # the global RNG plays no part
    again = CategoricalHead().sample(logits, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    head = DiagGaussianHead(2, log_std_init=math.log(0.5))
    x = head.sample(torch.ones(20000, 2), torch.Generator().manual_seed(1))
    assert abs(float(x.mean()) - 1) < 0.02 and abs(float(x.std()) - 0.5) < 0.02


def test_armijo_minimises_a_quadratic_with_accepted_steps_satisfying_the_condition():
    torch.manual_seed(0)
    A = torch.tensor([[3.0, 0.5], [0.5, 1.0]], dtype=D)
    b = torch.tensor([1.0, -2.0], dtype=D)
    x = torch.zeros(2, dtype=D, requires_grad=True)
    opt = Armijo([x], alpha_max=10.0, c=0.5, beta=0.9)

    def f():
        return 0.5 * x @ A @ x - b @ x

    def closure(backward=True):
        if backward:
            opt.zero_grad()
            loss = f()
            loss.backward()
            return loss
        return f()

    for _ in range(60):
        before = float(f())
        gsq = float(torch.autograd.functional.jacobian(lambda z: 0.5 * z @ A @ z - b @ z, x.detach()).square().sum())
        opt.step(closure)
        s = opt.state["search"]
        assert s["accepted"] and float(f()) <= before - 0.5 * s["step"] * gsq + 1e-12
    torch.testing.assert_close(x.detach(), torch.linalg.solve(A, b), rtol=0, atol=1e-8)
    # a search that cannot succeed leaves the last rejected trial (official) or restores (option)
    y = torch.ones(1, dtype=D, requires_grad=True)
    for mode, expect in (("last_trial", 1 - 1e6 * 0.9 ** 3 * 2), ("restore", 1.0)):
        y.data.fill_(1.0)
        bad = Armijo([y], alpha_max=1e6, max_trials=3, on_failure=mode)

        def cl(backward=True):
            if backward:
                bad.zero_grad()
                loss = y.square().sum()
                loss.backward()
                return loss
            return y.square().sum() * 0 + 1e9  # never acceptable
        bad.step(cl)
        assert bad.state["search"]["accepted"] is False
        torch.testing.assert_close(y.detach(), torch.tensor([expect], dtype=D))


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Acrobot-v1", "InvertedPendulum-v5", "MinAtar/Breakout-v1"])
def test_a_snapshot_restores_the_environments_exactly(env_id):
    norm = not env_id.startswith("MinAtar")  # frames are not normalised

    def fresh():
        env = make_vector_env(env_id, 3, normalize_observation=norm, normalize_reward=True)
        env.reset(seed=[10, 11, 12])
        env.action_space.seed(0)
        return env

    a, b = fresh(), make_vector_env(env_id, 3, normalize_observation=norm, normalize_reward=True)
    b.reset(seed=[99, 98, 97])
    for _ in range(40):
        _, _, te, tr, _ = a.step(a.action_space.sample())
        if (te | tr).any():
            a.reset(options={"reset_mask": te | tr})
    restore_envs(b, snapshot_envs(a))
    from datamodules.envs import find_wrapper
    for kind in (NormalizeObservation, NormalizeReward) if norm else (NormalizeReward,):
        find_wrapper(b, kind).load_state_dict(find_wrapper(a, kind).state_dict())
    for _ in range(300):
        act = a.action_space.sample()
        x, y = a.step(act), b.step(act)
        for i in range(4):
            assert np.array_equal(x[i], y[i])
        done = x[2] | x[3]
        if done.any():
            assert np.array_equal(a.reset(options={"reset_mask": done})[0], b.reset(options={"reset_mask": done})[0])


def _with_prior(x):
    """Mean and variance of ``x`` (rows) merged with the running statistics' prior (mean 0, var 1, count 1e-4)."""
    n, eps = len(x), 1e-4
    m, v = x.mean(0), x.var(0)
    return n * m / (n + eps), (eps + n * v + eps * n / (n + eps) * m ** 2) / (n + eps)


def test_normalisation_wrappers_against_numpy():
    """The running statistics equal numpy's mean / variance of everything seen (merged with the 1e-4 prior)."""
    env = make_vector_env("CartPole-v1", 2, normalize_observation=True, normalize_reward=True, gamma=0.9)
    raw_env = make_vector_env("CartPole-v1", 2)
    o_n, _ = env.reset(seed=[0, 1])
    o, _ = raw_env.reset(seed=[0, 1])
    seen, returns, acc = [o], [], np.zeros(2)
    for t in range(12):
        a = np.array([t % 2, (t + 1) % 2])
        o_n, r_n, te, tr, info = env.step(a)
        o, r, *_ = raw_env.step(a)
        assert not (te | tr).any()
        seen.append(o)
        acc = acc * 0.9 + r
        returns.append(acc.copy())
        all_obs, all_ret = np.concatenate(seen), np.concatenate(returns)
        mean, var = _with_prior(all_obs.astype(np.float64))
        np.testing.assert_allclose(env.env.rms.mean, mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(env.env.rms.var, var, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(o_n, np.clip((o - mean) / np.sqrt(var + 1e-8), -10, 10), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(r_n, np.clip(r / np.sqrt(_with_prior(all_ret)[1] + 1e-8), -10, 10), rtol=1e-9)
        np.testing.assert_array_equal(info["raw_reward"], r)
    state = {k: v.clone() for k, v in env.env.state_dict().items()}
    other = make_vector_env("CartPole-v1", 2, normalize_observation=True)
    other.load_state_dict(state)
    np.testing.assert_array_equal(other.rms.mean, env.env.rms.mean)
    np.testing.assert_array_equal(other.rms.var, env.env.rms.var)
    assert other.rms.count == env.env.rms.count


def test_head_for_checks_the_requested_head():
    assert head_for(gym.spaces.Discrete(3), "auto") == ("categorical", 3)
    assert head_for(gym.spaces.Box(-1, 1, (2,)), "gaussian") == ("gaussian", 2)
    with pytest.raises(ValueError, match="model.action_head=categorical but the environment has continuous actions"):
        head_for(gym.spaces.Box(-1, 1, (2,)), "categorical")


class _Policy:
    device = torch.device("cpu")

    def __init__(self, obs_dim, kind, dim):
        torch.manual_seed(0)
        self.net = ActorCritic(obs_dim, kind, dim)

    def act(self, obs, noise):
        return self.net.act(obs, noise)

    def value(self, obs):
        return self.net.value(obs)

    def act_deterministic(self, obs):
        return self.net.act_deterministic(obs)


@pytest.mark.parametrize("env_id, kind, dim, obs_dim", [("CartPole-v1", "categorical", 2, 4),
                                                        ("InvertedPendulum-v5", "gaussian", 1, 4)])
def test_rollout_shapes_and_seeding(env_id, kind, dim, obs_dim):
    def rollouts(seed, n=2):
        c = RolloutCollector(make_vector_env(env_id, 3), n_steps=64, gamma=0.99, gae_lambda=0.95, seed=seed)
        policy = _Policy(obs_dim, kind, dim)
        return [c.collect(policy) for _ in range(n)], c

    (r0, r1), c = rollouts(5)
    assert r0["obs"].shape == (64, 3, obs_dim) and r0["log_probs"].shape == (64, 3)
    assert r0["actions"].shape == ((64, 3) if kind == "categorical" else (64, 3, dim))
    assert int(r0["iteration"]) == 0 and int(r1["iteration"]) == 1 and c.env_steps == 2 * 64 * 3
    for k in ("advantages", "returns", "values", "rewards"):
        assert r0[k].shape == (64, 3) and torch.isfinite(r0[k]).all()
    assert not torch.equal(r0["obs"][:, 0], r0["obs"][:, 1])  # each copy its own seed
    (s0, s1), _ = rollouts(5)
    for k in r0:
        assert torch.equal(r0[k], s0[k]) and torch.equal(r1[k], s1[k]), k
    (o0, _), _ = rollouts(6)
    assert not torch.equal(o0["obs"], r0["obs"])


def test_worker_process_envs_collect_and_resume_by_reseeding():
    """asynchronous=True: the same rollouts as the synchronous envs; their state cannot be snapshotted, so a resume
    restores everything learnable (noise, statistics, counters) and restarts the episodes from seeds that depend on
    the resumed iteration (documented in datamodules.rollouts)."""
    sync = RolloutCollector(make_vector_env("CartPole-v1", 2), 32, 0.99, 0.95, seed=3)
    workers = RolloutCollector(make_vector_env("CartPole-v1", 2, asynchronous=True, normalize_observation=True),
                               32, 0.99, 0.95, seed=3)
    plain = RolloutCollector(make_vector_env("CartPole-v1", 2, asynchronous=True), 32, 0.99, 0.95, seed=3)
    policy = _Policy(4, "categorical", 2)
    a, b = sync.collect(policy), plain.collect(policy)
    for k in ("obs", "actions", "rewards", "dones"):
        assert torch.equal(a[k], b[k]), k
    workers.collect(policy)
    state = workers.state_dict()
    assert "envs" not in state and state["iteration"] == 1 and "normalize_observation" in state
    fresh = RolloutCollector(make_vector_env("CartPole-v1", 2, asynchronous=True, normalize_observation=True),
                             32, 0.99, 0.95, seed=99)
    fresh.load_state_dict(state, reseed=3)
    assert fresh.iteration == 1 and torch.equal(fresh.noise.get_state(), workers.noise.get_state())
    from datamodules.envs import find_wrapper
    restored = find_wrapper(fresh.env, NormalizeObservation).rms.count  # the saved statistics + the 2 reset rows
    assert restored == pytest.approx(float(state["normalize_observation"]["count"]) + 2) and restored > 60
    r = fresh.collect(policy)
    assert int(r["iteration"]) == 1 and r["obs"].shape == (32, 2, 4)
    for c in (sync, workers, plain, fresh):
        c.env.close()
