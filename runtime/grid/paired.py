"""Paired differences against a named baseline arm, with 95% confidence intervals.

An *arm* is a setting: the params of a run without its seed (a grid row), or, across run
directories of different experiments, the experiment name and params. Two arms are compared
on *pairs*: the runs of the same seed (same data order), and within a seed the test items
both evaluated (item ids in their ``eval.jsonl``). For each arm, metric and seed s:

    d_s = mean over the paired items i of (x_arm,s,i − x_base,s,i)

(for the final stage's records; without ``eval.jsonl`` the summaries' final metrics give
d_s, and only the seed interval exists). Reported per arm and metric:

* ``mean``: the mean of d_s over the paired seeds;
* ``t_ci``: the t-interval over seeds, mean ± t(0.975, n−1)·sd/√n. It accounts for
  seed-to-seed variation (training noise), which dominates at this scale; with 3 seeds
  t(0.975, 2) = 4.30, so it is wide, and it does not exist for a single seed;
* ``boot_ci``: a paired hierarchical bootstrap (percentile interval): each replicate draws
  the seeds with replacement, then within each drawn seed the paired items with replacement
  (the same items for both arms: the pairing is kept), and averages the per-seed mean
  differences. It adds the test-set sampling noise to the seed noise, and it exists for one
  seed (then it is the item-level paired interval). It was chosen over per-seed item
  intervals because it answers the same question as the t-interval (the mean over seeds)
  and is one interval per arm; with n seeds the seed stage sees only the n observed seeds
  (its variance is (n−1)/n of the t-interval's), so with few seeds read the wider of the two.
  The RNG seed is fixed (``BOOT_SEED``): the same run directories give the same interval.

Every per-seed figure names the two run directories it came from, and the per-item
records' means are checked against each run's ``summary.json`` (a mismatch is listed in
``problems``: the records and the summary disagree, so neither should be trusted blindly).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from percepdsl.grid import literal
from percepdsl.io import read_regular

BOOT_REPS = 4000
BOOT_SEED = 20260529  # fixed: the bootstrap interval is a function of the run directories
LEVEL = 0.95

# summary metric → the eval.jsonl field holding its per-item value
ITEM_FIELDS: dict[str, str] = {
    "end_to_end": "outcome",
    "perception": "perception_exact",
    "reasoning": "cf_outcome",
    "perception_partial": "perception_partial",
    "format_ok": "format_ok",
}
PAIRED_METRICS = tuple(ITEM_FIELDS)
SHORT = {"end_to_end": "a", "perception": "a_p", "reasoning": "a_r", "perception_partial": "a_p partial", "format_ok": "format"}


class BaselineError(ValueError):
    """A baseline selector that is malformed or names no arm (or several)."""


def t_quantile(df: int, level: float = LEVEL) -> float:
    """The two-sided t critical value: t(1 − (1 − level)/2, df)."""
    from scipy.stats import t

    return float(t.ppf(1 - (1 - level) / 2, df))


def t_interval(diffs: Sequence[float], level: float = LEVEL) -> tuple[float, float] | None:
    """mean ± t(df = n−1)·s/√n over the per-seed differences; None for fewer than 2."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.size < 2:
        return None
    half = t_quantile(d.size - 1, level) * float(d.std(ddof=1)) / math.sqrt(d.size)
    m = float(d.mean())
    return (m - half, m + half)


def hierarchical_bootstrap(
    per_seed: Sequence[np.ndarray], reps: int = BOOT_REPS, seed: int = BOOT_SEED, level: float = LEVEL
) -> tuple[float, float] | None:
    """Percentile interval of the mean over seeds of the per-seed mean paired difference,
    resampling seeds, then items within each drawn seed (``per_seed[s]``: the paired item
    differences of seed s). None when a seed has no items."""
    if not per_seed or any(len(d) == 0 for d in per_seed):
        return None
    rng = np.random.default_rng(seed)
    n = len(per_seed)
    means = np.zeros(reps)
    for _slot in range(n):  # each of the n seed slots of every replicate
        chosen = rng.integers(n, size=reps)
        for s, d in enumerate(per_seed):
            rows = np.flatnonzero(chosen == s)
            if rows.size:
                idx = rng.integers(len(d), size=(rows.size, len(d)))
                means[rows] += np.asarray(d, dtype=np.float64)[idx].mean(axis=1)
    means /= n
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return (float(lo), float(hi))


