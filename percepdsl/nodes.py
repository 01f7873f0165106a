"""Typed AST of spec and grid files. Every node carries the `Span` it came from.

Operator chains are n-ary (`Sum`, `Product`) so that tree depth follows bracket
nesting only; the formatter prints nested chains with parentheses, which makes
parse → format → parse a fixed point.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .diagnostics import Span


@dataclass(frozen=True)
class Node:
    span: Span


# ---- expressions ----------------------------------------------------------------


@dataclass(frozen=True)
class Number(Node):
    value: int | float
    text: str


@dataclass(frozen=True)
class Dimension(Node):
    value: int | float
    unit: str  # "px" | "%"
    text: str


@dataclass(frozen=True)
class String(Node):
    value: str
    text: str  # as written, quotes and escapes included


@dataclass(frozen=True)
class Bool(Node):
    value: bool


@dataclass(frozen=True)
class NoneLit(Node):
    pass


@dataclass(frozen=True)
class Name(Node):
    id: str


@dataclass(frozen=True)
class ListExpr(Node):
    items: tuple[Expr, ...]


@dataclass(frozen=True)
class Range(Node):
    lo: Expr
    hi: Expr


@dataclass(frozen=True)
class Kwarg(Node):
    name: Name
    value: Expr


@dataclass(frozen=True)
class Call(Node):
    func: Name
    args: tuple[Expr, ...]
    kwargs: tuple[Kwarg, ...]


@dataclass(frozen=True)
class Sum(Node):
    """first (+|-) rest[0] (+|-) rest[1] ..."""

    first: Expr
    rest: tuple[tuple[str, Expr], ...]


@dataclass(frozen=True)
class Product(Node):
    first: Expr
    rest: tuple[tuple[str, Expr], ...]


@dataclass(frozen=True)
class Signed(Node):
    signs: str  # e.g. "-" or "--"
    operand: Expr


@dataclass(frozen=True)
class Compare(Node):
    left: Expr
    op: str
    right: Expr


@dataclass(frozen=True)
class BoolOp(Node):
    op: str  # "and" | "or"
    values: tuple[Expr, ...]


@dataclass(frozen=True)
class Not(Node):
    operand: Expr


Expr = Number | Dimension | String | Bool | NoneLit | Name | ListExpr | Range | Call | Sum | Product | Signed | Compare | BoolOp | Not


# ---- blocks ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting(Node):
    key: Name
    value: Expr


@dataclass(frozen=True)
class SubBlock(Node):
    key: Name
    block: Block


@dataclass(frozen=True)
class Block(Node):
    entries: tuple[Setting | SubBlock, ...]

    def get(self, key: str) -> Setting | SubBlock | None:
        for e in self.entries:
            if e.key.id == key:
                return e
        return None


# ---- statements -------------------------------------------------------------------------


@dataclass(frozen=True)
class Experiment(Node):
    name: Name


@dataclass(frozen=True)
class Param(Node):
    name: Name
    type: Name
    default: Expr | None


@dataclass(frozen=True)
class Seed(Node):
    value: Expr


@dataclass(frozen=True)
class Include(Node):
    path: String


@dataclass(frozen=True)
class Task(Node):
    name: Name
    block: Block


@dataclass(frozen=True)
class Model(Node):
    kind: Name
    path: String | None
    block: Block | None


@dataclass(frozen=True)
class Roles(Node):
    block: Block


@dataclass(frozen=True)
class Stage(Node):
    name: Name
    kind: Name
    parent: Name | None
    block: Block


@dataclass(frozen=True)
class Eval(Node):
    block: Block


@dataclass(frozen=True)
class Trainer(Node):
    block: Block


@dataclass(frozen=True)
class Grid(Node):
    name: Name


@dataclass(frozen=True)
class Template(Node):
    path: String


@dataclass(frozen=True)
class Axis(Node):
    name: Name
    value: Expr


@dataclass(frozen=True)
class Zip(Node):
    block: Block


@dataclass(frozen=True)
class Seeds(Node):
    value: Expr


@dataclass(frozen=True)
class Where(Node):
    condition: Expr


@dataclass(frozen=True)
class Report(Node):
    value: Expr


@dataclass(frozen=True)
class Fix(Node):
    name: Name
    value: Expr


Statement = (
    Experiment
    | Param
    | Seed
    | Include
    | Task
    | Model
    | Roles
    | Stage
    | Eval
    | Trainer
    | Grid
    | Template
    | Axis
    | Zip
    | Seeds
    | Where
    | Report
    | Fix
)


@dataclass(frozen=True)
class Comment:
    line: int
    column: int
    text: str  # including the leading '#'


@dataclass(frozen=True)
class File(Node):
    items: tuple[Statement, ...]
    comments: tuple[Comment, ...] = field(default=())
