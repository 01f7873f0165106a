"""Task generation speed and perception share of the chain-of-thought targets.

    python benchmarks/bench_tasks.py            # full run (~1 min on 2 cores)
    python benchmarks/bench_tasks.py --quick    # smoke run

Prints two markdown tables: samples/s per task configuration (single process; a sample is the
instance, its exact solution, the target text and the rendered image), with the slowest
single sample; and the mean perception share of target words per reasoning style.
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Any

import numpy as np

from percepdsl_runtime.tasks import REASONING_STYLES, build_task, perception_share

SPEED_CASES: list[tuple[str, str, dict[str, Any], int]] = [
    # (label, task, params, samples in the full run)
    ("graph N=5, 64 px, trace", "graph_coloring", {}, 10_000),
    ("graph N=10, 64 px, trace", "graph_coloring", {"nodes": 10}, 2_000),
    ("graph N=5-10, random layout, jitter, noise, 3 distractors", "graph_coloring",
     {"nodes": (5, 10), "layout": "random", "jitter": 0.5, "noise": 0.3, "distractors": 3}, 2_000),
    ("sudoku 4x4, 64 px, trace", "sudoku", {}, 10_000),
    ("sudoku 9x9, 144 px, trace", "sudoku", {"size": 9, "image": 144}, 500),
    ("sudoku 9x9, 25 givens (the minimum), 144 px, trace", "sudoku", {"size": 9, "givens": 25, "image": 144}, 500),
]  # fmt: skip

SHARE_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("graph N=5, edges", "graph_coloring", {}),
    ("graph N=5, adjacency", "graph_coloring", {"perception_format": "adjacency"}),
    ("graph N=8, edges", "graph_coloring", {"nodes": 8}),
    ("graph N=10, edges", "graph_coloring", {"nodes": 10}),
    ("graph N=10, edge_prob 0.7, edges", "graph_coloring", {"nodes": 10, "edge_prob": 0.7}),
    ("sudoku 4x4", "sudoku", {}),
    ("sudoku 9x9", "sudoku", {"size": 9}),
]


def bench_speed(quick: bool) -> None:
    print("| configuration | samples | samples/s | slowest sample |")
    print("|---|---|---|---|")
    for label, name, params, n in SPEED_CASES:
        n = max(20, n // 50) if quick else n
        task = build_task(name, params, seed=0)
        slowest = 0.0
        start = time.perf_counter()
        for i in range(n):
            t0 = time.perf_counter()
            task.sample("train", i)
            slowest = max(slowest, time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        print(f"| {label} | {n:,} | {n / elapsed:,.0f} | {slowest * 1e3:.1f} ms |")


def bench_share(quick: bool) -> None:
    n = 20 if quick else 200
    print(f"| task (mean over {n} train targets) | " + " | ".join(REASONING_STYLES) + " |")
    print("|---|" + "---|" * len(REASONING_STYLES))
    for label, name, params in SHARE_CASES:
        cells = []
        for style in REASONING_STYLES:
            task = build_task(name, {**params, "reasoning": style}, seed=0)
            responses = [task.sample("train", i).response for i in range(n if "9x9" not in label else n // 4)]
            share = np.mean([perception_share(r) for r in responses])
            words = np.mean([len(r.split()) for r in responses])
            cells.append(f"{100 * share:.1f}% ({words:.0f} words)")
        print(f"| {label} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few samples per case (smoke test)")
    args = parser.parse_args()
    print(f"python {platform.python_version()} on {platform.machine()}, single process\n")
    bench_speed(args.quick)
    print()
    bench_share(args.quick)


if __name__ == "__main__":
    main()
