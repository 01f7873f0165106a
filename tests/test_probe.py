"""The visual-dependency probe: the divergence math, a model that cannot see scores exactly 0,
`percep probe` on a run directory (and its refusals), the eval metric in a run's summary, and
(slow) a model trained with shuffled images against one trained normally."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from realise import MICRO
from typer.testing import CliRunner

from percepdsl.check import check_file
from percepdsl.check.spec import DEFAULT_ROLES
from percepdsl.cli import app
from percepdsl_runtime.encoding import Encoder, collate, model_inputs
from percepdsl_runtime.models import build_tiny, load_hf
from percepdsl_runtime.probe import blank_like, changed_pixels, grounding, js_bits, probe, visual_role_ids
from percepdsl_runtime.run import run
from percepdsl_runtime.tasks import build_task


def test_js_divergence_in_bits() -> None:
    a = torch.tensor([[10.0, -10.0], [0.0, 0.0], [1.0, 2.0]])
    b = torch.tensor([[-10.0, 10.0], [0.0, 0.0], [2.0, 1.0]])
    js = js_bits(a, b)
    assert js[0] == pytest.approx(1.0, abs=1e-6)  # (almost) disjoint: 1 bit
    assert js[1] == 0.0  # identical
    p, q = torch.softmax(a[2], 0), torch.softmax(b[2], 0)
    m = (p + q) / 2
    ref = 0.5 * float((p * (p / m).log()).sum() + (q * (q / m).log()).sum()) / math.log(2)
    assert js[2] == pytest.approx(ref, rel=1e-5)
    assert torch.allclose(js_bits(b, a), js)  # symmetric


def test_thresholded_dependency_as_a_perception_tag() -> None:
    js = torch.tensor([0.3, 0.15, 0.02, 0.0, 0.12])
    perception = torch.tensor([True, True, True, False, False])
    g = grounding(js, perception, (0.1, 0.5))
    assert g["0.1"] == {"tagged": 3, "precision": 2 / 3, "recall": 2 / 3}
    assert g["0.5"] == {"tagged": 0, "precision": None, "recall": 0.0}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    task = build_task("sudoku", {"reasoning": "brief", "train": 256, "test": 8}, seed=0)
    tiny = build_tiny(
        task.vocabulary(), image=64, width=64, depth=2, heads=2, vision_width=32, vision_depth=1, save_dir=tmp_path_factory.mktemp("p")
    )
    return task, tiny, Encoder(tiny, list(DEFAULT_ROLES))


def test_a_model_that_cannot_see_scores_zero_and_one_that_can_does_not(small) -> None:
    task, tiny, enc = small
    loaded = load_hf(tiny.path)
    seeing = probe(loaded, enc, task, n=4, batch=3)  # a batch boundary inside the items
    assert seeing.items == 4 and seeing.tokens["perception"] > 0
    assert all(v > 0 for per in seeing.roles.values() for v in per.values() if v is not None)
    assert len(seeing.slots["other"]) == max(1, len(seeing.slots["blank"]))
    with torch.no_grad():  # cut the vision path: every image gives the same image tokens
        loaded.model.model.multi_modal_projector.linear_2.weight.zero_()  # (bias-free)
    blind = probe(loaded, enc, task, n=4)
    assert all(v == pytest.approx(0.0, abs=1e-7) for per in blind.roles.values() for v in per.values() if v is not None)
    assert blank_like(task.sample("test", 0).image).getextrema() == ((255, 255), (255, 255), (255, 255))


def _reference_rollouts(task, enc, n: int):
    """The first n test items' reference targets laid out as GRPO rollouts (one per prompt)."""
    from percepdsl_runtime.sampling import Rollouts

    samples = [task.sample("test", i) for i in range(n)]
    prompt = collate([enc.encode_prompt(s.query, s.image) for s in samples], enc.pad_token_id)
    targets = []
    for s in samples:
        item = enc.encode_train(s.query, s.image, s.response)
        targets.append(item["input_ids"][item["labels"] != -100])
    ids = torch.nn.utils.rnn.pad_sequence(targets, batch_first=True, padding_value=enc.pad_token_id)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(t) for t in targets], batch_first=True)
    prompt = {k: v for k, v in prompt.items() if isinstance(v, torch.Tensor)}
    return samples, Rollouts(prompt=prompt, ids=ids, mask=mask, truncated=torch.zeros(n, dtype=torch.bool), group=1)


