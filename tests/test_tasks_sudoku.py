"""Sudoku: unique puzzles, verifiers, partial credit, bounded 9x9 generation, the split, robustness."""

from __future__ import annotations

import functools
import itertools
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import task_digest
from hypothesis import given, settings
from hypothesis import strategies as st

from percepdsl.check import check_file
from percepdsl.ir import SudokuParams
from percepdsl_runtime.run import build_model
from percepdsl_runtime.tasks import build_task, perception_share
from percepdsl_runtime.tasks.base import parse_sections
from percepdsl_runtime.tasks.render import draw_sudoku
from percepdsl_runtime.tasks.sudoku import (
    SudokuTask,
    count_solutions,
    grid_words,
    is_solution,
    random_grid,
)

STYLES = ("brief", "trace", "verbose")
ROOT = Path(__file__).resolve().parents[1]


def flat(rows: list[list[int]]) -> list[int]:
    return [v for row in rows for v in row]


@functools.cache
def all_4x4_grids() -> list[tuple[int, ...]]:
    """Every valid 4x4 grid, by brute force over row permutations (independent of the solver)."""
    perms = list(itertools.permutations(range(1, 5)))
    grids = []
    for rows in itertools.product(perms, repeat=4):
        grid = tuple(v for row in rows for v in row)
        if is_solution(list(grid), [0] * 16, 4):
            grids.append(grid)
    return grids


def with_answer(response: str, cells: list[int], n: int) -> str:
    return response[: response.index("<answer>")] + "<answer> " + " ".join(grid_words(cells, n)) + " </answer>"


def with_perception(response: str, cells: list[int], n: int) -> str:
    words = " ".join(grid_words(cells, n))
    return f"<perception> {words} </perception>" + response[response.index(" <reasoning>") :]


@pytest.mark.parametrize("style", STYLES)
def test_ground_truth_verifies_and_uses_only_vocabulary(style: str) -> None:
    task = build_task("sudoku", {"reasoning": style}, seed=3)
    vocab = set(task.vocabulary())
    for split in ("train", "test"):
        for i in range(30):
            s = task.sample(split, i)
            assert set(s.query.split()) <= vocab and set(s.response.split()) <= vocab
            assert sum(map(bool, flat(s.instance["puzzle"]))) == 8
            scores = task.score(s.instance, s.response)
            assert scores.format_ok and scores.outcome and scores.reasoning and scores.perception_exact
            assert scores.perception_partial == 1.0 and scores.slot_errors == [0] * 16
            assert s.image.mode == "RGB" and s.image.size == (64, 64)


def test_puzzles_have_exactly_one_solution() -> None:
    grids = all_4x4_grids()
    assert len(grids) == 288
    task = build_task("sudoku", {"givens": 5}, seed=0)
    for i in range(40):
        puzzle, solution = task.puzzle("train", i)
        completions = [g for g in grids if all(p in (0, v) for p, v in zip(puzzle, g))]
        assert completions == [tuple(solution)]
        assert count_solutions(puzzle, 4) == 1


def test_count_solutions() -> None:
    assert count_solutions([0] * 16, 4, limit=1000) == 288
    grid = random_grid(9, np.random.default_rng(0))
    assert is_solution(grid, [0] * 81, 9)
    assert count_solutions(grid, 9) == 1
    clash = list(grid)
    clash[1] = clash[0]
    assert count_solutions(clash, 9) == 0


def test_trace_places_every_blank_with_its_solution_digit() -> None:
    task = build_task("sudoku", {"size": 9, "reasoning": "trace"}, seed=0)
    for i in range(3):
        s = task.sample("train", i)
        words = parse_sections(s.response).reasoning or ()
        last: dict[str, str] = {}
        for cell, eq, digit in zip(words, words[1:], words[2:]):
            if eq == "=":
                last[cell] = digit
        solution, puzzle = flat(s.instance["solution"]), flat(s.instance["puzzle"])
        expected = {f"r{k // 9 + 1}c{k % 9 + 1}": str(solution[k]) for k in range(81) if not puzzle[k]}
        assert last == expected
        assert words[-1] == "done"


