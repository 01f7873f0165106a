"""`percep grid` / `percep report`: planning, scheduling, resumability, failure isolation,
SIGINT, aggregation and the Ray backend — against `tests/fake_run.py`, a stand-in trainer that
keeps `percep run`'s contract (run dir named by the IR hash, atomic complete summary.json)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from percepdsl.check import check_file
from percepdsl.ir import content_hash
from percepdsl_runtime.grid import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    GridError,
    aggregate,
    grid_command,
    plan_grid,
    report_command,
)
from percepdsl_runtime.grid.results import table_csv, table_markdown
from percepdsl_runtime.grid.state import GridLock

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "specs" / "grids" / "smoke.pd"
FAKE = [sys.executable, str(REPO / "tests" / "fake_run.py")]
FAKE_VARS = ("FAKE_RUN_CALLS", "FAKE_RUN_SLEEP", "FAKE_RUN_SLOW", "FAKE_RUN_FAIL", "FAKE_RUN_FAIL_AFTER", "FAKE_RUN_FINISH_ON_INTERRUPT")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for v in FAKE_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("FAKE_RUN_CALLS", str(tmp_path / "calls.jsonl"))


def calls(tmp_path: Path) -> list[dict]:
    f = tmp_path / "calls.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def run_grid(out: Path, grid: Path = SMOKE, **kw) -> tuple[int, str, str]:
    o, e = io.StringIO(), io.StringIO()
    kw.setdefault("launcher", FAKE)
    rc = grid_command(grid, out=out, stdout=o, stderr=e, **kw)
    return rc, o.getvalue(), e.getvalue()


def state(out: Path) -> dict:
    return json.loads((out / "grid_state.json").read_text())


def start_driver(out: Path, ignore_sigint: bool = False, **kw) -> subprocess.Popen:
    """`grid_command` in a process of its own (what `percep grid` is), so that it can be signalled.
    `ignore_sigint`: started as a shell starts a background job (SIGINT ignored)."""
    args = ", ".join(f"{k}={v!r}" for k, v in {"out": str(out), "launcher": FAKE, **kw}.items())
    code = (
        "import sys; from pathlib import Path; from percepdsl_runtime.grid import grid_command; "
        f"kw = dict({args}); kw['out'] = Path(kw['out']); sys.exit(grid_command(Path({str(SMOKE)!r}), **kw))"
    )
    if ignore_sigint:
        code = "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); " + code
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_two_done_two_running(proc: subprocess.Popen, out: Path, slow_dirs: list[Path], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            counts = state(out)["counts"]
        except (OSError, ValueError, KeyError):
            counts = {}
        if counts.get("done") == 2 and counts.get("running") == 2 and all((d / "progress.json").exists() for d in slow_dirs):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"the grid never had 2 cells done and 2 running: {proc.communicate()}")


def interrupt(proc: subprocess.Popen, sig: int = signal.SIGINT) -> str:
    """SIGINT, as Ctrl-C would send (or SIGTERM); the grid must stop its cells promptly and exit 130."""
    t0 = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert time.monotonic() - t0 < 10, err  # the sleeping cells were stopped, not waited for
    assert "interrupted: 2/4 cells done, 2 stopped" in err
    return err


def smoke_hash(lam: str, seed: int) -> str:
    ir = check_file(REPO / "specs" / "sft_smoke.pd", {"lam": lam, "seed": str(seed)}, fragment_ok=False).ir
    return f"{ir.name}-{content_hash(ir)}"


@pytest.fixture
def two_param_grid(tmp_path: Path) -> Path:
    """A template with a swept param (lam) and one a --set may fix (post_steps)."""
    (tmp_path / "tmpl.pd").write_text(
        textwrap.dedent("""\
        experiment tmpl
        param lam: float = 0.5
        param post_steps: int = 4
        seed 0
        task graph_coloring { nodes = 4, reasoning = brief, train = 64, test = 8 }
        model tiny { width = 64, depth = 2, heads = 2, vision_width = 32, vision_depth = 1 }
        stage base = sft { steps = 12, batch = 4 }
        stage post = sft from base {
          steps = post_steps
          batch = 4
          loss = lam * mean(perception) + (1 - lam) * mean(reasoning, answer)
        }
        eval { test = 8, max_new_tokens = 48 }
        """)
    )
    grid = tmp_path / "g.pd"
    grid.write_text('grid g\ntemplate "tmpl.pd"\naxis lam = [0.25, 0.75]\nseeds [0, 1]\nwhere post_steps > 2\n')
    return grid


# ---- planning and --dry-run -------------------------------------------------------------------------


def test_dry_run_lists_cells_with_ir_hashes_and_runs_nothing(tmp_path):
    out = tmp_path / "g"
    rc, listing, _ = run_grid(out, dry_run=True)
    assert rc == EXIT_OK
    assert "4 cells (2 settings, 2 seeds)" in listing
    for lam, seed in [("0.25", 0), ("0.25", 1), ("0.75", 0), ("0.75", 1)]:
        line = next(ln for ln in listing.splitlines() if smoke_hash(lam, seed) in ln)
        assert line.split()[1:3] == [lam, str(seed)] and line.rstrip().endswith("pending")
    assert "0 done, 4 pending" in listing
    assert calls(tmp_path) == [] and not out.exists()


def test_plan_matches_percep_run_hash_and_default_out_dir():
    plan = plan_grid(SMOKE)
    assert plan.out_dir == (Path("runs/grids") / "smoke").absolute()
    assert [c.name for c in plan.cells] == [smoke_hash("0.25", 0), smoke_hash("0.25", 1), smoke_hash("0.75", 0), smoke_hash("0.75", 1)]
    assert plan.cells[0].run_args(plan.template, resume=False)[1:] == ["--set", "lam=0.25", "--set", "seed=0", "--out", str(plan.cells_dir)]


def test_set_fixes_a_template_param_for_every_cell(two_param_grid, tmp_path):
    plan = plan_grid(two_param_grid, tmp_path / "out", ["post_steps=6"])
    assert [c.cell.params for c in plan.cells] == [{"post_steps": 6, "lam": 0.25}] * 2 + [{"post_steps": 6, "lam": 0.75}] * 2
    ir = check_file(two_param_grid.parent / "tmpl.pd", {"lam": "0.75", "post_steps": "6", "seed": "1"}, fragment_ok=False).ir
    assert plan.cells[3].hash == content_hash(ir)
    assert plan_grid(two_param_grid, tmp_path / "out").cells[3].hash != content_hash(ir)


def test_a_grid_runs_a_template_that_leaves_its_swept_param_without_a_default(two_param_grid, tmp_path):
    tmpl = tmp_path / "tmpl.pd"
    tmpl.write_text(tmpl.read_text().replace("param lam: float = 0.5", "param lam: float"))
    rc, _, err = run_grid(tmp_path / "g", grid=two_param_grid, sets=["post_steps=3"])
    assert rc == EXIT_OK, err
    assert sorted((c["params"]["lam"], c["params"]["post_steps"]) for c in state(tmp_path / "g")["cells"]) == [
        (0.25, 3),
        (0.25, 3),
        (0.75, 3),
        (0.75, 3),
    ]


@pytest.mark.parametrize(
    "sets, message",
    [
        (["lam=0.5"], "`lam` is swept by an axis"),
        (["seed=3"], "sweeps seeds"),
        (["post_step=3"], "did you mean `post_steps`"),
        (["post_steps=0.5"], "does not compile with --set values"),
        (["post_steps=1"], "no cells"),  # the `where post_steps > 2` filter rejects every cell
        (["post_steps"], "malformed --set"),
    ],
)
def test_bad_set_is_refused_before_anything_runs(two_param_grid, tmp_path, sets, message):
    with pytest.raises(GridError, match=message):
        plan_grid(two_param_grid, tmp_path / "out", sets)
    rc, _, err = run_grid(tmp_path / "out", two_param_grid, sets=sets)
    assert rc == EXIT_USAGE and message in err
    assert calls(tmp_path) == []


def test_refuses_experiment_specs_broken_grids_and_bad_options(tmp_path):
    assert run_grid(tmp_path / "o", REPO / "specs" / "sft_smoke.pd")[0] == EXIT_USAGE
    bad = tmp_path / "bad.pd"
    bad.write_text(f'grid bad\ntemplate "{REPO}/specs/sft_smoke.pd"\naxis lamb = [0.1]\n')
    rc, _, err = run_grid(tmp_path / "o", bad)
    assert rc == EXIT_USAGE and "unknown-axis-param" in err and "did you mean `lam`" in err
    assert run_grid(tmp_path / "o", jobs=0)[0] == EXIT_USAGE
    assert run_grid(tmp_path / "o", address="127.0.0.1:6379")[0] == EXIT_USAGE
    (tmp_path / "a_file").write_text("mine")
    for out, says in (("a_file", "exists and is not a directory"), ("a_file/sub", "is a file, not a directory")):
        rc, _, err = run_grid(tmp_path / out)
        assert rc == EXIT_USAGE and f"cannot use the grid directory: {tmp_path / out}" in err and says in err
    assert (tmp_path / "a_file").read_text() == "mine"
    assert calls(tmp_path) == []


# ---- execution ---------------------------------------------------------------------------------------


def test_runs_cells_writes_results_and_skips_finished_cells(tmp_path):
    out = tmp_path / "g"
    rc, table, err = run_grid(out, jobs=2)
    assert rc == EXIT_OK, err
    assert "warning: --jobs 2" in err or (os.cpu_count() or 1) >= 4
    st = state(out)
    assert st["status"] == "complete" and st["counts"]["done"] == 4
    assert {c["status"] for c in st["cells"]} == {"done"} and all(c["exit_code"] == 0 for c in st["cells"])
    for c in st["cells"]:
        summary = json.loads((out / c["run_dir"] / "summary.json").read_text())
        assert summary["hash"] == c["hash"] and (out / c["log"]).read_text().count("fake run") == 2
    assert len(calls(tmp_path)) == 4 and not any(c["resume"] for c in calls(tmp_path))
    for f in ("results.csv", "results.md", "tradeoff.png", "metrics_vs_lam.png"):
        assert (out / f).stat().st_size > 0
    assert "| 0.25 | 2 | 0 |" in table

    rc, _, err = run_grid(out)  # everything done: nothing is launched again
    assert rc == EXIT_OK and "4 already done, 0 to run" in err
    assert len(calls(tmp_path)) == 4
    rc, listing, _ = run_grid(out, dry_run=True)
    assert "4 done, 0 pending" in listing


def test_parallel_cells_split_the_cores_this_process_may_use_not_the_machines(monkeypatch):
    """Under a SLURM allocation, `taskset` or a container's cpuset the grid may use 2 of a node's 64 cores:
    `--jobs 2` gave each cell os.cpu_count() // 2 = 32 OpenMP threads on 2 cores, which stall each other."""
    from percepdsl_runtime.grid.execute import thread_env
    from percepdsl_runtime.ranks import usable_cpus

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert usable_cpus() == 2
    assert thread_env(2) == {"OMP_NUM_THREADS": "1"} and thread_env(4) == {"OMP_NUM_THREADS": "1"}
    assert thread_env(1) == {}


