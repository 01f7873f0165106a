"""Text → AST. Lark LALR parse (grammar in `grammars/percep.lark`), then a
non-recursive transform into the typed nodes of `nodes.py`.

`parse_text` never raises: every problem (undecodable bytes, a stray character,
an unexpected token, a number that does not fit, brackets nested too deep) comes
back as a located `Diagnostic`. After a syntax error the parser resumes from the
next token so that later, independent errors are reported too.

Each call keeps its own state (bracket depth, comments, diagnostics), so parses may
run in several threads at once or one inside another: the language server relies on it.
"""

from __future__ import annotations

import math
import re
import threading
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from lark import Lark, Token, Transformer_NonRecursive, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from . import nodes as A
from .diagnostics import Diagnostic, Reporter, Span

MAX_DEPTH = 64  # bracket nesting; keeps every later (recursive) pass far from Python's recursion limit
MAX_SYNTAX_ERRORS = 5
_OPEN = {"LPAR", "LSQB", "LBRACE"}
_CLOSE = {"RPAR", "RSQB", "RBRACE"}

# What the user sees for grammar terminals in "expected ..." lists.
TERMINAL_NAMES = {
    "NAME": "a name",
    "NUMBER": "a number",
    "DIMENSION": "a size such as `64px`",
    "STRING": "a string in double quotes",
    "LPAR": "`(`",
    "RPAR": "`)`",
    "LSQB": "`[`",
    "RSQB": "`]`",
    "LBRACE": "`{`",
    "RBRACE": "`}`",
    "COMMA": "`,`",
    "COLON": "`:`",
    "EQUAL": "`=`",
    "ADD_OP": "`+` or `-`",
    "MUL_OP": "`*` or `/`",
    "COMP_OP": "a comparison",
    "FROM": "`from`",
    "__ANON_0": "`..`",
    "$END": "end of file",
}


class _TooDeep(Exception):
    def __init__(self, token: Token):
        self.token = token


class _ParseState:
    """What the lexer callbacks record during one parse: bracket depth and comments."""

    __slots__ = ("depth", "comments", "text")

    def __init__(self) -> None:
        self.depth = 0
        self.comments: list[Token] = []
        self.text = ""  # the text being parsed (`_KeywordsAsNames` looks past a keyword)


# The lexer's callbacks are fixed when the (cached) parser is built, so they find the
# state of the parse in progress here. `parse_text` sets a fresh state for its call and
# restores the previous one after: parses in other threads, or one started from inside
# another, each see their own.
_state: ContextVar[_ParseState] = ContextVar("percep_parse_state")


def _open(tok: Token) -> Token:
    st = _state.get()
    st.depth += 1
    if st.depth > MAX_DEPTH:
        raise _TooDeep(tok)
    return tok


def _close(tok: Token) -> Token:
    _state.get().depth -= 1
    return tok


def _comment(tok: Token) -> None:
    _state.get().comments.append(tok)


# Statement keywords, by terminal, and those whose statement is `KEYWORD { ... }`.
STATEMENT_TERMINALS = {
    "EXPERIMENT": "experiment",
    "PARAM": "param",
    "SEED": "seed",
    "INCLUDE": "include",
    "TASK": "task",
    "MODEL": "model",
    "ROLES": "roles",
    "STAGE": "stage",
    "EVAL": "eval",
    "TRAINER": "trainer",
    "GRID": "grid",
    "TEMPLATE": "template",
    "AXIS": "axis",
    "ZIP": "zip",
    "SEEDS": "seeds",
    "WHERE": "where",
    "REPORT": "report",
    "FIX": "fix",
}
_BLOCK_STATEMENTS = frozenset({"eval", "trainer", "roles", "zip"})
_NEXT = re.compile(r"(?:\s+|#[^\n]*)*(==|=|\{)?")


