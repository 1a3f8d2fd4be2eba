"""Dualformer's model side: the encoder-decoder (float64: cache, padding, causality, attention against a plain
reference), the per-sequence loss against a hand loop, mode-forced decoding, a short overfit, the recipe report and
resume = uninterrupted (dropping RNG included)."""
import math

import pytest
import torch

from lightning_modules.dualformer import Dualformer, sequence_mean_cross_entropy
from lightning_modules.layers.encoder_decoder import Attention, EncoderDecoder
from recipes.cli import main
from tests.helpers import one_line_error, recipe_data_args, run_dir_args


def _model(positions="rope"):
    torch.manual_seed(0)
    return EncoderDecoder(20, d_model=32, n_layers=2, n_heads=4, positions=positions, max_len=64).double().eval()


def test_attention_matches_a_plain_softmax_reference_in_float64():
    torch.manual_seed(1)
    att = Attention(16, 2, rope=False).double()
    x, src = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[1, ..., 5:] = False
    out = att(x, att.keys_values(src), mask)
    q = att.q_proj(x).view(2, 5, 2, 8).transpose(1, 2)
    k, v = (t.view(2, 7, 2, 8).transpose(1, 2) for t in att.kv_proj(src).chunk(2, -1))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    scores = scores.masked_fill(~mask, float("-inf"))
    ref = att.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 16))
    assert torch.allclose(out, ref, atol=1e-12)
    g1, = torch.autograd.grad(out.sum(), src)
    g2, = torch.autograd.grad(ref.sum(), src)
    assert torch.allclose(g1, g2, atol=1e-12)


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_cached_decoding_padding_and_causality(positions):
    m = _model(positions)
    src = torch.randint(1, 20, (3, 9))
    tgt = torch.randint(1, 20, (3, 8))
    mask = torch.ones_like(src, dtype=torch.bool)
    full = m(src, mask, tgt)
    memory = m.encode(src, mask)
    logits, cache = m.decode(tgt[:, :3], memory, mask)
    steps = [logits]
    for t in range(3, 8):
        logits, cache = m.decode(tgt[:, t:t + 1], memory, mask, cache)
        steps.append(logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-10)  # the KV cache changes nothing
    two, _ = m.decode(tgt[:, 6:8], memory, mask, [dict(c) for c in m.decode(tgt[:, :6], memory, mask)[1]])
    assert torch.allclose(two, full[:, 6:8], atol=1e-10)  # several tokens after a cache
    padded = torch.cat([src, torch.zeros(3, 4, dtype=torch.long)], 1)
    assert torch.allclose(m(padded, padded.new_ones(padded.shape, dtype=torch.bool).index_fill(1, torch.arange(
        9, 13), False), tgt), full, atol=1e-10)  # right padding of the source is invisible
    changed = tgt.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 20
    assert torch.allclose(m(src, mask, changed)[:, :5], full[:, :5], atol=1e-12)  # causal decoder


def test_sequence_mean_loss_against_a_hand_loop_in_float64():
    torch.manual_seed(2)
    logits = torch.randn(3, 6, 11, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 10, (3, 6))
    targets[0, 4:] = 10
    targets[2, 1:] = 10  # pad id 10
    loss = sequence_mean_cross_entropy(logits, targets, pad_id=10)
    per_seq = []
    for b in range(3):
        terms = [-torch.log_softmax(logits[b, t], -1)[targets[b, t]] for t in range(6) if targets[b, t] != 10]
        per_seq.append(sum(terms) / len(terms))
    ref = sum(per_seq) / 3
    assert torch.allclose(loss, ref, atol=1e-12)
    assert torch.allclose(*(torch.autograd.grad(v, logits)[0] for v in (loss, ref)), atol=1e-12)


