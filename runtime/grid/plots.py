"""Plots of a grid's results table (matplotlib, Agg backend: no display needed).

- `tradeoff.png`: the perception–reasoning trade-off across the swept axis, as in the
  study's λ and α figures: x = perception accuracy, y = reasoning accuracy, one point per
  setting labelled by its axis value, error bars = std over seeds, points joined in axis order
  (one line per combination of the other swept params).
- `metrics_vs_<axis>.png`: each reported metric against each swept numeric axis.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from percepdsl.grid import literal  # noqa: E402
from percepdsl.io import atomic_path  # noqa: E402

from .results import sort_value  # noqa: E402

if TYPE_CHECKING:
    from .results import ResultsTable, Row, Stat


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def numeric_axes(table: ResultsTable) -> list[str]:
    """Swept params whose values are all numbers (what can be an x axis)."""
    return [a for a in table.axes if len(table.rows) > 1 and all(_is_number(r.params.get(a)) for r in table.rows)]


def _groups(table: ResultsTable, axis: str) -> dict[str, list[Row]]:
    """Rows split by the other swept params, each group sorted by `axis`."""
    others = [a for a in table.axes if a != axis]
    groups: dict[str, list[Row]] = {}
    for r in table.rows:
        key = ", ".join(f"{a}={literal(r.params.get(a))}" for a in others)
        groups.setdefault(key, []).append(r)
    for rows in groups.values():
        rows.sort(key=lambda r: sort_value(r.params.get(axis)))
    return groups


def _err(st: Stat | None) -> float:
    return 0.0 if st is None or st.std is None else st.std


def plot_tradeoff(table: ResultsTable, path: Path) -> Path | None:
    """x = perception, y = reasoning, labelled by the swept value; None without both metrics."""
    if not any(r.values.get("perception") and r.values.get("reasoning") for r in table.rows):
        return None
    num = numeric_axes(table)
    axis = num[0] if num else (table.axes[0] if table.axes else None)
    groups = _groups(table, axis) if axis else {"": list(table.rows)}
    fig, ax = plt.subplots(figsize=(6.0, 4.8), dpi=120)
    for name, rows in groups.items():
        pts = [(r, p, q) for r in rows if (p := r.values.get("perception")) is not None and (q := r.values.get("reasoning")) is not None]
        if not pts:
            continue
        xs, ys = [p.mean for _, p, _ in pts], [q.mean for _, _, q in pts]
        ax.errorbar(
            xs,
            ys,
            xerr=[_err(p) for _, p, _ in pts],
            yerr=[_err(q) for _, _, q in pts],
            marker="o",
            capsize=3,
            linestyle="-" if axis in num else "none",
            label=name or None,
        )
        for r, p, q in pts:
            text = f"{axis}={literal(r.params.get(axis))}" if axis else ""
            ax.annotate(text, (p.mean, q.mean), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("perception accuracy (a_p)")
    ax.set_ylabel("reasoning accuracy (a_r)")
    ax.set_title(f"{table.grid}: perception–reasoning trade-off" + (f" over {axis}" if axis else ""))
    ax.grid(True, alpha=0.3)
    if any(groups):
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path


def plot_metrics_vs_axis(table: ResultsTable, axis: str, path: Path) -> Path | None:
    """A panel per reported metric: mean ± std over seeds against the axis value."""
    metrics = [m for m in table.metrics if any(r.values.get(m) for r in table.rows)]
    if not metrics:
        return None
    groups = _groups(table, axis)
    fig, axs = plt.subplots(1, len(metrics), figsize=(4.0 * len(metrics), 3.6), dpi=120, squeeze=False)
    for ax, m in zip(axs[0], metrics):
        for name, rows in groups.items():
            pts = [(r.params[axis], st) for r in rows if (st := r.values.get(m)) is not None]
            if pts:
                ax.errorbar(
                    [x for x, _ in pts], [s.mean for _, s in pts], yerr=[_err(s) for _, s in pts], marker="o", capsize=3, label=name or None
                )
        ax.set_xlabel(axis)
        ax.set_title(m)
        ax.grid(True, alpha=0.3)
        if any(groups):
            ax.legend(fontsize=7)
    fig.suptitle(f"{table.grid}: metrics against {axis} (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def write_plots(table: ResultsTable, out_dir: Path) -> list[Path]:
    """Every plot the table supports, as PNGs in out_dir; returns their paths."""
    out_dir = Path(out_dir)
    written = [plot_tradeoff(table, out_dir / "tradeoff.png")]
    written += [plot_metrics_vs_axis(table, a, out_dir / f"metrics_vs_{_safe(a)}.png") for a in numeric_axes(table)]
    return [p for p in written if p is not None]
