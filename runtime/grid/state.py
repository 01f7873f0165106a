"""What a grid directory says about its cells: complete run summaries, grid_state.json (the
plan and every cell's fate, rewritten atomically after each event), and the lock that keeps
two `percep grid` runs off the same directory."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from percepdsl.diagnostics import relpath
from percepdsl.io import LockHeld, hold_lock, os_error_text, read_json, write_json_atomic

from .common import CELLS_DIR, DEFAULT_METRICS, DONE, FAILED, INTERRUPTED, PENDING, RUNNING, STATE_FILE, SUMMARY_FILE, GridError, now

if TYPE_CHECKING:
    from .plan import CellPlan, GridPlan

LOCK_FILE = ".grid.lock"
STATE_VERSION = 1


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's summary.json if it is there, parses, and says the run is complete."""
    data = read_json(run_dir / SUMMARY_FILE)
    return data if is_complete_summary(data) else None


def is_complete_summary(data: Any) -> bool:
    """Whether ``data`` says ``"status": "complete"`` and its parts that are read back are of the shapes
    `percep run` writes (``final``, ``params``, ``diagnostics`` objects; ``stages`` an object of stage
    objects whose ``metrics`` and ``delta`` are objects), where present. JSON of another shape
    (another tool's file, a hand's edit) is no complete run: it was a traceback in the report."""
    if not isinstance(data, dict) or data.get("status") != "complete":
        return False
    if any(not isinstance(data.get(k, {}), dict) for k in ("final", "params", "diagnostics", "stages")):
        return False
    if isinstance(data.get("seed"), (list, dict)):  # arms are grouped by seed
        return False
    return all(
        isinstance(st, dict) and isinstance(st.get("metrics", {}), dict) and isinstance(st.get("delta", {}), dict)
        for st in data.get("stages", {}).values()
    )


def load_state(out_dir: Path) -> dict[str, Any] | None:
    data = read_json(out_dir / STATE_FILE)
    return data if _is_state(data) else None


def _is_state(data: Any) -> bool:
    """grid_state.json in the shapes `GridState.write` gives what is read back (the cells' hash, status,
    params, seed, exit code and log tail; the metric and axis names); another shape (a hand's edit) is
    read as a damaged state, as one cut short is, where it was a traceback."""
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list) or not isinstance(data.get("grid", ""), str):
        return False
    if not all(isinstance(names := data.get(k, []), list) and all(isinstance(n, str) for n in names) for k in ("report", "axes")):
        return False
    return all(
        isinstance(e, dict)
        and isinstance(e.get("hash", ""), (str, type(None)))
        and isinstance(e.get("status", ""), str)
        and isinstance(e.get("params", {}), dict)
        and not isinstance(e.get("seed"), (list, dict))
        and isinstance(e.get("exit_code"), (int, type(None)))
        and isinstance(e.get("log_tail"), (str, type(None)))
        for e in data["cells"]
    )


class GridLock:
    """An exclusive lock on a grid directory, so that two `percep grid` runs never run the same
    cells at once. Held with flock, so the kernel frees it when the process dies (POSIX only)."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / LOCK_FILE
        self._file: TextIO | None = None

    def __enter__(self) -> GridLock:
        try:
            self._file = hold_lock(self.path, f"pid {os.getpid()} on {platform.node()} since {now()}")
        except LockHeld as held:
            raise GridError(
                f"{relpath(self.path.parent)} is in use by another `percep grid` ({held.holder}); wait for it, or stop it (Ctrl-C) and run again"
            ) from None
        except OSError as exc:  # --out is a file, under a file, read-only: the grid's first write
            raise GridError(f"cannot use the grid directory: {os_error_text(exc)}") from None  # the path that failed
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
            "started": now(),
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
            "updated": now(),
            "counts": self.counts(),
            "cells": [self.entries[i] for i in sorted(self.entries)],
        }
        write_json_atomic(self.path, data)
