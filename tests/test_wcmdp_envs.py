"""The machine-replacement environments (spec fair_wcmdp.md 1.5): the count-proportion observation and the official
action decoding, and Monte-Carlo returns of the joint environment against exact policy evaluation."""
import numpy as np
import pytest

from datamodules.wcmdp import JointMDP, machine_replacement_arm, machine_replacement_arms
from datamodules.wcmdp_envs import CountProportionEnv, JointStateEnv
from lightning_modules.fair_wcmdp_lp import evaluate_policy


def test_count_proportion_observation_and_decoding():
    env = CountProportionEnv(machine_replacement_arm(), machine_range=(4, 7), resource_range=(1, 2))
    seen = set()
    for seed in range(30):
        obs, info = env.reset(seed=seed)
        seen.add(info["n_arms"])
        assert obs[:3].sum() == pytest.approx(1.0) and obs[3] == pytest.approx(info["budget"] / info["n_arms"])
    assert seen == {4, 5, 6, 7}
    env.reset(seed=0, options={"n_arms": 6, "budget": 2})
    env.local[:] = [0, 2, 2, 1, 2, 0]
    assert env.decode([0.3, 0.3, 0.3, 0.0]).sum() == 0  # budget share 0: nobody
    for _ in range(20):
        rep = env.decode([0.0, 0.0, 1.0, 1.0])  # all priority on the worst state, the whole budget
        assert rep.sum() == 2 and set(np.flatnonzero(rep)) <= {1, 2, 4}
    rep = env.decode([1.0, 0.0, 0.0, 0.4])  # floor(0.4 * 3) = 1 replacement, from state 0
    assert rep.sum() == 1 and np.flatnonzero(rep)[0] in (0, 5)
    env.local[:] = 1
    assert env.decode([1.0, 0.0, 0.0, 1.0]).sum() == 2  # the wanted state is empty: fall back to the proportions
    obs, reward, term, trunc, info = env.step([0.0, 0.0, 0.0, 0.0])
    assert reward == pytest.approx(env.arm_rewards.mean() + 1.0) and len(env.arm_rewards) == 6


def _worst_first_policy(mdp):
    """Replace the lowest-index arm in the last local state, if any (a joint-state policy)."""
    pi = np.zeros((mdp.n_states, mdp.n_actions))
    for s, state in enumerate(mdp.states):
        worn = np.flatnonzero(state == mdp.n_local - 1)
        want = np.zeros(mdp.n_arms, dtype=np.int64)
        if len(worn):
            want[worn[0]] = 1
        pi[s, [tuple(a) for a in mdp.actions.tolist()].index(tuple(want))] = 1.0
    return pi


def test_joint_env_monte_carlo_returns_match_exact_evaluation():
    arms = machine_replacement_arms(2, prob_remain=[0.9, 0.6])
    mdp = JointMDP(arms, budget=1, gamma=0.9)
    pi = _worst_first_policy(mdp)
    exact = evaluate_policy(mdp, pi)
    env = JointStateEnv(arms, budget=1, episode_length=150, reward_offset=0.0)
    index = {tuple(s): j for j, s in enumerate(mdp.states.tolist())}
    returns = []
    env.reset(seed=0)
    for _ in range(1500):
        env.reset()
        total, disc = np.zeros(2), 1.0
        for _t in range(150):
            a = int(pi[index[tuple(env.local.tolist())]].argmax())
            _, _, _, trunc, info = env.step(a)
            total += disc * env.arm_rewards
            disc *= 0.9
        returns.append(total)
    returns = np.array(returns)
    se = returns.std(axis=0) / np.sqrt(len(returns))
    assert np.all(np.abs(returns.mean(axis=0) - exact) < 4 * se + 1e-3), (returns.mean(axis=0), exact, se)
    assert exact[0] > exact[1] + 4 * se.max()  # the sturdier machine is cheaper: the test can tell arms apart


@pytest.mark.parametrize("kwargs, needle", [
    (dict(machine_range=(5, 3)), "machine_range=[5, 3] must satisfy 1 <= low <= high"),
    (dict(machine_range="many"), "machine_range must be a pair"),
    (dict(resource_range=(3, 4), machine_range=(2, 5)), "starts above the fewest machines 2"),
    (dict(episode_length=0), "episode_length must be an integer >= 1, got 0")])
def test_bad_env_input_is_one_line(kwargs, needle):
    with pytest.raises(ValueError) as err:
        CountProportionEnv(machine_replacement_arm(), **kwargs)
    assert needle in str(err.value)
