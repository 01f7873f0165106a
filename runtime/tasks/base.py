"""Shared pieces of the diagnostic tasks.

* the records a task hands out (:class:`Sample`) and the verdicts it returns (:class:`Scores`);
* the role markers and the section parser, which never raises on any text;
* the :class:`Task` protocol that evaluation, training and plugins code against, and
  :class:`TaskBase`, the common implementation of the two built-in tasks;
* deterministic seeding and the hash-defined held-out subset that keeps train and test apart.

A task receives checked parameters: the typed model of ``percepdsl.ir`` (``GraphColoringParams``,
``SudokuParams``), whose defaults, ranges, choices and cross-parameter constraints are the
catalogue's. A task never re-defaults or re-checks them.

Every text a task produces is a sequence of space-separated words, each in
``task.vocabulary()``: the embedded tiny model uses a whitespace word-level tokenizer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar, runtime_checkable

import numpy as np
from PIL import Image
from pydantic import BaseModel

from percepdsl.catalogue import REASONING_STYLES  # noqa: F401  (re-exported: the styles every task offers)

PERCEPTION_OPEN = "<perception>"
PERCEPTION_CLOSE = "</perception>"
REASONING_OPEN = "<reasoning>"
REASONING_CLOSE = "</reasoning>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
#: The six role markers in the only order a well-formed response uses.
MARKERS: tuple[str, ...] = (
    PERCEPTION_OPEN,
    PERCEPTION_CLOSE,
    REASONING_OPEN,
    REASONING_CLOSE,
    ANSWER_OPEN,
    ANSWER_CLOSE,
)
SPLITS: tuple[str, ...] = ("train", "test")


@dataclass
class Sample:
    """One task item: the prompt (query + image), the oracle perception and the full target."""

    task: str
    split: str
    index: int
    id: str  # "<task>/<split>/<index>", e.g. "graph_coloring/test/17"
    query: str
    image: Image.Image  # RGB, image x image px
    perception: str  # oracle p*: the words between the perception markers
    response: str  # full chain-of-thought target, markers included
    ground_truth: str  # the words of the answer section
    instance: dict[str, Any]  # JSON-able description of the true instance


@dataclass
class Scores:
    """Verdicts on one generated text. Every field is always present."""

    format_ok: bool = False  # the three sections once each, in order, nothing outside, both parseable
    outcome: bool = False  # the answer is correct for the TRUE instance
    perception_exact: bool = False  # the parsed perception equals p*
    perception_partial: float = 0.0  # graph: edge F1; sudoku: cell accuracy
    reasoning: bool = False  # the answer is correct for the instance the model PERCEIVED
    slot_errors: list[int] = field(default_factory=list)  # 1 per wrongly perceived slot

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Sections:
    """The word lists of the three sections of a text (``None`` where a section is missing).

    Each section is read from its first opening marker to the next closing marker, so an
    answer can be verified even when the rest of the text is malformed; ``format_ok`` says
    whether the text is exactly ``<perception> .. </perception> <reasoning> .. </reasoning>
    <answer> .. </answer>`` with every marker once and no words outside the sections.
    """

    perception: tuple[str, ...] | None
    reasoning: tuple[str, ...] | None
    answer: tuple[str, ...] | None
    format_ok: bool


def _between(words: list[str], open_marker: str, close_marker: str) -> tuple[str, ...] | None:
    try:
        start = words.index(open_marker) + 1
        end = words.index(close_marker, start)
    except ValueError:
        return None
    return tuple(words[start:end])


def parse_sections(text: object) -> Sections:
    """Split a generated text into its three sections. Never raises; non-str input reads as empty."""
    words = text.split() if isinstance(text, str) else []
    positions = [i for i, w in enumerate(words) if w in MARKERS]
    format_ok = (
        [words[i] for i in positions] == list(MARKERS)
        and positions[0] == 0
        and positions[-1] == len(words) - 1
        # nothing between a closing marker and the next opening marker
        and positions[2] == positions[1] + 1
        and positions[4] == positions[3] + 1
    )
    return Sections(
        perception=_between(words, PERCEPTION_OPEN, PERCEPTION_CLOSE),
        reasoning=_between(words, REASONING_OPEN, REASONING_CLOSE),
        answer=_between(words, ANSWER_OPEN, ANSWER_CLOSE),
        format_ok=format_ok,
    )


def perception_words(text: object) -> tuple[str, ...] | None:
    """The perception section of ``text`` if it has a perception marker, else all of ``text``'s words.

    This lets parsers accept either a whole response or just the section's content.
    """
    if not isinstance(text, str):
        return None
    words = text.split()
    if PERCEPTION_OPEN in words:
        return _between(words, PERCEPTION_OPEN, PERCEPTION_CLOSE)
    return tuple(words)


def format_response(perception: list[str], reasoning: list[str], answer: list[str]) -> str:
    """Join section word lists into the canonical chain-of-thought text."""
    return " ".join(
        [PERCEPTION_OPEN, *perception, PERCEPTION_CLOSE, REASONING_OPEN, *reasoning, REASONING_CLOSE] + [ANSWER_OPEN, *answer, ANSWER_CLOSE]
    )


def counterfactual_prefix(perception: str) -> str:
    """``<perception> p* </perception> <reasoning>``, word for word the start of the response
    ``format_response`` writes for these perception words (one space between words, whatever
    the spacing of ``perception``, which may be empty): the text the model was trained on."""
    return " ".join([PERCEPTION_OPEN, *perception.split(), PERCEPTION_CLOSE, REASONING_OPEN])


def perception_share(response: str) -> float:
    """Fraction of a response's words (markers included) that lie inside the perception section."""
    words = response.split()
    perception = parse_sections(response).perception
    if not words or perception is None:
        return 0.0
    return len(perception) / len(words)


