"""What every part of the grid runner shares: the grid directory's file names, exit codes,
cell status values, and the error that refuses a grid before anything runs."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

from percepdsl.diagnostics import Diagnostic, render

CELLS_DIR = "cells"
STATE_FILE = "grid_state.json"
SUMMARY_FILE = "summary.json"

EXIT_OK, EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 0, 2, 3, 130
EXIT_NOT_STARTED = 127  # recorded for a cell whose process could not be started (as a shell would)

DEFAULT_METRICS = ("end_to_end", "perception", "reasoning")

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


def now() -> str:
    """The time of an event, as grid_state.json and cell logs record it (UTC, ISO 8601)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
