"""Evaluation benchmark: naive vs batched/sorted/capped generation, the fused decoder, and its knobs.

    python benchmarks/bench_eval.py                        # 100 test items, 1 thread (~6 min)
    python benchmarks/bench_eval.py --threads 2 --json out.json
    python benchmarks/bench_eval.py --only "batch 1," "[default]" --naive-repeats 2
    python benchmarks/bench_eval.py --regime long --model CHECKPOINT --only naive "[generate]" "[default]"

Setup, ``--regime quick``: graph colouring (task defaults: N=5, edge list, backtracking
trace; references ~70 tokens) and the embedded tiny LLaVA at its defaults (CLIP h128 x 2
layers, 64 px, patch 16; Llama h256 x 4 layers; ~3.3M parameters with this vocabulary).
``--regime long``: the reproduction's task (N=6, edge probability 0.5, edge-list
perception, verbose reasoning: references ~140-320 tokens) and the tiny model at patch 8
(64 image tokens). ``--model PATH`` evaluates a checkpoint instead of the untrained tiny
model (a trained one ends its rows at its own EOS: the real cost).

Regimes:

* **evaluation** — the real ``evaluate`` (end-to-end + counterfactual pass, scoring
  included) over ``--items`` test items. For the untrained tiny model EOS is taken away
  (the encoder's EOS id is replaced by one outside the vocabulary, which either decoder
  honours; a hook on the head would switch the fused decoder off) so every generation
  runs to its cap, exactly what an untrained model costs and independent of random EOS
  draws. The naive baseline (plain ``model.generate`` at batch 1, no per-item cap,
  ``--global-cap`` tokens) is timed on ``--naive-items`` items and reported per item;
  ``[generate]`` is the batched, sorted, capped ``model.generate`` evaluation that was
  the default before the fused decoder (``[default]``).
* **fixed new tokens** — every row generates exactly ``--fixed-tokens`` tokens, to
  compare per-token throughput across batch sizes and precisions.

Timing on a shared machine: every configuration is run ``--repeats`` times interleaved
with the others and the *minimum* wall time is reported with the process CPU time and
the CPU load of other processes during that run (``other``, in cores). Two OpenMP
threads degrade badly when another process holds a core; one thread does not.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from percepdsl_runtime.encoding import Encoder
from percepdsl_runtime.evaluate import EvalConfig, evaluate
from percepdsl_runtime.generation import GenConfig, Prompt, generate
from percepdsl_runtime.models import LoadedModel, build_tiny, load_hf
from percepdsl_runtime.tasks import build_task

ROLE_RULES = [
    {"kind": "between", "role": "perception", "open": "<perception>", "close": "</perception>"},
    {"kind": "rest", "role": "reasoning"},
]
# task parameters and tiny-model sizes of each regime; `long` is specs/repro/common/gc8_arm.pd's
REGIMES: dict[str, dict[str, dict[str, Any]]] = {
    "quick": {"task": {}, "tiny": {}},
    "long": {"task": {"nodes": 6, "edge_prob": 0.5, "perception_format": "edges", "reasoning": "verbose"}, "tiny": {"patch": 8}},
}


# ---------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------


def _busy_jiffies() -> int:
    """CPU time of the whole machine (all processes) in jiffies, from /proc/stat."""
    try:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:]]
    except OSError:
        return 0
    return sum(v) - v[3] - v[4]  # minus idle and iowait


def _own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclass
class Run:
    wall: float
    cpu: float
    other: float  # cores used by other processes during the run
    new_tokens: int


@dataclass
class Row:
    name: str
    items: int
    runs: list[Run] = field(default_factory=list)

    @property
    def best(self) -> Run:
        return min(self.runs, key=lambda r: r.wall)

    @property
    def items_per_s(self) -> float:
        return self.items / self.best.wall

    @property
    def items_per_cpu_s(self) -> float:
        """Items per second of this process's CPU time: under foreign load, with one
        thread, the steadier measure of the work a configuration needs."""
        return self.items / min(r.cpu for r in self.runs)


def measure(fn: Callable[[], int]) -> Run:
    """Time ``fn`` (which returns the number of new tokens it generated)."""
    j0, c0, t0 = _busy_jiffies(), _own_cpu(), time.perf_counter()
    tokens = fn()
    wall, cpu = time.perf_counter() - t0, _own_cpu() - c0
    other = max(0.0, (_busy_jiffies() - j0) / 100 - cpu) / wall  # USER_HZ = 100 on Linux
    return Run(wall, cpu, other, tokens)


class NoEos:
    """The encoder with an EOS id outside the vocabulary: no row ever ends before its cap.
    (A hook forbidding EOS on the head would switch the fused decoder off, which never
    calls the modules; a changed id works the same for both decoders.)"""

    def __init__(self, encoder: Encoder, vocab_size: int) -> None:
        self._encoder, self.eos_token_id = encoder, vocab_size

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)


# ---------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------


def eval_workload(loaded: LoadedModel, enc: Encoder, task: Any, n: int, cfg: EvalConfig) -> Callable[[], int]:
    def run() -> int:
        res = evaluate(loaded, enc, task, n=n, cfg=cfg)
        return sum(r["n_tokens"] + r.get("cf_n_tokens", 0) for r in res.records)

    return run


def fixed_workload(loaded: LoadedModel, enc: Encoder, prompts: list[Prompt], cfg: GenConfig) -> Callable[[], int]:
    def run() -> int:
        return sum(c.n_tokens for c in generate(loaded, enc, prompts, cfg))

    return run


def eval_configs(args: argparse.Namespace) -> list[tuple[str, int, EvalConfig]]:
    """(name, items, config) of the evaluation regime; the first is the naive baseline."""
    bs = args.batch_size
    naive = GenConfig(batch_size=1, sort_by_length=False, max_new_tokens=args.global_cap, decoder="generate")
    best = GenConfig(batch_size=bs, max_new_tokens=args.global_cap)  # the module defaults
    hf = replace(best, decoder="generate")
    return [
        ("naive: plain model.generate, batch 1, no cap", args.naive_items, EvalConfig(gen=naive, cap_factor=None)),
        ("generate, batch 1, capped", args.naive_items, EvalConfig(gen=naive)),
        (f"generate, batch {bs}, unsorted, capped", args.items, EvalConfig(gen=replace(hf, sort_by_length=False))),
        (f"generate, batch {bs}, sorted, capped, fp32 [generate]", args.items, EvalConfig(gen=hf)),
        (f"generate, batch {bs}, sorted, capped, bf16 autocast", args.items, EvalConfig(gen=replace(hf, precision="bf16"))),
        (f"generate, batch {bs}, sorted, capped, fp32, static cache", args.items, EvalConfig(gen=replace(hf, cache="static"))),
        (f"generate, batch {bs}, sorted, capped, fp32, sdpa", args.items, EvalConfig(gen=replace(hf, attention="sdpa"))),
        (f"fused, batch {bs}, sorted, capped, fp32 [default]", args.items, EvalConfig(gen=best)),
        (f"fused, batch {bs}, sorted, capped, bf16 weights", args.items, EvalConfig(gen=replace(best, precision="bf16"))),
    ]  # fmt: skip


def fixed_configs(args: argparse.Namespace) -> list[tuple[str, int, GenConfig]]:
    rows = []
    for bs in args.fixed_batch_sizes:
        n = args.naive_items * 2 if bs == 1 else args.items * 2  # both passes' worth of prompts
        for prec in ("fp32", "bf16"):
            rows.append((f"fixed {args.fixed_tokens} tok: batch {bs}, {prec}", n,
                         GenConfig(batch_size=bs, precision=prec, max_new_tokens=args.fixed_tokens)))  # fmt: skip
    return rows


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    task = build_task("graph_coloring", {**REGIMES[args.regime]["task"], "test": max(args.items, 1)}, seed=args.seed)
    if args.model:
        loaded = load_hf(args.model)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:  # the model is loaded into memory
            loaded = build_tiny(
                task.vocabulary(), image=task.params.image, seed=args.seed, save_dir=Path(tmp), **REGIMES[args.regime]["tiny"]
            )
    enc: Any = Encoder(loaded, ROLE_RULES)
    if not args.model:  # untrained: every row runs to its cap
        enc = NoEos(enc, loaded.model.config.get_text_config().vocab_size)
    samples = [task.sample("test", i) for i in range(args.items)]
    prompts = [Prompt(s.query, s.image, p, args.fixed_tokens) for s in samples for p in ("", task.counterfactual_prefix(s))]

    jobs: list[tuple[Row, Callable[[], int], int]] = []
    for name, n, cfg in eval_configs(args):
        repeats = args.naive_repeats if n == args.naive_items else args.repeats
        jobs.append((Row(name, n), eval_workload(loaded, enc, task, n, cfg), repeats))
    for name, n, gcfg in fixed_configs(args):
        repeats = args.naive_repeats if gcfg.batch_size == 1 else args.repeats
        jobs.append((Row(name, n), fixed_workload(loaded, enc, prompts[:n], gcfg), repeats))

    if args.only:
        jobs = [j for j in jobs if any(key in j[0].name for key in args.only)]
    for decoder in ("generate", "fused"):  # warm-up
        evaluate(loaded, enc, task, n=2, cfg=EvalConfig(gen=GenConfig(max_new_tokens=8, decoder=decoder)))
    for rep in range(max(r for _, _, r in jobs)):  # interleaved repeats
        for row, fn, repeats in jobs:
            if rep < repeats:
                row.runs.append(measure(fn))
                if args.verbose:
                    print(f"  {row.name}: {row.runs[-1]}", file=sys.stderr, flush=True)
    return report(args, loaded, samples, enc, [row for row, _, _ in jobs])


def report(args: argparse.Namespace, loaded: LoadedModel, samples: list[Any], enc: Encoder, rows: list[Row]) -> dict[str, Any]:
    ref = [len(enc.tokenizer(s.response, add_special_tokens=False)["input_ids"]) for s in samples]
    model = args.model or "the tiny model, untrained (EOS never ends a row)"
    head = (f"regime {args.regime}: graph_coloring {REGIMES[args.regime]['task'] or '(defaults)'}, model {model}; "
            f"test items: {args.items}; reference tokens mean {statistics.mean(ref):.0f} "
            f"(min {min(ref)}, max {max(ref)}); model {loaded.num_parameters() / 1e6:.2f}M params "
            f"({loaded.model.config._attn_implementation} attention); torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s), {platform.machine()}")  # fmt: skip
    print(head)
    first_fixed = next((r for r in rows if "fixed" in r.name), rows[0])
    print(f"{'configuration':52s} {'items':>5s} {'wall s':>7s} {'cpu s':>7s} {'other':>5s} {'items/s':>8s} "
          f"{'tok/s':>7s} {'x wall':>7s} {'items/cpu-s':>11s} {'x cpu':>6s}")  # fmt: skip
    out_rows = []
    for r in rows:
        b, base = r.best, (first_fixed if "fixed" in r.name else rows[0])
        x_wall, x_cpu = r.items_per_s / base.items_per_s, r.items_per_cpu_s / base.items_per_cpu_s
        print(f"{r.name:52s} {r.items:5d} {b.wall:7.2f} {b.cpu:7.2f} {b.other:5.2f} {r.items_per_s:8.2f} "
              f"{b.new_tokens / b.wall:7.0f} {x_wall:6.1f}x {r.items_per_cpu_s:11.2f} {x_cpu:5.1f}x")  # fmt: skip
        out_rows.append({"name": r.name, "items": r.items, "items_per_s": r.items_per_s, "speedup_wall": x_wall,
                         "items_per_cpu_s": r.items_per_cpu_s, "speedup_cpu": x_cpu,
                         "best": vars(b), "runs": [vars(x) for x in r.runs]})  # fmt: skip
    print(
        "items = test items (2 generations each) in evaluation rows, generations in fixed rows; x = speed-up vs "
        "the first row of its regime (wall time, or own CPU time); other = cores busy with other processes"
    )
    result = {"header": head, "args": vars(args), "rows": out_rows}
    if args.json:
        from percepdsl.io import write_json_atomic

        write_json_atomic(args.json, result)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regime", choices=sorted(REGIMES), default="quick", help="task settings (and the tiny model's patch)")
    ap.add_argument("--model", default="", help="a checkpoint to evaluate instead of the untrained tiny model")
    ap.add_argument("--items", type=int, default=100, help="test items evaluated (2 generations each)")
    ap.add_argument("--naive-items", type=int, default=4, help="items timed for the batch-1 rows")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--global-cap", type=int, default=512, help="max_new_tokens when there is no per-item cap")
    ap.add_argument("--fixed-tokens", type=int, default=64)
    ap.add_argument("--fixed-batch-sizes", type=int, nargs="+", default=[1, 16, 50, 100])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--only", nargs="+", default=[], help="run only rows whose name contains one of these")
    ap.add_argument("--naive-repeats", type=int, default=1, help="repeats of the (slow) batch-1 rows")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--emit", action="store_true", help="end with the result as one JSON line (run_all.py reads it)")
    return ap.parse_args(argv)


if __name__ == "__main__":
    _args = parse_args()
    _res = run_benchmark(_args)
    if _args.emit:
        from percepdsl.io import json_text

        print("\n" + json_text(_res), flush=True)
