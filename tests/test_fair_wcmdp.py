"""The fair-WCMDP recipes end to end (spec fair_wcmdp.md): the exact GGF LP recipe through the command line (the spec's
numbers in its report, the symmetry theorem with identical machines, bad input in one line), exact evaluation of
count-proportion and joint-state policies against Monte Carlo and against the LPs, and short fits of the CP-DRL and
joint-state PPO recipes with their fairness reports."""
import csv

import gymnasium as gym
import numpy as np
import pytest

from datamodules.wcmdp import CountMDP, JointMDP, machine_replacement_arm, machine_replacement_arms
from datamodules.wcmdp_envs import COUNT_ENV_ID, CountProportionEnv, decode_distribution
from lightning_modules.fair_wcmdp_eval import (count_policy, evaluate_count_agent, joint_policy, monte_carlo_arm_values,
                                               uniform_random_policy)
from lightning_modules.fair_wcmdp_lp import (LPStatusError, evaluate_count_policy, evaluate_policy,
                                             index_tiebreak_utilitarian_policy, solve_count_lp, solve_ggf_lp)
from recipes.cli import main
from tests.helpers import one_line_error, run_dir_args

LP = ["--config", "recipes/ggf_lp_machine_replacement.yaml"]


def _rows(path):
    with open(path) as fh:
        return {r["policy"]: r for r in csv.DictReader(fh)}


def test_lp_recipe_reports_the_fair_and_the_utilitarian_solutions(tmp_path):
    assert main(["fit", *LP, *run_dir_args(tmp_path)]) == 0
    run = tmp_path / "logs" / "version_0"
    rows = _rows(run / "policies.csv")
    fair, util, rnd = rows["fair"], rows["utilitarian"], rows["random"]
    assert float(fair["ggf"]) == pytest.approx(-3.3591, abs=1e-4)  # spec 2.3, in reward terms
    assert float(util["ggf"]) == pytest.approx(-3.4461, abs=1e-4)
    assert [float(fair[f"arm_{i}"]) for i in range(3)] == pytest.approx([-1.7279, -2.4052, -4.2438], abs=1e-4)
    assert float(fair["worst"]) > float(util["worst"]) and float(fair["ggf"]) > float(rnd["ggf"])
    assert float(fair["total"]) >= 1.02 * float(util["total"])  # costs: at most 2% more in total
    assert fair["replace_cost_scale"] == "0.5" and fair["use_all_resources"] == "False"
    trade = list(csv.DictReader(open(run / "tradeoff.csv")))
    worst = [float(r["worst"]) for r in trade]
    total = [float(r["total"]) for r in trade]
    assert worst[-1] > worst[0] and total[-1] < total[0]  # towards max-min: a better worst arm, a lower total
    for name in ("per_arm_values.png", "tradeoff.png"):
        assert (run / name).stat().st_size > 0
    metrics = (run / "metrics.csv").read_text()
    assert "val/ggf" in metrics.splitlines()[0]
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert main(["predict", *LP, *run_dir_args(tmp_path), f"--ckpt_path={ckpt}"]) == 0
    pred = list(csv.DictReader(open(next(tmp_path.glob("logs/version_*/predictions.csv")))))
    assert len(pred) == 27 and {r["state"] for r in pred} >= {"2-2-2", "0-0-0"}
    assert pred[26]["state"] == "2-2-2" and pred[26]["prediction"] != "0-0-0"  # all worn: replace one


@pytest.mark.parametrize("extra, expect", [
    ([], {"fair": -2.5356, "count": -2.5356}),
    (["--data.init_args.use_all_resources=true"], {"fair": -3.8280, "count": -3.8280}),
])
def test_lp_recipe_identical_machines_symmetry(extra, expect, tmp_path):
    assert main(["fit", *LP, *run_dir_args(tmp_path), "--data.init_args.prob_remain=0.8",
                 "--model.init_args.tradeoff_bases=[2.0]", *extra]) == 0
    rows = _rows(tmp_path / "logs" / "version_0" / "policies.csv")
    for policy, value in expect.items():
        assert float(rows[policy]["ggf"]) == pytest.approx(value, abs=1e-4), policy
    assert float(rows["count"]["ggf"]) == pytest.approx(float(rows["fair"]["ggf"]), rel=1e-6)
    assert float(rows["fair"]["max_min_gap"]) < 1e-6  # equal arms
    assert float(rows["index_tiebreak"]["ggf"]) < float(rows["fair"]["ggf"]) - 1e-3
    assert float(rows["index_tiebreak"]["total"]) == pytest.approx(float(rows["fair"]["total"]), rel=1e-6)
    if not extra:  # the fair policy is randomised in some states (sampled, not argmaxed, when simulated)
        assert main(["predict", *LP, *run_dir_args(tmp_path), "--data.init_args.prob_remain=0.8",
                     f"--ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"]) == 0
        pred = list(csv.DictReader(open(next(tmp_path.glob("logs/version_*/predictions.csv")))))
        assert sum(float(r["probability"]) < 0.999 for r in pred) == 2


