"""Graph colouring: colour a rendered graph with the fewest colours (its chromatic number).

Words (all space separated, all in :meth:`GraphColoringTask.vocabulary`):

* perception ``p*``, format ``edges`` (the paper's sorted edge list): ``5 : 0-1 0-3 2-4``
  (node count, ``:``, the edges); format ``adjacency`` (one decision per node pair):
  ``5 : 0-1 y 0-2 n 0-3 y ...`` with every pair ``i-j``, ``i < j``, in sorted order.
* answer: the colour of node 0, 1, ... in order, e.g. ``c1 c2 c1 c3 c2``. Any proper
  colouring that uses exactly the chromatic number of distinct colours is correct.
* reasoning, by style:

  - ``brief``: ``colors 3``.
  - ``trace``: the exact search. For k = 2, 3, ...: ``try k :``, then one step per node visit:
    the next node is the most constrained one (DSATUR: most distinct colours among its
    neighbours, then highest degree, then lowest id); ``v ? <candidate colours>`` (colours no
    coloured neighbour has; only one new colour is ever offered, which removes the symmetry
    between unused colours) or ``v ? none`` (a conflict); ``v = c`` for each choice; ``v back``
    when a choice among several candidates ran out of alternatives. An attempt ends with
    ``fail`` or ``done``; the failed attempt at k - 1 proves that k colours are needed.
    The trace ends with ``colors k``.
  - ``verbose``: the trace made explicit. First the neighbour lists (``adj 0 : 1 4 ...``);
    before each visit the saturation of every uncoloured node: the distinct colours among its
    neighbours and their number (``sat 0 c1 s1 2 s0 4 c1 c2 s2 ...``), and for
    the visited node each neighbour with its colour or ``-`` (``4 : 0 c2 1 c1 ? c3``); at the
    end a check of every edge (``check 0-1 c2 c1 ok ...``).
    Every step restates what it depends on (the neighbours' colours, the candidates they leave),
    so each can be checked from the neighbour lists and the steps before it: the step-by-step
    learnable format (a reasoner base reached a_r 0.89 in 1,000 steps on N=6, where ``trace``
    stalls near 0.3-0.45).

The ground-truth colouring is the first one this search finds, so the answer always matches the
trace; the chromatic number is exact (the search is exhaustive), never a greedy bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache, partial
from operator import attrgetter
from typing import Any

import numpy as np
from PIL import Image

from percepdsl.ir import GraphColoringParams

from .base import (
    MARKERS,
    DistinctStream,
    Scores,
    TaskBase,
    edge_f1,
    filler_vocabulary,
    held_out_fraction,
    in_held_out,
    parse_sections,
    perception_words,
    rng_for,
)
from .render import NODE_COLORS, draw_graph

MAX_NODES = len(NODE_COLORS)  # one distinct dot colour per node id (the catalogue's `nodes` range ends here)
QUERY = "color the graph using the fewest colors"


#: Draws allowed to find a graph on one side of the split before giving up. Each side holds at
#: least 5% of the graph space, so this is only reached when the space is a handful of graphs.
_MAX_DRAWS = 100_000


@dataclass(frozen=True)
class Graph:
    """An undirected simple graph on nodes ``0..num_nodes-1``; ``edges`` sorted, each ``(i, j)`` with i < j."""

    num_nodes: int
    edges: tuple[tuple[int, int], ...]

    @property
    def key(self) -> str:
        """Canonical text identifying the labelled graph (used for the train/test split)."""
        return f"{self.num_nodes}:" + ",".join(f"{i}-{j}" for i, j in self.edges)

    def neighbours(self) -> list[list[int]]:
        adj: list[list[int]] = [[] for _ in range(self.num_nodes)]
        for i, j in self.edges:
            adj[i].append(j)
            adj[j].append(i)
        return [sorted(a) for a in adj]


def pair_word(i: int, j: int) -> str:
    return f"{i}-{j}"


def color_word(c: int) -> str:
    return f"c{c}"


@cache
def node_pairs(n: int) -> tuple[tuple[int, int], ...]:
    """All node pairs ``(i, j)``, i < j, in sorted order: the slots of the perception."""
    return tuple((i, j) for i in range(n) for j in range(i + 1, n))


_PAIR_OF_WORD = {pair_word(i, j): (i, j) for i, j in node_pairs(MAX_NODES)}
_COLOR_OF_WORD = {color_word(c): c for c in range(1, MAX_NODES + 1)}
_COUNT_OF_WORD = {str(k): k for k in range(1, MAX_NODES + 1)}


def _search(graph: Graph, k: int, out: list[str] | None, verbose: bool) -> list[int] | None:
    """Exhaustive DSATUR backtracking with at most ``k`` colours; the first colouring found, or ``None``.

    The next node is the uncoloured one whose neighbours show the most distinct colours (ties:
    higher degree, then lower id): the most constrained node first. This keeps traces short: on
    10-node graphs (edge_prob 0.5) the longest of 500 traces has 232 words, against 3,228 when
    nodes are visited in id order.
    Only colours up to the highest used + 1 are offered, which breaks the symmetry between
    unused colours without losing any colouring up to renaming.
    """
    neighbours = graph.neighbours()
    n = graph.num_nodes
    colors = [0] * n
    order_key = [(-len(neighbours[v]), v) for v in range(n)]

    def extend(depth: int, used: int) -> bool:
        if depth == n:
            return True
        seen = {u: sorted({colors[w] for w in neighbours[u]} - {0}) for u in range(n) if not colors[u]}
        v = min(seen, key=lambda u: (-len(seen[u]), order_key[u]))
        blocked = {colors[w] for w in neighbours[v]}
        candidates = [c for c in range(1, min(k, used + 1) + 1) if c not in blocked]
        if out is not None:
            if verbose:
                out.append("sat")
                for u, shown in seen.items():
                    out.extend([str(u), *map(color_word, shown), f"s{len(shown)}"])
            out.append(str(v))
            if verbose:
                out.append(":")
                for w in neighbours[v]:
                    out.extend([str(w), color_word(colors[w]) if colors[w] else "-"])
            out.append("?")
            out.extend([color_word(c) for c in candidates] or ["none"])
        for c in candidates:
            if out is not None:
                out.extend([str(v), "=", color_word(c)])
            colors[v] = c
            if extend(depth + 1, max(used, c)):
                return True
        colors[v] = 0
        if len(candidates) > 1 and out is not None:  # a choice ran out of alternatives
            out.extend([str(v), "back"])
        return False

    return colors if extend(0, 0) else None


def chromatic(graph: Graph, out: list[str] | None = None, verbose: bool = False) -> tuple[int, list[int]]:
    """Exact chromatic number and the first optimal colouring (colours 1..k), with optional trace.

    Tries k = 1 (2 when there is an edge), 2, ... and stops at the first k the exhaustive
    search colours, so every smaller k was refuted.
    """
    for k in range(1 if not graph.edges else 2, max(graph.num_nodes, 1) + 1):
        if out is not None:
            out += ["try", str(k), ":"]
        colors = _search(graph, k, out, verbose)
        if colors is not None:
            if out is not None:
                out.append("done")
            return k, colors
        if out is not None:
            out.append("fail")
    raise AssertionError("unreachable: n colours always suffice")


def is_optimal_coloring(graph: Graph, colors: list[int], chromatic_number: int) -> bool:
    """A colour per node, adjacent nodes differ, and exactly ``chromatic_number`` distinct colours."""
    return len(colors) == graph.num_nodes and all(colors[i] != colors[j] for i, j in graph.edges) and len(set(colors)) == chromatic_number


def perception_text(graph: Graph, fmt: str) -> list[str]:
    """The canonical perception words ``p*`` of ``graph`` in format ``fmt``."""
    words = [str(graph.num_nodes), ":"]
    if fmt == "edges":
        return words + [pair_word(i, j) for i, j in graph.edges]
    present = set(graph.edges)
    for i, j in node_pairs(graph.num_nodes):
        words += [pair_word(i, j), "y" if (i, j) in present else "n"]
    return words


def parse_graph(words: tuple[str, ...] | None, fmt: str) -> Graph | None:
    """Strict parse of perception words in format ``fmt``; ``None`` unless well formed."""
    if words is None or len(words) < 2 or words[1] != ":" or words[0] not in _COUNT_OF_WORD:
        return None
    n = _COUNT_OF_WORD[words[0]]
    body = words[2:]
    if fmt == "edges":
        pairs = [_PAIR_OF_WORD.get(w) for w in body]
        if any(p is None or p[1] >= n for p in pairs):
            return None
        return Graph(n, tuple(sorted(set(pairs))))  # type: ignore[arg-type]
    slots = node_pairs(n)
    if len(body) != 2 * len(slots):
        return None
    edges = []
    for (i, j), name, flag in zip(slots, body[0::2], body[1::2]):
        if name != pair_word(i, j) or flag not in ("y", "n"):
            return None
        if flag == "y":
            edges.append((i, j))
    return Graph(n, tuple(edges))


def read_slots(words: tuple[str, ...] | None, n: int, fmt: str) -> list[bool | None]:
    """Lenient read of each node pair's presence (``None`` = not stated), for partial credit.

    Unknown words are skipped; in ``edges`` format an unlisted pair reads as absent, in
    ``adjacency`` format a pair counts only when followed by ``y`` or ``n``.
    """
    slots = node_pairs(n)
    if words is None:
        return [None] * len(slots)
    if fmt == "edges":
        listed = {_PAIR_OF_WORD.get(w) for w in words}
        return [p in listed for p in slots]
    stated: dict[tuple[int, int], bool] = {}
    for name, flag in zip(words, words[1:]):
        pair = _PAIR_OF_WORD.get(name)
        if pair is not None and flag in ("y", "n") and pair not in stated:
            stated[pair] = flag == "y"
    return [stated.get(p) for p in slots]


def parse_answer(words: tuple[str, ...] | None) -> list[int] | None:
    """Colour per node from answer words (``c1 c2 ...``); ``None`` if empty or any word is not a colour."""
    if not words:
        return None
    colors = [_COLOR_OF_WORD.get(w) for w in words]
    return None if any(c is None for c in colors) else colors  # type: ignore[return-value]


def graph_space_size(lo: int, hi: int, edges: int | None) -> int:
    """Number of distinct labelled graphs the generator can produce (at least one edge)."""
    pairs = [n * (n - 1) // 2 for n in range(lo, hi + 1)]
    if edges is None:
        return sum(2**p - 1 for p in pairs)
    return sum(math.comb(p, edges) for p in pairs)


class GraphColoringTask(TaskBase[GraphColoringParams]):
    """Graph colouring with an exact chromatic number and optimal colouring per instance.

    Train and test are split by graph: test graphs are a fixed hash-defined subset of the
    labelled-graph space (:func:`base.in_held_out`), train sampling rejects them, and test
    items are the first ``test`` distinct held-out graphs of a seeded stream.
    """

    name = "graph_coloring"
    query = QUERY
    params_type = GraphColoringParams

    def __init__(self, params: GraphColoringParams, seed: int = 0) -> None:
        super().__init__(params, seed)
        lo, hi = params.nodes
        #: node count whose pairs lay out ``slot_errors`` (the largest graph this task scores)
        self.slot_nodes = hi
        self.held_out = held_out_fraction(graph_space_size(lo, hi, params.edges), params.test)
        # partial/attrgetter rather than lambdas keep the task picklable (data-loader workers)
        draw_test = partial(self._draw, rng_for(self.seed, "test", "graphs"), True)
        self._test_graphs = DistinctStream(draw_test, key=attrgetter("key"))

    # -- instances -------------------------------------------------------------------------

    def _random_graph(self, rng: np.random.Generator) -> Graph:
        lo, hi = self.params.nodes
        n = int(rng.integers(lo, hi + 1))
        pairs = node_pairs(n)
        while True:
            if self.params.edges is not None:
                picked = np.sort(rng.choice(len(pairs), size=self.params.edges, replace=False))
            else:
                picked = np.flatnonzero(rng.random(len(pairs)) < self.params.edge_prob)
            if len(picked):
                return Graph(n, tuple(pairs[k] for k in picked))

    def is_held_out(self, graph: Graph) -> bool:
        """Whether ``graph`` belongs to the test part of the graph space."""
        return in_held_out(graph.key, self.held_out, salt="gc-split")

    def _draw(self, rng: np.random.Generator, held_out: bool) -> Graph:
        """The next graph of ``rng``'s stream on the requested side of the train/test split."""
        for _ in range(_MAX_DRAWS):
            g = self._random_graph(rng)
            if self.is_held_out(g) == held_out:
                return g
        side = "test" if held_out else "train"
        raise RuntimeError(
            f"no {side} graph in {_MAX_DRAWS} draws: the graph space of these parameters is too small to split; allow more nodes or edges"
        )

    def graph(self, split: str, index: int) -> Graph:
        """The graph of item ``index`` of ``split`` (cheap: no search, no rendering)."""
        self._check_split(split)
        if split == "train":
            return self._draw(rng_for(self.seed, "train", index, "graph"), held_out=False)
        return self._test_graphs[index]

    def _make(self, split: str, index: int) -> tuple[list[str], list[str], list[str], dict[str, Any], Image.Image]:
        p = self.params
        g = self.graph(split, index)
        style = p.reasoning
        reasoning: list[str] = []
        if style == "verbose":  # neighbour lists first: the search consults them at every step
            for v, nbrs in enumerate(g.neighbours()):
                reasoning += ["adj", str(v), ":", *map(str, nbrs)]
        k, colors = chromatic(g, None if style == "brief" else reasoning, verbose=style == "verbose")
        if style == "verbose":
            reasoning.append("check")
            for i, j in g.edges:
                reasoning += [pair_word(i, j), color_word(colors[i]), color_word(colors[j]), "ok"]
        reasoning += ["colors", str(k)]
        instance = {
            "task": self.name,
            "num_nodes": g.num_nodes,
            "edges": [list(e) for e in g.edges],
            "chromatic_number": k,
            "coloring": colors,
        }
        image = draw_graph(
            g.num_nodes,
            g.edges,
            size=p.image,
            layout=p.layout,
            line_width=p.line_width,
            node_radius=p.node_radius,
            jitter=p.jitter,
            noise=p.noise,
            distractors=p.distractors,
            rng=rng_for(self.seed, split, index, "image"),
        )
        answer = [color_word(c) for c in colors]
        return perception_text(g, p.perception_format), reasoning, answer, instance, image

    # -- text ------------------------------------------------------------------------------

    def vocabulary(self) -> list[str]:
        words = set(QUERY.split()) | set(MARKERS) | set(_COLOR_OF_WORD) | set(_PAIR_OF_WORD)
        words |= {":", "?", "=", "-", "y", "n", "try", "none", "back", "fail", "done", "check", "ok", "colors"}
        words |= {"adj", "sat"} | {f"s{k}" for k in range(MAX_NODES)}  # saturation counts 0..9
        words |= {str(i) for i in range(MAX_NODES + 1)}  # node ids 0..9 and counts up to 10
        return sorted(words | set(filler_vocabulary(self.params.filler_words)))

    def parse_perception(self, text: str) -> Graph | None:
        """The graph a perception section (or a whole response) describes, or ``None``."""
        return parse_graph(perception_words(text), self.params.perception_format)

    # -- verdicts --------------------------------------------------------------------------

    def score(self, instance: dict[str, Any], output: str) -> Scores:
        fmt = self.params.perception_format
        truth = Graph(int(instance["num_nodes"]), tuple(sorted((int(i), int(j)) for i, j in instance["edges"])))
        sections = parse_sections(output)
        perceived = parse_graph(sections.perception, fmt)
        answer = parse_answer(sections.answer)

        pairs = node_pairs(truth.num_nodes)
        slots = read_slots(sections.perception, truth.num_nodes, fmt)
        present = set(truth.edges)
        wrong = {pair: int(seen is None or seen != (pair in present)) for pair, seen in zip(pairs, slots)}
        # one layout for every item of the task (the pairs of its largest graph, in p* order; a smaller
        # graph's pairs in their places, 0 at the others), so that slot k is one node pair when
        # evaluation sums the lists over items whose node counts differ
        slot_errors = [wrong.get(pair, 0) for pair in node_pairs(max(self.slot_nodes, truth.num_nodes))]
        read_edges = {pair for pair, seen in zip(pairs, slots) if seen}

        outcome = answer is not None and is_optimal_coloring(truth, answer, int(instance["chromatic_number"]))
        reasoning = False
        if perceived is not None and answer is not None:
            if perceived == truth:
                reasoning = outcome
            elif len(answer) == perceived.num_nodes and all(answer[i] != answer[j] for i, j in perceived.edges):
                # Only a proper colouring of the perceived graph can be optimal: search only then.
                reasoning = len(set(answer)) == chromatic(perceived)[0]
        return Scores(
            format_ok=sections.format_ok and perceived is not None and answer is not None,
            outcome=outcome,
            perception_exact=perceived == truth,
            perception_partial=edge_f1(read_edges, present) if sections.perception is not None else 0.0,
            reasoning=reasoning,
            slot_errors=slot_errors,
        )
