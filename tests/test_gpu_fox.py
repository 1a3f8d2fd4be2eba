"""FoX on CUDA (``pytest -m gpu``; skipped without a GPU): the ``flex`` and ``fla`` kernels against the ``dense``
reference in fp32 and bf16, values and gradients, at decode shapes and on packed documents; the model in bf16
autocast with each backend; cached decoding; the tiny recipe trained in bf16-mixed with each backend.

Errors are measured relative to the largest reference entry, against a float64 dense reference, so one tolerance
holds at every length.  scripts/gpu_check.sh runs this file with the other gpu tests."""
import csv
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.layers.forgetting_attention import fla_available, forgetting_attention
from tests.helpers import SMALL_DATA, run_cli, run_dir_args

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
TOL = {torch.float32: 5e-3, torch.bfloat16: 3e-2}  # max |got - ref| / max |ref|
BACKENDS = ["flex", "fla"]


@pytest.fixture(autouse=True, scope="module")
def many_compiled_shapes():
    """Every shape bucket compiles FlexAttention once; past dynamo's default recompile limit (8) it would silently
    run eager (and materialise the T x T mask), so this file's ~20 buckets get room."""
    import torch._dynamo

    cfg = torch._dynamo.config
    limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    old = getattr(cfg, limit)
    setattr(cfg, limit, max(old, 64))
    yield
    setattr(cfg, limit, old)


def need(backend):
    if backend == "fla" and not fla_available():
        pytest.skip("fla-core is not installed")


def make(b, h, tq, tk, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(b, h, t, d, device="cuda", generator=g) for t in (tq, tk, tk))
    log_f = F.logsigmoid(2 * torch.randn(b, h, tk, device="cuda", generator=g) + 2.0)
    return [x.to(dtype).requires_grad_() for x in (q, k, v)] + [log_f.requires_grad_()]


def run(backend, xs, upstream, **kw):
    for x in xs:
        x.grad = None
    out = forgetting_attention(*xs, backend=backend, **kw)
    out.backward(upstream.to(out.dtype))
    return [out.detach().double()] + [x.grad.double() for x in xs]


def reference(xs, upstream, **kw):
    ref = [x.detach().double().requires_grad_() for x in xs]
    return run("dense", ref, upstream.double(), **kw)


def assert_close(got, ref, dtype, what):
    for name, g, r in zip(["out", "dq", "dk", "dv", "dlog_f"], got, ref):
        err = ((g - r).abs().max() / r.abs().max().clamp_min(0.1)).item()  # exact zeros: T = 1
        assert err < TOL[dtype], f"{what} {name}: relative error {err:.2e} >= {TOL[dtype]}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("t, d", [(1, 64), (1000, 64), (2048, 128)])  # flex buckets: 128, 1024, 2048
def test_kernel_matches_dense(backend, dtype, t, d):
    need(backend)
    xs = make(2, 4, t, t, d, dtype)
    upstream = torch.randn(2, 4, t, d, device="cuda")
    assert_close(run(backend, xs, upstream), reference(xs, upstream), dtype, f"{backend} T={t} D={d}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tq, tk", [(1, 257), (16, 300), (64, 1024)])
def test_flex_at_decode_shapes(dtype, tq, tk):
    """Queries are the last ``tq`` positions of ``tk`` keys (prefill chunks and single-token decode steps)."""
    xs = make(2, 4, tq, tk, 64, dtype, seed=1)
    with torch.no_grad():
        got = forgetting_attention(*xs, backend="flex").double()
        ref = forgetting_attention(*(x.double() for x in xs), backend="dense")
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err < TOL[dtype], f"Tq={tq} Tk={tk}: relative error {err:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_grows_linearly_with_length(backend):
    """Peak memory of fwd+bwd beyond the inputs: 4x the length may cost at most 1.5 x 4x the memory (a T x T mask
    or score matrix would cost 16x)."""
    need(backend)
    peak = {}
    for t in (4096, 16384):
        xs = make(1, 4, t, t, 128, torch.bfloat16)
        upstream = torch.randn(1, 4, t, 128, device="cuda", dtype=torch.bfloat16)
        run(backend, xs, upstream)  # compile / tune first
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run(backend, xs, upstream)
        torch.cuda.synchronize()
        peak[t] = torch.cuda.max_memory_allocated() - before
    assert peak[16384] <= 1.5 * 4 * peak[4096], peak


def test_fla_refuses_decode_shapes_in_one_line():
    need("fla")
    xs = make(1, 2, 4, 32, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="as many queries as keys"):
        forgetting_attention(*xs, backend="fla")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_documents_match_dense(backend, dtype):
    """Three documents packed in row 0, a left-padded row 1: the gate restarts and no query sees another document."""
    need(backend)
    t = 524
    seg = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate([100, 300, 124])]),
                       torch.cat([torch.zeros(37), torch.ones(t - 37)])]).long().cuda()
    xs = make(2, 4, t, t, 64, dtype, seed=2)
    upstream = torch.randn(2, 4, t, 64, device="cuda")
    assert_close(run(backend, xs, upstream, segment_ids=seg), reference(xs, upstream, segment_ids=seg), dtype,
                 f"{backend} documents")


def tiny_model(backend, dtype=torch.float32):
    from lightning_modules.fox_model import FoXConfig, FoXTransformer

    torch.manual_seed(0)
    cfg = FoXConfig(vocab_size=256, d_model=128, n_layers=2, n_heads=2, block="pro", attn_backend=backend)
    return FoXTransformer(cfg).cuda().to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_in_bf16_autocast_matches_dense(backend):
    """The Pro-block model's loss and gradients under bf16 autocast with each kernel, against the dense backend."""
    need(backend)
    x = torch.randint(0, 256, (2, 513), generator=torch.Generator().manual_seed(0)).cuda()
    losses, grads = {}, {}
    for name in ("dense", backend):
        model = tiny_model(name)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        losses[name] = loss.item()
        grads[name] = torch.cat([p.grad.flatten().float() for p in model.parameters()])
    assert math.isfinite(losses[backend]) and abs(losses[backend] - losses["dense"]) < 1e-2 * losses["dense"]
    cos = F.cosine_similarity(grads[backend], grads["dense"], dim=0).item()
    assert cos > 0.99, f"gradient cosine {cos:.4f}"


def test_cached_decoding_on_cuda_equals_uncached():
    from lightning_modules.layers.generation import SamplingConfig

    model = tiny_model("auto").eval()
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (40, 97)]
    cfg = SamplingConfig(max_new_tokens=24, temperature=0.0)
    cached = model.generate(prompts, cfg, use_cache=True)
    assert cached == model.generate(prompts, cfg, use_cache=False)
    assert [len(t) for t in cached] == [24, 24]


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_fox_recipe_trains_in_bf16_mixed(backend, tmp_path):
    """fox_lm.yaml on the GPU in bf16-mixed, 40 steps, with each kernel: the training loss falls."""
    need(backend)
    proc = run_cli(["fit", "--config", "recipes/fox_lm.yaml", f"--model.init_args.attn_backend={backend}",
                    "--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.precision=bf16-mixed",
                    "--trainer.max_steps=40", "--trainer.val_check_interval=40", "--trainer.log_every_n_steps=1",
                    "--data.init_args.val_windows=2", *SMALL_DATA, *run_dir_args(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    key = next(k for k in rows[0] if k.startswith("train/loss"))
    losses = [float(r[key]) for r in rows if r.get(key)]
    assert len(losses) >= 30 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