@pytest.mark.parametrize("extra, needle", [
    (["--model.init_args.weights=[0.2, 0.3, 0.5]"], "non-increasing (worst-off first), got [0.2, 0.3, 0.5]"),
    (["--model.init_args.weights=[0.6, 0.3, 0.3]"], "must sum to 1, got [0.6, 0.3, 0.3]"),
    (["--model.init_args.weights=[0.5, 0.5]"], "model.weights has 2 values for data.n_arms=3 arms"),
    (["--model.init_args.weights=linear"], "model.weights='linear'; expected one of exponential2"),
    (["--data.init_args.budget=-1"], "data.budget=-1 must be an integer in [0, 3]"),
    (["--data.init_args.budget=4"], "data.budget=4 must be an integer in [0, 3]"),
    (["--data.init_args.cost_type=cubic"], "cost_type='cubic'; expected one of quadratic, linear"),
    (["--data.init_args.n_arms=12", "--data.init_args.prob_remain=0.8"],
     "the exact joint LP needs 531,441 joint states"),
    (["--model.init_args.tradeoff_bases=[0.5]"], "tradeoff_bases must all be >= 1"),
    (["--model.init_args.weigths=uniform"], "weigths"),
    (["--data.init_args.n_arms=three"], "n_arms"),
])
def test_lp_recipe_bad_input_is_one_line(extra, needle, tmp_path, capsys):
    assert main(["fit", *LP, *run_dir_args(tmp_path), *extra]) == 2
    line = one_line_error(capsys)
    assert needle in line, line


def test_infeasible_lp_names_the_highs_status():
    mdp = JointMDP(machine_replacement_arms(2), 1)
    mdp.mu = -mdp.mu  # occupancy measures cannot be negative
    with pytest.raises(LPStatusError, match=r"GGF LP \(2 arms\): HiGHS status 2: .*infeasible"):
        solve_ggf_lp(mdp)
    assert issubclass(LPStatusError, ValueError)  # the command line prints it in one line


def test_decode_distribution_matches_sampled_decoding():
    env = CountProportionEnv(machine_replacement_arm(), (6, 6), (2, 2))
    env.reset(seed=1, options={"n_arms": 6, "budget": 2})
    env.local[:] = [0, 2, 1, 2, 1, 1]
    action = np.array([0.1, 0.5, 0.9, 0.8])
    exact = decode_distribution(env.counts(), action, 2)
    assert sum(exact.values()) == pytest.approx(1.0)
    draws = 20_000
    seen: dict = {}
    for _ in range(draws):
        rep = env.decode(action)
        key = tuple(int(rep[env.local == s].sum()) for s in range(3))
        seen[key] = seen.get(key, 0) + 1
    assert set(seen) == set(exact)
    for key, p in exact.items():
        assert seen[key] / draws == pytest.approx(p, abs=4 * np.sqrt(p * (1 - p) / draws) + 1e-3), key


def _worst_first(obs):
    """Replace a machine of the last level when there is one, else one of the middle level (count proportions)."""
    a = np.zeros((len(obs), 4))
    worn, mid = obs[:, 2] > 0, obs[:, 1] > 0
    a[:, 2] = worn
    a[:, 1] = ~worn
    a[:, 3] = worn | mid
    return a


def test_count_policy_exact_value_matches_monte_carlo_and_the_lp():
    arm = machine_replacement_arm()
    r = evaluate_count_agent(_worst_first, arm, 4, budget=1, episodes=300, episode_length=120, seed=3)
    assert r["mc_se"] < 0.08 and abs(r["mc_ggf"] - r["exact"]) < 4 * r["mc_se"] + 0.02, r
    assert r["mc_equality_z"] < 4.0  # permutation invariant: arms equal up to noise
    m = CountMDP(arm, 4, 1)
    lp = solve_count_lp(m)  # the LP's deterministic optimum written as count-proportion actions: no gap
    index = {tuple(c): j for j, c in enumerate(m.states)}

    def optimum(obs):
        out = np.zeros((len(obs), 4))
        for k, o in enumerate(obs):
            choice = m.actions[int(lp.policy[index[tuple(np.rint(o[:3] * 4).astype(int))]].argmax())]
            out[k, :3] = choice
            out[k, 3] = float(sum(choice) > 0)
        return out
    assert evaluate_count_policy(m, count_policy(m, optimum)) == pytest.approx(lp.ggf, rel=1e-9)


