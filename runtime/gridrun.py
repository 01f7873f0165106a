"""Running ablation grids (`percep grid`) and aggregating them (`percep report`).

A grid file (see `percepdsl.grid`) sweeps the params of a template spec. This module
turns it into cells, runs every cell as its own `percep run` process, and gathers the
finished run directories into one results table and a few plots.

Layout of a grid directory (default `runs/grids/<grid name>`)::

    GRID_OUT/
      grid_state.json            what was planned, what ran, what failed (exit code, log tail)
      cells/<experiment>-<hash>/ one `percep run` directory per cell; <hash> = content_hash(IR)
      cells/<experiment>-<hash>.log   the cell's stdout + stderr
      results.csv, results.md    a row per setting: mean ± std over seeds
      tradeoff.png, metrics_vs_<axis>.png

Resumability comes from the run directories themselves: a cell whose
`summary.json` says `"status": "complete"` is done and never re-run; a run
directory without one was interrupted (or failed) and is continued with
`percep run --resume`. `grid_state.json` only adds what the directories cannot
say (exit codes, log tails) and is rewritten atomically after every event.

Execution backends: local processes (default; no extra dependency) or Ray tasks on an
existing cluster (`--backend ray`; `pip install -e '.[ray]'`), each task running the
same subprocess on a worker. This module never imports torch: it launches processes
and reads JSON. Ray and matplotlib are imported only when used.
"""

from __future__ import annotations

import contextlib
import csv
import fnmatch
import io
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from statistics import mean, stdev
from typing import Any, Protocol, TextIO

from percepdsl.diagnostics import Diagnostic, did_you_mean, relpath, render
from percepdsl.grid import Cell, expand, literal, template_path
from percepdsl.io import write_json_atomic, write_text_atomic
from percepdsl.ir import ExperimentIR, GridIR, content_hash

# ---- constants -----------------------------------------------------------------------------------

GRID_ROOT = Path("runs/grids")  # default parent of grid directories
CELLS_DIR = "cells"
STATE_FILE = "grid_state.json"
LOCK_FILE = ".grid.lock"
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
SUMMARY_FILE = "summary.json"
STATE_VERSION = 1

EXIT_OK, EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 0, 2, 3, 130
EXIT_NOT_STARTED = 127  # recorded for a cell whose process could not be started (as a shell would)
RAY_INSTALL = "pip install -e '.[ray]'"

LOG_TAIL_LINES = 40
LOG_TAIL_CHARS = 4000
STOP_GRACE_S = 15.0  # after SIGINT, how long a cell may take to stop (save a checkpoint) before SIGKILL
POLL_S = 0.2
HEARTBEAT_S = 60.0  # plain progress: a status line at least this often

DEFAULT_METRICS = ("end_to_end", "perception", "reasoning")
# Diagnostics (flattened with ".") worth a column: what the study's tables discuss.
DIAGNOSTIC_PATTERNS = ("token_share.perception", "loss_share.perception", "*corr*", "*effective*")

# Cell status values (in grid_state.json and the dry-run listing).
DONE, PENDING, RESUME, RUNNING, FAILED, INTERRUPTED = "done", "pending", "resume", "running", "failed", "interrupted"


