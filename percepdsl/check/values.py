"""Values: expressions evaluated to typed values, and values coerced to catalogue types.

`Evaluator.eval` turns an expression into a `Value` (a number, a schedule, a loss, a
reward, a role rule, ...) in one of four contexts (a setting value, a loss, a reward, a
role rule), folding params into constants and the arithmetic of schedules, losses and
rewards into their IR. `Evaluator.coerce` checks a value against a catalogue parameter
type and range and returns what goes into the IR. Both report problems and return `None`
for a value that failed, which is not complained about twice.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

from .. import nodes as A
from ..catalogue import Catalogue, Entry, ParamSpec, plural
from ..diagnostics import Related, Reporter, Span, did_you_mean
from ..ir import ConstantSchedule, CosineSchedule, LinearSchedule, LossTerm, MixLoss, NGDiffLoss, RewardIR, StepSchedule, TokenMeanLoss

IMPLICIT_ROLE = "other"  # uncovered characters when no `rest` rule is declared


def show(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.6g}"
    return str(x)


# ---- typed values ---------------------------------------------------------------------------
# Built once and never changed (`dataclasses.replace` makes a moved copy). Compared by
# identity: plain dataclasses, because `percep check` creates these classes at every start.


@dataclass(eq=False)
class Value:
    span: Span
    origin: Related | None = field(default=None, kw_only=True)  # how an overridden param got here ("`lam` = 1.5, set by --set")

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(eq=False)
class Num(Value):
    value: int | float

    def describe(self) -> str:
        return f"the number {show(self.value)}"


@dataclass(eq=False)
class Str(Value):
    value: str

    def describe(self) -> str:
        return f'the string "{self.value}"'


@dataclass(eq=False)
class Bool(Value):
    value: bool

    def describe(self) -> str:
        return f"`{str(self.value).lower()}`"


@dataclass(eq=False)
class Null(Value):
    def describe(self) -> str:
        return "`none`"


@dataclass(eq=False)
class Dim(Value):
    """A size with a unit: `64px`, `50%`."""

    value: int | float
    unit: str

    def describe(self) -> str:
        return f"the size `{show(self.value)}{self.unit}`"


@dataclass(eq=False)
class Range(Value):
    lo: int
    hi: int

    def describe(self) -> str:
        return "a range"


@dataclass(eq=False)
class List(Value):
    items: tuple[Value, ...]

    def describe(self) -> str:
        return "a list"


@dataclass(eq=False)
class Sym(Value):
    """A bare name that is not a param: a role, a choice, a metric, or a mistake."""

    name: str

    def describe(self) -> str:
        return f"the name `{self.name}`"


@dataclass(frozen=True)
class SchedArgs:
    """A schedule as the checker folds it (scaled and offset by arithmetic); `to_ir` gives the
    IR's typed schedule of its kind. `end` is None for `step`, `factor` and `every` for the others."""

    kind: str
    start: float
    end: float | None = None
    factor: float | None = None
    every: int | None = None
    warmup: int = 0

    def to_ir(self) -> ConstantSchedule | LinearSchedule | CosineSchedule | StepSchedule:
        if self.kind == "constant":
            return ConstantSchedule(value=self.start, warmup=self.warmup)
        if self.kind == "step":
            return StepSchedule(start=self.start, factor=self.factor, every=self.every, warmup=self.warmup)
        cls = LinearSchedule if self.kind == "linear" else CosineSchedule
        return cls(start=self.start, end=self.end, warmup=self.warmup)


@dataclass(eq=False)
class Sched(Value):
    schedule: SchedArgs

    def describe(self) -> str:
        return "a schedule"


@dataclass(eq=False)
class Term:
    """One weighted term of a loss: `weight * mean(roles)`; roles None is every token."""

    weight: float | SchedArgs
    roles: tuple[str, ...] | None
    span: Span


@dataclass(eq=False)
class Loss(Value):
    """A weighted sum of per-role token means."""

    terms: tuple[Term, ...]

    def describe(self) -> str:
        return "a loss"


@dataclass(eq=False)
class NGDiff(Value):
    """`ngdiff(groups...)`: balances its groups' gradients itself, so it is a whole loss."""

    groups: tuple[tuple[str, ...], ...]
    options: dict[str, Any]  # the entry's other arguments (auto_lr, norm_every, ...), checked

    def describe(self) -> str:
        return "a loss"


@dataclass(eq=False)
class Reward(Value):
    reward: RewardIR

    def describe(self) -> str:
        return "a reward"


@dataclass(eq=False)
class Rule(Value):
    """A role rule without its role: `between("<a>", "</a>")`, `regex(...)`, `rest()`."""

    kind: str
    args: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return "a role rule"