def test_joint_policy_evaluation_and_the_index_tiebreak_unfairness():
    mdp = JointMDP(machine_replacement_arms(3), 1)
    pi = index_tiebreak_utilitarian_policy(mdp)
    lookup = {tuple(np.argmax(o.reshape(3, 3), axis=1)): int(pi[j].argmax()) for j, o in
              enumerate(np.eye(3)[mdp.states].reshape(27, 9))}
    rebuilt = joint_policy(mdp, lambda obs: [lookup[tuple(np.argmax(o.reshape(3, 3), axis=1))] for o in obs])
    np.testing.assert_array_equal(rebuilt, pi)
    from datamodules.wcmdp_envs import make_joint_env

    returns = monte_carlo_arm_values(lambda: make_joint_env(3, reward_offset=0.0, episode_length=200),
                                     lambda obs: [lookup[tuple(np.argmax(o.reshape(3, 3), axis=1))] for o in obs],
                                     400, 0.95, seed=5)
    exact = evaluate_policy(mdp, pi)
    assert np.abs(returns.mean(axis=0) - exact).max() < 0.15
    from lightning_modules.fair_wcmdp_eval import arm_equality_z

    assert arm_equality_z(returns) > 6  # index tie-breaking favours the low-index machines
    rnd = uniform_random_policy(gym.spaces.Discrete(4), 0)(np.zeros((1000, 9)))
    assert set(np.unique(rnd)) == {0, 1, 2, 3}


def test_the_randomised_ggf_policy_is_simulated_by_sampling():
    """Identical machines, N = 3: the GGF optimum randomises in two states.  Sampled, its Monte-Carlo per-arm values
    match the exact ones (equal arms); its most likely action instead is unequal and has a lower GGF."""
    from datamodules.wcmdp_envs import make_joint_env
    from lightning_modules.fair_wcmdp_eval import arm_equality_z, sampled_joint_actions
    from lightning_modules.fair_wcmdp_lp import ggf, ggf_weights

    mdp = JointMDP(machine_replacement_arms(3), 1)
    fair = solve_ggf_lp(mdp)
    assert (fair.policy.max(axis=1) < 0.999).sum() == 2
    returns = monte_carlo_arm_values(lambda: make_joint_env(3, reward_offset=0.0, episode_length=120),
                                     sampled_joint_actions(mdp, fair.policy, seed=1), 600, 0.95, seed=11)
    se = returns.std(axis=0, ddof=1) / np.sqrt(len(returns))
    assert np.all(np.abs(returns.mean(axis=0) - fair.values) < 4 * se + 0.01)
    assert arm_equality_z(returns) < 4
    argmax = np.eye(mdp.n_actions)[fair.policy.argmax(axis=1)]
    values = evaluate_policy(mdp, argmax)
    assert np.ptp(values) > 0.05 and ggf(values, ggf_weights(3)) < fair.ggf - 0.01


def test_machine_replacement_env_ids_are_registered():
    from datamodules.envs import make_vector_env

    env = make_vector_env(COUNT_ENV_ID, 2, env_kwargs={"machine_range": [3, 3], "prob_remain": 0.7})
    obs, _ = env.reset(seed=[0, 1])
    assert obs.shape == (2, 4) and np.allclose(obs[:, 3], 1 / 3)
    env.close()


def _report_yaml(tmp_path, lines):
    extra = tmp_path / "report.yaml"
    extra.write_text("trainer:\n  callbacks:\n" + "".join(f"    {line}\n" for line in lines))
    return str(extra)


def test_cpdrl_recipe_short_fit_writes_the_fairness_report(tmp_path):
    report = _report_yaml(tmp_path, ["- class_path: callbacks.fairness_report.CPDRLReport",
                                     "  init_args: {eval_arms: [3, 6], episodes: 8}"])
    assert main(["fit", "--config", "recipes/cpdrl_machine_replacement.yaml", "--config", report,
                 *run_dir_args(tmp_path), "--trainer.max_epochs=1", "--data.init_args.rollouts_per_epoch=2",
                 "--data.init_args.n_steps=64", "--data.init_args.eval_episodes=2",
                 "--data.init_args.env_kwargs.episode_length=50"]) == 0
    run = tmp_path / "logs" / "version_0"
    rows = list(csv.DictReader(open(run / "fairness.csv")))
    assert [(r["n_arms"], r["policy"]) for r in rows] == [("3", "agent"), ("3", "random"), ("6", "agent"),
                                                           ("6", "random")]
    opt = {r["n_arms"]: float(r["optimum"]) for r in rows}
    assert opt["3"] == pytest.approx(-2.5356, abs=1e-4)
    assert all(float(r["gap"]) >= -1e-9 for r in rows if r["policy"] == "agent")  # nothing beats the optimum
    arms = list(csv.DictReader(open(run / "per_arm_values.csv")))
    assert len(arms) == 2 * (3 + 6)
    for name in ("fairness.png", "per_arm_values.png"):
        assert (run / name).stat().st_size > 0


