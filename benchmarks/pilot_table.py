"""Tabulate pilot runs (issue 13): every evaluation point of every stage, from the run directories.

    python benchmarks/pilot_table.py RUN_DIR... [--json OUT.json] [--csv OUT.csv]
    python benchmarks/pilot_table.py RUN_DIR... --pair STAGE_A STAGE_B   # paired Δ within each run

Reads `stages/<stage>/eval-<step>.jsonl` (the per-item records) and, where the stage finished,
`stages/<stage>/done.json` (train time, token and loss share). Every figure is recomputed from
the records, so a row traces to its items. With `--pair A B`, prints for each run the paired
difference B − A of a, a_p and a_r on the same test items at the two stages' last evaluation,
with a 95% bootstrap interval over items (10,000 resamples; one seed: the interval says nothing
about seed variance).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

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


def paired(run: Path, a: str, b: str, resamples: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """B − A on the same items, with a 95% bootstrap interval over items."""
    ra = {r["id"]: r for r in last_eval(run, a)}
    rb = {r["id"]: r for r in last_eval(run, b)}
    ids = sorted(set(ra) & set(rb))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(ids), size=(resamples, len(ids)))
    out: dict[str, Any] = {"run": run.name, "a": a, "b": b, "n": len(ids)}
    for key, field in KEYS.items():
        d = np.array([float(bool(rb[i].get(field))) - float(bool(ra[i].get(field))) for i in ids])
        boot = d[idx].mean(1)
        out[key] = {"diff": float(d.mean()), "ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--csv", type=Path)
    ap.add_argument("--pair", nargs=2, metavar=("STAGE_A", "STAGE_B"))
    args = ap.parse_args()
    if args.pair:
        for run in args.runs:
            print(json.dumps(paired(run, *args.pair)))
        return
    rows = table(args.runs)
    cols = ["run", "stage", "step", "n", "a", "a_p", "a_r", "partial", "format_ok", "mean_new_tokens", "eval_seconds"]
    print("| " + " | ".join(cols) + " | slot errors |")
    print("|" + "---|" * (len(cols) + 1))
    for r in rows:
        cells = [f"{r.get(c):.3f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        print("| " + " | ".join(cells) + f" | {r['slot_errors']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    if args.csv:
        with args.csv.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
