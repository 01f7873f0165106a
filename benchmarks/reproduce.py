"""The whole reproduction of issue 13 in one command: both tasks, SFT (F1, F2) and GRPO (F3, F4), one report.

    python benchmarks/reproduce.py --out runs/reproduce                  # all of it (hours: docs/results.md)
    python benchmarks/reproduce.py --quick --out runs/reproduce-quick    # the miniature: a pipeline check (docs/results.md)
    python benchmarks/reproduce.py --out runs/reproduce --report         # the report only, from the cells that exist
    python benchmarks/reproduce.py --out runs/reproduce --tasks sudoku --methods sft,grpo --jobs 2 --start-by 09:00

Four parts, each in its own folder `OUT/<task>-<method>/` with its own report (Markdown, PNG plots and
report.json), written by the pre-registered plans' own runners, which this script imports and calls
(`repro.run_plan` for SFT, `repro_rl.run_plan` for GRPO): every cell is a plain `percep run`, a finished
cell is skipped and an interrupted one resumed, so running the same command again continues where it
stopped. The tasks run one after the other; a task's two parts run side by side (`run_parts`), their
cells sharing the `--jobs` cores (`repro.Slots`), so one part's cells use the core that the other's
base leaves idle; a base or start goes before waiting arms, and gc-grpo waits for gc-sft's p8 step,
whose cell it starts from. The plans (`PARTS`; `benchmarks/results/preregistration.md`):

- gc-sft: session 3's patch-8 plan (`--plan p8`: the reasoner base, then token mean, λ = 0.5 and NGDiff,
  300 steps, 200 test items; its report gives F1) in `gc-sft/p8/`, then session 4's (`--plan p8-500`:
  those cells re-evaluated on all 500 test items and the other F2 arms trained and evaluated on 500;
  its report gives F2) in `gc-sft/`.
- sudoku-sft: sessions 6-7's (`--plan sudoku`: F1 and F2, 500 items).
- gc-grpo: session 5's (`repro_rl.py --plan gc8`: F3, F4 on 500 items), started from the gc-sft part's
  token-mean seed-1 cell when that ran (the plan's own start chain is the same two specs), else from its chain.
- sudoku-grpo: session 3's (`repro_rl.py`: F3, F4 and role-weighted GRPO, 500 items).

`--quick` runs the same parts through the same runners and reports with the miniature specs of
`specs/repro/quick/` (the same tasks and losses, a few dozen steps, 60 test items, 2 seeds, 2 arms a part):
its report says in its first line that it is a miniature, and gives no verdict.

`OUT/report.md` (and `OUT/report.json`, `OUT/headline.png`) assembles one headline table from the parts'
report.json: per finding and task, the statistic with its 95% interval, the pre-registered verdict and
seeds × test items; it links every part's report and plots, and gives the time each part took, measured
from its cells' records (each cell from its first start in `environment.json` to its `summary.json`,
written last), and names the parts that did not run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import repro  # noqa: E402
import repro_rl  # noqa: E402
from repro_rl import num  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
QUICK_SPECS = REPO / "specs" / "repro" / "quick"
TASKS = {"gc": "graph colouring", "sudoku": "sudoku 4×4"}
METHODS = ("sft", "grpo")
SEEDS, QUICK_SEEDS = (1, 2, 3), (1, 2)
BEYOND = {"tw", "ngdiff"}  # GRPO arms that are role-weighted GRPO (issue 16), not F4's rewards


@dataclass(frozen=True)
class Step:
    """One plan run by its runner inside a part's folder."""

    plan: str  # repro.PLANS' key (SFT) or repro_rl.PLANS' (GRPO)
    arms: tuple[str, ...]
    findings: tuple[str, ...]  # what the headline takes from its report.json: F1, F2 (SFT) or F3, F4 (GRPO)
    sub: str = ""  # its folder inside the part's ("": the part's own)
    reeval: str | None = None  # p8-500: the sibling step folder whose cells it re-evaluates and whose base it starts from
    start: tuple[str, str, int, str] | None = None  # GRPO: (part folder, spec stem, seed, stage) of a cell that is its start


def preregistered(plan: str) -> tuple[str, ...]:
    """An SFT plan's arms in their pre-registered start order (`repro.PRIORITY`)."""
    return tuple(a for group in repro.PRIORITY[plan] for a in group)


