"""Dualformer (spec dualformer.md): the maze generator and A* traces, the structured trace dropping, the
encoder-decoder, the loss, mode-forced decoding, plan metrics, a short overfit and resume = uninterrupted."""
import random

import numpy as np
import pytest

from datamodules.maze_astar import (Maze, astar, bfs_length, layout_tasks, maze_vocabulary, parse_prompt,
                                    plan_tokens, prompt_tokens, random_walls, trace_tokens, wall_count_range)
from datamodules.trace_dataset import TraceDataConfig, TraceDataset, ensure_dataset
from datamodules.trace_dropping import TraceDropper, check_probabilities, draw_level, example_rng
from lightning_modules.dualformer_eval import check_plan, parse_response


# ------------------------------------------------------------------------------------------------------- A*
def test_astar_events_on_a_hand_solved_maze():
    """3x3, no walls, (0,0) -> (2,2): f ties broken by smaller y, then smaller x (errata 1)."""
    r = astar(Maze(3, 3, frozenset(), (0, 0), (2, 2)))
    assert r.events == [
        ("create", 0, 0, 0, 4), ("close", 0, 0, 0, 4), ("create", 0, 1, 1, 3), ("create", 1, 0, 1, 3),
        ("close", 1, 0, 1, 3), ("create", 1, 1, 2, 2), ("create", 2, 0, 2, 2), ("close", 2, 0, 2, 2),
        ("create", 2, 1, 3, 1), ("close", 0, 1, 1, 3), ("create", 0, 2, 2, 2), ("close", 1, 1, 2, 2),
        ("create", 1, 2, 3, 1), ("close", 2, 1, 3, 1), ("create", 2, 2, 4, 0), ("close", 0, 2, 2, 2),
        ("close", 1, 2, 3, 1), ("close", 2, 2, 4, 0)]
    assert r.plan == [(0, 0), (1, 0), (2, 0), (2, 1), (2, 2)]
    assert trace_tokens(r.events[:2]) == ["create", "0", "0", "c0", "c4", "close", "0", "0", "c0", "c4"]
    assert plan_tokens(r.plan[:2]) == ["plan", "0", "0", "plan", "1", "0"]


def test_astar_is_optimal_against_bfs_on_random_mazes():
    rng = random.Random(0)
    solved = recreated = 0
    for _ in range(400):
        size = rng.choice([3, 5, 7, 10])
        walls = random_walls(rng, size, size)
        free = [(x, y) for y in range(size) for x in range(size) if (x, y) not in walls]
        start, goal = rng.sample(free, 2)
        maze = Maze(size, size, walls, start, goal)
        r = astar(maze)
        assert (len(r.plan) if r.solved else None) == bfs_length(maze)
        if r.solved:
            solved += 1
            assert check_plan(maze, r.plan, len(r.plan)) == (True, True)
            assert r.events[-1][:3] == ("close", *maze.goal)  # stops when the goal is closed
            creates = [e[1:3] for e in r.events if e[0] == "create"]
            recreated += len(creates) != len(set(creates))  # an open cell reached more cheaply: errata 2
    assert solved > 200 and recreated > 0


def test_generator_rules_and_prompt_round_trip():
    rng = random.Random(1)
    assert wall_count_range(5, 5) == (6, 10) and wall_count_range(30, 30) == (270, 450)
    for _ in range(50):
        for maze, result in layout_tasks(rng, 6, 5):
            lo, hi = wall_count_range(6, 6)
            assert lo <= len(maze.walls) <= hi and len(result.plan) >= 6
            assert parse_prompt(prompt_tokens(maze), 6, 6) == maze
    vocab = maze_vocabulary(5)
    assert vocab[:2] == ["bos", "eos"] and vocab[-1] == "pad" and vocab[2:-1] == sorted(vocab[2:-1])
    assert "c24" in vocab and "c25" not in vocab and "4" in vocab and "5" not in vocab
    with pytest.raises(ValueError, match="maze size must be an integer >= 3, got 2"):
        maze_vocabulary(2)


