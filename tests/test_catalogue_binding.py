"""Every catalogue entry is bound to its implementation, so a name, default, range or choice
that drifts between the catalogue (what the language accepts and documents) and the code
(what a run does) fails here.

- tasks: the class's typed parameters are the catalogue's (names, defaults, ranges, choices),
  and generating data reads every one of them;
- models: the impl has the model-kind signature; every `tiny` size reaches the built config;
- stage kinds, eval and trainer blocks: the typed IR's fields are the block's settings, with
  the catalogue's defaults, and a run reads every one of them (the IR's objects are replaced by
  recording subclasses, and a micro spec is run end to end);
- losses and schedules: each entry compiles to its IR type with the same parameters;
- reward terms: the impl resolves and takes `(group, *, <the entry's params>, **_)`, with no
  default of its own; metrics: the evaluator produces each one.
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Any

import pytest
from realise import MICRO, compile_spec

from percepdsl import ir as IR
from percepdsl.catalogue import BUILTINS, builtin, default
from percepdsl_runtime.plugins import resolve

ROOT = Path(__file__).resolve().parents[1]


def entries(kind: str) -> list[Any]:
    return [e for e in BUILTINS if e.kind == kind]


def _literal_args(annotation: Any) -> set[Any]:
    """The values a Literal field (possibly `Literal[...] | None`) accepts."""
    out: set[Any] = set()
    for arg in typing.get_args(annotation) or ():
        out |= _literal_args(arg)
    if typing.get_origin(annotation) is typing.Literal:
        out |= set(typing.get_args(annotation))
    return out


def assert_fields_are_the_entry(model: type, kind: str, name: str, skip: tuple[str, ...] = ()) -> None:
    """The model's fields are the entry's parameters, each with the entry's default, range and choices."""
    entry = builtin(kind, name)
    fields = {k: f for k, f in model.model_fields.items() if k not in skip}
    assert set(fields) == {p.name for p in entry.params}, (model.__name__, set(fields) ^ {p.name for p in entry.params})
    for p in entry.params:
        f = fields[p.name]
        if p.required or p.variadic:  # variadic: the arguments themselves (e.g. ngdiff's groups)
            assert f.is_required(), (name, p.name)
            continue
        d = f.get_default(call_default_factory=True)
        want = default(kind, name, p.name)
        assert (d.model_dump() if hasattr(d, "model_dump") else d) == ({"kind": want} if p.type == "loss" else want), (name, p.name)
        meta = {type(m).__name__: m for m in f.metadata}
        if p.type in ("int", "float", "px") and not p.choices:
            assert (getattr(meta.get("Ge"), "ge", None), getattr(meta.get("Le"), "le", None)) == (p.min, p.max), (name, p.name)
        if p.choices:
            assert _literal_args(f.annotation) == set(p.choices), (name, p.name)


# ---------------------------------------------------------------- tasks
@pytest.mark.parametrize("entry", entries("task"), ids=lambda e: e.name)
def test_task_params_are_the_catalogue_and_all_are_read(entry, tmp_path: Path) -> None:
    cls = resolve(entry.impl)
    assert cls.name == entry.name and cls.params_type is IR.TASK_PARAMS[entry.name]
    assert_fields_are_the_entry(cls.params_type, "task", entry.name)
    reads: set[str] = set()
    fields = set(cls.params_type.model_fields)

    class Recording(cls.params_type):
        def __getattribute__(self, attr: str) -> Any:
            if attr in fields:
                reads.add(attr)
            return super().__getattribute__(attr)

    extra: dict[str, Any] = {}
    if entry.name == "dataset":  # data on disk, as `percep gen` writes it; its rows are the graph task's
        from percepdsl_runtime.tasks import build_task
        from percepdsl_runtime.tasks.dataset import write_dataset

        gc = build_task("graph_coloring", {"train": 4, "test": 2}, seed=0)
        extra = {"path": str(write_dataset(gc, tmp_path / "data")), "verifier": "graph_coloring", "instance": "instance"}
    task = cls(Recording(train=4, test=2, **extra), seed=0)
    for split in ("train", "test"):
        s = task.sample(split, 0)
        task.score(s.instance, s.response)
        task.parse_perception(s.response)
        task.size(split)
    task.vocabulary()
    assert reads == fields, fields - reads  # a parameter the generator never reads does nothing


def test_graph_node_limit_is_the_renderers() -> None:
    from percepdsl_runtime.tasks.graph_coloring import MAX_NODES

    assert builtin("task", "graph_coloring").param("nodes").max == MAX_NODES


# ---------------------------------------------------------------- models
MODEL_SIGNATURE = ["model", "vocabulary", "image", "seed", "save_dir"]


