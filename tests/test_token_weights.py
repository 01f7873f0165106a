"""Role-weighted GRPO: the math on toy tensors (every aggregation), NGDiff over role groups,
per-role policy-gradient norms, roles of generated (also malformed) text, and the path from
spec text to a trained stage."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from percepdsl.check import check_file
from percepdsl.ir import LinearSchedule, NGDiffLoss, RewardIR, RoleWeights
from percepdsl_runtime.encoding import Encoder
from percepdsl_runtime.grpo import AGGREGATIONS, GRPOModule, PromptDataModule, aggregate, grpo_loss, grpo_token_loss
from percepdsl_runtime.models import load_hf
from percepdsl_runtime.rewards import compile_reward
from percepdsl_runtime.token_weights import TokenWeighting, role_gradient_norms

ROLES = ["perception", "reasoning", "answer", "other"]
RULES = [
    {"role": "perception", "kind": "between", "open": "<perception>", "close": "</perception>"},
    {"role": "reasoning", "kind": "between", "open": "<reasoning>", "close": "</reasoning>"},
    {"role": "answer", "kind": "between", "open": "<answer>", "close": "</answer>"},
]


def _toy(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    N, T = 4, 6
    logp = (torch.randn(N, T, generator=g) * 0.1 - 1.0).requires_grad_(True)
    old = logp.detach() + torch.randn(N, T, generator=g) * 0.05
    adv = torch.tensor([1.0, -0.5, 0.3, -0.8])
    mask = torch.ones(N, T)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    roles = torch.randint(0, 3, (N, T), generator=g)
    roles[mask == 0] = -1
    return logp, old, adv, mask, roles


@pytest.mark.parametrize("how", AGGREGATIONS)
def test_unit_weights_are_plain_grpo_and_zero_weights_remove_those_tokens(how: str) -> None:
    logp, old, adv, mask, roles = _toy()
    kw = {"aggregation": how, "denominator": float(mask.shape[0] * 8) if how == "dr_grpo" else None}
    plain, _ = grpo_loss(logp, old, adv, mask, **kw)
    (g_plain,) = torch.autograd.grad(plain, logp)
    ones = TokenWeighting(RoleWeights(weights={"perception": 1.0, "reasoning": 1.0}), ROLES)
    weighted, _ = grpo_loss(logp, old, adv, mask, token_weights=ones.token_weights(roles, 0, 10), **kw)
    (g_ones,) = torch.autograd.grad(weighted, logp)
    assert torch.equal(weighted, plain) and torch.equal(g_ones, g_plain)

    tw = TokenWeighting(RoleWeights(weights={"perception": 0.0, "answer": 2.0}), ROLES)
    w = tw.token_weights(roles, 0, 10)
    loss, _ = grpo_loss(logp, old, adv, mask, token_weights=w, **kw)
    (g,) = torch.autograd.grad(loss, logp)
    perception, answer, reasoning = roles == 0, roles == 2, roles == 1
    assert perception.any() and answer.any() and reasoning.any()
    assert torch.all(g[perception] == 0)  # weight 0: no gradient from those tokens
    assert torch.allclose(g[answer], 2 * g_plain[answer])  # weight 2: twice the gradient, same denominator
    assert torch.allclose(g[reasoning], g_plain[reasoning])  # not named: weight 1
    assert torch.all(g[mask == 0] == 0)


def test_scheduled_weights_use_the_schedule_evaluator() -> None:
    tw = TokenWeighting(RoleWeights(weights={"perception": LinearSchedule(start=2.0, end=0.0)}), ROLES)
    assert tw.role_weights(0, 10) == [2.0, 1.0, 1.0, 1.0]
    assert tw.role_weights(5, 10) == [1.0, 1.0, 1.0, 1.0]
    roles = torch.tensor([[0, 1, -1]])
    assert tw.token_weights(roles, 0, 10).tolist() == [[2.0, 1.0, 0.0]]
    logs = tw.share_logs(roles, torch.tensor([[1, 1, 0]]), 0, 10)
    assert logs["token_share/perception"] == 0.5 and logs["token_weight/perception"] == 2.0
    with pytest.raises(ValueError, match="unknown role"):
        TokenWeighting(RoleWeights(weights={"perceptoin": 2.0}), ROLES)


def _linear_problem():
    """A linear 'policy' so every gradient can be written by hand."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 1, bias=False)
    x = torch.randn(4, 6, 5)
    logp, old, adv, mask, roles = _toy(1)
    return lin, x, old, adv, mask, roles


