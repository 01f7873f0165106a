"""Sudoku: fill a rendered, partially filled 4x4 or 9x9 grid that has exactly one solution.

Words (all space separated, all in :meth:`SudokuTask.vocabulary`):

* perception ``p*``: the givens row by row, ``_`` for a blank; format ``grid`` (the default)
  separates rows by ``/`` (``1 _ 3 _ / _ _ _ 2 / ...``), format ``cells`` writes the n² cell
  words alone (``1 _ 3 _ _ _ _ 2 ...``): the same slots, 3 words fewer at 4×4, which brings
  the perception share of ``verbose`` targets with 5 givens under 5% of the tokens.
* answer: the full grid in the same layout, ``1 2 3 4 / 3 4 1 2 / ...``.
  (Separators are cosmetic: parsers read the cell words in order and ignore ``/``.)
* reasoning, by style:

  - ``brief``: ``done``.
  - ``trace``: the solver's steps (see :func:`_search`): a blank with one candidate,
    ``r2c3 ? 4 r2c3 = 4`` (its candidates after eliminating the digits of its row, column and
    box); a digit with one place left in a unit, ``row2 4 only r2c3 = 4``; when neither exists,
    a guess at the blank with the fewest candidates, ``r2c3 ? 1 4 r2c3 = 1``, undone by
    ``r2c3 back`` when all its alternatives fail; conflicts read ``r2c3 ? none`` or
    ``row2 4 none``. The trace ends with ``done``.
  - ``verbose``: the trace made explicit. First the pencil marks (``marks r1c2 1 4 r1c3 4 ...``:
    every blank's candidates); each single names the filled cells that eliminate digits
    (``r2c3 : row r2c1 4 .. col .. box .. ? 1``) or, for a digit's only place, why each other
    blank of the unit cannot take it (``row2 4 : r2c1 col r2c2 box only r2c3 = 4``); each
    placement strikes its digit from the pencil marks of the blanks it sees
    (``r2c3 = 1 del 1 r2c4 r4c3``); at the end a check of every row, column and box
    (``row1 1 2 3 4 ok ...``).

Puzzles are made by removing givens from a random full grid, in random order, while the
solution stays unique (a solver counting up to 2 solutions, with a node budget), so every
puzzle has exactly one solution and generation does bounded work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

import numpy as np
from PIL import Image

from percepdsl.catalogue import DEFAULT_GIVENS
from percepdsl.ir import SudokuParams

from .base import (
    MARKERS,
    DistinctStream,
    Scores,
    TaskBase,
    filler_vocabulary,
    in_held_out,
    parse_sections,
    perception_words,
    rng_for,
)
from .render import draw_sudoku

QUERY = "solve the sudoku"
BLANK = "_"
ROW_SEP = "/"
# The catalogue holds the givens bounds (MIN_GIVENS, DEFAULT_GIVENS: 8 of 16 cells at 4x4 is half
# the grid, 8 forced placements to reason out; 30 of 81 at 9x9 is the usual range of "medium"
# newspaper puzzles, ~28-32). Why MIN_GIVENS is where it is: one removal pass from a full grid
# ends at a minimal puzzle; measured over 2,000 4x4 and 100 9x9 passes, 99.6% of 4x4 passes get
# down to 5 givens and 81% of 9x9 passes to 25. With up to _MAX_GRIDS grids per item, missing the
# target is a ~1e-6 event.
#: Share of solution grids held out for test. Train and test are split by *solution grid*, so no
#: test solution is ever a train solution; 20% of the 288 4x4 grids is ~58 test grids, each the
#: source of thousands of distinct puzzles.
HELD_OUT = 0.2
#: Solver step budget for one uniqueness check. Checks while making 9x9 puzzles with 25 givens took
#: at most 512 steps (measured over 40 puzzles), so 20k is a ~40x margin; a check that runs out
#: counts as "not unique", the given stays, and the puzzle remains provably unique.
_CHECK_BUDGET = 20_000
#: Full grids tried per item before settling for the fewest givens reached (see _make_puzzle).
_MAX_GRIDS = 8


@dataclass(frozen=True)
class _Geometry:
    n: int
    row: tuple[int, ...]  # row of each cell (cells in reading order)
    col: tuple[int, ...]
    box: tuple[int, ...]
    units: tuple[tuple[str, tuple[int, ...]], ...]  # (name word, cells): rows, then columns, boxes
    units_of: tuple[tuple[tuple[str, tuple[int, ...]], ...], ...]  # per cell: its ("row"|"col"|"box", cells)
    peers: tuple[tuple[int, ...], ...]  # per cell: the other cells of its units, in reading order


@cache
def _geometry(n: int) -> _Geometry:
    b = math.isqrt(n)
    cells = range(n * n)
    row = tuple(i // n for i in cells)
    col = tuple(i % n for i in cells)
    box = tuple((i // n) // b * b + (i % n) // b for i in cells)
    kinds = (("row", row), ("col", col), ("box", box))
    members = {(kind, u): tuple(i for i in cells if of[i] == u) for kind, of in kinds for u in range(n)}
    units = tuple((f"{kind}{u + 1}", members[kind, u]) for kind, _ in kinds for u in range(n))
    units_of = tuple(tuple((kind, members[kind, of[i]]) for kind, of in kinds) for i in cells)
    peers = tuple(tuple(sorted({j for _, unit in units_of[i] for j in unit} - {i})) for i in cells)
    return _Geometry(n, row, col, box, units, units_of, peers)


def cell_word(i: int, n: int) -> str:
    return f"r{i // n + 1}c{i % n + 1}"


class _OutOfBudget(Exception):
    pass


def _search(
    cells: list[int],
    n: int,
    *,
    limit: int,
    budget: int | None = None,
    rng: np.random.Generator | None = None,
    out: list[str] | None = None,
    verbose: bool = False,
) -> tuple[int, list[int] | None]:
    """Depth-first search as a person solves: forced moves first, a guess only when stuck.

    Each step takes, in this order: a blank with one candidate (naked single, first in reading
    order); a digit with one place left in a row, column or box (hidden single, units in the
    order rows, columns, boxes); else a guess at the blank with the fewest candidates, digits in
    ascending order (shuffled by ``rng`` when given). A blank without candidates or a digit
    without a place is a conflict. Returns (number of solutions found, stopping at ``limit``;
    the first solution). Raises ``_OutOfBudget`` after ``budget`` steps. Appends trace words to
    ``out``. Contradictory givens have no solution.
    """
    g = _geometry(n)
    rows, cols, boxes = [0] * n, [0] * n, [0] * n
    for i, v in enumerate(cells):
        if v:
            bit = 1 << v
            if (rows[g.row[i]] | cols[g.col[i]] | boxes[g.box[i]]) & bit:
                return 0, None
            rows[g.row[i]] |= bit
            cols[g.col[i]] |= bit
            boxes[g.box[i]] |= bit
    grid = list(cells)
    blanks = [i for i, v in enumerate(cells) if not v]
    full = (1 << (n + 1)) - 2  # bits 1..n
    found: list[list[int]] = []
    steps = 0

    def hidden_single(masks: dict[int, int]) -> tuple[str, tuple[int, ...], int, int | None] | None:
        """(unit name, unit cells, digit, the digit's only place or None if it has none)."""
        for name, unit in g.units:
            once = twice = present = 0
            for i in unit:
                if grid[i]:
                    present |= 1 << grid[i]
                else:
                    twice |= once & masks[i]
                    once |= masks[i]
            missing = full & ~present
            for bits, placeable in ((missing & ~once, False), (missing & once & ~twice, True)):
                if bits:
                    d = (bits & -bits).bit_length() - 1
                    place = next(i for i in unit if not grid[i] and masks[i] >> d & 1) if placeable else None
                    return name, unit, d, place
        return None

    def filled_peers(i: int) -> list[str]:
        """``: row <cell digit>.. col .. box ..``: the filled cells that share a unit with ``i``.

        Each peer is named once, under the first of row, column, box that contains it.
        """
        words, seen = [":"], {i}
        for kind, unit in g.units_of[i]:
            words.append(kind)
            for j in unit:
                if grid[j] and j not in seen:
                    words.extend([cell_word(j, n), str(grid[j])])
                    seen.add(j)
        return words

    def excluded_by(j: int, d: int, unit_kind: str) -> str:
        """Which of blank ``j``'s other units (not the ``unit_kind`` one being scanned) holds ``d``."""
        return next(kind for kind, unit in g.units_of[j] if kind != unit_kind and any(grid[k] == d for k in unit))

    def step() -> bool:
        """Extend the grid; True once ``limit`` solutions are found."""
        nonlocal steps
        steps += 1
        if budget is not None and steps > budget:
            raise _OutOfBudget
        masks: dict[int, int] = {}
        best, best_count = -1, n + 1
        for i in blanks:
            if grid[i]:
                continue
            masks[i] = full & ~(rows[g.row[i]] | cols[g.col[i]] | boxes[g.box[i]])
            count = masks[i].bit_count()
            if count < best_count:
                best, best_count = i, count
                if count <= 1:
                    break
        if best < 0:
            found.append(list(grid))
            return len(found) >= limit
        # Without a naked single every blank's mask was computed above (no early break).
        hidden = hidden_single(masks) if best_count > 1 else None
        if hidden is not None:
            name, unit, d, place = hidden
            if out is not None:
                out.extend([name, str(d)])
                if verbose:
                    out.append(":")
                    for j in unit:
                        if not grid[j] and j != place:
                            out.extend([cell_word(j, n), excluded_by(j, d, name[:3])])
                out.append("only" if place is not None else "none")
            if place is None:
                return False
            cell, digits = place, [d]
        else:
            cell = best
            digits = [d for d in range(1, n + 1) if masks[best] >> d & 1]
            if rng is not None:
                rng.shuffle(digits)
            if out is not None:
                out.append(cell_word(cell, n))
                if verbose:
                    out.extend(filled_peers(cell))
                out.append("?")
                out.extend([str(d) for d in digits] or ["none"])
        r, c, b = g.row[cell], g.col[cell], g.box[cell]
        for d in digits:
            bit = 1 << d
            if out is not None:
                out.extend([cell_word(cell, n), "=", str(d)])
                if verbose:  # keep the pencil marks current: strike d from the blanks that see this cell
                    struck = [
                        cell_word(j, n)
                        for j in g.peers[cell]
                        if not grid[j] and not (rows[g.row[j]] | cols[g.col[j]] | boxes[g.box[j]]) & bit
                    ]
                    if struck:
                        out.extend(["del", str(d), *struck])
            grid[cell] = d
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            if step():
                return True
            grid[cell] = 0
            rows[r] ^= bit
            cols[c] ^= bit
            boxes[b] ^= bit
        if len(digits) > 1 and out is not None:  # a guess ran out of alternatives
            out.extend([cell_word(cell, n), "back"])
        return False

    if out is not None and verbose:
        out.append("marks")  # pencil marks: every blank's candidates before the first step
        for i in blanks:
            mask = full & ~(rows[g.row[i]] | cols[g.col[i]] | boxes[g.box[i]])
            out.append(cell_word(i, n))
            out.extend(str(d) for d in range(1, n + 1) if mask >> d & 1)
    step()
    return len(found), (found[0] if found else None)


def count_solutions(cells: list[int], n: int, limit: int = 2, budget: int | None = None) -> int | None:
    """Number of solutions of ``cells`` (0 = blank), counting up to ``limit``; ``None`` if over budget."""
    try:
        return _search(cells, n, limit=limit, budget=budget)[0]
    except _OutOfBudget:
        return None


def random_grid(n: int, rng: np.random.Generator) -> list[int]:
    """A random complete valid grid (search on an empty grid with shuffled digit order)."""
    solution = _search([0] * (n * n), n, limit=1, rng=rng)[1]
    assert solution is not None  # an empty grid always has a solution
    return solution


def solve_with_trace(puzzle: list[int], verbose: bool = False) -> tuple[list[int], list[str]]:
    """The solution of a uniquely solvable puzzle and the trace words of the search that finds it."""
    n = math.isqrt(len(puzzle))
    out: list[str] = []
    solution = _search(puzzle, n, limit=1, out=out, verbose=verbose)[1]
    assert solution is not None, "puzzle has no solution"
    return solution, out + ["done"]


def _make_puzzle(solution: list[int], n: int, givens: int, rng: np.random.Generator) -> list[int]:
    """Blank the cells of ``solution`` in random order while the puzzle stays uniquely solvable.

    One pass, at most ``n*n`` uniqueness checks of bounded size: stops as soon as ``givens``
    remain, or with more if no further cell can be blanked (a minimal puzzle).
    """
    puzzle = list(solution)
    remaining = n * n
    for i in rng.permutation(n * n):
        if remaining == givens:
            break
        puzzle[i] = 0
        if count_solutions(puzzle, n, limit=2, budget=_CHECK_BUDGET) == 1:
            remaining -= 1
        else:
            puzzle[i] = solution[i]
    return puzzle


def _puzzle_key(item: tuple[list[int], list[int]]) -> str:
    """Identity of a (puzzle, solution) item: its givens."""
    return "".join(map(str, item[0]))


def grid_words(cells: list[int], n: int, separators: bool = True) -> list[str]:
    """Grid words in reading order: digits, ``_`` for blanks, ``/`` between rows (unless not ``separators``)."""
    words: list[str] = []
    for r in range(n):
        if r and separators:
            words.append(ROW_SEP)
        words.extend(str(v) if v else BLANK for v in cells[r * n : (r + 1) * n])
    return words


def parse_grid(words: tuple[str, ...] | None, n: int, blanks: bool) -> tuple[int, ...] | None:
    """Cells from grid words (``/`` ignored); ``None`` unless exactly n*n valid cell words."""
    if words is None:
        return None
    cells = [w for w in words if w != ROW_SEP]
    valid = {str(d): d for d in range(1, n + 1)}
    if blanks:
        valid[BLANK] = 0
    if len(cells) != n * n or any(w not in valid for w in cells):
        return None
    return tuple(valid[w] for w in cells)


def is_solution(grid: Sequence[int], puzzle: Sequence[int], n: int) -> bool:
    """``grid`` is complete, every row/column/box holds 1..n once, and it keeps every given."""
    digits = set(range(1, n + 1))
    return (
        len(grid) == n * n
        and all(p in (0, v) for p, v in zip(puzzle, grid))
        and all({grid[i] for i in cells} == digits for _, cells in _geometry(n).units)
    )


class SudokuTask(TaskBase[SudokuParams]):
    """Sudoku with unique solutions; train and test split by solution grid."""

    name = "sudoku"
    query = QUERY
    params_type = SudokuParams

    def __init__(self, params: SudokuParams, seed: int = 0) -> None:
        super().__init__(params, seed)
        self.givens = DEFAULT_GIVENS[params.size] if params.givens is None else params.givens
        # partial and a module function rather than lambdas keep the task picklable (data-loader workers)
        draw_test = partial(self._puzzle_from, rng_for(self.seed, "test", "puzzles"), True)
        self._test_items = DistinctStream(draw_test, key=_puzzle_key)

    # -- instances -------------------------------------------------------------------------

    @staticmethod
    def is_held_out(solution: list[int]) -> bool:
        """Whether a solution grid belongs to the test part of the grid space."""
        return in_held_out("".join(map(str, solution)), HELD_OUT, salt="sudoku-split")

    def _puzzle_from(self, rng: np.random.Generator, held_out: bool) -> tuple[list[int], list[int]]:
        """(puzzle, solution) with a solution grid on the requested side of the split.

        Tries up to ``_MAX_GRIDS`` grids for one whose removal pass reaches the target number
        of givens and keeps the puzzle with the fewest givens otherwise, so the work per item is
        bounded even for targets near the minimum.
        """
        n, target = self.params.size, self.givens
        best: tuple[list[int], list[int]] | None = None
        for _ in range(_MAX_GRIDS):
            solution = random_grid(n, rng)
            while self.is_held_out(solution) != held_out:
                solution = random_grid(n, rng)
            puzzle = _make_puzzle(solution, n, target, rng)
            if best is None or sum(map(bool, puzzle)) < sum(map(bool, best[0])):
                best = (puzzle, solution)
            if sum(map(bool, puzzle)) == target:
                break
        assert best is not None
        return best

    def puzzle(self, split: str, index: int) -> tuple[list[int], list[int]]:
        """(puzzle, solution) of item ``index`` of ``split``, cells in reading order, 0 = blank."""
        self._check_split(split)
        if split == "train":
            return self._puzzle_from(rng_for(self.seed, "train", index, "puzzle"), held_out=False)
        return self._test_items[index]

    def _make(self, split: str, index: int) -> tuple[list[str], list[str], list[str], dict[str, Any], Image.Image]:
        p = self.params
        n = p.size
        puzzle, solution = self.puzzle(split, index)
        style = p.reasoning
        if style == "brief":
            reasoning = ["done"]
        else:
            solved, reasoning = solve_with_trace(puzzle, verbose=style == "verbose")
            assert solved == solution
        if style == "verbose":
            reasoning.append("check")
            for name, cells in _geometry(n).units:
                reasoning += [name, *(str(solution[i]) for i in cells), "ok"]
        instance = {
            "task": self.name,
            "size": n,
            "puzzle": [puzzle[r * n : (r + 1) * n] for r in range(n)],
            "solution": [solution[r * n : (r + 1) * n] for r in range(n)],
        }
        image = draw_sudoku(
            instance["puzzle"],
            size=p.image,
            jitter=p.jitter,
            noise=p.noise,
            rng=rng_for(self.seed, split, index, "image"),
        )
        perception = grid_words(puzzle, n, separators=self.params.perception_format == "grid")
        return perception, reasoning, grid_words(solution, n), instance, image

    # -- text ------------------------------------------------------------------------------

    def vocabulary(self) -> list[str]:
        words = set(QUERY.split()) | set(MARKERS)
        words |= {BLANK, ROW_SEP, ":", "?", "=", "none", "back", "done", "check", "ok", "only", "marks", "del"}
        words |= {"row", "col", "box"}
        words |= {str(d) for d in range(1, 10)}
        words |= {cell_word(i, 9) for i in range(81)}
        words |= {name for name, _ in _geometry(9).units}
        return sorted(words | set(filler_vocabulary(self.params.filler_words)))

    def parse_perception(self, text: str) -> tuple[int, ...] | None:
        """The givens (reading order, 0 = blank) a perception section or whole response states, or ``None``."""
        return parse_grid(perception_words(text), self.params.size, blanks=True)

    # -- verdicts --------------------------------------------------------------------------

    def score(self, instance: dict[str, Any], output: str) -> Scores:
        n = int(instance["size"])
        truth = tuple(int(v) for row in instance["puzzle"] for v in row)
        sections = parse_sections(output)
        perceived = parse_grid(sections.perception, n, blanks=True)
        answer = parse_grid(sections.answer, n, blanks=False)

        # Lenient cell-by-cell read for partial credit: the k-th cell word against the k-th cell;
        # unknown words are wrong cells, missing cells are wrong.
        read = [w for w in sections.perception or () if w != ROW_SEP][: n * n]
        truth_words = [str(v) if v else BLANK for v in truth]
        slot_errors = [int(k >= len(read) or read[k] != truth_words[k]) for k in range(n * n)]

        return Scores(
            format_ok=sections.format_ok and perceived is not None and answer is not None,
            outcome=answer is not None and is_solution(answer, truth, n),
            perception_exact=perceived == truth,
            perception_partial=1.0 - sum(slot_errors) / (n * n),
            reasoning=perceived is not None and answer is not None and is_solution(answer, perceived, n),
            slot_errors=slot_errors,
        )