def edge_f1(predicted: set[Any], truth: set[Any]) -> float:
    """F1 of a predicted set against the true set (1.0 when both are empty)."""
    if not predicted and not truth:
        return 1.0
    hits = len(predicted & truth)
    if hits == 0:
        return 0.0
    precision, recall = hits / len(predicted), hits / len(truth)
    return 2 * precision * recall / (precision + recall)


def rng_for(seed: int, *parts: int | str) -> np.random.Generator:
    """A generator determined by ``seed`` and ``parts`` only, identical in every process.

    Strings enter through CRC-32 (Python's ``hash()`` of a str is salted per process).
    """
    words = [int(seed) & 0xFFFFFFFF]
    words += [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) & 0xFFFFFFFF for p in parts]
    return np.random.default_rng(np.random.SeedSequence(words))


def filler_vocabulary(count: int) -> list[str]:
    """The ``count`` filler words a task with ``filler_words = count`` may write: ``~0``, ``~1``, ..."""
    return [f"~{k}" for k in range(count)]


def with_fillers(words: list[str], count: int, rate: float, rng: np.random.Generator) -> list[str]:
    """``words`` with each followed, with probability ``rate``, by one of ``count`` filler words drawn uniformly.

    The fillers carry no information, so a model cannot predict them beyond their rate and their
    uniform draw: every reasoning word costs at least H(rate) + rate·ln(count) nats on top of its own
    loss (1.60 nats at 64 words and rate 0.25, 1.28 per token of the longer trace). That is the
    irreducible entropy free phrasing gives real chain-of-thought, which a fully determined trace lacks.
    A model that has learned them writes none under greedy decoding at rate < 0.5: the trace's next word
    is then likelier than any one filler.
    """
    if count == 0 or rate == 0:
        return words
    follow = rng.random(len(words)) < rate
    picks = rng.integers(count, size=len(words))
    out: list[str] = []
    for word, filler, k in zip(words, follow, picks):
        out += [word, f"~{k}"] if filler else [word]
    return out


def in_held_out(key: str, fraction: float, salt: str) -> bool:
    """Whether ``key`` lies in the held-out (test) subset: a fixed share ``fraction`` of keys.

    Membership is a pure function of the key (a salted BLAKE2 hash, not of the seed), so
    train sampling can reject held-out instances and every run agrees on the split.
    """
    digest = hashlib.blake2b(key.encode(), digest_size=8, person=salt.encode()[:16]).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


def held_out_fraction(space_size: float, test: int) -> float:
    """Share of the instance space reserved for test.

    1.25x the test count lets the test stream find ``test`` *distinct* instances without
    a long coupon-collector tail; the 5% floor keeps test sampling cheap on huge spaces
    (≤ 20 draws per test item) and the 50% cap leaves train at least half of a small space.
    """
    return min(0.5, max(0.05, 1.25 * test / space_size))