def test_failed_cells_are_recorded_do_not_stop_others_and_are_retried(tmp_path, monkeypatch):
    out = tmp_path / "g"
    monkeypatch.setenv("FAKE_RUN_FAIL", "lam=0.75")
    rc, _, err = run_grid(out, jobs=2)
    assert rc == EXIT_FAILED
    st = state(out)
    assert st["status"] == "failed" and st["counts"] == {"done": 2, "pending": 0, "running": 0, "failed": 2, "interrupted": 0}
    failed = [c for c in st["cells"] if c["status"] == "failed"]
    assert [c["grid_params"]["lam"] for c in failed] == [0.75, 0.75]
    for c in failed:
        assert c["exit_code"] == 3 and "RuntimeError: fake failure" in c["log_tail"]
        assert (out / c["log"]).exists()
    assert "failed: lam=0.75 seed=0 (exit 3)" in err and "RuntimeError: fake failure" in err
    csv_rows = (out / "results.csv").read_text().splitlines()
    assert csv_rows[2].startswith("0.75,0,,2,")  # lam, n_seeds, seeds, n_failed
    rc, listing, _ = run_grid(out, dry_run=True)
    assert listing.count("failed (exit 3), will resume") == 2

    monkeypatch.delenv("FAKE_RUN_FAIL")
    rc, _, err = run_grid(out)
    assert rc == EXIT_OK, err
    again = calls(tmp_path)[4:]
    assert len(again) == 2 and all(c["resume"] for c in again)  # the failed runs' dirs exist: --resume
    assert state(out)["counts"]["done"] == 4 and "0.75,2,0;1,0," in (out / "results.csv").read_text()


