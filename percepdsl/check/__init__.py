"""Checking: AST → IR, with every problem reported at once.

The checker resolves each name through the catalogue, evaluates expressions into
typed values (numbers, schedules, losses, rewards, role rules), folds params into
constants, and builds the IR only when no error was found. It keeps going after an
error: a value that failed becomes `None` and is not complained about twice.

    load.py     read, parse, splice includes
    values.py   typed values; evaluating expressions, coercing values to catalogue types
    blocks.py   a settings block against its catalogue entry, constraints
    checker.py  the `Checker` both file kinds share (scope, reporting, values, blocks), `run`
    spec.py     experiment specs: params, overrides, roles, task, model, stages
    grid.py     grid files: template, axes, seeds, filters, cells
"""

from __future__ import annotations

from pathlib import Path

from .. import nodes as A
from ..catalogue import Catalogue
from ..diagnostics import Diagnostic
from .checker import SET_FILE, Checker, Result, parse_overrides, run
from .load import Loaded, load, read_source
from .spec import DEFAULT_ROLES, check_experiment, check_spec_file


def check_file(
    path: str | Path,
    overrides: dict[str, str] | None = None,
    catalogue: Catalogue | None = None,
    text: str | None = None,
    origin: str = "--set",
    fragment_ok: bool = True,
) -> Result:
    """Check a spec or grid file; `text` overrides the file's content (editors).

    `origin` names where overrides come from in notes ("--set" or "grid"). A file
    without a header passes as an include fragment unless `fragment_ok` is False
    (compiling and running need a whole experiment)."""
    loaded, diags = load(Path(path), text)
    return _check(loaded, diags, overrides, catalogue, origin, fragment_ok)


def check_text(
    text: str,
    name: str = "<string>",
    overrides: dict[str, str] | None = None,
    catalogue: Catalogue | None = None,
    base_dir: Path | None = None,
) -> Result:
    path = (base_dir or Path.cwd()) / name if base_dir is not None else None
    loaded, diags = load(path, text, name=name)
    return _check(loaded, diags, overrides, catalogue)


def _check(loaded: Loaded, diags: list[Diagnostic], overrides, catalogue, origin: str = "--set", fragment_ok: bool = True) -> Result:
    items = loaded.items
    is_grid = any(isinstance(s, (A.Grid, A.Template)) for s in items) and not any(isinstance(s, A.Experiment) for s in items)
    if is_grid:
        from .grid import check_grid  # imported when needed: most checks are of specs, and this starts faster

        return run(loaded, diags, check_grid, overrides, catalogue, origin, fragment_ok)
    return run(loaded, diags, check_experiment, overrides, catalogue, origin, fragment_ok)


__all__ = [
    "DEFAULT_ROLES",
    "SET_FILE",
    "Checker",
    "Loaded",
    "Result",
    "check_file",
    "check_spec_file",
    "check_text",
    "load",
    "parse_overrides",
    "read_source",
]
