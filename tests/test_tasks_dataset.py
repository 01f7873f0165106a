"""Materialising a task: the on-disk DatasetDict and the contact sheet."""

from __future__ import annotations

import json
from pathlib import Path

from datasets import load_from_disk
from PIL import Image

from percepdsl_runtime.tasks import build_task
from percepdsl_runtime.tasks.dataset import contact_sheet, write_dataset


def test_write_dataset_round_trips(tmp_path: Path) -> None:
    task = build_task("graph_coloring", {"nodes": (5, 6)}, seed=0)
    out = write_dataset(task, tmp_path / "gc", splits={"train": 6, "test": 4})
    data = load_from_disk(str(out))
    assert set(data) == {"train", "test"} and data["train"].num_rows == 6 and data["test"].num_rows == 4
    assert set(data["train"].column_names) == {
        "id",
        "query",
        "image",
        "perception",
        "reasoning",
        "answer",
        "response",
        "instance",
    }
    row = data["test"][2]
    sample = task.sample("test", 2)
    assert row["id"] == "graph_coloring/test/2" and row["response"] == sample.response
    assert isinstance(row["image"], Image.Image) and row["image"].size == (64, 64)
    assert row["image"].convert("RGB").tobytes() == sample.image.tobytes()  # PNG is lossless
    assert json.loads(row["instance"]) == sample.instance
    assert row["answer"] == sample.ground_truth and f"<reasoning> {row['reasoning']} </reasoning>" in sample.response
    assert task.score(json.loads(row["instance"]), row["response"]).outcome


def test_write_dataset_replaces_atomically(tmp_path: Path) -> None:
    task = build_task("sudoku", {}, seed=0)
    out = write_dataset(task, tmp_path / "sd", splits={"train": 2, "test": 2})
    write_dataset(task, out, splits={"train": 3, "test": 1})
    data = load_from_disk(str(out))
    assert data["train"].num_rows == 3 and data["test"].num_rows == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sd"]  # no staging or backup left behind


def test_contact_sheet(tmp_path: Path) -> None:
    for name in ("graph_coloring", "sudoku"):
        path = contact_sheet(build_task(name, {}, seed=0), tmp_path / f"{name}.png", n=6)
        with Image.open(path) as img:
            assert img.format == "PNG"
            assert img.width == 4 * 192 and img.height > 2 * 192  # 4 columns, 2 rows, 3x tiles + captions
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph_coloring.png", "sudoku.png"]
