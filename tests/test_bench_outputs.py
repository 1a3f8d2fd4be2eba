"""The benchmark scripts' pure helpers (FLOP counts, MFU, goal lines) against hand numbers and made-up rows, and the
shared output options (``--csv``, ``--write --doc``) at tiny CPU sizes; every file goes to ``tmp_path``."""
import argparse
import csv

import pytest
import torch
import torch.nn.functional as F

from scripts import _report
from scripts import bench_fox_attention as attn
from scripts import bench_fox_generate as gen
from scripts import bench_fox_lm as lm

BASE = attn.CUDA_BASELINE


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


# --------------------------------------------------------------------------------------------------------------
# FLOP counts and MFU
# --------------------------------------------------------------------------------------------------------------
def test_attention_flops_hand_numbers():
    # B=2, H=4, T=4096, D=128: 4 * 2 * 4 * 4096^2 * 128 = 2^36 non-causal forward, 2^35 causal
    assert attn.attention_flops(2, 4, 4096, 128, causal=False, mode="fwd") == 2 ** 36
    assert attn.attention_flops(2, 4, 4096, 128, mode="fwd") == 2 ** 35
    assert attn.attention_flops(2, 4, 4096, 128, mode="bwd") == 2.5 * 2 ** 35
    assert attn.attention_flops(2, 4, 4096, 128) == 3.5 * 2 ** 35 == 120_259_084_288
    assert attn.attention_flops(1, 1, 10, 8) == 3.5 * 4 * 100 * 8 / 2 == 5600


def test_flops_per_token_and_mfu_hand_numbers():
    # 6 N + 12 L d T, attention term halved when causal: N=1000, L=2, d=12, T=5 -> 6000 + 1440 (/ 2)
    assert lm.flops_per_token(1000, 2, 12, 5, causal=False) == 6000 + 1440
    assert lm.flops_per_token(1000, 2, 12, 5) == 6000 + 720
    # the 125M shape: N = 123,910,800 (Pro block, FoX), T = 2048
    assert lm.flops_per_token(123_910_800, 12, 768, 2048) == 6 * 123_910_800 + 6 * 12 * 768 * 2048
    # 1e5 tokens/s at 1e9 FLOPs per token on a 989.4 TFLOP/s device: 1e14 / 9.894e14
    assert lm.mfu(1e5, 1e9, 989.4) == pytest.approx(1e14 / 989.4e12)
    assert lm.mfu(1e5, 1e9, None) is None


def test_peak_table():
    assert lm.peak_bf16_tflops("NVIDIA H200") == 989.4
    assert lm.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert lm.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert lm.peak_bf16_tflops("NVIDIA L40S") == 362.0
    assert lm.peak_bf16_tflops("NVIDIA H100 PCIe") is None  # lower peak than the SXM part: not guessed
    assert lm.peak_bf16_tflops("Tesla T4") is None


def test_matmul_params_leave_out_the_input_embedding_only():
    model = lm.FoXTransformer(lm.FoXConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2))
    total = sum(p.numel() for p in model.parameters())
    assert lm.matmul_params(model) == total - 50 * 16
    assert model.lm_head.weight.numel() == 50 * 16  # untied: the output head is counted


# --------------------------------------------------------------------------------------------------------------
# goal lines on made-up rows
# --------------------------------------------------------------------------------------------------------------
def row(path, t, ms, mem=None, d=128, error=None):
    return {"D": d, "T": t, "path": path, "ms": ms, "mem": mem, "error": error}


def grid(fla_ms, base_ms=(10.0, 40.0, 160.0), lengths=(4096, 8192, 16384)):
    rows = [row(BASE, 2048, 2.0), row("FoX fla", 2048, 100.0)]  # T < 4096: not read by the speed goal
    rows += [row(BASE, t, b) for t, b in zip(lengths, base_ms)]
    rows += [row("FoX fla", t, f) for t, f in zip(lengths, fla_ms)]
    rows += [row(BASE, 4096, 1.0, d=64), row("FoX fla", 4096, 100.0, d=64)]  # other head dim: not read
    return rows


