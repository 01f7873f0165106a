"""What the benchmarks share: the regimes, the clocks, memory, the matmul peak, and running
one side of a comparison in a fresh process.

Every comparison runs its sides in alternating rounds (A, B, A, B, ...) so that a neighbour's
burst on this shared machine hits every side alike, and each side runs in its own process:
its peak memory is its own, and no kernel cache or allocator state carries over from the
other side. A side reports times on two clocks: wall seconds, and CPU seconds of its process
— with one thread the latter is the work done and hardly moves when other processes load
the cores, so one-thread ratios are taken on CPU time.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RULES = [
    {"role": "perception", "kind": "between", "open": "<perception>", "close": "</perception>", "markers": True},
    {"role": "reasoning", "kind": "between", "open": "<reasoning>", "close": "</reasoning>", "markers": True},
    {"role": "answer", "kind": "between", "open": "<answer>", "close": "</answer>", "markers": True},
]

# The sequences measured. `quickstart`: specs/quickstart.pd's task and model, read from the spec
# itself (graph colouring N=5, edge-list perception ≈4% of the targets, `verbose` reasoning,
# patch 8: ≈350 tokens, ≈270 targets). `quick`: the quickstart's task and model until session 5
# (N=5, adjacency perception, `trace` reasoning, patch 8: ≈157 tokens, 85 of them targets): short
# targets. `long`: the reproduction regime's long targets (N=6, edge-list perception ≈3% of the
# targets, `verbose` reasoning, patch 16: ≈350 tokens, 190-650, ≈320 targets).
REGIMES: dict[str, dict[str, Any]] = {
    "quick": {"task": {"nodes": 5, "edge_prob": 0.5, "perception_format": "adjacency", "reasoning": "trace"}, "patch": 8},
    "long": {"task": {"nodes": 6, "edge_prob": 0.5, "perception_format": "edges", "reasoning": "verbose"}, "patch": 16},
}


def _spec_regime(spec: Path) -> dict[str, Any]:
    """The task parameters and tiny-model sizes a spec compiles to (no torch: the checker only)."""
    from percepdsl.api import check

    ir = check(spec)
    if ir.model.kind != "tiny":
        raise ValueError(f"{spec}: a benchmark regime needs the embedded tiny model, not `model {ir.model.kind}`")
    sizes = ir.model.params.model_dump()
    return {"task": ir.task.params.model_dump(), "patch": sizes.pop("patch"), "sizes": sizes}


REGIMES["quickstart"] = _spec_regime(ROOT / "specs" / "quickstart.pd")


def setup_process(threads: int) -> None:
    """Pin torch's threads, silence library chatter (the parent parses our last stdout line)."""
    import torch

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def task_of(regime: str, **extra: Any) -> Any:
    from percepdsl_runtime.tasks import build_task

    return build_task("graph_coloring", {**REGIMES[regime]["task"], **extra}, seed=0)


def build_model(regime: str, out: Path, **size: Any) -> Path:
    """The tiny VLM of ``regime`` (seed 0) saved to ``out``: every side loads these weights."""
    from percepdsl_runtime.models import build_tiny

    task = task_of(regime)
    size = {**REGIMES[regime].get("sizes", {}), **size}
    build_tiny(task.vocabulary(), image=task.params.image, patch=REGIMES[regime]["patch"], seed=0, save_dir=out, **size)
    return out


def now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def span(a: tuple[float, float], b: tuple[float, float]) -> dict[str, float]:
    return {"wall_s": b[0] - a[0], "cpu_s": b[1] - a[1]}


def rss_mb() -> float:
    """Resident memory of this process now (MiB)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """The process's resident-memory high-water mark (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak(threads: int, n: int = 2048, reps: int = 6) -> dict[str, float]:
    """Measured square matmul throughput (TFLOP/s per CPU second with one thread, per wall
    second with more) in bf16 and fp32: the denominators of MFU."""
    import torch

    clock = time.process_time if threads == 1 else time.perf_counter
    out = {}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        best = 0.0
        for _ in range(3):  # best of 3: a neighbour's burst only lowers a measurement
            a @ b
            t = clock()
            for _ in range(reps):
                a @ b
            best = max(best, 2 * n**3 * reps / (clock() - t) / 1e12)
        out[f"{name}_tflops"] = best
    torch.set_num_threads(before)
    return out


def emit(result: dict[str, Any]) -> None:
    """A child's answer: one JSON line, last on stdout."""
    result.setdefault("peak_rss_mb", peak_rss_mb())
    from percepdsl.io import json_text

    print("\n" + json_text(result), flush=True)


def run_child(script: str, args: Sequence[str], threads: int, timeout: float = 3600, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``benchmarks/<script> <args>`` in a fresh process pinned to ``threads`` threads (and
    ``env`` added to its environment) and return the JSON it emitted (its last stdout line)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", **(env or {}))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "examples" / "plugin"), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), *args, "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd[1:])} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def alternate(
    sides: dict[str, Callable[[], dict[str, Any]]], rounds: int, log: Callable[[str], None] = print
) -> dict[str, list[dict[str, Any]]]:
    """Run every side once per round, in order, for ``rounds`` rounds."""
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in sides}
    for r in range(rounds):
        for name, fn in sides.items():
            res = fn()
            runs[name].append(res)
            log(f"  round {r}: {name}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in res.items() if isinstance(v, (int, float)))[:300])
    return runs


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def best(runs: list[dict[str, Any]], key: str, higher: bool = True) -> dict[str, Any]:
    """The round with the best ``key`` (a neighbour's burst only ever makes a round worse)."""
    return (max if higher else min)(runs, key=lambda r: r[key])


def spread(values: Sequence[float]) -> list[float]:
    """[min, median, max] of the rounds."""
    return [min(values), statistics.median(values), max(values)]


def quartiles(values: Sequence[float]) -> list[float]:
    """[lower quartile, median, upper quartile] (all three the value itself for one value)."""
    if len(values) < 2:
        return [values[0]] * 3
    q = statistics.quantiles(values, n=4)
    return [q[0], statistics.median(values), q[2]]


def loadavg() -> float:
    return os.getloadavg()[0]
