"""A grid's results table: complete run summaries aggregated into a row per setting (mean ±
sample std over seeds of the reported metrics, their first→last-stage deltas and key
diagnostics), rendered as CSV and Markdown. Pure data: the plots (`plots.py`) read it."""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, stdev
from typing import Any

from percepdsl.grid import literal

from .common import CELLS_DIR, DEFAULT_METRICS, FAILED
from .state import load_state, read_summary

# Diagnostics (flattened with ".") worth a column: what the study's tables discuss.
DIAGNOSTIC_PATTERNS = ("token_share.perception", "loss_share.perception", "*corr*", "*effective*")
# ... but not the counts that come with the correlations (groups where a per-group r was defined, checkpoints)
DIAGNOSTIC_EXCLUDED = ("*corr_groups*", "*corr_ckpt_points")


@dataclass
class Stat:
    """Mean ± sample std over seeds; std is None for a single value."""

    mean: float
    std: float | None
    n: int

    @staticmethod
    def of(values: Sequence[Any]) -> Stat | None:
        """Over the finite numbers among `values` (missing metrics are None and skipped)."""
        vals = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        if not vals:
            return None
        return Stat(mean(vals), stdev(vals) if len(vals) > 1 else None, len(vals))

    def show(self, digits: int = 3) -> str:
        return f"{self.mean:.{digits}f}" + ("" if self.std is None else f" ± {self.std:.{digits}f}")


@dataclass
class Column:
    key: str  # CSV prefix: `end_to_end`, `delta_end_to_end`, `diag.token_share.perception`
    title: str  # Markdown header


@dataclass
class Row:
    params: dict[str, Any]  # the setting: every template param (no seed)
    seeds: list[Any] = field(default_factory=list)  # ints, as the summaries give them
    failed: int = 0
    values: dict[str, Stat | None] = field(default_factory=dict)

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)


@dataclass
class ResultsTable:
    grid: str
    metrics: list[str]
    axes: list[str]  # params that vary between rows (the table's leading columns)
    constant: dict[str, Any]  # params equal in every row
    stages: tuple[str, str] | None  # (first, last) stage of the deltas
    columns: list[Column]
    rows: list[Row]
    n_runs: int  # complete summaries aggregated

    def stat(self, row: Row, key: str) -> Stat | None:
        return row.values.get(key)


