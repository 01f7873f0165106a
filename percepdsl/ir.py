"""The IR: the contract between the language and the runtime.

Plain pydantic data, JSON-serialisable, with a content hash over everything that
changes what a run computes. Source spans, comments and formatting are not part of
it, so reformatting a spec never changes its hash (nor its run directory).

Every setting of a built-in entry is a typed field whose default, range and doc come
from the catalogue (`setting`): the catalogue is the one place that declares them, and
the runtime reads these objects as they are, never a dict with defaults of its own.

- stages are a discriminated union on `kind`: `SFTStageIR` | `GRPOStageIR`;
- a learning rate or a loss weight is a `Value`: a number, or a `Schedule` (one model per
  schedule kind), evaluated in absolute values by `value_at` — the one schedule
  evaluator, for learning rates and weights of both stage kinds;
- a loss is a `Loss`: `TokenMeanLoss` | `MixLoss` | `NGDiffLoss`; a grpo stage's token
  weighting is `TokenWeights`: `RoleWeights` | `NGDiffLoss`;
- built-in tasks and models carry typed parameters (`GraphColoringParams`,
  `SudokuParams`, `TinyParams`, `HFParams`); a plugin's parameters stay a checked dict.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from . import catalogue as cat

IR_VERSION = 2


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def setting(kind: str, entry: str, name: str) -> Any:
    """The pydantic field of a built-in catalogue parameter: its default (none when the
    catalogue requires the setting), its range (numbers), its doc."""
    spec = cat.builtin(kind, entry).param(name)
    assert spec is not None, f"{kind} `{entry}` has no parameter `{name}`"
    kw: dict[str, Any] = {"description": spec.doc}
    if spec.type in ("int", "float", "px") and not spec.choices:
        if spec.min is not None:
            kw["ge"] = spec.min
        if spec.max is not None:
            kw["le"] = spec.max
    if spec.required:
        return Field(**kw)
    d = cat.default(kind, entry, name)
    if spec.type == "loss" and d == "token_mean":
        return Field(default_factory=TokenMeanLoss, **kw)
    if isinstance(d, list):
        return Field(default_factory=lambda: list(d), **kw)
    return Field(default=d, **kw)


# ---- schedules: a value over a stage's steps ------------------------------------------------------


class _Schedule(_Model):
    warmup: int = setting("schedule", "linear", "warmup")  # the same parameter in every schedule entry

    def at(self, step: int, total: int) -> float:
        """The value at optimiser step `step` (0-based) of a stage of `total` steps.

        The first `warmup` steps ramp linearly from 0 to the schedule's start (0 at step 0);
        the schedule then runs over the remaining `total - warmup` steps, `frac` going from 0
        at the first step after the warmup to 1 one step past the last (Hugging Face's
        convention)."""
        if step < self.warmup:
            return self.first * step / self.warmup
        frac = min(max((step - self.warmup) / max(total - self.warmup, 1), 0.0), 1.0)
        return self._after_warmup(step - self.warmup, frac)

    @property
    def first(self) -> float:
        raise NotImplementedError

    def _after_warmup(self, k: int, frac: float) -> float:
        raise NotImplementedError


class ConstantSchedule(_Schedule):
    """`constant(value)` and `warmup(value, steps)`."""

    kind: Literal["constant"] = "constant"
    value: float

    @property
    def first(self) -> float:
        return self.value

    def _after_warmup(self, k: int, frac: float) -> float:
        return self.value


class LinearSchedule(_Schedule):
    kind: Literal["linear"] = "linear"
    start: float
    end: float

    @property
    def first(self) -> float:
        return self.start

    def _after_warmup(self, k: int, frac: float) -> float:
        return self.start + (self.end - self.start) * frac


class CosineSchedule(_Schedule):
    kind: Literal["cosine"] = "cosine"
    start: float
    end: float = setting("schedule", "cosine", "end")

    @property
    def first(self) -> float:
        return self.start

    def _after_warmup(self, k: int, frac: float) -> float:
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * frac))


class StepSchedule(_Schedule):
    kind: Literal["step"] = "step"
    start: float
    factor: float = setting("schedule", "step", "factor")
    every: int = setting("schedule", "step", "every")

    @property
    def first(self) -> float:
        return self.start

    def _after_warmup(self, k: int, frac: float) -> float:
        return self.start * self.factor ** (k // self.every)


Schedule = Annotated[ConstantSchedule | LinearSchedule | CosineSchedule | StepSchedule, Field(discriminator="kind")]
Value = float | Schedule


def value_at(v: float | _Schedule, step: int, total: int) -> float:
    """A `Value` (number or schedule) at optimiser step `step` of `total`: the one schedule
    evaluator, for learning rates and for loss and reward weights, in absolute values."""
    return float(v) if isinstance(v, (int, float)) else v.at(step, total)


# ---- losses ---------------------------------------------------------------------------------------


class LossTerm(_Model):
    """`weight · (token mean of the cross-entropy over the tokens of `roles`)`."""

    weight: Value
    roles: list[str] = Field(min_length=1)


class TokenMeanLoss(_Model):
    """Cross-entropy averaged over every target token (the baseline)."""

    kind: Literal["token_mean"] = "token_mean"


class MixLoss(_Model):
    """Σ terms; `mean(reasoning, answer)` alone is a mix of one term."""

    kind: Literal["mix"] = "mix"
    terms: list[LossTerm] = Field(min_length=1)


class NGDiffLoss(_Model):
    """Each group's token-mean gradient normalised to unit norm, then summed."""

    kind: Literal["ngdiff"] = "ngdiff"
    groups: list[list[str]] = Field(min_length=2)
    auto_lr: bool = setting("loss", "ngdiff", "auto_lr")
    auto_lr_every: int = setting("loss", "ngdiff", "auto_lr_every")
    norm_every: int = setting("loss", "ngdiff", "norm_every")


