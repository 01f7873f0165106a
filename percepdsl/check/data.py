"""The `dataset` task's settings against the data they name: the path (resolved against the spec
file that writes it, and made absolute for the IR), the two splits, and every named column.

Each problem is reported at the setting that names the missing thing (at the task block when the
setting is a default). The data is only looked at (`percepdsl.data`), never loaded; the run
checks the rows themselves before training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import nodes as A
from ..data import DataError, layout
from ..diagnostics import did_you_mean
from .checker import Checker

COLUMNS = ("image", "query", "perception", "reasoning", "answer", "instance")


def check_dataset(ck: Checker, block: A.Block, settings: dict[str, Any]) -> dict[str, Any] | None:
    """`settings` with `path` absolute, or None when the data does not have what they name (reported)."""

    def at(key: str):
        entry = block.get(key)
        return entry.value.span if entry is not None and not isinstance(entry, A.SubBlock) else block.span

    base = _spec_dir(ck, block.get("path"))
    path = (base / Path(settings["path"]).expanduser()).resolve()
    try:
        data = layout(path)
    except DataError as exc:
        ck.error(
            at("path"),
            "missing-data",
            f"dataset: {exc}",
            f"the path is relative to {base}/" if not Path(settings["path"]).is_absolute() else None,
        )
        return None
    ok = True
    for key in ("train_split", "test_split"):
        split = settings[key]
        if split not in data.splits:
            guess = did_you_mean(split, list(data.splits))
            ck.error(
                at(key),
                "missing-split",
                f"dataset {path} has no split `{split}` (`{key}`); its splits: {', '.join(sorted(data.splits)) or 'none'}",
                f"did you mean `{guess}`?" if guess else f'name one with `{key} = "..."`',
            )
            ok = False
    if not ok:
        return None
    if settings["train_split"] == settings["test_split"]:
        ck.error(
            at("test_split"),
            "incompatible",
            f"`train_split` and `test_split` are both `{settings['test_split']}`",
            "evaluate on held-out rows",
        )
        return None
    for split in (settings["train_split"], settings["test_split"]):
        columns = data.columns(split)
        if columns is None:  # unreadable without loading: the run checks
            continue
        for key in COLUMNS:
            name = settings[key]
            if name is not None and name not in columns:
                guess = did_you_mean(name, columns)
                ck.error(
                    at(key),
                    "missing-column",
                    f"dataset split `{split}` has no column `{name}` (`{key}`); its columns: {', '.join(columns)}",
                    f"did you mean `{guess}`?" if guess else f'name the column with `{key} = "..."`',
                )
                ok = False
        if not ok:
            return None
    return {**settings, "path": str(path)}


def _spec_dir(ck: Checker, entry: A.Node | None) -> Path:
    """The directory of the file that writes `entry` (the checked file or an include), else the cwd."""
    file = entry.span.file if entry is not None else ck.loaded.name
    if file == ck.loaded.name and ck.loaded.path is not None:
        return ck.loaded.path.absolute().parent
    return Path(file).absolute().parent if file and not file.startswith("<") else Path.cwd()
