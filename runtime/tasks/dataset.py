"""Materialise a task: a Hugging Face ``DatasetDict`` on disk, and a PNG contact sheet to eyeball.

Two formats (``percep gen --format``):

- ``hf`` (:data:`FEATURES`): ``id``, ``query``, ``image``, the three sections ``perception``,
  ``reasoning``, ``answer``, the whole target ``response`` and the ``instance`` as JSON. The
  ``dataset`` task reads it back with its default column names (``task dataset { path = ..,
  verifier = graph_coloring }``).
- ``trl`` (:data:`TRL_FEATURES`): TRL's conversational prompt-completion type with images, what
  ``SFTTrainer`` and ``GRPOTrainer`` take for vision-language models: ``prompt`` (one user turn, the
  query), ``completion`` (one assistant turn, the target), ``images`` (a list of one image); TRL
  puts the image placeholder before the user's text itself. ``perception``, ``answer`` and
  ``instance`` stay as columns, which GRPOTrainer hands to reward functions.

Both writers are atomic (``percepdsl.io``): they write next to the destination and rename into
place, so a reader never sees a half-written data set or image.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Mapping
from pathlib import Path

from datasets import Dataset, DatasetDict, Features, List, Value
from datasets import Image as ImageFeature
from PIL import Image, ImageDraw, ImageFont

from percepdsl.io import atomic_dir, atomic_path, os_error_text

from .base import SPLITS, Task, parse_sections

FEATURES = Features(
    {
        "id": Value("string"),
        "query": Value("string"),
        "image": ImageFeature(),
        "perception": Value("string"),
        "reasoning": Value("string"),
        "answer": Value("string"),
        "response": Value("string"),
        "instance": Value("string"),  # JSON text of Sample.instance
    }
)
_TURN = {"role": Value("string"), "content": Value("string")}
TRL_FEATURES = Features(
    {
        "prompt": List(_TURN),
        "completion": List(_TURN),
        "images": List(ImageFeature()),
        "id": Value("string"),
        "perception": Value("string"),
        "answer": Value("string"),
        "instance": Value("string"),
    }
)
FORMATS = ("hf", "trl")


def _row(task: Task, split: str, index: int, fmt: str) -> dict[str, object]:
    s = task.sample(split, index)
    instance = json.dumps(s.instance, sort_keys=True)
    if fmt == "trl":
        return {
            "prompt": [{"role": "user", "content": s.query}],
            "completion": [{"role": "assistant", "content": s.response}],
            "images": [s.image],
            "id": s.id,
            "perception": s.perception,
            "answer": s.ground_truth,
            "instance": instance,
        }
    reasoning = parse_sections(s.response).reasoning or ()
    return {
        "id": s.id,
        "query": s.query,
        "image": s.image,
        "perception": s.perception,
        "reasoning": " ".join(reasoning),
        "answer": s.ground_truth,
        "response": s.response,
        "instance": instance,
    }


def build_split(task: Task, split: str, n: int, fmt: str = "hf") -> Dataset:
    """The first ``n`` samples of ``split`` as a ``datasets.Dataset`` in format ``fmt``
    (:data:`FEATURES` or :data:`TRL_FEATURES`)."""
    features = TRL_FEATURES if fmt == "trl" else FEATURES
    rows = [_row(task, split, i, fmt) for i in range(n)]
    return Dataset.from_dict({name: [r[name] for r in rows] for name in features}, features=features)


def why_not_replace(out_dir: str | os.PathLike[str]) -> str | None:
    """Why ``out_dir`` must not be replaced by a data set, or None: it is absent, an empty directory
    or a data set (``dataset_dict.json``, what ``save_to_disk`` writes). Anything else there (a file,
    a directory of other things) would be deleted by the replacement; a path below a file could
    not be written at all."""
    out = Path(out_dir)
    try:
        out.resolve()
    except (RuntimeError, OSError) as exc:  # a loop (RuntimeError before Python 3.13): where to write cannot be known
        if isinstance(exc, RuntimeError) or exc.errno == errno.ELOOP:
            return f"{out} is a symbolic link loop: choose another --out"
    try:
        if not out.exists():
            above = next(p for p in out.absolute().parents if p.exists())  # the root always exists
            return None if above.is_dir() else f"{above} is a file, so {out} cannot be a directory: choose another --out"
        if out.is_dir() and ((out / "dataset_dict.json").is_file() or not any(out.iterdir())):
            return None
    except OSError as exc:
        return f"cannot read {out}: {os_error_text(exc)}"
    what = "a directory that holds no data set (no dataset_dict.json)" if out.is_dir() else "a file"
    return f"{out} is {what}; writing the data set there would delete it: choose another --out, or delete it first"


def write_dataset(task: Task, out_dir: str | os.PathLike[str], splits: Mapping[str, int] | None = None, fmt: str = "hf") -> Path:
    """Write ``{split: first n samples}`` (default: every split at ``task.size``) with ``save_to_disk``,
    in format ``fmt`` (``hf`` or ``trl``, see the module doc).

    Load it back with ``datasets.load_from_disk(path)``. An existing data set at ``out_dir`` is
    replaced; anything else there is refused (``FileExistsError``, see :func:`why_not_replace`).
    Returns the path of the data set.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if (why := why_not_replace(out_dir)) is not None:
        raise FileExistsError(why)
    out = Path(out_dir).resolve()
    counts = dict(splits) if splits is not None else {s: task.size(s) for s in SPLITS}
    data = DatasetDict({split: build_split(task, split, n, fmt) for split, n in counts.items()})
    with atomic_dir(out) as staging:
        data.save_to_disk(str(staging))
    return out


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    """Greedy word wrap of ``text`` to lines no wider than ``width`` px.

    Words are joined by two spaces: the default font's space is so narrow that ``0-1 0-2`` would
    read as one word.
    """
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]}  {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]}  {word}"
        else:
            lines.append(word)
    return lines


def contact_sheet(task: Task, path: str | os.PathLike[str], n: int = 8, split: str = "test", scale: int = 3) -> Path:
    """A PNG grid of the first ``n`` samples of ``split``, each image enlarged ``scale`` x
    (nearest neighbour, so pixels stay visible) and captioned with its id and ``p*``; at most the
    split's size (the data set holds no more), at least one."""
    if n < 1:
        raise ValueError(f"a contact sheet shows at least 1 sample, got {n}")
    n = min(n, task.size(split))
    samples = [task.sample(split, i) for i in range(n)]
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    tile_w = max(max(s.image.width for s in samples) * scale, 160)  # room for ~25 caption characters
    line_h = font.getbbox("Ag/")[3] + 2
    captions = [[s.id, *_wrap(s.perception, font, tile_w - 8, probe)] for s in samples]
    tile_h = max(s.image.height for s in samples) * scale + line_h * max(map(len, captions)) + 8
    cols = min(n, 4)
    rows = -(-n // cols)
    sheet = Image.new("RGB", (cols * tile_w, rows * tile_h), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (sample, caption) in enumerate(zip(samples, captions)):
        x, y = (k % cols) * tile_w, (k // cols) * tile_h
        big = sample.image.resize((sample.image.width * scale, sample.image.height * scale), Image.NEAREST)
        sheet.paste(big, (x + (tile_w - big.width) // 2, y + 4))
        for j, line in enumerate(caption):
            draw.text((x + 4, y + big.height + 6 + j * line_h), line, fill="black", font=font)
        draw.rectangle([x, y, x + tile_w - 1, y + tile_h - 1], outline=(200, 200, 200))
    out = Path(path).resolve()
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    return out
