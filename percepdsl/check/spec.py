"""Experiment specs: params and overrides, seed, roles, task, model, stages (and their
order), eval and trainer — checked in that order, into an `ExperimentIR`.

A file without an `experiment` header that other specs include is a fragment: it is
checked as far as it stands alone (no task or stage required, params may be unused,
a stage may start from a stage of its includer).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .. import nodes as A
from ..catalogue import MODEL_PARTS, TOKEN_WEIGHT_MAX, Catalogue, ParamSpec
from ..diagnostics import Diagnostic, Related, Span, did_you_mean
from ..ir import (
    TASK_PARAMS,
    EvalIR,
    ExperimentIR,
    GRPOStageIR,
    LoraIR,
    ModelIR,
    RoleRuleIR,
    RoleWeights,
    SFTStageIR,
    TaskIR,
    TrainerIR,
    named_roles,
)
from ..parse import parse_expr
from .blocks import check_constraints, defaults
from .checker import SET_FILE, Checker, Result, run
from .load import load
from .values import IMPLICIT_ROLE, ParamInfo, Rule

PARAM_TYPES = ("int", "float", "bool", "str")
DEPENDENCY_ROLE = "perception"  # the role whose tokens the `visual_dependency` reward term reads (percepdsl_runtime.probe.METRIC_ROLE)
DEFAULT_ROLES = (
    RoleRuleIR(role="perception", kind="between", open="<perception>", close="</perception>"),
    RoleRuleIR(role="reasoning", kind="between", open="<reasoning>", close="</reasoning>"),
    RoleRuleIR(role="answer", kind="between", open="<answer>", close="</answer>"),
)
SEED = ParamSpec("seed", "int", 0, min=0, max=2**31 - 1)
SPEC_STATEMENTS = (A.Experiment, A.Param, A.Seed, A.Task, A.Model, A.Roles, A.Stage, A.Eval, A.Trainer)
ONCE = (A.Experiment, A.Seed, A.Task, A.Model, A.Roles, A.Eval, A.Trainer)  # statements a spec holds at most once


def check_experiment(ck: Checker) -> ExperimentIR | None:
    return _Spec(ck).check()


def check_spec_file(
    path: Path,
    overrides: dict[str, str] | None = None,
    catalogue: Catalogue | None = None,
    origin: str = "--set",
    fragment_ok: bool = True,
) -> Result:
    """Check a file as an experiment spec (whatever it holds)."""
    loaded, diags = load(path)
    return run(loaded, diags, check_experiment, overrides, catalogue, origin, fragment_ok)


class _Spec:
    def __init__(self, ck: Checker):
        self.ck = ck
        self.params = ck.scope.params
        self.roles = ck.scope.roles
        self.fragment = False

    def check(self) -> ExperimentIR | None:
        ck = self.ck
        once = tuple(c for c in ONCE if c is not A.Task)  # a second task gets its own message (_check_task)
        g = ck.group(ck.loaded.items, once, SPEC_STATEMENTS, "an experiment spec")
        exp = g.get(A.Experiment, [])
        # A file without a header that is only included by others is a fragment: it is
        # checked as far as it stands alone, and not required to be a whole experiment.
        self.fragment = not exp and not ck.loaded.is_root_only and ck.fragment_ok
        if not exp and not self.fragment:
            ck.error(ck.at_file(), "missing-block", "the spec has no `experiment` header", "start the file with `experiment my_experiment`")
        self._declare_params(g.get(A.Param, []))
        self._apply_overrides()

        seed = 0
        if A.Seed in g:
            seed = ck.coerce_expr(g[A.Seed][0].value, SEED, "seed")
        if "seed" in ck.overrides:
            seed = self._override_seed(seed)

        roles = self._check_roles(g.get(A.Roles, []))
        task = self._check_task(g.get(A.Task, []))
        model = self._check_model(g.get(A.Model, []), task)
        stages = self._check_stages(g.get(A.Stage, []), task)
        ev = self._check_simple_block(g.get(A.Eval, []), "eval")
        tr = self._check_simple_block(g.get(A.Trainer, []), "trainer")
        self._check_normalised_token_weights(g.get(A.Stage, []), stages, tr)
        self._check_sizes(task, g.get(A.Stage, []), stages, g.get(A.Eval, []), ev, tr)
        self._check_accumulate(g.get(A.Trainer, []), g.get(A.Stage, []), stages, tr)
        self._check_fp16_manual(g.get(A.Trainer, []), g.get(A.Stage, []), stages, tr)
        self._check_dtype_precision(g.get(A.Model, []), model, tr)
        self._check_stage_lengths(g.get(A.Stage, []), stages, g.get(A.Eval, []), ev)
        self._check_eval_reads(g.get(A.Eval, []), ev)
        self._check_visual_roles(g.get(A.Roles, []), roles, g.get(A.Stage, []), stages)
        self._check_dependency_reward(roles, g.get(A.Stage, []), stages)
        self._report_unused_params()

        if ck.has_errors() or not exp:
            return None
        role_names = [r.role for r in roles]
        if not any(r.kind == "rest" for r in roles):
            role_names.append(IMPLICIT_ROLE)
        return ExperimentIR(
            name=exp[0].name.id,
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
    def _declare_params(self, decls: list[A.Param]) -> None:
        ck = self.ck
        for p in decls:
            name = p.name.id
            if name in self.params:
                prev = self.params[name]
                ck.error(
                    p.name.span,
                    "duplicate",
                    f"param `{name}` is declared twice",
                    "remove one declaration",
                    [Related.at(prev.decl.name.span, "first declared here")],
                )
                continue
            ptype = p.type.id
            if ptype not in PARAM_TYPES:
                guess = did_you_mean(ptype, PARAM_TYPES)
                ck.error(
                    p.type.span,
                    "unknown-type",
                    f"unknown param type `{ptype}`",
                    f"did you mean `{guess}`?" if guess else "param types are int, float, bool and str",
                )
                ptype = None
            value = None
            if p.default is not None and ptype is not None:
                value = ck.coerce_expr(p.default, ParamSpec(name, ptype), f"param `{name}`")
            self.params[name] = ParamInfo(p, ptype or "float", value, "default")

    def _apply_overrides(self) -> None:
        ck = self.ck
        for name, text in ck.overrides.items():
            if name == "seed":
                continue
            if name not in self.params:
                guess = did_you_mean(name, self.params)
                ck.error(
                    ck.at_file(SET_FILE),
                    "unknown-param",
                    f"`--set {name}=...` names no param of this spec",
                    f"did you mean `{guess}`?" if guess else f"declared params: {', '.join(self.params) or 'none'}",
                )
                continue
            info = self.params[name]
            expr, diags = parse_expr(text)
            if expr is None:
                self._unparsable(name, text, diags, 'values are literals: 0.5, 3, true, "text"')
                continue
            if isinstance(expr, A.Name) and info.type == "str":
                value = expr.id  # bare words are strings for str params: --set task=sudoku
            else:
                value = ck.coerce_expr(expr, ParamSpec(name, info.type), f"`--set {name}`", literal_only=True)
            if value is not None:
                info.value, info.origin = value, ck.override_origin
        for name, info in self.params.items():
            if info.value is None and info.type is not None and not any(d.is_error and d.span == info.decl.type.span for d in ck.diags):
                if info.decl.default is None:
                    ck.error(
                        info.decl.name.span,
                        "unset-param",
                        f"param `{name}` has no default and is not set",
                        f"give it a default (`param {name}: {info.type} = ...`) or pass `--set {name}=...`",
                    )

    def _unparsable(self, name: str, text: str, diags: list[Diagnostic], hint: str) -> None:
        """A `--set` value that does not parse; a number out of bounds says so (`1e400`, 20 digits)."""
        bad = next((d for d in diags if d.code == "bad-number"), None)
        what = f": {bad.message}" if bad else ""
        self.ck.error(
            self.ck.at_file(SET_FILE), "bad-override", f"cannot parse the value of `--set {name}={text}`{what}", bad.hint if bad else hint
        )

    def _override_seed(self, seed: int) -> int:
        ck = self.ck
        expr, diags = parse_expr(ck.overrides["seed"])
        value = ck.coerce_expr(expr, SEED, "`--set seed`", literal_only=True) if expr else None
        if expr is None:
            self._unparsable("seed", ck.overrides["seed"], diags, "seeds are integers")
        return seed if value is None else value

    def _report_unused_params(self) -> None:
        if self.fragment:  # the params may be used by the specs that include the fragment
            return
        for name, info in self.params.items():
            if not info.used and info.value is not None:  # a param with an error was reported already
                self.ck.warning(
                    info.decl.name.span, "unused-param", f"param `{name}` is declared but never used", "use it in a setting or remove it"
                )

    # -- roles
    def _check_roles(self, decls: list[A.Roles]) -> list[RoleRuleIR]:
        ck = self.ck
        if not decls:
            for r in DEFAULT_ROLES:
                self.roles[r.role] = None
            return list(DEFAULT_ROLES)
        stmt = decls[0]
        rules: list[RoleRuleIR] = []
        rest_at: Span | None = None
        for entry in stmt.block.entries:
            if isinstance(entry, A.SubBlock):
                ck.error(entry.key.span, "type", f'role `{entry.key.id}` needs a rule such as `between("<a>", "</a>")`, not a block')
                continue
            role = entry.key.id
            if role in self.roles:
                ck.error(
                    entry.key.span,
                    "duplicate",
                    f"role `{role}` is declared twice",
                    "give each role one rule",
                    [Related.at(self.roles[role], "first declared here")],
                )
                continue
            self.roles[role] = entry.key.span
            v = ck.eval(entry.value, "rule")
            if v is None:
                continue
            if not isinstance(v, Rule):
                ck.error(
                    entry.value.span,
                    "type",
                    f"role `{role}` needs a rule (between, regex, rest or visual), got {v.describe()}",
                    'e.g. `perception = between("<perception>", "</perception>")`',
                )
                continue
            if v.kind == "rest":
                if rest_at is not None:
                    ck.error(
                        entry.value.span,
                        "duplicate",
                        "only one role can take `rest()`",
                        "the other characters can go to one role only",
                        [Related.at(rest_at, "`rest()` first used here")],
                    )
                    continue
                rest_at = entry.value.span
            rules.append(RoleRuleIR(role=role, kind=v.kind, **v.args))
        ck.scope.has_rest = rest_at is not None
        if not rules and stmt.block.entries == ():
            ck.error(
                stmt.span,
                "missing-block",
                "the roles block declares no role",
                'e.g. `perception = between("<perception>", "</perception>")`',
            )
        return rules

    def _check_dependency_reward(self, rules: list[RoleRuleIR], stage_decls: list[A.Stage], stages: list) -> None:
        """The `visual_dependency` reward term reads the rollout's `perception` tokens: the spec
        must declare that role (else every rollout would score 0)."""
        if self.fragment or any(r.role == DEPENDENCY_ROLE for r in rules):
            return
        decls = {st.name.id: st for st in stage_decls}
        for st in stages:
            if isinstance(st, GRPOStageIR) and any(t.name == "visual_dependency" for t in st.reward.terms()):
                entry = decls[st.name].block.get("reward")
                self.ck.error(
                    entry.value.span if entry is not None else decls[st.name].name.span,
                    "unknown-role",
                    f"reward term `visual_dependency` of stage `{st.name}` reads the `{DEPENDENCY_ROLE}` tokens of each "
                    "rollout, and the roles block does not declare that role",
                    f'declare it, e.g. `{DEPENDENCY_ROLE} = between("<perception>", "</perception>")`',
                )

    def _check_visual_roles(self, decls: list[A.Roles], rules: list[RoleRuleIR], stage_decls: list[A.Stage], stages: list) -> None:
        """A `visual` rule's `reference` names a stage that finishes before every stage that trains
        on the role (declared before it: stages run in declaration order); a visual role no stage
        trains on is never computed (a warning)."""
        ck = self.ck
        visual = [r for r in rules if r.kind == "visual"]
        if not visual or not decls or self.fragment:
            return
        calls = {e.key.id: e.value for e in decls[0].block.entries if not isinstance(e, A.SubBlock)}
        order = [st.name.id for st in stage_decls]
        spans = {st.name.id: st.name.span for st in stage_decls}
        for rule in visual:
            call = calls[rule.role]
            users = [st for st in stages if rule.role in named_roles(st)]
            ref = rule.reference
            ref_span = next((kw.value.span for kw in getattr(call, "kwargs", ()) if kw.name.id == "reference"), call.span)
            if ref is not None and ref not in order:
                guess = did_you_mean(ref, order)
                ck.error(
                    ref_span,
                    "unknown-stage",
                    f"role `{rule.role}` takes its reference model from stage `{ref}`, which is not defined",
                    f"did you mean `{guess}`?" if guess else "name an earlier stage, or drop `reference` to use each stage's start model",
                )
                continue
            for st in users:
                if ref is not None and order.index(ref) >= order.index(st.name):
                    ck.error(
                        ref_span,
                        "reference-order",
                        f"role `{rule.role}` takes its reference from stage `{ref}`, which has not finished when stage "
                        f"`{st.name}` trains on the role ({'it is that stage' if ref == st.name else 'it is declared after it'})",
                        "name a stage declared before it, or drop `reference` to use the stage's start model",
                        [Related.at(spans[st.name], f"stage `{st.name}` trains on `{rule.role}` here")],
                    )
            if not users and len(stages) == len(stage_decls):  # (a stage with errors may name it)
                ck.warning(
                    call.span,
                    "unused-role",
                    f"role `{rule.role}` is a `visual` rule that no stage's loss or token_weights names: it is never computed and tags no token",
                    f"name it in a loss, e.g. `0.5 * mean({rule.role}) + 0.5 * mean(...)`, or remove it",
                )

    # -- task and model
    def _check_task(self, decls: list[A.Task]) -> TaskIR | None:
        ck = self.ck
        if not decls and self.fragment:
            return None
        if not decls:
            ck.error(ck.at_file(), "missing-block", "the spec has no `task` block", "add e.g. `task graph_coloring { nodes = 5 }`")
            return None
        for extra in decls[1:]:
            ck.error(
                extra.span,
                "duplicate",
                "an experiment has one task",
                "split the tasks into two experiments (or a grid)",
                [Related.at(decls[0].span, "first task here")],
            )
        t = decls[0]
        entry = ck.lookup(t.name, "task")
        if entry is None:
            return None
        settings = ck.check_block(t.block, entry, f"task `{entry.name}`")
        if settings is not None and entry.name == "dataset" and entry.source == "percepdsl":
            from .data import check_dataset  # reads the data's layout: only for specs that name data

            settings = check_dataset(ck, t.block, settings)
        if settings is None:
            return None
        setting = t.block.get("edge_prob")
        if entry.name == "graph_coloring" and settings.get("edges") is not None and setting is not None:
            ck.warning(
                setting.key.span,
                "ignored-setting",
                f"`edge_prob` has no effect: `edges = {settings['edges']}` fixes every graph's edge count",
                "remove `edge_prob`, or `edges` to draw each edge with probability `edge_prob`",
            )
        return TaskIR(name=entry.name, params=settings, impl=entry.impl)

    def _check_model(self, decls: list[A.Model], task: TaskIR | None) -> ModelIR | None:
        ck = self.ck
        if not decls:
            tiny = ck.cat.get("model", "tiny")
            return ModelIR(kind="tiny", params={p.name: p.default for p in tiny.params}, impl=tiny.impl)
        m = decls[0]
        entry = ck.lookup(m.kind, "model")
        if entry is None:
            return None
        block = m.block or A.Block(m.span, ())
        lora_blk = block.get("lora")
        if entry.name == "hf":
            if m.path is None:
                ck.error(
                    m.kind.span,
                    "missing-setting",
                    "`model hf` needs the checkpoint's path",
                    'write `model hf "/path/to/checkpoint" { ... }`',
                )
        elif m.path is not None:
            ck.error(m.path.span, "unexpected-path", f"model `{entry.name}` takes no path", 'only `model hf "/path"` loads a checkpoint')
        if lora_blk is not None and entry.name != "hf":
            ck.error(
                lora_blk.key.span,
                "unknown-setting",
                f"LoRA applies to `hf` models, not `{entry.name}`",
                "the tiny model trains all its weights",
            )
        params = ck.check_block(block, entry, f"model `{entry.name}`", subblocks=("lora",))
        lora = None
        if isinstance(lora_blk, A.SubBlock) and entry.name == "hf":
            lv = ck.check_block(lora_blk.block, ck.cat.get("block", "lora"), "lora")
            if lv is not None:
                lora = LoraIR(**lv)
        if entry.name == "tiny" and params and task is not None:
            image, patch = task.param("image"), params.get("patch")
            if isinstance(image, int) and isinstance(patch, int) and image % patch:
                sp = block.get("patch").span if block.get("patch") else m.span
                ck.error(
                    sp,
                    "incompatible",
                    f"image size {image}px is not a multiple of the patch size {patch}px",
                    f"use patch = {math.gcd(image, patch)}px or an image size that is a multiple of {patch}",
                )
        if params is None:
            return None
        return ModelIR(kind=entry.name, path=m.path.value if m.path else None, params=params, lora=lora, impl=entry.impl)

    # -- stages
    def _check_stages(self, decls: list[A.Stage], task: TaskIR | None) -> list[SFTStageIR | GRPOStageIR]:
        ck = self.ck
        if not decls and self.fragment:
            return []
        if not decls:
            ck.error(ck.at_file(), "missing-block", "the spec has no stage", "add e.g. `stage base = sft { steps = 600 }`")
            return []
        seen: dict[str, A.Stage] = {}
        built: dict[str, SFTStageIR | GRPOStageIR] = {}
        for st in decls:
            name = st.name.id
            if name in seen:
                ck.error(
                    st.name.span,
                    "duplicate",
                    f"stage `{name}` is defined twice",
                    "rename one of them",
                    [Related.at(seen[name].name.span, "first defined here")],
                )
                continue
            seen[name] = st
        for name, st in seen.items():
            kind = st.kind.id
            entry = ck.cat.get("block", kind) if kind in ("sft", "grpo") else None
            if entry is None:
                guess = did_you_mean(kind, ["sft", "grpo"])
                ck.error(
                    st.kind.span,
                    "unknown-stage-kind",
                    f"unknown stage kind `{kind}`",
                    f"did you mean `{guess}`?" if guess else "stages are `sft` or `grpo`",
                )
                continue
            # a fragment's stage may start from a stage of the spec that includes it
            if st.parent is not None and st.parent.id not in seen and not self.fragment:
                guess = did_you_mean(st.parent.id, [n for n in seen if n != name])
                ck.error(
                    st.parent.span,
                    "unknown-stage",
                    f"stage `{name}` starts from `{st.parent.id}`, which is not defined",
                    f"did you mean `{guess}`?" if guess else "define that stage, or drop `from` to start from the initial model",
                )
            subblocks = ("token_weights", "task") if kind == "grpo" else ("task",)
            settings = ck.check_block(st.block, entry, f"stage `{name}` ({kind})", subblocks=subblocks)
            weights_blk = st.block.get("token_weights")
            if isinstance(weights_blk, A.SubBlock) and kind == "grpo":
                weights = self._token_weights(weights_blk)
                if settings is not None:
                    settings["token_weights"] = weights
                if weights is False:
                    settings = None
            task_blk = st.block.get("task")
            if isinstance(task_blk, A.SubBlock):
                own = self._stage_task(name, task_blk, task)
                if own is False:
                    settings = None
                elif settings is not None:
                    settings["task"] = own
            if settings is None:
                continue
            # the checked settings are the typed stage's fields (the catalogue's block entry)
            stage_ir = SFTStageIR if kind == "sft" else GRPOStageIR
            if set(settings.get("freeze", ())) == set(MODEL_PARTS):  # nothing would train
                ck.error(
                    st.block.get("freeze").value.span,
                    "nothing-to-train",
                    f"stage `{name}` freezes every part of the model ({', '.join(MODEL_PARTS)}): no weight would train",
                    "leave a part out of `freeze`, e.g. `freeze = [vision, projector]` trains the language model alone",
                )
                continue
            built[name] = stage_ir(name=name, parent=st.parent.id if st.parent else None, **settings)
            tries = st.block.get("resample_tries") if kind == "grpo" else None
            if tries is not None and built[name].constant_groups != "resample":
                ck.warning(
                    tries.key.span,
                    "ignored-setting",
                    f"`resample_tries` has no effect: stage `{name}` has `constant_groups = {built[name].constant_groups}`",
                    "set `constant_groups = resample`, or remove `resample_tries`",
                )
            if kind == "grpo" and st.parent is None and self._model_is_tiny():
                ck.warning(
                    st.kind.span,
                    "grpo-from-scratch",
                    f"GRPO stage `{name}` starts from the randomly initialised tiny model",
                    "start it `from` an sft stage that has taught the output format",
                )
        return self._order_stages(seen, built)

    def _stage_task(self, stage: str, blk: A.SubBlock, task: TaskIR | None) -> TaskIR | None | bool:
        """A stage's `task { ... }`: some of the experiment task's settings, for this stage's training
        data. Only the settings the catalogue marks for stages (`ParamSpec.stage`: how items are written
        or drawn) may be set; the others are the experiment's task block's, after its defaults (not the
        parent stage's). The whole task, typed; None when it is the experiment's (one IR, one hash);
        False when something was wrong."""
        ck = self.ck
        if task is None:  # the task block was wrong (reported), or a fragment's includer has the task
            return None
        entry = ck.cat.get("task", task.name)
        if entry is None:
            return None
        allowed = entry.stage_settings()
        if not allowed:
            why = (
                "its items are the rows of the data on disk, written as they are"
                if task.name == "dataset" and entry.source == "percepdsl"
                else "its catalogue entry marks no setting for stages"
            )
            ck.error(
                blk.key.span,
                "stage-task",
                f"stage `{stage}`: a stage cannot set settings of task `{task.name}`: {why}",
                "remove the stage's `task { ... }`, or write the data differently for a second experiment",
            )
            return False
        names = [p.name for p in allowed]
        ok, kept = True, []
        for e in blk.block.entries:  # a setting of the task that is not a stage's: said as such
            spec = None if isinstance(e, A.SubBlock) else entry.param(e.key.id)
            if spec is None or spec.stage:
                kept.append(e)
                continue
            key = e.key.id
            ck.error(
                e.key.span,
                "stage-task",
                f"stage `{stage}` cannot set `{key}`: "
                + (
                    "the model's vision input is built for the experiment's image size"
                    if key == "image"
                    else "a stage may change how the task's items are written or drawn, not which instances exist, "
                    "the split sizes or p*'s format, so that every stage is evaluated on the same test items"
                ),
                f"set `{key}` in the `task {task.name}` block; a stage may set: {', '.join(names)}",
            )
            ok = False
        written = A.Block(blk.block.span, tuple(kept))
        own = ck.check_block(written, entry.for_stage(), f"the `task` of stage `{stage}`", fill=False)
        if not blk.block.entries:
            ck.error(
                blk.key.span,
                "missing-setting",
                f"the `task` of stage `{stage}` sets nothing",
                f"set one of {', '.join(names)}, or remove the block",
            )
            return False
        if not ok or own is None:
            return False
        base = task.params if isinstance(task.params, dict) else task.params.model_dump()
        merged = {**base, **own}
        if not check_constraints(ck.values, entry, merged, blk.block):
            return False
        if merged == base:
            return None  # the experiment's task, written again
        return TaskIR(name=task.name, params=merged, impl=task.impl)

    def _token_weights(self, blk: A.SubBlock) -> RoleWeights | None | bool:
        """A grpo stage's `token_weights { role = weight ... }`: every key a declared role,
        every weight a number or schedule within the catalogue's range. Weights that are all
        exactly 1 are plain GRPO (None: one IR, one hash). False when something was wrong."""
        ck, ok = self.ck, True
        roles = ck.scope.all_roles()
        weights: dict[str, Any] = {}
        for e in blk.block.entries:
            if isinstance(e, A.SubBlock):
                ck.error(e.key.span, "type", f"`token_weights` maps roles to weights; `{e.key.id}` cannot hold a block", None)
                ok = False
                continue
            role = e.key.id
            if role in weights:
                ck.error(e.key.span, "duplicate", f"role `{role}` is weighted twice in `token_weights`", "keep one")
                ok = False
                continue
            if role not in roles:
                ck.values.unknown_role(role, e.key.span, "`token_weights` names")
                ok = False
                continue
            spec = ParamSpec(role, "value", min=0, max=TOKEN_WEIGHT_MAX)
            w = ck.coerce_expr(e.value, spec, f"the weight of `{role}`")
            if w is None:
                ok = False
                continue
            weights[role] = w
        if not blk.block.entries:
            ck.error(
                blk.key.span,
                "missing-setting",
                "`token_weights` names no role",
                "weight a role, e.g. `token_weights { perception = 2.0 }`, or remove the block",
            )
            return False
        if not ok:
            return False
        if all(isinstance(w, float) and w == 1.0 for w in weights.values()):
            return None  # every token at weight 1: plain GRPO
        return RoleWeights(weights=weights)

    def _check_normalised_token_weights(self, decls: list[A.Stage], stages: list[SFTStageIR | GRPOStageIR], tr: dict) -> None:
        """`token_weights = ngdiff(...)` normalises this device's group gradients: one device only."""
        if tr.get("devices", 1) * tr.get("num_nodes", 1) <= 1:
            return
        normalised = {
            s.name for s in stages if isinstance(s, GRPOStageIR) and s.token_weights is not None and s.token_weights.kind == "ngdiff"
        }
        for st in decls:
            setting = st.block.get("token_weights")
            if st.name.id in normalised and setting is not None:
                self.ck.error(
                    setting.span,
                    "incompatible",
                    f"stage `{st.name.id}`: `token_weights = ngdiff(...)` runs on one device, and the trainer block asks for several",
                    "use fixed or scheduled weights (`token_weights { perception = 2.0 }`) with several devices",
                )

    def _check_sizes(
        self, task: TaskIR | None, decls: list[A.Stage], stages: list[SFTStageIR | GRPOStageIR], ev_decls: list[A.Eval], ev: dict, tr: dict
    ) -> None:
        """A stage's batch (on every rank) and the eval's `test` within the task's splits, where a
        built-in task says how many items they hold: the sft sampler would make the batch the whole
        split, the grpo sampler stops, and the evaluation would take the whole test split, each
        silently something other than the spec says."""
        if task is None or task.name not in TASK_PARAMS:
            return
        train, test = task.param("train"), task.param("test")  # none: a dataset's every row, counted at run time
        ranks = tr.get("devices", 1) * tr.get("num_nodes", 1)
        by_name = {st.name.id: st for st in decls}
        for stage in stages:
            if not isinstance(train, int) or stage.batch * ranks <= train or stage.name not in by_name:
                continue
            st = by_name[stage.name]
            setting = st.block.get("batch")
            what = f"`batch = {stage.batch}`" + (f" on each of {ranks} ranks" if ranks > 1 else "")
            self.ck.error(
                setting.span if setting is not None else st.name.span,
                "incompatible",
                f"stage `{stage.name}`: {what} is more than the {train} training items of the task",
                "lower `batch` or raise the task's `train`",
            )
        setting = ev_decls[0].block.get("test") if ev_decls else None
        if isinstance(test, int) and ev.get("test") is not None and ev["test"] > test and setting is not None:
            self.ck.error(
                setting.span,
                "incompatible",
                f"`test = {ev['test']}` is more than the {test} test items of the task",
                "lower the eval's `test`, raise the task's `test`, or drop it to evaluate the whole test split",
            )

    def _check_accumulate(self, tr_decls: list[A.Trainer], decls: list[A.Stage], stages: list[SFTStageIR | GRPOStageIR], tr: dict) -> None:
        """`trainer { accumulate }` is what sft stages do: ngdiff normalises each batch's gradients and
        cannot accumulate them (an error), and a grpo stage trains without it (a warning)."""
        setting = tr_decls[0].block.get("accumulate") if tr_decls else None
        if setting is None or tr.get("accumulate", 1) <= 1:
            return
        spans = {st.name.id: st.name.span for st in decls}
        ngdiff = [s.name for s in stages if isinstance(s, SFTStageIR) and s.loss.kind == "ngdiff"]
        grpo = [s.name for s in stages if isinstance(s, GRPOStageIR)]
        if ngdiff:
            self.ck.error(
                setting.span,
                "incompatible",
                f"`accumulate = {tr['accumulate']}`: ngdiff normalises every batch's gradients and cannot accumulate them "
                f"(stage {', '.join(f'`{n}`' for n in ngdiff)})",
                "use a larger `batch` instead",
                [Related.at(spans[n], f"stage `{n}` trains with ngdiff") for n in ngdiff if n in spans],
            )
        if grpo:
            self.ck.warning(
                setting.span,
                "ignored-setting",
                f"`accumulate = {tr['accumulate']}` has no effect on grpo stage {', '.join(f'`{n}`' for n in grpo)}: "
                "each of its steps updates on one generated batch",
                "raise the grpo stage's `batch` for more prompts per update",
                [Related.at(spans[n], f"grpo stage `{n}`") for n in grpo if n in spans],
            )

    def _check_fp16_manual(self, tr_decls: list[A.Trainer], decls: list[A.Stage], stages: list[SFTStageIR | GRPOStageIR], tr: dict) -> None:
        """`precision = "16-mixed"` beside a stage that steps its own optimiser (grpo, and an sft stage
        trained with ngdiff): Lightning's fp16 loss scaler unscales the gradients only inside the
        optimiser step, after such a stage has clipped them (and ngdiff has normalised them), so the clip
        would act on gradients ×65,536 and ngdiff's step would be divided by the scale. bf16 needs no scaler."""
        setting = tr_decls[0].block.get("precision") if tr_decls else None
        if setting is None or tr.get("precision") != "16-mixed":
            return
        spans = {st.name.id: st.name.span for st in decls}
        manual = [s.name for s in stages if isinstance(s, GRPOStageIR) or (isinstance(s, SFTStageIR) and s.loss.kind == "ngdiff")]
        if manual:
            self.ck.error(
                setting.span,
                "incompatible",
                f'`precision = "16-mixed"` scales the loss for fp16, and stage {", ".join(f"`{n}`" for n in manual)} '
                "clips (or normalises) its gradients before Lightning unscales them",
                'write `precision = "bf16-mixed"` (no loss scaling) or "32-true"',
                [Related.at(spans[n], f"stage `{n}` steps its own optimiser") for n in manual if n in spans],
            )

    def _check_dtype_precision(self, decls: list[A.Model], model: ModelIR | None, tr: dict) -> None:
        """Half-precision weights under the other half's autocast (`dtype = float16` under
        `bf16-mixed`, the default, or `bfloat16` under `16-mixed`): autocast mixes only its own half
        type with fp32, so the first step stopped with `RuntimeError: Unexpected floating ScalarType in
        at::autocast::prioritize` (CLIP's embeddings concatenate an fp16 weight with a bf16 product)."""
        other = {"float16": "bf16-mixed", "bfloat16": "16-mixed"}
        if (
            model is None
            or not decls
            or (dtype := getattr(model.params, "dtype", None)) not in other
            or tr.get("precision") != other[dtype]
        ):
            return
        setting = (decls[0].block or A.Block(decls[0].span, ())).get("dtype")
        if setting is None:
            return
        fits = "bf16-true" if dtype == "float16" else "bf16-mixed"
        self.ck.error(
            setting.span,
            "incompatible",
            f'`dtype = {dtype}` weights under `precision = "{tr["precision"]}"`: its autocast mixes only '
            f"{'bfloat16' if dtype == 'float16' else 'float16'} with float32, so training stops in its first step",
            f'write `dtype = {"bfloat16" if dtype == "float16" else "float16"}` (or float32), or `precision = "32-true"` or "{fits}" in the trainer block',
        )

    def _check_stage_lengths(self, decls: list[A.Stage], stages: list[SFTStageIR | GRPOStageIR], ev_decls: list[A.Eval], ev: dict) -> None:
        """Written settings a stage is too short to reach (warnings: the run does what they say, which is
        rarely what was meant): an lr warmup of at least the stage's steps (the learning rate never
        reaches its peak), and an evaluation interval (`eval_every`, or the eval block's `every` for
        every stage) of at least the stage's steps (no evaluation but the final one, which always runs)."""
        by_name = {st.name.id: st for st in decls}
        every = ev_decls[0].block.get("every") if ev_decls else None
        for stage in stages:
            st = by_name.get(stage.name)
            if st is None:
                continue
            lr = st.block.get("lr")
            if lr is not None and not isinstance(stage.lr, float) and stage.lr.warmup >= stage.steps:
                self.ck.warning(
                    lr.span,
                    "ignored-setting",
                    f"stage `{stage.name}`: the lr warmup of {stage.lr.warmup} steps is at least its {stage.steps} steps: "
                    f"the learning rate never reaches {stage.lr.first:g}",
                    "shorten the warmup or lengthen the stage",
                )
            own = st.block.get("eval_every")
            setting, n = (own, stage.eval_every) if own is not None else (every, ev.get("every"))
            if setting is not None and n is not None and n >= stage.steps:
                self.ck.warning(
                    setting.span,
                    "ignored-setting",
                    f"stage `{stage.name}`: an evaluation every {n} steps never comes before its end at step {stage.steps} "
                    "(the final evaluation always runs)",
                    "evaluate more often, or remove the interval",
                )

    def _check_eval_reads(self, decls: list[A.Eval], ev: dict) -> None:
        """Eval settings that a written other setting leaves unread: the per-item cap's `cap_factor` and
        `cap_margin` beside one `max_new_tokens` for every item, and `top_p` under greedy decoding."""
        if not decls:
            return
        block = decls[0].block
        unread = []
        if ev.get("max_new_tokens") is not None:
            why = f"`max_new_tokens = {ev['max_new_tokens']}` caps every item"
            unread += [(k, why, f"remove `{k}`, or `max_new_tokens` for per-item caps") for k in ("cap_factor", "cap_margin")]
        if ev.get("temperature") == 0:
            unread.append(("top_p", "`temperature = 0` decodes greedily", "remove `top_p`, or sample with a `temperature` above 0"))
        for key, why, hint in unread:
            if (setting := block.get(key)) is not None:
                self.ck.warning(setting.key.span, "ignored-setting", f"`{key}` has no effect: {why}", hint)

    def _model_is_tiny(self) -> bool:
        return not any(isinstance(s, A.Model) and s.kind.id != "tiny" for s in self.ck.loaded.items)

    def _order_stages(self, seen: dict[str, A.Stage], built: dict[str, SFTStageIR | GRPOStageIR]) -> list[SFTStageIR | GRPOStageIR]:
        """Topological order (declaration order among independent stages); cycles are errors."""
        order: list[str] = []
        state: dict[str, int] = {}  # 1 = visiting, 2 = done

        def visit(name: str, path: list[str]) -> None:
            if state.get(name) == 2:
                return
            if state.get(name) == 1:
                cycle = path[path.index(name) :] + [name]
                st = seen[name]
                self.ck.error(
                    st.parent.span if st.parent else st.name.span,
                    "stage-cycle",
                    "stages form a cycle: " + " → ".join(f"`{c}`" for c in cycle),
                    "one stage of the cycle must start from the initial model (drop its `from`)",
                )
                for c in cycle:
                    state[c] = 2
                return
            state[name] = 1
            parent = seen[name].parent
            if parent is not None and parent.id in seen:
                visit(parent.id, path + [name])
            if state[name] == 1:
                state[name] = 2
                order.append(name)

        for name in seen:
            visit(name, [])
        return [built[n] for n in order if n in built]

    def _check_simple_block(self, decls: list[A.Eval] | list[A.Trainer], kind: str) -> dict:
        entry = self.ck.cat.get("block", kind)
        if not decls:
            return defaults(entry)
        return self.ck.check_block(decls[0].block, entry, f"`{kind}`") or defaults(entry)