def test_the_reward_term_reads_the_probes_divergence_on_the_rollouts_themselves(small) -> None:
    """The `visual_dependency` reward term, teacher-forced on rollouts that happen to be the
    reference targets, sees the probe's perception JS (the same tokens, the same other image:
    the next item of the split); a blind model gets 0."""
    from percepdsl.check.spec import DEPENDENCY_ROLE
    from percepdsl.ir import GRPOStageIR, RewardIR
    from percepdsl_runtime.grpo import GRPOModule
    from percepdsl_runtime.probe import METRIC_ROLE
    from percepdsl_runtime.rewards import RolloutGroup, visual_dependency

    assert DEPENDENCY_ROLE == METRIC_ROLE  # the role the checker requires is the one the runtime reads
    task, tiny, enc = small
    loaded = load_hf(tiny.path)
    n = task.size("test")
    reward = RewardIR(
        kind="term", name="visual_dependency", params={"against": "other"}, impl="percepdsl_runtime.rewards:visual_dependency"
    )
    module = GRPOModule(loaded, enc, task, GRPOStageIR(name="rl", steps=1, batch=n, group=2, reward=reward), split="test")
    samples, roll = _reference_rollouts(task, enc, n)

    def term(against: str, threshold: float | None = None) -> tuple[list[float], list]:
        dep = module.dependency(roll, samples, torch.arange(n))
        group = RolloutGroup.score(task, samples[0], [s.response for s in samples], dependency=dep.view(0, n))
        return visual_dependency(group, against=against, threshold=threshold), dep(against)

    for against in ("other", "blank"):
        values, tokens = term(against)
        assert values == pytest.approx([float(t.mean()) for t in tokens]) and all(v > 0 for v in values)
        assert float(torch.cat(tokens).mean()) == pytest.approx(probe(loaded, enc, task, n=n).roles[against]["perception"], rel=1e-3)
    assert term("other", threshold=1.0)[0] == [0.0] * n
    with torch.no_grad():  # cut the vision path, as above: the image changes nothing
        loaded.model.model.multi_modal_projector.linear_2.weight.zero_()
    assert term("other")[0] == [0.0] * n and term("blank")[0] == [0.0] * n


def percep(*args: str) -> tuple[int, str, str]:
    """`percep ARGS` in this process (torch is imported already: seconds, not a minute)."""
    res = CliRunner().invoke(app, list(args))
    return res.exit_code, res.stdout, res.stderr


def test_percep_probe_writes_its_table_and_the_metric_reaches_the_summary(tmp_path: Path) -> None:
    spec = tmp_path / "probe.pd"
    text = MICRO.replace(
        "eval { test = 2, max_new_tokens = 8 }", "eval { test = 2, max_new_tokens = 8, metrics = [end_to_end, visual_dependency] }"
    )
    spec.write_text(text + "stage base = sft { steps = 2, batch = 2 }\n", encoding="utf-8")
    checked = check_file(spec, fragment_ok=False)
    run_dir = run(checked.ir, checked.loaded.sources, tmp_path / "runs", progress=False, echo=lambda _: None)
    summary = json.loads((run_dir / "summary.json").read_text())
    m = summary["stages"]["base"]["metrics"]
    assert m["visual_dependency"] == m["visual_dependency/other/perception"] and "visual_dependency/blank/perception" in m

    code, stdout, stderr = percep("probe", str(spec), "--out", str(tmp_path / "runs"), "--items", "2")  # a spec finds its run
    assert code == 0, stderr
    assert "| perception |" in stdout
    out = run_dir / "probe" / "base"
    data = json.loads((out / "probe.json").read_text())
    assert data["items"] == 2 and set(data["roles"]) == {"other", "blank"} and "0.1" in data["grounded"]
    assert (out / "probe.png").stat().st_size > 0 and (out / "probe.csv").read_text().startswith("baseline,role,tokens,js_bits")
    assert sorted(p.name for p in out.iterdir()) == ["probe.csv", "probe.json", "probe.md", "probe.png"]  # atomic: no temp files left

    for args, words in (
        ((str(run_dir), "--stage", "nope"), "has no stage `nope`"),
        ((str(run_dir), "--items", "1"), "at least 2"),
        ((str(tmp_path),), "not a run directory"),
    ):
        code, _, stderr = percep("probe", *args)
        assert code == 2 and words in stderr, stderr
    other = tmp_path / "other.pd"
    other.write_text(text.replace("experiment micro", "experiment other") + "stage base = sft { steps = 2 }\n", encoding="utf-8")
    code, _, stderr = percep("probe", str(other), "--out", str(tmp_path / "runs"))
    assert code == 2 and "run it first" in stderr


