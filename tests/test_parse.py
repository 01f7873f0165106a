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
