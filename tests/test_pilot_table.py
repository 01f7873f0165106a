"""benchmarks/pilot_table.py: where a sudoku evaluation's perception errors lie (`--cells`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import pilot_table  # noqa: E402

PUZZLE = [[1, 0, 0, 0], [0, 2, 0, 0], [0, 0, 3, 0], [0, 0, 0, 4]]
TRUTH = "1 _ _ _ / _ 2 _ _ / _ _ 3 _ / _ _ _ 4"
SOLUTION = [[1, 4, 2, 3], [3, 2, 4, 1], [4, 1, 3, 2], [2, 3, 1, 4]]
SOLVED = "1 4 2 3 / 3 2 4 1 / 4 1 3 2 / 2 3 1 4"


def record(read: str | None, answer: str | None = None) -> dict:
    instance = {"size": 4, "puzzle": PUZZLE, "solution": SOLUTION}
    return {"instance": instance, "perception_ref": TRUTH, "generated_perception": read, "generated_answer": answer}


def test_cell_errors_sort_every_misread_cell_by_kind_row_and_column() -> None:
    recs = [
        record(TRUTH, SOLVED),  # all right
        record("2 _ _ _ / _ _ _ _ / _ 3 3 _", "1 3 2 3 / 3 4 4 1 / 4 1 3 2 / 2 3 1 4"),  # read: r1c1 1→2, r2c2 2→_,
        # r3c2 _→3, row 4 missing; answered: r1c2 (blank) and r2c2 (given) wrong
        record(None),  # no perception section: every cell missing
    ]
    out = pilot_table.cell_errors(recs)
    assert (out["n"], out["given"], out["blank"]) == (3, 12, 36)
    assert (out["given_as_other_digit"], out["given_as_blank"], out["blank_as_digit"], out["missing"]) == (1, 1, 1, 4 + 16)
    # errors / (items × 4 cells): item 3 misses 4 cells of every row and column; item 2 errs at r1c1,
    # r2c2, r3c2 and all of row 4
    assert out["row_error_rate"] == [round(x / 12, 4) for x in (5, 5, 5, 8)]
    assert out["col_error_rate"] == [round(x / 12, 4) for x in (6, 7, 5, 5)]
    assert out["confusions"] == [["1", "2", 1]]
    assert (out["answer_given_right"], out["answer_blank_right"]) == (round(7 / 12, 4), round(23 / 36, 4))
    # every blank of this puzzle sees two of its four givens: 2 candidates each
    assert out["answer_blank_candidate_chance"] == 0.5


def test_cells_option_reads_the_last_evaluation_of_a_run(tmp_path: Path, monkeypatch, capsys) -> None:
    run = tmp_path / "run-abc"
    (run / "stages" / "sft").mkdir(parents=True)
    for step, read in ((100, None), (200, "1 _ _ _ / _ 2 _ _ / _ _ 3 _ / _ _ _ 9")):
        (run / "stages" / "sft" / f"eval-{step:06d}.jsonl").write_text(json.dumps(record(read)) + "\n")
    monkeypatch.setattr(sys, "argv", ["pilot_table.py", str(run), "--cells"])
    pilot_table.main()
    out = json.loads(capsys.readouterr().out)
    assert (out["run"], out["stage"], out["given_as_other_digit"], out["missing"]) == ("run-abc", "sft", 1, 0)
    assert out["confusions"] == [["4", "9", 1]]


def test_cells_option_refuses_a_run_without_evaluations(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "run" / "stages" / "sft").mkdir(parents=True)
    monkeypatch.setattr(sys, "argv", ["pilot_table.py", str(tmp_path / "run"), "--cells"])
    with pytest.raises(SystemExit, match="no evaluation yet"):
        pilot_table.main()


def stage_eval(run: Path, stage: str, recs: list[dict]) -> None:
    d = run / "stages" / stage
    d.mkdir(parents=True)
    (d / "eval-000010.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_pair_leaves_out_items_a_stage_did_not_score_and_refuses_an_item_scored_twice(tmp_path: Path) -> None:
    """`--pair A B`: a stage evaluated without the counterfactual pass has no `cf_outcome`, which counted as wrong
    (Δa_r = −a_r of A); now a_r pairs no item and says so. An id scored twice in one evaluation is refused."""
    run = tmp_path / "run"
    stage_eval(run, "base", [{"id": f"t/test/{i}", "outcome": i < 2, "perception_exact": i < 3, "cf_outcome": True} for i in range(10)])
    stage_eval(run, "post", [{"id": f"t/test/{i}", "outcome": i < 5, "perception_exact": i < 3} for i in range(10)])
    out = pilot_table.paired(run, "base", "post")
    assert out["a"]["diff"] == pytest.approx(0.3) and out["a_p"]["diff"] == 0.0 and out["n"] == 10
    assert out["a_r"] == {"diff": None, "ci95": None, "n": 0}
    assert (out["stage_a"], out["stage_b"]) == ("base", "post")  # `a` (the metric) overwrote stage A's name
    recs = [json.loads(x) for x in (run / "stages" / "post" / "eval-000010.jsonl").read_text().splitlines()]
    (run / "stages" / "post" / "eval-000010.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*recs, recs[0]]))
    with pytest.raises(SystemExit, match="t/test/0 is scored twice"):
        pilot_table.paired(run, "base", "post")


def test_pair_pools_the_seeds_items_and_keeps_a_single_runs_interval(tmp_path: Path) -> None:
    """`--pair A B --pool`: one difference over the items of several runs (the seeds of a spec), resampled within
    each run; with one run it is `--pair`'s own figure and interval."""
    runs = []
    for s, gained in ((1, 2), (2, 6)):  # B gains a on 2 of 10 items in one seed, on 6 of 10 in the other
        run = tmp_path / f"seed{s}"
        stage_eval(
            run, "base", [{"id": f"t/test/{i}", "outcome": False, "perception_exact": False, "cf_outcome": False} for i in range(10)]
        )
        stage_eval(
            run, "post", [{"id": f"t/test/{i}", "outcome": i < gained, "perception_exact": False, "cf_outcome": False} for i in range(10)]
        )
        runs.append(run)
    pooled = pilot_table.paired(runs, "base", "post")
    assert pooled["n"] == 20 and pooled["a"]["diff"] == pytest.approx(0.4) and pooled["a_p"]["diff"] == 0.0
    lo, hi = pooled["a"]["ci95"]
    assert 0.15 < lo < 0.4 < hi < 0.65  # items resampled within seeds: neither seed's own figure (0.2, 0.6) is the bound
    one = pilot_table.paired(runs[0], "base", "post")
    assert one == pilot_table.paired([runs[0]], "base", "post") and one["a"]["diff"] == pytest.approx(0.2)