class GridError(Exception):
    """A grid that cannot be planned (does not check, bad --set): nothing has run."""

    def __init__(self, message: str, diagnostics: Sequence[Diagnostic] = (), sources: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.diagnostics = list(diagnostics)
        self.sources = sources or {}

    def render(self, color: bool = False) -> str:
        lines = [render(d, self.sources.get(d.file), color=color) for d in self.diagnostics]
        return "\n".join([*lines, f"error: {self.message}"])


# ---- planning -------------------------------------------------------------------------------------


@dataclass
class CellPlan:
    """One cell of a grid: what to run, where its run directory is, and how far it got."""

    index: int  # 1-based position in the grid's stable cell order
    cell: Cell  # the grid-level params (axes, `fix`, --set) and the seed
    params: dict[str, Any]  # every template param of the compiled cell (what summaries report)
    seed: int  # the compiled seed (the grid's, or the template's when the grid has none)
    experiment: str
    hash: str  # content_hash of the compiled IR: names the run directory
    cells_dir: Path
    status: str = PENDING  # done | pending | resume | failed (from an earlier run of the grid)
    previous: dict[str, Any] | None = None  # this cell's entry in an earlier grid_state.json

    @property
    def name(self) -> str:
        return f"{self.experiment}-{self.hash}"

    @property
    def run_dir(self) -> Path:
        return self.cells_dir / self.name

    @property
    def log_path(self) -> Path:
        return self.cells_dir / f"{self.name}.log"

    @property
    def label(self) -> str:
        return self.cell.label()

    def overrides(self) -> dict[str, str]:
        """`--set` pairs that reproduce this cell from the template."""
        return self.cell.overrides()

    def run_args(self, template: Path, resume: bool) -> list[str]:
        """Arguments after the launcher: `SPEC --set k=v ... --out CELLS [--resume]`."""
        args = [str(template)]
        for k, v in self.overrides().items():
            args += ["--set", f"{k}={v}"]
        args += ["--out", str(self.cells_dir)]
        return args + (["--resume"] if resume else [])


@dataclass
class GridPlan:
    grid: GridIR  # with --set values folded into `fixed` (and `seeds` when --set seed=N)
    grid_file: Path
    template: Path
    out_dir: Path
    sets: dict[str, str]
    cells: list[CellPlan]

    @property
    def cells_dir(self) -> Path:
        return self.out_dir / CELLS_DIR

    @property
    def state_path(self) -> Path:
        return self.out_dir / STATE_FILE

    @property
    def swept(self) -> list[str]:
        return [n for ax in self.grid.axes for n in ax.names]

    def count(self, status: str) -> int:
        return sum(c.status == status for c in self.cells)


def default_out_dir(grid: GridIR) -> Path:
    return GRID_ROOT / grid.name


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's summary.json if it is there, parses, and says the run is complete."""
    try:
        data = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("status") == "complete" else None


def load_state(out_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((out_dir / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("cells"), list) else None


def compile_spec(path: Path, overrides: dict[str, str], origin: str = "--set") -> ExperimentIR:
    """The experiment IR of a spec with overrides, or a GridError carrying its diagnostics."""
    from percepdsl.check import check_file

    res = check_file(path, overrides, origin=origin, fragment_ok=False)
    if not isinstance(res.ir, ExperimentIR):
        errors = [d for d in res.diagnostics if d.is_error]
        what = "is a grid file, not an experiment spec" if res.ir is not None else "does not compile"
        raise GridError(
            f"{relpath(path)} {what}" + (f" with {origin} values" if overrides and res.ir is None else ""),
            errors,
            res.loaded.sources if res.loaded else {},
        )
    return res.ir


def _apply_sets(grid: GridIR, tpath: Path, sets: dict[str, str]) -> tuple[GridIR, dict[str, Any]]:
    """Fold `--set` values into the grid (as `fix` entries); return it and the template's params.

    A --set must name a template param that no axis sweeps; `seed` only when the grid has no
    `seeds`. Values are type-checked by compiling the template with them."""
    tparams = compile_spec(tpath, {}).params
    swept = {n for ax in grid.axes for n in ax.names}
    for name in sets:
        if name == "seed":
            if grid.seeds:
                raise GridError(
                    f"grid `{grid.name}` sweeps seeds ({', '.join(map(str, grid.seeds))}); "
                    "--set seed=N is only for grids without a `seeds` line"
                )
        elif name in swept:
            raise GridError(
                f"--set {name}=...: `{name}` is swept by an axis of grid `{grid.name}`; "
                "--set fixes only template params that no axis sweeps (edit the axis instead)"
            )
        elif name not in tparams:
            guess = did_you_mean(name, tparams)
            hint = f"did you mean `{guess}`?" if guess else f"its params: {', '.join(tparams) or 'none'}"
            raise GridError(f"--set {name}=...: the template {relpath(tpath)} has no param `{name}` ({hint})")
    if not sets:
        return grid, dict(tparams)
    ir = compile_spec(tpath, sets)
    typed = {n: ir.params[n] for n in sets if n != "seed"}
    update: dict[str, Any] = {"fixed": {**grid.fixed, **typed}}
    if "seed" in sets:
        update["seeds"] = [ir.seed]
    return grid.model_copy(update=update), dict(ir.params)


def plan_grid(grid_file: str | Path, out: str | Path | None = None, sets: Sequence[str] | dict[str, str] = ()) -> GridPlan:
    """Check the grid, expand and compile its cells, and find each cell's status on disk.

    Raises GridError when the grid or a --set is wrong, or a cell does not compile."""
    from percepdsl.check import check_file, parse_overrides

    grid_file = Path(grid_file)
    res = check_file(grid_file, fragment_ok=False)
    sources = res.loaded.sources if res.loaded else {}
    if res.ir is None:
        raise GridError(f"grid {relpath(grid_file)} does not check", [d for d in res.diagnostics if d.is_error], sources)
    if not isinstance(res.ir, GridIR):
        raise GridError(f"{relpath(grid_file)} is an experiment spec, not a grid: run it with `percep run`")
    bad: list[Diagnostic] = []
    if isinstance(sets, dict):
        overrides = dict(sets)
    else:
        overrides, bad = parse_overrides(list(sets))
    if bad:
        raise GridError("malformed --set", bad)
    tpath = template_path(grid_file, res.ir)
    grid, tparams = _apply_sets(res.ir, tpath, overrides)
    out_dir = Path(out) if out is not None else default_out_dir(grid)
    out_dir = out_dir.absolute()
    cells_dir = out_dir / CELLS_DIR
    previous = load_state(out_dir)
    prev_by_hash = {e.get("hash"): e for e in (previous or {}).get("cells", []) if isinstance(e, dict)}

    plans: list[CellPlan] = []
    broken: list[str] = []
    for i, cell in enumerate(expand(grid, tparams), start=1):
        try:
            ir = compile_spec(tpath, cell.overrides(), origin="grid")
        except GridError as exc:
            broken.append(f"cell {cell.label()}: {exc.diagnostics[0].message if exc.diagnostics else exc.message}")
            continue
        h = content_hash(ir)
        plan = CellPlan(i, cell, dict(ir.params), ir.seed, ir.name, h, cells_dir, previous=prev_by_hash.get(h))
        plan.status = _disk_status(plan)
        plans.append(plan)
    if not plans and not broken:
        raise GridError(f"grid `{grid.name}` has no cells with these --set values (its `where` filter rejects every combination)")
    if broken:
        more = f" (and {len(broken) - 3} more)" if len(broken) > 3 else ""
        raise GridError(
            f"{len(broken)} cell{'s' if len(broken) > 1 else ''} of grid `{grid.name}` do not compile{more}:\n  " + "\n  ".join(broken[:3])
        )
    return GridPlan(grid, grid_file, tpath, out_dir, overrides, plans)


def _disk_status(cell: CellPlan) -> str:
    if read_summary(cell.run_dir) is not None:
        return DONE
    if cell.previous and cell.previous.get("status") == FAILED:
        return FAILED
    return RESUME if cell.run_dir.is_dir() else PENDING


# ---- the state file and the lock ------------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class GridLock:
    """An exclusive lock on a grid directory, so that two `percep grid` runs never run the same
    cells at once. Held with flock, so the kernel frees it when the process dies (POSIX only)."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / LOCK_FILE
        self._file: TextIO | None = None

    def __enter__(self) -> GridLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until __exit__
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no lock
            self._file = f
            return self
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise GridError(
                f"{relpath(self.path.parent)} is in use by another `percep grid` ({holder}); wait for it, or stop it (Ctrl-C) and run again"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {platform.node()} since {_now()}\n")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the flock
            self._file = None


class GridState:
    """grid_state.json: the plan and every cell's fate, rewritten atomically after each event."""

    def __init__(self, plan: GridPlan, backend: str, jobs: int | None):
        self.plan = plan
        self.path = plan.state_path
        self.header = {
            "version": STATE_VERSION,
            "grid": plan.grid.name,
            "grid_file": str(plan.grid_file.absolute()),
            "template": str(plan.template),
            "experiment": plan.cells[0].experiment if plan.cells else None,
            "axes": plan.swept,
            "report": list(plan.grid.report or DEFAULT_METRICS),
            "sets": plan.sets,
            "backend": backend,
            "jobs": jobs,
            "started": _now(),
        }
        self.entries: dict[int, dict[str, Any]] = {}
        for c in plan.cells:
            prev = c.previous or {}
            e: dict[str, Any] = {
                "index": c.index,
                "label": c.label,
                "params": c.params,
                "grid_params": c.cell.params,
                "seed": c.seed,
                "hash": c.hash,
                "run_dir": f"{CELLS_DIR}/{c.name}",
                "log": f"{CELLS_DIR}/{c.name}.log",
                "status": DONE if c.status == DONE else (FAILED if c.status == FAILED else PENDING),
            }
            for k in ("exit_code", "log_tail", "seconds", "finished"):
                if k in prev and c.status != DONE:
                    e[k] = prev[k]
            self.entries[c.index] = e

    def set(self, cell: CellPlan, **fields: Any) -> None:
        self.entries[cell.index].update(fields)

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in (DONE, PENDING, RUNNING, FAILED, INTERRUPTED)}
        for e in self.entries.values():
            out[e["status"]] = out.get(e["status"], 0) + 1
        return out

    def write(self, status: str) -> None:
        data = {
            **self.header,
            "status": status,
            "updated": _now(),
            "counts": self.counts(),
            "cells": [self.entries[i] for i in sorted(self.entries)],
        }
        write_json_atomic(self.path, data)


# ---- processes ------------------------------------------------------------------------------------------


def default_launcher() -> list[str]:
    """The real trainer, in the current interpreter: `python -m percepdsl run`."""
    return [sys.executable, "-m", "percepdsl", "run"]


def log_tail(path: str | Path, lines: int = LOG_TAIL_LINES, chars: int = LOG_TAIL_CHARS) -> str:
    """The last lines of a log (what a failed cell said last)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    tail = "\n".join(text.rstrip("\n").splitlines()[-lines:])
    return tail[-chars:]


def _open_log(path: Path, argv: Sequence[str]) -> io.BufferedWriter:
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "ab")
    f.write(f"==== {_now()} percep grid: {' '.join(argv)}\n".encode())
    f.flush()
    return f


def _spawn(argv: Sequence[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start a cell process, output to its log, in its own process group (so that stopping
    it reaches its workers, and a terminal's Ctrl-C reaches only the grid runner)."""
    log = _open_log(log_path, argv)
    try:
        with _sigint_inheritable():
            return subprocess.Popen(
                list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=(os.name == "posix")
            )
    finally:
        log.close()  # the child holds its own descriptor


@contextlib.contextmanager
def _sigint_inheritable() -> Iterator[None]:
    """Let a child started inside see SIGINT, the signal that asks a run to stop cleanly.

    A child inherits a blocked signal mask (Ray workers block SIGINT) and an ignored SIGINT (a
    process started in the background by a shell ignores it). Unblock it for this thread and,
    from the main thread, install a handler (exec resets it to the default), both restored after.
    The cell is in its own session, so a terminal's Ctrl-C still reaches only the grid runner."""
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}) if hasattr(signal, "pthread_sigmask") else None
    ignored = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        if os.name == "posix":
            os.killpg(proc.pid, sig)
        else:  # pragma: no cover - Windows has no process groups here
            proc.send_signal(sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(procs: Iterable[subprocess.Popen], grace: float) -> None:
    """SIGINT (a run saves its state and exits), then SIGKILL whatever is left after `grace` s."""
    procs = [p for p in procs if p.poll() is None]
    for p in procs:
        _signal_group(p, signal.SIGINT)
    deadline = time.monotonic() + grace
    try:
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    except KeyboardInterrupt:  # a second Ctrl-C: do not wait
        pass
    for p in procs:
        if p.poll() is None:
            _signal_group(p, signal.SIGKILL)
            p.wait()


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")  # the log tail is what the cell said last, not what it buffered
    env.update(extra)
    return env


def run_cell_process(
    run_args: Sequence[str], launcher: Sequence[str] | None, log_path: str, env_extra: dict[str, str], run_dir: str
) -> dict[str, Any]:
    """Run one cell to the end where this function is called (a Ray worker) and report back.

    Returns exit code, log tail, host, and the run's summary when it completed, so that the
    grid directory gets results even when the cluster does not share its filesystem. A Ray
    cancellation (KeyboardInterrupt in this task) stops the cell process before returning."""
    import socket

    argv = [*(launcher or default_launcher()), *run_args]
    proc = _spawn(argv, Path(log_path), _child_env(env_extra))
    try:
        # Wait in short slices: Ray delivers a cancellation as an asynchronous KeyboardInterrupt,
        # which a single blocking wait() would never see.
        while (rc := proc.poll()) is None:
            time.sleep(POLL_S)
    except BaseException:
        _stop([proc], STOP_GRACE_S)
        raise
    return {"exit_code": rc, "log_tail": log_tail(log_path), "host": socket.gethostname(), "summary": read_summary(Path(run_dir))}


@dataclass
class Finished:
    """A cell process that ended: its exit code, what it said last, and (Ray) its summary."""

    exit_code: int
    log_tail: str
    summary: dict[str, Any] | None = None
    host: str | None = None
    error: str | None = None  # the backend failed to run it at all


class Backend(Protocol):
    def start(self, cell: CellPlan, args: list[str]) -> None: ...
    def poll(self, timeout: float) -> list[tuple[CellPlan, Finished]]: ...
    def stop_all(self, grace: float) -> list[CellPlan]: ...
    def close(self) -> None: ...
    @property
    def running(self) -> int: ...


class LocalBackend:
    """Cells as child processes of this one."""

    def __init__(self, launcher: Sequence[str] | None, env_extra: dict[str, str]):
        self.launcher = list(launcher or default_launcher())
        self.env = _child_env(env_extra)
        self.procs: dict[int, tuple[CellPlan, subprocess.Popen]] = {}
        self.unstarted: list[tuple[CellPlan, Finished]] = []  # launch failures, reported by the next poll

    @property
    def running(self) -> int:
        return len(self.procs) + len(self.unstarted)

    def start(self, cell: CellPlan, args: list[str]) -> None:
        argv = [*self.launcher, *args]
        try:
            self.procs[cell.index] = (cell, _spawn(argv, cell.log_path, self.env))
        except OSError as exc:  # the launcher does not exist or cannot be executed
            msg = f"percep grid: cannot start {argv[0]}: {exc}"
            with open(cell.log_path, "a", encoding="utf-8") as log:
                log.write(msg + "\n")
            self.unstarted.append((cell, Finished(EXIT_NOT_STARTED, msg, error=msg)))

    def poll(self, timeout: float) -> list[tuple[CellPlan, Finished]]:
        if self.unstarted:
            out, self.unstarted = self.unstarted, []
            return out
        deadline = time.monotonic() + timeout
        while True:
            done = [(c, p) for c, p in self.procs.values() if p.poll() is not None]
            if done or time.monotonic() >= deadline:
                break
            time.sleep(min(0.05, timeout))
        out = []
        for c, p in done:
            del self.procs[c.index]
            out.append((c, Finished(p.returncode, log_tail(c.log_path))))
        return out

    def stop_all(self, grace: float) -> list[CellPlan]:
        cells = [c for c, _ in self.procs.values()]
        _stop([p for _, p in self.procs.values()], grace)
        self.procs.clear()
        return cells

    def close(self) -> None:
        self.stop_all(0.0)


def import_ray():
    """`ray`, or a GridError that says how to install it."""
    try:
        import ray  # noqa: PLC0415 - optional dependency, imported only for --backend ray
    except ImportError as exc:
        raise GridError(f"--backend ray needs Ray, which is not installed ({exc}); install it with: {RAY_INSTALL}") from None
    return ray


class RayBackend:
    """Cells as Ray tasks on an existing cluster; each task runs the cell process on its worker.

    The grid directory and the spec files must be at the same paths on every node (a shared
    filesystem, as is usual for a cluster); without one, summaries and log tails still come
    back to this machine through the task's return value."""

    def __init__(
        self,
        launcher: Sequence[str] | None,
        env_extra: dict[str, str],
        address: str | None,
        cpus_per_cell: float = 1.0,
        gpus_per_cell: float = 0.0,
    ):
        self.ray = import_ray()
        self.owns_ray = not self.ray.is_initialized()
        if self.owns_ray:
            # address None: RAY_ADDRESS, else a cluster already running on this machine, else a local one.
            try:
                self.ray.init(address=address, log_to_driver=False, include_dashboard=False)
            except Exception as exc:  # ConnectionError, a bad address, a version mismatch, ...
                raise GridError(f"cannot start or reach Ray{f' at {address}' if address else ''}: {type(exc).__name__}: {exc}") from None
        self.launcher = list(launcher) if launcher else None  # None: resolved on the worker
        # A cell uses the CPUs Ray reserved for it, no more (torch would otherwise take every core of the node).
        self.env_extra = {"OMP_NUM_THREADS": str(max(1, int(cpus_per_cell))), **env_extra}
        self.task = self.ray.remote(num_cpus=cpus_per_cell, num_gpus=gpus_per_cell, max_retries=0)(run_cell_process)
        self.refs: dict[Any, CellPlan] = {}

    @property
    def running(self) -> int:
        return len(self.refs)

    def start(self, cell: CellPlan, args: list[str]) -> None:
        ref = self.task.remote(args, self.launcher, str(cell.log_path), self.env_extra, str(cell.run_dir))
        self.refs[ref] = cell

    def poll(self, timeout: float) -> list[tuple[CellPlan, Finished]]:
        if not self.refs:
            time.sleep(timeout)
            return []
        ready, _ = self.ray.wait(list(self.refs), num_returns=len(self.refs), timeout=timeout)
        out = []
        for ref in ready:
            cell = self.refs.pop(ref)
            try:
                r = self.ray.get(ref)
                out.append((cell, Finished(r["exit_code"], r["log_tail"], r.get("summary"), r.get("host"))))
            except Exception as exc:  # the task itself died (worker lost, cancelled, import error on the worker)
                out.append((cell, Finished(-1, "", error=f"{type(exc).__name__}: {exc}"[-LOG_TAIL_CHARS:])))
        return out

    def stop_all(self, grace: float) -> list[CellPlan]:
        cells = list(self.refs.values())
        refs = list(self.refs)
        for ref in refs:
            self.ray.cancel(ref)  # KeyboardInterrupt in the task: it stops its process
        if refs:
            try:
                _, left = self.ray.wait(refs, num_returns=len(refs), timeout=grace)
            except KeyboardInterrupt:
                left = refs
            for ref in left:
                self.ray.cancel(ref, force=True)
        self.refs.clear()
        return cells

    def close(self) -> None:
        self.stop_all(0.0)
        if self.owns_ray:
            self.ray.shutdown()


# ---- progress --------------------------------------------------------------------------------------


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Progress:
    """Cells done / running / failed and an ETA, as rich progress on a terminal or plain lines."""

    def __init__(self, total: int, already_done: int, parallel: int | None, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.total, self.parallel = total, parallel
        self.done, self.failed, self.running = already_done, 0, 0
        self.durations: list[float] = []
        self.started: dict[int, float] = {}
        self.t0 = time.monotonic()
        self.last_line = self.t0
        self._rich = None
        if getattr(self.stream, "isatty", lambda: False)():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                TextColumn("[bold]grid[/]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                console=Console(file=self.stream),
                transient=False,
            )
            self._task = self._rich.add_task("grid", total=total, completed=already_done, status="")
            self._rich.start()

    def eta(self) -> float | None:
        pending = self.total - self.done - self.failed - self.running
        if not self.durations:
            return None
        avg = mean(self.durations)
        now = time.monotonic()
        work = pending * avg + sum(max(0.0, avg - (now - t)) for t in self.started.values())
        lanes = max(1, min(self.parallel or self.running or 1, pending + self.running))
        return work / lanes

    def status(self) -> str:
        return f"{self.done}/{self.total} done, {self.running} running, {self.failed} failed, ETA {fmt_duration(self.eta())}"

    def _emit(self, msg: str) -> None:
        if self._rich is not None:
            self._rich.console.print(msg, markup=False, highlight=False)
            self._rich.update(
                self._task,
                completed=self.done + self.failed,
                status=f"{self.running} running, {self.failed} failed, ETA {fmt_duration(self.eta())}",
            )
        else:
            print(f"[{self.status()}] {msg}", file=self.stream, flush=True)
        self.last_line = time.monotonic()

    def cell_started(self, cell: CellPlan, resume: bool) -> None:
        self.running += 1
        self.started[cell.index] = time.monotonic()
        self._emit(f"{'resume' if resume else 'start '} {cell.label} ({cell.name})")

    def cell_finished(self, cell: CellPlan, ok: bool, note: str = "", cells: int = 1) -> None:
        """`cells` > 1 when several grid cells compile to this one run."""
        self.running -= 1
        secs = time.monotonic() - self.started.pop(cell.index, time.monotonic())
        self.durations.append(secs)
        if ok:
            self.done += cells
        else:
            self.failed += cells
        self._emit(f"{'done  ' if ok else 'FAILED'} {cell.label} in {fmt_duration(secs)}{note}")

    def tick(self) -> None:
        if self._rich is not None:
            self._rich.update(self._task, status=f"{self.running} running, {self.failed} failed, ETA {fmt_duration(self.eta())}")
        elif time.monotonic() - self.last_line >= HEARTBEAT_S:
            self._emit("…")

    def note(self, msg: str) -> None:
        if self._rich is not None:
            self._rich.console.print(msg, markup=False, highlight=False)
        else:
            print(msg, file=self.stream, flush=True)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()


# ---- execution ----------------------------------------------------------------------------------------


@dataclass
class GridOutcome:
    status: str  # complete | failed | interrupted
    ran: int = 0  # cells started in this invocation
    done: int = 0  # cells complete at the end (this run or earlier)
    failed: list[CellPlan] = field(default_factory=list)
    interrupted: list[CellPlan] = field(default_factory=list)
    entries: dict[int, dict[str, Any]] = field(default_factory=dict)  # cell index → its grid_state.json entry

    @property
    def exit_code(self) -> int:
        return {"complete": EXIT_OK, "failed": EXIT_FAILED, "interrupted": EXIT_INTERRUPTED}[self.status]


def thread_env(jobs: int, cpus: int | None = None) -> dict[str, str]:
    """With several local cells at once, split the cores between them (unless the user chose)."""
    cpus = cpus or os.cpu_count() or 1
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
) -> GridOutcome:
    """Run every cell that is not done; write grid_state.json after each event.

    `jobs` limits cells in flight (None with Ray: as many as the cluster schedules; Ray reserves
    `cpus_per_cell` and `gpus_per_cell` for each).
    Failed cells are recorded and the others go on. SIGINT (or SIGTERM) stops the running
    cells, keeps finished ones, and returns an `interrupted` outcome."""
    stream = stream or sys.stderr
    plan.cells_dir.mkdir(parents=True, exist_ok=True)
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
    outcome = GridOutcome("complete")
    if not todo:
        state.write("complete")
        outcome.done, outcome.entries = len(plan.cells), state.entries
        return outcome

    runner: Backend
    if backend == "ray":
        runner = RayBackend(launcher, env_extra, address, cpus_per_cell, gpus_per_cell)  # GridError if unreachable
    else:
        runner = LocalBackend(launcher, env_extra)
    progress = Progress(len(plan.cells), plan.count(DONE), local_jobs, stream)

    def mark(cell: CellPlan, **fields: Any) -> None:
        for twin in twins[cell.hash]:
            state.set(twin, **fields)

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
                outcome.ran += 1
                mark(cell, status=RUNNING, started=_now(), resumed=resume, exit_code=None, log_tail=None)
                state.write("running")
                progress.cell_started(cell, resume)
            for cell, fin in runner.poll(POLL_S):
                secs = round(time.monotonic() - started_at.pop(cell.index, time.monotonic()), 2)
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
                    "finished": _now(),
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
                note = "" if ok else f" (exit {_describe_exit(fin.exit_code)}; log: {relpath(cell.log_path)})"
                progress.cell_finished(cell, ok, note, cells=len(twins[cell.hash]))
            progress.tick()
    except KeyboardInterrupt:
        progress.note(f"interrupted: stopping {runner.running} running cell(s); finished cells are kept")
        for cell in runner.stop_all(STOP_GRACE_S):
            mark(cell, status=INTERRUPTED, finished=_now(), exit_code=None, log_tail=log_tail(cell.log_path))
            outcome.interrupted.append(cell)
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


def _describe_exit(code: int) -> str:
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


# ---- aggregation -------------------------------------------------------------------------------------


@dataclass
class Stat:
    """Mean ± sample std over seeds; std is None for a single value."""

    mean: float
    std: float | None
    n: int

    @staticmethod
    def of(values: Sequence[Any]) -> Stat | None:
        """Over the finite numbers among `values` (missing metrics are None and skipped)."""
        vals = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        if not vals:
            return None
        return Stat(mean(vals), stdev(vals) if len(vals) > 1 else None, len(vals))

    def show(self, digits: int = 3) -> str:
        return f"{self.mean:.{digits}f}" + ("" if self.std is None else f" ± {self.std:.{digits}f}")


@dataclass
class Column:
    key: str  # CSV prefix: `end_to_end`, `delta_end_to_end`, `diag.token_share.perception`
    title: str  # Markdown header


@dataclass
class Row:
    params: dict[str, Any]  # the setting: every template param (no seed)
    seeds: list[Any] = field(default_factory=list)  # ints, as the summaries give them
    failed: int = 0
    values: dict[str, Stat | None] = field(default_factory=dict)

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)


