"""Progress of a running grid: cells done / running / failed and an ETA, as rich progress on a
terminal or plain status lines otherwise."""

from __future__ import annotations

import math
import sys
import time
from statistics import mean
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from .plan import CellPlan

HEARTBEAT_S = 60.0  # plain progress: a status line at least this often


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

    def cell_finished(self, cell: CellPlan, ok: bool, note: str = "", cells: int = 1, seconds: float | None = None) -> None:
        """`cells` > 1 when several grid cells compile to this one run; `seconds`: its run time where the
        backend measured it (a Ray task or SLURM job may wait for a slot first)."""
        self.running -= 1
        secs = time.monotonic() - self.started.pop(cell.index, time.monotonic())
        secs = secs if seconds is None else seconds
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
