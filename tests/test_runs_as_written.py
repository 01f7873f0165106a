"""A spec that checks runs exactly as written.

From spec text through `check`, the IR and the run's own stage construction to the values
training realised (tests/realise.py): the learning rate of every optimiser step, the weight
the loss puts on each role's tokens, and every rollout's reward, each against a value computed
here from the IR's JSON by a reference written for these tests (closed form per schedule kind).
The regression tests pin the bugs this used to miss; the property test generates valid specs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from realise import MICRO, Micro, Realised, compile_spec

from percepdsl.ir import ExperimentIR

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> Micro:
    return Micro(tmp_path_factory.mktemp("micro"))


# ---------------------------------------------------------------- the reference, from the IR's JSON
def ref_value(v: Any, step: int, total: int) -> float:
    """A number, or a schedule (its JSON) at optimiser step `step` of `total`: warmup ramps
    linearly from 0 to the schedule's first value; then `t = (step − warmup)/(total − warmup)`."""
    if isinstance(v, (int, float)):
        return float(v)
    kind, w = v["kind"], v["warmup"]
    first = v["value"] if kind == "constant" else v["start"]
    if step < w:
        return first * step / w
    t = min((step - w) / max(total - w, 1), 1.0)
    if kind == "constant":
        return v["value"]
    if kind == "linear":
        return v["start"] + (v["end"] - v["start"]) * t
    if kind == "cosine":
        return v["end"] + (v["start"] - v["end"]) * (1 + math.cos(math.pi * t)) / 2
    assert kind == "step"
    return v["start"] * v["factor"] ** ((step - w) // v["every"])


def ref_token_weights(loss: dict, roles: list[str], step: int, total: int, counts: list[int]) -> list[float]:
    """The weight of one token of each role: Σ over the terms that hold the role of W(step)/n_term."""
    if loss["kind"] == "token_mean":
        terms = [{"weight": 1.0, "roles": roles}]
    else:
        terms = loss["terms"]
    out = [0.0] * len(roles)
    for term in terms:
        n = sum(counts[roles.index(r)] for r in term["roles"])
        for r in term["roles"]:
            out[roles.index(r)] += ref_value(term["weight"], step, total) / n if n else 0.0
    return out


def ref_reward(node: dict, group: Any, step: int, total: int) -> list[float]:
    """A reward tree on one group at optimiser step `step` of `total` (a scheduled weight is
    `ref_value` there), from the task's scores (the labelled terms) or by definition."""
    n = len(group.completions)
    kind = node["kind"]
    if kind == "term":
        s = group.scores
        name = node["name"]
        if name == "visual_dependency":  # the policy's JS per perception token, as the run computed it
            t, per = node["params"]["threshold"], group.dependency(node["params"]["against"])
            return [0.0 if not len(js) else float(js.mean()) if t is None else sum(float(x) > t for x in js) / len(js) for js in per]
        if name == "self_consistency":
            p = group.perceptions
            if node["params"]["mode"] == "agreement":
                return [0.0 if x is None else (p.count(x) - 1) / (n - 1) for x in p]
            top = max([p.count(x) for x in p if x is not None], default=0)
            return [float(x is not None and top >= 2 and p.count(x) == top) for x in p]
        field = {"outcome": "outcome", "perception_match": "perception_exact", "perception_partial": "perception_partial"}
        field |= {"format": "format_ok", "perceived_consistency": "reasoning"}
        return [float(getattr(x, field[name])) for x in s]
    if kind == "const":
        return [node["value"]] * n
    kids = [ref_reward(c, group, step, total) for c in node["children"]]
    if kind == "sum":
        return [sum(v) for v in zip(*kids)]
    if kind == "product":
        return [math.prod(v) for v in zip(*kids)]
    if kind == "scale":
        return [ref_value(node["value"], step, total) * v for v in kids[0]]
    assert kind == "gate"
    return [a if b == 1.0 else 0.0 for a, b in zip(*kids)]


def assert_as_written(ir: ExperimentIR, realised: dict[str, Realised]) -> None:
    """Every stage's realised lr, role weights and rewards equal the reference's."""
    doc = ir.model_dump(mode="json")
    for stage in doc["stages"]:
        rec, total = realised[stage["name"]], stage["steps"]
        want = [ref_value(stage["lr"], i, total) for i in range(len(rec.lr))]
        got = [lr / scale for lr, scale in rec.lr]  # NGDiff's auto LR multiplies the scheduled lr
        assert len(rec.lr) == total, (stage["name"], len(rec.lr))
        assert got == pytest.approx(want, rel=1e-6, abs=1e-12), (stage["name"], stage["lr"])
        if stage["kind"] == "sft" and stage["loss"]["kind"] != "ngdiff":
            assert rec.role_weights, stage["name"]
            for step, weights, counts in rec.role_weights:
                ref = ref_token_weights(stage["loss"], ir.role_names, step, total, counts)
                assert weights == pytest.approx(ref, rel=1e-5, abs=1e-9), (stage["name"], step, stage["loss"])
            for step, logs in enumerate(rec.logs):  # the logged effective λ: perception's share of the token weight
                _, weights, counts = next(w for w in rec.role_weights if w[0] == step)
                mass = [w * c for w, c in zip(weights, counts)]
                if sum(mass) > 0:
                    assert logs["eff_lambda"] == pytest.approx(mass[ir.role_names.index("perception")] / sum(mass), rel=1e-4, abs=1e-6)
        if stage["kind"] == "grpo":
            B, mode = stage["batch"], stage["constant_groups"]
            draws = [int(logs["resample_draws"]) for logs in rec.logs]  # extra prompt batches of each generated batch
            assert len(draws) == math.ceil(total / stage["updates"]) and len(rec.rewards) == sum(B * (1 + d) for d in draws)
            assert all(d <= (stage["resample_tries"] if mode == "resample" else 0) for d in draws), (mode, draws)
            steps = [step for _, _, step in rec.rewards]
            assert steps == sorted(steps) and set(steps) == set(range(0, total, stage["updates"])), steps
            for logs, step in zip(rec.logs, range(0, total, stage["updates"])):  # the constant-group logs, from the rewards
                flat = [bool(min(v.total) == max(v.total)) for _, v, s in rec.rewards if s == step]
                signal = min(flat.count(False) if mode == "resample" else flat[:B].count(False), B)
                assert logs["constant_group_frac_before"] == pytest.approx(sum(flat[:B]) / B)
                assert logs["trained_group_frac"] == pytest.approx(1.0 if mode == "keep" else signal / B)
            for group, values, step in rec.rewards:
                assert list(values.total) == pytest.approx(ref_reward(stage["reward"], group, step, total), abs=1e-9)


def realise(micro: Micro, stages: str, catalogue: Any = None) -> tuple[ExperimentIR, dict[str, Realised]]:
    ir = compile_spec(MICRO + stages, catalogue)
    return ir, micro.run(ir)


# ---------------------------------------------------------------- regressions
def test_a_learning_rate_schedule_from_zero_is_absolute(micro: Micro) -> None:
    """`lr = linear(0, 1e-3)` trained at lr 0 on every step: SFT applied a schedule as a
    multiplier of its start value. Now both stage kinds read absolute values."""
    ir, got = realise(micro, "stage s = sft { steps = 4, batch = 2, lr = linear(0, 1e-3) }\n")
    assert [lr for lr, _ in got["s"].lr] == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4])
    assert_as_written(ir, got)