def test_ngdiff_over_role_groups_sums_unit_gradients() -> None:
    lin, x, old, adv, mask, roles = _linear_problem()
    tw = TokenWeighting(NGDiffLoss(groups=[["perception"], ["reasoning", "answer"]]), ROLES)

    def per_token():
        logp = lin(x)[..., 0] * 0.01 - 1.0
        return grpo_token_loss(logp, old, adv, mask)[0]

    def reduce(t):
        return aggregate(t, mask, "bnpo")

    masks = [torch.isin(roles, torch.tensor(g)).float() for g in tw.groups]
    expected = torch.zeros_like(lin.weight)
    for gm in masks:
        (g,) = torch.autograd.grad(reduce(per_token() * gm), lin.weight)
        expected += g / g.norm()
    lin.weight.grad = torch.zeros_like(lin.weight)
    pt = per_token()
    parts = [reduce(pt * gm) for gm in masks]
    logs = tw.ngdiff_backward(parts, [lin.weight], lambda t: t.backward(), step=0)
    assert torch.allclose(lin.weight.grad, expected, atol=1e-6)
    assert set(logs) == {"grad_norm/perception", "grad_norm/reasoning+answer"}
    # a group without tokens this step is left out: the other group's unit gradient alone
    lin.weight.grad = torch.zeros_like(lin.weight)
    pt = per_token()
    tw.ngdiff_backward([reduce(pt * masks[0]), None], [lin.weight], lambda t: t.backward(), step=0)
    assert torch.allclose(lin.weight.grad.norm(), torch.tensor(1.0), atol=1e-5)


def test_role_gradient_norms_are_each_roles_share() -> None:
    lin, x, old, adv, mask, roles = _linear_problem()
    pt = grpo_token_loss(lin(x)[..., 0] * 0.01 - 1.0, old, adv, mask)[0]

    def reduce(t):
        return aggregate(t, mask, "grpo")

    logs = role_gradient_norms({n: reduce(pt * (roles == r)) for r, n in enumerate(ROLES) if (roles == r).any()}, [lin.weight])
    for r, name in enumerate(ROLES[:3]):
        (g,) = torch.autograd.grad(reduce(pt * (roles == r)), lin.weight, retain_graph=True)
        assert logs[f"pg_norm/{name}"] == pytest.approx(float(g.norm()), rel=1e-5)
    assert "pg_norm/other" not in logs  # no tokens of that role
    assert sum(v for k, v in logs.items() if k.startswith("pg_share/")) == pytest.approx(1.0)


# ------------------------------------------------------------------ roles of generated text
@pytest.fixture(scope="module")
def encoder(tiny):
    return Encoder(tiny, RULES)


def _ids(encoder, text: str) -> list[int]:
    return encoder.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_generated_tokens_get_the_roles_of_sft_targets(encoder, task) -> None:
    s = task.sample("train", 0)
    item = encoder.encode_train(s.query, s.image, s.response)
    target = item["labels"] != -100
    ids, want = item["input_ids"][target], item["role_ids"][target]  # response + end-of-turn (EOS)
    got = encoder.completion_roles(ids[None], [len(ids)])[0]
    assert got.tolist() == want.tolist()