# ---- reading runs ------------------------------------------------------------------------------


@dataclass
class RunData:
    """One finished run: its summary, and its final stage's per-item values by item id."""

    run_dir: Path
    summary: dict[str, Any]
    items: dict[str, dict[str, float]] | None  # item id → metric → value; None: no eval.jsonl
    problems: list[str] = field(default_factory=list)
    # item id → what the item is (its record's instance, else references, as canonical JSON): an id names an index in
    # the test stream, which depends on the seed and the task's params, so two runs' same id may be two items
    what: dict[str, str] = field(default_factory=dict)

    @property
    def seed(self) -> Any:
        return self.summary.get("seed")

    @staticmethod
    def load(run_dir: Path, summary: dict[str, Any]) -> RunData:
        run = RunData(Path(run_dir), summary, None)
        path = run.run_dir / "eval.jsonl"
        if not path.exists():
            return run
        stage = summary.get("final_stage")
        items: dict[str, dict[str, float]] = {}
        what: dict[str, str] = {}
        try:
            lines = read_regular(path).decode("utf-8").splitlines()  # a named pipe: refused, not waited on
        except OSError as exc:
            run.problems.append(f"{path}: cannot read ({exc.strerror or exc})")
            return run
        except UnicodeDecodeError as exc:
            run.problems.append(f"{path}: not UTF-8 (byte {exc.object[exc.start]:#04x} at offset {exc.start}); the file is ignored")
            return run
        for ln, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                run.problems.append(f"{path}:{ln}: not JSON; the file is ignored")
                return run
            if not isinstance(rec, dict):
                run.problems.append(f"{path}:{ln}: not a record (a JSON object); the file is ignored")
                return run
            if rec.get("stage") != stage or not rec.get("final"):
                continue
            vals = {m: rec[f] for m, f in ITEM_FIELDS.items() if rec.get(f) is not None}
            bad = next((f for m, f in ITEM_FIELDS.items() if m in vals and not _finite(vals[m])), None)
            if bad is not None:
                run.problems.append(f"{path}:{ln}: `{bad}` is {json.dumps(rec[bad])[:40]}, not a finite number; the file is ignored")
                return run
            item = str(rec.get("id"))
            if item in items:
                run.problems.append(f"{path}:{ln}: test item {item} is scored twice in the final evaluation; the file is ignored")
                return run
            items[item] = {m: float(v) for m, v in vals.items()}
            if (inst := _item_of(rec)) is not None:
                what[item] = json.dumps(inst, sort_keys=True, default=str)
        run.items = items or None
        run.what = what
        run.check_against_summary()
        return run

    def check_against_summary(self) -> None:
        """The records' means must be the summary's final metrics (summary.json is computed from them)."""
        final = self.summary.get("final") or {}
        for m in PAIRED_METRICS:
            vals = [v[m] for v in (self.items or {}).values() if m in v]
            want = final.get(m)
            if vals and isinstance(want, (int, float)) and abs(math.fsum(vals) / len(vals) - want) > 1e-9:
                self.problems.append(
                    f"{self.run_dir}: `{m}` is {math.fsum(vals) / len(vals):.6f} over eval.jsonl's final records but {want:.6f} in summary.json"
                )


def _item_of(rec: Mapping[str, Any]) -> Any:
    """What an eval record's item is beyond its id: its instance, else its references; None when it states neither."""
    if rec.get("instance") is not None:
        return rec["instance"]
    if "ground_truth" in rec or "perception_ref" in rec:
        return [rec.get("perception_ref"), rec.get("ground_truth")]
    return None