def test_a_grid_directory_is_run_by_one_grid_at_a_time(tmp_path):
    out = tmp_path / "g"
    with GridLock(out):
        rc, _, err = run_grid(out)
        assert rc == EXIT_USAGE and "in use by another `percep grid` (pid" in err
        assert run_grid(out, dry_run=True)[0] == EXIT_OK  # looking is always allowed
    assert calls(tmp_path) == []


def test_a_launcher_that_cannot_start_fails_each_cell_without_a_traceback(tmp_path):
    rc, _, err = run_grid(tmp_path / "g", launcher=[str(tmp_path / "no-such-trainer")])
    assert rc == EXIT_FAILED and "Traceback" not in err
    cells = state(tmp_path / "g")["cells"]
    assert all(c["status"] == "failed" and c["exit_code"] == 127 and "cannot start" in c["log_tail"] for c in cells)


def test_a_grid_directory_damaged_between_runs_is_named_not_a_traceback(tmp_path):
    """A grid directory changed by hand between two runs of a grid: `cells` made a file, or
    grid_state.json a directory, ended `percep grid` in a FileExistsError / IsADirectoryError
    traceback; now it is refused before any cell runs (exit 2) naming the path. A cell's log that is
    a directory ended it in a traceback too; now that cell fails (exit 127, the log named) and the
    others run."""
    out = tmp_path / "g"
    out.mkdir()
    (out / "cells").write_text("not a directory")
    rc, _, err = run_grid(out)
    assert rc == EXIT_USAGE and "Traceback" not in err and f"cannot use the grid directory: {out / 'cells'} exists" in err
    assert calls(tmp_path) == [] and (out / "cells").read_text() == "not a directory"
    (out / "cells").unlink()
    (out / "grid_state.json").mkdir()
    rc, _, err = run_grid(out)
    assert rc == EXIT_USAGE and "cannot use the grid directory" in err and "grid_state.json" in err and calls(tmp_path) == []
    (out / "grid_state.json").rmdir()
    log = out / "cells" / f"{smoke_hash('0.25', 0)}.log"
    log.mkdir(parents=True)
    rc, _, err = run_grid(out)
    assert rc == EXIT_FAILED and "Traceback" not in err and len(calls(tmp_path)) == 3
    failed = [c for c in state(out)["cells"] if c["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["exit_code"] == 127 and f"Is a directory: {log}" in failed[0]["log_tail"]
    log.rmdir()
    assert run_grid(out)[0] == EXIT_OK and len(calls(tmp_path)) == 4  # the way out: the failed cell runs


def test_exit_zero_without_a_complete_summary_is_a_failure(tmp_path):
    out = tmp_path / "g"
    rc, _, err = run_grid(out, launcher=[sys.executable, "-c", "print('did nothing')"])
    assert rc == EXIT_FAILED
    c = state(out)["cells"][0]
    assert c["status"] == "failed" and c["exit_code"] == 0 and "no complete summary.json" in c["log_tail"]


@pytest.mark.parametrize("sig, background", [(signal.SIGINT, False), (signal.SIGTERM, True)], ids=["sigint", "sigterm-bg"])
def test_sigint_stops_running_cells_keeps_finished_ones_and_rerun_resumes(tmp_path, monkeypatch, sig, background):
    out = tmp_path / "g"
    monkeypatch.setenv("FAKE_RUN_SLEEP", "120")
    monkeypatch.setenv("FAKE_RUN_SLOW", "lam=0.75")
    slow_dirs = [out / "cells" / smoke_hash("0.75", s) for s in (0, 1)]
    proc = start_driver(out, ignore_sigint=background, jobs=2)
    wait_for_two_done_two_running(proc, out, slow_dirs)
    interrupt(proc, sig)
    st = state(out)
    assert st["status"] == "interrupted" and st["counts"]["done"] == 2 and st["counts"]["interrupted"] == 2
    for c in calls(tmp_path):  # no cell process outlives the grid
        with pytest.raises(ProcessLookupError):
            os.kill(c["pid"], 0)
    for d in slow_dirs:  # stopped by SIGINT (they could save state), not killed
        assert d.is_dir() and not (d / "summary.json").exists()
    rerun_resumes_the_stopped_cells(out, tmp_path, monkeypatch, slow_dirs)
    assert all(json.loads((d / "summary.json").read_text())["resumed"] for d in slow_dirs)


def rerun_resumes_the_stopped_cells(out, tmp_path, monkeypatch, slow_dirs) -> None:
    """The stopped cells logged their interruption, and the grid run again resumes exactly them."""
    for d in slow_dirs:
        assert (out / "cells" / f"{d.name}.log").read_text().rstrip().endswith("interrupted")
    monkeypatch.delenv("FAKE_RUN_SLEEP")
    rc, _, err = run_grid(out)
    assert rc == EXIT_OK, err
    again = calls(tmp_path)[4:]
    assert sorted(c["name"] for c in again) == sorted(d.name for d in slow_dirs) and all(c["resume"] for c in again)


def test_a_cell_that_finishes_while_being_stopped_is_done_not_interrupted(tmp_path, monkeypatch):
    """Ctrl-C reached a cell at its last step and it finished (summary.json, exit 0) in the grace period; the grid
    recorded it `interrupted` and said so ("2/4 cells done, 2 stopped") though the cell was complete."""
    out = tmp_path / "g"
    monkeypatch.setenv("FAKE_RUN_SLEEP", "120")
    monkeypatch.setenv("FAKE_RUN_SLOW", "lam=0.75")
    monkeypatch.setenv("FAKE_RUN_FINISH_ON_INTERRUPT", "1")
    slow_dirs = [out / "cells" / smoke_hash("0.75", s) for s in (0, 1)]
    proc = start_driver(out, jobs=2)
    wait_for_two_done_two_running(proc, out, slow_dirs)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "interrupted: 4/4 cells done, 0 stopped" in err
    st = state(out)
    assert st["counts"]["done"] == 4 and st["counts"]["interrupted"] == 0, st["counts"]


def test_a_grid_killed_outright_does_not_leave_its_cells_running(tmp_path, monkeypatch):
    """SIGKILL of `percep grid` (an OOM killer, `kill -9`, a dead ssh session's job) cannot stop its cells;
    they ran on in their own sessions, so the re-run (the lock died with the driver) started a second
    process on each unfinished cell's run directory. Now each cell is asked to stop (SIGINT: it keeps
    its resume checkpoint) when the grid process dies, and the re-run resumes it alone."""
    out = tmp_path / "g"
    monkeypatch.setenv("FAKE_RUN_SLEEP", "120")
    monkeypatch.setenv("FAKE_RUN_SLOW", "lam=0.75")
    slow_dirs = [out / "cells" / smoke_hash("0.75", s) for s in (0, 1)]
    proc = start_driver(out, jobs=2)
    wait_for_two_done_two_running(proc, out, slow_dirs)
    proc.kill()
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 10
    pids = [c["pid"] for c in calls(tmp_path)[2:]]

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in pids if alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, "cell processes outlived the killed grid"
    rerun_resumes_the_stopped_cells(out, tmp_path, monkeypatch, slow_dirs)


# ---- aggregation and `percep report` -------------------------------------------------------------


def _summary(lam: float, seed: int, e2e: float, p: float, r: float, base_p: float = 0.0, corr: float | None = None) -> dict:
    diag = {"token_share": {"perception": 0.02, "reasoning": 0.9}, "grad_norm": {"perception": 3.0}}
    if corr is not None:
        diag["reward_reasoning_corr"] = corr
        diag["term_corr_groups/outcome/reasoning"] = 3  # a count beside the correlations: no column
    return {
        "experiment": "x",
        "hash": f"h{lam}{seed}",
        "status": "complete",
        "params": {"lam": lam, "steps": 10},
        "seed": seed,
        "final": {"end_to_end": e2e, "perception": p, "reasoning": r},
        "stages": {
            "base": {"metrics": {"end_to_end": 0.1, "perception": base_p, "reasoning": 0.5}},
            "post": {"metrics": {"end_to_end": e2e, "perception": p, "reasoning": r}},
        },
        "diagnostics": diag,
    }


def test_aggregate_means_stds_deltas_diagnostics_and_failures():
    summaries = [_summary(0.5, 1, 0.4, 0.6, 0.8, corr=0.7), _summary(0.5, 2, 0.6, 0.8, 0.9, corr=0.5), _summary(0.0, 1, 0.3, 0.2, 0.9)]
    state = {
        "grid": "lam",
        "axes": ["lam"],
        "report": ["end_to_end", "perception", "reasoning"],
        "cells": [
            {"hash": "h0.02", "status": "failed", "params": {"lam": 0.0, "steps": 10}, "seed": 2},
            {"hash": "h0.51", "status": "done", "params": {"lam": 0.5, "steps": 10}, "seed": 1},
        ],
    }
    t = aggregate(summaries, state)
    assert t.axes == ["lam"] and t.constant == {"steps": 10} and t.stages == ("base", "post")
    assert [c.key for c in t.columns] == [
        "end_to_end",
        "perception",
        "reasoning",
        "delta_end_to_end",
        "delta_perception",
        "delta_reasoning",
        "diag.token_share.perception",
        "diag.reward_reasoning_corr",
    ]
    low, high = t.rows
    assert low.params["lam"] == 0.0 and low.seeds == [1] and low.failed == 1
    assert low.values["end_to_end"].mean == 0.3 and low.values["end_to_end"].std is None
    assert low.values["diag.reward_reasoning_corr"] is None
    assert high.seeds == [1, 2] and high.failed == 0
    e2e = high.values["end_to_end"]
    assert math.isclose(e2e.mean, 0.5) and math.isclose(e2e.std, math.sqrt(0.02)) and e2e.n == 2
    assert math.isclose(high.values["delta_perception"].mean, 0.7)
    assert math.isclose(high.values["diag.reward_reasoning_corr"].mean, 0.6)
    md = table_markdown(t)
    assert "| 0.0 | 1 | 1 | 0.300 |" in md and "0.500 ± 0.141" in md and "Δperception (base→post)" in md
    assert "Same in every row: `steps = 10`" in md and "—" in md
    csv_text = table_csv(t)
    assert csv_text.splitlines()[0].startswith("lam,n_seeds,seeds,n_failed,end_to_end_mean,end_to_end_std,")
    assert csv_text.splitlines()[2].startswith("0.5,2,1;2,0,0.5,0.141421,")


def test_a_mean_over_fewer_seeds_than_its_row_says_so():
    """A metric some seeds lack (a_r without the counterfactual pass, a NaN) was averaged over the others under the
    row's seed count: `0.800` in a row of 2 seeds was one seed's value."""
    a, b = _summary(0.5, 1, 0.4, 0.6, 0.8), _summary(0.5, 2, 0.6, 0.8, 0.9)
    b["final"]["reasoning"] = None
    t = aggregate([a, b], {"grid": "lam", "axes": ["lam"], "report": ["end_to_end", "reasoning"]})
    md = table_markdown(t)
    assert "| 0.5 | 10 | 2 | 0 | 0.500 ± 0.141 | 0.800 (1 of 2 seeds) |" in md, md


def test_report_rebuilds_results_from_run_directories(tmp_path):
    out = tmp_path / "g"
    assert run_grid(out, jobs=2)[0] == EXIT_OK
    before = (out / "results.csv").read_text()
    for f in ("results.csv", "results.md", "tradeoff.png", "metrics_vs_lam.png", "grid_state.json"):
        (out / f).unlink()
    o, e = io.StringIO(), io.StringIO()
    assert report_command(out, stdout=o, stderr=e) == EXIT_OK, e.getvalue()
    assert (out / "results.csv").read_text() == before  # the run dirs alone give the same table
    assert (out / "tradeoff.png").exists() and "| 0.75 | 2 | 0 |" in o.getvalue()
    assert report_command(tmp_path / "nowhere", stdout=o, stderr=e) == EXIT_USAGE
    assert f"{tmp_path / 'nowhere'}: no such directory" in e.getvalue()
    runs = sorted((out / "cells").glob("*/summary.json"))[:2]
    (tmp_path / "a_file").write_text("mine")
    e = io.StringIO()
    rc = report_command([r.parent for r in runs], baseline="lam=0.25", out=tmp_path / "a_file", stdout=o, stderr=e)
    assert rc == EXIT_USAGE and "cannot write the report" in e.getvalue() and (tmp_path / "a_file").read_text() == "mine"
    half = sorted((out / "cells").glob("*/summary.json"))[0]  # a cell whose run never finished
    half.unlink()
    (out / "grid_state.json").write_text("{cut sho")
    o, e = io.StringIO(), io.StringIO()
    assert report_command(out, stdout=o, stderr=e) == EXIT_OK, e.getvalue()
    assert f"note: not in the table: 1 cell with no complete summary.json: {half.parent}" in e.getvalue()
    assert "grid_state.json cannot be read" in e.getvalue() and ".stage-cache" not in e.getvalue()


def test_cells_of_an_earlier_template_are_not_counted_with_the_grids_cells(two_param_grid, tmp_path):
    """Editing the template gives every cell a new hash and run directory; the old ones stay in cells/, and the
    table (and the paired report) counted them as more seeds of the same settings: 4 seeds where the grid has 2."""
    out = tmp_path / "g"
    assert run_grid(out, grid=two_param_grid)[0] == EXIT_OK
    tmpl = tmp_path / "tmpl.pd"
    tmpl.write_text(tmpl.read_text().replace("steps = 12", "steps = 10"))
    rc, table, err = run_grid(out, grid=two_param_grid, baseline="lam=0.25")
    assert rc == EXIT_OK, err
    assert len(list((out / "cells").glob("*/summary.json"))) == 8
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["lam"], r["n_seeds"], r["seeds"]) for r in rows] == [("0.25", "2", "0;1"), ("0.75", "2", "0;1")]
    assert "4 finished runs" in table
    arm = json.loads((out / "paired.json").read_text())["arms"][0]
    assert len(arm["metrics"]["end_to_end"]["per_seed"]) == 2
    o, e = io.StringIO(), io.StringIO()
    assert report_command(out, stdout=o, stderr=e) == EXIT_OK
    assert "4 finished runs" in o.getvalue() and "note: not in the table: 4 run directories of no cell of the grid" in e.getvalue()


