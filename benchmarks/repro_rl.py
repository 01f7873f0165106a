"""The RL reproduction of issue 13 (F3, F4) and issue 16's RL measurements, in one command per task.

    python benchmarks/repro_rl.py --out runs/repro_rl                       # sudoku 4×4: run (or resume) and report
    python benchmarks/repro_rl.py --out runs/repro_rl --report              # report only, from what exists
    python benchmarks/repro_rl.py --out runs/repro_rl --arms outcome,alpha --seeds 1,2,3
    python benchmarks/repro_rl.py --plan gc8 --out runs/repro_rl_gc8        # graph colouring, patch 8
    python benchmarks/repro_rl.py --plan gc8 --out runs/repro_rl_gc8 --start STAGE_DIR   # an existing start
    python benchmarks/repro_rl.py --plan gc8 --out runs/repro_rl_gc8 --start STAGE_DIR --reeval-from OLD_OUT
        # session 5: the `outcome` cells of an earlier run (OLD_OUT/runs) re-evaluated on 500 items, not retrained
    python benchmarks/repro_rl.py --plan gc8-ckpt --out runs/f3 --arms outcome --seeds 2,3,4,5,6 --start STAGE_DIR
        # session 9: gc8's `outcome` arm with evaluation points every 4 steps: F3 across checkpoints, with its rule

The plans (`benchmarks/results/preregistration.md`, the "RL" sections) share one shape: a shared
start made by a chain of SFT cells (sudoku: `specs/repro/sudoku_rl_base.pd`, trained once, seed 1;
graph colouring: the patch-8 reasoner base `gc8_base.pd` then the seed-1 token-mean arm
`gc8_tm.pd`, or `--start` an existing stage directory), then one GRPO stage per arm
(`specs/repro/<prefix>_<arm>.pd`) from its checkpoint for each seed. The arms of one seed share
the start, the prompt order and the test items, so they are compared item by item. A plan may name
arms (`reeval`) whose finished cells from an earlier run (`--reeval-from`) are re-evaluated from their
saved weights instead of trained again (`benchmarks/repro.py`'s `eval_cell`: a generated spec, one
step at lr 0, then the arms' own evaluation; the report checks the weights tensor for tensor and the
earlier evaluation's items, and reads the arm's GRPO diagnostics from the source cell). A plan may name
a `before` cell (`gc8_rl_start.pd`: one GRPO step at lr 0, i.e. the start itself) that evaluates
the start on the arms' test items, so each arm's own change (arm − start) is paired too. Cells run
one at a time, or `--jobs N` at once (`benchmarks/repro.py`'s runner: resumable, each a plain `percep run` with one
thread) in `OUT/runs/`, with OUT as working directory, where the plan's link names the start stage.

The report (`OUT/report.md`, `OUT/*.png`, `OUT/report.json`) takes every figure from the cells'
summary.json (metrics checked against their eval.jsonl records): the arms' a / a_p / a_r; paired
differences against `outcome` per seed and pooled (bootstrap over items within seeds, and the
seed-level t interval), and `percep report --baseline`'s table from the same records; F3, the
outcome term's own coupling with reasoning and with perception correctness (pooled, within groups,
across evaluation points) per seed with its mean and t interval over seeds; each surrogate term's
correlation with true perception beside its arm's gain; the share of constant-reward groups; F3 by
training-step window (descriptive: the per-step within-group r of metrics.csv, weighted by its groups);
for a plan with `ckpt_rule` (gc8-ckpt), F3 across checkpoints under session 9's rule with every
evaluation point, and its pilot seeds beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from repro import (
    REPORTING,
    Cell,
    agreement,
    base_metrics,
    checked_metrics,
    ci,
    eval_cell,
    final_records,
    find_eval,
    find_run,
    link_base,
    miniature,
    num,
    paired_against,
    plot_paired,
    run_cells,
    run_dir,
    same_items,
    same_weights,
    say,
    seeds_text,
    source_of,
    start_by_arg,
    t_975,
    verdict,
)  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SPECS = REPO / "specs" / "repro"
BASELINE = "outcome"  # every plan's baseline arm (F3 reads it; F4 compares against it)


@dataclass(frozen=True)
class Plan:
    """One task's pre-registered RL grid."""

    title: str
    section: str  # its section in benchmarks/results/preregistration.md
    prefix: str  # the arms are specs/repro/<prefix>_<arm>.pd
    link: str  # the arms' `model hf "<link>/model"`, relative to OUT
    chain: tuple[tuple[str, int | None, str, str], ...]  # the start: (spec, seed, stage, link), each cell from the last
    arms: tuple[str, ...]  # pre-registered; BASELINE first
    late: tuple[str, ...] = ()  # optional (run if time allows): after every seed of the others
    before: str | None = None  # a cell that evaluates the start on the arms' items (arm − start is then paired)
    fields: tuple[str, ...] = ("a", "a_p", "a_r")  # the metrics its evaluations have (FIELDS' keys)
    reeval: tuple[str, ...] = ()  # arms whose earlier cells `--reeval-from` re-evaluates (not retrains)
    reeval_fragment: str = ""  # specs/repro/common/<it>: the re-evaluation's one lr-0 step and evaluation
    ckpt_rule: bool = False  # F3 across checkpoints has a pre-registered rule (`ckpt_verdict`) and a table of the points
    pilot_seeds: tuple[int, ...] = ()  # seeds run as pilots before the plan: shown beside it, never in a verdict

    def spec(self, arm: str, specs: Path = SPECS) -> Path:
        return specs / f"{self.prefix}_{arm}.pd"