class _KeywordsAsNames:
    """A statement keyword that starts a setting (`seed = 3`) or a sub-block (`task { ... }`) is a name.

    LALR merges the states after a block entry's value with those after a statement's, so there the
    contextual lexer also accepts statement keywords: `steps = 6` then, on the next line without a
    comma, `task { reasoning = brief }` lexed `task` as the keyword. A statement keyword is never
    followed by `=`, nor by `{` except for the `KEYWORD { ... }` statements. (A post-lexer, as lark
    turns a NAME into a keyword before any lexer callback of the keyword's terminal could run.)"""

    always_accept: tuple[str, ...] = ()

    def process(self, stream):
        text = _state.get().text
        for tok in stream:
            if tok.type in STATEMENT_TERMINALS:
                nxt = _NEXT.match(text, tok.end_pos).group(1)
                if nxt == "=" or (nxt == "{" and tok.value not in _BLOCK_STATEMENTS):
                    tok = Token.new_borrow_pos("NAME", tok.value, tok)
            yield tok


def grammar_text() -> str:
    return resources.files("percepdsl.grammars").joinpath("percep.lark").read_text(encoding="utf-8")


_build_lock = threading.Lock()


def _parser() -> Lark:
    with _build_lock:  # built once, even when the first parses start in several threads
        return _build_parser()


@lru_cache(maxsize=1)
def _build_parser() -> Lark:
    callbacks = {name: _open for name in _OPEN} | {name: _close for name in _CLOSE} | {"COMMENT": _comment}
    return Lark(
        grammar_text(),
        parser="lalr",
        lexer="contextual",
        propagate_positions=True,
        maybe_placeholders=True,
        lexer_callbacks=callbacks,
        postlex=_KeywordsAsNames(),
        cache=True,  # the compiled LALR tables are cached on disk: `percep check` starts fast
    )


@dataclass(eq=False)
class GrammarTables:
    """What the grammar says about its words and tokens, for tools that scan text without
    parsing it (the language server's scanner)."""

    spec_statements: tuple[str, ...]  # keywords that start a spec statement, in grammar order
    grid_statements: tuple[str, ...]
    keywords: frozenset[str]  # every word the grammar spells out
    value_words: frozenset[str]  # keywords that are values on their own: true, false, none
    punctuation: tuple[str, ...]  # regexes of the operator and bracket tokens, longest first
    patterns: dict[str, str]  # regex of each named token: NAME, NUMBER, DIMENSION, STRING, COMMENT

    @property
    def statements(self) -> frozenset[str]:
        return frozenset(self.spec_statements + self.grid_statements)


_TOKEN_TERMINALS = ("NAME", "NUMBER", "DIMENSION", "STRING", "COMMENT")


@lru_cache(maxsize=1)
def grammar_tables() -> GrammarTables:
    return tables_of(_parser())


def tables_of(parser: Lark) -> GrammarTables:
    """The tables of a grammar loaded by Lark (with `spec_item` and `grid_item` rules)."""
    terminals = {t.name: t for t in parser.terminals}
    keywords = {n: t.pattern.value for n, t in terminals.items() if t.pattern.type == "str" and t.pattern.value.isalpha()}
    by_origin: dict[str, list] = {}
    for rule in parser.rules:
        by_origin.setdefault(rule.origin.name, []).append(rule)

    def leading_keywords(group: str) -> tuple[str, ...]:
        stmts = [r.expansion[0].name for r in by_origin[group]]
        return tuple(dict.fromkeys(keywords[r.expansion[0].name] for s in stmts for r in by_origin[s]))

    # a keyword that makes up a whole alternative on its own is a value (`TRUE -> true`)
    values = {
        keywords[r.expansion[0].name]
        for rules in by_origin.values()
        for r in rules
        if len(r.expansion) == 1 and r.expansion[0].name in keywords
    }
    punct = [t for n, t in terminals.items() if n not in keywords and n not in _TOKEN_TERMINALS and not n.startswith("__IGNORE")]
    punct.sort(key=lambda t: -t.pattern.max_width)
    return GrammarTables(
        spec_statements=leading_keywords("spec_item"),
        grid_statements=leading_keywords("grid_item"),
        keywords=frozenset(keywords.values()),
        value_words=frozenset(values),
        punctuation=tuple(t.pattern.to_regexp() for t in punct),
        patterns={n: terminals[n].pattern.to_regexp() for n in _TOKEN_TERMINALS},
    )


