"""The canonical form of a spec (`percep fmt`).

Printed from the AST, so it is idempotent, and it preserves comments: each comment
is attached to the statement or block entry it trails, or precedes, or to the end
of its block. A block is printed on one line when it has no comments and fits in
`WIDTH` columns, otherwise one entry per line. Single blank lines between
statements and entries are kept. Numbers and strings keep their spelling, and lines
end as the source's first line does (CRLF or LF).
"""

from __future__ import annotations

from . import nodes as A

WIDTH = 88
INDENT = "  "

# Binding strength, loosest first; a child binding looser than its parent gets parentheses.
_PREC = {A.BoolOp: 1, A.Not: 3, A.Compare: 4, A.Range: 5, A.Sum: 6, A.Product: 7, A.Signed: 8}


def _prec(e: A.Expr) -> int:
    if isinstance(e, A.BoolOp):
        return 1 if e.op == "or" else 2
    return _PREC.get(type(e), 9)


def expr(e: A.Expr) -> str:
    if isinstance(e, (A.Number, A.Dimension, A.String)):
        return e.text
    if isinstance(e, A.Bool):
        return "true" if e.value else "false"
    if isinstance(e, A.NoneLit):
        return "none"
    if isinstance(e, A.Name):
        return e.id
    if isinstance(e, A.ListExpr):
        return "[" + ", ".join(expr(i) for i in e.items) + "]"
    if isinstance(e, A.Call):
        args = [expr(a) for a in e.args] + [f"{k.name.id} = {expr(k.value)}" for k in e.kwargs]
        return f"{e.func.id}({', '.join(args)})"
    if isinstance(e, A.Range):
        return f"{_child(e.lo, e, True)}..{_child(e.hi, e, True)}"
    if isinstance(e, (A.Sum, A.Product)):
        out = _child(e.first, e, True)
        for op, rhs in e.rest:
            out += f" {op} {_child(rhs, e, True)}"
        return out
    if isinstance(e, A.Signed):
        return e.signs + _child(e.operand, e, True)
    if isinstance(e, A.Compare):
        return f"{_child(e.left, e, True)} {e.op} {_child(e.right, e, True)}"
    if isinstance(e, A.BoolOp):
        return f" {e.op} ".join(_child(v, e, True) for v in e.values)
    if isinstance(e, A.Not):
        return "not " + _child(e.operand, e, False)
    raise AssertionError(type(e))


def _child(c: A.Expr, parent: A.Expr, strict_same: bool) -> str:
    """Parenthesise a child that binds looser than its parent, or equally (chains are n-ary,
    so a nested chain of the same kind only exists because the source had parentheses)."""
    pc, pp = _prec(c), _prec(parent)
    if pc < pp or (strict_same and pc == pp and pc < 9 and not isinstance(parent, A.Not)):
        return f"({expr(c)})"
    return expr(c)


class _Comments:
    """Attaches each comment to a statement, an entry, a block opening or a container end."""

    def __init__(self, tree: A.File, source: str):
        self.leading: dict[int, list[str]] = {}
        self.trailing: dict[int, list[str]] = {}
        self.opening: dict[int, list[str]] = {}
        self.end: dict[int, list[str]] = {}
        self.first_line: dict[int, int] = {}  # slot → line of its first leading comment
        lines = source.split("\n")
        slots: list[A.Node] = []
        containers: list[tuple[A.Node, tuple]] = [(tree, tree.items)]
        for st in tree.items:
            slots.append(st)
            self._blocks(st, containers, slots)
        for c in tree.comments:
            line_text = lines[c.line - 1] if c.line - 1 < len(lines) else ""
            own_line = line_text[: c.column - 1].strip() == ""
            if not own_line:
                ending = [s for s in slots if s.span.end_line == c.line and s.span.end_column <= c.column]
                if ending:
                    target = max(ending, key=lambda s: (s.span.end_line - s.span.line, s.span.end_column - s.span.column))
                    self.trailing.setdefault(id(target), []).append(c.text)
                    continue
                opening = [b for b, _ in containers[1:] if b.span.line == c.line and b.span.end_line > c.line]
                if opening:
                    self.opening.setdefault(id(max(opening, key=lambda b: b.span.column)), []).append(c.text)
                    continue
                holders = [s for s in slots if s.span.line <= c.line <= s.span.end_line]
                if holders:
                    target = min(holders, key=lambda s: (s.span.end_line - s.span.line, s.span.end_column))
                    self.trailing.setdefault(id(target), []).append(c.text)
                    continue
            inside = [(b, items) for b, items in containers[1:] if b.span.line < c.line < b.span.end_line]
            holder, items = min(inside, key=lambda x: x[0].span.end_line - x[0].span.line) if inside else containers[0]
            nxt = next((s for s in items if s.span.line > c.line), None)
            if nxt is not None:
                self.leading.setdefault(id(nxt), []).append(c.text)
                self.first_line.setdefault(id(nxt), c.line)
            else:
                self.end.setdefault(id(holder), []).append(c.text)

    def _blocks(self, node, containers, slots) -> None:
        blk = getattr(node, "block", None)
        if isinstance(blk, A.Block):
            containers.append((blk, blk.entries))
            for e in blk.entries:
                slots.append(e)
                self._blocks(e, containers, slots)

    def has_any(self, blk: A.Block) -> bool:
        if id(blk) in self.opening or id(blk) in self.end:
            return True
        for e in blk.entries:
            if id(e) in self.leading or id(e) in self.trailing:
                return True
            if isinstance(e, A.SubBlock) and self.has_any(e.block):
                return True
        return False


