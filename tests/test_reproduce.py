"""benchmarks/reproduce.py: one command over both tasks and both methods. Its headline table copies every
number from the parts' report.json (which the plans' runners compute from the cells' records), its part
times come from the cells' own records, parts without cells are named "not run", `--quick`'s report says
in its first line that it is a miniature, the steps are delegated to the runners in order (the graph-colouring
GRPO plan starting from the SFT part's token-mean cell), and bad arguments exit cleanly. Synthetic finished
cells, as in tests/test_repro_report.py; nothing is trained here."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import repro  # noqa: E402
import repro_rl  # noqa: E402
import reproduce  # noqa: E402
from test_repro_report import fake_base  # noqa: E402 (tests/ is on sys.path under pytest)

from percepdsl.check import check_file  # noqa: E402

N = 40
T0 = dt.datetime(2026, 11, 30, 6, 0, tzinfo=dt.timezone.utc)


def mask(k: int) -> list[bool]:
    return [i < k for i in range(N)]


def finish(rd: Path, minutes: float, stage: str, final: dict, seed: int | None, diag: dict | None = None, cpu: float | None = None) -> Path:
    """The records `percep run` leaves last: environment.json (its start at T0) and summary.json, whose
    modification time (the cell's end) is set ``minutes`` after T0; ``cpu``: the stage's CPU seconds
    (None: a run from before they were recorded)."""
    (rd / "environment.json").write_text(json.dumps({"starts": [{"started": T0.isoformat(timespec="seconds"), "resumed": False}]}))
    summary = {
        "experiment": rd.name.rsplit("-", 1)[0],
        "status": "complete",
        "seed": seed,
        "params": {},
        "final": final,
        "final_stage": stage,
        "stages": {stage: {"train_seconds": 60.0, "cpu_seconds": cpu, **({"diagnostics": diag} if diag else {})}},
    }
    (rd / "summary.json").write_text(json.dumps(summary))
    end = T0.timestamp() + 60 * minutes
    os.utime(rd / "summary.json", (end, end))
    return rd


def sft_cell(runs: Path, spec: Path, seed: int, outcome: list[bool], perception: list[bool], reasoning: list[bool]) -> Path:
    rd = repro.run_dir(repro.Cell(spec, seed, ""), runs)
    rd.mkdir(parents=True)
    recs = [
        {"stage": "post", "final": True, "id": f"t/test/{i}", "outcome": o, "perception_exact": p, "cf_outcome": r}
        for i, (o, p, r) in enumerate(zip(outcome, perception, reasoning))
    ]
    (rd / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (rd / "metrics.csv").write_text("step,eff_lambda\n1,0.05\n")  # the λ curve's x
    final = {"end_to_end": float(np.mean(outcome)), "perception": float(np.mean(perception)), "reasoning": float(np.mean(reasoning))}
    return finish(rd, 10, "post", final, seed, cpu=300.0)


def rl_cell(runs: Path, spec: Path, seed: int, outcome: list[bool], perception: list[bool], r_reason: float, r_perc: float) -> Path:
    rd = repro.run_dir(repro.Cell(spec, seed, ""), runs)
    rd.mkdir(parents=True)
    recs = [
        {"stage": "rl", "final": True, "id": f"t/test/{i}", "outcome": o, "perception_exact": p, "cf_outcome": o}
        for i, (o, p) in enumerate(zip(outcome, perception))
    ]
    (rd / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    final = {"end_to_end": float(np.mean(outcome)), "perception": float(np.mean(perception)), "reasoning": float(np.mean(outcome))}
    diag = {
        "term_corr/outcome/reasoning": r_reason,
        "term_corr/outcome/perception": r_perc,
        "term_corr_group_mean/outcome/reasoning": r_reason,
        "term_corr_group_mean/outcome/perception": r_perc,
    }
    return finish(rd, 5, "rl", final, seed, diag)


def sudoku_parts(out: Path, specs: Path, seeds: tuple[int, ...]) -> None:
    """A finished sudoku SFT part (base; tm, ngdiff) and a finished sudoku GRPO part (outcome, alpha)."""
    sft = out / "sudoku-sft"
    fake_base(sft, "sudoku", mask(0), mask(14), task="t")
    for s in seeds:
        sft_cell(sft / "runs", specs / "sudoku_tm.pd", s, mask(10), mask(20), mask(24))
        sft_cell(sft / "runs", specs / "sudoku_ngdiff.pd", s, mask(10 + 2 * s), mask(30), mask(24))
    rl = out / "sudoku-grpo" / "runs"
    for s in seeds:
        rl_cell(rl, specs / "sudoku_rl_outcome.pd", s, mask(12), mask(20), 0.9, 0.2 + 0.05 * s)
        rl_cell(rl, specs / "sudoku_rl_alpha.pd", s, mask(12 - s), mask(26), 0.8, 0.4)


def test_the_headline_table_copies_the_parts_numbers_and_names_the_parts_not_run(tmp_path: Path) -> None:
    sudoku_parts(tmp_path, repro.SPECS, (1, 2, 3))
    assert reproduce.main(["--report", "--out", str(tmp_path)]) == 0
    top = json.loads((tmp_path / "report.json").read_text())
    text = (tmp_path / "report.md").read_text()
    sft = json.loads((tmp_path / "sudoku-sft" / "report.json").read_text())
    rl = json.loads((tmp_path / "sudoku-grpo" / "report.json").read_text())
    rows = {(r["finding"], r["comparison"]): r for r in top["rows"]}
    # F2: the part's paired difference on a, its interval and its pre-registered verdict, copied
    f2 = rows[("F2", "`ngdiff` − `tm`")]
    d = sft["paired"]["ngdiff"]["a"]
    assert (f2["value"], f2["lo"], f2["hi"], f2["verdict"]) == (d["mean"], d["lo"], d["hi"], d["verdict"])
    assert d["mean"] == pytest.approx(12 / (3 * N)) and d["verdict"] == "reproduced" and f2["seeds_items"] == f"3 × {N}"
    # F1: the paired gap (Δa_r − Δa_p) of the part's report, with its verdict
    f1 = rows[("F1", "`tm` − the reasoner base (token-averaged SFT)")]
    assert (f1["value"], f1["lo"], f1["hi"]) == tuple(sft["f1_paired"]["gap"][k] for k in ("mean", "lo", "hi"))
    assert f1["verdict"] == sft["f1_verdict"] == "not reproduced" and f1["value"] == pytest.approx(-0.25)
    # F3: the within-group gap over seeds; F4: the α-mixed arm's paired difference
    f3 = rows[("F3", "`outcome`: r(outcome term, reasoning correct) − r(outcome term, perception correct), within groups")]
    assert [f3["value"], f3["lo"], f3["hi"]] == rl["f3"]["outcome"]["within_gap"]["stats"] and f3["verdict"] == "reproduced"
    f4 = rows[("F4", "`alpha` − `outcome`")]
    assert f4["value"] == rl["paired"]["alpha"]["a"]["mean"] == pytest.approx(-2 / N) and f4["verdict"] == "not reproduced"
    assert "| F2 | sudoku 4×4 | `ngdiff` − `tm` | Δa (paired by item) | +0.100 |" in text and "**reproduced**" in text
    # the parts that did not run are said to be so; the time of those that did comes from their cells' records
    assert "| gc-sft | `p8`, `p8-500` | **not run** |" in text and "| gc-grpo | `gc8` | **not run** |" in text
    assert "**Not run**: gc-grpo, gc-sft" in text and top["not_run"] == ["gc-grpo", "gc-sft"]
    assert top["parts"]["sudoku-sft"]["time"]["cells"] == 6 and top["parts"]["sudoku-sft"]["time"]["cell_minutes"] == pytest.approx(60)
    assert top["parts"]["sudoku-grpo"]["time"]["cell_minutes"] == pytest.approx(30)
    # CPU time: summed where every cell recorded it (5 CPU-minutes each), "–" where a cell did not
    assert top["parts"]["sudoku-sft"]["time"]["cpu_minutes"] == pytest.approx(30)
    assert top["parts"]["sudoku-grpo"]["time"]["cpu_minutes"] is None
    assert "| ran | 6 | 60.0 min | 10.0 min | 6.0 min | 30.0 min |" in text and "| ran | 6 | 30.0 min | 5.0 min | 6.0 min | – |" in text
    # a task's time: its parts' first cell start to their last cell end (here both parts began at T0)
    assert "- sudoku 4×4: 10.0 min (2 part(s))" in text and "- graph colouring:" not in text
    assert "[sudoku-sft/report.md](sudoku-sft/report.md)" in text and "[paired.png](sudoku-sft/paired.png)" in text
    assert (tmp_path / "headline.png").stat().st_size > 0


def test_the_confirmatory_seeds_get_their_own_headline_row() -> None:
    """p8-500's report.json judges session 3's confirmatory seeds apart from seeds 1-3: the headline keeps
    both rows, the confirmatory one labelled, each with its own numbers and verdict."""
    diff = {"mean": 0.117, "lo": 0.089, "hi": 0.145, "per_seed": [0.148, 0.122, 0.08], "n_pairs": 1500}
    report = {
        "paired": {"ngdiff": {"a": {**diff, "mean": 0.111, "verdict": "exploratory: reproduced"}, "a_p": {"mean": 0.45}}},
        "confirmatory": {"paired": {"ngdiff": {"a": {**diff, "verdict": "reproduced"}, "a_p": {"mean": 0.44}}}},
    }
    rows = reproduce.rows_of(report, "sft", ("F2",), "tm")
    assert [(r["comparison"], r["value"], r["verdict"]) for r in rows] == [
        ("`ngdiff` − `tm`", 0.111, "exploratory: reproduced"),
        ("`ngdiff` − `tm` (confirmatory seeds)", 0.117, "reproduced"),
    ]
    assert rows[1]["seeds_items"] == "3 × 500" and rows[1]["also"] == {"Δa_p": 0.44}


def test_an_unpaired_f1_row_gives_the_changes_of_all_its_seeds() -> None:
    """When F1's rule reads the unpaired interval (the arms' seeds 2-3 scored other test items than the base), the
    paired means cover seed 1 only: the row's a_r and a_p are the unpaired changes over the same three seeds."""
    gap = {"mean": -0.086, "lo": -0.138, "hi": -0.034, "per_seed": [-0.086], "n_pairs": 500}
    report = {
        "base": {"n": 500},
        "f1": {"mean": -0.087, "lo": -0.137, "hi": -0.036, "per_seed": [-0.086, -0.088, -0.086], "delta": {"a_r": -0.071, "a_p": 0.015}},
        "f1_paired": {"gap": gap, "a_r": {**gap, "mean": -0.074}, "a_p": {**gap, "mean": 0.012}},
        "f1_rule": "unpaired",
        "f1_verdict": "not reproduced",
    }
    (row,) = reproduce.rows_of(report, "sft", ("F1",), "tm")
    assert (row["statistic"], row["value"], row["lo"], row["hi"]) == ("Δa_r − Δa_p (unpaired)", -0.087, -0.137, -0.036)
    assert row["also"] == {"a_r": -0.071, "a_p": 0.015} and row["seeds_items"] == "3 × 500"