def test_speed_goal_met_and_not_met():
    met, line = attn.speed_goal(grid((10.5, 42.0, 170.0)), "FoX fla", BASE)
    assert met is True and ": met (" in line and "min 0.94x at T=16384" in line and "4096 0.95x" in line
    met, line = attn.speed_goal(grid((10.5, 50.0, 170.0)), "FoX fla", BASE)
    assert met is False and "NOT met" in line and "min 0.80x at T=8192" in line


def test_speed_goal_failed_rows():
    rows = grid((10.0, 40.0))  # no FoX row at 16384 ...
    rows.append(row("FoX fla", 16384, None, error="OutOfMemoryError: CUDA out of memory"))  # ... it failed
    met, line = attn.speed_goal(rows, "FoX fla", BASE)
    assert met is False and "failed at T=16384: OutOfMemoryError" in line and "min 1.00x" in line
    # a T where the baseline failed is left out and named; the others decide
    rows = [r for r in grid((10.0, 40.0, 160.0)) if not (r["path"] == BASE and r["T"] == 8192)]
    rows.append(row(BASE, 8192, None, error="RuntimeError: No available kernel"))
    met, line = attn.speed_goal(rows, "FoX fla", BASE)
    assert met is True and "baseline failed at T=8192" in line
    # nothing measured
    met, line = attn.speed_goal(grid(()), "FoX flex", BASE)
    assert met is None and "not measured" in line


def test_memory_goal():
    linear = [row("FoX flex", t, 1.0, mem=t / 100) for t in (2048, 4096, 8192, 16384)]
    met, line = attn.memory_goal(linear, "FoX flex")
    assert met is True and "x8 in T" in line and "bound x12" in line
    quadratic = [row("FoX flex", t, 1.0, mem=(t / 1000) ** 2) for t in (2048, 4096, 8192, 16384)]
    met, line = attn.memory_goal(quadratic, "FoX flex")
    assert met is False and "NOT met" in line and "x64.00 for x8 in T" in line
    failed = linear[:3] + [row("FoX flex", 16384, None, error="OutOfMemoryError: x")]
    met, line = attn.memory_goal(failed, "FoX flex")
    assert met is False and "failed at T=16384: OutOfMemoryError" in line
    met, line = attn.memory_goal(linear[:1], "FoX flex")
    assert met is None and "not measured" in line
    assert attn.memory_goal(linear, "FoX flex", d=64)[0] is None  # only the goal's head dim is read
    lines = attn.summary(linear + grid((10.5, 42.0, 170.0)))
    assert len(lines) == 4 and all(x.startswith("Goal FoX") for x in lines)


def test_fox_lm_goal_line():
    shape = {"d_model": 768, "T": 2048, "batch": 8, "error": None}
    assert lm.goal_line({**shape, "ratio": 0.93}) == (
        True, "Goal FoX / gates off >= 0.9 at d_model 768, T=2048, batch 8: met (0.930).")
    met, line = lm.goal_line({**shape, "ratio": 0.85})
    assert met is False and "NOT met (0.850)" in line
    met, line = lm.goal_line({**shape, "ratio": None, "error": "OutOfMemoryError: CUDA out of memory"})
    assert met is False and "NOT met (failed: OutOfMemoryError" in line


# --------------------------------------------------------------------------------------------------------------
# the shared output options
# --------------------------------------------------------------------------------------------------------------
def test_output_args_and_helpers(tmp_path):
    ap = argparse.ArgumentParser()
    _report.add_output_args(ap)
    args = ap.parse_args([])
    assert args.write is False and args.doc == _report.DOCS and args.csv is None
    ap = argparse.ArgumentParser()
    _report.add_output_args(ap, write_default=True)
    assert ap.parse_args([]).write is True and ap.parse_args(["--no-write"]).write is False
    assert _report.without_output_args(["--device", "cuda", "--write", "--doc", "x.md", "--csv=y.csv", "--no-write",
                                        "--reps", "3"]) == ["--device", "cuda", "--reps", "3"]
    err = _report.short_error(RuntimeError("CUDA out of memory | tried\nsecond line"))
    assert err == "RuntimeError: CUDA out of memory / tried"
    assert len(_report.short_error(ValueError("x" * 500))) == 160
    args = argparse.Namespace(write=True, doc=tmp_path / "perf.md", csv=tmp_path / "sub" / "rows.csv")
    _report.write_outputs(args, "sec", "hello", ["a", "b"], [[1, None], [2.5, "x"]])
    assert read_csv(args.csv) == [["a", "b"], ["1", ""], ["2.5", "x"]]
    assert "<!-- sec:start -->\nhello\n<!-- sec:end -->" in args.doc.read_text()
    with pytest.raises(ValueError):
        _report.write_csv(tmp_path / "bad.csv", ["a", "b"], [[1]])


