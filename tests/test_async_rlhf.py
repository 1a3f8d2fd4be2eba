"""Asynchronous RLHF, the pieces: the losses against hand computations in float64 (values and gradients), the toy's
gold reward, the actor's version schedule, the actor process (versions stamped per batch, async vs sync wall time
with a sleeping generator and learner, a crash reported, no orphan when the learner dies)."""
import math
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from datamodules.rlhf_actor import Actor, PromptSampler, Schedule
from datamodules.processes import WorkerError, worker_pids_alive
from lightning_modules.layers.causal_lm import response_logprobs
from lightning_modules.layers.preference_losses import (best_of_k_nll, dpo_loss, ppo_advantages, ppo_losses,
                                                        ppo_token_rewards, rloo_advantages, rloo_loss, select_pairs,
                                                        whiten)
from lightning_modules.layers.reward_models import ToyGoldReward, pack

D = torch.float64


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_response_logprobs_at_a_temperature_by_hand():
    logits = torch.tensor([[[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]]], dtype=D)
    tokens, mask, T = torch.tensor([[1, 2]]), torch.tensor([[1.0, 0.0]], dtype=D), 0.7
    got = response_logprobs(logits, tokens, mask, T)
    z = [v / (T + 1e-7) for v in (1.0, 2.0, 0.5)]
    want = z[1] - math.log(sum(math.exp(v) for v in z))
    assert got[0, 0].item() == pytest.approx(want, rel=1e-12) and got[0, 1].item() == 0.0


def test_select_pairs_best_and_worst_and_ties():
    scores = torch.tensor([[0.2, 0.9, 0.5], [0.3, 0.3, 0.3]], dtype=D)
    c, r, tie = select_pairs(scores)
    assert c.tolist() == [1, 3] and r.tolist() == [0, 3] and tie.tolist() == [False, True]


def test_dpo_sigmoid_and_ipo_values_and_gradients_by_hand():
    pc = torch.tensor([-1.0, -3.0], dtype=D, requires_grad=True)
    pr = torch.tensor([-2.0, -1.0], dtype=D, requires_grad=True)
    rc, rr, beta = torch.tensor([-1.5, -2.0], dtype=D), torch.tensor([-1.5, -1.5], dtype=D), 0.1
    h = [(-1.0 + 2.0) - (-1.5 + 1.5), (-3.0 + 1.0) - (-2.0 + 1.5)]  # 1.0, -1.5
    loss, stats = dpo_loss(pc, pr, rc, rr, beta)
    assert loss.item() == pytest.approx(sum(-math.log(sig(beta * x)) for x in h) / 2, rel=1e-12)
    loss.backward()
    want = [-beta * sig(-beta * x) / 2 for x in h]  # d/d pi_chosen; d/d pi_rejected is its negative
    assert pc.grad.tolist() == pytest.approx(want, rel=1e-12)
    assert pr.grad.tolist() == pytest.approx([-w for w in want], rel=1e-12)
    assert stats["accuracy"].item() == 0.5
    assert stats["margin"].item() == pytest.approx(beta * sum(h) / 2, rel=1e-12)
    ipo, _ = dpo_loss(pc.detach(), pr.detach(), rc, rr, beta, kind="ipo")
    assert ipo.item() == pytest.approx(sum((x - 1 / (2 * beta)) ** 2 for x in h) / 2, rel=1e-12)


def test_a_tied_pair_is_kept_as_log2_with_zero_gradient_or_masked():
    seq = torch.tensor([-1.0, -2.0, -4.0, -4.5], dtype=D, requires_grad=True)  # prompt 0: 2 samples; prompt 1: tie
    ref = torch.tensor([-1.2, -1.9, -4.1, -4.4], dtype=D)
    c, r, tie = select_pairs(torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=D))
    loss, _ = dpo_loss(seq[c], seq[r], ref[c], ref[r], 0.1)
    h0 = (-1.0 + 2.0) - (-1.2 + 1.9)
    assert loss.item() == pytest.approx((-math.log(sig(0.1 * h0)) + math.log(2)) / 2, rel=1e-12)  # official
    loss.backward()
    assert seq.grad[2:].tolist() == [0.0, 0.0]
    masked, _ = dpo_loss(seq[c], seq[r], ref[c], ref[r], 0.1, keep=~tie)
    assert masked.item() == pytest.approx(-math.log(sig(0.1 * h0)), rel=1e-12)