@pytest.mark.parametrize("entry", entries("model"), ids=lambda e: e.name)
def test_model_impl_and_params(entry) -> None:
    fn = resolve(entry.impl)
    params = inspect.signature(fn).parameters
    assert list(params) == MODEL_SIGNATURE and all(params[k].kind is inspect.Parameter.KEYWORD_ONLY for k in MODEL_SIGNATURE[1:])
    assert_fields_are_the_entry(IR.MODEL_PARAMS[entry.name], "model", entry.name)


def test_lora_settings_are_the_catalogue() -> None:
    assert_fields_are_the_entry(IR.LoraIR, "block", "lora")


def test_every_tiny_size_reaches_the_built_model(tmp_path: Path) -> None:
    from percepdsl_runtime.models import tiny_model

    sizes = IR.TinyParams(width=24, depth=2, heads=3, vision_width=18, vision_depth=3, patch=8)
    assert all(getattr(sizes, k) != default("model", "tiny", k) for k in IR.TinyParams.model_fields)  # none left at its default
    m = IR.ModelIR(kind="tiny", params=sizes, impl=builtin("model", "tiny").impl)
    cfg = tiny_model(m, vocabulary=["a", "b"], image=32, seed=0, save_dir=tmp_path).model.config
    text, vision = cfg.text_config, cfg.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (24, 2, 3)
    assert (vision.hidden_size, vision.num_hidden_layers, vision.patch_size) == (18, 3, 8)


# ---------------------------------------------------------------- stages, eval, trainer: typed and read
STAGE_MODELS = {"sft": IR.SFTStageIR, "grpo": IR.GRPOStageIR}


@pytest.mark.parametrize("kind", ["sft", "grpo"])
def test_stage_fields_are_the_block_settings(kind: str) -> None:
    model = STAGE_MODELS[kind]
    # `task`: the stage's `task { ... }` sub-block, checked against the experiment task's entry (`Entry.for_stage`)
    assert_fields_are_the_entry(model, "block", kind, skip=("kind", "name", "parent", "task"))
    assert set(_literal_args(model.model_fields["kind"].annotation)) == {kind}


@pytest.mark.parametrize("name, model", [("eval", IR.EvalIR), ("trainer", IR.TrainerIR)])
def test_eval_and_trainer_fields_are_the_block_settings(name: str, model: type) -> None:
    assert_fields_are_the_entry(model, "block", name)


def _recording(obj: Any, reads: dict[str, set[str]], label: str) -> Any:
    """`obj` as an instance of a subclass that records which fields are read (a dump reads them all)."""
    fields = set(type(obj).model_fields)
    seen = reads.setdefault(label, set())

    class Recording(type(obj)):
        def __getattribute__(self, attr: str) -> Any:
            if attr in fields:
                seen.add(attr)
            return super().__getattribute__(attr)

        def model_dump(self, *args: Any, **kwargs: Any) -> Any:
            seen.update(fields)
            return super().model_dump(*args, **kwargs)

    return Recording.model_validate(obj.model_dump())


def test_a_run_reads_every_setting(tmp_path: Path) -> None:
    """Run a micro spec end to end with recording IR objects: every setting of every stage kind,
    of the eval and trainer blocks and of the task and model is read by the runtime."""
    import warnings

    from percepdsl_runtime.run import run

    text = (
        MICRO.replace("eval { test = 2, max_new_tokens = 8 }", "eval { test = 2, every = 2 }")
        + "stage a = sft { steps = 2, batch = 2 }\n"
        # kl > 0 and every completion in the loss, so the update runs although an untrained
        # model's rewards are constant (no advantage): clip and clip_high are read there
        + "stage b = grpo from a { steps = 2, batch = 1, group = 2, max_new_tokens = 4, kl = 0.01, mask_truncated = false, reward = outcome }\n"
    )
    ir = compile_spec(text)
    reads: dict[str, set[str]] = {}
    stages = [_recording(s, reads, s.kind) for s in ir.stages]
    task = ir.task.model_copy(update={"params": _recording(ir.task.params, reads, "task")})
    model = ir.model.model_copy(update={"params": _recording(ir.model.params, reads, "model")})
    traced = ir.model_copy(
        update={
            "stages": stages,
            "task": task,
            "model": model,
            "eval": _recording(ir.eval, reads, "eval"),
            "trainer": _recording(ir.trainer, reads, "trainer"),
        }
    )
    for label in reads:  # the hash and ir.json dump the IR: only what the run reads after that counts
        reads[label].clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # serialising the recording subclasses
        run(traced, {"spec.pd": text}, tmp_path, progress=False, echo=lambda _: None)
    for label, obj in [
        ("sft", stages[0]),
        ("grpo", stages[1]),
        ("task", task.params),
        ("model", model.params),
        ("eval", ir.eval),
        ("trainer", ir.trainer),
    ]:
        unread = set(type(obj).model_fields) - reads[label] - {"kind", "name", "parent"}
        assert not unread, f"{label}: settings no part of the run reads: {sorted(unread)}"


