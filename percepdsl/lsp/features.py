"""Editor features over the library: diagnostics, completion, hover, definition, outline,
formatting and quick fixes, as LSP data (lsprotocol types).

The server is a thin adapter; everything here is a pure function of a document's text,
its path, the catalogue and a `reader` for other files (open buffers first, then disk),
so it is tested without a client. Diagnostics come from the checker (`check_file`,
exactly what `percep check` reports); the other features read a tolerant scan of the
text (`scan.py`) so they work while the document does not parse.

Positions: the library and the scanner count code points; LSP positions count the
negotiated encoding's code units (UTF-16 unless the client offers another). `Encoder`
converts at the edge.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lsprotocol import types as T

from ..catalogue import Catalogue, Entry, ParamSpec, default_catalogue
from ..check.load import is_file, read_source, resolve_written
from ..diagnostics import Diagnostic, Severity, Span
from . import scan as S

Reader = Callable[[Path], "str | None"]
MAX_INCLUDE_DEPTH = 32


def read_disk(path: Path) -> str | None:
    """A spec file's text; None unless the checker would read it (`read_source`: a regular file, UTF-8, not
    huge): a named pipe would block the server for ever, /dev/zero fill its memory."""
    return read_source(path)[0]


# ---- positions -------------------------------------------------------------------------------


class Encoder:
    """Code-point columns ↔ the client's position encoding ("utf-16", "utf-32", "utf-8")."""

    def __init__(self, encoding: str = "utf-16"):
        self.encoding = str(encoding or "utf-16").lower()

    def _units(self, s: str) -> int:
        if s.isascii() or self.encoding == "utf-32":
            return len(s)
        if self.encoding == "utf-8":
            return len(s.encode("utf-8"))
        return len(s) + sum(1 for c in s if ord(c) > 0xFFFF)

    def position(self, lines: S.Lines, line: int, col: int) -> T.Position:
        """0-based line and code-point column, as the parser counts them (lines end at \\n) → LSP
        position (clamped to the text), whose lines also end at a lone \\r."""
        if line >= len(lines):
            line = len(lines) - 1
            col = len(lines.line(line))
        offset = lines.offset(max(line, 0), col)
        i = bisect_right(lines.lsp_starts, offset) - 1
        return T.Position(line=i, character=self._units(lines.text[lines.lsp_starts[i] : offset]))

    def offset_position(self, lines: S.Lines, offset: int) -> T.Position:
        return self.position(lines, *lines.position(offset))

    def range(self, lines: S.Lines, start: int, end: int) -> T.Range:
        return T.Range(start=self.offset_position(lines, start), end=self.offset_position(lines, end))

    def span_range(self, lines: S.Lines, span: Span) -> T.Range:
        """A library span (1-based, end exclusive) → LSP range."""
        return T.Range(
            start=self.position(lines, span.line - 1, span.column - 1), end=self.position(lines, span.end_line - 1, span.end_column - 1)
        )

    def to_offset(self, lines: S.Lines, pos: T.Position) -> int:
        """LSP position → offset into the text."""
        if pos.line >= len(lines.lsp_starts):
            return len(lines.text)
        if pos.line < 0:
            return 0
        start, end = lines.lsp_line(pos.line)
        text = lines.text[start:end]
        if text.isascii() or self.encoding == "utf-32":
            col = min(pos.character, len(text))
        else:
            units, col = 0, 0
            for ch in text:
                if units >= pos.character:
                    break
                units += self._units(ch)
                col += 1
        return start + max(col, 0)


# ---- a document and what it declares ---------------------------------------------------------


def path_uri(path: Path) -> str:
    return path.resolve().as_uri()


@dataclass
class Decl:
    kind: str  # param, stage, role
    name: str
    tok: S.Tok
    doc: Doc
    stmt: S.Stmt | None = None
    entry: S.Entry | None = None