def test_nine_by_nine_generation_is_bounded() -> None:
    task = build_task("sudoku", {"size": 9, "reasoning": "verbose", "image": 144}, seed=1)
    slowest = 0.0
    for i in range(8):
        start = time.perf_counter()
        s = task.sample("train", i)
        slowest = max(slowest, time.perf_counter() - start)
        assert sum(map(bool, flat(s.instance["puzzle"]))) == 30
        assert task.score(s.instance, s.response).outcome
        assert s.image.size == (144, 144)
    assert slowest < 2.0


@pytest.mark.parametrize("arm", ["tm", "ngdiff"])
def test_the_9x9_reference_specs_read_one_patch_per_cell(arm: str, tmp_path: Path, monkeypatch) -> None:
    """specs/repro/sudoku9_<arm>.pd, from its text to the images and the model it builds: a 9×9
    task whose every digit lies inside its own cell's patch, and a model that reads 81 patches."""
    monkeypatch.chdir(ROOT)
    res = check_file(Path(f"specs/repro/sudoku9_{arm}.pd"), fragment_ok=False)
    assert res.ok and res.diagnostics == [], [d.message for d in res.diagnostics]
    ir = res.ir
    task_params, patch = ir.task.params, ir.model.params.patch
    assert (task_params.size, task_params.image, patch) == (9, 144, 16)
    task = build_task(ir.task, seed=ir.seed)
    empty = np.array(draw_sudoku([[0] * 9] * 9, size=144, jitter=0.0, noise=0.0, rng=np.random.default_rng(0)))
    for i in range(4):
        s = task.sample("test", i)
        ys, xs = np.nonzero(np.any(np.array(s.image) != empty, axis=2))  # the digits' ink
        givens = {(r, c) for r, row in enumerate(s.instance["puzzle"]) for c, v in enumerate(row) if v}
        assert set(zip((ys // patch).tolist(), (xs // patch).tolist())) == givens
        assert len(givens) == 30
    config = build_model(ir, task, tmp_path / "model").model.config
    assert (config.vision_config.image_size, config.vision_config.patch_size, config.image_seq_length) == (144, 16, 81)


def test_mutated_answers_fail() -> None:
    task = build_task("sudoku", {}, seed=1)
    for i in range(20):
        s = task.sample("test", i)
        solution, puzzle = flat(s.instance["solution"]), flat(s.instance["puzzle"])
        blank = puzzle.index(0)
        wrong = list(solution)
        wrong[blank] = wrong[blank] % 4 + 1  # breaks its row
        assert not task.score(s.instance, with_answer(s.response, wrong, 4)).outcome
        swapped = list(solution)
        swapped[0:4] = swapped[0:4][::-1]  # a valid row, but columns break
        assert not task.score(s.instance, with_answer(s.response, swapped, 4)).outcome
        truncated = s.response.replace(" ".join(grid_words(solution, 4)), " ".join(grid_words(solution, 4)[:-1]))
        assert not task.score(s.instance, truncated).outcome


def test_perturbed_perception_lowers_partial_credit_and_reasoning_uses_it() -> None:
    task = build_task("sudoku", {}, seed=2)
    for i in range(10):
        s = task.sample("test", i)
        puzzle = flat(s.instance["puzzle"])
        given_cell = next(k for k, v in enumerate(puzzle) if v)
        dropped = list(puzzle)
        dropped[given_cell] = 0  # a given missed by perception
        scores = task.score(s.instance, with_perception(s.response, dropped, 4))
        assert not scores.perception_exact and scores.perception_partial == pytest.approx(15 / 16)
        assert scores.slot_errors[given_cell] == 1 and sum(scores.slot_errors) == 1
        assert scores.outcome and scores.reasoning  # the answer still completes what was perceived
        misread = list(puzzle)
        misread[given_cell] = puzzle[given_cell] % 4 + 1  # a given read as another digit
        scores = task.score(s.instance, with_perception(s.response, misread, 4))
        assert scores.outcome and not scores.reasoning  # the true answer contradicts the perceived given


def test_determinism_within_and_across_processes() -> None:
    raw = {"jitter": 0.5, "noise": 0.3}
    params = SudokuParams(**raw)
    here = [task_digest(SudokuTask(params, seed=4), split, 10) for split in ("train", "test")]
    assert task_digest(SudokuTask(params, seed=4), "train", 10) == here[0]
    assert task_digest(SudokuTask(params, seed=5), "train", 10) != here[0]
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from helpers import task_digest;"
        "from percepdsl_runtime.tasks.sudoku import SudokuTask as T; from percepdsl.ir import SudokuParams as P;"
        f"t = T(P(**{raw!r}), seed=4); print(task_digest(t, 'train', 10), task_digest(t, 'test', 10))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == here


def test_train_and_test_share_no_solution_grid() -> None:
    task = build_task("sudoku", {}, seed=6)
    test = [task.puzzle("test", i) for i in range(task.size("test"))]
    train = [task.puzzle("train", i) for i in range(task.size("train"))]
    assert all(task.is_held_out(sol) for _, sol in test)
    assert not any(task.is_held_out(sol) for _, sol in train)
    assert not {tuple(sol) for _, sol in test} & {tuple(sol) for _, sol in train}
    assert len({tuple(p) for p, _ in test}) == len(test)  # test puzzles are distinct
    held_out_grids = sum(task.is_held_out(list(g)) for g in all_4x4_grids())
    assert 30 < held_out_grids < 90  # ~20% of the 288 grids


@pytest.mark.parametrize("style", STYLES)
def test_cells_format_states_the_same_slots_without_separators(style: str) -> None:
    grid = build_task("sudoku", {"reasoning": style, "givens": 5}, seed=7)
    cells = build_task("sudoku", {"reasoning": style, "givens": 5, "perception_format": "cells"}, seed=7)
    for split in ("train", "test"):
        for i in range(20):
            g, c = grid.sample(split, i), cells.sample(split, i)
            assert c.perception.split() == [w for w in g.perception.split() if w != "/"] and len(c.perception.split()) == 16
            assert c.response.replace(c.perception, g.perception, 1) == g.response  # only p* differs
            assert c.instance == g.instance and c.image.tobytes() == g.image.tobytes()
            assert cells.parse_perception(c.response) == grid.parse_perception(g.response)
            scores = cells.score(c.instance, c.response)
            assert scores.format_ok and scores.outcome and scores.perception_exact and scores.slot_errors == [0] * 16
            # either layout is read as the same perception by either task: `/` is cosmetic
            assert cells.score(c.instance, g.response).perception_exact and grid.score(g.instance, c.response).perception_exact


def test_cells_format_brings_verbose_perception_under_five_percent() -> None:
    def share(fmt: str) -> float:
        task = build_task("sudoku", {"reasoning": "verbose", "givens": 5, "perception_format": fmt}, seed=1)
        return float(np.mean([perception_share(task.sample("train", i).response) for i in range(40)]))

    # words inside the section over all words; the 2 markers (perception tokens in training) add ~0.5%
    assert share("cells") < 0.045 < share("grid")


VOCAB = build_task("sudoku", {}, 0).vocabulary()


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.text(max_size=300),
        st.lists(st.sampled_from(VOCAB), max_size=80).map(" ".join),
        st.lists(st.sampled_from(["1", "2", "3", "4", "_", "/", "9"]), max_size=24).map(
            lambda ws: "<perception> " + " ".join(ws) + " </perception> <reasoning> </reasoning> <answer> " + " ".join(ws) + " </answer>"
        ),
    )
)
def test_scoring_and_parsing_never_raise(text: str) -> None:
    task = build_task("sudoku", {}, 0)
    s = task.sample("test", 0)
    scores = task.score(s.instance, text)
    assert isinstance(scores.format_ok, bool) and isinstance(scores.reasoning, bool)
    assert 0.0 <= scores.perception_partial <= 1.0
    assert len(scores.slot_errors) == 16 and set(scores.slot_errors) <= {0, 1}
    task.parse_perception(text)


@pytest.mark.parametrize(
    "params",
    [
        {"size": 6},
        {"givens": 3},
        {"size": 9, "givens": 20},
        {"givens": 17},
        {"reasoning": "x"},
        {"image": 10},
        {"perception_format": "edges"},
    ],
)
def test_bad_parameters_raise(params: dict) -> None:
    with pytest.raises(ValueError):
        build_task("sudoku", params, 0)
