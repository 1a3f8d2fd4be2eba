"""Exact fair resource allocation in weakly coupled MDPs (spec fair_wcmdp.md, errata first): the machine-replacement
model, the GGF and utilitarian LPs against the spec's measured numbers and against brute force, exact evaluation."""
import itertools

import numpy as np
import pytest
from scipy.optimize import linprog

from datamodules.wcmdp import CountMDP, JointMDP, budget_actions, machine_replacement_arm, machine_replacement_arms
from lightning_modules.fair_wcmdp_lp import (evaluate_policy, ggf, ggf_weights, gini,
                                             index_tiebreak_utilitarian_policy, solve_count_lp, solve_ggf_lp,
                                             solve_utilitarian_lp)


def test_machine_replacement_arm_follows_the_official_model():
    arm = machine_replacement_arm(3, prob_remain=0.6, replace_cost_scale=0.5)
    np.testing.assert_allclose(arm.P[0], [[0.6, 0.4, 0], [0, 0.6, 0.4], [0, 0, 1.0]])
    np.testing.assert_allclose(arm.P[1], [[0.6, 0.4, 0]] * 3)  # replaced: to 0 with the arm's own prob_remain
    np.testing.assert_allclose(-arm.reward, [[0, 0.5], [0.25, 0.5], [1.0, 0.5]])  # s^2 and 0.5 (S-1)^2, / max
    assert budget_actions(3, 1).tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0]]
    assert budget_actions(3, 1, use_all_resources=True).shape == (3, 3)


def test_heterogeneous_fair_policy_helps_the_worst_arm_at_a_small_total_cost():
    """Spec 2.3 (measured with an independent prototype): prob_remain (0.9, 0.8, 0.6), rccc 0.5."""
    mdp = JointMDP(machine_replacement_arms(3, prob_remain=[0.9, 0.8, 0.6]), budget=1)
    fair, util = solve_ggf_lp(mdp), solve_utilitarian_lp(mdp)
    np.testing.assert_allclose(-fair.values, [1.7279, 2.4052, 4.2438], atol=1e-4)
    assert -fair.ggf == pytest.approx(3.3591, abs=1e-4) and -util.ggf == pytest.approx(3.4461, abs=1e-4)
    assert fair.objective == pytest.approx(fair.ggf, abs=1e-7)  # the LP's optimum is the GGF of its values
    assert fair.ggf >= util.ggf and fair.values.min() >= util.values.min()
    assert fair.values.sum() >= util.values.sum() * 1.02  # rewards are negative: within 2% of the utilitarian total
    np.testing.assert_allclose(evaluate_policy(mdp, fair.policy), fair.values, atol=1e-8)
    np.testing.assert_allclose(evaluate_policy(mdp, util.policy), util.values, atol=1e-8)


@pytest.mark.parametrize("use_all, expected", [(False, 2.5356), (True, 3.8280)])
def test_homogeneous_fair_policy_equalises_the_arms_and_the_resource_flag_matters(use_all, expected):
    """Errata 2: must-use-all-resources changes the homogeneous N = 3 GGF cost from 2.5356 to 3.8280."""
    mdp = JointMDP(machine_replacement_arms(3), budget=1, use_all_resources=use_all)
    fair, util = solve_ggf_lp(mdp), solve_utilitarian_lp(mdp)
    assert -fair.ggf == pytest.approx(expected, abs=1e-4)
    np.testing.assert_allclose(fair.values, fair.values.mean(), atol=1e-7)
    assert fair.values.sum() == pytest.approx(util.values.sum(), rel=1e-7)  # same total: fairness is free here
    assert fair.ggf >= util.ggf - 1e-9 and gini(fair.values) < 1e-7


def _deterministic_values(mdp):
    vals = []
    for choice in itertools.product(range(mdp.n_actions), repeat=mdp.n_states):
        pi = np.zeros((mdp.n_states, mdp.n_actions))
        pi[np.arange(mdp.n_states), choice] = 1.0
        vals.append(evaluate_policy(mdp, pi))
    return np.array(vals)


def test_ggf_lp_equals_the_best_mixture_of_deterministic_policies_by_brute_force():
    """N = 2 arms of S = 2 states: every deterministic joint policy (3^4 = 81) evaluated exactly; the best GGF over
    their mixtures (an LP over the mixing weights) is the GGF LP's optimum, at least the best deterministic one and
    at most the utilitarian optimum's mean (sum w = 1)."""
    arms = [machine_replacement_arm(2, 0.7, cost_type="linear", replace_cost_scale=0.8),
            machine_replacement_arm(2, 0.4, cost_type="linear", replace_cost_scale=0.8)]
    mdp = JointMDP(arms, budget=1)
    w = ggf_weights(2)
    J = _deterministic_values(mdp)  # (81, 2)
    best_det = max(ggf(v, w) for v in J)
    # max over lambda in the simplex of min over the sorting: max t s.t. t <= w . sort(J^T lambda) for both orders
    P = len(J)
    c = np.concatenate([np.zeros(P), [-1.0]])
    A_ub = np.array([np.concatenate([-(w[0] * J[:, i] + w[1] * J[:, 1 - i]), [1.0]]) for i in (0, 1)])
    res = linprog(c, A_ub=A_ub, b_ub=np.zeros(2), A_eq=[np.concatenate([np.ones(P), [0.0]])], b_eq=[1.0],
                  bounds=[(0, None)] * P + [(None, None)], method="highs")
    best_mix = -res.fun
    fair, util = solve_ggf_lp(mdp), solve_utilitarian_lp(mdp)
    assert fair.ggf == pytest.approx(best_mix, abs=1e-8)
    assert fair.ggf >= best_det - 1e-10 and fair.ggf <= util.values.sum() / 2 + 1e-10
    assert util.values.sum() == pytest.approx(J.sum(axis=1).max(), abs=1e-8)  # a deterministic policy is optimal


