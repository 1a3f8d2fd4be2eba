"""Sokoban puzzles and their A* search traces in the token format of the Dualformer "with-box" dataset (spec
``dualformer.md`` 1.1, Sokoban).

* A puzzle is a ``size x size`` grid whose border ring is wall, with ``n_walls`` extra interior walls, ``n_boxes``
  boxes, as many docks, and the worker (the paper's setting: 7x7, 2 walls, 2 boxes).  Boxes are never placed next to
  the border (where they could never be pushed off it); docks, worker and walls go on random free cells.
* Actions up (y+1), down (y-1), left (x-1), right (x+1), each of cost 1; the worker pushes a box it walks into when
  the cell behind the box is free.
* Heuristic: the sum over boxes of the Manhattan distance to the nearest dock; infinite (the child is pruned) when a
  box off the docks can be pushed neither horizontally nor vertically (a wall on one side in both directions: the
  official simple deadlock test).
* A* as for mazes: the open set ordered by ``f``, ties broken by the worker's ``y``, then ``x``, then the boxes (our
  deterministic choice: the spec names none for Sokoban); a node reached more cheaply is replaced and logged again.
  ``max_expansions`` bounds the search (``None`` result beyond it).
* Tokens: prompt ``worker x y``, ``box x y`` per box, ``dock x y`` per dock, ``wall x y`` per wall, each group sorted
  (border walls included, as the official prompt); trace clauses ``create worker x y box x y box x y cG cH`` and the
  same for ``close``; plan ``plan x y`` per worker position, start to finish.
"""
from __future__ import annotations

import heapq
import random
from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

from datamodules.maze_astar import Cell, manhattan, neighbours

State = Tuple[Cell, Tuple[Cell, ...]]  # (worker, sorted boxes)
INF = float("inf")


@dataclass(frozen=True)
class Sokoban:
    size: int
    walls: FrozenSet[Cell]
    docks: Tuple[Cell, ...]
    boxes: Tuple[Cell, ...]
    worker: Cell

    def free(self, cell: Cell) -> bool:
        return 0 <= cell[0] < self.size and 0 <= cell[1] < self.size and cell not in self.walls

    @property
    def start(self) -> State:
        return self.worker, tuple(sorted(self.boxes))

    def solved(self, state: State) -> bool:
        return set(state[1]) == set(self.docks)

    def layout(self):
        return self.size, tuple(sorted(self.walls))


def move(puzzle: Sokoban, state: State, target: Cell) -> Optional[State]:
    """The state after the worker steps to the neighbouring ``target`` (pushing a box there), or ``None``."""
    worker, boxes = state
    if not puzzle.free(target):
        return None
    if target in boxes:
        beyond = (2 * target[0] - worker[0], 2 * target[1] - worker[1])
        if not puzzle.free(beyond) or beyond in boxes:
            return None
        boxes = tuple(sorted(beyond if b == target else b for b in boxes))
    return target, boxes


def heuristic(puzzle: Sokoban, boxes: Sequence[Cell]) -> float:
    total = 0
    for b in boxes:
        if b not in puzzle.docks:
            x, y = b
            stuck_h = not puzzle.free((x - 1, y)) or not puzzle.free((x + 1, y))
            stuck_v = not puzzle.free((x, y - 1)) or not puzzle.free((x, y + 1))
            if stuck_h and stuck_v:
                return INF
        total += min(manhattan(b, d) for d in puzzle.docks)
    return total


@dataclass
class SokobanResult:
    events: List[Tuple[str, State, int, int]]  # (create | close, state, g, h)
    plan: List[Cell]  # worker positions, start to finish; empty when unsolved

    @property
    def solved(self) -> bool:
        return bool(self.plan)


def _key(f: float, state: State):
    (x, y), boxes = state
    return f, y, x, boxes


