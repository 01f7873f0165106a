"""Diagnostics as data, and their rustc-style rendering.

Every stage (parse, check, include resolution, overrides) reports problems as
`Diagnostic` values and keeps going; nothing is raised to the user. Positions are
1-based; `end_column` is exclusive, as in LSP and editors. A `Span` names the file it
is in, so a diagnostic is located by its span alone.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path


class Severity(str, Enum):
    ERROR = "error"
    WARNING = "warning"
    NOTE = "note"


@dataclass(frozen=True, order=True)
class Span:
    line: int
    column: int
    end_line: int
    end_column: int
    file: str = ""  # as shown in diagnostics ("specs/a.pd", "<--set>")

    @staticmethod
    def point(line: int = 1, column: int = 1, file: str = "") -> Span:
        return Span(line, column, line, column + 1, file)


@dataclass(frozen=True)
class Related:
    """A second location that explains the first (a declaration, the other side of a conflict)."""

    file: str
    span: Span
    message: str

    @staticmethod
    def at(span: Span, message: str) -> Related:
        return Related(span.file, span, message)


@dataclass(frozen=True)
class Diagnostic:
    file: str
    span: Span
    severity: Severity
    code: str
    message: str
    hint: str | None = None
    related: tuple[Related, ...] = field(default_factory=tuple)

    @property
    def is_error(self) -> bool:
        return self.severity is Severity.ERROR

    def to_json(self) -> dict:
        out = {
            "file": self.file,
            "line": self.span.line,
            "column": self.span.column,
            "end_line": self.span.end_line,
            "end_column": self.span.end_column,
            "severity": self.severity.value,
            "code": self.code,
            "message": self.message,
        }
        if self.hint:
            out["hint"] = self.hint
        if self.related:
            out["related"] = [{"file": r.file, "line": r.span.line, "column": r.span.column, "message": r.message} for r in self.related]
        return out


class Reporter:
    """Collects diagnostics, each in the file its span names: the one way to complain."""

    def __init__(self) -> None:
        self.items: list[Diagnostic] = []

    def error(self, span: Span, code: str, message: str, hint: str | None = None, related=()) -> None:
        self.items.append(Diagnostic(span.file, span, Severity.ERROR, code, message, hint, tuple(related)))

    def warning(self, span: Span, code: str, message: str, hint: str | None = None, related=()) -> None:
        self.items.append(Diagnostic(span.file, span, Severity.WARNING, code, message, hint, tuple(related)))

    @property
    def has_errors(self) -> bool:
        return any(d.is_error for d in self.items)


# ---- rendering ----------------------------------------------------------------

_WINDOW = 100  # characters of a long source line shown around the caret
# Control characters in a source line are shown as their Unicode pictures (NUL as ␀): one
# column each, so the caret stays aligned, and nothing invisible reaches the terminal.
_VISIBLE = {c: 0x2400 + c for c in range(0x20)} | {0x09: 0x20, 0x7F: 0x2421}


def _excerpt(line_text: str, col: int, width: int) -> tuple[str, int, int]:
    """Cut a very long line to a window around the span; returns text, caret col, caret width."""
    if len(line_text) <= _WINDOW * 2:
        return line_text, col, width
    start = max(0, col - 1 - _WINDOW // 2)
    piece = line_text[start : start + _WINDOW]
    prefix = "…" if start > 0 else ""
    suffix = "…" if start + _WINDOW < len(line_text) else ""
    return prefix + piece + suffix, col - start + len(prefix), min(width, _WINDOW)


@functools.lru_cache(maxsize=8)
def _lines(source: str) -> tuple[str, ...]:
    r"""A source's lines as the parser counts them: split at "\n" only (str.splitlines also splits at \f, \v,
    \x1c, ...). Cached: a file's diagnostics are rendered one by one, and splitting it for each made
    printing thousands of them quadratic."""
    return tuple(ln.removesuffix("\r") for ln in source.split("\n"))


def render(diag: Diagnostic, source: str | None, color: bool = False) -> str:
    """`file:line:col: error[code]: message`, the source line with a caret, and the hint."""
    sev = diag.severity.value
    if color:
        tint = {"error": "\x1b[1;31m", "warning": "\x1b[1;33m", "note": "\x1b[1;36m"}[sev]
        head = (
            f"\x1b[1m{diag.file}:{diag.span.line}:{diag.span.column}:\x1b[0m {tint}{sev}[{diag.code}]\x1b[0m\x1b[1m: {diag.message}\x1b[0m"
        )
    else:
        head = f"{diag.file}:{diag.span.line}:{diag.span.column}: {sev}[{diag.code}]: {diag.message}"
    out = [head]
    lines = _lines(source) if source is not None else ()
    if 1 <= diag.span.line <= len(lines):
        text = lines[diag.span.line - 1].translate(_VISIBLE)
        width = diag.span.end_column - diag.span.column if diag.span.end_line == diag.span.line else len(text) - diag.span.column + 1
        text, col, width = _excerpt(text, diag.span.column, max(1, width))
        gutter = " " * len(str(diag.span.line))
        out.append(f"{gutter} |")
        out.append(f"{diag.span.line} | {text}")
        out.append(f"{gutter} | {' ' * (col - 1)}{'^' * max(1, width)}")
    for rel in diag.related:
        out.append(f"   = note: {rel.message} ({rel.file}:{rel.span.line}:{rel.span.column})")
    if diag.hint:
        out.append(f"   = help: {diag.hint}")
    return "\n".join(out)


def summary_line(n_files: int, diags: list[Diagnostic]) -> str:
    errors = sum(d.severity is Severity.ERROR for d in diags)
    warnings = sum(d.severity is Severity.WARNING for d in diags)

    def plural(n: int, word: str) -> str:
        return f"{n} {word}{'' if n == 1 else 's'}"

    return f"{plural(n_files, 'file')} checked: {plural(errors, 'error')}, {plural(warnings, 'warning')}"


def to_json(diags: list[Diagnostic]) -> str:
    return json.dumps([d.to_json() for d in diags], indent=2, ensure_ascii=False)


def did_you_mean(name: str, candidates) -> str | None:
    """The closest candidate by edit distance, if it is close enough to be a typo."""
    import difflib

    cands = sorted(set(candidates))
    best = difflib.get_close_matches(name, cands, n=1, cutoff=0.6)
    if not best:
        lowered = {c.lower(): c for c in cands}
        if name.lower() in lowered:
            best = [lowered[name.lower()]]
    return best[0] if best else None


def relpath(path: Path | str) -> str:
    """Paths in diagnostics are relative to the working directory when possible."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError, RuntimeError):  # elsewhere, or a path no file can have (a NUL in it)
        return str(p)


__all__ = ["Severity", "Span", "Related", "Diagnostic", "Reporter", "render", "summary_line", "to_json", "did_you_mean", "relpath"]
