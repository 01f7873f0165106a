"""Grid files: a template spec swept over param axes.

```
grid lambda_sweep
template "../gc_sft_fixed.pd"
axis lam = [0.0, 0.25, 0.5, 0.75]      # product axes
zip { lr = [1e-3, 3e-4], steps = [300, 600] }   # varied together
seeds 1..3
where lam < 0.9                          # filter cells
fix eval_items = 200                     # a template param for every cell
report [end_to_end, perception, reasoning]
```

This module is the grid's model, shared by the checker (`check/grid.py`) and the grid
runner: cells, their expansion in a stable order, and the `where` filter's evaluation.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .ir import ExperimentIR, GridIR, content_hash

MAX_CELLS = 10_000
MAX_COMBINATIONS = 100_000  # points of the axes times seeds, enumerated before `where` filters them
MAX_CELL_CHECKS = 200  # cells compiled at check time; beyond this the rest are compiled when run


@dataclass(frozen=True)
class Cell:
    params: dict[str, Any]  # template param overrides of this cell (fixed + axes)
    seed: int | None

    def overrides(self) -> dict[str, str]:
        out = {k: literal(v) for k, v in self.params.items()}
        if self.seed is not None:
            out["seed"] = str(self.seed)
        return out

    def label(self) -> str:
        parts = [f"{k}={literal(v)}" for k, v in self.params.items()]
        if self.seed is not None:
            parts.append(f"seed={self.seed}")
        return " ".join(parts) or "(template)"


def literal(v: Any) -> str:
    """A value as DSL source (what `--set` parses)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    return repr(v)


def training_key(ir: ExperimentIR) -> str:
    """What a cell trains, whatever its params and seed are called: two settings of a grid with the
    same key differ only in params the template does not use, and would train the same run twice."""
    return content_hash(ir.model_copy(update={"params": {}, "seed": 0}))


def template_path(grid_file: Path | None, grid: GridIR) -> Path:
    base = grid_file.parent if grid_file is not None else Path.cwd()
    return (base / grid.template).resolve()


# ---- the `where` filter ------------------------------------------------------------------------

_OPS = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b if b else float("inf"),
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}


def eval_where(tree: dict, env: dict[str, Any]) -> Any:
    if "const" in tree:
        return tree["const"]
    if "name" in tree:
        return env.get(tree["name"])
    op, args = tree["op"], tree["args"]
    if op == "and":
        return all(eval_where(a, env) for a in args)
    if op == "or":
        return any(eval_where(a, env) for a in args)
    if op == "not":
        return not eval_where(args[0], env)
    if op == "neg":
        return -eval_where(args[0], env)
    try:
        return _OPS[op](eval_where(args[0], env), eval_where(args[1], env))
    except TypeError:
        return False


def first_point(grid: GridIR) -> dict[str, str]:
    """The grid's fixed values and each axis's first value, as `--set` text."""
    params = dict(grid.fixed)
    for ax in grid.axes:
        params.update(zip(ax.names, ax.values[0]))
    return {k: literal(v) for k, v in params.items()}


def template_defaults(grid_file: Path | None, grid: GridIR) -> dict[str, Any] | None:
    """The template's params and seed (`seed`), what a `where` reads of params no axis sets; None when
    the template does not compile (with the grid's first values for params it leaves without a default)."""
    from .check import check_file

    tpath = template_path(grid_file, grid)
    res = check_file(tpath, fragment_ok=False)
    if not isinstance(res.ir, ExperimentIR):
        res = check_file(tpath, first_point(grid), origin="grid", fragment_ok=False)
    return {**res.ir.params, "seed": res.ir.seed} if isinstance(res.ir, ExperimentIR) else None


def expand(grid: GridIR, template_defaults: dict[str, Any] | None = None) -> list[Cell]:
    """Cells in a stable order: axes in declaration order (product), then seeds. `template_defaults`:
    the template's params and `seed`, for a `where` that reads a param no axis sets (or the seed of a
    grid without `seeds`)."""
    points = itertools.product(*[ax.values for ax in grid.axes]) if grid.axes else [()]
    cells = []
    for point in points:
        params = dict(grid.fixed)
        for ax, vals in zip(grid.axes, point):
            params.update(zip(ax.names, vals))
        for seed in grid.seeds or [None]:
            env = {**(template_defaults or {}), **params}
            env["seed"] = seed if seed is not None else env.get("seed")  # no `seeds` line: the template's seed
            if grid.where is not None and not eval_where(grid.where, env):
                continue
            cells.append(Cell(params, seed))
    return cells
