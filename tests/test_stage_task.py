"""A stage's own task settings (`stage s = sft { task { reasoning = brief } }`): from spec text to
the typed IR, the stage's identity, the training data it realises, the vocabulary, evaluation on
the experiment's test items, and the editor's hover and completion."""

from __future__ import annotations

from realise import MICRO, compile_spec

from percepdsl.catalogue import builtin
from percepdsl.check import check_text
from percepdsl.ir import ExperimentIR, content_hash

ARMS = """\
stage base = sft { steps = 1, batch = 4, task { reasoning = verbose, filler_words = 3, filler_rate = 0.5 } }
stage arm = sft from base { steps = 1, batch = 4 }
"""


def test_a_stage_task_is_the_experiments_with_the_stages_settings() -> None:
    ir = compile_spec(MICRO + ARMS)
    base, arm = ir.stage("base"), ir.stage("arm")
    assert arm.task is None and ir.training_task(arm) == ir.task
    own = base.task
    assert own is not None and ir.training_task(base) == own
    assert (own.params.reasoning, own.params.filler_words, own.params.filler_rate) == ("verbose", 3, 0.5)
    # every other setting is the experiment task's (after its defaults), typed
    kept = own.params.model_dump(exclude={"reasoning", "filler_words", "filler_rate"})
    assert kept == ir.task.params.model_dump(exclude={"reasoning", "filler_words", "filler_rate"})
    assert own.params.image == 32 and own.params.test == 2 and own.impl == ir.task.impl
    assert ExperimentIR.model_validate(ir.model_dump(mode="json")) == ir  # the IR's JSON reads back


def test_a_child_stage_does_not_inherit_its_parents_task_settings() -> None:
    """Settings a stage's `task` leaves out are the experiment's, not the parent stage's."""
    ir = compile_spec(
        MICRO + ARMS.replace("arm = sft from base { steps = 1, batch = 4 }", "arm = sft from base { steps = 1, task { jitter = 0.5 } }")
    )
    arm = ir.stage("arm").task
    assert arm is not None and (arm.params.jitter, arm.params.reasoning, arm.params.filler_words) == (0.5, "brief", 0)


def test_the_experiments_own_settings_written_again_are_no_stage_task() -> None:
    """A stage `task` that sets what the experiment's has is the experiment's task: one IR, one hash."""
    plain = compile_spec(MICRO + "stage s = sft { steps = 1 }\n")
    again = compile_spec(MICRO + "stage s = sft { steps = 1, task { reasoning = brief } }\n")
    assert again.stages[0].task is None and content_hash(again) == content_hash(plain)
    assert "task" not in plain.stages[0].model_dump()  # a spec without stage tasks keeps its hash


def test_the_stage_identity_and_run_hash_change_with_the_stages_task() -> None:
    from percepdsl_runtime.stagecache import stage_identity

    plain = compile_spec(MICRO + "stage s = sft { steps = 1 }\nstage t = sft from s { steps = 1 }\n")
    own = compile_spec(MICRO + "stage s = sft { steps = 1, task { reasoning = verbose } }\nstage t = sft from s { steps = 1 }\n")
    verbose = compile_spec(MICRO + "stage s = sft { steps = 1, task { reasoning = trace } }\nstage t = sft from s { steps = 1 }\n")
    assert content_hash(plain) != content_hash(own) != content_hash(verbose)
    ids = [stage_identity(ir, ir.stage("s"), threads=1) for ir in (plain, own, verbose)]
    assert len(set(ids)) == 3
    # the child's identity holds its parent's, task included
    assert stage_identity(plain, plain.stage("t"), threads=1) != stage_identity(own, own.stage("t"), threads=1)


def test_a_stage_task_setting_may_be_a_param() -> None:
    text = MICRO.replace("seed 0\n", 'seed 0\nparam style: str = "verbose"\n') + "stage s = sft { steps = 1, task { reasoning = style } }\n"
    res = check_text(text, "spec.pd")
    assert res.ok, [d.message for d in res.diagnostics]
    assert res.ir.stages[0].task.params.reasoning == "verbose"


