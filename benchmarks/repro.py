"""The reproduction of issue 13 in one command: the pre-registered grid, resumable, and its report.

    python benchmarks/repro.py --quick --out runs/repro          # run (or resume) and report
    python benchmarks/repro.py --quick --out runs/repro --report # report only, from what exists
    python benchmarks/repro.py --quick --out runs/repro --arms tm,lam --seeds 1,2,3
    python benchmarks/repro.py --quick --plan p8 --out runs/repro8   # session 3's plan (patch 8)

The plans (`benchmarks/results/preregistration.md`): graph colouring, one shared reasoner base
(`specs/repro/<prefix>_base.pd`, trained once), then the SFT arms `specs/repro/<prefix>_<arm>.pd`
from its checkpoint for each seed (prefix `gc`: session 2's plan, patch 16 after its amendment 2;
`gc8`: session 3's, patch 8, 500-step arms); arms of one seed share the data order and the test items, so they are
compared item by item. Every cell is a plain `percep run` (one thread each, `--jobs` at once) in
`OUT/runs/`; a cell whose summary.json exists is skipped, an interrupted one is resumed with
`--resume`, so running the command again continues where it stopped. The arms run with OUT as
working directory, where `<prefix>_base` links to the base stage (their `model hf "<prefix>_base/model"`).

The report (`OUT/report.md`, `OUT/*.png`) takes each arm's metrics from its cell's summary.json
and the paired differences from the same cell's eval.jsonl (the per-item records summary.json is
computed from; the script checks that the two agree): per seed, pooled over seeds with a 95%
paired bootstrap interval (items resampled within seeds), and the seed-level t interval; F1 (the
token-mean arm against the shared start) with a bootstrap interval of Δa_r − Δa_p.
Only `--quick` plans are pre-registered so far; the full plan (both tasks, F3/F4) is not.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SPECS = REPO / "specs" / "repro"
PLANS = {"quick16": "gc", "p8": "gc8"}  # plan name -> spec prefix (preregistration.md, sessions 2 and 3)
GO = {"gc8": (0.6, 0.2)}  # pre-registered go/no-go of the base: a_r at least, a_p at most (session 3)
# cells run after other results were seen (session 3's amendments 1 and 2): prefix -> arm -> seeds;
# a comparison that uses any of them is labelled exploratory (the confirmatory seeds 4-6 are not)
EXPLORATORY = {"gc8": {"ngdiff": {1, 2, 3}}}
ARMS = ("tm", "lam", "ngdiff")  # the pre-registered arms; `tm` is the baseline
BASELINE = "tm"
SEEDS = (1, 2, 3)
METRICS = {"a": ("end_to_end", "outcome"), "a_p": ("perception", "perception_exact"), "a_r": ("reasoning", "cf_outcome")}
BOOT = 10_000
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # two-sided 95% t quantiles by df


@dataclass(frozen=True)
class Cell:
    spec: Path
    seed: int | None  # None: the spec's own seed
    label: str

    def overrides(self) -> dict[str, str]:
        return {} if self.seed is None else {"seed": str(self.seed)}


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


def command(cell: Cell, runs: Path) -> list[str]:
    args = [sys.executable, "-m", "percepdsl", "run", str(cell.spec), "--out", str(runs), "-q"]
    for k, v in cell.overrides().items():
        args += ["--set", f"{k}={v}"]
    if run_dir(cell, runs).exists():
        args.append("--resume")
    return args


def run_cells(cells: list[Cell], out: Path, jobs: int) -> list[str]:
    """Run the cells not yet done, `jobs` at a time, each in its own process group; returns failures."""
    runs, logs = out / "runs", out / "logs"
    runs.mkdir(parents=True, exist_ok=True)
    logs.mkdir(exist_ok=True)
    todo = [c for c in cells if not (run_dir(c, runs) / "summary.json").exists()]
    for c in cells:
        if c not in todo:
            print(f"  done    {c.label}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per cell: two stall each other otherwise
    live: dict[subprocess.Popen, tuple[Cell, float]] = {}
    failed: list[str] = []
    try:
        while todo or live:
            while todo and len(live) < jobs:
                c = todo.pop(0)
                log = open(logs / f"{c.label}.log", "ab")  # noqa: SIM115 (closed with the process)
                p = subprocess.Popen(command(c, runs), cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                live[p] = (c, time.time())
                print(f"  start   {c.label}  (log: {logs / (c.label + '.log')})", flush=True)
            time.sleep(2)
            for p in [p for p in live if p.poll() is not None]:
                c, t0 = live.pop(p)
                ok = p.returncode == 0
                print(f"  {'done' if ok else 'FAILED'}    {c.label}  ({(time.time() - t0) / 60:.1f} min, exit {p.returncode})", flush=True)
                if not ok:
                    failed.append(c.label)
    except KeyboardInterrupt:
        for p in live:  # percep run checkpoints on SIGINT; the next call resumes
            os.killpg(p.pid, signal.SIGINT)
        for p in live:
            p.wait()
        print("interrupted: run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    return failed


# ---- report -------------------------------------------------------------------------------------


def final_records(rd: Path) -> dict[str, dict[str, Any]]:
    """The last stage's final evaluation records of a run, by item id."""
    summary = json.loads((rd / "summary.json").read_text())
    stage = summary["final_stage"]
    recs = [json.loads(line) for line in (rd / "eval.jsonl").read_text().splitlines() if line.strip()]
    return {r["id"]: r for r in recs if r["stage"] == stage and r.get("final")}


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
    half = T_975[k - 1] * per_seed.std(ddof=1) / np.sqrt(k) if k > 1 else float("nan")
    return {
        "mean": float(pooled.mean()),
        "lo": float(np.quantile(boots, 0.025)),
        "hi": float(np.quantile(boots, 0.975)),
        "per_seed": [float(x) for x in per_seed],
        "seed_lo": float(per_seed.mean() - half),
        "seed_hi": float(per_seed.mean() + half),
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


def verdict(d: dict[str, Any]) -> str:
    """The pre-registered decision rule for F2 (preregistration.md)."""
    if d["mean"] > 0 and d["lo"] > 0 and sum(x > 0 for x in d["per_seed"]) >= 2:
        return "reproduced"
    if d["mean"] > 0:
        return "direction only (interval includes 0)" if d["lo"] <= 0 else "direction only (< 2 seeds positive)"
    return "not reproduced"


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
        results[arm] = {}
        for m, field in fields.items():
            diffs = []
            for s in common:
                x, y = final_records(cells[(arm, s)]), final_records(cells[(baseline, s)])
                ids = sorted(set(x) & set(y))
                diffs.append(np.array([float(bool(x[i][field])) - float(bool(y[i][field])) for i in ids]))
            results[arm][m] = {**paired(diffs, rng), "seeds": common}
    return results


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


def report(out: Path, arms: list[str], seeds: list[int], prefix: str = "gc") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = out / "runs"
    rng = np.random.default_rng(0)
    plan = next(k for k, v in PLANS.items() if v == prefix)
    lines = [f"# Reproduction report (`--quick --plan {plan}`, graph colouring)", ""]
    lines += [
        "Generated by `python benchmarks/repro.py` from the cells in `runs/`; the plan and the decision rules are",
        "pre-registered in `benchmarks/results/preregistration.md`. Every metric below is the cell's",
        "`summary.json` (checked against its `eval.jsonl`); every difference is computed item by item from",
        "`eval.jsonl`. Test items per evaluation are stated in each row (the issue asks for at least 500).",
        "The F2 table applies the pre-registered rule; the table after it is the framework's `percep report --baseline`.",
        "",
    ]
    base = out / f"{prefix}_base"  # the base stage the arms started from (its done.json and eval records)
    base_m = stage_metrics(base) if (base / "done.json").exists() else None
    if base and base_m:
        lines += [
            "## Shared start",
            "",
            "| start | n | a | a_p | a_r | a_p partial | format_ok | train min |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            f"| reasoner base (`{base.resolve()}`) | {base_m['n']} | {base_m['a']:.3f} | {base_m['a_p']:.3f} | {base_m['a_r']:.3f} "
            f"| {base_m['partial']:.3f} | {base_m['format_ok']:.3f} | {base_m['train_min']:.1f} |",
            "",
        ]
        if prefix in GO:
            min_ar, max_ap = GO[prefix]
            go = base_m["a_r"] >= min_ar and base_m["a_p"] <= max_ap
            lines += [
                f"Pre-registered go/no-go (a_r ≥ {min_ar}, a_p ≤ {max_ap}): **{'go' if go else 'no-go: outside the regime, no verdict'}**.",
                "",
            ]
    cells: dict[tuple[str, int], Path] = {}
    for arm in arms:
        for s in seeds:
            rd = find_run(Cell(SPECS / f"{prefix}_{arm}.pd", s, f"{arm}-s{s}"), runs)
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
            f"| {arm} | {s} | {m['n']} | {m['a']:.3f} | {m['a_p']:.3f} | {m['a_r']:.3f} | {m['partial']:.3f} | {m['format_ok']:.3f} "
            f"| {m['train_min']:.1f} | {slots(m['slot_errors'])} | `{rd.name}` |"
        )
    lines.append("")

    # paired differences against the baseline arm, on the seeds both have
    results = paired_against(cells, arms, seeds, BASELINE, {m: field for m, (_, field) in METRICS.items()}, rng)
    if results:
        lines += [
            f"## F2: paired differences against `{BASELINE}` (arm − {BASELINE})",
            "",
            "| arm | metric | seeds | item pairs | Δ pooled | 95% paired bootstrap | Δ per seed | seed-level 95% t interval | F2 verdict (on a) |",
            "|---|---|---|---:|---:|---|---|---|---|",
        ]
        for arm, per in results.items():
            for m, d in per.items():
                v = verdict(d) if m == "a" else ""
                if v and set(d["seeds"]) & EXPLORATORY.get(prefix, {}).get(arm, set()):  # run late: no verdict below 3 seeds
                    v = f"exploratory: {v}" if len(d["seeds"]) >= 3 else "exploratory (< 3 seeds: no verdict)"
                seeds_txt = ",".join(map(str, d["seeds"]))
                per_seed = " / ".join(f"{x:+.3f}" for x in d["per_seed"])
                seed_ci = f"[{d['seed_lo']:+.3f}, {d['seed_hi']:+.3f}]" if len(d["per_seed"]) > 1 else "– (one seed)"
                lines.append(
                    f"| {arm} | {m} | {seeds_txt} | {d['n_pairs']} | {d['mean']:+.3f} | [{d['lo']:+.3f}, {d['hi']:+.3f}] | {per_seed} | "
                    f"{seed_ci} | {v} |"
                )
        lines.append("")
    if cells and any(a == BASELINE for a, _ in cells):
        # the framework's own paired table (`percep report RUN... --baseline`), computed from the same
        # records: its bootstrap resamples seeds as well as items, so with 3 seeds it can differ from
        # the pre-registered interval above
        from percepdsl_runtime.grid.paired import load_runs, paired_markdown, paired_report

        rep = paired_report(load_runs(sorted(cells.values())), f"experiment=repro_{prefix}_{BASELINE}")
        lines += ["### The same comparison by `percep report --baseline`", "", paired_markdown(rep).split("\n", 2)[-1].strip(), ""]
    # F1: the token-mean arm against the shared start
    f1: dict[str, Any] | None = None
    if base_m and any(a == BASELINE for a, _ in metrics):
        tm_seeds = [s for s in seeds if (BASELINE, s) in metrics]
        tm = [metrics[(BASELINE, s)] for s in tm_seeds]
        d_ar = [m["a_r"] - base_m["a_r"] for m in tm]
        d_ap = [m["a_p"] - base_m["a_p"] for m in tm]

        def gap(recs: Any) -> np.ndarray:  # per item: a_r − a_p
            return np.array([float(bool(r["cf_outcome"])) - float(bool(r["perception_exact"])) for r in recs])

        f1 = f1_gap(gap(stage_records(base)), [gap(final_records(cells[(BASELINE, s)]).values()) for s in tm_seeds], rng)
        f1_verdict = "reproduced" if f1["lo"] > 0 else ("direction only (interval includes 0)" if f1["mean"] > 0 else "not reproduced")
        lines += [
            f"## F1: token-averaged SFT from the shared start (`{BASELINE}` − base)",
            "",
            "| seed | Δa_r | Δa_p | Δa_r − Δa_p |",
            "|---:|---:|---:|---:|",
            *(f"| {s} | {r:+.3f} | {p:+.3f} | {r - p:+.3f} |" for s, r, p in zip(tm_seeds, d_ar, d_ap)),
            f"| mean | {np.mean(d_ar):+.3f} | {np.mean(d_ap):+.3f} | **{f1['mean']:+.3f}** [{f1['lo']:+.3f}, {f1['hi']:+.3f}] |",
            "",
            f"Base evaluated on {base_m['n']} items of seed 1's test stream, the arms on their own seed's items: the interval",
            "(95% bootstrap, the base's and each arm's items resampled independently) treats them as unpaired.",
            f"Pre-registered F1 rule (Δa_r − Δa_p > 0, interval excluding 0): **{f1_verdict}**.",
            "",
        ]
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
    missing = [f"{a}-s{s}" for a in arms for s in seeds if (a, s) not in cells]
    if missing:
        lines += [f"Cells not (yet) complete: {', '.join(missing)}.", ""]
    from percepdsl.io import write_json_atomic, write_text_atomic

    write_json_atomic(
        out / "report.json", {"base": base_m, "cells": {f"{a}-s{s}": m for (a, s), m in metrics.items()}, "paired": results, "f1": f1}
    )
    return write_text_atomic(out / "report.md", "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", required=True, help="a pre-registered quick plan (the only kind so far)")
    ap.add_argument("--plan", choices=list(PLANS), default="quick16", help="quick16: session 2's plan; p8: session 3's (patch 8)")
    ap.add_argument("--out", type=Path, default=Path("runs/repro"))
    ap.add_argument("--jobs", type=int, default=2, help="cells at once (one thread each)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"subset of {','.join(ARMS)}")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    ap.add_argument("--report", action="store_true", help="only write the report from the cells that exist")
    ap.add_argument(
        "--base-model", type=Path, help="start the arms from this stage directory (its model/, done.json) instead of training the base"
    )
    a = ap.parse_args(argv)
    arms = [x for x in a.arms.split(",") if x]
    if unknown := [x for x in arms if x not in ARMS]:
        ap.error(f"unknown arm(s) {unknown}; the pre-registered arms are {list(ARMS)}")
    seeds = [int(x) for x in a.seeds.split(",") if x]
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    prefix = PLANS[a.plan]
    base_spec = SPECS / f"{prefix}_base.pd"
    failed: list[str] = []
    if not a.report:
        t0 = time.time()
        link = out / f"{prefix}_base"
        if a.base_model:
            target = a.base_model.resolve()
        else:
            print("base (shared reasoner start):", flush=True)
            failed += run_cells([Cell(base_spec, None, "base")], out, 1)
            if failed:
                print(f"the base failed: see {out / 'logs' / 'base.log'}", file=sys.stderr)
                return 3
            target = run_dir(Cell(base_spec, None, "base"), out / "runs") / "stages" / "base"
        link_base(link, target)
        print("arms:", flush=True)
        # seed-major order: complete seeds first, so an early stop still leaves paired comparisons
        failed += run_cells([Cell(SPECS / f"{prefix}_{arm}.pd", s, f"{arm}-s{s}") for s in seeds for arm in arms], out, a.jobs)
        print(f"wall time: {(time.time() - t0) / 60:.1f} min", flush=True)
    path = report(out, arms, seeds, prefix)
    print(path.read_text())
    print(f"report: {path}")
    return 3 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