PLANS = {
    "sudoku": Plan(
        "sudoku 4×4",
        "Pre-registration: the RL reproduction",
        "sudoku_rl",
        "sudoku_rl_base",
        (("sudoku_rl_base.pd", None, "base", "sudoku_rl_base"),),
        ("outcome", "alpha", "sc_majority", "tw", "vd", "ngdiff"),
        late=("ngdiff",),
    ),
    "gc8": Plan(
        "graph colouring, 6 nodes, patch 8",
        "Pre-registration: RL on graph colouring",
        "gc8_rl",
        "gc8_rl_start",
        (("gc8_base.pd", None, "base", "gc8_base"), ("gc8_tm.pd", 1, "post", "gc8_rl_start")),
        ("outcome", "alpha", "sc_majority"),
        late=("sc_majority",),  # session 5: alpha − outcome on every seed first
        before="start",
        fields=("a", "a_p"),  # `eval { metrics = [end_to_end, perception] }`: no counterfactual pass
        reeval=("outcome",),  # session 4's cells (100 items) re-evaluated on 500 in session 5
        reeval_fragment="gc8_rl_eval500.pd",
    ),
    # session 9: gc8's `outcome` arm trained again with evaluation points every 4 steps (a, a_p, a_r on 200
    # items each), for F3 across checkpoints; the start's 500-item evaluation is `--before`
    "gc8-ckpt": Plan(
        "graph colouring, 6 nodes, patch 8, evaluation points every 4 steps",
        "Session 9: F3 across checkpoints on graph colouring",
        "gc8_rl_ckpt",
        "gc8_rl_start",
        (("gc8_base.pd", None, "base", "gc8_base"), ("gc8_tm.pd", 1, "post", "gc8_rl_start")),
        ("outcome",),
        ckpt_rule=True,
        pilot_seeds=(1,),
    ),
}
ARMS = PLANS["sudoku"].arms  # the default plan's
SEEDS = (1, 2, 3)
WINDOW = 4  # GRPO steps per window of F3-by-window (16-step stages: 4 windows of up to 16 groups each)
FIELDS = {"a": "outcome", "a_p": "perception_exact", "a_r": "cf_outcome"}
# the GRPO diagnostics the report reads from each cell's summary.json (stage `rl`)
COUPLING = ("term_corr", "term_corr_group_mean", "term_corr_ckpt")


def seed_stats(xs: list[float]) -> tuple[float, float, float]:
    """Mean over seeds with its t interval (nan bounds with one seed)."""
    a = np.array([x for x in xs if x is not None], dtype=float)
    if len(a) == 0:
        return float("nan"), float("nan"), float("nan")
    if len(a) == 1:
        return float(a[0]), float("nan"), float("nan")
    half = t_975(len(a) - 1) * a.std(ddof=1) / np.sqrt(len(a))
    return float(a.mean()), float(a.mean() - half), float(a.mean() + half)