# ---------------------------------------------------------------- losses, schedules
SCHEDULE_TYPES = {
    "constant": IR.ConstantSchedule,
    "linear": IR.LinearSchedule,
    "cosine": IR.CosineSchedule,
    "step": IR.StepSchedule,
}


@pytest.mark.parametrize("entry", entries("schedule"), ids=lambda e: e.name)
def test_schedule_entries_compile_to_their_ir_type(entry) -> None:
    args = {p.name: (3 if p.type == "int" else 0.25) for p in entry.params}
    call = f"{entry.name}({', '.join(f'{k} = {v}' for k, v in args.items())})"
    lr = compile_spec(MICRO + f"stage s = sft {{ steps = 10, lr = {call} }}\n").stage("s").lr
    if entry.name == "warmup":  # warmup(value, steps) is a constant with a warmup
        assert lr == IR.ConstantSchedule(value=0.25, warmup=3)
        return
    cls = SCHEDULE_TYPES[entry.name]
    assert isinstance(lr, cls) and set(cls.model_fields) - {"kind"} == set(args)
    assert lr.model_dump(exclude={"kind"}) == pytest.approx(args)
    for p in entry.params:  # defaults of the optional ones are the catalogue's
        if not p.required:
            assert cls.model_fields[p.name].default == p.default


def test_loss_entries_compile_to_their_ir_type() -> None:
    assert {e.name for e in entries("loss")} == {"token_mean", "mean", "ngdiff"}
    loss = lambda text: compile_spec(MICRO + f"stage s = sft {{ steps = 1, loss = {text} }}\n").stage("s").loss  # noqa: E731
    assert isinstance(loss("token_mean()"), IR.TokenMeanLoss)
    assert loss("mean(perception)") == IR.MixLoss(terms=[IR.LossTerm(weight=1.0, roles=["perception"])])
    ng = loss("ngdiff(perception, [reasoning, answer], auto_lr = true)")
    assert isinstance(ng, IR.NGDiffLoss) and ng.groups == [["perception"], ["reasoning", "answer"]]
    assert_fields_are_the_entry(IR.NGDiffLoss, "loss", "ngdiff", skip=("kind",))


# ---------------------------------------------------------------- reward terms, metrics
@pytest.mark.parametrize("entry", [e for e in entries("reward") if e.impl], ids=lambda e: e.name)
def test_reward_term_impls_take_their_catalogue_params(entry) -> None:
    fn = resolve(entry.impl)
    sig = inspect.signature(fn).parameters
    first, *rest = sig.values()
    assert first.name == "group" and first.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    named = {p.name: p for p in rest if p.kind is not inspect.Parameter.VAR_KEYWORD}
    assert set(named) == {p.name for p in entry.params}, entry.name
    assert all(p.default is inspect.Parameter.empty for p in named.values()), "defaults come from the catalogue"
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in rest), "accept **_ for forward compatibility"


def test_reward_combinators_have_no_impl() -> None:
    assert [e.name for e in entries("reward") if not e.impl] == ["gate"]


def test_every_metric_is_produced_by_the_evaluator() -> None:
    from percepdsl_runtime.evaluate import METRIC_KEYS, summarize_records

    record = {"outcome": 1, "perception_exact": 1, "perception_partial": 1.0, "format_ok": 1, "reasoning_perceived": 1}
    record |= {"n_tokens": 3, "truncated": 0, "cf_outcome": 1, "cf_n_tokens": 2, "cf_truncated": 0, "slot_errors": [0]}
    produced = summarize_records([record])
    for e in entries("metric"):
        if e.impl:  # computed beside the records at evaluation points (the probe): bound to its function
            assert callable(resolve(e.impl)), e.name
            continue
        assert e.name in produced and e.name in METRIC_KEYS and produced[e.name] is not None, e.name


def test_role_rules_are_the_ir_and_the_taggers() -> None:
    from percepdsl_runtime.roles import RoleTagger

    rules = entries("role_rule")
    assert _literal_args(IR.RoleRuleIR.model_fields["kind"].annotation) == {e.name for e in rules}
    for e in rules:
        assert {p.name for p in e.params} <= set(IR.RoleRuleIR.model_fields), e.name
    between = builtin("role_rule", "between").param("markers")
    assert IR.RoleRuleIR.model_fields["markers"].default == between.default
    tagger = RoleTagger.from_rules(compile_spec(MICRO + "stage s = sft { steps = 1 }\n").roles)
    assert tagger.role_names == ("perception", "reasoning", "answer", "other")
