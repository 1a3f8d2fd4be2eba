"""Mazes and their A* search traces in the token format of Searchformer / Dualformer (spec ``dualformer.md`` 1.1 and
its errata 1, 2 and 7).

* A maze is a ``size x size`` 4-connected grid with unit step costs.  Its wall count is uniform in
  ``[floor(WH/10)*3, floor(WH/10)*5]`` (24-40% of the cells for 5x5, 30-50% for larger mazes); start and goal are two
  distinct free cells.  A task is kept only when A* finds a plan of at least ``max(W, H)`` cells.
* A* (deterministic): the open set is ordered by ``f = g + h`` with the Manhattan heuristic, equal ``f`` broken by
  the smaller ``y`` and then the smaller ``x`` (``g`` plays no part); children in the order up (y+1), down (y-1),
  left (x-1), right (x+1); a child already open or closed with a cost at most the new one is skipped, an open child
  reached more cheaply is replaced and logged again with a second ``create``; the search stops when the goal is
  *closed*.
* Tokens: prompt ``start x y goal x y`` then ``wall x y`` per wall in ascending cell index ``y * W + x``; trace one
  5-token clause per event, ``create x y cG cH`` / ``close x y cG cH``; plan ``plan x y`` per cell, start to goal.

Plain Python on tuples: generation runs in worker processes (``datamodules.trace_dataset``).
"""
from __future__ import annotations

import heapq
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

Cell = Tuple[int, int]
Event = Tuple[str, int, int, int, int]  # (create | close, x, y, g, h)

MIN_SIZE = 3


@dataclass(frozen=True)
class Maze:
    width: int
    height: int
    walls: FrozenSet[Cell]
    start: Cell
    goal: Cell

    def free(self, cell: Cell) -> bool:
        x, y = cell
        return 0 <= x < self.width and 0 <= y < self.height and cell not in self.walls

    def layout(self) -> Tuple[int, int, Tuple[Cell, ...]]:
        """The wall layout (what the train/test split keeps apart)."""
        return self.width, self.height, sorted_walls(self.walls, self.width)


def sorted_walls(walls, width: int) -> Tuple[Cell, ...]:
    return tuple(sorted(walls, key=lambda c: c[1] * width + c[0]))


def neighbours(cell: Cell) -> Tuple[Cell, Cell, Cell, Cell]:
    """Up, down, left, right (the official child order)."""
    x, y = cell
    return (x, y + 1), (x, y - 1), (x - 1, y), (x + 1, y)


def manhattan(a: Cell, b: Cell) -> int:
    return abs(a[0] - b[0]) + abs(a[1] - b[1])


@dataclass
class AStarResult:
    events: List[Event] = field(default_factory=list)
    plan: List[Cell] = field(default_factory=list)  # empty when the goal is unreachable

    @property
    def solved(self) -> bool:
        return bool(self.plan)


def astar(maze: Maze) -> AStarResult:
    """Deterministic A* with the official event log (see the module docstring)."""
    def h(c: Cell) -> int:
        return manhattan(c, maze.goal)

    start = maze.start
    open_cost: Dict[Cell, int] = {start: 0}
    closed: Dict[Cell, int] = {}
    parent: Dict[Cell, Optional[Cell]] = {start: None}
    heap = [(h(start), start[1], start[0])]
    events: List[Event] = [("create", start[0], start[1], 0, h(start))]
    while heap:
        _, y, x = heapq.heappop(heap)
        cell = (x, y)
        g = open_cost.pop(cell)
        closed[cell] = g
        events.append(("close", x, y, g, h(cell)))
        if cell == maze.goal:
            plan = [cell]
            while parent[plan[-1]] is not None:
                plan.append(parent[plan[-1]])
            return AStarResult(events, plan[::-1])
        for child in neighbours(cell):
            if not maze.free(child):
                continue
            cost = g + 1
            if child in closed:
                if closed[child] <= cost:
                    continue
                del closed[child]  # reopened; never happens with a consistent heuristic such as Manhattan
            elif child in open_cost:
                if open_cost[child] <= cost:
                    continue
                heap.remove((open_cost[child] + h(child), child[1], child[0]))
                heapq.heapify(heap)
            open_cost[child], parent[child] = cost, cell
            heapq.heappush(heap, (cost + h(child), child[1], child[0]))
            events.append(("create", child[0], child[1], cost, h(child)))
    return AStarResult(events, [])