def test_rloo_leave_one_out_advantages_and_clipped_sequence_ratio_by_hand():
    scores = torch.tensor([[1.0, 0.0, 0.5]], dtype=D)
    lb, lref, kl = torch.tensor([-1.0, -2.0, -3.0], dtype=D), torch.tensor([-1.5, -1.0, -3.0], dtype=D), 0.1
    rew = [1.0 - kl * 0.5, 0.0 - kl * -1.0, 0.5 - 0.0]
    adv = rloo_advantages(scores, lb, lref, kl)
    assert adv.tolist() == pytest.approx([rew[i] - (sum(rew) - rew[i]) / 2 for i in range(3)], rel=1e-12)
    assert rloo_advantages(torch.tensor([[0.7, 0.2]], dtype=D), torch.zeros(2, dtype=D), torch.zeros(2, dtype=D),
                           0.0).tolist() == pytest.approx([0.5, -0.5])
    new = torch.tensor([-0.5, -2.0, -3.5], dtype=D, requires_grad=True)  # ratios e^0.5 (clipped), 1, e^-0.5
    a = torch.tensor([1.0, -1.0, -2.0], dtype=D)
    loss = rloo_loss(new, lb, a, 0.2)
    r = [math.exp(0.5), 1.0, math.exp(-0.5)]
    terms = [-min(r[i] * a[i].item(), min(max(r[i], 0.8), 1.2) * a[i].item()) for i in range(3)]
    assert loss.item() == pytest.approx(sum(terms) / 3, rel=1e-12)
    loss.backward()  # clipped sample 0 (ratio above 1 + eps with A > 0) and sample 2 (below 1 - eps, A < 0): no grad
    assert new.grad.tolist() == pytest.approx([0.0, 1.0 / 3, 0.0], abs=1e-12)


def _gae_by_hand(rewards, values, lam):
    """gamma = 1, one sequence that ends after its last entry."""
    adv, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        nxt = values[t + 1] if t + 1 < len(rewards) else 0.0
        running = rewards[t] + nxt - values[t] + lam * running
        adv[t] = running
    return adv


def test_ppo_token_rewards_gae_whitening_and_losses_by_hand():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=D)
    lb = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -9.0]], dtype=D)
    lref = torch.tensor([[-1.5, -1.0, -0.5], [-0.5, -2.0, -9.0]], dtype=D)
    scores, kl = torch.tensor([1.0, -1.0], dtype=D), 0.1
    rewards = ppo_token_rewards(scores, lb, lref, mask, kl)
    assert rewards.flatten().tolist() == pytest.approx([-0.05, 0.1, 1.0, 0.05, -0.1 - 1.0, 0.0], rel=1e-12)
    values = torch.tensor([[0.2, 0.1, 0.3], [0.0, -0.4, 7.0]], dtype=D)
    adv, ret = ppo_advantages(rewards, values, mask, 1.0, 0.95)
    raw = [_gae_by_hand([-0.05, 0.1, 1.0], [0.2, 0.1, 0.3], 0.95), _gae_by_hand([0.05, -1.1], [0.0, -0.4], 0.95)]
    flat = raw[0] + raw[1]
    mean = sum(flat) / 5
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / 4)
    assert adv[0].tolist() == pytest.approx([(x - mean) / std for x in raw[0]], rel=1e-7)
    assert adv[1, :2].tolist() == pytest.approx([(x - mean) / std for x in raw[1]], rel=1e-7) and adv[1, 2] == 0
    assert ret[0].tolist() == pytest.approx([a + v for a, v in zip(raw[0], [0.2, 0.1, 0.3])], rel=1e-12)
    assert whiten(adv, mask)[mask > 0].std().item() == pytest.approx(1.0, rel=1e-6)
    logp = torch.tensor([[-0.9, -2.0, -0.2], [-1.0, -1.5, 0.0]], dtype=D, requires_grad=True)
    v = torch.tensor([[0.5, 0.1, 0.3], [0.0, -0.4, 0.0]], dtype=D, requires_grad=True)
    a = torch.tensor([[1.0, -1.0, 2.0], [0.5, -0.5, 0.0]], dtype=D)
    R = torch.tensor([[1.0, 0.0, 1.0], [0.0, -1.0, 0.0]], dtype=D)
    pg, vf = ppo_losses(logp, lb, a, v, values.detach(), R, mask, 0.2, 0.2)
    pgs, vfs = [], []
    for i in range(2):
        for t in range(3 if i == 0 else 2):
            ratio = math.exp(logp[i, t].item() - lb[i, t].item())
            pgs.append(-min(ratio * a[i, t].item(), min(max(ratio, 0.8), 1.2) * a[i, t].item()))
            vo, vn = values[i, t].item(), v[i, t].item()
            vc = vo + min(max(vn - vo, -0.2), 0.2)
            vfs.append(0.5 * max((vn - R[i, t].item()) ** 2, (vc - R[i, t].item()) ** 2))
    assert pg.item() == pytest.approx(sum(pgs) / 5, rel=1e-12) and vf.item() == pytest.approx(sum(vfs) / 5, rel=1e-12)
    (pg + vf).backward()
    assert logp.grad[1, 2] == 0 and v.grad[1, 2] == 0  # padding gets no gradient