def test_step_schedules_run(micro: Micro) -> None:
    """`lr = step(...)` and a `step(...)` loss weight checked clean and crashed at run time
    (`float(None)`: the IR carried `end: null`)."""
    ir, got = realise(
        micro,
        "stage s = sft { steps = 5, batch = 2, lr = step(1e-3, factor = 0.5, every = 2)\n"
        "  loss = step(0.8, factor = 0.5, every = 2) * mean(perception) + 0.2 * mean(reasoning, answer) }\n",
    )
    assert [lr for lr, _ in got["s"].lr] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4])
    assert_as_written(ir, got)


def test_effective_lambda_of_a_loss_without_perception_is_zero(micro: Micro) -> None:
    """`loss = mean(reasoning, answer)` logged an effective λ of 1.0, though perception's weight is 0."""
    ir, got = realise(micro, "stage s = sft { steps = 2, batch = 2, loss = mean(reasoning, answer) }\n")
    assert [logs["eff_lambda"] for logs in got["s"].logs] == [0.0, 0.0]
    assert_as_written(ir, got)


def test_a_reward_weight_follows_its_schedule_and_is_logged_by_name(micro: Micro) -> None:
    """`linear(0.1, 0.5) * perception_match + ...` was refused (losses took schedules, rewards did
    not: trl#3036). The weight is the IR's schedule at each step, evaluated like the lr, and logged."""
    ir, got = realise(
        micro,
        "stage g = grpo { steps = 4, batch = 1, group = 2, max_new_tokens = 4, reward = linear(0.1, 0.5) * format + 0.5 * outcome }\n",
    )
    assert [logs["reward_weight/format"] for logs in got["g"].logs] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert_as_written(ir, got)