@pytest.mark.parametrize(
    "damaged",
    [
        {"cells": [{"hash": [1], "status": {}, "params": [1]}]},  # a hash that is a list: unhashable
        {"cells": [{"hash": "x", "status": "failed", "params": 5}]},  # params that are no object
        {"cells": [], "report": [1, None], "axes": [{}]},  # metric and axis names that are no strings
        {"cells": [{"hash": "x", "status": "failed", "seed": [1], "exit_code": "x", "log_tail": 7}]},
    ],
    ids=["hash-list", "params-int", "names-not-str", "fields"],
)
def test_a_grid_state_of_another_shape_is_an_unreadable_one(tmp_path, damaged):
    """grid_state.json that is a JSON object with `cells` a list, but whose entries are of other shapes
    (a hand's edit, another tool), ended `percep grid --dry-run`, `percep grid` and `percep report` in
    TypeError / AttributeError tracebacks. Now it is read as a damaged state (as one cut short): the
    plan goes by the run directories, and the report says the state cannot be read."""
    out = tmp_path / "g"
    assert run_grid(out)[0] == EXIT_OK
    (out / "grid_state.json").write_text(json.dumps(damaged))
    rc, listing, err = run_grid(out, dry_run=True)
    assert rc == EXIT_OK and "4 done" in listing + err, err
    o, e = io.StringIO(), io.StringIO()
    assert report_command(out, stdout=o, stderr=e) == EXIT_OK, e.getvalue()
    assert "grid_state.json cannot be read" in e.getvalue()
    assert run_grid(out)[0] == EXIT_OK and state(out)["status"] == "complete"


