"""benchmarks/repro.py's report: paired differences computed item by item from the cells' records,
the pre-registered verdict, and the check that summary.json agrees with its eval.jsonl."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import repro  # noqa: E402

N = 40


def fake_cell(
    runs: Path,
    cell: repro.Cell,
    outcome: list[bool],
    perception: list[bool],
    reasoning: list[bool],
    eff_lambda: float = 0.05,
    share: float = 0.05,
    puzzles: int = 0,
    slot_errors: list[int] | None = None,
) -> Path:
    """A finished run directory as `percep run` leaves it: summary.json (with the final stage's per-slot errors), the
    final eval records (item i's puzzle, or graph, `puzzles + i`) and the training log (metrics.csv, with the effective
    λ the report's curve reads and perception's token share)."""
    rd = repro.run_dir(cell, runs)
    rd.mkdir(parents=True)
    (rd / "metrics.csv").write_text(f"stage,eff_lambda,step,token_share/perception\npost,{eff_lambda},9,{share}\n")
    recs = [
        {
            "stage": "post",
            "final": True,
            "id": f"graph_coloring/test/{i}",
            "outcome": o,
            "perception_exact": p,
            "cf_outcome": r,
            "instance": {"puzzle": puzzles + i, "edges": puzzles + i},
        }
        for i, (o, p, r) in enumerate(zip(outcome, perception, reasoning))
    ]
    (rd / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    final = {"end_to_end": float(np.mean(outcome)), "perception": float(np.mean(perception)), "reasoning": float(np.mean(reasoning))}
    summary = {
        "experiment": rd.name.rsplit("-", 1)[0],
        "status": "complete",
        "seed": cell.seed,
        "params": {},
        "final": final,
        "final_stage": "post",
        "stages": {"post": {"train_seconds": 60.0, "slot_errors": slot_errors}},
    }
    (rd / "summary.json").write_text(json.dumps(summary))
    return rd


def mask(k: int) -> list[bool]:
    return [i < k for i in range(N)]


def test_paired_differences_and_verdict(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    # seeds 1-3: lam answers k more items right than tm, on the same items (paired)
    for s, (tm_k, lam_k) in zip((1, 2, 3), ((10, 20), (12, 18), (15, 16))):
        fake_cell(runs, repro.Cell(repro.SPECS / "gc_tm.pd", s, ""), mask(tm_k), mask(0), mask(30))
        fake_cell(runs, repro.Cell(repro.SPECS / "gc_lam.pd", s, ""), mask(lam_k), mask(lam_k), mask(28))
    text = repro.report(tmp_path, ["tm", "lam"], [1, 2, 3]).read_text()
    data = json.loads((tmp_path / "report.json").read_text())
    d = data["paired"]["lam"]["a"]
    assert d["per_seed"] == pytest.approx([10 / N, 6 / N, 1 / N])
    assert d["mean"] == pytest.approx(17 / (3 * N)) and d["n_pairs"] == 3 * N
    assert 0 < d["lo"] < d["mean"] < d["hi"]
    assert data["paired"]["lam"]["a_r"]["mean"] == pytest.approx(-2 / N)
    assert "| lam | a | 1,2,3 | 120 | +0.142 |" in text and "reproduced" in text
    # the framework's paired table of the same records agrees on the mean
    assert "| experiment=repro_gc_lam | a | 3 | +0.142 |" in text
    assert (tmp_path / "paired.png").stat().st_size > 0 and (tmp_path / "arms.png").stat().st_size > 0


def test_no_effect_is_not_reproduced(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for s in (1, 2, 3):
        fake_cell(runs, repro.Cell(repro.SPECS / "gc_tm.pd", s, ""), mask(10), mask(0), mask(30))
        fake_cell(runs, repro.Cell(repro.SPECS / "gc_lam.pd", s, ""), mask(10 - s), mask(5), mask(30))
    repro.report(tmp_path, ["tm", "lam"], [1, 2, 3])
    d = json.loads((tmp_path / "report.json").read_text())["paired"]["lam"]["a"]
    assert d["mean"] < 0 and repro.verdict(d) == "not reproduced"


def test_summary_that_disagrees_with_its_records_is_refused(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    rd = fake_cell(runs, repro.Cell(repro.SPECS / "gc_tm.pd", 1, ""), mask(10), mask(0), mask(30))
    summary = json.loads((rd / "summary.json").read_text())
    summary["final"]["end_to_end"] = 0.9
    (rd / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(SystemExit, match="eval.jsonl gives 0.25"):
        repro.report(tmp_path, ["tm"], [1])


def fake_base(
    out: Path, prefix: str, perception: list[bool], reasoning: list[bool], task: str = "graph_coloring", puzzles: int | None = None
) -> None:
    """The shared base stage the arms start from (`<out>/<prefix>_base`): done.json and its last evaluation,
    items `<task>/test/<i>` (with ``puzzles``, item i's instance is puzzle `puzzles + i`, as `fake_cell` writes it)."""
    stage = out / f"{prefix}_base"
    stage.mkdir(parents=True)
    recs = [
        {"id": f"{task}/test/{i}", "outcome": p and r, "perception_exact": p, "cf_outcome": r}
        | ({"instance": {"puzzle": puzzles + i, "edges": puzzles + i}} if puzzles is not None else {})
        for i, (p, r) in enumerate(zip(perception, reasoning))
    ]
    (stage / "eval-000100.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    metrics = {
        "end_to_end": float(np.mean([r["outcome"] for r in recs])),
        "perception": float(np.mean(perception)),
        "reasoning": float(np.mean(reasoning)),
    }
    (stage / "done.json").write_text(json.dumps({"metrics": metrics, "train_seconds": 600.0}))


def test_plan_p8_reads_its_own_cells_and_f1_gap(tmp_path: Path) -> None:
    """`--plan p8` reports the gc8 cells (not session 2's gc ones) and F1: token mean from the base
    raises a_r by 0.25 and a_p by 0.5 here, so Δa_r − Δa_p = −0.25 and F1 is not reproduced."""
    runs = tmp_path / "runs"
    fake_base(tmp_path, "gc8", mask(0), mask(20))
    for s in (1, 2, 3):
        fake_cell(runs, repro.Cell(repro.SPECS / "gc8_tm.pd", s, ""), mask(10), mask(20), mask(30))
        fake_cell(runs, repro.Cell(repro.SPECS / "gc_tm.pd", s, ""), mask(40), mask(40), mask(40))  # another plan's cell
    text = repro.report(tmp_path, ["tm"], [1, 2, 3], "gc8").read_text()
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["cells"]["tm-s1"]["a"] == pytest.approx(0.25)
    f1 = data["f1"]
    assert f1["per_seed"] == pytest.approx([-0.25] * 3) and f1["mean"] == pytest.approx(-0.25)
    assert f1["lo"] < -0.25 < f1["hi"] < 0
    assert "(a_r ≥ 0.6, a_p ≤ 0.2): **no-go" in text  # the base's a_r is 0.5
    # outside the pre-registered regime the rule's reading is shown, never as a verdict (the headline copies report.json)
    assert (
        "`--plan p8`" in text
        and "F1 rule (Δa_r − Δa_p > 0, interval excluding 0): **none: base no-go (the rule would read: not reproduced)**" in text
    )
    assert data["f1_verdict"] == "none: base no-go (the rule would read: not reproduced)"


def test_arms_from_a_no_go_base_get_no_f2_verdict(tmp_path: Path) -> None:
    """The base's go/no-go is read from the base, in both the p8 and the p8-500 report (the latter said "go"
    whatever the base): from a no-go base, an arm that the rule would call reproduced gets no verdict, in the
    table and in report.json; from a go base it does."""
    runs = tmp_path / "runs"
    for s in (1, 2, 3):
        fake_cell(runs, repro.Cell(repro.SPECS / "gc8_tm.pd", s, ""), mask(10), mask(0), mask(30))
        fake_cell(runs, repro.Cell(repro.SPECS / "gc8_ngdiff.pd", s, ""), mask(30), mask(30), mask(30))
    for a_r, verdict in (
        (mask(20), "none: base no-go (the rule would read: exploratory: reproduced)"),
        (mask(30), "exploratory: reproduced"),
    ):
        shutil.rmtree(tmp_path / "gc8_base", ignore_errors=True)
        fake_base(tmp_path, "gc8", mask(0), a_r)  # a_r 0.5 (no-go), then 0.75 (go)
        text = repro.report(tmp_path, ["tm", "ngdiff"], [1, 2, 3], "gc8").read_text()
        assert json.loads((tmp_path / "report.json").read_text())["paired"]["ngdiff"]["a"]["verdict"] == verdict
        assert f"| {verdict} |" in text
    s3, out = tmp_path / "s3", tmp_path / "s4"
    for s in (1, 2, 3):
        with_weights_and_lambda(
            fake_cell(s3 / "runs", repro.Cell(repro.SPECS / "gc8_tm.pd", s, ""), mask(10), mask(0), mask(30)), "post", 1.0, 0.04
        )
        fake_reeval(out, s3, "tm", s, mask(10), mask(0), mask(30), 1.0)
        new = fake_cell(out / "runs", repro.Cell(repro.SPECS / "gc8_lamsched.pd", s, ""), mask(30), mask(30), mask(30))
        with_weights_and_lambda(new, "post", 3.0, 0.3)
    fake_base(out, "gc8", mask(0), mask(20))
    text = repro.report_500(out, ["tm", "lamsched"], [1, 2, 3]).read_text()
    assert "(a_r ≥ 0.6, a_p ≤ 0.2): **no-go" in text and "go/no-go: go" not in text
    assert "| none: base no-go (the rule would read: reproduced) |" in text


def test_a_late_arm_gets_no_verdict_below_three_seeds(tmp_path: Path) -> None:
    """NGDiff was added to the p8 plan by an amendment: with 2 seeds its F2 row says so instead of a verdict."""
    runs = tmp_path / "runs"
    for s in (1, 2):
        fake_cell(runs, repro.Cell(repro.SPECS / "gc8_tm.pd", s, ""), mask(10), mask(0), mask(30))
        fake_cell(runs, repro.Cell(repro.SPECS / "gc8_ngdiff.pd", s, ""), mask(30), mask(30), mask(30))
    text = repro.report(tmp_path, ["tm", "ngdiff"], [1, 2], "gc8").read_text()
    assert "| ngdiff | a | 1,2 | 80 | +0.500 |" in text and "exploratory (< 3 seeds: no verdict)" in text
    assert "| reproduced |" not in text


def test_the_confirmatory_seeds_get_a_plain_verdict(tmp_path: Path) -> None:
    """Only NGDiff's seeds 1-3 were run after other results were seen: the same arm on the fresh
    seeds 4-6 (pre-registered before they ran) is judged by the F2 rule with no exploratory label."""
    runs = tmp_path / "runs"
    for s in (4, 5, 6):
        fake_cell(runs, repro.Cell(repro.SPECS / "gc8_tm.pd", s, ""), mask(10), mask(0), mask(30))
        fake_cell(runs, repro.Cell(repro.SPECS / "gc8_ngdiff.pd", s, ""), mask(30), mask(30), mask(30))
    text = repro.report(tmp_path, ["tm", "ngdiff"], [4, 5, 6], "gc8").read_text()
    assert "| ngdiff | a | 4,5,6 | 120 | +0.500 |" in text and "| reproduced |" in text
    assert "exploratory" not in text


def test_plan_p8_500_order_is_the_preregistered_priority() -> None:
    """Session 4: the tm re-evaluation and NGDiff-auto interleaved by seed first, then the scheduled λ, ..."""
    arms = [a for group in repro.PRIORITY["p8-500"] for a in group]
    order = repro.start_order("p8-500", arms, [1, 2])
    assert order[:4] == [("tm", 1), ("ngdiff_auto", 1), ("tm", 2), ("ngdiff_auto", 2)]
    assert order[4:6] == [("lamsched", 1), ("lamsched", 2)] and order[-1] == ("lam75", 2)
    assert repro.start_order("p8-500", ["lam", "tm"], [1]) == [("tm", 1), ("lam", 1)]


def test_a_reevaluation_cell_names_its_source_weights(tmp_path: Path) -> None:
    """`--plan p8-500` re-evaluates a session-3 cell through a generated spec: experiment
    repro_gc8_<arm>_eval500, the cell's seed, `model hf` at the cell's final weights, and the
    shared one-step lr-0 fragment; the spec checks and is written once."""
    src = fake_cell(tmp_path / "s3" / "runs", repro.Cell(repro.SPECS / "gc8_tm.pd", 2, ""), mask(10), mask(0), mask(30))
    out = tmp_path / "s4"
    cell = repro.eval_cell("tm", 2, out, tmp_path / "s3")
    text = cell.spec.read_text()
    assert f'model hf "{src}/stages/post/model"' in text and "seed 2" in text and "gc8_eval500.pd" in text
    rd = repro.run_dir(cell, out / "runs")
    assert rd.name.startswith("repro_gc8_tm_eval500-") and cell.seed == 2
    assert repro.eval_cell("tm", 2, out, None).spec.read_text() == text  # written once, no source needed again
    with pytest.raises(SystemExit, match="no finished cell lam-s2"):
        repro.eval_cell("lam", 2, out, tmp_path / "s3")


def test_no_cell_starts_after_the_cut_off(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cell = repro.Cell(repro.SPECS / "gc8_tm.pd", 1, "tm-s1")
    assert repro.run_cells([cell], tmp_path, jobs=1, start_by=0.0) == []
    assert "cut-off 1970-01-01 00:00 UTC passed: not started: tm-s1" in capsys.readouterr().out
    assert not (tmp_path / "logs" / "tm-s1.log").exists()


def with_weights_and_lambda(rd: Path, stage: str, value: float, eff_lambda: float) -> Path:
    """Give a fake cell saved weights (one tensor) and a metrics.csv with its effective λ."""
    import torch
    from safetensors.torch import save_file

    (rd / "stages" / stage / "model").mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.full((2, 2), value)}, rd / "stages" / stage / "model" / "model.safetensors")
    (rd / "metrics.csv").write_text(f"stage,eff_lambda,step\n{stage},{eff_lambda},9\n{stage},,10\n{stage},{eff_lambda},19\n")
    return rd


def fake_reeval(
    out: Path, s3: Path, arm: str, seed: int, outcome: list[bool], perception: list[bool], reasoning: list[bool], value: float
) -> Path:
    """A finished 500-item re-evaluation of session 3's (arm, seed) cell, as `percep run` of its generated spec leaves it."""
    cell = repro.eval_cell(arm, seed, out, s3)
    rd = fake_cell(out / "runs", cell, outcome, perception, reasoning)
    src = repro.find_run(repro.Cell(repro.SPECS / f"gc8_{arm}.pd", seed, ""), s3 / "runs")
    (rd / "ir.json").write_text(json.dumps({"ir": {"model": {"path": str(src / "stages" / "post" / "model")}}}))
    with_weights_and_lambda(rd, "post", value, float("nan"))
    return rd


def test_plan_p8_500_report(tmp_path: Path) -> None:
    """The 500-item report: the re-evaluated tm and lam (weights checked against their session-3
    cells, items 1-200 compared with the 200-item records) and a new arm, each against tm's
    re-evaluation; session 3's 200-item differences beside; the curve at each arm's effective λ."""
    s3, out = tmp_path / "s3", tmp_path / "s4"
    n200 = 20  # session 3 scored the first half of the items
    for s in (1, 2, 3):
        src_tm = fake_cell(s3 / "runs", repro.Cell(repro.SPECS / "gc8_tm.pd", s, ""), mask(10)[:n200], mask(0)[:n200], mask(30)[:n200])
        src_lam = fake_cell(s3 / "runs", repro.Cell(repro.SPECS / "gc8_lam.pd", s, ""), mask(8)[:n200], mask(20)[:n200], mask(8)[:n200])
        with_weights_and_lambda(src_tm, "post", 1.0, 0.04)
        with_weights_and_lambda(src_lam, "post", 2.0, 0.5)
        fake_reeval(out, s3, "tm", s, mask(10), mask(0), mask(30), 1.0)
        # lam's re-evaluation: other weights than its source in seed 3, and item 0 scored differently in seed 2
        fake_reeval(
            out,
            s3,
            "lam",
            s,
            [False] + mask(8)[1:] if s == 2 else mask(8),
            mask(20),
            mask(8),
            2.0 if s != 3 else 9.0,
        )
        new = fake_cell(out / "runs", repro.Cell(repro.SPECS / "gc8_ngdiff_auto.pd", s, ""), mask(20 + s), mask(30), mask(25))
        with_weights_and_lambda(new, "post", 3.0, 0.4)
        # ngdiff: its re-evaluation's spec was written, the cell never ran; session 3's 200 items stand in
        src_ngd = fake_cell(
            s3 / "runs", repro.Cell(repro.SPECS / "gc8_ngdiff.pd", s, ""), mask(18)[:n200], mask(20)[:n200], mask(18)[:n200]
        )
        with_weights_and_lambda(src_ngd, "post", 4.0, 0.3)
        repro.eval_cell("ngdiff", s, out, s3)
    text = repro.report_500(out, ["tm", "ngdiff_auto", "lam", "ngdiff", "lamsched"], [1, 2, 3]).read_text()
    data = json.loads((out / "report.json").read_text())
    assert data["paired"]["ngdiff_auto"]["a"]["per_seed"] == pytest.approx([11 / N, 12 / N, 13 / N])
    assert "| ngdiff_auto | a | 1,2,3 | 120 |" in text and "| reproduced |" in text
    checks = data["reevaluation_checks"]
    assert checks["lam-s1"]["same_weights"] and not checks["lam-s3"]["same_weights"] and "| **NO** |" in text
    assert checks["tm-s1"]["agreement"] == 1.0 and checks["lam-s2"]["agreement"] == pytest.approx(1 - 1 / n200)
    # session 3's 200-item differences of lam beside its 500-item row
    assert data["paired_200"]["lam"]["a"]["per_seed"] == pytest.approx([-2 / n200] * 3)
    assert "(seeds 1,2,3) |" in text
    assert data["curve"]["tm"]["eff_lambda"] == pytest.approx(0.04) and data["curve"]["ngdiff_auto"]["eff_lambda"] == pytest.approx(0.4)
    assert (out / "curve.png").stat().st_size > 0 and (out / "paired.png").stat().st_size > 0
    assert "lamsched-s1, lamsched-s2, lamsched-s3" in text and "ngdiff-s1" in text  # not run: listed
    # NGDiff with vs without automatic lr, on the 200 items both scored; descriptive
    auto = data["ngdiff_auto_vs_ngdiff"]["ngdiff_auto"]["a"]
    assert auto["n_pairs"] == 3 * n200 and auto["per_seed"] == pytest.approx([2 / n200] * 3)  # items 1-20: all right vs 18
    # (the 200-item cells scored the first half of the 500-item cells' items: the table names the items left unpaired)
    assert "| ngdiff_auto | a | 1,2,3 (items not in both cells: seed 1: 20 pairs of 40 / 20 items;" in text
    assert "seed 3: 20 pairs of 40 / 20 items) | 60 |" in text and "none (descriptive)" in text
    assert data["curve_200"]["ngdiff"]["eff_lambda"] == pytest.approx(0.3) and "| ngdiff | not run | 0.300 |" in text


def test_plan_p8_500_gives_no_verdict_below_three_seeds(tmp_path: Path) -> None:
    s3, out = tmp_path / "s3", tmp_path / "s4"
    for s in (1, 2):
        with_weights_and_lambda(
            fake_cell(s3 / "runs", repro.Cell(repro.SPECS / "gc8_tm.pd", s, ""), mask(10), mask(0), mask(30)), "post", 1.0, 0.04
        )
        fake_reeval(out, s3, "tm", s, mask(10), mask(0), mask(30), 1.0)
        new = fake_cell(out / "runs", repro.Cell(repro.SPECS / "gc8_lamsched.pd", s, ""), mask(30), mask(30), mask(30))
        with_weights_and_lambda(new, "post", 3.0, 0.3)
    text = repro.report_500(out, ["tm", "lamsched"], [1, 2, 3]).read_text()
    assert "| lamsched | a | 1,2 | 80 | +0.500 |" in text and "2 of 3 seeds: no verdict" in text and "| reproduced |" not in text


def test_the_confirmatory_seeds_are_judged_apart_at_500_items(tmp_path: Path) -> None:
    """Session 5: tm and ngdiff seeds 4-6 (session 3's confirmatory cells, their own source folder)
    re-evaluated on 500 items get their own F2 verdict, never pooled with the exploratory seeds 1-3,
    with their 200-item result beside; lam25/lam75 join the F2 table and the λ curve."""
    s3, confirm, out = tmp_path / "s3", tmp_path / "confirm", tmp_path / "s4"
    n200 = 20
    for s in (1, 2, 3):
        src = fake_cell(s3 / "runs", repro.Cell(repro.SPECS / "gc8_tm.pd", s, ""), mask(10)[:n200], mask(0)[:n200], mask(30)[:n200])
        with_weights_and_lambda(src, "post", 1.0, 0.04)
        fake_reeval(out, s3, "tm", s, mask(10), mask(0), mask(30), 1.0)
        src = fake_cell(s3 / "runs", repro.Cell(repro.SPECS / "gc8_ngdiff.pd", s, ""), mask(5)[:n200], mask(5)[:n200], mask(5)[:n200])
        with_weights_and_lambda(src, "post", 2.0, 0.3)
        fake_reeval(out, s3, "ngdiff", s, mask(5), mask(5), mask(5), 2.0)  # seeds 1-3: ngdiff worse than tm
        for arm, k, lam in (("lam25", 12, 0.25), ("lam75", 8, 0.75)):
            new = fake_cell(out / "runs", repro.Cell(repro.SPECS / f"gc8_{arm}.pd", s, ""), mask(k), mask(30), mask(k))
            with_weights_and_lambda(new, "post", 3.0, lam)
    for s in (4, 5, 6):  # the confirmatory cells: ngdiff 10 / 8 / 12 items above tm; items 1-20 as at 200
        src = fake_cell(confirm / "runs", repro.Cell(repro.SPECS / "gc8_tm.pd", s, ""), mask(10)[:n200], mask(0)[:n200], mask(30)[:n200])
        with_weights_and_lambda(src, "post", 1.0, 0.04)
        fake_reeval(out, confirm, "tm", s, mask(10), mask(0), mask(30), 1.0)
        k = {4: 20, 5: 18, 6: 22}[s]
        src = fake_cell(confirm / "runs", repro.Cell(repro.SPECS / "gc8_ngdiff.pd", s, ""), mask(k)[:n200], mask(30)[:n200], mask(k)[:n200])
        with_weights_and_lambda(src, "post", 2.0, 0.3)
        fake_reeval(out, confirm, "ngdiff", s, mask(k), mask(30), mask(k), 2.0)
    text = repro.report_500(out, ["tm", "lam", "ngdiff", "lam25", "lam75"], [1, 2, 3]).read_text()
    data = json.loads((out / "report.json").read_text())
    assert data["paired"]["ngdiff"]["a"]["per_seed"] == pytest.approx([-5 / N] * 3)  # seeds 1-3 only
    conf = data["confirmatory"]["paired"]["ngdiff"]["a"]
    assert conf["seeds"] == [4, 5, 6] and conf["n_pairs"] == 3 * N
    assert conf["per_seed"] == pytest.approx([10 / N, 8 / N, 12 / N]) and conf["lo"] > 0
    assert conf["verdict"] == "reproduced"  # in report.json too, for the one-command headline (benchmarks/reproduce.py)
    # the 200-item result of the same cells: items 1-20, where ngdiff has 10 / 8 / 10 more right
    assert data["confirmatory"]["paired_200"]["ngdiff"]["a"]["per_seed"] == pytest.approx([10 / n200, 8 / n200, 10 / n200])
    block = text.split("## Confirmatory F2 on 500 items")[1].split("\n## ")[0]
    assert "| ngdiff | a | 4,5,6 | 120 | +0.250 |" in block and "| reproduced |" in block and "exploratory" not in block
    assert "(seeds 4,5,6) |" in block and "ngdiff-s6 1.000 of 20" in block and "Left out" not in block
    assert data["paired"]["lam25"]["a"]["per_seed"] == pytest.approx([2 / N] * 3)
    assert "| lam25 | a | 1,2,3 | 120 | +0.050 |" in text and "| lam75 | a | 1,2,3 | 120 | -0.050 |" in text
    curve = [line.split(" | ")[0] for line in text.split("## The λ trade-off curve")[1].splitlines() if line.startswith("| ")][1:]
    assert curve == ["| tm", "| lam25", "| ngdiff", "| lam75"]  # by mean effective λ (lam: no cell, no spec)
    assert "Cells not run" in text and "lam-s1" in text and "tm-s4" not in text.split("Cells not run")[1]


def test_a_confirmatory_reevaluation_with_other_weights_is_left_out(tmp_path: Path) -> None:
    confirm, out = tmp_path / "confirm", tmp_path / "s4"
    for s in (4, 5, 6):
        for arm, k, value in (("tm", 10, 1.0), ("ngdiff", 30, 2.0)):
            src = fake_cell(confirm / "runs", repro.Cell(repro.SPECS / f"gc8_{arm}.pd", s, ""), mask(k), mask(k), mask(k))
            with_weights_and_lambda(src, "post", value, 0.1)
            fake_reeval(out, confirm, arm, s, mask(k), mask(k), mask(k), 7.0 if (arm, s) == ("ngdiff", 6) else value)
    text = repro.report_500(out, ["tm", "ngdiff"], [1, 2, 3]).read_text()
    data = json.loads((out / "report.json").read_text())
    assert data["confirmatory"]["excluded"] == ["ngdiff-s6"]
    assert data["confirmatory"]["paired"]["ngdiff"]["a"]["seeds"] == [4, 5]
    assert "Left out (saved weights differ from the source's): ngdiff-s6." in text and "2 of 3 seeds: no verdict" in text
    assert data["paired"] == {}  # nothing on seeds 1-3


def test_plan_sudoku_order_go_and_paired_f1(tmp_path: Path) -> None:
    """Session 6 (`--plan sudoku`): tm/NGDiff seed-major before the λ arm; the sudoku base's own go/no-go; F1
    judged on the paired interval (the base and the arms score the same 500 items). Token mean raises a_p by
    0.5 and a_r by 0.25 on every seed: Δa_r − Δa_p = −0.25 for every item pair, so F1 is not reproduced."""
    assert repro.start_order("sudoku", ["tm", "ngdiff", "lam"], [1, 2]) == [
        ("tm", 1),
        ("ngdiff", 1),
        ("tm", 2),
        ("ngdiff", 2),
        ("lam", 1),
        ("lam", 2),
    ]
    assert repro.start_order("p8", ["tm", "lam"], [1, 2]) == [("tm", 1), ("lam", 1), ("tm", 2), ("lam", 2)]
    # session 7's arms come after session 6's nine cells (which keep their order), one arm's seeds at a time
    full = repro.start_order("sudoku", [a for g in repro.PRIORITY["sudoku"] for a in g], [1, 2, 3])
    assert full[:9] == repro.start_order("sudoku", ["tm", "ngdiff", "lam"], [1, 2, 3])
    assert full[9:] == [(a, s) for a in ("lam25", "lam75", "ngdiff_auto", "lamsched") for s in (1, 2, 3)]
    assert all((repro.SPECS / f"sudoku_{a}.pd").exists() for a, _ in full)
    runs = tmp_path / "runs"
    fake_base(tmp_path, "sudoku", mask(0), mask(14))  # a_r 0.35, a_p 0: go
    for s in (1, 2, 3):
        fake_cell(runs, repro.Cell(repro.SPECS / "sudoku_tm.pd", s, ""), mask(10), mask(20), mask(24))
        fake_cell(runs, repro.Cell(repro.SPECS / "sudoku_ngdiff.pd", s, ""), mask(10 + s), mask(30), mask(24))
    text = repro.report(tmp_path, ["tm", "ngdiff"], [1, 2, 3], "sudoku").read_text()
    data = json.loads((tmp_path / "report.json").read_text())
    assert "`--plan sudoku`, sudoku 4×4" in text and "(a_r ≥ 0.3, a_p ≤ 0.2): **go**" in text
    pairs = data["f1_paired"]
    assert pairs["a_p"]["mean"] == pytest.approx(0.5) and pairs["a_r"]["mean"] == pytest.approx(0.25)
    assert pairs["gap"]["mean"] == pytest.approx(-0.25) and pairs["gap"]["hi"] < 0
    assert "**not reproduced** (the paired interval)" in text
    d = data["paired"]["ngdiff"]["a"]
    assert d["per_seed"] == pytest.approx([1 / N, 2 / N, 3 / N]) and "| ngdiff | a | 1,2,3 | 120 | +0.050 |" in text
    # an arm with fewer than 3 finished seeds gets its intervals and no verdict (the session-6 rule)
    text = repro.report(tmp_path, ["tm", "ngdiff"], [1, 2], "sudoku").read_text()
    assert "| ngdiff | a | 1,2 | 80 |" in text and "2 of 3 seeds: no verdict" in text


def test_plan_sudoku_rest_of_f2_auto_lr_curve_and_unfinished_cells(tmp_path: Path) -> None:
    """Session 7 (`--plan sudoku`, all seven arms): NGDiff with vs without automatic lr paired per item, the λ curve
    (each arm at its mean effective λ, sorted by it; the fixed-λ arms joined, the others apart) through the same
    code as the graph-colouring report, and a cut-off's leftovers: `lamsched` has seed 1 finished, seed 2 started
    and stopped (a run directory without summary.json), seed 3 not run."""
    runs = tmp_path / "runs"
    fake_base(tmp_path, "sudoku", mask(0), mask(14))
    arms = [a for g in repro.PRIORITY["sudoku"] for a in g]
    # arm: (items right on a, on a_p, the effective λ its training logged)
    made = {"tm": (10, 1, 0.047), "lam25": (12, 8, 0.25), "lam": (14, 12, 0.5), "lam75": (8, 30, 0.75)}
    made |= {"ngdiff": (20, 28, 0.24), "ngdiff_auto": (22, 30, 0.28), "lamsched": (11, 10, 0.3)}
    for arm, (k_a, k_p, lam) in made.items():
        for s in (1,) if arm == "lamsched" else (1, 2, 3):
            cell = repro.Cell(repro.SPECS / f"sudoku_{arm}.pd", s, "")
            fake_cell(runs, cell, mask(k_a + (s if arm == "ngdiff_auto" else 0)), mask(k_p), mask(24), eff_lambda=lam)
    repro.run_dir(repro.Cell(repro.SPECS / "sudoku_lamsched.pd", 2, ""), runs).mkdir()  # stopped at the cut-off
    text = repro.report(tmp_path, arms, [1, 2, 3], "sudoku").read_text()
    data = json.loads((tmp_path / "report.json").read_text())
    auto = data["ngdiff_auto_vs_ngdiff"]["ngdiff_auto"]["a"]
    assert auto["per_seed"] == pytest.approx([3 / N, 4 / N, 5 / N]) and auto["seeds"] == [1, 2, 3]
    assert "## NGDiff with vs without automatic lr" in text and "| ngdiff_auto | a | 1,2,3 | 120 | +0.100 |" in text
    curve = data["curve"]
    assert set(curve) == set(made) and curve["lam75"]["a_p"] == pytest.approx(30 / N)
    assert curve["ngdiff_auto"]["eff_lambda"] == pytest.approx(0.28) and curve["lamsched"]["seeds"] == [1]
    table = text.split("## The λ trade-off curve")[1].split("\n\n")[1].split("\n")
    assert [r.split(" | ")[0] for r in table[2:]] == [
        "| tm",
        "| ngdiff",
        "| lam25",
        "| ngdiff_auto",
        "| lamsched",
        "| lam",
        "| lam75",
    ]  # by mean eff. λ
    assert "| lam75 | 1,2,3 | 0.750 | 0.200 | 0.750 | 0.600 | -0.050 [" in text
    assert (tmp_path / "curve.png").stat().st_size > 0
    # the F2 rule per arm; lamsched has one seed: intervals, no verdict
    assert "| lamsched | a | 1 | 40 | +0.025 |" in text and "1 of 3 seeds: no verdict" in text
    assert "Cells started, not finished: lamsched-s2." in text and "Cells not run: lamsched-s3." in text


def test_plan_sudoku_trains_its_base_in_two_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --base-model, `--plan sudoku` trains sudoku_base.pd, links its stage where
    sudoku_base_more.pd's `model hf "sudoku_base1000/model"` finds it, trains that, and starts the arms
    from the continuation (`sudoku_base`). The cell runner is replaced by one that only makes the stage
    folders, so the order and the links are what is checked here, not training."""
    started: list[tuple[str, bool]] = []

    def fake_run_cells(cells: list[repro.Cell], out: Path, jobs: int, start_by: float | None = None, *, gate: bool = False) -> list[str]:
        for c in cells:
            started.append((c.label, gate))
            (repro.run_dir(c, out / "runs") / "stages" / "base").mkdir(parents=True)
        return []

    monkeypatch.setattr(repro, "run_cells", fake_run_cells)
    assert repro.main(["--quick", "--plan", "sudoku", "--out", str(tmp_path), "--arms", "tm", "--seeds", "1"]) == 0
    assert started == [("base", True), ("base_more", True), ("tm-s1", False)]  # the bases go before waiting arms
    first = repro.run_dir(repro.Cell(repro.SPECS / "sudoku_base.pd", None, ""), tmp_path / "runs")
    more = repro.run_dir(repro.Cell(repro.SPECS / "sudoku_base_more.pd", None, ""), tmp_path / "runs")
    assert (tmp_path / "sudoku_base1000").resolve() == first / "stages" / "base"
    assert (tmp_path / "sudoku_base").resolve() == more / "stages" / "base"
    assert 'model hf "sudoku_base1000/model"' in (repro.SPECS / "sudoku_base_more.pd").read_text()


def fake_level(out: Path, prefix: str, base_ar: int, share: float, gains: tuple[int, int, int], puzzles: int = 0) -> None:
    """One level of the verbosity sweep in its plan folder: the base (a_p 0, ``base_ar`` of N items right on a_r),
    then per seed `tm` right on items 0..9 and `ngdiff` on items 0..9+gain (a and a_p alike); token mean's effective λ is
    the share, NGDiff's 0.25."""
    fake_base(out, prefix, mask(0), mask(base_ar))
    for s, gain in zip((1, 2, 3), gains):
        tm = repro.Cell(repro.SPECS / f"{prefix}_tm.pd", s, "")
        fake_cell(out / "runs", tm, mask(10), mask(10), mask(24), eff_lambda=share, share=share, puzzles=puzzles)
        ng = repro.Cell(repro.SPECS / f"{prefix}_ngdiff.pd", s, "")
        fake_cell(out / "runs", ng, mask(10 + gain), mask(10 + gain), mask(24), eff_lambda=0.25, share=share, puzzles=puzzles)


def test_sweep_levels_are_session_6s_plan_but_for_the_reasoning_style() -> None:
    """Session 8's levels: `trace` and `brief` run session 6's two-part base (then amendment 1's third part) and its
    tm/ngdiff arms (specs that differ from `verbose`'s only in the task's `reasoning` and the names), seed-major."""
    for level in ("trace", "brief"):
        plan = repro.LEVELS[level]
        prefix = repro.PLANS[plan]
        assert repro.start_order(plan, ["tm", "ngdiff"], [1, 2]) == [("tm", 1), ("ngdiff", 1), ("tm", 2), ("ngdiff", 2)]
        assert repro.BASES[prefix] == (
            ("base", f"{prefix}_base1000"),
            ("base_more", f"{prefix}_base1500"),
            ("base_more2", f"{prefix}_base"),
        )
        assert repro.GO[prefix] == repro.GO["sudoku"] and repro.MIN_SEEDS[prefix] == 3
        for stem in ("base", "base_more", "tm", "ngdiff"):
            ours = (repro.SPECS / f"{prefix}_{stem}.pd").read_text().split("\nexperiment ", 1)[1]
            theirs = (repro.SPECS / f"sudoku_{stem}.pd").read_text().split("\nexperiment ", 1)[1]
            assert ours.replace(f"sudoku_{level}", "sudoku") == theirs
        task = (repro.SPECS / "common" / f"{prefix}_task.pd").read_text().split("include ", 1)[1]
        assert (
            task.replace(f"reasoning = {level}", "reasoning = verbose")
            == (repro.SPECS / "common/sudoku_task.pd").read_text().split("include ", 1)[1]
        )


def test_sweep_report_gap_against_share_and_trend(tmp_path: Path) -> None:
    """Three levels: `verbose` (share 0.05, NGDiff gains 20 items of 40 per seed), `trace` (0.17, 10) and `brief`
    (0.42, 2, but its base is no-go). The levels come in share order, `brief` is reported without a verdict and
    left out of the trend test, and the difference of gaps `trace` − `verbose` is −0.25 on a (items 20-29 of
    every seed), so the gap shrinks."""
    fake_level(tmp_path / "v", "sudoku", 14, 0.05, (20, 20, 20))
    fake_level(tmp_path / "t", "sudoku_trace", 16, 0.17, (10, 10, 10))
    fake_level(tmp_path / "b", "sudoku_brief", 4, 0.42, (2, 2, 2))
    levels = {"brief": tmp_path / "b", "verbose": tmp_path / "v", "trace": tmp_path / "t"}
    text = repro.sweep_report(levels, tmp_path / "sweep").read_text()
    data = json.loads((tmp_path / "sweep" / "report.json").read_text())
    assert [lv["level"] for lv in data["levels"]] == ["verbose", "trace", "brief"]
    assert [lv["share"] for lv in data["levels"]] == pytest.approx([0.05, 0.17, 0.42])
    assert [lv["go"] for lv in data["levels"]] == [True, True, False]
    assert data["levels"][1]["gap"]["a"]["mean"] == pytest.approx(0.25) and data["levels"][1]["gap"]["a"]["verdict"] == "reproduced"
    assert "| `brief` | `--plan sudoku-brief` | 0.420 | 0.000 / 0.000 / 0.100 | no-go | 0.420 / 0.250 |" in text
    assert "none: base no-go (the rule would read: reproduced)" in text and data["levels"][0]["eff_lambda"] == pytest.approx(
        {"tm": 0.05, "ngdiff": 0.25}
    )
    (d,) = data["differences"]
    assert (d["from"], d["to"], d["adjacent"]) == ("verbose", "trace", True)
    assert d["a"]["mean"] == pytest.approx(-0.25) and d["a"]["hi"] < 0 and d["a"]["n_pairs"] == 3 * N
    assert d["a_r"]["mean"] == 0 and data["trend"] == "the gap shrinks as the share grows"
    assert "over the go levels (`verbose`, `trace`), on a: **the gap shrinks as the share grows**" in text
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 0
    # a level whose last cell was stopped at the cut-off gets its intervals, no verdict and no place in the trend test
    (repro.run_dir(repro.Cell(repro.SPECS / "sudoku_trace_ngdiff.pd", 3, ""), tmp_path / "t" / "runs") / "summary.json").unlink()
    text = repro.sweep_report(levels, tmp_path / "sweep").read_text()
    assert "2 of 3 seeds: no verdict" in text and "`trace`: cells started, not finished: ngdiff-s3." in text
    assert "**no trend test (fewer than two go levels with 3 seeds of both arms)**" in text


def test_sweep_trend_rule() -> None:
    """The pre-registered trend test: the end-to-end difference of gaps decides, the adjacent ones its monotony."""

    def d(mean: float, lo: float, hi: float) -> dict[str, float]:
        return {"mean": mean, "lo": lo, "hi": hi}

    assert repro.trend_verdict(d(-0.2, -0.3, -0.1), [d(-0.1, -0.2, 0.01), d(-0.1, -0.2, 0.0)]) == "the gap shrinks as the share grows"
    assert repro.trend_verdict(d(-0.2, -0.3, -0.1), [d(0.05, -0.1, 0.2), d(-0.25, -0.3, -0.2)]) == "shrinks, not monotone"
    assert repro.trend_verdict(d(-0.05, -0.1, 0.01), [d(-0.05, -0.1, 0.01)]).startswith("no trend shown")
    assert repro.trend_verdict(d(0.1, 0.05, 0.15), [d(0.1, 0.05, 0.15)]) == "the gap grows"


def test_sweep_refuses_levels_with_other_test_puzzles(tmp_path: Path) -> None:
    """Levels pair item by item only if their test split is the same puzzles: another puzzle under an id stops the report."""
    fake_level(tmp_path / "v", "sudoku", 14, 0.05, (20, 20, 20))
    fake_level(tmp_path / "t", "sudoku_trace", 16, 0.17, (10, 10, 10), puzzles=1)
    with pytest.raises(SystemExit, match="has another `puzzle` at `verbose` than at `trace`"):
        repro.sweep_report({"verbose": tmp_path / "v", "trace": tmp_path / "t"}, tmp_path / "sweep")


def test_sweep_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`repro.py --sweep LEVEL=FOLDER,...` writes the sweep's report to --out and runs nothing; an unknown level is refused."""
    fake_level(tmp_path / "v", "sudoku", 14, 0.05, (20, 20, 20))
    fake_level(tmp_path / "b", "sudoku_brief", 16, 0.42, (0, 1, 0))
    assert repro.main(["--sweep", f"verbose={tmp_path / 'v'},brief={tmp_path / 'b'}", "--out", str(tmp_path / "sweep")]) == 0
    assert "**the gap shrinks as the share grows**" in capsys.readouterr().out
    assert json.loads((tmp_path / "sweep" / "report.json").read_text())["trend"] == "the gap shrinks as the share grows"
    with pytest.raises(SystemExit):
        repro.main(["--sweep", f"terse={tmp_path / 'v'}", "--out", str(tmp_path / "sweep")])
    assert "unknown level(s) ['terse']" in capsys.readouterr().err


def fake_edge_cell(folder: Path, arm: str, seed: int, k: int, slot_errors: list[int], graphs: int = 0) -> Path:
    """A finished 500-item edge-list cell of `--plan p8-500`'s folder (a re-evaluation, found by experiment and seed)."""
    rd = fake_cell(folder / "runs", repro.Cell(repro.SPECS / f"gc8_{arm}.pd", seed, ""), mask(k), mask(k), mask(30), puzzles=graphs)
    summary = json.loads((rd / "summary.json").read_text())
    summary["stages"]["post"]["slot_errors"] = slot_errors
    (rd / "summary.json").write_text(json.dumps(summary))
    return rd.rename(folder / "runs" / f"repro_gc8_{arm}_eval500-s{seed}")


def test_plan_p8_adj_base_continues_as_amendment_1_says() -> None:
    """Session 9 amendment 1: the fixed-slot base runs in two parts, the second (1,000 steps, cosine restarted at half
    the first part's peak) from the first part's weights on the same task, loss, batch and 200 evaluation items."""
    assert repro.BASES["gc8adj"] == (("base", "gc8adj_base1000"), ("base_more", "gc8adj_base"))
    first, more = ((repro.SPECS / f"gc8adj_{stem}.pd").read_text().split("\nexperiment ", 1)[1] for stem in ("base", "base_more"))
    assert 'model hf "gc8adj_base1000/model"' in more and "model tiny" in first
    assert "lr = cosine(1e-3, 0, warmup = 100)" in first and "lr = cosine(5e-4, 0, warmup = 100)" in more
    for line in ('include "common/gc8adj_task.pd"', "steps = 1000", "batch = 8", "loss = mean(reasoning, answer)", "eval { test = 200 }"):
        assert line in first and line in more


def test_plan_p8_adj_sets_the_two_formats_side_by_side(tmp_path: Path) -> None:
    """`--plan p8-adj` (session 9): the fixed-slot arms' F2 (no verdict below 3 seeds) beside the edge list's cells found
    under `--compare`, on the same seeds and on the confirmatory ones, the difference of the gaps item by item, and
    each cell's per-slot errors."""
    assert repro.PLANS["p8-adj"] == "gc8adj" and repro.GO["gc8adj"] == repro.GO["gc8"]
    assert repro.start_order("p8-adj", ["tm", "ngdiff"], [1, 2]) == [("tm", 1), ("ngdiff", 1), ("tm", 2), ("ngdiff", 2)]
    edges, out = tmp_path / "edges", tmp_path / "adj"
    for s, (tm_k, ng_k) in {1: (10, 22), 2: (12, 18), 4: (10, 14)}.items():
        fake_edge_cell(edges, "tm", s, tm_k, [0] * 12 + [7, 0, 3])
        fake_edge_cell(edges, "ngdiff", s, ng_k, [0] * 15)
    # fixed slots: seed 1 both arms (ngdiff 5 items more), seed 2 only tm (started, its pair not finished)
    fake_cell(out / "runs", repro.Cell(repro.SPECS / "gc8adj_tm.pd", 1, ""), mask(10), mask(10), mask(30), slot_errors=[0, 2] + [0] * 13)
    fake_cell(out / "runs", repro.Cell(repro.SPECS / "gc8adj_ngdiff.pd", 1, ""), mask(15), mask(15), mask(30), slot_errors=[0] * 15)
    fake_cell(out / "runs", repro.Cell(repro.SPECS / "gc8adj_tm.pd", 2, ""), mask(12), mask(12), mask(30), slot_errors=[0] * 15)
    text = repro.report(out, ["tm", "ngdiff"], [1, 2, 3], "gc8adj", compare=edges).read_text()
    data = json.loads((out / "report.json").read_text())
    assert data["paired"]["ngdiff"]["a"]["verdict"] == "1 of 3 seeds: no verdict"
    formats = data["formats"]
    assert formats["paired"]["fixed slots"]["a"]["mean"] == pytest.approx(5 / N) and formats["paired"]["fixed slots"]["a"]["seeds"] == [1]
    # the edge list on this plan's finished seeds only (its seed 2 pair is left out), and apart on its confirmatory seeds
    assert formats["paired"]["edge list"]["a"]["mean"] == pytest.approx(12 / N) and formats["paired"]["edge list"]["a"]["seeds"] == [1]
    assert formats["paired"]["edge list, confirmatory seeds"]["a"]["seeds"] == [4]
    assert formats["gap_difference"]["a"]["mean"] == pytest.approx((5 - 12) / N)
    assert "| fixed slots | 1 | +0.125 [" in text and "| edge list, confirmatory seeds | 4 | +0.100 [" in text
    assert "| fixed slots | tm | 1 | 40 | 0.250 | 1:2 |" in text and "| edge list | tm | 4 | 40 | 0.250 | 12:7, 14:3 |" in text
    assert "| fixed slots | ngdiff | 1 | 40 | 0.375 | none |" in text
    assert "Cells not run: ngdiff-s2, tm-s3, ngdiff-s3." in text
    # without --compare the section is left out
    assert "side by side" not in repro.report(out, ["tm", "ngdiff"], [1, 2, 3], "gc8adj").read_text()


def test_formats_pair_only_the_same_test_graphs(tmp_path: Path) -> None:
    """The difference of the gaps pairs items by id: an edge-list cell whose item is another graph stops the report."""
    edges, out = tmp_path / "edges", tmp_path / "adj"
    fake_edge_cell(edges, "tm", 1, 10, [0] * 15, graphs=1)
    fake_edge_cell(edges, "ngdiff", 1, 20, [0] * 15, graphs=1)
    for arm, k in (("tm", 10), ("ngdiff", 15)):
        fake_cell(out / "runs", repro.Cell(repro.SPECS / f"gc8adj_{arm}.pd", 1, ""), mask(k), mask(k), mask(30))
    with pytest.raises(SystemExit, match="has another `edges` at `edge list` than at `fixed slots`"):
        repro.report(out, ["tm", "ngdiff"], [1], "gc8adj", compare=edges)


def test_a_cut_off_is_the_nearest_occurrence_of_its_time() -> None:
    """`--start-by HH:MM` is its occurrence nearest to now: a time that passed minutes ago means stop now, not
    tomorrow (a runner started with a cut-off it had just missed went on into its next cell); tonight's waits, and
    at midnight yesterday evening's has passed."""
    import datetime as dt

    at = dt.datetime(2026, 11, 30, 14, 0, 30, tzinfo=dt.timezone.utc).timestamp()
    hours = lambda hhmm, now=at: (repro.cutoff(hhmm, now=now) - now) / 3600  # noqa: E731
    assert -0.03 < hours("13:59") < 0  # 90 s ago, just passed: in the past, no cell starts
    assert 0 < hours("14:35") < 1
    assert 9 < hours("23:30") < 10
    assert -8.1 < hours("06:00") < -7.9  # this morning's (8 h ago) is nearer than tomorrow's (16 h ahead)
    assert 11.9 < hours("06:00", at + 4 * 3600) < 12  # at 18:00, the next morning's (12 h ahead) is the nearer
    midnight = dt.datetime(2026, 12, 1, 0, 10, tzinfo=dt.timezone.utc).timestamp()
    assert -0.4 < hours("23:50", midnight) < 0  # yesterday's 23:50, passed 20 minutes ago


def test_the_command_line_refuses_a_bad_cut_off_or_comparison(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Usage errors (exit 2, one line naming the flag) before any cell starts: a cut-off that is not HH:MM, and
    `--compare` for a plan with no other format or a folder that holds no runs."""
    for argv, message in (
        (["--plan", "p8-adj", "--start-by", "25:00"], "--start-by '25:00': give HH:MM (UTC), e.g. 09:00"),
        (
            ["--plan", "sudoku", "--compare", str(tmp_path)],
            "--compare: plan sudoku has no other format to set beside it (plans with one: p8-adj)",
        ),
        (["--plan", "p8-adj", "--compare", str(tmp_path / "nowhere")], f"--compare {tmp_path / 'nowhere'}: no runs/ folder there"),
    ):
        with pytest.raises(SystemExit) as exc:
            repro.main([*argv, "--out", str(tmp_path / "out")])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing ran


@pytest.mark.parametrize("go", [False, True], ids=["no-go", "go"])
def test_session_9s_plan_runs_no_arm_from_a_no_go_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, go: bool) -> None:
    """Session 9's pre-registration (`--plan p8-adj`): "if no-go, no arm runs"; the report then shows the base, the
    rule and no arm. From a go base the arms run (sessions 3 and 6 ran their arms either way: `judged`)."""
    started: list[str] = []

    def fake_run_cells(cells: list[repro.Cell], out: Path, jobs: int, start_by: float | None = None, *, gate: bool = False) -> list[str]:
        started.extend(c.label for c in cells)
        return []

    monkeypatch.setattr(repro, "run_cells", fake_run_cells)
    fake_base(tmp_path / "src", "gc8adj", mask(0), mask(30 if go else 20))  # a_r 0.75 (go) or 0.5 (no-go)
    out = tmp_path / "out"
    path, failed = repro.run_plan("p8-adj", out, ["tm", "ngdiff"], [1, 2, 3], base_model=tmp_path / "src" / "gc8adj_base")
    assert failed == []
    text = path.read_text()
    if go:
        assert started == ["tm-s1", "ngdiff-s1", "tm-s2", "ngdiff-s2", "tm-s3", "ngdiff-s3"]
        assert repro.NO_ARMS_RULE not in text
    else:
        assert started == []
        assert f"**no-go: outside the regime, no verdict**. {repro.NO_ARMS_RULE}" in text
    assert "p8" not in repro.NO_ARMS_AT_NO_GO and "gc8" not in repro.NO_ARMS_AT_NO_GO  # session 3: arms run, no verdict


# ---- the statistics audit: pairing by item identity, intervals, edge cases -------------------------------------


def test_f1_pairs_only_the_seeds_whose_items_are_the_bases(tmp_path: Path) -> None:
    """The base scored seed 1's test stream; seeds 2 and 3 draw their own (`TaskBase.sample` is a function of the
    seed), so their records carry the base's ids for other puzzles. F1's paired interval paired them anyway (the
    ids matched), and the sudoku plan's rule read it; now only seed 1 pairs, and the rule reads the unpaired
    interval over the three seeds, saying why."""
    runs = tmp_path / "runs"
    fake_base(tmp_path, "sudoku", mask(0), mask(14), puzzles=0)  # go: a_r 0.35, a_p 0
    for s in (1, 2, 3):
        fake_cell(runs, repro.Cell(repro.SPECS / "sudoku_tm.pd", s, ""), mask(10), mask(20), mask(24), puzzles=0 if s == 1 else 1000 * s)
    text = repro.report(tmp_path, ["tm"], [1, 2, 3], "sudoku").read_text()
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["f1_paired"]["gap"]["seeds"] == [1] and data["f1_paired"]["gap"]["n_pairs"] == N
    assert data["f1_rule"] == "unpaired" and data["f1"]["per_seed"] == pytest.approx([-0.25] * 3)
    assert data["f1"]["delta"] == {"a_r": pytest.approx(0.25), "a_p": pytest.approx(0.5)}
    assert "seeds 2,3 scored other test items under the same ids" in text
    assert "**not reproduced** (the unpaired interval)" in text
    # every seed on the base's items: the paired rule, as pre-registered
    for s in (2, 3):
        shutil.rmtree(repro.run_dir(repro.Cell(repro.SPECS / "sudoku_tm.pd", s, ""), runs))
        fake_cell(runs, repro.Cell(repro.SPECS / "sudoku_tm.pd", s, ""), mask(10), mask(20), mask(24), puzzles=0)
    repro.report(tmp_path, ["tm"], [1, 2, 3], "sudoku")
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["f1_rule"] == "paired" and data["f1_paired"]["gap"]["seeds"] == [1, 2, 3]


def test_cells_of_one_seed_that_scored_other_items_under_the_same_ids_are_refused(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    fake_cell(runs, repro.Cell(repro.SPECS / "gc_tm.pd", 1, ""), mask(10), mask(0), mask(30))
    fake_cell(runs, repro.Cell(repro.SPECS / "gc_lam.pd", 1, ""), mask(20), mask(0), mask(30), puzzles=7)  # another split
    with pytest.raises(SystemExit, match=r"seed 1: test item graph_coloring/test/0 is another item .* nothing is paired"):
        repro.report(tmp_path, ["tm", "lam"], [1])


def test_an_item_scored_twice_is_refused(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    fake_cell(runs, repro.Cell(repro.SPECS / "gc_tm.pd", 1, ""), mask(10), mask(0), mask(30))
    rd = fake_cell(runs, repro.Cell(repro.SPECS / "gc_lam.pd", 1, ""), mask(20), mask(0), mask(30))
    lines = (rd / "eval.jsonl").read_text().splitlines()
    (rd / "eval.jsonl").write_text("\n".join([*lines, lines[0]]) + "\n")
    with pytest.raises(SystemExit, match="graph_coloring/test/0 is scored twice"):
        repro.report(tmp_path, ["tm", "lam"], [1])


def test_cells_of_one_seed_with_other_item_counts_say_so(tmp_path: Path) -> None:
    """A cell that scored fewer items than its baseline was paired on the intersection without a word."""
    runs = tmp_path / "runs"
    for s in (1, 2):
        fake_cell(runs, repro.Cell(repro.SPECS / "gc_tm.pd", s, ""), mask(10), mask(0), mask(30))
    fake_cell(runs, repro.Cell(repro.SPECS / "gc_lam.pd", 1, ""), mask(20), mask(0), mask(30))
    short = [i < 20 for i in range(30)]  # 30 items, the first 30 of the stream
    fake_cell(runs, repro.Cell(repro.SPECS / "gc_lam.pd", 2, ""), short, short[:30], short[:30])
    text = repro.report(tmp_path, ["tm", "lam"], [1, 2]).read_text()
    d = json.loads((tmp_path / "report.json").read_text())["paired"]["lam"]["a"]
    assert d["n_pairs"] == N + 30 and d["unpaired"] == {"2": "30 pairs of 30 / 40 items"}
    assert "| lam | a | 1,2 (items not in both cells: seed 2: 30 pairs of 30 / 40 items) | 70 |" in text


def test_an_item_without_a_verdict_is_left_out_not_counted_wrong(tmp_path: Path) -> None:
    """`cf_outcome` is absent without the counterfactual pass (a_r): a pair lacking it was `bool(None)` = wrong, and a
    cell without any raised a KeyError."""
    runs = tmp_path / "runs"
    cells = {}
    for arm, k in (("tm", 10), ("lam", 20)):
        rd = cells[(arm, 1)] = fake_cell(runs, repro.Cell(repro.SPECS / f"gc_{arm}.pd", 1, ""), mask(k), mask(0), mask(N))
        recs = [json.loads(x) for x in (rd / "eval.jsonl").read_text().splitlines()]
        for r in recs[: 10 if arm == "lam" else 0]:
            r["cf_outcome"] = None  # no verdict for these 10 items of `lam`: every other item is right on a_r in both
        (rd / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    fields = {m: f for m, (_, f) in repro.METRICS.items()}
    res = repro.paired_against(cells, ["tm", "lam"], [1], "tm", fields, np.random.default_rng(0))["lam"]
    assert res["a_r"]["mean"] == 0.0 and res["a_r"]["n_pairs"] == N - 10 and res["a"]["n_pairs"] == N
    for rd in cells.values():
        recs = [json.loads(x) for x in (rd / "eval.jsonl").read_text().splitlines()]
        (rd / "eval.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "cf_outcome"}) + "\n" for r in recs))
    res = repro.paired_against(cells, ["tm", "lam"], [1], "tm", fields, np.random.default_rng(0))["lam"]
    assert set(res) == {"a", "a_p"}  # no a_r: neither cell has a verdict on it


def test_seed_intervals_for_any_number_of_seeds_and_none_for_one() -> None:
    """The t interval's quantile came from a table up to 5 df: 7 seeds raised a KeyError; one seed wrote NaN
    into report.json (not JSON)."""
    from scipy import stats

    rng = np.random.default_rng(1)
    diffs = [np.array([1.0] * (5 + s) + [0.0] * 20) for s in range(7)]
    d = repro.paired(diffs, rng)
    per = np.array([x.mean() for x in diffs])
    lo, hi = stats.t.interval(0.95, 6, loc=per.mean(), scale=stats.sem(per))
    assert (d["seed_lo"], d["seed_hi"]) == (pytest.approx(lo, rel=1e-3), pytest.approx(hi, rel=1e-3))
    assert [repro.t_975(df) for df in (1, 2, 3, 4, 5, 6, 30)] == [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.042]
    one = repro.paired(diffs[:1], rng)
    assert one["seed_lo"] is None and one["seed_hi"] is None
    json.dumps(one, allow_nan=False)


def test_the_bootstrap_resamples_items_within_seeds_with_the_preregistered_count() -> None:
    """An independent percentile bootstrap (items within seeds, the pooled mean) on the same draws gives the
    same interval; 10,000 resamples; a fixed generator gives the same interval twice."""
    diffs = [np.array([1.0] * 12 + [0.0] * 30 + [-1.0] * 3), np.array([1.0] * 5 + [0.0] * 20)]
    d = repro.paired(diffs, np.random.default_rng(7))
    rng = np.random.default_rng(7)
    boots = np.zeros(repro.BOOT)
    for x in diffs:
        boots += x[rng.integers(0, len(x), size=(repro.BOOT, len(x)))].sum(axis=1)
    boots /= sum(len(x) for x in diffs)
    srt = np.sort(boots)

    def q(p: float) -> float:  # numpy's default ("linear") quantile, written out: h = p·(n − 1)
        h = p * (len(srt) - 1)
        return float(srt[int(np.floor(h))] + (h % 1) * (srt[int(np.ceil(h))] - srt[int(np.floor(h))]))

    assert repro.BOOT == 10_000 and d["lo"] == pytest.approx(q(0.025)) and d["hi"] == pytest.approx(q(0.975))
    assert d["mean"] == pytest.approx(14 / 70) and repro.paired(diffs, np.random.default_rng(7)) == d


@pytest.mark.parametrize(
    "d, f2, f1",
    [
        ({"mean": 0.0, "lo": 0.0, "per_seed": [0.1, 0.1, -0.2]}, "not reproduced", "not reproduced"),
        (
            {"mean": 0.01, "lo": 0.0, "per_seed": [0.1, 0.1, -0.2]},
            "direction only (interval includes 0)",
            "direction only (interval includes 0)",
        ),
        ({"mean": 0.01, "lo": 1e-9, "per_seed": [0.1, 0.1, -0.2]}, "reproduced", "reproduced"),
        ({"mean": 0.01, "lo": 1e-9, "per_seed": [0.1, 0.0, -0.2]}, "direction only (< 2 seeds positive)", "reproduced"),
        ({"mean": -0.01, "lo": 1e-9, "per_seed": [0.1, 0.1, -0.2]}, "not reproduced", "not reproduced"),
    ],
)
def test_verdicts_at_exactly_zero_follow_the_preregistered_rules(d: dict, f2: str, f1: str) -> None:
    """F2: reproduced iff Δa > 0, the interval excludes 0 (lo > 0) and Δa > 0 in ≥ 2 seeds; not reproduced iff Δa ≤ 0.
    F1: reproduced iff the mean is > 0 with the interval excluding 0 (the F1 rule read lo alone)."""
    assert repro.verdict(d) == f2 and repro.f1_rule_verdict(d) == f1


def test_sweep_item_gaps_leave_out_items_without_a_verdict(tmp_path: Path) -> None:
    """The sweep's per-item gap read `bool(None)` as wrong, like paired_against did."""
    runs = tmp_path / "runs"
    cells = {}
    for arm, k in (("tm", 10), ("ngdiff", 20)):
        rd = cells[(arm, 1)] = fake_cell(runs, repro.Cell(repro.SPECS / f"sudoku_{arm}.pd", 1, ""), mask(k), mask(k), mask(N))
        recs = [json.loads(x) for x in (rd / "eval.jsonl").read_text().splitlines()]
        if arm == "ngdiff":
            recs[0]["cf_outcome"] = None
        (rd / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    gaps = repro.item_gaps(cells, 1, "cf_outcome")
    assert len(gaps) == N - 1 and all(g == 0.0 for g, _ in gaps.values())
    assert repro.item_gaps(cells, 1, "outcome")["graph_coloring/test/15"] == (1.0, 15)
