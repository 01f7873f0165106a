"""`percep grid` and `percep report` (registered in percepdsl/cli.py): plan, (dry-)run and
aggregate a grid; rebuild its results table and plots from the run directories."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from percepdsl.diagnostics import relpath
from percepdsl.io import os_error_text, write_text_atomic

from ..ranks import usable_cpus
from .backends import SlurmOptions, import_ray, import_submitit
from .common import CELLS_DIR, DONE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, FAILED, PENDING, RESUME, STATE_FILE, GridError
from .execute import GridOutcome, describe_exit, execute
from .paired import (
    Arm,
    BaselineError,
    full_label,
    group_arms,
    label_arms,
    load_runs,
    paired_markdown,
    paired_report,
    parse_selector,
    select_baseline,
)
from .plan import GridPlan, plan_grid
from .progress import plural
from .results import ResultsTable, aggregate, collect, fmt_param, other_runs, row_key, table_csv, table_markdown
from .state import GridLock, load_state, read_summary

RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
PAIRED_MD = "paired.md"
PAIRED_JSON = "paired.json"


def write_results(grid_dir: str | Path, plots: bool = True, baseline: str | None = None) -> tuple[ResultsTable, list[Path]]:
    """Rebuild results.csv, results.md and the plots from the run directories (and state);
    with a `baseline` selector (`lam=0`) also paired.md / paired.json, each arm's paired
    differences to that arm (see `paired`), whose table results.md ends with.
    Raises `BaselineError` when the selector names no single arm."""
    grid_dir = Path(grid_dir)
    summaries, state = collect(grid_dir)
    table = aggregate(summaries, state)
    paired = ""
    if baseline:
        runs = load_runs([grid_dir / CELLS_DIR / s["_run_dir"] for s in summaries])
        paired = write_paired(paired_report(runs, baseline), grid_dir)
    written: list[Path] = []
    if plots and table.rows:
        from .plots import write_plots

        written = write_plots(table, grid_dir)
    write_text_atomic(grid_dir / RESULTS_CSV, table_csv(table))
    write_text_atomic(grid_dir / RESULTS_MD, table_markdown(table, written) + ("\n" + paired if paired else ""))
    return table, written


def write_paired(rep, out_dir: Path) -> str:
    """paired.json and paired.md in `out_dir` (atomically); returns the Markdown."""
    from percepdsl.io import write_json_atomic

    md = paired_markdown(rep)
    write_json_atomic(out_dir / PAIRED_JSON, rep.to_json())
    write_text_atomic(out_dir / PAIRED_MD, md)
    return md


def check_baseline(plan: GridPlan, baseline: str) -> None:
    """Refuse (GridError) a `--baseline` that names no single setting of the planned grid."""
    arms: dict[str, Arm] = {}
    for c in plan.cells:
        key = {"experiment": c.experiment, **{k: v for k, v in c.params.items() if k != "seed"}}
        arms.setdefault(row_key(key), Arm(key, "", {}))
    try:
        select_baseline(label_arms(list(arms.values())), parse_selector(baseline), baseline)
    except BaselineError as exc:
        raise GridError(str(exc)) from None


def list_cells(plan: GridPlan, stream: TextIO) -> None:
    """The dry-run listing: a line per cell with its params, seed, IR hash, run dir, status."""
    names = list(dict.fromkeys(n for c in plan.cells for n in c.cell.params))
    head = ["#", *names, "seed", "hash", "run dir", "status"]
    rows = []
    for c in plan.cells:
        status = c.status
        if c.status == FAILED and c.previous:
            status = f"failed (exit {c.previous.get('exit_code')}), will {'resume' if c.run_dir.is_dir() else 'rerun'}"
        rows.append([str(c.index), *(fmt_param(c.cell.params.get(n)) for n in names), str(c.seed), c.hash, relpath(c.run_dir), status])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    n_set = len({row_key(c.cell.params) for c in plan.cells})
    n_seeds = len(plan.grid.seeds) or 1
    print(
        f"grid {plan.grid.name}: {plural(len(plan.cells), 'cell')} ({plural(n_set, 'setting')}, {plural(n_seeds, 'seed')}) "
        f"of {relpath(plan.template)} → {relpath(plan.out_dir)}",
        file=stream,
    )
    for line in [head, *rows]:
        print("  " + "  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip(), file=stream)
    print(
        f"{plan.count(DONE)} done, {plan.count(PENDING)} pending, {plan.count(RESUME)} to resume, {plan.count(FAILED)} failed earlier",
        file=stream,
    )


def run_plan(
    plan: GridPlan,
    *,
    jobs: int | None = 1,
    backend: str = "local",
    fail_fast: bool = False,
    launcher: Sequence[str] | None = None,
    stream: TextIO | None = None,
    address: str | None = None,
    cpus_per_cell: float = 1.0,
    gpus_per_cell: float = 0.0,
    slurm: SlurmOptions | None = None,
    baseline: str | None = None,
) -> GridOutcome:
    """Run a planned grid under its directory's lock, then (unless interrupted) write the results
    table and plots (with `baseline`, the paired differences); the outcome carries the table (`outcome.table`). GridError when another
    grid holds the directory or the backend cannot start."""
    with GridLock(plan.out_dir):
        outcome = execute(
            plan,
            jobs=jobs,
            backend=backend,
            address=address,
            launcher=launcher,
            stream=stream,
            cpus_per_cell=cpus_per_cell,
            gpus_per_cell=gpus_per_cell,
            fail_fast=fail_fast,
            slurm=slurm,
        )
    if outcome.status != "interrupted":
        try:
            try:
                outcome.table, outcome.plots = write_results(plan.out_dir, baseline=baseline)
                outcome.paired = bool(baseline)
            except BaselineError as exc:  # checked before the cells ran, but its cells failed: the table without the pairs
                print(f"warning: no paired differences: {exc}", file=stream or sys.stderr)
                outcome.table, outcome.plots = write_results(plan.out_dir)
        except Exception as exc:  # results are a view of the run dirs: never lose the grid's outcome over them
            print(f"warning: could not write the results table: {type(exc).__name__}: {exc}", file=stream or sys.stderr)
    return outcome


def grid_command(
    grid_file: Path,
    *,
    dry_run: bool = False,
    jobs: int | None = None,
    out: Path | None = None,
    sets: Sequence[str] = (),
    backend: str = "local",
    address: str | None = None,
    cpus_per_cell: float = 1.0,
    gpus_per_cell: float = 0.0,
    fail_fast: bool = False,
    partition: str | None = None,
    time_min: int | None = None,
    mem_gb: float | None = None,
    slurm_cluster: str | None = None,
    launcher: Sequence[str] | None = None,
    baseline: str | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """`percep grid`: plan, (dry-)run and aggregate a grid. Returns the process exit code:
    0 every cell complete, 2 refused before anything ran, 3 some cell failed (with `fail_fast`:
    the first failure stopped the grid), 130 interrupted.

    `launcher` is the command a cell runs before its arguments (default `python -m percepdsl run`);
    tests point it at a stand-in trainer. `slurm_cluster` is submitit's executor (tests: "local")."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    if backend not in ("local", "ray", "slurm"):
        print(f"error: unknown backend `{backend}` (local, ray or slurm)", file=stderr)
        return EXIT_USAGE
    if jobs is not None and jobs < 1:
        print("error: --jobs must be at least 1", file=stderr)
        return EXIT_USAGE
    if backend == "local" and (address is not None or cpus_per_cell != 1.0 or gpus_per_cell != 0.0):
        print("error: --cpus-per-cell and --gpus-per-cell are for --backend ray or slurm, --address for ray", file=stderr)
        return EXIT_USAGE
    if backend != "ray" and address is not None:
        print("error: --address is for --backend ray", file=stderr)
        return EXIT_USAGE
    if backend != "slurm" and (partition is not None or time_min is not None or mem_gb is not None):
        print("error: --partition, --time and --mem are for --backend slurm", file=stderr)
        return EXIT_USAGE
    if not (0 < cpus_per_cell < math.inf and 0 <= gpus_per_cell < math.inf):  # NaN fails these, and no comparison of <= 0
        print("error: --cpus-per-cell must be > 0 and --gpus-per-cell >= 0 (finite numbers)", file=stderr)
        return EXIT_USAGE
    slurm = None
    if backend == "slurm":
        if not float(cpus_per_cell).is_integer() or not float(gpus_per_cell).is_integer():
            print("error: with --backend slurm, --cpus-per-cell and --gpus-per-cell are whole numbers", file=stderr)
            return EXIT_USAGE
        # submitit asks for whole MB (rounding down), and SLURM reads --mem=0 as all of a node's memory
        if (time_min is not None and time_min < 1) or (mem_gb is not None and not 1 / 1024 <= mem_gb < math.inf):
            print("error: --time must be at least 1 minute and --mem more than 0 GB (at least 1 MB, 0.001 GB)", file=stderr)
            return EXIT_USAGE
        slurm = SlurmOptions(
            partition=partition,
            time_min=time_min if time_min is not None else SlurmOptions.time_min,
            cpus_per_cell=int(cpus_per_cell),
            gpus_per_cell=int(gpus_per_cell),
            mem_gb=mem_gb,
            cluster=slurm_cluster or "slurm",
        )
    try:
        plan = plan_grid(grid_file, out, sets)
        if baseline:
            check_baseline(plan, baseline)
        if dry_run:
            list_cells(plan, stdout)
            return EXIT_OK
        if backend == "ray":
            import_ray()
        if backend == "slurm":
            import_submitit()
    except GridError as exc:
        print(exc.render(color=getattr(stderr, "isatty", lambda: False)()), file=stderr)
        return EXIT_USAGE
    if backend == "local":
        jobs = jobs or 1
        cpus = usable_cpus()
        if jobs > 1 and jobs > cpus // 2:
            print(
                f"warning: --jobs {jobs} on {cpus} cores: a training run uses every core it gets, so parallel cells "
                "slow each other down and the grid rarely finishes sooner than with --jobs 1",
                file=stderr,
            )
    todo = len(plan.cells) - plan.count(DONE)
    print(
        f"grid {plan.grid.name}: {plural(len(plan.cells), 'cell')}, {plan.count(DONE)} already done, {todo} to run "
        f"({backend}{'' if jobs is None else f', {jobs} at a time'}) → {relpath(plan.out_dir)}",
        file=stderr,
    )
    try:
        outcome = run_plan(
            plan,
            jobs=jobs,
            backend=backend,
            fail_fast=fail_fast,
            launcher=launcher,
            stream=stderr,
            address=address,
            cpus_per_cell=cpus_per_cell,
            gpus_per_cell=gpus_per_cell,
            slurm=slurm,
            baseline=baseline,
        )
    except GridError as exc:  # another run holds the grid, Ray or SLURM cannot be reached
        print(exc.render(), file=stderr)
        return EXIT_USAGE
    if outcome.status == "interrupted":
        print(
            f"interrupted: {outcome.done}/{len(plan.cells)} cells done, {len(outcome.interrupted)} stopped; "
            f"state in {relpath(plan.state_path)}; run the same command again to finish the rest",
            file=stderr,
        )
        return EXIT_INTERRUPTED
    if outcome.table is not None:
        paired = [plan.out_dir / PAIRED_MD, plan.out_dir / PAIRED_JSON] if baseline and outcome.paired else []
        print(
            f"results: {relpath(plan.out_dir / RESULTS_MD)}, {relpath(plan.out_dir / RESULTS_CSV)}"
            + "".join(f", {relpath(p)}" for p in [*outcome.plots, *paired]),
            file=stderr,
        )
        print(table_markdown(outcome.table), file=stdout, end="")
        if paired:
            print("\n" + paired[0].read_text(encoding="utf-8"), file=stdout, end="")
    if outcome.stopped:
        pending = len(plan.cells) - outcome.done - len(outcome.failed) - len(outcome.interrupted)
        print(
            f"stopped: {outcome.stopped}; {len(outcome.interrupted)} running cell(s) stopped, {pending} not started; "
            f"state in {relpath(plan.state_path)}; run the same command again to continue",
            file=stderr,
        )
    for c in outcome.failed:
        e = outcome.entries.get(c.index, {})
        tail = "\n".join("    " + ln for ln in (e.get("log_tail") or "").splitlines()[-8:])
        print(f"failed: {c.label} (exit {describe_exit(e.get('exit_code', -1))}), log {relpath(c.log_path)}\n{tail}", file=stderr)
    return outcome.exit_code