class _Printer:
    def __init__(self, tree: A.File, source: str):
        self.c = _Comments(tree, source)

    def file(self, tree: A.File) -> str:
        out: list[str] = []
        self._items(tree.items, out, "", lambda st, ind: self.statement(st, ind))
        for text in self.c.end.get(id(tree), []):
            out.append(text)
        return "\n".join(out).rstrip("\n") + "\n" if out else ""

    def _items(self, items, out: list[str], indent: str, render) -> None:
        prev_end = None
        for item in items:
            start = self.c.first_line.get(id(item), item.span.line)
            if prev_end is not None and start - prev_end > 1:
                out.append("")
            for text in self.c.leading.get(id(item), []):
                out.append(indent + text)
            lines = render(item, indent)
            trailing = self.c.trailing.get(id(item))
            if trailing:
                lines[-1] += "  " + "  ".join(trailing)
            out.extend(lines)
            prev_end = item.span.end_line

    def statement(self, st: A.Statement, indent: str) -> list[str]:
        if isinstance(st, A.Experiment):
            return [f"experiment {st.name.id}"]
        if isinstance(st, A.Grid):
            return [f"grid {st.name.id}"]
        if isinstance(st, A.Param):
            default = f" = {expr(st.default)}" if st.default is not None else ""
            return [f"param {st.name.id}: {st.type.id}{default}"]
        if isinstance(st, A.Seed):
            return [f"seed {expr(st.value)}"]
        if isinstance(st, A.Seeds):
            return [f"seeds {expr(st.value)}"]
        if isinstance(st, A.Include):
            return [f"include {st.path.text}"]
        if isinstance(st, A.Template):
            return [f"template {st.path.text}"]
        if isinstance(st, A.Axis):
            return [f"axis {st.name.id} = {expr(st.value)}"]
        if isinstance(st, A.Fix):
            return [f"fix {st.name.id} = {expr(st.value)}"]
        if isinstance(st, A.Where):
            return [f"where {expr(st.condition)}"]
        if isinstance(st, A.Report):
            return [f"report {expr(st.value)}"]
        if isinstance(st, A.Task):
            return self.block(f"task {st.name.id}", st.block, indent)
        if isinstance(st, A.Model):
            head = f"model {st.kind.id}" + (f" {st.path.text}" if st.path else "")
            return self.block(head, st.block, indent) if st.block is not None else [head]
        if isinstance(st, A.Roles):
            return self.block("roles", st.block, indent, inline=False)
        if isinstance(st, A.Stage):
            head = f"stage {st.name.id} = {st.kind.id}" + (f" from {st.parent.id}" if st.parent else "")
            return self.block(head, st.block, indent)
        if isinstance(st, A.Eval):
            return self.block("eval", st.block, indent)
        if isinstance(st, A.Trainer):
            return self.block("trainer", st.block, indent)
        if isinstance(st, A.Zip):
            return self.block("zip", st.block, indent)
        raise AssertionError(type(st))

    def entry(self, e, indent: str) -> list[str]:
        if isinstance(e, A.Setting):
            return [f"{indent}{e.key.id} = {expr(e.value)}"]
        return self.block(f"{indent}{e.key.id}", e.block, indent)

    def inline(self, blk: A.Block) -> str:
        parts = [f"{e.key.id} = {expr(e.value)}" if isinstance(e, A.Setting) else f"{e.key.id} {self.inline(e.block)}" for e in blk.entries]
        return "{ " + ", ".join(parts) + " }" if parts else "{}"

    def block(self, head: str, blk: A.Block, indent: str, inline: bool = True) -> list[str]:
        if not blk.entries and not self.c.has_any(blk):
            return [f"{head} {{}}"]
        if inline and not self.c.has_any(blk):
            one = f"{head} {self.inline(blk)}"
            if len(one) <= WIDTH:
                return [one]
        opening = self.c.opening.get(id(blk))
        lines = [f"{head} {{" + ("  " + "  ".join(opening) if opening else "")]
        inner = indent + INDENT
        body: list[str] = []
        self._items(blk.entries, body, inner, lambda e, ind: self.entry(e, ind))
        lines += body
        lines += [inner + t for t in self.c.end.get(id(blk), [])]
        lines.append(f"{indent}}}")
        return lines


def format_tree(tree: A.File, source: str) -> str:
    return _Printer(tree, source).file(tree)


def format_text(text: str, file: str = "<string>"):
    """Canonical text, or None with the syntax diagnostics if the text does not parse.

    Lines end as the text's first line does (`\\r\\n` or `\\n`): an editor keeps a document's line
    endings when it applies a formatting edit, so CRLF output for a CRLF document is what makes
    formatting it again change nothing (strings and comments hold no line break)."""
    from .parse import parse_text

    tree, diags = parse_text(text, file)
    if tree is None:
        return None, diags
    out = format_tree(tree, text)
    first = text.find("\n")
    if first > 0 and text[first - 1] == "\r":
        out = out.replace("\n", "\r\n")
    return out, diags