def _train(task, enc, tiny, steps: int, shuffle: bool):
    """Token-mean SFT; with `shuffle`, every target is paired with a random training image."""
    loaded = load_hf(tiny.path)
    opt = torch.optim.AdamW(loaded.model.parameters(), lr=2e-3)
    g, n = random.Random(0), task.size("train")
    for _ in range(steps):
        samples = [task.sample("train", g.randrange(n)) for _ in range(8)]
        images = [task.sample("train", g.randrange(n)).image if shuffle else s.image for s in samples]
        b = collate([enc.encode_train(s.query, im, s.response) for s, im in zip(samples, images)], enc.pad_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = loaded.model(**model_inputs(b)).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loaded


@pytest.mark.slow
def test_a_model_trained_on_shuffled_images_does_not_read_them(small) -> None:
    """Measured (sudoku 4×4, 150 steps of batch 8): JS on perception tokens vs another item's
    image 0.0165 bits trained normally, < 1e-4 with shuffled images (~2 min on 1 thread). The
    `visual_dependency` reward term on the models' own sampled rollouts tells them apart too
    (measured at 21:25 UTC, session 3: probe 0.078 vs 5e-8 bits, reward term 0.068 vs 2e-7)."""
    task, tiny, enc = small
    models = {shuffle: _train(task, enc, tiny, 150, shuffle=shuffle) for shuffle in (False, True)}
    normal, shuffled = (probe(models[s], enc, task, n=8).metric() for s in (False, True))
    assert shuffled < 2e-3 and normal > 5e-3 and normal > 10 * shuffled, (normal, shuffled)
    normal, shuffled = (_rollout_dependency(models[s], enc, task) for s in (False, True))
    assert shuffled < 2e-3 and normal > 5e-3 and normal > 10 * shuffled, (normal, shuffled)


def _rollout_dependency(loaded, enc, task) -> float:
    """The mean `visual_dependency` reward of 4 × 4 rollouts sampled from the test prompts."""
    from percepdsl.ir import GRPOStageIR, RewardIR
    from percepdsl_runtime.grpo import GRPOModule

    reward = RewardIR(
        kind="term",
        name="visual_dependency",
        params={"against": "other", "threshold": None},
        impl="percepdsl_runtime.rewards:visual_dependency",
    )
    stage = GRPOStageIR(name="rl", steps=1, batch=4, group=4, max_new_tokens=48, reward=reward)
    module = GRPOModule(loaded, enc, task, stage, seed=0, split="test")
    _, groups, values = module.rollout(torch.arange(4))
    assert sum(s.format_ok for g in groups for s in g.scores) > 0  # the rollouts have perception sections to read
    return float(sum(v.terms["visual_dependency"].sum() for v in values) / 16)


# ------------------------------------------------------------------ the `visual` role rule
def test_a_visual_rule_takes_tokens_from_later_rules_and_rest_only() -> None:
    # roles: grounded (0, visual), perception (1), late (2, visual, declared after perception), reasoning (3, rest)
    role_ids = torch.tensor([1, 1, 3, 3, 3, -1, 2])
    js = torch.tensor([0.5, 0.05, 0.5, 0.05, 0.15, 0.9, 0.0])
    assert visual_role_ids(role_ids, js, [(0, 0.1)], rest_id=3).tolist() == [0, 1, 0, 3, 0, -1, 2]  # -1: no target
    # a visual rule declared after `perception` leaves its tokens alone, takes rest's
    assert visual_role_ids(role_ids, js, [(2, 0.1)], rest_id=3).tolist() == [1, 1, 2, 3, 2, -1, 2]
    assert visual_role_ids(role_ids, js, [(0, 0.2), (2, 0.1)], rest_id=3).tolist() == [0, 1, 0, 3, 2, -1, 2]  # first claim wins
    assert visual_role_ids(role_ids, js, [(0, 1.0)], rest_id=3).tolist() == role_ids.tolist()  # JS ≤ 1 bit: nothing


def test_uninformative_images_for_both_pixel_layouts() -> None:
    pv = torch.arange(3.0)[:, None, None, None].expand(3, 1, 2, 2)  # LLaVA: [items, C, H, W]
    assert changed_pixels({"pixel_values": pv}, "other", None)["pixel_values"][:, 0, 0, 0].tolist() == [1, 2, 0]  # the next item's
    blank = torch.full((1, 1, 2, 2), 7.0)
    assert changed_pixels({"pixel_values": pv}, "blank", blank)["pixel_values"].eq(7).all()
    flat = torch.tensor([[0.0], [0.0], [1.0], [1.0]])  # Qwen2-VL: 2 images of 2 patches each
    grid = torch.tensor([[1, 1, 2], [1, 1, 2]])
    out = changed_pixels({"pixel_values": flat, "image_grid_thw": grid}, "other", None)
    assert out["pixel_values"].flatten().tolist() == [1, 1, 0, 0] and torch.equal(out["image_grid_thw"], grid)
    assert changed_pixels({"pixel_values": flat, "image_grid_thw": grid}, "blank", torch.tensor([[5.0], [5.0]]))["pixel_values"].shape == (
        4,
        1,
    )


def test_the_visual_rule_tags_what_the_probe_measures_and_nothing_for_a_blind_reference(small) -> None:
    """With the probed model as reference, the rule tags exactly the tokens whose probe JS
    (against the next item's image) exceeds the threshold; a reference that cannot see tags none."""
    import copy

    from percepdsl.ir import RoleRuleIR
    from percepdsl_runtime.probe import VisualRoles

    task, tiny, _ = small
    rules = [RoleRuleIR(role="grounded", kind="visual", threshold=2e-5, refresh=0, against="other"), *DEFAULT_ROLES]
    enc = Encoder(tiny, rules)  # grounded (0) first: it can take any token
    loaded = load_hf(tiny.path)
    loaded.model.double()  # an untrained model's JS is ~1e-5 bits: float64 keeps the two paths' noise far below it
    n = task.size("test")
    samples = [task.sample("test", i) for i in range(n)]
    batch = collate([enc.encode_train(s.query, s.image, s.response) for s in samples], enc.pad_token_id)
    probed = probe(loaded, enc, task, n=n)  # its P/R table at 2e-5 bits
    want = grounding(torch.cat(_probe_js(loaded, enc, task, n)), (batch["role_ids"][:, 1:][batch["labels"][:, 1:] != -100]) == 1, (2e-5,))
    ref = copy.deepcopy(loaded.model).eval()
    tagged = VisualRoles([(0, rules[0])], {(None, 0): ref}, rest_id=len(enc.role_names) - 1).tag(batch)["role_ids"]
    sel = batch["labels"][:, 1:] != -100
    got = tagged[:, 1:][sel]
    assert 0 < int((got == 0).sum()) < int(sel.sum()) and int((got == 0).sum()) == want["2e-05"]["tagged"]
    assert float(((got == 0) & (batch["role_ids"][:, 1:][sel] == 1)).sum() / (got == 0).sum()) == pytest.approx(want["2e-05"]["precision"])
    assert probed.tokens["grounded"] == 0  # the probe reads the text rules: a visual role owns no text
    with torch.no_grad():
        ref.model.multi_modal_projector.linear_2.weight.zero_()  # the reference cannot see
    blind = VisualRoles([(0, rules[0])], {(None, 0): ref}, rest_id=len(enc.role_names) - 1).tag(batch)["role_ids"]
    assert not bool((blind == 0).any()) and torch.equal(blind, batch["role_ids"])


def _probe_js(loaded, enc, task, n: int) -> list[torch.Tensor]:
    """Per item, the probe's JS (vs the next item's image) at each target token, in target order."""
    from percepdsl_runtime.probe import js_bits

    samples = [task.sample("test", i) for i in range(n)]
    out = []
    with torch.no_grad():
        for i, s in enumerate(samples):
            logits = []
            for image in (s.image, samples[(i + 1) % n].image):
                b = collate([enc.encode_train(s.query, image, s.response)], enc.pad_token_id)
                keep = b["labels"][:, 1:] != -100
                logits.append(loaded.model(**model_inputs(b), use_cache=False).logits[:, :-1][keep])
            out.append(js_bits(*logits))
    return out


def test_a_reference_is_refreshed_from_the_policy_on_its_schedule() -> None:
    from percepdsl.ir import RoleRuleIR
    from percepdsl_runtime.probe import VisualRoles

    policy, frozen, every = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    start = {k: v.clone() for k, v in frozen.state_dict().items()}
    rule = RoleRuleIR(role="g", kind="visual", threshold=0.1, refresh=0, against="other")
    v = VisualRoles([(0, rule)], {(None, 0): frozen, ("base", 3): every}, rest_id=1)
    for step, copied in ((0, False), (1, False), (3, True)):
        with torch.no_grad():
            policy.weight.add_(1.0)
        v.refresh(policy, step)
        assert torch.equal(every.weight, policy.weight) is copied, step
    assert all(torch.equal(frozen.state_dict()[k], start[k]) for k in start)  # refresh = 0: never
    assert set(v.state_dict()) == {"base/3"}  # a resume restores the refreshed one


def test_a_refreshed_lora_reference_is_saved_as_its_adapter(tiny) -> None:
    """With LoRA a refreshed reference differs from its start only in the adapter: a resume
    checkpoint holds that, not a copy of the frozen base model (gigabytes for a real checkpoint)."""
    import copy

    from percepdsl.ir import LoraIR, RoleRuleIR
    from percepdsl_runtime.models import load_hf
    from percepdsl_runtime.probe import VisualRoles

    policy = load_hf(tiny.path, lora=LoraIR(r=4, alpha=8, dropout=0.0)).model
    start = copy.deepcopy(policy).eval().requires_grad_(False)
    ref = copy.deepcopy(start)
    rule = RoleRuleIR(role="g", kind="visual", threshold=0.1, refresh=1, against="other")
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(1.0)
    v = VisualRoles([(0, rule)], {(None, 1): ref}, rest_id=1)
    v.refresh(policy, 1)
    (state,) = v.state_dict().values()
    assert state and all("lora_" in k for k in state)
    again = VisualRoles([(0, rule)], {(None, 1): start}, rest_id=1)
    again.load_state_dict(v.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(start.state_dict().values(), ref.state_dict().values()))


def test_a_spec_trains_on_a_visual_role(tmp_path: Path) -> None:
    """`grounded = visual(...)` in an SFT loss and a grpo stage's token_weights checks, runs, and
    logs its token share; with threshold 0 the start model (which sees its image) tags target tokens."""
    import csv

    spec = tmp_path / "visual.pd"
    roles = (
        'roles {\n  perception = between("<perception>", "</perception>")\n  grounded = visual(threshold = 0)\n'
        '  reasoning = between("<reasoning>", "</reasoning>")\n  answer = rest()\n}\n'
    )
    stages = (
        "stage base = sft { steps = 2, batch = 2, loss = 0.5 * mean(grounded) + 0.5 * mean(perception, reasoning, answer) }\n"
        "stage rl = grpo from base { steps = 1, batch = 2, group = 2, max_new_tokens = 4, kl = 0.1, reward = format, "
        "token_weights { grounded = 2.0 } }\n"
    )
    spec.write_text(MICRO + roles + stages, encoding="utf-8")
    checked = check_file(spec, fragment_ok=False)
    assert checked.ok, [d.message for d in checked.diagnostics]
    run_dir = run(checked.ir, checked.loaded.sources, tmp_path / "runs", progress=False, echo=lambda _: None)
    rows = [r for r in csv.DictReader((run_dir / "metrics.csv").open()) if r.get("visual_roles_s")]
    sft = [r for r in rows if r["stage"] == "base"]
    assert len(sft) == 2 and all(float(r["token_share/grounded"]) > 0 and float(r["token_share/perception"]) > 0 for r in sft)
    assert all(float(r["visual_roles_s"]) > 0 for r in rows) and [r["stage"] for r in rows if r["stage"] == "rl"] == ["rl"]
