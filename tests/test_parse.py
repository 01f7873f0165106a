"""The parser keeps its state per call: parses in several threads (the language server
checks and formats on worker threads), or one started from inside another, give what
sequential parses give."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import percepdsl.parse as P

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "specs").rglob("*.pd"))
TEXTS = [p.read_text(encoding="utf-8") for p in SPECS] + [
    "experiment x\nseed " + "(" * (P.MAX_DEPTH + 5) + "1" + ")" * (P.MAX_DEPTH + 5) + "\n",  # too deep
    "experiment x  # a comment\nseed (((1)))  # another\n",
    "experiment x\nseed = = 3\ntask {\n",  # syntax errors
]


def _parse(text: str) -> str:
    tree, diags = P.parse_text(text, "t.pd")
    return repr((tree, diags))


def test_parses_in_threads_match_sequential_parses() -> None:
    expected = [_parse(t) for t in TEXTS]
    work = TEXTS * 8
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, inside lexer callbacks too
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            got = list(pool.map(_parse, work))
    finally:
        sys.setswitchinterval(old)
    assert got == expected * 8


def test_a_parse_inside_a_lexer_callback_leaves_the_outer_parse_intact(monkeypatch) -> None:
    """A comment seen by the outer parse starts a whole second parse from the lexer callback."""
    outer_text = "experiment x  # starts the inner parse\nseed ((1))  # after it\n"
    inner_text = "experiment y\nseed (2)  # inner comment\n"
    expected_outer, expected_inner = _parse(outer_text), _parse(inner_text)
    inner: list[str] = []
    started = []

    class Comments(list):
        def append(self, tok) -> None:
            if not started:  # once: at the outer parse's first comment
                started.append(True)
                inner.append(_parse(inner_text))
            super().append(tok)

    class State(P._ParseState):
        def __init__(self) -> None:
            super().__init__()
            self.comments = Comments()

    monkeypatch.setattr(P, "_ParseState", State)
    assert _parse(outer_text) == expected_outer
    assert inner == [expected_inner]


def test_a_statement_keyword_names_a_setting_or_sub_block_on_a_line_of_its_own() -> None:
    """LALR merges the state after a block entry's value with the state after a statement's, where
    statement keywords are accepted: `task {` or `seed =` on the next line, without a comma, lexed as
    the keyword. A statement keyword followed by `=`, or by `{` (but for `eval`, `trainer`, `roles`,
    `zip`), is a name: the formatter's multi-line blocks parse back."""
    text = "experiment x\ntask graph_coloring { nodes = 5 }\nstage s = sft {\n  steps = 6\n  task {\n    reasoning = brief\n  }\n}\neval {\n  every = 5\n  seed = 3\n}\n"
    tree, diags = P.parse_text(text)
    assert diags == [] and tree is not None
    stage = next(i for i in tree.items if type(i).__name__ == "Stage")
    assert [e.key.id for e in stage.block.entries] == ["steps", "task"] and type(stage.block.entries[1]).__name__ == "SubBlock"
    # statements keep their keywords: `eval {` after a value still starts the eval statement
    tree, diags = P.parse_text("experiment x\nseed 3\neval { every = 5 }\ntask graph_coloring { nodes = 5 }\n")
    assert diags == [] and [type(i).__name__ for i in tree.items] == ["Experiment", "Seed", "Eval", "Task"]
