"""A stage's `freeze`: model parts a stage keeps fixed (`stage tm = sft from base { freeze = [vision, projector] }`).

From spec text to the typed IR (its hash unchanged where it is not set), the parts mapped to the
modules of the tiny model and of real architectures (LoRA adapters included), and the realised
training: a frozen part's weights stay the parent's byte for byte, in SFT and GRPO, in one process,
under `--jobs 2` and across a kill and `--resume`, and a child that does not freeze a part trains it
again. The checker's diagnostics are pinned by tests/golden/errors/freeze.pd, completion by
tests/test_lsp.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from realise import MICRO, compile_spec

from percepdsl.catalogue import MODEL_PARTS, builtin
from percepdsl.check import check_text
from percepdsl.ir import ExperimentIR, LoraIR, content_hash

ROOT = Path(__file__).resolve().parents[1]
PLAIN = MICRO + "stage base = sft { steps = 1 }\nstage tm = sft from base { steps = 1 }\n"


# ---------------------------------------------------------------- spec text → typed IR
def test_freeze_is_a_typed_setting_of_both_stage_kinds_from_the_catalogue() -> None:
    for kind in ("sft", "grpo"):
        spec = builtin("block", kind).param("freeze")
        assert spec is not None and spec.type == "choice_list" and spec.choices == MODEL_PARTS == ("vision", "projector", "language")
        assert spec.default == ()
    ir = compile_spec(
        MICRO
        + "stage base = sft { steps = 1 }\n"
        + "stage tm = sft from base { steps = 1, freeze = [projector, vision] }\n"
        + "stage rl = grpo from base { steps = 1, reward = outcome, freeze = language }\n"
    )
    assert ir.stage("base").freeze == []
    assert ir.stage("tm").freeze == ["vision", "projector"]  # the catalogue's order: one IR for the same parts
    assert ir.stage("rl").freeze == ["language"]
    assert ir.stage("tm").model_dump()["freeze"] == ["vision", "projector"]
    assert ExperimentIR.model_validate(ir.model_dump(mode="json")) == ir


def test_a_stage_without_freeze_keeps_its_ir_and_hash() -> None:
    """Left out of the dump when nothing is frozen (as a stage's `task`): the IR goldens keep their hashes."""
    plain = compile_spec(PLAIN)
    empty = compile_spec(PLAIN.replace("tm = sft from base { steps = 1 }", "tm = sft from base { steps = 1, freeze = [] }"))
    assert all("freeze" not in s.model_dump() for s in plain.stages)
    assert content_hash(empty) == content_hash(plain)
    order = [
        compile_spec(PLAIN.replace("tm = sft from base { steps = 1 }", f"tm = sft from base {{ steps = 1, freeze = {parts} }}"))
        for parts in ("[vision, projector]", "[projector, vision]", "[vision]")
    ]
    assert content_hash(order[0]) == content_hash(order[1]) != content_hash(order[2]) != content_hash(plain)


def test_the_stage_identity_holds_its_frozen_parts_and_its_parents() -> None:
    from percepdsl_runtime.stagecache import stage_identity

    text = PLAIN + "stage child = sft from tm { steps = 1 }\n"
    plain = compile_spec(text)
    frozen = compile_spec(text.replace("tm = sft from base { steps = 1 }", "tm = sft from base { steps = 1, freeze = [vision] }"))
    for name in ("tm", "child"):  # the child's identity holds its parent's
        assert stage_identity(plain, plain.stage(name), threads=1) != stage_identity(frozen, frozen.stage(name), threads=1)
    assert stage_identity(plain, plain.stage("base"), threads=1) == stage_identity(frozen, frozen.stage("base"), threads=1)


def test_the_checker_names_what_is_wrong_with_a_freeze() -> None:
    def codes(setting: str) -> list[str]:
        res = check_text(MICRO + f"stage base = sft {{ steps = 1, {setting} }}\n", "spec.pd")
        return [d.code for d in res.diagnostics if d.is_error]

    assert codes("freeze = [vision, projector]") == [] and codes('freeze = ["language"]') == []
    assert codes("freeze = [vison]") == ["unknown-choice"]
    assert codes("freeze = [vision, vision]") == ["duplicate"]
    assert codes("freeze = [vision, projector, language]") == ["nothing-to-train"]
    res = check_text(MICRO + "stage base = sft { steps = 1, freeze = [language, vision, projector] }\n", "spec.pd")
    (d,) = res.diagnostics
    assert "every part" in d.message and "freeze = [vision, projector]" in d.hint


# ---------------------------------------------------------------- parts → modules
def _modules(names: set[str], depth: int) -> set[str]:
    """The modules `depth` levels down that hold the parameters `names` (`lm_head.weight`: `lm_head`)."""
    return {".".join(n.split(".")[: min(depth, n.count("."))]) for n in names}


def _parts(model) -> dict[str, set[str]]:
    from percepdsl_runtime.models import part_parameters

    parts = {part: set(part_parameters(model, part)) for part in MODEL_PARTS}
    every = {n for n, _ in model.named_parameters()}
    assert set().union(*parts.values()) == every, "every parameter is in a part"
    assert sum(map(len, parts.values())) == len(every), "no parameter is in two"
    return parts


def test_the_parts_of_the_tiny_model(tiny) -> None:
    parts = _parts(tiny.model)
    assert _modules(parts["vision"], 2) == {"model.vision_tower"}
    assert _modules(parts["projector"], 2) == {"model.multi_modal_projector"}
    assert _modules(parts["language"], 2) == {"model.language_model", "lm_head"}


def test_the_parts_of_idefics3_with_lora_adapters(task, tmp_path) -> None:
    """A real architecture's own names (`vision_model`, `connector`, `text_model`), with and without
    LoRA; freezing a part freezes its adapters, and a stage that freezes nothing trains them all again."""
    from test_models import make_idefics3

    from percepdsl_runtime.models import freeze_parts, load_hf

    path = make_idefics3(tmp_path / "ckpt", task)
    parts = _parts(load_hf(path).model)
    assert _modules(parts["vision"], 2) == {"model.vision_model"}
    assert _modules(parts["projector"], 2) == {"model.connector"}
    assert _modules(parts["language"], 2) == {"model.text_model", "lm_head"}

    loaded = load_hf(path, lora=LoraIR(r=4, alpha=8, dropout=0.0))
    adapters = {n for n, p in loaded.model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    lora_parts = _parts(loaded.model)
    assert all(adapters & lora_parts[p] for p in ("vision", "language"))  # all-linear adapts both sides
    n = freeze_parts(loaded, ["language"])
    trainable = {n for n, p in loaded.model.named_parameters() if p.requires_grad}
    assert trainable == adapters - lora_parts["language"] and n == loaded.num_parameters(trainable_only=True) > 0
    freeze_parts(loaded, [])  # the next stage freezes nothing: the adapters train again, the base stays fixed
    assert {n for n, p in loaded.model.named_parameters() if p.requires_grad} == adapters


def test_a_projector_inside_the_vision_module_is_the_projector() -> None:
    """Qwen2-VL keeps its projector (the patch merger) inside its vision module."""
    from test_qwen2vl import tiny_qwen

    parts = _parts(tiny_qwen("qwen2_vl"))
    assert _modules(parts["projector"], 3) == {"model.visual.merger"}
    assert _modules(parts["vision"], 3) == {"model.visual.blocks", "model.visual.patch_embed"}
    assert _modules(parts["language"], 2) == {"model.language_model", "lm_head"}


def test_the_attribute_table_finds_the_parts_where_transformers_accessors_do_not(tiny, monkeypatch) -> None:
    """An older transformers (no `get_encoder(modality=...)`; a `get_decoder` that answers with the whole
    model): the table of known attribute names gives the same parts."""
    want = _parts(tiny.model)
    for cls in (type(tiny.model), type(tiny.model.model)):
        monkeypatch.setattr(cls, "get_encoder", lambda self: self, raising=False)
        monkeypatch.setattr(cls, "get_decoder", lambda self: self.model if hasattr(self, "model") else self, raising=False)
    assert _parts(tiny.model) == want


def test_a_part_the_architecture_lacks_is_named() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from percepdsl_runtime.models import ModelLoadError, ModelPartError, part_parameters

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32))
    assert part_parameters(model, "language")
    for part in ("vision", "projector"):
        with pytest.raises(ModelPartError, match=f"LlamaForCausalLM has no {part} module") as exc:
            part_parameters(model, part)
        assert isinstance(exc.value, ModelLoadError) and "model.layers" in str(exc.value) and f"Leave `{part}` out" in str(exc.value)


