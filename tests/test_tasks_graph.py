"""Graph colouring: ground truth, verifiers, partial credit, determinism, the split, robustness."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import task_digest
from hypothesis import given, settings
from hypothesis import strategies as st

from percepdsl.ir import GraphColoringParams
from percepdsl_runtime.tasks import build_task
from percepdsl_runtime.tasks.base import parse_sections
from percepdsl_runtime.tasks.graph_coloring import (
    Graph,
    GraphColoringTask,
    chromatic,
    graph_space_size,
    node_pairs,
    perception_text,
)
from percepdsl_runtime.tasks.render import NODE_COLORS, circle_positions

STYLES = ("brief", "trace", "verbose")
FORMATS = ("edges", "adjacency")


def answer_of(colors: list[int]) -> str:
    return " ".join(f"c{c}" for c in colors)


def with_answer(response: str, answer: str) -> str:
    return response[: response.index("<answer>")] + f"<answer> {answer} </answer>"


def with_perception(task: GraphColoringTask, response: str, graph: Graph) -> str:
    words = " ".join(perception_text(graph, task.params.perception_format))
    return f"<perception> {words} </perception>" + response[response.index(" <reasoning>") :]


def brute_force_chromatic(g: Graph) -> int:
    for k in range(1, g.num_nodes + 1):
        for colors in itertools.product(range(k), repeat=g.num_nodes):
            if all(colors[i] != colors[j] for i, j in g.edges):
                return k
    raise AssertionError


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("style", STYLES)
def test_ground_truth_verifies_and_uses_only_vocabulary(style: str, fmt: str) -> None:
    task = build_task("graph_coloring", {"nodes": (3, 9), "reasoning": style, "perception_format": fmt}, seed=3)
    vocab = set(task.vocabulary())
    for split in ("train", "test"):
        for i in range(25):
            s = task.sample(split, i)
            assert s.id == f"graph_coloring/{split}/{i}"
            assert set(s.query.split()) <= vocab and set(s.response.split()) <= vocab
            sections = parse_sections(s.response)
            assert " ".join(sections.perception or ()) == s.perception
            assert " ".join(sections.answer or ()) == s.ground_truth
            scores = task.score(s.instance, s.response)
            assert scores.format_ok and scores.outcome and scores.reasoning and scores.perception_exact
            assert scores.perception_partial == 1.0
            assert scores.slot_errors == [0] * len(node_pairs(9))  # laid out by the largest graph of `nodes`
            assert task.parse_perception(s.perception) == task.parse_perception(s.response)
            assert s.image.mode == "RGB" and s.image.size == (64, 64)


def test_trace_states_the_search() -> None:
    task = build_task("graph_coloring", {"nodes": 6, "reasoning": "trace"}, seed=0)
    for i in range(20):
        s = task.sample("train", i)
        reasoning = parse_sections(s.response).reasoning or ()
        k = s.instance["chromatic_number"]
        assert reasoning[:3] == ("try", "2", ":")
        assert reasoning[-2:] == ("colors", str(k))
        assert reasoning.count("fail") == k - 2 and reasoning.count("done") == 1


def replay_verbose(words: tuple[str, ...]) -> int:
    """Replay a `verbose` trace and check that every step states only what its neighbour lists
    and the earlier steps imply (the property that makes it learnable step by step); returns
    the number of visits checked. A re-assigned node undoes every assignment made after it
    (the search backtracked into it); `try` starts afresh."""
    nbrs: dict[int, list[int]] = {}
    i = 0
    while words[i] == "adj":
        v, j = int(words[i + 1]), i + 3
        while words[j] not in ("adj", "try"):
            j += 1
        nbrs[v] = [int(w) for w in words[i + 3 : j]]
        i = j
    colors: dict[int, int] = {}
    order: list[int] = []
    untried: dict[int, list[str]] = {}  # per visited node: the candidates not yet assigned, in order
    k = visits = 0
    while i < len(words):
        w = words[i]
        if w == "try":
            k, colors, order, i = int(words[i + 1]), {}, [], i + 3
        elif w == "sat":  # per uncoloured node: its neighbours' distinct colours, then their count
            i += 1
            for u in sorted(set(nbrs) - set(colors)):
                shown = sorted({colors[x] for x in nbrs[u] if x in colors})
                expect = [str(u), *(f"c{c}" for c in shown), f"s{len(shown)}"]
                assert list(words[i : i + len(expect)]) == expect
                i += len(expect)
        elif w == "check":  # the edge check after `done` restates the answer
            break
        elif w in ("fail", "done"):
            i += 1
        elif words[i + 1] == ":":  # a visit: each neighbour with its colour or -, then the candidates
            v = int(w)
            stated = list(words[i + 2 : i + 2 + 2 * len(nbrs[v])])
            assert stated == [x for n in nbrs[v] for x in (str(n), f"c{colors[n]}" if n in colors else "-")]
            j = i + 2 + 2 * len(nbrs[v])
            assert words[j] == "?"
            used = max(colors.values(), default=0)
            blocked = {colors[n] for n in nbrs[v] if n in colors}
            cands = [f"c{c}" for c in range(1, min(k, used + 1) + 1) if c not in blocked] or ["none"]
            assert list(words[j + 1 : j + 1 + len(cands)]) == cands
            untried[v] = cands
            i, visits = j + 1 + len(cands), visits + 1
        elif words[i + 1] == "=":
            v = int(w)
            if v in colors:  # backtracked into v: undo everything decided after it
                for u in order[order.index(v) :]:
                    del colors[u]
                order = order[: order.index(v)]
            assert words[i + 2] == untried[v].pop(0)  # candidates are tried in the order stated
            colors[v] = int(words[i + 2][1:])
            order.append(v)
            i += 3
        else:
            assert words[i + 1] == "back", words[i : i + 3]
            i += 2
    return visits


def test_verbose_trace_is_locally_checkable() -> None:
    """Every visit of a `verbose` trace restates the colours of the neighbours it depends on and
    the candidates they leave, every `sat` line the saturation of each uncoloured node: each step
    can be checked from the neighbour lists and the steps before it."""
    task = build_task("graph_coloring", {"nodes": (5, 8), "reasoning": "verbose"}, seed=3)
    total = 0
    for i in range(40):
        s = task.sample("train", i)
        total += replay_verbose(parse_sections(s.response).reasoning or ())
    assert total >= 40 * 5  # at least one visit per node of every graph


def test_any_optimal_colouring_counts_and_mutations_fail() -> None:
    task = build_task("graph_coloring", {"nodes": 6}, seed=1)
    for i in range(20):
        s = task.sample("test", i)
        colors, k = s.instance["coloring"], s.instance["chromatic_number"]
        g = Graph(s.instance["num_nodes"], tuple(map(tuple, s.instance["edges"])))
        relabelled = [k + 1 - c for c in colors]  # another optimal colouring, other colour names
        assert task.score(s.instance, with_answer(s.response, answer_of(relabelled))).outcome
        i0, j0 = g.edges[0]
        clash = list(colors)
        clash[j0] = clash[i0]  # two adjacent nodes share a colour
        assert not task.score(s.instance, with_answer(s.response, answer_of(clash))).outcome
        extra = list(colors)
        extra[0] = k + 1  # still proper, but one colour too many
        scores = task.score(s.instance, with_answer(s.response, answer_of(extra)))
        assert not scores.outcome and not scores.reasoning
        assert not task.score(s.instance, with_answer(s.response, answer_of(colors[:-1]))).outcome


@pytest.mark.parametrize("fmt", FORMATS)
def test_perturbed_perception_lowers_partial_credit(fmt: str) -> None:
    task = build_task("graph_coloring", {"nodes": 6, "perception_format": fmt}, seed=2)
    for i in range(10):
        s = task.sample("test", i)
        g = Graph(s.instance["num_nodes"], tuple(map(tuple, s.instance["edges"])))
        missing = Graph(g.num_nodes, g.edges[1:])
        scores = task.score(s.instance, with_perception(task, s.response, missing))
        assert not scores.perception_exact and scores.perception_partial < 1.0
        assert sum(scores.slot_errors) == 1
        assert scores.slot_errors[node_pairs(g.num_nodes).index(g.edges[0])] == 1
        assert scores.outcome  # the answer is still right for the true graph
        # reasoning is judged against the perceived graph
        perceived_k = chromatic(missing)[0]
        assert scores.reasoning == (perceived_k == s.instance["chromatic_number"])


def test_reasoning_is_judged_on_the_perceived_graph() -> None:
    task = build_task("graph_coloring", {"nodes": 5}, seed=0)
    s = task.sample("test", 0)
    empty_but_one = Graph(5, ((0, 1),))  # a perceived graph that needs only 2 colours
    text = with_answer(with_perception(task, s.response, empty_but_one), "c1 c2 c1 c1 c1")
    scores = task.score(s.instance, text)
    assert scores.reasoning and scores.format_ok
    assert not scores.perception_exact
    assert scores.outcome == (s.instance["chromatic_number"] == 2 and s.instance["edges"] == [[0, 1]])


def test_unparsable_perception_scores_zero_and_no_reasoning() -> None:
    task = build_task("graph_coloring", {}, seed=0)
    s = task.sample("test", 0)
    text = s.response.replace(s.perception, "garbage words")
    scores = task.score(s.instance, text)
    assert not scores.format_ok and not scores.reasoning and not scores.perception_exact
    assert scores.outcome  # the answer section alone decides the outcome
    assert scores.perception_partial == 0.0


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 7).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.sampled_from(node_pairs(n) or ((0, 0),))))))
def test_chromatic_number_equals_brute_force(case: tuple[int, set[tuple[int, int]]]) -> None:
    n, edges = case
    g = Graph(n, tuple(sorted(e for e in edges if e[0] != e[1])))
    k, colors = chromatic(g)
    assert k == brute_force_chromatic(g)
    assert len(colors) == n and len(set(colors)) == k and all(colors[i] != colors[j] for i, j in g.edges)


def test_determinism_within_and_across_processes() -> None:
    raw = {"nodes": (5, 7), "layout": "random", "jitter": 0.5, "noise": 0.3, "distractors": 2}
    params = GraphColoringParams(**raw)
    here = {split: task_digest(GraphColoringTask(params, seed=11), split, 15) for split in ("train", "test")}
    again = GraphColoringTask(params, seed=11)
    # test items do not depend on the order they are asked for
    assert again.sample("test", 14).response == GraphColoringTask(params, seed=11).sample("test", 14).response
    assert task_digest(again, "train", 15) == here["train"]
    assert task_digest(GraphColoringTask(params, seed=12), "train", 15) != here["train"]
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from helpers import task_digest;"
        "from percepdsl_runtime.tasks.graph_coloring import GraphColoringTask as T; from percepdsl.ir import GraphColoringParams as P;"
        f"t = T(P(**{raw!r}), seed=11); print(task_digest(t, 'train', 15), task_digest(t, 'test', 15))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [here["train"], here["test"]]


@pytest.mark.parametrize("params", [{}, {"nodes": (5, 6), "edges": 6}, {"nodes": 8, "edge_prob": 0.3}])
def test_train_and_test_share_no_graph(params: dict) -> None:
    task = build_task("graph_coloring", params, seed=5)
    test = [task.graph("test", i) for i in range(task.size("test"))]
    train = [task.graph("train", i) for i in range(task.size("train"))]
    assert all(task.is_held_out(g) for g in test)
    assert not any(task.is_held_out(g) for g in train)
    assert not {g.key for g in test} & {g.key for g in train}
    assert len({g.key for g in test}) == len(test)  # test items are distinct graphs


def test_default_split_sizes() -> None:
    task = build_task("graph_coloring", {}, seed=0)
    assert graph_space_size(5, 5, None) == 1023  # 2^10 − 1 = 1,023 non-empty graphs on 5 nodes (10 node pairs)
    assert 0.2 < task.held_out < 0.3  # ~250 test graphs, ~770 left for train


def test_circle_image_shows_each_node_colour() -> None:
    task = build_task("graph_coloring", {"nodes": 7}, seed=0)
    s = task.sample("train", 0)
    for i, (x, y) in enumerate(circle_positions(7, 64, margin=5 + 2)):
        assert s.image.getpixel((round(x), round(y))) == NODE_COLORS[i]


VOCAB = build_task("graph_coloring", {}, 0).vocabulary()


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.text(max_size=300),
        st.lists(st.sampled_from(VOCAB), max_size=80).map(" ".join),
        st.lists(st.sampled_from(VOCAB), max_size=40).map(
            lambda ws: (
                "<perception> 5 : " + " ".join(ws) + " </perception> <reasoning> </reasoning> <answer> " + " ".join(ws) + " </answer>"
            )
        ),
    ),
    st.sampled_from(FORMATS),
)
def test_scoring_and_parsing_never_raise(text: str, fmt: str) -> None:
    task = build_task("graph_coloring", {"perception_format": fmt}, 0)
    s = task.sample("test", 0)
    scores = task.score(s.instance, text)
    assert isinstance(scores.format_ok, bool) and isinstance(scores.outcome, bool)
    assert 0.0 <= scores.perception_partial <= 1.0
    assert len(scores.slot_errors) == 10 and set(scores.slot_errors) <= {0, 1}
    task.parse_perception(text)


@pytest.mark.parametrize(
    "params",
    [
        {"nodes": 2},
        {"nodes": (6, 5)},
        {"nodes": (5, 6, 7)},
        {"nodes": 11},
        {"edge_prob": 0.0},
        {"edge_prob": 1.5},
        {"edges": 11},
        {"layout": "grid"},
        {"perception_format": "matrix"},
        {"reasoning": "long"},
        {"image": 8},
        {"node_radius": 9},
        {"jitter": -0.1},
        {"distractors": -1},
        {"train": 1.5},
    ],
)
def test_bad_parameters_raise(params: dict) -> None:
    with pytest.raises(ValueError):
        build_task("graph_coloring", params, 0)


def test_counterfactual_prefix() -> None:
    task = build_task("graph_coloring", {}, 0)
    s = task.sample("test", 3)
    prefix = task.counterfactual_prefix(s)
    assert prefix == f"<perception> {s.perception} </perception> <reasoning>"
    assert s.response.startswith(prefix)


@pytest.mark.parametrize("fmt", FORMATS)
def test_slot_errors_name_the_same_pair_across_node_counts(fmt: str) -> None:
    """`slot_errors` are summed element-wise over items (evaluate.sum_slot_errors): slot k must be the
    same node pair in every item. With a node range, k indexed each item's own pair list, so a 4-node
    graph's (1, 2) was added to a 5-node graph's (0, 4)."""
    from percepdsl_runtime.evaluate import sum_slot_errors

    task = build_task("graph_coloring", {"nodes": (4, 5), "perception_format": fmt}, seed=1)
    samples = [task.sample("test", i) for i in range(12)]
    assert {s.instance["num_nodes"] for s in samples} == {4, 5}
    per_item = []
    for s in samples:  # a perception stating the node count and no edges: an error at each true edge
        empty = s.response.split("</perception>")[0].split()[:3]  # <perception> n :
        text = " ".join(empty) + " " + ("" if fmt == "edges" else " ".join(f"{i}-{j} n" for i, j in node_pairs(s.instance["num_nodes"])))
        per_item.append(task.score(s.instance, text + " </perception>").slot_errors)
    expected = [sum(list(p) in s.instance["edges"] for s in samples) for p in node_pairs(5)]
    assert sum_slot_errors(per_item) == expected
    assert all(len(e) == len(node_pairs(5)) for e in per_item)
