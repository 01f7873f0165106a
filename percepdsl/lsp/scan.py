"""A tolerant, text-based view of a spec for editor features.

Documents being edited rarely parse, so completion, hover, go-to-definition and
the outline do not need the Lark parser: a small tokenizer and a brace-nesting
scanner recover statements, blocks, their entries and the cursor's context from
any text, complete or not. The grammar makes this easy: statements start with a
keyword, blocks hold `key = value` and `key { ... }` entries, and a name that
follows a complete operand always starts a new entry or statement (expressions
have no juxtaposition).

Recovery rules for unbalanced text:
- a statement keyword inside a block, followed by what can only start a statement
  (`stage s`, `task graph_coloring`, `include "x"`, `seed 3`, or `roles {` at
  column 0), closes every open block: the block above it was left unclosed;
- `{` or `}` inside an unclosed `(` or `[` closes the brackets;
- a stray `}` at top level is ignored.

Positions here are 0-based lines and columns in code points, offsets into the text.
The keyword and token tables come from the grammar; nothing here imports the checker
or the catalogue, and no text is parsed.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass, field

from ..parse import MAX_DEPTH, grammar_tables

# Keywords and tokens are the grammar's own (grammars/percep.lark, read through Lark):
# a keyword or an operator added there is known here too.
_G = grammar_tables()
SPEC_KEYWORDS = _G.spec_statements
GRID_KEYWORDS = _G.grid_statements
STATEMENT_KEYWORDS = _G.statements
OPERATOR_WORDS = _G.keywords - _G.statements - _G.value_words  # and, or, not, from: never end an operand
MAX_NESTING = MAX_DEPTH

# The grammar's tokens, plus what a document being typed contains: an unterminated
# string, digits run into a name (`5p` on the way to `5px`), and any other character.
_TOKEN = re.compile(
    "|".join(
        (
            r"(?P<nl>\n)",
            r"(?P<ws>[ \t\r\f\v]+)",
            f"(?P<comment>{_G.patterns['COMMENT']})",
            f"(?P<string>{_G.patterns['STRING']})",
            r'(?P<ustring>"(?:[^"\\\n]|\\.)*)',
            f"(?P<number>{_G.patterns['DIMENSION']}|{_G.patterns['NUMBER']}|\\d+(?:\\.\\d+)?)",
            f"(?P<name>{_G.patterns['NAME']})",
            f"(?P<op>{'|'.join(_G.punctuation)})",
            r"(?P<err>.)",
        )
    )
)


@dataclass(eq=False)
class Tok:
    kind: str  # name, number, string, ustring (unterminated), op, comment, err
    text: str
    start: int  # offsets into the text
    end: int
    line: int  # 0-based
    col: int  # 0-based, code points

    @property
    def is_name(self) -> bool:
        return self.kind == "name"

    @property
    def is_string(self) -> bool:
        return self.kind in ("string", "ustring")

    def string_value(self) -> str:
        body = self.text[1:-1] if self.kind == "string" else self.text[1:]
        return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), body)

    def __repr__(self) -> str:
        return f"Tok({self.kind}, {self.text!r}, {self.line}:{self.col})"


def tokenize(text: str) -> tuple[list[Tok], list[Tok]]:
    """Significant tokens and comments, in order."""
    toks: list[Tok] = []
    comments: list[Tok] = []
    line, line_start = 0, 0
    for m in _TOKEN.finditer(text):
        kind = m.lastgroup
        if kind == "nl":
            line += 1
            line_start = m.end()
            continue
        if kind == "ws":
            continue
        tok = Tok(kind, m.group(), m.start(), m.end(), line, m.start() - line_start)
        (comments if kind == "comment" else toks).append(tok)
    return toks, comments


class Lines:
    """Offsets ↔ (line, column) for one text; lines split at "\\n" as the parser counts them."""

    def __init__(self, text: str):
        self.text = text
        self.starts = [0] + [m.end() for m in re.finditer("\n", text)]
        # LSP's lines also end at a lone \r (editors count one); the parser's do not
        lone_cr = "\r" in text and re.search("\r(?!\n)", text) is not None
        self.lsp_starts = [0] + [m.end() for m in re.finditer("\r\n|\r|\n", text)] if lone_cr else self.starts

    def __len__(self) -> int:
        return len(self.starts)

    def line(self, i: int) -> str:
        if not 0 <= i < len(self.starts):
            return ""
        end = self.starts[i + 1] - 1 if i + 1 < len(self.starts) else len(self.text)
        return self.text[self.starts[i] : end].rstrip("\r")

    def offset(self, line: int, col: int) -> int:
        if line < 0:
            return 0
        if line >= len(self.starts):
            return len(self.text)
        return min(self.starts[line] + max(col, 0), self.starts[line] + len(self.line(line)))

    def position(self, offset: int) -> tuple[int, int]:
        i = bisect_right(self.starts, offset) - 1
        return i, offset - self.starts[i]

    def lsp_line(self, i: int) -> tuple[int, int]:
        """LSP line i's [start, end) offsets, its line break left out."""
        start = self.lsp_starts[i]
        if i + 1 >= len(self.lsp_starts):
            return start, len(self.text)
        end = self.lsp_starts[i + 1]
        return start, end - (2 if self.text[start:end].endswith("\r\n") else 1)