@pytest.mark.parametrize("mode", ["drop", "resample"])
def test_constant_groups_are_dropped_or_resampled_as_written(micro: Micro, mode: str) -> None:
    """`constant_groups` reaches the GRPO step: the logged shares of constant groups and of trained
    groups, and the number of extra prompt batches, follow from the rewards the step computed."""
    ir, got = realise(
        micro,
        "stage g = grpo { steps = 3, batch = 2, group = 2, max_new_tokens = 4, reward = 0.5 * format + outcome, "
        f"constant_groups = {mode}, resample_tries = 2 }}\n",
    )
    assert (ir.stages[0].constant_groups, ir.stages[0].resample_tries) == (mode, 2)
    assert [logs["constant_group_frac_after"] for logs in got["g"].logs] == [0.0, 0.0, 0.0]
    if mode == "resample":  # an untrained model's rewards are flat: every step draws its 2 extra batches
        assert [logs["resample_draws"] for logs in got["g"].logs] == [2.0, 2.0, 2.0]
    assert_as_written(ir, got)


def test_max_length_is_each_stages_own(tmp_path: Path) -> None:
    """`max_length` of one sft stage truncated the items of every stage, to the largest one any
    stage set: `a { max_length = 26 }` beside `b { }` trained b on items cut at 29 tokens, and a on
    items of up to 29 (c's). The micro items have 28-32 tokens; 8 steps of 2 see all 16: each stage
    trains on its own cut, or on whole items."""
    from percepdsl_runtime.run import build_stage, prepare
    from percepdsl_runtime.sft import build_trainer

    ir = compile_spec(
        MICRO + "stage a = sft { steps = 8, batch = 2, max_length = 26 }\n"
        "stage b = sft from a { steps = 8, batch = 2 }\n"
        "stage c = sft from a { steps = 8, batch = 2, max_length = 29 }\n"
    )
    ctx = prepare(ir, tmp_path, echo=lambda _: None)
    seen: dict[str, list[int]] = {}
    for stage in ir.stages:
        module, datamodule = build_stage(ctx, stage)
        step = module.training_step

        def record(batch, batch_idx, name=stage.name, step=step):  # the items of every training batch
            lengths = batch["seq_lengths"].flatten().tolist() if "seq_lengths" in batch else batch["attention_mask"].sum(1).tolist()
            seen.setdefault(name, []).extend(int(n) for n in lengths if n)
            return step(batch, batch_idx)

        module.training_step = record
        build_trainer(stage.steps, precision="32-true", accelerator="cpu", num_sanity_val_steps=0, default_root_dir=str(tmp_path)).fit(
            module, datamodule=datamodule
        )
    assert (max(seen["a"]), max(seen["b"]), max(seen["c"]), min(seen["b"])) == (26, 32, 29, 28), seen


def test_a_max_length_that_cuts_into_the_prompt_is_refused_with_its_stage(tmp_path: Path) -> None:
    """A cut inside the 12-token prompt raised an EncodingError traceback out of `prepare`."""
    from percepdsl_runtime.run import RunRefused, prepare

    ir = compile_spec(MICRO + "stage a = sft { steps = 1 }\nstage b = sft from a { steps = 1, max_length = 10 }\n")
    with pytest.raises(RunRefused, match=r"stage `b` \(`max_length = 10`\): max_length 10 leaves no room for targets"):
        prepare(ir, tmp_path, echo=lambda _: None)


def _diagnostics(text: str) -> list[tuple[str, bool, int, int, str]]:
    from percepdsl.check import check_text

    res = check_text(text, "spec.pd")
    return [(d.code, d.is_error, d.span.line, d.span.column, d.message) for d in res.diagnostics]


def test_a_batch_larger_than_the_training_split_is_an_error() -> None:
    """`batch = 20` of 16 training items checked clean; SFT then trained on batches of all 16 (the
    sampler keeps a short last batch), and GRPO stopped in its first step with a ValueError."""
    sft, grpo = "stage s = sft { steps = 1, batch = 20 }", "stage g = grpo from s { steps = 1, batch = 17, reward = outcome }"
    diags = _diagnostics(MICRO + sft + "\n" + grpo + "\n")
    assert [d[:4] for d in diags] == [("incompatible", True, 7, sft.index("batch") + 1), ("incompatible", True, 8, grpo.index("batch") + 1)]
    assert "stage `s`: `batch = 20` is more than the 16 training items of the task" in diags[0][4]
    ddp = MICRO.replace("clip = 1.0", "clip = 1.0, accelerator = cpu, devices = 2")  # a batch on each rank
    assert [d[0] for d in _diagnostics(ddp + "stage s = sft { steps = 1, batch = 9 }\n")] == ["incompatible"]
    assert not _diagnostics(MICRO + "stage s = sft { steps = 1, batch = 16 }\n")


def test_an_eval_test_count_beyond_the_test_split_is_an_error() -> None:
    """`eval { test = 5 }` of a 2-item test split checked clean and evaluated 2 items."""
    diags = _diagnostics(MICRO.replace("eval { test = 2", "eval { test = 5") + "stage s = sft { steps = 1 }\n")
    assert [d[:4] for d in diags] == [("incompatible", True, 5, len("eval { ") + 1)], diags
    assert "`test = 5` is more than the 2 test items of the task" in diags[0][4]