def test_best_of_k_nll_picks_the_best_sample():
    seq = torch.tensor([-1.0, -2.0, -3.0, -4.0], dtype=D, requires_grad=True)
    loss = best_of_k_nll(seq, torch.tensor([[0.1, 0.9], [0.8, 0.2]], dtype=D))
    assert loss.item() == pytest.approx((2.0 + 3.0) / 2)
    loss.backward()
    assert seq.grad.tolist() == [0.0, -0.5, -0.5, 0.0]


def test_eos_truncation_and_sampling_from_a_configured_hugging_face_model():
    from lightning_modules.layers.causal_lm import build_lm, eos_mask, sample_responses

    resp = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8]])
    mask, has_eos = eos_mask(resp, eos_id=2)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]] and has_eos.tolist() == [True, False]
    torch.manual_seed(0)
    model = build_lm({"kind": "hf_config", "config": {"model_type": "gpt2", "vocab_size": 6, "n_embd": 16,
                                                      "n_layer": 1, "n_head": 2, "n_positions": 32}})
    prompts, pmask = torch.tensor([[0, 3, 4], [5, 1, 3]]), torch.tensor([[0.0, 1, 1], [1, 1, 1]])
    p, pm, a = sample_responses(model, prompts, pmask, 3, 12, 1.0, seed=7, eos_id=2, pad_id=0)
    _, _, b = sample_responses(model, prompts, pmask, 3, 12, 1.0, seed=7, eos_id=2, pad_id=0)
    assert torch.equal(a, b) and a.shape == (6, 12) and torch.equal(p[3], prompts[1])  # k-major per prompt
    m, ended = eos_mask(a, 2)
    assert ended.any() and (a[m == 0] == 0).all()  # a 6-token vocabulary ends some responses early; pad after EOS


def test_eos_mask_without_eos_id_keeps_the_responses_device():
    from lightning_modules.layers.causal_lm import eos_mask

    mask, has_eos = eos_mask(torch.zeros(2, 3, dtype=torch.long, device="meta"), None)
    assert mask.device.type == "meta" and has_eos.device.type == "meta" and has_eos.shape == (2,)


def test_toy_gold_reward_and_pack():
    prompts = torch.tensor([[0, 3, 7, 2]])
    perfect = torch.tensor([[1, 4, 0, 3, 1, 4, 0, 3]])
    half = torch.tensor([[1, 4, 0, 3, 5, 5, 5, 5]])
    rm, ones = ToyGoldReward(), torch.ones(1, 8)
    assert rm(prompts, torch.ones(1, 4), perfect, ones).item() == 1.0
    assert rm(prompts, torch.ones(1, 4), half, ones).item() == 0.5
    tokens, mask, pos = pack(torch.tensor([[0, 5, 6]]), torch.tensor([[0.0, 1, 1]]), torch.tensor([[7, 8, 0]]),
                             torch.tensor([[1.0, 1, 0]]), pad_id=0)
    assert tokens.tolist() == [[0, 0, 5, 6, 7, 8]] and mask.tolist() == [[0, 0, 1, 1, 1, 1]]
    assert pos.tolist() == [[0, 0, 0, 1, 2, 3]]


@pytest.mark.parametrize("L,M,want", [(1, 1, [0, 0, 1, 2, 3, 4]), (0, 1, [0, 1, 2, 3, 4, 5]),
                                      (0, 4, [0, 0, 0, 0, 4, 4, 4, 4, 8]), (3, 1, [0, 0, 0, 0, 1, 2]),
                                      (1, 4, [0, 0, 0, 0, 3, 3, 3, 3, 7])])
def test_schedule_versions(L, M, want):
    s = Schedule(L, M)
    assert [s.version(b) for b in range(len(want))] == want
    assert all(s.needed(v) for v in set(want))


