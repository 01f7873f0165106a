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

Checking resolves the template, verifies every axis names one of its params with
values of the param's type, and compiles every cell so that a cell that would fail
(a weight out of range for one λ) is reported before anything runs.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import nodes as A
from .catalogue import ParamSpec
from .diagnostics import Related, Span, did_you_mean, relpath
from .ir import AxisIR, ExperimentIR, GridIR

if TYPE_CHECKING:
    from .check import Checker

MAX_CELLS = 10_000
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


def template_path(grid_file: Path | None, grid: GridIR) -> Path:
    base = grid_file.parent if grid_file is not None else Path.cwd()
    return (base / grid.template).resolve()


# ---- checking -------------------------------------------------------------------------------


def check_grid(ck: Checker, items) -> GridIR | None:
    from .check import check_file

    grid_stmts = (A.Grid, A.Template, A.Axis, A.Zip, A.Seeds, A.Where, A.Report, A.Fix)
    g = ck._group(items, (A.Grid, A.Template, A.Seeds, A.Where, A.Report), grid_stmts, "a grid file")
    ck.file = ck.loaded.name
    if A.Grid not in g:
        ck.error(Span.point(), "missing-block", "the grid file has no `grid` header", "start it with `grid my_sweep`")
    if A.Template not in g:
        ck.error(Span.point(), "missing-block", "the grid file names no template spec", 'add `template "spec.pd"`')
        return None
    ck.file, tmpl = g[A.Template][0]
    base = ck.loaded.path.parent if ck.loaded.path is not None else Path.cwd()
    tpath = (base / tmpl.path.value).resolve()
    if not tpath.is_file():
        near = [p.name for p in tpath.parent.glob("*.pd")] if tpath.parent.is_dir() else []
        guess = did_you_mean(tpath.name, near)
        ck.error(
            tmpl.path.span,
            "missing-file",
            f"template spec `{tmpl.path.value}` does not exist",
            f"did you mean `{guess}`?" if guess else "the path is relative to the grid file",
        )
        return None
    tres = check_file(tpath)
    if not tres.ok:
        n = sum(d.is_error for d in tres.diagnostics)
        ck.error(
            tmpl.path.span,
            "template-error",
            f"template spec `{tmpl.path.value}` has {n} error{'s' if n > 1 else ''}",
            f"run `percep check {relpath(tpath)}`",
        )
        ck.diags.extend(d for d in tres.diagnostics if d.is_error)
        return None
    tir: ExperimentIR = tres.ir
    tparams = {name: _param_type(v) for name, v in tir.params.items()}

    used: dict[str, tuple[str, Span]] = {}

    def claim(name: A.Name) -> str | None:
        if name.id == "seed":
            ck.error(name.span, "seed-axis", "seeds are swept with `seeds [...]`, not as a param", "write `seeds [1, 2, 3]`")
            return None
        if name.id not in tparams:
            guess = did_you_mean(name.id, tparams)
            ck.error(
                name.span,
                "unknown-axis-param",
                f"the template has no param `{name.id}`",
                f"did you mean `{guess}`?" if guess else f"its params: {', '.join(tparams) or 'none'}",
                [Related(relpath(tpath), Span.point(), "template spec")],
            )
            return None
        if name.id in used:
            f, sp = used[name.id]
            ck.error(
                name.span,
                "duplicate",
                f"param `{name.id}` is swept or fixed twice",
                "give each param one axis",
                [Related(f, sp, "first here")],
            )
            return None
        used[name.id] = (ck.file, name.span)
        return name.id

    def values_of(expr: A.Expr, pname: str) -> list | None:
        v = ck.eval(expr, "value")
        if v is None:
            return None
        if v.kind == "range":
            items = [type(v)("num", x, v.span) for x in range(v.value[0], v.value[1] + 1)]
        elif v.kind == "list":
            items = v.value
        else:
            ck.error(
                expr.span,
                "type",
                f"axis `{pname}` needs a list of values or a range, got {v.describe()}",
                "e.g. `[0.1, 0.25, 0.5]` or `1..4`",
            )
            return None
        if not items:
            ck.error(expr.span, "type", f"axis `{pname}` has no values", None)
            return None
        out = [ck.coerce(it, ParamSpec(pname, tparams[pname]), f"value of `{pname}`") for it in items]
        return None if any(x is None for x in out) else out

    fixed: dict[str, Any] = {}
    for file, f in g.get(A.Fix, []):
        ck.file = file
        if (name := claim(f.name)) is not None:
            val = ck._coerce_value(f.value, ParamSpec(name, tparams[name]), f"`{name}`", literal_only=True)
            if val is not None:
                fixed[name] = val
    axes: list[AxisIR] = []
    axis_spans: list[tuple[str, Span]] = []
    for file, ax in g.get(A.Axis, []):
        ck.file = file
        if (name := claim(ax.name)) is not None and (vals := values_of(ax.value, name)) is not None:
            axes.append(AxisIR(names=[name], values=[[x] for x in vals]))
            axis_spans.append((file, ax.span))
    for file, z in g.get(A.Zip, []):
        ck.file = file
        names, columns, first_len = [], [], None
        for e in z.block.entries:
            if isinstance(e, A.SubBlock):
                ck.error(e.key.span, "type", "zip entries are `param = [values]`", None)
                continue
            if (name := claim(e.key)) is None or (vals := values_of(e.value, name)) is None:
                continue
            if first_len is not None and len(vals) != first_len[0]:
                ck.error(
                    e.value.span,
                    "zip-length",
                    f"zipped axes differ in length: `{name}` has {len(vals)} values, `{first_len[1]}` has {first_len[0]}",
                    "zipped params vary together, so their lists must be equally long",
                )
                continue
            first_len = first_len or (len(vals), name)
            names.append(name)
            columns.append(vals)
        if names:
            axes.append(AxisIR(names=names, values=[list(p) for p in zip(*columns)]))
            axis_spans.append((file, z.span))
    seeds: list[int] = []
    if A.Seeds in g:
        ck.file, s = g[A.Seeds][0]
        v = values_of_seeds(ck, s.value)
        seeds = v or []
    where = None
    if A.Where in g:
        ck.file, w = g[A.Where][0]
        known = set(tparams) | {"seed"}
        where = _where_tree(ck, w.condition, known)
    report = ["end_to_end", "perception", "reasoning"]
    if A.Report in g:
        ck.file, r = g[A.Report][0]
        report = ck._coerce_value(r.value, ParamSpec("report", "metrics"), "`report`") or report
    if any(d.is_error for d in ck.diags) or A.Grid not in g:
        return None
    grid = GridIR(name=g[A.Grid][0][1].name.id, template=tmpl.path.value, fixed=fixed, axes=axes, seeds=seeds, where=where, report=report)
    ck.file = ck.loaded.name
    cells = expand(grid, tir.params)
    if not cells:
        ck.error(
            g[A.Where][0][1].span if A.Where in g else g[A.Grid][0][1].span,
            "empty-grid",
            "the grid has no cells",
            "the `where` filter rejects every combination",
        )
        return None
    if len(cells) > MAX_CELLS:
        ck.error(
            g[A.Grid][0][1].span, "grid-too-large", f"the grid has {len(cells)} cells (limit {MAX_CELLS})", "split it into several grids"
        )
        return None
    # Compile cells: a value that passes the param's type can still break the template (a weight out of range).
    failures = 0
    seen_params: set[str] = set()
    for cell in cells[:MAX_CELL_CHECKS]:
        key = Cell(cell.params, None).label()
        if key in seen_params:  # the seed never decides whether a cell compiles
            continue
        seen_params.add(key)
        res = check_file(tpath, cell.overrides(), origin="grid")
        if res.ok:
            continue
        failures += 1
        if failures > 3:
            break
        first = next(d for d in res.diagnostics if d.is_error)
        file, span = axis_spans[0] if axis_spans else (ck.loaded.name, g[A.Grid][0][1].span)
        ck.file = file
        ck.error(
            span,
            "cell-error",
            f"cell {key} does not compile: {first.message}",
            "restrict the axis values or add a `where` filter",
            [Related(first.file, first.span, first.message)],
        )
    return None if failures else grid


