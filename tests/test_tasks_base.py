"""Shared task machinery: section parsing, shares, seeding, the held-out split, the registry."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from percepdsl_runtime.tasks import Task, build_task, parse_sections, perception_share
from percepdsl_runtime.tasks.base import (
    MARKERS,
    DistinctStream,
    Scores,
    edge_f1,
    format_response,
    held_out_fraction,
    in_held_out,
    perception_words,
    rng_for,
)

GOOD = "<perception> a b </perception> <reasoning> c </reasoning> <answer> d e </answer>"


def test_parse_sections_canonical() -> None:
    s = parse_sections(GOOD)
    assert s.format_ok
    assert (s.perception, s.reasoning, s.answer) == (("a", "b"), ("c",), ("d", "e"))
    assert format_response(["a", "b"], ["c"], ["d", "e"]) == GOOD


@pytest.mark.parametrize(
    "text",
    [
        "x " + GOOD,  # words before the first section
        GOOD + " x",  # words after the answer
        GOOD.replace("</perception> <reasoning>", "</perception> x <reasoning>"),  # between sections
        GOOD + " <answer> f </answer>",  # a repeated section
        "<reasoning> c </reasoning> <perception> a b </perception> <answer> d e </answer>",  # out of order
        GOOD.replace(" </answer>", ""),  # truncated
        "",
    ],
)
def test_parse_sections_rejects_malformed(text: str) -> None:
    assert not parse_sections(text).format_ok


def test_sections_are_read_even_when_malformed() -> None:
    s = parse_sections("junk " + GOOD + " <answer> f </answer>")
    assert s.answer == ("d", "e")  # the first answer section counts
    truncated = parse_sections("<perception> a b </perception> <reasoning> c c c")
    assert truncated.perception == ("a", "b") and truncated.reasoning is None and truncated.answer is None


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.lists(st.sampled_from([*MARKERS, "a", "", " "])).map(" ".join)))
def test_parse_sections_never_raises(text: str) -> None:
    s = parse_sections(text)
    assert isinstance(s.format_ok, bool)
    assert perception_share(text) >= 0.0


def test_non_string_input_reads_as_empty() -> None:
    assert parse_sections(None).perception is None  # type: ignore[arg-type]
    assert perception_words(None) is None  # type: ignore[arg-type]


def test_perception_words_accepts_section_or_response() -> None:
    assert perception_words(GOOD) == ("a", "b")
    assert perception_words("a b") == ("a", "b")


def test_perception_share() -> None:
    assert perception_share(GOOD) == pytest.approx(2 / 11)
    assert perception_share("no sections") == 0.0


def test_edge_f1() -> None:
    assert edge_f1(set(), set()) == 1.0
    assert edge_f1({1}, set()) == 0.0
    assert edge_f1({1, 2}, {2, 3}) == pytest.approx(0.5)


def test_scores_as_dict_has_every_field() -> None:
    assert set(Scores().as_dict()) == {
        "format_ok",
        "outcome",
        "perception_exact",
        "perception_partial",
        "reasoning",
        "slot_errors",
    }


def test_rng_is_stable_across_processes() -> None:
    here = rng_for(7, "train", 3, "graph").integers(1 << 30, size=4).tolist()
    code = "from percepdsl_runtime.tasks.base import rng_for;print(rng_for(7, 'train', 3, 'graph').integers(1 << 30, size=4).tolist())"
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert there.strip() == str(here)
    assert rng_for(7, "train", 3).random() != rng_for(7, "test", 3).random()


def test_held_out_subset_has_the_requested_share() -> None:
    share = sum(in_held_out(str(k), 0.2, salt="t") for k in range(20_000)) / 20_000
    assert share == pytest.approx(0.2, abs=0.01)
    assert held_out_fraction(1023, 200) == pytest.approx(250 / 1023)
    assert held_out_fraction(2**45, 200) == 0.05
    assert held_out_fraction(10, 200) == 0.5


def test_distinct_stream_skips_repeats_then_accepts_them_when_exhausted() -> None:
    values = iter([1, 1, 2, 1, 3] + [3] * 10 + [4])
    stream = DistinctStream(lambda: next(values), key=str, max_repeats=5)
    assert [stream[i] for i in range(3)] == [1, 2, 3]
    assert stream[3] == 3  # five repeats in a row: the space counts as exhausted
    assert stream[0] == 1  # cached


GENERATED = ("graph_coloring", "sudoku")  # the catalogue's tasks that make their own data (`dataset` reads a disk)


def test_registry_and_protocol() -> None:
    from percepdsl.catalogue import default_catalogue

    assert default_catalogue().names("task") == sorted([*GENERATED, "dataset"])
    for name in GENERATED:
        task = build_task(name, {}, seed=0)
        assert isinstance(task, Task)
        assert task.name == name
        assert task.size("train") == 2000 and task.size("test") == 200
        vocab = task.vocabulary()
        assert vocab == sorted(set(vocab)) and 50 < len(vocab) < 500
        assert set(MARKERS) <= set(vocab)
        assert all(w and " " not in w for w in vocab)
    with pytest.raises(ValueError, match="unknown task"):
        build_task("chess", {}, 0)
    with pytest.raises(ValueError, match="nodes"):  # not a sudoku parameter
        build_task("sudoku", {"nodes": 5}, 0)
    with pytest.raises(ValueError, match="unknown split"):
        build_task("sudoku", {}, 0).sample("val", 0)
    with pytest.raises(IndexError):
        build_task("sudoku", {}, 0).sample("train", -1)


def test_tasks_pickle_and_keep_their_streams() -> None:
    for name in GENERATED:
        task = build_task(name, {}, seed=3)
        first = task.sample("test", 1).response
        clone = pickle.loads(pickle.dumps(task))
        assert clone.sample("test", 1).response == first
        assert clone.sample("test", 4).response == build_task(name, {}, seed=3).sample("test", 4).response


@pytest.mark.parametrize("name", GENERATED)
def test_fillers_follow_reasoning_words_at_their_rate_and_change_nothing_else(name: str) -> None:
    plain = build_task(name, {"reasoning": "verbose"}, seed=4)
    noisy = build_task(name, {"reasoning": "verbose", "filler_words": 16, "filler_rate": 0.25}, seed=4)
    fillers = {f"~{k}" for k in range(16)}
    assert fillers <= set(noisy.vocabulary()) and not fillers & set(plain.vocabulary())
    assert set(noisy.vocabulary()) - set(plain.vocabulary()) == fillers
    follows, words, seen = 0, 0, set()
    for split, index in [("train", i) for i in range(40)] + [("test", i) for i in range(5)]:
        a, b = plain.sample(split, index), noisy.sample(split, index)
        assert (a.perception, a.ground_truth, a.instance, a.image.tobytes()) == (
            b.perception,
            b.ground_truth,
            b.instance,
            b.image.tobytes(),
        )
        sa, sb = parse_sections(a.response), parse_sections(b.response)
        assert (sa.perception, sa.answer) == (sb.perception, sb.answer)
        reasoning = list(sb.reasoning)
        assert [w for w in reasoning if w not in fillers] == list(sa.reasoning)  # the trace, with words only added
        assert reasoning[0] not in fillers and all(not (x in fillers and y in fillers) for x, y in zip(reasoning, reasoning[1:]))
        assert set(b.response.split()) <= set(noisy.vocabulary())
        assert noisy.score(b.instance, b.response).outcome and noisy.score(b.instance, b.response).format_ok
        follows += sum(w in fillers for w in reasoning)
        words += len(sa.reasoning)
        seen |= set(reasoning) & fillers
    assert 0.2 < follows / words < 0.3 and len(seen) == 16  # ≈0.25 over thousands of words; every filler drawn
    assert noisy.sample("train", 7).response == build_task(name, dict(noisy.params), seed=4).sample("train", 7).response
    off = build_task(name, {"reasoning": "verbose", "filler_words": 16, "filler_rate": 0.0}, seed=4)
    assert off.sample("train", 3).response == plain.sample("train", 3).response


def test_a_specs_fillers_are_reasoning_tokens_of_the_training_batches(tmp_path) -> None:
    """From spec text to the batches a stage trains on: the fillers are tokens of their own, with the reasoning role."""
    from realise import MICRO, compile_spec

    from percepdsl_runtime.run import build_stage, prepare

    text = MICRO.replace("reasoning = brief", "reasoning = verbose, filler_words = 8, filler_rate = 0.5")
    ir = compile_spec(text + "stage s = sft { steps = 1, batch = 4 }\n")
    assert (ir.task.params.filler_words, ir.task.params.filler_rate) == (8, 0.5)
    ctx = prepare(ir, tmp_path, echo=lambda _: None)
    _, data = build_stage(ctx, ir.stages[0])
    data.setup()
    filler_ids = {ctx.encoder.tokenizer.convert_tokens_to_ids(f"~{k}") for k in range(8)}
    assert ctx.encoder.tokenizer.unk_token_id not in filler_ids
    reasoning = ctx.encoder.role_names.index("reasoning")
    hits = 0
    for item in data.dataset.items:
        on = torch.isin(item["labels"], torch.tensor(sorted(filler_ids)))
        assert (item["role_ids"][on] == reasoning).all()
        hits += int(on.sum())
    assert hits > 0