def test_quick_reports_a_miniature_in_its_first_line_and_gives_no_verdict(tmp_path: Path) -> None:
    sudoku_parts(tmp_path, reproduce.QUICK_SPECS, reproduce.QUICK_SEEDS)
    assert reproduce.main(["--quick", "--report", "--out", str(tmp_path), "--tasks", "sudoku"]) == 0
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# MINIATURE reproduction (`reproduce.py --quick`)")
    assert "miniature, no verdict (the rule reads: 2 of 3 seeds: no verdict)" in text  # sudoku's F2 rule needs 3 seeds
    assert "| F2 | sudoku 4×4 | `ngdiff` − `tm` | Δa (paired by item) | +0.075 |" in text
    # each part's own report is marked too, and the parts left out by --tasks are not run
    assert "MINIATURE (`specs/repro/quick`" in (tmp_path / "sudoku-sft" / "report.md").read_text().splitlines()[0]
    assert "MINIATURE" in (tmp_path / "sudoku-grpo" / "report.md").read_text().splitlines()[0]
    assert "**Not run**: gc-grpo, gc-sft" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks", "chess"], "--tasks: unknown chess; choose from gc,sudoku"),
        (["--methods", ","], "--methods: none given"),
        (["--jobs", "0"], "--jobs 0: give at least 1"),
        (["--start-by", "9am"], "--start-by '9am': give HH:MM"),
    ],
)
def test_bad_arguments_exit_cleanly(argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        reproduce.main([*argv, "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_parts_are_delegated_in_order_and_gc_grpo_starts_from_the_sft_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runners are replaced by ones that record their calls (and leave gc-sft's token-mean seed-1 cell):
    p8, then p8-500 re-evaluating p8's folder from its base and, beside it, the GRPO plan from that cell's stage."""
    calls: list[tuple] = []

    def sft(plan: str, folder: Path, arms: list[str], seeds: list[int], **kw) -> tuple[Path | None, list[str]]:
        calls.append(("sft", plan, folder, kw["base_model"], kw["reeval_from"]))
        if plan == "p8":
            (folder / "gc8_base").mkdir(parents=True)
            rd = repro.run_dir(repro.Cell(repro.SPECS / "gc8_tm.pd", 1, ""), folder / "runs")
            (rd / "stages" / "post").mkdir(parents=True)
            finish(rd, 3, "post", {}, 1)
        return folder / "report.md", []

    def rl(plan: str, folder: Path, arms: list[str], seeds: list[int], **kw) -> tuple[Path | None, list[str]]:
        calls.append(("grpo", plan, folder, kw["start"], arms))
        return folder / "report.md", ["alpha-s1"]

    monkeypatch.setattr(repro, "run_plan", sft)
    monkeypatch.setattr(repro_rl, "run_plan", rl)
    assert reproduce.main(["--out", str(tmp_path), "--tasks", "gc"]) == 3  # a failed cell: exit 3
    p8 = tmp_path / "gc-sft" / "p8"
    tm = repro.run_dir(repro.Cell(repro.SPECS / "gc8_tm.pd", 1, ""), p8 / "runs")
    # p8 first; then p8-500 and the GRPO plan, side by side (either may be called first)
    assert calls[0] == ("sft", "p8", p8, None, None)
    assert sorted(calls[1:], key=str) == [
        ("grpo", "gc8", tmp_path / "gc-grpo", tm / "stages" / "post", ["outcome", "alpha", "sc_majority"]),
        ("sft", "p8-500", tmp_path / "gc-sft", p8 / "gc8_base", p8),
    ]
    text = (tmp_path / "report.md").read_text()
    assert "| gc-grpo | `gc8` | **not run** (failed: alpha-s1) |" in text and "| gc-sft | `p8`, `p8-500` | ran | 1 | 3.0 min |" in text
    # a base that fails leaves the part's later steps unrun
    calls.clear()
    monkeypatch.setattr(repro, "run_plan", lambda plan, folder, *a, **kw: calls.append(plan) or (None, ["base"]))
    assert reproduce.main(["--out", str(tmp_path / "again"), "--tasks", "gc", "--methods", "sft"]) == 3
    assert calls == ["p8"]


@pytest.mark.parametrize("spec", sorted(reproduce.QUICK_SPECS.glob("*.pd")), ids=lambda p: p.name)
def test_a_quick_spec_is_its_plan_s_spec_in_miniature(spec: Path) -> None:
    """Each miniature has the task, roles, model kind and stages (kind, loss, reward) of the pre-registered
    spec of the same name; only sizes (steps, batch, test items) differ."""
    full, mini = (check_file(p, {}, fragment_ok=False).ir.model_dump(mode="json") for p in (repro.SPECS / spec.name, spec))
    assert mini["name"] == full["name"] and mini["task"] == full["task"] and mini["roles"] == full["roles"]
    assert mini["model"]["kind"] == full["model"]["kind"]
    keys = ("kind", "name", "parent", "loss", "reward")
    assert [{k: s.get(k) for k in keys} for s in mini["stages"]] == [{k: s.get(k) for k in keys} for s in full["stages"]]
    assert mini["eval"]["test"] < full["eval"]["test"]


def test_every_quick_part_has_its_specs() -> None:
    for (task, method), steps in reproduce.QUICK.items():
        for step in steps:
            if method == "sft":
                prefix = repro.PLANS[step.plan]
                stems = [stem for stem, _ in repro.BASES.get(prefix, (("base", ""),))] + list(step.arms)
            else:
                plan = repro_rl.PLANS[step.plan]
                prefix = plan.prefix
                stems = list(step.arms) + ([plan.before] if plan.before else [])
                assert all((reproduce.QUICK_SPECS / spec).exists() for spec, *_ in plan.chain)
            assert all((reproduce.QUICK_SPECS / f"{prefix}_{s}.pd").exists() for s in stems), (task, method)


def test_slots_cap_the_cells_and_a_waiting_gate_goes_first() -> None:
    slots = repro.Slots(2)
    assert slots.take(False) and slots.take(False) and not slots.take(True)  # full
    slots.waiting_gate(1)  # a base waits
    slots.release(None)
    assert not slots.take(False)  # an arm does not take the slot the base waits for
    assert slots.take(True)
    slots.waiting_gate(-1)
    slots.release(None)
    assert slots.take(False)
    slots.interrupt()
    slots.release(None)
    assert not slots.take(True)  # interrupted: nothing starts


def sleeper_cells(monkeypatch: pytest.MonkeyPatch, stamps: Path, seconds: float) -> None:
    """Cells are processes that note their start and end in ``stamps`` and sleep ``seconds`` before
    leaving summary.json (a cell is done when it exists), each in OUT/runs/<label>."""
    code = (
        "import json, sys, time; from pathlib import Path; rd, f = Path(sys.argv[1]), open(sys.argv[2], 'a');"
        "f.write(json.dumps(['start', rd.name, time.time()]) + '\\n'); f.flush(); time.sleep(float(sys.argv[3]));"
        "f.write(json.dumps(['end', rd.name, time.time()]) + '\\n'); rd.mkdir(parents=True, exist_ok=True);"
        "(rd / 'summary.json').write_text('{}')"
    )
    monkeypatch.setattr(repro, "run_dir", lambda c, runs: runs / c.label)
    monkeypatch.setattr(repro, "command", lambda c, runs: [sys.executable, "-c", code, str(runs / c.label), str(stamps), str(seconds)])


def concurrency(stamps: Path) -> int:
    """The most cells that ran at once, from their stamps."""
    events = sorted((t, 1 if kind == "start" else -1) for kind, _, t in map(json.loads, stamps.read_text().splitlines()))
    return max(np.cumsum([d for _, d in events]))


def test_parts_side_by_side_share_the_slots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two threads (two parts) over one Slots(2): a base, then its arms, beside another part's cells;
    never more than two cells at once, and all of them run."""
    stamps = tmp_path / "stamps.jsonl"
    sleeper_cells(monkeypatch, stamps, 0.5)
    monkeypatch.setattr(repro, "SLOTS", repro.Slots(2))
    failed: dict[str, list[str]] = {}  # filled by the threads, checked here (an assert in a thread fails no test)

    def cell(label: str) -> repro.Cell:
        return repro.Cell(tmp_path / "x.pd", None, label)

    def part_a() -> None:
        failed["base"] = repro.run_cells([cell("base")], tmp_path / "a", 1, gate=True)
        failed["a"] = repro.run_cells([cell(f"a{i}") for i in range(3)], tmp_path / "a", 2)

    def part_b() -> None:
        failed["b"] = repro.run_cells([cell(f"b{i}") for i in range(3)], tmp_path / "b", 2)

    threads = [threading.Thread(target=f) for f in (part_a, part_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert failed == {"base": [], "a": [], "b": []}
    ran = {name for kind, name, _ in map(json.loads, stamps.read_text().splitlines()) if kind == "end"}
    assert ran == {"base", "a0", "a1", "a2", "b0", "b1", "b2"}
    assert concurrency(stamps) == 2


def test_an_interrupt_stops_every_part_s_cells(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Slots.interrupt (the main thread's Ctrl-C) sends SIGINT to the live cells of every part and starts
    no more: the parts' run_cells return their interrupted cells as failed, the rest never started."""
    stamps = tmp_path / "stamps.jsonl"
    sleeper_cells(monkeypatch, stamps, 60)
    slots = repro.Slots(2)
    monkeypatch.setattr(repro, "SLOTS", slots)
    results: dict[str, list[str]] = {}

    def part(name: str) -> None:
        results[name] = repro.run_cells([repro.Cell(tmp_path / "x.pd", None, f"{name}{i}") for i in range(2)], tmp_path / name, 1)

    threads = [threading.Thread(target=part, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    deadline = time.time() + 60
    while (not stamps.exists() or len(stamps.read_text().splitlines()) < 2) and time.time() < deadline:
        time.sleep(0.1)
    slots.interrupt()
    for t in threads:
        t.join(60)
    assert results == {"a": ["a0"], "b": ["b0"]}
    assert [kind for kind, _, _ in map(json.loads, stamps.read_text().splitlines())] == ["start", "start"]


def test_a_task_s_parts_run_side_by_side(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sudoku's SFT and GRPO parts (neither starts from the other) run at once: each fake runner waits
    until the other has been entered, which only two parts side by side can satisfy."""
    entered = {"sft": threading.Event(), "grpo": threading.Event()}

    def runner(method: str):
        def run(plan: str, folder: Path, *a, **kw) -> tuple[Path | None, list[str]]:
            entered[method].set()
            other = entered["grpo" if method == "sft" else "sft"]
            return (folder / "report.md", []) if other.wait(30) else (None, ["not side by side"])

        return run

    monkeypatch.setattr(repro, "run_plan", runner("sft"))
    monkeypatch.setattr(repro_rl, "run_plan", runner("grpo"))
    assert reproduce.main(["--out", str(tmp_path), "--tasks", "sudoku"]) == 0


def test_progress_lines_of_parts_side_by_side_do_not_interleave(capsys: pytest.CaptureFixture[str]) -> None:
    """Each part's thread prints its lines after its tag, each line whole (`say` writes a line and its
    newline at once; `print` wrote them apart and a real run interleaved two parts' first lines). The
    race needs an I/O wait between the two writes, which this test cannot force: it checks the lines'
    form from two threads, not the race."""

    def part(tag: str) -> None:
        repro.tagged(tag)
        for i in range(300):
            repro.say(f"  start   cell-{i}")

    threads = [threading.Thread(target=part, args=(t,)) for t in ("gc-sft", "gc-grpo")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 600 and all(re.fullmatch(r"gc-(sft|grpo): start   cell-\d+", line) for line in lines)


def test_an_f3_with_undefined_r_gives_no_verdict_and_a_headline_without_nan(tmp_path: Path) -> None:
    """With every seed's within-group r with perception undefined (perception correctness constant within every
    group), F3's gap has no value: its part's report.json held `NaN` (not JSON), the headline read the verdict
    "not reproduced", and once the value is null, not NaN, the headline plot could not draw the row. Now the row's
    numbers are null in report.json and – in report.md, its verdict says why it is undefined, and the plot leaves it out."""
    sudoku_parts(tmp_path, repro.SPECS, (1, 2, 3))
    rl = tmp_path / "sudoku-grpo" / "runs"
    for rd in rl.iterdir():
        if rd.name.startswith("repro_sudoku_rl_outcome-"):
            summary = json.loads((rd / "summary.json").read_text())
            summary["stages"]["rl"]["diagnostics"]["term_corr_group_mean/outcome/perception"] = None
            (rd / "summary.json").write_text(json.dumps(summary))
    assert reproduce.main(["--report", "--out", str(tmp_path)]) == 0

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    top = json.loads((tmp_path / "report.json").read_text(), parse_constant=refuse)
    json.loads((tmp_path / "sudoku-grpo" / "report.json").read_text(), parse_constant=refuse)
    (f3,) = [r for r in top["rows"] if r["finding"] == "F3"]
    assert (f3["value"], f3["lo"], f3["hi"]) == (None, None, None) and f3["verdict"].startswith("undefined: ")
    line = next(ln for ln in (tmp_path / "report.md").read_text().splitlines() if ln.startswith("| F3 |"))
    assert "| – | [–, –] | **undefined: " in line and "nan" not in line.lower()
    assert (tmp_path / "headline.png").stat().st_size > 0
