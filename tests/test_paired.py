"""Paired differences to a baseline arm (`percep report --baseline`, `percep grid --baseline`):
known answers on synthetic run directories (summary.json + eval.jsonl), pairing by seed and
item id, the two intervals, and the refusals."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from percepdsl_runtime.grid import EXIT_OK, EXIT_USAGE, grid_command, report_command
from percepdsl_runtime.grid.paired import (
    BaselineError,
    RunData,
    hierarchical_bootstrap,
    load_runs,
    paired_report,
    parse_selector,
    t_interval,
    t_quantile,
)

REPO = Path(__file__).resolve().parents[1]
FAKE = [sys.executable, str(REPO / "tests" / "fake_run.py")]
FIELDS = ("outcome", "perception_exact", "perception_partial", "cf_outcome", "format_ok")
SUMMARY_OF = {"end_to_end": "outcome", "perception": "perception_exact", "perception_partial": "perception_partial"}
SUMMARY_OF |= {"reasoning": "cf_outcome", "format_ok": "format_ok"}


def make_run(root: Path, name: str, params: dict, seed: int, items: dict[str, dict], experiment: str = "exp", order=None) -> Path:
    """A finished run directory: eval.jsonl with a non-final record of the base stage (ignored)
    and the final records of stage `post` (in `order` of ids), and the summary computed from them."""
    d = root / name
    d.mkdir(parents=True)
    recs = [{"stage": "base", "step": 10, "final": True, "id": "x0", **dict.fromkeys(FIELDS, 1.0)}]
    recs += [{"stage": "post", "step": 20, "final": True, "id": i, **items[i]} for i in (order or list(items))]
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    final = {m: math.fsum(float(v[f]) for v in items.values()) / len(items) for m, f in SUMMARY_OF.items()}
    summary = {"experiment": experiment, "status": "complete", "seed": seed, "params": {"lam": params["lam"], "seed": seed}}
    summary |= {"final": final, "final_stage": "post", "stages": {"post": {"metrics": final}}}
    (d / "summary.json").write_text(json.dumps(summary))
    return d


def items(values: list[float], partial_shift: float = 0.0) -> dict[str, dict]:
    """Items `q0…`: outcome and perception from `values`, reasoning 1, partial = value/2 + shift."""
    return {
        f"q{i}": {"outcome": v, "perception_exact": v, "perception_partial": v / 2 + partial_shift, "cf_outcome": 1.0, "format_ok": 1.0}
        for i, v in enumerate(values)
    }


def metric(rep, arm: str, m: str) -> dict:
    return next(a for a in rep.arms if a["arm"] == arm)["metrics"][m]


@pytest.mark.parametrize("df, want", [(1, 12.706205), (2, 4.302653), (4, 2.776445), (29, 2.045230), (1000, 1.962339)])
def test_t_quantiles_match_the_table(df, want):
    assert t_quantile(df) == pytest.approx(want, abs=1e-5)


def test_t_interval_known_answer_and_single_seed():
    lo, hi = t_interval([0.1, 0.2, 0.3])  # mean 0.2, sd 0.1, n 3
    half = 4.302653 * 0.1 / math.sqrt(3)
    assert (lo, hi) == (pytest.approx(0.2 - half, abs=1e-6), pytest.approx(0.2 + half, abs=1e-6))
    assert t_interval([0.3]) is None


def test_bootstrap_one_seed_is_the_paired_item_interval_and_is_reproducible():
    import numpy as np

    d = np.array([1.0] * 100 + [0.0] * 400)  # 500 items, 100 gained: mean 0.2, SE sqrt(.2·.8/500) = 0.0179
    lo, hi = hierarchical_bootstrap([d])
    se = math.sqrt(0.2 * 0.8 / 500)
    assert lo == pytest.approx(0.2 - 1.96 * se, abs=0.006) and hi == pytest.approx(0.2 + 1.96 * se, abs=0.006)
    assert hierarchical_bootstrap([d]) == (lo, hi)  # fixed RNG seed
    # three seeds with different gains: the interval spans the seed spread plus item noise
    lo3, hi3 = hierarchical_bootstrap([d, np.roll(np.where(np.arange(500) < 50, 1.0, 0.0), 7), np.zeros(500)])
    assert lo3 < 0.1 < hi3 and lo3 > -0.05 and hi3 < 0.25


def test_identical_arms_differ_by_zero(tmp_path):
    for seed, vals in ((1, [1, 0, 1, 1, 0, 1]), (2, [0, 0, 1, 1, 1, 1]), (3, [1, 1, 1, 0, 0, 0])):
        make_run(tmp_path, f"a{seed}", {"lam": 0.0}, seed, items(vals))
        make_run(tmp_path, f"b{seed}", {"lam": 0.5}, seed, items(vals), order=[f"q{i}" for i in reversed(range(6))])
    rep = paired_report(load_runs(sorted(tmp_path.iterdir())), "lam=0")
    assert rep.baseline == "lam=0.0" and rep.problems == []
    for m in ("end_to_end", "perception", "perception_partial", "reasoning", "format_ok"):
        r = metric(rep, "lam=0.5", m)
        assert r["mean"] == 0 and r["n_seeds"] == 3
        assert r["t_ci"][0] <= 0 <= r["t_ci"][1] and r["boot_ci"][0] <= 0 <= r["boot_ci"][1]
        assert [p["seed"] for p in r["per_seed"]] == [1, 2, 3] and {p["n_items"] for p in r["per_seed"]} == {6}


def test_a_constant_shift_is_exactly_that_shift(tmp_path):
    for seed in (1, 2, 3):
        vals = [float((i * seed) % 3 == 0) for i in range(20)]
        make_run(tmp_path, f"a{seed}", {"lam": 0.0}, seed, items(vals))
        make_run(tmp_path, f"b{seed}", {"lam": 0.25}, seed, items(vals, partial_shift=0.125))
    r = metric(paired_report(load_runs(sorted(tmp_path.iterdir())), "lam=0.0"), "lam=0.25", "perception_partial")
    assert r["mean"] == pytest.approx(0.125, abs=1e-12)
    assert r["t_ci"] == pytest.approx([0.125, 0.125], abs=1e-12) and r["boot_ci"] == pytest.approx([0.125, 0.125], abs=1e-12)


def test_pairs_by_item_id_and_seed_and_reports_what_it_left_out(tmp_path):
    # baseline: item q_i correct iff i even; arm: the same plus q1 and q3 (per seed: +2/10, +1/10 …)
    gains = {1: ["q1", "q3"], 2: ["q1"], 3: ["q1", "q3", "q5"]}
    for seed, gained in gains.items():
        base = items([float(i % 2 == 0) for i in range(10)])
        arm = {k: dict(v) for k, v in base.items()}
        for q in gained:
            arm[q].update(outcome=1.0, perception_exact=1.0)
        make_run(tmp_path, f"base{seed}", {"lam": 0.0}, seed, base, order=sorted(base, reverse=True))
        make_run(tmp_path, f"arm{seed}", {"lam": 0.5}, seed, arm)
    arm4 = items([1.0] * 10)
    del arm4["q9"]
    make_run(tmp_path, "arm4", {"lam": 0.5}, 4, arm4)  # no baseline run of seed 4: not paired
    rep = paired_report(load_runs(sorted(tmp_path.iterdir())), "lam=0")
    r = metric(rep, "lam=0.5", "end_to_end")
    assert [p["diff"] for p in r["per_seed"]] == pytest.approx([0.2, 0.1, 0.3])
    assert r["mean"] == pytest.approx(0.2) and r["t_df"] == 2
    half = 4.302653 * 0.1 / math.sqrt(3)
    assert r["t_ci"] == pytest.approx([0.2 - half, 0.2 + half], abs=1e-6)
    assert r["boot_ci"][0] < 0.2 < r["boot_ci"][1]
    assert r["per_seed"][0]["run"] == "arm1" and r["per_seed"][0]["baseline_run"] == "base1"
    assert any("seeds 4 are not in both" in p for p in rep.problems)


def test_partly_overlapping_items_and_disagreeing_summaries_are_reported(tmp_path):
    make_run(tmp_path, "a", {"lam": 0.0}, 1, items([1, 0, 1, 0]))
    b = make_run(tmp_path, "b", {"lam": 0.5}, 1, {k: v for k, v in items([1, 1, 1, 1]).items() if k != "q0"})
    s = json.loads((b / "summary.json").read_text())
    s["final"]["end_to_end"] = 0.5  # the records say 1.0
    (b / "summary.json").write_text(json.dumps(s))
    rep = paired_report(load_runs([tmp_path / "a", b]), "lam=0")
    r = metric(rep, "lam=0.5", "end_to_end")
    assert r["per_seed"][0]["n_items"] == 3 and r["mean"] == pytest.approx(2 / 3)
    assert r["t_ci"] is None and r["boot_ci"] is not None  # one seed: only the item-level interval
    assert any("3 items in both runs of 3 / 4" in p for p in rep.problems)
    assert any("`end_to_end` is 1.000000 over eval.jsonl's final records but 0.500000 in summary.json" in p for p in rep.problems)


def test_runs_without_eval_records_pair_their_summaries(tmp_path):
    for seed in (1, 2):
        for lam, v in ((0.0, 0.5), (1.0, 0.7 + 0.1 * seed)):
            d = make_run(tmp_path, f"r{lam}-{seed}", {"lam": lam}, seed, items([v]))
            (d / "eval.jsonl").unlink()
    r = metric(paired_report(load_runs(sorted(tmp_path.iterdir())), "lam=0"), "lam=1.0", "end_to_end")
    assert [p["source"] for p in r["per_seed"]] == ["summary.json"] * 2
    assert r["mean"] == pytest.approx(0.35) and r["boot_ci"] is None and r["t_ci"] is not None


@pytest.mark.parametrize(
    "sel, message",
    [
        ("lam", "expected NAME=VALUE"),
        ("alpha=0", "no run has a param `alpha`"),
        ("lam=0.3", "matches none of the arms: lam=0.0; lam=0.5"),
        ("experiment=exp", "matches 2 arms"),
    ],
)
def test_a_baseline_that_names_no_single_arm_is_refused(tmp_path, sel, message):
    make_run(tmp_path, "a", {"lam": 0.0}, 1, items([1.0]))
    make_run(tmp_path, "b", {"lam": 0.5}, 1, items([0.0]))
    with pytest.raises(BaselineError, match=message.replace("(", r"\(")):
        paired_report(load_runs([tmp_path / "a", tmp_path / "b"]), sel)


def test_selector_values_read_as_set_values():
    assert parse_selector('lam=0,mode="a b",flag=true,x=1e-3') == {"lam": 0, "mode": "a b", "flag": True, "x": 0.001}


def test_report_on_run_directories_writes_markdown_and_json(tmp_path):
    runs = [
        make_run(tmp_path / "runs", f"{e}-{s}", {"lam": 0.5}, s, items([float(e == "arm" or i % 2) for i in range(8)]), experiment=e)
        for e in ("tm", "arm")
        for s in (1, 2, 3)
    ]
    o, e = io.StringIO(), io.StringIO()
    assert report_command(runs, baseline="experiment=tm", out=tmp_path / "rep", stdout=o, stderr=e) == EXIT_OK, e.getvalue()
    data = json.loads((tmp_path / "rep" / "paired.json").read_text())
    assert data["baseline"] == "experiment=tm" and data["arms"][0]["arm"] == "experiment=arm"
    assert data["arms"][0]["metrics"]["end_to_end"]["mean"] == pytest.approx(0.5)
    md = (tmp_path / "rep" / "paired.md").read_text()
    assert md == o.getvalue() and "| experiment=arm | a | 3 | +0.500 | [+0.500, +0.500] |" in md
    o, e = io.StringIO(), io.StringIO()
    assert report_command(runs, baseline="experiment=tm", stdout=o, stderr=e) == EXIT_USAGE
    assert "--out DIR" in e.getvalue()
    assert report_command([tmp_path], baseline="lam=0", out=tmp_path / "x", stdout=o, stderr=e) == EXIT_USAGE
    assert "neither a grid directory" in e.getvalue()


def test_grid_baseline_adds_paired_table_and_is_checked_before_running(tmp_path, monkeypatch):
    monkeypatch.delenv("FAKE_RUN_CALLS", raising=False)
    grid = REPO / "specs" / "grids" / "smoke.pd"
    o, e = io.StringIO(), io.StringIO()
    assert grid_command(grid, out=tmp_path / "g", launcher=FAKE, baseline="lam=0.5", stdout=o, stderr=e) == EXIT_USAGE
    assert "matches none of the arms: lam=0.25; lam=0.75" in e.getvalue() and not (tmp_path / "g" / "cells").exists()
    assert grid_command(grid, out=tmp_path / "g", launcher=FAKE, baseline="lam=0.25", stdout=o, stderr=e) == EXIT_OK, e.getvalue()
    data = json.loads((tmp_path / "g" / "paired.json").read_text())
    # the stand-in run's perception is 0.2 + 0.6·lam + 0.01·seed: the paired difference is 0.6 × 0.5 in every seed
    r = data["arms"][0]["metrics"]["perception"]
    assert r["mean"] == pytest.approx(0.3) and r["n_seeds"] == 2 and r["t_ci"] == pytest.approx([0.3, 0.3])
    assert "## Paired differences against `lam=0.25`" in (tmp_path / "g" / "results.md").read_text()
    o, e = io.StringIO(), io.StringIO()
    assert report_command(tmp_path / "g", baseline="lam=0.75", stdout=o, stderr=e) == EXIT_OK, e.getvalue()
    assert "| lam=0.25 | a_p | 2 | -0.300 |" in o.getvalue()


def test_a_grid_whose_baseline_cells_all_failed_still_writes_its_results_table(tmp_path, monkeypatch):
    """The baseline was checked before the cells ran, but its cells then failed: the paired report raised and
    run_plan's catch-all dropped the whole results table (no results.csv, .md or plots; a one-line warning)."""
    monkeypatch.delenv("FAKE_RUN_CALLS", raising=False)
    monkeypatch.setenv("FAKE_RUN_FAIL", "lam=0.25")
    grid, out = REPO / "specs" / "grids" / "smoke.pd", tmp_path / "g"
    o, e = io.StringIO(), io.StringIO()
    assert grid_command(grid, out=out, launcher=FAKE, baseline="lam=0.25", stdout=o, stderr=e) == 3
    assert "warning: no paired differences: --baseline `lam=0.25` matches none of the arms" in e.getvalue()
    assert (out / "results.csv").exists() and "| 0.75 | 2 | 0 |" in o.getvalue() and "| 0.25 | 0 | 2 |" in o.getvalue()
    assert not (out / "paired.md").exists() and "paired" not in e.getvalue().split("results: ")[1].splitlines()[0]