# ---------------------------------------------------------------- the realised training
RUN = MICRO.replace("log_every = 1 }", "log_every = 1, threads = 1 }") + (
    "stage base = sft { steps = 2, batch = 2 }\n"
    "stage frozen = sft from base { steps = 2, batch = 2, freeze = [vision, projector] }\n"
    "stage plain = sft from base { steps = 2, batch = 2 }\n"  # after `frozen` in the one process: its parts train again
    "stage thawed = sft from frozen { steps = 2, batch = 2 }\n"
)
# GRPO arms: a reward that differs between a group's completions (an untrained model's outcome is
# always 0: no advantage, no update), and truncated completions in the loss (it never stops)
GRPO = (
    "stage rl = grpo from base { steps = 2, batch = 1, group = 2, max_new_tokens = 8, mask_truncated = false, "
    "reward = chars, freeze = [vision, projector] }\n"
    "stage rl_plain = grpo from base { steps = 2, batch = 1, group = 2, max_new_tokens = 8, mask_truncated = false, reward = chars }\n"
)
PREFIXES = {"vision": "vision_tower.", "projector": "multi_modal_projector.", "language": "language_model."}  # as saved


def _weights(run_dir: Path, stage: str | None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / ("init" if stage is None else f"stages/{stage}") / ("" if stage is None else "model") / "model.safetensors")


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, int]:
    """Per part, how many of its saved tensors differ between two stages' weights."""
    assert a.keys() == b.keys()
    out = dict.fromkeys(PREFIXES, 0)
    for k in a:
        part = next(p for p, pre in PREFIXES.items() if k.startswith(pre))
        out[part] += not torch.equal(a[k], b[k])
    return out