# ---- outline ---------------------------------------------------------------------------


@dataclass(eq=False)
class Entry:
    key: Tok
    block_of: Block
    op: Tok | None = None  # the `=`; None for a sub-block or a key still being typed
    value: list[Tok] = field(default_factory=list)
    block: Block | None = None
    end: int = 0

    @property
    def start(self) -> int:
        return self.key.start

    def value_text(self, text: str) -> str:
        if not self.value:
            return ""
        return " ".join(text[self.value[0].start : self.value[-1].end].split())


@dataclass(eq=False)
class Block:
    open: Tok
    stmt: Stmt
    parent: Entry | None  # the entry of a sub-block (`lora { ... }`)
    entries: list[Entry] = field(default_factory=list)
    close: Tok | None = None
    end: int = 0

    @property
    def start(self) -> int:
        return self.open.start

    def keys(self) -> list[str]:
        return [e.key.text for e in self.entries]

    def get(self, key: str) -> Entry | None:
        return next((e for e in self.entries if e.key.text == key), None)

    def path(self) -> list[str]:
        """Sub-block keys from the statement's block down to this one."""
        out: list[str] = []
        b: Block | None = self
        while b is not None and b.parent is not None:
            out.append(b.parent.key.text)
            b = b.parent.block_of
        return out[::-1]


@dataclass(eq=False)
class Stmt:
    keyword: Tok | None  # None: stray tokens where a statement should start
    head: list[Tok] = field(default_factory=list)  # tokens between the keyword and the block / end
    block: Block | None = None
    start: int = 0
    end: int = 0

    @property
    def kw(self) -> str:
        return self.keyword.text if self.keyword is not None else ""

    def name_tok(self) -> Tok | None:
        """The declared name: `stage NAME`, `param NAME`, `task NAME`, `model KIND`, ..."""
        if self.head and self.head[0].is_name:
            return self.head[0]
        return None

    def string_tok(self) -> Tok | None:
        return next((t for t in self.head if t.is_string), None)

    def stage_kind(self) -> Tok | None:
        h = self.head
        if len(h) >= 3 and h[1].text == "=" and h[2].is_name:
            return h[2]
        return None

    def stage_parent(self) -> Tok | None:
        h = self.head
        for i, t in enumerate(h[:-1]):
            if t.text == "from" and h[i + 1].is_name:
                return h[i + 1]
        return None

    def head_text(self, text: str) -> str:
        end = self.head[-1].end if self.head else (self.keyword.end if self.keyword else self.start)
        return " ".join(text[self.start : end].split())


@dataclass(eq=False)
class Group:
    open: Tok
    func: str | None  # `name(`; None for `(` of grouping and for `[`
    items: list[Tok] = field(default_factory=list)  # tokens at this bracket's own level


@dataclass
class Frames:
    """The scanner's state at a point: what encloses it."""

    stmt: Stmt | None
    top_state: str  # "start" (no statement yet), "head", "done" (statement complete)
    blocks: list[Block]
    block_states: list[str]  # per block: "key", "after_key", "value"
    entries: list[Entry | None]  # per block: the entry being written
    groups: list[Group]  # innermost last; only those inside the innermost block entry / statement head
    prev: Tok | None
    prev_operand: bool