Loss = Annotated[TokenMeanLoss | MixLoss | NGDiffLoss, Field(discriminator="kind")]


class RoleWeights(_Model):
    """A grpo stage's `token_weights { role = value ... }`: each completion token's policy
    loss is multiplied by its role's weight (a number or a schedule); roles not named keep 1."""

    kind: Literal["weights"] = "weights"
    weights: dict[str, Value] = Field(min_length=1)


#: A grpo stage's token weighting: fixed or scheduled role weights, or NGDiff over role groups
#: of the policy loss (`NGDiffLoss`'s groups and `norm_every`; its auto-LR is SFT's only).
TokenWeights = Annotated[RoleWeights | NGDiffLoss, Field(discriminator="kind")]


# ---- rewards --------------------------------------------------------------------------------------


class RewardIR(_Model):
    """A reward expression tree.

    term: a catalogue reward term (`name`, `params`, `impl`); const: `value` (a number);
    sum: Σ `children`; product: Π `children`; scale: `value` · `children[0]`, where `value` is a
    number or a schedule over the stage's steps (`linear(0.1, 0.5) * perception_match`: the
    weight at each step is `value_at(value, step, steps)`, the evaluator of learning rates and
    loss weights); gate: `children[0]` where `children[1]` is 1, else 0.
    """

    kind: Literal["term", "const", "sum", "product", "scale", "gate"]
    name: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    impl: str | None = None
    value: Value | None = None
    children: list[RewardIR] = Field(default_factory=list)

    @model_validator(mode="after")
    def _shape(self) -> RewardIR:
        need = {
            "term": self.name is not None and not self.children,
            "const": isinstance(self.value, (int, float)) and not self.children,
            "sum": len(self.children) >= 1,
            "product": len(self.children) >= 1,
            "scale": self.value is not None and len(self.children) == 1,
            "gate": len(self.children) == 2,
        }[self.kind]
        if not need:
            raise ValueError(f"malformed `{self.kind}` reward node")
        return self

    def terms(self) -> list[RewardIR]:
        """Every leaf term, in order (each is logged by name)."""
        if self.kind == "term":
            return [self]
        return [t for c in self.children for t in c.terms()]

    def scheduled(self) -> list[RewardIR]:
        """Every `scale` node whose weight is a schedule, in order (each weight is logged by name)."""
        own = [self] if self.kind == "scale" and not isinstance(self.value, (int, float)) else []
        return own + [s for c in self.children for s in c.scheduled()]


