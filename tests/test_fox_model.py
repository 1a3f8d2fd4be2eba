"""FoX network: decoding with the KV(+gate) cache, baselines by flags, init and parameter groups."""
import math

import pytest
import torch

from lightning_modules.fox_lm import FoXLM, position_bins
from lightning_modules.fox_model import FoXConfig, FoXTransformer, gate_bias_from_decay_times
from lightning_modules.layers.generation import SamplingConfig, left_pad


def tiny(**kw):
    cfg = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, mlp_multiple_of=16)
    cfg.update(kw)
    torch.manual_seed(0)
    model = FoXTransformer(FoXConfig(**cfg)).double().eval()
    with torch.no_grad():  # move gates and shift mixes away from their init so the test is not trivial
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


VARIANTS = {
    "fox_llama": dict(),
    "fox_pro": dict(block="pro"),
    "rope": dict(fgate="none", rope=True),
    "nope": dict(fgate="none"),
    "bias_only": dict(fgate="bias_only", fgate_bias_init=[2.0, 50.0]),
    "fixed_pro_rope": dict(fgate="fixed", fgate_bias_init=[2.0, 50.0], block="pro", rope=True),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_cached_decoding_equals_full_recomputation(name):
    model = tiny(**VARIANTS[name])
    idx = torch.randint(0, 50, (2, 21))
    full = model(idx)
    logits, caches = model(idx[:, :9], use_cache=True)  # prefill
    steps = [logits]
    for t in range(9, 21):  # then one token at a time
        logits, caches = model(idx[:, t:t + 1], caches, use_cache=True)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)
    assert caches[0].length == 21
    if model.cfg.fgate != "none":
        assert caches[0].cum_log_f.shape == (2, 4, 21) and caches[0].cum_log_f.dtype == torch.float64


@pytest.mark.parametrize("name", ["fox_llama", "fox_pro", "rope"])
def test_generate_with_cache_equals_without(name):
    model = tiny(**VARIANTS[name])
    prompts = [[3, 4, 5, 6, 7], [9, 1], [2, 2, 2, 8]]  # different lengths: one left-padded batch
    greedy = SamplingConfig(max_new_tokens=12, temperature=0)
    a = model.generate(prompts, greedy, use_cache=True)
    b = model.generate(prompts, greedy, use_cache=False)
    assert a == b and all(len(x) == 12 for x in a)
    alone = [model.generate([p], greedy)[0] for p in prompts]  # the padding changes nothing
    assert a == alone
    sampled = SamplingConfig(max_new_tokens=8, temperature=0.8, top_k=10, top_p=0.9, seed=3)
    s1 = model.generate(prompts, sampled)
    assert s1 == model.generate(prompts, sampled, use_cache=False)  # same seed, same draws
    assert s1 != model.generate(prompts, SamplingConfig(max_new_tokens=8, temperature=0.8, top_k=10, top_p=0.9,
                                                        seed=4))


def test_generation_stops_at_eos_per_row():
    model = tiny()
    prompts = [[3, 4, 5], [9, 1]]
    free = model.generate(prompts, SamplingConfig(max_new_tokens=10, temperature=0))
    eos = free[0][2]  # the third token row 0 produces
    out = model.generate(prompts, SamplingConfig(max_new_tokens=10, temperature=0), eos_id=eos)
    assert out[0] == free[0][:3]  # EOS kept, nothing after it
    cut = free[1].index(eos) + 1 if eos in free[1] else 10
    assert out[1] == free[1][:cut]