# ---- scale-out ----------------------------------------------------------------------------------------


def test_ray_backend_without_ray_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    rc, _, err = run_grid(tmp_path / "g", backend="ray")
    assert rc == EXIT_USAGE and "pip install -e '.[ray]'" in err
    assert calls(tmp_path) == []


def test_ray_backend_runs_cells_as_tasks_on_a_cluster(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    out = tmp_path / "g"
    config = tmp_path / "fake.json"  # workers inherit the cluster's environment, not the driver's: steer them by file
    monkeypatch.setenv("FAKE_RUN_CONFIG", str(config))
    config.write_text(json.dumps({"sleep": 120, "slow": "lam=0.75"}))
    slow_dirs = [out / "cells" / smoke_hash("0.75", s) for s in (0, 1)]
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)  # a local instance owned by this test
    try:
        address = ray.get_runtime_context().gcs_address
        # A separate driver connects to the running cluster by address, as `--address` does.
        proc = start_driver(out, backend="ray", address=address)
        wait_for_two_done_two_running(proc, out, slow_dirs)
        interrupt(proc)  # cancelled tasks stop their cell processes with SIGINT
        for d in slow_dirs:
            log = out / "cells" / f"{d.name}.log"
            deadline = time.monotonic() + 10
            while not log.read_text().rstrip().endswith("interrupted") and time.monotonic() < deadline:
                time.sleep(0.1)
            assert log.read_text().rstrip().endswith("interrupted")
        config.write_text(json.dumps({"fail": "lam=0.75 seed=1"}))
        proc = start_driver(out, backend="ray", address=address)
        _, err = proc.communicate(timeout=120)
    finally:
        ray.shutdown()
    assert proc.returncode == EXIT_FAILED, err
    st = state(out)
    assert st["backend"] == "ray" and st["counts"]["done"] == 3 and st["counts"]["failed"] == 1
    bad = next(c for c in st["cells"] if c["status"] == "failed")
    assert bad["exit_code"] == 3 and "fake failure" in bad["log_tail"] and bad["host"]
    good = next(c for c in st["cells"] if c["grid_params"] == {"lam": 0.75} and c["seed"] == 0)
    assert good["resumed"] and json.loads((out / good["run_dir"] / "summary.json").read_text())["resumed"]
    assert "0.75,1,0,1," in (out / "results.csv").read_text()


