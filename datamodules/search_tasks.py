"""The planning tasks of the Dualformer recipes behind one interface (spec ``dualformer.md`` 1.1): the vocabulary,
the examples of one random layout, and the check of a decoded plan.

* ``maze``: ``datamodules.maze_astar``; examples on one wall layout share it, and the train/test split keeps layouts
  apart (the paper's unseen mazes).
* ``sokoban``: ``datamodules.sokoban_astar``; one puzzle per layout, the split keeps puzzles apart (with two interior
  walls there are too few wall layouts to keep those apart; the official split is by trace count).  A puzzle is
  kept when A* solves it within ``max_expansions``, its costs fit the vocabulary and, when ``max_trace_tokens`` is
  set, its full trace is no longer than that.
"""
from __future__ import annotations

import random
from typing import List, Optional, Sequence, Tuple

from datamodules.maze_astar import Cell, check_plan, layout_tasks, maze_vocabulary, parse_prompt, plan_tokens
from datamodules.maze_astar import prompt_tokens, trace_tokens
from datamodules.sokoban_astar import (parse_sokoban, random_sokoban, replay, sokoban_astar, sokoban_prompt,
                                       sokoban_trace, sokoban_vocabulary)

TASKS = ("maze", "sokoban")
Example = Tuple[tuple, tuple, int, List[str], List[str], List[str]]  # split key, dedupe key, size, prompt/trace/plan


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {list(TASKS)}")
    return task


def default_max_cost(task: str, max_size: int, boxes: int = 2) -> int:
    """The largest cost token: every maze cost fits in ``size^2 - 1``; Sokoban costs are capped at
    ``boxes * size^2`` (puzzles beyond it are not kept)."""
    return max_size * max_size - 1 if task == "maze" else boxes * max_size * max_size


def vocabulary(task: str, max_size: int, max_cost: Optional[int] = None, boxes: int = 2) -> List[str]:
    check_task(task)
    if task == "maze":
        return maze_vocabulary(max_size)
    return sokoban_vocabulary(max_size, max_cost if max_cost else default_max_cost(task, max_size, boxes))


def layout_examples(task: str, rng: random.Random, size: int, pairs: int = 1, walls: int = 2, boxes: int = 2,
                    max_expansions: int = 20000, max_trace_tokens: int = 0, max_cost: int = 0) -> List[Example]:
    if task == "maze":
        out = []
        for maze, result in layout_tasks(rng, size, pairs):
            layout = maze.layout()
            out.append((layout, (layout, maze.start, maze.goal), size, prompt_tokens(maze),
                        trace_tokens(result.events), plan_tokens(result.plan)))
        return out
    puzzle = random_sokoban(rng, size, walls, boxes)
    result = sokoban_astar(puzzle, max_expansions)
    if result is None or not result.solved:
        return []
    cap = max_cost or default_max_cost(task, size, boxes)
    if max(max(g, h) for _, _, g, h in result.events) > cap:
        return []
    trace = sokoban_trace(result.events)
    if max_trace_tokens and len(trace) > max_trace_tokens:
        return []
    key = (size, tuple(sorted(puzzle.walls)), puzzle.boxes, puzzle.docks, puzzle.worker)
    return [(key, key, size, sokoban_prompt(puzzle), trace, plan_tokens(result.plan))]


def puzzle_of(task: str, prompt: Sequence[str], size: int):
    return parse_prompt(prompt, size, size) if task == "maze" else parse_sokoban(prompt, size)


def judge(task: str, puzzle, plan: Optional[Sequence[Cell]], optimal_cells: int) -> Tuple[bool, bool]:
    """``(correct, optimal)`` of a decoded plan (a list of cells, ``None`` when malformed)."""
    if task == "maze":
        return check_plan(puzzle, plan, optimal_cells)
    final = replay(puzzle, plan) if plan else None
    correct = final is not None and puzzle.solved(final)
    return correct, correct and len(plan) == optimal_cells