def _chars(completions, **_):
    """Characters of each completion: differs between the completions of a group."""
    return [float(len(c)) for c in completions]


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory) -> tuple[Path, list[str]]:
    import warnings

    from percepdsl import api
    from percepdsl_runtime.run import run

    api.register_reward("chars", _chars)
    try:
        text = RUN + GRPO
        lines: list[str] = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_dir = run(compile_spec(text), {"spec.pd": text}, tmp_path_factory.mktemp("runs"), progress=False, echo=lines.append)
    finally:
        api.unregister_reward("chars")
    return run_dir, lines


def test_a_frozen_part_keeps_its_parents_weights_and_a_sibling_trains_it(frozen_run) -> None:
    run_dir, _ = frozen_run
    w = {s: _weights(run_dir, s) for s in ("base", "frozen", "plain", "thawed", "rl", "rl_plain")}
    assert all(_changed(_weights(run_dir, None), w["base"]).values())  # the base trains every part
    frozen = _changed(w["base"], w["frozen"])
    assert frozen["vision"] == frozen["projector"] == 0 and frozen["language"] > 0
    plain = _changed(w["base"], w["plain"])
    assert plain["vision"] > 0 and plain["projector"] > 0 and plain["language"] > 0
    thawed = _changed(w["frozen"], w["thawed"])  # the parent froze them; the child does not
    assert thawed["vision"] > 0 and thawed["projector"] > 0 and thawed["language"] > 0
    rl = _changed(w["base"], w["rl"])
    assert rl["vision"] == rl["projector"] == 0 and rl["language"] > 0
    rl_plain = _changed(w["base"], w["rl_plain"])
    assert rl_plain["vision"] > 0 and rl_plain["projector"] > 0 and rl_plain["language"] > 0


def test_each_stage_records_and_announces_what_trained(frozen_run) -> None:
    run_dir, lines = frozen_run
    language = sum(v.numel() for k, v in _weights(run_dir, None).items() if k.startswith(PREFIXES["language"]))
    total = sum(v.numel() for v in _weights(run_dir, None).values())
    summary = json.loads((run_dir / "summary.json").read_text())["stages"]
    for stage, trainable in [("base", total), ("frozen", language), ("plain", total), ("rl", language), ("rl_plain", total)]:
        done = json.loads((run_dir / "stages" / stage / "done.json").read_text())
        assert done["trainable_parameters"] == summary[stage]["trainable_parameters"] == trainable, stage
    assert summary["frozen"]["frozen"] == ["vision", "projector"] and summary["plain"]["frozen"] == []
    assert f"stage frozen (sft from base): 2 steps, vision and projector frozen ({language:,} trainable)" in lines
    assert "stage plain (sft from base): 2 steps" in lines  # nothing frozen, nothing said
    assert f"stage rl (grpo from base): 2 steps, vision and projector frozen ({language:,} trainable)" in lines
    assert f"- `frozen`: vision and projector frozen ({language:,} trainable)" in (run_dir / "report.md").read_text()