def test_malformed_generations_are_tagged_as_written(encoder, task) -> None:
    names = encoder.role_names
    eos = encoder.eos_token_id
    unclosed = _ids(encoder, "<perception> 0 1 0 2 <reasoning>") + [eos]  # perception never closed: it runs to the end
    garbage = _ids(encoder, "0 1 </answer> <answer>")  # a stray closing marker, then an unclosed answer
    width = max(len(unclosed), len(garbage)) + 2
    ids = torch.full((2, width), encoder.pad_token_id)
    ids[0, : len(unclosed)] = torch.tensor(unclosed)
    ids[1, : len(garbage)] = torch.tensor(garbage)
    roles = encoder.completion_roles(ids, [len(unclosed), len(garbage)])
    assert [names[r] for r in roles[0, : len(unclosed)].tolist()] == ["perception"] * len(unclosed)
    assert [names[r] for r in roles[1, : len(garbage)].tolist()] == ["other"] * 3 + ["answer"]
    assert (roles[:, len(unclosed) :][0] == -1).all() and (roles[1, len(garbage) :] == -1).all()
    # a sequence the tokenizer would not produce still gets one role per token
    odd = [eos, *unclosed[:3], eos]
    assert len(encoder.completion_roles(torch.tensor([odd]), [len(odd)])[0]) == len(odd)


# ------------------------------------------------------------------ from spec text to a trained stage
SPEC = """
experiment tw
task graph_coloring {{ nodes = 4  reasoning = brief  train = 32  test = 4 }}
model tiny {{ width = 64  depth = 2  heads = 2  vision_width = 32  vision_depth = 1 }}
roles {{ perception = between("<perception>", "</perception>")  answer = between("<answer>", "</answer>")  reasoning = rest() }}
stage base = sft {{ steps = 1 }}
stage rl = grpo from base {{
  steps = 2  batch = 2  group = 4  max_new_tokens = 12  lr = 1e-3  reward = perceived_consistency + 0.1 * format
  {weights}
}}
"""


def _diversity(group, **_):
    return [len(set(t.split())) / max(len(t.split()), 1) for t in group.completions]


def _stage(tmp_path: Path, weights: str):
    spec = tmp_path / "tw.pd"
    spec.write_text(SPEC.format(weights=weights), encoding="utf-8")
    res = check_file(spec, fragment_ok=False)
    assert res.ok, [d.message for d in res.diagnostics]
    return res.ir


@pytest.mark.parametrize(
    "weights", ["token_weights { perception = 0  answer = linear(2, 1) }", "token_weights = ngdiff(perception, [reasoning, answer])"]
)
def test_a_checked_spec_trains_with_role_weights(tmp_path, tiny, encoder, task, weights: str) -> None:
    from percepdsl_runtime.tasks import build_task

    ir = _stage(tmp_path, weights)
    stage, encoder = ir.stage("rl"), Encoder(tiny, ir.roles)  # untrained text is `rest`: reasoning
    assert stage.token_weights is not None
    task = build_task("graph_coloring", {"nodes": 4, "reasoning": "brief", "train": 32, "test": 4}, seed=0)
    # the spec's reward is constant on an untrained model: a text-diversity reward varies (as in test_grpo)
    reward = compile_reward(RewardIR(kind="term", name="diversity", impl="test:diversity"), lambda _: _diversity)
    module = GRPOModule(load_hf(tiny.path), encoder, task, stage, reward, seed=0, grad_clip=1.0)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        devices=1,
        precision="bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=PromptDataModule(task.size("train"), stage.batch, seed=0))
    logs = trainer.logged_metrics
    assert "token_share/perception" in logs and any(k.startswith("pg_share/") for k in logs)
    if stage.token_weights.kind == "weights":
        assert float(logs["token_weight/perception"]) == 0.0 and float(logs["token_weight/answer"]) == pytest.approx(1.5)
    moved = [n for n, p in module.model.named_parameters() if not torch.equal(p, before[n])]
    assert moved  # an untrained model's rewards vary within groups: the weighted loss has a gradient


def test_all_unit_weights_compile_to_plain_grpo(tmp_path) -> None:
    assert _stage(tmp_path, "token_weights { perception = 1, reasoning = 1.0 }").stage("rl").token_weights is None
    assert _stage(tmp_path, "").stage("rl").token_weights is None