def test_gradient_accumulation_is_refused_by_ngdiff_and_flagged_as_ignored_by_grpo() -> None:
    """`trainer { accumulate = 2 }` checked clean beside an ngdiff stage (the run then refused it)
    and beside a grpo stage (which trains without accumulation)."""
    spec = MICRO.replace("clip = 1.0", "clip = 1.0, accumulate = 2")
    diags = _diagnostics(spec + "stage s = sft { steps = 1, loss = ngdiff(perception, [reasoning, answer]) }\n")
    col = spec.splitlines()[5].index("accumulate") + 1
    assert [d[:4] for d in diags] == [("incompatible", True, 6, col)], diags
    diags = _diagnostics(spec + "stage s = sft { steps = 1 }\nstage g = grpo from s { steps = 1, reward = outcome }\n")
    assert [d[:4] for d in diags] == [("ignored-setting", False, 6, col)], diags
    assert "stage `g`" in diags[0][4]
    assert not _diagnostics(spec + "stage s = sft { steps = 1 }\n")


def test_fp16_mixed_precision_on_cpu_is_refused_not_run_as_bf16(tmp_path: Path) -> None:
    """`precision = "16-mixed"` checked clean and, on CPU, trained in bf16-mixed: Lightning swaps
    fp16 AMP for bf16 there with a warning. An explicit CPU accelerator is a located error; an `auto`
    one that resolves to the CPU refuses the run before its first step."""
    from percepdsl_runtime.run import RunRefused, run

    spec = MICRO.replace('precision = "32-true"', 'precision = "16-mixed", accelerator = cpu')
    diags = _diagnostics(spec + "stage s = sft { steps = 1 }\n")
    assert [d[:4] for d in diags] == [("incompatible", True, 6, len("trainer { ") + 1)], diags
    assert "bf16-mixed" in diags[0][4]
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("`auto` resolves to an accelerator with fp16 AMP")
    ir = compile_spec(MICRO.replace('precision = "32-true"', 'precision = "16-mixed"') + "stage s = sft { steps = 1 }\n")
    with pytest.raises(RunRefused, match=r"`precision = \"16-mixed\"`.*CPU"):
        run(ir, {}, tmp_path, progress=False, echo=lambda _: None)
    assert not list(tmp_path.glob("*/stages/s/done.json"))


@pytest.mark.parametrize(
    "dtype, trainer, error",
    [
        ("float16", "", True),  # the default precision is bf16-mixed
        ("float16", 'trainer { precision = "bf16-mixed" }', True),
        ("bfloat16", 'trainer { precision = "16-mixed" }', True),
        ("float16", 'trainer { precision = "32-true" }', False),
        ("bfloat16", "", False),
        ("float16", 'trainer { precision = "bf16-true" }', False),  # Lightning casts the weights to bf16
    ],
)
def test_half_weights_under_the_other_half_autocast_are_an_error(dtype: str, trainer: str, error: bool) -> None:
    """`model hf "..." { dtype = float16 }` under bf16 autocast (the default precision) checked clean and
    stopped in the first step with a traceback: autocast mixes only its own half type with fp32
    (`RuntimeError: Unexpected floating ScalarType in at::autocast::prioritize`, in CLIP's embeddings)."""
    spec = f'experiment d\ntask graph_coloring {{ train = 8, test = 2 }}\nmodel hf "/m" {{ dtype = {dtype} }}\nstage s = sft {{ steps = 1 }}\n{trainer}\n'
    diags = [d for d in _diagnostics(spec) if d[0] == "incompatible"]
    if not error:
        assert not diags, diags
        return
    assert [d[:4] for d in diags] == [("incompatible", True, 3, len('model hf "/m" { ') + 1)], diags
    assert f"`dtype = {dtype}`" in diags[0][4] and "autocast" in diags[0][4]


@pytest.mark.parametrize(
    "old, new, setting",
    [
        ("loss = token_mean()", "loss = ngdiff(perception, [reasoning, answer], auto_lr_every = 5)", "auto_lr_every"),
        ("eval { test = 2, max_new_tokens = 8 }", "eval { test = 2, max_new_tokens = 8, cap_factor = 2 }", "cap_factor"),
        ("eval { test = 2, max_new_tokens = 8 }", "eval { test = 2, max_new_tokens = 8, cap_margin = 5 }", "cap_margin"),
        ("eval { test = 2, max_new_tokens = 8 }", "eval { test = 2, top_p = 0.9 }", "top_p"),
    ],
)
def test_a_setting_the_run_does_not_read_is_flagged(old: str, new: str, setting: str) -> None:
    """Settings that checked clean and changed nothing: `auto_lr_every` without `auto_lr = true`
    (no line search runs), `cap_factor` and `cap_margin` beside an eval `max_new_tokens` (one cap for
    every item), `top_p` with greedy evaluation (`temperature = 0`). Each is an `ignored-setting` warning."""
    text = MICRO + "stage s = sft { steps = 1, loss = token_mean() }\n"
    assert not _diagnostics(text)
    text = text.replace(old, new)
    diags = _diagnostics(text)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if setting in row)
    assert [d[:4] for d in diags] == [("ignored-setting", False, line, text.splitlines()[line - 1].index(setting) + 1)], diags
    assert f"`{setting}` has no effect" in diags[0][4]