PARTS: dict[tuple[str, str], tuple[Step, ...]] = {
    ("gc", "sft"): (
        Step("p8", ("tm", "lam", "ngdiff"), ("F1",), sub="p8"),
        Step("p8-500", preregistered("p8-500"), ("F2",), reeval="p8"),
    ),
    ("sudoku", "sft"): (Step("sudoku", preregistered("sudoku"), ("F1", "F2")),),
    ("gc", "grpo"): (Step("gc8", repro_rl.PLANS["gc8"].arms, ("F3", "F4"), start=("gc-sft/p8", "gc8_tm", 1, "post")),),
    ("sudoku", "grpo"): (Step("sudoku", repro_rl.PLANS["sudoku"].arms, ("F3", "F4")),),
}
QUICK: dict[tuple[str, str], tuple[Step, ...]] = {
    ("gc", "sft"): (Step("p8", ("tm", "ngdiff"), ("F1", "F2")),),
    ("sudoku", "sft"): (Step("sudoku", ("tm", "ngdiff"), ("F1", "F2")),),
    ("gc", "grpo"): (Step("gc8", ("outcome", "alpha"), ("F3", "F4"), start=("gc-sft", "gc8_tm", 1, "post")),),
    ("sudoku", "grpo"): (Step("sudoku", ("outcome", "alpha"), ("F3", "F4")),),
}


def part_name(task: str, method: str) -> str:
    return f"{task}-{method}"


def cells_of(folder: Path) -> list[Path]:
    """The finished cells (run directories with a summary.json) of a part, in all its steps' folders."""
    return sorted(p.parent for p in folder.glob("**/runs/*/summary.json"))


def cell_time(rd: Path) -> dict[str, Any]:
    """A cell's time from its own records: its first start (`environment.json`) to its `summary.json`
    (written last, so its modification time is the end), its starts, its stages' training seconds, and
    their CPU seconds (None when a stage did not record them: runs before session 10)."""
    starts = json.loads((rd / "environment.json").read_text())["starts"]
    begin = dt.datetime.fromisoformat(starts[0]["started"]).timestamp()
    end = (rd / "summary.json").stat().st_mtime
    stages = json.loads((rd / "summary.json").read_text())["stages"].values()
    train = sum(s.get("train_seconds") or 0 for s in stages)
    cpu = [s.get("cpu_seconds") for s in stages]
    return {
        "run": rd.name,
        "begin": begin,
        "end": end,
        "seconds": end - begin,
        "starts": len(starts),
        "train_seconds": train,
        "cpu_seconds": None if None in cpu else sum(cpu),
    }


def part_time(folder: Path) -> dict[str, Any] | None:
    """A part's time from its cells' records: the sum of its cells' times (each cell one process, one
    thread: the time the part takes at `--jobs 1`) and the elapsed time from its first cell's start to its
    last cell's end (what it took here, with `--jobs` and any pause between resumptions); None without cells."""
    times = [cell_time(rd) for rd in cells_of(folder)]
    if not times:
        return None
    return {
        "cells": len(times),
        "cell_minutes": sum(t["seconds"] for t in times) / 60,
        "train_minutes": sum(t["train_seconds"] for t in times) / 60,
        "cpu_minutes": None if any(t["cpu_seconds"] is None for t in times) else sum(t["cpu_seconds"] for t in times) / 60,
        "begin": min(t["begin"] for t in times),
        "end": max(t["end"] for t in times),
        "elapsed_minutes": (max(t["end"] for t in times) - min(t["begin"] for t in times)) / 60,
        "resumed": [t["run"] for t in times if t["starts"] > 1],
    }