def _finite(v: Any) -> bool:
    """A number an eval record holds: a verdict (true/false) or a finite score."""
    return isinstance(v, (int, float)) and math.isfinite(v)


def arm_key(summary: Mapping[str, Any]) -> dict[str, Any]:
    """What names a run's arm: its params without the seed, and its experiment."""
    params = summary.get("params") if isinstance(summary.get("params"), dict) else {}
    return {"experiment": summary.get("experiment"), **{k: v for k, v in params.items() if k != "seed"}}


def parse_selector(text: str) -> dict[str, Any]:
    """``NAME=VALUE[,NAME=VALUE…]`` (VALUE as in `--set`: a number, true/false or a string)
    into a dict; `experiment=NAME` selects by experiment name."""
    out: dict[str, Any] = {}
    for part in text.split(","):
        name, eq, raw = part.partition("=")
        name, raw = name.strip(), raw.strip()
        if not eq or not name or not raw:
            raise BaselineError(f"--baseline `{text}`: expected NAME=VALUE (e.g. `lam=0`), comma-separated for several params")
        out[name] = _value(raw)
    return out


def _value(raw: str) -> Any:
    if raw in ("true", "false"):
        return raw == "true"
    for conv in (int, float):
        try:
            return conv(raw)
        except ValueError:
            pass
    try:
        v = json.loads(raw)
        return v if isinstance(v, str) else raw
    except ValueError:
        return raw


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=1e-15)
    return a == b


# ---- the comparison ----------------------------------------------------------------------------


@dataclass
class Arm:
    key: dict[str, Any]
    label: str
    runs: dict[Any, RunData]  # seed → run


@dataclass
class PairedReport:
    baseline: str
    metrics: list[str]
    arms: list[dict[str, Any]]  # JSON-ready, one entry per non-baseline arm
    problems: list[str]
    level: float = LEVEL
    boot_reps: int = BOOT_REPS
    boot_seed: int = BOOT_SEED

    def to_json(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "level": self.level,
            "metrics": self.metrics,
            "method": {
                "difference": "per seed: mean over the test items both runs evaluated of (arm − baseline), final stage",
                "t_ci": "mean over seeds ± t(0.975, n−1)·sd/√n (needs ≥ 2 seeds)",
                "boot_ci": f"paired hierarchical bootstrap: seeds, then items within seed, with replacement; "
                f"percentile interval; {self.boot_reps} replicates, RNG seed {self.boot_seed}",
            },
            "arms": self.arms,
            "problems": self.problems,
        }


def group_arms(runs: Sequence[RunData]) -> tuple[list[Arm], list[str]]:
    """Runs grouped into arms by (experiment, params without seed); the labels name only what
    varies between arms. A second run of an arm with the same seed is reported and left out."""
    arms: dict[str, Arm] = {}
    problems: list[str] = []
    for r in runs:
        key = arm_key(r.summary)
        k = json.dumps(key, sort_keys=True, default=str)
        arm = arms.setdefault(k, Arm(key, "", {}))
        if r.seed in arm.runs:
            problems.append(f"{r.run_dir}: a second run of the same arm and seed {r.seed} (kept {arm.runs[r.seed].run_dir.name})")
            continue
        arm.runs[r.seed] = r
    return label_arms(list(arms.values())), problems


def label_arms(arms: list[Arm]) -> list[Arm]:
    """Label each arm by what varies between the arms (`lam=0.25`, `experiment=gc_a lam=0.5`)."""
    names = list(dict.fromkeys(n for a in arms for n in a.key))
    varying = [n for n in names if len({json.dumps(a.key.get(n), default=str) for a in arms}) > 1]
    for a in arms:
        a.label = " ".join(f"{n}={literal(a.key.get(n)) if n != 'experiment' else a.key.get(n)}" for n in varying) or "(all runs)"
    return arms


def full_label(arm: Arm) -> str:
    """An arm by all its params (`experiment=gc lam=0.5`), where the label names only what varies."""
    return " ".join(f"{n}={literal(v) if n != 'experiment' else v}" for n, v in arm.key.items())