def test_fox_attention_cpu_outputs(tmp_path, monkeypatch):
    """The CPU run at one tiny shape, through main: a failing path becomes a failed row and the others are kept;
    --csv and --write --doc write their files.  (The native kernel's path is left out: its first build takes ~25 s.)"""
    real = attn.forwards

    def forwards(*a):
        def boom():
            raise RuntimeError("made-up backend failure\nwith a traceback")
        cases = {k: f for k, f in real(*a).items() if "native" not in k}
        return {**cases, "broken": boom}

    monkeypatch.setattr(attn, "forwards", forwards)
    doc, rows_csv = tmp_path / "perf.md", tmp_path / "attn.csv"
    rows = attn.main(["--lengths", "64", "--reps", "1", "--batch", "1", "--heads", "2", "--csv", str(rows_csv),
                      "--write", "--doc", str(doc)])
    table = read_csv(rows_csv)
    assert table[0] == attn.CSV_HEADER[:6] + ["saved_for_backward_mib", "error"]
    by_path = {r[2]: r for r in table[1:]}
    assert set(by_path) == {attn.CPU_BASELINE, "FoX blockwise (fallback)", "SDPA + full float bias", "broken"}
    assert float(by_path[attn.CPU_BASELINE][4]) == 1.0 and float(by_path[attn.CPU_BASELINE][5]) > 0
    assert by_path["broken"][3:7] == ["", "", "", ""]
    assert by_path["broken"][7] == "RuntimeError: made-up backend failure"
    assert len(rows) == 4
    text = doc.read_text()
    assert "<!-- bench_fox_attention_cpu:start -->" in text and "| 64 | 64 | broken | failed: RuntimeError" in text
    assert "--csv" not in text and "Reproduce: `python scripts/bench_fox_attention.py --lengths 64" in text


def test_fox_attention_cuda_paths_on_cpu_tensors():
    """The CUDA path set in the model's (B, T, H, D) layout, run on CPU tensors (layouts and shapes only: the FA2
    baseline runs the CPU flash kernel; flex cannot train on CPU and is recorded as failed, not raised)."""
    b, t, h, d = 1, 32, 2, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, t, h, d, generator=g).requires_grad_() for _ in range(3))
    log_f = F.logsigmoid(torch.randn(b, t, h, generator=g) + 2).requires_grad_()
    fwds = attn.forwards(q, k, v, log_f, "cuda")
    assert list(fwds)[:2] == [BASE, "FoX flex"]
    out = attn.bench_shape(fwds, torch.randn(b, h, t, d, generator=g), (q, k, v, log_f), 1, "cpu")
    assert out[BASE]["ms"] > 0 and out[BASE]["error"] is None
    assert out["FoX flex"]["ms"] is None and "ValueError" in out["FoX flex"]["error"]
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    torch.testing.assert_close(fwds[BASE](), ref)


