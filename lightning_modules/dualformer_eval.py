"""Dualformer evaluation (spec ``dualformer.md`` 1.7): parse decoded responses, check plans against the maze, and
summarise per mode.

* **Trace length**: the tokens before the first ``plan`` (``bos`` excluded, as the official ``trace_tokens``).
* **Correct plan** (stricter than the official check, errata 6): the tokens from the first ``plan`` to the end are
  well-formed ``plan x y`` triples, and (maze, ``datamodules.maze_astar.check_plan``) the first cell is the start and
  the last the goal, every cell lies inside the grid and off the walls, consecutive cells are one step apart, and no
  cell is visited twice; (Sokoban) replayed from the worker's cell, every step is legal and all boxes end on the
  docks.  **Optimal**: correct and as long as the A* plan.
* Per mode: greedy optimal / correct rates and mean trace and response lengths; with ``samples`` = k draws at
  temperature 1: 1-Solved-k, 1-Optimal-k (at least one of the k correct / optimal) and diversity (distinct optimal
  plans among the k, averaged over prompts); in auto mode the fraction of answers that start in slow mode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from datamodules.maze_astar import Cell, check_plan
from datamodules.search_tasks import judge, puzzle_of

MODES = {"slow": ("create",), "fast": ("plan",), "auto": ()}  # the decoder tokens forced after bos (spec 1.4)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: expected one of {list(MODES)}")
    return mode


@dataclass
class Response:
    trace_len: int
    length: int
    plan: Optional[List[Cell]]  # None: no plan, or a malformed plan section
    starts_slow: bool


__all__ = ["MODES", "check_mode", "parse_response", "check_plan", "item_puzzle", "evaluate", "summary_table"]


def parse_response(words: Sequence[str]) -> Response:
    words = list(words)
    first = words.index("plan") if "plan" in words else len(words)
    plan: Optional[List[Cell]] = None
    section = words[first:]
    if section and len(section) % 3 == 0:
        try:
            triples = [section[i:i + 3] for i in range(0, len(section), 3)]
            if all(t[0] == "plan" for t in triples):
                plan = [(int(t[1]), int(t[2])) for t in triples]
        except ValueError:
            plan = None
    return Response(first, len(words), plan, bool(words) and words[0] == "create")


def item_puzzle(traces, i: int):
    """The maze or Sokoban puzzle of item ``i`` of a ``TraceDataset``-backed split."""
    e = traces[i]
    return puzzle_of(traces.task, [traces.vocabulary[t] for t in e["prompt"]], e["size"])


@torch.no_grad()
def evaluate(model, traces, modes: Sequence[str] = ("fast", "slow", "auto"), items: int = 200, samples: int = 0,
             batch_size: int = 64, max_new_tokens: Optional[int] = None, seed: int = 0):
    """``(summary rows per mode, greedy response rows)`` on the first ``items`` of ``traces`` (a ``MazeTraces``)."""
    for m in modes:
        check_mode(m)
    was_training = model.training
    model.eval()
    n = min(items, len(traces))
    examples = [traces[i] for i in range(n)]
    task = traces.task
    mazes = [item_puzzle(traces, i) for i in range(n)]
    optimal = [len(e["plan"]) // 3 for e in examples]
    summaries, rows = [], []
    for mode in modes:
        greedy = _decode(model, examples, mode, 1, 0.0, batch_size, max_new_tokens, seed)
        parsed = [parse_response(model.decode_tokens(r)) for r in greedy]
        checks = [judge(task, mz, p.plan, o) for mz, p, o in zip(mazes, parsed, optimal)]
        for i, (p, (ok, opt)) in enumerate(zip(parsed, checks)):
            rows.append({"mode": mode, "item": i, "size": examples[i]["size"], "optimal_cells": optimal[i],
                         "correct": int(ok), "optimal": int(opt), "trace_tokens": p.trace_len,
                         "response_tokens": p.length, "slow": int(p.starts_slow),
                         "plan": " ".join(f"{x},{y}" for x, y in (p.plan or []))})
        s = {"mode": mode, "items": n, "optimal_rate": float(np.mean([c[1] for c in checks])),
             "correct_rate": float(np.mean([c[0] for c in checks])),
             "mean_trace_tokens": float(np.mean([p.trace_len for p in parsed])),
             "mean_response_tokens": float(np.mean([p.length for p in parsed])),
             "slow_fraction": float(np.mean([p.starts_slow for p in parsed]))}
        if samples:
            drawn = _decode(model, examples, mode, samples, 1.0, max(1, batch_size // samples),
                            max_new_tokens, seed)
            solved, optimal_k, diversity, trace_k, slow_k = [], [], [], [], []
            for i in range(n):
                group = [parse_response(model.decode_tokens(r)) for r in drawn[i * samples:(i + 1) * samples]]
                ck = [judge(task, mazes[i], p.plan, optimal[i]) for p in group]
                solved.append(any(c[0] for c in ck))
                optimal_k.append(any(c[1] for c in ck))
                diversity.append(len({tuple(p.plan) for p, c in zip(group, ck) if c[1]}))
                trace_k += [p.trace_len for p in group]
                slow_k += [p.starts_slow for p in group]
            s.update({"samples": samples, f"solved_{samples}": float(np.mean(solved)),
                      f"optimal_{samples}": float(np.mean(optimal_k)), "diversity": float(np.mean(diversity)),
                      "sampled_trace_tokens": float(np.mean(trace_k)), "sampled_slow_fraction": float(np.mean(slow_k))})
        summaries.append(s)
    model.train(was_training)
    return summaries, rows


def _decode(model, examples, mode, samples, temperature, batch_size, max_new_tokens, seed) -> List[List[int]]:
    out: List[List[int]] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        src = [np.concatenate([[model.bos_id], e["prompt"], [model.eos_id]]) for e in chunk]
        width = max(len(s) for s in src)
        batch = torch.full((len(src), width), model.pad_id, dtype=torch.long)
        for row, s in enumerate(src):
            batch[row, :len(s)] = torch.as_tensor(s)
        out += model.generate(batch, mode, samples, temperature, max_new_tokens, seed + start)
    return out


def summary_table(summaries: Sequence[Dict]) -> str:
    keys = [k for k in summaries[0] if k not in ("items", "samples")]
    lines = [" | ".join(keys), " | ".join("---" for _ in keys)]
    for s in summaries:
        lines.append(" | ".join(f"{s[k]:.3f}" if isinstance(s[k], float) else str(s[k]) for k in keys))
    return "\n".join(lines)
