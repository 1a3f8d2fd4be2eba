"""SPMA, tabular and log-linear (exact, float64): the linear-convergence claim, SPMA vs softmax PG at its theory step,
SPMA = NPG to O(eta^2), the simplex, the convex projection; and the tabular recipe (report, resume)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_modules.layers import tabular_mdp as tm
from lightning_modules.spma import (features, loglinear_policy, loglinear_spma_projection, npg_update, safe_eta,
                                    spma_update, tabular_gaps)
from recipes.cli import main
from tests.helpers import last_checkpoint, run_cli, run_dir_args

D = torch.float64


def run(mdp, method, T, eta=0.1, alpha=None):
    """Gaps of a tabular method; every SPMA iterate is checked to lie on the simplex without renormalisation."""
    def on_simplex(z):
        p = z.exp()
        assert float((p.sum(-1) - 1).abs().max()) < 1e-12 and bool((p >= 0).all())

    return tabular_gaps(mdp, method, T, eta if method != "spg" else alpha,
                        on_simplex if method == "spma" else None)


def slope(gaps, lo, hi):
    t = np.arange(lo, hi)
    return np.polyfit(t, np.log(gaps[lo:hi]), 1)[0]


def test_exact_evaluation_agrees_with_a_rollout_free_fixed_point():
    mdp = tm.random_mdp(6, 3, 0.8, seed=1)
    pi = torch.softmax(torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=D), -1)
    ev = tm.evaluate(mdp, pi)
    V = torch.zeros(6, dtype=D)
    for _ in range(2000):  # Bellman expectation iteration
        V = (pi * (mdp.r + mdp.gamma * torch.einsum("sat,t->sa", mdp.P, V))).sum(-1)
    torch.testing.assert_close(ev["V"], V, rtol=0, atol=1e-12)
    torch.testing.assert_close((pi * ev["A"]).sum(-1), torch.zeros(6, dtype=D), rtol=0, atol=1e-12)
    torch.testing.assert_close(ev["d"].sum(), torch.ones((), dtype=D))
    star = tm.optimal(mdp)
    assert float((star["V"] - ev["V"]).min()) >= -1e-12  # V* dominates


def test_spma_converges_linearly_and_softmax_pg_at_its_theory_step_lags_by_more_than_10x():
    mdp = tm.chain(10, 4, 0.1, 0.9)
    spma = run(mdp, "spma", 300, eta=1 - mdp.gamma)  # theory-safe constant step
    early, late = slope(spma, 100, 200), slope(spma, 200, 300)
    assert early < -0.005 and late < -0.005  # a line with negative slope in two disjoint windows ...
    assert abs(late) >= 0.8 * abs(early)  # ... that does not flatten: linear, not sublinear
    spg = run(mdp, "spg", 300, alpha=(1 - mdp.gamma) ** 3 / 8)
    assert spg[-1] >= 10 * spma[-1], (spg[-1], spma[-1])


def test_spma_and_npg_agree_to_second_order_in_eta():
    mdp = tm.random_mdp(8, 4, 0.9, seed=3)
    log_pi = F.log_softmax(torch.randn(8, 4, generator=torch.Generator().manual_seed(1), dtype=D), -1)
    A = tm.evaluate(mdp, log_pi.exp())["A"]
    diffs = []
    for eta in (0.04, 0.02, 0.01):
        a, _ = spma_update(log_pi, A, eta)
        diffs.append(float((a.exp() - npg_update(log_pi, A, eta).exp()).abs().max()))
    ratios = [diffs[0] / diffs[1], diffs[1] / diffs[2]]
    assert all(3.5 < r < 4.5 for r in ratios), (diffs, ratios)  # halving eta quarters the gap: O(eta^2)


def test_the_guard_keeps_a_large_step_on_the_simplex():
    A = torch.tensor([[0.5, -2.0], [1.0, -0.2]], dtype=D)
    assert safe_eta(A, 1.0, 0.9) == pytest.approx(0.45) and safe_eta(A, 0.1, 0.9) == 0.1
    mdp = tm.random_mdp(20, 4, 0.9, seed=0)
    gaps = run(mdp, "spma", 400, eta=1.0)  # the spec: eta = 1 leaves the simplex after ~300 iterations unguarded
    assert np.isfinite(gaps).all() and gaps[-1] < gaps[0] * 1e-2


def test_the_loglinear_projection_is_convex_and_loglinear_spma_converges_linearly_to_a_plateau():
    mdp = tm.chain(10, 4, 0.1, 0.9)
    j_star = tm.optimal(mdp)["J"]
    phi = features("random", 10, 4, 12, seed=0)
    theta = torch.zeros(12, dtype=D)
    pi = loglinear_policy(theta, phi).exp()
    ev = tm.evaluate(mdp, pi)
    target = pi * (1 + safe_eta(ev["A"], 0.5) * ev["A"])
    _, loss_a = loglinear_spma_projection(theta, phi, target, ev["d"])
    _, loss_b = loglinear_spma_projection(3 * torch.randn(12, generator=torch.Generator().manual_seed(7),
                                                          dtype=D), phi, target, ev["d"])
    assert abs(loss_a - loss_b) < 1e-9 * abs(loss_a)  # two starts, one minimum
    agg = features("aggregated", 10, 4, 8)  # 2 state groups x 4 actions: cannot represent pi*
    theta, gaps = torch.zeros(8, dtype=D), []
    for _ in range(200):
        pi = loglinear_policy(theta, agg).exp()
        ev = tm.evaluate(mdp, pi)
        gaps.append(j_star - ev["J"])
        theta, _ = loglinear_spma_projection(theta, agg, pi * (1 + safe_eta(ev["A"], 0.5) * ev["A"]), ev["d"])
    gaps = np.array(gaps)
    excess = gaps - gaps[-1]
    assert gaps[-1] > 0.1 * gaps[0]  # a plateau: the neighbourhood of the projection error
    assert slope(np.maximum(excess, 1e-300), 20, 120) < -0.05  # reached geometrically (linear convergence)
    assert abs(gaps[-1] - gaps[-20]) < 1e-6 * gaps[-1]


def test_the_tabular_recipe_writes_its_report_and_resumes_exactly(tmp_path):
    common = ["fit", "--config", "recipes/spma_tabular.yaml", "--trainer.max_epochs=3",
              "--data.init_args.iterations_per_epoch=20", "--checkpoint.every_n_train_steps=20",
              "--trainer.enable_progress_bar=false"]
    assert main([*common, *run_dir_args(tmp_path / "straight")]) == 0
    gap = np.genfromtxt(tmp_path / "straight" / "logs" / "version_0" / "gap.csv", delimiter=",", names=True)
    assert len(gap) == 60 and (np.diff(gap["gap"]) < 0).all()
    assert (tmp_path / "straight" / "logs" / "version_0" / "gap.png").stat().st_size > 1000
    killer = tmp_path / "kill.yaml"
    killer.write_text("trainer:\n  callbacks:\n    - class_path: callbacks.policy_gap_report.PolicyGapReport\n"
                      "    - class_path: tests.helpers.KillAfterStep\n      init_args:\n        step: 30\n")
    crashed = run_cli([*common, "--config", str(killer), *run_dir_args(tmp_path / "resumed")])
    assert crashed.returncode == -9 and last_checkpoint(tmp_path / "resumed")["global_step"] == 20
    assert main([*common, *run_dir_args(tmp_path / "resumed"), "--ckpt_path=last"]) == 0
    a, b = last_checkpoint(tmp_path / "straight"), last_checkpoint(tmp_path / "resumed")
    assert a["global_step"] == b["global_step"] == 60
    assert torch.equal(a["state_dict"]["z"], b["state_dict"]["z"])
    resumed = np.genfromtxt(tmp_path / "resumed" / "logs" / "version_1" / "gap.csv", delimiter=",", names=True)
    np.testing.assert_array_equal(resumed["gap"], gap["gap"])  # the report's rows survive the resume


@pytest.mark.parametrize("extra, needle", [
    (["--model.init_args.eta=0"], "model.eta must be > 0, got 0"),
    (["--model.init_args.method=trpo"], "model.method='trpo'"),
    (["--data.init_args.kind=grid"], "data.kind='grid'"),
])
def test_tabular_bad_input_is_one_line(extra, needle, tmp_path, capsys):
    code = main(["fit", "--config", "recipes/spma_tabular.yaml", "--trainer.max_epochs=1", *extra,
                 *run_dir_args(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and needle in err[-1], err[-3:]


@pytest.mark.parametrize("method", ["spma", "spma_loglinear"])
def test_the_tabular_module_moves_with_its_device_and_bf16_autocast_leaves_it_alone(method, tmp_path):
    """What a GPU run needs: log-linear SPMA's features are a buffer (they move with the module; not saved), the
    exact evaluation runs on the policy's device, and bf16-mixed autocast is a no-op on the float64 iterations."""
    import lightning as L

    from datamodules.tabular_mdp import TabularMDPDataModule
    from lightning_modules.spma import TabularPolicyOptimization

    z = {}
    for precision in ("32-true", "bf16-mixed"):
        model = TabularPolicyOptimization(method=method, eta=0.5)
        trainer = L.Trainer(max_steps=5, precision=precision, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            default_root_dir=tmp_path)
        trainer.fit(model, TabularMDPDataModule(iterations_per_epoch=5))
        z[precision] = model.z.detach().clone()
    assert z["32-true"].dtype == D and torch.equal(z["32-true"], z["bf16-mixed"])
    if method == "spma_loglinear":
        assert dict(model.named_buffers())["phi"].dtype == D and "phi" not in model.state_dict()
    ev = tm.evaluate(tm.chain(), model.policy())  # the MDP's tensors follow the policy's device (here the CPU)
    assert ev["V"].device == ev["A"].device == ev["d"].device == model.z.device
