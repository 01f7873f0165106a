"""Reward terms, the reward algebra, bad-reward errors and the reward diagnostics, on
hand-made groups (no model)."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from percepdsl.ir import RewardIR
from percepdsl_runtime.rewards import (
    RewardDiagnostics,
    RewardError,
    RewardWarning,
    RolloutGroup,
    checkpoint_coupling,
    compile_reward,
    constant_groups,
    group_mean_pearson,
    pearson,
    self_consistency,
    term_key,
    within_group_pearson,
)
from percepdsl_runtime.tasks.base import Scores

ROOT = Path(__file__).resolve().parents[1]
IMPL = "percepdsl_runtime.rewards:{}"


def term(name: str, impl: str | None = None, **params) -> RewardIR:
    fn = {"format": "format_ok"}.get(name, name)
    return RewardIR(kind="term", name=name, impl=impl or IMPL.format(fn), params=params)


def node(kind: str, *children: RewardIR, value: float | None = None) -> RewardIR:
    return RewardIR(kind=kind, children=list(children), value=value)


def group(rows: list[tuple[int, int, int, float, int]], perceptions: list | None = None, sid: str = "t/0") -> RolloutGroup:
    """rows: (format_ok, outcome, perception_exact, perception_partial, reasoning) per completion."""
    scores = [
        Scores(format_ok=bool(f), outcome=bool(o), perception_exact=bool(p), perception_partial=pp, reasoning=bool(r))
        for f, o, p, pp, r in rows
    ]
    return RolloutGroup(
        sample=SimpleNamespace(id=sid),
        completions=[f"c{i}" for i in range(len(rows))],
        scores=scores,
        perceptions=perceptions or [None] * len(rows),
    )


G1 = group([(1, 1, 1, 1.0, 1), (1, 1, 0, 0.5, 1), (0, 0, 0, 0.0, 0), (1, 0, 1, 1.0, 0)])


# ------------------------------------------------------------------ terms
def test_label_terms_read_the_scores() -> None:
    ir = node("sum", term("outcome"), term("perception_match"), term("perception_partial"), term("format"), term("perceived_consistency"))
    vals = compile_reward(ir)(G1).terms
    assert vals["outcome"].tolist() == [1, 1, 0, 0]
    assert vals["perception_match"].tolist() == [1, 0, 0, 1]
    assert vals["perception_partial"].tolist() == [1.0, 0.5, 0.0, 1.0]
    assert vals["format"].tolist() == [1, 1, 0, 1]
    assert vals["perceived_consistency"].tolist() == [1, 1, 0, 0]


def test_self_consistency_agreement_and_majority() -> None:
    g = group([(0, 0, 0, 0, 0)] * 4, perceptions=["A", "A", "B", None])
    # agreement (the catalogue's default): share of the other G-1 rollouts with the same parsed perception; unparsed = 0
    assert self_consistency(g, mode="agreement") == pytest.approx([1 / 3, 1 / 3, 0.0, 0.0])
    assert self_consistency(g, mode="majority") == [1.0, 1.0, 0.0, 0.0]
    tie = group([(0, 0, 0, 0, 0)] * 4, perceptions=["A", "B", "A", "B"])
    assert self_consistency(tie, mode="majority") == [1.0] * 4  # every tied mode counts
    assert self_consistency(tie, mode="agreement") == pytest.approx([1 / 3] * 4)
    lone = group([(0, 0, 0, 0, 0)] * 3, perceptions=["A", "B", "C"])
    assert self_consistency(lone, mode="agreement") == [0.0] * 3 and self_consistency(lone, mode="majority") == [0.0] * 3
    with pytest.raises(ValueError, match="unknown mode"):
        self_consistency(g, mode="vote")


def test_rollout_group_scores_with_the_task() -> None:
    from percepdsl_runtime.tasks import build_task

    task = build_task("graph_coloring", {"nodes": 4}, seed=0)
    s = task.sample("train", 0)
    g = RolloutGroup.score(task, s, [s.response, "garbage", s.response])
    assert [sc.outcome for sc in g.scores] == [True, False, True]
    assert g.perceptions[0] == g.perceptions[2] is not None and g.perceptions[1] is None
    assert self_consistency(g, mode="agreement") == [0.5, 0.0, 0.5]


def test_visual_dependency_averages_or_thresholds_the_perception_tokens() -> None:
    import torch

    js = {"other": [torch.tensor([0.4, 0.0, 0.2]), torch.zeros(0), torch.tensor([0.05])], "blank": [torch.tensor([1.0])] * 3}
    seen: list[str] = []

    def dependency(against: str) -> list:
        seen.append(against)
        return js[against]

    g = group([(1, 1, 1, 1.0, 1)] * 3)
    g.dependency = dependency
    ir = node("sum", term("visual_dependency", against="other", threshold=None), term("visual_dependency", against="other", threshold=0.1))
    vals = compile_reward(ir)(g).terms
    assert vals["visual_dependency"] == pytest.approx([0.2, 0.0, 0.05])  # the mean JS; no perception tokens: 0
    assert vals["visual_dependency(threshold=0.1)"] == pytest.approx([2 / 3, 0.0, 0.0])  # share above 0.1 bits
    blank = compile_reward(term("visual_dependency", against="blank", threshold=None))(g)
    assert blank.terms["visual_dependency(against=blank)"].tolist() == [1.0] * 3 and seen == ["other", "other", "blank"]
    with pytest.raises(RewardError, match="only a grpo stage"):  # a group without the policy's forwards
        compile_reward(term("visual_dependency", against="other", threshold=None))(G1)


# ------------------------------------------------------------------ algebra
def test_weighted_sum_gate_product_scale_const() -> None:
    # gate(0.3·perception_match + 0.7·outcome, format)
    ir = node(
        "gate", node("sum", node("scale", term("perception_match"), value=0.3), node("scale", term("outcome"), value=0.7)), term("format")
    )
    assert compile_reward(ir)(G1).total == pytest.approx([1.0, 0.7, 0.0, 0.3])
    # outcome · perception_partial · 2 + (-1)
    ir = node(
        "sum",
        node("product", term("outcome"), term("perception_partial"), RewardIR(kind="const", value=2.0)),
        RewardIR(kind="const", value=-1.0),
    )
    assert compile_reward(ir)(G1).total == pytest.approx([1.0, 0.0, -1.0, -1.0])
    # a gate passes only where the gate is exactly 1
    ir = node("gate", term("perception_match"), term("perception_partial"))
    assert compile_reward(ir)(G1).total.tolist() == [1.0, 0.0, 0.0, 1.0]


def test_each_distinct_term_is_evaluated_once_and_logged_by_name() -> None:
    calls: list[str] = []

    def resolve(impl: str):
        def fn(g, **params):
            calls.append(impl)
            return [float(params.get("k", 1))] * len(g)

        return fn

    ir = node("sum", term("t", impl="x:t"), node("scale", term("t", impl="x:t"), value=2.0), term("t", impl="x:t", k=3))
    r = compile_reward(ir, resolve=resolve)
    assert r.term_names == ["t", "t(k=3)"] and r.surrogates == ["t", "t(k=3)"]
    vals = r(G1)
    assert len(calls) == 2 and vals.total.tolist() == [6.0] * 4
    assert term_key("brevity", {"max_words": 40}) == "brevity(max_words=40)"


def test_example_plugin_term_compiles() -> None:
    sys.path.insert(0, str(ROOT / "examples" / "plugin"))
    try:
        r = compile_reward(term("brevity", impl="percep_example_plugin.rewards:brevity", max_words=2))
        g = RolloutGroup(
            sample=SimpleNamespace(id="x"), completions=["a", "a b c", "a b c d e"], scores=[Scores()] * 3, perceptions=[None] * 3
        )
        assert r(g).terms["brevity(max_words=2)"].tolist() == [1.0, 0.5, 0.0]
    finally:
        sys.path.remove(str(ROOT / "examples" / "plugin"))


# ------------------------------------------------------------------ bad rewards
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_reward_raises_naming_the_term(bad: float) -> None:
    r = compile_reward(
        node("sum", term("outcome"), term("shaky", impl="x:shaky")),
        resolve=lambda impl: (
            (lambda g, **_: [0.0, bad, 0.0, 0.0])
            if impl == "x:shaky"
            else __import__("percepdsl_runtime.rewards", fromlist=["outcome"]).outcome
        ),
    )
    with pytest.raises(RewardError, match="`shaky`") as exc:
        r(G1)
    assert exc.value.term == "shaky" and "completion 1" in str(exc.value) and "t/0" in str(exc.value)


def test_wrong_length_and_raising_terms_are_reward_errors() -> None:
    short = compile_reward(term("short", impl="x:s"), resolve=lambda _: lambda g, **_: [1.0])
    with pytest.raises(RewardError, match="returned 1 values for a group of 4"):
        short(G1)

    def boom(g, **_):
        raise KeyError("instance")

    with pytest.raises(RewardError, match="`boom`: raised KeyError") as exc:
        compile_reward(term("boom", impl="x:b"), resolve=lambda _: boom)(G1)
    assert exc.value.term == "boom"
    overflow = node("product", term("big", impl="x:big"), term("big", impl="x:big", k=1))
    with pytest.raises(RewardError, match="`total`"):
        compile_reward(overflow, resolve=lambda _: lambda g, **_: [1e200] * len(g))(G1)


# ------------------------------------------------------------------ statistics
def test_pearson_is_none_for_constant_vectors() -> None:
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 1, 1], [0, 1, 0]) is None
    assert pearson([0.1 * 3] * 3, [0, 1, 2]) is None
    assert pearson([1], [1]) is None
    x, y = np.array([0.3, 1.0, 0.2, 0.9, 0.5]), np.array([0, 1, 0, 1, 1])
    assert pearson(x, y) == pytest.approx(float(np.corrcoef(x, y)[0, 1]))


def test_within_group_pearson_centres_each_group() -> None:
    # overall the reward tracks y (group 1 is higher in both); within group 0 it runs against it
    x, y, g = [0, 1, 10, 11], [1, 0, 1, 1], [0, 0, 1, 1]
    assert pearson(x, y) > 0.5
    # pooled: group 1 (y constant) adds no covariance, but its x spread counts in the variance
    assert within_group_pearson(x, y, g) == pytest.approx(-1 / math.sqrt(2))
    assert within_group_pearson([0, 1, 2, 3], [0, 1, 1, 0], g) == pytest.approx(0.0)
    assert within_group_pearson([1, 2, 5, 6], [0, 1, 0, 1], [0, 0, 1, 1]) == pytest.approx(1.0)
    assert within_group_pearson([1, 1, 2, 2], [0, 1, 0, 1], [0, 0, 1, 1]) is None  # no group varies in x
    assert constant_groups(np.array([[1, 1], [0, 1]])).tolist() == [True, False]


def test_diagnostics_running_correlations_and_flat_groups() -> None:
    ir = node("sum", node("scale", term("self_consistency", mode="agreement"), value=0.5), node("scale", term("outcome"), value=0.5))
    r = compile_reward(ir)
    d = RewardDiagnostics(r.term_names, r.surrogates)
    assert r.surrogates == ["self_consistency"]
    g1 = group([(1, 1, 1, 1, 1), (1, 1, 1, 1, 1), (1, 0, 0, 0, 0), (1, 0, 1, 1, 0)], ["A", "A", "B", "A"], "t/1")
    g2 = group([(1, 0, 0, 0, 0)] * 4, [None] * 4, "t/2")
    v1, v2 = r(g1), r(g2)
    step = d.update([g1, g2], [v1, v2])
    assert step["constant_group_frac"] == 0.5
    assert step["reward/outcome"] == pytest.approx(2 / 8)
    total = np.concatenate([v1.total, v2.total])
    perc = np.array([1, 1, 0, 1, 0, 0, 0, 0])
    assert step["reward_perception_corr"] == pytest.approx(pearson(total, perc))
    assert step["reward_reasoning_corr"] == pytest.approx(pearson(total, [1, 1, 0, 0, 0, 0, 0, 0]))
    assert step["surrogate_corr/self_consistency"] == pytest.approx(1.0)  # "A" is p* in g1, g2 parses nothing
    assert step["reward_perception_corr_within"] == pytest.approx(within_group_pearson(total, perc, [0] * 4 + [1] * 4))
    d.update([g2], [v2])
    summary = d.summary()
    assert summary["steps"] == 2 and summary["rollouts"] == 12 and summary["groups"] == 3
    assert summary["constant_group_frac"] == pytest.approx(2 / 3)
    assert all(k in summary for k in ("reward_perception_corr", "reward_reasoning_corr", "surrogate_corr/self_consistency"))
    only_flat = RewardDiagnostics(r.term_names, r.surrogates)
    only_flat.update([g2], [v2])
    s = only_flat.summary()
    assert s["reward_perception_corr"] is None and s["surrogate_corr/self_consistency"] is None  # None, not NaN


def test_group_mean_pearson_averages_the_groups_where_r_is_defined() -> None:
    # group 0: r = +1; group 1: r = −1; group 2: y constant (undefined); group 3: r = 0.5 (hand-computed)
    x = [0, 1, 0, 1, 1, 2, 0, 1, 2, 3]
    y = [0, 1, 1, 0, 1, 1, 0, 1, 0, 1]
    g = [0, 0, 1, 1, 2, 2, 3, 3, 3, 3]
    r3 = pearson([0, 1, 2, 3], [0, 1, 0, 1])
    assert r3 == pytest.approx(2 / math.sqrt(20))
    mean_r, n = group_mean_pearson(x, y, g)
    assert n == 3 and mean_r == pytest.approx((1 - 1 + r3) / 3)
    assert group_mean_pearson([1, 1, 2, 2], [0, 1, 0, 1], [0, 0, 1, 1]) == (None, 0)
    assert group_mean_pearson([], [], []) == (None, 0)


def test_each_term_has_its_own_coupling_within_groups_and_pooled() -> None:
    """An α-mixed reward: outcome tracks reasoning, perception_match is perception by construction.
    Each term's r with each kind of correctness is reported by name, not only the total's."""
    r = compile_reward(node("sum", node("scale", term("perception_match"), value=0.3), node("scale", term("outcome"), value=0.7)))
    d = RewardDiagnostics(r.term_names, r.surrogates)
    # rows: (format, outcome, perception_exact, partial, reasoning); outcome = perceived AND reasoned here
    g1 = group([(1, 1, 1, 1, 1), (1, 0, 1, 1, 0), (1, 0, 0, 0, 1), (1, 0, 0, 0, 0)], sid="t/1")
    g2 = group([(1, 1, 1, 1, 1), (1, 1, 1, 1, 1), (1, 0, 1, 1, 0), (1, 0, 1, 1, 0)], sid="t/2")  # perception constant
    step = d.update([g1, g2], [r(g1), r(g2)])
    out = np.array([1, 0, 0, 0, 1, 1, 0, 0])
    perc, reas = np.array([1, 1, 0, 0, 1, 1, 1, 1]), np.array([1, 0, 1, 0, 1, 1, 0, 0])
    assert step["term_corr/outcome/reasoning"] == pytest.approx(pearson(out, reas))
    assert step["term_corr/outcome/perception"] == pytest.approx(pearson(out, perc))
    assert step["term_corr/perception_match/perception"] == pytest.approx(1.0)
    # within groups: outcome vs reasoning r is 1/√3 in g1 and 1 in g2; vs perception only g1 is defined (1/√3)
    assert step["term_corr_group_mean/outcome/reasoning"] == pytest.approx((1 / math.sqrt(3) + 1) / 2)
    assert step["term_corr_groups/outcome/reasoning"] == 2
    assert step["term_corr_group_mean/outcome/perception"] == pytest.approx(1 / math.sqrt(3))
    assert step["term_corr_groups/outcome/perception"] == 1
    assert step["term_corr_group_mean/perception_match/perception"] == pytest.approx(1.0)
    assert step["term_corr_groups/perception_match/perception"] == 1
    summary = d.summary()
    assert summary["term_corr/outcome/reasoning"] == pytest.approx(step["term_corr/outcome/reasoning"])
    assert summary["term_corr_groups/outcome/reasoning"] == 2


def test_coupling_across_checkpoints_from_the_reward_before_each_evaluation_point() -> None:
    r = compile_reward(term("outcome"))
    d = RewardDiagnostics(r.term_names, r.surrogates)
    history = []
    for ok, (a_p, a_r) in zip((0, 1, 2, 3), ((0.5, 0.1), (0.4, 0.3), (0.6, 0.5), (0.5, 0.7))):
        for _ in range(2):  # two steps per evaluation point; outcome mean ok/4
            g = group([(1, int(i < ok), 1, 1, 1) for i in range(4)], sid=f"t/{ok}")
            d.update([g], [r(g)])
        history.append({"step": 2 * (ok + 1), "perception": a_p, "reasoning": a_r, "reward_window": d.window()})
    assert [h["reward_window"]["outcome"] for h in history] == [0.0, 0.25, 0.5, 0.75]
    assert history[0]["reward_window"]["reward"] == 0.0
    c = checkpoint_coupling(history)
    assert c["term_corr_ckpt_points"] == 4
    assert c["term_corr_ckpt/outcome/reasoning"] == pytest.approx(1.0)  # a_r rises with the outcome reward
    assert c["term_corr_ckpt/outcome/perception"] == pytest.approx(pearson([0, 1, 2, 3], [0.5, 0.4, 0.6, 0.5]))
    assert checkpoint_coupling(history[:1])["term_corr_ckpt/outcome/perception"] is None  # one point: undefined
    state = d.state_dict()  # the window's start survives a resume
    again = RewardDiagnostics(r.term_names, r.surrogates)
    again.load_state_dict(state)
    assert again.window() == {}


def test_flat_reward_for_many_steps_warns_once_naming_terms() -> None:
    r = compile_reward(node("sum", term("outcome"), term("perception_partial")))
    d = RewardDiagnostics(r.term_names, r.surrogates, warn_after=3, stage="rl")
    flat = group([(1, 0, 0, 0.5, 0)] * 4)
    varied = group([(1, 0, 0, 0.5, 0), (1, 0, 0, 0.0, 0), (1, 0, 0, 0.5, 0), (1, 0, 0, 0.5, 0)])
    d.update([flat], [r(flat)])
    d.update([flat], [r(flat)])
    with pytest.warns(RewardWarning) as rec:
        d.update([flat], [r(flat)])
    msg = str(rec[0].message)
    assert "3 consecutive steps" in msg and "`rl`" in msg and "total reward" in msg
    assert "term `outcome` (always 0)" in msg and "term `perception_partial` (always 0.5)" in msg
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a streak warns once
        d.update([flat], [r(flat)])
        d.update([varied], [r(varied)])  # the total and perception_partial vary: their streaks restart
        d.update([flat], [r(flat)])
        d.update([flat], [r(flat)])
    with pytest.warns(RewardWarning) as rec:
        d.update([flat], [r(flat)])
    msg = str(rec[0].message)
    assert "total reward" in msg and "`perception_partial`" in msg and "`outcome`" not in msg
