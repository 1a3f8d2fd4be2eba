"""Dualformer's structured trace dropping (spec ``dualformer.md`` 1.3, errata 3 and 4).

Each training example gets one level, drawn from ``Cat(p0 .. p4)`` with one uniform ``u`` compared with the cumulative
sums of ``p1, p2, p3, p4`` in that order, level 0 being the top interval (the official draw):

====== ================================================ ==================================
level  removed                                          a maze clause after dropping
====== ================================================ ==================================
0      nothing                                          ``create x y cG cH``, ``close ...``
1      every ``close`` clause                           ``create x y cG cH``
2      level 1 plus the cost tokens of every ``create`` ``create x y``
3      level 2 plus a random part of the ``create``s    a subset of ``create x y``
4      the whole trace (solution only)                  nothing
====== ================================================ ==================================

Level 3 has two variants (``level3_variant``): ``paper`` (the default, as the paper and the official Sokoban code:
no costs, each create clause dropped independently with probability ``create_drop`` = 0.3) and ``maze_code`` (the
official maze code: costs kept, an integer percentage drawn uniformly from [10, 40] and ``floor(n * pct / 100)``
of the ``n`` create clauses removed; its random draws happen for every example, before the level is drawn).
The dropped trace is always derived from the stored full trace, and the level is re-drawn on every pass from
``(seed, epoch, index)``, so a resumed run sees the same dropping as an uninterrupted one.

Works on token ids: a clause starts at a ``create`` or ``close`` id; its cost tokens are the ids in ``cost_ids``
(so Sokoban's longer clauses are handled the same way).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

LEVELS = (0, 1, 2, 3, 4)
VARIANTS = ("paper", "maze_code")
# Mixtures of spec 1.3 / 4 (the paper's maze values are UNCONFIRMED there; they are the recipe's defaults).
MIXTURES = {"full_trace": (1.0, 0.0, 0.0, 0.0, 0.0), "solution_only": (0.0, 0.0, 0.0, 0.0, 1.0),
            "dualformer": (0.45, 1 / 6, 1 / 6, 1 / 6, 0.05)}


def check_probabilities(probs: Sequence[float]) -> tuple:
    """``(p0, .., p4)`` as floats, or a one-line ``ValueError`` naming what is wrong."""
    try:
        probs = tuple(float(p) for p in probs)
    except (TypeError, ValueError):
        raise ValueError(f"dropping probabilities must be 5 numbers p0..p4, got {probs!r}") from None
    if len(probs) != 5:
        raise ValueError(f"dropping probabilities must be 5 numbers p0..p4, got {len(probs)}: {list(probs)}")
    if any(not 0.0 <= p <= 1.0 for p in probs):
        raise ValueError(f"dropping probabilities must each lie in [0, 1], got {list(probs)}")
    if abs(sum(probs) - 1.0) > 1e-6:
        raise ValueError(f"dropping probabilities must sum to 1, got {list(probs)} (sum {sum(probs):.6g})")
    return probs


def mixture(name_or_probs) -> tuple:
    """A named mixture (``full_trace``, ``solution_only``, ``dualformer``) or explicit ``p0..p4``."""
    if isinstance(name_or_probs, str):
        if name_or_probs not in MIXTURES:
            raise ValueError(f"unknown trace mixture {name_or_probs!r}: expected one of {sorted(MIXTURES)} "
                             f"or five probabilities p0..p4")
        return MIXTURES[name_or_probs]
    return check_probabilities(name_or_probs)


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(epoch), int(index)])


def draw_level(u: float, probs: Sequence[float]) -> int:
    """Level for the uniform draw ``u``: intervals p1, p2, p3, p4 from 0 up, level 0 on top (errata 4)."""
    acc = 0.0
    for level in (1, 2, 3, 4):
        acc += probs[level]
        if u < acc:
            return level
    return 0


def split_clauses(trace: Sequence[int], create_id: int, close_id: int) -> List[List[int]]:
    clauses: List[List[int]] = []
    for tok in trace:
        if tok == create_id or tok == close_id or not clauses:
            clauses.append([tok])
        else:
            clauses[-1].append(tok)
    return clauses


@dataclass
class TraceDropper:
    probs: tuple
    create_id: int
    close_id: int
    cost_ids: frozenset
    level3_variant: str = "paper"
    create_drop: float = 0.3
    pct_range: tuple = (10, 40)

    def __post_init__(self):
        self.probs = mixture(self.probs)
        if self.level3_variant not in VARIANTS:
            raise ValueError(f"unknown level3_variant {self.level3_variant!r}: expected one of {list(VARIANTS)}")
        if not 0.0 <= self.create_drop <= 1.0:
            raise ValueError(f"create_drop must lie in [0, 1], got {self.create_drop!r}")

    def drop(self, trace: Sequence[int], level: int, rng: Optional[np.random.Generator] = None,
             maze_code_pick: Optional[Sequence[int]] = None) -> List[int]:
        """The trace at ``level``.  Level 3 draws from ``rng`` (paper) or removes the create clauses whose positions
        among the creates are in ``maze_code_pick`` (maze_code)."""
        if level not in LEVELS:
            raise ValueError(f"unknown dropping level {level!r}: expected one of {list(LEVELS)}")
        if level == 0:
            return list(trace)
        if level == 4:
            return []
        creates = [c for c in split_clauses(trace, self.create_id, self.close_id) if c[0] == self.create_id]
        if level == 3 and self.level3_variant == "maze_code":
            gone = set(maze_code_pick or ())
            return [t for i, c in enumerate(creates) if i not in gone for t in c]
        if level >= 2:
            creates = [[t for t in c if t not in self.cost_ids] for c in creates]
        if level == 3:
            keep = rng.random(len(creates)) >= self.create_drop
            creates = [c for c, k in zip(creates, keep) if k]
        return [t for c in creates for t in c]

    def __call__(self, trace: Sequence[int], rng: np.random.Generator) -> tuple:
        """``(level, dropped trace)`` for one example, drawn from ``rng``."""
        pick = None
        if self.level3_variant == "maze_code":  # its draws happen before the level's, for every example
            n = sum(1 for t in trace if t == self.create_id)
            pct = int(rng.integers(self.pct_range[0], self.pct_range[1] + 1))
            pick = rng.choice(n, size=math.floor(n * pct / 100), replace=False).tolist() if n else []
        level = draw_level(float(rng.random()), self.probs)
        return level, self.drop(trace, level, rng, pick)