def select_baseline(arms: Sequence[Arm], selector: Mapping[str, Any], text: str) -> Arm:
    hits = [a for a in arms if all(n in a.key and _same(a.key[n], v) for n, v in selector.items())]
    if len(hits) == 1:
        return hits[0]
    listed = "; ".join(a.label for a in arms) if len(arms) > 1 else full_label(arms[0]) if arms else "none"
    unknown = [n for n in selector if not any(n in a.key for a in arms)]
    if unknown:
        names = sorted({n for a in arms for n in a.key})
        raise BaselineError(f"--baseline `{text}`: no run has a param `{unknown[0]}` (params: {', '.join(names)})")
    if not hits:
        raise BaselineError(f"--baseline `{text}` matches none of the arms: {listed}")
    raise BaselineError(f"--baseline `{text}` matches {len(hits)} arms ({'; '.join(a.label for a in hits)}); name more params")


def paired_report(
    runs: Sequence[RunData], baseline: str, metrics: Sequence[str] = PAIRED_METRICS, reps: int = BOOT_REPS, seed: int = BOOT_SEED
) -> PairedReport:
    """Each arm's paired differences to the arm ``baseline`` selects (see the module doc)."""
    arms, problems = group_arms(runs)
    base = select_baseline(arms, parse_selector(baseline), baseline)
    problems = [*problems, *(p for r in runs for p in r.problems)]
    out: list[dict[str, Any]] = []
    for arm in arms:
        if arm is base:
            continue
        # in seed order: the bootstrap's fixed RNG draws by position, so the order of the run directories
        # (named by IR hash) must not decide its interval
        seeds = sorted(
            (s for s in arm.runs if s in base.runs),
            key=lambda s: (not isinstance(s, (int, float)), s if isinstance(s, (int, float)) else str(s)),
        )
        missing = sorted(set(arm.runs) ^ set(base.runs), key=str)
        if missing:
            problems.append(
                f"{arm.label}: seeds {', '.join(map(str, missing))} are not in both this arm and the baseline; left out of the pairs"
            )
        entry: dict[str, Any] = {"arm": arm.label, "params": arm.key, "seeds": seeds, "metrics": {}}
        for m in metrics:
            res = _compare(arm, base, seeds, m, reps, seed, problems)
            if res is not None:
                entry["metrics"][m] = res
        out.append(entry)
    return PairedReport(base.label, list(metrics), out, problems, boot_reps=reps, boot_seed=seed)