def nan_if_none(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def ckpt_verdict(gaps: list[float | None]) -> str:
    """Session 9's rule for F3 across checkpoints, on the per-seed gaps r(outcome, a_r) − r(outcome, a_p)
    (None where either r is undefined): reproduced if the mean gap is above 0 with its 95% t interval
    excluding 0 and the gap is above 0 in at least 2/3 of the seeds; direction only if the mean is
    above 0 otherwise; not reproduced if it is not; no verdict with fewer than 3 seeds."""
    g = [x for x in gaps if x is not None and x == x]
    if len(g) < 3:
        return f"no verdict ({len(g)} seeds with both r defined)"
    mean, lo, _ = seed_stats(g)
    up = sum(x > 0 for x in g)
    if mean > 0 and lo > 0 and 3 * up >= 2 * len(g):
        return "reproduced"
    if mean > 0:
        why = [*(["interval includes 0"] if lo <= 0 else []), *([f"{up} of {len(g)} seeds above 0"] if 3 * up < 2 * len(g) else [])]
        return f"direction only ({'; '.join(why)})"
    return "not reproduced"


def undefined_r(rows: dict[str, Any]) -> str | None:
    """Why F3's rule cannot be read (its seeds' within-group r, as ``report`` collects them in ``rows``): the seeds
    where r with reasoning or with perception correctness is undefined, i.e. the outcome term or that
    correctness was constant within every group (no group where both vary); None when every seed has both."""
    why = []
    for i, s in enumerate(rows["seeds"]):
        missing = [t for t in ("reasoning", "perception") if rows[f"term_corr_group_mean/outcome/{t}"]["per_seed"][i] is None]
        if missing:
            why.append(f"seed {s} (r with {' and '.join(missing)} correct)")
    if not why:
        return None
    return "constant outcome term or correctness within every group of " + ", ".join(why) + ": no gap to read"


def fmt_ci(m: float, lo: float, hi: float, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    if np.isnan(m):
        return "–"
    return f.format(m) + ("" if np.isnan(lo) else f" [{f.format(lo)}, {f.format(hi)}]")


def diagnostics(rd: Path) -> dict[str, Any]:
    summary = json.loads((rd / "summary.json").read_text())
    st = summary["stages"][summary["final_stage"]]
    return {**st.get("diagnostics", {}), "train_seconds": st.get("train_seconds")}


def history(rd: Path) -> list[dict[str, Any]]:
    summary = json.loads((rd / "summary.json").read_text())
    done = rd / "stages" / summary["final_stage"] / "done.json"
    return json.loads(done.read_text()).get("history", []) if done.exists() else []


def step_rows(rd: Path) -> list[dict[str, str]]:
    """The logged steps of the run's GRPO stage (its metrics.csv), or none."""
    import csv

    summary = json.loads((rd / "summary.json").read_text())
    path = rd / "stages" / summary["final_stage"] / "log0" / "metrics.csv"
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def pg_share(rd: Path, role: str = "perception") -> float | None:
    """The mean of `pg_share/<role>` over the logged steps of the run's GRPO stage (the share is
    measured on logged steps only, so summary.json does not carry it)."""
    vals = [float(r[f"pg_share/{role}"]) for r in step_rows(rd) if r.get(f"pg_share/{role}")]
    return float(np.mean(vals)) if vals else None


def coupling_windows(rd: Path, width: int = WINDOW, term: str = "outcome") -> dict[str, list[float | None]]:
    """F3 by training-step window: per window of ``width`` GRPO steps (from step 0), the term's
    within-group r with reasoning and with perception correctness, i.e. the logged per-step
    `term_corr_group_mean/<term>/<truth>` weighted by that step's `term_corr_groups` (the groups where
    both vary), so over the whole stage it is the stage's own within-group r; with each window's
    groups. None where no group of the window varies."""
    rows = [r for r in step_rows(rd) if r.get("step")]
    windows = max((int(float(r["step"])) // width for r in rows), default=-1) + 1
    out: dict[str, list[float | None]] = {}
    for truth in ("reasoning", "perception"):
        total, groups = [0.0] * windows, [0.0] * windows
        for r in rows:
            if (n := float(r.get(f"term_corr_groups/{term}/{truth}") or 0)) > 0:
                w = int(float(r["step"])) // width
                total[w] += n * float(r[f"term_corr_group_mean/{term}/{truth}"])
                groups[w] += n
        out[truth] = [t / g if g else None for t, g in zip(total, groups)]
        out[f"groups/{truth}"] = groups
    return out


def ckpt_section(rows: dict[str, Any], cells: dict[int, Path], plan: Plan, runs: Path, seeds: list[int], specs: Path) -> list[str]:
    """F3 across checkpoints under its pre-registered rule (``ckpt_verdict``; adds ``ckpt_gap`` and
    ``ckpt_verdict`` to ``rows``, the baseline's F3 rows), and every evaluation point of the baseline's
    cells: the outcome term's mean over the steps before it, a_r, a_p; the plan's pilot seeds beside
    them (in the table and a descriptive mean, never in the verdict)."""

    def gap(d: dict[str, Any]) -> float | None:
        r, p = d.get("term_corr_ckpt/outcome/reasoning"), d.get("term_corr_ckpt/outcome/perception")
        return None if r is None or p is None else r - p

    gaps = [gap(diagnostics(cells[s])) for s in rows["seeds"]]
    rows["ckpt_gap"] = {"per_seed": gaps, "stats": seed_stats(gaps)}
    rows["ckpt_verdict"] = ckpt_verdict(gaps)
    pilots = {s: rd for s in plan.pilot_seeds if s not in seeds and (rd := find_run(Cell(plan.spec(BASELINE, specs), s, ""), runs))}
    pilot_gaps = [gap(diagnostics(rd)) for rd in pilots.values()]
    rows["ckpt_gap_with_pilots"] = {"seeds": [*pilots, *rows["seeds"]], "per_seed": [*pilot_gaps, *gaps]}
    rows["ckpt_gap_with_pilots"]["stats"] = seed_stats(rows["ckpt_gap_with_pilots"]["per_seed"])
    L = [
        f"**F3 across checkpoints** (pre-registered: the gap r(outcome, a_r) − r(outcome, a_p) over the "
        f"{rows['points'][0] if rows['points'] else '–'} evaluation points, mean over seeds > 0 with its 95% t interval "
        "excluding 0, and > 0 in at least 2/3 of the seeds): per seed "
        + " / ".join(num(g, signed=True) for g in gaps)
        + f", mean {fmt_ci(*rows['ckpt_gap']['stats'], signed=True)}: **{rows['ckpt_verdict']}**.",
        "",
    ]
    if pilots:
        L += [
            f"With the pilot seed{'s' if len(pilots) > 1 else ''} {', '.join(map(str, pilots))} (seen before the plan; descriptive): "
            f"per seed {' / '.join(num(g, signed=True) for g in pilot_gaps)}, mean over seeds "
            f"{', '.join(map(str, rows['ckpt_gap_with_pilots']['seeds']))} {fmt_ci(*rows['ckpt_gap_with_pilots']['stats'], signed=True)}.",
            "",
        ]
    L += [
        "### The evaluation points (the outcome term's mean over the GRPO steps before each point; a_r, a_p at it)",
        "",
        "| seed | step | outcome (rollouts since the last point) | a_r | a_p | n | r(outcome, a_r) | r(outcome, a_p) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s, rd in [*pilots.items(), *cells.items()]:
        d = diagnostics(rd)
        for i, h in enumerate(h for h in history(rd) if h.get("reward_window")):
            rs = (num(d.get("term_corr_ckpt/outcome/reasoning")), num(d.get("term_corr_ckpt/outcome/perception"))) if i == 0 else ("", "")
            L.append(
                f"| {s}{' (pilot)' if s in pilots else ''} | {h['step']} | {num(h['reward_window'].get('outcome'))} "
                f"| {num(h.get('reasoning'))} | {num(h.get('perception'))} | {h.get('n', '–')} | {rs[0]} | {rs[1]} |"
            )
    return [*L, ""]


def report(
    out: Path, arms: list[str], seeds: list[int], plan: Plan = PLANS["sudoku"], before: Path | None = None, specs: Path = SPECS
) -> Path:
    """The report of the cells in OUT/runs; ``before`` is a finished run that evaluated the start on the
    arms' test items (default: the plan's `before` cell in OUT/runs, if it ran); ``specs``: the folder of
    the cells' specs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = out / "runs"
    rng = np.random.default_rng(0)
    fields = {m: FIELDS[m] for m in plan.fields}
    L = [f"# RL reproduction report ({plan.title}: F3, F4{', role-weighted GRPO' if 'tw' in arms else ''}){miniature(specs)}", ""]
    L += [
        "Generated by `python benchmarks/repro_rl.py` from the cells in `runs/`; the plan and the decision rules are",
        f'pre-registered in `benchmarks/results/preregistration.md` ("{plan.section}"). Every metric is the cell\'s',
        "`summary.json` (checked against its `eval.jsonl`), every correlation its GRPO stage's `diagnostics`, every",
        "difference computed item by item from `eval.jsonl`. Intervals: 95%; `t` = over seeds (df = seeds − 1),",
        "`boot` = items resampled within seeds.",
        "",
    ]
    base = out / plan.link
    base_m = base_metrics(base)
    if before is None and plan.before:
        before = find_run(Cell(plan.spec(plan.before, specs), 1, plan.before), runs)
    if before is not None:
        base_m = {**checked_metrics(before), "train_min": base_m["train_min"] if base_m else float("nan")}
    if base_m:
        L += [
            "## Shared start (SFT)",
            "",
            "| n | a | a_p | a_r | a_p partial (cell accuracy / edge F1) | format_ok | SFT train min |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            f"| {base_m['n']} | {base_m['a']:.3f} | {base_m['a_p']:.3f} | {num(base_m.get('a_r'))} | {num(base_m['partial'])} "
            f"| {num(base_m['format_ok'])} | {num(base_m['train_min'], digits=1)} |",
            "",
        ]
        if before:
            L += [f"(The start evaluated on the arms' test items by `{before.name}`: the start's weights after one step at lr 0.)", ""]
    # each cell's evaluation, and the run that trained it (the same run unless the cell is a re-evaluation)
    cells: dict[tuple[str, int], Path] = {}
    trained: dict[tuple[str, int], Path] = {}
    checks: dict[str, dict[str, Any]] = {}
    for arm in arms:
        for s in seeds:
            if arm in plan.reeval and (rd := find_eval(arm, s, runs, plan.prefix)):
                cells[(arm, s)], trained[(arm, s)] = rd, source_of(rd)
                share, n = agreement(rd, trained[(arm, s)], plan.fields)
                checks[f"{arm}-s{s}"] = {
                    "source": trained[(arm, s)].name,
                    "same_weights": same_weights(rd, trained[(arm, s)]),
                    "agreement": share,
                    "items_compared": n,
                }
            elif plan.spec(arm, specs).exists() and (rd := find_run(Cell(plan.spec(arm, specs), s, f"{arm}-s{s}"), runs)):
                cells[(arm, s)] = trained[(arm, s)] = rd
    metrics = {k: checked_metrics(rd) for k, rd in cells.items()}
    diags = {k: {**diagnostics(rd), "pg_share/perception": pg_share(rd)} for k, rd in trained.items()}
    L += [
        "## Arms (per seed)",
        "",
        "| arm | seed | n | a | a_p | a_r | a_p partial | format_ok | constant groups (sampled) | trained groups | GRPO min | run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (arm, s), m in sorted(metrics.items(), key=lambda kv: (arms.index(kv[0][0]), kv[0][1])):
        d = diags[(arm, s)]
        L.append(
            f"| {arm} | {s} | {m['n']} | {m['a']:.3f} | {m['a_p']:.3f} | {num(m.get('a_r'))} | {num(m['partial'])} | {num(m['format_ok'])} "
            f"| {num(d.get('constant_group_frac_before'))} | {num(d.get('trained_group_frac'))} "
            f"| {(d.get('train_seconds') or 0) / 60:.1f} | `{cells[(arm, s)].name}` |"
        )
    L.append("")
    if checks:
        L += [
            "### Re-evaluations (arms trained in an earlier session, evaluated here from their saved weights)",
            "",
            "One optimiser step at lr 0, then the arms' own evaluation; the weights must equal the source cell's, tensor",
            "for tensor, and the items the source's own evaluation scored must score alike (its GRPO diagnostics and",
            "training minutes above are the source's).",
            "",
            f"| cell | source (trained) | weights equal | items of the source's evaluation scored alike ({', '.join(plan.fields)}) |",
            "|---|---|---|---|",
        ]
        for label, c in checks.items():
            L.append(
                f"| {label} | `{c['source']}` | {'yes' if c['same_weights'] else '**NO**'} "
                f"| {c['agreement']:.3f} of {c['items_compared']} |"
            )
        L.append("")

    # ---- F4 / issue 16: paired differences against the outcome-only arm ----
    results = paired_against(cells, arms, seeds, BASELINE, fields, rng)

    def rule(d: dict[str, Any]) -> str:
        """The pre-registered verdict, read only once the comparison has 3 paired seeds (all, when fewer were asked)."""
        n = len(d["per_seed"])
        return verdict(d) if n >= min(3, len(seeds)) else f"no verdict ({n} of {len(seeds)} seeds paired)"

    for per in results.values():
        per["a"]["verdict"] = rule(per["a"])
    if results:
        L += [
            f"## F4 and issue 16: paired differences against `{BASELINE}` (arm − {BASELINE})",
            "",
            "| arm | metric | seeds | item pairs | Δ | 95% boot | Δ per seed | 95% t | pre-registered verdict (on a) |",
            "|---|---|---|---:|---:|---|---|---|---|",
        ]
        for arm, per in results.items():
            for m, d in per.items():
                per_seed = " / ".join(f"{x:+.3f}" for x in d["per_seed"])
                t = f"[{d['seed_lo']:+.3f}, {d['seed_hi']:+.3f}]" if len(d["per_seed"]) > 1 else "– (one seed)"
                L.append(
                    f"| {arm} | {m} | {seeds_text(d)} | {d['n_pairs']} | {d['mean']:+.3f} "
                    f"| [{d['lo']:+.3f}, {d['hi']:+.3f}] | {per_seed} | {t} | {d['verdict'] if m == 'a' else ''} |"
                )
        L.append("")
        L += [
            "Headline (pooled over seeds; 95% bootstrap intervals, items resampled within seeds):",
            "",
            f"| arm − {BASELINE} | seeds | item pairs | {' | '.join('Δ' + m for m in fields)} | verdict (on a) |",
            "|---|---:|---:|" + "---|" * len(fields) + "---|",
        ]
        for arm, per in results.items():
            cis = [ci(per[m]) for m in fields]
            L.append(f"| `{arm}` | {len(per['a']['seeds'])} | {per['a']['n_pairs']} | {' | '.join(cis)} | {per['a']['verdict']} |")
        L.append("")
        from percepdsl_runtime.grid.paired import load_runs, paired_markdown, paired_report

        base_exp = {json.loads((cells[(a, s)] / "summary.json").read_text())["experiment"] for a, s in cells if a == BASELINE}
        rep = paired_report(load_runs(sorted(cells.values())), f"experiment={min(base_exp)}")
        L += ["### The same comparison by `percep report --baseline`", "", paired_markdown(rep).split("\n", 2)[-1].strip(), ""]

    # ---- each arm's own change: arm − start, on the same items (the start is one cell, every seed's pair) ----
    moved: dict[str, dict[str, dict[str, Any]]] = {}
    if before is not None:
        # the start is evaluated once, on its own seed's test stream: an arm of another seed scored other items under
        # the same ids, so only the arms whose items are the start's pair with it
        start_recs = final_records(before)
        same = {k for k in cells if same_items(final_records(cells[k]), start_recs)}
        with_start = {**{k: v for k, v in cells.items() if k in same}, **{("start", s): before for s in seeds}}
        moved = paired_against(with_start, ["start", *arms], seeds, "start", fields, rng)
        other = sorted({s for (_, s) in cells} - {s for (_, s) in same})
        L += [
            "## What GRPO changed: arm − start (paired items)",
            "",
            "The start is evaluated once, on its seed's test items; an arm is paired with it item by item on the seeds",
            "that scored the same items"
            + (f" (seeds {', '.join(map(str, other))} drew other test items under the same ids: not paired)." if other else "."),
            "",
            f"| arm − start | seeds | item pairs | {' | '.join('Δ' + m for m in fields)} |",
            "|---|---:|---:|" + "---|" * len(fields),
        ]
        for arm, per in moved.items():
            cis = [ci(per[m]) for m in fields]
            L.append(f"| `{arm}` | {len(per['a']['seeds'])} | {per['a']['n_pairs']} | {' | '.join(cis)} |")
        L.append("")

    # ---- F3: the outcome term's own coupling, per seed, over seeds ----
    f3: dict[str, dict[str, Any]] = {}
    for arm in arms:
        ss = [s for s in seeds if (arm, s) in diags]
        if not ss:
            continue
        rows = {}
        for kind in COUPLING:
            for truth in ("reasoning", "perception"):
                key = f"{kind}/outcome/{truth}"
                vals = [diags[(arm, s)].get(key) for s in ss]
                rows[key] = {"per_seed": vals, "stats": seed_stats(vals)}
        gap = [  # NaN where a seed's r is undefined (None); an r of exactly 0 is a value
            nan_if_none(diags[(arm, s)].get("term_corr_group_mean/outcome/reasoning"))
            - nan_if_none(diags[(arm, s)].get("term_corr_group_mean/outcome/perception"))
            for s in ss
        ]
        rows["within_gap"] = {"per_seed": gap, "stats": seed_stats([g for g in gap if not np.isnan(g)])}
        rows["points"] = [diags[(arm, s)].get("term_corr_ckpt_points") for s in ss]
        rows["groups"] = [diags[(arm, s)].get("term_corr_groups/outcome/perception") for s in ss]
        rows["seeds"] = ss
        f3[arm] = rows
    if f3:
        L += [
            "## F3: the outcome term's coupling (`term_corr…/outcome/…`, per term, not the total)",
            "",
            "Pooled = Pearson r over every rollout of the stage; within groups = the mean of the per-group r over the",
            "groups where both vary (what a group-centred advantage sees); across checkpoints = r over the stage's",
            "evaluation points of the outcome term's mean since the previous point with that point's a_r / a_p.",
            "",
            "| arm | coupling | r with reasoning correct: per seed | mean [95% t] | r with perception correct: per seed | mean [95% t] |",
            "|---|---|---|---|---|---|",
        ]
        for arm, rows in f3.items():
            for kind, label in zip(COUPLING, ("pooled", "within groups (mean)", "across checkpoints")):
                r, p = rows[f"{kind}/outcome/reasoning"], rows[f"{kind}/outcome/perception"]

                def ps(v: dict[str, Any]) -> str:
                    return " / ".join("–" if x is None else f"{x:.2f}" for x in v["per_seed"])

                L.append(f"| {arm} | {label} | {ps(r)} | {fmt_ci(*r['stats'])} | {ps(p)} | {fmt_ci(*p['stats'])} |")
        L += [
            "",
            "Within-group gap r(reasoning) − r(perception), mean over seeds [95% t]: "
            + "; ".join(f"`{arm}` {fmt_ci(*rows['within_gap']['stats'], signed=True)}" for arm, rows in f3.items())
            + f". Evaluation points per stage: {f3[next(iter(f3))]['points']}.",
            "",
            "The rollouts themselves (temperature 1; share right, mean over seeds [95% t]): "
            + "; ".join(
                f"`{arm}` outcome {fmt_ci(*seed_stats([diags[(arm, s)].get('reward/outcome') for s in rows['seeds']]))}, "
                f"perception {fmt_ci(*seed_stats([diags[(arm, s)].get('perception_rate') for s in rows['seeds']]))}, "
                f"reasoning {fmt_ci(*seed_stats([diags[(arm, s)].get('reasoning_rate') for s in rows['seeds']]))}"
                for arm, rows in f3.items()
            )
            + " (outcome: the mean of the `outcome` term, `reward/outcome`).",
            "",
        ]
        if BASELINE in f3:
            gap = f3[BASELINE]["within_gap"]
            # the pre-registered rule reads every seed that finished, at least 3 (all of them when fewer were asked)
            n = len(gap["per_seed"])
            done = n >= min(3, len(seeds)) and n > 1
            ok = all(g > 0 for g in gap["per_seed"]) and gap["stats"][1] > 0
            undefined = undefined_r(f3[BASELINE])
            f3[BASELINE]["verdict"] = (
                f"pending ({n} of {len(seeds)} seeds)"
                if not done
                else f"undefined: {undefined}"  # a seed that measured nothing reads neither way
                if undefined
                else "reproduced"
                if ok
                else "not reproduced"
            )
            f3[BASELINE]["seeds_finished"] = f"{n} of {len(seeds)}"
            L += [
                f"**F3 verdict** (pre-registered: within-group r(outcome, reasoning) > r(outcome, perception) in every seed, "
                f"and the t interval of the gap over seeds excludes 0): **{f3[BASELINE]['verdict']}** "
                f"({f3[BASELINE]['seeds_finished']} seeds finished).",
                "",
            ]
        if BASELINE in f3 and plan.ckpt_rule:
            L += ckpt_section(f3[BASELINE], {s: trained[(BASELINE, s)] for s in f3[BASELINE]["seeds"]}, plan, runs, seeds, specs)
    # ---- F3 by training-step window (descriptive) ----
    windows: dict[str, dict[str, Any]] = {}
    for arm in f3:
        per_seed = {s: coupling_windows(trained[(arm, s)]) for s in f3[arm]["seeds"]}
        n = max((len(w["reasoning"]) for w in per_seed.values()), default=0)
        rows = []
        for i in range(n):
            r = [w["reasoning"][i] if i < len(w["reasoning"]) else None for w in per_seed.values()]
            p = [w["perception"][i] if i < len(w["perception"]) else None for w in per_seed.values()]
            gap = [x - y for x, y in zip(r, p) if x is not None and y is not None]
            groups = sum(w["groups/perception"][i] for w in per_seed.values() if i < len(w["groups/perception"]))
            rows.append(
                {
                    "steps": f"{i * WINDOW + 1}–{(i + 1) * WINDOW}",
                    "reasoning": seed_stats(r),
                    "perception": seed_stats(p),
                    "gap": seed_stats(gap),
                    "gap_per_seed": gap,
                    "groups_perception": groups,
                }
            )
        windows[arm] = {"seeds": f3[arm]["seeds"], "rows": rows}
    if any(w["rows"] for w in windows.values()):
        L += [
            f"## F3 by training-step window (descriptive: {WINDOW} steps, up to {WINDOW * 4} groups a window per seed)",
            "",
            "The outcome term's within-group r in each window of GRPO steps: each step's logged mean per-group r",
            "(`metrics.csv`) weighted by that step's groups where both vary (over all windows this is the stage's own",
            "within-group r above). Mean over seeds [95% t]; no rule was pre-registered for it.",
            "",
            "| arm | steps | r with reasoning correct | r with perception correct | gap: per seed | gap: mean [95% t] | groups (perception, all seeds) |",
            "|---|---|---|---|---|---|---:|",
        ]
        for arm, w in windows.items():
            for row in w["rows"]:
                L.append(
                    f"| {arm} | {row['steps']} | {fmt_ci(*row['reasoning'])} | {fmt_ci(*row['perception'])} "
                    f"| {' / '.join(f'{g:+.2f}' for g in row['gap_per_seed'])} | {fmt_ci(*row['gap'], signed=True)} "
                    f"| {row['groups_perception']:.0f} |"
                )
        L.append("")
    # ---- surrogates: correlation with true perception beside the gain ----
    sur_rows = []
    for arm in arms:
        ss = [s for s in seeds if (arm, s) in diags]
        if not ss:
            continue
        for key in sorted({k.split("/", 1)[1] for s in ss for k in diags[(arm, s)] if k.startswith("surrogate_corr/")}):
            pooled = [diags[(arm, s)].get(f"surrogate_corr/{key}") for s in ss]
            within = [diags[(arm, s)].get(f"surrogate_corr_within/{key}") for s in ss]
            gain = results.get(arm, {})
            sur_rows.append((arm, key, pooled, within, gain))
    if sur_rows:
        L += [
            "## Surrogates: correlation with true perception beside the gain (issue 16 item 4, F4)",
            "",
            "| arm | surrogate term | r with perception correct, pooled: per seed | mean [95% t] | within groups | Δa vs outcome [boot] | Δa_p [boot] |",
            "|---|---|---|---|---|---|---|",
        ]

        def g(gain: dict[str, Any], m: str) -> str:
            return ci(gain[m]) if m in gain else "–"

        for arm, key, pooled, within, gain in sur_rows:
            L.append(
                f"| {arm} | `{key}` | {' / '.join('–' if x is None else f'{x:.2f}' for x in pooled)} | {fmt_ci(*seed_stats(pooled))} "
                f"| {fmt_ci(*seed_stats(within))} | {g(gain, 'a')} | {g(gain, 'a_p')} |"
            )
        L.append("")
    # ---- role-weighted GRPO: the policy-gradient share of perception ----
    pg = [(arm, s, diags[(arm, s)]) for arm in arms for s in seeds if (arm, s) in diags]
    if pg:
        L += [
            "## Constant groups and the perception share of the policy gradient",
            "",
            "| arm | constant groups, sampled: mean over seeds | groups in the loss | perception share of completion tokens | pg_share/perception (mean over logged steps, metrics.csv) |",
            "|---|---|---|---|---|",
        ]
        for arm in arms:
            ds = [d for a, _, d in pg if a == arm]
            if not ds:
                continue
            cg = seed_stats([d.get("constant_group_frac_before") for d in ds])
            tg = seed_stats([d.get("trained_group_frac") for d in ds])
            ts = seed_stats([(d.get("token_share") or {}).get("perception") for d in ds])
            ps_ = seed_stats([d.get("pg_share/perception") for d in ds])
            L.append(f"| {arm} | {fmt_ci(*cg)} | {fmt_ci(*tg)} | {fmt_ci(*ts)} | {fmt_ci(*ps_)} |")
        L.append("")

    # ---- plots ----
    if metrics:
        shown = [a for a in arms if any((a, s) in metrics for s in seeds)]
        fig, axes = plt.subplots(1, len(fields), figsize=(4 * len(fields), 3.4), sharey=True)
        for ax, m in zip(axes, fields):
            for i, arm in enumerate(shown):
                ys = [metrics[(arm, s)][m] for s in seeds if (arm, s) in metrics]
                ax.scatter([i] * len(ys), ys, s=18, color="C0")
                ax.bar(i, np.mean(ys), color="C0", alpha=0.3)
            if base_m:
                ax.axhline(base_m[m], color="k", lw=1, ls="--", label="base")
            ax.set_xticks(range(len(shown)), shown, rotation=20)
            ax.set_title(m)
        axes[0].set_ylabel("accuracy (bars: seed mean; dots: seeds)")
        fig.tight_layout()
        fig.savefig(out / "arms.png", dpi=110)
        plt.close(fig)
        L += ["![arms](arms.png)", ""]
        # a_p and a_r over the evaluation points, per arm (seed mean)
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
        for i, arm in enumerate(shown):
            for ax, m, key in zip(axes, ("a_p", "a_r"), ("perception", "reasoning")):
                # the evaluation points every seed of the arm has (arms evaluated at their end only have one)
                curves = [
                    {h["step"]: h[key] for h in history(trained[(arm, s)]) if h.get(key) is not None} for s in seeds if (arm, s) in cells
                ]
                xs = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
                ys = [float(np.mean([c[x] for c in curves])) for x in xs]
                if xs:
                    start = base_m is not None and base_m.get(m) is not None
                    ax.plot([0, *xs] if start else xs, [base_m[m], *ys] if start else ys, marker="o", color=f"C{i}", label=arm)
                ax.set_title(f"{m} over GRPO steps (seed mean)")
                ax.set_xlabel("GRPO step")
        if axes[0].get_legend_handles_labels()[0]:
            axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "curves.png", dpi=110)
        plt.close(fig)
        L += ["![curves](curves.png)", ""]
    if results:
        plot_paired(results, BASELINE, out / "paired.png", width=8)
        L += ["![paired differences](paired.png)", ""]
    if BASELINE in f3:
        rows = f3[BASELINE]
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for j, kind in enumerate(COUPLING):
            for k, (truth, c) in enumerate((("reasoning", "C0"), ("perception", "C3"))):
                v = [x for x in rows[f"{kind}/outcome/{truth}"]["per_seed"] if x is not None]
                ax.scatter([j + (k - 0.5) * 0.25] * len(v), v, color=c, s=20, label=truth if j == 0 else None)
        ax.set_xticks(range(3), ["pooled", "within groups", "across ckpts"])
        ax.axhline(0, color="k", lw=0.8)
        ax.set_ylabel("r(outcome term, correct)")
        ax.set_title("F3: outcome-only GRPO, per seed")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "f3.png", dpi=110)
        plt.close(fig)
        L += ["![F3](f3.png)", ""]
    missing = [f"{a}-s{s}" for a in arms for s in seeds if (a, s) not in cells]
    if missing:
        L += [f"Cells not run or not complete: {', '.join(missing)}.", ""]
    from percepdsl.io import write_json_atomic, write_text_atomic

    write_json_atomic(
        out / "report.json",
        {
            "base": base_m,
            "cells": {f"{a}-s{s}": {**m, "run": cells[(a, s)].name, "trained": trained[(a, s)].name} for (a, s), m in metrics.items()},
            "reevaluation_checks": checks,
            "paired": results,
            "vs_start": moved,
            "f3": f3,
            "f3_windows": windows,
            "diagnostics": {f"{a}-s{s}": d for (a, s), d in diags.items()},
        },
    )
    return write_text_atomic(out / "report.md", "\n".join(L))


def make_start(plan: Plan, out: Path, start: Path | None, specs: Path = SPECS) -> list[str]:
    """Run the plan's start chain (each cell from the stage the previous one left, linked into OUT),
    or link ``start`` (an existing stage directory) as the last link; returns failures."""
    if start is not None:
        link_base(out / plan.link, start.resolve())
        return []
    for spec_name, seed, stage, link in plan.chain:
        cell = Cell(specs / spec_name, seed, link)
        if failed := run_cells([cell], out, 1, gate=True):
            say(f"the start failed: see {out / 'logs' / (link + '.log')}", err=True)
            return failed
        link_base(out / link, run_dir(cell, out / "runs") / "stages" / stage)
    return []


def run_plan(
    plan_name: str,
    out: Path,
    arms: list[str],
    seeds: list[int],
    *,
    jobs: int = 1,
    start_by: float | None = None,
    report_only: bool = False,
    start: Path | None = None,
    before: Path | None = None,
    no_before: bool = False,
    reeval_from: Path | None = None,
    specs: Path = SPECS,
) -> tuple[Path | None, list[str]]:
    """Run (or resume) a plan's cells in ``out`` unless ``report_only``, then write its report; returns the
    report's path (None when the start failed: no report) and the cells that failed. ``specs``: the folder
    of the plan's specs (`benchmarks/reproduce.py --quick` passes its miniatures, `specs/repro/quick/`)."""
    plan = PLANS[plan_name]
    out.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    if not report_only:
        t0 = time.time()
        say("the shared start:")
        if failed := make_start(plan, out, start, specs):
            return None, failed
        # the start's own evaluation, then seed-major over the core arms, so an early stop still
        # leaves paired comparisons; the optional arms (`ngdiff`) after every seed of the others
        order = [(a, s) for s in seeds for a in arms if a not in plan.late] + [(a, s) for a in arms if a in plan.late for s in seeds]
        cells = [Cell(plan.spec(plan.before, specs), 1, plan.before)] if plan.before and before is None and not no_before else []
        say(f"arms ({jobs} at a time):")

        def cell(arm: str, seed: int) -> Cell:
            if arm in plan.reeval and reeval_from is not None:
                by = f"benchmarks/repro_rl.py --plan {plan_name} --reeval-from {reeval_from.resolve()}"
                return eval_cell(arm, seed, out, reeval_from.resolve(), prefix=plan.prefix, fragment=plan.reeval_fragment, by=by)
            return Cell(plan.spec(arm, specs), seed, f"{arm}-s{seed}")

        failed += run_cells(cells + [cell(arm, s) for arm, s in order], out, jobs, start_by)
        say(f"wall time: {(time.time() - t0) / 60:.1f} min")
    with REPORTING:
        return report(out, arms, seeds, plan, before.resolve() if before else None, specs), failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--plan",
        choices=list(PLANS),
        default="sudoku",
        help="sudoku: session 3's grid; gc8: graph colouring, patch 8; gc8-ckpt: gc8's outcome arm with evaluation points",
    )
    ap.add_argument("--out", type=Path, default=Path("runs/repro_rl"))
    ap.add_argument("--arms", help="a subset of the plan's arms (default: all)")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    ap.add_argument("--report", action="store_true", help="only write the report from the cells that exist")
    ap.add_argument("--start", type=Path, help="start the arms from this stage directory (its model/) instead of running the start chain")
    ap.add_argument(
        "--before", type=Path, help="a finished run that evaluated the start on the arms' test items (instead of the plan's `before` cell)"
    )
    ap.add_argument("--no-before", action="store_true", help="do not run the plan's `before` cell (the start's evaluation)")
    ap.add_argument(
        "--reeval-from",
        type=Path,
        help="an earlier run's OUT: re-evaluate its finished cells of the plan's `reeval` arms (gc8: outcome) instead of training them",
    )
    ap.add_argument("--jobs", type=int, default=1, help="cells at once (one thread each)")
    ap.add_argument("--start-by", help="HH:MM (UTC; the occurrence nearest now, within 12 h either way): no cell starts after it")
    a = ap.parse_args(argv)
    plan = PLANS[a.plan]
    arms = [x for x in (a.arms or ",".join(plan.arms)).split(",") if x]
    if unknown := [x for x in arms if x not in plan.arms]:
        ap.error(f"unknown arm(s) {unknown}; the plan's pre-registered arms are {list(plan.arms)}")
    if missing := [x for x in arms if not plan.spec(x).exists()]:
        ap.error(f"arm(s) {missing} have no spec (specs/repro/{plan.prefix}_<arm>.pd)")
    if a.start is not None and not (a.start / "model").is_dir():
        ap.error(f"--start {a.start}: no model/ directory there (give a stage directory, e.g. RUN/stages/post)")
    if a.before is not None and not (a.before / "summary.json").exists():
        ap.error(f"--before {a.before}: no summary.json there (give a finished run directory)")
    if a.reeval_from is not None and not plan.reeval:
        ap.error(f"--reeval-from: the {a.plan} plan re-evaluates no arm")
    if a.reeval_from is not None and not (a.reeval_from / "runs").is_dir():
        ap.error(f"--reeval-from {a.reeval_from}: no runs/ folder there (give an earlier run's --out)")
    path, failed = run_plan(
        a.plan,
        a.out.resolve(),
        arms,
        [int(x) for x in a.seeds.split(",") if x],
        jobs=a.jobs,
        start_by=start_by_arg(ap, a.start_by),
        report_only=a.report,
        start=a.start,
        before=a.before,
        no_before=a.no_before,
        reeval_from=a.reeval_from,
    )
    if path is None:
        return 3
    print(path.read_text())
    print(f"report: {path}")
    return 3 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
