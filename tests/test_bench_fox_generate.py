"""scripts/bench_fox_generate.py at a tiny size: finite positive timings, and cached == uncached greedy tokens."""
import math

import torch

from lightning_modules.layers.generation import SamplingConfig
from scripts import bench_fox_generate as bench


def test_bench_fox_generate_tiny(tmp_path):
    doc = tmp_path / "performance.md"
    result = bench.main(["--prompt-lengths", "16", "--new-tokens", "4", "--reps", "1", "--kernel-keys", "32",
                         "--kernel-reps", "1", "--cached-reps", "1", "--breakdown-reps", "1", "--threads", "1",
                         "--write", "--doc", str(doc)])
    (row,) = result["generation"]
    numbers = [row["speedup_cached"], row["speedup_cached_total"], row["gate_cost"], row["gate_cost_prefill"]]
    for mode in bench.MODES:
        numbers += [row[mode][key] for key in ("prefill_s", "decode_s", "ms_per_token", "decode_tok_s", "total_s")]
    for k in result["kernel"]:
        numbers += [k["decode_ms"], k["prefill_ms"], k["decode_kernel_only_ms"], k["decode_nogate_ms"]]
    assert len(result["kernel"]) == 2
    assert all(math.isfinite(x) and x > 0 for x in numbers), numbers
    # the benchmark's own check, and the same generation through the model's public API
    tokens = row["tokens"]
    assert row["same_tokens"] and row["repeatable"] and tokens["fox_cached"] == tokens["fox_uncached"]
    assert all(len(t) == 4 and all(0 <= i < 256 for i in t) for t in tokens.values())
    model = bench.build_model("full", 128, 4, 4, "cpu")
    prompt = torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(16)).tolist()
    cfg = SamplingConfig(max_new_tokens=4, temperature=0.0)
    assert model.generate([prompt], cfg, use_cache=True)[0] == tokens["fox_cached"]
    assert model.generate([prompt], cfg, use_cache=False)[0] == tokens["fox_cached"]
    text = doc.read_text()
    assert "<!-- bench_fox_generate_cpu_t1:start -->" in text and "FoX generation (cached decoding)" in text
