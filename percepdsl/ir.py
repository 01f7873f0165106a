"""The IR: the contract between the language and the runtime.

Plain pydantic data, JSON-serialisable, with a content hash over everything that
changes what a run computes. Source spans, comments and formatting are not part of
it, so reformatting a spec never changes its hash (nor its run directory).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

IR_VERSION = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScheduleIR(_Model):
    """A value over a stage's steps: `constant`, `linear`, `cosine`, `step`; all may warm up linearly from 0."""

    kind: Literal["constant", "linear", "cosine", "step"]
    start: float
    end: float | None = None  # constant/linear/cosine; step decays multiplicatively instead
    factor: float | None = None  # step
    every: int | None = None  # step
    warmup: int = 0


Weight = float | ScheduleIR


class LossTermIR(_Model):
    weight: Weight
    roles: list[str]


class LossIR(_Model):
    """`token_mean`; `mix` = Σ weight · token-mean CE over the term's roles; `ngdiff` over role groups."""

    kind: Literal["token_mean", "mix", "ngdiff"]
    terms: list[LossTermIR] = Field(default_factory=list)
    groups: list[list[str]] = Field(default_factory=list)
    auto_lr: bool = False


class RewardIR(_Model):
    """A reward expression tree.

    term: a catalogue reward term (`name`, `params`, `impl`); const: `value`;
    sum: Σ `children`; product: Π `children`; scale: `value` · `children[0]`;
    gate: `children[0]` where `children[1]` is 1, else 0.
    """

    kind: Literal["term", "const", "sum", "product", "scale", "gate"]
    name: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    impl: str | None = None
    value: float | None = None
    children: list[RewardIR] = Field(default_factory=list)

    def terms(self) -> list[RewardIR]:
        """Every leaf term, in order (each is logged by name)."""
        if self.kind == "term":
            return [self]
        return [t for c in self.children for t in c.terms()]


class RoleRuleIR(_Model):
    role: str
    kind: Literal["between", "regex", "rest"]
    open: str | None = None
    close: str | None = None
    markers: bool = True
    pattern: str | None = None


class TaskIR(_Model):
    name: str
    params: dict[str, Any]
    impl: str | None = None


class LoraIR(_Model):
    r: int
    alpha: float
    dropout: float
    target_modules: str | list[str]


class ModelIR(_Model):
    kind: str  # "tiny" | "hf" | a plugin model
    path: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    lora: LoraIR | None = None
    impl: str | None = None


class StageIR(_Model):
    name: str
    kind: Literal["sft", "grpo"]
    parent: str | None = None
    settings: dict[str, Any]  # the catalogue's block settings, defaults filled in (lr may be a schedule)
    loss: LossIR | None = None  # sft
    reward: RewardIR | None = None  # grpo


class EvalIR(_Model):
    every: int | None = None
    metrics: list[str]
    test: int | None = None
    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    batch: int = 50


class TrainerIR(_Model):
    precision: str = "bf16-mixed"
    accelerator: str = "auto"
    devices: int = 1
    strategy: str = "auto"
    accumulate: int = 1
    clip: float | None = 1.0
    log_every: int = 10
    threads: int | None = None


class ExperimentIR(_Model):
    ir_version: int = IR_VERSION
    name: str
    seed: int
    params: dict[str, Any]
    task: TaskIR
    model: ModelIR
    roles: list[RoleRuleIR]
    role_names: list[str]
    stages: list[StageIR]  # topological order: every parent before its children
    eval: EvalIR
    trainer: TrainerIR

    def stage(self, name: str) -> StageIR:
        return next(s for s in self.stages if s.name == name)


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


def canonical_json(model: BaseModel) -> str:
    return json.dumps(model.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(model: BaseModel, length: int = 12) -> str:
    """Stable hash of what a run computes: names run and grid-cell directories."""
    return hashlib.sha256(canonical_json(model).encode("utf-8")).hexdigest()[:length]


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