def test_a_ray_cells_time_is_its_run_not_its_wait_for_a_slot(tmp_path, monkeypatch):
    """Every cell is submitted at once; on a 1-CPU cluster the last waited for three others, and its
    recorded time (grid_state.json, the progress line, the ETA) was that wait plus its run."""
    ray = pytest.importorskip("ray")
    out = tmp_path / "g"
    config = tmp_path / "fake.json"
    monkeypatch.setenv("FAKE_RUN_CONFIG", str(config))
    config.write_text(json.dumps({"sleep": 2}))
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        proc = start_driver(out, backend="ray", address=ray.get_runtime_context().gcs_address)
        _, err = proc.communicate(timeout=120)
    finally:
        ray.shutdown()
    assert proc.returncode == EXIT_OK, err
    seconds = sorted(c["seconds"] for c in state(out)["cells"])
    assert seconds[-1] < 2 * seconds[0] and seconds[0] >= 2, seconds


def test_a_ray_cell_no_node_can_hold_is_refused_not_left_waiting(tmp_path, monkeypatch):
    # Ray keeps an infeasible task waiting forever: the grid hung with every cell "running".
    pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "g"
    proc = start_driver(out, backend="ray", cpus_per_cell=float((os.cpu_count() or 1) * 4))  # Ray started by the grid itself
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_USAGE, err
    assert "no node of the cluster has that much" in err and "Traceback" not in err
    assert calls(tmp_path) == []
    # a quantity Ray does not take at all was a ValueError traceback (exit 1)
    proc = start_driver(tmp_path / "g2", backend="ray", cpus_per_cell=0.00001)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_USAGE and "Ray refuses --cpus-per-cell 1e-05" in err and "Traceback" not in err, err
    assert calls(tmp_path) == []


# ---- the command line (active once `percep grid` / `percep report` are registered in percepdsl/cli.py) ----


def _registered(name: str) -> bool:
    from percepdsl.cli import app

    return any((c.name or c.callback.__name__) == name for c in app.registered_commands)