T = TypeVar("T")


class DistinctStream(Generic[T]):
    """The test split's items: the distinct items of a seeded stream, in order of first appearance.

    ``draw()`` yields the next candidate; ``key`` identifies an item. When ``max_repeats``
    candidates in a row are repeats, the space is taken as exhausted and later items may
    repeat (tiny instance spaces). Items are generated lazily and cached, so ``stream[i]`` is
    the same whatever order indices are asked in.
    """

    def __init__(self, draw: Callable[[], T], key: Callable[[T], str], max_repeats: int = 1000) -> None:
        self._draw, self._key, self._max_repeats = draw, key, max_repeats
        self._items: list[T] = []
        self._seen: set[str] = set()
        self._exhausted = False

    def __getitem__(self, index: int) -> T:
        repeats = 0
        while len(self._items) <= index:
            item = self._draw()
            if self._key(item) in self._seen and not self._exhausted:
                repeats += 1
                self._exhausted = repeats >= self._max_repeats
                continue
            repeats = 0
            self._items.append(item)
            self._seen.add(self._key(item))
        return self._items[index]


@runtime_checkable
class Task(Protocol):
    """What the runtime needs from a task (the built-in ones and plugins alike)."""

    name: str

    def sample(self, split: str, index: int) -> Sample: ...

    def size(self, split: str) -> int: ...

    def vocabulary(self) -> list[str]: ...

    def score(self, instance: dict[str, Any], output: str) -> Scores: ...

    def counterfactual_prefix(self, sample: Sample) -> str: ...

    def parse_perception(self, text: str) -> object | None: ...


P = TypeVar("P", bound=BaseModel)


class TaskBase(ABC, Generic[P]):
    """Common behaviour of the built-in tasks: splits, sample assembly, prefixes.

    ``params_type`` is the task's typed parameters (``percepdsl.ir``), which the constructor
    takes as they are; from Python, ``build_task(name, {...}, seed)`` validates a mapping of
    some of them through that type (the catalogue's defaults, ranges and constraints)."""

    name: ClassVar[str]
    query: ClassVar[str]
    params_type: ClassVar[type[BaseModel]]
    params: P

    def __init__(self, params: P, seed: int) -> None:
        if not isinstance(params, self.params_type):
            raise TypeError(f"task `{self.name}` takes {self.params_type.__name__}, got {type(params).__name__}")
        self.params = params
        self.seed = int(seed)

    def size(self, split: str) -> int:
        self._check_split(split)
        return int(getattr(self.params, split))

    def sample(self, split: str, index: int) -> Sample:
        """The ``index``-th item of ``split``; a pure function of (seed, params, split, index).

        Any non-negative index is valid: ``size(split)`` is the nominal size of the split,
        and indices past it continue the same stream.
        """
        self._check_split(split)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise IndexError(f"sample index must be a non-negative integer, got {index!r}")
        perception, reasoning, answer, instance, image = self._make(split, int(index))
        # a stream of its own: fillers leave the instance, the image and the other words of a seed as they were
        reasoning = with_fillers(reasoning, self.params.filler_words, self.params.filler_rate, rng_for(self.seed, split, index, "fillers"))
        return Sample(
            task=self.name,
            split=split,
            index=int(index),
            id=f"{self.name}/{split}/{index}",
            query=self.query,
            image=image,
            perception=" ".join(perception),
            response=format_response(perception, reasoning, answer),
            ground_truth=" ".join(answer),
            instance=instance,
        )

    def counterfactual_prefix(self, sample: Sample) -> str:
        """``<perception> p* </perception> <reasoning>``: the oracle start the model continues for a_r."""
        return counterfactual_prefix(sample.perception)

    @staticmethod
    def _check_split(split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")

    @abstractmethod
    def _make(self, split: str, index: int) -> tuple[list[str], list[str], list[str], dict[str, Any], Image.Image]:
        """(perception words, reasoning words, answer words, instance, image) of one item."""

    @abstractmethod
    def vocabulary(self) -> list[str]: ...

    @abstractmethod
    def score(self, instance: dict[str, Any], output: str) -> Scores: ...

    @abstractmethod
    def parse_perception(self, text: str) -> object | None: ...
