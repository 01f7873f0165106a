"""Tabulate pilot runs (issue 13): every evaluation point of every stage, from the run directories.

    python benchmarks/pilot_table.py RUN_DIR... [--json OUT.json] [--csv OUT.csv]
    python benchmarks/pilot_table.py RUN_DIR... --pair STAGE_A STAGE_B   # paired Δ within each run
    python benchmarks/pilot_table.py RUN_DIR... --pair STAGE_A STAGE_B --pool   # pooled over the runs (seeds)
    python benchmarks/pilot_table.py RUN_DIR... --cells                  # sudoku: where the cell errors are

Reads `stages/<stage>/eval-<step>.jsonl` (the per-item records) and, where the stage finished,
`stages/<stage>/done.json` (train time, token and loss share). Every figure is recomputed from
the records, so a row traces to its items. With `--pair A B`, prints for each run the paired
difference B − A of a, a_p and a_r on the same test items at the two stages' last evaluation,
with a 95% bootstrap interval over items (10,000 resamples; one seed: the interval says nothing
about seed variance); with `--pool` as well, one difference over all the runs' items (the seeds of a spec),
resampling items within each run. With `--cells` (sudoku), prints for each run's last evaluation where the
perception cell errors lie: on given cells (a digit misread, or read as blank) or on blank cells
(read as a digit), by row and by column, and the most frequent digit confusions; and the answer's
given cells copied and blank cells filled right, beside the chance of a uniform pick among each
blank's candidates.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from percepdsl.io import json_text, write_json_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))  # repro, beside it

KEYS = {"a": "outcome", "a_p": "perception_exact", "a_r": "cf_outcome"}


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def row_for(run: Path, stage: str, path: Path) -> dict[str, Any]:
    recs = read_records(path)
    step = int(path.stem.split("-")[1])
    slots = np.array([r["slot_errors"] for r in recs if r.get("slot_errors")])
    row: dict[str, Any] = {
        "run": run.name,
        "stage": stage,
        "step": step,
        "n": len(recs),
        **{k: float(np.mean([bool(r.get(f)) for r in recs])) for k, f in KEYS.items()},
        "partial": float(np.mean([r.get("perception_partial") or 0.0 for r in recs])),
        "format_ok": float(np.mean([bool(r.get("format_ok")) for r in recs])),
        "reasoning_given_perceived": float(np.mean([bool(r.get("reasoning_perceived")) for r in recs])),
        "mean_new_tokens": float(np.mean([r.get("n_tokens", 0) for r in recs])),
        "slot_errors": slots.sum(0).tolist() if len(slots) and len({len(s) for s in slots}) == 1 else None,
    }
    done = run / "stages" / stage / "done.json"
    if done.exists():
        rec = json.loads(done.read_text())
        hist = {h["step"]: h for h in rec.get("history", [])}
        if step in hist:
            row["eval_seconds"] = hist[step].get("seconds")
            diag = hist[step].get("diagnostics", {})
            row["token_share_perception"] = diag.get("token_share", {}).get("perception")
            row["loss_share_perception"] = diag.get("loss_share", {}).get("perception")
        row["stage_train_seconds"] = rec.get("train_seconds")
        row["stage_steps"] = rec.get("steps")
    return row


def table(runs: list[Path]) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        for sdir in sorted((run / "stages").glob("*")):
            for path in sorted(sdir.glob("eval-*.jsonl")):
                rows.append(row_for(run, sdir.name, path))
    return rows


def last_eval(run: Path, stage: str) -> list[dict[str, Any]]:
    paths = sorted((run / "stages" / stage).glob("eval-*.jsonl"))
    if not paths:
        raise SystemExit(f"{run}: stage `{stage}` has no evaluation yet")
    return read_records(paths[-1])


def _diffs(run: Path, a: str, b: str) -> tuple[int, dict[str, np.ndarray]]:
    """B − A per item on the same items of one run, per metric on the items both stages scored on it
    (`repro.verdict_value`: a stage without the counterfactual pass has no a_r; such a metric pairs no item).
    An id scored twice, or naming another item in the two stages, stops it (`repro`'s checks). Returns the
    number of items both stages evaluated and the differences, in id order."""
    import repro

    ra = repro.by_id(last_eval(run, a), run / "stages" / a)
    rb = repro.by_id(last_eval(run, b), run / "stages" / b)
    if bad := repro.other_items(ra, rb):
        raise SystemExit(f"{run}: test item {bad[0]} is another item at stage `{a}` than at `{b}`; nothing is paired")
    ids = sorted(set(ra) & set(rb))
    if not ids:
        raise SystemExit(f"{run}: stages `{a}` and `{b}` evaluated no item in common")
    out = {}
    for key, field in KEYS.items():
        pairs = [
            (x, y)
            for i in ids
            if (x := repro.verdict_value(ra[i], field)) is not None and (y := repro.verdict_value(rb[i], field)) is not None
        ]
        out[key] = np.array([y - x for x, y in pairs], dtype=float)
    return len(ids), out


def paired(runs: Path | list[Path], a: str, b: str, resamples: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """B − A on the same items, with a 95% bootstrap interval, per metric on the items both stages scored on it
    (`_diffs`). Several runs (the seeds of one spec) pool their items: the mean over all items, and an interval
    that resamples items within each run (the runs themselves are not resampled: with 2–3 seeds the interval
    says nothing about seed variance)."""
    runs = [runs] if isinstance(runs, Path) else list(runs)
    per_run = [_diffs(run, a, b) for run in runs]
    rng = np.random.default_rng(seed)
    # one resample of each run's items for every metric scored on all of them (a run's metrics move together)
    idx = [rng.integers(0, n, size=(resamples, n)) for n, _ in per_run]
    # the stages under their own keys: `a` is also the end-to-end metric's, which overwrote stage A's name
    out: dict[str, Any] = {"run": ", ".join(r.name for r in runs), "stage_a": a, "stage_b": b, "n": sum(n for n, _ in per_run)}
    for key in KEYS:
        ds = [(d[key], i) for (n, d), i in zip(per_run, idx) if len(d[key])]
        if not ds:
            out[key] = {"diff": None, "ci95": None, "n": 0}
            continue
        total = sum(len(d) for d, _ in ds)
        boot = sum((d[i] if len(d) == i.shape[1] else d[rng.integers(0, len(d), size=(resamples, len(d)))]).sum(1) for d, i in ds) / total
        out[key] = {
            "diff": float(sum(d.sum() for d, _ in ds) / total),
            "ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
            "n": total,
        }
    return out


def cell_errors(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """Where a sudoku evaluation's perception errors lie, cell by cell (the k-th cell word read
    against the k-th cell of p*, as the task scores `slot_errors`; `/` ignored, a missing cell is
    an error). Returns counts over all items: given and blank cells and their errors by kind,
    the error rate per row and per column, and (truth, read) digit confusions, most frequent first.
    Beside them, the answer read the same way against the solution: the share of given cells it
    copies and of blank cells it fills right, and what picking a blank's digit uniformly among its
    candidates (the digits its row, column and box do not hold) would fill right on average.
    """
    from percepdsl_runtime.tasks.sudoku import _geometry

    n = int(recs[0]["instance"]["size"])
    geometry = _geometry(n)
    answer = {"given": 0, "blank": 0, "candidates": 0.0}
    kinds = dict.fromkeys(("given", "given_as_other_digit", "given_as_blank", "blank", "blank_as_digit", "missing"), 0)
    rows, cols = np.zeros(n), np.zeros(n)
    confusions: dict[tuple[str, str], int] = {}
    for r in recs:
        truth = [w for w in r["perception_ref"].split() if w != "/"]
        read = [w for w in (r.get("generated_perception") or "").split() if w != "/"][: n * n]
        for k, t in enumerate(truth):
            w = read[k] if k < len(read) else None
            kinds["blank" if t == "_" else "given"] += 1
            if w == t:
                continue
            rows[k // n] += 1
            cols[k % n] += 1
            if w is None:
                kinds["missing"] += 1
            elif t == "_":
                kinds["blank_as_digit"] += 1
            elif w == "_":
                kinds["given_as_blank"] += 1
            else:
                kinds["given_as_other_digit"] += 1
                confusions[t, w] = confusions.get((t, w), 0) + 1
        puzzle = [v for row in r["instance"]["puzzle"] for v in row]
        solution = [v for row in r["instance"]["solution"] for v in row]
        filled = [w for w in (r.get("generated_answer") or "").split() if w != "/"]
        for k, v in enumerate(puzzle):
            answer["given" if v else "blank"] += k < len(filled) and filled[k] == str(solution[k])
            if not v:  # the digits its row, column and box do not hold (the task's own geometry)
                answer["candidates"] += 1 / len(set(range(1, n + 1)) - {puzzle[j] for j in geometry.peers[k]})
    cells = len(recs) * n  # cells per row (or column) over all items
    return {
        "n": len(recs),
        **kinds,
        "row_error_rate": (rows / cells).round(4).tolist(),
        "col_error_rate": (cols / cells).round(4).tolist(),
        "confusions": sorted(([t, w, c] for (t, w), c in confusions.items()), key=lambda x: (-x[2], x[0], x[1])),
        "answer_given_right": round(answer["given"] / max(kinds["given"], 1), 4),
        "answer_blank_right": round(answer["blank"] / max(kinds["blank"], 1), 4),
        "answer_blank_candidate_chance": round(answer["candidates"] / max(kinds["blank"], 1), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--csv", type=Path)
    ap.add_argument("--pair", nargs=2, metavar=("STAGE_A", "STAGE_B"))
    ap.add_argument(
        "--pool", action="store_true", help="with --pair: one difference over the runs' items (the seeds), resampled within runs"
    )
    ap.add_argument("--cells", action="store_true", help="sudoku: where the cell errors lie, perception and answer (last evaluation)")
    args = ap.parse_args()
    if args.cells:
        for run in args.runs:
            stages = sorted(d.name for d in (run / "stages").glob("*") if any(d.glob("eval-*.jsonl")))
            if not stages:
                raise SystemExit(f"{run}: no evaluation yet")
            print(json_text({"run": run.name, "stage": stages[-1], **cell_errors(last_eval(run, stages[-1]))}))
        return
    if args.pair:
        if args.pool:
            print(json_text(paired(args.runs, *args.pair)))
            return
        for run in args.runs:
            print(json_text(paired(run, *args.pair)))
        return
    rows = table(args.runs)
    cols = ["run", "stage", "step", "n", "a", "a_p", "a_r", "partial", "format_ok", "mean_new_tokens", "eval_seconds"]
    print("| " + " | ".join(cols) + " | slot errors |")
    print("|" + "---|" * (len(cols) + 1))
    for r in rows:
        cells = [f"{r.get(c):.3f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        print("| " + " | ".join(cells) + f" | {r['slot_errors']} |")
    if args.json:
        write_json_atomic(args.json, rows)
    if args.csv:
        with args.csv.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
