"""Grid files (see `percepdsl.grid`): checked into a `GridIR`.

Checking resolves the template, verifies every axis names one of its params with
values of the param's type, and compiles every cell so that a cell that would fail
(a weight out of range for one λ) is reported before anything runs.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from .. import nodes as A
from ..catalogue import ParamSpec
from ..diagnostics import Related, Span, did_you_mean, relpath
from ..grid import MAX_CELL_CHECKS, MAX_CELLS, MAX_COMBINATIONS, Cell, expand, training_key
from ..ir import AxisIR, ExperimentIR, GridIR
from .checker import Checker
from .load import path_problem, resolve_written
from .spec import SEED, check_spec_file
from .values import List, Num, Range

GRID_STATEMENTS = (A.Grid, A.Template, A.Axis, A.Zip, A.Seeds, A.Where, A.Report, A.Fix)
ONCE = (A.Grid, A.Template, A.Seeds, A.Where, A.Report)  # statements a grid file holds at most once


def check_grid(ck: Checker) -> GridIR | None:
    g = ck.group(ck.loaded.items, ONCE, GRID_STATEMENTS, "a grid file")
    if A.Grid not in g:
        ck.error(ck.at_file(), "missing-block", "the grid file has no `grid` header", "start it with `grid my_sweep`")
    if A.Template not in g:
        ck.error(ck.at_file(), "missing-block", "the grid file names no template spec", 'add `template "spec.pd"`')
        return None
    tmpl = g[A.Template][0]
    base = ck.loaded.path.parent if ck.loaded.path is not None else Path.cwd()
    tpath = resolve_written(base, tmpl.path.value)
    if problem := path_problem("template spec", tmpl.path.value, tpath, "name", "the grid file"):
        ck.error(tmpl.path.span, "missing-file", *problem)
        return None
    tres = check_spec_file(tpath, catalogue=ck.cat, fragment_ok=False)  # a template is a whole experiment
    for probe in _set_by_the_grid(tres, g) if not tres.ok else []:  # params without a default, each one swept or fixed here
        tres = check_spec_file(tpath, probe, catalogue=ck.cat, origin="grid", fragment_ok=False)
        if tres.ok:
            break
    if not tres.ok or not isinstance(tres.ir, ExperimentIR):
        n = sum(d.is_error for d in tres.diagnostics)
        ck.error(
            tmpl.path.span,
            "template-error",
            f"template spec `{tmpl.path.value}` has {n} error{'s' if n > 1 else ''}",
            f"run `percep check {relpath(tpath)}`",
        )
        ck.add(d for d in tres.diagnostics if d.is_error)
        return None
    tir: ExperimentIR = tres.ir
    tparams = {name: _param_type(v) for name, v in tir.params.items()}
    # params the template declares and never uses (its `unused-param` warnings)
    unused = {m.group(1) for d in tres.diagnostics if d.code == "unused-param" and (m := re.search(r"`([^`]+)`", d.message))}

    used: dict[str, Span] = {}

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
                [Related.at(Span.point(file=relpath(tpath)), "template spec")],
            )
            return None
        if name.id in used:
            ck.error(
                name.span,
                "duplicate",
                f"param `{name.id}` is swept or fixed twice",
                "give each param one axis",
                [Related.at(used[name.id], "first here")],
            )
            return None
        used[name.id] = name.span
        return name.id

    def values_of(expr: A.Expr, pname: str) -> list | None:
        v = ck.eval(expr, "value")
        if v is None:
            return None
        if isinstance(v, Range):
            if not _range_fits(ck, v, f"axis `{pname}`"):
                return None
            items = [Num(v.span, x) for x in range(v.lo, v.hi + 1)]
        elif isinstance(v, List):
            items = list(v.items)
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
    for f in g.get(A.Fix, []):
        if (name := claim(f.name)) is not None:
            val = ck.coerce_expr(f.value, ParamSpec(name, tparams[name]), f"`{name}`", literal_only=True)
            if val is not None:
                fixed[name] = val
            if name in unused:
                ck.warning(f.name.span, "unused-param", f"the template never uses `{name}`: fixing it changes nothing it trains", None)
    axes: list[AxisIR] = []
    axis_spans: list[Span] = []

    def distinct(rows: list[list[Any]], names: list[str], span: Span) -> bool:
        """Two equal rows would be two cells with one IR hash: one run directory, trained twice."""
        seen = set()
        for row in rows:
            if (key := tuple(row)) in seen:
                shown = ", ".join(f"{n} = {v!r}" for n, v in zip(names, row))
                ck.error(span, "duplicate", f"{shown} is listed twice: its cells would be the same run", "list each value once")
                return False
            seen.add(key)
        return True

    for ax in g.get(A.Axis, []):
        if (name := claim(ax.name)) is not None and (vals := values_of(ax.value, name)) is not None:
            if distinct([[x] for x in vals], [name], ax.value.span):
                axes.append(AxisIR(names=[name], values=[[x] for x in vals]))
                axis_spans.append(ax.span)
    for z in g.get(A.Zip, []):
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
        if names and distinct(rows := [list(p) for p in zip(*columns)], names, z.span):
            axes.append(AxisIR(names=names, values=rows))
            axis_spans.append(z.span)
    seeds: list[int] = []
    if A.Seeds in g:
        seeds = _seeds(ck, g[A.Seeds][0].value) or []
    where = None
    if A.Where in g:
        known = {**{n: _KINDS[t] for n, t in tparams.items()}, "seed": "number"}
        where = _where_tree(ck, g[A.Where][0].condition, known)
    report = ["end_to_end", "perception", "reasoning"]
    if A.Report in g:
        report = ck.coerce_expr(g[A.Report][0].value, ParamSpec("report", "metrics"), "`report`") or report
    if ck.has_errors() or A.Grid not in g:
        return None
    header = g[A.Grid][0]
    grid = GridIR(name=header.name.id, template=tmpl.path.value, fixed=fixed, axes=axes, seeds=seeds, where=where, report=report)
    combinations = math.prod(len(ax.values) for ax in axes) * max(1, len(seeds))
    if combinations > MAX_COMBINATIONS:
        ck.error(
            header.span,
            "grid-too-large",
            f"the grid's axes and seeds span {combinations} combinations (limit {MAX_COMBINATIONS})",
            "split it into several grids",
            [Related.at(s, "an axis") for s in axis_spans],
        )
        return None
    cells = expand(grid, {**tir.params, "seed": tir.seed})
    if not cells:
        ck.error(
            g[A.Where][0].span if A.Where in g else header.span,
            "empty-grid",
            "the grid has no cells",
            "the `where` filter rejects every combination",
        )
        return None
    if len(cells) > MAX_CELLS:
        ck.error(header.span, "grid-too-large", f"the grid has {len(cells)} cells (limit {MAX_CELLS})", "split it into several grids")
        return None
    # Compile cells: a value that passes the param's type can still break the template (a weight out of range).
    failures = 0
    seen_params: set[str] = set()
    trains: dict[str, Cell] = {}  # what a cell trains (`training_key`) -> the first cell that trains it
    for cell in cells[:MAX_CELL_CHECKS]:
        key = Cell(cell.params, None).label()
        if key in seen_params:  # the seed never decides whether a cell compiles
            continue
        seen_params.add(key)
        res = check_spec_file(tpath, cell.overrides(), catalogue=ck.cat, origin="grid")
        if res.ok:
            if isinstance(res.ir, ExperimentIR) and (twin := trains.setdefault(training_key(res.ir), cell)) is not cell:
                differ = [n for n in cell.params if cell.params[n] != twin.params.get(n)]
                never = [n for n in differ if n in unused]
                why = f"; the template never uses {', '.join(f'`{n}`' for n in never)}" if never else ""
                at = next((sp for ax, sp in zip(axes, axis_spans) if set(ax.names) & set(differ)), header.span)
                ck.error(
                    at,
                    "duplicate-cell",
                    f"cells {Cell(twin.params, None).label()} and {key} train the same run: they differ only in params "
                    f"that change nothing the template computes ({', '.join(differ)}){why}",
                    "sweep a param the template uses, or use it in the template",
                )
                return None
            continue
        failures += 1
        if failures > 3:
            break
        first = next(d for d in res.diagnostics if d.is_error)
        ck.error(
            _culprit(first, res, axes, axis_spans) or (axis_spans[0] if axis_spans else header.span),
            "cell-error",
            f"cell {key} does not compile: {first.message}",
            "restrict the axis values or add a `where` filter",
            [Related(first.file, first.span, first.message)],
        )
    return None if failures else grid


def _culprit(diag: Any, res: Any, axes: list[AxisIR], spans: list[Span]) -> Span | None:
    """The axis whose param the template's failing line names (`lam` in `loss = lam * ...`), so that
    a cell error points at the axis that broke it rather than at the first one."""
    text = (res.loaded.sources.get(diag.file) if res.loaded else None) or ""
    lines = text.splitlines()
    if not 0 < diag.span.line <= len(lines):
        return None
    line, sp = lines[diag.span.line - 1], diag.span
    for where in (line[sp.column - 1 : sp.end_column - 1] if sp.end_line == sp.line else "", line):  # the failing expression, else its line
        words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", where))
        if found := next((at for ax, at in zip(axes, spans) if words & set(ax.names)), None):
            return found
    return None


def _set_by_the_grid(tres: Any, g: dict) -> list[dict[str, str]]:
    """A template may leave params without a default for its grid to set: when those are its only
    errors and the grid sweeps or fixes each of them, values to check the template with (the i-th
    value of each axis, for the first few i: a value that breaks the template is a cell's error);
    none otherwise (its errors stand)."""
    if tres.loaded is None or any(d.is_error and d.code != "unset-param" for d in tres.diagnostics):
        return []
    unset = {p.name.id for p in tres.loaded.items if isinstance(p, A.Param) and p.default is None}
    given: dict[str, A.Expr] = {}
    for f in g.get(A.Fix, []):
        given.setdefault(f.name.id, f.value)
    for ax in g.get(A.Axis, []):
        given.setdefault(ax.name.id, ax.value)
    for z in g.get(A.Zip, []):
        for e in z.block.entries:
            if isinstance(e, A.Setting):
                given.setdefault(e.key.id, e.value)
    values: dict[str, list[str]] = {}
    for name in unset:
        if name not in given or not (texts := _literals(given[name])):
            return []
        values[name] = texts
    n = min(max(map(len, values.values()), default=0), 8)
    return [{name: texts[i % len(texts)] for name, texts in values.items()} for i in range(n)]


def _literals(e: A.Expr) -> list[str]:
    """The values of an axis (or a fixed value) as `--set` text, where each is written as a literal."""
    items = list(e.items) if isinstance(e, A.ListExpr) else [e.lo, e.hi] if isinstance(e, A.Range) else [e]
    out = []
    for x in items:
        if isinstance(x, (A.Number, A.String)):
            out.append(x.text)
        elif isinstance(x, A.Bool):
            out.append("true" if x.value else "false")
        elif isinstance(x, A.Name):
            out.append(x.id)
        elif isinstance(x, A.Signed) and isinstance(x.operand, A.Number):
            out.append(("-" if x.signs.count("-") % 2 else "") + x.operand.text)
    return out


def _range_fits(ck: Checker, v: Range, what: str) -> bool:
    """A range is spelled out value by value: no more of them than a grid may have cells."""
    if v.hi - v.lo + 1 > MAX_CELLS:
        ck.error(v.span, "grid-too-large", f"{what} has {v.hi - v.lo + 1} values (limit {MAX_CELLS})", "split it into several grids")
        return False
    return True


def _param_type(v: Any) -> str:
    return "bool" if isinstance(v, bool) else "int" if isinstance(v, int) else "float" if isinstance(v, float) else "str"


def _seeds(ck: Checker, expr: A.Expr) -> list[int] | None:
    v = ck.eval(expr, "value")
    if v is None:
        return None
    if isinstance(v, Range):
        if not _range_fits(ck, v, "`seeds`"):
            return None
        ends = [ck.coerce(Num(v.span, x), SEED, "a seed") for x in (v.lo, v.hi)]
        return None if None in ends else list(range(v.lo, v.hi + 1))
    items = v.items if isinstance(v, List) else (v,)
    out = [ck.coerce(i, SEED, "a seed") for i in items]
    if any(x is None for x in out):
        return None
    if len(set(out)) != len(out):
        ck.error(expr.span, "duplicate", "a seed is listed twice", None)
        return None
    return out


def _operands(tree: dict) -> list[dict]:
    """The leaves and non-arithmetic subtrees of an arithmetic `where` subtree."""
    if tree.get("op") in ("+", "-", "*", "/"):
        return [x for a in tree["args"] for x in _operands(a)]
    return [tree]


_KINDS = {"int": "number", "float": "number", "str": "string", "bool": "bool"}


def _kind(tree: dict, known: dict[str, str]) -> str | None:
    """What a `where` subtree evaluates to (number, string, bool), where that is known before any cell."""
    if "const" in tree:
        c = tree["const"]
        return "bool" if isinstance(c, bool) else "string" if isinstance(c, str) else "number"
    if "name" in tree:
        return known.get(tree["name"])
    if tree["op"] in ("+", "-", "*", "/", "neg"):
        return "number"
    return "bool"


def _where_tree(ck: Checker, e: A.Expr, known: dict[str, str]) -> dict | None:
    """A filter as data: {"op": ..., "args": [...]} over {"name": ...} and {"const": ...}."""
    if isinstance(e, (A.Number, A.String, A.Bool)):
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
        if None in args:
            return None
        kinds = [_kind(a, known) for a in args if a is not None]
        if None not in kinds and kinds[0] != kinds[1]:  # `steps == "4"`: false for every cell, the filter silently drops them
            ck.error(e.span, "type", f"`where` compares a {kinds[0]} with a {kinds[1]}", "compare a param with a value of its type")
            return None
        return {"op": e.op, "args": args}
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
        if acc is not None and any(_kind(a, known) in ("string", "bool") for a in _operands(acc)):
            ck.error(e.span, "type", "`where` arithmetic is on numbers", "use number params and values in + - * /")
            return None
        return acc
    if isinstance(e, A.Signed):
        a = _where_tree(ck, e.operand, known)
        return None if a is None else ({"op": "neg", "args": [a]} if e.signs.count("-") % 2 else a)
    ck.error(e.span, "type", "`where` filters use params, numbers, arithmetic, comparisons, and/or/not", None)
    return None