@dataclass
class Outline:
    text: str
    tokens: list[Tok]
    comments: list[Tok]
    stmts: list[Stmt]
    lines: Lines

    def by_keyword(self, kw: str) -> list[Stmt]:
        return [s for s in self.stmts if s.kw == kw]

    def is_grid(self) -> bool:
        kws = {s.kw for s in self.stmts}
        return "experiment" not in kws and bool(kws & {"grid", "template"})

    def is_spec(self) -> bool:
        return any(s.kw == "experiment" for s in self.stmts)

    def params(self) -> list[Stmt]:
        return [s for s in self.by_keyword("param") if s.name_tok() is not None]

    def stages(self) -> list[Stmt]:
        return [s for s in self.by_keyword("stage") if s.name_tok() is not None]

    def role_entries(self) -> list[Entry]:
        out: list[Entry] = []
        for s in self.by_keyword("roles"):
            if s.block is not None:
                out += s.block.entries
        return out

    def includes(self) -> list[Stmt]:
        return [s for s in self.by_keyword("include") if s.string_tok() is not None]

    def comment_for(self, stmt: Stmt) -> str:
        """Comments right above a statement and the one trailing its first line."""
        first = self.lines.position(stmt.start)[0]
        above: list[str] = []
        line = first - 1
        by_line = {c.line: c for c in self.comments}
        while line in by_line and self.lines.line(line).lstrip().startswith("#"):
            above.append(by_line[line].text.lstrip("#").strip())
            line -= 1
        out = above[::-1]
        trailing = by_line.get(first)
        if trailing is not None and trailing.start > stmt.start:
            out.append(trailing.text.lstrip("#").strip())
        return "\n".join(x for x in out if x)


def _is_operand_end(t: Tok) -> bool:
    if t.kind in ("number", "string", "ustring"):
        return True
    if t.kind == "name":
        return t.text not in OPERATOR_WORDS
    return t.text in (")", "]", "}")


def _starts_statement_inside_block(t: Tok, nxt: Tok | None) -> bool:
    """A statement keyword at a key position that cannot be a key: the block above was left open."""
    if t.text not in STATEMENT_KEYWORDS or nxt is None:
        return False
    if nxt.kind in ("name", "string", "ustring", "number"):
        return nxt.line == t.line or t.col == 0
    if nxt.text in ("[", "(", "-", "+"):
        return nxt.line == t.line
    return nxt.text == "{" and t.col == 0