# ---- roles, task, model -----------------------------------------------------------------------------


def _visual_spec(name: str) -> Any:
    return cat.builtin("role_rule", "visual").param(name)


class RoleRuleIR(_Model):
    """One role rule. ``visual`` (label-free, computed with a reference model per batch by the
    runtime, see ``percepdsl_runtime.probe.VisualRoles``) holds ``threshold``, ``reference``,
    ``refresh`` and ``against``; the other kinds leave them unset and do not dump them (their
    specs keep their content hashes)."""

    role: str
    kind: Literal["between", "regex", "rest", "visual"]
    open: str | None = None
    close: str | None = None
    markers: bool = True
    pattern: str | None = None
    threshold: float | None = Field(default=None, ge=_visual_spec("threshold").min, le=_visual_spec("threshold").max)
    reference: str | None = None
    refresh: int | None = Field(default=None, ge=_visual_spec("refresh").min, le=_visual_spec("refresh").max)
    against: Literal["other", "blank"] | None = None

    @model_validator(mode="after")
    def _visual(self) -> RoleRuleIR:
        visual = (self.threshold, self.refresh, self.against)
        if self.kind == "visual" and None in visual:
            raise ValueError("a `visual` role rule needs threshold, refresh and against")
        if self.kind != "visual" and (any(v is not None for v in visual) or self.reference is not None):
            raise ValueError(f"threshold, reference, refresh and against belong to `visual` rules, not `{self.kind}`")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> Any:
        out = handler(self)
        if self.kind != "visual" and isinstance(out, dict):
            for k in ("threshold", "reference", "refresh", "against"):
                out.pop(k, None)
        return out


def _constraints(kind: str, name: str, values: dict[str, Any]) -> None:
    for c in cat.builtin(kind, name).constraints:
        if (msg := c.rule(values)) is not None:
            raise ValueError(f"{msg} ({c.hint})" if c.hint else msg)


def _int_range(kind: str, entry: str, name: str, v: Any) -> tuple[int, int]:
    """An `int_range` parameter: an int n is (n, n); bounds within the catalogue's range."""
    lo, hi = (v, v) if isinstance(v, int) and not isinstance(v, bool) else tuple(v)
    spec = cat.builtin(kind, entry).param(name)
    if not (spec.min <= lo <= hi <= spec.max):
        raise ValueError(f"`{name}` must be a range within {spec.min:g}..{spec.max:g}, low end first; got {lo}..{hi}")
    return (int(lo), int(hi))


_gc = ("task", "graph_coloring")
_sd = ("task", "sudoku")


class GraphColoringParams(_Model):
    nodes: tuple[int, int] = setting(*_gc, "nodes")
    edge_prob: float = setting(*_gc, "edge_prob")
    edges: int | None = setting(*_gc, "edges")
    layout: Literal["circle", "random"] = setting(*_gc, "layout")
    perception_format: Literal["edges", "adjacency"] = setting(*_gc, "perception_format")
    reasoning: Literal["brief", "trace", "verbose"] = setting(*_gc, "reasoning")
    image: int = setting(*_gc, "image")
    jitter: float = setting(*_gc, "jitter")
    noise: float = setting(*_gc, "noise")
    filler_words: int = setting(*_gc, "filler_words")
    filler_rate: float = setting(*_gc, "filler_rate")
    line_width: int = setting(*_gc, "line_width")
    node_radius: int = setting(*_gc, "node_radius")
    distractors: int = setting(*_gc, "distractors")
    train: int = setting(*_gc, "train")
    test: int = setting(*_gc, "test")

    @field_validator("nodes", mode="before")
    @classmethod
    def _nodes(cls, v: Any) -> tuple[int, int]:
        return _int_range(*_gc, "nodes", v)

    @model_validator(mode="after")
    def _check(self) -> GraphColoringParams:
        _constraints(*_gc, self.model_dump())
        return self


