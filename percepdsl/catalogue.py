"""The one catalogue of everything a spec can name.

Tasks, model kinds, role rules, loss terms, schedules, reward terms, metrics and the
settings of every block, each with typed parameters, defaults, ranges, units and a
one-line doc. The checker resolves names here, error messages take their "did you
mean" from here, and the language server's hover and completion read the same
entries. `impl` is a dotted path the runtime imports lazily; the language side never
imports it.

A task's `impl` is a class (or factory) called as `impl(params, seed: int)`, where `params`
are the checked parameters: the typed model of `percepdsl.ir` for a built-in task (every
default filled from here), a dict for a plugin task. A model's `impl` is called as
`impl(model: ModelIR, *, vocabulary: list[str], image: int, seed: int, save_dir: Path)` and
returns a `percepdsl_runtime.models.LoadedModel`; a reward term's as
`impl(group: RolloutGroup, **params) -> list[float]`.

The IR (`percepdsl/ir.py`) takes every default, range and choice of a built-in entry from
here (`percepdsl.ir.setting`), and `tests/test_catalogue_binding.py` binds every entry to its
implementation, so a name, default or range cannot drift between the two.

Plugins add entries as *data*: a package declares an entry point in the group
`percepdsl.catalogue` whose value is `package:file.toml`; the TOML file inside the
package is read without importing the package, so checking never executes plugin
code. Only running a spec imports a plugin's `impl`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import tomllib

KINDS = ("task", "model", "role_rule", "loss", "schedule", "reward", "metric", "block", "keyword")
# What a plugin may add: the runtime imports the `impl` of tasks and reward terms (and of
# models). Losses, schedules, role rules and metrics are computed by percepdsl itself, and
# blocks and keywords are the language's own: a plugin entry of those kinds is a problem.
PLUGIN_KINDS = ("task", "model", "reward")

# Parameter types understood by the checker (see check.py `coerce`):
#   int, float, bool, str, px (an int size; `64px` or 64), int_range (int or lo..hi),
#   choice (one of `choices`, written bare or quoted), value (number or schedule),
#   loss, reward, metrics (list of metric names), roles (role names; variadic),
#   role_group (a role or a list of roles; variadic), str_list (a string or a list of strings),
#   choice_list (a list of some of `choices`, written bare or quoted),
#   token_weights (a grpo stage's per-role token weights: a `{ role = value }` sub-block, or `ngdiff(...)`),
#   stage (the name of a stage of the spec, written bare)
TYPES = (
    "int",
    "float",
    "bool",
    "str",
    "px",
    "int_range",
    "choice",
    "value",
    "loss",
    "reward",
    "metrics",
    "roles",
    "role_group",
    "str_list",
    "choice_list",
    "token_weights",
    "stage",
)


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type: str
    default: Any = None
    doc: str = ""
    min: float | None = None
    max: float | None = None
    choices: tuple = ()  # allowed values (strings for `choice`; ints for an `int` with a fixed set)
    # values the setting knows but does not offer, each with the reason the checker gives: a
    # `choice` refused by name (e.g. a strategy no test covers) rather than as unknown
    refused: tuple[tuple[str, str], ...] = ()
    unit: str | None = None
    required: bool = False
    nullable: bool = False  # `none` is accepted (and the default is None: "decided by the runtime")
    variadic: bool = False  # takes all remaining positional arguments
    # a task setting that a stage's `task { ... }` may set for its own training data: one that changes
    # how items are written or drawn (reasoning style, fillers, rendering), never which instances
    # exist, the split sizes, what p* is, nor the image size the model's vision input is built for
    stage: bool = False

    def ir_default(self) -> Any:
        """The default in the form the IR holds it: a range as `(lo, hi)`, a metric list as a list."""
        d = self.default
        if self.type == "int_range" and isinstance(d, int):
            return (d, d)
        if self.type in ("metrics", "choice_list") and isinstance(d, tuple):
            return list(d)
        return d

    def describe_type(self) -> str:
        base = {
            "int": "an integer" if not self.choices else " or ".join(str(c) for c in self.choices),
            "float": "a number",
            "bool": "`true` or `false`",
            "str": "a string",
            "px": "a size in pixels such as `64px`",
            "int_range": "an integer or a range such as `4..6`",
            "choice": "one of " + ", ".join(f"`{c}`" for c in self.choices),
            "value": "a number or a schedule such as `linear(0.1, 0.5)`",
            "loss": "a loss expression",
            "reward": "a reward expression",
            "metrics": "a list of metric names",
            "roles": "role names",
            "role_group": "a role or a list of roles",
            "str_list": "a string or a list of strings",
            "choice_list": "a list of " + ", ".join(f"`{c}`" for c in self.choices),
            "token_weights": "a block of role weights such as `{ perception = 2.0 }`, or `ngdiff(...)`",
            "stage": "a stage name",
        }[self.type]
        return base + (" or `none`" if self.nullable else "")

    def describe_range(self) -> str:
        if self.min is not None and self.max is not None:
            return f"between {_fmt(self.min)} and {_fmt(self.max)}"
        if self.min is not None:
            return "positive" if self.min == 1 and self.type in ("int", "px") else f"at least {_fmt(self.min)}"
        if self.max is not None:
            return f"at most {_fmt(self.max)}"
        return ""

    def default_text(self) -> str:
        """The default as a spec writes it (a choice bare, a string quoted)."""
        if self.type == "choice" and self.default is not None:
            return str(self.default)
        if self.type == "loss" and isinstance(self.default, str):
            return f"{self.default}()"  # a loss named by its default: `token_mean()`
        if isinstance(self.default, str):
            return f'"{self.default}"'
        return _fmt(self.default)

    def signature(self) -> str:
        s = f"{self.name}: {self.type}"
        if self.choices:
            s = f"{self.name}: " + " | ".join(map(str, self.choices))
        if self.variadic:
            s = "*" + s
        if not self.required and not self.variadic:
            s += f" = {_fmt(self.default)}"
        return s


def _fmt(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e6:
        return str(int(v)) if v == 0 or abs(v) >= 1 else repr(v)
    if isinstance(v, tuple) and len(v) == 2 and all(isinstance(x, int) for x in v):
        return f"{v[0]}..{v[1]}"  # an int range
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(map(str, v)) + "]"  # a list of names (metrics, loggers)
    return repr(v) if isinstance(v, str) else str(v)


@dataclass(frozen=True)
class Constraint:
    """A rule over several settings of one block; `rule(settings)` returns an error message or None.

    The checker reports it at the first named setting and points at the others, so a
    conflict names both sides."""

    params: tuple[str, ...]
    rule: Callable[[dict], str | None]
    hint: str = ""


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str
    doc: str
    params: tuple[ParamSpec, ...] = ()
    impl: str | None = None
    source: str = "percepdsl"  # "percepdsl" or the plugin distribution that declared it
    constraints: tuple[Constraint, ...] = ()
    # reward terms: a candidate label-free perception surrogate, whose correlation with true
    # perception correctness a GRPO run reports. False for the terms that read labels (p* or the
    # true answer) and for `format`; plugin terms are candidates unless their TOML says otherwise.
    surrogate: bool = True

    @property
    def unsupported_plugin(self) -> bool:
        """A plugin entry of a kind plugins cannot add (see PLUGIN_KINDS)."""
        return self.source != "percepdsl" and self.kind not in PLUGIN_KINDS

    def param(self, name: str) -> ParamSpec | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    def signature(self) -> str:
        return f"{self.name}({', '.join(p.signature() for p in self.params)})"

    def stage_settings(self) -> tuple[ParamSpec, ...]:
        """A task's settings that a stage's `task { ... }` may set (`ParamSpec.stage`)."""
        return tuple(p for p in self.params if p.stage)

    def for_stage(self) -> Entry:
        """A task as a stage's `task { ... }` block sees it: only the settings a stage may set
        (what the checker accepts there, and what hover and completion offer)."""
        return Entry(
            self.name,
            self.kind,
            f"The settings of task `{self.name}` a stage may set for its own training data (its prompts, for grpo); "
            "the rest are the experiment's `task` block's. Every stage is evaluated on the experiment's test items, "
            "written as its `task` block says.",
            self.stage_settings(),
            self.impl,
            self.source,
        )

    def markdown(self, given: Mapping[str, str] | None = None) -> str:
        """Hover text / docs: signature, doc, parameters. `given`: values the experiment's task block
        writes (as written), shown beside the defaults: what a stage's `task { ... }` (`for_stage`)
        inherits where it does not set them."""
        lines = [f"**{self.name}** — {self.kind.replace('_', ' ')}", "", self.doc]
        if self.params:
            lines.append("")
            for p in self.params:
                rng = p.describe_range()
                unit = f" {p.unit}" if p.unit else ""
                req = "required" if p.required else f"default `{p.default_text()}`"
                if given and p.name in given:
                    req = f"the experiment's task sets `{given[p.name]}`" + ("" if p.required else f", {req}")
                lines.append(f"- `{p.name}` ({p.describe_type()}{', ' + rng if rng else ''}{unit}; {req}): {p.doc}")
        return "\n".join(lines)


def P(name: str, type: str, default: Any = None, doc: str = "", **kw: Any) -> ParamSpec:
    if "choices" in kw:
        kw["choices"] = tuple(kw["choices"])
    if "refused" in kw:
        kw["refused"] = tuple(kw["refused"].items())
    return ParamSpec(name, type, default, doc, **kw)


REASONING_STYLES = ("brief", "trace", "verbose")
TOKEN_WEIGHT_MAX = 100.0  # a grpo role weight above this is more likely a typo than a design
# Sudoku givens: below MIN_GIVENS a uniquely solvable puzzle is impractical to generate (the
# generator's measurements are in runtime/tasks/sudoku.py); DEFAULT_GIVENS is what `givens = none`
# means: half the 4×4 grid, and the usual range of "medium" 9×9 puzzles.
MIN_GIVENS = {4: 5, 9: 25}
DEFAULT_GIVENS = {4: 8, 9: 30}
_SPLITS = (
    P("train", "int", 2000, "training instances", min=1, max=10_000_000),
    P("test", "int", 200, "held-out test instances (share no instance with train)", min=1, max=1_000_000),
)
# AdamW, in every training stage. Matrices are decayed, biases and norm gains are not.
_ADAMW = (
    P("weight_decay", "float", 0.0, "AdamW weight decay (matrices only; biases and norm gains are not decayed)", min=0, max=1),
    P("adam_beta1", "float", 0.9, "AdamW β1 (first-moment decay)", min=0, max=0.9999),
    P("adam_beta2", "float", 0.999, "AdamW β2 (second-moment decay)", min=0, max=0.99999),
    P("adam_eps", "float", 1e-8, "AdamW ε (added to the second-moment root)", min=0, max=1),
)
# The parts of a vision-language model a stage may keep fixed (`freeze`); the runtime maps each to
# the model's modules in one place (percepdsl_runtime.models.part_parameters).
MODEL_PARTS = ("vision", "projector", "language")
_FREEZE = P(
    "freeze",
    "choice_list",
    (),
    "model parts kept fixed in this stage (their weights stay the parent's): `vision` (the vision encoder), "
    "`projector` (the multimodal projector or connector), `language` (the language model with its embeddings and "
    "output head); with LoRA, a part's adapters. A part frozen in the parent trains again here unless listed here too",
    choices=MODEL_PARTS,
)
_STYLE = (
    P(
        "reasoning",
        "choice",
        "trace",
        "chain-of-thought style: brief (≈ the answer), trace (solver steps), verbose (trace + every constraint checked)",
        choices=REASONING_STYLES,
        stage=True,
    ),
    P("image", "px", 64, "rendered image side", min=16, max=2048, unit="px"),
    P("jitter", "float", 0.0, "amount of style jitter (positions, colours, line width)", min=0, max=1, stage=True),
    P("noise", "float", 0.0, "background noise level", min=0, max=1, stage=True),
    P(
        "filler_words",
        "int",
        0,
        "distinct filler words (`~0`, `~1`, ...) that may follow each reasoning word, drawn uniformly: reasoning "
        "tokens that carry irreducible entropy, as free phrasing does in real chain-of-thought (0: none)",
        min=0,
        max=1024,
        stage=True,
    ),
    P("filler_rate", "float", 0.25, "probability that a filler word follows each reasoning word", min=0, max=1, stage=True),
)

BUILTINS: tuple[Entry, ...] = (
    # ---- tasks -------------------------------------------------------------------
    Entry(
        "graph_coloring",
        "task",
        "Colour a rendered graph with its chromatic number of colours; p* is its edge list.",
        (
            P("nodes", "int_range", (5, 5), "node count, or an inclusive range", min=3, max=10),
            P("edge_prob", "float", 0.5, "probability of each edge", min=0, max=1),
            P("edges", "int", None, "fixed edge count instead of edge_prob", min=1, max=45, nullable=True),
            P("layout", "choice", "circle", "node placement", choices=("circle", "random"), stage=True),
            P(
                "perception_format",
                "choice",
                "edges",
                "p* as a sorted edge list (the paper's) or one y/n slot per node pair",
                choices=("edges", "adjacency"),
            ),
            *_STYLE,
            P("line_width", "px", 2, "edge width", min=1, max=16, unit="px", stage=True),
            P("node_radius", "px", 5, "node dot radius", min=1, max=64, unit="px", stage=True),
            P("distractors", "int", 0, "distractor marks drawn on the image", min=0, max=50, stage=True),
            *_SPLITS,
        ),
        impl="percepdsl_runtime.tasks.graph_coloring:GraphColoringTask",
        constraints=(
            Constraint(
                ("edge_prob", "edges"),
                lambda s: "`edge_prob = 0` gives graphs without edges" if s["edges"] is None and s["edge_prob"] == 0 else None,
                "raise edge_prob, or set a fixed edge count with `edges`",
            ),
            Constraint(
                ("edges", "nodes"),
                lambda s: (
                    f"`edges = {s['edges']}` exceeds the {s['nodes'][0] * (s['nodes'][0] - 1) // 2} node pairs of a {s['nodes'][0]}-node graph"
                    if s["edges"] is not None and s["edges"] > s["nodes"][0] * (s["nodes"][0] - 1) // 2
                    else None
                ),
                "lower `edges` or raise `nodes`",
            ),
            Constraint(
                ("node_radius", "image"),
                lambda s: (
                    f"`node_radius = {s['node_radius']}px` is more than 1/8 of the {s['image']}px image"
                    if s["node_radius"] > s["image"] // 8
                    else None
                ),
                "dots must leave room for edges between them",
            ),
        ),
    ),
    Entry(
        "sudoku",
        "task",
        "Solve a rendered, partially filled Sudoku with a unique solution; p* is the given grid.",
        (
            P("size", "int", 4, "grid side (4 for small models, 9 for real ones)", choices=(4, 9)),
            P(
                "givens",
                "int",
                None,
                f"given cells (difficulty); none = {DEFAULT_GIVENS[4]} for 4×4, {DEFAULT_GIVENS[9]} for 9×9",
                min=5,
                max=81,
                nullable=True,
            ),
            P(
                "perception_format",
                "choice",
                "grid",
                "p* as rows separated by `/` (grid) or the n² cell words alone (cells: 3 words fewer at 4×4; "
                "with `verbose` reasoning and 5 givens perception is then 4.7% of the target tokens instead of 5.4%)",
                choices=("grid", "cells"),
            ),
            *_STYLE,
            *_SPLITS,
        ),
        impl="percepdsl_runtime.tasks.sudoku:SudokuTask",
        constraints=(
            Constraint(
                ("givens", "size"),
                lambda s: (
                    f"a {s['size']}×{s['size']} sudoku takes {MIN_GIVENS[s['size']]} to {s['size'] ** 2} givens, got {s['givens']}"
                    if s["givens"] is not None and not MIN_GIVENS[s["size"]] <= s["givens"] <= s["size"] ** 2
                    else None
                ),
                "fewer givens than that rarely leave a unique solution",
            ),
            Constraint(
                ("image", "size"),
                lambda s: (
                    f"a {s['size']}×{s['size']} grid needs an image of at least {4 * s['size']}px, got {s['image']}px"
                    if s["image"] < 4 * s["size"]
                    else None
                ),
                "at least 4 px per cell; 144px or more keeps 9×9 digits legible",
            ),
        ),
    ),
    Entry(
        "dataset",
        "task",
        "Items from a Hugging Face dataset on disk (save_to_disk, or parquet/JSON files), columns named below; "
        "the target is built as `<perception> .. </perception> <reasoning> .. </reasoning> <answer> .. </answer>` "
        "from the columns and scored by `verifier`.",
        (
            P(
                "path",
                "str",
                None,
                "the data: a directory written by `save_to_disk` (what `percep gen` writes), a local copy of a hub dataset "
                "(parquet or JSON files, split by file or directory name: data/train-00000-of-00001.parquet), or one file "
                "per split given by name; relative to the spec file",
                required=True,
            ),
            P("image", "str", "image", "column of the image (an image feature, image bytes, or a file path relative to the data)"),
            P("query", "str", "query", "column of the question"),
            P("perception", "str", "perception", "column of p*: the perception section's text"),
            P("reasoning", "str", "reasoning", "column of the reasoning section's text (none: an empty section)", nullable=True),
            P("answer", "str", "answer", "column of the answer section's text"),
            P(
                "instance",
                "str",
                None,
                "column of each row's instance as JSON (what `percep gen` writes); none = recovered by the verifier from "
                "the perception column (graph_coloring: the edge list or y/n slots, the chromatic number computed; "
                "sudoku: the givens)",
                nullable=True,
            ),
            P(
                "verifier",
                "choice",
                "exact_match",
                "how an output is scored: `graph_coloring` (any optimal colouring of the instance's graph), `sudoku` (the "
                "unique solution of the givens), `exact_match` (perception and answer words equal the row's)",
                choices=("graph_coloring", "sudoku", "exact_match"),
            ),
            P(
                "perception_format",
                "choice",
                "edges",
                "graph_coloring: how the perception column writes the graph (`5 : 0-1 0-3 ..` or `5 : 0-1 y 0-2 n ..`)",
                choices=("edges", "adjacency"),
            ),
            P("train_split", "str", "train", "the split to train on"),
            P("test_split", "str", "test", "the split to evaluate on (held-out rows)"),
            P("train", "int", None, "training rows used, the first ones (none = all)", min=1, max=100_000_000, nullable=True),
            P("test", "int", None, "test rows used, the first ones (none = all)", min=1, max=100_000_000, nullable=True),
        ),
        impl="percepdsl_runtime.tasks.disk:DatasetTask",
    ),
    # ---- models ------------------------------------------------------------------
    Entry(
        "tiny",
        "model",
        "Embedded LLaVA-style VLM built from a transformers config (random weights, word-level tokenizer from the task vocabulary).",
        (
            P("width", "int", 256, "language model hidden size", min=16, max=8192),
            P("depth", "int", 4, "language model layers", min=1, max=64),
            P("heads", "int", 4, "attention heads", min=1, max=64),
            P("vision_width", "int", 128, "vision tower hidden size", min=16, max=4096),
            P("vision_depth", "int", 2, "vision tower layers", min=1, max=48),
            P("patch", "px", 16, "vision patch size (image size must be a multiple)", min=2, max=64, unit="px"),
        ),
        impl="percepdsl_runtime.models:tiny_model",
        # both towers attend with `heads` heads, each a slice of the hidden size
        constraints=tuple(
            Constraint(
                ("heads", size),
                lambda s, size=size: f"`{size} = {s[size]}` is not a multiple of `heads = {s['heads']}`" if s[size] % s["heads"] else None,
                "each attention head takes an equal slice of the hidden size: choose sizes that `heads` divides",
            )
            for size in ("width", "vision_width")
        ),
    ),
    Entry(
        "hf",
        "model",
        'A local Hugging Face image-text-to-text checkpoint: `model hf "/path" { lora { r = 16 } }`.',
        (P("dtype", "choice", "float32", "weights dtype", choices=("float32", "bfloat16", "float16")),),
        impl="percepdsl_runtime.models:hf_model",
    ),
    Entry(
        "lora",
        "block",
        "PEFT LoRA adapters on an `hf` model.",
        (
            P("r", "int", 16, "adapter rank", min=1, max=1024),
            P("alpha", "float", 32, "scaling numerator (scale = alpha / r)", min=0),
            P("dropout", "float", 0.05, "adapter dropout", min=0, max=1),
            P("target_modules", "str_list", "all-linear", 'modules to adapt, or "all-linear"'),
        ),
        impl="peft:LoraConfig",
    ),
    # ---- role rules ---------------------------------------------------------------
    Entry(
        "between",
        "role_rule",
        "Characters from an opening marker to its closing marker (markers included unless markers = false).",
        (
            P("open", "str", None, "opening marker", required=True),
            P("close", "str", None, "closing marker", required=True),
            P("markers", "bool", True, "whether the marker text belongs to the role"),
        ),
    ),
    Entry(
        "regex",
        "role_rule",
        "Characters matched by a regular expression (Python syntax).",
        (P("pattern", "str", None, "the regular expression", required=True),),
    ),
    Entry("rest", "role_rule", "Every target character no earlier rule claimed."),
    Entry(
        "visual",
        "role_rule",
        "Label-free: target tokens whose visual dependency exceeds a threshold — the Jensen–Shannon divergence (bits) "
        "between a frozen reference model's next-token distributions with the item's image and with an uninformative "
        "one, teacher-forced on the target. Computed per batch (2 no-grad forwards of the reference) in the stages "
        "whose loss or `token_weights` names the role; it takes tokens from the rules declared after it and from `rest`.",
        (
            P("threshold", "float", 0.1, "tag a token when its JS exceeds this", min=0, max=1, unit="bits"),
            P(
                "reference",
                "stage",
                None,
                "the frozen reference: a stage declared before every stage that trains on the role (its saved weights), "
                "or `none`: each such stage's start model (its parent's weights)",
                nullable=True,
            ),
            P(
                "refresh",
                "int",
                0,
                "re-copy the reference from the policy every N optimiser steps of the stage (0: never)",
                min=0,
                max=10_000_000,
                unit="steps",
            ),
            P(
                "against",
                "choice",
                "other",
                "the uninformative image: `other` (another item's of the batch) or `blank` (white)",
                choices=("other", "blank"),
            ),
        ),
    ),
    # ---- losses --------------------------------------------------------------------
    Entry("token_mean", "loss", "Cross-entropy averaged over all target tokens: the standard SFT loss (the baseline)."),
    Entry(
        "mean",
        "loss",
        "Cross-entropy averaged over the tokens of the given roles only; mix terms with weights: `lam * mean(perception) + (1 - lam) * mean(reasoning, answer)`.",
        (P("roles", "roles", None, "roles whose tokens are averaged", variadic=True),),
    ),
    Entry(
        "ngdiff",
        "loss",
        "NGDiff dynamic balancing: each group's gradient is normalised to unit norm, then summed (g = g_p/‖g_p‖ + g_r/‖g_r‖).",
        (
            P("groups", "role_group", None, "role groups, e.g. `ngdiff(perception, [reasoning, answer])`", variadic=True),
            P(
                "auto_lr",
                "bool",
                False,
                "automatic learning rate: every `auto_lr_every` steps a line search along the optimiser's step (losses at "
                "θ+Δ and θ+2Δ, a parabola's minimum t*) sets an lr multiplier that follows t* (EMA 0.9, within [0.05, 20])",
            ),
            P("auto_lr_every", "int", 10, "steps between the auto-LR line searches (2 extra forwards each)", min=1, max=100_000),
            P(
                "norm_every",
                "int",
                1,
                "measure the group gradient norms every N steps (1 = exact); in between, one backward of Σ L_i/‖g_i‖ "
                "with the last norms (an approximation near the cost of a plain step)",
                min=1,
                max=100_000,
            ),
        ),
    ),
    # ---- schedules ------------------------------------------------------------------
    Entry(
        "constant",
        "schedule",
        "A constant value (after the warmup, if any).",
        (
            P("value", "float", None, "the value", required=True),
            P("warmup", "int", 0, "steps of linear ramp from 0 to the schedule's start", min=0),
        ),
    ),
    Entry(
        "linear",
        "schedule",
        "Linear from start (first step after the warmup) to end (reached at the stage's last step + 1, as in Hugging Face's schedulers).",
        (
            P("start", "float", None, "value at the first step", required=True),
            P("end", "float", None, "value at the last step", required=True),
            P("warmup", "int", 0, "steps of linear ramp from 0 to the schedule's start", min=0),
        ),
    ),
    Entry(
        "cosine",
        "schedule",
        "Half a cosine from start (first step after the warmup) to end, over the rest of the stage.",
        (
            P("start", "float", None, "value at the first step", required=True),
            P("end", "float", 0.0, "value at the last step"),
            P("warmup", "int", 0, "steps of linear ramp from 0 to the schedule's start", min=0),
        ),
    ),
    Entry(
        "step",
        "schedule",
        "start × factor^⌊(step − warmup) / every⌋.",
        (
            P("start", "float", None, "initial value", required=True),
            P("factor", "float", 0.5, "multiplier", min=0),
            P("every", "int", 100, "steps between decays", min=1),
            P("warmup", "int", 0, "steps of linear ramp from 0 to the schedule's start", min=0),
        ),
    ),
    Entry(
        "warmup",
        "schedule",
        "Linear ramp from 0 to value over the first steps, then constant.",
        (P("value", "float", None, "the value after warmup", required=True), P("steps", "int", None, "warmup steps", required=True, min=1)),
    ),
    # ---- reward terms ---------------------------------------------------------------
    Entry(
        "outcome",
        "reward",
        "1 if the answer is correct for the true instance (needs ground truth).",
        impl="percepdsl_runtime.rewards:outcome",
        surrogate=False,
    ),
    Entry(
        "perception_match",
        "reward",
        "1 if the perception section equals p* exactly (needs perception labels).",
        impl="percepdsl_runtime.rewards:perception_match",
        surrogate=False,
    ),
    Entry(
        "perception_partial",
        "reward",
        "Partial perception credit: edge F1 (graph colouring) or cell accuracy (sudoku).",
        impl="percepdsl_runtime.rewards:perception_partial",
        surrogate=False,
    ),
    Entry(
        "format",
        "reward",
        "1 if the output has the perception, reasoning and answer sections once, in order.",
        impl="percepdsl_runtime.rewards:format_ok",
        surrogate=False,
    ),
    Entry(
        "self_consistency",
        "reward",
        "Surrogate (no p*): the share of the other G−1 rollouts of the group whose parsed perception equals this "
        "rollout's (0 if it does not parse); `mode = majority`: 1 if it is a plurality perception shared by ≥ 2 rollouts.",
        (
            P(
                "mode",
                "choice",
                "agreement",
                "`agreement`: share of the other rollouts that agree; `majority`: 1 for a plurality perception shared by ≥ 2",
                choices=("agreement", "majority"),
            ),
        ),
        impl="percepdsl_runtime.rewards:self_consistency",
    ),
    Entry(
        "perceived_consistency",
        "reward",
        "Surrogate (no p*): 1 if the answer is a correct solution of the instance the rollout perceived (its perception is well-formed and its answer follows from it).",
        impl="percepdsl_runtime.rewards:perceived_consistency",
    ),
    Entry(
        "visual_dependency",
        "reward",
        "Surrogate (no p*): how much the rollout's own perception tokens depend on its image — the mean Jensen–Shannon "
        "divergence (bits) between the policy's next-token distributions with the true image and with an uninformative "
        "one, teacher-forced on the rollout (2 extra no-grad forwards of the generated batch); 0 for a rollout without "
        "perception tokens.",
        (
            P(
                "against",
                "choice",
                "other",
                "the uninformative image: `other` (the next item's of the split) or `blank` (white)",
                choices=("other", "blank"),
            ),
            P(
                "threshold",
                "float",
                None,
                "`none`: the mean JS over the perception tokens; a number: the share of them whose JS exceeds it",
                min=0,
                max=1,
                unit="bits",
                nullable=True,
            ),
        ),
        impl="percepdsl_runtime.rewards:visual_dependency",
    ),
    Entry(
        "gate",
        "reward",
        "`gate(value, by)`: value where the gate term is 1, else 0 — e.g. outcome only if the format is valid.",
        (P("value", "reward", None, "the gated reward", required=True), P("by", "reward", None, "the gate (a 0/1 term)", required=True)),
    ),
    # ---- metrics --------------------------------------------------------------------
    Entry("end_to_end", "metric", "a: the model sees image + question and writes everything; the answer is verified."),
    Entry("perception", "metric", "a_p: the perception section equals p* exactly."),
    Entry("perception_partial", "metric", "Partial perception credit (edge F1 / cell accuracy)."),
    Entry(
        "reasoning",
        "metric",
        "a_r: counterfactual reasoning — oracle p* placed as the perception section, the model continues; the answer is verified.",
    ),
    Entry("format_ok", "metric", "Fraction of outputs with well-formed sections."),
    Entry(
        "visual_dependency",
        "metric",
        "Label-free: is the model reading the image? Mean Jensen–Shannon divergence (bits) between next-token distributions "
        "with the true image and with another item's image, on the perception tokens of the reference target (teacher-forced); "
        "per role and against a blank image beside it (`percep probe` writes the whole table).",
        impl="percepdsl_runtime.probe:probe",
    ),
    # ---- blocks ---------------------------------------------------------------------
    Entry(
        "sft",
        "block",
        "Supervised fine-tuning stage on the task's chain-of-thought targets.",
        (
            P("steps", "int", None, "optimizer steps", required=True, min=1, max=10_000_000),
            P(
                "lr",
                "value",
                1e-3,
                "learning rate at each step: a number or a schedule such as `cosine(1e-3, 0, warmup = 50)` (absolute values)",
                min=0,
                max=1,
            ),
            P("batch", "int", 8, "sequences per optimizer step (before accumulation)", min=1, max=4096),
            P("loss", "loss", "token_mean", "training loss; default `token_mean()`"),
            *_ADAMW,
            P(
                "batching",
                "choice",
                "random",
                "batch composition: `random`, or `length` (items of similar length together: "
                "less padding, but batches of look-alike items, which kept the tiny model from learning perception on graph colouring)",
                choices=("random", "length"),
            ),
            P(
                "packing",
                "bool",
                True,
                "lay each batch out as one padding-free row (the same items; each keeps its positions and attends only "
                "to itself) when the model supports it (LLaVA over a Llama decoder), else right-padded items",
            ),
            P("max_length", "int", None, "truncate sequences to this many tokens", min=8, nullable=True),
            P("eval_every", "int", None, "evaluate every N steps in this stage (overrides eval.every)", min=1, nullable=True),
            _FREEZE,
        ),
    ),
    Entry(
        "grpo",
        "block",
        "GRPO reinforcement-learning stage with group-normalised advantages.",
        (
            P("steps", "int", None, "optimizer steps", required=True, min=1, max=10_000_000),
            P("lr", "value", 1e-4, "learning rate at each step: a number or a schedule (absolute values)", min=0, max=1),
            P("batch", "int", 2, "prompts per step", min=1, max=4096),
            P("group", "int", 8, "samples per prompt (G)", min=2, max=1024),
            P("reward", "reward", None, "reward expression, e.g. `0.3 * perception_match + 0.7 * outcome`", required=True),
            P("temperature", "float", 1.0, "sampling temperature", min=0.01, max=10),
            P("top_p", "float", 1.0, "nucleus sampling", min=0.01, max=1),
            P("max_new_tokens", "int", 128, "generation cap", min=1, max=32768),
            P("kl", "float", 0.0, "β of the KL penalty to a frozen reference (0 loads no reference)", min=0, max=10),
            P("clip", "float", 0.2, "ε of the clipped importance ratio", min=0, max=1),
            P("clip_high", "float", None, "ε_high for asymmetric clipping (none = clip)", min=0, max=1, nullable=True),
            P("updates", "int", 1, "optimizer updates per generated batch", min=1, max=64),
            P("scale", "choice", "group", "advantage scaling", choices=("group", "batch", "none")),
            P(
                "aggregation",
                "choice",
                "grpo",
                "loss aggregation, named as TRL's `loss_type`: `grpo` (mean over each completion's tokens, then over the "
                "completions), `bnpo` (mean over all completion tokens of the batch), `dr_grpo` (token sum / (completions × "
                "max_new_tokens)), `dapo` (token sum / active tokens of the global batch, across devices)",
                choices=("grpo", "bnpo", "dr_grpo", "dapo"),
            ),
            P("mask_truncated", "bool", True, "drop completions that hit max_new_tokens from the loss (they still count in `grpo`'s mean)"),
            P(
                "token_weights",
                "token_weights",
                None,
                "role-weighted policy loss, the RL twin of λ: `token_weights { perception = 2.0  reasoning = linear(1, 0.5) }` "
                "multiplies each completion token's loss (clipped surrogate + KL) by its role's weight (a number or a schedule, "
                f"0 to {TOKEN_WEIGHT_MAX:g}; roles not named keep 1) before the aggregation, whose denominators stay token counts; "
                "`token_weights = ngdiff(perception, [reasoning, answer])` steps along Σ g_i/‖g_i‖, each role group's "
                "policy gradient normalised (none = plain GRPO)",
                nullable=True,
            ),
            P(
                "constant_groups",
                "choice",
                "keep",
                "groups whose rewards are all equal (advantage 0, no learning signal): `keep` them (they still count in the "
                "loss's denominator), `drop` them from the loss, or `resample`: drop them and draw batches of fresh prompts "
                "until `batch` groups with a signal are collected or `resample_tries` extra batches were drawn (DAPO's dynamic sampling)",
                choices=("keep", "drop", "resample"),
            ),
            P("resample_tries", "int", 4, "`constant_groups = resample`: extra prompt batches drawn per step at most", min=1, max=64),
            *_ADAMW,
            P(
                "sample_precision",
                "choice",
                "fp32",
                "weights of the rollout sampler: `fp32` copies (Hugging Face's greedy tokens; faster than `bf16` in the session-10 "
                "measurement, docs/performance.md) or `bf16` (half the bytes); the training forward always follows the trainer's precision",
                choices=("bf16", "fp32"),
            ),
            P(
                "compile",
                "bool",
                False,
                "torch.compile the sampler's decoder and the update's text decoder (LLaVA models): ≈1.1× faster steps "
                "after a one-time compile (≈5 s from Inductor's disk cache, 20–60 s cold); pays off after a few hundred steps",
            ),
            P("eval_every", "int", None, "evaluate every N steps in this stage", min=1, nullable=True),
            _FREEZE,
        ),
    ),
    Entry(
        "eval",
        "block",
        "The three-way evaluation, run at the end of each stage and optionally every N steps.",
        (
            P("every", "int", None, "evaluate every N steps (none = at stage ends only)", min=1, nullable=True),
            P("metrics", "metrics", ("end_to_end", "perception", "reasoning"), "metrics to report"),
            P("test", "int", None, "test items to evaluate (none = the whole test split)", min=1, nullable=True),
            P(
                "max_new_tokens",
                "int",
                None,
                "one generation cap for every item (none = a cap per item: ⌈cap_factor × reference tokens⌉ + cap_margin)",
                min=1,
                nullable=True,
            ),
            P("cap_factor", "float", 1.3, "per-item cap: multiple of the reference's token count", min=1, max=100),
            P("cap_margin", "int", 20, "per-item cap: tokens added to the multiple", min=0, max=100_000),
            P("temperature", "float", 0.0, "0 = greedy", min=0, max=10),
            P("top_p", "float", 1.0, "nucleus sampling", min=0.01, max=1),
            P("batch", "int", 50, "generated rows per batch (50 and 100 measured fastest for the tiny model)", min=1, max=4096),
            P(
                "precision",
                "choice",
                "fp32",
                "generation precision: `fp32` (the fused decoder writes Hugging Face's greedy tokens exactly), or `bf16`: the prefill "
                "under bf16 autocast and the decoding steps on bf16 weight copies, attention in fp32 (≈10% faster here; greedy outputs "
                "differ where logits nearly tie)",
                choices=("fp32", "bf16"),
            ),
        ),
    ),
    Entry(
        "trainer",
        "block",
        "Lightning trainer settings.",
        (
            P("precision", "choice", "bf16-mixed", "numeric precision", choices=("32-true", "bf16-mixed", "16-mixed", "bf16-true")),
            P("accelerator", "choice", "auto", "device type", choices=("auto", "cpu", "gpu", "cuda", "mps")),
            P("devices", "int", 1, "devices per node: one process (rank) each; with `accelerator = cpu`, CPU processes", min=1, max=1024),
            P("num_nodes", "int", 1, "machines; the run has devices × num_nodes ranks, each batch is per rank", min=1, max=1024),
            P(
                "strategy",
                "choice",
                "auto",
                "distribution strategy: `ddp` (data parallel; `auto` is `ddp` with more than one rank)",
                choices=("auto", "ddp"),
                refused={
                    "fsdp": "untested: Lightning runs FSDP on CUDA GPUs only and no test here has one; use `ddp`",
                    "deepspeed": "untested: DeepSpeed is not installed and no test covers it; use `ddp`",
                },
            ),
            P("accumulate", "int", 1, "gradient accumulation steps", min=1, max=1024),
            P("clip", "float", 1.0, "gradient norm clipping (none or 0 = off)", min=0, nullable=True),
            P("log_every", "int", 10, "steps between metric rows", min=1),
            # max: threads = 100000 checked and went to torch.set_num_threads, which would start that many
            # OpenMP threads; 1024 is more cores than a node has, the bound `devices` has
            P("threads", "int", None, "torch CPU threads (none = all cores)", min=1, max=1024, nullable=True),
            P(
                "loggers",
                "choice_list",
                ("csv",),
                "where per-step metrics go, one run per stage under the run directory: `csv` (always: metrics.csv is built "
                "from it), `tensorboard` (tensorboard/), `wandb` (Weights & Biases; WANDB_MODE=offline writes wandb/ "
                "only), `mlflow` (an MLflow file store, mlruns/); each but csv needs its extra, e.g. pip install -e '.[wandb]'",
                choices=("csv", "tensorboard", "wandb", "mlflow"),
            ),
        ),
        constraints=(
            Constraint(
                ("precision", "accelerator"),
                lambda s: (
                    '`precision = "16-mixed"` does not run on the CPU: Lightning trains in `bf16-mixed` there instead'
                    if s["precision"] == "16-mixed" and s["accelerator"] == "cpu"
                    else None
                ),
                'write `precision = "bf16-mixed"` (or "32-true"), or train on a GPU',
            ),
        ),
    ),
    # ---- keywords (hover / completion) ---------------------------------------------
    Entry("experiment", "keyword", "`experiment NAME` — names the experiment; run directories are `NAME-HASH`."),
    Entry(
        "param",
        "keyword",
        "`param NAME: TYPE = DEFAULT` — a template parameter (int, float, bool, str), overridable with `--set NAME=VALUE` or a grid axis.",
    ),
    Entry("seed", "keyword", "`seed N` — the seed for data generation, initialisation and data order."),
    Entry("include", "keyword", '`include "file.pd"` — splice in the statements of a shared fragment.'),
    Entry("task", "keyword", "`task NAME { ... }` — the synthetic task and its settings."),
    Entry("model", "keyword", '`model tiny { ... }` or `model hf "/path" { lora { ... } }`.'),
    Entry("roles", "keyword", "`roles { NAME = RULE ... }` — which target characters belong to which role; rules are tried in order."),
    Entry(
        "stage",
        "keyword",
        "`stage NAME = sft|grpo [from PARENT] { ... }` — a training stage, starting from its parent's weights; "
        "a `task { ... }` inside sets some of the task's settings (reasoning style, fillers, rendering) for its training data.",
    ),
    Entry("trainer", "keyword", "`trainer { ... }` — precision, devices, nodes, strategy, accumulation, clipping."),
    Entry("grid", "keyword", "`grid NAME` — starts a grid file: a template spec swept over parameter axes."),
    Entry("template", "keyword", '`template "spec.pd"` — the spec a grid sweeps.'),
    Entry("axis", "keyword", "`axis NAME = [values]` — a product axis over a template param."),
    Entry("zip", "keyword", "`zip { a = [...], b = [...] }` — params that vary together."),
    Entry("seeds", "keyword", "`seeds [1, 2, 3]` or `seeds 1..3` — each cell runs once per seed."),
    Entry("where", "keyword", "`where EXPR` — keep only cells for which the condition holds."),
    Entry("report", "keyword", "`report [metrics]` — the columns of the grid's results table."),
    Entry("fix", "keyword", "`fix NAME = VALUE` — set a template param for every cell."),
)

# `eval` is both a keyword and a block; the block entry documents both.

_BUILTIN = {(e.kind, e.name): e for e in BUILTINS}


def builtin(kind: str, name: str) -> Entry:
    """A built-in entry (KeyError if there is none)."""
    return _BUILTIN[(kind, name)]


def default(kind: str, name: str, param: str) -> Any:
    """The default of a built-in entry's parameter, in the form the IR holds it: a range as
    `(lo, hi)`, a metric list as a list. The one place defaults are read from."""
    spec = builtin(kind, name).param(param)
    if spec is None:
        raise KeyError(f"{kind} `{name}` has no parameter `{param}`")
    return spec.ir_default()


class Catalogue:
    """Name → entry, per kind. Built once from the built-ins plus plugin data files."""

    def __init__(self, entries=BUILTINS):
        self._by_kind: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
        self.problems: list[str] = []  # plugin files that could not be read
        for e in entries:
            self.add(e)

    def add(self, entry: Entry) -> None:
        if entry.kind not in self._by_kind:
            raise ValueError(f"unknown catalogue kind {entry.kind!r}; expected one of {KINDS}")
        for p in entry.params:
            if p.type not in TYPES:
                raise ValueError(f"{entry.name}.{p.name}: unknown parameter type {p.type!r}")
            # flags, as a plugin's TOML writes them: a string there ("false", "no") is not read by its truth
            for flag in ("required", "nullable", "variadic", "stage"):
                if not isinstance(getattr(p, flag), bool):
                    raise ValueError(f"{entry.name}.{p.name}: `{flag}` must be true or false, not {getattr(p, flag)!r}")
            if p.stage and entry.kind != "task":
                raise ValueError(
                    f"{entry.name}.{p.name}: `stage` marks a task setting that a stage's `task {{ ... }}` may set;"
                    f" a {entry.kind.replace('_', ' ')} has none"
                )
        if not isinstance(entry.surrogate, bool):
            raise ValueError(f"{entry.name}: `surrogate` must be true or false, not {entry.surrogate!r}")
        self._by_kind[entry.kind][entry.name] = entry

    def get(self, kind: str, name: str) -> Entry | None:
        return self._by_kind[kind].get(name)

    def names(self, kind: str) -> list[str]:
        return sorted(self._by_kind[kind])

    def entries(self, kind: str | None = None) -> list[Entry]:
        kinds = [kind] if kind else list(KINDS)
        return [e for k in kinds for e in self._by_kind[k].values()]

    def lookup(self, name: str) -> list[Entry]:
        """Every entry with this name, whatever its kind (for hover)."""
        return [d[name] for d in self._by_kind.values() if name in d]


def _entry_from_toml(data: dict, source: str) -> Entry:
    params = tuple(
        ParamSpec(
            name=p["name"],
            type=p["type"],
            default=p.get("default"),
            doc=p.get("doc", ""),
            min=p.get("min"),
            max=p.get("max"),
            choices=tuple(p.get("choices", ())),
            unit=p.get("unit"),
            required=p.get("required", False),
            nullable=p.get("nullable", False),
            variadic=p.get("variadic", False),
            stage=p.get("stage", False),
        )
        for p in data.get("params", [])
    )
    return Entry(data["name"], data["kind"], data.get("doc", ""), params, data.get("impl"), source, surrogate=data.get("surrogate", True))


def plugin_entries() -> tuple[list[Entry], list[str]]:
    """Entries declared by installed plugins, read as data (no plugin code runs)."""
    entries, problems = [], []
    for ep in metadata.entry_points(group="percepdsl.catalogue"):
        package, _, resource = ep.value.partition(":")
        try:
            spec = importlib.util.find_spec(package)  # a top-level package: located, not imported
            if spec is None or not spec.submodule_search_locations:
                raise FileNotFoundError(f"package {package!r} not found")
            path = Path(next(iter(spec.submodule_search_locations))) / (resource or "percep_catalogue.toml")
            data = tomllib.loads(path.read_text(encoding="utf-8"))
            dist = ep.dist.name if ep.dist else package
            for item in data.get("entry", []):
                entries.append(_entry_from_toml(item, dist))
        except Exception as exc:  # a broken plugin must not break checking
            problems.append(f"plugin entry point {ep.name!r} ({ep.value}): {exc}")
    return entries, problems


def plural(kind: str) -> str:
    """`loss` → "losses", `role_rule` → "role rules"."""
    words = kind.replace("_", " ")
    return words + ("es" if words.endswith("s") else "s")


#: Entries registered from Python in this process (`percepdsl.api.register_reward`), by (kind, name).
#: They are part of the default catalogue from their registration on, for this process only.
_REGISTERED: dict[tuple[str, str], Entry] = {}


def register(entry: Entry) -> None:
    """Add `entry` to the default catalogue of this process (replacing an earlier registration
    of the same name). A built-in or plugin entry of the same kind and name cannot be replaced."""
    key = (entry.kind, entry.name)
    if key not in _REGISTERED and _base_catalogue().get(entry.kind, entry.name) is not None:
        owner = _base_catalogue().get(entry.kind, entry.name).source
        raise ValueError(f"{entry.kind.replace('_', ' ')} `{entry.name}` already exists (from {owner}); register it under another name")
    Catalogue().add(entry)  # the same validation as any entry (kind, parameter types)
    _REGISTERED[key] = entry
    default_catalogue.cache_clear()


def unregister(kind: str, name: str) -> None:
    """Remove an entry registered from Python (nothing if there is none)."""
    if _REGISTERED.pop((kind, name), None) is not None:
        default_catalogue.cache_clear()


@lru_cache(maxsize=1)
def _base_catalogue() -> Catalogue:
    """The built-ins plus installed plugins' entries (read as data)."""
    cat = Catalogue()
    extra, problems = plugin_entries()
    for e in extra:
        if e.unsupported_plugin:
            kinds = plural(e.kind)
            problems.append(
                f"plugin `{e.source}`: {e.kind.replace('_', ' ')} `{e.name}` is not supported; plugins add tasks, models and reward"
                f" terms, and percepdsl computes only its own {kinds} (a spec that uses `{e.name}` is refused)"
            )
            # kept where the name is new, so that a spec using it gets a located refusal;
            # never over a built-in entry, nor as a block or keyword (the language's own)
            if e.kind in ("block", "keyword") or cat.get(e.kind, e.name) is not None:
                continue
        try:
            cat.add(e)
        except ValueError as exc:  # the entry is left out: a spec that uses it gets a located error
            problems.append(f"plugin `{e.source}`: {exc}")
    cat.problems = problems
    return cat


@lru_cache(maxsize=1)
def default_catalogue() -> Catalogue:
    """The built-ins, installed plugins' entries and entries registered from Python."""
    base = _base_catalogue()
    if not _REGISTERED:
        return base
    cat = Catalogue(base.entries())
    cat.problems = list(base.problems)
    for e in _REGISTERED.values():
        cat.add(e)
    return cat


__all__ = [
    "PLUGIN_KINDS",
    "Catalogue",
    "Entry",
    "ParamSpec",
    "P",
    "builtin",
    "default",
    "default_catalogue",
    "plugin_entries",
    "plural",
    "register",
    "unregister",
]