def _tok_span(tok: Token, file: str) -> Span:
    return Span(tok.line, tok.column, tok.end_line, tok.end_column, file)


def _keyword_names() -> dict[str, str]:
    parser = _parser()
    names = {}
    for term in parser.terminals:
        pattern = term.pattern
        if pattern.type == "str" and pattern.value.isalpha():
            names[term.name] = f"`{pattern.value}`"
    return names


def _describe_expected(expected) -> str:
    kw = _keyword_names()
    names = sorted({TERMINAL_NAMES.get(t) or kw.get(t) or f"`{t}`" for t in expected})
    if len(names) > 8:
        names = names[:8] + ["…"]
    return ", ".join(names)


def _describe_token(tok: Token) -> str:
    if tok.type == "$END":
        return "end of file"
    text = str(tok)
    if len(text) > 30:
        text = text[:27] + "..."
    return f"`{text}`"


def _syntax_diag(rep: Reporter, err: UnexpectedInput, text: str, file: str) -> None:
    if isinstance(err, UnexpectedCharacters):
        ch = err.char
        span = Span.point(err.line, err.column, file)
        hint = None
        if ch == "'":
            hint = 'strings use double quotes: "..."'
        elif ch == "\x00" or not ch.isprintable():
            hint = "the file contains a control or binary character; is it a text spec?"
        rep.error(span, "syntax", f"unexpected character {ch!r}", hint)
        return
    if isinstance(err, UnexpectedToken):
        tok = err.token
        if tok.type == "$END":
            line, col = _end_position(text)
            rep.error(Span.point(line, col, file), "syntax", "unexpected end of file", f"expected {_describe_expected(err.expected)}")
            return
        hint = f"expected {_describe_expected(err.expected)}"
        if tok.type == "EQUAL" and "COLON" in err.expected:
            hint = "a param needs a type: `param name: float = 0.5`"
        rep.error(_tok_span(tok, file), "syntax", f"unexpected {_describe_token(tok)}", hint)
        return
    if isinstance(err, UnexpectedEOF):
        line, col = _end_position(text)
        rep.error(Span.point(line, col, file), "syntax", "unexpected end of file", f"expected {_describe_expected(err.expected)}")
        return
    rep.error(Span.point(getattr(err, "line", 1) or 1, getattr(err, "column", 1) or 1, file), "syntax", str(err).splitlines()[0])


def _end_position(text: str) -> tuple[int, int]:
    lines = text.split("\n")
    return len(lines), len(lines[-1]) + 1


def decode(data: bytes, file: str) -> tuple[str | None, list[Diagnostic]]:
    """UTF-8 (a BOM is allowed); undecodable bytes are an error located at the first bad byte."""
    rep = Reporter()
    try:
        return data.decode("utf-8-sig"), []
    except UnicodeDecodeError as e:
        good = data[: e.start].decode("utf-8", errors="replace")
        line = good.count("\n") + 1
        col = len(good) - (good.rfind("\n") + 1) + 1
        rep.error(
            Span.point(line, col, file),
            "encoding",
            f"file is not valid UTF-8: byte 0x{data[e.start]:02x} at offset {e.start}",
            "save the spec as UTF-8 text",
        )
        return None, rep.items