def flatten(d: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested dicts, keys joined with "."."""
    out: dict[str, float] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        out[prefix[:-1]] = float(d)
    return out


def _stage_delta(summary: dict[str, Any], metric: str) -> tuple[float | None, tuple[str, str] | None]:
    """Change of a metric from the first stage to the last (stages are in run order)."""
    stages = summary.get("stages")
    if not isinstance(stages, dict) or len(stages) < 2:
        return None, None
    names = list(stages)
    first = (stages[names[0]] or {}).get("metrics", {}) or {}
    last = (stages[names[-1]] or {}).get("metrics", {}) or {}
    a, b = first.get(metric), last.get(metric)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(b) - float(a), (names[0], names[-1])
    return None, (names[0], names[-1])


def row_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def sort_value(v: Any) -> tuple:
    if isinstance(v, bool):
        return (0, int(v), "")
    if isinstance(v, (int, float)):
        return (0, float(v), "")
    return (1, 0.0, str(v))


def collect(grid_dir: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Complete summaries of the grid's cells under GRID_DIR/cells/*/, and the grid state (None if absent).

    With a state, only the run directories of the cells it plans (`other_runs` lists the rest): a cell
    of the grid before its template or `--set` values changed keeps its directory, and counted with
    the new cells it doubled a setting's seeds."""
    grid_dir = Path(grid_dir)
    state = load_state(grid_dir)
    planned = _planned(state)
    summaries = []
    for run_dir in sorted((grid_dir / CELLS_DIR).glob("*/")):
        if planned is not None and run_dir.name not in planned:
            continue
        s = read_summary(run_dir)
        if s is not None:
            summaries.append({**s, "_run_dir": run_dir.name})
    return summaries, state


def _planned(state: dict[str, Any] | None) -> set[str] | None:
    """The run directory names of the cells a grid state plans (None: no state to go by)."""
    cells = (state or {}).get("cells") or []
    if not cells or not all(isinstance(e, dict) and isinstance(e.get("run_dir"), str) for e in cells):
        return None
    return {Path(e["run_dir"]).name for e in cells}


def other_runs(grid_dir: str | Path) -> list[Path]:
    """Run directories under GRID_DIR/cells that are no cell of the grid as last planned (left out of its tables)."""
    grid_dir = Path(grid_dir)
    planned = _planned(load_state(grid_dir))
    if planned is None:
        return []
    return [d for d in sorted((grid_dir / CELLS_DIR).glob("*/")) if not d.name.startswith(".") and d.name not in planned]


def aggregate(
    summaries: Sequence[dict[str, Any]], state: dict[str, Any] | None = None, metrics: Sequence[str] | None = None, grid: str | None = None
) -> ResultsTable:
    """A row per setting (params without the seed): mean ± std over seeds of the metrics, their
    first→last-stage deltas and key diagnostics; failed cells (from the state) are counted."""
    state = state or {}
    metrics = list(metrics or state.get("report") or DEFAULT_METRICS)
    by_hash = {e.get("hash"): e for e in state.get("cells", []) if isinstance(e, dict)}

    rows: dict[str, Row] = {}
    samples: dict[str, dict[str, list[Any]]] = {}  # row key → column key → a value per seed (None: missing)
    stages: tuple[str, str] | None = None
    diag_keys: list[str] = []

    def row_for(params: dict[str, Any]) -> Row:
        params = {k: v for k, v in params.items() if k != "seed"}
        k = row_key(params)
        if k not in rows:
            rows[k] = Row(params)
            samples[k] = {}
        return rows[k]

    for s in summaries:
        entry = by_hash.get(s.get("hash"), {})
        raw = s.get("params")
        row = row_for(raw if isinstance(raw, dict) else entry.get("params") or {})
        seed = s.get("seed", entry.get("seed"))
        row.seeds.append(seed)
        bucket = samples[row_key(row.params)]
        final = s.get("final") or {}
        for m in metrics:
            bucket.setdefault(m, []).append(final.get(m))
            d, st = _stage_delta(s, m)
            stages = stages or st
            bucket.setdefault(f"delta_{m}", []).append(d)
        for dk, dv in flatten(s.get("diagnostics") or {}).items():
            if any(fnmatch.fnmatch(dk, p) for p in DIAGNOSTIC_PATTERNS) and not any(fnmatch.fnmatch(dk, p) for p in DIAGNOSTIC_EXCLUDED):
                if dk not in diag_keys:
                    diag_keys.append(dk)
                bucket.setdefault(f"diag.{dk}", []).append(dv)
    done_hashes = {s.get("hash") for s in summaries}
    for e in state.get("cells", []):
        if isinstance(e, dict) and e.get("status") == FAILED and e.get("hash") not in done_hashes:
            row_for(e.get("params") or {}).failed += 1

    columns = [Column(m, m) for m in metrics]
    if stages is not None:
        arrow = f"{stages[0]}→{stages[1]}"
        columns += [Column(f"delta_{m}", f"Δ{m} ({arrow})") for m in metrics]
    columns += [Column(f"diag.{k}", k) for k in diag_keys]
    for k, row in rows.items():
        row.values = {c.key: Stat.of(samples[k].get(c.key, [])) for c in columns}
        row.seeds = sorted(row.seeds, key=sort_value)

    all_names: list[str] = []
    for row in rows.values():
        all_names += [n for n in row.params if n not in all_names]
    varying = [n for n in all_names if len({row_key({"v": r.params.get(n)}) for r in rows.values()}) > 1]
    order = [n for n in state.get("axes", []) if n in varying] + sorted(n for n in varying if n not in state.get("axes", []))
    axes = order or (all_names if len(rows) == 1 else [])
    constant = {n: next(iter(rows.values())).params.get(n) for n in all_names if n not in varying} if rows else {}
    ordered = sorted(rows.values(), key=lambda r: tuple(sort_value(r.params.get(n)) for n in axes))
    return ResultsTable(grid or state.get("grid") or "grid", metrics, axes, constant, stages, columns, ordered, len(summaries))


def fmt_param(v: Any) -> str:
    return literal(v) if v is not None else ""


def table_csv(table: ResultsTable) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = [*table.axes, "n_seeds", "seeds", "n_failed"]
    for c in table.columns:
        head += [f"{c.key}_mean", f"{c.key}_std"]
    w.writerow(head)
    for r in table.rows:
        line: list[Any] = [fmt_param(r.params.get(a)) for a in table.axes]
        line += [r.n_seeds, ";".join(map(str, r.seeds)), r.failed]
        for c in table.columns:
            st = r.values.get(c.key)
            line += ["" if st is None else repr(round(st.mean, 6)), "" if st is None or st.std is None else repr(round(st.std, 6))]
        w.writerow(line)
    return buf.getvalue()


def table_markdown(table: ResultsTable, plots: Sequence[Path] = ()) -> str:
    out = [f"# Grid `{table.grid}`", ""]
    out.append(
        f"{table.n_runs} finished run{'s' if table.n_runs != 1 else ''} in {len(table.rows)} setting"
        f"{'s' if len(table.rows) != 1 else ''}; mean ± sample std over seeds."
    )
    if table.stages:
        out.append(f"Δ columns: change from the first stage (`{table.stages[0]}`) to the last (`{table.stages[1]}`).")
    if table.constant and table.axes != list(table.constant):
        out.append("Same in every row: " + ", ".join(f"`{k} = {fmt_param(v)}`" for k, v in table.constant.items()) + ".")
    out.append("")
    head = [*table.axes, "seeds", "failed", *(c.title for c in table.columns)]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "|".join("---" if i < len(table.axes) else "---:" for i in range(len(head))) + "|")
    for r in table.rows:
        cells = [fmt_param(r.params.get(a)) for a in table.axes] + [str(r.n_seeds), str(r.failed)]
        # a mean over fewer seeds than the row's (a metric some seeds lack) says over how many
        cells += [
            "—" if (st := r.values.get(c.key)) is None else st.show() + (f" ({st.n} of {r.n_seeds} seeds)" if st.n < r.n_seeds else "")
            for c in table.columns
        ]
        out.append("| " + " | ".join(cells) + " |")
    if plots:
        out += ["", *[f"![{p.stem}]({p.name})" for p in plots]]
    return "\n".join(out) + "\n"
