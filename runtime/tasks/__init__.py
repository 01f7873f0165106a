"""Diagnostic tasks whose images have a canonical text form ``p*``: graph colouring and sudoku,
and ``dataset``, items of a dataset on disk scored by one of their verifiers (``disk.py``).

``build_task("graph_coloring", {"nodes": (5, 6)}, seed=7)`` returns a task: the parameters go
through the task's typed parameters (``percepdsl.ir.GraphColoringParams`` / ``SudokuParams``),
which fill the rest with the catalogue's defaults and check ranges and constraints
(``ValueError`` otherwise). A run builds its task from the IR instead (``plugins.build_task``).
"""

from __future__ import annotations

from collections.abc import Mapping
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
from .disk import DatasetTask
from .graph_coloring import GraphColoringTask
from .sudoku import SudokuTask

#: Task name -> task class; each class takes ``(params: its params_type, seed: int)``.
TASKS: dict[str, type[TaskBase] | type[DatasetTask]] = {
    GraphColoringTask.name: GraphColoringTask,
    SudokuTask.name: SudokuTask,
    DatasetTask.name: DatasetTask,
}


def build_task(name: str, params: Mapping[str, Any] | None, seed: int) -> TaskBase:
    """Instantiate task ``name`` from some of its parameters (the rest: the catalogue's
    defaults); raises ``ValueError`` for an unknown task or a bad parameter (pydantic's
    ``ValidationError`` is one)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    cls = TASKS[name]
    return cls(cls.params_type.model_validate(dict(params or {})), seed)


__all__ = [
    "MARKERS",
    "REASONING_STYLES",
    "SPLITS",
    "TASKS",
    "GraphColoringTask",
    "DatasetTask",
    "Sample",
    "Scores",
    "Sections",
    "SudokuTask",
    "Task",
    "build_task",
    "parse_sections",
    "perception_share",
]
