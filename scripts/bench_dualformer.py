"""Dualformer throughput (spec dualformer.md): training tokens/s of the encoder-decoder against ``torch.nn.Transformer``
of the same width, depth, heads and feed-forward size (same batch, fwd + bwd + AdamW step); decoding tokens/s with the
KV cache against recomputing the whole prefix at every token; maze generation (A* traces) per second with 1 and 2
processes.  Every figure is a ratio to a baseline measured in the same run, interleaved (machines are noisy); the
table goes to docs/performance.md (section ``dualformer``).

    python scripts/bench_dualformer.py [--device cpu] [--sizes 5 10] [--decode-tokens 100 400]
    python scripts/bench_dualformer.py --no-write --csv rows.csv   # CSV rows only, docs/performance.md untouched

The section is written by default (``--no-write``, or the older ``--no-docs``, skips it; ``--doc PATH`` writes
another file); ``--csv PATH`` also writes the table's rows.  Maze generation runs on the CPU whatever ``--device``
(``--mazes`` per size and process count: most of the wall time on a GPU machine); decoding runs
``max(2, --reps // 3)`` timed repeats.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts._report import add_output_args, interleaved_times, write_outputs  # noqa: E402


def training(device: str, reps: int, batch_size: int = 32):
    from datamodules.dualformer_data import DroppedTraces, DualformerDataModule, PadCollate
    from lightning_modules.dualformer import Dualformer, sequence_mean_cross_entropy

    with tempfile.TemporaryDirectory() as tmp:
        dm = DualformerDataModule(sizes=5, n_train=batch_size * 4, n_test=4, data_dir=tmp, processes=1, seed=0)
        dm.setup()
        data = DroppedTraces(dm.train_set, dm.dropper, 0)
        batch = PadCollate(dm.pad_id)([data[i] for i in range(batch_size)])
    batch = {k: v.to(device) for k, v in batch.items()}
    torch.manual_seed(0)
    ours = Dualformer(max_size=5).to(device)
    d, heads, layers = ours.hparams.d_model, ours.hparams.n_heads, ours.hparams.n_layers
    hidden = ours.model.encoder[0].mlp.down_proj.in_features
    # SwiGLU has three hidden-sized matrices where a ReLU feed-forward has two: 1.5x the width matches its FLOPs
    ref = torch.nn.Transformer(d, heads, layers, layers, 3 * hidden // 2, dropout=0.0, batch_first=True,
                               norm_first=True, bias=False).to(device)
    emb, head = torch.nn.Embedding(ours.model.embed.num_embeddings, d).to(device), ours.model.lm_head
    tgt = batch["tgt"]
    causal = torch.nn.Transformer.generate_square_subsequent_mask(tgt.shape[1] - 1, device=device)
    opt_ours = torch.optim.AdamW(ours.parameters(), 1e-4)
    opt_ref = torch.optim.AdamW(list(ref.parameters()) + list(emb.parameters()), 1e-4)

    def step_ours():
        loss = ours._loss(batch)
        opt_ours.zero_grad()
        loss.backward()
        opt_ours.step()

    def step_ref():
        src_pad = batch["src"] == ours.pad_id
        out = ref(emb(batch["src"]), emb(tgt[:, :-1]), tgt_mask=causal, src_key_padding_mask=src_pad,
                  memory_key_padding_mask=src_pad)
        loss = sequence_mean_cross_entropy(head(out), tgt[:, 1:], ours.pad_id)
        opt_ref.zero_grad()
        loss.backward()
        opt_ref.step()

    times = interleaved_times({"ours": step_ours, "nn.Transformer": step_ref}, reps, device)
    tokens = int((tgt[:, 1:] != ours.pad_id).sum())
    return times, tokens, ours


def decoding(model, device: str, lengths, reps: int, batch: int = 32):
    rows = []
    src = torch.randint(2, model.pad_id, (batch, 40), device=device)
    for n in lengths:
        fns = {"cached": lambda: model.generate(src, "slow", max_new_tokens=n, use_cache=True),
               "uncached": lambda: model.generate(src, "slow", max_new_tokens=n, use_cache=False)}
        t = interleaved_times(fns, reps, device, warmup=1)
        rows.append({"new_tokens": n, "cached_tok_s": batch * n / t["cached"], "uncached_tok_s": batch * n /
                     t["uncached"], "speedup": t["uncached"] / t["cached"]})
        print(rows[-1], flush=True)
    return rows


def generation(sizes, count: int):
    from datamodules.trace_dataset import TraceDataConfig, generate_split

    rows = []
    for size in sizes:
        rates = {}
        for processes in (1, 2):
            cfg = TraceDataConfig(sizes=(size,), n_train=count, n_test=0)
            start = time.perf_counter()
            generate_split(0, count, cfg, processes=processes)
            rates[processes] = count / (time.perf_counter() - start)
        rows.append({"size": size, "one": rates[1], "two": rates[2], "ratio": rates[2] / rates[1]})
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--decode-tokens", type=int, nargs="+", default=[100, 400])
    ap.add_argument("--sizes", type=int, nargs="+", default=[5, 10])
    ap.add_argument("--mazes", type=int, default=20000)
    add_output_args(ap, write_default=True)
    ap.add_argument("--no-docs", dest="write", action="store_false", help=argparse.SUPPRESS)  # older --no-write
    args = ap.parse_args(argv)
    torch.set_num_threads(1) if args.device == "cpu" else None
    times, tokens, model = training(args.device, args.reps)
    print(times, tokens, flush=True)
    dec = decoding(model.eval(), args.device, args.decode_tokens, max(2, args.reps // 3))
    gen = generation(args.sizes, args.mazes)
    lines = ["## Dualformer: training, decoding and maze generation (scripts/bench_dualformer.py)", "",
             f"`python scripts/bench_dualformer.py --device {args.device}` (one thread on CPU): the recipe's model "
             "(d = 64, 2 + 2 layers, 4 heads), a batch of 32 Dualformer-dropped 5x5 maze targets.", "",
             "| measure | ours | baseline | ratio |", "|---|---|---|---|",
             f"| training target tokens/s (fwd + bwd + AdamW), vs `torch.nn.Transformer` with the same width, depth, "
             f"heads and feed-forward FLOPs | "
             f"{tokens / times['ours']:,.0f} | {tokens / times['nn.Transformer']:,.0f} | "
             f"{times['nn.Transformer'] / times['ours']:.2f}x |"]
    for r in dec:
        lines.append(f"| decode tokens/s, {r['new_tokens']} new tokens, batch 32: KV cache vs recomputing the prefix "
                     f"| {r['cached_tok_s']:,.0f} | {r['uncached_tok_s']:,.0f} | {r['speedup']:.2f}x |")
    for r in gen:
        lines.append(f"| {r['size']}x{r['size']} mazes generated per second ({args.mazes:,}, A* traces, pool start-up "
                     f"included): 2 processes vs 1 | "
                     f"{r['two']:,.0f} | {r['one']:,.0f} | {r['ratio']:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    rows = [["training target tokens/s vs nn.Transformer", tokens / times["ours"], tokens / times["nn.Transformer"],
             times["nn.Transformer"] / times["ours"]]]
    rows += [[f"decode tokens/s, {r['new_tokens']} new tokens, batch 32: KV cache vs recomputing the prefix",
              r["cached_tok_s"], r["uncached_tok_s"], r["speedup"]] for r in dec]
    rows += [[f"{r['size']}x{r['size']} mazes generated per second ({args.mazes}): 2 processes vs 1",
              r["two"], r["one"], r["ratio"]] for r in gen]
    write_outputs(args, "dualformer", text, ["measure", "ours", "baseline", "ratio"], rows)


if __name__ == "__main__":
    main()
