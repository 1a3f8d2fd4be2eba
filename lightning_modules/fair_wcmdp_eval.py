"""Fairness evaluation of machine-replacement policies (spec ``fair_wcmdp.md`` 4.1, "Metrics"): exact per-arm values
where the policy can be written on a finite MDP, Monte-Carlo per-arm values otherwise, and the summary the paper
compares (GGF, total, worst arm, Gini, max-min gap).

* ``count_policy`` turns a count-proportion policy (``obs -> action`` in ``[0, 1]^{S+1}``, e.g. CP-DRL's
  deterministic action) into the exact randomised count policy that ``CountProportionEnv.decode`` samples
  (``datamodules.wcmdp_envs.decode_distribution``); ``evaluate_count_policy`` then gives its per-arm value exactly
  (every arm the same: the machines of a state are exchangeable), at any ``N`` the count MDP holds (N = 50: 1,326
  states).
* ``joint_policy`` turns a joint-state policy (``JointStateEnv``'s one-hot observation -> joint action index) into
  ``policy[s, a]`` for ``evaluate_policy`` on the joint MDP.
* ``sampled_joint_actions`` simulates a randomised joint policy (the GGF LP's) by sampling its actions.
* ``monte_carlo_arm_values`` plays episodes of an environment with any policy and returns each episode's discounted
  return per arm (``env.arm_rewards``), for the per-arm equality check and for policies with no exact form.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from datamodules.wcmdp import CountMDP, JointMDP
from datamodules.wcmdp_envs import decode_distribution
from lightning_modules.fair_wcmdp_lp import ggf, gini

Policy = Callable[[np.ndarray], np.ndarray]  # a batch of observations -> a batch of actions


def summary(values, w) -> Dict[str, float]:
    """GGF (with weights ``w``), total, worst arm, Gini and the max-min gap of per-arm values (rewards)."""
    v = np.asarray(values, dtype=float)
    return {"ggf": ggf(v, w), "total": float(v.sum()), "worst": float(v.min()), "gini": gini(v),
            "max_min_gap": float(v.max() - v.min())}


def count_observations(m: CountMDP) -> np.ndarray:
    """``CountProportionEnv``'s observation of every count state: ``(n_0/N, ..., n_{S-1}/N, K/N)``."""
    counts = np.asarray(m.states, dtype=float)
    return np.concatenate([counts / m.n_arms, np.full((len(counts), 1), m.budget / m.n_arms)], axis=1)


def count_policy(m: CountMDP, act: Policy) -> np.ndarray:
    """``policy[j, a]`` of the count MDP that the count-proportion env realises when ``act`` is applied."""
    actions = np.asarray(act(count_observations(m).astype(np.float32)), dtype=float)
    index = {tuple(a): k for k, a in enumerate(m.actions)}
    policy = np.zeros((m.n_states, m.n_actions))
    for j, counts in enumerate(m.states):
        for replaced, p in decode_distribution(counts, actions[j], m.budget).items():
            policy[j, index[replaced]] += p
    return policy


def joint_observations(m: JointMDP) -> np.ndarray:
    """``JointStateEnv``'s one-hot observation of every joint state."""
    obs = np.zeros((m.n_states, m.n_arms, m.n_local), dtype=np.float32)
    obs[np.arange(m.n_states)[:, None], np.arange(m.n_arms)[None], m.states] = 1.0
    return obs.reshape(m.n_states, -1)


def joint_policy(m: JointMDP, act: Policy) -> np.ndarray:
    """``policy[s, a]`` of a deterministic joint-state policy (``act`` returns joint action indices)."""
    idx = np.asarray(act(joint_observations(m)), dtype=np.int64).reshape(-1)
    policy = np.zeros((m.n_states, m.n_actions))
    policy[np.arange(m.n_states), idx] = 1.0
    return policy


def sampled_joint_actions(m: JointMDP, policy: np.ndarray, seed: int = 0) -> Policy:
    """A randomised joint policy ``policy[s, a]`` (e.g. the GGF LP's ``x(s, a) / sum_a x(s, a)``) acting in
    ``JointStateEnv``: each action *sampled* from its state's row (taking the most likely one instead loses
    optimality and equality: the spec's pitfall).  Joint states are lexicographic, arm 0 most significant."""
    rng = np.random.default_rng(seed)
    place = m.n_local ** np.arange(m.n_arms - 1, -1, -1)
    cdf = np.cumsum(policy, axis=1)

    def act(obs: np.ndarray) -> np.ndarray:
        local = np.asarray(obs).reshape(len(obs), m.n_arms, m.n_local).argmax(axis=2)
        rows = cdf[local @ place]
        return np.minimum((rows <= rng.random((len(obs), 1)) * rows[:, -1:]).sum(axis=1), m.n_actions - 1)
    return act


