"""No input makes `percep check`, `percep fmt`, `percep compile` or the language server
fail with an exception: mutations of the shipped specs (tokens deleted, duplicated,
swapped or inserted, random bytes, deep nesting, huge numbers, odd unicode, NULs) go
through all of them, in process, and nothing may escape. Bounded to a few seconds."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from percepdsl.catalogue import default_catalogue
from percepdsl.check import check_file
from percepdsl.cli import app
from percepdsl.ir import content_hash
from percepdsl.lsp import features as F
from percepdsl.lsp import scan as S

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p.relative_to(ROOT / "specs") for p in (ROOT / "specs").rglob("*.pd"))
_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|#[^\n]*|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?:px|%)?|[A-Za-z_]\w*|\.\.|[=!<>]=|\S')

# Pieces to insert: the language's own words and tokens, and what breaks naive code.
_WORDS = sorted(S.STATEMENT_KEYWORDS | S.OPERATOR_WORDS | {"true", "false", "none"} | {e.name for e in default_catalogue().entries()})
_ODD = [
    "\x00",
    "\ufeff",
    "\u202e",
    "\r",
    "\x0c",
    "\t",
    "🙂",
    "é",
    "\U0010ffff",
    "\ud800",  # a lone surrogate: not UTF-8 on disk, possible in an editor's buffer
    "1e308",
    "1e309",
    "9" * 30,
    "0.0",
    "-0",
    "1..0",
    "0..0",
    "2147483648",
    "-1",
    "0px",
    "100%",
    '"',
    '"\\',
    '""',
    '"../x.pd"',
    '"/"',
    "#",
    "{",
    "}",
    "(",
    ")",
    "[",
    "]",
    ",",
    ":",
    "=",
    "..",
    "+",
    "-",
    "*",
    "/",
    "==",
    "<",
    "\n",
]
PATHS = [
    '"a\x00b.pd"',
    '"' + "a" * 300 + '.pd"',
    '"_fuzz.pd"',  # itself
    '"common/roles.pd"',  # a fragment
    '"grids/smoke.pd"',  # a grid
    '"../grids/smoke.pd"',
    '"../gc_sft_fixed.pd"',
    '"."',
    '"/"',
    '""',
]
PIECES = st.sampled_from(_WORDS + _ODD + PATHS)


@st.composite
def mutated(draw) -> tuple[Path, str]:
    rel = draw(st.sampled_from(SOURCES))
    text = (ROOT / "specs" / rel).read_text(encoding="utf-8")
    for _ in range(draw(st.integers(1, 4))):
        toks = [(m.start(), m.end()) for m in _TOKEN.finditer(text)] or [(0, 0)]
        i, j = draw(st.integers(0, len(toks) - 1)), draw(st.integers(0, len(toks) - 1))
        (a, b), (c, d) = toks[i], toks[j]
        op = draw(st.sampled_from(["delete", "duplicate", "swap", "insert", "replace", "path", "bytes", "nest", "huge"]))
        if op == "delete":
            text = text[:a] + text[b:]
        elif op == "duplicate":
            text = text[:b] + " " + text[a:b] + text[b:]
        elif op == "swap" and b <= c:
            text = text[:a] + text[c:d] + text[b:c] + text[a:b] + text[d:]
        elif op == "insert":
            text = text[:a] + draw(PIECES) + " " + text[a:]
        elif op == "replace":
            text = text[:a] + draw(PIECES) + text[b:]
        elif op == "path" and (strings := [m.span() for m in re.finditer(r'"(?:[^"\\\n]|\\.)*"', text)]):
            a, b = draw(st.sampled_from(strings))  # an include, a template, a role's marker
            text = text[:a] + draw(st.sampled_from(PATHS)) + text[b:]
        elif op == "bytes":
            junk = draw(st.binary(min_size=1, max_size=8)).decode("utf-8", "replace")
            text = text[:a] + junk + text[a:]
        elif op == "nest":
            k = draw(st.integers(1, 80))
            left, right = draw(st.sampled_from([("(", ")"), ("[", "]"), ("-", ""), ("{", "}")]))
            text = text[:a] + left * k + text[a:b] + right * k + text[b:]
        elif op == "huge":
            text = text[:a] + draw(st.sampled_from(["9" * 19, "1" + "0" * 400 + ".5", "1e400", "4.9e-324"])) + text[b:]
    return rel, text


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A copy of specs/: a mutated spec is written next to the file it came from, so its
    includes and template resolve, without touching the files other specs include."""
    root = tmp_path_factory.mktemp("fuzz") / "specs"
    shutil.copytree(ROOT / "specs", root)
    return root


def _cli(*args: str) -> None:
    res = CliRunner().invoke(app, list(args))
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    assert res.exit_code in (0, 1, 2), res.output


def _lsp(path: Path, text: str, where: float) -> None:
    enc = F.Encoder()
    project = F.Project(F.Doc(text, path, path.as_uri()))
    res = check_file(path, text=text)
    diags = F.lsp_diagnostics(res.diagnostics, res.loaded.name, project, enc)
    for d in diags:
        assert (d.range.start.line, d.range.start.character) <= (d.range.end.line, d.range.end.character)
    F.quick_fixes(path.as_uri(), text, diags, enc)
    for offset in {0, int(where * len(text)), len(text)}:
        F.complete(project, offset, enc, snippets=True)
        F.hover(project, offset, enc)
        F.definition(project, offset, enc)
    F.document_symbols(project.doc, enc)
    F.format_edits(text, path.name, enc)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=mutated(), where=st.floats(0, 1))
def test_no_input_escapes_as_an_exception(tree: Path, case: tuple[Path, str], where: float) -> None:
    rel, text = case
    path = tree / rel.parent / "_fuzz.pd"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    res = check_file(path, fragment_ok=False)  # what `percep compile` and `percep run` do
    for d in res.diagnostics:
        assert d.span.line >= 1 and d.span.column >= 1, d
    if res.ir is not None:
        content_hash(res.ir)
        res.ir.model_dump_json()
    _cli("check", "--format", "json", str(path))
    _cli("fmt", "--check", str(path))
    _cli("compile", str(path))
    _lsp(path, text, where)