def run_step(
    step: Step, method: str, part: Path, out: Path, seeds: list[int], quick: bool, jobs: int, start_by: float | None, report_only: bool
) -> tuple[Path | None, list[str]]:
    """Run (or only report) one step through its plan's runner; returns its report and the failed cells."""
    folder = part / step.sub if step.sub else part
    specs = QUICK_SPECS if quick else repro.SPECS
    if method == "sft":
        src = part / step.reeval if step.reeval else None
        base = src / f"{repro.PLANS[step.plan]}_base" if src else None
        return repro.run_plan(
            step.plan,
            folder,
            list(step.arms),
            seeds,
            jobs=jobs,
            start_by=start_by,
            report_only=report_only,
            base_model=base if base and base.exists() else None,
            reeval_from=src,
            specs=specs,
        )
    start = None
    if step.start:  # another part's cell that is this plan's start (the same specs as its start chain)
        where, stem, seed, stage = step.start
        rd = repro.find_run(repro.Cell(specs / f"{stem}.pd", seed, ""), out / where / "runs")
        start = rd / "stages" / stage if rd else None
    return repro_rl.run_plan(
        step.plan, folder, list(step.arms), seeds, jobs=jobs, start_by=start_by, report_only=report_only, start=start, specs=specs
    )


# ---- the headline table ---------------------------------------------------------------------------


def per_seed_items(d: dict[str, Any]) -> str:
    """`seeds × items` of a paired difference (its item pairs per seed)."""
    k = len(d["per_seed"])
    return f"{k} × {d['n_pairs'] // k}" if d["n_pairs"] % k == 0 else f"{k} seeds, {d['n_pairs']} item pairs"


def rows_of(report: dict[str, Any], method: str, findings: tuple[str, ...], baseline: str) -> list[dict[str, Any]]:
    """The headline rows one step's report.json gives (every number copied from it)."""
    rows: list[dict[str, Any]] = []
    if "F1" in findings and report.get("f1"):
        paired = report.get("f1_rule") == "paired"
        d = report["f1_paired"]["gap"] if paired else report["f1"]
        items = report["base"]["n"] if report.get("base") else "?"
        # Δa_r and Δa_p over the same seeds as the statistic (the paired means cover only the seeds whose items are the base's)
        delta = report["f1"].get("delta") or {}
        also = (
            {m: report["f1_paired"][m]["mean"] for m in ("a_r", "a_p")} if paired else {m: delta[m] for m in ("a_r", "a_p") if m in delta}
        )
        if not also and report.get("f1_paired"):  # a report.json written before `delta`
            also = {m: report["f1_paired"][m]["mean"] for m in ("a_r", "a_p")}
        rows.append(
            {
                "finding": "F1",
                "comparison": f"`{baseline}` − the reasoner base (token-averaged SFT)",
                "statistic": "Δa_r − Δa_p" + (" (paired by item)" if paired else " (unpaired)"),
                "value": d["mean"],
                "lo": d["lo"],
                "hi": d["hi"],
                "verdict": report.get("f1_verdict") or "–",
                "seeds_items": f"{len(d['per_seed'])} × {items}",
                "also": also,
            }
        )
    if "F3" in findings and baseline in (report.get("f3") or {}):
        f3 = report["f3"][baseline]
        mean, lo, hi = f3["within_gap"]["stats"]
        rows.append(
            {
                "finding": "F3",
                "comparison": f"`{baseline}`: r(outcome term, reasoning correct) − r(outcome term, perception correct), within groups",
                "statistic": "gap in r (t over seeds)",
                "value": mean,
                "lo": lo,
                "hi": hi,
                "verdict": f3.get("verdict", "–"),
                "seeds_items": f"{len(f3['seeds'])} seeds (rollouts)",
                "also": {
                    "r reasoning": f3["term_corr_group_mean/outcome/reasoning"]["stats"][0],
                    "r perception": f3["term_corr_group_mean/outcome/perception"]["stats"][0],
                },
            }
        )
    if "F2" in findings or "F4" in findings:
        confirmatory = (report.get("confirmatory") or {}).get("paired") or {}  # p8-500: fresh seeds, judged apart
        for arm, per, label in [
            *((a, p, "") for a, p in (report.get("paired") or {}).items()),
            *((a, p, " (confirmatory seeds)") for a, p in confirmatory.items()),
        ]:
            finding = "F2" if method == "sft" else ("issue 16" if arm in BEYOND else "F4")
            d = per["a"]
            rows.append(
                {
                    "finding": finding,
                    "comparison": f"`{arm}` − `{baseline}`{label}",
                    "statistic": "Δa (paired by item)",
                    "value": d["mean"],
                    "lo": d["lo"],
                    "hi": d["hi"],
                    "verdict": d.get("verdict", "–"),
                    "seeds_items": per_seed_items(d),
                    "also": {f"Δ{m}": per[m]["mean"] for m in per if m != "a"},
                }
            )
    return rows