class SudokuParams(_Model):
    size: Literal[4, 9] = setting(*_sd, "size")
    givens: int | None = setting(*_sd, "givens")
    perception_format: Literal["grid", "cells"] = setting(*_sd, "perception_format")
    reasoning: Literal["brief", "trace", "verbose"] = setting(*_sd, "reasoning")
    image: int = setting(*_sd, "image")
    jitter: float = setting(*_sd, "jitter")
    noise: float = setting(*_sd, "noise")
    filler_words: int = setting(*_sd, "filler_words")
    filler_rate: float = setting(*_sd, "filler_rate")
    train: int = setting(*_sd, "train")
    test: int = setting(*_sd, "test")

    @model_validator(mode="after")
    def _check(self) -> SudokuParams:
        _constraints(*_sd, self.model_dump())
        return self


_ds = ("task", "dataset")


class DatasetParams(_Model):
    """A dataset on disk; `path` is absolute in the IR (the checker resolves it against the spec file)."""

    path: str = setting(*_ds, "path")
    image: str = setting(*_ds, "image")
    query: str = setting(*_ds, "query")
    perception: str = setting(*_ds, "perception")
    reasoning: str | None = setting(*_ds, "reasoning")
    answer: str = setting(*_ds, "answer")
    instance: str | None = setting(*_ds, "instance")
    verifier: Literal["graph_coloring", "sudoku", "exact_match"] = setting(*_ds, "verifier")
    perception_format: Literal["edges", "adjacency"] = setting(*_ds, "perception_format")
    train_split: str = setting(*_ds, "train_split")
    test_split: str = setting(*_ds, "test_split")
    train: int | None = setting(*_ds, "train")
    test: int | None = setting(*_ds, "test")


#: Built-in task name → its typed parameters. A plugin task's parameters stay a dict
#: (checked against its catalogue entry by the checker).
TASK_PARAMS: dict[str, type[_Model]] = {"graph_coloring": GraphColoringParams, "sudoku": SudokuParams, "dataset": DatasetParams}


class TaskIR(_Model):
    name: str
    params: Annotated[dict[str, Any] | GraphColoringParams | SudokuParams | DatasetParams, Field(union_mode="left_to_right")]
    impl: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _typed_params(cls, data: Any) -> Any:
        """A built-in task's params become its typed model (by name); a plugin's stay a dict
        (the union tries `dict` first, so a plugin's dict is never read as a built-in's model)."""
        if isinstance(data, dict) and data.get("name") in TASK_PARAMS and isinstance(data.get("params"), dict):
            data = {**data, "params": TASK_PARAMS[data["name"]].model_validate(data["params"])}
        return data

    def param(self, name: str) -> Any:
        """A parameter by name (None if the task has no such parameter), typed or plugin."""
        return self.params.get(name) if isinstance(self.params, dict) else getattr(self.params, name, None)


_tiny = ("model", "tiny")
_lora = ("block", "lora")


class TinyParams(_Model):
    width: int = setting(*_tiny, "width")
    depth: int = setting(*_tiny, "depth")
    heads: int = setting(*_tiny, "heads")
    vision_width: int = setting(*_tiny, "vision_width")
    vision_depth: int = setting(*_tiny, "vision_depth")
    patch: int = setting(*_tiny, "patch")