def _compare(arm: Arm, base: Arm, seeds: Sequence[Any], m: str, reps: int, seed: int, problems: list[str]) -> dict[str, Any] | None:
    per_seed: list[dict[str, Any]] = []
    item_diffs: list[np.ndarray] = []
    for s in seeds:
        a, b = arm.runs[s], base.runs[s]
        row: dict[str, Any] = {"seed": s, "run": a.run_dir.name, "baseline_run": b.run_dir.name}
        if a.items is not None and b.items is not None:
            other = [i for i in a.items if i in b.items and i in a.what and i in b.what and a.what[i] != b.what[i]]
            if other:
                problems.append(
                    f"{arm.label} seed {s}, `{m}`: test item {other[0]} is another item in {a.run_dir.name} than in {b.run_dir.name} "
                    f"({len(other)} ids so: not the same test split); not paired"
                )
                continue
            scored_a = [i for i in a.items if m in a.items[i]]
            scored_b = [i for i in b.items if m in b.items[i]]
            ids = [i for i in scored_a if m in b.items.get(i, {})]
            if not scored_a and not scored_b:  # neither run evaluated the metric (a_r without the counterfactual pass)
                continue
            if not ids:
                why = (
                    f"no item in both runs ({len(a.items)} / {len(b.items)} items)"
                    if not set(a.items) & set(b.items)
                    else f"scored on {len(scored_a)} / {len(scored_b)} of the items (no item scored in both runs)"
                )
                problems.append(f"{arm.label} seed {s}, `{m}`: {why}; not paired")
                continue
            if len(ids) < max(len(scored_a), len(scored_b)):
                problems.append(f"{arm.label} seed {s}, `{m}`: {len(ids)} items in both runs of {len(scored_a)} / {len(scored_b)}")
            xa = np.array([a.items[i][m] for i in ids])
            xb = np.array([b.items[i][m] for i in ids])
            d = xa - xb
            item_diffs.append(d)
            row.update(source="eval.jsonl", n_items=len(ids), value=float(xa.mean()), baseline=float(xb.mean()), diff=float(d.mean()))
        else:
            va, vb = (a.summary.get("final") or {}).get(m), (base.runs[s].summary.get("final") or {}).get(m)
            if not isinstance(va, (int, float)) or not isinstance(vb, (int, float)):
                continue
            row.update(source="summary.json", n_items=None, value=float(va), baseline=float(vb), diff=float(va) - float(vb))
        per_seed.append(row)
    if not per_seed:
        return None
    diffs = [r["diff"] for r in per_seed]
    t_ci = t_interval(diffs)
    items_ok = len(item_diffs) == len(per_seed)
    boot = hierarchical_bootstrap(item_diffs, reps, seed) if items_ok else None
    return {
        "mean": float(np.mean(diffs)),
        "n_seeds": len(per_seed),
        "sd": float(np.std(diffs, ddof=1)) if len(diffs) > 1 else None,
        "t_ci": list(t_ci) if t_ci else None,
        "t_df": len(diffs) - 1 if t_ci else None,
        "boot_ci": list(boot) if boot else None,
        "per_seed": per_seed,
    }


# ---- rendering ---------------------------------------------------------------------------------


def _ci(ci: Sequence[float] | None, digits: int) -> str:
    return "—" if not ci else f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"


def paired_markdown(rep: PairedReport, digits: int = 3) -> str:
    out = [
        f"## Paired differences against `{rep.baseline}`",
        "",
        "Per seed, the difference (arm − baseline) of the final stage on the test items both runs evaluated; "
        "Δ is its mean over the paired seeds. "
        f"t 95% CI: over seeds, t with n−1 df (wide with 3 seeds: t = {t_quantile(2):.2f}). "
        f"boot 95% CI: paired hierarchical bootstrap over seeds and items ({rep.boot_reps} replicates, RNG seed {rep.boot_seed}).",
        "",
        "| arm | metric | seeds | Δ | t 95% CI | boot 95% CI | per seed |",
        "|---|---|---:|---:|---|---|---|",
    ]
    for a in rep.arms:
        for m, r in a["metrics"].items():
            seeds = "; ".join(
                f"{p['seed']}: {p['diff']:+.{digits}f}" + (f" (n={p['n_items']})" if p.get("n_items") else "") for p in r["per_seed"]
            )
            out.append(
                f"| {a['arm']} | {SHORT.get(m, m)} | {r['n_seeds']} | {r['mean']:+.{digits}f} | {_ci(r['t_ci'], digits)} | "
                f"{_ci(r['boot_ci'], digits)} | {seeds} |"
            )
    if rep.problems:
        out += ["", "Problems found while pairing:", *(f"- {p}" for p in rep.problems)]
    return "\n".join(out) + "\n"


def load_runs(run_dirs: Sequence[Path]) -> list[RunData]:
    """Finished runs among ``run_dirs`` (a summary.json with status complete)."""
    from .state import read_summary

    out = []
    for d in run_dirs:
        s = read_summary(Path(d))
        if s is not None:
            out.append(RunData.load(Path(d), s))
    return out


__all__ = [
    "BOOT_REPS",
    "BOOT_SEED",
    "PAIRED_METRICS",
    "BaselineError",
    "PairedReport",
    "RunData",
    "hierarchical_bootstrap",
    "load_runs",
    "paired_markdown",
    "paired_report",
    "parse_selector",
    "t_interval",
    "t_quantile",
]
