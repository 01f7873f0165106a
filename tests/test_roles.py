"""Role tagging: character rules and the character → token mapping (roles.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from percepdsl_runtime.roles import OTHER, RoleTagger, token_roles

PERC = {"role": "perception", "kind": "between", "open": "<perception>", "close": "</perception>", "markers": True}
REAS = {"role": "reasoning", "kind": "between", "open": "<reasoning>", "close": "</reasoning>"}
ANS = {"role": "answer", "kind": "between", "open": "<answer>", "close": "</answer>"}
TEXT = "<perception> 1 2 , 3 4 </perception> <reasoning> try 2 ok </reasoning> <answer> c1 c2 </answer>"


def roles_of(tagger: RoleTagger, text: str, sub: str, occurrence: int = 0) -> set[str]:
    """Roles of the characters of the occurrence-th `sub` in `text`."""
    start = -1
    for _ in range(occurrence + 1):
        start = text.index(sub, start + 1)
    ids = tagger.tag(text)[start : start + len(sub)]
    return {tagger.role_names[i] for i in ids}


def test_between_with_markers_and_implicit_other() -> None:
    t = RoleTagger.from_rules([PERC, REAS, ANS])
    assert t.role_names == ("perception", "reasoning", "answer", OTHER)
    assert roles_of(t, TEXT, "<perception> 1 2 , 3 4 </perception>") == {"perception"}
    assert roles_of(t, TEXT, "try 2 ok") == {"reasoning"}
    assert roles_of(t, TEXT, "</answer>") == {"answer"}
    # the spaces between sections are covered by no rule
    gap = TEXT.index("</perception>") + len("</perception>")
    assert t.role_names[t.tag(TEXT)[gap]] == OTHER


def test_markers_false_leaves_markers_to_later_rules() -> None:
    rule = dict(PERC, markers=False)
    t = RoleTagger.from_rules([rule, {"role": "reasoning", "kind": "rest"}])
    assert t.role_names == ("perception", "reasoning")
    assert roles_of(t, TEXT, "<perception>") == {"reasoning"}
    assert roles_of(t, TEXT, " 1 2 , 3 4 ") == {"perception"}


def test_first_rule_wins_and_rest_anywhere() -> None:
    digits = {"role": "digits", "kind": "regex", "pattern": r"\b[0-9]\b"}
    # rest declared first still only takes what nothing else took
    t = RoleTagger.from_rules([{"role": "reasoning", "kind": "rest"}, PERC, digits])
    assert t.role_names == ("reasoning", "perception", "digits")
    assert roles_of(t, TEXT, "3") == {"perception"}  # inside perception: the earlier rule
    assert roles_of(t, TEXT, "2", occurrence=1) == {"digits"}  # the "2" of "try 2"
    assert roles_of(t, TEXT, "ok") == {"reasoning"}


def test_every_occurrence_and_unclosed_open() -> None:
    t = RoleTagger.from_rules([ANS])
    text = "<answer> a </answer> x <answer> b"
    assert roles_of(t, text, "b") == {"answer"}  # an unclosed section runs to the end
    assert roles_of(t, text, "x") == {OTHER}


@pytest.mark.parametrize(
    "rules",
    [
        [{"role": "a", "kind": "nope"}],
        [{"kind": "rest"}],
        [{"role": "a", "kind": "between", "open": "<a>"}],
        [{"role": "a", "kind": "rest"}, {"role": "b", "kind": "rest"}],
        [{"role": "other", "kind": "regex", "pattern": "x"}],
        [{"role": "a", "kind": "regex", "pattern": "("}],
    ],
)
def test_bad_rules_raise(rules: list[dict]) -> None:
    with pytest.raises(Exception):
        RoleTagger.from_rules(rules)


def test_token_roles_word_level() -> None:
    t = RoleTagger.from_rules([PERC, REAS, ANS])
    words, offsets, pos = TEXT.split(" "), [], 0
    for w in words:
        offsets.append((pos, pos + len(w)))
        pos += len(w) + 1
    roles = [t.role_names[r] for r in token_roles(t.tag(TEXT), TEXT, offsets)]
    assert roles[: words.index("</perception>") + 1] == ["perception"] * (words.index("</perception>") + 1)
    assert roles[-1] == "answer" and roles[words.index("try")] == "reasoning"


def test_token_roles_whitespace_tokens_and_tail() -> None:
    # target text: " <a> x </a>\n<eos>" where char roles cover only the response part
    text = " <a> x </a>\n<eos>"
    t = RoleTagger.from_rules([{"role": "a", "kind": "between", "open": "<a>", "close": "</a>"}])
    resp_len = len(" <a> x </a>")
    char_roles = t.tag(text[:resp_len])
    offsets = [(0, 4), (4, 6), (6, 11), (11, 12), (12, 17)]  # " <a>", " x", " </a>", "\n", "<eos>"
    roles = token_roles(char_roles, text, offsets)
    assert roles == [0, 0, 0, 0, 0]  # newline and end-of-turn take the role of the last content


def _bpe_tokenizer():
    """A real HF fast tokenizer with subword pieces: byte-level BPE trained on task-like text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 20 + ["colour the graph with the fewest colours"] * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_token_roles_bpe_subword_pieces() -> None:
    tok = _bpe_tokenizer()
    t = RoleTagger.from_rules([PERC, ANS, {"role": "reasoning", "kind": "rest"}])
    text = "<perception> 12 , 34 </perception> <reasoning> colourful 2 </reasoning> <answer> c12 </answer>"
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    pieces = tok.convert_ids_to_tokens(enc["input_ids"])
    roles = token_roles(t.tag(text), text, enc["offset_mapping"])
    assert len(roles) == len(pieces)
    named = list(zip(pieces, (t.role_names[r] for r in roles)))
    # "<perception>" is split into pieces; all of them are perception
    end_p = text.index("</perception>") + len("</perception>")
    for (s, e), (piece, role) in zip(enc["offset_mapping"], named):
        first = s + (len(text[s:e]) - len(text[s:e].lstrip()))
        expected = "perception" if first < end_p else ("answer" if first >= text.index("<answer>") else "reasoning")
        assert role == expected, (piece, role)
    assert len(pieces) > 2 * len(text.split())  # really subword pieces ("<", "perception", ">", ...)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.sampled_from(["<perception>", "</perception>", "<answer>", "</answer>", "a", "12", ",", " ", "\n"]),
        max_size=30,
    ),
    st.lists(st.integers(1, 4), min_size=1, max_size=40),
)
def test_every_token_gets_exactly_one_valid_role(parts: list[str], cuts: list[int]) -> None:
    text = " ".join(parts)
    t = RoleTagger.from_rules([PERC, ANS])
    char_roles = t.tag(text)
    assert len(char_roles) == len(text) and (char_roles >= 0).all()
    offsets, pos = [], 0
    for c in cuts * (len(text) // max(sum(cuts), 1) + 1):
        if pos >= len(text):
            break
        offsets.append((pos, min(pos + c, len(text))))
        pos += c
    roles = token_roles(char_roles, text, offsets)
    assert len(roles) == len(offsets)
    assert all(0 <= r < len(t.role_names) for r in roles)
    for (s, e), r in zip(offsets, roles):  # a token with content takes its first content char's role
        seg = text[s:e]
        if seg.strip():
            assert r == char_roles[s + len(seg) - len(seg.lstrip())]