def test_a_grid_with_a_baseline_prints_the_paired_table_and_names_its_files(tmp_path, monkeypatch):
    monkeypatch.delenv("FAKE_RUN_CALLS", raising=False)
    o, e = io.StringIO(), io.StringIO()
    out = tmp_path / "g"
    assert grid_command(REPO / "specs" / "grids" / "smoke.pd", out=out, launcher=FAKE, baseline="lam=0.25", stdout=o, stderr=e) == EXIT_OK
    assert "## Paired differences against `lam=0.25`" in o.getvalue() and "| lam=0.75 | a_p | 2 | +0.300 |" in o.getvalue()
    assert f"{out / 'paired.md'}, {out / 'paired.json'}" in e.getvalue()


def test_percep_report_on_the_command_line(tmp_path):
    a = make_run(tmp_path, "a", {"lam": 0.0}, 1, items([1.0, 0.0]))
    b = make_run(tmp_path, "b", {"lam": 0.5}, 1, items([1.0, 1.0]))
    cmd = [sys.executable, "-m", "percepdsl", "report", str(a), str(b), "--out", str(tmp_path / "r")]
    ok = subprocess.run([*cmd, "--baseline", "lam=0"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "| lam=0.5 | a | 1 | +0.500 | — |" in ok.stdout
    bad = subprocess.run([*cmd, "--baseline", "lam=2"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "matches none of the arms" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("text", ["[1, 2]", "{cut sho", "", '{"status": "complete", "final": "x", "stages": 3}', '{"a": 1}'])
def test_a_named_run_whose_summary_is_damaged_is_refused_not_left_out(tmp_path, text):
    """A run directory named on the command line whose summary.json is not a complete run's (a list,
    cut short, empty, another shape) was left out silently: exit 0 and a comparison without it (with
    two runs, an empty table), or a traceback for one of another shape. Now exit 2 naming it."""
    a = make_run(tmp_path, "a", {"lam": 0.0}, 1, items([1.0, 0.0]))
    b = make_run(tmp_path, "b", {"lam": 0.5}, 1, items([1.0, 1.0]))
    (b / "summary.json").write_text(text)
    o, e = io.StringIO(), io.StringIO()
    assert report_command([a, b], baseline="lam=0", out=tmp_path / "r", stdout=o, stderr=e) == EXIT_USAGE
    assert f"{b / 'summary.json'} is not a complete run's summary" in e.getvalue() and "--resume" in e.getvalue()
    assert not (tmp_path / "r").exists()


def test_a_grid_cell_whose_summary_has_another_shape_is_left_out_with_a_note(tmp_path):
    """A cell's summary.json that says complete but is of another shape (`final` a string) ended
    `percep report` in an AttributeError traceback; now the cell is one with no complete summary."""
    from percepdsl_runtime.grid.state import read_summary

    grid = tmp_path / "g"
    for lam in (0.0, 0.5):
        make_run(grid / "cells", f"exp-{lam}", {"lam": lam}, 1, items([1.0, lam]))
    bad = grid / "cells" / "exp-0.5" / "summary.json"
    bad.write_text(json.dumps({"status": "complete", "params": {"lam": 0.5}, "final": "x", "stages": 3}))
    assert read_summary(bad.parent) is None
    o, e = io.StringIO(), io.StringIO()
    assert report_command(grid, stdout=o, stderr=e) == EXIT_OK, e.getvalue()
    assert f"note: not in the table: 1 cell with no complete summary.json: {bad.parent}" in e.getvalue()
    assert "1 finished run in 1 setting" in o.getvalue() and "| 0.0 | 1 | 0 | 0.500 |" in o.getvalue()


@pytest.mark.parametrize(
    "damage",
    [
        b"[1, 2]\n",  # a record that is no object
        b'{"stage": "post", "final": true, "id": "q0", "outcome": "yes"}\n',  # a value that is no number
        b'{"stage": "post", "final": true, "id": "q0", "outcome": NaN}\n',  # nor a finite one
        b"\xff\xfe\n",  # not UTF-8
    ],
    ids=["list", "string", "nan", "not-utf8"],
)
def test_damaged_eval_records_fall_back_to_the_summary(tmp_path, damage):
    """An eval.jsonl with a record that is no object, a value that is no finite number, or bytes that
    are not UTF-8 ended `percep report` in an AttributeError / ValueError / UnicodeDecodeError
    traceback (a NaN gave NaN in paired.json, which is not JSON). Now the file is named as a problem
    and ignored: the run is paired on its summary's final metrics."""
    a = make_run(tmp_path, "a", {"lam": 0.0}, 1, items([1.0, 0.0]))
    b = make_run(tmp_path, "b", {"lam": 0.5}, 1, items([1.0, 1.0]))
    with (b / "eval.jsonl").open("ab") as f:
        f.write(damage)
    o, e = io.StringIO(), io.StringIO()
    assert report_command([a, b], baseline="lam=0", out=tmp_path / "r", stdout=o, stderr=e) == EXIT_OK, e.getvalue()
    data = json.loads((tmp_path / "r" / "paired.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in paired.json"))
    r = data["arms"][0]["metrics"]["end_to_end"]
    assert r["mean"] == pytest.approx(0.5) and r["per_seed"][0]["source"] == "summary.json"
    assert any(str(b / "eval.jsonl") in p and "the file is ignored" in p for p in data["problems"]), data["problems"]


def test_a_seed_without_common_items_is_a_problem_not_left_out_unsaid(tmp_path):
    """Two runs of a seed whose eval.jsonl share no item id (other test items, or ids rewritten) were
    left out of the pairs without a word: an arm with no metrics and no problem listed."""
    a = make_run(tmp_path, "a", {"lam": 0.0}, 1, items([1.0, 0.0]))
    b = make_run(tmp_path, "b", {"lam": 0.5}, 1, {f"other{i}": v for i, v in enumerate(items([1.0, 1.0]).values())})
    rep = paired_report(load_runs([a, b]), "lam=0")
    assert rep.arms[0]["metrics"] == {}
    assert any("seed 1" in p and "no item in both runs" in p for p in rep.problems), rep.problems


@pytest.mark.parametrize("seed", [[1], {"a": 1}])
def test_a_summary_whose_seed_is_no_value_is_no_complete_run(tmp_path, seed):
    """A seed that is a list or an object ended `percep report` in `unhashable type` while grouping arms."""
    a = make_run(tmp_path, "a", {"lam": 0.0}, 1, items([1.0, 0.0]))
    b = make_run(tmp_path, "b", {"lam": 0.5}, 1, items([1.0, 1.0]))
    summary = json.loads((b / "summary.json").read_text())
    (b / "summary.json").write_text(json.dumps({**summary, "seed": seed}))
    o, e = io.StringIO(), io.StringIO()
    assert report_command([a, b], baseline="lam=0", out=tmp_path / "r", stdout=o, stderr=e) == EXIT_USAGE
    assert f"{b / 'summary.json'} is not a complete run's summary" in e.getvalue()


def test_rundata_ignores_other_stages_and_non_final_records(tmp_path):
    d = make_run(tmp_path, "a", {"lam": 0.0}, 1, items([1.0, 0.0]))
    with (d / "eval.jsonl").open("a") as f:
        f.write(json.dumps({"stage": "post", "step": 5, "final": False, "id": "q1", **dict.fromkeys(FIELDS, 1.0)}) + "\n")
    run = load_runs([d])[0]
    assert isinstance(run, RunData) and set(run.items) == {"q0", "q1"} and run.items["q1"]["end_to_end"] == 0.0 and not run.problems


def test_report_of_a_grid_with_nothing_finished_says_so_and_writes_nothing(tmp_path):
    """A grid directory whose cells/ holds no finished cell: with --baseline the refusal was `no run has
    a param `lam` (params: )`, and either way results.md / results.csv were overwritten with an empty
    table before the refusal. Now the refusal says that nothing is finished, and writes nothing."""
    grid = tmp_path / "g"
    (grid / "cells" / "exp-half").mkdir(parents=True)  # begun, never finished
    (grid / "results.md").write_text("the table of an earlier report")
    for baseline in ("lam=0", None):
        o, e = io.StringIO(), io.StringIO()
        assert report_command(grid, baseline=baseline, stdout=o, stderr=e) == EXIT_USAGE
        assert f"no finished or failed cells in {grid / 'cells'}" in e.getvalue() and "no run has a param" not in e.getvalue()
    assert (grid / "results.md").read_text() == "the table of an earlier report" and not (grid / "results.csv").exists()


def test_a_grid_directory_among_several_paths_is_named_as_one(tmp_path):
    """`percep report GRID RUN...` said `GRID is neither a grid directory (no cells/ inside) nor a
    finished run directory`, false of a directory with cells/: a grid directory is reported alone.
    Now the message says so, with the two ways out; a grid's cells/ itself points at its grid."""
    grid = tmp_path / "g"
    make_run(grid / "cells", "exp-0", {"lam": 0.0}, 1, items([1.0, 0.0]))
    run = make_run(tmp_path, "r", {"lam": 0.5}, 1, items([1.0, 1.0]))
    o, e = io.StringIO(), io.StringIO()
    assert report_command([grid, run], baseline="lam=0", out=tmp_path / "o", stdout=o, stderr=e) == EXIT_USAGE
    assert f"error: {grid} is a grid directory: report it alone (`percep report {grid}`)" in e.getvalue()
    assert "neither" not in e.getvalue()
    e = io.StringIO()
    assert report_command(grid / "cells", stdout=o, stderr=e) == EXIT_USAGE
    assert f"`percep report {grid}`" in e.getvalue()


def test_runs_of_one_arm_have_nothing_to_compare(tmp_path):
    """Run directories that are all one arm: `--baseline lam=0` (that arm) wrote an empty comparison
    and exited 0, and `--baseline lam=0.5` said `matches none of the arms: (all runs)`, hiding the
    arm's params. Now the first is refused (exit 2: nothing to compare), and both name the arm."""
    runs = [make_run(tmp_path, f"r{s}", {"lam": 0.0}, s, items([1.0, 0.0])) for s in (1, 2)]
    o, e = io.StringIO(), io.StringIO()
    assert report_command(runs, baseline="lam=0", out=tmp_path / "o", stdout=o, stderr=e) == EXIT_USAGE
    assert "the runs are all one arm (experiment=exp lam=0.0): nothing to compare with the baseline" in e.getvalue()
    assert not (tmp_path / "o").exists()
    e = io.StringIO()
    assert report_command(runs, baseline="lam=0.5", out=tmp_path / "o", stdout=o, stderr=e) == EXIT_USAGE
    assert "matches none of the arms: experiment=exp lam=0.0" in e.getvalue()


def test_the_intervals_do_not_depend_on_the_order_the_run_directories_are_named_in(tmp_path):
    """Seeds were paired in the order of the arm's run directories (named by IR hash), and the bootstrap's
    fixed RNG draws by position: the same runs under other names gave another boot CI and per-seed order."""
    reports = []
    for names in (("a", "b", "c"), ("c", "b", "a")):  # directory order: seed 1 first, then seed 1 last
        root = tmp_path / "".join(names)
        for seed, name in zip((1, 2, 3), names):
            base = [((i * 0.37 + seed * 0.11) % 1) for i in range(30)]
            arm = [((i * 0.53 + seed * 0.29) % 1) * seed / 3 for i in range(30)]
            make_run(root, f"{name}-base", {"lam": 0.0}, seed, items(base))
            make_run(root, f"{name}-arm", {"lam": 0.25}, seed, items(arm))
        reports.append(metric(paired_report(load_runs(sorted(root.iterdir())), "lam=0.0"), "lam=0.25", "end_to_end"))
    assert [p["seed"] for p in reports[0]["per_seed"]] == [p["seed"] for p in reports[1]["per_seed"]] == [1, 2, 3]
    assert reports[0]["boot_ci"] == reports[1]["boot_ci"]


def test_the_same_id_naming_another_item_is_not_paired(tmp_path):
    """An item id names an index in the seed's test stream: another task (or split) puts another item under it.
    Records that state their instance are paired only when it is the same item."""

    def with_instance(vals, first):
        return {k: {**v, "instance": {"puzzle": first + i}} for i, (k, v) in enumerate(items(vals).items())}

    a = make_run(tmp_path, "a", {"lam": 0.0}, 1, with_instance([1, 0, 1, 0], 0))
    b = make_run(tmp_path, "b", {"lam": 0.5}, 1, with_instance([1, 1, 1, 1], 50))
    rep = paired_report(load_runs([a, b]), "lam=0")
    assert rep.arms[0]["metrics"] == {}
    assert any("seed 1" in p and "test item q0 is another item" in p and "not paired" in p for p in rep.problems), rep.problems
    c = make_run(tmp_path, "c", {"lam": 0.5}, 2, with_instance([1, 1, 1, 1], 0))
    d = make_run(tmp_path, "d", {"lam": 0.0}, 2, with_instance([1, 0, 1, 0], 0))
    rep = paired_report(load_runs([c, d]), "lam=0")
    assert metric(rep, "lam=0.5", "end_to_end")["mean"] == pytest.approx(0.5)


def test_an_item_scored_twice_is_a_problem_and_its_records_are_ignored(tmp_path):
    a = make_run(tmp_path, "a", {"lam": 0.0}, 1, items([1, 0]))
    b = make_run(tmp_path, "b", {"lam": 0.5}, 1, items([1, 1]))
    lines = (b / "eval.jsonl").read_text().splitlines()
    (b / "eval.jsonl").write_text("\n".join([*lines, lines[-1]]) + "\n")
    rep = paired_report(load_runs([a, b]), "lam=0")
    assert any("test item q1 is scored twice" in p for p in rep.problems), rep.problems
    assert metric(rep, "lam=0.5", "end_to_end")["per_seed"][0]["source"] == "summary.json"


def test_a_metric_one_run_did_not_score_is_named_as_such(tmp_path):
    """Without the counterfactual pass a run's records have no `cf_outcome`: that was reported as "no item in both
    runs" of runs that share every item."""
    a = make_run(tmp_path, "a", {"lam": 0.0}, 1, items([1, 0]))
    b = make_run(tmp_path, "b", {"lam": 0.5}, 1, items([1, 1]))
    recs = [json.loads(x) for x in (b / "eval.jsonl").read_text().splitlines()]
    (b / "eval.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "cf_outcome"}) + "\n" for r in recs))
    s = json.loads((b / "summary.json").read_text())
    s["final"]["reasoning"] = None
    (b / "summary.json").write_text(json.dumps(s))
    rep = paired_report(load_runs([a, b]), "lam=0")
    msg = next(p for p in rep.problems if "`reasoning`" in p)
    assert "scored on 0 / 2 of the items" in msg and "no item in both runs" not in msg
    assert metric(rep, "lam=0.5", "end_to_end")["mean"] == pytest.approx(0.5)


def test_hierarchical_bootstrap_matches_an_independent_implementation():
    """Seeds drawn with replacement, then items within each drawn seed, the mean over seeds of the item means:
    a plain loop over replicates gives the same percentile interval to Monte Carlo error."""
    import numpy as np

    per_seed = [np.array([1.0] * 30 + [0.0] * 70), np.array([1.0] * 10 + [0.0] * 90), np.array([1.0] * 20 + [-1.0] * 5 + [0.0] * 75)]
    lo, hi = hierarchical_bootstrap(per_seed, reps=4000, seed=3)
    rng = np.random.default_rng(11)
    means = []
    for _ in range(4000):
        seeds = rng.integers(3, size=3)
        means.append(np.mean([per_seed[s][rng.integers(100, size=100)].mean() for s in seeds]))
    want = np.quantile(means, [0.025, 0.975])
    assert lo == pytest.approx(want[0], abs=0.012) and hi == pytest.approx(want[1], abs=0.012)
    assert hierarchical_bootstrap(per_seed, reps=4000, seed=3) == (lo, hi)


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="named pipes")
@pytest.mark.parametrize("name", ["eval.jsonl", "summary.json"])
def test_a_named_pipe_in_a_run_directory_is_not_read(tmp_path, name):
    """`percep report` read a run's eval.jsonl and summary.json with `read_text`: one that is a named pipe (or a
    link to /dev/zero) blocked the report for ever. Only regular files are read: a pipe for eval.jsonl is a
    named problem (the summary pairs the run), one for summary.json makes the run directory no finished run."""
    import os

    a = make_run(tmp_path, "a", {"lam": 0.0}, 1, items([1.0, 0.0]))
    b = make_run(tmp_path, "b", {"lam": 0.5}, 1, items([1.0, 1.0]))
    (b / name).unlink()
    os.mkfifo(b / name)
    code = (
        "import sys; from pathlib import Path; from percepdsl_runtime.grid import report_command; "
        f"sys.exit(report_command([Path({str(a)!r}), Path({str(b)!r})], baseline='lam=0', out=Path({str(tmp_path / 'r')!r})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, cwd=REPO, text=True)
    assert "Traceback" not in proc.stderr, proc.stderr
    if name == "eval.jsonl":
        assert proc.returncode == EXIT_OK, proc.stderr
        problems = json.loads((tmp_path / "r" / "paired.json").read_text())["problems"]
        assert any(str(b / "eval.jsonl") in p and "not a regular file" in p for p in problems), problems
    else:
        assert proc.returncode == EXIT_USAGE and f"{b} is neither a grid directory" in proc.stderr, proc.stderr