def parse_text(text: str, file: str = "<string>") -> tuple[A.File | None, list[Diagnostic]]:
    """Parse `text`; returns the AST (None if there were syntax errors) and diagnostics."""
    rep = Reporter()
    parser = _parser()
    state = _ParseState()
    state.text = text
    last_line = [0]

    def on_error(err: UnexpectedInput) -> bool:
        line = getattr(err, "line", 0) or 0
        if line > last_line[0]:  # one error per line: later ones on that line are usually echoes
            _syntax_diag(rep, err, text, file)
            last_line[0] = line
        if isinstance(err, UnexpectedToken) and err.token.type == "$END":
            return False
        return len(rep.items) < MAX_SYNTAX_ERRORS

    outer = _state.set(state)
    try:
        tree = parser.parse(text, on_error=on_error)
    except _TooDeep as e:
        rep.error(
            _tok_span(e.token, file),
            "too-deep",
            f"brackets nested more than {MAX_DEPTH} levels deep",
            "flatten the expression; specs never need this much nesting",
        )
        return None, rep.items
    except UnexpectedInput as e:
        if not rep.items or (getattr(e, "line", 0) or 0) > last_line[0]:
            _syntax_diag(rep, e, text, file)
        return None, rep.items
    finally:
        _state.reset(outer)
    if rep.items:
        return None, rep.items
    builder = _Builder(rep, file)
    items = builder.transform(tree)
    ast_comments = tuple(A.Comment(c.line, c.column, str(c).rstrip()) for c in state.comments)
    end = text.split("\n")
    span = Span(1, 1, len(end), len(end[-1]) + 1, file)
    file_node = A.File(span, tuple(items), ast_comments)
    return (None if rep.has_errors else file_node), rep.items


def parse_expr(text: str) -> tuple[A.Expr | None, list[Diagnostic]]:
    """Parse a single expression (used by `--set name=value`)."""
    tree, diags = parse_text(f"seed {text}", "<--set>")
    if tree is None or len(tree.items) != 1:
        return None, diags or []
    return tree.items[0].value, diags


# ---- tree → AST ----------------------------------------------------------------------


def _string_value(raw: str) -> str:
    body = raw[1:-1]
    value = []
    i = 0
    escapes = {"n": "\n", "t": "\t", '"': '"', "\\": "\\"}
    while i < len(body):
        c = body[i]
        if c == "\\" and i + 1 < len(body):
            value.append(escapes.get(body[i + 1], body[i + 1]))
            i += 2
        else:
            value.append(c)
            i += 1
    return "".join(value)