@dataclass
class ResultsTable:
    grid: str
    metrics: list[str]
    axes: list[str]  # params that vary between rows (the table's leading columns)
    constant: dict[str, Any]  # params equal in every row
    stages: tuple[str, str] | None  # (first, last) stage of the deltas
    columns: list[Column]
    rows: list[Row]
    n_runs: int  # complete summaries aggregated

    def stat(self, row: Row, key: str) -> Stat | None:
        return row.values.get(key)


def flatten(d: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested dicts, keys joined with "."."""
    out: dict[str, float] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        out[prefix[:-1]] = float(d)
    return out


def _stage_delta(summary: dict[str, Any], metric: str) -> tuple[float | None, tuple[str, str] | None]:
    """Change of a metric from the first stage to the last (stages are in run order)."""
    stages = summary.get("stages")
    if not isinstance(stages, dict) or len(stages) < 2:
        return None, None
    names = list(stages)
    first = (stages[names[0]] or {}).get("metrics", {}) or {}
    last = (stages[names[-1]] or {}).get("metrics", {}) or {}
    a, b = first.get(metric), last.get(metric)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(b) - float(a), (names[0], names[-1])
    return None, (names[0], names[-1])


def _key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def sort_value(v: Any) -> tuple:
    if isinstance(v, bool):
        return (0, int(v), "")
    if isinstance(v, (int, float)):
        return (0, float(v), "")
    return (1, 0.0, str(v))


def collect(grid_dir: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Complete summaries under GRID_DIR/cells/*/, and the grid state (None if absent)."""
    grid_dir = Path(grid_dir)
    summaries = []
    for run_dir in sorted((grid_dir / CELLS_DIR).glob("*/")):
        s = read_summary(run_dir)
        if s is not None:
            summaries.append({**s, "_run_dir": run_dir.name})
    return summaries, load_state(grid_dir)


def aggregate(
    summaries: Sequence[dict[str, Any]], state: dict[str, Any] | None = None, metrics: Sequence[str] | None = None, grid: str | None = None
) -> ResultsTable:
    """A row per setting (params without the seed): mean ± std over seeds of the metrics, their
    first→last-stage deltas and key diagnostics; failed cells (from the state) are counted."""
    state = state or {}
    metrics = list(metrics or state.get("report") or DEFAULT_METRICS)
    by_hash = {e.get("hash"): e for e in state.get("cells", []) if isinstance(e, dict)}

    rows: dict[str, Row] = {}
    samples: dict[str, dict[str, list[Any]]] = {}  # row key → column key → a value per seed (None: missing)
    stages: tuple[str, str] | None = None
    diag_keys: list[str] = []

    def row_for(params: dict[str, Any]) -> Row:
        params = {k: v for k, v in params.items() if k != "seed"}
        k = _key(params)
        if k not in rows:
            rows[k] = Row(params)
            samples[k] = {}
        return rows[k]

    for s in summaries:
        entry = by_hash.get(s.get("hash"), {})
        raw = s.get("params")
        row = row_for(raw if isinstance(raw, dict) else entry.get("params") or {})
        seed = s.get("seed", entry.get("seed"))
        row.seeds.append(seed)
        bucket = samples[_key(row.params)]
        final = s.get("final") or {}
        for m in metrics:
            bucket.setdefault(m, []).append(final.get(m))
            d, st = _stage_delta(s, m)
            stages = stages or st
            bucket.setdefault(f"delta_{m}", []).append(d)
        for dk, dv in flatten(s.get("diagnostics") or {}).items():
            if any(fnmatch.fnmatch(dk, p) for p in DIAGNOSTIC_PATTERNS):
                if dk not in diag_keys:
                    diag_keys.append(dk)
                bucket.setdefault(f"diag.{dk}", []).append(dv)
    done_hashes = {s.get("hash") for s in summaries}
    for e in state.get("cells", []):
        if isinstance(e, dict) and e.get("status") == FAILED and e.get("hash") not in done_hashes:
            row_for(e.get("params") or {}).failed += 1

    columns = [Column(m, m) for m in metrics]
    if stages is not None:
        arrow = f"{stages[0]}→{stages[1]}"
        columns += [Column(f"delta_{m}", f"Δ{m} ({arrow})") for m in metrics]
    columns += [Column(f"diag.{k}", k) for k in diag_keys]
    for k, row in rows.items():
        row.values = {c.key: Stat.of(samples[k].get(c.key, [])) for c in columns}
        row.seeds = sorted(row.seeds, key=sort_value)

    all_names: list[str] = []
    for row in rows.values():
        all_names += [n for n in row.params if n not in all_names]
    varying = [n for n in all_names if len({_key({"v": r.params.get(n)}) for r in rows.values()}) > 1]
    order = [n for n in state.get("axes", []) if n in varying] + sorted(n for n in varying if n not in state.get("axes", []))
    axes = order or (all_names if len(rows) == 1 else [])
    constant = {n: next(iter(rows.values())).params.get(n) for n in all_names if n not in varying} if rows else {}
    ordered = sorted(rows.values(), key=lambda r: tuple(sort_value(r.params.get(n)) for n in axes))
    return ResultsTable(grid or state.get("grid") or "grid", metrics, axes, constant, stages, columns, ordered, len(summaries))


def _fmt_param(v: Any) -> str:
    return literal(v) if v is not None else ""


def table_csv(table: ResultsTable) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = [*table.axes, "n_seeds", "seeds", "n_failed"]
    for c in table.columns:
        head += [f"{c.key}_mean", f"{c.key}_std"]
    w.writerow(head)
    for r in table.rows:
        line: list[Any] = [_fmt_param(r.params.get(a)) for a in table.axes]
        line += [r.n_seeds, ";".join(map(str, r.seeds)), r.failed]
        for c in table.columns:
            st = r.values.get(c.key)
            line += ["" if st is None else repr(round(st.mean, 6)), "" if st is None or st.std is None else repr(round(st.std, 6))]
        w.writerow(line)
    return buf.getvalue()


def table_markdown(table: ResultsTable, plots: Sequence[Path] = ()) -> str:
    out = [f"# Grid `{table.grid}`", ""]
    out.append(
        f"{table.n_runs} finished run{'s' if table.n_runs != 1 else ''} in {len(table.rows)} setting"
        f"{'s' if len(table.rows) != 1 else ''}; mean ± sample std over seeds."
    )
    if table.stages:
        out.append(f"Δ columns: change from the first stage (`{table.stages[0]}`) to the last (`{table.stages[1]}`).")
    if table.constant and table.axes != list(table.constant):
        out.append("Same in every row: " + ", ".join(f"`{k} = {_fmt_param(v)}`" for k, v in table.constant.items()) + ".")
    out.append("")
    head = [*table.axes, "seeds", "failed", *(c.title for c in table.columns)]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "|".join("---" if i < len(table.axes) else "---:" for i in range(len(head))) + "|")
    for r in table.rows:
        cells = [_fmt_param(r.params.get(a)) for a in table.axes] + [str(r.n_seeds), str(r.failed)]
        cells += ["—" if (st := r.values.get(c.key)) is None else st.show() for c in table.columns]
        out.append("| " + " | ".join(cells) + " |")
    if plots:
        out += ["", *[f"![{p.stem}]({p.name})" for p in plots]]
    return "\n".join(out) + "\n"