@pytest.mark.parametrize(
    "trainer, stage, evaluated",
    [
        ("accumulate = 2", "stage s = sft { steps = 4, batch = 2 }", [2, 4]),
        (
            "log_every = 1",
            "stage a = sft { steps = 1 }\nstage s = grpo from a { steps = 6, batch = 1, group = 2, max_new_tokens = 4, updates = 2, reward = outcome }",
            [4, 6],
        ),
    ],
    ids=["accumulate", "updates"],
)
def test_eval_every_evaluates_once_at_each_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trainer: str, stage: str, evaluated: list[int]
) -> None:
    """`eval { every = N }` evaluated at the end of every batch whose step was a multiple of N: with
    `accumulate = 2` twice at step 2 (the step ends two batches), and a grpo stage with `updates = 2`
    (two steps a batch) never at step 3. Each multiple of N now takes one evaluation, at the first step
    on or past it; and the resume checkpoint, saved by the same rule, is never one taken mid-step."""
    import lightning as L

    from percepdsl_runtime import run as run_module

    saved: list[int] = []
    save = L.Trainer.save_checkpoint
    monkeypatch.setattr(L.Trainer, "save_checkpoint", lambda self, *a, **k: (saved.append(self.global_step), save(self, *a, **k))[1])
    monkeypatch.setattr(run_module, "RESUME_EVERY", 2 if "accumulate" in trainer else 3)
    spec = MICRO.replace("log_every = 1", trainer).replace(
        "max_new_tokens = 8 }", "max_new_tokens = 8, every = 3 }" if "updates" in stage else "max_new_tokens = 8, every = 2 }"
    )
    ir = compile_spec(spec + stage + "\n")
    run_dir = run_module.run(ir, {}, tmp_path, progress=False, echo=lambda _: None)
    history = json.loads((run_dir / "stages" / "s" / "done.json").read_text())["history"]
    assert [h["step"] for h in history] == evaluated
    assert saved == evaluated[:1], saved


def test_a_visual_reference_is_refreshed_on_schedule_by_a_grpo_stage_with_several_updates(tmp_path: Path) -> None:
    """`visual(refresh = 3)` re-copied its reference when the step at a batch's start was a multiple
    of 3; a grpo batch with `updates = 2` starts at steps 0, 2, 4 only, so it was never refreshed.
    It is now refreshed at the first batch start on or past each multiple."""
    from percepdsl_runtime.run import build_stage, prepare
    from percepdsl_runtime.sft import build_trainer

    roles = (
        'roles {\n  perception = between("<perception>", "</perception>")\n  grounded = visual(threshold = 0, refresh = 3)\n'
        '  reasoning = between("<reasoning>", "</reasoning>")\n  answer = rest()\n}\n'
    )
    ir = compile_spec(
        MICRO + roles + "stage g = grpo { steps = 6, batch = 1, group = 2, max_new_tokens = 4, updates = 2, reward = format, "
        "token_weights { grounded = 2.0 } }\n"
    )
    ctx = prepare(ir, tmp_path, echo=lambda _: None)
    module, datamodule = build_stage(ctx, ir.stages[0])
    refreshed: list[int] = []
    for ref in module.visual.references.values():
        load = ref.load_state_dict
        ref.load_state_dict = lambda state, load=load: (refreshed.append(module.global_step), load(state))[1]
    build_trainer(6, precision="32-true", accelerator="cpu", num_sanity_val_steps=0, default_root_dir=str(tmp_path)).fit(
        module, datamodule=datamodule
    )
    assert refreshed == [4]


@pytest.mark.parametrize(
    "sizes, other", [("width = 18, depth = 1, heads = 4", "width"), ("width = 16, depth = 1, heads = 4, vision_width = 18", "vision_width")]
)
def test_tiny_sizes_the_heads_do_not_divide_are_located_errors(sizes: str, other: str) -> None:
    """`model tiny { width = 18, heads = 4 }` checked clean and the run was refused while building the
    model (transformers: the hidden size is not a multiple of the heads); the vision tower has the same heads."""
    text = MICRO.replace("width = 16, depth = 1, heads = 1, vision_width = 16", sizes) + "stage s = sft { steps = 1 }\n"
    diags = _diagnostics(text)
    assert [d[:4] for d in diags] == [("incompatible", True, 4, text.splitlines()[3].index("heads") + 1)], diags
    assert f"`{other} = 18`" in diags[0][4]