@v_args(meta=True)
class _Builder(Transformer_NonRecursive):
    """Parse tree → AST. Numbers are range-checked here so nothing later sees inf/NaN."""

    def __init__(self, rep: Reporter, file: str):
        super().__init__()
        self.rep = rep
        self.file = file

    def _span(self, meta) -> Span:
        return Span(meta.line, meta.column, meta.end_line, meta.end_column, self.file)

    def _tok(self, tok: Token) -> Span:
        return _tok_span(tok, self.file)

    def _name(self, tok: Token) -> A.Name:
        return A.Name(self._tok(tok), str(tok))

    def _string(self, tok: Token) -> A.String:
        return A.String(self._tok(tok), _string_value(str(tok)), str(tok))

    def start(self, meta, items):
        return items

    # statements
    def experiment(self, meta, c):
        return A.Experiment(self._span(meta), self._name(c[0]))

    def param(self, meta, c):
        return A.Param(self._span(meta), self._name(c[0]), self._name(c[1]), c[2])

    def seed(self, meta, c):
        return A.Seed(self._span(meta), c[0])

    def include(self, meta, c):
        return A.Include(self._span(meta), self._string(c[0]))

    def task(self, meta, c):
        return A.Task(self._span(meta), self._name(c[0]), c[1])

    def model(self, meta, c):
        path = self._string(c[1]) if c[1] is not None else None
        return A.Model(self._span(meta), self._name(c[0]), path, c[2])

    def roles(self, meta, c):
        return A.Roles(self._span(meta), c[0])

    def stage(self, meta, c):
        name, kind, _from, parent, block = c
        return A.Stage(self._span(meta), self._name(name), self._name(kind), self._name(parent) if parent is not None else None, block)

    def eval(self, meta, c):
        return A.Eval(self._span(meta), c[0])

    def trainer(self, meta, c):
        return A.Trainer(self._span(meta), c[0])

    def grid(self, meta, c):
        return A.Grid(self._span(meta), self._name(c[0]))

    def template(self, meta, c):
        return A.Template(self._span(meta), self._string(c[0]))

    def axis(self, meta, c):
        return A.Axis(self._span(meta), self._name(c[0]), c[1])

    def zip(self, meta, c):
        return A.Zip(self._span(meta), c[0])

    def seeds(self, meta, c):
        return A.Seeds(self._span(meta), c[0])

    def where(self, meta, c):
        return A.Where(self._span(meta), c[0])

    def report(self, meta, c):
        return A.Report(self._span(meta), c[0])

    def fix(self, meta, c):
        return A.Fix(self._span(meta), self._name(c[0]), c[1])

    # blocks
    def block(self, meta, c):
        return A.Block(self._span(meta), tuple(c))

    def setting(self, meta, c):
        return A.Setting(self._span(meta), self._name(c[0]), c[1])

    def subblock(self, meta, c):
        return A.SubBlock(self._span(meta), self._name(c[0]), c[1])

    # expressions
    def _number_value(self, text: str, span: Span) -> int | float:
        if any(ch in text for ch in ".eE"):
            value = float(text)
            if not math.isfinite(value):
                self.rep.error(
                    span, "bad-number", f"number `{text[:20]}{'…' if len(text) > 20 else ''}` is too large", "use a value below 1e308"
                )
                return 0.0
            return value
        if len(text) > 18:  # beyond int64: no setting in a spec needs it, and it would not survive JSON
            self.rep.error(span, "bad-number", f"integer with {len(text)} digits is too large", "integers must be below 10^18")
            return 0
        return int(text)

    def number(self, meta, c):
        tok = c[0]
        span = self._tok(tok)
        return A.Number(span, self._number_value(str(tok), span), str(tok))

    def dimension(self, meta, c):
        tok = c[0]
        text = str(tok)
        unit = "px" if text.endswith("px") else "%"
        span = self._tok(tok)
        return A.Dimension(span, self._number_value(text[: -len(unit)], span), unit, text)

    def string(self, meta, c):
        return self._string(c[0])

    def true(self, meta, c):
        return A.Bool(self._tok(c[0]), True)

    def false(self, meta, c):
        return A.Bool(self._tok(c[0]), False)

    def none(self, meta, c):
        return A.NoneLit(self._tok(c[0]))

    def name(self, meta, c):
        return self._name(c[0])

    def call(self, meta, c):
        func, arglist = c
        args, kwargs = [], []
        for a in arglist or ():
            (kwargs if isinstance(a, A.Kwarg) else args).append(a)
        return A.Call(self._span(meta), self._name(func), tuple(args), tuple(kwargs))

    def arglist(self, meta, c):
        return c

    def kwarg(self, meta, c):
        return A.Kwarg(self._span(meta), self._name(c[0]), c[1])

    def list(self, meta, c):
        return A.ListExpr(self._span(meta), tuple(x for x in c if x is not None))

    def range_expr(self, meta, c):
        return A.Range(self._span(meta), c[0], c[1])

    def _chain(self, cls, meta, c):
        rest = tuple((str(c[i]), c[i + 1]) for i in range(1, len(c), 2))
        return cls(self._span(meta), c[0], rest)

    def sum(self, meta, c):
        return self._chain(A.Sum, meta, c)

    def product(self, meta, c):
        return self._chain(A.Product, meta, c)

    def signed(self, meta, c):
        signs = "".join(str(t) for t in c[:-1])
        return A.Signed(self._span(meta), signs, c[-1])

    def comparison(self, meta, c):
        return A.Compare(self._span(meta), c[0], str(c[1]), c[2])

    def and_test(self, meta, c):
        return A.BoolOp(self._span(meta), "and", tuple(c))

    def or_test(self, meta, c):
        return A.BoolOp(self._span(meta), "or", tuple(c))

    def not_(self, meta, c):
        return A.Not(self._span(meta), c[0])