def test_dataset_is_deterministic_parallel_and_its_splits_disjoint(tmp_path):
    cfg = TraceDataConfig(sizes=(5, 6), n_train=300, n_test=40, seed=3, pairs_per_layout=3)
    one = ensure_dataset(tmp_path / "a", cfg, processes=1)
    two = ensure_dataset(tmp_path / "b", cfg, processes=2)
    for split in ("train", "test"):
        for part in ("tokens", "index"):
            assert np.array_equal(np.load(one / f"{split}_{part}.npy"), np.load(two / f"{split}_{part}.npy"))
    other = ensure_dataset(tmp_path / "c", TraceDataConfig(sizes=(5, 6), n_train=300, n_test=40, seed=4))
    assert not np.array_equal(np.load(one / "train_tokens.npy")[:200], np.load(other / "train_tokens.npy")[:200])
    train, test = TraceDataset(one, "train"), TraceDataset(one, "test")
    assert len(train) == 300 and len(test) == 40

    def layouts(ds):
        out = set()
        for i in range(len(ds)):
            e = ds[i]
            out.add(parse_prompt([ds.vocabulary[t] for t in e["prompt"]], e["size"], e["size"]).layout())
        return out
    assert not layouts(train) & layouts(test)
    e = train[0]
    maze = parse_prompt([train.vocabulary[t] for t in e["prompt"]], e["size"], e["size"])
    assert [train.vocabulary[t] for t in e["trace"]] == trace_tokens(astar(maze).events)
    with pytest.raises(ValueError, match="holds a different dataset"):  # same folder name, other settings
        (one / "meta.json").write_text((one / "meta.json").read_text().replace('"seed": 3', '"seed": 9'))
        ensure_dataset(tmp_path / "a", cfg)


# -------------------------------------------------------------------------------------------------- dropping
VOCAB = maze_vocabulary(5)
IDS = {w: i for i, w in enumerate(VOCAB)}
COSTS = frozenset(i for w, i in IDS.items() if w[0] == "c" and w[1:].isdigit())
HAND = ("create 0 0 c0 c4 close 0 0 c0 c4 create 0 1 c1 c3 create 1 0 c1 c3 close 1 0 c1 c3 "
        "create 1 1 c2 c2").split()


def _dropper(probs=(1, 0, 0, 0, 0), variant="paper"):
    return TraceDropper(probs, IDS["create"], IDS["close"], COSTS, variant)


def _words(ids):
    return " ".join(VOCAB[i] for i in ids)


def test_each_dropping_level_gives_the_expected_tokens():
    d, trace = _dropper(), [IDS[w] for w in HAND]
    assert _words(d.drop(trace, 0)) == " ".join(HAND)
    assert _words(d.drop(trace, 1)) == "create 0 0 c0 c4 create 0 1 c1 c3 create 1 0 c1 c3 create 1 1 c2 c2"
    assert _words(d.drop(trace, 2)) == "create 0 0 create 0 1 create 1 0 create 1 1"
    assert d.drop(trace, 4) == []
    rng = example_rng(0, 0, 0)
    keep = np.random.default_rng([0, 0, 0]).random(4) >= 0.3  # the paper's level 3: Bernoulli(0.3) per create
    expected = [c for c, k in zip(["create 0 0", "create 0 1", "create 1 0", "create 1 1"], keep) if k]
    assert _words(d.drop(trace, 3, rng)) == " ".join(expected)
    code = _dropper(variant="maze_code")  # the official maze code: costs kept, the picked creates removed
    assert _words(code.drop(trace, 3, maze_code_pick=[1, 3])) == "create 0 0 c0 c4 create 1 0 c1 c3"
    with pytest.raises(ValueError, match="unknown dropping level 5"):
        d.drop(trace, 5)


def test_level_draw_intervals_and_mixture_frequencies():
    probs = (0.45, 1 / 6, 1 / 6, 1 / 6, 0.05)
    assert [draw_level(u, probs) for u in (0.0, 0.17, 0.34, 0.49, 0.51, 0.549, 0.56, 0.999)] == [1, 2, 3, 3, 4, 4,
                                                                                                  0, 0]
    d, trace = _dropper(probs), [IDS[w] for w in HAND]
    levels = [d(trace, example_rng(7, 0, i))[0] for i in range(6000)]
    freq = np.bincount(levels, minlength=5) / len(levels)
    assert np.allclose(freq, probs, atol=0.02)
    again = [d(trace, example_rng(7, 0, i)) for i in range(50)]
    assert again == [d(trace, example_rng(7, 0, i)) for i in range(50)]  # a pure function of (seed, epoch, index)
    assert again != [d(trace, example_rng(7, 1, i)) for i in range(50)]  # re-drawn every epoch


@pytest.mark.parametrize("probs, needle", [
    ((0.5, 0.2, 0.2, 0.2, 0.0), "must sum to 1, got [0.5, 0.2, 0.2, 0.2, 0.0] (sum 1.1)"),
    ((0.5, 0.5), "must be 5 numbers p0..p4, got 2"),
    ((1.5, -0.5, 0, 0, 0), "must each lie in [0, 1]")])
def test_bad_dropping_probabilities_name_the_value(probs, needle):
    with pytest.raises(ValueError) as err:
        check_probabilities(probs)
    assert needle in str(err.value)