@pytest.mark.parametrize("backend", ["dense", "native", "blockwise"])
@pytest.mark.parametrize("name", ["fox_llama", "fox_pro", "rope", "fixed_pro_rope"])
def test_left_padded_rows_equal_rows_alone(name, backend):
    """A left-padded batch (segment 0 = padding) gives every row the logits it has alone, prefill and decode."""
    model = tiny(**VARIANTS[name], attn_backend=backend, attn_block_size=4)
    lengths = [11, 4, 7]
    rows = [torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]
    tokens, seg = left_pad([r.tolist() for r in rows])
    logits, caches = model(tokens, use_cache=True, segment_ids=seg)
    nxt = torch.tensor([[5], [6], [7]])
    seg2 = torch.cat([seg, seg[:, -1:]], 1)
    step, _ = model(nxt, caches, use_cache=True, segment_ids=seg2)
    for i, r in enumerate(rows):
        alone = model(torch.cat([r, nxt[i]])[None])
        torch.testing.assert_close(logits[i, -len(r):], alone[0, :-1], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(step[i, 0], alone[0, -1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", ["dense", "native", "blockwise"])
@pytest.mark.parametrize("name", ["fox_llama", "fox_pro", "nope"])
def test_packed_documents_equal_documents_alone(name, backend):
    """Documents packed into one sequence (segment ids): the same outputs and parameter gradients as the documents
    run one by one, float64."""
    model = tiny(**VARIANTS[name], attn_backend=backend, attn_block_size=8)
    docs = [torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(n)) for n in (6, 19, 11)]
    packed = torch.cat(docs)[None]
    seg = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    weights = torch.randn(1, len(packed[0]), 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model.zero_grad()
    out = model(packed, segment_ids=seg)
    (out * weights).sum().backward()
    grads_packed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    lo, outs = 0, []
    for d in docs:
        o = model(d[None])
        (o * weights[:, lo:lo + len(d)]).sum().backward()
        outs.append(o)
        lo += len(d)
    torch.testing.assert_close(out, torch.cat(outs, 1), rtol=1e-9, atol=1e-10)
    for p, g in zip(model.parameters(), grads_packed):
        torch.testing.assert_close(g, p.grad, rtol=1e-8, atol=1e-10)


def test_parameter_count_matches_spec_tiny_config():
    """Spec 4.2: d=128, 4 layers, 4 heads, vocab 256 -> FoX 1,117,328 and RoPE/NoPE 1,115,264 parameters."""
    count = lambda **kw: sum(p.numel() for p in FoXTransformer(FoXConfig(vocab_size=256, **kw)).parameters())
    assert count() == 1_117_328
    assert count(fgate="none", rope=True) == 1_115_264


def test_pro_block_parameter_matching():
    """Pro: the output gate adds d^2 per layer and hidden_ratio 3.5 removes it (d=1536 in the spec)."""
    llama = FoXConfig(vocab_size=8, d_model=1536, n_layers=1, n_heads=24, fgate="none")
    pro = FoXConfig(vocab_size=8, d_model=1536, n_layers=1, n_heads=24, fgate="none", block="pro")
    from lightning_modules.layers.mlp import swiglu_hidden_size
    assert swiglu_hidden_size(1536, llama.hidden_ratio, 256) == 4096
    assert swiglu_hidden_size(1536, pro.hidden_ratio, 256) == 3584
    assert 3 * 1536 * (4096 - 3584) == 1536 ** 2


def test_decay_time_init_gives_requested_tau():
    bias = gate_bias_from_decay_times(4, 2.0, 200.0)
    tau = -1.0 / torch.nn.functional.logsigmoid(bias.double())
    torch.testing.assert_close(tau, torch.logspace(math.log10(2), math.log10(200), 4, dtype=torch.float64),
                               rtol=1e-5, atol=0)


def test_full_gate_init_is_official_no_special_bias():
    model = FoXTransformer(FoXConfig(vocab_size=16, d_model=64, n_layers=1, n_heads=2))
    gate = model.blocks[0].attn.fgate_proj
    assert torch.all(gate.bias == 0)
    assert abs(gate.weight.std().item() - 0.02) < 0.005


def test_weight_decay_groups():
    model = FoXTransformer(FoXConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, block="pro",
                                     fgate="bias_only"))
    decay, no_decay = model.param_groups(0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert "blocks.0.attn.q_proj.weight" in decayed and "embed.weight" in decayed
    assert "blocks.0.attn.k_shift.mix_proj.weight" in decayed
    assert {"blocks.0.attn.fgate_bias", "blocks.0.attn.q_norm.weight", "blocks.0.attn.o_norm.weight",
            "norm.weight", "blocks.0.attn_norm.weight"} <= not_decayed
    assert decayed.isdisjoint(not_decayed) and len(decayed) + len(not_decayed) == len(names)


def test_gate_math_is_fp32_under_bf16_autocast():
    model = FoXTransformer(FoXConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2))
    attn = model.blocks[0].attn
    with torch.autocast("cpu", dtype=torch.bfloat16):
        log_f = attn.log_forget_gate(torch.randn(2, 5, 32))
    assert log_f.dtype == torch.float32


@pytest.mark.parametrize("kwargs, match", [
    (dict(d_model=30, n_heads=4), "d_model=30 is not divisible by n_heads=4"),
    (dict(n_layers=0), "n_layers must be a positive integer, got 0"),
    (dict(d_model=-8), "d_model must be a positive integer, got -8"),
    (dict(fgate="sometimes"), "fgate='sometimes'"),
    (dict(fgate="full", fgate_bias_init=[1.0, 2.0]), "fgate_bias_init applies"),
])
def test_bad_model_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FoXConfig(vocab_size=16, **kwargs)


def test_position_bins():
    assert position_bins(128, 512) == [(0, 64), (64, 128), (128, 256), (256, 512)]
    assert position_bins(128, 128) == [(0, 64), (64, 128)]


def test_lightning_module_builds_lazily_and_validates():
    lm = FoXLM(d_model=32, n_layers=1, n_heads=2)
    assert lm.model is None
    lm._build(64)
    assert lm.vocab_size == 64 and lm.model.lm_head.out_features == 64 and lm.hparams.vocab_size is None
    with pytest.raises(ValueError, match="lr must be > 0"):
        FoXLM(lr=-1.0)


def test_activation_checkpointing_gives_the_same_gradients():
    model = tiny(block="pro")
    model.train()
    idx = torch.randint(0, 50, (2, 17))

    def grads(checkpointing):
        model.activation_checkpointing = checkpointing
        model.zero_grad()
        model(idx).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(False), grads(True)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_evaluation_state_lives_on_the_networks_device_not_self_device():
    """Under FSDP (the large recipes) torch moves the parameters without the module's ``.to``, so Lightning's
    ``self.device`` stays CPU while the network is on the GPU: the per-position and gate metrics must follow the
    parameters (here ``self.device`` is made to disagree with them)."""
    lm = FoXLM(vocab_size=50, d_model=32, n_layers=2, n_heads=4, mlp_multiple_of=16, train_seq_len=8)
    lm._device = torch.device("meta")
    lm._start_eval()
    assert lm.pos_loss.total.device.type == "cpu" and lm.gate_stats.n.device.type == "cpu"
    x = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        lm._eval_step((x[:, :-1], x[:, 1:]), 0)
    assert int((lm.pos_loss.count > 0).sum()) == 8 and float(lm.gate_stats.n) == 2 * 8


def test_gradient_clipping_under_fsdp_goes_through_the_root_module():
    """Lightning's FSDP precision plugin refuses clipping by norm; the large recipes clip at 1.0 through the root
    FSDP module's ``clip_grad_norm_`` instead (an FSDP subclass that records the call stands in for it on CPU)."""
    from types import SimpleNamespace

    from torch.distributed.fsdp import FullyShardedDataParallel

    class RecordingFSDP(FullyShardedDataParallel):
        def __init__(self):
            torch.nn.Module.__init__(self)
            self.calls = []

        def clip_grad_norm_(self, max_norm, norm_type=2.0):
            self.calls.append(max_norm)

    lm = FoXLM(vocab_size=50, d_model=32, n_layers=1, n_heads=4, mlp_multiple_of=16)
    root = RecordingFSDP()
    lm._trainer = SimpleNamespace(strategy=SimpleNamespace(model=root))
    lm.configure_gradient_clipping(None, 1.0, "norm")
    lm.configure_gradient_clipping(None, 0.5, None)
    assert root.calls == [1.0, 0.5]
