"""Where a `dataset` task's data lies and what it holds, read without loading it.

The checker uses this to report a missing path, split or column at the setting that names it;
the runtime's `DatasetTask` uses the same `Layout` to load the data, so both agree on what the
splits are. Nothing here imports `datasets` or torch (a parquet schema is read with pyarrow,
imported only for parquet files).

Layouts, as Hugging Face writes them:

- a directory written by `DatasetDict.save_to_disk` (`dataset_dict.json` and one directory per
  split; what `percep gen` writes);
- data files, `.parquet`, `.json` or `.jsonl`: one file, or a directory of them (a local copy of a
  hub dataset). A file's split comes from its name or its directory, as on the hub:
  `data/train-00000-of-00001.parquet` and `train/part-0.jsonl` are `train`; `test.jsonl`,
  `testing-*`, `eval*` are `test`; `validation`, `valid`, `val`, `dev` are `validation`; a file
  whose name says nothing is `train`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}
#: split words in file and directory names, as the hub reads them → the split they mean
SPLIT_WORDS = {
    "train": "train",
    "training": "train",
    "test": "test",
    "testing": "test",
    "eval": "test",
    "evaluation": "test",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
}


class DataError(Exception):
    """The data cannot be found or read as a dataset."""


@dataclass
class Layout:
    """A dataset on disk: `disk` (save_to_disk) or data `files` of one `builder` (parquet | json)."""

    kind: str
    root: Path
    splits: dict[str, list[Path]] = field(default_factory=dict)  # split → its files (disk: its directory)
    builder: str | None = None

    def columns(self, split: str) -> list[str] | None:
        """The columns of `split` (None when they cannot be read without loading the data)."""
        files = self.splits[split]
        try:
            if self.kind == "disk":
                info = json.loads((files[0] / "dataset_info.json").read_text(encoding="utf-8"))
                return list(info.get("features", {}))
            if self.builder == "parquet":
                import pyarrow.parquet as pq

                return list(pq.read_schema(files[0]).names)
            return _json_keys(files[0])
        except (OSError, ValueError, KeyError, AttributeError):
            return None


def _json_keys(path: Path) -> list[str] | None:
    """The keys of the first record of a JSON-lines file, or of a JSON array of records."""
    with path.open(encoding="utf-8") as f:
        head = f.read(1)
        f.seek(0)
        if head == "[":
            data = json.load(f)
            return list(data[0]) if data and isinstance(data[0], dict) else None
        for line in f:
            if line.strip():
                rec = json.loads(line)
                return list(rec) if isinstance(rec, dict) else None
    return None


def split_of(rel: Path) -> str:
    """The split a data file belongs to, from its name or its directories (see the module doc)."""
    m = re.match(r"[A-Za-z]+", rel.stem)
    if m and m.group(0).lower() in SPLIT_WORDS and re.fullmatch(r"[A-Za-z]+([-._ 0-9].*)?", rel.stem):
        return SPLIT_WORDS[m.group(0).lower()]
    for part in reversed(rel.parts[:-1]):
        if part.lower() in SPLIT_WORDS:
            return SPLIT_WORDS[part.lower()]
    return "train"


def layout(path: str | Path) -> Layout:
    """How the data at `path` is laid out, and its splits; `DataError` says what is wrong."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"no such file or directory: {path}")
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        try:
            names = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"cannot read {path / 'dataset_dict.json'}: {exc}") from None
        return Layout("disk", path, {str(s): [path / str(s)] for s in names})
    if path.is_dir() and (path / "state.json").is_file():
        raise DataError(
            f"{path} holds one `Dataset` saved with save_to_disk, not a `DatasetDict` of splits; save a DatasetDict with train and test splits"
        )
    if path.is_file():
        files = [path] if path.suffix in BUILDERS else []
        base = path.parent
    else:
        base = path
        files = sorted(
            p
            for p in path.rglob("*")
            if p.suffix in BUILDERS and p.is_file() and not any(x.startswith(".") for x in p.relative_to(path).parts)
        )
    if not files:
        raise DataError(
            f"{path} is neither a dataset saved with save_to_disk nor a .parquet, .json or .jsonl file (or a directory of them)"
        )
    builders = {BUILDERS[f.suffix] for f in files}
    if len(builders) > 1:
        raise DataError(f"{path} mixes parquet and JSON files; keep one format per dataset")
    splits: dict[str, list[Path]] = {}
    for f in files:
        splits.setdefault(split_of(f.relative_to(base)), []).append(f)
    return Layout("files", path, splits, builders.pop())


__all__ = ["BUILDERS", "SPLIT_WORDS", "DataError", "Layout", "layout", "split_of"]
