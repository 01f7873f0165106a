"""Diagnostic tasks whose images have a canonical text form ``p*``: graph colouring and sudoku.

``build_task("graph_coloring", {"nodes": (5, 6)}, seed=7)`` returns a task; parameters not given
take the defaults in ``graph_coloring.DEFAULTS`` / ``sudoku.DEFAULTS``. See ``README_SECTION.md``
for formats, parameters and measured numbers.
"""

from __future__ import annotations

from typing import Any

from .base import (
    MARKERS,
    REASONING_STYLES,
    SPLITS,
    Sample,
    Scores,
    Sections,
    Task,
    TaskBase,
    parse_sections,
    perception_share,
)
from .graph_coloring import GraphColoringTask
from .sudoku import SudokuTask

#: Task name -> task class; each class takes ``(params: dict | None, seed: int)``.
TASKS: dict[str, type[TaskBase]] = {
    GraphColoringTask.name: GraphColoringTask,
    SudokuTask.name: SudokuTask,
}


def build_task(name: str, params: dict[str, Any] | None, seed: int) -> TaskBase:
    """Instantiate task ``name``; raises ``ValueError`` for an unknown task or a bad parameter."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name](params, seed)


__all__ = [
    "MARKERS",
    "REASONING_STYLES",
    "SPLITS",
    "TASKS",
    "GraphColoringTask",
    "Sample",
    "Scores",
    "Sections",
    "SudokuTask",
    "Task",
    "build_task",
    "parse_sections",
    "perception_share",
]