# -------------------------------------------------------------------------------------------------- metrics
def test_plan_metrics_parse_valid_invalid_and_suboptimal_plans():
    maze = Maze(3, 3, frozenset({(1, 1)}), (0, 0), (2, 2))
    best = 5

    def judge(text):
        r = parse_response(text.split())
        return check_plan(maze, r.plan, best), r.trace_len

    assert judge("create 0 0 c0 c4 plan 0 0 plan 1 0 plan 2 0 plan 2 1 plan 2 2") == ((True, True), 5)
    assert judge("plan 0 0 plan 0 1 plan 0 2 plan 1 2 plan 2 2") == ((True, True), 0)
    assert judge("plan 0 0 plan 1 0 plan 1 1 plan 1 2 plan 2 2")[0] == (False, False)  # through a wall
    assert judge("plan 0 0 plan 2 0 plan 2 1 plan 2 2")[0] == (False, False)  # a jump
    assert judge("plan 0 0 plan 1 0 plan 2 0 plan 2 1")[0] == (False, False)  # stops short of the goal
    assert judge("plan 0 0 plan 1 0 plan 2 0 plan 2 1 plan 2 2 wall")[0] == (False, False)  # malformed
    assert judge("plan 0 0 plan -1 0 plan 0 0 plan 0 1 plan 0 2 plan 1 2 plan 2 2")[0] == (False, False)  # off
    assert judge("create 0 0 c0 c4")[0] == (False, False)  # no plan
    detour = Maze(4, 3, frozenset(), (0, 0), (2, 0))
    r = parse_response("plan 0 0 plan 0 1 plan 1 1 plan 2 1 plan 2 0".split())
    assert check_plan(detour, r.plan, 3) == (True, False)  # correct but not optimal
    r = parse_response("plan 0 0 plan 1 0 plan 0 0 plan 1 0 plan 2 0".split())
    assert check_plan(detour, r.plan, 3) == (False, False)  # revisits (stricter than the official check)


# --------------------------------------------------------------------------------------------------- Sokoban
def test_sokoban_astar_is_optimal_against_bfs_and_its_plans_replay():
    from collections import deque

    from datamodules.maze_astar import neighbours
    from datamodules.sokoban_astar import (heuristic, move, parse_sokoban, random_sokoban, replay, sokoban_astar,
                                           sokoban_prompt, sokoban_trace)

    def bfs(p):
        dist, queue = {p.start: 0}, deque([p.start])
        while queue:
            s = queue.popleft()
            if p.solved(s):
                return dist[s]
            for t in neighbours(s[0]):
                c = move(p, s, t)
                if c is not None and c not in dist:
                    dist[c] = dist[s] + 1
                    queue.append(c)
        return None

    rng = random.Random(5)
    solved = 0
    for _ in range(25):
        p = random_sokoban(rng)
        assert parse_sokoban(sokoban_prompt(p), 7) == p
        r = sokoban_astar(p, max_expansions=50000)
        best = bfs(p)
        assert (len(r.plan) - 1 if r.solved else None) == best
        if r.solved:
            solved += 1
            assert p.solved(replay(p, r.plan))
            words = sokoban_trace(r.events[:1])
            assert words[:4] == ["create", "worker", str(p.worker[0]), str(p.worker[1])] and words[4] == "box"
    assert solved >= 15
    p = random_sokoban(random.Random(0))
    corner = (1, 1)  # against the border in both directions: a deadlock unless on a dock
    assert heuristic(p, [corner]) == (0 if corner in p.docks else float("inf"))


def test_sokoban_dataset_and_plan_judge(tmp_path):
    from datamodules.search_tasks import judge, puzzle_of

    cfg = TraceDataConfig(task="sokoban", sizes=(7,), n_train=12, n_test=4, max_trace_tokens=3000)
    ds = TraceDataset(ensure_dataset(tmp_path, cfg), "train")
    assert ds.task == "sokoban" and len(ds) == 12
    for i in range(len(ds)):
        e = ds[i]
        words = [ds.vocabulary[t] for t in e["trace"]]
        assert len(words) <= 3000 and words[:2] == ["create", "worker"]
        puzzle = puzzle_of("sokoban", [ds.vocabulary[t] for t in e["prompt"]], e["size"])
        plan = parse_response([ds.vocabulary[t] for t in e["plan"]]).plan
        assert judge("sokoban", puzzle, plan, len(plan)) == (True, True)
        assert judge("sokoban", puzzle, plan[:-1], len(plan)) == (False, False)  # one push short
        assert judge("sokoban", puzzle, plan + plan[-2:][::-1][1:], len(plan))[1] is False  # longer: not optimal
    with pytest.raises(ValueError, match="unknown task 'chess'"):
        TraceDataConfig(task="chess")