def _overfit_model(tmp_path, steps=60):
    from datamodules.dualformer_data import DroppedTraces, DualformerDataModule, PadCollate

    dm = DualformerDataModule(sizes=5, n_train=16, n_test=4, data_dir=str(tmp_path), mixture="full_trace",
                                  processes=1, seed=0)
    dm.setup()
    batch = PadCollate(dm.pad_id)([DroppedTraces(dm.train_set, dm.dropper, 0)[i] for i in range(16)])
    torch.manual_seed(0)
    model = Dualformer(max_size=5, d_model=64, n_layers=1, n_heads=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model._loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, dm, losses


def test_short_overfit_and_mode_forced_decoding(tmp_path):
    model, dm, losses = _overfit_model(tmp_path)
    assert losses[0] > 3.4 and losses[-1] < 1.6, (losses[0], losses[-1])  # from ln(39) = 3.66 (uniform)
    src = torch.stack([torch.nn.functional.pad(torch.tensor([dm.bos_id, *dm.train_set[i]["prompt"], dm.eos_id]),
                                               (0, 80))[:80] for i in range(4)])
    src[src == 0] = dm.pad_id
    fast = model.generate(src, "fast", max_new_tokens=40)
    slow = model.generate(src, "slow", max_new_tokens=40)
    assert all(r[0] == model.ids["plan"] for r in fast) and all(r[0] == model.ids["create"] for r in slow)
    auto = model.generate(src, "auto", max_new_tokens=5)
    assert all(r[0] == model.ids["create"] for r in auto)  # trained on full traces only: auto picks slow
    sampled = model.generate(src, "fast", samples=3, temperature=1.0, max_new_tokens=40, seed=1)
    assert len(sampled) == 12 and all(r[0] == model.ids["plan"] for r in sampled)
    with pytest.raises(ValueError, match="unknown mode 'medium'"):
        model.generate(src, "medium")


def _fit(tmp_path, *extra):
    recipe = "recipes/dualformer_maze.yaml"
    args = ["fit", "--config", recipe, *run_dir_args(tmp_path), *recipe_data_args(recipe, tmp_path.parent),
            "--trainer.val_check_interval=3", "--checkpoint.every_n_train_steps=3", "--data.init_args.batch_size=8",
            "--trainer.enable_progress_bar=false", *extra]
    return main(args)


def test_recipe_report_and_resume_equals_uninterrupted(tmp_path):
    assert _fit(tmp_path / "straight", "--trainer.max_steps=6") == 0
    assert _fit(tmp_path / "resumed", "--trainer.max_steps=3") == 0
    assert _fit(tmp_path / "resumed", "--trainer.max_steps=6", "--ckpt_path=last") == 0
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 6
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    run = tmp_path / "straight" / "logs" / "version_0"
    for name in ("modes.csv", "responses.csv", "trace_vs_optimal.png", "mazes.png"):
        assert (run / name).stat().st_size > 0, name
    header = (run / "modes.csv").read_text().splitlines()[0]
    assert "optimal_rate" in header and "optimal_8" in header and "slow_fraction" in header


@pytest.mark.parametrize("extra, needle", [
    (["--data.init_args.sizes=[2]"], "maze size must be an integer >= 3, got 2"),
    (["--data.init_args.mixture=[0.5,0.2,0.2,0.2,0.0]"], "must sum to 1, got [0.5, 0.2, 0.2, 0.2, 0.0]"),
    (["--data.init_args.mixture=dual"], "unknown trace mixture 'dual'"),
    (["--model.init_args.predict_mode=medium"], "unknown mode 'medium'"),
    (["--model.init_args.n_layers=0"], "model.n_layers must be a positive integer, got 0"),
    (["--data.init_args.data_dir={tmp}/a_file/mazes"], "a_file' is a file; expected a folder"),
    (["--model.init_args.max_size=7"], "model.max_size=7 (task 'maze', max_cost 0) does not match the data")])
def test_bad_input_is_one_line(extra, needle, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    extra = [e.format(tmp=tmp_path) for e in extra]
    assert _fit(tmp_path / "run", "--trainer.max_steps=1", *extra) == 2
    assert needle in one_line_error(capsys)
