"""`percep run --jobs 2` against `--jobs 1`: a shared base and two arms, the quickstart's shape.

    python benchmarks/bench_jobs.py                 # 2 rounds (≈ 8 min on an idle 2-core box)
    python benchmarks/bench_jobs.py --rounds 1 --steps 40 --test 40

The spec is the quickstart's task, model and losses (`specs/quickstart.pd`) at `--steps` steps per
stage and `--test` test items, with the stage cache off (each run trains all three stages). Both sides
run as `percep run` subprocesses, alternating round by round, each in a fresh output folder; the
figure is wall time (what `--jobs` buys: two cores in use instead of one), with the CPU time of the
process tree beside it (what it costs: each worker process builds the task and model once more).
Expected: the base alone, then both arms at once, so at best (base + 2 arms) / (base + 1 arm).
Needs an idle machine: with another process on the second core, two workers share one core.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = """experiment bench_jobs
seed 1
include "{root}/specs/common/roles.pd"
task graph_coloring {{ nodes = 5, edge_prob = 0.5, perception_format = edges, reasoning = verbose, train = 4000, test = 200 }}
model tiny {{ width = 256, depth = 4, patch = 8px }}
stage base = sft {{ steps = {steps}, lr = cosine(1e-3, 0, warmup = 10), batch = 8, loss = mean(reasoning, answer) }}
stage tm = sft from base {{ steps = {steps}, lr = cosine(1e-3, 0, warmup = 10), batch = 8, loss = token_mean() }}
stage ngdiff = sft from base {{ steps = {steps}, lr = cosine(1e-3, 0, warmup = 10), batch = 8, loss = ngdiff(perception, [reasoning, answer], auto_lr = false) }}
eval {{ test = {test} }}
trainer {{ precision = "bf16-mixed", clip = 1.0, threads = 1 }}
"""


def timed_run(spec: Path, out: Path, jobs: int) -> tuple[float, float]:
    """(wall s, CPU s of the run's process tree) of one `percep run --jobs N`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "percepdsl", "run", str(spec), "--out", str(out), "-q", "--jobs", str(jobs)],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1", PERCEP_STAGE_CACHE="off"),
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"percep run --jobs {jobs} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60, help="steps of each stage")
    ap.add_argument("--test", type=int, default=60, help="test items per evaluation")
    a = ap.parse_args(argv)
    results: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp:
        spec = Path(tmp) / "bench_jobs.pd"
        spec.write_text(SPEC.format(root=ROOT, steps=a.steps, test=a.test))
        for r in range(a.rounds):
            for jobs in (1, 2) if r % 2 == 0 else (2, 1):
                wall, cpu = timed_run(spec, Path(tmp) / f"r{r}-j{jobs}", jobs)
                results[jobs].append((wall, cpu))
                print(f"round {r + 1}, --jobs {jobs}: {wall:.1f} s wall, {cpu:.1f} CPU-s", flush=True)
    best = {j: min(w for w, _ in results[j]) for j in results}
    ratios = [w1 / w2 for (w1, _), (w2, _) in zip(results[1], results[2])]
    print(
        f"\nbase + 2 arms of {a.steps} steps, {a.test} test items, {os.cpu_count()} CPUs: --jobs 1 {best[1]:.1f} s, "
        f"--jobs 2 {best[2]:.1f} s wall (best of {a.rounds}); --jobs 2 is {best[1] / best[2]:.2f}x faster "
        f"(rounds {min(ratios):.2f}-{max(ratios):.2f}x); CPU-s per run {min(c for _, c in results[1]):.0f} vs "
        f"{min(c for _, c in results[2]):.0f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
