"""The Dualformer report (spec ``dualformer.md`` 1.7), saved in the run folder at the end of the fit and of a test
run (rank 0; not under ``fast_dev_run``): the trained model decodes the first ``items`` test mazes (unseen layouts)
or Sokoban puzzles in each mode.

* ``modes.csv``: per mode, the greedy optimal and correct rates, mean trace and response tokens, the fraction of
  answers that start in slow mode (the auto-mode choice) and, with ``samples`` = k > 0, 1-Solved-k, 1-Optimal-k,
  diversity (distinct optimal plans among k) and the sampled trace length;
* ``responses.csv``: every greedy answer (mode, item, correct, optimal, trace tokens, plan);
* ``trace_vs_optimal.png``: optimal rate against mean trace tokens, one point per mode;
* ``mazes.png`` (``puzzles.png`` for Sokoban): the first ``render`` test puzzles with the plan of each mode.
"""
from __future__ import annotations

import os
from typing import Sequence

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from callbacks.run_files import report_dir, save_figure, write_rows
from lightning_modules.dualformer_eval import evaluate, item_puzzle, summary_table


def render_puzzles(path: str, traces, rows, modes: Sequence[str], count: int) -> None:
    """The first ``count`` test puzzles (columns) with the plan of each mode (rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    count = min(count, len(traces))
    fig, axes = plt.subplots(len(modes), count, figsize=(2.2 * count, 2.3 * len(modes)), squeeze=False)
    by_key = {(r["mode"], r["item"]): r for r in rows}
    for m, mode in enumerate(modes):
        for i in range(count):
            ax, puzzle = axes[m][i], item_puzzle(traces, i)
            size = traces[i]["size"]
            for x, y in puzzle.walls:
                ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, color="0.25"))
            r = by_key.get((mode, i))
            if r and r["plan"]:
                cells = [tuple(map(int, c.split(","))) for c in r["plan"].split()]
                ax.plot([c[0] for c in cells], [c[1] for c in cells], "-o", ms=3,
                        color="tab:green" if r["optimal"] else ("tab:orange" if r["correct"] else "tab:red"))
            if traces.task == "maze":
                ax.plot(*puzzle.start, "s", color="tab:blue", ms=7)
                ax.plot(*puzzle.goal, "*", color="tab:purple", ms=10)
            else:
                for d in puzzle.docks:
                    ax.plot(*d, "x", color="tab:purple", ms=9, mew=2)
                for b in puzzle.boxes:
                    ax.add_patch(Rectangle((b[0] - 0.3, b[1] - 0.3), 0.6, 0.6, color="tab:brown"))
                ax.plot(*puzzle.worker, "s", color="tab:blue", ms=7)
            ax.set_xlim(-0.5, size - 0.5)
            ax.set_ylim(-0.5, size - 0.5)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            status = "no plan" if not r or not r["plan"] else ("optimal" if r["optimal"] else
                                                                ("correct" if r["correct"] else "invalid"))
            ax.set_title(f"{mode}: {status}" + (f", {r['trace_tokens']} trace tok" if r else ""), fontsize=7)
    legend = ("square start, star goal" if traces.task == "maze" else
              "square worker, brown boxes, crosses docks; the line is the worker's path")
    fig.suptitle(f"test {traces.task} (unseen); {legend}; green optimal, orange correct, red invalid", fontsize=8)
    save_figure(fig, path)


def trace_plot(path: str, summaries, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    for s in summaries:
        ax.scatter(s["mean_trace_tokens"], s["optimal_rate"], s=40)
        ax.annotate(s["mode"], (s["mean_trace_tokens"], s["optimal_rate"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel("mean trace tokens (greedy)")
    ax.set_ylabel("optimal rate (greedy)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


class DualformerReport(L.Callback):
    def __init__(self, items: int = 200, samples: int = 0, modes: Sequence[str] = ("fast", "slow", "auto"),
                 batch_size: int = 64, max_new_tokens: int = 0, render: int = 4, seed: int = 0):
        if items < 1 or samples < 0 or render < 0:
            raise ValueError(f"DualformerReport needs items >= 1, samples >= 0, render >= 0; got {items}, {samples}, "
                             f"{render}")
        self.items, self.samples, self.modes = items, samples, list(modes)
        self.batch_size, self.max_new_tokens, self.render, self.seed = batch_size, max_new_tokens, render, seed
        self.summaries = None

    @rank_zero_only
    def report(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = report_dir(trainer)
        if out is None:
            return
        dm = trainer.datamodule
        dm.setup("test")
        summaries, rows = evaluate(pl_module, dm.test_set, self.modes, self.items, self.samples, self.batch_size,
                                   self.max_new_tokens or None, self.seed)
        arm = dm.hparams.mixture if isinstance(dm.hparams.mixture, str) else str(list(dm.hparams.mixture))
        for s in summaries:
            s["arm"] = arm
        write_rows(os.path.join(out, "modes.csv"), summaries)
        write_rows(os.path.join(out, "responses.csv"), rows)
        trace_plot(os.path.join(out, "trace_vs_optimal.png"), summaries, f"{arm}: {summaries[0]['items']} test mazes")
        if self.render:
            render_puzzles(os.path.join(out, "mazes.png" if dm.task == "maze" else "puzzles.png"), dm.test_set, rows,
                           self.modes, self.render)
        self.summaries = summaries
        rank_zero_info(f"Dualformer report ({arm}, {summaries[0]['items']} unseen test mazes)\n"
                       + summary_table(summaries))

    def on_fit_end(self, trainer, pl_module):
        self.report(trainer, pl_module)

    def on_test_end(self, trainer, pl_module):
        self.report(trainer, pl_module)