def write_report(out: Path, parts: list[tuple[str, str]], quick: bool, command: str, failed: dict[str, list[str]]) -> Path:
    """OUT/report.md, report.json and headline.png from the parts' report.json and their cells' records."""
    from percepdsl.io import write_json_atomic, write_text_atomic

    plans = QUICK if quick else PARTS
    rows: list[dict[str, Any]] = []
    status: dict[str, dict[str, Any]] = {}
    for task, method in parts:
        name = part_name(task, method)
        folder = out / name
        baseline = repro.BASELINE if method == "sft" else repro_rl.BASELINE
        reports, plots = [], []
        for step in plans[(task, method)]:
            sub = folder / step.sub if step.sub else folder
            if (sub / "report.json").exists() and cells_of(sub):
                rep = json.loads((sub / "report.json").read_text())
                for r in rows_of(rep, method, step.findings, baseline):
                    rows.append({**r, "task": TASKS[task], "part": name, "source": f"{sub.relative_to(out)}/report.json"})
                reports.append(sub / "report.md")
                plots += sorted(sub.glob("*.png"))
        status[name] = {"time": part_time(folder), "reports": [str(p.relative_to(out)) for p in reports], "failed": failed.get(name, [])}
        status[name]["plots"] = [str(p.relative_to(out)) for p in plots]
        status[name]["plans"] = [s.plan for s in plans[(task, method)]]
    ran = [n for n, s in status.items() if s["time"]]
    absent = [n for n, s in status.items() if not s["time"]] + [part_name(t, m) for t in TASKS for m in METHODS if (t, m) not in parts]
    if quick:
        head = [
            "# MINIATURE reproduction (`reproduce.py --quick`): too few steps, test items and seeds for the study's verdicts",
            "",
            "Every part ran the specs of `specs/repro/quick/` (the plans' tasks and losses, a few dozen steps, 60 test items,",
            f"seeds {', '.join(map(str, QUICK_SEEDS))}) through the same runners and reports as the full reproduction. The",
            "differences below are measured on those cells, with their 95% intervals; they test the pipeline, not the study:",
            "the verdict column says what the pre-registered rule would read, and is no verdict.",
        ]
    else:
        head = [
            "# Reproduction of the study: both tasks, SFT (F1, F2) and GRPO (F3, F4)",
            "",
            "Every part ran its pre-registered plan (`benchmarks/results/preregistration.md`) through its own runner;",
            "the verdicts are the plans' pre-registered decision rules.",
        ]
    L = [
        *head,
        "",
        f"Generated by `{command}`. Every figure below is copied from a part's `report.json`, which its runner",
        "computed from the cells' `summary.json` (checked against their `eval.jsonl`); the times from the cells'",
        "own records. Intervals: 95%; SFT and F4 rows a paired bootstrap over items within seeds, F3 a t interval over seeds.",
        "",
        "## Headline",
        "",
        "| finding | task | comparison | statistic | value | 95% interval | verdict | seeds × items | also | source |",
        "|---|---|---|---|---:|---|---|---|---|---|",
    ]
    for r in rows:
        verdict = f"miniature, no verdict (the rule reads: {r['verdict']})" if quick else f"**{r['verdict']}**"
        also = ", ".join(f"{k} {num(v, signed=True)}" for k, v in r["also"].items()) or "–"
        L.append(
            f"| {r['finding']} | {r['task']} | {r['comparison']} | {r['statistic']} | {num(r['value'], signed=True)} | [{num(r['lo'], signed=True)}, {num(r['hi'], signed=True)}] "
            f"| {verdict} | {r['seeds_items']} | {also} | [{r['source']}]({r['source']}) |"
        )
    if not rows:
        L.append("| – | – | no part has finished cells | | | | | | | |")
    L += [
        "",
        "## Parts",
        "",
        "Time from the cells' records: `cells` = the sum over cells of first start → `summary.json` (one process of one",
        "thread each: the part's time at `--jobs 1`); `elapsed` = the first cell's start → the last cell's end here;",
        "`CPU` = the sum of the cells' process CPU time (their stages' `cpu_seconds`; – where a cell ran before it was",
        "recorded): the work the cells did, a better estimate of the part's time at `--jobs 1` on cores of its own than",
        "the wall times, but not immune to load (on an oversubscribed box it rises too: the caches are shared); a resumed",
        "stage counts its last attempt only.",
        "",
        "| part | plans | status | cells | cell time (sum) | elapsed | training only (sum) | CPU (sum) | report | plots |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, s in status.items():
        t = s["time"]
        plans_txt = ", ".join(f"`{p}`" for p in s["plans"])
        if t is None:
            why = f" (failed: {', '.join(s['failed'])})" if s["failed"] else ""
            L.append(f"| {name} | {plans_txt} | **not run**{why} | 0 | – | – | – | – | – | – |")
            continue
        state = f"{len(s['failed'])} cell(s) failed: {', '.join(s['failed'])}" if s["failed"] else "ran"
        links = ", ".join(f"[{p}]({p})" for p in s["reports"])
        pngs = ", ".join(f"[{Path(p).name}]({p})" for p in s["plots"]) or "–"
        cpu = "–" if t["cpu_minutes"] is None else f"{t['cpu_minutes']:.1f} min"
        L.append(
            f"| {name} | {plans_txt} | {state} | {t['cells']} | {t['cell_minutes']:.1f} min | {t['elapsed_minutes']:.1f} min "
            f"| {t['train_minutes']:.1f} min | {cpu} | {links} | {pngs} |"
        )
    total = sum(s["time"]["cell_minutes"] for s in status.values() if s["time"])
    L += ["", f"Cell time, all parts: {total:.1f} min ({len(ran)} of {len(TASKS) * len(METHODS)} parts ran)."]
    spans = []  # a task's parts run side by side: its time is from its first cell's start to its last cell's end
    for task, label in TASKS.items():
        if times := [t for m in METHODS if (t := status.get(part_name(task, m), {}).get("time"))]:
            spans.append(
                f"- {label}: {(max(t['end'] for t in times) - min(t['begin'] for t in times)) / 60:.1f} min ({len(times)} part(s))"
            )
    if spans:
        L += ["", "Per task, from its first cell's start to its last cell's end:", "", *spans]
    if absent:
        L += ["", f"**Not run**: {', '.join(sorted(set(absent)))} (no finished cell in `OUT/<part>/`)."]
    if rows:
        draw_headline(rows, out / "headline.png", quick)
        L += ["", "![headline](headline.png)"]
    write_json_atomic(
        out / "report.json", {"quick": quick, "command": command, "rows": rows, "parts": status, "not_run": sorted(set(absent))}
    )
    return write_text_atomic(out / "report.md", "\n".join(L) + "\n")


def draw_headline(rows: list[dict[str, Any]], path: Path, quick: bool = False) -> None:
    """headline.png: each row's statistic with its 95% interval, from the rows alone (report.json's `rows`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.2))
    ys = np.arange(len(rows))[::-1]

    def defined(x: float | None) -> bool:  # report.json writes an undefined statistic (NaN) as null
        return x is not None and np.isfinite(x)

    for y, r in zip(ys, rows):
        if not defined(r["value"]):  # an undefined statistic (F3 with r undefined): its row stays empty
            continue
        err = [[r["value"] - r["lo"]], [r["hi"] - r["value"]]] if defined(r["lo"]) and defined(r["hi"]) else None
        ax.errorbar(r["value"], y, xerr=err, fmt="o", capsize=3, color="C0")
    ax.axvline(0, color="k", lw=0.8)
    labels = [
        f"{r['finding']} {r['task']}: {r['comparison'].replace('`', '')[:48]}" + ("" if defined(r["value"]) else " (undefined)")
        for r in rows
    ]
    ax.set_yticks(ys, labels, fontsize=7)
    ax.set_xlabel("statistic with its 95% interval (see the table)")
    ax.set_title("MINIATURE (--quick): no verdicts" if quick else "headline", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def step_key(name: str, step: Step) -> str:
    """A step's folder relative to OUT (what another part's ``Step.start`` names)."""
    return f"{name}/{step.sub}" if step.sub else name


def run_parts(
    parts: list[tuple[str, str]], out: Path, seeds: list[int], quick: bool, jobs: int, start_by: float | None, report_only: bool
) -> dict[str, list[str]]:
    """Run (or only report) the parts (one task's) side by side, one thread each, their cells sharing
    ``jobs`` cores (`repro.Slots`): while one part trains its base alone, another's cells use the other
    core. A part whose start is another part's cell (gc-grpo, from gc-sft's p8 step) waits for that
    step. Returns the failed cells per part; Ctrl-C stops every part's cells (they checkpoint) and
    exits 130."""
    plans = QUICK if quick else PARTS
    repro.SLOTS = repro.Slots(jobs)
    finished = {step_key(part_name(*tm), st): threading.Event() for tm in parts for st in plans[tm]}
    failed: dict[str, list[str]] = {}
    errors: list[BaseException] = []

    def run_part(task: str, method: str) -> None:
        name = part_name(task, method)
        repro.tagged(name)
        try:
            if report_only and not cells_of(out / name):
                return  # not run: said so in the report
            repro.say(f"== {name}")
            for step in plans[(task, method)]:
                if step.start and step.start[0] in finished:  # another part of this command leaves its start
                    finished[step.start[0]].wait()
                path, bad = run_step(step, method, out / name, out, seeds, quick, jobs, start_by, report_only)
                failed.setdefault(name, []).extend(bad)
                finished[step_key(name, step)].set()
                if path is None:  # its base or start failed: the later steps have nothing to start from
                    break
                repro.say(f"   report: {path}")
        except BaseException as exc:  # noqa: BLE001 (re-raised by the main thread)
            errors.append(exc)
        finally:
            for step in plans[(task, method)]:  # nothing waits on a part that stopped
                finished[step_key(name, step)].set()

    threads = [threading.Thread(target=run_part, args=tm, name=part_name(*tm), daemon=True) for tm in parts]
    for t in threads:
        t.start()
    try:
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(0.5)  # in slices: the main thread takes Ctrl-C
    except KeyboardInterrupt:
        repro.SLOTS.interrupt()
        print("interrupted: run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    finally:
        repro.SLOTS = None
    if errors:
        raise errors[0]
    return {name: failed[name] for name in (part_name(*tm) for tm in parts) if name in failed}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="the output folder (default runs/reproduce, or runs/reproduce-quick with --quick)")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"a subset of {','.join(TASKS)}")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"a subset of {','.join(METHODS)}")
    ap.add_argument("--jobs", type=int, default=2, help="cells at once (one thread each), shared by a task's parts, which run side by side")
    ap.add_argument("--report", action="store_true", help="only write the reports from the cells that exist")
    ap.add_argument("--start-by", help="HH:MM (UTC; the occurrence nearest now, within 12 h either way): no cell starts after it")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="the miniature (specs/repro/quick/, 2 seeds): a pipeline check, too small to learn (16 min at --jobs 2 on 2 quiet cores)",
    )
    a = ap.parse_args(argv)
    tasks = [x for x in a.tasks.split(",") if x]
    methods = [x for x in a.methods.split(",") if x]
    for flag, given, known in (("--tasks", tasks, list(TASKS)), ("--methods", methods, list(METHODS))):
        if unknown := [x for x in given if x not in known]:
            ap.error(f"{flag}: unknown {', '.join(unknown)}; choose from {','.join(known)}")
        if not given:
            ap.error(f"{flag}: none given; choose from {','.join(known)}")
    if a.jobs < 1:
        ap.error(f"--jobs {a.jobs}: give at least 1")
    start_by = repro.start_by_arg(ap, a.start_by)
    out = (a.out or Path("runs/reproduce-quick" if a.quick else "runs/reproduce")).resolve()
    if out.exists() and not out.is_dir():
        ap.error(f"--out {out}: not a folder")
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(QUICK_SEEDS if a.quick else SEEDS)
    parts = [(t, m) for t in TASKS if t in tasks for m in METHODS if m in methods]
    failed: dict[str, list[str]] = {}
    for task in dict.fromkeys(t for t, _ in parts):  # one task after the other, so each task's time is its own
        failed.update(run_parts([tm for tm in parts if tm[0] == task], out, seeds, a.quick, a.jobs, start_by, a.report))
    argv_txt = " ".join(argv if argv is not None else sys.argv[1:])
    path = write_report(out, parts, a.quick, f"python benchmarks/reproduce.py {argv_txt}".strip(), failed)
    print(path.read_text())
    print(f"report: {path}")
    return 3 if any(failed.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