def _param_type(v: Any) -> str:
    return "bool" if isinstance(v, bool) else "int" if isinstance(v, int) else "float" if isinstance(v, float) else "str"


def values_of_seeds(ck: Checker, expr: A.Expr) -> list[int] | None:
    v = ck.eval(expr, "value")
    if v is None:
        return None
    if v.kind == "range":
        return list(range(v.value[0], v.value[1] + 1))
    items = v.value if v.kind == "list" else [v]
    out = [ck.coerce(i, ParamSpec("seed", "int", min=0, max=2**31 - 1), "a seed") for i in items]
    if any(x is None for x in out):
        return None
    if len(set(out)) != len(out):
        ck.error(expr.span, "duplicate", "a seed is listed twice", None)
        return None
    return out


def _where_tree(ck: Checker, e: A.Expr, known: set[str]) -> dict | None:
    """A filter as data: {"op": ..., "args": [...]} over {"name": ...} and {"const": ...}."""
    if isinstance(e, A.Number):
        return {"const": e.value}
    if isinstance(e, (A.String, A.Bool)):
        return {"const": e.value}
    if isinstance(e, A.Name):
        if e.id not in known:
            guess = did_you_mean(e.id, known)
            ck.error(
                e.span,
                "unknown-axis-param",
                f"`where` uses `{e.id}`, which is not a template param",
                f"did you mean `{guess}`?" if guess else None,
            )
            return None
        return {"name": e.id}
    if isinstance(e, A.Compare):
        args = [_where_tree(ck, e.left, known), _where_tree(ck, e.right, known)]
        return None if None in args else {"op": e.op, "args": args}
    if isinstance(e, A.BoolOp):
        args = [_where_tree(ck, x, known) for x in e.values]
        return None if None in args else {"op": e.op, "args": args}
    if isinstance(e, A.Not):
        a = _where_tree(ck, e.operand, known)
        return None if a is None else {"op": "not", "args": [a]}
    if isinstance(e, (A.Sum, A.Product)):
        acc = _where_tree(ck, e.first, known)
        for op, rhs in e.rest:
            r = _where_tree(ck, rhs, known)
            acc = None if acc is None or r is None else {"op": op, "args": [acc, r]}
        return acc
    if isinstance(e, A.Signed):
        a = _where_tree(ck, e.operand, known)
        return None if a is None else ({"op": "neg", "args": [a]} if e.signs.count("-") % 2 else a)
    ck.error(e.span, "type", "`where` filters use params, numbers, arithmetic, comparisons, and/or/not", None)
    return None


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


def expand(grid: GridIR, template_defaults: dict[str, Any] | None = None) -> list[Cell]:
    """Cells in a stable order: axes in declaration order (product), then seeds."""
    points = itertools.product(*[ax.values for ax in grid.axes]) if grid.axes else [()]
    cells = []
    for point in points:
        params = dict(grid.fixed)
        for ax, vals in zip(grid.axes, point):
            params.update(zip(ax.names, vals))
        for seed in grid.seeds or [None]:
            env = {**(template_defaults or {}), **params, "seed": seed}
            if grid.where is not None and not eval_where(grid.where, env):
                continue
            cells.append(Cell(params, seed))
    return cells