def test_joint_ppo_recipe_short_fit_writes_the_fairness_report(tmp_path):
    report = _report_yaml(tmp_path, ["- class_path: callbacks.fairness_report.CPDRLReport",
                                     "  init_args: {episodes: 4}"])
    assert main(["fit", "--config", "recipes/ppo_joint_machine_replacement.yaml", "--config", report,
                 *run_dir_args(tmp_path), "--trainer.max_epochs=1", "--data.init_args.rollouts_per_epoch=2",
                 "--data.init_args.n_steps=64", "--data.init_args.eval_episodes=2",
                 "--data.init_args.env_kwargs.n_arms=3", "--data.init_args.env_kwargs.episode_length=50"]) == 0
    rows = _rows(tmp_path / "logs" / "version_0" / "fairness.csv")
    assert float(rows["agent"]["optimum"]) == pytest.approx(-2.5356, abs=1e-4)  # the joint GGF LP, N = 3
    assert float(rows["random"]["gap"]) > 0.5 and float(rows["agent"]["gap"]) >= -1e-9


def test_compare_script_tables_and_checks(tmp_path, monkeypatch):
    import scripts.fair_wcmdp_compare as compare

    monkeypatch.setattr(compare, "RESULTS", tmp_path / "results.md")
    exact = {(0.5, False): compare.exact_policies(0.5, False)}
    assert exact[(0.5, False)]["fair (GGF LP)"]["ggf"] == pytest.approx(-3.3591, abs=1e-4)
    sym = compare.symmetry_rows((3,))
    assert sym[0]["rel"] < 1e-9 and sym[0]["tie_ggf"] == pytest.approx(-2.6448, abs=1e-4)
    scale = compare.scale_rows((10,))
    assert scale[0]["states"] == 66 and scale[0]["value"] == pytest.approx(-5.3685, abs=1e-4)
    rows = []
    for seed, gap in ((0, 0.0), (1, 0.02)):
        rows += [{"kind": "cpdrl", "seed": seed, "policy": "agent", "n_arms": 3.0, "value": -2.5356 * (1 + gap),
                  "optimum": -2.5356, "gap": gap, "mc_equality_z": 1.5},
                 {"kind": "cpdrl", "seed": seed, "policy": "random", "n_arms": 3.0, "value": -8.4, "optimum": -2.5356,
                  "gap": 2.3, "mc_equality_z": 1.0}]
    rows.append({"kind": "joint", "seed": 0, "policy": "agent", "n_arms": 3.0, "value": -2.6, "optimum": -2.5356,
                 "gap": 0.025, "mc_equality_z": 7.0})
    table = compare.rl_table(rows, [3])
    assert table[0]["cp_worst_gap"] == 0.02 and table[0]["seeds"] == 2 and table[0]["joint_z"] == 7.0
    text, verdict = compare.write(exact, sym, scale, table, "cmd", 0.03)
    assert all(verdict.values()), verdict
    _, verdict = compare.write(exact, sym, scale, table, "cmd", 0.01)  # the gap check can fail
    assert not verdict["CP-DRL gap <= 1% at N=3..8 (every seed)"]
    written = (tmp_path / "results.md").read_text()
    assert "<!-- fair_wcmdp:start -->" in written and "| 3 | -2.5356 |" in written


@pytest.mark.parametrize("extra, needle", [
    (["--data.init_args.env_kwargs.cost_type=cubic"], "cost_type='cubic'; expected one of quadratic, linear"),
    (["--data.init_args.env_kwargs.machine_range=[5, 2]"], "machine_range=[5, 2] must satisfy 1 <= low <= high"),
    (["--data.init_args.env_kwargs.episode_length=long"], "env_kwargs.episode_length='long'; expected int"),
])
def test_cpdrl_recipe_bad_environment_settings_are_one_line(extra, needle, tmp_path, capsys):
    assert main(["fit", "--config", "recipes/cpdrl_machine_replacement.yaml", *run_dir_args(tmp_path), *extra]) == 2
    line = one_line_error(capsys)
    assert needle in line, line