def monte_carlo_arm_values(make_env: Callable[[], object], act: Policy, episodes: int, gamma: float, seed: int = 0,
                           reset_options: Optional[dict] = None) -> np.ndarray:
    """``(episodes, N)`` discounted per-arm returns over whole episodes (all played side by side, one ``act`` call
    per step for all of them); episode ``e`` is seeded ``seed + e``."""
    envs = [make_env() for _ in range(episodes)]
    obs = np.stack([env.reset(seed=seed + e, options=dict(reset_options or {}))[0] for e, env in enumerate(envs)])
    totals, discount, done = None, 1.0, False
    while not done:
        actions = np.asarray(act(obs.astype(np.float32)))
        rows, rewards = [], []
        for env, a in zip(envs, actions):
            o, _, terminated, truncated, info = env.step(a)
            rows.append(o)
            rewards.append(env.unwrapped.arm_rewards)
            done = done or terminated or truncated
        r = np.stack(rewards).astype(float)
        totals = discount * r if totals is None else totals + discount * r
        discount *= gamma
        obs = np.stack(rows)
    return totals


def uniform_random_policy(space, seed: int = 0) -> Policy:
    """Uniformly random actions of ``space`` (the random baseline), from its own generator."""
    rng = np.random.default_rng(seed)
    if hasattr(space, "n"):
        return lambda obs: rng.integers(0, space.n, len(obs))
    return lambda obs: rng.uniform(space.low, space.high, (len(obs),) + space.shape)


def arm_equality_z(returns: np.ndarray) -> float:
    """How far apart the arms' Monte-Carlo values are in standard errors: the largest ``|mean_e d_ie| / se(d_i)``
    over arms of ``d_ie`` = arm ``i``'s return in episode ``e`` minus that episode's mean over arms (paired within
    episodes).  About 2-3 for a permutation-invariant policy (noise); large for one that favours arms."""
    d = returns - returns.mean(axis=1, keepdims=True)
    se = d.std(axis=0, ddof=1) / np.sqrt(len(d))
    return float(np.max(np.abs(d.mean(axis=0)) / np.maximum(se, 1e-12)))


def monte_carlo_summary(returns: np.ndarray, w) -> Dict[str, object]:
    """``summary`` of the Monte-Carlo per-arm means, their largest standard error and ``arm_equality_z``."""
    values = returns.mean(axis=0)
    return {**summary(values, w), "se": float((returns.std(axis=0, ddof=1) / np.sqrt(len(returns))).max()),
            "equality_z": arm_equality_z(returns), "values": values}


def evaluate_count_agent(act: Policy, arm, n_arms: int, budget: int = 1, gamma: float = 0.95, weights=None,
                         episodes: int = 0, seed: int = 0, episode_length: int = 300) -> Dict[str, object]:
    """A count-proportion policy at ``n_arms`` machines: its exact per-arm value (count MDP), the count-LP optimum
    (the GGF optimum, weights summing to 1) and the relative gap; with ``episodes``, Monte-Carlo per-arm values too
    (``mc_*``)."""
    from datamodules.wcmdp_envs import CountProportionEnv
    from lightning_modules.fair_wcmdp_lp import evaluate_count_policy, ggf_weights, solve_count_lp

    m = CountMDP(arm, n_arms, budget, gamma)
    optimum = solve_count_lp(m).ggf
    exact = evaluate_count_policy(m, count_policy(m, act))
    row: Dict[str, object] = {"n_arms": n_arms, "optimum": optimum, "exact": exact,
                              "gap": (optimum - exact) / abs(optimum)}
    if episodes:
        w = ggf_weights(n_arms) if weights is None else weights
        returns = monte_carlo_arm_values(
            lambda: CountProportionEnv(arm, (n_arms, n_arms), (budget, budget), episode_length, 0.0), act, episodes,
            gamma, seed)
        row.update({f"mc_{k}": v for k, v in monte_carlo_summary(returns, w).items()})
    return row


def _arm_kwargs(env_kwargs: dict) -> dict:
    from datamodules.wcmdp_envs import env_kwarg

    kinds = {"n_states": int, "prob_remain": float, "cost_type": str, "replace_cost_scale": float,
             "deterioration_step": int}
    return {k: env_kwarg(k, env_kwargs[k], kind) for k, kind in kinds.items() if k in env_kwargs}


