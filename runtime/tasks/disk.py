"""The `dataset` task: items from a Hugging Face dataset on disk, scored by a named verifier.

A row becomes a :class:`Sample` through the columns the spec names (``image``, ``query``,
``perception``, ``reasoning``, ``answer``): the target is the framework's section format built
from the column texts, ``<perception> p </perception> <reasoning> r </reasoning> <answer> a
</answer>``, so the role rules tag it as they tag the built-in tasks.

The verifier needs each row's true instance:

- ``instance = "col"``: the column holds it as JSON (what ``percep gen`` writes);
- otherwise it is recovered from the perception column, which states the instance for these
  tasks: ``graph_coloring`` parses the graph (``perception_format``: ``5 : 0-1 0-3 ..`` or
  ``5 : 0-1 y 0-2 n ..``) and computes its chromatic number by exact search; ``sudoku`` parses
  the givens (``1 _ 3 _ / ..``; 16 cells are a 4×4 grid, 81 a 9×9 one) — its unique solution is
  what ``score`` checks an answer against; ``exact_match`` keeps the row's perception and answer
  words.

Every row used is checked when the task is built (the run refuses the data before training, with
the split, the row and the text that does not parse): the graph-colouring and sudoku verifiers
are the built-in tasks' own ``score`` and ``parse_perception``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image

from percepdsl.data import DataError, layout
from percepdsl.ir import DatasetParams, GraphColoringParams, SudokuParams

from .base import (
    MARKERS,
    SPLITS,
    Sample,
    Scores,
    counterfactual_prefix,
    format_response,
    parse_sections,
    perception_words,
)
from .graph_coloring import GraphColoringTask, chromatic, parse_graph
from .sudoku import SudokuTask, parse_grid


class DatasetTask:
    """Train on one split of a dataset on disk and evaluate on another (see the module doc)."""

    name: ClassVar[str] = "dataset"
    params_type: ClassVar[type[DatasetParams]] = DatasetParams

    def __init__(self, params: DatasetParams, seed: int = 0) -> None:
        if not isinstance(params, DatasetParams):
            raise TypeError(f"task `dataset` takes DatasetParams, got {type(params).__name__}")
        self.params, self.seed = params, int(seed)
        self.root = Path(params.path)
        try:
            self.layout = layout(self.root)
        except DataError as exc:
            raise ValueError(str(exc)) from None
        self._text: dict[tuple[str, str], list[Any]] = {}  # (split, column key) → the column's values (text is small)
        self.rows = {
            "train": self._load("train", params.train_split, params.train),
            "test": self._load("test", params.test_split, params.test),
        }
        self.verifier = self._verifier()
        self._instances: dict[tuple[str, int], dict[str, Any]] = {}
        nodes = []
        for split in SPLITS:  # every row used must state a well-formed instance: refused now, not mid-training
            for i in range(len(self.rows[split])):
                inst = self._recover(split, i, check_only=True)
                if params.verifier == "graph_coloring" and isinstance(inst.get("num_nodes"), int):
                    nodes.append(inst["num_nodes"])
            try:
                _image(self.rows[split][0][params.image], self.root)
            except (OSError, ValueError) as exc:
                raise ValueError(f"row 0 of split `{split_name(params, split)}` of {self.root}: column `{params.image}`: {exc}") from None
        if nodes:  # slot_errors laid out by the data's largest graph: one node pair per slot across rows
            self.verifier.slot_nodes = max(nodes)

    # -- loading ------------------------------------------------------------------------------

    def _load(self, role: str, split: str, n: int | None) -> Any:
        """Rows of the data's `split`, used as the task's `role` split (train or test)."""
        import datasets

        p, lay = self.params, self.layout
        if split not in lay.splits:
            raise ValueError(f"dataset {self.root} has no split `{split}`; its splits: {', '.join(sorted(lay.splits))}")
        try:
            if lay.kind == "disk":
                ds = datasets.load_from_disk(str(lay.splits[split][0]))
            else:
                ds = datasets.load_dataset(lay.builder, data_files={split: [str(f) for f in lay.splits[split]]}, split=split)
        except Exception as exc:  # a corrupt file, a schema that does not parse: bad input, named
            raise ValueError(f"cannot read split `{split}` of {self.root}: {type(exc).__name__}: {exc}") from None
        named = {"image": p.image, "query": p.query, "perception": p.perception, "reasoning": p.reasoning, "answer": p.answer}
        named["instance"] = p.instance
        missing = [f"`{col}` ({key})" for key, col in named.items() if col is not None and col not in ds.column_names]
        if missing:
            raise ValueError(
                f"split `{split}` of {self.root} has no column {', '.join(missing)}; its columns: {', '.join(ds.column_names)}"
            )
        if len(ds) == 0:
            raise ValueError(f"split `{split}` of {self.root} has no rows")
        if n is not None and n > len(ds):  # fewer rows than the spec trains or evaluates on: not silently
            raise ValueError(f"`{role} = {n}` asks for more rows than split `{split}` has ({len(ds)})")
        if n is not None and n < len(ds):
            ds = ds.select(range(n))
        # text columns are read once (small); images are decoded per item
        for key in ("query", "perception", "reasoning", "answer", "instance"):
            col = named[key]
            self._text[(role, key)] = [] if col is None else [_text(v, key) if key != "instance" else v for v in ds[col]]
        return ds

    def _verifier(self) -> Any:
        p = self.params
        if p.verifier == "graph_coloring":
            return GraphColoringTask(GraphColoringParams(perception_format=p.perception_format, train=1, test=1), self.seed)
        if p.verifier == "sudoku":  # the grid size: the instance column's, else 81 given cells make a 9×9 grid
            first = self._text[("train", "instance")][0] if p.instance else None
            if first is not None:
                size = int((json.loads(first) if isinstance(first, str) else first).get("size", 4))
            else:
                size = 9 if len([w for w in self._text[("train", "perception")][0].split() if w != "/"]) == 81 else 4
            return SudokuTask(SudokuParams(size=size, train=1, test=1), self.seed)
        return None

    def _recover(self, split: str, index: int, check_only: bool = False) -> dict[str, Any]:
        """The instance of a row: its instance column, else recovered from its perception text."""
        key = (split, index)
        if key in self._instances:
            return self._instances[key]
        p = self.params
        raw = self._text[(split, "instance")][index] if p.instance else None
        where = f"row {index} of split `{split_name(p, split)}` of {self.root}"
        if p.verifier == "exact_match":  # the row's own words are what is matched
            words = " ".join(self._text[(split, "perception")][index].split())
            inst = {"task": "exact_match", "perception": words, "answer": " ".join(self._text[(split, "answer")][index].split())}
            if raw is not None:
                inst["row"] = json.loads(raw) if isinstance(raw, str) else raw
        elif raw is not None:
            try:
                inst = json.loads(raw) if isinstance(raw, str) else dict(raw)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{where}: column `{p.instance}` is not a JSON object: {exc}") from None
        else:
            text = self._text[(split, "perception")][index]
            inst = self._parse_instance(text, where, check_only)
        if not check_only:
            self._instances[key] = inst
        return inst

    def _parse_instance(self, text: str, where: str, check_only: bool) -> dict[str, Any]:
        p = self.params
        words = perception_words(text)
        if p.verifier == "graph_coloring":
            g = parse_graph(words, p.perception_format)
            if g is None:
                raise ValueError(
                    f"{where}: the perception `{text[:120]}` is not a graph in the `{p.perception_format}` format "
                    f"(`5 : 0-1 0-3` or `5 : 0-1 y 0-2 n ..`); set `perception_format`, or name an `instance` column"
                )
            k = 0 if check_only else chromatic(g)[0]  # the exact search: only when the item is used
            return {"task": "graph_coloring", "num_nodes": g.num_nodes, "edges": [list(e) for e in g.edges], "chromatic_number": k}
        if p.verifier == "sudoku":
            n = self.verifier.params.size
            cells = parse_grid(words, n, blanks=True)
            if cells is None:
                raise ValueError(f"{where}: the perception `{text[:120]}` is not a {n}×{n} sudoku grid (`1 _ 3 _ / ..`, `_` for a blank)")
            return {"task": "sudoku", "size": n, "puzzle": [list(cells[r * n : (r + 1) * n]) for r in range(n)]}

    # -- the Task protocol -----------------------------------------------------------------------

    def size(self, split: str) -> int:
        return len(self.rows[_split(split)])

    def sample(self, split: str, index: int) -> Sample:
        split = _split(split)
        if not 0 <= int(index) < self.size(split):
            raise IndexError(f"split `{split_name(self.params, split)}` has {self.size(split)} rows used; no row {index}")
        i = int(index)
        text = {k: self._text[(split, k)][i] if self._text[(split, k)] else "" for k in ("query", "perception", "reasoning", "answer")}
        inst = dict(self._recover(split, i))
        return Sample(
            task=self.name,
            split=split,
            index=i,
            id=f"dataset/{split_name(self.params, split)}/{i}",
            query=" ".join(text["query"].split()),
            image=_image(self.rows[split][i][self.params.image], self.root),
            perception=" ".join(text["perception"].split()),
            response=format_response(text["perception"].split(), text["reasoning"].split(), text["answer"].split()),
            ground_truth=" ".join(text["answer"].split()),
            instance=inst,
        )

    def vocabulary(self) -> list[str]:
        words = set(MARKERS)
        for split in SPLITS:
            for key in ("query", "perception", "reasoning", "answer"):
                for t in self._text[(split, key)]:
                    words.update(t.split())
        if self.verifier is not None:
            words.update(self.verifier.vocabulary())
        return sorted(words)

    def score(self, instance: dict[str, Any], output: str) -> Scores:
        if self.verifier is not None:
            return self.verifier.score(instance, output)
        return exact_match(instance, output)

    def parse_perception(self, text: str) -> object | None:
        if self.verifier is not None:
            return self.verifier.parse_perception(text)
        words = perception_words(text)
        return None if words is None else tuple(words)

    def counterfactual_prefix(self, sample: Sample) -> str:
        """``<perception> p* </perception> <reasoning>``: the oracle start the model continues for a_r
        (the start of the row's target, also where its perception is empty)."""
        return counterfactual_prefix(sample.perception)


def exact_match(instance: dict[str, Any], output: str) -> Scores:
    """Perception and answer words equal the row's. Reasoning correctness of an output whose
    perception is wrong is not decidable without a solver, so ``reasoning`` is the outcome of an
    output whose perception is exact (and False otherwise)."""
    sec = parse_sections(output)
    truth_p, truth_a = instance["perception"].split(), instance["answer"].split()
    got = list(sec.perception or ())
    slot_errors = [int(k >= len(got) or got[k] != w) for k, w in enumerate(truth_p)]
    common = sum(min(got.count(w), truth_p.count(w)) for w in set(truth_p))  # multiset word overlap
    partial = 2 * common / (len(got) + len(truth_p)) if got or truth_p else 1.0
    outcome = sec.answer is not None and list(sec.answer) == truth_a
    exact = sec.perception is not None and got == truth_p
    return Scores(
        format_ok=sec.format_ok,
        outcome=outcome,
        perception_exact=exact,
        perception_partial=partial if sec.perception is not None else 0.0,
        reasoning=outcome and exact,
        slot_errors=slot_errors,
    )


def split_name(params: DatasetParams, split: str) -> str:
    return params.train_split if split == "train" else params.test_split


def _split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return split


def _text(v: Any, key: str) -> str:
    if v is None:
        return ""
    if not isinstance(v, str):
        raise ValueError(f"column `{key}` holds {type(v).__name__} values, not text")
    return v


def _image(value: Any, root: Path) -> Image.Image:
    """An RGB image from a dataset cell: a decoded image, `{bytes, path}`, raw bytes, or a path
    (relative to the data's directory)."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value)).convert("RGB")
    if isinstance(value, str):
        base = root if root.is_dir() else root.parent
        with Image.open(base / value) as img:
            return img.convert("RGB")
    raise ValueError(f"an image cell holds {type(value).__name__}, not an image, image bytes or a path")


__all__ = ["DatasetTask", "exact_match"]
