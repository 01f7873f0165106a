"""Diagnostic tasks whose images have a canonical text form ``p*``: graph colouring and sudoku,
and ``dataset``, items of a dataset on disk scored by one of their verifiers (``disk.py``).

``build_task`` is the one way to make a task: a run passes its checked ``TaskIR``
(``build_task(ir.task, seed=ir.seed)``); from Python, ``build_task("graph_coloring", {"nodes": (5, 6)},
seed=7)`` names a catalogue task and some of its parameters, which go through the task's typed
parameters (``percepdsl.ir.GraphColoringParams`` / ``SudokuParams`` / ``DatasetParams``: the rest
are the catalogue's defaults; ranges and constraints raise ``ValueError``). Either way the class
is the catalogue entry's ``impl``, so a plugin task is built the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from percepdsl.ir import TaskIR


def build_task(task: TaskIR | str, params: Mapping[str, Any] | None = None, seed: int = 0) -> TaskBase:
    """The task a ``TaskIR`` (or a catalogue task's name and some of its parameters) describes,
    through its catalogue ``impl``. Raises ``ValueError`` for an unknown task or a bad parameter
    (pydantic's ``ValidationError`` is one) and ``ImplError`` for an ``impl`` that cannot be imported."""
    from percepdsl.catalogue import default_catalogue
    from percepdsl.ir import TaskIR

    from ..plugins import ImplError, resolve

    if isinstance(task, str):
        entry = default_catalogue().get("task", task)
        if entry is None:
            raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(default_catalogue().names('task'))}")
        task = TaskIR(name=task, params=dict(params or {}), impl=entry.impl)
    elif params is not None:
        raise TypeError("build_task(task_ir, seed=...): a TaskIR carries its own parameters")
    if not task.impl:
        raise ImplError(f"task `{task.name}` has no implementation (`impl`) in its catalogue entry")
    return resolve(task.impl)(task.params, seed)


__all__ = [
    "MARKERS",
    "REASONING_STYLES",
    "SPLITS",
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