def bfs_length(maze: Maze) -> Optional[int]:
    """Cells on a shortest start-goal path (the reference A* is tested against); ``None`` when unreachable."""
    dist = {maze.start: 1}
    queue = deque([maze.start])
    while queue:
        cell = queue.popleft()
        if cell == maze.goal:
            return dist[cell]
        for child in neighbours(cell):
            if maze.free(child) and child not in dist:
                dist[child] = dist[cell] + 1
                queue.append(child)
    return None


def check_plan(maze: Maze, plan: Optional[Sequence[Cell]], optimal_cells: int) -> Tuple[bool, bool]:
    """``(correct, optimal)``."""
    if not plan or plan[0] != maze.start or plan[-1] != maze.goal or len(set(plan)) != len(plan):
        return False, False
    if not all(maze.free(c) for c in plan) or any(manhattan(a, b) != 1 for a, b in zip(plan, plan[1:])):
        return False, False
    return True, len(plan) == optimal_cells


# ------------------------------------------------------------------------------------------------------ tokens
def prompt_tokens(maze: Maze) -> List[str]:
    out = ["start", str(maze.start[0]), str(maze.start[1]), "goal", str(maze.goal[0]), str(maze.goal[1])]
    for x, y in sorted_walls(maze.walls, maze.width):
        out += ["wall", str(x), str(y)]
    return out


def trace_tokens(events: Sequence[Event]) -> List[str]:
    out: List[str] = []
    for kind, x, y, g, hh in events:
        out += [kind, str(x), str(y), f"c{g}", f"c{hh}"]
    return out


def plan_tokens(plan: Sequence[Cell]) -> List[str]:
    out: List[str] = []
    for x, y in plan:
        out += ["plan", str(x), str(y)]
    return out


def maze_vocabulary(max_size: int) -> List[str]:
    """``bos, eos``, then every other token sorted as strings (the official dictionary's order), then ``pad`` last so
    the official ids are unchanged: coordinates ``0 .. max_size-1``, costs ``c0 .. c{max_size^2 - 1}``, keywords."""
    if not isinstance(max_size, int) or max_size < MIN_SIZE:
        raise ValueError(f"maze size must be an integer >= {MIN_SIZE}, got {max_size!r}")
    words = [str(i) for i in range(max_size)] + [f"c{i}" for i in range(max_size * max_size)]
    words += ["start", "goal", "wall", "create", "close", "plan"]
    return ["bos", "eos"] + sorted(words) + ["pad"]


def parse_prompt(tokens: Sequence[str], width: int, height: int) -> Maze:
    """The maze a prompt describes (inverse of ``prompt_tokens``)."""
    walls = set()
    start = goal = None
    i = 0
    while i + 2 < len(tokens):
        word, x, y = tokens[i], int(tokens[i + 1]), int(tokens[i + 2])
        if word == "start":
            start = (x, y)
        elif word == "goal":
            goal = (x, y)
        elif word == "wall":
            walls.add((x, y))
        else:
            raise ValueError(f"unexpected prompt token {word!r}")
        i += 3
    if start is None or goal is None:
        raise ValueError("a maze prompt needs a start and a goal")
    return Maze(width, height, frozenset(walls), start, goal)


# -------------------------------------------------------------------------------------------------- generation
def wall_count_range(width: int, height: int) -> Tuple[int, int]:
    k = (width * height) // 10
    return 3 * k, 5 * k


def random_walls(rng: random.Random, width: int, height: int) -> FrozenSet[Cell]:
    lo, hi = wall_count_range(width, height)
    cells = [(x, y) for y in range(height) for x in range(width)]
    return frozenset(rng.sample(cells, rng.randint(lo, hi)))


def layout_tasks(rng: random.Random, size: int, pairs: int) -> List[Tuple[Maze, AStarResult]]:
    """One random wall layout and up to ``pairs`` distinct (start, goal) tasks on it that A* solves with a plan of at
    least ``size`` cells (the official rejection rule)."""
    walls = random_walls(rng, size, size)
    free = [(x, y) for y in range(size) for x in range(size) if (x, y) not in walls]
    out, seen = [], set()
    if len(free) < 2:
        return out
    for _ in range(pairs):
        start, goal = rng.sample(free, 2)
        if (start, goal) in seen:
            continue
        seen.add((start, goal))
        maze = Maze(size, size, walls, start, goal)
        result = astar(maze)
        if result.solved and len(result.plan) >= size:
            out.append((maze, result))
    return out