def report_command(
    paths: Path | Sequence[Path],
    *,
    baseline: str | None = None,
    out: Path | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """`percep report GRID_OUT [--baseline NAME=VALUE]`: rebuild results.csv/.md and the plots
    from the run directories, with the paired differences to the baseline arm when one is named.
    `percep report RUN_DIR... --baseline NAME=VALUE --out DIR`: the paired differences between
    the arms of separate run directories, written to DIR."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    try:
        return _report(paths, baseline, out, stdout, stderr)
    except OSError as exc:  # --out or the grid directory cannot be written (a file, read-only, a full disk)
        print(f"error: cannot write the report: {os_error_text(exc)}", file=stderr)
        return EXIT_USAGE


def _report(paths: list[Path], baseline: str | None, out: Path | None, stdout: TextIO, stderr: TextIO) -> int:
    if len(paths) == 1 and (paths[0] / CELLS_DIR).is_dir():
        return _report_grid(paths[0], baseline, stdout, stderr)
    not_runs = [p for p in paths if not (p / "summary.json").is_file()]
    if not_runs:
        p = not_runs[0]
        if not p.exists():
            print(f"error: {p}: no such directory", file=stderr)
            return EXIT_USAGE
        if (p / CELLS_DIR).is_dir():  # with other paths: a grid's table is not a comparison of named runs
            print(f"error: {p} is a grid directory: report it alone (`percep report {p}`), or name its cells' run directories", file=stderr)
            return EXIT_USAGE
        if p.name == CELLS_DIR and p.is_dir():  # a grid's cells/ itself
            print(f"error: {p} holds a grid's run directories: report the grid with `percep report {p.parent}`", file=stderr)
            return EXIT_USAGE
        what = "a grid directory (no cells/ inside) nor a finished run directory (no summary.json)"
        print(f"error: {p} is neither {what}; `percep grid GRID --out DIR` or `percep run SPEC` makes one", file=stderr)
        return EXIT_USAGE
    if not baseline or out is None:
        print("error: run directories are compared against a baseline: give --baseline NAME=VALUE and --out DIR", file=stderr)
        return EXIT_USAGE
    damaged = [p for p in paths if read_summary(p) is None]
    if damaged:  # named to be compared: left out silently, the comparison would lack it unsaid
        p = damaged[0] / "summary.json"
        print(
            f"error: {relpath(p)} is not a complete run's summary (not JSON, or not the shape `percep run` writes); "
            f"`percep run SPEC --out {relpath(damaged[0].parent)} --resume` (SPEC: the one in its spec/) writes it again, "
            "or leave the directory out",
            file=stderr,
        )
        return EXIT_USAGE
    runs = load_runs(paths)
    try:
        rep = paired_report(runs, baseline)
    except BaselineError as exc:
        print(f"error: {exc}", file=stderr)
        return EXIT_USAGE
    if not rep.arms:  # the baseline is the only arm: the comparison would be an empty table
        arm = full_label(group_arms(runs)[0][0])
        print(f"error: the runs are all one arm ({arm}): nothing to compare with the baseline; name runs of another arm too", file=stderr)
        return EXIT_USAGE
    Path(out).mkdir(parents=True, exist_ok=True)
    print(write_paired(rep, Path(out)), file=stdout, end="")
    print(f"wrote {relpath(Path(out) / PAIRED_MD)}, {relpath(Path(out) / PAIRED_JSON)}", file=stderr)
    return EXIT_OK


def _report_grid(grid_dir: Path, baseline: str | None, stdout: TextIO, stderr: TextIO) -> int:
    if not aggregate(*collect(grid_dir)).rows:  # before writing: an earlier report's table stays, and no baseline to match
        print(f"error: no finished or failed cells in {grid_dir / CELLS_DIR}", file=stderr)
        return EXIT_USAGE
    try:
        table, plots = write_results(grid_dir, baseline=baseline)
    except BaselineError as exc:
        print(f"error: {exc}", file=stderr)
        return EXIT_USAGE
    print(table_markdown(table), file=stdout, end="")
    others = other_runs(grid_dir)
    if others:
        shown = ", ".join(relpath(d) for d in others[:5]) + (" …" if len(others) > 5 else "")
        print(
            f"note: not in the table: {len(others)} run director{'y' if len(others) == 1 else 'ies'} of no cell of the grid as last run "
            f"(an earlier template or --set): {shown}",
            file=stderr,
        )
    unfinished = [
        d for d in sorted((grid_dir / CELLS_DIR).glob("*/")) if not d.name.startswith(".") and read_summary(d) is None and d not in others
    ]
    if unfinished:
        shown = ", ".join(relpath(d) for d in unfinished[:5]) + (" …" if len(unfinished) > 5 else "")
        print(f"note: not in the table: {plural(len(unfinished), 'cell')} with no complete summary.json: {shown}", file=stderr)
    if (grid_dir / STATE_FILE).exists() and load_state(grid_dir) is None:
        print(f"warning: {relpath(grid_dir / STATE_FILE)} cannot be read: failed cells are not counted", file=stderr)
    written = [grid_dir / RESULTS_MD, grid_dir / RESULTS_CSV, *plots]
    if baseline:
        print("\n" + (grid_dir / PAIRED_MD).read_text(encoding="utf-8"), file=stdout, end="")
        written += [grid_dir / PAIRED_MD, grid_dir / PAIRED_JSON]
    print("wrote " + ", ".join(relpath(p) for p in written), file=stderr)
    return EXIT_OK