def sokoban_astar(puzzle: Sokoban, max_expansions: int = 20000) -> Optional[SokobanResult]:
    """A* over (worker, boxes) states; ``None`` when ``max_expansions`` is exceeded, an empty plan when the
    puzzle has no solution."""
    start = puzzle.start
    h0 = heuristic(puzzle, start[1])
    if h0 == INF:
        return SokobanResult([], [])
    open_cost: Dict[State, int] = {start: 0}
    closed: Dict[State, int] = {}
    parent: Dict[State, Optional[State]] = {start: None}
    hs: Dict[State, int] = {start: int(h0)}
    heap = [(*_key(h0, start), start)]
    events = [("create", start, 0, int(h0))]
    while heap:
        *_, state = heapq.heappop(heap)
        g = open_cost.pop(state)
        closed[state] = g
        events.append(("close", state, g, hs[state]))
        if puzzle.solved(state):
            path = [state]
            while parent[path[-1]] is not None:
                path.append(parent[path[-1]])
            return SokobanResult(events, [s[0] for s in reversed(path)])
        if len(closed) > max_expansions:
            return None
        for target in neighbours(state[0]):
            child = move(puzzle, state, target)
            if child is None:
                continue
            h = heuristic(puzzle, child[1])
            if h == INF:
                continue
            cost = g + 1
            if child in closed:
                if closed[child] <= cost:
                    continue
                del closed[child]
            elif child in open_cost:
                if open_cost[child] <= cost:
                    continue
                heap.remove((*_key(open_cost[child] + hs[child], child), child))
                heapq.heapify(heap)
            open_cost[child], parent[child], hs[child] = cost, state, int(h)
            heapq.heappush(heap, (*_key(cost + h, child), child))
            events.append(("create", child, cost, int(h)))
    return SokobanResult(events, [])


def replay(puzzle: Sokoban, plan: Sequence[Cell]) -> Optional[State]:
    """The final state after walking ``plan`` (which must start at the worker), or ``None`` if a step is illegal."""
    if not plan or plan[0] != puzzle.worker:
        return None
    state = puzzle.start
    for a, b in zip(plan, plan[1:]):
        if manhattan(a, b) != 1:
            return None
        state = move(puzzle, state, b)
        if state is None:
            return None
    return state


def random_sokoban(rng: random.Random, size: int = 7, n_walls: int = 2, n_boxes: int = 2) -> Sokoban:
    border = {(x, y) for x in range(size) for y in range(size) if x in (0, size - 1) or y in (0, size - 1)}
    inner = [(x, y) for y in range(1, size - 1) for x in range(1, size - 1)]
    walls = set(border) | set(rng.sample(inner, n_walls))
    free = [c for c in inner if c not in walls]
    box_cells = [c for c in free if 2 <= c[0] <= size - 3 and 2 <= c[1] <= size - 3]
    if len(box_cells) < n_boxes or len(free) < 2 * n_boxes + 1:
        raise ValueError(f"a {size}x{size} Sokoban with {n_walls} walls has no room for {n_boxes} boxes")
    boxes = rng.sample(box_cells, n_boxes)
    rest = [c for c in free if c not in boxes]
    picks = rng.sample(rest, n_boxes + 1)
    return Sokoban(size, frozenset(walls), tuple(sorted(picks[:n_boxes])), tuple(sorted(boxes)), picks[-1])


# ------------------------------------------------------------------------------------------------------ tokens
def sokoban_prompt(p: Sokoban) -> List[str]:
    out = ["worker", str(p.worker[0]), str(p.worker[1])]
    for word, cells in (("box", p.boxes), ("dock", p.docks), ("wall", p.walls)):
        for x, y in sorted(cells):
            out += [word, str(x), str(y)]
    return out


def sokoban_trace(events) -> List[str]:
    out: List[str] = []
    for kind, (worker, boxes), g, h in events:
        out += [kind, "worker", str(worker[0]), str(worker[1])]
        for x, y in boxes:
            out += ["box", str(x), str(y)]
        out += [f"c{g}", f"c{h}"]
    return out


def parse_sokoban(words: Sequence[str], size: int) -> Sokoban:
    groups: Dict[str, List[Cell]] = {"worker": [], "box": [], "dock": [], "wall": []}
    for i in range(0, len(words) - 2, 3):
        if words[i] not in groups:
            raise ValueError(f"unexpected Sokoban prompt token {words[i]!r}")
        groups[words[i]].append((int(words[i + 1]), int(words[i + 2])))
    return Sokoban(size, frozenset(groups["wall"]), tuple(sorted(groups["dock"])), tuple(sorted(groups["box"])),
                   groups["worker"][0])


def sokoban_vocabulary(size: int, max_cost: int) -> List[str]:
    words = [str(i) for i in range(size)] + [f"c{i}" for i in range(max_cost + 1)]
    words += ["worker", "box", "dock", "wall", "create", "close", "plan"]
    return ["bos", "eos"] + sorted(words) + ["pad"]