def test_edge_prob_beside_a_fixed_edge_count_is_flagged() -> None:
    """`task graph_coloring { edges = 3, edge_prob = 0.2 }` checked clean: every graph has 3 edges, and
    `edge_prob` changed nothing."""
    text = MICRO.replace("nodes = 4,", "nodes = 4, edges = 3, edge_prob = 0.2,") + "stage s = sft { steps = 1 }\n"
    diags = _diagnostics(text)
    assert [d[:4] for d in diags] == [("ignored-setting", False, 3, text.splitlines()[2].index("edge_prob") + 1)], diags
    assert "`edge_prob` has no effect: `edges = 3`" in diags[0][4]
    assert not _diagnostics(text.replace(" edge_prob = 0.2,", ""))


def test_resample_tries_without_resample_is_flagged() -> None:
    from percepdsl.check import check_text

    res = check_text(MICRO + "stage a = sft { steps = 1 }\nstage g = grpo from a { steps = 2, reward = outcome, resample_tries = 3 }\n")
    (d,) = [d for d in res.diagnostics if d.code == "ignored-setting"]
    assert not d.is_error and "constant_groups = keep" in d.message and (d.span.line, d.span.column) == (8, 54)
    res = check_text(
        MICRO + "stage a = sft { steps = 1 }\nstage g = grpo from a { steps = 2, reward = outcome, constant_groups = resample }\n"
    )
    assert res.ok and not res.diagnostics


@pytest.mark.parametrize(
    "reward, code",
    [
        ("linear(0, 1) + outcome", "schedule-arith"),
        ("outcome * format * linear(0, 1) + step(1, every = 2)", "schedule-arith"),
        ("linear(0, 2) * outcome", "out-of-range"),
        ("outcome / linear(1, 2)", "type"),
    ],
)
def test_a_schedule_weights_a_reward_term_and_nothing_else(reward: str, code: str) -> None:
    from percepdsl.check import check_text

    res = check_text(MICRO + f"stage g = grpo {{ steps = 2, reward = {reward} }}\n")
    assert [d.code for d in res.diagnostics if d.is_error] == [code], [d.message for d in res.diagnostics]


PLUGIN_TOML = """
[[entry]]
name = "micro_plugin"
kind = "model"
doc = "a tiny model built by a plugin"
impl = "test_runs_as_written:plugin_model"

[[entry.params]]
name = "width"
type = "int"
default = 24
min = 16
"""


def plugin_model(model, *, vocabulary, image, seed, save_dir):
    """A plugin model kind: the tiny architecture at the plugin's own width."""
    from percepdsl_runtime.models import build_tiny

    loaded = build_tiny(vocabulary, image=image, seed=seed, save_dir=save_dir, width=model.params["width"], depth=1, heads=1)
    loaded.kind = "micro_plugin"
    return loaded


def test_a_plugin_model_is_what_the_run_trains(tmp_path: Path) -> None:
    """A plugin catalogue entry of kind `model` checked clean and `percep run` ignored it (it
    loaded an `hf` model from no path). The run builds every model kind through its `impl`."""
    import tomllib

    from percepdsl.catalogue import BUILTINS, Catalogue, _entry_from_toml
    from percepdsl_runtime.run import prepare

    cat = Catalogue(BUILTINS)
    for item in tomllib.loads(PLUGIN_TOML)["entry"]:
        cat.add(_entry_from_toml(item, "micro-plugin"))
    spec = MICRO.replace(
        "model tiny { width = 16, depth = 1, heads = 1, vision_width = 16, vision_depth = 1, patch = 16px }",
        "model micro_plugin { width = 32 }",
    )
    ir = compile_spec(spec + "stage s = sft { steps = 1 }\n", cat)
    assert ir.model.kind == "micro_plugin" and ir.model.params == {"width": 32}
    ctx = prepare(ir, tmp_path, echo=lambda _: None)
    assert ctx.loaded.kind == "micro_plugin" and ctx.loaded.model.config.text_config.hidden_size == 32


def test_the_readme_grid_command_sets_a_template_param(tmp_path: Path) -> None:
    """`percep grid specs/grids/lambda_sweep.pd --set steps=300` (README) was refused: the template
    had no `steps` param. `--set` fixes a template param no axis sweeps, like `fix` in the grid."""
    from percepdsl.check import check_file
    from percepdsl_runtime.grid import plan_grid

    plan = plan_grid(ROOT / "specs/grids/lambda_sweep.pd", out=tmp_path, sets=["steps=300"])
    assert plan.grid.fixed == {"steps": 300} and len(plan.cells) == 15
    assert all(cell.params["steps"] == 300 for cell in plan.cells)
    ir = check_file(ROOT / "specs/gc_sft_fixed.pd", plan.cells[0].cell.overrides()).ir
    assert ir.stage("post").steps == 300 and ir.stage("base").steps == 1500