# ---- what names refer to -------------------------------------------------------------------


@dataclass
class ParamInfo:
    decl: A.Param
    type: str
    value: Any
    origin: str  # "default" | "--set" | "grid"
    used: bool = False


@dataclass
class Scope:
    """The names an expression can use: params, and the roles a loss can weight."""

    params: dict[str, ParamInfo] = field(default_factory=dict)
    roles: dict[str, Span | None] = field(default_factory=dict)  # role → its declaration (None: a default role)
    has_rest: bool = False

    def all_roles(self) -> list[str]:
        return list(self.roles) + ([] if self.has_rest else [IMPLICIT_ROLE])


def default_value(p: ParamSpec) -> Any:
    """A catalogue default as the IR holds it."""
    if p.type == "loss" and p.default == "token_mean":
        return TokenMeanLoss()
    return p.ir_default()


def _range_hint(spec: ParamSpec, x: float) -> str | None:
    if spec.min is not None and spec.max is not None and (spec.min, spec.max) == (0, 1):
        return "probabilities and weights are between 0 and 1"
    if spec.min == 1 and x < 1:  # above the maximum, "positive" would be no help
        return "counts and sizes are positive"
    return None


def _type_hint(spec: ParamSpec, v: Value) -> str | None:
    if spec.type == "px" and isinstance(v, Num):
        return None
    if spec.type in ("int", "px") and isinstance(v, Num) and isinstance(v.value, float):
        return f"write a whole number, e.g. {round(v.value)}"
    if spec.type == "str" and isinstance(v, Sym):
        return f'strings are quoted: "{v.name}"'
    if spec.type == "value" and isinstance(v, Sym):
        return f"`{v.name}` is not a declared param"
    return None


LITERALS = (A.Number, A.String, A.Bool, A.Signed, A.Dimension, A.NoneLit)
_ARITH = {"+": lambda p, q: p + q, "-": lambda p, q: p - q, "*": lambda p, q: p * q, "/": lambda p, q: p / q}


# ---- evaluation and coercion ----------------------------------------------------------------