@pytest.mark.skipif(not _registered("grid"), reason="`percep grid` is not wired into percepdsl/cli.py yet")
def test_percep_grid_and_report_on_the_command_line(tmp_path):
    out = tmp_path / "g"
    dry = subprocess.run(
        [sys.executable, "-m", "percepdsl", "grid", str(SMOKE), "--dry-run", "--out", str(out)], capture_output=True, text=True, timeout=60
    )
    assert dry.returncode == EXIT_OK, dry.stderr
    assert smoke_hash("0.75", 1) in dry.stdout and "4 pending" in dry.stdout and not out.exists()
    bad = subprocess.run(
        [sys.executable, "-m", "percepdsl", "grid", str(SMOKE), "--dry-run", "--set", "lam=0.5"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == EXIT_USAGE and "swept by an axis" in bad.stderr
    assert run_grid(out, jobs=2)[0] == EXIT_OK
    rep = subprocess.run([sys.executable, "-m", "percepdsl", "report", str(out)], capture_output=True, text=True, timeout=60)
    assert rep.returncode == EXIT_OK and "| 0.25 | 2 | 0 |" in rep.stdout


def test_smoke_grid_end_to_end_with_the_real_percep_run(tmp_path):
    """The reference smoke grid through real training runs: 2 λ values × 2 seeds."""
    out = tmp_path / "grid"
    proc = subprocess.run(
        [sys.executable, "-m", "percepdsl", "grid", "specs/grids/smoke.pd", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["lam"] for r in rows] == ["0.25", "0.75"]
    assert all(r["n_seeds"] == "2" for r in rows)
    summaries = sorted(out.glob("cells/*/summary.json"))
    assert len(summaries) == 4
    assert (out / "tradeoff.png").exists()
    # the λ arms of a seed share their base stage: trained by the first cell of the seed, reused by the other
    reused = [json.loads(p.read_text())["stages"]["base"].get("reused_from") for p in summaries]
    assert sum(r is not None for r in reused) == 2 and len({r["identity"] for r in reused if r}) == 2
    assert all(json.loads(p.read_text())["stages"]["fixed"].get("reused_from") is None for p in summaries)
    again = subprocess.run(
        [sys.executable, "-m", "percepdsl", "grid", "specs/grids/smoke.pd", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert again.returncode == 0 and sorted(out.glob("cells/*/summary.json")) == summaries


# ---- --fail-fast and the SLURM backend ------------------------------------------------------------


def test_fail_fast_stops_the_grid_at_the_first_failure(tmp_path, monkeypatch):
    """The first failed cell stops the grid: running cells are stopped as by Ctrl-C (they keep their
    state and are recorded `interrupted`), no pending cell starts, the state says why, exit 3; the
    same command then resumes the stopped cells and runs the rest."""
    out = tmp_path / "g"
    monkeypatch.setenv("FAKE_RUN_FAIL", "lam=0.25 seed=1")
    monkeypatch.setenv("FAKE_RUN_SLEEP", "120")
    monkeypatch.setenv("FAKE_RUN_SLOW", "lam=0.25 seed=0")
    monkeypatch.setenv("FAKE_RUN_FAIL_AFTER", "2")  # the slow cell is under way when the other fails (a loaded CI box starts it late)
    t0 = time.monotonic()
    rc, _, err = run_grid(out, jobs=2, fail_fast=True)  # cells 1 (slow) and 2 (fails) start together
    assert rc == EXIT_FAILED and time.monotonic() - t0 < 60, err
    st = state(out)
    assert st["status"] == "failed" and st["fail_fast"] and "cell lam=0.25 seed=1 failed (exit 3)" in st["stopped"]
    assert st["counts"] == {"done": 0, "pending": 2, "running": 0, "failed": 1, "interrupted": 1}
    stopped = next(c for c in st["cells"] if c["status"] == "interrupted")
    assert stopped["label"] == "lam=0.25 seed=0" and (out / stopped["log"]).read_text().rstrip().endswith("interrupted")
    assert "stopped: --fail-fast: cell lam=0.25 seed=1 failed (exit 3); 1 running cell(s) stopped, 2 not started" in err
    assert len(calls(tmp_path)) == 2  # nothing started after the failure

    monkeypatch.delenv("FAKE_RUN_FAIL")
    monkeypatch.delenv("FAKE_RUN_SLEEP")
    rc, _, err = run_grid(out, fail_fast=True)
    assert rc == EXIT_OK, err
    again = calls(tmp_path)[2:]
    assert len(again) == 4 and sum(c["resume"] for c in again) == 2  # the stopped and the failed cell resume


def test_slurm_backend_without_submitit_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)
    rc, _, err = run_grid(tmp_path / "g", backend="slurm")
    assert rc == EXIT_USAGE and "pip install -e '.[slurm]'" in err and "Traceback" not in err
    assert calls(tmp_path) == []


def test_slurm_backend_without_sbatch_is_refused(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here (nor on this test machine at all)
    rc, _, err = run_grid(tmp_path / "g", backend="slurm")
    assert rc == EXIT_USAGE and "`sbatch`, which is not on this machine's PATH" in err and "Traceback" not in err
    assert calls(tmp_path) == []


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"partition": "gpu"}, "--partition, --time and --mem are for --backend slurm"),
        ({"backend": "slurm", "cpus_per_cell": 1.5}, "whole numbers"),
        ({"backend": "slurm", "time_min": 0}, "--time must be at least 1 minute"),
        ({"backend": "slurm", "address": "x:1"}, "--address is for --backend ray"),
        # NaN passed every comparison (`nan <= 0` is false), and inf is no number of CPUs or GBs
        ({"backend": "ray", "cpus_per_cell": math.nan}, "--cpus-per-cell must be > 0"),
        ({"backend": "ray", "cpus_per_cell": math.inf}, "--cpus-per-cell must be > 0"),
        ({"backend": "ray", "gpus_per_cell": math.nan}, "--gpus-per-cell >= 0"),
        ({"backend": "slurm", "mem_gb": math.nan}, "--mem more than 0 GB"),
        ({"backend": "slurm", "mem_gb": math.inf}, "--mem more than 0 GB"),
        ({"backend": "slurm", "mem_gb": 0.0001}, "at least 1 MB"),  # submitted as --mem=0MB: all of the node's memory
    ],
)
def test_slurm_options_are_checked_before_anything_runs(tmp_path, kw, message):
    rc, _, err = run_grid(tmp_path / "g", **kw)
    assert rc == EXIT_USAGE and message in err
    assert calls(tmp_path) == [] and not (tmp_path / "g").exists()


def test_slurm_backend_runs_cells_as_jobs_and_resumes(tmp_path, monkeypatch):
    """Cells as submitit jobs (its local executor stands in for sbatch): results, job ids in the
    state, a failed job recorded with its exit code, --fail-fast, and a re-run that resumes."""
    pytest.importorskip("submitit")
    out = tmp_path / "g"
    monkeypatch.setenv("FAKE_RUN_FAIL", "lam=0.75 seed=1")
    rc, table, err = run_grid(out, backend="slurm", slurm_cluster="local", jobs=2, time_min=5)
    assert rc == EXIT_FAILED, err
    st = state(out)
    assert st["backend"] == "slurm" and st["counts"]["done"] == 3 and st["counts"]["failed"] == 1
    assert all(c.get("job_id") for c in st["cells"]) and (out / "slurm").is_dir()
    bad = next(c for c in st["cells"] if c["status"] == "failed")
    assert bad["exit_code"] == 3 and "fake failure" in bad["log_tail"] and bad["host"]
    assert "| 0.25 | 2 | 0 |" in table

    monkeypatch.delenv("FAKE_RUN_FAIL")
    rc, _, err = run_grid(out, backend="slurm", slurm_cluster="local", fail_fast=True)
    assert rc == EXIT_OK, err
    again = calls(tmp_path)[4:]
    assert len(again) == 1 and again[0]["resume"] and state(out)["counts"]["done"] == 4


def test_interrupting_a_slurm_grid_cancels_its_jobs_and_a_rerun_resumes(tmp_path, monkeypatch):
    """Ctrl-C on the driver cancels the running jobs (submitit's cancel: the job stops its cell as
    Ctrl-C would), keeps the finished cells, and the same command resumes the stopped ones."""
    pytest.importorskip("submitit")
    out = tmp_path / "g"
    monkeypatch.setenv("FAKE_RUN_SLEEP", "120")
    monkeypatch.setenv("FAKE_RUN_SLOW", "lam=0.75")
    slow_dirs = [out / "cells" / smoke_hash("0.75", s) for s in (0, 1)]
    proc = start_driver(out, backend="slurm", slurm_cluster="local")
    wait_for_two_done_two_running(proc, out, slow_dirs)
    interrupt(proc)
    for d in slow_dirs:
        log = out / "cells" / f"{d.name}.log"
        deadline = time.monotonic() + 10
        while not log.read_text().rstrip().endswith("interrupted") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert log.read_text().rstrip().endswith("interrupted")
        assert d.is_dir() and not (d / "summary.json").exists()
    monkeypatch.delenv("FAKE_RUN_SLEEP")
    rc, _, err = run_grid(out, backend="slurm", slurm_cluster="local")
    assert rc == EXIT_OK, err
    again = calls(tmp_path)[4:]
    assert sorted(c["name"] for c in again) == sorted(d.name for d in slow_dirs) and all(c["resume"] for c in again)


def test_a_set_of_a_param_the_template_never_uses_is_refused(tmp_path):
    """`--set unused=5` changed every cell's params, so its hash and run directory: the whole grid ran again
    and trained what it had trained already."""
    spec = (REPO / "specs" / "sft_smoke.pd").read_text().replace("seed 0", "seed 0\nparam unused: int = 3")
    (tmp_path / "common").symlink_to(REPO / "specs" / "common")
    (tmp_path / "t.pd").write_text(spec)
    grid = tmp_path / "g.pd"
    grid.write_text('grid g\ntemplate "t.pd"\naxis lam = [0.25, 0.75]\n')
    rc, _, err = run_grid(tmp_path / "out", grid=grid, sets=["unused=5"])
    assert rc == EXIT_USAGE and "--set unused=...: the template" in err and "never uses `unused`" in err, err
    assert calls(tmp_path) == []
    assert run_grid(tmp_path / "out", grid=grid, sets=["unused=3"], dry_run=True)[0] == EXIT_OK  # its default: no change


def test_cells_beyond_those_the_checker_compiles_that_train_the_same_run_are_refused(tmp_path, monkeypatch):
    """The checker compiles the first MAX_CELL_CHECKS cells; the plan compiles them all and refuses the rest's repeats too."""
    import percepdsl.check.grid as check_grid

    monkeypatch.setattr(check_grid, "MAX_CELL_CHECKS", 1)
    spec = (REPO / "specs" / "sft_smoke.pd").read_text().replace("seed 0", "seed 0\nparam unused: int = 3")
    (tmp_path / "common").symlink_to(REPO / "specs" / "common")
    (tmp_path / "t.pd").write_text(spec)
    grid = tmp_path / "g.pd"
    grid.write_text('grid g\ntemplate "t.pd"\naxis unused = [1, 2]\n')
    rc, _, err = run_grid(tmp_path / "out", grid=grid)
    assert rc == EXIT_USAGE and "cell unused=2: trains the same run as cell unused=1" in err, err
    assert calls(tmp_path) == []
