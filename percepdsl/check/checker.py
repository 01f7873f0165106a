"""The `Checker`: what checking a spec file and checking a grid file share.

It holds the catalogue, the scope of names (params, roles) and the diagnostics, and
offers the services both file kinds use: reporting,
evaluating and coercing expressions, checking a block against a catalogue entry, and
grouping a file's statements by kind. `run` drives one file through a check function
(`spec.check_experiment` or `grid.check_grid`) into a `Result`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .. import nodes as A
from ..catalogue import Catalogue, Entry, ParamSpec, default_catalogue
from ..diagnostics import Diagnostic, Related, Reporter, Severity, Span, did_you_mean
from ..ir import ExperimentIR, GridIR
from . import blocks
from .load import Loaded
from .values import Evaluator, Scope, Value

SET_FILE = "<--set>"
# Parse-level errors after which the checker has nothing sound to read.
_FATAL = ("syntax", "encoding", "too-deep", "missing-file", "bad-number")


@dataclass
class Result:
    """What checking a file gives: the IR (None on error), its diagnostics, and the loaded sources."""

    ir: ExperimentIR | GridIR | None
    diagnostics: list[Diagnostic]
    loaded: Loaded | None

    @property
    def ok(self) -> bool:
        return not any(d.is_error for d in self.diagnostics)


class Checker:
    """Shared state and services of one check of one file (its includes spliced in)."""

    def __init__(
        self,
        loaded: Loaded,
        catalogue: Catalogue,
        overrides: dict[str, str] | None = None,
        override_origin: str = "--set",
        fragment_ok: bool = True,
    ):
        self.loaded = loaded
        self.cat = catalogue
        self.overrides = dict(overrides or {})
        self.override_origin = override_origin
        self.fragment_ok = fragment_ok
        self.report = Reporter()
        self.scope = Scope()
        self.values = Evaluator(catalogue, self.scope, self.report)

    @property
    def diags(self) -> list[Diagnostic]:
        return self.report.items

    def has_errors(self) -> bool:
        return self.report.has_errors

    def at_file(self, file: str | None = None) -> Span:
        """The start of a file (the checked one by default): where whole-file problems are reported."""
        return Span.point(file=self.loaded.name if file is None else file)

    # -- reporting
    def error(self, span: Span, code: str, message: str, hint: str | None = None, related: Iterable[Related] = ()) -> None:
        self.report.error(span, code, message, hint, related)

    def warning(self, span: Span, code: str, message: str, hint: str | None = None, related: Iterable[Related] = ()) -> None:
        self.report.warning(span, code, message, hint, related)

    def add(self, diagnostics: Iterable[Diagnostic]) -> None:
        """Report diagnostics found by another check (a grid's template)."""
        self.report.items.extend(diagnostics)

    # -- values and blocks
    def eval(self, expr: A.Expr, ctx: str) -> Value | None:
        """An expression as a typed value; ctx is "value", "loss", "reward" or "rule"."""
        return self.values.eval(expr, ctx)

    def coerce(self, value: Value, spec: ParamSpec, what: str) -> Any:
        """A value checked against a catalogue parameter: the IR value, or None (reported)."""
        return self.values.coerce(value, spec, what)

    def coerce_expr(self, expr: A.Expr, spec: ParamSpec, what: str, literal_only: bool = False) -> Any:
        return self.values.coerce_expr(expr, spec, what, literal_only)

    def check_block(self, block: A.Block, entry: Entry, what: str, subblocks: tuple[str, ...] = (), fill: bool = True) -> dict | None:
        return blocks.check_block(self.values, block, entry, what, subblocks, fill)

    def lookup(self, name: A.Name, kind: str) -> Entry | None:
        """The catalogue entry `name` of `kind`, or None with a "did you mean"."""
        entry = self.cat.get(kind, name.id)
        if entry is None:
            guess = did_you_mean(name.id, self.cat.names(kind))
            self.error(
                name.span,
                f"unknown-{kind}",
                f"unknown {kind} `{name.id}`",
                f"did you mean `{guess}`?" if guess else f"available: {', '.join(self.cat.names(kind))}",
            )
        return entry

    # -- statements
    def group(self, items: list[A.Statement], singles: tuple[type, ...], allowed: tuple[type, ...], what: str) -> dict[type, list[Any]]:
        """Statements by kind, in order; misplaced statements and repeated single-use ones are errors."""
        groups: dict[type, list[Any]] = {}
        for stmt in items:
            if not isinstance(stmt, allowed):
                self.error(
                    stmt.span,
                    "misplaced-statement",
                    f"`{keyword(type(stmt))}` does not belong in {what}",
                    "grid files hold grid, template, axis, zip, seeds, where, report and fix"
                    if what == "a grid file"
                    else "this statement belongs in a grid file",
                )
                continue
            groups.setdefault(type(stmt), []).append(stmt)
        for cls in singles:
            entries = groups.get(cls, [])
            for stmt in entries[1:]:
                self.error(
                    stmt.span,
                    "duplicate",
                    f"`{keyword(type(stmt))}` appears more than once",
                    "keep one",
                    [Related.at(entries[0].span, "first defined here")],
                )
        return groups


def keyword(kind: type[A.Node]) -> str:
    """The keyword that starts a statement of this kind."""
    return kind.__name__.lower()


CheckFn = Callable[[Checker], "ExperimentIR | GridIR | None"]


def run(
    loaded: Loaded,
    diags: list[Diagnostic],
    check: CheckFn,
    overrides: dict[str, str] | None = None,
    catalogue: Catalogue | None = None,
    origin: str = "--set",
    fragment_ok: bool = True,
) -> Result:
    """Check a loaded file with `check`; the IR only when nothing was an error."""
    if loaded.tree is None or any(d.is_error and d.code in _FATAL for d in diags):
        return Result(None, diags, loaded)
    checker = Checker(loaded, catalogue or default_catalogue(), overrides, origin, fragment_ok)
    ir = check(checker)
    all_diags = diags + checker.diags
    if any(d.is_error for d in all_diags):
        ir = None
    return Result(ir, sorted(all_diags, key=lambda d: (d.file != loaded.name, d.file, d.span.line, d.span.column)), loaded)


def parse_overrides(pairs: list[str]) -> tuple[dict[str, str], list[Diagnostic]]:
    """`["lam=0.5", "seed=3"]` → {"lam": "0.5", "seed": "3"}; malformed pairs are diagnostics."""
    out, diags = {}, []

    def bad(message: str, hint: str) -> None:
        diags.append(Diagnostic(SET_FILE, Span.point(file=SET_FILE), Severity.ERROR, "bad-override", message, hint))

    for pair in pairs:
        name, eq, value = pair.partition("=")
        name = name.strip()
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or not value.strip():
            bad(f"`--set {pair}` is not NAME=VALUE", "e.g. --set lam=0.5")
            continue
        try:
            pair.encode("utf-8")
        except UnicodeEncodeError as exc:  # command-line bytes that are not UTF-8 arrive as lone surrogates
            bad(
                f"`--set {name}=...` is not valid UTF-8: byte {ord(pair[exc.start]) & 0xFF:#04x} at offset {exc.start}",
                "pass the value as UTF-8 text",
            )
            continue
        out[name] = value.strip()
    return out, diags