def test_ggf_and_gini():
    w = ggf_weights(3)
    np.testing.assert_allclose(w, [4 / 7, 2 / 7, 1 / 7])
    assert ggf([3.0, 1.0, 2.0], w) == pytest.approx((4 * 1 + 2 * 2 + 3) / 7)
    assert gini([1.0, 1.0, 1.0]) == 0.0 and gini([0.0, 0.0, 3.0]) == pytest.approx(2 / 3)


@pytest.mark.parametrize("call, needle", [
    (lambda: solve_ggf_lp(JointMDP(machine_replacement_arms(2), 1), [0.3, 0.7]), "non-increasing"),
    (lambda: solve_ggf_lp(JointMDP(machine_replacement_arms(2), 1), [0.6, 0.6]), "must sum to 1"),
    (lambda: JointMDP(machine_replacement_arms(3), budget=4), "budget must be an integer in [0, 3]"),
    (lambda: JointMDP(machine_replacement_arms(3), budget=-1), "got -1"),
    (lambda: machine_replacement_arm(cost_type="cubic"), "cost_type='cubic'; expected one of quadratic, linear"),
    (lambda: solve_ggf_lp(JointMDP(machine_replacement_arms(6), 1), max_variables=1000),
     "needs 5,103 occupancy variables (limit 1,000)"),
    (lambda: JointMDP(machine_replacement_arms(12), 1), "531,441 joint states")])
def test_bad_input_names_the_value(call, needle):
    with pytest.raises(ValueError) as err:
        call()
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("n, expected", [(3, 2.5356), (4, 2.7491), (5, 3.0193)])
def test_symmetry_ggf_lp_equals_the_count_lp_per_arm(n, expected):
    """Identical arms: the GGF optimum is the permutation-invariant utilitarian optimum per arm (spec 1.4)."""
    fair = solve_ggf_lp(JointMDP(machine_replacement_arms(n), budget=1))
    count = solve_count_lp(CountMDP(machine_replacement_arm(), n, budget=1))
    assert count.objective / n == pytest.approx(fair.ggf, rel=1e-6)
    assert -fair.ggf == pytest.approx(expected, abs=1e-4)
    np.testing.assert_allclose(fair.values, fair.values.mean(), rtol=1e-7)


def test_index_tiebreak_utilitarian_policy_is_unequal_and_less_fair():
    """Errata 5: the lowest-index deterministic utilitarian policy at N = 3 costs 2.2907 / 2.5207 / 2.7953 per arm
    (GGF 2.6448), the same total as the fair one."""
    mdp = JointMDP(machine_replacement_arms(3), budget=1)
    values = evaluate_policy(mdp, index_tiebreak_utilitarian_policy(mdp))
    np.testing.assert_allclose(-values, [2.2907, 2.5207, 2.7953], atol=1e-4)
    fair = solve_ggf_lp(mdp)
    assert values.sum() == pytest.approx(fair.values.sum(), rel=1e-9)
    assert ggf(values, ggf_weights(3)) < fair.ggf - 0.1 and gini(values) > 0.03


def test_count_mdp_is_a_proper_mdp_and_scales_past_the_official_overflow():
    m = CountMDP(machine_replacement_arm(), 5, budget=1)
    assert m.n_states == 21 and m.mu.sum() == pytest.approx(1.0)
    rows = np.asarray(m.P.sum(axis=1)).reshape(m.n_states, m.n_actions)
    np.testing.assert_allclose(rows[m.feasible], 1.0)
    assert np.all(rows[~m.feasible] == 0)
    # N = 40: the official int64 multinomial overflows; exact log-space weights give 13.674479 per arm (errata 4)
    big = solve_count_lp(CountMDP(machine_replacement_arm(), 40, budget=1))
    assert -big.objective / 40 == pytest.approx(13.674479, abs=1e-6)
    assert -solve_count_lp(CountMDP(machine_replacement_arm(), 20)).objective / 20 == pytest.approx(10.6044, abs=1e-4)


def test_bench_script_times_both_solvers_and_agrees_between_them(tmp_path):
    import csv

    from scripts.bench_wcmdp import main

    main(["--joint", "2", "3", "--count", "3", "5", "--env-steps", "50", "--no-docs", "--out", str(tmp_path)])
    rows = list(csv.DictReader((tmp_path / "wcmdp_scaling.csv").open()))
    assert [(r["solver"], int(r["n_arms"])) for r in rows] == [("joint GGF LP", 2), ("joint GGF LP", 3),
                                                              ("count LP", 3), ("count LP", 5)]
    assert float(rows[1]["per_arm_cost"]) == pytest.approx(float(rows[2]["per_arm_cost"]), rel=1e-6)
    assert (tmp_path / "wcmdp_scaling.png").stat().st_size > 0