@dataclass(eq=False)
class Doc:
    """One text with its scan; `path` is None for documents that are not files."""

    text: str
    path: Path | None = None
    uri: str | None = None
    _outline: S.Outline | None = field(default=None, repr=False)
    _lines: S.Lines | None = field(default=None, repr=False)

    @property
    def outline(self) -> S.Outline:
        if self._outline is None:
            self._outline = S.outline(self.text)
            if self._lines is not None:
                self._outline.lines = self._lines
        return self._outline

    @property
    def lines(self) -> S.Lines:
        if self._outline is not None:
            return self._outline.lines
        if self._lines is None:
            self._lines = S.Lines(self.text)
        return self._lines

    @property
    def base(self) -> Path:
        return self.path.parent if self.path is not None else Path.cwd()

    def display(self) -> str:
        if self.path is None:
            return self.uri or "<document>"
        try:
            return str(self.path.resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            return str(self.path)

    def location(self, start: int, end: int, enc: Encoder) -> T.Location | None:
        uri = self.uri or (path_uri(self.path) if self.path is not None else None)
        if uri is None:
            return None
        return T.Location(uri=uri, range=enc.range(self.lines, start, end))

    def target(self, stmt: S.Stmt) -> Path | None:
        tok = stmt.string_tok()
        if tok is None:
            return None
        return resolve_written(self.base, tok.string_value())


class Project:
    """A document and the files it reaches through `include` (and a grid's `template`)."""

    def __init__(self, doc: Doc, reader: Reader = read_disk, catalogue: Catalogue | None = None):
        self.doc = doc
        self.reader = reader
        self.cat = catalogue or default_catalogue()
        self._docs: dict[Path, Doc | None] = {}
        self._decls: list[Decl] | None = None
        self._template: list[Decl] | None = None

    def load(self, path: Path) -> Doc | None:
        path = path.resolve()
        if path not in self._docs:
            text = self.reader(path)
            self._docs[path] = Doc(text, path) if text is not None else None
        return self._docs[path]

    def _reach(self, doc: Doc) -> list[Doc]:
        """The document and its includes, depth first, each file once."""
        out, seen = [], set()
        stack = [(doc, 0)]
        while stack:
            d, depth = stack.pop()
            key = d.path.resolve() if d.path is not None else id(d)
            if key in seen:
                continue
            seen.add(key)
            out.append(d)
            if depth >= MAX_INCLUDE_DEPTH:
                continue
            for inc in reversed(d.outline.includes()):
                target = d.target(inc)
                sub = self.load(target) if target is not None else None
                if sub is not None:
                    stack.append((sub, depth + 1))
        return out

    @staticmethod
    def _declared(d: Doc) -> list[Decl]:
        out: list[Decl] = []
        o = d.outline
        for st in o.params():
            out.append(Decl("param", st.name_tok().text, st.name_tok(), d, stmt=st))
        for st in o.stages():
            out.append(Decl("stage", st.name_tok().text, st.name_tok(), d, stmt=st))
        for e in o.role_entries():
            out.append(Decl("role", e.key.text, e.key, d, stmt=e.block_of.stmt, entry=e))
        return out

    def decls(self) -> list[Decl]:
        if self._decls is None:
            self._decls = [x for d in self._reach(self.doc) for x in self._declared(d)]
        return self._decls

    def find(self, kind: str, name: str) -> Decl | None:
        return next((x for x in self.decls() if x.kind == kind and x.name == name), None)

    def names(self, kind: str) -> list[Decl]:
        seen, out = set(), []
        for x in self.decls():
            if x.kind == kind and x.name not in seen:
                seen.add(x.name)
                out.append(x)
        return out

    def _task(self) -> tuple[Doc, S.Stmt] | None:
        """The experiment's `task NAME { ... }` statement (here or in an include) and its document."""
        for d in self._reach(self.doc):
            for st in d.outline.by_keyword("task"):
                if st.name_tok() is not None:
                    return d, st
        return None

    def task_name(self) -> str | None:
        """The name of the experiment's task (`task NAME { ... }`, here or in an include), if any."""
        found = self._task()
        return found[1].name_tok().text if found is not None else None

    def task_settings(self) -> dict[str, str]:
        """The settings the experiment's task block writes, name → value as written: what a stage's
        own `task { ... }` inherits where it does not set them (not the catalogue's defaults)."""
        found = self._task()
        if found is None or found[1].block is None:
            return {}
        d, st = found
        return {e.key.text: e.value_text(d.text) for e in st.block.entries if e.op is not None and e.value}

    def roles(self) -> list[str]:
        declared = [x.name for x in self.names("role")]
        if declared or any(d.outline.by_keyword("roles") for d in self._reach(self.doc)):
            return declared
        from ..check import DEFAULT_ROLES  # the roles a spec without a roles block gets

        return [r.role for r in DEFAULT_ROLES]

    def template_doc(self) -> Doc | None:
        for st in self.doc.outline.by_keyword("template"):
            target = self.doc.target(st)
            if target is not None:
                return self.load(target)
        return None

    def template_params(self) -> list[Decl]:
        if self._template is None:
            tdoc = self.template_doc()
            self._template = []
            if tdoc is not None:
                self._template = [x for d in self._reach(tdoc) for x in self._declared(d) if x.kind == "param"]
        return self._template


# ---- diagnostics -------------------------------------------------------------------------------

_SEVERITY = {
    Severity.ERROR: T.DiagnosticSeverity.Error,
    Severity.WARNING: T.DiagnosticSeverity.Warning,
    Severity.NOTE: T.DiagnosticSeverity.Information,
}


def _file_path(name: str) -> Path | None:
    if not name or name.startswith("<"):
        return None
    p = Path(name)
    return (p if p.is_absolute() else Path.cwd() / p).resolve()


def _include_owner(project: Project) -> dict[Path, S.Stmt]:
    """Every file reached through includes (or a grid's template) → the document's statement that brings it in."""
    owner: dict[Path, S.Stmt] = {}
    doc = project.doc
    for stmt in doc.outline.includes() + [s for s in doc.outline.by_keyword("template") if s.string_tok() is not None]:
        target = doc.target(stmt)
        if target is None:
            continue
        owner.setdefault(target, stmt)
        sub = project.load(target)
        for d in project._reach(sub) if sub is not None else []:
            if d.path is not None:
                owner.setdefault(d.path.resolve(), stmt)
    return owner


def lsp_diagnostics(diags: list[Diagnostic], doc_name: str, project: Project, enc: Encoder) -> list[T.Diagnostic]:
    """The checker's diagnostics for one document, as LSP diagnostics on that document.

    Diagnostics located in an included file are shown on the `include` statement that
    brings the file in (for a grid, on its `template` statement), their message prefixed
    with `file:line:col`, and their exact location given as related information."""
    doc = project.doc
    doc_path = doc.path.resolve() if doc.path is not None else None
    owners: dict[Path, S.Stmt] | None = None
    out: list[T.Diagnostic] = []
    for d in diags:
        path = _file_path(d.file)
        here = d.file == doc_name or (path is not None and path == doc_path)
        message = d.message + (f"\nhelp: {d.hint}" if d.hint else "")
        related: list[T.DiagnosticRelatedInformation] = []
        if here:
            rng = enc.span_range(doc.lines, d.span)
        else:
            if owners is None:
                owners = _include_owner(project)
            stmt = owners.get(path) if path is not None else None
            if stmt is not None:
                rng = enc.range(doc.lines, stmt.start, stmt.end)
            else:  # nothing in this document names the file: anchored at its top
                rng = T.Range(start=T.Position(line=0, character=0), end=T.Position(line=0, character=0))
            message = f"{_shown(d.file, path, doc)}:{d.span.line}:{d.span.column}: {message}"
            loc = _span_location(d.file, d.span, project, enc)
            if loc is not None:
                related.append(T.DiagnosticRelatedInformation(location=loc, message=d.message))
        for r in d.related:
            loc = _span_location(r.file, r.span, project, enc)
            if loc is not None:
                related.append(T.DiagnosticRelatedInformation(location=loc, message=r.message))
        data: dict = {"file": d.file, "code": d.code}
        if d.hint:
            data["hint"] = d.hint
        if not here:
            data["elsewhere"] = True  # the range is the statement that brings the file in, not the problem
        out.append(
            T.Diagnostic(
                range=rng,
                message=message,
                severity=_SEVERITY.get(d.severity, T.DiagnosticSeverity.Error),
                code=d.code,
                source="percep",
                related_information=related or None,
                data=data,
            )
        )
    return out


def _shown(name: str, path: Path | None, doc: Doc) -> str:
    """An included file's name as the user wrote it: relative to the document's folder when inside it."""
    if path is not None:
        try:
            return str(path.relative_to(doc.base.resolve()))
        except ValueError:
            pass
    return name


def _span_location(file: str, span: Span, project: Project, enc: Encoder) -> T.Location | None:
    doc = project.doc
    path = _file_path(file)
    if doc.path is not None and path is not None and path == doc.path.resolve():
        target = doc
    elif path is None:
        target = doc if (doc.path is None and file != "<--set>" and not file.startswith("<-")) else None
    else:
        target = project.load(path) or Doc("", path)
    if target is None:
        return None
    loc_uri = target.uri or (path_uri(target.path) if target.path is not None else None)
    if loc_uri is None:
        return None
    return T.Location(uri=loc_uri, range=enc.span_range(target.lines, span))


_DID_YOU_MEAN = re.compile(r"did you mean `([^`]+)`\?")
_NO_QUICK_FIX = {"missing-include", "missing-file", "unknown-param", "bad-override"}


def quick_fixes(uri: str, text: str, diagnostics: Iterable[T.Diagnostic], enc: Encoder) -> list[T.CodeAction]:
    """ "did you mean `x`?" hints become quick fixes that replace the flagged name."""
    lines = S.Lines(text)
    out = []
    for d in diagnostics:
        data = d.data if isinstance(d.data, dict) else {}
        hint = data.get("hint") or ""
        m = _DID_YOU_MEAN.search(hint)
        if not m or d.code in _NO_QUICK_FIX or d.source != "percep" or data.get("elsewhere"):
            continue  # a problem in an included file is fixed there (its own diagnostics carry the fix)
        start, end = enc.to_offset(lines, d.range.start), enc.to_offset(lines, d.range.end)
        old = text[start:end]
        if not old or "\n" in old:
            continue
        new = m.group(1)
        if old.startswith('"'):
            new = f'"{new}"'
        out.append(
            T.CodeAction(
                title=f"Replace `{old}` with `{new}`",
                kind=T.CodeActionKind.QuickFix,
                diagnostics=[d],
                is_preferred=True,
                edit=T.WorkspaceEdit(changes={uri: [T.TextEdit(range=d.range, new_text=new)]}),
            )
        )
    return out


# ---- formatting -----------------------------------------------------------------------------------


def format_edits(text: str, name: str, enc: Encoder) -> list[T.TextEdit] | None:
    """One edit replacing the whole document with its canonical form; None when it does not parse."""
    from ..fmt import format_text

    out, _ = format_text(text, name)
    if out is None:
        return None
    if out == text:
        return []
    lines = S.Lines(text)
    return [T.TextEdit(range=enc.range(lines, 0, len(text)), new_text=out)]


# ---- catalogue helpers ------------------------------------------------------------------------------

_FUNC_KINDS = {"loss": ("loss", "schedule"), "reward": ("reward", "schedule"), "value": ("schedule",), "rule": ("role_rule",)}
_NUMERIC = {"int", "float", "px", "int_range", "value"}


def keyword_entry(cat: Catalogue, kw: str) -> list[Entry]:
    out = [e for e in (cat.get("keyword", kw), cat.get("block", kw) if kw in ("eval", "trainer") else None) if e is not None]
    return out


def block_entry(cat: Catalogue, stmt: S.Stmt | None, path: list[str], task: str | None = None) -> Entry | None:
    """The catalogue entry whose parameters are the settings of a block; `task`: the experiment's
    task, whose stage settings a stage's `task { ... }` holds (`Entry.for_stage`)."""
    if stmt is None:
        return None
    kw = stmt.kw
    if kw == "stage" and path == ["task"]:
        entry = cat.get("task", task) if task else None
        return entry.for_stage() if entry is not None else None
    name = stmt.name_tok()
    entry = None
    if kw == "task" and name is not None:
        entry = cat.get("task", name.text)
    elif kw == "model" and name is not None:
        entry = cat.get("model", name.text)
        if path == ["lora"] and name.text == "hf":
            return cat.get("block", "lora")
    elif kw == "stage":
        kind = stmt.stage_kind()
        if kind is not None and kind.text in ("sft", "grpo"):
            entry = cat.get("block", kind.text)
    elif kw in ("eval", "trainer"):
        entry = cat.get("block", kw)
    return entry if not path else None


def inherited(project: Project, stmt: S.Stmt | None, path: list[str]) -> dict[str, str]:
    """In a stage's `task { ... }`: the experiment task's settings as written, which the stage
    inherits where it does not set them (`Project.task_settings`); elsewhere nothing."""
    if stmt is not None and stmt.kw == "stage" and path == ["task"]:
        return project.task_settings()
    return {}


def setting_spec(cat: Catalogue, stmt: S.Stmt | None, path: list[str], key: str | None, task: str | None = None) -> ParamSpec | None:
    entry = block_entry(cat, stmt, path, task)
    return entry.param(key) if (entry is not None and key) else None


def expr_kind(spec: ParamSpec | None, stmt: S.Stmt | None) -> str:
    """Which functions make sense in an expression: loss, reward, value (schedules) or rule."""
    if stmt is not None and stmt.kw == "roles":
        return "rule"
    if spec is None:
        return "value"
    return {"loss": "loss", "token_weights": "loss", "reward": "reward"}.get(spec.type, "value")


def function_entry(cat: Catalogue, name: str, ekind: str) -> Entry | None:
    for k in _FUNC_KINDS.get(ekind, ()) + ("loss", "reward", "schedule", "role_rule"):
        e = cat.get(k, name)
        if e is not None:
            return e
    return None


def spec_markdown(spec: ParamSpec, owner: str, given: str | None = None) -> str:
    """Hover text of a setting; `given`: the value the experiment's task block writes for it, which
    a stage's `task { ... }` inherits."""
    rng = spec.describe_range()
    unit = f" ({spec.unit})" if spec.unit else ""
    lines = [
        f"**{spec.name}** — setting of `{owner}`" if owner else f"**{spec.name}**",
        "",
        "```percep",
        spec.signature(),
        "```",
        "",
        spec.doc or "",
    ]
    facts = [f"- type: {spec.describe_type()}{', ' + rng if rng else ''}{unit}"]
    if given is not None:
        facts.append(f"- the experiment's task sets: `{given}`" + ("" if spec.required else f" (default: `{spec.default_text()}`)"))
    else:
        facts.append("- required" if spec.required else f"- default: `{spec.default_text()}`")
    return "\n".join(lines + [""] + facts)


def _first_sentence(doc: str) -> str:
    return doc.split(". ")[0].rstrip(".")[:100]


# ---- completion ------------------------------------------------------------------------------------


def _doc_md(md: str) -> T.MarkupContent:
    return T.MarkupContent(kind=T.MarkupKind.Markdown, value=md)


class _Items:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.items: list[T.CompletionItem] = []
        self.seen: set[str] = set()

    def add(
        self,
        label: str,
        kind: T.CompletionItemKind,
        detail: str | None = None,
        doc: str | None = None,
        insert: str | None = None,
        snippet: bool = False,
        sort: str = "5",
        edit: T.TextEdit | None = None,
    ) -> None:
        if label in self.seen:
            return
        self.seen.add(label)
        self.items.append(
            T.CompletionItem(
                label=label,
                kind=kind,
                detail=detail,
                documentation=_doc_md(doc) if doc else None,
                insert_text=insert if edit is None else None,
                text_edit=edit,
                insert_text_format=T.InsertTextFormat.Snippet if snippet else (T.InsertTextFormat.PlainText if insert else None),
                sort_text=f"{sort}{label}",
            )
        )

    def note(self, label: str, note: str) -> None:
        """Add `note` to the detail of the item `label` (if it was offered)."""
        for item in self.items:
            if item.label == label:
                item.detail = f"{item.detail} ({note})" if item.detail else note

    def entry(self, e: Entry, kind: T.CompletionItemKind, snippets: bool, call: bool = False, sort: str = "5") -> None:
        insert, snip = None, False
        if call and snippets and e.params:
            insert, snip = f"{e.name}($0)", True
        self.add(e.name, kind, e.signature() if e.params else e.kind.replace("_", " "), e.markdown(), insert, snip, sort)


def complete(project: Project, offset: int, enc: Encoder, snippets: bool = False) -> list[T.CompletionItem]:
    doc = project.doc
    o = doc.outline
    ctx = S.context_at(doc.text, offset, o.tokens, o.comments)
    items = _Items(ctx.prefix)
    if ctx.kind == "string":
        if ctx.keyword in ("include", "template"):
            _complete_path(project, ctx, enc, items)
        return items.items
    if ctx.kind == "statement":
        _complete_keywords(project, ctx, items)
    elif ctx.kind == "head":
        _complete_head(project, ctx, items, snippets)
    elif ctx.kind == "key":
        _complete_keys(project, ctx, items, snippets)
        if ctx.at_line_start and ctx.block is not None and ctx.block.close is None:
            _complete_keywords(project, ctx, items)  # perhaps a new statement after an unclosed block
    elif ctx.kind == "value":
        _complete_value(project, ctx, items, snippets)
    return items.items


def _complete_keywords(project: Project, ctx: S.Context, items: _Items) -> None:
    from ..check import grid, spec
    from ..check.checker import keyword

    once = {keyword(c) for c in spec.ONCE + grid.ONCE}  # statements a file holds at most once
    o = project.doc.outline
    if o.is_grid():
        kws = S.GRID_KEYWORDS + ("include",)
    elif o.is_spec():
        kws = S.SPEC_KEYWORDS
    else:
        kws = S.SPEC_KEYWORDS + S.GRID_KEYWORDS
    present = {s.kw for s in o.stmts if s.keyword is not None and s.keyword.start != ctx.prefix_start}
    for kw in kws:
        if kw in once and kw in present:
            continue
        entries = keyword_entry(project.cat, kw)
        doc = "\n\n---\n\n".join(e.markdown() for e in entries) if entries else None
        detail = _first_sentence(entries[0].doc.split(" — ")[0]).strip("`") if entries else None
        items.add(kw, T.CompletionItemKind.Keyword, detail, doc, sort="1")


def _complete_head(project: Project, ctx: S.Context, items: _Items, snippets: bool) -> None:
    cat = project.cat
    kw = ctx.keyword
    head = ctx.head_before()
    h = [t.text for t in head]
    if kw == "task" and not h:
        for e in cat.entries("task"):
            items.entry(e, T.CompletionItemKind.Class, snippets)
    elif kw == "model" and not h:
        for e in cat.entries("model"):
            items.entry(e, T.CompletionItemKind.Class, snippets)
    elif kw == "stage":
        if len(h) == 2 and h[1] == "=":
            for name in ("sft", "grpo"):
                items.entry(cat.get("block", name), T.CompletionItemKind.Class, snippets)
        elif len(h) == 3 and h[1] == "=":
            items.add("from", T.CompletionItemKind.Keyword, "start from another stage's weights")
        elif len(h) == 4 and h[3] == "from":
            for x in project.names("stage"):
                if x.name != h[0]:
                    items.add(x.name, T.CompletionItemKind.Module, _stage_detail(x), _stage_markdown(project, x))
    elif kw == "param":
        if len(h) == 2 and h[1] == ":":
            for t in ("int", "float", "bool", "str"):
                items.add(t, T.CompletionItemKind.TypeParameter, "param type")
        elif len(h) >= 4 and h[3] == "=" and h[2] == "bool":
            _literal(items, ParamSpec("x", "bool"))
    elif kw == "seed":
        _params(project, items, ("int",))
    elif kw in ("axis", "fix") and not h:
        _template_params(project, items)
    elif kw == "where":
        _template_params(project, items)
        items.add("seed", T.CompletionItemKind.Variable, "the cell's seed")
    elif kw == "report":
        for e in cat.entries("metric"):
            items.entry(e, T.CompletionItemKind.Value, snippets)


def _complete_keys(project: Project, ctx: S.Context, items: _Items, snippets: bool) -> None:
    cat = project.cat
    blk = ctx.block
    if blk is None:
        return
    full = _full_block(project.doc.outline, blk)
    present = {e.key.text for e in (full or blk).entries if e.key.start != ctx.prefix_start}
    stmt, path = ctx.stmt, blk.path()
    if stmt is not None and stmt.kw == "roles" and not path:
        from ..check import DEFAULT_ROLES

        for r in DEFAULT_ROLES:
            if r.role not in present:
                rule = f'between("{r.open}", "{r.close}")'
                items.add(
                    r.role, T.CompletionItemKind.Field, f"{r.role} = {rule}", f"a role: `{r.role} = {rule}`", insert=f"{r.role} = {rule}"
                )
        return
    if stmt is not None and stmt.kw == "zip" and not path:
        _template_params(project, items, exclude=present, key=True)
        return
    if stmt is not None and stmt.kw == "stage" and path == ["token_weights"]:  # a grpo stage's role weights
        for r in project.roles():
            if r not in present:
                items.add(r, T.CompletionItemKind.Field, "role weight", f"the weight of `{r}` tokens (1 when not named)", insert=f"{r} = ")
        return
    entry = block_entry(cat, stmt, path, project.task_name())
    if entry is None:
        return
    owner = entry.name
    given = inherited(project, stmt, path)
    for p in entry.params:
        if p.name in present:
            continue
        if p.name in given:
            value = f" = {given[p.name]} (the experiment's task)"
        else:
            value = "" if p.required else f" = {p.default_text()}"
        items.add(
            p.name,
            T.CompletionItemKind.Property,
            p.describe_type() + value,
            spec_markdown(p, owner, given.get(p.name)),
            insert=f"{p.name} = ",
            sort="3" if p.required else "4",
        )
    if stmt.kw == "stage" and not path and "task" not in present:  # the stage's own task settings
        own = block_entry(cat, stmt, ["task"], project.task_name())
        if own is not None and own.params:
            items.add(
                "task",
                T.CompletionItemKind.Module,
                "task settings of this stage",
                own.markdown(inherited(project, stmt, ["task"])),
                insert="task { $0 }" if snippets else "task { ",
                snippet=snippets,
            )
    if stmt.kw == "model" and not path and stmt.name_tok() is not None and stmt.name_tok().text == "hf" and "lora" not in present:
        lora = cat.get("block", "lora")
        items.add(
            "lora",
            T.CompletionItemKind.Module,
            "LoRA adapters",
            lora.markdown() if lora else None,
            insert="lora { $0 }" if snippets else "lora { ",
            snippet=snippets,
        )


def _full_block(o: S.Outline, blk: S.Block) -> S.Block | None:
    """The block of the full-document scan that the cursor scan's block stands for."""
    start = blk.open.start
    for st in o.stmts:
        stack = [st.block] if st.block is not None else []
        while stack:
            b = stack.pop()
            if b.open.start == start:
                return b
            stack.extend(e.block for e in b.entries if e.block is not None)
    return None


def _complete_value(project: Project, ctx: S.Context, items: _Items, snippets: bool) -> None:
    cat = project.cat
    stmt = ctx.stmt
    spec = setting_spec(cat, stmt, ctx.block_path(), ctx.key, project.task_name()) if ctx.block is not None else _head_spec(project, ctx)
    ekind = expr_kind(spec, stmt) if ctx.block is not None else "value"
    if stmt is not None and stmt.kw == "report" and ctx.block is None:
        spec = ParamSpec("report", "metrics")
    if stmt is not None and stmt.kw == "roles" and ctx.block is not None and not ctx.groups:
        for e in cat.entries("role_rule"):
            items.entry(e, T.CompletionItemKind.Function, snippets, call=True)
        return
    # inside brackets: a call's argument or a list's item
    for g in reversed(ctx.groups):
        if g.open.text == "(" and g.func is None:
            continue  # grouping parentheses: the enclosing context decides
        if g.open.text == "[":
            outer = _outer_call(ctx.groups, g)
            if outer is not None:
                fe = function_entry(cat, outer.func, ekind)
                arg = _arg_spec(fe, outer) if fe is not None else None
                if arg is not None:
                    _values(project, items, arg, ekind, snippets)
                return
            if spec is not None and spec.type in ("metrics", "role_group", "roles", "choice_list"):
                _values(project, items, spec, ekind, snippets)
            elif spec is not None and spec.type not in ("str_list",):
                _params(project, items)
            return
        fe = function_entry(cat, g.func, ekind)
        if fe is None:
            _params(project, items)
            return
        arg_tokens = _current_arg(g)
        if not arg_tokens:
            given = {t.text for i, t in enumerate(g.items[:-1]) if t.is_name and g.items[i + 1].text == "="}
            for p in fe.params:
                if not p.variadic and p.name not in given:
                    items.add(
                        f"{p.name} =",
                        T.CompletionItemKind.Property,
                        p.describe_type(),
                        spec_markdown(p, fe.name),
                        insert=f"{p.name} = ",
                        sort="2",
                    )
        arg = _arg_spec(fe, g)
        if arg is not None:
            _values(project, items, arg, ekind, snippets)
        return
    if spec is None:
        _params(project, items)
        if ctx.block is not None and ekind in _FUNC_KINDS:
            for e in cat.entries("schedule"):
                items.entry(e, T.CompletionItemKind.Function, snippets, call=True)
        return
    _values(project, items, spec, ekind, snippets)
    given = inherited(project, stmt, ctx.block_path()).get(ctx.key or "") if ctx.block is not None else None
    if given is not None:
        items.note(given, "the experiment's task sets it")


def _outer_call(groups: list[S.Group], g: S.Group) -> S.Group | None:
    i = groups.index(g)
    if i > 0 and groups[i - 1].open.text == "(" and groups[i - 1].func is not None:
        return groups[i - 1]
    return None


def _current_arg(g: S.Group) -> list[S.Tok]:
    items = g.items
    # tokens after the last top-level comma (nested brackets were folded into open/close tokens)
    depth, start = 0, 0
    for i, t in enumerate(items):
        if t.text in ("(", "["):
            depth += 1
        elif t.text in (")", "]"):
            depth -= 1
        elif t.text == "," and depth <= 0:
            start = i + 1
    return items[start:]


def _arg_spec(fe: Entry, g: S.Group) -> ParamSpec | None:
    cur = _current_arg(g)
    if len(cur) >= 2 and cur[0].is_name and cur[1].text == "=":
        return fe.param(cur[0].text)
    depth, index = 0, 0
    for t in g.items:
        if t.text in ("(", "["):
            depth += 1
        elif t.text in (")", "]"):
            depth -= 1
        elif t.text == "," and depth <= 0:
            index += 1
    positional = list(fe.params)
    for i, p in enumerate(positional):
        if p.variadic and index >= i:
            return p
    return positional[index] if index < len(positional) else None


def _head_spec(project: Project, ctx: S.Context) -> ParamSpec | None:
    stmt = ctx.stmt
    if stmt is None:
        return None
    h = [t.text for t in stmt.head]
    if stmt.kw == "seed":
        return ParamSpec("seed", "int")
    if stmt.kw == "param" and len(h) >= 3:
        return ParamSpec(h[0], h[2] if h[2] in ("int", "float", "bool", "str") else "float")
    if stmt.kw == "report":
        return ParamSpec("report", "metrics")
    return None


def _literal(items: _Items, spec: ParamSpec) -> None:
    if spec.type == "bool":
        items.add("true", T.CompletionItemKind.Constant, "bool", sort="2")
        items.add("false", T.CompletionItemKind.Constant, "bool", sort="2")
    if spec.nullable:
        items.add("none", T.CompletionItemKind.Constant, "decided by the runtime", sort="2")


def _values(project: Project, items: _Items, spec: ParamSpec, ekind: str, snippets: bool) -> None:
    cat = project.cat
    t = spec.type
    _literal(items, spec)
    if t == "loss":
        for e in cat.entries("loss"):
            items.entry(e, T.CompletionItemKind.Function, snippets, call=True, sort="2")
        for e in cat.entries("schedule"):
            items.entry(e, T.CompletionItemKind.Function, snippets, call=True)
        _params(project, items, ("int", "float"))
    elif t == "token_weights":  # `= ngdiff(...)`; the `{ role = weight }` form is a block
        items.entry(cat.get("loss", "ngdiff"), T.CompletionItemKind.Function, snippets, call=True, sort="2")
    elif t == "reward":
        for e in cat.entries("reward"):
            items.entry(e, T.CompletionItemKind.Function, snippets, call=bool(e.params and any(p.required for p in e.params)), sort="2")
        _params(project, items, ("int", "float"))
    elif t == "value":
        for e in cat.entries("schedule"):
            items.entry(e, T.CompletionItemKind.Function, snippets, call=True)
        _params(project, items, ("int", "float"))
    elif t in ("int", "float", "px", "int_range"):
        if ekind in ("loss", "reward") or t == "float":
            _params(project, items, ("int", "float"))
        else:
            _params(project, items, ("int",))
        if spec.choices:
            for c in spec.choices:
                items.add(str(c), T.CompletionItemKind.EnumMember, spec.describe_type(), sort="1")
    elif t == "bool":
        _params(project, items, ("bool",))
    elif t == "stage":  # a `visual` role rule's reference
        for x in project.names("stage"):
            items.add(x.name, T.CompletionItemKind.Module, _stage_detail(x), _stage_markdown(project, x), sort="1")
    elif t == "str":
        _params(project, items, ("str",))
    elif t in ("choice", "choice_list"):
        for c in spec.choices:
            items.add(str(c), T.CompletionItemKind.EnumMember, spec.describe_type(), spec.doc or None, sort="1")
    elif t == "metrics":
        for e in cat.entries("metric"):
            items.entry(e, T.CompletionItemKind.Value, snippets, sort="2")
    elif t in ("roles", "role_group"):
        for r in project.roles():
            decl = project.find("role", r)
            items.add(r, T.CompletionItemKind.Field, "role", _role_markdown(project, r, decl), sort="1")


def _params(project: Project, items: _Items, types: tuple[str, ...] | None = None) -> None:
    for x in project.names("param"):
        ptype = _param_type(x)
        if types is None or ptype in types or ptype is None:
            items.add(x.name, T.CompletionItemKind.Variable, _param_signature(x), _param_markdown(project, x), sort="3")


def _template_params(project: Project, items: _Items, exclude: set[str] | None = None, key: bool = False) -> None:
    exclude = set(exclude or ())
    for x in project.template_params():
        if x.name in exclude:
            continue
        items.add(
            x.name,
            T.CompletionItemKind.Variable,
            _param_signature(x),
            _param_markdown(project, x),
            insert=f"{x.name} = [" if key else None,
            sort="3",
        )


def _complete_path(project: Project, ctx: S.Context, enc: Encoder, items: _Items) -> None:
    tok = ctx.string
    if tok is None:
        return
    typed = project.doc.text[tok.start + 1 : ctx.offset]
    head = typed[: typed.rfind("/") + 1]  # the folders typed so far, with their last `/` ("/" alone: the root)
    folder = project.doc.base / head
    seg_start = tok.start + 1 + len(head)
    lines = project.doc.lines
    rng = enc.range(lines, seg_start, ctx.offset)
    try:
        children = sorted(folder.iterdir())[:500]
    except (OSError, ValueError):  # no such folder, or a NUL in the typed path
        return
    own = project.doc.path.resolve() if project.doc.path is not None else None
    for child in children:
        name = child.name
        if name.startswith("."):
            continue
        if child.is_dir():
            items.add(name + "/", T.CompletionItemKind.Folder, edit=T.TextEdit(range=rng, new_text=name + "/"), sort="2")
        elif name.endswith(".pd") and (own is None or child.resolve() != own):
            items.add(name, T.CompletionItemKind.File, edit=T.TextEdit(range=rng, new_text=name), sort="1")


# ---- declarations: hover text ---------------------------------------------------------------------


def _param_type(x: Decl) -> str | None:
    h = x.stmt.head if x.stmt is not None else []
    return h[2].text if len(h) >= 3 and h[1].text == ":" and h[2].is_name else None


def _param_signature(x: Decl) -> str:
    return x.stmt.head_text(x.doc.text).partition(" ")[2] if x.stmt is not None else x.name


def _where(project: Project, x: Decl) -> str:
    line = x.doc.lines.position(x.tok.start)[0] + 1
    if x.doc is project.doc:
        return f"line {line}"
    return f"`{x.doc.display()}`, line {line}"


def _param_markdown(project: Project, x: Decl) -> str:
    text = f"```percep\n{x.stmt.head_text(x.doc.text) if x.stmt else 'param ' + x.name}\n```"
    note = x.doc.outline.comment_for(x.stmt) if x.stmt is not None else ""
    parts = [text]
    if note:
        parts.append(note)
    parts.append(f"template parameter, declared at {_where(project, x)}; override with `--set {x.name}=...` or a grid axis")
    return "\n\n".join(parts)


def _stage_detail(x: Decl) -> str:
    st = x.stmt
    kind = st.stage_kind().text if st.stage_kind() is not None else "?"
    parent = st.stage_parent()
    return f"{kind} from {parent.text}" if parent is not None else f"{kind} (from the initial model)"


def _stage_markdown(project: Project, x: Decl) -> str:
    st = x.stmt
    parts = [f"```percep\n{st.head_text(x.doc.text)}\n```"]
    kind = st.stage_kind()
    entry = project.cat.get("block", kind.text) if kind is not None and kind.text in ("sft", "grpo") else None
    parent = st.stage_parent()
    what = f"**stage** `{x.name}` — {kind.text if kind else '?'}"
    what += f", starts from stage `{parent.text}`" if parent is not None else ", starts from the initial model"
    parts.append(what)
    if entry is not None:
        parts.append(entry.doc)
    if st.block is not None and st.block.entries:
        parts.append("\n".join(f"- `{e.key.text} = {e.value_text(x.doc.text)}`" for e in st.block.entries if e.op is not None))
    note = x.doc.outline.comment_for(st)
    if note:
        parts.append(note)
    parts.append(f"declared at {_where(project, x)}")
    return "\n\n".join(parts)


def _role_markdown(project: Project, name: str, x: Decl | None) -> str:
    if x is None:
        from ..check import DEFAULT_ROLES

        r = next((r for r in DEFAULT_ROLES if r.role == name), None)
        if r is None:
            return f"**role** `{name}`"
        return (
            f'```percep\n{name} = between("{r.open}", "{r.close}")\n```\n\n'
            f"**role** `{name}` — a default role (the spec has no `roles` block)"
        )
    rule = x.entry.value_text(x.doc.text) if x.entry is not None else ""
    return f"```percep\n{name} = {rule}\n```\n\n**role** `{name}`, declared in the roles block at {_where(project, x)}"


# ---- hover and definition --------------------------------------------------------------------------


def _word_at(o: S.Outline, offset: int) -> S.Tok | None:
    for t in o.tokens:
        if t.start > offset:
            break
        if t.start <= offset <= t.end and (t.is_name or t.is_string):
            if t.end == offset and not t.is_name:
                continue
            return t
    return None


@dataclass
class _Target:
    """What a name at a position refers to."""

    kind: str  # keyword, entry, spec, param, stage, role, template_param, file, none
    entries: list[Entry] = field(default_factory=list)
    spec: ParamSpec | None = None
    owner: str = ""
    decl: Decl | None = None
    name: str = ""
    path: Path | None = None
    given: dict[str, str] = field(default_factory=dict)  # in a stage's `task { ... }`: what it inherits (`inherited`)


def _resolve(project: Project, offset: int) -> tuple[S.Tok | None, _Target]:
    doc, cat = project.doc, project.cat
    o = doc.outline
    tok = _word_at(o, offset)
    if tok is None:
        return None, _Target("none")
    ctx = S.context_at(doc.text, tok.start, o.tokens, o.comments)
    if tok.is_string:
        stmt = _stmt_at(o, tok.start)
        if stmt is not None and stmt.kw in ("include", "template"):
            return tok, _Target("file", path=doc.target(stmt), name=tok.string_value())
        return tok, _Target("none")
    word = tok.text
    i = o.tokens.index(tok)
    nxt = o.tokens[i + 1] if i + 1 < len(o.tokens) else None
    k = ctx.kind
    if k == "statement" and word in S.STATEMENT_KEYWORDS:
        return tok, _Target("keyword", keyword_entry(cat, word), name=word)
    if k == "head":
        stmt = ctx.stmt
        h = [t.text for t in ctx.head_before()]
        kw = stmt.kw if stmt is not None else ""
        if kw == "task" and not h:
            return tok, _Target("entry", [e for e in [cat.get("task", word)] if e], name=word)
        if kw == "model" and not h:
            return tok, _Target("entry", [e for e in [cat.get("model", word)] if e], name=word)
        if kw == "stage":
            if not h or (h and h[-1] == "from"):
                return tok, _decl_target(project, "stage", word)
            if len(h) == 2 and h[1] == "=":
                return tok, _Target("entry", [e for e in [cat.get("block", word)] if e and word in ("sft", "grpo")], name=word)
            return tok, _Target("none")
        if kw == "param" and (not h or (len(h) > 3 and h[3] == "=")):
            return tok, _decl_target(project, "param", word)
        if kw in ("axis", "fix") and not h:
            return tok, _template_target(project, word)
        if kw == "where":
            return tok, _template_target(project, word)
    if k == "key" and ctx.block is not None:
        stmt, path = ctx.stmt, ctx.block.path()
        if stmt is not None and stmt.kw == "roles" and not path:
            return tok, _decl_target(project, "role", word)
        if stmt is not None and stmt.kw == "zip" and not path:
            return tok, _template_target(project, word)
        if stmt is not None and stmt.kw == "stage" and path == ["token_weights"]:  # a grpo stage's role weights
            return tok, _decl_target(project, "role", word)
        if word == "lora" and stmt is not None and stmt.kw == "model" and nxt is not None and nxt.text == "{":
            return tok, _Target("entry", [e for e in [cat.get("block", "lora")] if e], name=word)
        if word == "task" and stmt is not None and stmt.kw == "stage" and not path and nxt is not None and nxt.text == "{":
            entry = block_entry(cat, stmt, ["task"], project.task_name())
            return tok, _Target("entry", [entry] if entry else [], name=word, given=inherited(project, stmt, ["task"]))
        entry = block_entry(cat, stmt, path, project.task_name())
        spec = entry.param(word) if entry is not None else None
        if spec is not None:
            return tok, _Target("spec", spec=spec, owner=entry.name, name=word, given=inherited(project, stmt, path))
        return tok, _Target("none")
    if k in ("value", "head"):
        stmt = ctx.stmt
        spec = (
            setting_spec(cat, stmt, ctx.block_path(), ctx.key, project.task_name()) if ctx.block is not None else _head_spec(project, ctx)
        )
        ekind = expr_kind(spec, stmt) if ctx.block is not None else "value"
        call = next((g for g in reversed(ctx.groups) if g.open.text == "(" and g.func is not None), None)
        if call is not None and nxt is not None and nxt.text == "=":
            fe = function_entry(cat, call.func, ekind)
            if fe is not None and fe.param(word) is not None:
                return tok, _Target("spec", spec=fe.param(word), owner=fe.name, name=word)
        if project.find("param", word) is not None:
            return tok, _decl_target(project, "param", word)
        if project.doc.outline.is_grid() and stmt is not None and stmt.kw in ("where", "axis", "fix"):
            t = _template_target(project, word)
            if t.decl is not None:
                return tok, t
        call_entry = function_entry(cat, call.func, ekind) if call is not None else None
        in_roles_arg = call_entry is not None and call_entry.kind == "loss"
        if (in_roles_arg or (spec is not None and spec.type in ("roles", "role_group"))) and word in project.roles():
            return tok, _decl_target(project, "role", word)
        if spec is not None and spec.type in ("choice", "choice_list") and word in spec.choices:
            given = inherited(project, stmt, ctx.block_path()) if ctx.block is not None else {}
            return tok, _Target("spec", spec=spec, owner=_owner_name(project, ctx), name=word, given=given)
        if nxt is not None and nxt.text == "(":
            fe = function_entry(cat, word, ekind)
            if fe is not None:
                return tok, _Target("entry", [fe], name=word)
        kinds = {"loss": ("loss", "schedule"), "reward": ("reward", "schedule"), "rule": ("role_rule",)}.get(ekind, ("schedule",))
        if spec is not None and spec.type == "metrics" or (stmt is not None and stmt.kw == "report"):
            kinds = ("metric",)
        found = [e for kd in kinds for e in [cat.get(kd, word)] if e]
        if found:
            return tok, _Target("entry", found, name=word)
    # anything else: a declared name, then the catalogue
    for kind in ("param", "stage", "role"):
        if project.find(kind, word) is not None:
            return tok, _decl_target(project, kind, word)
    return tok, _Target("entry", [e for e in cat.lookup(word) if e.kind != "keyword" or k == "statement"], name=word)


def _owner_name(project: Project, ctx: S.Context) -> str:
    e = block_entry(project.cat, ctx.stmt, ctx.block_path(), project.task_name())
    return e.name if e is not None else ""


def _stmt_at(o: S.Outline, offset: int) -> S.Stmt | None:
    return next((s for s in o.stmts if s.start <= offset <= s.end), None)


def _decl_target(project: Project, kind: str, name: str) -> _Target:
    decl = project.find(kind, name)
    if kind == "role" and decl is None and name not in project.roles():
        return _Target("none")
    return _Target(kind, decl=decl, name=name)


def _template_target(project: Project, name: str) -> _Target:
    decl = next((x for x in project.template_params() if x.name == name), None)
    return _Target("template_param" if decl is not None else "none", decl=decl, name=name)


def hover(project: Project, offset: int, enc: Encoder) -> T.Hover | None:
    tok, tgt = _resolve(project, offset)
    if tok is None:
        return None
    md = None
    if tgt.kind in ("keyword", "entry") and tgt.entries:
        md = "\n\n---\n\n".join(e.markdown(tgt.given) for e in tgt.entries)
    elif tgt.kind == "spec" and tgt.spec is not None:
        md = spec_markdown(tgt.spec, tgt.owner, tgt.given.get(tgt.spec.name))
        if tgt.spec.type in ("choice", "choice_list") and tgt.name in tgt.spec.choices:
            md = f"`{tgt.name}` — one of the choices of `{tgt.spec.name}`\n\n" + md
    elif tgt.kind in ("param", "template_param") and tgt.decl is not None:
        md = _param_markdown(project, tgt.decl)
    elif tgt.kind == "stage" and tgt.decl is not None:
        md = _stage_markdown(project, tgt.decl)
    elif tgt.kind == "role":
        md = _role_markdown(project, tgt.name, tgt.decl)
    elif tgt.kind == "file" and tgt.path is not None:
        exists = is_file(tgt.path)
        md = f"`{tgt.path}`" + ("" if exists else " — **does not exist**")
    if not md:
        return None
    return T.Hover(contents=_doc_md(md), range=enc.range(project.doc.lines, tok.start, tok.end))


def definition(project: Project, offset: int, enc: Encoder) -> list[T.Location]:
    tok, tgt = _resolve(project, offset)
    if tok is None:
        return []
    if tgt.kind == "file" and tgt.path is not None:
        if not is_file(tgt.path):
            return []
        return [
            T.Location(uri=path_uri(tgt.path), range=T.Range(start=T.Position(line=0, character=0), end=T.Position(line=0, character=0)))
        ]
    if tgt.decl is not None:
        loc = tgt.decl.doc.location(tgt.decl.tok.start, tgt.decl.tok.end, enc)
        return [loc] if loc is not None else []
    return []


# ---- outline -------------------------------------------------------------------------------------

_SYMBOL_KIND = {
    "experiment": T.SymbolKind.Module,
    "grid": T.SymbolKind.Module,
    "param": T.SymbolKind.Variable,
    "seed": T.SymbolKind.Constant,
    "include": T.SymbolKind.File,
    "template": T.SymbolKind.File,
    "task": T.SymbolKind.Class,
    "model": T.SymbolKind.Class,
    "roles": T.SymbolKind.Namespace,
    "stage": T.SymbolKind.Function,
    "eval": T.SymbolKind.Object,
    "trainer": T.SymbolKind.Object,
    "axis": T.SymbolKind.Array,
    "zip": T.SymbolKind.Namespace,
    "seeds": T.SymbolKind.Array,
    "where": T.SymbolKind.Boolean,
    "report": T.SymbolKind.Array,
    "fix": T.SymbolKind.Constant,
}


def _statement_detail(kw: str, st, doc) -> str:
    """The outline's detail text for one statement (what follows its keyword)."""
    if kw == "param":
        return st.head_text(doc.text).partition(":")[2].strip()
    if kw in ("stage", "axis", "fix"):
        return " ".join(t.text for t in st.head[2:])
    if kw == "model":
        return st.string_tok().string_value() if st.string_tok() else ""
    if kw in ("seed", "seeds", "where", "report"):
        return " ".join(t.text for t in st.head)
    return ""


def document_symbols(doc: Doc, enc: Encoder) -> list[T.DocumentSymbol]:
    o = doc.outline
    lines = o.lines
    out: list[T.DocumentSymbol] = []
    for st in o.stmts:
        if st.keyword is None:
            continue
        kw = st.kw
        name_tok = st.name_tok()
        if kw in ("experiment", "grid", "param", "task", "model", "stage", "axis", "fix") and name_tok is not None:
            name, sel = name_tok.text, name_tok
        elif kw in ("include", "template") and st.string_tok() is not None:
            name, sel = st.string_tok().string_value() or kw, st.string_tok()
        else:
            name, sel = kw, st.keyword
        detail = _statement_detail(kw, st, doc)
        if kw in ("experiment", "grid", "task", "model", "stage", "include", "template", "roles", "eval", "trainer", "zip"):
            detail = f"{kw} {detail}".strip() if kw not in ("experiment", "grid", "include", "template") else kw
        end = max(st.end, sel.end)
        children = _block_symbols(doc, st.block, enc, roles=(kw == "roles")) if st.block is not None else None
        out.append(
            T.DocumentSymbol(
                name=name or kw,
                kind=_SYMBOL_KIND.get(kw, T.SymbolKind.Object),
                detail=detail or None,
                range=enc.range(lines, st.start, end),
                selection_range=enc.range(lines, sel.start, sel.end),
                children=children or None,
            )
        )
    return out


def _block_symbols(doc: Doc, blk: S.Block, enc: Encoder, roles: bool = False) -> list[T.DocumentSymbol]:
    out = []
    for e in blk.entries:
        if not e.key.is_name:
            continue
        kids = _block_symbols(doc, e.block, enc) if e.block is not None else None
        kind = T.SymbolKind.Field if roles else (T.SymbolKind.Namespace if e.block is not None else T.SymbolKind.Property)
        end = max(e.end, e.key.end)
        out.append(
            T.DocumentSymbol(
                name=e.key.text,
                kind=kind,
                detail=e.value_text(doc.text) or None,
                range=enc.range(doc.lines, e.start, end),
                selection_range=enc.range(doc.lines, e.key.start, e.key.end),
                children=kids or None,
            )
        )
    return out


__all__ = [
    "Encoder",
    "Doc",
    "Project",
    "Decl",
    "read_disk",
    "lsp_diagnostics",
    "quick_fixes",
    "format_edits",
    "complete",
    "hover",
    "definition",
    "document_symbols",
    "path_uri",
]