class Evaluator:
    """Evaluates expressions against a scope and a catalogue, reporting to `report`."""

    def __init__(self, cat: Catalogue, scope: Scope, report: Reporter):
        self.cat = cat
        self.scope = scope
        self.report = report

    def error(self, span: Span, code: str, message: str, hint: str | None = None, related=()) -> None:
        self.report.error(span, code, message, hint, related)

    # -- expressions
    def eval(self, e: A.Expr, ctx: str) -> Value | None:
        """Evaluate an expression in a context: value, loss, reward or rule."""
        if isinstance(e, A.Number):
            return Num(e.span, e.value)
        if isinstance(e, A.Dimension):
            return Dim(e.span, e.value, e.unit)
        if isinstance(e, A.String):
            return Str(e.span, e.value)
        if isinstance(e, A.Bool):
            return Bool(e.span, e.value)
        if isinstance(e, A.NoneLit):
            return Null(e.span)
        if isinstance(e, A.Name):
            return self._name(e, ctx)
        if isinstance(e, A.ListExpr):
            items = [self.eval(i, ctx) for i in e.items]
            return None if any(i is None for i in items) else List(e.span, tuple(items))
        if isinstance(e, A.Range):
            lo, hi = self.eval(e.lo, "value"), self.eval(e.hi, "value")
            if lo is None or hi is None:
                return None
            for b in (lo, hi):
                if not isinstance(b, Num) or not float(b.value).is_integer():
                    self.error(b.span, "type", f"range bounds are integers, got {b.describe()}", None)
                    return None
            lo_i, hi_i = int(lo.value), int(hi.value)
            if lo_i > hi_i:  # every use (a task's size range, seeds, an axis) would get nothing from it
                self.error(e.span, "out-of-range", f"range {lo_i}..{hi_i} is empty", f"ranges count up: write {hi_i}..{lo_i}")
                return None
            return Range(e.span, lo_i, hi_i)
        if isinstance(e, A.Call):
            return self._call(e, ctx)
        if isinstance(e, (A.Sum, A.Product)):
            acc = self.eval(e.first, ctx)
            for op, rhs in e.rest:
                r = self.eval(rhs, ctx)
                if acc is None or r is None:
                    acc = None
                    continue
                acc = self._binop(op, acc, r, e.span, ctx)
            return acc
        if isinstance(e, A.Signed):
            v = self.eval(e.operand, ctx)
            if v is None or e.signs.count("-") % 2 == 0:
                return v if v is None else replace(v, span=e.span)
            return self._binop("*", Num(e.span, -1), v, e.span, ctx, sign=True)
        if isinstance(e, (A.Compare, A.BoolOp, A.Not)):
            self.error(e.span, "type", "comparisons and `and`/`or`/`not` only appear in a grid's `where` filter", None)
            return None
        raise AssertionError(type(e))

    def _name(self, e: A.Name, ctx: str) -> Value | None:
        name = e.id
        if name in self.scope.params:
            info = self.scope.params[name]
            info.used = True
            if info.value is None:
                return None
            origin = (
                Related.at(info.decl.name.span, f"`{name}` = {show(info.value)}, set by {info.origin}")
                if info.origin != "default"
                else None
            )
            if info.type == "bool":
                return Bool(e.span, info.value, origin=origin)
            if info.type == "str":
                return Str(e.span, info.value, origin=origin)
            return Num(e.span, info.value, origin=origin)
        if ctx == "reward":
            entry = self.cat.get("reward", name)
            if entry is not None:
                if any(p.required for p in entry.params):
                    self.error(e.span, "missing-argument", f"`{name}` needs arguments: {entry.signature()}", None)
                    return None
                return Reward(e.span, RewardIR(kind="term", name=name, params={p.name: p.default for p in entry.params}, impl=entry.impl))
        if ctx == "loss" and self.cat.get("loss", name) is not None and name == "token_mean":
            return Loss(e.span, (Term(1.0, None, e.span),))
        if ctx == "rule" and name == "rest":
            return Rule(e.span, "rest")
        return Sym(e.span, name)

    def unknown_name(self, v: Sym, ctx: str) -> None:
        params = self.scope.params
        pool = list(params)
        if ctx == "reward":
            pool += self.cat.names("reward")
        guess = did_you_mean(v.name, pool)
        if ctx == "reward":
            msg = f"`{v.name}` is neither a declared param nor a reward term"
        else:
            msg = f"`{v.name}` is not a declared param"
        if guess:
            hint = f"did you mean `{guess}`?"
        elif v.name.lower() in ("nan", "inf", "infinity"):  # what Python's float() would take: not a number here
            hint = "numbers in a spec are finite: write one (e.g. 1e6), or leave the setting at its default"
        else:
            hint = "declare it: `param " + v.name + ": float = ...`"
        related = []
        if guess in params:
            related = [Related.at(params[guess].decl.name.span, f"param `{guess}` declared here")]
        self.error(v.span, "undeclared-param" if ctx != "reward" else "unknown-reward", msg, hint, related)

    # -- arithmetic over typed values
    def _binop(self, op: str, a: Value, b: Value, span: Span, ctx: str, sign: bool = False) -> Value | None:
        for x in (a, b):
            if isinstance(x, Sym):
                self.unknown_name(x, ctx)
                return None
        if isinstance(a, Num) and isinstance(b, Num):
            if op == "/" and b.value == 0:
                self.error(b.span, "division-by-zero", "division by zero", None)
                return None
            x = _ARITH[op](a.value, b.value)
            if not self._fits(span, x):
                return None
            return Num(span, x, origin=a.origin or b.origin)
        if isinstance(a, (Num, Sched)) and isinstance(b, (Num, Sched)):
            return self._sched_arith(op, a, b, span)
        if isinstance(a, (Loss, NGDiff)) or isinstance(b, (Loss, NGDiff)):
            return self._loss_arith(op, a, b, span, sign)
        if isinstance(a, Reward) or isinstance(b, Reward):
            return self._reward_arith(op, a, b, span, sign)
        self.error(span, "type", f"cannot apply `{op}` to {a.describe()} and {b.describe()}", None)
        return None

    def _fits(self, span: Span, *xs: float | None) -> bool:
        """Arithmetic stays within what a literal may be: finite floats, integers below 10^18."""
        for x in xs:
            if x is not None and ((isinstance(x, float) and not math.isfinite(x)) or (isinstance(x, int) and abs(x) >= 10**18)):
                self.error(span, "bad-number", "arithmetic overflow", None)
                return False
        return True

    def _sched_arith(self, op: str, a: Num | Sched, b: Num | Sched, span: Span) -> Value | None:
        if isinstance(a, Sched) and isinstance(b, Sched):
            self.error(
                span,
                "schedule-arith",
                f"`{op}` cannot combine two schedules",
                "a schedule can be scaled by a number, or offset by one (e.g. `1 - linear(0.1, 0.5)`)",
            )
            return None
        if isinstance(a, Sched):
            s, n, s_left = a.schedule, b.value, True
        else:
            s, n, s_left = b.schedule, a.value, False
        if op == "/" and s_left and n == 0:
            self.error(b.span, "division-by-zero", "division by zero", None)
            return None
        if op == "*" or (op == "/" and s_left):
            f = n if op == "*" else 1.0 / n
            upd = {"start": s.start * f, "end": None if s.end is None else s.end * f}
            if not self._fits(span, *upd.values()):
                return None
            return Sched(span, replace(s, **upd))
        if op in "+-" and s.kind in ("constant", "linear", "cosine"):
            sgn = -1.0 if (op == "-" and s_left) else 1.0
            flip = -1.0 if (op == "-" and not s_left) else 1.0
            upd = {
                "start": n * sgn + flip * s.start if not s_left else s.start + sgn * n,
                "end": (n * sgn + flip * s.end if not s_left else s.end + sgn * n),
            }
            if s.warmup:
                self.error(
                    span,
                    "schedule-arith",
                    "a schedule with warmup cannot be offset (its warmup ramps from 0)",
                    "apply the warmup to the result instead",
                )
                return None
            if not self._fits(span, *upd.values()):
                return None
            return Sched(span, replace(s, **upd))
        self.error(
            span,
            "schedule-arith",
            f"`{op}` on a `{s.kind}` schedule is not supported",
            "schedules can be scaled by numbers; constant, linear and cosine can also be offset (e.g. `1 - linear(0.1, 0.5)`)",
        )
        return None

    def _weight_ok(self, w: Num | Sched) -> bool:
        """Mixing weights of loss and reward terms lie in [0, 1]."""
        if isinstance(w, Num):
            vals = [w.value]
        else:
            vals = [w.schedule.start] + ([w.schedule.end] if w.schedule.end is not None else [])
        for x in vals:
            if not 0.0 <= x <= 1.0:
                self.error(
                    w.span,
                    "out-of-range",
                    f"mixing weight is {show(x)}, outside [0, 1]",
                    "weights of loss and reward terms are between 0 and 1",
                    [w.origin] if w.origin else [],
                )
                return False
        return True

    def _loss_arith(self, op: str, a: Value, b: Value, span: Span, sign: bool) -> Value | None:
        if sign:
            self.error(span, "type", "a loss cannot be negated", None)
            return None
        for x in (a, b):
            if isinstance(x, NGDiff):
                self.error(
                    x.span,
                    "type",
                    "`ngdiff(...)` balances gradients itself: it cannot be scaled or added to",
                    "use it as the whole loss: `loss = ngdiff(perception, [reasoning, answer])`",
                )
                return None
        if isinstance(a, Loss) and isinstance(b, Loss):
            if op == "+":
                return Loss(span, a.terms + b.terms)
            self.error(
                span,
                "type",
                f"losses can be added, not combined with `{op}`",
                "weight each term instead: `0.3 * mean(perception) + 0.7 * mean(reasoning)`",
            )
            return None
        w, loss = (a, b) if isinstance(b, Loss) else (b, a)
        if not isinstance(w, (Num, Sched)) or op not in "*/" or (op == "/" and w is a):
            self.error(
                span,
                "type",
                f"cannot apply `{op}` to {a.describe()} and {b.describe()}",
                "loss terms are weighted with `*` and added with `+`",
            )
            return None
        assert isinstance(loss, Loss)
        if op == "/":
            if not isinstance(w, Num) or w.value == 0:
                self.error(w.span, "type", "a loss can only be divided by a non-zero number", None)
                return None
            w = Num(w.span, 1.0 / w.value, origin=w.origin)
        if not self._weight_ok(w):
            return None
        terms = []
        for t in loss.terms:
            if isinstance(w, Sched):
                if not (isinstance(t.weight, float) and t.weight == 1.0):
                    self.error(span, "schedule-arith", "a scheduled weight can only multiply an unweighted term", None)
                    return None
                nw = w.schedule
            elif isinstance(t.weight, SchedArgs):
                s = t.weight
                nw = replace(s, start=s.start * w.value, end=None if s.end is None else s.end * w.value)
            else:
                nw = t.weight * w.value
            terms.append(Term(nw, t.roles, t.span))
        return Loss(span, tuple(terms))

    def _reward_arith(self, op: str, a: Value, b: Value, span: Span, sign: bool) -> Value | None:
        def as_reward(x: Value) -> RewardIR | None:
            if isinstance(x, Reward):
                return x.reward
            if isinstance(x, Num):
                return RewardIR(kind="const", value=float(x.value))
            if isinstance(x, Sched):
                self.error(
                    x.span,
                    "schedule-arith",
                    "a schedule can weight a reward term, not be added to or multiply a reward on its own",
                    "write it as a weight: `linear(0.1, 0.5) * perception_match + 0.5 * outcome`",
                )
                return None
            self.error(x.span, "type", f"cannot combine {x.describe()} with a reward", None)
            return None

        if sign:
            assert isinstance(b, Reward)
            return Reward(span, RewardIR(kind="scale", value=-1.0, children=[b.reward]))
        if op == "*" and (isinstance(a, (Num, Sched)) or isinstance(b, (Num, Sched))):
            # a weight: a number, or a schedule over the stage's steps (evaluated by `value_at`)
            w, r = (a, b) if isinstance(a, (Num, Sched)) else (b, a)
            if not self._weight_ok(w):
                return None
            assert isinstance(r, Reward)
            weight = float(w.value) if isinstance(w, Num) else w.schedule.to_ir()
            return Reward(span, RewardIR(kind="scale", value=weight, children=[r.reward]))
        if op == "/":
            if not isinstance(b, Num) or b.value == 0:
                self.error(b.span, "type", "a reward can only be divided by a non-zero number", None)
                return None
            assert isinstance(a, Reward)
            if not self._fits(span, 1.0 / b.value):
                return None
            return Reward(span, RewardIR(kind="scale", value=1.0 / b.value, children=[a.reward]))
        ra, rb = as_reward(a), as_reward(b)
        if ra is None or rb is None:
            return None
        if op == "*":
            return Reward(span, RewardIR(kind="product", children=[ra, rb]))
        if op == "-":
            rb = RewardIR(kind="scale", value=-1.0, children=[rb])
        children = (ra.children if ra.kind == "sum" else [ra]) + [rb]
        return Reward(span, RewardIR(kind="sum", children=children))

    # -- calls
    _CALL_KINDS = {"value": ("schedule",), "loss": ("loss", "schedule"), "reward": ("reward", "schedule"), "rule": ("role_rule",)}

    def _call(self, e: A.Call, ctx: str) -> Value | None:
        name = e.func.id
        kinds = self._CALL_KINDS[ctx]
        entry = next((self.cat.get(k, name) for k in kinds if self.cat.get(k, name)), None)
        if entry is None:
            pool = [n for k in kinds for n in self.cat.names(k)]
            guess = did_you_mean(name, pool)
            elsewhere = [x.kind for x in self.cat.lookup(name) if x.kind not in ("keyword", "block", "metric")]
            what = {"value": "a setting value", "loss": "a loss", "reward": "a reward", "rule": "a role rule"}[ctx]
            if elsewhere:
                msg = f"`{name}` is a {elsewhere[0].replace('_', ' ')}, which cannot appear in {what}"
            else:
                msg = f"unknown function `{name}`"
            self.error(e.func.span, "unknown-function", msg, f"did you mean `{guess}`?" if guess else f"available here: {', '.join(pool)}")
            return None
        if not self.supported(entry, e.func.span):
            return None
        args = self._bind(e, entry, "value" if ctx == "rule" else ctx)
        if args is None:
            return None
        if entry.kind == "schedule":
            return Sched(e.span, _make_sched(entry.name, args))
        if entry.kind == "role_rule":
            if entry.name == "regex":
                try:
                    re.compile(args["pattern"])
                except re.error as exc:
                    self.error(e.args[0].span if e.args else e.span, "bad-regex", f"invalid regular expression: {exc}", None)
                    return None
            if entry.name == "between" and not args["open"]:
                self.error(e.span, "out-of-range", "the opening marker of `between` is empty", None)
                return None
            return Rule(e.span, entry.name, args)
        if entry.kind == "loss":
            if entry.name == "token_mean":
                return Loss(e.span, (Term(1.0, None, e.span),))
            if entry.name == "mean":
                if not args["roles"]:
                    self.error(e.span, "missing-argument", "`mean` needs at least one role", "e.g. `mean(perception)`")
                    return None
                return Loss(e.span, (Term(1.0, tuple(args["roles"]), e.span),))
            groups = args["groups"]
            if len(groups) < 2:
                self.error(
                    e.span,
                    "missing-argument",
                    "`ngdiff` balances at least two role groups",
                    "e.g. `ngdiff(perception, [reasoning, answer])`",
                )
                return None
            flat = [r for g in groups for r in g]
            dup = next((r for r in flat if flat.count(r) > 1), None)
            if dup:
                self.error(e.span, "duplicate", f"role `{dup}` is in two ngdiff groups", "each role belongs to one group")
                return None
            every = next((kw for kw in e.kwargs if kw.name.id == "auto_lr_every"), None)
            if every is not None and not args["auto_lr"]:
                self.report.warning(
                    every.name.span,
                    "ignored-setting",
                    "`auto_lr_every` has no effect: this `ngdiff` has no `auto_lr = true`, so no line search runs",
                    "set `auto_lr = true`, or remove `auto_lr_every`",
                )
            return NGDiff(e.span, tuple(tuple(g) for g in groups), {k: v for k, v in args.items() if k != "groups"})
        if entry.name == "gate":
            return Reward(e.span, RewardIR(kind="gate", children=[args["value"], args["by"]]))
        return Reward(e.span, RewardIR(kind="term", name=entry.name, params=args, impl=entry.impl))

    def supported(self, entry: Entry, span: Span) -> bool:
        """False (reported) for a plugin entry of a kind plugins cannot add: nothing would run it."""
        if not entry.unsupported_plugin:
            return True
        kinds = plural(entry.kind)
        own = [x.name for x in self.cat.entries(entry.kind) if x.source == "percepdsl"]
        self.error(
            span,
            "plugin-unsupported",
            f"`{entry.name}` is a {entry.kind.replace('_', ' ')} from plugin `{entry.source}`, and plugins cannot add {kinds}",
            f"percepdsl computes only its own {kinds}: {', '.join(own)}",
        )
        return False

    def _bind(self, e: A.Call, entry: Entry, ctx: str) -> dict | None:
        params = list(entry.params)
        out: dict[str, Any] = {}
        ok = True
        variadic = next((p for p in params if p.variadic), None)
        vals: dict[str, list[Value]] = {}
        for i, arg in enumerate(e.args):
            v = self.eval(arg, ctx)
            if v is None:
                ok = False
                continue
            if variadic is not None and (i >= params.index(variadic)):
                vals.setdefault(variadic.name, []).append(v)
            elif i < len(params):
                vals[params[i].name] = [v]
            else:
                self.error(
                    arg.span,
                    "too-many-arguments",
                    f"`{entry.name}` takes at most {len(params)} positional arguments",
                    f"signature: {entry.signature()}",
                )
                ok = False
        for kw in e.kwargs:
            spec = entry.param(kw.name.id)
            if spec is None or spec.variadic:
                guess = did_you_mean(kw.name.id, [p.name for p in params if not p.variadic])
                self.error(
                    kw.name.span,
                    "unknown-argument",
                    f"`{entry.name}` has no argument `{kw.name.id}`",
                    f"did you mean `{guess}`?" if guess else f"signature: {entry.signature()}",
                )
                ok = False
                continue
            if kw.name.id in vals:
                self.error(kw.name.span, "duplicate", f"argument `{kw.name.id}` is given twice", None)
                ok = False
                continue
            v = self.eval(kw.value, ctx)
            if v is None:
                ok = False
                continue
            vals[kw.name.id] = [v]
        for p in params:
            given = vals.get(p.name)
            if p.variadic:
                items = [self.coerce(v, p, f"argument of `{entry.name}`") for v in (given or [])]
                if any(i is None for i in items):
                    ok = False
                out[p.name] = [x for i in items if i is not None for x in (i if p.type == "roles" else [i])] if p.type == "roles" else items
                continue
            if given is None:
                if p.required:
                    self.error(e.span, "missing-argument", f"`{entry.name}` needs `{p.name}`", f"signature: {entry.signature()}")
                    ok = False
                out[p.name] = default_value(p)
                continue
            x = self.coerce(given[0], p, f"`{p.name}` of `{entry.name}`")
            if x is None and not isinstance(given[0], Null):
                ok = False
            out[p.name] = x
        return out if ok else None

    # -- coercion to catalogue types
    def coerce_expr(self, expr: A.Expr, spec: ParamSpec, what: str, literal_only: bool = False) -> Any:
        """Evaluate and coerce; `literal_only` refuses expressions (overrides, grid `fix`)."""
        ctx = {"loss": "loss", "token_weights": "loss", "reward": "reward", "metrics": "value"}.get(spec.type, "value")
        if literal_only and not isinstance(expr, LITERALS):
            self.error(expr.span, "bad-override", f"{what} takes a literal value, not an expression", 'e.g. 0.5, 3, true or "text"')
            return None
        v = self.eval(expr, ctx)
        if v is None:
            return None
        return self.coerce(v, spec, what)

    def _check_range(self, v: Value, spec: ParamSpec, x: float, what: str) -> bool:
        if (spec.min is not None and x < spec.min) or (spec.max is not None and x > spec.max):
            self.error(
                v.span,
                "out-of-range",
                f"{what} must be {spec.describe_range()}, got {show(x)}",
                _range_hint(spec, x),
                [v.origin] if v.origin else [],
            )
            return False
        return True

    def coerce(self, v: Value, spec: ParamSpec, what: str) -> Any:
        """Check a value against a parameter type; returns the IR value or None (reported)."""
        t = spec.type
        if isinstance(v, Null):
            if spec.nullable:
                return None
            self.error(v.span, "type", f"{what} cannot be `none`", f"it expects {spec.describe_type()}")
            return None

        if isinstance(v, Sym) and t not in ("choice", "choice_list", "metrics", "roles", "role_group", "str", "stage"):
            self.unknown_name(v, {"reward": "reward", "loss": "loss"}.get(t, "value"))
            return None

        def wrong(expected: str | None = None) -> None:
            self.error(v.span, "type", f"{what} expects {expected or spec.describe_type()}, got {v.describe()}", _type_hint(spec, v))

        if t in ("int", "px"):
            if t == "px" and isinstance(v, Dim):
                if v.unit != "px":
                    return wrong()
                x = v.value
            elif isinstance(v, Num):
                x = v.value
            else:
                return wrong()
            if isinstance(x, float):
                if not x.is_integer():
                    return wrong()
                x = int(x)
            if spec.choices and x not in spec.choices:
                self.error(v.span, "out-of-range", f"{what} must be {spec.describe_type()}, got {x}", None)
                return None
            return x if self._check_range(v, spec, x, what) else None
        if t == "float":
            if not isinstance(v, Num):
                return wrong()
            x = float(v.value)
            return x if self._check_range(v, spec, x, what) else None
        if t == "bool":
            return v.value if isinstance(v, Bool) else wrong()
        if t == "str":
            return v.value if isinstance(v, Str) else wrong()
        if t == "stage":  # the spec checks that the stage exists (its stages come after its roles)
            return v.name if isinstance(v, Sym) else wrong()
        if t == "choice":
            if not isinstance(v, (Str, Sym)):
                return wrong()
            word = v.value if isinstance(v, Str) else v.name
            if word in dict(spec.refused):
                self.error(
                    v.span,
                    "unsupported-choice",
                    f"{what} `{word}` is not offered: {dict(spec.refused)[word]}",
                    "offered: " + ", ".join(f"`{c}`" for c in spec.choices),
                )
                return None
            if word not in spec.choices:
                guess = did_you_mean(str(word), spec.choices)
                self.error(
                    v.span,
                    "unknown-choice",
                    f"{what} must be {spec.describe_type()}, got `{word}`",
                    f"did you mean `{guess}`?" if guess else None,
                )
                return None
            return word
        if t == "int_range":
            if isinstance(v, Num):
                x = self.coerce(v, ParamSpec(spec.name, "int", min=spec.min, max=spec.max), what)
                return None if x is None else (x, x)
            if isinstance(v, Range):
                lo, hi = v.lo, v.hi
                ok = self._check_range(v, spec, lo, what) and self._check_range(v, spec, hi, what)
                return (lo, hi) if ok else None
            return wrong()
        if t == "value":
            if isinstance(v, Num):
                x = float(v.value)
                return x if self._check_range(v, spec, x, what) else None
            if isinstance(v, Sched):
                s = v.schedule
                for x in (s.start, s.end):
                    if x is not None and not self._check_range(v, spec, x, what):
                        return None
                return s.to_ir()
            return wrong()
        if t == "loss":
            if not isinstance(v, (Loss, NGDiff)):
                return wrong("a loss such as `token_mean()` or `lam * mean(perception) + (1 - lam) * mean(reasoning, answer)`")
            return self.loss_ir(v)
        if t == "reward":
            if isinstance(v, Num):
                self.error(
                    v.span,
                    "type",
                    f"{what} is a constant {show(v.value)}: it gives GRPO no signal",
                    "combine reward terms such as `outcome`",
                )
                return None
            if not isinstance(v, Reward):
                return wrong()
            return v.reward
        if t == "metrics":
            items = v.items if isinstance(v, List) else (v,)
            names = []
            for it in items:
                if not isinstance(it, (Sym, Str)):
                    self.error(it.span, "type", f"{what} lists metric names, got {it.describe()}", None)
                    return None
                name = it.name if isinstance(it, Sym) else it.value
                entry = self.cat.get("metric", name)
                if entry is not None and not self.supported(entry, it.span):
                    return None
                if entry is None:
                    guess = did_you_mean(name, self.cat.names("metric"))
                    self.error(
                        it.span,
                        "unknown-metric",
                        f"unknown metric `{name}`",
                        f"did you mean `{guess}`?" if guess else f"metrics: {', '.join(self.cat.names('metric'))}",
                    )
                    return None
                names.append(name)
            return names
        if t == "token_weights":
            if not isinstance(v, NGDiff):
                return wrong("`ngdiff(...)` over role groups, or a block of role weights: `token_weights { perception = 2.0 }`")
            if v.options.get("auto_lr"):
                self.error(
                    v.span,
                    "unsupported-option",
                    "`auto_lr` of `ngdiff` is an SFT option; a grpo stage's `token_weights` cannot take it",
                    "drop `auto_lr = true` (the grpo stage's `lr` sets the step size)",
                )
                return None
            return self.loss_ir(v)
        if t == "choice_list":
            out = []
            first: dict[str, Span] = {}
            for it in v.items if isinstance(v, List) else (v,):
                word = self.coerce(it, ParamSpec(spec.name, "choice", choices=spec.choices), what)
                if word is None:
                    return None
                if word in first:  # as a grid value or a weighted role listed twice: a slip, not a setting
                    self.error(
                        it.span,
                        "duplicate",
                        f"`{word}` is listed twice in {what}",
                        "list it once",
                        [Related.at(first[word], "first listed here")],
                    )
                    return None
                first[word] = it.span
                out.append(word)
            return out
        if t == "str_list":
            if isinstance(v, Str):
                return v.value
            if isinstance(v, List) and all(isinstance(i, Str) for i in v.items):
                return [i.value for i in v.items]
            return wrong()
        if t in ("roles", "role_group"):
            if t == "roles" and isinstance(v, List):
                return wrong("role names")
            out = []
            for it in v.items if isinstance(v, List) else (v,):
                r = self._role(it)
                if r is None:
                    return None
                out.append(r)
            return out
        raise AssertionError(f"unhandled parameter type {t}")

    def _role(self, v: Value) -> str | None:
        roles = self.scope.roles
        if not isinstance(v, Sym):
            self.error(v.span, "type", f"expected a role name, got {v.describe()}", f"declared roles: {', '.join(roles)}")
            return None
        if v.name not in roles:
            self.unknown_role(v.name, v.span, "loss uses")
            return None
        return v.name

    def unknown_role(self, name: str, span: Span, user: str) -> None:
        """`<user> role `name`, which the roles block does not declare`, with a did-you-mean."""
        roles = self.scope.roles
        guess = did_you_mean(name, roles)
        declared = roles[guess] if guess else None
        where = ""
        if declared is not None:  # the roles block may be in an included file
            where = (
                f" (declared at line {declared.line})" if declared.file == span.file else f" (declared at {declared.file}:{declared.line})"
            )
        hint = f"did you mean `{guess}`?{where}" if guess else f"declared roles: {', '.join(roles)}"
        self.error(span, "unknown-role", f"{user} role `{name}`, which the roles block does not declare", hint)

    def loss_ir(self, v: Loss | NGDiff) -> TokenMeanLoss | MixLoss | NGDiffLoss:
        if isinstance(v, NGDiff):
            return NGDiffLoss(groups=[list(g) for g in v.groups], **v.options)
        seen: dict[str, Span] = {}
        for t in v.terms:
            for r in t.roles or ():
                if r in seen:
                    self.report.warning(
                        t.span,
                        "overlapping-terms",
                        f"role `{r}` appears in two loss terms; its tokens are counted twice",
                        None,
                        [Related.at(seen[r], "first term here")],
                    )
                seen[r] = t.span
        all_roles = self.scope.all_roles()
        terms = v.terms
        if len(terms) == 1 and terms[0].weight == 1.0 and (terms[0].roles is None or set(terms[0].roles) == set(all_roles)):
            return TokenMeanLoss()  # a mean over every role is the token mean: one IR, one hash
        return MixLoss(
            terms=[LossTerm(weight=_weight_ir(t.weight), roles=list(t.roles) if t.roles is not None else all_roles) for t in terms]
        )


def _weight_ir(w: float | SchedArgs) -> Any:
    return w.to_ir() if isinstance(w, SchedArgs) else w


def _make_sched(name: str, a: dict) -> SchedArgs:
    if name == "constant":
        return SchedArgs(kind="constant", start=a["value"], end=a["value"], warmup=a["warmup"])
    if name == "warmup":
        return SchedArgs(kind="constant", start=a["value"], end=a["value"], warmup=a["steps"])
    if name == "step":
        return SchedArgs(kind="step", start=a["start"], factor=a["factor"], every=a["every"], warmup=a["warmup"])
    return SchedArgs(kind=name, start=a["start"], end=a["end"], warmup=a["warmup"])