def test_which_settings_a_stage_may_set_is_the_catalogues() -> None:
    gc = {p.name for p in builtin("task", "graph_coloring").stage_settings()}
    assert gc == {"reasoning", "filler_words", "filler_rate", "jitter", "noise", "layout", "line_width", "node_radius", "distractors"}
    sd = {p.name for p in builtin("task", "sudoku").stage_settings()}
    assert sd == {"reasoning", "filler_words", "filler_rate", "jitter", "noise"}
    assert not builtin("task", "dataset").stage_settings()
    for name in ("nodes", "edge_prob", "edges", "train", "test", "image", "perception_format"):
        res = check_text(MICRO + f"stage s = sft {{ steps = 1, task {{ {name} = 3 }} }}\n", "spec.pd")
        assert [d.code for d in res.diagnostics if d.is_error] == ["stage-task"], name


def _words(ctx, item) -> list[str]:
    labels = item["labels"][item["labels"] >= 0].tolist()
    return ctx.encoder.tokenizer.convert_ids_to_tokens(labels)


def test_each_stage_trains_on_batches_written_as_its_task_says(tmp_path) -> None:
    """From spec text to the batches: the base stage's targets are verbose with fillers, the arm's
    the experiment's brief ones; the tokenizer (built once) covers the fillers only the base writes."""
    from percepdsl_runtime.run import build_stage, prepare

    ir = compile_spec(MICRO + ARMS)
    ctx = prepare(ir, tmp_path, echo=lambda _: None)
    fillers = ctx.encoder.tokenizer.convert_tokens_to_ids(["~0", "~1", "~2"])
    assert ctx.encoder.tokenizer.unk_token_id not in fillers
    seen = {}
    for stage in ir.stages:
        _, data = build_stage(ctx, stage)
        data.setup()
        words = [_words(ctx, it) for it in data.dataset.items]
        seen[stage.name] = words
        assert all("<reasoning>" in w and "<answer>" in w for w in words)
    base, arm = seen["base"], seen["arm"]
    assert all("adj" in w and "check" in w for w in base)  # verbose: neighbour lists and the edge check
    assert sum(f"~{k}" in w for w in base for k in range(3)) > 0
    for w in arm:  # brief: `colors k` alone between the reasoning markers
        r = w[w.index("<reasoning>") + 1 : w.index("</reasoning>")]
        assert r[0] == "colors" and len(r) == 2 and not any(x.startswith("~") for x in w)
    # the same training instances, written two ways: the perception sections are equal
    for a, b in zip(base, arm):
        assert a[: a.index("</perception>")] == b[: b.index("</perception>")]


def test_a_grpo_stage_draws_its_prompts_from_its_task(tmp_path) -> None:
    from percepdsl_runtime.run import build_stage, prepare

    ir = compile_spec(
        MICRO
        + "stage base = sft { steps = 1, batch = 4 }\n"
        + "stage rl = grpo from base { steps = 1, batch = 2, group = 2, reward = outcome, task { reasoning = verbose, jitter = 0.3 } }\n"
    )
    ctx = prepare(ir, tmp_path, echo=lambda _: None)
    module, _ = build_stage(ctx, ir.stage("rl"))
    assert module.task.params.reasoning == "verbose" and module.task.params.jitter == 0.3
    a, b = module.task.sample("train", 1), ctx.task.sample("train", 1)
    assert a.perception == b.perception and a.instance == b.instance and a.response != b.response
    assert a.image.tobytes() != b.image.tobytes()  # rendered with the stage's jitter


def test_every_stage_is_evaluated_on_the_experiments_test_items(tmp_path, monkeypatch) -> None:
    """Evaluation reads the experiment's task (its test items, written in its format), whatever
    task the stage trains on: deltas between stages compare the same items."""
    from types import SimpleNamespace

    import percepdsl_runtime.evaluate as evaluate_mod
    from percepdsl_runtime.evaluate import EvalConfig
    from percepdsl_runtime.run import StageEval, build_stage, prepare

    ir = compile_spec(MICRO + ARMS)
    ctx = prepare(ir, tmp_path, echo=lambda _: None)
    used = []

    def fake(loaded, encoder, task, split, n, cfg):
        used.append((task, split))
        return SimpleNamespace(records=[], metrics={"n": 0}, seconds=0.0)

    monkeypatch.setattr(evaluate_mod, "evaluate", fake)
    stage = ir.stage("base")
    module, data = build_stage(ctx, stage)
    data.setup()
    StageEval(ctx, stage, EvalConfig.from_ir(ir.eval), None).evaluate_now(0, module, data, final=True)
    assert used == [(ctx.task, "test")] and ctx.task.params == ir.task.params
    assert data.task is not ctx.task and data.task.params.reasoning == "verbose"