class HFParams(_Model):
    dtype: Literal["float32", "bfloat16", "float16"] = setting("model", "hf", "dtype")


class LoraIR(_Model):
    r: int = setting(*_lora, "r")
    alpha: float = setting(*_lora, "alpha")
    dropout: float = setting(*_lora, "dropout")
    target_modules: str | list[str] = setting(*_lora, "target_modules")


MODEL_PARAMS: dict[str, type[_Model]] = {"tiny": TinyParams, "hf": HFParams}


class ModelIR(_Model):
    """`kind`: "tiny", "hf" or a plugin model; `impl` builds it (see the catalogue's module doc)."""

    kind: str
    path: str | None = None  # hf: the checkpoint (the checker requires it)
    # a built-in kind's may be left out (its defaults); a plugin's stays the checked dict
    params: Annotated[dict[str, Any] | TinyParams | HFParams, Field(union_mode="left_to_right")]
    lora: LoraIR | None = None  # hf only
    impl: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _typed_params(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kind") in MODEL_PARAMS and isinstance(data.get("params", {}), dict):
            data = {**data, "params": MODEL_PARAMS[data["kind"]].model_validate(data.get("params", {}))}
        return data


# ---- stages -----------------------------------------------------------------------------------------

_sft = ("block", "sft")
_grpo = ("block", "grpo")


def _without_none(out: Any, model: BaseModel, fields: tuple[str, ...]) -> Any:
    """A dump without the optional `fields` that are unset (None, or an empty list): a setting added
    to the IR keeps the hashes of the specs that do not use it."""
    if isinstance(out, dict):
        for name in fields:
            if getattr(model, name) in (None, []):
                out.pop(name, None)
    return out


Part = Literal["vision", "projector", "language"]  # the catalogue's MODEL_PARTS (a binding test holds them equal)


def _parts_in_order(parts: list[str]) -> list[str]:
    """A stage's `freeze` in the catalogue's order, each part once: `[projector, vision]` and
    `[vision, projector]` freeze the same parts, one IR and one hash."""
    return [p for p in cat.MODEL_PARTS if p in parts]


Freeze = Annotated[list[Part], AfterValidator(_parts_in_order)]


class SFTStageIR(_Model):
    """A `sft` stage: every setting of the catalogue's `sft` block, typed."""

    kind: Literal["sft"] = "sft"
    name: str
    parent: str | None = None
    steps: int = setting(*_sft, "steps")
    lr: Value = setting(*_sft, "lr")
    batch: int = setting(*_sft, "batch")
    loss: Loss = setting(*_sft, "loss")
    weight_decay: float = setting(*_sft, "weight_decay")
    adam_beta1: float = setting(*_sft, "adam_beta1")
    adam_beta2: float = setting(*_sft, "adam_beta2")
    adam_eps: float = setting(*_sft, "adam_eps")
    batching: Literal["random", "length"] = setting(*_sft, "batching")
    packing: bool = setting(*_sft, "packing")
    max_length: int | None = setting(*_sft, "max_length")
    eval_every: int | None = setting(*_sft, "eval_every")
    #: the model parts this stage keeps fixed (`freeze`), in the catalogue's order; [] trains every part
    freeze: Freeze = setting(*_sft, "freeze")
    #: the task this stage trains on when its `task { ... }` sets some of the experiment task's
    #: settings (the rest are the experiment's); none: the experiment's task (see `training_task`)
    task: TaskIR | None = None

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> Any:
        """Without a task of its own, or frozen parts, the stage dumps as before stages could have
        them (its hash kept)."""
        return _without_none(handler(self), self, ("freeze", "task"))


class GRPOStageIR(_Model):
    """A `grpo` stage: every setting of the catalogue's `grpo` block, typed."""

    kind: Literal["grpo"] = "grpo"
    name: str
    parent: str | None = None
    steps: int = setting(*_grpo, "steps")
    lr: Value = setting(*_grpo, "lr")
    batch: int = setting(*_grpo, "batch")
    group: int = setting(*_grpo, "group")
    reward: RewardIR = setting(*_grpo, "reward")
    temperature: float = setting(*_grpo, "temperature")
    top_p: float = setting(*_grpo, "top_p")
    max_new_tokens: int = setting(*_grpo, "max_new_tokens")
    kl: float = setting(*_grpo, "kl")
    clip: float = setting(*_grpo, "clip")
    clip_high: float | None = setting(*_grpo, "clip_high")
    updates: int = setting(*_grpo, "updates")
    scale: Literal["group", "batch", "none"] = setting(*_grpo, "scale")
    aggregation: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = setting(*_grpo, "aggregation")
    mask_truncated: bool = setting(*_grpo, "mask_truncated")
    token_weights: TokenWeights | None = setting(*_grpo, "token_weights")
    constant_groups: Literal["keep", "drop", "resample"] = setting(*_grpo, "constant_groups")
    resample_tries: int = setting(*_grpo, "resample_tries")
    weight_decay: float = setting(*_grpo, "weight_decay")
    adam_beta1: float = setting(*_grpo, "adam_beta1")
    adam_beta2: float = setting(*_grpo, "adam_beta2")
    adam_eps: float = setting(*_grpo, "adam_eps")
    sample_precision: Literal["bf16", "fp32"] = setting(*_grpo, "sample_precision")
    compile: bool = setting(*_grpo, "compile")
    eval_every: int | None = setting(*_grpo, "eval_every")
    freeze: Freeze = setting(*_grpo, "freeze")  # as `SFTStageIR.freeze`
    task: TaskIR | None = None  # as `SFTStageIR.task`: its prompts' task; none = the experiment's

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> Any:
        """Without token weights (or frozen parts, or a task of its own) the stage dumps as before
        they existed: plain GRPO keeps its content hash (and its run and grid-cell directories)."""
        return _without_none(handler(self), self, ("token_weights", "freeze", "task"))


Stage = Annotated[SFTStageIR | GRPOStageIR, Field(discriminator="kind")]


def named_roles(stage: SFTStageIR | GRPOStageIR) -> set[str]:
    """The roles a stage's objective tells apart: those its `mean(...)` terms or `ngdiff` groups
    name (sft), or its `token_weights` (grpo). A `visual` role rule is computed, with its
    reference model, in the stages that name its role, and only there."""
    obj = stage.loss if isinstance(stage, SFTStageIR) else stage.token_weights
    if isinstance(obj, MixLoss):
        return {r for t in obj.terms for r in t.roles}
    if isinstance(obj, NGDiffLoss):
        return {r for g in obj.groups for r in g}
    if isinstance(obj, RoleWeights):
        return set(obj.weights)
    return set()


# ---- evaluation, trainer, experiment ----------------------------------------------------------------

_ev = ("block", "eval")
_tr = ("block", "trainer")


class EvalIR(_Model):
    every: int | None = setting(*_ev, "every")
    metrics: list[str] = setting(*_ev, "metrics")
    test: int | None = setting(*_ev, "test")
    max_new_tokens: int | None = setting(*_ev, "max_new_tokens")
    cap_factor: float = setting(*_ev, "cap_factor")
    cap_margin: int = setting(*_ev, "cap_margin")
    temperature: float = setting(*_ev, "temperature")
    top_p: float = setting(*_ev, "top_p")
    batch: int = setting(*_ev, "batch")
    precision: Literal["fp32", "bf16"] = setting(*_ev, "precision")


class TrainerIR(_Model):
    precision: Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true"] = setting(*_tr, "precision")
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = setting(*_tr, "accelerator")
    devices: int = setting(*_tr, "devices")
    num_nodes: int = setting(*_tr, "num_nodes")
    strategy: Literal["auto", "ddp"] = setting(*_tr, "strategy")
    accumulate: int = setting(*_tr, "accumulate")
    clip: float | None = setting(*_tr, "clip")
    log_every: int = setting(*_tr, "log_every")
    threads: int | None = setting(*_tr, "threads")
    loggers: list[Literal["csv", "tensorboard", "wandb", "mlflow"]] = setting(*_tr, "loggers")

    @field_validator("loggers")
    @classmethod
    def _csv_first(cls, v: list[str]) -> list[str]:
        """`csv` always runs (metrics.csv is built from it): `[tensorboard]` is `[csv, tensorboard]`,
        one IR and one hash for what runs the same; repeats are dropped."""
        return list(dict.fromkeys(["csv", *v]))


class ExperimentIR(_Model):
    ir_version: int = IR_VERSION
    name: str
    seed: int
    params: dict[str, Any]
    task: TaskIR
    model: ModelIR
    roles: list[RoleRuleIR]
    role_names: list[str]
    stages: list[Stage]  # topological order: every parent before its children
    eval: EvalIR = Field(default_factory=EvalIR)
    trainer: TrainerIR = Field(default_factory=TrainerIR)

    def stage(self, name: str) -> SFTStageIR | GRPOStageIR:
        return next(s for s in self.stages if s.name == name)

    def training_task(self, stage: SFTStageIR | GRPOStageIR) -> TaskIR:
        """The task a stage trains on: its own (`task { ... }` in the stage), else the experiment's.
        Evaluation always reads the experiment's `task` (its test items, as it writes them)."""
        return stage.task or self.task

    def visual_references(self, stage: SFTStageIR | GRPOStageIR) -> set[str]:
        """Earlier stages whose saved weights the `visual` role rules this stage trains on read."""
        used = named_roles(stage)
        return {r.reference for r in self.roles if r.kind == "visual" and r.role in used and r.reference is not None}

    def inputs(self, stage: SFTStageIR | GRPOStageIR) -> set[str]:
        """The stages that must have finished before `stage` starts: its parent and its visual references."""
        return self.visual_references(stage) | ({stage.parent} if stage.parent else set())


class AxisIR(_Model):
    """One product axis; several names when the params are zipped together."""

    names: list[str]
    values: list[list[Any]]  # values[i] = one point: a value per name


class GridIR(_Model):
    ir_version: int = IR_VERSION
    name: str
    template: str  # path of the template spec, as written (relative to the grid file)
    fixed: dict[str, Any] = Field(default_factory=dict)
    axes: list[AxisIR] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=list)
    where: dict | None = None  # filter expression tree (see grid.py)
    report: list[str] = Field(default_factory=list)


#: Settings that change where a run reports, not what it computes: left out of the content hash,
#: so adding a TensorBoard logger to a spec keeps its run directory (and a grid its cells).
OUTSIDE_HASH: dict[type[BaseModel], dict[str, Any]] = {}


def canonical_json(model: BaseModel) -> str:
    """The model's JSON with sorted keys, without the settings of `OUTSIDE_HASH`."""
    data = model.model_dump(mode="json", exclude=OUTSIDE_HASH.get(type(model)))
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(model: BaseModel, length: int = 12) -> str:
    """Stable hash of what a run computes: names run and grid-cell directories."""
    return hashlib.sha256(canonical_json(model).encode("utf-8")).hexdigest()[:length]


OUTSIDE_HASH[ExperimentIR] = {"trainer": {"loggers"}}


def json_schema() -> dict:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "percepdsl IR",
        "oneOf": [{"$ref": "#/$defs/ExperimentIR"}, {"$ref": "#/$defs/GridIR"}],
        "$defs": {
            "ExperimentIR": ExperimentIR.model_json_schema(ref_template="#/$defs/ExperimentIR/$defs/{model}"),
            "GridIR": GridIR.model_json_schema(ref_template="#/$defs/GridIR/$defs/{model}"),
        },
    }
