"""AST → IR, with every problem reported at once.

The checker resolves each name through the catalogue, evaluates expressions into
typed values (numbers, schedules, losses, rewards, role rules), folds params into
constants, and builds the IR only when no error was found. It keeps going after an
error: a value that failed becomes `None` and is not complained about twice.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import nodes as A
from .catalogue import Catalogue, Entry, ParamSpec, default_catalogue
from .diagnostics import Diagnostic, Related, Severity, Span, did_you_mean, relpath
from .ir import (
    EvalIR,
    ExperimentIR,
    GridIR,
    LoraIR,
    LossIR,
    LossTermIR,
    ModelIR,
    RewardIR,
    RoleRuleIR,
    ScheduleIR,
    StageIR,
    TaskIR,
    TrainerIR,
)
from .parse import decode, parse_expr, parse_text

PARAM_TYPES = ("int", "float", "bool", "str")
DEFAULT_ROLES = (
    RoleRuleIR(role="perception", kind="between", open="<perception>", close="</perception>"),
    RoleRuleIR(role="reasoning", kind="between", open="<reasoning>", close="</reasoning>"),
    RoleRuleIR(role="answer", kind="between", open="<answer>", close="</answer>"),
)
IMPLICIT_ROLE = "other"  # uncovered characters when no `rest` rule is declared
SET_FILE = "<--set>"


# ---- loading: files, includes --------------------------------------------------------


@dataclass
class Loaded:
    """A parsed file and, flattened in order, the statements of it and its includes."""

    path: Path | None
    name: str  # as shown in diagnostics
    text: str | None
    tree: A.File | None
    items: list[tuple[str, A.Statement]] = field(default_factory=list)  # (file name, statement)
    # A headerless file is a fragment (checked leniently) unless it cannot be one:
    # an empty file, or one given as text with no path (nothing could include it).
    is_root_only: bool = False
    sources: dict[str, str] = field(default_factory=dict)  # file name → text, for rendering


def read_source(path: Path) -> tuple[str | None, list[Diagnostic]]:
    name = relpath(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, [Diagnostic(name, Span.point(), Severity.ERROR, "missing-file", f"no such file: {name}")]
    except IsADirectoryError:
        return None, [Diagnostic(name, Span.point(), Severity.ERROR, "missing-file", f"{name} is a directory, not a spec file")]
    except OSError as e:
        return None, [Diagnostic(name, Span.point(), Severity.ERROR, "missing-file", f"cannot read {name}: {e.strerror}")]
    return decode(data, name)


def load(path: Path | None, text: str | None = None, name: str | None = None) -> tuple[Loaded, list[Diagnostic]]:
    """Read, parse and splice includes. `text` given: check it as if it were at `path`."""
    diags: list[Diagnostic] = []
    if name is None:
        name = relpath(path) if path is not None else "<string>"
    if text is None:
        assert path is not None
        text, d = read_source(path)
        diags += d
    loaded = Loaded(path, name, text, None)
    if text is None:
        return loaded, diags
    loaded.sources[name] = text
    tree, d = parse_text(text, name)
    diags += d
    loaded.tree = tree
    loaded.is_root_only = tree is not None and not tree.items
    if tree is not None:
        stack = [path.resolve()] if path is not None else []
        _splice(loaded, tree, name, path.parent if path is not None else Path.cwd(), stack, diags)
    return loaded, diags


def _splice(loaded: Loaded, tree: A.File, name: str, base: Path, stack: list[Path], diags: list[Diagnostic]) -> None:
    for stmt in tree.items:
        if not isinstance(stmt, A.Include):
            loaded.items.append((name, stmt))
            continue
        target = (base / stmt.path.value).resolve()
        if target in stack:
            chain = " → ".join(relpath(p) for p in stack[stack.index(target) :] + [target])
            diags.append(
                Diagnostic(
                    name,
                    stmt.path.span,
                    Severity.ERROR,
                    "include-cycle",
                    f"include cycle: {chain}",
                    "move the shared statements into a fragment that includes nothing",
                )
            )
            continue
        if not target.is_file():
            near = [p.name for p in target.parent.glob("*.pd")] if target.parent.is_dir() else []
            guess = did_you_mean(target.name, near)
            diags.append(
                Diagnostic(
                    name,
                    stmt.path.span,
                    Severity.ERROR,
                    "missing-include",
                    f"included file `{stmt.path.value}` does not exist",
                    f"did you mean `{guess}`?" if guess else f"the path is relative to {relpath(base) or '.'}/",
                )
            )
            continue
        text, d = read_source(target)
        diags += d
        if text is None:
            continue
        inc_name = relpath(target)
        loaded.sources[inc_name] = text
        sub, d = parse_text(text, inc_name)
        diags += d
        if sub is not None:
            _splice(loaded, sub, inc_name, target.parent, stack + [target], diags)


# ---- evaluated values ---------------------------------------------------------------------


@dataclass
class V:
    """A typed value of an evaluated expression.

    kind: num, str, bool, none, dim, range, list, sym (a bare name that is not a param),
    sched (ScheduleIR), loss (list of (weight, roles) | ("ngdiff", groups, auto_lr)),
    reward (RewardIR), rule (RoleRuleIR without the role).
    """

    kind: str
    value: Any
    span: Span
    origin: Related | None = None  # how an overridden param value got here ("`lam` = 1.5, set by --set")

    def describe(self) -> str:
        return {
            "num": f"the number {_show(self.value)}",
            "str": f'the string "{self.value}"',
            "bool": f"`{str(self.value).lower()}`",
            "none": "`none`",
            "dim": f"the size `{_show(self.value[0])}{self.value[1]}`" if self.kind == "dim" else "",
            "range": "a range",
            "list": "a list",
            "sym": f"the name `{self.value}`",
            "sched": "a schedule",
            "loss": "a loss",
            "reward": "a reward",
            "rule": "a role rule",
        }[self.kind]


def _show(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.6g}"
    return str(x)


@dataclass
class ParamInfo:
    decl: A.Param
    file: str
    type: str
    value: Any
    origin: str  # "default" | "--set" | "grid"
    used: bool = False


@dataclass
class Result:
    """What checking a file gives: the IR (None on error), diagnostics, and what editors need."""

    ir: ExperimentIR | GridIR | None
    diagnostics: list[Diagnostic]
    loaded: Loaded | None
    symbols: dict[str, list[tuple[str, Span, str]]] = field(default_factory=dict)  # kind → (name, span, file)

    @property
    def ok(self) -> bool:
        return not any(d.is_error for d in self.diagnostics)


# ---- the checker ----------------------------------------------------------------------------


class Checker:
    def __init__(
        self,
        loaded: Loaded,
        catalogue: Catalogue,
        overrides: dict[str, str] | None = None,
        override_origin: str = "--set",
        fragment_ok: bool = True,
    ):
        self.fragment_ok = fragment_ok
        self.loaded = loaded
        self.cat = catalogue
        self.overrides = dict(overrides or {})
        self.override_origin = override_origin
        self.diags: list[Diagnostic] = []
        self.file = loaded.name
        self.params: dict[str, ParamInfo] = {}
        self.roles: dict[str, tuple[str, Span]] = {}  # role → (file, span of its declaration)
        self.has_rest = False
        self.symbols: dict[str, list[tuple[str, Span, str]]] = {}

    # -- reporting
    def error(self, span: Span, code: str, message: str, hint: str | None = None, related=()) -> None:
        self.diags.append(Diagnostic(self.file, span, Severity.ERROR, code, message, hint, tuple(related)))

    def warning(self, span: Span, code: str, message: str, hint: str | None = None, related=()) -> None:
        self.diags.append(Diagnostic(self.file, span, Severity.WARNING, code, message, hint, tuple(related)))

    def _symbol(self, kind: str, name: str, span: Span) -> None:
        self.symbols.setdefault(kind, []).append((name, span, self.file))

    def _related(self, file: str, span: Span, msg: str) -> Related:
        return Related(file, span, msg)

    # -- entry point
    def run(self) -> ExperimentIR | GridIR | None:
        items = self.loaded.items
        is_grid = any(isinstance(s, (A.Grid, A.Template)) for _, s in items) and not any(isinstance(s, A.Experiment) for _, s in items)
        return self.check_grid(items) if is_grid else self.check_experiment(items)

    # -- statements grouped by kind, reporting duplicates of single-use statements
    def _group(self, items, singles: tuple[type, ...], allowed: tuple[type, ...], what: str) -> dict[type, list[tuple[str, Any]]]:
        groups: dict[type, list[tuple[str, Any]]] = {}
        for file, stmt in items:
            self.file = file
            if not isinstance(stmt, allowed):
                kw = _keyword(stmt)
                self.error(
                    stmt.span,
                    "misplaced-statement",
                    f"`{kw}` does not belong in {what}",
                    "grid files hold grid, template, axis, zip, seeds, where, report and fix"
                    if what == "a grid file"
                    else "this statement belongs in a grid file",
                )
                continue
            groups.setdefault(type(stmt), []).append((file, stmt))
        for cls in singles:
            entries = groups.get(cls, [])
            for file, stmt in entries[1:]:
                self.file = file
                first_file, first = entries[0]
                self.error(
                    stmt.span,
                    "duplicate",
                    f"`{_keyword(stmt)}` appears more than once",
                    "keep one",
                    [self._related(first_file, first.span, "first defined here")],
                )
        return groups

    # ================================================================ experiment specs
    def check_experiment(self, items) -> ExperimentIR | None:
        spec_stmts = (A.Experiment, A.Param, A.Seed, A.Task, A.Model, A.Roles, A.Stage, A.Eval, A.Trainer)
        g = self._group(items, (A.Experiment, A.Seed, A.Model, A.Roles, A.Eval, A.Trainer), spec_stmts, "an experiment spec")
        self.file = self.loaded.name
        exp = g.get(A.Experiment, [])
        # A file without a header that is only included by others is a fragment: it is
        # checked as far as it stands alone, and not required to be a whole experiment.
        self.fragment = not exp and not self.loaded.is_root_only and self.fragment_ok
        if not exp and not self.fragment:
            self.error(
                Span.point(), "missing-block", "the spec has no `experiment` header", "start the file with `experiment my_experiment`"
            )
        elif exp:
            self._symbol("experiment", exp[0][1].name.id, exp[0][1].name.span)
        self._declare_params(g.get(A.Param, []))
        self._apply_overrides()

        seed = 0
        if A.Seed in g:
            self.file, s = g[A.Seed][0]
            seed = self._coerce_value(s.value, ParamSpec("seed", "int", 0, min=0, max=2**31 - 1), "seed")
        if "seed" in self.overrides:
            seed = self._override_seed(seed)

        roles = self._check_roles(g.get(A.Roles, []))
        task = self._check_task(g.get(A.Task, []))
        model = self._check_model(g.get(A.Model, []), task)
        stages = self._check_stages(g.get(A.Stage, []))
        ev = self._check_simple_block(g.get(A.Eval, []), "eval")
        tr = self._check_simple_block(g.get(A.Trainer, []), "trainer")
        self._report_unused_params()

        if any(d.is_error for d in self.diags) or not exp:
            return None
        role_names = [r.role for r in roles]
        if not any(r.kind == "rest" for r in roles):
            role_names.append(IMPLICIT_ROLE)
        return ExperimentIR(
            name=exp[0][1].name.id,
            seed=seed,
            params={n: p.value for n, p in self.params.items()},
            task=task,
            model=model,
            roles=roles,
            role_names=list(dict.fromkeys(role_names)),
            stages=stages,
            eval=EvalIR(**ev),
            trainer=TrainerIR(**tr),
        )

    # -- params
    def _declare_params(self, decls) -> None:
        for file, p in decls:
            self.file = file
            name = p.name.id
            if name in self.params:
                prev = self.params[name]
                self.error(
                    p.name.span,
                    "duplicate",
                    f"param `{name}` is declared twice",
                    "remove one declaration",
                    [self._related(prev.file, prev.decl.name.span, "first declared here")],
                )
                continue
            ptype = p.type.id
            if ptype not in PARAM_TYPES:
                guess = did_you_mean(ptype, PARAM_TYPES)
                self.error(
                    p.type.span,
                    "unknown-type",
                    f"unknown param type `{ptype}`",
                    f"did you mean `{guess}`?" if guess else "param types are int, float, bool and str",
                )
                ptype = None
            value = None
            if p.default is not None and ptype is not None:
                value = self._coerce_value(p.default, ParamSpec(name, ptype), f"param `{name}`")
            self.params[name] = ParamInfo(p, file, ptype or "float", value, "default")
            self._symbol("param", name, p.name.span)

    def _apply_overrides(self) -> None:
        for name, text in self.overrides.items():
            if name == "seed":
                continue
            self.file = SET_FILE
            if name not in self.params:
                guess = did_you_mean(name, self.params)
                self.error(
                    Span.point(),
                    "unknown-param",
                    f"`--set {name}=...` names no param of this spec",
                    f"did you mean `{guess}`?" if guess else f"declared params: {', '.join(self.params) or 'none'}",
                )
                continue
            info = self.params[name]
            expr, d = parse_expr(text)
            if expr is None:
                self.error(
                    Span.point(),
                    "bad-override",
                    f"cannot parse the value of `--set {name}={text}`",
                    'values are literals: 0.5, 3, true, "text"',
                )
                continue
            if isinstance(expr, A.Name) and info.type == "str":
                value = expr.id  # bare words are strings for str params: --set task=sudoku
            else:
                value = self._coerce_value(expr, ParamSpec(name, info.type), f"`--set {name}`", literal_only=True)
            if value is not None:
                info.value, info.origin = value, self.override_origin
        self.file = self.loaded.name
        for name, info in self.params.items():
            if info.value is None and info.type is not None and not any(d.is_error and d.span == info.decl.type.span for d in self.diags):
                if info.decl.default is None:
                    self.file = info.file
                    self.error(
                        info.decl.name.span,
                        "unset-param",
                        f"param `{name}` has no default and is not set",
                        f"give it a default (`param {name}: {info.type} = ...`) or pass `--set {name}=...`",
                    )

    def _override_seed(self, seed: int) -> int:
        self.file = SET_FILE
        expr, _ = parse_expr(self.overrides["seed"])
        value = (
            self._coerce_value(expr, ParamSpec("seed", "int", min=0, max=2**31 - 1), "`--set seed`", literal_only=True) if expr else None
        )
        if expr is None:
            self.error(Span.point(), "bad-override", f"cannot parse `--set seed={self.overrides['seed']}`", "seeds are integers")
        self.file = self.loaded.name
        return seed if value is None else value

    def _report_unused_params(self) -> None:
        if self.fragment:  # the params may be used by the specs that include the fragment
            return
        for name, info in self.params.items():
            if not info.used and info.value is not None:  # a param with an error was reported already
                self.file = info.file
                self.warning(
                    info.decl.name.span, "unused-param", f"param `{name}` is declared but never used", "use it in a setting or remove it"
                )

    # -- roles
    def _check_roles(self, decls) -> list[RoleRuleIR]:
        if not decls:
            for r in DEFAULT_ROLES:
                self.roles[r.role] = (self.loaded.name, Span.point())
            return list(DEFAULT_ROLES)
        self.file, stmt = decls[0]
        rules: list[RoleRuleIR] = []
        rest_at: Span | None = None
        for entry in stmt.block.entries:
            if isinstance(entry, A.SubBlock):
                self.error(entry.key.span, "type", f'role `{entry.key.id}` needs a rule such as `between("<a>", "</a>")`, not a block')
                continue
            role = entry.key.id
            if role in self.roles:
                f, sp = self.roles[role]
                self.error(
                    entry.key.span,
                    "duplicate",
                    f"role `{role}` is declared twice",
                    "give each role one rule",
                    [self._related(f, sp, "first declared here")],
                )
                continue
            self.roles[role] = (self.file, entry.key.span)
            self._symbol("role", role, entry.key.span)
            v = self.eval(entry.value, "rule")
            if v is None:
                continue
            if v.kind != "rule":
                self.error(
                    entry.value.span,
                    "type",
                    f"role `{role}` needs a rule (between, regex or rest), got {v.describe()}",
                    'e.g. `perception = between("<perception>", "</perception>")`',
                )
                continue
            if v.value["kind"] == "rest":
                if rest_at is not None:
                    self.error(
                        entry.value.span,
                        "duplicate",
                        "only one role can take `rest()`",
                        "the other characters can go to one role only",
                        [self._related(self.file, rest_at, "`rest()` first used here")],
                    )
                    continue
                rest_at = entry.value.span
            rules.append(RoleRuleIR(role=role, **v.value))
        self.has_rest = rest_at is not None
        if not rules and stmt.block.entries == ():
            self.error(
                stmt.span,
                "missing-block",
                "the roles block declares no role",
                'e.g. `perception = between("<perception>", "</perception>")`',
            )
        return rules

    # -- task and model
    def _check_task(self, decls) -> TaskIR | None:
        if not decls and self.fragment:
            return None
        if not decls:
            self.file = self.loaded.name
            self.error(Span.point(), "missing-block", "the spec has no `task` block", "add e.g. `task graph_coloring { nodes = 5 }`")
            return None
        for file, extra in decls[1:]:
            self.file = file
            self.error(
                extra.span,
                "duplicate",
                "an experiment has one task",
                "split the tasks into two experiments (or a grid)",
                [self._related(decls[0][0], decls[0][1].span, "first task here")],
            )
        self.file, t = decls[0]
        entry = self._lookup_named(t.name, "task")
        if entry is None:
            return None
        self._symbol("task", t.name.id, t.name.span)
        settings = self._check_block(t.block, entry, f"task `{entry.name}`")
        if settings is None:
            return None
        return TaskIR(name=entry.name, params=settings, impl=entry.impl)

    def _check_model(self, decls, task: TaskIR | None) -> ModelIR | None:
        if not decls:
            tiny = self.cat.get("model", "tiny")
            return ModelIR(kind="tiny", params={p.name: p.default for p in tiny.params}, impl=tiny.impl)
        self.file, m = decls[0]
        entry = self._lookup_named(m.kind, "model")
        if entry is None:
            return None
        block = m.block or A.Block(m.span, ())
        lora_blk = block.get("lora")
        if entry.name == "hf":
            if m.path is None:
                self.error(
                    m.kind.span,
                    "missing-setting",
                    "`model hf` needs the checkpoint's path",
                    'write `model hf "/path/to/checkpoint" { ... }`',
                )
        elif m.path is not None:
            self.error(m.path.span, "unexpected-path", f"model `{entry.name}` takes no path", 'only `model hf "/path"` loads a checkpoint')
        if lora_blk is not None and entry.name != "hf":
            self.error(
                lora_blk.key.span,
                "unknown-setting",
                f"LoRA applies to `hf` models, not `{entry.name}`",
                "the tiny model trains all its weights",
            )
        params = self._check_block(block, entry, f"model `{entry.name}`", subblocks=("lora",))
        lora = None
        if isinstance(lora_blk, A.SubBlock) and entry.name == "hf":
            lv = self._check_block(lora_blk.block, self.cat.get("block", "lora"), "lora")
            if lv is not None:
                lora = LoraIR(**lv)
        if entry.name == "tiny" and params and task is not None:
            image, patch = task.params.get("image"), params.get("patch")
            if isinstance(image, int) and isinstance(patch, int) and image % patch:
                sp = block.get("patch").span if block.get("patch") else m.span
                self.error(
                    sp,
                    "incompatible",
                    f"image size {image}px is not a multiple of the patch size {patch}px",
                    f"use patch = {math.gcd(image, patch)}px or an image size that is a multiple of {patch}",
                )
        if params is None:
            return None
        return ModelIR(kind=entry.name, path=m.path.value if m.path else None, params=params, lora=lora, impl=entry.impl)

    # -- stages
    def _check_stages(self, decls) -> list[StageIR]:
        if not decls and self.fragment:
            return []
        if not decls:
            self.file = self.loaded.name
            self.error(Span.point(), "missing-block", "the spec has no stage", "add e.g. `stage base = sft { steps = 600 }`")
            return []
        seen: dict[str, tuple[str, A.Stage]] = {}
        built: dict[str, StageIR] = {}
        for file, st in decls:
            self.file = file
            name = st.name.id
            if name in seen:
                self.error(
                    st.name.span,
                    "duplicate",
                    f"stage `{name}` is defined twice",
                    "rename one of them",
                    [self._related(seen[name][0], seen[name][1].name.span, "first defined here")],
                )
                continue
            seen[name] = (file, st)
            self._symbol("stage", name, st.name.span)
        for name, (file, st) in seen.items():
            self.file = file
            kind = st.kind.id
            entry = self.cat.get("block", kind) if kind in ("sft", "grpo") else None
            if entry is None:
                guess = did_you_mean(kind, ["sft", "grpo"])
                self.error(
                    st.kind.span,
                    "unknown-stage-kind",
                    f"unknown stage kind `{kind}`",
                    f"did you mean `{guess}`?" if guess else "stages are `sft` or `grpo`",
                )
                continue
            # a fragment's stage may start from a stage of the spec that includes it
            if st.parent is not None and st.parent.id not in seen and not self.fragment:
                guess = did_you_mean(st.parent.id, [n for n in seen if n != name])
                self.error(
                    st.parent.span,
                    "unknown-stage",
                    f"stage `{name}` starts from `{st.parent.id}`, which is not defined",
                    f"did you mean `{guess}`?" if guess else "define that stage, or drop `from` to start from the initial model",
                )
            settings = self._check_block(st.block, entry, f"stage `{name}` ({kind})")
            if settings is None:
                continue
            loss = settings.pop("loss", None)
            reward = settings.pop("reward", None)
            if kind == "sft" and isinstance(loss, str):
                loss = LossIR(kind="token_mean")
            built[name] = StageIR(
                name=name,
                kind=kind,
                parent=st.parent.id if st.parent else None,
                settings=settings,
                loss=loss if kind == "sft" else None,
                reward=reward if kind == "grpo" else None,
            )
            if kind == "grpo" and st.parent is None and self._model_is_tiny():
                self.warning(
                    st.kind.span,
                    "grpo-from-scratch",
                    f"GRPO stage `{name}` starts from the randomly initialised tiny model",
                    "start it `from` an sft stage that has taught the output format",
                )
        return self._order_stages(seen, built)

    def _model_is_tiny(self) -> bool:
        return not any(isinstance(s, A.Model) and s.kind.id != "tiny" for _, s in self.loaded.items)

    def _order_stages(self, seen, built: dict[str, StageIR]) -> list[StageIR]:
        """Topological order (declaration order among independent stages); cycles are errors."""
        order: list[str] = []
        state: dict[str, int] = {}  # 1 = visiting, 2 = done

        def visit(name: str, path: list[str]) -> None:
            if state.get(name) == 2:
                return
            if state.get(name) == 1:
                cycle = path[path.index(name) :] + [name]
                file, st = seen[name]
                self.file = file
                self.error(
                    st.parent.span if st.parent else st.name.span,
                    "stage-cycle",
                    "stages form a cycle: " + " → ".join(f"`{c}`" for c in cycle),
                    "one stage of the cycle must start from the initial model (drop its `from`)",
                )
                for c in cycle:
                    state[c] = 2
                return
            state[name] = 1
            parent = seen[name][1].parent
            if parent is not None and parent.id in seen:
                visit(parent.id, path + [name])
            if state[name] == 1:
                state[name] = 2
                order.append(name)

        for name in seen:
            visit(name, [])
        return [built[n] for n in order if n in built]

    def _check_simple_block(self, decls, kind: str) -> dict:
        entry = self.cat.get("block", kind)
        if not decls:
            return {p.name: _default(p) for p in entry.params}
        self.file, stmt = decls[0]
        return self._check_block(stmt.block, entry, f"`{kind}`") or {p.name: _default(p) for p in entry.params}

    # -- generic block of settings against a catalogue entry
    def _check_block(self, block: A.Block, entry: Entry, what: str, subblocks: tuple[str, ...] = ()) -> dict | None:
        out: dict[str, Any] = {}
        ok = True
        seen: dict[str, A.Node] = {}
        for e in block.entries:
            key = e.key.id
            if key in seen:
                self.error(
                    e.key.span,
                    "duplicate",
                    f"`{key}` is set twice in {what}",
                    "keep one",
                    [self._related(self.file, seen[key].span, "first set here")],
                )
                ok = False
                continue
            seen[key] = e.key
            if isinstance(e, A.SubBlock):
                if key not in subblocks:
                    self.error(e.key.span, "unknown-setting", f"{what} has no `{key} {{...}}` block", None)
                    ok = False
                continue
            spec = entry.param(key)
            if spec is None:
                names = [p.name for p in entry.params] + list(subblocks)
                guess = did_you_mean(key, names)
                self.error(
                    e.key.span,
                    "unknown-setting",
                    f"{what} has no setting `{key}`",
                    f"did you mean `{guess}`?" if guess else f"its settings are: {', '.join(names)}",
                )
                ok = False
                continue
            value = self._coerce_value(e.value, spec, f"`{key}`")
            if value is None and not (spec.nullable and isinstance(e.value, A.NoneLit)):
                ok = False
            out[key] = value
        for p in entry.params:
            if p.name not in out:
                if p.required:
                    self.error(
                        block.span if block.entries else block.span,
                        "missing-setting",
                        f"{what} needs `{p.name}`",
                        f"add `{p.name} = ...` ({p.describe_type()}): {p.doc}",
                    )
                    ok = False
                else:
                    out[p.name] = _default(p)
        if ok:
            ok = self._check_constraints(entry, out, block)
        return out if ok else None

    def _check_constraints(self, entry: Entry, settings: dict, block: A.Block) -> bool:
        ok = True
        for c in entry.constraints:
            msg = c.rule(settings)
            if msg is None:
                continue
            ok = False
            written = [block.get(p) for p in c.params if block.get(p) is not None]
            span = written[0].span if written else block.span
            others = [self._related(self.file, w.span, f"`{w.key.id}` set here") for w in written[1:]]
            self.error(span, "incompatible", msg, c.hint or None, others)
        return ok

    # ================================================================ expressions
    def _coerce_value(self, expr: A.Expr, spec: ParamSpec, what: str, literal_only: bool = False) -> Any:
        ctx = {"loss": "loss", "reward": "reward", "metrics": "value"}.get(spec.type, "value")
        if literal_only and not isinstance(expr, (A.Number, A.String, A.Bool, A.Signed, A.Dimension, A.NoneLit)):
            self.error(expr.span, "bad-override", f"{what} takes a literal value, not an expression", 'e.g. 0.5, 3, true or "text"')
            return None
        v = self.eval(expr, ctx)
        if v is None:
            return None
        return self.coerce(v, spec, what)

    def _range_error(self, v: V, spec: ParamSpec, what: str, shown: Any) -> None:
        self.error(
            v.span,
            "out-of-range",
            f"{what} must be {spec.describe_range()}, got {_show(shown)}",
            _range_hint(spec),
            [v.origin] if v.origin else [],
        )

    def _check_range(self, v: V, spec: ParamSpec, x: float, what: str) -> bool:
        if (spec.min is not None and x < spec.min) or (spec.max is not None and x > spec.max):
            self._range_error(v, spec, what, x)
            return False
        return True

    def coerce(self, v: V, spec: ParamSpec, what: str) -> Any:
        """Check a value against a parameter type; returns the IR value or None (reported)."""
        t = spec.type
        if v.kind == "none":
            if spec.nullable:
                return None
            self.error(v.span, "type", f"{what} cannot be `none`", f"it expects {spec.describe_type()}")
            return None

        if v.kind == "sym" and t not in ("choice", "metrics", "roles", "role_group", "str"):
            self._unknown_name(v, {"reward": "reward", "loss": "loss"}.get(t, "value"))
            return None

        def wrong(expected: str | None = None) -> None:
            self.error(v.span, "type", f"{what} expects {expected or spec.describe_type()}, got {v.describe()}", _type_hint(spec, v))

        if t in ("int", "px"):
            if t == "px" and v.kind == "dim":
                if v.value[1] != "px":
                    return wrong()
                x = v.value[0]
            elif v.kind == "num":
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
            if v.kind != "num":
                return wrong()
            x = float(v.value)
            return x if self._check_range(v, spec, x, what) else None
        if t == "bool":
            return v.value if v.kind == "bool" else wrong()
        if t == "str":
            return v.value if v.kind == "str" else wrong()
        if t == "choice":
            if v.kind not in ("str", "sym"):
                return wrong()
            if v.value not in spec.choices:
                guess = did_you_mean(str(v.value), spec.choices)
                self.error(
                    v.span,
                    "unknown-choice",
                    f"{what} must be {spec.describe_type()}, got `{v.value}`",
                    f"did you mean `{guess}`?" if guess else None,
                )
                return None
            return v.value
        if t == "int_range":
            if v.kind == "num":
                x = self.coerce(v, ParamSpec(spec.name, "int", min=spec.min, max=spec.max), what)
                return None if x is None else (x, x)
            if v.kind == "range":
                lo, hi = v.value
                if lo > hi:
                    self.error(v.span, "out-of-range", f"{what}: range {lo}..{hi} is empty", f"write {hi}..{lo}")
                    return None
                ok = self._check_range(v, spec, lo, what) and self._check_range(v, spec, hi, what)
                return (lo, hi) if ok else None
            return wrong()
        if t == "value":
            if v.kind == "num":
                x = float(v.value)
                return x if self._check_range(v, spec, x, what) else None
            if v.kind == "sched":
                s: ScheduleIR = v.value
                for x in (s.start, s.end):
                    if x is not None and not self._check_range(v, spec, x, what):
                        return None
                return s
            return wrong()
        if t == "loss":
            if v.kind != "loss":
                return wrong("a loss such as `token_mean()` or `lam * mean(perception) + (1 - lam) * mean(reasoning, answer)`")
            return self._loss_ir(v)
        if t == "reward":
            if v.kind == "num":
                self.error(
                    v.span,
                    "type",
                    f"{what} is a constant {_show(v.value)}: it gives GRPO no signal",
                    "combine reward terms such as `outcome`",
                )
                return None
            if v.kind != "reward":
                return wrong()
            return v.value
        if t == "metrics":
            items = v.value if v.kind == "list" else [v]
            names = []
            for it in items:
                if it.kind not in ("sym", "str"):
                    self.error(it.span, "type", f"{what} lists metric names, got {it.describe()}", None)
                    return None
                if self.cat.get("metric", it.value) is None:
                    guess = did_you_mean(it.value, self.cat.names("metric"))
                    self.error(
                        it.span,
                        "unknown-metric",
                        f"unknown metric `{it.value}`",
                        f"did you mean `{guess}`?" if guess else f"metrics: {', '.join(self.cat.names('metric'))}",
                    )
                    return None
                names.append(it.value)
            return names
        if t == "str_list":
            if v.kind == "str":
                return v.value
            if v.kind == "list" and all(i.kind == "str" for i in v.value):
                return [i.value for i in v.value]
            return wrong()
        if t in ("roles", "role_group"):
            items = v.value if v.kind == "list" else [v]
            if t == "roles" and v.kind == "list":
                return wrong("role names")
            out = []
            for it in items:
                r = self._role(it)
                if r is None:
                    return None
                out.append(r)
            return out
        raise AssertionError(f"unhandled parameter type {t}")

    def _role(self, v: V) -> str | None:
        if v.kind != "sym":
            self.error(v.span, "type", f"expected a role name, got {v.describe()}", f"declared roles: {', '.join(self.roles)}")
            return None
        if v.value not in self.roles:
            guess = did_you_mean(v.value, self.roles)
            declared = self.roles[guess] if guess else None
            where = f" (declared at line {declared[1].line})" if declared and declared[1] != Span.point() else ""
            hint = f"did you mean `{guess}`?{where}" if guess else f"declared roles: {', '.join(self.roles)}"
            self.error(v.span, "unknown-role", f"loss uses role `{v.value}`, which the roles block does not declare", hint)
            return None
        return v.value

    def eval(self, e: A.Expr, ctx: str) -> V | None:
        """Evaluate an expression in a context: value, loss, reward or rule."""
        if isinstance(e, A.Number):
            return V("num", e.value, e.span)
        if isinstance(e, A.Dimension):
            return V("dim", (e.value, e.unit), e.span)
        if isinstance(e, A.String):
            return V("str", e.value, e.span)
        if isinstance(e, A.Bool):
            return V("bool", e.value, e.span)
        if isinstance(e, A.NoneLit):
            return V("none", None, e.span)
        if isinstance(e, A.Name):
            return self._name(e, ctx)
        if isinstance(e, A.ListExpr):
            items = [self.eval(i, ctx) for i in e.items]
            return None if any(i is None for i in items) else V("list", items, e.span)
        if isinstance(e, A.Range):
            lo, hi = self.eval(e.lo, "value"), self.eval(e.hi, "value")
            if lo is None or hi is None:
                return None
            for b in (lo, hi):
                if b.kind != "num" or not float(b.value).is_integer():
                    self.error(b.span, "type", f"range bounds are integers, got {b.describe()}", None)
                    return None
            return V("range", (int(lo.value), int(hi.value)), e.span)
        if isinstance(e, A.Call):
            return self._call(e, ctx)
        if isinstance(e, (A.Sum, A.Product)):
            acc = self.eval(e.first, ctx)
            for op, rhs in e.rest:
                r = self.eval(rhs, ctx)
                if acc is None or r is None:
                    acc = None
                    continue
                acc = self._binop(op, acc, r, e, ctx)
            return acc
        if isinstance(e, A.Signed):
            v = self.eval(e.operand, ctx)
            if v is None or e.signs.count("-") % 2 == 0:
                return v if v is None else V(v.kind, v.value, e.span, v.origin)
            return self._binop("*", V("num", -1, e.span), v, e, ctx, sign=True)
        if isinstance(e, (A.Compare, A.BoolOp, A.Not)):
            self.error(e.span, "type", "comparisons and `and`/`or`/`not` only appear in a grid's `where` filter", None)
            return None
        raise AssertionError(type(e))

    def _name(self, e: A.Name, ctx: str) -> V | None:
        name = e.id
        if name in self.params:
            info = self.params[name]
            info.used = True
            if info.value is None:
                return None
            kind = {"int": "num", "float": "num", "bool": "bool", "str": "str"}[info.type]
            origin = (
                Related(info.file, info.decl.name.span, f"`{name}` = {_show(info.value)}, set by {info.origin}")
                if info.origin != "default"
                else None
            )
            return V(kind, info.value, e.span, origin)
        if ctx == "reward":
            entry = self.cat.get("reward", name)
            if entry is not None:
                if any(p.required for p in entry.params):
                    self.error(e.span, "missing-argument", f"`{name}` needs arguments: {entry.signature()}", None)
                    return None
                return V(
                    "reward", RewardIR(kind="term", name=name, params={p.name: p.default for p in entry.params}, impl=entry.impl), e.span
                )
        if ctx == "loss" and self.cat.get("loss", name) is not None and name == "token_mean":
            return V("loss", [(1.0, None, e.span)], e.span)
        if ctx == "rule" and name == "rest":
            return V("rule", {"kind": "rest"}, e.span)
        return V("sym", name, e.span)

    def _unknown_name(self, v: V, ctx: str) -> None:
        pool = list(self.params)
        kinds = {"reward": ["reward"], "loss": [], "value": []}.get(ctx, [])
        for k in kinds:
            pool += self.cat.names(k)
        guess = did_you_mean(v.value, pool)
        if ctx == "reward":
            msg = f"`{v.value}` is neither a declared param nor a reward term"
        else:
            msg = f"`{v.value}` is not a declared param"
        hint = f"did you mean `{guess}`?" if guess else ("declare it: `param " + v.value + ": float = ...`")
        related = []
        if guess in self.params:
            related = [self._related(self.params[guess].file, self.params[guess].decl.name.span, f"param `{guess}` declared here")]
        self.error(v.span, "undeclared-param" if ctx != "reward" else "unknown-reward", msg, hint, related)

    # -- arithmetic over typed values
    def _binop(self, op: str, a: V, b: V, node: A.Node, ctx: str, sign: bool = False) -> V | None:
        span = node.span
        for x in (a, b):
            if x.kind == "sym":
                self._unknown_name(x, ctx)
                return None
        ka, kb = a.kind, b.kind
        if ka == "num" and kb == "num":
            if op == "/" and b.value == 0:
                self.error(b.span, "division-by-zero", "division by zero", None)
                return None
            x = {"+": lambda p, q: p + q, "-": lambda p, q: p - q, "*": lambda p, q: p * q, "/": lambda p, q: p / q}[op](a.value, b.value)
            if isinstance(x, float) and not math.isfinite(x):
                self.error(span, "bad-number", "arithmetic overflow", None)
                return None
            return V("num", x, span, a.origin or b.origin)
        if {ka, kb} <= {"num", "sched"}:
            return self._sched_arith(op, a, b, span)
        if "loss" in (ka, kb):
            return self._loss_arith(op, a, b, span, sign)
        if "reward" in (ka, kb):
            return self._reward_arith(op, a, b, span, sign)
        self.error(span, "type", f"cannot apply `{op}` to {a.describe()} and {b.describe()}", None)
        return None

    def _sched_arith(self, op: str, a: V, b: V, span: Span) -> V | None:
        s, n, s_left = (a.value, b.value, True) if a.kind == "sched" else (b.value, a.value, False)
        if op == "*" or (op == "/" and s_left):
            f = n if op == "*" else 1.0 / n
            upd = {"start": s.start * f, "end": None if s.end is None else s.end * f}
            return V("sched", s.model_copy(update=upd), span)
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
            return V("sched", s.model_copy(update=upd), span)
        self.error(
            span,
            "schedule-arith",
            f"`{op}` on a `{s.kind}` schedule is not supported",
            "schedules can be scaled by numbers; constant, linear and cosine can also be offset (e.g. `1 - linear(0.1, 0.5)`)",
        )
        return None

    def _weight_ok(self, w: V) -> bool:
        """Mixing weights of loss and reward terms lie in [0, 1]."""
        vals = [w.value] if w.kind == "num" else [w.value.start] + ([w.value.end] if w.value.end is not None else [])
        for x in vals:
            if not 0.0 <= x <= 1.0:
                self.error(
                    w.span,
                    "out-of-range",
                    f"mixing weight is {_show(x)}, outside [0, 1]",
                    "weights of loss and reward terms are between 0 and 1",
                    [w.origin] if w.origin else [],
                )
                return False
        return True

    def _loss_arith(self, op: str, a: V, b: V, span: Span, sign: bool) -> V | None:
        if sign:
            self.error(span, "type", "a loss cannot be negated", None)
            return None
        for x in (a, b):
            if x.kind == "loss" and isinstance(x.value, tuple):
                self.error(
                    x.span,
                    "type",
                    "`ngdiff(...)` balances gradients itself: it cannot be scaled or added to",
                    "use it as the whole loss: `loss = ngdiff(perception, [reasoning, answer])`",
                )
                return None
        if a.kind == "loss" and b.kind == "loss":
            if op == "+":
                return V("loss", a.value + b.value, span)
            self.error(
                span,
                "type",
                f"losses can be added, not combined with `{op}`",
                "weight each term instead: `0.3 * mean(perception) + 0.7 * mean(reasoning)`",
            )
            return None
        w, loss = (a, b) if b.kind == "loss" else (b, a)
        if w.kind not in ("num", "sched") or op not in "*/" or (op == "/" and w is a):
            self.error(
                span,
                "type",
                f"cannot apply `{op}` to {a.describe()} and {b.describe()}",
                "loss terms are weighted with `*` and added with `+`",
            )
            return None
        if op == "/":
            if w.kind != "num" or w.value == 0:
                self.error(w.span, "type", "a loss can only be divided by a non-zero number", None)
                return None
            w = V("num", 1.0 / w.value, w.span, w.origin)
        if not self._weight_ok(w):
            return None
        terms = []
        for weight, roles, sp in loss.value:
            if w.kind == "sched" and not (isinstance(weight, float) and weight == 1.0):
                self.error(span, "schedule-arith", "a scheduled weight can only multiply an unweighted term", None)
                return None
            nw = (
                w.value
                if w.kind == "sched"
                else (
                    weight.model_copy(update={"start": weight.start * w.value, "end": None if weight.end is None else weight.end * w.value})
                    if isinstance(weight, ScheduleIR)
                    else weight * w.value
                )
            )
            terms.append((nw, roles, sp))
        return V("loss", terms, span)

    def _reward_arith(self, op: str, a: V, b: V, span: Span, sign: bool) -> V | None:
        def as_reward(x: V) -> RewardIR | None:
            if x.kind == "reward":
                return x.value
            if x.kind == "num":
                return RewardIR(kind="const", value=float(x.value))
            self.error(x.span, "type", f"cannot combine {x.describe()} with a reward", None)
            return None

        if sign:
            return V("reward", RewardIR(kind="scale", value=-1.0, children=[b.value]), span)
        if op == "*" and (a.kind == "num" or b.kind == "num"):
            w, r = (a, b) if a.kind == "num" else (b, a)
            if not self._weight_ok(w):
                return None
            return V("reward", RewardIR(kind="scale", value=float(w.value), children=[r.value]), span)
        if op == "/":
            if b.kind != "num" or b.value == 0:
                self.error(b.span, "type", "a reward can only be divided by a non-zero number", None)
                return None
            return V("reward", RewardIR(kind="scale", value=1.0 / b.value, children=[a.value]), span)
        ra, rb = as_reward(a), as_reward(b)
        if ra is None or rb is None:
            return None
        if op == "*":
            return V("reward", RewardIR(kind="product", children=[ra, rb]), span)
        if op == "-":
            rb = RewardIR(kind="scale", value=-1.0, children=[rb])
        children = (ra.children if ra.kind == "sum" else [ra]) + [rb]
        return V("reward", RewardIR(kind="sum", children=children), span)

    # -- calls
    _CALL_KINDS = {"value": ("schedule",), "loss": ("loss", "schedule"), "reward": ("reward", "schedule"), "rule": ("role_rule",)}

    def _call(self, e: A.Call, ctx: str) -> V | None:
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
        args = self._bind(e, entry, "value" if ctx == "rule" else ctx)
        if args is None:
            return None
        if entry.kind == "schedule":
            return self._make_sched(entry.name, args, e.span)
        if entry.kind == "role_rule":
            rule = {"kind": entry.name, **args}
            if entry.name == "regex":
                try:
                    re.compile(args["pattern"])
                except re.error as exc:
                    self.error(e.args[0].span if e.args else e.span, "bad-regex", f"invalid regular expression: {exc}", None)
                    return None
            if entry.name == "between" and not args["open"]:
                self.error(e.span, "out-of-range", "the opening marker of `between` is empty", None)
                return None
            return V("rule", rule, e.span)
        if entry.kind == "loss":
            if entry.name == "token_mean":
                return V("loss", [(1.0, None, e.span)], e.span)
            if entry.name == "mean":
                if not args["roles"]:
                    self.error(e.span, "missing-argument", "`mean` needs at least one role", "e.g. `mean(perception)`")
                    return None
                return V("loss", [(1.0, tuple(args["roles"]), e.span)], e.span)
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
            return V("loss", ("ngdiff", [list(g) for g in groups], args["auto_lr"]), e.span)
        if entry.name == "gate":
            return V("reward", RewardIR(kind="gate", children=[args["value"], args["by"]]), e.span)
        return V("reward", RewardIR(kind="term", name=entry.name, params=args, impl=entry.impl), e.span)

    def _bind(self, e: A.Call, entry: Entry, ctx: str) -> dict | None:
        params = list(entry.params)
        out: dict[str, Any] = {}
        ok = True
        positional = [p for p in params]
        variadic = next((p for p in params if p.variadic), None)
        vals: dict[str, list[V]] = {}
        for i, arg in enumerate(e.args):
            v = self.eval(arg, ctx)
            if v is None:
                ok = False
                continue
            if variadic is not None and (i >= params.index(variadic)):
                vals.setdefault(variadic.name, []).append(v)
            elif i < len(positional):
                vals[positional[i].name] = [v]
            else:
                self.error(
                    arg.span,
                    "too-many-arguments",
                    f"`{entry.name}` takes at most {len(positional)} positional arguments",
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
                out[p.name] = _default(p)
                continue
            x = self.coerce(given[0], p, f"`{p.name}` of `{entry.name}`")
            if x is None and given[0].kind != "none":
                ok = False
            out[p.name] = x
        return out if ok else None

    def _make_sched(self, name: str, a: dict, span: Span) -> V:
        if name == "constant":
            s = ScheduleIR(kind="constant", start=a["value"], end=a["value"], warmup=a["warmup"])
        elif name == "warmup":
            s = ScheduleIR(kind="constant", start=a["value"], end=a["value"], warmup=a["steps"])
        elif name == "step":
            s = ScheduleIR(kind="step", start=a["start"], factor=a["factor"], every=a["every"], warmup=a["warmup"])
        else:
            s = ScheduleIR(kind=name, start=a["start"], end=a["end"], warmup=a["warmup"])
        return V("sched", s, span)

    def _loss_ir(self, v: V) -> LossIR:
        if isinstance(v.value, tuple):
            _, groups, auto_lr = v.value
            return LossIR(kind="ngdiff", groups=groups, auto_lr=auto_lr)
        terms = v.value
        seen: dict[str, Span] = {}
        for _, roles, sp in terms:
            for r in roles or ():
                if r in seen:
                    self.warning(
                        sp,
                        "overlapping-terms",
                        f"role `{r}` appears in two loss terms; its tokens are counted twice",
                        None,
                        [self._related(self.file, seen[r], "first term here")],
                    )
                seen[r] = sp
        all_roles = list(self.roles) + ([] if self.has_rest else [IMPLICIT_ROLE])
        if len(terms) == 1 and terms[0][0] == 1.0 and (terms[0][1] is None or set(terms[0][1]) == set(all_roles)):
            return LossIR(kind="token_mean")  # a mean over every role is the token mean: one IR, one hash
        return LossIR(
            kind="mix", terms=[LossTermIR(weight=w, roles=list(roles) if roles is not None else all_roles) for w, roles, _ in terms]
        )

    # -- catalogue lookups with "did you mean"
    def _lookup_named(self, name: A.Name, kind: str) -> Entry | None:
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

    # ================================================================ grid files
    def check_grid(self, items) -> GridIR | None:
        from .grid import check_grid

        return check_grid(self, items)


def _keyword(stmt: A.Node) -> str:
    return {A.Zip: "zip", A.Fix: "fix"}.get(type(stmt), type(stmt).__name__.lower())


def _default(p: ParamSpec) -> Any:
    d = p.default
    if p.type == "int_range" and isinstance(d, int):
        return (d, d)
    if p.type == "metrics" and isinstance(d, tuple):
        return list(d)
    if p.type == "loss" and d == "token_mean":
        return LossIR(kind="token_mean")
    return d


def _range_hint(spec: ParamSpec) -> str | None:
    if spec.min is not None and spec.max is not None and (spec.min, spec.max) == (0, 1):
        return "probabilities and weights are between 0 and 1"
    if spec.min == 1:
        return "counts and sizes are positive"
    return None


def _type_hint(spec: ParamSpec, v: V) -> str | None:
    if spec.type == "px" and v.kind == "num":
        return None
    if spec.type in ("int", "px") and v.kind == "num" and isinstance(v.value, float):
        return f"write a whole number, e.g. {round(v.value)}"
    if spec.type == "str" and v.kind == "sym":
        return f'strings are quoted: "{v.value}"'
    if spec.type == "value" and v.kind == "sym":
        return f"`{v.value}` is not a declared param"
    return None


# ---- public API ---------------------------------------------------------------------------------


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
    p = Path(path)
    loaded, diags = load(p, text)
    return _finish(loaded, diags, overrides, catalogue, origin, fragment_ok)


def check_text(
    text: str,
    name: str = "<string>",
    overrides: dict[str, str] | None = None,
    catalogue: Catalogue | None = None,
    base_dir: Path | None = None,
) -> Result:
    path = (base_dir or Path.cwd()) / name if base_dir is not None else None
    loaded, diags = load(path, text, name=name)
    return _finish(loaded, diags, overrides, catalogue)


def _finish(loaded: Loaded, diags: list[Diagnostic], overrides, catalogue, origin: str = "--set", fragment_ok: bool = True) -> Result:
    if loaded.tree is None or any(d.is_error and d.code in ("syntax", "encoding", "too-deep", "missing-file", "bad-number") for d in diags):
        return Result(None, diags, loaded)
    checker = Checker(loaded, catalogue or default_catalogue(), overrides, origin, fragment_ok)
    ir = checker.run()
    all_diags = diags + checker.diags
    if any(d.is_error for d in all_diags):
        ir = None
    return Result(ir, sorted(all_diags, key=lambda d: (d.file != loaded.name, d.file, d.span.line, d.span.column)), loaded, checker.symbols)


def parse_overrides(pairs: list[str]) -> tuple[dict[str, str], list[Diagnostic]]:
    """`["lam=0.5", "seed=3"]` → {"lam": "0.5", "seed": "3"}; malformed pairs are diagnostics."""
    out, diags = {}, []
    for pair in pairs:
        name, eq, value = pair.partition("=")
        name = name.strip()
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or not value.strip():
            diags.append(
                Diagnostic(
                    SET_FILE, Span.point(), Severity.ERROR, "bad-override", f"`--set {pair}` is not NAME=VALUE", "e.g. --set lam=0.5"
                )
            )
            continue
        out[name] = value.strip()
    return out, diags
