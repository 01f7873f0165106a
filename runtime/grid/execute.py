"""Executing a planned grid: start every cell that is not done on a backend, record each
event in grid_state.json, isolate failures, and stop cleanly on SIGINT or SIGTERM."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from percepdsl.diagnostics import relpath
from percepdsl.io import os_error_text, write_json_atomic, write_text_atomic

from ..ranks import usable_cpus
from .backends import POLL_S, STOP_GRACE_S, Backend, LocalBackend, RayBackend, SlurmBackend, SlurmOptions, log_tail
from .common import DONE, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, FAILED, INTERRUPTED, RUNNING, SUMMARY_FILE, GridError, now
from .plan import CellPlan, GridPlan
from .progress import Progress
from .state import GridState, read_summary


@dataclass
class GridOutcome:
    status: str  # complete | failed | interrupted
    done: int = 0  # cells complete at the end (this run or earlier)
    failed: list[CellPlan] = field(default_factory=list)
    interrupted: list[CellPlan] = field(default_factory=list)  # stopped by a signal, or cancelled by --fail-fast
    entries: dict[int, dict[str, Any]] = field(default_factory=dict)  # cell index → its grid_state.json entry
    stopped: str | None = None  # why the grid stopped before every cell ran (--fail-fast), else None
    table: Any = None  # the results table (`ResultsTable`) once written (`run_plan`)
    plots: list[Any] = field(default_factory=list)  # the plots written with it
    paired: bool = False  # paired.md / paired.json written with it (a baseline, and its arm finished)

    @property
    def exit_code(self) -> int:
        return {"complete": EXIT_OK, "failed": EXIT_FAILED, "interrupted": EXIT_INTERRUPTED}[self.status]


def thread_env(jobs: int, cpus: int | None = None) -> dict[str, str]:
    """With several local cells at once, split the cores between them (unless the user chose)."""
    cpus = cpus or usable_cpus()
    if jobs <= 1 or "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, cpus // jobs))}


def execute(
    plan: GridPlan,
    *,
    jobs: int | None = 1,
    backend: str = "local",
    address: str | None = None,
    launcher: Sequence[str] | None = None,
    stream: TextIO | None = None,
    cpus_per_cell: float = 1.0,
    gpus_per_cell: float = 0.0,
    fail_fast: bool = False,
    slurm: SlurmOptions | None = None,
) -> GridOutcome:
    """Run every cell that is not done; write grid_state.json after each event.

    `jobs` limits cells in flight (None with Ray or SLURM: as many as the cluster schedules; Ray
    reserves `cpus_per_cell` and `gpus_per_cell` for each, SLURM what `slurm` asks for).
    Failed cells are recorded and the others go on, unless `fail_fast`: then the first failure
    stops the running cells (as SIGINT does: they keep their resume checkpoints, and are
    recorded `interrupted`), starts no more, and the outcome is `failed` with `stopped` saying
    why. SIGINT (or SIGTERM) stops the running cells, keeps finished ones, and returns an
    `interrupted` outcome."""
    stream = stream or sys.stderr
    state = GridState(plan, backend, jobs)
    # One process per run directory (two cells that compile to the same IR share it).
    todo: list[CellPlan] = []
    twins: dict[str, list[CellPlan]] = {}
    for c in plan.cells:
        twins.setdefault(c.hash, []).append(c)
        if c.status != DONE and len(twins[c.hash]) == 1:
            todo.append(c)
    local_jobs = jobs if jobs is not None else (1 if backend == "local" else len(todo) or 1)
    env_extra = thread_env(local_jobs) if backend == "local" else {}
    state.header["fail_fast"] = fail_fast
    outcome = GridOutcome("complete")
    try:  # before any cell starts: a grid directory changed by hand (`cells` a file, the state a directory)
        plan.cells_dir.mkdir(parents=True, exist_ok=True)
        state.write("running" if todo else "complete")
    except OSError as exc:
        raise GridError(f"cannot use the grid directory: {os_error_text(exc)}") from None
    if not todo:
        outcome.done, outcome.entries = len(plan.cells), state.entries
        return outcome

    runner: Backend
    if backend == "ray":
        runner = RayBackend(launcher, env_extra, address, cpus_per_cell, gpus_per_cell)  # GridError if unreachable
    elif backend == "slurm":
        runner = SlurmBackend(launcher, env_extra, plan.out_dir / "slurm", slurm or SlurmOptions())  # GridError without submitit
    else:
        runner = LocalBackend(launcher, env_extra)
    progress = Progress(len(plan.cells), plan.count(DONE), local_jobs, stream)

    def mark(cell: CellPlan, **fields: Any) -> None:
        for twin in twins[cell.hash]:
            state.set(twin, **fields)

    def stopped(cell: CellPlan) -> None:
        """A running cell the grid stopped: interrupted, unless it completed while stopping (at its last step)."""
        if read_summary(cell.run_dir) is not None:
            mark(cell, status=DONE, finished=now(), exit_code=0, log_tail=None)
        else:
            mark(cell, status=INTERRUPTED, finished=now(), exit_code=None, log_tail=log_tail(cell.log_path))
            outcome.interrupted.append(cell)

    prev_term = _raise_on_sigterm()
    started_at: dict[int, float] = {}
    try:
        state.write("running")
        while todo or runner.running:
            while todo and runner.running < local_jobs:
                cell = todo.pop(0)
                if read_summary(cell.run_dir) is not None:  # finished since the plan was made
                    mark(cell, status=DONE, exit_code=0, log_tail=None)
                    progress.done += len(twins[cell.hash])
                    continue
                resume = cell.run_dir.is_dir()
                runner.start(cell, cell.run_args(plan.template, resume))
                started_at[cell.index] = time.monotonic()
                job = {"job_id": runner.job_id(cell)} if isinstance(runner, SlurmBackend) else {}
                mark(cell, status=RUNNING, started=now(), resumed=resume, exit_code=None, log_tail=None, **job)
                state.write("running")
                progress.cell_started(cell, resume)
            for cell, fin in runner.poll(POLL_S):
                secs = round(time.monotonic() - started_at.pop(cell.index, time.monotonic()), 2)
                if fin.seconds is not None:  # Ray, SLURM: the cell's own run time, not its wait in the queue
                    secs = fin.seconds
                if fin.summary is not None and read_summary(cell.run_dir) is None:
                    write_json_atomic(cell.run_dir / SUMMARY_FILE, fin.summary)  # Ray without a shared filesystem
                if fin.error and not cell.log_path.exists():
                    write_text_atomic(cell.log_path, fin.error + "\n")
                ok = fin.exit_code == 0 and read_summary(cell.run_dir) is not None
                tail = fin.error or fin.log_tail
                if fin.exit_code == 0 and not ok:
                    tail = (tail + "\n" if tail else "") + f"percep grid: exit 0 but no complete {SUMMARY_FILE} in {cell.run_dir}"
                fields: dict[str, Any] = {
                    "status": DONE if ok else FAILED,
                    "finished": now(),
                    "seconds": secs,
                    "exit_code": fin.exit_code,
                    "log_tail": None if ok else tail,
                }
                if fin.host:
                    fields["host"] = fin.host
                mark(cell, **fields)
                if not ok:
                    outcome.failed.append(cell)
                state.write("running")
                note = "" if ok else f" (exit {describe_exit(fin.exit_code)}; log: {relpath(cell.log_path)})"
                progress.cell_finished(cell, ok, note, cells=len(twins[cell.hash]), seconds=fin.seconds)
                if not ok and fail_fast and outcome.stopped is None:
                    outcome.stopped = f"--fail-fast: cell {cell.label} failed (exit {describe_exit(fin.exit_code)})"
                    state.header["stopped"] = outcome.stopped
                    todo.clear()  # start nothing more; the pending cells stay pending
                    if runner.running:
                        progress.note(f"{outcome.stopped}: stopping {runner.running} running cell(s)")
                        for c in runner.stop_all(STOP_GRACE_S):
                            stopped(c)
                    state.write("running")
            progress.tick()
    except KeyboardInterrupt:
        progress.note(f"interrupted: stopping {runner.running} running cell(s); finished cells are kept")
        for cell in runner.stop_all(STOP_GRACE_S):
            stopped(cell)
        outcome.status = "interrupted"
    finally:
        _restore_sigterm(prev_term)
        try:
            runner.close()
        finally:
            progress.close()
    outcome.entries = state.entries
    outcome.done = sum(e["status"] == DONE for e in state.entries.values())
    if outcome.status != "interrupted":
        outcome.status = "failed" if outcome.failed else "complete"
    state.write(outcome.status)
    return outcome


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"{code}, {signal.Signals(-code).name}"
        except ValueError:
            return str(code)
    return str(code)


def _raise_on_sigterm():
    """SIGTERM is handled like Ctrl-C (stop cells, write state) while the grid runs."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(prev) -> None:
    if prev is not None:
        signal.signal(signal.SIGTERM, prev)