def test_workers_of_jobs_2_freeze_as_one_process_does(frozen_run, tmp_path) -> None:
    """`--jobs 2`: each stage trains in a fresh worker process; its weights are the one-process run's."""
    import warnings

    from percepdsl_runtime.run import run

    lines: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_dir = run(compile_spec(RUN), {"spec.pd": RUN}, tmp_path, progress=False, echo=lines.append, jobs=2)
    one = frozen_run[0]
    for stage in ("base", "frozen", "plain", "thawed"):
        assert (run_dir / f"stages/{stage}/model/model.safetensors").read_bytes() == (
            one / f"stages/{stage}/model/model.safetensors"
        ).read_bytes(), stage
    assert any(line.startswith("stage frozen (sft from base): 2 steps, vision and projector frozen (") for line in lines)


def test_a_frozen_stage_killed_mid_way_resumes_to_the_uninterrupted_weights(tmp_path) -> None:
    """The resume checkpoint holds no frozen weight (`drop_frozen`); `--resume` freezes the same parts
    before loading it and ends with the uninterrupted run's weights and records."""
    from test_run import KILLED_AT, run_outputs

    text = RUN.replace("eval { test = 2, max_new_tokens = 8 }", "eval { test = 2, max_new_tokens = 8, every = 2 }").replace(
        "stage frozen = sft from base { steps = 2,", "stage frozen = sft from base { steps = 8,"
    )
    (tmp_path / "s.pd").write_text(text)
    env = dict(os.environ, PERCEP_STAGE_CACHE="off", PERCEP_RESUME_EVERY="3", OMP_NUM_THREADS="1")

    def percep(*args: str, runs: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "percepdsl", "run", str(tmp_path / "s.pd"), "--out", str(tmp_path / runs), "-q", *args]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)

    straight = percep(runs="a")
    assert straight.returncode == 0, straight.stderr[-3000:]
    cmd = [sys.executable, "-c", KILLED_AT, "frozen", "4", "run", str(tmp_path / "s.pd"), "--out", str(tmp_path / "b"), "-q"]
    killed = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (ckpt,) = (tmp_path / "b").glob("*/stages/frozen/resume.ckpt")
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert saved and not [k for k in saved if "vision_tower" in k or "multi_modal_projector" in k]
    resumed = percep("--resume", runs="b")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want = run_outputs(Path(straight.stdout.strip().splitlines()[-1]))
    got = run_outputs(Path(resumed.stdout.strip().splitlines()[-1]))
    assert got.keys() == want.keys()
    for key in got:
        assert got[key] == want[key], key


# ---------------------------------------------------------------- refused before training
def test_a_part_the_model_lacks_is_refused_before_training(tmp_path, monkeypatch) -> None:
    """An architecture whose projector this runtime cannot find: `percep run` exits 2 naming the stage and
    the part, before anything trains (here the table forgets LLaVA's projector)."""
    from typer.testing import CliRunner

    from percepdsl.cli import app
    from percepdsl_runtime import models

    monkeypatch.setattr(models, "PART_ATTRIBUTES", {**models.PART_ATTRIBUTES, "projector": ("connector",)})
    (tmp_path / "s.pd").write_text(RUN)
    res = CliRunner().invoke(app, ["run", str(tmp_path / "s.pd"), "--out", str(tmp_path / "runs"), "-q"])
    assert res.exit_code == 2, res.output
    assert "stage `frozen`: `freeze = [vision, projector]`: LlavaForConditionalGeneration has no projector module" in res.output
    assert "Traceback" not in res.output and not list(tmp_path.glob("runs/*/stages/*"))


def test_a_freeze_that_leaves_no_adapter_to_train_is_refused(tiny, tmp_path) -> None:
    """LoRA adapters on language-model layers only (`gate_proj`), and the language model frozen."""
    from percepdsl_runtime.run import RunRefused, prepare

    text = MICRO.replace(
        "model tiny { width = 16, depth = 1, heads = 1, vision_width = 16, vision_depth = 1, patch = 16px }",
        f'model hf "{tiny.path}" {{ lora {{ target_modules = ["gate_proj"] }} }}',
    ).replace("nodes = 4, reasoning = brief, image = 32px, node_radius = 2px, ", "")  # the tiny fixture's task
    ir = compile_spec(text + "stage base = sft { steps = 1, freeze = [language] }\n")
    with pytest.raises(RunRefused, match=r"stage `base`: `freeze = \[language\]` leaves no parameter .* to train"):
        prepare(ir, tmp_path / "run", echo=lambda _: None)
    ok = compile_spec(text + "stage base = sft { steps = 1, freeze = [vision, projector] }\n")
    ctx = prepare(ok, tmp_path / "ok", echo=lambda _: None)
    assert 0 < ctx.stage_trainable["base"] == ctx.loaded.num_parameters(trainable_only=True)  # adapters on gate_proj only