def _fake_actor(L, M=1, sleep=0.0, **spec):
    return Actor({"kind": "fake", "sleep": sleep, **spec}, PromptSampler(4, seed=0), Schedule(L, M), n_params=3).start()


@pytest.mark.parametrize("L,M", [(1, 1), (0, 1), (3, 1), (0, 4), (2, 4)])
def test_actor_stamps_every_batch_with_update_minus_staleness(L, M):
    actor = _fake_actor(L, M)
    try:
        for t in range(10):
            actor.publish(torch.full((3,), float(t)), t)
            batch = actor.next_batch()
            assert batch["index"] == t and batch["version"] == Schedule(L, M).version(t)
    finally:
        actor.close()
    assert actor.proc.exitcode is not None


def test_async_wall_is_steps_times_max_and_sync_steps_times_sum():
    g = l_ = 0.05
    steps = 20
    walls = {}
    for name, L in (("sync", 0), ("async", 1)):
        actor = _fake_actor(L, sleep=g)
        try:
            start = time.perf_counter()
            for t in range(steps):
                actor.publish(torch.zeros(3), t)
                actor.next_batch()
                time.sleep(l_)  # the learner's update
            walls[name] = time.perf_counter() - start
        finally:
            actor.close()
    ratio = walls["async"] / walls["sync"]
    # ideal: steps * max(g, l) / (steps * (g + l)) = 0.5; generous bounds for a loaded machine
    assert 0.35 < ratio < 0.8, walls
    assert walls["sync"] > 0.9 * steps * (g + l_), walls


def test_a_failing_actor_stops_the_learner_with_its_traceback():
    actor = Actor({"kind": "lm", "policy": {"kind": "no-such-model"}}, PromptSampler(4, 0), Schedule(1, 1), 3)
    with pytest.raises(WorkerError, match="policy kind 'no-such-model'"):
        actor.start()
        actor.publish(torch.zeros(3), 0)
        actor.next_batch()
    actor.close()


LEARNER = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {root!r})
    from datamodules.rlhf_actor import Actor, PromptSampler, Schedule
    if __name__ == "__main__":
        actor = Actor({{"kind": "fake", "sleep": 0.01}}, PromptSampler(4, 0), Schedule(1, 1), 3).start()
        print(actor.proc.pid, flush=True)
        for t in range(10 ** 6):
            actor.publish(torch.zeros(3), t)
            actor.next_batch()
""")


def test_the_actor_ends_when_the_learner_is_killed(tmp_path):
    from pathlib import Path

    script = tmp_path / "learner.py"
    script.write_text(LEARNER.format(root=str(Path(__file__).resolve().parents[1])))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pid = int(proc.stdout.readline())
    time.sleep(0.3)
    assert worker_pids_alive([pid]) == [pid]
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    while worker_pids_alive([pid]) and time.time() < deadline:
        time.sleep(0.05)
    assert not worker_pids_alive([pid])


def test_critic_values_are_float32_under_bf16_autocast():
    from lightning_modules.layers.causal_lm import TinyGRULM
    from lightning_modules.online_dpo import Critic

    critic = Critic(TinyGRULM())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = critic(torch.randint(0, 8, (2, 4)), torch.ones(2, 4), torch.randint(0, 8, (2, 8)), torch.ones(2, 8))
    assert values.dtype == torch.float32 and values.shape == (2, 8)


def test_critic_values_and_policy_logits_at_token_t_do_not_see_token_t():
    """The value of response position t is read where the logits predicting y_t are: before y_t (TRL's PPO)."""
    from lightning_modules.layers.causal_lm import TinyGRULM, lm_forward
    from lightning_modules.online_dpo import Critic

    torch.manual_seed(0)
    critic, policy = Critic(TinyGRULM()), TinyGRULM()
    torch.nn.init.normal_(critic.head.weight)
    prompts, pmask, ones = torch.randint(0, 8, (1, 4)), torch.ones(1, 4), torch.ones(1, 8)
    a = torch.randint(0, 8, (1, 8))
    b = a.clone()
    b[0, 3] = (a[0, 3] + 1) % 8
    dv = (critic(prompts, pmask, a, ones) - critic(prompts, pmask, b, ones)).abs()[0]
    dl = (lm_forward(policy, prompts, pmask, a, ones)[0] - lm_forward(policy, prompts, pmask, b, ones)[0]).abs()
    assert dv[:4].max() == 0 and dv[4:].min() > 0
    assert dl[0, :4].max() == 0 and dl[0, 4:].max() > 0
