"""The SFT reproduction of issue 13 (F1, F2), one task's pre-registered plan per command, resumable, and its report.

    python benchmarks/repro.py --out runs/repro          # run (or resume) and report
    python benchmarks/repro.py --out runs/repro --report # report only, from what exists
    python benchmarks/repro.py --out runs/repro --arms tm,lam --seeds 1,2,3
    python benchmarks/repro.py --plan p8 --out runs/repro8   # session 3's plan (patch 8)
    python benchmarks/repro.py --plan p8-500 --out runs/repro500 --base-model BASE_STAGE \
        --reeval-from runs/repro8 --start-by 00:40                      # session 4's (500 test items)
    python benchmarks/repro.py --plan sudoku --out runs/repro-sudoku --start-by 06:05  # sessions 6-7's
    python benchmarks/repro.py --plan sudoku-brief --out runs/sweep-brief               # session 8's (also sudoku-trace)
    python benchmarks/repro.py --plan p8-adj --out runs/repro-adj --compare runs/repro500   # session 9's fixed slots
    python benchmarks/repro.py --sweep verbose=runs/repro-sudoku,trace=runs/sweep-trace,brief=runs/sweep-brief \
        --out runs/sweep                                                   # the verbosity sweep's report

The plans (`benchmarks/results/preregistration.md`): graph colouring, one shared reasoner base
(`specs/repro/<prefix>_base.pd`, trained once), then the SFT arms `specs/repro/<prefix>_<arm>.pd`
from its checkpoint for each seed (prefix `gc`: session 2's plan, patch 16 after its amendment 2;
`gc8`: session 3's, patch 8, 300-step arms; `p8-500`: session 4's, the same base and arms, every evaluation
on the task's 500 test items; `sudoku`: session 6's, the second task, sudoku 4×4 at 80 px / patch 16 with
`verbose` reasoning, 300-step arms, 500 test items, its base trained in two parts: `BASES`; session 7 added the
arms λ = 0.25 / 0.75, NGDiff with automatic lr and the scheduled λ, after session 6's in `PRIORITY`); arms of one seed share the data order and the test items, so they are
compared item by item. Every cell is a plain `percep run` (one thread each, `--jobs` at once) in
`OUT/runs/`; a cell whose summary.json exists is skipped, an interrupted one is resumed with
`--resume`, so running the command again continues where it stopped. The arms run with OUT as
working directory, where `<prefix>_base` links to the base stage (their `model hf "<prefix>_base/model"`).
`--start-by HH:MM` (UTC) is a pre-registered cut-off: no cell starts after it. Session 8's verbosity sweep runs
sudoku's plan at the other reasoning styles (`sudoku-trace`, `sudoku-brief`: the same task, test puzzles, base recipe
and arms `tm`/`ngdiff`, its bases in three parts) and `--sweep` reports the gap NGDiff − token mean against
perception's token share over the levels' folders (`LEVELS`), with the pre-registered trend test. Session 9's
`p8-adj` is session 3's patch-8 plan (`gc8adj`: base, arms `tm`/`ngdiff`, 500 items) in the fixed-slot perception
format (its base in two parts: `BASES`); `--compare` sets the edge list's 500-item cells (`--plan p8-500`'s folder) beside it (`COMPARE`).

`--plan p8-500` re-evaluates session 3's finished arms (`REEVAL`, found under `--reeval-from`) on all
500 test items from their saved weights: for each such cell it writes `OUT/specs/<arm>-s<seed>.pd`,
a spec of experiment `repro_gc8_<arm>_eval500` with the cell's seed and `model hf` set to the cell's
final weights, including `specs/repro/common/gc8_eval500.pd` (one optimiser step at learning rate 0,
then the runtime's own three-way evaluation), and runs it as a cell like any other. The new arms
(`specs/repro/gc8_<arm>.pd` including `common/gc8_arm500.pd`) train and evaluate on 500 items. The
cells start in the pre-registered order (`PRIORITY["p8-500"]`).

The report (`OUT/report.md`, `OUT/*.png`) takes each arm's metrics from its cell's summary.json
and the paired differences from the same cell's eval.jsonl (the per-item records summary.json is
computed from; the script checks that the two agree): per seed, pooled over seeds with a 95%
paired bootstrap interval (items resampled within seeds), and the seed-level t interval; F1 (the
token-mean arm against the shared start) with a bootstrap interval of Δa_r − Δa_p.
The SFT part of the whole reproduction; `benchmarks/reproduce.py` runs it with the RL part
(`benchmarks/repro_rl.py`) over both tasks, through `run_plan`. `--quick` (the sessions' name for these
pre-registered plans) is still accepted and changes nothing; reproduce.py's `--quick` is its miniature.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SPECS = REPO / "specs" / "repro"
# plan -> spec prefix (preregistration.md, sessions 2-6; session 8's verbosity sweep: sudoku's other reasoning levels)
# session 9's p8-adj: session 3's patch-8 graph colouring in the fixed-slot perception format
PLANS = {
    "quick16": "gc",
    "p8": "gc8",
    "p8-500": "gc8",
    "sudoku": "sudoku",
    "sudoku-trace": "sudoku_trace",
    "sudoku-brief": "sudoku_brief",
    "p8-adj": "gc8adj",
}
# spec prefix -> the report's task name
TASKS = {
    "gc": "graph colouring",
    "gc8": "graph colouring",
    "gc8adj": "graph colouring, fixed-slot (`adjacency`) perception",
    "sudoku": "sudoku 4×4",
    "sudoku_trace": "sudoku 4×4, `trace` reasoning",
    "sudoku_brief": "sudoku 4×4, `brief` reasoning",
}
# pre-registered go/no-go of the base: a_r at least, a_p at most (sessions 3, 6; session 8 keeps session 6's at every level)
GO = {"gc8": (0.6, 0.2), "gc8adj": (0.6, 0.2), "sudoku": (0.3, 0.2), "sudoku_trace": (0.3, 0.2), "sudoku_brief": (0.3, 0.2)}
# plans whose pre-registration says that no arm runs from a no-go base (session 9's); the others' say the arms
# still run and are reported without a verdict (sessions 3, 6 and 8: `judged`)
NO_ARMS_AT_NO_GO = {"gc8adj"}
NO_ARMS_RULE = "By the plan's pre-registered rule no arm runs from it."
# the start order of a plan's cells: priority groups of arms, seed-major within a group, so an early stop
# leaves complete seeds of the groups before it (plans not named here: seed-major over the arms given)
PRIORITY = {
    "p8-500": (("tm", "ngdiff_auto"), ("lamsched",), ("lam", "ngdiff"), ("lam25", "lam75")),  # session 4's
    # session 6's groups, then session 7's (the rest of F2), one arm per group: with two cells at a time an arm's 3 seeds
    # end before the next arm's, so a cut-off leaves whole arms; the λ curve's two points first, the slow NGDiff-auto next
    "sudoku": (("tm", "ngdiff"), ("lam",), ("lam25",), ("lam75",), ("ngdiff_auto",), ("lamsched",)),
    "sudoku-trace": (("tm", "ngdiff"),),  # session 8's levels: session 6's two F2 arms only
    "sudoku-brief": (("tm", "ngdiff"),),
    "p8-adj": (("tm", "ngdiff"),),  # session 9's fixed-slot format: the edge-list plan's two F2 arms, seed 1 both, then 2, 3
}
# plans whose pre-registered F1 rule reads the paired interval (session 6: "the base and every arm score the same
# items", the task's whole test split), each item's (a_r − a_p) change paired; the others' rule reads the unpaired
# interval (the base scored seed 1's items, each arm its own seed's). The test stream depends on the seed, so only
# seed 1's arms score the base's items: the paired rule holds only when every seed's items are the base's
# (`same_items`), else these plans read the unpaired interval too, and say why
F1_PAIRED = {"sudoku", "sudoku_trace", "sudoku_brief"}
# the shared base trained in parts (plans not named here: one part, `<prefix>_base.pd`): each part's spec
# `<prefix>_<stem>.pd` and the name its stage `base` gets in OUT, where the next part's `model hf` finds it; the
# last part's name is `<prefix>_base`, the arms' start. Sudoku's 1,000-step base fell short of its go threshold
# and was continued for 500 steps (preregistration.md "Session 6").
# Session 8's levels ran that recipe too; both were no-go after it (a_r 0.164 at `trace`, 0.240 at `brief`) and get a
# third part of 1,500 steps (preregistration.md "Session 8", amendment 1). Session 9's fixed-slot base was no-go after
# 1,000 steps (a_r 0.445) and is continued for 1,000 more (preregistration.md "Session 9 (graph colouring, the
# fixed-slot format)", amendment 1).
BASES = {
    "sudoku": (("base", "sudoku_base1000"), ("base_more", "sudoku_base")),
    "gc8adj": (("base", "gc8adj_base1000"), ("base_more", "gc8adj_base")),
    **{
        p: (("base", f"{p}_base1000"), ("base_more", f"{p}_base1500"), ("base_more2", f"{p}_base"))
        for p in ("sudoku_trace", "sudoku_brief")
    },
}
MIN_SEEDS = {
    "gc8adj": 3,
    "sudoku": 3,
    "sudoku_trace": 3,
    "sudoku_brief": 3,
}  # plans whose F2 rule gives no verdict to an arm with fewer finished seeds (sessions 6, 8)
# cells run after other results were seen (session 3's amendments 1 and 2): prefix -> arm -> seeds;
# a comparison that uses any of them is labelled exploratory (the confirmatory seeds 4-6 are not)
EXPLORATORY = {"gc8": {"ngdiff": {1, 2, 3}}}
ARMS = ("tm", "lam", "ngdiff", "ngdiff_auto", "lamsched", "lam25", "lam75")  # the pre-registered arms; `tm` is the baseline
BASELINE = "tm"
SEEDS = (1, 2, 3)
# session 4 (`--plan p8-500`, preregistration.md "Session 4"): the session-3 arms re-evaluated on 500
# items from their saved weights (its cells' start order: PRIORITY)
REEVAL = ("tm", "lam", "ngdiff")
# session 3's confirmatory cells (`tm` and `ngdiff` on fresh seeds, pre-registered before they ran), re-evaluated
# on 500 items in session 5 (preregistration.md "Session 5"); the report judges them apart, never pooled with 1-3
CONFIRM_ARMS, CONFIRM_SEEDS = ("tm", "ngdiff"), (4, 5, 6)
# session 9 (preregistration.md "Session 9 (graph colouring, the fixed-slot format)"): a plan set beside the same
# experiment in the other perception format (`--compare` names that plan's output folder): prefix -> (the other
# prefix, its name, this plan's name, the instance field that identifies a test item in both). The edge list's cells
# are session 4-5's 500-item re-evaluations (`--plan p8-500`'s folder: seeds 1-3, and the confirmatory 4-6)
COMPARE = {"gc8adj": ("gc8", "edge list", "fixed slots", "edges")}
EVAL_SPEC = """# Generated by {by}: cell {label} of {source}
# re-evaluated on the task's 500 test items from its final weights.
experiment repro_{prefix}_{arm}_eval500
seed {seed}
include "{fragment}"
model hf "{model}"
"""
METRICS = {"a": ("end_to_end", "outcome"), "a_p": ("perception", "perception_exact"), "a_r": ("reasoning", "cf_outcome")}
BOOT = 10_000


def t_975(df: int) -> float:
    """The two-sided 95% t critical value with ``df`` degrees of freedom, to 3 decimals as the t tables the
    pre-registration quotes (t₀.₉₇₅ 4.303 at 2 df; the reports' intervals were computed with them), for any df: a
    table of df 1-5 raised a KeyError from 7 seeds on."""
    from scipy.stats import t

    return round(float(t.ppf(0.975, df)), 3)


def ci(d: dict[str, Any]) -> str:
    """A paired difference (`paired`'s mean, lo, hi) as `+0.123 [+0.100, +0.150]`."""
    return f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"


@dataclass(frozen=True)
class Cell:
    spec: Path
    seed: int | None  # None: the spec's own seed
    label: str

    def overrides(self) -> dict[str, str]:
        return {} if self.seed is None else {"seed": str(self.seed)}


def num(x: float | None, signed: bool = False, digits: int = 3) -> str:
    """``x`` to ``digits`` decimals (with its sign if ``signed``), or – when missing or NaN."""
    if x is None or x != x:
        return "–"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def run_dir(cell: Cell, runs: Path) -> Path:
    """The cell's run directory, named by its compiled IR's hash (as `percep run` names it)."""
    from percepdsl.check import check_file
    from percepdsl.ir import content_hash

    res = check_file(cell.spec, cell.overrides(), fragment_ok=False)
    if not res.ok or res.ir is None:
        sys.exit(f"error: {cell.spec} does not check; run `percep check {cell.spec}`")
    return runs / f"{res.ir.name}-{content_hash(res.ir)}"


def find_run(cell: Cell, runs: Path) -> Path | None:
    """The finished run of a cell: its own directory when complete, else another finished run of the
    same experiment and seed (one made by an earlier version of the code, whose IR hash differs)."""
    own = run_dir(cell, runs)
    if (own / "summary.json").exists():
        return own
    experiment = own.name.rsplit("-", 1)[0]
    for summary in sorted(runs.glob(f"{experiment}-*/summary.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        s = json.loads(summary.read_text())
        if cell.seed is None or s.get("seed") == cell.seed:
            return summary.parent
    return None


def start_order(plan: str, arms: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    """The (arm, seed) cells of a plan in their start order: seed-major within the plan's priority
    groups (one group of ``arms`` for a plan without them)."""
    groups = PRIORITY.get(plan, (tuple(arms),))
    return [(arm, s) for group in groups for s in seeds for arm in group if arm in arms]


def eval_cell(
    arm: str,
    seed: int,
    out: Path,
    source: Path | None,
    *,
    prefix: str = "gc8",
    fragment: str = "gc8_eval500.pd",
    by: str = 'benchmarks/repro.py --plan p8-500 (preregistration.md "Session 4")',
) -> Cell:
    """The 500-item re-evaluation of a finished (arm, seed) cell of `specs/repro/<prefix>_<arm>.pd`
    (default: session 3's SFT arms). Its spec, OUT/specs/<arm>-s<seed>.pd (experiment
    repro_<prefix>_<arm>_eval500, including `specs/repro/common/<fragment>`), is written once, naming
    the final weights of that cell as found under ``source``/runs; ``by``: the plan that wrote it."""
    from percepdsl.io import write_text_atomic

    spec = out / "specs" / f"{arm}-s{seed}.pd"
    if not spec.exists():
        src = find_run(Cell(SPECS / f"{prefix}_{arm}.pd", seed, ""), source / "runs") if source else None
        if src is None:
            sys.exit(f"error: no finished cell {arm}-s{seed} under {source}/runs to re-evaluate (--reeval-from)")
        stage = json.loads((src / "summary.json").read_text())["final_stage"]
        text = EVAL_SPEC.format(
            by=by,
            label=f"{arm}-s{seed}",
            source=src,
            prefix=prefix,
            arm=arm,
            seed=seed,
            fragment=SPECS / "common" / fragment,
            model=src / "stages" / stage / "model",
        )
        write_text_atomic(spec, text)
    return Cell(spec, seed, f"{arm}-s{seed}")


def find_eval(arm: str, seed: int, runs: Path, prefix: str = "gc8") -> Path | None:
    """A finished 500-item re-evaluation of (arm, seed), by experiment and seed (its spec includes a
    fragment by absolute path, which need not exist where the report is written)."""
    for summary in sorted(runs.glob(f"repro_{prefix}_{arm}_eval500-*/summary.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        if json.loads(summary.read_text()).get("seed") == seed:
            return summary.parent
    return None


def command(cell: Cell, runs: Path) -> list[str]:
    args = [sys.executable, "-m", "percepdsl", "run", str(cell.spec), "--out", str(runs), "-q"]
    for k, v in cell.overrides().items():
        args += ["--set", f"{k}={v}"]
    if run_dir(cell, runs).exists():
        args.append("--resume")
    return args


class Slots:
    """The cores the cells share: at most ``n`` cells run at once over every `run_cells` call that
    uses it (`benchmarks/reproduce.py` runs a task's parts side by side in threads over one, set as
    ``SLOTS``). A cell that others start from (a base or a start: ``gate``) takes the next free
    slot before any arm waiting for one, so the parts' critical paths are not queued behind arms.
    It keeps the live processes, so an interrupt stops every part's cells."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.stopped = False
        self._lock = threading.Lock()
        self._taken = 0
        self._gates = 0  # gate cells waiting for a slot
        self._live: set[subprocess.Popen] = set()

    def waiting_gate(self, delta: int) -> None:
        with self._lock:
            self._gates += delta

    def take(self, gate: bool) -> bool:
        """Reserve a slot if one is free (and, for an arm, no gate cell is waiting)."""
        with self._lock:
            if self.stopped or self._taken >= self.n or (self._gates and not gate):
                return False
            self._taken += 1
            return True

    def started(self, p: subprocess.Popen) -> None:
        with self._lock:
            self._live.add(p)

    def release(self, p: subprocess.Popen | None) -> None:
        with self._lock:
            self._taken -= 1
            self._live.discard(p)

    def interrupt(self) -> None:
        """Start nothing more; SIGINT every live cell (`percep run` checkpoints on it) and wait for them."""
        with self._lock:
            self.stopped, live = True, list(self._live)
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGINT)
        for p in live:
            p.wait()


SLOTS: Slots | None = None  # shared by the parts reproduce.py runs side by side; None: each call has its own `jobs`
REPORTING = threading.Lock()  # the reports draw with pyplot, which is not thread-safe
_TAG = threading.local()  # the part a thread runs (reproduce.py), before each line it prints


def say(text: str, *, err: bool = False) -> None:
    """Print a progress line, after this thread's tag (`tagged`); one write per line, so that the lines of
    parts running side by side do not interleave (``print`` writes the text and its newline apart)."""
    tag = getattr(_TAG, "text", "")
    stream = sys.stderr if err else sys.stdout
    stream.write(f"{tag}: {text.strip()}\n" if tag else f"{text}\n")
    stream.flush()


def tagged(tag: str) -> None:
    """Prefix this thread's progress lines with ``tag`` (a part's name)."""
    _TAG.text = tag


def run_cells(cells: list[Cell], out: Path, jobs: int, start_by: float | None = None, *, gate: bool = False) -> list[str]:
    """Run the cells not yet done, `jobs` at a time (and within ``SLOTS`` when set), each in its own
    process group; returns failures. No cell starts after ``start_by`` (a time.time()); the ones left
    are listed as not started. ``gate``: other cells start from these (a base, a start; see `Slots`)."""
    runs, logs = out / "runs", out / "logs"
    runs.mkdir(parents=True, exist_ok=True)
    logs.mkdir(exist_ok=True)
    todo = [c for c in cells if not (run_dir(c, runs) / "summary.json").exists()]
    for c in cells:
        if c not in todo:
            say(f"  done    {c.label}")
    slots = SLOTS or Slots(jobs)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per cell: two stall each other otherwise
    live: dict[subprocess.Popen, tuple[Cell, float]] = {}
    failed: list[str] = []
    waiting = len(todo) if gate else 0
    slots.waiting_gate(waiting)
    try:
        while todo or live:
            if todo and start_by is not None and time.time() > start_by:
                when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(start_by))
                say(f"  cut-off {when} passed: not started: {', '.join(c.label for c in todo)}")
                todo = []
            if todo and slots.stopped:  # interrupted (another thread's Slots.interrupt)
                todo = []
            while todo and len(live) < jobs and slots.take(gate):
                c = todo.pop(0)
                if gate:
                    waiting -= 1
                    slots.waiting_gate(-1)
                log = open(logs / f"{c.label}.log", "ab")  # noqa: SIM115 (closed with the process)
                try:
                    p = subprocess.Popen(command(c, runs), cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                except BaseException:
                    slots.release(None)
                    raise
                slots.started(p)
                live[p] = (c, time.time())
                say(f"  start   {c.label}  (log: {logs / (c.label + '.log')})")
            time.sleep(2)
            for p in [p for p in live if p.poll() is not None]:
                c, t0 = live.pop(p)
                slots.release(p)
                ok = p.returncode == 0
                say(f"  {'done' if ok else 'FAILED'}    {c.label}  ({(time.time() - t0) / 60:.1f} min, exit {p.returncode})")
                if not ok:
                    failed.append(c.label)
    except KeyboardInterrupt:
        slots.interrupt()  # percep run checkpoints on SIGINT; the next call resumes
        say("interrupted: run the same command again to resume", err=True)
        sys.exit(130)
    finally:
        slots.waiting_gate(-waiting)
    return failed


# ---- report -------------------------------------------------------------------------------------


def final_records(rd: Path) -> dict[str, dict[str, Any]]:
    """The last stage's final evaluation records of a run, by item id; an id scored twice stops the report (a
    record would be counted once in a difference, but twice in the summary: neither could be trusted)."""
    summary = json.loads((rd / "summary.json").read_text())
    stage = summary["final_stage"]
    recs = [json.loads(line) for line in (rd / "eval.jsonl").read_text().splitlines() if line.strip()]
    return by_id([r for r in recs if r["stage"] == stage and r.get("final")], rd / "eval.jsonl")


def by_id(recs: list[dict[str, Any]], where: Path) -> dict[str, dict[str, Any]]:
    """Evaluation records by item id; a duplicated id stops the report."""
    out: dict[str, dict[str, Any]] = {}
    for r in recs:
        if r["id"] in out:
            sys.exit(f"error: {where}: test item {r['id']} is scored twice in one evaluation; its records cannot be paired")
        out[r["id"]] = r
    return out


def item_of(rec: dict[str, Any]) -> Any:
    """What a test item is, beyond its id: the id names an index in the test stream, which depends on the seed and
    the task's parameters, so another seed's (or another task's) record can carry the same id for another item.
    The record's instance (else its references); None when the record states neither (then only the id pairs)."""
    if rec.get("instance") is not None:
        return rec["instance"]
    if "ground_truth" in rec or "perception_ref" in rec:
        return [rec.get("perception_ref"), rec.get("ground_truth")]
    return None


def other_items(x: dict[str, dict[str, Any]], y: dict[str, dict[str, Any]]) -> list[str]:
    """The ids both record sets hold whose items differ (`item_of`): such records must not be paired."""
    return [i for i in sorted(set(x) & set(y)) if (a := item_of(x[i])) is not None and (b := item_of(y[i])) is not None and a != b]


def same_items(x: dict[str, dict[str, Any]], y: dict[str, dict[str, Any]]) -> bool:
    """Whether two evaluations scored the same test items: the same ids, each naming the same item."""
    return set(x) == set(y) and not other_items(x, y)


def verdict_value(rec: dict[str, Any], field: str) -> float | None:
    """An item's 0/1 verdict on ``field``; None where the record has none (`cf_outcome` without the counterfactual
    pass): such an item is left out of that metric's pairs, never counted as wrong."""
    v = rec.get(field)
    return None if v is None else float(bool(v))


def checked_metrics(rd: Path) -> dict[str, float]:
    """summary.json's final metrics, after checking that its eval.jsonl records give the same values."""
    summary = json.loads((rd / "summary.json").read_text())
    recs = final_records(rd)
    out = {}
    for m, (key, field) in METRICS.items():
        if summary["final"].get(key) is None:  # not evaluated (`eval { metrics = [...] }` without it)
            continue
        from_records = float(np.mean([bool(r[field]) for r in recs.values()]))
        if abs(from_records - summary["final"][key]) > 1e-9:
            sys.exit(f"error: {rd}: summary.json {key}={summary['final'][key]} but eval.jsonl gives {from_records}")
        out[m] = summary["final"][key]
    out["n"] = len(recs)
    out["partial"] = summary["final"].get("perception_partial", float("nan"))  # edge F1 / cell accuracy
    out["format_ok"] = summary["final"].get("format_ok", float("nan"))
    out["train_min"] = sum(s.get("train_seconds", 0) for s in summary["stages"].values()) / 60
    out["slot_errors"] = summary["stages"][summary["final_stage"]].get("slot_errors") or []  # per perception slot
    return out


def stage_records(stage: Path) -> list[dict[str, Any]]:
    """The records of a stage's last evaluation (its eval-<step>.jsonl)."""
    last = sorted(stage.glob("eval-*.jsonl"))[-1]
    return [json.loads(line) for line in last.read_text().splitlines() if line.strip()]


def base_metrics(stage: Path) -> dict[str, float] | None:
    """A shared base's `stage_metrics`, None while it has not finished (no done.json)."""
    return stage_metrics(stage) if (stage / "done.json").exists() else None


def stage_metrics(stage: Path) -> dict[str, float]:
    """A stage's final metrics from its done.json, checked against its last evaluation's records."""
    done = json.loads((stage / "done.json").read_text())
    last = sorted(stage.glob("eval-*.jsonl"))[-1]
    recs = stage_records(stage)
    out: dict[str, float] = {}
    for m, (key, field) in METRICS.items():
        from_records = float(np.mean([bool(r[field]) for r in recs]))
        if abs(from_records - done["metrics"][key]) > 1e-9:
            sys.exit(f"error: {stage}: done.json {key}={done['metrics'][key]} but {last.name} gives {from_records}")
        out[m] = done["metrics"][key]
    out["n"] = len(recs)
    out["partial"] = done["metrics"].get("perception_partial", float("nan"))
    out["format_ok"] = done["metrics"].get("format_ok", float("nan"))
    out["train_min"] = done.get("train_seconds", 0) / 60
    return out


def slots(errors: list[int]) -> str:
    """The perception slots with errors, `slot:items`, or `none`."""
    return ", ".join(f"{i}:{e}" for i, e in enumerate(errors) if e) or "none"


def paired(diffs: list[np.ndarray], rng: np.random.Generator) -> dict[str, Any]:
    """Pooled mean of per-item differences with a bootstrap 95% interval (items resampled within
    each seed), and the seed-level mean with its t interval."""
    pooled = np.concatenate(diffs)
    boots = np.zeros(BOOT)
    total = len(pooled)
    for d in diffs:
        idx = rng.integers(0, len(d), size=(BOOT, len(d)))
        boots += d[idx].sum(axis=1)
    boots /= total
    per_seed = np.array([d.mean() for d in diffs])
    k = len(per_seed)
    half = t_975(k - 1) * per_seed.std(ddof=1) / np.sqrt(k) if k > 1 else None  # no t interval from one seed
    return {
        "mean": float(pooled.mean()),
        "lo": float(np.quantile(boots, 0.025)),
        "hi": float(np.quantile(boots, 0.975)),
        "per_seed": [float(x) for x in per_seed],
        "seed_lo": None if half is None else float(per_seed.mean() - half),
        "seed_hi": None if half is None else float(per_seed.mean() + half),
        "n_pairs": int(total),
    }


def f1_gap(base: np.ndarray, arms: list[np.ndarray], rng: np.random.Generator) -> dict[str, Any]:
    """F1's statistic: (Δa_r − Δa_p) from the base to the token-mean arm, i.e. the mean over seeds of
    mean(arm a_r − a_p) − mean(base a_r − a_p), each array holding one item's a_r − a_p (−1, 0 or 1).
    The base and the arms are scored on different item sets, so the bootstrap resamples the base's
    items and each arm's items independently (one base resample shared by the seeds of a replicate)."""
    per_seed = np.array([a.mean() - base.mean() for a in arms])
    boots = np.zeros(BOOT)
    base_boot = base[rng.integers(0, len(base), size=(BOOT, len(base)))].mean(axis=1)
    for a in arms:
        boots += a[rng.integers(0, len(a), size=(BOOT, len(a)))].mean(axis=1) - base_boot
    boots /= len(arms)
    return {
        "mean": float(per_seed.mean()),
        "lo": float(np.quantile(boots, 0.025)),
        "hi": float(np.quantile(boots, 0.975)),
        "per_seed": [float(x) for x in per_seed],
    }


def f1_rule_verdict(d: dict[str, Any]) -> str:
    """The pre-registered F1 rule (preregistration.md, sessions 3 and 6) on the mean of Δa_r − Δa_p and its interval:
    reproduced if the mean is > 0 with the interval excluding 0, direction only if > 0 otherwise, else not reproduced."""
    if d["mean"] > 0:
        return "reproduced" if d["lo"] > 0 else "direction only (interval includes 0)"
    return "not reproduced"


def verdict(d: dict[str, Any]) -> str:
    """The pre-registered decision rule for F2 (preregistration.md)."""
    if d["mean"] > 0 and d["lo"] > 0 and sum(x > 0 for x in d["per_seed"]) >= 2:
        return "reproduced"
    if d["mean"] > 0:
        return "direction only (interval includes 0)" if d["lo"] <= 0 else "direction only (< 2 seeds positive)"
    return "not reproduced"


def base_go(prefix: str, base_m: dict[str, Any] | None) -> bool | None:
    """The pre-registered go/no-go of a plan's shared base from its metrics (`GO`); None when the plan has
    no such rule or the base is not there."""
    if prefix not in GO or base_m is None:
        return None
    min_ar, max_ap = GO[prefix]
    return base_m["a_r"] >= min_ar and base_m["a_p"] <= max_ap


def judged(v: str, go: bool | None) -> str:
    """A verdict as the pre-registration lets it stand: none when the base was no-go (outside the regime)."""
    return f"none: base no-go (the rule would read: {v})" if go is False else v


def go_line(prefix: str, go: bool) -> str:
    min_ar, max_ap = GO[prefix]
    return f"Pre-registered go/no-go (a_r ≥ {min_ar}, a_p ≤ {max_ap}): **{'go' if go else 'no-go: outside the regime, no verdict'}**."


def paired_against(
    cells: dict[tuple[str, int], Path], arms: list[str], seeds: list[int], baseline: str, fields: dict[str, str], rng: np.random.Generator
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per arm and metric (``fields``: metric -> eval-record field), ``paired`` over the seeds that
    both the arm and ``baseline`` have, each seed's items paired by id."""
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for arm in [a for a in arms if a != baseline]:
        common = [s for s in seeds if (arm, s) in cells and (baseline, s) in cells]
        if not common:
            continue
        recs = {s: (final_records(cells[(arm, s)]), final_records(cells[(baseline, s)])) for s in common}
        for s, (x, y) in recs.items():
            if bad := other_items(x, y):
                sys.exit(
                    f"error: `{arm}` and `{baseline}`, seed {s}: test item {bad[0]} is another item in {cells[(arm, s)].name} than in "
                    f"{cells[(baseline, s)].name} ({len(bad)} ids so): the cells do not share a test split; nothing is paired"
                )
        results[arm] = {}
        for m, field in fields.items():
            diffs, unpaired, seeds_m = [], {}, []
            for s, (x, y) in recs.items():
                vx = {i: v for i, r in x.items() if (v := verdict_value(r, field)) is not None}
                vy = {i: v for i, r in y.items() if (v := verdict_value(r, field)) is not None}
                ids = sorted(set(vx) & set(vy))
                if len(ids) < max(len(vx), len(vy)):
                    unpaired[s] = f"{len(ids)} pairs of {len(vx)} / {len(vy)} items"
                if ids:
                    diffs.append(np.array([vx[i] - vy[i] for i in ids]))
                    seeds_m.append(s)
            if diffs:  # a metric neither cell of any seed scored (no counterfactual pass: a_r) is left out
                results[arm][m] = {**paired(diffs, rng), "seeds": seeds_m, **({"unpaired": unpaired} if unpaired else {})}
    return results


def seeds_text(d: dict[str, Any]) -> str:
    """A paired difference's seeds, with the seeds whose two cells did not score the same items named (`unpaired`)."""
    unpaired = d.get("unpaired") or {}
    note = f" (items not in both cells: {'; '.join(f'seed {s}: {t}' for s, t in unpaired.items())})" if unpaired else ""
    return ",".join(map(str, d["seeds"])) + note


def plot_paired(results: dict[str, dict[str, dict[str, Any]]], baseline: str, path: Path, width: float = 6) -> None:
    """Every arm's paired differences with their bootstrap intervals, one point per arm and metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, 3.2))
    labels, ys, los, his = [], [], [], []
    for arm, per in results.items():
        for m, d in per.items():
            labels.append(f"{arm}\n{m}")
            ys.append(d["mean"])
            los.append(d["mean"] - d["lo"])
            his.append(d["hi"] - d["mean"])
    ax.errorbar(range(len(ys)), ys, yerr=[los, his], fmt="o", capsize=4)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(ys)), labels, fontsize=7)
    ax.set_ylabel(f"paired Δ vs {baseline} (95% bootstrap)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def link_base(link: Path, target: Path) -> None:
    """``link`` -> the shared base's stage directory; refuse an output folder whose link names another base."""
    if not link.exists():
        link.symlink_to(target, target_is_directory=True)
    elif link.resolve() != target:
        sys.exit(f"error: {link} points at {link.resolve()}, not {target}: use another --out")


def f2_verdict(d: dict[str, Any], prefix: str, arm: str, min_seeds: int = 1, go: bool | None = None) -> str:
    """The F2 verdict of an arm's paired difference on a: the pre-registered rule, labelled exploratory for
    cells run after other results were seen, none for an arm with fewer than ``min_seeds`` seeds, and none
    from a no-go base (``go`` False: `judged`)."""
    v = verdict(d)
    if set(d["seeds"]) & EXPLORATORY.get(prefix, {}).get(arm, set()):  # run late: no verdict below 3 seeds
        if len(d["seeds"]) < 3:
            return "exploratory (< 3 seeds: no verdict)"
        v = f"exploratory: {v}"
    elif len(d["seeds"]) < min_seeds:
        return f"{len(d['seeds'])} of {min_seeds} seeds: no verdict"
    return judged(v, go)


def with_verdicts(
    results: dict[str, dict[str, dict[str, Any]]], prefix: str, min_seeds: int = 1, go: bool | None = None
) -> dict[str, dict[str, dict[str, Any]]]:
    """``results`` with each arm's F2 verdict (`f2_verdict`) stored beside its difference on a (for report.json)."""
    for arm, per in results.items():
        per["a"]["verdict"] = f2_verdict(per["a"], prefix, arm, min_seeds, go)
    return results


def f2_rows(
    results: dict[str, dict[str, dict[str, Any]]],
    prefix: str,
    beside: dict[str, dict[str, str]] | None = None,
    min_seeds: int = 1,
    rule: bool = True,
    go: bool | None = None,
) -> list[str]:
    """The F2 table: each arm's paired differences, the pre-registered verdict on a (none for an arm
    with fewer than ``min_seeds`` seeds, nor without ``rule``; an arm run after other results were
    seen is labelled exploratory), and ``beside[arm][metric]`` in a last column."""
    last = "F2 verdict (on a)" if rule else "verdict"
    head = f"| arm | metric | seeds | item pairs | Δ pooled | 95% paired bootstrap | Δ per seed | seed-level 95% t interval | {last} |"
    bar = "|---|---|---|---:|---:|---|---|---|---|"
    if beside is not None:
        head, bar = head + " 200 items (session 3) |", bar + "---|"
    rows = [head, bar]
    for arm, per in results.items():
        for m, d in per.items():
            v = (f2_verdict(d, prefix, arm, min_seeds, go) if rule else "none (descriptive)") if m == "a" else ""
            seeds_txt = seeds_text(d)
            per_seed = " / ".join(f"{x:+.3f}" for x in d["per_seed"])
            seed_ci = f"[{d['seed_lo']:+.3f}, {d['seed_hi']:+.3f}]" if len(d["per_seed"]) > 1 else "– (one seed)"
            row = f"| {arm} | {m} | {seeds_txt} | {d['n_pairs']} | {d['mean']:+.3f} | [{d['lo']:+.3f}, {d['hi']:+.3f}] | {per_seed} | {seed_ci} | {v} |"
            rows.append(row + (f" {beside.get(arm, {}).get(m, '–')} |" if beside is not None else ""))
    return rows


def miniature(specs: Path) -> str:
    """The title's note for a report of cells made from other specs than the pre-registered ones."""
    if specs.resolve() == SPECS.resolve():
        return ""
    shown = specs.resolve().relative_to(REPO) if specs.resolve().is_relative_to(REPO) else specs
    return f": a MINIATURE (`{shown}`: too few steps, items and seeds for the study's verdicts)"


def auto_lr(
    cells: dict[tuple[str, int], Path], arms: list[str], seeds: list[int], rng: np.random.Generator, note: str
) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """NGDiff with vs without automatic lr: `ngdiff_auto` − `ngdiff` paired on the seeds both have
    (descriptive, no verdict; sessions 4 and 7); the report's lines (``note`` under the heading) and the differences."""
    fields = {m: field for m, (_, field) in METRICS.items()}
    auto = paired_against(cells, ["ngdiff_auto"], seeds, "ngdiff", fields, rng) if "ngdiff_auto" in arms else {}
    if not auto:
        return [], {}
    head = "## NGDiff with vs without automatic lr (`ngdiff_auto` − `ngdiff`; descriptive, no verdict)"
    return [head, "", note, "", *f2_rows(auto, "", rule=False), ""], auto


def lambda_curve(
    out: Path,
    arms: list[str],
    seeds: list[int],
    cells: dict[tuple[str, int], Path],
    results: dict[str, dict[str, dict[str, Any]]],
    trained: dict[tuple[str, int], Path] | None = None,
    older: dict[tuple[str, int], Path] | None = None,
) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    """The λ trade-off curve (descriptive; sessions 4, 5 and 7): a, a_p, a_r against each arm's mean effective λ
    over training (seed means, seeds in grey), the fixed-λ arms joined from token mean up, the others marked
    apart, beside each arm its paired Δa against the baseline (``results``). ``cells``: the 500-item cells;
    ``trained``: the cell whose metrics.csv holds a cell's training (a re-evaluation's source; default the cell);
    ``older``: session 3's 200-item cells, drawn beside. Writes OUT/curve.png; returns the report's lines and
    the curve's points (500 items, 200 items)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained, older = trained or {}, older or {}

    def point(found: dict[tuple[str, int], Path], arm: str) -> dict[str, Any] | None:
        ss = [s for s in seeds if (arm, s) in found]
        if not ss:
            return None
        ms = {s: checked_metrics(found[(arm, s)]) for s in ss}
        lam = {s: mean_eff_lambda(trained.get((arm, s), found[(arm, s)])) for s in ss}
        per = {m: {s: ms[s][m] for s in ss} for m in METRICS}
        return {
            "eff_lambda": float(np.mean(list(lam.values()))),
            **{m: float(np.mean(list(v.values()))) for m, v in per.items()},
            "seeds": ss,
        }

    curve = {a: c for a in arms if (c := point(cells, a))}
    curve200 = {a: c for a in arms if (c := point(older, a))}
    if not curve and not curve200:
        return [], curve, curve200
    head = "| arm | seeds | mean eff. λ | a | a_p | a_r | Δa vs tm [95% paired bootstrap] |"
    bar = "|---|---|---:|---:|---:|---:|---|"
    if older:
        head, bar = head + " 200 items (session 3): seeds, a / a_p / a_r |", bar + "---|"
    lines = ["## The λ trade-off curve (seed means; x = the arm's mean effective λ over training)", "", head, bar]
    for arm in sorted(set(curve) | set(curve200), key=lambda a: (curve.get(a) or curve200[a])["eff_lambda"]):
        c, o, d = curve.get(arm), curve200.get(arm), results.get(arm, {}).get("a")
        new = (
            f"{','.join(map(str, c['seeds']))} | {c['eff_lambda']:.3f} | {c['a']:.3f} | {c['a_p']:.3f} | {c['a_r']:.3f}"
            if c
            else f"not run | {o['eff_lambda']:.3f} | – | – | –"
        )
        delta = ci(d) if d else "–"
        old = f"{','.join(map(str, o['seeds']))}: {o['a']:.3f} / {o['a_p']:.3f} / {o['a_r']:.3f}" if o else "–"
        lines.append(f"| {arm} | {new} | {delta} |" + (f" {old} |" if older else ""))
    lines.append("")
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), sharey=True)
    fixed = [a for a in ("tm", "lam25", "lam", "lam75") if a in curve]
    for ax, m in zip(axes, METRICS):
        ax.plot(
            [curve[a]["eff_lambda"] for a in fixed],
            [curve[a][m] for a in fixed],
            "-o",
            color="C0",
            label="500 items: token mean / fixed λ",
        )
        for i, arm in enumerate(a for a in curve if a not in fixed):
            ax.plot(curve[arm]["eff_lambda"], curve[arm][m], "s", color=f"C{i + 1}", label=f"500 items: {arm}")
        for arm in curve:
            xs = [mean_eff_lambda(trained.get((arm, s), cells[(arm, s)])) for s in curve[arm]["seeds"]]
            ax.scatter(xs, [checked_metrics(cells[(arm, s)])[m] for s in curve[arm]["seeds"]], s=8, color="grey", zorder=0)
        if curve200:
            ax.scatter(
                [c["eff_lambda"] for c in curve200.values()],
                [c[m] for c in curve200.values()],
                facecolors="none",
                edgecolors="k",
                s=40,
                label="200 items (session 3)",
            )
            for arm, c in curve200.items():
                ax.annotate(arm, (c["eff_lambda"], c[m]), fontsize=6, xytext=(3, -8), textcoords="offset points")
        ax.set_title(m)
        ax.set_xlabel("mean effective λ (perception's weight share)")
    axes[0].set_ylabel("accuracy (grey: seeds at 500 items)")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=110)
    plt.close(fig)
    return [*lines, "![the λ trade-off curve](curve.png)", ""], curve, curve200


def format_comparison(
    cells: dict[tuple[str, int], Path], seeds: list[int], prefix: str, other: Path, rng: np.random.Generator
) -> tuple[list[str], dict[str, Any]]:
    """This plan's F2 comparison (`SWEEP_ARM` − `tm`) beside the same experiment in the other perception format
    (`COMPARE`; ``other``: that plan's output folder, its 500-item cells found by experiment and seed): each format's
    paired differences on this plan's finished seeds (and the other's confirmatory seeds), the difference of the gaps
    item by item on the seeds both finished, and each cell's per-slot errors. Descriptive: no verdict."""
    oprefix, oname, name, what = COMPARE[prefix]
    arms = [BASELINE, SWEEP_ARM]
    fields = {m: field for m, (_, field) in METRICS.items()}
    theirs = {(a, s): rd for a in arms for s in (*SEEDS, *CONFIRM_SEEDS) if (rd := find_eval(a, s, other / "runs", oprefix))}
    done = [s for s in seeds if all((a, s) in cells for a in arms)]
    rows = [(name, cells, done), (oname, theirs, done), (f"{oname}, confirmatory seeds", theirs, list(CONFIRM_SEEDS))]
    found = {label: paired_against(c, arms, ss, BASELINE, fields, rng).get(SWEEP_ARM, {}) for label, c, ss in rows}
    lines = [
        f"## The two perception formats side by side ({name} against {oname}; descriptive, no verdict)",
        "",
        f"`{SWEEP_ARM}` − `{BASELINE}`, paired by item within seeds, in each format ({oname}: the 500-item cells under "
        f"`{other}`). Both formats draw the same graphs for a seed, so the same seeds score the same test graphs; each",
        "format has its own reasoner base, and perception's token share differs (preregistration.md).",
        "",
        "| format | seeds | Δa | Δa_p | Δa_r |",
        "|---|---|---:|---:|---:|",
    ]
    for label, per in found.items():
        if per:
            seeds_txt = ",".join(map(str, per["a"]["seeds"]))
            lines.append(f"| {label} | {seeds_txt} | {ci(per['a'])} | {ci(per['a_p'])} | {ci(per['a_r'])} |")
        else:
            lines.append(f"| {label} | – | no finished pair of cells | | |")
    gaps = gap_difference({"_cells": theirs, "level": oname}, {"_cells": cells, "level": name}, done, rng, what) if done else {}
    if gaps:
        seeds_txt = ",".join(map(str, gaps["a"]["seeds"]))
        lines += [
            "",
            f"Difference of the gaps ({name} − {oname}), item by item on seeds {seeds_txt} (the same test graphs; 95% bootstrap "
            f"over items within seeds): Δa {ci(gaps['a'])}, Δa_p {ci(gaps['a_p'])}, Δa_r {ci(gaps['a_r'])}.",
        ]
    slot_rows = [(label, a, s, c[(a, s)]) for label, c, ss in rows[:2] for s in done for a in arms if (a, s) in c]
    slot_rows += [(oname, a, s, theirs[(a, s)]) for s in CONFIRM_SEEDS for a in arms if (a, s) in theirs]
    lines += [
        "",
        "Per-slot perception errors (slot k: how many test items got node pair k wrong; the 15 pairs of N = 6 in sorted",
        "order: 0 = 0-1, 1 = 0-2, …, 4 = 0-5, 5 = 1-2, …, 9 = 2-3, …, 12 = 3-4, 13 = 3-5, 14 = 4-5):",
        "",
        "| format | arm | seed | n | a_p | slot errors (slot: items) |",
        "|---|---|---:|---:|---:|---|",
    ]
    slot_data = []
    for label, a, s, rd in slot_rows:
        m = checked_metrics(rd)
        lines.append(f"| {label} | {a} | {s} | {m['n']} | {m['a_p']:.3f} | {slots(m['slot_errors'])} |")
        slot_data.append({"format": label, "arm": a, "seed": s, "n": m["n"], "a_p": m["a_p"], "slot_errors": m["slot_errors"]})
    return lines + [""], {"paired": found, "gap_difference": gaps, "slot_errors": slot_data}


def report(out: Path, arms: list[str], seeds: list[int], prefix: str = "gc", specs: Path = SPECS, compare: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = out / "runs"
    rng = np.random.default_rng(0)
    plan = next(k for k, v in PLANS.items() if v == prefix)
    lines = [f"# Reproduction report (`--plan {plan}`, {TASKS[prefix]}){miniature(specs)}", ""]
    lines += [
        "Generated by `python benchmarks/repro.py` from the cells in `runs/`; the plan and the decision rules are",
        "pre-registered in `benchmarks/results/preregistration.md`. Every metric below is the cell's",
        "`summary.json` (checked against its `eval.jsonl`); every difference is computed item by item from",
        "`eval.jsonl`. Test items per evaluation are stated in each row (the issue asks for at least 500).",
        "The F2 table applies the pre-registered rule; the table after it is the framework's `percep report --baseline`.",
        "",
    ]
    base = out / f"{prefix}_base"  # the base stage the arms started from (its done.json and eval records)
    base_m = base_metrics(base)
    go = base_go(prefix, base_m)
    if base and base_m:
        lines += [
            "## Shared start",
            "",
            "| start | n | a | a_p | a_r | a_p partial | format_ok | train min |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            f"| reasoner base (`{base.resolve()}`) | {base_m['n']} | {base_m['a']:.3f} | {base_m['a_p']:.3f} | {base_m['a_r']:.3f} "
            f"| {num(base_m['partial'])} | {num(base_m['format_ok'])} | {base_m['train_min']:.1f} |",
            "",
        ]
        if go is not None:
            lines += [go_line(prefix, go) + (f" {NO_ARMS_RULE}" if go is False and prefix in NO_ARMS_AT_NO_GO else ""), ""]
    cells: dict[tuple[str, int], Path] = {}
    for arm in arms:
        for s in seeds:
            rd = find_run(Cell(specs / f"{prefix}_{arm}.pd", s, f"{arm}-s{s}"), runs)
            if rd:
                cells[(arm, s)] = rd
    lines += [
        "## Arms (per seed)",
        "",
        "| arm | seed | n | a | a_p | a_r | a_p partial | format_ok | train min | slot errors (slot: items) | run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    metrics: dict[tuple[str, int], dict[str, float]] = {}
    for (arm, s), rd in sorted(cells.items()):
        m = metrics[(arm, s)] = checked_metrics(rd)
        lines.append(
            f"| {arm} | {s} | {m['n']} | {m['a']:.3f} | {m['a_p']:.3f} | {m['a_r']:.3f} | {num(m['partial'])} | {num(m['format_ok'])} "
            f"| {m['train_min']:.1f} | {slots(m['slot_errors'])} | `{rd.name}` |"
        )
    lines.append("")

    # paired differences against the baseline arm, on the seeds both have
    results = paired_against(cells, arms, seeds, BASELINE, {m: field for m, (_, field) in METRICS.items()}, rng)
    if results:
        lines += [
            f"## F2: paired differences against `{BASELINE}` (arm − {BASELINE})",
            "",
            *f2_rows(results, prefix, min_seeds=MIN_SEEDS.get(prefix, 1), go=go),
            "",
        ]
    if cells and any(a == BASELINE for a, _ in cells):
        # the framework's own paired table (`percep report RUN... --baseline`), computed from the same
        # records: its bootstrap resamples seeds as well as items, so with 3 seeds it can differ from
        # the pre-registered interval above
        from percepdsl_runtime.grid.paired import load_runs, paired_markdown, paired_report

        rep = paired_report(load_runs(sorted(cells.values())), f"experiment=repro_{prefix}_{BASELINE}")
        lines += ["### The same comparison by `percep report --baseline`", "", paired_markdown(rep).split("\n", 2)[-1].strip(), ""]
    formats: dict[str, Any] | None = None
    if compare is not None and prefix in COMPARE:
        format_lines, formats = format_comparison(cells, seeds, prefix, compare, rng)
        lines += format_lines
    auto_lines, auto = auto_lr(cells, arms, seeds, rng, "Paired item by item on each seed's test items.")
    curve_lines, curve, _ = lambda_curve(out, arms, seeds, cells, results)
    lines += auto_lines + curve_lines
    # F1: the token-mean arm against the shared start
    f1: dict[str, Any] | None = None
    f1_pairs: dict[str, dict[str, Any]] = {}
    paired_rule = False
    if base_m and any(a == BASELINE for a, _ in metrics):
        tm_seeds = [s for s in seeds if (BASELINE, s) in metrics]
        tm = [metrics[(BASELINE, s)] for s in tm_seeds]
        d_ar = [m["a_r"] - base_m["a_r"] for m in tm]
        d_ap = [m["a_p"] - base_m["a_p"] for m in tm]

        def score(recs: Any, metric: str) -> np.ndarray:  # per item: 1 if right on the metric
            return np.array([float(bool(r[METRICS[metric][1]])) for r in recs])

        def gap(recs: Any) -> np.ndarray:  # per item: a_r − a_p
            recs = list(recs)
            return score(recs, "a_r") - score(recs, "a_p")

        base_recs = by_id(stage_records(base), base)
        arm_recs = [final_records(cells[(BASELINE, s)]) for s in tm_seeds]
        f1 = f1_gap(gap(base_recs.values()), [gap(r.values()) for r in arm_recs], rng)
        f1["delta"] = {"a_r": float(np.mean(d_ar)), "a_p": float(np.mean(d_ap))}
        # the same change paired item by item, on the seeds whose items are the base's (the same ids naming the same
        # items: the base scored seed 1's test stream, and each seed draws its own): per metric and for the gap
        same = [s for s, r in zip(tm_seeds, arm_recs) if same_items(r, base_recs)]
        if same:
            ids = sorted(base_recs)
            before = [base_recs[i] for i in ids]
            after = [[r[i] for i in ids] for s, r in zip(tm_seeds, arm_recs) if s in same]
            for name in ("a_r", "a_p"):
                f1_pairs[name] = {**paired([score(a, name) - score(before, name) for a in after], rng), "seeds": same}
            f1_pairs["gap"] = {**paired([gap(a) - gap(before) for a in after], rng), "seeds": same}
        # the paired rule pools every seed's item pairs: it needs every seed's items to be the base's
        paired_rule = prefix in F1_PAIRED and bool(f1_pairs) and same == tm_seeds
        rule = f1_pairs["gap"] if paired_rule else f1
        f1_verdict = judged(f1_rule_verdict(rule), go)
        lines += [
            f"## F1: token-averaged SFT from the shared start (`{BASELINE}` − base)",
            "",
            "| seed | Δa_r | Δa_p | Δa_r − Δa_p |",
            "|---:|---:|---:|---:|",
            *(f"| {s} | {r:+.3f} | {p:+.3f} | {r - p:+.3f} |" for s, r, p in zip(tm_seeds, d_ar, d_ap)),
            f"| mean | {np.mean(d_ar):+.3f} | {np.mean(d_ap):+.3f} | **{f1['mean']:+.3f}** [{f1['lo']:+.3f}, {f1['hi']:+.3f}] |",
            "",
            f"Base evaluated on {base_m['n']} items of seed 1's test stream, the arms on their own seed's items: the interval"
            if not paired_rule
            else f"Base and arms evaluated on the same {base_m['n']} items (the task's whole test split); the interval in the table",
            "(95% bootstrap, the base's and each arm's items resampled independently) treats them as unpaired.",
        ]
        if prefix in F1_PAIRED and not paired_rule:
            other = [s for s in tm_seeds if s not in same]
            lines += [
                "",
                f"The pre-registered rule reads the paired interval, which needs every seed's items to be the base's; seeds "
                f"{','.join(map(str, other))} scored other test items under the same ids (each seed draws its own test "
                "stream), so it reads the unpaired interval.",
            ]
        if f1_pairs:
            fmt = {k: ci(d) for k, d in f1_pairs.items()}
            lines += [
                "",
                f"Paired item by item (seed{'s' if len(same) > 1 else ''} {','.join(map(str, same))}, whose items are the base's; "
                "95% bootstrap over items within seeds):",
                f"Δa_r {fmt['a_r']}, Δa_p {fmt['a_p']}, Δa_r − Δa_p {fmt['gap']}.",
            ]
        which = "paired" if paired_rule else "unpaired"
        lines += [f"Pre-registered F1 rule (Δa_r − Δa_p > 0, interval excluding 0): **{f1_verdict}** (the {which} interval).", ""]
    # plots
    if metrics:
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), sharey=True)
        for ax, m in zip(axes, METRICS):
            for i, arm in enumerate(arms):
                ys = [metrics[(arm, s)][m] for s in seeds if (arm, s) in metrics]
                ax.scatter([i] * len(ys), ys, s=18, color="C0")
                if ys:
                    ax.bar(i, np.mean(ys), color="C0", alpha=0.3)
            if base_m:
                ax.axhline(base_m[m], color="k", lw=1, ls="--", label="base")
            ax.set_xticks(range(len(arms)), arms)
            ax.set_title(m)
        axes[0].set_ylabel("accuracy (bars: seed mean; dots: seeds)")
        fig.tight_layout()
        fig.savefig(out / "arms.png", dpi=110)
        plt.close(fig)
        lines += ["![arms](arms.png)", ""]
    if results:
        plot_paired(results, BASELINE, out / "paired.png")
        lines += ["![paired differences](paired.png)", ""]
    # cells without a finished run, in the start order: a run directory without summary.json was started and stopped
    # (or is still running); no directory: not run (preregistration.md: both reported as such)
    missing = [(a, s) for a, s in start_order(plan, arms, seeds) if (a, s) not in cells]
    started = {(a, s) for a, s in missing if run_dir(Cell(specs / f"{prefix}_{a}.pd", s, ""), runs).exists()}
    for what, which in (("started, not finished", started), ("not run", set(missing) - started)):
        if which:
            lines += [f"Cells {what}: {', '.join(f'{a}-s{s}' for a, s in missing if (a, s) in which)}.", ""]
    from percepdsl.io import write_json_atomic, write_text_atomic

    write_json_atomic(
        out / "report.json",
        {
            "base": base_m,
            "cells": {f"{a}-s{s}": m for (a, s), m in metrics.items()},
            "paired": with_verdicts(results, prefix, MIN_SEEDS.get(prefix, 1), go),
            "f1": f1,
            "f1_paired": f1_pairs,
            "f1_verdict": f1_verdict if f1 else None,
            "f1_rule": ("paired" if paired_rule else "unpaired") if f1 else None,  # the interval its rule read
            "ngdiff_auto_vs_ngdiff": auto,
            "curve": curve,
            "formats": formats,
        },
    )
    return write_text_atomic(out / "report.md", "\n".join(lines))


# ---- session 4's report (`--plan p8-500`) ---------------------------------------------------------


def source_of(rd: Path) -> Path:
    """The session-3 run a re-evaluation cell loaded its weights from (its IR's `model hf` path,
    `<run>/stages/<stage>/model`)."""
    ir = json.loads((rd / "ir.json").read_text())["ir"]
    return Path(ir["model"]["path"]).parents[2]


def same_weights(rd: Path, src: Path) -> bool:
    """Whether a re-evaluation's saved weights equal its source cell's, tensor for tensor."""
    import torch
    from safetensors.torch import load_file

    stage = json.loads((rd / "summary.json").read_text())["final_stage"]
    src_stage = json.loads((src / "summary.json").read_text())["final_stage"]
    a = load_file(rd / "stages" / stage / "model" / "model.safetensors")
    b = load_file(src / "stages" / src_stage / "model" / "model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def agreement(rd: Path, src: Path, metrics: tuple[str, ...] = tuple(METRICS)) -> tuple[float, int]:
    """The share of the source's items whose ``metrics`` (default a, a_p and a_r) the re-evaluation
    scored alike, and their number."""
    new, old = final_records(rd), final_records(src)
    fields = [METRICS[m][1] for m in metrics]
    same = [all(bool(new[i][f]) == bool(old[i][f]) for f in fields) for i in old if i in new]
    return (float(np.mean(same)) if same else float("nan")), len(same)


def mean_logged(rd: Path, column: str) -> float:
    """The mean over a run's logged training steps (its metrics.csv) of ``column``; NaN if it never logged it."""
    import csv

    with (rd / "metrics.csv").open() as f:
        vals = [float(r[column]) for r in csv.DictReader(f) if r.get(column)]
    return float(np.mean(vals)) if vals else float("nan")


def mean_eff_lambda(rd: Path) -> float:
    """The mean over the logged training steps of `eff_lambda` (the perception role's share of the
    weight the loss puts on tokens; for token mean its token share, for NGDiff its normalised gradient's)."""
    return mean_logged(rd, "eff_lambda")


def report_500(out: Path, arms: list[str], seeds: list[int]) -> Path:
    """Session 4's report: every arm on 500 items against the `tm` re-evaluation, the session-3
    200-item figures beside, NGDiff with vs without automatic lr, and the λ trade-off curve."""
    from percepdsl.io import write_json_atomic, write_text_atomic

    runs = out / "runs"
    rng = np.random.default_rng(0)
    fields = {m: field for m, (_, field) in METRICS.items()}
    cells: dict[tuple[str, int], Path] = {}  # (arm, seed) -> the cell evaluated on 500 items
    trained: dict[tuple[str, int], Path] = {}  # (arm, seed) -> the cell that trained it (its metrics.csv)
    for arm in arms:
        for s in seeds:
            rd = find_eval(arm, s, runs) if arm in REEVAL else find_run(Cell(SPECS / f"gc8_{arm}.pd", s, f"{arm}-s{s}"), runs)
            if rd:
                cells[(arm, s)] = rd
                trained[(arm, s)] = source_of(rd) if arm in REEVAL else rd
    confirm = [(arm, s) for s in CONFIRM_SEEDS for arm in CONFIRM_ARMS if arm in arms]
    for arm, s in confirm:
        if rd := find_eval(arm, s, runs):
            cells[(arm, s)] = rd
            trained[(arm, s)] = source_of(rd)
    lines = [
        "# Reproduction report (`--plan p8-500`, graph colouring at patch 8, 500 test items)",
        "",
        "Generated by `python benchmarks/repro.py --plan p8-500 --report` from the cells in `runs/`; the plans, their order,",
        'cut-offs and decision rules are pre-registered in `benchmarks/results/preregistration.md` ("Session 4", "Session 5").',
        "Every evaluation below is on the task's 500 test items of the cell's seed. Session 3's arms (`tm`, `lam`,",
        "`ngdiff`, 300 steps from the shared patch-8 reasoner base; seeds 1–3, and the confirmatory `tm`/`ngdiff`",
        "seeds 4–6) are re-evaluated from their saved weights",
        "(`repro_gc8_<arm>_eval500`: one optimiser step at lr 0, then the runtime's evaluation; the weights are checked",
        "equal to the source cell's); the other arms were trained here from the same base and evaluated on 500 items.",
        "Every metric is the cell's `summary.json` (checked against its `eval.jsonl`); every difference is computed",
        "item by item from `eval.jsonl`; session 3's 200-item figures (its cells' own evaluations) are kept beside.",
        "",
    ]
    base = out / "gc8_base"
    b = base_metrics(base)
    go = base_go("gc8", b)  # None only when the base is not there
    if b is not None:
        lines += [
            f"Shared start: the reasoner base `{base.resolve()}`: a {b['a']:.3f} / a_p {b['a_p']:.3f} / a_r {b['a_r']:.3f} "
            f"on {b['n']} items of seed 1. {go_line('gc8', bool(go))}",
            "",
        ]
    lines += [
        "## Cells",
        "",
        "| arm | seed | n | a | a_p | a_r | a_p partial | format_ok | mean eff. λ (training) | trained | weights = source | items 1–200 as session 3 scored them | run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|",
    ]
    metrics: dict[tuple[str, int], dict[str, Any]] = {}
    checks: dict[str, dict[str, Any]] = {}
    for (arm, s), rd in sorted(cells.items(), key=lambda kv: (kv[0][1] in CONFIRM_SEEDS, arms.index(kv[0][0]), kv[0][1])):
        m = metrics[(arm, s)] = checked_metrics(rd)
        m["eff_lambda"] = mean_eff_lambda(trained[(arm, s)])
        if arm in REEVAL:
            src = trained[(arm, s)]
            same, (agree, n_agree) = same_weights(rd, src), agreement(rd, src)
            checks[f"{arm}-s{s}"] = {"source": str(src), "same_weights": same, "agreement": agree, "n": n_agree}
            how, w, ag = f"session 3 (`{src.name}`)", "yes" if same else "**NO**", f"{agree:.3f} of {n_agree}"
        else:
            how, w, ag = f"here ({m['train_min']:.1f} min)", "–", "–"
        lines.append(
            f"| {arm} | {s} | {m['n']} | {m['a']:.3f} | {m['a_p']:.3f} | {m['a_r']:.3f} | {num(m['partial'])} | {num(m['format_ok'])} "
            f"| {m['eff_lambda']:.3f} | {how} | {w} | {ag} | `{rd.name}` |"
        )
    lines.append("")

    results = paired_against(cells, arms, seeds, BASELINE, fields, rng)
    # session 3's 200-item paired differences of the re-evaluated arms, from the source cells
    sources = {k: trained[k] for k in cells if k[0] in REEVAL}
    for arm, s in [(a, s) for a in arms if a in REEVAL for s in seeds] + confirm:  # re-evaluations not run: sources named in their specs
        spec = out / "specs" / f"{arm}-s{s}.pd"
        if (arm, s) not in sources and spec.exists() and (hit := re.search(r'^model hf "(.*)"$', spec.read_text(), re.M)):
            sources[(arm, s)] = trained[(arm, s)] = Path(hit.group(1)).parents[2]
    at200 = paired_against(sources, [a for a in arms if a in REEVAL], seeds, BASELINE, fields, rng)
    beside = {arm: {m: f"{ci(d)} (seeds {','.join(map(str, d['seeds']))})" for m, d in per.items()} for arm, per in at200.items()}
    if results:
        lines += [
            f"## F2: paired differences against `{BASELINE}` on 500 items (arm − {BASELINE})",
            "",
            *f2_rows(results, "gc8", beside, min_seeds=3, go=go),
            "",
        ]
    confirmed = confirmatory(cells, sources, checks, confirm, fields, rng, go)
    lines += confirmed.pop("lines")
    # NGDiff with vs without automatic lr, paired on the items both have: 500 where `ngdiff` was
    # re-evaluated, else the 200 its session-3 evaluation scored (the first 200 of the same stream)
    ngd = {k: v for k, v in cells.items() if k[0] == "ngdiff"} or {k: v for k, v in sources.items() if k[0] == "ngdiff"}
    auto_lines, auto = auto_lr(
        {**{k: v for k, v in cells.items() if k[0] == "ngdiff_auto"}, **ngd},
        arms,
        seeds,
        rng,
        "Paired on the items both cells scored (`item pairs`: 200 per seed where `ngdiff` has only session 3's evaluation).",
    )
    lines += auto_lines

    # the λ trade-off curve: 500 items where measured, session 3's 200 items beside (also for the arms whose
    # re-evaluation did not run)
    curve_lines, curve, curve200 = lambda_curve(out, arms, seeds, cells, results, trained, sources)
    lines += curve_lines
    if results:
        plot_paired(results, BASELINE, out / "paired.png", width=9)
        lines += ["![paired differences](paired.png)", ""]
    missing = [f"{a}-s{s}" for a, s in start_order("p8-500", arms, seeds) + confirm if (a, s) not in cells]
    if missing:
        lines += [f"Cells not run or not complete (pre-registered order; cut-off in preregistration.md): {', '.join(missing)}.", ""]
    write_json_atomic(
        out / "report.json",
        {
            "cells": {f"{a}-s{s}": m for (a, s), m in metrics.items()},
            "reevaluation_checks": checks,
            "paired": with_verdicts(results, "gc8", 3, go),
            "paired_200": at200,
            "ngdiff_auto_vs_ngdiff": auto,
            "confirmatory": confirmed,
            "curve": curve,
            "curve_200": curve200,
            "missing": missing,
        },
    )
    return write_text_atomic(out / "report.md", "\n".join(lines))


def confirmatory(
    cells: dict[tuple[str, int], Path],
    sources: dict[tuple[str, int], Path],
    checks: dict[str, dict[str, Any]],
    confirm: list[tuple[str, int]],
    fields: dict[str, str],
    rng: np.random.Generator,
    go: bool | None = None,
) -> dict[str, Any]:
    """Session 5's confirmatory block: `ngdiff` − `tm` on the re-evaluated seeds 4-6 (500 items), judged by
    the F2 rule apart from seeds 1-3; a re-evaluation whose weights differ from its source's is left out
    (preregistration.md "Session 5"); the 200-item result of the same cells beside. Returns the paired
    differences (500 and 200 items), the cells left out, and the report's `lines`."""
    done = {k: cells[k] for k in confirm if k in cells}
    if not done:
        return {"paired": {}, "paired_200": {}, "excluded": [], "lines": []}
    excluded = [f"{a}-s{s}" for a, s in done if not checks[f"{a}-s{s}"]["same_weights"]]
    usable = {k: v for k, v in done.items() if f"{k[0]}-s{k[1]}" not in excluded}
    arms, seeds = list(CONFIRM_ARMS), list(CONFIRM_SEEDS)
    res = with_verdicts(paired_against(usable, arms, seeds, BASELINE, fields, rng), "gc8", 3, go)
    at200 = paired_against({k: v for k, v in sources.items() if k in confirm}, arms, seeds, BASELINE, fields, rng)
    beside = {arm: {m: f"{ci(d)} (seeds {','.join(map(str, d['seeds']))})" for m, d in per.items()} for arm, per in at200.items()}
    agree = ", ".join(f"{k} {checks[k]['agreement']:.3f} of {checks[k]['n']}" for k in (f"{a}-s{s}" for a, s in done))
    lines = [
        f"## Confirmatory F2 on 500 items (`ngdiff` − `{BASELINE}`, seeds {', '.join(map(str, seeds))}; judged apart from seeds 1–3)",
        "",
        'Session 3\'s confirmatory cells (pre-registered before they ran), re-evaluated on 500 items (preregistration.md "Session 5").',
        "",
        *(
            f2_rows(res, "gc8", beside, min_seeds=3, go=go)
            if res
            else ["No seed has both re-evaluations with unchanged weights: no result."]
        ),
        "",
        f"Items 1–200 scored as session 3's evaluation did (a, a_p and a_r alike): {agree}.",
        *([f"Left out (saved weights differ from the source's): {', '.join(excluded)}."] if excluded else []),
        "",
    ]
    return {"paired": res, "paired_200": at200, "excluded": excluded, "lines": lines}


# ---- session 8's verbosity sweep (`--sweep`) ----------------------------------------------------

# the sweep's levels: the reasoning style -> the plan that runs sudoku 4×4 at it (preregistration.md "Session 8")
LEVELS = {"verbose": "sudoku", "trace": "sudoku-trace", "brief": "sudoku-brief"}
SWEEP_ARM = "ngdiff"  # the reweighted arm whose gap over `tm` (on a) the sweep follows


def sweep_level(level: str, out: Path, seeds: list[int], rng: np.random.Generator) -> dict[str, Any]:
    """One level of the sweep from its plan's output folder: the base and its go/no-go, the `tm` and `SWEEP_ARM`
    cells, perception's share of the target tokens (the runtime's `token_share/perception` over the logged
    training batches of the token-mean cells) and the paired gap `SWEEP_ARM` − `tm` per metric."""
    plan = LEVELS[level]
    prefix = PLANS[plan]
    base = out / f"{prefix}_base"
    base_m = base_metrics(base)
    go = bool(base_go(prefix, base_m))
    arms = [BASELINE, SWEEP_ARM]
    cells = {(arm, s): rd for arm in arms for s in seeds if (rd := find_run(Cell(SPECS / f"{prefix}_{arm}.pd", s, ""), out / "runs"))}
    metrics = {f"{arm}-s{s}": checked_metrics(rd) for (arm, s), rd in sorted(cells.items())}
    shares = [mean_logged(cells[(BASELINE, s)], "token_share/perception") for s in seeds if (BASELINE, s) in cells]
    fields = {m: field for m, (_, field) in METRICS.items()}
    gap = paired_against(cells, arms, seeds, BASELINE, fields, rng).get(SWEEP_ARM, {})
    if gap:
        gap["a"]["verdict"] = f2_verdict(gap["a"], prefix, SWEEP_ARM, MIN_SEEDS.get(prefix, 1), go)
    missing = [(a, s) for a, s in start_order(plan, arms, seeds) if (a, s) not in cells]
    started = [(a, s) for a, s in missing if run_dir(Cell(SPECS / f"{prefix}_{a}.pd", s, ""), out / "runs").exists()]
    return {
        "level": level,
        "plan": plan,
        "out": str(out),
        "share": float(np.mean(shares)) if shares else float("nan"),
        "base": base_m,
        "go": go,
        "cells": metrics,
        "means": {
            arm: {m: float(np.mean([metrics[f"{arm}-s{s}"][m] for s in seeds if (arm, s) in cells])) for m in METRICS}
            for arm in arms
            if any((arm, s) in cells for s in seeds)
        },
        # the perception role's mean share of the loss weight over training, per arm (token mean's is its token share)
        "eff_lambda": {
            arm: float(np.mean([mean_eff_lambda(cells[(arm, s)]) for s in seeds if (arm, s) in cells]))
            for arm in arms
            if any((arm, s) in cells for s in seeds)
        },
        "gap": gap,
        "complete": all((a, s) in cells for a in arms for s in seeds),
        "started": [f"{a}-s{s}" for a, s in started],
        "not_run": [f"{a}-s{s}" for a, s in missing if (a, s) not in started],
        "_cells": cells,
    }


def item_gaps(cells: dict[tuple[str, int], Path], seed: int, field: str, what: str = "puzzle") -> dict[str, tuple[float, Any]]:
    """Per test item of a seed: (`SWEEP_ARM` − `tm` on ``field``, the item's puzzle (instance field ``what``) as its
    records state it)."""
    x, y = final_records(cells[(SWEEP_ARM, seed)]), final_records(cells[(BASELINE, seed)])
    out: dict[str, tuple[float, Any]] = {}
    for i in sorted(set(x) & set(y)):  # an item without a verdict on ``field`` in either cell is left out (`verdict_value`)
        if (a := verdict_value(x[i], field)) is not None and (b := verdict_value(y[i], field)) is not None:
            out[i] = (a - b, (x[i].get("instance") or {}).get(what))
    return out


def gap_difference(
    lo: dict[str, Any], hi: dict[str, Any], seeds: list[int], rng: np.random.Generator, what: str = "puzzle"
) -> dict[str, dict[str, Any]]:
    """The difference of gaps ``hi`` − ``lo`` per metric: per seed and test puzzle, (ngdiff − tm) at ``hi`` minus
    (ngdiff − tm) at ``lo``, pooled with `paired`'s bootstrap (puzzles resampled within seeds, the same resample for
    both levels). Items pair by id; a puzzle (instance field ``what``) that differs between the levels under one id
    stops the report (the levels' test splits must be the same puzzles)."""
    common = [s for s in seeds if all((a, s) in lv["_cells"] for lv in (lo, hi) for a in (BASELINE, SWEEP_ARM))]
    out: dict[str, dict[str, Any]] = {}
    if not common:
        return out
    for m, (_, field) in METRICS.items():
        diffs, seeds_m = [], []
        for s in common:
            a, b = item_gaps(lo["_cells"], s, field, what), item_gaps(hi["_cells"], s, field, what)
            ids = sorted(set(a) & set(b))
            if bad := [i for i in ids if a[i][1] != b[i][1]]:
                sys.exit(
                    f"error: test item {bad[0]} has another `{what}` at `{lo['level']}` than at `{hi['level']}` (seed {s}): "
                    "the levels do not share a test split"
                )
            if ids:
                diffs.append(np.array([b[i][0] - a[i][0] for i in ids]))
                seeds_m.append(s)
        if diffs:  # a metric no seed scored at both levels (no counterfactual pass) is left out
            out[m] = {**paired(diffs, rng), "seeds": seeds_m}
    return out


def trend_verdict(end: dict[str, Any], adjacent: list[dict[str, Any]]) -> str:
    """The pre-registered trend test (preregistration.md "Session 8") from the difference of gaps on a between the
    largest- and the smallest-share level (``end``) and between neighbours in share order (``adjacent``)."""
    if end["hi"] < 0:
        return "the gap shrinks as the share grows" if all(d["mean"] < 0 for d in adjacent) else "shrinks, not monotone"
    if end["lo"] > 0:
        return "the gap grows"
    return "no trend shown (interval includes 0)"


def sweep_report(levels: dict[str, Path], out: Path, seeds: tuple[int, ...] = SEEDS) -> Path:
    """The verbosity sweep's report (OUT/report.md, report.json, sweep.png): per level its share, base, arms and
    gap; the difference of gaps between every two go levels with 3 seeds of both arms; the trend test over them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from percepdsl.io import write_json_atomic, write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    seeds = list(seeds)
    found = [sweep_level(name, path, seeds, rng) for name, path in levels.items()]
    found.sort(key=lambda lv: (np.isnan(lv["share"]), lv["share"]))
    judged = [lv for lv in found if lv["go"] and lv["complete"]]
    lines = [
        f"# Verbosity sweep (sudoku 4×4, session 8): the F2 gap `{SWEEP_ARM}` − `{BASELINE}` against perception's token share",
        "",
        "Generated by `python benchmarks/repro.py --sweep` from each level's plan folder; the plan, the go rule and the",
        'trend test are pre-registered in `benchmarks/results/preregistration.md` ("Session 8"). Every level is sudoku 4×4',
        "with the same task, test puzzles, base recipe and arms; only `reasoning` differs. Share: the runtime's",
        "`token_share/perception` over the logged training batches of the level's token-mean cells; perception's weight: each",
        "arm's mean effective λ over training (the perception role's share of the loss weight). Metrics: seed means",
        "of the cells' `summary.json` (checked against `eval.jsonl`); gaps: paired item by item (95% bootstrap over items",
        "within seeds).",
        "",
        "| level | plan | perception share | base a / a_p / a_r | go | perception's weight: tm / ngdiff | tm a / a_p / a_r | ngdiff a / a_p / a_r | Δa [95%] | Δa_p [95%] | Δa_r [95%] | F2 verdict (on a) |",
        "|---|---|---:|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in found:
        b = lv["base"]
        base_txt = f"{b['a']:.3f} / {b['a_p']:.3f} / {b['a_r']:.3f}" if b else "not run"
        go_txt = ("**go**" if lv["go"] else "no-go") if b else "–"
        arm_txt = [
            " / ".join(f"{lv['means'][a][m]:.3f}" for m in METRICS) if a in lv["means"] else "not run" for a in (BASELINE, SWEEP_ARM)
        ]
        g = lv["gap"]
        gaps = [ci(g[m]) if g else "–" for m in METRICS]
        v = g["a"]["verdict"] if g else "–"
        share = f"{lv['share']:.3f}" if not np.isnan(lv["share"]) else "–"
        weight = " / ".join(f"{lv['eff_lambda'][a]:.3f}" if a in lv["eff_lambda"] else "–" for a in (BASELINE, SWEEP_ARM))
        lines.append(
            f"| `{lv['level']}` | `--plan {lv['plan']}` | {share} | {base_txt} | {go_txt} | {weight} | {arm_txt[0]} | {arm_txt[1]} | {' | '.join(gaps)} | {v} |"
        )
    lines += ["", f"Go rule per level (session 6's): base a_r ≥ {GO['sudoku'][0]} and a_p ≤ {GO['sudoku'][1]}.", ""]
    diffs: list[dict[str, Any]] = []
    for i, lo in enumerate(judged):
        for hi in judged[i + 1 :]:
            d = gap_difference(lo, hi, seeds, rng)
            if d:
                diffs.append({"from": lo["level"], "to": hi["level"], "adjacent": judged.index(hi) == i + 1, **d})
    verdict_txt = "no trend test (fewer than two go levels with 3 seeds of both arms)"
    if diffs:
        lines += [
            "## Difference of gaps between levels (the larger share's gap − the smaller's)",
            "",
            "| levels | metric | seeds | item pairs | Δ gap pooled [95% bootstrap] | per seed | adjacent in share |",
            "|---|---|---|---:|---|---|---|",
        ]
        for d in diffs:
            for m in METRICS:
                x = d[m]
                per = " / ".join(f"{v:+.3f}" for v in x["per_seed"])
                lines.append(
                    f"| `{d['to']}` − `{d['from']}` | {m} | {','.join(map(str, x['seeds']))} | {x['n_pairs']} | {ci(x)} | {per} | {'yes' if d['adjacent'] else 'no'} |"
                )
        end = next(d for d in diffs if d["from"] == judged[0]["level"] and d["to"] == judged[-1]["level"])
        verdict_txt = trend_verdict(end["a"], [d["a"] for d in diffs if d["adjacent"]])
        lines += [""]
    lines += [
        f"Pre-registered trend test over the go levels ({', '.join('`' + lv['level'] + '`' for lv in judged) or 'none'}), on a: **{verdict_txt}**.",
        "",
    ]
    for lv in found:
        for what, which in (("started, not finished", lv["started"]), ("not run", lv["not_run"])):
            if which:
                lines += [f"`{lv['level']}`: cells {what}: {', '.join(which)}.", ""]
    lines += [
        "## Cells",
        "",
        "| level | cell | n | a | a_p | a_r | a_p partial | train min | run |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for lv in found:
        for label, m in lv["cells"].items():
            arm, s = label.rsplit("-s", 1)
            lines.append(
                f"| `{lv['level']}` | {label} | {m['n']} | {m['a']:.3f} | {m['a_p']:.3f} | {m['a_r']:.3f} | {num(m['partial'])} "
                f"| {m['train_min']:.1f} | `{lv['_cells'][(arm, int(s))]}` |"
            )
    lines += ["", "![the gap against the perception share](sweep.png)", ""]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for ax, m in zip(axes, METRICS):
        for lv in (lv for lv in found if lv["gap"] and not np.isnan(lv["share"])):
            d = lv["gap"][m]
            style = {"fmt": "o", "capsize": 4, "color": "C0"} if lv in judged else {"fmt": "o", "capsize": 4, "color": "C0", "mfc": "none"}
            ax.errorbar([lv["share"]], [d["mean"]], yerr=[[d["mean"] - d["lo"]], [d["hi"] - d["mean"]]], **style)
            ax.annotate(lv["level"], (lv["share"], d["mean"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_title(f"{SWEEP_ARM} − {BASELINE} on {m}")
        ax.set_xlabel("perception's share of the target tokens")
    axes[0].set_ylabel("paired Δ (95% bootstrap; hollow: no verdict)")
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=110)
    plt.close(fig)
    write_json_atomic(
        out / "report.json",
        {
            "levels": [{k: v for k, v in lv.items() if k != "_cells"} for lv in found],
            "differences": diffs,
            "trend": verdict_txt,
        },
    )
    return write_text_atomic(out / "report.md", "\n".join(lines))


def cutoff(hhmm: str, now: float | None = None) -> float:
    """``HH:MM`` UTC as a time.time(): its occurrence nearest to ``now`` (within 12 hours either way), so a
    cut-off that passed minutes ago stops the runner at once instead of meaning tomorrow's, and an evening
    run with a morning cut-off gets the next morning's."""
    import datetime as dt

    if not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", hhmm):
        raise ValueError(f"--start-by {hhmm!r}: give HH:MM (UTC), e.g. 09:00")
    now_t = dt.datetime.now(dt.timezone.utc) if now is None else dt.datetime.fromtimestamp(now, dt.timezone.utc)
    h, m = (int(x) for x in hhmm.split(":"))
    t = now_t.replace(hour=h, minute=m, second=0, microsecond=0)
    if t > now_t + dt.timedelta(hours=12):  # e.g. 23:50 read at 00:10: yesterday's, passed 20 min ago
        t -= dt.timedelta(days=1)
    elif t <= now_t - dt.timedelta(hours=12):
        t += dt.timedelta(days=1)
    return t.timestamp()


def start_by_arg(ap: argparse.ArgumentParser, hhmm: str | None) -> float | None:
    """``--start-by``'s cut-off (``cutoff``), None when not given; a malformed time is a usage error (exit 2)."""
    try:
        return cutoff(hhmm) if hhmm else None
    except ValueError as exc:
        ap.error(str(exc))


def run_plan(
    plan: str,
    out: Path,
    arms: list[str],
    seeds: list[int],
    *,
    jobs: int = 2,
    start_by: float | None = None,
    report_only: bool = False,
    base_model: Path | None = None,
    reeval_from: Path | None = None,
    specs: Path = SPECS,
    compare: Path | None = None,
) -> tuple[Path | None, list[str]]:
    """Run (or resume) a plan's cells in ``out`` unless ``report_only``, then write its report; returns
    the report's path (None when the base failed: no report) and the cells that failed. ``specs``: the folder of the plan's specs (default the
    pre-registered ones; `benchmarks/reproduce.py --quick` passes its miniatures, `specs/repro/quick/`). ``compare``: the
    output folder of the same experiment in the other perception format (`COMPARE`), set beside in the report."""
    out.mkdir(parents=True, exist_ok=True)
    prefix = PLANS[plan]
    failed: list[str] = []
    if not report_only:
        t0 = time.time()
        if base_model:
            link_base(out / f"{prefix}_base", base_model.resolve())
        else:
            say("base (shared reasoner start):")
            for stem, name in BASES.get(prefix, (("base", f"{prefix}_base"),)):  # each part starts from the one before
                cell = Cell(specs / f"{prefix}_{stem}.pd", None, stem)
                failed += run_cells([cell], out, 1, gate=True)
                if failed:
                    say(f"the base failed: see {out / 'logs' / (stem + '.log')}", err=True)
                    return None, failed
                link_base(out / name, run_dir(cell, out / "runs") / "stages" / "base")
        base = out / f"{prefix}_base"
        stop = prefix in NO_ARMS_AT_NO_GO and base_go(prefix, base_metrics(base)) is False
        say("arms:" if not stop else f"arms: none run ({go_line(prefix, False)} {NO_ARMS_RULE})")
        # seed-major order (within the plan's priority groups): complete seeds first, so an early stop still leaves
        # paired comparisons; p8-500 re-evaluates session 3's arms
        cells = [
            eval_cell(arm, s, out, reeval_from)
            if plan == "p8-500" and arm in REEVAL
            else Cell(specs / f"{prefix}_{arm}.pd", s, f"{arm}-s{s}")
            for arm, s in start_order(plan, arms, seeds)
        ]
        failed += [] if stop else run_cells(cells, out, jobs, start_by)
        say(f"wall time: {(time.time() - t0) / 60:.1f} min")
    with REPORTING:
        path = report_500(out, arms, seeds) if plan == "p8-500" else report(out, arms, seeds, prefix, specs, compare)
    return path, failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="accepted for old command lines; changes nothing (every plan here is pre-registered)"
    )
    ap.add_argument(
        "--plan",
        choices=list(PLANS),
        default="quick16",
        help="quick16: session 2's plan; p8: session 3's (patch 8); p8-500: session 4's; sudoku: sessions 6-7's; "
        "sudoku-trace/-brief: session 8's; p8-adj: session 9's (p8 in the fixed-slot format)",
    )
    ap.add_argument("--out", type=Path, default=Path("runs/repro"))
    ap.add_argument("--jobs", type=int, default=2, help="cells at once (one thread each)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"subset of {','.join(ARMS)}")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    ap.add_argument("--report", action="store_true", help="only write the report from the cells that exist")
    ap.add_argument(
        "--base-model", type=Path, help="start the arms from this stage directory (its model/, done.json) instead of training the base"
    )
    ap.add_argument("--reeval-from", type=Path, help="p8-500: the output folder of session 3's run, whose cells are re-evaluated")
    ap.add_argument(
        "--compare", type=Path, help="p8-adj: the edge-list plan's 500-item output folder (--plan p8-500's), set beside in the report"
    )
    ap.add_argument("--start-by", help="HH:MM (UTC; the occurrence nearest now, within 12 h either way): no cell starts after it")
    ap.add_argument(
        "--sweep",
        help=f"LEVEL=FOLDER,...: only write the verbosity sweep's report to --out from each level's plan folder (levels: {', '.join(LEVELS)})",
    )
    a = ap.parse_args(argv)
    if a.sweep:
        levels = dict(x.split("=", 1) for x in a.sweep.split(",") if x)
        if unknown := [x for x in levels if x not in LEVELS]:
            ap.error(f"unknown level(s) {unknown}; the sweep's levels are {list(LEVELS)}")
        path = sweep_report(
            {k: Path(v).resolve() for k, v in levels.items()}, a.out.resolve(), tuple(int(x) for x in a.seeds.split(",") if x)
        )
        print(path.read_text())
        print(f"report: {path}")
        return 0
    start_by = start_by_arg(ap, a.start_by)
    if a.compare is not None:
        if PLANS[a.plan] not in COMPARE:
            ap.error(
                f"--compare: plan {a.plan} has no other format to set beside it (plans with one: "
                f"{', '.join(p for p, x in PLANS.items() if x in COMPARE)})"
            )
        if not (a.compare / "runs").is_dir():
            ap.error(f"--compare {a.compare}: no runs/ folder there (give the other plan's --out folder)")
    arms = [x for x in a.arms.split(",") if x]
    if a.plan in PRIORITY and a.arms == ",".join(ARMS):  # the plan's own arms
        arms = [x for group in PRIORITY[a.plan] for x in group]
    if unknown := [x for x in arms if x not in ARMS]:
        ap.error(f"unknown arm(s) {unknown}; the pre-registered arms are {list(ARMS)}")
    seeds = [int(x) for x in a.seeds.split(",") if x]
    path, failed = run_plan(
        a.plan,
        a.out.resolve(),
        arms,
        seeds,
        jobs=a.jobs,
        start_by=start_by,
        report_only=a.report,
        base_model=a.base_model,
        reeval_from=a.reeval_from,
        compare=a.compare,
    )
    if path is None:  # the base failed: no report
        return 3
    print(path.read_text())
    print(f"report: {path}")
    return 3 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
