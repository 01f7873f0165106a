"""`percep gen`: a spec's task materialised as a Hugging Face dataset plus a contact sheet."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import datasets

ROOT = Path(__file__).resolve().parents[1]


def test_gen_writes_a_loadable_dataset_and_contact_sheet(tmp_path: Path) -> None:
    out = tmp_path / "data"
    proc = subprocess.run(
        [sys.executable, "-m", "percepdsl", "gen", "specs/sft_smoke.pd", "--out", str(out), "--set", "seed=3"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    ds = datasets.load_from_disk(str(out))
    assert ds["train"].num_rows == 64 and ds["test"].num_rows == 8
    assert set(ds["train"].column_names) >= {"query", "image", "perception", "reasoning", "answer", "response", "instance"}
    row = ds["test"][0]
    inst = json.loads(row["instance"])
    assert inst["task"] == "graph_coloring" and inst["num_nodes"] == 4
    assert row["response"].startswith("<perception> ") and row["perception"] in row["response"]
    assert (out / "contact_sheet.png").stat().st_size > 0
    train_ids = {json.dumps(json.loads(r)["edges"]) for r in ds["train"]["instance"]}
    test_ids = {json.dumps(json.loads(r)["edges"]) for r in ds["test"]["instance"]}
    assert not train_ids & test_ids, "train and test share a graph"


def test_gen_refuses_a_broken_spec(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pd"
    bad.write_text("experiment x\ntask graph_coloring { nodes = 99 }\nstage s = sft { steps = 1 }\n")
    proc = subprocess.run(
        [sys.executable, "-m", "percepdsl", "gen", str(bad), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2 and "out-of-range" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def _gen(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "percepdsl", "gen", "specs/sft_smoke.pd", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def test_gen_never_replaces_what_is_not_a_data_set(tmp_path: Path) -> None:
    """A data set replaces a directory wholesale: an --out that is a file, or a directory of
    something else, is refused (exit 2) and left as it was, before any sample is generated; so is
    one below a file, which could not be written."""
    notes = tmp_path / "project"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    a_file = tmp_path / "a_file"
    a_file.write_text("mine too")
    loop = tmp_path / "loop"  # a symlink to itself: was a `RuntimeError: Symlink loop` traceback
    loop.symlink_to(loop)
    cases = ((notes, "holds no data set"), (a_file, "is a file"), (a_file / "sub", "is a file, so"), (loop, "is a symbolic link loop"))
    for out, what in cases:
        proc = _gen(out)
        assert proc.returncode == 2, proc.stderr
        assert what in proc.stderr and "choose another --out" in proc.stderr and "Traceback" not in proc.stderr
        assert "generating" not in proc.stderr
    assert (notes / "notes.txt").read_text() == "mine" and sorted(p.name for p in notes.iterdir()) == ["notes.txt"]
    assert a_file.read_text() == "mine too"


def test_gen_contact_sheet_counts(tmp_path: Path) -> None:
    """--sheet below 1 is a usage error; above the test split it shows the split (8 here), not
    samples beyond it; a data set written before is replaced (what a second `gen` does)."""
    from PIL import Image

    assert _gen(tmp_path / "zero", "--sheet", "0").returncode == 2
    out = tmp_path / "data"
    for _ in range(2):
        proc = _gen(out, "--sheet", "1000")
        assert proc.returncode == 0, proc.stderr
    with Image.open(out / "contact_sheet.png") as img:
        assert img.width == 4 * 192 and img.height < 3 * 192 + 200  # 8 samples: 2 rows of 4 tiles


def test_gen_into_the_current_directory_writes_the_contact_sheet_too(tmp_path: Path) -> None:
    """`percep gen --out .` from an empty directory: the data set replaced the directory (a new one
    renamed into place), and the contact sheet, written to the relative path `./contact_sheet.png`,
    went to the old, deleted directory: `cannot write the data set to .: No such file or directory`,
    exit 3, with the data set written. Now the sheet is written beside the data set."""
    here = tmp_path / "here"
    here.mkdir()
    spec = str(ROOT / "specs" / "sft_smoke.pd")
    proc = subprocess.run(
        [sys.executable, "-m", "percepdsl", "gen", spec, "--out", "."], capture_output=True, text=True, cwd=here, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert datasets.load_from_disk(str(here))["test"].num_rows == 8 and (here / "contact_sheet.png").stat().st_size > 0
