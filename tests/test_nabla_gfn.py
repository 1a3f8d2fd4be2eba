"""Nabla-GFlowNet: the sampler against diffusers, the closed-form target, the residual Nabla-DB loss against a
per-row float64 reference, its fixed point and terminal condition, subsampling, rewards and metrics."""
import copy

import pytest
import torch

from datamodules.nabla_gfn_data import RING_STD, digits, ring_modes, sample_ring
from lightning_modules.diffusion_prior import RING_SCHEDULE, build_chain
from lightning_modules.layers.diffusion import TimeMLP, make_scheduler, zero_output
from lightning_modules.nabla_gfn import eps_weight, nabla_db_losses, subsample_steps
from lightning_modules.nabla_gfn_rewards import (FolderReward, RingReward, digits_classifier, frechet_distance,
                                                 ring_metrics, ring_target)

CFG = dict(num_train_timesteps=50, beta_start=1e-4, beta_end=0.2, beta_schedule="linear", steps_offset=1)


@pytest.mark.parametrize("name, steps", [("ddim", 49), ("ddim", 10), ("ddpm", 49), ("ddpm", 10)])
def test_chain_steps_equal_diffusers_schedulers_in_float64(name, steps):
    extra = {"set_alpha_to_one": False} if name == "ddim" else {}
    ref = make_scheduler(name, **CFG, **extra)
    chain = build_chain(name, CFG, steps, 1.0)
    ref.set_timesteps(steps)
    x, eps = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    for k in range(steps):
        t, kk = int(ref.timesteps[k]), chain.full(k, 4)
        z = torch.randn(4, 2, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        if name == "ddim":
            want = ref.step(eps, t, x, eta=1.0, variance_noise=z).prev_sample
        else:
            want = ref.step(eps, t, x, generator=torch.Generator().manual_seed(k)).prev_sample
        got = chain.mean(x, eps, kk) + chain.std(kk, x) * z
        assert torch.allclose(got, want, atol=5e-6), (name, k)  # diffusers keeps its tables in float32
    # DDPM's last step goes to alpha = 1 (sigma = 0); DDIM ending at timestep 1 keeps noise at every step
    assert chain.zero_noise_steps() == ([steps - 1] if name == "ddpm" else [])


def test_ddim_eta_one_is_the_ddpm_posterior():
    ddim, ddpm = build_chain("ddim", RING_SCHEDULE, 49, 1.0), build_chain("ddpm", RING_SCHEDULE, 49, 1.0)
    k = torch.arange(48)  # all but the last step, where DDPM goes to alpha = 1
    x, eps = torch.randn(48, 2, dtype=torch.float64), torch.randn(48, 2, dtype=torch.float64)
    assert torch.allclose(ddim.mean(x, eps, k), ddpm.mean(x, eps, k), atol=1e-12)
    assert torch.allclose(ddim.var[:48], ddpm.var[:48], rtol=1e-12)


def test_closed_form_target_matches_monte_carlo():
    beta, reward = 1.0, RingReward()
    w, means, std = ring_target(beta)
    g = torch.Generator().manual_seed(0)
    x = sample_ring(400_000, g).double()
    logw = beta * reward(x)
    iw = torch.softmax(logw, 0)
    which = torch.cdist(x, ring_modes()).argmin(1)
    mc = torch.zeros(8, dtype=torch.float64).index_add_(0, which, iw)
    assert (mc - w).abs().max() < 0.01, (mc, w)
    for k in (0, 1, 7):  # the heavy modes' means move towards the reward's centre as the formula says
        sel = which == k
        mc_mean = (iw[sel, None] * x[sel]).sum(0) / iw[sel].sum()
        assert (mc_mean - means[k]).abs().max() < 0.02, (k, mc_mean, means[k])
    assert std == pytest.approx((1 / RING_STD ** 2 + beta / 4.0) ** -0.5)
    assert torch.allclose(ring_target(0.0)[0], torch.full((8,), 1 / 8, dtype=torch.float64))


def _nets(seed=0):
    torch.manual_seed(seed)
    prior = TimeMLP(2, hidden=16, depth=2, horizon=50).double()
    policy = copy.deepcopy(prior)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    flow = TimeMLP(2, hidden=16, depth=2, horizon=50).double()
    return prior.requires_grad_(False), policy, flow


def _transitions(chain, n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(chain.num_steps, (n,), generator=g)
    k[:3] = chain.num_steps - 1  # terminal rows
    x_t = torch.randn(n, 2, generator=g, dtype=torch.float64) * 2
    x_prev = x_t + 0.3 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    eps_old = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return x_t, x_prev, eps_old, k


def _reference(chain, policy, prior, flow, reward, x_t, x_prev, eps_old, k, beta, gamma, weighting):
    """Row by row, the Jacobian products by ``torch.autograd.functional.vjp`` and ``torch.func.grad``."""
    K = chain.num_steps
    fwd = rev = term = reg = 0.0
    n_term = 0
    for i in range(len(k)):
        ki = k[i:i + 1]
        xt, xp = x_t[i:i + 1], x_prev[i:i + 1]
        t, tn = chain.state_timestep(ki), chain.state_timestep(ki + 1)
        var = chain.var[ki].double()
        a_cur, a_next = chain.state_alpha(ki).double(), chain.state_alpha(ki + 1).double()
        gc, gn = (a_cur, a_next) if gamma == "squared" else (a_cur.sqrt(), a_next.sqrt())
        w = eps_weight(chain, ki).double() if weighting == "eps" else torch.ones(1, dtype=torch.float64)

        def mu(net, x, net_=None):
            return chain.mean(x, net(x, t), ki)

        eps_t = policy(xt, t)
        mu_t = chain.mean(xt, eps_t, ki)
        mu_p = chain.mean(xt, prior(xt, t), ki)
        s_fwd = (mu_t - xp) / var - (mu_p - xp) / var
        rev_t = torch.autograd.functional.vjp(lambda x: mu(policy, x), xt.detach(), ((xp - mu_t) / var).detach())[1]
        rev_p = torch.autograd.functional.vjp(lambda x: mu(prior, x), xt.detach(), ((xp - mu_p) / var).detach())[1]
        terminal = bool(ki == K - 1)
        if terminal:
            rg_next = torch.func.grad(lambda x: reward(x).sum())(xp.detach()).detach()
            flow_next = beta * gn * rg_next
        else:
            rg_next = torch.func.grad(lambda x: reward(chain.x0_hat(x, policy(x, tn), ki + 1)).sum())(xp.detach())
            rg_next = rg_next.detach()  # stop-gradient w.r.t. theta
            flow_next = beta * gn * rg_next + flow(xp, tn)
        rg_cur = torch.func.grad(lambda x: reward(chain.x0_hat(x, policy(x, t), ki)).sum())(xt.detach()).detach()
        flow_cur = beta * gc * rg_cur + flow(xt, t)
        rev_res = rev_t if terminal else (rev_t - rev_p) + flow_cur  # terminal rows: the official zero target
        fwd = fwd + w * ((s_fwd - flow_next) ** 2).mean()
        rev = rev + w * (rev_res ** 2).mean()
        reg = reg + ((eps_t - eps_old[i:i + 1]) ** 2).mean()
        if terminal:
            term = term + (flow(xp, tn) ** 2).mean()
            n_term += 1
    n = len(k)
    return {"fwd": fwd.squeeze() / n, "rev": rev.squeeze() / n, "terminal": term / (n_term + 1e-6), "reg": reg / n}


@pytest.mark.parametrize("gamma, weighting", [("squared", "none"), ("sqrt", "eps")])
def test_nabla_db_loss_values_and_gradients_match_a_row_by_row_reference_in_float64(gamma, weighting):
    chain = build_chain("ddim", RING_SCHEDULE, 49, 1.0)
    prior, policy, flow = _nets()
    reward = RingReward().double()
    args = _transitions(chain)
    got = nabla_db_losses(chain, policy, prior, flow, reward, *args, beta=1.5, gamma=gamma, weighting=weighting)
    want = _reference(chain, policy, prior, flow, reward, *args, beta=1.5, gamma=gamma, weighting=weighting)
    params = list(policy.parameters()) + list(flow.parameters())
    for key in ("fwd", "rev", "terminal", "reg"):
        assert torch.allclose(got[key], want[key], rtol=1e-10, atol=1e-12), key
        g1 = torch.autograd.grad(got[key], params, retain_graph=True, allow_unused=True)
        g2 = torch.autograd.grad(want[key], params, retain_graph=True, allow_unused=True)
        for a, b in zip(g1, g2):
            a = torch.zeros_like(b) if a is None and b is not None else a
            b = torch.zeros_like(a) if b is None and a is not None else b
            if a is not None:
                assert torch.allclose(a, b, rtol=1e-9, atol=1e-11), key
    # the reverse loss reaches only g_phi (theta's path is cut, as in the official code)
    assert all(g is None or g.abs().max() == 0 for g in torch.autograd.grad(
        got["rev"], list(policy.parameters()), retain_graph=True, allow_unused=True))


def test_residuals_vanish_at_the_prior_with_beta_zero_and_terminal_condition_is_exact():
    chain = build_chain("ddim", RING_SCHEDULE, 49, 1.0).double()
    prior, _, flow = _nets()
    policy = copy.deepcopy(prior).requires_grad_(True)
    reward = RingReward().double()
    x_t, x_prev, _, k = _transitions(chain, n=40)
    eps_old = policy(x_t, chain.state_timestep(k)).detach()
    zero = zero_output(copy.deepcopy(flow))
    out = nabla_db_losses(chain, policy, prior, zero, reward, x_t, x_prev, eps_old, k, beta=0.0)
    for key in ("fwd", "terminal", "reg"):
        assert out[key] == 0, key
    term = k == chain.num_steps - 1
    assert (out["fwd_res"] == 0).all() and (out["rev_res"][~term] == 0).all()
    # terminal reverse rows have the official zero target: their residual is the policy's own reverse score, a
    # value without gradient (errata 3)
    assert (out["rev_res"][term] != 0).all()
    # theta = prior, beta > 0, a non-zero g_phi: on terminal rows the target is exactly beta * alpha_K * grad log r
    # at the sample (no g_phi; errata 2), elsewhere beta * gamma * grad log r(x0_hat) + g_phi
    beta = 2.0
    out = nabla_db_losses(chain, policy, prior, flow, reward, x_t, x_prev, eps_old, k, beta=beta)
    grad_r = -(x_prev - reward.center.double()) / reward.rho ** 2
    alpha_final = chain.state_alpha(torch.tensor([chain.num_steps])).double()
    assert alpha_final.item() == pytest.approx(float(chain.alphas_cumprod[0]))
    assert torch.allclose(out["fwd_res"][term], -beta * alpha_final * grad_r[term], atol=1e-12)
    assert not torch.allclose(out["fwd_res"][~term], -beta * grad_r[~term], atol=1e-3)
    assert out["terminal"] > 0  # |g_phi(x_K)|^2 pushes the correction to zero at the sample


def test_every_residual_is_finite_on_the_ring_chain_and_a_deterministic_step_is_refused():
    chain = build_chain("ddim", RING_SCHEDULE, 49, 1.0).double()
    prior, policy, flow = _nets()
    g = torch.Generator().manual_seed(0)
    states = chain.sample(prior, (16, 2), generator=g, keep=True, start=torch.randn(16, 2, generator=g).double())
    k = torch.arange(chain.num_steps).repeat_interleave(16)
    rows = torch.arange(16).repeat(chain.num_steps)
    out = nabla_db_losses(chain, policy, prior, flow, RingReward().double(), states["states"][k, rows],
                          states["states"][k + 1, rows], states["eps"][k, rows], k, beta=1.0)
    assert torch.isfinite(out["fwd_res"]).all() and torch.isfinite(out["rev_res"]).all()
    assert build_chain("ddpm", RING_SCHEDULE, 49, 1.0).zero_noise_steps() == [48]


def test_subsampling_takes_the_terminal_step_and_one_per_chunk():
    g = torch.Generator().manual_seed(0)
    steps = subsample_steps(50, 500, 0.1, g)  # the official 50 steps: the terminal one, then one per 10 steps
    assert steps.shape == (500, 6)
    assert (steps[:, 0] == 49).all()
    for c in range(5):
        assert set(steps[:, c + 1].tolist()) == set(range(10 * c, 10 * c + 10))
    steps = subsample_steps(49, 500, 0.1, g)
    assert steps.shape == (500, 5)
    assert (steps[:, 0] == 48).all()
    edges = torch.linspace(0, 49, 5).long()
    for c in range(4):
        col = steps[:, c + 1]
        assert (col >= edges[c]).all() and (col < edges[c + 1]).all()
        assert len(col.unique()) == int(edges[c + 1] - edges[c])  # every step of the chunk gets picked
    assert subsample_steps(49, 3, 0.0, g).tolist() == [[48]] * 3
    free = subsample_steps(49, 200, 0.1, g, stratified=False)  # the official low_var_subsampling=False
    assert (free[:, 0] == 48).all() and (free[:, 1:] < 48).all()
    assert all(len(set(row)) == 4 for row in free[:, 1:].tolist())


def test_ring_metrics_and_frechet_distance():
    w, means, std = ring_target(1.0)
    g = torch.Generator().manual_seed(0)
    which = torch.multinomial(w, 20_000, replacement=True, generator=g)
    x = means[which] + std * torch.randn(20_000, 2, generator=g, dtype=torch.float64)
    m = ring_metrics(x, RingReward(), w)
    assert m["tv"] < 0.02 and m["on_support"] > 0.97
    assert m["mode_entropy"] == pytest.approx(float(-(w * w.log()).sum()), abs=0.02)
    collapsed = ring_metrics(torch.tensor([[4.0, 0.0]]).repeat(100, 1), RingReward(), w)
    assert collapsed["on_support"] == 0 and collapsed["reward"] == 0
    a = torch.randn(5000, 3, generator=g, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    assert frechet_distance(a, a + shift) == pytest.approx(float((shift ** 2).sum()), abs=1e-6)
    assert frechet_distance(a, 2 * a) == pytest.approx(float(a.T.cov().trace() + (a.mean(0) ** 2).sum()), rel=1e-6)


class _Scale(torch.nn.Module):
    """An epsilon network without matmuls (autocast leaves it in float32)."""

    def __init__(self, a: float):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))

    def forward(self, x, t):
        return self.a * x + 1e-3 * t.float().reshape(-1, *([1] * (x.dim() - 1)))


def test_classifier_reward_metrics_and_reward_gradients_stay_float32_under_bf16_autocast():
    """Under bf16-mixed (a manual-optimisation training step runs inside autocast) the rewards, their input
    gradients (which steer the samples) and the metrics' classifier features (compared with the reference's,
    computed outside autocast) are float32: the same as without autocast."""
    from lightning_modules.nabla_gfn_rewards import ClassifierReward, image_metrics

    reward, clf = ClassifierReward(classes=[3]), digits_classifier()[0]
    x = digits("test")[0][:64]
    chain = build_chain("ddim", CFG, 10, 1.0)
    k, ref_features = torch.tensor([9, 3, 5, 9]), clf.features(x)
    x_t, x_prev, eps_old = x[:4], x[4:8], torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def run():
        xg = x.clone().requires_grad_(True)
        r = reward(xg)
        with torch.autocast("cpu", enabled=False):  # a backward pass outside autocast, as the call sites run it
            grad, = torch.autograd.grad(r.sum(), xg)
        parts = nabla_db_losses(chain, _Scale(0.3), _Scale(0.5), None, reward, x_t, x_prev, eps_old, k, 1.0)
        metrics = image_metrics(x, reward, clf, ref_features, [3])
        return r, grad, parts, metrics

    want = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run()
    assert got[0].dtype == torch.float32 and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert all(torch.equal(got[2][key], want[2][key]) for key in want[2]) and got[3] == want[3]


def test_digits_classifier_reward_and_folder_rewards(tmp_path):
    clf, acc = digits_classifier()
    assert acc > 0.9
    x, y = digits("test")
    from lightning_modules.nabla_gfn_rewards import ClassifierReward

    reward = ClassifierReward(classes=[3])
    r = reward(x[:200])
    assert r[y[:200] == 3].mean() > r[y[:200] != 3].mean() + 3
    # a TorchScript reward model in a folder, and a transformers image classifier saved there
    (tmp_path / "ts").mkdir()
    torch.jit.script(RingReward()).save(str(tmp_path / "ts" / "reward.pt"))
    folder = FolderReward(str(tmp_path / "ts"))
    p = torch.randn(5, 2, requires_grad=True)
    assert torch.allclose(folder(p), RingReward()(p))
    folder(p).sum().backward()
    assert p.grad.abs().sum() > 0
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=16, patch_size=8, num_channels=1, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=16, id2label={0: "plain", 1: "three"},
                       label2id={"plain": 0, "three": 1})
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    hf = FolderReward(str(tmp_path / "vit"), label="three")
    img = x[:4].clone().requires_grad_(True)
    out = hf(img)
    assert out.shape == (4,) and (out <= 0).all()
    out.sum().backward()
    assert img.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="reward label 'four' is not one of"):
        FolderReward(str(tmp_path / "vit"), label="four")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FolderReward(str(tmp_path / "missing"))