def write_results(grid_dir: str | Path, plots: bool = True) -> tuple[ResultsTable, list[Path]]:
    """Rebuild results.csv, results.md and the plots from the run directories (and state)."""
    grid_dir = Path(grid_dir)
    summaries, state = collect(grid_dir)
    table = aggregate(summaries, state)
    written: list[Path] = []
    if plots and table.rows:
        from .gridplots import write_plots

        written = write_plots(table, grid_dir)
    write_text_atomic(grid_dir / RESULTS_CSV, table_csv(table))
    write_text_atomic(grid_dir / RESULTS_MD, table_markdown(table, written))
    return table, written


# ---- commands (registered in percepdsl/cli.py) --------------------------------------------------------


def list_cells(plan: GridPlan, stream: TextIO) -> None:
    """The dry-run listing: a line per cell with its params, seed, IR hash, run dir, status."""
    names = list(dict.fromkeys(n for c in plan.cells for n in c.cell.params))
    head = ["#", *names, "seed", "hash", "run dir", "status"]
    rows = []
    for c in plan.cells:
        status = c.status
        if c.status == FAILED and c.previous:
            status = f"failed (exit {c.previous.get('exit_code')}), will {'resume' if c.run_dir.is_dir() else 'rerun'}"
        rows.append([str(c.index), *(_fmt_param(c.cell.params.get(n)) for n in names), str(c.seed), c.hash, relpath(c.run_dir), status])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    n_set = len({_key(c.cell.params) for c in plan.cells})
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
    launcher: Sequence[str] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """`percep grid`: plan, (dry-)run and aggregate a grid. Returns the process exit code:
    0 every cell complete, 2 refused before anything ran, 3 some cell failed, 130 interrupted.

    `launcher` is the command a cell runs before its arguments (default `python -m percepdsl run`);
    tests point it at a stand-in trainer."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    if backend not in ("local", "ray"):
        print(f"error: unknown backend `{backend}` (local or ray)", file=stderr)
        return EXIT_USAGE
    if jobs is not None and jobs < 1:
        print("error: --jobs must be at least 1", file=stderr)
        return EXIT_USAGE
    if backend != "ray" and (address is not None or cpus_per_cell != 1.0 or gpus_per_cell != 0.0):
        print("error: --address, --cpus-per-cell and --gpus-per-cell are for --backend ray", file=stderr)
        return EXIT_USAGE
    if cpus_per_cell <= 0 or gpus_per_cell < 0:
        print("error: --cpus-per-cell must be > 0 and --gpus-per-cell >= 0", file=stderr)
        return EXIT_USAGE
    try:
        plan = plan_grid(grid_file, out, sets)
        if dry_run:
            list_cells(plan, stdout)
            return EXIT_OK
        if backend == "ray":
            import_ray()
    except GridError as exc:
        print(exc.render(color=getattr(stderr, "isatty", lambda: False)()), file=stderr)
        return EXIT_USAGE
    if backend == "local":
        jobs = jobs or 1
        cpus = os.cpu_count() or 1
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
        with GridLock(plan.out_dir):
            outcome = execute(
                plan,
                jobs=jobs,
                backend=backend,
                address=address,
                launcher=launcher,
                stream=stderr,
                cpus_per_cell=cpus_per_cell,
                gpus_per_cell=gpus_per_cell,
            )
    except GridError as exc:  # another run holds the grid, Ray cannot be reached
        print(exc.render(), file=stderr)
        return EXIT_USAGE
    if outcome.status == "interrupted":
        print(
            f"interrupted: {outcome.done}/{len(plan.cells)} cells done, {len(outcome.interrupted)} stopped; "
            f"state in {relpath(plan.state_path)}; run the same command again to finish the rest",
            file=stderr,
        )
        return EXIT_INTERRUPTED
    try:
        table, plots = write_results(plan.out_dir)
    except Exception as exc:  # results are a view of the run dirs: never lose the run's exit status over them
        print(f"warning: could not write the results table: {type(exc).__name__}: {exc}", file=stderr)
    else:
        print(
            f"results: {relpath(plan.out_dir / RESULTS_MD)}, {relpath(plan.out_dir / RESULTS_CSV)}"
            + "".join(f", {relpath(p)}" for p in plots),
            file=stderr,
        )
        print(table_markdown(table), file=stdout, end="")
    for c in outcome.failed:
        e = outcome.entries.get(c.index, {})
        tail = "\n".join("    " + ln for ln in (e.get("log_tail") or "").splitlines()[-8:])
        print(f"failed: {c.label} (exit {_describe_exit(e.get('exit_code', -1))}), log {relpath(c.log_path)}\n{tail}", file=stderr)
    return outcome.exit_code


def report_command(grid_dir: Path, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """`percep report GRID_OUT`: rebuild results.csv/.md and the plots from the run directories."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    grid_dir = Path(grid_dir)
    if not (grid_dir / CELLS_DIR).is_dir():
        print(f"error: {grid_dir} is not a grid directory (no {CELLS_DIR}/ inside; `percep grid GRID --out DIR` makes one)", file=stderr)
        return EXIT_USAGE
    table, plots = write_results(grid_dir)
    if not table.rows:
        print(f"error: no finished or failed cells in {grid_dir / CELLS_DIR}", file=stderr)
        return EXIT_USAGE
    print(table_markdown(table), file=stdout, end="")
    print(
        f"wrote {relpath(grid_dir / RESULTS_MD)}, {relpath(grid_dir / RESULTS_CSV)}" + "".join(f", {relpath(p)}" for p in plots),
        file=stderr,
    )
    return EXIT_OK
