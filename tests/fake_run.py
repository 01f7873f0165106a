"""A stand-in for `percep run` that keeps its contract without training (grid runner tests).

    python tests/fake_run.py SPEC [--set NAME=VALUE ...] [--out DIR] [--resume]

It compiles SPEC with the overrides exactly as `percep run` does (exit 2 if it does not
check), names the run directory `<experiment>-<content_hash(ir)>`, writes `progress.json`
there at once, and after an optional sleep writes `summary.json` (atomically, status
complete) with metrics that are simple functions of the params and seed.

Behaviour is steered by environment variables:
  FAKE_RUN_CALLS   a file to which one JSON line per invocation is appended ({name, resume, pid})
  FAKE_RUN_SLEEP   seconds to sleep before finishing (default 0)
  FAKE_RUN_SLOW    only cells whose overrides include all these `k=v` (space separated) sleep
  FAKE_RUN_FAIL    cells whose overrides include all these `k=v` pairs fail with exit 3
  FAKE_RUN_FAIL_AFTER  a failing cell first waits (up to 60 s) until the calls file holds this many lines:
                   a test can make sure the cells started with it are under way before it fails
  FAKE_RUN_FINISH_ON_INTERRUPT  SIGINT during the sleep finishes the run (summary, exit 0), as a run stopped at its last step does
  FAKE_RUN_CONFIG  a JSON file whose keys (calls, sleep, slow, fail, fail_after) override the variables above when
                   it exists: a test can change the behaviour of Ray workers started earlier
SIGINT makes it exit 130 with its progress file but no summary, like an interrupted run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _matches(rule: str | None, overrides: dict[str, str]) -> bool:
    if not rule:
        return False
    pairs = [p.partition("=") for p in rule.split()]
    return all(overrides.get(k) == v for k, _, v in pairs)


def _lines(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def setting(name: str) -> str | None:
    """FAKE_RUN_<NAME>, unless the FAKE_RUN_CONFIG file sets it."""
    cfg = os.environ.get("FAKE_RUN_CONFIG")
    if cfg and os.path.exists(cfg):
        with open(cfg, encoding="utf-8") as f:
            data = json.load(f)
        if name in data:
            return None if data[name] is None else str(data[name])
    return os.environ.get(f"FAKE_RUN_{name.upper()}")


def metrics(params: dict, seed: int, shift: float = 0.0) -> dict[str, float]:
    lam = float(params.get("lam", params.get("alpha", 0.5)))
    perception = round(0.2 + 0.6 * lam + 0.01 * seed + shift, 6)
    reasoning = round(0.9 - 0.3 * lam - 0.01 * seed + shift, 6)
    return {
        "end_to_end": round(perception * reasoning, 6),
        "perception": perception,
        "reasoning": reasoning,
        "edge_f1": round(min(1.0, perception + 0.3), 6),
    }


def main(argv: list[str]) -> int:
    from percepdsl.check import check_file, parse_overrides
    from percepdsl.io import write_json_atomic
    from percepdsl.ir import content_hash

    ap = argparse.ArgumentParser()
    ap.add_argument("spec")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--out", default="runs")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)

    overrides, bad = parse_overrides(args.set)
    res = check_file(args.spec, overrides, fragment_ok=False)
    if bad or res.ir is None:
        print(f"error: {args.spec} does not check", file=sys.stderr)
        return 2
    ir = res.ir
    name = f"{ir.name}-{content_hash(ir)}"
    run_dir = Path(args.out) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    progress = run_dir / "progress.json"
    resumed = args.resume and progress.exists()
    # Recorded once the run directory exists (a recorded call is one that a later resume finds) and
    # before progress.json (tests wait for progress.json, then count the calls).
    if calls := setting("calls"):
        with open(calls, "a", encoding="utf-8") as f:
            f.write(json.dumps({"name": name, "resume": args.resume, "pid": os.getpid()}) + "\n")
    try:  # from the first write on: a signal may come as soon as progress.json is in place (its directory is still being synced)
        write_json_atomic(progress, {"pid": os.getpid(), "step": 0})
        print(f"fake run {name}: params {ir.params} seed {ir.seed}{' (resumed)' if resumed else ''}", flush=True)
        if _matches(setting("fail"), overrides):
            if calls and (after := setting("fail_after")):
                deadline = time.monotonic() + 60
                while _lines(calls) < int(after) and time.monotonic() < deadline:
                    time.sleep(0.05)
            print("Traceback (most recent call last):\n  ...\nRuntimeError: fake failure for this cell", file=sys.stderr, flush=True)
            return 3
        slow = setting("slow")
        if slow is None or _matches(slow, overrides):
            time.sleep(float(setting("sleep") or 0))
    except KeyboardInterrupt:
        if not setting("finish_on_interrupt"):
            print("interrupted", file=sys.stderr, flush=True)
            return 130
        print("interrupted at its last step: finishing", flush=True)

    stages = {"base": metrics(ir.params, ir.seed, shift=-0.1), "post": metrics(ir.params, ir.seed)}
    summary = {
        "experiment": ir.name,
        "hash": content_hash(ir),
        "status": "complete",
        "params": ir.params,
        "seed": ir.seed,
        "final": stages["post"],
        "stages": {
            "base": {"metrics": stages["base"]},
            "post": {"metrics": stages["post"], "delta": {k: round(stages["post"][k] - stages["base"][k], 6) for k in stages["post"]}},
        },
        "diagnostics": {
            "token_share": {"perception": 0.025, "reasoning": 0.9, "answer": 0.075},
            "reward_corr": {"perception": round(0.3 + 0.1 * ir.seed, 6)},
            "grad_norm": {"perception": 1.0},
        },
        "resumed": resumed,
    }
    write_json_atomic(run_dir / "summary.json", summary)
    print(f"fake run {name}: complete", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:  # before the run began (importing, checking: seconds on a loaded machine)
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