# ---------------------------------------------------------------- the property
def _num(x: float) -> str:
    return repr(round(x, 6))


@st.composite
def schedules(draw, lo: float, hi: float, sched_only: bool = False) -> str:
    """A value in [lo, hi] as spec text: a number, or a schedule of any kind, with or without
    warmup, whose first value may be 0."""
    value = st.one_of(st.just(0.0), st.just(hi), st.floats(lo, hi, allow_nan=False))
    kinds = ["constant", "linear", "cosine", "step", "warmup"] + ([] if sched_only else ["number"])
    kind = draw(st.sampled_from(kinds))
    warm = draw(st.sampled_from([0, 0, 1, 2]))
    w = f", warmup = {warm}" if warm else ""
    a, b = _num(draw(value)), _num(draw(value))
    if kind == "number":
        return a
    if kind == "constant":
        return f"constant({a}{w})"
    if kind == "warmup":
        return f"warmup({a}, {warm + 1})"
    if kind == "step":
        return f"step({a}, factor = {_num(draw(st.floats(0.1, 1.0)))}, every = {draw(st.integers(1, 3))}{w})"
    return f"{kind}({a}, {b}{w})"


@st.composite
def losses(draw) -> str:
    kind = draw(st.sampled_from(["token_mean", "fixed", "scheduled", "reasoning_only", "ngdiff", "ngdiff_auto_lr"]))
    if kind == "token_mean":
        return "token_mean()"
    if kind == "fixed":
        lam = draw(st.floats(0.0, 1.0))
        return f"{_num(lam)} * mean(perception) + {_num(1 - lam)} * mean(reasoning, answer)"
    if kind == "scheduled":
        return (
            f"{draw(schedules(0.0, 1.0, sched_only=True))} * mean(perception) + {_num(draw(st.floats(0.0, 1.0)))} * mean(reasoning, answer)"
        )
    if kind == "reasoning_only":
        return "mean(reasoning, answer)"
    every = f", auto_lr_every = {draw(st.integers(1, 3))}, norm_every = {draw(st.integers(1, 3))}" if draw(st.booleans()) else ""
    return f"ngdiff(perception, [reasoning, answer], auto_lr = {'true' if kind == 'ngdiff_auto_lr' else 'false'}{every})"


TERMS = [
    "outcome",
    "perception_match",
    "perception_partial",
    "format",
    "perceived_consistency",
    "self_consistency",
    "self_consistency(mode = majority)",
    "visual_dependency",
    "visual_dependency(against = blank, threshold = 0.01)",
]


@st.composite
def rewards(draw) -> str:
    a, b = draw(st.sampled_from(TERMS)), draw(st.sampled_from(TERMS))
    alpha = _num(draw(st.floats(0.0, 1.0)))
    sched = draw(schedules(0.0, 1.0, sched_only=True))  # a weight that follows the stage's steps
    return draw(
        st.sampled_from(
            [
                f"{alpha} * {a} + (1 - {alpha}) * {b}",
                f"gate({alpha} * {a} + 0.5 * {b}, format)",
                f"{a} * {b} + 0.1",
                f"{a} - {alpha} * {b}",
                f"{sched} * {a} + {alpha} * {b}",
                f"gate({b} * {sched}, format)",
            ]
        )
    )


@st.composite
def specs(draw) -> str:
    """Stages of every kind: an SFT stage, then SFT and GRPO stages from it, each with its own
    learning rate, loss or reward, batching and length."""
    steps = st.integers(2, 4)
    out = [
        f"stage a = sft {{ steps = {draw(steps)}, batch = 2, lr = {draw(schedules(0.0, 1e-2))}, "
        f"batching = {draw(st.sampled_from(['random', 'length']))}, loss = {draw(losses())} }}"
    ]
    if draw(st.booleans()):
        out.append(
            f"stage b = sft from a {{ steps = {draw(steps)}, batch = 2, lr = {draw(schedules(0.0, 1e-2))}, loss = {draw(losses())} }}"
        )
    if draw(st.booleans()):
        out.append(
            f"stage c = grpo from a {{ steps = {draw(steps)}, batch = 1, group = 2, max_new_tokens = 4, "
            f"updates = {draw(st.sampled_from([1, 2]))}, lr = {draw(schedules(0.0, 1e-2))}, reward = {draw(rewards())} }}"
        )
    return "\n".join(out) + "\n"


