"""benchmarks/repro_rl.py's report: paired differences against the outcome-only arm from the cells'
records, F3's per-seed coupling of the outcome term with its pre-registered verdict, and each
surrogate's correlation with perception beside its gain, all read from the cells' summary.json; the
graph-colouring plan's start cell (arm − start, paired) and its a / a_p-only evaluations."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import repro_rl  # noqa: E402

N = 40


def mask(k: int) -> list[bool]:
    return [i < k for i in range(N)]


SUDOKU, GC8 = repro_rl.PLANS["sudoku"], repro_rl.PLANS["gc8"]


def fake_cell(
    runs: Path, arm: str, seed: int, outcome: list[bool], perception: list[bool], diag: dict, plan: repro_rl.Plan = SUDOKU
) -> Path:
    """A finished GRPO run directory as `percep run` leaves it: summary.json and the final records
    (without the counterfactual pass when the plan's evaluations have no a_r)."""
    rd = repro_rl.run_dir(repro_rl.Cell(plan.spec(arm), seed, ""), runs)
    rd.mkdir(parents=True)
    cf = "a_r" in plan.fields
    recs = [
        {"stage": "rl", "final": True, "id": f"t/test/{i}", "outcome": o, "perception_exact": p, **({"cf_outcome": o} if cf else {})}
        for i, (o, p) in enumerate(zip(outcome, perception))
    ]
    (rd / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    final = {
        "end_to_end": float(np.mean(outcome)),
        "perception": float(np.mean(perception)),
        "reasoning": float(np.mean(outcome)) if cf else None,
    }
    summary = {
        "experiment": rd.name.rsplit("-", 1)[0],
        "status": "complete",
        "seed": seed,
        "params": {},
        "final": final,
        "final_stage": "rl",
        "stages": {"rl": {"train_seconds": 120.0, "diagnostics": diag}},
    }
    (rd / "summary.json").write_text(json.dumps(summary))
    return rd


def coupling(reasoning: float, perception: float, **more: float) -> dict:
    return {
        "term_corr/outcome/reasoning": reasoning,
        "term_corr/outcome/perception": perception,
        "term_corr_group_mean/outcome/reasoning": reasoning,
        "term_corr_group_mean/outcome/perception": perception,
        "constant_group_frac_before": 0.5,
        "trained_group_frac": 0.5,
        **more,
    }


def test_paired_gain_f3_verdict_and_surrogate_table(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for s, (out_k, sc_k), r_perc in zip((1, 2, 3), ((10, 14), (12, 15), (11, 13)), (0.2, 0.3, 0.25)):
        fake_cell(runs, "outcome", s, mask(out_k), mask(20), coupling(0.9, r_perc))
        sur = {
            "surrogate_corr/self_consistency(mode=majority)": 0.4 + 0.1 * s,
            "surrogate_corr_within/self_consistency(mode=majority)": 0.3,
        }
        fake_cell(runs, "sc_majority", s, mask(sc_k), mask(25), coupling(0.8, 0.4, **sur))
    text = repro_rl.report(tmp_path, ["outcome", "sc_majority"], [1, 2, 3]).read_text()
    data = json.loads((tmp_path / "report.json").read_text())
    d = data["paired"]["sc_majority"]["a"]
    assert d["per_seed"] == pytest.approx([4 / N, 3 / N, 2 / N])
    assert d["n_pairs"] == 3 * N and 0 < d["lo"] < d["mean"] < d["hi"]
    assert data["paired"]["sc_majority"]["a_p"]["mean"] == pytest.approx(5 / N)
    assert "| sc_majority | a | 1,2,3 | 120 | +0.075 |" in text and "| reproduced |" in text
    f3 = data["f3"]["outcome"]
    assert f3["within_gap"]["per_seed"] == pytest.approx([0.7, 0.6, 0.65])
    assert f3["verdict"] == "reproduced" and "**reproduced**" in text
    # the surrogate's r with perception, per seed and its mean, beside its gain
    assert "| sc_majority | `self_consistency(mode=majority)` | 0.50 / 0.60 / 0.70 | 0.600 [" in text
    assert "+0.075 [" in text.split("## Surrogates", 1)[1]


def test_f3_is_not_reproduced_when_one_seed_points_the_other_way(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for s, r_perc in zip((1, 2, 3), (0.2, 0.95, 0.3)):
        fake_cell(runs, "outcome", s, mask(10), mask(20), coupling(0.9, r_perc))
    repro_rl.report(tmp_path, ["outcome"], [1, 2, 3])
    assert json.loads((tmp_path / "report.json").read_text())["f3"]["outcome"]["verdict"] == "not reproduced"


def test_gc8_plan_pairs_each_arm_with_the_start_and_reads_a_and_a_p_only(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    # the start cell (seed 1 only) is every seed's "before"; 8 of 40 items right, 10 perceived
    fake_cell(runs, "start", 1, mask(8), mask(10), coupling(0.5, 0.5), GC8)
    for s, (out_k, al_k, al_p) in zip((1, 2, 3), ((10, 12, 16), (11, 12, 15), (9, 12, 14))):
        fake_cell(runs, "outcome", s, mask(out_k), mask(10), coupling(0.9, 0.3), GC8)
        fake_cell(runs, "alpha", s, mask(al_k), mask(al_p), coupling(0.8, 0.5), GC8)
    text = repro_rl.report(tmp_path, ["outcome", "alpha"], [1, 2, 3], GC8).read_text()
    data = json.loads((tmp_path / "report.json").read_text())
    assert set(data["paired"]["alpha"]) == {"a", "a_p"}  # no a_r: the evaluations had no counterfactual pass
    assert data["paired"]["alpha"]["a"]["per_seed"] == pytest.approx([2 / N, 1 / N, 3 / N])
    assert data["paired"]["alpha"]["a_p"]["mean"] == pytest.approx(5 / N)
    # arm − start, paired item by item with the one start cell in every seed
    assert data["vs_start"]["outcome"]["a"]["per_seed"] == pytest.approx([2 / N, 3 / N, 1 / N])
    assert data["vs_start"]["alpha"]["a_p"]["per_seed"] == pytest.approx([6 / N, 5 / N, 4 / N])
    assert "## What GRPO changed: arm − start" in text and "| `alpha` | 3 | 120 |" in text
    assert "graph colouring" in text.splitlines()[0]
    assert "| outcome | 1 | 40 | 0.250 | 0.250 | – |" in text  # a_r not evaluated: shown as –
    assert data["f3"]["outcome"]["verdict"] == "reproduced"


def test_f3_verdict_reads_the_seeds_that_finished_and_waits_for_three(tmp_path: Path) -> None:
    """gc8's plan asks for seeds 1-5 with a start cut-off: the verdict uses every finished seed (>= 3)."""
    runs = tmp_path / "runs"
    for s in (1, 2):
        fake_cell(runs, "outcome", s, mask(10), mask(10), coupling(0.9, 0.3), GC8)
    repro_rl.report(tmp_path, ["outcome"], [1, 2, 3, 4, 5], GC8)
    assert json.loads((tmp_path / "report.json").read_text())["f3"]["outcome"]["verdict"] == "pending (2 of 5 seeds)"
    fake_cell(runs, "outcome", 3, mask(10), mask(10), coupling(0.8, 0.35), GC8)
    text = repro_rl.report(tmp_path, ["outcome"], [1, 2, 3, 4, 5], GC8).read_text()
    assert json.loads((tmp_path / "report.json").read_text())["f3"]["outcome"]["verdict"] == "reproduced"
    assert "(3 of 5 seeds finished)" in text


def test_gc8_arms_use_the_start_s_task_and_split() -> None:
    """The GRPO arms' task block equals the SFT arms' (common/gc8_task.pd): the same train/test split."""
    from percepdsl.check import check_file

    rl = check_file(GC8.spec("outcome"), {}, fragment_ok=False).ir
    sft = check_file(REPO / "specs" / "repro" / "gc8_tm.pd", {}, fragment_ok=False).ir
    assert rl is not None and sft is not None
    assert rl.task == sft.task


def with_weights_and_steps(rd: Path, value: float, steps: list[tuple[int, float, float, int, int]] = ()) -> Path:
    """Give a fake cell saved weights (one tensor) and its GRPO stage's metrics.csv: per logged step
    (step, within-group r with reasoning, with perception, groups where each varies)."""
    import torch
    from safetensors.torch import save_file

    stage = rd / "stages" / "rl"
    (stage / "model").mkdir(parents=True, exist_ok=True)
    (stage / "log0").mkdir(exist_ok=True)
    save_file({"w": torch.full((2, 2), value)}, stage / "model" / "model.safetensors")
    head = "step,term_corr_group_mean/outcome/reasoning,term_corr_group_mean/outcome/perception,"
    head += "term_corr_groups/outcome/reasoning,term_corr_groups/outcome/perception,pg_share/perception\n"
    rows = "".join(f"{s},{r},{'' if gp == 0 else p},{gr},{gp},0.2\n" for s, r, p, gr, gp in steps)
    (stage / "log0" / "metrics.csv").write_text(head + rows)
    return rd


def test_f3_by_window_weights_each_step_by_its_groups(tmp_path: Path) -> None:
    """Windows of WINDOW steps; a step's per-group mean counts by its groups, a step where no group
    varies counts nothing, and over the whole stage the windows give the stage's own within-group r."""
    rd = fake_cell(tmp_path / "runs", "outcome", 1, mask(10), mask(10), coupling(0.9, 0.3), GC8)
    steps = [(0, 0.8, 0.2, 3, 1), (1, 0.5, 0.9, 1, 0), (4, 0.6, 0.4, 2, 2), (5, 0.9, 0.1, 2, 2), (9, 0.7, 0.3, 1, 1)]
    with_weights_and_steps(rd, 1.0, steps)
    assert repro_rl.WINDOW == 4
    w = repro_rl.coupling_windows(rd)
    assert w["reasoning"] == pytest.approx([(3 * 0.8 + 0.5) / 4, (2 * 0.6 + 2 * 0.9) / 4, 0.7])
    assert w["perception"] == pytest.approx([0.2, (2 * 0.4 + 2 * 0.1) / 4, 0.3])
    assert w["groups/perception"] == [1, 4, 1]
    # the windows pooled by their groups = the stage's per-group mean over all its groups
    total = sum(r * g for r, g in zip(w["reasoning"], w["groups/reasoning"])) / sum(w["groups/reasoning"])
    assert total == pytest.approx((3 * 0.8 + 0.5 + 2 * 0.6 + 2 * 0.9 + 0.7) / 9)
    assert repro_rl.coupling_windows(rd, width=16)["groups/reasoning"] == [9]


def test_gc8_reevaluated_outcome_cells_are_the_baseline_of_the_new_arms(tmp_path: Path) -> None:
    """Session 5: `outcome`'s earlier cells (evaluated on fewer items) are re-evaluated from their
    weights; the new arms pair with the re-evaluations' records, F3 and the GRPO diagnostics come from
    the cells that trained, and each re-evaluation's weights and items are checked against its source."""
    old, out = tmp_path / "s4", tmp_path / "s5"
    n_old = 10  # the earlier evaluation scored the first items only
    steps = [(0, 0.9, 0.3, 2, 2), (4, 0.8, 0.2, 2, 2)]
    for s in (1, 2, 3):
        src = fake_cell(old / "runs", "outcome", s, mask(10)[:n_old], mask(5)[:n_old], coupling(0.85, 0.25), GC8)
        with_weights_and_steps(src, 1.0, steps)
        cell = repro_rl.eval_cell("outcome", s, out, old, prefix="gc8_rl", fragment=GC8.reeval_fragment, by="a test")
        assert cell.spec.read_text().startswith("# Generated by a test: cell outcome-s" + str(s))
        rd = repro_rl.run_dir(cell, out / "runs")
        assert rd.name.startswith("repro_gc8_rl_outcome_eval500-")
        # seed 2's re-evaluation loaded other weights; seed 3 scored one of the source's items otherwise
        outcome = [False] + mask(10)[1:] if s == 3 else mask(10)
        fake_cell(out / "runs", "start", s, outcome, mask(5), {}, GC8).rename(rd)
        (rd / "ir.json").write_text(json.dumps({"ir": {"model": {"path": str(src / "stages" / "rl" / "model")}}}))
        with_weights_and_steps(rd, 2.0 if s == 2 else 1.0)
        new = fake_cell(out / "runs", "alpha", s, mask(10 + s), mask(12), coupling(0.7, 0.5), GC8)
        with_weights_and_steps(new, 3.0, steps)
    text = repro_rl.report(out, ["outcome", "alpha"], [1, 2, 3], GC8).read_text()
    data = json.loads((out / "report.json").read_text())
    # the pairs are the re-evaluations' N items, not the source's n_old
    assert data["paired"]["alpha"]["a"]["n_pairs"] == 3 * N
    assert data["paired"]["alpha"]["a"]["per_seed"] == pytest.approx([1 / N, 2 / N, 4 / N])
    assert data["paired"]["alpha"]["a_p"]["mean"] == pytest.approx(7 / N)
    assert data["cells"]["outcome-s1"]["run"].startswith("repro_gc8_rl_outcome_eval500-")
    assert data["cells"]["outcome-s1"]["trained"].startswith("repro_gc8_rl_outcome-")
    # F3 reads the training cells' diagnostics
    assert data["f3"]["outcome"]["within_gap"]["per_seed"] == pytest.approx([0.6, 0.6, 0.6])
    checks = data["reevaluation_checks"]
    assert checks["outcome-s1"] == {**checks["outcome-s1"], "same_weights": True, "agreement": 1.0, "items_compared": n_old}
    assert not checks["outcome-s2"]["same_weights"] and "| **NO** |" in text
    assert checks["outcome-s3"]["agreement"] == pytest.approx(1 - 1 / n_old)
    # `percep report --baseline` selects the re-evaluations as the baseline (their N items per seed)
    assert "1: +0.025 (n=40)" in text.split("percep report --baseline", 1)[1]
    # F3 by window, from the metrics.csv of the cells that trained
    win = data["f3_windows"]["outcome"]["rows"]
    assert [r["steps"] for r in win] == ["1–4", "5–8"] and win[1]["gap_per_seed"] == pytest.approx([0.6] * 3)
    assert "## F3 by training-step window" in text


def test_reeval_from_needs_a_plan_that_re_evaluates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        repro_rl.main(["--plan", "sudoku", "--out", str(tmp_path), "--reeval-from", str(tmp_path), "--report"])
    assert "re-evaluates no arm" in capsys.readouterr().err


def test_an_arm_with_fewer_than_three_paired_seeds_gets_intervals_and_no_verdict(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for s in (1, 2, 3):
        fake_cell(runs, "outcome", s, mask(10), mask(10), coupling(0.9, 0.3), GC8)
    for s in (1, 2):  # the surrogate arm's third seed did not start before the cut-off
        fake_cell(runs, "sc_majority", s, mask(14), mask(12), coupling(0.8, 0.4), GC8)
    fake_cell(runs, "alpha", 1, mask(14), mask(12), coupling(0.8, 0.4), GC8)
    text = repro_rl.report(tmp_path, ["outcome", "alpha", "sc_majority"], [1, 2, 3], GC8).read_text()
    paired = json.loads((tmp_path / "report.json").read_text())["paired"]
    assert paired["sc_majority"]["a"]["verdict"] == "no verdict (2 of 3 seeds paired)"
    assert paired["sc_majority"]["a"]["mean"] == pytest.approx(4 / N)  # the intervals are still there
    assert "| `sc_majority` | 2 | 80 |" in text and "reproduced" not in text.split("## F3")[0]
    assert paired["alpha"]["a"]["verdict"] == "no verdict (1 of 3 seeds paired)"
    assert "Cells not run or not complete: alpha-s2, alpha-s3, sc_majority-s3." in text


CKPT = repro_rl.PLANS["gc8-ckpt"]


def with_points(rd: Path, points: list[tuple[int, float, float, float]]) -> Path:
    """Give a fake cell its GRPO stage's evaluation points (done.json's history): per point (step,
    the outcome term's mean since the previous point, a_r, a_p)."""
    hist = [{"step": s, "reasoning": r, "perception": p, "n": N, "reward_window": {"reward": o, "outcome": o}} for s, o, r, p in points]
    (rd / "stages" / "rl").mkdir(parents=True, exist_ok=True)
    (rd / "stages" / "rl" / "done.json").write_text(json.dumps({"history": hist}))
    return rd


@pytest.mark.parametrize(
    ("gaps", "expected"),
    [
        ([0.5, 0.6, 0.55], "reproduced"),
        ([0.5, 0.6, 0.55, -0.1, 0.52], "reproduced"),  # 4 of 5 positive (at least 2/3), the interval above 0
        ([0.5, 0.6, 0.55, -0.9, 0.52], "direction only (interval includes 0)"),
        ([0.9, 0.5, -0.4], "direction only (interval includes 0)"),
        ([1.2, -0.1, -0.2, -0.1, -0.1], "direction only (interval includes 0; 1 of 5 seeds above 0)"),
        ([0.2, -0.5, 0.1], "not reproduced"),
        ([0.5, None, 0.6], "no verdict (2 seeds with both r defined)"),
    ],
)
def test_ckpt_verdict_is_session_9_s_rule(gaps: list[float | None], expected: str) -> None:
    assert repro_rl.ckpt_verdict(gaps) == expected


def test_gc8_ckpt_plan_reads_f3_across_checkpoints_with_its_rule_and_the_pilot_beside_it(tmp_path: Path) -> None:
    """Session 9: the cells' `term_corr_ckpt` gap gets the pre-registered verdict over the plan's seeds; the
    pilot seed (a finished cell of the same spec) is shown in the points table and a descriptive mean only."""
    runs = tmp_path / "runs"
    pts = [(4, 0.40, 0.80, 0.40), (8, 0.45, 0.82, 0.38), (12, 0.35, 0.78, 0.41), (16, 0.42, 0.81, 0.39)]
    for s, (rr, rp) in zip((1, 2, 3, 4), ((0.9, 0.95), (0.8, 0.1), (0.7, -0.2), (0.9, 0.3))):
        diag = coupling(
            0.6, 0.3, **{"term_corr_ckpt/outcome/reasoning": rr, "term_corr_ckpt/outcome/perception": rp, "term_corr_ckpt_points": 4}
        )
        with_points(fake_cell(runs, "outcome", s, mask(10), mask(8), diag, CKPT), pts)
    text = repro_rl.report(tmp_path, ["outcome"], [2, 3, 4], CKPT).read_text()
    f3 = json.loads((tmp_path / "report.json").read_text())["f3"]["outcome"]
    assert f3["ckpt_gap"]["per_seed"] == pytest.approx([0.7, 0.9, 0.6])
    assert f3["ckpt_verdict"] == "reproduced" and "+0.700 / +0.900 / +0.600, mean +0.733 [" in text
    assert f3["ckpt_gap_with_pilots"]["seeds"] == [1, 2, 3, 4]
    assert f3["ckpt_gap_with_pilots"]["per_seed"] == pytest.approx([-0.05, 0.7, 0.9, 0.6])
    assert "With the pilot seed 1 (seen before the plan; descriptive): per seed -0.050," in text
    table = text.split("### The evaluation points", 1)[1]
    assert "| 1 (pilot) | 4 | 0.400 | 0.800 | 0.400 | 40 | 0.900 | 0.950 |" in table
    assert "| 3 | 16 | 0.420 | 0.810 | 0.390 | 40 |  |  |" in table
    assert "| outcome | 1 |" not in text and "| outcome | 2 |" in text  # the pilot is not one of the plan's cells
    assert f3["verdict"] == "reproduced"  # session 4's within-group rule still reads the plan's seeds


def with_items(rd: Path, first: int) -> Path:
    """The cell's records re-labelled as items `first`, `first + 1`, … of a test stream (their instances)."""
    recs = [json.loads(x) for x in (rd / "eval.jsonl").read_text().splitlines()]
    (rd / "eval.jsonl").write_text("".join(json.dumps({**r, "instance": {"graph": first + i}}) + "\n" for i, r in enumerate(recs)))
    return rd


def test_gc8_arm_minus_start_pairs_only_the_seeds_that_scored_the_starts_items(tmp_path: Path) -> None:
    """The start is evaluated on seed 1's test stream; seeds 2 and 3 score their own, under the same ids. They were
    paired with the start item by item all the same; now only seed 1 is, and the report says why."""
    runs = tmp_path / "runs"
    with_items(fake_cell(runs, "start", 1, mask(8), mask(10), coupling(0.5, 0.5), GC8), 0)
    for s in (1, 2, 3):
        with_items(fake_cell(runs, "outcome", s, mask(10 + s), mask(10), coupling(0.9, 0.3), GC8), 100 * (s - 1))
        with_items(fake_cell(runs, "alpha", s, mask(12), mask(12), coupling(0.8, 0.5), GC8), 100 * (s - 1))
    text = repro_rl.report(tmp_path, ["outcome", "alpha"], [1, 2, 3], GC8).read_text()
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["vs_start"]["outcome"]["a"]["seeds"] == [1] and data["vs_start"]["outcome"]["a"]["per_seed"] == pytest.approx([3 / N])
    assert "seeds 2, 3 drew other test items under the same ids: not paired" in text
    assert data["paired"]["alpha"]["a"]["seeds"] == [1, 2, 3]  # arms of one seed share their items


def test_f3_within_group_r_of_exactly_zero_is_a_value_not_missing(tmp_path: Path) -> None:
    """`r or nan` read an r of exactly 0.0 as undefined: the seed's gap became NaN and F3 not reproduced."""
    runs = tmp_path / "runs"
    for s, r_perc in zip((1, 2, 3), (0.0, 0.2, 0.3)):
        fake_cell(runs, "outcome", s, mask(10), mask(20), coupling(0.9, r_perc))
    repro_rl.report(tmp_path, ["outcome"], [1, 2, 3])
    f3 = json.loads((tmp_path / "report.json").read_text())["f3"]["outcome"]
    assert f3["within_gap"]["per_seed"] == pytest.approx([0.9, 0.7, 0.6]) and f3["verdict"] == "reproduced"


def test_seed_stats_is_a_t_interval_for_any_number_of_seeds() -> None:
    from scipy import stats

    xs = [0.1, 0.3, 0.2, 0.25, 0.15, 0.4, 0.35]  # 7 seeds: df 6 was not in the quantile table
    m, lo, hi = repro_rl.seed_stats(xs)
    want = stats.t.interval(0.95, len(xs) - 1, loc=np.mean(xs), scale=stats.sem(xs))
    assert (lo, hi) == (pytest.approx(want[0], rel=1e-3), pytest.approx(want[1], rel=1e-3))  # t to 3 decimals


def strict_json(text: str) -> object:
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_f3_with_an_undefined_r_is_no_verdict_and_report_json_stays_json(tmp_path: Path) -> None:
    """A seed whose within-group r is undefined (perception correctness, or the outcome term, constant within
    every group: the runtime logs None) made that seed's gap NaN: `NaN > 0` is false, so F3 read "not reproduced"
    on a seed that measured nothing, and report.json held `NaN`, which is not JSON. Now F3 gives no verdict
    ("undefined: ...", neither reproduced nor not), the seed's gap is null and the Markdown shows it as –."""
    runs = tmp_path / "runs"
    for s, r_perc in zip((1, 2, 3), (0.2, None, 0.3)):
        fake_cell(runs, "outcome", s, mask(10), mask(20), coupling(0.9, r_perc, constant_group_frac_before=None))
    text = repro_rl.report(tmp_path, ["outcome"], [1, 2, 3]).read_text()
    f3 = strict_json((tmp_path / "report.json").read_text())["f3"]["outcome"]
    assert f3["within_gap"]["per_seed"] == [pytest.approx(0.7), None, pytest.approx(0.6)]
    assert f3["verdict"].startswith("undefined: ") and "reproduced" not in f3["verdict"], f3["verdict"]
    assert "seed 2" in f3["verdict"] and "constant" in f3["verdict"], f3["verdict"]
    assert f"**{f3['verdict']}**" in text and "nan" not in text.lower()