class _Scanner:
    def __init__(self, text: str, tokens: list[Tok]):
        self.text = text
        self.toks = tokens
        self.stmts: list[Stmt] = []
        self.stmt: Stmt | None = None
        self.top_state = "start"
        self.blocks: list[Block] = []
        self.states: list[str] = []
        self.entries: list[Entry | None] = []
        self.groups: list[Group] = []
        self.flat: list[Tok] | None = None  # where tokens inside brackets also go (entry value / statement head)
        self.prev: Tok | None = None
        self.prev_operand = False

    # -- helpers
    def _new_stmt(self, kw: Tok | None, first: Tok) -> Stmt:
        st = Stmt(kw, start=first.start, end=first.end)
        self.stmts.append(st)
        self.stmt = st
        self.top_state = "head"
        self.groups, self.flat = [], None
        return st

    def _owner(self) -> list[Tok] | None:
        if self.blocks:
            e = self.entries[-1]
            return e.value if (e is not None and self.states[-1] == "value") else None
        return self.stmt.head if self.stmt is not None else None

    def _close_all(self, at: int) -> None:
        for b in self.blocks:
            if b.close is None:
                b.end = max(b.end, at)
        for e in self.entries:
            if e is not None:
                e.end = max(e.end, at)
        self.blocks, self.states, self.entries, self.groups, self.flat = [], [], [], [], None
        self.top_state = "done"

    def _mark(self, t: Tok) -> None:
        if self.stmt is not None:
            self.stmt.end = max(self.stmt.end, t.end)
        for b in self.blocks:
            b.end = max(b.end, t.end)
        for e in self.entries:
            if e is not None:
                e.end = max(e.end, t.end)
        self.prev = t

    # -- the machine
    def run(self, stop: int | None = None) -> Frames:
        toks = self.toks
        n = len(toks)
        i = 0
        while i < n:
            t = toks[i]
            if stop is not None and t.start >= stop:
                break
            nxt = toks[i + 1] if i + 1 < n else None
            self.step(t, nxt)
            i += 1
        return Frames(
            self.stmt,
            self.top_state,
            list(self.blocks),
            list(self.states),
            list(self.entries),
            list(self.groups),
            self.prev,
            self.prev_operand,
        )

    def step(self, t: Tok, nxt: Tok | None) -> None:
        if self.groups and t.is_name and self.prev_operand and self.prev is not None and self.prev.line < t.line:
            # An unclosed bracket on an earlier line: a name that opens a line after a complete operand
            # and reads as a new entry (`key =`, `key {`) or a new statement ends the brackets.
            in_value = bool(self.blocks) and self.states[-1] == "value"
            if (in_value and nxt is not None and nxt.text in ("=", "{")) or t.text in STATEMENT_KEYWORDS:
                self.groups, self.flat = [], None
        if self.groups:
            if t.text in ("{", "}"):
                self.groups, self.flat = [], None  # a brace ends unclosed brackets
            else:
                if self.flat is not None:
                    self.flat.append(t)
                if t.text in ("(", "["):
                    func = self.prev.text if (t.text == "(" and self.prev is not None and self.prev.is_name and self.prev_operand) else None
                    self.groups[-1].items.append(t)
                    if len(self.groups) < MAX_NESTING:
                        self.groups.append(Group(t, func))
                    self.prev_operand = False
                elif t.text in (")", "]"):
                    self.groups.pop()
                    if self.groups:
                        self.groups[-1].items.append(t)
                    else:
                        self.flat = None
                    self.prev_operand = True
                else:
                    self.groups[-1].items.append(t)
                    self.prev_operand = _is_operand_end(t)
                self._mark(t)
                return
        if self.blocks:
            self._in_block(t, nxt)
        else:
            self._top(t)

    def _open_group(self, t: Tok) -> None:
        """The outermost `(` or `[` of an expression; its tokens also go to the owner's flat list."""
        func = self.prev.text if (t.text == "(" and self.prev is not None and self.prev.is_name and self.prev_operand) else None
        self.flat = self._owner()
        if self.flat is not None:
            self.flat.append(t)
        self.groups = [Group(t, func)]
        self._mark(t)
        self.prev_operand = False

    def _top(self, t: Tok) -> None:
        if t.is_name and t.text in STATEMENT_KEYWORDS and (self.stmt is None or self.top_state == "done" or self.prev_operand):
            self._new_stmt(t, t)
            self.prev = t
            self.prev_operand = False
            return
        if t.text == "}":
            self._mark(t)
            return
        if self.stmt is None or self.top_state == "done":
            self._new_stmt(None, t)
        if t.text == "{":
            self._open_block(t, self.stmt, None)
            return
        if t.text in ("(", "["):
            self._open_group(t)
            return
        self.stmt.head.append(t)
        self._mark(t)
        self.prev_operand = _is_operand_end(t)

    def _open_block(self, t: Tok, stmt: Stmt, parent: Entry | None) -> None:
        if len(self.blocks) >= MAX_NESTING:
            return
        blk = Block(t, stmt, parent, end=t.end)
        if parent is not None:
            parent.block = blk
        elif stmt.block is None:
            stmt.block = blk
        self.blocks.append(blk)
        self.states.append("key")
        self.entries.append(None)
        self._mark(t)
        self.prev_operand = False

    def _in_block(self, t: Tok, nxt: Tok | None) -> None:
        blk = self.blocks[-1]
        state = self.states[-1]
        if t.text == "}":
            blk.close = t
            self._mark(t)
            self.blocks.pop()
            self.states.pop()
            self.entries.pop()
            if self.blocks:
                self.states[-1] = "key"
            else:
                self.top_state = "done"
            self.prev_operand = True
            return
        if t.is_name and (state in ("key", "after_key") or (state == "value" and self.prev_operand)):
            if _starts_statement_inside_block(t, nxt):
                self._close_all(self.prev.end if self.prev is not None else t.start)
                self._top(t)
                return
            entry = Entry(t, blk, end=t.end)
            blk.entries.append(entry)
            self.entries[-1] = entry
            self.states[-1] = "after_key"
            self._mark(t)
            self.prev_operand = False
            return
        if t.text == "{":
            entry = self.entries[-1] if state == "after_key" else None
            if entry is None:  # a stray brace: an anonymous entry keeps braces balanced
                entry = Entry(t, blk, end=t.end)
            self._open_block(t, blk.stmt, entry)
            return
        if t.text == "=" and state == "after_key":
            self.entries[-1].op = t
            self.states[-1] = "value"
            self._mark(t)
            self.prev_operand = False
            return
        if t.text == ",":
            self.states[-1] = "key"
            self._mark(t)
            self.prev_operand = False
            return
        if state == "value":
            if t.text in ("(", "["):
                self._open_group(t)
                return
            self.entries[-1].value.append(t)
            self._mark(t)
            self.prev_operand = _is_operand_end(t)
            return
        if t.text in ("(", "["):  # stray bracket at a key position: keep brackets balanced
            self._open_group(t)
            return
        self._mark(t)
        self.prev_operand = _is_operand_end(t)


def outline(text: str) -> Outline:
    toks, comments = tokenize(text)
    sc = _Scanner(text, toks)
    sc.run()
    return Outline(text, toks, comments, sc.stmts, Lines(text))


