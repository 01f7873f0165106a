"""Objectives on tiny CPU tensors: schedules, per-role CE, mix, NGDiff (losses.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import TypeAdapter, ValidationError

from percepdsl.ir import Loss, MixLoss, NGDiffLoss, Schedule, TokenMeanLoss, value_at
from percepdsl_runtime.losses import Objective, quadratic_step, role_token_losses

ROLES = ["perception", "reasoning", "answer"]
LOSS = TypeAdapter(Loss)
MIX = lambda lam: LOSS.validate_python(  # noqa: E731
    {"kind": "mix", "terms": [{"weight": lam, "roles": ["perception"]}, {"weight": 1 - lam, "roles": ["reasoning", "answer"]}]}
)
NGDIFF = NGDiffLoss(groups=[["perception"], ["reasoning", "answer"]])


# ------------------------------------------------------------------ schedules
def test_schedules_at_endpoints() -> None:
    """`value_at`, the one evaluator of learning rates and weights (absolute values)."""
    sched = lambda **kw: TypeAdapter(Schedule).validate_python(kw)  # noqa: E731
    assert value_at(0.3, 5, 10) == 0.3
    assert value_at(sched(kind="constant", value=2.0), 7, 10) == 2.0
    lin = sched(kind="linear", start=1.0, end=0.2)
    assert value_at(lin, 0, 10) == 1.0 and value_at(lin, 10, 10) == pytest.approx(0.2)
    assert value_at(lin, 5, 10) == pytest.approx(0.6)
    cos = sched(kind="cosine", start=1.0, end=0.0)
    assert value_at(cos, 0, 10) == 1.0 and value_at(cos, 10, 10) == pytest.approx(0.0)
    assert value_at(cos, 5, 10) == pytest.approx(0.5)
    wcos = sched(kind="cosine", start=1.0, end=0.1, warmup=4)
    assert value_at(wcos, 0, 20) == 0.0
    assert value_at(wcos, 2, 20) == pytest.approx(0.5)
    assert value_at(wcos, 4, 20) == pytest.approx(1.0)
    assert value_at(wcos, 20, 20) == pytest.approx(0.1)
    step = sched(kind="step", start=1.0, every=3, factor=0.5)
    assert [value_at(step, s, 10) for s in (0, 2, 3, 9)] == [1.0, 1.0, 0.5, 0.125]
    # the DSL's `warmup(0.8, steps = 10)` compiles to a constant with warmup
    warm = sched(kind="constant", value=0.8, warmup=10)
    assert value_at(warm, 0, 100) == 0.0 and value_at(warm, 5, 100) == pytest.approx(0.4)
    assert value_at(warm, 10, 100) == pytest.approx(0.8) and value_at(warm, 100, 100) == pytest.approx(0.8)
    # a schedule that starts at 0 is absolute: linear(0, 1e-3) is 1e-3 · step / total
    zero = sched(kind="linear", start=0.0, end=1e-3)
    assert value_at(zero, 0, 10) == 0.0 and value_at(zero, 5, 10) == pytest.approx(5e-4)
    with pytest.raises(ValidationError):
        sched(kind="bogus")
    with pytest.raises(ValidationError):  # a step schedule has no `end`; a linear one needs it
        sched(kind="step", start=1.0, end=None)
    with pytest.raises(ValidationError):
        sched(kind="linear", start=1.0)


# ------------------------------------------------------------------ per-role CE
def _batch(n_per_role: tuple[int, ...] = (4, 4, 4), vocab: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    role_ids = torch.cat([torch.full((n,), r) for r, n in enumerate(n_per_role)])
    n = len(role_ids)
    logits = torch.randn(n, vocab, generator=g, requires_grad=True)
    labels = torch.randint(0, vocab, (n,), generator=g)
    return logits, labels, role_ids


def test_role_token_losses_matches_per_role_reference() -> None:
    logits, labels, roles = _batch((3, 5, 2))
    labels = labels.clone()
    roles = roles.clone()
    labels[1], roles[4] = -100, -1  # ignored tokens
    sums, counts = role_token_losses(logits, labels, roles, 3)
    for r in range(3):
        m = (roles == r) & (labels != -100)
        assert counts[r] == int(m.sum())
        ref = F.cross_entropy(logits[m], labels[m], reduction="sum")
        assert sums[r].item() == pytest.approx(ref.item(), rel=1e-5)
    # batched [B, T, V] input gives the same result
    s2, c2 = role_token_losses(logits.view(2, 5, -1), labels.view(2, 5), roles.view(2, 5), 3)
    assert torch.allclose(sums, s2) and torch.equal(counts, c2)


def test_lambda_half_with_equal_role_sizes_equals_token_mean() -> None:
    logits, labels, roles = _batch((6, 3, 3))  # perception 6, reasoning+answer 6
    sums, counts = role_token_losses(logits, labels, roles, 3)
    mix, logs = Objective(MIX(0.5), ROLES).loss(sums, counts, 0, 10)
    tm, tlogs = Objective(TokenMeanLoss(), ROLES).loss(sums, counts, 0, 10)
    assert mix.item() == pytest.approx(tm.item(), rel=1e-6)
    g_mix = torch.autograd.grad(mix, logits, retain_graph=True)[0]
    g_tm = torch.autograd.grad(tm, logits)[0]
    assert torch.allclose(g_mix, g_tm, atol=1e-7)
    assert logs["eff_lambda"] == pytest.approx(0.5)
    assert tlogs["eff_lambda"] == pytest.approx(0.5)  # token mean's implicit λ = perception token share


def test_mix_weight_zero_gives_zero_gradient_from_that_role() -> None:
    logits, labels, roles = _batch((4, 5, 3))
    sums, counts = role_token_losses(logits, labels, roles, 3)
    loss, logs = Objective(MIX(0.0), ROLES).loss(sums, counts, 0, 10)
    (g,) = torch.autograd.grad(loss, logits)
    assert torch.count_nonzero(g[roles == 0]) == 0
    assert torch.count_nonzero(g[roles != 0]) > 0
    assert logs["eff_lambda"] == 0.0


def test_mix_term_without_tokens_contributes_zero_and_schedule_weights() -> None:
    logits, labels, roles = _batch((0, 5, 3))  # no perception tokens in this batch
    sums, counts = role_token_losses(logits, labels, roles, 3)
    spec = MIX(0.7)
    loss, logs = Objective(spec, ROLES).loss(sums, counts, 0, 10)
    expected = 0.3 * (sums[1] + sums[2]) / 8
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert "loss/perception" not in logs and logs["token_share/perception"] == 0.0
    sched = MixLoss(terms=[{"weight": {"kind": "linear", "start": 0.0, "end": 1.0}, "roles": ["reasoning"]}])
    obj = Objective(sched, ROLES)
    assert obj.loss(sums, counts, 0, 10)[0].item() == 0.0
    assert obj.loss(sums, counts, 10, 10)[0].item() == pytest.approx((sums[1] / 5).item(), rel=1e-6)


def test_mean_over_some_roles_has_effective_lambda_zero() -> None:
    """The study's reasoner stage, `loss = mean(reasoning, answer)`: perception in context, not in
    the loss, so its share of the token weight (the effective λ) is 0 — it was logged as 1.0."""
    logits, labels, roles = _batch((4, 5, 3))
    sums, counts = role_token_losses(logits, labels, roles, 3)
    loss, logs = Objective(MixLoss(terms=[{"weight": 1.0, "roles": ["reasoning", "answer"]}]), ROLES).loss(sums, counts, 0, 1)
    assert loss.item() == pytest.approx(((sums[1] + sums[2]) / 8).item(), rel=1e-6)
    assert logs["eff_lambda"] == 0.0
    assert logs["weight_share/reasoning"] == pytest.approx(5 / 8) and logs["weight_share/answer"] == pytest.approx(3 / 8)
    (g,) = torch.autograd.grad(loss, logits)
    assert torch.count_nonzero(g[roles == 0]) == 0


def test_effective_lambda_is_the_perception_share_of_the_token_weight() -> None:
    """A term over perception and reasoning gives each of its tokens weight w/n: perception's
    share is 0.5 · 4/9 here; the weight shares sum to 1 and equal ∂loss/∂(role CE sum) shares."""
    logits, labels, roles = _batch((4, 5, 3))
    sums, counts = role_token_losses(logits, labels, roles, 3)
    two = LOSS.validate_python(
        {"kind": "mix", "terms": [{"weight": 0.5, "roles": ["perception", "reasoning"]}, {"weight": 0.5, "roles": ["answer"]}]}
    )
    leaf = sums.detach().requires_grad_(True)
    loss, logs = Objective(two, ROLES).loss(leaf, counts, 0, 1)
    (per_role,) = torch.autograd.grad(loss, leaf)  # the weight of one token of each role
    realised = per_role * counts
    assert logs["eff_lambda"] == pytest.approx(0.5 * 4 / 9)
    for r, name in enumerate(ROLES):
        assert logs[f"weight_share/{name}"] == pytest.approx(float(realised[r] / realised.sum()))
    # a step where every weight is 0 has no defined share: nothing is logged
    zero = LOSS.validate_python({"kind": "mix", "terms": [{"weight": {"kind": "linear", "start": 0.0, "end": 1.0}, "roles": ["answer"]}]})
    assert "eff_lambda" not in Objective(zero, ROLES).loss(sums, counts, 0, 4)[1]


def test_logs_shares_sum_to_one() -> None:
    logits, labels, roles = _batch((2, 7, 3))
    sums, counts = role_token_losses(logits, labels, roles, 3)
    _, logs = Objective(MIX(0.3), ROLES).loss(sums, counts, 0, 1)
    assert sum(logs[f"token_share/{r}"] for r in ROLES) == pytest.approx(1.0)
    assert sum(logs[f"loss_share/{r}"] for r in ROLES) == pytest.approx(1.0)
    assert logs["lambda/perception"] == pytest.approx(0.3) and logs["lambda/reasoning+answer"] == pytest.approx(0.7)


def test_unknown_role_and_kind() -> None:
    with pytest.raises(ValueError, match="unknown role"):
        Objective(MixLoss(terms=[{"weight": 1, "roles": ["perceptoin"]}]), ROLES)
    with pytest.raises(ValidationError):
        LOSS.validate_python({"kind": "nope"})


# ------------------------------------------------------------------ NGDiff
class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(5, 8)
        self.b = torch.nn.Linear(8, 7)
        self.unused = torch.nn.Linear(2, 2)  # reached by no loss: grad stays 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def _ngdiff_setup(n_per_role=(3, 6, 4)):
    net = TinyNet()
    g = torch.Generator().manual_seed(1)
    roles = torch.cat([torch.full((n,), r) for r, n in enumerate(n_per_role)])
    x = torch.randn(len(roles), 5, generator=g)
    labels = torch.randint(0, 7, (len(roles),), generator=g)
    return net, x, labels, roles


def test_ngdiff_combined_gradient_equals_normalised_sum() -> None:
    net, x, labels, roles = _ngdiff_setup()
    params = list(net.parameters())

    # by hand: the two group gradients separately
    def group_grad(mask: torch.Tensor) -> list[torch.Tensor]:
        loss = F.cross_entropy(net(x[mask]), labels[mask])
        return [g if g is not None else torch.zeros_like(p) for g, p in zip(torch.autograd.grad(loss, params, allow_unused=True), params)]

    gp, gr = group_grad(roles == 0), group_grad(roles > 0)
    npn = math.sqrt(sum(float((g**2).sum()) for g in gp))
    nrn = math.sqrt(sum(float((g**2).sum()) for g in gr))
    expected = [a / npn + b / nrn for a, b in zip(gp, gr)]

    obj = Objective(NGDIFF, ROLES)
    sums, counts = role_token_losses(net(x), labels, roles, 3)
    logs = obj.ngdiff_backward(sums, counts, params)
    for p, e in zip(params, expected):
        assert torch.allclose(p.grad if p.grad is not None else torch.zeros_like(p), e, atol=1e-6)
    assert net.unused.weight.grad is None  # reached by no group: no grad, so no optimiser update
    assert logs["eff_lambda"] == pytest.approx((1 / npn) / (1 / npn + 1 / nrn), rel=1e-5)
    assert logs["grad_norm/perception"] == pytest.approx(npn, rel=1e-5)
    cos = sum(float((a * b).sum()) for a, b in zip(gp, gr)) / (npn * nrn)
    assert logs["grad_cos"] == pytest.approx(cos, abs=1e-5)


def test_ngdiff_missing_group_and_lagged_norms() -> None:
    net, x, labels, roles = _ngdiff_setup((0, 6, 4))
    params = list(net.parameters())
    obj = Objective(NGDIFF, ROLES)
    sums, counts = role_token_losses(net(x), labels, roles, 3)
    logs = obj.ngdiff_backward(sums, counts, params)
    total = math.sqrt(sum(float((p.grad**2).sum()) for p in params if p.grad is not None))
    assert total == pytest.approx(1.0, rel=1e-5)  # only the reasoning group: its unit gradient
    assert logs["eff_lambda"] == 0.0

    # norm_every=3: steps 1, 2 reuse the step-0 norms in a single backward
    net, x, labels, roles = _ngdiff_setup()
    params = list(net.parameters())
    obj = Objective(NGDiffLoss(groups=NGDIFF.groups, norm_every=3), ROLES)
    sums, counts = role_token_losses(net(x), labels, roles, 3)
    exact = obj.ngdiff_backward(sums, counts, params, step=0)
    g0 = [p.grad.clone() if p.grad is not None else None for p in params]
    net.zero_grad(set_to_none=True)
    sums, counts = role_token_losses(net(x), labels, roles, 3)
    lagged = obj.ngdiff_backward(sums, counts, params, step=1)
    assert lagged["eff_lambda"] == pytest.approx(exact["eff_lambda"])
    for p, g in zip(params, g0):  # same parameters, same batch: the same gradient
        assert (p.grad is None and g is None) or torch.allclose(p.grad, g, atol=1e-6)


def test_ngdiff_needs_two_groups() -> None:
    with pytest.raises(ValidationError):
        NGDiffLoss(groups=[["perception"]])


def test_quadratic_step() -> None:
    f = lambda t: 3.0 * (t - 0.7) ** 2 + 1.0  # noqa: E731
    assert quadratic_step(f(0), f(1), f(2)) == pytest.approx(0.7)
    assert quadratic_step(5.0, 4.0, 3.0) == 4.0  # still descending linearly: as far as allowed
    assert quadratic_step(1.0, 2.0, 5.0) == 0.1  # ascending: as short as allowed