COVERAGE = [  # every schedule kind with and without warmup and from 0, every loss kind, every reward form
    "stage a = sft { steps = 4, batch = 2, lr = cosine(0, 1e-3, warmup = 2), batching = length, loss = token_mean() }\n"
    "stage b = sft from a { steps = 3, batch = 2, lr = step(1e-3, factor = 0.5, every = 1, warmup = 1), loss = linear(0, 1, warmup = 1) * mean(perception) + 0.5 * mean(reasoning, answer) }\n"
    "stage c = grpo from a { steps = 3, batch = 1, group = 2, max_new_tokens = 4, updates = 2, lr = warmup(1e-3, 2), reward = gate(0.3 * self_consistency + 0.5 * outcome, format) }\n"
    "stage d = grpo from a { steps = 4, batch = 1, group = 2, max_new_tokens = 4, reward = linear(0.1, 0.5) * format + (1 - linear(0.1, 0.5)) * perceived_consistency }\n",
    "stage a = sft { steps = 3, batch = 2, lr = linear(1e-3, 0), loss = ngdiff(perception, [reasoning, answer], auto_lr = true, auto_lr_every = 2, norm_every = 2) }\n"
    "stage b = sft from a { steps = 3, batch = 2, lr = constant(2e-3, warmup = 1), loss = 0.25 * mean(perception) + 0.75 * mean(reasoning, answer) }\n"
    "stage c = grpo from a { steps = 2, batch = 1, group = 2, max_new_tokens = 4, lr = 1e-3, reward = perception_partial * self_consistency(mode = majority) + 0.1 + visual_dependency(against = blank) }\n",
    "stage a = sft { steps = 3, batch = 2, lr = 0, loss = step(1, factor = 0.5, every = 1) * mean(perception) + cosine(0, 1) * mean(reasoning, answer) }\n"
    "stage b = sft from a { steps = 2, batch = 2, lr = cosine(1e-3, 1e-4, warmup = 1), loss = ngdiff(perception, [reasoning, answer]) }\n"
    "stage c = grpo from a { steps = 2, batch = 1, group = 2, max_new_tokens = 4, lr = linear(0, 1e-3, warmup = 1), reward = perceived_consistency - 0.5 * format }\n",
]


@pytest.mark.parametrize("stages", COVERAGE, ids=["cover1", "cover2", "cover3"])
def test_covered_specs_run_as_written(micro: Micro, stages: str) -> None:
    ir, got = realise(micro, stages)
    assert_as_written(ir, got)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(stages=specs())
def test_generated_specs_run_as_written(micro: Micro, stages: str) -> None:
    ir, got = realise(micro, stages)
    assert_as_written(ir, got)


def test_fp16_loss_scaling_is_refused_beside_stages_that_step_their_own_optimiser() -> None:
    """grpo stages and ngdiff sft stages clip (ngdiff also normalises) their gradients themselves,
    before Lightning's fp16 scaler unscales them inside the optimiser step: with `16-mixed` the clip
    would see gradients ×65,536 and ngdiff's step would be divided by the scale. A located error on a
    GPU trainer too (no GPU needed to check); token-mean sft, clipped by Lightning, is not flagged."""
    spec = MICRO.replace('precision = "32-true"', 'precision = "16-mixed", accelerator = gpu')
    col = len("trainer { ") + 1
    for stage in (
        "stage s = sft { steps = 1, loss = ngdiff(perception, [reasoning, answer]) }\n",
        "stage s = sft { steps = 1 }\nstage g = grpo from s { steps = 1, reward = outcome }\n",
    ):
        diags = _diagnostics(spec + stage)
        assert [d[:4] for d in diags] == [("incompatible", True, 6, col)], diags
        assert "before Lightning unscales them" in diags[0][4]
    assert not _diagnostics(spec + "stage s = sft { steps = 1 }\n")


def test_settings_a_stage_is_too_short_to_reach_are_flagged() -> None:
    """An lr warmup of at least the stage's steps (the learning rate never reaches its peak) and an
    evaluation interval of at least the stage's steps (only the final evaluation runs) checked clean;
    they run as written, which is rarely what was meant: `ignored-setting` warnings at the setting."""
    warm = _diagnostics(MICRO + "stage s = sft { steps = 10, lr = cosine(1e-3, 0, warmup = 10) }\n")
    assert [(d[0], d[1]) for d in warm] == [("ignored-setting", False)] and "never reaches 0.001" in warm[0][4], warm
    assert not _diagnostics(MICRO + "stage s = sft { steps = 11, lr = cosine(1e-3, 0, warmup = 10) }\n")
    late = _diagnostics(MICRO + "stage s = sft { steps = 10, eval_every = 10 }\n")
    assert [(d[0], d[1]) for d in late] == [("ignored-setting", False)] and "every 10 steps" in late[0][4], late
    assert not _diagnostics(MICRO + "stage s = sft { steps = 10, eval_every = 5 }\n")
    every = MICRO.replace("max_new_tokens = 8 }", "max_new_tokens = 8, every = 20 }")
    block = _diagnostics(every + "stage s = sft { steps = 10 }\nstage t = sft from s { steps = 40 }\n")
    assert [d[4].split(":")[0] for d in block] == ["stage `s`"], block  # the block's interval: flagged where it never comes