# ---- the cursor's context ------------------------------------------------------------------------


@dataclass
class Context:
    """What the text before `offset` says about the position.

    kind:
      comment, string      — inside a comment / a string literal (`string` holds the token);
      statement            — where a statement keyword may start;
      head                 — inside a statement's head (`stage NAME = KIND from PARENT`);
      key                  — where a block entry's key goes;
      value                — inside an expression (a setting value, a call argument, a head expression);
      none                 — nothing sensible (inside a number, after an error).
    """

    kind: str
    offset: int
    prefix: str = ""
    prefix_start: int = 0
    stmt: Stmt | None = None
    block: Block | None = None
    entry: Entry | None = None  # the setting whose value this is
    groups: list[Group] = field(default_factory=list)
    prev: Tok | None = None
    string: Tok | None = None
    at_line_start: bool = False  # the word starts in column 0

    @property
    def keyword(self) -> str:
        return self.stmt.kw if self.stmt is not None else ""

    @property
    def key(self) -> str | None:
        return self.entry.key.text if self.entry is not None else None

    def block_path(self) -> list[str]:
        return self.block.path() if self.block is not None else []

    def head_before(self) -> list[Tok]:
        """Head tokens of the statement before the cursor."""
        if self.stmt is None:
            return []
        return [t for t in self.stmt.head if t.end <= self.prefix_start]


def context_at(text: str, offset: int, tokens: list[Tok] | None = None, comments: list[Tok] | None = None) -> Context:
    if tokens is None or comments is None:
        tokens, comments = tokenize(text)
    offset = max(0, min(offset, len(text)))
    for c in comments:
        if c.start < offset <= c.end:
            return Context("comment", offset)
    word_start = offset
    for t in tokens:
        if t.start >= offset:
            break
        if t.is_string and t.start < offset and (offset < t.end or (t.kind == "ustring" and offset <= t.end)):
            ctx = _frames_context(text, tokens, t.start, offset)
            ctx.kind, ctx.string = "string", t
            return ctx
        if t.kind == "number" and t.start < offset <= t.end:
            return Context("none", offset)
        if t.is_name and t.start < offset <= t.end:
            word_start = t.start
    ctx = _frames_context(text, tokens, word_start, offset)
    return ctx


def _frames_context(text: str, tokens: list[Tok], word_start: int, offset: int) -> Context:
    sc = _Scanner(text, tokens)
    fr = sc.run(stop=word_start)
    prefix = text[word_start:offset]
    line_start = text.rfind("\n", 0, word_start) + 1
    ctx = Context("none", offset, prefix, word_start, fr.stmt, prev=fr.prev, at_line_start=(word_start == line_start))
    if fr.blocks:
        blk = fr.blocks[-1]
        state = fr.block_states[-1]
        ctx.block = blk
        entry = fr.entries[-1]
        if state == "value" and fr.groups:
            ctx.kind, ctx.entry, ctx.groups = "value", entry, fr.groups
        elif state == "value" and not fr.prev_operand:
            ctx.kind, ctx.entry = "value", entry
        elif state == "after_key" and entry is not None and fr.prev is entry.key:
            ctx.kind = "none"  # between a key and its `=`
        else:
            ctx.kind = "key"
        return ctx
    if fr.stmt is None or fr.top_state in ("start", "done"):
        ctx.kind = "statement"
        return ctx
    ctx.groups = fr.groups
    if fr.groups:
        ctx.kind = "value"
        return ctx
    # a complete operand ends a statement unless its head grammar still expects more
    if fr.prev_operand and _head_complete(fr.stmt, word_start):
        ctx.kind = "statement"
        return ctx
    ctx.kind = "head"
    return ctx


def _head_complete(stmt: Stmt, before: int) -> bool:
    """Whether a statement's head is complete after an operand (so a new statement may follow)."""
    head = [t for t in stmt.head if t.end <= before]
    kw, n = stmt.kw, len(head)
    if kw in ("stage", "task", "roles", "eval", "trainer", "zip"):
        return False  # these need their block
    if kw == "param":
        return n >= 3 and head[1].text == ":" and (n == 3 or n >= 5)
    if kw in ("axis", "fix"):
        return n >= 3
    return n >= 1


__all__ = [
    "Tok",
    "tokenize",
    "Lines",
    "Entry",
    "Block",
    "Stmt",
    "Group",
    "Outline",
    "outline",
    "Context",
    "context_at",
    "SPEC_KEYWORDS",
    "GRID_KEYWORDS",
    "STATEMENT_KEYWORDS",
]