def evaluate_agent(act: Policy, env_id: str, env_kwargs: dict, eval_arms: Sequence[int] = (3, 4, 5, 6, 7, 8),
                   episodes: int = 200, budget: int = 1, gamma: float = 0.95, seed: int = 0):
    """The fairness rows of a policy trained on a machine-replacement environment id (``datamodules.wcmdp_envs``),
    beside a uniformly random policy.  Returns ``(rows, arm_rows)``: one row per ``(n_arms, policy)`` with ``value``
    (the agent: its exact per-arm GGF; random: the Monte-Carlo GGF), ``optimum`` (the GGF optimum: count LP for the
    count env and identical machines, the joint GGF LP otherwise), ``gap`` (relative shortfall) and the Monte-Carlo summary; one arm
    row per arm with its Monte-Carlo mean and standard error."""
    from datamodules.wcmdp import machine_replacement_arm, machine_replacement_arms
    from datamodules.wcmdp_envs import COUNT_ENV_ID, JOINT_ENV_ID, make_count_env, make_joint_env
    from lightning_modules.fair_wcmdp_lp import evaluate_policy, ggf_weights, solve_count_lp, solve_ggf_lp

    from datamodules.wcmdp_envs import env_kwarg

    env_kwargs = dict(env_kwargs)
    length = env_kwarg("episode_length", env_kwargs.pop("episode_length", 300), int)
    n_joint = env_kwarg("n_arms", env_kwargs.pop("n_arms", 3), int)
    budget = env_kwarg("budget", env_kwargs.pop("budget", budget), int)
    use_all = env_kwarg("use_all_resources", env_kwargs.pop("use_all_resources", False), bool)
    rows: List[Dict[str, object]] = []
    arm_rows: List[Dict[str, object]] = []

    def add(n: int, policy: str, value: float, optimum: float, returns: Optional[np.ndarray], w, **extra):
        row = {"n_arms": n, "policy": policy, "value": value, "optimum": optimum,
               "gap": (optimum - value) / abs(optimum), **extra}
        if returns is not None:
            mc = monte_carlo_summary(returns, w)
            se = returns.std(axis=0, ddof=1) / np.sqrt(len(returns))
            row.update({f"mc_{k}": v for k, v in mc.items() if k != "values"}, episodes=len(returns))
            arm_rows.extend({"n_arms": n, "policy": policy, "arm": i, "value": float(v), "se": float(s)}
                            for i, (v, s) in enumerate(zip(mc["values"], se)))
        rows.append(row)

    if env_id == COUNT_ENV_ID:
        arm = machine_replacement_arm(**_arm_kwargs(env_kwargs))
        space = make_count_env(**_arm_kwargs(env_kwargs)).action_space
        for n in eval_arms:
            w = ggf_weights(n)
            r = evaluate_count_agent(act, arm, n, budget, gamma, w, 0)
            options = {"n_arms": n, "budget": budget}

            def make(n=n):
                return make_count_env(**_arm_kwargs(env_kwargs), machine_range=(n, n), resource_range=(budget, budget),
                                      episode_length=length, reward_offset=0.0)

            mc = monte_carlo_arm_values(make, act, episodes, gamma, seed, options) if episodes else None
            add(n, "agent", r["exact"], r["optimum"], mc, w)
            if episodes:
                rnd = monte_carlo_arm_values(make, uniform_random_policy(space, seed), episodes, gamma, seed, options)
                add(n, "random", float(ggf(rnd.mean(axis=0), w)), r["optimum"], rnd, w)
    elif env_id == JOINT_ENV_ID:
        n = n_joint
        arms = machine_replacement_arms(n, **_arm_kwargs(env_kwargs))
        m = JointMDP(arms, budget, gamma, use_all)
        w = ggf_weights(n)
        identical = all((a.P == arms[0].P).all() and (a.reward == arms[0].reward).all() for a in arms)
        # identical machines: the count LP is the GGF optimum (the symmetry theorem, tested) at any size
        optimum = solve_count_lp(CountMDP(arms[0], n, budget, gamma, use_all)).ggf if identical else \
            solve_ggf_lp(m, w).ggf

        def make():
            return make_joint_env(n, **_arm_kwargs(env_kwargs), budget=budget, use_all_resources=use_all,
                                  episode_length=length, reward_offset=0.0)

        agent = evaluate_policy(m, joint_policy(m, act))
        mc = monte_carlo_arm_values(make, act, episodes, gamma, seed) if episodes else None
        add(n, "agent", ggf(agent, w), optimum, mc, w, **{f"exact_arm_{i}": float(v) for i, v in enumerate(agent)})
        rnd = evaluate_policy(m, np.full((m.n_states, m.n_actions), 1.0 / m.n_actions))
        add(n, "random", ggf(rnd, w), optimum, None, w, **{f"exact_arm_{i}": float(v) for i, v in enumerate(rnd)})
    else:
        raise ValueError(f"data.env_id={env_id!r}: the fairness report needs {COUNT_ENV_ID} or {JOINT_ENV_ID}")
    return rows, arm_rows