def test_fox_lm_cpu_outputs(tmp_path, monkeypatch):
    monkeypatch.setattr(lm, "CPU_SHAPES", [(32, 1, 2, 16, 2, 64)])
    doc, rows_csv = tmp_path / "perf.md", tmp_path / "lm.csv"
    (r,) = lm.main(["--reps", "1", "--csv", str(rows_csv), "--write", "--doc", str(doc), "--peak-tflops", "1"])
    assert r["error"] is None and r["fox"] > 0 and r["nogate"] > 0 and r["fox_mfu"] > 0
    table = read_csv(rows_csv)
    assert table[0] == lm.CSV_HEADER and table[1][:6] == ["32", "1", "2", "16", "2", "64"]
    assert float(table[1][8]) == pytest.approx(r["ratio"])
    text = doc.read_text()
    assert "<!-- bench_fox_lm_llama_cpu:start -->" in text and "Goal FoX / gates off >= 0.9 at d_model 32" in text


def test_fox_generate_csv(tmp_path):
    rows_csv = tmp_path / "gen.csv"
    gen.main(["--prompt-lengths", "8", "--new-tokens", "2", "--reps", "1", "--kernel-keys", "16", "--kernel-reps",
              "1", "--kernel-threads", "1", "--cached-reps", "1", "--breakdown-reps", "0", "--csv", str(rows_csv)])
    table = read_csv(rows_csv)
    assert table[0] == gen.CSV_HEADER and [r[1] for r in table[1:]] == list(gen.MODES)
    assert all(float(x) > 0 for r in table[1:] for x in r[2:6])


def test_fox_attention_cuda_report(tmp_path, monkeypatch):
    """The CUDA report assembled from made-up measurements (no GPU here): default grid, goal lines under the table,
    a failed shape kept as a failed row."""
    def measure(batch, heads, t, d, dtype, reps, device):
        assert (batch, heads, dtype, device) == (2, 4, torch.bfloat16, "cuda")
        base = 1e-6 * t * t * d / 128
        fox = {"ms": base / 0.95, "mem": t / 1024, "error": None}
        if t == 16384 and d == 128:
            fox = {"ms": None, "mem": None, "error": "OutOfMemoryError: CUDA out of memory."}
        return {BASE: {"ms": base, "mem": t / 2048, "error": None}, "FoX flex": fox,
                "FoX fla": {"ms": base / 0.85, "mem": t / 1024, "error": None}}

    monkeypatch.setattr(attn, "measure", measure)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    rows_csv, doc = tmp_path / "attn.csv", tmp_path / "perf.md"
    # main raises dynamo's recompile limit on CUDA: put it back afterwards, by hand (monkeypatch's undo of this
    # aliased config entry deletes the alias, which breaks every later torch.compile in the session)
    cfg = torch._dynamo.config
    limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    old = getattr(cfg, limit)
    try:
        rows = attn.main(["--device", "cuda", "--csv", str(rows_csv), "--write", "--doc", str(doc)])
    finally:
        setattr(cfg, limit, old)
    assert sorted({(r["D"], r["T"]) for r in rows}) == [(d, t) for d in (64, 128) for t in (2048, 4096, 8192, 16384)]
    text = doc.read_text()
    assert "<!-- bench_fox_attention_cuda:start -->" in text and "| × SDPA FA2 (time) | TFLOP/s |" in text
    assert "| 128 | 16384 | FoX flex | failed: OutOfMemoryError: CUDA out of memory. | | | |" in text
    assert "Goal FoX fla fwd+bwd throughput >= 0.9x SDPA FA2 causal (no gate) (D=128, T >= 4096): NOT met " \
           "(min 0.85x" in text
    assert "Goal FoX flex fwd+bwd throughput >= 0.9x SDPA FA2 causal (no gate) (D=128, T >= 4096): NOT met " \
           "(min 0.95x at T=4096" in text and "failed at T=16384: OutOfMemoryError" in text
    assert "Goal FoX fla peak memory O(T) (D=128): met (2.0 MiB at T=2048 -> 16.0 MiB at T=16384" in text
    table = read_csv(rows_csv)
    assert table[0][6] == "peak_extra_mib" and len(table) == 1 + 8 * 3
    fla_128 = [r for r in table if r[0] == "128" and r[2] == "FoX fla" and r[1] == "4096"][0]
    assert float(fla_128[5]) == pytest.approx(attn.attention_flops(2, 4, 4096, 128) / (float(fla_128[3]) * 1e-3) / 1e12)
